"""Warm `agentkernel run -- true` through a running daemon against `python -c pass`, interleaved.

The issue's budget is a ratio (warm run ≤ 2x bare python), so both are sampled in turns
(python, run, python, run, ...) from the same load on a shared machine; also which of our
modules the run imports (the hot path's import budget, docs/architecture.md).
Writes bench/results/cli-<time>.{json,md}.
Usage: .venv/bin/python bench/bench_cli.py [-n 40] [--pause 0.3]
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

from common import TABLE_HEAD, pct, stamp, stamp_lines, summary, timed

ROOT = Path(__file__).resolve().parent.parent
VENV_PY = ROOT / ".venv" / "bin" / "python"
AK = ROOT / ".venv" / "bin" / "agentkernel"
FLAGS = ["-q", "-i", "host", "-B", "namespaces", "-p", "restrictive"]


def our_imports(env: dict[str, str], cwd: Path) -> list[str]:
    """The agentkernel modules one warm run loads (python -X importtime)."""
    out = subprocess.run([str(VENV_PY), "-X", "importtime", "-m", "agentkernel", "run",
                          *FLAGS, "--", "true"], env=env, cwd=cwd, capture_output=True,
                         text=True, check=True)
    names = (line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines()
             if line.startswith("import time:"))
    return sorted(n for n in names if n == "agentkernel" or n.startswith("agentkernel."))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=40, help="samples of each")
    ap.add_argument("--pause", type=float, default=0.3,
                    help="seconds after each run, so the pool refills (warm, not cold)")
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
    subprocess.run([str(AK), "daemon", "start"], env=env, check=True, capture_output=True)
    try:
        run = [str(AK), "run", *FLAGS, "--", "true"]
        timed(run, 3, cwd=cwd, env=env, pause=1.0)  # the key's pool, and the bytecode caches
        timed([str(VENV_PY), "-c", "pass"], 3, cwd=cwd, env=env)
        for _ in range(args.n):
            bare += timed([str(VENV_PY), "-c", "pass"], 1, cwd=cwd, env=env)
            warm += timed(run, 1, cwd=cwd, env=env, pause=args.pause)
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
          summary("warm `agentkernel run -- true` (CLI → daemon → pool)", warm, base), "",
          f"Our modules on the hot path ({len(modules)}): " + ", ".join(modules)]
    text = "\n".join(md) + "\n"
    print(text)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    name = f"cli-{time.strftime('%Y%m%d-%H%M%S')}"
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(
        {"stamp": st, "bare_ms": bare, "warm_ms": warm, "ratio_p50": ratio,
         "modules": modules}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
