"""What the `docker` and `podman` backends share: a container whose init is our agent, made
through the engine's API from a SandboxSpec, and everything we create labelled for clean-up.

The agent is bind-mounted read-only and runs as the container's pid 1, so exec, streaming,
stdin, PTYs, files, exit codes, timeouts and signals are the agent protocol's, as on every
other backend. The channel is a unix socket in a per-sandbox host dir (0700) bind-mounted in,
not the engine's attach stream: the bytes then never pass through the engine (faster, and a
restart of the engine or of us leaves the protocol intact), and the agent already speaks it.

- A one-off sandbox: we listen, the dir is mounted read-only, the agent connects (`--connect`).
  The first and only connection is the agent's (nothing else runs before it); when we go away
  the agent sees EOF and exits, and the engine removes the container (AutoRemove): a killed
  CLI leaks nothing.
- A persistent sandbox: the agent listens (`--listen`) so that a restarted daemon can reach
  it again. The dir must then be writable inside, so code in the sandbox could put a socket
  of its own there; every connection checks the listener's pid (SO_PEERCRED) against the
  container's init pid, which only the agent is.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from ..errors import BackendUnavailable, NotFound, SandboxError
from ..sandbox import Sandbox, SandboxSpec
from .base import Backend, Probe, agent_file, make_scratch
from .engine_http import EngineAPI, EngineError

if TYPE_CHECKING:
    from ..agent.client import AgentClient
    from ..idmap import HostRange
    from ..images import ImageConfig
    from ..rootfs import HostRootfs

AGENT_DIR = "/.ak"  # in the container: the agent, its seccomp program, the control dir
CTL_DIR = f"{AGENT_DIR}/ctl"
HOST_SOCK = "host.sock"  # one-off sandboxes: we listen, the agent connects
AGENT_SOCK = "agent.sock"  # persistent sandboxes: the agent listens
LABEL_SANDBOX = "agentkernel.sandbox"
LABEL_OWNER = "agentkernel.owner"
LABEL_KIND = "agentkernel.kind"  # "run" (one-off: removed when it ends) or "persistent"
# Which agentkernel data dir (AGENTKERNEL_HOME; a digest of its path) made it: one user may
# run several daemons (tests, CI jobs, a bench), and a daemon's sweep is of its own only.
LABEL_HOME = "agentkernel.home"
LABEL_IDS = "agentkernel.ids"  # "UID:GID": the host ids the container's 0 maps to (ours)
ENGINE_IMAGE = "engine:"  # HostRootfs.name prefix of an image the engine already has
# HostRootfs.name prefix of a snapshot of a sandbox on the host's userland: the committed
# image takes the place of our empty base image, the userland is bound on it again.
ENGINE_BASE = "engine-base:"
SNAPSHOT_REPO = "localhost/agentkernel-snapshot"
SNAPSHOT_PATH = "engine-image:"  # a snapshot's recorded path: the image is the engine's
BASE_REPO = "localhost/agentkernel-base"  # our empty base image: the host's userland is bound on it
IMPORT_REPO = "localhost/agentkernel-image"  # images of our own store, imported into the engine
START_TIMEOUT = 30.0
# Where the engines' and their runtimes' control sockets live: never shown in a sandbox,
# even through a project or home dir that contains them.
ENGINE_SOCKETS = ("/var/run/docker.sock", "/run/docker.sock", "/run/podman/podman.sock",
                  "/run/containerd/containerd.sock")


# What of /proc and /sys a sandbox never sees (masked: /dev/null over a file, an empty
# read-only tmpfs over a dir) and never writes (read-only): the agent's --cover-proc list
# of the other backends (agent.c), given to the engine, since the agent has no capability
# to mount here. Docker takes both lists whole (they replace its defaults); Podman adds
# masks to its own and has no read-only list, so the read-only ones its defaults lack are
# masked there. /proc/pressure: a write opens a PSI trigger on the host's pressure.
MASKED_PATHS = (
    "/proc/kcore", "/proc/keys", "/proc/key-users", "/proc/timer_list", "/proc/timer_stats",
    "/proc/sched_debug", "/proc/latency_stats", "/proc/kallsyms", "/proc/kmsg", "/proc/acpi",
    "/proc/scsi", "/proc/asound", "/proc/config.gz", "/proc/kpagecount", "/proc/kpageflags",
    "/proc/kpagecgroup", "/proc/pagetypeinfo", "/proc/slabinfo", "/proc/vmallocinfo",
    "/sys/firmware", "/sys/kernel/debug", "/sys/kernel/security", "/sys/fs/selinux",
    "/sys/dev/block", "/sys/devices/virtual/powercap")
READONLY_PATHS = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs",
                  "/proc/fb", "/proc/driver", "/proc/tty/driver", "/proc/pressure")

# Storage drivers whose container root is an overlay mount, and what that mount is.
LAYER_DRIVERS = frozenset({"overlay2", "overlay", "fuse-overlayfs"})
LAYER_FSTYPES = frozenset({"overlay", "fuse.fuse-overlayfs"})
LAYER_ATTEMPTS = 3  # starts of a sandbox whose container came up without its image


class StartAgain(Exception):
    """This container cannot be used as it was made; a new one may be (`start` retries)."""


class LayerNotMounted(StartAgain):
    """The engine started the container on its layer's bare mount point (check_layer)."""


class MasksChanged(StartAgain):
    """A private entry of the host's userland vanished or came back between the walk that
    found it and the engine's mounts (`create_body`, `check_masks`)."""


# What the engine said an image name is, remembered this long (from when it was asked).
IMAGE_CACHE_SECONDS = 5.0
# In a daemon (`pooled`), an answer this old is asked again in the background while it is
# still served: runs that come at least every IMAGE_CACHE_SECONDS never wait for the engine.
IMAGE_REFRESH_AFTER = 2.0
IMAGE_CACHE_MAX = 256  # image names remembered (a daemon is asked for any name)
_IMAGE_CACHE: dict[tuple[str, str], tuple[float, Any]] = {}
# Names waiting for their refresh (one entry per name: at most IMAGE_CACHE_MAX), and the
# daemon's one thread that asks the engine, a moment after a run asked for one (it then
# runs between runs, not beside the one that found the answer old).
_IMAGE_REFRESHING: dict[tuple[str, str], Any] = {}
_IMAGE_LOCK = threading.Lock()
_IMAGE_WANTED = threading.Condition(_IMAGE_LOCK)
IMAGE_REFRESH_DELAY = 0.05  # seconds


SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def _remember_image(key: tuple[str, str], asked: float, found: Any) -> None:
    """Keep the engine's answer about an image name, stamped with when it was asked;
    within IMAGE_CACHE_MAX names (expired ones go first, then the oldest)."""
    with _IMAGE_LOCK:
        if key not in _IMAGE_CACHE and len(_IMAGE_CACHE) >= IMAGE_CACHE_MAX:
            now = time.monotonic()
            for old in [k for k, (t, _) in _IMAGE_CACHE.items()
                        if now - t >= IMAGE_CACHE_SECONDS]:
                del _IMAGE_CACHE[old]
            while len(_IMAGE_CACHE) >= IMAGE_CACHE_MAX:
                del _IMAGE_CACHE[min(_IMAGE_CACHE, key=lambda k: _IMAGE_CACHE[k][0])]
        hit = _IMAGE_CACHE.get(key)
        if hit is None or hit[0] <= asked:  # (a slower, older answer never replaces it)
            _IMAGE_CACHE[key] = (asked, found)


