"""The `namespaces` backend: bubblewrap user/pid/mount/ipc/uts/net/cgroup namespaces."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from functools import lru_cache
from pathlib import Path

from ..errors import BackendUnavailable, SandboxError
from ..paths import which
from ..sandbox import Sandbox, SandboxSpec, close_fds
from .base import (
    Backend,
    Probe,
    Spawned,
    abandon,
    control_dir,
    make_scratch,
    open_channel,
    spawn_agent,
    startup_failure,
)

AGENT_DIR = "/run/ak"  # where the agent and its seccomp program appear inside
OVERLAY_DIR = "/run/ak/ov"  # tmpfs-backed upper/work dirs of the copy-on-write layers
WS_LOWER = "/run/ak/lower/workspace"


@lru_cache(maxsize=1)
def _bwrap() -> str | None:
    return which("bwrap")


class NamespacesBackend(Backend):
    name = "namespaces"
    isolation = "Linux namespaces + seccomp (shares the host kernel)"
    strength = 10

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
            return Probe(True, bwrap)
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
        return Probe(True, f"{bwrap} works (user, pid, mount, ipc, uts, net, cgroup namespaces)")

    def start(self, spec: SandboxSpec) -> Sandbox:
        # Under heavy namespace churn (dozens of sandboxes starting at once) the kernel
        # sometimes fails bwrap's netlink call that brings up the new netns's loopback
        # (seen as ECHILD); nothing has run yet, so starting again is safe.
        for attempt in range(4):
            try:
                return self._start(spec)
            except SandboxError as exc:
                if "loopback:" not in exc.message or attempt == 3:
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    def _start(self, spec: SandboxSpec) -> Sandbox:
        from ..cgroups import Cgroup, Limits
        from ..network import lifeline, start_slirp, write_resolv_conf
        from ..paths import native_binary
        from ..seccomp import compile_bpf

        bwrap = _bwrap()
        if bwrap is None:
            raise BackendUnavailable(
                "the namespaces backend needs bubblewrap: apt install bubblewrap")
        agent = native_binary("ak-agent")
        bpf = compile_bpf(spec.profile.seccomp)
        keep = persistent_dirs(spec)
        if keep is not None:
            for sub in PERSISTENT_SUBDIRS:
                (keep / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
            (keep / "dirs" / "tmp").chmod(0o1777)  # a /tmp (the parents stay private)
        scratch = make_scratch(spec.name)
        sandbox: Sandbox | None = None
        spawned: Spawned | None = None
        cgroup: Cgroup | None = None
        helpers: list[subprocess.Popen[bytes]] = []
        try:
            p = spec.profile
            cgroup = Cgroup.create(spec.name, Limits(
                memory_bytes=p.memory_mb * 1024 * 1024 if p.memory_mb else None,
                pids=p.pids, cpus=p.cpus))
            resolv = write_resolv_conf(scratch) if p.network == "egress" else None
            info_r, info_w = os.pipe() if p.network == "egress" else (-1, -1)
            # bwrap holds the lifeline's write end (--sync-fd) for as long as the sandbox
            # runs, so slirp4netns exits with it whatever happens to us.
            life_r, life_w = lifeline() if p.network == "egress" else (-1, -1)
            control = control_dir(scratch) if spec.persistent else None
            argv = build_bwrap_argv(bwrap, spec, str(agent), str(bpf),
                                    resolv=str(resolv) if resolv else None, info_fd=info_w,
                                    control=str(control) if control else None,
                                    sync_fd=life_w)
            log = scratch / "backend.log"
            try:
                spawned = spawn_agent(
                    argv, log=log, pass_fds=(info_w, life_w) if info_w >= 0 else (),
                    preexec_fn=cgroup.join_fn() if cgroup else None,
                )
            finally:
                close_fds(info_w, life_w)
            client = open_channel(spawned, control)
            sandbox = Sandbox(spec=spec, backend=self.name, isolation=self.isolation,
                              client=client, process=spawned.process, scratch=scratch,
                              cgroup=cgroup)
            if cgroup is None and (p.memory_mb or p.pids or p.cpus):
                sandbox.notes.append("cgroups are not writable here: limits are rlimits only")
            if info_r >= 0:
                try:
                    child_pid = _read_child_pid(info_r)
                finally:
                    close_fds(info_r)
                if child_pid is None:
                    raise startup_failure("bwrap", log, spawned.process)
                try:
                    sandbox.helpers.append(
                        start_slirp(child_pid, scratch / "slirp.log", exit_fd=life_r))
                finally:
                    close_fds(life_r)
            try:
                client.hello(timeout=15)
            except SandboxError:
                raise startup_failure("bwrap", log, spawned.process) from None
            return sandbox
        except BaseException:
            if sandbox is not None:
                sandbox.destroy()
            else:
                abandon(scratch, spawned.process if spawned else None, cgroup, helpers)
            raise


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


def build_bwrap_argv(
    bwrap: str, spec: SandboxSpec, agent: str, bpf: str, *, resolv: str | None, info_fd: int,
    control: str | None = None, sync_fd: int = -1,
) -> list[str]:
    """The full bwrap command line for `spec`. Pure: no I/O, easy to inspect in tests."""
    p = spec.profile
    cow_root = p.root_writable
    argv = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--new-session", "--as-pid-1",
            "--uid", "0", "--gid", "0", "--hostname", spec.hostname]
    if p.network != "host":
        argv.append("--unshare-net")
    if not spec.persistent:
        argv.append("--die-with-parent")
    if info_fd >= 0:
        argv += ["--info-fd", str(info_fd)]
    if sync_fd >= 0:
        argv += ["--sync-fd", str(sync_fd)]
    tops = {e.path for e in spec.rootfs.entries}
    for entry in spec.rootfs.entries:
        if entry.kind == "symlink":
            argv += ["--symlink", entry.target, entry.path]
        else:
            argv += ["--ro-bind", entry.src, entry.path]
    keep = persistent_dirs(spec)
    # tmpfs pages count in the memory cgroup of whoever wrote them; the size bounds them
    # also where no memory controller is usable. /run holds the overlays' upper dirs.
    size = ["--size", str(p.memory_mb * 1024 * 1024)] if p.memory_mb else []
    # A persistent sandbox keeps /tmp on disk too: it survives stop/start and snapshots.
    tmp = ["--bind", str(keep / "dirs" / "tmp"), "/tmp"] if keep else [*size, "--tmpfs", "/tmp"]
    argv += ["--proc", "/proc", "--dev", "/dev", *tmp, *size, "--tmpfs", "/run"]
    for path in ("/root", "/home", "/var/tmp"):
        if "/" + path.split("/")[1] not in tops:  # the image brings its own
            if keep is not None and cow_root:
                argv += ["--bind", str(keep / "dirs" / path.strip("/").replace("/", "_")), path]
            else:
                argv += ["--dir", path]
    if keep is not None:
        # The overlays' upper/work dirs live on the host's disk, not on /run's tmpfs.
        argv += ["--bind", str(keep / "layers"), OVERLAY_DIR]
    argv += ["--ro-bind", agent, f"{AGENT_DIR}/agent", "--ro-bind", bpf, f"{AGENT_DIR}/seccomp.bpf"]
    if spec.workspace is not None and p.workspace != "none":
        ws = str(spec.workspace)
        if p.workspace == "rw":
            argv += ["--bind", ws, "/workspace"]
        elif p.workspace == "ro":
            argv += ["--ro-bind", ws, "/workspace"]
        else:
            argv += ["--ro-bind", ws, WS_LOWER, "--dir", "/workspace"]
    if p.mount_home and spec.home is not None:
        argv += ["--ro-bind", str(spec.home), "/home/user"]
    agent_argv = [f"{AGENT_DIR}/agent"]
    # Overlays and masks need CAP_SYS_ADMIN in the sandbox's user namespace; the agent
    # does them, then drops every capability before it serves anything.
    if cow_root:
        for entry in spec.rootfs.entries:
            if entry.is_dir:
                agent_argv += ["--overlay", _overlay(entry.path, entry.path)]
    if spec.workspace is not None and p.workspace == "cow":
        agent_argv += ["--overlay", _overlay("/workspace", WS_LOWER)]
    if resolv:
        # After the overlays, or the one over /etc would hide it.
        argv += ["--ro-bind", resolv, f"{AGENT_DIR}/resolv.conf"]
        agent_argv += ["--bind", f"{AGENT_DIR}/resolv.conf:/etc/resolv.conf"]
    for mask in spec.rootfs.masks:
        agent_argv += ["--mask", mask.path]
    for private in spec.rootfs.private_dirs:
        agent_argv += ["--mask-private", private]
    # Run unprivileged, bwrap leaves only what is asked for: CAP_DAC_OVERRIDE lets
    # overlayfs set up over host dirs whose owner is unmapped here, CAP_SETPCAP lets the
    # agent empty the bounding set. All are the sandbox user namespace's, and all go
    # before the agent serves anything.
    for cap in ("CAP_SYS_ADMIN", "CAP_DAC_OVERRIDE", "CAP_SETPCAP"):
        argv += ["--cap-add", cap]
    if not cow_root:
        argv += ["--remount-ro", "/"]
    agent_argv += ["--drop-caps", "--seccomp", f"{AGENT_DIR}/seccomp.bpf"]
    if control is not None:
        argv += ["--bind", control, f"{AGENT_DIR}/ctl"]
        agent_argv += ["--listen", f"{AGENT_DIR}/ctl/agent.sock", "--lock-listen-dir"]
    argv += ["--chdir", "/", "--", *agent_argv]
    return argv


PERSISTENT_SUBDIRS = ("layers", "dirs/root", "dirs/home", "dirs/var_tmp", "dirs/tmp")


def persistent_dirs(spec: SandboxSpec) -> Path | None:
    """The host dir keeping a persistent sandbox's writable layers, if it has one."""
    if not spec.persistent or spec.state_dir is None:
        return None
    return spec.state_dir


def _overlay(target: str, lower: str) -> str:
    slug = target.strip("/").replace("/", "_") or "root"
    return f"{target}:{lower}:{OVERLAY_DIR}/{slug}/upper:{OVERLAY_DIR}/{slug}/work"
