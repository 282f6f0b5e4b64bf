"""The user config and the layers: precedence, origins, what a project file may not do."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from agentkernel.config import (
    NOT_IMPLEMENTED_KEYS,
    USER_ONLY_KEYS,
    EffectiveConfig,
    Origin,
    effective_config,
    user_config_path,
)
from agentkernel.errors import ConfigError


class Dirs:
    """A user config dir and a project dir, as a user's machine has them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.xdg = root / "xdg"
        self.user = self.xdg / "agentkernel" / "config.toml"
        self.project = root / "project"
        self.project.mkdir()
        self.env: dict[str, str] = {"XDG_CONFIG_HOME": str(self.xdg), "HOME": str(root)}

    def write_user(self, text: str) -> Path:
        self.user.parent.mkdir(parents=True, exist_ok=True)
        self.user.write_text(text)
        self.user.chmod(0o644)
        return self.user

    def write_project(self, text: str) -> Path:
        path = self.project / "agentkernel.toml"
        path.write_text(text)
        return path

    def effective(self, **kw: Any) -> EffectiveConfig:
        env = {**self.env, **kw.pop("env", {})}
        return effective_config(self.project, env, **kw)


@pytest.fixture
def dirs(tmp_path: Path) -> Dirs:
    return Dirs(tmp_path)


def _ignored(eff: EffectiveConfig, key: str) -> bool:
    head, _, leaf = key.rpartition(".")
    shown = f"[{head}] {leaf}" if head else f"[{leaf}]"
    return any(shown in w and "ignored" in w for w in eff.warnings)


# -- where the user's file is ----------------------------------------------------------------

def test_user_config_path_follows_xdg_then_home(tmp_path: Path) -> None:
    assert user_config_path({"XDG_CONFIG_HOME": "/x", "HOME": "/h"}) == \
        Path("/x/agentkernel/config.toml")
    assert user_config_path({"HOME": "/h"}) == Path("/h/.config/agentkernel/config.toml")
    # A relative XDG_CONFIG_HOME is ignored (the XDG spec says so).
    assert user_config_path({"XDG_CONFIG_HOME": "rel", "HOME": "/h"}) == \
        Path("/h/.config/agentkernel/config.toml")


def test_no_files_gives_defaults(dirs: Dirs) -> None:
    eff = dirs.effective()
    assert eff.files == [] and eff.warnings == [] and eff.project_source is None
    assert eff.config.security.profile == "moderate"
    assert eff.origin("security.profile") == Origin("default")


# -- precedence and origins ------------------------------------------------------------------

def test_each_layer_beats_the_one_below_and_says_so(dirs: Dirs) -> None:
    user = dirs.write_user('[sandbox]\nbackend = "namespaces"\n[security]\nprofile = "moderate"\n'
                           '[images]\nmirrors = ["127.0.0.1:5000"]\nca_file = "/etc/ca.pem"\n'
                           '[resources]\npids = 300\nmemory = "1g"\n')
    project = dirs.write_project('[security]\nprofile = "restrictive"\n[resources]\npids = 200\n')
    eff = dirs.effective(env={"AGENTKERNEL_REGISTRY_CA": "/env/ca.pem"},
                         flags={"security.profile": ("moderate", "--profile"),
                                "sandbox.backend": (None, "--backend")})
    cfg = eff.config
    assert (cfg.sandbox.backend, eff.origin("sandbox.backend")) == \
        ("namespaces", Origin("user", str(user)))
    assert (cfg.resources.memory, eff.origin("resources.memory")) == \
        (1024, Origin("user", str(user)))
    assert (cfg.resources.pids, eff.origin("resources.pids")) == \
        (200, Origin("project", str(project)))
    assert (cfg.images.ca_file, eff.origin("images.ca_file")) == \
        ("/env/ca.pem", Origin("env", "AGENTKERNEL_REGISTRY_CA"))
    assert (cfg.security.profile, eff.origin("security.profile")) == \
        ("moderate", Origin("flag", "--profile"))
    assert eff.origin("security.network") == Origin("default")
    assert eff.files == [("user", user), ("project", project)]
    assert eff.project_source == "project"
    assert eff.warnings == []


