"""`agentkernel run` end to end through real sandboxes: output, exit codes, flags, cleanup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AnyStr

import pytest

from sandbox_helpers import Result, ak


def on_host(backend: str, *args: str, **kw: Any) -> Result:
    """`agentkernel run -B BACKEND -i host ARGS...` (the host rootfs: no registry involved)."""
    return ak("run", "-B", backend, "-i", "host", *args, **kw)


def test_hello(backend: str, project: Path) -> None:
    r = on_host(
        backend,
        "--",
        "python3",
        "-c",
        "print('Hello from sandbox!')",
        cwd=project,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Hello from sandbox!\n"


def test_exit_code_passes_through(backend: str, project: Path) -> None:
    assert on_host(backend, "--", "sh", "-c", "exit 42", cwd=project).returncode == 42
    assert on_host(backend, "--", "false", cwd=project).returncode == 1


def test_signal_exit_is_128_plus_n(backend: str, project: Path) -> None:
    r = on_host(backend, "--", "sh", "-c", "kill -TERM $$", cwd=project)
    assert r.returncode == 128 + signal.SIGTERM


def test_stdout_and_stderr_are_separate(backend: str, project: Path) -> None:
    # -q: no agentkernel note (an explicit gVisor here is warned about) among the command's
    r = ak(
        "run", "-q", "-B", backend, "-i", "host", "--", "sh", "-c", "echo out; echo err >&2",
        cwd=project,
    )
    assert r.stdout == "out\n"
    assert r.stderr == "err\n"


def test_not_found_is_127_and_not_executable_126(backend: str, project: Path) -> None:
    r = on_host(backend, "-q", "--", "no-such-command-xyz", cwd=project)
    assert r.returncode == 127
    assert "no-such-command-xyz" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = on_host(backend, "--", "/etc/hostname", cwd=project)
    assert r.returncode == 126


def test_project_visible_at_workspace(backend: str, project: Path) -> None:
    r = on_host(backend, "--", "sh", "-c", "pwd; cat hello.txt", cwd=project)
    assert r.stdout == "/workspace\nhello from the host\n", r.stderr


def spawn_run(backend: str, project: Path, script: str) -> subprocess.Popen[bytes]:
    """`agentkernel run -- sh -c SCRIPT` as a live process, to watch it while it runs."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agentkernel",
            "run",
            "-B",
            backend,
            "-i",
            "host",
            "--",
            "sh",
            "-c",
            script,
        ],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )


def test_output_is_streamed_live(backend: str, project: Path) -> None:
    """The first line arrives while the command is still running, not at exit."""
    proc = spawn_run(backend, project, "echo first; sleep 3; echo second")
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first == b"first\n"
    assert proc.poll() is None, "the command should still be running after its first line"
    rest, _ = proc.communicate(timeout=60)
    assert rest == b"second\n"
    assert proc.returncode == 0


