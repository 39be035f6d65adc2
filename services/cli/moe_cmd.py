"""``moerge strategies list|show|add|remove|methods``, ``moerge route``, ``moerge eval``: strategies
from the command line (docs/strategies.md)."""

from __future__ import annotations

import json
import math
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from services.cli import app
from services.cli.output import print_table
from services.cli.placement import device_option, dtype_option

console = Console()
strategies_app = typer.Typer(
    help="Strategies: a router and a composer with their parameters, over an expert set. "
    "Add your own with `strategies add` (docs/strategies.md).",
    no_args_is_help=True,
)
app.add_typer(strategies_app, name="strategies")


def _catalog():
    from registry.service import Registry
    from services.moe.catalog import StrategyCatalog

    return StrategyCatalog(Registry())


def _moe(base: Optional[str], seed: int = 0, strategy: Optional[str] = None, device: str = "auto", dtype: str = "auto"):
    """The runtime over ``base``'s experts; without ``base``, where ``strategy``'s expert set is
    (a user strategy: its base, and experts from outside it), else the base with the most experts."""
    from services.moe.pool import ExpertPool
    from services.moe.strategies import MoE

    catalog = _catalog()
    extra: tuple[str, ...] = ()
    if base is None and strategy is not None and not strategy.startswith("expert:"):
        placement = catalog.placement_of(catalog.get(strategy))
        if placement is not None:
            base, extra = placement.base or None, placement.extra
    pool = ExpertPool(catalog.registry, base, extra=extra, device=device, dtype=dtype)
    return MoE(pool, seed=seed, catalog=catalog)


def _params(pairs: list[str] | None, what: str) -> dict[str, str]:
    """``k=v`` options as a dict; the values are typed by the method's declared parameters."""
    from registry.errors import DefinitionError

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DefinitionError(f"{what} takes key=value, not {pair!r}")
        out[key.strip()] = value
    return out


