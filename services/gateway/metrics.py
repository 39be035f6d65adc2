"""Prometheus metrics of one gateway app, on its own ``CollectorRegistry``.

A registry per app (not prometheus-client's global one) lets several apps live in one process
(tests, a Ray replica restarted in place) without "duplicated timeseries" errors; ``GET /metrics``
renders exactly this app's series.

Label values come from a closed set wherever a client could choose them: the ``endpoint`` label is
the route's template (``/v1/experts/{name}``, not the name asked for) and ``model`` is set only
once the model is known to exist (empty otherwise, and on routes that name no model), so a client cannot mint series.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from composer.base import Completion

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ROUTER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, namespace: str = "moerge") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, ns = self.registry, namespace
        self.requests = Counter(
            "gateway_requests",
            "HTTP requests answered, by route, model and status code.",
            ["endpoint", "model", "status"],
            namespace=ns,
            registry=r,
        )
        self.latency = Histogram(
            "gateway_request_seconds",
            "Time from request to the last byte of the response.",
            ["endpoint", "model"],
            namespace=ns,
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.in_flight = Gauge(
            "gateway_requests_in_flight",
            "Requests being answered now.",
            namespace=ns,
            registry=r,
        )
        self.router_seconds = Histogram(
            "router_decision_seconds",
            "Time the strategy's router took to decide (from provenance).",
            ["strategy"],
            namespace=ns,
            registry=r,
            buckets=ROUTER_BUCKETS,
        )
        self.selections = Counter(
            "expert_selections",
            "Experts chosen to answer, by the model (expert or strategy) asked for.",
            ["model", "expert"],
            namespace=ns,
            registry=r,
        )
        self.tokens = Counter(
            "tokens",
            "Tokens processed over every engine call, by model and kind (prompt|completion).",
            ["model", "kind"],
            namespace=ns,
            registry=r,
        )
        self.errors = Counter(
            "gateway_errors",
            "Error responses, by route and OpenAI error type.",
            ["endpoint", "type"],
            namespace=ns,
            registry=r,
        )

    def observe_completion(self, model: str, completion: Completion, router_ms: float | None) -> None:
        for expert, _ in completion.experts:
            self.selections.labels(model, expert).inc()
        self.tokens.labels(model, "prompt").inc(completion.prompt_tokens)
        self.tokens.labels(model, "completion").inc(completion.completion_tokens)
        if router_ms is not None:
            self.router_seconds.labels(model).observe(router_ms / 1000.0)

    def error(self, endpoint: str, type_: str) -> None:
        self.errors.labels(endpoint, type_).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every HTTP request and times it to its last body byte (so a stream is timed whole).

    Handlers put the model label in ``request.state.model`` once they know it exists.
    """

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        recorded = False
        scope.setdefault("state", {})
        m = self.metrics

        def record() -> None:
            nonlocal recorded
            if recorded:
                return
            recorded = True
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            model = scope["state"].get("model", "") if isinstance(scope.get("state"), dict) else ""
            m.requests.labels(endpoint, model, str(status)).inc()
            m.latency.labels(endpoint, model).observe(time.perf_counter() - start)

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record()

        m.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            m.in_flight.dec()
            record()  # an exception or a client that went away: count what was seen
