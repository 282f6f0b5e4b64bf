"""Server behaviour beyond what the SDKs check: auth, envelope, limits, validation, SSE,
the OpenAPI copy in docs/, our client's extras (access rules: test_access.py)."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from akhttp import API_KEY, ROOT, prefix

from agentkernel.errors import UsageError
from agentkernel.http.app import create_app
from agentkernel.http.serve import RunningServer, is_loopback, main, resolve_api_key

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def http(server: RunningServer) -> httpx.Client:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        yield client  # type: ignore[misc]


def envelope(resp: httpx.Response, status: int) -> dict[str, object]:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert isinstance(body, dict) and set(body) >= {"success", "error"}, body
    assert body["success"] is (status < 400), body
    return body


@pytest.mark.parametrize(("headers", "message"), [
    ({}, "Missing Authorization header"),
    ({"Authorization": "Basic abc"}, "Invalid authorization format"),
    ({"Authorization": "Bearer"}, "Invalid authorization format"),
    ({"Authorization": "Bearer nope"}, "Invalid API key"),
    ({"Authorization": f"Bearer {API_KEY}x"}, "Invalid API key"),
])
def test_auth_is_required_except_health(server: RunningServer, headers: dict[str, str],
                                        message: str) -> None:
    resp = httpx.get(server.url + "/sandboxes", headers=headers)
    assert envelope(resp, 401)["error"] == message
    assert resp.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url + "/health", headers=headers).json()["data"] == "ok"


def test_unknown_routes_and_methods_answer_in_the_envelope(http: httpx.Client) -> None:
    assert "not implemented" in str(envelope(http.get("/orchestrations"), 404)["error"])
    envelope(http.post("/stores", json={"name": "x"}), 404)
    envelope(http.get("/nope"), 404)
    envelope(http.put("/sandboxes"), 405)


def test_invalid_input_is_400_before_anything_runs(http: httpx.Client) -> None:
    envelope(http.post("/sandboxes", json={"name": "../../x"}), 400)
    envelope(http.post("/sandboxes", json={"name": "ok", "vcpus": "many"}), 400)
    envelope(http.post("/sandboxes", json={"name": "ok", "volumes": ["v:/data"]}), 400)
    envelope(http.post("/run", content=b"{not json", headers={"content-type":
                                                               "application/json"}), 400)
    envelope(http.post("/run", json={"command": ["true"], "env": ["1BAD=x"]}), 400)
    envelope(http.post("/run", json={"command": ["a\x00b"]}), 400)
    envelope(http.post("/run", json={"command": ["true"], "workdir": "/a/../b"}), 400)
    envelope(http.post("/run", json=[1, 2]), 400)
    envelope(http.get("/sandboxes/x/files/..%2F..%2Fetc/passwd"), 400)
    envelope(http.get("/sandboxes/x/exec/detached/bad%20id"), 400)
    envelope(http.get("/sandboxes/x/exec/detached/abc/logs?stream=both"), 400)


def test_nulls_are_accepted_and_unknown_fields_ignored(http: httpx.Client) -> None:
    body = {"command": ["echo", "n"], "image": None, "profile": None, "fast": None,
            "timeout": None, "env": None, "workdir": None, "future_field": {"x": 1}}
    data = envelope(http.post("/run", json=body), 200)["data"]
    assert data == {"output": "n\n", "stderr": "", "exit_code": 0, "success": True}


def test_failed_command_is_200_with_exit_code_and_stderr(http: httpx.Client) -> None:
    resp = http.post("/run", json={"command": ["sh", "-c", "echo o; echo e >&2; exit 42"]})
    data = envelope(resp, 200)["data"]
    assert data == {"output": "o\n", "stderr": "e\n", "exit_code": 42, "success": False}


def test_command_that_cannot_start_is_a_result(http: httpx.Client) -> None:
    data = envelope(http.post("/run", json={"command": ["no-such-cmd-xyz"]}), 200)["data"]
    assert data["exit_code"] == 127 and data["success"] is False, data  # type: ignore[index]
    assert "not found" in data["message"]  # type: ignore[index]


def test_body_limit_is_413(server: RunningServer) -> None:
    app_limit = 64 * 1024 * 1024
    big = b'{"command":["true"],"pad":"' + b"x" * (app_limit + 16) + b'"}'
    resp = httpx.post(server.url + "/run", content=big, headers=AUTH, timeout=60)
    assert envelope(resp, 413)["error"].startswith("request body larger")  # type: ignore[union-attr]

    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"command":["true"],"pad":"'
        for _ in range(65):
            yield b"x" * (1024 * 1024)
        yield b'"}'

    resp = httpx.post(server.url + "/run", content=chunks(), headers=AUTH, timeout=60)
    envelope(resp, 413)


def test_files_paths_collapse_and_sandbox_roundtrip(http: httpx.Client) -> None:
    name = prefix() + "-api"
    envelope(http.post("/sandboxes", json={"name": name, "image": None, "backend": None,
                                           "vcpus": None, "memory_mb": None, "profile": None,
                                           "source_url": None, "source_ref": None,
                                           "volumes": None}), 201)
    try:
        envelope(http.put(f"/sandboxes/{name}/files//tmp//x/./a.txt", json={"content": "A"}),
                 200)
        got = envelope(http.get(f"/sandboxes/{name}/files/tmp/x/a.txt"), 200)["data"]
        assert got == {"content": "A", "encoding": "utf8", "size": 1}
        envelope(http.get(f"/sandboxes/{name}/files/tmp/%2E%2E/etc/passwd"), 400)
        envelope(http.get(f"/sandboxes/{name}/files/"), 400)
        info = envelope(http.get(f"/sandboxes/{name}"), 200)["data"]
        assert info["status"] == "running" and info["backend"]  # type: ignore[index]
    finally:
        assert envelope(http.delete(f"/sandboxes/{name}"), 200)["data"] == "Sandbox removed"


def test_sse_is_live_framed_and_keeps_alive(service: object) -> None:
    import uvicorn

    from agentkernel.http.serve import bind

    app = create_app(service, keepalive=0.3)  # type: ignore[arg-type]
    sock = bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    t = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    while not srv.started:
        time.sleep(0.01)
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/run/stream"
        lines: list[tuple[float, str]] = []
        t0 = time.monotonic()
        with httpx.stream("POST", url, json={"command": ["sh", "-c", "echo a; sleep 1.2; "
                                                         "printf '\\303'; printf '\\251\\n'"]},
                          timeout=30) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            for line in resp.iter_lines():
                lines.append((time.monotonic() - t0, line))
    finally:
        srv.should_exit = True
        t.join(10)
    text = [line for _, line in lines]
    assert text[0] == "event: started"
    assert ": keepalive" in text, text
    events = [(at, json.loads(line[6:])) for at, line in lines if line.startswith("data: ")]
    first_output = next(at for at, d in events if d.get("data") == "a\n")
    assert events[-1][0] - first_output > 1.0, "output was not sent as produced"
    assert "é\n" in "".join(str(d.get("data", "")) for _, d in events)  # split UTF-8 joined
    assert events[-1][1] == {"exit_code": 0, "success": True}


def test_keepalive_answers_are_not_delayed(http: httpx.Client) -> None:
    # A listening socket created without IPPROTO_TCP gets no TCP_NODELAY from asyncio, and
    # every answer on a reused connection then waits ~40 ms for a delayed ACK.
    times = []
    for _ in range(21):
        t0 = time.perf_counter()
        assert http.get("/health").status_code == 200
        times.append(time.perf_counter() - t0)
    assert sorted(times)[10] < 0.02, times


def test_openapi_is_served_and_matches_docs(http: httpx.Client) -> None:
    served = http.get("/openapi.json").json()
    kept = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert served == kept, "docs/openapi.json is stale: regenerate it (see docs/http-api.md)"
    assert "/sandboxes/by-uuid/{uuid}" in served["paths"]
    assert not any("/orchestrations" in p for p in served["paths"])


def test_loopback_rules() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert not is_loopback("example.com")
    assert resolve_api_key("0.0.0.0", "k") == "k"


def test_serve_reports_a_busy_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTKERNEL_API_KEY", "k")  # no key made in the user's data dir
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(UsageError, match="cannot listen"):
            main("127.0.0.1", s.getsockname()[1], lambda: None)  # type: ignore[arg-type, return-value]


def test_our_client_extras(server: RunningServer) -> None:
    import agentkernel
    from agentkernel import AgentKernel, AgentKernelError, ServerError

    with AgentKernel(base_url=server.url + "/", api_key=API_KEY) as c:
        out = c.run(["sh", "-c", "echo o; echo e >&2; exit 5"])
        assert (out.output, out.stderr, out.exit_code, out.success) == ("o\n", "e\n", 5, False)
        name = prefix() + "-ours"
        with c.sandbox(name) as sb:
            try:
                c.create_sandbox(name)
            except ServerError as exc:
                assert exc.status == 500 and exc.http_status == 409
            else:
                raise AssertionError("duplicate create succeeded")
            # Our client encodes file paths, so '?' and '#' are file name characters.
            c.write_file(name, "/tmp/what?#.txt", "q")
            assert c.read_file(name, "/tmp/what?#.txt").content == "q"
            # (not `ls`: Debian's runsc rejects the statx flags coreutils passes)
            assert sb.run(["sh", "-c", "cd /tmp && echo *"]).output.split() == ["what?#.txt"]
    assert issubclass(agentkernel.NotFoundError, AgentKernelError)
    from agentkernel.errors import AgentKernelError as Base

    assert AgentKernelError is Base


def test_import_agentkernel_stays_light() -> None:
    import subprocess
    import sys

    code = ("import sys, agentkernel; "
            "print(sorted(m for m in ('httpx', 'pydantic', 'fastapi') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


