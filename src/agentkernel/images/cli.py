"""`agentkernel images pull|list|inspect|remove|prune` and the per-layer pull progress display."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any, TextIO


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class ProgressPrinter:
    """Per-layer progress on stderr: redrawn lines on a terminal, one line per step otherwise."""

    def __init__(self, ref: str, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.ref = ref
        self._rows: dict[str, list[Any]] = {}  # digest → [state, done, total]
        self._lock = threading.Lock()
        self._drawn = 0
        self._last = 0.0

    def _say(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def start(self, layers: list[tuple[str, int, bool]]) -> None:
        with self._lock:
            self._say(f"pulling {self.ref} ({len(layers)} layers)")
            for digest, size, cached in layers:
                self._rows[digest] = ["cached" if cached else "waiting", 0, size]
                if not self.tty:
                    self._say(f"  {digest[7:19]} {'cached' if cached else 'fetching'} "
                              f"{_human(size)}")
            self._draw(force=True)

    def update(self, digest: str, done: int, total: int) -> None:
        with self._lock:
            row = self._rows.get(digest)
            if row is not None:
                row[0], row[1], row[2] = "downloading", done, total
                self._draw()

    def unpacking(self, digest: str) -> None:
        with self._lock:
            if digest in self._rows:
                self._rows[digest][0] = "unpacking"
                self._draw(force=True)

    def done(self, digest: str) -> None:
        with self._lock:
            if digest in self._rows:
                self._rows[digest][0] = "done"
                self._rows[digest][1] = self._rows[digest][2]
                if not self.tty:
                    self._say(f"  {digest[7:19]} done")
                self._draw(force=True)

    def _draw(self, force: bool = False) -> None:
        if not self.tty:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        out = []
        if self._drawn:
            out.append(f"\x1b[{self._drawn}F")  # back to the first row we drew
        for digest, (state, done, total) in self._rows.items():
            bar = ""
            if state == "downloading" and total:
                filled = int(20 * done / total)
                bar = f" [{'=' * filled}{' ' * (20 - filled)}] {_human(done)}/{_human(total)}"
            out.append(f"\x1b[2K  {digest[7:19]} {state}{bar}\n")
        self.stream.write("".join(out))
        self.stream.flush()
        self._drawn = len(self._rows)

    def close(self) -> None:
        with self._lock:
            self._draw(force=True)


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
