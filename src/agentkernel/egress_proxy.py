"""The egress gate's process: one per sandbox, the sandbox's only way out (TCP proxy + DNS).

It listens inside the sandbox's network namespace (sockets made there by a forked child
that joins it), where packet-filter rules redirect every TCP connection and all DNS to it,
and connects out from the host's namespace, only where the policy says, without any
privilege (started by root it drops to its sandbox's own unprivileged `nobody`). A
daemon's gate runs on demand (egress_forkserver): forked at the sandbox's first
connection, query or update, it exits when idle, its live policy and pins kept (`State`).

Bounded: concurrent connections, DNS queries in flight, bytes inspected per connection
(one ClientHello record / one HTTP head), time to the first bytes, idle time, log size.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import time
from collections import OrderedDict
from typing import Any

from . import egress_wire as wire
from .egress_audit import FIELD_SET, MAX_FIELD, clipped, encode
from .egress_policy import DNS_PORT as DNS_PORT  # the listeners' ports: defined there
from .egress_policy import TCP_PORT as TCP_PORT
from .egress_policy import Policy, Verdict, normalize_name
from .peercred import PeerCredError, peer_cred

SO_ORIGINAL_DST = 80
MAX_CONNS = 512
MAX_DNS_INFLIGHT = 64
MAX_PINS = 8192
MAX_MEMO = 4096  # remembered policy answers and normalised names (then forgotten at once)
MAX_PIN_NAMES = 16  # names pinned to one address (a CDN's): the oldest go first
STATE_CAP = 2 * 1024 * 1024  # bytes of an activated gate's saved state (policy, pins)
STATE_DELAY = 1.0  # seconds between a new pin and the state's save (then at most once)
FIRST_BYTES_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
IDLE_TIMEOUT = 1800.0
IDLE_CHECK = 60.0  # seconds between a connection's idle checks
SWEEP = 1.0  # seconds between the gate's checks of its connections' deadlines
RESOLVE_TIMEOUT = 5.0
LOOKUP_TTL = 30.0  # seconds an upstream answer is reused: the TTL our answers carry
MAX_LOOKUPS = 1024
CHUNK = 256 * 1024
LOG_CAP = 2 * 1024 * 1024  # bytes; then the log starts over with a marker


class Log:
    """JSON lines, one per decision, into a file opened before privileges were dropped;
    it starts over past LOG_CAP (never bodies, never secret values)."""

    def __init__(self, fd: int, audit: Any = None) -> None:
        self.fd = fd
        self.size = os.fstat(fd).st_size
        self.audit = audit  # egress_audit.AuditWriter: the host's log of every decision
        self.loop: Any = None  # set by serve: `later` entries are written by it
        self.pending: list[tuple[bytes, bytes | None]] = []

    def write(self, **fields: Any) -> None:
        """An entry, written now."""
        self.pending.append(self._lines(fields))
        self.flush()

    def later(self, **fields: Any) -> None:
        """An entry, timed now and written at the end of this turn of the event loop with
        the others of that turn: after the bytes the decision let through (the audit
        file is shared by every gate of the user, under a lock: not on a connection's
        path), one write per file for a turn's entries."""
        if fields.get("allowed") is False:
            # A refusal lets nothing through to wait for, and the run that ends on it
            # reads the log for its stderr (`egress: ... REFUSED by RULE`) as soon as the
            # command exits: written before the answer, or that line could be missing.
            self.write(**fields)
            return
        self.pending.append(self._lines(fields))
        if len(self.pending) == 1 and self.loop is not None:
            self.loop.call_soon(self.flush)
        elif self.loop is None:
            self.flush()

    def _lines(self, fields: dict[str, Any]) -> tuple[bytes, bytes | None]:
        # Encoded once for both logs (two entries per connection: it shows in its cost).
        t = repr(round(time.time(), 3))
        try:  # short: no value can be longer than an entry keeps (the usual case)
            body = encode(fields)
        except (TypeError, ValueError):
            body = ""
        if not body or len(body) > MAX_FIELD:
            body = encode(clipped(fields))
        audit = None
        if self.audit is not None:
            audit = self.audit.line(t, body if fields.keys() <= FIELD_SET else
                                    encode(clipped({k: v for k, v in fields.items()
                                                    if k in FIELD_SET})))
        return (body[:-1] + ("," if len(body) > 2 else "") + f'"t":{t}}}\n').encode(), audit

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        if not pending:
            return
        if self.audit is not None:
            self.audit.append(b"".join(a for _, a in pending if a is not None))
        data = b"".join(line for line, _ in pending)
        try:
            if self.size + len(data) > LOG_CAP:
                os.ftruncate(self.fd, 0)
                os.lseek(self.fd, 0, os.SEEK_SET)
                marker = b'{"note":"log restarted: older entries dropped"}\n'
                os.write(self.fd, marker)
                self.size = len(marker)
            os.write(self.fd, data)
            self.size += len(data)
        except OSError:
            pass


