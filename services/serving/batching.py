"""Batching concurrent calls at the pace of the work they share.

Ray Serve's ``serve.batch`` closes a batch ``batch_wait_timeout_s`` after its first call arrives,
whether or not the previous batch is done, and queues the closed batches behind one another
(``ray/serve/batching.py: _BatchQueue.wait_for_batch`` forms batches before the
``max_concurrent_batches`` semaphore is taken). Calls that reach a replica spread out in time —
through the HTTP proxy and the gateway, each request its own way — so end up in many small batches
queued back to back, and every batch pays the engine's (or the router's) fixed cost again.

``PacedBatcher`` closes a batch when the worker is free to run it: every call that arrived while
the previous batch ran goes into the next one (up to ``max_calls``). Only an idle worker waits
(``wait_s``) for company first, as serve.batch did, so a burst that arrives together still shares
one batch, and a lone request waits no longer than before.

One batcher belongs to one event loop (a replica's): create it on first use, from a request.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class PacedBatcher(Generic[T, R]):
    """``await submit(item)`` -> that item's result, computed by ``run(items)`` together with the items
    of the calls waiting beside it. ``run`` returns one outcome per item, in order: a result, or an
    exception for that caller alone; an exception ``run`` raises goes to every caller of the batch."""

    def __init__(
        self, run: Callable[[list[T]], Awaitable[list[R | BaseException]]], *, max_calls: int, wait_s: float
    ) -> None:
        self._run = run
        self.max_calls = max_calls
        self.wait_s = wait_s
        self._queue: list[tuple[T, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._queue.append((item, future))
        if self._worker is None or self._worker.done():
            # a context of its own: the worker serves many requests, not the one that woke it
            self._worker = loop.create_task(self._drain(), context=contextvars.Context())
        return await future

    async def _drain(self) -> None:
        if self.wait_s > 0:
            await asyncio.sleep(self.wait_s)  # the worker was idle: let a burst gather
        while self._queue:
            batch, self._queue = self._queue[: self.max_calls], self._queue[self.max_calls :]
            batch = [(item, future) for item, future in batch if not future.done()]  # callers gone
            if not batch:
                continue
            try:
                outcomes: list[Any] = await self._run([item for item, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every caller of this batch gets it
                outcomes = [exc] * len(batch)
            except BaseException:  # cancelled: the replica is going away, and so are its callers
                for _, future in batch:
                    future.cancel()
                raise
            for (_, future), outcome in zip(batch, outcomes):
                if future.done():
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
