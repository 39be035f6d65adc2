"""The gateway's wire schema, in one place (the way vLLM's ``entrypoints/openai/protocol.py`` does it).

OpenAI-compatible bodies for ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``, their
stream chunks and the error body, plus moerge's own additions: the ``moe`` provenance object on
every completion and the bodies of the expert admin endpoints (``/v1/experts``).

Requests ignore fields they do not know (clients such as litellm send extras), but reject the
OpenAI features moerge cannot honour (``n > 1``, logprobs, tools, echo, suffix) with a 400 rather
than silently answering something else.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SerializeAsAny, field_validator

# ------------------------------------------------------------------------------------- errors


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorInfo


class APIError(Exception):
    """An error the gateway answers with, in OpenAI's shape and with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))


# ------------------------------------------------------------------------------------- shared


class _Request(BaseModel):
    # unknown fields are ignored: OpenAI's API grows, and clients send what they know
    model_config = ConfigDict(extra="ignore")


class StreamOptions(BaseModel):
    include_usage: bool = False


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def _stop_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


class _SamplingFields(_Request):
    """Sampling fields shared by chat and text completions. ``None`` means the gateway's default
    (greedy, ``settings.default_max_tokens``), not OpenAI's temperature 1."""

    model: str = Field(min_length=1, max_length=300)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI's logit rules, honoured by the hf, vllm and external engines
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (as a string, OpenAI's shape) -> bias
    # vLLM's extensions of the same API, honoured by the hf and vllm engines
    top_k: int | None = Field(default=None, ge=-1)  # -1 or 0: off
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.lstrip("-").isdigit() or int(token) < 0:
                raise ValueError(f"logit_bias keys are token ids, got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values are in [-100, 100], got {bias}")
        return value

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, value: str | list[str] | None) -> str | list[str] | None:
        if len(_stop_list(value)) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    @property
    def stop_list(self) -> list[str]:
        return [s for s in _stop_list(self.stop) if s]

    def unsupported(self) -> str | None:
        """The first requested feature moerge cannot serve, named as its field (or None)."""
        if self.n != 1:
            return "n"
        return None


# ------------------------------------------------------------------------------------- provenance


class ExpertWeight(BaseModel):
    """An expert the plan used, with the weight it gave it (1.0 for a direct expert)."""

    name: str
    weight: float


class ExpertCall(BaseModel):
    """One engine call made on the plan's behalf (``composer.base.ExpertOutput``)."""

    expert: str = Field(description="the engine target's name; the engine's base name for the base")
    text: str
    weight: float = Field(description="the router's weight for this expert (0 for an aggregator)")
    role: str = Field(description="expert | aggregator | step")
    answer: str = Field(description='the normalised answer this output voted for ("" when no vote)')
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    prompt_rule: str = Field(description="how the request became this call's prompt")


class VoteAgreement(BaseModel):
    """How much the experts agreed, over their distinct normalised answers (``composer.base.Agreement``)."""

    entropy_bits: float = Field(description="Shannon entropy of the vote mass: 0 when all agree")
    winner_share: float = Field(description="the winning answer's share of the vote mass")
    distinct: int
    votes: dict[str, float] = Field(description="each distinct answer's vote mass")
    method: str = Field(description="majority (counts) | weighted (router weights)")


class StitchSegment(BaseModel):
    """A stretch of the final answer's lineage: ``expert`` wrote ``text`` at ``step`` (``composer.base.Segment``)."""

    expert: str
    text: str
    step: int
    instruction: str
    prompt: str
    weight: float


