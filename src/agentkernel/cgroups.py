"""Per-sandbox resource limits through cgroups (v2, v1 or hybrid), with an rlimit floor."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import resource
import signal
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Final, NamedTuple

from .errors import SandboxError, UsageError

CONTROLLERS: Final = ("memory", "pids", "cpu")
_NAME: Final = r"[A-Za-z0-9_.-]{1,128}"  # compiled on first use
_CPU_PERIOD_US: Final = 100_000
_PARENT: Final = "agentkernel"


class Limits(NamedTuple):
    """What a sandbox may use; None means unlimited."""

    memory_bytes: int | None = None
    pids: int | None = None
    cpus: float | None = None


class Hierarchy(NamedTuple):
    """One mounted cgroup hierarchy and the directory under which we may create groups."""

    version: int  # 1 or 2
    mount: Path
    base: Path | None  # where agentkernel/<name> goes; None if nothing here is writable
    controllers: frozenset[str]  # of CONTROLLERS, usable under `base`
    problem: str = ""


class CgroupSupport(NamedTuple):
    """What `detect()` found: the cgroup mode and which controllers this process can use."""

    mode: str  # "v2", "v1", "hybrid" or "none"
    usable: dict[str, Hierarchy] = {}  # controller -> hierarchy (never mutated)
    problems: tuple[str, ...] = ()

    @property
    def memory(self) -> bool:
        return "memory" in self.usable

    @property
    def pids(self) -> bool:
        return "pids" in self.usable

    @property
    def cpu(self) -> bool:
        return "cpu" in self.usable

    def explain(self) -> str:
        """A short human summary for `agentkernel doctor`."""
        if self.mode == "none":
            return ("cgroups: not mounted; limits fall back to rlimits (pids per sandbox, "
                    "memory per process, no CPU cap)")
        lines = [f"cgroups: {self.mode} mode"]
        for ctrl in CONTROLLERS:
            h = self.usable.get(ctrl)
            if h is not None:
                lines.append(f"  {ctrl}: usable (v{h.version}, under {h.base})")
            else:
                lines.append(f"  {ctrl}: not usable by this process")
        lines.extend(f"  note: {p}" for p in self.problems)
        if len(self.usable) < len(CONTROLLERS):
            lines.append("  missing limits fall back to rlimits where possible")
        return "\n".join(lines)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _writable(path: Path) -> bool:
    # access(2) also answers EROFS for a read-only cgroupfs, which is what we want.
    return os.access(path, os.W_OK) and os.access(path / "cgroup.procs", os.W_OK)


def _own_paths() -> tuple[str | None, dict[str, str]]:
    """This process's cgroup: the v2 path and the v1 path per controller."""
    v2: str | None = None
    v1: dict[str, str] = {}
    for line in _read(Path("/proc/self/cgroup")).splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        else:
            for ctrl in parts[1].split(","):
                v1[ctrl] = parts[2]
    return v2, v1


def _mounts() -> list[tuple[str, Path, str, set[str]]]:
    """(fstype, mount point, root inside the hierarchy, super options) of cgroup mounts."""
    found = []
    for line in _read(Path("/proc/self/mountinfo")).splitlines():
        pre, sep, post = line.partition(" - ")
        if not sep:
            continue
        fields, tail = pre.split(), post.split()
        if len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        # mountinfo escapes spaces etc. as octal; cgroup mount points rarely have any.
        mnt = Path(fields[4].replace("\\040", " "))
        found.append((tail[0], mnt, fields[3], set(tail[2].split(","))))
    return found


def _under(mount: Path, mount_root: str, cg_path: str) -> Path:
    # Inside a cgroup namespace both are "/"-relative to the same view; outside one, the
    # mount root is usually "/" too. Strip the mount root so the result lies under `mount`.
    rel = cg_path
    if mount_root != "/" and (rel == mount_root or rel.startswith(mount_root + "/")):
        rel = rel[len(mount_root) :]
    return mount / rel.lstrip("/")


