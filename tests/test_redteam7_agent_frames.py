"""Red team, round 7: frames the agent never sends cannot grow the host's memory.

The host reads its agent's channel on a thread that queues each frame for whoever waits
on its channel; output frames count against a per-channel cap (the reader waits past 4
MiB), but any other frame counted as nothing. A HELLO after the first went to a queue
nobody reads again, and stayed there for the sandbox's life. On gVisor a command can
open its agent's descriptors through `/proc/1/fd` (this runsc does not apply the
agent's non-dumpable state there: the round-5 log fix was for its stderr), among them
the pipe the agent writes to the host: the command wrote 1 MiB HELLO frames into it, and
the host process (the CLI of a one-shot run; the daemon of a pooled one) kept every
one: 300 MiB written, 340 MB resident in the CLI, host memory no cgroup of the sandbox
bounds. Now a second HELLO is garbage (the channel is dropped and the sandbox with it),
and every frame counts against its channel's cap.

The attack counts, in a file of the project, the MiB the host took from the pipe (each
write of the command returns once the host read it): unbounded before, a few now.
Open (documented): the command can still write frames into its own run's channel there
(forge its own run's output and end), which it could mostly do by printing anyway.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel.agent.client import ERROR_KEPT, AgentClient
from agentkernel.agent.protocol import T, Tag, encode_frame, tlv
from sandbox_helpers import backend_available, give_top, shared_top, top_argv, top_env

NOBODY = 65534
FLOOD_MIB = 128  # far past every bound the host keeps per channel (4 MiB)

# Writes FLOOD_MIB HELLO frames of 1 MiB (channel 0) into the agent's host pipe, an "x"
# appended to /workspace/taken after each (the host may end the sandbox at any point).
FLOOD = r"""
import os, struct, sys
mib = int(sys.argv[1])
out = None
for n in sorted(os.listdir("/proc/1/fd"), key=int):
    try:
        if os.readlink("/proc/1/fd/" + n).startswith("host:") and n not in ("0", "1", "2"):
            out = n  # the agent's channel: its first host pipe read, the next written
    except OSError:
        pass
try:
    fd = os.open("/proc/1/fd/" + str(out), os.O_WRONLY)
except (OSError, TypeError) as e:
    print("unreachable", e, flush=True)
    raise SystemExit(0)
frame = struct.pack("<IHHI", 1 << 20, 0x41, 0, 0) + b"A" * (1 << 20)
taken = os.open("/workspace/taken", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
os.write(taken, b"+")  # (the attack ran: the host may end the sandbox at its first frame)
for i in range(mib):
    view = memoryview(frame)
    while view:
        view = view[os.write(fd, view):]
    os.write(taken, b"x")  # one more MiB the host took
print("wrote", mib, flush=True)
"""


@pytest.fixture
def top() -> Iterator[Path]:
    with shared_top("ak-rt7-frames-") as path:
        yield path


@pytest.mark.parametrize("user", [0, NOBODY], ids=["root", "nobody"])
def test_a_gvisor_command_cannot_fill_the_hosts_memory_through_its_agents_pipe(
        top: Path, user: int) -> None:
    if os.geteuid() != 0 or not backend_available("gvisor"):
        pytest.skip("needs root and gvisor")
    give_top(top, user)
    argv = top_argv(user, "gvisor", "permissive", FLOOD, str(FLOOD_MIB))
    # --no-network before our `--` (setpriv's comes first): an ordinary user's slirp needs
    # a tun device this host keeps 0600, and the network is not what is attacked.
    argv.insert(len(argv) - 1 - argv[::-1].index("--"), "--no-network")
    r = subprocess.run(argv, cwd=top / "project", env=top_env(top), capture_output=True,
                       text=True, timeout=240, stdin=subprocess.DEVNULL, check=False)
    assert "unreachable" not in r.stdout, r.stdout  # (then this runsc closed the way)
    taken = top / "project" / "taken"
    assert taken.exists(), (r.returncode, r.stdout, r.stderr[-2000:])
    # Before: all of them, held by the host process until the sandbox ended.
    assert taken.read_text().count("x") < 8, (r.returncode, r.stdout, r.stderr[-2000:])


def test_what_the_host_keeps_of_channel_errors_is_bounded() -> None:
    """The other frame the host kept of its own accord: channel 0's ERRORs, the last 100,
    each with its message whole (up to 1 MiB): 100 MiB per sandbox. Now their messages
    are cut. (The real client over a socket pair, its far end as a forging command's.)"""
    ours, theirs = socket.socketpair()
    client = AgentClient.from_socket(ours)
    try:
        error = encode_frame(T.ERROR, 0, tlv(Tag.ERRNO, (22).to_bytes(4, "little")) +
                             tlv(Tag.MESSAGE, b"E" * (1024 * 1024 - 16)))
        for _ in range(120):
            theirs.sendall(error)
        theirs.close()
        client._reader.join()  # (it ends at the channel's end, every frame read)
        assert len(client.channel_errors) == 100
        assert sum(len(m) for _, m in client.channel_errors) <= 100 * ERROR_KEPT
    finally:
        client.close()
