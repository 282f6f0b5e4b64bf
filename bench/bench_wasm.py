"""Benchmark the wasm backend: a small WASI module, cold and warm, next to baselines.

What the words mean here:
- **warm**: through the daemon socket (no CLI process), the module compiled and loaded in
  a worker that is ready (sandbox up, wasmtime imported, engine made): one job, a new
  Store and instance. Back to back, and paced (a pause before each run, so every thread
  on the path has gone to sleep).
- **cold, new module**: through the daemon socket, a module never seen before (each
  sample a different one): compiled by the daemon (its engine made already), cached,
  shipped to a ready worker, run.
- **cold, new project**: through the daemon socket, a project dir it has not served: no
  worker for that pool key, so one starts (sandbox, interpreter, wasmtime import).
- **cold CLI**: `agentkernel run hello.wat` with no daemon: the whole process, its worker
  started for it; with the `.cwasm` cache warm, and with it empty.
Baselines in the same run: `python -c pass` (the interpreter every CLI run pays), `python
-c 'import wasmtime'` (what every worker start pays), `wasmtime run` if it is on PATH, and
namespaces `true` the same ways.

Writes bench/results/wasm-<time>.md (and .json), stamped (commit, machine, load).

With `--baseline-tree DIR` (another checkout with its own .venv, e.g. /work/main) only the
daemon cases run (warm, and cold with a new module), over both trees' daemons in turns,
with CPU per warm run: before and after in one run.

Usage: .venv/bin/python bench/bench_wasm.py [-n 30] [--baseline-tree /work/main [--paced-only]]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import TABLE_HEAD, pct, stamp, stamp_lines, summary, timed

ROOT = Path(__file__).resolve().parent.parent
VENV_PY = ROOT / ".venv" / "bin" / "python"
AK = ROOT / ".venv" / "bin" / "agentkernel"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
PACE = 0.2  # seconds before each paced sample


def socket_run(req: dict[str, Any], sock_path: str | None = None) -> float:
    """Milliseconds of one run over the daemon socket (ours, or the one at `sock_path`),
    as our client speaks it."""
    from agentkernel.ipc import client

    t = time.perf_counter()
    if sock_path is None:
        lines = client.open_stream("run", req, auto_start=False)
    else:
        import socket

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(sock_path)
        lines = client.Lines(sock)
        lines.send({"op": "run", "args": req})
    if lines is None:
        raise SystemExit("daemon not running")
    result = client.pump(lines, sink=lambda _s, _d: None)
    lines.sock.close()
    took = (time.perf_counter() - t) * 1000
    if result.get("exit_code") != 0:
        raise SystemExit(f"socket run failed: {result}")
    return took


def socket_samples(n: int, req: dict[str, Any], pause: float = 0.0) -> list[float]:
    samples = []
    for _ in range(n):
        if pause:
            time.sleep(pause)
        samples.append(socket_run(req))
    return samples


def new_modules(n: int, proj: Path, template: str) -> list[float]:
    """Each sample a module never compiled: the hello module with a data segment of its own."""
    samples = []
    for i in range(n):
        time.sleep(PACE)
        samples.append(socket_run({"argv": [new_module(proj, template, i)], "cwd": str(proj)}))
    return samples


def new_module(proj: Path, template: str, i: int) -> str:
    """The name of a module never seen before, written into `proj`."""
    name = f"new{i}.wat"
    marker = os.urandom(8).hex()
    (proj / name).write_text(template.replace("(memory", f'(data (i32.const 4000) '
                                              f'"{marker}") (memory', 1))
    return name


def new_projects(n: int, top: Path, module: str) -> list[float]:
    """Each sample a project dir the daemon has not served: its worker starts for it."""
    samples = []
    for i in range(n):
        proj = top / f"proj{i}"
        proj.mkdir()
        (proj / "hello.wat").write_text(module)
        time.sleep(PACE)
        samples.append(socket_run({"argv": ["hello.wat"], "cwd": str(proj)}))
    return samples


def tree_cpu_ms(root: int) -> float:
    """CPU time (user + system) of `root` and every process under it, in ms, with that of
    the processes they reaped (a compiler child's, once it ended)."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        ticks[int(entry)] = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    total = 0
    for pid, tick in ticks.items():
        p = pid
        while p > 1 and p != root:
            p = parents.get(p, 0)
        total += tick if p == root else 0
    return total * 1000 / os.sysconf("SC_CLK_TCK")


def cpu_per_run(n: int, req: dict[str, Any], daemon_pid: int) -> tuple[float, float]:
    """CPU ms per warm run, back to back: the daemon with its sandboxes, and this client.
    Unlike wall time, barely moved by other work on the machine."""
    import resource

    def own() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return (r.ru_utime + r.ru_stime) * 1000

    server, mine = tree_cpu_ms(daemon_pid), own()
    socket_samples(n, req)
    return (tree_cpu_ms(daemon_pid) - server) / n, (own() - mine) / n


class Daemon:
    """A tree's daemon with private dirs, the hello module in a project of its own, and
    its warm-run samples and CPU (the daemon with its sandboxes, per run)."""

    def __init__(self, tree: Path, top: Path, tag: str) -> None:
        from wasm_modules import HELLO

        self.tree, self.tag, self.dir = tree, tag, top / tag
        (self.dir / "run").mkdir(parents=True, mode=0o700)
        (self.dir / "proj").mkdir()
        (self.dir / "proj" / "hello.wat").write_text(HELLO)
        self.env = {**os.environ, "AGENTKERNEL_HOME": str(self.dir / "home"),
                    "AGENTKERNEL_RUNTIME_DIR": str(self.dir / "run"),
                    "AGENTKERNEL_DAEMON_AUTOSTART": "0"}
        self.env.pop("AGENTKERNEL_NO_DAEMON", None)
        subprocess.run([str(tree / ".venv" / "bin" / "agentkernel"), "daemon", "start"],
                       env=self.env, check=True, capture_output=True)
        self.pid = int((self.dir / "run" / "daemon.pid").read_text().split()[0])
        self.sock = str(self.dir / "run" / "daemon.sock")
        self.req = {"argv": ["hello.wat"], "cwd": str(self.dir / "proj")}
        self.b2b: list[float] = []
        self.paced: list[float] = []
        self.new: list[float] = []  # cold: a module never seen, compiled and run
        self.cpu: list[float] = []  # ms per run, per block
        self.new_cpu: list[float] = []  # ms per new module (see `versus`)
        self._snap: float | None = None

    def new_cpu_mark(self, start: bool) -> None:
        """CPU of a new module's run, from its start (`start`) to the next mark, PACE or
        more later: its compile and run, and the next compiler child made ready."""
        now = tree_cpu_ms(self.pid)
        if self._snap is not None:
            self.new_cpu.append(now - self._snap)
        self._snap = now if start else None

    def block(self, n: int) -> None:
        before = tree_cpu_ms(self.pid)
        self.b2b += [socket_run(self.req, self.sock) for _ in range(n)]
        self.cpu.append((tree_cpu_ms(self.pid) - before) / n)

    def stop(self) -> None:
        subprocess.run([str(self.tree / ".venv" / "bin" / "agentkernel"), "daemon", "stop"],
                       env=self.env, check=False, capture_output=True)


def versus(baseline: Path, n: int, top: Path, paced_only: bool = False) -> list[str]:
    """Warm runs over two trees' daemons in turns (back-to-back blocks of 25, paced runs
    one by one, each followed by a new module's): the same load meets both. Rows for each,
    with CPU per run. `paced_only`: the paced warm runs alone, each tree first in turn."""
    daemons = [Daemon(baseline, top, "baseline"), Daemon(ROOT, top, "this")]
    try:
        for d in daemons:
            for _ in range(3):  # the pool key, its worker, the daemon's compiling engine
                time.sleep(1.0)
                socket_run(d.req, d.sock)
        time.sleep(2.0)
        for _ in range(0 if paced_only else max(3, n // 25)):
            for d in daemons:
                d.block(25)
        from wasm_modules import HELLO

        for i in range(n):
            for d in daemons if i % 2 == 0 else daemons[::-1]:
                time.sleep(PACE)
                if not paced_only:
                    d.new_cpu_mark(start=False)
                d.paced.append(socket_run(d.req, d.sock))
                if paced_only:
                    continue
                time.sleep(PACE)
                proj = Path(str(d.req["cwd"]))
                name = new_module(proj, HELLO, i)
                d.new_cpu_mark(start=True)
                d.new.append(socket_run({"argv": [name], "cwd": str(proj)}, d.sock))
        if not paced_only:
            time.sleep(PACE)
            for d in daemons:
                d.new_cpu_mark(start=False)
    finally:
        for d in daemons:
            d.stop()
    base = {what: pct(getattr(daemons[0], what) or [0.0], 0.5)
            for what in ("b2b", "paced", "new")}
    rows = []
    labels = (("b2b", "**warm** over the daemon socket, back to back (blocks of 25)"),
              ("paced", f"**warm** over the daemon socket, paced ({PACE} s apart)"),
              ("new", "**cold, new module** over the daemon socket (compile + run, worker "
                      "ready), paced"))
    for what, label in labels:
        if paced_only and what != "paced":
            continue
        for d in daemons:
            rows.append(summary(f"{d.tag} `{tree_commit(d.tree)}`: {label}",
                                getattr(d, what), base[what]))
    if paced_only:
        return rows
    cpu = [f"- {d.tag}: CPU per warm run back to back (daemon + its sandboxes, clock ticks "
           f"over {25 * len(d.cpu)} runs): {sum(d.cpu) / len(d.cpu):.2f} ms; per block of 25 "
           f"{min(d.cpu):.2f} to {max(d.cpu):.2f} ms" for d in daemons]
    cpu += [f"- {d.tag}: CPU per new module (daemon + its sandboxes + its compiler "
            f"processes, from the run's start to {PACE} s after it: the compile, the run, "
            f"the next compiler child made ready; clock ticks): p50 "
            f"{pct(d.new_cpu, 0.5):.1f} ms, mean {sum(d.new_cpu) / len(d.new_cpu):.1f} ms "
            f"over {len(d.new_cpu)}" for d in daemons if d.new_cpu]
    return [*rows, "", *cpu]


def tree_commit(tree: Path) -> str:
    r = subprocess.run(["git", "-C", str(tree), "describe", "--always", "--dirty",
                        "--abbrev=12"], capture_output=True, text=True, check=False)
    return r.stdout.strip() or str(tree)


def wasmtime_cli(n: int, proj: Path, env: dict[str, str]) -> list[float] | None:
    exe = shutil.which("wasmtime")
    if exe is None:
        return None
    return timed([exe, "run", str(proj / "hello.wasm")], n, cwd=proj, env=env)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=30)
    ap.add_argument("--baseline-tree", type=Path, default=None,
                    help="another checkout with its own .venv (e.g. /work/main): only the daemon "
                         "cases, both trees' daemons asked in turns")
    ap.add_argument("--paced-only", action="store_true",
                    help="with --baseline-tree: the paced warm runs only (more of them in "
                         "the same time)")
    args = ap.parse_args()
    n = args.n
    if args.baseline_tree is not None:
        return main_versus(args.baseline_tree, n, args.paced_only)
    import wasmtime

    from wasm_modules import HELLO

    tmp = Path(tempfile.mkdtemp(prefix="ak-bench-wasm-"))
    (tmp / "run").mkdir(mode=0o700)
    proj = tmp / "proj"
    proj.mkdir()
    (proj / "hello.wat").write_text(HELLO)
    (proj / "hello.wasm").write_bytes(bytes(wasmtime.wat2wasm(HELLO)))
    env = {**os.environ, "AGENTKERNEL_HOME": str(tmp / "home"),
           "AGENTKERNEL_RUNTIME_DIR": str(tmp / "run"), "AGENTKERNEL_DAEMON_AUTOSTART": "0",
           "PYTHONPATH": str(ROOT / "src")}
    os.environ.update({k: env[k] for k in ("AGENTKERNEL_HOME", "AGENTKERNEL_RUNTIME_DIR")})
    cache = tmp / "home" / "wasm-cache"
    no_daemon = {**env, "AGENTKERNEL_NO_DAEMON": "1"}
    ns_true = [str(AK), "run", "-q", "-B", "namespaces", "-p", "moderate", "--", "true"]
    hello = [str(AK), "run", "hello.wat"]
    cases: list[tuple[str, list[float] | None]] = []
    cpu = (0.0, 0.0)
    st = stamp()  # before the runs: the commit measured, the load it met
    try:
        cases.append(("baseline: venv `python -c pass`",
                      timed([str(VENV_PY), "-c", "pass"], n, cwd=proj, env=env)))
        cases.append(("baseline: venv `python -c 'import wasmtime'` (each worker start)",
                      timed([str(VENV_PY), "-c", "import wasmtime"], n, cwd=proj, env=env)))
        cases.append(("baseline: `wasmtime run hello.wasm` (CLI on PATH)",
                      wasmtime_cli(n, proj, env)))
        cases.append(("baseline: `agentkernel run -B namespaces -- true`, no daemon",
                      timed(ns_true, n, cwd=proj, env=no_daemon)))
        timed(hello, 1, cwd=proj, env=no_daemon)  # fills the cache
        cases.append(("cold CLI `agentkernel run hello.wat`, no daemon, .cwasm cache warm",
                      timed(hello, n, cwd=proj, env=no_daemon)))
        miss = []
        for _ in range(n):
            shutil.rmtree(cache, ignore_errors=True)
            miss += timed(hello, 1, cwd=proj, env=no_daemon)
        cases.append(("cold CLI `agentkernel run hello.wat`, no daemon, cache empty", miss))

        subprocess.run([str(AK), "daemon", "start"], env=env, check=True, capture_output=True)
        req = {"argv": ["hello.wat"], "cwd": str(proj)}
        socket_samples(3, req, pause=1.0)  # the pool key, its worker, the daemon's engine
        time.sleep(2.0)  # the pool's refills after the first runs settle
        cases.append(("**warm** over the daemon socket, back to back", socket_samples(n, req)))
        cases.append((f"**warm** over the daemon socket, paced ({PACE} s apart)",
                      socket_samples(n, req, pause=PACE)))
        daemon_pid = int((tmp / "run" / "daemon.pid").read_text().split()[0])
        cpu = cpu_per_run(max(100, 3 * n), req, daemon_pid)
        cases.append(("**cold, new module** over the daemon socket (compile + run, "
                      "worker ready)", new_modules(n, proj, HELLO)))
        cases.append(("cold, new project dir over the daemon socket (its worker starts)",
                      new_projects(min(n, 8), tmp, HELLO)))
        cases.append(("whole CLI `agentkernel run hello.wat` through the daemon",
                      timed(hello, n, cwd=proj, env=env, pause=PACE)))
        ns_req = {"argv": ["true"], "cwd": str(proj), "backend": "namespaces",
                  "profile": "moderate"}
        socket_samples(3, ns_req, pause=1.0)
        cases.append(("baseline: namespaces `true` over the daemon socket, paced",
                      socket_samples(n, ns_req, pause=PACE)))
        cases.append(("baseline: `agentkernel run -B namespaces -- true` through the daemon",
                      timed(ns_true, n, cwd=proj, env=env, pause=PACE)))
    finally:
        subprocess.run([str(AK), "daemon", "stop"], env=env, check=False, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    from agentkernel.backends.wasm import wasmtime_version

    st["load after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    st["wasmtime"] = f"wasmtime-py {wasmtime_version()}"
    base = pct(cases[0][1] or [], 0.5)
    when = time.strftime("%Y%m%d-%H%M%S")
    md = [f"# wasm benchmark {when}", "", *stamp_lines(st), "",
          "The module is tests/wasm_modules.py's HELLO (writes a line to stdout, one to "
          "stderr, reads argv). Definitions of cold and warm: bench/bench_wasm.py's "
          "docstring. Ratios are to `python -c pass`.", "", *TABLE_HEAD]
    for label, samples in cases:
        if samples is None:
            md.append(f"| {label} | - | absent | | |")
        else:
            md.append(summary(label, samples, base))
    md += ["", f"CPU per warm run over the socket, back to back (clock ticks summed over "
           f"{max(100, 3 * n)} runs): daemon + its sandboxes {cpu[0]:.2f} ms, client "
           f"{cpu[1]:.2f} ms."]
    text = "\n".join(md) + "\n"
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"wasm-{when}.md").write_text(text)
    (out_dir / f"wasm-{when}.json").write_text(json.dumps(
        {"stamp": st, "n": n, "cases": {label: s for label, s in cases},
         "cpu_ms_per_warm_run": {"daemon_and_sandboxes": cpu[0], "client": cpu[1]}},
        indent=1))
    print(text)
    return 0


def main_versus(baseline: Path, n: int, paced_only: bool = False) -> int:
    st = stamp()
    top = Path(tempfile.mkdtemp(prefix="ak-bench-wasm-"))
    try:
        rows = versus(baseline, n, top, paced_only)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    st["load after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    when = time.strftime("%Y%m%d-%H%M%S")
    text = "\n".join([f"# wasm warm runs, two trees in turns {when}", "", *stamp_lines(st),
                      "", "Ratios: p50 over the baseline tree's p50 of the same case, this "
                      "run.", "", *TABLE_HEAD, *rows]) + "\n"
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"wasm-versus-{when}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
