"""Property-based fuzzing (hypothesis) of what the egress gate parses from a sandbox: TLS
ClientHello, HTTP request heads (plain, and inside an intercepted TLS connection where a
secret is put in), DNS queries. Bounded: a fixed number of examples each, no database.

Beyond "returns or raises ValueError": a definite answer does not depend on bytes after
what it needs; a name found is one the bytes carry; and, for secrets, whatever bytes the
sandbox sends, the value reaches the upstream only in the configured header of a request
to the secret's host, *as a lenient upstream reads the stream* (first Content-Length,
bare LF line ends, absolute-form targets) — never in a body, another header or a request
to another host.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentkernel import egress_wire as wire
from agentkernel.egress_mitm import Held, SecretLeak, intercept
from agentkernel.egress_proxy import first_name

FUZZ = settings(max_examples=800, deadline=None, database=None, derandomize=False,
                suppress_health_check=list(HealthCheck))
HOST = "secret.test"
PH = b"ak-secret-0123456789abcdef0123456789abcdef"
VALUE = b"sk-REAL-VALUE-42"
HELD = [Held("k", frozenset({HOST}), "x-api-key", PH, VALUE)]
LOOP = asyncio.new_event_loop()  # one for every example: a loop per example costs more


def _hello(name: str) -> bytes:
    ctx = ssl.create_default_context()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


HELLOS = [_hello(n) for n in ("a.example.com", "xn--bcher-kva.example", "x" * 60 + ".test")]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed with some bytes changed, cut, inserted or a length field rewritten."""
    buf = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.integers(0, 3))
        pos = draw(st.integers(0, len(buf)))
        if op == 0 and pos < len(buf):
            buf[pos] = draw(st.integers(0, 255))
        elif op == 1:
            del buf[pos:pos + draw(st.integers(1, 64))]
        elif op == 2:
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        elif pos + 2 <= len(buf):
            buf[pos:pos + 2] = struct.pack(">H", draw(st.sampled_from(
                [0, 1, 2, 3, 4, 5, 0xFF, 0x100, 0x3FFF, 0x4000, 0xFFFF])))
    return bytes(buf)


def _stable(parse: object, data: bytes, got: object, extra: bytes) -> None:
    if got in (wire.NEED_MORE, wire.NOT_THIS):
        return
    try:
        again = parse(data + extra)  # type: ignore[operator]
    except ValueError:
        raise AssertionError("a definite answer changed with trailing bytes") from None
    assert again == got


@FUZZ
@given(st.one_of(mutated(HELLOS), st.binary(max_size=600)), st.binary(max_size=64))
def test_client_hello(data: bytes, extra: bytes) -> None:
    try:
        got = wire.sni(data)
    except ValueError:
        return
    if isinstance(got, str) and got not in (wire.NEED_MORE, wire.NOT_THIS):
        assert got.isascii() and got == got.lower() and got.encode() in data.lower()
    _stable(wire.sni, data, got, extra)


HEADS = [b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
         b"POST http://b.test/x HTTP/1.1\r\nHost: b.test:80\r\nContent-Length: 3\r\n\r\nabc",
         b"CONNECT c.test:443 HTTP/1.1\r\nHost: c.test:443\r\n\r\n"]


@FUZZ
@given(st.one_of(mutated(HEADS), st.binary(max_size=400)), st.binary(max_size=64))
def test_http_head(data: bytes, extra: bytes) -> None:
    try:
        got = wire.http_head(data)
    except ValueError:
        return
    _stable(wire.http_head, data, got, extra)
    if isinstance(got, tuple):
        method, target, headers = got
        try:
            name = wire.request_host(method, target, headers)
        except ValueError:
            return
        if name is not None:
            assert name in data.decode("latin-1").lower()


@FUZZ
@given(st.one_of(mutated(HEADS + HELLOS[:1]), st.binary(max_size=300)), st.integers(0, 300))
def test_first_bytes_of_a_connection(data: bytes, cut: int) -> None:
    """The gate's judge of a connection's first bytes, as they arrive in two parts: a
    name or none, else refused; an answer given on the first part is the answer on the
    whole (the gate acts on it), and a name found is one the bytes carry."""
    def judge(part: bytes, eof: bool) -> object:
        try:
            return first_name(part, eof)
        except ConnectionError:
            return "refused"

    early, final = judge(data[:cut], False), judge(data, True)
    assert final is not None  # at the end, always an answer
    if early is not None:
        assert early == final
    if isinstance(final, tuple):
        name, proto = final
        assert proto in ("tls", "http", "raw")
        assert name is None or name in data.decode("latin-1").lower()


def _query(labels: list[bytes], qtype: int, flags: int = 0x0100) -> bytes:
    return struct.pack(">HHHHHH", 0xBEEF, flags, 1, 0, 0, 0) + \
        b"".join(bytes([len(x)]) + x for x in labels) + b"\0" + struct.pack(">HH", qtype, 1)


LABEL = st.binary(min_size=1, max_size=63).filter(lambda b: b.isascii())