def test_env_mirror_comes_before_the_users(dirs: Dirs) -> None:
    user = dirs.write_user('[images]\nmirrors = ["127.0.0.1:5000"]\n')
    eff = dirs.effective(env={"AGENTKERNEL_REGISTRY_MIRROR": "a.example, b.example"})
    assert eff.config.images.mirrors == ["a.example", "b.example", "127.0.0.1:5000"]
    origin = eff.origin("images.mirrors")
    assert origin.kind == "env" and "AGENTKERNEL_REGISTRY_MIRROR" in origin.source
    assert str(user) in origin.source


def test_env_settings_are_applied_once(dirs: Dirs) -> None:
    """The registry client must not add the environment's mirror a second time."""
    from agentkernel.images.registry import RegistryOptions

    dirs.write_user('[images]\nmirrors = ["127.0.0.1:5000"]\n')
    env = {"AGENTKERNEL_REGISTRY_MIRROR": "m.example"}
    eff = dirs.effective(env=env)
    old = os.environ.get("AGENTKERNEL_REGISTRY_MIRROR")
    os.environ["AGENTKERNEL_REGISTRY_MIRROR"] = "m.example"
    try:
        assert RegistryOptions.from_config(eff.config).mirrors == ["m.example", "127.0.0.1:5000"]
    finally:
        if old is None:
            os.environ.pop("AGENTKERNEL_REGISTRY_MIRROR")
        else:
            os.environ["AGENTKERNEL_REGISTRY_MIRROR"] = old


def test_caller_env_not_ours_decides(dirs: Dirs) -> None:
    """What the planner needs: the caller's variables, not this process's."""
    eff = dirs.effective(env={"AGENTKERNEL_MICROVM_ALLOW_EMULATION": "1",
                              "AGENTKERNEL_MICROVM_VMM": "qemu"})
    assert eff.config.microvm.allow_emulation is True and eff.config.microvm.vmm == "qemu"
    assert eff.origin("microvm.vmm") == Origin("env", "AGENTKERNEL_MICROVM_VMM")
    assert effective_config(dirs.project, dirs.env).config.microvm.allow_emulation is False


def test_bad_env_value_names_the_variable(dirs: Dirs) -> None:
    with pytest.raises(ConfigError, match=r"AGENTKERNEL_MICROVM_VMM.*microvm\.vmm"):
        dirs.effective(env={"AGENTKERNEL_MICROVM_VMM": "bochs"})


def test_bad_file_names_the_file(dirs: Dirs) -> None:
    user = dirs.write_user('[security]\nprofile = "paranoid"\n')
    with pytest.raises(ConfigError) as exc:
        dirs.effective()
    assert str(user) in exc.value.message and "security.profile" in exc.value.message


def test_user_paths_are_relative_to_the_file(dirs: Dirs) -> None:
    dirs.write_user('[images]\nca_file = "certs/ca.pem"\n[microvm]\nkernel = "~/k"\n')
    cfg = dirs.effective().config
    assert cfg.images.ca_file == str(dirs.user.parent / "certs/ca.pem")
    assert cfg.microvm.kernel == str(dirs.root / "k")


def test_config_flag_replaces_the_project_file(dirs: Dirs) -> None:
    dirs.write_project('[security]\nprofile = "restrictive"\n')
    other = dirs.root / "other.toml"
    other.write_text('[sandbox]\nbackend = "namespaces"\n')
    eff = dirs.effective(config_path=other)
    assert eff.config.security.profile == "moderate"  # ./agentkernel.toml is not read
    assert eff.origin("sandbox.backend") == Origin("config", str(other))
    assert eff.project_source == "flag"
    with pytest.raises(ConfigError, match="does not exist"):
        dirs.effective(config_path=dirs.root / "missing.toml")


# -- what a project file may not do ------------------------------------------------------------

USER_ONLY_SAMPLES = {
    "images.registry": 'registry = "evil.example"',
    "images.mirrors": 'mirrors = ["evil.example"]',
    "images.insecure_registries": 'insecure_registries = ["evil.example"]',
    "images.ca_file": 'ca_file = "ca.pem"',
    "images.auths": 'auths = {"docker.io" = {username = "evil", password = "x"}}',
}


