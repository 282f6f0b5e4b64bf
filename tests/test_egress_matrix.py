"""Issue 11's test list, backend by backend, in one sandbox per backend.

Every backend with a gate (namespaces and gVisor here; the microVM in
tests/microvm/test_microvm_matrix.py, which boots the same script once) gets one sandbox
behind one allow-list (allowed.test, rebind.test, tools.test, secret.test) with one secret
for secret.test, against the suite's test upstream (egress_upstream.py and
egress_tools_upstream.py in a network namespace of ours). Inside, one script:

- every client the issue names, at an allowed host and at an unlisted one: curl, Python
  urllib and requests, Node fetch, `git clone` over HTTPS, `pip install` from a package
  index, a raw TCP client (a server-speaks-first service);
- the secret: curl, urllib, requests and Node fetch get the value to secret.test in its
  header through the system trust the sandbox was given; the placeholder in another header,
  in clear text to a non-secret host, and over TLS to one (which gets the placeholder);
- every bypass of tests/test_egress_policy.py and tests/test_egress_bypass.py (direct IP,
  allowed SNI with a denied Host, rebinding, IPv6 literals, UDP/QUIC, DNS over HTTPS, ...);
- a search of the whole sandbox (every /proc/*/environ and cmdline, /etc, /run, /tmp,
  /root, /home, /workspace) for the secret's value and for any private key, which the test
  compares with the sandbox CA's public key; a canary planted in a file and in a process's
  environment and argv proves the search reads what it claims to.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox_helpers import SYSTEM_PYTHON, Upstream, ak, backend_available, make_upstream, marked
from test_egress_bypass import PROBE as BYPASS_PROBE
from test_egress_bypass import _judge as judge_bypass
from test_egress_bypass import _repo, _wheel, attempts
from test_egress_policy import PROBE as POLICY_PROBE
from test_egress_policy import attacks
from test_egress_policy import judge as judge_policy

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the test upstream needs root")

NAMES = ["allowed.test", "other.test", "denied.test", "secret.test", "tools.test",
         "doh.test", "unlisted.test"]
ALLOW = ("allowed.test", "rebind.test", "tools.test", "secret.test")
SECRET = "mxkey"
SECRET_VALUE = "sk-mx-" + secrets.token_hex(12)
CANARY = "canary-" + secrets.token_hex(12)
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    if shutil.which("ip") is None or shutil.which("openssl") is None \
            or shutil.which("git") is None:
        pytest.skip("needs iproute2, openssl and git")
    with make_upstream(NAMES) as up:
        (up.dir / "git").mkdir()
        _repo(up.dir / "git")
        _wheel(up.dir / "static")
        up.serve(SYSTEM_PYTHON, str(HERE / "egress_tools_upstream.py"), str(up.dir / "srv.pem"),
                 str(up.dir / "srv.key"), str(up.dir / "git"), str(up.dir / "static"))
        up.serve(SYSTEM_PYTHON, str(HERE / "egress_upstream.py"), str(up.dir / "srv.pem"),
                 str(up.dir / "srv.key"))
        r = ak("secret", "set", SECRET, "--host", "secret.test", "--header", "x-api-key",
               "--env", "SECRET_KEY", input=SECRET_VALUE.encode() + b"\n")
        assert r.returncode == 0, r.stderr
        yield up


def host_clients_missing() -> str | None:
    """The client the host's userland (the sandbox's, `-i host`) lacks, if any."""
    import subprocess

    for tool in ("curl", "git", "node"):
        if shutil.which(tool) is None:
            return tool
    for module in ("requests", "pip"):
        if subprocess.run([SYSTEM_PYTHON, "-c", f"import {module}"], capture_output=True,
                          check=False).returncode != 0:
            return f"python3-{module}"
    return None


def added_hosts(up: Upstream) -> tuple[str, ...]:
    return (*(f"{n}:{up.addr}" for n in NAMES), f"rebind.test:{up.private}",
            "meta.test:169.254.169.254")


# --- what runs inside ----------------------------------------------------------------------

# Python clients: urllib, requests and a raw TCP client at an allowed host and an unlisted
# one (the test CA); then the secret through the sandbox's own trust (no CA given).
CLIENTS = r"""
import json, os, socket, ssl, sys, urllib.request
import requests
CA = "/workspace/ca.pem"
out = {}
def attempt(label, fn):
    try:
        out[label] = "ok " + str(fn())
    except Exception as e:
        out[label] = "refused " + type(e).__name__
for h in ("tools", "unlisted"):
    url = "https://%s.test:19443/simple/akdemo/" % h
    ctx = ssl.create_default_context(cafile=CA)
    attempt("urllib_" + h, lambda: urllib.request.urlopen(url, context=ctx, timeout=60).status)
    attempt("requests_" + h, lambda: requests.get(url, verify=CA, timeout=60).status_code)
    attempt("raw_" + h, lambda: socket.create_connection(
        ("%s.test" % h, 18022), timeout=30).recv(100).decode().strip())
