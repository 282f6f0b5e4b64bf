"""A pull's progress on stderr (what `images pull` and a run that pulls show)."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class ProgressPrinter:
    """Per-layer progress on stderr: redrawn lines on a terminal, one line per step otherwise."""

    def __init__(self, ref: str, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.ref = ref
        self._rows: dict[str, list[Any]] = {}  # digest → [state, done, total]
        self._lock = threading.Lock()
        self._drawn = 0
        self._last = 0.0

    def _say(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def start(self, layers: list[tuple[str, int, bool]]) -> None:
        with self._lock:
            self._say(f"pulling {self.ref} ({len(layers)} layers)")
            for digest, size, cached in layers:
                self._rows[digest] = ["cached" if cached else "waiting", 0, size]
                if not self.tty:
                    self._say(f"  {digest[7:19]} {'cached' if cached else 'fetching'} "
                              f"{_human(size)}")
            self._draw(force=True)

    def update(self, digest: str, done: int, total: int) -> None:
        with self._lock:
            row = self._rows.get(digest)
            if row is not None:
                row[0], row[1], row[2] = "downloading", done, total
                self._draw()

    def unpacking(self, digest: str) -> None:
        with self._lock:
            if digest in self._rows:
                self._rows[digest][0] = "unpacking"
                self._draw(force=True)

    def done(self, digest: str) -> None:
        with self._lock:
            if digest in self._rows:
                self._rows[digest][0] = "done"
                self._rows[digest][1] = self._rows[digest][2]
                if not self.tty:
                    self._say(f"  {digest[7:19]} done")
                self._draw(force=True)

    def _draw(self, force: bool = False) -> None:
        if not self.tty:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        out = []
        if self._drawn:
            out.append(f"\x1b[{self._drawn}F")  # back to the first row we drew
        for digest, (state, done, total) in self._rows.items():
            bar = ""
            if state == "downloading" and total:
                filled = int(20 * done / total)
                bar = f" [{'=' * filled}{' ' * (20 - filled)}] {_human(done)}/{_human(total)}"
            out.append(f"\x1b[2K  {digest[7:19]} {state}{bar}\n")
        self.stream.write("".join(out))
        self.stream.flush()
        self._drawn = len(self._rows)

    def close(self) -> None:
        with self._lock:
            self._draw(force=True)
