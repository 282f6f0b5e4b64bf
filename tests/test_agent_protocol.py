"""Pure-Python encoding and decoding of protocol v1 frames and TLVs."""

from __future__ import annotations

import os
import struct
import time

import pytest

from agentkernel.agent.client import AgentClient, ExitStatus, _parse_entries, _parse_exit
from agentkernel.agent.protocol import (
    FEATURE_QUERY,
    HEADER_SIZE,
    MAX_PAYLOAD,
    Frame,
    T,
    Tag,
    as_i32,
    as_uint,
    decode_frames,
    decode_header,
    decode_tlvs,
    encode_exec,
    encode_frame,
    encode_tlvs,
    path_bytes,
    tlv,
    tlv_dict,
    u8,
    u32,
    u64,
)
from agentkernel.errors import ProtocolError


def test_frame_layout_is_little_endian_12_byte_header() -> None:
    frame = encode_frame(T.PING, 0x01020304, b"hi")
    assert HEADER_SIZE == 12
    assert frame == b"\x02\0\0\0" + b"\x01\0" + b"\0\0" + b"\x04\x03\x02\x01" + b"hi"
    assert decode_header(frame[:12]) == (2, T.PING, 0, 0x01020304)


def test_decode_frames_handles_partial_input() -> None:
    stream = encode_frame(T.STDOUT, 1, b"abc") + encode_frame(T.EXIT, 1, b"") + b"\x05\0"
    frames, rest = decode_frames(stream)
    assert frames == [Frame(T.STDOUT, 1, b"abc"), Frame(T.EXIT, 1, b"")]
    assert rest == b"\x05\0"
    for cut in range(len(stream)):
        got, rest = decode_frames(stream[:cut])
        more, _ = decode_frames(rest + stream[cut:])
        assert got + more == frames


def test_oversize_frames_are_rejected_both_ways() -> None:
    with pytest.raises(ValueError):
        encode_frame(T.STDIN, 1, b"x" * (MAX_PAYLOAD + 1))
    assert len(encode_frame(T.STDIN, 1, b"x" * MAX_PAYLOAD)) == MAX_PAYLOAD + 12
    with pytest.raises(ProtocolError):
        decode_header(struct.pack("<IHHI", MAX_PAYLOAD + 1, T.PING, 0, 0))


def test_tlv_roundtrip_keeps_order_and_repeats() -> None:
    items = [(Tag.ARGV, b"ls"), (Tag.ARGV, b"-l"), (Tag.UID, u32(1000)), (Tag.CWD, b"")]
    payload = encode_tlvs(items)
    assert payload[:8] == b"\x01\0\x02\0\0\0ls"
    assert decode_tlvs(payload) == [(int(t), v) for t, v in items]


