"""Test harness: a real docker-registry, a TLS CA, an OCI pusher, layer builders, a fault proxy."""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import urllib3

from agentkernel.images.registry import RegistryOptions

USER, PASSWORD = "tester", "s3cret-pass"
REGISTRY_BIN = "/usr/bin/docker-registry"
BUSYBOX = Path("/bin/busybox")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TYPES = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- TLS + htpasswd ------------------------------------------------------------------


def make_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server cert for 127.0.0.1 signed by it: (ca.crt, srv.crt, srv.key)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = directory / "srv.key", directory / "srv.csr", directory / "srv.crt"
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run = ["openssl"]
    subprocess.run([*run, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
                    "-out", str(ca_crt), "-subj", "/CN=agentkernel test CA", "-days", "2"],
                   check=True, capture_output=True)
    subprocess.run([*run, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(csr), "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    subprocess.run([*run, "x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey",
                    str(ca_key), "-CAcreateserial", "-out", str(crt), "-days", "2",
                    "-extfile", str(ext)], check=True, capture_output=True)
    return ca_crt, crt, key


def make_htpasswd(path: Path, user: str, password: str) -> Path:
    out = subprocess.run(["htpasswd", "-Bbn", user, password], check=True,
                         capture_output=True).stdout
    path.write_bytes(out)
    return path


# -- the registry ----------------------------------------------------------------------


@dataclass
class Registry:
    """A docker-registry process on 127.0.0.1 with its own storage dir."""

    workdir: Path
    tls: tuple[Path, Path] | None = None  # (cert, key)
    htpasswd: Path | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def start(self) -> Registry:
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = [
            "version: 0.1",
            "log:", "  level: info", "  formatter: text", "  accesslog:", "    disabled: false",
            "storage:", f"  filesystem:\n    rootdirectory: {self.workdir / 'data'}",
            "  delete:", "    enabled: true",
            "http:", f"  addr: {self.host}",
        ]
        if self.tls:
            lines += ["  tls:", f"    certificate: {self.tls[0]}", f"    key: {self.tls[1]}"]
        if self.htpasswd:
            lines += ["auth:", "  htpasswd:", "    realm: test", f"    path: {self.htpasswd}"]
        cfg = self.workdir / "config.yml"
        cfg.write_text("\n".join(lines) + "\n")
        self.log = (self.workdir / "registry.log").open("wb")
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(cfg)], stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("docker-registry died: "
                                   + (self.workdir / "registry.log").read_text()[-2000:])
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError("docker-registry did not start")

    def blob_gets(self) -> int:
        """Blob GETs the registry logged (its access log)."""
        text = (self.workdir / "registry.log").read_text(errors="replace")
        return sum(1 for line in text.splitlines()
                   if '"GET /v2/' in line and "/blobs/sha256:" in line)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# -- pushing ---------------------------------------------------------------------------


class Pusher:
    """Push blobs and manifests with the distribution API (monolithic uploads)."""

    def __init__(self, base_url: str, auth: tuple[str, str] | None = None,
                 ca: Path | None = None) -> None:
        self.base = base_url
        self.http = urllib3.PoolManager(ca_certs=str(ca) if ca else None)
        self.headers: dict[str, str] = {}
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"

    def blob(self, repo: str, data: bytes, media_type: str = "") -> dict[str, Any]:
        digest = sha(data)
        r = self.http.request("POST", f"{self.base}/v2/{repo}/blobs/uploads/",
                              headers=self.headers)
        assert r.status == 202, (r.status, r.data)
        loc = r.headers["Location"]
        if loc.startswith("/"):
            loc = self.base + loc
        sep = "&" if "?" in loc else "?"
        r = self.http.request("PUT", f"{loc}{sep}digest={digest}", body=data,
                              headers={**self.headers,
                                       "Content-Type": "application/octet-stream"})
        assert r.status == 201, (r.status, r.data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> str:
        r = self.http.request("PUT", f"{self.base}/v2/{repo}/manifests/{ref}", body=body,
                              headers={**self.headers, "Content-Type": media_type})
        assert r.status == 201, (r.status, r.data)
        return sha(body)

    def image(self, repo: str, tag: str, layers: list[bytes], *,
              compression: list[str] | str = "gzip", config: dict[str, Any] | None = None,
              arch: str = "amd64", variant: str | None = None,
              raw_layers: list[bytes] | None = None) -> dict[str, Any]:
        """Push an image of uncompressed tar ``layers``; return its manifest descriptor."""
        comps = [compression] * len(layers) if isinstance(compression, str) else compression
        descs = []
        for i, (tar, comp) in enumerate(zip(layers, comps, strict=True)):
            blob = raw_layers[i] if raw_layers else compress(tar, comp)
            descs.append(self.blob(repo, blob, LAYER_TYPES[comp]))
        cfg: dict[str, Any] = {
            "architecture": arch, "os": "linux",
            "config": {"Env": ["PATH=/bin:/usr/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in layers]},
        }
        if variant:
            cfg["variant"] = variant
        if config:
            cfg["config"].update(config)
        cfg_bytes = json.dumps(cfg).encode()
        cfg_desc = self.blob(repo, cfg_bytes, OCI_CONFIG)
        manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                               "config": cfg_desc, "layers": descs}).encode()
        digest = self.manifest(repo, tag, manifest, OCI_MANIFEST)
        plat = {"os": "linux", "architecture": arch, **({"variant": variant} if variant else {})}
        return {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(manifest),
                "platform": plat}

    def index(self, repo: str, tag: str, manifests: list[dict[str, Any]]) -> str:
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                           "manifests": manifests}).encode()
        return self.manifest(repo, tag, body, OCI_INDEX)


