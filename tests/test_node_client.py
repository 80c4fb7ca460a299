"""The Node client (clients/node, written from registry.proto alone) against a live registry server.

The server is ``mnemosyne registry serve --port 0`` in a subprocess; Node runs
``clients/node/registry_client.mjs`` and the Python client checks what it did
(and the other way round). Without ``node`` (or npm to install the pinned
packages) these tests skip, unless ``MNEMOSYNE_REQUIRE_NODE`` is set (CI): then
they fail. Missing or stale ``clients/node/node_modules`` is installed with
``npm ci`` from the committed package-lock.json.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import jax
import pytest

from mnemosyne_core import checkpoint
from mnemosyne_core.mnemosyne import MnemosyneConfig, init_theta
from mnemosyne_registry import RegistryClient, RegistryClientError

pytestmark = pytest.mark.xdist_group("registry")
ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "clients" / "node"
SCRIPT = NODE_DIR / "registry_client.mjs"
TOKEN = "node-test-token"
MIB = 1 << 20
OPAQUE = {"compatibility": {"format": "opaque"}}  # test bytes, not checkpoints


def _unavailable(reason: str):
    if os.environ.get("MNEMOSYNE_REQUIRE_NODE", "") not in ("", "0"):
        pytest.fail(f"{reason}, and MNEMOSYNE_REQUIRE_NODE is set")
    pytest.skip(f"{reason} (set MNEMOSYNE_REQUIRE_NODE=1 to fail instead)")


def _installed() -> bool:
    """Every dependency pinned in package.json is in node_modules at that version."""
    pinned = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]
    for package, version in pinned.items():
        manifest = NODE_DIR / "node_modules" / package / "package.json"
        if not manifest.exists() or json.loads(manifest.read_text()).get("version") != version:
            return False
    return True


@pytest.fixture(scope="module")
def node() -> str:
    binary = shutil.which("node")
    if binary is None:
        _unavailable("node is not installed")
    lock_path = ROOT / ".cache" / "npm-ci.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one `npm ci` at a time, however many pytest runs
        if not _installed():
            npm = shutil.which("npm")
            if npm is None:
                _unavailable("npm is not installed (needed once for clients/node/node_modules)")
            try:
                done = subprocess.run(
                    [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error", "--prefix", str(NODE_DIR)],
                    check=False, capture_output=True, text=True, timeout=300,
                    env={**os.environ, "npm_config_update_notifier": "false"})
            except subprocess.TimeoutExpired:
                _unavailable("`npm ci --prefix clients/node` took over 300 s")
            if done.returncode != 0 or not _installed():
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                _unavailable(f"`npm ci --prefix clients/node` failed: {' / '.join(tail)}")
    return binary


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("node-registry")
    token_file = tmp / "tokens"
    token_file.write_text(f"{TOKEN}\n")
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main(sys.argv[1:]))",
         "registry", "serve", "--data", str(tmp / "data"), "--port", "0", "--token-file", str(token_file),
         "--grace", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first: list[str] = []
    reader = threading.Thread(target=lambda: first.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(60)
    line = first[0] if first else ""
    if not line.startswith("mnemosyne registry listening on grpc://127.0.0.1:"):
        proc.kill()
        pytest.fail(f"registry server did not start: {line!r} {proc.communicate()[1][-2000:]}")
    target = line.split()[-1]
    yield target
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


@pytest.fixture
def python_client(server):
    with RegistryClient(server, token=TOKEN) as client:
        yield client


def node_env() -> dict[str, str]:
    """The environment without registry settings: the target and token come from the command line only."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MNEMOSYNE_REGISTRY")}


def run_node(node, server, *args, token=TOKEN, timeout=60) -> subprocess.CompletedProcess:
    argv = [node, str(SCRIPT), "--target", server]
    if token is not None:
        argv += ["--token", token]
    return subprocess.run([*argv, *args], check=False, capture_output=True, text=True, timeout=timeout,
                          env=node_env(), cwd=NODE_DIR)


