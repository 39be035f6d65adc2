"""The OpenAI-compatible gateway: a FastAPI app over a ``Backend`` and the registry.

``create_app(backend, registry, settings)`` builds it; the endpoints, the prompt rule for chat
messages, the headers and every error are documented in docs/api.md. The app does HTTP only —
auth, schema, limits, errors, streaming, metrics — and leaves serving to the backend, so the same
app runs in-process over ``LocalBackend`` or inside a Ray Serve ingress over Ray handles.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sqlalchemy import select, text
from starlette.exceptions import HTTPException as StarletteHTTPException

from composer.base import Completion
from composer.engine_protocol import RequestError
from registry.errors import MoergeError, NotFoundError
from registry.models import Expert
from registry.service import Registry
from services.gateway.auth import Authenticator, Limiter, Principal, check_model_allowed
from services.gateway.backend import Backend, SamplingParams, is_strategy
from services.gateway.metrics import GatewayMetrics, MetricsMiddleware
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
    ErrorInfo,
    ErrorResponse,
    ExpertCard,
    ExpertCreateRequest,
    ExpertDeleted,
    ExpertDetail,
    ExpertList,
    Health,
    ModelCard,
    ModelList,
    UsageInfo,
)
from services.gateway.strategies_api import router as strategies_router
from services.leaderboard.web import leaderboard_router
from services.moe.catalog import StrategyCatalog

log = logging.getLogger("moerge.gateway")


@dataclass(frozen=True)
class GatewaySettings:
    require_keys: bool = True  # False: no Authorization needed (embedded use on localhost only)
    max_prompt_chars: int = 16_000  # longer prompts get 413
    request_timeout_s: float = 120.0  # a completion (or a whole stream) taking longer gets 504
    default_max_tokens: int = 64  # when the request names no max_tokens
    max_tokens_limit: int = 2048  # larger max_tokens get 400
    default_temperature: float = 0.0  # when the request names none: greedy, not OpenAI's 1.0
    rate_window_s: float = 60.0  # the window of the per-key requests-per-minute limit

    @classmethod
    def from_env(cls) -> GatewaySettings:
        """MOERGE_REQUIRE_KEYS (default 0 = the embedded default), MOERGE_MAX_PROMPT_CHARS,
        MOERGE_REQUEST_TIMEOUT_S, MOERGE_DEFAULT_MAX_TOKENS, MOERGE_MAX_TOKENS_LIMIT."""
        d = cls()
        env = os.environ.get
        return cls(
            require_keys=env("MOERGE_REQUIRE_KEYS", "0").lower() in ("1", "true", "yes"),
            max_prompt_chars=int(env("MOERGE_MAX_PROMPT_CHARS", d.max_prompt_chars)),
            request_timeout_s=float(env("MOERGE_REQUEST_TIMEOUT_S", d.request_timeout_s)),
            default_max_tokens=int(env("MOERGE_DEFAULT_MAX_TOKENS", d.default_max_tokens)),
            max_tokens_limit=int(env("MOERGE_MAX_TOKENS_LIMIT", d.max_tokens_limit)),
        )


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


def backend_error(exc: BaseException, model: str) -> APIError:
    """A backend failure as the error the client gets."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, TimeoutError):
        return APIError(504, f"{model!r} did not answer in time", type="timeout_error", code="request_timeout")
    if isinstance(exc, NotFoundError):
        return APIError(404, f"model {model!r} not found: {exc}", code="model_not_found", param="model")
    if isinstance(exc, RequestError):  # the request cannot be served as asked, anywhere
        return APIError(400, str(exc), code=exc.code, param=exc.param)
    if isinstance(exc, MoergeError):  # EngineError, ComposeError: the model exists but cannot answer now
        return APIError(503, str(exc), type="service_unavailable_error", code="engine_unavailable")
    raise exc


def _endpoint(request: Request) -> str:
    return getattr(request.scope.get("route"), "path", None) or "unmatched"


def _json_error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body().model_dump(), status_code=err.status, headers=err.headers)


def _json_response(model: Any, headers: dict[str, str]) -> Response:
    """A response model's JSON, serialised by pydantic in one step (no intermediate dict for
    ``json.dumps`` to walk again): the answer of every completion request."""
    return Response(model.model_dump_json(), media_type="application/json", headers=headers)


def _sse(payload: Any) -> str:
    data = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


# ------------------------------------------------------------------------------------- the app


