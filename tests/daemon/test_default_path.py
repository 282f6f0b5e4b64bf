"""The path every newcomer takes: no flags, backend `auto`, the daemon autostarted, a fresh
data dir and project. What the README shows must work exactly like this."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_helpers import Result, ak

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")


class Newcomer:
    """A fresh user: own data and runtime dirs, no user config, autostart on (the default)."""

    def __init__(self, root: Path) -> None:
        run = root / "run"
        run.mkdir(mode=0o700)
        self.run_dir = run
        self.project = root / "project"
        self.project.mkdir()
        self.env = {"AGENTKERNEL_HOME": str(root / "home"), "AGENTKERNEL_RUNTIME_DIR": str(run),
                    "AGENTKERNEL_DAEMON_AUTOSTART": "1", "AGENTKERNEL_DAEMON_IDLE_EXIT": "120",
                    "XDG_CONFIG_HOME": str(root / "config")}

    def ak(self, *args: str, timeout: float = 120) -> Result:
        return ak(*args, cwd=self.project, env=self.env, timeout=timeout)

    def wait_daemon(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.run_dir / "daemon.sock").exists():
                return
            time.sleep(0.1)
        raise AssertionError("no daemon came up")


@pytest.fixture
def newcomer(tmp_path: Path) -> Iterator[Newcomer]:
    user = Newcomer(tmp_path)
    yield user
    user.ak("daemon", "stop", timeout=90)


def test_run_ls_root_prints_the_listing(newcomer: Newcomer) -> None:
    """`agentkernel run -- ls /`: coreutils stat the root; a backend that breaks that (this
    host's gVisor) is not picked by `auto`."""
    first = newcomer.ak("run", "--", "ls", "/")
    assert first.returncode == 0, first.stderr
    assert "usr" in first.stdout.split(), first.stderr
    assert "Invalid argument" not in first.stderr
    newcomer.wait_daemon()
    # The next run goes through the daemon it started: the same backend, the same answer.
    second = newcomer.ak("run", "-v", "--", "ls", "/")
    assert second.returncode == 0 and "usr" in second.stdout.split(), second.stderr
    assert "via daemon" in second.stderr
    doctor = newcomer.ak("doctor")
    picked = doctor.stdout.split("`--backend auto` picks: ")[1].split()[0]
    assert f"backend {picked}:" in second.stderr, (doctor.stdout, second.stderr)


def test_offline_default_image_is_one_line_and_q_is_quiet(newcomer: Newcomer) -> None:
    """No registry here: the default image falls back to the host's userland with one short
    line, in-process and through the daemon alike, and `-q` prints nothing."""
    first = newcomer.ak("run", "--", "true")
    assert first.returncode == 0, first.stderr
    notes = [ln for ln in first.stderr.splitlines() if "unavailable" in ln]
    assert len(notes) == 1 and len(notes[0]) <= 160, first.stderr
    newcomer.wait_daemon()
    via = newcomer.ak("run", "--", "true")
    assert via.returncode == 0 and via.stderr.splitlines() == notes, via.stderr
    quiet = newcomer.ak("run", "-q", "--", "true")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


class Serve:
    """`agentkernel serve --port 0` in the background; its URL read from what it prints."""

    def __init__(self, user: Newcomer) -> None:
        import os
        import subprocess
        import sys

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agentkernel", "serve", "--port", "0"], cwd=user.project,
            env={**os.environ, **user.env}, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.said: list[str] = []
        self.url = ""
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.said.append(line)
            if "HTTP API on http://" in line:
                self.url = line.split("HTTP API on ")[1].split()[0]
            if self.url and ("served by the running daemon" in line or "listening on" in line):
                break
        assert self.url, "".join(self.said)
        self.key = Path(user.env["AGENTKERNEL_HOME"], "api.key").read_text().strip()

    def call(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        import json
        import urllib.error
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.key}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def stop(self) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def _names(listing: object) -> set[str]:
    data = listing["data"] if isinstance(listing, dict) and "data" in listing else listing
    assert isinstance(data, list), listing
    return {str(item["name"]) for item in data}


def test_serve_after_a_run_shares_the_running_daemon(newcomer: Newcomer) -> None:
    """After a `run` (which autostarts the daemon), `serve` works: the running daemon serves
    the HTTP API too, and the CLI and the SDK see the same sandboxes."""
    assert newcomer.ak("run", "-q", "--", "true").returncode == 0
    newcomer.wait_daemon()
    serve = Serve(newcomer)
    try:
        assert "another daemon holds" not in "".join(serve.said)
        assert any("served by the running daemon" in line for line in serve.said), serve.said
        status = newcomer.ak("daemon", "status").stdout
        assert f"HTTP API: {serve.url}" in status, status

        code, made = serve.call("POST", "/sandboxes", {"name": "sdk-box", "image": "host",
                                                       "backend": "namespaces"})
        assert code == 201, made
        assert "sdk-box" in newcomer.ak("list").stdout  # the CLI sees the SDK's sandbox
        made_cli = newcomer.ak("create", "cli-box", "-i", "host", "-B", "namespaces")
        assert made_cli.returncode == 0, made_cli.stderr
        code, listing = serve.call("GET", "/sandboxes")
        assert code == 200 and {"sdk-box", "cli-box"} <= _names(listing), listing
        code, ran = serve.call("POST", "/run", {"command": ["ls", "/"]})
        assert code == 200 and "usr" in str(ran), ran
        via_cli = newcomer.ak("exec", "sdk-box", "--", "echo", "hi")
        assert via_cli.returncode == 0 and via_cli.stdout == "hi\n", via_cli.stderr
    finally:
        for name in ("sdk-box", "cli-box"):
            newcomer.ak("remove", name)
        code = serve.stop()
    # Ending `serve` ends its HTTP listener, not the daemon the CLI uses.
    assert code == 0, "".join(serve.said)
    assert newcomer.ak("daemon", "status").stdout.startswith("Daemon: running")
    assert "HTTP API:" not in newcomer.ak("daemon", "status").stdout
    again = newcomer.ak("run", "-q", "--", "true")
    assert again.returncode == 0, again.stderr


def test_serve_first_becomes_the_daemon_the_cli_uses(newcomer: Newcomer) -> None:
    serve = Serve(newcomer)
    try:
        assert any("listening on" in line for line in serve.said), serve.said
        run = newcomer.ak("run", "-v", "-i", "host", "--", "true")
        assert run.returncode == 0 and "via daemon" in run.stderr, run.stderr
        assert serve.call("GET", "/health")[0] == 200
    finally:
        assert serve.stop() == 0
    assert "not running" in newcomer.ak("daemon", "status").stdout


def test_serve_with_other_settings_than_the_running_daemon_says_so(newcomer: Newcomer) -> None:
    """Attaching would silently ignore another config's pools and limits: refused, with
    what to do instead."""
    assert newcomer.ak("run", "-q", "--", "true").returncode == 0
    newcomer.wait_daemon()
    other = newcomer.project / "other.toml"
    other.write_text("[api]\nmax_output_bytes = 1048576\n")
    r = newcomer.ak("serve", "--port", "0", "-c", str(other))
    assert r.returncode == 1, r.stderr
    assert "already runs with no config file" in r.stderr and "daemon stop" in r.stderr


@pytest.fixture(scope="module")
def local_mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real docker-registry on 127.0.0.1 holding library/alpine:3.20 (a busybox image
    that says which image it is), as tests/images starts them."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "images"))
    from harness import LayerBuilder, Pusher, Registry, busybox_layer, have_tools

    missing = have_tools()
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (scripts/test.sh installs)")
    reg = Registry(tmp_path_factory.mktemp("reg-default-path")).start()
    try:
        marker = LayerBuilder().dir("etc").file("etc/ak-image", b"mirror-image\n").bytes()
        Pusher(reg.url).image("library/alpine", "3.20", [busybox_layer(), marker],
                              config={"Env": ["PATH=/bin:/usr/bin"]})
        yield reg.host
    finally:
        reg.stop()


def test_mirror_by_environment_with_a_daemon_up(newcomer: Newcomer, local_mirror: str) -> None:
    """`AGENTKERNEL_REGISTRY_MIRROR=… agentkernel run --image alpine:3.20 …` through a daemon
    that was started without it: the run is planned with the caller's mirror, and a failed
    resolve of another caller (no mirror) does not answer for it."""
    cmd = ("run", "-i", "alpine:3.20", "--", "cat", "/etc/ak-image")
    assert newcomer.ak("run", "-q", "--", "true").returncode == 0  # autostarts the daemon
    newcomer.wait_daemon()
    # A caller without the mirror: Docker Hub is unreachable here, the host's userland
    # stands in, and the daemon remembers that failure for a minute.
    without = newcomer.ak(*cmd)
    assert "unavailable" in without.stderr, without.stderr
    # The same command with the mirror in the caller's environment.
    newcomer.env["AGENTKERNEL_REGISTRY_MIRROR"] = local_mirror
    with_mirror = newcomer.ak("run", "-v", *cmd[1:])
    assert with_mirror.returncode == 0, with_mirror.stderr
    assert "via daemon" in with_mirror.stderr
    assert with_mirror.stdout == "mirror-image\n", with_mirror.stderr
    assert "unavailable" not in with_mirror.stderr
    # In-process the same command gives the same answer, and `images pull` agrees.
    newcomer.env["AGENTKERNEL_NO_DAEMON"] = "1"
    here = newcomer.ak(*cmd)
    assert (here.returncode, here.stdout) == (0, "mirror-image\n"), here.stderr
    pulled = newcomer.ak("images", "pull", "-q", "alpine:3.20")
    assert pulled.returncode == 0, pulled.stderr


def test_user_config_mirror_on_loopback_with_the_daemon(newcomer: Newcomer,
                                                        tmp_path: Path) -> None:
    """Newcomer failure 5: a registry mirror is a user's setting. Given once in
    ~/.config/agentkernel/config.toml (a plain-HTTP registry on 127.0.0.1, no insecure
    setting), it serves the first run (in-process) and the next (through the daemon that
    run started) alike, in any directory."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "images"))
    from harness import REGISTRY_BIN, LayerBuilder, Pusher, Registry, busybox_layer

    if not Path(REGISTRY_BIN).exists():
        pytest.skip("needs docker-registry (scripts/test.sh installs it)")
    registry = Registry(tmp_path / "registry").start()
    try:
        mark = LayerBuilder().dir("etc").file("etc/ak-image", b"from-user-mirror\n").bytes()
        Pusher(registry.url).image("library/alpine", "3.20", [busybox_layer(), mark])
        user_config = Path(newcomer.env["XDG_CONFIG_HOME"]) / "agentkernel" / "config.toml"
        user_config.parent.mkdir(parents=True)
        user_config.write_text(f'[images]\nmirrors = ["{registry.host}"]\n')
        first = newcomer.ak("run", "--", "cat", "/etc/ak-image")
        assert (first.returncode, first.stdout) == (0, "from-user-mirror\n"), first.stderr
        newcomer.wait_daemon()
        second = newcomer.ak("run", "-v", "--", "cat", "/etc/ak-image")
        assert (second.returncode, second.stdout) == (0, "from-user-mirror\n"), second.stderr
        assert "via daemon" in second.stderr
        shown = newcomer.ak("config")
        assert f"user:{user_config}" in shown.stdout and registry.host in shown.stdout
    finally:
        registry.stop()


def test_data_dir_is_private_to_other_local_users(tmp_path: Path) -> None:
    """A home other users can traverse (0755, the usual default): the data dir that the
    first run makes is 0700, as docs/daemon.md says, and no file of it — the state's
    SQLite WAL included — lets host user `nobody` read a kept sandbox's `-e` values."""
    import os
    import subprocess
    import tempfile

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root (to become nobody) and setpriv")
    home = Path(tempfile.mkdtemp(prefix="ak-newcomer-", dir="/tmp"))
    try:
        home.chmod(0o755)  # a home others may enter, as most are
        user = Newcomer(home)
        user.env["HOME"] = str(home)
        data = home / ".local" / "share" / "agentkernel"  # the default place, made by us
        user.env["AGENTKERNEL_HOME"] = str(data)
        token = "tok-" + os.urandom(8).hex()
        first = user.ak("run", "-q", "--", "true")  # what a newcomer does first
        assert first.returncode == 0, first.stderr
        made = user.ak("create", "tk", "-i", "host", "-e", f"TOKEN={token}")
        assert made.returncode == 0, made.stderr
        try:
            got = user.ak("exec", "tk", "--", "sh", "-c", "echo $TOKEN")
            assert got.stdout == f"{token}\n", got.stderr
            # The attack: another local user greps every file it can reach for the value.
            probe = subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                 "grep", "-rl", "--no-messages", token, str(home)],
                capture_output=True, text=True, timeout=60, check=False)
            assert probe.stdout == "", probe.stdout
            assert data.stat().st_mode & 0o077 == 0, oct(data.stat().st_mode)
            # Each file that holds it is private on its own too (a data dir made looser by
            # hand, or by an older version, does not open them).
            for path in data.rglob("*"):
                if path.is_file() and not path.is_symlink() and path.stat().st_size < 1 << 24 \
                        and token.encode() in path.read_bytes():
                    assert path.stat().st_mode & 0o077 == 0, (path, oct(path.stat().st_mode))
        finally:
            user.ak("remove", "tk")
            user.ak("daemon", "stop", timeout=90)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_ordinary_users_path_finds_the_sbin_tools() -> None:
    """Debian gives ordinary users a PATH without /usr/sbin, where e2fsprogs puts mkfs.ext4:
    `doctor` as such a user does not say it is missing (and to apt install it) when it is
    installed."""
    import subprocess

    from sandbox_helpers import ak_as_user, nobody_home

    if not Path("/usr/sbin/mkfs.ext4").exists() and not Path("/sbin/mkfs.ext4").exists():
        pytest.skip("e2fsprogs is not installed")
    with nobody_home() as home:
        proc = ak_as_user(65534, home, "doctor", cwd=home / "project",
                          env={"PATH": "/usr/local/bin:/usr/bin:/bin"})
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert "microvm" in out, (out, err)
    assert "mkfs.ext4 is missing" not in out, out


