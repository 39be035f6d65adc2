"""Engines, sessions and the Alembic migrations, run programmatically.

The migrations ship inside the package (``registry/migrations``), so ``upgrade(url)`` works after
``pip install`` without an alembic.ini. An embedded SQLite database is brought to the head revision
when it is opened; a server database (Postgres) is migrated explicitly with ``moerge db upgrade``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from registry.config import database_url
from registry.errors import MoergeError

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


# execution option of a connection whose transactions only read (see make_engine)
READ_ONLY = "moerge_read_only"


def make_engine(url: str | None = None) -> Engine:
    url = url or database_url()
    if not is_sqlite(url):
        return create_engine(url, pool_pre_ping=True)

    database = make_url(url).database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    # pysqlite opens transactions lazily and only before DML, so two writers can both read, then
    # deadlock on the upgrade to a write lock ("database is locked"). Take the write lock up front
    # (BEGIN IMMEDIATE): writers queue behind each other for up to the busy timeout instead, and a
    # duplicate registration fails on the unique constraint like it does on Postgres. A transaction
    # that only reads (the READ_ONLY execution option: ``make_sessionmaker(read_only=True)``) takes
    # the shared lock alone (a deferred BEGIN), so reads run beside each other and beside a writer
    # that has not reached its commit, instead of queueing on the one write lock.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):  # noqa: ANN001
        dbapi_connection.isolation_level = None  # let SQLAlchemy's BEGIN below be the only one
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # noqa: ANN001
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")

    return engine


def make_sessionmaker(engine: Engine, read_only: bool = False) -> sessionmaker[Session]:
    """Sessions on ``engine``; ``read_only``: for transactions that never write (SQLite then takes
    no write lock for them; other databases ignore the option)."""
    # Records outlive their session (the registry hands them to callers), so keep loaded values.
    return sessionmaker(engine.execution_options(**{READ_ONLY: True}) if read_only else engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any error."""
    with factory() as session, session.begin():
        yield session


# How the registry's parts open a transaction: ``with scope() as session:`` (``Registry.session``
# and ``Registry.reading`` are two).
SessionScope = Callable[[], AbstractContextManager[Session]]


# --- migrations --------------------------------------------------------------------------------


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation would choke on '%' in passwords; env.py reads the url from here.
    cfg.attributes["url"] = url or database_url()
    return cfg


def _run(url: str | None, fn, *args) -> None:  # noqa: ANN001
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            cfg = alembic_config(url)
            cfg.attributes["connection"] = connection
            fn(cfg, *args)
    finally:
        engine.dispose()


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Migrate the database at ``url`` (default: the configured one) up to ``revision``."""
    _run(url, command.upgrade, revision)


def downgrade(url: str | None, revision: str) -> None:
    """Migrate down to ``revision`` (``base`` drops every table)."""
    _run(url, command.downgrade, revision)


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def current_revision(engine_or_url: Engine | str | None = None) -> str | None:
    engine = engine_or_url if isinstance(engine_or_url, Engine) else make_engine(engine_or_url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        if engine is not engine_or_url:
            engine.dispose()


def ensure_schema(engine: Engine) -> None:
    """Embedded SQLite: migrate to head. A server database must already be at head."""
    current, head = current_revision(engine), head_revision()
    if current == head:
        return
    if engine.dialect.name == "sqlite":
        upgrade(engine.url.render_as_string(hide_password=False))
        return
    raise MoergeError(
        f"the registry database is at revision {current or 'none (empty)'}, this moerge needs {head}: "
        "run `moerge db upgrade`"
    )