class Gate:
    """The decisions: the policy, the pinned DNS answers, the always-denied set."""

    def __init__(self, policy: Policy, denied: Any, log: Log) -> None:
        self.policy = policy
        self.denied = denied
        self.loop: Any = None  # the event loop it serves on (serve)
        self.live: set[_Conn] = set()  # connections whose deadlines the sweep checks
        self.sweeping = False
        self._denied_seen: dict[str, bool] = {}  # address -> in `denied` (bounded)
        self._memo: dict[tuple[str, str, int], Verdict | None] = {}  # see _rule
        self._memo_of: Policy | None = None
        self._names: dict[str, str] = {}  # see _normal
        self.log = log
        # address -> names (a dict as an ordered set), least recently pinned first
        self.pins: OrderedDict[str, dict[str, None]] = OrderedDict()
        # name -> (until when, addresses): upstream answers reused (see resolve)
        self.lookups: dict[str, tuple[float, list[str]]] = {}
        self.conns = 0
        self.dns_inflight = 0
        self.busy = 0  # connections, queries and updates being served (idle exit: none)
        self.last = time.monotonic()  # when one last began
        self.state: State | None = None  # an activated gate's: what outlives it
        # Secrets (egress_mitm): what the gate holds, and its TLS contexts for them.
        self.held: list[Any] = []
        self.granted = False  # secrets given (at the start or by one grant): no more
        self.given = False  # ... at the start (a later gate of the sandbox has them too)
        self.slots: frozenset[str] = frozenset()  # the hosts its certificate names
        self.server_ctx: Any = None
        self.client_ctx: Any = None
        self.grant_came: asyncio.Event | None = None  # (made when a connection waits)

    def grant_pending(self, host: str | None) -> bool:
        """`host` is one this pooled sandbox's gate has a slot for, and the run's grant
        has not come yet (daemon/runs sends it, then starts the command beside it)."""
        return host is not None and host in self.slots and not self.granted

    async def grant_due(self, host: str | None) -> None:
        """A connection to a slotted host before the run's grant: held until it comes,
        bounded; without one, it goes on as any connection (no secret to put in)."""
        if not self.grant_pending(host):
            return
        if self.grant_came is None:
            self.grant_came = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FIRST_BYTES_TIMEOUT):
                await self.grant_came.wait()

    def intercepts(self, host: str | None) -> bool:
        return host is not None and any(host in h.hosts for h in self.held)

    def denied_why(self, addr: str) -> str | None:
        # `denied` is fixed for the gate's life: an address's answer is remembered (a
        # client connects to the same few addresses again and again; ~30 networks to scan)
        hit = self._denied_seen.get(addr)
        if hit is None:
            from .egress import is_denied

            if len(self._denied_seen) >= MAX_PINS:
                self._denied_seen.clear()
            hit = self._denied_seen[addr] = is_denied(addr, self.denied)
        return "always-denied address" if hit else None

    def pin(self, addr: str, name: str) -> None:
        names = self.pins.pop(addr, {})
        names.pop(name, None)
        names[name] = None
        while len(names) > MAX_PIN_NAMES:
            del names[next(iter(names))]
        self.pins[addr] = names
        while len(self.pins) > MAX_PINS:
            self.pins.popitem(last=False)
        if self.state is not None:
            self.state.changed()

    def watch(self, conn: _Conn) -> None:
        """`conn`'s deadlines and idleness checked by the gate's one sweep timer (every
        SWEEP while a connection lives): no timer per connection."""
        self.live.add(conn)
        if not self.sweeping:
            self.sweeping = True
            self.loop.call_later(SWEEP, self._sweep)

    def _sweep(self) -> None:
        now = self.loop.time()
        for conn in list(self.live):
            conn.tick(now)
        if self.live:
            self.loop.call_later(SWEEP, self._sweep)
        else:
            self.sweeping = False

    def track(self, work: Any) -> Any:
        """`work` (a coroutine) counted as busy from now until it ends: an activated
        gate does not exit between a connection's accept and its handler's first step."""
        self.busy += 1
        self.last = time.monotonic()

        async def run() -> None:
            try:
                await work
            finally:
                self.busy -= 1
                self.last = time.monotonic()

        return run()

    def addr_verdict(self, addr: str, port: int) -> tuple[Verdict, set[str] | None]:
        """A connection to addr:port before its first bytes: the verdict, and the names
        it was reached through (None: not through a name's pinned answer)."""
        explicit = self._rule(("addr", addr, port))
        if explicit is not None:
            return explicit, None
        why = self.denied_why(addr)
        if why:
            return Verdict(False, why), None
        names = {n for n in self.pins.get(addr, ()) if self._name_rule(n, port).allowed}
        if names:
            return Verdict(True, self._name_rule(min(names), port).rule), names
        if self.policy.default_allow:
            return Verdict(True, "default allow"), None
        return Verdict(False, "default deny (address not from an allowed name's DNS answer)"), \
            None

    def _rule(self, key: tuple[str, str, int]) -> Verdict | None:
        """The policy's answer for ("name", name, port) (a Verdict) or ("addr", address,
        port) (a Verdict or None), remembered until the policy changes (a client asks
        about the same few again and again; a policy may have 1024 entries per list)."""
        if self._memo_of is not self.policy:
            self._memo.clear()
            self._memo_of = self.policy
        try:
            return self._memo[key]
        except KeyError:
            pass
        if len(self._memo) >= MAX_MEMO:
            self._memo.clear()
        kind, what, port = key
        got = self.policy.name_verdict(what, port) if kind == "name" else \
            self.policy.addr_rule(what, port)
        self._memo[key] = got
        return got

    def _name_rule(self, name: str, port: int) -> Verdict:
        got = self._rule(("name", name, port))
        assert got is not None  # (a name always has one)
        return got

    def _normal(self, name: str) -> str:
        """normalize_name, remembered (bounded) for names it accepted."""
        got = self._names.get(name)
        if got is None:
            if len(self._names) >= MAX_MEMO:
                self._names.clear()
            got = self._names[name] = normalize_name(name)
        return got

    def name_verdict(self, name: str, port: int, pinned: set[str] | None) -> Verdict:
        """The name a client sent (SNI or Host) on a connection already allowed by address."""
        try:
            name = self._normal(name)
        except Exception:
            return Verdict(False, f"malformed name {name[:80]!r}")
        verdict = self._name_rule(name, port)
        if not verdict.allowed:
            return verdict
        # A name let through by an allow entry must be the one whose answer gave this
        # address; one the default lets through may go to any public address.
        if pinned is not None and name not in pinned and verdict.rule != "default allow":
            return Verdict(False, f"name {name} does not match the address's pinned "
                                  f"name ({', '.join(sorted(pinned))})")
        return verdict


# --- TCP ---------------------------------------------------------------------------------


def original_dst(sock: Any) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack("!2xH4s8x", raw)
    return socket.inet_ntoa(addr), port


_IP_CHARS = frozenset("0123456789abcdefABCDEF.:[]%")