def test_verbose_profile_line_is_the_same_in_process_and_through_the_daemon(
        newcomer: Newcomer) -> None:
    """`run -v` with no memory cap (`[resources] memory = "unlimited"` in the user config)
    says `memory=unlimited` on every path: in-process, the Python client through the daemon,
    and the native command through it."""
    import os
    import subprocess

    config = Path(newcomer.env["XDG_CONFIG_HOME"]) / "agentkernel"
    config.mkdir(parents=True)
    (config / "config.toml").write_text('[resources]\nmemory = "unlimited"\n')

    def profile_line(stderr: str) -> str:
        lines = [ln for ln in stderr.splitlines() if ln.startswith("agentkernel: profile ")]
        assert len(lines) == 1, stderr
        return lines[0]

    alone = newcomer.ak("run", "-v", "-i", "host", "--", "true")
    assert alone.returncode == 0, alone.stderr
    expected = profile_line(alone.stderr)
    assert "memory=unlimited " in expected, expected
    newcomer.wait_daemon()
    via = newcomer.ak("run", "-v", "-i", "host", "--", "true")
    assert via.returncode == 0 and "via daemon" in via.stderr, via.stderr
    assert profile_line(via.stderr) == expected
    native = Path(__file__).resolve().parents[2] / "launcher" / "build" / "agentkernel"
    if native.exists():
        nat = subprocess.run([str(native), "run", "-v", "-i", "host", "--", "true"],
                             cwd=newcomer.project, env={**os.environ, **newcomer.env},
                             capture_output=True, text=True, timeout=120, check=False)
        assert nat.returncode == 0 and "via daemon" in nat.stderr, nat.stderr
        assert profile_line(nat.stderr) == expected