S = "https://secret.test:18443/"
H = {"x-api-key": os.environ["SECRET_KEY"]}
attempt("secret_urllib", lambda: urllib.request.urlopen(
    urllib.request.Request(S, headers=H), timeout=60).read().decode().strip())
attempt("secret_requests", lambda: requests.get(S, headers=H, timeout=60).text.strip())
print("@clients " + json.dumps(out))
"""

# The whole sandbox searched for the needles (joined here from halves in the environment,
# so that no environment or argv holds them whole) and for private keys.
SEARCH = r"""
import json, os, re, stat, sys
needles = {k: (os.environ[k + "_A"] + os.environ[k + "_B"]).encode()
           for k in ("SECRET", "CANARY")}
found = {k: [] for k in needles}
keys = []
PEM = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----[^-]+-----END [A-Z ]*PRIVATE KEY-----")
def scan(path, data):
    for k, n in needles.items():
        if n in data:
            found[k].append(path)
    for block in PEM.findall(data)[:8]:
        if len(keys) < 64:
            keys.append([path, block.decode("ascii", "replace")])
def read(path):
    try:
        with open(path, "rb") as f:
            return f.read(4 << 20)
    except OSError:
        return b""
for pid in os.listdir("/proc"):
    if pid.isdigit():
        for what in ("environ", "cmdline"):
            scan("/proc/%s/%s" % (pid, what), read("/proc/%s/%s" % (pid, what)))
files = 0
for top in sys.argv[1:]:
    for dirpath, dirnames, filenames in os.walk(top):
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_size <= 4 << 20:
                files += 1
                scan(path, read(path))
bundle = open("/etc/ssl/certs/ca-certificates.crt").read()
print("@search " + json.dumps({"found": found, "keys": keys, "files": files,
    "certs": bundle.count("-----BEGIN CERTIFICATE-----"),
    "ca": bundle[bundle.rindex("-----BEGIN CERTIFICATE-----"):]}))
"""

SCRIPT = r"""
set -u
CA=/workspace/ca.pem
cd /tmp
# The bypasses first, in the background: they mostly wait for timeouts (a microVM under
# emulation does the clients' work meanwhile).
python3 /workspace/probe_policy.py "$POLICY_TODO" > /tmp/policy.out 2>&1 &
python3 /workspace/probe_bypass.py "$BYPASS_TODO" > /tmp/bypass.out 2>&1 &
# Say ok, or refused with the last line the tool printed.
say() {
  if out=$("$@" 2>&1 >/dev/null); then echo ok; else echo "refused $(echo "$out" | tail -n 1)"; fi
}
node_get() {  # status|body URL...: a line `ok STATUS-or-BODY` or `refused CODE` each
  node -e '
    const [how, ...urls] = process.argv.slice(1);
    (async () => { for (const url of urls) {
      await fetch(url, {headers: {"x-api-key": process.env.SECRET_KEY}})
        .then(async r => console.log("ok " + (how == "status" ? r.status
                                              : (await r.text()).trim())),
              e => console.log("refused " + (e.cause && e.cause.code || e)));
    } })()' "$@"
}
# Node once for both hosts (its start is slow under emulation), trusting the test CA.
NODE_EXTRA_CA_CERTS=$CA node_get status https://tools.test:19443/simple/akdemo/ \
    https://unlisted.test:19443/simple/akdemo/ > /tmp/node.out
echo "@node_tools $(sed -n 1p /tmp/node.out)"
echo "@node_unlisted $(sed -n 2p /tmp/node.out)"
for h in tools unlisted; do
  echo "@curl_$h $(say curl -sS -m 60 --cacert $CA https://$h.test:19443/simple/akdemo/)"
  # (the sandbox's trust variables win over git's http.sslCAInfo and pip's --cert)
  echo "@git_$h $(GIT_SSL_CAINFO=$CA say git clone -q https://$h.test:19443/git/repo.git \
      /tmp/git_$h)"
  echo "@pip_$h $(REQUESTS_CA_BUNDLE=$CA say python3 -m pip install --no-cache-dir \
      --disable-pip-version-check --no-compile --retries 0 --timeout 60 --cert $CA \
      --index-url https://$h.test:19443/simple/ --target /tmp/pip_$h akdemo)"
