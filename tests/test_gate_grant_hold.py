"""A pooled sandbox's gate holds a connection to a host it has a slot for until the run's
grant is in (daemon/runs starts the command beside the grant), and only those."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from agentkernel.egress_policy import Policy
from agentkernel.egress_proxy import Gate, Log, _grant

SLOT = "api.anthropic.com"
SECRET = {"name": "env:ANTHROPIC_API_KEY", "hosts": [SLOT], "header": "x-api-key",
          "placeholder": "ak-secret-" + "1" * 32, "value": "sk-ant-held-until-granted"}


def _gate(tmp_path: Path) -> Gate:
    gate = Gate(Policy(), None, Log(os.open(tmp_path / "log", os.O_RDWR | os.O_CREAT, 0o600)))
    gate.slots = frozenset({SLOT})
    gate.server_ctx = object()  # (a pooled gate's TLS context: set up, no secret held)
    return gate


def test_a_slotted_host_waits_for_the_grant_then_is_intercepted(tmp_path: Path) -> None:
    gate = _gate(tmp_path)

    async def scenario() -> list[str]:
        seen: list[str] = []

        async def connection(host: str) -> None:
            await gate.grant_due(host)
            seen.append(f"{host} intercepted={gate.intercepts(host)}")

        slotted = asyncio.create_task(connection(SLOT))
        other = asyncio.create_task(connection("other.example"))
        await asyncio.sleep(0.2)
        assert not slotted.done()  # held: no secret yet, so no passing it through plain
        assert other.done()  # a host without a slot is never held
        _grant(gate, [SECRET])
        await asyncio.wait_for(slotted, 5)
        await gate.grant_due(SLOT)  # granted: never held again
        return seen

    assert asyncio.run(scenario()) == ["other.example intercepted=False",
                                       f"{SLOT} intercepted=True"]
    with pytest.raises(ValueError, match="given already"):  # still once only
        _grant(gate, [SECRET])


def test_no_grant_the_hold_ends_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    """Without a grant (its run failed), the connection goes on after the bound, as one
    to any allowed host: the gate holds no secret to put in."""
    from agentkernel import egress_proxy

    monkeypatch.setattr(egress_proxy, "FIRST_BYTES_TIMEOUT", 0.2)
    gate = _gate(tmp_path)
    asyncio.run(asyncio.wait_for(gate.grant_due(SLOT), 5))
    assert not gate.intercepts(SLOT) and not gate.held
