"""Who is asking: bearer keys checked against the registry, scopes, per-key rate limits.

Keys are verified through ``Registry.verify_key`` on every request (one indexed lookup of the key's
sha256), so a revoked key stops working at once. Rate limits are a sliding one-minute window per
key: kept in this process's memory by default (``RateLimiter``; one gateway process), and on Ray in
one actor that every gateway replica shares (services/serving/rate_limits.py), so a key's limit
holds however many replicas answer it.

With ``require_keys=False`` (the embedded default on localhost) the ``Authorization`` header is
ignored altogether, as vLLM does without ``--api-key``: every request is an anonymous admin.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import anyio
from fastapi import Request

from registry.models import ApiKey
from registry.service import Registry
from services.gateway.protocol import APIError


@dataclass(frozen=True)
class Principal:
    name: str  # the key's name; "anonymous" when keys are not required
    scope: str  # admin | user
    allowed_models: tuple[str, ...] = ()  # empty: every model
    key_id: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.scope == "admin"

    def allows(self, model: str) -> bool:
        """Admins may use every model; a user key its allow-list (``name@version`` counts as ``name``)."""
        if self.is_admin or not self.allowed_models:
            return True
        return model in self.allowed_models or model.partition("@")[0] in self.allowed_models

    @classmethod
    def of(cls, key: ApiKey) -> Principal:
        return cls(name=key.name, scope=key.scope, allowed_models=tuple(key.allowed_models or ()), key_id=key.id)


ANONYMOUS = Principal(name="anonymous", scope="admin")


class Limiter(Protocol):
    def hit(self, key_id: int, limit: int) -> float | None: ...


class RateLimiter:
    """Sliding-window request counter per key: at most ``limit`` requests in any ``window_s``."""

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self._hits: dict[int, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, key_id: int, limit: int) -> float | None:
        """Count one request; returns None if allowed, else seconds until one would be."""
        now = self.clock()
        with self._lock:
            hits = self._hits.setdefault(key_id, deque())
            while hits and hits[0] <= now - self.window_s:
                hits.popleft()
            if len(hits) >= limit:
                return max(0.0, hits[0] + self.window_s - now)
            hits.append(now)
            return None


class Authenticator:
    def __init__(
        self, registry: Registry, require_keys: bool = True, window_s: float = 60.0, limiter: Limiter | None = None
    ) -> None:
        self.registry = registry
        self.require_keys = require_keys
        self.limiter = limiter if limiter is not None else RateLimiter(window_s)

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal behind an ``Authorization`` header, rate limit counted; raises ``APIError``."""
        if not self.require_keys:
            return ANONYMOUS
        token = _bearer(authorization)
        if token is None:
            raise APIError(
                401,
                "missing API key: send 'Authorization: Bearer <key>' (create one with `moerge keys create`)",
                type="authentication_error",
                code="missing_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        key = self.registry.verify_key(token)
        if key is None:
            raise APIError(
                401,
                "invalid or revoked API key",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if key.rpm_limit:
            wait = self.limiter.hit(key.id, key.rpm_limit)
            if wait is not None:
                raise APIError(
                    429,
                    f"rate limit of {key.rpm_limit} requests per minute reached for key {key.name!r}; "
                    f"retry in {math.ceil(wait)} s",
                    type="rate_limit_error",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )
        return Principal.of(key)

    # -- FastAPI dependencies --------------------------------------------------------------------
    # async, so that FastAPI does not hand every request to its thread pool: without keys there is
    # nothing to look up (a thread hop would cost more than the check, ~0.1-1 ms per request on a
    # busy 2-core machine); with keys the registry lookup still runs in a worker thread, off the
    # event loop, on every request (a revoked key stops working at once).

    async def user(self, request: Request) -> Principal:
        """Any valid key."""
        if not self.require_keys:
            principal = ANONYMOUS
        else:
            principal = await anyio.to_thread.run_sync(self.authenticate, request.headers.get("authorization"))
        request.state.principal = principal.name
        return principal

    async def admin(self, request: Request) -> Principal:
        """A key with the admin scope."""
        principal = await self.user(request)
        if not principal.is_admin:
            raise APIError(403, "this endpoint needs an admin key", type="permission_error", code="admin_required")
        return principal


# The dependencies the routers declare: module-level, over the ``Authenticator`` that ``create_app``
# keeps on ``app.state.auth``, so handlers need no app factory's closure to find it.


async def require_user(request: Request) -> Principal:
    """Any valid key (``Authenticator.user`` of the request's app)."""
    return await request.app.state.auth.user(request)


async def require_admin(request: Request) -> Principal:
    """A key with the admin scope (``Authenticator.admin`` of the request's app)."""
    return await request.app.state.auth.admin(request)


def check_model_allowed(principal: Principal, model: str) -> None:
    if not principal.allows(model):
        raise APIError(
            403,
            f"this API key may not use model {model!r}",
            type="permission_error",
            code="model_not_allowed",
            param="model",
        )


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
