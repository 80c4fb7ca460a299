"""``meta-train --publish`` cannot lose a run (issue 32): the registry is checked before training,
publishing retries with backoff in the background, and what it could not publish is listed with
the command that publishes it. The fault test kills the registry (SIGKILL) in the middle of a run
and restarts it: the run finishes, every version it reports is in the registry, none twice.
"""
from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("grpc")

from mnemosyne_core.meta.trainer import MetaTrainer
from mnemosyne_registry import RegistryClient, RegistryClientError
from service import cli
from service.registry.server import create_server, shutdown

LISTEN = re.compile(r"listening on grpcs?://\S+:(\d+)")
CONFIG = """generations = {generations}
checkpoint_every = 1
publish_every = 1
[optimizer.config]
learning_rate = 0.05
[estimator]
num_pairs = 2
truncation = 5
[tasks]
specs = [{{name = "quadratic", kwargs = {{dim = 4}}}}]
min_unroll = 5
max_unroll = 10
"""


def _config(tmp_path: Path, generations: int) -> Path:
    path = tmp_path / "pub.toml"
    path.write_text(CONFIG.format(generations=generations))
    return path


def _serve(data: Path, port: int = 0) -> tuple[subprocess.Popen, int]:
    """``mnemosyne registry serve`` in its own process (so that it can be SIGKILLed)."""
    data.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "registry", "serve", "--data", str(data),
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise RuntimeError(f"registry exited with {proc.returncode}")
        match = LISTEN.search(line)
        if match:
            return proc, int(match.group(1))
    proc.kill()
    raise RuntimeError("registry did not start")


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def _after_generation(monkeypatch, hooks: dict[int, callable]) -> None:
    """Run ``hooks[g]()`` right after generation g has been evaluated (before it is published)."""
    original = MetaTrainer.step

    def step(self):
        row = original(self)
        hook = hooks.get(row["generation"])
        if hook is not None:
            hook()
        return row

    monkeypatch.setattr(MetaTrainer, "step", step)


def _meta_train(capsys, cfg, out, *extra):
    code = cli.main(["meta-train", "--config", str(cfg), "--out", str(out), "--no-progress", *map(str, extra)])
    stdout, err = capsys.readouterr()
    return code, stdout, err


def _reported(stdout: str) -> list[tuple[int, int]]:
    """(version, generation) pairs of the run's 'published NAME versions … (generations …)' line."""
    match = re.search(r"published \S+ versions ([\d, ]+) \(generations ([\d, ]+)\)", stdout)
    assert match, stdout
    numbers = [int(x) for x in match.group(1).split(",")]
    gens = [int(x) for x in match.group(2).split(",")]
    return list(zip(numbers, gens))


def _wait_for_version(port: int, name: str, number: int, timeout: float = 60.0) -> None:
    with RegistryClient(f"127.0.0.1:{port}") as client:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.get_version(name).number >= number:
                    return
            except RegistryClientError:  # NOT_FOUND until the background publisher is through
                pass
            assert time.monotonic() < deadline, f"{name} version {number} never appeared"
            time.sleep(0.05)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- row 4, at start: a registry that is down, a wrong token, a bad name ---------------------------------
def test_publish_to_a_registry_that_is_down_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = _meta_train(capsys, _config(tmp_path, 50), out, "--publish",
                                    f"grpc://127.0.0.1:{_free_port()}/opt")
    assert code == 1
    assert err.count("\n") == 1 and "registry unreachable (UNAVAILABLE" in err and "Traceback" not in err
    assert not out.exists() and stdout == ""  # refused before generation 0: nothing trained or written


def test_publish_checks_token_and_name_before_training(tmp_path, capsys):
    server, port = create_server(tmp_path / "reg", port=0, tokens=("secret",))
    server.start()
    try:
        cfg = _config(tmp_path, 1)
        code, _, err = _meta_train(capsys, cfg, tmp_path / "a", "--publish", f"grpc://127.0.0.1:{port}/opt",
                                   "--token", "wrong")
        assert code == 2 and err.count("\n") == 1 and "refused the token" in err and "UNAUTHENTICATED" not in err[:20]
        assert not (tmp_path / "a").exists()
        code, _, err = _meta_train(capsys, cfg, tmp_path / "b", "--publish", f"grpc://127.0.0.1:{port}/-bad",
                                   "--token", "secret")
        assert code == 2 and err.count("\n") == 1 and "-bad" in err and not (tmp_path / "b").exists()
        code, _, err = _meta_train(capsys, cfg, tmp_path / "c", "--publish", "http://127.0.0.1:1/x")
        assert code == 2 and "--publish needs grpc://HOST:PORT/NAME" in err
        # The check itself changes nothing: the name has no version and no alias after it.
        with RegistryClient(f"127.0.0.1:{port}") as client:
            assert list(client.list_optimizers()) == []
        code, stdout, err = _meta_train(capsys, cfg, tmp_path / "d", "--publish", f"grpc://127.0.0.1:{port}/opt",
                                        "--token", "secret")
        assert code == 0, err
        assert _reported(stdout) == [(1, 1)]
    finally:
        shutdown(server, grace=1.0)


