"""The Ray Serve application: gateway ingress, one engine deployment per base, strategies.

``build_app(args)`` is a Ray Serve application builder — the same import path serves
``moerge serve`` (local Ray or ``RAY_ADDRESS``), ``serve run services.serving.app:build_app`` and
the Helm chart's RayService. ``args = {"config": <serve config dict or YAML path>}``.

Deployments (docs/serving.md draws them):

- ``engine-<base>``: one per registered base model, multiplexing that base's adapters and the full
  models fine-tuned from it (engine_server.py);
- ``models``: full-model experts whose base has no engine deployment;
- ``strategies``: every served ``moe/<name>`` — routers, composers, and the token-level mixture
  engine, calling the engine deployments through a ``RemoteEngine``;
- ``gateway``: the FastAPI app (services/gateway/app.py) over a ``RayBackend``.

Bases are deployed at start-up; an expert registered later on a deployed base (or a full model)
is servable at once, and routable as soon as the strategies replica sees the registry change
(``strategies.refresh_interval_s``). An adapter on a base registered later is servable at once
too, on an engine of its own in ``models``; a restart gives the base its multiplexed deployment.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, cast

import anyio
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from composer.base import Completion, output_of
from composer.engine_protocol import EngineError
from composer.single import answered
from registry.errors import NotFoundError
from registry.service import Registry
from routers.base import Decision
from services.gateway.app import GatewaySettings, create_app
from services.gateway.backend import (
    LiveStrategies,
    LocalBackend,
    SamplingParams,
    base_completion,
    direct_completion,
    is_strategy,
    split_ref,
)
from services.gateway.protocol import ExpertCard
from services.moe.catalog import StrategyCatalog
from services.moe.strategies import Routed
from services.serving.batching import PacedBatcher
from services.serving.config import EnginesConfig, ServeConfig, load_config
from services.serving.engine_server import INTERNAL_LOGGING, engine_deployment
from services.serving.lookup import ExpertLookup, ExpertRow
from services.serving.rate_limits import SharedRateLimiter
from services.serving.remote import RemoteEngine, Targets, acall_with_retry
from services.serving.strategy_host import StrategyHost, servable_strategies, served_names

APP_NAME = "moerge"


# ------------------------------------------------------------------------------------ strategies


class StrategyServer:
    """Ray Serve deployment around a ``StrategyHost`` whose engine is the remote engines."""

    def __init__(
        self,
        engines: dict[str, DeploymentHandle],
        models: DeploymentHandle,
        names: list[str] | None,
        refresh_interval_s: float,
        strategies_file: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
    ) -> None:
        targets = Targets(engines, models)
        registry = Registry()
        catalog = StrategyCatalog(registry, file=strategies_file, refresh_interval_s=refresh_interval_s)
        self.host = StrategyHost(
            registry,
            names,
            engine_factory=lambda pool: RemoteEngine(pool, targets),
            refresh_interval_s=refresh_interval_s,
            catalog=catalog,
            # what runs in this replica (mixtures, merges, router fitting), on its own device
            engine_args=lambda base: {"device": device, "dtype": dtype},
        )
        self._batches: PacedBatcher | None = None

    def names(self) -> list[str]:
        return list(self.host.names)

    async def decide(self, name: str, prompt: str) -> Routed | None:
        """The routing alone, for a strategy whose answer is one expert's (``StrategyHost.decide``):
        the gateway streams that expert from its engine deployment itself."""
        return await anyio.to_thread.run_sync(self.host.decide, name, prompt)

    async def complete(self, name: str, prompt: str, params: SamplingParams) -> Completion:
        if self._batches is None:  # on the replica's event loop, by its first request
            # up to 32 requests per batch; an idle replica waits 5 ms for a burst to gather
            self._batches = PacedBatcher(self._complete_together, max_calls=32, wait_s=0.005)
        return await self._batches.submit((name, prompt, params))

    async def _complete_together(
        self, items: list[tuple[str, str, SamplingParams]]
    ) -> list[Completion | BaseException]:
        """Concurrent requests share ``MoE.run`` calls, one per (strategy, sampling parameters):
        routed per prompt, then batched per expert on the engines. A batch closes when the previous
        one is done (``PacedBatcher``): requests that arrive while the routers work wait for the
        next batch together, not in many small ones."""
        groups: dict[tuple[str, SamplingParams], list[int]] = {}
        for i, (name, _, params) in enumerate(items):
            # chats with different messages share a call: each prompt keeps its own conversation
            groups.setdefault((name, replace(params, messages=())), []).append(i)
        out: list[Completion | BaseException] = [None] * len(items)  # type: ignore[list-item]
        for (name, params), idx in groups.items():
            prompts = [items[i][1] for i in idx]
            conversations = [items[i][2].messages for i in idx]
            done: Sequence[Completion | BaseException]
            try:
                run_group = partial(self.host.complete_many, name, prompts, conversations, **params.generation())
                done = await anyio.to_thread.run_sync(run_group)
            except Exception as exc:  # noqa: BLE001 - this group's callers get it; other groups go on
                done = [exc] * len(idx)
            for i, completion in zip(idx, done):
                out[i] = completion
        return out  # a caller handed an exception raises it (complete)


# ------------------------------------------------------------------------------------ backend


_CALLS_KEPT = 4096


class RayBackend(LocalBackend):
    """``LocalBackend``'s registry side (models, registration, removal, external experts) with the
    engines and strategies behind Ray Serve handles."""

    def __init__(
        self,
        registry: Registry,
        engines: dict[str, DeploymentHandle],
        models: DeploymentHandle,
        strategies: DeploymentHandle,
        strategy_names: list[str],
        engine_for_base: Any = None,
        catalog: StrategyCatalog | None = None,
    ) -> None:
        super().__init__(registry, engine_for_base=engine_for_base)
        self.catalog = catalog or StrategyCatalog(registry)
        self.lookup = ExpertLookup(registry)  # the per-request read, without SQLite's write lock
        self.targets = Targets(engines, models)
        self.strategies = strategies
        self._calls: dict[tuple[str, str], Any] = {}  # _generate_call's
        # the strategies replica serves the configured ones and every one stored since: so do we
        self.add_strategies(LiveStrategies(lambda: served_names(strategy_names, self.catalog), self._strategy_call))

    def _generate_call(self, handle: DeploymentHandle, mid: str) -> Any:
        """``handle.options(multiplexed_model_id=mid).generate``, made once per expert: ``options``
        builds a new handle each time, a cost every request would pay again."""
        key = (handle.deployment_name, mid)
        call = self._calls.get(key)
        if call is None:
            if len(self._calls) >= _CALLS_KEPT:  # experts come and go: start over, rarely
                self._calls.clear()
            call = self._calls[key] = handle.options(multiplexed_model_id=mid).generate
        return call

    def _strategy_call(self, name: str):
        async def call(prompt: str, params: SamplingParams) -> Completion:
            return await acall_with_retry(lambda: self.strategies.complete.remote(name, prompt, params))

        return call

    async def _ready_expert(self, model: str) -> ExpertRow:
        name, version = split_ref(model)
        # 404 if unknown; from the rows already read while the registry is unchanged (lookup.py)
        expert = self.lookup.cached(name, version)
        if expert is None:  # not read under the current change counter (an ExpertRow is never falsy)
            expert = await anyio.to_thread.run_sync(self.lookup.get, name, version)
        if expert.status != "ready":
            raise EngineError(f"expert {expert.ref} is {expert.status}, not ready to serve")
        return expert

    def models(self):  # noqa: ANN201
        """As ``LocalBackend``'s, but a base answers by its name only where it has an engine
        deployment (a base registered after start-up gets one at the next restart)."""
        return [m for m in super().models() if m.kind != "base" or m.id in self.targets.engines]

    def _base_engine(self, model: str, missing: NotFoundError) -> tuple[DeploymentHandle, str]:
        """The engine deployment of a base called by its name (no multiplexed id: the base itself)."""
        if model in self.targets.engines:
            return self.targets.engines[model], model
        raise missing

    async def complete(self, model: str, prompt: str, params: SamplingParams) -> Completion:
        if is_strategy(model):
            return await super().complete(model, prompt, params)
        try:
            expert = await self._ready_expert(model)
        except NotFoundError as missing:
            handle, base = self._base_engine(model, missing)
            [result] = await acall_with_retry(lambda: handle.generate.remote([params.request(prompt)]))
            return base_completion(base, output_of(base, result, weight=1.0))
        if expert.kind == "external":
            return await super().complete(model, prompt, params)  # litellm, from this replica
        call = self._generate_call(*self.targets.for_expert(expert))
        [result] = await acall_with_retry(lambda: call.remote([params.request(prompt)]))
        return direct_completion(expert, output_of(expert.name, result, weight=1.0))

    async def stream(self, model: str, prompt: str, params: SamplingParams) -> AsyncIterator[str | Completion]:
        """Text as the engine generates it (a Serve streaming call to the engine deployment), then
        the record: for an expert, and for a strategy whose answer is one routed expert's (the
        strategies deployment routes, this replica streams the chosen expert). Other strategies and
        external experts: as ``LocalBackend`` streams them. Should the engine fail before any text
        went out (a replica died, say), the request is answered whole instead, with ``complete``'s
        retries and the strategy's fall-back to the next ranked expert."""
        if is_strategy(model):
            routed: Routed | None = await acall_with_retry(lambda: self.strategies.decide.remote(model, prompt))
            # decide answers for query-level single-composer strategies alone: a Decision, never a MixtureSpec
            chosen = None if routed is None else cast(Decision, routed.decision).top
            expert = None if chosen is None else await self._ready_expert(chosen)
        else:
            try:
                routed, expert = None, await self._ready_expert(model)
            except NotFoundError as missing:  # a base by its name: answered whole, in words
                self._base_engine(model, missing)
                async for item in self.stream_whole(model, prompt, params):
                    yield item
                return
        if expert is None or expert.kind == "external":
            async for item in self.stream_whole(model, prompt, params):
                yield item
            return
        handle, mid = self.targets.for_expert(expert)
        call = handle.options(multiplexed_model_id=mid, stream=True).generate_stream
        result, sent = None, False
        try:
            async for item in call.remote(params.request(prompt)):
                if isinstance(item, str):
                    sent = True
                    yield item
                else:
                    result = item
        except Exception:
            if sent:
                raise  # text already went out: the stream ends with an error event
            async for item in self.stream_whole(model, prompt, params):
                yield item
            return
        assert result is not None  # generate_stream's last item is the GenerateResult (or the stream raised)
        if routed is None:
            yield direct_completion(expert, output_of(expert.name, result, weight=1.0))
        else:
            decision = cast(Decision, routed.decision)  # as above: decide's are Decisions
            yield answered(decision, expert.name, float(decision.experts[0][1]), result)

    async def remove_expert(self, name: str, version: str | None = None) -> list[dict]:
        # the registry row goes; replicas evict the expert's weights by LRU (its model id, which
        # carries the row id, is never asked for again); requests already running finish
        removed = await anyio.to_thread.run_sync(self.registry.remove_expert, name, version)
        return [ExpertCard.from_record(e).model_dump(mode="json") for e in removed]