def _is_ip(text: str) -> bool:
    from ipaddress import ip_address

    if not _IP_CHARS.issuperset(text):  # a name (the usual case): no parse, no exception
        return False
    try:
        ip_address(text)
    except ValueError:
        return False
    return True


FIRST_CAP = max(wire.MAX_HELLO, wire.MAX_HTTP_HEAD)  # bytes read before a verdict


def first_name(data: bytes, eof: bool = False) -> tuple[str | None, str] | None:
    """What a client's first bytes name: (the name (SNI or Host) or None, and what they
    were: "tls", "http" or "raw"); None while they are a prefix of a ClientHello or HTTP
    head that could still name one (`eof`: no more will come). ConnectionError for a
    malformed ClientHello or head, or one longer than FIRST_CAP."""
    for kind in ("tls", "http"):
        try:
            got = wire.sni(data) if kind == "tls" else wire.http_head(data)
        except ValueError as exc:
            raise ConnectionError(f"malformed {kind}: {exc}") from None
        if got == wire.NEED_MORE:
            break
        if got == wire.NOT_THIS:
            continue
        if kind == "tls":
            return (got if isinstance(got, str) else None), "tls"
        assert isinstance(got, tuple)
        try:
            return wire.request_host(*got), "http"
        except ValueError as exc:
            raise ConnectionError(f"malformed http: {exc}") from None
    else:
        return None, "raw"
    if eof:
        return None, "raw"
    if len(data) >= FIRST_CAP:
        raise ConnectionError("first bytes too long")
    return None


def _rst(transport: asyncio.BaseTransport) -> None:
    """Close with a RST: a refused connection ends at once, not after a FIN dance."""
    sock = transport.get_extra_info("socket")
    with contextlib.suppress(OSError):
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.close()


