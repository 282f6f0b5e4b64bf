"""Idle memory of the egress policy per sandbox, and the first query's latency: gates on
demand (the fork server polls an idle sandbox's listeners, no gate process) against a
gate forked for each sandbox's whole life (AGENTKERNEL_GATE_IDLE_SECONDS=0, the design
before), same tree, same run, rounds interleaved.

Each round wires N network namespaces (N sandboxes' worth: rules, listeners, an
allow-list; gates drop to 65534 as a daemon's do) to one fresh fork server, waits, and
counts all memory attributable to them: the gates' USS and PSS, the server's growth
(USS/PSS after registering them, less before), and the memfds it holds for them (config
and saved state). Then one DNS query from inside each namespace: the first one's time
(on demand: the server forks the gate for it) and a second one's (a gate serving).
Needs root. Usage: .venv/bin/python bench/bench_gate_memory.py [-n ROUNDS] [-k N]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_egress import memory_kib  # noqa: E402
from common import pct, stamp, stamp_lines  # noqa: E402

MODES = {"always-on (gate per sandbox)": "0", "on demand (idle: no gate)": "30"}


def _query() -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in ("allowed", "test")) + b"\0"
    return struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + labels + b"\0\1\0\1"


def ask_inside(pid: int, times: int = 2) -> list[float]:
    """Seconds to each of `times` DNS answers, asked from inside `pid`'s namespace."""
    got: list[float] = []

    def work() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        try:
            assert libc.setns(fd, 0x40000000) == 0
        finally:
            os.close(fd)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(10)
            for _ in range(times):
                t0 = time.perf_counter()
                sock.sendto(_query(), ("10.0.2.3", 53))
                sock.recvfrom(4096)
                got.append(time.perf_counter() - t0)

    thread = threading.Thread(target=work)  # setns moves this thread only
    thread.start()
    thread.join()
    assert len(got) == times, "no answer"
    return got


def _memfd_kib(pid: int) -> int:
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "memfd:ak-gate" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                total += os.stat(f"/proc/{pid}/fd/{fd}").st_blocks // 2
        except OSError:
            continue
    return total


def one_round(idle: str, k: int) -> dict[str, Any]:
    """K sandboxes' gates in `idle` mode from a fresh fork server: memory, then latency."""
    from agentkernel import egress_forkserver
    from agentkernel.egress_gate import GateStart
    from agentkernel.egress_policy import policy_for
    from agentkernel.network import enter_netns, lifeline, netns_holder
    from sandbox_helpers import egress_gate_pid

    os.environ["AGENTKERNEL_GATE_IDLE_SECONDS"] = idle
    egress_forkserver.shutdown()
    egress_forkserver.enable()
    server = egress_forkserver.server_pid()
    assert server is not None
    time.sleep(1.5)  # its imports and warm-up done
    before = memory_kib(server)
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
            gate = start.wait(ready=True)
            if gate is not None:
                live[-1][1].append(gate)
            os.close(life_r)
        time.sleep(0.5)
        gates = [pid for s, _h, _l in live if (pid := egress_gate_pid(s)) is not None]
        mem = [memory_kib(pid) for pid in gates]
        after = memory_kib(server)
        out = {"uss": sum(m["uss"] for m in mem) + after["uss"] - before["uss"],
               "pss": sum(m["pss"] for m in mem) + after["pss"] - before["pss"],
               "memfd": _memfd_kib(server), "gates": len(gates), "first": [], "second": []}
        out["uss"] += out["memfd"]
        out["pss"] += out["memfd"]
        for _s, helpers, _l in live:
            first, second = ask_inside(helpers[0].pid)
            out["first"].append(first)
            out["second"].append(second)
        return out
    finally:
        for scratch, helpers, life_w in live:
            os.close(life_w)
            for h in helpers:
                if h.poll() is None:
                    h.kill()
                h.wait()
            shutil.rmtree(scratch, ignore_errors=True)
        egress_forkserver.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=3, help="rounds of each")
    parser.add_argument("-k", type=int, default=20, help="idle sandboxes per round")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT / "tests"))
    os.environ["AGENTKERNEL_GATE_FORKSERVER"] = "1"
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in MODES}
    for _ in range(args.n):
        for name, idle in MODES.items():
            rows[name].append(one_round(idle, args.k))
    lines = ["# egress policy: idle memory per sandbox, first query", "",
             *stamp_lines(stamp()),
             f"- {args.n} rounds of {args.k} sandboxes each, interleaved; memory: the gates' "
             "USS/PSS + the fork server's growth + its memfds, divided by the sandboxes", "",
             "| mode | gates running | USS / sandbox p50 (p95) | PSS / sandbox p50 (p95) | "
             "first DNS answer p50 (p95) | next answer p50 |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, got in rows.items():
        uss = [r["uss"] / args.k for r in got]
        pss = [r["pss"] / args.k for r in got]
        first = [x * 1000 for r in got for x in r["first"]]
        second = [x * 1000 for r in got for x in r["second"]]
        lines.append(
            f"| {name} | {got[0]['gates']} | {pct(uss, 0.5):.0f} ({pct(uss, 0.95):.0f}) KiB | "
            f"{pct(pss, 0.5):.0f} ({pct(pss, 0.95):.0f}) KiB | "
            f"{pct(first, 0.5):.1f} ({pct(first, 0.95):.1f}) ms | "
            f"{pct(second, 0.5):.2f} ms |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
