"""What the gateway asks of whatever serves the models, and the in-process implementation.

``Backend`` is the seam between the HTTP layer and the serving layer: the app calls only these
five methods. ``LocalBackend`` runs everything in this process (hf engines on CPU or GPU, the
registry on its database); a Ray Serve backend keeps the same methods and calls deployments.

``LocalBackend`` serves

- every registered expert by name (``name`` = its latest version, ``name@version`` a given one):
  an adapter on the ``HFEngine`` of its base (one engine per base, adapters loaded on demand and
  kept), a full model on an engine of its own, an external expert through litellm;
- strategies ``moe/<name>``: callables ``(prompt, params) -> Completion`` that the caller injects
  (``strategies=`` or ``add_strategy``); they may call ``run_expert`` to reach the engines.

An engine is single-threaded: each one has a lock, and every call on it (load, generate, unload)
runs in a worker thread while holding it, so the event loop never blocks on torch. Requests that
wait for the same engine share its next ``generate`` call (``_enqueue`` / ``_wait``): 16 clients of
one base cost about one batch of 16, not 16 batches of one, as on Ray. The registry is
read on every request (one indexed query), so an expert registered by anyone — this gateway, the
CLI, another replica — is servable on the next request without a restart.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import threading
from collections import ChainMap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast, runtime_checkable

import anyio

from composer.base import Completion, ExpertOutput, Provenance, output_of
from composer.engine_protocol import EngineError, GenerateRequest, generate_emitting
from registry.errors import MoergeError, NotFoundError, RegistrationError
from registry.hub import model_folder
from registry.models import Expert
from registry.service import Registry
from services.engines.external import ExternalEngine, external_engine_for
from services.gateway.protocol import ExpertCard

STRATEGY_PREFIX = "moe/"


@dataclass(frozen=True)
class SamplingParams:
    """How to answer a request: the sampling parameters, and for a chat the conversation itself
    (``messages``), which every engine call the request makes renders with its target's template.
    The ``prompt`` handed beside these is what routers read: a chat's last user turn."""

    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    messages: tuple[tuple[str, str], ...] = ()  # (role, content); () for a completion prompt
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def generation(self) -> dict:
        """The keyword arguments of ``GenerateRequest`` (and ``MoE.run``) these parameters set."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["max_new_tokens"] = d.pop("max_tokens")
        return d

    def request(self, prompt: str, target: str | None = None) -> GenerateRequest:
        return GenerateRequest(prompt=prompt, target=target, **self.generation())


@dataclass(frozen=True)
class ModelInfo:
    id: str  # what the API's ``model`` field takes
    kind: str  # adapter | model | external | base | strategy
    version: str | None = None
    created: int = 0  # unix seconds


Strategy = Callable[[str, SamplingParams], Completion]


@runtime_checkable
class Backend(Protocol):
    def models(self) -> list[ModelInfo]: ...

    async def complete(self, model: str, prompt: str, params: SamplingParams) -> Completion: ...

    def stream(self, model: str, prompt: str, params: SamplingParams) -> AsyncIterator[str | Completion]:
        """Text deltas, then the final ``Completion`` (whose text is the deltas joined)."""
        ...

    async def register_expert(self, spec: dict) -> dict: ...

    async def remove_expert(self, name: str, version: str | None = None) -> list[dict]: ...


class ExpertRef(Protocol):
    """What a direct completion records of its expert: a registry ``Expert``, or a lookup row."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def kind(self) -> str: ...


def direct_completion(expert: ExpertRef, output: ExpertOutput) -> Completion:
    """One expert's answer as a completion (no router, no composer)."""
    return Completion(
        text=output.text,
        finish_reason=output.finish_reason,
        provenance=Provenance(
            composer="direct",
            router=None,
            experts=[(expert.name, 1.0)],
            outputs=[output],
            info={"version": expert.version, "kind": expert.kind},
        ),
    )


