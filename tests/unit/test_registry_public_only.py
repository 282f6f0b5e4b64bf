"""RegistryOptions.public_only: which hosts name a local or private network by themselves,
which the user's settings allow, and that the setting is part of every cache key."""

from __future__ import annotations

import pytest

from agentkernel.images.registry import RegistryOptions, names_local_host


@pytest.mark.parametrize(("host", "local"), [
    ("127.0.0.1:5000", True), ("localhost", True), ("LOCALHOST:80", True),
    ("registry.localhost", True), ("0.0.0.0:5000", True), ("10.1.2.3", True),
    ("192.168.1.1:443", True), ("169.254.169.254", True), ("100.64.0.1", True),
    ("[::1]:5000", True), ("[fe80::1]", True), ("[fd00:ec2::254]", True),
    ("docker.io", False), ("ghcr.io:443", False), ("8.8.8.8", False),
    ("127.1:5000", False),  # not an address as written: only resolving tells (at connect)
])
def test_names_local_host(host: str, local: bool) -> None:
    assert names_local_host(host) is local


def test_the_users_own_registries_are_allowed() -> None:
    opts = RegistryOptions(default_registry="reg.internal:5000",
                           mirrors=["127.0.0.1:5001", "ghcr.io=http://10.0.0.5:5002/prefix"],
                           insecure=frozenset({"192.168.1.9:5000"}))
    assert opts.private_allowed() >= {"reg.internal:5000", "127.0.0.1:5001", "10.0.0.5:5002",
                                      "192.168.1.9:5000"}


def test_public_only_is_in_the_cache_keys_and_the_record() -> None:
    opts = RegistryOptions()
    public = RegistryOptions(public_only=True)
    assert opts.fingerprint() != public.fingerprint()
    assert RegistryOptions.from_doc(public.to_doc()).public_only is True
    assert RegistryOptions.from_doc(opts.to_doc()).public_only is False