done
echo "@git_content $(cat /tmp/git_tools/README)"
echo "@pip_content $(PYTHONPATH=/tmp/pip_tools python3 -c 'import akdemo; print(akdemo.WHO)')"
python3 /workspace/clients.py
# The secret: the sandbox's trust (no CA given), then the placeholder where it must not go.
echo "@secret_env $SECRET_KEY"
echo "@secret_curl $(curl -sS -m 60 https://secret.test:18443/ -H "x-api-key: $SECRET_KEY" 2>&1)"
echo "@secret_node $(node_get body https://secret.test:18443/)"
echo "@wrong_header $(curl -sS -m 30 https://secret.test:18443/ -H "authorization: $SECRET_KEY" \
    2>/dev/null || echo refused)"
echo "@cleartext $(curl -sS -m 30 http://tools.test:18080/ -H "x-api-key: $SECRET_KEY" \
    2>/dev/null || echo refused)"
echo "@tls_elsewhere $(curl -sS -m 30 --cacert $CA https://allowed.test:18443/ \
    -H "x-api-key: $SECRET_KEY" 2>&1)"
# The search, with its canary in a file, and in a running process's environment and argv.
echo "$CANARY_A$CANARY_B" > /tmp/canary.txt
env CANARY_FULL="$CANARY_A$CANARY_B" sh -c 'sleep 600; :' "$CANARY_A$CANARY_B" &
python3 /workspace/search.py /etc /run /tmp /root /home /workspace
kill $! 2>/dev/null
wait
echo "@policy $(cat /tmp/policy.out)"
echo "@bypass $(cat /tmp/bypass.out)"
echo "@done"
"""


def patient(probe: str) -> str:
    """A probe whose waits for what must answer (an allowed connection, our resolver) are
    long enough for a guest under emulation on a loaded machine. (Most refusals come at
    once: the gate closes, DNS says NXDOMAIN; the probes run beside the clients anyway.)"""
    return probe.replace("timeout=5)", "timeout=30)").replace("settimeout(3)", "settimeout(20)")


def stage(project: Path, up: Upstream) -> None:
    """The test CA and the probes, in the project (the sandbox's /workspace)."""
    shutil.copy(up.ca, project / "ca.pem")
    for name, text in (("clients.py", CLIENTS), ("search.py", SEARCH),
                       ("probe_policy.py", patient(POLICY_PROBE)),
                       ("probe_bypass.py", patient(BYPASS_PROBE))):
        (project / name).write_text(text)


def plan(up: Upstream) -> tuple[Any, dict[str, str]]:
    """The sandbox's policy (its allow-list, hosts and secret) and the script's env."""
    from agentkernel.egress_policy import policy_for
    from agentkernel.secrets_store import Use, grant_secrets

    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
           "SECRET_A": SECRET_VALUE[:9], "SECRET_B": SECRET_VALUE[9:],
           "CANARY_A": CANARY[:9], "CANARY_B": CANARY[9:],
           "POLICY_TODO": json.dumps(attacks(up, "/workspace/ca.pem")),
           "BYPASS_TODO": json.dumps(attempts(up))}
    policy = grant_secrets(policy_for("egress", None, ALLOW, (), added_hosts(up)),
                           [Use(SECRET, ("secret.test",), "x-api-key", "SECRET_KEY")], env)
    return policy, env


def spec_for(name: str, policy: Any, project: Path, rootfs: Any, image: str) -> Any:
    from agentkernel.profiles import get_profile
    from agentkernel.sandbox import SandboxSpec

    # pip and node at once want more than moderate's 512 MiB; a second CPU lets a microVM
    # under emulation run the probes beside the clients.
    profile = get_profile("moderate").with_overrides(memory_mb=1024, cpus=2)
    return SandboxSpec(name=name, profile=profile, rootfs=rootfs, image=image,
                       workspace=project, egress=policy)


def run_matrix(backend: Any, spec: Any, env: dict[str, str], up: Upstream,
               monkeypatch: pytest.MonkeyPatch, *, timeout: float) -> tuple[dict[str, str], str]:
    """Start the sandbox, run the script once; (its `@label value` lines, the gate's log)."""
    monkeypatch.setenv("AGENTKERNEL_EGRESS_UPSTREAM_CA", str(up.ca))  # the gate's trust
    sandbox = backend.start(spec)
    try:
        out, err, status = sandbox.client.exec(["sh", "-c", SCRIPT], env=env,
                                               cwd="/workspace").wait(timeout)
        text = out.decode(errors="replace")
        assert "@done" in text, (text, err.decode(errors="replace"), status)
        for path in sandbox.scratch.rglob("*"):  # nor the CA's key, nor the value, outside
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()[:4 << 20]
                assert b"PRIVATE KEY" not in data and SECRET_VALUE.encode() not in data, path
        log = ak("egress", spec.name, "log")
        assert log.returncode == 0, log.stderr
        return marked(text), log.stdout
    finally:
        sandbox.destroy()



# --- the verdicts --------------------------------------------------------------------------


