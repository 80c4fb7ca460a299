"""What the server accepts as a version (issue 23 defect 1), through the raw gRPC stub.

Each case was accepted before: random bytes, an unknown parent, NaN metrics, invalid
JSON, a 100 KB tag. Now each is INVALID_ARGUMENT and nothing is stored: no version, no
blob, no temp file.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import threading

import grpc
import jax
import pytest
from google.protobuf import json_format

from mnemosyne_core import checkpoint
from mnemosyne_core.baselines import LSTMConfig, init_lstm_theta
from mnemosyne_registry import IncompatibleVersionError, RegistryClient
from mnemosyne_registry import registry_pb2 as pb
from mnemosyne_registry import registry_pb2_grpc as pb_grpc
from service.registry.server import create_server, shutdown

pytestmark = pytest.mark.xdist_group("registry")
TOKEN = "validation-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
OPAQUE = {"compatibility": {"format": "opaque"}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("registry")
    srv, port = create_server(data, host="127.0.0.1", port=0, tokens=(TOKEN,))
    srv.start()
    srv.port, srv.data = port, data
    yield srv
    shutdown(srv, grace=1)


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield pb_grpc.RegistryServiceStub(channel)
    channel.close()


@functools.cache
def lstm_checkpoint() -> bytes:
    config = LSTMConfig(hidden_size=4)
    return checkpoint.to_bytes(init_lstm_theta(jax.random.key(0), config), config)


def publish(stub, name: str, data: bytes, metadata: dict | pb.VersionMetadata | None = None, chunk: int = 1 << 20,
            consumed: list | None = None):
    meta = metadata if isinstance(metadata, pb.VersionMetadata) else json_format.ParseDict(metadata or {}, pb.VersionMetadata())
    header = pb.PublishHeader(name=name, metadata=meta, size=len(data), sha256=hashlib.sha256(data).hexdigest())

    def requests():
        yield pb.PublishRequest(header=header)
        for i in range(0, len(data), chunk):
            if consumed is not None:
                consumed.append(i)
            yield pb.PublishRequest(chunk=data[i:i + chunk])

    return stub.Publish(requests(), metadata=AUTH, timeout=30).version


def refused(stub, server, name: str, data: bytes, metadata=None, match: str = "", **kwargs) -> str:
    blobs = sorted((server.data / "blobs").rglob("*"))
    with pytest.raises(grpc.RpcError) as info:
        publish(stub, name, data, metadata, **kwargs)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert match in info.value.details()
    with pytest.raises(grpc.RpcError) as missing:
        stub.GetVersion(pb.GetVersionRequest(ref=pb.VersionRef(name=name)), timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert sorted((server.data / "blobs").rglob("*")) == blobs
    while list((server.data / "tmp").iterdir()):  # the handler removes its temp file as it ends
        threading.Event().wait(0.01)
    return info.value.details()


def test_random_bytes_are_refused_after_the_first_chunk(stub, server):
    data = os.urandom(8 << 20)
    consumed: list[int] = []
    refused(stub, server, "random-bytes", data, match="not a valid Mnemosyne checkpoint (not a Mnemosyne checkpoint (bad magic))",
            consumed=consumed)
    assert len(consumed) < 8  # the server stopped reading; the client did not stream all 8 MiB


def test_truncated_and_forged_checkpoints_are_refused(stub, server):
    data = lstm_checkpoint()
    refused(stub, server, "cut", data[:-7], match="checkpoint truncated: payload has")
    damaged = bytearray(data)
    damaged[-1] ^= 1
    refused(stub, server, "damaged", bytes(damaged), match="payload is corrupted")


def test_declared_compatibility_must_match_the_header(stub, server):
    data = lstm_checkpoint()
    header, _ = checkpoint.read_header(data)
    refused(stub, server, "fp", data, {"compatibility": {"theta_fingerprint": "0" * 64}},
            match="compatibility.theta_fingerprint does not match the checkpoint's header")
    wrong = dict(header["architecture"], kind="mnemosyne")
    refused(stub, server, "arch", data, {"compatibility": {"architecture_spec_json": json.dumps(wrong)}},
            match="architecture_spec_json does not match")
    refused(stub, server, "extra", data, {"compatibility": {"required_extra_args": ["loss"]}},
            match="required_extra_args does not match")
    # Any JSON spelling of the same spec is accepted; empty fields are filled from the header.
    spaced = json.dumps(header["architecture"], indent=2)
    version = publish(stub, "spelled", data, {"compatibility": {"architecture_spec_json": spaced}})
    compat = version.metadata.compatibility
    assert compat.format == "mnemosyne-checkpoint" and compat.theta_fingerprint == header["theta_fingerprint"]
    assert compat.architecture_spec_json == json.dumps(header["architecture"], sort_keys=True)


def test_unknown_parent_non_finite_metrics_and_oversized_metadata(stub, server):
    data = lstm_checkpoint()
    refused(stub, server, "orphan", data, {"lineage": {"parent_version": 999}},
            match="lineage.parent_version 999: optimizer 'orphan' has no such version")
    for bad in (float("nan"), float("inf"), float("-inf")):
        meta = pb.VersionMetadata()
        meta.lineage.eval_metrics["loss"] = bad
        refused(stub, server, "nan", data, meta, match="lineage.eval_metrics['loss'] must be a finite number")
    refused(stub, server, "tag", data, {"tags": {"notes": "x" * 100_000}}, match="has 100000 characters; the limit is 256")
    refused(stub, server, "tags", data, {"tags": {f"k{i}": "v" for i in range(65)}}, match="65 tags; the limit is 64")
    refused(stub, server, "desc", data, {"description": "d" * 5000}, match="description has 5000 characters")
    refused(stub, server, "cfg", data, {"lineage": {"config_json": "{not json"}},
            match="lineage.config_json is not valid JSON")
    refused(stub, server, "meta", data, {"lineage": {"config_json": json.dumps({"a": "b" * (200 << 10)})}},
            match="the limit is 131072")
    # A known parent is fine.
    first = publish(stub, "lineage", data)
    child = publish(stub, "lineage", data, {"lineage": {"parent_version": first.number}})
    assert child.metadata.lineage.parent_version == first.number


def test_opaque_bytes_need_the_explicit_format_and_valid_json(stub, server):
    data = b"not a checkpoint, on purpose"
    refused(stub, server, "fmt", data, {"compatibility": {"format": "zip"}},
            match="compatibility.format 'zip' is not one of mnemosyne-checkpoint, opaque")
    refused(stub, server, "json", data, {"compatibility": {"format": "opaque", "architecture_spec_json": "{oops"}},
            match="compatibility.architecture_spec_json is not valid JSON")
    refused(stub, server, "kind", data, {"compatibility": {"format": "opaque",
                                                           "architecture_spec_json": '{"kind": "rnn", "config": {}}'}},
            match="unknown optimizer kind 'rnn'")
    refused(stub, server, "fp", data, {"compatibility": {"format": "opaque", "theta_fingerprint": "abc"}},
            match="theta_fingerprint must be 64 lowercase hex digits")
    assert publish(stub, "opaque-ok", data, OPAQUE).metadata.compatibility.format == "opaque"


def test_python_client_checks_before_sending(server):
    with RegistryClient(f"grpc://127.0.0.1:{server.port}", token=TOKEN) as client:
        with pytest.raises(ValueError, match='not a valid Mnemosyne checkpoint .* compatibility.format = "opaque"'):
            client.publish(b"random bytes", "never-sent")
        assert "never-sent" not in [o.name for o in client.list_optimizers()]
        client.publish(b"bytes", "opaque-theta", OPAQUE)
        with pytest.raises(IncompatibleVersionError, match="opaque artifact, not an optimizer checkpoint"):
            client.fetch_theta("opaque-theta")
