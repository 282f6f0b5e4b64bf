"""The CLI's wire to the daemon: JSON values, a unix stream socket and signal handlers.

Every `run` and `exec` through the daemon pays for what it imports, and the public `json`,
`socket` and `signal` modules wrap C modules in Python that builds regexes and IntEnums at
import: ~7 ms of a ~21 ms warm run here. When the interpreter has those C modules (CPython
does) this module calls them directly — the same encoder, scanner, socket and handlers the
public modules use — and otherwise falls back to the public modules.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

try:
    import _json
    import _signal  # type: ignore[import-not-found]  # (no stub: signal's C half)
    import _socket
except ImportError:  # not CPython: the public modules, at their import cost
    _json = _signal = _socket = None  # type: ignore[assignment]

if _json is not None:
    # As json.dumps(obj, ensure_ascii=False, separators=(",", ":")) and json.loads.
    def _unencodable(obj: object) -> None:
        raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")

    _encode = _json.make_encoder(None, _unencodable, _json.encode_basestring, None, ":", ",",
                                 False, False, True)

    class _ScanContext:
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int

        @staticmethod
        def parse_constant(name: str) -> float:
            return {"-Infinity": float("-inf"), "Infinity": float("inf"),
                    "NaN": float("nan")}[name]

    # Typeshed types the context as a JSONDecoder; the C scanner reads these six fields.
    _scan = _json.make_scanner(_ScanContext())  # type: ignore[arg-type]


def dumps(obj: Any) -> str:
    """Compact JSON text for `obj` (dicts, lists, strings, numbers, bools, None)."""
    if _json is None:
        import json

        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return "".join(_encode(obj, 0))


def loads(data: bytes | str) -> Any:
    """The JSON value `data` holds; ValueError if it holds anything else."""
    text = data.decode() if isinstance(data, bytes) else data
    if _json is None:
        import json

        return json.loads(text)
    text = text.strip(" \t\r\n")
    try:
        value, end = _scan(text, 0)
    except StopIteration as exc:
        raise ValueError(f"not JSON (at character {exc.value})") from None
    if end != len(text):
        raise ValueError(f"extra data after the JSON value (at character {end})")
    return value


def unix_socket() -> Any:
    """An AF_UNIX stream socket (connect, sendall, recv, fileno, close)."""
    if _socket is None:
        import socket

        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    return _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)


def signal_number(name: str) -> int:
    if _signal is None:
        import signal

        return int(getattr(signal, name))
    return int(getattr(_signal, name))


def set_handler(signo: int, handler: Callable[[int, Any], None] | Any) -> Any:
    """signal.signal, returning the previous handler."""
    if _signal is None:
        import signal

        return signal.signal(signo, handler)
    return _signal.signal(signo, handler)


def set_wakeup_fd(fd: int) -> int:
    """signal.set_wakeup_fd(fd, warn_on_full_buffer=False), returning the previous fd: a
    signal then also writes a byte to `fd`, so a select() about to block wakes for it."""
    if _signal is None:
        import signal

        return signal.set_wakeup_fd(fd, warn_on_full_buffer=False)
    return int(_signal.set_wakeup_fd(fd, warn_on_full_buffer=False))