@FUZZ
@given(st.one_of(st.builds(_query, st.lists(LABEL, max_size=6), st.integers(0, 0xFFFF),
                           st.integers(0, 0xFFFF)),
                 mutated([_query([b"a", b"b"], 1)]), st.binary(max_size=600)))
def test_dns_query(data: bytes) -> None:
    try:
        q = wire.dns_query(data)
    except ValueError:
        return
    assert len(q.name) <= 253 and q.name == q.name.lower()
    reply = wire.dns_answer(q, wire.RCODE_OK, ["198.18.0.2", "2001:db8::2"])
    ident, flags, qd, an = struct.unpack(">HHHH", reply[:8])
    assert ident == q.ident and flags & 0x8000 and qd == 1 and an <= 1
    assert reply[12:12 + len(q.raw)] == q.raw


# --- secrets: what a lenient upstream reads from the intercepted stream -----------------


class _End:
    """Stands for a TLS end in egress_mitm.intercept: what it receives, what was sent."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks, self.sent = list(chunks), bytearray()

    async def recv(self) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""

    async def send(self, data: bytes) -> None:
        self.sent += data


def _upstream_reads(stream: bytes) -> list[tuple[bytes, bytes]]:
    """(head, body) of each request as a lenient server reads them: a head ends at the first
    blank line (CRLF or bare LF), the body is the first Content-Length's; chunked or an
    unreadable length: the rest is body."""
    out = []
    while stream:
        m = re.search(rb"\r?\n\r?\n", stream)
        if m is None:
            out.append((b"", stream))
            break
        head, stream = stream[:m.start()], stream[m.end():]
        fields = [line.partition(b":") for line in re.split(rb"\r?\n", head)[1:]]
        lengths = [v.strip() for k, _, v in fields if k.strip().lower() == b"content-length"]
        chunked = any(k.strip().lower() == b"transfer-encoding" for k, _, _ in fields)
        if chunked or (lengths and not lengths[0].isdigit()):
            out.append((head, stream))
            break
        size = int(lengths[0]) if lengths else 0
        out.append((head, stream[:size]))
        stream = stream[size:]
    return out


def _request_host(head: bytes) -> bytes | None:
    lines = re.split(rb"\r?\n", head)
    target = lines[0].split(b" ")[1] if len(lines[0].split(b" ")) > 1 else b""
    m = re.match(rb"(?i)https?://([^/:?#]*)", target)
    if m:
        return m.group(1).lower()
    hosts = [v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:])
             if k.strip().lower() == b"host"]
    return hosts[0].split(b":")[0].lower() if hosts else None


HEADER = st.sampled_from([
    b"Host: secret.test", b"Host: secret.test:443", b"Host: other.test", b"HOST: other.test",
    b"x-api-key: " + PH, b"X-Api-Key: " + PH, b"authorization: Bearer " + PH,
    b"Content-Length: 0", b"Content-Length: 5", b"Content-Length: 40", b"Content-Length: -1",
    b"Content-Length: +5", b"Content-Length: 5, 5", b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: identity", b"x-api-key: " + PH + b"\n\nPOST /leak HTTP/1.1",
    b"x-api-key: a\rX-Api-Key: " + PH, b"Accept: */*"])
TARGET = st.sampled_from([b"/", b"/x?" + PH, b"http://other.test/", b"https://secret.test/",
                          b"*"])
BODY = st.one_of(st.just(b""), st.just(b"{\"k\": \"" + PH + b"\"}"),
                 st.just(b"GET / HTTP/1.1\r\nHost: secret.test\r\nx-api-key: " + PH +
                         b"\r\n\r\n"), st.binary(max_size=20))


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        head = b"POST " + draw(TARGET) + b" HTTP/1.1\r\n"
        head += b"".join(h + b"\r\n" for h in draw(st.lists(HEADER, max_size=5)))
        out += head + b"\r\n" + draw(BODY)
    return out


@FUZZ
@given(requests(), st.integers(1, 64))
def test_secret_goes_only_where_it_may(stream: bytes, cut: int) -> None:
    chunks = [stream[i:i + cut] for i in range(0, len(stream), cut)]
    client, upstream = _End(chunks), _End([])

    async def go() -> None:
        with contextlib.suppress(SecretLeak, ValueError, ConnectionError):
            await intercept(client, upstream, HOST, HELD)  # type: ignore[arg-type]

    LOOP.run_until_complete(go())
    sent = bytes(upstream.sent)
    if VALUE not in sent:
        return
    for head, body in _upstream_reads(sent):
        assert VALUE not in body, ("the value in a body", sent)
        if VALUE not in head:
            continue
        assert _request_host(head) == HOST.encode(), ("the value to another host", sent)
        for line in re.split(rb"\r?\n", head)[1:]:
            if VALUE in line:
                name = line.partition(b":")[0].strip().lower()
                assert name == b"x-api-key" and b"\r" not in line, ("another header", sent)
        assert VALUE not in re.split(rb"\r?\n", head)[0], ("the request line", sent)
