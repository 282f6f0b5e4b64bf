"""Firecracker: the VM config file and API requests for one guest, and the vsock handshake."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .qemu import FAST, HARDENED, QUIET, Drive

AGENT_VSOCK_PORT = 1024  # the guest agent listens here (--vsock-listen)
GUEST_CID = 3  # the first CID a guest may have
ROOT_DRIVE = "akroot"


def firecracker_binary() -> str | None:
    return shutil.which("firecracker")


def jailer_binary() -> str | None:
    return shutil.which("jailer")


@dataclass
class FirecrackerVm:
    """One Firecracker guest. Firecracker has no file sharing: the project is copied in."""

    kernel: Path
    initrd: Path
    agent_args: list[str]
    vcpus: int
    memory_mb: int
    vsock_uds: Path
    drives: list[Drive] = field(default_factory=list)
    tap: str | None = None  # a TAP device for the guest's eth0 (needs CAP_NET_ADMIN to make)
    guest_mac: str = "06:00:0a:00:02:0f"
    serial_log: Path | None = None

    def boot_args(self) -> str:
        # Firecracker resets the guest through the i8042 controller: reboot=k makes the
        # guest's reboot(2) (our agent's --poweroff) end the Firecracker process.
        parts = ["console=ttyS0", "reboot=k", "pci=off", *QUIET, *HARDENED, *FAST]
        return " ".join([*parts, "--", *self.agent_args])

    # ---- the pieces, each one a request body of the API ----

    def boot_source(self) -> dict[str, Any]:
        return {"kernel_image_path": str(self.kernel), "initrd_path": str(self.initrd),
                "boot_args": self.boot_args()}

    def drive_bodies(self) -> list[dict[str, Any]]:
        # No drive is the root device: our initramfs mounts the root disk itself.
        return [{"drive_id": d.serial, "path_on_host": str(d.path), "is_root_device": False,
                 "is_read_only": d.readonly, "cache_type": "Unsafe", "io_engine": "Sync"}
                for d in self.drives]

    def machine_config(self) -> dict[str, Any]:
        vcpus = max(1, min(32, self.vcpus))
        if vcpus > 1 and vcpus % 2:
            vcpus += 1  # Firecracker wants 1 or an even number
        return {"vcpu_count": vcpus, "mem_size_mib": max(128, self.memory_mb), "smt": False,
                "track_dirty_pages": False}

    def vsock(self) -> dict[str, Any]:
        return {"guest_cid": GUEST_CID, "uds_path": str(self.vsock_uds)}

    def network_interfaces(self) -> list[dict[str, Any]]:
        if self.tap is None:
            return []
        return [{"iface_id": "eth0", "host_dev_name": self.tap, "guest_mac": self.guest_mac}]

    def config_file(self) -> dict[str, Any]:
        """The whole VM as `firecracker --config-file` reads it (a FullVmConfiguration)."""
        doc: dict[str, Any] = {
            "boot-source": self.boot_source(),
            "drives": self.drive_bodies(),
            "machine-config": self.machine_config(),
            "vsock": self.vsock(),
            "network-interfaces": self.network_interfaces(),
            "entropy": {},
        }
        return doc

    def api_requests(self) -> list[tuple[str, str, dict[str, Any]]]:
        """The same VM as a sequence of API calls (method, path, body), ending in the start."""
        calls: list[tuple[str, str, dict[str, Any]]] = [
            ("PUT", "/boot-source", self.boot_source()),
            ("PUT", "/machine-config", self.machine_config()),
        ]
        calls += [("PUT", f"/drives/{d['drive_id']}", d) for d in self.drive_bodies()]
        calls.append(("PUT", "/vsock", self.vsock()))
        calls += [("PUT", f"/network-interfaces/{n['iface_id']}", n)
                  for n in self.network_interfaces()]
        calls.append(("PUT", "/entropy", {}))
        calls.append(("PUT", "/actions", {"action_type": "InstanceStart"}))
        return calls

    # ---- snapshots (the counterpart of vm/snapshot.py for QEMU) ----

    def snapshot_create_requests(self, snapshot_path: Path, mem_path: Path,
                                 ) -> list[tuple[str, str, dict[str, Any]]]:
        """Pause the running template and write its state and memory (a full snapshot)."""
        return [("PATCH", "/vm", {"state": "Paused"}),
                ("PUT", "/snapshot/create", {"snapshot_path": str(snapshot_path),
                                             "mem_file_path": str(mem_path),
                                             "snapshot_type": "Full"})]

    def snapshot_load_requests(self, snapshot_path: Path, mem_path: Path,
                               slots: frozenset[str] = frozenset(),
                               ) -> list[tuple[str, str, dict[str, Any]]]:
        """Start this VM (a fresh Firecracker process, nothing configured) from a snapshot.

        Host-side paths that differ per clone are overridden: the vsock unix socket, the TAP
        device, and the drives named in `slots` (per-sandbox disks, re-pointed before the
        guest runs). The guest then gets its identity through the agent's CLONE request.
        """
        load: dict[str, Any] = {
            "snapshot_path": str(snapshot_path),
            "mem_backend": {"backend_type": "File", "backend_path": str(mem_path)},
            "resume_vm": False,
            "vsock_override": {"uds_path": str(self.vsock_uds)},
        }
        if self.tap is not None:
            load["network_overrides"] = [{"iface_id": "eth0", "host_dev_name": self.tap}]
        calls: list[tuple[str, str, dict[str, Any]]] = [("PUT", "/snapshot/load", load)]
        calls += [("PATCH", f"/drives/{d.serial}", {"drive_id": d.serial,
                                                    "path_on_host": str(d.path)})
                  for d in self.drives if d.serial in slots]
        calls.append(("PATCH", "/vm", {"state": "Resumed"}))
        return calls

    def argv(self, firecracker: str, config: Path, api_sock: Path) -> list[str]:
        # Firecracker's own seccomp filters stay on (its default).
        return [firecracker, "--api-sock", str(api_sock), "--config-file", str(config),
                "--level", "Warning"]


def write_config(vm: FirecrackerVm, path: Path) -> Path:
    path.write_text(json.dumps(vm.config_file(), indent=2))
    return path


MAX_API_HEAD = 16 * 1024  # bytes of an API response's status line and headers
MAX_API_BODY = 1024 * 1024  # bytes of its body (Firecracker's are small JSON errors)


def api_call(api_sock: Path, method: str, path: str, body: dict[str, Any],
             timeout: float = 5.0) -> tuple[int, bytes]:
    """One HTTP/1.1 request on Firecracker's API socket (no HTTP library needed).

    The whole exchange has `timeout` seconds and the response is read to MAX_API_HEAD and
    MAX_API_BODY at most: a stalled or babbling socket ends the call (ConnectionError or
    TimeoutError) instead of holding the caller or its memory."""
    payload = json.dumps(body).encode()
    head = (f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n")
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(api_sock))
        s.sendall(head.encode() + payload)
        data = b""
        while b"\r\n\r\n" not in data:
            if len(data) > MAX_API_HEAD:
                raise ConnectionError(f"Firecracker's API response head is over "
                                      f"{MAX_API_HEAD} bytes")
            chunk = _recv_by(s, deadline, MAX_API_HEAD + 4 - len(data))
            if not chunk:
                break
            data += chunk
        header, _, rest = data.partition(b"\r\n\r\n")
        status, length = _parse_head(header)
        while len(rest) < length:
            chunk = _recv_by(s, deadline, length - len(rest))
            if not chunk:
                break
            rest += chunk
    return status, rest[:length] if length else rest


def _recv_by(s: socket.socket, deadline: float, most: int) -> bytes:
    """At most `most` bytes from `s`, waiting no later than `deadline` (monotonic)."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("Firecracker's API did not answer in time")
    s.settimeout(left)
    return s.recv(max(1, min(65536, most)))


