"""Every daemon-backed CLI command against real sandboxes (namespaces backend)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Daemon

HOST = ("-i", "host", "-B", "namespaces")


def _name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def _gone(pid: int) -> bool:
    """Dead: reaped already, or a zombie (whoever its parent is may not reap it soon)."""
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] in (
            b"Z", b"X")
    except OSError:
        return True


def _until(what: str, done: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.fixture
def box(daemon: Daemon, tmp_path: Path) -> tuple[str, Path]:
    """A persistent sandbox with a project dir, removed after the test."""
    project = tmp_path / "proj"
    project.mkdir()
    (project / "hello.txt").write_text("from the host\n")
    name = _name("box")
    r = daemon.ak("create", name, *HOST, "--dir", str(project), "-e", "GREETING=hi")
    assert r.returncode == 0, r.stderr
    assert f"Sandbox '{name}' created." in r.stdout
    yield name, project
    daemon.ak("remove", name)


def test_create_list_exec_remove(daemon: Daemon, box: tuple[str, Path]) -> None:
    name, _project = box
    r = daemon.ak("list")
    assert r.returncode == 0
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith(name))
    assert "running" in line and "namespaces" in line
    r = daemon.ak("exec", name, "--", "sh", "-c", "echo out; echo err >&2; exit 42")
    assert (r.returncode, r.stdout, r.stderr) == (42, "out\n", "err\n")
    r = daemon.ak("exec", name, "--", "sh", "-c", "echo $GREETING $EXTRA; pwd; cat hello.txt",
                  )
    assert r.stdout == "hi\n/workspace\nfrom the host\n"
    r = daemon.ak("exec", name, "-e", "EXTRA=x", "-w", "/tmp", "--", "sh", "-c",
                  "echo $GREETING $EXTRA; pwd")
    assert r.stdout == "hi x\n/tmp\n"
    r = daemon.ak("exec", name, "--", "no-such-command-xyz")
    assert r.returncode == 127 and "command not found" in r.stderr
    r = daemon.ak("exec", name, "--timeout", "0.5", "--", "sleep", "5")
    assert r.returncode == 124 and "timed out" in r.stderr


def test_exec_stdin_and_tty_flags(daemon: Daemon, box: tuple[str, Path]) -> None:
    name, _ = box
    r = daemon.ak("exec", "-i", name, "--", "sh", "-c", "tr a-z A-Z; echo done",
                  input=b"piped text\n")
    assert r.stdout == "PIPED TEXT\ndone\n"
    # Without -i the command's stdin is empty.
    r = daemon.ak("exec", name, "--", "cat", input=b"ignored")
    assert r.returncode == 0 and r.stdout == ""


def test_cp_both_ways(daemon: Daemon, box: tuple[str, Path], tmp_path: Path) -> None:
    name, _ = box
    src = tmp_path / "blob.bin"
    data = os.urandom(700_000) + bytes(range(256))
    src.write_bytes(data)
    r = daemon.ak("cp", str(src), f"{name}:/root/in/blob.bin")
    assert r.returncode == 0, r.stderr
    assert f"Copied {len(data)} bytes" in r.stdout
    r = daemon.ak("exec", name, "--", "sha256sum", "/root/in/blob.bin")
    import hashlib

    assert r.stdout.split()[0] == hashlib.sha256(data).hexdigest()
    out = tmp_path / "back.bin"
    r = daemon.ak("cp", f"{name}:/root/in/blob.bin", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == data
    # Into a directory: keeps the base name.
    r = daemon.ak("cp", f"{name}:/root/in/blob.bin", str(tmp_path))
    assert (tmp_path / "blob.bin").read_bytes() == data
    r = daemon.ak("cp", f"{name}:/no/such/file", str(tmp_path / "x"))
    assert r.returncode != 0 and not (tmp_path / "x").exists()
    r = daemon.ak("cp", str(src), str(tmp_path / "y"))
    assert r.returncode == 2 and "exactly one side" in r.stderr
    r = daemon.ak("cp", str(src), f"{name}:/root/../etc/passwd")
    assert r.returncode == 2 and ".." in r.stderr


def test_stop_start_keeps_files(daemon: Daemon, box: tuple[str, Path]) -> None:
    name, project = box
    r = daemon.ak("exec", name, "--", "sh", "-c",
                  "echo kept > /root/kept; echo etc > /etc/ak-kept; "
                  "echo ws > /workspace/new.txt; echo tmp > /tmp/kept")
    assert r.returncode == 0, r.stderr
    r = daemon.ak("stop", name)
    assert r.returncode == 0 and f"Sandbox '{name}' stopped." in r.stdout
    assert "stopped" in next(ln for ln in daemon.ak("list").stdout.splitlines()
                             if ln.startswith(name))
    r = daemon.ak("exec", name, "--", "true")
    assert r.returncode != 0 and "not running" in r.stderr
    r = daemon.ak("start", name)
    assert r.returncode == 0 and f"Sandbox '{name}' started." in r.stdout
    r = daemon.ak("exec", name, "--", "sh", "-c",
                  "cat /root/kept /etc/ak-kept /workspace/new.txt /tmp/kept")
    # The whole filesystem is kept, /tmp included (a stop is not a reboot).
    assert r.stdout == "kept\netc\nws\ntmp\n"
    # The project dir is copy-on-write under the moderate profile: the host copy is untouched.
    assert not (project / "new.txt").exists()


def test_remove_deletes_everything(daemon: Daemon) -> None:
    name = _name("rm")
    assert daemon.ak("create", name, *HOST).returncode == 0
    assert (daemon.home / "sandboxes" / name).is_dir()
    r = daemon.ak("remove", name)
    assert r.returncode == 0 and f"Sandbox '{name}' removed." in r.stdout
    assert not (daemon.home / "sandboxes" / name).exists()
    assert not (daemon.run_dir / "sandboxes" / name).exists()
    assert name not in daemon.ak("list").stdout
    r = daemon.ak("remove", name)
    assert r.returncode != 0 and "not found" in r.stderr


@pytest.mark.parametrize("bad", ["../../x", "a b", "x-", "a--b", "x" * 64, "é"])
def test_names_are_validated_first(daemon: Daemon, bad: str) -> None:
    for args in (("create", bad, *HOST), ("exec", bad, "--", "true"), ("stop", bad),
                 ("start", bad), ("remove", bad), ("attach", bad),
                 ("cp", "/etc/hostname", f"{bad}:/tmp/x")):
        if args[0] == "cp" and (bad.startswith(("-", ".")) or " " in bad):
            continue  # not parsed as a sandbox side at all
        r = daemon.ak(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "sandbox name" in r.stderr, (args, r.stderr)
    assert not any((daemon.root / "x").parent.glob("x*"))


def test_create_conflict_and_ttl_expiry(daemon: Daemon) -> None:
    # (The conflict on a sandbox of its own: a 2 s TTL may be up before a second create
    # gets its answer on a loaded machine, which then creates a sandbox nobody removes.)
    taken = _name("box")
    assert daemon.ak("create", taken, *HOST).returncode == 0
    try:
        r = daemon.ak("create", taken, *HOST)
        assert r.returncode != 0 and "already exists" in r.stderr
    finally:
        daemon.ak("remove", taken)
    name = _name("ttl")
    r = daemon.ak("create", name, *HOST, "--ttl", "2s")
    assert r.returncode == 0, r.stderr
    assert "Expires:" in r.stdout
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and name in daemon.ak("list").stdout:
        time.sleep(0.3)
    assert name not in daemon.ak("list").stdout
    assert not (daemon.home / "sandboxes" / name).exists()
    assert not (daemon.run_dir / "sandboxes" / name).exists()


def test_run_keep_makes_a_persistent_sandbox(daemon: Daemon, tmp_path: Path) -> None:
    r = daemon.ak("run", "--keep", *HOST, "--", "sh", "-c", "echo made > /root/made; echo ok",
                  cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ok\n"
    name = r.stderr.split("sandbox '")[1].split("'")[0]
    assert daemon.ak("exec", name, "--", "cat", "/root/made").stdout == "made\n"
    assert daemon.ak("remove", name).returncode == 0


def test_daemon_status_and_stop_start(daemon: Daemon) -> None:
    r = daemon.ak("daemon", "status")
    assert r.returncode == 0
    assert r.stdout.startswith("Daemon: running")
    assert "host/moderate/namespaces" in r.stdout and "Min/Max: 1/4" in r.stdout
    sock = daemon.run_dir / "daemon.sock"
    assert oct(sock.stat().st_mode & 0o777) == "0o600"
    name = _name("survivor")
    assert daemon.ak("create", name, *HOST).returncode == 0
    assert daemon.ak("exec", name, "--", "sh", "-c", "echo 1 > /root/n").returncode == 0
    r = daemon.ak("daemon", "stop")
    assert r.returncode == 0 and "Daemon stopped." in r.stdout
    r = daemon.ak("daemon", "status")
    assert r.stdout.startswith("Daemon: not running")
    assert daemon.ak("daemon", "stop").returncode != 0
    # run does not start a daemon; it runs in-process and says nothing about a daemon.
    r = daemon.ak("run", "-v", *HOST, "--", "true")
    assert r.returncode == 0 and "via daemon" not in r.stderr
    # create/exec start it on demand; the sandbox kept running meanwhile.
    r = daemon.ak("exec", name, "--", "cat", "/root/n")
    assert r.returncode == 0 and r.stdout == "1\n", r.stderr
    assert daemon.ak("remove", name).returncode == 0
    daemon.ensure_up()


def test_kill_9_daemon_sandbox_survives_and_is_readopted(daemon: Daemon) -> None:
    daemon.ensure_up()
    name = _name("k9")
    assert daemon.ak("create", name, *HOST).returncode == 0
    assert daemon.ak("exec", name, "--", "sh", "-c", "echo before > /root/f").returncode == 0
    with daemon.use():
        from agentkernel.ipc import client

        # It runs until told (/tmp/go), so that it surely runs on through the kill below.
        # (One that ended on its own just as the daemon died stays "running" for good: the
        # agent sent its exit, the killed daemon never recorded it, and the next daemon
        # re-attaches to a channel that already ended. A gap of the daemon's, not this
        # test's to cover.)
        det = client.call("exec_detached", {"name": name, "argv": [
            "sh", "-c", "echo early; i=0; while [ ! -e /tmp/go ] && [ $i -lt 1200 ]; do "
            "sleep 0.1; i=$((i+1)); done; echo late; exit 3"]})
    # Let the warm pool fill first, so that the kill leaves pool sandboxes to clean up.
    deadline = time.monotonic() + 30
    while True:
        status = json.loads(daemon.ak("daemon", "status", "--json").stdout)
        if any(p["warm"] for p in status["pools"]) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert any(p["warm"] for p in status["pools"]), status
    old_pid = status["pid"]
    os.kill(old_pid, signal.SIGKILL)
    _until("the killed daemon lives on", lambda: _gone(old_pid))
    # Without any daemon the sandbox's agent still answers on its own socket.
    sock_path = daemon.run_dir / "sandboxes" / name / "ctl" / "agent.sock"
    probe = (
        "import socket,sys\n"
        "from agentkernel.agent.client import AgentClient\n"
        "s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        "c=AgentClient.from_socket(s); c.hello(); out,_,st=c.exec(['cat','/root/f']).wait(10)\n"
        "print(out.decode().strip(), st.code); c.close()\n"
    )
    r = subprocess.run([sys.executable, "-c", probe, str(sock_path)], capture_output=True,
                       text=True, timeout=30, check=False)
    assert r.stdout.strip() == "before 0", r.stderr
    # The pool sandboxes of the killed daemon died with it (their agents' pipes closed).
    # A new daemon (started on demand) re-adopts the sandbox and cleans up the rest.
    r = daemon.ak("exec", name, "--", "cat", "/root/f")
    assert r.returncode == 0 and r.stdout == "before\n", r.stderr
    status = json.loads(daemon.ak("daemon", "status", "--json").stdout)
    assert status["pid"] != old_pid
    assert f"re-adopted {name}" in status["recovered"]
    assert any(line.startswith("cleaned up pool sandbox") for line in status["recovered"])
    assert daemon.ak("exec", name, "--", "touch", "/tmp/go").returncode == 0
    # The detached command ran on while no daemon listened; the new one re-attached it.
    with daemon.use():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = client.call("detached_status", {"name": name, "cmd_id": det["id"]})
            if st["status"] != "running":
                break
            time.sleep(0.1)
        assert (st["status"], st["exit_code"]) == ("completed", 3)
        out, _err = client.call("detached_logs", {"name": name, "cmd_id": det["id"]})
        assert out == "early\nlate\n"
    leftovers = [p.name for p in (daemon.run_dir / "sandboxes").iterdir()]
    assert all(n == name or n.startswith("pool-") for n in leftovers)
    assert daemon.ak("remove", name).returncode == 0


def test_dead_sandbox_is_marked_stopped_by_a_new_daemon(daemon: Daemon) -> None:
    daemon.ensure_up()
    name = _name("dead")
    assert daemon.ak("create", name, *HOST).returncode == 0
    assert daemon.ak("exec", name, "--", "sh", "-c", "echo keep > /root/f").returncode == 0
    pid = json.loads(daemon.ak("daemon", "status", "--json").stdout)["pid"]
    os.kill(pid, signal.SIGKILL)
    _until("the killed daemon lives on", lambda: _gone(pid))
    # Kill the sandbox too while no daemon watches.
    scratch = daemon.run_dir / "sandboxes" / name
    killed = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
                group = Path(f"/proc/{entry}/cgroup").read_text()
            except OSError:
                continue
            # bwrap's command line names no host path when root starts it (fds instead):
            # the sandbox's cgroup, named after it, tells which bwrap is this sandbox's.
            if cmd.startswith(b"/usr/bin/bwrap") and (
                    str(scratch).encode() in cmd or f"/{name}" in group):
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
    assert killed, "no bwrap of the sandbox's found"
    # Dead before the next daemon looks (else it finds its bwrap alive and re-adopts it).
    _until("the killed sandbox lives on", lambda: all(_gone(p) for p in killed))
    rows = json.loads(daemon.ak("list", "--json").stdout)
    row = next(r for r in rows if r["name"] == name)
    assert row["status"] == "stopped"
    assert not scratch.exists()
    assert daemon.ak("start", name).returncode == 0
    assert daemon.ak("exec", name, "--", "cat", "/root/f").stdout == "keep\n"
    assert daemon.ak("remove", name).returncode == 0


def test_sandbox_cannot_hijack_its_control_socket(daemon: Daemon) -> None:
    """The agent's socket dir is read-only inside: nothing there can replace the socket."""
    name = _name("hj")
    assert daemon.ak("create", name, *HOST).returncode == 0
    r = daemon.ak("exec", name, "--", "sh", "-c",
                  "rm -f /run/ak/ctl/agent.sock || echo rm-refused;"
                  " touch /run/ak/ctl/other.sock 2>/dev/null || echo create-refused")
    assert r.stdout.split() == ["rm-refused", "create-refused"], r.stderr
    r = daemon.ak("exec", name, "--", "echo", "still-ours")
    assert r.returncode == 0 and r.stdout == "still-ours\n"
    assert daemon.ak("remove", name).returncode == 0


