"""`agentkernel images pull|list|inspect|remove|prune` and the per-layer pull progress display."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from .progress import ProgressPrinter, _human  # noqa: F401 - ProgressPrinter: re-export


def main(args: argparse.Namespace, config: Any = None) -> int:
    """Run the subcommand the CLI parser chose (``args.images_cmd``); errors propagate."""
    handlers = {"pull": cmd_pull, "list": cmd_list, "ls": cmd_list, "inspect": cmd_inspect,
                "remove": cmd_remove, "rm": cmd_remove, "prune": cmd_prune}
    return handlers[args.images_cmd](args, config)


def cmd_pull(args: argparse.Namespace, config: Any = None) -> int:
    from . import pull

    start = time.monotonic()
    image = pull(args.image, config=config, platform=args.platform, progress=not args.quiet)
    if not args.quiet:
        print(f"pulled {image.ref} in {time.monotonic() - start:.1f}s", file=sys.stderr)
    print(f"{image.ref}@{image.digest}" if "@" not in image.ref else image.ref)
    return 0


def cmd_list(args: argparse.Namespace, config: Any = None) -> int:
    from . import list_images

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
    from . import get

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
    from . import remove

    for ref in args.images:
        print(f"removed {remove(ref, config=config)}")
    return 0


def cmd_prune(args: argparse.Namespace, config: Any = None) -> int:
    from . import prune

    print(f"freed {_human(prune())}")
    return 0
