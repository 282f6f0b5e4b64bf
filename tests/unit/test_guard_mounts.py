"""Which mounts the unix-socket guard lets a sandbox connect on, and the seccomp profile of
our containers (pure)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agentkernel.backends.namespaces import build_bwrap_argv
from agentkernel.profiles import get_profile
from agentkernel.rootfs import host_rootfs
from agentkernel.sandbox import SandboxSpec


def _own(argv: list[str]) -> list[str]:
    return argv[argv.index("--guard-unix") + 1].split(":")


@pytest.mark.parametrize("profile", ["permissive", "moderate", "restrictive"])
def test_no_host_bind_is_an_own_mount(tmp_path: Path, profile: str) -> None:
    """The project (rw or ro), $HOME, the control dir: never; the cow project: an overlay."""
    home = tmp_path / "home"
    home.mkdir()
    spec = SandboxSpec(name="t", profile=get_profile(profile), rootfs=host_rootfs(),
                       image="host", workspace=tmp_path, home=home)
    argv = build_bwrap_argv("bwrap", spec, "/agent", "/bpf", resolv=None, info_fd=-1,
                            control=str(tmp_path / "ctl"))
    own = _own(argv)
    assert {"/", "/tmp", "/run", "/dev", "/dev/shm"} <= set(own), own
    assert "/home/user" not in own and "/run/ak/ctl" not in own, own
    assert ("/workspace" in own) == (get_profile(profile).workspace == "cow"), own
    for entry in spec.rootfs.entries:  # the host's dirs: overlays only where root is cow
        if entry.is_dir:
            assert (entry.path in own) == get_profile(profile).root_writable, entry


def test_a_path_with_the_separator_never_names_two_mounts(tmp_path: Path) -> None:
    """A cow project at "/x:/home/user" would make $HOME's bind an own mount."""
    from agentkernel.backends.container_seccomp import own_mounts

    home = tmp_path / "home"
    home.mkdir()
    spec = SandboxSpec(name="t", profile=get_profile("moderate"), rootfs=host_rootfs(),
                       image="host", workspace=tmp_path, home=home,
                       workspace_at="/x:/home/user")
    argv = build_bwrap_argv("bwrap", spec, "/agent", "/bpf", resolv=None, info_fd=-1)
    assert "/home/user" not in _own(argv) and "/x" not in _own(argv), _own(argv)
    overlay = [{"Type": "volume", "Target": "/x:/home/user"}]
    assert own_mounts("/x:/home/user", overlay, {"/a:/home/user": "rw"}) == ["/", "/dev",
                                                                             "/dev/shm"]


def test_a_containers_own_mounts_are_its_tmpfs_and_a_cow_project_only() -> None:
    from agentkernel.backends.container_seccomp import own_mounts

    tmpfs = {"/tmp": "rw", "/run": "rw"}
    binds = [{"Type": "bind", "Source": "/home/me/p", "Target": "/workspace"},
             {"Type": "bind", "Source": "/home/me", "Target": "/home/user"}]
    assert own_mounts("/workspace", binds, tmpfs) == ["/", "/dev", "/dev/shm", "/tmp", "/run"]
    for cow in ({"Type": "volume", "Target": "/workspace"},  # docker's overlay volume
                {"Type": "overlay", "Source": "/home/me/p", "Target": "/workspace"},  # podman's
                {"Type": "bind", "Source": "/s/ws-merged", "Target": "/workspace"}):  # ours
        assert own_mounts("/workspace", [cow, binds[1]], tmpfs,
                          "/s/ws-merged")[-1] == "/workspace", cow
    # a user's own project named like our overlay's dir is a host bind, not ours
    for theirs in ("/home/me/ws-merged", "/s/ws-merged/", "/s/ws-merged/x", "/x/s/ws-merged"):
        user = {"Type": "bind", "Source": theirs, "Target": "/workspace"}
        assert "/workspace" not in own_mounts("/workspace", [user], tmpfs, "/s/ws-merged"), user
    assert "/workspace" not in own_mounts("/workspace", [binds[0]], tmpfs), "no overlay here"


