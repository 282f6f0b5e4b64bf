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
