"""Offline consistency check of a registry data directory (``mnemosyne registry fsck``).

:func:`fsck` re-hashes every blob and compares the blob store with the
versions committed in the database. It reports:

- ``temp``: unfinished uploads left in ``tmp/``;
- ``orphans``: blobs that no committed version references (a crash between
  the blob's rename and the version's commit leaves one);
- ``corrupt``: blobs whose content no longer matches their sha256 name;
- ``missing``: sha256s referenced by a version with no (intact) blob — data
  loss that no repair can undo; the versions fail to fetch with DATA_LOSS.

With ``repair=True`` it takes the data directory's lock (so it refuses to
run beside a live server), deletes temp files and orphans, and moves corrupt
blobs to ``quarantine/``. Without it nothing is changed and no lock is taken.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .blobs import BlobStore, DataDirLock
from .storage import Store


@dataclasses.dataclass
class FsckReport:
    verified: int = 0
    temp: list[str] = dataclasses.field(default_factory=list)
    orphans: list[str] = dataclasses.field(default_factory=list)
    corrupt: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    repaired: bool = False

    @property
    def clean(self) -> bool:
        """True when there is nothing to report (or everything reported was repaired, except missing)."""
        if self.missing:
            return False
        return self.repaired or not (self.temp or self.orphans or self.corrupt)


def fsck(data_dir: str | os.PathLike, db_url: str | None = None, *, repair: bool = False) -> FsckReport:
    """Check (and with ``repair``, fix) ``data_dir``; see the module docstring."""
    data_dir = Path(data_dir)
    if not (data_dir / "blobs").is_dir():
        raise FileNotFoundError(f"{data_dir} is not a registry data directory (no blobs/)")
    lock = DataDirLock(data_dir)
    if repair:
        lock.acquire()
    store = Store(db_url or f"sqlite:///{data_dir / 'registry.db'}")
    try:
        blobs = BlobStore(data_dir)
        referenced = store.referenced_digests()
        report = FsckReport(temp=[p.name for p in blobs.temp_files()])
        report.orphans, _ = blobs.orphans(referenced)
        for digest in blobs.all_digests():
            if blobs.verify(digest):
                report.verified += 1
            else:
                report.corrupt.append(digest)
        report.orphans = [d for d in report.orphans if d not in report.corrupt]
        report.missing = sorted(d for d in referenced if not blobs.exists(d) or d in report.corrupt)
        if repair:
            for name in report.temp:
                (blobs.tmp_dir / name).unlink(missing_ok=True)
            for digest in report.orphans:
                blobs.remove(digest)
            for digest in report.corrupt:
                blobs.quarantine(digest)
            report.repaired = True
        return report
    finally:
        store.close()
        lock.release()