@pytest.mark.parametrize("profile", ["permissive", "moderate", "restrictive"])
def test_the_container_profile_is_the_deny_list_less_the_agents_needs(profile: str) -> None:
    import json

    from agentkernel.backends.container_seccomp import AGENT_NEEDS, NEVER, profile_json
    from agentkernel.seccomp import deny_list

    doc = json.loads(profile_json(profile))
    assert doc["defaultAction"] == "SCMP_ACT_ALLOW"
    denied = set(doc["syscalls"][0]["names"])
    assert denied == (set(deny_list(profile)) | set(NEVER)) - set(AGENT_NEEDS)
    assert {"mount", "bpf", "setns", "unshare", "io_uring_setup"} <= denied
    assert not denied & set(AGENT_NEEDS)


def _refused(doc: dict[str, Any], name: str, arg0: int) -> int | None:
    """The errno `doc` answers `name(arg0)` with (None: allowed), as libseccomp reads
    it: a call's rules are or-ed, a rule's comparisons and-ed."""
    for rule in doc["syscalls"]:
        if name not in rule["names"]:
            continue
        ok = True
        for a in rule.get("args") or []:
            assert a["index"] == 0 and a["op"] in ("SCMP_CMP_MASKED_EQ", "SCMP_CMP_NE")
            if a["op"] == "SCMP_CMP_MASKED_EQ":
                ok = ok and (arg0 & a["value"]) == a["valueTwo"]
            else:
                ok = ok and arg0 != a["value"]
        if ok:
            return int(rule["errnoRet"])
    return None


@pytest.mark.parametrize("profile", ["permissive", "moderate", "restrictive"])
def test_the_container_profile_refuses_namespaces_and_odd_personalities(profile: str) -> None:
    import json
    import random

    from agentkernel.backends.container_seccomp import PERSONALITIES, profile_json

    doc = json.loads(profile_json(profile))
    # clone: a thread or a fork passes, any namespace flag is refused; clone3 is absent.
    assert _refused(doc, "clone", 0x3D0F00) is None  # pthread_create's flags
    assert _refused(doc, "clone", 0x1200011) is None  # fork's
    for flag in (0x20000, 0x2000000, 0x4000000, 0x8000000, 0x10000000, 0x20000000,
                 0x40000000):
        assert _refused(doc, "clone", 0x1200011 | flag) == 1, hex(flag)
    assert _refused(doc, "clone3", 0) == 38
    # personality: Docker's values only (restrictive refuses it all).
    rng = random.Random(7)
    others = [0x40000, 0x400000, 0x40008, 0x20001, 0xFFFFFFFE, 0x7FFFFFFF, 1,
              *(rng.getrandbits(32) for _ in range(300))]
    for v in others:
        if v not in PERSONALITIES:
            assert _refused(doc, "personality", v) == 1, hex(v)
    for v in PERSONALITIES:
        assert _refused(doc, "personality", v) == (1 if profile == "restrictive" else None)


def test_podman_is_given_the_profile_as_a_file(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from agentkernel.backends.container_seccomp import profile_json
    from agentkernel.backends.podman import _seccomp_file

    monkeypatch.setenv("AGENTKERNEL_HOME", str(tmp_path))
    path = _seccomp_file(["no-new-privileges", f"seccomp={profile_json('moderate')}"])
    assert path.read_text() == profile_json("moderate")
    with pytest.raises(ValueError):
        _seccomp_file(["no-new-privileges"])


@pytest.mark.parametrize("profile", ["permissive", "moderate", "restrictive"])
def test_the_container_profile_refuses_vsock_sockets(profile: str) -> None:
    import json

    from agentkernel.backends.container_seccomp import profile_json

    doc = json.loads(profile_json(profile))
    # AF_VSOCK (a netns does not confine it), also with junk above the int the kernel reads
    assert _refused(doc, "socket", 40) == 97
    assert _refused(doc, "socket", (1 << 32) | 40) == 97
    for family in (1, 2, 10, 16, 17):  # unix, inet, inet6, netlink, packet: the kernel's to judge
        assert _refused(doc, "socket", family) is None
