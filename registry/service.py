"""The registry's entry point: ``Registry`` opens the database and the artifact store, and each
concern lives in a module of its own:

    registry/experts.py      base models and experts: registration, versions, lookup, removal
    registry/artifacts.py    routing artifacts, and the artifact store that holds every file
    registry/keys.py         the gateway's API keys
    registry/strategies.py   strategy definitions users add
    registry/suites.py       leaderboard suites and their examples
    registry/runs.py         leaderboard runs and their results

Each part is an attribute (``registry.experts.register_expert(...)``); the methods below are
one-line delegates with the same names, so callers keep saying ``registry.register_expert(...)``.

Records returned by the registry are detached ORM objects (``expire_on_commit=False``): their
columns and ``base`` are loaded; read examples with ``get_examples``. For anything else, open
``with registry.session() as s:`` and query the models directly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from registry.artifacts import Artifacts, ArtifactStore
from registry.config import artifact_root as default_artifact_root
from registry.config import database_url
from registry.db import ensure_schema, make_engine, make_sessionmaker, session_scope
from registry.experts import Experts
from registry.keys import Keys
from registry.models import (
    ApiKey,
    Artifact,
    BaseModel,
    Expert,
    ExpertExample,
    LeaderboardResult,
    LeaderboardRun,
    StrategyRecord,
    Suite,
    SuiteExample,
)
from registry.runs import Runs
from registry.strategies import Strategies
from registry.suites import Suites
from registry.validation import Limits


class Registry:
    def __init__(
        self,
        url: str | None = None,
        artifact_root: str | os.PathLike | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.url = url or database_url()
        self.store = ArtifactStore(artifact_root if artifact_root is not None else default_artifact_root())
        self.limits = limits or Limits.from_env()
        self.engine = make_engine(self.url)
        ensure_schema(self.engine)
        self._sessions = make_sessionmaker(self.engine)
        self._read_sessions = make_sessionmaker(self.engine, read_only=True)
        # The parts get ``session`` and ``reading``, not the sessionmakers: those are looked up on
        # each transaction, so swapping one (bench/bench_registry_reads.py) reaches every part.
        self.experts = Experts(self.session, self.reading, self.store, self.limits)
        self.artifacts = Artifacts(self.session, self.reading, self.store, self.limits, self.experts.get_expert)
        self.keys = Keys(self.session, self.reading)
        self.strategies = Strategies(self.session, self.reading)
        self.suites = Suites(self.session, self.reading)
        self.runs = Runs(self.session, self.reading)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: commits when the block ends, rolls back on an exception."""
        with session_scope(self._sessions) as session:
            yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """One transaction that only reads: on SQLite it takes no write lock, so it neither waits
        for a writer's transaction nor holds other readers up (registry/db.py)."""
        with session_scope(self._read_sessions) as session:
            yield session

    # --- base models and experts (registry/experts.py) -------------------------------------------

    def register_base(self, name: str, path: str | os.PathLike, trust_remote_code: bool = False) -> BaseModel:
        return self.experts.register_base(name, path, trust_remote_code)

    def remove_base(self, name: str, cascade: bool = False) -> tuple[BaseModel, list[Expert]]:
        return self.experts.remove_base(name, cascade)

    def get_base(self, name: str) -> BaseModel:
        return self.experts.get_base(name)

    def list_bases(self) -> list[BaseModel]:
        return self.experts.list_bases()

    def register_expert(
        self,
        name: str,
        kind: str,
        source: str | os.PathLike,
        base: str | None = None,
        version: str | None = None,
        domains: tuple[str, ...] | list[str] = (),
        skills: tuple[str, ...] | list[str] = (),
        description: str = "",
        examples: str | os.PathLike | list[dict] | None = None,
        cost: float | None = None,
        status: str = "ready",
        api_base: str | None = None,
        api_key_env: str | None = None,
    ) -> Expert:
        return self.experts.register_expert(
            name,
            kind,
            source,
            base,
            version,
            domains,
            skills,
            description,
            examples,
            cost,
            status,
            api_base,
            api_key_env,
        )

    def list_experts(self, kind: str | None = None, status: str | None = None) -> list[Expert]:
        return self.experts.list_experts(kind, status)

    def get_expert(self, name: str, version: str | None = None) -> Expert:
        return self.experts.get_expert(name, version)

    def get_examples(self, name: str, version: str | None = None, split: str | None = None) -> list[ExpertExample]:
        return self.experts.get_examples(name, version, split)

    def expert_path(self, expert: Expert) -> Path | None:
        return self.experts.expert_path(expert)

    def set_status(self, name: str, version: str, status: str) -> Expert:
        return self.experts.set_status(name, version, status)

    def remove_expert(self, name: str, version: str | None = None) -> list[Expert]:
        return self.experts.remove_expert(name, version)

    # --- routing artifacts (registry/artifacts.py) -----------------------------------------------

    def add_artifact(
        self,
        router: str,
        kind: str,
        data: bytes | str | os.PathLike,
        expert: str | None = None,
        version: str | None = None,
        filename: str = "artifact.bin",
    ) -> Artifact:
        return self.artifacts.add_artifact(router, kind, data, expert, version, filename)

    def get_artifacts(
        self,
        router: str | None = None,
        expert: str | None = None,
        version: str | None = None,
        kind: str | None = None,
    ) -> list[Artifact]:
        return self.artifacts.get_artifacts(router, expert, version, kind)

    def artifact_path(self, artifact: Artifact) -> Path:
        return self.artifacts.artifact_path(artifact)

    def remove_artifacts(self, router: str, expert: str | None = None, version: str | None = None) -> int:
        return self.artifacts.remove_artifacts(router, expert, version)

    # --- API keys (registry/keys.py) -------------------------------------------------------------

    def create_key(
        self, name: str, scope: str = "user", models: list[str] | tuple[str, ...] = (), rpm: int | None = None
    ) -> tuple[ApiKey, str]:
        return self.keys.create_key(name, scope, models, rpm)

    def verify_key(self, plaintext: str) -> ApiKey | None:
        return self.keys.verify_key(plaintext)

    def list_keys(self) -> list[ApiKey]:
        return self.keys.list_keys()

    def revoke_key(self, name: str) -> ApiKey:
        return self.keys.revoke_key(name)

    # --- strategies users define (registry/strategies.py) ----------------------------------------

    def add_strategy(self, name: str, router: str, composer: str, **fields: Any) -> StrategyRecord:
        return self.strategies.add_strategy(name, router, composer, **fields)

    def list_strategies(self) -> list[StrategyRecord]:
        return self.strategies.list_strategies()

    def get_strategy(self, name: str) -> StrategyRecord:
        return self.strategies.get_strategy(name)

    def remove_strategy(self, name: str) -> StrategyRecord:
        return self.strategies.remove_strategy(name)

    def strategies_fingerprint(self) -> tuple:
        return self.strategies.strategies_fingerprint()

    # --- leaderboard suites (registry/suites.py) and runs (registry/runs.py) ---------------------

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
        return self.suites.add_suite(
            name, rows, description=description, source=source, checksum=checksum, replace=replace
        )

    def get_suite(self, name: str) -> Suite:
        return self.suites.get_suite(name)

    def list_suites(self) -> list[Suite]:
        return self.suites.list_suites()

    def get_suite_examples(self, name: str, split: str | None = None) -> list[SuiteExample]:
        return self.suites.get_suite_examples(name, split)

    def remove_suite(self, name: str) -> Suite:
        return self.suites.remove_suite(name)

    def add_leaderboard_run(self, run: dict, results: list[dict]) -> LeaderboardRun:
        return self.runs.add_leaderboard_run(run, results)

    def list_leaderboard_runs(self, suite: str | None = None, limit: int | None = None) -> list[LeaderboardRun]:
        return self.runs.list_leaderboard_runs(suite, limit)

    def get_leaderboard_run(self, run_id: int | None = None, suite: str | None = None) -> LeaderboardRun:
        return self.runs.get_leaderboard_run(run_id, suite)

    def get_leaderboard_results(self, run_id: int) -> list[LeaderboardResult]:
        return self.runs.get_leaderboard_results(run_id)

    def remove_leaderboard_run(self, run_id: int) -> None:
        self.runs.remove_leaderboard_run(run_id)
