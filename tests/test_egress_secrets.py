"""Secrets from config and in kept sandboxes, through the real gate, with real traffic.

The attacker here ships a hostile agentkernel.toml in a repository the user runs: it asks
for the user's stored secret, for more hosts than the user gave it, for any header. It
must never get the value sent anywhere the user did not approve (secrets_store.resolve_uses
is the rule). The user's own config may widen. `create --secret` and `run --keep --secret`
keep the secret across the daemon's life (the value is read again at each start), with
live `egress NAME allow|deny` on top.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_helpers import SYSTEM_PYTHON, Upstream, ak, ak_as_user, serving_upstream

NOBODY = 65534

VALUE = "sk-cfg-" + secrets.token_hex(12)

# Prints one JSON object: the placeholder it was given, and what each request reached.
# The test CA and (when a secret is given) the sandbox's own CA bundle are trusted.
SCRIPT = r"""
K="${%(var)s-unset}"
B=/tmp/bundle.pem
cat /workspace/ca.pem ${CURL_CA_BUNDLE:-} > $B
get() { curl -sS -m 20 --cacert $B "$1" -H "$2" 2>/dev/null || echo refused; }
printf '{"env": "%%s", "secret": "%%s", "secret_auth": "%%s", "other": "%%s"}\n' "$K" \
  "$(get https://secret.test:18443/ "x-api-key: $K")" \
  "$(get https://secret.test:18443/ "authorization: $K")" \
  "$(get https://other.test:18443/ "x-api-key: $K")"
