"""The gateway's per-request registry read: ``name[@version]`` -> the few columns serving needs.

The gateway reads the registry on every request (no cache), so an expert registered or removed by
anyone — this gateway, the CLI, another replica — is servable, or gone, on the next request. That
read is one indexed ``SELECT``; what it must not cost is a lock. ``registry/db.py`` opens every
SQLite transaction with ``BEGIN IMMEDIATE`` (the database's one write lock), which is right for the
registry's writes (writers queue instead of deadlocking) but makes every read a writer too: under
16 concurrent requests, plus the strategies replica's refresh, the lookups queue on that lock and
SQLite's busy handler sleeps between retries (1, 2, 5, 10, 15 ms ...). Here a read is a plain
``SELECT`` outside any transaction — a shared lock for the statement's duration — on an engine
of its own without that hook. Other databases (Postgres) read without locks already: the
registry's engine is used as is.

The row comes back as an ``ExpertRow`` (no ORM object, no session): what ``Targets.for_expert``
and ``direct_completion`` read from an ``Expert``.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine, bindparam, create_engine, select
from sqlalchemy.engine import make_url

from registry.db import SQLITE_BUSY_TIMEOUT_MS
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


def read_engine(registry: Registry) -> Engine:
    """An engine whose SQLite reads take no write lock (the module doc); the registry's own
    engine for other databases, and for SQLite databases a second engine could not open (in
    memory, ``file:`` URIs)."""
    url = registry.engine.url
    database = url.database or ""
    if make_url(url).get_backend_name() != "sqlite" or database in ("", ":memory:") or database.startswith("file:"):
        return registry.engine
    # pysqlite's default isolation: a BEGIN only before INSERT/UPDATE/DELETE, so a SELECT runs on
    # its own (autocommit) and sees every commit made before it
    return create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})


_COLUMNS = (Expert.id, Expert.name, Expert.version, Expert.kind, Expert.status, Expert.checksum, BaseModel.name)


def _query(with_version: bool):
    q = (select(*_COLUMNS).outerjoin(BaseModel, Expert.base_model_id == BaseModel.id)
         .where(Expert.name == bindparam("name")))
    if with_version:
        q = q.where(Expert.version == bindparam("version"))
    return q.order_by(Expert.id.desc()).limit(1)


class ExpertLookup:
    """``Registry.get_expert`` (the latest version, or a given one; ``NotFoundError`` if none) as one
    lock-free ``SELECT`` returning an ``ExpertRow``. Blocking: call it in a worker thread."""

    def __init__(self, registry: Registry) -> None:
        self.engine = read_engine(registry)
        self._own = self.engine is not registry.engine
        self._latest, self._versioned = _query(False), _query(True)

    def get(self, name: str, version: str | None = None) -> ExpertRow:
        params = {"name": name} if version is None else {"name": name, "version": str(version)}
        with self.engine.connect() as conn:
            row = conn.execute(self._latest if version is None else self._versioned, params).first()
        if row is None:
            what = f"{name} version {version}" if version is not None else name
            raise NotFoundError(f"no expert {what}")
        eid, ename, eversion, kind, status, checksum, base = row
        return ExpertRow(eid, ename, eversion, kind, status, checksum, BaseRef(base) if base is not None else None)

    def close(self) -> None:
        if self._own:
            self.engine.dispose()
