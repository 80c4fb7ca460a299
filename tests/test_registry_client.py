"""Client library: URIs, lazy gRPC import, hot-swapping θ fetched from the registry, load_uri."""
from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

from mnemosyne_registry import (
    IncompatibleVersionError,
    InvalidURIError,
    RegistryClient,
    RegistryClientError,
    find_theta,
    parse_ref,
    parse_uri,
    swap_theta,
)
from mnemosyne_registry import registry_pb2 as pb
from mnemosyne_registry.artifacts import decode_checkpoint
from service.registry.server import create_server, shutdown

pytestmark = pytest.mark.xdist_group("registry")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    srv, port = create_server(tmp_path_factory.mktemp("client-registry"), port=0)
    srv.start()
    yield f"grpc://127.0.0.1:{port}"
    shutdown(srv, grace=1)


def test_uri_parsing():
    u = parse_uri("grpc://127.0.0.1:50051/mnemosyne-digits@best")
    assert (u.target, u.name, u.alias, u.version, u.tls) == ("127.0.0.1:50051", "mnemosyne-digits", "best", None, False)
    u = parse_uri("grpcs://registry.example.com:443/opt:12")
    assert (u.version, u.alias, u.tls) == (12, None, True)
    assert parse_uri("grpc://h:1/opt").alias == "latest"
    assert parse_ref("opt@production") == ("opt", None, "production")
    for bad in ("http://h:1/opt", "grpc://h/opt", "grpc://h:1/", "grpc://h:1/opt:0", "grpc://h:1/opt@", "grpc://h:1/a/b"):
        with pytest.raises(InvalidURIError):
            parse_uri(bad)


def test_parsing_uris_does_not_import_grpc():
    code = ("import sys; from mnemosyne_registry import parse_uri; "
            "parse_uri('grpc://h:1/x@best'); print('grpc' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _loss(params):
    return jnp.sum((params["w"] - 2.0) ** 2) + jnp.sum((params["b"] + 1.0) ** 2)


def _optimizers():
    from mnemosyne_core.baselines import LSTMConfig, init_lstm_theta, lstm_optimizer
    from mnemosyne_core.mnemosyne import MnemosyneConfig, init_theta, mnemosyne

    mn_config, lstm_config = MnemosyneConfig(), LSTMConfig()
    return {
        "mnemosyne": (lambda key: init_theta(key, mn_config), lambda theta: mnemosyne(theta, mn_config)),
        "lstm": (lambda key: init_lstm_theta(key, lstm_config), lambda theta: lstm_optimizer(theta, lstm_config)),
    }


@pytest.mark.parametrize("kind", ["mnemosyne", "lstm"])
def test_hot_swap_from_registry_without_recompiling(registry, kind):
    init, build = _optimizers()[kind]
    theta_k = init(jax.random.key(0))
    tx = build(theta_k)

    @jax.jit
    def train_step(params, opt_state):
        loss, grads = jax.value_and_grad(_loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return optax.apply_updates(params, updates), opt_state

    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    opt_state = tx.init(params)
    for _ in range(3):
        params, opt_state = train_step(params, opt_state)
    compiled = train_step._cache_size()

    # Version k+1: a perturbed θ, published as an artifact and fetched back.
    theta_next = jax.tree.map(
        lambda x: np.asarray(x + 0.3 * jax.random.normal(jax.random.key(1), x.shape, x.dtype)), theta_k)
    with RegistryClient(registry) as client:
        version = client.publish(serialization.msgpack_serialize(theta_next), f"hotswap-{kind}",
                                 {"compatibility": {"format": "opaque"}})  # a bare θ, not a checkpoint
        _, data = client.fetch(f"hotswap-{kind}", version.number)
    fetched = serialization.msgpack_restore(data)

    swapped = swap_theta(opt_state, fetched)
    kept_params, _ = train_step(params, opt_state)
    new_params, new_state = train_step(params, swapped)
    assert train_step._cache_size() == compiled, "swapping θ recompiled the train step"
    jax.tree.map(np.testing.assert_array_equal, find_theta(new_state), theta_next)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(kept_params), jax.tree.leaves(new_params)))
    assert diff > 0, "the swapped θ did not change the update"


def test_hot_swap_refuses_incompatible_theta():
    from mnemosyne_core.mnemosyne import MnemosyneConfig, init_theta, mnemosyne

    config = MnemosyneConfig()
    theta = init_theta(jax.random.key(0), config)
    state = optax.chain(optax.clip(1.0), mnemosyne(theta, config)).init({"w": jnp.ones(3)})
    reshaped = jax.tree.map(lambda x: x, theta)
    first = min(reshaped)
    reshaped[first] = jax.tree.map(lambda x: jnp.zeros((*x.shape, 2), x.dtype), reshaped[first])
    with pytest.raises(IncompatibleVersionError, match="recompiled|compiled step"):
        swap_theta(state, reshaped)
    with pytest.raises(IncompatibleVersionError, match="structure"):
        swap_theta(state, {"something": jnp.zeros(2)})
    with pytest.raises(IncompatibleVersionError, match="no θ"):
        swap_theta(optax.adam(1e-3).init({"w": jnp.ones(3)}), theta)
    swapped = swap_theta(state, jax.tree.map(lambda x: x + 1, theta))  # nested in a chain: found and replaced
    np.testing.assert_allclose(jax.tree.leaves(find_theta(swapped))[0], jax.tree.leaves(theta)[0] + 1)


