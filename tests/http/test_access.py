"""Who may use the HTTP API: a key even on loopback (made, stored 0600, read by our client),
the Host header (DNS rebinding), foreign Origins, other local users, the insecure opt-out."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from akhttp import API_KEY

from agentkernel.errors import ConfigError, UsageError
from agentkernel.http import keys
from agentkernel.http.guards import host_name
from agentkernel.http.serve import RunningServer, ServeOptions, main, resolve_api_key
from agentkernel.http.serve import start_in_thread as serve_thread
from sandbox_helpers import SYSTEM_PYTHON, public_pythonpath

NOBODY = 65534
AUTH = {"Authorization": f"Bearer {API_KEY}"}
as_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                             reason="needs root (to become nobody) and setpriv")


def as_nobody(argv: list[str], env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    """`argv` as host user nobody; a `python` first argument is a Python nobody can run,
    with our package."""
    base = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
    if argv[0] == "python":
        argv = [SYSTEM_PYTHON, *argv[1:]]
        base["PYTHONPATH"] = public_pythonpath()
    return subprocess.run(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY),
                           "--clear-groups", *argv], capture_output=True, text=True,
                          env=base | (env or {}), timeout=60, check=False)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private data dir of our own (the key lands there), no key in the environment."""
    monkeypatch.setenv("AGENTKERNEL_HOME", str(tmp_path / "ak"))
    monkeypatch.delenv("AGENTKERNEL_API_KEY", raising=False)
    return tmp_path / "ak"


# -- the stored key --

