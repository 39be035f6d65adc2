"""Serving strategies: ``moe/<name>`` answered over whatever experts the registry holds now.

A ``StrategyHost`` wraps the ``MoE`` runtime for a long-running server. It watches the registry
(at most once per ``refresh_interval_s``, one query) and, when the set of ready experts changed,
builds a fresh ``ExpertPool`` + ``MoE``: routing artifacts are stored per expert, so only a newly
registered expert is fitted (the classifier retrains its head) and a removed one simply drops out.
That is what makes hot registration work without a restart, in-process and on Ray alike.
Strategies users define are read from the registry the same way (``StrategyCatalog``): one added
over the API is served within ``refresh_interval_s``, on the pool of its experts' base.

A query-level decision whose top expert fails on the engine falls back to the next expert the
router ranked (the provenance says so); when every ranked expert fails, the error reaches the
gateway (503).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from composer.base import Completion, ComposeError
from composer.engine_protocol import EngineError, RequestError
from registry.errors import NotFoundError
from registry.service import Registry
from routers import router_class
from routers.base import Decision
from services.gateway.backend import LiveStrategies
from services.moe.catalog import StrategyCatalog
from services.moe.definitions import Placement
from services.moe.pool import ExpertPool
from services.moe.strategies import MoE, Routed, Strategy


def needs_gold_task(strategy: Strategy) -> bool:
    """A strategy whose router needs each query's gold task (the oracle) cannot be served: a live
    query has none."""
    cls = router_class(strategy.router)
    return cls is not None and "gold_task" in cls.needs


def servable_strategies(names: list[str] | None, catalog: StrategyCatalog) -> list[str]:
    """The strategies a server offers at start: ``names`` (checked) or every one that needs no
    gold task (the built-ins, and the catalog's file and registry strategies)."""
    chosen = list(catalog.all().values()) if names is None else [catalog.get(n) for n in names]
    if names is not None:
        for strategy in chosen:
            if needs_gold_task(strategy):
                raise NotFoundError(f"{strategy.name} needs each query's gold task; it can be evaluated, not served")
    return [s.name for s in chosen if not needs_gold_task(s)]


def served_names(configured: list[str], catalog: StrategyCatalog) -> list[str]:
    """``configured`` (``servable_strategies``), then every strategy stored in the registry."""
    stored = [
        n
        for n, s in catalog.user().items()
        if s.source == "registry" and n not in configured and not needs_gold_task(s)
    ]
    return configured + stored


class StrategyHost:
    def __init__(
        self,
        registry: Registry,
        names: list[str] | None = None,
        *,
        engine_factory: Callable[[ExpertPool], object] | None = None,
        refresh_interval_s: float = 1.0,
        seed: int = 0,
        catalog: StrategyCatalog | None = None,
        engine_args: Callable[[str], Mapping[str, Any]] | None = None,
    ) -> None:
        self.registry = registry
        # base name -> its engine_args: where pools run their merges, mixtures and router fitting
        self._engine_args = engine_args
        self.catalog = catalog or StrategyCatalog(registry, refresh_interval_s=refresh_interval_s)
        self._configured = servable_strategies(names, self.catalog)
        # builds the engine query-level composers use for a pool (Ray: the remote engine);
        # None: the pool's own in-process hf engine
        self._engine_factory = engine_factory
        self.refresh_interval_s = refresh_interval_s
        self.seed = seed
        self._moe: MoE | None = None  # over the default pool (the base with the most experts)
        # other pools, for strategies over other bases' experts or over several bases' and external
        # experts: by placement (base, extra experts)
        self._moes: dict[Placement, MoE] = {}
        self._placements: dict[str, Placement | None] = {}  # strategy definition -> where it runs
        self._fingerprint: tuple | None = None
        self._checked_at = 0.0
        self._lock = threading.Lock()  # one request at a time: routers and hf engines are not thread-safe
        self.rebuilds = 0

    # ------------------------------------------------------------------ registry watch

    def _current_fingerprint(self) -> tuple:
        return tuple(sorted((e.id, e.updated_at.isoformat()) for e in self.registry.list_experts(status="ready")))

    @property
    def names(self) -> list[str]:
        """What this host serves now: the strategies configured at start, and every one stored in
        the registry since (``moerge strategies add``, ``POST /v1/strategies``)."""
        return served_names(self._configured, self.catalog)

    def _pool_moe(self, base: str | None, extra: tuple[str, ...] = ()) -> MoE:
        pool = ExpertPool(self.registry, base, extra=extra, engine_args=self._engine_args)
        if self._engine_factory is not None:
            pool.attach_engine(self._engine_factory(pool))
        return MoE(pool, seed=self.seed, catalog=self.catalog)

    def moe(self, strategy: Strategy | None = None) -> MoE:
        """The runtime over the registry's current experts (rebuilt when they changed): the
        default pool's, or the pool where ``strategy``'s expert set is (``Placement``)."""
        now = time.monotonic()
        if self._moe is None or now - self._checked_at >= self.refresh_interval_s:
            self._checked_at = now
            fingerprint = self._current_fingerprint()
            if self._moe is None or fingerprint != self._fingerprint:
                self._moes, self._placements = {}, {}
                self._moe = self._pool_moe(None)
                self._fingerprint = fingerprint
                self.rebuilds += 1
        placement = self._placement_of(strategy) if strategy is not None else None
        if placement is None or (placement.base in ("", self._moe.pool.base.name) and not placement.extra):
            return self._moe
        if placement not in self._moes:
            self._moes[placement] = self._pool_moe(placement.base or None, placement.extra)
        return self._moes[placement]

    def _placement_of(self, strategy: Strategy) -> Placement | None:
        key = repr(strategy)  # the whole definition: one removed and defined again is looked up again
        if key not in self._placements:
            self._placements[key] = self.catalog.placement_of(strategy)
        return self._placements[key]

    # ------------------------------------------------------------------ answering

    def _served(self, name: str) -> Strategy:
        strategy = self.catalog.get(name)
        if strategy.name not in self.names:
            raise NotFoundError(f"strategy {strategy.name} is not served here (served: {', '.join(self.names)})")
        return strategy

    def complete_many(
        self, name: str, prompts: list[str], conversations: list | None = None, **sampling
    ) -> list[Completion]:
        """Several prompts for one strategy in one ``MoE.run`` (routers decide per prompt; the
        engine calls are batched by expert). If an engine fails, each prompt is answered alone so
        the fall-back applies to the prompts that need it. ``sampling``: ``MoE.run``'s
        max_new_tokens, temperature, seed, top_p, stop, …; ``conversations``: each prompt's own
        chat messages (``MoE.run``)."""
        strategy = self._served(name)
        try:
            results = self._run(strategy, prompts, sampling, conversations)
        except EngineError:
            results = None
        if results is None:  # each caller gets its own answer, or its own error
            own = conversations or [sampling.get("messages", ())] * len(prompts)
            return [
                self._complete_or_error(name, p, {**sampling, "messages": c})  # type: ignore[misc]
                for p, c in zip(prompts, own)
            ]
        out = []
        for completion, routed in results:
            completion.provenance.decision_info = {**completion.provenance.decision_info, "router_ms": routed.router_ms}
            out.append(completion)
        return out

    def _complete_or_error(self, name: str, prompt: str, sampling: dict) -> Completion | Exception:
        try:
            return self.complete(name, prompt, **sampling)
        except Exception as exc:  # noqa: BLE001 - handed to this prompt's caller, who raises it
            return exc

    def complete(self, name: str, prompt: str, **sampling) -> Completion:
        strategy = self._served(name)
        try:
            [(completion, routed)] = self._run(strategy, [prompt], sampling)
        except EngineError as exc:
            # a request the chosen expert cannot take as asked (too long, a template that refuses
            # it) is the client's 400, not an engine failure to route around
            if isinstance(exc, RequestError) or strategy.level != "query" or strategy.composer != "single":
                raise
            with self._lock:
                completion, routed = self._fall_back(self.moe(strategy), strategy, prompt, exc, sampling)
        completion.provenance.decision_info = {**completion.provenance.decision_info, "router_ms": routed.router_ms}
        return completion

    def _run(
        self, strategy: Strategy, prompts: list[str], sampling: dict, conversations: list | None = None
    ) -> list[tuple[Completion, Routed]]:
        """``MoE.run`` under the lock, but for a strategy whose answer only calls a remote engine
        (``engine_factory``; single and ensemble composers) the lock covers the routing alone: the
        generation on the engine deployments then runs beside other requests' routing (a stream's
        ``decide``, the next batch) instead of holding them for its whole length."""
        with self._lock:
            moe = self.moe(strategy)
            if self._engine_factory is None or not moe.answers_without_routers(strategy):
                return moe.run(strategy, prompts, conversations=conversations, **sampling)
            routed = moe.route_many(strategy, prompts)
        return moe.answer(strategy, prompts, routed, conversations, **sampling)

    def decide(self, name: str, prompt: str) -> Routed | None:
        """The router's decision alone, for a strategy whose answer is one expert's (query-level
        routing, the single composer) — the gateway then streams that expert's generation itself,
        token by token. None for every other strategy: they answer whole (``complete``)."""
        strategy = self._served(name)
        if strategy.level != "query" or strategy.composer != "single":
            return None
        with self._lock:
            routed = self.moe(strategy).route(strategy, prompt)
        info = {**routed.decision.info, "router_ms": routed.router_ms}
        return Routed(replace(routed.decision, info=info), routed.router_ms)

    def _fall_back(
        self, moe: MoE, strategy: Strategy, prompt: str, first: EngineError, sampling: dict
    ) -> tuple[Completion, Routed]:
        """The router's ranking, top expert failed: try the others in order."""
        from composer.engine_protocol import GenerateRequest

        routed = moe.route(strategy, prompt)
        decision: Decision = routed.decision  # type: ignore[assignment]
        failed = [decision.top]
        errors = [str(first)]
        ranked = list(decision.experts)
        if strategy.fallback is not None and strategy.fallback not in {name for name, _ in ranked}:
            ranked.append((strategy.fallback, 0.0))  # the strategy's fallback expert, last
        for i in range(1, len(ranked)):
            rest = Decision(decision.router, ranked[i:], dict(decision.info))
            rest.info["fallback"] = f"{', '.join(map(str, failed))} failed on the engine; {rest.top} answered"
            try:
                completion = moe.composer(strategy).execute(
                    rest, GenerateRequest(prompt, None, **sampling), moe.pool.engine
                )
                return completion, routed
            except (EngineError, ComposeError) as exc:
                failed.append(rest.top)
                errors.append(str(exc))
        raise EngineError(f"{strategy.name}: every ranked expert failed ({'; '.join(errors)})")


def backend_strategies(host: StrategyHost) -> LiveStrategies:
    """The host's strategies as ``LocalBackend`` strategy callables ``(prompt, params) ->
    Completion``, a live view of ``host.names``."""

    def call_of(name: str):  # noqa: ANN202
        def call(prompt: str, params) -> Completion:  # noqa: ANN001 - SamplingParams
            return host.complete(name, prompt, **params.generation())

        return call

    return LiveStrategies(lambda: host.names, call_of)