def _image_refresher() -> None:
    """A daemon's thread: the image names runs found old, asked again in turn."""
    while True:
        with _IMAGE_WANTED:
            while not _IMAGE_REFRESHING:
                _IMAGE_WANTED.wait()
        time.sleep(IMAGE_REFRESH_DELAY)  # (the run that asked goes first)
        with _IMAGE_LOCK:
            pending = list(_IMAGE_REFRESHING.items())
        for key, (backend, image) in pending:
            # (the engine went away: the answer expires, and a run says so itself)
            with contextlib.suppress(Exception):
                asked = time.monotonic()
                _remember_image(key, asked, backend._engine_image(image))
            with _IMAGE_LOCK:
                _IMAGE_REFRESHING.pop(key, None)


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of `data` in hex, from the interpreter's own implementation where it has
    one (`_sha2` from 3.12, `_sha256` before): hashlib loads OpenSSL, ~4-8 ms of a cold
    run that needs one digest for a label."""
    import importlib

    for name in ("_sha2", "_sha256"):
        try:
            return str(importlib.import_module(name).sha256(data).hexdigest())
        except ImportError:
            continue
    import hashlib

    return hashlib.sha256(data).hexdigest()


_HOME_LABEL: dict[str, str] = {}


def home_label(data_dir: str | None = None) -> str:
    """LABEL_HOME's value for `data_dir` (by default this process's data dir)."""
    from ..paths import data_dir_str

    path = os.path.realpath(data_dir if data_dir is not None else data_dir_str())
    label = _HOME_LABEL.get(path)
    if label is None:
        label = _HOME_LABEL[path] = sha256_hex(path.encode())[:16]
    return label


def container_name(name: str) -> str:
    """The engine's name for sandbox `name` of this user (one engine serves many users)."""
    return f"agentkernel-{os.getuid()}-{name}"


class ContainerProcess(subprocess.Popen[bytes]):
    """The container's init (our agent) seen as the sandbox's process: its host pid tells
    whether it lives; killing it asks the engine. Nothing is spawned by us."""

    def __init__(self, backend: ContainerBackend, cid: str, pid: int) -> None:
        # Popen.__init__ would start a process: set only what Popen's methods read.
        self.args = [backend.name, cid]
        self.pid = pid
        self.returncode: int | None = None
        self.stdin = self.stdout = self.stderr = None
        self._child_created = False
        self._backend = backend
        self._cid = cid
        self._start = _start_time(pid)
        self.killed = False

    def poll(self) -> int | None:
        if self.returncode is None and not _alive(self.pid, self._start):
            self.returncode = 0
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.poll() is None:
            self._await_exit(timeout)
        while self.poll() is None:  # (without a pidfd: a look every 2 ms)
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            time.sleep(0.002)
        assert self.returncode is not None
        return self.returncode

    def _await_exit(self, timeout: float | None) -> None:
        """Block until the init exits (its pidfd turns readable then), at most `timeout` s:
        a CLI's run ends as soon as its container's init has, not at the next look."""
        try:
            fd = os.pidfd_open(self.pid)
        except OSError:  # (gone already, or not ours to open)
            return
        try:
            if self.poll() is None:  # still the init it names: the pid was not reused
                import select

                select.select([fd], [], [], timeout)
        finally:
            os.close(fd)

    def send_signal(self, sig: int) -> None:
        self.killed = True
        with contextlib.suppress(EngineError, BackendUnavailable):
            self._backend.api().call("POST", f"/containers/{self._cid}/kill",
                                     query={"signal": str(sig)}, expect=(204, 404, 409))

    def kill(self) -> None:
        self.send_signal(9)

    def terminate(self) -> None:
        self.send_signal(15)


def _start_time(pid: int) -> int | None:
    from ..procs import start_time

    return start_time(pid)


def _alive(pid: int, start: int | None) -> bool:
    from ..procs import alive

    return alive(pid, start)


class Mounts:
    """The container's mounts, as the engine's `Mounts` and `Tmpfs` fields."""

    def __init__(self, tmpfs_extra: str = "") -> None:
        self.mounts: list[dict[str, Any]] = []
        self.tmpfs: dict[str, str] = {}
        self.notes: list[str] = []  # said to the user (Sandbox.notes)
        self.extra = tmpfs_extra

    def add_tmpfs(self, target: str, options: str) -> None:
        self.tmpfs[target] = options + self.extra

    def bind(self, src: str, target: str, read_only: bool = True) -> None:
        self.mounts.append({"Type": "bind", "Source": src, "Target": target,
                            "ReadOnly": read_only, "BindOptions": {"Propagation": "rprivate"}})

    def mask(self, target: str, is_dir: bool) -> None:
        """Hide a path: an empty read-only tmpfs over a dir, /dev/null over a file."""
        if is_dir:
            self.add_tmpfs(target, "ro,nosuid,nodev,noexec,size=4k,mode=555")
        else:
            self.bind("/dev/null", target)


