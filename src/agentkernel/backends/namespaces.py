"""The `namespaces` backend: bubblewrap user/pid/mount/ipc/uts/net/cgroup namespaces."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ..errors import BackendUnavailable, SandboxError
from ..paths import which
from ..profiles import PTY_MAX
from ..sandbox import Sandbox, SandboxSpec, close_fds
from .base import (
    Backend,
    Probe,
    Spawned,
    abandon,
    agent_file,
    by_descriptor,
    control_dir,
    make_scratch,
    open_channel,
    pin_sources,
    spawn_agent,
    startup_failure,
)

if TYPE_CHECKING:
    from ..cgroups import Cgroup

AGENT_DIR = "/run/ak"  # where the agent and its seccomp program appear inside
OVERLAY_DIR = "/run/ak/ov"  # tmpfs-backed upper/work dirs of the copy-on-write layers
WS_LOWER = "/run/ak/lower/workspace"
RESOLV = "/run/ak/resolv.conf"  # bound over /etc/resolv.conf by the agent, after overlays
# With secrets: the system's CA bundle plus the sandbox's egress CA (egress_gate), beside
# resolv.conf on the host and over the system bundle inside.
TRUST = "/run/ak/egress-trust.pem"
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


@lru_cache(maxsize=1)
def _bwrap() -> str | None:
    return which("bwrap")


# --bind-fd and --ro-bind-fd (bwrap 0.8.0): binds pinned by their descriptor (an ordinary
# user's: a project's .git pins, agents' installs; root's: what cannot be id-mapped).
BWRAP_MIN = (0, 8, 0)


def bwrap_version(bwrap: str) -> tuple[int, ...] | None:
    """`bwrap --version`'s version ("bubblewrap 0.8.0"), None if it says none."""
    try:
        out = subprocess.run([bwrap, "--version"], capture_output=True, timeout=10,
                             check=False, stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    words = out.decode(errors="replace").split()
    parts = words[-1].split(".") if words else []
    return tuple(int(x) for x in parts) if parts and all(x.isdigit() for x in parts) else None


def too_old(bwrap: str, version: tuple[int, ...] | None) -> str:
    """That a bwrap older than BWRAP_MIN cannot bind by descriptor."""
    have = ".".join(map(str, version)) if version else "of unknown version"
    return (f"bubblewrap {have} ({bwrap}) is older than {'.'.join(map(str, BWRAP_MIN))}, "
            "which --bind-fd and --ro-bind-fd need")


UPGRADE = f"install bubblewrap {'.'.join(map(str, BWRAP_MIN))} or newer"


def _bwrap_failure(bwrap: str, log: int, process: subprocess.Popen[bytes]) -> Exception:
    """`startup_failure`, told plainly where bwrap did not know one of our options (an
    older one: BWRAP_MIN). Nothing ran: the sandbox failed closed."""
    err = startup_failure("bwrap", log, process)
    if "Unknown option --" in err.message:
        return BackendUnavailable(f"{too_old(bwrap, bwrap_version(bwrap))}: this sandbox "
                                  f"binds by descriptor; {UPGRADE} ({err.message})")
    return err


class NamespacesBackend(Backend):
    name = "namespaces"
    isolation = "Linux namespaces + seccomp (shares the host kernel)"
    strength = 10
    stoppable = True  # its writable layers are host dirs (state_dir)
    snapshots = True

    def probe(self, deep: bool = False) -> Probe:
        bwrap = _bwrap()
        if bwrap is None:
            return Probe(False, "bubblewrap (bwrap) is not installed: apt install bubblewrap")
        try:
            with open("/proc/sys/user/max_user_namespaces") as f:
                if int(f.read().strip() or 0) == 0:
                    return Probe(False, "user namespaces are disabled "
                                        "(/proc/sys/user/max_user_namespaces is 0)")
        except (OSError, ValueError):
            pass
        if not deep:
            return Probe(True, bwrap)  # (an older bwrap: told at its first failed start)
        version = bwrap_version(bwrap)
        # Runs that bind by descriptor are refused, not worked around: binding those by
        # path instead would reopen the races the descriptors close (an agent's project's
        # .git swapped for a link meanwhile). Others run as before.
        old = "" if version is not None and version >= BWRAP_MIN else \
            f"; but {too_old(bwrap, version)}: runs that bind by descriptor (an agent's " \
            f"project .git and install) are refused; {UPGRADE}"
        try:
            result = subprocess.run(
                [bwrap, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "true"],
                capture_output=True, timeout=10, check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return Probe(False, f"bwrap cannot run: {exc}")
        if result.returncode != 0:
            err = result.stderr.decode(errors="replace").strip()
            return Probe(False, f"unprivileged user namespaces do not work here: {err}")
        return Probe(True, f"{bwrap} works (user, pid, mount, ipc, uts, net, cgroup "
                           f"namespaces){old}")

    def version_files(self) -> tuple[str, ...]:
        return (_bwrap() or "bwrap", agent_file())

    def start(self, spec: SandboxSpec, give: int = -1) -> Sandbox:
        """`give`: a descriptor the agent hands to one command as its stdin and stdout
        (`AgentClient.exec(given_stdio=True)`): the wasm backend's worker channel."""
        # Under heavy namespace churn (dozens of sandboxes starting at once) the kernel
        # sometimes fails bwrap's netlink call that brings up the new netns's loopback
        # (seen as ECHILD); nothing has run yet, so starting again is safe.
        for attempt in range(4):
            try:
                return self._start(spec, give)
            except SandboxError as exc:
                if "loopback:" not in exc.message or attempt == 3:
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    def _start(self, spec: SandboxSpec, give: int = -1) -> Sandbox:
        from ..cgroups import Cgroup, Limits
        from ..network import lifeline
        from ..paths import native_binary
        from ..seccomp import compile_bpf

        bwrap = _bwrap()
        if bwrap is None:
            raise BackendUnavailable(
                "the namespaces backend needs bubblewrap: apt install bubblewrap")
        agent = native_binary("ak-agent")
        # A read-write project dir is the host's: no set-id files made there (seccomp.py).
        bpf = compile_bpf(spec.profile.seccomp, no_setid=spec.profile.workspace == "rw")
        keep = persistent_dirs(spec)
        if keep is not None:
            for sub in PERSISTENT_SUBDIRS:
                (keep / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
            # A /tmp, /var/tmp and /home as on any system, for an agent's user (whose
            # HOME is in /home); the parents stay private.
            for sub, mode in (("tmp", 0o1777), ("var_tmp", 0o1777), ("home", 0o755)):
                (keep / "dirs" / sub).chmod(mode)
        scratch = make_scratch(spec.name)
        sandbox: Sandbox | None = None
        spawned: Spawned | None = None
        cgroup: Cgroup | None = None
        helpers: list[subprocess.Popen[bytes]] = []
        log_fd = -1
        resolv: str | int | None = None
        try:
            p = spec.profile
            cgroup = Cgroup.create(spec.name, Limits(
                memory_bytes=p.memory_mb * 1024 * 1024 if p.memory_mb else None,
                pids=p.pids, cpus=p.cpus))
            resolv = _resolv(scratch, spec) if p.network == "egress" else None
            info_r, info_w = os.pipe() if p.network == "egress" else (-1, -1)
            # bwrap holds the lifeline's write end (--sync-fd) for as long as the sandbox
            # runs, so its egress gate exits with it whatever happens to us.
            life_r, life_w = lifeline() if p.network == "egress" else (-1, -1)
            gate = _gate_spawn(scratch, life_r, helpers) if p.network == "egress" else None
            control = control_dir(scratch) if spec.persistent else None
            # bwrap's stderr, read only if the start fails: a memfd, not a file in the
            # scratch dir (each new inode there cost a daemon ~0.2 ms of kernel time under
            # churn on ext4, whose allocator scans past recently deleted inodes). Its pages
            # are charged to whoever writes them: bwrap and the agent, in the sandbox's
            # cgroup. Named for its sandbox: the fds of a start's processes say whose they are.
            log_fd = os.memfd_create(f"ak-backend-log-{spec.name}"[:240], os.MFD_CLOEXEC)
            opened: list[int] = []  # ours to close once bwrap has them
            kept: list[int] = []  # ours alone (never passed), closed with them
            try:
                image = agent_image(str(agent))
                argv, preexec = _command(
                    bwrap, spec, str(agent), str(bpf), resolv=resolv,
                    info_fd=info_w, control=str(control) if control else None, sync_fd=life_w,
                    cgroup=cgroup, opened=opened, kept=kept, give=give, image=image)
                # (the agent's image is this process's, kept open for every sandbox)
                fds = [fd for fd in (info_w, life_w, give, image if image is not None else -1,
                                     resolv if isinstance(resolv, int) else -1) if fd >= 0]
                # The namespace itself (opened[0], as root) goes to ak-enter, which closes
                # it before bwrap; a preexec function uses it in our forked child instead.
                passed = opened[1:] if preexec is not None and os.geteuid() == 0 \
                    else opened
                given = [*fds, *passed]
                entered = (preexec is None and bool(argv) and argv[0].endswith("/ak-enter")
                           and len(set(given)) <= ENTER_KEEP_MAX and _enter_keeps(argv[0]))
                if entered:  # it closes what it does not keep, before anything else
                    argv = [argv[0], "--keep", ",".join(map(str, sorted(set(given)))),
                            *argv[1:]]
                spawned = spawn_agent(argv, log=log_fd, pass_fds=given, preexec_fn=preexec,
                                      child_closes=entered)
            finally:
                close_fds(info_w, life_w, *opened, *kept)
            try:
                client = open_channel(spawned, control)
            except SandboxError:
                raise _bwrap_failure(bwrap, log_fd, spawned.process) from None
            sandbox = Sandbox(spec=spec, backend=self.name, isolation=self.isolation,
                              client=client, process=spawned.process, scratch=scratch,
                              cgroup=cgroup)
            sandbox.helpers.extend(helpers)  # the egress gate, if any
            if cgroup is None and (p.memory_mb or p.pids or p.cpus):
                sandbox.notes.append("cgroups are not writable here: limits are rlimits only")
            if info_r >= 0:
                try:
                    child_pid = _read_child_pid(info_r)
                finally:
                    close_fds(info_r)
                if child_pid is None:
                    raise _bwrap_failure(bwrap, log_fd, spawned.process)
                try:
                    assert gate is not None
                    _egress(gate, child_pid, spec)
                except SandboxError:
                    # The sandbox's namespace vanished under the gate's set-up when bwrap failed
                    # first: its reason is the one to tell.
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        spawned.process.wait(timeout=1)
                    if spawned.process.returncode is not None:
                        raise _bwrap_failure(bwrap, log_fd, spawned.process) from None
                    raise
                finally:
                    close_fds(life_r)
            try:
                client.hello(timeout=15)
            except SandboxError:
                raise _bwrap_failure(bwrap, log_fd, spawned.process) from None
            return sandbox
        except BaseException:
            if sandbox is not None:
                sandbox.destroy()
            else:
                abandon(scratch, spawned.process if spawned else None, cgroup, helpers)
            raise
        finally:
            close_fds(log_fd)  # bwrap holds its own
            if isinstance(resolv, int):
                close_fds(resolv)  # (bwrap copied it)


def _resolv(scratch: Path, spec: SandboxSpec) -> str | int:
    """The sandbox's resolv.conf (slirp's DNS forwarder, never the host's loopback
    resolver): a memfd bwrap copies into the sandbox's own /run (--file), no file
    in the scratch dir (each new inode there costs the daemon kernel time on a /run of
    ext4: docs/daemon.md). A file there, beside the sandbox's CA bundle, for a sandbox
    with secrets (host_binds binds both)."""
    from ..network import RESOLV_CONF, write_resolv_conf

    if spec.egress is not None and spec.egress.secrets:
        from ..egress_gate import write_tls

        path = write_resolv_conf(scratch)
        write_tls(scratch, spec.egress)  # the sandbox's CA: its key is gone after
        return str(path)
    fd = os.memfd_create("ak-resolv", os.MFD_CLOEXEC)
    try:
        os.write(fd, RESOLV_CONF.encode())  # (a few dozen bytes: one write)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _gate_spawn(scratch: Path, exit_fd: int, helpers: list[subprocess.Popen[bytes]]) -> Any:
    """The sandbox's egress gate (egress_gate), started before bwrap: its interpreter's
    start-up overlaps the sandbox's."""
    from ..egress_gate import GateStart

    gate = GateStart(scratch, exit_fd=exit_fd)
    if gate.gate is not None:  # None: on demand, from the fork server
        helpers.append(gate.gate)
    return gate


def _egress(gate: Any, pid: int, spec: SandboxSpec) -> None:
    """The sandbox's only way out: its gate, serving (rules loaded) before it runs."""
    from ..egress_policy import Policy

    _wait_loopback(pid)
    gate.attach(pid, spec.egress or Policy(), instance=spec.instance)
    gate.wait()


def _wait_loopback(pid: int, timeout: float = 5.0) -> None:
    """Until bwrap has set up the sandbox's loopback (it does so after reporting the
    pid): the gate's wiring also brings lo up, and bwrap, finding 127.0.0.1 already
    there, fails its start ("loopback: Failed RTM_NEWADDR"). SandboxError if the
    sandbox is gone (the caller then reports bwrap's own reason)."""
    deadline = time.monotonic() + timeout
    path = f"/proc/{pid}/net/fib_trie"
    while time.monotonic() < deadline:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:  # (a new namespace's table is a few hundred bytes; 127.0.0.1 comes first)
                if b"127.0.0.1" in os.read(fd, 65536):
                    return
            finally:
                os.close(fd)
        except OSError:
            raise SandboxError("the sandbox ended before its egress gate was set up") \
                from None
        time.sleep(0.001)


def _command(
    bwrap: str, spec: SandboxSpec, agent: str, bpf: str, *, resolv: str | int | None,
    info_fd: int, control: str | None, sync_fd: int, cgroup: Cgroup | None, opened: list[int],
    kept: list[int], give: int = -1, image: int | None = None,
) -> tuple[list[str], Callable[[], None] | None]:
    """The argv that starts bwrap in the sandbox's cgroups (and, as root, its user
    namespace), and the function to run before it where ak-enter is missing.

    Started by root, bwrap runs as root of the sandbox's own user namespace, which maps
    to an unprivileged host range: never host root. `opened` gets the fds to pass (the
    first, as root, is the namespace itself), `kept` those only this process uses.
    `image`: the agent's sealed copy (agent_image), which the caller passes on; None:
    bwrap puts a copy or a bind of the agent and its seccomp program in the sandbox.
    """
    pins = pin_sources(spec.ro_binds, kept)
    if os.geteuid() != 0:
        # bwrap binds each by its descriptor (--ro-bind-fd), and closes it.
        opened.extend(pins)
        kept[:] = [fd for fd in kept if fd not in pins]
        by_fd = {target: fd for fd, (_, target) in zip(pins, spec.ro_binds, strict=True)}
        prefix, preexec = _entry(cgroup, -1)
        handed = image is not None
        return [*prefix, *build_bwrap_argv(
            bwrap, spec, image if image is not None else agent,
            _file_fd(bpf, opened) if handed else bpf, resolv=resolv, info_fd=info_fd,
            control=control, sync_fd=sync_fd, give=give, by_fd=by_fd, handed=handed)], preexec
    # As root, each is id-mapped from its descriptor in this process (_attach_fds).
    spec = spec._replace(ro_binds=by_descriptor(spec.ro_binds, pins))
    from ..idmap import owner_userns, sandbox_range_userns

    userns, lock, rng = sandbox_range_userns(opened)
    # The project, for a sandbox whose commands run as a user: the caller's files show
    # as that user's, and what it writes lands as the caller's (an id-mapped mount of
    # that one owner; other owners' files show as nobody's there).
    target = workspace_bind(spec)
    own = {target: owner_userns(rng, spec.user[0], spec.user[1])} \
        if spec.user is not None and target is not None else {}
    try:  # (the mount keeps its namespace: no fd of it goes on to the sandbox)
        attached = _attach_fds(host_binds(spec, control, resolv), userns, opened, own,
                               spec.rootfs.host_owned())
    finally:
        close_fds(*own.values())
    argv = build_bwrap_argv(bwrap, spec, image if image is not None else _file_fd(agent, opened),
                            _file_fd(bpf, opened), resolv=resolv, info_fd=info_fd,
                            control=control, sync_fd=sync_fd, attached=attached, hold=lock,
                            give=give, handed=image is not None, devices=_devices(opened))
    prefix, preexec = _entry(cgroup, userns)
    return [*prefix, *argv], preexec


def _entry(cgroup: Cgroup | None, userns: int
           ) -> tuple[list[str], Callable[[], None] | None]:
    """How bwrap gets into its cgroups and user namespace (`userns` -1: none): through
    ak-enter (exec'd by a vfork: no fork of this whole process, which in a daemon is
    large and has threads), or, without it, a preexec function in a forked child."""
    from ..idmap import enter_fn
    from ..paths import native_binary

    if cgroup is None and userns < 0:
        return [], None
    try:
        helper = native_binary("ak-enter")
    except SandboxError:
        join = cgroup.join_fn() if cgroup is not None else None
        return [], (enter_fn(userns, join) if userns >= 0 else join)
    argv = [str(helper)]
    for procs in cgroup.procs_files() if cgroup is not None else []:
        argv += ["--cgroup", procs]
    if userns >= 0:
        argv += ["--userns", str(userns)]
    return [*argv, "--"], None


ENTER_KEEP_MAX = 64  # ak-enter --keep's cap (AK_KEEP_MAX); past it, spawn closes them all

@lru_cache(maxsize=4)
def _enter_keeps(helper: str) -> bool:
    """Whether this ak-enter knows --keep (one run per process): a binary built before it
    would refuse every start ("unknown option"), so spawn then closes them all itself."""
    true = which("true")
    if true is None:
        return False
    try:
        r = subprocess.run([helper, "--keep", "3", "--", os.path.realpath(true)],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=10,
                           check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


DEVICES = ("null", "zero", "full", "random", "urandom", "tty")  # bwrap's --dev's


def _devices(opened: list[int]) -> dict[str, int] | None:
    """The host's device nodes a root-started sandbox's /dev gets, as detached mounts for
    the agent to attach (it makes that /dev: --make-dev); None where one cannot be had
    (bwrap's --dev then makes it, as for an ordinary user's sandbox)."""
    from ..idmap import device_tree

    out: dict[str, int] = {}
    try:
        for name in DEVICES:
            out[name] = device_tree(f"/dev/{name}")
    except OSError:
        close_fds(*out.values())
        return None
    opened.extend(out.values())
    return out


def workspace_bind(spec: SandboxSpec) -> str | None:
    """The in-sandbox target of the project's host bind (None: no project)."""
    if spec.workspace is None or spec.profile.workspace == "none":
        return None
    return WS_LOWER if spec.profile.workspace == "cow" else spec.workspace_at


def _attach_fds(binds: list[HostBind], userns: int, opened: list[int],
                own: Mapping[str, int] | None = None,
                unmapped: Collection[str] = ()) -> dict[str, Attach]:
    """Each host dir as an id-mapped mount for the agent to attach (with the user
    namespace `own` names for its target, else the sandbox's; sources in `unmapped`, the
    host's userland, not id-mapped: rootfs.HostRootfs.host_owned); a file, or a dir on a
    filesystem that cannot be id-mapped, as a plain fd bwrap binds (its files then show as
    owned by nobody: readable where the host lets everyone read them, no more)."""
    from ..idmap import idmapped_tree, unmapped_tree

    out: dict[str, Attach] = {}
    for b in binds:
        if os.path.exists(b.src):
            try:
                fd = unmapped_tree(b.src, read_only=b.read_only) if b.src in unmapped \
                    else idmapped_tree(b.src, (own or {}).get(b.target, userns),
                                       read_only=b.read_only)
            except OSError:
                pass
            else:
                opened.append(fd)
                out[b.target] = Attach(fd, True)
                continue
        out[b.target] = Attach(_file_fd(b.src, opened, os.O_PATH), False)
    return out


def _file_fd(path: str, opened: list[int], flags: int = os.O_RDONLY) -> int:
    """An fd of a host path, opened as host root: bwrap, inside the sandbox's user
    namespace, could not walk to root-only places by name."""
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except OSError as exc:
        raise SandboxError(f"cannot open {path} for the sandbox: {exc.strerror}") from None
    opened.append(fd)
    return fd


def _read_child_pid(fd: int) -> int | None:
    """bwrap writes {"child-pid": N} to --info-fd once the namespaces exist."""
    import json

    data = b""
    with contextlib.suppress(OSError):
        while b"}" not in data:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    try:
        pid = json.loads(data.decode())["child-pid"]
    except (ValueError, KeyError, UnicodeDecodeError):
        return None
    return int(pid)


class HostBind(NamedTuple):
    """A host dir (or file) the sandbox gets at `target`."""

    src: str
    target: str
    read_only: bool


def host_binds(
    spec: SandboxSpec, control: str | None = None, resolv: str | int | None = None
) -> list[HostBind]:
    """Every host path bound into the sandbox, in mount order (the rootfs's binds, the
    persistent layers, the project, $HOME, the control dir, resolv.conf where it is a
    file, not a descriptor bwrap copies). Pure."""
    p = spec.profile
    binds = [HostBind(e.src, e.path, True) for e in spec.rootfs.entries if e.kind != "symlink"]
    keep = persistent_dirs(spec)
    tops = {e.path for e in spec.rootfs.entries}
    if keep is not None:
        binds.append(HostBind(str(keep / "dirs" / "tmp"), "/tmp", False))
        if p.root_writable:
            binds += [HostBind(str(keep / "dirs" / path.strip("/").replace("/", "_")), path,
                               False)
                      for path in HOME_DIRS if "/" + path.split("/")[1] not in tops]
        # The overlays' upper/work dirs live on the host's disk, not on /run's tmpfs.
        binds.append(HostBind(str(keep / "layers"), OVERLAY_DIR, False))
    if spec.workspace is not None and p.workspace != "none":
        target = WS_LOWER if p.workspace == "cow" else spec.workspace_at
        binds.append(HostBind(str(spec.workspace), target, p.workspace != "rw"))
    if p.mount_home and spec.home is not None:
        binds.append(HostBind(str(spec.home), "/home/user", True))
    binds += [HostBind(src, target, True) for src, target in spec.ro_binds]
    if control is not None:
        binds.append(HostBind(control, f"{AGENT_DIR}/ctl", False))
    if isinstance(resolv, str):
        binds.append(HostBind(resolv, RESOLV, True))
        if spec.egress is not None and spec.egress.secrets:
            from ..egress_gate import TRUST_NAME

            binds.append(HostBind(str(Path(resolv).with_name(TRUST_NAME)), TRUST, True))
    return binds


class Attach(NamedTuple):
    """How a root-started sandbox gets one host path: an fd, id-mapped or plain."""

    fd: int
    idmapped: bool


HOME_DIRS = ("/root", "/home", "/var/tmp")  # empty dirs, or a persistent sandbox's own


def build_bwrap_argv(
    bwrap: str, spec: SandboxSpec, agent: str | int, bpf: str | int, *,
    resolv: str | int | None, info_fd: int, control: str | None = None, sync_fd: int = -1,
    attached: Mapping[str, Attach] | None = None, hold: int = -1, give: int = -1,
    by_fd: Mapping[str, int] | None = None, handed: bool = False,
    devices: Mapping[str, int] | None = None,
) -> list[str]:
    """The full bwrap command line for `spec`. Pure: no I/O, easy to inspect in tests.

    `attached` is for a sandbox started by root: bwrap then runs inside the sandbox's own
    user namespace (see idmap), every host path comes as an id-mapped mount the agent
    attaches (target -> fd), and the agent and its seccomp program as copies of fds we
    opened (`agent`, `bpf` are then fd numbers). Otherwise bwrap maps the caller to uid 0
    of a new user namespace and binds host paths itself.

    `handed`: `agent` is the fd of the agent's sealed copy (agent_image), which bwrap
    execs as /proc/self/fd/N, and `bpf` an fd the agent reads its program from: no file
    of either is made or bound in the sandbox (bwrap re-reads the mount table for each
    bind it makes: two fewer per start).

    `devices`: the device nodes of a root-started sandbox's /dev as detached mounts
    (name -> fd, `_devices`): the agent makes /dev around them, where bwrap's --dev would
    bind each (re-reading the mount table each time).
    """
    p = spec.profile
    cow_root = p.root_writable
    argv = [bwrap]
    if attached is None:  # the caller's one id: the sandbox's root (see --user below)
        argv += ["--unshare-user", "--uid", "0", "--gid", "0"]
    argv += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
             "--new-session", "--as-pid-1", "--hostname", spec.hostname]
    if p.network != "host":
        argv.append("--unshare-net")
    if not spec.persistent:
        argv.append("--die-with-parent")
    if info_fd >= 0:
        argv += ["--info-fd", str(info_fd)]
    if sync_fd >= 0:
        argv += ["--sync-fd", str(sync_fd)]
    if handed:
        assert isinstance(agent, int) and isinstance(bpf, int)
        agent_argv = [f"/proc/self/fd/{agent}", "--exec-fd", str(agent)]
    else:
        agent_argv = [f"{AGENT_DIR}/agent"]
    if hold >= 0:  # the lock of the sandbox's id range: the agent keeps it while it lives
        agent_argv += ["--hold", str(hold)]
    if give >= 0:  # for one command's stdio (the wasm worker's channel to its host)
        agent_argv += ["--give", str(give)]
    binds = {b.target: b for b in host_binds(spec, control, resolv)}

    def bind(target: str) -> None:
        b = binds[target]
        if attached is not None and attached[target].idmapped:
            if os.path.isdir(b.src):
                argv.extend(("--dir", target))
            agent_argv.extend(("--attach", f"{attached[target].fd}:{target}"))
        elif attached is not None:
            flag = "--ro-bind-fd" if b.read_only else "--bind-fd"
            argv.extend((flag, str(attached[target].fd), target))
        elif by_fd and target in by_fd:  # (a read-only bind pinned by its descriptor)
            argv.extend(("--ro-bind-fd", str(by_fd[target]), target))
        else:
            argv.extend(("--ro-bind" if b.read_only else "--bind", b.src, target))

    # tmpfs pages count in the memory cgroup of whoever wrote them; the size bounds them
    # also where no memory controller is usable. /run holds the overlays' upper dirs.
    size = ["--size", str(p.memory_mb * 1024 * 1024)] if p.memory_mb else []
    if size:
        # bwrap's own root is a tmpfs of half the host's RAM, and the sandbox's root writes
        # it (/, and /root, /home, /var/tmp made there): a sized one over it, first.
        argv += [*size, "--tmpfs", "/"]
    for entry in spec.rootfs.entries:
        if entry.kind == "symlink":
            argv += ["--symlink", entry.target, entry.path]
        else:
            bind(entry.path)
    # bwrap's /dev is another tmpfs of half the host's RAM that the sandbox's root may
    # write (no size option): without a memory controller (an ordinary user's sandbox) a
    # file there took host memory past every cap. Read-only (device nodes still open for
    # writing), with a /dev/shm of the cap's size.
    argv += ["--proc", "/proc"]
    if devices is None:
        argv += ["--dev", "/dev", "--remount-ro", "/dev", *size, "--perms", "1777", "--tmpfs",
                 "/dev/shm"]
    else:  # the same /dev (read-only, a sized /dev/shm), made by the agent
        argv += ["--dir", "/dev"]
        agent_argv += ["--make-dev", str(p.memory_mb * 1024 * 1024 if p.memory_mb else 0)]
        for name, fd in devices.items():
            agent_argv += ["--attach", f"{fd}:/dev/{name}"]
    if "/tmp" in binds:
        bind("/tmp")  # a persistent sandbox keeps /tmp on disk: stop/start, snapshots
    else:
        # (sticky and world-writable where commands are not the sandbox's root)
        perms = ["--perms", "1777"] if spec.user is not None else []
        argv += [*size, *perms, "--tmpfs", "/tmp"]
    argv += [*size, "--tmpfs", "/run"]
    tops = {e.path for e in spec.rootfs.entries}
    for path in HOME_DIRS:
        if "/" + path.split("/")[1] in tops:  # the image brings its own
            continue
        if path in binds:
            bind(path)
        else:
            argv += ["--dir", path]
    if OVERLAY_DIR in binds:
        bind(OVERLAY_DIR)
    if handed:
        argv += ["--dir", AGENT_DIR]  # (where the sandbox's own files from the host go)
    else:
        argv += _file_bind(agent, f"{AGENT_DIR}/agent") + \
            _file_bind(bpf, f"{AGENT_DIR}/seccomp.bpf")
    if spec.workspace is not None and p.workspace != "none":
        if p.workspace == "cow":
            bind(WS_LOWER)
            argv += ["--dir", spec.workspace_at]
        else:
            bind(spec.workspace_at)
    if "/home/user" in binds:
        bind("/home/user")
    for _, target in spec.ro_binds:
        bind(target)
    # Overlays and masks need CAP_SYS_ADMIN in the sandbox's user namespace; the agent
    # does them, then drops every capability before it serves anything.
    if cow_root:
        for entry in spec.rootfs.entries:
            if entry.is_dir:
                agent_argv += ["--overlay", _overlay(entry.path, entry.path)]
    if spec.workspace is not None and p.workspace == "cow":
        agent_argv += ["--overlay", _overlay(spec.workspace_at, WS_LOWER)]
    if resolv is not None:
        # After the overlays, or the one over /etc would hide it.
        if isinstance(resolv, int):
            # Its contents, a file bwrap writes in the sandbox's own /run (not a bind of
            # one: the kernel refuses to bind from --ro-bind-data's, which is unlinked),
            # bound read-only over /etc/resolv.conf by the agent and masked where it was
            # made: no command can write it, as none could write the host's file.
            argv += ["--perms", "0644", "--file", str(resolv), RESOLV]
        else:
            bind(RESOLV)
        agent_argv += ["--bind", f"{RESOLV}:/etc/resolv.conf"]
        if isinstance(resolv, int):
            agent_argv += ["--mask", RESOLV]
    if TRUST in binds:
        bind(TRUST)
        agent_argv += ["--bind", f"{TRUST}:{SYSTEM_BUNDLE}"]
    found = spec.found_masks
    for mask in found if found is not None else spec.rootfs.masks:
        agent_argv += ["--mask", mask.path]
    for hidden in spec.masks:  # the host's control plane; the cow lower dir shows it too
        agent_argv += ["--mask", hidden]
        if p.workspace == "cow" and hidden.startswith(spec.workspace_at + "/"):
            agent_argv += ["--mask", WS_LOWER + hidden.removeprefix(spec.workspace_at)]
    for private in spec.rootfs.private_dirs if found is None else ():
        agent_argv += ["--mask-private", private]  # walked by the agent (~1 ms of CPU)
    agent_argv.append("--cover-proc")
    agent_argv += ["--pty-max", str(PTY_MAX)]  # bwrap's devpts has no `max` of its own
    # Run unprivileged, bwrap leaves only what is asked for: CAP_DAC_OVERRIDE lets
    # overlayfs set up over host dirs whose owner is unmapped here, CAP_SETPCAP lets the
    # agent empty the bounding set. All are the sandbox user namespace's, and all go
    # before the agent serves anything.
    # With a user for commands, the agent also switches to it and gives it its HOME (an
    # ordinary user's sandbox maps one id: there a user namespace of the agent's own,
    # below the sandbox's, shows the caller as that user).
    # (CAP_SETFCAP: the kernel lets a namespace map its parent's root only then)
    switch = ("CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_SETFCAP") \
        if spec.user is not None else ()
    for cap in ("CAP_SYS_ADMIN", "CAP_DAC_OVERRIDE", "CAP_SETPCAP", *switch):
        argv += ["--cap-add", cap]
    if not cow_root:
        # By the agent, once its own mounts are made: bwrap's --remount-ro re-reads the
        # mount table to find the flags to keep (ours are known: nosuid, nodev).
        agent_argv.append("--root-ro")
    seccomp = ["--seccomp-fd", str(bpf)] if handed else ["--seccomp", f"{AGENT_DIR}/seccomp.bpf"]
    agent_argv += ["--drop-caps", *seccomp, "--guard-unix", ":".join(own_mounts(spec, binds))]
    if spec.user is not None:
        agent_argv += ["--user", "{}:{}:{}".format(*spec.user)]
    if control is not None:
        bind(f"{AGENT_DIR}/ctl")
        agent_argv += ["--listen", f"{AGENT_DIR}/ctl/agent.sock", "--lock-listen-dir",
                       "--peers-outside"]  # its commands see the socket: never serve them
    argv += ["--chdir", "/", "--", *agent_argv]
    return argv


def own_mounts(spec: SandboxSpec, binds: Mapping[str, HostBind]) -> list[str]:
    """The mounts whose unix sockets the sandbox's commands may connect to: those it made
    (its tmpfs root, /tmp, /run, /dev, /dev/shm; every overlay: one passes no connect() on
    to a socket of its layers) and a persistent sandbox's own dirs. Every other mount is
    bound from the host, and a socket there is a host server's (`--guard-unix`,
    docs/security.md)."""
    own = ["/", "/run", "/dev", "/dev/shm"]
    keep = persistent_dirs(spec)
    tops = {e.path for e in spec.rootfs.entries}
    for path in ("/tmp", *HOME_DIRS):
        b = binds.get(path)
        if "/" + path.split("/")[1] in tops and b is None:
            continue  # the image's own dir: whatever its entry is (below)
        if b is None or (keep is not None and b.src.startswith(str(keep) + "/")):
            own.append(path)
    if spec.profile.root_writable:
        own += [e.path for e in spec.rootfs.entries if e.is_dir]
    if spec.workspace is not None and spec.profile.workspace == "cow":
        own.append(spec.workspace_at)
    return [m for m in own if ":" not in m]  # (the list's separator: it would name two)


# Each version of the agent binary this process made a sealed copy of (agent_image): at
# most a few (a reinstall under a running daemon), never closed (a start on another
# thread may be passing one on).
_IMAGES: dict[tuple[int, int, int, int], int] = {}
_IMAGES_MAX = 4
_IMAGES_LOCK = threading.Lock()
_MFD_EXEC = 0x0010  # (Linux 6.3: the memfd may be exec'd whatever vm.memfd_noexec says)
_F_SEAL_EXEC = 0x0020  # (Linux 6.3: its exec bits can no longer change)


def agent_image(path: str) -> int | None:
    """An fd (close-on-exec) of a sealed in-memory copy of the agent binary at `path`,
    made once per version of it and kept: bwrap execs the agent from it, instead of
    copying 120 KiB into each sandbox's tmpfs and binding it there. Sealed against
    writes, growth and shrinking, like runc's copy of itself: nothing that gets to it
    (the agent is not dumpable) can change what the next sandbox runs. None where no
    executable memfd can be made (the caller then binds the file as before)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    with _IMAGES_LOCK:
        fd = _IMAGES.get(key)
        if fd is None and len(_IMAGES) < _IMAGES_MAX:
            fd = _seal_copy(path, key)
            if fd is not None:
                _IMAGES[key] = fd
        return fd


def _seal_copy(path: str, key: tuple[int, int, int, int]) -> int | None:
    """agent_image's copy of `path`, if it still is the version `key` names."""
    import fcntl

    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    try:
        fd = os.memfd_create("ak-agent", flags | _MFD_EXEC)
    except OSError as exc:
        # EINVAL: a kernel before 6.3, where every memfd may be exec'd. Otherwise (EACCES:
        # vm.memfd_noexec=2) a memfd without the flag could not be exec'd either.
        if exc.errno != errno.EINVAL:
            return None
        try:
            fd = os.memfd_create("ak-agent", flags)
        except OSError:
            return None
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(st.st_size + 1)
        if (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size) != key or len(data) != key[3]:
            raise OSError("the agent binary changed while it was copied")
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        try:  # and its mode (no chmod making it unrunnable for later sandboxes): Linux 6.3
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals | _F_SEAL_EXEC | fcntl.F_SEAL_SEAL)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals | fcntl.F_SEAL_SEAL)
    except OSError:
        os.close(fd)
        return None
    return fd


def _file_bind(src: str | int, target: str) -> list[str]:
    """A read-only host file at `target`: a bind of its path, or a copy of what an fd we
    opened holds (bwrap turns a path fd back into a path it could not walk to as the
    sandbox's root; these files are small)."""
    if isinstance(src, int):
        return ["--perms", "0555", "--ro-bind-data", str(src), target]
    return ["--ro-bind", src, target]


PERSISTENT_SUBDIRS = ("layers", "dirs/root", "dirs/home", "dirs/var_tmp", "dirs/tmp")


def persistent_dirs(spec: SandboxSpec) -> Path | None:
    """The host dir keeping a persistent sandbox's writable layers, if it has one."""
    if not spec.persistent or spec.state_dir is None:
        return None
    return spec.state_dir


def _overlay(target: str, lower: str) -> str:
    slug = target.strip("/").replace("/", "_") or "root"
    return f"{target}:{lower}:{OVERLAY_DIR}/{slug}/upper:{OVERLAY_DIR}/{slug}/work"
