"""One Engine over several: each target answered by the engine that holds it.

A strategy whose experts span base models and external APIs (a query-level router over a legal
adapter on Qwen, a full Llama fine-tune and a provider model) hands its composer one engine, as
for a single base. ``DispatchEngine`` keeps the protocol: ``targets()`` is the union of its parts',
and ``generate`` / ``score`` send each request to its target's engine — every engine once, with
its requests in their order — and put the results back in the callers' order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from composer.engine_protocol import (
    Emit,
    Engine,
    EngineError,
    GenerateRequest,
    GenerateResult,
    ScoreRequest,
    ScoreResult,
    generate_emitting,
)


class DispatchEngine:
    """``default`` answers the base target (``None``) and every target it holds; ``parts`` names
    the engine of each other target (its name -> engine)."""

    kind = "dispatch"
    streams = True  # each part streams if it can (generate_emitting)

    def __init__(self, default: Engine, parts: Mapping[str, Engine]) -> None:
        self.default = default
        self.parts = dict(parts)

    def targets(self) -> dict[str, str]:
        found = dict(self.default.targets())
        for name, engine in self.parts.items():
            kinds = engine.targets()
            # an engine of its own for one full model or an external one answers it as its base
            found[name] = kinds.get(name, "model")
        return found

    def _engine_of(self, target: str | None) -> Engine:
        return self.parts.get(target, self.default) if target is not None else self.default

    def _groups(self, requests: Sequence[Any]) -> list[tuple[Engine, list[int]]]:
        groups: dict[int, tuple[Engine, list[int]]] = {}
        for i, request in enumerate(requests):
            engine = self._engine_of(request.target)
            groups.setdefault(id(engine), (engine, []))[1].append(i)
        return list(groups.values())

    def generate(
        self, requests: Sequence[GenerateRequest], emits: Sequence[Emit | None] | None = None
    ) -> list[GenerateResult]:
        out: list[GenerateResult | None] = [None] * len(requests)
        for engine, idx in self._groups(requests):
            batch = [self._for(engine, requests[i]) for i in idx]
            part_emits = [emits[i] for i in idx] if emits is not None else [None] * len(idx)
            for i, result in zip(idx, generate_emitting(engine, batch, part_emits)):
                out[i] = result
        return [r for r in out if r is not None]

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        out: list[ScoreResult | None] = [None] * len(requests)
        for engine, idx in self._groups(requests):
            for i, result in zip(idx, engine.score([self._for(engine, requests[i]) for i in idx])):
                out[i] = result
        return [r for r in out if r is not None]

    def _for(self, engine: Engine, request: Any) -> Any:
        """The request as ``engine`` names its target: a part that holds one expert as its own
        base answers it under its name or as ``None``, whichever it lists."""
        if engine is self.default or request.target in engine.targets():
            return request
        return replace(request, target=None)

    def load_adapter(self, name: str, path: str) -> None:
        self.default.load_adapter(name, path)

    def unload_adapter(self, name: str) -> None:
        self.default.unload_adapter(name)

    def load_model(self, name: str, path: str) -> None:
        self.default.load_model(name, path)

    def unload_model(self, name: str) -> None:
        if name in self.parts:
            raise EngineError(f"{name!r} runs on an engine of its own here; remove the expert instead")
        self.default.unload_model(name)
