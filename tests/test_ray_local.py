"""LocalRayHead start-up: retry, time-out and clean-up, with stand-in ``ray`` executables.

The stand-ins are small shell scripts that behave like ``ray start --head --block`` does when it
fails, hangs or comes up (write ``ray_current_cluster`` into ``--temp-dir`` and log
"Ray runtime started"), so these checks run in well under a second and need no Ray session.
"""
from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import psutil
import pytest

from service.ray_local import LocalRayHead, RayHeadError

# Shared prologue: count the calls, remember the pid, find --temp-dir.
PROLOGUE = """#!/usr/bin/env bash
echo $$ >> "$FAKE_RAY_DIR/pids"
n=$(( $(cat "$FAKE_RAY_DIR/calls" 2>/dev/null || echo 0) + 1 )); echo $n > "$FAKE_RAY_DIR/calls"
while [ $# -gt 0 ]; do [ "$1" = "--temp-dir" ] && tmp="$2"; shift; done
echo "$tmp" >> "$FAKE_RAY_DIR/tmpdirs"
"""
COMES_UP = """echo "127.0.0.1:6$n$n$n$n" > "$tmp/ray_current_cluster"
echo "Ray runtime started."
exec sleep 60
"""
SCRIPTS = {
    "fails": PROLOGUE + 'echo "raylet did not register in time"; exit 3\n',
    "hangs": PROLOGUE + "exec sleep 60\n",
    # Like a ``ray start`` that launched its GCS and then gave up: the daemon outlives it.
    "fails_leaving_a_daemon": PROLOGUE + 'sleep 60 & echo $! > "$FAKE_RAY_DIR/daemon"; exit 3\n',
    "fails_once": PROLOGUE + '[ "$n" = 1 ] && { echo "raylet did not register in time"; exit 3; }\n' + COMES_UP,
}


@pytest.fixture
def fake_ray(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_RAY_DIR", str(tmp_path))

    def make(kind: str) -> str:
        path = tmp_path / f"ray_{kind}"
        path.write_text(SCRIPTS[kind])
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
        return str(path)

    return make


def _lines(tmp_path: Path, name: str) -> list[str]:
    return (tmp_path / name).read_text().split()


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_head_that_keeps_exiting_fails_after_the_given_attempts(fake_ray, tmp_path):
    head = LocalRayHead(ray_executable=fake_ray("fails"))
    with pytest.raises(RayHeadError, match=r"exited with 3: .*raylet did not register"):
        head.start(attempts=3)
    assert _lines(tmp_path, "calls") == ["3"]
    # Each attempt had a clean directory of its own, and none is left behind.
    dirs = _lines(tmp_path, "tmpdirs")
    assert len(set(dirs)) == 3
    assert not any(os.path.exists(d) for d in dirs)
    assert head.address is None and head.proc is None


def test_a_head_that_never_comes_up_times_out_and_is_stopped(fake_ray, tmp_path):
    head = LocalRayHead(ray_executable=fake_ray("hangs"))
    start = time.monotonic()
    with pytest.raises(RayHeadError, match=r"not up after 0.5 s"):
        head.start(timeout=0.5, attempts=1)
    assert time.monotonic() - start < 30  # the 60 s sleep was not waited for
    (pid,) = map(int, _lines(tmp_path, "pids"))
    assert _gone(pid)


def test_daemons_of_a_head_that_exited_are_stopped_too(fake_ray, tmp_path):
    head = LocalRayHead(ray_executable=fake_ray("fails_leaving_a_daemon"))
    with pytest.raises(RayHeadError, match="exited with 3"):
        head.start(attempts=1)
    (daemon,) = map(int, _lines(tmp_path, "daemon"))
    psutil.wait_procs([psutil.Process(daemon)] if not _gone(daemon) else [], timeout=5)
    assert _gone(daemon)


def test_a_failed_first_start_is_retried(fake_ray, tmp_path):
    head = LocalRayHead(ray_executable=fake_ray("fails_once")).start(attempts=2)
    try:
        assert head.address == "127.0.0.1:62222"
        first, second = _lines(tmp_path, "tmpdirs")
        assert first != second and head.tmpdir == second and not os.path.exists(first)
        pid = int(_lines(tmp_path, "pids")[-1])
        assert not _gone(pid)
    finally:
        head.stop()
    assert _gone(pid) and not os.path.exists(second)


def test_bad_start_arguments_are_rejected(fake_ray):
    head = LocalRayHead(ray_executable=fake_ray("fails"))
    with pytest.raises(ValueError, match="attempts"):
        head.start(attempts=0)
    with pytest.raises(ValueError, match="timeout"):
        head.start(timeout=0)
