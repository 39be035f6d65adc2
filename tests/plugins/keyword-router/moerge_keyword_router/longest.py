"""A composer in one file, installed as a plugin (the ``moerge.composers`` entry point): the
router's top ``k`` experts answer in one engine call, and the longest answer wins.

Built from its declared parameters by ``BaseComposer.from_strategy``; the runtime gives it the
pool's engine (``runs_on = "pool"``).
"""

from __future__ import annotations

from collections.abc import Sequence

from composer.base import BaseComposer, Completion, Provenance, base_target, output_of, top_experts, with_target
from composer.engine_protocol import Engine, GenerateRequest
from routers.base import Decision
from routers.params import Param


class LongestAnswer(BaseComposer):
    name = "longest"
    level = "query"
    engine_only = True
    PARAMS = (Param("k", "int", 2, "experts that answer each query (the router's top k)", minimum=1),)

    def __init__(self, k: int = 2) -> None:
        self.k = k

    def execute(self, decision: Decision, request: GenerateRequest, engine: Engine) -> Completion:
        return self.execute_batch([decision], [request], engine)[0]

    def execute_batch(
        self, decisions: Sequence[Decision], requests: Sequence[GenerateRequest], engine: Engine
    ) -> list[Completion]:
        # a decision naming no expert: the base answers
        plans = [top_experts(d, self.k) or [(base_target(engine), 1.0)] for d in decisions]
        calls = [with_target(r, name) for r, experts in zip(requests, plans) for name, _ in experts]
        results, out = iter(engine.generate(calls)), []
        for decision, experts in zip(decisions, plans):
            outputs = [output_of(name, next(results), weight=w) for name, w in experts]
            best = max(outputs, key=lambda o: len(o.text))
            out.append(
                Completion(
                    text=best.text,
                    finish_reason=best.finish_reason,
                    provenance=Provenance(composer=self.name, router=decision.router, experts=experts, outputs=outputs),
                )
            )
        return out
