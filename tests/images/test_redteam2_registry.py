"""Outside review, round 2: a hostile registry and hostile layers against the pull client
and the unpacker."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from harness import LayerBuilder, compress, insecure

from agentkernel.images import ImageError, pull
from agentkernel.images.store import Store
from agentkernel.images.unpack import LayerError, unpack_layer

TOKEN_BYTES = 256 << 20  # what the hostile token endpoint offers (never all read: bounded)
CHUNK = 1 << 20


class HugeTokenRegistry:
    """Answers every /v2/ request 401 with a Bearer realm on itself, whose /token answer
    is an endless stream of JSON-ish bytes; counts what the client took."""

    def __init__(self) -> None:
        self.sent = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.startswith("/token"):
                    outer.stream_token(self)
                    return
                self.send_response(401)
                self.send_header("WWW-Authenticate",
                                 f'Bearer realm="http://{outer.host}/token",service="x"')
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def stream_token(self, h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(TOKEN_BYTES))
        h.end_headers()
        chunk = b" " * CHUNK
        try:
            for _ in range(TOKEN_BYTES // CHUNK):
                h.wfile.write(chunk)
                with self.lock:
                    self.sent += CHUNK
        except OSError:
            pass  # the client hung up: what we want
        h.close_connection = True

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_token_answer_is_read_bounded(store: Store) -> None:
    """The token realm is any URL the registry names; its answer was read whole into
    memory (`resp.data`) before the first MiB was parsed: a hostile registry (an image
    name an agent chose) could make the pulling process, the daemon, take gigabytes."""
    reg = HugeTokenRegistry()
    try:
        with pytest.raises(ImageError, match="token"):
            pull(f"{reg.host}/evil/img:1", config=insecure(reg.host, retries=0), store=store,
                 progress=False)
        # Socket buffers hold a few MiB besides what the client read.
        assert reg.sent < 32 << 20, f"the client read {reg.sent >> 20} MiB of a token answer"
    finally:
        reg.stop()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs: what a bomb may fill without touching the machine's disk."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs", str(mnt)],
                   check=True, timeout=30)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)


def test_layer_bomb_never_fills_the_store_filesystem(small_fs: Path, tmp_path: Path) -> None:
    """Each entry was checked against the free space, the layer's sum was not: a gzip
    bomb (here 36 MiB of zeros in ~40 KiB; a registry may serve 64 GiB the same way)
    filled the store's filesystem to the last byte before ENOSPC stopped it."""
    zeros = b"\0" * (12 << 20)
    tar = LayerBuilder().file("a", zeros).file("b", zeros).file("c", zeros).bytes()
    blob = tmp_path / "layer.tar.gz"
    blob.write_bytes(compress(tar, "gzip"))
    with pytest.raises(LayerError) as info:
        unpack_layer(blob, small_fs / "layer", overlay_markers=False)
    st = os.statvfs(small_fs)
    # The partial layer is still there (the store deletes it): the space it left free.
    assert st.f_bavail * st.f_frsize >= 4 << 20, f"the filesystem was filled: {info.value}"
    assert "No space left" not in str(info.value)


def test_layers_unpacked_at_once_never_fill_the_store_filesystem(small_fs: Path,
                                                                 tmp_path: Path) -> None:
    """Each layer was checked against the space free at its own start: two pulls at once
    (a daemon serves many callers) each saw 32 MiB free and together filled the filesystem
    to ENOSPC. Now every file entry claims its bytes against what is free now, less the
    entries being written by the others."""
    import threading

    chunk = b"\1" * (1 << 20)
    builder = LayerBuilder()
    for i in range(20):
        builder.file(f"f{i}", chunk)
    blob = tmp_path / "layer.tar"
    blob.write_bytes(builder.bytes())  # 20 MiB: either fits alone, both do not
    errors: list[str] = []

    def unpack(dest: str) -> None:
        try:
            unpack_layer(blob, small_fs / dest, overlay_markers=False)
        except LayerError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=unpack, args=(f"layer{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors, "both layers were unpacked into 32 MiB"
    assert not any("No space left" in e for e in errors), errors
    assert all("free where the store keeps layers" in e for e in errors), errors
