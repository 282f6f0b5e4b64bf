"""Images against a real docker-registry: pull, store, whiteouts, auth, mirrors, hostile layers."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import (
    PASSWORD,
    USER,
    LayerBuilder,
    Proxy,
    Pusher,
    Registry,
    TlsRegistry,
    busybox_layer,
    compress,
    insecure,
)

from agentkernel.errors import NotFound, UsageError
from agentkernel.images import ImageError, Limits, get, list_images, prune, pull, remove
from agentkernel.images.reference import normalize, parse_reference
from agentkernel.images.registry import Platform, RegistryOptions
from agentkernel.images.store import Store
from agentkernel.images.unpack import LayerError, unpack_layer

ROOT = os.geteuid() == 0


@pytest.mark.parametrize(("ref", "want"), [
    ("python:3.12-alpine", "docker.io/library/python:3.12-alpine"),
    ("alpine", "docker.io/library/alpine:latest"),
    ("org/img:1", "docker.io/org/img:1"),
    ("index.docker.io/library/x:1", "docker.io/library/x:1"),
    ("ghcr.io/org/img@sha256:" + "a" * 64, "ghcr.io/org/img@sha256:" + "a" * 64),
    ("localhost:5000/a/b:c", "localhost:5000/a/b:c"),
    ("127.0.0.1:5000/x", "127.0.0.1:5000/x:latest"),
    ("r.example/x:t@sha256:" + "b" * 64, "r.example/x:t@sha256:" + "b" * 64),
])
def test_reference_normalisation(ref: str, want: str) -> None:
    assert normalize(ref) == want


def test_reference_default_registry_and_errors() -> None:
    assert str(parse_reference("x:1", "mirror.local:5000")) == "mirror.local:5000/x:1"
    with pytest.raises(UsageError):
        parse_reference("org/UPPER")
    with pytest.raises(UsageError):
        parse_reference("x@sha256:short")


def test_platform_parse() -> None:
    assert str(Platform.parse("linux/arm64")) == "linux/arm64/v8"
    assert str(Platform.parse("linux/arm/v7")) == "linux/arm/v7"
    assert Platform.parse("amd64") == Platform("linux", "amd64")


def _tree(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            elif stat.S_ISCHR(p.lstat().st_mode):
                out[rel] = "whiteout"
            elif stat.S_ISFIFO(p.lstat().st_mode):
                out[rel] = "fifo"
            else:
                out[rel] = p.read_bytes().decode(errors="replace")[:40]
    return out


def test_pull_busybox_and_run_it(plain_registry: Registry, busybox: str, store: Store) -> None:
    ref = f"{plain_registry.host}/{busybox}"
    image = pull(ref, config=insecure(plain_registry.host), store=store, progress=False)
    assert image.ref == ref
    assert len(image.layers) == 2 and all(p.is_dir() for p in image.layers)
    bb = image.layers[0] / "bin/busybox"
    assert os.access(bb, os.X_OK) and os.readlink(image.layers[0] / "bin/sh") == "busybox"
    assert stat.S_IMODE((image.layers[0] / "tmp").stat().st_mode) == 0o1777
    out = subprocess.run([str(bb), "echo", "hi"], capture_output=True, check=True).stdout
    assert out == b"hi\n"
    assert image.config.env_dict()["GREETING"] == "hi"
    assert image.config.working_dir == "/tmp" and image.config.cmd == ["/bin/sh"]
    assert image.config.user == "0" and image.platform == "linux/amd64"
    assert get(ref, store=store) is not None
    assert [i.ref for i in list_images(store=store)] == [ref]
    # Nothing half-done is left behind.
    assert list((store.root / "tmp").iterdir()) == []


def test_second_pull_transfers_no_blob(plain_registry: Registry, busybox: str,
                                       proxy: Proxy, store: Store) -> None:
    ref = f"{proxy.host}/{busybox}"
    opts = insecure(proxy.host)
    pull(ref, config=opts, store=store, progress=False)
    assert proxy.blob_gets() == 3  # config + 2 layers
    proxy.reset()
    before = plain_registry.blob_gets()
    pull(ref, config=opts, store=store, progress=False)
    assert proxy.blob_gets() == 0
    assert plain_registry.blob_gets() == before  # the registry's own access log agrees
    assert any("/manifests/" in p for _, p, _ in proxy.requests)  # the tag was re-resolved


def _non_loopback_address() -> str | None:
    """An address of this host that is not loopback (a registry there is "remote")."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"],
                         capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        fields = line.split()
        if "inet" in fields:
            return fields[fields.index("inet") + 1].split("/")[0]
    return None


