"""Calling the engine deployments: retries across replica failures, and the ``RemoteEngine`` that
lets composers (which speak the Engine protocol) run on Ray Serve handles.

A replica can die mid-request (node loss, OOM, a kill). Serve's controller replaces it; until then
a call to it fails with an actor error. Such calls are retried with back-off — Serve routes the
retry to a live replica — so a client sees a slower answer, not an error. Errors raised by the
engine code itself (an unknown expert, a bad request) are not retried: they come back as the
moerge error they are.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    RayActorError,
    RayTaskError,
)
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)

from composer.engine_protocol import (
    EngineError,
    GenerateRequest,
    GenerateResult,
    ScoreRequest,
    ScoreResult,
)

# what a dead / restarting replica looks like to a caller; all of it is worth another try
TRANSIENT = (
    RayActorError,
    ActorDiedError,
    ActorUnavailableError,
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
RETRY_DELAYS_S = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0)  # ~16 s in all: long enough for Serve to replace a replica


def unwrap(exc: BaseException) -> BaseException:
    """The moerge error a replica raised, out of Ray's task-error wrapper."""
    if isinstance(exc, RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            return cause
    return exc


def call_with_retry(submit: Callable[[], Any], first: Any = None) -> Any:
    """``submit()`` returns a DeploymentResponse; block for its result, retrying transient failures.
    ``first``: a response already submitted (calls to several deployments go out together)."""
    for delay in (*RETRY_DELAYS_S, None):
        try:
            response, first = (first if first is not None else submit()), None
            return response.result()
        except TRANSIENT:
            if delay is None:
                raise
            time.sleep(delay)
        except RayTaskError as exc:
            raise unwrap(exc) from None


async def acall_with_retry(submit: Callable[[], Any]) -> Any:
    for delay in (*RETRY_DELAYS_S, None):
        try:
            return await submit()
        except TRANSIENT:
            if delay is None:
                raise
            await asyncio.sleep(delay)
        except RayTaskError as exc:
            raise unwrap(exc) from None


class Targets:
    """Where each expert of a pool runs: (deployment handle, multiplexed model id)."""

    def __init__(self, engines: dict[str, Any], models: Any) -> None:
        self.engines = engines  # base name -> handle of its engine deployment
        self.models = models  # handle of the deployment for full models without a deployed base

    def for_expert(self, expert) -> tuple[Any, str]:
        from services.serving.engine_server import model_id

        mid = model_id(expert.name, expert.version, expert.id, expert.checksum)
        base = expert.base.name if expert.base is not None else None
        if base in self.engines:
            return self.engines[base], mid
        if expert.kind in ("model", "adapter"):
            # a full model, or an adapter whose base was registered after start-up: the models
            # deployment runs it on an engine of its own (a restart gives the base a deployment)
            return self.models, mid
        raise EngineError(f"expert {expert.ref} ({expert.kind}) has no engine deployment on this server")

    def for_base(self, base: str) -> Any:
        if base not in self.engines:
            raise EngineError(f"base {base!r} has no engine deployment on this server")
        return self.engines[base]


class RemoteEngine:
    """The Engine protocol over Ray Serve handles, for one ``ExpertPool``: a target is an expert's
    name (or the base's), as on an in-process engine. Requests are grouped by target and the groups
    sent at once, so experts on different replicas answer in parallel."""

    kind = "remote"

    def __init__(self, pool, targets: Targets) -> None:
        self.pool = pool
        self.base_name = pool.base.name
        self._targets = targets

    def targets(self) -> dict[str, str]:
        return {self.base_name: "base", **{name: info.kind for name, info in self.pool.experts.items()}}

    def _route(self, target: str | None) -> tuple[Any, str | None]:
        if target is None or target == self.base_name:
            return self._targets.for_base(self.base_name), None
        record = self.pool.records.get(target)
        if record is None:
            raise EngineError(f"{target!r} is not an expert on base {self.base_name!r}")
        return self._targets.for_expert(record)

    def _call(self, method: str, requests: Sequence[Any]) -> list[Any]:
        groups: dict[str | None, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.target, []).append(i)
        pending = []
        for target, idx in groups.items():
            handle, mid = self._route(target)
            if mid is not None:
                handle = handle.options(multiplexed_model_id=mid)
            batch = [requests[i] for i in idx]
            bound = getattr(handle, method)
            pending.append((idx, batch, bound, bound.remote(batch)))
        out: list[Any] = [None] * len(requests)
        for idx, batch, bound, first in pending:
            results = call_with_retry(lambda: bound.remote(batch), first)  # noqa: B023 - used at once
            for i, result in zip(idx, results):
                out[i] = result
        return out

    @property
    def score_context(self) -> int | None:
        """What the base's engine deployment scores in one request (``ExpertPool.context``)."""
        return self._targets.for_base(self.base_name).score_context.remote().result()

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        return self._call("generate", requests)

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        return self._call("score", requests)

    def load_adapter(self, name: str, path: str) -> None:
        raise EngineError("a remote engine loads experts on demand; register the expert instead")

    def unload_adapter(self, name: str) -> None:
        raise EngineError("a remote engine unloads experts itself (LRU); remove the expert instead")

    load_model = load_adapter
    unload_model = unload_adapter
