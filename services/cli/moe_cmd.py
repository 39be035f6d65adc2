"""``moerge strategies list``, ``moerge route``, ``moerge eval``: strategies from the command line."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from services.cli import app
from services.cli.output import print_table

console = Console()
strategies_app = typer.Typer(help="Named (router, composer, params) strategies.", no_args_is_help=True)
app.add_typer(strategies_app, name="strategies")


def _moe(base: Optional[str], seed: int = 0):
    from registry.service import Registry
    from services.moe.pool import ExpertPool
    from services.moe.strategies import MoE

    return MoE(ExpertPool(Registry(), base), seed=seed)


@strategies_app.command("list")
def list_strategies(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Every strategy: its router, composer and what it does."""
    from services.moe.strategies import STRATEGIES

    if as_json:
        typer.echo(json.dumps([{"name": s.name, "router": s.router, "composer": s.composer, "level": s.level,
                                "description": s.description} for s in STRATEGIES.values()], indent=2))
        return
    table = Table("strategy", "router", "composer", "level", "description")
    for s in STRATEGIES.values():
        table.add_row(s.name, s.router, s.composer, s.level, s.description)
    print_table(table)


@app.command("route")
def route(
    prompt: str = typer.Argument(..., help="The request to route (zoo prompts: instruction, input line, 'Answer: ')."),
    strategy: str = typer.Option(..., "--strategy", "-s", help="Strategy name, e.g. moe/classifier."),
    task: Optional[str] = typer.Option(None, help="Gold task, for the oracle router."),
    base: Optional[str] = typer.Option(None, help="Base model whose experts to use (default: the one with most)."),
    answer: bool = typer.Option(False, "--answer", help="Also run the composer and print the answer."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1),
) -> None:
    """Show the experts (and weights) a strategy chooses for PROMPT; --answer runs it too."""
    from routers.base import MixtureSpec

    moe = _moe(base)
    routed = moe.route(strategy, prompt, task)
    d = routed.decision
    table = Table("expert", "weight", title=f"{strategy} → {d.router} ({routed.router_ms:.1f} ms)")
    if isinstance(d, MixtureSpec):
        scores = d.global_scores or {}
        for e in d.experts:
            table.add_row(e, f"global {scores[e]:.3f}" if e in scores else "per token")
        table.caption = f"token-level: gate={d.gate} top_k={d.top_k} alpha={d.alpha}"
    else:
        for name, weight in d.experts:
            table.add_row(name, f"{weight:.3f}")
        if not d.experts:
            table.caption = "no expert: the base model answers"
    print_table(table)
    if answer:
        [(completion, _)] = moe.run(strategy, [prompt], [task], max_new_tokens=max_new_tokens)
        console.print(f"answer: {completion.text}", highlight=False, markup=False)
        console.print(f"experts: {', '.join(f'{n}={w:.2f}' for n, w in completion.experts)}", highlight=False)


@app.command("eval")
def eval_strategy(
    strategy: str = typer.Option(..., "--strategy", "-s", help="Strategy (moe/…) or expert:<name> for one expert alone."),
    split: str = typer.Option("test", help="The split: test | paraphrase | composition | validation for skills; a user suite's own."),
    suite: str = typer.Option("skills", help="Suite name: the built-in skills, or one added with `moerge suite add`."),
    n_per_task: Optional[int] = typer.Option(None, "--n-per-task", min=1, help="Examples per task (default per split)."),
    seed: int = typer.Option(0, help="Suite and router seed: the same seed reproduces the same numbers."),
    base: Optional[str] = typer.Option(None, help="Base model whose experts to use."),
    as_json: bool = typer.Option(False, "--json", help="Print the full report with per-query records as JSON, and nothing else."),
) -> None:
    """Evaluate a strategy on a suite split; the last line is `accuracy=<fraction>` (with --json, the
    report alone: its `accuracy` field)."""
    from services.moe.evaluate import evaluate

    moe = _moe(base, seed)
    with console.status(f"evaluating {strategy} on {suite}/{split} …"):
        report = evaluate(strategy, suite, split, moe=moe, n_per_task=n_per_task, seed=seed)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    table = Table("task", "accuracy", title=f"{report.strategy} on {suite}/{split} ({report.n} queries)")
    for task, acc in report.per_task.items():
        table.add_row(task, f"{acc:.3f}")
    print_table(table)
    extra = f"routing_accuracy={report.routing_accuracy:.3f} " if report.routing_accuracy is not None else ""
    console.print(f"{extra}mean_experts={report.mean_experts:.2f} router_ms_p50={report.router_ms_p50:.1f} "
                  f"router_ms_p95={report.router_ms_p95:.1f} seconds={report.seconds:.1f}", highlight=False)
    typer.echo(f"accuracy={report.accuracy:.4f}")