class ContainerBackend(Backend):
    """A backend driving one container engine through its API socket."""

    strength = 5  # shares the host kernel, like namespaces, and its root may be host root
    stoppable = True  # the engine keeps the stopped container and its layer
    # The engine's memory cgroup holds the sandbox's sum: no per-process RLIMIT_DATA (it
    # would turn an allocation past the limit into a MemoryError instead of an OOM kill).
    memory_floor = False
    # (`snapshots` stays False: no layers of ours on the host to archive; the manager takes
    # a container's snapshot through the engine's `commit` instead: see `capabilities`.)
    snapshot_refusal = "its engine could not commit it"
    engine: ClassVar[str]  # "docker" / "podman": names, labels, messages
    # Engine-specific create fields merged into HostConfig (podman's ulimits, userns).
    host_config_extra: ClassVar[dict[str, Any]] = {}
    # Appended to every tmpfs's options: Podman copies what a tmpfs covers into it unless
    # told not to, which would turn a mask into a copy of the secret it hides.
    tmpfs_extra: ClassVar[str] = ""

    def capabilities(self) -> dict[str, bool]:
        return {**super().capabilities(), "snapshots": True}  # through `commit`

    # --- what each engine says for itself ------------------------------------------------
    def socket_path(self) -> str | None:
        """The engine's API socket, if one is there (without starting anything)."""
        raise NotImplementedError

    def ensure_socket(self) -> str:
        """The engine's API socket, started if this engine can start one for us."""
        path = self.socket_path()
        if path is None:
            raise BackendUnavailable(f"no {self.engine} engine socket found")
        return path

    def root_uid(self) -> int | None:
        """The host uid of the sandbox's root, when the engine maps it to another one
        (user namespaces); None: the container's root is the engine's own user."""
        return None

    def container_root(self, api: EngineAPI, cid: str) -> int | None:
        """root_uid for one created container (an engine may pick a range per container)."""
        return self.root_uid()

    def root_note(self) -> str:
        """doctor's words on who the sandbox's root is on the host."""
        root = self.root_uid()
        if root is None:
            return ("the sandbox's root is host root (no user namespace; no capabilities, "
                    "no_new_privs, seccomp)")
        return f"the sandbox's root is host uid {root} (user namespace)"

    # --- Backend -------------------------------------------------------------------------
    @property
    def isolation(self) -> str:  # type: ignore[override]
        return f"{self.engine} container (runc; shares the host kernel)"

    def api(self) -> EngineAPI:
        cached: EngineAPI | None = getattr(self, "_api", None)
        if cached is None:
            cached = EngineAPI(self.ensure_socket(), what=self.engine)
            self._api = cached
        return cached

    def probe(self, deep: bool = False) -> Probe:
        path = self.socket_path()
        if path is None and not deep:
            return Probe(False, self.missing_hint())
        if not deep:
            return Probe(True, path or "")
        try:
            info = self.api().call("GET", "/info", timeout=10)
        except (EngineError, BackendUnavailable) as exc:
            return Probe(False, f"{exc.message}; {self.missing_hint()}")
        return Probe(True, self.describe(info))

    def missing_hint(self) -> str:
        return f"the {self.engine} engine is not running"

    def describe(self, info: dict[str, Any]) -> str:
        """doctor's line: version, cgroups, and whether the sandbox's root is host root."""
        who = self.root_note()
        return (f"{self.engine} {info.get('ServerVersion', '?')} at {self.api().path}, cgroup "
                f"v{info.get('CgroupVersion', '?')} ({info.get('CgroupDriver', '?')} driver); "
                f"{who}")

    def version_files(self) -> tuple[str, ...]:
        return (agent_file(),)

    def engine_image(self, image: str) -> tuple[HostRootfs, ImageConfig | None, str] | None:
        """`image` from the engine's own store, if it has it (else None: our store decides).
        Remembered for a few seconds: the daemon asks on every run."""
        if image == "host":
            return None
        key = (self.name, image)
        hit = _IMAGE_CACHE.get(key)
        now = time.monotonic()
        if hit is not None and now - hit[0] < IMAGE_CACHE_SECONDS:
            if ContainerBackend._refresh_ahead and now - hit[0] >= IMAGE_REFRESH_AFTER:
                self._refresh_image(key, image)
            cached: tuple[HostRootfs, ImageConfig | None, str] | None = hit[1]
            return cached
        found = self._engine_image(image)
        _remember_image(key, now, found)
        return found

    # Set by `pooled`: this process is a daemon, whose runs of an image come again.
    _refresh_ahead: ClassVar[bool] = False

    def pooled(self) -> None:
        with _IMAGE_LOCK:
            if ContainerBackend._refresh_ahead:
                return
            ContainerBackend._refresh_ahead = True
        threading.Thread(target=_image_refresher, name="ak-image-refresh", daemon=True).start()

    def _refresh_image(self, key: tuple[str, str], image: str) -> None:
        """Have the refresher ask the engine about `image` again (once per name while one
        is pending); a failure leaves the answer to expire, and the next run then asks."""
        with _IMAGE_WANTED:
            if key not in _IMAGE_REFRESHING:
                _IMAGE_REFRESHING[key] = (self, image)
                _IMAGE_WANTED.notify()

    def _engine_image(self, image: str) -> tuple[HostRootfs, ImageConfig | None, str] | None:
        from urllib.parse import quote

        from ..images import ImageConfig
        from ..rootfs import HostRootfs
        try:
            doc = self.api().call("GET", f"/images/{quote(image, safe='')}/json", timeout=10,
                                  expect=(200,))
        except EngineError as exc:
            if exc.status == 404:
                return None
            raise
        config = ImageConfig.from_json({"config": doc.get("Config") or {}})
        ident = str(doc.get("Id", ""))
        return (HostRootfs((), (), f"{ENGINE_IMAGE}{ident}"), config,
                f"image {image} from the {self.engine} engine's store ({ident[:19]})")

    def start(self, spec: SandboxSpec) -> Sandbox:
        for attempt in range(LAYER_ATTEMPTS):
            try:
                return self._start_once(spec)
            except StartAgain as exc:
                if attempt + 1 < LAYER_ATTEMPTS:
                    continue
                if isinstance(exc, MasksChanged):
                    raise SandboxError(f"the host's private files changed under the sandbox's "
                                       f"start {LAYER_ATTEMPTS} times: {exc}") from None
                raise SandboxError(f"{self.engine} started the sandbox without its image "
                                   f"{LAYER_ATTEMPTS} times: {exc}") from None
        raise AssertionError("unreachable")

    def _start_once(self, spec: SandboxSpec) -> Sandbox:
        api = self.api()
        scratch = make_scratch(spec.name)
        try:
            if spec.profile.network == "egress" and spec.egress is not None and \
                    spec.egress.secrets:
                from ..egress_gate import write_tls

                write_tls(scratch, spec.egress)  # the sandbox's CA: its key is gone after
            return self._start(api, spec, scratch)
        except BaseException as exc:
            import shutil

            if not isinstance(exc, StartAgain):
                self.forget_engine()  # (stale settings may be why: the next start asks)
            from .container_upper import release_upper

            if not spec.persistent:
                self.remove_container(spec.name)
            release_upper(scratch / "ws")  # (if the start failed before the engine's)
            shutil.rmtree(scratch, ignore_errors=True)
            raise

    def _start(self, api: EngineAPI, spec: SandboxSpec, scratch: Path) -> Sandbox:
        ctl = scratch / "ctl"
        ctl.mkdir(mode=0o700)
        listener = None
        if not spec.persistent:
            listener = _listen(ctl / HOST_SOCK)
        existing = self._existing(api, spec) if spec.persistent else None
        ids = self.claim_ids(existing)
        try:
            cid, gone = (str(existing["Id"]), []) if existing else \
                self._create(api, spec, scratch, ids)
            root = ids.range.uid if ids is not None else self.container_root(api, cid)
            if root is not None:  # the sandbox's root must reach its socket; no one else
                os.chown(ctl, root, root)
                if listener is not None:
                    os.chown(ctl / HOST_SOCK, root, root)
            self._start_container(api, cid, spec, scratch, ids)
            if listener is not None:
                client, pid, uid = _accept(listener, lambda: self._died(cid))
            else:
                client, pid, uid = self._connect_persistent(cid, ctl / AGENT_SOCK)
            try:
                self.check_root(uid, root)
                self.check_layer(api, cid, pid)
                check_masks(pid, gone)
            except (SandboxError, StartAgain):
                client.close()
                if spec.persistent:
                    self.stop_container(spec.name)  # (its layer is kept: started again)
                raise
            if spec.persistent:
                _lock_ctl(ctl)
            if ids is not None:
                hold_ids(ids, pid)
        finally:
            if listener is not None:
                listener.close()
            if ids is not None and ids.lock >= 0:
                os.close(ids.lock)  # the holder has its own copy (or the start failed)
        process = ContainerProcess(self, cid, pid)
        helpers: list[subprocess.Popen[bytes]] = []
        if spec.profile.network == "egress":
            try:
                gate = self._egress_gate(spec, scratch, pid)
                if gate is not None:  # None: on demand, from the fork server
                    helpers.append(gate)
            except BaseException:
                client.close()
                if not spec.persistent:
                    self.remove_container_id(cid)
                else:
                    self.stop_container(spec.name)
                raise
        limited = self.engine_limits()
        sandbox = ContainerSandbox(spec=spec, backend=self.name, isolation=self.isolation,
                                   client=client, process=process, scratch=scratch,
                                   helpers=helpers,
                                   memory_floor=self.memory_floor or not limited)
        if not limited and spec.profile.memory_mb:
            sandbox.notes.append(f"{self.engine} sets no cgroup limits for you here: memory "
                                 "is capped per process (RLIMIT_DATA), not for the sandbox")
        sandbox.memory_dir = memory_dir_of(pid)
        if not spec.persistent:
            # Normally the engine removes it once the agent exits (AutoRemove); this is for
            # an agent that had to be killed, or never got going.
            sandbox.cleanups.append(lambda: self._remove_if_left(cid, process))
        sandbox.notes.extend(getattr(self, "_notes", []))
        try:
            client.hello(timeout=15)
        except SandboxError:
            sandbox.destroy()
            raise
        return sandbox

    def _egress_gate(self, spec: SandboxSpec, scratch: Path,
                     pid: int) -> subprocess.Popen[bytes] | None:
        """The container's only way out, up before its agent takes a command: the engine
        gave it a network namespace of its own with nothing in it (network "none"); the
        egress gate's veth (both ends inside) and rules go in from the host side, as for a
        namespaces sandbox, and the gate connects out from the host's namespace. DNS to
        any server, the container's loopback included, goes to the gate (the engine
        writes resolv.conf). The gate watches the container's init through a pidfd and
        ends with it, whoever started or restarts us; it runs as the container's own
        `nobody` (its user namespace's range) or, rootless, as the caller."""
        from ..egress_gate import GateStart
        from ..egress_policy import Policy

        try:
            exit_fd = os.pidfd_open(pid)
        except OSError as exc:
            raise SandboxError(f"cannot watch the container's init for its egress gate: "
                               f"{exc}") from None
        try:
            gate = GateStart(scratch, exit_fd=exit_fd)
            gate.attach(pid, spec.egress or Policy(), loopback_dns=True,
                        instance=spec.instance)
            return gate.wait()
        finally:
            os.close(exit_fd)

    def check_root(self, uid: int, expected: int | None) -> None:
        """Refuse a sandbox whose agent (the container's root) is not the host uid it
        should be: never host root, and the engine's mapped uid when we know it. Checked on
        the real process (its socket's SO_PEERCRED) before any command runs, so that what
        we remember of the engine (`forget_engine`) can never be what lets one through."""
        if uid != 0 and expected in (None, uid):
            return
        self.forget_engine()
        want = f"host uid {expected}" if expected is not None else "an unprivileged host uid"
        raise SandboxError(f"the {self.engine} container's root is host uid {uid}, not {want}: "
                           "refused (was the engine restarted with other settings? try again)")

    def check_layer(self, api: EngineAPI, cid: str, pid: int) -> None:
        """Refuse a container whose root is not its image (LayerNotMounted: `start` makes
        it again). Docker 20.10 under load sometimes has runc set the container up on its
        layer's bare mount point, the engine's overlay not mounted there at that moment:
        the image's files are all missing (plain `docker run` then fails with "stat
        /bin/...: no such file", ours started, its commands "not found"). The
        container's root mount then is not the engine's overlay: one read of its init's
        mountinfo (the engine is asked which storage driver only when it is not)."""
        fstype = _root_fstype(pid)
        if fstype is None or fstype in LAYER_FSTYPES:
            return
        try:
            doc = api.call("GET", f"/containers/{cid}/json", timeout=10)
        except EngineError:
            return
        driver = str((doc.get("GraphDriver") or {}).get("Name", ""))
        if driver in LAYER_DRIVERS:
            raise LayerNotMounted(f"its root was a {fstype} dir, not the {driver} layer")

    def forget_engine(self) -> None:
        """Forget what this process (and our runtime dir) remembers of the engine's
        settings, after a start found them stale."""

    def _remove_if_left(self, cid: str, process: ContainerProcess) -> None:
        # Gone by itself, the engine removes it (AutoRemove); killed by us, make sure.
        if process.killed:
            self.remove_container_id(cid)

    def _died(self, cid: str) -> str | None:
        """Why a container stopped before its agent spoke, or None while it runs."""
        try:
            doc = self.api().call("GET", f"/containers/{cid}/json", timeout=10)
        except EngineError as exc:
            return exc.message if exc.status == 404 else None
        state = doc.get("State") or {}
        if state.get("Running"):
            return None
        logs = self._logs(cid)
        return state.get("Error") or logs or f"the container exited ({state.get('ExitCode')})"

    def _logs(self, cid: str) -> str:
        with contextlib.suppress(EngineError, BackendUnavailable):
            raw = self.api().call("GET", f"/containers/{cid}/logs", raw=True,
                                  query={"stderr": "1", "stdout": "1", "tail": "5"}, timeout=5)
            lines = _demux(raw).decode(errors="replace").strip().splitlines()
            return lines[-1] if lines else ""
        return ""

    def _connect_persistent(self, cid: str, path: Path) -> tuple[AgentClient, int, int]:
        doc = self.api().call("GET", f"/containers/{cid}/json", timeout=10)
        pid = int((doc.get("State") or {}).get("Pid") or 0)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with contextlib.suppress(OSError, SandboxError):
                client, uid = connect_agent(path, pid)
                return client, pid, uid
            if time.monotonic() > deadline or not _alive(pid, None):
                why = self._died(cid) or "its agent did not listen in time"
                raise SandboxError(f"{self.engine} failed to start the sandbox: {why}")
            time.sleep(0.01)

    # --- the container -------------------------------------------------------------------
    def _existing(self, api: EngineAPI, spec: SandboxSpec) -> dict[str, Any] | None:
        """A persistent sandbox's container, if the engine has it (None: to be created)."""
        name = container_name(spec.name)
        try:
            doc: dict[str, Any] = api.call("GET", f"/containers/{name}/json", timeout=10)
        except EngineError as exc:
            if exc.status != 404:
                raise
            return None
        labels = (doc.get("Config") or {}).get("Labels") or {}
        if labels.get(LABEL_OWNER) != str(os.getuid()):
            raise SandboxError(f"a {self.engine} container named {name} exists and is not "
                               "this sandbox's")
        return doc

    def claim_ids(self, existing: dict[str, Any] | None) -> Ids | None:
        """The host ids the sandbox's root and users will be (and the lock that keeps them
        its own), when the engine puts containers in a user namespace we know the map of;
        None when the engine decides alone (rootless engines: the caller's own ids)."""
        return None

    def _create(self, api: EngineAPI, spec: SandboxSpec, scratch: Path,
                ids: Ids | None) -> tuple[str, list[str]]:
        """The new container's id, and the paths of the masks left out (`create_body`)."""
        body = self.create_body(spec, scratch, self._image_for(api, spec, scratch), ids)
        self._notes = list(body.pop("_notes"))
        gone = list(body.pop("_gone"))
        name = container_name(spec.name)
        for d in mapped_dirs(spec, scratch) if ids is not None else []:
            d.path.mkdir(mode=0o700, exist_ok=True)  # engines check that a bind's source is
        for pause in (0.05, 0.2, 0.5, None):
            try:
                return self.create_container(api, name, body, ids), gone
            except EngineError as exc:
                if _layer_missing(exc.message):  # (check_layer's fault, met while creating)
                    raise LayerNotMounted(exc.message) from None
                if exc.status != 409 or spec.persistent or pause is None:
                    raise SandboxError(f"{self.engine} refused the sandbox: "
                                       f"{exc.message}") from None
                # A leftover of a crashed run, or of a failed create the engine is still
                # taking down (its name is free a moment later).
                self.remove_container(spec.name)
                time.sleep(pause)
        raise AssertionError("unreachable")

    def create_container(self, api: EngineAPI, name: str, body: dict[str, Any],
                         ids: Ids | None) -> str:
        """Create the container `body` describes (Docker's create request); its id."""
        doc = api.call("POST", "/containers/create", query={"name": name}, body=body,
                       expect=(201,), timeout=START_TIMEOUT)
        return str(doc["Id"])

    def _start_container(self, api: EngineAPI, cid: str, spec: SandboxSpec, scratch: Path,
                         ids: Ids | None) -> None:
        """Start it, the host dirs it gets shown through id-mapped mounts for as long as the
        engine takes to mount them (its mounts keep them; ours go right after)."""
        from ..idmap import close_all, detach, new_userns
        from .container_upper import release_upper

        dirs = mapped_dirs(spec, scratch) if ids is not None else []
        opened: list[int] = []
        merged = scratch / MERGED
        try:
            if dirs and ids is not None:
                opened.append(new_userns(ids.range))
                for d in dirs:
                    _attach_mapped(d, opened[0], opened)
            if self.host_overlay() and _cow_ok(spec):
                merged.mkdir(mode=0o700, exist_ok=True)
                lower = next((str(d.path) for d in dirs if d.src == str(spec.workspace)),
                             str(spec.workspace))
                _mount_overlay(lower, (spec.state_dir or scratch) / "ws", merged)
            try:
                api.call("POST", f"/containers/{cid}/start", expect=(204, 304),
                         timeout=START_TIMEOUT, sent=_preload_after_start)
            except EngineError as exc:
                if _layer_missing(exc.message):  # (check_layer's fault, met by runc)
                    raise LayerNotMounted(exc.message) from None
                if _mask_target_gone(exc.message):
                    raise MasksChanged(exc.message) from None
                raise
        finally:
            close_all(opened)
            detach(str(merged))  # (the container's bind of it keeps the overlay)
            release_upper(scratch / "ws")  # (so does the container's overlay its upper)
            for d in dirs:
                detach(str(d.path))

    def create_body(self, spec: SandboxSpec, scratch: Path, image: Image,
                    ids: Ids | None = None) -> dict[str, Any]:
        """The engine's container-create request for `spec` (Docker's form). Pure apart
        from its inputs. With `ids`, host dirs are bound from where `_start_container`
        shows them id-mapped."""
        from ..paths import native_binary
        from ..seccomp import compile_bpf
        from .container_seccomp import profile_json

        p = spec.profile
        m = Mounts(self.tmpfs_extra)
        for src, target in image.binds:
            m.bind(src, target)
        # A private entry that vanished since the walk needs no mask, and the engine could
        # not make one (no target to bind onto in a read-only root): left out here, and
        # checked for in the started container (check_masks: it may have come back).
        gone = []
        for mask in image.masks:
            if os.path.lexists(mask.path):
                m.mask(mask.path, mask.is_dir)
            else:
                gone.append(mask.path)
        m.bind(str(native_binary("ak-agent")), f"{AGENT_DIR}/agent")
        m.bind(str(compile_bpf(p.seccomp, no_setid=p.workspace == "rw")),
               f"{AGENT_DIR}/seccomp.bpf")
        m.bind(str(scratch / "ctl"), CTL_DIR, read_only=not spec.persistent)
        if p.network == "egress" and spec.egress is not None and spec.egress.secrets:
            from ..egress_gate import TRUST_NAME

            # The system bundle plus the sandbox's CA (start wrote it), where the trust
            # variables point (secrets_store).
            m.bind(str(scratch / TRUST_NAME), SYSTEM_BUNDLE)
        size = f",size={p.memory_mb}m" if p.memory_mb else ""
        for path in ("/tmp", "/run", "/var/tmp"):
            m.add_tmpfs(path, f"rw,nosuid,nodev{size},mode=1777")
        if not p.root_writable:
            m.add_tmpfs("/root", f"rw,nosuid,nodev{size},mode=700")
        mapped = {d.src: str(d.path) for d in mapped_dirs(spec, scratch)} if ids else {}
        root = ids.range.uid if ids is not None else self.root_uid()
        notes = self._workspace(spec, scratch, m, mapped, root)
        if p.mount_home and spec.home is not None:
            m.bind(mapped.get(str(spec.home), str(spec.home)), "/home/user")
        for hidden in (*spec.masks, *_engine_socket_masks(spec)):
            m.mask(hidden, not hidden.endswith(".sock"))
        agent = [f"{AGENT_DIR}/agent"]
        if spec.persistent:
            # Its commands may reach the socket (an ordinary user's engine leaves the dir
            # theirs): the agent serves no peer of its own pid namespace.
            agent += ["--listen", f"{CTL_DIR}/{AGENT_SOCK}", "--peers-outside"]
        else:
            agent += ["--connect", f"{CTL_DIR}/{HOST_SOCK}"]
        agent += ["--drop-caps", "--seccomp", f"{AGENT_DIR}/seccomp.bpf",
                  *self._guard(spec, scratch, m)]
        host: dict[str, Any] = {
            "Mounts": m.mounts, "Tmpfs": m.tmpfs,
            "ReadonlyRootfs": not p.root_writable,
            # Every capability goes: the agent needs none (the engine made the mounts).
            "CapDrop": ["ALL"], "CapAdd": [],
            # A seccomp profile of ours in place of the engine's default, which refuses the
            # agent's guard what it needs; the agent adds its own filters (container_seccomp).
            "SecurityOpt": ["no-new-privileges", f"seccomp={profile_json(p.seccomp)}"],
            "NetworkMode": "bridge" if p.network == "host" else "none",
            "IpcMode": "private", "PidMode": "", "Privileged": False,
            "AutoRemove": not spec.persistent,
            "RestartPolicy": {"Name": "no"},
            "PidsLimit": p.pids or -1,
            "Memory": p.memory_mb * 1024 * 1024 if p.memory_mb else 0,
            # No swap beyond the memory limit: the limit is the limit.
            "MemorySwap": p.memory_mb * 1024 * 1024 if p.memory_mb else 0,
            "NanoCpus": int(p.cpus * 1e9) if p.cpus else 0,
            "OomKillDisable": False,
            "MaskedPaths": list(MASKED_PATHS), "ReadonlyPaths": list(READONLY_PATHS),
            **self.host_config_extra,
        }
        labels = {LABEL_SANDBOX: spec.name, LABEL_OWNER: str(os.getuid()),
                  LABEL_HOME: home_label(),
                  LABEL_KIND: "persistent" if spec.persistent else "run"}
        if ids is not None:
            labels[LABEL_IDS] = f"{ids.range.uid}:{ids.range.gid}"
        return {
            "Image": image.ref, "Entrypoint": agent, "Cmd": [], "Env": [], "WorkingDir": "/",
            "User": "0:0", "Hostname": spec.hostname, "Labels": labels,
            "AttachStdin": False, "AttachStdout": False, "AttachStderr": False,
            "OpenStdin": False, "Tty": False, "StopSignal": "SIGKILL",
            "NetworkDisabled": p.network != "host", "HostConfig": host,
            # ours, not the engine's: taken out before sending
            "_notes": [*notes, *m.notes], "_gone": gone,
        }

    def _guard(self, spec: SandboxSpec, scratch: Path, m: Mounts) -> list[str]:
        """The agent's unix-socket guard: the container's own mounts (container_seccomp)."""
        from .container_seccomp import own_mounts

        own = own_mounts(spec.workspace_at, m.mounts, m.tmpfs, str(scratch / MERGED))
        return ["--guard-unix", ":".join(own)]

    def _workspace(self, spec: SandboxSpec, scratch: Path, m: Mounts,
                   mapped: dict[str, str], root: int | None) -> list[str]:
        """The project at `spec.workspace_at` per profile: rw or ro binds; copy-on-write as an
        overlay the engine mounts, its upper dir ours (owned by the sandbox's root, the
        host uid `root` when the engine maps it)."""
        p = spec.profile
        if spec.workspace is None or p.workspace == "none":
            return []
        src = mapped.get(str(spec.workspace), str(spec.workspace))
        if p.workspace in ("rw", "ro"):
            m.bind(src, spec.workspace_at, read_only=p.workspace == "ro")
            return []
        base = (spec.state_dir or scratch) / "ws"
        upper, work = base / "upper", base / "work"
        if any(c in src for c in ",:\\") or not _cow_ok(spec):
            m.bind(src, spec.workspace_at, read_only=True)
            return ["copy-on-write workspace unavailable for this path: mounted read-only"]
        view = base if spec.state_dir is not None else self._sized_upper(spec, base)
        if view is None:
            m.bind(src, spec.workspace_at, read_only=True)
            return [f"copy-on-write workspace unavailable: {self.engine}'s namespace not "
                    "found to bound its writes in: mounted read-only"]
        for d in (view / "upper", view / "work"):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The overlay's root takes its upper dir's mode: the project's own, not our 0700.
        (view / "upper").chmod(spec.workspace.stat().st_mode & 0o777)
        if root is not None:
            for d in (view, view / "upper", view / "work"):
                os.chown(d, root, root)
        if self.host_overlay():  # mounted there by _start_container, for the engine
            (scratch / MERGED).mkdir(mode=0o700, exist_ok=True)
            m.bind(str(scratch / MERGED), spec.workspace_at, read_only=False)
        else:
            self.overlay_mount(m, spec, src, upper, work)
        return []

    def _sized_upper(self, spec: SandboxSpec, base: Path) -> Path | None:
        """A one-shot sandbox's upper and work dirs' place: a tmpfs of its cap at `base`
        where the engine resolves it (see container_upper); the path we see it through,
        or None when a rootless engine's namespace cannot be found (nothing mounted)."""
        from .container_upper import engine_ns_pid, mount_upper, sweep_uppers, upper_mb

        ns = None
        if os.geteuid() != 0:
            ns = engine_ns_pid(self.engine_processes())
            if ns is None:
                return None
        sweep_uppers(ns)  # (what runs that died before they detached theirs left)
        return mount_upper(base, upper_mb(spec.profile.memory_mb), ns)

    def engine_processes(self) -> list[int]:
        """Processes of a rootless engine, in the namespaces where it resolves host paths
        (its API socket's listener first)."""
        from ..peercred import peer_cred

        path = self.socket_path()
        if path is None:
            return []
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(5)
            sock.connect(path)
            return [peer_cred(sock).pid]
        except OSError:
            return []
        finally:
            sock.close()

    def engine_limits(self) -> bool:
        """Whether the engine enforces the memory and pids limits it is given (its
        cgroup); if not, the rlimit floor stands in (see cgroups.rlimit_floor)."""
        return True

    def host_overlay(self) -> bool:
        """Whether we mount the copy-on-write project ourselves (on the host, for the
        engine to bind while it starts the container) instead of `overlay_mount`."""
        return False

    def overlay_mount(self, m: Mounts, spec: SandboxSpec, src: str, upper: Path,
                      work: Path) -> None:
        """A copy-on-write view of host dir `src` at /workspace: an overlay the engine mounts
        through its local volume driver (Docker), its upper dir ours."""
        m.mounts.append({"Type": "volume", "Target": spec.workspace_at, "VolumeOptions": {
            "DriverConfig": {"Name": "local", "Options": {
                "type": "overlay", "device": "overlay",
                "o": f"lowerdir={src},upperdir={upper},workdir={work}"}},
            "Labels": {LABEL_SANDBOX: spec.name, LABEL_OWNER: str(os.getuid())}}})

    # --- images --------------------------------------------------------------------------
    def _image_for(self, api: EngineAPI, spec: SandboxSpec, scratch: Path) -> Image:
        rootfs = spec.rootfs
        if rootfs.name.startswith(ENGINE_IMAGE):
            return Image(rootfs.name.removeprefix(ENGINE_IMAGE), (), ())
        if rootfs.name.startswith(ENGINE_BASE):
            binds = tuple((e.src, e.path) for e in rootfs.entries if e.kind != "symlink")
            return Image(rootfs.name.removeprefix(ENGINE_BASE), binds, _host_masks(rootfs))
        if rootfs.name == "host":
            return self._host_image(api, rootfs, scratch)
        return self._imported(api, rootfs, scratch)

    def _host_image(self, api: EngineAPI, rootfs: HostRootfs, scratch: Path) -> Image:
        """The host's userland, read-only binds on an empty base image of our own (which
        holds only its symlinks), its secrets masked."""
        links = tuple((e.path, e.target) for e in rootfs.entries if e.kind == "symlink")
        tag = sha256_hex(repr(links).encode())[:12]
        ref = f"{BASE_REPO}:{tag}"
        if not self._has_image(api, ref):
            tar = scratch / "base.tar"
            _write_base_tar(tar, links)
            self._import(api, tar, BASE_REPO, tag)
            tar.unlink()
        binds = tuple((e.src, e.path) for e in rootfs.entries if e.kind != "symlink")
        return Image(ref, binds, _host_masks(rootfs))

    def _imported(self, api: EngineAPI, rootfs: HostRootfs, scratch: Path) -> Image:
        """An image of our own store, imported into the engine once (tagged by content)."""
        sources = [e.src for e in rootfs.entries if e.kind != "symlink"]
        if not sources:
            raise SandboxError(f"image {rootfs.name} has an empty root filesystem")
        root = Path(sources[0]).parent
        tag = sha256_hex(f"{rootfs.name}\0{root}".encode())[:16]
        ref = f"{IMPORT_REPO}:{tag}"
        if not self._has_image(api, ref):
            tar = scratch / "image.tar"
            _write_tree_tar(tar, root)
            self._import(api, tar, IMPORT_REPO, tag)
            tar.unlink()
        return Image(ref, (), ())

    def _has_image(self, api: EngineAPI, ref: str) -> bool:
        try:
            api.call("GET", f"/images/{ref}/json", timeout=10, expect=(200,))
        except EngineError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def _import(self, api: EngineAPI, tar: Path, repo: str, tag: str) -> None:
        with _import_lock():  # sandboxes started together import an image once
            if not self._has_image(api, f"{repo}:{tag}"):
                self._import_now(api, tar, repo, tag)

    def _import_now(self, api: EngineAPI, tar: Path, repo: str, tag: str) -> None:
        out = api.call("POST", "/images/create", query={"fromSrc": "-", "repo": f"{repo}:{tag}"},
                       upload=str(tar), timeout=600)
        for line in out if isinstance(out, list) else []:
            if isinstance(line, dict) and line.get("error"):
                raise SandboxError(f"{self.engine} could not import {repo}:{tag}: "
                                   f"{line['error']}")

    # --- clean-up ------------------------------------------------------------------------
    def remove_container(self, name: str) -> None:
        """Remove sandbox `name`'s container (running or not) and its volumes, if any."""
        self.remove_container_id(container_name(name))

    def remove_container_id(self, cid: str) -> None:
        with contextlib.suppress(EngineError, BackendUnavailable):
            self.api().call("DELETE", f"/containers/{cid}", query={"force": "1", "v": "1"},
                            expect=(204, 404, 409), timeout=60)

    def stop_container(self, name: str) -> None:
        """A persistent sandbox's container stops; its writable layer stays."""
        with contextlib.suppress(EngineError, BackendUnavailable):
            self.api().call("POST", f"/containers/{container_name(name)}/kill",
                            expect=(204, 404, 409), timeout=30)

    def ours(self, kind: str | None = None) -> list[dict[str, Any]]:
        """This user's containers (all states), optionally of one kind."""
        import json

        filt = [f"{LABEL_OWNER}={os.getuid()}"] + ([f"{LABEL_KIND}={kind}"] if kind else [])
        out = self.api().call("GET", "/containers/json", timeout=30,
                              query={"all": "1", "filters": json.dumps({"label": filt})})
        return list(out or [])

    def sweep(self, keep: set[str]) -> list[str]:
        """Remove what a dead daemon left: its pool's containers (only a daemon starts
        `pool-*` sandboxes, and one daemon runs per user), and persistent sandboxes' not in
        `keep` (the recorded names). One-off runs of the CLI clean up after themselves (see
        the module's doc) and may be running now: they are left alone."""
        gone = []
        for doc in self.ours():
            labels = doc.get("Labels") or {}
            if labels.get(LABEL_HOME, home_label()) != home_label():
                continue  # another daemon's (of this user, another data dir)
            name = labels.get(LABEL_SANDBOX, "")
            persistent = labels.get(LABEL_KIND) == "persistent"
            if (persistent and name in keep) or (not persistent and not name.startswith("pool-")):
                continue
            self.remove_container_id(str(doc["Id"]))
            gone.append(name)
        return gone

    # --- snapshots -----------------------------------------------------------------------
    def commit(self, name: str, snap: str) -> str:
        """A persistent sandbox's container as an image in the engine (`commit`): its
        root filesystem as it is now (its tmpfs mounts and the host dirs bound in are not
        part of it). Returns the image's id."""
        try:
            doc = self.api().call("POST", "/commit", timeout=600, query={
                "container": container_name(name), "repo": SNAPSHOT_REPO,
                "tag": f"{os.getuid()}-{snap}", "pause": "1"}, body={})  # (podman wants one)
        except EngineError as exc:
            raise SandboxError(f"{self.engine} could not commit the sandbox: "
                               f"{exc.message}") from None
        ident = str((doc or {}).get("Id", "") or (doc or {}).get("id", ""))
        if not ident:
            raise SandboxError(f"{self.engine} committed the sandbox but named no image")
        return ident


