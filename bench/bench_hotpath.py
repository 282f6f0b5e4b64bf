"""Benchmark the latency of a request that finds a warm sandbox, through each front door.

Cases (issues 10, 12 and 13, "Performance"), each against a private daemon of the tree
measured (own data and runtime dirs, a configured namespaces pool):
- HTTP `POST /run -- true` from one keep-alive client (`agentkernel serve`): paced (a
  pause before each request: the warm path alone) and 100 back to back (the pool's own
  hit / waited / miss counters say how often a request found it empty);
- MCP `sandbox_run` of `true` over stdio (`agentkernel mcp-server`, the official SDK's
  client), paced;
- wasm: a small WASI module run over the daemon socket, paced and back to back.

With `--baseline-tree` (another checkout with its own .venv, e.g. /work/main) both trees
are up at once and asked in turns (paced requests alternate, back-to-back ones come in
blocks), so both meet the same load; every row carries its p50 ratio to the baseline
tree's same case. Numbers on a shared 2-core
machine are noisy: compare ratios from one run, not numbers across runs.

Usage: .venv/bin/python bench/bench_hotpath.py [--baseline-tree /work/main] [--rounds 1]
                                              [-n 100] [--paced-n 30] [--mcp-n 30]
                                              [--skip http,mcp,wasm]
Writes bench/results/hotpath-<time>.{md,json} and prints the markdown.
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
import time
from pathlib import Path
from typing import Any

from common import (
    ROOT,
    SOCKET_RUN_CLIENT,
    TABLE_HEAD,
    pct,
    pool_counts,
    stamp,
    stamp_lines,
    summary,
    timed,
)

KEY = "bench-" + os.urandom(8).hex()
PACE = 0.2  # seconds before each paced request: the pool has refilled, threads sleep
POOL_TOML = ('pools = [{image = "host", profile = "moderate", backend = "namespaces"}]\n')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _private_env(tmp: Path, daemon_toml: str) -> dict[str, str]:
    (tmp / "run").mkdir(mode=0o700)
    (tmp / "home").mkdir()
    (tmp / "daemon.toml").write_text(daemon_toml)
    env = {**os.environ, "AGENTKERNEL_HOME": str(tmp / "home"),
           "AGENTKERNEL_RUNTIME_DIR": str(tmp / "run"),
           "AGENTKERNEL_DAEMON_CONFIG": str(tmp / "daemon.toml"), "AGENTKERNEL_API_KEY": KEY}
    for key in ("AGENTKERNEL_NO_DAEMON", "PYTHONDONTWRITEBYTECODE"):
        env.pop(key, None)
    return env



class HttpTarget:
    """`agentkernel serve` of one tree (its own daemon and pool) and a keep-alive client."""

    def __init__(self, tree: Path) -> None:
        self.ak = tree / ".venv" / "bin" / "agentkernel"
        self.tmp = Path(tempfile.mkdtemp(prefix="ak-bench-hot-"))
        self.env = _private_env(self.tmp, f"[daemon]\n{POOL_TOML}")
        port = _free_port()
        self.serve = subprocess.Popen([str(self.ak), "serve", "--port", str(port)],
                                      env=self.env, cwd=self.tmp, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.body = json.dumps({"command": ["true"], "image": "host",
                                "backend": "namespaces", "profile": "moderate"})
        self.headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        deadline = time.monotonic() + 60
        while True:
            try:
                self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                self.conn.request("GET", "/health")
                self.conn.getresponse().read()
                break
            except OSError:
                if self.serve.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise SystemExit("serve did not come up") from None
                time.sleep(0.1)

    def post(self) -> float:
        t = time.perf_counter()
        self.conn.request("POST", "/run", self.body, self.headers)
        r = self.conn.getresponse()
        data = r.read()
        took = (time.perf_counter() - t) * 1000
        if r.status != 200 or json.loads(data)["data"]["exit_code"] != 0:
            raise SystemExit(f"POST /run failed: {r.status} {data[:300]!r}")
        return took

    def fresh(self) -> None:
        """A new keep-alive connection, used once (the server closes idle ones after 5 s)."""
        self.conn.close()
        self.conn.request("GET", "/health")
        self.conn.getresponse().read()

    def counts(self) -> dict[str, int]:
        return pool_counts(self.ak, self.env)

    def close(self) -> None:
        self.conn.close()
        self.serve.terminate()
        try:
            self.serve.wait(30)
        except subprocess.TimeoutExpired:
            self.serve.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


def http_cases(trees: list[Path], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Paced and back-to-back `POST /run -- true`, each tree's server up at once and
    asked in turns: paced requests alternate; back-to-back ones come in blocks of
    `--block`, each block followed by a pause (its refills and teardown settle)."""
    targets: list[HttpTarget] = []
    try:
        for tree in trees:
            targets.append(HttpTarget(tree))
        for _ in range(3):  # each key's first runs; then the pools fill
            for t in targets:
                t.post()
            time.sleep(0.5)
        time.sleep(1.0)
        out: list[dict[str, Any]] = [{"paced": [], "b2b": [], "counts": {}} for _ in targets]
        for t in targets:
            t.fresh()
        for _ in range(args.paced_n):
            for t, got in zip(targets, out, strict=True):
                time.sleep(PACE)
                got["paced"].append(t.post())
        time.sleep(1.0)
        for _ in range(max(1, args.n // args.block)):
            for t, got in zip(targets, out, strict=True):
                before = t.counts()
                t.fresh()
                got["b2b"].extend(t.post() for _ in range(args.block))
                after = t.counts()
                for k in ("hits", "waited", "misses"):
                    got["counts"][k] = got["counts"].get(k, 0) + after.get(k, 0) - \
                        before.get(k, 0)
                time.sleep(2.0)
        return out
    finally:
        for t in targets:
            t.close()


class McpTarget:
    """One tree's daemon and an `agentkernel mcp-server` session to it (official SDK)."""

    def __init__(self, tree: Path) -> None:
        self.ak = tree / ".venv" / "bin" / "agentkernel"
        self.tmp = Path(tempfile.mkdtemp(prefix="ak-bench-hot-"))
        self.env = _private_env(self.tmp, "[daemon]\npool_min = 1\npool_max = 2\n"
                                          f"adhoc_min = 0\n{POOL_TOML}")
        (self.tmp / "proj").mkdir()
        subprocess.run([str(self.ak), "daemon", "start"], env=self.env, check=True,
                       capture_output=True)

    def params(self) -> Any:
        from mcp.client.stdio import StdioServerParameters

        return StdioServerParameters(command=str(self.ak), args=["mcp-server"],
                                     env=self.env, cwd=str(self.tmp / "proj"))

    def close(self) -> None:
        subprocess.run([str(self.ak), "daemon", "stop"], env=self.env, capture_output=True,
                       check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)


def mcp_case(trees: list[Path], args: argparse.Namespace) -> list[list[float]]:
    """Paced `sandbox_run(["true"])` calls, one stdio session per tree, in turns (the
    project dir's pool key warms on the first calls)."""
    import contextlib

    import anyio
    from mcp import Client

    targets = [McpTarget(tree) for tree in trees]
    samples: list[list[float]] = [[] for _ in targets]

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(Client(t.params())) for t in targets]
            for i in range(args.mcp_n + 3):
                for client, got in zip(clients, samples, strict=True):
                    await anyio.sleep(PACE)
                    t = time.perf_counter()
                    result = await client.call_tool("sandbox_run", {"command": ["true"]})
                    if result.is_error:
                        raise SystemExit(f"sandbox_run failed: {result.content}")
                    if i >= 3:
                        got.append((time.perf_counter() - t) * 1000)

    try:
        anyio.run(main)
    finally:
        for t in targets:
            t.close()
    return samples



class WasmTarget:
    """One tree's daemon and a client process of that tree's own (our wire, as the CLI
    speaks it) that runs a small WASI module over the daemon socket on request."""

    def __init__(self, tree: Path) -> None:
        self.ak = tree / ".venv" / "bin" / "agentkernel"
        self.tmp = Path(tempfile.mkdtemp(prefix="ak-bench-hot-"))
        self.env = _private_env(self.tmp, "[daemon]\npools = []\n")
        self.env["AGENTKERNEL_DAEMON_AUTOSTART"] = "0"
        proj = self.tmp / "proj"
        proj.mkdir()
        sys.path.insert(0, str(ROOT / "tests"))
        from wasm_modules import HELLO

        (proj / "hello.wat").write_text(HELLO)
        subprocess.run([str(self.ak), "daemon", "start"], env=self.env, check=True,
                       capture_output=True)
        req = json.dumps({"argv": ["hello.wat"], "cwd": str(proj)})
        self.proc = subprocess.Popen([str(tree / ".venv" / "bin" / "python"), "-c",
                                      SOCKET_RUN_CLIENT, req], env=self.env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def samples(self, n: int, pause: float) -> list[float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps([n, pause]) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("the wasm client failed")
        return list(json.loads(line))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(30)
        subprocess.run([str(self.ak), "daemon", "stop"], env=self.env, capture_output=True,
                       check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)


def wasm_cases(trees: list[Path], args: argparse.Namespace) -> list[dict[str, list[float]]]:
    """The module over each tree's daemon socket, paced (alternating single runs) and back
    to back (alternating blocks); compiled and its worker warm first."""
    targets: list[WasmTarget] = []
    out: list[dict[str, list[float]]] = [{"paced": [], "b2b": []} for _ in trees]
    try:
        for tree in trees:
            targets.append(WasmTarget(tree))
        for t in targets:
            t.samples(3, 1.0)  # the key, its worker, the daemon's compiling engine
        time.sleep(1.0)
        for _ in range(args.paced_n):
            for t, got in zip(targets, out, strict=True):
                got["paced"] += t.samples(1, PACE)
        for _ in range(max(1, args.n // args.block)):
            for t, got in zip(targets, out, strict=True):
                got["b2b"] += t.samples(args.block, 0.0)
        return out
    finally:
        for t in targets:
            t.close()


def tree_commit(tree: Path) -> str:
    r = subprocess.run(["git", "-C", str(tree), "describe", "--always", "--dirty",
                        "--abbrev=12"], capture_output=True, text=True, check=False)
    return r.stdout.strip() or str(tree)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=100, help="back-to-back requests")
    ap.add_argument("--paced-n", type=int, default=30, help="paced requests")
    ap.add_argument("--mcp-n", type=int, default=30, help="paced MCP calls")
    ap.add_argument("--rounds", type=int, default=1, help="repeats of every case")
    ap.add_argument("--block", type=int, default=25,
                    help="back-to-back requests to one tree before the next tree's turn")
    ap.add_argument("--skip", default="", help="comma-separated: http, mcp, wasm")
    ap.add_argument("--baseline-tree", type=Path, default=None,
                    help="another checkout with its own .venv (e.g. /work/main), measured "
                         "in turns with this one")
    args = ap.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    st = stamp()
    trees: list[tuple[str, Path]] = []
    if args.baseline_tree is not None:
        trees.append((f"baseline {tree_commit(args.baseline_tree)}", args.baseline_tree))
    trees.append((f"this tree {st['commit']}", ROOT))
    floor = Path(tempfile.mkdtemp(prefix="ak-bench-hot-"))
    fork = timed(["/bin/true"], 30, cwd=floor)
    shutil.rmtree(floor, ignore_errors=True)
    rows: dict[str, dict[str, list[float]]] = {tag: {} for tag, _ in trees}
    counts: dict[str, dict[str, int]] = {tag: {} for tag, _ in trees}
    paths = [tree for _, tree in trees]
    for _ in range(args.rounds):
        if "http" not in skip:
            for (tag, _), h in zip(trees, http_cases(paths, args), strict=True):
                rows[tag].setdefault("HTTP POST /run -- true, paced", []).extend(h["paced"])
                rows[tag].setdefault(f"HTTP POST /run -- true, back to back (blocks of "
                                     f"{args.block})", []).extend(h["b2b"])
                for k, v in h["counts"].items():
                    counts[tag][k] = counts[tag].get(k, 0) + v
        if "mcp" not in skip:
            for (tag, _), m in zip(trees, mcp_case(paths, args), strict=True):
                rows[tag].setdefault("MCP sandbox_run `true` over stdio, paced", []).extend(m)
        if "wasm" not in skip:
            for (tag, _), w in zip(trees, wasm_cases(paths, args), strict=True):
                rows[tag].setdefault("wasm module over the daemon socket, paced",
                                     []).extend(w["paced"])
                rows[tag].setdefault(f"wasm module over the daemon socket, back to back "
                                     f"(blocks of {args.block})", []).extend(w["b2b"])
    st["load after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    base_tag = trees[0][0] if args.baseline_tree is not None else None
    md = [f"# Warm request latency {st['time']}", "", *stamp_lines(st), "",
          f"{args.rounds} round(s), trees in turns. Ratios: p50 over the baseline tree's "
          "p50 of the same case, measured in this run" if base_tag else
          "No baseline tree: ratios are to fork/exec of /bin/true.", "", *TABLE_HEAD,
          summary("floor: fork/exec /bin/true", fork, pct(fork, 0.5))]
    for case in rows[trees[-1][0]]:
        for tag, _ in trees:
            samples = rows[tag].get(case, [])
            base = pct(rows[base_tag].get(case, []), 0.5) if base_tag else pct(fork, 0.5)
            md.append(summary(f"{tag}: {case}", samples, base or None))
    md.append("")
    for tag, c in counts.items():
        if c:
            total = c.get("hits", 0) + c.get("misses", 0)  # `waited` is among the hits
            md.append(f"- {tag}: back-to-back takes that found a warm sandbox "
                      f"{c.get('hits', 0) - c.get('waited', 0)}/{total}, waited for a start "
                      f"under way {c.get('waited', 0)}, started cold {c.get('misses', 0)}")
    text = "\n".join(md) + "\n"
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    name = time.strftime("hotpath-%Y%m%d-%H%M%S")
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(
        {"stamp": st, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
         "counts": counts, "floor": fork}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