class ProvenanceUsage(BaseModel):
    """Tokens over every engine call of the plan, aggregator and steps included."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    engine_calls: int


class MoeProvenance(BaseModel):
    """The ``moe`` object on every completion: how the answer was made (docs/api.md).

    ``composer.base.Completion.to_dict()`` without the text (the choice holds it), plus the
    strategy served. ``decision`` and ``info`` are the router's and the composer's own.
    """

    finish_reason: str
    prompt_rule: str = Field(description="chat_template | last_user_message | raw; the calls' rules joined by ','")
    composer: str = Field(description='"direct" for an expert answering alone')
    router: str | None
    experts: list[ExpertWeight]
    outputs: list[ExpertCall]
    agreement: VoteAgreement | None
    segments: list[StitchSegment]
    usage: ProvenanceUsage
    decision: dict[str, Any] = Field(description="the router's decision details (router_ms, scores, ...)")
    info: dict[str, Any] = Field(description="the composer's details (merged adapter, lorahub weights, ...)")
    strategy: str | None = Field(description="the moe/<name> served; null for a direct expert")


# The responses' ``moe`` field. The gateway fills it with the plain dict ``moe_object`` built (one
# pass of ``composer.base.jsonable``) and builds those responses with ``model_construct``: the
# dict is not validated again into models, and ``SerializeAsAny`` writes it as it is (the bytes of
# ``json.dumps``: a vote count stays 1, not 1.0). Clients that validate a response get a
# ``MoeProvenance``; the OpenAPI document names it.
MoeField = SerializeAsAny[MoeProvenance]


# ------------------------------------------------------------------------------------- chat

# why a choice ended: the engines report only these two
FinishReason = Literal["stop", "length"]


class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text; content parts other than text are refused by the caller."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type == "text")

    def has_non_text(self) -> bool:
        return isinstance(self.content, list) and any(part.type != "text" for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> str | None:
        if self.logprobs or self.top_logprobs:
            return "logprobs"
        if self.tools:
            return "tools"
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format"
        return super().unsupported()

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    finish_reason: FinishReason | None = "stop"
    logprobs: None = None


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _now() -> int:
    return int(time.time())


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None
    moe: MoeField | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    moe: MoeField | None = None  # on the chunk that carries finish_reason


# ------------------------------------------------------------------------------------- text completions


class CompletionRequest(_SamplingFields):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request (send a string, or a list of one string)")
        return value

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        if self.logprobs:
            return "logprobs"
        if self.best_of not in (None, 1):
            return "best_of"
        return super().unsupported()


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = "stop"
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None
    moe: MoeField | None = None


class CompletionStreamChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: UsageInfo | None = None
    moe: MoeField | None = None


# ------------------------------------------------------------------------------------- models


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moerge"
    kind: str  # adapter | model | external | base | strategy (moerge's addition)
    version: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ------------------------------------------------------------------------------------- experts (admin)


class ExpertExampleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    reference: str = ""
    task: str = ""
    split: str = "train"


class ExpertCreateRequest(BaseModel):
    """``POST /v1/experts``. ``source`` (alias ``path`` or ``uri``): a folder on the gateway's machine
    for adapters and models, a litellm model string (``openai/gpt-4o-mini``) for external experts."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str
    kind: Literal["adapter", "model", "external"] = "adapter"
    source: str = Field(validation_alias=AliasChoices("source", "path", "uri"), min_length=1)
    base: str | None = None
    version: str | None = None
    domains: list[str] = Field(default_factory=list)
    skills: list[str] = Field(default_factory=list)
    description: str = ""
    examples: list[ExpertExampleIn] = Field(default_factory=list)
    cost: float | None = Field(default=None, ge=0.0)
    api_base: str | None = None  # external experts: the server to call
    api_key_env: str | None = None  # external experts: the NAME of the variable holding the key

    def registry_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``Registry.register_expert``."""
        return {
            "name": self.name,
            "kind": self.kind,
            "source": self.source,
            "base": self.base,
            "version": self.version,
            "domains": self.domains,
            "skills": self.skills,
            "description": self.description,
            "examples": [e.model_dump() for e in self.examples] or None,
            "cost": self.cost,
            "api_base": self.api_base,
            "api_key_env": self.api_key_env,
        }


class ExpertCard(BaseModel):
    object: Literal["expert"] = "expert"
    name: str
    version: str
    kind: str
    base: str | None = None
    uri: str
    status: str
    domains: list[str] = Field(default_factory=list)
    skills: list[str] = Field(default_factory=list)
    description: str = ""
    checksum: str = ""
    size_bytes: int = 0
    cost_per_1k_tokens: float | None = None
    api_base: str | None = None  # external experts
    api_key_env: str | None = None  # external experts: the variable's name, never the key
    created_at: datetime | None = None
    warnings: list[str] = Field(default_factory=list)  # POST /v1/experts: what looked off, though accepted

    @classmethod
    def from_record(cls, expert: Any) -> ExpertCard:
        """From a registry ``Expert`` row (detached, its ``base`` loaded)."""
        return cls(
            name=expert.name,
            version=expert.version,
            kind=expert.kind,
            base=expert.base.name if expert.base is not None else None,
            uri=expert.uri,
            status=expert.status,
            domains=list(expert.domains or []),
            skills=list(expert.skills or []),
            description=expert.description or "",
            checksum=expert.checksum or "",
            size_bytes=expert.size_bytes or 0,
            cost_per_1k_tokens=expert.cost_per_1k_tokens,
            api_base=getattr(expert, "api_base", None),
            api_key_env=getattr(expert, "api_key_env", None),
            created_at=expert.created_at,
        )


class ExpertDetail(ExpertCard):
    versions: list[str] = Field(default_factory=list)  # every registered version, oldest first
    examples: int = 0  # how many example prompts this version has


class ExpertList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ExpertCard]


class ExpertDeleted(BaseModel):
    object: Literal["expert.deleted"] = "expert.deleted"
    name: str
    deleted: bool = True
    versions: list[ExpertCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    models: int


# --- strategies (docs/strategies.md) ---------------------------------------------------------------


class StrategyDefinition(BaseModel):
    """``POST /v1/strategies``: the fields of a strategy definition (the YAML file's and
    ``moerge strategies add``'s). ``name`` is served as ``moe/<name>``."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=132)
    router: str = Field(min_length=1)
    composer: str = Field(min_length=1)
    router_params: dict[str, Any] = Field(default_factory=dict)
    composer_params: dict[str, Any] = Field(default_factory=dict)
    experts: list[str] = Field(
        default_factory=list,
        description="expert names, and filters domain:…, skill:…, "
        "base:…, kind:…, tag:…; empty: every expert the methods take",
    )
    fallback: str | None = None
    description: str = ""


class StrategyCard(StrategyDefinition):
    object: Literal["strategy"] = "strategy"
    level: Literal["query", "token"]
    source: str = Field(description="builtin, file:<path>, or registry")


class StrategyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[StrategyCard]


class StrategyDeleted(BaseModel):
    object: Literal["strategy.deleted"] = "strategy.deleted"
    name: str
    deleted: bool = True
