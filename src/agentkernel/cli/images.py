"""`agentkernel images pull|list|inspect|remove|prune` and the per-layer pull progress display."""

from __future__ import annotations

import json
import sys
import time

# Building the parser imports every command module: keep this one's top light.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("images", help="pull, list, inspect and remove OCI images")
    isub = p.add_subparsers(dest="images_cmd", metavar="SUBCOMMAND", required=True)
    pl = isub.add_parser("pull", help="pull an image into the local store")
    pl.add_argument("image")
    pl.add_argument("--platform", help="OS/ARCH[/VARIANT] (default: this host)")
    pl.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    ls = isub.add_parser("list", aliases=["ls"], help="list pulled images")
    ls.add_argument("--json", action="store_true")
    ins = isub.add_parser("inspect", help="show an image's digests, layers and config")
    ins.add_argument("image")
    rm = isub.add_parser("remove", aliases=["rm"], help="forget images (then prune frees space)")
    rm.add_argument("images", nargs="+")
    isub.add_parser("prune", help="free blobs and layers no image uses")
    p.set_defaults(handler=cmd_images)


def cmd_images(args: argparse.Namespace) -> int:
    """`images …` with the settings a run here would get (mirrors, CA, insecure registries)."""
    from pathlib import Path

    from ..planner import CallerContext, RunRequest, load_configs

    config, _, warnings = load_configs(RunRequest(argv=[], cwd=Path.cwd()),
                                       CallerContext.here())
    for warning in warnings:
        print(f"agentkernel: warning: {warning}", file=sys.stderr)
    return main(args, config)


def main(args: argparse.Namespace, config: Any = None) -> int:
    """Run the subcommand the CLI parser chose (``args.images_cmd``); errors propagate."""
    handlers = {"pull": cmd_pull, "list": cmd_list, "ls": cmd_list, "inspect": cmd_inspect,
                "remove": cmd_remove, "rm": cmd_remove, "prune": cmd_prune}
    return handlers[args.images_cmd](args, config)


def cmd_pull(args: argparse.Namespace, config: Any = None) -> int:
    from ..images import pull

    start = time.monotonic()
    image = pull(args.image, config=config, platform=args.platform, progress=not args.quiet)
    if not args.quiet:
        print(f"pulled {image.ref} in {time.monotonic() - start:.1f}s", file=sys.stderr)
    print(f"{image.ref}@{image.digest}" if "@" not in image.ref else image.ref)
    return 0


def cmd_list(args: argparse.Namespace, config: Any = None) -> int:
    from ..images import list_images
    from ..images.progress import _human

    images = list_images()
    if getattr(args, "json", False):
        print(json.dumps([{"ref": i.ref, "digest": i.digest, "platform": i.platform,
                           "size": i.size, "layers": len(i.layers)} for i in images], indent=2))
        return 0
    rows = [("IMAGE", "DIGEST", "PLATFORM", "SIZE")]
    rows += [(i.ref, i.digest[7:19], i.platform or "-", _human(i.size)) for i in images]
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_inspect(args: argparse.Namespace, config: Any = None) -> int:
    from ..errors import NotFound
    from ..images import get

    image = get(args.image, config=config)
    if image is None:
        raise NotFound(f"image {args.image} is not in the store (pull it first)")
    cfg = image.config
    print(json.dumps({
        "ref": image.ref, "digest": image.digest, "manifest_digest": image.manifest_digest,
        "config_digest": image.config_digest, "platform": image.platform, "size": image.size,
        "overlay_ready": image.overlay_ready,
        "layers": [str(p) for p in image.layers],
        "config": {"Env": cfg.env, "WorkingDir": cfg.working_dir, "User": cfg.user,
                   "Entrypoint": cfg.entrypoint, "Cmd": cfg.cmd},
    }, indent=2))
    return 0


def cmd_remove(args: argparse.Namespace, config: Any = None) -> int:
    from ..images import remove

    for ref in args.images:
        print(f"removed {remove(ref, config=config)}")
    return 0


def cmd_prune(args: argparse.Namespace, config: Any = None) -> int:
    from ..images import prune
    from ..images.progress import _human

    print(f"freed {_human(prune())}")
    return 0