@serve.ingress()
class Gateway:
    def __init__(
        self,
        engines: dict[str, DeploymentHandle],
        models: DeploymentHandle,
        strategies: DeploymentHandle,
        strategy_names: list[str],
        settings: dict[str, Any],
        engines_config: dict[str, Any] | None = None,
        strategies_file: str | None = None,
    ) -> None:
        self.registry = Registry()
        self.catalog = StrategyCatalog(self.registry, file=strategies_file)
        served = EnginesConfig.model_validate(engines_config or {})

        def engine_for_base(base: str) -> tuple[str, dict[str, Any]]:
            cfg = served.for_base(base)
            return cfg.engine, cfg.engine_args

        self.backend = RayBackend(
            self.registry,
            engines,
            models,
            strategies,
            strategy_names,
            engine_for_base=engine_for_base,
            catalog=self.catalog,
        )
        self.settings = GatewaySettings(**settings)
        # one set of per-key windows for every gateway replica (rate_limits.py)
        self.limiter = SharedRateLimiter(self.settings.rate_window_s)

    def __serve_build_asgi_app__(self):
        return create_app(self.backend, self.registry, self.settings, limiter=self.limiter, catalog=self.catalog)


# ------------------------------------------------------------------------------------ the graph


# Ray Serve runs a replica's code on an event loop of its own, in a second thread, and each
# handle's router on a third loop (ray/serve/_private/constants.py: both default to "1"). Each
# request then crosses threads several times — actor call -> user loop -> router loop -> engine and
# back — and every crossing waits for the GIL and, on a busy 2-core machine, for a core. The gateway
# needs neither thread: everything it does is async or handed to worker threads (registry reads,
# in-process litellm calls, FastAPI's sync endpoints), and every handle call it makes comes from
# that one event loop. So its replicas run the FastAPI app on the replica's main loop
# (RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0) and route on it too
# (RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0: a handle then gets Serve's CurrentLoopRouter, which
# must be first used inside a running loop — RayBackend only calls handles from request handlers).
# These are the knobs RAY_SERVE_THROUGHPUT_OPTIMIZED=1 turns off for every Serve process; here they
# go to the gateway's replicas alone, through the deployment's runtime_env (Serve merges its
# env_vars over the job's). The strategies replica keeps the defaults, set explicitly so that they
# hold on a cluster started with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (Ray's docs pair it with HAProxy;
# services/serving/ingress.py sets its parts one by one instead): its composers call the engines
# through blocking ``.result()`` from worker threads, which needs a router on a loop of its own.
GATEWAY_RAY_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}
STRATEGIES_RAY_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
}


