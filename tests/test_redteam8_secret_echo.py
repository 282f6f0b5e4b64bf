"""Red team, round 8: a secret must not be put where the upstream hands it back to the
sandbox: into `Host` or another header servers echo (`--header '*'`), or into a TRACE.

The attacker is the command in the sandbox: it holds the placeholder and may send it in
any header of a request to the secret's host. With `*` the gate put the value into every
header holding the placeholder, `Host` included (`Host: secret.test:<placeholder>` still
names the secret's host, the port part being dropped), and servers echo `Host` (in
redirects, error pages; this suite's upstream in every answer), and echo framing and
content headers in their errors (`Transfer-Encoding`, `Content-Type`, `Expect`): the
command read the user's key back. A deny-list of those still let X-Request-Id,
Idempotency-Key, X-Forwarded-Prefix and Prefer through, which ordinary servers echo (the
review of round 8). Now `*` means the credential headers only (egress_mitm.WILDCARD_HEADERS:
Authorization, Cookie, X-Api-Key and the like): a placeholder anywhere else ends the
connection like any placeholder outside its header. And whatever the header, a TRACE
(whose answer, where a server allows the method, is the request as it arrived, headers and
all) is never given the value.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel.egress_mitm import Held, SecretLeak, rewrite_head
from sandbox_helpers import Upstream, ak, serving_upstream

VALUE = "sk-wild-" + secrets.token_hex(12)

# curl's answers from secret.test with the placeholder in Host's port, in x-api-key
# (where `*` must still put the value: the upstream names what it got there), and in
# x-api-key of a TRACE (whose answer, from a server that allows it, is the request).
SCRIPT = r"""
K="${WILD_KEY-unset}"
B=/tmp/bundle.pem
cat /workspace/ca.pem ${CURL_CA_BUNDLE:-} > $B
get() { curl -sS -m 20 --cacert $B https://secret.test:18443/ -H "$1" $2 $3 2>/dev/null \
        || echo refused; }
printf '{"env": "%s", "host": "%s", "key": "%s", "trace": "%s"}\n' "$K" \
  "$(get "Host: secret.test:$K")" "$(get "x-api-key: $K")" \
  "$(get "x-api-key: $K" -X TRACE)"
"""


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with serving_upstream(["secret.test"]) as up:
        yield up


def test_wildcard_secret_never_goes_into_host(project: Path, upstream: Upstream) -> None:
    r = ak("secret", "set", "wild8", "--host", "secret.test", "--header", "*",
           "--env", "WILD_KEY", input=VALUE.encode() + b"\n")
    assert r.returncode == 0, r.stderr
    try:
        shutil.copy(upstream.ca, project / "ca.pem")
        r = ak("run", "--json", "-B", "namespaces", "-i", "host", "--secret", "wild8",
               "--add-host", f"secret.test:{upstream.addr}", "--", "sh", "-c", SCRIPT,
               cwd=project, env={"AGENTKERNEL_EGRESS_UPSTREAM_CA": str(upstream.ca)})
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout)
        seen = json.loads(result["stdout"])
        assert VALUE not in seen["host"], seen  # the key came back in the echoed Host
        assert seen["env"].startswith("ak-secret-"), seen
        assert seen["host"] == "refused", seen  # the placeholder in Host ends the connection
        # x-api-key still gets the value (the upstream says it got it; that it answers
        # with it is this test server's way of showing it).
        assert seen["key"] == f"hello host=secret.test:18443 key={VALUE}", seen
        # A TRACE's answer is the request as the server got it: never given the value,
        # whatever the header (a placeholder in its header ends the connection).
        assert seen["trace"] == "refused", seen
    finally:
        ak("secret", "rm", "wild8")


PLACEHOLDER = b"ak-secret-" + b"0" * 32
HELD = [Held("wild", frozenset({"api.test"}), "*", PLACEHOLDER, b"sk-real")]


@pytest.mark.parametrize("header", ["Host", "Transfer-Encoding", "Content-Length", "Expect",
                                    "Content-Type", "Accept", "User-Agent", "Referer",
                                    "Origin", "X-Forwarded-Host", "Connection", "Upgrade",
                                    # echoed by ordinary servers (the review of round 8)
                                    "X-Request-Id", "Idempotency-Key", "X-Forwarded-Prefix",
                                    "Prefer", "Traceparent", "X-Correlation-Id"])
def test_wildcard_refuses_headers_servers_parse(header: str) -> None:
    """The gate's own rewrite: the placeholder in a header servers route, frame or parse
    by (and echo in errors) is a leak, not a place for the value."""
    value = b"api.test:" + PLACEHOLDER if header == "Host" else PLACEHOLDER
    head = b"GET / HTTP/1.1\r\nHost: api.test\r\n" if header != "Host" else b"GET / HTTP/1.1\r\n"
    head += header.encode() + b": " + value
    with pytest.raises(SecretLeak):
        rewrite_head(head, "api.test", HELD)


@pytest.mark.parametrize("header", ["Authorization", "X-Api-Key", "Cookie", "X-Goog-Api-Key"])
def test_wildcard_still_fills_credential_headers(header: str) -> None:
    head = b"GET / HTTP/1.1\r\nHost: api.test\r\n" + header.encode() + b": Bearer " + PLACEHOLDER
    out = rewrite_head(head, "api.test", HELD)
    assert out.endswith(header.encode() + b": Bearer sk-real"), out