# -- layers ----------------------------------------------------------------------------


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if how == "zstd":
        import zstandard

        return zstandard.ZstdCompressor().compress(data)
    return data


class LayerBuilder:
    """Build an uncompressed tar layer entry by entry (any entry, including hostile ones)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115

    def _info(self, name: str, kind: bytes, mode: int, **kw: Any) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = kind, mode, 1_700_000_000
        for k, v in kw.items():
            setattr(info, k, v)
        return info

    def dir(self, name: str, mode: int = 0o755, **kw: Any) -> LayerBuilder:
        self.tar.addfile(self._info(name, tarfile.DIRTYPE, mode, **kw))
        return self

    def file(self, name: str, data: bytes = b"", mode: int = 0o644, **kw: Any) -> LayerBuilder:
        info = self._info(name, tarfile.REGTYPE, mode, size=len(data), **kw)
        self.tar.addfile(info, io.BytesIO(data))
        return self

    def symlink(self, name: str, target: str) -> LayerBuilder:
        self.tar.addfile(self._info(name, tarfile.SYMTYPE, 0o777, linkname=target))
        return self

    def hardlink(self, name: str, target: str) -> LayerBuilder:
        self.tar.addfile(self._info(name, tarfile.LNKTYPE, 0o644, linkname=target))
        return self

    def device(self, name: str) -> LayerBuilder:
        self.tar.addfile(self._info(name, tarfile.CHRTYPE, 0o666, devmajor=1, devminor=3))
        return self

    def fifo(self, name: str) -> LayerBuilder:
        self.tar.addfile(self._info(name, tarfile.FIFOTYPE, 0o600))
        return self

    def huge(self, name: str, size: int) -> LayerBuilder:
        """A header declaring ``size`` bytes with no data after it."""
        info = self._info(name, tarfile.REGTYPE, 0o644, size=size)
        self.buf.write(info.tobuf(tarfile.PAX_FORMAT))
        return self

    def bytes(self) -> bytes:
        self.tar.close()
        return self.buf.getvalue()


def busybox_layer() -> bytes:
    b = LayerBuilder().dir("bin").dir("etc").dir("tmp", mode=0o1777)
    b.file("bin/busybox", BUSYBOX.read_bytes(), mode=0o755)
    for applet in ("sh", "echo", "cat", "ls"):
        b.symlink(f"bin/{applet}", "busybox")
    b.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    return b.bytes()


# -- a counting, faulting proxy --------------------------------------------------------


class Proxy:
    """HTTP proxy in front of a plain registry: counts requests, can demand Bearer tokens,
    cut or corrupt blob downloads."""

    def __init__(self, upstream: str, *, bearer: bool = False, bind: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self.bearer = bearer
        self.token = "tok-" + os.urandom(6).hex()
        self.requests: list[tuple[str, str, str]] = []  # (method, path, range)
        self.cut_once: set[str] = set()
        self.cut_always: set[str] = set()
        self.corrupt: set[str] = set()
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy.handle(self, "GET")

            def do_HEAD(self) -> None:
                proxy.handle(self, "HEAD")

        self.server = ThreadingHTTPServer((bind, 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"{self.server.server_address[0]}:{self.server.server_address[1]}"

    def blob_gets(self) -> int:
        with self.lock:
            return sum(1 for m, p, _ in self.requests if m == "GET" and "/blobs/" in p)

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()

    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        with self.lock:
            self.requests.append((method, h.path, h.headers.get("Range", "")))
        if h.path.startswith("/token"):
            body = json.dumps({"token": self.token}).encode()
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        if self.bearer and h.headers.get("Authorization") != f"Bearer {self.token}":
            repo = h.path.split("/v2/", 1)[-1].rsplit("/manifests/", 1)[0].rsplit("/blobs/", 1)[0]
            h.send_response(401)
            h.send_header("WWW-Authenticate", f'Bearer realm="http://{self.host}/token",'
                          f'service="test",scope="repository:{repo}:pull"')
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        conn = http.client.HTTPConnection(self.upstream, timeout=30)
        headers = {k: v for k, v in h.headers.items()
                   if k.lower() in ("accept", "range")}
        conn.request(method, h.path, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        digest = h.path.rsplit("/", 1)[-1]
        is_blob = "/blobs/" in h.path and method == "GET" and resp.status in (200, 206)
        if is_blob and digest in self.corrupt and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        cut = False
        if is_blob and (digest in self.cut_always or digest in self.cut_once):
            self.cut_once.discard(digest)
            cut = True
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection"):
                h.send_header(k, v)
        h.end_headers()
        if method == "HEAD":
            return
        if cut:
            h.wfile.write(data[: max(1, len(data) // 2)])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        h.wfile.write(data)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def have_tools() -> list[str]:
    return [t for t in (REGISTRY_BIN, "openssl", "htpasswd", str(BUSYBOX))
            if not (shutil.which(t) or Path(t).exists())]


@dataclass
class TlsRegistry:
    registry: Registry
    ca: Path


def insecure(*hosts: str, **kw: object) -> RegistryOptions:
    """Options that allow plain HTTP to ``hosts``, with isolated credentials and fast retries."""
    base: dict[str, object] = {"insecure": frozenset(hosts), "docker_config": Path("/nonexistent"),
                               "retries": 2}
    base.update(kw)
    return RegistryOptions(**base)  # type: ignore[arg-type]