def test_loopback_registry_is_plain_http_by_default(plain_registry: Registry, busybox: str,
                                                   store: Store) -> None:
    """As Docker: no insecure setting needed for 127.0.0.0/8, ::1 or localhost."""
    ref = f"{plain_registry.host}/{busybox}"
    opts = RegistryOptions(docker_config=Path("/x"), retries=0)
    assert pull(ref, config=opts, store=store, progress=False).layers
    port = plain_registry.host.rsplit(":", 1)[1]
    image = pull(f"localhost:{port}/{busybox}", config=opts, store=Store(store.root / "l"),
                 progress=False)
    assert image.ref == f"localhost:{port}/{busybox}"
    # An explicit http:// mirror on loopback is fine too.
    pull(f"docker.io/{busybox}", config=RegistryOptions(
        mirrors=[f"*=http://{plain_registry.host}"], docker_config=Path("/x"), retries=0),
        store=Store(store.root / "m"), progress=False)


def test_remote_plain_registry_needs_insecure(plain_registry: Registry, busybox: str,
                                              store: Store) -> None:
    """The same registry behind an address that is not loopback: HTTPS, or named insecure."""
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address")
    remote = Proxy(plain_registry.host, bind=address)
    try:
        ref = f"{remote.host}/{busybox}"
        with pytest.raises(ImageError) as exc:
            pull(ref, config=RegistryOptions(docker_config=Path("/x"), retries=0), store=store,
                 progress=False)
        msg = exc.value.message
        assert "\n" not in msg and ref in msg and remote.host in msg and "SSL" in msg
        assert exc.value.exit_code == 125
        assert remote.requests == []  # not one plain HTTP request went out
        with pytest.raises(ImageError, match="only used for loopback registries and those "
                                             "named insecure"):
            pull(f"docker.io/{busybox}", config=RegistryOptions(
                mirrors=[f"*=http://{remote.host}"], docker_config=Path("/x"), retries=0),
                store=store, progress=False)
        assert pull(ref, config=insecure(remote.host), store=store, progress=False).layers
        assert remote.requests
    finally:
        remote.stop()


def test_missing_image_is_not_found(plain_registry: Registry, store: Store) -> None:
    ref = f"{plain_registry.host}/test/nothing:1"
    with pytest.raises(NotFound) as exc:
        pull(ref, config=insecure(plain_registry.host), store=store, progress=False)
    assert "\n" not in exc.value.message and ref in exc.value.message
    assert plain_registry.host in exc.value.message and "not found" in exc.value.message


def _whiteout_image(pusher: Pusher) -> None:
    l1 = (LayerBuilder().dir("etc").file("etc/a", b"A").file("etc/b", b"B")
          .dir("opq").file("opq/old1", b"1").file("opq/old2", b"2")
          .dir("keep").file("keep/x", b"x").bytes())
    l2 = (LayerBuilder().dir("etc").file("etc/.wh.a").dir("opq").file("opq/.wh..wh..opq")
          .file("opq/new", b"new").dir("data").file("data/f", b"shared", mode=0o640)
          .hardlink("data/g", "data/f").symlink("link", "/etc/b").symlink("rel", "etc/b")
          .file("suid", b"s", mode=0o4755, uid=1234, gid=4321).fifo("pipe")
          .device("dev-null").bytes())
    l3 = LayerBuilder().dir("keep").file("keep/.wh.x").file("top", b"top").bytes()
    pusher.image("test/wh", "1", [l1, l2, l3], compression=["gzip", "zstd", "none"])


