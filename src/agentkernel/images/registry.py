"""A client for the OCI distribution API: auth, manifests, platform selection and blob download."""

from __future__ import annotations

# hashlib (OpenSSL, ~3 ms) and base64 are imported where used: every plan() loads this
# module for RegistryOptions, also for runs that never talk to a registry.
import json
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from .reference import DOCKER_HUB, DOCKER_HUB_API, Reference

if TYPE_CHECKING:
    import ipaddress

    import urllib3

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
_ACCEPT = ", ".join([OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST])
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_CHUNK = 1 << 20
MAX_TOKEN_BYTES = 1 << 20  # a token answer (JSON with one token) larger than this is refused
MIRROR_ENV = "AGENTKERNEL_REGISTRY_MIRROR"
CA_ENV = "AGENTKERNEL_REGISTRY_CA"

# A progress callback: (digest, bytes done, bytes total).
Progress = Callable[[str, int, int], None]


class RegistryError(Exception):
    """Talking to a registry failed; ``registry`` is the host that failed."""

    def __init__(self, registry: str, reason: str, *, not_found: bool = False,
                 refused: bool = False) -> None:
        super().__init__(f"{registry}: {reason}")
        self.registry = registry
        self.reason = reason
        self.not_found = not_found
        self.refused = refused  # by RegistryOptions.public_only: the request's fault


