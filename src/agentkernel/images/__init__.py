"""OCI images: pull from a registry into a content-addressed store, and hand out unpacked layers."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AgentKernelError, NotFound, UsageError
from .reference import Reference, normalize, parse_reference

if TYPE_CHECKING:
    from .registry import Platform, RegistryClient, RegistryOptions, Resolved
    from .store import Store
    from .unpack import LayerInfo, Limits

__all__ = [
    "Image",
    "ImageConfig",
    "ImageError",
    "Limits",
    "Reference",
    "ensure",
    "get",
    "list_images",
    "normalize",
    "parse_reference",
    "prune",
    "pull",
    "remove",
]


def __getattr__(name: str) -> Any:
    """`Limits`, loaded when first asked for: the store and the unpacker (tempfile,
    shutil, the compression modules) cost a run that uses an engine's image ~10 ms."""
    if name == "Limits":
        from .unpack import Limits

        return Limits
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _store() -> Store:
    from .store import Store

    return Store()


class ImageError(AgentKernelError):
    """An image could not be pulled, verified or unpacked (one line: image, registry, why)."""

    exit_code = 125
    http_status = 502
    short: str | None = None  # the reason in a few words, e.g. "registry-1.docker.io unreachable"


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an OCI image config that decide how a command runs."""

    env: list[str] = field(default_factory=list)
    working_dir: str = ""
    user: str = ""
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ImageConfig:
        cfg = doc.get("config") or {}

        def strs(v: Any) -> list[str] | None:
            return [str(x) for x in v] if isinstance(v, list) else None

        return cls(
            env=strs(cfg.get("Env")) or [],
            working_dir=str(cfg.get("WorkingDir") or ""),
            user=str(cfg.get("User") or ""),
            entrypoint=strs(cfg.get("Entrypoint")),
            cmd=strs(cfg.get("Cmd")),
        )

    def env_dict(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in self.env:
            key, _, value = item.partition("=")
            out[key] = value
        return out


@dataclass
class Image:
    """A pulled image. ``layers`` are the unpacked layer dirs, bottom first."""

    ref: str
    digest: str  # what the reference resolved to (an index or a manifest): ``name@digest``
    manifest_digest: str
    config_digest: str
    platform: str | None
    layers: list[Path]
    config: ImageConfig
    size: int = 0
    pulled_at: float = 0.0

    def layer_info(self) -> list[LayerInfo]:
        """Each layer's deletions/opaque dirs and whether its overlay markers exist."""
        from .unpack import LayerInfo

        return [LayerInfo.load(p.parent) for p in self.layers]

    @property
    def overlay_ready(self) -> bool:
        """True if ``layers`` can be overlay lowerdirs as they are (whiteouts materialised)."""
        return all(info.overlay_ready for info in self.layer_info())

    def rootfs_dir(self, store: Store | None = None) -> Path:
        """The image as one shared, read-only tree (composed once, cached in the store)."""
        return (store or _store()).ensure_rootfs(self.manifest_digest, self.layers)

    def compose(self, dest: Path) -> None:
        """Copy the image into ``dest`` as one flat rootfs (the no-overlay fallback)."""
        from .unpack import compose

        compose(self.layers, dest)


def _options(config: Any) -> RegistryOptions:
    from .registry import RegistryOptions

    if isinstance(config, RegistryOptions):
        return config
    return RegistryOptions.from_config(config)


def _image_from_record(store: Store, rec: dict[str, Any]) -> Image | None:
    layers = [store.layer_dir(layer["diff_id"]) / "root" for layer in rec.get("layers", [])]
    if not all(store.has_layer(layer["diff_id"]) for layer in rec.get("layers", [])):
        return None
    try:
        config = ImageConfig.from_json(json.loads(store.read_blob(rec["config_digest"])))
    except (OSError, ValueError, KeyError):
        return None
    return Image(
        ref=rec["ref"], digest=rec["digest"], manifest_digest=rec["manifest_digest"],
        config_digest=rec["config_digest"], platform=rec.get("platform"), layers=layers,
        config=config, size=int(rec.get("size", 0)), pulled_at=float(rec.get("pulled_at", 0)),
    )


def _find_record(store: Store, ref: Reference) -> dict[str, Any] | None:
    rec = store.load_record(str(ref))
    if rec is None and ref.digest:
        # ``name@digest`` also finds an image pulled by tag that resolved to that digest.
        for other in store.records():
            if other.get("name") == ref.name and other.get("digest") == ref.digest:
                return other
    return rec


def get(ref: str, *, config: Any = None, store: Store | None = None) -> Image | None:
    """The cached image for ``ref``, or None. Never touches the network."""
    default = _options(config).default_registry if config is not None else "docker.io"
    parsed = parse_reference(ref, default)
    store = store or _store()
    rec = _find_record(store, parsed)
    return _image_from_record(store, rec) if rec else None


def ensure(
    ref: str, *, config: Any = None, platform: str | Platform | None = None,
    progress: bool = True, store: Store | None = None,
) -> Image:
    """The cached image for ``ref``, pulling it first if it is not cached."""
    return get(ref, config=config, store=store) or pull(
        ref, config=config, platform=platform, progress=progress, store=store
    )


def list_images(*, store: Store | None = None) -> list[Image]:
    store = store or _store()
    images = [_image_from_record(store, rec) for rec in store.records()]
    return sorted((i for i in images if i is not None), key=lambda i: i.ref)


def remove(ref: str, *, config: Any = None, store: Store | None = None) -> str:
    """Forget the image ``ref`` (its data goes with the next ``prune``); return its name."""
    default = _options(config).default_registry if config is not None else "docker.io"
    parsed = parse_reference(ref, default)
    store = store or _store()
    rec = _find_record(store, parsed)
    if rec is None:
        raise NotFound(f"image {parsed} is not in the store")
    store.delete_record(str(rec["ref"]))
    return str(rec["ref"])


