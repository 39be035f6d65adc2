"""``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``: the OpenAI endpoints.

Handlers are module-level functions over ``app.state`` (the backend, settings, metrics and
authenticator that ``create_app`` puts there), as vLLM's api_server keeps its handlers outside
the app factory. The prompt rule for chat messages, the ``moe`` provenance object and the
``x-moe-*`` headers are documented in docs/api.md.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from composer.base import Completion
from registry.errors import MoergeError, NotFoundError
from services.gateway.auth import Principal, check_model_allowed, require_user
from services.gateway.backend import SamplingParams, is_strategy
from services.gateway.errors import backend_error, count_error
from services.gateway.protocol import (
    APIError,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatMessage,
    ChatResponseMessage,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChoice,
    DeltaMessage,
    FinishReason,
    ModelCard,
    ModelList,
    UsageInfo,
)
from services.gateway.settings import GatewaySettings

router = APIRouter()


# ------------------------------------------------------------------------------------- helpers


def chat_prompt(messages: list[ChatMessage]) -> tuple[str, tuple[tuple[str, str], ...]]:
    """What a chat request becomes: the text routers read, and the conversation.

    The whole conversation (system, history, an assistant turn to continue) goes to every engine
    call, which renders it with its target's chat template (``services.engines.prompting``). The
    text routers read is the last user turn: that is also what a model without a chat template
    gets, raw (the response's ``prompt_rule`` says which rule applied). OpenAI's ``developer`` role
    is the system role of chat templates.
    """
    for message in messages:
        if message.has_non_text():
            raise APIError(400, "only text content parts are supported", param="messages")
    conversation = tuple(("system" if m.role == "developer" else m.role, m.text()) for m in messages)
    users = [m.text() for m in messages if m.role == "user"]
    return (users[-1] if users else conversation[-1][1]), conversation


def router_ms(completion: Completion) -> float | None:
    """The router's decision time a strategy reported (``decision_info['router_ms']``); 0 for a
    direct expert (no router ran); None when a strategy did not say."""
    p = completion.provenance
    for source in (p.decision_info, p.info):
        value = source.get("router_ms") if isinstance(source, dict) else None
        if isinstance(value, (int, float)):
            return float(value)
    return 0.0 if p.router is None and p.composer == "direct" else None


def moe_object(model: str, completion: Completion) -> dict[str, Any]:
    """The ``moe`` provenance object (``protocol.MoeProvenance``), as the plain dict it goes out as."""
    moe = completion.to_dict()
    moe.pop("text", None)  # the same text is the choice's content
    moe["strategy"] = model if is_strategy(model) else None
    return moe


def moe_headers(model: str, completion: Completion | None = None) -> dict[str, str]:
    headers = {"x-moe-strategy": model if is_strategy(model) else "direct"}
    if completion is not None:
        headers["x-moe-prompt-rule"] = completion.prompt_rule
        headers["x-moe-experts"] = ",".join(f"{name}:{weight:.4g}" for name, weight in completion.experts)
        ms = router_ms(completion)
        if ms is not None:
            headers["x-moe-router-ms"] = f"{ms:.3f}"
    return headers


def usage_of(completion: Completion) -> UsageInfo:
    p, c = completion.prompt_tokens, completion.completion_tokens
    return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def _json_response(model: Any, headers: dict[str, str]) -> Response:
    """A response model's JSON, serialised by pydantic in one step (no intermediate dict for
    ``json.dumps`` to walk again): the answer of every completion request."""
    return Response(model.model_dump_json(), media_type="application/json", headers=headers)


def _sse(payload: Any) -> str:
    data = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


# ------------------------------------------------------------------------------------- serving


def prepare(
    settings: GatewaySettings,
    body: ChatCompletionRequest | CompletionRequest,
    prompt: str,
    principal: Principal,
    messages: tuple[tuple[str, str], ...] = (),
) -> SamplingParams:
    """Everything checked before the backend is asked; the sampling parameters."""
    unsupported = body.unsupported()
    if unsupported is not None:
        raise APIError(
            400, f"{unsupported!r} is not supported by moerge", code="unsupported_parameter", param=unsupported
        )
    check_model_allowed(principal, body.model)
    chars = sum(len(content) for _, content in messages) if messages else len(prompt)
    if chars > settings.max_prompt_chars:
        raise APIError(
            413,
            f"the prompt has {chars} characters; the limit is {settings.max_prompt_chars}",
            code="prompt_too_long",
            param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
        )
    max_tokens = body.max_new_tokens or settings.default_max_tokens
    if max_tokens > settings.max_tokens_limit:
        raise APIError(
            400, f"max_tokens {max_tokens} is above the limit of {settings.max_tokens_limit}", param="max_tokens"
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=settings.default_temperature if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=tuple(body.stop_list),
        messages=messages,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        skip_special_tokens=body.skip_special_tokens,
        top_k=max(0, body.top_k or 0),
        min_p=body.min_p or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        logit_bias=tuple((int(t), float(b)) for t, b in (body.logit_bias or {}).items()),
    )


async def complete(request: Request, model: str, prompt: str, params: SamplingParams) -> Completion:
    state = request.app.state
    try:
        with anyio.fail_after(state.settings.request_timeout_s):
            completion = await state.backend.complete(model, prompt, params)
    except (MoergeError, TimeoutError) as exc:
        if not isinstance(exc, NotFoundError):
            request.state.model = model
        raise backend_error(exc, model) from exc
    request.state.model = model
    state.metrics.observe_completion(model, completion, router_ms(completion))
    return completion


async def stream(
    request: Request, model: str, prompt: str, params: SamplingParams, chat: bool, include_usage: bool
) -> StreamingResponse:
    state = request.app.state
    deadline = anyio.current_time() + state.settings.request_timeout_s
    items = state.backend.stream(model, prompt, params).__aiter__()

    async def next_item() -> str | Completion | None:
        with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
            try:
                return await items.__anext__()
            except StopAsyncIteration:
                return None

    # the first item comes before the status line, so a failure to start is a proper error
    try:
        first = await next_item()
    except BaseException as exc:
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            with anyio.CancelScope(shield=True):
                await aclose()
        if not isinstance(exc, (MoergeError, TimeoutError)):
            raise
        if not isinstance(exc, NotFoundError):
            request.state.model = model
        raise backend_error(exc, model) from exc
    request.state.model = model
    chunk_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())

    def chunk(delta: str | None, finish: str | None = None, **extra: Any) -> Any:
        # model_construct: the parts are built here, and the final chunk's ``moe`` dict is not
        # validated again (protocol.MoeField)
        if chat:
            d = DeltaMessage(content=delta) if delta is not None else DeltaMessage()
            chat_choices = [ChatCompletionStreamChoice(delta=d, finish_reason=finish_of(finish))]
            return ChatCompletionChunk.model_construct(
                id=chunk_id, created=created, model=model, choices=chat_choices, **extra
            )
        choices = [CompletionStreamChoice(text=delta or "", finish_reason=finish_of(finish))]
        return CompletionChunk.model_construct(id=chunk_id, created=created, model=model, choices=choices, **extra)

    async def events() -> AsyncIterator[str]:
        try:
            if chat:
                start = ChatCompletionStreamChoice(delta=DeltaMessage(role="assistant", content=""))
                yield _sse(ChatCompletionChunk(id=chunk_id, created=created, model=model, choices=[start]))
            item = first
            while not isinstance(item, Completion):
                if item is None:
                    raise MoergeError(f"{model!r} ended its stream without a completion")
                if item:
                    yield _sse(chunk(item))
                item = await next_item()
            completion = item
            state.metrics.observe_completion(model, completion, router_ms(completion))
            yield _sse(chunk(None, completion.finish_reason, moe=moe_object(model, completion)))
            if include_usage:
                usage = usage_of(completion)
                if chat:
                    yield _sse(ChatCompletionChunk(id=chunk_id, created=created, model=model, choices=[], usage=usage))
                else:
                    yield _sse(CompletionChunk(id=chunk_id, created=created, model=model, choices=[], usage=usage))
        except (MoergeError, TimeoutError) as exc:
            # the status line is gone: the error travels as an event (OpenAI clients raise it)
            err = backend_error(exc, model)
            count_error(request, err.type)
            yield _sse(err.body())
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()
        yield "data: [DONE]\n\n"

    headers = {**moe_headers(model), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


# ------------------------------------------------------------------------------------- endpoints
# The answers are built with model_construct: their parts are validated models already, and the
# ``moe`` dict goes out as built, not validated a second time (protocol.MoeField).


def finish_of(reason: str | None) -> FinishReason | None:
    """An engine's finish reason as the wire schema types it: the engines report "stop" or
    "length" only, and pydantic checks it when the choice is built."""
    return cast(FinishReason | None, reason)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, tags=["completions"])
async def chat_completions(
    body: ChatCompletionRequest, request: Request, principal: Principal = Depends(require_user)
) -> Response:
    prompt, messages = chat_prompt(body.messages)
    params = prepare(request.app.state.settings, body, prompt, principal, messages)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await stream(request, body.model, prompt, params, chat=True, include_usage=include_usage)
    completion = await complete(request, body.model, prompt, params)
    response = ChatCompletionResponse.model_construct(
        model=body.model,
        choices=[
            ChatCompletionChoice(
                message=ChatResponseMessage(content=completion.text), finish_reason=finish_of(completion.finish_reason)
            )
        ],
        usage=usage_of(completion),
        moe=moe_object(body.model, completion),  # type: ignore[arg-type]  # the dict as is (protocol.MoeField)
    )
    return _json_response(response, headers=moe_headers(body.model, completion))


@router.post("/v1/completions", response_model=CompletionResponse, tags=["completions"])
async def completions(
    body: CompletionRequest, request: Request, principal: Principal = Depends(require_user)
) -> Response:
    prompt = body.prompt_text
    params = prepare(request.app.state.settings, body, prompt, principal)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await stream(request, body.model, prompt, params, chat=False, include_usage=include_usage)
    completion = await complete(request, body.model, prompt, params)
    response = CompletionResponse.model_construct(
        model=body.model,
        choices=[CompletionChoice(text=completion.text, finish_reason=finish_of(completion.finish_reason))],
        usage=usage_of(completion),
        moe=moe_object(body.model, completion),  # type: ignore[arg-type]  # the dict as is (protocol.MoeField)
    )
    return _json_response(response, headers=moe_headers(body.model, completion))


@router.get("/v1/models", response_model=ModelList, tags=["models"])
def list_models(request: Request, principal: Principal = Depends(require_user)) -> ModelList:
    cards = [
        ModelCard(id=m.id, created=m.created, kind=m.kind, version=m.version)
        for m in request.app.state.backend.models()
        if principal.allows(m.id)
    ]
    return ModelList(data=cards)
