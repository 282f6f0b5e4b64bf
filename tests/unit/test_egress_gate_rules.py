"""The gate's rules as text: where DNS is redirected for a VMM's namespace."""

from __future__ import annotations

from agentkernel.egress_gate import ip_batch, rules_v4


def _nat(rules: str) -> list[str]:
    lines = rules.splitlines()
    return lines[lines.index("*nat") + 1:lines.index("COMMIT")]


def test_dns_to_loopback_is_redirected_only_for_vmms() -> None:
    """QEMU's user networking asks the host's resolvers (often 127.0.0.53): in its
    namespace DNS is redirected before loopback traffic is let alone; a bwrap sandbox's
    own loopback stays its business."""
    vmm, plain = _nat(rules_v4(loopback_dns=True)), _nat(rules_v4())
    lo = "-A OUTPUT -o lo -j RETURN"
    dns = next(r for r in vmm if "--dport 53" in r)
    assert vmm.index(dns) < vmm.index(lo)
    assert plain.index(lo) < plain.index(dns)
    assert sorted(vmm) == sorted(plain)  # the same rules otherwise
    assert "-A OUTPUT -j REJECT --reject-with icmp-admin-prohibited" in rules_v4(
        loopback_dns=True)


def test_loopback_comes_up() -> None:
    """The gate listens on the namespace's loopback: a VMM's holder namespace has it down."""
    assert ip_batch().splitlines()[0] == "link set lo up"