@dataclass(frozen=True)
class Platform:
    """An OCI platform (os/architecture[/variant])."""

    os: str
    architecture: str
    variant: str | None = None

    _ARCH = {
        "x86_64": ("amd64", None), "amd64": ("amd64", None), "aarch64": ("arm64", "v8"),
        "arm64": ("arm64", "v8"), "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"),
        "i386": ("386", None), "i686": ("386", None), "ppc64le": ("ppc64le", None),
        "s390x": ("s390x", None), "riscv64": ("riscv64", None),
    }

    @classmethod
    def host(cls) -> Platform:
        import platform as _platform  # (lazily, as ssl: a plan that pulls nothing skips both)

        arch, variant = cls._ARCH.get(_platform.machine().lower(), (_platform.machine(), None))
        return cls("linux", arch, variant)

    @classmethod
    def parse(cls, text: str) -> Platform:
        """``linux/arm64``, ``linux/arm/v7`` or just ``arm64`` (os defaults to linux)."""
        parts = text.strip().split("/")
        if len(parts) == 1:
            parts = ["linux", *parts]
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"bad platform {text!r} (want OS/ARCH[/VARIANT])")
        arch, variant = cls._ARCH.get(parts[1], (parts[1], None))
        return cls(parts[0], arch, parts[2] if len(parts) == 3 else variant)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def score(self, entry: dict[str, Any]) -> int:
        """0 = no match; higher = better match for an index entry's ``platform``."""
        if entry.get("os") != self.os or entry.get("architecture") != self.architecture:
            return 0
        variant = entry.get("variant")
        if self.architecture == "arm64" and variant is None:
            variant = "v8"  # arm64 without a variant means v8
        if self.variant is None or variant == self.variant:
            return 2
        return 0 if self.architecture != "arm64" else 1


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor from a manifest or index."""

    media_type: str
    digest: str
    size: int
    platform: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, data: Any, what: str) -> Descriptor:
        if not isinstance(data, dict):
            raise ValueError(f"{what} is not an object")
        digest, size = data.get("digest"), data.get("size")
        if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
            raise ValueError(f"{what} has an unsupported digest {digest!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"{what} has a bad size {size!r}")
        plat = data.get("platform")
        return cls(str(data.get("mediaType", "")), digest, size,
                   plat if isinstance(plat, dict) else None)

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Endpoint:
    """Where to send API calls for one registry: scheme + host[:port] (+ path prefix)."""

    host: str
    scheme: str = "https"
    prefix: str = ""

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.host}{self.prefix}"


@dataclass
class RegistryOptions:
    """How to reach registries: default registry, mirrors, insecure hosts, credentials, TLS."""

    default_registry: str = DOCKER_HUB
    # "HOST[:PORT][/PREFIX]" mirrors Docker Hub; "REGISTRY=HOST…" mirrors that registry,
    # "*=HOST…" every registry. Tried in order before the registry itself.
    mirrors: list[str] = field(default_factory=list)
    insecure: frozenset[str] = frozenset()
    credentials: dict[str, tuple[str, str]] = field(default_factory=dict)
    docker_config: Path | None = None
    ca_file: str | None = None
    platform: Platform | None = None
    timeout: float = 60.0
    retries: int = 4
    parallel: int = 4
    max_manifest_bytes: int = 4 << 20
    max_config_bytes: int = 16 << 20
    max_blob_bytes: int = 64 << 30
    # A pull an MCP client (an agent) asked for: no connection to a loopback, private or
    # link-local address, by name, address or redirect, unless it is a registry your own
    # settings name (insecure_registries, registry, a mirror). See `private_allowed`.
    public_only: bool = False

    def private_allowed(self) -> frozenset[str]:
        """The hosts (HOST or HOST:PORT, lower case) a public_only pull may still reach on
        a non-public address: the ones your own settings name."""
        hosts = {h.lower() for h in self.insecure}
        hosts.add(self.default_registry.lower())
        for spec in self.mirrors:
            where = spec.partition("=")[2] if "=" in spec else spec
            hosts.add(_host_of(where))
        return frozenset(h for h in hosts if h)

    @classmethod
    def from_config(cls, config: Any = None,
                    env: Mapping[str, str] | None = None) -> RegistryOptions:
        """Options from an agentkernel Config (``[images]``) plus the environment: the
        caller's (`env`, see context.py) when planning for one, else this process's."""
        environ: Mapping[str, str] = os.environ if env is None else env
        images = getattr(config, "images", None)
        opts = cls()
        if images is not None:
            opts.default_registry = images.registry or DOCKER_HUB
            opts.mirrors = list(images.mirrors)
            opts.insecure = frozenset(images.insecure_registries)
            for host, entry in dict(getattr(images, "auths", None) or {}).items():
                if isinstance(entry, dict):  # a plain mapping (tests, programmatic use)
                    if "username" in entry:
                        opts.credentials[str(host)] = (str(entry["username"]),
                                                       str(entry.get("password", "")))
                else:
                    opts.credentials[str(host)] = (entry.username, entry.password)
            ca = getattr(images, "ca_file", None)
            if isinstance(ca, str):
                opts.ca_file = ca
        if not getattr(config, "_env_applied", False):  # else effective_config did it
            mirrors = environ.get(MIRROR_ENV, "")
            opts.mirrors = [m.strip() for m in mirrors.split(",") if m.strip()] + opts.mirrors
            opts.ca_file = environ.get(CA_ENV) or opts.ca_file
        if env is not None:  # the caller's credentials file, not this process's
            base = env.get("DOCKER_CONFIG") or os.path.join(
                env.get("HOME") or os.path.expanduser("~"), ".docker")
            opts.docker_config = Path(base) / "config.json"
        return opts

    def to_doc(self) -> dict[str, Any]:
        """Where images come from, without credentials (kept with a persistent sandbox, so
        that its restart resolves its image as its creator did)."""
        return {"default_registry": self.default_registry, "mirrors": list(self.mirrors),
                "insecure": sorted(self.insecure), "ca_file": self.ca_file,
                "docker_config": str(self.docker_config) if self.docker_config else None,
                "public_only": self.public_only}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> RegistryOptions:
        opts = cls()
        opts.default_registry = str(doc.get("default_registry") or DOCKER_HUB)
        opts.mirrors = [str(m) for m in doc.get("mirrors") or []]
        opts.insecure = frozenset(str(h) for h in doc.get("insecure") or [])
        opts.ca_file = str(doc["ca_file"]) if doc.get("ca_file") else None
        opts.docker_config = Path(doc["docker_config"]) if doc.get("docker_config") else None
        opts.public_only = doc.get("public_only") is True
        return opts

    def fingerprint(self) -> str:
        """What decides where an image comes from (the failed-pull memo's and the daemon's
        rootfs cache's key): two callers with other settings never share a verdict."""
        return json.dumps([self.default_registry, self.mirrors, sorted(self.insecure),
                           self.ca_file, str(self.docker_config or ""),
                           sorted(self.credentials), self.public_only])


def _host_of(url_or_host: str) -> str:
    text = url_or_host.strip()
    if "://" in text:
        text = urlsplit(text).netloc
    return text.split("/", 1)[0].lower()


def _split_host_port(host: str) -> tuple[str, int | None]:
    """``127.0.0.1:5000`` -> (``127.0.0.1``, 5000); ``[::1]:5000`` and bare ``::1`` too."""
    name, port = host, ""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif host.count(":") == 1:
        name, port = host.split(":")
    return name, int(port) if port.isdigit() else None


def is_loopback_host(host: str) -> bool:
    """Whether a registry host (with or without a port) is on this machine's loopback:
    127.0.0.0/8, ::1 or the name ``localhost``. Such registries may be plain HTTP, as in
    Docker: no one off this host can tamper with the connection."""
    import ipaddress

    name = _split_host_port(host.lower())[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def names_local_host(host: str) -> bool:
    """Whether a registry host (with or without a port) names this machine or a private
    network by itself: `localhost`, `*.localhost`, or an address that is not global
    (loopback, private, link-local, unspecified, shared, reserved)."""
    import ipaddress

    name = _split_host_port(host.lower())[0].rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return not _is_public(ipaddress.ip_address(name))
    except ValueError:
        return False


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    return ip.is_global and not ip.is_multicast


PUBLIC_ONLY_REFUSAL = ("refused: an MCP client's image may not name a registry on a "
                       "loopback, private or link-local address; name it in your config's "
                       "[images] insecure_registries (or registry) to allow it")


def _public_only_pools(allowed: frozenset[str]) -> dict[str, Any]:
    """urllib3 pool classes whose every new connection goes to a public address, unless
    the host it is made for is in `allowed`: the name is resolved once, every address it
    gives must be public, and the connection is made to one of those (no second lookup a
    rebinding name could answer otherwise); a redirect's host is checked the same way.
    Nothing is connected to a refused address, so its service never sees us."""
    import ipaddress
    import socket

    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
    from urllib3.util.connection import create_connection

    class Checked:
        host: str
        port: int
        timeout: Any
        source_address: Any
        socket_options: Any

        def _new_conn(self) -> socket.socket:
            host = self.host.lower()
            if host in allowed or f"{host}:{self.port}" in allowed:
                return super()._new_conn()  # type: ignore[misc,no-any-return]
            conn: Any = self
            try:
                infos = socket.getaddrinfo(host, self.port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise NewConnectionError(conn, f"cannot resolve {host}: {exc}") from None
            addrs = [str(info[4][0]) for info in infos]
            if not addrs or not all(_is_public(ipaddress.ip_address(a.split("%")[0]))
                                    for a in addrs):
                raise NewConnectionError(conn, f"{host}:{self.port}: {PUBLIC_ONLY_REFUSAL}")
            try:
                return create_connection((addrs[0], self.port), self.timeout,
                                         source_address=self.source_address,
                                         socket_options=self.socket_options)
            except TimeoutError:
                raise ConnectTimeoutError(conn, f"connection to {host} timed out") from None
            except OSError as exc:
                raise NewConnectionError(conn, f"cannot connect to {host}: {exc}") from None

    class Conn(Checked, HTTPConnection):
        pass

    class TlsConn(Checked, HTTPSConnection):
        pass

    class Pool(HTTPConnectionPool):
        ConnectionCls = Conn

    class TlsPool(HTTPSConnectionPool):
        ConnectionCls = TlsConn

    return {"http": Pool, "https": TlsPool}


def _hub_alias(host: str) -> str:
    return DOCKER_HUB if host in ("index.docker.io", DOCKER_HUB_API, DOCKER_HUB) else host


def load_docker_credentials(path: Path | None = None) -> dict[str, tuple[str, str]]:
    """``auths`` of ``~/.docker/config.json`` (or $DOCKER_CONFIG) as host → (user, password)."""
    import base64

    if path is None:
        base = os.environ.get("DOCKER_CONFIG") or os.path.expanduser("~/.docker")
        path = Path(base) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    out: dict[str, tuple[str, str]] = {}
    auths = data.get("auths") if isinstance(data, dict) else None
    for key, entry in (auths or {}).items():
        if not isinstance(entry, dict):
            continue
        user, pw = entry.get("username"), entry.get("password")
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                user, _, pw = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                continue
        if isinstance(user, str) and isinstance(pw, str):
            out[_hub_alias(_host_of(key))] = (user, pw)
    return out


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): v for k, v in re.findall(r'(\w+)="?([^",]*)"?', rest)}
    return scheme.lower(), params


@dataclass
class Resolved:
    """A reference resolved to one platform's manifest."""

    endpoint: Endpoint
    digest: str  # what the reference points at (an index or a manifest)
    manifest_digest: str
    manifest: dict[str, Any]
    config: Descriptor
    layers: list[Descriptor]
    platform: str | None
    bodies: dict[str, bytes]  # digest → raw index/manifest bytes, to keep in the store


class RegistryClient:
    """Thread-safe: one connection pool, shared token cache."""

    def __init__(self, options: RegistryOptions | None = None) -> None:
        import ssl

        import urllib3

        self.options = options or RegistryOptions()
        ctx = ssl.create_default_context()
        if self.options.ca_file:
            ctx.load_verify_locations(cafile=self.options.ca_file)
        self._pool = urllib3.PoolManager(
            num_pools=16, maxsize=max(4, self.options.parallel), ssl_context=ctx,
            timeout=urllib3.Timeout(connect=10.0, read=self.options.timeout),
        )
        self._creds = load_docker_credentials(self.options.docker_config)
        self._creds.update({_hub_alias(_host_of(h)): c
                            for h, c in self.options.credentials.items()})
        self._auth: dict[tuple[str, str], str] = {}  # (host, repo) → Authorization value
        self._lock = threading.Lock()
        self._ssl = ctx
        self._loopback_tls: dict[str, bool] = {}  # loopback host → speaks TLS
        if self.options.public_only:
            self._pool.pool_classes_by_scheme = _public_only_pools(
                self.options.private_allowed())

    # -- endpoints ---------------------------------------------------------------------

    def _endpoint(self, spec: str) -> Endpoint:
        text = spec.strip().rstrip("/")
        scheme = None
        if "://" in text:
            scheme, text = text.split("://", 1)
        host, _, prefix = text.partition("/")
        host = host.lower()
        if self.options.public_only and names_local_host(host) and \
                host not in self.options.private_allowed():
            raise RegistryError(host, PUBLIC_ONLY_REFUSAL, refused=True)
        insecure = host in self.options.insecure or _hub_alias(host) in self.options.insecure
        loopback = not insecure and is_loopback_host(host)
        if scheme == "http" and not (insecure or loopback):
            raise RegistryError(host, "plain HTTP is only used for loopback registries and "
                                "those named insecure")
        if insecure:
            scheme = "http"
        elif loopback and scheme is None:
            # Plain HTTP by default on loopback (as Docker); TLS where the server speaks it,
            # verified as anywhere else.
            scheme = "https" if self._speaks_tls(host) else "http"
        return Endpoint(DOCKER_HUB_API if host == DOCKER_HUB else host,
                        scheme if scheme == "http" else "https", f"/{prefix}" if prefix else "")

    def _speaks_tls(self, host: str) -> bool:
        """Whether a loopback registry answers a TLS handshake (once per client and host).

        A certificate it cannot verify still counts as TLS: the pull then fails on it
        rather than falling back to plain HTTP.
        """
        import socket
        import ssl

        with self._lock:
            known = self._loopback_tls.get(host)
        if known is not None:
            return known
        name, port = _split_host_port(host)
        answer = False
        try:
            with socket.create_connection((name, port or 443), timeout=3.0) as sock, \
                    self._ssl.wrap_socket(sock, server_hostname=name):
                answer = True
        except ssl.SSLCertVerificationError:
            answer = True
        except OSError:  # ssl.SSLError too: "wrong version number" from a plain server
            answer = False
        with self._lock:
            self._loopback_tls[host] = answer
        return answer

    def endpoints(self, ref: Reference) -> list[Endpoint]:
        """Mirrors that apply to ``ref``'s registry, in order, then the registry itself."""
        out: list[Endpoint] = []
        for spec in self.options.mirrors:
            target, sep, where = spec.partition("=")
            if not sep:
                target, where = DOCKER_HUB, spec
            if target.strip() in ("*", ref.registry) or _hub_alias(target.strip()) == ref.registry:
                out.append(self._endpoint(where))
        out.append(self._endpoint(ref.registry))
        return out

    # -- HTTP + auth -------------------------------------------------------------------

    def _request(
        self, ep: Endpoint, method: str, path: str, repo: str,
        headers: dict[str, str] | None = None,
    ) -> urllib3.BaseHTTPResponse:
        import urllib3

        hdrs = dict(headers or {})
        key = (ep.host, repo)
        for attempt in range(2):
            with self._lock:
                auth = self._auth.get(key)
            if auth:
                hdrs["Authorization"] = auth
            try:
                resp = self._pool.request(
                    method, ep.base + path, headers=hdrs, preload_content=False,
                    decode_content=False,
                    retries=urllib3.Retry(total=8, connect=0, read=0, status=0, other=0,
                                          redirect=5),
                )
            except urllib3.exceptions.SSLError as exc:
                raise RegistryError(ep.host, f"TLS error: {_short(exc)}") from None
            except urllib3.exceptions.HTTPError as exc:
                if PUBLIC_ONLY_REFUSAL in str(exc):  # (a redirect's host too)
                    raise RegistryError(ep.host, PUBLIC_ONLY_REFUSAL, refused=True) from None
                raise RegistryError(ep.host, f"cannot connect: {_short(exc)}") from None
            if resp.status != 401 or attempt:
                return resp
            challenge = resp.headers.get("WWW-Authenticate", "")
            resp.drain_conn()
            resp.release_conn()
            new = self._authenticate(ep, repo, challenge)
            with self._lock:
                self._auth[key] = new
        raise AssertionError("unreachable")

    def _authenticate(self, ep: Endpoint, repo: str, challenge: str) -> str:
        import base64

        import urllib3

        scheme, params = _parse_challenge(challenge)
        creds = self._creds.get(_hub_alias(ep.host))
        basic = ("Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
                 if creds else None)
        if scheme == "basic":
            if basic is None:
                raise RegistryError(ep.host, "authentication required and no credentials "
                                    "configured (docker login or [images] auths)")
            return basic
        if scheme != "bearer" or "realm" not in params:
            raise RegistryError(ep.host, f"unsupported authentication challenge {challenge!r}")
        realm = params["realm"]
        rhost = _host_of(realm)
        if not realm.startswith("https://") and not (
            ep.scheme == "http" or rhost in self.options.insecure
        ):
            raise RegistryError(ep.host, f"token realm {realm} is not HTTPS")
        query = {"scope": params.get("scope") or f"repository:{repo}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        hdrs = {"Authorization": basic} if basic else {}
        try:
            # Streamed: the realm is any URL the registry names, its answer of any size.
            resp = self._pool.request("GET", realm + ("&" if "?" in realm else "?")
                                      + urlencode(query), headers=hdrs,
                                      preload_content=False,
                                      retries=urllib3.Retry(total=3, redirect=3))
        except urllib3.exceptions.HTTPError as exc:
            if PUBLIC_ONLY_REFUSAL in str(exc):
                raise RegistryError(rhost, PUBLIC_ONLY_REFUSAL, refused=True) from None
            raise RegistryError(rhost, f"token request failed: {_short(exc)}") from None
        try:
            if resp.status in (401, 403):
                raise RegistryError(ep.host, "token request denied (bad or missing "
                                    "credentials)")
            if resp.status != 200:
                raise RegistryError(rhost, f"token request answered HTTP {resp.status}")
            body = _read_limited(resp, MAX_TOKEN_BYTES, rhost, "token response")
        except BaseException as exc:
            resp.close()  # a connection with unread bytes must not go back to the pool
            if isinstance(exc, urllib3.exceptions.HTTPError):
                raise RegistryError(rhost, f"token request failed: {_short(exc)}") from None
            raise
        finally:
            resp.release_conn()
        try:
            data = json.loads(body)
            token = data.get("token") or data.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(rhost, "token response has no token")
        return f"Bearer {token}"

    # -- manifests ---------------------------------------------------------------------

    def _get_manifest(self, ep: Endpoint, ref: Reference, which: str) -> tuple[bytes, str, str]:
        import hashlib

        resp = self._request(ep, "GET", f"/v2/{ref.repository}/manifests/{which}",
                             ref.repository, {"Accept": _ACCEPT})
        try:
            if resp.status == 404:
                raise RegistryError(ep.host, f"manifest {which} not found", not_found=True)
            if resp.status in (401, 403):
                raise RegistryError(ep.host, f"access denied (HTTP {resp.status})")
            if resp.status != 200:
                raise RegistryError(ep.host, f"manifest {which}: HTTP {resp.status}")
            body = _read_limited(resp, self.options.max_manifest_bytes, ep.host, "manifest")
        finally:
            resp.release_conn()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if which.startswith("sha256:") and digest != which:
            raise RegistryError(ep.host, f"manifest digest mismatch: asked {which}, got {digest}")
        mtype = resp.headers.get("Content-Type", "").split(";")[0].strip()
        return body, mtype, digest

    def resolve(self, ref: Reference, platform: Platform | None = None) -> Resolved:
        """Find ``ref``'s manifest for ``platform`` on the first endpoint that has it."""
        want = platform or self.options.platform or Platform.host()
        errors: list[RegistryError] = []
        for ep in self.endpoints(ref):
            try:
                return self._resolve_at(ep, ref, want)
            except RegistryError as exc:
                errors.append(exc)
        # The registry's own answer is the most telling; mirrors come first in the list.
        raise errors[-1] if len(errors) == 1 else RegistryError(
            errors[-1].registry,
            "; ".join(f"{e.registry}: {e.reason}" for e in errors[:-1])
            + f"; {errors[-1].reason}",
            not_found=all(e.not_found for e in errors),
            refused=any(e.refused for e in errors),
        )

    def _resolve_at(self, ep: Endpoint, ref: Reference, want: Platform) -> Resolved:
        bodies: dict[str, bytes] = {}
        body, mtype, top = self._get_manifest(ep, ref, ref.reference)
        digest = top
        chosen: str | None = None
        for _depth in range(3):  # an index may (rarely) point at another index
            bodies[digest] = body
            doc = _json(body, ep.host, "manifest")
            mtype = str(doc.get("mediaType") or mtype)
            if mtype in INDEX_TYPES or (not mtype and "manifests" in doc):
                entry = self._pick(ep, doc, want)
                chosen = str(want)
                body, mtype, digest = self._get_manifest(ep, ref, entry.digest)
                if digest != entry.digest:
                    raise RegistryError(ep.host, f"manifest digest mismatch for {entry.digest}")
                continue
            if mtype not in MANIFEST_TYPES and not (not mtype and "layers" in doc):
                raise RegistryError(ep.host, f"unsupported manifest type {mtype or '?'!r}")
            try:
                config = Descriptor.from_json(doc.get("config"), "config")
                layers = [Descriptor.from_json(d, f"layer {i}")
                          for i, d in enumerate(doc.get("layers") or [])]
            except ValueError as exc:
                raise RegistryError(ep.host, f"bad manifest: {exc}") from None
            if config.size > self.options.max_config_bytes:
                raise RegistryError(ep.host, f"config declares {config.size} bytes")
            for layer in layers:
                if layer.size > self.options.max_blob_bytes:
                    raise RegistryError(ep.host, f"layer {layer.digest} declares {layer.size} "
                                        f"bytes (limit {self.options.max_blob_bytes})")
                if "encrypted" in layer.media_type:
                    raise RegistryError(ep.host, f"encrypted layer {layer.digest}")
            return Resolved(ep, top, digest, doc, config, layers, chosen, bodies)
        raise RegistryError(ep.host, "index nesting too deep")

    @staticmethod
    def _pick(ep: Endpoint, index: dict[str, Any], want: Platform) -> Descriptor:
        best: tuple[int, Descriptor] | None = None
        seen: list[str] = []
        for i, raw in enumerate(index.get("manifests") or []):
            try:
                desc = Descriptor.from_json(raw, f"index entry {i}")
            except ValueError:
                continue
            plat = desc.platform or {}
            if plat.get("os") and plat.get("os") != "unknown":
                seen.append("/".join(str(plat.get(k)) for k in ("os", "architecture", "variant")
                                     if plat.get(k)))
            score = want.score(plat)
            if score and (best is None or score > best[0]):
                best = (score, desc)
        if best is None:
            raise RegistryError(ep.host, f"no manifest for platform {want} "
                                f"(index has: {', '.join(seen) or 'none'})", not_found=True)
        return best[1]

    # -- blobs -------------------------------------------------------------------------

    def fetch_blob(
        self, ep: Endpoint, repo: str, desc: Descriptor, dest: Path,
        progress: Progress | None = None,
    ) -> None:
        """Download ``desc`` into ``dest``, resuming after a broken connection; verify it.

        Raises RegistryError on a digest or size mismatch (``dest`` is then removed).
        """
        import hashlib

        import urllib3

        sha = hashlib.sha256()
        got = 0
        failures = 0
        path = f"/v2/{repo}/blobs/{desc.digest}"
        with dest.open("wb") as out:
            while True:
                hdrs = {"Range": f"bytes={got}-"} if got else {}
                try:
                    resp = self._request(ep, "GET", path, repo, hdrs)
                    try:
                        if resp.status == 404:
                            raise RegistryError(ep.host, f"blob {desc.digest} not found",
                                                not_found=True)
                        if got and resp.status == 200:  # no Range support: start over
                            out.seek(0)
                            out.truncate()
                            sha, got = hashlib.sha256(), 0
                        elif resp.status not in (200, 206) or (resp.status == 206 and not got):
                            raise RegistryError(ep.host, f"blob {desc.digest}: HTTP {resp.status}")
                        for chunk in resp.stream(_CHUNK):
                            got += len(chunk)
                            if got > desc.size:
                                raise RegistryError(ep.host, f"blob {desc.digest} is larger than "
                                                    f"its declared {desc.size} bytes")
                            sha.update(chunk)
                            out.write(chunk)
                            if progress:
                                progress(desc.digest, got, desc.size)
                    finally:
                        resp.release_conn()
                    if got < desc.size:
                        raise urllib3.exceptions.ProtocolError("connection closed early")
                    break
                except (urllib3.exceptions.HTTPError, OSError) as exc:
                    failures += 1
                    if failures > self.options.retries:
                        raise RegistryError(ep.host, f"download of {desc.digest} failed after "
                                            f"{failures} attempts: {_short(exc)}") from None
                    time.sleep(min(0.2 * 2**failures, 5.0))
                except RegistryError as exc:
                    # A connection error surfacing from _request is worth a retry too.
                    retryable = exc.reason.startswith("cannot connect")
                    if not retryable or failures >= self.options.retries:
                        raise
                    failures += 1
                    time.sleep(min(0.2 * 2**failures, 5.0))
        digest = "sha256:" + sha.hexdigest()
        if got != desc.size or digest != desc.digest:
            raise RegistryError(ep.host, f"blob {desc.digest} failed verification "
                                f"(got {digest}, {got} of {desc.size} bytes)")

    def fetch_small_blob(self, ep: Endpoint, repo: str, desc: Descriptor, limit: int) -> bytes:
        """A verified small blob (the image config) in memory."""
        import hashlib

        resp = self._request(ep, "GET", f"/v2/{repo}/blobs/{desc.digest}", repo)
        try:
            if resp.status != 200:
                raise RegistryError(ep.host, f"blob {desc.digest}: HTTP {resp.status}",
                                    not_found=resp.status == 404)
            body = _read_limited(resp, min(limit, desc.size), ep.host, "config")
        finally:
            resp.release_conn()
        if "sha256:" + hashlib.sha256(body).hexdigest() != desc.digest or len(body) != desc.size:
            raise RegistryError(ep.host, f"blob {desc.digest} failed verification")
        return body


def _read_limited(resp: urllib3.BaseHTTPResponse, limit: int, host: str, what: str) -> bytes:
    data = bytearray()
    for chunk in resp.stream(64 << 10):
        data += chunk
        if len(data) > limit:
            raise RegistryError(host, f"{what} larger than {limit} bytes")
    return bytes(data)


def _json(body: bytes, host: str, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise RegistryError(host, f"{what} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RegistryError(host, f"{what} is not a JSON object")
    return doc


def _short(exc: BaseException) -> str:
    """One line: urllib3 nests the real cause deep inside a long message."""
    text = str(getattr(exc, "reason", None) or exc)
    return text.splitlines()[0][:200] if text else type(exc).__name__
