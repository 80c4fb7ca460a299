"""Fast path for ``FetchResponse`` chunk messages (byte-identical to protobuf's encoding).

A chunk message is ``FetchResponse{chunk: bytes}``: on the wire, the tag byte
``0x12`` (field 2, length-delimited), a varint length, then the bytes. Building
and parsing that by hand avoids two 1 MiB copies per message on each side
(protobuf object construction/serialization, parse + attribute access) — the
difference between the registry's fetch and a raw gRPC byte stream. Anything
that is not exactly one chunk field is handed to protobuf.

>>> from mnemosyne_registry import registry_pb2 as pb
>>> encode_chunk(b"abc") == pb.FetchResponse(chunk=b"abc").SerializeToString()
True
>>> bytes(decode_fetch_response(encode_chunk(b"abc")))
b'abc'
>>> decode_fetch_response(pb.FetchResponse(version=pb.Version(number=3)).SerializeToString()).version.number
3
"""
from __future__ import annotations

from . import registry_pb2 as pb

_CHUNK_TAG = 0x12  # field 2 ("chunk"), wire type 2 (length-delimited)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_chunk(data: bytes) -> bytes:
    """The serialized ``FetchResponse(chunk=data)``."""
    return b"".join((bytes((_CHUNK_TAG,)), _varint(len(data)), data))


def serialize_response(message) -> bytes:
    """gRPC response serializer that passes pre-encoded messages through."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def decode_fetch_response(raw: bytes):
    """A chunk as a zero-copy ``memoryview``, or a parsed ``FetchResponse`` for anything else."""
    if raw and raw[0] == _CHUNK_TAG:
        length, shift, pos = 0, 0, 1
        while pos < len(raw) and shift < 64:
            byte = raw[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                if pos + length == len(raw):  # exactly one chunk field and nothing else
                    return memoryview(raw)[pos:]
                break
    return pb.FetchResponse.FromString(raw)
