"""The guest kernel: fetch Debian's cloud kernel, unpack its ELF vmlinux and modules, cache them."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import AgentKernelError
from ..paths import data_dir
from .lz4 import LEGACY_MAGIC, decode_legacy

CLOUD_META_PACKAGE = "linux-image-cloud-amd64"
ELF_MAGIC = b"\x7fELF"

# What a guest needs from a modular kernel, by module name; dependencies are added from
# each module's own modinfo, so the order here does not matter.
GUEST_MODULES = (
    "virtio_mmio", "virtio_console", "virtio_blk", "overlay", "virtio_net", "virtio_rng",
    "vmw_vsock_virtio_transport",
)


class KernelError(AgentKernelError):
    """The guest kernel could not be fetched, unpacked or found."""


@dataclass
class KernelInfo:
    """A prepared guest kernel: an ELF vmlinux plus the modules an initramfs must load."""

    release: str  # `uname -r` inside the guest
    source: str  # "debian-cloud", "minimal" or "custom"
    package_version: str
    vmlinux: str
    modules: list[str] = field(default_factory=list)  # names, in load order
    module_dir: str = ""  # holds <name>.ko for each of `modules`

    @property
    def directory(self) -> Path:
        return Path(self.vmlinux).parent

    def module_path(self, name: str) -> Path:
        return Path(self.module_dir) / f"{name}.ko"

    def save(self) -> None:
        (self.directory / "kernel.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: Path) -> KernelInfo | None:
        try:
            doc = json.loads((directory / "kernel.json").read_text())
            info = cls(**doc)
        except (OSError, ValueError, TypeError):
            return None
        if not Path(info.vmlinux).is_file():
            return None
        if any(not info.module_path(m).is_file() for m in info.modules):
            return None
        return info


def kernels_dir() -> Path:
    return data_dir() / "microvm" / "kernels"


def selected_file() -> Path:
    return data_dir() / "microvm" / "kernel.json"


def current_kernel(override: str | None = None) -> KernelInfo | None:
    """The kernel `setup` selected (or `override`: a prepared dir or an ELF vmlinux)."""
    if override:
        path = Path(override).expanduser()
        if path.is_dir():
            return KernelInfo.load(path)
        if path.is_file() and is_elf(path):
            return KernelInfo(release="custom", source="custom", package_version="",
                              vmlinux=str(path))
        return None
    try:
        directory = Path(json.loads(selected_file().read_text())["dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return KernelInfo.load(directory)


def select(info: KernelInfo) -> None:
    selected_file().parent.mkdir(parents=True, exist_ok=True)
    tmp = selected_file().with_suffix(".tmp")
    tmp.write_text(json.dumps({"dir": str(info.directory)}))
    tmp.replace(selected_file())


def is_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == ELF_MAGIC


# ---- Debian package handling ----


def _apt(*argv: str, cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=600,
                             check=False, cwd=cwd)
    except FileNotFoundError:
        raise KernelError(f"{argv[0]} not found: this needs a Debian-family host "
                          "(or give a kernel with [microvm] kernel)") from None
    except subprocess.TimeoutExpired:
        raise KernelError(f"{' '.join(argv)} timed out") from None
    if out.returncode != 0:
        err = (out.stderr.strip().splitlines() or ["failed"])[-1]
        raise KernelError(f"{' '.join(argv)}: {err}")
    return out.stdout


def resolve_cloud_package(meta: str = CLOUD_META_PACKAGE) -> tuple[str, str]:
    """The concrete linux-image-<abi>-cloud-amd64 package the meta package points at, and
    its candidate version."""
    deps = _apt("apt-cache", "depends", meta)
    names = re.findall(r"Depends:\s+(linux-image-\S+)", deps)
    if not names:
        raise KernelError(f"{meta} depends on no linux-image package (apt-get update?)")
    package = names[0]
    policy = _apt("apt-cache", "policy", package)
    m = re.search(r"Candidate:\s+(\S+)", policy)
    if not m or m.group(1) == "(none)":
        raise KernelError(f"{package} has no installable version (apt-get update?)")
    return package, m.group(1)


def download_package(package: str, dest: Path) -> Path:
    """`apt-get download` (fetch only, nothing is installed) into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    _apt("apt-get", "download", "-q", package, cwd=dest)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        raise KernelError(f"apt-get download {package} produced no .deb")
    return debs[-1]


def _ar_members(path: Path) -> dict[str, tuple[int, int]]:
    """Offsets and sizes of the members of an `ar` archive (a .deb)."""
    members: dict[str, tuple[int, int]] = {}
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise KernelError(f"{path} is not a Debian package (no ar header)")
        while True:
            head = f.read(60)
            if len(head) < 60:
                break
            name = head[:16].decode("ascii", "replace").strip().rstrip("/")
            try:
                size = int(head[48:58].decode("ascii").strip())
            except ValueError:
                raise KernelError(f"{path}: corrupt ar member header") from None
            members[name] = (f.tell(), size)
            f.seek(size + (size & 1), os.SEEK_CUR)
    return members