def test_whiteouts_opaque_hardlinks_symlinks_zstd(plain_registry: Registry, pusher: Pusher,
                                                  store: Store, tmp_path: Path) -> None:
    _whiteout_image(pusher)
    image = pull(f"{plain_registry.host}/test/wh:1", config=insecure(plain_registry.host),
                 store=store, progress=False)
    infos = image.layer_info()
    assert infos[1].whiteouts == ["etc/a"] and infos[1].opaque_dirs == ["opq"]
    assert infos[2].whiteouts == ["keep/x"] and infos[1].skipped_devices == 1
    l2 = image.layers[1]
    assert os.stat(l2 / "data/f").st_ino == os.stat(l2 / "data/g").st_ino
    assert os.readlink(l2 / "link") == "/etc/b"
    assert stat.S_ISFIFO((l2 / "pipe").lstat().st_mode)
    assert not (l2 / "dev-null").exists()
    assert stat.S_IMODE((l2 / "data/f").stat().st_mode) == 0o640
    if ROOT:
        assert stat.S_IMODE((l2 / "suid").stat().st_mode) == 0o4755
        assert (l2 / "suid").stat().st_uid == 1234 and (l2 / "suid").stat().st_gid == 4321
        # Overlay markers: a 0/0 char device and the opaque xattr.
        assert image.overlay_ready
        st = (l2 / "etc/a").lstat()
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
        assert os.getxattr(l2 / "opq", "trusted.overlay.opaque") == b"y"
    # The flat copy shows what overlayfs would.
    flat = tmp_path / "flat"
    image.compose(flat)
    want = {"etc": "dir", "etc/b": "B", "opq": "dir", "opq/new": "new", "keep": "dir",
            "data": "dir", "data/f": "shared", "data/g": "shared", "link": "-> /etc/b",
            "rel": "-> etc/b", "suid": "s", "pipe": "fifo", "top": "top"}
    assert _tree(flat) == want
    assert os.stat(flat / "data/f").st_ino == os.stat(flat / "data/g").st_ino
    if ROOT:
        merged = tmp_path / "merged"
        merged.mkdir()
        lower = ":".join(str(p) for p in reversed(image.layers))  # overlay wants top first
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower}",
                        str(merged)], check=True)
        try:
            assert _tree(merged) == want
        finally:
            subprocess.run(["umount", str(merged)], check=True)


def test_index_selects_platform(plain_registry: Registry, pusher: Pusher, store: Store) -> None:
    amd = pusher.image("test/multi", "amd64", [LayerBuilder().file("arch", b"amd64").bytes()])
    arm = pusher.image("test/multi", "arm64", [LayerBuilder().file("arch", b"arm64").bytes()],
                       arch="arm64", variant="v8")
    pusher.index("test/multi", "1", [arm, amd])
    ref = f"{plain_registry.host}/test/multi:1"
    opts = insecure(plain_registry.host, platform=Platform("linux", "amd64"))
    image = pull(ref, config=opts, store=store, progress=False)
    assert (image.layers[0] / "arch").read_bytes() == b"amd64"
    assert image.manifest_digest == amd["digest"] and image.digest != amd["digest"]
    image = pull(ref, config=opts, platform="linux/arm64", store=store, progress=False)
    assert (image.layers[0] / "arch").read_bytes() == b"arm64"
    with pytest.raises(NotFound, match=r"no manifest for platform linux/s390x.*linux/arm64/v8"):
        pull(ref, config=opts, platform="linux/s390x", store=store, progress=False)
    # By digest: the index digest finds the cached image.
    assert get(f"{plain_registry.host}/test/multi@{image.digest}", store=store) is not None


def test_tls_and_basic_auth(tls_registry: TlsRegistry, store: Store, tmp_path: Path) -> None:
    reg = tls_registry.registry
    Pusher(reg.url, auth=(USER, PASSWORD), ca=tls_registry.ca).image(
        "test/private", "1", [busybox_layer()])
    ref = f"{reg.host}/test/private:1"
    dcfg = tmp_path / "docker.json"
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    dcfg.write_text(json.dumps({"auths": {f"https://{reg.host}": {"auth": token}}}))
    image = pull(ref, config=RegistryOptions(ca_file=str(tls_registry.ca), docker_config=dcfg),
                 store=store, progress=False)
    assert (image.layers[0] / "bin/busybox").is_file()
    # Credentials from our own options work too.
    pull(ref, config=RegistryOptions(ca_file=str(tls_registry.ca), docker_config=Path("/x"),
                                     credentials={reg.host: (USER, PASSWORD)}),
         store=Store(tmp_path / "s2"), progress=False)
    with pytest.raises(ImageError, match="authentication required"):
        pull(ref, config=RegistryOptions(ca_file=str(tls_registry.ca), docker_config=Path("/x")),
             store=store, progress=False)
    with pytest.raises(ImageError, match=r"TLS|certificate"):
        pull(ref, config=RegistryOptions(docker_config=dcfg, retries=0), store=store,
             progress=False)


