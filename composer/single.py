"""Single expert: the decision's top expert answers the whole request alone.

An empty decision (a router with nothing to offer) falls back to the engine's base model, and the
provenance says so; ``fallback`` names another target to use instead.
"""

from __future__ import annotations

from composer.base import Completion, Provenance, base_target, output_of, require_targets, with_target
from composer.engine_protocol import Engine, GenerateRequest
from routers.base import Decision


class Single:
    name = "single"

    def __init__(self, fallback: str | None = None) -> None:
        self.fallback = fallback  # target used when the decision names no expert (None: the base)

    def execute(self, decision: Decision, request: GenerateRequest, engine: Engine) -> Completion:
        info: dict = {}
        if decision.top is not None:
            expert, weight = decision.top, float(decision.experts[0][1])
        else:
            expert, weight = self.fallback or base_target(engine), 1.0
            info["fallback"] = f"the router chose no expert; {expert!r} answered"
        require_targets(engine, [expert], "single")
        [result] = engine.generate([with_target(request, expert)])
        return Completion(
            text=result.text,
            finish_reason=result.finish_reason,
            provenance=Provenance(
                composer=self.name,
                router=decision.router,
                experts=[(expert, weight)],
                outputs=[output_of(expert, result, weight=weight)],
                decision_info=decision.info,
                info=info,
            ),
        )
