"""The egress policy as a value: allow/deny entries, static names, and the decisions on them."""

from __future__ import annotations

from typing import NamedTuple

from .errors import UsageError

# The gate's listeners, on 127.0.0.1 inside the sandbox's namespace. Here, not in
# egress_proxy: the CLI writes them into the rules, and importing the proxy (asyncio, ssl,
# logging) would cost a one-shot run ~15 ms.
TCP_PORT = 15001
DNS_PORT = 15053
MAX_ENTRIES = 1024  # per list: the policy travels in the plan and to the proxy
MAX_NAME = 253  # DNS's own limit on a name


class Entry(NamedTuple):
    """One allow or deny entry, normalised.

    kind: "name" (exact), "suffix" (`*.domain`: subdomains only, the domain itself not),
    "any" (`*`), or "net" (an address or CIDR). `port` None: every port.
    """

    kind: str
    value: str  # punycoded lower-case name, the suffix without "*.", or a network
    port: int | None
    text: str  # as written, for the log's "by which rule"

    def matches_name(self, name: str, port: int) -> bool:
        if self.port is not None and port != self.port:
            return False
        if self.kind == "any":
            return True
        if self.kind == "name":
            return name == self.value
        if self.kind == "suffix":
            return name.endswith("." + self.value)
        return False

    def matches_addr(self, addr: str, port: int) -> bool:
        if self.kind != "net" or (self.port is not None and port != self.port):
            return False
        from ipaddress import ip_address, ip_network

        return ip_address(addr) in ip_network(self.value)


# Where IDNA 2003 (Python's codec) and IDNA 2008 give two different names.
_DEVIATIONS = frozenset("\u00df\u03c2\u200c\u200d")


def normalize_name(text: str) -> str:
    """Lower case, no trailing dot, IDNA (punycode) for non-ASCII labels; UsageError if it
    is not a host name."""
    name = text.strip().rstrip(".").lower()
    if not name.isascii():
        if _DEVIATIONS.intersection(name):
            # Python's codec is IDNA 2003: "faß.de" -> "fass.de", a ZWJ dropped, while
            # clients (IDNA 2008 / UTS 46) ask for "xn--fa-hia.de": another domain.
            raise UsageError(f"{text!r} has a character (ß, ς, ZWJ, ZWNJ) that IDNA "
                             "versions map differently: write the name in punycode (xn--)")
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise UsageError(f"{text!r} is not a valid host name") from None
    labels = name.split(".")
    if not name or len(name) > MAX_NAME or any(
            not label or len(label) > 63 or not all(c.isalnum() or c in "-_" for c in label)
            for label in labels):
        raise UsageError(f"{text!r} is not a valid host name")
    return name


def parse_entry(text: str) -> Entry:
    """`host`, `*.domain`, `*`, `host:port`, an IPv4/IPv6 address or CIDR (`[v6]:port`)."""
    from ipaddress import ip_network

    raw = text.strip()
    if not raw or len(raw) > MAX_NAME + 8:
        raise UsageError(f"bad egress entry {text!r}")
    host, port = raw, None
    if raw.startswith("["):  # [v6] or [v6]:port
        close = raw.find("]")
        if close < 0:
            raise UsageError(f"bad egress entry {text!r}")
        host, rest = raw[1:close], raw[close + 1:]
        if rest:
            port = _port(rest.removeprefix(":"), text) if rest.startswith(":") else \
                _bad(text)
    elif raw.count(":") == 1:
        host, _, port_text = raw.partition(":")
        port = _port(port_text, text)
    try:
        net = ip_network(host, strict=False)
    except ValueError:
        pass
    else:
        if net.version == 6 and net.network_address.ipv4_mapped is not None:
            # The gate judges IPv4 addresses: a deny written as ::ffff:a.b.c.d would
            # never match the connection it means to stop.
            raise UsageError(f"egress entry {text!r} is an IPv4 address written as IPv6: "
                             "write it as IPv4 (a.b.c.d)")
        return Entry("net", str(net), port, raw)
    _refuse_short_ipv4(host.removeprefix("*."), text)
    if host == "*":
        return Entry("any", "", port, raw)
    if host.startswith("*."):
        return Entry("suffix", normalize_name(host[2:]), port, raw)
    return Entry("name", normalize_name(host), port, raw)


def _refuse_short_ipv4(host: str, entry: str) -> None:
    """`127.1`, `0x7f.1`, `2130706433`, `017700000001` are addresses to the C library
    (inet_aton) and so to a client that connects to them, but not to ip_network: kept as a
    name, a deny entry written so would never match the address it means to stop."""
    import socket

    try:
        socket.inet_aton(host)
    except OSError:
        return
    raise UsageError(f"egress entry {entry!r} is an IPv4 address in a short or numeric "
                     "form: write it as a.b.c.d")