def extract_deb(deb: Path, dest: Path, wanted: re.Pattern[str]) -> list[Path]:
    """Extract the regular files of the .deb's data archive whose path matches `wanted`."""
    members = _ar_members(deb)
    name = next((n for n in members if n.startswith("data.tar")), None)
    if name is None:
        raise KernelError(f"{deb} has no data.tar member")
    offset, size = members[name]
    with open(deb, "rb") as f:
        f.seek(offset)
        blob = f.read(size)
    if name.endswith(".zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise KernelError(f"{deb} is zstd-compressed: install zstd")
        blob = subprocess.run([zstd, "-dc"], input=blob, capture_output=True,
                              check=True).stdout
        name = name[:-4]
    elif name.endswith(".xz"):
        blob = lzma.decompress(blob)
    elif name.endswith(".gz"):
        blob = gzip.decompress(blob)
    out: list[Path] = []
    with tempfile.TemporaryFile() as tmp:
        tmp.write(blob)
        tmp.seek(0)
        with tarfile.open(fileobj=tmp, mode="r:") as tar:
            for member in tar:
                path = member.name.lstrip("./")
                if not member.isfile() or not wanted.search(path) or ".." in path.split("/"):
                    continue
                target = dest / path
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None
                with open(target, "wb") as f:
                    shutil.copyfileobj(src, f)
                out.append(target)
    return out


# ---- vmlinuz -> vmlinux ----


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """The ELF kernel inside a bzImage (QEMU boots an ELF vmlinux through PVH, much faster
    under emulation than running the bzImage decompressor)."""
    if vmlinuz[:4] == ELF_MAGIC:
        return vmlinuz
    if len(vmlinuz) < 0x250 or vmlinuz[0x202:0x206] != b"HdrS":
        raise KernelError("not a bzImage (no HdrS setup header)")
    setup_sects = vmlinuz[0x1F1] or 4
    pm_start = (setup_sects + 1) * 512
    payload_offset = int.from_bytes(vmlinuz[0x248:0x24C], "little")
    payload_length = int.from_bytes(vmlinuz[0x24C:0x250], "little")
    payload = vmlinuz[pm_start + payload_offset:pm_start + payload_offset + payload_length]
    if payload[:4] == LEGACY_MAGIC.to_bytes(4, "little"):
        elf = _lz4_tool(payload) or decode_legacy(payload)
    elif payload[:2] == b"\x1f\x8b":
        elf = gzip.decompress(payload[:-4] if len(payload) > 4 else payload)
    elif payload[:6] == b"\xfd7zXZ\x00":
        elf = lzma.decompress(payload, format=lzma.FORMAT_XZ)
    else:
        raise KernelError(f"unsupported kernel compression (payload starts {payload[:4].hex()})")
    if elf[:4] != ELF_MAGIC:
        raise KernelError("the decompressed kernel payload is not an ELF file")
    return elf


def _lz4_tool(payload: bytes) -> bytes | None:
    """`lz4 -d` when it is installed: much faster than the pure-Python decoder."""
    lz4 = shutil.which("lz4")
    if lz4 is None:
        return None
    try:
        out = subprocess.run([lz4, "-dc"], input=payload, capture_output=True, timeout=120,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    # lz4 complains about the trailing size word but has written the whole kernel by then.
    return out.stdout if out.stdout[:4] == ELF_MAGIC else None


# ---- modules ----


def modinfo(path: Path) -> dict[str, str]:
    """`name` and `depends` from a module's .modinfo strings (no kmod needed)."""
    data = path.read_bytes()
    info: dict[str, str] = {}
    for key in ("name", "depends", "vermagic"):
        m = re.search(rb"(?:^|\x00)" + key.encode() + rb"=([^\x00]*)\x00", data)
        if m:
            info[key] = m.group(1).decode(errors="replace")
    return info


def module_load_order(index: dict[str, Path], wanted: tuple[str, ...]) -> list[str]:
    """`wanted` and everything they depend on, dependencies first."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in order:
            return
        if name in visiting:
            raise KernelError(f"module dependency cycle at {name}")
        if name not in index:
            raise KernelError(f"module {name} is not in this kernel package")
        visiting.add(name)
        for dep in filter(None, modinfo(index[name]).get("depends", "").split(",")):
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


def prepare_from_deb(deb: Path, version: str, *, source: str = "debian-cloud") -> KernelInfo:
    """Unpack a linux-image .deb into the kernel cache (vmlinux + the guest modules)."""
    with tempfile.TemporaryDirectory(prefix="ak-kernel-") as tmp:
        work = Path(tmp)
        files = extract_deb(deb, work, re.compile(r"^boot/vmlinuz-|\.ko$"))
        vmlinuz = next((p for p in files if p.name.startswith("vmlinuz-")), None)
        if vmlinuz is None:
            raise KernelError(f"{deb.name} has no /boot/vmlinuz-*")
        release = vmlinuz.name.removeprefix("vmlinuz-")
        index = {p.stem.replace("-", "_"): p for p in files if p.suffix == ".ko"}
        order = module_load_order(index, GUEST_MODULES) if index else []
        dest = kernels_dir() / f"{release}_{version}"
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=_ensure(kernels_dir())))
        try:
            (staging / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
            (staging / "modules").mkdir()
            for name in order:
                shutil.copyfile(index[name], staging / "modules" / f"{name}.ko")
            shutil.rmtree(dest, ignore_errors=True)
            staging.rename(dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    info = KernelInfo(release=release, source=source, package_version=version,
                      vmlinux=str(dest / "vmlinux"), modules=order,
                      module_dir=str(dest / "modules"))
    info.save()
    return info


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def prepare_debian_cloud(*, force: bool = False, deb: Path | None = None) -> KernelInfo:
    """Fetch (or reuse) Debian's cloud kernel; cached by package name and version."""
    if deb is not None:
        m = re.match(r"(linux-image-[^_]+)_([^_]+)_", deb.name)
        version = m.group(2) if m else "local"
        return prepare_from_deb(deb, version)
    package, version = resolve_cloud_package()
    release = package.removeprefix("linux-image-")
    cached = KernelInfo.load(kernels_dir() / f"{release}_{version}")
    if cached is not None and not force:
        return cached
    with tempfile.TemporaryDirectory(prefix="ak-deb-") as tmp:
        # As root, apt warns that its _apt user cannot write here and downloads as root.
        path = download_package(package, Path(tmp))
        return prepare_from_deb(path, version)
