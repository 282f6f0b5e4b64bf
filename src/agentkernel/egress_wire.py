"""Small, bounded parsers of what a sandbox sends out: TLS ClientHello SNI, HTTP Host, DNS.

Every input is hostile. Each parser reads at most the bytes it is given, never loops more
than the input's length, and answers one of: a value, NEED_MORE (a prefix of something
valid; the caller reads on, up to its own cap), or NOT_THIS / a ValueError (refuse).
"""

from __future__ import annotations

import struct

NEED_MORE = "need-more"
NOT_THIS = "not-this"
MAX_HELLO = 16384 + 5  # one TLS record: a ClientHello split over records is refused
MAX_HTTP_HEAD = 16384


def sni(data: bytes) -> str | None:
    """The server name of a TLS ClientHello at the start of `data`.

    Returns the name (lower case, as sent), None for a ClientHello without SNI, NEED_MORE,
    or NOT_THIS when `data` does not start like a TLS handshake record. ValueError for a
    malformed one.
    """
    if not data:
        return NEED_MORE
    if data[0] != 0x16:
        return NOT_THIS
    if len(data) < 5:
        return NEED_MORE
    if data[1] != 3:
        return NOT_THIS
    length = struct.unpack(">H", data[3:5])[0]
    if length > MAX_HELLO - 5 or length < 4:
        raise ValueError("bad TLS record length")
    if len(data) < 5 + length:
        return NEED_MORE
    body = data[5:5 + length]
    if body[0] != 1:
        raise ValueError("not a ClientHello")
    hello_len = int.from_bytes(body[1:4], "big")
    if hello_len > len(body) - 4:
        raise ValueError("ClientHello spans records")
    hello = body[4:4 + hello_len]
    pos = 2 + 32  # version, random
    pos = _skip(hello, pos, 1)  # session id
    pos = _skip(hello, pos, 2)  # cipher suites
    pos = _skip(hello, pos, 1)  # compression methods
    if pos == len(hello):
        return None  # no extensions
    end = pos + 2 + _u16(hello, pos)
    if end > len(hello):
        raise ValueError("extensions overrun")
    pos += 2
    while pos + 4 <= end:
        kind, size = _u16(hello, pos), _u16(hello, pos + 2)
        pos += 4
        if pos + size > end:
            raise ValueError("extension overruns")
        if kind == 0:
            return _server_name(hello[pos:pos + size])
        pos += size
    return None


def _server_name(ext: bytes) -> str:
    if len(ext) < 5 or _u16(ext, 0) != len(ext) - 2 or ext[2] != 0:
        raise ValueError("bad server_name extension")
    size = _u16(ext, 3)
    if size == 0 or 5 + size > len(ext):
        raise ValueError("bad server_name")
    raw = ext[5:5 + size]
    if not raw.isascii():
        raise ValueError("server_name is not ASCII")
    return raw.decode("ascii").lower()


def _u16(data: bytes, pos: int) -> int:
    if pos + 2 > len(data):
        raise ValueError("truncated")
    return int(struct.unpack_from(">H", data, pos)[0])


def _skip(data: bytes, pos: int, width: int) -> int:
    if pos + width > len(data):
        raise ValueError("truncated")
    size = int.from_bytes(data[pos:pos + width], "big")
    if pos + width + size > len(data):
        raise ValueError("truncated")
    return pos + width + size


HTTP_METHODS = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ",
                b"CONNECT ", b"TRACE ", b"PROPFIND ")


def http_head(data: bytes) -> tuple[str, str, list[tuple[str, str]]] | str:
    """The request line's method and target and the headers of an HTTP/1 request at the
    start of `data`, NEED_MORE, or NOT_THIS. ValueError for a malformed or oversized head."""
    if not data:
        return NEED_MORE
    if not any(m.startswith(data[:len(m)]) for m in HTTP_METHODS):
        return NOT_THIS
    end = data.find(b"\r\n\r\n", 0, MAX_HTTP_HEAD)
    if end < 0:
        if len(data) >= MAX_HTTP_HEAD:
            raise ValueError("HTTP head too large")
        return NEED_MORE
    lines = data[:end].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise ValueError("bad request line")
    if any(c in line for line in lines for c in (b"\r", b"\n", b"\0")):
        # A bare CR or LF ends a line for some servers and not for others: what we read
        # as one header could be two, or the end of the head, upstream.
        raise ValueError("bare CR, LF or NUL in the head")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or not name.isascii():
            raise ValueError("bad header line")
        headers.append((name.decode("ascii").lower(), value.strip().decode("latin-1")))
    return parts[0].decode("ascii"), parts[1].decode("latin-1"), headers


