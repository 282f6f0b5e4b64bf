"""Agents: `run --agent claude -- --version` (and `exec` in a kept agent sandbox) against
`claude --version` on the host, and an MCP `sandbox_run` of `true` over stdio.

The issue's budgets: time to first output of the sandboxed agent ≤ 1.3x the host's (a
warm pool: `run --agent` goes through the daemon, each run taking a warm agent sandbox), and
the MCP round trip ≤ 10 ms p50. The two `--version` runs are sampled in turns from the
same load (host, sandbox, host, ...); the first byte on stdout is the mark, the whole
run is reported too. When `agentkernel` is the native client, the same `run --agent`
through the Python client (`agentkernel-py`) is sampled in the same turns. The MCP client
is the official SDK's, over stdio to `agentkernel mcp-server`, with a daemon up (its warm
pool serves the runs); in turns with the same run asked of the daemon directly (its share
of the round trip), and with --against DIR, that checkout's `mcp-server` (this venv's
Python, its src). Each server's CPU time per call (all its threads,
/proc/PID/task/*/schedstat) is reported too.
Needs scripts/install-agents.sh (not with --mcp-only). Writes
bench/results/agents-<time>.{json,md}.
Usage: .venv/bin/python bench/bench_agents.py [-n 15] [--mcp-n 60] [--mcp-only]
       [--against DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from common import TABLE_HEAD, pct, stamp, stamp_lines, summary

ROOT = Path(__file__).resolve().parent.parent
AK = ROOT / ".venv" / "bin" / "agentkernel"
AK_PY = ROOT / ".venv" / "bin" / "agentkernel-py"  # the Python launcher beside a native AK
AGENTS = ROOT / ".cache" / "agents-home" / "agents"
CLAUDE = AGENTS / "claude" / "node_modules" / ".bin" / "claude"
DAEMON_TOML = """
[daemon]
pool_min = 1
pool_max = 2
adhoc_min = 1
pools = [{image = "host", profile = "moderate", backend = "namespaces"}]
"""
WARM_WAIT = 0.3  # seconds before each sample: the pool refills its agent sandbox


def first_output(argv: list[str], env: dict[str, str], cwd: Path,
                 err: int = subprocess.DEVNULL) -> tuple[float, float]:
    """Milliseconds to the first byte on stdout, and to the end of the run."""
    t = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    first = None
    while True:
        select.select([proc.stdout], [], [])
        chunk = os.read(proc.stdout.fileno(), 65536)
        if first is None and chunk:
            first = (time.perf_counter() - t) * 1000
        if not chunk:
            break
    code = proc.wait()
    total = (time.perf_counter() - t) * 1000
    if code != 0 or first is None:
        raise SystemExit(f"{argv[:4]} failed with {code}")
    return first, total


def _server_pid(before: set[int]) -> int:
    """The `mcp-server` child of ours started since `before` was taken (0: not found)."""
    found = _mcp_children() - before
    return found.pop() if found else 0


def _mcp_children() -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"mcp-server" in cmdline and ppid == os.getpid():
            pids.add(int(entry))
    return pids


def cpu_ms(pid: int) -> float:
    """CPU time of every thread of `pid` so far, in ms (schedstat: nanoseconds)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tasks:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total / 1e6


