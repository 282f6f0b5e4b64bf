"""User-mode egress networking (slirp4netns) for sandboxes in their own network namespace."""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from .egress import SLIRP_DEV, SLIRP_DNS  # the fence is built around slirp's addresses
from .errors import BackendUnavailable, SandboxError
from .paths import which

RESOLV_CONF = f"nameserver {SLIRP_DNS}\noptions edns0 trust-ad\n"


def slirp_available() -> str | None:
    return which("slirp4netns")


def tun_problem() -> str | None:
    """Why slirp4netns could not open /dev/net/tun for us, or None.

    It opens the device inside the sandbox's user namespace, where our capabilities do not
    cover a device node the host's root owns: the file mode alone must let us in (it is
    0666 on most distributions).
    """
    tun = "/dev/net/tun"
    if not os.path.exists(tun):
        return f"{tun} does not exist (modprobe tun)"
    if os.geteuid() != 0 and not os.access(tun, os.R_OK | os.W_OK):
        mode = oct(os.stat(tun).st_mode & 0o777)[2:]
        return (f"{tun} is mode {mode}, so uid {os.getuid()} cannot open it (as root: "
                f"chmod 0666 {tun}, the usual mode)")
    return None


def write_resolv_conf(scratch: Path) -> Path:
    """The sandbox's resolv.conf: slirp's DNS forwarder, never the host's loopback resolver."""
    path = scratch / "resolv.conf"
    path.write_text(RESOLV_CONF)
    return path


def start_slirp(
    target_pid: int, log: Path, *, exit_fd: int, timeout: float = 10.0,
    reach_host: bool = False, unprivileged: bool = False,
) -> subprocess.Popen[bytes]:
    """Attach slirp4netns to the network namespace of `target_pid` and wait until it is up.

    The namespace is fenced too (egress.Fence): the host's addresses, loopback, private,
    link-local and metadata ranges are rejected there before this returns (the rules load
    while slirp4netns starts: nothing untrusted runs in there until our caller says so),
    and a sandbox whose fence fails does not start. `--disable-host-loopback` also keeps slirp's
    10.0.2.2 from leading to the host's 127.0.0.1. The sandbox gets 10.0.2.100/24 with
    10.0.2.2 as gateway and DNS at 10.0.2.3.

    `reach_host`: the "host network" of a permissive gVisor sandbox (runsc must not sit in
    the host's namespace): no fence, and 10.0.2.2 is the host's loopback.

    `unprivileged` (started by root, for a namespace its sandbox's own user namespace owns):
    slirp4netns, which parses every packet the sandbox sends, runs as root of that user
    namespace (the sandbox's unprivileged host range), not as host root -- where
    /dev/net/tun lets everyone open it (mode 0666, most distributions). Elsewhere it runs as
    host root; either way `--enable-sandbox` leaves it no capability (but binding low
    ports) in an empty root of its own once its tap device exists.
    """
    binary = slirp_available()
    if binary is None:
        raise BackendUnavailable(
            "egress networking needs slirp4netns (apt install slirp4netns), "
            "or use --no-network"
        )
    problem = tun_problem()
    if problem:
        raise BackendUnavailable(f"egress networking: {problem}; or use --no-network")
    fence = None
    if not reach_host:
        from .egress import Fence

        fence = Fence(enter_netns(target_pid))  # loads while slirp4netns starts
    ready_r, ready_w = os.pipe()
    logf = open(log, "wb")  # noqa: SIM115 - handed to the child, closed below
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc = subprocess.Popen(
            [binary, "--configure", "--mtu=65520",
             *([] if reach_host else ["--disable-host-loopback"]), "--enable-seccomp",
             # After set-up: an empty root of its own, no capability but binding low ports.
             "--enable-sandbox",
             f"--ready-fd={ready_w}", f"--exit-fd={exit_fd}",
             str(target_pid), SLIRP_DEV],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logf,
            pass_fds=(ready_w, exit_fd), close_fds=True,
            start_new_session=True,  # the terminal's Ctrl-C is for the command, not for us
            preexec_fn=_userns_of(target_pid) if unprivileged and _tun_open_to_all() else None,
        )
        os.close(ready_w)
        ready_w = -1
        poller = select.poll()  # not select(): a daemon's fds may pass FD_SETSIZE
        poller.register(ready_r, select.POLLIN)
        readable = poller.poll(max(0, round(timeout * 1000)))
        if not readable or os.read(ready_r, 1) != b"1":
            lines = log.read_text(errors="replace").strip().splitlines() or ["timed out"]
            raise SandboxError(f"slirp4netns failed to set up the sandbox network: {lines[-1]}")
        if fence is not None:
            fence.wait()  # before our caller lets anything run in there
            fence = None
        return proc
    except BaseException:
        if proc is not None:
            proc.kill()
            proc.wait()
        raise
    finally:
        if fence is not None:
            fence.abandon()
        logf.close()
        os.close(ready_r)
        if ready_w >= 0:
            with contextlib.suppress(OSError):
                os.close(ready_w)


def _tun_open_to_all() -> bool:
    try:
        return os.stat("/dev/net/tun").st_mode & 0o006 == 0o006
    except OSError:
        return False


def _userns_of(pid: int) -> Callable[[], None]:
    """A preexec function entering the user namespace of `pid` as its root."""
    from .idmap import enter_fn

    fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    enter = enter_fn(fd)

    def run() -> None:
        try:
            enter()
        finally:
            os.close(fd)

    return run


