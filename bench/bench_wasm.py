"""Benchmark the wasm backend: a small WASI module cold in a fresh process, warm in the daemon.

Cases, all in one run (baselines included): a bare venv `python -c pass`; the same importing
wasmtime; inside a fresh process, engine + load (compile, or the .cwasm cache) + instantiate +
run of the module, timed from inside (no interpreter start-up, no imports); the whole CLI
`agentkernel run hello.wat` with no daemon; the same through a daemon; and a warm run over
the daemon socket without a CLI process. Writes bench/results/wasm-<time>.md (and .json),
stamped with the commit and the machine.

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

# Runs in a fresh process: times engine + module + instantiate + run, after the imports.
INSIDE = """
import json, sys, time
from pathlib import Path
import wasmtime
from agentkernel.backends import wasm
t0 = time.perf_counter()
rt = wasm.runtime()
t1 = time.perf_counter()
pre = rt.module(Path(sys.argv[1]), "hello.wat")
t2 = time.perf_counter()
ex = wasm.WasmExecution(pre, ["hello"], {}, None, False, 64, None, False)
for _kind, _payload in ex.events():
    pass
t3 = time.perf_counter()
print(json.dumps({"engine": (t1 - t0) * 1e3, "module": (t2 - t1) * 1e3,
                  "run": (t3 - t2) * 1e3, "total": (t3 - t0) * 1e3}))
import os; os._exit(0)
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


def socket_samples(n: int, req: dict[str, Any]) -> list[float]:
    from agentkernel.daemon import client

    samples = []
    for _ in range(n):
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
    try:
        bare = timed([str(VENV_PY), "-c", "pass"], n, cwd=proj, env=env)
        imp = timed([str(VENV_PY), "-c", "import wasmtime"], n, cwd=proj, env=env)
        miss = inside(n, module, env, clear_cache=cache)
        hit = inside(n, module, env, clear_cache=None)
        cli_cold = timed([str(AK), "run", "hello.wat"], n, cwd=proj,
                         env={**env, "AGENTKERNEL_NO_DAEMON": "1"})
        subprocess.run([str(AK), "daemon", "start"], env=env, check=True, capture_output=True)
        subprocess.run([str(AK), "run", "hello.wat"], env=env, cwd=proj, check=True,
                       capture_output=True)
        cli_warm = timed([str(AK), "run", "hello.wat"], n, cwd=proj, env=env)
        req = {"argv": ["hello.wat"], "cwd": str(proj)}
        socket_samples(3, req)  # the module is compiled and linked in the daemon now
        sock = socket_samples(n, req)
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
        ("venv `python -c 'import wasmtime'`", imp),
        ("in-process cold, cache miss: engine + compile + instantiate + run",
         col(miss, "total")),
        ("  of which compile (+ link, + cache write)", col(miss, "module")),
        ("in-process cold, .cwasm cache hit: engine + load + instantiate + run",
         col(hit, "total")),
        ("  of which engine + WASI linker", col(hit, "engine")),
        ("  of which instantiate + run", col(hit, "run")),
        ("whole CLI `agentkernel run hello.wat`, no daemon", cli_cold),
        ("whole CLI `agentkernel run hello.wat` through the daemon", cli_warm),
        ("warm run over the daemon socket, no CLI process", sock),
    ]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    md = [f"# wasm benchmark {stamp}", "",
          f"Commit {commit}, wasmtime {wasmtime_version()}, {machine()}. {n} samples per case. "
          "The module is tests/wasm_modules.py's HELLO (writes two lines, reads argv). "
          "In-process rows are timed inside a fresh process after its imports: no "
          "interpreter start-up, no import of wasmtime (the second row is that cost).",
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