class ContainerSandbox(Sandbox):
    """A sandbox whose cgroup is the engine's: asked (read-only) whether the kernel's OOM
    killer acted in it, never created or removed by us."""

    memory_dir: Path | None = None  # the container's memory cgroup dir, read at start

    def oom_killed(self) -> bool:
        from ..cgroups import oom_kills

        return self.memory_dir is not None and (oom_kills(self.memory_dir) or 0) > 0


def memory_dir_of(pid: int) -> Path | None:
    """The memory cgroup dir of host process `pid` (v1's memory controller, or v2)."""
    from ..cgroups import memory_dir

    return memory_dir(pid)


class Ids(NamedTuple):
    """The host ids a container's 0..size-1 are, and the lock of that range (-1: none;
    else an fd `allocate`/`take` gave, for `hold_ids` to keep while the container lives)."""

    range: HostRange
    lock: int


class MappedDir(NamedTuple):
    """A host dir shown to a container in a user namespace through an id-mapped mount
    (so that host root's files are the container root's), attached at `path` while the
    engine starts the container."""

    src: str
    path: Path
    read_only: bool


def mapped_dirs(spec: SandboxSpec, scratch: Path) -> list[MappedDir]:
    """The host dirs a sandbox in a user namespace gets id-mapped: its project and home."""
    p = spec.profile
    out = []
    if spec.workspace is not None and p.workspace != "none":
        out.append(MappedDir(str(spec.workspace), scratch / "map-ws", p.workspace != "rw"))
    if p.mount_home and spec.home is not None and str(spec.home) != str(spec.workspace):
        out.append(MappedDir(str(spec.home), scratch / "map-home", True))
    return out