def test_bearer_token_flow(busybox: str, plain_registry: Registry, store: Store) -> None:
    p = Proxy(plain_registry.host, bearer=True)
    try:
        image = pull(f"{p.host}/{busybox}", config=insecure(p.host), store=store,
                     progress=False)
        assert image.layers
        tokens = [r for r in p.requests if r[1].startswith("/token")]
        assert len(tokens) == 1 and "scope=repository%3Atest%2Fbusybox%3Apull" in tokens[0][1]
    finally:
        p.stop()


def test_mirror_for_docker_hub(plain_registry: Registry, pusher: Pusher, proxy: Proxy,
                               store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    pusher.image("library/hubimg", "1", [LayerBuilder().file("hello", b"mirror").bytes()])
    opts = insecure(proxy.host, mirrors=[proxy.host])
    image = pull("hubimg:1", config=opts, store=store, progress=False)
    assert image.ref == "docker.io/library/hubimg:1"
    assert (image.layers[0] / "hello").read_bytes() == b"mirror"
    # The environment variable works the same way (config from agentkernel.toml is None here).
    monkeypatch.setenv("AGENTKERNEL_REGISTRY_MIRROR", f"docker.io={plain_registry.host}")
    from_env = RegistryOptions.from_config(None)
    assert from_env.mirrors == [f"docker.io={plain_registry.host}"]
    from_env.insecure = frozenset({plain_registry.host})
    assert pull("hubimg:1", config=from_env, store=Store(store.root.parent / "s2"),
                progress=False).digest == image.digest


def test_resume_after_broken_connection(plain_registry: Registry, pusher: Pusher, proxy: Proxy,
                                        store: Store) -> None:
    big = os.urandom(3 << 20)
    desc = pusher.image("test/big", "1", [LayerBuilder().file("blob", big).bytes()])
    manifest = json.loads(pusher.http.request(
        "GET", f"{pusher.base}/v2/test/big/manifests/{desc['digest']}",
        headers={"Accept": desc["mediaType"]}).data)
    layer = manifest["layers"][0]["digest"]
    proxy.cut_once.add(layer)
    image = pull(f"{proxy.host}/test/big:1", config=insecure(proxy.host), store=store,
                 progress=False)
    assert (image.layers[0] / "blob").read_bytes() == big
    ranges = [r for m, p, r in proxy.requests if layer in p and r]
    assert ranges and ranges[0].startswith("bytes=") and ranges[0] != "bytes=0-"


def _layer_digest(pusher: Pusher, repo: str, desc: dict[str, object]) -> str:
    manifest = json.loads(pusher.http.request(
        "GET", f"{pusher.base}/v2/{repo}/manifests/{desc['digest']}",
        headers={"Accept": str(desc["mediaType"])}).data)
    return str(manifest["layers"][0]["digest"])


def _assert_nothing_visible(store: Store) -> None:
    assert list((store.root / "layers").iterdir()) == []
    assert list((store.root / "refs").iterdir()) == []
    assert list((store.root / "tmp").iterdir()) == []


def test_digest_mismatch_rejected(pusher: Pusher, proxy: Proxy, store: Store) -> None:
    desc = pusher.image("test/corrupt", "1", [LayerBuilder().file("f", b"x" * 5000).bytes()])
    layer = _layer_digest(pusher, "test/corrupt", desc)
    proxy.corrupt.add(layer)
    with pytest.raises(ImageError, match="failed verification") as exc:
        pull(f"{proxy.host}/test/corrupt:1", config=insecure(proxy.host), store=store,
             progress=False)
    assert "\n" not in exc.value.message and proxy.host in exc.value.message
    assert not store.has_blob(layer)
    _assert_nothing_visible(store)


def test_interrupted_pull_leaves_nothing(pusher: Pusher, proxy: Proxy, store: Store) -> None:
    desc = pusher.image("test/cut", "1", [LayerBuilder().file("f", os.urandom(100_000)).bytes()])
    proxy.cut_always.add(_layer_digest(pusher, "test/cut", desc))
    with pytest.raises(ImageError, match="failed after 3 attempts"):
        pull(f"{proxy.host}/test/cut:1", config=insecure(proxy.host), store=store,
             progress=False)
    _assert_nothing_visible(store)


HOSTILE: dict[str, tuple[Callable[[Path], bytes], str]] = {
    "dotdot": (lambda o: LayerBuilder().file("../../../escaped-dotdot", b"x").bytes(),
               "escapes the layer"),
    "absolute": (lambda o: LayerBuilder().file("/escaped-abs", b"x").bytes(), "absolute path"),
    "symlink-then-file": (
        lambda o: LayerBuilder().symlink("evil", str(o)).file("evil/pwned", b"x").bytes(),
        "written through the symlink"),
    "relative-symlink-then-file": (
        lambda o: LayerBuilder().symlink("up", "../../../../../../..")
        .file("up/escaped-rel", b"x").bytes(),
        "written through the symlink"),
    "hardlink-out": (lambda o: LayerBuilder().hardlink("h", "../../../../etc/passwd").bytes(),
                     "escapes the layer"),
    "hardlink-missing": (lambda o: LayerBuilder().hardlink("h", "etc/shadow").bytes(),
                         "not in this layer"),
    "huge-declared": (lambda o: LayerBuilder().huge("big", 1 << 50).bytes(), "declares"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layers_rejected(case: str, plain_registry: Registry, pusher: Pusher,
                                 store: Store, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    build, why = HOSTILE[case]
    repo = f"test/hostile-{case}"
    pusher.image(repo, "1", [build(outside)])
    with pytest.raises(ImageError, match=why) as exc:
        pull(f"{plain_registry.host}/{repo}:1", config=insecure(plain_registry.host),
             store=store, progress=False)
    assert "\n" not in exc.value.message and "bad layer" in exc.value.message
    assert list(outside.iterdir()) == []
    for name in ("escaped-dotdot", "escaped-abs", "escaped-rel"):
        assert not (Path("/") / name).exists()
        assert not (store.root / name).exists() and not (tmp_path / name).exists()
    _assert_nothing_visible(store)


def test_layer_size_limits(tmp_path: Path) -> None:
    blob = tmp_path / "bomb.gz"
    blob.write_bytes(compress(LayerBuilder().file("zeros", bytes(4 << 20)).bytes(), "gzip"))
    with pytest.raises(LayerError, match="more than"):
        unpack_layer(blob, tmp_path / "out1", limits=Limits(max_layer_bytes=1 << 20))
    with pytest.raises(LayerError, match="declares"):
        unpack_layer(blob, tmp_path / "out2", limits=Limits(max_entry_bytes=1 << 20))
    info = unpack_layer(blob, tmp_path / "out3")
    assert info.size > 4 << 20


def test_declared_blob_size_limit(plain_registry: Registry, busybox: str, store: Store) -> None:
    with pytest.raises(ImageError, match="declares"):
        pull(f"{plain_registry.host}/{busybox}",
             config=insecure(plain_registry.host, max_blob_bytes=1000), store=store,
             progress=False)
    _assert_nothing_visible(store)


def test_xattrs(tmp_path: Path) -> None:
    b = LayerBuilder()
    info_f = b._info("f", b"0", 0o644, size=1)
    info_f.pax_headers = {"SCHILY.xattr.user.note": "kept",
                          "SCHILY.xattr.trusted.overlay.opaque": "y"}
    import io
    b.tar.addfile(info_f, io.BytesIO(b"1"))
    blob = tmp_path / "x.tar"
    blob.write_bytes(b.bytes())
    unpack_layer(blob, tmp_path / "out")
    f = tmp_path / "out/f"
    try:
        assert os.getxattr(f, "user.note") == b"kept"
    except OSError:
        pytest.skip("filesystem without user xattrs")
    assert "trusted.overlay.opaque" not in os.listxattr(f)


def test_concurrent_pulls_of_same_image(plain_registry: Registry, busybox: str,
                                        store: Store) -> None:
    ref = f"{plain_registry.host}/{busybox}"
    results: list[object] = []

    def go() -> None:
        try:
            results.append(pull(ref, config=insecure(plain_registry.host), store=store,
                                progress=False).digest)
        except Exception as exc:  # collected and asserted below
            results.append(exc)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(map(str, results))) == 1 and str(results[0]).startswith("sha256:")
    assert len(list((store.root / "layers").iterdir())) == 2
    assert list((store.root / "tmp").iterdir()) == []


def test_concurrent_pulls_in_processes(plain_registry: Registry, busybox: str,
                                       store: Store) -> None:
    code = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[3]);"
        "from harness import insecure; from agentkernel.images import pull;"
        "from agentkernel.images.store import Store;"
        "pull(sys.argv[1], config=insecure(sys.argv[2]), store=Store(Path(sys.argv[4])),"
        " progress=False)"
    )
    here = str(Path(__file__).parent)
    procs = [subprocess.Popen([sys.executable, "-c", code,
                               f"{plain_registry.host}/{busybox}", plain_registry.host, here,
                               str(store.root)]) for _ in range(3)]
    assert [p.wait(60) for p in procs] == [0, 0, 0]
    assert len(list((store.root / "layers").iterdir())) == 2


def test_remove_and_prune(plain_registry: Registry, pusher: Pusher, store: Store) -> None:
    base = LayerBuilder().file("base", b"b" * 10000).bytes()
    pusher.image("test/p1", "1", [base, LayerBuilder().file("one", b"1" * 50000).bytes()])
    pusher.image("test/p2", "1", [base, LayerBuilder().file("two", b"2").bytes()])
    opts = insecure(plain_registry.host)
    p1 = pull(f"{plain_registry.host}/test/p1:1", config=opts, store=store, progress=False)
    p2 = pull(f"{plain_registry.host}/test/p2:1", config=opts, store=store, progress=False)
    assert p1.layers[0] == p2.layers[0]  # shared base layer, unpacked once
    assert prune(store=store) == 0
    remove(f"{plain_registry.host}/test/p1:1", store=store)
    assert get(f"{plain_registry.host}/test/p1:1", store=store) is None
    freed = prune(store=store)
    assert freed >= 50000
    assert not p1.layers[1].exists() and p2.layers[0].exists() and p2.layers[1].exists()
    assert get(f"{plain_registry.host}/test/p2:1", store=store) is not None
    with pytest.raises(NotFound):
        remove(f"{plain_registry.host}/test/p1:1", store=store)


def test_cli_functions(tls_registry: TlsRegistry, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from agentkernel.cli import build_parser
    from agentkernel.images import cli

    reg = tls_registry.registry
    Pusher(reg.url, auth=(USER, PASSWORD), ca=tls_registry.ca).image(
        "test/cli", "1", [busybox_layer()])
    (tmp_path / "docker").mkdir()
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (tmp_path / "docker/config.json").write_text(json.dumps({"auths": {reg.host: {"auth": token}}}))
    monkeypatch.setenv("AGENTKERNEL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.setenv("AGENTKERNEL_REGISTRY_CA", str(tls_registry.ca))
    parser = build_parser()
    ref = f"{reg.host}/test/cli:1"

    def run(*argv: str) -> str:
        assert cli.main(parser.parse_args(["images", *argv])) == 0
        return capsys.readouterr().out

    assert run("pull", ref).startswith(ref + "@sha256:")
    assert ref in run("list")
    doc = json.loads(run("inspect", ref))
    assert doc["config"]["Cmd"] == ["/bin/sh"] and len(doc["layers"]) == 1
    assert "removed" in run("remove", ref)
    assert "freed" in run("prune")
    assert run("list", "--json").strip() == "[]"


def test_unpack_without_overlay_markers_then_compose(tmp_path: Path) -> None:
    """The rootless path: no 0/0 devices in the layer, deletions applied by compose()."""
    from agentkernel.images.unpack import SIDE_LIST, compose

    l1 = LayerBuilder().dir("d").file("d/gone", b"1").file("d/stay", b"2").bytes()
    l2 = LayerBuilder().dir("d").file("d/.wh.gone").dir("o").file("o/.wh..wh..opq").bytes()
    roots = []
    for i, tar in enumerate([l1, l2]):
        blob = tmp_path / f"l{i}.tar"
        blob.write_bytes(tar)
        layer = tmp_path / f"layer{i}"
        layer.mkdir()
        info = unpack_layer(blob, layer / "root", overlay_markers=False)
        (layer / SIDE_LIST).write_text(json.dumps(info.to_json()))
        roots.append(layer / "root")
    assert not (roots[1] / "d/gone").exists() and not info.overlay_ready
    compose(roots, tmp_path / "flat")
    assert _tree(tmp_path / "flat") == {"d": "dir", "d/stay": "2", "o": "dir"}