@pytest.mark.parametrize("delay", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("kind", ["namespaces", "gvisor"])
def test_terminated_while_starting_leaves_nothing_running(kind: str, delay: float,
                                                          project: Path) -> None:
    """SIGTERM at any moment of a run, even while its sandbox is still starting, ends the
    run and its sandbox: nothing is left holding the caller's pipes (a sandbox left running
    would keep them open until its `sleep 60` ends)."""
    from sandbox_helpers import backend_available

    if not backend_available(kind):
        pytest.skip(f"{kind} is not available here")
    proc = spawn_run(kind, project, "sleep 60")
    time.sleep(delay)
    proc.terminate()
    err = _ended(proc, f"a run terminated {delay} s after it began left its sandbox running")
    assert proc.returncode in (128 + signal.SIGTERM, -signal.SIGTERM), err[-2000:]


def _ended(proc: subprocess.Popen[AnyStr], why: str) -> AnyStr:
    """The stderr of a signalled run once it ended; the test fails with `why` if it has not
    within 40 s (a sandbox left running keeps its pipes open)."""
    try:
        return proc.communicate(timeout=40)[1]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # (with PYTHONFAULTHANDLER=1: where it hangs)
        try:
            err = proc.communicate(timeout=10)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            err = proc.communicate()[1]
        pytest.fail(f"{why}: {err[-6000:]!r}")


def _left_behind(runtime: Path) -> list[str]:
    """The sandboxes' scratch dirs still under a runtime dir (a cleanup cut short)."""
    sandboxes = runtime / "sandboxes"
    if not sandboxes.is_dir():
        return []
    return sorted(str(p.relative_to(sandboxes)) for p in sandboxes.rglob("*"))[:50]


@pytest.mark.parametrize("delay", [0.3, 1.5])
@pytest.mark.parametrize("kind", ["namespaces", "gvisor"])
def test_a_second_signal_does_not_cut_the_cleanup_short(kind: str, delay: float,
                                                        project: Path, tmp_path: Path) -> None:
    """Signals come in pairs (`timeout`, a terminal and systemd signal the run and then its
    process group): a second SIGTERM while the first one's cleanup runs, or between the
    command's end and the cleanup, used to end the run there and leave its scratch dir
    (and runsc state) behind. The run ends by SIGTERM either way, leaving nothing."""
    from sandbox_helpers import backend_available

    if not backend_available(kind):
        pytest.skip(f"{kind} is not available here")
    runtime = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentkernel", "run", "-q", "-B", kind, "-i", "host", "--",
         "sleep", "60"], cwd=project, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env={**os.environ, "AGENTKERNEL_RUNTIME_DIR": str(runtime)})
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)
    err = _ended(proc, "a run signalled twice did not end")
    assert proc.returncode in (128 + signal.SIGTERM, -signal.SIGTERM), err[-2000:]
    assert _left_behind(runtime) == [], err[-2000:]


def test_an_ordinary_users_run_under_timeout_leaves_nothing(tmp_path: Path) -> None:
    """The same as an ordinary user, through coreutils' `timeout` (which passes a SIGTERM
    on to the run and then to its whole process group): gVisor, moderate (an egress
    gate on demand), terminated while it starts and while its command runs."""
    from sandbox_helpers import ak_as_user, backend_available

    if os.geteuid() != 0 or not backend_available("gvisor"):
        pytest.skip("needs root (to become an ordinary user) and gVisor")
    owner = 4242
    for delay in (0.4, 2.0):
        home = tmp_path / f"home-{delay}"
        (home / "project").mkdir(parents=True)
        for path in (tmp_path, home, home / "project"):
            os.chown(path, owner, owner)
            path.chmod(0o755)
        proc = ak_as_user(owner, home, "run", "-q", "-B", "gvisor", "-p", "moderate", "-i",
                          "host", "--", "sleep", "60", cwd=home / "project")
        time.sleep(delay)
        proc.terminate()
        err = _ended(proc, f"terminated after {delay} s, the run did not end")
        assert _left_behind(home / "run") == [], (delay, err[-2000:])


def test_stdin_is_forwarded(backend: str, project: Path) -> None:
    r = on_host(
        backend,
        "--",
        "sh",
        "-c",
        "tr a-z A-Z",
        cwd=project,
        input=b"piped input\n",
    )
    assert r.stdout == "PIPED INPUT\n"


