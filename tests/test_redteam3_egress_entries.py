"""Outside review: egress entries that meant one thing to the user and another to the gate.

`--deny-host 3325256705` (or `198.51.100.1` written `0xc6336401`, `198.13333505`, or as
IPv4-mapped IPv6 `::ffff:198.51.100.1`) means an address to anyone who has used inet_aton,
ping or curl. The parser kept the short forms as *names* and the mapped one as an IPv6
network, so the deny never matched the IPv4 connection it meant to stop: it failed open,
silently. They are refused now, with the a.b.c.d to write instead. (What a sandbox sends
held: the C library turns `127.1` into 127.0.0.1 itself, the sandbox's own loopback, and
a DNS query for such a name gets its answer filtered of always-denied addresses.)
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel.egress_policy import parse_entry
from agentkernel.errors import UsageError
from sandbox_helpers import Upstream, ak, backend_available, serving_upstream
from test_egress_policy import PROBE  # each [label, kind, *args]: here "raw" connects


def _forms(addr: str) -> list[str]:
    n = int(ipaddress.IPv4Address(addr))
    a, b, c, d = (int(x) for x in addr.split("."))
    return [str(n), hex(n), f"{a}.{(b << 16) | (c << 8) | d}", f"{a}.{b}.{(c << 8) | d}",
            "0" + oct(n)[2:], f"::ffff:{addr}"]


@pytest.mark.parametrize("form", [*_forms("198.51.100.1"), "127.1", "0x7f.1", "*.127.1",
                                  "2130706433:80"])
def test_short_ipv4_forms_are_not_names(form: str) -> None:
    with pytest.raises(UsageError, match="IPv4"):
        parse_entry(form)


@pytest.mark.parametrize("name", ["example.com", "1.2.3.4.5", "123.example", "*.example.com",
                                  "0x.example", "xn--bcher-kva.example"])
def test_names_stay_names(name: str) -> None:
    assert parse_entry(name).kind in ("name", "suffix")


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    if not backend_available("namespaces"):
        pytest.skip("bwrap is not installed")
    with serving_upstream(["allowed.test"]) as up:
        yield up


def test_a_deny_in_a_numeric_form_never_fails_open(upstream: Upstream, tmp_path: Path) -> None:
    """Each odd spelling of the upstream's address as --deny-host: the run is refused
    (a usage error, saying why) or the address is blocked; never reached."""
    todo = json.dumps([["direct", "raw", upstream.addr2, 18022]])
    for form in (_forms(upstream.addr2)[0], _forms(upstream.addr2)[-1]):
        r = ak("run", "-B", "namespaces", "-i", "host", "--deny-host", form, "--",
               "python3", "-c", PROBE, todo, cwd=tmp_path, env={"AGENTKERNEL_NO_DAEMON": "1"})
        if r.returncode == 0:
            seen = json.loads(r.stdout)
            assert not seen["direct"].startswith("reached"), (form, seen)
        else:
            assert r.returncode in (2, 125) and "IPv4" in r.stderr, (form, r.stderr)



@pytest.mark.parametrize("name", ["faß.example", "σς.example", "a\u200db.example",
                                  "FAẞ.example"])
def test_idna_deviations_are_refused(name: str) -> None:
    """Python's codec (IDNA 2003) made `faß.example` `fass.example`; a client asks for
    `xn--fa-hia.example` (IDNA 2008): a deny missed it, an allow let in another domain."""
    with pytest.raises(UsageError, match="punycode"):
        parse_entry(name)


def test_a_deny_of_an_idna_deviation_never_fails_open(upstream: Upstream,
                                                      tmp_path: Path) -> None:
    """--deny-host faß.test, and the sandbox connects to faß.test as curl and browsers
    spell it (xn--fa-hia.test), which our resolver answers: refused, or blocked."""
    todo = json.dumps([["by name", "raw", "xn--fa-hia.test", 18022]])
    r = ak("run", "-B", "namespaces", "-i", "host", "--deny-host", "faß.test",
           "--add-host", f"xn--fa-hia.test:{upstream.addr}", "--", "python3", "-c", PROBE,
           todo, cwd=tmp_path, env={"AGENTKERNEL_NO_DAEMON": "1"})
    if r.returncode == 0:
        assert not json.loads(r.stdout)["by name"].startswith("reached"), r.stdout
    else:
        assert r.returncode in (2, 125) and "punycode" in r.stderr, r.stderr
