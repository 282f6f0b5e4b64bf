"""Benchmark the egress gate against plain slirp4netns egress, measured in the same run.

Issue 11's four goals, each with p50/p95 and the ratio to slirp4netns (or to no network)
from the same run, rounds interleaved so that load on the machine hits every kind alike:

1. a 100 MiB download with curl: throughput, gate / slirp4netns (goal >= 0.8x);
2. 100 sequential new HTTPS connections, one small request each, from Python: total time,
   gate / slirp4netns (goal <= 1.2x); the gate's client resolves the allowed name through
   the gate's resolver first and is checked by name (pinned answer, SNI), as a sandbox's
   would be; slirp4netns's goes to the address. The ways out of a round are open at once
   and their requests alternate one by one, so that load on the machine (it is shared)
   hits each alike; CPU per request from the scheduler's count (ns);
3. a namespaces sandbox's start + destroy with the gate (forked by the gates' fork server,
   as in the daemon; and a fresh interpreter per sandbox, as a one-shot `run`) against the same
   without network (goal: <= 5 ms added);
4. the gate's memory per sandbox: USS (pages only this gate has: what one more sandbox
   costs) and PSS, idle after start and after the traffic above; the fork server's own once
   (goal: <= 2 MiB per sandbox, or shared). slirp4netns's for comparison.

Each round's ways out are fresh network namespaces against the same upstream (a namespace with
HTTP and HTTPS servers, tests/egress_upstream.py). Needs root. With `--against DIR`, the
gate of another checkout (DIR/src: its fork server, gate and wiring) is measured in the
same rounds, by a child process of this bench, against the same upstream. Per round, the
ratio gate / slirp4netns of that round (min, median, max over the rounds) beside the
ratio of the p50s.
Usage: .venv/bin/python bench/bench_egress.py [-n ROUNDS] [--starts N] [--https-only]
       [--against DIR] [--json FILE]
       .venv/bin/python bench/bench_egress.py --oneshot N   (whole CLI runs without a daemon)
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
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from common import pct, stamp, stamp_lines  # noqa: E402

# A child holding another checkout's gate: its agentkernel imported first (so that this
# file's sys.path entries do not matter for it), then a way out through that gate; prints
# it as JSON (argv prefix, set-up time, pid, scratch dir), and takes it down at a line on
# stdin.
AGAINST_CHILD = r"""
import json, sys
src, bench, tests, up = sys.argv[1:5]
sys.path[:0] = [src]
import agentkernel  # noqa: F401 - the other checkout's, before this bench's paths
sys.path[:0] = [bench, tests]
import bench_egress as b
sys.path[:] = [src] + [p for p in sys.path if p not in (src, str(b.ROOT / "src"))]
from agentkernel import egress_forkserver
from sandbox_helpers import Upstream
doc = json.loads(up)
egress_forkserver.enable()
try:
    way = b.open_way("gate", Upstream(doc["pid"], doc["addr"], doc["addr2"], doc["private"],
                                      b.Path(doc["dir"])))
    try:
        print(json.dumps({"enter": way.enter, "took": way.took, "pid": way.pid,
                          "scratch": str(way.scratch)}), flush=True)
        sys.stdin.readline()
    finally:
        way.close()
finally:
    egress_forkserver.shutdown()
"""

# argv: host (a name, resolved once through the namespace's resolver, or an address), CA.
# One warm-up request first (an on-demand gate is forked by the lookup or by it: its cost is
# reported apart, as "first"; its time printed), then one request per line on stdin, each
# one's time printed (ms).
HTTPS_CLIENT = r"""
import socket, ssl, sys, time
ctx = ssl.create_default_context(cafile=sys.argv[2])
ctx.check_hostname = False
def one(addr):
    t = time.perf_counter()
    s = ctx.wrap_socket(socket.create_connection((addr, 18443), timeout=10),
                        server_hostname="allowed.test")
    s.sendall(b"GET / HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n")
    while s.recv(65536):
        pass
    s.close()
    return (time.perf_counter() - t) * 1000
