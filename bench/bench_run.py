"""Benchmark `agentkernel run -- true` against its building blocks, measured in the same run.

Cases: in-process runs (no daemon: what a first run costs) and runs through a private
daemon's warm pool (what later runs cost), next to bare fork/exec, python, bwrap and runsc.
Prints p50/p95 per case and ratios to the baselines; writes bench/results/run-<time>.{json,md}.
Usage: .venv/bin/python bench/bench_run.py [-n 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import pct, timed

ROOT = Path(__file__).resolve().parent.parent
VENV_PY = ROOT / ".venv" / "bin" / "python"
AK = ROOT / ".venv" / "bin" / "agentkernel"


def daemon_cases(tmp: Path, proj: Path, n: int, backends: list[str]) -> dict[str, list[float]]:
    """`run -- true` through a private daemon's warm pool, per backend (restrictive)."""
    env = {**os.environ, "AGENTKERNEL_HOME": str(tmp / "daemon-home"),
           "AGENTKERNEL_RUNTIME_DIR": str(tmp / "daemon-run")}
    env.pop("AGENTKERNEL_NO_DAEMON", None)
    subprocess.run([str(AK), "daemon", "start"], env=env, check=True, capture_output=True)
    cases: dict[str, list[float]] = {}
    try:
        for backend in backends:
            argv = [str(AK), "run", "-q", "-i", "host", "-B", backend, "-p", "restrictive",
                    "--", "true"]
            timed(argv, 3, cwd=proj, env=env, pause=1.0)  # the first runs create the key's pool
            cases[f"agentkernel run {backend} restrictive, via daemon"] = timed(
                argv, n, cwd=proj, env=env, pause=0.3 if backend == "namespaces" else 0.8)
    finally:
        subprocess.run([str(AK), "daemon", "stop"], env=env, capture_output=True, check=False)
    return cases


