"""The gateway's per-request registry read: ``name[@version]`` -> the few columns serving needs.

An expert registered or removed by anyone — this gateway, the CLI, another replica — must be
servable, or gone, on the next request. The read is one indexed Core ``SELECT`` of six columns, in
a read-only transaction (registry/db.py: on SQLite it takes the shared lock alone, so 16
concurrent lookups and the strategies replica's refresh neither queue on the write lock nor wait
for a registration's transaction). It blocks, so the gateway runs it in a worker thread.

On the embedded SQLite database most of those reads are skipped, with the same guarantee: SQLite
keeps a *file change counter* in its file header (offset 24), which every committed write
transaction increments, whichever process made it (https://www.sqlite.org/fileformat.html,
"File change counter"; it is what ``PRAGMA data_version`` is built on). ``ExpertLookup`` keeps
the rows it read with the counter they were read under and answers from them while the counter is
unchanged: a 10-byte read of the file, on the event loop, instead of a thread hop and a
transaction (~9 % of the gateway replica's samples under load, py-spy). In WAL mode the counter is
not kept up to date, so the header's format byte (offset 18: 1 = rollback journal, 2 = WAL) turns
the cache off; so do other databases (Postgres) and in-memory ones.

The row comes back as an ``ExpertRow`` (no ORM object, no session): what ``Targets.for_expert``
and ``direct_completion`` read from an ``Expert``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import bindparam, select
from sqlalchemy.engine import make_url

from registry.db import READ_ONLY, is_sqlite
from registry.errors import NotFoundError
from registry.models import BaseModel, Expert
from registry.service import Registry


@dataclass(frozen=True)
class BaseRef:
    name: str


@dataclass(frozen=True)
class ExpertRow:
    id: int
    name: str
    version: str
    kind: str
    status: str
    checksum: str
    base: BaseRef | None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


_COLUMNS = (Expert.id, Expert.name, Expert.version, Expert.kind, Expert.status, Expert.checksum, BaseModel.name)


def _query(with_version: bool):
    q = (
        select(*_COLUMNS)
        .outerjoin(BaseModel, Expert.base_model_id == BaseModel.id)
        .where(Expert.name == bindparam("name"))
    )
    if with_version:
        q = q.where(Expert.version == bindparam("version"))
    return q.order_by(Expert.id.desc()).limit(1)


class SQLiteChangeCounter:
    """The change counter of a SQLite database file in rollback-journal mode (see the module's
    docstring); ``read()`` is None where it cannot be trusted: no such file (yet), WAL mode."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def of(cls, url: str) -> SQLiteChangeCounter | None:
        if not is_sqlite(url):
            return None
        database = make_url(url).database
        if not database or database == ":memory:" or database.startswith("file:"):
            return None
        return cls(Path(database).expanduser())

    def read(self) -> bytes | None:
        try:
            with open(self.path, "rb", buffering=0) as f:  # opened each time: a replaced file is seen
                f.seek(18)
                header = f.read(10)
        except OSError:
            return None
        if len(header) < 10 or header[0] != 1:  # offset 18: 1 = rollback journal; 2 = WAL
            return None
        return header[6:10]  # offset 24: the file change counter


class ExpertLookup:
    """``Registry.get_expert`` (the latest version, or a given one; ``NotFoundError`` if none) as one
    read-only ``SELECT`` returning an ``ExpertRow``. ``get`` blocks: call it in a worker thread;
    ``cached`` does not, and answers when the database has not changed since ``get`` read the row."""

    def __init__(self, registry: Registry) -> None:
        self.engine = registry.engine.execution_options(**{READ_ONLY: True})
        self._latest, self._versioned = _query(False), _query(True)
        self._counter = SQLiteChangeCounter.of(registry.url)
        # (the change counter, the rows read under it; None: not found), swapped whole when the
        # counter moves; ``get`` runs in several worker threads at once, so it adds under a lock
        self._snapshot: tuple[bytes | None, dict[tuple[str, str | None], ExpertRow | None]] = (None, {})
        self._adding = threading.Lock()

    def cached(self, name: str, version: str | None = None) -> ExpertRow | None:
        """The row ``get`` would return, if the database is unchanged since it was read (else None);
        raises ``NotFoundError`` as ``get`` would, on the same condition."""
        key = (name, None if version is None else str(version))
        at, rows = self._snapshot
        if self._counter is None or key not in rows:
            return None
        now = self._counter.read()
        if now is None or now != at:
            return None
        row = rows[key]
        if row is None:
            raise NotFoundError(f"no expert {_what(name, version)}")
        return row

    def get(self, name: str, version: str | None = None) -> ExpertRow:
        params = {"name": name} if version is None else {"name": name, "version": str(version)}
        # the counter is read before the row: a commit in between makes the pair look stale (the
        # next request reads again), never a stale row look current
        before = self._counter.read() if self._counter is not None else None
        with self.engine.connect() as conn:
            row = conn.execute(self._latest if version is None else self._versioned, params).first()
        found = None
        if row is not None:
            eid, ename, eversion, kind, status, checksum, base = row
            found = ExpertRow(eid, ename, eversion, kind, status, checksum, BaseRef(base) if base is not None else None)
        if before is not None:
            with self._adding:
                if self._snapshot[0] != before:
                    self._snapshot = (before, {})
                self._snapshot[1][(name, None if version is None else str(version))] = found
        if found is None:
            raise NotFoundError(f"no expert {_what(name, version)}")
        return found


def _what(name: str, version: str | None) -> str:
    return f"{name} version {version}" if version is not None else name
