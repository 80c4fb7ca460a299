"""Checkpoint format: round trips, typed errors on damaged files, atomic writes."""
from __future__ import annotations

import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemosyne_core import checkpoint as ckpt
from mnemosyne_core import checkpoint_format
from mnemosyne_core.baselines import LSTMConfig, init_lstm_theta, lstm_optimizer
from mnemosyne_core.checkpoint import (
    CheckpointError,
    CorruptedCheckpointError,
    IncompatibleCheckpointError,
    NotACheckpointError,
    TruncatedCheckpointError,
    UnsupportedVersionError,
)

CONFIG = LSTMConfig(hidden_size=6)  # small θ keeps the byte-flip sweep quick


@pytest.fixture(scope="module")
def theta():
    return init_lstm_theta(jax.random.key(0), CONFIG)


@pytest.fixture(scope="module")
def blob(theta):
    return ckpt.to_bytes(theta, CONFIG, {"generation": 7, "run_id": "abc"})


def _same(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)) and x.dtype == y.dtype, a, b)))


def test_lstm_round_trip_through_a_file(tmp_path, theta):
    path = tmp_path / "opt.msgpack"
    ckpt.save(path, theta, CONFIG, metadata={"generation": 7, "scores": [1.5, 2.0]})
    theta2, config2, meta = ckpt.load(path)
    assert config2 == CONFIG and meta == {"generation": 7, "scores": [1.5, 2.0]}
    assert _same(theta, theta2)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(theta2))
    # The loaded θ drives the optimizer exactly like the original.
    params, grads = {"w": jnp.ones(4)}, {"w": jnp.array([0.1, -2.0, 3e-6, 0.0])}
    outs = []
    for th in (theta, theta2):
        tx = lstm_optimizer(th, config2)
        outs.append(tx.update(grads, tx.init(params), params)[0]["w"])
    np.testing.assert_array_equal(outs[0], outs[1])
    assert [p.name for p in tmp_path.iterdir()] == ["opt.msgpack"]  # no temp files left


def test_bytes_are_deterministic_and_self_describing(theta, blob):
    assert ckpt.to_bytes(theta, CONFIG, {"run_id": "abc", "generation": 7}) == blob
    assert ckpt.to_bytes(jax.device_get(theta), CONFIG, {"generation": 7, "run_id": "abc"}) == blob
    header, payload = ckpt.read_header(blob)
    assert header["format_version"] == ckpt.FORMAT_VERSION
    assert header["architecture"] == ckpt.architecture_spec(CONFIG) == {"kind": "lstm", "config": CONFIG.to_dict()}
    assert header["theta_fingerprint"] == ckpt.theta_fingerprint(theta)
    assert header["payload_length"] == len(payload) and blob.endswith(payload)


@pytest.mark.parametrize("variant", ["tensor", "coordinate"])
def test_mnemosyne_round_trip(variant):
    mn = pytest.importorskip("mnemosyne_core.mnemosyne")
    config = mn.MnemosyneConfig(variant=variant)
    theta = mn.init_theta(jax.random.key(1), config)
    theta2, config2, meta = ckpt.from_bytes(ckpt.to_bytes(theta, config))
    assert config2 == config and meta == {} and _same(theta, theta2)
    assert ckpt.architecture_spec(config2)["kind"] == "mnemosyne"


def test_fingerprint_tracks_structure_not_values(theta):
    fp = ckpt.theta_fingerprint(theta)
    assert fp == ckpt.theta_fingerprint(jax.tree.map(lambda x: np.asarray(x) + 1, theta))
    assert fp != ckpt.theta_fingerprint(jax.tree.map(lambda x: x.astype(jnp.bfloat16), theta))
    assert fp != ckpt.theta_fingerprint(init_lstm_theta(jax.random.key(0), LSTMConfig(hidden_size=7)))
    assert fp != ckpt.theta_fingerprint(dict(theta, extra=jnp.zeros(())))