def test_exit_code_passes_through_while_stdin_stays_open(backend: str, project: Path) -> None:
    """`producer | agentkernel run -- cmd` where cmd ends first: the stdin pump, blocked in
    a buffered read, held its lock, and the interpreter's shutdown aborted (134) in place of
    the command's code, every time."""
    proc = subprocess.Popen([sys.executable, "-m", "agentkernel", "run", "-q", "-B", backend,
                             "-i", "host", "--", "sh", "-c", "exit 7"], cwd=project,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        proc.wait(timeout=60)  # stdin still open: nobody closed our end
        assert proc.stderr is not None
        assert proc.returncode == 7, (proc.returncode, proc.stderr.read()[-2000:])
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.kill()
        proc.wait()


def test_a_command_gets_no_descriptor_but_its_stdio(backend: str, project: Path) -> None:
    """The sandbox's init held descriptors of its start (bwrap's --sync-fd lifeline: a
    command could end its own egress); a command gets 0, 1 and 2 (3: the listing's own)."""
    r = on_host(backend, "-p", "moderate", "--", "python3", "-c",
                "import os; print(sorted(int(f) for f in os.listdir('/proc/self/fd')))",
                cwd=project)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[0, 1, 2, 3]", r.stdout


def test_env_workdir_and_json(backend: str, project: Path) -> None:
    r = on_host(
        backend,
        "-e",
        "GREETING=hi there",
        "--workdir",
        "/tmp",
        "--json",
        "--",
        "sh",
        "-c",
        'echo "$GREETING"; pwd; exit 3',
        cwd=project,
    )
    assert r.returncode == 3
    result = json.loads(r.stdout)
    assert result["stdout"] == "hi there\n/tmp\n"
    assert result["exit_code"] == 3
    assert result["backend"] == backend
    assert result["profile"] == "moderate"


def test_timeout_kills_and_says_so(backend: str, project: Path) -> None:
    started = time.monotonic()
    r = on_host(backend, "--timeout", "1", "--", "sleep", "30", cwd=project)
    assert r.returncode == 124
    assert "timed out" in r.stderr
    assert time.monotonic() - started < 25


def test_verbose_names_backend_and_isolation(backend: str, project: Path) -> None:
    r = ak("run", "-v", "-B", backend, "-i", "host", "--", "true", cwd=project)
    assert r.returncode == 0
    assert f"backend {backend}" in r.stderr
    assert "image python" not in r.stderr  # `true` is a shell-ish command: default image
    assert "profile moderate" in r.stderr


def test_image_is_detected_and_reported(project: Path) -> None:
    (project / "package.json").write_text("{}")
    r = ak("run", "-v", "-B", "namespaces", "--", "true", cwd=project)
    assert "image node:22-alpine" in r.stderr
    r = ak("run", "-v", "-B", "namespaces", "--", "python3", "-c", "pass", cwd=project)
    assert "image python:3.12-alpine" in r.stderr


def test_ctrl_c_reaches_the_command_and_cleans_up(backend: str, project: Path) -> None:
    proc = spawn_run(
        backend, project, "trap 'echo got-int; exit 7' INT; echo ready; while :; do sleep 0.1; done"
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert out == b"got-int\n"
    assert proc.returncode == 7


def test_bad_input_is_a_clear_error(project: Path) -> None:
    r = ak("run", "--profile", "paranoid", "--", "true", cwd=project)
    assert r.returncode == 2 and "unknown profile" in r.stderr
    r = ak("run", "--backend", "bogus", "--", "true", cwd=project)
    assert r.returncode == 2 and "unknown backend" in r.stderr
    r = ak("run", "--image", "UPPER;rm -rf /", "--", "true", cwd=project)
    assert r.returncode == 2
    r = ak("run", "--", cwd=project)
    assert r.returncode == 2 and "no command" in r.stderr
    r = ak("run", "-e", "1BAD=x", "--", "true", cwd=project)
    assert r.returncode == 2


def test_no_sandbox_left_behind(backend: str, project: Path) -> None:
    from agentkernel.paths import runtime_dir

    before = (
        set(os.listdir(runtime_dir() / "sandboxes"))
        if (runtime_dir() / "sandboxes").exists()
        else set()
    )
    on_host(backend, "--", "true", cwd=project)
    after = set(os.listdir(runtime_dir() / "sandboxes"))
    assert after <= before


@pytest.mark.parametrize("profile", ["permissive", "moderate", "restrictive"])
def test_profiles_run(backend: str, project: Path, profile: str) -> None:
    r = ak(
        "run", "-B", backend, "-i", "host", "-p", profile, "--", "sh", "-c", "echo ok", cwd=project
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ok\n"
