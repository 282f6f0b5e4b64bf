"""server.settle_gc: the daemon's collector settings once it is loaded (and the switch back)."""

from __future__ import annotations

import os
import subprocess
import sys

CODE = ("import gc\n"
        "from agentkernel.daemon.server import settle_gc, GC_YOUNG\n"
        "before = gc.get_threshold()[0]\n"
        "settle_gc()\n"
        "print(before, gc.get_threshold()[0], gc.get_freeze_count() > 0, GC_YOUNG)\n")


def _run(**env: str) -> list[str]:
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                       timeout=60, check=True, env={**os.environ, **env})
    return r.stdout.split()


def test_settle_gc_freezes_the_loaded_heap_and_collects_young_objects_less_often() -> None:
    before, after, frozen, young = _run(AGENTKERNEL_GC_DEFAULT="0")
    assert after == young != before
    assert frozen == "True"


def test_gc_default_keeps_pythons_settings() -> None:
    before, after, frozen, _young = _run(AGENTKERNEL_GC_DEFAULT="1")
    assert after == before
    assert frozen == "False"