@pytest.mark.parametrize("payload", [b"\x01", b"\x01\0\x05\0\0\0abc", b"\x01\0\0\0\0\0\x02"])
def test_truncated_tlvs_raise(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_tlvs(payload)


def test_integer_helpers() -> None:
    assert (
        u8(255) == b"\xff" and u32(1) == b"\1\0\0\0" and u64(2**40) == (2**40).to_bytes(8, "little")
    )
    assert as_uint(u64(2**63)) == 2**63
    assert as_i32(struct.pack("<i", -5)) == -5
    with pytest.raises(ProtocolError):
        as_uint(b"\0\0\0")


def test_encode_exec_carries_every_option() -> None:
    payload = encode_exec(
        ["sh", "-c", "x"],
        env=[("A", "1")],
        cwd="/w",
        uid=1,
        gid=2,
        timeout_ms=1500,
        stdin=True,
        pty=(24, 80),
        rlimits=[(7, 10, 20)],
        umask=0o22,
    )
    tags = decode_tlvs(payload)
    assert [v for t, v in tags if t == Tag.ARGV] == [b"sh", b"-c", b"x"]
    d = dict(tags)
    assert d[Tag.ENV] == b"A=1" and d[Tag.CWD] == b"/w"
    assert as_uint(d[Tag.UID]) == 1 and as_uint(d[Tag.GID]) == 2
    assert as_uint(d[Tag.TIMEOUT_MS]) == 1500 and d[Tag.STDIN] == b"\1"
    assert struct.unpack("<HH", d[Tag.PTY]) == (24, 80)
    assert struct.unpack("<IQQ", d[Tag.RLIMIT]) == (7, 10, 20)
    assert as_uint(d[Tag.UMASK]) == 0o22


def test_encode_exec_minimal_has_only_argv() -> None:
    assert decode_tlvs(encode_exec(["true"])) == [(Tag.ARGV, b"true")]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"argv": []},
        {"argv": ["a\0b"]},
        {"argv": ["x"] * 4097},
        {"argv": ["x"], "env": [("A=B", "1")]},
        {"argv": ["x"], "env": [("", "1")]},
        {"argv": ["x"], "env": [("A", "\0")]},
        {"argv": ["x"], "cwd": "/" + "a" * 5000},
        {"argv": ["x" * MAX_PAYLOAD]},
    ],
)
def test_encode_exec_rejects_what_the_agent_would(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        encode_exec(**kwargs)  # type: ignore[arg-type]


def test_paths_must_be_absolute_bounded_nul_free() -> None:
    assert path_bytes("/tmp/ü") == "/tmp/ü".encode()
    for bad in ("tmp", "", "/a\0b", "/" + "a" * 4096):
        with pytest.raises(ValueError):
            path_bytes(bad)


def test_exit_status_decoding_and_shell_code() -> None:
    st = _parse_exit(encode_tlvs([(Tag.CODE, struct.pack("<i", 3)), (Tag.TIMED_OUT, u8(0))]))
    assert st == ExitStatus(code=3, signal=None) and st.shell_code == 3
    st = _parse_exit(encode_tlvs([(Tag.SIGNAL, u32(9)), (Tag.TIMED_OUT, u8(1)), (Tag.CORE, u8(1))]))
    assert st == ExitStatus(code=None, signal=9, timed_out=True, core=True)
    assert st.shell_code == 137
    with pytest.raises(ProtocolError):
        _parse_exit(b"")


def test_list_result_groups_start_at_each_name() -> None:
    payload = encode_tlvs(
        [
            (Tag.NAME, b"a"),
            (Tag.TYPE, u8(1)),
            (Tag.ST_SIZE, u64(5)),
            (Tag.ST_MODE, u32(0o644)),
            (Tag.NAME, b"b"),
            (Tag.TYPE, u8(2)),
            (Tag.ST_SIZE, u64(0)),
            (Tag.ST_MODE, u32(0o755)),
        ]
    )
    entries = _parse_entries(payload)
    assert [(e.name, e.type, e.size, e.mode) for e in entries] == [
        ("a", "file", 5, 0o644),
        ("b", "dir", 0, 0o755),
    ]


def test_tlv_dict_keeps_last_value() -> None:
    assert tlv_dict(tlv(1, b"a") + tlv(1, b"b")) == {1: b"b"}


def _client_on_pipe(data: bytes, *, close: bool) -> tuple[AgentClient, int]:
    r, w = os.pipe()
    os.write(w, data)
    if close:
        os.close(w)
    sink = os.open(os.devnull, os.O_WRONLY)
    return AgentClient.from_fds(r, sink), w


def test_client_rejects_garbage_hello() -> None:
    client, _ = _client_on_pipe(b"\xff" * 12, close=True)
    start = time.monotonic()
    with pytest.raises(ProtocolError, match="garbage"):
        client.hello(timeout=5)
    assert time.monotonic() - start < 1
    assert not client.alive
    client.close()


def test_client_hello_on_eof_and_timeout() -> None:
    client, _ = _client_on_pipe(b"", close=True)
    with pytest.raises(ProtocolError):
        client.hello(timeout=5)
    with pytest.raises(ProtocolError):
        client.ping()
    client.close()
    client, w = _client_on_pipe(b"", close=False)
    with pytest.raises(ProtocolError, match="HELLO"):
        client.hello(timeout=0.1)
    os.close(w)
    client.close()


def test_client_accepts_well_formed_hello() -> None:
    hello = encode_tlvs(
        [
            (Tag.VERSION, u32(1)),
            (Tag.PID, u32(42)),
            (Tag.AGENT_NAME, b"peer"),
            (Tag.AGENT_UID, u32(7)),
        ]
    )
    client, _ = _client_on_pipe(encode_frame(T.HELLO, 0, hello), close=True)
    info = client.hello()
    assert (info.version, info.pid, info.name, info.uid) == (1, 42, "peer", 7)
    assert info.features == 0 and not client.answers_query  # an agent before 1.3
    client.close()


def test_hello_features_announce_query() -> None:
    hello = encode_tlvs([(Tag.VERSION, u32(1)), (Tag.PID, u32(42)), (Tag.AGENT_UID, u32(7)),
                         (Tag.FEATURES, u32(FEATURE_QUERY))])
    client, _ = _client_on_pipe(encode_frame(T.HELLO, 0, hello), close=True)
    assert client.hello().features == FEATURE_QUERY and client.answers_query
    client.close()
