"""Benchmark the egress gate against plain slirp4netns egress, measured in the same run.

Both in a fresh network namespace of their own, against the same upstream (a network
namespace with HTTP and HTTPS servers, tests/egress_upstream.py): set-up time of the
namespace's way out, a 100 MiB download with curl, 100 sequential new HTTPS connections
(one small request each) from Python, and the resident memory of the gate process against
slirp4netns's. Needs root. Usage: .venv/bin/python bench/bench_egress.py [-n 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

HTTPS_LOOP = r"""
import socket, ssl, sys, time
ctx = ssl.create_default_context(cafile=sys.argv[2])
ctx.check_hostname = False
start = time.monotonic()
for _ in range(100):
    s = ctx.wrap_socket(socket.create_connection((sys.argv[1], 18443), timeout=10),
                        server_hostname="allowed.test")
    s.sendall(b"GET / HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n")
    while s.recv(65536):
        pass
    s.close()
print(time.monotonic() - start)
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def way_out(kind: str, scratch: Path) -> tuple[list[str], float, list[subprocess.Popen[bytes]],
                                                 int, int]:
    """A namespace whose way out is `kind` ("slirp" or "gate"): the argv prefix to run in it,
    the set-up time, its helpers, the pid to measure and the lifeline's write end."""
    from agentkernel.egress_gate import GateStart
    from agentkernel.egress_policy import Policy
    from agentkernel.network import egress_netns, enter_netns, lifeline, netns_holder

    helpers: list[subprocess.Popen[bytes]] = []
    start = time.monotonic()
    if kind == "slirp":
        pid, life_w = egress_netns(scratch / "slirp.log", helpers)
        took = time.monotonic() - start
        return enter_netns(pid), took, helpers, helpers[-1].pid, life_w
    life_r, life_w = lifeline()
    holder = netns_holder(life_r)
    helpers.append(holder)
    # bwrap brings a sandbox's loopback up; a bare holder's is down
    subprocess.run([*enter_netns(holder.pid), "ip", "link", "set", "lo", "up"], check=True)
    t0 = time.monotonic()  # the holder is the sandbox's own namespace: not the gate's cost
    start_ = GateStart(scratch, exit_fd=life_r)
    start_.attach(holder.pid, Policy())
    gate = start_.wait(ready=True)
    took = time.monotonic() - t0
    os.close(life_r)
    helpers.append(gate)
    return enter_netns(holder.pid), took, helpers, gate.pid, life_w


def measure(kind: str, upstream: object, n: int) -> dict[str, float]:
    up_addr = upstream.addr  # type: ignore[attr-defined]
    ca = upstream.ca  # type: ignore[attr-defined]
    setups, downloads, https, rss = [], [], [], []
    for _ in range(n):
        scratch = Path(tempfile.mkdtemp(prefix=f"ak-bench-{kind}-"))
        enter, took, helpers, pid, life_w = way_out(kind, scratch)
        try:
            setups.append(took)
            t = time.monotonic()
            subprocess.run([*enter, "curl", "-sS", "-o", "/dev/null",
                            f"http://{up_addr}:18080/big"], check=True, timeout=300)
            downloads.append(time.monotonic() - t)
            out = subprocess.run([*enter, sys.executable, "-c", HTTPS_LOOP, up_addr, str(ca)],
                                 check=True, capture_output=True, text=True, timeout=300)
            https.append(float(out.stdout))
            rss.append(rss_kib(pid))
        finally:
            os.close(life_w)
            for h in helpers:
                h.kill()
                h.wait()
            shutil.rmtree(scratch, ignore_errors=True)
    return {"setup_ms": statistics.median(setups) * 1000,
            "download_100MiB_s": statistics.median(downloads),
            "throughput_MiBps": 100 / statistics.median(downloads),
            "https_100_s": statistics.median(https),
            "rss_KiB": statistics.median(rss)}


def sandbox_starts(n: int) -> dict[str, float]:
    """p50 of a namespaces sandbox's start + destroy: moderate (the gate) and without
    network, interleaved."""
    from agentkernel.backends import get_backend
    from agentkernel.profiles import get_profile
    from agentkernel.rootfs import host_rootfs
    from agentkernel.sandbox import SandboxSpec

    backend = get_backend("namespaces")
    times: dict[str, list[float]] = {"gate": [], "no network": []}
    for i in range(n):
        for kind in times:
            profile = get_profile("moderate")
            if kind != "gate":
                profile = profile.with_overrides(network=False)
            spec = SandboxSpec(name=f"bench-{os.getpid()}-{i}-{len(kind)}", profile=profile,
                               rootfs=host_rootfs(), image="host")
            t = time.monotonic()
            backend.start(spec).destroy()
            times[kind].append(time.monotonic() - t)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    from test_egress_policy import make_upstream

    results: dict[str, list[dict[str, float]]] = {}
    with make_upstream() as upstream:
        for _round in range(2):  # interleaved, so that load on the machine hits both
            for kind in ("slirp", "gate"):
                results.setdefault(kind, []).append(measure(kind, upstream, args.n))
    starts = sandbox_starts(max(5, args.n * 3))
    print("sandbox start+destroy p50 ms:", " ".join(f"{k}={v:.1f}" for k, v in starts.items()))
    merged = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in
              results.items()}
    for kind, values in merged.items():
        print(kind, " ".join(f"{k}={v:.3g}" for k, v in values.items()))
    s, g = merged["slirp"], merged["gate"]
    print(f"gate/slirp: throughput {g['throughput_MiBps'] / s['throughput_MiBps']:.2f}x, "
          f"100 HTTPS {g['https_100_s'] / s['https_100_s']:.2f}x, "
          f"set-up {g['setup_ms']:.1f} vs {s['setup_ms']:.1f} ms, "
          f"RSS {g['rss_KiB'] / 1024:.1f} vs {s['rss_KiB'] / 1024:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
