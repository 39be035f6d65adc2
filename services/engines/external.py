"""The external engine: experts that live behind someone else's API.

A target is a litellm model string: a provider model (``anthropic/claude-…``, ``gpt-4o-mini``) whose
key litellm reads from the environment, called through litellm; or ``openai/<model>`` on any
OpenAI-compatible server (another moerge gateway, a vLLM server) given ``api_base``, called
directly over HTTP (``services.engines.openai_compat``): such a server needs no translation. A
chat goes out as its messages, as they came; a completion prompt as one user message. OpenAI's
own parameters go with them (``frequency_penalty``, ``presence_penalty``, ``logit_bias``); vLLM's
extensions, which a provider API has not, are refused (``UnsupportedParameterError``), never
dropped.

What a remote API cannot give: token ids (``GenerateResult.token_ids`` is empty and
``completion_tokens`` is the provider's usage count) and log-likelihoods of a given continuation
(``score`` raises ``EngineError``; chat APIs return log-probs of their own samples only).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from composer.engine_protocol import UnsupportedParameterError
from services.engines import openai_compat
from services.engines.base import (
    EngineError,
    GenerateRequest,
    GenerateResult,
    ScoreRequest,
    ScoreResult,
)

# litellm otherwise fetches its model price list from the network when it is first imported
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


class ExternalEngine:
    """Engine protocol over ``litellm.completion``. Holds no connection; calls are independent."""

    kind = "external"

    def __init__(
        self,
        default_model: str | None = None,
        *,
        base_name: str = "base",
        api_base: str | None = None,
        api_key: str | None = None,
        max_concurrency: int = 8,
        **completion_kwargs: Any,
    ) -> None:
        """``default_model`` answers the base target (``None`` as target), if given; other targets
        are registered with ``load_model``. ``api_base`` / ``api_key`` apply to every call, and
        ``completion_kwargs`` (``timeout``, ``num_retries``, ``drop_params``, …) go to litellm."""
        self.base_name = base_name
        self._default_model = str(default_model) if default_model is not None else None
        self._models: dict[str, str] = {}  # target name -> litellm model string
        self._call_kwargs = {"api_base": api_base, "api_key": api_key, **completion_kwargs}
        self._max_concurrency = max(1, max_concurrency)
        self._direct = (
            openai_compat.OpenAICompatibleClient.for_server(api_base, api_key, completion_kwargs.get("timeout"))
            if api_base
            else None
        )

    # ------------------------------------------------------------------ loading

    def load_adapter(self, name: str, path: str) -> None:
        raise EngineError(f"adapter {name!r}: the external engine calls remote models; it cannot load LoRA adapters")

    def unload_adapter(self, name: str) -> None:
        raise EngineError(f"adapter {name!r} is not loaded on this engine (the external engine has no adapters)")

    def load_model(self, name: str, path: str) -> None:
        """Register ``name`` as the litellm model string ``path`` (nothing is contacted yet)."""
        if not name or name == self.base_name or name in self._models:
            raise EngineError(f"target name {name!r} is empty or already taken on this engine; unload it first")
        if not str(path).strip():
            raise EngineError(f"model {name!r}: the litellm model string is empty")
        self._models[name] = str(path)

    def unload_model(self, name: str) -> None:
        if self._models.pop(name, None) is None:
            raise EngineError(f"model {name!r} is not loaded on this engine")

    def targets(self) -> dict[str, str]:
        found = {self.base_name: "base"} if self._default_model is not None else {}
        found.update({name: "model" for name in self._models})
        return found

    # ------------------------------------------------------------------ generate

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        models = [self._model_for(r.target) for r in requests]  # fail before any call goes out
        if len(requests) <= 1:
            return [self._complete(m, r) for m, r in zip(models, requests)]
        # remote calls spend their time waiting on the network: run them side by side
        with ThreadPoolExecutor(min(self._max_concurrency, len(requests))) as pool:
            return list(pool.map(self._complete, models, requests))

    async def agenerate(self, request: GenerateRequest) -> GenerateResult:
        """One request, awaited: on the caller's event loop where the target is on an
        OpenAI-compatible server, else litellm's call in a worker thread."""
        model = self._model_for(request.target)
        direct = openai_compat.compatible_model(model, self._call_kwargs["api_base"])
        if direct is None or self._direct is None:
            import anyio

            return await anyio.to_thread.run_sync(self._complete, model, request)
        _refuse_provider_unsupported(model, request)
        return await self._direct.agenerate(direct, request)

    def _complete(self, model: str, request: GenerateRequest) -> GenerateResult:
        _refuse_provider_unsupported(model, request)
        direct = openai_compat.compatible_model(model, self._call_kwargs["api_base"])
        if direct is not None and self._direct is not None:
            return self._direct.generate(direct, request)
        import litellm

        try:
            # the same OpenAI-shaped request; litellm translates it for the provider
            reply = litellm.completion(**openai_compat.chat_body(model, request), **self._call_kwargs)
        except Exception as exc:  # providers raise many classes; all mean "this call failed"
            raise EngineError(f"external model {model!r} failed: {exc}") from exc
        choice = reply.choices[0]
        usage = getattr(reply, "usage", None)
        return GenerateResult(
            text=choice.message.content or "",
            token_ids=[],
            prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
            completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
            finish_reason="length" if choice.finish_reason == "length" else "stop",
            # the provider applies its own template to the messages
            prompt_rule="chat_template" if request.messages else "raw",
        )

    # ------------------------------------------------------------------ score

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        raise EngineError(
            "the external engine cannot score: remote chat APIs give no log-likelihood of a given "
            "continuation; score multiple-choice tasks on an hf or vllm engine"
        )

    # ------------------------------------------------------------------ targets

    def _model_for(self, target: str | None) -> str:
        if target is None or target == self.base_name:
            if self._default_model is None:
                raise EngineError("this external engine has no default model; name a target loaded with load_model")
            return self._default_model
        model = self._models.get(target)
        if model is None:
            raise EngineError(f"target {target!r} is not loaded on this engine (loaded: {sorted(self.targets())})")
        return model


