"""The leaderboard as people read it: one row per expert or strategy, the columns of
docs/leaderboard.md, the best value per column, and each strategy's cost-quality frontier.

The same ``Board`` feeds the CLI table, ``--json``, the HTML report and the gateway's page and JSON,
so they always agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from registry.service import Registry
from services.leaderboard.aiq import aiq, frontier
from services.leaderboard.store import ALL, load_run, result_dict, run_dict

ORACLE = "moe/oracle"
BOUND = "bound"  # rows computed from others (the per-segment oracle): no best is marked among them


@dataclass
class Column:
    key: str
    header: str
    get: Callable[[dict], float | None]
    better: str | None  # "high" | "low" | None (no best is marked)
    fmt: str  # format spec for a value
    help: str
    short: str = ""  # header in the terminal table (default: header)
    cli_fmt: str = ""  # format in the terminal table (default: fmt)


@dataclass
class Board:
    run: dict
    splits: list[str]
    rows: list[dict]
    cost_range: tuple[float, float]
    zero_router: dict  # experts alone only: {"aiq", "frontier"}
    columns: list[Column] = field(default_factory=list)
    best: dict[str, set[str]] = field(default_factory=dict)  # column key -> entries holding the best value

    def value(self, row: dict, key: str) -> float | None:
        return next(c for c in self.columns if c.key == key).get(row)

    def to_dict(self) -> dict:
        return {
            "run": self.run,
            "splits": self.splits,
            "columns": [{"key": c.key, "header": c.header, "better": c.better, "help": c.help} for c in self.columns],
            "rows": [
                {
                    **row,
                    "values": {c.key: c.get(row) for c in self.columns},
                    "best": sorted(k for k, entries in self.best.items() if row["entry"] in entries),
                }
                for row in self.rows
            ],
            "cost_range": list(self.cost_range),
            "zero_router": self.zero_router,
            "best_excludes": ORACLE,
        }


def per_query(metrics: dict, key: str) -> float | None:
    n = metrics["n"]
    if not n:
        return None
    if key == "tokens":
        return (metrics["prompt_tokens"] + metrics["completion_tokens"]) / n
    return metrics["cost"] / n


def build_board(registry: Registry, run_id: int | None = None, suite: str | None = None) -> Board:
    run, results = load_run(registry, run_id, suite)
    splits = list(run.splits)
    by_entry: dict[str, dict] = {}
    for r in results:
        d = result_dict(r)
        row = by_entry.setdefault(d["entry"], {"entry": d["entry"], "kind": d["kind"], "splits": {}, "all": None})
        if d["split"] == ALL:
            row["all"] = d
        else:
            row["splits"][d["split"]] = d
    rows = [r for r in by_entry.values() if r["all"] is not None]

    oracle = by_entry.get(ORACLE)
    for row in rows:
        row["gap_to_oracle"] = (
            {s: _gap(oracle["splits"].get(s), row["splits"].get(s)) for s in splits}
            | {ALL: _gap(oracle["all"], row["all"])}
            if oracle is not None
            else None
        )

    graded = any(graded_queries(row["all"]) for row in rows)
    texts = any(row["all"].get("loss") for row in rows)
    for row in rows:
        row["loss_gap_to_oracle"] = _loss_gap(oracle["all"], row["all"]) if oracle is not None and texts else None

    # cost-quality frontiers: a strategy's own point with the experts' points (RouterBench's frontier
    # of mixing the strategy with single experts), over the cost range of the whole run
    points: dict[str, tuple[float, float]] = {
        row["entry"]: (row["all"]["cost"] / row["all"]["n"], row["all"]["accuracy"])
        for row in rows
        if graded_queries(row["all"])
    }  # (cost per query, accuracy) of every entry that answered
    expert_points = [p for e, p in points.items() if by_entry[e]["kind"] == "expert"]
    costs = [c for c, _ in points.values()]
    cost_range = (min(costs), max(costs)) if costs else (0.0, 0.0)
    zero = {
        "aiq": aiq(expert_points, cost_range) if expert_points else None,
        "frontier": [list(p) for p in frontier(expert_points)],
    }
    for row in rows:
        own = points.get(row["entry"])
        if row["kind"] == "strategy" and own is not None:
            pts = [own, *expert_points]
            row["aiq"] = aiq(pts, cost_range)
            row["frontier"] = [list(p) for p in frontier(pts)]
        else:
            row["aiq"], row["frontier"] = None, []

    board = Board(run=run_dict(run), splits=splits, rows=rows, cost_range=cost_range, zero_router=zero)
    board.columns = make_columns(splits, graded=graded, texts=texts)
    board.best = best_values(board)
    return board


def graded_queries(metrics: dict | None) -> int:
    """Queries with an answer to judge (a text suite's scored documents are not)."""
    if not metrics:
        return 0
    return metrics["n"] - ((metrics.get("loss") or {}).get("documents", 0))


def nats_per_token(metrics: dict | None) -> float | None:
    """Held-out loss over every scored token of a result (None: it scored no text)."""
    labels = ((metrics or {}).get("loss") or {}).get("labels") or {}
    tokens = sum(t for _, t in labels.values())
    return sum(n for n, _ in labels.values()) / tokens if tokens else None


def _gap(oracle: dict | None, mine: dict | None) -> float | None:
    if not graded_queries(oracle) or not graded_queries(mine):
        return None
    assert oracle is not None and mine is not None
    return oracle["accuracy"] - mine["accuracy"]


def _loss_gap(oracle: dict, mine: dict) -> float | None:
    theirs, ours = nats_per_token(oracle), nats_per_token(mine)
    return None if theirs is None or ours is None else ours - theirs


def make_columns(splits: list[str], *, graded: bool = True, texts: bool = False) -> list[Column]:
    """The board's columns: accuracy where the run judged answers, held-out loss where it scored
    texts (a text suite's), then routing, cost and latency."""

    def acc(split: str) -> Callable[[dict], float | None]:
        def get(row: dict) -> float | None:
            m = row["all"] if split == ALL else row["splits"].get(split)
            return m["accuracy"] if graded_queries(m) else None

        return get

    def loss(split: str) -> Callable[[dict], float | None]:
        return lambda row: nats_per_token(row["all"] if split == ALL else row["splits"].get(split))

    def ppl(row: dict) -> float | None:
        value = nats_per_token(row["all"])
        return None if value is None else math.exp(value)

    cols = (
        []
        if not graded
        else [
            Column(
                f"acc_{s}",
                s,
                acc(s),
                "high",
                ".3f",
                f"accuracy on the {s} split",
                short=s if len(s) <= 6 else s[:4] + ".",
            )
            for s in splits
        ]
    )
    if graded:
        cols += [
            Column("acc_all", "all", acc(ALL), "high", ".3f", "accuracy over every query of every split"),
            Column(
                "gap",
                "gap to oracle",
                lambda r: (r["gap_to_oracle"] or {}).get(ALL),
                "low",
                "+.3f",
                "oracle's accuracy minus this one's, all splits (needs moe/oracle in the run)",
                short="gap",
            ),
        ]
    if texts:
        cols += [
            Column(
                f"loss_{s}",
                f"loss {s}",
                loss(s),
                "low",
                ".3f",
                f"held-out loss on the {s} split: nats per token of the text given its context",
                short=f"L {s}" if len(s) <= 6 else f"L {s[:4]}.",
            )
            for s in splits
        ]
        cols += [
            Column("loss_all", "loss all", loss(ALL), "low", ".3f", "nats per token over every split", short="L all"),
            Column("ppl", "perplexity", ppl, "low", ".2f", "exp(loss all)", short="ppl"),
            Column(
                "loss_gap",
                "loss vs oracle",
                lambda r: r["loss_gap_to_oracle"],
                "low",
                "+.3f",
                "this loss minus moe/oracle's (the per-document oracle), all splits",
                short="ΔL",
            ),
        ]
    cols += [
        Column(
            "routing",
            "routing acc",
            lambda r: r["all"]["routing_accuracy"],
            "high",
            ".3f",
            "top expert was trained on the gold task (query-level strategies; single-skill queries)",
            short="route",
        ),
        Column(
            "experts",
            "experts/query",
            lambda r: r["all"]["mean_experts"],
            None,
            ".2f",
            "mean experts called per query (a mixture counts every expert it mixes)",
            short="exp",
            cli_fmt=".1f",
        ),
        Column(
            "tokens",
            "tokens/query",
            lambda r: per_query(r["all"], "tokens"),
            "low",
            ".1f",
            "prompt + completion tokens of every engine call, per query",
            short="tok",
            cli_fmt=".0f",
        ),
        Column(
            "cost",
            "cost/query",
            lambda r: per_query(r["all"], "cost"),
            "low",
            ".4f",
            "tokens / 1000 × each expert's registry cost per 1k tokens (default for none)",
            short="cost",
            cli_fmt=".4g",
        ),
        Column(
            "p50",
            "p50 ms",
            lambda r: r["all"]["latency_p50_ms"],
            "low",
            ".1f",
            "median per-query latency (routing + token share of its batch)",
            short="p50",
            cli_fmt=".0f",
        ),
        Column(
            "p95",
            "p95 ms",
            lambda r: r["all"]["latency_p95_ms"],
            "low",
            ".1f",
            "95th percentile latency",
            short="p95",
            cli_fmt=".0f",
        ),
    ]
    if graded:
        cols.append(
            Column(
                "aiq",
                "AIQ",
                lambda r: r["aiq"],
                "high",
                ".3f",
                "RouterBench AIQ: area under the non-decreasing convex hull of this strategy + the experts",
            )
        )
    return cols


def best_values(board: Board) -> dict[str, set[str]]:
    """Per column, the entries holding its best value. The oracles are left out: upper bounds
    that need the gold task, not something to serve."""
    best: dict[str, set[str]] = {}
    for col in board.columns:
        if col.better is None:
            continue
        got = {r["entry"]: col.get(r) for r in board.rows if r["entry"] != ORACLE and r["kind"] != BOUND}
        values = {e: v for e, v in got.items() if v is not None}
        if not values or (len(values) > 1 and len(set(values.values())) == 1):  # all equal: none stands out
            continue
        target = max(values.values()) if col.better == "high" else min(values.values())
        best[col.key] = {e for e, v in values.items() if abs(v - target) <= 1e-12}
    return best