@pytest.mark.parametrize("key", sorted(USER_ONLY_SAMPLES))
def test_project_cannot_touch_registry_trust(dirs: Dirs, key: str) -> None:
    dirs.write_user('[images]\nmirrors = ["127.0.0.1:5000"]\n')
    project = dirs.write_project(f"[images]\n{USER_ONLY_SAMPLES[key]}\n")
    eff = dirs.effective()
    images = eff.config.images
    assert images.mirrors == ["127.0.0.1:5000"] and images.registry is None
    assert images.insecure_registries == [] and images.ca_file is None and images.auths == {}
    assert eff.origin(key).kind != "project"
    assert _ignored(eff, key) and any(str(project) in w for w in eff.warnings)
    # The same file vouched for with -c is the user's own choice: it applies.
    trusted = dirs.effective(config_path=project)
    assert trusted.origin(key).kind == "config" and not _ignored(trusted, key)


@pytest.mark.parametrize("text", ["[daemon]\npool_min = 9\n", "[api]\nallow_sudo_exec = true\n",
                                  '[microvm]\nkernel = "/tmp/evil-vmlinux"\n'])
def test_project_cannot_set_daemon_api_or_kernel(dirs: Dirs, text: str) -> None:
    dirs.write_project(text)
    eff = dirs.effective()
    cfg = eff.config
    assert (cfg.daemon.pool_min, cfg.api.allow_sudo_exec, cfg.microvm.kernel) == (2, False, None)
    assert len([w for w in eff.warnings if "only your own config" in w]) == 1


def test_user_only_list_is_what_the_docs_say() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    for key in USER_ONLY_KEYS:
        head, _, leaf = key.rpartition(".")
        assert (f"`[{head}] {leaf}`" if head else f"`[{leaf}]`") in doc, key


LOOSENING = [
    # (user config, project file, the key the project may not set)
    # egress: an address entry reaches the always-denied set (metadata, private networks)
    ("", '[network]\nallow = ["169.254.169.254"]\n', "network.allow"),
    ("", '[network]\nallow = ["pypi.org", "10.0.0.0/8"]\n', "network.allow"),
    ('[network]\nallow = ["pypi.org"]\n', '[network]\nallow = ["evil.example"]\n',
     "network.allow"),
    ("", '[security]\nprofile = "permissive"\n', "security.profile"),
    ('[security]\nprofile = "restrictive"\n', '[security]\nprofile = "moderate"\n',
     "security.profile"),
    ("", "[security]\nmount_home = true\n", "security.mount_home"),
    ("", "[security]\npass_env = true\n", "security.pass_env"),
    ("", "[security]\nmount_cwd = true\n", "security.mount_cwd"),
    ("[security]\nnetwork = false\n", "[security]\nnetwork = true\n", "security.network"),
    ('[security]\nprofile = "restrictive"\n', "[security]\nnetwork = true\n", "security.network"),
    ("[security]\nread_only = true\n", "[security]\nread_only = false\n", "security.read_only"),
    ("", '[resources]\nmemory = "unlimited"\n', "resources.memory"),
    ("", '[resources]\npids = "unlimited"\n', "resources.pids"),
    ("", '[resources]\ndisk = "unlimited"\n', "resources.disk"),
    # A number above the cap the user's settings give raises it as surely (their own key,
    # its other spelling, else their profile's: moderate 512 MiB, 512 pids, 1 CPU).
    ("", "[resources]\npids = 1000000000\n", "resources.pids"),
    ("", "[security]\npids = 100000\n", "security.pids"),
    ("", '[resources]\nmemory = "64g"\n', "resources.memory"),
    ("", "[security]\nmemory_mb = 65536\n", "security.memory_mb"),
    ("", "[security]\ncpus = 64\n", "security.cpus"),
    ("[resources]\npids = 300\n", "[resources]\npids = 301\n", "resources.pids"),
    ("[security]\npids = 300\n", "[resources]\npids = 400\n", "resources.pids"),
    ('[resources]\ndisk = "1g"\n', '[resources]\ndisk = "2g"\n', "resources.disk"),
    ('[sandbox]\nbackend = "gvisor"\n', '[sandbox]\nbackend = "namespaces"\n', "sandbox.backend"),
    ('[sandbox]\nbackend = "gvisor"\n', '[sandbox]\nbackend = "auto"\n', "sandbox.backend"),
    ('[images]\noffline_fallback = "none"\n', '[images]\noffline_fallback = "host"\n',
     "images.offline_fallback"),
]


@pytest.mark.parametrize(("user", "project", "key"), LOOSENING)
def test_project_cannot_loosen(dirs: Dirs, user: str, project: str, key: str) -> None:
    if user:
        dirs.write_user(user)
    dirs.write_project(project)
    eff = dirs.effective()
    assert eff.origin(key).kind != "project"
    assert _ignored(eff, key)
    assert len(eff.warnings) == 1 and "may not loosen" in eff.warnings[0]


