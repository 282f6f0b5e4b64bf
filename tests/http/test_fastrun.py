"""`POST /run` through its plain ASGI layer (http/fastrun.py): the same answers as FastAPI's
route, the guards still in front of it, big outputs streamed, bad bodies left to the route."""

from __future__ import annotations

import json

import httpx
import pytest
from akhttp import API_KEY

from agentkernel.http.serve import RunningServer

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def http(server: RunningServer) -> httpx.Client:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        yield client  # type: ignore[misc]


def test_run_answers_in_the_envelope(http: httpx.Client) -> None:
    resp = http.post("/run", content=json.dumps({"command": ["sh", "-c", "echo hi; exit 3"]}),
                     headers={"Content-Type": "application/json; charset=utf-8"})
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    assert int(resp.headers["content-length"]) == len(resp.content)
    body = resp.json()
    assert body["success"] is True and body["error"] is None
    assert body["data"]["exit_code"] == 3 and body["data"]["output"] == "hi\n"


def test_the_guards_stay_in_front(server: RunningServer) -> None:
    body = {"command": ["true"]}
    resp = httpx.post(server.url + "/run", json=body)
    assert resp.status_code == 401
    resp = httpx.post(server.url + "/run", json=body, headers={**AUTH, "Host": "evil.example"})
    assert resp.status_code == 421
    resp = httpx.post(server.url + "/run", json=body,
                      headers={**AUTH, "Origin": "https://evil.example"})
    assert resp.status_code == 403


@pytest.mark.parametrize(("body", "words"), [
    ({"command": "true"}, "command"),  # the route's own message
    ({"command": []}, "command"),
    ({"command": ["true"], "timeout": -1}, "timeout"),
    ([1, 2], ""),
])
def test_bad_bodies_get_the_routes_400(http: httpx.Client, body: object, words: str) -> None:
    resp = http.post("/run", json=body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert isinstance(err, str) and words in err


def test_deep_nesting_answers_as_the_route_does(http: httpx.Client) -> None:
    deep = b'{"command": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    resp = http.post("/run", content=deep, headers={"Content-Type": "application/json"})
    assert resp.status_code in (400, 500), resp.text
    assert resp.json()["success"] is False  # the envelope, whoever answered


def test_not_json_goes_to_the_route(http: httpx.Client) -> None:
    resp = http.post("/run", content=b"command=true",
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert resp.status_code == 400, resp.text


def test_big_output_is_streamed_whole(http: httpx.Client) -> None:
    # Over the one-piece size (64 KiB), under the output cap: chunks of valid JSON.
    script = "head -c 300000 /dev/zero | tr '\\0' a"
    resp = http.post("/run", json={"command": ["sh", "-c", script]})
    assert resp.status_code == 200
    data = resp.json()["data"]
    assert data["exit_code"] == 0 and data["output"] == "a" * 300000