class _Conn(asyncio.Protocol):
    """One redirected connection of the sandbox, its client end's protocol, from the
    accept to both ends' close, as callbacks of the event loop (no stream objects, one
    task only while connecting out): allowed by address, it connects out at once (a
    server may speak first, and the connect overlaps the wait for the client's first
    bytes), but passes none of the client's bytes until they are known to name an
    allowed host, or none. Then both directions are relayed transport to transport in
    the callback that received them; a full write buffer on one side pauses reading
    from the other (bounded: at most FIRST_CAP and one read before a verdict, the
    transports' buffers after it). Its deadlines (connect, first bytes) and idleness are
    checked by the gate's one sweep timer (Gate.watch), not a timer per connection."""

    # What a connection starts with (class attributes: not set one by one per accept)
    client: Any = None  # asyncio.Transport (uvloop's or asyncio's)
    up: Any = None  # the upstream's transport, once connected
    connecting: asyncio.Task[None] | None = None
    addr, port = "", 0
    verdict = Verdict(False, "")
    pinned: set[str] | None = None
    host: str | None = None
    proto = "tcp"
    first = b""
    judged = False  # the client's first bytes were judged (and allowed)
    open = False  # its bytes go upstream as they come
    refused = False
    held_back = False  # judged before the upstream was there: reading paused
    logged = False  # an allowed decision went to the log: its close will too
    counted = False  # in gate.conns
    client_eof = False
    up_eof = False  # (no reading resumed after an end's EOF: it would come again)
    ends = 1  # transports not yet lost (the client's; the upstream's once made)
    eofs = 0  # ends that said all (both: both are closed)
    sent = received = 0
    since = connected_at = 0.0  # (loop time) accepted, connected out
    moved, next_idle, active_at = 0, 0.0, 0.0  # the idle check's (each IDLE_CHECK)
    finished = False
    waited = False  # held once for its gate's grant (a pooled sandbox's run)
    granting: asyncio.Task[None] | None = None

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.loop = gate.loop

    # --- the client's end

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        gate = self.gate
        self.client = transport
        gate.busy += 1
        gate.last = time.monotonic()
        try:
            self.addr, self.port = original_dst(transport.get_extra_info("socket"))
        except OSError:
            gate.log.later(kind="tcp", allowed=False, rule="not a redirected connection")
            _rst(transport)
            return
        if gate.conns >= MAX_CONNS:
            gate.log.later(kind="tcp", addr=self.addr, port=self.port, allowed=False,
                           rule=f"too many connections ({MAX_CONNS})")
            _rst(transport)
            return
        gate.conns += 1
        self.counted = True
        if self.port == 53:
            self._hand_over(serve_dns_tcp(gate, *_streams(transport, self.loop)))
            return
        self.verdict, self.pinned = gate.addr_verdict(self.addr, self.port)
        self.host = min(self.pinned) if self.pinned else None
        if not self.verdict.allowed:
            self._refuse(self.verdict.rule, "tcp")
            return
        self.since = self.loop.time()
        gate.watch(self)
        self.connecting = self.loop.create_task(self._connect())

    def data_received(self, data: bytes) -> None:
        if self.open:
            self.sent += len(data)
            self.up.write(data)
        elif not self.refused:
            self.first += data
            if not self.judged:
                self._judge()

    def eof_received(self) -> bool:
        if self.open:
            if not self.up.is_closing() and self.up.can_write_eof():
                self.up.write_eof()
            self._eof()
        elif not self.client_eof and not self.refused:
            self.client_eof = True
            if not self.judged:
                self._judge()
        return True  # the other direction may still have bytes to carry

    def pause_writing(self) -> None:  # the client's buffer is full: stop its source
        if self.up is not None:
            self.up.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None and not self.up_eof:
            self.up.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        up = self.up
        if up is not None:
            if exc is not None:
                up.abort()
            else:
                up.close()
        elif self.connecting is not None:
            self.connecting.cancel()
        self._lost()

    # --- the upstream's end (_Up's callbacks)

    async def _connect(self) -> None:
        try:
            await self.loop.create_connection(lambda: _Up(self), self.addr, self.port)
        except (OSError, asyncio.CancelledError) as exc:
            if self.up is not None:  # made while its connect was being cancelled (timeout)
                self._orphan(self.up)
                self.up = None
                self.ends -= 1
            if not self.client.is_closing():  # (else: the client left, nothing to say)
                why = type(exc).__name__ if isinstance(exc, OSError) else "TimeoutError"
                self.gate.log.later(kind="tcp", host=self.host, addr=self.addr,
                                    port=self.port, allowed=True, rule=self.verdict.rule,
                                    error=f"connect: {why}")
                _rst(self.client)
        finally:
            self.connecting = None
            if self.ends == 0:
                self._done()

    def up_made(self, transport: Any) -> None:
        if self.client.is_closing():  # the client left during the connect
            self._orphan(transport)
            return
        self.up = transport
        self.ends += 1
        self.connected_at = self.loop.time()
        if self.judged:
            self._go()

    @staticmethod
    def _orphan(transport: Any) -> None:
        """An upstream made as its connect was cancelled: closed, and no longer one of
        the connection's ends (uvloop may never report the loss of a transport whose
        create_connection was cancelled after it was made)."""
        transport.set_protocol(asyncio.Protocol())
        transport.abort()

    def up_end(self) -> None:
        self.up_eof = True
        if not self.client.is_closing() and self.client.can_write_eof():
            self.client.write_eof()
        self._eof()

    def up_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.client.abort()
        else:
            self.client.close()
        self._lost()

    # --- decisions

    def _judge(self) -> None:
        """The client's first bytes so far: wait for more, refuse, or allow."""
        try:
            got = first_name(self.first, self.client_eof)
        except ConnectionError as exc:
            self._refuse(str(exc)[:200], "tcp")
            return
        if got is None:
            return
        name, self.proto = got
        self._decide(name)

    def _decide(self, name: str | None) -> None:
        gate = self.gate
        for held in gate.held:  # in clear text, to anyone: never forwarded
            if held.placeholder in self.first:
                self.host = name or self.host
                self._refuse(f"placeholder of secret {held.name} sent in clear text",
                             self.proto)
                return
        if name is not None and not _is_ip(name):
            self.verdict = gate.name_verdict(name, self.port, self.pinned)
            self.host = name
            if not self.verdict.allowed:
                self._refuse(self.verdict.rule, self.proto)
                return
        self.judged = True
        if self.up is None:
            self.held_back = True  # until the upstream is there
            self.client.pause_reading()
        else:
            self._go()

    def _go(self) -> None:
        """Judged and connected: relay, or intercept a secret's host's TLS (held first,
        once, until the run's grant is in: Gate.grant_due)."""
        if self.proto == "tls" and not self.waited and self.gate.grant_pending(self.host):
            self.waited = self.held_back = True
            self.client.pause_reading()
            self.granting = self.loop.create_task(self._after_grant())
            return
        if self.proto == "tls" and self.gate.intercepts(self.host):
            self._intercept()
            return
        self.open = True
        first, self.first = self.first, b""
        self.sent += len(first)
        if first:
            self.up.write(first)
        if self.client_eof:
            self.eof_received()
        elif self.held_back:
            self.client.resume_reading()
        self.logged = True  # (logged after its bytes went: the log is not on their path)
        self.gate.log.later(kind=self.proto, host=self.host, addr=self.addr, port=self.port,
                            allowed=True, rule=self.verdict.rule)

    async def _after_grant(self) -> None:
        await self.gate.grant_due(self.host)
        if not self.finished and not self.client.is_closing():
            self._go()

    def _refuse(self, rule: str, proto: str) -> None:
        self.gate.log.later(kind=proto, host=self.host, addr=self.addr, port=self.port,
                            allowed=False, rule=rule)
        self.refused = True
        self.first = b""
        self.gate.live.discard(self)
        if self.up is not None:
            self.up.close()
        _rst(self.client)

    def tick(self, now: float) -> None:
        """The sweep's check (Gate.watch): the connect's deadline, the first bytes' (then
        it stands on the address's verdict: a protocol whose server speaks first), and
        every IDLE_CHECK after an idle check (no byte either way for IDLE_TIMEOUT: both
        ends go)."""
        if self.refused or self.finished:
            return
        if self.up is None:
            if self.connecting is not None and now - self.since >= CONNECT_TIMEOUT:
                self.connecting.cancel()  # logged as a connect timeout
            return
        if not self.judged:
            if now - self.connected_at < FIRST_BYTES_TIMEOUT:
                return
            self.proto = "tcp"
            self._decide(None)
            if not self.open:
                return  # refused, or intercepted
        if now < self.next_idle:
            return
        self.next_idle = now + IDLE_CHECK
        moved = self.sent + self.received
        if moved != self.moved or not self.active_at:
            self.moved, self.active_at = moved, now
        elif now - self.active_at > IDLE_TIMEOUT:
            self.client.abort()
            self.up.abort()

    def _eof(self) -> None:
        self.eofs += 1
        if self.eofs == 2:  # both sides said all: close (after what is still buffered)
            self.client.close()
            self.up.close()

    def _lost(self) -> None:
        self.ends -= 1
        if self.ends == 0 and self.connecting is None:
            self._done()

    def _done(self) -> None:
        if self.finished:
            return
        self.finished = True
        gate = self.gate
        gate.live.discard(self)
        if self.logged:
            gate.log.later(kind="close", host=self.host, addr=self.addr, port=self.port,
                           sent=self.sent, received=self.received)
        if self.counted:
            gate.conns -= 1
        gate.busy -= 1
        gate.last = time.monotonic()

    # --- what leaves the callbacks: DNS over TCP, TLS interception (stream tasks)

    def _hand_over(self, work: Any) -> None:
        """The rest of this connection is `work`'s (a coroutine over streams): it ends
        with it, whichever way."""
        self.gate.live.discard(self)

        async def run() -> None:
            try:
                await work
            finally:
                self.ends = 0
                self._done()

        self.loop.create_task(run())

    def _intercept(self) -> None:
        client, upstream = _streams(self.client, self.loop), _streams(self.up, self.loop)
        if self.client_eof:
            client[0].feed_eof()
        self._hand_over(_intercept(self.gate, *client, *upstream, self.first, self.host or "",
                                   self.addr, self.port, self.verdict))