def _v2_base(mount: Path, own: Path) -> tuple[Path | None, str]:
    """Nearest writable ancestor of our cgroup that may have controllers enabled for children.

    v2 forbids enabling controllers in a group that has member processes (except the real
    root), and moving a process needs write access to the common ancestor, so the base
    must be our own group's ancestor inside the part of the tree delegated to us.
    """
    cur = own
    while True:
        if not _writable(cur) or not os.access(cur / "cgroup.subtree_control", os.W_OK):
            return None, f"{cur} is not writable by uid {os.getuid()} (no delegation)"
        is_real_root = not (cur / "cgroup.type").exists()
        if is_real_root or not _read(cur / "cgroup.procs").strip():
            return cur, ""
        if cur == mount:
            return None, f"{cur} has member processes, so it can't delegate controllers"
        cur = cur.parent


def _hierarchies() -> tuple[str, list[Hierarchy]]:
    mounts = _mounts()
    v2_own, v1_own = _own_paths()
    result: list[Hierarchy] = []
    has_v1 = has_v2 = False
    for fstype, mnt, root, opts in mounts:
        if fstype == "cgroup2":
            has_v2 = True
            avail = set(_read(mnt / "cgroup.controllers").split()) & set(CONTROLLERS)
            if not avail or v2_own is None:
                continue  # e.g. the empty v2 hierarchy of hybrid mode
            base, problem = _v2_base(mnt, _under(mnt, root, v2_own))
            if base is not None:
                avail &= set(_read(base / "cgroup.controllers").split())
            usable = frozenset(avail) if base else frozenset()
            result.append(Hierarchy(2, mnt, base, usable, problem))
        else:
            has_v1 = True
            ctrls = opts & set(CONTROLLERS)
            if not ctrls:
                continue
            own = next((v1_own[c] for c in ctrls if c in v1_own), "/")
            # v1 has no "no internal processes" rule: nest right under our own group, so
            # whatever limits our launcher lives under still apply to the sandbox.
            base = _under(mnt, root, own)
            if _writable(base):
                result.append(Hierarchy(1, mnt, base, frozenset(ctrls)))
            else:
                problem = f"{base} is not writable by uid {os.getuid()}"
                result.append(Hierarchy(1, mnt, None, frozenset(), problem))
    mode = "hybrid" if has_v1 and has_v2 else "v1" if has_v1 else "v2" if has_v2 else "none"
    return mode, result


def detect() -> CgroupSupport:
    """Find the cgroup mode and which of memory/pids/cpu this process can set limits with."""
    mode, hierarchies = _hierarchies()
    usable: dict[str, Hierarchy] = {}
    problems: list[str] = []
    for h in hierarchies:
        if h.base is None:
            if h.problem:
                problems.append(h.problem)
            continue
        for ctrl in sorted(h.controllers):
            usable.setdefault(ctrl, h)
    return CgroupSupport(mode, usable, tuple(dict.fromkeys(problems)))


DETECT_TTL = 10.0  # seconds a start may reuse what detect() found for this process
_detected: tuple[tuple[int, str], float, CgroupSupport] | None = None


def detect_cached() -> CgroupSupport:
    """detect(), reused for DETECT_TTL while this process's uid and groups stay the same
    (it reads mountinfo and probes every hierarchy: ~2 ms per sandbox start otherwise).
    A change in between shows up as a failed create, never as a sandbox without limits:
    create() writes every limit it set out to and raises if one fails."""
    global _detected
    key = (os.geteuid(), _read(Path("/proc/self/cgroup")))
    now = time.monotonic()
    got = _detected
    if got is not None and got[0] == key and now - got[1] < DETECT_TTL:
        return got[2]
    support = detect()
    _detected = (key, now, support)
    return support


def prime_migration() -> None:
    """Start a no-op cgroup migration in the background, to overlap a kernel wait.

    Every migration takes the kernel's global threadgroup rwsem for writing; the first one
    after a quiet spell waits a whole RCU grace period (~15 ms on these hosts) to switch
    that lock to its slow mode, which then lasts one more grace period. Moving this
    process into the group it is already in, while the CLI still imports and plans, pays
    that wait off the critical path: the sandbox's real join finds the lock switched.
    Best effort: any failure just leaves the wait where it was.
    """
    import threading

    threading.Thread(target=_rejoin_own_group, name="cgroup-prime", daemon=True).start()


def _rejoin_own_group() -> None:
    with contextlib.suppress(OSError, ValueError):
        v2_own, v1_own = _own_paths()
        for fstype, mnt, root, opts in _mounts():
            if fstype == "cgroup2":
                own = v2_own
                if own is None or not _read(mnt / "cgroup.controllers").strip():
                    continue  # the empty v2 tree of hybrid mode: nobody migrates there
            else:
                own = next((v1_own[c] for c in opts & set(CONTROLLERS) if c in v1_own), None)
            if own is None:
                continue
            fd = os.open(_under(mnt, root, own) / "cgroup.procs", os.O_WRONLY)
            try:
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)
            return