def test_loosened_profile_does_not_reach_the_run(dirs: Dirs) -> None:
    """The profile a run gets (planner.resolve_profile) from a hostile project file."""
    from agentkernel.planner import RunRequest, resolve_profile

    dirs.write_project('[security]\nprofile = "permissive"\nmount_home = true\npass_env = true\n'
                       "read_only = false\n")
    eff = dirs.effective()
    p = resolve_profile(RunRequest(argv=[], cwd=dirs.project), eff.config)
    assert (p.name, p.network, p.mount_home, p.pass_env, p.workspace) == \
        ("moderate", "egress", False, False, "cow")


TIGHTENING = [
    ("", '[network]\nallow = ["pypi.org"]\n', "network.allow"),  # names: default-deny
    ("", '[network]\ndeny = ["*.example.com"]\n', "network.deny"),
    ("", '[security]\nprofile = "restrictive"\n', "security.profile"),
    ("", "[security]\nnetwork = false\n", "security.network"),
    ("", "[security]\nnetwork = true\n", "security.network"),  # moderate has network already
    ("", "[security]\nread_only = true\n", "security.read_only"),
    ("", '[resources]\nmemory = "256m"\n', "resources.memory"),  # under moderate's 512 MiB
    ('[resources]\nmemory = "4g"\n', '[resources]\nmemory = "2g"\n', "resources.memory"),
    ("", "[security]\npids = 100\n", "security.pids"),
    ("", "[security]\ncpus = 0.5\n", "security.cpus"),
    ('[security]\nprofile = "permissive"\n', "[resources]\npids = 2048\n", "resources.pids"),
    ("", '[sandbox]\nbackend = "namespaces"\n', "sandbox.backend"),  # the user chose none
    ('[sandbox]\nbackend = "gvisor"\n', '[sandbox]\nbackend = "microvm"\n', "sandbox.backend"),
    ('[security]\nprofile = "permissive"\n', '[security]\nprofile = "moderate"\n',
     "security.profile"),
    ('[security]\nprofile = "permissive"\n', "[security]\nmount_home = true\n",
     "security.mount_home"),  # the user shares it already
    ("", '[images]\noffline_fallback = "none"\n', "images.offline_fallback"),
]


@pytest.mark.parametrize(("user", "project", "key"), TIGHTENING)
def test_project_may_tighten(dirs: Dirs, user: str, project: str, key: str) -> None:
    if user:
        dirs.write_user(user)
    dirs.write_project(project)
    eff = dirs.effective()
    assert eff.origin(key).kind == "project" and eff.warnings == []


def test_flags_may_loosen(dirs: Dirs) -> None:
    dirs.write_user('[security]\nprofile = "restrictive"\n')
    eff = dirs.effective(flags={"security.profile": ("permissive", "--profile")})
    assert eff.config.security.profile == "permissive" and eff.warnings == []


# -- the user's file ------------------------------------------------------------------------------

def test_user_file_writable_by_others_is_ignored(dirs: Dirs) -> None:
    dirs.write_user('[sandbox]\nbackend = "namespaces"\n').chmod(0o666)
    eff = dirs.effective()
    assert eff.config.sandbox.backend == "auto" and eff.files == []
    assert len(eff.warnings) == 1 and "writable by other users" in eff.warnings[0]


def test_project_only_keys_in_the_user_file_warn(dirs: Dirs) -> None:
    dirs.write_user('[sandbox]\nname = "x"\nbase_image = "python:3.12"\n')
    eff = dirs.effective()
    assert eff.config.sandbox.base_image is None
    assert len(eff.warnings) == 2 and all("belongs in a project" in w for w in eff.warnings)


# -- keys nothing reads ---------------------------------------------------------------------------

def test_unread_keys_warn_once_per_file(dirs: Dirs) -> None:
    user = dirs.write_user("[resources]\nmemory_mb = 1024\nvcpus = 2\npids = 300\n")
    project = dirs.write_project('[network]\nports = ["8080"]\n[ssh]\nenabled = true\n'
                                 '[agent]\npreferred = "codex"\n')
    eff = dirs.effective()
    assert eff.warnings == [
        f"{user}: not implemented yet, ignored: resources.vcpus, resources.memory_mb",
        f"{project}: not implemented yet, ignored: network.ports, ssh.enabled",
    ]
    notes = {s.key: s.note for s in eff.settings()}
    assert notes["resources.memory_mb"] == "not implemented yet"
    assert notes["agent.preferred"] == "informational" and notes["resources.pids"] == ""
    assert "ssh.port" not in notes  # an unread default says nothing


