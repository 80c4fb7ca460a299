"""A server shutdown ends watch streams with UNAVAILABLE, and ``registry watch`` reports it (issue 23, 4)."""
from __future__ import annotations

import pytest

from mnemosyne_registry import RegistryClient, RegistryClientError
from service import cli
from service.registry.server import create_server, shutdown

OPAQUE = {"compatibility": {"format": "opaque"}}  # test bytes, not checkpoints

pytestmark = pytest.mark.xdist_group("registry")


@pytest.fixture
def served(tmp_path):
    srv, port = create_server(tmp_path, port=0)
    srv.start()
    client = RegistryClient(f"grpc://127.0.0.1:{port}")
    client.publish(b"watched bytes", "w", OPAQUE)
    client.set_alias("w", "prod", 1)
    yield srv, port, client
    client.close()
    shutdown(srv, grace=1)


def test_shutdown_ends_a_watch_with_unavailable_not_a_quiet_end(served):
    srv, _, client = served
    watch = client.watch("w", "prod")
    first = next(watch)
    assert first.version == 1
    srv.registry.close()  # what shutdown() does first
    with pytest.raises(RegistryClientError) as info:
        next(watch)
    assert info.value.code == "UNAVAILABLE"
    assert f"shutting down; watch of w@prod ended after sequence {first.sequence}" in info.value.message


def test_cli_watch_exits_non_zero_with_one_line_when_the_server_shuts_down(served, capsys):
    srv, port, _ = served
    srv.registry.close()  # a watch that starts during shutdown is refused at once
    code = cli.main(["registry", "watch", "w@prod", "--registry", f"grpc://127.0.0.1:{port}"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert "UNAVAILABLE" in err and "shutting down" in err and len(err.strip().splitlines()) == 1
