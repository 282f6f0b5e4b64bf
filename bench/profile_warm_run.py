"""Where a warm run's time goes: each phase of one request, through HTTP and the daemon socket.

A profiler, not a benchmark of record: it runs a daemon's manager in this process with
marks on the functions a warm `true` run goes through (wrapped here, nothing in the
product changes), and a client of our own in another process (so that they do not share
a GIL), paced so that each request finds the pool refilled. Per phase it prints the p50 /
p95 of the time from the previous mark, in the order a request meets them:

- HTTP (`POST /run`, uvicorn + FastAPI, keep-alive): client sent -> request parsed ->
  handler's job on a worker thread -> planned -> sandbox taken from the pool -> command
  started (the agent's STARTED) -> exit status -> run finished (sandbox released,
  teardown queued) -> answer goes out -> client has it.
- daemon socket (`run`, as the CLI and `mcp-server` speak it): client sent -> connection
  served -> peer checked -> request read -> planned -> taken -> started -> `started`
  event goes out -> run finished -> `exit` event goes out -> client has it.

The clocks are CLOCK_MONOTONIC in both processes. It also counts the runs that had a
refill or teardown of the pool running beside them. Another tree's interpreter measures
that tree (e.g. /work/main/.venv/bin/python bench/profile_warm_run.py). Usage:
  .venv/bin/python bench/profile_warm_run.py [-n 40] [--pause 0.2] [--profile moderate]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import pct, stamp, stamp_lines

Event = tuple[str, float]
EVENTS: list[Event] = []
BACKGROUND: list[tuple[float, float]] = []  # (began, ended) of each refill and teardown
_P = time.perf_counter  # CLOCK_MONOTONIC on Linux: comparable across processes


def mark(tag: str) -> None:
    EVENTS.append((tag, _P()))


def wrap(owner: Any, name: str, tag: str, *, before: str | None = None) -> None:
    """Mark `tag` when owner.name returns (and `before` when it is called)."""
    inner = getattr(owner, name)

    def marked(*args: Any, **kwargs: Any) -> Any:
        if before:
            mark(before)
        try:
            return inner(*args, **kwargs)
        finally:
            mark(tag)

    setattr(owner, name, marked)


def instrument() -> None:
    """Marks on the warm run's path, shared by both front doors."""
    from agentkernel.agent import client as agent_client
    from agentkernel.daemon import handles, pool, runs

    wrap(runs.RunsMixin, "_plan_run", "planned")
    wrap(pool.WarmPool, "acquire", "taken")
    wrap(runs, "_grant", "key granted")  # an agent run's (--agent)
    wrap(agent_client.AgentClient, "exec", "started")
    original = agent_client.Execution.events

    def events(self: Any) -> Any:
        for event in original(self):
            if event[0] == "exit":
                mark("exit status")
            yield event

    agent_client.Execution.events = events  # type: ignore[method-assign]
    wrap(handles.ExecHandle, "finish", "finished")
    # Background work, to see whether it overlapped a run (not a phase of the request).
    for name in ("_refill", "_destroy_quietly"):
        timed_background(pool.WarmPool, name)


def timed_background(owner: Any, name: str) -> None:
    inner = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        began = _P()
        try:
            return inner(*args, **kwargs)
        finally:
            BACKGROUND.append((began, _P()))

    setattr(owner, name, timed)


def instrument_http() -> None:
    import uvicorn.protocols.http.h11_impl as h11_impl

    from agentkernel.http import commands

    wrap(h11_impl.H11Protocol, "data_received", "parsed")
    wrap(commands.Job, "run", "job done", before="job on a worker")
    send = h11_impl.RequestResponseCycle.send

    async def marked_send(self: Any, message: Any) -> None:
        if message["type"] == "http.response.body":
            mark("answer goes out")
        await send(self, message)

    h11_impl.RequestResponseCycle.send = marked_send  # type: ignore[method-assign]


