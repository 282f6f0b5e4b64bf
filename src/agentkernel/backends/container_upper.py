"""A one-shot container sandbox's copy-on-write project upper, on a tmpfs of its cap.

The engine mounts the project's overlay (Docker's local volume driver, Podman's overlay
volume, or we do, rootful Podman) with its upper and work dirs in the sandbox's scratch dir
under our runtime dir: a plain host dir there had no size, so writes to /workspace took
host disk (RAM where /run is a tmpfs) past every cap. As for a one-shot namespaces sandbox,
the upper lives on a tmpfs of the memory cap (the disk default where there is none): its
pages are charged to the memory cgroup of whoever writes them (the container's), and the
size bounds them also where no memory controller is usable (rootless engines).

The tmpfs is mounted where the engine resolves the upper's path: on the host for root
(our mount namespace is the engine's), in a rootless engine's own user and mount
namespace otherwise (`nsenter` as its root; our uid owns that namespace), and the dirs
are made through `/proc/PID/root`, which shows that namespace's mounts. The engine's pid
is verified first (`_pinned`: a stale pid file may name a sandbox's process), and nsenter
joins the namespaces we opened and checked. It is detached as
soon as the engine has started the container: overlayfs holds its own reference to its
upper's mount, so the tmpfs lives exactly as long as the container's overlay does. Until
then the run holds a lock next to it (`ws.lock`, an flock: the kernel lets go of it when
the run dies): a run killed in between leaves its tmpfs to the next one-shot start of the
same runtime dir, which detaches every upper whose lock is free (`sweep_uppers`).
A persistent sandbox's upper is in its state dir, on its quota disk (daemon/quota.py).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from ..errors import SandboxError

MS_NOSUID, MS_NODEV = 2, 4
# upper base -> (the pid whose namespaces hold it, 0: ours; its lock, see _lock)
_MOUNTED: dict[str, tuple[int, int]] = {}


def upper_mb(memory_mb: int | None) -> int:
    """The tmpfs's size: the memory cap, else the disk default (profiles.DEFAULT_DISK_MB)."""
    from ..profiles import DEFAULT_DISK_MB

    return memory_mb or DEFAULT_DISK_MB


# The binaries whose processes hold a rootless engine's namespaces: the API service and
# Podman's pause process (podman), rootless Docker's daemon (dockerd) and its parent.
ENGINE_EXES = ("podman", "dockerd", "rootlesskit", "catatonit", "conmon", "rootlessport")


def engine_ns_pid(candidates: list[int]) -> int | None:
    """The first of `candidates` (processes of a rootless engine, from pid files and the
    API socket's peer: any of them may be stale, its pid reused) that is the engine
    (`_pinned`): a live process of ours, one of the host's engine binaries, in a user and
    mount namespace other than ours whose root is still our /."""
    for pid in candidates:
        if pid <= 0:
            continue
        with contextlib.suppress(SandboxError):
            for fd in _pinned(pid):
                os.close(fd)
            return pid
    return None