# --- row 4, mid-run: the registry goes away for good ----------------------------------------------------
def test_registry_gone_mid_run_training_goes_on_and_the_end_says_how_to_push(tmp_path, capsys, monkeypatch):
    data = tmp_path / "reg"
    proc, port = _serve(data)
    try:
        def gone():  # once generation 1's version is in, the registry goes away for good
            _wait_for_version(port, "gone", 1)
            _kill(proc)

        _after_generation(monkeypatch, {1: gone})
        out = tmp_path / "run"
        code, stdout, err = _meta_train(capsys, _config(tmp_path, 4), out, "--publish",
                                        f"grpc://127.0.0.1:{port}/gone", "--publish-wait", "1")
    finally:
        _kill(proc)
    assert code == 1
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 4  # training went on to the end
    assert (out / "optimizer.msgpack").exists() and "wrote" in stdout
    assert "Traceback" not in err
    assert _reported(stdout) == [(1, 1)]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"mnemosyne: error: not published to grpc://127.0.0.1:{port}/gone: generations 2, 3, 4 ")
    command = last.split("publish with: ", 1)[1].split(" (and generations", 1)[0]
    assert command.startswith("mnemosyne registry push ") and "--name gone" in command
    assert shlex.quote(str(out / "publish" / "gone-g000002.msgpack")) in command
    for g in (2, 3):  # the other snapshots are where the line says, with their metadata
        assert (out / "publish" / f"gone-g{g:06d}.msgpack").exists()
        assert (out / "publish" / f"gone-g{g:06d}.metadata.json").exists()
    assert (out / "optimizer.metadata.json").exists()  # the final one (generation 4)
    assert not (out / "publish" / "gone-g000001.msgpack").exists()  # published: not kept twice

    # The registry comes back on the same port; the printed command publishes the snapshot, with lineage.
    proc, _ = _serve(data, port)
    try:
        shell = command.replace("mnemosyne registry push", f"{shlex.quote(sys.executable)} -m service.cli "
                                                           "registry push", 1)
        done = subprocess.run(["bash", "-c", shell], check=False, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        with RegistryClient(f"127.0.0.1:{port}") as client:
            version = client.get_version("gone")
            assert version.number == 2 and version.metadata.lineage.generation == 2
            assert version.metadata.lineage.parent_version == 1
    finally:
        _kill(proc)


# --- deliverable 5: the fault test ------------------------------------------------------------------------
def test_registry_killed_and_restarted_mid_run_nothing_lost_nothing_twice(tmp_path, capsys, monkeypatch):
    data = tmp_path / "reg"
    state = {}
    state["proc"], port = _serve(data)

    def kill():
        _kill(state["proc"])

    def restart():
        state["proc"], _ = _serve(data, port)

    _after_generation(monkeypatch, {2: kill, 5: restart})  # down for generations 3..5's publishes
    try:
        code, stdout, err = _meta_train(capsys, _config(tmp_path, 8), tmp_path / "run", "--publish",
                                        f"grpc://127.0.0.1:{port}/fault", "--publish-wait", "120")
        assert code == 0, err
        assert "retrying with backoff" in err and "registry is back" in err and "Traceback" not in err
        reported = _reported(stdout)
        # Every publish point (after generations 1..7, and the final 8) is reported, in order.
        assert [g for _, g in reported] == list(range(1, 9))
        with RegistryClient(f"127.0.0.1:{port}") as client:
            versions = list(client.list_versions("fault"))
            by_number = {v.number: v for v in versions}
            for number, generation in reported:  # what it reports is there, as that generation
                assert by_number[number].metadata.lineage.generation == generation
            # Nothing twice: one version per generation, each artifact once.
            assert len(versions) == len(reported) == 8
            assert len({v.sha256 for v in versions}) == 8
            assert len({v.metadata.lineage.generation for v in versions}) == 8
            # The lineage chain follows what was really published.
            for v in versions[1:]:
                assert v.metadata.lineage.parent_version == v.number - 1
            latest = client.get_version("fault")
            assert latest.number == 8 and latest.metadata.lineage.generation == 8
    finally:
        _kill(state["proc"])