def _refuse_provider_unsupported(model: str, request: GenerateRequest) -> None:
    refused = _provider_unsupported(request)
    if refused is not None:
        raise UnsupportedParameterError(
            f"{refused!r} is not part of the provider API that external model {model!r} is called "
            "through; leave it out, or ask a local expert",
            refused,
        )


def _provider_unsupported(request: GenerateRequest) -> str | None:
    """The first of vLLM's extensions a request sets, which provider APIs do not have."""
    if request.top_k:
        return "top_k"
    if request.min_p:
        return "min_p"
    if request.repetition_penalty != 1.0:
        return "repetition_penalty"
    if request.stop_token_ids:
        return "stop_token_ids"
    if request.ignore_eos:
        return "ignore_eos"
    if not request.skip_special_tokens:
        return "skip_special_tokens"
    return None


# the variables external experts may read their keys from: the server's operator lists them, so
# that no registration can have the server send another secret of its environment to a host
EXTERNAL_KEY_VARS = "MOERGE_EXTERNAL_KEY_VARS"


def external_key_vars() -> set[str]:
    return {v.strip() for v in os.environ.get(EXTERNAL_KEY_VARS, "").split(",") if v.strip()}


def external_engine_for(expert: Any) -> ExternalEngine:
    """An ``ExternalEngine`` with a registered external expert's own connection: its ``api_base``,
    and the key read from the environment variable it names (where this process runs, at call
    time). That variable must be one the server lists in MOERGE_EXTERNAL_KEY_VARS. An expert with
    its own ``api_base`` and no key variable calls it without a key: the provider key litellm
    would otherwise take from the environment (OPENAI_API_KEY) never goes to a registered host."""
    key = None
    if expert.api_key_env:
        if expert.api_key_env not in external_key_vars():
            raise EngineError(
                f"external expert {expert.ref} takes its key from ${expert.api_key_env}, which this "
                f"server does not let external experts read: list it in {EXTERNAL_KEY_VARS}"
            )
        key = os.environ.get(expert.api_key_env)
        if not key:
            raise EngineError(
                f"external expert {expert.ref} takes its key from ${expert.api_key_env}, "
                "which is not set on this server"
            )
    elif expert.api_base:
        key = "no-key"  # litellm's providers need one; never the environment's
    return ExternalEngine(api_base=expert.api_base, api_key=key)
