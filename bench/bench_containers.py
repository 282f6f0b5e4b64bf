"""Benchmark the docker and podman backends against the engines' own `run --rm`, same run.

Cases per engine, interleaved (one of each in turn, so that load that comes and goes on a
shared machine weighs on all alike):
- `ENGINE run --rm IMAGE true` (Debian's CLI);
- `agentkernel run --backend ENGINE -- true` cold (no daemon), of this tree and, with
  `--baseline-tree DIR`, of another checkout (its own .venv), with the CLI's CPU time
  (user+sys of its process and children; not the engine's);
- warm, through each tree's private daemon's pool: the CLI (`agentkernel run`, paced) and
  the daemon socket from a client process that stays up (what the daemon side costs,
  without a CLI process: the figure a native client adds its own start to).
Goals (issue 13): cold <= 1.1x the engine's own, warm <= 0.10x it. Prints p50/p95/min and
writes bench/results/containers-<time>.json, stamped with the commit and the machine.
Usage: .venv/bin/python bench/bench_containers.py [-n 15] --image IMAGE
                                                 [--engines docker,podman] [--baseline-tree DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import SOCKET_RUN_CLIENT, pct, stamp, timed_run

ROOT = Path(__file__).resolve().parent.parent
CLI = {"docker": "/usr/bin/docker", "podman": "/usr/bin/podman"}
PACE = 0.5  # seconds before each warm run: the pool has refilled (a container start)


class Tree:
    """One checkout's CLI, with private data and runtime dirs (its own podman service)."""

    def __init__(self, tree: Path, tmp: Path, base_env: dict[str, str], tag: str) -> None:
        self.tree, self.tag = tree, tag
        self.ak = str(tree / ".venv" / "bin" / "agentkernel")
        self.python = str(tree / ".venv" / "bin" / "python")
        self.run_dir = tmp / f"run-{tag}"
        self.env = {**base_env, "AGENTKERNEL_HOME": str(tmp / f"home-{tag}"),
                    "AGENTKERNEL_RUNTIME_DIR": str(self.run_dir),
                    "AGENTKERNEL_DAEMON_AUTOSTART": "0"}

    def stop_services(self) -> None:
        pidfile = self.run_dir / "podman.pid"  # the API service our backend started, if any
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGTERM)