def json_lines(done: subprocess.CompletedProcess) -> list[dict]:
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_demo_publishes_what_python_fetches(node, server, python_client, tmp_path):
    # A real checkpoint: the server checks it and fills its compatibility record from its header.
    config = MnemosyneConfig()
    data = checkpoint.to_bytes(init_theta(jax.random.key(0), config), config)
    header, _ = checkpoint.read_header(data)
    artifact = tmp_path / "artifact.msgpack"
    artifact.write_bytes(data)
    [summary] = json_lines(run_node(node, server, "demo", "--file", str(artifact), "--name", "node-demo"))
    digest = hashlib.sha256(data).hexdigest()
    number = int(summary["number"])
    assert summary["sha256"] == digest and summary["size"] == str(len(data))
    # Python sees the version Node published, with the same bytes, sha256 and metadata.
    version = python_client.get_version("node-demo", number)
    assert version.sha256 == digest and version.size == len(data)
    assert dict(version.metadata.tags) == {"client": "node"}
    compat = version.metadata.compatibility
    assert compat.format == "mnemosyne-checkpoint" and compat.theta_fingerprint == header["theta_fingerprint"]
    assert json.loads(compat.architecture_spec_json) == header["architecture"]
    # The alias Node set is Python's too.
    fetched_version, fetched = python_client.fetch("node-demo", "best")
    assert fetched_version.number == number and bytes(fetched) == data
    assert summary["listed"] is True and summary["versions"] == [str(number)]
    assert summary["alias"] == {"alias": "best", "version": str(number)}
    assert summary["fetched"] == {"number": str(number), "verified": True, "identical": True}
    half = len(data) // 2
    assert summary["resumed"] == {"number": str(number), "offset": str(half), "received": str(len(data) - half)}
    assert summary["watched"]["version"] == str(number) and summary["watched"]["deleted"] is False


def test_node_alias_and_list_match_python(node, server, python_client):
    for i in range(2):
        python_client.publish(f"aliased by node {i}".encode(), "node-alias", OPAQUE)
    [alias] = json_lines(run_node(node, server, "alias", "--name", "node-alias", "--alias", "production",
                                  "--version", "1"))
    assert (alias["alias"], alias["version"]) == ("production", "1")
    assert python_client.get_version("node-alias", "production").number == 1
    optimizers = {o["name"]: o for o in json_lines(run_node(node, server, "list"))}
    assert optimizers["node-alias"]["aliases"] == {"latest": "2", "production": "1"}
    assert optimizers["node-alias"]["latest_version"] == "2"
    versions = json_lines(run_node(node, server, "list", "--name", "node-alias"))
    assert [(v["number"], sorted(v["aliases"])) for v in versions] == [("1", ["production"]), ("2", ["latest"])]
    assert [v["sha256"] for v in versions] == [v.sha256 for v in python_client.list("node-alias")]


def test_node_resumes_a_fetch_from_an_offset(node, server, python_client, tmp_path):
    first, second = os.urandom(3 * MIB + 777), os.urandom(5000)
    python_client.publish(first, "node-resume", OPAQUE)
    python_client.publish(second, "node-resume", OPAQUE)  # `latest` is 2; `best` stays on 1
    python_client.set_alias("node-resume", "best", 1)
    part = tmp_path / "part.bin"
    for offset in (1, 70_000, MIB + 3, len(first) - 1, len(first)):
        part.write_bytes(first[:offset])
        [result] = json_lines(run_node(node, server, "fetch", "--name", "node-resume", "--ref", "best",
                                       "--out", str(part), "--offset", str(offset)))
        assert part.read_bytes() == first
        assert result == {"name": "node-resume", "number": "1", "sha256": hashlib.sha256(first).hexdigest(),
                          "size": str(len(first)), "offset": str(offset), "received": str(len(first) - offset),
                          "verified": True}
    [latest] = json_lines(run_node(node, server, "fetch", "--name", "node-resume", "--out", str(part)))
    assert latest["number"] == "2" and part.read_bytes() == second
    # Wrong bytes before the offset: the sha256 check fails and the file is removed, not kept for a resume.
    part.write_bytes(b"\0" * 1000)
    done = run_node(node, server, "fetch", "--name", "node-resume", "--ref", "1", "--out", str(part),
                    "--offset", "1000")
    assert done.returncode == 3 and done.stderr.startswith("integrity error: sha256 mismatch")
    assert done.stderr.count("\n") == 1 and not part.exists()


