"""Tests for the agentkernel.toml schema, loader and init template."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentkernel.config import (
    INIT_TEMPLATE,
    Config,
    domain_matches,
    find_project_config,
    load_config,
    render_init,
    runtime_image,
)
from agentkernel.errors import ConfigError, UsageError

FULL = """
[sandbox]
name = "rust-app"
runtime = "rust"
base_image = "rust:1.85-alpine"
backend = "gvisor"

[agent]
preferred = "codex"
compatibility_mode = "codex"

[resources]
vcpus = 2
memory_mb = 1024

[network]
vsock_cid = 7
ports = ["8080:80", "3000", "5353:53/udp"]

[security]
profile = "custom"
network = false
mount_cwd = true
mount_home = false
pass_env = true
read_only = true
memory_mb = 256
pids = 128
cpus = 1
seccomp = "ai-agent"

[security.domains]
allow = ["PyPI.org", "*.github.com"]
block = ["169.254.169.254"]
allowlist_only = true

[security.commands]
allow = ["python3"]
block = ["curl", "/usr/bin/wget"]
allowlist_only = false

[build]
dockerfile = "Dockerfile.dev"
context = "."
target = "dev"
no_cache = true

[build.args]
VERSION = "1.2"

[[files]]
source = "setup.sh"
dest = "/workspace/setup.sh"
mode = "0755"

[[files]]
source = "data.txt"
dest = "/tmp//./data.txt"

[api]
api_key_env = "AK_KEY"
allow_sudo_exec = true

[ssh]
enabled = true
port = 2222
user = "dev"
cert_ttl = "1h"
vault_addr = "https://vault:8200"

[orchestrator]
provider = "kubernetes"
runtime_class = "kata"
warm_pool_size = 2

[remote]
default_profile = "dev"
sync_mode = "manual"

[remote.e2b]
api_key_env = "E2B_API_KEY"
region = "us"

[remote.profiles.dev]
image = "python:3.12-alpine"
bootstrap = "pip install -r requirements.txt"
env = { A = "1" }

[enterprise]
org_id = "acme"

[images]
registry = "registry.example.com"
mirrors = ["https://mirror.gcr.io"]
insecure_registries = ["localhost:5000"]
offline_fallback = "none"

