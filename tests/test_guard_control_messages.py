"""The unix guard's control messages: walked as the kernel walks them, sent as rebuilt.

The guard performs a command's sendmsg() itself, so every fd number an SCM_RIGHTS carries
must be the caller's file (taken with pidfd_getfd), never resolved in the agent's own fd
table. The agent once walked the caller's messages with the libc's CMSG_NXTHDR and sent
the caller's own buffer: glibc before 2.36 ended that walk at a last message whose
aligned length ran past the buffer though its real length fit, the kernel did not, and a
second SCM_RIGHTS then passed the agent's fds (an outside review reached the agent's
seccomp listener so, and through it a host socket). These send such layouts from a real
sandbox through ctypes (Python's API builds only well-formed buffers) and check what
arrives: both files the caller's; a last header with no payload walked too; bytes left
over that make no whole message, a level nothing reads (RDS's, whose messages carry
pointers into the sender's memory) and unknown ones refused with EINVAL where the agent
before sent them on; credentials still judged by the kernel; a UDP send's IP_TOS still
passing; and sendmmsg()'s count written back (now through the caller's memory opened
before the agent checks the call still waits). In a namespaces sandbox, and the review's
layout and the count in a podman container too.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from sandbox_helpers import (
    backend_available,
    build_probe,
    container_project,
    container_run,
    probe_verdicts,
    run_quiet,
)
from test_containers import podman_user, rootless_run

__all__ = ["podman_user"]  # (a fixture: pytest finds it here)

pytestmark = pytest.mark.skipif(not backend_available("namespaces"), reason="needs bwrap")

CMSG = r"""
import ctypes, errno, os, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
SOL_SOCKET, SCM_RIGHTS, SCM_CREDENTIALS, SOL_RDS = 1, 1, 2, 276
d = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
mine = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); mine.bind("/tmp/cmsg.sock")
mine.setblocking(False)
path = b"/tmp/cmsg.sock\0"
addr = ctypes.create_string_buffer(socket.AF_UNIX.to_bytes(2, sys.byteorder) + path,
                                   2 + len(path))
data = ctypes.create_string_buffer(b"x")
iov = (ctypes.c_uint64 * 2)(ctypes.addressof(data), 1)
def hdr(length, level, kind):  # the kernel's struct cmsghdr: a size_t, two ints
    return struct.pack("=Qii", length, level, kind)
def rights(*fds):
    body = b"".join(struct.pack("=i", f) for f in fds)
    return hdr(16 + len(body), SOL_SOCKET, SCM_RIGHTS) + body
def pad(b):
    return b + bytes(-len(b) % 8)
def send(label, ctl):
    buf = ctypes.create_string_buffer(ctl, len(ctl))
    msg = (ctypes.c_uint64 * 7)(ctypes.addressof(addr), len(path) + 2, ctypes.addressof(iov),
                                1, ctypes.addressof(buf), len(ctl), 0)
    rc = libc.sendmsg(d.fileno(), msg, 0)
    print(label, "ok" if rc >= 0 else errno.errorcode[ctypes.get_errno()], flush=True)
    return rc >= 0
def received():
    fds = []
    while True:
        try:
            _, anc, _, _ = mine.recvmsg(16, 256)
        except BlockingIOError:
            return fds
        for level, kind, body in anc:
            n = len(body) // 4
            fds += struct.unpack(f"={n}i", body[:4 * n])
def same(a, b):
    x, y = os.fstat(a), os.fstat(b)
    return (x.st_dev, x.st_ino) == (y.st_dev, y.st_ino)
r1, w1 = os.pipe()
r2, w2 = os.pipe()
# the review's layout: a second SCM_RIGHTS whose aligned length (24) runs past the end
# though its length (20) fits: glibc < 2.36 ended its walk before it, the kernel does not
if send("two-rights", pad(rights(w1)) + rights(w2)):
    got = received()
    print("two-rights-files", "caller" if len(got) == 2 and same(got[0], w1) and
          same(got[1], w2) else f"NOT-CALLER:{len(got)}", flush=True)
# a last header with no payload that exactly fills the buffer (musl ends before it)
if send("empty-last", pad(rights(w1)) + hdr(16, SOL_SOCKET, SCM_RIGHTS)):
    got = received()
    print("empty-last-files", "caller" if len(got) == 1 and same(got[0], w1) else
          f"NOT-CALLER:{len(got)}", flush=True)
send("trailing", pad(rights(w1)) + bytes(8))  # 8 bytes after it: no whole message
send("short", bytes(8))  # a buffer too short for any header
send("rds", pad(hdr(20, SOL_RDS, 1) + bytes(4)))
send("unknown-level", pad(hdr(20, 0x1234, 1) + bytes(4)))
send("unknown-type", pad(hdr(20, SOL_SOCKET, 0x77) + bytes(4)))
# credentials naming the caller: the kernel judges the sender (the agent): EPERM
send("creds", hdr(28, SOL_SOCKET, SCM_CREDENTIALS) +
     struct.pack("=iII", os.getpid(), os.getuid(), os.getgid()) + bytes(4))
received()
# sendmmsg: the guard writes the count back into the caller's msg_len (struct mmsghdr:
# a msghdr of 7 words, then msg_len), through its memory opened before it checks that the
# caller still waits (a killed caller's pid may be another's by then)
mm = (ctypes.c_uint64 * 8)(ctypes.addressof(addr), len(path) + 2, ctypes.addressof(iov), 1,
                           0, 0, 0, 12345)
