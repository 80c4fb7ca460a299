"""gRPC client of the optimizer registry.

>>> client = RegistryClient("grpc://127.0.0.1:50051")          # doctest: +SKIP
>>> v = client.publish("ckpt.msgpack", "mnemosyne-digits")     # doctest: +SKIP
>>> client.set_alias("mnemosyne-digits", "best", v.number)     # doctest: +SKIP
>>> theta, config, meta = client.fetch_theta("mnemosyne-digits", "best")  # doctest: +SKIP

Unary calls have a deadline (``timeout`` seconds) and uploads one that grows
with their size; downloads run until done or broken (then resume), watches
until cancelled or their optional ``timeout``. The bearer token comes from ``token=`` or the
``MNEMOSYNE_REGISTRY_TOKEN`` environment variable. Downloads are verified
against the version's sha256 and, when a stream breaks, resumed from the
last byte received (pinned to the version number, so a moving alias can't
mix two artifacts).
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import grpc
from google.protobuf import json_format

from . import registry_pb2 as pb
from . import registry_pb2_grpc as pb_grpc
from .errors import IncompatibleVersionError, IntegrityError, RegistryClientError
from .uri import parse_target
from .wire import decode_fetch_response

CHUNK = 1 << 20
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL}


def _error(exc: grpc.RpcError) -> RegistryClientError:
    code = exc.code() if hasattr(exc, "code") else None
    name = code.name if code is not None else "UNKNOWN"
    return RegistryClientError(name, (exc.details() if hasattr(exc, "details") else None) or str(exc))


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
            without it uses the system roots.
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
            raise _error(exc) from None

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
            raise _error(exc) from None
        if not isinstance(first, pb.FetchResponse) or first.WhichOneof("payload") != "version":
            call.cancel()
            raise RegistryClientError("INTERNAL", "registry sent chunks before the version header")

        return first.version, _Chunks(call)

    def fetch(self, name: str, ref: int | str | None = None, *, offset: int = 0, prefix: bytes = b"",
              retries: int = 3, out: bytearray | memoryview | None = None):
        """Download a version; returns ``(Version, data)``, sha256-verified.

        ``data`` is a new writable bytes-like buffer (``bytearray``, or for large
        artifacts a ``memoryview`` over huge-page memory), or a ``memoryview``
        of ``out`` when a writable buffer is passed: reusing one buffer across
        fetches (a trainer polling for new versions) skips the page faults of
        fresh memory, which cost about as much as the sha256 itself.
        ``offset``/``prefix`` resume a partial download: ``prefix`` are the
        first ``offset`` bytes already held. A broken stream is resumed from the
        last byte received, up to ``retries`` times.
        """
        if len(prefix) != offset:
            raise ValueError(f"resume needs the first {offset} bytes as prefix, got {len(prefix)}")
        digest = _BackgroundHash(prefix)
        try:
            version, data = self._receive(name, ref, prefix, retries, digest, out)
        finally:
            actual = digest.hexdigest()  # also stops the hashing thread on errors
        if actual != version.sha256:
            raise IntegrityError(f"{version.name}:{version.number}: sha256 {actual} != {version.sha256}")
        return version, data

    def _receive(self, name, ref, prefix: bytes, retries: int, digest, out=None):
        """Stream into one preallocated buffer (and ``digest``), resuming after retryable failures.

        Copying each chunk into place while the next one is in flight replaces a
        final join, which on a busy machine costs as much as the sha256 itself.
        """
        version, data, received = None, None, len(prefix)
        for attempt in range(retries + 1):
            try:
                # After the first response, pin the number: an alias may move meanwhile.
                v, chunks = self.stream(name, version.number if version else ref, received)
                if version is None:
                    version = v
                    if out is None:
                        data = _allocate(v.size)
                    elif len(out) < v.size:
                        chunks.close()
                        raise ValueError(f"out has {len(out)} bytes; {v.name}:{v.number} needs {v.size}")
                    else:
                        data = memoryview(out)[:v.size]
                    if received > v.size:
                        raise IntegrityError(f"{v.name}:{v.number}: resume offset {received} > size {v.size}")
                    data[:received] = prefix
                for chunk in chunks:
                    end = received + len(chunk)
                    if end > version.size:
                        raise IntegrityError(f"{version.name}:{version.number}: more than {version.size} bytes")
                    digest.update(chunk)
                    data[received:end] = chunk
                    received = end
                if received != version.size:
                    raise IntegrityError(
                        f"{version.name}:{version.number}: got {received} bytes, expected {version.size}")
                return version, data
            except RegistryClientError as exc:
                if attempt == retries or exc.code not in {c.name for c in _RETRYABLE}:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def download(self, name: str, ref: int | str | None, path: str | os.PathLike,
                 *, retries: int = 3) -> pb.Version:
        """Stream a version into ``path``; sha256-verified, atomic, resumable.

        Bytes go to ``<path>.<sha256[:16]>.part`` as they arrive; only a verified
        file is renamed to ``path``. If the transfer breaks (beyond ``retries``
        in-call resumes), the ``.part`` file stays and the next ``download`` of
        the same version continues from its end.
        """
        path = Path(path)
        version = self.get_version(name, ref)  # pin the number: an alias may move meanwhile
        part = path.with_name(f"{path.name}.{version.sha256[:16]}.part")
        held = part.stat().st_size if part.exists() else 0
        if held > version.size:
            part.unlink()
            held = 0
        digest = hashlib.sha256()
        if held:
            with open(part, "rb") as f:
                while block := f.read(CHUNK):
                    digest.update(block)
        with open(part, "ab") as f:
            for attempt in range(retries + 1):
                try:
                    _, chunks = self.stream(name, version.number, held)
                    for chunk in chunks:
                        f.write(chunk)
                        digest.update(chunk)
                        held += len(chunk)
                    break
                except RegistryClientError as exc:
                    f.flush()  # keep what arrived for the next attempt
                    if attempt == retries or exc.code not in {c.name for c in _RETRYABLE}:
                        raise
            f.flush()
            os.fsync(f.fileno())
        if held != version.size or digest.hexdigest() != version.sha256:
            part.unlink(missing_ok=True)
            raise IntegrityError(f"{version.name}:{version.number}: downloaded file does not match its sha256")
        os.replace(part, path)
        return version

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

    def watch(self, name: str, alias: str, timeout: float | None = None) -> AliasWatch:
        """Iterate over the alias's current target and every later move; ``.cancel()`` to stop."""
        call = self._stub.WatchAlias(pb.WatchAliasRequest(name=name, alias=alias),
                                     metadata=self._metadata, timeout=timeout)
        return AliasWatch(call)


