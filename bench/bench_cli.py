"""Warm `agentkernel run -- true` through a running daemon against `python -c pass`, interleaved.

The issue's budget is a ratio (warm run ≤ 2x bare python), so both are sampled in turns
(python, run, python, run, ...) from the same load on a shared machine; also which of our
modules the Python client imports (the hot path's import budget, docs/architecture.md).
Where scripts/install.sh installed the native command (`agentkernel`, launcher/) beside the
Python launcher (`agentkernel-py`), both clients are sampled in the same turns, with the
client process's own CPU time (user+sys), which load disturbs far less than wall time.
With --against CHECKOUT, that checkout's CLI (its bin/agentkernel and src, this venv's
python, the same daemon) is sampled in the same turns: a before/after of a change.
Writes bench/results/cli-<time>.{json,md}.
Usage: .venv/bin/python bench/bench_cli.py [-n 40] [--pause 0.3] [--against DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from common import TABLE_HEAD, pct, stamp, stamp_lines, summary, timed, timed_run

ROOT = Path(__file__).resolve().parent.parent
VENV_PY = ROOT / ".venv" / "bin" / "python"
AK = ROOT / ".venv" / "bin" / "agentkernel"
AK_PY = ROOT / ".venv" / "bin" / "agentkernel-py"  # the Python launcher beside a native AK
FLAGS = ["-q", "-i", "host", "-B", "namespaces", "-p", "restrictive"]


def our_imports(env: dict[str, str], cwd: Path) -> list[str]:
    """The agentkernel modules one warm run loads (python -X importtime)."""
    # The launcher as installed, not `-m` (runpy's own imports would count).
    out = subprocess.run([str(VENV_PY), "-X", "importtime", str(ROOT / "bin" / "agentkernel"),
                          "run", *FLAGS, "--", "true"], env=env, cwd=cwd, capture_output=True,
                         text=True, check=True)
    names = (line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines()
             if line.startswith("import time:"))
    return sorted(n for n in names if n == "agentkernel" or n.startswith("agentkernel."))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=40, help="samples of each")
    ap.add_argument("--pause", type=float, default=0.3,
                    help="seconds after each run, so the pool refills (warm, not cold)")
    ap.add_argument("--against", type=Path, default=None,
                    help="another checkout (e.g. a worktree of main) to sample alongside")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ak-bench-cli-"))
    (tmp / "run").mkdir(mode=0o700)
    (tmp / "proj").mkdir()
    env = {**os.environ, "AGENTKERNEL_HOME": str(tmp / "home"),
           "AGENTKERNEL_RUNTIME_DIR": str(tmp / "run")}
    for key in ("AGENTKERNEL_NO_DAEMON", "PYTHONDONTWRITEBYTECODE"):
        env.pop(key, None)  # a user's install has its bytecode cached: so does this run
    cwd = tmp / "proj"
    bare: list[float] = []
    warm: list[float] = []
    other: list[float] = []
    native = AK_PY.exists() and AK.read_bytes()[:4] == b"\x7fELF"
    py_wall: list[float] = []
    cpu: dict[str, list[float]] = {"bare": [], "native": [], "python": []}
    other_env = {**env, "PYTHONPATH": str(args.against / "src")} if args.against else env
    subprocess.run([str(AK), "daemon", "start"], env=env, check=True, capture_output=True)
    try:
        run = [str(AK), "run", *FLAGS, "--", "true"]
        timed(run, 3, cwd=cwd, env=env, pause=1.0)  # the key's pool, and the bytecode caches
        timed([str(VENV_PY), "-c", "pass"], 3, cwd=cwd, env=env)
        other_run = [str(VENV_PY), str((args.against or ROOT) / "bin" / "agentkernel"),
                     "run", *FLAGS, "--", "true"]
        if args.against:
            timed(other_run, 3, cwd=cwd, env=other_env, pause=1.0)
        py_run = [str(AK_PY), *run[1:]]
        for _ in range(args.n):
            w, c = timed_run([str(VENV_PY), "-c", "pass"], cwd=cwd, env=env)
            bare.append(w)
            cpu["bare"].append(c)
            w, c = timed_run(run, cwd=cwd, env=env)
            time.sleep(args.pause)
            warm.append(w)
            cpu["native" if native else "python"].append(c)
            if native:
                w, c = timed_run(py_run, cwd=cwd, env=env)
                time.sleep(args.pause)
                py_wall.append(w)
                cpu["python"].append(c)
            if args.against:
                other += timed(other_run, 1, cwd=cwd, env=other_env, pause=args.pause)
        modules = our_imports(env, cwd)
    finally:
        subprocess.run([str(AK), "daemon", "stop"], env=env, capture_output=True, check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    st = stamp()
    base = pct(bare, 0.5)
    ratio = pct(warm, 0.5) / base
    md = [f"# CLI hot path {time.strftime('%Y%m%d-%H%M%S')}", "", *stamp_lines(st), "",
          f"Interleaved, {args.n} samples each; budget: warm run ≤ 2x bare python "
          f"({'met' if ratio <= 2 else 'NOT met'}: {ratio:.2f}x).", "", *TABLE_HEAD,
          summary("`python -c pass` (baseline)", bare, base),
          summary("warm `agentkernel run -- true` (CLI → daemon → pool)"
                  + (", native client" if native else ""), warm, base),
          *([summary("the same, Python client (agentkernel-py)", py_wall, base)]
            if native else []),
          *([summary(f"the same, CLI of {args.against}", other, base)] if other else []), "",
          "CPU ms (user+sys) of the client process, p50 [p5-p95]: " + "; ".join(
              f"{k} {pct(v, 0.5):.1f} [{pct(v, 0.05):.1f}-{pct(v, 0.95):.1f}]"
              for k, v in cpu.items() if v), "",
          f"Our modules on the Python hot path ({len(modules)}): " + ", ".join(modules)]
    text = "\n".join(md) + "\n"
    print(text)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    name = f"cli-{time.strftime('%Y%m%d-%H%M%S')}"
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(
        {"stamp": st, "bare_ms": bare, "warm_ms": warm, "ratio_p50": ratio,
         "native": native, "python_client_ms": py_wall, "cpu_ms": cpu,
         "against": str(args.against) if args.against else None, "against_ms": other,
         "modules": modules}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