class _Up(asyncio.Protocol):
    """The upstream end of a _Conn: its events go to the _Conn."""

    def __init__(self, conn: _Conn) -> None:
        self.conn = conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn.up_made(transport)

    def data_received(self, data: bytes) -> None:  # a server may speak first: always carried
        conn = self.conn
        conn.received += len(data)
        conn.client.write(data)

    def eof_received(self) -> bool:
        self.conn.up_end()
        return True

    def pause_writing(self) -> None:  # the upstream's buffer is full: stop the client
        self.conn.client.pause_reading()

    def resume_writing(self) -> None:
        if not self.conn.client_eof:
            self.conn.client.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.up_lost(exc)


def _streams(transport: Any, loop: asyncio.AbstractEventLoop
             ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream pair over a transport already connected: for the rare connections served
    by a coroutine (DNS over TCP, TLS interception)."""
    reader = asyncio.StreamReader(limit=CHUNK, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if not transport.is_reading():
        transport.resume_reading()
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def _intercept(gate: Gate, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter,
                     first: bytes, host: str, addr: str, port: int, verdict: Verdict) -> None:
    """TLS to a secret's host: terminated here, its secret put in, verified TLS onwards."""
    from .egress_mitm import SecretLeak, TlsEnd, intercept

    heads = 0
    client = TlsEnd(reader, writer, gate.server_ctx, server_side=True, first=first)
    upstream = TlsEnd(up_reader, up_writer, gate.client_ctx, server_hostname=host)
    try:
        await asyncio.wait_for(client.handshake(), FIRST_BYTES_TIMEOUT)
        await asyncio.wait_for(upstream.handshake(), CONNECT_TIMEOUT)
        gate.log.write(kind="tls-secret", host=host, addr=addr, port=port, allowed=True,
                       rule=verdict.rule)
        heads = await intercept(client, upstream, host, gate.held)
    except SecretLeak as exc:
        gate.log.write(kind="tls-secret", host=host, addr=addr, port=port, allowed=False,
                       rule=str(exc)[:200])
        _rst(writer.transport)
    except (OSError, ConnectionError, TimeoutError, ValueError) as exc:
        gate.log.write(kind="tls-secret", host=host, addr=addr, port=port, allowed=False,
                       rule="interception failed", error=f"{type(exc).__name__}: {exc}"[:200])
        _rst(writer.transport)
    finally:
        gate.log.write(kind="close", host=host, addr=addr, port=port, secret_requests=heads,
                       sent=client.got, received=upstream.got)
        up_writer.close()
        writer.close()


# --- DNS ---------------------------------------------------------------------------------


def resolve_now(gate: Gate, q: wire.Question) -> bytes | str:
    """Our resolver's answer to `q` where it needs no lookup (refused, a static name, an
    upstream answer still fresh, a type we answer empty), else the name to look up."""
    try:
        name = gate._normal(q.name)
    except Exception:
        return wire.dns_answer(q, wire.RCODE_NXDOMAIN)
    if q.qclass != 1:
        return wire.dns_answer(q, wire.RCODE_REFUSED)
    verdict = gate.policy.name_may_resolve(name)
    if not verdict.allowed:
        gate.log.later(kind="dns", host=name, qtype=q.qtype, allowed=False, rule=verdict.rule)
        return wire.dns_answer(q, wire.RCODE_NXDOMAIN)
    if q.qtype != wire.QTYPE_A:
        return wire.dns_answer(q, wire.RCODE_OK)  # empty: AAAA, HTTPS, … (IPv4 only)
    static = [a for n, a in gate.policy.hosts if n == name]
    if static:
        return answer_with(gate, q, name, verdict, static)
    cached = gate.lookups.get(name)
    if cached is not None and cached[0] > time.monotonic():
        return answer_with(gate, q, name, verdict, cached[1])
    return name


def answer_with(gate: Gate, q: wire.Question, name: str, verdict: Verdict,
                addrs: list[str]) -> bytes:
    """The answer for `name` from `addrs`: filtered of denied addresses, pinned, logged."""
    kept, dropped = [], []
    for addr in addrs:
        if ":" in addr:
            continue
        explicit = gate._rule(("addr", addr, 0))
        if (explicit is not None and not explicit.allowed) or \
                (explicit is None and gate.denied_why(addr)):
            dropped.append(addr)
        else:
            kept.append(addr)
    for addr in kept:
        gate.pin(addr, name)
    # An allowed name with nothing to answer: say why, or the line reads as if its allow
    # rule had refused it.
    why = {} if kept or addrs else {"error": "no address: the lookup failed or found none"}
    gate.log.later(kind="dns", host=name, allowed=bool(kept), rule=verdict.rule,
                   answers=kept[:8], **({"dropped": dropped[:8]} if dropped else {}), **why)
    if not kept:
        return wire.dns_answer(q, wire.RCODE_NXDOMAIN if not addrs else wire.RCODE_OK)
    return wire.dns_answer(q, wire.RCODE_OK, kept[:8])


async def resolve(gate: Gate, q: wire.Question) -> bytes:
    """Our resolver: NXDOMAIN outside the policy; answers filtered of denied addresses
    and pinned to the name; only A records (no IPv6 way out yet)."""
    got = resolve_now(gate, q)
    if isinstance(got, bytes):
        return got
    addrs = await _lookup(got)
    if addrs:  # reused for LOOKUP_TTL: a client that resolves before each request
        if len(gate.lookups) >= MAX_LOOKUPS:
            gate.lookups.clear()
        gate.lookups[got] = (time.monotonic() + LOOKUP_TTL, addrs)
    # (the policy may have changed during the lookup: asked again)
    verdict = gate.policy.name_may_resolve(got)
    if not verdict.allowed:
        return wire.dns_answer(q, wire.RCODE_NXDOMAIN)
    return answer_with(gate, q, got, verdict, addrs)


async def _lookup(name: str) -> list[str]:
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(name, None, family=socket.AF_INET, type=socket.SOCK_STREAM),
            RESOLVE_TIMEOUT)
    except (TimeoutError, OSError, UnicodeError):
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def answer(gate: Gate, data: bytes) -> bytes | None:
    try:
        q = wire.dns_query(data)
    except ValueError:
        return wire.dns_error(data, wire.RCODE_FORMERR)
    if gate.dns_inflight >= MAX_DNS_INFLIGHT:
        return wire.dns_answer(q, wire.RCODE_REFUSED)
    gate.dns_inflight += 1
    try:
        return await resolve(gate, q)
    finally:
        gate.dns_inflight -= 1