_HUGE_PAGE_MIN = 8 << 20


def _allocate(size: int):
    """A zeroed writable buffer; large ones on transparent huge pages where the OS offers them.

    Filling fresh memory costs one page fault per 4 KiB page, about as much CPU
    as hashing it; with 2 MiB pages that drops ~4x (measured on Linux, THP=madvise).
    """
    if size >= _HUGE_PAGE_MIN and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            region.madvise(mmap.MADV_HUGEPAGE)
            return memoryview(region)  # keeps the mapping alive until the view is released
        except (OSError, ValueError):  # no THP or no anonymous maps here: plain memory
            pass
    return bytearray(size)


class _Chunks:
    """Iterator over a Fetch stream's chunk bytes; ``close()`` cancels the call."""

    def __init__(self, call):
        self._call = call

    def __iter__(self):
        return self

    def __next__(self):
        try:
            msg = next(self._call)
        except StopIteration:
            self.close()
            raise
        except grpc.RpcError as exc:
            self.close()
            raise _error(exc) from None
        return msg if isinstance(msg, memoryview) else msg.chunk

    def close(self) -> None:
        self._call.cancel()

    def __del__(self):  # an abandoned download must not keep the server streaming
        self._call.cancel()


class _BackgroundHash:
    """sha256 computed on a helper thread while chunks keep arriving.

    hashlib releases the GIL on large buffers, so on a machine with a spare core
    verification overlaps the transfer instead of following it.
    """

    def __init__(self, initial: bytes = b""):
        self._hash = hashlib.sha256(initial)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="registry-sha256", daemon=True)
        self._thread.start()
        self._digest: str | None = None

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self._hash.update(chunk)

    def update(self, chunk) -> None:
        self._queue.put(chunk)

    def hexdigest(self) -> str:
        if self._digest is None:
            self._queue.put(None)
            self._thread.join()
            self._digest = self._hash.hexdigest()
        return self._digest


class AliasWatch:
    """Iterator of :class:`AliasEvent` messages with ``cancel()``; ends quietly when cancelled."""

    def __init__(self, call):
        self._call = call
        self._cancelled = False

    def __iter__(self):
        return self

    def __next__(self) -> pb.AliasEvent:
        try:
            return next(self._call)
        except grpc.RpcError as exc:
            if self._cancelled or exc.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise _error(exc) from None

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()


