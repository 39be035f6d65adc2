"""Stored strategy definitions: rows of ``strategies`` (migration 0005).

The registry keeps what a user defined; it does not know routers or composers. The definition
is checked (services/moe/definitions.py) before ``add_strategy`` is called, in the same request.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from registry.db import SessionScope
from registry.errors import DefinitionError, NotFoundError
from registry.models import StrategyRecord
from registry.validation import check_name


def add_strategy(
    session: Session,
    name: str,
    router: str,
    composer: str,
    *,
    router_params: dict | None = None,
    composer_params: dict | None = None,
    experts: list[str] | None = None,
    fallback: str | None = None,
    description: str = "",
) -> StrategyRecord:
    check_name(name, "strategy name")
    if session.scalar(select(StrategyRecord).where(StrategyRecord.name == name)) is not None:
        raise DefinitionError(f"strategy moe/{name} exists; remove it first (`moerge strategies remove {name}`)")
    record = StrategyRecord(
        name=name,
        router=router,
        composer=composer,
        router_params=dict(router_params or {}),
        composer_params=dict(composer_params or {}),
        experts=list(experts or []),
        fallback=fallback,
        description=description or "",
    )
    session.add(record)
    try:
        session.flush()
    except IntegrityError as exc:  # another writer took the name between the check and the insert
        raise DefinitionError(f"strategy moe/{name} exists") from exc
    return record


def list_strategies(session: Session) -> list[StrategyRecord]:
    return list(session.scalars(select(StrategyRecord).order_by(StrategyRecord.name)))


def get_strategy(session: Session, name: str) -> StrategyRecord:
    record = session.scalar(select(StrategyRecord).where(StrategyRecord.name == name))
    if record is None:
        raise NotFoundError(f"no user-defined strategy moe/{name}")
    return record


def remove_strategy(session: Session, name: str) -> StrategyRecord:
    record = get_strategy(session, name)
    session.delete(record)
    return record


def fingerprint(session: Session) -> tuple:
    """Changes whenever a definition is added or removed: (count, newest update, highest id)."""
    row = session.execute(
        select(func.count(StrategyRecord.id), func.max(StrategyRecord.updated_at), func.max(StrategyRecord.id))
    ).one()
    return tuple(row)


class Strategies:
    """``Registry.strategies``: the functions above, each in a transaction of its own."""

    def __init__(self, session: SessionScope, reading: SessionScope) -> None:
        self._session = session
        self._reading = reading

    def add_strategy(self, name: str, router: str, composer: str, **fields: Any) -> StrategyRecord:
        """Store a definition that services/moe/definitions.py has checked (fields: router_params,
        composer_params, experts, fallback, description)."""
        with self._session() as s:
            return add_strategy(s, name, router, composer, **fields)

    def list_strategies(self) -> list[StrategyRecord]:
        with self._reading() as s:
            return list_strategies(s)

    def get_strategy(self, name: str) -> StrategyRecord:
        with self._reading() as s:
            return get_strategy(s, name)

    def remove_strategy(self, name: str) -> StrategyRecord:
        with self._session() as s:
            return remove_strategy(s, name)

    def strategies_fingerprint(self) -> tuple:
        with self._reading() as s:
            return fingerprint(s)