def test_not_implemented_keys_are_unread() -> None:
    """Each key listed as unread really is: nothing under src/ reads the attribute."""
    src = Path(__file__).resolve().parents[1] / "src" / "agentkernel"
    text = "\n".join(p.read_text() for p in src.rglob("*.py") if p.name != "config.py")
    for key in NOT_IMPLEMENTED_KEYS:
        # How the code reaches a section: config.resources.disk, cfg.images..., getattr.
        patterns = [f".{key}", f'"{key.rpartition(".")[0]}", "{key.rpartition(".")[2]}"'] \
            if "." in key else [f"config.{key}", f"cfg.{key}", f'(config, "{key}"']
        assert not [p for p in patterns if p in text], key


def test_unknown_key_names_file_and_key(dirs: Dirs) -> None:
    user = dirs.write_user("[security]\nnetwrk = false\n")
    eff = dirs.effective()
    assert any(str(user) in w and "security.netwrk" in w for w in eff.warnings)


def test_secrets_are_not_shown(dirs: Dirs) -> None:
    dirs.write_user('[api]\napi_key = "s3cret"\n[images.auths."r.example"]\n'
                    'username = "me"\npassword = "hunter2"\n')
    shown = json.dumps([s.value for s in dirs.effective().settings()])
    assert "s3cret" not in shown and "hunter2" not in shown and "<hidden>" in shown


# -- the daemon's file -----------------------------------------------------------------------------