def _port(text: str, entry: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise UsageError(f"bad port in egress entry {entry!r}")
    return int(text)


def _bad(entry: str) -> int:
    raise UsageError(f"bad egress entry {entry!r}")


def parse_static_host(text: str) -> tuple[str, str]:
    """`NAME:ADDRESS` (or `NAME=ADDRESS`) for --add-host: what our resolver answers for
    NAME, still subject to the policy (a denied address stays denied)."""
    from ipaddress import ip_address

    for sep in ("=", ":"):
        name, found, addr = text.partition(sep)
        if found:
            try:
                return normalize_name(name), str(ip_address(addr.strip().strip("[]")))
            except ValueError:
                break
    raise UsageError(f"bad --add-host {text!r} (want NAME:ADDRESS)")


class Verdict(NamedTuple):
    allowed: bool
    rule: str  # "allow api.example.com", "deny *", "default", "always-denied: loopback", …


class Grant(NamedTuple):
    """A secret a sandbox may use: its placeholder (what the sandbox sees) is replaced by
    the value only in `header` of requests to `hosts`. The value is not part of the plan:
    the gate reads it from the host's store when it starts."""

    name: str
    hosts: tuple[str, ...]
    header: str
    placeholder: str


class Policy(NamedTuple):
    """What one sandbox may reach. `default_allow`: public addresses not matched by any
    rule are allowed (moderate without an allow-list); False: only what `allow` names.

    Always denied, before any allow: the host's own, loopback, private, link-local and
    metadata addresses (egress.ALWAYS_DENIED_*) unless an allow entry names the address or
    network itself.
    """

    default_allow: bool = True
    allow: tuple[Entry, ...] = ()
    deny: tuple[Entry, ...] = ()
    hosts: tuple[tuple[str, str], ...] = ()  # static (name, address) answers
    secrets: tuple[Grant, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {"default_allow": self.default_allow,
                "allow": [e.text for e in self.allow], "deny": [e.text for e in self.deny],
                "hosts": [list(h) for h in self.hosts],
                "secrets": [[g.name, list(g.hosts), g.header, g.placeholder]
                            for g in self.secrets]}

    @classmethod
    def from_json(cls, doc: dict[str, object]) -> Policy:
        def entries(key: str) -> tuple[Entry, ...]:
            items = doc.get(key) or []
            assert isinstance(items, list)
            return tuple(parse_entry(str(x)) for x in items[:MAX_ENTRIES])

        hosts = doc.get("hosts") or []
        assert isinstance(hosts, list)
        grants = doc.get("secrets") or []
        assert isinstance(grants, list)
        return cls(default_allow=bool(doc.get("default_allow", True)), allow=entries("allow"),
                   deny=entries("deny"),
                   hosts=tuple((str(n), str(a)) for n, a in hosts[:MAX_ENTRIES]),
                   secrets=tuple(Grant(str(n), tuple(map(str, h)), str(hd), str(ph))
                                 for n, h, hd, ph in grants[:64]))

    def with_rule(self, action: str, text: str) -> Policy:
        """Live update: `allow` or `deny` one more entry. An allow entry turns a default-
        allow policy into default-deny, as an allow-list given at the start would."""
        entry = parse_entry(text)
        if action == "allow":
            return self._replace(allow=(*self.allow, entry)[-MAX_ENTRIES:],
                                 default_allow=False)
        if action == "deny":
            return self._replace(deny=(*self.deny, entry)[-MAX_ENTRIES:])
        raise UsageError(f"unknown egress action {action!r} (allow or deny)")

    def name_verdict(self, name: str, port: int) -> Verdict:
        """Deny > allow > default, for a name the client asked for."""
        for e in self.deny:
            if e.matches_name(name, port):
                return Verdict(False, f"deny {e.text}")
        for e in self.allow:
            if e.matches_name(name, port):
                return Verdict(True, f"allow {e.text}")
        return Verdict(self.default_allow, "default allow" if self.default_allow
                       else "default deny (not in the allow-list)")

    def name_may_resolve(self, name: str) -> Verdict:
        """Whether our resolver answers for `name` at all (on some port)."""
        for e in self.deny:
            if e.port is None and e.matches_name(name, 0):
                return Verdict(False, f"deny {e.text}")
        for e in self.allow:
            if e.kind != "net" and e.matches_name(name, e.port or 0):
                return Verdict(True, f"allow {e.text}")
        return Verdict(self.default_allow, "default allow" if self.default_allow
                       else "default deny (not in the allow-list)")

    def addr_rule(self, addr: str, port: int) -> Verdict | None:
        """An explicit address/CIDR entry for `addr`:`port`, if any (deny first)."""
        for e in self.deny:
            if e.matches_addr(addr, port):
                return Verdict(False, f"deny {e.text}")
        for e in self.allow:
            if e.matches_addr(addr, port):
                return Verdict(True, f"allow {e.text}")
        return None


def build_policy(*, network: str, allow: list[str], deny: list[str],
                 hosts: list[str]) -> Policy | None:
    """The policy of a run from its profile's network mode and the config/flag lists;
    None where the sandbox has no egress (restrictive, --no-network) or the host's own
    network (permissive on namespaces)."""
    if network != "egress":
        return None
    if len(allow) > MAX_ENTRIES or len(deny) > MAX_ENTRIES or len(hosts) > MAX_ENTRIES:
        raise UsageError(f"at most {MAX_ENTRIES} egress entries per list")
    return Policy(default_allow=not allow, allow=tuple(parse_entry(a) for a in allow),
                  deny=tuple(parse_entry(d) for d in deny),
                  hosts=tuple(parse_static_host(h) for h in hosts))


def policy_for(network: str, config: object | None, allow: tuple[str, ...] = (),
               deny: tuple[str, ...] = (), hosts: tuple[str, ...] = ()) -> Policy | None:
    """A run's policy: `[network]` of its agentkernel.toml, then the command line's
    --allow-host / --deny-host / --add-host on top."""
    section = getattr(config, "network", None)
    return build_policy(
        network=network, allow=[*getattr(section, "allow", []), *allow],
        deny=[*getattr(section, "deny", []), *deny],
        hosts=[*getattr(section, "hosts", []), *hosts])


def require_default(policy: Policy | None, backend: str) -> None:
    """Fail closed where the gate does not run yet (Firecracker's TAP egress keeps
    slirp4netns and the always-denied fence): a policy beyond the default would be
    silently ignored."""
    if policy is not None and policy != Policy():
        from .errors import BackendUnavailable

        raise BackendUnavailable(
            f"egress allow/deny lists, --add-host and secrets are not enforced on {backend} "
            "yet: use the QEMU microVM (the default vmm) or another backend")