def http_host(headers: list[tuple[str, str]]) -> str | None:
    """The one Host header's name (port and brackets removed), lower case; ValueError if
    there are several."""
    hosts = [v for k, v in headers if k == "host"]
    if len(hosts) > 1:
        raise ValueError("several Host headers")
    if not hosts:
        return None
    host = hosts[0].strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def request_host(method: str, target: str, headers: list[tuple[str, str]]) -> str | None:
    """The host a request goes to as a server reads it: CONNECT's target, an absolute-form
    target's authority (which servers prefer over Host: a different Host is refused), else
    the Host header; lower case, without port or brackets. ValueError if ambiguous."""
    host = http_host(headers)
    if method == "CONNECT":
        return _authority_host(target)
    scheme, sep, rest = target.partition("://")
    if sep and scheme.lower() in ("http", "https"):
        authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
        named = _authority_host(authority.rpartition("@")[2])
        if host is not None and host != named:
            raise ValueError("the request's target and Host name different hosts")
        return named
    return host


def _authority_host(authority: str) -> str:
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[1:authority.find("]")] if "]" in authority else authority
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


# --- DNS ---------------------------------------------------------------------------------

QTYPE_A, QTYPE_AAAA = 1, 28
RCODE_OK, RCODE_FORMERR, RCODE_NXDOMAIN, RCODE_NOTIMP, RCODE_REFUSED = 0, 1, 3, 4, 5
MAX_DNS = 4096


class Question:
    """The one question of a DNS query: id, flags wanted back, name, type, class."""

    __slots__ = ("ident", "name", "qclass", "qtype", "raw", "rd")

    def __init__(self, ident: int, rd: bool, name: str, qtype: int, qclass: int,
                 raw: bytes) -> None:
        self.ident, self.rd, self.name, self.qtype, self.qclass = ident, rd, name, qtype, qclass
        self.raw = raw  # the question section as sent, echoed in the answer


def dns_query(data: bytes) -> Question:
    """The one question of a standard query; ValueError otherwise (no compression in a
    question, at most 253 characters, labels of 1..63 bytes)."""
    if len(data) < 12 or len(data) > MAX_DNS:
        raise ValueError("bad DNS message size")
    ident, flags, qd, an, ns, _ar = struct.unpack(">HHHHHH", data[:12])
    if flags & 0x8000 or (flags >> 11) & 0xF != 0 or qd != 1 or an or ns:
        raise ValueError("not a standard one-question query")
    pos, labels = 12, []
    while True:
        if pos >= len(data):
            raise ValueError("truncated name")
        size = data[pos]
        pos += 1
        if size == 0:
            break
        if size > 63 or pos + size > len(data):
            raise ValueError("bad label")
        labels.append(data[pos:pos + size])
        pos += size
        if sum(len(x) + 1 for x in labels) > 254:
            raise ValueError("name too long")
    if pos + 4 > len(data):
        raise ValueError("truncated question")
    qtype, qclass = struct.unpack(">HH", data[pos:pos + 4])
    if not all(x.isascii() for x in labels):
        raise ValueError("non-ASCII name")
    name = ".".join(x.decode("ascii") for x in labels).lower()
    return Question(ident, bool(flags & 0x0100), name, qtype, qclass, data[12:pos + 4])


def dns_answer(q: Question, rcode: int, addrs: list[str] = (),  # type: ignore[assignment]
               ttl: int = 30) -> bytes:
    """A response to `q`: `rcode`, and A/AAAA records (those matching its type) for it."""
    import socket

    records = b""
    count = 0
    for addr in addrs:
        fam, qt = (socket.AF_INET6, QTYPE_AAAA) if ":" in addr else (socket.AF_INET, QTYPE_A)
        if qt != q.qtype:
            continue
        rdata = socket.inet_pton(fam, addr)
        records += struct.pack(">HHHIH", 0xC00C, qt, 1, ttl, len(rdata)) + rdata
        count += 1
    flags = 0x8000 | 0x0080 | (0x0100 if q.rd else 0) | 0x0400 | rcode  # QR RA RD AA
    return struct.pack(">HHHHHH", q.ident, flags, 1, count, 0, 0) + q.raw + records


def dns_error(data: bytes, rcode: int) -> bytes | None:
    """A bare error reply echoing the id of whatever came in, or None if too short."""
    if len(data) < 2:
        return None
    return data[:2] + struct.pack(">HHHHH", 0x8080 | rcode, 0, 0, 0, 0)
