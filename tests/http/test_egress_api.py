"""`GET /sandboxes/{name}/egress`: a sandbox's egress decisions from the host's audit log,
behind the same key as every route; real traffic through the real gate."""

from __future__ import annotations

import httpx
from akhttp import API_KEY, prefix

from agentkernel.http.serve import RunningServer

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROBE = ("import socket\n"
         "for addr in ('169.254.169.254', '10.213.0.9'):\n"
         "    try:\n"
         "        socket.create_connection((addr, 80), timeout=3).recv(1)\n"
         "    except OSError as e:\n"
         "        print(addr, type(e).__name__)\n")


def test_egress_log_route(server: RunningServer) -> None:
    name = prefix() + "-egress"
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as http:
        resp = http.post("/sandboxes", json={"name": name, "image": "host",
                                             "backend": "namespaces"})
        assert resp.status_code == 201, resp.text
        try:
            resp = http.post(f"/sandboxes/{name}/exec",
                             json={"command": ["python3", "-c", PROBE]})
            assert resp.status_code == 200, resp.text
            resp = http.get(f"/sandboxes/{name}/egress")
            assert resp.status_code == 200, resp.text
            entries = resp.json()["data"]
            refused = {(e["addr"], e["port"], e["rule"]) for e in entries
                       if e["sandbox"] == name and e.get("allowed") is False}
            assert ("169.254.169.254", 80, "always-denied address") in refused, entries
            assert ("10.213.0.9", 80, "always-denied address") in refused, entries
            assert all(isinstance(e["t"], float) for e in entries)
            # The same key as the rest: none, or a wrong one, gets nothing.
            for headers in ({}, {"Authorization": "Bearer nope"}):
                resp = httpx.get(f"{server.url}/sandboxes/{name}/egress", headers=headers)
                assert resp.status_code == 401 and resp.json()["data"] is None
            assert http.get("/sandboxes/no-such-sandbox/egress").status_code == 404
            assert http.get("/sandboxes/..%2F..%2Fetc/egress").status_code in (400, 404)
        finally:
            http.delete(f"/sandboxes/{name}")


def test_a_recreated_sandbox_gets_only_its_own_entries(server: RunningServer) -> None:
    """The audit log is keyed by the sandbox's instance too: a sandbox created again under
    a name used before starts with no entries, then has its own only."""
    name = prefix() + "-again"
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as http:
        seen = []
        for addr in ("10.213.251.1", "10.213.251.2"):
            resp = http.post("/sandboxes", json={"name": name, "image": "host",
                                                 "backend": "namespaces"})
            assert resp.status_code == 201, resp.text
            try:
                assert http.get(f"/sandboxes/{name}/egress").json()["data"] == []
                probe = PROBE.replace("('169.254.169.254', '10.213.0.9')", repr((addr,)))
                resp = http.post(f"/sandboxes/{name}/exec",
                                 json={"command": ["python3", "-c", probe]})
                assert resp.status_code == 200, resp.text
                entries = http.get(f"/sandboxes/{name}/egress").json()["data"]
                seen.append({e["addr"] for e in entries if e["kind"] == "tcp"})
            finally:
                http.delete(f"/sandboxes/{name}")
        assert seen == [{"10.213.251.1"}, {"10.213.251.2"}], seen