"""


def script(var: str = "SECRET_KEY") -> list[str]:
    return ["sh", "-c", SCRIPT % {"var": var}]


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with serving_upstream(["secret.test", "other.test", "allowed.test"]) as up:
        yield up


@pytest.fixture(scope="module")
def stored() -> None:
    """`skey` (secret.test, x-api-key; projects may not ask) and `wide` (secret.test and
    other.test, any header; projects may ask)."""
    for args in (["skey", "--host", "secret.test", "--header", "x-api-key",
                  "--env", "SECRET_KEY"],
                 ["wide", "--host", "secret.test", "--host", "other.test", "--header", "*",
                  "--env", "WIDE_KEY", "--projects"]):
        r = ak("secret", "set", *args, input=VALUE.encode() + b"\n")
        assert r.returncode == 0, r.stderr


def hosts(up: Upstream) -> list[str]:
    return ["--add-host", f"secret.test:{up.addr}", "--add-host", f"other.test:{up.addr}",
            "--add-host", f"allowed.test:{up.addr}"]


def env(up: Upstream, **extra: str) -> dict[str, str]:
    return {"AGENTKERNEL_EGRESS_UPSTREAM_CA": str(up.ca), **extra}


def run(project: Path, up: Upstream, *flags: str, var: str = "SECRET_KEY",
        extra_env: dict[str, str] | None = None) -> tuple[dict[str, str], str]:
    shutil.copy(up.ca, project / "ca.pem")
    r = ak("run", "--json", "-B", "namespaces", "-i", "host", *flags, *hosts(up), "--",
           *script(var), cwd=project, env=env(up, **(extra_env or {})))
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    err = r.stderr + result["stderr"]  # ours, and the command's
    assert VALUE not in err
    seen = json.loads(result["stdout"])
    seen["_audit"] = ak(  # what the gate decided, for a failure's message
        "egress", result["sandbox"], "log", "--audit").stdout[-1500:]
    return seen, err


def reached(key: str, host: str = "secret.test") -> str:
    return f"hello host={host}:18443 key={key}"


HOSTILE = """
[secrets.skey]
hosts = ["secret.test", "other.test"]
header = "*"
env = "SECRET_KEY"
"""


def test_hostile_project_cannot_take_a_secret(project: Path, upstream: Upstream,
                                              stored: None) -> None:
    """A project file naming the user's secret gets nothing: the secret was not stored for
    projects, and the run did not ask for it."""
    (project / "agentkernel.toml").write_text(HOSTILE)
    seen, err = run(project, upstream)
    assert seen["env"] == "unset", seen
    assert seen["secret"] == reached("unset"), seen  # not intercepted: no value anywhere
    assert "project asks for secret 'skey': not given" in err, err


def test_hostile_project_cannot_widen_a_secret(project: Path, upstream: Upstream,
                                               stored: None) -> None:
    """With the user's --secret, the project's wider hosts and its `*` header are ignored:
    the value goes to secret.test in x-api-key only; other.test sees the placeholder."""
    (project / "agentkernel.toml").write_text(HOSTILE)
    seen, err = run(project, upstream, "--secret", "skey")
    placeholder = seen["env"]
    assert placeholder.startswith("ak-secret-"), seen
    assert seen["secret"] == reached(VALUE), seen
    assert seen["secret_auth"] == "refused", seen  # a placeholder outside its header
    assert seen["other"] == reached(placeholder, "other.test"), seen
    assert "hosts other.test: ignored" in err and "header '*': ignored" in err, err


def test_project_may_ask_and_narrow(project: Path, upstream: Upstream, stored: None) -> None:
    """A secret stored with --projects is given to a project that asks; the project narrows
    its hosts and header and names the variable."""
    (project / "agentkernel.toml").write_text(
        '[secrets.wide]\nhosts = ["secret.test"]\nheader = "x-api-key"\nenv = "MY_KEY"\n')
    seen, _err = run(project, upstream, var="MY_KEY")
    placeholder = seen["env"]
    assert placeholder.startswith("ak-secret-"), seen
    assert seen["secret"] == reached(VALUE), seen
    assert seen["secret_auth"] == "refused", seen
    assert seen["other"] == reached(placeholder, "other.test"), seen


def test_user_config_gives_and_widens(project: Path, upstream: Upstream, stored: None,
                                      tmp_path: Path) -> None:
    """Your own config's [secrets.NAME] gives it to every run and may widen its hosts; a
    run without network is not refused for it."""
    xdg = tmp_path / "xdg"
    (xdg / "agentkernel").mkdir(parents=True)
    (xdg / "agentkernel" / "config.toml").write_text(
        '[secrets.skey]\nhosts = ["secret.test", "other.test"]\n')
    seen, _err = run(project, upstream, extra_env={"XDG_CONFIG_HOME": str(xdg)})
    assert seen["secret"] == reached(VALUE) and seen["other"] == reached(VALUE, "other.test")
    assert seen["secret_auth"] == "refused", seen
    r = ak("run", "-B", "namespaces", "-i", "host", "--no-network", "--", "true",
           cwd=project, env={"XDG_CONFIG_HOME": str(xdg)})
    assert r.returncode == 0, r.stderr


def test_kept_sandboxes_keep_their_secrets(project: Path, upstream: Upstream,
                                           stored: None) -> None:
    """`create --secret` and `run --keep --secret` through the daemon: the placeholder in
    every exec, the value at the gate, again after a restart; `egress NAME allow|deny`
    changes the policy of the running sandbox."""
    shutil.copy(upstream.ca, project / "ca.pem")
    name = f"sec-{secrets.token_hex(3)}"
    r = ak("create", name, "-B", "namespaces", "-i", "host", "--dir", str(project),
           "--secret", "skey", "--allow-host", "secret.test", *hosts(upstream),
           env=env(upstream))
    assert r.returncode == 0, r.stderr
    kept = None
    try:
        def probe(sandbox: str) -> dict[str, str]:
            r = ak("exec", sandbox, "--", *script(), env=env(upstream))
            assert r.returncode == 0, r.stderr
            return dict(json.loads(r.stdout))

        seen = probe(name)
        assert seen["secret"] == reached(VALUE) and seen["other"] == "refused", seen
        assert ak("egress", name, "allow", "other.test").returncode == 0
        assert probe(name)["other"] == reached(seen["env"], "other.test")
        assert ak("stop", name).returncode == 0
        assert ak("start", name).returncode == 0
        seen = probe(name)  # a new gate: the value read from the store again
        assert seen["secret"] == reached(VALUE) and seen["other"] == "refused", seen
        r = ak("run", "--keep", "-B", "namespaces", "-i", "host", "--secret", "skey",
               "--allow-host", "secret.test", *hosts(upstream), "--", *script(),
               cwd=project, env=env(upstream))
        assert r.returncode == 0, r.stderr
        match = re.search(r"sandbox '(run-[0-9a-f]+)' kept", r.stderr)
        assert match, r.stderr
        kept = match.group(1)
        seen = json.loads(r.stdout)
        assert seen["secret"] == reached(VALUE) and seen["other"] == "refused", seen
        assert ak("egress", kept, "deny", "secret.test").returncode == 0
        assert probe(kept)["secret"] == "refused"
        assert VALUE not in json.dumps(ak("egress", kept, "show").stdout)
    finally:
        ak("rm", name)
        if kept:
            ak("rm", kept)


def test_audit_log_outlives_the_sandbox(project: Path, upstream: Upstream,
                                        stored: None) -> None:
    """Every decision also goes to the host's audit log (time, sandbox, host, port, rule,
    bytes), read after the sandbox is gone; never a secret's value or its placeholder."""
    shutil.copy(upstream.ca, project / "ca.pem")
    r = ak("run", "--json", "-B", "namespaces", "-i", "host", "--secret", "skey",
           "--allow-host", "secret.test", *hosts(upstream), "--", *script(), cwd=project,
           env=env(upstream))
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    seen, name = json.loads(result["stdout"]), result["sandbox"]
    assert seen["secret"] == reached(VALUE) and seen["other"] == "refused", seen
    r = ak("egress", name, "log", "--audit", "--json")
    assert r.returncode == 0, r.stderr
    entries = [json.loads(line) for line in r.stdout.splitlines()]
    assert all(e["sandbox"] == name and isinstance(e["t"], float) for e in entries)
    assert any(e["kind"] == "tls-secret" and e["host"] == "secret.test" and e["allowed"]
               and e["port"] == 18443 and e["rule"] == "allow secret.test" for e in entries)
    assert any(e["kind"] == "dns" and e["host"] == "other.test" and e["allowed"] is False
               for e in entries), entries
    closed = [e for e in entries if e["kind"] == "close" and e.get("sent")]
    assert closed and all(e["received"] > 0 for e in closed), entries
    audit = (Path(os.environ["AGENTKERNEL_HOME"]) / "egress-audit" / f"{name}.jsonl"
             ).read_text()
    assert VALUE not in audit and seen["env"] not in audit
    r = ak("egress", name, "log", "--audit")  # for people
    assert "tls-secret secret.test:18443 allowed by allow secret.test" in r.stdout, r.stdout