def _parse_head(header: bytes) -> tuple[int, int]:
    """The status and Content-Length of a response head (a length over MAX_API_BODY, or
    one that is not a number, is refused)."""
    status_line = header.split(b"\r\n", 1)[0].split()
    status = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else 0
    length = 0
    for line in header.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            if not value.strip().isdigit() or int(value.strip()) > MAX_API_BODY:
                raise ConnectionError(f"Firecracker's API response has a bad length: "
                                      f"{value.strip()[:32]!r}")
            length = int(value.strip())
    return status, length


def connect_vsock(uds: Path, port: int, timeout: float,
                  proc: subprocess.Popen[bytes] | None = None) -> socket.socket:
    """Open a stream to the guest's vsock `port` through Firecracker's unix socket.

    The handshake is one line each way: we send ``CONNECT <port>\\n``, Firecracker answers
    ``OK <host port>\\n`` once the guest accepted. Until the guest listens it hangs up, so
    retry until the deadline.
    """
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ConnectionError(f"Firecracker exited with status {proc.returncode}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(max(0.1, min(2.0, deadline - time.monotonic())))
            s.connect(str(uds))
            s.sendall(f"CONNECT {port}\n".encode())
            line = b""
            while not line.endswith(b"\n"):
                chunk = s.recv(1)
                if not chunk:
                    break
                line += chunk
            if line.startswith(b"OK "):
                s.settimeout(None)
                return s
            last = line.decode(errors="replace").strip() or "connection closed"
        except OSError as exc:
            last = str(exc)
        s.close()
        time.sleep(0.02)
    raise TimeoutError(f"guest vsock port {port} did not accept within {timeout:.0f} s ({last})")


def agent_args(module_args: list[str], *, root_serial: str, rw: str | None,
               hostname: str) -> list[str]:
    """The guest agent's command line under Firecracker: vsock instead of virtio-serial."""
    args = ["--mount-basics", *module_args, "--root", root_serial]
    if rw:
        args += ["--rw", rw]
    return [*args, "--net", "lo", "--hostname", hostname,
            "--vsock-listen", str(AGENT_VSOCK_PORT), "--poweroff"]


def can_make_tap() -> bool:
    """TAP devices for Firecracker networking need CAP_NET_ADMIN and /dev/net/tun."""
    return os.geteuid() == 0 and os.path.exists("/dev/net/tun")
