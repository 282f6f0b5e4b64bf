"""The egress gate in front of a microVM (QEMU user networking, TCG here): the guest's
connections and DNS queries are QEMU's own sockets, in a namespace whose only way out is
the sandbox's gate. Real guests (busybox) against the suite's test upstream: an allow-list
holds (by name, pinned DNS, Host), private and metadata addresses stay refused, refusals
are in `egress log`, a live update opens a host; a secret reaches only its host, the guest
seeing a placeholder and the sandbox's CA in its system bundle."""

from __future__ import annotations

import os
import re
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel.sandbox import Sandbox
from sandbox_helpers import SYSTEM_PYTHON, ShellProbe, Upstream, ak, make_upstream

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_egress_policy import UPSTREAM_NAMES, hosts

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(os.geteuid() != 0, reason="the test upstream needs root")]

TCP_PORT_PROBE = "10.0.2.2"  # QEMU's view of its namespace's loopback: the gate's listeners


@pytest.fixture(scope="module")
def upstream(microvm_ready: None) -> Iterator[Upstream]:
    with make_upstream(UPSTREAM_NAMES) as up:
        server = Path(__file__).resolve().parent.parent / "egress_upstream.py"
        up.serve(SYSTEM_PYTHON, str(server), str(up.dir / "srv.pem"), str(up.dir / "srv.key"))
        yield up


def sh(vm: Sandbox, script: str) -> str:
    out, err, _ = vm.client.exec(["sh", "-c", script], env={"PATH": "/bin:/usr/bin"},
                                 cwd="/").wait(180)
    return (out + err).decode(errors="replace")


def marked(text: str) -> dict[str, str]:
    """`@label value...` lines of a guest script's output, by label."""
    seen: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"@(\S+) ?(.*)", line)
        if m:
            seen[m.group(1)] = (seen.get(m.group(1), "") + " " + m.group(2)).strip()
    return seen


def probe_script(up: Upstream) -> str:
    from agentkernel.egress_proxy import TCP_PORT

    p = ShellProbe(wget_timeout=10)  # the guest's busybox wget has no timeout of its own
    return "".join([*p.common(up), p.nc("gate-itself", TCP_PORT_PROBE, TCP_PORT),
                    p.get("other", "http://other.test:18080/")])


def test_allow_list_log_and_live_update(upstream: Upstream) -> None:
    from agentkernel.backends.microvm import MicrovmBackend
    from agentkernel.egress_policy import policy_for
    from agentkernel.egress_proxy import TCP_PORT
    from agentkernel.profiles import get_profile
    from agentkernel.rootfs import host_rootfs
    from agentkernel.sandbox import SandboxSpec

    name = f"vmgate-{os.getpid()}"
    policy = policy_for("egress", None, ("allowed.test", "rebind.test"), (),
                        tuple(h for h in hosts(upstream) if h != "--add-host"))
    spec = SandboxSpec(name=name, profile=get_profile("moderate"), rootfs=host_rootfs(),
                       image="busybox", egress=policy)
    vm = MicrovmBackend().start(spec)
    try:
        seen = marked(sh(vm, probe_script(upstream)))
        assert seen.pop("http-allowed") == "hello host=allowed.test:18080 key=-", seen
        assert seen.pop("raw-allowed") == "SSH-2.0-upstream", seen
        assert "NXDOMAIN" in seen.pop("dns-denied"), seen
        assert all("hello" not in v and "SSH" not in v for v in seen.values()), seen
        log = ak("egress", name, "log")
        assert log.returncode == 0, log.stderr
        for line in ("dns denied.test REFUSED by default deny",
                     "http allowed.test:18080 allowed by allow allowed.test",
                     "http denied.test:18080 REFUSED",  # the Host sent to allowed.test's IP
                     f"tcp {upstream.private}:18022 REFUSED by always-denied address",
                     f"tcp {upstream.addr2}:18022 REFUSED by default deny",
                     # 10.0.2.2 is QEMU's namespace's loopback: the gate's own listener
                     f"tcp 127.0.0.1:{TCP_PORT} REFUSED by always-denied address"):
            assert line in log.stdout, (line, log.stdout)
        # Live: one more allowed name, at once, in the running VM.
        r = ak("egress", name, "allow", "other.test")
        assert r.returncode == 0, r.stderr
        again = marked(sh(vm, probe_script(upstream).splitlines()[-1] + "\n"))
        assert again["other"] == "hello host=other.test:18080 key=-", again
    finally:
        vm.destroy()


SECRET_VALUE = "sk-vm-" + secrets.token_hex(12)
PY_SKIP = {"test", "tests", "__pycache__", "idlelib", "tkinter", "ensurepip", "lib2to3",
           "pydoc_data", "distutils", "unittest", "turtledemo", "config-3.11-x86_64-linux-gnu"}


def _copy_with_libs(binary: Path, root: Path) -> None:
    """`binary` and the shared libraries it links, at their host paths under `root`."""
    import shutil
    import subprocess

    paths = [binary]
    ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    for line in ldd.stdout.splitlines():
        path = line.split("=>")[-1].split("(")[0].strip()
        if path.startswith("/"):
            paths.append(Path(path))
    for path in paths:
        dest = root / str(path).lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            shutil.copy2(os.path.realpath(path), dest)