def test_daemon_runs_with_config_secrets(project: Path, upstream: Upstream, stored: None,
                                         tmp_path: Path) -> None:
    """Runs through the daemon whose config gives a secret: each gets a sandbox of its own
    (a pooled one holds no secret until a run takes it: daemon/runs._grant) and a
    placeholder of its own, with the value at its gate."""
    xdg = tmp_path / "xdg"
    (xdg / "agentkernel").mkdir(parents=True)
    names = ", ".join(f'"{n}.test:{upstream.addr}"' for n in ("secret", "other"))
    (xdg / "agentkernel" / "config.toml").write_text(
        f'[network]\nhosts = [{names}]\n[secrets.skey]\nhosts = ["secret.test"]\n')
    shutil.copy(upstream.ca, project / "ca.pem")
    r = ak("daemon", "start", env=env(upstream))
    assert r.returncode == 0, r.stderr
    try:
        placeholders, sandboxes = set(), set()
        for _ in range(2):
            r = ak("run", "--json", "-B", "namespaces", "-i", "host", "--", *script(),
                   cwd=project, env={"XDG_CONFIG_HOME": str(xdg)})
            assert r.returncode == 0, r.stderr
            result = json.loads(r.stdout)
            assert result["pooled"] is not None, result  # through the daemon
            sandboxes.add(result["sandbox"])
            seen = json.loads(result["stdout"])
            assert seen["secret"] == reached(VALUE), (seen, result)
            assert seen["other"] == reached(seen["env"], "other.test"), seen
            placeholders.add(seen["env"])
        assert len(placeholders) == 2 and len(sandboxes) == 2
    finally:
        ak("daemon", "stop")


def test_config_secret_and_audit_as_an_ordinary_user(upstream: Upstream) -> None:
    """The same rule for an unprivileged user (its own store, config and audit log): its
    config gives the secret, the project's wider hosts are ignored, the audit log has the
    decisions and not the value."""
    if shutil.which("setpriv") is None or not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip("needs setpriv and the system's python3")
    home = Path(tempfile.mkdtemp(prefix="ak-nobody-", dir="/tmp"))
    try:
        proj, cfg = home / "project", home / "config" / "agentkernel"
        proj.mkdir()
        cfg.mkdir(parents=True)
        shutil.copy(upstream.ca, proj / "ca.pem")
        (proj / "agentkernel.toml").write_text(HOSTILE)
        names = ", ".join(f'"{n}.test:{upstream.addr}"' for n in ("secret", "other"))
        (cfg / "config.toml").write_text(f'[network]\nhosts = [{names}]\n'
                                         '[secrets.skey]\nenv = "SECRET_KEY"\n')
        for path in (home, *home.rglob("*")):
            os.chown(path, NOBODY, NOBODY)
        home.chmod(0o755)
        extra = {"XDG_CONFIG_HOME": str(home / "config"), "SECRET_VALUE": VALUE,
                 **env(upstream)}

        def as_user(*args: str) -> tuple[str, str]:
            proc = ak_as_user(NOBODY, home, *args, cwd=proj, env=extra)
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err
            return out, err

        as_user("secret", "set", "skey", "--host", "secret.test", "--header", "x-api-key",
                "--from-env", "SECRET_VALUE")
        out, err = as_user("run", "--json", "-B", "namespaces", "-i", "host", "--",
                           *script())
        result = json.loads(out)
        seen = json.loads(result["stdout"])
        assert seen["secret"] == reached(VALUE), (seen, err)
        assert seen["other"] == reached(seen["env"], "other.test"), seen
        assert "hosts other.test: ignored" in err, err
        out, _ = as_user("egress", result["sandbox"], "log", "--audit")
        assert "tls-secret secret.test:18443 allowed" in out, out
        audit = home / "data" / "egress-audit" / f"{result['sandbox']}.jsonl"
        assert audit.stat().st_uid == NOBODY and VALUE not in audit.read_text()
    finally:
        shutil.rmtree(home, ignore_errors=True)