def test_load_uri_returns_what_checkpoint_load_returns(registry, tmp_path, monkeypatch):
    checkpoint = pytest.importorskip(
        "mnemosyne_core.checkpoint", reason="mnemosyne_core.checkpoint is not in this checkout yet")
    from mnemosyne_core.mnemosyne import MnemosyneConfig, init_theta
    from mnemosyne_registry import load_uri

    config = MnemosyneConfig()
    theta = init_theta(jax.random.key(0), config)
    path = tmp_path / "opt.msgpack"
    checkpoint.save(path, theta, config, {"run_id": "unit"})
    with RegistryClient(registry) as client:
        version = client.publish(path, "by-uri")
        compat = version.metadata.compatibility
        assert compat.theta_fingerprint == checkpoint.theta_fingerprint(theta)
        assert json.loads(compat.architecture_spec_json) == json.loads(json.dumps(checkpoint.architecture_spec(config)))
        client.set_alias("by-uri", "best", version.number)
    expected_extra = ["loss"] if config.use_loss_feature else []
    expected = checkpoint.load(path)
    for uri in (f"{registry}/by-uri@best", f"{registry}/by-uri:{version.number}"):
        theta_got, config_got, meta_got = load_uri(uri)
        jax.tree.map(np.testing.assert_array_equal, theta_got, expected[0])
        assert config_got == expected[1] and meta_got == expected[2]
    assert list(compat.required_extra_args) == expected_extra and version.metadata.lineage.run_id == "unit"
    import mnemosyne_core as mn

    theta_got, _, _ = mn.load(f"{registry}/by-uri@best")  # mnemosyne_core.loading delegates to load_uri
    jax.tree.map(np.testing.assert_array_equal, theta_got, expected[0])


def test_load_uri_accepts_a_checkpoint_from_an_older_release_and_checks_its_architecture(registry):
    # default_v1 was written before later config fields existed: its header's spec lacks them
    # (they load with their defaults), and the record is copied from that header.
    from mnemosyne_core import checkpoint
    from mnemosyne_core.pretrained import SUPERSEDED_DIR
    from mnemosyne_registry import load_uri

    data = (SUPERSEDED_DIR / "default_v1.msgpack").read_bytes()
    header, _ = checkpoint.read_header(data)
    theta, config, meta = checkpoint.from_bytes(data)
    assert header["architecture"] != checkpoint.architecture_spec(config)  # the case under test
    with RegistryClient(registry) as client:
        old = client.publish(data, "older-release")
        wrong = dict(header["architecture"], config={**header["architecture"]["config"], "width": 16})
        # The server refuses a record that contradicts the checkpoint's header (issue 23 defect 1) ...
        with pytest.raises(RegistryClientError, match="architecture_spec_json does not match") as info:
            client.publish(data, "older-release", {"compatibility": {
                "architecture_spec_json": json.dumps(wrong, sort_keys=True)}})
        assert info.value.code == "INVALID_ARGUMENT"
        assert [v.number for v in client.list_versions("older-release")] == [old.number]
    theta_got, config_got, meta_got = load_uri(f"{registry}/older-release:{old.number}")
    jax.tree.map(np.testing.assert_array_equal, theta_got, theta)
    assert config_got == config and meta_got == meta
    # ... and the client still checks one it is given (a record written by an older server).
    bogus = pb.Version(name="older-release", number=9, metadata=pb.VersionMetadata(
        compatibility=pb.Compatibility(architecture_spec_json=json.dumps(wrong, sort_keys=True))))
    with pytest.raises(IncompatibleVersionError, match="architecture differs"):
        decode_checkpoint(bogus, data)


def test_load_uri_refuses_incompatible_versions(registry):
    checkpoint = pytest.importorskip(
        "mnemosyne_core.checkpoint", reason="mnemosyne_core.checkpoint is not in this checkout yet")
    from mnemosyne_core.mnemosyne import MnemosyneConfig, init_theta

    config = MnemosyneConfig()
    data = checkpoint.to_bytes(init_theta(jax.random.key(0), config), config)
    with RegistryClient(registry) as client, pytest.raises(RegistryClientError, match="theta_fingerprint"):
        client.publish(data, "incompatible", {"compatibility": {"theta_fingerprint": "0" * 64}})
    bogus = pb.Version(name="incompatible", number=9, metadata=pb.VersionMetadata(
        compatibility=pb.Compatibility(theta_fingerprint="0" * 64)))
    with pytest.raises(IncompatibleVersionError, match="fingerprint"):
        decode_checkpoint(bogus, data)
    # `like=` refuses a θ that would not swap into the running optimizer state.
    other = {"w": jnp.zeros((2, 2))}
    with RegistryClient(registry) as client:
        good = client.publish(data, "incompatible")
        with pytest.raises(IncompatibleVersionError, match="structure"):
            client.fetch_theta("incompatible", good.number, like=other)
