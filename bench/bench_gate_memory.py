"""Idle memory of forked egress gates: this tree's fork server against a baseline tree's,
in the same run, rounds interleaved.

Each round starts K gates at once (each attached to a network namespace of its own, with
an allow-list, dropping to 65534 as a daemon's do) from one fork server, waits, and reads
every gate's USS (pages only it has: what one more sandbox costs) and PSS. The gates'
host side (GateStart) is this tree's; only the fork server, and so the gate's own code,
comes from `--baseline` (a checkout's `src`, e.g. a `git worktree` of main) or this tree.
Needs root. Usage: .venv/bin/python bench/bench_gate_memory.py --baseline DIR/src
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_egress import memory_kib  # noqa: E402
from common import pct, stamp, stamp_lines  # noqa: E402


def start_server(src: str) -> Any:
    """A fork server whose code comes from `src` (it imports along our sys.path)."""
    from agentkernel import egress_forkserver

    saved = list(sys.path)
    sys.path[:] = [src, *(p for p in saved if p != str(ROOT / "src"))]
    try:
        return egress_forkserver._Server()
    finally:
        sys.path[:] = saved


def one_round(server: Any, k: int) -> list[dict[str, int]]:
    """K gates from `server`, idle: their memory."""
    from agentkernel import egress_forkserver
    from agentkernel.egress_gate import GateStart
    from agentkernel.egress_policy import policy_for
    from agentkernel.network import enter_netns, lifeline, netns_holder

    egress_forkserver._server = server
    policy = policy_for("egress", None, ("allowed.test",), (), ("allowed.test:192.0.2.1",))
    live: list[tuple[Path, list[Any], int]] = []
    try:
        for _ in range(k):
            scratch = Path(tempfile.mkdtemp(prefix="ak-bench-gm-"))
            life_r, life_w = lifeline()
            holder = netns_holder(life_r)
            live.append((scratch, [holder], life_w))
            subprocess.run([*enter_netns(holder.pid), "ip", "link", "set", "lo", "up"],
                           check=True)
            start = GateStart(scratch, exit_fd=life_r)
            start.attach(holder.pid, policy, ids=(65534, 65534))
            live[-1][1].append(start.wait(ready=True))
            os.close(life_r)
        time.sleep(0.5)
        return [memory_kib(helpers[-1].pid) for _s, helpers, _l in live]
    finally:
        egress_forkserver._server = None
        for scratch, helpers, life_w in live:
            os.close(life_w)
            for h in helpers:
                if h.poll() is None:
                    h.kill()
                h.wait()
            shutil.rmtree(scratch, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", required=True, help="the baseline checkout's src dir")
    parser.add_argument("-n", type=int, default=5, help="rounds of each")
    parser.add_argument("-k", type=int, default=3, help="gates at once per round")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    os.environ["AGENTKERNEL_GATE_FORKSERVER"] = "1"
    trees = {"baseline": str(Path(args.baseline).resolve()), "this tree": str(ROOT / "src")}
    servers = {name: start_server(src) for name, src in trees.items()}
    samples: dict[str, list[dict[str, int]]] = {name: [] for name in trees}
    try:
        time.sleep(1)  # both servers' imports and warm-up done
        for _ in range(args.n):
            for name, server in servers.items():
                samples[name] += one_round(server, args.k)
        own = {name: memory_kib(s.proc.pid) for name, s in servers.items()}
    finally:
        for s in servers.values():
            s.close()
    lines = ["# forked egress gate memory, idle", "", *stamp_lines(stamp()),
             f"- baseline: {trees['baseline']}", "",
             "| server | gates | USS p50 | USS p95 | PSS p50 | server's USS / PSS |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, rows in samples.items():
        uss = [float(r["uss"]) for r in rows]
        pss = [float(r["pss"]) for r in rows]
        lines.append(f"| {name} | {len(rows)} | {pct(uss, 0.5):.0f} KiB | "
                     f"{pct(uss, 0.95):.0f} KiB | {pct(pss, 0.5):.0f} KiB | "
                     f"{own[name]['uss']} / {own[name]['pss']} KiB |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
