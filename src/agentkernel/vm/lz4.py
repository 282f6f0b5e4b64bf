"""A small pure-Python decoder for the LZ4 legacy frame format used by Linux bzImages."""

from __future__ import annotations

LEGACY_MAGIC = 0x184C2102
LEGACY_BLOCK = 8 * 1024 * 1024  # each legacy block inflates to at most 8 MiB


class LZ4Error(ValueError):
    """The input is not a well-formed LZ4 legacy stream."""


def decode_block(src: bytes | memoryview, out: bytearray, limit: int = LEGACY_BLOCK) -> None:
    """Append the decompressed contents of one raw LZ4 block to `out`."""
    data = memoryview(src)
    n = len(data)
    i = 0
    start = len(out)
    while i < n:
        token = data[i]
        i += 1
        lit = token >> 4
        if lit == 15:
            while True:
                if i >= n:
                    raise LZ4Error("truncated literal length")
                b = data[i]
                i += 1
                lit += b
                if b != 255:
                    break
        if i + lit > n:
            raise LZ4Error("literals run past the end of the block")
        out += data[i:i + lit]
        i += lit
        if i >= n:
            break  # the last sequence has literals only
        if i + 2 > n:
            raise LZ4Error("truncated match offset")
        offset = data[i] | (data[i + 1] << 8)
        i += 2
        if offset == 0:
            raise LZ4Error("zero match offset")
        mlen = token & 15
        if mlen == 15:
            while True:
                if i >= n:
                    raise LZ4Error("truncated match length")
                b = data[i]
                i += 1
                mlen += b
                if b != 255:
                    break
        mlen += 4
        pos = len(out) - offset
        if pos < start:
            raise LZ4Error("match reaches before the block")
        if offset >= mlen:
            out += out[pos:pos + mlen]
        else:
            # Overlapping copy: the pattern of `offset` bytes repeats.
            pattern = bytes(out[pos:])
            reps, rest = divmod(mlen, offset)
            out += pattern * reps + pattern[:rest]
        if len(out) - start > limit:
            raise LZ4Error("block inflates past its limit")


def decode_legacy(data: bytes | memoryview) -> bytes:
    """Decompress an LZ4 legacy stream (magic, then length-prefixed blocks).

    Trailing bytes that cannot be a block (the kernel appends the uncompressed size) end
    the stream, as in the kernel's own decompressor.
    """
    view = memoryview(data)
    if len(view) < 4 or int.from_bytes(view[:4], "little") != LEGACY_MAGIC:
        raise LZ4Error("no LZ4 legacy magic")
    out = bytearray()
    i = 4
    while i + 4 <= len(view):
        size = int.from_bytes(view[i:i + 4], "little")
        if size == LEGACY_MAGIC:
            i += 4
            continue
        if size == 0 or i + 4 + size > len(view):
            break
        decode_block(view[i + 4:i + 4 + size], out)
        i += 4 + size
    if not out:
        raise LZ4Error("empty LZ4 stream")
    return bytes(out)
