"""The stored key goes to loopback only (client.listener.foreign_listener): this machine's
listener table says nothing of another host's (a local 0.0.0.0 listener "covered" any
IPv4 address)."""

from __future__ import annotations

import socket

from agentkernel.client.listener import foreign_listener


def test_a_remote_address_never_gets_the_stored_key() -> None:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))  # ours, on every address
        s.listen(1)
        port = s.getsockname()[1]
        assert foreign_listener("127.0.0.1", port) is None
        why = foreign_listener("192.0.2.7", port)
        assert why is not None and "loopback" in why