t = time.perf_counter()
addr = socket.gethostbyname(sys.argv[1])
one(addr)
print("%.3f" % ((time.perf_counter() - t) * 1000), flush=True)  # lookup + first request
while sys.stdin.readline().strip() == "go":
    print("%.4f" % one(addr), flush=True)
"""

RESOLVER = "10.0.2.3"  # slirp4netns's DNS; the gate's resolver answers there too
REQUESTS = 100


def memory_kib(pid: int) -> dict[str, int]:
    """USS (private pages) and PSS (shared pages divided among their users), KiB."""
    out = {"uss": 0, "pss": 0}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Private_Clean", "Private_Dirty"):
            out["uss"] += int(value.split()[0])
        elif key == "Pss":
            out["pss"] = int(value.split()[0])
    return out


def cpu_ms(pid: int) -> tuple[float, float, float]:
    """CPU time process `pid` has spent, ms: user and system (clock-tick resolution), and
    their sum from the scheduler's own count (ns resolution, every thread)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    tick = 1000 / os.sysconf("SC_CLK_TCK")
    ran = sum(int(Path(f"/proc/{pid}/task/{t}/schedstat").read_text().split()[0])
              for t in os.listdir(f"/proc/{pid}/task"))
    return int(fields[11]) * tick, int(fields[12]) * tick, ran / 1e6


def _policy(upstream: Any) -> Any:
    from agentkernel.egress_policy import policy_for

    return policy_for("egress", None, ("allowed.test",), (), (f"allowed.test:{upstream.addr}",))


@dataclass
class Way:
    """A namespace whose way out is `kind`: the argv prefix to run in it (its resolv.conf
    names 10.0.2.3), the host its clients ask for, the way out's set-up time (s), the pid
    to measure (None: a gate on demand, none runs yet), its scratch dir, and how to take
    it down."""

    kind: str
    enter: list[str]
    host: str
    took: float
    pid: int | None
    scratch: Path
    close: Callable[[], None]


def open_way(kind: str, upstream: Any, against: Path | None = None) -> Way:
    """A way out: "slirp", "gate" (with an allow-list for allowed.test), or "against"
    (the same through another checkout's gate, held by a child process)."""
    if kind == "against":
        assert against is not None
        return _against_way(against, upstream)
    from agentkernel.egress_gate import GateStart
    from agentkernel.network import egress_netns, enter_netns, lifeline, netns_holder

    scratch = Path(tempfile.mkdtemp(prefix=f"ak-bench-{kind}-"))
    (scratch / "resolv.conf").write_text(f"nameserver {RESOLVER}\n")
    private_resolv = ["unshare", "--mount", "--", "sh", "-c",
                      f'mount --bind {scratch / "resolv.conf"} /etc/resolv.conf && exec "$@"',
                      "sh"]
    helpers: list[Any] = []
    life_w = -1

    def close() -> None:
        if life_w >= 0:
            os.close(life_w)
        for h in helpers:
            if h.poll() is None:
                h.kill()
            h.wait()
        shutil.rmtree(scratch, ignore_errors=True)

    try:
        if kind == "slirp":
            start = time.perf_counter()
            pid, life_w = egress_netns(scratch / "slirp.log", helpers)
            took = time.perf_counter() - start
            return Way(kind, [*enter_netns(pid), *private_resolv], upstream.addr, took,
                       helpers[-1].pid, scratch, close)
        life_r, life_w = lifeline()
        holder = netns_holder(life_r)
        helpers.append(holder)
        # bwrap brings a sandbox's loopback up; a bare holder's is down
        subprocess.run([*enter_netns(holder.pid), "ip", "link", "set", "lo", "up"], check=True)
        t0 = time.perf_counter()  # the holder is the sandbox's namespace: not the gate's cost
        start_ = GateStart(scratch, exit_fd=life_r)
        start_.attach(holder.pid, _policy(upstream), ids=(65534, 65534))
        gate = start_.wait(ready=True)
        took = time.perf_counter() - t0
        os.close(life_r)
        if gate is not None:  # (None: on demand, forked by the fork server at first use)
            helpers.append(gate)
        return Way(kind, [*enter_netns(holder.pid), *private_resolv], "allowed.test", took,
                   gate.pid if gate is not None else None, scratch, close)
    except BaseException:
        close()
        raise


