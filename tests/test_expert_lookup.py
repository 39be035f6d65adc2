"""The gateway's per-request expert read (services/serving/lookup.py), on SQLite and Postgres:
whatever another process commits is seen by the next read, and on SQLite an unchanged registry is
answered without touching the database."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import event

from registry import db
from registry.errors import NotFoundError
from registry.service import Registry
from services.serving.lookup import ExpertLookup
from tests.factories import make_tiny_base, make_tiny_lora

pytest_plugins = ["tests.conftest_db"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    base = make_tiny_base(root / "base")
    return {"base": base, "lora": make_tiny_lora(base, root / "lora")}


def test_a_change_made_elsewhere_is_seen_by_the_next_read(
    db_url: str, db_backend: str, tmp_path: Path, tiny: dict[str, Path]
) -> None:
    db.upgrade(db_url)
    gateway, cli = (
        Registry(db_url, artifact_root=tmp_path / "store"),
        Registry(db_url, artifact_root=tmp_path / "store"),
    )
    statements: list[str] = []
    event.listen(gateway.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    try:
        cli.register_base("tiny", tiny["base"])
        cli.register_expert("math", "adapter", tiny["lora"], base="tiny", version="1")
        lookup = ExpertLookup(gateway)
        assert lookup.cached("math") is None  # nothing read yet
        first = lookup.get("math")
        assert (first.version, first.status, first.base.name) == ("1", "ready", "tiny")

        statements.clear()
        again = lookup.cached("math")
        if db_backend == "sqlite":
            assert again == first and statements == []  # unchanged: answered without a query
        else:
            assert again is None  # Postgres: every request reads

        cli.register_expert("math", "adapter", tiny["lora"], base="tiny", version="2")
        assert lookup.cached("math") is None  # another connection committed
        assert lookup.get("math").version == "2"
        assert lookup.get("math", "1").version == "1"

        cli.remove_expert("math")
        assert lookup.cached("math") is None and lookup.cached("math", "1") is None
        with pytest.raises(NotFoundError):
            lookup.get("math")
        if db_backend == "sqlite":
            with pytest.raises(NotFoundError):  # "not found" is remembered too, until the next change
                lookup.cached("math")

        cli.register_expert("math", "adapter", tiny["lora"], base="tiny", version="3")
        assert lookup.cached("math") is None
        assert lookup.get("math").version == "3"
    finally:
        gateway.close()
        cli.close()


def test_sqlite_in_wal_mode_reads_every_time(tmp_path: Path, tiny: dict[str, Path]) -> None:
    """In WAL mode SQLite does not keep the header's change counter current: no answers from memory."""
    path = tmp_path / "wal.db"
    url = f"sqlite:///{path}"
    db.upgrade(url)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    reg = Registry(url, artifact_root=tmp_path / "store")
    try:
        reg.register_base("tiny", tiny["base"])
        reg.register_expert("math", "adapter", tiny["lora"], base="tiny", version="1")
        lookup = ExpertLookup(reg)
        assert lookup.get("math").version == "1"
        assert lookup.cached("math") is None
    finally:
        reg.close()
