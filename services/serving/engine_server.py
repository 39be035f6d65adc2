"""The engine deployment: one engine per base model, its experts multiplexed by Ray Serve.

A request names its expert through Ray Serve's multiplexed model id
(``name@version#row-id.checksum``), so Serve routes it to a replica that already holds that
adapter; a replica loads one on its first request and evicts the least recently used beyond
``max_adapters_per_replica``. Row ids alone are not enough to tell experts apart over time
(SQLite hands a deleted row's id to the next insert), so the id carries the weights' checksum: a
removed expert's copy, still cached until evicted, is never served for another one.

A deployment without a base (``base=None``) serves full-model experts that have no base model on
the cluster, and adapters whose base was registered after start-up (no engine deployment yet):
each is an engine of its own (an adapter's over its base), multiplexed the same way.

Engines are single-threaded: every call holds the replica's lock, in a worker thread, so the
replica's event loop stays free to accept (and queue) requests.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
from ray import serve

from composer.engine_protocol import (
    Emit,
    EngineError,
    GenerateRequest,
    GenerateResult,
    ScoreRequest,
    ScoreResult,
    generate_emitting,
)
from registry.errors import NotFoundError
from registry.hub import model_folder
from registry.service import Registry
from services.serving.batching import PacedBatcher


def model_id(name: str, version: str, row_id: int, checksum: str) -> str:
    return f"{name}@{version}#{row_id}.{checksum[:16]}"


def parse_model_id(mid: str) -> tuple[str, str, int, str]:
    ref, _, tail = mid.rpartition("#")
    name, _, version = ref.partition("@")
    row, _, checksum = tail.partition(".")
    if not (name and version and row.isdigit() and checksum):
        raise EngineError(f"malformed multiplexed model id {mid!r} (want name@version#id.checksum)")
    return name, version, int(row), checksum


def engine_target(mid: str) -> str:
    """The expert's name on the engine: unique per model id, and a safe peft adapter name."""
    _, _, row, checksum = parse_model_id(mid)
    return f"expert{row}_{checksum}"


def build_engine(kind: str, path: Path, base_name: str, engine_args: dict[str, Any]) -> Any:
    from services.engines.loader import make_engine  # torch / vllm load in the replica only

    return make_engine(kind, path, base_name=base_name, **engine_args)


class _Loaded:
    """What the multiplexer keeps per model id. Ray Serve calls ``__del__`` when it evicts it, and
    garbage collection may call it again later — by then the same id can be loaded anew, so only
    the first call acts, and only on the load it stands for (``token``)."""

    _tokens = iter(range(1, 1 << 62))

    def __init__(self, server: EngineServerBase, mid: str, target: str | None) -> None:
        self.server, self.mid, self.target = server, mid, target
        self.token = next(self._tokens)
        self._released = False

    def __del__(self) -> None:
        if not self._released:
            self._released = True
            try:
                self.server._unload(self.mid, self.token)
            except Exception:  # noqa: BLE001 - never raise from a finaliser (interpreter shutdown)
                pass


_END = object()  # a stream's end marker
_SIZES_KEPT = 64  # batch_stats' ``sizes``: the first batches since the last reset


def _fresh_batch_counts() -> dict[str, Any]:
    return {"batches": 0, "calls": 0, "rows": 0, "busy_s": 0.0, "sizes": []}


