"""The egress policy as a value, and the gate's parsers of hostile bytes (fuzzed)."""

from __future__ import annotations

import contextlib
import random
import ssl
import struct

import pytest

from agentkernel import egress_wire as wire
from agentkernel.egress_policy import Policy, build_policy, parse_entry, parse_static_host
from agentkernel.errors import UsageError


def test_entries_are_normalised() -> None:
    assert parse_entry("Example.COM.").value == "example.com"
    assert parse_entry("*.Example.com").kind == "suffix"
    assert parse_entry("bücher.example").value == "xn--bcher-kva.example"
    e = parse_entry("api.example.com:8443")
    assert (e.kind, e.value, e.port) == ("name", "api.example.com", 8443)
    assert parse_entry("10.1.2.0/24").value == "10.1.2.0/24"
    assert parse_entry("[2001:db8::1]:443").port == 443
    assert parse_entry("*").kind == "any"
    for bad in ("", "a..b", "exa mple.com", "host:0", "host:99999", "[::1", "-" * 300):
        with pytest.raises(UsageError):
            parse_entry(bad)
    assert parse_static_host("x.test:198.18.0.2") == ("x.test", "198.18.0.2")


def test_deny_wins_over_allow_over_default() -> None:
    p = build_policy(network="egress", allow=["*.example.com", "exact.test:443"],
                     deny=["bad.example.com"], hosts=[])
    assert p is not None and not p.default_allow
    assert p.name_verdict("a.example.com", 80).allowed
    assert not p.name_verdict("example.com", 80).allowed  # *.domain: subdomains only
    assert p.name_verdict("bad.example.com", 443) != (True, "deny bad.example.com")
    assert p.name_verdict("bad.example.com", 443).rule == "deny bad.example.com"
    assert p.name_verdict("exact.test", 443).allowed
    assert not p.name_verdict("exact.test", 80).allowed
    open_ = build_policy(network="egress", allow=[], deny=["*"], hosts=[])
    assert open_ is not None and not open_.name_verdict("anything.test", 443).allowed
    assert build_policy(network="none", allow=["x.test"], deny=[], hosts=[]) is None
    assert Policy().with_rule("allow", "x.test").default_allow is False
    assert Policy.from_json(p.to_json()) == p


def _hello(name: str) -> bytes:
    """A real ClientHello from the ssl module, for `name`."""
    ctx = ssl.create_default_context()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def test_sni_of_a_real_client_hello() -> None:
    hello = _hello("api.example.com")
    assert wire.sni(hello) == "api.example.com"
    for cut in (0, 3, 10, len(hello) - 1):
        assert wire.sni(hello[:cut]) == wire.NEED_MORE
    assert wire.sni(b"GET / HTTP/1.1\r\n") == wire.NOT_THIS


def test_http_head() -> None:
    head = b"GET /x HTTP/1.1\r\nHost: Example.com:8080\r\nX-A: b\r\n\r\nbody"
    method, target, headers = wire.http_head(head)  # type: ignore[misc]
    assert (method, target) == ("GET", "/x")
    assert wire.http_host(headers) == "example.com"
    assert wire.http_head(b"GE") == wire.NEED_MORE
    assert wire.http_head(b"\x16\x03\x01") == wire.NOT_THIS
    with pytest.raises(ValueError):
        wire.http_host([("host", "a"), ("host", "b")])
    with pytest.raises(ValueError):
        wire.http_head(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 5000)


def _query(name: str, qtype: int = 1) -> bytes:
    q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return q + struct.pack(">HH", qtype, 1)


def test_dns_round_trip() -> None:
    q = wire.dns_query(_query("Allowed.Test"))
    assert (q.ident, q.name, q.qtype) == (0x1234, "allowed.test", 1)
    reply = wire.dns_answer(q, wire.RCODE_OK, ["198.18.0.2", "2001:db8::1"])
    assert struct.unpack(">H", reply[6:8])[0] == 1 and reply.endswith(bytes([198, 18, 0, 2]))
    for bad in (b"", b"\0" * 11, _query("a")[:-1], b"\x12\x34\x81\x00" + b"\0" * 8):
        with pytest.raises(ValueError):
            wire.dns_query(bad)


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        if op < 0.5 and buf:
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op < 0.75:
            cut = rng.randrange(len(buf) + 1)
            buf = buf[:cut]
        else:
            pos = rng.randrange(len(buf) + 1)
            buf[pos:pos] = rng.randbytes(rng.randint(1, 16))
    return bytes(buf)


@pytest.mark.parametrize("seed", range(4))
def test_parsers_survive_fuzzing(seed: int) -> None:
    """Mutated and random inputs: every parser returns or raises ValueError, nothing else."""
    rng = random.Random(seed)
    seeds = [_hello("a.example.com"), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", _query("a.b.c")]
    for i in range(4000):
        base = seeds[i % 3]
        data = _mutate(rng, base) if i % 5 else rng.randbytes(rng.randint(0, 600))
        for parse in (wire.sni, wire.http_head, wire.dns_query):
            try:
                got = parse(data)
            except ValueError:
                continue
            if parse is wire.http_head and isinstance(got, tuple):
                with contextlib.suppress(ValueError):
                    wire.http_host(got[2])
