"""What the agent's unix-socket guard costs: CPU per sandbox start and time per connect().

Compares this checkout with a baseline checkout (`--baseline DIR`, e.g. main's worktree,
with its own .venv and built agent), interleaved (A, B, A, B ...) in one run:
- `run -- true` on namespaces (moderate, no network): CPU ms (user+sys) of the whole
  process tree and wall ms;
- inside one sandbox, 500 TCP loopback connect()+accept() pairs and 500 unix ones in /tmp:
  microseconds per pair (every connect() is the guard's to answer);
- 500 datagrams sent with an address (sendto()) and received, UDP on loopback and unix
  in /tmp (those are the guard's too), and 500 sent without one (send(): not the guard's).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, TABLE_HEAD, pct, stamp, stamp_lines, summary, timed_run

CONNECTS = r"""
import socket, time
def loop(family, addr):
    srv = socket.socket(family); srv.bind(addr); srv.listen(600)
    name = srv.getsockname()
    t = time.perf_counter()
    for _ in range(500):
        c = socket.socket(family); c.connect(name); c.close(); srv.accept()[0].close()
    return (time.perf_counter() - t) / 500 * 1e6
def dgrams(family, addr, connected=False):
    srv = socket.socket(family, socket.SOCK_DGRAM); srv.bind(addr)
    name = srv.getsockname()
    c = socket.socket(family, socket.SOCK_DGRAM)
    if connected:
        c.connect(name)
    t = time.perf_counter()
    for _ in range(500):
        c.send(b"x") if connected else c.sendto(b"x", name)
        srv.recv(16)
    return (time.perf_counter() - t) / 500 * 1e6
print(loop(socket.AF_INET, ("127.0.0.1", 0)), loop(socket.AF_UNIX, "/tmp/bench.sock"),
      dgrams(socket.AF_INET, ("127.0.0.1", 0)), dgrams(socket.AF_UNIX, "/tmp/bench.dgram"),
      dgrams(socket.AF_INET, ("127.0.0.1", 0), True))
"""


def _argv(tree: Path, command: list[str]) -> list[str]:
    return [str(tree / ".venv" / "bin" / "python"), "-P", "-m", "agentkernel", "run", "-q",
            "--backend", "namespaces", "--profile", "moderate", "--no-network", "--", *command]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=10)
    ap.add_argument("--baseline", type=Path, required=True, help="a checkout to compare with")
    args = ap.parse_args()
    trees = {"baseline": args.baseline.resolve(), "this": ROOT}
    proj = Path(tempfile.mkdtemp(prefix="ak-bench-guard-"))
    cpu: dict[str, list[float]] = {k: [] for k in trees}
    wall: dict[str, list[float]] = {k: [] for k in trees}
    tcp: dict[str, list[float]] = {k: [] for k in trees}
    unix: dict[str, list[float]] = {k: [] for k in trees}
    udp: dict[str, list[float]] = {k: [] for k in trees}
    unix_dgram: dict[str, list[float]] = {k: [] for k in trees}
    send: dict[str, list[float]] = {k: [] for k in trees}
    for _ in range(args.n):
        for key, tree in trees.items():
            env = {**os.environ, "AGENTKERNEL_NO_DAEMON": "1", "PYTHONPATH": str(tree / "src")}
            w, c = timed_run(_argv(tree, ["true"]), cwd=proj, env=env)
            wall[key].append(w)
            cpu[key].append(c)
            r = subprocess.run(_argv(tree, ["python3", "-c", CONNECTS]), cwd=proj, env=env,
                               capture_output=True, text=True, timeout=300, check=True)
            t, u, d, ud, s = (float(x) for x in r.stdout.split())
            tcp[key].append(t)
            unix[key].append(u)
            udp[key].append(d)
            unix_dgram[key].append(ud)
            send[key].append(s)
    lines = ["# unix-socket guard", "", *stamp_lines(stamp()), f"- baseline: {args.baseline}",
             "", *TABLE_HEAD]
    for name, table in (("run -- true, CPU ms", cpu), ("run -- true, wall ms", wall),
                        ("TCP connect+accept, us", tcp), ("unix connect+accept, us", unix),
                        ("UDP sendto+recv, us", udp), ("unix dgram sendto+recv, us", unix_dgram),
                        ("UDP send (no address)+recv, us", send)):
        base = pct(table["baseline"], 0.5)
        for key in trees:
            lines.append(summary(f"{name} ({key})", table[key], base))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