def create_app(
    backend: Backend,
    registry: Registry,
    settings: GatewaySettings | None = None,
    limiter: Limiter | None = None,
    catalog: StrategyCatalog | None = None,
) -> FastAPI:
    """The gateway's FastAPI app; ``limiter`` counts the per-key rate limits (default: in this
    process's memory; several replicas share one, services/serving/rate_limits.py); ``catalog``:
    the strategies ``/v1/strategies`` lists and changes (default: the registry's, and the
    ``MOERGE_STRATEGIES`` file's)."""
    settings = settings or GatewaySettings()
    auth = Authenticator(registry, require_keys=settings.require_keys, window_s=settings.rate_window_s, limiter=limiter)
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.require_keys:
            log.warning(
                "API keys are not required (require_keys=False): anyone who can reach this gateway "
                "has admin rights. Use this on localhost only."
            )
        yield

    app = FastAPI(
        title="moerge gateway",
        summary="OpenAI-compatible API over registered experts and MoErging strategies.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.backend = backend
    app.state.registry = registry
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.auth = auth
    app.state.catalog = catalog or StrategyCatalog(registry)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    # -- errors: always OpenAI's shape --------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        metrics.error(_endpoint(request), exc.type)
        return _json_error(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            err = APIError(400, "the request body is not valid JSON", code="invalid_json")
        else:
            parts, param = [], None
            for e in errors[:5]:
                loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
                param = param or loc or None
                parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
            err = APIError(422, "invalid request: " + "; ".join(parts), code="invalid_request", param=param)
        metrics.error(_endpoint(request), err.type)
        return _json_error(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        err = APIError(exc.status_code, str(exc.detail), type=kind, headers=dict(exc.headers or {}))
        metrics.error(_endpoint(request), err.type)
        return _json_error(err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        metrics.error(_endpoint(request), "server_error")
        body = ErrorResponse(error=ErrorInfo(message=f"internal error: {type(exc).__name__}", type="server_error"))
        return JSONResponse(body.model_dump(), status_code=500)

    # -- completions ---------------------------------------------------------------------------

    def prepare(
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
        try:
            with anyio.fail_after(settings.request_timeout_s):
                completion = await backend.complete(model, prompt, params)
        except (MoergeError, TimeoutError) as exc:
            if not isinstance(exc, NotFoundError):
                request.state.model = model
            raise backend_error(exc, model) from exc
        request.state.model = model
        metrics.observe_completion(model, completion, router_ms(completion))
        return completion

    async def stream(
        request: Request, model: str, prompt: str, params: SamplingParams, chat: bool, include_usage: bool
    ) -> StreamingResponse:
        deadline = anyio.current_time() + settings.request_timeout_s
        items = backend.stream(model, prompt, params).__aiter__()

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
            if chat:
                d = DeltaMessage(content=delta) if delta is not None else DeltaMessage()
                choices = [ChatCompletionStreamChoice(delta=d, finish_reason=finish)]
                return ChatCompletionChunk(id=chunk_id, created=created, model=model, choices=choices, **extra)
            choices = [CompletionStreamChoice(text=delta or "", finish_reason=finish)]
            return CompletionChunk(id=chunk_id, created=created, model=model, choices=choices, **extra)

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
                metrics.observe_completion(model, completion, router_ms(completion))
                yield _sse(chunk(None, completion.finish_reason, moe=moe_object(model, completion)))
                if include_usage:
                    usage = usage_of(completion)
                    if chat:
                        yield _sse(
                            ChatCompletionChunk(id=chunk_id, created=created, model=model, choices=[], usage=usage)
                        )
                    else:
                        yield _sse(CompletionChunk(id=chunk_id, created=created, model=model, choices=[], usage=usage))
            except (MoergeError, TimeoutError) as exc:
                # the status line is gone: the error travels as an event (OpenAI clients raise it)
                err = backend_error(exc, model)
                metrics.error(_endpoint(request), err.type)
                yield _sse(err.body())
            finally:
                aclose = getattr(items, "aclose", None)
                if aclose is not None:
                    await aclose()
            yield "data: [DONE]\n\n"

        headers = {**moe_headers(model), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, tags=["completions"])
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, principal: Principal = Depends(auth.user)
    ) -> Response:
        prompt, messages = chat_prompt(body.messages)
        params = prepare(body, prompt, principal, messages)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await stream(request, body.model, prompt, params, chat=True, include_usage=include_usage)
        completion = await complete(request, body.model, prompt, params)
        response = ChatCompletionResponse(
            model=body.model,
            choices=[
                ChatCompletionChoice(
                    message=ChatResponseMessage(content=completion.text), finish_reason=completion.finish_reason
                )
            ],
            usage=usage_of(completion),
            moe=moe_object(body.model, completion),
        )
        return _json_response(response, headers=moe_headers(body.model, completion))

    @app.post("/v1/completions", response_model=CompletionResponse, tags=["completions"])
    async def completions(
        body: CompletionRequest, request: Request, principal: Principal = Depends(auth.user)
    ) -> Response:
        prompt = body.prompt_text
        params = prepare(body, prompt, principal)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await stream(request, body.model, prompt, params, chat=False, include_usage=include_usage)
        completion = await complete(request, body.model, prompt, params)
        response = CompletionResponse(
            model=body.model,
            choices=[CompletionChoice(text=completion.text, finish_reason=completion.finish_reason)],
            usage=usage_of(completion),
            moe=moe_object(body.model, completion),
        )
        return _json_response(response, headers=moe_headers(body.model, completion))

    # -- models --------------------------------------------------------------------------------

    @app.get("/v1/models", response_model=ModelList, tags=["models"])
    def list_models(principal: Principal = Depends(auth.user)) -> ModelList:
        cards = [
            ModelCard(id=m.id, created=m.created, kind=m.kind, version=m.version)
            for m in backend.models()
            if principal.allows(m.id)
        ]
        return ModelList(data=cards)

    # -- experts (admin) -----------------------------------------------------------------------

    @app.post("/v1/experts", response_model=ExpertCard, status_code=201, tags=["experts"])
    async def register_expert(body: ExpertCreateRequest, _: Principal = Depends(auth.admin)) -> JSONResponse:
        try:
            card = await backend.register_expert(body.registry_kwargs())
        except MoergeError as exc:  # RegistrationError, or NotFoundError for an unknown base
            raise APIError(400, str(exc), code="registration_refused") from exc
        log.info("registered expert %s version %s", card.get("name"), card.get("version"))
        return JSONResponse(ExpertCard(**card).model_dump(mode="json"), status_code=201)

    @app.get("/v1/experts", response_model=ExpertList, tags=["experts"])
    def list_experts(
        kind: str | None = None, status: str | None = None, principal: Principal = Depends(auth.user)
    ) -> ExpertList:
        experts = registry.list_experts(kind=kind, status=status)
        return ExpertList(data=[ExpertCard.from_record(e) for e in experts if principal.allows(e.name)])

    @app.get("/v1/experts/{name}", response_model=ExpertDetail, tags=["experts"])
    def get_expert(name: str, version: str | None = None, principal: Principal = Depends(auth.user)) -> ExpertDetail:
        check_model_allowed(principal, name)
        try:
            expert = registry.get_expert(name, version)
            n_examples = len(registry.get_examples(name, expert.version))
        except NotFoundError as exc:
            raise APIError(404, str(exc), type="not_found_error", code="expert_not_found", param="name") from exc
        with registry.reading() as s:
            versions = list(s.scalars(select(Expert.version).where(Expert.name == name).order_by(Expert.id)))
        card = ExpertCard.from_record(expert).model_dump()
        return ExpertDetail(**card, versions=versions, examples=n_examples)

    @app.delete("/v1/experts/{name}", response_model=ExpertDeleted, tags=["experts"])
    async def delete_expert(name: str, version: str | None = None, _: Principal = Depends(auth.admin)) -> ExpertDeleted:
        try:
            removed = await backend.remove_expert(name, version)
        except NotFoundError as exc:
            raise APIError(404, str(exc), type="not_found_error", code="expert_not_found", param="name") from exc
        except MoergeError as exc:
            raise APIError(400, str(exc)) from exc
        log.info("removed expert %s (%d versions)", name, len(removed))
        return ExpertDeleted(name=name, versions=[ExpertCard(**c) for c in removed])

    # -- operations ----------------------------------------------------------------------------

    @app.get("/healthz", response_model=Health, tags=["operations"])
    def healthz() -> Health:
        try:
            with registry.reading() as s:
                s.execute(text("SELECT 1"))
            n = len(backend.models())
        except Exception as exc:  # any failure here means "do not send traffic"
            raise APIError(503, f"unhealthy: {exc}", type="service_unavailable_error", code="unhealthy") from exc
        return Health(models=n)

    @app.get("/metrics", tags=["operations"])
    def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    app.include_router(strategies_router)  # /v1/strategies (docs/strategies.md)
    app.include_router(leaderboard_router(registry))  # GET /leaderboard, /v1/leaderboard (docs/leaderboard.md)
    return app