@strategies_app.command("list")
def list_strategies(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Every strategy: built-in, from the MOERGE_STRATEGIES file, and added to the registry."""
    from services.moe.definitions import definition_of

    strategies = _catalog().all().values()
    if as_json:
        typer.echo(
            json.dumps([{**definition_of(s), "level": s.level, "source": s.source} for s in strategies], indent=2)
        )
        return
    table = Table("strategy", "router", "composer", "level", "experts", "source", "description")
    for s in strategies:
        table.add_row(
            s.name, s.router, s.composer, s.level, ",".join(s.experts) or "all", s.source.split(":")[0], s.description
        )
    print_table(table)


def _params_of(cls: Any) -> tuple:
    """A router's or composer's declared parameters; none for a name that is not (or no longer) installed."""
    return cls.PARAMS if cls is not None else ()


def _method_params(declared: tuple, given: dict) -> list[dict]:
    return [{**p.describe(), **({"value": given[p.name]} if p.name in given else {})} for p in declared]


@strategies_app.command("show")
def show_strategy(
    name: str = typer.Argument(..., help="The strategy, e.g. moe/legal or legal."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """One strategy: its definition, the experts it chooses among now, and every parameter its
    router and composer declare (value set, or default)."""
    from composer import composer_class
    from routers import router_class
    from services.moe.definitions import definition_of
    from services.moe.expert_sets import Candidate, select_experts, strategy_kinds

    catalog = _catalog()
    s = catalog.get(name)
    kinds = strategy_kinds(s)
    latest = {e.name: Candidate.of(e) for e in catalog.registry.list_experts(status="ready")}
    chosen = select_experts(s.experts, [c for c in latest.values() if c.kind in kinds])
    doc = {
        **definition_of(s),
        "level": s.level,
        "source": s.source,
        "chooses_among": chosen,
        "router_parameters": _method_params(_params_of(router_class(s.router)), s.router_params),
        "composer_parameters": _method_params(_params_of(composer_class(s.composer)), s.composer_params),
    }
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    console.print(f"[bold]{s.name}[/bold]  {s.description}", highlight=False)
    console.print(f"router {s.router} → composer {s.composer} ({s.level}-level; {s.source})", highlight=False)
    console.print(
        f"experts: {', '.join(s.experts) or 'every expert'} → now {', '.join(chosen) or 'none'}"
        + (f"; fallback {s.fallback}" if s.fallback else ""),
        highlight=False,
    )
    for title, params in (("router", doc["router_parameters"]), ("composer", doc["composer_parameters"])):
        table = Table("parameter", "type", "value", "default", "help", title=f"{title} parameters")
        for p in params:
            table.add_row(p["name"], p["type"], str(p.get("value", "")), str(p["default"]), p["help"])
        print_table(table)


@strategies_app.command("add")
def add_strategy(
    name: str = typer.Argument(..., help="The new strategy's name; it is served as moe/NAME."),
    router: str = typer.Option(..., "--router", help="Router name (`moerge strategies methods` lists them)."),
    composer: str = typer.Option(..., "--composer", help="Composer name (`moerge strategies methods` lists them)."),
    router_param: Optional[list[str]] = typer.Option(
        None, "--router-param", help="A router parameter, key=value; repeat for more."
    ),
    composer_param: Optional[list[str]] = typer.Option(
        None, "--composer-param", help="A composer parameter, key=value; repeat for more."
    ),
    experts: Optional[str] = typer.Option(
        None,
        "--experts",
        help="Expert names and filters (domain:…, skill:…, base:…, kind:…, tag:…), comma-separated; default: every expert.",
    ),
    fallback: Optional[str] = typer.Option(
        None, "--fallback", help="The expert that answers when the router chooses none, or the chosen ones fail."
    ),
    description: str = typer.Option("", "--description", help="What the strategy is for."),
    as_json: bool = typer.Option(False, "--json", help="Print the stored definition as JSON."),
) -> None:
    """Define a strategy and store it in the registry: checked first, nothing stored if refused.
    A running server serves it within seconds, without a restart."""
    from services.moe.definitions import definition_of

    strategy = _catalog().add(
        {
            "name": name,
            "router": router,
            "composer": composer,
            "router_params": _params(router_param, "--router-param"),
            "composer_params": _params(composer_param, "--composer-param"),
            "experts": experts or [],
            "fallback": fallback,
            "description": description,
        }
    )
    if as_json:
        typer.echo(
            json.dumps({**definition_of(strategy), "level": strategy.level, "source": strategy.source}, indent=2)
        )
        return
    console.print(f"[green]added[/green] {strategy.name}: {strategy.router} → {strategy.composer}", highlight=False)


@strategies_app.command("remove")
def remove_strategy(name: str = typer.Argument(..., help="A strategy added with `strategies add`.")) -> None:
    """Remove a strategy from the registry (built-ins and the file's stay)."""
    strategy = _catalog().remove(name)
    console.print(f"[green]removed[/green] {strategy.name}", highlight=False)


@strategies_app.command("methods")
def list_methods(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables.")) -> None:
    """Every router and composer a strategy can name (plugins included), with its level and parameters."""
    from composer import composer_class, composer_names
    from routers import router_class, router_names

    routers = [(n, c) for n in router_names() if (c := router_class(n)) is not None]
    composers = [(n, k) for n in composer_names() if (k := composer_class(n)) is not None]
    doc: dict[str, list[dict[str, Any]]] = {
        "routers": [
            {"name": n, "level": c.level, "kinds": list(c.kinds), "parameters": [p.describe() for p in c.PARAMS]}
            for n, c in routers
        ],
        "composers": [
            {"name": n, "level": k.level, "parameters": [p.describe() for p in k.PARAMS]} for n, k in composers
        ],
    }
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    for kind in ("routers", "composers"):
        table = Table(kind[:-1], "level", "parameters", title=kind)
        for m in doc[kind]:
            table.add_row(
                m["name"],
                m["level"],
                ", ".join(f"{p['name']}: {p['type']} = {p['default']}" for p in m["parameters"]) or "none",
            )
        print_table(table)


@app.command("route")
def route(
    prompt: str = typer.Argument(..., help="The request to route (zoo prompts: instruction, input line, 'Answer: ')."),
    strategy: str = typer.Option(..., "--strategy", "-s", help="Strategy name, e.g. moe/classifier."),
    task: Optional[str] = typer.Option(None, help="Gold task, for the oracle router."),
    base: Optional[str] = typer.Option(None, help="Base model whose experts to use (default: the one with most)."),
    answer: bool = typer.Option(False, "--answer", help="Also run the composer and print the answer."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1),
    device: str = device_option(),
    dtype: str = dtype_option(),
) -> None:
    """Show the experts (and weights) a strategy chooses for PROMPT; --answer runs it too."""
    from routers.base import MixtureSpec

    moe = _moe(base, strategy=strategy, device=device, dtype=dtype)
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
    strategy: str = typer.Option(
        ..., "--strategy", "-s", help="Strategy (moe/…) or expert:<name> for one expert alone."
    ),
    split: str = typer.Option(
        "test", help="The split: test | paraphrase | composition | validation for skills; a user suite's own."
    ),
    suite: str = typer.Option("skills", help="Suite name: the built-in skills, or one added with `moerge suite add`."),
    n_per_task: Optional[int] = typer.Option(
        None, "--n-per-task", min=1, help="Examples per task (default per split)."
    ),
    seed: int = typer.Option(0, help="Suite and router seed: the same seed reproduces the same numbers."),
    base: Optional[str] = typer.Option(None, help="Base model whose experts to use."),
    as_json: bool = typer.Option(
        False, "--json", help="Print the full report with per-query records as JSON, and nothing else."
    ),
    device: str = device_option(),
    dtype: str = dtype_option(),
) -> None:
    """Evaluate a strategy on a suite split; the last line is `accuracy=<fraction>`, or on a text
    suite (metric loss) `loss=<nats per token>` (with --json, the report alone: its `accuracy` or
    `loss` field)."""
    from services.moe.evaluate import evaluate

    moe = _moe(base, seed, strategy, device, dtype)
    with console.status(f"evaluating {strategy} on {suite}/{split} …"):
        report = evaluate(strategy, suite, split, moe=moe, n_per_task=n_per_task, seed=seed)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    if report.loss is not None:
        table = Table(
            "segment", "nats/token", "perplexity", title=f"{report.strategy} on {suite}/{split} ({report.n} documents)"
        )
        for task, value in report.loss_per_task.items():
            table.add_row(task, f"{value:.4f}", f"{math.exp(value):.2f}")
    else:
        table = Table("task", "accuracy", title=f"{report.strategy} on {suite}/{split} ({report.n} queries)")
        for task, acc in report.per_task.items():
            table.add_row(task, f"{acc:.3f}")
    print_table(table)
    extra = f"routing_accuracy={report.routing_accuracy:.3f} " if report.routing_accuracy is not None else ""
    console.print(
        f"{extra}mean_experts={report.mean_experts:.2f} router_ms_p50={report.router_ms_p50:.1f} "
        f"router_ms_p95={report.router_ms_p95:.1f} seconds={report.seconds:.1f}",
        highlight=False,
    )
    if report.loss is not None:
        typer.echo(f"perplexity={math.exp(report.loss):.4f}")
        typer.echo(f"loss={report.loss:.4f}")
    else:
        typer.echo(f"accuracy={report.accuracy:.4f}")