@dataclass
class _Call:
    """One caller's requests, and for a streamed one the function its pieces go to (per request;
    None: not streamed)."""

    requests: list[GenerateRequest]
    emits: list[Emit | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.emits = self.emits or [None] * len(self.requests)

    def run(self, engine: Any) -> list[GenerateResult]:
        """``engine.generate`` (blocking), streamed requests' text to their emits."""
        return generate_emitting(engine, self.requests, self.emits)


class EngineServerBase:
    """The deployment's body; ``engine_deployment`` adds the multiplexed loader with its LRU size."""

    def __init__(self, base: str | None, engine: str = "hf", engine_args: dict | None = None) -> None:
        self.registry = Registry()  # MOERGE_DATABASE_URL / MOERGE_HOME from the replica's environment
        self.base = base
        self.kind = engine
        self.engine_args = dict(engine_args or {})
        self._lock = threading.Lock()
        self._targets: dict[str, str] = {}  # model id -> adapter name on self.engine
        self._models: dict[str, Any] = {}  # model id -> engine of its own (full models)
        self._loads: dict[str, int] = {}  # model id -> token of its current load
        # requests between "target loaded" and "generate done", per model id: an LRU eviction of
        # a target in use waits for them (a batch must not lose its adapter mid-flight)
        self._in_use: dict[str, int] = {}
        self._deferred: dict[str, int] = {}  # model id -> load token to drop once unused
        self._use_lock = threading.Lock()
        # batches the engine ran for ``generate`` (batch_stats): how many calls each one held
        self._batch_counts = _fresh_batch_counts()
        self._batches: PacedBatcher | None = None
        self.engine = None
        if base is not None:
            record = self.registry.get_base(base)
            self.engine = build_engine(engine, model_folder(record.uri), base, self.engine_args)

    # -- loading (called by the multiplexer) ---------------------------------------------------

    async def _load_target(self, mid: str) -> _Loaded:
        return await anyio.to_thread.run_sync(self._load_blocking, mid)

    def _load_blocking(self, mid: str) -> _Loaded:
        name, version, row, checksum = parse_model_id(mid)
        expert = self.registry.get_expert(name, version)
        if expert.id != row or not expert.checksum.startswith(checksum) or expert.status != "ready":
            raise NotFoundError(f"expert {name}@{version} (#{row}) is no longer registered and ready")
        path = self.registry.expert_path(expert)
        if path is None or not path.exists():
            raise EngineError(f"expert {expert.ref}: its files are missing from the artifact store ({path})")
        with self._lock:
            engine = self.engine if expert.base is not None and expert.base.name == self.base else None
            target = engine_target(mid)
            if engine is not None and target in engine.targets():
                self._drop(target)  # an earlier load of this very id whose eviction has not run yet
            if expert.kind == "adapter" and engine is not None:
                engine.load_adapter(target, path)
                self._targets[mid] = target
                return self._loaded(mid, target)
            if expert.kind == "model" and engine is not None:
                engine.load_model(target, path)
                self._targets[mid] = target
                return self._loaded(mid, target)
            if expert.kind == "model":  # a full model never runs code of its own
                self._models[mid] = build_engine(
                    self.kind, path, target, {**self.engine_args, "trust_remote_code": False}
                )
                return self._loaded(mid, None)
            if expert.kind == "adapter" and expert.base is not None and self.engine is None:
                # an adapter whose base got no engine deployment (registered after start-up):
                # it runs on an engine of its own over that base, one base copy per adapter, until
                # a restart deploys the base and its adapters share one engine
                engine = build_engine(
                    self.kind,
                    model_folder(expert.base.uri),
                    expert.base.name,
                    {**self.engine_args, "trust_remote_code": bool(expert.base.trust_remote_code)},
                )
                engine.load_adapter(target, path)
                self._models[mid] = engine
                return self._loaded(mid, target)
        raise EngineError(f"expert {expert.ref} ({expert.kind}) cannot run on the {self.base or 'models'} deployment")

    def _loaded(self, mid: str, target: str | None) -> _Loaded:
        loaded = _Loaded(self, mid, target)
        self._loads[mid] = loaded.token
        return loaded

    def _unload(self, mid: str, token: int) -> None:
        with self._use_lock:
            if self._in_use.get(mid):
                self._deferred[mid] = token
                return
        self._unload_now(mid, token)

    def _hold(self, mid: str) -> None:
        with self._use_lock:
            self._in_use[mid] = self._in_use.get(mid, 0) + 1

    def _release(self, mid: str) -> None:
        with self._use_lock:
            left = self._in_use[mid] - 1
            if left:
                self._in_use[mid] = left
                return
            del self._in_use[mid]
            token = self._deferred.pop(mid, None)
        if token is not None:
            self._unload_now(mid, token)

    def _unload_now(self, mid: str, token: int) -> None:
        with self._lock:
            if self._loads.get(mid) != token:
                return  # a newer load of the same id: not ours to drop
            del self._loads[mid]
            target = self._targets.pop(mid, None)
            if target is not None:
                self._drop(target)
            self._models.pop(mid, None)

    def _drop(self, target: str) -> None:
        engine = self.engine
        kind = engine.targets().get(target) if engine is not None else None
        if engine is not None and kind == "adapter":
            engine.unload_adapter(target)
        elif engine is not None and kind == "model":
            engine.unload_model(target)

    # -- requests ------------------------------------------------------------------------------

    @asynccontextmanager
    async def _resolved(self) -> AsyncIterator[tuple[Any, str | None]]:
        """(engine, target) of this request's model id, held loaded until the block ends."""
        mid = serve.get_multiplexed_model_id()
        if not mid:
            if self.engine is None:
                raise EngineError("the models deployment needs a model id")
            yield self.engine, None  # the base itself
            return
        loaded = await self.get_target(mid)  # type: ignore[attr-defined]  # added by engine_deployment
        self._hold(mid)  # no await since the load: an eviction cannot slip in between
        try:
            yield self._models.get(mid, self.engine), loaded.target
        finally:
            self._release(mid)

    async def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        async with self._resolved() as (engine, target):
            items = [replace(r, target=target) for r in requests]
            if engine is self.engine:
                return await self._batcher().submit(_Call(items))
            return await anyio.to_thread.run_sync(self._locked, engine.generate, items)

    async def generate_stream(self, request: GenerateRequest) -> AsyncIterator[str | GenerateResult]:
        """One request's text in pieces while the engine generates it, then its ``GenerateResult``
        (a Serve streaming call: ``handle.options(stream=True)``). On the replica's own engine it
        joins the next batch like any other call, so concurrent streams share engine batches. An
        engine that cannot stream (vllm here) yields the whole text once."""
        async with self._resolved() as (engine, target):
            loop = asyncio.get_running_loop()
            pieces: asyncio.Queue = asyncio.Queue()

            def emit(piece: str) -> None:  # called in the engine's thread
                loop.call_soon_threadsafe(pieces.put_nowait, piece)

            call = _Call([replace(request, target=target)], [emit])
            if engine is self.engine:
                work = asyncio.ensure_future(self._batcher().submit(call))
            else:
                work = asyncio.ensure_future(anyio.to_thread.run_sync(self._locked, call.run, engine))
            # the engine thread's last piece is queued before its return wakes ``work``
            work.add_done_callback(lambda _: pieces.put_nowait(_END))
            try:
                while (piece := await pieces.get()) is not _END:
                    yield piece
                [result] = work.result()  # the engine's error, if it failed
                yield result
            finally:
                work.cancel()  # a client gone mid-stream: its row still finishes with its batch

    def _batcher(self) -> PacedBatcher:
        if self._batches is None:
            # up to 64 calls per engine call; an idle engine waits 2 ms for a burst to gather
            self._batches = PacedBatcher(self._generate_together, max_calls=64, wait_s=0.002)
        return self._batches

    async def _generate_together(self, calls: list[_Call]) -> list[list[GenerateResult] | BaseException]:
        """Concurrent calls share one engine call: the engine groups their items by target and
        batches each group (rows keep their own sampling and stops), so 16 clients of one adapter
        cost about one batch of 16, not 16 batches of one. Streamed calls are rows like the rest."""
        streamed: set[int] = set()  # calls that have had text out: a rerun would send it again

        def emit_of(i: int, emit: Emit | None) -> Emit | None:
            if emit is None:
                return None

            def tracked(piece: str) -> None:
                streamed.add(i)
                emit(piece)

            return tracked

        together = _Call(
            [r for c in calls for r in c.requests], [emit_of(i, e) for i, c in enumerate(calls) for e in c.emits]
        )
        counts = self._batch_counts
        counts["batches"] += 1
        counts["calls"] += len(calls)
        counts["rows"] += len(together.requests)
        if len(counts["sizes"]) < _SIZES_KEPT:
            counts["sizes"].append(len(calls))
        began = time.perf_counter()
        try:
            results = await anyio.to_thread.run_sync(self._locked, together.run, self.engine)
        except EngineError as exc:
            if len(calls) == 1:
                raise
            # one call's expert went away (evicted, removed) mid-batch: the others must not fail
            # with it, so each call runs alone and only the broken one reports its error. (The
            # engine checks every target before it generates, so streams have rarely begun here.)
            return [exc if i in streamed else await self._generate_alone(call) for i, call in enumerate(calls)]
        finally:
            counts["busy_s"] += time.perf_counter() - began
        out, start = [], 0
        for call in calls:
            out.append(results[start : start + len(call.requests)])
            start += len(call.requests)
        return out

    async def _generate_alone(self, call: _Call) -> list[GenerateResult] | BaseException:
        try:
            return await anyio.to_thread.run_sync(self._locked, call.run, self.engine)
        except EngineError as exc:
            return exc  # handed to that caller alone, which raises it (generate)

    async def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        async with self._resolved() as (engine, target):
            items = [replace(r, target=target) for r in requests]
            return await anyio.to_thread.run_sync(self._locked, engine.score, items)

    def _locked(self, fn, items):
        with self._lock:
            return fn(items)

    def batch_stats(self, reset: bool = False) -> dict[str, Any]:
        """Batches run on the engine for ``generate`` since start (or the last reset), with the
        calls and rows they held: calls ÷ batches is how many concurrent requests shared one engine
        call (benchmarks read it); ``busy_s``: seconds spent generating them, which ÷ the wall time
        is how busy the engine was; ``sizes``: calls per batch of the first 64 batches, in order
        (closed-loop clients settle into cohorts that take turns: the sequence shows them).
        ``replica``: which replica answered, as each one counts its own batches."""
        out = {**self._batch_counts, "replica": serve.get_replica_context().replica_id.unique_id}
        if reset:
            self._batch_counts = _fresh_batch_counts()
        return out

    def loaded(self) -> list[str]:
        """Model ids this replica holds now (tests and operators look at it)."""
        with self._lock:
            return sorted([*self._targets, *self._models])

    def score_context(self) -> int | None:
        """Tokens one score request on this replica's base may hold (``VLLMEngine.score_context``,
        ``HFEngine.score_context``); None before its engine is built."""
        return None if self.engine is None else getattr(self.engine, "score_context", None)

    def engine_kind(self) -> str | None:
        """The kind of this replica's base engine (``hf``, ``vllm``); None before it is built."""
        return None if self.engine is None else self.engine.kind


# Deployments that only the gateway (and the strategies deployment) call: no per-call access log
# line. The gateway's replica logs each HTTP request; one more line per engine call (and per
# strategy call) told nothing new; it was ~3 % of the engine replica's samples under load (py-spy).
INTERNAL_LOGGING = {"enable_access_log": False}


def engine_deployment(name: str, *, max_loaded: int, replicas: int, num_cpus: float, num_gpus: float):
    """A Serve deployment of ``EngineServerBase`` whose multiplexer keeps ``max_loaded`` experts."""

    class EngineServer(EngineServerBase):
        @serve.multiplexed(max_num_models_per_replica=max_loaded)
        async def get_target(self, mid: str) -> _Loaded:
            return await self._load_target(mid)

    return serve.deployment(
        EngineServer,
        name=name,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        # a replica that dies is replaced by the controller; requests in flight are retried by
        # the caller (RemoteEngine / RayBackend)
        max_ongoing_requests=32,
        logging_config=INTERNAL_LOGGING,
        health_check_period_s=2,
        health_check_timeout_s=30,
    )