MERGED = "ws-merged"  # in the scratch dir: where a host-mounted overlay waits for the engine


def _cow_ok(spec: SandboxSpec) -> bool:
    """Whether the project is shown copy-on-write (else read-only, said so): the profile
    asks for it, and the project is a dir whose path an overlay's options can carry."""
    ws = spec.workspace
    return (ws is not None and spec.profile.workspace not in ("rw", "ro", "none")
            and not any(c in str(ws) for c in ",:\\") and ws.is_dir())


def _mount_overlay(lower: str, base: Path, target: Path) -> None:
    """Mount the copy-on-write project (an overlay of `lower`, its upper and work dirs in
    `base`) at `target` on the host, nosuid and nodev, for as long as the engine starts
    the container. The caller made the dirs (`_workspace`)."""
    from ..idmap import _libc

    data = f"lowerdir={lower},upperdir={base / 'upper'},workdir={base / 'work'}"
    ms_nosuid, ms_nodev = 2, 4
    if _libc().mount(b"overlay", os.fsencode(str(target)), b"overlay", ms_nosuid | ms_nodev,
                     data.encode()) != 0:
        import ctypes

        err = ctypes.get_errno()
        raise SandboxError(f"cannot mount the copy-on-write project: {os.strerror(err)}")


def _attach_mapped(d: MappedDir, userns: int, opened: list[int]) -> None:
    from ..idmap import attach, idmapped_tree

    d.path.mkdir(mode=0o700, exist_ok=True)
    try:
        # plain: the runtime remounts its bind (read-only) and could not keep flags we set
        # (locked in its user namespace); the engine's own options add nosuid, nodev.
        fd = idmapped_tree(d.src, userns, read_only=d.read_only, plain=True)
        opened.append(fd)
        attach(fd, str(d.path))
    except OSError as exc:
        raise SandboxError(f"cannot show {d.src} to the sandbox in its user namespace: "
                           f"{exc.strerror}") from None


