"""Fixtures: real docker-registry instances (plain HTTP; TLS + htpasswd), proxies, stores."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    PASSWORD,
    USER,
    Proxy,
    Pusher,
    Registry,
    TlsRegistry,
    busybox_layer,
    have_tools,
    make_ca,
    make_htpasswd,
)

from agentkernel.images.store import Store


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    missing = have_tools()
    if missing:
        skip = pytest.mark.skip(reason=f"missing {', '.join(missing)} (scripts/test.sh installs)")
        for item in items:
            if "tests/images" in str(item.fspath):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def plain_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = Registry(tmp_path_factory.mktemp("reg-plain")).start()
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRegistry]:
    work = tmp_path_factory.mktemp("reg-tls")
    ca, crt, key = make_ca(work / "pki")
    htp = make_htpasswd(work / "htpasswd", USER, PASSWORD)
    reg = Registry(work / "reg", tls=(crt, key), htpasswd=htp).start()
    yield TlsRegistry(reg, ca)
    reg.stop()


@pytest.fixture(scope="session")
def pusher(plain_registry: Registry) -> Pusher:
    return Pusher(plain_registry.url)


@pytest.fixture(scope="session")
def busybox(pusher: Pusher) -> str:
    """test/busybox:1 on the plain registry (one gzip layer + a small second layer)."""
    from harness import LayerBuilder

    extra = LayerBuilder().dir("etc").file("etc/motd", b"hello from layer 2\n").bytes()
    pusher.image("test/busybox", "1", [busybox_layer(), extra],
                 config={"Env": ["PATH=/bin", "GREETING=hi"], "Cmd": ["/bin/sh"],
                         "WorkingDir": "/tmp", "User": "0"})
    return "test/busybox:1"


@pytest.fixture
def proxy(plain_registry: Registry) -> Iterator[Proxy]:
    p = Proxy(plain_registry.host)
    yield p
    p.stop()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")