@pytest.fixture(scope="module")
def python_root(microvm_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The busybox base root plus the host's python3 (stdlib, ssl): a guest whose TLS
    client verifies certificates against the system bundle (busybox's wget does not)."""
    import shutil

    from agentkernel.vm.disk import _fill_base_tree, base_busybox

    busybox = base_busybox()
    python = Path(os.path.realpath("/usr/bin/python3"))
    stdlib = Path("/usr/lib") / python.name  # Debian's layout
    if busybox is None or not python.name.startswith("python3") or not stdlib.is_dir():
        pytest.skip("needs busybox-static and the system's python3")
    root = tmp_path_factory.mktemp("pyroot")
    _fill_base_tree(root, busybox)
    _copy_with_libs(python, root)
    (root / "usr/bin/python3").unlink(missing_ok=True)
    (root / "usr/bin/python3").symlink_to(python.name)
    shutil.copytree(stdlib, root / str(stdlib).lstrip("/"), symlinks=True,
                    ignore=lambda _d, names: [n for n in names if n in PY_SKIP])
    for ext in (root / str(stdlib).lstrip("/") / "lib-dynload").glob("_ssl*.so"):
        _copy_with_libs(ext, root)
    return root


SECRET_PROBE = r"""
import json, os, urllib.request
def get(url):
    req = urllib.request.Request(url, headers={"x-api-key": os.environ["SECRET_KEY"]})
    try:
        return urllib.request.urlopen(req, timeout=30).read().decode().strip()
    except Exception as exc:
        return "refused " + type(exc).__name__
print(json.dumps({
    "env": os.environ["SECRET_KEY"], "trustvar": os.environ["SSL_CERT_FILE"],
    "certs": open("/etc/ssl/certs/ca-certificates.crt").read().count("BEGIN CERTIFICATE"),
    "secret": get("https://secret.test:18443/"),  # verified against the system bundle
    "cleartext": get("http://other.test:18080/")}))
"""
SEARCH = ("printf '%s%s\\n' \"$REAL_A\" \"$REAL_B\" | grep -rlF -f - /proc/[0-9]*/environ "
          "/proc/[0-9]*/cmdline /etc /run /tmp /root /workspace 2>/dev/null | head -3")


def test_secret_reaches_its_host_only(upstream: Upstream, python_root: Path) -> None:
    """The guest's variable holds a placeholder; the gate puts the value into the header
    of requests to secret.test only, its TLS intercepted with the sandbox's CA, which the
    guest's system bundle (and so Python's verification) now trusts; the placeholder in
    clear text to another host is refused; the value is nowhere in the guest."""
    import json

    from agentkernel.backends.microvm import MicrovmBackend
    from agentkernel.egress_gate import format_entry, read_log
    from agentkernel.egress_policy import policy_for
    from agentkernel.profiles import get_profile
    from agentkernel.rootfs import tree_rootfs
    from agentkernel.sandbox import SandboxSpec
    from agentkernel.secrets_store import Use, grant_secrets

    r = ak("secret", "set", "vmkey", "--host", "secret.test", "--header", "x-api-key",
           "--env", "SECRET_KEY", input=SECRET_VALUE.encode() + b"\n")
    assert r.returncode == 0, r.stderr
    host_certs = Path("/etc/ssl/certs/ca-certificates.crt").read_text().count(
        "BEGIN CERTIFICATE")
    env = {"PATH": "/usr/bin:/bin", "REAL_A": SECRET_VALUE[:8], "REAL_B": SECRET_VALUE[8:]}
    added = [h for h in hosts(upstream) if h != "--add-host"]
    policy = grant_secrets(policy_for("egress", None, (), (),
                                      (*added, f"secret.test:{upstream.addr}")),
                           [Use("vmkey", ("secret.test",), "x-api-key", "SECRET_KEY")], env)
    spec = SandboxSpec(name=f"vmsecret-{os.getpid()}", profile=get_profile("moderate"),
                       rootfs=tree_rootfs(python_root, "pytest-python"), image="python",
                       egress=policy)
    old = os.environ.get("AGENTKERNEL_EGRESS_UPSTREAM_CA")
    os.environ["AGENTKERNEL_EGRESS_UPSTREAM_CA"] = str(upstream.ca)  # the gate's trust
    try:
        vm = MicrovmBackend().start(spec)
    finally:
        if old is None:
            os.environ.pop("AGENTKERNEL_EGRESS_UPSTREAM_CA")
        else:
            os.environ["AGENTKERNEL_EGRESS_UPSTREAM_CA"] = old
    try:
        out, err, _ = vm.client.exec(["python3", "-c", SECRET_PROBE], env=env,
                                     cwd="/").wait(240)
        seen = json.loads(out)
        assert seen["env"].startswith("ak-secret-") and SECRET_VALUE not in seen["env"]
        assert seen["trustvar"] == "/etc/ssl/certs/ca-certificates.crt", seen
        assert seen["certs"] == host_certs + 1, seen  # the system's and the sandbox's CA
        assert seen["secret"] == f"hello host=secret.test:18443 key={SECRET_VALUE}", \
            (seen, err)
        assert seen["cleartext"] == "refused RemoteDisconnected" or \
            seen["cleartext"].startswith("refused"), seen
        found, _, _ = vm.client.exec(["sh", "-c", SEARCH], env=env, cwd="/").wait(120)
        assert found == b"", found
        log = "\n".join(format_entry(e) for e in read_log(vm.scratch)[0])
        assert "placeholder of secret vmkey sent in clear text" in log, log
        assert SECRET_VALUE not in log and SECRET_VALUE not in \
            (vm.scratch / "egress-gate.err").read_text()
    finally:
        vm.destroy()
