"""MicroVM pieces that need no guest: LZ4, cpio, kernel modules, QEMU argv, accelerator choice."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest

from agentkernel.backends.microvm import choose_accel, module_args
from agentkernel.vm import lz4
from agentkernel.vm.initramfs import Entry, read_newc, write_newc
from agentkernel.vm.kernel import KernelError, extract_vmlinux, module_load_order
from agentkernel.vm.qemu import Drive, VmConfig, build_argv
from agentkernel.vm.settings import MicrovmSettings


@pytest.mark.skipif(shutil.which("lz4") is None, reason="needs the lz4 tool to compress")
def test_lz4_legacy_roundtrip(tmp_path: Path) -> None:
    data = (b"agentkernel " * 50000) + bytes(range(256)) * 400 + b"tail"
    out = subprocess.run(["lz4", "-l", "-c", "-9"], input=data, capture_output=True,
                         check=True).stdout
    assert lz4.decode_legacy(out + len(data).to_bytes(4, "little")) == data


def test_lz4_rejects_garbage() -> None:
    with pytest.raises(lz4.LZ4Error):
        lz4.decode_legacy(b"not lz4 at all")
    bad = lz4.LEGACY_MAGIC.to_bytes(4, "little") + (3).to_bytes(4, "little") + b"\xf0\x00\x00"
    with pytest.raises(lz4.LZ4Error):
        lz4.decode_legacy(bad)


def test_lz4_overlapping_match() -> None:
    out = bytearray()
    # literal "ab", then a match of 10 at offset 2: "abababababab"
    lz4.decode_block(bytes([0x26]) + b"ab" + (2).to_bytes(2, "little"), out)
    assert bytes(out) == b"ab" * 6


def test_bzimage_without_header_is_refused() -> None:
    with pytest.raises(KernelError):
        extract_vmlinux(b"\0" * 4096)


def test_newc_roundtrip() -> None:
    entries = [Entry("/dev", 0o40755), Entry("/dev/console", 0o20600, rdev=(5, 1)),
               Entry("/init", 0o100755, b"\x7fELF" + b"x" * 13)]
    parsed = read_newc(write_newc(entries))
    assert set(parsed) == {"/dev", "/dev/console", "/init"}
    assert parsed["/init"].data == entries[2].data
    assert parsed["/dev/console"].rdev == (5, 1)


def _fake_module(path: Path, name: str, depends: str) -> Path:
    path.write_bytes(b"\0junk\0name=" + name.encode() + b"\0depends=" + depends.encode() + b"\0")
    return path


def test_module_order_follows_modinfo(tmp_path: Path) -> None:
    index = {n: _fake_module(tmp_path / f"{n}.ko", n, d) for n, d in
             [("virtio_ring", ""), ("virtio", "virtio_ring"),
              ("virtio_mmio", "virtio,virtio_ring"), ("virtio_console", "virtio,virtio_ring")]}
    order = module_load_order(index, ("virtio_console", "virtio_mmio"))
    assert order == ["virtio_ring", "virtio", "virtio_console", "virtio_mmio"]
    with pytest.raises(KernelError):
        module_load_order(index, ("virtio_net",))


def test_init_gets_few_arguments() -> None:
    # The kernel hands init at most 32 arguments: the module list travels as one.
    mods = ["virtio_ring", "virtio", "virtio_mmio", "virtio_console", "virtio_blk", "overlay",
            "failover", "net_failover", "virtio_net", "virtio_rng", "vsock"]
    args = module_args(mods, net=True)
    assert len(args) == 2 and "/m/virtio_net.ko" in args[1]
    assert "/m/virtio_net.ko" not in module_args(mods, net=False)[1]
    assert "/m/vsock.ko" not in args[1]


def _cfg(tmp_path: Path, accel: str) -> VmConfig:
    return VmConfig(kernel=tmp_path / "vmlinux", initrd=tmp_path / "initrd", accel=accel,  # type: ignore[arg-type]
                    vcpus=2, memory_mb=300, serial_log=tmp_path / "console.log",
                    agent_socket=tmp_path / "agent.sock",
                    drives=[Drive(tmp_path / "root.ext4", "akroot", readonly=True)],
                    agent_args=["--vport", "agent"])


def test_qemu_argv_under_tcg(tmp_path: Path) -> None:
    argv = build_argv("/usr/bin/qemu-system-x86_64", _cfg(tmp_path, "tcg"))
    joined = " ".join(argv)
    assert argv[1:5] == ["-M", "microvm", "-accel", "tcg"]
    assert "-cpu max" in joined and "-nodefaults" in argv and "-no-user-config" in argv
    assert "-no-reboot" in argv and "-smp 2" in joined and "-m 300M" in joined
    cmdline = argv[argv.index("-append") + 1]
    assert "tsc=reliable" in cmdline and "quiet" in cmdline and "panic=-1" in cmdline
    assert cmdline.endswith("-- --vport agent")
    sandbox = argv[argv.index("-sandbox") + 1]
    assert sandbox.startswith("on,") and "spawn=deny" in sandbox
    assert "readonly=on" in joined and "serial=akroot" in joined
    assert "-netdev" not in argv  # no network unless asked


def test_qemu_argv_under_kvm(tmp_path: Path) -> None:
    argv = build_argv("/usr/bin/qemu-system-x86_64", _cfg(tmp_path, "kvm"))
    assert "kvm" in argv and "-cpu" in argv and argv[argv.index("-cpu") + 1] == "host"
    assert "tsc=reliable" not in argv[argv.index("-append") + 1]


def test_no_emulation_unless_allowed() -> None:
    accel, why = choose_accel(MicrovmSettings(allow_emulation=False))
    if accel == "kvm":
        pytest.skip("this host has a KVM that boots standard guests")
    assert accel is None and "allow_emulation" in why
    accel, why = choose_accel(MicrovmSettings(allow_emulation=True, source="test"))
    assert accel == "tcg" and "TCG" in why


def test_auto_skips_microvm_without_emulation(monkeypatch: pytest.MonkeyPatch) -> None:
    from agentkernel.backends import choose_backend
    from agentkernel.backends.microvm import choose_accel as real

    monkeypatch.setenv("AGENTKERNEL_MICROVM_ALLOW_EMULATION", "0")
    if real(MicrovmSettings())[0] == "kvm":
        pytest.skip("this host has a KVM that boots standard guests")
    try:
        backend = choose_backend("auto")
    except Exception:  # no backend at all on this host
        return
    assert backend.name != "microvm"


def test_initramfs_is_gzip_cpio(tmp_path: Path) -> None:
    from agentkernel.vm.initramfs import entries_for
    from agentkernel.vm.kernel import KernelInfo

    mod = tmp_path / "m"
    mod.mkdir()
    (mod / "virtio.ko").write_bytes(b"module")
    agent = tmp_path / "agent"
    agent.write_bytes(b"\x7fELFagent")
    info = KernelInfo(release="r", source="test", package_version="1",
                      vmlinux=str(tmp_path / "vmlinux"), modules=["virtio"],
                      module_dir=str(mod))
    blob = gzip.compress(write_newc(entries_for(info, agent)))
    parsed = read_newc(gzip.decompress(blob))
    assert parsed["/init"].data == b"\x7fELFagent" and parsed["/init"].mode & 0o111
    assert parsed["/m/virtio.ko"].data == b"module"
    assert "/dev/console" in parsed


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs e2fsprogs")
def test_image_tree_becomes_a_cached_ext4(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          ) -> None:
    from agentkernel.rootfs import tree_rootfs
    from agentkernel.vm.disk import ensure_root_image, tree_root

    monkeypatch.setenv("AGENTKERNEL_HOME", str(tmp_path / "home"))
    tree = tmp_path / "rootfs"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os-release").write_text("ID=test\n")
    (tree / "bin").mkdir()
    rootfs = tree_rootfs(tree, "example:1")
    assert tree_root(rootfs) == tree
    image, desc = ensure_root_image(rootfs)
    assert "example:1" in desc
    with open(image, "rb") as f:
        f.seek(1080)
        assert f.read(2) == b"\x53\xef"  # the ext4 superblock magic
    again, _ = ensure_root_image(rootfs)
    assert again == image


def test_clone_payload_is_validated_on_the_host() -> None:
    from agentkernel.agent.protocol import Tag, decode_tlvs, encode_clone

    payload = encode_clone(b"r" * 32, hostname="clone-1.example", wallclock_ns=5,
                           disks=[("akwork", "/workspace", False)])
    tags = dict(decode_tlvs(payload))
    assert tags[Tag.HOSTNAME] == b"clone-1.example"
    assert tags[Tag.DISK] == b"akwork:/workspace:rw"
    for kwargs in ({"hostname": "bad name"}, {"hostname": "-x"}, {"hostname": "a" * 65},
                   {"disks": [("akwork", "rel", True)]}, {"disks": [("a:b", "/x", True)]},
                   {"disks": [("akwork", "/a/../b", True)]}):
        with pytest.raises(ValueError):
            encode_clone(b"r" * 32, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        encode_clone(b"short")


def test_snapshot_key_covers_shape_not_paths(tmp_path: Path) -> None:
    import dataclasses

    from agentkernel.vm.snapshot import template_key

    def cfg(scratch: Path, **kw: object) -> VmConfig:
        base = VmConfig(kernel=tmp_path / "vmlinux", initrd=tmp_path / "initrd", accel="tcg",
                        agent_args=["--root", "akroot"], vcpus=1, memory_mb=512,
                        serial_log=scratch / "console.log", agent_socket=scratch / "a.sock",
                        drives=[Drive(tmp_path / "root.ext4", "akroot", True),
                                Drive(scratch / "ws.ext4", "akwork", False)])
        return dataclasses.replace(base, **kw)  # type: ignore[arg-type]

    slots = frozenset({"akwork"})
    key = template_key("/usr/bin/qemu-system-x86_64", cfg(tmp_path / "a"), slots)
    assert key == template_key("/usr/bin/qemu-system-x86_64", cfg(tmp_path / "b"), slots)
    assert key != template_key("/usr/bin/qemu-system-x86_64", cfg(tmp_path / "a",
                                                                   memory_mb=1024), slots)
    assert key != template_key("/usr/bin/qemu-system-x86_64", cfg(tmp_path / "a", net="user"),
                               slots)
    # A project disk that is not a slot (attached by path) is part of the shape.
    assert key != template_key("/usr/bin/qemu-system-x86_64", cfg(tmp_path / "a"),
                               frozenset())


@pytest.mark.parametrize("accel", ["tcg", "kvm"])
def test_qemu_argv_for_aarch64(tmp_path: Path, accel: str) -> None:
    import dataclasses

    cfg = dataclasses.replace(_cfg(tmp_path, accel), arch="aarch64", net="user",
                              kernel=tmp_path / "Image")
    argv = build_argv("/usr/bin/qemu-system-aarch64", cfg)
    assert argv[0].endswith("qemu-system-aarch64")
    machine = argv[argv.index("-M") + 1]
    assert machine == ("virt,gic-version=3" if accel == "tcg" else "virt,gic-version=host")
    assert argv[argv.index("-cpu") + 1] == ("max" if accel == "tcg" else "host")
    assert argv[argv.index("-kernel") + 1].endswith("/Image")
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert {"virtio-rng-pci", "virtio-serial-pci", "virtserialport,chardev=agent,name=agent",
            "virtio-net-pci,netdev=n0"} <= set(devices)
    assert any(d.startswith("virtio-blk-pci,") and "serial=akroot" in d for d in devices)
    assert not any(d.endswith("-device") or "-device," in d for d in devices)  # no mmio names
    cmdline = argv[argv.index("-append") + 1]
    assert cmdline.startswith("console=ttyAMA0 ") and "ttyS0" not in cmdline
    for x86 in ("reboot=t", "vsyscall", "i8042", "8250.", "tsc"):
        assert x86 not in cmdline
    assert "panic=-1" in cmdline and cmdline.endswith("-- --vport agent")


def test_qemu_argv_arch_follows_the_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agentkernel.vm import qemu

    monkeypatch.setattr(qemu.platform, "machine", lambda: "aarch64")
    assert qemu.host_arch() == "aarch64" and _cfg(tmp_path, "tcg").arch == "aarch64"
    monkeypatch.setattr(qemu.platform, "machine", lambda: "x86_64")
    cfg = _cfg(tmp_path, "tcg")
    assert cfg.arch == "x86_64"
    assert build_argv("/usr/bin/qemu-system-x86_64", cfg)[1:3] == ["-M", "microvm"]


def test_snapshot_setting_from_config_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from agentkernel.config import MicrovmSection
    from agentkernel.vm import settings

    assert MicrovmSection().snapshot is False
    monkeypatch.delenv(settings.ENV_SNAPSHOT, raising=False)
    try:
        settings.configure(MicrovmSection(snapshot=True))
        assert settings.current().snapshot is True
        monkeypatch.setenv(settings.ENV_SNAPSHOT, "0")
        assert settings.current().snapshot is False
    finally:
        settings.configure(None)