def runsc_bundle(tmp: Path) -> Path:
    bundle = tmp / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    for d in ("usr", "proc", "dev", "tmp", "etc"):
        (bundle / "rootfs" / d).mkdir()
    for link in ("bin", "lib", "lib64"):
        os.symlink(f"usr/{link}", bundle / "rootfs" / link)
    config = {
        "ociVersion": "1.0.2",
        "process": {"args": ["/bin/true"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                    "env": ["PATH=/usr/bin:/bin"]},
        "root": {"path": "rootfs", "readonly": True},
        "mounts": [{"destination": "/usr", "type": "bind", "source": "/usr",
                    "options": ["rbind", "ro"]},
                   {"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")]},
    }
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def cached_image(tmp: Path) -> str | None:
    """Push a busybox image to a throwaway local registry and pull it into this run's store."""
    sys.path.insert(0, str(ROOT / "tests" / "images"))
    try:
        from harness import Pusher, Registry, busybox_layer
    except ImportError:
        return None
    if not Path("/usr/bin/docker-registry").exists():
        return None
    reg = Registry(tmp / "registry").start()
    try:
        Pusher(reg.url).image("bench/busybox", "1", [busybox_layer()])
        ref = f"{reg.host}/bench/busybox:1"
        os.environ["AGENTKERNEL_HOME"] = str(tmp / "akhome")
        (tmp / "proj" / "agentkernel.toml").write_text(
            f'[images]\ninsecure_registries = ["{reg.host}"]\n')
        subprocess.run([str(AK), "images", "pull", "-q", ref], cwd=tmp / "proj", check=True,
                       stdout=subprocess.DEVNULL)
        # Timed runs use the cached image only: no config file (its parsing is not the
        # image's cost), no registry.
        (tmp / "proj" / "agentkernel.toml").unlink()
    finally:
        reg.stop()  # the image is cached now: runs must not need the registry
    return ref


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=20)
    args = ap.parse_args()
    n = args.n
    # In-process cases: never through a daemon the user may have running.
    os.environ["AGENTKERNEL_NO_DAEMON"] = "1"
    tmp = Path(tempfile.mkdtemp(prefix="ak-bench-"))
    proj = tmp / "proj"
    proj.mkdir()
    cases: dict[str, list[float]] = {}
    cases["fork/exec true"] = timed(["/bin/true"], n, cwd=proj)
    cases["venv python -c pass"] = timed([str(VENV_PY), "-c", "pass"], n, cwd=proj)
    cases["agentkernel --version"] = timed([str(AK), "--version"], n, cwd=proj)
    if shutil.which("bwrap"):
        cases["bwrap direct"] = timed(
            ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr",
             "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
             "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev",
             "/bin/true"], n, cwd=proj)
        for profile in ("restrictive", "moderate"):
            cases[f"agentkernel run namespaces {profile}"] = timed(
                [str(AK), "run", "-q", "-i", "host", "-B", "namespaces", "-p", profile, "--",
                 "true"], n, cwd=proj)
        image = cached_image(tmp)
        if image:
            for profile in ("restrictive", "moderate"):
                cases[f"agentkernel run namespaces {profile}, cached image"] = timed(
                    [str(AK), "run", "-q", "-i", image, "-B", "namespaces", "-p", profile,
                     "--", "sh", "-c", ":"], n, cwd=proj)
    if shutil.which("runsc"):
        bundle = runsc_bundle(tmp)
        state = tmp / "runsc-state"
        i = iter(range(10**6))
        cases["runsc direct"] = [timed(
            ["runsc", f"--root={state}", "--network=none", "--ignore-cgroups", "run",
             f"--bundle={bundle}", f"bench-{next(i)}"], 1, cwd=proj)[0] for _ in range(n)]
        for profile in ("restrictive", "moderate"):
            cases[f"agentkernel run gvisor {profile}"] = timed(
                [str(AK), "run", "-q", "-i", "host", "-B", "gvisor", "-p", profile, "--", "true"],
                n, cwd=proj)
    os.environ.pop("AGENTKERNEL_HOME", None)  # set by cached_image for the in-process runs
    cases.update(daemon_cases(tmp, proj, n, [b for b in ("namespaces", "gvisor")
                                             if shutil.which("bwrap" if b == "namespaces"
                                                             else "runsc")]))
    shutil.rmtree(tmp, ignore_errors=True)

    rows = {k: {"p50": statistics.median(v), "p95": pct(v, 0.95), "n": len(v)}
            for k, v in cases.items()}
    lines = [f"# `agentkernel run -- true` (n={n}, {time.strftime('%Y-%m-%d %H:%M')})", "",
             "| case | p50 ms | p95 ms |", "|---|---|---|"]
    lines += [f"| {k} | {r['p50']:.1f} | {r['p95']:.1f} |" for k, r in rows.items()]
    lines.append("")

    def ratio(a: str, b: str) -> str:
        if a in rows and b in rows:
            return f"{rows[a]['p50'] / rows[b]['p50']:.2f}x"
        return "n/a"

    py = rows["venv python -c pass"]["p50"]
    version_ratio = ratio("agentkernel --version", "venv python -c pass")
    lines.append(f"- `--version` vs venv python: {version_ratio} (goal <= 1.5x)")
    if "bwrap direct" in rows:
        budget = rows["bwrap direct"]["p50"] + py + 15
        got = rows["agentkernel run namespaces restrictive"]["p50"]
        lines.append(f"- namespaces run (restrictive), in-process (a first run, no daemon) "
                     f"{got:.1f} ms vs budget bwrap+python+15 = {budget:.1f} ms")
    cached = "agentkernel run namespaces restrictive, cached image"
    if cached in rows:
        extra = rows[cached]["p50"] - rows["agentkernel run namespaces restrictive"]["p50"]
        lines.append(f"- cached image vs host rootfs (namespaces, restrictive): {extra:+.1f} ms"
                     " (goal <= +10 ms)")
    via = "agentkernel run namespaces restrictive, via daemon"
    if "bwrap direct" in rows and via in rows:
        budget = rows["bwrap direct"]["p50"] + rows["agentkernel --version"]["p50"] + 15
        lines.append(f"- namespaces run (restrictive) via the daemon (what runs after the "
                     f"first get): {rows[via]['p50']:.1f} ms vs budget bwrap + CLI start-up "
                     f"(--version) + 15 = {budget:.1f} ms")
    if "runsc direct" in rows:
        gv = ratio("agentkernel run gvisor restrictive", "runsc direct")
        lines.append(f"- gvisor run vs runsc direct: {gv} (goal <= 1.2x)")
        gv_daemon = ratio("agentkernel run gvisor restrictive, via daemon", "runsc direct")
        lines.append(f"- gvisor run via the daemon vs runsc direct: {gv_daemon}")
    report = "\n".join(lines)
    print(report)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"run-{stamp}.json").write_text(json.dumps(rows, indent=2))
    (out / f"run-{stamp}.md").write_text(report + "\n")


if __name__ == "__main__":
    sys.exit(main())
