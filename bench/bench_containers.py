"""Benchmark the docker and podman backends against the engines' own `run --rm`, same run.

Cases per engine: `ENGINE run --rm IMAGE true` (Debian's CLI), `agentkernel run --backend
ENGINE -- true` cold (no daemon), and warm (through a private daemon's pool). Goals: cold
<= 1.1x the engine's own, warm <= 10% of it. Prints p50/p95 and writes
bench/results/containers-<time>.json, stamped with the commit and the machine.
Usage: .venv/bin/python bench/bench_containers.py [-n 15] --image IMAGE
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from common import pct, stamp, timed

ROOT = Path(__file__).resolve().parent.parent
AK = str(ROOT / ".venv" / "bin" / "agentkernel")
CLI = {"docker": "/usr/bin/docker", "podman": "/usr/bin/podman"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=15)
    ap.add_argument("--image", required=True,
                    help="an image both engines have (tests/test_containers.py imports one: "
                         "agentkernel-test/busybox:<content hash>)")
    ap.add_argument("--engines", default="docker,podman")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ak-bench-ct-"))
    # Without PYTHONDONTWRITEBYTECODE (set in some shells here): an install has its .pyc
    # files, and recompiling every module on every run is not what users pay.
    base_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env = {**base_env, "AGENTKERNEL_HOME": str(tmp / "home"),
           "AGENTKERNEL_RUNTIME_DIR": str(tmp / "run"), "AGENTKERNEL_DAEMON_AUTOSTART": "0"}
    proj = tmp / "proj"  # a project dir apart from our data and runtime dirs
    proj.mkdir()
    tmp.chmod(0o755)
    results: dict[str, dict[str, float]] = {}
    try:
        for engine in args.engines.split(","):
            extra = (["--ulimit", "nofile=1024:20000", "--ulimit", "nproc=1024:1024"]
                     if engine == "podman" else [])
            own = [CLI[engine], "run", "--rm", "--network", "none", *extra, args.image, "true"]
            ours = [AK, "run", "-q", "-p", "restrictive", "-B", engine, "-i", args.image, "-w",
                    "/tmp", "--", "true"]
            timed(ours, 2, cwd=proj, env=env)  # images imported, caches warm
            # Interleaved, one of each in turn: on a machine shared with other work, load
            # that comes and goes then weighs on both alike.
            own_s: list[float] = []
            ours_s: list[float] = []
            for _ in range(args.n):
                own_s += timed(own, 1, cwd=proj, env=base_env, pause=0.2)
                ours_s += timed(ours, 1, cwd=proj, env=env, pause=0.2)
            cases = {f"{engine} run --rm": own_s, f"agentkernel -B {engine} cold": ours_s}
            subprocess.run([AK, "daemon", "start"], env=env, check=True, capture_output=True)
            try:
                timed(ours, 3, cwd=proj, env=env, pause=0.5)
                cases[f"agentkernel -B {engine} warm"] = timed(ours, args.n, cwd=proj, env=env,
                                                                pause=0.5)
            finally:
                subprocess.run([AK, "daemon", "stop"], env=env, check=False, capture_output=True)
            for case, samples in cases.items():
                results[case] = {"p50": pct(samples, 0.5), "p95": pct(samples, 0.95)}
            base = results[f"{engine} run --rm"]["p50"]
            for case, r in results.items():
                if case.startswith(("agentkernel -B " + engine, engine)):
                    print(f"{case:32} p50 {r['p50']:7.1f} ms  p95 {r['p95']:7.1f} ms  "
                          f"{r['p50'] / base:5.2f}x {engine} run --rm")
    finally:
        pidfile = tmp / "run" / "podman.pid"  # the API service our backend started, if any
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
    out = ROOT / "bench" / "results" / f"containers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    st = stamp()  # commit (-dirty), kernel, CPU, load average, tool versions
    print(f"commit {st['commit']} on {platform.node()}, load {st['load']}")
    out.write_text(json.dumps({**st, "machine": platform.node(), "n": args.n,
                               "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