def base_completion(base: str, output: ExpertOutput) -> Completion:
    """A base model's own answer as a completion (no adapter, no router)."""
    return Completion(
        text=output.text,
        finish_reason=output.finish_reason,
        provenance=Provenance(
            composer="direct", router=None, experts=[(base, 1.0)], outputs=[output], info={"kind": "base"}
        ),
    )


T = TypeVar("T")


async def stream_from_thread(work: Callable[[Callable[[str], None]], T]) -> AsyncIterator[str | T]:
    """Run ``work(emit)`` in a worker thread; yield each piece it emits as it emits it, then its
    return value. A consumer that stops early leaves the thread to finish (as a timed-out
    ``complete`` does: the engine's lock is released when the generation ends)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    def emit(piece: str) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, piece)

    def run() -> T:
        try:
            return work(emit)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, done)

    future = loop.run_in_executor(None, run)
    while (piece := await queue.get()) is not done:
        yield piece
    yield await future


HF_ENGINE_ARGS = ("device", "dtype", "adapter_mode", "max_batch_size")


def hf_engine_args(engine_args: dict) -> dict:
    """The engine_args the in-process hf engine takes (the others are vLLM's, for Ray)."""
    return {k: v for k, v in engine_args.items() if k in HF_ENGINE_ARGS}


def check_servable(spec: dict, engine_for_base: Callable[[str], tuple[str, dict[str, Any]]]) -> None:
    """Refuse (``RegistrationError``) an adapter registration that the engine serving its base
    cannot serve, naming what refuses; before the registry writes anything."""
    from services.engines.compat import refusal

    base, source = spec.get("base"), spec.get("source")
    if spec.get("kind", "adapter") != "adapter" or not base or not source:
        return
    engine, args = engine_for_base(str(base))
    why = refusal(engine, args, Path(str(source)).expanduser())
    if why is not None:
        raise RegistrationError(
            f"expert {spec.get('name')!r} cannot be served on base {base!r}: "
            f"the {engine} engine configured for it refuses it: {why}"
        )


def is_strategy(model: str) -> bool:
    return model.startswith(STRATEGY_PREFIX)


def split_ref(model: str) -> tuple[str, str | None]:
    """``name@version`` -> (name, version); a bare name -> (name, None)."""
    name, sep, version = model.partition("@")
    return name, (version if sep else None)


# ------------------------------------------------------------------------------------- local backend


# the most requests one engine call takes from those waiting (the Ray engine deployment's too)
MAX_BATCH = 64


@dataclass
class _Waiting:
    """A request waiting for its slot's engine, and what became of it. ``prepare`` runs with the
    engine's lock held, by whichever thread runs the batch: it loads what the request needs (the
    engine, the adapter) and returns the request."""

    prepare: Callable[[], GenerateRequest]
    emit: Callable[[str], None] | None
    request: GenerateRequest | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    emitted: bool = False  # text went out: never run it again


@dataclass
class _Slot:
    """One engine and its lock. ``engine`` is None until the first request that needs it."""

    key: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    engine: Any = None
    targets: dict[int, str] = field(default_factory=dict)  # expert id -> engine target name
    waiting: list[_Waiting] = field(default_factory=list)  # requests for the engine's next call
    waiting_lock: threading.Lock = field(default_factory=threading.Lock)


# Requests that wait for one engine share its next generate call. A request is queued in
# ``slot.waiting`` (``_enqueue``); whichever thread gets the engine's lock prepares every waiting
# request and runs them in one ``generate`` call (the engine batches them by adapter, each row with
# its own sampling and stops), so the threads that waited meanwhile find theirs done (``_wait``).
# No thread of its own and no added wait: a lone request runs at once.


def _enqueue(slot: _Slot, prepare: Callable[[], GenerateRequest], emit: Callable[[str], None] | None) -> _Waiting:
    mine = _Waiting(prepare, emit)
    with slot.waiting_lock:
        slot.waiting.append(mine)
    return mine


def _wait(slot: _Slot, mine: _Waiting) -> Any:
    """``mine``'s result: run the waiting requests (``mine`` among them) if no one else is."""
    while not mine.done.is_set():
        with slot.lock:
            if mine.done.is_set():
                break
            with slot.waiting_lock:
                batch, slot.waiting = slot.waiting[:MAX_BATCH], slot.waiting[MAX_BATCH:]
            _run_waiting(slot, batch)
    if mine.error is not None:
        raise mine.error
    return mine.result


def _run_waiting(slot: _Slot, batch: list[_Waiting]) -> None:
    """One engine call for ``batch`` (the slot's lock held). A request that cannot be prepared
    (its files are gone, say) fails alone; should the call fail, each request that has not
    streamed text yet runs alone, so only the one at fault gets the error."""
    ready = []
    try:
        for w in batch:
            try:
                w.request = w.prepare()
                ready.append(w)
            except Exception as exc:  # noqa: BLE001 - that caller's error
                w.error = exc
        if not ready:
            return
        try:
            for w, result in zip(ready, _generate(slot.engine, ready), strict=True):
                w.result = result
        except Exception as exc:  # noqa: BLE001 - handed to the callers, as their own call would raise it
            if len(ready) == 1:
                ready[0].error = exc
                return
            for w in ready:
                if w.emitted:
                    w.error = exc
                    continue
                try:
                    [w.result] = _generate(slot.engine, [w])
                except Exception as alone:  # noqa: BLE001
                    w.error = alone
    finally:
        for w in batch:
            w.done.set()


def _generate(engine: Any, batch: list[_Waiting]) -> list[Any]:
    """``engine.generate`` of the batch's requests, each streamed one's text to its emit (and the
    request marked as having streamed)."""

    def emit_of(w: _Waiting) -> Callable[[str], None] | None:
        sink = w.emit
        if sink is None:
            return None

        def emit(piece: str) -> None:
            w.emitted = True
            sink(piece)

        return emit

    requests = [w.request for w in batch if w.request is not None]  # each prepared before the batch runs
    assert len(requests) == len(batch)
    return generate_emitting(engine, requests, [emit_of(w) for w in batch])


class LiveStrategies(Mapping):
    """Strategy callables by name over a list of names that may change while serving
    (``LocalBackend.add_strategies``): a strategy a user adds to the registry is served without a
    restart. ``call_of(name)`` makes a name's callable, once."""

    def __init__(self, names: Callable[[], list[str]], call_of: Callable[[str], Strategy]) -> None:
        self._names, self._call_of = names, call_of
        self._calls: dict[str, Strategy] = {}

    def __getitem__(self, name: str) -> Strategy:
        if name not in self._names():
            raise KeyError(name)
        if name not in self._calls:
            self._calls[name] = self._call_of(name)
        return self._calls[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


class LocalBackend:
    """In-process backend over the registry and one ``HFEngine`` per base (see the module doc)."""

    def __init__(
        self,
        registry: Registry,
        strategies: Mapping[str, Strategy] | None = None,
        *,
        engine_factory: Callable[..., Any] | None = None,
        engine_kwargs: dict[str, Any] | None = None,
        engine_for_base: Callable[[str], tuple[str, dict[str, Any]]] | None = None,
    ) -> None:
        """``engine_for_base``: base name -> (engine kind, engine args) it is served with, where
        that is not this process's hf engine (the Ray backend's serve config): a registration
        the engine could not serve is refused up front (``services.engines.compat``)."""
        self.registry = registry
        self._engine_for_base = engine_for_base
        # strategies added one by one, then any live view handed over (``add_strategies``)
        self._strategies: ChainMap[str, Strategy] = ChainMap({})
        for name, fn in (strategies or {}).items():
            self.add_strategy(name, fn)
        self._engine_factory = engine_factory
        self._engine_kwargs = dict(engine_kwargs or {})
        self._slots: dict[str, _Slot] = {}
        self._slots_lock = threading.Lock()

    # -- strategies ------------------------------------------------------------------------------

    def add_strategy(self, name: str, fn: Strategy) -> str:
        """Serve ``fn`` as ``moe/<name>`` (``name`` may already carry the prefix); returns the id."""
        model = name if is_strategy(name) else STRATEGY_PREFIX + name
        self._strategies.maps[0][model] = fn
        return model

    def add_strategies(self, strategies: Mapping[str, Strategy]) -> None:
        """Serve every strategy of ``strategies``, a live mapping ``moe/<name>`` -> callable whose
        keys may change while serving (strategies users add to the registry)."""
        # only maps[0] is ever written (add_strategy), so a read-only mapping is safe here
        self._strategies.maps.append(cast(MutableMapping[str, Strategy], strategies))

    # -- Backend ---------------------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        latest: dict[str, Expert] = {}
        for e in self.registry.list_experts(status="ready"):  # ordered by name, then id
            latest[e.name] = e
        out = [
            ModelInfo(id=e.name, kind=e.kind, version=e.version, created=int(e.created_at.timestamp()))
            for e in latest.values()
        ]
        out += [
            ModelInfo(id=b.name, kind="base", created=int(b.created_at.timestamp()))
            for b in self.registry.list_bases()
            if b.name not in latest
        ]
        out += [ModelInfo(id=name, kind="strategy") for name in sorted(set(self._strategies))]
        return out

    async def complete(self, model: str, prompt: str, params: SamplingParams) -> Completion:
        if is_strategy(model):
            fn = self._strategies.get(model)
            if fn is None:
                raise NotFoundError(f"no strategy {model!r} (known: {', '.join(sorted(self._strategies)) or 'none'})")
            if inspect.iscoroutinefunction(fn):
                return await fn(prompt, params)
            return await anyio.to_thread.run_sync(fn, prompt, params, abandon_on_cancel=True)
        # abandon_on_cancel: a timed-out request returns at once; its thread finishes the engine
        # call in the background and then releases the engine's lock
        done = await anyio.to_thread.run_sync(self._run_or_defer, model, prompt, params, abandon_on_cancel=True)
        return done if isinstance(done, Completion) else await done()

    async def stream(self, model: str, prompt: str, params: SamplingParams) -> AsyncIterator[str | Completion]:
        """An expert on an engine that streams (hf): its text as it is generated. Strategies vote,
        stitch or route whole answers, and external experts answer at once, so theirs is streamed
        once it exists, in words (with their trailing space). Then the record."""
        if is_strategy(model):
            async for item in self.stream_whole(model, prompt, params):
                yield item
            return
        streamed = False
        async for item in stream_from_thread(lambda emit: self.run_expert(model, prompt, params, emit)):
            if isinstance(item, Completion):
                completion = item
            else:
                streamed = True
                yield item
        if not streamed:  # an engine that answers at once (external)
            for piece in _WORDS.findall(completion.text):
                yield piece
        yield completion

    async def stream_whole(self, model: str, prompt: str, params: SamplingParams) -> AsyncIterator[str | Completion]:
        """``complete``, then its text in words (with their trailing space), then the record."""
        completion = await self.complete(model, prompt, params)
        for piece in _WORDS.findall(completion.text):
            yield piece
        yield completion

    async def register_expert(self, spec: dict) -> dict:
        if self._engine_for_base is not None:
            check_servable(spec, self._engine_for_base)

        def register() -> tuple[Expert, list[str]]:
            import warnings

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")  # every registration's, not only a process's first
                expert = self.registry.register_expert(**spec)
            return expert, [str(w.message) for w in caught if type(w.message).__name__ == "RegistrationWarning"]

        expert, said = await anyio.to_thread.run_sync(register)
        # nothing to warm: the next request for it loads it (see run_expert)
        return {**ExpertCard.from_record(expert).model_dump(mode="json"), **({"warnings": said} if said else {})}

    async def remove_expert(self, name: str, version: str | None = None) -> list[dict]:
        removed = await anyio.to_thread.run_sync(self.registry.remove_expert, name, version)
        await anyio.to_thread.run_sync(self._unload, [e.id for e in removed])
        return [ExpertCard.from_record(e).model_dump(mode="json") for e in removed]

    # -- experts (blocking; called in a worker thread, or by a strategy) ------------------------

    def _run_or_defer(
        self, model: str, prompt: str, params: SamplingParams
    ) -> Completion | Callable[[], Awaitable[Completion]]:
        """``run_expert``, except for an external expert: its call only waits on the network, so it
        is handed back to be awaited on the event loop instead of holding this thread."""
        name, version = split_ref(model)
        try:
            expert = self.registry.get_expert(name, version)
        except NotFoundError:
            if version is not None:
                raise
            return self._run_base(name, prompt, params)  # a base by its name, or 404; one lookup
        if expert.kind != "external" or expert.status != "ready":
            return self.run_expert(model, prompt, params, expert=expert)
        engine, request = self._external_call(expert, prompt, params)

        async def call() -> Completion:
            result = await engine.agenerate(request)
            return direct_completion(expert, output_of(expert.name, result, weight=1.0))

        return call

    def run_expert(
        self,
        model: str,
        prompt: str,
        params: SamplingParams,
        emit: Callable[[str], None] | None = None,
        expert: Expert | None = None,
    ) -> Completion:
        """One expert answers alone. Blocking: call it from a thread (strategies run in one).
        ``emit``: handed the text in pieces while it is generated, where the engine can.
        ``expert``: its record, where the caller has already looked it up."""
        name, version = split_ref(model)
        if expert is None:
            try:
                expert = self.registry.get_expert(name, version)
            except NotFoundError:
                if version is not None:
                    raise
                return self._run_base(name, prompt, params, emit)  # a base by its name, or 404
        if expert.status != "ready":
            raise EngineError(f"expert {expert.ref} is {expert.status}, not ready to serve")
        if expert.kind == "external":
            output = self._run_external(expert, prompt, params)
        else:
            slot = self._slot_for(expert)

            def prepare() -> GenerateRequest:  # the engine's lock held
                self._load(slot, expert)
                return params.request(prompt, slot.targets[expert.id] if expert.kind == "adapter" else None)

            # with whatever other requests wait for this engine
            result = _wait(slot, _enqueue(slot, prepare, emit))
            output = output_of(expert.name, result, weight=1.0)
        return direct_completion(expert, output)

    def _run_base(
        self, name: str, prompt: str, params: SamplingParams, emit: Callable[[str], None] | None = None
    ) -> Completion:
        """A registered base model answering itself (``model`` is its name): on the engine its
        adapters share."""
        try:
            base = self.registry.get_base(name)
        except NotFoundError:
            raise NotFoundError(f"no expert, base model or strategy named {name!r}") from None
        slot = self._base_slot(base)

        def prepare() -> GenerateRequest:
            self._load_base(slot, base)
            return params.request(prompt, None)

        result = _wait(slot, _enqueue(slot, prepare, emit))
        return base_completion(base.name, output_of(base.name, result, weight=1.0))

    def generate_on(self, base: Any, items: Sequence[tuple[Expert | None, GenerateRequest]]) -> list[Any]:
        """Each request on its expert's engine (None: on ``base``, a registered base model itself),
        waiting with every other request for those engines: all are queued before the first is
        run, so one call's requests share batches too. Blocking. Used by ``PoolEngine``."""
        waits = []
        for expert, request in items:
            if expert is None:
                slot = self._base_slot(base)
                prepare = self._base_request(slot, base, request)
            else:
                slot = self._slot_for(expert)
                prepare = self._expert_request(slot, expert, request)
            waits.append((slot, _enqueue(slot, prepare, None)))
        outcomes = []
        for slot, w in waits:  # every one waited for, so none is left queued when one fails
            try:
                outcomes.append(_wait(slot, w))
            except Exception as exc:  # noqa: BLE001 - raised below, after the rest are done
                outcomes.append(exc)
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome
        return outcomes

    def _base_request(self, slot: _Slot, base: Any, request: GenerateRequest) -> Callable[[], GenerateRequest]:
        """``prepare`` for a request on ``base`` itself: loads the base, targets it."""

        def prepare() -> GenerateRequest:
            self._load_base(slot, base)
            return replace(request, target=None)

        return prepare

    def _expert_request(self, slot: _Slot, expert: Expert, request: GenerateRequest) -> Callable[[], GenerateRequest]:
        """``prepare`` for a request on ``expert``: loads it, targets its adapter (or its model)."""

        def prepare() -> GenerateRequest:
            self._load(slot, expert)
            return replace(request, target=slot.targets[expert.id] if expert.kind == "adapter" else None)

        return prepare

    def score_on(self, base: Any, items: Sequence[tuple[Expert | None, Any]]) -> list[Any]:
        """``generate_on`` for ``ScoreRequest``s (each under its engine's lock, not batched)."""
        out = []
        for expert, request in items:
            slot = self._base_slot(base) if expert is None else self._slot_for(expert)
            with slot.lock:
                if expert is None:
                    self._load_base(slot, base)
                    target = None
                else:
                    self._load(slot, expert)
                    target = slot.targets[expert.id] if expert.kind == "adapter" else None
                [result] = slot.engine.score([replace(request, target=target)])
            out.append(result)
        return out

    def score_context_of(self, base: Any) -> int | None:
        """Tokens one score request on ``base``'s engine may hold (the engine loaded if need be)."""
        slot = self._base_slot(base)
        with slot.lock:
            self._load_base(slot, base)
            return getattr(slot.engine, "score_context", None)

    def _base_slot(self, base: Any) -> _Slot:
        return self._slot(f"base:{base.name}")

    def _load_base(self, slot: _Slot, base: Any) -> None:
        if slot.engine is None:
            slot.engine = self._new_engine(
                model_folder(base.uri),
                base_name=base.name,
                trust_remote_code=bool(getattr(base, "trust_remote_code", False)),
            )

    def _slot_for(self, expert: Expert) -> _Slot:
        if expert.kind == "adapter":
            if expert.base is None:
                raise EngineError(f"adapter {expert.ref} has no base model recorded")
            key = f"base:{expert.base.name}"
        else:
            key = f"model:{expert.id}"
        return self._slot(key)

    def _slot(self, key: str) -> _Slot:
        with self._slots_lock:
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = _Slot(key)
        return slot

    def _load(self, slot: _Slot, expert: Expert) -> None:
        """Make ``expert`` runnable on ``slot`` (its lock held): the engine first, then the adapter."""
        if slot.engine is None:
            if expert.kind == "adapter":
                assert expert.base is not None
                slot.engine = self._new_engine(
                    model_folder(expert.base.uri),
                    base_name=expert.base.name,
                    trust_remote_code=bool(expert.base.trust_remote_code),
                )
            else:
                slot.engine = self._new_engine(self._path(expert), base_name=f"expert{expert.id}")
                slot.targets[expert.id] = slot.engine.base_name
        if expert.kind == "adapter" and expert.id not in slot.targets:
            # the row id, not the name: unique across versions, and safe as a peft adapter name
            target = f"expert{expert.id}"
            slot.engine.load_adapter(target, self._path(expert))
            slot.targets[expert.id] = target

    def _new_engine(self, path: Path, base_name: str, trust_remote_code: bool = False) -> Any:
        factory = self._engine_factory
        if factory is None:
            from services.engines.hf import HFEngine  # torch loads only when an engine is needed

            factory = HFEngine
        try:
            per_base = self._engine_for_base(base_name)[1] if self._engine_for_base is not None else {}
            if self._engine_factory is None:  # the hf engine takes its own arguments only
                per_base = hf_engine_args(per_base)
            kwargs = {**self._engine_kwargs, **per_base, **({"trust_remote_code": True} if trust_remote_code else {})}
            return factory(path, base_name=base_name, **kwargs)
        except MoergeError:
            raise
        except (OSError, ValueError, RuntimeError) as exc:
            raise EngineError(f"cannot load {path}: {exc}") from exc

    def _path(self, expert: Expert) -> Path:
        path = self.registry.expert_path(expert)
        if path is None or not path.exists():
            raise EngineError(f"expert {expert.ref}: its files are missing from the artifact store ({path})")
        return path

    def _unload(self, expert_ids: list[int]) -> None:
        with self._slots_lock:
            slots = list(self._slots.values())
        for slot in slots:
            with slot.lock:
                for eid in expert_ids:
                    target = slot.targets.pop(eid, None)
                    if target is None or slot.engine is None:
                        continue
                    if slot.key.startswith("model:"):
                        slot.engine = None  # the engine was the model: drop it with the slot
                        with self._slots_lock:
                            self._slots.pop(slot.key, None)
                    else:
                        slot.engine.unload_adapter(target)

    def _external_call(
        self, expert: Expert, prompt: str, params: SamplingParams
    ) -> tuple[ExternalEngine, GenerateRequest]:
        # litellm loads only when an external expert is asked for (ExternalEngine imports it);
        # the engine holds only the target -> model string map, so one per call costs nothing
        engine = external_engine_for(expert)
        target = f"expert{expert.id}"  # the row id, as for adapters: never clashes with the base's name
        engine.load_model(target, expert.uri)
        return engine, params.request(prompt, target)

    def _run_external(self, expert: Expert, prompt: str, params: SamplingParams) -> ExpertOutput:
        engine, request = self._external_call(expert, prompt, params)
        [result] = engine.generate([request])
        return output_of(expert.name, result, weight=1.0)


class PoolEngine:
    """The Engine protocol over a ``LocalBackend``'s engines, for one ``ExpertPool`` (a strategy
    host's, in ``moerge serve --no-ray``): a target is an expert's name, or the base's, as on the
    pool's own engine. Strategies' generations then wait for the same engines as the gateway's
    direct requests and share their batches, on one copy of each base instead of two. Mixtures and
    merges still build engines of their own (``ExpertPool.mixture_engine``, ``local_engine``)."""

    kind = "local"

    def __init__(self, pool: Any, backend: LocalBackend) -> None:
        self.pool = pool
        self.base_name = pool.base.name
        self.backend = backend

    def targets(self) -> dict[str, str]:
        return {self.base_name: "base", **{name: info.kind for name, info in self.pool.experts.items()}}

    def _expert(self, target: str | None) -> Expert | None:
        if target is None or target == self.base_name:
            return None
        record = self.pool.records.get(target)
        if record is None:
            raise EngineError(f"{target!r} is not an expert on base {self.base_name!r}")
        return record

    def generate(self, requests: Sequence[GenerateRequest]) -> list[Any]:
        return self.backend.generate_on(self.pool.base, [(self._expert(r.target), r) for r in requests])

    def score(self, requests: Sequence[Any]) -> list[Any]:
        return self.backend.score_on(self.pool.base, [(self._expert(r.target), r) for r in requests])

    @property
    def score_context(self) -> int | None:
        """What the backend's engine of the base scores in one request (``ExpertPool.context``)."""
        return self.backend.score_context_of(self.pool.base)

    def load_adapter(self, name: str, path: str) -> None:
        raise EngineError("the server's engines load experts on demand; register the expert instead")

    unload_adapter = load_model = unload_model = load_adapter


_WORDS = re.compile(r"\s*\S+\s*|\s+")
