"""Crash leftovers: orphan collection at startup, the data-directory lock, ``registry fsck``."""
from __future__ import annotations

import hashlib
import os
import time

import pytest

from service import cli
from service.registry import errors
from service.registry.handlers import PublishSpec, Registry
from service.registry.server import create_server, shutdown

pytestmark = pytest.mark.xdist_group("registry")


def publish(reg: Registry, name: str, data: bytes):
    return reg.publish(PublishSpec(name, {"compatibility": {"format": "opaque"}}, len(data), hashlib.sha256(data).hexdigest()), [data])


def orphan(reg: Registry, data: bytes, age_s: float = 0.0) -> str:
    """A blob renamed into place whose version never committed (a crash in between)."""
    digest = hashlib.sha256(data).hexdigest()
    with reg.blobs.writer(digest, len(data)) as w:
        w.write(data)
        w.commit()
    if age_s:
        past = time.time() - age_s
        os.utime(reg.blobs.path(digest), (past, past))
    return digest


def test_recovery_collects_orphans_older_than_the_grace_period(tmp_path):
    reg = Registry(tmp_path)
    try:
        kept = publish(reg, "o", b"committed version")
        old = orphan(reg, b"orphan of a crash", age_s=120)
        young = orphan(reg, b"maybe a publish in flight")
        report = reg.recover(orphan_grace_s=60)
        assert report.orphans == [old] and report.young_orphans == [young]
        assert not reg.blobs.exists(old) and reg.blobs.exists(young) and reg.blobs.exists(kept.sha256)
        assert reg.recover().orphans == [young]  # no grace: collected
        _, chunks = reg.open_fetch("o", number=kept.number)
        assert b"".join(chunks) == b"committed version"
    finally:
        reg.store.close()


def test_a_second_server_on_the_same_data_dir_refuses_to_start(tmp_path, capsys):
    srv, _ = create_server(tmp_path, port=0)
    srv.start()
    try:
        with pytest.raises(errors.DataDirLocked, match=f"in use by another registry process \\(pid {os.getpid()}\\)"):
            create_server(tmp_path, port=0)
        code = cli.main(["registry", "serve", "--data", str(tmp_path), "--port", "0"])
        err = capsys.readouterr().err
        assert code == 1 and "in use by another registry process" in err and len(err.strip().splitlines()) == 1
        code = cli.main(["registry", "fsck", "--data", str(tmp_path), "--repair"])
        assert code == 1 and "in use by another registry process" in capsys.readouterr().err
    finally:
        shutdown(srv, grace=1)
    srv, _ = create_server(tmp_path, port=0)  # released on shutdown
    shutdown(srv, grace=1)


def test_fsck_reports_then_repairs_orphans_temp_files_and_damage(tmp_path, capsys):
    reg = Registry(tmp_path)
    good = publish(reg, "f", b"good version bytes")
    bad = publish(reg, "f", b"bad version bytes!")
    lost = publish(reg, "f", b"lost version bytes")
    stray = orphan(reg, b"stray blob")
    reg.blobs.path(bad.sha256).write_bytes(b"bit rot on disk!!!")
    reg.blobs.path(lost.sha256).unlink()
    (tmp_path / "tmp" / "cut.part").write_bytes(b"half")
    reg.store.close()

    code = cli.main(["registry", "fsck", "--data", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 1 and "lost" in err
    assert f"orphan: {stray}" in out and f"corrupt: {bad.sha256}" in out and "temp: cut.part" in out
    assert f"missing: {lost.sha256}" in out and f"missing: {bad.sha256}" in out
    assert "fsck: 2 blobs verified, 1 temp files, 1 orphans, 1 corrupt, 2 missing" in out
    assert (tmp_path / "tmp" / "cut.part").exists()  # report only: nothing changed

    code = cli.main(["registry", "fsck", "--data", str(tmp_path), "--repair"])
    out, _ = capsys.readouterr()
    assert code == 1 and f"orphan: {stray} (removed)" in out and f"corrupt: {bad.sha256} (quarantined)" in out
    assert not (tmp_path / "tmp" / "cut.part").exists() and (tmp_path / "quarantine" / bad.sha256).exists()

    code = cli.main(["registry", "fsck", "--data", str(tmp_path)])
    out, _ = capsys.readouterr()
    assert code == 1 and "fsck: 1 blobs verified, 0 temp files, 0 orphans, 0 corrupt, 2 missing" in out
    reg = Registry(tmp_path)
    try:
        _, chunks = reg.open_fetch("f", number=good.number)
        assert b"".join(chunks) == b"good version bytes"
    finally:
        reg.store.close()


def test_fsck_of_a_clean_dir_exits_zero_and_of_a_non_registry_dir_fails(tmp_path, capsys):
    reg = Registry(tmp_path / "data")
    publish(reg, "c", b"clean")
    reg.store.close()
    assert cli.main(["registry", "fsck", "--data", str(tmp_path / "data")]) == 0
    assert "fsck: 1 blobs verified, 0 temp files, 0 orphans, 0 corrupt, 0 missing" in capsys.readouterr().out
    assert cli.main(["registry", "fsck", "--data", str(tmp_path / "nope")]) == 1
    assert "not a registry data directory" in capsys.readouterr().err
