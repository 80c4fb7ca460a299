"""Registry handlers and storage without gRPC, on SQLite and on PostgreSQL.

PostgreSQL comes from MNEMOSYNE_TEST_POSTGRES_URL (``.ci/services`` starts one);
each test gets its own database. Without the URL those cases skip, unless
MNEMOSYNE_REQUIRE_POSTGRES=1 (CI), where they fail.
"""
from __future__ import annotations

import hashlib
import os
import threading
import uuid

import pytest
import sqlalchemy as sa

from service.registry import errors
from service.registry.handlers import PublishSpec, Registry

PG_URL = os.environ.get("MNEMOSYNE_TEST_POSTGRES_URL", "")
REQUIRE_PG = os.environ.get("MNEMOSYNE_REQUIRE_POSTGRES") == "1"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    if not PG_URL:
        if REQUIRE_PG:
            pytest.fail("MNEMOSYNE_REQUIRE_POSTGRES=1 but MNEMOSYNE_TEST_POSTGRES_URL is unset: "
                        ".ci/services could not start PostgreSQL")
        pytest.skip("set MNEMOSYNE_TEST_POSTGRES_URL (see .ci/services) to run the PostgreSQL cases")
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    name = f"registry_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    yield sa.make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.dispose()


@pytest.fixture
def registry(db_url, tmp_path):
    reg = Registry(tmp_path / "data", db_url, watch_poll_s=0.05)
    yield reg
    reg.close()
    reg.store.close()


OPAQUE = {"format": "opaque"}  # test bytes, not checkpoints


def spec(name: str, data: bytes, **metadata) -> PublishSpec:
    metadata.setdefault("compatibility", OPAQUE)
    return PublishSpec(name, metadata, len(data), hashlib.sha256(data).hexdigest())


def publish(reg: Registry, name: str, data: bytes, chunk: int = 1000, **metadata):
    return reg.publish(spec(name, data, **metadata), (data[i:i + chunk] for i in range(0, len(data), chunk)))


def test_versions_metadata_and_aliases(registry):
    v1 = publish(registry, "opt", b"first" * 100, lineage={"run_id": "r"})
    v2 = publish(registry, "opt", b"second" * 100)
    assert (v1.number, v2.number) == (1, 2)
    got = registry.get_version("opt", number=1)
    assert got.metadata == {"lineage": {"run_id": "r"}, "compatibility": OPAQUE} and got.size == 500
    assert registry.get_version("opt").number == 2 and registry.get_version("opt").aliases == ("latest",)
    registry.set_alias("opt", "best", 1)
    assert registry.get_version("opt", alias="best").number == 1
    assert registry.get_version("opt", number=1).aliases == ("best",)
    opts, token = registry.list_optimizers()
    assert [(o.name, o.latest_version, o.aliases) for o in opts] == [("opt", 2, {"best": 1, "latest": 2})]
    assert token == ""
    registry.delete_alias("opt", "best")
    with pytest.raises(errors.NotFound):
        registry.get_version("opt", alias="best")


def test_the_same_bytes_twice_are_stored_once(registry):
    publish(registry, "a", b"shared bytes")
    publish(registry, "b", b"shared bytes")
    assert len(registry.blobs.all_digests()) == 1
    assert registry.get_version("a").sha256 == registry.get_version("b").sha256


def test_failed_uploads_consume_no_version_number(registry):
    publish(registry, "gapless", b"one")
    data = b"two" * 50
    with pytest.raises(errors.InvalidArgument, match="sha256 mismatch"):
        registry.publish(PublishSpec("gapless", {"compatibility": OPAQUE}, len(data), "0" * 64), [data])

    def broken():
        yield data[:10]
        raise ConnectionError("stream cut")

    with pytest.raises(ConnectionError):
        registry.publish(spec("gapless", data), broken())
    with pytest.raises(errors.InvalidArgument, match="larger than the declared size"):
        registry.publish(spec("gapless", data), [data, b"extra"])
    with pytest.raises(errors.ResourceExhausted, match="chunk limit"):
        registry.publish(spec("gapless", b"x" * (2 << 20)), [b"x" * (2 << 20)])
    assert list((registry.data_dir / "tmp").iterdir()) == []
    assert publish(registry, "gapless", data).number == 2
    assert [v.number for v in registry.list_versions("gapless")[0]] == [1, 2]


def test_bad_inputs_are_typed_errors(registry):
    publish(registry, "x", b"x")
    cases = [
        (lambda: registry.get_version("bad name"), errors.InvalidArgument),
        (lambda: registry.get_version("x", number=0), errors.InvalidArgument),
        (lambda: registry.get_version("x", alias="9lives"), errors.InvalidArgument),
        (lambda: registry.get_version("unknown"), errors.NotFound),
        (lambda: registry.get_version("x", number=5), errors.NotFound),
        (lambda: registry.list_versions("unknown"), errors.NotFound),
        (lambda: registry.set_alias("x", "latest", 1), errors.FailedPrecondition),
        (lambda: registry.set_alias("unknown", "best", 1), errors.NotFound),
        (lambda: registry.list_versions("x", page_token="%%%"), errors.InvalidArgument),
        (lambda: registry.publish(PublishSpec("x", {}, 0, "0" * 64), []), errors.InvalidArgument),
        (lambda: registry.publish(PublishSpec("x", {}, 3, "NOTHEX"), []), errors.InvalidArgument),
        (lambda: registry.open_fetch("x", offset=2), errors.InvalidArgument),
    ]
    for call, exc_type in cases:
        with pytest.raises(exc_type):
            call()


