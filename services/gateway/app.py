"""The OpenAI-compatible gateway: a FastAPI app over a ``Backend`` and the registry.

``create_app(backend, registry, settings)`` builds it; the endpoints, the prompt rule for chat
messages, the headers and every error are documented in docs/api.md. The app does HTTP only —
auth, schema, limits, errors, streaming, metrics — and leaves serving to the backend, so the same
app runs in-process over ``LocalBackend`` or inside a Ray Serve ingress over Ray handles.

As in vLLM's api_server, the handlers are module-level functions on routers, one module each
(completions_api, experts_api, operations_api, strategies_api; errors for the exception
handlers), and read what they serve from ``request.app.state``: the factory only builds that
state and includes the routers, so several apps in one process never share it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from registry.service import Registry
from services.engines.openai_compat import OpenAICompatibleClient
from services.gateway.auth import Authenticator, Limiter
from services.gateway.backend import Backend
from services.gateway.completions_api import router as completions_router
from services.gateway.errors import EXCEPTION_HANDLERS
from services.gateway.experts_api import router as experts_router
from services.gateway.metrics import GatewayMetrics, MetricsMiddleware
from services.gateway.operations_api import router as operations_router
from services.gateway.settings import GatewaySettings
from services.gateway.strategies_api import router as strategies_router
from services.leaderboard.web import leaderboard_router
from services.moe.catalog import StrategyCatalog

__all__ = ["GatewaySettings", "create_app"]

log = logging.getLogger("moerge.gateway")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if not app.state.settings.require_keys:
        log.warning(
            "API keys are not required (require_keys=False): anyone who can reach this gateway "
            "has admin rights. Use this on localhost only."
        )
    yield
    # external experts called from this loop keep pooled connections open until it ends
    await OpenAICompatibleClient.close_sessions()


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
    metrics = GatewayMetrics()
    app = FastAPI(
        title="moerge gateway",
        summary="OpenAI-compatible API over registered experts and MoErging strategies.",
        version="0.1.0",
        lifespan=lifespan,
        exception_handlers=EXCEPTION_HANDLERS,  # errors: always OpenAI's shape (services/gateway/errors.py)
    )
    # what the handlers read (request.app.state)
    app.state.backend = backend
    app.state.registry = registry
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.auth = Authenticator(
        registry, require_keys=settings.require_keys, window_s=settings.rate_window_s, limiter=limiter
    )
    app.state.catalog = catalog or StrategyCatalog(registry)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    app.include_router(completions_router)  # /v1/chat/completions, /v1/completions, /v1/models
    app.include_router(experts_router)  # /v1/experts (admin to change)
    app.include_router(operations_router)  # /healthz, /metrics
    app.include_router(strategies_router)  # /v1/strategies (docs/strategies.md)
    app.include_router(leaderboard_router(registry))  # GET /leaderboard, /v1/leaderboard (docs/leaderboard.md)
    return app