def judge(seen: dict[str, str], log: str, up: Upstream) -> None:
    judge_clients(seen)
    placeholder = judge_secret(seen)
    policy = json.loads(seen.pop("policy"))
    judge_policy(policy)
    todo = attempts(up)
    judge_bypass(json.loads(seen.pop("bypass")), todo)
    judge_search(json.loads(seen.pop("search")))
    assert placeholder not in log and SECRET_VALUE not in log
    for line in ("dns unlisted.test REFUSED by default deny",
                 f"placeholder of secret {SECRET} sent in clear text",
                 f"tcp {up.private}:18022 REFUSED by always-denied address",
                 f"tcp {up.addr2}:18022 REFUSED by default deny",
                 "http denied.test:18080 REFUSED"):
        assert line in log, (line, log)


def judge_clients(seen: dict[str, str]) -> None:
    clients = json.loads(seen.pop("clients"))
    tools = {k: seen.pop(f"{k}_tools") for k in ("curl", "git", "pip")}
    tools.update(node=seen.pop("node_tools"), **{k: clients.pop(f"{k}_tools")
                                                 for k in ("urllib", "requests", "raw")})
    assert tools == {"curl": "ok", "git": "ok", "pip": "ok", "node": "ok 200",
                     "urllib": "ok 200", "requests": "ok 200",
                     "raw": "ok SSH-2.0-upstream"}, tools
    assert seen.pop("git_content") == "cloned through the gate", seen
    assert seen.pop("pip_content") == "akdemo from tools.test", seen
    unlisted = {k: seen.pop(f"{k}_unlisted") for k in ("curl", "git", "pip", "node")}
    unlisted.update({k: clients.pop(f"{k}_unlisted") for k in ("urllib", "requests", "raw")})
    assert all(v.startswith("refused") for v in unlisted.values()), unlisted
    seen.update({k: v for k, v in clients.items()})


def judge_secret(seen: dict[str, str]) -> str:
    placeholder = seen.pop("secret_env")
    assert placeholder.startswith("ak-secret-") and SECRET_VALUE not in placeholder
    value = f"hello host=secret.test:18443 key={SECRET_VALUE}"
    got = {k: seen.pop(f"secret_{k}") for k in ("curl", "urllib", "requests", "node")}
    assert got == {"curl": value, "urllib": f"ok {value}", "requests": f"ok {value}",
                   "node": f"ok {value}"}, got
    assert seen.pop("wrong_header") == "refused", seen
    assert seen.pop("cleartext") == "refused", seen
    # Over TLS to a host without secrets the gate cannot see it: the host gets the
    # placeholder, never the value.
    assert seen.pop("tls_elsewhere") == f"hello host=allowed.test:18443 key={placeholder}"
    return placeholder


def judge_search(search: dict[str, Any]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    found = search["found"]
    assert found["SECRET"] == [], found  # the value: in no process, no file
    canary = found["CANARY"]  # the search reads what it claims to
    assert "/tmp/canary.txt" in canary, canary
    assert any(re.fullmatch(r"/proc/\d+/environ", p) for p in canary), canary
    assert any(re.fullmatch(r"/proc/\d+/cmdline", p) for p in canary), canary
    # The system's bundle plus the sandbox's CA, last.
    host = Path("/etc/ssl/certs/ca-certificates.crt").read_text().count("BEGIN CERTIFICATE")
    assert search["certs"] == host + 1, search["certs"]
    ca = x509.load_pem_x509_certificate(search["ca"].encode())
    assert ca.subject.rfc4514_string().startswith("CN=agentkernel egress"), ca.subject
    ca_public = ca.public_key().public_numbers()  # type: ignore[union-attr]
    for path, pem in search["keys"]:
        try:
            key = load_pem_private_key(pem.encode(), password=None)
        except (ValueError, TypeError):
            continue  # encrypted or not a key we can read: not the CA's, which is EC
        public = key.public_key().public_numbers()  # type: ignore[union-attr]
        assert public != ca_public, f"the sandbox CA's private key is readable at {path}"


@pytest.mark.parametrize("name", ["namespaces", "gvisor"])
def test_every_client_and_bypass(name: str, project: Path, upstream: Upstream,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from agentkernel.backends import get_backend
    from agentkernel.rootfs import host_rootfs

    if not backend_available(name):
        pytest.skip(f"{name} backend not installed")
    lacking = host_clients_missing()
    if lacking:
        pytest.skip(f"the host's userland lacks {lacking} (scripts/test.sh installs it)")
    stage(project, upstream)
    policy, env = plan(upstream)
    spec = spec_for(f"mx-{name[:2]}-{os.getpid()}", policy, project, host_rootfs(), "host")
    seen, log = run_matrix(get_backend(name), spec, env, upstream, monkeypatch, timeout=280)
    judge(seen, log, upstream)
    seen.pop("done")
    assert not seen, seen  # every line was judged