def test_a_daemon_of_another_data_dir_is_not_used_for_kept_sandboxes(
        newcomer: Newcomer, tmp_path: Path) -> None:
    """Root's runtime dir is /run/agentkernel whatever HOME says: a second data dir (another
    HOME or AGENTKERNEL_HOME) on the same runtime dir must not make its sandboxes in, or
    list those of, the running daemon's data dir; it is told what to do instead. Its `run`
    still works (in-process)."""
    made = newcomer.ak("create", "mine", "-i", "host")
    assert made.returncode == 0, made.stderr
    try:
        other = Newcomer.__new__(Newcomer)
        other.run_dir, other.project = newcomer.run_dir, newcomer.project
        other.env = {**newcomer.env, "AGENTKERNEL_HOME": str(tmp_path / "other-home")}
        theirs = other.ak("create", "theirs", "-i", "host")
        assert theirs.returncode != 0, theirs.stdout
        assert "AGENTKERNEL_RUNTIME_DIR" in theirs.stderr, theirs.stderr
        listed = other.ak("list")
        assert listed.returncode != 0 and "mine" not in listed.stdout, listed.stdout
        assert other.ak("exec", "mine", "--", "true").returncode != 0
        native = Path(__file__).resolve().parents[2] / "launcher" / "build" / "agentkernel"
        if native.exists():  # the native command's exec says its data dir too
            import os
            import subprocess

            nat = subprocess.run([str(native), "exec", "mine", "--", "echo", "reached"],
                                 cwd=other.project, env={**os.environ, **other.env},
                                 capture_output=True, text=True, timeout=120, check=False)
            assert nat.returncode != 0 and "reached" not in nat.stdout, nat.stdout
            assert "AGENTKERNEL_RUNTIME_DIR" in nat.stderr, nat.stderr
        ran = other.ak("run", "-v", "-i", "host", "--", "echo", "ok")
        assert ran.returncode == 0 and ran.stdout == "ok\n", ran.stderr
        assert "via daemon" not in ran.stderr
        assert "theirs" not in newcomer.ak("list").stdout
    finally:
        newcomer.ak("remove", "mine")
        newcomer.ak("remove", "theirs")