[microvm]
allow_emulation = true
kernel = "/opt/vmlinux"
"""


def write(tmp_path: Path, text: str, name: str = "agentkernel.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_full_config_round_trip(tmp_path: Path) -> None:
    cfg, warnings = load_config(write(tmp_path, FULL))
    assert cfg.sandbox.name == "rust-app"
    assert cfg.sandbox.backend == "gvisor"
    assert cfg.image == "rust:1.85-alpine"
    assert cfg.agent.compatibility_mode == "codex"
    assert (cfg.resources.vcpus, cfg.resources.memory_mb) == (2, 1024)
    assert cfg.network.ports == ["8080:80", "3000", "5353:53/udp"]
    sec = cfg.security
    assert sec.profile == "custom" and sec.network is False and sec.mount_cwd is True
    assert (sec.memory_mb, sec.pids, sec.cpus, sec.seccomp) == (256, 128, 1.0, "ai-agent")
    assert isinstance(sec.cpus, float)
    assert sec.domains.allow == ["pypi.org", "*.github.com"]  # normalised to lower case
    assert sec.commands.block == ["curl", "/usr/bin/wget"]
    assert cfg.build.args == {"VERSION": "1.2"} and cfg.build.no_cache is True
    assert [f.dest for f in cfg.files] == ["/workspace/setup.sh", "/tmp/data.txt"]
    assert [f.mode for f in cfg.files] == ["0755", "0644"]
    assert cfg.ssh.port == 2222 and cfg.ssh.vault_ssh_role == "agentkernel-client"
    assert cfg.orchestrator.runtime_class == "kata" and cfg.orchestrator.max_sandboxes == 200
    assert cfg.remote.e2b is not None and cfg.remote.e2b.region == "us"
    assert cfg.remote.daytona is None
    assert cfg.remote.profiles["dev"].workspace_dir == "/workspace"
    assert cfg.enterprise.org_id == "acme"
    assert cfg.images.offline_fallback == "none"
    assert cfg.microvm.allow_emulation is True and cfg.microvm.kernel == "/opt/vmlinux"
    # Only the domain warnings: network is off, and DNS enforcement is not implemented.
    assert not any("unknown key" in w for w in warnings)
    assert any("no effect because network access is disabled" in w for w in warnings)


def test_defaults() -> None:
    cfg = Config()
    assert cfg.sandbox.name is None and cfg.sandbox.backend == "auto"
    assert cfg.image is None
    assert cfg.agent.preferred == "claude"
    assert (cfg.resources.vcpus, cfg.resources.memory_mb) == (1, 512)
    assert cfg.security.profile == "moderate"
    assert cfg.security.network is None
    assert cfg.images.offline_fallback == "host" and cfg.images.mirrors == []
    assert cfg.microvm.allow_emulation is False and cfg.microvm.kernel is None
    assert cfg.ssh.user == "sandbox" and cfg.remote.bridge == "scripts/remote-bridge.mjs"
    assert cfg.validate() == []


def test_security_only_config_names_sandbox_after_dir(tmp_path: Path) -> None:
    project = tmp_path / "My Project"
    project.mkdir()
    cfg, warnings = load_config(write(project, '[security]\nprofile = "restrictive"\n'))
    assert cfg.sandbox.name == "My-Project"
    assert cfg.security.profile == "restrictive"
    assert warnings == []


def test_empty_file(tmp_path: Path) -> None:
    cfg, warnings = load_config(write(tmp_path, ""))
    assert warnings == [] and cfg.image is None


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[security]\nnetwrk = true\n", "security.netwrk"),
        ("colour = 1\n", "colour"),
        ("[sandboxx]\nname = 'x'\n", "sandboxx"),
        ("[security.domains]\nallowed = []\n", "security.domains.allowed"),
        ("[[files]]\nsource='a'\ndest='/a'\nowner='root'\n", "files[0].owner"),
        ("[remote.profiles.dev]\nimg = 'x'\n", "remote.profiles.dev.img"),
        ("[remote.modal]\napi_key_env = 'X'\n", "remote.modal"),
        ("[images]\nmirror = []\n", "images.mirror"),
    ],
)
def test_unknown_keys_warn(tmp_path: Path, toml: str, key: str) -> None:
    cfg, warnings = load_config(write(tmp_path, toml))
    assert len(warnings) == 1
    assert warnings[0].startswith(f"unknown key '{key}' in ")
    assert "agentkernel.toml (ignored)" in warnings[0]
    assert isinstance(cfg, Config)


def test_unknown_key_suggestion(tmp_path: Path) -> None:
    _, warnings = load_config(write(tmp_path, "[security]\nnetwrk = true\n"))
    assert warnings == [
        f"unknown key 'security.netwrk' in {tmp_path / 'agentkernel.toml'} (ignored); "
        "did you mean 'security.network'?"
    ]


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[security]\nprofile = "paranoid"\n', "security.profile"),
        ('[security]\nprofile = "Moderate"\n', "security.profile"),
        ('[security]\nnetwork = "yes"\n', "security.network"),
        ("[security]\ncpus = 0\n", "security.cpus"),
        ("[security]\npids = 0\n", "security.pids"),
        ('[resources]\nvcpus = "2"\n', "resources.vcpus"),
        ("[resources]\nvcpus = 0\n", "resources.vcpus"),
        ("[resources]\nmemory_mb = 1.5\n", "resources.memory_mb"),
        ('[sandbox]\nname = "../../etc"\n', "sandbox.name"),
        ('[sandbox]\nname = "a--b"\n', "sandbox.name"),
        ('[sandbox]\nbackend = "bogus"\n', "sandbox.backend"),
        ('[sandbox]\nbase_image = "alpine; rm -rf /"\n', "sandbox.base_image"),
        ('[agent]\ncompatibility_mode = "cursor"\n', "agent.compatibility_mode"),
        ('[network]\nports = ["70000"]\n', "network.ports"),
        ('[network]\nports = ["80:80/sctp"]\n', "network.ports"),
        ("[network]\nvsock_cid = 2\n", "network.vsock_cid"),
        ('[security.domains]\nallow = ["http://x.com"]\n', "security.domains.allow"),
        ('[security.commands]\nblock = [""]\n', "security.commands.block"),
        ("[build.args]\nN = 3\n", "build.args.N"),
        ('[[files]]\nsource = "a"\ndest = "relative"\n', "files[0].dest"),
        ('[[files]]\nsource = "a"\ndest = "/x/../etc/passwd"\n', "files[0].dest"),
        ('[[files]]\nsource = "a"\ndest = "/a"\nmode = "rwx"\n', "files[0].mode"),
        ('[[files]]\nsource = ""\ndest = "/a"\n', "files[0].source"),
        ('[files]\nsource = "a"\n', "files"),
        ('[images]\noffline_fallback = "docker"\n', "images.offline_fallback"),
        ('[microvm]\nallow_emulation = "no"\n', "microvm.allow_emulation"),
        ('[orchestrator]\nprovider = "ecs"\n', "orchestrator.provider"),
        ("[ssh]\nport = 0\n", "ssh.port"),
        ('sandbox = "x"\n', "sandbox"),
    ],
)
def test_bad_values_raise(tmp_path: Path, toml: str, key: str) -> None:
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = info.value.message
    assert f"'{key}'" in msg
    assert str(path) in msg
    assert "\n" not in msg


def test_missing_required_file_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing required key 'files\[0\]\.dest'"):
        load_config(write(tmp_path, '[[files]]\nsource = "a"\n'))


def test_secret_values_not_echoed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[api]\napi_key = 1234567\n"))
    assert "1234567" not in info.value.message
    cfg, _ = load_config(write(tmp_path, '[api]\napi_key = "sk-secret"\n'))
    assert cfg.api.api_key == "sk-secret"
    assert "sk-secret" not in repr(cfg)


def test_toml_syntax_error_has_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[sandbox]\nname = "ok"\nruntime = = 1\n')
    with pytest.raises(ConfigError, match="line 3") as info:
        load_config(path)
    assert str(path) in info.value.message and "invalid TOML" in info.value.message
    with pytest.raises(ConfigError, match="line 2"):
        load_config(write(tmp_path, "[sandbox]\nname = "))


def test_unreadable_and_binary(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)  # a directory
    bad = tmp_path / "bin.toml"
    bad.write_bytes(b'name = "\xff"\n')
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(bad)


def test_runtime_image_shorthand() -> None:
    assert runtime_image("python") == "python:3.12-alpine"
    assert runtime_image("node") == "node:22-alpine"
    assert runtime_image("go") == "golang:1.23-alpine"
    assert runtime_image("rust") == "rust:1.85-alpine"
    assert runtime_image("ruby") == "ruby:3.3-alpine"
    assert runtime_image("java") == "eclipse-temurin:21-alpine"
    assert runtime_image("c") == "gcc:14-bookworm"
    assert runtime_image("dotnet") == "mcr.microsoft.com/dotnet/sdk:8.0"
    assert runtime_image("base") == "alpine:3.20"
    assert runtime_image("cobol") == "alpine:3.20"


def test_image_property(tmp_path: Path) -> None:
    cfg, _ = load_config(write(tmp_path, '[sandbox]\nruntime = "node"\n'))
    assert cfg.image == "node:22-alpine"
    cfg, _ = load_config(
        write(tmp_path, '[sandbox]\nruntime = "node"\nbase_image = "ghcr.io/me/img:1"\n')
    )
    assert cfg.image == "ghcr.io/me/img:1"


def test_unknown_runtime_warns(tmp_path: Path) -> None:
    cfg, warnings = load_config(write(tmp_path, '[sandbox]\nruntime = "cobol"\n'))
    assert cfg.image == "alpine:3.20"
    assert len(warnings) == 1 and "cobol" in warnings[0]


def test_domain_matches() -> None:
    assert domain_matches("*.example.com", "x.example.com")
    assert domain_matches("*.example.com", "a.b.example.com")
    assert domain_matches("*.example.com", "example.com")
    assert not domain_matches("*.example.com", "badexample.com")
    assert domain_matches("Example.com", "example.COM")
    assert not domain_matches("example.com", "x.example.com")


def test_domain_warnings(tmp_path: Path) -> None:
    text = (
        '[security.domains]\nallow = ["api.example.com", "*.foo.example.com", "ok.org"]\n'
        'block = ["*.example.com"]\n'
    )
    cfg, warnings = load_config(write(tmp_path, text))
    assert warnings == [
        "Domain 'api.example.com' is in the allow list but matched by the block list "
        "(block takes precedence).",
        "Domain '*.foo.example.com' is in the allow list but matched by the block list "
        "(block takes precedence).",
        "Domain filtering rules are configured but runtime DNS enforcement is not yet "
        "implemented. Rules are recorded for future use.",
    ]
    assert cfg.validate() == warnings


@pytest.mark.parametrize(
    ("security", "agent", "network_off"),
    [
        ('profile = "restrictive"', "", True),
        ('profile = "moderate"\nnetwork = false', "", True),
        ('profile = "restrictive"\nnetwork = true', "", False),
        ('profile = "restrictive"', 'compatibility_mode = "codex"', False),
        ('profile = "permissive"', "", False),
        ('profile = "custom"', "", False),
    ],
)
def test_network_disabled_domain_warning(
    tmp_path: Path, security: str, agent: str, network_off: bool
) -> None:
    text = f'[agent]\n{agent}\n[security]\n{security}\n[security.domains]\nblock = ["x.com"]\n'
    cfg, warnings = load_config(write(tmp_path, text))
    assert cfg.network_enabled() is not network_off
    assert any("network access is disabled" in w for w in warnings) is network_off


def test_find_project_config(tmp_path: Path) -> None:
    assert find_project_config(tmp_path) is None
    (tmp_path / "agentkernel.toml").mkdir()
    assert find_project_config(tmp_path) is None  # a directory is not a config
    (tmp_path / "agentkernel.toml").rmdir()
    path = write(tmp_path, "")
    assert find_project_config(tmp_path) == path
    sub = tmp_path / "sub"
    sub.mkdir()
    assert find_project_config(sub) is None  # no search of parent dirs


def test_init_template_loads_back_clean(tmp_path: Path) -> None:
    text = render_init("my-app", "claude")
    assert text.startswith("#")
    cfg, warnings = load_config(write(tmp_path, text))
    assert warnings == []
    assert cfg.sandbox.name == "my-app"
    assert cfg.agent.preferred == "claude"
    assert cfg.security.profile == "moderate"
    assert (cfg.resources.vcpus, cfg.resources.memory_mb) == (1, 512)
    assert cfg.image is None  # auto-detection stays on


def test_init_template_commented_options_are_valid(tmp_path: Path) -> None:
    # Uncommenting every example line must still give a clean config.
    lines = []
    for line in render_init("x", "codex").splitlines():
        stripped = line.removeprefix("# ")
        if stripped.startswith(("runtime =", "compatibility_mode")) or (
            line.startswith("# ") and ("=" in stripped or stripped.startswith("["))
        ):
            line = stripped
        lines.append(line)
    text = "\n".join(lines).replace("# base_image", "base_image")
    cfg, warnings = load_config(write(tmp_path, text))
    assert cfg.files[0].mode == "0755"
    assert cfg.security.commands.block == ["curl", "wget"]
    assert [w for w in warnings if "unknown key" in w] == []


@pytest.mark.parametrize(("name", "agent"), [("../x", "claude"), ("ok", 'a"\n[x]'), ("ok", "")])
def test_render_init_rejects_bad_values(name: str, agent: str) -> None:
    with pytest.raises(UsageError):
        render_init(name, agent)


def test_init_template_has_placeholders() -> None:
    assert "{name}" in INIT_TEMPLATE and "{agent}" in INIT_TEMPLATE


def test_config_module_is_the_only_pydantic_importer() -> None:
    import subprocess
    import sys

    code = "import sys, agentkernel.detect, agentkernel.names; print('pydantic' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
