"""What every engine speaks: request and result records, the Engine protocol, EngineError.

This lives in composer/ because composers are the engines' callers: they depend on this protocol,
and services/engines implements it (services imports composer, never the other way round).

The hf engine (transformers + peft) implements this now; the vllm and external (litellm) engines
implement the same protocol later, so composers and the leaderboard never care which one runs.

A *target* names what answers an item: a LoRA adapter loaded on the engine's base, a full model
loaded by name, or ``None`` for the base itself. (A token-level mixture will become one more kind
of target; the records keep ``target`` a plain field so that addition does not change them.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol, Sequence, runtime_checkable

from registry.errors import MoergeError

FinishReason = Literal["stop", "length"]
# a streamed request's text goes to one of these in pieces, while it is generated
Emit = Callable[[str], None]


class EngineError(MoergeError):
    """An engine cannot serve what was asked: an unknown or unloaded target, a bad adapter folder,
    a request it cannot score. The message names the target and what to do."""


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    target: str | None = None  # adapter name, model name, or None for the base
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # sampled items with the same seed give the same text
    stop: tuple[str, ...] = ()  # stop strings; the text ends before the first one found

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise EngineError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise EngineError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str):  # a single stop string is a common slip
            object.__setattr__(self, "stop", (self.stop,))


@dataclass
class GenerateResult:
    text: str  # the completion only, without the prompt, special tokens or the stop string
    token_ids: list[int]  # completion token ids, EOS included when the model emitted it
    prompt_tokens: int
    completion_tokens: int  # len(token_ids)
    finish_reason: FinishReason  # "stop": EOS or a stop string; "length": max_new_tokens reached


@dataclass(frozen=True)
class ScoreRequest:
    """Log-likelihood of ``continuation`` following ``prompt`` (multiple-choice metrics)."""

    prompt: str
    continuation: str
    target: str | None = None


@dataclass
class ScoreResult:
    logprob: float  # sum of the continuation tokens' log-probabilities
    num_tokens: int  # continuation tokens scored (for length-normalised metrics)
    is_greedy: bool  # every continuation token was the model's argmax
    token_logprobs: list[float] = field(default_factory=list)


@runtime_checkable
class Engine(Protocol):
    """One engine instance is driven by one thread or Ray actor; it holds no global state."""

    kind: str

    def load_adapter(self, name: str, path: str) -> None: ...

    def unload_adapter(self, name: str) -> None: ...

    def load_model(self, name: str, path: str) -> None: ...

    def unload_model(self, name: str) -> None: ...

    def targets(self) -> dict[str, str]:
        """Loaded targets by name, each with its kind: ``"base"``, ``"adapter"`` or ``"model"``."""
        ...

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        """Engines that stream (``streams = True``, the hf engine) also take ``emits``: per request,
        None or an ``Emit`` handed that request's text in pieces while it is generated."""
        ...

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]: ...


def generate_emitting(engine: Engine, requests: Sequence[GenerateRequest],
                      emits: Sequence[Emit | None]) -> list[GenerateResult]:
    """``engine.generate(requests)`` with each streamed request's text handed to its emit: in
    pieces by an engine that streams (``streams``), whole once it exists by another one."""
    if not any(emits):
        return engine.generate(requests)
    if getattr(engine, "streams", False):
        return engine.generate(requests, emits)  # type: ignore[call-arg]
    results = engine.generate(requests)
    for emit, result in zip(emits, results, strict=True):
        if emit is not None and result.text:
            emit(result.text)
    return results
