"""Serving strategies: ``moe/<name>`` answered over whatever experts the registry holds now.

A ``StrategyHost`` wraps the ``MoE`` runtime for a long-running server. It watches the registry
(at most once per ``refresh_interval_s``, one query) and, when the set of ready experts changed,
builds a fresh ``ExpertPool`` + ``MoE``: routing artifacts are stored per expert, so only a newly
registered expert is fitted (the classifier retrains its head) and a removed one simply drops out.
That is what makes hot registration work without a restart, in-process and on Ray alike.

A query-level decision whose top expert fails on the engine falls back to the next expert the
router ranked (the provenance says so); when every ranked expert fails, the error reaches the
gateway (503).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace

from composer.base import Completion, ComposeError
from composer.engine_protocol import EngineError, RequestError
from registry.errors import NotFoundError
from registry.service import Registry
from routers.base import Decision
from services.moe.pool import ExpertPool
from services.moe.strategies import STRATEGIES, MoE, Routed, Strategy, get_strategy

# strategies that need the gold task of a query cannot be served: a live query has none
NEEDS_GOLD_TASK = {"moe/oracle"}


def servable_strategies(names: list[str] | None = None) -> list[str]:
    """The strategies a server offers: ``names`` (checked) or every one that needs no gold task."""
    if names is None:
        return [n for n in STRATEGIES if n not in NEEDS_GOLD_TASK]
    out = []
    for name in names:
        strategy = get_strategy(name)  # NotFoundError names the unknown one
        if strategy.name in NEEDS_GOLD_TASK:
            raise NotFoundError(f"{strategy.name} needs each query's gold task; it can be evaluated, not served")
        out.append(strategy.name)
    return out


class StrategyHost:
    def __init__(
        self,
        registry: Registry,
        names: list[str] | None = None,
        *,
        engine_factory: Callable[[ExpertPool], object] | None = None,
        refresh_interval_s: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.registry = registry
        self.names = servable_strategies(names)
        # builds the engine query-level composers use for a pool (Ray: the remote engine);
        # None: the pool's own in-process hf engine
        self._engine_factory = engine_factory
        self.refresh_interval_s = refresh_interval_s
        self.seed = seed
        self._moe: MoE | None = None
        self._fingerprint: tuple | None = None
        self._checked_at = 0.0
        self._lock = threading.Lock()  # one request at a time: routers and hf engines are not thread-safe
        self.rebuilds = 0

    # ------------------------------------------------------------------ registry watch

    def _current_fingerprint(self) -> tuple:
        return tuple(sorted((e.id, e.updated_at.isoformat()) for e in self.registry.list_experts(status="ready")))

    def moe(self) -> MoE:
        """The runtime over the registry's current experts (rebuilt when they changed)."""
        now = time.monotonic()
        if self._moe is not None and now - self._checked_at < self.refresh_interval_s:
            return self._moe
        self._checked_at = now
        fingerprint = self._current_fingerprint()
        if self._moe is None or fingerprint != self._fingerprint:
            pool = ExpertPool(self.registry)
            if self._engine_factory is not None:
                pool.attach_engine(self._engine_factory(pool))
            self._moe = MoE(pool, seed=self.seed)
            self._fingerprint = fingerprint
            self.rebuilds += 1
        return self._moe

    # ------------------------------------------------------------------ answering

    def _served(self, name: str) -> Strategy:
        strategy = get_strategy(name)
        if strategy.name not in self.names:
            raise NotFoundError(f"strategy {strategy.name} is not served here (served: {', '.join(self.names)})")
        return strategy

    def complete_many(self, name: str, prompts: list[str], conversations: list | None = None,
                      **sampling) -> list[Completion]:
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
            return [self._complete_or_error(name, p, {**sampling, "messages": c})  # type: ignore[misc]
                    for p, c in zip(prompts, own)]
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
                completion, routed = self._fall_back(self.moe(), strategy, prompt, exc, sampling)
        completion.provenance.decision_info = {**completion.provenance.decision_info, "router_ms": routed.router_ms}
        return completion

    def _run(self, strategy: Strategy, prompts: list[str], sampling: dict,
             conversations: list | None = None) -> list[tuple[Completion, Routed]]:
        """``MoE.run`` under the lock, but for a strategy whose answer only calls a remote engine
        (``engine_factory``; single and ensemble composers) the lock covers the routing alone: the
        generation on the engine deployments then runs beside other requests' routing (a stream's
        ``decide``, the next batch) instead of holding them for its whole length."""
        with self._lock:
            moe = self.moe()
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
            routed = self.moe().route(strategy, prompt)
        info = {**routed.decision.info, "router_ms": routed.router_ms}
        return Routed(replace(routed.decision, info=info), routed.router_ms)

    def _fall_back(self, moe: MoE, strategy: Strategy, prompt: str, first: EngineError,
                   sampling: dict) -> tuple[Completion, Routed]:
        """The router's ranking, top expert failed: try the others in order."""
        from composer.engine_protocol import GenerateRequest

        routed = moe.route(strategy, prompt)
        decision: Decision = routed.decision  # type: ignore[assignment]
        failed = [decision.top]
        errors = [str(first)]
        for i in range(1, len(decision.experts)):
            rest = Decision(decision.router, decision.experts[i:], dict(decision.info))
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


def backend_strategies(host: StrategyHost) -> dict:
    """The host's strategies as ``LocalBackend`` strategy callables ``(prompt, params) -> Completion``."""

    def one(name: str):
        def call(prompt: str, params) -> Completion:
            return host.complete(name, prompt, **params.generation())

        return call

    return {name: one(name) for name in host.names}