def instrument_socket() -> None:
    from agentkernel.daemon import server

    wrap(server.DaemonServer, "_serve", "conn done", before="connection served")
    wrap(server, "refusal", "peer checked")
    wrap(server._Conn, "recv", "request read")
    send = server._Conn.send

    def marked_send(self: Any, obj: dict[str, Any]) -> None:
        if obj.get("ev") in ("started", "exit"):
            mark(f"'{obj['ev']}' goes out")
        elif obj.get("ev") == "out":
            mark("first 'out' goes out")  # (the table keeps the first of each mark)
        send(self, obj)

    server._Conn.send = marked_send  # type: ignore[method-assign]


HTTP_CLIENT = """
import http.client, json, sys, time
port, n, pause, body = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
c = http.client.HTTPConnection("127.0.0.1", port)
h = {"Authorization": "Bearer " + sys.argv[5], "Content-Type": "application/json"}
for _ in range(n):
    time.sleep(pause)
    t = time.perf_counter()
    c.request("POST", "/run", body, h)
    r = c.getresponse()
    d = r.read()
    assert r.status == 200 and json.loads(d)["data"]["exit_code"] == 0, d
    print(json.dumps([t, time.perf_counter()]), flush=True)
"""

SOCKET_CLIENT = """
import json, sys, time
from agentkernel.ipc import client
n, pause, req = int(sys.argv[1]), float(sys.argv[2]), json.loads(sys.argv[3])
for _ in range(n):
    time.sleep(pause)
    t = time.perf_counter()
    r = client.pump(client.open_stream("run", req, auto_start=False), sink=lambda a, b: None)
    assert r.get("exit_code") == 0, r
    print(json.dumps([t, time.perf_counter()]), flush=True)
"""


def requests(client_times: list[list[float]], skip: int) -> list[list[Event]]:
    """The marks that fell within each request (client sent .. client has it)."""
    out = []
    for sent, got in client_times[skip:]:
        inside = [(tag, t) for tag, t in EVENTS if sent <= t <= got]
        out.append([("client sent", sent), *inside, ("client has it", got)])
    return out


def overlapped(reqs: list[list[Event]]) -> str:
    """How many runs had a refill or a teardown of the pool running between the
    sandbox's take and the run's end."""
    hit = 0
    for events in reqs:
        times = dict(events)
        taken, done = times.get("taken"), times.get("finished")
        if taken is not None and done is not None:
            hit += any(b < done and e > taken for b, e in BACKGROUND)
    return (f"Runs with a refill or teardown of the pool running beside them (take to "
            f"finish): {hit}/{len(reqs)}.")


def table(title: str, reqs: list[list[Event]]) -> list[str]:
    steps: dict[str, list[float]] = collections.defaultdict(list)
    order: list[str] = []
    totals = []
    for events in reqs:
        # One mark of each kind, the first: the connection's control thread reads again
        # (EOF) and its thread ends after the client has its answer.
        first: dict[str, float] = {}
        for tag, t in sorted(events, key=lambda e: e[1]):
            if tag != "conn done":
                first.setdefault(tag, t)
        events = sorted(first.items(), key=lambda e: e[1])
        for (a, ta), (b, tb) in itertools.pairwise(events):
            label = f"{a} -> {b}"
            if label not in steps:
                order.append(label)
            steps[label].append((tb - ta) * 1000)
        totals.append((events[-1][1] - events[0][1]) * 1000)
    lines = [f"### {title}", "", "| phase | n | p50 ms | p95 ms |", "|---|---:|---:|---:|"]
    for label in order:
        v = steps[label]
        lines.append(f"| {label} | {len(v)} | {pct(v, 0.5):.3f} | {pct(v, 0.95):.3f} |")
    lines.append(f"| **whole request** | {len(totals)} | {pct(totals, 0.5):.3f} | "
                 f"{pct(totals, 0.95):.3f} |")
    return [*lines, "", overlapped(reqs), ""]


def client_run(argv: list[str], env: dict[str, str]) -> list[list[float]]:
    r = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"client failed: {r.stderr[-800:]}")
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("[")]