class SocketClient:
    """A client process of the tree's own (our wire, as the CLI speaks it) that runs the
    request over the daemon socket on demand and reports each run's wall ms."""

    def __init__(self, tree: Tree, req: dict[str, Any], cwd: Path) -> None:
        self.proc = subprocess.Popen([tree.python, "-c", SOCKET_RUN_CLIENT, json.dumps(req)],
                                     env=tree.env, cwd=cwd, text=True, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)

    def samples(self, n: int, pause: float) -> list[float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps([n, pause]) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("the socket client failed")
        return list(json.loads(line))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(30)


def engine_cases(engine: str, args: argparse.Namespace, trees: list[Tree], proj: Path,
                 base_env: dict[str, str]) -> dict[str, dict[str, list[float]]]:
    extra = (["--ulimit", "nofile=1024:20000", "--ulimit", "nproc=1024:1024"]
             if engine == "podman" else [])
    own = [CLI[engine], "run", "--rm", "--network", "none", *extra, args.image, "true"]
    ours = ["run", "-q", "-p", "restrictive", "-B", engine, "-i", args.image, "-w", "/tmp",
            "--", "true"]
    cases: dict[str, dict[str, list[float]]] = {}
    own_case = cases.setdefault(f"{engine} run --rm", {"wall": [], "cpu": []})
    for tree in trees:
        for _ in range(2):  # images imported, caches warm, the podman service up
            timed_run([tree.ak, *ours], cwd=proj, env=tree.env)
    for _ in range(args.n):
        for argv, env, case in [(own, base_env, own_case)] + [
                ([t.ak, *ours], t.env, cases.setdefault(f"{t.tag} cold", {"wall": [],
                                                                          "cpu": []}))
                for t in trees]:
            wall, cpu = timed_run(argv, cwd=proj, env=env)
            case["wall"].append(wall)
            case["cpu"].append(cpu)
            time.sleep(0.2)
    # Warm: each tree's own daemon, asked in turns (a CLI run, then a socket run, each
    # after PACE: its pool has refilled).
    req = {"argv": ["true"], "cwd": str(proj), "image": args.image, "backend": engine,
           "profile": "restrictive", "workdir": "/tmp"}
    clients: list[SocketClient] = []
    try:
        for tree in trees:
            subprocess.run([tree.ak, "daemon", "start"], env=tree.env, check=True,
                           capture_output=True)
            clients.append(SocketClient(tree, req, proj))
        for tree, client in zip(trees, clients, strict=True):
            for _ in range(3):  # each key's first runs; then their pools fill
                timed_run([tree.ak, *ours], cwd=proj, env=tree.env)
                client.samples(1, PACE)
        time.sleep(1.0)
        for _ in range(args.n):
            for tree, client in zip(trees, clients, strict=True):
                time.sleep(PACE)
                cases.setdefault(f"{tree.tag} warm, CLI", {"wall": []})["wall"].append(
                    timed_run([tree.ak, *ours], cwd=proj, env=tree.env)[0])
                cases.setdefault(f"{tree.tag} warm, daemon socket", {"wall": []})["wall"] += \
                    client.samples(1, PACE)
    finally:
        for client in clients:
            client.close()
        for tree in trees:
            subprocess.run([tree.ak, "daemon", "stop"], env=tree.env, check=False,
                           capture_output=True)
    return cases


def row(case: str, m: dict[str, list[float]], base: float) -> str:
    wall = m["wall"]
    cpu = f"  cpu p50 {pct(m['cpu'], 0.5):6.1f} ms" if m.get("cpu") else ""
    return (f"{case:40} p50 {pct(wall, 0.5):7.1f}  p95 {pct(wall, 0.95):7.1f}  "
            f"min {min(wall):7.1f} ms  {pct(wall, 0.5) / base:5.2f}x{cpu}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=15)
    ap.add_argument("--image", required=True,
                    help="an image both engines have (tests/test_containers.py imports one: "
                         "agentkernel-test/busybox:<content hash>)")
    ap.add_argument("--engines", default="docker,podman")
    ap.add_argument("--baseline-tree", type=Path, default=None,
                    help="another checkout with its own .venv (e.g. /work/main): its cold "
                         "runs in turns with this tree's")
    args = ap.parse_args()
    st = stamp()  # commit (-dirty), kernel, CPU, load average, tool versions
    tmp = Path(tempfile.mkdtemp(prefix="ak-bench-ct-"))
    # Without PYTHONDONTWRITEBYTECODE (set in some shells here): an install has its .pyc
    # files, and recompiling every module on every run is not what users pay.
    base_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    proj = tmp / "proj"  # a project dir apart from our data and runtime dirs
    proj.mkdir()
    tmp.chmod(0o755)
    trees = ([Tree(args.baseline_tree, tmp, base_env, "baseline")]
             if args.baseline_tree else []) + [Tree(ROOT, tmp, base_env, "agentkernel")]
    results: dict[str, dict[str, float]] = {}
    try:
        for engine in args.engines.split(","):
            cases = engine_cases(engine, args, trees, proj, base_env)
            base = pct(cases[f"{engine} run --rm"]["wall"], 0.5)
            print(f"{engine}:")
            for case, m in cases.items():
                print("  " + row(case, m, base))
                key = case if case.startswith(engine) else f"{case} ({engine})"
                results[key] = {"p50": pct(m["wall"], 0.5), "p95": pct(m["wall"], 0.95),
                                "min": min(m["wall"]), "ratio": pct(m["wall"], 0.5) / base,
                                **({"cpu_p50": pct(m["cpu"], 0.5)} if m.get("cpu") else {})}
    finally:
        for tree in trees:
            tree.stop_services()
        shutil.rmtree(tmp, ignore_errors=True)
    out = ROOT / "bench" / "results" / f"containers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    st["load after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"commit {st['commit']} on {platform.node()}, load {st['load']} .. {st['load after']}")
    out.write_text(json.dumps({**st, "machine": platform.node(), "n": args.n,
                               "baseline": str(args.baseline_tree or ""),
                               "results": results}, indent=1))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
