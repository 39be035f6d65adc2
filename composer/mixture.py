"""Composer for token-level decisions: the experts of a ``MixtureSpec`` are mixed per token and per
module inside the forward pass (the MoLoRA layer), and the mixed model answers.

The engine it is given must run the model that ``mix`` is installed in, with no other adapter
applied: its base target (``None``) then *is* the mixture while a routing configuration is
active. Provenance reports the mean gate probability each expert received, over every module and
every token, as the experts' weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from composer.base import (
    BaseComposer,
    Completion,
    ComposeError,
    Provenance,
    Scored,
    StrategyRuntime,
    output_of,
    with_target,
)
from composer.engine_protocol import Engine, GenerateRequest, ScoreRequest
from composer.molora import MoLoRA
from routers.base import MixtureSpec


class TokenwiseMixture(BaseComposer):
    """``router``'s gate vectors and ``adapters``' factors are installed in ``mix`` as specs name
    them (first use of each expert under each gate); without a router the caller installs them."""

    name = "mixture"
    level = "token"
    kinds = ("adapter",)
    runs_on = "mixture"
    one_base = True
    scores_text = True
    PARAMS = ()

    def __init__(
        self,
        mix: MoLoRA,
        max_batch_size: int = 32,
        *,
        router: Any = None,
        adapters: Mapping[str, Path] | None = None,
    ) -> None:
        self.mix = mix
        self.max_batch_size = max_batch_size
        self.router = router  # a token-level router: ``gate_vectors(expert)`` per module
        self.adapters = dict(adapters or {})
        self._installed: set[tuple[str, str]] = set()  # (expert, gate) put into ``mix`` by this composer

    @classmethod
    def from_strategy(cls, runtime: StrategyRuntime, strategy) -> TokenwiseMixture:  # noqa: ANN001 - a Strategy
        _, mix = runtime.mixture()
        return cls(
            mix,
            max_batch_size=runtime.max_batch_size,
            router=runtime.router_for(strategy),
            adapters=runtime.adapter_paths(runtime.experts_of(strategy)),
        )

    def install(self, spec: MixtureSpec) -> None:
        """Put the spec's experts (factors + the router's gate vectors) into the MoLoRA layer."""
        for name in spec.experts:
            if (name, spec.gate) in self._installed:
                continue
            gates = {spec.gate: self.router.gate_vectors(name)}
            if name in self.mix.experts:
                self.mix.set_gate_vectors(name, spec.gate, gates[spec.gate])
            else:
                self.mix.add_expert(name, self.adapters[name], gates=gates)
            self._installed.add((name, spec.gate))

    def execute(self, decision: MixtureSpec, request: GenerateRequest, engine: Engine) -> Completion:
        return self.execute_batch([decision], [request], engine)[0]

    def execute_batch(
        self, decisions: Sequence[MixtureSpec], requests: Sequence[GenerateRequest], engine: Engine
    ) -> list[Completion]:
        """Many requests, one forward pass per chunk: rows may differ in their GLIDER global scores
        but must share experts, gate, top-k, α and temperature (MoLoRA checks)."""
        chunks = [with_target(r, None) for r in requests]
        return [
            Completion(
                text=result.text,
                finish_reason=result.finish_reason,
                provenance=Provenance(
                    composer=self.name,
                    router=spec.router,
                    experts=weights,
                    outputs=[output_of(f"mixture/{spec.gate}", result, weight=1.0)],
                    decision_info={**spec.info, "gate": spec.gate, "top_k": spec.top_k, "alpha": spec.alpha},
                    info={"usage_scope": "batch" if batched else "request"},
                ),
            )
            for spec, result, weights, batched in self._mixed(decisions, chunks, engine.generate)
        ]

    def score_batch(
        self, decisions: Sequence[MixtureSpec], requests: Sequence[ScoreRequest], engine: Engine
    ) -> list[Scored]:
        """Each text scored by the mixed model in one teacher-forced pass (the MoLoRA forward),
        chunked as ``execute_batch`` chunks; the experts' weights are their mean gate
        probabilities over the chunk."""
        texts = [replace(r, target=None) for r in requests]
        return [
            Scored(result, weights, f"mixture/{spec.gate}")
            for spec, result, weights, _ in self._mixed(decisions, texts, engine.score)
        ]

    def _mixed(self, decisions: Sequence[MixtureSpec], requests: Sequence[Any], call: Any) -> list[tuple]:
        """``call`` (the engine's generate or score) on chunks of ``requests`` with the MoLoRA layer
        routing each row by its spec: (spec, result, experts by mean gate probability over the
        chunk, whether the chunk held more than one row) per request."""
        if len(decisions) != len(requests):
            raise ComposeError("mixture: one MixtureSpec per request is needed")
        if self.router is not None:
            for spec in decisions:
                self.install(spec)
        out: list[tuple] = []
        for i in range(0, len(requests), self.max_batch_size):
            specs = list(decisions[i : i + self.max_batch_size])
            # one engine call per chunk keeps rows aligned with their specs (the engine keeps
            # request order within one target and batches up to its own size)
            with self.mix.routing(specs) as stats:
                results = call(list(requests[i : i + self.max_batch_size]))
            usage = stats.per_expert() if stats is not None else {}
            total = sum(usage.values()) or 1.0
            for spec, result in zip(specs, results):
                weights = sorted(((e, usage.get(e, 0.0) / total) for e in spec.experts), key=lambda ew: -ew[1])
                out.append((spec, result, weights, len(specs) > 1))
        return out
