"""Benchmark the microvm backend next to namespaces: boot to agent-ready, exec latency, VMM memory.

Each sandbox is started through its backend's own `start()` (no CLI), so the numbers are the
backend's. Under TCG (this machine) the microVM numbers are software-emulation numbers.
With --snapshot it also starts microVMs from a saved template VM ([microvm] snapshot): the
template is built (or found) by one untimed warm-up start, then each start is a restore.
Usage: .venv/bin/python bench/bench_microvm.py [--boots 5] [--execs 20] [--vmlinux FILE]
       [--snapshot]
Writes bench/results/microvm-<stamp>.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from common import pct

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from agentkernel.backends import get_backend  # noqa: E402
from agentkernel.profiles import get_profile  # noqa: E402
from agentkernel.rootfs import host_rootfs  # noqa: E402
from agentkernel.sandbox import Sandbox, SandboxSpec  # noqa: E402


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB, from /proc/PID/smaps_rollup."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def tree_memory_kib(pid: int) -> tuple[int, int]:
    """RSS/PSS of a process and all its descendants (bwrap + agent, say)."""
    pids = [pid]
    i = 0
    while i < len(pids):
        try:
            children = Path(f"/proc/{pids[i]}/task/{pids[i]}/children").read_text().split()
        except OSError:
            children = []
        pids += [int(c) for c in children]
        i += 1
    total = [0, 0]
    for p in pids:
        r, s = memory_kib(p)
        total[0] += r
        total[1] += s
    return total[0], total[1]


def run_case(backend_name: str, profile: str, boots: int, execs: int,
             warmup: bool = False) -> dict[str, float]:
    backend = get_backend(backend_name)
    probe = backend.probe()
    if not probe.ok:
        raise SystemExit(f"{backend_name}: {probe.detail}")
    if warmup:  # e.g. builds the snapshot template once, outside the timed starts
        backend.start(SandboxSpec(name=f"bench-warm-{os.getpid()}", profile=get_profile(profile),
                                  rootfs=host_rootfs(), image="bench")).destroy()
    ready: list[float] = []
    exec_ms: list[float] = []
    rss = pss = 0
    for i in range(boots):
        spec = SandboxSpec(name=f"bench-{backend_name}-{os.getpid()}-{i}",
                           profile=get_profile(profile), rootfs=host_rootfs(), image="bench")
        t = time.perf_counter()
        sandbox: Sandbox = backend.start(spec)
        ready.append((time.perf_counter() - t) * 1000)
        try:
            if i == 0:
                for _ in range(execs):
                    t = time.perf_counter()
                    _, _, status = sandbox.client.exec(["true"]).wait(60)
                    exec_ms.append((time.perf_counter() - t) * 1000)
                    assert status.code == 0
                time.sleep(0.5)
                rss, pss = tree_memory_kib(sandbox.process.pid)
        finally:
            sandbox.destroy()
    return {"ready_p50": pct(ready, 0.5), "ready_min": min(ready), "ready_max": max(ready),
            "exec_p50": statistics.median(exec_ms), "exec_p95": pct(exec_ms, 0.95),
            "rss_mib": rss / 1024, "pss_mib": pss / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=5)
    parser.add_argument("--execs", type=int, default=20)
    parser.add_argument("--profile", default="restrictive",
                        help="profile for both backends (restrictive: no network helpers)")
    parser.add_argument("--vmlinux", help="also measure this kernel (e.g. the minimal one)")
    parser.add_argument("--snapshot", action="store_true",
                        help="also measure starts restored from a saved template VM")
    args = parser.parse_args()
    os.environ.setdefault("AGENTKERNEL_MICROVM_ALLOW_EMULATION", "1")
    from agentkernel.vm.kernel import current_kernel

    kernel = current_kernel()
    if kernel is None:
        raise SystemExit("run `agentkernel setup --microvm` first")
    cases: list[tuple[str, str, dict[str, float]]] = []
    cases.append(("namespaces", "host kernel",
                  run_case("namespaces", args.profile, args.boots, args.execs)))
    os.environ["AGENTKERNEL_MICROVM_SNAPSHOT"] = "0"
    cases.append(("microvm", kernel.release, run_case("microvm", args.profile, args.boots,
                                                      args.execs)))
    if args.snapshot:
        os.environ["AGENTKERNEL_MICROVM_SNAPSHOT"] = "1"
        cases.append(("microvm (snapshot restore)", kernel.release,
                      run_case("microvm", args.profile, args.boots, args.execs, warmup=True)))
        os.environ["AGENTKERNEL_MICROVM_SNAPSHOT"] = "0"
    if args.vmlinux:
        os.environ["AGENTKERNEL_MICROVM_KERNEL"] = args.vmlinux
        cases.append(("microvm", Path(args.vmlinux).name,
                      run_case("microvm", args.profile, args.boots, args.execs)))
    from agentkernel.backends.microvm import choose_accel
    from agentkernel.vm.settings import current

    accel, _ = choose_accel(current())
    lines = [
        f"# microvm benchmark {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "",
        f"Host: {os.uname().release}, {os.cpu_count()} CPUs; accelerator for microVMs: "
        f"{accel}; profile {args.profile}; {args.boots} boots, {args.execs} execs of `true`.",
        "",
        "| backend | kernel | agent-ready p50 (ms) | min-max (ms) | exec p50 (ms) | exec p95 (ms) "
        "| VMM/sandbox RSS (MiB) | PSS (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, kern, r in cases:
        lines.append(f"| {name} | {kern} | {r['ready_p50']:.0f} | {r['ready_min']:.0f}-"
                     f"{r['ready_max']:.0f} | {r['exec_p50']:.1f} | {r['exec_p95']:.1f} | "
                     f"{r['rss_mib']:.1f} | {r['pss_mib']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "bench" / "results" / f"microvm-{time.strftime('%Y%m%d-%H%M%S')}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