def validate_name(name: str) -> str:
    """Reject names that could escape agentkernel/ or are unreasonable as a directory name."""
    if not re.fullmatch(_NAME, name) or ".." in name or name in (".",):
        raise UsageError(f"invalid cgroup name {name!r}: use [A-Za-z0-9_.-]{{1,128}}, no '..'")
    return name


def scope() -> str:
    """This data dir's id, 10 hex digits: part of every group's name, so that daemons (and
    runs) of different data dirs never share one (`web` of one is not `web` of another)."""
    from .paths import data_dir_str

    return _scope_of(data_dir_str())


@functools.lru_cache(maxsize=16)
def _scope_of(data_dir: str) -> str:
    """scope() of `data_dir`, resolved once per process (a realpath walk and a hash are
    ~70 us, twice on each sandbox's start and teardown)."""
    real = os.path.realpath(data_dir).encode()
    try:
        from _blake2 import blake2b  # hashlib's own import costs ~3 ms of the CLI's run
    except ImportError:  # pragma: no cover - every CPython build has it
        from hashlib import blake2b
    return blake2b(real, digest_size=5).hexdigest()


def group_dirname(name: str) -> str:
    """The directory of sandbox `name`'s group under agentkernel/: `<name>.<scope>`."""
    return f"{validate_name(name)}.{scope()}"


def scoped_names(prefix: str, support: CgroupSupport | None = None) -> list[str]:
    """Sandbox names of this data dir's groups (in any hierarchy) starting with `prefix`."""
    suffix = "." + scope()
    names: set[str] = set()
    for h in (support or detect()).usable.values():
        assert h.base is not None
        with contextlib.suppress(OSError):
            for child in (h.base / _PARENT).iterdir():
                if child.name.startswith(prefix) and child.name.endswith(suffix):
                    names.add(child.name.removesuffix(suffix))
    return sorted(names)


_parents: set[str] = set()  # agentkernel/ dirs this process made or found (Cgroup._make)
_files: dict[tuple[str, str], bool] = {}  # (hierarchy, control file) -> the kernel has it


def _has(group: Path, filename: str) -> bool:
    """Whether groups of `group`'s hierarchy have the control file `filename` (a fact of
    the kernel and its boot options, looked up once per hierarchy)."""
    key = (str(group.parent.parent), filename)
    got = _files.get(key)
    if got is None:
        got = _files[key] = (group / filename).exists()
    return got


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _pids_in(directory: Path) -> list[int]:
    """The pids in the group `directory` and every group below it."""
    pids: list[int] = []
    for top in (str(directory), *_subgroups(directory)):
        try:
            with open(os.path.join(top, "cgroup.procs"), "rb") as f:
                pids.extend(int(p) for p in f.read().split())
        except OSError:
            continue
    return pids