def prune(*, store: Store | None = None) -> int:
    """Free blobs and layers no image uses; return the bytes freed."""
    return (store or _store()).prune()


def pull(
    ref: str,
    *,
    config: Any = None,
    platform: str | Platform | None = None,
    progress: bool = True,
    store: Store | None = None,
    limits: Limits | None = None,
) -> Image:
    """Pull ``ref`` (a tag is always re-resolved; blobs and layers already stored are reused).

    ``config`` is an agentkernel Config or RegistryOptions; ``platform`` e.g. "linux/arm64".
    Raises ImageError (NotFound if the registry does not have it), UsageError for a bad ref.
    """
    from .registry import Platform, RegistryClient, RegistryError
    from .unpack import LayerError, Limits

    options = _options(config)
    parsed = parse_reference(ref, options.default_registry)
    want: Platform | None
    try:
        want = Platform.parse(platform) if isinstance(platform, str) else platform
    except ValueError as exc:
        raise ImageError(f"cannot pull {parsed}: {exc}") from None
    store = store or _store()
    store.init()
    client = RegistryClient(options)
    reporter = None
    if progress:
        from .progress import ProgressPrinter

        reporter = ProgressPrinter(str(parsed))
    try:
        with store.lock("store", shared=True):
            resolved = client.resolve(parsed, want)
            rec = _fetch(store, client, parsed, resolved, limits or Limits(), reporter)
    except RegistryError as exc:
        # One line: which image, which registry, why.
        message = f"cannot pull {parsed} from {exc.registry}: {exc.reason}"
        if exc.refused:  # the request's fault, not the network's: no offline fallback
            raise UsageError(message) from None
        if exc.not_found:
            raise NotFound(message) from None
        err = ImageError(message)
        # The few words an offline run's fallback note shows (images/offline.py).
        err.short = (f"{exc.registry} unreachable" if exc.reason.startswith("cannot connect")
                     else f"{exc.registry}: {exc.reason}")
        raise err from None
    except LayerError as exc:
        raise ImageError(f"cannot pull {parsed} from {parsed.registry}: bad layer: {exc}") from None
    finally:
        if reporter is not None:
            reporter.close()
    image = _image_from_record(store, rec)
    if image is None:  # pruned between our pull and now
        raise ImageError(f"cannot pull {parsed}: the store lost it while pulling (prune?)")
    return image


def _fetch(
    store: Store, client: RegistryClient, ref: Reference, resolved: Resolved,
    limits: Limits, reporter: Any,
) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    from .registry import RegistryError
    from .unpack import unpack_layer

    ep, repo = resolved.endpoint, ref.repository
    for digest, body in resolved.bodies.items():
        store.put_blob(digest, body)
    cfg_desc = resolved.config
    if not store.has_blob(cfg_desc.digest):
        body = client.fetch_small_blob(ep, repo, cfg_desc, client.options.max_config_bytes)
        store.put_blob(cfg_desc.digest, body)
    try:
        cfg = json.loads(store.read_blob(cfg_desc.digest))
        diff_ids = [str(d) for d in cfg["rootfs"]["diff_ids"]]
    except (ValueError, KeyError, TypeError):
        raise RegistryError(ep.host, "image config has no rootfs.diff_ids") from None
    if len(diff_ids) != len(resolved.layers):
        raise RegistryError(ep.host, f"config lists {len(diff_ids)} layers, manifest "
                            f"{len(resolved.layers)}")
    if reporter is not None:
        reporter.start([(d.digest, d.size, store.has_layer(i))
                        for d, i in zip(resolved.layers, diff_ids, strict=True)])

    def one(desc: Any, diff_id: str) -> LayerInfo:
        if store.has_layer(diff_id):
            return store.ensure_layer(diff_id, _unreachable)
        blob = store.ensure_blob(desc.digest, lambda tmp: client.fetch_blob(
            ep, repo, desc, tmp, reporter.update if reporter is not None else None))
        if reporter is not None:
            reporter.unpacking(desc.digest)
        info = store.ensure_layer(diff_id, lambda dest: unpack_layer(
            blob, dest, diff_id=diff_id, limits=limits))
        if reporter is not None:
            reporter.done(desc.digest)
        return info

    with ThreadPoolExecutor(max_workers=max(1, client.options.parallel)) as pool:
        futures = [pool.submit(one, d, i) for d, i in zip(resolved.layers, diff_ids, strict=True)]
        infos = [f.result() for f in futures]
    record = {
        "ref": str(ref),
        "name": ref.name,
        "digest": resolved.digest,
        "manifest_digest": resolved.manifest_digest,
        "config_digest": cfg_desc.digest,
        "platform": resolved.platform or _platform_of(cfg),
        "layers": [{"digest": d.digest, "diff_id": i.diff_id, "size": d.size,
                    "media_type": d.media_type}
                   for d, i in zip(resolved.layers, infos, strict=True)],
        "blobs": sorted({*resolved.bodies, cfg_desc.digest, *(d.digest for d in resolved.layers)}),
        "size": sum(i.size for i in infos),
        "pulled_at": time.time(),
        "registry": resolved.endpoint.host,
    }
    store.save_record(record)
    return record


def _unreachable(_dest: Path) -> LayerInfo:
    raise AssertionError("layer vanished while in use")


def _platform_of(cfg: dict[str, Any]) -> str | None:
    parts = [cfg.get("os"), cfg.get("architecture"), cfg.get("variant")]
    return "/".join(str(p) for p in parts if p) or None
