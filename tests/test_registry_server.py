"""The registry over real gRPC on 127.0.0.1:0: publish, fetch, aliases, watch, auth, limits."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import threading

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mnemosyne_registry import (
    IntegrityError,
    RegistryClient,
    RegistryClientError,
)
from mnemosyne_registry import registry_pb2 as pb
from mnemosyne_registry import registry_pb2_grpc as pb_grpc
from service.registry.server import create_server, shutdown

OPAQUE = {"compatibility": {"format": "opaque"}}  # test bytes, not checkpoints

pytestmark = pytest.mark.xdist_group("registry")
TOKEN = "test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("registry")
    srv, port = create_server(data, host="127.0.0.1", port=0, tokens=(TOKEN,))
    srv.start()
    srv.port = port
    srv.data = data
    yield srv
    shutdown(srv, grace=1)


@pytest.fixture
def client(server):
    with RegistryClient(f"grpc://127.0.0.1:{server.port}", token=TOKEN) as c:
        yield c


@pytest.fixture
def stub(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield pb_grpc.RegistryServiceStub(channel)
    channel.close()


def _header(name: str, data: bytes, sha256: str | None = None, metadata: dict | None = None) -> pb.PublishRequest:
    meta = json_format.ParseDict(OPAQUE if metadata is None else metadata, pb.VersionMetadata())
    return pb.PublishRequest(header=pb.PublishHeader(
        name=name, size=len(data), sha256=sha256 or hashlib.sha256(data).hexdigest(), metadata=meta))


def _chunks(data: bytes, size: int = 64 << 10):
    return [pb.PublishRequest(chunk=data[i:i + size]) for i in range(0, len(data), size)]


def _assert_nothing_visible(client, server, name):
    with pytest.raises(RegistryClientError) as info:
        client.get_version(name)
    assert info.value.code == "NOT_FOUND"
    assert name not in [o.name for o in client.list()]
    # The upload's temp file is gone once the server handler has finished with it.
    while list((server.data / "tmp").iterdir()):
        threading.Event().wait(0.01)


@functools.cache
def _checkpoint_bytes(hidden_size: int = 4) -> bytes:
    import jax

    from mnemosyne_core import checkpoint
    from mnemosyne_core.baselines import LSTMConfig, init_lstm_theta

    config = LSTMConfig(hidden_size=hidden_size)
    return checkpoint.to_bytes(init_lstm_theta(jax.random.key(0), config), config, {"generation": 40})


def test_publish_fetch_roundtrip_with_metadata(client):
    from mnemosyne_core import checkpoint

    data = _checkpoint_bytes()
    header, _ = checkpoint.read_header(data)
    meta = {"lineage": {"parent_version": 0, "run_id": "run-7", "eval_metrics": {"digits_loss": 0.12}},
            "tags": {"team": "vision"}}
    v1 = client.publish(data, "roundtrip", meta)
    v2 = client.publish(data[:1000], "roundtrip", OPAQUE)
    assert (v1.number, v2.number) == (1, 2)
    got = client.get_version("roundtrip", 1)
    assert got.sha256 == hashlib.sha256(data).hexdigest() and got.size == len(data)
    assert got.metadata.lineage.run_id == "run-7" and got.metadata.lineage.generation == 40
    assert got.metadata.lineage.eval_metrics["digits_loss"] == pytest.approx(0.12)
    compat = got.metadata.compatibility  # from the checkpoint's header
    assert compat.format == "mnemosyne-checkpoint" and compat.theta_fingerprint == header["theta_fingerprint"]
    assert json.loads(compat.architecture_spec_json) == header["architecture"]
    assert got.metadata.lineage.jax_version  # filled in by the client
    assert client.get_version("roundtrip").number == 2  # latest moved automatically
    assert client.get_version("roundtrip", 2).metadata.compatibility.format == "opaque"
    version, fetched = client.fetch("roundtrip", 1)
    assert fetched == data and version.number == 1


def test_corrupt_upload_is_invalid_argument_and_invisible(client, server, stub):
    data = os.urandom(200_000)
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(grpc.RpcError) as info:
        stub.Publish(iter([_header("corrupt", data, wrong), *_chunks(data)]), metadata=AUTH)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sha256 mismatch" in info.value.details()
    _assert_nothing_visible(client, server, "corrupt")


def test_short_upload_is_invalid_argument_and_invisible(client, server, stub):
    data = os.urandom(200_000)
    with pytest.raises(grpc.RpcError) as info:  # client half-closes before sending everything
        stub.Publish(iter([_header("short", data), *_chunks(data[:100_000])]), metadata=AUTH)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ended after 100000 of 200000" in info.value.details()
    _assert_nothing_visible(client, server, "short")


def test_stream_cut_mid_upload_leaves_nothing(client, server, stub):
    data = os.urandom(1_000_000)
    sent, release = threading.Event(), threading.Event()

    def requests():
        yield _header("cut", data)
        yield from _chunks(data[:300_000])
        sent.set()
        release.wait()  # the connection "dies" here: the call is cancelled mid-upload

    future = stub.Publish.future(requests(), metadata=AUTH)
    sent.wait()
    future.cancel()
    release.set()
    with pytest.raises(grpc.FutureCancelledError):
        future.result()
    _assert_nothing_visible(client, server, "cut")


def test_oversized_chunk_is_rejected_clearly(client, server, stub):
    big = os.urandom((1 << 20) + 1)  # just over the 1 MiB handler limit
    with pytest.raises(grpc.RpcError) as info:
        stub.Publish(iter([_header("oversized", big), pb.PublishRequest(chunk=big)]), metadata=AUTH)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "exceeds the 1048576-byte chunk limit" in info.value.details()
    huge = os.urandom(6 << 20)  # over gRPC's message limit: refused before the handler sees it
    with pytest.raises(grpc.RpcError) as info:
        stub.Publish(iter([_header("oversized", huge), pb.PublishRequest(chunk=huge)]), metadata=AUTH)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _assert_nothing_visible(client, server, "oversized")


def test_header_must_come_first(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.Publish(iter([pb.PublishRequest(chunk=b"abc")]), metadata=AUTH)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "header" in info.value.details()


@pytest.mark.parametrize("name,ref", [("no-such-optimizer", None), ("known", "no-such-alias"), ("known", 99)])
def test_unknown_name_alias_or_version_is_not_found(client, name, ref):
    client.publish(b"known optimizer", "known", OPAQUE)
    with pytest.raises(RegistryClientError) as info:
        client.get_version(name, ref)
    assert info.value.code == "NOT_FOUND"
    with pytest.raises(RegistryClientError) as info:
        client.fetch(name, ref)
    assert info.value.code == "NOT_FOUND"


def test_invalid_names_are_invalid_argument(client):
    for bad in ("", "has space", "../etc"):
        with pytest.raises(RegistryClientError) as info:
            client.publish(b"x", bad, OPAQUE)
        assert info.value.code == "INVALID_ARGUMENT" and "invalid optimizer name" in info.value.message


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_writes_need_the_right_token(server, token, monkeypatch):
    monkeypatch.delenv("MNEMOSYNE_REGISTRY_TOKEN", raising=False)
    with RegistryClient(f"127.0.0.1:{server.port}", token=token) as anonymous:
        for call in (lambda: anonymous.publish(b"data", "auth-test", OPAQUE),
                     lambda: anonymous.set_alias("auth-test", "best", 1),
                     lambda: anonymous.delete_alias("auth-test", "best")):
            with pytest.raises(RegistryClientError) as info:
                call()
            assert info.value.code == "UNAUTHENTICATED"
        # Reads are open unless the server requires tokens for them.
        assert isinstance(anonymous.list(), list)


def test_token_from_environment(server, monkeypatch):
    monkeypatch.setenv("MNEMOSYNE_REGISTRY_TOKEN", TOKEN)
    with RegistryClient(f"grpc://127.0.0.1:{server.port}") as c:
        assert c.publish(b"from env", "env-token", OPAQUE).number == 1


def test_read_token_required(tmp_path):
    srv, port = create_server(tmp_path, port=0, tokens=(TOKEN,), read_token_required=True)
    srv.start()
    try:
        with RegistryClient(f"127.0.0.1:{port}", token="") as anonymous:
            with pytest.raises(RegistryClientError) as info:
                anonymous.list()
            assert info.value.code == "UNAUTHENTICATED"
        with RegistryClient(f"127.0.0.1:{port}", token=TOKEN) as c:
            assert c.list() == []
        # Health stays open for probes.
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        channel.close()
    finally:
        shutdown(srv, grace=1)


def test_concurrent_publishers_get_gapless_versions(server):
    n_threads, per_thread = 8, 4
    published: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(n_threads)

    def worker(i):
        with RegistryClient(f"127.0.0.1:{server.port}", token=TOKEN) as c:
            barrier.wait()
            for j in range(per_thread):
                v = c.publish(f"artifact {i}-{j}".encode() * 1000, "concurrent", OPAQUE)
                with lock:
                    published.append(v.number)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = n_threads * per_thread
    assert sorted(published) == list(range(1, total + 1))
    with RegistryClient(f"127.0.0.1:{server.port}") as c:
        assert [v.number for v in c.list("concurrent")] == list(range(1, total + 1))
        assert c.get_version("concurrent").number == total


def test_aliases_and_latest_rules(client):
    for i in range(3):
        client.publish(f"v{i}".encode(), "aliased", OPAQUE)
    client.set_alias("aliased", "best", 2)
    assert client.get_version("aliased", "best").number == 2
    assert sorted(client.get_version("aliased", 2).aliases) == ["best"]
    for call in (lambda: client.set_alias("aliased", "latest", 1), lambda: client.delete_alias("aliased", "latest")):
        with pytest.raises(RegistryClientError) as info:
            call()
        assert info.value.code == "FAILED_PRECONDITION" and "latest" in info.value.message
    with pytest.raises(RegistryClientError) as info:
        client.set_alias("aliased", "best", 7)
    assert info.value.code == "NOT_FOUND"
    client.delete_alias("aliased", "best")
    with pytest.raises(RegistryClientError) as info:
        client.delete_alias("aliased", "best")
    assert info.value.code == "NOT_FOUND"


def test_list_paging(client):
    for i in range(7):
        client.publish(f"page {i}".encode(), "paged", OPAQUE)
        client.publish(f"page {i}".encode(), f"paged-{i}", OPAQUE)
    numbers = [v.number for v in client.list_versions("paged", page_size=3)]
    assert numbers == list(range(1, 8))
    names = [o.name for o in client.list_optimizers(prefix="paged-", page_size=2)]
    assert names == [f"paged-{i}" for i in range(7)]
    with pytest.raises(RegistryClientError) as info:
        client._call(client._stub.ListVersions, pb.ListVersionsRequest(name="paged", page_token="garbage"))
    assert info.value.code == "INVALID_ARGUMENT"


def test_watch_receives_moves_in_order(client):
    for i in range(3):
        client.publish(f"watch {i}".encode(), "watched", OPAQUE)
    client.set_alias("watched", "production", 1)
    watch = client.watch("watched", "production")
    events = []
    first = threading.Event()
    done = threading.Event()

    def consume():
        for event in watch:
            events.append(event)
            first.set()
            if len(events) == 6:
                done.set()

    thread = threading.Thread(target=consume)
    thread.start()
    first.wait()  # subscribed: the current target arrived
    for v in (2, 3, 1):
        client.set_alias("watched", "production", v)
    client.delete_alias("watched", "production")
    client.set_alias("watched", "production", 3)
    done.wait()
    watch.cancel()
    thread.join()
    assert [(e.version, e.deleted) for e in events] == [(1, False), (2, False), (3, False), (1, False),
                                                        (0, True), (3, False)]
    sequences = [e.sequence for e in events]
    assert sequences == sorted(set(sequences))


def test_watch_latest_follows_publish(client):
    client.publish(b"w0", "watch-latest", OPAQUE)
    watch = client.watch("watch-latest", "latest")
    assert next(watch).version == 1
    client.publish(b"w1", "watch-latest", OPAQUE)
    assert next(watch).version == 2
    watch.cancel()


def test_watch_unknown_optimizer_is_not_found(client):
    with pytest.raises(RegistryClientError) as info:
        next(client.watch("never-published", "best"))
    assert info.value.code == "NOT_FOUND"


def test_fetch_resumes_from_offset(client, tmp_path):
    data = os.urandom(3 * (1 << 20) + 12345)
    client.publish(data, "resumable", OPAQUE)
    for offset in (0, 1, 70_000, len(data) - 1, len(data)):
        _, chunks = client.stream("resumable", 1, offset=offset)
        parts = list(chunks)
        assert b"".join(parts) == data[offset:]
        assert all(len(p) <= (1 << 20) for p in parts)
    _, chunks = client.stream("resumable", 1, offset=0, chunk_size=1000)  # clamped up to 64 KiB
    assert len(next(chunks)) == 64 << 10
    # A resumed download with the bytes already held verifies the whole artifact.
    _, whole = client.fetch("resumable", "latest", offset=500_000, prefix=data[:500_000])
    assert whole == data
    # download() picks up a partial file left by an interrupted run of the same version.
    out = tmp_path / "resumable.bin"
    part = tmp_path / f"resumable.bin.{hashlib.sha256(data).hexdigest()[:16]}.part"
    part.write_bytes(data[:2_000_000])
    client.download("resumable", 1, out)
    assert out.read_bytes() == data and not part.exists()
    # A corrupt partial file is caught by the sha256 check and discarded, never renamed into place.
    corrupt = tmp_path / part.name.replace("resumable.bin", "other.bin")
    corrupt.write_bytes(b"\0" * 1000)
    with pytest.raises(IntegrityError):
        client.download("resumable", 1, tmp_path / "other.bin")
    assert not corrupt.exists() and not (tmp_path / "other.bin").exists()
    client.download("resumable", 1, tmp_path / "other.bin")  # the retry starts over and succeeds
    assert (tmp_path / "other.bin").read_bytes() == data
    # A wrong prefix is caught by the sha256 check.
    with pytest.raises(IntegrityError):
        client.fetch("resumable", 1, offset=10, prefix=b"\0" * 10)
    with pytest.raises(RegistryClientError) as info:
        client.stream("resumable", 1, offset=len(data) + 1)
    assert info.value.code == "INVALID_ARGUMENT"


def test_health_and_reflection(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="mnemosyne.registry.v1.RegistryService"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    services = {s.name for r in responses for s in r.list_services_response.service}
    assert "mnemosyne.registry.v1.RegistryService" in services
    # Reflection v1 too (grpcurl asks it first), listing and describing services.
    from service.registry.reflection_v1 import reflection_pb2 as v1
    from service.registry.reflection_v1 import reflection_pb2_grpc as v1_grpc

    v1_stub = v1_grpc.ServerReflectionStub(channel)
    requests = [v1.ServerReflectionRequest(list_services=""),
                v1.ServerReflectionRequest(file_containing_symbol="mnemosyne.registry.v1.RegistryService"),
                v1.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection")]
    listed, described, itself = list(v1_stub.ServerReflectionInfo(iter(requests)))
    assert {s.name for s in listed.list_services_response.service} >= {
        "mnemosyne.registry.v1.RegistryService", "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}
    from google.protobuf import descriptor_pb2
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in described.file_descriptor_response.file_descriptor_proto]
    assert "mnemosyne/registry/v1/registry.proto" in {f.name for f in files}
    assert itself.WhichOneof("message_response") == "file_descriptor_response"
    channel.close()


def test_deadlines_end_calls(client):
    client.publish(b"quiet", "deadline", OPAQUE)
    client.set_alias("deadline", "best", 1)
    watch = client.watch("deadline", "best", timeout=3.0)
    assert next(watch).version == 1
    with pytest.raises(RegistryClientError) as info:
        next(watch)  # nothing moves: the deadline ends the stream
    assert info.value.code == "DEADLINE_EXCEEDED"


def test_fetch_resumes_after_a_broken_stream_pinned_to_the_version(client, monkeypatch):
    data = os.urandom(3 << 20)
    client.publish(data, "flaky", OPAQUE)
    real_stream, calls = client.stream, []

    def flaky_stream(name, ref=None, offset=0, chunk_size=0):
        calls.append((ref, offset))
        version, chunks = real_stream(name, ref, offset, chunk_size)
        if len(calls) > 1:
            return version, chunks

        def broken():
            yield next(chunks)
            client.publish(b"a newer version", "flaky", OPAQUE)  # `latest` moves during the outage
            raise RegistryClientError("UNAVAILABLE", "connection reset by peer")

        return version, broken()

    monkeypatch.setattr(client, "stream", flaky_stream)
    version, got = client.fetch("flaky", "latest")
    assert calls == [("latest", 0), (1, 1 << 20)]  # resumed at the byte it stopped, on version 1
    assert version.number == 1 and got == data


def test_fetch_into_a_reused_buffer(client):
    data = os.urandom(200_000)
    client.publish(data, "into-buffer", OPAQUE)
    buffer = bytearray(300_000)
    for _ in range(2):
        _, view = client.fetch("into-buffer", 1, out=buffer)
        assert bytes(view) == data and view.obj is buffer
    with pytest.raises(ValueError, match="needs 200000"):
        client.fetch("into-buffer", 1, out=bytearray(10))


def test_large_fetch_round_trips(client, tmp_path):
    data = os.urandom(9 << 20)  # above the huge-page allocation threshold
    client.publish(data, "large", OPAQUE)
    _, got = client.fetch("large")
    assert len(got) == len(data) and bytes(got) == data
    client.download("large", None, tmp_path / "large.bin")
    assert (tmp_path / "large.bin").read_bytes() == data


def test_interrupted_download_resumes_from_its_part_file(client, monkeypatch, tmp_path):
    data = os.urandom(3 << 20)
    version = client.publish(data, "interrupted", OPAQUE)
    real_stream, offsets = client.stream, []

    def dying_stream(name, ref=None, offset=0, chunk_size=0):
        offsets.append(offset)
        v, chunks = real_stream(name, ref, offset, chunk_size)
        if len(offsets) > 1:
            return v, chunks

        def broken():
            yield next(chunks)
            raise RegistryClientError("UNAVAILABLE", "network down")

        return v, broken()

    monkeypatch.setattr(client, "stream", dying_stream)
    out = tmp_path / "opt.bin"
    with pytest.raises(RegistryClientError):
        client.download("interrupted", None, out, retries=0)
    part = tmp_path / f"opt.bin.{version.sha256[:16]}.part"
    assert not out.exists() and part.stat().st_size == 1 << 20
    client.download("interrupted", None, out)
    assert offsets == [0, 1 << 20] and out.read_bytes() == data and not part.exists()


def test_every_domain_error_has_a_status_and_others_are_internal():
    from service.registry import errors
    from service.registry.servicer import STATUS_BY_ERROR, status_for

    domain = [c for c in vars(errors).values()
              if isinstance(c, type) and issubclass(c, errors.RegistryError) and c is not errors.RegistryError]
    assert set(domain) == set(STATUS_BY_ERROR)
    assert status_for(errors.NotFound("gone")) == (grpc.StatusCode.NOT_FOUND, "gone")
    code, message = status_for(KeyError("/srv/secret/path"))
    assert code == grpc.StatusCode.INTERNAL and "secret" not in message


def test_unexpected_errors_become_internal_without_details(client, server, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("db password is hunter2")

    monkeypatch.setattr(server.registry, "get_version", explode)
    with pytest.raises(RegistryClientError) as info:
        client.get_version("anything")
    assert info.value.code == "INTERNAL" and "hunter2" not in info.value.message


def test_version_numbers_beyond_int64_are_invalid_argument_not_internal(client, stub):
    import base64
    import json

    client.publish(os.urandom(1000), "huge-numbers", OPAQUE)
    for number in (2**63, 2**64 - 1):
        ref = pb.VersionRef(name="huge-numbers", number=number)
        calls = [
            lambda ref=ref: stub.GetVersion(pb.GetVersionRequest(ref=ref), metadata=AUTH),
            lambda ref=ref: list(stub.Fetch(pb.FetchRequest(ref=ref), metadata=AUTH)),
            lambda number=number: stub.SetAlias(pb.SetAliasRequest(name="huge-numbers", alias="best",
                                                                   version=number), metadata=AUTH),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert "2^63-1" in info.value.details()
    for after in (10**20, 1e20, -1, True):
        token = base64.urlsafe_b64encode(json.dumps({"after": after}).encode()).decode()
        with pytest.raises(grpc.RpcError) as info:
            stub.ListVersions(pb.ListVersionsRequest(name="huge-numbers", page_token=token), metadata=AUTH)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "page_token" in info.value.details()
    # The largest representable number is a plain NOT_FOUND.
    with pytest.raises(grpc.RpcError) as info:
        stub.GetVersion(pb.GetVersionRequest(ref=pb.VersionRef(name="huge-numbers", number=2**63 - 1)),
                        metadata=AUTH)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