def test_first_serve_makes_a_private_key_shown_once(home: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    key = resolve_api_key("127.0.0.1")
    assert key and len(key) >= 40
    path = home / keys.KEY_FILE
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    err = capsys.readouterr().err
    assert key in err and str(path) in err
    # Later serves reuse it and do not print it again.
    assert resolve_api_key("127.0.0.1") == key
    assert key not in capsys.readouterr().err
    assert [p.name for p in home.iterdir()] == [keys.KEY_FILE]  # no temporary left behind


def test_explicit_keys_win_over_the_stored_one(home: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from agentkernel.config import ApiSection

    assert resolve_api_key("127.0.0.1", "given") == "given"
    monkeypatch.setenv("AGENTKERNEL_API_KEY", "from-env")
    assert resolve_api_key("127.0.0.1") == "from-env"
    monkeypatch.delenv("AGENTKERNEL_API_KEY")
    assert resolve_api_key("::1", api=ApiSection(api_key="from-config")) == "from-config"
    monkeypatch.setenv("MY_KEY", "from-config-env")
    assert resolve_api_key("::1", api=ApiSection(api_key_env="MY_KEY")) == "from-config-env"
    assert not (home / keys.KEY_FILE).exists()  # nothing generated when a key is given


@pytest.mark.parametrize("plant", ["mode", "symlink", "fifo", "garbage"])
def test_an_unsafe_key_file_is_refused(home: Path, tmp_path: Path, plant: str) -> None:
    home.mkdir(mode=0o700)
    path = home / keys.KEY_FILE
    if plant == "mode":
        path.write_text("abcdefgh\n")
        path.chmod(0o644)
    elif plant == "symlink":
        (tmp_path / "elsewhere").write_text("abcdefgh\n")
        path.symlink_to(tmp_path / "elsewhere")
    elif plant == "fifo":
        os.mkfifo(path, 0o600)
    else:
        path.write_text("not a key!\n")
        path.chmod(0o600)
    with pytest.raises(ConfigError):
        resolve_api_key("127.0.0.1")
    assert keys.read_key_quietly(str(path)) is None  # our client: simply no key


def test_a_data_dir_others_can_write_is_refused(home: Path) -> None:
    home.mkdir(mode=0o700)
    home.chmod(0o777)
    with pytest.raises(ConfigError, match="writable by other users"):
        resolve_api_key("127.0.0.1")


@as_root
def test_another_user_cannot_read_the_key(tmp_path: Path) -> None:
    where = Path(tempfile.mkdtemp(prefix="ak-key-", dir="/tmp"))
    try:
        where.chmod(0o755)  # nobody may look into the dir: only the file's mode protects it
        key, made = keys.ensure_key(str(where / keys.KEY_FILE))
        assert made
        got = as_nobody(["cat", str(where / keys.KEY_FILE)])
        assert got.returncode != 0 and "Permission denied" in got.stderr
        assert key not in got.stdout
    finally:
        shutil.rmtree(where)


@as_root
def test_an_ordinary_user_gets_a_private_key_too() -> None:
    where = Path(tempfile.mkdtemp(prefix="ak-key-", dir="/tmp"))
    try:
        os.chown(where, NOBODY, NOBODY)
        path = where / "data" / keys.KEY_FILE
        code = ("import sys; from agentkernel.http.keys import ensure_key; "
                f"print(ensure_key({str(path)!r})[1])")
        got = as_nobody(["python", "-c", code])
        assert got.stdout.strip() == "True", got.stderr
        st = path.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o600)
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    finally:
        shutil.rmtree(where)


# -- a server that made its own key --

@pytest.fixture
def keyed(service: object, home: Path) -> Iterator[RunningServer]:
    """A server started with no key anywhere: it makes one (as `agentkernel serve` does)."""
    srv = serve_thread(service, "127.0.0.1", 0)  # type: ignore[arg-type]
    yield srv
    srv.stop()


def test_loopback_without_key_is_refused(keyed: RunningServer, home: Path) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
        resp = httpx.post(keyed.url + "/run", json={"command": ["true"]}, headers=headers)
        assert resp.status_code == 401 and resp.json()["success"] is False, resp.text
    key = (home / keys.KEY_FILE).read_text().strip()
    resp = httpx.post(keyed.url + "/run", json={"command": ["echo", "in"]},
                      headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert resp.json()["data"]["output"] == "in\n"


def test_our_client_reads_the_stored_key(keyed: RunningServer,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from agentkernel import AgentKernel, AuthError

    monkeypatch.setenv("AGENTKERNEL_BASE_URL", keyed.url.replace("127.0.0.1", "localhost"))
    with AgentKernel() as client:
        assert client.run(["echo", "auto"]).output == "auto\n"
    with AgentKernel(api_key="wrong") as client, pytest.raises(AuthError):
        client.list_sandboxes()
    # Not for a server elsewhere: the key is sent to loopback servers only.
    from agentkernel.client._calls import settings

    assert settings("http://example.com:18888", None, None).api_key is None
    assert settings(keyed.url, None, None).api_key is not None


@as_root
def test_another_user_is_refused(keyed: RunningServer) -> None:
    """nobody, on the same host, with our client (no key of its own) and with curl."""
    code = ("from agentkernel import AgentKernel, AuthError\n"
            "try:\n    AgentKernel().run(['id'])\nexcept AuthError:\n    print('refused')\n"
            "else:\n    print('ACCEPTED')\n")
    got = as_nobody(["python", "-c", code], {"AGENTKERNEL_BASE_URL": keyed.url})
    assert got.stdout.strip() == "refused", (got.stdout, got.stderr)
    got = as_nobody(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                     "-H", "content-type: application/json", "-d", '{"command":["id"]}',
                     keyed.url + "/run"])
    assert got.stdout == "401"


# -- Host and Origin --

@pytest.mark.parametrize(("value", "name"), [
    ("localhost:18888", "localhost"), ("[::1]:80", "::1"), ("127.0.0.1", "127.0.0.1"),
    ("LOCALHOST", "localhost"), ("evil.example:18888", "evil.example"),
    ("[::1", None), ("a:b", None), ("user@localhost", None), ("", None), ("a/b", None),
])
def test_host_names(value: str, name: str | None) -> None:
    assert host_name(value) == name


def test_foreign_host_is_refused(server: RunningServer) -> None:
    port = server.port
    for host in ("evil.example", f"evil.example:{port}", "localhost.evil.example",
                 f"127.0.0.1.nip.io:{port}", "0.0.0.0", "[::ffff:7f00:1]x"):
        resp = httpx.get(server.url + "/sandboxes", headers={**AUTH, "Host": host})
        assert resp.status_code in (400, 421), (host, resp.status_code)
        assert resp.json()["success"] is False
        health = httpx.get(server.url + "/health", headers={"Host": host})
        assert health.status_code in (400, 421), host  # even the open route
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost", "127.0.0.2"):
        resp = httpx.get(server.url + "/sandboxes", headers={**AUTH, "Host": host})
        assert resp.status_code == 200, (host, resp.text)


def test_configured_hosts_are_served(service: object) -> None:
    srv = serve_thread(service, options=ServeOptions(  # type: ignore[arg-type]
        "127.0.0.1", 0, API_KEY, allowed_hosts=("api.internal",)))
    try:
        ok = httpx.get(srv.url + "/sandboxes", headers={**AUTH, "Host": "API.internal:9"})
        assert ok.status_code == 200
        bad = httpx.get(srv.url + "/sandboxes", headers={**AUTH, "Host": "other.internal"})
        assert bad.status_code == 421
    finally:
        srv.stop()


def test_cross_origin_requests_are_refused(server: RunningServer) -> None:
    body = {"command": ["sh", "-c", "echo should-not-run"]}
    for origin in ("http://evil.example", f"http://evil.example:{server.port}", "null",
                   "file://", "http://localhost.evil.example"):
        resp = httpx.post(server.url + "/run", json=body, headers={**AUTH, "Origin": origin})
        assert resp.status_code == 403 and resp.json()["success"] is False, origin
        assert not any(k.lower().startswith("access-control") for k in resp.headers)
    # A preflight gets nothing that would let a browser go on.
    pre = httpx.options(server.url + "/run", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code >= 400
    assert not any(k.lower().startswith("access-control") for k in pre.headers)
    same = httpx.post(server.url + "/run", json={"command": ["echo", "x"]}, timeout=60,
                      headers={**AUTH, "Origin": f"http://localhost:{server.port}"})
    assert same.status_code == 200 and same.json()["data"]["output"] == "x\n"
    assert not any(k.lower().startswith("access-control") for k in same.headers)


# -- the explicit opt-out and public addresses --

def test_insecure_no_key_only_on_loopback(home: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    made: list[int] = []
    with pytest.raises(UsageError, match="insecure-no-key"):
        main(options=ServeOptions("0.0.0.0", 0, insecure_no_key=True).with_config(None),
             service_factory=lambda: made.append(1))  # type: ignore[arg-type, func-returns-value]
    assert made == []
    assert resolve_api_key("127.0.0.1", insecure_no_key=True) is None
    assert "WARNING" in capsys.readouterr().err
    assert not (home / keys.KEY_FILE).exists()


def test_insecure_server_still_checks_host_and_origin(service: object, home: Path) -> None:
    srv = serve_thread(service, options=ServeOptions(  # type: ignore[arg-type]
        "127.0.0.1", 0, insecure_no_key=True).with_config(None))
    try:
        assert httpx.get(srv.url + "/sandboxes").status_code == 200
        assert httpx.get(srv.url + "/sandboxes",
                         headers={"Host": "evil.example"}).status_code == 421
        assert httpx.post(srv.url + "/run", json={"command": ["true"]},
                          headers={"Origin": "http://evil.example"}).status_code == 403
    finally:
        srv.stop()


def test_public_address_gets_a_key_and_serves_only_named_hosts(home: Path) -> None:
    opts = ServeOptions("0.0.0.0", 0).with_config(None)
    assert opts.api_key and (home / keys.KEY_FILE).exists()
    assert opts.allowed() == frozenset()
    named = ServeOptions("10.1.2.3", 0, "k", allowed_hosts=("Box.LAN",))
    assert named.allowed() == {"10.1.2.3", "box.lan"}


def test_unix_socket_needs_no_key(service: object, tmp_path: Path) -> None:
    from agentkernel.http.serve import start_uds_in_thread

    sock = tmp_path / "api.sock"
    srv = start_uds_in_thread(service, str(sock))  # type: ignore[arg-type]
    try:
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)),
                          base_url="http://localhost") as c:
            assert c.get("/sandboxes").status_code == 200
    finally:
        srv.stop()
