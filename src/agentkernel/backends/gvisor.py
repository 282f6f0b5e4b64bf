"""The `gvisor` backend: runsc with an OCI bundle we generate; a user-space kernel per sandbox."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Collection
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ..errors import BackendUnavailable, SandboxError
from ..paths import which
from ..sandbox import Sandbox, SandboxSpec, close_fds
from .base import (
    Backend,
    Probe,
    Spawned,
    abandon,
    agent_file,
    bounded_log,
    by_descriptor,
    control_dir,
    make_scratch,
    open_channel,
    pin_sources,
    spawn_agent,
    startup_failure,
)

if TYPE_CHECKING:
    from ..idmap import HostRange, Staged

AGENT_PATH = "/.ak/agent"
SECCOMP_PATH = "/.ak/seccomp.bpf"
# Held by the agent only while it sets up the in-sandbox pids cgroup, then dropped.
SETUP_CAPS = ("CAP_SYS_ADMIN", "CAP_DAC_OVERRIDE", "CAP_SETPCAP")
CONTROL_PATH = "/.ak/ctl"  # persistent sandboxes: the agent listens on a socket here
GVISOR_TASK_OVERHEAD = 256  # host threads of runsc itself, on top of the sandbox's own
# Host tasks one sandboxed task may cost under the ptrace platform (its stub, tracer and
# goroutine threads), with room to spare: measured 12 per task with 100 sleeping
# processes, 20 with 300, 28 with 400 (runsc 2022-12). The host cgroup's cap is this many
# times the sandbox's, so gVisor's own cap (the exact one) is hit first: hitting the
# host's first kills the sentry, and the sandbox with it.
GVISOR_HOST_TASKS_PER_TASK = 32
HOST_PID_SHARE = 4


@lru_cache(maxsize=1)
def _pid_max() -> int:
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        return 32768  # the kernel's default


def sandbox_pids(pids: int | None) -> int | None:
    """The pids cap enforced inside gVisor: the profile's, lowered so that the host tasks
    it costs stay within a share of the host's pid space (None: explicitly unlimited)."""
    if pids is None:
        return None
    budget = _pid_max() // HOST_PID_SHARE - GVISOR_TASK_OVERHEAD
    return max(8, min(pids, budget // GVISOR_HOST_TASKS_PER_TASK))


def host_pids(pids: int | None) -> int | None:
    """The host cgroup's cap for a sandbox whose gVisor cap is `pids`."""
    return None if pids is None else GVISOR_HOST_TASKS_PER_TASK * pids + GVISOR_TASK_OVERHEAD


@lru_cache(maxsize=1)
def _runsc() -> str | None:
    return which("runsc")


@lru_cache(maxsize=1)
def platform() -> str:
    """systrap where this runsc has it (faster), else ptrace; kvm hangs on PVM hosts."""
    runsc = _runsc()
    if runsc is None:
        return "ptrace"
    from ..paths import data_dir

    st = os.stat(runsc)
    cache = data_dir() / "cache" / f"runsc-platform-{st.st_size}-{st.st_mtime_ns}"
    try:
        return cache.read_text().strip() or "ptrace"
    except OSError:
        pass
    try:
        out = subprocess.run([runsc, "flags"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "ptrace"
    found = "systrap" if b"systrap" in out.stdout + out.stderr else "ptrace"
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(found)
    return found


def runsc_version() -> str:
    """`runsc 2022-12-19` from Debian's `runsc version 0.0~20221219.0`, else its first line."""
    import re

    runsc = _runsc()
    if runsc is None:
        return "runsc"
    try:
        out = subprocess.run([runsc, "--version"], capture_output=True, timeout=10,
                             check=False).stdout.decode(errors="replace")
    except (OSError, subprocess.TimeoutExpired):
        return "runsc"
    date = re.search(r"(20\d\d)(\d\d)(\d\d)", out)
    if date:
        return f"runsc {date[1]}-{date[2]}-{date[3]}"
    first = out.splitlines()[:1]
    return first[0].strip() if first else "runsc"


class GVisorBackend(Backend):
    name = "gvisor"
    strength = 20
    # Its writable layers live in the sentry's memory: stop or snapshot would lose them.
    snapshot_refusal = "it lives in the sandbox's memory"

    @classmethod
    def cleanup_dead(cls, name: str, scratch: Path) -> None:
        """runsc keeps the container's state under <scratch>/state: delete it there."""
        runsc = _runsc()
        if runsc:
            _force_delete(runsc, scratch, name)

    @classmethod
    def owns_scratch(cls, scratch: Path) -> bool:
        return (scratch / "state").exists()

    @property
    def isolation(self) -> str:  # type: ignore[override]
        return f"gVisor user-space kernel ({platform()} platform)"

    def probe(self, deep: bool = False) -> Probe:
        runsc = _runsc()
        if runsc is None:
            return Probe(False, "runsc is not installed: apt install runsc")
        if not deep:
            return Probe(True, runsc)
        try:
            out = subprocess.run([runsc, "--version"], capture_output=True, timeout=10,
                                 check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return Probe(False, f"runsc cannot run: {exc}")
        version = out.stdout.decode(errors="replace").splitlines()[:1]
        return Probe(True, f"{runsc} ({version[0] if version else 'unknown version'}), "
                           f"{platform()} platform; the kvm platform is not used "
                           "(it hangs on nested/PVM hosts)")

    def version_files(self) -> tuple[str, ...]:
        return (_runsc() or "runsc", agent_file())

    def probe_failure_hint(self, error: str) -> str | None:
        if "Invalid argument" in error:
            return (f"{runsc_version()} rejects statx/newfstatat with AT_NO_AUTOMOUNT, which "
                    "coreutils use; a newer runsc does not")
        return None

    def start(self, spec: SandboxSpec) -> Sandbox:
        from ..cgroups import Cgroup, Limits
        from ..idmap import stage_fn
        from ..network import egress_netns, empty_netns_prefix, enter_netns, write_resolv_conf
        from ..paths import native_binary
        from ..seccomp import compile_bpf

        runsc = _runsc()
        if runsc is None:
            raise BackendUnavailable("the gvisor backend needs runsc: apt install runsc")
        agent = native_binary("ak-agent")
        scratch = make_scratch(spec.name)
        sandbox: Sandbox | None = None
        spawned: Spawned | None = None
        cgroup: Cgroup | None = None
        helpers: list[subprocess.Popen[bytes]] = []
        opened: list[int] = []  # fds to close once runsc has them (or on failure)
        pins: list[int] = []  # closed once the sandbox answers (runsc opens them late)
        try:
            p = spec.profile
            bundle = scratch / "bundle"
            # Started by root: the sandbox's own range first, so that its egress gate can
            # run as the range's `nobody` rather than the host's (shared by every gate).
            own = _own_range(opened) if os.geteuid() == 0 else None
            # Every runsc runs in a network namespace of its own, whatever the profile: its
            # control socket (`@runsc-sandbox.<id>`, abstract) admits uid 0 and the sentry's
            # uid, so in the host's namespace any local user of that uid could drive it.
            # "host" network (permissive) is a slirp4netns-served namespace that reaches
            # what the host reaches, host loopback at 10.0.2.2 included.
            resolv = write_resolv_conf(scratch) if p.network != "none" else None
            if p.network == "egress" and spec.egress is not None and spec.egress.secrets:
                from ..egress_gate import write_tls

                write_tls(scratch, spec.egress)  # the sandbox's CA: its key is gone after
            control = control_dir(scratch) if spec.persistent else None
            if control is not None and os.geteuid() == 0:
                # runsc's gofer writes this host dir as host root, and runsc refuses to make
                # it read-only: owned by nobody (0700), only the agent's set-up
                # (CAP_DAC_OVERRIDE) can bind its socket there, never a command (gVisor's
                # root without capabilities, or the agent's user), which could otherwise
                # fill the host's disk through it.
                os.chown(control, 65534, 65534)
            life_w = -1
            holder: int | None = None
            if p.network == "none":
                prefix = empty_netns_prefix(required=True)
            elif p.network == "egress":
                # The egress gate's router is the only way out; `runsc run` holds the
                # lifeline's write end while the sandbox lives.
                holder, life_w = _gated_netns(scratch, helpers, spec,
                                              own[2] if own is not None else None)
                prefix = enter_netns(holder)
            else:
                holder, life_w = egress_netns(scratch / "slirp.log", helpers,
                                              reach_host=True)
                prefix = enter_netns(holder)
            copy = _workspace_copy(spec, scratch)
            # Read-only binds by their descriptors (base.pin_sources), id-mapped from them
            # here as root. An ordinary user's runsc opens its mount sources by path in a
            # /proc of its own: checked now, bound by name. Open (docs/security.md): another
            # running sandbox of that user's project could swap a link into the path in
            # that moment, and runsc would bind where it leads.
            fds = pin_sources(spec.ro_binds, pins)
            pinned = spec if own is None else \
                spec._replace(ro_binds=by_descriptor(spec.ro_binds, fds))
            config = build_oci_config(pinned, str(agent), resolv=str(resolv) if resolv else None,
                                      bpf=str(compile_bpf(p.seccomp,
                                                          no_setid=p.workspace == "rw")),
                                      control=str(control) if control else None,
                                      workspace_copy=str(copy) if copy else None,
                                      user_ns=own is None)
            remap = _remap(config, scratch, opened, holder, own, spec.user,
                           _project_source(spec, copy), spec.rootfs.host_owned()) \
                if own is not None else None
            _write_bundle(bundle, config)
            # The cgroup holds the sentry and gofer too: under the ptrace platform a sandboxed
            # task costs several host tasks (stub process, tracer and goroutine threads), plus
            # ~110 of gVisor's own threads at idle. The exact limit is enforced inside gVisor
            # (`--pids-max`); this one only keeps the host safe.
            cgroup = Cgroup.create(spec.name, Limits(
                memory_bytes=p.memory_mb * 1024 * 1024 if p.memory_mb else None,
                pids=host_pids(sandbox_pids(p.pids)), cpus=p.cpus))
            join = cgroup.join_fn() if cgroup else None
            preexec: Callable[[], None] | None = join
            log = scratch / "backend.log"
            # A pipe with a bounded reader, not the file: this runsc lets a command open
            # the agent's stderr by /proc/1/fd/2 (a host descriptor it donated), and the
            # host file grew on the host's disk without bound.
            # (Its reader, root-started, is the range's own nobody, as the egress gate.)
            log_w, log_reader = bounded_log(log, reader=(own[2].uid + NOBODY,
                                                         own[2].gid + NOBODY)
                                            if own is not None else None)
            helpers.append(log_reader)
            opened.append(log_w)
            try:
                if remap is not None:
                    # Started by root: runsc runs as root of the sandbox's own user namespace
                    # (an unprivileged host range), the host paths it needs id-mapped into a
                    # mount namespace of its own; its network namespace entered beforehand.
                    argv = build_runsc_argv(runsc, spec, Path(remap.translate(str(scratch))),
                                            Path(remap.translate(str(bundle))))
                    if p.network == "none":
                        argv = [*prefix, *argv]  # unshare --net, inside the user namespace
                    preexec = stage_fn(remap.staged, remap.userns, join, remap.netns)
                else:
                    argv = prefix + build_runsc_argv(runsc, spec, scratch, bundle)
                held = (remap.lock,) if remap is not None and remap.lock >= 0 else ()
                spawned = spawn_agent(argv, log=Path(f"/proc/self/fd/{log_w}"), pass_fds=tuple(
                                          fd for fd in (life_w, *held) if fd >= 0),
                                      preexec_fn=preexec)
            finally:
                close_fds(life_w, *opened)
                opened.clear()
            client = open_channel(spawned, control)
            sandbox = Sandbox(spec=spec, backend=self.name, isolation=self.isolation,
                              client=client, process=spawned.process, scratch=scratch,
                              cgroup=cgroup, helpers=helpers)
            sandbox.cleanups.append(lambda: _force_delete(runsc, scratch, spec.name))
            if cgroup is None and (p.memory_mb or p.pids or p.cpus):
                sandbox.notes.append("cgroups are not writable here: limits are rlimits only")
            try:
                client.hello(timeout=30)
            except SandboxError:
                raise startup_failure("runsc", log, spawned.process) from None
            close_fds(*pins)
            return sandbox
        except BaseException:
            close_fds(*opened, *pins)
            if sandbox is not None:
                sandbox.destroy()
            else:
                abandon(scratch, spawned.process if spawned else None, cgroup, helpers)
            raise


NOBODY = 65534  # the sandbox's own nobody, in its range: what its egress gate runs as


def _gated_netns(scratch: Path, helpers: list[subprocess.Popen[bytes]],
                 spec: SandboxSpec, rng: HostRange | None) -> tuple[int, int]:
    """runsc's network namespace, whose one device leads to a router namespace where the
    egress gate decides (egress_gate): (its holder's pid, the lifeline's write end)."""
    from ..egress_gate import GateStart, router_holder
    from ..egress_policy import Policy
    from ..network import lifeline, netns_holder

    life_r, life_w = lifeline()
    try:
        gate = GateStart(scratch, exit_fd=life_r)
        if gate.gate is not None:  # None: on demand, from the fork server
            helpers.append(gate.gate)
        holder = netns_holder(life_r)
        helpers.append(holder)
        router = router_holder(holder.pid, life_r)
        helpers.append(router)
        gate.attach(holder.pid, spec.egress or Policy(), router=router.pid,
                    ids=(rng.uid + NOBODY, rng.gid + NOBODY) if rng is not None else None,
                    instance=spec.instance)
        gate.wait()
    except BaseException:
        os.close(life_w)
        raise
    finally:
        os.close(life_r)
    return holder.pid, life_w


class _Remap(NamedTuple):
    """How a root-started runsc is confined: its user namespace, its view of our paths."""

    userns: int
    staged: Staged
    netns: int  # the egress namespace to join, or -1
    lock: int  # the lock of its id range, for `runsc run` to hold while it lives; or -1

    def translate(self, path: str) -> str:
        return self.staged.translate(path)


def _own_range(opened: list[int]) -> tuple[int, int, HostRange]:
    """The sandbox's user namespace, its range's lock and the range (idmap); the fds are
    appended to `opened`."""
    from ..idmap import sandbox_range_userns

    return sandbox_range_userns(opened)


def _remap(
    config: dict[str, Any], scratch: Path, opened: list[int], holder: int | None,
    own: tuple[int, int, HostRange], user: tuple[int, int, str] | None = None,
    project: str | None = None, unmapped: Collection[str] = (),
) -> _Remap:
    """Give runsc, about to run inside the sandbox's user namespace, the host paths it
    needs as id-mapped mounts (the scratch dir and every bind source; those in `unmapped`,
    the host's userland, not id-mapped: rootfs.HostRootfs.host_owned), and point the
    config's binds at where it will find them. Their fds are appended to `opened`."""
    from ..idmap import owner_userns, stage

    userns, lock, rng = own
    binds = [m for m in config["mounts"] if m["type"] == "bind"]
    sources = [(str(scratch), False)] + [(m["source"], "ro" in m["options"]) for m in binds]
    # The project, for a sandbox whose commands run as a user: the caller's files show as
    # that user's and what it writes lands as the caller's (as on namespaces); the range's
    # root is mapped too, as the gofer creates a file as itself before giving it away.
    owners: dict[str, int] = {}
    if user is not None and project is not None:
        owners[project] = owner_userns(rng, user[0], user[1], runtime_root=True)
        opened.append(owners[project])
    staged = stage(sources, userns, opened, owners, unmapped)
    for m in binds:
        m["source"] = staged.translate(m["source"])
    netns = -1
    if holder is not None:
        netns = os.open(f"/proc/{holder}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        opened.append(netns)
    return _Remap(userns, staged, netns, lock)


def _project_source(spec: SandboxSpec, copy: Path | None) -> str | None:
    """The host dir bound as the project (None: none is)."""
    if spec.workspace is None or spec.profile.workspace == "none":
        return None
    return str(copy) if copy is not None else str(spec.workspace)


def _write_bundle(bundle: Path, config: dict[str, Any]) -> None:
    rootfs = bundle / "rootfs"
    rootfs.mkdir(parents=True)
    # Mount points must exist in the (read-only) root the gofer serves.
    for mount in config["mounts"]:
        target = rootfs / mount["destination"].lstrip("/")
        if mount.get("_file"):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
        else:
            target.mkdir(parents=True, exist_ok=True)
        mount.pop("_file", None)
    for link, dest in config.pop("_symlinks"):
        os.symlink(dest, rootfs / link.lstrip("/"))
    for src, dest, mode in config.pop("_copies"):
        target = rootfs / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(Path(src).read_bytes())  # a copy: nothing inside reaches ours
        target.chmod(mode)
    import json

    (bundle / "config.json").write_text(json.dumps(config))


def build_oci_config(
    spec: SandboxSpec, agent: str, *, resolv: str | None, bpf: str,
    control: str | None = None, workspace_copy: str | None = None, user_ns: bool = False,
) -> dict[str, Any]:
    """The OCI runtime spec for `spec`: the agent is the container's only process.
    `user_ns`: the sandbox's user (`spec.user`) is reached through a user namespace the
    agent makes below gVisor's (rootless runsc: see _user_args)."""
    p = spec.profile
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", *(["mode=1777"] if spec.user else [])]},
        {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]},
        {"destination": "/root", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=700"] + ([] if p.root_writable else ["ro"])},
    ]
    if spec.user is not None:  # its HOME's parent (the root may be read-only)
        mounts.append({"destination": "/home", "type": "tmpfs", "source": "tmpfs",
                       "options": ["nosuid", "nodev", "mode=755"]})
    symlinks: list[tuple[str, str]] = []
    for entry in spec.rootfs.entries:
        if entry.kind == "symlink":
            symlinks.append((entry.path, entry.target))
        else:
            # Under the sandbox-wide memory overlay (moderate) writes never reach the host, so
            # the userland is writable like the namespaces backend's overlays; else ro.
            mounts.append({"destination": entry.path, "type": "bind", "source": entry.src,
                           "options": ["rbind",
                                       "rw" if _overlay_mode(spec) == "all:memory" else "ro"],
                           **({} if entry.is_dir else {"_file": True})})
    if resolv:
        mounts.append({"destination": "/etc/resolv.conf", "type": "bind", "source": resolv,
                       "options": ["rbind", "ro"], "_file": True})
        if spec.egress is not None and spec.egress.secrets:
            # The system bundle plus the sandbox's egress CA (egress_gate.write_tls).
            from ..egress_gate import TRUST_NAME

            mounts.append({"destination": "/etc/ssl/certs/ca-certificates.crt",
                           "type": "bind", "options": ["rbind", "ro"], "_file": True,
                           "source": str(Path(resolv).with_name(TRUST_NAME))})
    if spec.workspace is not None and p.workspace != "none":
        # cow: under the sandbox-wide memory overlay (--overlay2=all:memory) the bind is rw
        # inside while the host copy stays untouched; a persistent sandbox gets a copy.
        mode = "ro" if p.workspace == "ro" else "rw"
        mounts.append({"destination": spec.workspace_at, "type": "bind",
                       "source": workspace_copy or str(spec.workspace),
                       "options": ["rbind", mode]})
    if p.mount_home and spec.home is not None:
        mounts.append({"destination": "/home/user", "type": "bind", "source": str(spec.home),
                       "options": ["rbind", "ro"]})
    for source, target in spec.ro_binds:  # e.g. `run --agent`'s install, under /run
        mounts.append({"destination": target, "type": "bind", "source": source,
                       "options": ["rbind", "ro"],
                       **({} if os.path.isdir(source) else {"_file": True})})
    # The agent masks secrets and sets up a pids cgroup inside gVisor, holding SETUP_CAPS
    # only for that, then drops every capability before serving. Masks are the agent's
    # mounts, not OCI ones: runsc pays ~5 ms per OCI file bind, the sentry microseconds.
    args = [AGENT_PATH]
    # A daemon's one-shot sandbox brings them found (its kept walk); else walked now.
    found = spec.found_masks
    for mask in found if found is not None else spec.rootfs.private_masks():
        args += ["--mask", mask.path]
    for path in spec.masks:  # the host's control plane (controlplane.py)
        args += ["--mask", path]
    pids = sandbox_pids(p.pids)
    if pids:
        args += ["--pids-max", str(pids)]
    # The same seccomp program as on the namespaces backend, installed by the agent itself
    # (gVisor implements seccomp for its tasks) after its set-up mounts are done.
    args += ["--drop-caps", "--seccomp", SECCOMP_PATH]
    # A user for commands (an agent's): the agent switches to it after its set-up, which
    # needs these too (dropped with the rest before it serves anything).
    caps: tuple[str, ...] = SETUP_CAPS
    if spec.user is not None:
        args += _user_args(spec.user, user_ns)
        caps = (*SETUP_CAPS, "CAP_SETUID", "CAP_SETGID", "CAP_CHOWN")
    if control is not None:
        mounts.append({"destination": CONTROL_PATH, "type": "bind", "source": control,
                       "options": ["rbind", "rw"]})
        args += ["--listen", f"{CONTROL_PATH}/agent.sock"]
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if p.network == "none":
        namespaces.append({"type": "network"})
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": {k: (list(caps) if k != "ambient" else [])
                             for k in ("bounding", "effective", "inheritable", "permitted",
                                       "ambient")},
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": not p.root_writable},
        "hostname": spec.hostname,
        "mounts": mounts,
        "linux": {"namespaces": namespaces},
        "_symlinks": symlinks,
        # Copied into the bundle's root, not bound: each OCI file bind costs runsc ~5-10 ms.
        "_copies": [(agent, AGENT_PATH, 0o555), (bpf, SECCOMP_PATH, 0o444)],
    }


def _user_args(user: tuple[int, int, str], user_ns: bool) -> list[str]:
    """The agent's switch to `user` after its set-up. Root-started, runsc's host files
    are an id-mapped view in which the caller's project files are the user's
    (`_remap`): a plain setuid. Rootless runsc maps one host id, the caller's, as
    gVisor's root, so every host file inside is root's; there the agent makes a user
    namespace of its own below gVisor's showing that root as the user (`--user-ns`):
    the project is the user's and what it writes lands as the caller's (and the user
    owns what gVisor's root does: the sandbox's own memory-backed layers, as an
    ordinary user's namespaces sandbox)."""
    return ["--user", "{}:{}:{}".format(*user), *(["--user-ns"] if user_ns else [])]


def build_runsc_argv(runsc: str, spec: SandboxSpec, scratch: Path, bundle: Path) -> list[str]:
    p = spec.profile
    # Egress and "host" use runsc's host mode *inside a private netns served by
    # slirp4netns* (see start): this runsc's own netstack (`sandbox`) refuses to start on
    # kernels where every netns has /proc/sys/net/core/rmem_default (it mistakes them for
    # the root netns).
    network = {"host": "host", "egress": "host", "none": "none"}[p.network]
    overlay = _overlay_mode(spec)
    argv = [runsc, f"--root={scratch / 'state'}", f"--platform={platform()}",
            f"--network={network}", f"--overlay2={overlay}", "--ignore-cgroups",
]
    if os.geteuid() != 0:
        argv.append("--rootless")
    if spec.persistent:
        argv.append("--host-uds=create")  # the agent's control socket lives on the host
    return [*argv, "run", f"--bundle={bundle}", _container_id(spec.name)]


def _workspace_copy(spec: SandboxSpec, scratch: Path) -> Path | None:
    """A persistent copy-on-write project dir: copied once, kept with the sandbox."""
    if not (spec.persistent and spec.workspace is not None and spec.profile.workspace == "cow"):
        return None
    base = spec.state_dir or scratch
    copy = base / "workspace"
    if not copy.exists():
        import shutil

        tmp = base / "workspace.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(spec.workspace, tmp, symlinks=True, ignore=_masked_in(spec))
        tmp.rename(copy)
    return copy


def _masked_in(spec: SandboxSpec) -> Callable[[str, list[str]], set[str]]:
    """copytree's `ignore`: leave the host's control dirs (the spec's masks) out of a copy,
    and every entry that is not a dir, a regular file or a symlink (`plain_entries_only`)."""
    from ..paths import plain_entries_only

    root = str(spec.workspace)
    inside = spec.workspace_at + "/"
    skip = {m.removeprefix(inside) for m in spec.masks if m.startswith(inside)}
    return lambda d, names: plain_entries_only(d, names) | {
        n for n in names if os.path.normpath(os.path.join(os.path.relpath(d, root), n)) in skip}


def _overlay_mode(spec: SandboxSpec) -> str:
    """gVisor's memory overlay: everything (moderate), the root only (permissive), or none.

    A persistent sandbox never gets `all`: it would also cover the bind holding the agent's
    control socket, which must be created on the host; its project dir is a private copy.
    """
    p = spec.profile
    if not spec.persistent and (p.workspace == "cow" or (p.root_writable and p.workspace != "rw")):
        return "all:memory"
    return "root:memory" if p.root_writable else "none"


def _container_id(name: str) -> str:
    return f"ak-{name}"


def _force_delete(runsc: str, scratch: Path, name: str) -> None:
    state = scratch / "state"
    if state.exists() and any(state.iterdir()):
        subprocess.run([runsc, f"--root={state}", "delete", "--force", _container_id(name)],
                       capture_output=True, timeout=30, check=False)
