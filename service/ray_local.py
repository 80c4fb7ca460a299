"""A private single-machine Ray cluster in a subprocess, stopped by pid.

Tests and benchmarks need a Ray head that outlives the driver they start (to
SIGKILL a driver and resume against the same cluster) and that never touches
shared default paths or other people's Ray processes. :class:`LocalRayHead`
runs ``ray start --head --block`` with a temporary ``RAY_TMPDIR``, token auth
disabled and the dashboard off, reads back the address, and on ``stop()``
signals only the processes it started (the ``ray start`` process, then any of
its own children that are still alive) — never ``ray stop`` or a kill by name.

Example:
    >>> from service.ray_local import LocalRayHead
    >>> with LocalRayHead(num_cpus=2) as head:          # doctest: +SKIP
    ...     import ray
    ...     _ = ray.init(address=head.address)
    ...     ray.cluster_resources()["CPU"]
    2.0
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

import psutil

logger = logging.getLogger(__name__)


def _new_tmpdir() -> str:
    # Unix socket paths are limited to ~107 bytes: keep the root short.
    return tempfile.mkdtemp(prefix="ray", dir="/tmp")


class RayHeadError(RuntimeError):
    """The local Ray head did not come up."""


def ray_env(tmpdir: str | os.PathLike[str]) -> dict[str, str]:
    """Environment for a head, its drivers and workers: private tmpdir, no token auth."""
    env = dict(os.environ)
    env["RAY_TMPDIR"] = str(tmpdir)
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


class LocalRayHead:
    """``ray start --head --block`` as a child process, with its own temp dir.

    ``address`` is ``"HOST:PORT"`` of the GCS once :meth:`start` returns.
    ``resources`` adds custom resources (e.g. ``{"TPU": 4}``) and ``num_gpus`` declares GPUs, so
    placement can be tested on a machine without accelerators.
    """

    def __init__(self, num_cpus: int = 2, resources: dict[str, float] | None = None,
                 tmpdir: str | None = None, num_gpus: int = 0, ray_executable: str | None = None):
        self.num_cpus = num_cpus
        # The ``ray`` CLI next to this interpreter unless given (another install, or a test double).
        self.ray_executable = ray_executable or str(Path(sys.executable).with_name("ray"))
        self.num_gpus = num_gpus  # declared, not detected: lets tests check GPU placement without GPUs
        self.resources = dict(resources or {})
        self._own_tmp = tmpdir is None
        self.tmpdir = tmpdir or _new_tmpdir()
        self.address: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def _log(self) -> Path:
        return Path(self.tmpdir) / "head.log"

    def _log_tail(self) -> str:
        return self._log.read_text(errors="replace")[-2000:]

    @property
    def env(self) -> dict[str, str]:
        return ray_env(self.tmpdir)

    def start(self, *, timeout: float = 180.0, attempts: int = 2) -> LocalRayHead:
        """Start the head and wait until its GCS address is known.

        A head that exits or is not up within ``timeout`` seconds is stopped (by pid) and
        started again, up to ``attempts`` times in all (one start failed once in a test fixture
        while meta-training had both cores busy). Raises :class:`RayHeadError` with the end of
        the last attempt's log.
        """
        if attempts < 1 or timeout <= 0:
            raise ValueError(f"need attempts ≥ 1 and timeout > 0, got {attempts}, {timeout}")
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once(timeout)
            except RayHeadError as err:
                self.stop()
                if attempt == attempts:
                    raise
                if self._own_tmp:  # a clean directory: nothing of the failed session is reused
                    self.tmpdir = _new_tmpdir()
                logger.warning("attempt %d of %d failed, retrying: %s", attempt, attempts,
                             str(err).splitlines()[0])
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> LocalRayHead:
        cmd = [self.ray_executable, "start", "--head", "--block", "--port", "0",
               "--num-cpus", str(self.num_cpus), "--include-dashboard", "false",
               "--temp-dir", self.tmpdir, "--disable-usage-stats"]
        if self.num_gpus:
            cmd += ["--num-gpus", str(self.num_gpus)]
        if self.resources:
            cmd += ["--resources", json.dumps(self.resources)]
        marker = Path(self.tmpdir) / "ray_current_cluster"
        marker.unlink(missing_ok=True)  # in a given tmpdir: a previous attempt's address is not ours
        with open(self._log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True)
        # Poll for the file Ray writes once the GCS is up; fail as soon as the
        # process dies instead of sleeping a fixed time.
        deadline = time.monotonic() + timeout
        while self.address is None:
            if self.proc.poll() is not None:
                raise RayHeadError(f"ray start exited with {self.proc.returncode}: {self._log_tail()}")
            if marker.exists() and "Ray runtime started" in self._log.read_text(errors="replace"):
                self.address = marker.read_text().strip()
            elif time.monotonic() > deadline:
                raise RayHeadError(f"ray start was not up after {timeout:g} s: {self._log_tail()}")
            else:
                time.sleep(0.1)
        return self

    def stop(self) -> None:
        """SIGTERM the ``ray start`` process (it drains its node), then SIGKILL leftovers by pid."""
        self.address = None
        if self.proc is None:
            return
        children = self._own_processes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for child in children:  # only processes this head spawned
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(children, timeout=10)
        self.proc = None
        if self._own_tmp:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _own_processes(self) -> list[psutil.Process]:
        """The head's descendants, found two ways: as its children and as members of the session
        it leads (``start_new_session``). A ``ray start`` that exited leaves its GCS and raylet
        orphaned: no longer its children, still in its session."""
        assert self.proc is not None
        found: dict[int, psutil.Process] = {}
        try:
            found.update((p.pid, p) for p in psutil.Process(self.proc.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
        for proc in psutil.process_iter():
            try:
                if proc.pid != self.proc.pid and os.getsid(proc.pid) == self.proc.pid:
                    found.setdefault(proc.pid, proc)
            except (ProcessLookupError, PermissionError):
                continue
        return list(found.values())

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
