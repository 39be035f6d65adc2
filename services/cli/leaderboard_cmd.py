"""``moerge leaderboard run|show|report|runs`` and ``moerge suite add|list|remove``."""

from __future__ import annotations

import os

# Busy-waiting OpenMP threads stall when the 2 cores are shared; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from services.cli import app
from services.cli.output import print_table
from services.cli.placement import DEVICE_HELP, DTYPE_HELP

console = Console()
leaderboard_app = typer.Typer(
    help="Measure every expert alone and every strategy on a suite; show, report and compare runs.",
    no_args_is_help=True,
)
suite_app = typer.Typer(
    help="Benchmark suites: the built-in `skills` and user suites from JSONL.", no_args_is_help=True
)
app.add_typer(leaderboard_app, name="leaderboard")
app.add_typer(suite_app, name="suite")


def _registry():
    from registry.service import Registry

    return Registry()


def _names(values: list[str] | None) -> list[str] | None:
    """Repeatable, comma-separated option values; None when not given, [] for `none`."""
    if values is None:
        return None
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    return [] if names == ["none"] else names


# ------------------------------------------------------------------------------------ leaderboard


@leaderboard_app.command("run")
def run(
    suite: Annotated[
        str, typer.Option(help="Suite: `skills` (built in) or one added with `moerge suite add`.")
    ] = "skills",
    strategies: Annotated[
        list[str] | None,
        typer.Option(
            "--strategies",
            "-s",
            help="Strategies to run, comma-separated or repeated (default: every one; `none`: no strategy).",
        ),
    ] = None,
    experts: Annotated[
        list[str] | None,
        typer.Option(
            "--experts", "-e", help="Experts to run alone (default: every ready expert of the base; `none`: no expert)."
        ),
    ] = None,
    skip: Annotated[
        list[str] | None,
        typer.Option(
            "--skip",
            help="Entries to leave out, comma-separated or repeated: strategies (moe/average-activation) or experts.",
        ),
    ] = None,
    splits: Annotated[
        list[str] | None,
        typer.Option(
            "--splits", help="Splits (default: every split of the suite; skills: test, paraphrase, composition)."
        ),
    ] = None,
    n_per_task: Annotated[
        int | None,
        typer.Option(
            "--n-per-task", min=1, help="Queries per task and split (default: the suite's sizes; a user suite: all)."
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Suite sample and router seed: the same seed reproduces the same numbers.")
    ] = 0,
    base: Annotated[
        str | None, typer.Option(help="Base model whose experts to use (default: the one with most).")
    ] = None,
    default_cost: Annotated[
        float,
        typer.Option(
            "--default-cost",
            min=0.0,
            help="Cost per 1k tokens of experts with no cost in the registry, and of the base.",
        ),
    ] = 1.0,
    mode: Annotated[str, typer.Option(help="grouped (batched by expert) or naive (one query at a time).")] = "grouped",
    report: Annotated[
        Path | None,
        typer.Option("--report", help="HTML report path (default: $MOERGE_HOME/reports/leaderboard-<run>.html)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the stored board as JSON instead of a table.")] = False,
    device: Annotated[str, typer.Option("--device", help=DEVICE_HELP)] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help=DTYPE_HELP)] = "auto",
) -> None:
    """Run the leaderboard, store it in the registry DB, print the table and the HTML report's path."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from services.leaderboard.runner import LeaderboardRunner, is_text_suite
    from services.leaderboard.store import save_run
    from services.leaderboard.suites import load_queries

    registry = _registry()
    with console.status("loading experts and routers …"):
        runner = LeaderboardRunner(
            registry, base=base, seed=seed, default_cost=default_cost, device=device, dtype=dtype
        )
        queries = load_queries(registry, suite, _names(splits), n_per_task, seed)
        entries = runner.resolve(_names(strategies), _names(experts), texts_only=is_text_suite(queries))
        skipped = _names(skip) or []
        skip_experts = [n.removeprefix("expert:") for n in skipped if n.removeprefix("expert:") in runner.pool.experts]
        skip_strategies = [n for n in skipped if n.removeprefix("expert:") not in runner.pool.experts]
        left_out = set(runner.resolve(skip_strategies, skip_experts))  # also checks that the names exist
        entries = [e for e in entries if e not in left_out]
        n_queries = sum(len(q) for q in queries.values())
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task("fitting / loading routers", total=len(entries) * n_queries)
        outcome = runner.run(
            suite,
            strategies=[e for e in entries if not e.startswith("expert:")],
            experts=[e.removeprefix("expert:") for e in entries if e.startswith("expert:")],
            splits=_names(splits),
            n_per_task=n_per_task,
            mode=mode,
            progress=lambda what, n: bar.update(task, advance=n, description=what),
        )
        bar.update(task, description="done")
    stored = save_run(registry, outcome)
    _print_board(stored.id, None, as_json)
    path = _write_report(stored.id, report)
    typer.echo(f"report: {path}", err=as_json)  # --json keeps stdout pure JSON


@leaderboard_app.command("show")
def show(
    run_id: Annotated[int | None, typer.Option("--run", help="Run id (default: the newest).")] = None,
    suite: Annotated[str | None, typer.Option(help="The newest run of this suite.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (every column, frontiers, confusions).")] = False,
) -> None:
    """Print a stored run as a table; the best value of each column is marked (*)."""
    _print_board(run_id, suite, as_json)


@leaderboard_app.command("report")
def report_cmd(
    run_id: Annotated[int | None, typer.Option("--run", help="Run id (default: the newest).")] = None,
    suite: Annotated[str | None, typer.Option(help="The newest run of this suite.")] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output file (default: $MOERGE_HOME/reports/leaderboard-<run>.html)."),
    ] = None,
) -> None:
    """Write a run as one self-contained HTML file with its plots; prints the file's path."""
    from services.leaderboard.board import build_board

    board = build_board(_registry(), run_id, suite)
    typer.echo(str(_write_report(board.run["id"], out)))


