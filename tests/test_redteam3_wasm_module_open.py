"""Outside review: the wasm backend opens only a regular file as the module.

The module a run names is usually the project's (`agentkernel run -- app.wasm` in a cloned
repository). The host (the CLI, or the daemon, as root for root) opened that path before
checking what it was: a link there to a device would be opened (/dev/watchdog arms on
open; a tty without O_NOCTTY becomes a session leader's controlling terminal) and a FIFO
too. detect._read_regular already promises "a device is never opened" for ./Procfile.
The test observes the open with a FIFO: a writer blocked on it wakes only if someone
opened it for reading.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from sandbox_helpers import ak, ak_as_user, nobody_home

pytest.importorskip("wasmtime")
if shutil.which("bwrap") is None:
    pytest.skip("the wasm worker runs in a namespaces sandbox: needs bwrap",
                allow_module_level=True)


class FifoWatch:
    """A writer blocked on opening `fifo`: `opened` tells whether a reader came."""

    def __init__(self, fifo: Path) -> None:
        self.fifo = fifo
        self.woke = threading.Event()
        self.thread = threading.Thread(target=self._writer, daemon=True)
        self.thread.start()

    def _writer(self) -> None:
        fd = os.open(self.fifo, os.O_WRONLY)  # blocks until a reader opens the FIFO
        self.woke.set()
        os.close(fd)

    def opened(self) -> bool:
        seen = self.woke.wait(0.5)
        if not seen:  # release the writer: our own reader
            fd = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
            self.woke.wait(10)
            os.close(fd)
        self.thread.join(10)
        return seen


def _plant(project: Path) -> Path:
    fifo = project / "pipe"
    os.mkfifo(fifo)
    (project / "app.wasm").symlink_to("pipe")
    return fifo


def test_a_module_linked_to_a_fifo_is_never_opened(tmp_path: Path) -> None:
    project = tmp_path / "repo"
    project.mkdir()
    watch = FifoWatch(_plant(project))
    r = ak("run", "-B", "wasm", "--", "app.wasm", cwd=project,
           env={"AGENTKERNEL_NO_DAEMON": "1", "HOME": str(tmp_path)}, timeout=60)
    assert r.returncode != 0 and "not a regular file" in r.stderr, r.stderr
    assert not watch.opened(), "the host opened the project's FIFO as a module"


def test_a_module_linked_to_a_fifo_is_never_opened_as_nobody() -> None:
    with nobody_home() as home:
        project = home / "project"
        fifo = _plant(project)
        for path in (fifo, project / "app.wasm"):
            os.chown(path, 65534, 65534, follow_symlinks=False)
        watch = FifoWatch(fifo)
        proc = ak_as_user(65534, home, "run", "-B", "wasm", "--", "app.wasm", cwd=project,
                          timeout=60)
        _out, err = proc.communicate(timeout=90)
        assert proc.returncode != 0 and "not a regular file" in err, err
        assert not watch.opened(), "nobody's CLI opened the project's FIFO as a module"