class DnsUdp(asyncio.DatagramProtocol):
    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        # Answered here when no lookup is needed (most queries: a static name, a fresh
        # answer, a refusal, AAAA): no task, no future.
        gate = self.gate
        try:
            q = wire.dns_query(data)
        except ValueError:
            self._send(wire.dns_error(data, wire.RCODE_FORMERR), addr)
            return
        gate.last = time.monotonic()
        got = resolve_now(gate, q)
        if isinstance(got, bytes):
            self._send(got, addr)
            return
        gate.loop.create_task(gate.track(self._reply(data, addr)))

    def _send(self, reply: bytes | None, addr: tuple[str, int]) -> None:
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)  # <= 8 A records: within 512 bytes

    async def _reply(self, data: bytes, addr: tuple[str, int]) -> None:
        self._send(await answer(self.gate, data), addr)


async def serve_dns_tcp(gate: Gate, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
    try:
        for _ in range(64):  # queries per connection
            head = await asyncio.wait_for(reader.readexactly(2), FIRST_BYTES_TIMEOUT)
            size = struct.unpack(">H", head)[0]
            data = await asyncio.wait_for(reader.readexactly(size), FIRST_BYTES_TIMEOUT)
            reply = await answer(gate, data)
            if reply is None:
                break
            writer.write(struct.pack(">H", len(reply)) + reply)
            await writer.drain()
    except (TimeoutError, OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


# --- control: live policy updates --------------------------------------------------------


async def handle_control(gate: Gate, owner: int, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    try:
        try:
            uid = peer_cred(sock).uid
        except PeerCredError:
            return  # unreadable: as another user's
        if uid != owner:
            return
        line = await asyncio.wait_for(reader.readline(), 5)
        if len(line) > CONTROL_LINE:
            return
        req = json.loads(line)
        if req.get("op") == "grant":
            _grant(gate, req.get("secrets"))
        elif req.get("op") in ("allow", "deny"):
            gate.policy = gate.policy.with_rule(str(req["op"]), str(req["entry"]))
            gate.log.write(kind="policy", op=req["op"], entry=str(req["entry"])[:300])
            if gate.state is not None:
                gate.state.policy_changed = True
                gate.state.save()  # before the reply: the next gate has it
        reply = {"ok": True, "policy": gate.policy.to_json()}
    except Exception as exc:
        reply = {"ok": False, "error": getattr(exc, "message", str(exc))[:300]}
    with contextlib.suppress(OSError):
        writer.write((json.dumps(reply) + "\n").encode())
        await writer.drain()
    writer.close()


# A control line: a grant carries secrets' values (each at most 64 KiB).
CONTROL_LINE = 4 * 64 * 1024 + 16 * 1024


def _grant(gate: Gate, secrets: Any) -> None:
    """A pooled sandbox's secrets, given when a run takes it (daemon/runs): once, only
    for hosts its certificate was made for (`gate.slots`), only by the owner (checked by
    the caller). A sandbox started ahead of its run holds no secret until then."""
    from .egress_mitm import Held

    if gate.server_ctx is None or gate.granted:
        raise ValueError("this gate takes no secrets" if gate.server_ctx is None
                         else "this gate's secrets were given already")
    if not isinstance(secrets, list) or not 0 < len(secrets) <= 64:
        raise ValueError("grant: 1 to 64 secrets")
    held = []
    for s in secrets:
        hosts = frozenset(str(h) for h in s["hosts"])
        value, placeholder = str(s["value"]), str(s["placeholder"])
        if not hosts or not hosts <= gate.slots:
            raise ValueError(f"grant: {s['name']} names hosts its sandbox has no "
                             "certificate for")
        if not value or not placeholder.startswith("ak-secret-") or len(value) > 65536 or \
                any(c in value for c in "\r\n\0"):
            raise ValueError("grant: a bad value or placeholder")
        held.append(Held(str(s["name"]), hosts, str(s["header"]).lower(),
                         placeholder.encode(), value.encode()))
    gate.held = held
    gate.granted = True
    if gate.grant_came is not None:
        gate.grant_came.set()  # the connections held for it go on
    gate.log.write(kind="policy", op="grant", entry=",".join(h.name for h in held)[:300])


# --- start-up ----------------------------------------------------------------------------


def _hold_secrets(gate: Gate, cfg: dict[str, Any], leaf: str | None = None) -> None:
    """The secrets and the TLS contexts for their hosts, loaded while files are readable
    (the leaf: a file deleted once read, or an activated gate's memfd)."""
    from .egress_mitm import Held, client_context, server_context

    gate.held = [Held(str(s["name"]), frozenset(s["hosts"]), str(s["header"]),
                      str(s["placeholder"]).encode(), str(s["value"]).encode())
                 for s in cfg["secrets"]]
    gate.granted = gate.given = bool(gate.held)  # given at the start: no later grant
    gate.slots = frozenset(h for g in cfg["policy"].get("secrets") or [] for h in g[1])
    gate.server_ctx = server_context(leaf or str(cfg["leaf"]))
    if leaf is None:
        os.unlink(str(cfg["leaf"]))  # held in memory now: no copy of its key stays on disk
    gate.client_ctx = client_context(cfg.get("upstream_ca"))


def _preload() -> None:
    """Import now what would be imported lazily later: once privileges are dropped, the
    interpreter's own files may be out of reach (root's pyenv, a 0700 venv)."""
    import concurrent.futures.thread  # noqa: F401 - loop.getaddrinfo's executor
    import encodings.idna  # noqa: F401 - normalize_name
    import ipaddress  # noqa: F401

    from . import egress_mitm  # noqa: F401 - TLS interception, for secrets

    "x".encode("idna")


# A gate's config as the warm-up feeds it: no sandbox's data, no secret.
_WARM_POLICY = {"default_allow": False, "allow": ["warm.invalid", "*.warm.invalid:443"],
                "deny": ["10.0.0.0/8"], "hosts": [["warm.invalid", "192.0.2.1"]],
                "secrets": []}
WARM_ROUNDS = 10  # > the calls after which CPython 3.11 specialises a function's bytecode


def warm_up(rounds: int = WARM_ROUNDS) -> None:
    """Run, in the fork server before it forks, what every gate runs before it idles:
    read a config, build its Gate, serve on (private, unreachable) sockets until its
    lifeline ends. CPython rewrites a function's bytecode in place once it has run a few
    times and fills caches on first use; done in each forked gate, that writing copies
    the server's shared pages into every gate (issue 11: memory per sandbox). Leaves no
    thread, event loop or fd behind: the server stays safe to fork."""
    from .egress import denied_networks, host_addresses

    doc = json.dumps({"policy": _WARM_POLICY, "owner": os.getuid()})
    # Its sockets' dir: ours alone (0700, a fresh name). Not tempfile: it imports random,
    # whose reseeding after every fork would write into each gate.
    tmp = os.path.join(os.environ.get("TMPDIR") or "/tmp", f"ak-gate-warm-{os.urandom(8).hex()}")
    os.mkdir(tmp, 0o700)
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    # uvloop imported (its pages shared by every gate), never run here: libuv's first loop
    # makes a process-wide pipe it keeps, which every gate would inherit from this server
    gate_loop()
    try:
        for i in range(rounds):
            cfg = json.loads(doc)
            gate = Gate(Policy.from_json(cfg["policy"]), denied_networks(host_addresses()),
                        Log(null))
            _warm_serve(cfg, gate, os.path.join(tmp, str(i)))
    finally:
        os.close(null)
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)
    asyncio.set_event_loop(None)


def _warm_serve(cfg: dict[str, Any], gate: Gate, path: str) -> None:
    tcp = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # stands in for the TCP one
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    udp, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ready_r, ready_w = os.pipe()
    exit_r, exit_w = os.pipe()
    os.close(exit_w)  # the lifeline has ended already: serve returns once it listens
    try:
        tcp.bind(path + "t")
        control.bind(path + "c")
        control.listen(8)
        asyncio.run(serve({**cfg, "ready_fd": ready_w, "exit_fd": exit_r}, tcp, udp,
                          control, gate))
    finally:
        for s in (tcp, control, udp, peer):
            s.close()
        for fd in (ready_r, exit_r):
            os.close(fd)
        with contextlib.suppress(OSError):
            os.close(ready_w)  # serve closes it once it has said "1"


def gate_loop() -> Any:
    """The event loop a forked gate runs (None: asyncio's own). uvloop's where installed:
    its loop and transports in C take about half the CPU asyncio's pure-Python ones do
    per relayed connection (bench_egress --https-only: ~0.8 against ~1.3 ms), which is
    most of what a small request costs the gate. Imported in the fork server (warm_up),
    so its pages are shared by every gate, and first run in a gate; a one-shot run's gate
    (a fresh interpreter, gate_main) keeps asyncio's: the import would add to each
    sandbox's start."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _drop(uid: int, gid: int) -> None:
    """Started by root: become the sandbox's own unprivileged id, keep no capability."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if uid >= 0 and os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no ptrace, no /proc/<pid>/mem


async def serve(cfg: dict[str, Any], tcp: socket.socket, udp: socket.socket,
                control: socket.socket, gate: Gate) -> None:
    """Serve until the sandbox's lifeline ends, or (an activated gate, cfg "idle") until
    nothing was served for that many seconds: then the fork server holds the listeners
    again, and what arrives after waits in their queues for the next gate."""
    loop = gate.loop = gate.log.loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(lambda: _Conn(gate), sock=tcp),
        await asyncio.start_unix_server(
            lambda r, w: gate.track(handle_control(gate, int(cfg["owner"]), r, w)),
            sock=control, limit=CONTROL_LINE + 1)]
    dns, _ = await loop.create_datagram_endpoint(lambda: DnsUdp(gate), sock=udp)
    ready = cfg.get("ready_fd")
    if ready is not None:  # an activated gate has no one waiting: its server polled
        with contextlib.suppress(OSError):  # nobody may be waiting (see GateStart.wait)
            os.write(int(ready), b"1")
        os.close(int(ready))
    exit_fd = int(cfg["exit_fd"])
    done: asyncio.Future[None] = loop.create_future()

    def closed() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(exit_fd, closed)
    idle = float(cfg.get("idle") or 0)
    if idle > 0:
        parent = os.getppid()

        def check() -> None:
            # The server gone (killed), this gate is the sandbox's only way out: it stays,
            # unless its starter registered the sandbox with a new server (`adopted`).
            # A task besides this one (serve) not yet counted as busy: a connection just
            # accepted, whose handler asyncio starts in a task of its own.
            # A grant's secrets live in this gate only (never in the sealed config or the
            # state): a gate with slots for them (a pooled sandbox's) serves until its
            # sandbox is gone, ready with its TLS set up before the grant, and after it.
            if (gate.busy or time.monotonic() - gate.last < idle
                    or (os.getppid() != parent and not adopted())
                    or len(asyncio.all_tasks(loop)) > 1 or (gate.slots and not gate.given)):
                loop.call_later(min(idle, 5.0), check)
                return
            # Stop taking anything first, in this same step: nothing is accepted or read
            # that this gate would then drop; the server's copies keep what is queued.
            for server in servers:
                server.close()
            dns.close()
            if gate.state is not None:
                gate.state.save()
            closed()

        loop.call_later(min(idle, 5.0), check)
    try:
        await done  # the sandbox's lifeline closed (it is gone), or idle
    finally:
        gate.log.flush()


class State:
    """What outlives an activated gate, for the sandbox's next one: live policy updates
    and the pinned DNS answers (so a client's cached answer still connects, and never an
    address no answer gave). A memfd only this sandbox's gates hold (the fork server
    passes it on, never reads it); rewritten whole, at most STATE_CAP bytes. Read after
    the privilege drop: a gate taken over could have written anything there, and could
    equally have connected anywhere itself; it reaches no other sandbox's."""

    def __init__(self, fd: int, gate: Gate) -> None:
        self.fd = fd
        self.gate = gate
        self.policy_changed = False
        self.pending: asyncio.TimerHandle | None = None

    def load(self) -> None:
        from ipaddress import IPv4Address

        data = os.pread(self.fd, STATE_CAP + 1, 0)
        if not data or len(data) > STATE_CAP:
            return
        try:
            doc = json.loads(data)
            if doc.get("policy") is not None:
                self.gate.policy = Policy.from_json(doc["policy"])
                self.policy_changed = True
            for addr, names in doc.get("pins", [])[-MAX_PINS:]:
                IPv4Address(addr)
                for name in names[-MAX_PIN_NAMES:]:
                    self.gate.pins.setdefault(str(addr), {})[normalize_name(str(name))] = None
        except Exception as exc:  # a damaged state: start from the config's policy
            self.gate.log.write(note=f"saved gate state ignored: {type(exc).__name__}")

    def changed(self) -> None:
        if self.pending is None:
            with contextlib.suppress(RuntimeError):  # no loop: saved at the next change
                loop = asyncio.get_running_loop()
                self.pending = loop.call_later(STATE_DELAY, self.save)

    def save(self) -> None:
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
        pins = [[a, list(n)] for a, n in self.gate.pins.items()]
        while True:
            doc = {"policy": self.gate.policy.to_json() if self.policy_changed else None,
                   "pins": pins}
            data = json.dumps(doc, separators=(",", ":")).encode()
            if len(data) <= STATE_CAP or not pins:
                break
            pins = pins[len(pins) // 4 + 1:]  # too big: the least recently pinned go
        with contextlib.suppress(OSError):
            os.pwrite(self.fd, data, 0)
            os.ftruncate(self.fd, len(data))


_adopted = False  # (in an activated gate) egress_forkserver.ADOPTED_SIGNAL came


def adopted() -> bool:
    """In an activated gate whose fork server died: has a new server taken its sandbox
    (egress_forkserver.ADOPTED_SIGNAL)? Until then it is the sandbox's only way out and
    never exits idle."""
    return _adopted


def on_adopted(_sig: int, _frame: Any) -> None:
    """ADOPTED_SIGNAL's handler (installed by the fork server's child before its gate
    runs): the gate may exit when idle again."""
    global _adopted
    _adopted = True


def main_activated(fds: dict[str, int]) -> None:
    """A gate forked on demand (egress_forkserver: `fds` names where its fds are): its
    config from its sealed memfd, its secrets, no privileges, then the state earlier gates
    left, then serve until idle or the sandbox is gone."""
    import fcntl

    from .egress import denied_networks, host_addresses
    from .egress_audit import AuditWriter

    seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
    for fd in (fds["cfg"], *([fds["leaf"]] if _is_open(fds["leaf"]) else [])):
        if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & seals != seals:
            raise SystemExit("the gate's config is not sealed")  # never trust a writable one
    cfg = json.loads(os.pread(fds["cfg"], 16 << 20, 0))
    os.close(fds["cfg"])
    audit = AuditWriter.from_fds(fds["audit"], fds["audit_old"], str(cfg.get("sandbox", "?")),
                                 str(cfg.get("instance", "")))
    gate = Gate(Policy.from_json(cfg["policy"]), denied_networks(host_addresses()),
                Log(fds["log"], audit))
    if _is_open(fds["leaf"]):  # secrets, now or (a pooled sandbox) by a grant later
        _hold_secrets(gate, cfg, f"/proc/self/fd/{fds['leaf']}")
    if _is_open(fds["leaf"]):
        os.close(fds["leaf"])  # held in memory now
    _preload()
    _drop(int(cfg.get("uid", -1)), int(cfg.get("gid", -1)))
    state = State(fds["state"], gate)
    state.load()
    gate.state = state
    cfg = {**cfg, "exit_fd": fds["exit"], "ready_fd": None}
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=gate_loop()) as r:
        r.run(serve(cfg, socket.socket(fileno=fds["tcp"]), socket.socket(fileno=fds["udp"]),
                    socket.socket(fileno=fds["control"]), gate))


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def main(cfg: dict[str, Any], tcp: socket.socket, udp: socket.socket) -> None:
    """The gate, once it listens (egress_gate.gate_main got it there without importing
    asyncio): its files, its secrets, no privileges, then serve until the lifeline ends."""
    from .egress import denied_networks, host_addresses

    denied = denied_networks(host_addresses())
    log_fd = os.open(cfg["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.bind(cfg["control"])
    control.listen(8)
    audit = None
    if cfg.get("audit"):  # opened now: the data dir is out of reach once privileges drop
        from .egress_audit import AuditWriter

        audit = AuditWriter(str(cfg["audit"]), str(cfg.get("sandbox", "?")),
                            str(cfg.get("instance", "")))
    gate = Gate(Policy.from_json(cfg["policy"]), denied, Log(log_fd, audit))
    if cfg.get("leaf"):  # secrets, now or (a pooled sandbox) granted when a run takes it
        _hold_secrets(gate, cfg)
    _preload()
    _drop(int(cfg.get("uid", -1)), int(cfg.get("gid", -1)))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(cfg, tcp, udp, control, gate))