def lifeline() -> tuple[int, int]:
    """A pipe whose write end the sandbox's main process holds: when that process ends, the
    read end sees EOF and every helper tied to it (slirp4netns, a netns holder) exits too,
    even if agentkernel itself was killed."""
    return os.pipe()


def netns_holder(lifeline_r: int) -> subprocess.Popen[bytes]:
    """A process owning a fresh network namespace for slirp4netns and a VMM or runsc to
    share; it lives exactly as long as the lifeline's write end stays open somewhere."""
    unshare = which("unshare")
    if unshare is None:
        raise BackendUnavailable("egress networking needs unshare (util-linux)")
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    holder = subprocess.Popen(
        [unshare, *user, "--net", "--", "cat"],  # cat: reads the lifeline until EOF
        stdin=lifeline_r, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    # Wait until the holder is inside its namespace before anyone joins it (by the clock:
    # on a loaded host unshare can take a while to get there).
    own = os.readlink("/proc/self/ns/net")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if os.readlink(f"/proc/{holder.pid}/ns/net") != own:
                return holder
        except OSError:
            pass
        if holder.poll() is not None:
            break
        time.sleep(0.001)
    holder.kill()
    holder.wait()
    raise SandboxError("could not create a network namespace for the sandbox")


def egress_netns(
    slirp_log: Path, helpers: list[subprocess.Popen[bytes]], *, reach_host: bool = False,
) -> tuple[int, int]:
    """A network namespace whose only way out is slirp4netns, fenced as start_slirp says
    (unless `reach_host`), for runsc or a VMM to join with `enter_netns(pid)`.

    Returns (holder pid, lifeline write end). The process that runs the sandbox must hold
    the write end: when it ends, the holder and slirp4netns exit too, whatever happens to
    us. Both helpers are appended to `helpers` as they start, for the caller's clean-up.
    """
    life_r, life_w = lifeline()
    try:
        holder = netns_holder(life_r)
        helpers.append(holder)
        helpers.append(start_slirp(holder.pid, slirp_log, exit_fd=life_r,
                                   reach_host=reach_host))
    except BaseException:
        os.close(life_w)
        raise
    finally:
        os.close(life_r)
    return holder.pid, life_w


def enter_netns(pid: int, userns_fd: int = -1) -> list[str]:
    """argv prefix that runs a command inside the network namespace of `pid` (for an
    ordinary user, through the user namespace `userns_fd` of ours, else `pid`'s own)."""
    nsenter = which("nsenter")
    if nsenter is None:
        raise BackendUnavailable("egress networking needs nsenter (util-linux)")
    argv = [nsenter, f"--target={pid}", "--net"]
    if os.geteuid() != 0:
        user = f"--user=/proc/{os.getpid()}/fd/{userns_fd}" if userns_fd >= 0 else "--user"
        argv += [user, "--preserve-credentials"]
    return [*argv, "--"]


def empty_netns_prefix(*, required: bool = False) -> list[str]:
    """argv prefix that runs a command in a new, empty network namespace (if possible;
    `required`: BackendUnavailable if not)."""
    unshare = which("unshare")
    if unshare is None:
        if required:
            raise BackendUnavailable("a private network namespace needs unshare (util-linux)")
        return []
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return [unshare, *user, "--net", "--"]


# A TAP device for VMMs that only speak TAP (Firecracker), inside an egress namespace.
TAP_EGRESS_DEV = "akeg0"
TAP_EGRESS_HOST = "172.30.0.1"  # the namespace's end of the /30
TAP_EGRESS_GUEST = "172.30.0.2"
TAP_EGRESS_PREFIX = 30


def tap_egress(holder_pid: int) -> str:
    """In the network namespace of `holder_pid`, which slirp4netns serves through tap0: a
    TAP device (returned) whose /30 is NATed out through tap0. The guest behind it then
    reaches what slirp4netns reaches — never the host's loopback (`--disable-host-loopback`)
    — and the namespace itself listens on nothing. Gone with the namespace."""
    tools = {name: which(name) for name in ("ip", "sysctl", "iptables")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        raise BackendUnavailable(f"egress through a TAP device needs {', '.join(missing)} "
                                 "(apt install iproute2 procps iptables)")
    inside = enter_netns(holder_pid)
    ip, sysctl, iptables = (str(tools[n]) for n in ("ip", "sysctl", "iptables"))
    subnet = f"{TAP_EGRESS_HOST.rsplit('.', 1)[0]}.0/{TAP_EGRESS_PREFIX}"
    steps = [
        [ip, "tuntap", "add", "dev", TAP_EGRESS_DEV, "mode", "tap"],
        [ip, "addr", "add", f"{TAP_EGRESS_HOST}/{TAP_EGRESS_PREFIX}", "dev", TAP_EGRESS_DEV],
        [ip, "link", "set", TAP_EGRESS_DEV, "up"],
        [sysctl, "-qw", "net.ipv4.ip_forward=1"],  # this namespace's own switch
        [iptables, "-t", "nat", "-A", "POSTROUTING", "-s", subnet, "-o", SLIRP_DEV,
         "-j", "MASQUERADE"],
    ]
    for step in steps:
        run_setup([*inside, *step], f"egress TAP set-up failed at `{' '.join(step[1:4])}`")
    return TAP_EGRESS_DEV


def run_setup(argv: list[str], what: str) -> None:
    """Run one network set-up command; SandboxError naming `what` and its stderr if it fails."""
    out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    if out.returncode != 0:
        raise SandboxError(f"{what}: {out.stderr.strip() or out.returncode}")