HOLD_POLL = "0.2"  # seconds between the holder's looks at the container's init


def hold_ids(ids: Ids, pid: int) -> None:
    """Keep the container's id range locked for as long as its init (`pid`, on the host)
    lives: the engine, not we, runs the container, so the lock goes to a small process of
    its own (tail --pid), detached from us (setsid --fork: init reaps it). It outlives us
    and a daemon restart, and lets go at most HOLD_POLL s after the container's end."""
    from ..paths import which

    if ids.lock < 0:
        return
    setsid, tail = which("setsid"), which("tail")
    if setsid is None or tail is None:
        raise SandboxError("keeping a container's id range needs setsid and tail")
    # Once Popen returns, setsid runs with the lock (then its forked tail does): nothing
    # to wait for on the start's path (~5 ms); a thread reaps setsid as it exits.
    proc = subprocess.Popen([setsid, "--fork", tail, f"--pid={pid}", "-s", HOLD_POLL, "-f",
                             "/dev/null"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, pass_fds=(ids.lock,))
    import threading

    threading.Thread(target=proc.wait, name="ak-hold-reap", daemon=True).start()


class Image(NamedTuple):
    """What a container is made from: an engine image, plus host binds and masks on it."""

    ref: str
    binds: tuple[tuple[str, str], ...]  # (host source, target), read-only
    masks: tuple[Any, ...]  # rootfs.Mask


@contextlib.contextmanager
def _import_lock() -> Any:
    import fcntl

    from ..paths import data_dir

    path = data_dir() / "cache" / "engine-import.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _host_masks(rootfs: HostRootfs) -> tuple[Any, ...]:
    """The userland's masks, its private entries included: the walk is kept while the
    kernel says nothing it depends on changed (a daemon's pool starts many)."""
    from ..rootfs_watch import private_masks

    return private_masks(rootfs)


def _engine_socket_masks(spec: SandboxSpec) -> list[str]:
    """In-sandbox paths where an engine socket would show through the project or $HOME."""
    out = []
    shown = [(spec.workspace, spec.workspace_at), (spec.home if spec.profile.mount_home else None,
                                               "/home/user")]
    for sock in ENGINE_SOCKETS:
        real = os.path.realpath(sock)
        for host, inside in shown:
            if host is None or not os.path.exists(real):
                continue
            base = os.path.realpath(host)
            if real.startswith(base + "/"):
                out.append(inside + real.removeprefix(base))
    return out


def _demux(raw: bytes) -> bytes:
    """The payload of the engine's multiplexed log stream (8-byte frame headers)."""
    out = bytearray()
    pos = 0
    while pos + 8 <= len(raw) and raw[pos] in (0, 1, 2) and raw[pos + 1:pos + 4] == b"\0\0\0":
        size = int.from_bytes(raw[pos + 4:pos + 8], "big")
        out += raw[pos + 8:pos + 8 + size]
        pos += 8 + size
    return bytes(out) if pos else raw


def check_masks(pid: int, gone: list[str]) -> None:
    """Refuse a container (MasksChanged: made again, with a new walk) in which a private
    entry whose mask was left out as vanished (`create_body`) exists after all: it came
    back before the engine bound the host's dirs. Looked at through its init's root, before
    any command runs; one that comes back later is like any entry made after the start."""
    for path in gone:
        try:
            os.lstat(f"/proc/{pid}/root{path}")
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise SandboxError(f"cannot check the container for {path}: {exc.strerror}") \
                from None
        raise MasksChanged(f"{path} came back before its mask could be made")


def _mask_target_gone(message: str) -> bool:
    """Whether the runtime failed to mount a mask (/dev/null or a tmpfs) onto a path that
    is not on the host now: a private entry that vanished after `create_body` looked."""
    import re

    if "mount" not in message:
        return False
    paths = re.findall(r"""["'`](/[^"'`\s]+)["'`]""", message)
    return any(not os.path.lexists(p) for p in paths if p != "/dev/null"
               and not p.startswith("/var/lib/") and "/merged/" not in p)


def _write_base_tar(path: Path, links: tuple[tuple[str, str], ...]) -> None:
    """An image with only mount points and the userland's top-level symlinks."""
    import tarfile

    with tarfile.open(path, "w") as tar:
        for d in ("proc", "sys", "dev", "etc", "tmp", "run", "root", "home", "workspace"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for link, target in links:
            info = tarfile.TarInfo(link.lstrip("/"))
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)


def _write_tree_tar(path: Path, root: Path) -> None:
    import tarfile

    with tarfile.open(path, "w") as tar:
        for entry in sorted(os.listdir(root)):
            tar.add(str(root / entry), arcname=entry, recursive=True)


def _layer_missing(message: str) -> bool:
    """Whether the engine's error is check_layer's fault met before the agent runs: Docker
    writing into the container's init layer (`<id>-init/merged/...: no such file`), or
    runc making its mount points in a bare layer dir it may not write (a user namespace's
    root on Podman: `.../merged/sys: permission denied`)."""
    return "/merged/" in message and ("no such file or directory" in message
                                      or "permission denied" in message)


def _preload_after_start() -> None:
    """A one-off CLI run imports what it needs once the container runs (the agent's
    client, procs, shutil: ~10 ms) on a thread while the engine starts the container,
    instead of after; a daemon has them already. Called once the start request is out
    (EngineAPI.call's `sent`): a thread that imports holds the GIL, and the request would
    wait for it (up to the interpreter's 5 ms switch interval, more than once)."""
    import sys

    if "agentkernel.agent.client" in sys.modules and "shutil" in sys.modules:
        return
    import threading

    def load() -> None:
        import shutil  # noqa: F401

        from .. import procs  # noqa: F401
        from ..agent import client  # noqa: F401

    threading.Thread(target=load, name="ak-preload", daemon=True).start()


def _root_fstype(pid: int) -> str | None:
    """The filesystem type of what process `pid` sees at "/" (its mount namespace's top
    mount there); None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/mountinfo", "rb") as f:
            data = f.read(1024 * 1024)
    except OSError:
        return None
    found = None
    for line in data.split(b"\n"):
        fields = line.split(b" ")
        if len(fields) > 4 and fields[4] == b"/" and b"-" in fields:
            found = fields[fields.index(b"-") + 1].decode(errors="replace")
    return found


def _lock_ctl(ctl: Path) -> None:
    """Once a kept container's agent listens in its control dir (bound into it writable,
    for that), the dir is host `nobody`'s (0700), no longer its root's: the container
    (root without capabilities, or a remapped host uid) can then neither replace the
    socket nor fill the host's runtime dir (a tmpfs: its memory) with files of its own.
    The daemon, as root, still connects. Each start gives the dir back to the
    container's root first. An ordinary user's engine (rootless) keeps it: that dir is
    in the user's own runtime dir, and its root is that user."""
    if os.geteuid() == 0:
        os.chown(ctl, 65534, 65534)  # the host's nobody


