"""Leaderboard runs in the registry DB: write a finished run (one transaction), read runs back."""

from __future__ import annotations

import os
import platform
from typing import TYPE_CHECKING

from registry.models import LeaderboardResult, LeaderboardRun
from registry.service import Registry

if TYPE_CHECKING:  # the runner loads torch; readers of stored runs (the gateway page) need not
    from services.leaderboard.runner import RunOutcome

ALL = "all"  # the pooled row over every split of a run


def machine() -> str:
    """The machine in words, stored with every run (numbers from different machines differ)."""
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        cpu = platform.processor() or "?"
    return f"{cpu}, {os.cpu_count()} cores, python {platform.python_version()}"


def save_run(registry: Registry, outcome: RunOutcome) -> LeaderboardRun:
    """Store the run with its per-split and pooled rows; nothing is stored if any row fails."""
    run = outcome.run_row()
    run["settings"] = {**run["settings"], "machine": machine()}
    return registry.add_leaderboard_run(run, outcome.result_rows())


def load_run(
    registry: Registry, run_id: int | None = None, suite: str | None = None
) -> tuple[LeaderboardRun, list[LeaderboardResult]]:
    run = registry.get_leaderboard_run(run_id, suite)
    return run, registry.get_leaderboard_results(run.id)


RESULT_FIELDS = (
    "entry",
    "kind",
    "split",
    "n",
    "correct",
    "accuracy",
    "skipped",
    "routed",
    "routing_accuracy",
    "mean_experts",
    "prompt_tokens",
    "completion_tokens",
    "cost",
    "latency_p50_ms",
    "latency_p95_ms",
    "seconds",
    "per_task",
    "confusion",
    "loss",
)


def result_dict(row: LeaderboardResult) -> dict:
    return {k: getattr(row, k) for k in RESULT_FIELDS}


def run_dict(run: LeaderboardRun) -> dict:
    return {
        "id": run.id,
        "suite": run.suite,
        "base_model": run.base_model,
        "seed": run.seed,
        "n_per_task": run.n_per_task,
        "splits": list(run.splits),
        "mode": run.mode,
        "n_queries": run.n_queries,
        "seconds": run.seconds,
        "settings": dict(run.settings or {}),
        "created_at": run.created_at.isoformat() if run.created_at else None,
    }
