"""Single expert: the decision's top expert answers the whole request alone.

An empty decision (a router with nothing to offer) falls back to the engine's base model, and the
provenance says so; ``fallback`` names another target to use instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from composer.base import (
    BaseComposer,
    Completion,
    Provenance,
    Scored,
    StrategyRuntime,
    base_target,
    output_of,
    require_targets,
    with_target,
)
from composer.engine_protocol import Engine, GenerateRequest, GenerateResult, ScoreRequest
from routers.base import Decision
from routers.params import Param


class Single(BaseComposer):
    name = "single"
    level = "query"
    engine_only = True
    scores_text = True
    PARAMS = (Param("fallback", "str", None, "the expert that answers a decision naming none (default: the base)"),)

    def __init__(self, fallback: str | None = None) -> None:
        self.fallback = fallback  # target used when the decision names no expert (None: the base)

    @classmethod
    def from_strategy(cls, runtime: StrategyRuntime, strategy) -> Single:  # noqa: ANN001 - a Strategy
        # the strategy's own fallback expert, else the composer parameter
        return cls(fallback=strategy.fallback or strategy.composer_params.get("fallback"))

    def execute(self, decision: Decision, request: GenerateRequest, engine: Engine) -> Completion:
        return self.execute_batch([decision], [request], engine)[0]

    def execute_batch(
        self, decisions: Sequence[Decision], requests: Sequence[GenerateRequest], engine: Engine
    ) -> list[Completion]:
        """Many requests in one engine call (the engine groups them by target): the same answers
        as ``execute`` one by one, with each model loaded once."""
        plans = self._plans(decisions, engine)
        results = engine.generate([with_target(r, t) for r, (t, _, _) in zip(requests, plans)])
        return [
            answered(decision, expert, weight, result, info)
            for decision, result, (expert, weight, info) in zip(decisions, results, plans)
        ]

    def score_batch(
        self, decisions: Sequence[Decision], requests: Sequence[ScoreRequest], engine: Engine
    ) -> list[Scored]:
        """Each text scored by its decision's top expert (the fallback where it names none), in
        one engine call."""
        plans = self._plans(decisions, engine)
        results = engine.score([replace(r, target=t) for r, (t, _, _) in zip(requests, plans)])
        return [Scored(result, [(t, 1.0)], t) for result, (t, _, _) in zip(results, plans)]

    def _plans(self, decisions: Sequence[Decision], engine: Engine) -> list[tuple[str, float, dict]]:
        """(target, weight, info) per decision: its top expert, else the fallback."""
        plans: list[tuple[str, float, dict]] = []
        for decision in decisions:
            if decision.top is not None:
                plans.append((decision.top, float(decision.experts[0][1]), {}))
            else:
                target = self.fallback or base_target(engine)
                plans.append((target, 1.0, {"fallback": f"the router chose no expert; {target!r} answered"}))
        require_targets(engine, sorted({t for t, _, _ in plans}), "single")
        return plans


def answered(
    decision: Decision, expert: str, weight: float, result: GenerateResult, info: dict | None = None
) -> Completion:
    """``expert``'s result as the single composer's completion for ``decision`` (also built by the
    gateway when it streams the expert a strategy chose)."""
    return Completion(
        text=result.text,
        finish_reason=result.finish_reason,
        provenance=Provenance(
            composer=Single.name,
            router=decision.router,
            experts=[(expert, weight)],
            outputs=[output_of(expert, result, weight=weight)],
            decision_info=decision.info,
            info=dict(info or {}),
        ),
    )