def _listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
        sock.listen(1)
    except OSError as exc:
        sock.close()
        raise SandboxError(f"cannot listen on {path}: {exc.strerror}") from None
    return sock


def _accept(listener: socket.socket, died: Any) -> tuple[AgentClient, int, int]:
    """The agent's connection (the first and only one); its pid is the container's init,
    its uid the host uid of the container's root."""
    from ..agent.client import AgentClient

    deadline = time.monotonic() + START_TIMEOUT
    listener.settimeout(0.05)
    while True:
        try:
            conn, _ = listener.accept()
            break
        except TimeoutError:
            pass
        if time.monotonic() > deadline:
            raise SandboxError("timed out waiting for the sandbox's agent")
        why = died()
        if why:
            raise SandboxError(f"the container stopped before its agent started: {why}")
    conn.settimeout(None)
    pid, uid = _peer_creds(conn)
    return AgentClient.from_socket(conn), pid, uid


def _peer_creds(sock: socket.socket) -> tuple[int, int]:
    """The peer's pid and uid (as the host sees them); SandboxError if they are unreadable
    or not a process's."""
    from ..peercred import PeerCredError, peer_cred

    try:
        cred = peer_cred(sock)
    except PeerCredError as exc:
        raise SandboxError(f"cannot check the sandbox's agent: {exc}") from None
    return cred.pid, cred.uid