def test_node_watch_sees_moves_made_by_python(node, server, python_client):
    for i in range(3):
        python_client.publish(f"watched {i}".encode(), "node-watch", OPAQUE)
    python_client.set_alias("node-watch", "production", 1)
    proc = subprocess.Popen(
        [node, str(SCRIPT), "--target", server, "watch", "--name", "node-watch", "--alias", "production",
         "--count", "3", "--timeout", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=NODE_DIR, env=node_env())
    try:
        first = json.loads(proc.stdout.readline())  # the current target: the watch is subscribed
        assert (first["version"], first["deleted"]) == ("1", False)
        python_client.set_alias("node-watch", "production", 2)
        python_client.delete_alias("node-watch", "production")
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    events = [first, *(json.loads(line) for line in out.splitlines())]
    assert [(e["version"], e["deleted"]) for e in events] == [("1", False), ("2", False), ("0", True)]
    assert all(e["name"] == "node-watch" and e["alias"] == "production" for e in events)
    sequences = [int(e["sequence"]) for e in events]
    assert sequences == sorted(set(sequences))


def test_node_errors_are_one_line_with_the_status_name(node, server, python_client, tmp_path):
    artifact = tmp_path / "denied.bin"
    artifact.write_bytes(os.urandom(3 * MIB))
    for token in ("wrong-token", None):
        done = run_node(node, server, "publish", "--file", str(artifact), "--name", "node-denied",
                        "--metadata", json.dumps(OPAQUE), token=token)
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr.startswith("grpc error: UNAUTHENTICATED: ") and done.stderr.count("\n") == 1
    with pytest.raises(RegistryClientError) as info:
        python_client.get_version("node-denied")
    assert info.value.code == "NOT_FOUND"  # nothing was published
    python_client.publish(b"one version", "node-errors", OPAQUE)
    cases = [
        (("alias", "--name", "node-errors", "--alias", "best", "--version", "1"), "wrong-token", "UNAUTHENTICATED"),
        (("fetch", "--name", "no-such-optimizer", "--out", str(tmp_path / "x")), TOKEN, "NOT_FOUND"),
        (("alias", "--name", "node-errors", "--alias", "best", "--version", "7"), TOKEN, "NOT_FOUND"),
        (("alias", "--name", "node-errors", "--alias", "latest", "--version", "1"), TOKEN, "FAILED_PRECONDITION"),
        # uint64 travels as a decimal string: 2^64-1 reaches the server intact and is refused there.
        (("alias", "--name", "node-errors", "--alias", "best", "--version", str(2**64 - 1)), TOKEN,
         "INVALID_ARGUMENT"),
        (("watch", "--name", "no-such-optimizer", "--alias", "best", "--timeout", "10"), TOKEN, "NOT_FOUND"),
    ]
    for args, token, code in cases:
        done = run_node(node, server, *args, token=token)
        assert done.returncode == 1 and done.stderr.startswith(f"grpc error: {code}: "), (args, done.stderr)
        assert done.stderr.count("\n") == 1
        if code == "INVALID_ARGUMENT":
            assert "2^63-1" in done.stderr
    with pytest.raises(RegistryClientError):
        python_client.get_version("node-errors", "best")  # none of the refused alias calls landed