def test_paging_is_complete_and_ordered(registry):
    for i in range(11):
        publish(registry, "paged", f"{i}".encode())
        publish(registry, f"n{i:02d}", b"n")
    numbers, token = [], ""
    while True:
        page, token = registry.list_versions("paged", page_size=4, page_token=token)
        numbers += [v.number for v in page]
        if not token:
            break
    assert numbers == list(range(1, 12))
    names, token = [], ""
    while True:
        page, token = registry.list_optimizers(page_size=3, page_token=token, prefix="n")
        names += [o.name for o in page]
        if not token:
            break
    assert names == [f"n{i:02d}" for i in range(11)]


def test_name_prefix_is_exact_and_case_sensitive(registry):
    # Issue 23 defect 5: on SQLite LIKE ignored case, so NODE matched Node-Test and node-test.
    for name in ("NODE", "NODE2", "Node-Test", "node-test", "node_x", "nodeA", "no"):
        publish(registry, name, name.encode())

    def names(prefix):
        rows, token = registry.list_optimizers(page_size=1000, prefix=prefix)
        assert token == ""
        return sorted(o.name for o in rows)

    assert names("NODE") == ["NODE", "NODE2"]
    assert names("Node") == ["Node-Test"]
    assert names("node") == ["node-test", "nodeA", "node_x"]
    assert names("node_") == ["node_x"]  # '_' is a character, not a LIKE wildcard
    assert names("%") == [] and names("node%") == []
    assert names("NODE2-longer-than-the-name") == []
    assert len(names("")) == 7


def test_concurrent_publishers_are_gapless(registry):
    threads_n, each = 6, 5
    numbers: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads_n)
    failures: list[BaseException] = []

    def worker(i):
        try:
            barrier.wait()
            for j in range(each):
                v = publish(registry, "race", f"{i}/{j}".encode() * 200)
                with lock:
                    numbers.append(v.number)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert sorted(numbers) == list(range(1, threads_n * each + 1))
    versions, _ = registry.list_versions("race", page_size=1000)
    assert [v.number for v in versions] == list(range(1, threads_n * each + 1))
    assert len({v.sha256 for v in versions}) == threads_n * each


def test_watch_yields_current_then_moves_in_order(registry):
    for i in range(3):
        publish(registry, "w", f"{i}".encode())
    registry.set_alias("w", "best", 1)
    stop = threading.Event()
    events = []
    gen = registry.watch("w", "best", stop)
    events.append(next(gen))  # current target; later moves are after this point
    registry.set_alias("w", "best", 3)
    registry.delete_alias("w", "best")
    registry.set_alias("w", "best", 2)
    for _ in range(3):
        events.append(next(gen))
    stop.set()
    registry.wake_watchers()
    assert list(gen) == []  # ends once stopped
    assert [e.version for e in events] == [1, 3, None, 2]
    assert [e.sequence for e in events] == sorted(e.sequence for e in events)


def test_recovery_removes_temp_files_and_quarantines_corrupt_blobs(registry):
    good = publish(registry, "r", b"good bytes")
    bad = publish(registry, "r", b"bad bytes!")
    (registry.data_dir / "tmp" / "leftover.part").write_bytes(b"half an upload")
    registry.blobs.path(bad.sha256).write_bytes(b"bit rot!!!")
    report = registry.recover()
    assert report.removed_temp == 1 and report.verified == 1 and report.corrupt == [bad.sha256]
    _, chunks = registry.open_fetch("r", number=good.number)
    assert b"".join(chunks) == b"good bytes"
    with pytest.raises(errors.DataLoss):
        registry.open_fetch("r", number=bad.number)


def test_closed_registry_refuses_writes(registry):
    registry.close()
    with pytest.raises(errors.Unavailable):
        publish(registry, "closed", b"x")


def test_alias_history_is_trimmed_per_alias_and_old_resumes_are_out_of_range(db_url, tmp_path):
    reg = Registry(tmp_path / "trim", db_url, history_per_alias=5)
    try:
        publish(reg, "t", b"one")
        publish(reg, "t", b"two")
        first = reg.set_alias("t", "prod", 1).sequence
        for i in range(12):
            reg.set_alias("t", "prod", 1 + i % 2)
            reg.set_alias("t", "canary", 2)
        for alias in ("prod", "canary", "latest"):
            events = reg.store.alias_events_after("t", alias, 0)
            assert len(events) == (5 if alias != "latest" else 2)
            assert [e.sequence for e in events] == sorted(e.sequence for e in events)
        with pytest.raises(errors.OutOfRange, match=f"after sequence {first}"):
            reg.watch_start("t", "prod", after_sequence=first)
        kept = reg.store.alias_events_after("t", "prod", 0)
        assert reg.watch_start("t", "prod", after_sequence=kept[0].sequence) == ([], kept[0].sequence)
        reg.watch_start("t", "latest", after_sequence=1)  # never trimmed: any sequence resumes
    finally:
        reg.close()
        reg.store.close()