n = libc.sendmmsg(d.fileno(), mm, 1, 0)
print("sendmmsg", "counted" if n == 1 and mm[7] & 0xFFFFFFFF == 1 else f"{n}:{mm[7]}",
      flush=True)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 0))
v = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
v.sendmsg([b"tos"], [(socket.IPPROTO_IP, socket.IP_TOS, struct.pack("=i", 0x10))], 0,
          u.getsockname())
print("udp-tos", "ok" if u.recv(8) == b"tos" else "lost", flush=True)
srv = socket.socket(socket.AF_UNIX); srv.bind("/tmp/after.sock"); srv.listen(1)
socket.socket(socket.AF_UNIX).connect("/tmp/after.sock")
print("after ok", flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a root-started sandbox")
def test_control_messages_are_walked_as_the_kernel_does(tmp_path: Path) -> None:
    r = run_quiet(tmp_path, "--backend", "namespaces", "--profile", "moderate", "--", "python3",
                  "-c", CMSG, timeout=120)
    got = probe_verdicts(r.stdout)
    assert got == {"two-rights": "ok", "two-rights-files": "caller", "empty-last": "ok",
                   "empty-last-files": "caller", "trailing": "EINVAL", "short": "EINVAL",
                   "rds": "EINVAL", "unknown-level": "EINVAL", "unknown-type": "EINVAL",
                   "creds": "EPERM", "sendmmsg": "counted", "udp-tos": "ok",
                   "after": "ok"}, r
    assert r.returncode == 0, r


PROBE_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
static void put(unsigned char *at, uint64_t len, int fd)
{
	int hdr[2] = { SOL_SOCKET, SCM_RIGHTS };
	memcpy(at, &len, 8);
	memcpy(at + 8, hdr, 8);
	memcpy(at + 16, &fd, 4);
}
static int same(int a, int b)
{
	struct stat x, y;
	return fstat(a, &x) == 0 && fstat(b, &y) == 0 && x.st_ino == y.st_ino && x.st_dev == y.st_dev;
}
int main(void)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX, .sun_path = "/tmp/cmsg.sock" };
	int srv = socket(AF_UNIX, SOCK_DGRAM, 0), d = socket(AF_UNIX, SOCK_DGRAM, 0);
	if (bind(srv, (struct sockaddr *)&a, sizeof(a)) < 0)
		return 1;
	char four[] = "data";
	struct iovec iov = { four, 4 };
	struct mmsghdr mm = { .msg_hdr = { .msg_name = &a, .msg_namelen = sizeof(a),
						.msg_iov = &iov, .msg_iovlen = 1 }, .msg_len = 12345 };
	int n = sendmmsg(d, &mm, 1, 0);
	printf("sendmmsg %s\n", n == 1 && mm.msg_len == 4 ? "counted" : "uncounted");
	int p1[2], p2[2];
	if (pipe(p1) < 0 || pipe(p2) < 0)
		return 1;
	unsigned char ctl[44] = { 0 }; /* the review's layout: 20 (+4 pad), then 20 at the end */
	put(ctl, 20, p1[1]);
	put(ctl + 24, 20, p2[1]);
	struct msghdr m = { .msg_name = &a, .msg_namelen = sizeof(a), .msg_iov = &iov,
				.msg_iovlen = 1, .msg_control = ctl, .msg_controllen = sizeof(ctl) };
	printf("two-rights %s\n", sendmsg(d, &m, 0) < 0 ? strerror(errno) : "ok");
	char buf[8];
	recv(srv, buf, sizeof(buf), 0);
	union { struct cmsghdr h; unsigned char b[256]; } rc;
	struct msghdr rm = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = rc.b,
				.msg_controllen = sizeof(rc.b) };
	int fds[8], nfds = 0;
	if (recvmsg(srv, &rm, MSG_DONTWAIT) >= 0)
		for (struct cmsghdr *c = CMSG_FIRSTHDR(&rm); c; c = CMSG_NXTHDR(&rm, c))
			for (size_t i = 0; c->cmsg_type == SCM_RIGHTS &&
						i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int) && nfds < 8; i++)
				memcpy(&fds[nfds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
	printf("two-rights-files %s\n",
		nfds == 2 && same(fds[0], p1[1]) && same(fds[1], p2[1]) ? "caller" : "NOT-CALLER");
	return 0;
}
"""


def _verdicts(r: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert r.returncode == 0, r
    return probe_verdicts(r.stdout)


CONTAINER_EXPECTED = {"sendmmsg": "counted", "two-rights": "ok", "two-rights-files": "caller"}


@pytest.mark.skipif(os.geteuid() != 0, reason="a root-started container")
def test_a_podman_containers_control_messages_and_counts(
        tmp_path: Path, request: pytest.FixtureRequest,
        busybox_tar: tuple[Path, str]) -> None:
    image, project = container_project(request, "podman", busybox_tar, tmp_path)
    build_probe(project, PROBE_C)
    r = container_run("podman", image, "moderate", project, ["/workspace/probe"])
    assert _verdicts(r) == CONTAINER_EXPECTED, r


def test_a_rootless_podman_containers_control_messages_and_counts(
        podman_user: tuple[int, dict[str, str], Path]) -> None:
    uid, _, base = podman_user
    build_probe(base / "proj", PROBE_C, uid)
    r = rootless_run(podman_user, "moderate", ["/workspace/probe"])
    assert _verdicts(r) == CONTAINER_EXPECTED, r
