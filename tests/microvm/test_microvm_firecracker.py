"""Firecracker: every config and API request we generate validates against its v1.17 schema."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from agentkernel.vm import firecracker as fc
from agentkernel.vm.qemu import Drive

jsonschema = pytest.importorskip("jsonschema")

# Firecracker's published API description (v1.17): the reference copy in shared/spec beside
# the checkout (CI lays it there), or wherever AGENTKERNEL_FIRECRACKER_SPEC points.
SPEC = Path(os.environ.get("AGENTKERNEL_FIRECRACKER_SPEC") or
            Path(__file__).resolve().parents[3] / "shared" / "spec" / "firecracker-api.yaml")


@pytest.fixture(scope="module")
def api() -> dict[str, Any]:
    if not SPEC.is_file():
        pytest.skip(f"{SPEC} is not here")
    doc: dict[str, Any] = yaml.safe_load(SPEC.read_text())
    return doc


def _validate(api: dict[str, Any], definition: str, body: Any) -> None:
    # Swagger 2.0 definitions are JSON Schema (draft 4) with refs into #/definitions.
    schema = {"$ref": f"#/definitions/{definition}", "definitions": api["definitions"]}
    jsonschema.Draft4Validator(schema).validate(body)


def _body_definition(api: dict[str, Any], method: str, path: str) -> str:
    """The schema the API declares for the body of `method path` (path params matched)."""
    for template, ops in api["paths"].items():
        parts, want = template.strip("/").split("/"), path.strip("/").split("/")
        if len(parts) != len(want):
            continue
        pairs = zip(parts, want, strict=True)
        if all(p == w or (p.startswith("{") and p.endswith("}")) for p, w in pairs):
            op = ops[method.lower()]
            body = next(p for p in op["parameters"] if p["in"] == "body")
            ref: str = body["schema"]["$ref"]
            return ref.rsplit("/", 1)[-1]
    raise AssertionError(f"{method} {path} is not in the Firecracker API")


def _vm(tmp_path: Path, *, tap: str | None = "tap-ak0") -> fc.FirecrackerVm:
    args = fc.agent_args(["--insmod", "/m/virtio_mmio.ko"], root_serial="akroot", rw="tmpfs",
                         hostname="agentkernel")
    return fc.FirecrackerVm(
        kernel=tmp_path / "vmlinux", initrd=tmp_path / "initrd.cpio.gz", agent_args=args,
        vcpus=3, memory_mb=512, vsock_uds=tmp_path / "vsock.sock",
        drives=[Drive(tmp_path / "root.ext4", "akroot", readonly=True),
                Drive(tmp_path / "work.ext4", "akwork", readonly=False)],
        tap=tap)


def test_config_file_is_a_full_vm_configuration(api: dict[str, Any], tmp_path: Path) -> None:
    vm = _vm(tmp_path)
    doc = vm.config_file()
    _validate(api, "FullVmConfiguration", doc)
    assert doc["machine-config"]["vcpu_count"] == 4  # 1 or even
    assert "--vsock-listen" in doc["boot-source"]["boot_args"]
    assert "reboot=k" in doc["boot-source"]["boot_args"]
    assert all(not d["is_root_device"] for d in doc["drives"])
    path = fc.write_config(vm, tmp_path / "vm.json")
    import json

    assert json.loads(path.read_text()) == doc


@pytest.mark.parametrize("tap", ["tap-ak0", None])
def test_every_api_request_validates(api: dict[str, Any], tmp_path: Path,
                                     tap: str | None) -> None:
    calls = _vm(tmp_path, tap=tap).api_requests()
    assert calls[-1] == ("PUT", "/actions", {"action_type": "InstanceStart"})
    assert any(path == "/vsock" for _, path, _ in calls)
    assert any(path.startswith("/network-interfaces/") for _, path, _ in calls) == bool(tap)
    for method, path, body in calls:
        _validate(api, _body_definition(api, method, path), body)


def test_schema_check_catches_a_bad_body(api: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        _validate(api, "MachineConfiguration", {"vcpu_count": 0, "mem_size_mib": 128})
    with pytest.raises(jsonschema.ValidationError):
        _validate(api, "Vsock", {"guest_cid": 2, "uds_path": "/x"})


def _fake_firecracker_vsock(path: Path, accept_after: int) -> threading.Thread:
    """A unix server that hangs up on the first CONNECTs, then answers OK and echoes."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(8)

    def run() -> None:
        for attempt in range(accept_after + 1):
            conn, _ = srv.accept()
            line = b""
            while not line.endswith(b"\n"):
                line += conn.recv(1)
            assert line == b"CONNECT 1024\n"
            if attempt < accept_after:
                conn.close()  # the guest is not listening yet
                continue
            conn.sendall(b"OK 1073741824\n")
            conn.sendall(conn.recv(100))
            conn.close()
        srv.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_vsock_handshake_retries_until_the_guest_listens(tmp_path: Path) -> None:
    uds = tmp_path / "v.sock"
    t = _fake_firecracker_vsock(uds, accept_after=2)
    s = fc.connect_vsock(uds, fc.AGENT_VSOCK_PORT, timeout=10)
    s.sendall(b"ping")
    assert s.recv(100) == b"ping"
    s.close()
    t.join(5)