def test_every_byte_flip_is_detected(blob):
    # Flip each byte of the fixed prefix and a stride of the header and payload.
    positions = list(range(checkpoint_format.FIXED)) + list(range(checkpoint_format.FIXED, len(blob), max(1, len(blob) // 300)))
    for pos in positions:
        damaged = bytearray(blob)
        damaged[pos] ^= 0x5A
        with pytest.raises(CheckpointError):
            ckpt.from_bytes(bytes(damaged))
    flip = bytearray(blob)
    flip[-3] ^= 1
    with pytest.raises(CorruptedCheckpointError, match="payload"):
        ckpt.from_bytes(bytes(flip))
    flip = bytearray(blob)
    flip[checkpoint_format.FIXED + 5] ^= 1
    with pytest.raises(CorruptedCheckpointError, match="header"):
        ckpt.from_bytes(bytes(flip))


def test_truncation_and_trailing_bytes(blob, tmp_path):
    for n in [0, 3, len(ckpt.MAGIC), checkpoint_format.FIXED - 1, checkpoint_format.FIXED + 10, len(blob) - 1, len(blob) // 2]:
        with pytest.raises(TruncatedCheckpointError):
            ckpt.from_bytes(blob[:n])
    path = tmp_path / "cut.msgpack"
    path.write_bytes(blob[:-10])
    with pytest.raises(TruncatedCheckpointError, match="truncated"):
        ckpt.load(path)
    with pytest.raises(CorruptedCheckpointError, match="trailing"):
        ckpt.from_bytes(blob + b"\0")


def test_streaming_verifier_agrees_with_read_header_at_any_chunking(blob):
    header, _ = ckpt.read_header(blob)
    for size in (1, 7, checkpoint_format.FIXED, 4096, len(blob)):
        v = checkpoint_format.CheckpointVerifier()
        for i in range(0, len(blob), size):
            v.feed(blob[i:i + size])
        assert v.finish() == header and v.payload_offset < len(blob)
    # A server rejects other bytes at the first chunk, not after receiving them all.
    with pytest.raises(NotACheckpointError):
        checkpoint_format.CheckpointVerifier().feed(os.urandom(1 << 16))
    with pytest.raises(NotACheckpointError):
        checkpoint_format.CheckpointVerifier().feed(b"\x89MNEMO-not")
    cut = checkpoint_format.CheckpointVerifier()
    cut.feed(blob[:-1])
    with pytest.raises(TruncatedCheckpointError, match="payload has"):
        cut.finish()
    long = checkpoint_format.CheckpointVerifier()
    long.feed(blob)
    with pytest.raises(CorruptedCheckpointError, match="trailing"):
        long.feed(b"\0")


def test_wrong_magic_and_version(blob, tmp_path):
    path = tmp_path / "notes.json"
    path.write_text(json.dumps({"theta": [1, 2, 3]}))
    with pytest.raises(NotACheckpointError, match="not a Mnemosyne checkpoint"):
        ckpt.load(path)
    with pytest.raises(NotACheckpointError):
        ckpt.from_bytes(b"PK\x03\x04")
    future = bytearray(blob)
    future[len(ckpt.MAGIC):len(ckpt.MAGIC) + 2] = (ckpt.FORMAT_VERSION + 1).to_bytes(2, "big")
    with pytest.raises(UnsupportedVersionError, match=str(ckpt.FORMAT_VERSION + 1)):
        ckpt.from_bytes(bytes(future))
    assert issubclass(UnsupportedVersionError, ValueError)


def _reheader(blob: bytes, **changes) -> bytes:
    header, payload = ckpt.read_header(blob)
    header.update(changes)
    return checkpoint_format.pack(header, payload)  # checksums valid: only compatibility can fail


def test_incompatible_checkpoints_are_refused(theta, blob):
    other = {"kind": "lstm", "config": LSTMConfig(hidden_size=8).to_dict()}
    with pytest.raises(IncompatibleCheckpointError, match="fingerprint"):
        ckpt.from_bytes(_reheader(blob, architecture=other))
    # Header and config agree with each other but not with the payload.
    fp8 = ckpt.theta_fingerprint(init_lstm_theta(jax.random.key(0), LSTMConfig(hidden_size=8)))
    with pytest.raises(IncompatibleCheckpointError):
        ckpt.from_bytes(_reheader(blob, architecture=other, theta_fingerprint=fp8))
    with pytest.raises(IncompatibleCheckpointError, match="unknown optimizer kind"):
        ckpt.from_bytes(_reheader(blob, architecture={"kind": "rnnprop", "config": {}}))
    with pytest.raises(IncompatibleCheckpointError, match="not valid"):
        ckpt.from_bytes(_reheader(blob, architecture={"kind": "lstm", "config": {"hidden_size": -1}}))
    with pytest.raises(IncompatibleCheckpointError):
        ckpt.to_bytes(theta, LSTMConfig(hidden_size=8))


def test_bad_save_arguments(theta, tmp_path):
    with pytest.raises(TypeError):
        ckpt.to_bytes(theta, {"hidden_size": 6})
    with pytest.raises(ValueError, match="JSON"):
        ckpt.to_bytes(theta, CONFIG, {"when": object()})
    with pytest.raises(ValueError, match="JSON"):
        ckpt.to_bytes(theta, CONFIG, {"loss": float("nan")})
    with pytest.raises(TypeError):
        ckpt.to_bytes(theta, CONFIG, ["not", "a", "dict"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_failing_save_leaves_no_partial_file(theta, tmp_path, monkeypatch, failing):
    path = tmp_path / "opt.msgpack"
    ckpt.save(path, theta, CONFIG, metadata={"version": 1})
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(f"simulated {failing} failure")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save(path, theta, CONFIG, metadata={"version": 2})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["opt.msgpack"]
    assert path.read_bytes() == before
    assert ckpt.load(path)[2] == {"version": 1}
    with pytest.raises(OSError):
        monkeypatch.setattr(os, failing, boom)
        ckpt.save(tmp_path / "new.msgpack", theta, CONFIG)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["opt.msgpack"]


def test_grpc_uri_goes_to_the_registry_client(monkeypatch, theta):
    from mnemosyne_core import loading

    calls = []
    fake = types.ModuleType(loading.REGISTRY_CLIENT)
    fake.load_uri = lambda uri: calls.append(uri) or (theta, CONFIG, {"from": "registry"})
    monkeypatch.setitem(sys.modules, loading.REGISTRY_CLIENT, fake)
    monkeypatch.setitem(sys.modules, f"{loading.REGISTRY_CLIENT}.client", types.ModuleType("client"))
    out = loading.load("grpc://127.0.0.1:5000/digits@latest")
    assert calls == ["grpc://127.0.0.1:5000/digits@latest"] and out[2] == {"from": "registry"}
    import mnemosyne_core

    assert mnemosyne_core.load is loading.load  # the resolver, not checkpoint.load


def test_checkpoint_module_reads_files_only(tmp_path, theta, monkeypatch):
    # The file format knows nothing of registries: a URI is just a path that does not exist,
    # and loading a file never imports the registry client.
    from mnemosyne_core import loading

    monkeypatch.setitem(sys.modules, loading.REGISTRY_CLIENT, None)  # importing it would raise
    with pytest.raises(FileNotFoundError):
        ckpt.load("grpc://127.0.0.1:5000/digits@latest")
    path = tmp_path / "opt.msgpack"
    ckpt.save(path, theta, CONFIG, {"k": 1})
    assert loading.load(path)[2] == {"k": 1} and loading.load(str(path))[2] == {"k": 1}


def test_registry_uri_without_the_client_is_a_clear_error(monkeypatch):
    from mnemosyne_core import loading

    monkeypatch.setitem(sys.modules, f"{loading.REGISTRY_CLIENT}.client", None)  # as if grpc were missing
    with pytest.raises(loading.RegistryClientUnavailableError, match=r"mnemosyne\[grpc\]"):
        loading.load("grpcs://registry.example.com:443/opt@best")


def test_format_module_knows_every_checkpoint_kind():
    # The registry server checks kinds with the JAX-free list; it must match the loaders.
    assert checkpoint_format.KINDS == tuple(ckpt._KINDS)
