"""Per-key rate limits that hold across gateway replicas.

Each gateway replica answers its own share of the requests (HAProxy spreads them), so a limiter
kept in one replica's memory would let a key through ``limit`` times per replica. On Ray the
windows live in one small actor instead, ``moerge-rate-limits``, which every gateway replica asks
once per request of a key that has a limit. It is detached, so it outlives the replica that
happened to create it (a replica restart or a scale-down keeps the counts), and it goes when the
Ray cluster does.

Should the actor be unreachable (it died and is being made again, Ray is shutting down), the
replica counts in its own memory for that request and says so in its log: a limit then holds per
replica, as it would without the actor, rather than failing every keyed request.
"""

from __future__ import annotations

import logging

import ray

from services.gateway.auth import RateLimiter

log = logging.getLogger(__name__)

ACTOR_NAME = "moerge-rate-limits"


@ray.remote(num_cpus=0, max_restarts=-1)
class RateLimitWindows:
    """The sliding windows of every key, for all gateway replicas (``RateLimiter`` inside)."""

    def __init__(self, window_s: float) -> None:
        self.limiter = RateLimiter(window_s)

    def hit(self, key_id: int, limit: int) -> float | None:
        return self.limiter.hit(key_id, limit)


class SharedRateLimiter:
    """A ``RateLimiter`` whose counts are the ``RateLimitWindows`` actor's (blocking: the gateway
    calls it from the worker thread that checks the key)."""

    def __init__(self, window_s: float = 60.0, namespace: str = "serve") -> None:
        self.window_s = window_s
        self.namespace = namespace
        self.local = RateLimiter(window_s)  # when the actor cannot be reached
        self._actor = None

    def _windows(self):  # noqa: ANN202
        if self._actor is None:
            # every replica names the same actor: the first creates it, the others get it
            self._actor = RateLimitWindows.options(
                name=ACTOR_NAME, namespace=self.namespace, lifetime="detached", get_if_exists=True
            ).remote(self.window_s)
        return self._actor

    def hit(self, key_id: int, limit: int) -> float | None:
        try:
            return ray.get(self._windows().hit.remote(key_id, limit), timeout=10)
        except Exception as exc:  # noqa: BLE001 - any failure to reach it: count here instead
            self._actor = None  # ask Ray for it again next time
            log.warning("rate limits: the shared windows are unreachable (%s); counting in this replica", exc)
            return self.local.hit(key_id, limit)