@pytest.mark.parametrize("args", [
    {"argv": "true"},                                   # a string, not a list
    {"argv": ["true"], "env": ["A=1"]},                 # a list, not a dict
    {"argv": ["true"], "timeout": "soon"},
    {"argv": ["true"], "no_network": 1},
    {"argv": [1, 2]},
    {"argv": ["true"], "what": 1},                      # unknown field
])
def test_malformed_socket_requests_get_a_clear_error(daemon: Daemon,
                                                     args: dict[str, object]) -> None:
    """The daemon's own socket validates every field: a usage error, nothing started."""
    import json
    import socket

    daemon.ensure_up()
    before = daemon.ak("list").stdout
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(daemon.run_dir / "daemon.sock"))
        sock.sendall(json.dumps({"op": "run", "args": args}).encode() + b"\n")
        reply = json.loads(sock.makefile("rb").readline())
    assert reply["ok"] is False, reply
    assert reply["error"]["exit_code"] == 2 and reply["error"]["http_status"] == 400, reply
    assert "field" in reply["error"]["message"], reply
    assert daemon.ak("list").stdout == before


def test_create_says_when_the_image_was_not_available(daemon: Daemon) -> None:
    """No pretending: an image that cannot be pulled makes a host-userland sandbox, and
    `create` says so instead of listing the image as if it were there."""
    name = _name("box")
    r = daemon.ak("create", name, "-i", "127.0.0.1:9/nowhere/image:1", "-B", "namespaces")
    try:
        assert r.returncode == 0, r.stderr
        assert "Rootfs:  host userland, read-only (image unavailable)" in r.stdout
        assert "unavailable" in r.stderr and "using the host's userland" in r.stderr
    finally:
        daemon.ak("remove", name)
