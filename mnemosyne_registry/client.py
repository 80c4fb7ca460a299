"""gRPC client of the optimizer registry.

>>> client = RegistryClient("grpc://127.0.0.1:50051")          # doctest: +SKIP
>>> v = client.publish("ckpt.msgpack", "mnemosyne-digits")     # doctest: +SKIP
>>> client.set_alias("mnemosyne-digits", "best", v.number)     # doctest: +SKIP
>>> theta, config, meta = client.fetch_theta("mnemosyne-digits", "best")  # doctest: +SKIP

Unary calls have a deadline (``timeout`` seconds) and uploads one that grows
with their size; downloads run until done or broken (then resume), watches
until cancelled or their optional ``timeout``. The bearer token comes from ``token=`` or the
``MNEMOSYNE_REGISTRY_TOKEN`` environment variable; for ``grpcs://`` targets the CA to trust comes
from ``tls_ca=`` or ``MNEMOSYNE_REGISTRY_CA`` (a PEM file), else the system roots. Downloads are verified
against the version's sha256 and, when a stream breaks, resumed from the
last byte received (pinned to the version number, so a moving alias can't
mix two artifacts).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import grpc
from google.protobuf import json_format

from . import registry_pb2 as pb
from . import registry_pb2_grpc as pb_grpc
from .artifacts import decode_checkpoint, describe_checkpoint
from .errors import RegistryClientError, from_rpc_error
from .transfer import CHUNK, AliasWatch, Chunks, download_file, fetch_verified
from .uri import parse_target
from .wire import decode_fetch_response


def _ref(name: str, ref: int | str | None) -> pb.VersionRef:
    if ref is None:
        return pb.VersionRef(name=name, alias="latest")
    if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
        return pb.VersionRef(name=name, number=int(ref))
    return pb.VersionRef(name=name, alias=ref)


def _read_ca(tls_ca: bytes | str | os.PathLike | None) -> bytes | None:
    if tls_ca is None or isinstance(tls_ca, bytes):
        return tls_ca
    return Path(tls_ca).read_bytes()


class RegistryClient:
    """Talk to one registry server.

    Args:
        target: ``grpc://HOST:PORT``, ``grpcs://HOST:PORT`` (TLS) or ``HOST:PORT``.
        token: bearer token; default ``$MNEMOSYNE_REGISTRY_TOKEN`` (if set).
        tls_ca: PEM bytes or path of the CA to trust; implies TLS. ``grpcs://``
            without it uses ``$MNEMOSYNE_REGISTRY_CA`` (a PEM file) if set, else the
            system roots.
        timeout: deadline in seconds for unary calls.
    """

    def __init__(self, target: str, token: str | None = None, tls_ca: bytes | str | os.PathLike | None = None,
                 *, timeout: float = 30.0):
        address, tls = parse_target(target)
        self.target = address
        self.timeout = timeout
        token = token if token is not None else os.environ.get("MNEMOSYNE_REGISTRY_TOKEN") or None
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
        if tls_ca is None and tls:
            # Only for grpcs://: a CA in the environment must not turn a plaintext
            # grpc:// target into TLS. This is how URIs loaded through
            # mnemosyne_core.load (train-policy --optimizer, meta-train --init-from)
            # reach a registry behind a private CA.
            env_ca = os.environ.get("MNEMOSYNE_REGISTRY_CA") or None
            try:
                tls_ca = _read_ca(env_ca)
            except OSError as exc:  # say which setting is wrong, not just "no such file"
                raise RegistryClientError(
                    "INVALID_ARGUMENT", f"cannot read MNEMOSYNE_REGISTRY_CA={env_ca!r}: {exc.strerror or exc}") from None
        ca = _read_ca(tls_ca)
        if tls or ca is not None:
            self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca), options)
        else:
            self._channel = grpc.insecure_channel(address, options)
        self._stub = pb_grpc.RegistryServiceStub(self._channel)
        # Fetch with the zero-copy chunk decoder (see .wire) instead of the generated one.
        self._fetch = self._channel.unary_stream(
            "/mnemosyne.registry.v1.RegistryService/Fetch",
            request_serializer=pb.FetchRequest.SerializeToString,
            response_deserializer=decode_fetch_response,
        )

    # -- lifecycle ------------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _call(self, method, request, timeout: float | None = None):
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    # -- publish --------------------------------------------------------------
    def publish(self, artifact: str | os.PathLike | bytes, name: str,
                metadata: dict | pb.VersionMetadata | None = None, *, chunk_size: int = CHUNK) -> pb.Version:
        """Upload a checkpoint (path or bytes) as the next version of ``name``; returns the Version.

        When the artifact is a Mnemosyne checkpoint, compatibility (architecture
        spec, θ fingerprint) and code/JAX versions are filled in from it unless
        ``metadata`` already sets them.
        """
        data = artifact if isinstance(artifact, bytes) else Path(artifact).read_bytes()
        if not data:
            raise ValueError("refusing to publish an empty artifact")
        if isinstance(metadata, pb.VersionMetadata):
            meta = pb.VersionMetadata()
            meta.CopyFrom(metadata)  # filled in below; leave the caller's message alone
        else:
            try:
                meta = json_format.ParseDict(metadata or {}, pb.VersionMetadata())
            except json_format.ParseError as exc:
                raise ValueError(f"metadata does not fit VersionMetadata: {exc}") from None
        describe_checkpoint(data, meta)
        header = pb.PublishHeader(name=name, metadata=meta, size=len(data), sha256=hashlib.sha256(data).hexdigest())
        view = memoryview(data)

        def requests():
            yield pb.PublishRequest(header=header)
            for start in range(0, len(data), chunk_size):
                yield pb.PublishRequest(chunk=bytes(view[start:start + chunk_size]))

        timeout = self.timeout + len(data) / (50 << 20)  # deadline grows with size (>= 50 MiB/s)
        return self._call(self._stub.Publish, requests(), timeout).version

    # -- reads ----------------------------------------------------------------
    def get_version(self, name: str, ref: int | str | None = None) -> pb.Version:
        """``ref``: version number, alias name, or None for ``latest``."""
        return self._call(self._stub.GetVersion, pb.GetVersionRequest(ref=_ref(name, ref)))

    def list_optimizers(self, prefix: str = "", page_size: int = 0) -> Iterator[pb.Optimizer]:
        token = ""
        while True:
            page = self._call(self._stub.ListOptimizers,
                              pb.ListOptimizersRequest(page_size=page_size, page_token=token, name_prefix=prefix))
            yield from page.optimizers
            if not (token := page.next_page_token):
                return

    def list_versions(self, name: str, page_size: int = 0) -> Iterator[pb.Version]:
        token = ""
        while True:
            page = self._call(self._stub.ListVersions,
                              pb.ListVersionsRequest(name=name, page_size=page_size, page_token=token))
            yield from page.versions
            if not (token := page.next_page_token):
                return

    def list(self, name: str | None = None) -> list:
        """All optimizers, or all versions of ``name`` (follows every page)."""
        return list(self.list_versions(name)) if name else list(self.list_optimizers())

    # -- fetch ----------------------------------------------------------------
    def stream(self, name: str, ref: int | str | None = None, offset: int = 0,
               chunk_size: int = 0) -> tuple[pb.Version, Iterator[bytes]]:
        """Low level: the Version and an iterator over its bytes from ``offset`` (not verified).

        Chunks are bytes-like (``memoryview`` over the received message, no copy).
        """
        call = self._fetch(pb.FetchRequest(ref=_ref(name, ref), offset=offset, chunk_size=chunk_size),
                                metadata=self._metadata, timeout=None)
        try:
            first = next(call)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        if not isinstance(first, pb.FetchResponse) or first.WhichOneof("payload") != "version":
            call.cancel()
            raise RegistryClientError("INTERNAL", "registry sent chunks before the version header")

        return first.version, Chunks(call)

    def fetch(self, name: str, ref: int | str | None = None, *, offset: int = 0, prefix: bytes = b"",
              retries: int = 3, out: bytearray | memoryview | None = None, chunk_size: int = 0):
        """Download a version; returns ``(Version, data)``, sha256-verified.

        ``data`` is a new writable bytes-like buffer (``bytearray``, or for large
        artifacts a ``memoryview`` over huge-page memory), or a ``memoryview``
        of ``out`` when a writable buffer is passed: reusing one buffer across
        fetches (a trainer polling for new versions) skips the page faults of
        fresh memory, which cost about as much as the sha256 itself.
        ``offset``/``prefix`` resume a partial download: ``prefix`` are the
        first ``offset`` bytes already held. A broken stream is resumed from the
        last byte received, up to ``retries`` times. ``chunk_size`` asks the
        server for messages of that many bytes (0: its default, the largest it allows).
        """
        if len(prefix) != offset:
            raise ValueError(f"resume needs the first {offset} bytes as prefix, got {len(prefix)}")
        stream = self.stream if not chunk_size else (lambda n, r, o: self.stream(n, r, o, chunk_size))
        return fetch_verified(stream, name, ref, prefix=prefix, retries=retries, out=out)

    def download(self, name: str, ref: int | str | None, path: str | os.PathLike,
                 *, retries: int = 3) -> pb.Version:
        """Stream a version into ``path``; sha256-verified, atomic, resumable.

        Bytes go to ``<path>.<sha256[:16]>.part`` as they arrive; only a verified
        file is renamed to ``path``. If the transfer breaks (beyond ``retries``
        in-call resumes), the ``.part`` file stays and the next ``download`` of
        the same version continues from its end.
        """
        version = self.get_version(name, ref)  # pin the number: an alias may move meanwhile
        return download_file(self.stream, version, path, retries=retries)

    def fetch_theta(self, name: str, ref: int | str | None = None, *, like: Any = None):
        """Download, verify and decode a checkpoint: ``(theta, config, metadata)``.

        ``like`` (a running optimizer state or a θ) makes the call refuse a
        version whose θ would not hot-swap into it (see :mod:`.hotswap`).
        """
        version, data = self.fetch(name, ref)
        return decode_checkpoint(version, data, like=like)

    # -- aliases ----------------------------------------------------------------
    def set_alias(self, name: str, alias: str, version: int) -> pb.Alias:
        return self._call(self._stub.SetAlias, pb.SetAliasRequest(name=name, alias=alias, version=version))

    def delete_alias(self, name: str, alias: str) -> None:
        self._call(self._stub.DeleteAlias, pb.DeleteAliasRequest(name=name, alias=alias))

    def watch(self, name: str, alias: str, timeout: float | None = None, *, after_sequence: int = 0) -> AliasWatch:
        """Iterate over the alias's current target and every later move; ``.cancel()`` to stop.

        ``after_sequence``: resume after the ``sequence`` of the last event received,
        getting every move since (no current-target event first); a sequence older than
        the server's history raises OUT_OF_RANGE: re-read the alias and watch anew.
        """
        request = pb.WatchAliasRequest(name=name, alias=alias, after_sequence=after_sequence)
        call = self._stub.WatchAlias(request, metadata=self._metadata, timeout=timeout)
        return AliasWatch(call)
