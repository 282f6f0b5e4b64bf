"""Benchmark the wasm backend: a small WASI module, cold and warm, next to baselines.

Every wasm run is a confined worker (a namespaces sandbox running wasm_worker.py), so the
baselines are the pieces of that: a bare venv `python -c pass`, the same importing
wasmtime, and `agentkernel run -B namespaces -- true` cold and warm. Cases: inside a fresh
process, worker start (sandbox + interpreter + wasmtime import) and the job (module from
the .cwasm cache or compiled, run), timed from inside; the whole CLI with no daemon; the
same through a daemon; and warm runs over the daemon socket without a CLI process (the
pool refilled between runs, and back to back). Writes bench/results/wasm-<time>.md (and
.json), stamped with the commit and the machine.

Usage: .venv/bin/python bench/bench_wasm.py [-n 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import pct, timed

ROOT = Path(__file__).resolve().parent.parent
VENV_PY = ROOT / ".venv" / "bin" / "python"
AK = ROOT / ".venv" / "bin" / "agentkernel"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

# Runs in a fresh process: times worker start and the job, after the imports.
INSIDE = """
import json, os, sys, time
from pathlib import Path
from agentkernel.backends import wasm
from agentkernel.profiles import get_profile
from agentkernel.rootfs import host_rootfs
from agentkernel.sandbox import SandboxSpec
proj = Path(sys.argv[1]).parent
spec = SandboxSpec(name="bench-" + os.urandom(4).hex(), profile=get_profile("moderate"),
                   rootfs=host_rootfs(), image="host", workspace=proj)
t0 = time.perf_counter()
sb = wasm.WasmBackend().start(spec)
t1 = time.perf_counter()
ex = sb.client.exec(["hello.wat"], env={})
for _kind, _payload in ex.events():
    pass
t2 = time.perf_counter()
sb.destroy()
print(json.dumps({"worker": (t1 - t0) * 1e3, "job": (t2 - t1) * 1e3,
                  "total": (t2 - t0) * 1e3}))