def test_vsock_handshake_times_out(tmp_path: Path) -> None:
    with pytest.raises(TimeoutError):
        fc.connect_vsock(tmp_path / "missing.sock", 1024, timeout=0.3)


def test_api_call_speaks_http_on_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = srv.accept()
        got.append(conn.recv(65536))
        conn.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    status, body = fc.api_call(path, "PUT", "/actions", {"action_type": "InstanceStart"})
    t.join(5)
    srv.close()
    assert status == 204 and body == b""
    assert got[0].startswith(b"PUT /actions HTTP/1.1\r\n")
    assert got[0].endswith(b'{"action_type": "InstanceStart"}')


def _answering(path: Path, answer: Callable[[socket.socket, threading.Event], None],
               ) -> tuple[threading.Thread, threading.Event, socket.socket]:
    """A one-connection API socket at `path` whose reply is `answer` (until the event)."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    stop = threading.Event()

    def serve() -> None:
        conn, _ = srv.accept()
        with conn, contextlib.suppress(OSError):
            conn.recv(65536)
            answer(conn, stop)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t, stop, srv


def _endless_head(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    while not stop.is_set():
        conn.sendall(b"X-Padding: " + b"a" * 4000 + b"\r\n")


def _dripping_head(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    while not stop.wait(0.02):
        conn.sendall(b"X")  # always a byte before any one read's timeout, never the end


def _huge_length(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n{}")
    stop.wait(30)


@pytest.mark.parametrize(("answer", "error"), [(_endless_head, ConnectionError),
                                              (_dripping_head, TimeoutError),
                                              (_huge_length, ConnectionError)])
def test_api_call_reads_a_bounded_response(
        tmp_path: Path, answer: Callable[[socket.socket, threading.Event], None],
        error: type[Exception]) -> None:
    """A response head that never ends, one that drips in forever, and a body said to be
    huge each end the call: the read is bounded in size and in time."""
    path = tmp_path / "api.sock"
    t, stop, srv = _answering(path, answer)
    try:
        with pytest.raises(error):
            fc.api_call(path, "PUT", "/actions", {"action_type": "InstanceStart"},
                        timeout=1.0)
    finally:
        stop.set()
        t.join(5)
        srv.close()


@pytest.mark.parametrize("tap", ["tap-ak0", None])
def test_snapshot_requests_validate(api: dict[str, Any], tmp_path: Path,
                                    tap: str | None) -> None:
    vm = _vm(tmp_path, tap=tap)
    create = vm.snapshot_create_requests(tmp_path / "vm.state", tmp_path / "vm.mem")
    assert [c[:2] for c in create] == [("PATCH", "/vm"), ("PUT", "/snapshot/create")]
    load = vm.snapshot_load_requests(tmp_path / "vm.state", tmp_path / "vm.mem",
                                     slots=frozenset({"akwork"}))
    assert load[0][:2] == ("PUT", "/snapshot/load") and load[0][2]["resume_vm"] is False
    assert load[0][2]["vsock_override"] == {"uds_path": str(tmp_path / "vsock.sock")}
    assert ("network_overrides" in load[0][2]) == bool(tap)
    assert ("PATCH", "/drives/akwork", {"drive_id": "akwork",
                                        "path_on_host": str(tmp_path / "work.ext4")}) in load
    assert load[-1] == ("PATCH", "/vm", {"state": "Resumed"})
    for method, path, body in create + load:
        _validate(api, _body_definition(api, method, path), body)


def test_vsock_handshake_gives_up_when_firecracker_exits(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(ConnectionError):
        fc.connect_vsock(tmp_path / "v.sock", 1024, timeout=10, proc=proc)


def test_tap_names_and_addresses() -> None:
    from agentkernel.backends.microvm_fc import tap_addresses, tap_name

    name = tap_name("a-very-long-sandbox-name-indeed")
    assert len(name) <= 15 and name.startswith("akfc")
    host, guest = tap_addresses(name)
    assert host.startswith("172.31.") and guest.startswith("172.31.")
    assert int(host.rsplit(".", 1)[1]) % 4 == 1 and int(guest.rsplit(".", 1)[1]) % 4 == 2


@pytest.mark.skipif(not fc.can_make_tap(), reason="needs CAP_NET_ADMIN and /dev/net/tun")
def test_tap_device_is_made_and_removed() -> None:
    from agentkernel.backends.microvm_fc import make_tap, tap_addresses, tap_name

    name = tap_name(f"fc-tap-test-{os.getpid()}")
    undo = make_tap(name)
    try:
        assert Path(f"/sys/class/net/{name}").exists()
        import subprocess

        out = subprocess.run(["ip", "-4", "addr", "show", "dev", name], capture_output=True,
                             text=True, check=True).stdout
        assert f"{tap_addresses(name)[0]}/30" in out
    finally:
        undo()
    assert not Path(f"/sys/class/net/{name}").exists()


def test_vmm_firecracker_without_binary_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from agentkernel.backends.microvm import MicrovmBackend
    from agentkernel.errors import BackendUnavailable
    from agentkernel.profiles import get_profile
    from agentkernel.rootfs import host_rootfs
    from agentkernel.sandbox import SandboxSpec
    from agentkernel.vm.settings import doctor_lines

    if fc.firecracker_binary() is not None:
        pytest.skip("a firecracker binary is installed here")
    monkeypatch.setenv("AGENTKERNEL_MICROVM_VMM", "firecracker")
    spec = SandboxSpec(name=f"fc-missing-{os.getpid()}", profile=get_profile("restrictive"),
                       rootfs=host_rootfs(), image="busybox")
    with pytest.raises(BackendUnavailable, match="firecracker is not on PATH"):
        MicrovmBackend().start(spec)
    line = next(entry for entry in doctor_lines() if entry[0] == "firecracker")
    assert line[1] is False and "not on PATH" in line[2]


def test_firecracker_refuses_a_modular_kernel(microvm_ready: None, tmp_path: Path) -> None:
    # The Debian cloud kernel loads virtio-mmio as a module without command-line devices,
    # so Firecracker's devices would be invisible: refused before anything starts.
    from agentkernel.backends.microvm_fc import start_firecracker
    from agentkernel.errors import BackendUnavailable
    from agentkernel.profiles import get_profile
    from agentkernel.rootfs import host_rootfs
    from agentkernel.sandbox import SandboxSpec
    from agentkernel.vm.settings import current

    spec = SandboxSpec(name=f"fc-kernel-{os.getpid()}", profile=get_profile("restrictive"),
                       rootfs=host_rootfs(), image="busybox")
    with pytest.raises(BackendUnavailable, match="virtio-mmio built in"):
        start_firecracker("microvm", spec, current(), str(tmp_path / "firecracker"))
