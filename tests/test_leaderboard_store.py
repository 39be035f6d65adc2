"""Leaderboard runs in the registry DB, on SQLite and Postgres: a run is stored whole, read back
exactly, and turned into the board every view shows (columns, best values, frontiers)."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from registry.errors import NotFoundError
from registry.models import LeaderboardResult
from registry.service import Registry
from services.leaderboard.aiq import aiq
from services.leaderboard.board import build_board
from services.leaderboard.runner import EntryOutcome, QueryOutcome, RunOutcome
from services.leaderboard.store import save_run

pytest_plugins = ["tests.conftest_db"]

SPLITS = ["test", "paraphrase"]


def outcome(
    split: str,
    task: str,
    correct: bool,
    experts: list[str],
    tokens: int,
    rate: float = 1.0,
    ms: float = 10.0,
    routed: bool | None = None,
    level_query: bool = True,
) -> QueryOutcome:
    return QueryOutcome(
        split,
        task,
        correct,
        "x",
        [(e, 1.0) for e in experts],
        (experts[0] if experts else "(base)") if level_query else None,
        routed,
        tokens - 2,
        2,
        tokens / 1000 * rate,
        ms,
    )


def hand_made_run() -> RunOutcome:
    """Two experts and two strategies, two queries per split, numbers chosen by hand."""
    entries = ["expert:a", "expert:b", "moe/oracle", "moe/vote"]
    spec = {
        # entry: per split [(task, correct, experts, tokens, routing correct)]
        "expert:a": [("ta", True, ["a"], 10, None), ("tb", False, ["a"], 10, None)],
        "expert:b": [("ta", False, ["b"], 20, None), ("tb", True, ["b"], 20, None)],
        "moe/oracle": [("ta", True, ["a"], 10, True), ("tb", True, ["b"], 20, True)],
        "moe/vote": [("ta", True, ["a", "b"], 30, True), ("tb", False, ["a", "b"], 30, False)],
    }
    results = {}
    for entry in entries:
        kind = "expert" if entry.startswith("expert:") else "strategy"
        for split in SPLITS:
            part = EntryOutcome(entry, kind, split, seconds=1.5)
            for i, (task, ok, experts, tokens, routed) in enumerate(spec[entry]):
                flip = split == "paraphrase" and entry == "moe/oracle" and i == 1  # oracle misses one paraphrase
                part.outcomes.append(
                    outcome(
                        split,
                        task,
                        ok and not flip,
                        experts,
                        tokens,
                        ms=5.0 + i,
                        routed=routed,
                        level_query=kind == "strategy",
                    )
                )
            results[(entry, split)] = part
    return RunOutcome(
        suite="skills",
        base_model="tiny",
        seed=3,
        n_per_task=2,
        splits=SPLITS,
        mode="grouped",
        entries=entries,
        results=results,
        n_queries=4,
        seconds=12.0,
        settings={"default_cost_per_1k_tokens": 1.0},
    )


def test_a_run_round_trips_and_pools_its_splits(registry: Registry) -> None:
    run = save_run(registry, hand_made_run())
    stored = registry.get_leaderboard_results(run.id)
    assert len(stored) == 4 * (len(SPLITS) + 1)  # every split plus the pooled row, per entry
    rows = {(r.entry, r.split): r for r in stored}
    vote_all = rows[("moe/vote", "all")]
    assert (vote_all.n, vote_all.correct, vote_all.accuracy) == (4, 2, 0.5)
    assert vote_all.routed == 4 and vote_all.routing_accuracy == 0.5
    assert vote_all.mean_experts == 2.0
    assert vote_all.prompt_tokens == 4 * 28 and vote_all.completion_tokens == 4 * 2
    assert vote_all.cost == pytest.approx(4 * 0.030)
    assert vote_all.per_task == {"ta": [2, 2], "tb": [0, 2]}
    assert vote_all.confusion == {"ta": {"a": 2}, "tb": {"a": 2}}
    oracle_para = rows[("moe/oracle", "paraphrase")]
    assert (oracle_para.correct, oracle_para.n) == (1, 2)
    assert rows[("expert:a", "test")].routing_accuracy is None
    assert rows[("expert:a", "test")].confusion == {}
    again = registry.get_leaderboard_run()
    assert (again.id, again.seed, again.splits, again.n_per_task) == (run.id, 3, SPLITS, 2)
    assert "machine" in again.settings  # the machine is recorded with the numbers


def test_the_board_computes_gap_best_and_aiq(registry: Registry) -> None:
    run = save_run(registry, hand_made_run())
    board = build_board(registry, run.id)
    by = {r["entry"]: r for r in board.rows}
    assert list(by) == ["expert:a", "expert:b", "moe/oracle", "moe/vote"]
    # oracle 3/4, vote 2/4, experts 2/4 each
    assert board.value(by["moe/vote"], "gap") == pytest.approx(0.25)
    assert board.value(by["moe/oracle"], "gap") == pytest.approx(0.0)
    assert board.value(by["moe/vote"], "cost") == pytest.approx(0.030)
    assert board.value(by["expert:a"], "tokens") == pytest.approx(10.0)
    # best marks leave the oracle out; all-equal columns mark nothing
    assert board.best["cost"] == {"expert:a"}
    assert board.best["routing"] == {"moe/vote"}
    assert "acc_all" not in board.best  # experts and vote all at 0.5
    # AIQ: the strategy's point with the experts' points over the run's cost range
    lo, hi = board.cost_range
    assert (lo, hi) == (pytest.approx(0.010), pytest.approx(0.030))
    expert_points = [(0.010, 0.5), (0.020, 0.5)]
    assert by["moe/oracle"]["aiq"] == pytest.approx(aiq([(0.015, 0.75), *expert_points], (lo, hi)))
    assert by["moe/vote"]["aiq"] == pytest.approx(aiq([(0.030, 0.5), *expert_points], (lo, hi)))
    assert board.zero_router["aiq"] == pytest.approx(0.5)
    assert by["expert:a"]["aiq"] is None
    data = json.loads(json.dumps(board.to_dict()))  # plain JSON all the way down
    assert [r["entry"] for r in data["rows"]] == list(by)
    assert data["rows"][2]["values"]["acc_all"] == pytest.approx(0.75)


def test_runs_are_listed_newest_first_and_removed_whole(registry: Registry) -> None:
    first = save_run(registry, hand_made_run())
    second = save_run(registry, hand_made_run())
    assert [r.id for r in registry.list_leaderboard_runs()] == [second.id, first.id]
    assert registry.get_leaderboard_run(suite="skills").id == second.id
    with pytest.raises(NotFoundError, match="no leaderboard run of suite 'other'"):
        registry.get_leaderboard_run(suite="other")
    registry.remove_leaderboard_run(second.id)
    with registry.session() as s:
        left = s.scalar(select(func.count()).select_from(LeaderboardResult))
    assert left == len(registry.get_leaderboard_results(first.id)) == 12


def test_a_failing_row_stores_no_run(registry: Registry) -> None:
    run = hand_made_run()
    rows = run.result_rows()
    rows[-1]["n"] = None  # NOT NULL
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError):
        registry.add_leaderboard_run(run.run_row(), rows)
    assert registry.list_leaderboard_runs() == []
