"""Benchmark the warm pool through the HTTP API: back-to-back and concurrent `POST /run -- true`.

One private `agentkernel serve` (own data/runtime dirs, a configured namespaces pool) and,
in the same run, the baselines a warm run is compared with: bare fork/exec, a bare bwrap
start (the floor of a fresh sandbox here), venv `python -c pass`.

Cases (issue 10's "Performance"):
- 100 back-to-back warm `POST /run -- true` from one client (keep-alive): p50/p95, and how
  many found the pool empty (the pool's own hit/miss counters). Twice: the first burst
  (the pool at the size a few paced runs left it), then, once the pool is back at the
  size it aims for (what that burst taught it, within its caps), the next burst;
- the same with a pause between requests (the pool always refilled: the warm path alone);
- N concurrent clients for D seconds: fresh sandboxes/s, failures, p50/p95;
- warm `agentkernel run -- true` through the CLI vs `python -c pass` (goal <= 2x);
- CPU ms per fresh sandbox (start, teardown, every helper process) of each tree, for the
  profile and `restrictive`, in fresh processes interleaved: less noisy than wall time on
  a shared machine.

Usage: .venv/bin/python bench/bench_pool.py [-n 100] [--clients 1,4,16] [--duration 10]
                                            [--profile moderate] [--pause-n 30]
                                            [--baseline-tree /work/main] [--cpu-rounds 3]
Writes bench/results/pool-<time>.{md,json} and prints the markdown.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import ROOT, TABLE_HEAD, pct, pool_counts, stamp, stamp_lines, summary, timed

VENV_PY = ROOT / ".venv" / "bin" / "python"
AK = ROOT / ".venv" / "bin" / "agentkernel"
KEY = "bench-" + os.urandom(8).hex()


class Api:
    """One keep-alive HTTP connection to the server, as an SDK holds one."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.conn.request("POST", path, json.dumps(body), self.headers)
        r = self.conn.getresponse()
        data = r.read()
        return r.status, json.loads(data) if data else {}

    def close(self) -> None:
        self.conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])



def back_to_back(port: int, n: int, body: dict[str, Any], pause: float) -> list[float]:
    api = Api(port)
    samples = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            status, res = api.post("/run", body)
            samples.append((time.perf_counter() - t) * 1000)
            if status != 200 or (res.get("data") or {}).get("exit_code") != 0:
                raise SystemExit(f"POST /run failed: {status} {res}")
            if pause:
                time.sleep(pause)
    finally:
        api.close()
    return samples


def concurrent(port: int, clients: int, duration: float, body: dict[str, Any]
               ) -> dict[str, Any]:
    """`clients` connections running fresh sandboxes back to back for `duration` seconds."""
    lat: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def worker() -> None:
        api = Api(port)
        try:
            while time.monotonic() < stop_at:
                t = time.perf_counter()
                try:
                    status, res = api.post("/run", body)
                    code = (res.get("data") or {}).get("exit_code")
                    err = None if status == 200 and code == 0 else f"{status} {str(res)[:120]}"
                except Exception as exc:
                    err = f"{type(exc).__name__}: {exc}"
                    api.close()
                    api = Api(port)
                with lock:
                    if err is None:
                        lat.append((time.perf_counter() - t) * 1000)
                    else:
                        failures.append(err)
        finally:
            api.close()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    return {"clients": clients, "ok": len(lat), "failed": len(failures),
            "per_s": len(lat) / elapsed, "samples": lat, "errors": sorted(set(failures))[:5]}


def bare_bwrap() -> list[str]:
    """The cheapest sandbox bwrap makes here: the floor under any fresh sandbox."""
    return ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr",
            "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
            "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev",
            "/bin/true"]