def _against_way(checkout: Path, upstream: Any) -> Way:
    doc = {"pid": upstream.pid, "addr": upstream.addr, "addr2": upstream.addr2,
           "private": upstream.private, "dir": str(upstream.dir)}
    child = subprocess.Popen([sys.executable, "-c", AGAINST_CHILD, str(checkout / "src"),
                              str(ROOT / "bench"), str(ROOT / "tests"), json.dumps(doc)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    line = child.stdout.readline()
    if not line:
        child.wait()
        raise SystemExit(f"{checkout}'s gate did not start")
    got = json.loads(line)

    def close() -> None:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=60)

    return Way("against", got["enter"], "allowed.test", got["took"], got["pid"],
               Path(got["scratch"]), close)


def measure_round(ways: dict[str, Way], samples: dict[str, dict[str, list[float]]],
                  https_only: bool) -> None:
    """One round over ways already open: idle memory, the download through each in turn,
    then REQUESTS HTTPS requests through each, one at a time, alternating between the
    ways (so that load on the machine hits each alike), then memory again."""
    for kind, way in ways.items():
        samples[kind]["setup_ms"].append(way.took * 1000)
    time.sleep(0.2)
    for kind, way in ways.items():
        idle = memory_kib(way.pid) if way.pid is not None else {"uss": 0, "pss": 0}
        for key, value in idle.items():
            samples[kind][f"idle_{key}_kib"].append(value)
    if not https_only:
        for kind, way in ways.items():
            t = time.perf_counter()
            subprocess.run([*way.enter, "curl", "-sS", "-o", "/dev/null",
                            f"http://{way.host}:18080/big"], check=True, timeout=300)
            samples[kind]["download_mibps"].append(100 / (time.perf_counter() - t))
    busy = https_interleaved(ways, samples)
    for kind, pid in busy.items():
        for key, value in memory_kib(pid).items():
            samples[kind][f"busy_{key}_kib"].append(value)


def https_interleaved(ways: dict[str, Way], samples: dict[str, dict[str, list[float]]]
                      ) -> dict[str, int]:
    """REQUESTS new HTTPS connections through each way, request by request in turn (the
    first of each pair alternating); per way its total, each request, its first (a
    gate's fork), its CPU per request. Returns the pids measured."""
    from sandbox_helpers import egress_gate_pid

    upstream_ca = os.environ["AK_BENCH_CA"]
    clients: dict[str, subprocess.Popen[str]] = {}
    pids: dict[str, int] = {}
    try:
        for kind, way in ways.items():
            clients[kind] = subprocess.Popen(
                [*way.enter, sys.executable, "-c", HTTPS_CLIENT, way.host, upstream_ca],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for kind, client in clients.items():
            assert client.stdout is not None
            first = client.stdout.readline()
            assert first, f"{kind}: the warm-up request failed"
            samples[kind]["https_first_ms"].append(float(first))
            way = ways[kind]
            pid = way.pid if way.pid is not None else egress_gate_pid(way.scratch)
            assert pid is not None, f"{kind}: no gate after the first request"
            pids[kind] = pid
        before = {kind: cpu_ms(pid) for kind, pid in pids.items()}
        times: dict[str, list[float]] = {kind: [] for kind in ways}
        order = list(clients)
        for i in range(REQUESTS):
            for kind in order[i % len(order):] + order[:i % len(order)]:
                client = clients[kind]
                assert client.stdin is not None and client.stdout is not None
                client.stdin.write("go\n")
                client.stdin.flush()
                got = client.stdout.readline()
                assert got, f"{kind}: an HTTPS request failed"
                times[kind].append(float(got))
        for kind, pid in pids.items():
            user, _system, ran = (b - a for a, b in zip(before[kind], cpu_ms(pid),
                                                          strict=True))
            samples[kind]["cpu_per_request_ms"].append(ran / REQUESTS)
            samples[kind]["cpu_user_per_request_ms"].append(user / REQUESTS)
            samples[kind]["https_100_ms"].append(sum(times[kind]))
            samples[kind]["https_request_ms"].extend(times[kind])
    finally:
        for client in clients.values():
            assert client.stdin is not None
            client.stdin.close()
            client.wait(timeout=30)
    return pids


def round_ratios(results: dict[str, dict[str, list[float]]], kind: str,
                 key: str) -> list[float]:
    """Per round: `kind`'s `key` over slirp4netns's in the same round (one sample each)."""
    return [g / s for g, s in zip(results[kind][key], results["slirp"][key], strict=False)
            if s]


def ratio_lines(results: dict[str, dict[str, list[float]]]) -> list[str]:
    """The rounds' own ratios (each gate round against the slirp4netns round beside it)."""
    lines = []
    for kind in (k for k in results if k != "slirp"):
        for key, goal in (("https_100_ms", "<= 1.20x"), ("download_mibps", ">= 0.80x")):
            ratios = sorted(round_ratios(results, kind, key))
            if ratios:
                lines.append(f"- {kind} / slirp4netns {key}, per round ({len(ratios)} rounds): "
                             f"min {ratios[0]:.2f}x, median {pct(ratios, 0.5):.2f}x, max "
                             f"{ratios[-1]:.2f}x (goal {goal})")
    return lines


def sandbox_starts(n: int) -> dict[str, list[float]]:
    """Milliseconds of a namespaces sandbox's start + destroy, interleaved: moderate with
    the gate from the fork server, as a one-shot run's (on demand, without a server: no
    gate until the first connection), with a fresh gate interpreter started with the
    sandbox (AGENTKERNEL_GATE_FORKSERVER=0), and without network."""
    from agentkernel import egress_forkserver
    from agentkernel.backends import get_backend
    from agentkernel.profiles import get_profile
    from agentkernel.rootfs import host_rootfs
    from agentkernel.sandbox import SandboxSpec

    backend = get_backend("namespaces")
    times: dict[str, list[float]] = {"gate (fork server)": [], "gate (one-shot)": [],
                                     "gate (fresh)": [], "no network": []}
    env = {"gate (fresh)": "0", "gate (one-shot)": ""}
    enabled = egress_forkserver._enabled
    for i in range(n + 1):  # the first round warms caches: not counted
        for kind in times:
            profile = get_profile("moderate")
            if kind == "no network":
                profile = profile.with_overrides(network=False)
            # The fork server is asked for each gate unless this says no (read per start);
            # a one-shot run's process has none (never enabled).
            os.environ["AGENTKERNEL_GATE_FORKSERVER"] = env.get(kind, "1")
            egress_forkserver._enabled = enabled and kind != "gate (one-shot)"
            spec = SandboxSpec(name=f"bench-{os.getpid()}-{i}-{len(kind)}", profile=profile,
                               rootfs=host_rootfs(), image="host")
            t = time.perf_counter()
            backend.start(spec).destroy()
            if i:
                times[kind].append((time.perf_counter() - t) * 1000)
    egress_forkserver._enabled = enabled
    return times


# Runs the CLI as a subreaper: a gate the run started and left to end with its sandbox
# (reparented to us) is waited for, so its CPU counts. Prints wall ms and CPU ms.
SUBREAPER = r"""
import ctypes, os, resource, subprocess, sys, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
t = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                      stderr=subprocess.PIPE).returncode
wall = (time.perf_counter() - t) * 1000
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(code, wall, (r.ru_utime + r.ru_stime) * 1000)
"""

ONESHOT_REQUEST = ("import urllib.request; urllib.request.urlopen("
                   "'http://allowed.test:18080/', timeout=20).read()")


def oneshot_runs(n: int, upstream: Any) -> dict[str, dict[str, list[float]]]:
    """A newcomer's run without a daemon (AGENTKERNEL_NO_DAEMON=1), a whole CLI process
    each, interleaved: `run -- true` without network, with a gate on demand (the default:
    none until the first connection), and with a gate started with the sandbox (=0, as
    before); and `run -- python3 -c <one HTTP request to an allowed host>` with each kind of
    gate (where the on-demand gate's start-up now is). Wall ms and CPU ms (user+sys of
    the CLI and everything it started) per run."""
    ak = ROOT / ".venv" / "bin" / "agentkernel"
    base = [str(ak), "run", "-q", "-B", "namespaces", "-i", "host"]
    policy = ["--allow-host", "allowed.test", "--add-host", f"allowed.test:{upstream.addr}"]
    kinds = {
        # (the same flags: the CLI's own parsing of them is no cost of the gate's)
        "true, no network": ([*base, "--no-network", *policy, "--", "true"], ""),
        "true, gate on demand": ([*base, *policy, "--", "true"], ""),
        "true, gate at start (=0)": ([*base, *policy, "--", "true"], "0"),
        "one request, gate on demand": ([*base, *policy, "--", "python3", "-c",
                                         ONESHOT_REQUEST], ""),
        "one request, gate at start (=0)": ([*base, *policy, "--", "python3", "-c",
                                             ONESHOT_REQUEST], "0"),
    }
    work = Path(tempfile.mkdtemp(prefix="ak-bench-oneshot-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTKERNEL_")}
    env.update({"AGENTKERNEL_NO_DAEMON": "1", "AGENTKERNEL_DAEMON_AUTOSTART": "0",
                "AGENTKERNEL_HOME": str(work / "home"),
                "AGENTKERNEL_RUNTIME_DIR": str(work / "run")})
    out: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in kinds}
    try:
        for i in range(n + 1):  # the first round warms caches: not counted
            for kind, (argv, forkserver) in kinds.items():
                r = subprocess.run([sys.executable, "-c", SUBREAPER, *argv], cwd=work,
                                   env={**env, "AGENTKERNEL_GATE_FORKSERVER": forkserver},
                                   capture_output=True, text=True, check=False, timeout=300)
                code, wall, cpu = r.stdout.split()
                if code != "0":
                    raise SystemExit(f"{kind}: the run failed: {r.stderr[-500:]}")
                if i:
                    out[kind]["wall"].append(float(wall))
                    out[kind]["cpu"].append(float(cpu))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def oneshot_report(runs: dict[str, dict[str, list[float]]], st: dict[str, str]) -> list[str]:
    lines = ["# one-shot in-process runs (AGENTKERNEL_NO_DAEMON=1): whole CLI process", "",
             *stamp_lines(st), "",
             "| run | n | wall p50 | wall p95 | CPU p50 | CPU p95 | added wall p50 / CPU p50 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for kind, got in runs.items():
        base = runs["true, no network" if kind.startswith("true") else
                    "one request, gate at start (=0)"]
        added = (f"{pct(got['wall'], 0.5) - pct(base['wall'], 0.5):+.1f} / "
                 f"{pct(got['cpu'], 0.5) - pct(base['cpu'], 0.5):+.1f} ms")
        lines.append(f"| {kind} | {len(got['wall'])} | {pct(got['wall'], 0.5):.1f} ms | "
                     f"{pct(got['wall'], 0.95):.1f} ms | {pct(got['cpu'], 0.5):.1f} ms | "
                     f"{pct(got['cpu'], 0.95):.1f} ms | {added} |")
    lines += ["", "(added: `true` runs against `true, no network`; request runs against the "
              "gate started with the sandbox)"]
    return lines


def _row(label: str, values: list[float], base: list[float] | None, unit: str,
         ratio: str = "p50 ratio") -> str:
    cell = "-"
    if base and pct(base, 0.5):  # (a CPU time below the clock's tick reads as 0)
        cell = f"{pct(values, 0.5) / pct(base, 0.5):.2f}x"
    return (f"| {label} | {len(values)} | {pct(values, 0.5):.1f} {unit} | "
            f"{pct(values, 0.95):.1f} {unit} | {cell} |")


def https_report(results: dict[str, dict[str, list[float]]], st: dict[str, str]) -> list[str]:
    """Goal 2 alone (--https-only): the gate warm (after one request), and its first."""
    s = results["slirp"]
    lines = ["# 100 HTTPS requests: egress gate vs slirp4netns", "", *stamp_lines(st), "",
             "| measure | n | p50 | p95 | gate / slirp4netns (p50) |", "|---|---:|---:|---:|---:|"]
    for key in ("https_100_ms", "https_request_ms", "https_first_ms", "cpu_per_request_ms",
                "cpu_user_per_request_ms"):
        lines.append(_row(f"slirp4netns {key}", s[key], None, "ms"))
        for kind in (k for k in results if k != "slirp"):
            lines.append(_row(f"{kind} {key}", results[kind][key], s[key], "ms"))
    g = results["gate"]
    https = pct(g["https_100_ms"], 0.5) / pct(s["https_100_ms"], 0.5)
    https95 = pct(g["https_100_ms"], 0.95) / pct(s["https_100_ms"], 0.95)
    lines += ["", f"- 100 HTTPS requests time gate/slirp4netns: p50 {https:.2f}x, p95 "
              f"{https95:.2f}x (goal <= 1.20x): {'met' if https <= 1.2 else 'NOT met'}",
              *ratio_lines(results)]
    return lines


def report(results: dict[str, dict[str, list[float]]], starts: dict[str, list[float]],
           server_kib: dict[str, int], st: dict[str, str]) -> list[str]:
    s, g = results["slirp"], results["gate"]
    lines = ["# egress gate vs slirp4netns", "", *stamp_lines(st), "",
             "| measure | n | p50 | p95 | gate / slirp4netns (p50) |", "|---|---:|---:|---:|---:|"]
    for key, unit in (("download_mibps", "MiB/s"), ("https_100_ms", "ms"),
                      ("https_request_ms", "ms"), ("https_first_ms", "ms"),
                      ("cpu_per_request_ms", "ms"), ("setup_ms", "ms"),
                      ("idle_uss_kib", "KiB"), ("idle_pss_kib", "KiB"),
                      ("busy_uss_kib", "KiB"), ("busy_pss_kib", "KiB")):
        lines.append(_row(f"slirp4netns {key}", s[key], None, unit))
        for kind in (k for k in results if k != "slirp"):
            if kind == "against" and key == "setup_ms":
                continue  # (its child's first gate start includes its fork server's)
            lines.append(_row(f"{kind} {key}", results[kind][key], s[key], unit))
    lines += ["", "| sandbox start+destroy | n | p50 | p95 | added p50 / p95 vs no network |",
              "|---|---:|---:|---:|---:|"]
    base = starts["no network"]
    for kind, values in starts.items():
        added = (f"{pct(values, 0.5) - pct(base, 0.5):+.1f} / "
                 f"{pct(values, 0.95) - pct(base, 0.95):+.1f} ms")
        lines.append(f"| {kind} | {len(values)} | {pct(values, 0.5):.1f} ms | "
                     f"{pct(values, 0.95):.1f} ms | {added} |")
    thr = pct(g["download_mibps"], 0.5) / pct(s["download_mibps"], 0.5)
    https = pct(g["https_100_ms"], 0.5) / pct(s["https_100_ms"], 0.5)
    added = pct(starts["gate (fork server)"], 0.5) - pct(base, 0.5)
    added_fresh = pct(starts["gate (fresh)"], 0.5) - pct(base, 0.5)
    uss = pct(g["idle_uss_kib"], 0.5) / 1024
    lines += [
        "", "## goals (p50, this run)",
        f"- download throughput gate/slirp4netns: {thr:.2f}x (goal >= 0.80x): "
        f"{'met' if thr >= 0.8 else 'NOT met'}",
        f"- 100 HTTPS requests time gate/slirp4netns: {https:.2f}x (goal <= 1.20x): "
        f"{'met' if https <= 1.2 else 'NOT met'}",
        *ratio_lines(results),
        f"- added sandbox start (fork server, as the daemon): {added:+.1f} ms; one-shot (fresh "
        f"interpreter): {added_fresh:+.1f} ms (goal <= 5 ms): "
        f"{'met' if added <= 5 else 'NOT met'} (daemon path)",
        f"- gate memory per sandbox, USS idle: {uss:.2f} MiB (on demand: no gate process "
        f"while idle; bench_gate_memory.py counts the fork server's part) (busy "
        f"{pct(g['busy_uss_kib'], 0.5) / 1024:.2f} MiB) + the fork server once: USS "
        f"{server_kib['uss'] / 1024:.1f} MiB, PSS {server_kib['pss'] / 1024:.1f} MiB "
        f"(goal <= 2 MiB per sandbox): {'met' if uss <= 2 else 'NOT met'}; slirp4netns "
        f"USS {pct(s['idle_uss_kib'], 0.5) / 1024:.2f} MiB",
    ]
    return lines


def _commit(checkout: Path) -> str:
    got = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, check=False)
    return got.stdout.strip() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=5, help="rounds of each way out")
    parser.add_argument("--starts", type=int, default=20, help="sandbox starts of each kind")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) here")
    parser.add_argument("--https-only", action="store_true",
                        help="only goal 2 (100 HTTPS requests): no download, no starts")
    parser.add_argument("--against", type=Path,
                        help="another checkout whose gate is measured in the same rounds")
    parser.add_argument("--json", type=Path, help="also write every sample (JSON) here")
    parser.add_argument("--oneshot", type=int, metavar="N",
                        help="only one-shot CLI runs without a daemon, N of each kind")
    args = parser.parse_args()
    if args.against is not None:
        args.against = args.against.resolve()
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    from agentkernel import egress_forkserver
    from sandbox_helpers import serving_upstream
    from test_egress_policy import UPSTREAM_NAMES

    st = stamp()
    if args.oneshot:
        with serving_upstream(UPSTREAM_NAMES) as upstream:
            lines = oneshot_report(oneshot_runs(args.oneshot, upstream), st)
        print("\n".join(lines))
        if args.out is not None:
            args.out.write_text("\n".join(lines) + "\n")
        return 0
    egress_forkserver.enable()  # gates fork from the fork server, as in the daemon
    kinds = ("slirp", "gate", *(["against"] if args.against else []))
    results: dict[str, dict[str, list[float]]] = {k: defaultdict(list) for k in kinds}
    with serving_upstream(UPSTREAM_NAMES) as upstream:
        os.environ["AK_BENCH_CA"] = str(upstream.ca)
        for _round in range(args.n):
            ways: dict[str, Way] = {}
            try:
                for kind in kinds:
                    ways[kind] = open_way(kind, upstream, args.against)
                measure_round(ways, results, args.https_only)
            finally:
                for way in ways.values():
                    way.close()
    server = egress_forkserver._server
    server_kib = memory_kib(server.proc.pid) if server is not None else {"uss": 0, "pss": 0}
    if args.https_only:
        egress_forkserver.shutdown()
        lines = https_report(results, st)
    else:
        starts = sandbox_starts(args.starts)
        egress_forkserver.shutdown()
        lines = report(results, starts, server_kib, st)
    if args.against:
        lines.insert(lines.index("") + 1, f"against: {args.against} (commit "
                     f"{_commit(args.against)}): its gate measured in the same rounds")
        lines.insert(lines.index("") + 2, "")
    print("\n".join(lines))
    if args.json is not None:
        args.json.write_text(json.dumps({"stamp": st, "against": str(args.against or ""),
                                         "results": results}) + "\n")
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