def _kill_pid(pid: int, cg_rel: str) -> None:
    """SIGKILL `pid` only if it is still in our group (guards against pid reuse)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:  # kernel without pidfd (< 5.3): plain kill, small reuse window
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        return
    try:
        # The pidfd pins the process: if it is still alive after this read, the read was
        # about that process and not a newcomer with a recycled pid.
        if cg_rel in _read(Path(f"/proc/{pid}/cgroup")):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)


class Cgroup:
    """The cgroup(s) of one sandbox: one directory on v2, one per controller on v1."""

    def __init__(self, name: str, dirs: dict[Path, Hierarchy], missing: tuple[str, ...]) -> None:
        self.name = name
        self.dirs = dirs  # group directory -> its hierarchy
        # Controllers a limit was asked for but which can't be enforced here.
        self.missing = missing

    @classmethod
    def create(
        cls, name: str, limits: Limits, support: CgroupSupport | None = None
    ) -> Cgroup | None:
        """Create agentkernel/<name> with `limits`; None if no controller is usable.

        Limits whose controller is unusable are listed in `missing` so the caller can say so.
        """
        dirname = group_dirname(name)
        if limits.cpus is not None and limits.cpus <= 0:
            raise UsageError(f"cpus must be positive, got {limits.cpus}")
        support = support or detect_cached()
        if not support.usable:
            return None
        wanted = {
            "memory": limits.memory_bytes is not None,
            "pids": limits.pids is not None,
            "cpu": limits.cpus is not None,
        }
        missing = tuple(c for c, want in wanted.items() if want and c not in support.usable)
        by_base: dict[Path, tuple[Hierarchy, set[str]]] = {}
        for ctrl, h in support.usable.items():
            assert h.base is not None
            by_base.setdefault(h.base, (h, set()))[1].add(ctrl)
        # A v1 hierarchy of an unlimited controller only would cost a mkdir, its writes
        # and an rmdir per sandbox for nothing (cpu on permissive). memory and pids are
        # always kept: the memory group measures the sandbox (pool sizing, OOM) and the
        # pids group lists every process for kill_all, limits or not.
        used = {"memory", "pids"} | ({"cpu"} if limits.cpus is not None else set())
        by_base = {base: hc for base, hc in by_base.items() if hc[1] & used}
        dirs: dict[Path, Hierarchy] = {}
        group = cls(name, dirs, missing)
        try:
            for base, (h, ctrls) in by_base.items():
                parent = base / _PARENT
                if h.version == 2:
                    enable = " ".join(f"+{c}" for c in sorted(ctrls))
                    _write(base / "cgroup.subtree_control", enable)
                    parent.mkdir(exist_ok=True)
                    _write(parent / "cgroup.subtree_control", enable)
                path = parent / dirname
                cls._make(path, h, name)
                dirs[path] = h
                group._apply(path, h.version, ctrls, limits)
        except BaseException:
            group.destroy()  # only the dirs made here (a v1 hierarchy each)
            raise
        return group

    @classmethod
    def _make(cls, path: Path, h: Hierarchy, name: str) -> None:
        """mkdir the group `path`. Its parent (agentkernel/) is made once per process and
        hierarchy, and made again only if it went: a sandbox's start tries no mkdir that
        fails, nor a stat first."""
        parent = str(path.parent)
        if parent not in _parents:
            os.makedirs(parent, exist_ok=True)
            _parents.add(parent)
        try:
            os.mkdir(path)
        except FileNotFoundError:  # the parent was removed meanwhile
            _parents.discard(parent)
            os.makedirs(parent, exist_ok=True)
            _parents.add(parent)
            os.mkdir(path)
        except FileExistsError:
            # Left over from a crash. Only an empty one goes: one with processes is not
            # ours to kill on a guess (the daemon removes those it recorded).
            if _pids_in(path):
                raise SandboxError(f"cgroup {path} exists and has running processes "
                                   f"(another sandbox named {name!r}?)") from None
            cls(name, {path: h}, ()).destroy()
            os.mkdir(path)

    @classmethod
    def open(cls, name: str, support: CgroupSupport | None = None) -> Cgroup:
        """The existing group(s) of sandbox `name` (possibly none), e.g. to destroy them."""
        dirname = group_dirname(name)
        support = support or detect_cached()
        dirs: dict[Path, Hierarchy] = {}
        for h in support.usable.values():
            assert h.base is not None
            path = h.base / _PARENT / dirname
            if path.is_dir():
                dirs[path] = h
        return cls(name, dirs, ())

    @staticmethod
    def _apply(path: Path, version: int, ctrls: set[str], limits: Limits) -> None:
        mem, pids, cpus = limits.memory_bytes, limits.pids, limits.cpus
        if version == 2:
            if "memory" in ctrls and mem is not None:
                _write(path / "memory.max", str(mem))
                if _has(path, "memory.swap.max"):  # absent without swap accounting
                    _write(path / "memory.swap.max", "0")
            if "pids" in ctrls and pids is not None:
                _write(path / "pids.max", str(pids))
            if "cpu" in ctrls and cpus is not None:
                quota = max(1000, int(cpus * _CPU_PERIOD_US))
                _write(path / "cpu.max", f"{quota} {_CPU_PERIOD_US}")
            return
        if "memory" in ctrls and mem is not None:
            _write(path / "memory.limit_in_bytes", str(mem))
            if _has(path, "memory.memsw.limit_in_bytes"):
                # memsw counts memory + swap; it must be set after (and >=) the plain limit.
                _write(path / "memory.memsw.limit_in_bytes", str(mem))
            else:
                _write(path / "memory.swappiness", "0")
        if "pids" in ctrls and pids is not None:
            _write(path / "pids.max", str(pids))
        if "cpu" in ctrls and cpus is not None:
            _write(path / "cpu.cfs_period_us", str(_CPU_PERIOD_US))
            _write(path / "cpu.cfs_quota_us", str(max(1000, int(cpus * _CPU_PERIOD_US))))

    def enforced(self) -> frozenset[str]:
        """The controllers this group's limits are enforced with."""
        return frozenset().union(*(h.controllers for h in self.dirs.values()))

    def join_fn(self) -> Callable[[], None]:
        """A `Popen(preexec_fn=...)` hook moving the child into every group before exec.

        It runs between fork and exec, so it only calls os.open/os.write/os.close on
        paths prepared here. Failing to join raises, so nothing runs without its limits.
        """
        targets = [os.fsencode(f) for f in self.procs_files()]

        def join() -> None:
            for target in targets:
                fd = os.open(target, os.O_WRONLY)
                try:
                    os.write(fd, b"0")  # "0" means the writing process itself
                finally:
                    os.close(fd)

        return join

    def procs_files(self) -> list[str]:
        """The cgroup.procs file of every group: what a process writes "0" to to join
        (join_fn; ak-enter --cgroup)."""
        return [str(d / "cgroup.procs") for d in self.dirs]

    def add_pid(self, pid: int) -> None:
        """Move an already running process (and, on v1, only that process) into the groups."""
        for d in self.dirs:
            _write(d / "cgroup.procs", str(pid))

    def _file(self, ctrl: str, name: str) -> Path | None:
        for d, h in self.dirs.items():
            if ctrl in h.controllers and (d / name).exists():
                return d / name
        return None

    def _stat(self, ctrl: str, filename: str, key: str) -> int | None:
        path = self._file(ctrl, filename)
        if path is None:
            return None
        for line in _read(path).splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
        return None

    def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer killed anything in this group."""
        for filename in ("memory.events", "memory.oom_control"):  # v2, then v1 (>= 4.13)
            count = self._stat("memory", filename, "oom_kill")
            if count is not None:
                return count > 0
        # Old v1 kernels: the limit was hit; a kill is likely but not certain.
        failcnt = self._file("memory", "memory.failcnt")
        return failcnt is not None and int(_read(failcnt) or "0") > 0

    def memory_peak(self) -> int | None:
        """Highest memory use in bytes, if the kernel tracks it (v2 needs >= 5.19)."""
        for filename in ("memory.peak", "memory.max_usage_in_bytes"):
            path = self._file("memory", filename)
            if path is not None:
                with contextlib.suppress(ValueError):
                    return int(_read(path).strip())
        return None

    def _remove_empty(self) -> bool:
        """rmdir each group that is already empty: the usual case at a sandbox's teardown
        (its pid namespace is gone with bwrap), where listing each group's processes and
        sub-groups first cost ~10 syscalls per hierarchy. The kernel refuses the rmdir
        (EBUSY, ENOTEMPTY) while a process or a sub-group is in there, so nothing alive is
        ever left behind: True if every group went; else the full kill and removal follow
        (which pass over the groups already gone)."""
        for d in self.dirs:
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError:
                return False
        return True

    def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL every process in the groups and wait until they are gone."""
        for d, h in self.dirs.items():
            if h.version == 2 and (d / "cgroup.kill").exists():
                with contextlib.suppress(OSError):
                    _write(d / "cgroup.kill", "1")  # kernel >= 5.14: atomic, also catches forks
        deadline = time.monotonic() + timeout
        while True:
            alive = False
            for d, h in self.dirs.items():
                if not d.exists():
                    continue
                rel = "/" + str(d.relative_to(h.mount))
                for pid in _pids_in(d):
                    alive = True
                    _kill_pid(pid, rel)
            if not alive or time.monotonic() > deadline:
                return
            time.sleep(0.01)  # dying processes stay listed until they are reaped

    def destroy(self, timeout: float = 5.0) -> None:
        """Kill everything inside, then remove the group directories."""
        if self._remove_empty():
            return
        self.kill_all(timeout)
        deadline = time.monotonic() + timeout
        for d in self.dirs:
            # Children first: a v2 sandbox could have made sub-groups if delegated to.
            for sub in _subgroups(d):
                with contextlib.suppress(OSError):
                    os.rmdir(sub)
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY until the last member is reaped
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)


