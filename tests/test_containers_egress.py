"""The egress gate in front of docker and podman containers (real engines, the test
upstream of test_egress_policy): the container's network namespace, empty by the engine
("none"), gets the gate's rules from the host side; an allow-list holds by name with pinned
DNS and Host, private and metadata addresses stay refused, and every refusal is told."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import test_containers
from sandbox_helpers import (
    ShellProbe,
    Upstream,
    ak,
    marked,
    serving_upstream,
)
from test_containers import ak_user, engine, podman_user  # noqa: F401 - fixtures
from test_egress_policy import UPSTREAM_NAMES, hosts

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the test upstream needs root")


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with serving_upstream(UPSTREAM_NAMES) as up:
        yield up


def probe(up: Upstream) -> str:
    p = ShellProbe(tool="busybox ")
    return "".join([*p.common(up), p.nc("loopback", "127.0.0.1", 18022)])



def test_allow_list_holds_in_a_container(engine: str, upstream: Upstream,  # noqa: F811
                                         tmp_path: Path) -> None:
    r = ak("run", "-B", engine, "-i", test_containers.IMAGE, "--allow-host", "allowed.test",
           "--allow-host", "rebind.test", *hosts(upstream), "--", "sh", "-c",
           probe(upstream), cwd=tmp_path, timeout=180)
    assert r.returncode == 0, r.stderr
    seen = marked(r.stdout)
    assert seen.pop("http-allowed") == "hello host=allowed.test:18080 key=-", (seen, r.stderr)
    assert seen.pop("raw-allowed") == "SSH-2.0-upstream", seen
    assert "NXDOMAIN" in seen.pop("dns-denied"), seen
    assert all("hello" not in v and "SSH" not in v for v in seen.values()), seen
    for line in ("dns denied.test REFUSED by default deny",
                 "http denied.test:18080 REFUSED",
                 f"tcp {upstream.private}:18022 REFUSED by always-denied address",
                 f"tcp {upstream.addr2}:18022 REFUSED by default deny",
                 "tcp 169.254.169.254:80 REFUSED by always-denied address"):
        assert line in r.stderr, (line, r.stderr)


def test_default_reaches_public_only(engine: str, upstream: Upstream,  # noqa: F811
                                     tmp_path: Path) -> None:
    """moderate without lists: public addresses by name or address; the private set, the
    metadata address and a denied name stay out."""
    script = "".join([
        'echo "@public-ip $(busybox nc -w 3 ' + upstream.addr2 + ' 18022 </dev/null 2>&1)"\n',
        'echo "@by-name $(busybox wget -q -O- http://allowed.test:18080/ 2>&1)"\n',
        'echo "@denied $(busybox wget -q -O- http://denied.test:18080/ 2>/dev/null'
        ' || echo refused)"\n',
        'echo "@private $(busybox nc -w 3 ' + upstream.private + ' 18022 </dev/null 2>&1)"\n',
    ])
    r = ak("run", "-B", engine, "-i", test_containers.IMAGE, "--deny-host", "denied.test",
           *hosts(upstream), "--", "sh", "-c", script, cwd=tmp_path, timeout=180)
    assert r.returncode == 0, r.stderr
    seen = marked(r.stdout)
    assert seen["public-ip"] == "SSH-2.0-upstream", (seen, r.stderr)
    assert seen["by-name"] == "hello host=allowed.test:18080 key=-", seen
    assert seen["denied"] == "refused" and "SSH" not in seen["private"], seen
    assert f"tcp {upstream.private}:18022 REFUSED by always-denied address" in r.stderr


def test_rootless_podman_allow_list(podman_user: tuple[int, dict[str, str], Path],  # noqa: F811
                                    upstream: Upstream) -> None:
    """As an ordinary user (rootless podman): the gate's rules go into the container's
    namespace through its user namespace, and the gate runs as that user."""
    r = ak_user(podman_user, "run", "-B", "podman", "-i", podman_user[1]["IMAGE"],
                "--allow-host", "allowed.test", *hosts(upstream), "--", "sh", "-c",
                probe(upstream))
    assert r.returncode == 0, r.stderr
    seen = marked(r.stdout)
    assert seen.pop("http-allowed") == "hello host=allowed.test:18080 key=-", (seen, r.stderr)
    assert seen.pop("raw-allowed") == "SSH-2.0-upstream", seen
    assert all("hello" not in v and "SSH" not in v for v in seen.values()), seen
    assert f"tcp {upstream.private}:18022 REFUSED by always-denied address" in r.stderr


SECRET_VALUE = "sk-ct-" + os.urandom(12).hex()
SECRET_SCRIPT = r"""
echo "@env $SECRET_KEY"
echo "@curl $(curl -sS https://secret.test:18443/ -H "x-api-key: $SECRET_KEY")"
python3 -c '
import os, urllib.request
r = urllib.request.Request("https://secret.test:18443/",
                           headers={"x-api-key": os.environ["SECRET_KEY"]})
print("@urllib", urllib.request.urlopen(r, timeout=10).read().decode().strip())'
echo "@cleartext $(curl -sS -m 5 http://other.test:18080/ -H "x-api-key: $SECRET_KEY" \
    2>/dev/null || echo refused)"
echo "@found $(printf '%s%s\n' "$REAL_A" "$REAL_B" | grep -rlF -f - /proc/[0-9]*/environ \
    /proc/[0-9]*/cmdline /etc /run /tmp /root /workspace 2>/dev/null | head -3)"
"""


def test_secret_reaches_its_host_only(engine: str, upstream: Upstream,  # noqa: F811
                                      tmp_path: Path) -> None:
    """The host's userland as the image (curl, python3): the container sees a placeholder,
    trusts the sandbox's CA through the system bundle bound over the image's, and
    secret.test gets the value in its header; the placeholder in clear text is refused."""
    r = ak("secret", "set", "ctkey", "--host", "secret.test", "--header", "x-api-key",
           "--env", "SECRET_KEY", input=SECRET_VALUE.encode() + b"\n")
    assert r.returncode == 0, r.stderr
    r = ak("run", "-B", engine, "-i", "host", "--secret", "ctkey",
           "-e", f"REAL_A={SECRET_VALUE[:8]}", "-e", f"REAL_B={SECRET_VALUE[8:]}",
           "--add-host", f"secret.test:{upstream.addr}", *hosts(upstream), "--",
           "sh", "-c", SECRET_SCRIPT, cwd=tmp_path, timeout=180,
           env={"AGENTKERNEL_EGRESS_UPSTREAM_CA": str(upstream.ca)})
    assert r.returncode == 0, r.stderr
    seen = marked(r.stdout)
    assert seen["env"].startswith("ak-secret-") and SECRET_VALUE not in seen["env"], seen
    expected = f"hello host=secret.test:18443 key={SECRET_VALUE}"
    assert seen["curl"] == expected and seen["urllib"] == expected, (seen, r.stderr)
    assert seen["cleartext"] == "refused" and seen["found"] == "", seen
    assert "placeholder of secret ctkey sent in clear text" in r.stderr, r.stderr
    assert SECRET_VALUE not in r.stderr
