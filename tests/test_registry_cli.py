"""``mnemosyne registry ...`` through ``service.cli.main`` against a server on port 0."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import pytest

from mnemosyne_core import checkpoint
from mnemosyne_core.baselines import LSTMConfig, init_lstm_theta
from service import cli
from service.registry.server import create_server, shutdown

OPAQUE = {"compatibility": {"format": "opaque"}}  # test bytes, not checkpoints

pytestmark = pytest.mark.xdist_group("registry")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    token_file = tmp / "token"
    token_file.write_text("# the CI token\ncli-secret\n")
    srv, port = create_server(tmp / "data", port=0, tokens=("cli-secret",))
    srv.start()
    yield {"registry": f"grpc://127.0.0.1:{port}", "token": str(token_file), "tmp": tmp}
    shutdown(srv, grace=1)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["registry", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_push_list_alias_pull(env, capsys, tmp_path):
    reg, tok = ["--registry", env["registry"]], ["--token-file", env["token"]]
    artifact = tmp_path / "opt.msgpack"
    checkpoint.save(artifact, init_lstm_theta(jax.random.key(0), LSTMConfig(hidden_size=4)), LSTMConfig(hidden_size=4))
    code, out, _ = run(capsys, "push", str(artifact), "--name", "cli-opt", *reg, *tok)
    assert code == 0 and out.startswith(f"pushed cli-opt:1 ({artifact.stat().st_size} bytes")
    code, out, _ = run(capsys, "push", str(artifact), "--name", "cli-opt", "--alias", "best", *reg, *tok,
                       "--metadata", '{"lineage": {"run_id": "r42", "generation": 7}}')
    assert code == 0 and "cli-opt:2" in out and "best" in out
    code, out, _ = run(capsys, "list", *reg)
    assert code == 0 and out.splitlines() == ["cli-opt\tlatest=2\tbest=2"]  # latest once, in its column
    code, out, _ = run(capsys, "list", "cli-opt", *reg)
    lines = out.splitlines()
    assert code == 0 and [line.split("\t")[0] for line in lines] == ["cli-opt:1", "cli-opt:2"]
    _, out, _ = run(capsys, "list", "cli-opt", "--json", *reg)
    assert '"run_id": "r42"' in out.splitlines()[1]
    code, out, _ = run(capsys, "alias", "cli-opt", "production", "1", *reg, *tok)
    assert (code, out.strip()) == (0, "cli-opt@production -> 1")
    for ref, expected in (("cli-opt@production", "cli-opt:1"), ("cli-opt:2", "cli-opt:2"), ("cli-opt", "cli-opt:2")):
        target = tmp_path / "pulled.bin"
        code, out, _ = run(capsys, "pull", ref, "-o", str(target), *reg)
        assert code == 0 and out.startswith(f"pulled {expected} ->") and "sha256 verified" in out
        assert target.read_bytes() == artifact.read_bytes()
    code, out, _ = run(capsys, "alias", "cli-opt", "production", "--delete", *reg, *tok)
    assert (code, out.strip()) == (0, "deleted cli-opt@production")


def test_watch_prints_moves(env, capsys, tmp_path):
    reg, tok = ["--registry", env["registry"]], ["--token-file", env["token"]]
    artifact = tmp_path / "w.bin"
    artifact.write_bytes(b"watch me")
    for _ in range(2):
        assert run(capsys, "push", str(artifact), "--name", "cli-watch", "--opaque", *reg, *tok)[0] == 0
    assert run(capsys, "alias", "cli-watch", "best", "1", *reg, *tok)[0] == 0
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main(sys.argv[1:]))",
         "registry", "watch", "cli-watch@best", "--count", "3", *reg],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()  # subscribed once the current target is printed
    assert first.split("\t")[1] == "cli-watch@best -> 1" and first.rstrip().split("\t")[2].startswith("seq=")
    assert run(capsys, "alias", "cli-watch", "best", "2", *reg, *tok)[0] == 0
    assert run(capsys, "alias", "cli-watch", "best", "--delete", *reg, *tok)[0] == 0
    rest, err = proc.communicate()
    assert proc.returncode == 0, err
    assert [line.split("\t")[1] for line in rest.splitlines()] == ["cli-watch@best -> 2", "cli-watch@best -> deleted"]


@pytest.mark.parametrize("argv,code,message", [
    (["push", "{missing}", "--name", "x"], 2, "cannot read file"),
    (["push", "{artifact}", "--name", "bad name", "--opaque"], 1, "INVALID_ARGUMENT: invalid optimizer name"),
    (["push", "{artifact}", "--name", "x", "--metadata", "{not json"], 2, "--metadata is not valid JSON"),
    (["push", "{artifact}", "--name", "x", "--opaque", "--metadata", '{"lineage": {"generation": "many"}}'], 2,
     "invalid --metadata"),
    # Issue 23 defect 1: checked here before sending, and by the server.
    (["push", "{artifact}", "--name", "x"], 2, "a.bin is not a Mnemosyne checkpoint the registry accepts"),
    (["push", "{artifact}", "--name", "x", "--opaque", "--metadata", '{"lineage": {"parent_version": 999}}'], 1,
     "INVALID_ARGUMENT: lineage.parent_version 999: optimizer 'x' has no such version"),
    (["push", "{artifact}", "--name", "x", "--opaque", "--metadata", '{"lineage": {"eval_metrics": {"l": "NaN"}}}'],
     1, "INVALID_ARGUMENT: lineage.eval_metrics['l'] must be a finite number"),
    (["pull", "nothing-here@best", "-o", "{out}"], 1, "NOT_FOUND: unknown optimizer 'nothing-here'"),
    (["pull", "x@@", "-o", "{out}"], 2, "invalid optimizer reference"),
    (["pull", "x:99999999999999999999999", "-o", "{out}"], 2, "(1 <= VERSION <= 2^63-1)"),
    (["pull", "x:9223372036854775808", "-o", "{out}"], 2, "invalid optimizer reference"),
    (["alias", "x", "best"], 2, "give either VERSION or --delete"),
    (["alias", "x", "latest", "1"], 1, "FAILED_PRECONDITION"),
    (["watch", "x:3"], 2, "watch needs NAME@ALIAS"),
    (["push", "{artifact}", "--name", "n" * 10_000 + "!", "--opaque"], 1, "… (10001 characters): use 1-128"),
])
def test_bad_input_gives_one_line_and_nonzero_exit(env, capsys, tmp_path, argv, code, message):
    artifact = tmp_path / "a.bin"
    artifact.write_bytes(b"a")
    run(capsys, "push", str(artifact), "--name", "x", "--opaque", "--registry", env["registry"], "--token-file", env["token"])
    subs = {"missing": str(tmp_path / "missing.bin"), "artifact": str(artifact), "out": str(tmp_path / "o")}
    argv = [a.format(**subs) if a.startswith("{") and a.endswith("}") and a[1:-1] in subs else a for a in argv]
    got, out, err = run(capsys, *argv, "--registry", env["registry"], "--token-file", env["token"])
    assert got == code and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert len(err) < 400  # a long name is cut in the message, not echoed in full
    assert not (tmp_path / "o").exists()


def test_missing_token_and_unreachable_registry(env, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("MNEMOSYNE_REGISTRY_TOKEN", raising=False)
    artifact = tmp_path / "a.bin"
    artifact.write_bytes(b"a")
    code, _, err = run(capsys, "push", str(artifact), "--name", "x", "--opaque", "--registry", env["registry"])
    assert code == 1 and err.count("\n") == 1 and "UNAUTHENTICATED: missing bearer token" in err
    code, _, err = run(capsys, "list", "--registry", "grpc://127.0.0.1:1")
    assert code == 1 and err.count("\n") == 1 and "cannot reach registry at grpc://127.0.0.1:1" in err
    code, _, err = run(capsys, "list", "--registry", "http://nope")
    assert code == 2 and "invalid registry address" in err


def test_registry_address_from_environment(env, capsys, monkeypatch):
    monkeypatch.setenv("MNEMOSYNE_REGISTRY", env["registry"])
    code, _, _ = run(capsys, "list")
    assert code == 0


def test_serve_rejects_bad_options(capsys, tmp_path):
    empty = tmp_path / "empty-token"
    empty.write_text("\n# nothing\n")
    cases = [
        (["serve", "--data", str(tmp_path), "--tls-cert", "c.pem"], "--tls-cert and --tls-key must be given together"),
        (["serve", "--data", str(tmp_path), "--token-file", str(empty)], "contains no token"),
        (["serve", "--data", str(tmp_path), "--read-token-required"], "--read-token-required needs --token-file"),
        (["serve", "--data", str(tmp_path), "--token-file", str(tmp_path / "absent")], "cannot read token file"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and message in err, err


def test_serve_reports_a_busy_port(env, capsys, tmp_path):
    port = env["registry"].rsplit(":", 1)[1]
    code, _, err = run(capsys, "serve", "--data", str(tmp_path), "--port", port)
    assert code == 1 and err.count("\n") == 1 and "could not bind" in err


def test_serve_stops_gracefully_on_sigterm_ending_watches(tmp_path):
    import signal

    from mnemosyne_registry import RegistryClient, RegistryClientError

    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main(sys.argv[1:]))",
         "registry", "serve", "--data", str(tmp_path), "--port", "0", "--grace", "30"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("mnemosyne registry listening on grpc://127.0.0.1:")
    with RegistryClient(line.split()[-1]) as client:
        client.publish(b"v1", "graceful", OPAQUE)
        watch = client.watch("graceful", "latest")
        assert next(watch).version == 1
        proc.send_signal(signal.SIGTERM)
        # The server ends open watch streams at once (not after --grace), as UNAVAILABLE, not a quiet end.
        with pytest.raises(RegistryClientError, match="shutting down"):
            list(watch)
    _, err = proc.communicate()
    assert proc.returncode == 0 and "stopped" in err
