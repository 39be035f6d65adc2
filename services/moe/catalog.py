"""Every strategy a process can run: the built-ins, a YAML file's, and the registry's.

``StrategyCatalog`` merges the three. The built-ins are code (services/moe/strategies.py); the
file is ``MOERGE_STRATEGIES`` (or the serve config's ``strategies.file``), read once; the
registry's rows are what users add with ``moerge strategies add`` or ``POST /v1/strategies``,
re-read whenever they change (one small query at most every ``refresh_interval_s``). A name is
defined once: a file or registry strategy cannot take a built-in's name, nor the file's.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from registry.errors import DefinitionError, NotFoundError
from registry.service import Registry
from services.moe.definitions import (
    Placement,
    check_against_registry,
    load_file,
    parse_definition,
    strategy_of_record,
)
from services.moe.strategies import STRATEGIES, Strategy

STRATEGIES_FILE_ENV = "MOERGE_STRATEGIES"

log = logging.getLogger("moerge.moe")


def strategies_file() -> Path | None:
    value = os.environ.get(STRATEGIES_FILE_ENV)
    return Path(value) if value else None


class StrategyCatalog:
    def __init__(self, registry: Registry, *, file: str | Path | None = None, refresh_interval_s: float = 1.0) -> None:
        self.registry = registry
        self.file = Path(file) if file is not None else strategies_file()
        self.from_file: dict[str, Strategy] = {s.name: s for s in load_file(self.file)} if self.file else {}
        self.refresh_interval_s = refresh_interval_s
        self._stored: dict[str, Strategy] = {}
        self._fingerprint: tuple | None = None
        self._checked_at = -float("inf")
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ reading

    def _registry_strategies(self) -> dict[str, Strategy]:
        now = time.monotonic()
        with self._lock:
            if now - self._checked_at < self.refresh_interval_s:
                return self._stored
            self._checked_at = now
            fingerprint = self.registry.strategies_fingerprint()
            if fingerprint != self._fingerprint:
                stored = {}
                for record in self.registry.list_strategies():
                    try:
                        strategy = strategy_of_record(record)
                    except DefinitionError as exc:  # e.g. its plugin was uninstalled: the others still serve
                        log.warning("stored strategy moe/%s is left out: %s", record.name, exc)
                        continue
                    if strategy.name not in self.from_file:
                        stored[strategy.name] = strategy
                self._stored, self._fingerprint = stored, fingerprint
            return self._stored

    def all(self) -> dict[str, Strategy]:
        return {**STRATEGIES, **self.from_file, **self._registry_strategies()}

    def user(self) -> dict[str, Strategy]:
        return {**self.from_file, **self._registry_strategies()}

    def get(self, name: str) -> Strategy:
        key = name if name.startswith("moe/") else f"moe/{name}"
        strategy = STRATEGIES.get(key) or self.from_file.get(key) or self._registry_strategies().get(key)
        if strategy is None:
            raise NotFoundError(f"unknown strategy {name!r}; `moerge strategies list` shows them")
        return strategy

    def placement_of(self, strategy: Strategy) -> Placement | None:
        """Where ``strategy`` runs now (``definitions.Placement``: its base's pool, and experts
        from outside that base); None when it names no experts or fallback (the default pool)."""
        if not strategy.experts and strategy.fallback is None:
            return None
        return check_against_registry(strategy, self.registry.list_experts(status="ready"))

    # ------------------------------------------------------------------ writing

    def check(self, definition: Mapping[str, Any]) -> tuple[Strategy, Placement]:
        """A definition checked against the methods and the registry: (strategy, where it runs)."""
        strategy = parse_definition(definition)
        if strategy.name in self.from_file:
            raise DefinitionError(f"{strategy.name} is defined in {self.file}; edit that file to change it")
        base = check_against_registry(strategy, self.registry.list_experts(status="ready"))
        return strategy, base

    def add(self, definition: Mapping[str, Any]) -> Strategy:
        """Check and store a definition; nothing is stored when it is refused."""
        strategy, _ = self.check(definition)
        self.registry.add_strategy(
            strategy.name.removeprefix("moe/"),
            strategy.router,
            strategy.composer,
            router_params=strategy.router_params,
            composer_params=strategy.composer_params,
            experts=list(strategy.experts),
            fallback=strategy.fallback,
            description=strategy.description,
        )
        self._checked_at = -float("inf")  # this process sees it at once
        return strategy

    def remove(self, name: str) -> Strategy:
        key = name if name.startswith("moe/") else f"moe/{name}"
        if key in STRATEGIES:
            raise DefinitionError(f"{key} is built in; it cannot be removed")
        if key in self.from_file:
            raise DefinitionError(f"{key} is defined in {self.file}; edit that file to remove it")
        strategy = self.get(key)
        self.registry.remove_strategy(key.removeprefix("moe/"))
        self._checked_at = -float("inf")
        return strategy
