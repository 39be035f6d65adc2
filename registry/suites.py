"""Leaderboard suites users import: the ``suites`` rows and their ``suite_examples``.

Rows arrive validated (``services.leaderboard.suites`` parses and checks the file); the registry
stores a suite whole or not at all.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from registry.db import SessionScope
from registry.errors import NotFoundError, RegistrationError
from registry.models import Suite, SuiteExample
from registry.validation import check_name


class Suites:
    def __init__(self, session: SessionScope, reading: SessionScope) -> None:
        self._session = session
        self._reading = reading

    def add_suite(
        self,
        name: str,
        rows: list[dict],
        *,
        description: str = "",
        source: str = "",
        checksum: str = "",
        replace: bool = False,
    ) -> Suite:
        """Store a suite and all its examples in one transaction (rows are validated by the caller:
        ``services.leaderboard.suites``). ``replace`` swaps out an existing suite of that name."""
        check_name(name, "suite name")
        if not rows:
            raise RegistrationError(f"suite {name!r} has no examples")
        with self._session() as s:
            existing = s.scalar(select(Suite).where(Suite.name == name))
            if existing is not None:
                if not replace:
                    raise RegistrationError(f"suite {name!r} already exists (use --replace to import it again)")
                s.delete(existing)
                s.flush()
            suite = Suite(name=name, description=description, source=source, checksum=checksum, n_examples=len(rows))
            s.add(suite)
            try:
                s.flush()  # the unique name first: a concurrent import of the same name stops here
            except IntegrityError:
                raise RegistrationError(f"suite {name!r} already exists (imported concurrently)") from None
            s.add_all(
                SuiteExample(
                    suite_id=suite.id,
                    line=r["line"],
                    prompt=r["prompt"],
                    reference=r["reference"],
                    task=r.get("task", ""),
                    split=r["split"],
                    metric=r.get("metric", "exact_match"),
                    choices=r.get("choices"),
                    segments=r.get("segments"),
                )
                for r in rows
            )
            s.flush()
        return suite

    def get_suite(self, name: str) -> Suite:
        with self._reading() as s:
            suite = s.scalar(select(Suite).where(Suite.name == name))
        if suite is None:
            raise NotFoundError(f"no suite named {name!r} (import one with `moerge suite add`)")
        return suite

    def list_suites(self) -> list[Suite]:
        with self._reading() as s:
            return list(s.scalars(select(Suite).order_by(Suite.name)))

    def get_suite_examples(self, name: str, split: str | None = None) -> list[SuiteExample]:
        suite = self.get_suite(name)
        with self._reading() as s:
            q = select(SuiteExample).where(SuiteExample.suite_id == suite.id)
            if split is not None:
                q = q.where(SuiteExample.split == split)
            return list(s.scalars(q.order_by(SuiteExample.id)))

    def remove_suite(self, name: str) -> Suite:
        with self._session() as s:
            suite = s.scalar(select(Suite).where(Suite.name == name))
            if suite is None:
                raise NotFoundError(f"no suite named {name!r}")
            s.delete(suite)
        return suite
