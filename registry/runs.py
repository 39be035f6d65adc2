"""Leaderboard runs: the ``leaderboard_runs`` rows and their ``leaderboard_results``.

The runner (``services.leaderboard``) measures; the registry stores each run whole or not at all.
"""

from __future__ import annotations

from sqlalchemy import select

from registry.db import SessionScope
from registry.errors import NotFoundError
from registry.models import LeaderboardResult, LeaderboardRun


class Runs:
    def __init__(self, session: SessionScope, reading: SessionScope) -> None:
        self._session = session
        self._reading = reading

    def add_leaderboard_run(self, run: dict, results: list[dict]) -> LeaderboardRun:
        """Store a run and every result row in one transaction: a run is either whole or absent.
        ``run`` holds LeaderboardRun columns, each of ``results`` LeaderboardResult columns."""
        with self._session() as s:
            row = LeaderboardRun(**run)
            row.results = [LeaderboardResult(**r) for r in results]
            s.add(row)
            s.flush()
        return row

    def list_leaderboard_runs(self, suite: str | None = None, limit: int | None = None) -> list[LeaderboardRun]:
        """Runs, newest first."""
        with self._reading() as s:
            q = select(LeaderboardRun)
            if suite is not None:
                q = q.where(LeaderboardRun.suite == suite)
            q = q.order_by(LeaderboardRun.id.desc())
            if limit is not None:
                q = q.limit(limit)
            return list(s.scalars(q))

    def get_leaderboard_run(self, run_id: int | None = None, suite: str | None = None) -> LeaderboardRun:
        """A run by id, or the newest one (of ``suite``, when given)."""
        with self._reading() as s:
            if run_id is not None:
                run = s.get(LeaderboardRun, run_id)
            else:
                q = select(LeaderboardRun)
                if suite is not None:
                    q = q.where(LeaderboardRun.suite == suite)
                run = s.scalars(q.order_by(LeaderboardRun.id.desc()).limit(1)).first()
        if run is None:
            what = f"run {run_id}" if run_id is not None else "run" + (f" of suite {suite!r}" if suite else "")
            raise NotFoundError(f"no leaderboard {what} (start one with `moerge leaderboard run`)")
        return run

    def get_leaderboard_results(self, run_id: int) -> list[LeaderboardResult]:
        with self._reading() as s:
            q = select(LeaderboardResult).where(LeaderboardResult.run_id == run_id)
            return list(s.scalars(q.order_by(LeaderboardResult.id)))

    def remove_leaderboard_run(self, run_id: int) -> None:
        with self._session() as s:
            run = s.get(LeaderboardRun, run_id)
            if run is None:
                raise NotFoundError(f"no leaderboard run {run_id}")
            s.delete(run)