def test_daemon_reads_config_toml_then_the_older_name(dirs: Dirs,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from agentkernel.daemon.server import daemon_config_path

    monkeypatch.setenv("XDG_CONFIG_HOME", str(dirs.xdg))
    monkeypatch.delenv("AGENTKERNEL_DAEMON_CONFIG", raising=False)
    assert daemon_config_path(None) is None
    legacy = dirs.xdg / "agentkernel" / "agentkernel.toml"
    legacy.parent.mkdir(parents=True)
    legacy.write_text("")
    assert daemon_config_path(None) == str(legacy)
    assert daemon_config_path(None) != str(dirs.write_user(""))
    assert daemon_config_path(None) == str(dirs.user)


# -- the command --------------------------------------------------------------------------

def _ak(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentkernel", *args], cwd=cwd,
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=60, check=False)


def test_config_command_shows_origins(dirs: Dirs) -> None:
    user = dirs.write_user('[images]\nmirrors = ["127.0.0.1:5000"]\n[resources]\nmemory_mb = 99\n')
    project = dirs.write_project('[security]\nprofile = "permissive"\nnetwork = false\n')
    r = _ak("config", cwd=dirs.project, env={**dirs.env, "AGENTKERNEL_REGISTRY_CA": "/ca.pem"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"# user config: {user}"
    assert f"# project file: {project}" in lines

    def line(key: str) -> list[str]:
        return next(ln for ln in lines if f" {key} = " in ln).split()

    assert line("images.mirrors") == [f"user:{user}", "images.mirrors", "=",
                                      '["127.0.0.1:5000"]']
    assert line("security.network") == [f"project:{project}", "security.network", "=", "false"]
    assert line("security.profile") == ["default", "security.profile", "=", '"moderate"']
    assert line("images.ca_file")[0] == "env:AGENTKERNEL_REGISTRY_CA"
    assert line("resources.memory_mb")[3:] == ["99", "#", "not", "implemented", "yet"]
    # Warnings: on stderr, one line each, naming the file.
    err = r.stderr.strip().splitlines()
    assert len(err) == 2 and all(ln.startswith("agentkernel: warning: ") for ln in err)
    assert "not implemented yet" in err[0] and str(project) in err[1]
    # `config show` is the same command.
    assert _ak("config", "show", cwd=dirs.project, env={**dirs.env,
               "AGENTKERNEL_REGISTRY_CA": "/ca.pem"}).stdout == r.stdout


def test_config_command_json_and_flags(dirs: Dirs) -> None:
    dirs.write_user('[sandbox]\nbackend = "gvisor"\n')
    r = _ak("config", "show", "--json", "-p", "restrictive", cwd=dirs.project, env=dirs.env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["user_config"] == {"path": str(dirs.user), "read": True}
    assert doc["settings"]["security.profile"] == {"value": "restrictive", "origin": "flag",
                                                   "source": "--profile", "note": None}
    assert doc["settings"]["sandbox.backend"]["origin"] == "user"
    assert doc["settings"]["sandbox.backend"]["source"] == str(dirs.user)
    assert doc["settings"]["daemon.pool_min"] == {"value": 2, "origin": "default",
                                                  "source": None, "note": None}
    assert doc["warnings"] == []


def test_config_command_bad_config_is_one_line(dirs: Dirs) -> None:
    dirs.write_user("[security\n")
    r = _ak("config", cwd=dirs.project, env=dirs.env)
    assert r.returncode == 125 and len(r.stderr.strip().splitlines()) == 1
    assert str(dirs.user) in r.stderr


# -- a hostile project file against a real sandbox ---------------------------------------------

@pytest.mark.skipif(not os.path.exists("/usr/bin/bwrap"), reason="needs bubblewrap")
def test_hostile_project_file_does_not_get_the_home_dir(dirs: Dirs) -> None:
    """A cloned repo's agentkernel.toml asks for the permissive profile, the home dir and
    the environment: a plain `run` there stays moderate; `-c` (the user vouching) grants it."""
    home = dirs.root / "home"
    home.mkdir()
    (home / "secret").write_text("host-home-secret\n")
    dirs.write_project('[security]\nprofile = "permissive"\nmount_home = true\npass_env = true\n'
                       "mount_cwd = true\n")
    env = {**dirs.env, "HOME": str(home), "AGENTKERNEL_NO_DAEMON": "1"}
    script = ["sh", "-c", 'cat /home/user/secret 2>/dev/null; echo "home=$HOME"; '
              "echo x > /workspace/planted 2>/dev/null; true"]
    r = _ak("run", "-i", "host", "-B", "namespaces", "--json", "--", *script,
            cwd=dirs.project, env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["profile"] == "moderate" and doc["stdout"] == "home=/root\n"
    assert not (dirs.project / "planted").exists()  # the project dir stayed copy-on-write
    assert len([w for w in doc["stderr"].splitlines() + r.stderr.splitlines()
                if "may not loosen" in w]) == 4
    r = _ak("run", "-i", "host", "-B", "namespaces", "--json", "-c",
            str(dirs.project / "agentkernel.toml"), "--", *script, cwd=dirs.project, env=env)
    doc = json.loads(r.stdout)
    assert doc["profile"] == "permissive" and "host-home-secret" in doc["stdout"]
    assert (dirs.project / "planted").exists()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run the CLI as another user")
def test_ordinary_users_config_and_a_planted_one() -> None:
    """As uid 65534: its own config.toml is read; one owned by another (non-root) user, or
    writable by others, is ignored with a warning (whoever can write it picks registries)."""
    from sandbox_helpers import ak_as_user

    home = Path(tempfile.mkdtemp(prefix="ak-uc-", dir="/tmp"))
    try:
        home.chmod(0o755)
        user = home / ".config" / "agentkernel" / "config.toml"
        user.parent.mkdir(parents=True)
        user.write_text('[images]\nmirrors = ["127.0.0.1:5000"]\n')
        for path in (home, home / ".config", user.parent, user):
            os.chown(path, 65534, 65534)

        def show() -> tuple[dict[str, Any], str]:
            proc = ak_as_user(65534, home, "config", "--json", cwd=home, timeout=60)
            out, err = proc.communicate(timeout=90)
            assert proc.returncode == 0, err
            return json.loads(out), err

        doc, err = show()
        assert doc["user_config"] == {"path": str(user), "read": True} and err == ""
        assert doc["settings"]["images.mirrors"]["origin"] == "user"
        os.chown(user, 12345, 12345)
        doc, err = show()
        assert not doc["user_config"]["read"] and "owned by uid 12345" in err
        assert doc["settings"]["images.mirrors"]["value"] == []
        os.chown(user, 65534, 65534)
        user.chmod(0o666)
        doc, err = show()
        assert not doc["user_config"]["read"] and "writable by other users" in err
    finally:
        shutil.rmtree(home, ignore_errors=True)