def agent_table(args: argparse.Namespace, tmp: Path, env: dict[str, str],
                warm: int) -> list[str]:
    """The socket's `run --agent claude -- --version`, as the CLI sends it (the key's
    value with it)."""
    from agentkernel.cli.common import caller

    req = json.dumps({"argv": ["--version"], "agent": "claude",
                      "agent_key": "ANTHROPIC_API_KEY", "agent_key_value": "sk-ant-profile",
                      "cwd": str(tmp / "proj"), "workspace_at": str(tmp / "proj"),
                      "env": {}, **caller(), "stdin_open": False})
    EVENTS.clear()
    times = client_run([sys.executable, "-c", SOCKET_CLIENT, str(args.n + warm),
                        str(args.pause), req], env)
    return table("daemon socket `run --agent claude -- --version`", requests(times, warm))


def door_tables(args: argparse.Namespace, tmp: Path, env: dict[str, str], warm: int,
                body: str, port: int, key: str) -> list[str]:
    """A warm `true` through each front door: HTTP, then the daemon socket."""
    EVENTS.clear()
    times = client_run([sys.executable, "-c", HTTP_CLIENT, str(port),
                        str(args.n + warm), str(args.pause), body, key], env)
    md = table("HTTP `POST /run`", requests(times, warm))
    req = json.dumps({"argv": ["true"], "cwd": str(tmp / "proj"), "image": "host",
                      "backend": "namespaces", "profile": args.profile})
    EVENTS.clear()
    times = client_run([sys.executable, "-c", SOCKET_CLIENT, str(args.n + warm),
                        str(args.pause), req], env)
    return md + table("daemon socket `run` (the CLI's and mcp-server's wire)",
                      requests(times, warm))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=40)
    ap.add_argument("--pause", type=float, default=0.2)
    ap.add_argument("--profile", default="moderate")
    ap.add_argument("--agent", action="store_true",
                    help="`run --agent claude -- --version` on the socket, not `true` "
                    "(needs scripts/install-agents.sh)")
    args = ap.parse_args()
    st = stamp()
    tmp = Path(tempfile.mkdtemp(prefix="ak-prof-"))
    (tmp / "run").mkdir(mode=0o700)
    (tmp / "proj").mkdir()
    if args.agent:
        (tmp / "home").mkdir()
        agents = Path(__file__).resolve().parent.parent / ".cache" / "agents-home" / "agents"
        (tmp / "home" / "agents").symlink_to(agents)
    os.environ.update(AGENTKERNEL_HOME=str(tmp / "home"),
                      AGENTKERNEL_RUNTIME_DIR=str(tmp / "run"))
    instrument()
    instrument_http()
    instrument_socket()
    from agentkernel.config import Config, DaemonSection, PoolEntry
    from agentkernel.daemon.manager import SandboxManager
    from agentkernel.daemon.server import DaemonServer
    from agentkernel.http.serve import start_in_thread

    key = "profile-" + os.urandom(6).hex()
    manager = SandboxManager(Config(daemon=DaemonSection(
        pool_min=1, pool_max=2, adhoc_min=1,
        pools=[PoolEntry(image="host", profile=args.profile, backend="namespaces")])))
    api = start_in_thread(manager, port=0, api_key=key)
    server = DaemonServer(manager, tmp / "run" / "daemon.sock")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    import agentkernel  # the tree measured: this interpreter's (e.g. /work/main/.venv's)

    env = {**os.environ, "PYTHONPATH": str(Path(agentkernel.__file__).parent.parent)}
    warm = 3
    body = json.dumps({"command": ["true"], "image": "host", "backend": "namespaces",
                       "profile": args.profile})
    md = [f"# Where a warm run's time goes {st['time']}", "", *stamp_lines(st), "",
          f"`true`, namespaces backend, profile `{args.profile}`, one request every "
          f"{args.pause:g} s (the pool refilled); the first {warm} of each door skipped.", ""]
    try:
        manager.pool.wait_warm(30)
        if args.agent:
            md += agent_table(args, tmp, env, warm)
        else:
            md += door_tables(args, tmp, env, warm, body, api.port, key)
    finally:
        server.shutdown()
        api.stop()
        manager.close()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    st_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    md.append(f"Load after: {st_after}.")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
