"""Agents: `run --agent claude -- --version` (and `exec` in a kept agent sandbox) against
`claude --version` on the host, and an MCP `sandbox_run` of `true` over stdio.

The issue's budgets: time to first output of the sandboxed agent ≤ 1.3x the host's (a
warm pool: `run --agent` goes through the daemon, each run taking a warm agent sandbox), and
the MCP round trip ≤ 10 ms p50. The two `--version` runs are sampled in turns from the
same load (host, sandbox, host, ...); the first byte on stdout is the mark, the whole
run is reported too. The MCP client is the official SDK's, over stdio to
`agentkernel mcp-server`, with a daemon up (its warm pool serves the runs).
Needs scripts/install-agents.sh. Writes bench/results/agents-<time>.{json,md}.
Usage: .venv/bin/python bench/bench_agents.py [-n 15] [--mcp-n 60]
"""

from __future__ import annotations

import argparse
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
WARM_WAIT = 0.3  # seconds before each sandboxed sample: the pool refills its agent sandbox


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


def mcp_round_trips(n: int, env: dict[str, str], cwd: Path) -> list[float]:
    """Milliseconds of `n` calls of sandbox_run(["true"]) over one stdio session."""
    import anyio
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    params = StdioServerParameters(command=str(AK), args=["mcp-server"], env=env, cwd=str(cwd))
    samples: list[float] = []

    async def main() -> None:
        async with Client(params) as client:
            for i in range(n + 3):  # three to warm the server's imports and the pool
                t = time.perf_counter()
                result = await client.call_tool("sandbox_run", {"command": ["true"]})
                if result.is_error:
                    raise SystemExit(f"sandbox_run failed: {result.content}")
                if i >= 3:
                    samples.append((time.perf_counter() - t) * 1000)
                await anyio.sleep(0.2)  # the pool refills: warm runs, not queued ones

    anyio.run(main)
    return samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=15, help="samples of each --version run")
    ap.add_argument("--mcp-n", type=int, default=60, help="MCP round trips")
    args = ap.parse_args()
    if not os.access(CLAUDE, os.X_OK):
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
    host_first: list[float] = []
    host_total: list[float] = []
    box_first: list[float] = []
    box_total: list[float] = []
    kept_first: list[float] = []
    py_first: list[float] = []  # the same run through the Python client, when AK is native
    native = AK_PY.exists() and AK.read_bytes()[:4] == b"\x7fELF"
    subprocess.run([str(AK), "daemon", "start"], env=env, check=True, capture_output=True)
    try:
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
        for _ in range(args.n):
            f, t = first_output(host, env, cwd)
            host_first.append(f)
            host_total.append(t)
            time.sleep(WARM_WAIT)
            with open(box_log, "ab") as err:
                f, t = first_output(box, env, cwd, err.fileno())
            box_first.append(f)
            box_total.append(t)
            kept_first.append(first_output(kept, env, cwd)[0])
            if native:
                time.sleep(WARM_WAIT)
                py_first.append(first_output([str(AK_PY), *box[1:]], env, cwd)[0])
        warm = box_log.read_text().count("via daemon (warm pool)")
        mcp = mcp_round_trips(args.mcp_n, env, cwd)
    finally:  # a kept sandbox outlives its daemon: removed first
        subprocess.run([str(AK), "remove", "bench"], env=env, capture_output=True, check=False)
        subprocess.run([str(AK), "daemon", "stop"], env=env, capture_output=True, check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    st = stamp()
    base = pct(host_first, 0.5)
    ratio = pct(box_first, 0.5) / base
    mcp_p50 = pct(mcp, 0.5)
    md = [f"# Agents {time.strftime('%Y%m%d-%H%M%S')}", "", *stamp_lines(st), "",
          f"Interleaved, {args.n} samples each; {warm} of the {args.n} sandboxed runs were "
          "served warm by the daemon's pool. Budgets: first output ≤ 1.3x the host's "
          f"({'met' if ratio <= 1.3 else 'NOT met'}: {ratio:.2f}x); MCP sandbox_run p50 ≤ "
          f"10 ms ({'met' if mcp_p50 <= 10 else 'NOT met'}: {mcp_p50:.1f} ms).", "",
          *TABLE_HEAD,
          summary("host `claude --version`, first output (baseline)", host_first, base),
          summary("`run --agent claude -- --version`, first output"
                  + (" (native client)" if native else ""), box_first, base),
          *([summary("the same through the Python client (agentkernel-py)", py_first, base)]
            if native else []),
          summary("`exec` of `claude --version` in a kept agent sandbox (`create --agent`), "
                  "first output", kept_first, base),
          summary("host `claude --version`, whole run", host_total, pct(host_total, 0.5)),
          summary("`run --agent claude -- --version`, whole run", box_total,
                  pct(host_total, 0.5)),
          summary("MCP `sandbox_run` of `true` over stdio (daemon, warm pool)", mcp)]
    text = "\n".join(md) + "\n"
    print(text)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    name = f"agents-{time.strftime('%Y%m%d-%H%M%S')}"
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(
        {"stamp": st, "host_first_ms": host_first, "host_total_ms": host_total,
         "sandbox_first_ms": box_first, "sandbox_total_ms": box_total,
         "kept_first_ms": kept_first, "mcp_ms": mcp, "warm_runs": warm,
         "python_client_first_ms": py_first,
         "ratio_first_p50": ratio}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
