"""What the benchmarks share: timing a command n times, percentiles, and the run's stamp."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The tools whose versions change what a benchmark measures: argv for a version line.
TOOLS: dict[str, list[str]] = {
    "bwrap": ["bwrap", "--version"],
    "runsc": ["runsc", "--version"],
    "slirp4netns": ["slirp4netns", "--version"],
    "qemu": ["qemu-system-x86_64", "--version"],
}


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


def timed_run(argv: list[str], *, cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """Wall ms of one run of `argv`, and the CPU ms (user+sys) of its reaped process tree;
    SystemExit with the tail of its stderr if it failed."""
    import tempfile

    with tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = (time.perf_counter() - t) * 1000
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(max(0, err.seek(0, os.SEEK_END) - 300))
            raise SystemExit(f"{argv[:4]} failed with {proc.returncode}: "
                             f"{err.read().decode(errors='replace')}")
    return wall, (usage.ru_utime + usage.ru_stime) * 1000


def _first_line(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "absent"
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = (r.stdout or r.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _commit() -> str:
    try:
        r = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty",
                            "--abbrev=12"], capture_output=True, text=True, timeout=10,
                           check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return r.stdout.strip() or "unknown"


def stamp() -> dict[str, str]:
    """Where and with what a benchmark ran: commit, kernel, CPU, load, tool versions."""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    out = {"commit": _commit(), "kernel": platform.release(),
           "cpu": f"{_cpu_model()} x{os.cpu_count()}", "load": load,
           "python": sys.version.split()[0], "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    for name, argv in TOOLS.items():
        out[name] = _first_line(argv)
    return out


def stamp_lines(st: dict[str, str]) -> list[str]:
    """The stamp as markdown lines for a report's head."""
    return [f"- {k}: {v}" for k, v in st.items()]


def summary(label: str, samples: list[float], base: float | None = None) -> str:
    """One markdown table row: label, n, p50, p95 and the p50 ratio to `base`."""
    ratio = f"{pct(samples, 0.5) / base:.2f}x" if base else "-"
    return (f"| {label} | {len(samples)} | {pct(samples, 0.5):.1f} | {pct(samples, 0.95):.1f}"
            f" | {ratio} |")


# A client that stays up and times `run` requests over the daemon socket (the daemon's
# share of a run): argv[1] the request (JSON); each stdin line `[n, pause]` asks for n
# runs, `pause` seconds before each, and is answered with their milliseconds (JSON).
SOCKET_RUN_CLIENT = """
import json, sys, time
from agentkernel.ipc import client
req = json.loads(sys.argv[1])
for line in sys.stdin:
    n, pause = json.loads(line)
    out = []
    for _ in range(n):
        time.sleep(pause)
        t = time.perf_counter()
        r = client.pump(client.open_stream('run', req, auto_start=False),
                        sink=lambda _s, _d: None)
        out.append((time.perf_counter() - t) * 1000)
        assert r.get('exit_code') == 0, r
    print(json.dumps(out), flush=True)
"""

TABLE_HEAD = ["| case | n | p50 ms | p95 ms | p50 / baseline |", "|---|---:|---:|---:|---:|"]


def pool_counts(ak: Path, env: dict[str, str],
                keys: tuple[str, ...] = ("hits", "waited", "misses")) -> dict[str, int]:
    """The pool's counters summed over every key (`daemon status --json`); a counter the
    tree does not report counts -1 per key."""
    r = subprocess.run([str(ak), "daemon", "status", "--json"], env=env, capture_output=True,
                       text=True, check=False)
    try:
        pools = json.loads(r.stdout).get("pools") or []
    except json.JSONDecodeError:
        return {}
    return {k: sum(int(p.get(k, -1)) for p in pools) for k in keys}
