"""TLS from certificate files: a self-signed certificate made with the openssl CLI."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from mnemosyne_registry import RegistryClient, RegistryClientError
from service.registry.server import create_server, shutdown

OPAQUE = {"compatibility": {"format": "opaque"}}  # test bytes, not checkpoints

pytestmark = pytest.mark.xdist_group("registry")


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make a test certificate")
    tmp = tmp_path_factory.mktemp("tls")
    key, crt = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return key, crt


def test_tls_server_with_bearer_token(cert, tmp_path):
    key, crt = cert
    srv, port = create_server(tmp_path, port=0, tokens=("tls-token",), tls_cert=crt.read_bytes(), tls_key=key.read_bytes())
    srv.start()
    try:
        with RegistryClient(f"grpcs://127.0.0.1:{port}", token="tls-token", tls_ca=crt) as client:
            v = client.publish(b"over tls" * 100, "tls-opt", OPAQUE)
            assert client.fetch("tls-opt", v.number)[1] == b"over tls" * 100
        # A plaintext client can't talk to the TLS port.
        with RegistryClient(f"grpc://127.0.0.1:{port}", timeout=5) as plain:
            with pytest.raises(RegistryClientError) as info:
                plain.list()
            assert info.value.code == "UNAVAILABLE"
        # Nor can a client that doesn't trust the certificate (system roots only).
        with RegistryClient(f"grpcs://127.0.0.1:{port}", timeout=5) as untrusting:
            with pytest.raises(RegistryClientError) as info:
                untrusting.list()
            assert info.value.code == "UNAVAILABLE"
    finally:
        shutdown(srv, grace=1)


def test_tls_needs_cert_and_key(tmp_path):
    with pytest.raises(ValueError, match="both"):
        create_server(tmp_path, port=0, tls_cert=b"cert only")


def test_grpcs_uris_trust_the_ca_in_the_environment(cert, tmp_path, monkeypatch):
    """``train-policy --optimizer`` and ``meta-train --init-from`` load ``grpcs://`` URIs through
    ``mnemosyne_core.load``, which takes no CA argument: ``$MNEMOSYNE_REGISTRY_CA`` supplies it."""
    import jax
    import numpy as np

    from mnemosyne_core import checkpoint, loading
    from mnemosyne_core.pretrained import SUPERSEDED_DIR
    from service.robotics.optimizers import OptimizerSpecError, resolve_optimizer

    key, crt = cert
    tls_srv, tls_port = create_server(tmp_path / "tls", port=0, tls_cert=crt.read_bytes(), tls_key=key.read_bytes())
    plain_srv, plain_port = create_server(tmp_path / "plain", port=0)
    tls_srv.start()
    plain_srv.start()
    try:
        with RegistryClient(f"grpcs://127.0.0.1:{tls_port}", tls_ca=crt) as client:
            client.publish(SUPERSEDED_DIR / "default_v1.msgpack", "parent")
        uri = f"grpcs://127.0.0.1:{tls_port}/parent"
        monkeypatch.delenv("MNEMOSYNE_REGISTRY_CA", raising=False)
        with pytest.raises(OptimizerSpecError, match="UNAVAILABLE"):  # the system roots don't trust it
            resolve_optimizer(uri)

        monkeypatch.setenv("MNEMOSYNE_REGISTRY_CA", str(crt))
        _, info = resolve_optimizer(uri)
        assert info["kind"] == "mnemosyne"
        theta, _, _ = loading.load(uri)
        jax.tree.map(np.testing.assert_array_equal, theta, checkpoint.load(SUPERSEDED_DIR / "default_v1.msgpack")[0])
        # The CA applies to grpcs:// only: a plaintext target stays plaintext.
        with RegistryClient(f"grpc://127.0.0.1:{plain_port}", timeout=5) as plain:
            assert plain.list() is not None

        monkeypatch.setenv("MNEMOSYNE_REGISTRY_CA", str(tmp_path / "missing.pem"))
        with pytest.raises(OptimizerSpecError, match="cannot read MNEMOSYNE_REGISTRY_CA=.*missing.pem"):
            resolve_optimizer(uri)
    finally:
        shutdown(tls_srv, grace=1)
        shutdown(plain_srv, grace=1)
