"""The seccomp profile our docker and podman containers run under, and the agent's guard.

The engine's default profile refuses the agent what its unix-socket guard needs
(`pidfd_getfd`, `process_vm_readv`/`_writev` need CAP_SYS_PTRACE in Docker's), so the guard
could not start. The container gets a profile of ours instead: the sandbox's own deny
list (the same one the agent loads for its commands, `seccomp.deny_list`), less the calls
only the agent makes. The commands never run under this profile alone: the agent loads
its guard filter and the profile's full deny list (with its argument rules: namespaces,
TIOCSTI, set-id modes) on itself before the first command starts, and they stack.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import paths
from ..seccomp import DENIED_FAMILIES, EAFNOSUPPORT, deny_list

# What the agent itself calls, before or around its commands: the guard copies a caller's
# socket and address (pidfd_open, pidfd_getfd, process_vm_readv), writes sendmmsg()'s count
# back (through /proc/PID/mem) and scopes abstract sockets (Landlock).
AGENT_NEEDS = ("pidfd_open", "pidfd_getfd", "process_vm_readv",
               "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self")
EPERM = 1
ENOSYS = 38

# Docker's default profile's mask of clone()'s namespace flags (CLONE_NEWNS, _NEWCGROUP,
# _NEWUTS, _NEWIPC, _NEWUSER, _NEWPID, _NEWNET): a container makes none of its own. The
# agent makes none either on this path (its --user namespace is for gVisor only).
CLONE_NEW_MASK = 0x7E020000
# personality(2) values Docker's default allows: Linux, Linux32, UNAME26 with either, and
# the query. Others switch off ASLR (ADDR_NO_RANDOMIZE) or make data executable.
PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
# io_uring goes in every profile here: the agent's filter leaves it to permissive
# commands, but the agent and its guard threads never need it.
NEVER = ("unshare", "io_uring_setup", "io_uring_enter", "io_uring_register")


def _errno(names: list[str], errno: int = EPERM, **extra: object) -> dict[str, object]:
    return {"names": names, "action": "SCMP_ACT_ERRNO", "errnoRet": errno, **extra}


def _arg_rules(profile: str) -> list[dict[str, object]]:
    """The engine default's argument rules, as refusals (our default is to allow):
    clone() with any namespace flag (one rule per flag, as the rules of one call are
    or-ed), clone3() as absent (its flags are in memory a filter cannot read; libc
    falls back to clone), socket() of a refused family, and personality() outside
    Docker's values (the comparisons of one rule are and-ed: refused when it equals none
    of them)."""
    rules = [_errno(["clone"], args=[{"index": 0, "value": bit, "valueTwo": bit,
                                      "op": "SCMP_CMP_MASKED_EQ"}])
             for bit in (1 << i for i in range(32)) if CLONE_NEW_MASK & bit]
    rules.append(_errno(["clone3"], ENOSYS))
    # socket() of a refused family (AF_VSOCK: Docker's default refuses it, and this
    # profile replaces that); the kernel reads an int, so the low half is compared
    rules += [_errno(["socket"], EAFNOSUPPORT, args=[{"index": 0, "value": 0xFFFFFFFF,
                                                       "valueTwo": fam,
                                                       "op": "SCMP_CMP_MASKED_EQ"}])
              for fam in DENIED_FAMILIES.values()]
    if "personality" not in deny_list(profile):
        rules += _personality_rules()
    return rules


def _personality_rules() -> list[dict[str, object]]:
    """personality() refused unless its argument is one of PERSONALITIES. The engines
    or the comparisons of one rule that test one argument (runc does), so no rule may
    say "none of these": a value is refused when it has a bit that no allowed value
    but the query has (b) and lacks another (c), which only the query has all of. The
    kernel reads 32 bits, so these are all there are."""
    allowed = 0
    for v in PERSONALITIES[:-1]:
        allowed |= v
    rules = []
    for b in range(32):
        if allowed & (1 << b):
            continue
        for c in range(32):
            if c != b:
                rules.append(_errno(["personality"], args=[
                    {"index": 0, "value": (1 << b) | (1 << c), "valueTwo": 1 << b,
                     "op": "SCMP_CMP_MASKED_EQ"}]))
    return rules


def profile_json(profile: str) -> str:
    """The engine profile (Docker's JSON form) for sandbox profile `profile`."""
    denied = [n for n in deny_list(profile) if n not in AGENT_NEEDS]
    denied += [n for n in NEVER if n not in denied]
    doc = {"defaultAction": "SCMP_ACT_ALLOW",
           "syscalls": [_errno(denied), *_arg_rules(profile)]}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def profile_file(profile: str) -> Path:
    """The same profile as a file in our data dir, for an engine that takes a path
    (Podman's API reads it in its service, as the caller's user)."""
    text = profile_json(profile)
    path = paths.data_dir() / "cache" / "seccomp" / f"container-{profile}.json"
    try:
        if path.read_text(encoding="utf-8") == text:
            return path
    except OSError:
        pass
    paths.write_cache(path, text)
    return path


def own_mounts(workspace_at: str | None, mounts: list[dict[str, object]],
               tmpfs: dict[str, str], merged: str | None = None) -> list[str]:
    """The mounts whose unix sockets a container's commands may connect to (`--guard-unix`):
    its root (the engine's overlay, or its own copy of the image), /dev and /dev/shm (the
    engine's, private IPC), our tmpfs mounts, and a copy-on-write project (an overlay
    passes no connect() on to its layers). Every bind is the host's and is left out:
    the project rw or ro, $HOME, the control dir, the image's host binds. A path with a
    ':' (the list's separator) is left out too: it would name two others. `merged`: the
    exact path of our host-mounted overlay (scratch/MERGED); a bind of any other source
    (a user's project that happens to be named like it) is the host's."""
    own = ["/", "/dev", "/dev/shm", *(t for t in tmpfs if ":" not in t)]
    for m in mounts:
        if m.get("Target") != workspace_at:
            continue
        ours = merged is not None and m.get("Source") == merged
        if ":" not in str(workspace_at) and (m.get("Type") in ("volume", "overlay") or
                                             (m.get("Type") == "bind" and ours)):
            own.append(str(workspace_at))
    return own
