"""Our docker/podman seccomp profile (container_seccomp) attacked from inside real containers.

The profile replaces the engine's default, so it must refuse what that default refuses
before the agent's own filters stack on it: new namespaces (unshare, clone with a
CLONE_NEW* flag, clone3 as absent), io_uring, odd personalities, AF_VSOCK sockets (a
network namespace does not confine them: a VM guest's container reached its host).
Permissive's own filter allows io_uring and every personality: there only the engine's
profile refuses them. Threads, forks, TCP sockets and Docker's personality values still
work.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sandbox_helpers import build_probe, container_project, container_run, probe_verdicts
from test_containers import podman_user, rootless_run

__all__ = ["podman_user"]  # (a fixture: pytest finds it here)

PROBE_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/personality.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
static void *th(void *a) { return a; }
static void say(const char *what, long r)
{
	printf("%s %s\n", what, r < 0 ? strerror(errno) : "ok");
}
int main(void) {
	pthread_t t;
	pid_t p;
	long r;
	say("personality-query", personality(0xffffffff));
	say("personality-linux32", personality(8));
	personality(0);
	say("personality-norandom", personality(ADDR_NO_RANDOMIZE));
	personality(0);
	say("unshare-user", unshare(CLONE_NEWUSER));
	r = syscall(SYS_clone, CLONE_NEWNET | SIGCHLD, 0, 0, 0, 0);
	if (r == 0) _exit(0);
	say("clone-net", r);
	say("clone3", syscall(435, 0, 0));
	say("io_uring", syscall(SYS_io_uring_setup, 1, 0));
	say("vsock", syscall(SYS_socket, 40 /* AF_VSOCK */, SOCK_STREAM, 0));
	say("vsock-high-bits", syscall(SYS_socket, (1L << 32) | 40, SOCK_STREAM, 0));
	say("inet", syscall(SYS_socket, AF_INET, SOCK_STREAM, 0));
	errno = pthread_create(&t, 0, th, 0);
	say("thread", errno ? -1 : pthread_join(t, 0));
	p = fork();
	if (p == 0) _exit(0);
	say("fork", p < 0 ? -1 : waitpid(p, 0, 0));
	return 0;
}
"""
EXPECTED = {"personality-query": "ok", "personality-linux32": "ok",
            "personality-norandom": "Operation", "unshare-user": "Operation",
            "clone-net": "Operation", "clone3": "Function", "io_uring": "Operation",
            "vsock": "Address", "vsock-high-bits": "Address", "inet": "ok",
            "thread": "ok", "fork": "ok"}


def _probe(project: Path, uid: int | None, run: Any) -> dict[str, str]:
    build_probe(project, PROBE_C, uid, ["-pthread"])
    r = run(["/workspace/probe"])
    got = probe_verdicts(r.stdout)
    assert set(got) == set(EXPECTED), r
    return got


@pytest.mark.skipif(os.geteuid() != 0, reason="a root-started container")
@pytest.mark.parametrize("engine", ["docker", "podman"])
def test_a_container_makes_no_namespace_nor_io_uring(
        engine: str, tmp_path: Path, request: pytest.FixtureRequest,
        busybox_tar: tuple[Path, str]) -> None:
    image, project = container_project(request, engine, busybox_tar, tmp_path)

    def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return container_run(engine, image, "permissive", project, argv)

    assert _probe(project, None, run) == EXPECTED


def test_rootless_podman_makes_no_namespace_nor_io_uring(
        podman_user: tuple[int, dict[str, str], Path]) -> None:
    uid, _, base = podman_user
    project = base / "proj"
    run = functools.partial(rootless_run, podman_user, "permissive")
    assert _probe(project, uid, run) == EXPECTED
