"""``moerge serve``: the gateway and the experts, on Ray Serve (default) or in this process."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from registry.config import database_url, moerge_home
from services.cli import app

console = Console()

# what every Ray worker needs to find the same registry and stay offline
FORWARDED_ENV = (
    "MOERGE_HOME",
    "MOERGE_DATABASE_URL",
    "MOERGE_ARTIFACT_ROOT",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
)


@app.command("serve")
def serve_command(
    config: Path | None = typer.Option(
        None, "--config", "-c", help="Serve config YAML (docs/serving.md); defaults fit a 2-core machine."
    ),
    host: str | None = typer.Option(None, help="Interface to listen on (config: host; default 127.0.0.1)."),
    port: int | None = typer.Option(None, help="Port to listen on (config: port; default 8000)."),
    ray: bool = typer.Option(
        True,
        "--ray/--no-ray",
        help="Ray Serve deployments (default), or everything in this one process (hf engines, no replicas).",
    ),
    require_keys: bool | None = typer.Option(
        None,
        "--require-keys/--no-require-keys",
        help="Demand API keys (`moerge keys create`). Default: the "
        "config's gateway.require_keys (off for the embedded default).",
    ),
) -> None:
    """Serve every registered expert and strategy over the OpenAI-compatible API until Ctrl-C (or SIGTERM).

    With Ray, a local cluster is started unless RAY_ADDRESS names one to join."""
    from services.serving.config import load_config

    cfg = load_config(config)
    updates: dict[str, Any] = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    if require_keys is not None:
        updates["gateway"] = cfg.gateway.model_copy(update={"require_keys": require_keys})
    cfg = cfg.model_copy(update=updates)
    console.print(f"registry: {database_url()}  (artifacts under {moerge_home()})", highlight=False)
    if not cfg.gateway.require_keys:
        console.print(
            "[yellow]API keys are not required[/yellow]: anyone who can reach this port has admin "
            "rights. Use this on localhost only (--require-keys to turn keys on)."
        )
    if ray:
        _serve_on_ray(cfg)
    else:
        _serve_in_process(cfg)


def _serve_on_ray(cfg) -> None:
    from services.serving.ingress import start_local_ray

    address = os.environ.get("RAY_ADDRESS")
    # external experts' key variables go along, and only those the operator listed
    from services.engines.external import EXTERNAL_KEY_VARS, external_key_vars

    env = {k: os.environ[k] for k in (*FORWARDED_ENV, EXTERNAL_KEY_VARS, *external_key_vars()) if k in os.environ}
    env.setdefault("MOERGE_HOME", str(moerge_home()))
    env.setdefault("MOERGE_DATABASE_URL", database_url())
    if address and cfg.ingress != "proxy":
        console.print(
            f"joining {address}: its processes' environment decides the ingress, not the config's "
            f"{cfg.ingress!r} (docs/serving.md)",
            highlight=False,
        )
    with console.status("starting Ray" + (f" (joining {address})" if address else " (local)")):
        start_local_ray(cfg.ingress, env, cfg.host, cfg.port, address=address)
    # imported once Ray is up: Serve reads the ingress switches when it is first imported
    import ray
    from ray import serve

    from services.serving.app import APP_NAME, build_app

    t0 = time.perf_counter()
    with console.status("deploying the gateway, engines and strategies"):
        serve.run(build_app({"config": cfg.model_dump()}), name=APP_NAME, route_prefix="/")
    console.print(
        f"[green]serving[/green] on http://{cfg.host}:{cfg.port}/v1  (ingress: {cfg.ingress}; deployed "
        f"in {time.perf_counter() - t0:.1f} s; Ctrl-C stops)",
        highlight=False,
    )
    _stop_on_signals()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        with console.status("stopping"):
            serve.shutdown()
            ray.shutdown()


def _stop_on_signals() -> None:
    """SIGTERM (docker stop, Kubernetes, systemd) stops the service as Ctrl-C does, shutting Serve
    and the local Ray down instead of leaving their processes behind; SIGINT too when the shell
    started this command in the background, which ignores it."""

    def interrupt(signum, frame) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


def leave_a_core_for_http() -> int | None:
    """In one process the CPU engines' torch threads and the HTTP event loop share the cores. With
    a torch thread on every core, the event loop's work for one request (parsing, auth, the JSON of
    the last answer) descheduled a torch thread mid-forward, and the others waited at its barrier:
    a request sent right after the last one's answer took far longer, and more CPU, than one sent
    after a pause (docs/benchmarks.md, "Against peers"). So the engines get one core fewer, unless
    OMP_NUM_THREADS says otherwise. The thread count set, or None."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cores < 2:
        return None
    import torch

    torch.set_num_threads(cores - 1)
    return cores - 1


def _serve_in_process(cfg) -> None:
    import uvicorn

    from registry.service import Registry
    from services.gateway.app import GatewaySettings, create_app
    from services.gateway.backend import LocalBackend, PoolEngine, hf_engine_args
    from services.moe.catalog import StrategyCatalog
    from services.serving.strategy_host import StrategyHost, backend_strategies

    registry = Registry()
    engines = cfg.engines

    def engine_for_base(base: str) -> tuple[str, dict]:
        return engines.for_base(base).engine, engines.for_base(base).engine_args

    for base in registry.list_bases():
        if engines.for_base(base.name).engine != "hf":
            console.print(
                f"[yellow]base {base.name}: --no-ray serves it on the hf engine[/yellow] (the config's "
                f"{engines.for_base(base.name).engine!r} engine runs on Ray)",
                highlight=False,
            )
    # the serve config's engine_args (device, dtype, adapter_mode, max_batch_size) hold here too
    backend = LocalBackend(
        registry,
        engine_kwargs=hf_engine_args(engines.default.engine_args),
        engine_for_base=lambda base: ("hf", engine_for_base(base)[1]),
    )
    # strategies generate on the backend's engines: one copy of each base, batched with the rest
    catalog = StrategyCatalog(registry, file=cfg.strategies.file, refresh_interval_s=cfg.strategies.refresh_interval_s)
    host = StrategyHost(
        registry,
        cfg.strategies.names,
        engine_factory=lambda pool: PoolEngine(pool, backend),
        refresh_interval_s=cfg.strategies.refresh_interval_s,
        catalog=catalog,
        engine_args=lambda base: engine_for_base(base)[1],  # merges and mixtures where the engines run
    )
    backend.add_strategies(backend_strategies(host))  # a live view: strategies added later are served too
    settings = GatewaySettings(require_keys=cfg.gateway.require_keys, request_timeout_s=cfg.gateway.request_timeout_s)
    threads = leave_a_core_for_http()
    console.print(
        f"[green]serving[/green] on http://{cfg.host}:{cfg.port}/v1 (in process; Ctrl-C stops)"
        + (
            f"; engines on {threads} torch thread(s), a core left to HTTP (OMP_NUM_THREADS overrides)"
            if threads
            else ""
        ),
        highlight=False,
    )
    uvicorn.run(
        create_app(backend, registry, settings, catalog=catalog), host=cfg.host, port=cfg.port, log_level="warning"
    )