def wait_health(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve exited: {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health", headers={"Authorization": f"Bearer {KEY}"})
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("serve did not answer /health")


def start_cpu(profile: str, n: int = 20, tree: Path = ROOT) -> dict[str, float]:
    """CPU milliseconds per sandbox, started and destroyed in this process (a private data
    dir): the daemon's own share (start, teardown) and its helpers' (bwrap, the agent,
    slirp4netns, iptables-restore, ...: every reaped child). Unlike wall time, this hardly
    depends on what else the machine runs."""
    import resource

    tmp = Path(tempfile.mkdtemp(prefix="ak-bench-cpu-"))
    (tmp / "run").mkdir(mode=0o700)
    saved = {k: os.environ.get(k) for k in ("AGENTKERNEL_HOME", "AGENTKERNEL_RUNTIME_DIR")}
    os.environ.update(AGENTKERNEL_HOME=str(tmp / "home"), AGENTKERNEL_RUNTIME_DIR=str(tmp / "run"))
    sys.path.insert(0, str(tree / "src"))
    from agentkernel.config import Config, DaemonSection
    from agentkernel.daemon.api import RunRequest
    from agentkernel.daemon.manager import SandboxManager

    def usage() -> tuple[float, float, float]:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
            resource.RUSAGE_CHILDREN)
        return (me.ru_utime + me.ru_stime,
                kids.ru_utime + kids.ru_stime + forkserver_cpu() + userns_server_cpu(),
                time.perf_counter())

    m = SandboxManager(Config(daemon=DaemonSection(pools=[], adhoc_min=0)))
    try:
        req = RunRequest(argv=["true"], image="host", profile=profile, backend="namespaces")
        key, plan = m._plan_run(req)
        backend, rootfs = plan.backend, plan.rootfs
        for _ in range(3):
            m._destroy_ephemeral(m._pool_start(key, backend, rootfs))
        a = usage()
        sandboxes = [m._pool_start(key, backend, rootfs) for _ in range(n)]
        b = usage()
        for sandbox in sandboxes:
            m._destroy_ephemeral(sandbox)
        time.sleep(1.5)  # the helpers' reaper threads; the fork server reaps each second
        c = usage()
    finally:
        m.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)
    return {"start_wall": (b[2] - a[2]) / n * 1000, "daemon_start": (b[0] - a[0]) / n * 1000,
            "daemon_destroy": (c[0] - b[0]) / n * 1000, "helpers": (c[1] - a[1]) / n * 1000}


def cpu_rounds(trees: list[tuple[str, Path]], profiles: list[str], rounds: int
               ) -> dict[str, dict[str, list[float]]]:
    """CPU ms per sandbox (start + teardown + helpers) of each tree and profile, measured
    in a fresh process each, interleaved `rounds` times: {tag: {profile: [total, ...]}}."""
    out: dict[str, dict[str, list[float]]] = {tag: {p: [] for p in profiles} for tag, _ in trees}
    for _ in range(rounds):
        for tag, tree in trees:
            for profile in profiles:
                r = subprocess.run([str(VENV_PY), __file__, "--cpu-json", str(tree),
                                    "--profile", profile], capture_output=True, text=True,
                                   timeout=600, check=False)
                try:
                    cpu = json.loads(r.stdout.strip().splitlines()[-1])
                except (ValueError, IndexError):
                    raise SystemExit(f"CPU run of {tag} failed: {r.stderr[-500:]}") from None
                out[tag][profile].append(
                    cpu["daemon_start"] + cpu["daemon_destroy"] + cpu["helpers"])
    return out


def forkserver_cpu() -> float:
    """CPU seconds of this process's egress-gate fork server and the gates it forked and
    reaped (they are not our children: getrusage does not see them); 0 without one."""
    try:
        from agentkernel import egress_forkserver
    except ImportError:
        return 0.0
    server = getattr(egress_forkserver, "_server", None)
    return 0.0 if server is None else _proc_cpu(server.proc.pid)[0]


def userns_server_cpu() -> float:
    """CPU seconds of this process's user namespace server (idmap: ak-enter
    --userns-server, kept, so not reaped yet) and the children it reaped; 0 without one."""
    try:
        from agentkernel import idmap
    except ImportError:
        return 0.0
    pid = getattr(getattr(idmap, "_SERVER", None), "pid", -1)
    return 0.0 if pid <= 0 else _proc_cpu(pid)[0]