@leaderboard_app.command("runs")
def runs(
    suite: Annotated[str | None, typer.Option(help="Only runs of this suite.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = 20,
) -> None:
    """Stored runs, newest first, to compare them over time."""
    from rich import box

    table = Table(
        "run", "when (UTC)", "suite", "base", "seed", "per task", "queries", "mode", "seconds", box=box.SIMPLE_HEAD
    )
    for r in _registry().list_leaderboard_runs(suite, limit):
        table.add_row(
            str(r.id),
            r.created_at.strftime("%Y-%m-%d %H:%M"),
            r.suite,
            r.base_model,
            str(r.seed),
            str(r.n_per_task if r.n_per_task is not None else "default"),
            str(r.n_queries),
            r.mode,
            f"{r.seconds:.0f}",
        )
    print_table(table)


def _print_board(run_id: int | None, suite: str | None, as_json: bool) -> None:
    from rich import box

    from services.leaderboard.board import build_board

    board = build_board(_registry(), run_id, suite)
    if as_json:
        typer.echo(json.dumps(board.to_dict(), indent=2))
        return
    run = board.run
    per_task = run["n_per_task"] if run["n_per_task"] is not None else "default"
    table = Table(
        title=f"leaderboard run {run['id']}: {run['suite']} on {run['base_model']} "
        f"(seed {run['seed']}, {per_task} per task, {run['n_queries']} queries, {run['mode']})",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        title_justify="left",
    )
    table.add_column("entry", no_wrap=True)
    for c in board.columns:
        table.add_column(c.short or c.header, justify="right", no_wrap=True)
    previous = None
    for row in board.rows:
        if previous is not None and row["kind"] != previous:
            table.add_section()
        previous = row["kind"]
        cells = []
        for c in board.columns:
            v = c.get(row)
            text = "–" if v is None else format(v, c.cli_fmt or c.fmt)
            cells.append(f"[bold green]{text}*[/bold green]" if row["entry"] in board.best.get(c.key, set()) else text)
        name = row["entry"].removeprefix("expert:")
        name += f" [red]({row['all']['skipped']} skipped)[/red]" if row["all"]["skipped"] else ""
        table.add_row(name, *cells, style="dim" if row["kind"] == "expert" else None)
    zero = board.zero_router.get("aiq")
    keys = {c.key for c in board.columns}
    parts = ["* best per column (moe/oracle and bounds left out). Dim rows: experts alone."]
    if "acc_all" in keys:
        parts.append("acc = exact match per split; gap = oracle - acc (all);")
    if "loss_all" in keys:
        parts.append(
            "L = held-out loss, nats per token (lower is better); ppl = exp(L all); ΔL = L all - moe/oracle's;"
        )
    parts.append("route = routing accuracy; exp/tok/cost = experts, tokens, cost per query; p50/p95 = latency ms;")
    if "aiq" in keys:
        parts.append(
            f"AIQ over cost {board.cost_range[0]:.4g}-{board.cost_range[1]:.4g} per query (experts alone: "
            + ("-" if zero is None else f"{zero:.3f}")
            + ")."
        )
    parts.append("docs/leaderboard.md explains every column.")
    table.caption = " ".join(parts)
    print_table(table)


def _write_report(run_id: int, out: Path | None) -> Path:
    from registry.config import moerge_home
    from services.leaderboard.board import build_board
    from services.leaderboard.report import write_report

    board = build_board(_registry(), run_id)
    return write_report(board, out or moerge_home() / "reports" / f"leaderboard-{run_id}.html")


# ------------------------------------------------------------------------------------ suites


@suite_app.command("add")
def suite_add(
    name: Annotated[str, typer.Argument(help="Suite name (letters, digits, . _ -).")],
    path: Annotated[
        Path, typer.Argument(help="JSONL file: one {prompt, reference, task, split, metric[, choices]} per line.")
    ],
    description: Annotated[str, typer.Option(help="What the suite measures.")] = "",
    replace: Annotated[bool, typer.Option("--replace", help="Replace a suite of the same name.")] = False,
) -> None:
    """Import a suite from JSONL. Every bad line is reported with its number and nothing is imported."""
    from services.leaderboard.suites import import_suite

    suite = import_suite(_registry(), name, path, description=description, replace=replace)
    splits = sorted({e.split for e in _registry().get_suite_examples(suite.name)})
    console.print(f"suite {suite.name}: {suite.n_examples} examples in split(s) {', '.join(splits)}", highlight=False)


@suite_app.command("list")
def suite_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """The built-in suite and every imported one."""
    from services.leaderboard.suites import SKILLS_SPLITS

    reg = _registry()
    rows: list[dict[str, Any]] = [
        {
            "name": "skills",
            "examples": "generated",
            "splits": list(SKILLS_SPLITS),
            "builtin": True,
            "description": "the zoo's skills suite (services/zoo/skills.py)",
        }
    ]
    for s in reg.list_suites():
        splits = list(dict.fromkeys(e.split for e in reg.get_suite_examples(s.name)))
        rows.append(
            {"name": s.name, "examples": s.n_examples, "splits": splits, "builtin": False, "description": s.description}
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("suite", "examples", "splits", "description")
    for r in rows:
        table.add_row(r["name"], str(r["examples"]), ", ".join(r["splits"]), r["description"])
    print_table(table)


@suite_app.command("remove")
def suite_remove(name: Annotated[str, typer.Argument(help="An imported suite.")]) -> None:
    """Remove an imported suite (stored leaderboard runs of it are kept)."""
    _registry().remove_suite(name)
    console.print(f"removed suite {name}")
