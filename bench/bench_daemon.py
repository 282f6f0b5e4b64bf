"""Benchmark the daemon: cold vs warm `run`, `exec`, concurrent throughput, idle memory.

All cases run in one go against a private daemon (own data/runtime dirs, namespaces backend,
`--image host`) and are compared with a bare venv `python -c pass` measured in the same run.
Writes bench/results/daemon-<time>.md (and .json).

Usage: .venv/bin/python bench/bench_daemon.py [-n 30] [--duration 15] [--clients 1,8,32]
                                              [--profile moderate]
The issue asks for 60 s per throughput level; the default is 15 s to keep a run short.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import pct, timed

ROOT = Path(__file__).resolve().parent.parent
VENV_PY = ROOT / ".venv" / "bin" / "python"
AK = ROOT / ".venv" / "bin" / "agentkernel"
sys.path.insert(0, str(ROOT / "src"))


def warm_run_samples(n: int, *, env: dict[str, str], cwd: Path, flags: list[str],
                     pause: float) -> tuple[list[float], int]:
    """`agentkernel run --json -- true` through the daemon; also counts pool hits."""
    samples, hits = [], 0
    for _ in range(n):
        t = time.perf_counter()
        r = subprocess.run([str(AK), "run", "--json", *flags, "--", "true"], cwd=cwd, env=env,
                           stdin=subprocess.DEVNULL, capture_output=True, check=False)
        samples.append((time.perf_counter() - t) * 1000)
        if r.returncode != 0:
            raise SystemExit(f"warm run failed: {r.stderr.decode(errors='replace')[-300:]}")
        hits += bool(json.loads(r.stdout).get("pooled"))
        time.sleep(pause)
    return samples, hits


def socket_run(req: dict[str, Any]) -> int:
    """One `run` over the daemon socket (no CLI process): the exit code."""
    from agentkernel.ipc import client

    lines = client.open_stream("run", req, auto_start=False)
    if lines is None:
        raise RuntimeError("daemon not running")
    result = client.pump(lines, sink=lambda _s, _d: None)
    return int(result.get("exit_code", 125))


def throughput(clients: int, duration: float, req: dict[str, Any]) -> dict[str, Any]:
    """`clients` threads running fresh sandboxes back to back for `duration` seconds."""
    lat: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def worker() -> None:
        while time.monotonic() < stop_at:
            t = time.perf_counter()
            try:
                code = socket_run(req)
                err = None if code == 0 else f"exit {code}"
            except Exception as exc:
                err = f"{type(exc).__name__}: {exc}"
            with lock:
                if err is None:
                    lat.append((time.perf_counter() - t) * 1000)
                else:
                    failures.append(err)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    return {"clients": clients, "ok": len(lat), "failed": len(failures),
            "per_s": len(lat) / elapsed, "p50": pct(lat, 0.5), "p95": pct(lat, 0.95),
            "errors": sorted(set(failures))[:5]}


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def idle_pss(home: Path) -> list[dict[str, Any]]:
    """PSS of each warm pool sandbox: its backend process tree plus its helpers."""
    db = sqlite3.connect(str(home / "state.db"))
    rows = db.execute("SELECT name, pid, helpers FROM ephemeral").fetchall()
    db.close()
    out = []
    for name, pid, helpers in rows:
        if not pid:
            continue
        procs = _descendants(pid)
        helper_pids = [h[0] for h in json.loads(helpers or "[]")]
        for h in helper_pids:
            procs.extend(_descendants(h))
        total = sum(pss_kib(p) for p in procs)
        out.append({"name": name, "processes": len(procs), "pss_kib": total,
                    "sandbox_only_kib": sum(pss_kib(p) for p in _descendants(pid))})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=30, help="samples per latency case")
    ap.add_argument("--duration", type=float, default=15.0,
                    help="seconds per throughput level (the issue's figure is 60)")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--profile", default="moderate")
    ap.add_argument("--pause", type=float, default=0.1,
                    help="seconds between warm runs, so the pool can refill")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ak-bench-daemon-"))
    (tmp / "run").mkdir(mode=0o700)
    (tmp / "proj").mkdir()
    (tmp / "daemon.toml").write_text(
        "[daemon]\npool_min = 2\npool_max = 32\nadhoc_min = 2\n"
        f'pools = [{{image = "host", profile = "{args.profile}", backend = "namespaces"}}]\n')
    env = {**os.environ, "AGENTKERNEL_HOME": str(tmp / "home"),
           "AGENTKERNEL_RUNTIME_DIR": str(tmp / "run"),
           "AGENTKERNEL_DAEMON_CONFIG": str(tmp / "daemon.toml")}
    os.environ.update({k: env[k] for k in ("AGENTKERNEL_HOME", "AGENTKERNEL_RUNTIME_DIR",
                                           "AGENTKERNEL_DAEMON_CONFIG")})
    flags = ["-i", "host", "-B", "namespaces", "-p", args.profile]
    cwd = tmp / "proj"
    n = args.n
    results: dict[str, Any] = {"n": n, "profile": args.profile, "duration": args.duration}
    try:
        # Baseline and cold path first, with no daemon up.
        bare = timed([str(VENV_PY), "-c", "pass"], n, env=env, cwd=cwd)
        cold = timed([str(AK), "run", *flags, "--", "true"], n,
                     env={**env, "AGENTKERNEL_NO_DAEMON": "1"}, cwd=cwd)
        subprocess.run([str(AK), "daemon", "start"], env=env, check=True,
                       capture_output=True)
        # The first run in a project dir makes its pool key; then wait for it to fill.
        subprocess.run([str(AK), "run", *flags, "--", "true"], env=env, cwd=cwd, check=True,
                       capture_output=True)
        time.sleep(1.0)
        warm, hits = warm_run_samples(n, env=env, cwd=cwd, flags=flags, pause=args.pause)
        subprocess.run([str(AK), "create", "bench", *flags], env=env, check=True,
                       capture_output=True)
        exec_cli = timed([str(AK), "exec", "bench", "--", "true"], n, env=env, cwd=cwd)
        # The same without a CLI process: what the daemon itself costs per request.
        from agentkernel.ipc import client

        req = {"argv": ["true"], "image": "host", "profile": args.profile,
               "backend": "namespaces"}
        sock_warm = []
        for _ in range(n):
            t = time.perf_counter()
            socket_run(req)
            sock_warm.append((time.perf_counter() - t) * 1000)
            time.sleep(args.pause)
        sock_exec = []
        for _ in range(n):
            t = time.perf_counter()
            lines = client.open_stream("exec", {"name": "bench", "argv": ["true"]},
                                       auto_start=False)
            assert lines is not None
            client.pump(lines, sink=lambda _s, _d: None)
            sock_exec.append((time.perf_counter() - t) * 1000)
        time.sleep(2.0)
        memory = idle_pss(tmp / "home")
        levels = [throughput(int(c), args.duration, req) for c in args.clients.split(",")]
        subprocess.run([str(AK), "remove", "bench"], env=env, check=False, capture_output=True)
    finally:
        subprocess.run([str(AK), "daemon", "stop"], env=env, check=False, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    base = pct(bare, 0.5)
    cases = [("bare venv `python -c pass`", bare),
             ("cold `agentkernel run -- true` (in-process, no daemon)", cold),
             ("warm `agentkernel run -- true` (CLI → daemon → pool)", warm),
             ("`agentkernel exec bench -- true` (persistent sandbox)", exec_cli),
             ("warm run over the socket, no CLI process", sock_warm),
             ("exec over the socket, no CLI process", sock_exec)]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    md = [f"# Daemon benchmark {stamp}", "",
          f"Namespaces backend, `--image host`, profile `{args.profile}`, {n} samples per "
          f"latency case, {os.cpu_count()} CPUs. Warm runs pause {args.pause:g}s between "
          f"samples so the pool refills; {hits}/{n} warm CLI runs were served from the pool.",
          "", "| case | p50 ms | p95 ms | p50 / bare python |", "|---|---:|---:|---:|"]
    for label, samples in cases:
        md.append(f"| {label} | {pct(samples, 0.5):.1f} | {pct(samples, 0.95):.1f} | "
                  f"{pct(samples, 0.5) / base:.2f}x |")
    md += ["", f"## Throughput (fresh sandbox per run, {args.duration:g}s per level, "
               "clients on the daemon socket)", "",
           "| clients | runs/s | ok | failed | p50 ms | p95 ms |",
           "|---:|---:|---:|---:|---:|---:|"]
    for lv in levels:
        md.append(f"| {lv['clients']} | {lv['per_s']:.1f} | {lv['ok']} | {lv['failed']} | "
                  f"{lv['p50']:.1f} | {lv['p95']:.1f} |")
        if lv["errors"]:
            md.append(f"|  | errors: {'; '.join(lv['errors'])} | | | | |")
    md += ["", "## Idle memory per warm sandbox (PSS, /proc/*/smaps_rollup)", "",
           "| sandbox | processes | PSS KiB (with helpers) | PSS KiB (sandbox tree only) |",
           "|---|---:|---:|---:|"]
    for m in memory:
        md.append(f"| {m['name']} | {m['processes']} | {m['pss_kib']} | "
                  f"{m['sandbox_only_kib']} |")
    text = "\n".join(md) + "\n"
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"daemon-{stamp}.md").write_text(text)
    results.update({"cases": {label: s for label, s in cases}, "throughput": levels,
                    "memory": memory, "pool_hits": hits})
    (out_dir / f"daemon-{stamp}.json").write_text(json.dumps(results, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