def daemon_run(env: dict[str, str], cwd: Path) -> float:
    """Milliseconds of the run the MCP tool asks for, asked of the daemon directly: its
    socket, the same request (ipc/client.py, blocking, in this process)."""
    saved = {k: os.environ.get(k) for k in env if k.startswith("AGENTKERNEL_")}
    os.environ.update({k: v for k, v in env.items() if k.startswith("AGENTKERNEL_")})
    try:
        from agentkernel.ipc import client
        from agentkernel.mcpserver.stdio import _run_fields

        req = {"argv": ["true"], "image": None, "profile": None, "env": {}, "workdir": None,
               "timeout": 120.0, "cwd": str(cwd), "no_network": False, **_run_fields(),
               "stdin_open": False}
        t = time.perf_counter()
        lines = client.open_stream("run", req, auto_start=False)
        assert lines is not None
        try:
            while (msg := lines.recv()) is not None and msg.get("ev") != "exit":
                if msg.get("ok") is False:
                    raise SystemExit(f"daemon run failed: {msg}")
        finally:
            lines.sock.close()
        return (time.perf_counter() - t) * 1000
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def mcp_round_trips(n: int, servers: dict[str, tuple[list[str], dict[str, str]]],
                    env: dict[str, str], cwd: Path
                    ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Milliseconds of `n` calls of sandbox_run(["true"]) over one stdio session with each
    server (argv, env), in turns with the daemon asked directly ("daemon"); and each
    server's CPU ms per call."""
    from contextlib import AsyncExitStack

    import anyio
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    samples: dict[str, list[float]] = {label: [] for label in servers}
    samples["daemon"] = []
    cpu: dict[str, float] = {}

    async def call(client: Client) -> float:
        t = time.perf_counter()
        result = await client.call_tool("sandbox_run", {"command": ["true"]})
        if result.is_error:
            raise SystemExit(f"sandbox_run failed: {result.content}")
        return (time.perf_counter() - t) * 1000

    async def main() -> None:
        async with AsyncExitStack() as stack:
            clients: dict[str, Client] = {}
            pids: dict[str, int] = {}
            for label, (argv, server_env) in servers.items():
                before = _mcp_children()
                clients[label] = await stack.enter_async_context(Client(StdioServerParameters(
                    command=argv[0], args=argv[1:], env=server_env, cwd=str(cwd))))
                pids[label] = _server_pid(before)
            for _ in range(3):  # to warm the servers' imports and the pool
                for client in clients.values():
                    await call(client)
                    await anyio.sleep(0.2)  # the pool refills: warm runs, not queued ones
                daemon_run(env, cwd)
                await anyio.sleep(0.2)
            start = {label: cpu_ms(pid) for label, pid in pids.items()}
            for i in range(n):
                order = list(clients.items())
                if i % 2:
                    order.reverse()
                for label, client in order:
                    samples[label].append(await call(client))
                    await anyio.sleep(0.2)
                samples["daemon"].append(daemon_run(env, cwd))
                await anyio.sleep(0.2)
            cpu.update({label: (cpu_ms(pid) - start[label]) / n
                        for label, pid in pids.items() if pid})

    anyio.run(main)
    return samples, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=15, help="samples of each --version run")
    ap.add_argument("--mcp-n", type=int, default=60, help="MCP round trips")
    ap.add_argument("--mcp-only", action="store_true", help="only the MCP round trips")
    ap.add_argument("--against", type=Path, default=None,
                    help="another checkout (e.g. main) whose mcp-server to sample alongside")
    args = ap.parse_args()
    if not args.mcp_only and not os.access(CLAUDE, os.X_OK):
        raise SystemExit("run scripts/install-agents.sh first")
    tmp = Path(tempfile.mkdtemp(prefix="ak-bench-agents-"))
    (tmp / "run").mkdir(mode=0o700)
    (tmp / "home").mkdir()
    (tmp / "proj").mkdir()
    (tmp / "home" / "agents").symlink_to(AGENTS)
    (tmp / "daemon.toml").write_text(DAEMON_TOML)
    env = {**os.environ, "AGENTKERNEL_HOME": str(tmp / "home"),
           "AGENTKERNEL_RUNTIME_DIR": str(tmp / "run"),
           "AGENTKERNEL_DAEMON_CONFIG": str(tmp / "daemon.toml"),
           "DISABLE_AUTOUPDATER": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    for key in ("AGENTKERNEL_NO_DAEMON", "PYTHONDONTWRITEBYTECODE"):
        env.pop(key, None)
    # A key as a user has one: each run's goes to its sandbox's gate (a fake: --version
    # reaches no API).
    env["ANTHROPIC_API_KEY"] = "sk-ant-bench-" + os.urandom(8).hex()
    cwd = tmp / "proj"
    servers = {"this": ([str(AK), "mcp-server"], env)}
    if args.against:
        servers[str(args.against)] = (
            [str(AK.parent / "python"), str(args.against / "bin" / "agentkernel"),
             "mcp-server"], {**env, "PYTHONPATH": str(args.against / "src")})
    versions: dict[str, list[float]] = {}
    warm = 0
    native = AK_PY.exists() and AK.read_bytes()[:4] == b"\x7fELF"
    subprocess.run([str(AK), "daemon", "start"], env=env, check=True, capture_output=True)
    try:
        if not args.mcp_only:
            versions, warm = version_runs(args.n, env, cwd, tmp, native)
        mcp, cpu = mcp_round_trips(args.mcp_n, servers, env, cwd)
    finally:  # a kept sandbox outlives its daemon: removed first
        subprocess.run([str(AK), "remove", "bench"], env=env, capture_output=True, check=False)
        subprocess.run([str(AK), "daemon", "stop"], env=env, capture_output=True, check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    st = stamp()
    mcp_p50 = pct(mcp["this"], 0.5)
    md = [f"# Agents {time.strftime('%Y%m%d-%H%M%S')}", "", *stamp_lines(st), ""]
    rows: list[str] = []
    ratio = None
    if versions:
        base = pct(versions["host_first"], 0.5)
        ratio = pct(versions["box_first"], 0.5) / base
        md += [f"Interleaved, {args.n} samples each; {warm} of the {args.n} sandboxed runs "
               "were served warm by the daemon's pool. Budget: first output ≤ 1.3x the "
               f"host's ({'met' if ratio <= 1.3 else 'NOT met'}: {ratio:.2f}x).", ""]
        rows += [
            summary("host `claude --version`, first output (baseline)",
                    versions["host_first"], base),
            summary("`run --agent claude -- --version`, first output"
                    + (" (native client)" if native else ""), versions["box_first"], base),
            *([summary("the same through the Python client (agentkernel-py)",
                       versions["py_first"], base)] if native else []),
            summary("`exec` of `claude --version` in a kept agent sandbox (`create --agent`), "
                    "first output", versions["kept_first"], base),
            summary("host `claude --version`, whole run", versions["host_total"],
                    pct(versions["host_total"], 0.5)),
            summary("`run --agent claude -- --version`, whole run", versions["box_total"],
                    pct(versions["host_total"], 0.5))]
    md.append(f"MCP: {args.mcp_n} calls each, interleaved. Budget: sandbox_run p50 ≤ 10 ms "
              f"({'met' if mcp_p50 <= 10 else 'NOT met'}: {mcp_p50:.1f} ms). Server CPU per "
              "call: " + ", ".join(f"{label} {ms:.2f} ms" for label, ms in cpu.items()) + ".")
    daemon_p50 = pct(mcp["daemon"], 0.5)
    rows += [summary("the same run asked of the daemon directly (its share; baseline)",
                     mcp["daemon"], daemon_p50),
             summary("MCP `sandbox_run` of `true` over stdio (daemon, warm pool)",
                     mcp["this"], daemon_p50)]
    if args.against:
        rows.append(summary(f"the same, mcp-server of {args.against}",
                            mcp[str(args.against)], daemon_p50))
    md += ["", *TABLE_HEAD, *rows]
    text = "\n".join(md) + "\n"
    print(text)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    name = f"agents-{time.strftime('%Y%m%d-%H%M%S')}"
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(
        {"stamp": st, "host_first_ms": versions.get("host_first", []),
         "host_total_ms": versions.get("host_total", []),
         "sandbox_first_ms": versions.get("box_first", []),
         "sandbox_total_ms": versions.get("box_total", []),
         "kept_first_ms": versions.get("kept_first", []), "warm_runs": warm,
         "python_client_first_ms": versions.get("py_first", []),
         "ratio_first_p50": ratio, "mcp_ms": mcp["this"], "mcp_daemon_ms": mcp["daemon"],
         "mcp_against": str(args.against) if args.against else None,
         "mcp_against_ms": mcp.get(str(args.against)) if args.against else None,
         "mcp_server_cpu_ms_per_call": cpu}, indent=1))
    return 0


def version_runs(n: int, env: dict[str, str], cwd: Path, tmp: Path,
                 native: bool) -> tuple[dict[str, list[float]], int]:
    """The `--version` samples (host, `run --agent`, `exec` in a kept agent sandbox and,
    when `native`, `run --agent` through the Python client, in turns) and how many
    sandboxed runs the warm pool served."""
    got: dict[str, list[float]] = {k: [] for k in ("host_first", "host_total", "box_first",
                                                   "box_total", "kept_first", "py_first")}
    # (a kept sandbox takes stored secrets only: a key only in the shell is refused)
    keyless = {k: v for k, v in env.items() if k != "ANTHROPIC_API_KEY"}
    subprocess.run([str(AK), "create", "bench", "--agent", "claude"], env=keyless,
                   cwd=cwd, check=True, capture_output=True)
    host = [str(CLAUDE), "--version"]
    # -v: says on stderr whether the warm pool served it (counted below)
    box = [str(AK), "run", "-v", "--agent", "claude", "--", "--version"]
    kept = [str(AK), "exec", "bench", "--", "claude", "--version"]
    for argv in (host, box, kept):  # page caches
        first_output(argv, env, cwd)
    box_log = tmp / "box.err"
    for _ in range(n):
        # Each sample after the same pause, from the same quiet state: the pool refilled
        # and the last run's sandbox torn down (a sample taken while the daemon refills
        # after the one before shares the CPU with that start, whichever side it is).
        time.sleep(WARM_WAIT)
        f, t = first_output(host, env, cwd)
        got["host_first"].append(f)
        got["host_total"].append(t)
        time.sleep(WARM_WAIT)
        with open(box_log, "ab") as err:
            f, t = first_output(box, env, cwd, err.fileno())
        got["box_first"].append(f)
        got["box_total"].append(t)
        time.sleep(WARM_WAIT)
        got["kept_first"].append(first_output(kept, env, cwd)[0])
        if native:
            time.sleep(WARM_WAIT)
            got["py_first"].append(first_output([str(AK_PY), *box[1:]], env, cwd)[0])
    return got, box_log.read_text().count("via daemon (warm pool)")


if __name__ == "__main__":
    raise SystemExit(main())
