"""Never host root: the unprivileged host id range root-started sandboxes run in, and the
id-mapped mounts that let them use host files as if they were root.

Started by root, a sandbox's user namespace maps its ids 0..65535 to a range of host ids
nobody owns (`host_range`). Every kernel check that looks at the host uid alone (global
sysctls, SO_PEERCRED, files outside the sandbox) then sees an ordinary user. The host
dirs a sandbox is given (an image's root filesystem, the project, its persistent layers)
reach it as id-mapped mounts (`idmapped_tree`): on those mounts, and only there, files
owned by host uid 0 show up as owned by the sandbox's uid 0, and what the sandbox creates
lands as uid 0 on disk, exactly as before. The host's own userland is not id-mapped
(`unmapped_tree`): what host root keeps to itself there stays its own.

The syscalls (open_tree, mount_setattr, setns) have no wrapper in Python's os module:
they are called through ctypes, loaded only by the backends that need them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Collection
from functools import lru_cache
from typing import NamedTuple

from .errors import SandboxError
from .paths import which

# Linux's generic syscall numbers (the same on x86_64 and aarch64 since 5.2).
_SYS_OPEN_TREE = 428
_SYS_MOUNT_SETATTR = 442
_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = 0o2000000
_AT_RECURSIVE = 0x8000
_AT_EMPTY_PATH = 0x1000
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4
_MOUNT_ATTR_IDMAP = 0x100000
# A detached copy (open_tree's clone) of a shared mount is that mount's peer: what is mounted
# on it inside a sandbox would show on the host's (and every other sandbox's) copy. Each
# copy we hand out is made private (bwrap's own binds are made in a slave namespace).
_MS_PRIVATE = 1 << 18
_CLONE_NEWUSER = 0x10000000

SUBID_NAME = "agentkernel"  # the /etc/subuid and /etc/subgid entry that sets the block
# Without such an entry: 4096 ranges of 65536 ids from 0x6f000000, far above any account a
# system creates (systemd leaves 0x80000..0x6fffffff to container ranges).
DEFAULT_BASE = 0x6F000000
RANGE_SIZE = 65536  # ids per sandbox: 0..65535 inside
DEFAULT_SLOTS = 4096
SLOTS_DIR = "/run/agentkernel-ids"  # root's: one lock file per range in use


class HostRange(NamedTuple):
    """Host ids that sandbox ids 0..size-1 map to, for users and for groups."""

    uid: int
    gid: int
    size: int


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    # The interpreter's own symbols include libc's; ctypes.util (with re and shutil, ~10
    # ms of imports) is not needed to find it.
    return ctypes.CDLL(None, use_errno=True)


def _subid_start(path: str) -> tuple[int, int] | None:
    """The `agentkernel:START:COUNT` line of /etc/subuid or /etc/subgid, if there is one."""
    try:
        with open(path) as f:
            for line in f:
                name, _, rest = line.strip().partition(":")
                start, _, count = rest.partition(":")
                if name == SUBID_NAME and start.isdigit() and count.isdigit():
                    return int(start), int(count)
    except OSError:
        pass
    return None


@lru_cache(maxsize=1)
def host_range() -> HostRange:
    """The block of host ids root-started sandboxes share out: /etc/subuid's and
    /etc/subgid's `agentkernel` entries, or DEFAULT_SLOTS ranges at DEFAULT_BASE. Never an
    id below 65536."""
    default = (DEFAULT_BASE, DEFAULT_SLOTS * RANGE_SIZE)
    uids = _subid_start("/etc/subuid") or default
    gids = _subid_start("/etc/subgid") or default
    count = min(uids[1], gids[1])
    if min(uids[0], gids[0]) < RANGE_SIZE or count < 1:
        raise SandboxError(f"the {SUBID_NAME!r} entries of /etc/subuid and /etc/subgid must "
                           f"start at or above {RANGE_SIZE}")
    return HostRange(uids[0], gids[0], count)


def allocate() -> tuple[HostRange, int]:
    """A range of the block no running sandbox uses, and the fd of its lock: the sandbox's
    longest-lived host process must hold the fd (the agent's `--hold`, `runsc run`), so the
    range is free again exactly when the sandbox is gone, whoever started it. Sandboxes
    then share no host id: not with each other, nor with anything else on the host.

    A block smaller than two ranges gives every sandbox the same one (its own, smaller).
    Never the range `helper_range` keeps for root's own helpers."""
    block = host_range()
    slots = _sandbox_slots(block)
    if slots < 2:
        return block, -1
    _slots_dir()
    # A random first slot spreads concurrent starts (os.urandom: `secrets` costs ~5 ms of
    # imports on a cold run).
    first = int.from_bytes(os.urandom(4), "little") % slots
    for i in range(slots):
        slot = (first + i) % slots
        fd = _lock_slot(slot)
        if fd < 0:
            continue
        off = slot * RANGE_SIZE
        return HostRange(block.uid + off, block.gid + off, RANGE_SIZE), fd
    raise SandboxError(f"all {slots} id ranges for sandboxes are in use")


def take(rng: HostRange, wait: float = 5.0) -> int:
    """The lock of `rng`, a range `allocate` gave before (a container keeps its ids across
    a stop and start), waiting up to `wait` s for its previous holder to go; -1 when the
    block has one range only. Raises SandboxError when another sandbox holds it."""
    block = host_range()
    slots = _sandbox_slots(block)
    if slots < 2:
        return -1
    off, rest = divmod(rng.uid - block.uid, RANGE_SIZE)
    if rest or not 0 <= off < slots or rng.gid - block.gid != off * RANGE_SIZE:
        raise SandboxError(f"host ids {rng.uid}/{rng.gid} are not a sandbox range of this "
                           "host's block")
    _slots_dir()
    deadline = time.monotonic() + wait
    while True:
        fd = _lock_slot(off)
        if fd >= 0:
            return fd
        if time.monotonic() > deadline:
            raise SandboxError(f"the sandbox's host id range ({rng.uid}..) is in use by "
                               "another sandbox")
        time.sleep(0.05)


def _sandbox_slots(block: HostRange) -> int:
    """How many of the block's ranges sandboxes get: all but the last where it has room
    for three or more (that one is `helper_range`'s)."""
    slots = block.size // RANGE_SIZE
    return slots - 1 if slots >= 3 else slots


def helper_range() -> HostRange | None:
    """The block's last range, which no sandbox ever gets (`allocate` and `take` skip it),
    for root's own short-lived helpers that give root up (the wasm compiler children).
    They all share it, unlocked: a helper that leaves a process behind (one a hostile
    input took over can setsid() away from our kill) can only ever meet other such
    helpers, never a later sandbox. None where the block has room for fewer than three
    ranges."""
    block = host_range()
    slots = block.size // RANGE_SIZE
    if slots < 3:
        return None
    off = (slots - 1) * RANGE_SIZE
    return HostRange(block.uid + off, block.gid + off, RANGE_SIZE)


def _slots_dir() -> None:
    import stat

    with contextlib.suppress(FileExistsError):
        os.mkdir(SLOTS_DIR, 0o700)
    st = os.lstat(SLOTS_DIR)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
        raise SandboxError(f"{SLOTS_DIR} is not a directory private to root")


def _lock_slot(slot: int) -> int:
    """The fd of slot `slot`'s lock, taken; -1 while someone else holds it."""
    import fcntl

    fd = os.open(f"{SLOTS_DIR}/{slot}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC |
                 os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return -1
    return fd


def sandbox_userns(opened: list[int]) -> tuple[int, int]:
    """A root-started sandbox's user namespace over a range of its own (`allocate`), and
    the range's lock (-1 when the block has one range only). Both fds are appended to
    `opened`, the namespace first, for the caller to close once the sandbox is started."""
    userns, lock, _rng = sandbox_range_userns(opened)
    return userns, lock


def sandbox_range_userns(opened: list[int]) -> tuple[int, int, HostRange]:
    """sandbox_userns, and the host range it maps (for helpers that run as one of its
    ids, e.g. a gVisor sandbox's egress gate as its `nobody`)."""
    rng, lock = allocate()
    try:
        userns = new_userns(rng)
    except BaseException:
        if lock >= 0:
            os.close(lock)
        raise
    opened.append(userns)
    if lock >= 0:
        opened.append(lock)
    return userns, lock, rng


def new_userns(rng: HostRange) -> int:
    """A user namespace mapping ids 0..size-1 to `rng`, as an fd (O_CLOEXEC).

    A short-lived child creates it (ak-enter --new-userns, or `unshare --user`); we write
    its maps as host root and keep the namespace by its fd. The sandbox enters it
    (`enter_fn`, ak-enter) and its id-mapped mounts use it, so both agree on who owns what.
    """
    # Owned by the range's own root, not by us: the kernel charges what the sandbox holds
    # (inotify instances and watches, queued signals, message queues) to each owner up the
    # chain too, and a namespace of root's used up host root's own share.
    return _mapped_userns({"uid": f"0 {rng.uid} {rng.size}\n",
                           "gid": f"0 {rng.gid} {rng.size}\n"}, "the sandbox's ids",
                          owner=(rng.uid, rng.gid))


def owner_userns(rng: HostRange, uid: int, gid: int, *, runtime_root: bool = False) -> int:
    """A user namespace for an id-mapped mount on which files of our own (the caller's
    euid and egid, on disk) show as sandbox `uid`/`gid` of the sandbox over `rng`, and
    what that id writes lands as ours; no other id is mapped (other owners' files show as
    nobody's, and nothing can be made theirs). With `runtime_root`, the sandbox's root
    (the range's first id) is also mapped, to itself: a runtime that creates a file as
    its root and then gives it to the user (gVisor's gofer) can. An fd (O_CLOEXEC), the
    caller's to close."""
    maps = {}
    for kind, own, base, start in (("uid", os.geteuid(), rng.uid, rng.uid + uid),
                                   ("gid", os.getegid(), rng.gid, rng.gid + gid)):
        lines = [(own, start)] + ([(base, base)] if runtime_root else [])
        maps[kind] = "".join(f"{a} {b} 1\n" for a, b in sorted(lines))
    return _mapped_userns(maps, "the project's owner")


def _mapped_userns(maps: dict[str, str], what: str,
                   owner: tuple[int, int] | None = None) -> int:
    """A new user namespace with these uid_map/gid_map contents (written as host root),
    kept by an O_CLOEXEC fd (the caller's to close); its short-lived holder is gone.
    `owner`: the host uid and gid that make (and so own) it; None: we do."""
    if owner is None or not owned_userns_works():
        return _made_by(maps, what, None)
    try:
        return _made_by(maps, what, owner)
    except SandboxError as exc:
        _owned_userns_failed(exc)
        return _made_by(maps, what, None)


def _made_by(maps: dict[str, str], what: str, owner: tuple[int, int] | None) -> int:
    """_mapped_userns's namespace made as `owner` (None: as us), or SandboxError."""
    from .paths import native_binary

    try:
        helper = str(native_binary("ak-enter"))
    except SandboxError:
        return _mapped_by_unshare(maps, what, owner)
    fd = _SERVER.make(helper, maps, owner)
    return fd if fd >= 0 else _mapped_by_spawn(helper, maps, what, owner)


class _UsernsServer:
    """This process's `ak-enter --userns-server`: a user namespace per request from a
    child it forks, with no exec of ak-enter each time (that exec was most of the ~0.5
    ms of CPU a sandbox's namespace cost). Started on first use and kept; one request at
    a time. Any failure retires it for this process: `_mapped_by_spawn` then does the
    same work the old way. The server and its children close every inherited descriptor
    (a child holds nothing of ours in the new namespace); at our exit (its stdin's EOF)
    it kills what it holds and exits."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid = -1
        self.to_fd = self.from_fd = -1
        self.reply = b""
        self.retired = False

    def make(self, helper: str, maps: dict[str, str], owner: tuple[int, int] | None) -> int:
        """The mapped namespace's fd, or -1: then `_mapped_by_spawn` asks the old way,
        which also tells a host that refuses namespaces made as `owner` (SandboxError) from
        a passing failure here ("-" is all the server says, for a fork or fd shortage too:
        taken for a refusal, it would leave every later sandbox's namespace root's)."""
        with self.lock:
            if self.retired:
                return -1
            try:
                if self.pid < 0:
                    self._start(helper)
                self._send("n -\n" if owner is None else f"n {owner[0]} {owner[1]}\n")
                answer = self._line()
                if answer == "-":
                    return -1
                if not answer.isdigit():
                    raise OSError(0, f"the user namespace server answered {answer!r}")
                child = int(answer)
                try:
                    fd = _map_and_keep(child, maps)
                finally:
                    self._let_go(child)
                return fd
            except OSError:
                self._retire()
                return -1

    def _let_go(self, child: int) -> None:
        """Have the server kill and reap `child`; a server that cannot hear it is retired
        (its children die with it), never the namespace already kept lost."""
        try:
            self._send(f"k {child}\n")
        except OSError:
            self._retire()

    def _start(self, helper: str) -> None:
        from . import spawn

        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        try:
            argv = [helper, "--userns-server"]
            if spawn.available():
                self.pid = spawn.spawn(argv, {}, stdio=(in_r, out_w), devnull_stderr=True)
            else:
                self.pid = os.posix_spawn(helper, argv, {}, setsid=True, file_actions=[
                    (os.POSIX_SPAWN_DUP2, in_r, 0), (os.POSIX_SPAWN_DUP2, out_w, 1),
                    (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0)])
        except OSError:
            for fd in (in_r, in_w, out_r, out_w):
                os.close(fd)
            raise
        os.close(in_r)
        os.close(out_w)
        self.to_fd, self.from_fd = in_w, out_r

    def _send(self, line: str) -> None:
        data = line.encode()
        while data:
            data = data[os.write(self.to_fd, data):]

    def _line(self, timeout_ms: int = 10_000) -> str:
        """The server's next answer line (bounded: a pid is a few bytes)."""
        import select

        poller = select.poll()
        poller.register(self.from_fd, select.POLLIN)
        while b"\n" not in self.reply:
            if len(self.reply) > 64 or not poller.poll(timeout_ms):
                raise OSError(0, "the user namespace server did not answer")
            chunk = os.read(self.from_fd, 64)
            if not chunk:
                raise OSError(0, "the user namespace server exited")
            self.reply += chunk
        line, _, self.reply = self.reply.partition(b"\n")
        return line.decode(errors="replace")

    def _retire(self) -> None:
        self.retired = True
        for fd in (self.to_fd, self.from_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.to_fd = self.from_fd = -1
        if self.pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
        self.pid = -1


_SERVER = _UsernsServer()


_OWNED_FAILED: list[str] = []  # why a namespace made as its owner failed here, once


def owned_userns_works() -> bool:
    """False once a user namespace made as the range's own root failed in this process
    (doctor says so): each sandbox's is then made by us, host root, as before."""
    return not _OWNED_FAILED


def owned_userns_problem() -> str | None:
    """Why this host refuses a user namespace made as its owner (an ordinary user: here
    nobody, as a sandbox's is made as its range's root), or None. For doctor, as root."""
    try:
        os.close(_made_by({"uid": "0 65534 1\n", "gid": "0 65534 1\n"}, "nobody's ids",
                          (65534, 65534)))
    except SandboxError as exc:
        return exc.message
    return None if owned_userns_works() else _OWNED_FAILED[0]


def _owned_userns_failed(exc: SandboxError) -> None:
    """Remember (and say, once) that this host refused a namespace made as its owner:
    the sandbox starts in one of root's, whose inotify instances and queued signals
    count against host root's own share."""
    import sys

    if not _OWNED_FAILED:
        _OWNED_FAILED.append(str(exc))
        print(f"agentkernel: warning: could not make a sandbox's user namespace as its own "
              f"root ({exc}); host root makes them instead, and what sandboxes hold "
              f"(inotify instances, queued signals) counts against host root's own share",
              file=sys.stderr, flush=True)


def _mapped_by_spawn(helper: str, maps: dict[str, str], what: str,
                     owner: tuple[int, int] | None = None) -> int:
    """_mapped_userns with `ak-enter --new-userns` as the holder, started by posix_spawn
    (vfork and exec, in its own session, stdin and stdout our pipes, stderr /dev/null):
    a third of subprocess.Popen's CPU, once per sandbox start. posix_spawn has no
    close_fds; ak-enter closes every descriptor above stderr before it makes the
    namespace, so nothing of ours is held in it."""
    import select

    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    try:
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
    except OSError:
        os.close(in_r)
        os.close(in_w)
        raise
    pid = -1
    try:
        pid = _spawn_holder(helper, in_r, out_w, owner)
        os.close(in_r)
        os.close(out_w)
        in_r = out_w = -1
        poller = select.poll()
        poller.register(out_r, select.POLLIN)
        if not poller.poll(10_000) or os.read(out_r, 1) != b"u":
            raise SandboxError("could not create a user namespace for the sandbox")
        return _map_and_keep(pid, maps)
    except OSError as exc:
        raise SandboxError(f"could not map {what}: {exc}") from None
    finally:
        for fd in (in_r, in_w, out_r, out_w):
            if fd >= 0:
                os.close(fd)
        if pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _spawn_holder(helper: str, stdin: int, stdout: int,
                  owner: tuple[int, int] | None = None) -> int:
    """`helper --new-userns` started (made as `owner`, if given), stdin and stdout these
    fds, stderr /dev/null, in its own session: through ctypes where it can (spawn.py:
    os.posix_spawn holds the GIL until the child has exec'd, and on busy cores that can
    take milliseconds)."""
    from . import spawn

    argv = [helper, "--new-userns"]
    if owner is not None:
        argv += ["--owner", f"{owner[0]}:{owner[1]}"]
    if spawn.available():
        return spawn.spawn(argv, {}, stdio=(stdin, stdout), devnull_stderr=True)
    return os.posix_spawn(helper, argv, {}, setsid=True, file_actions=[
        (os.POSIX_SPAWN_DUP2, stdin, 0), (os.POSIX_SPAWN_DUP2, stdout, 1),
        (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0)])


def _map_and_keep(pid: int, maps: dict[str, str]) -> int:
    """Write the uid/gid maps of the user namespace `pid` holds; an fd that keeps it."""
    for kind in ("uid", "gid"):
        with open(f"/proc/{pid}/{kind}_map", "w") as f:
            f.write(maps[kind])
    return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)


def _mapped_by_unshare(maps: dict[str, str], what: str,
                       owner: tuple[int, int] | None = None) -> int:
    """_mapped_userns without ak-enter: `unshare --user cat` holds the namespace."""
    child = _userns_holder(owner)
    try:
        _await_userns(child)
        return _map_and_keep(child.pid, maps)
    except OSError as exc:
        raise SandboxError(f"could not map {what}: {exc}") from None
    finally:
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                stream.close()
        child.kill()
        child.wait()


def _userns_holder(owner: tuple[int, int] | None = None) -> subprocess.Popen[bytes]:
    """Without ak-enter: `unshare --user cat`, which stays in its new user namespace while
    its stdin is open (made as `owner` through setpriv, where one is given)."""
    unshare = which("unshare")
    if unshare is None:
        raise SandboxError("starting sandboxes as root needs unshare (util-linux)")
    prefix: list[str] = []
    if owner is not None:
        setpriv = which("setpriv")
        if setpriv is None:
            raise SandboxError("starting sandboxes as root needs setpriv (util-linux)")
        prefix = [setpriv, f"--reuid={owner[0]}", f"--regid={owner[1]}", "--clear-groups",
                  "--"]
    return subprocess.Popen([*prefix, unshare, "--user", "--", "cat"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _await_userns(child: subprocess.Popen[bytes]) -> None:
    """Until `child` (unshare, which says nothing) is seen in its new user namespace."""
    deadline = time.monotonic() + 10
    own = os.readlink("/proc/self/ns/user")
    while os.readlink(f"/proc/{child.pid}/ns/user") == own:
        if child.poll() is not None or time.monotonic() > deadline:
            raise SandboxError("could not create a user namespace for the sandbox")
        time.sleep(0.0005)


def idmapped_tree(path: str, userns_fd: int, *, read_only: bool, plain: bool = False) -> int:
    """A detached, id-mapped copy of the mount tree at `path` (an fd for the agent's
    `--attach`): host id N shows as sandbox id N, for the namespace `userns_fd`.

    The whole tree below `path` is included when every filesystem in it can be id-mapped;
    otherwise only `path`'s own mount (what lies on other filesystems is left out, never
    shown with host ids). Raises OSError when `path`'s filesystem cannot be id-mapped.
    Also nosuid and nodev, unless `plain`: a runtime that remounts what it is given
    (runsc) cannot clear flags set here (they are locked for its user namespace).
    """
    return _detached_tree(path, userns_fd, read_only=read_only, plain=plain)


def unmapped_tree(path: str, *, read_only: bool, plain: bool = False) -> int:
    """`idmapped_tree` without the id-mapping: a detached copy of the mount tree at `path`
    on which no host id is one of the sandbox's (every file shows as owned by `nobody`, and
    the sandbox's root has neither an owner's rights nor a capability over it: only what
    the host lets everyone do). For the host's userland: what host root keeps to itself
    there (a 0600 file, a 0700 dir) stays its own. Raises OSError."""
    return _detached_tree(path, -1, read_only=read_only, plain=plain)


def _detached_tree(path: str, userns_fd: int, *, read_only: bool, plain: bool) -> int:
    """idmapped_tree's copy, id-mapped for `userns_fd` (-1: not id-mapped)."""
    libc = _libc()
    flags = (0 if plain else _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV)
    if userns_fd >= 0:
        flags |= _MOUNT_ATTR_IDMAP
    if read_only:
        flags |= _MOUNT_ATTR_RDONLY
    attr = _MountAttr(flags, 0, _MS_PRIVATE, max(userns_fd, 0))
    last = 0
    for recursive in (_AT_RECURSIVE, 0):
        fd = libc.syscall(_SYS_OPEN_TREE, -100, os.fsencode(path),
                          _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | recursive)
        if fd < 0:
            last = ctypes.get_errno()
            break
        if libc.syscall(_SYS_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH | recursive,
                        ctypes.byref(attr), ctypes.sizeof(attr)) == 0:
            return int(fd)
        last = ctypes.get_errno()
        os.close(fd)
    what = "id-map" if userns_fd >= 0 else "copy the mount of"
    raise OSError(last, f"cannot {what} {path}: {os.strerror(last)}")


_MOUNT_ATTR_NOEXEC = 0x8


def device_tree(path: str) -> int:
    """A detached copy of the host's mount of the device node at `path` (e.g. /dev/null),
    nosuid and noexec, for the agent's `--attach` (what bwrap's --dev binds). An fd
    (O_CLOEXEC); OSError if the node cannot be had."""
    libc = _libc()
    fd = libc.syscall(_SYS_OPEN_TREE, -100, os.fsencode(path),
                      _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot copy the mount of {path}: {os.strerror(err)}")
    attr = _MountAttr(_MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NOEXEC, 0, _MS_PRIVATE, 0)
    if libc.syscall(_SYS_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH, ctypes.byref(attr),
                    ctypes.sizeof(attr)) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, f"cannot set the flags of {path}'s copy: {os.strerror(err)}")
    return int(fd)


def attach(tree_fd: int, path: str) -> None:
    """Attach a detached tree (`idmapped_tree`) at host path `path` (which must exist): for
    a runtime that only takes paths (a container engine). `detach` it once the runtime has
    made its own mount of it."""
    rc = _libc().syscall(_SYS_MOVE_MOUNT, tree_fd, b"", -100, os.fsencode(path),
                         _MOVE_MOUNT_F_EMPTY_PATH)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot attach at {path}: {os.strerror(err)}")


def detach(path: str) -> None:
    """Lazily unmount what `attach` put at `path` (nothing there: nothing done); mounts
    made of it stay."""
    _libc().umount2(os.fsencode(path), _MNT_DETACH)


def enter_fn(
    userns_fd: int, before: Callable[[], None] | None = None
) -> Callable[[], None]:
    """A preexec function: run `before` (e.g. joining a cgroup, as host root), then enter
    the sandbox's user namespace as its uid and gid 0 with no supplementary groups. The
    program exec'd next (bwrap) is root only there."""
    libc = _libc()

    def enter() -> None:
        if before is not None:
            before()
        if libc.setns(userns_fd, _CLONE_NEWUSER) != 0:
            raise OSError(ctypes.get_errno(), "setns(user)")
        os.setgroups([])
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)

    return enter


def close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


# Where a root-started runsc finds the host paths it is given: in a mount namespace of
# its own, a tmpfs here holds id-mapped copies of them (root-owned, world-traversable, so
# the sandbox's root can walk to it; nothing is ever mounted here in the host's view).
STAGE_DIR = "/run/agentkernel-stage"
_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_MS_REC = 0x4000
_MS_SLAVE = 0x80000
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_SYS_MOVE_MOUNT = 429
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MNT_DETACH = 0x2


class Staged(NamedTuple):
    """Host paths as a runtime inside the sandbox's user namespace will see them."""

    paths: dict[str, str]  # host path -> staged path
    fds: list[tuple[int, str, bool]]  # (id-mapped mount fd, staged path, is a dir)

    def translate(self, path: str) -> str:
        """Where the runtime finds host `path` (which lies in one of the staged trees)."""
        best = max((src for src in self.paths
                    if path == src or path.startswith(src.rstrip("/") + "/")),
                   key=len, default=None)
        if best is None:
            raise SandboxError(f"{path} was not given to the sandbox's runtime")
        rest = path[len(best):].lstrip("/")
        return f"{self.paths[best]}/{rest}" if rest else self.paths[best]


def stage(sources: list[tuple[str, bool]], userns_fd: int, opened: list[int],
          own: dict[str, int] | None = None, unmapped: Collection[str] = ()) -> Staged:
    """Id-mapped mounts of `sources` ((host path, read-only) pairs; dirs or files) for
    `stage_fn` to attach under STAGE_DIR (those in `unmapped` not id-mapped:
    `unmapped_tree`). The fds are appended to `opened` (the caller closes them once the
    runtime is started)."""
    st = os.lstat(STAGE_DIR) if os.path.lexists(STAGE_DIR) else None
    if st is None:
        os.mkdir(STAGE_DIR, 0o711)
        st = os.lstat(STAGE_DIR)
    import stat as stat_mod

    if not stat_mod.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise SandboxError(f"{STAGE_DIR} is not a directory only root can change")
    paths: dict[str, str] = {}
    fds: list[tuple[int, str, bool]] = []
    for i, (src, read_only) in enumerate(sources):
        if src in paths:
            continue
        try:
            fd = unmapped_tree(src, read_only=read_only, plain=True) if src in unmapped \
                else idmapped_tree(src, (own or {}).get(src, userns_fd), read_only=read_only,
                                   plain=True)
        except OSError as exc:
            raise SandboxError(f"cannot give {src} to the sandbox: {exc.strerror}") from None
        opened.append(fd)
        paths[src] = f"{STAGE_DIR}/{i}"
        fds.append((fd, paths[src], os.path.isdir(src)))
    return Staged(paths, fds)


def stage_fn(staged: Staged, userns_fd: int, before: Callable[[], None] | None = None,
             netns_fd: int = -1) -> Callable[[], None]:
    """A preexec function: `before` (as host root), the network namespace `netns_fd` if
    given, then a mount namespace of our own with the staged mounts attached, then the
    sandbox's user namespace as its root (enter_fn)."""
    libc = _libc()
    enter = enter_fn(userns_fd)

    def check(rc: int, what: str) -> None:
        if rc != 0:
            raise OSError(ctypes.get_errno(), what)

    def setup() -> None:
        if before is not None:
            before()
        if netns_fd >= 0:
            check(libc.setns(netns_fd, _CLONE_NEWNET), "setns(net)")
        check(libc.unshare(_CLONE_NEWNS), "unshare(mount)")
        # Slave: the host's later unmounts still reach us, nothing of ours reaches it.
        check(libc.mount(b"none", b"/", None, _MS_REC | _MS_SLAVE, None), "mount --make-rslave")
        check(libc.mount(b"tmpfs", STAGE_DIR.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV,
                         b"mode=0711"), "stage tmpfs")
        for fd, path, is_dir in staged.fds:
            if is_dir:
                os.mkdir(path, 0o755)
            else:
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
            check(libc.syscall(_SYS_MOVE_MOUNT, fd, b"", -100, os.fsencode(path),
                               _MOVE_MOUNT_F_EMPTY_PATH), f"attach {path}")
        enter()

    return setup
