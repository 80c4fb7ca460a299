"""TLS from certificate files: a self-signed certificate made with the openssl CLI."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from mnemosyne_core.registry_client import RegistryClient, RegistryClientError
from service.registry.server import create_server, shutdown

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
            v = client.publish(b"over tls" * 100, "tls-opt")
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
