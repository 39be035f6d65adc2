"""A strategy added while serving: seconds from ``POST /v1/strategies`` to its first answer.

Serves the registry in $MOERGE_HOME in process (``moerge serve --no-ray``'s wiring: LocalBackend,
StrategyHost with the default ``refresh_interval_s`` of 1 s) over real HTTP, then, per round and
per kind of strategy, posts a new one over a subset of the experts and polls
``/v1/completions`` until it answers. The kinds:
- ``semantic``: example embeddings, stored per expert: nothing to fit;
- ``classifier``: a head trained over the subset (stored, so a later process reuses it); each
  round uses another subset, so each one trains its own head.
Also the median time of a built-in strategy's request before and after user strategies exist
(the catalog lookup on every request). Medians over ``--rounds``.

    python bench/bench_strategy_hot.py [--rounds 3]

Uses the registry in $MOERGE_HOME (build one with `moerge zoo build --size small --register`);
the strategies it adds are removed again.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from bench.machine import load, machine  # noqa: E402
from registry.service import Registry  # noqa: E402
from services.gateway import GatewaySettings, LocalBackend, create_app  # noqa: E402
from services.gateway.backend import PoolEngine  # noqa: E402
from services.moe.catalog import StrategyCatalog  # noqa: E402
from services.serving.strategy_host import StrategyHost, backend_strategies  # noqa: E402
from services.zoo.skills import make_split  # noqa: E402
from tests.servers import serve  # noqa: E402


def first_answer(h: httpx.Client, model: str, prompt: str, t0: float, timeout_s: float = 300) -> float:
    while True:
        r = h.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 8})
        if r.status_code == 200:
            return time.perf_counter() - t0
        if r.status_code != 404 or time.perf_counter() - t0 > timeout_s:
            raise RuntimeError(f"{model}: {r.status_code} {r.text}")
        time.sleep(0.05)


def request_ms(h: httpx.Client, model: str, prompts: list[str]) -> float:
    times = []
    for p in prompts:
        t0 = time.perf_counter()
        r = h.post("/v1/completions", json={"model": model, "prompt": p, "max_tokens": 4})
        r.raise_for_status()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    registry = Registry()
    adapters = sorted({e.name for e in registry.list_experts(kind="adapter", status="ready")})
    if len(adapters) < 3:
        sys.exit("needs a registry with at least 3 adapters: moerge zoo build --size small --register")
    prompts = [e.prompt for e in make_split("test", 2, seed=0)][:8]
    backend = LocalBackend(registry)
    catalog = StrategyCatalog(registry)
    host = StrategyHost(
        registry, ["moe/semantic"], engine_factory=lambda pool: PoolEngine(pool, backend), catalog=catalog
    )
    backend.add_strategies(backend_strategies(host))
    print(f"machine: {machine()}; load {load()}")
    results: dict[str, list[float]] = {"semantic": [], "classifier": []}
    builtin_before, builtin_after = [], []
    with (
        serve(create_app(backend, registry, GatewaySettings(require_keys=False), catalog=catalog)) as url,
        httpx.Client(base_url=url, timeout=600) as h,
    ):
        request_ms(h, "moe/semantic", prompts[:2])  # warm: the router and the engine
        for i in range(args.rounds):
            builtin_before.append(request_ms(h, "moe/semantic", prompts))
            subset = [a for j, a in enumerate(adapters) if (j + i) % len(adapters) < len(adapters) - 2]
            names = []
            for kind in results:
                name = f"bench-{kind}-{i}"
                t0 = time.perf_counter()
                r = h.post(
                    "/v1/strategies", json={"name": name, "router": kind, "composer": "single", "experts": subset}
                )
                r.raise_for_status()
                results[kind].append(first_answer(h, f"moe/{name}", prompts[0], t0))
                names.append(name)
            builtin_after.append(request_ms(h, "moe/semantic", prompts))
            for name in names:
                h.delete(f"/v1/strategies/{name}").raise_for_status()
            print(
                f"round {i + 1}: "
                + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in results.items())
                + f"; moe/semantic request {builtin_before[-1]:.1f} → {builtin_after[-1]:.1f} ms",
                flush=True,
            )
    print(f"\n{len(adapters) - 2} of {len(adapters)} adapters per strategy; medians over {args.rounds} rounds")
    print("| strategy posted | POST → first answer |")
    print("|---|---:|")
    for kind, values in results.items():
        print(f"| {kind} over a new subset | {statistics.median(values):.2f} s |")
    print(
        f"moe/semantic request p50: {statistics.median(builtin_before):.1f} ms without user strategies, "
        f"{statistics.median(builtin_after):.1f} ms with two"
    )


if __name__ == "__main__":
    main()
