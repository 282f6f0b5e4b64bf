"""What the benchmarks share: timing a command n times, and percentiles of the samples."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def pct(samples: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of `samples`; 0.0 for none."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def timed(argv: list[str], n: int, *, cwd: Path, env: dict[str, str] | None = None,
          pause: float = 0.0) -> list[float]:
    """Wall milliseconds of `n` runs of `argv`; a failed run ends the benchmark.

    `pause` sleeps between runs, e.g. so that a daemon's pool refills and each run measures
    a warm start.
    """
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        r = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
        samples.append((time.perf_counter() - t) * 1000)
        if r.returncode != 0:
            raise SystemExit(f"{argv[:4]} failed: {r.stderr.decode(errors='replace')[-300:]}")
        if pause:
            time.sleep(pause)
    return samples
