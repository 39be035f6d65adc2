"""Database fixtures, loaded as a pytest plugin (``pytest_plugins = ["tests.conftest_db"]``).

``db_url`` is parametrised over the backends: ``sqlite`` (a file in the test's tmp folder) and
``postgres`` (a fresh database per test on the server at ``MOERGE_TEST_POSTGRES_URL``, dropped
afterwards). Without that variable the postgres variant is skipped, unless
``MOERGE_REQUIRE_POSTGRES=1`` (CI), where it fails. ``scripts/with-postgres.sh pytest …`` starts a
throwaway server and sets the variable.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def postgres_server_url() -> str | None:
    url = os.environ.get("MOERGE_TEST_POSTGRES_URL")
    if url:
        return url
    if os.environ.get("MOERGE_REQUIRE_POSTGRES") == "1":
        pytest.fail(
            "MOERGE_REQUIRE_POSTGRES=1 but MOERGE_TEST_POSTGRES_URL is not set "
            "(run the tests under scripts/with-postgres.sh)",
            pytrace=False,
        )
    pytest.skip("MOERGE_TEST_POSTGRES_URL is not set (run under scripts/with-postgres.sh)")


def fresh_postgres_database() -> Iterator[str]:
    """CREATE DATABASE test_<uuid> on the test server, yield its URL, DROP it afterwards."""
    server = make_url(postgres_server_url())
    name = f"test_{uuid.uuid4().hex[:16]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=BACKENDS)
def db_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def db_url(db_backend: str, tmp_path: Path) -> Iterator[str]:
    """An empty database (no tables yet) on each backend."""
    if db_backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
    else:
        yield from fresh_postgres_database()


@pytest.fixture
def postgres_db_url() -> Iterator[str]:
    """A fresh, empty Postgres database (for tests that are about Postgres only)."""
    yield from fresh_postgres_database()


@pytest.fixture
def artifact_root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def registry(db_url: str, artifact_root: Path):  # noqa: ANN201
    """A Registry on a migrated database of each backend, with its artifact store in tmp."""
    from registry.db import upgrade
    from registry.service import Registry

    upgrade(db_url)  # Postgres is not migrated on open; SQLite would be, this keeps both alike
    reg = Registry(db_url, artifact_root=artifact_root)
    yield reg
    reg.close()
