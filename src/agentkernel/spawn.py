"""posix_spawn through ctypes: a child started without holding the GIL while it execs.

CPython holds the GIL through `os.posix_spawn` and through `subprocess.Popen`'s
vfork+exec until the child has exec'd. On a busy machine that child may wait for a CPU
for milliseconds (measured under 16 HTTP clients on two cores: p50 1.5 ms, p90 4-5 ms,
max 15 ms per bwrap start), and every other thread of the daemon (the requests' too)
waits with it. A foreign call through ctypes lets go of the GIL. The child gets what
Popen(close_fds=True, pass_fds=..., start_new_session=True, restore_signals=True) gives
it: its stdio, the passed descriptors, nothing else open, its own session, SIGPIPE and
SIGXFSZ at their defaults (Python ignores SIGPIPE). glibc only (closefrom); callers fall
back to subprocess where `available()` is False.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

# glibc's opaque posix_spawn_file_actions_t (80 bytes), posix_spawnattr_t (336) and
# sigset_t (128), with room to spare; the flags from its spawn.h.
_OPAQUE = 1024
_SETSIGDEF = 0x04
_SETSID = 0x80
# What restore_signals resets, and glibc's internal signals (SIGCANCEL, SIGSETXID).
_DEFAULT_SIGNALS = (int(signal.SIGPIPE), int(signal.SIGXFSZ), 32, 33)


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    needed = ("posix_spawn", "posix_spawn_file_actions_addclosefrom_np",
              "posix_spawnattr_setsigdefault")
    return libc if all(hasattr(libc, name) for name in needed) else None


def available() -> bool:
    """Whether this libc has what `spawn` needs (glibc 2.34 and later)."""
    return _libc() is not None


def _check(err: int, what: str) -> None:
    if err != 0:
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _file_actions(libc: ctypes.CDLL, actions: Any, stdio: Sequence[int],
                  keep: Sequence[int], devnull_stderr: bool, below_kept: bool) -> None:
    for target, fd in enumerate(stdio):
        _check(libc.posix_spawn_file_actions_adddup2(actions, fd, target), "adddup2")
    if devnull_stderr:
        _check(libc.posix_spawn_file_actions_addopen(actions, 2, b"/dev/null",
                                                     os.O_WRONLY, 0), "addopen")
    for fd in keep:  # dup2 onto itself clears close-on-exec (glibc 2.29 and later)
        _check(libc.posix_spawn_file_actions_adddup2(actions, fd, fd), "adddup2")
    top = max([2, *keep])
    for fd in range(3, top) if below_kept else ():  # below the last kept one: each not kept
        if fd not in keep:  # (closing one that is not open is no error: glibc ignores it)
            _check(libc.posix_spawn_file_actions_addclose(actions, fd), "addclose")
    _check(libc.posix_spawn_file_actions_addclosefrom_np(actions, top + 1), "addclosefrom")


def _attributes(libc: ctypes.CDLL, attr: Any, setsid: bool) -> None:
    # Built by hand: sigaddset refuses glibc's own signals (32, 33), and without them in
    # this set glibc's child leaves them ignored, which exec keeps (Popen's child does not).
    words = (ctypes.c_uint64 * (_OPAQUE // 8))()
    for sig in _DEFAULT_SIGNALS:
        words[(sig - 1) // 64] |= 1 << ((sig - 1) % 64)
    _check(libc.posix_spawnattr_setsigdefault(attr, words), "setsigdefault")
    flags = _SETSIGDEF | (_SETSID if setsid else 0)
    _check(libc.posix_spawnattr_setflags(attr, ctypes.c_short(flags)), "setflags")


def spawn(argv: Sequence[str], env: Mapping[str, str], *, stdio: Sequence[int] = (),
          keep: Sequence[int] = (), devnull_stderr: bool = False, setsid: bool = True,
          child_closes: bool = False) -> int:
    """Start `argv` (argv[0] an absolute path) with `env`; `stdio` the fds that become
    0, 1, 2 in order, `keep` those it also gets at their own numbers, `devnull_stderr`
    stderr /dev/null. Its pid (the caller reaps it); OSError if it could not start.

    `child_closes`: argv[0] closes every descriptor but `keep` itself before it does
    anything else (ak-enter --keep): only those above the highest kept one are closed
    here (one file action each below it costs ~1 us of this process's CPU)."""
    libc = _libc()
    if libc is None:
        raise OSError(0, "posix_spawn through ctypes is not available here")
    if not argv or not argv[0].startswith("/"):
        raise OSError(0, "spawn needs an absolute program path")
    if any(fd < 3 and fd != target for target, fd in enumerate(stdio)) or \
            any(fd < 3 for fd in keep):
        raise OSError(0, "spawn's descriptors must lie above stderr")  # no dup2 order puzzle
    actions = ctypes.create_string_buffer(_OPAQUE)
    attr = ctypes.create_string_buffer(_OPAQUE)
    _check(libc.posix_spawn_file_actions_init(actions), "file_actions_init")
    try:
        _check(libc.posix_spawnattr_init(attr), "spawnattr_init")
        try:
            _file_actions(libc, actions, stdio, sorted(set(keep)), devnull_stderr,
                          not child_closes)
            _attributes(libc, attr, setsid)
            args = [a.encode("utf-8", "surrogateescape") for a in argv]  # as os.fsencode
            c_argv = (ctypes.c_char_p * (len(args) + 1))(*args, None)
            envs = [f"{k}={v}".encode("utf-8", "surrogateescape") for k, v in env.items()]
            c_env = (ctypes.c_char_p * (len(envs) + 1))(*envs, None)
            pid = ctypes.c_int(0)
            err = libc.posix_spawn(ctypes.byref(pid), args[0], actions, attr, c_argv, c_env)
            if err != 0:
                raise OSError(err, os.strerror(err), argv[0])
            return pid.value
        finally:
            libc.posix_spawnattr_destroy(attr)
    finally:
        libc.posix_spawn_file_actions_destroy(actions)


class SpawnedPopen(subprocess.Popen[bytes]):
    """A Popen (poll, wait, kill, returncode as ever) whose child `spawn` started: for
    callers that hand their fds in (no PIPE, no text mode, no preexec function)."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], *, stdin: int,
                 stdout: int, stderr: int, pass_fds: Sequence[int] = (),
                 child_closes: bool = False) -> None:
        self._ak_plan = (list(argv), dict(env), (stdin, stdout, stderr), tuple(pass_fds),
                         child_closes)
        super().__init__(list(argv), stdin=stdin, stdout=stdout, stderr=stderr,
                         start_new_session=True)

    def _execute_child(self, *_args: Any) -> None:
        argv, env, stdio, keep, child_closes = self._ak_plan
        self.pid = spawn(argv, env, stdio=stdio, keep=keep, child_closes=child_closes)
        self._child_created = True
        self._closed_child_pipe_fds = True