def _pinned(pid: int) -> tuple[int, int, int]:
    """Process `pid`'s pidfd, user namespace and mount namespace (fds, O_CLOEXEC), once
    it is verified to be the engine. A stale pid file or a reused pid can name any
    process of ours, e.g. a namespaces sandbox's: nsenter into its mount namespace would
    run the sandbox's own `mount` as us, outside its confinement. Raises SandboxError."""
    fds: list[int] = []
    try:
        fds.append(os.pidfd_open(pid))
        for ns in ("user", "mnt"):
            fds.append(os.open(f"/proc/{pid}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC))
        why = _not_engine(pid, fds[1], fds[2])
        # Alive still: every /proc/PID above was this process's (its pid is not reused
        # while it is not reaped).
        import signal

        signal.pidfd_send_signal(fds[0], 0)
    except OSError as exc:
        why = f"gone or not ours ({exc.strerror})"
    if why:
        for fd in fds:
            os.close(fd)
        raise SandboxError(f"process {pid} is not the container engine: {why}")
    return fds[0], fds[1], fds[2]


def _not_engine(pid: int, user: int, mnt: int) -> str:
    """Why process `pid` (its namespaces opened as `user`, `mnt`) is not a rootless
    engine of ours; "" if it is. Raises OSError."""
    if os.stat(f"/proc/{pid}").st_uid != os.getuid():
        return "not ours"
    for fd, ns in ((user, "user"), (mnt, "mnt")):
        if os.fstat(fd).st_ino == os.stat(f"/proc/self/ns/{ns}").st_ino:
            return f"in our {ns} namespace"
    # A rootless engine's mount namespace keeps the host's root; a sandbox pivots away.
    root, ours = os.stat(f"/proc/{pid}/root/"), os.stat("/")
    if (root.st_dev, root.st_ino) != (ours.st_dev, ours.st_ino):
        return "its root is not ours"
    exe = os.stat(f"/proc/{pid}/exe")
    if (exe.st_dev, exe.st_ino) not in _engine_exes():
        return "not an engine binary of this host"
    return ""


def _engine_exes() -> set[tuple[int, int]]:
    """The files (device, inode) of this host's engine binaries, as PATH finds them."""
    from ..paths import which

    found = set()
    for name in ENGINE_EXES:
        path = which(name)
        with contextlib.suppress(OSError):
            if path is not None:
                st = os.stat(path)
                found.add((st.st_dev, st.st_ino))
    return found


def mount_upper(base: Path, size_mb: int, ns_pid: int | None) -> Path:
    """Mount a tmpfs of `size_mb` at `base` (0700; nosuid, nodev) where the engine sees it:
    here (`ns_pid` None) or in process `ns_pid`'s user and mount namespaces. Returns the
    path through which we see it (to make the upper and work dirs in). Its lock (`_lock`)
    is held until `release_upper`: a run that dies in between leaves the tmpfs to
    `sweep_uppers`."""
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    options = f"size={size_mb}m,mode=0700"
    lock = _lock(base, ns_pid)
    try:
        if ns_pid is None:
            from ..idmap import _libc

            if _libc().mount(b"tmpfs", os.fsencode(str(base)), b"tmpfs",
                             MS_NOSUID | MS_NODEV, options.encode()) != 0:
                import ctypes

                err = ctypes.get_errno()
                raise SandboxError(f"cannot mount the copy-on-write project's upper: "
                                   f"{os.strerror(err)}")
        else:
            _in_ns(ns_pid, ["mount", "-t", "tmpfs", "-o", f"{options},nosuid,nodev", "tmpfs",
                            str(base)], "mount the copy-on-write project's upper")
    except BaseException:
        _unlock(base, lock)
        raise
    _MOUNTED[str(base)] = (ns_pid or 0, lock)
    if ns_pid is None:
        return base
    return Path(f"/proc/{ns_pid}/root") / base.relative_to("/")


def release_upper(base: Path) -> None:
    """Detach the tmpfs `mount_upper` put at `base`, if it did (the container's overlay
    keeps it while it lives). Never raises: also called on a failed start's way out."""
    held = _MOUNTED.pop(str(base), None)
    if held is None:
        return
    pid, lock = held
    _detach(str(base), pid)
    _unlock(base, lock)


def _detach(base: str, pid: int) -> None:
    """Lazily unmount `base` here (`pid` 0) or in engine process `pid`'s namespaces; a
    failure means the engine's namespace is gone, and the mount with it. Never raises."""
    if pid == 0:
        from ..idmap import detach

        detach(base)
        return
    with contextlib.suppress(SandboxError):
        _in_ns(pid, ["umount", "-l", base], "detach the copy-on-write project's upper")


LOCK_SUFFIX = ".lock"  # `<scratch>/ws.lock`: held by the run that mounted `<scratch>/ws`
SWEEP_MAX = 4096  # scratch dirs looked at by one sweep


def _lock(base: Path, ns_pid: int | None) -> int:
    """Create and take `base`'s lock (an flock, on a descriptor that no child inherits), the
    mount namespace the tmpfs goes to written in it. The kernel drops it when we die."""
    import fcntl

    fd = os.open(f"{base}{LOCK_SUFFIX}", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # (a sweep holds it a moment at most)
        os.ftruncate(fd, 0)
        os.write(fd, os.fsencode(_mnt_ns(ns_pid)))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unlock(base: Path, fd: int) -> None:
    """Remove `base`'s lock (held: no sweep takes it meanwhile), then let it go."""
    with contextlib.suppress(OSError):
        os.unlink(f"{base}{LOCK_SUFFIX}")
    os.close(fd)


def _mnt_ns(ns_pid: int | None) -> str:
    """The mount namespace an upper is mounted in (ours, or engine process `ns_pid`'s), as
    /proc names it (`mnt:[INODE]`); "" if it cannot be read."""
    try:
        return os.readlink(f"/proc/{ns_pid or 'self'}/ns/mnt")
    except OSError:
        return ""


def sweep_uppers(ns_pid: int | None) -> list[str]:
    """Detach the uppers that runs of our runtime dir left mounted when they died between
    `mount_upper` and `release_upper` (a killed CLI, a daemon gone): those whose lock no
    one holds, mounted in the namespace one would mount in now (ours, or engine process
    `ns_pid`'s, already verified). Each lock goes with its tmpfs. Returns the bases swept."""
    import fcntl

    from ..paths import runtime_dir_str

    root = os.path.join(runtime_dir_str(), "sandboxes")
    try:
        with os.scandir(root) as entries:
            names = [e.name for _, e in zip(range(SWEEP_MAX), entries, strict=False)
                     if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []
    here = _mnt_ns(ns_pid)
    swept = []
    for name in names:
        base = os.path.join(root, name, "ws")
        try:
            fd = os.open(base + LOCK_SUFFIX, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # no upper mounted there
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Still the lock at that path (not one a finished run removed, its name since
            # taken by a new run's), ours, of a tmpfs mounted where we would mount ours.
            st = os.fstat(fd)
            if os.stat(base + LOCK_SUFFIX).st_ino == st.st_ino and st.st_uid == os.geteuid() \
                    and here and os.read(fd, 64).decode(errors="replace") == here:
                _detach(base, ns_pid or 0)
                os.unlink(base + LOCK_SUFFIX)
                swept.append(base)
        except OSError:
            pass  # held: its run is alive (or the file went meanwhile)
        finally:
            os.close(fd)
    return swept


def _in_ns(pid: int, argv: list[str], what: str) -> None:
    """Run `argv` as root of process `pid`'s user namespace, in its mount namespace, once
    the process is verified to be the engine (`_pinned`): nsenter joins the namespaces
    we opened and verified, not whatever the pid names by the time it looks."""
    from ..paths import which

    nsenter, tool = which("nsenter"), which(argv[0])
    if nsenter is None or tool is None:
        raise SandboxError(f"cannot {what}: needs nsenter and {argv[0]} (util-linux)")
    pidfd, user, mnt = _pinned(pid)
    try:
        # --preserve-credentials: our uid is that namespace's root already, and an engine
        # without a subordinate range (a single-id map) has setgroups denied, where
        # nsenter's default setgroups/setuid to 0 fails.
        done = subprocess.run([nsenter, f"--user=/proc/self/fd/{user}",
                               f"--mount=/proc/self/fd/{mnt}", "--preserve-credentials",
                               "--", tool, *argv[1:]],
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
                              check=False, pass_fds=(user, mnt))
        import signal

        signal.pidfd_send_signal(pidfd, 0)  # (the engine did not go meanwhile)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxError(f"cannot {what}: {exc}") from None
    finally:
        for fd in (pidfd, user, mnt):
            os.close(fd)
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip()[-300:]
        raise SandboxError(f"cannot {what} in the engine's namespace: {why}")
