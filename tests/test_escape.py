"""Escape attempts from inside real sandboxes: every one of them must fail, on every backend."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_helpers import CONNECT_PROBE, NetnsHost, ak

STRICT = ["moderate", "restrictive"]
ALL = ["permissive", "moderate", "restrictive"]


def inside(
    backend: str,
    profile: str,
    cwd: Path,
    *cmd: str,
    env: dict[str, str] | None = None,
    extra: tuple[str, ...] = (),
) -> tuple[int, str, str]:
    # The host rootfs: the case with real secrets around it (image rootfs: test_images_run).
    r = ak("run", "-B", backend, "-p", profile, "-i", "host", *extra, "--", *cmd, cwd=cwd, env=env)
    return r.returncode, r.stdout, r.stderr


def py(code: str) -> tuple[str, ...]:
    return ("python3", "-c", code)


@pytest.fixture
def fake_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("HOME-SECRET-KEY\n")
    return home


@pytest.fixture
def root_secret() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("planting a secret in /root needs root")
    path = Path("/root") / f"ak-secret-{secrets.token_hex(4)}"
    path.write_text("ROOT-SECRET\n")
    path.chmod(0o600)
    yield str(path)
    path.unlink()


# --- files -----------------------------------------------------------------------------


@pytest.mark.parametrize("profile", STRICT)
def test_cannot_read_secret_in_home(
    backend: str, profile: str, project: Path, fake_home: Path
) -> None:
    _code, out, _ = inside(
        backend,
        profile,
        project,
        "sh",
        "-c",
        f"cat {fake_home}/.ssh/id_ed25519 /home/user/.ssh/id_ed25519; ls -a /home/user 2>&1; true",
        env={"HOME": str(fake_home)},
    )
    assert "HOME-SECRET-KEY" not in out


def test_permissive_home_is_read_only(backend: str, project: Path, fake_home: Path) -> None:
    _code, out, _err = inside(
        backend,
        "permissive",
        project,
        "sh",
        "-c",
        "cat /home/user/.ssh/id_ed25519; echo x > /home/user/new && echo wrote",
        env={"HOME": str(fake_home)},
    )
    assert "HOME-SECRET-KEY" in out  # permissive shares $HOME read-only, by design
    assert "wrote" not in out
    assert not (fake_home / "new").exists()


@pytest.mark.parametrize("profile", ALL)
def test_cannot_read_root_secret(
    backend: str, profile: str, project: Path, root_secret: str
) -> None:
    _, out, _ = inside(
        backend, profile, project, "sh", "-c", f"cat {root_secret}; ls -a /root; true"
    )
    assert "ROOT-SECRET" not in out
    assert Path(root_secret).name not in out


@pytest.fixture
def etc_secrets() -> Iterator[tuple[str, str, str]]:
    """Root-only entries planted in the host's /etc, none of them on the fixed mask list:
    a file, a dir holding a file, and a file in a world-readable dir; (private file, dir,
    nested file), beside a world-readable file that must stay readable."""
    if os.geteuid() != 0:
        pytest.skip("planting a secret in /etc needs root")
    top = Path("/etc") / f"ak-test-{secrets.token_hex(4)}"
    top.mkdir(mode=0o755)
    try:
        (top / "public").write_text("PUBLIC-OK\n")
        (top / "public").chmod(0o644)
        private = top / "key"
        private.write_text("ETC-SECRET-FILE\n")
        private.chmod(0o600)
        hidden = top / "vault"
        hidden.mkdir(mode=0o700)
        (hidden / "inner").write_text("ETC-SECRET-DIR\n")
        (hidden / "inner").chmod(0o644)
        (top / "sub").mkdir(mode=0o755)
        nested = top / "sub" / "deep"
        nested.write_text("ETC-SECRET-NESTED\n")
        nested.chmod(0o640)
        (top / "link").symlink_to(private)  # a symlink to it: the walk never follows one
        yield str(private), str(hidden), str(nested)
    finally:
        import shutil

        shutil.rmtree(top)


@pytest.mark.parametrize("profile", ALL)
def test_cannot_read_private_etc_entries(
    backend: str, profile: str, project: Path, etc_secrets: tuple[str, str, str]
) -> None:
    """The host's not-world-readable entries under /etc are hidden wherever they sit (the
    agent finds them before the overlays go on and masks them in the sandbox's view)."""
    private, hidden, nested = etc_secrets
    top = str(Path(private).parent)
    script = (f"cat {private} {top}/link {nested} {hidden}/inner 2>/dev/null; "
              f"ls -a {hidden}; cat {top}/public; true")
    _, out, _ = inside(backend, profile, project, "sh", "-c", script)
    assert "ETC-SECRET" not in out
    assert "inner" not in out
    assert "PUBLIC-OK" in out  # only what is private is masked