# -- artifact helpers -------------------------------------------------------------
def verify(version: pb.Version, data: bytes) -> None:
    """Raise :class:`IntegrityError` unless ``data`` is exactly the version's artifact."""
    if len(data) != version.size:
        raise IntegrityError(f"{version.name}:{version.number}: got {len(data)} bytes, expected {version.size}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != version.sha256:
        raise IntegrityError(f"{version.name}:{version.number}: sha256 {digest} != {version.sha256}")


def _checkpoint():
    try:
        from mnemosyne_core import checkpoint
    except ImportError:  # the checkpoint module is optional for opaque artifacts
        return None
    return checkpoint


def describe_checkpoint(data: bytes, meta: pb.VersionMetadata) -> None:
    """Fill compatibility and code/JAX versions from a checkpoint artifact, keeping what is set."""
    lineage, compat = meta.lineage, meta.compatibility
    if not lineage.code_version:
        from mnemosyne_core import __version__
        lineage.code_version = __version__
    if not lineage.jax_version:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version
        try:
            lineage.jax_version = dist_version("jax")  # without importing jax itself
        except PackageNotFoundError:
            lineage.jax_version = "not installed"
    checkpoint = _checkpoint()
    if checkpoint is None:
        return
    try:
        if hasattr(checkpoint, "read_header"):  # header only: no need to decode θ
            header, _ = checkpoint.read_header(data)
            spec, fingerprint = header["architecture"], header["theta_fingerprint"]
            extra, ckpt_meta = header.get("required_extra_args") or [], header.get("metadata") or {}
        else:
            theta, config, ckpt_meta = checkpoint.from_bytes(data)
            spec, fingerprint = checkpoint.architecture_spec(config), checkpoint.theta_fingerprint(theta)
            extra = ["loss"] if getattr(config, "use_loss_feature", False) else []
    except Exception:  # noqa: BLE001 - not a checkpoint: published as opaque bytes
        return
    compat.format = compat.format or "mnemosyne-checkpoint"
    compat.theta_fingerprint = compat.theta_fingerprint or fingerprint
    compat.architecture_spec_json = compat.architecture_spec_json or json.dumps(spec, sort_keys=True)
    if extra and not compat.required_extra_args:
        compat.required_extra_args.extend(extra)
    ckpt_meta = ckpt_meta if isinstance(ckpt_meta, dict) else {}
    for key in ("run_id", "task_family_fingerprint"):
        if not getattr(lineage, key) and isinstance(ckpt_meta.get(key), str):
            setattr(lineage, key, ckpt_meta[key])
    if not lineage.generation and isinstance(ckpt_meta.get("generation"), int):
        lineage.generation = ckpt_meta["generation"]
    if not lineage.parent_version and isinstance(ckpt_meta.get("parent_version"), int):
        lineage.parent_version = ckpt_meta["parent_version"]


def decode_checkpoint(version: pb.Version, data: bytes, *, like: Any = None):
    """Decode verified bytes and check them against the version's compatibility metadata."""
    checkpoint = _checkpoint()
    if checkpoint is None:
        raise RegistryClientError("UNIMPLEMENTED", "mnemosyne_core.checkpoint is not available to decode artifacts")
    theta, config, metadata = checkpoint.from_bytes(data)
    compat = version.metadata.compatibility
    where = f"{version.name}:{version.number}"
    if compat.theta_fingerprint and compat.theta_fingerprint != checkpoint.theta_fingerprint(theta):
        raise IncompatibleVersionError(f"{where}: θ fingerprint differs from the registry's compatibility record")
    stored_spec = json.loads(compat.architecture_spec_json) if compat.architecture_spec_json else None
    if stored_spec is not None and stored_spec != json.loads(json.dumps(checkpoint.architecture_spec(config))):
        raise IncompatibleVersionError(f"{where}: architecture differs from the registry's compatibility record")
    if like is not None:
        from .hotswap import check_swappable, find_theta
        current = find_theta(like) if _holds_theta(like) else like
        check_swappable(current, theta)
    return theta, config, metadata


def _holds_theta(obj: Any) -> bool:
    from .hotswap import find_theta
    try:
        find_theta(obj)
    except IncompatibleVersionError:
        return False
    return True
