"""Signal handlers swapped in for a block and put back after it (the main thread's only)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from types import FrameType


@contextlib.contextmanager
def handlers_swapped(sigs: Iterable[int], handler: Callable[[int, FrameType | None], object],
                     ) -> Iterator[bool]:
    """`handler` for each of `sigs` while the block runs, the handlers they had after it
    (also when it raises). Only the main thread may set handlers: elsewhere nothing is
    swapped, and the block is told so (False)."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {sig: signal.signal(sig, handler) for sig in sigs}
    try:
        yield True
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
