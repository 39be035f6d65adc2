"""Migrations, concurrency and API keys, on SQLite and Postgres."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, select, text

from registry import db
from registry.errors import MoergeError, RegistrationError
from registry.models import ApiKey, Base, Expert
from registry.service import Registry
from tests.factories import make_tiny_base, make_tiny_lora

pytest_plugins = ["tests.conftest_db"]

TABLES_0001 = {"base_models", "experts", "expert_examples", "artifacts", "api_keys"}
TABLES = TABLES_0001 | {"suites", "suite_examples", "leaderboard_runs", "leaderboard_results", "strategies"}


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


# --- migrations ------------------------------------------------------------------------------------


def test_migrations_up_down_up(db_url: str) -> None:
    assert tables(db_url) == set()
    db.upgrade(db_url)
    assert tables(db_url) == TABLES
    assert db.current_revision(db_url) == db.head_revision() == "0006"
    db.downgrade(db_url, "base")
    assert tables(db_url) == set()
    assert db.current_revision(db_url) is None
    db.upgrade(db_url)
    assert tables(db_url) == TABLES


def test_trust_remote_code_migration_keeps_the_bases(db_url: str, tmp_path: Path) -> None:
    """0003 adds base_models.trust_remote_code (false for the bases already there) and drops it."""
    db.upgrade(db_url, "0002")
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO base_models (name, uri, architecture, checksum, created_at) "
                    "VALUES ('old', '/models/old', 'LlamaForCausalLM', 'c', CURRENT_TIMESTAMP)"
                )
            )
    finally:
        engine.dispose()
    db.upgrade(db_url)
    with Registry(db_url, artifact_root=tmp_path / "store") as reg:
        assert reg.get_base("old").trust_remote_code is False
    db.downgrade(db_url, "0002")
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT name FROM base_models")).scalars().all() == ["old"]
            assert "trust_remote_code" not in {c["name"] for c in inspect(conn).get_columns("base_models")}
    finally:
        engine.dispose()


def test_leaderboard_migration_goes_down_to_0001_and_up_again(db_url: str, tmp_path: Path) -> None:
    """0002 adds the leaderboard tables and drops only them: 0001 data survives the round trip."""
    db.upgrade(db_url, "0001")
    assert tables(db_url) == TABLES_0001
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO api_keys (name, scope, allowed_models, key_prefix, key_hash, created_at) "
                    "VALUES ('k', 'user', '[]', 'mk-1', 'h', CURRENT_TIMESTAMP)"
                )
            )
    finally:
        engine.dispose()
    db.upgrade(db_url)
    assert tables(db_url) == TABLES and db.current_revision(db_url) == "0006"
    with Registry(db_url, artifact_root=tmp_path / "store") as reg:
        reg.add_suite("s", [{"line": 1, "prompt": "p", "reference": "r", "split": "test"}])
        reg.add_leaderboard_run(
            {"suite": "s", "splits": ["test"]},
            [{"entry": "moe/x", "kind": "strategy", "split": "test", "n": 1, "correct": 1, "accuracy": 1.0}],
        )
    db.downgrade(db_url, "0001")
    assert tables(db_url) == TABLES_0001 and db.current_revision(db_url) == "0001"
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT name FROM api_keys")).scalars().all() == ["k"]
    finally:
        engine.dispose()
    db.upgrade(db_url)
    with Registry(db_url, artifact_root=tmp_path / "store") as reg:
        assert reg.list_suites() == [] and reg.list_leaderboard_runs() == []


def test_migrated_schema_matches_the_models(db_url: str) -> None:
    db.upgrade(db_url)
    engine = db.make_engine(db_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    finally:
        engine.dispose()
    assert diff == [], f"models and migrations disagree: {diff}"


def test_fresh_sqlite_is_migrated_on_open(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'home' / 'moerge.db'}"  # the folder does not exist yet either
    with Registry(url, artifact_root=tmp_path / "store") as reg:
        assert reg.list_experts() == []
    assert db.current_revision(url) == db.head_revision()


@pytest.mark.postgres
def test_unmigrated_postgres_asks_for_db_upgrade(postgres_db_url: str, tmp_path: Path) -> None:
    with pytest.raises(MoergeError, match="run `moerge db upgrade`"):
        Registry(postgres_db_url, artifact_root=tmp_path / "store")


def test_migrations_find_their_scripts_from_the_package() -> None:
    assert (db.MIGRATIONS_DIR / "env.py").is_file()
    assert any(db.MIGRATIONS_DIR.joinpath("versions").glob("0001_*.py"))
    assert any(db.MIGRATIONS_DIR.joinpath("versions").glob("0002_*.py"))


# --- concurrency -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    base = make_tiny_base(root / "base")
    return {"base": base, "lora": make_tiny_lora(base, root / "lora")}


def race(n: int, fn) -> tuple[list, list[BaseException]]:  # noqa: ANN001
    results, errors = [], []
    lock = threading.Lock()

    def run(i: int) -> None:
        try:
            out = fn(i)
            with lock:
                results.append(out)
        except BaseException as exc:  # noqa: BLE001
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results, errors


def test_concurrent_same_name_and_version_has_one_winner(
    registry: Registry, small_zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.register_base("tiny", small_zoo["base"])
    n = 4
    # Hold every registration after validation and staging until all have got there, so each one
    # passed the duplicate check before any inserts: the database's unique constraint decides.
    barrier = threading.Barrier(n, timeout=60)
    copy_in = registry.store.copy_in

    def copy_then_wait(files, staging):  # noqa: ANN001, ANN202
        out = copy_in(files, staging)
        barrier.wait()
        return out

    monkeypatch.setattr(registry.store, "copy_in", copy_then_wait)
    results, errors = race(
        n,
        lambda i: registry.register_expert(
            "math", "adapter", small_zoo["lora"], base="tiny", version="1", examples=[{"prompt": f"p{i}"}]
        ),
    )
    assert len(results) == 1, errors
    assert len(errors) == n - 1 and all(isinstance(e, RegistrationError) for e in errors), errors
    assert all("expert math version 1 already exists" in str(e) for e in errors)
    with registry.session() as s:
        assert s.scalars(select(Expert)).all()[0].id == results[0].id
        assert len(s.scalars(select(Expert)).all()) == 1
    assert len(registry.get_examples("math")) == 1
    root = registry.store.root
    assert {p.name for p in (root / "experts" / "math").iterdir()} == {"1"}
    assert not (root / ".staging").exists() or list((root / ".staging").iterdir()) == []


def test_concurrent_automatic_versions_all_succeed(registry: Registry, small_zoo: dict[str, Path]) -> None:
    registry.register_base("tiny", small_zoo["base"])
    results, errors = race(3, lambda i: registry.register_expert("math", "adapter", small_zoo["lora"], base="tiny"))
    assert errors == []
    assert sorted(e.version for e in results) == ["1", "2", "3"]
    assert {p.name for p in (registry.store.root / "experts" / "math").iterdir()} == {"1", "2", "3"}


def test_concurrent_registries_on_one_database(db_url: str, tmp_path: Path, small_zoo: dict[str, Path]) -> None:
    """Separate Registry objects (separate engines, like separate processes) on one database."""
    db.upgrade(db_url)
    store = tmp_path / "store"
    regs = [Registry(db_url, artifact_root=store) for _ in range(3)]
    try:
        regs[0].register_base("tiny", small_zoo["base"])
        results, errors = race(
            3, lambda i: regs[i].register_expert("math", "adapter", small_zoo["lora"], base="tiny", version="7")
        )
        assert len(results) == 1 and len(errors) == 2
        assert all(isinstance(e, RegistrationError) for e in errors), errors
        assert [e.version for e in regs[1].list_experts()] == ["7"]
    finally:
        for r in regs:
            r.close()
    assert {p.name for p in (store / "experts" / "math").iterdir()} == {"7"}


# --- API keys --------------------------------------------------------------------------------------


def test_api_keys_are_hashed_and_verified(registry: Registry) -> None:
    record, plaintext = registry.create_key("alice", scope="user", models=["math", "moe/glider"], rpm=60)
    assert plaintext.startswith("mk-") and len(plaintext) > 40
    assert record.key_hash != plaintext and plaintext not in record.key_hash
    # the plaintext appears in no column of any row
    with registry.session() as s:
        rows = s.execute(text("SELECT * FROM api_keys")).all()
    assert rows and all(plaintext not in str(value) for row in rows for value in row)
    assert record.key_prefix == plaintext[:10]

    found = registry.verify_key(plaintext)
    assert found is not None and found.name == "alice" and found.rpm_limit == 60
    assert found.allows("math") and not found.allows("other")
    assert registry.verify_key(plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")) is None
    assert registry.verify_key("") is None
    assert registry.verify_key("not-a-key") is None

    admin, admin_key = registry.create_key("root", scope="admin")
    assert registry.verify_key(admin_key).allows("anything")
    assert [k.name for k in registry.list_keys()] == ["alice", "root"]
    with pytest.raises(MoergeError, match="already exists"):
        registry.create_key("alice")
    with pytest.raises(MoergeError, match="scope must be one of"):
        registry.create_key("bob", scope="owner")

    registry.revoke_key("alice")
    assert registry.verify_key(plaintext) is None
    with registry.session() as s:
        assert s.scalar(select(ApiKey.revoked_at).where(ApiKey.name == "alice")) is not None


def test_sqlite_file_copy_is_consistent(tmp_path: Path) -> None:
    """The embedded database is one file: copying it carries the registry (backups)."""
    url = f"sqlite:///{tmp_path / 'a.db'}"
    with Registry(url, artifact_root=tmp_path / "store") as reg:
        reg.register_expert("gpt", "external", "openai/gpt-4o-mini")
    shutil.copy(tmp_path / "a.db", tmp_path / "b.db")
    with Registry(f"sqlite:///{tmp_path / 'b.db'}", artifact_root=tmp_path / "store") as reg:
        assert reg.get_expert("gpt").uri == "openai/gpt-4o-mini"


def test_sqlite_reads_go_on_while_a_writer_holds_the_write_lock(tmp_path: Path) -> None:
    """A registry read takes SQLite's shared lock only: it answers while another process is in
    the middle of a write transaction, instead of waiting for that transaction (up to the 30 s busy
    timeout), and the writer still commits afterwards."""
    import sqlite3

    path = tmp_path / "moerge.db"
    with Registry(f"sqlite:///{path}", artifact_root=tmp_path / "store") as reg:
        reg.register_expert("gpt", "external", "openai/gpt-4o-mini")
        writer = sqlite3.connect(path, isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")  # what every registry write opens with
        writer.execute("UPDATE experts SET description = 'edited' WHERE name = 'gpt'")
        answers: list = []
        reader = threading.Thread(
            target=lambda: answers.append(
                ([e.name for e in reg.list_experts()], reg.get_expert("gpt").description, reg.list_keys())
            )
        )
        reader.start()
        reader.join(timeout=5)
        finished = not reader.is_alive()
        writer.execute("COMMIT")
        writer.close()
        reader.join()
        assert finished, "the reads waited for the writer's transaction"
        assert answers == [(["gpt"], "", [])]  # the last committed state, not the writer's edit
        assert reg.get_expert("gpt").description == "edited"


def test_strategies_are_stored_once_by_name(db_url: str, tmp_path: Path) -> None:
    """Migration 0005: a user strategy's definition round-trips (JSON fields included), a name is
    taken once, and the fingerprint the servers watch changes with every add and remove."""
    from registry.errors import DefinitionError, NotFoundError

    db.upgrade(db_url)
    with Registry(db_url, artifact_root=tmp_path / "store") as reg:
        empty = reg.strategies_fingerprint()
        reg.add_strategy(
            "legal",
            "classifier",
            "single",
            router_params={"epochs": 3},
            experts=["a", "domain:legal"],
            fallback="a",
            description="the legal experts",
        )
        added = reg.strategies_fingerprint()
        assert added != empty
        stored = reg.get_strategy("legal")
        assert (stored.router_params, stored.experts, stored.fallback) == ({"epochs": 3}, ["a", "domain:legal"], "a")
        with pytest.raises(DefinitionError, match="exists"):
            reg.add_strategy("legal", "semantic", "single")
        assert [s.router for s in reg.list_strategies()] == ["classifier"]
        reg.remove_strategy("legal")
        assert reg.strategies_fingerprint() != added and reg.list_strategies() == []
        with pytest.raises(NotFoundError):
            reg.remove_strategy("legal")