def serve_cases(ak: Path, args: argparse.Namespace, tag: str) -> dict[str, Any]:
    """Every server case against `agentkernel serve` from `ak` (one tree's install)."""
    tmp = Path(tempfile.mkdtemp(prefix="ak-bench-pool-"))
    (tmp / "run").mkdir(mode=0o700)
    proj = tmp / "proj"
    proj.mkdir()
    (tmp / "daemon.toml").write_text(
        f"[daemon]\n{args.daemon_toml}\n"
        f'pools = [{{image = "host", profile = "{args.profile}", backend = "namespaces"}}]\n')
    env = {**os.environ, "AGENTKERNEL_HOME": str(tmp / "home"),
           "AGENTKERNEL_RUNTIME_DIR": str(tmp / "run"),
           "AGENTKERNEL_DAEMON_CONFIG": str(tmp / "daemon.toml"), "AGENTKERNEL_API_KEY": KEY}
    env.pop("AGENTKERNEL_NO_DAEMON", None)
    body = {"command": ["true"], "image": "host", "backend": "namespaces",
            "profile": args.profile}
    cases: dict[str, list[float]] = {}
    port = free_port()
    serve = subprocess.Popen([str(ak), "serve", "--port", str(port)], env=env, cwd=proj,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=open(tmp / "serve.log", "wb"))  # noqa: SIM115
    try:
        wait_health(port, serve)
        back_to_back(port, 3, body, 0.5)  # a first request, then let the pool fill
        time.sleep(1.0)
        wait_pool_target(ak, env)
        # The first burst finds the pool at the size a few paced runs left it; the next
        # one at the size the first taught it (within its caps).
        bursts = {}
        for which in ("first", "next"):
            bursts[which] = burst(ak, env, port, args.n, body, serve.pid)
            cases[f"{tag}: {args.n} back-to-back POST /run, {which} burst"] = \
                bursts[which].pop("samples")
        cases[f"{tag}: POST /run, {args.pause:g}s pause between"] = back_to_back(
            port, args.pause_n, body, args.pause)
        time.sleep(1.0)
        concs: list[dict[str, Any]] = []
        for clients in client_counts(args.clients):
            before_c = pool_counts(ak, env, ("misses", "warm"))
            cpu_before, own_before = tree_cpu(serve.pid), own_cpu(serve.pid)
            conc = concurrent(port, clients, args.duration, body)
            # Made before the case (a deep pool after a burst): neither counted as made
            # in it (`net_per_s`) nor in its CPU, which they flatter.
            conc["warm_before"] = max(0, before_c.get("warm", 0))
            conc["net_per_s"] = max(0, conc["ok"] - conc["warm_before"]) / args.duration
            conc["load"] = Path("/proc/loadavg").read_text().split()[0]  # others' work too
            cpu_after, own_after = tree_cpu(serve.pid), own_cpu(serve.pid)
            after_c = pool_counts(ak, env)
            conc["misses"] = delta(after_c, before_c)
            conc["cpu_ms"] = (cpu_after - cpu_before) * 1000 / max(1, conc["ok"])
            conc["own_ms"] = (own_after - own_before) * 1000 / max(1, conc["ok"])
            cases[f"{tag}: {clients} concurrent clients, per run"] = conc.pop("samples")
            concs.append(conc)
            time.sleep(1.0)
        time.sleep(1.0)
        argv = [str(ak), "run", "-q", "-i", "host", "-B", "namespaces", "-p", args.profile,
                "--", "true"]
        timed(argv, 3, cwd=proj, env=env, pause=0.5)  # the project dir's key, filled
        cases[f"{tag}: warm `agentkernel run -- true` (CLI)"] = timed(
            argv, args.cli_n, cwd=proj, env=env, pause=0.2)
    finally:
        serve.terminate()
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            serve.kill()
        log = (tmp / "serve.log").read_text(errors="replace")[-2000:]
        shutil.rmtree(tmp, ignore_errors=True)
    return {"cases": cases, "concs": concs, "log": log, "bursts": bursts}


def burst(ak: Path, env: dict[str, str], port: int, n: int, body: dict[str, Any], pid: int
          ) -> dict[str, Any]:
    """`n` back-to-back requests from the pool as it is now, then until it is back at
    its target: the latencies, how many started cold, the warm sandboxes before it and
    after its refill, the seconds that refill took, and CPU per run of the server's
    whole tree over both (the burst's runs, their refills and teardowns; more warm after
    than before, when the burst raised the target, reads high: those were paid too)."""
    before = pool_counts(ak, env, ("misses", "warm"))
    cpu = tree_cpu(pid)
    load = Path("/proc/loadavg").read_text().split()[0]  # others' work too
    samples = back_to_back(port, n, body, 0.0)
    misses = delta(pool_counts(ak, env), before)
    refilled = wait_pool_target(ak, env)
    time.sleep(1.0)  # the teardowns those runs left: theirs too
    return {"samples": samples, "misses": misses, "refilled": refilled,
            "warm": (before.get("warm", 0), pool_counts(ak, env, ("warm",)).get("warm", 0)),
            "cpu_ms": (tree_cpu(pid) - cpu) * 1000 / n, "load": load}


