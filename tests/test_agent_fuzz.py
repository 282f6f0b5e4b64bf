"""libFuzzer run over the agent's frame splitter and TLV request parsers."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FUZZ_SECONDS = 20


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("clang") is None, reason="clang (libFuzzer) is not installed")
def test_frame_parser_survives_fuzzing(tmp_path: Path) -> None:
    subprocess.run(["make", "-s", "-C", str(ROOT / "agent"), "fuzz"], check=True)
    corpus = tmp_path / "corpus"
    shutil.copytree(ROOT / "agent" / "fuzz" / "corpus", corpus)
    proc = subprocess.run(
        [
            str(ROOT / "agent" / "build" / "fuzz-frames"),
            f"-max_total_time={FUZZ_SECONDS}",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=FUZZ_SECONDS + 120,
        check=False,
    )
    log = proc.stderr
    crashes = sorted(
        p.name
        for p in tmp_path.iterdir()
        if p.name.startswith(("crash-", "leak-", "oom-", "timeout-"))
    )
    assert proc.returncode == 0 and not crashes, f"fuzzer found {crashes}:\n{log[-4000:]}"
    runs = re.search(r"Done (\d+) runs in (\d+) second", log)
    assert runs, log[-2000:]
    print(
        f"fuzz-frames: {runs[1]} runs in {runs[2]} s "
        f"({int(runs[1]) // max(1, int(runs[2]))} execs/s), no crashes"
    )