def test_json_is_one_object_with_the_same_keys_on_every_path(newcomer: Newcomer) -> None:
    """`run --json` prints one JSON object — also when the command cannot start (127, 125)
    — with the same keys in-process and through the daemon."""
    import json

    def as_json(*args: str, daemon: bool) -> tuple[int, dict[str, object]]:
        env = {} if daemon else {"AGENTKERNEL_NO_DAEMON": "1"}
        r = ak("run", "-q", "--json", "-i", "host", *args, cwd=newcomer.project,
               env={**newcomer.env, **env})
        lines = r.stdout.splitlines()
        assert len(lines) == 1, (r.stdout, r.stderr)
        return r.returncode, json.loads(lines[0])

    assert newcomer.ak("run", "-q", "--", "true").returncode == 0
    newcomer.wait_daemon()
    keys: set[str] = set()
    for daemon in (False, True):
        code, ok = as_json("--", "true", daemon=daemon)
        assert code == 0 and ok["exit_code"] == 0 and ok["backend"], ok
        keys = keys or set(ok)
        assert set(ok) == keys, (daemon, ok)
        code, missing = as_json("--", "no-such-command-xyz", daemon=daemon)
        assert code == missing["exit_code"] == 127 and set(missing) == keys, missing
        assert "not found" in str(missing["message"])
        code, nowhere = as_json("-w", "/no/such/dir", "--", "pwd", daemon=daemon)
        assert code == nowhere["exit_code"] == 125 and set(nowhere) == keys, nowhere
    # A usage error is not a run: exit 2 and its message, no object.
    usage = newcomer.ak("run", "--json", "--keep", "-i", "host", "--", "true")
    assert usage.returncode == 2 and usage.stdout == "", usage.stdout


