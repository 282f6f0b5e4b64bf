"""The gate's TLS interception, for the hosts of a sandbox's secrets only: terminate the
sandbox's TLS with the sandbox's own CA, put the secret's value in place of its placeholder
in the one configured header, and speak verified TLS to the real host."""

from __future__ import annotations

import asyncio
import ssl
from typing import NamedTuple

from . import egress_wire as wire

MAX_BODY_CHUNK = 256 * 1024


class Held(NamedTuple):
    """A secret as the gate holds it (the value never leaves the gate but to its hosts)."""

    name: str
    hosts: frozenset[str]
    header: str  # lower case, or "*"
    placeholder: bytes
    value: bytes


# The headers a `*` secret goes into: those that carry credentials, an allow-list. Any
# other header may be echoed back by some server (Host in redirects, X-Request-Id by
# Rails and many proxies, Idempotency-Key by Stripe, X-Forwarded-Prefix into Location,
# Prefer into Preference-Applied...), so the command that chose the header would read the
# value back; a deny-list of those lagged behind them (round 8, then its review). A
# placeholder in any other header is a leak like any outside its header. A secret
# configured for one header gets it whatever its name (the user named it), but never Host,
# which names where it goes.
WILDCARD_HEADERS = frozenset({
    "authorization", "proxy-authorization", "cookie", "x-api-key", "api-key", "apikey",
    "x-goog-api-key", "x-auth-token", "x-access-token", "private-token", "x-token",
    "x-amz-security-token",
})


def _fills(h: Held, lname: str) -> bool:
    """Whether secret `h` goes into header `lname` (its own, or a credential one for `*`)."""
    if lname == "host":
        return False
    return h.header == lname or (h.header == "*" and lname in WILDCARD_HEADERS)


class SecretLeak(Exception):
    """A placeholder where it must not go: the connection ends, the log says which."""


class TlsEnd:
    """One TLS endpoint over an asyncio stream pair (memory BIOs: the gate has already
    read the ClientHello, and hands it in)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 ctx: ssl.SSLContext, *, server_hostname: str | None = None,
                 server_side: bool = False, first: bytes = b"") -> None:
        self.reader, self.writer = reader, writer
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                server_hostname=server_hostname)
        self.got = len(first)  # bytes read from this end (the audit log's byte counts)
        if first:
            self.incoming.write(first)

    async def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def _fill(self) -> bool:
        chunk = await self.reader.read(MAX_BODY_CHUNK)
        if not chunk:
            self.incoming.write_eof()
            return False
        self.got += len(chunk)
        self.incoming.write(chunk)
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                await self._flush()
                return
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise ConnectionError("TLS peer left during the handshake") from None

    async def recv(self) -> bytes:
        while True:
            try:
                return self.obj.read(MAX_BODY_CHUNK)
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    return b""
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    async def send(self, data: bytes) -> None:
        self.obj.write(data)
        await self._flush()


def rewrite_head(head: bytes, host: str, held: list[Held], inject: bool = True) -> bytes:
    """The request head with each secret for `host` put in place of its placeholder in its
    header (with `inject`: the request names `host`); SecretLeak if a placeholder is
    anywhere else (another header, the request line, a secret for other hosts)."""
    lines = head.split(b"\r\n")
    out = [lines[0]]
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        lname = name.strip().lower().decode("latin-1")
        for h in held:
            if inject and h.placeholder in value and host in h.hosts and _fills(h, lname):
                value = value.replace(h.placeholder, h.value)
        out.append(name + b":" + value)
    rewritten = b"\r\n".join(out)
    for h in held:
        if h.placeholder in rewritten:
            raise SecretLeak(f"placeholder of secret {h.name} in a request to {host} "
                             f"outside its header {h.header!r}")
    return rewritten


async def intercept(client: TlsEnd, upstream: TlsEnd, host: str, held: list[Held]) -> int:
    """Relay requests client -> upstream, rewriting each HTTP/1 head; responses flow back
    untouched. Returns the number of heads rewritten. A body of unknown length (chunked)
    ends inspection: the rest of that connection is relayed as it is, with no secret put
    in (the placeholder, if sent again, reaches the host as a placeholder)."""
    down = asyncio.get_running_loop().create_task(_relay(upstream, client))
    heads = 0
    buf = b""
    try:
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > wire.MAX_HTTP_HEAD:
                    raise SecretLeak("request head too large to inspect")
                chunk = await client.recv()
                if not chunk:
                    break
                buf += chunk
                continue
            head, buf = buf[:end], buf[end + 4:]
            parsed = wire.http_head(head + b"\r\n\r\n")
            if not isinstance(parsed, tuple):
                raise SecretLeak("not an HTTP/1 request")
            # A secret goes only into a request that names its host (no Host naming
            # another site behind the same server), with a body length read one way only,
            # and never into a TRACE: its answer is the request as the server got it,
            # headers and all (round 8: the upstream handed the command its value).
            named = wire.request_host(*parsed) == host and parsed[0] != "TRACE"
            await upstream.send(rewrite_head(head, host, held, named) + b"\r\n\r\n")
            heads += 1
            if any(k == "transfer-encoding" for k, _ in parsed[2]):
                await upstream.send(buf)  # length unknown here: relayed as it is, no secret
                await _relay(client, upstream)
                break
            remaining = _body_length(parsed[2])
            while remaining > 0:
                if not buf:
                    buf = await client.recv()
                    if not buf:
                        raise ConnectionError("client left mid-body")
                part, buf = buf[:remaining], buf[remaining:]
                await upstream.send(part)
                remaining -= len(part)
        await down
    finally:
        down.cancel()
    return heads


def _body_length(headers: list[tuple[str, str]]) -> int:
    """The one Content-Length (0 if none); SecretLeak if several or not plain digits: two
    readings of where a body ends would let a placeholder past as a head and its value
    reach the host as a body."""
    lengths = [v for k, v in headers if k == "content-length"]
    if len(lengths) > 1 or (lengths and not (lengths[0].isascii() and lengths[0].isdigit())):
        raise SecretLeak("ambiguous Content-Length")
    return int(lengths[0]) if lengths else 0


async def _relay(src: TlsEnd, dst: TlsEnd) -> None:
    while True:
        data = await src.recv()
        if not data:
            return
        await dst.send(data)


def server_context(leaf: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(leaf)
    ctx.set_alpn_protocols(["http/1.1"])  # requests are rewritten as HTTP/1 heads
    return ctx


def client_context(cafile: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)  # upstream verified as any client would
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