def memory_dir(pid: int) -> Path | None:
    """The dir of the memory cgroup host process `pid` is in (a group someone else made,
    e.g. a container engine's), found through its /proc/PID/cgroup and our mounts."""
    v2: str | None = None
    v1: str | None = None
    for line in _read(Path(f"/proc/{pid}/cgroup")).splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "memory" in parts[1].split(","):
            v1 = parts[2]
    for fstype, mnt, root, opts in _mounts():
        if fstype == "cgroup" and "memory" in opts and v1 is not None:
            found = _under(mnt, root, v1)
        elif fstype == "cgroup2" and v1 is None and v2 is not None:
            found = _under(mnt, root, v2)
        else:
            continue
        if (found / "memory.events").exists() or (found / "memory.oom_control").exists():
            return found
    return None


def oom_kills(directory: Path) -> int | None:
    """How many processes the kernel's OOM killer killed in the memory cgroup at
    `directory` (v2's memory.events, v1's memory.oom_control); None: not known."""
    for filename in ("memory.events", "memory.oom_control"):
        for line in _read(directory / filename).splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
    return None


def rlimit_floor(limits: Limits, enforced: Collection[str] = ()) -> list[tuple[int, int, int]]:
    """(resource, soft, hard) rlimits for every command, with or without cgroups.

    `enforced` names the controllers a cgroup enforces for the sandbox; the rlimits stand
    in for the missing ones where an rlimit can:

    - pids: RLIMIT_NPROC, always. The kernel counts it per (user namespace, uid), and every
      sandbox of the namespaces and gVisor backends has a user namespace of its own, so
      inside one it counts that sandbox's processes of the command's uid and nothing of the
      host (kernel >= 5.14; older kernels count all processes of the host uid). The kernel
      ignores it for host uid 0, which only a sandbox mapped to host root has: then the
      cgroup is the limit. Set on the command, not on bwrap: set before the user namespace
      exists it would become the namespace's limit on all processes of the host uid.
      Nobody inside can raise it (raising a hard limit needs CAP_SYS_RESOURCE in the
      host's namespace).
    - memory, without a memory controller: RLIMIT_DATA (heap and private writable
      mappings) per process. A floor only: it bounds one process, not the sandbox's sum,
      and tmpfs pages are bounded by the tmpfs sizes instead.

    RLIMIT_AS is deliberately absent: JIT runtimes (V8, the JVM, Go, LuaJIT) reserve far
    more address space than they use, so a memory-sized RLIMIT_AS breaks them long before
    real memory runs out. Their reservations are PROT_NONE, which RLIMIT_DATA ignores.

    RLIMIT_CORE is absent too: the agent sets it to 1 on itself before its seccomp filter,
    which then keeps every command from changing it (a command's setrlimit would be
    answered without effect). 1, not 0: a pipe core_pattern runs for any other value.
    """
    out: list[tuple[int, int, int]] = []

    def clamp(res: int, soft: int, hard: int) -> None:
        # Raising a hard limit needs CAP_SYS_RESOURCE; never ask for more than we have.
        _, cur_hard = resource.getrlimit(res)
        if cur_hard != resource.RLIM_INFINITY:
            hard = min(hard, cur_hard)
        out.append((res, min(soft, hard), hard))

    if limits.pids is not None:
        clamp(resource.RLIMIT_NPROC, limits.pids, limits.pids)
    if limits.memory_bytes is not None and "memory" not in enforced:
        clamp(resource.RLIMIT_DATA, limits.memory_bytes, limits.memory_bytes)
    clamp(resource.RLIMIT_NOFILE, 4096, 65536)
    return out


def _subgroups(group: Path | str, depth: int = 0) -> list[str]:
    """The groups below `group`, deepest first. One scandir per group, its entries' types
    read from the directory (no stat of each of a group's ~30 control files), and none of
    os.walk's generator machinery: this runs at every sandbox's teardown."""
    out: list[str] = []
    if depth > 64:
        return out
    try:
        with os.scandir(group) as it:
            subs = [e.path for e in it if e.is_dir(follow_symlinks=False)]
    except OSError:
        return out
    for sub in subs:
        out += _subgroups(sub, depth + 1)
        out.append(sub)
    return out
