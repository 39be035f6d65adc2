"""``/healthz`` and ``/metrics``: what load balancers and Prometheus ask (docs/api.md).

Handlers are module-level functions over ``app.state`` (the backend, registry and metrics that
``create_app`` puts there). Neither needs a key.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import text

from services.gateway.protocol import APIError, Health

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health)
def healthz(request: Request) -> Health:
    state = request.app.state
    try:
        with state.registry.reading() as s:
            s.execute(text("SELECT 1"))
        n = len(state.backend.models())
    except Exception as exc:  # any failure here means "do not send traffic"
        raise APIError(503, f"unhealthy: {exc}", type="service_unavailable_error", code="unhealthy") from exc
    return Health(models=n)


@router.get("/metrics")
def prometheus_metrics(request: Request) -> Response:
    metrics = request.app.state.metrics
    return Response(metrics.render(), media_type=metrics.content_type)