@pytest.mark.parametrize("profile", ALL)
def test_cannot_read_etc_shadow(backend: str, profile: str, project: Path) -> None:
    if not Path("/etc/shadow").exists():
        pytest.skip("host has no /etc/shadow")
    _, out, _ = inside(
        backend,
        profile,
        project,
        "sh",
        "-c",
        "cat /etc/shadow /etc/gshadow 2>/dev/null | head -3; true",
    )
    assert "root:" not in out


@pytest.mark.parametrize("profile", ALL)
def test_host_env_secret_not_visible(backend: str, profile: str, project: Path) -> None:
    _, out, _ = inside(backend, profile, project, "env", env={"AK_TEST_SECRET": "ENV-SECRET"})
    assert "ENV-SECRET" not in out
    assert "AK_TEST_SECRET" not in out


def test_permissive_passes_only_listed_env(backend: str, project: Path) -> None:
    _, out, _ = inside(
        backend, "permissive", project, "env", env={"LANG": "C.UTF-8", "AK_TEST_SECRET": "x"}
    )
    assert "LANG=C.UTF-8" in out and "AK_TEST_SECRET" not in out


@pytest.mark.parametrize("profile", ALL)
def test_cannot_write_outside_workspace_and_tmp(backend: str, profile: str, project: Path) -> None:
    marker = f"ak-escape-{secrets.token_hex(4)}"
    script = (
        f"for d in /usr /etc /usr/bin /root /var; do echo x > $d/{marker} 2>/dev/null; done;"
        f" echo x > /tmp/{marker} && echo tmp-ok"
    )
    _code, out, _ = inside(backend, profile, project, "sh", "-c", script)
    assert "tmp-ok" in out
    for d in ("/usr", "/etc", "/usr/bin", "/root", "/var"):
        assert not Path(d, marker).exists(), f"sandbox wrote {d}/{marker} on the host"


def test_restrictive_root_is_read_only(backend: str, project: Path) -> None:
    _, out, _ = inside(
        backend,
        "restrictive",
        project,
        "sh",
        "-c",
        "touch /usr/x 2>/dev/null && echo usr-w;"
        " touch /x 2>/dev/null && echo root-w;"
        " touch /workspace/x 2>/dev/null && echo ws-w; echo done",
    )
    assert out.strip() == "done"


def test_moderate_cannot_change_host_project(backend: str, project: Path) -> None:
    code, out, err = inside(
        backend,
        "moderate",
        project,
        "sh",
        "-c",
        "echo changed > hello.txt && echo new > new.txt && rm -f hello.txt; ls; echo ok",
    )
    assert code == 0, err
    assert "new.txt" in out  # the sandbox sees its own changes
    assert (project / "hello.txt").read_text() == "hello from the host\n"
    assert not (project / "new.txt").exists()


def test_permissive_writes_project(backend: str, project: Path) -> None:
    code, _, err = inside(backend, "permissive", project, "sh", "-c", "echo new > new.txt")
    assert code == 0, err
    assert (project / "new.txt").read_text() == "new\n"


def test_cannot_escape_workspace_by_symlink(backend: str, project: Path) -> None:
    (project / "escape").symlink_to("/root")
    _, out, _ = inside(backend, "permissive", project, "sh", "-c", "ls -a escape/ 2>&1; true")
    assert ".bashrc" not in out and ".profile" not in out


# --- network ---------------------------------------------------------------------------


@pytest.mark.parametrize("profile", STRICT)
def test_cannot_reach_host_loopback(
    backend: str, profile: str, project: Path, loopback_server: int
) -> None:
    for host in ("127.0.0.1", "10.0.2.2"):
        _, out, err = inside(
            backend, profile, project, *py(CONNECT_PROBE), host, str(loopback_server)
        )
        assert "host-loopback-secret" not in out, (host, out, err)
        assert out.startswith("blocked"), (out, err)


def test_restrictive_cannot_reach_test_host(
    backend: str, project: Path, netns_host: NetnsHost
) -> None:
    _, out, err = inside(
        backend, "restrictive", project, *py(CONNECT_PROBE), netns_host.addr, str(netns_host.port)
    )
    assert out.startswith("blocked"), (out, err)


def test_no_network_flag_blocks_test_host(
    backend: str, project: Path, netns_host: NetnsHost
) -> None:
    _, out, _ = inside(
        backend,
        "moderate",
        project,
        *py(CONNECT_PROBE),
        netns_host.addr,
        str(netns_host.port),
        extra=("--no-network",),
    )
    assert out.startswith("blocked")


def test_moderate_has_egress(backend: str, project: Path, netns_host: NetnsHost) -> None:
    """The positive control: moderate's own netns does reach a host that is not loopback."""
    _, out, err = inside(
        backend, "moderate", project, *py(CONNECT_PROBE), netns_host.addr, str(netns_host.port)
    )
    assert out.strip() == "reached test-host-hello", err


# --- resources -------------------------------------------------------------------------