def _runtime_env_with(env_vars: dict[str, str]) -> dict[str, Any]:
    """The runtime_env every other deployment inherits from the job (``ray.init(runtime_env=...)``:
    MOERGE_HOME, the offline flags), plus ``env_vars``. Serve hands a deployment that names a
    runtime_env of its own only that one (``build_app._set_default_runtime_env``), so the job's
    is merged in here."""
    base = dict(ray.get_runtime_context().runtime_env or {}) if ray.is_initialized() else {}
    base["env_vars"] = {**(base.get("env_vars") or {}), **env_vars}
    return base


def deployment_name(base: str) -> str:
    return "engine-" + re.sub(r"[^A-Za-z0-9_-]+", "-", base)


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    config: ServeConfig = load_config((args or {}).get("config"))
    registry = Registry()
    engines = {}
    for base in registry.list_bases():
        cfg = config.engines.for_base(base.name)
        deployment = engine_deployment(
            deployment_name(base.name),
            max_loaded=cfg.max_adapters_per_replica,
            replicas=cfg.replicas,
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
        )
        # the registry's opt-in for the base's own code, never a prompt (transformers and vLLM
        # both take the flag; False makes a base with an auto_map fail clearly instead)
        engine_args = {**cfg.engine_args, "trust_remote_code": bool(base.trust_remote_code)}
        engines[base.name] = deployment.bind(base.name, cfg.engine, engine_args)
    m = config.models
    models = engine_deployment(
        "models", max_loaded=m.max_models_per_replica, replicas=m.replicas, num_cpus=m.num_cpus, num_gpus=m.num_gpus
    ).bind(None, config.engines.default.engine, config.engines.default.engine_args)
    s = config.strategies
    names = servable_strategies(s.names, StrategyCatalog(registry, file=s.file))  # a bad file fails here, at once
    # serve.deployment(cls, **options) is serve.deployment(**options)(cls) (ray/serve/api.py); only the
    # latter is typed as returning the Deployment
    strategies = serve.deployment(
        name="strategies",
        num_replicas=s.replicas,
        ray_actor_options={
            "num_cpus": s.num_cpus,
            "num_gpus": s.num_gpus,
            "runtime_env": _runtime_env_with(STRATEGIES_RAY_ENV),
        },
        max_ongoing_requests=64,
        logging_config=INTERNAL_LOGGING,
    )(StrategyServer).bind(engines, models, names, s.refresh_interval_s, s.file, s.device, s.dtype)
    g = config.gateway
    settings = {"require_keys": g.require_keys, "request_timeout_s": g.request_timeout_s}
    return serve.deployment(
        name="gateway",
        num_replicas=g.replicas,
        ray_actor_options={"num_cpus": g.num_cpus, "runtime_env": _runtime_env_with(GATEWAY_RAY_ENV)},
        max_ongoing_requests=256,
    )(Gateway).bind(engines, models, strategies, names, settings, config.engines.model_dump(), s.file)
