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
# how a request became the model's prompt: ``chat_template``, the conversation rendered by the
# target's own chat template; ``last_user_message``, a chat whose target has no template, so its
# last user turn went raw; ``raw``, a completion prompt as given
PromptRule = Literal["raw", "chat_template", "last_user_message"]
# a streamed request's text goes to one of these in pieces, while it is generated
Emit = Callable[[str], None]


class EngineError(MoergeError):
    """An engine cannot serve what was asked: an unknown or unloaded target, a bad adapter folder,
    a request it cannot score. The message names the target and what to do."""


class RequestError(EngineError):
    """The request itself cannot be served as asked, on any replica (the gateway answers 400 with
    ``code`` and ``param``), as opposed to an engine that cannot serve right now."""

    code = "invalid_request"
    http_status = 400

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self):  # keeps ``param`` across processes (Ray)
        return type(self), (str(self), self.param)


class ContextLengthError(RequestError):
    """The rendered prompt plus the tokens asked for do not fit the model's context."""

    code = "context_length_exceeded"


class UnsupportedParameterError(RequestError):
    """A parameter this engine cannot honour: refused, never ignored."""

    code = "unsupported_parameter"


class ChatTemplateError(RequestError):
    """The model's chat template refuses the conversation (roles out of order, say)."""

    code = "invalid_messages"


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str  # the text routers read; what the model gets unless ``messages`` is rendered
    target: str | None = None  # adapter name, model name, or None for the base
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # sampled items with the same seed give the same text
    stop: tuple[str, ...] = ()  # stop strings; the text ends before the first one found
    # a chat: ((role, content), …). The engine renders it with the target's chat template (a
    # final assistant turn is continued, not closed); a target without a template gets ``prompt``,
    # which the gateway sets to the last user turn
    messages: tuple[tuple[str, str], ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # besides the model's own end tokens
    ignore_eos: bool = False  # run on past the model's end tokens (stop_token_ids still stop)
    skip_special_tokens: bool = True  # leave special tokens out of the text
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # CTRL's: logits of tokens in prompt or completion / by it
    frequency_penalty: float = 0.0  # OpenAI's: minus this times the token's count in the completion
    presence_penalty: float = 0.0  # OpenAI's: minus this once a token is in the completion
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise EngineError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise EngineError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise EngineError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise EngineError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise EngineError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):  # OpenAI's and vLLM's range
            if not -2 <= getattr(self, name) <= 2:
                raise EngineError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if isinstance(self.stop, str):  # a single stop string is a common slip
            object.__setattr__(self, "stop", (self.stop,))
        # hashable tuples, whatever came in (lists from JSON, {"role", "content"} dicts, a bias dict)
        messages = tuple((m["role"], m["content"]) if isinstance(m, dict) else tuple(m) for m in self.messages)
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "messages", messages)
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in bias))
        if any(not -100 <= b <= 100 for _, b in self.logit_bias):
            raise EngineError("logit_bias values must be in [-100, 100]")

    @property
    def penalised(self) -> bool:
        return bool(
            self.repetition_penalty != 1.0 or self.frequency_penalty or self.presence_penalty or self.logit_bias
        )


@dataclass
class GenerateResult:
    text: str  # the completion only, without the prompt, special tokens or the stop string
    token_ids: list[int]  # completion token ids, EOS included when the model emitted it
    prompt_tokens: int
    completion_tokens: int  # len(token_ids)
    finish_reason: FinishReason  # "stop": EOS or a stop string; "length": max_new_tokens reached
    prompt_rule: PromptRule = "raw"  # how the request became the model's prompt


@dataclass(frozen=True)
class ScoreRequest:
    """Log-likelihood of ``continuation`` following ``prompt`` (multiple-choice metrics; with an
    empty prompt, a whole text's held-out loss). The two are tokenized apart: the prompt as
    ``tokenizer(prompt)`` (special tokens included), the continuation without special tokens. An
    empty prompt conditions on the BOS token, or on the EOS token where the model
    has no BOS."""

    prompt: str
    continuation: str
    target: str | None = None
    offsets: bool = False  # also return each continuation token's (start, end) characters


@dataclass
class ScoreResult:
    logprob: float  # sum of the continuation tokens' log-probabilities
    num_tokens: int  # continuation tokens scored (for length-normalised metrics)
    is_greedy: bool  # every continuation token was the model's argmax
    token_logprobs: list[float] = field(default_factory=list)
    # with ``ScoreRequest.offsets``: each continuation token's (start, end) in the continuation
    offsets: list[tuple[int, int]] = field(default_factory=list)


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


def generate_emitting(
    engine: Engine, requests: Sequence[GenerateRequest], emits: Sequence[Emit | None]
) -> list[GenerateResult]:
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