os._exit(0)
"""


def inside(n: int, module: Path, env: dict[str, str],
           clear_cache: Path | None) -> list[dict[str, float]]:
    out = []
    for _ in range(n):
        if clear_cache is not None:
            shutil.rmtree(clear_cache, ignore_errors=True)
        r = subprocess.run([str(VENV_PY), "-c", INSIDE, str(module)], env=env,
                           capture_output=True, check=True)
        out.append(json.loads(r.stdout))
    return out


def socket_samples(n: int, req: dict[str, Any], pause: float = 0.0) -> list[float]:
    from agentkernel.daemon import client

    samples = []
    for _ in range(n):
        if pause:
            time.sleep(pause)  # the pool starts the next worker meanwhile
        t = time.perf_counter()
        lines = client.open_stream("run", req, auto_start=False)
        if lines is None:
            raise SystemExit("daemon not running")
        result = client.pump(lines, sink=lambda _s, _d: None)
        samples.append((time.perf_counter() - t) * 1000)
        if result.get("exit_code") != 0:
            raise SystemExit(f"socket run failed: {result}")
    return samples


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}, Linux {platform.release()}, {os.cpu_count()} CPUs {model}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=30)
    args = ap.parse_args()
    n = args.n
    from wasm_modules import HELLO

    tmp = Path(tempfile.mkdtemp(prefix="ak-bench-wasm-"))
    (tmp / "run").mkdir(mode=0o700)
    proj = tmp / "proj"
    proj.mkdir()
    module = proj / "hello.wat"
    module.write_text(HELLO)
    env = {**os.environ, "AGENTKERNEL_HOME": str(tmp / "home"),
           "AGENTKERNEL_RUNTIME_DIR": str(tmp / "run"), "AGENTKERNEL_DAEMON_AUTOSTART": "0",
           "PYTHONPATH": str(ROOT / "src")}
    os.environ.update({k: env[k] for k in ("AGENTKERNEL_HOME", "AGENTKERNEL_RUNTIME_DIR")})
    cache = tmp / "home" / "wasm-cache"
    ns_true = [str(AK), "run", "-q", "-B", "namespaces", "-p", "moderate", "--", "true"]
    try:
        bare = timed([str(VENV_PY), "-c", "pass"], n, cwd=proj, env=env)
        imp = timed([str(VENV_PY), "-c", "import wasmtime"], n, cwd=proj, env=env)
        miss = inside(n, module, env, clear_cache=cache)
        hit = inside(n, module, env, clear_cache=None)
        no_daemon = {**env, "AGENTKERNEL_NO_DAEMON": "1"}
        ns_cold = timed(ns_true, n, cwd=proj, env=no_daemon)
        cli_cold = timed([str(AK), "run", "hello.wat"], n, cwd=proj, env=no_daemon)
        subprocess.run([str(AK), "daemon", "start"], env=env, check=True, capture_output=True)
        timed(ns_true, 3, cwd=proj, env=env, pause=1.0)  # the first runs make the pool key
        ns_warm = timed(ns_true, n, cwd=proj, env=env, pause=0.5)
        timed([str(AK), "run", "hello.wat"], 3, cwd=proj, env=env, pause=1.0)
        cli_warm = timed([str(AK), "run", "hello.wat"], n, cwd=proj, env=env, pause=0.5)
        req = {"argv": ["hello.wat"], "cwd": str(proj)}
        socket_samples(3, req, pause=1.0)
        sock = socket_samples(n, req, pause=0.5)
        sock_b2b = socket_samples(n, req)
        ns_req = {"argv": ["true"], "cwd": str(proj), "backend": "namespaces",
                  "profile": "moderate"}
        socket_samples(3, ns_req, pause=1.0)
        ns_sock = socket_samples(n, ns_req, pause=0.5)
    finally:
        subprocess.run([str(AK), "daemon", "stop"], env=env, check=False, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    from agentkernel.backends.wasm import wasmtime_version

    def col(samples: list[dict[str, float]], key: str) -> list[float]:
        return [s[key] for s in samples]

    cases = [
        ("bare venv `python -c pass` (baseline)", bare),
        ("venv `python -c 'import wasmtime'` (baseline)", imp),
        ("`agentkernel run -B namespaces -- true`, no daemon (baseline)", ns_cold),
        ("cold in a fresh process, cache miss: worker + compile + run", col(miss, "total")),
        ("  of which after the sandbox is up: compile (+ cache write) while the worker "
         "imports wasmtime, then the run", col(miss, "job")),
        ("cold in a fresh process, .cwasm cache hit: worker + load + run",
         col(hit, "total")),
        ("  of which the worker's sandbox (bwrap + agent)", col(hit, "worker")),
        ("  of which the rest: the worker's interpreter + wasmtime import, the run",
         col(hit, "job")),
        ("whole CLI `agentkernel run hello.wat`, no daemon", cli_cold),
        ("`agentkernel run -B namespaces -- true` through the daemon (baseline)", ns_warm),
        ("whole CLI `agentkernel run hello.wat` through the daemon", cli_warm),
        ("namespaces `true` over the daemon socket, warm (baseline)", ns_sock),
        ("warm run over the daemon socket, no CLI process (pool refilled)", sock),
        ("  the same back to back (the pool may not have refilled)", sock_b2b),
    ]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    md = [f"# wasm benchmark {stamp}", "",
          f"Commit {commit}, wasmtime {wasmtime_version()}, {machine()}. {n} samples per case. "
          "The module is tests/wasm_modules.py's HELLO (writes two lines, reads argv). "
          "The fresh-process rows are timed inside one after its own imports (not of "
          "wasmtime: that process compiles only on a cache miss); the worker start they "
          "include is a namespaces sandbox, an interpreter and its import of wasmtime. "
          "Warm runs sleep 0.5 s between samples so that the pool refills.",
          "", "| case | p50 ms | p95 ms |", "|---|---:|---:|"]
    for label, samples in cases:
        md.append(f"| {label} | {pct(samples, 0.5):.2f} | {pct(samples, 0.95):.2f} |")
    text = "\n".join(md) + "\n"
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"wasm-{stamp}.md").write_text(text)
    (out_dir / f"wasm-{stamp}.json").write_text(json.dumps(
        {"commit": commit, "machine": machine(), "n": n,
         "cases": {label: s for label, s in cases}}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
