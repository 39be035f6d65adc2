"""Composer for token-level decisions: the experts of a ``MixtureSpec`` are mixed per token and per
module inside the forward pass (the MoLoRA layer), and the mixed model answers.

The engine it is given must run the model that ``mix`` is installed in, with no other adapter
applied: its base target (``None``) then *is* the mixture while a routing configuration is
active. Provenance reports the mean gate probability each expert received, over every module and
every token, as the experts' weights.
"""

from __future__ import annotations

from collections.abc import Sequence

from composer.base import Completion, ComposeError, Provenance, output_of, with_target
from composer.engine_protocol import Engine, GenerateRequest
from composer.molora import MoLoRA
from routers.base import MixtureSpec


class TokenwiseMixture:
    name = "mixture"
    level = "token"
    kinds = ("adapter",)
    PARAMS = ()

    def __init__(self, mix: MoLoRA, max_batch_size: int = 32) -> None:
        self.mix = mix
        self.max_batch_size = max_batch_size

    def execute(self, decision: MixtureSpec, request: GenerateRequest, engine: Engine) -> Completion:
        return self.execute_batch([decision], [request], engine)[0]

    def execute_batch(
        self, decisions: Sequence[MixtureSpec], requests: Sequence[GenerateRequest], engine: Engine
    ) -> list[Completion]:
        """Many requests, one forward pass per chunk: rows may differ in their GLIDER global scores
        but must share experts, gate, top-k, α and temperature (MoLoRA checks)."""
        if len(decisions) != len(requests):
            raise ComposeError("mixture: one MixtureSpec per request is needed")
        out: list[Completion] = []
        for i in range(0, len(requests), self.max_batch_size):
            specs = list(decisions[i : i + self.max_batch_size])
            chunk = [with_target(r, None) for r in requests[i : i + self.max_batch_size]]
            # one generate call per chunk keeps rows aligned with their specs (the engine keeps
            # request order within one target and batches up to its own size)
            with self.mix.routing(specs) as stats:
                results = engine.generate(chunk)
            usage = stats.per_expert() if stats is not None else {}
            total = sum(usage.values()) or 1.0
            for spec, result in zip(specs, results):
                weights = [(e, usage.get(e, 0.0) / total) for e in spec.experts]
                weights.sort(key=lambda ew: -ew[1])
                out.append(
                    Completion(
                        text=result.text,
                        finish_reason=result.finish_reason,
                        provenance=Provenance(
                            composer=self.name,
                            router=spec.router,
                            experts=weights,
                            outputs=[output_of(f"mixture/{spec.gate}", result, weight=1.0)],
                            decision_info={**spec.info, "gate": spec.gate, "top_k": spec.top_k, "alpha": spec.alpha},
                            info={"usage_scope": "batch" if len(specs) > 1 else "request"},
                        ),
                    )
                )
        return out