def connect_agent(path: Path, init_pid: int) -> tuple[AgentClient, int]:
    """Connect to a persistent sandbox's agent, refusing a socket anything but the
    container's init (the agent) listens on; the client and the agent's host uid."""
    from ..agent.client import AgentClient
    from ..paths import connect_socket_file

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        connect_socket_file(sock, path)  # the container's root can write its dir
        pid, uid = _peer_creds(sock)
        if init_pid and pid != init_pid:
            raise SandboxError(f"{path} is not served by the sandbox's agent")
    except BaseException:
        sock.close()
        raise
    return AgentClient.from_socket(sock), uid




def snapshot_ref(ident: str) -> str:
    """The recorded path of a snapshot the engine keeps as image `ident`."""
    return f"{SNAPSHOT_PATH}{ident}"


def snapshot_rootfs(rootfs: HostRootfs, path: str) -> HostRootfs:
    """The root filesystem of a sandbox restored from the snapshot at `path`: the committed
    image; on the host's userland, that image in place of our base, the userland bound
    on it again (it was never in the container's layer)."""
    ident = path.removeprefix(SNAPSHOT_PATH)
    if rootfs.name == "host":
        return rootfs._replace(name=f"{ENGINE_BASE}{ident}")
    return rootfs._replace(entries=(), masks=(), name=f"{ENGINE_IMAGE}{ident}")


def remove_snapshot(backend: ContainerBackend, path: str) -> bool:
    """Remove a snapshot's image from the engine (kept while a container still uses it);
    False when `path` is not an engine's snapshot."""
    from urllib.parse import quote

    if not path.startswith(SNAPSHOT_PATH):
        return False
    with contextlib.suppress(EngineError, BackendUnavailable):
        backend.api().call("DELETE", f"/images/{quote(path.removeprefix(SNAPSHOT_PATH))}",
                           expect=(200, 404, 409), timeout=60)
    return True


def not_found(name: str) -> NotFound:
    return NotFound(f"no container for sandbox {name!r}")
