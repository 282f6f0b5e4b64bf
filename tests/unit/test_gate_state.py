"""The state an on-demand egress gate leaves for the next (egress_proxy.State): live policy
and pins round-trip; what a gate taken over could have written there (damaged JSON, an
address that is not IPv4, an oversized file) is ignored, never trusted, and the state
stays within its cap."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from agentkernel.egress_policy import Policy
from agentkernel.egress_proxy import MAX_PIN_NAMES, STATE_CAP, Gate, Log, State


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("test-gate-state", os.MFD_CLOEXEC)
    yield fd
    os.close(fd)


def _gate() -> Gate:
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    return Gate(Policy.from_json({"default_allow": False, "allow": ["a.test"]}), ([], []),
                Log(null))


def test_policy_and_pins_round_trip(memfd: int) -> None:
    first = _gate()
    state = State(memfd, first)
    first.state = state
    first.pin("192.0.2.1", "a.test")
    first.pin("192.0.2.2", "a.test")
    first.policy = first.policy.with_rule("allow", "b.test")
    state.policy_changed = True
    state.save()
    second = _gate()
    State(memfd, second).load()
    assert [e.text for e in second.policy.allow] == ["a.test", "b.test"]
    assert list(second.pins) == ["192.0.2.1", "192.0.2.2"]  # least recently pinned first
    assert second.addr_verdict("192.0.2.2", 443)[0].allowed
    assert not second.addr_verdict("192.0.2.3", 443)[0].allowed


def test_pins_alone_keep_the_configs_policy(memfd: int) -> None:
    first = _gate()
    first.pin("192.0.2.1", "a.test")
    State(memfd, first).save()
    assert json.loads(os.pread(memfd, 4096, 0))["policy"] is None


@pytest.mark.parametrize("doc", [
    b"{not json",
    json.dumps({"pins": [["::1", ["a.test"]]]}).encode(),
    json.dumps({"pins": [["example.com", ["a.test"]]]}).encode(),
    json.dumps({"policy": {"allow": ["no spaces allowed here"]}}).encode(),
    json.dumps(["a", "list"]).encode(),
], ids=["damaged", "ipv6", "a-name-as-address", "bad-policy", "not-an-object"])
def test_hostile_state_is_ignored(memfd: int, doc: bytes) -> None:
    os.write(memfd, doc)
    gate = _gate()
    before = gate.policy
    State(memfd, gate).load()
    assert gate.policy == before
    assert not gate.pins


def test_oversized_state_is_ignored(memfd: int) -> None:
    os.write(memfd, b" " * (STATE_CAP + 1))
    gate = _gate()
    State(memfd, gate).load()
    assert not gate.pins


def test_state_stays_within_its_cap(memfd: int) -> None:
    gate = _gate()
    long = "x" * 60
    for i in range(8192):
        for j in range(MAX_PIN_NAMES + 2):
            gate.pin(f"10.{i // 256}.{i % 256}.{j % 4}", f"{long}{j}.{i}.test")
    State(memfd, gate).save()
    assert os.fstat(memfd).st_size <= STATE_CAP
    assert all(len(names) <= MAX_PIN_NAMES for names in gate.pins.values())
    again = _gate()
    State(memfd, again).load()
    assert again.pins and list(again.pins)[-1] == list(gate.pins)[-1]  # the newest kept
