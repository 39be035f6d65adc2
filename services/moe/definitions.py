"""Strategies as data: a definition (YAML, CLI, API) checked into a ``Strategy``.

A definition names its router and composer with their parameters, its expert set, a fallback
expert and a description. ``parse_definition`` checks the shape and the parameters each method
declares (``PARAMS``, routers/params.py) and needs nothing else; ``check_against_registry``
checks the expert set against what is registered now. Both raise ``DefinitionError`` with a
message that names the valid choices, before anything is stored. Expert sets:
services/moe/expert_sets.py.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from composer import composer_class, composer_names
from registry.errors import DefinitionError, RegistrationError
from registry.validation import check_name
from routers import router_class, router_names
from routers.params import check_params
from services.moe.expert_sets import Candidate, select_experts, split_expert_set, strategy_kinds
from services.moe.strategies import STRATEGIES, Strategy

FIELDS = ("name", "router", "composer", "router_params", "composer_params", "experts", "fallback", "description")


def _as_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v for v in (s.strip() for s in value.split(",")) if v]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise DefinitionError(f"{what} is a list of strings (or one comma-separated string), not {value!r}")


def _as_dict(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise DefinitionError(f"{what} is a mapping of parameter names to values, not {value!r}")
    return dict(value)


def parse_definition(data: Mapping[str, Any], *, source: str = "registry") -> Strategy:
    """A definition (``FIELDS``) as a ``Strategy``: its shape, its methods, their parameters."""
    if not isinstance(data, Mapping):
        raise DefinitionError(f"a strategy definition is a mapping with {', '.join(FIELDS)}, not {data!r}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise DefinitionError(
            f"unknown field(s) {', '.join(unknown)} in a strategy definition (its fields: {', '.join(FIELDS)})"
        )
    for required in ("name", "router", "composer"):
        if not isinstance(data.get(required), str) or not data[required]:
            raise DefinitionError(f"a strategy definition needs {required!r} (a string)")
    name = data["name"].removeprefix("moe/")
    try:
        check_name(name, "strategy name")
    except RegistrationError as exc:
        raise DefinitionError(str(exc)) from None
    full = f"moe/{name}"
    if full in STRATEGIES:
        raise DefinitionError(f"{full} is a built-in strategy; give yours another name")
    router, composer = data["router"], data["composer"]
    router_cls, composer_cls = router_class(router), composer_class(composer)
    if router_cls is None:
        raise DefinitionError(f"{full}: unknown router {router!r} (routers: {', '.join(router_names())})")
    if composer_cls is None:
        raise DefinitionError(f"{full}: unknown composer {composer!r} (composers: {', '.join(composer_names())})")
    if router_cls.level != composer_cls.level:
        fitting = [
            c for c in composer_names() if (cls := composer_class(c)) is not None and cls.level == router_cls.level
        ]
        raise DefinitionError(
            f"{full}: router {router!r} decides per {router_cls.level}, composer {composer!r} "
            f"executes per {composer_cls.level}; with {router!r} use {' or '.join(fitting)}"
        )
    router_params = check_params(
        f"{full}: router {router}", router_cls.PARAMS, _as_dict(data.get("router_params"), "router_params")
    )
    composer_params = check_params(
        f"{full}: composer {composer}", composer_cls.PARAMS, _as_dict(data.get("composer_params"), "composer_params")
    )
    experts = _as_list(data.get("experts"), "experts")
    split_expert_set(experts)  # the shape; the names are checked against the registry
    fallback = data.get("fallback")
    if fallback is not None:
        if not isinstance(fallback, str):
            raise DefinitionError(f"{full}: fallback is an expert's name, not {fallback!r}")
        try:
            check_name(fallback, "fallback expert name")
        except RegistrationError as exc:
            raise DefinitionError(f"{full}: {exc}") from None
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise DefinitionError(f"{full}: description is a string, not {description!r}")
    return Strategy(
        full,
        router,
        composer,
        description or f"{router} → {composer}",
        router_params,
        composer_params,
        experts=tuple(experts),
        fallback=fallback,
        source=source,
    )


@dataclass(frozen=True)
class Placement:
    """Where a strategy runs: the pool of ``base`` (empty: the default base), plus the ``extra``
    experts outside that base its expert set names (other bases' adapters and models, external
    experts), which only query-level strategies whose composer is not bound to one base take."""

    base: str = ""
    extra: tuple[str, ...] = ()


def check_against_registry(strategy: Strategy, experts: Iterable) -> Placement:  # registry Experts
    """The expert set and fallback of ``strategy`` against the ready ``experts`` now; returns where
    it runs. A merge or a token-level mixture computes in one base's weights, so its experts are
    that base's adapters. A query-level router with a composer that only calls engines (single,
    the votes, stitching) may choose among adapters of several bases, full models and external
    experts: the pool is then the base with most of them, plus the others as extra experts."""
    ready = {}
    for record in experts:  # the newest version of each name
        ready[record.name] = Candidate.of(record)
    names, filters = split_expert_set(strategy.experts)
    missing = [n for n in names if n not in ready]
    if missing:
        raise DefinitionError(
            f"{strategy.name}: no ready expert named {', '.join(missing)} (ready: {', '.join(sorted(ready)) or 'none'})"
        )
    if filters and not any(all(c.matches(k, v) for k, v in filters) for c in ready.values()):
        raise DefinitionError(
            f"{strategy.name}: no ready expert matches " + " and ".join(f"{k}:{v}" for k, v in filters)
        )
    kinds = strategy_kinds(strategy)
    chosen = [ready[n] for n in select_experts(strategy.experts, ready.values())] if strategy.experts else []
    wrong = [f"{c.name} ({c.kind})" for c in chosen if c.kind not in kinds]
    if wrong:
        raise DefinitionError(
            f"{strategy.name}: router {strategy.router!r} with composer {strategy.composer!r} "
            f"takes {' and '.join(kinds)} experts, not {', '.join(wrong)}"
        )
    composer_cls = composer_class(strategy.composer)
    one_base = strategy.level != "query" or (composer_cls is not None and composer_cls.one_base)
    fb = None
    if strategy.fallback is not None:
        fb = ready.get(strategy.fallback)
        if fb is None:
            raise DefinitionError(f"{strategy.name}: no ready expert named {strategy.fallback!r} for the fallback")
    counts = Counter(
        c.base for c in (*chosen, *([fb] if fb is not None else [])) if c.base is not None and c.kind != "external"
    )
    if one_base:
        if len(counts) > 1:
            raise DefinitionError(
                f"{strategy.name}: its experts are on {len(counts)} base models ({', '.join(sorted(counts))}); "
                f"composer {strategy.composer!r} with router {strategy.router!r} runs over one base's "
                "experts (filter with base:<name>, or choose a query-level router with single or vote)"
            )
        if fb is not None and fb.kind not in ("adapter", "model"):
            raise DefinitionError(f"{strategy.name}: the fallback {fb.name} must be an adapter or model")
    # the pool's base: the one most experts are on (ties: the first name)
    base = min(counts, key=lambda b: (-counts[b], b)) if counts else ""
    members = [*chosen, *([fb] if fb is not None else [])]
    outside = [c.name for c in members if c.kind == "external" or (c.base is not None and c.base != base)]
    return Placement(base, tuple(dict.fromkeys(outside)))


def load_file(path: str | Path) -> list[Strategy]:
    """The strategies of a YAML file: a list of definitions (or ``{strategies: [...]}``)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DefinitionError(f"strategies file {path}: {exc}") from exc
    if isinstance(data, Mapping) and set(data) == {"strategies"}:
        data = data["strategies"]
    if data is None:
        return []
    if not isinstance(data, list):
        raise DefinitionError(f"strategies file {path}: a list of strategy definitions, not {type(data).__name__}")
    out: dict[str, Strategy] = {}
    for i, item in enumerate(data):
        try:
            strategy = parse_definition(item, source=f"file:{path}")
        except DefinitionError as exc:
            raise DefinitionError(f"strategies file {path}, entry {i + 1}: {exc}") from None
        if strategy.name in out:
            raise DefinitionError(f"strategies file {path}: {strategy.name} is defined twice")
        out[strategy.name] = strategy
    return list(out.values())


def definition_of(strategy: Strategy) -> dict[str, Any]:
    """A strategy as the definition that makes it (what the API and `strategies show --json` print)."""
    return {
        "name": strategy.name,
        "router": strategy.router,
        "composer": strategy.composer,
        "router_params": dict(strategy.router_params),
        "composer_params": dict(strategy.composer_params),
        "experts": list(strategy.experts),
        "fallback": strategy.fallback,
        "description": strategy.description,
    }


def strategy_of_record(record) -> Strategy:  # a registry StrategyRecord
    """A stored definition as a ``Strategy`` (checked again: a plugin may have gone away)."""
    return parse_definition(
        {
            "name": record.name,
            "router": record.router,
            "composer": record.composer,
            "router_params": record.router_params,
            "composer_params": record.composer_params,
            "experts": record.experts,
            "fallback": record.fallback,
            "description": record.description,
        },
        source="registry",
    )
