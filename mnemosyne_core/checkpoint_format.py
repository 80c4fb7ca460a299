"""The checkpoint file's framing, checked incrementally and without JAX.

Layout (all integers big-endian)::

    MAGIC (12 bytes) | format version (uint16) | header length (uint32)
    | sha256 of the header (32 bytes) | header (UTF-8 JSON) | payload

:class:`CheckpointVerifier` is fed the bytes in pieces, as they arrive over a
network, and fails at the first piece that proves they are not a valid
checkpoint: a registry server rejects random bytes after their first chunk,
not after storing 256 MB. :func:`mnemosyne_core.checkpoint.read_header` uses
the same verifier, so the two can never disagree. This module imports only
the standard library (the registry server does not load JAX to check uploads).

>>> import hashlib, json
>>> head = json.dumps({"payload_length": 3, "payload_sha256": hashlib.sha256(b"abc").hexdigest()}).encode()
>>> blob = MAGIC + PREFIX.pack(FORMAT_VERSION, len(head)) + hashlib.sha256(head).digest() + head + b"abc"
>>> v = CheckpointVerifier()
>>> for i in range(0, len(blob), 7):
...     v.feed(blob[i:i + 7])
>>> v.finish()["payload_length"]
3
>>> CheckpointVerifier().feed(b"PK\\x03\\x04 a zip file")
Traceback (most recent call last):
...
mnemosyne_core.checkpoint_format.NotACheckpointError: not a Mnemosyne checkpoint (bad magic)
"""
from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

MAGIC = b"\x89MNEMOSYNE\r\n"  # the high byte and CRLF catch text-mode and 7-bit transfers
FORMAT_VERSION = 1
PREFIX = struct.Struct(">HI")  # format version, header length
FIXED = len(MAGIC) + PREFIX.size + 32  # magic, prefix, header sha256
MAX_HEADER_BYTES = 1 << 20  # a real header is a few KiB; a larger length is a forgery
KINDS = ("mnemosyne", "lstm")  # architecture kinds; checkpoint.py maps each to its config class


class CheckpointError(ValueError):
    """Base class of every error reading or writing a checkpoint."""


class NotACheckpointError(CheckpointError):
    """The data does not start with the checkpoint magic."""


class UnsupportedVersionError(CheckpointError):
    """The file was written with a format version this code cannot read."""


class TruncatedCheckpointError(CheckpointError):
    """The file ends before the lengths in its header say it should."""


class CorruptedCheckpointError(CheckpointError):
    """A checksum (header or payload sha256) does not match: the bytes were altered."""


class CheckpointVerifier:
    """Checks framing, header sha256, payload length and payload sha256 as bytes arrive.

    ``feed`` raises as soon as the bytes so far cannot start a valid checkpoint
    (bad magic, unknown format version, corrupted header, too many bytes);
    ``finish`` raises if they end early or the payload's sha256 differs, and
    returns the parsed JSON header. ``header`` is available once it is complete.
    """

    def __init__(self) -> None:
        self._head = bytearray()  # everything up to the end of the header
        self._head_len: int | None = None
        self.header: dict[str, Any] | None = None
        self._payload_hash = hashlib.sha256()
        self._payload_seen = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        data = memoryview(data).cast("B")
        while self.header is None:  # at most twice: the fixed part, then the JSON header
            need = (FIXED if self._head_len is None else FIXED + self._head_len) - len(self._head)
            self._head += data[:need]
            data = data[need:]
            known = self._head_len
            self._check_head()
            if self.header is None and (not data or known == self._head_len):
                return
        if data:
            self._payload_seen += len(data)
            if self._payload_seen > self.header["payload_length"]:
                extra = self._payload_seen - self.header["payload_length"]
                raise CorruptedCheckpointError(f"checkpoint has {extra} unexpected trailing bytes")
            self._payload_hash.update(data)

    def _check_head(self) -> None:
        head = self._head
        if not MAGIC.startswith(bytes(head[:len(MAGIC)])):
            raise NotACheckpointError("not a Mnemosyne checkpoint (bad magic)")
        if self._head_len is None:
            if len(head) < FIXED:
                return
            version, head_len = PREFIX.unpack_from(head, len(MAGIC))
            if version != FORMAT_VERSION:
                raise UnsupportedVersionError(
                    f"checkpoint format version {version} is not supported (this code reads version {FORMAT_VERSION})")
            if head_len > MAX_HEADER_BYTES:
                raise CorruptedCheckpointError(f"checkpoint header length {head_len} exceeds {MAX_HEADER_BYTES} bytes")
            self._head_len = head_len
        if len(head) < FIXED + self._head_len:
            return
        text = bytes(head[FIXED:])
        if hashlib.sha256(text).digest() != bytes(head[len(MAGIC) + PREFIX.size:FIXED]):
            raise CorruptedCheckpointError("checkpoint header is corrupted (sha256 mismatch)")
        try:
            header = json.loads(text.decode())
            n, digest = int(header["payload_length"]), header["payload_sha256"]
        except (ValueError, KeyError, TypeError) as exc:  # only a forged header with a valid sha gets here
            raise CorruptedCheckpointError(f"checkpoint header is malformed: {exc}") from exc
        if n < 0 or not isinstance(digest, str):
            raise CorruptedCheckpointError("checkpoint header is malformed: bad payload length or sha256")
        header["payload_length"] = n
        self.header = header

    def finish(self) -> dict[str, Any]:
        """The header, once every byte has been fed; raises if the data ended early or is corrupted."""
        head = self._head
        if self.header is None:
            if len(head) < len(MAGIC):
                raise TruncatedCheckpointError(f"checkpoint truncated: {len(head)} bytes, shorter than the magic")
            if self._head_len is None:
                raise TruncatedCheckpointError(
                    f"checkpoint truncated: {len(head)} bytes, the fixed header needs {FIXED}")
            raise TruncatedCheckpointError(
                f"checkpoint truncated inside its header ({len(head) - FIXED}/{self._head_len} bytes)")
        n = self.header["payload_length"]
        if self._payload_seen < n:
            raise TruncatedCheckpointError(f"checkpoint truncated: payload has {self._payload_seen} of {n} bytes")
        if self._payload_hash.hexdigest() != self.header["payload_sha256"]:
            raise CorruptedCheckpointError("checkpoint payload is corrupted (sha256 mismatch)")
        return self.header

    @property
    def payload_offset(self) -> int:
        """Where the payload starts (valid once the header is complete)."""
        if self._head_len is None:
            raise ValueError("the header is not complete yet")
        return FIXED + self._head_len


def pack(header: dict[str, Any], payload: bytes) -> bytes:
    """Frame a JSON header and a payload (the inverse of :class:`CheckpointVerifier`)."""
    head = json.dumps(header, sort_keys=True, allow_nan=False).encode()
    return b"".join([MAGIC, PREFIX.pack(FORMAT_VERSION, len(head)), hashlib.sha256(head).digest(), head, payload])