def test_a_refusal_is_always_named_on_stderr(newcomer: Newcomer) -> None:
    """README: `run --deny-host '*' -- curl ...` is refused and stderr says by which rule.
    A command that exits right after the refused answer (getent) still gets that line: the
    gate writes a refusal before it answers."""
    for _ in range(4):
        r = newcomer.ak("run", "-i", "host", "--deny-host", "*", "--", "getent", "hosts",
                        "example.com")
        assert r.returncode != 0, r.stdout
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("agentkernel: egress: ")]
        assert lines and "dns example.com REFUSED by deny *" in lines[0], r.stderr
    allowed = newcomer.ak("run", "-i", "host", "--allow-host", "nothing.invalid", "--",
                          "getent", "hosts", "nothing.invalid")
    # An allowed name that has no address says so, not as if its allow rule refused it.
    assert "no address" in allowed.stderr, allowed.stderr


def test_refusals_are_on_stderr_through_the_daemon_too(newcomer: Newcomer) -> None:
    """A project's `[network] allow` list refuses another name: the run says so on stderr
    (`egress: ... REFUSED by RULE`) in-process, through the daemon, and through the native
    command alike."""
    import os
    import re
    import subprocess

    (newcomer.project / "agentkernel.toml").write_text('[network]\nallow = ["example.com"]\n')
    argv = ["run", "-i", "host", "--", "getent", "hosts", "pypi.org"]

    def refusals(stderr: str) -> list[str]:
        return [re.sub(r"\d\d:\d\d:\d\d ", "", ln) for ln in stderr.splitlines()
                if ln.startswith("agentkernel: egress: ")]

    alone = ak(*argv, cwd=newcomer.project, env={**newcomer.env, "AGENTKERNEL_NO_DAEMON": "1"})
    expected = refusals(alone.stderr)
    assert expected and "dns pypi.org REFUSED by default deny" in expected[0], alone.stderr
    assert newcomer.ak("run", "-q", "-i", "host", "--", "true").returncode == 0  # autostart
    newcomer.wait_daemon()
    via = newcomer.ak("run", "-v", *argv[1:])
    assert "via daemon" in via.stderr and via.returncode == alone.returncode, via.stderr
    assert refusals(via.stderr) == expected, via.stderr
    native = Path(__file__).resolve().parents[2] / "launcher" / "build" / "agentkernel"
    if native.exists():
        nat = subprocess.run([str(native), *argv], cwd=newcomer.project,
                             env={**os.environ, **newcomer.env}, capture_output=True,
                             text=True, timeout=120, check=False)
        assert refusals(nat.stderr) == expected, nat.stderr
