"""Calls to an OpenAI-compatible server (vLLM, another moerge gateway, llama.cpp, TGI's Messages API),
made directly over HTTP: what an external expert registered as ``openai/<model>`` with its own
``api_base`` is.

litellm translates between dozens of provider APIs; a server that already speaks OpenAI's
chat-completions needs none of that, and litellm's per-call work (its logging, cost and callback
machinery) was most of the gateway's CPU per request to such an expert (docs/benchmarks.md,
"Against peers"). Here a request is one JSON body on a pooled keep-alive connection: ``httpx``
for blocking callers (strategy pools, ``moerge generate``), ``aiohttp`` on the gateway's own event
loop. Provider model strings, and ``openai/…`` without an ``api_base``, still go through litellm.
"""

from __future__ import annotations

import asyncio
import json
import threading
import weakref
from typing import Any

from services.engines.base import EngineError, GenerateRequest, GenerateResult

PREFIX = "openai/"
DEFAULT_TIMEOUT_S = 600.0


def compatible_model(model: str, api_base: str | None) -> str | None:
    """The model name to send, when ``model`` is served by an OpenAI-compatible ``api_base``."""
    if api_base and model.startswith(PREFIX) and len(model) > len(PREFIX):
        return model[len(PREFIX) :]
    return None


def chat_body(model: str, request: GenerateRequest) -> dict[str, Any]:
    """OpenAI's chat-completions body for one request: its messages as they came, or a completion
    prompt as one user message; only the parameters OpenAI's API has, and only those set."""
    messages = [{"role": role, "content": content} for role, content in request.messages]
    body: dict[str, Any] = {
        "model": model,
        "messages": messages or [{"role": "user", "content": request.prompt}],
        "max_tokens": request.max_new_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
    }
    if request.seed is not None:
        body["seed"] = request.seed
    if request.stop:
        body["stop"] = list(request.stop)
    if request.frequency_penalty:
        body["frequency_penalty"] = request.frequency_penalty
    if request.presence_penalty:
        body["presence_penalty"] = request.presence_penalty
    if request.logit_bias:  # token ids of the server's tokenizer, as OpenAI's API takes them
        body["logit_bias"] = {str(t): b for t, b in request.logit_bias}
    return body


def result_of(model: str, status: int, payload: bytes, chat: bool) -> GenerateResult:
    """A server's reply as a ``GenerateResult``; an error status or a malformed body is an
    ``EngineError`` that carries the server's own message."""
    try:
        reply = json.loads(payload)
    except ValueError:
        reply = None
    if status >= 400 or not isinstance(reply, dict):
        message = reply.get("error", reply) if isinstance(reply, dict) else payload[:500].decode(errors="replace")
        if isinstance(message, dict):
            message = message.get("message", message)
        raise EngineError(f"external model {model!r} failed: HTTP {status}: {message}")
    try:
        choice = reply["choices"][0]
        text = choice["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise EngineError(f"external model {model!r} answered without a chat choice: {str(reply)[:500]}") from exc
    usage = reply.get("usage") or {}
    return GenerateResult(
        text=text,
        token_ids=[],  # a remote API gives no token ids
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
        prompt_rule="chat_template" if chat else "raw",  # the server applies its own template
    )


class OpenAICompatibleClient:
    """One server (``api_base``, ``api_key``): blocking and async calls over pooled connections.
    Clients are shared per server, so that connections are reused across requests."""

    _shared: dict[tuple[str, str | None, float], OpenAICompatibleClient] = {}
    _shared_lock = threading.Lock()

    def __init__(self, api_base: str, api_key: str | None, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout
        self._sync: Any = None
        self._sync_lock = threading.Lock()
        # one aiohttp session per event loop (a session is bound to the loop it was made on)
        self._sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()

    @classmethod
    def for_server(cls, api_base: str, api_key: str | None, timeout: float | None = None) -> OpenAICompatibleClient:
        key = (api_base, api_key, float(timeout or DEFAULT_TIMEOUT_S))
        with cls._shared_lock:
            client = cls._shared.get(key)
            if client is None:
                client = cls._shared[key] = cls(api_base, api_key, key[2])
            return client

    @classmethod
    async def close_sessions(cls) -> None:
        """Close every shared client's aiohttp session on the running event loop: what a server
        on that loop does as it shuts down (a session left open when its loop ends leaks its
        connections, and aiohttp reports it unclosed)."""
        loop = asyncio.get_running_loop()
        with cls._shared_lock:
            clients = list(cls._shared.values())
        for client in clients:
            session = client._sessions.pop(loop, None)
            if session is not None and not session.closed:
                await session.close()

    def generate(self, model: str, request: GenerateRequest) -> GenerateResult:
        import httpx

        with self._sync_lock:
            if self._sync is None:
                self._sync = httpx.Client(timeout=self.timeout, limits=httpx.Limits(max_connections=64))
        body = chat_body(model, request)
        try:
            reply = self._sync.post(self.url, content=json.dumps(body), headers=self.headers)
        except httpx.HTTPError as exc:
            raise EngineError(f"external model {model!r} failed: {type(exc).__name__}: {exc}") from exc
        return result_of(model, reply.status_code, reply.content, bool(request.messages))

    async def agenerate(self, model: str, request: GenerateRequest) -> GenerateResult:
        import aiohttp

        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(limit=64)
            session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout))
            self._sessions[loop] = session
        body = chat_body(model, request)
        try:
            async with session.post(self.url, data=json.dumps(body), headers=self.headers) as reply:
                payload = await reply.read()
                status = reply.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise EngineError(f"external model {model!r} failed: {type(exc).__name__}: {exc}") from exc
        return result_of(model, status, payload, bool(request.messages))