FORK_BOMB = (
    "import os,time\n"
    "n=0\n"
    "for i in range(2000):\n"
    "    try:\n"
    "        pid=os.fork()\n"
    "    except OSError:\n"
    "        break\n"
    "    if pid==0:\n"
    "        time.sleep(5); os._exit(0)\n"
    "    n+=1\n"
    "print('forked', n)\n"
)


def test_fork_bomb_is_contained(backend: str, project: Path) -> None:
    # Memory raised so that the pids limit, not the memory limit, is what stops it (under
    # gVisor 128 Python processes outgrow 256 MiB; that case is the memory bomb's).
    _code, out, err = inside(
        backend, "restrictive", project, *py(FORK_BOMB), extra=("--memory", "2g")
    )
    assert out.startswith("forked"), (out, err)
    assert int(out.split()[1]) < 128, "the pids limit of restrictive (128) did not hold"


def test_memory_bomb_is_killed_and_reported(backend: str, project: Path) -> None:
    code, out, err = inside(
        backend,
        "restrictive",
        project,
        *py("b=bytearray(1024*1024*1024); print('allocated', len(b))"),
    )
    assert "allocated" not in out
    assert code == 137, err
    assert "out of memory" in err


# --- the host's processes and kernel ------------------------------------------------------


@pytest.fixture
def host_process() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("profile", ALL)
def test_cannot_kill_or_ptrace_host_process(
    backend: str, profile: str, project: Path, host_process: subprocess.Popen[bytes]
) -> None:
    pid = host_process.pid
    code = (
        f"import os,ctypes\n"
        f"try:\n    os.kill({pid}, 9); print('killed')\n"
        f"except OSError as e: print('kill', e.errno)\n"
        f"libc=ctypes.CDLL(None, use_errno=True)\n"
        f"r=libc.ptrace(16, {pid}, 0, 0)\n"
        f"print('ptrace', r, ctypes.get_errno())\n"
        f"print('visible', os.path.exists('/proc/{pid}/cmdline') and "
        f"b'sleep' in open('/proc/{pid}/cmdline','rb').read())\n"
    )
    _, out, err = inside(backend, profile, project, *py(code))
    assert "killed" not in out
    assert "ptrace -1" in out, (out, err)
    assert "visible True" not in out
    assert host_process.poll() is None


@pytest.mark.parametrize("profile", ALL)
def test_cannot_mount(backend: str, profile: str, project: Path) -> None:
    code = (
        "import ctypes\nlibc=ctypes.CDLL(None, use_errno=True)\n"
        "r=libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)\n"
        "print('mount', r, ctypes.get_errno())\n"
        "r=libc.umount2(b'/proc', 2)\nprint('umount', r)\n"
    )
    _, out, err = inside(backend, profile, project, *py(code))
    assert "mount -1" in out and "umount -1" in out, (out, err)


@pytest.mark.parametrize("profile", ALL)
def test_cannot_load_kernel_module(backend: str, profile: str, project: Path) -> None:
    # finit_module(fd of /dev/null) and init_module: both must be refused.
    code = (
        "import ctypes,os\nlibc=ctypes.CDLL(None, use_errno=True)\n"
        "fd=os.open('/etc/hostname', os.O_RDONLY)\n"
        "r=libc.syscall(313, fd, b'', 0)\nprint('finit', r, ctypes.get_errno())\n"
        "r=libc.syscall(175, b'\\0'*64, 64, b'')\nprint('init', r)\n"
    )
    _, out, err = inside(backend, profile, project, *py(code))
    assert "finit -1" in out and "init -1" in out, (out, err)


@pytest.mark.parametrize("profile", ALL)
def test_cannot_open_kvm_or_disks(backend: str, profile: str, project: Path) -> None:
    code = (
        "import os,glob\n"
        "for p in ['/dev/kvm','/dev/vda','/dev/sda','/dev/nvme0n1','/dev/mem','/dev/kmsg']"
        " + glob.glob('/dev/vd*') + glob.glob('/dev/sd*'):\n"
        "    try:\n        os.close(os.open(p, os.O_RDONLY)); print('opened', p)\n"
        "    except OSError: pass\nprint('done')\n"
    )
    _, out, err = inside(backend, profile, project, *py(code))
    assert out.strip() == "done", (out, err)


@pytest.mark.parametrize("profile", ALL)
def test_cannot_create_namespaces(backend: str, profile: str, project: Path) -> None:
    code = (
        "import ctypes\nlibc=ctypes.CDLL(None, use_errno=True)\n"
        "print('unshare', libc.unshare(0x10000000))\n"
    )  # CLONE_NEWUSER
    _, out, err = inside(backend, profile, project, *py(code))
    assert "unshare -1" in out, (out, err)


@pytest.mark.parametrize("profile", ALL)
def test_no_capabilities(backend: str, profile: str, project: Path) -> None:
    _, out, _ = inside(
        backend, profile, project, "sh", "-c", "grep -E '^Cap(Eff|Prm|Bnd)' /proc/self/status"
    )
    for line in out.strip().splitlines():
        assert line.split()[1] == "0000000000000000", line