def wait_pool_target(ak: Path, env: dict[str, str], timeout: float = 15.0) -> float:
    """Wait until every pool key holds as many warm sandboxes as it aims for (its
    `target`, or it reports a start error) at two reads in a row; the seconds it took
    (inf: not within `timeout`). (A tree whose status read right after a burst gave the
    target before the burst's pause raised it passes the first read with a few warm.)"""
    began = time.monotonic()
    ok = 0
    while time.monotonic() - began < timeout:
        r = subprocess.run([str(ak), "daemon", "status", "--json"], env=env,
                           capture_output=True, text=True, check=False)
        try:
            pools = json.loads(r.stdout).get("pools") or []
        except json.JSONDecodeError:
            pools = []
        ok = ok + 1 if pools and all(
            p.get("warm", 0) >= p.get("target", 0) or p.get("last_error") for p in pools) else 0
        if ok == 2:
            return time.monotonic() - began
        time.sleep(0.2)
    return float("inf")


def _proc_cpu(pid: int) -> tuple[float, list[int]]:
    """CPU seconds of `pid` and of its reaped children, and its live children's pids."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0.0, []
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK"), [int(k) for k in kids]


def own_cpu(pid: int) -> float:
    """CPU seconds of the serving process itself (every thread of the daemon's Python,
    live or ended), without its children's."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU seconds of the serving process and every process under it, live or reaped (its
    sandboxes' bwrap and agents, the egress gates' fork server and the gates it reaped):
    what the server spends on runs, whatever else the machine runs meanwhile. Only the
    kernel's own workers (e.g. a network namespace's cleanup) are not counted."""
    total, todo, seen = 0.0, [pid], 0
    while todo and seen < 4096:
        cpu, kids = _proc_cpu(todo.pop())
        total += cpu
        todo += kids
        seen += 1
    return total


def delta(a: dict[str, int], b: dict[str, int]) -> str:
    """Pool misses between two counts (a after b)."""
    got = a.get("misses", -1), b.get("misses", -1)
    return "n/a" if min(got) < 0 else str(got[0] - got[1])


def client_counts(spec: str) -> list[int]:
    """--clients: one count or several, comma-separated (each a case of its own)."""
    return [int(c) for c in spec.split(",") if c.strip()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=100, help="back-to-back requests")
    ap.add_argument("--pause-n", type=int, default=30, help="requests with a pause")
    ap.add_argument("--pause", type=float, default=0.2)
    ap.add_argument("--clients", default="16",
                    help="concurrent clients; several comma-separated, e.g. 1,4,16")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--cli-n", type=int, default=20)
    ap.add_argument("--profile", default="moderate")
    ap.add_argument("--daemon-toml", default="", help="extra lines for [daemon]")
    ap.add_argument("--cpu-rounds", type=int, default=3,
                    help="interleaved CPU-per-sandbox runs per tree and profile")
    ap.add_argument("--cpu-json", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--baseline-tree", type=Path, default=None,
                    help="another checkout with its own .venv (e.g. /work/main): its server "
                         "is measured first, in the same run")
    args = ap.parse_args()
    if args.cpu_json is not None:  # one tree's CPU per sandbox, in this fresh process
        print(json.dumps(start_cpu(args.profile, tree=args.cpu_json)))
        return 0
    st = stamp()
    proj = Path(tempfile.mkdtemp(prefix="ak-bench-pool-proj-"))
    cases: dict[str, list[float]] = {}
    cases["fork/exec /bin/true"] = timed(["/bin/true"], 20, cwd=proj)
    cases["venv python -c pass"] = timed([str(VENV_PY), "-c", "pass"], 20, cwd=proj)
    if shutil.which("bwrap"):
        cases["bare bwrap start (floor of a fresh sandbox)"] = timed(bare_bwrap(), 20, cwd=proj)
    shutil.rmtree(proj, ignore_errors=True)
    cpu = start_cpu(args.profile)
    trees: list[tuple[str, Path]] = []
    if args.baseline_tree is not None:
        trees.append((f"baseline {tree_commit(args.baseline_tree)}",
                      args.baseline_tree / ".venv" / "bin" / "agentkernel"))
    trees.append(("this tree", AK))
    cpu_trees = [(tag, ak.parent.parent.parent) for tag, ak in trees]
    profiles = list(dict.fromkeys([args.profile, "restrictive"]))
    rounds = cpu_rounds(cpu_trees, profiles, args.cpu_rounds) if args.cpu_rounds else {}
    runs = {tag: serve_cases(ak, args, tag) for tag, ak in trees}
    base = pct(cases["venv python -c pass"], 0.5)
    bw = pct(cases.get("bare bwrap start (floor of a fresh sandbox)", []), 0.5)
    md = [f"# Warm pool benchmark {st['time']}", "", *stamp_lines(st), "",
          f"Namespaces backend, `--image host`, profile `{args.profile}`; ratios are to "
          f"venv `python -c pass` ({base:.1f} ms) measured in this run.", "", *TABLE_HEAD]
    md += [summary(label, samples, base) for label, samples in cases.items()]
    for run in runs.values():
        md += [summary(label, samples, base) for label, samples in run["cases"].items()]
    md.append("")
    for tag, run in runs.items():
        cli = pct(run["cases"][f"{tag}: warm `agentkernel run -- true` (CLI)"], 0.5)
        for which, b in run["bursts"].items():
            md.append(f"- {tag}: {which} burst of {args.n} back-to-back requests: "
                      f"{b['misses']} started cold, {b['warm'][0]} warm before it, "
                      f"{b['warm'][1]} after its refill (back at its target "
                      f"{b['refilled']:.1f} s after it); {b['cpu_ms']:.1f} ms CPU per run "
                      "(the server's whole tree, with the refill and teardown each run "
                      f"causes, and any sandboxes warm after beyond those before), "
                      f"load {b['load']}")
        for conc in run["concs"]:
            md.append(f"- {tag}: {conc['clients']} concurrent clients, {args.duration:g}s: "
                      f"**{conc['per_s']:.1f} fresh sandboxes/s**, {conc['ok']} ok, "
                      f"{conc['failed']} failed, {conc['misses']} started cold, "
                      f"{conc['warm_before']} warm at its start (without them "
                      f"{conc['net_per_s']:.1f}/s), "
                      f"{conc['cpu_ms']:.1f} ms CPU per run (the server's whole tree: the "
                      f"daemon's own process {conc['own_ms']:.1f} ms, the processes under it "
                      f"{conc['cpu_ms'] - conc['own_ms']:.1f} ms), load {conc['load']}")
            if conc["errors"]:
                md.append(f"- {tag}: errors: {'; '.join(conc['errors'])}")
        md.append(f"- {tag}: warm CLI run / venv python: {cli / base:.2f}x (goal <= 2x)")
        if "Traceback" in run["log"]:
            md += ["", f"{tag}: serve log tail:", "```", run["log"], "```"]
    total = cpu["daemon_start"] + cpu["daemon_destroy"] + cpu["helpers"]
    cores = os.cpu_count() or 1
    md.append(f"- CPU per `{args.profile}` sandbox (this tree, in-process, sequential; wall "
              f"{cpu['start_wall']:.1f} ms per start): daemon start {cpu['daemon_start']:.1f}"
              f" ms + daemon teardown {cpu['daemon_destroy']:.1f} ms + helper processes "
              f"{cpu['helpers']:.1f} ms = {total:.1f} ms: {cores} cores make at most "
              f"~{cores * 1000 / total:.0f} fresh sandboxes/s before any request is served")
    for tag, by_profile in rounds.items():
        for profile, totals in by_profile.items():
            md.append(f"- {tag}: CPU per `{profile}` sandbox, median of {len(totals)} "
                      f"interleaved runs: **{pct(totals, 0.5):.1f} ms** "
                      f"({', '.join(f'{t:.1f}' for t in totals)})")
    md.append(f"- bare bwrap start p50 {bw:.1f} ms: 2 cores allow at most ~"
              f"{2000 / bw if bw else 0:.0f} bwrap starts/s before any agent, network or "
              "cgroup work")
    text = "\n".join(md) + "\n"
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    name = time.strftime("pool-%Y%m%d-%H%M%S")
    (out / f"{name}.md").write_text(text)
    results = {"stamp": st, "args": {k: str(v) for k, v in vars(args).items()},
               "cases": cases, "runs": runs, "cpu": cpu, "cpu_rounds": rounds}
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    print(text)
    return 0


def tree_commit(tree: Path) -> str:
    r = subprocess.run(["git", "-C", str(tree), "describe", "--always", "--dirty",
                        "--abbrev=12"], capture_output=True, text=True, check=False)
    return r.stdout.strip() or str(tree)


if __name__ == "__main__":
    sys.exit(main())
