"""What one HTTP request may make the server hold: command output, a file read, a stream."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import ApiSection

MIB = 1024 * 1024
DEFAULT_MAX_OUTPUT = 16 * MIB  # stdout + stderr kept for one /run, exec or batch item
DEFAULT_MAX_FILE = 64 * MIB  # one GET /files read
STREAM_BUFFER = 1 * MIB  # output waiting for a slow /run/stream reader before the command waits


@dataclass(frozen=True)
class Limits:
    max_output: int = DEFAULT_MAX_OUTPUT
    max_file: int = DEFAULT_MAX_FILE
    stream_buffer: int = STREAM_BUFFER

    @classmethod
    def from_config(cls, api: ApiSection) -> Limits:
        return cls(max_output=api.max_output_bytes, max_file=api.max_file_bytes)
