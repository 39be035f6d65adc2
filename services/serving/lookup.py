"""The gateway's per-request registry read: ``name[@version]`` -> the few columns serving needs.

The gateway reads the registry on every request (no cache), so an expert registered or removed by
anyone — this gateway, the CLI, another replica — is servable, or gone, on the next request. That
read is one indexed Core ``SELECT`` of six columns, in a read-only transaction (registry/db.py:
on SQLite it takes the shared lock alone, so 16 concurrent lookups and the strategies replica's
refresh neither queue on the write lock nor wait for a registration's transaction).

The row comes back as an ``ExpertRow`` (no ORM object, no session): what ``Targets.for_expert``
and ``direct_completion`` read from an ``Expert``.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import bindparam, select

from registry.db import READ_ONLY
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
    q = (select(*_COLUMNS).outerjoin(BaseModel, Expert.base_model_id == BaseModel.id)
         .where(Expert.name == bindparam("name")))
    if with_version:
        q = q.where(Expert.version == bindparam("version"))
    return q.order_by(Expert.id.desc()).limit(1)


class ExpertLookup:
    """``Registry.get_expert`` (the latest version, or a given one; ``NotFoundError`` if none) as one
    read-only ``SELECT`` returning an ``ExpertRow``. Blocking: call it in a worker thread."""

    def __init__(self, registry: Registry) -> None:
        self.engine = registry.engine.execution_options(**{READ_ONLY: True})
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
