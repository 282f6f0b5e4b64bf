"""Benchmark our image pull+unpack against `skopeo copy` + `umoci unpack`, same image, same run.

Starts a local docker-registry, pushes a busybox + python-stdlib image, times both tools
from an empty store (p50 of N), checks that a second pull transfers no blob, and writes
bench/results/images-<stamp>.md.
Usage: .venv/bin/python bench/bench_images.py [-n 5]
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "images"))

from harness import Pusher, Registry, busybox_layer  # noqa: E402

VENV_PY = ROOT / ".venv" / "bin" / "python"
_VER = f"{sys.version_info.major}.{sys.version_info.minor}"
PY_STDLIB = Path(sys.base_prefix) / "lib" / f"python{_VER}"


def stdlib_layer() -> bytes:
    """A many-file layer: the Python standard library (no caches), as in a real image."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(PY_STDLIB, arcname="usr/lib/python3",
                filter=lambda ti: None if "__pycache__" in ti.name or "site-packages" in ti.name
                else ti)
    return buf.getvalue()


def timed(argvs: list[list[str]], n: int, reset: list[Path]) -> list[float]:
    samples = []
    for _ in range(n):
        for path in reset:
            shutil.rmtree(path, ignore_errors=True)
        t = time.perf_counter()
        for argv in argvs:
            subprocess.run(argv, check=True, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        samples.append(time.perf_counter() - t)
    return samples


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=5)
    args = ap.parse_args()
    for tool in ("skopeo", "umoci", "/usr/bin/docker-registry"):
        if not shutil.which(tool):
            print(f"missing {tool} (scripts/test.sh installs it)", file=sys.stderr)
            return 1
    work = Path(tempfile.mkdtemp(prefix="ak-bench-images-"))
    reg = Registry(work / "registry").start()
    try:
        layers = [busybox_layer(), stdlib_layer()]
        Pusher(reg.url).image("bench/img", "1", layers)
        ref = f"{reg.host}/bench/img:1"
        raw = sum(len(x) for x in layers)
        store = work / "store"
        ours_code = (
            "import sys; from pathlib import Path;"
            "from agentkernel.images import pull;"
            "from agentkernel.images.registry import RegistryOptions;"
            "from agentkernel.images.store import Store;"
            "pull(sys.argv[1], config=RegistryOptions(insecure=frozenset({sys.argv[2]})),"
            " store=Store(Path(sys.argv[3])), progress=False)"
        )
        ours = [[str(VENV_PY), "-c", ours_code, ref, reg.host, str(store)]]
        oci, bundle = work / "oci", work / "bundle"
        theirs = [
            ["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}",
             f"oci:{oci}:img"],
            ["umoci", "unpack", "--image", f"{oci}:img", str(bundle)],
        ]
        # Interleave so both see the same machine state.
        ours_s: list[float] = []
        theirs_s: list[float] = []
        for _ in range(args.n):
            ours_s += timed(ours, 1, [store])
            theirs_s += timed(theirs, 1, [oci, bundle])
        # Second pull of a cached image: count blob GETs in the registry's access log.
        shutil.rmtree(store, ignore_errors=True)
        timed(ours, 1, [])
        before = reg.blob_gets()
        t = time.perf_counter()
        subprocess.run(ours[0], check=True)
        cached = time.perf_counter() - t
        second_blobs = reg.blob_gets() - before
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)

    p_ours, p_theirs = statistics.median(ours_s), statistics.median(theirs_s)
    lines = [
        f"# Image pull+unpack benchmark ({time.strftime('%Y-%m-%d %H:%M:%S')})",
        "",
        f"Image: busybox + Python stdlib layers, {raw / 1e6:.1f} MB uncompressed, gzip, "
        f"from a local docker-registry; p50 of {args.n} runs each, interleaved, empty store.",
        "",
        "| case | p50 | min | max |",
        "|---|---|---|---|",
        f"| agentkernel pull (process incl. Python start) | {p_ours * 1000:.0f} ms "
        f"| {min(ours_s) * 1000:.0f} ms | {max(ours_s) * 1000:.0f} ms |",
        f"| skopeo copy + umoci unpack | {p_theirs * 1000:.0f} ms "
        f"| {min(theirs_s) * 1000:.0f} ms | {max(theirs_s) * 1000:.0f} ms |",
        f"| agentkernel pull, image cached | {cached * 1000:.0f} ms | | |",
        "",
        f"Ratio ours/theirs: {p_ours / p_theirs:.2f}. "
        f"Second pull of the cached image fetched {second_blobs} blobs "
        f"({'OK' if second_blobs == 0 else 'FAIL'}).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"images-{time.strftime('%Y%m%d-%H%M%S')}.md").write_text(text)
    return 0 if second_blobs == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
