"""The in-process backend (``moerge serve --no-ray``) under concurrent clients.

``--concurrency`` threads call ``LocalBackend.run_expert`` on one adapter of the registered zoo
(greedy, ``--max-tokens`` new tokens), each sending its next request when its last is answered,
against the same requests one at a time: requests/s, and how many requests each engine call held.
Medians over ``--rounds``, the two alternating.

``--strategy moe/semantic``: the same for a strategy, served the two ways ``moerge serve --no-ray``
has wired it: on the strategy host's own engine (one request at a time under the host's lock,
before) and on the backend's engines through ``PoolEngine`` (after), alternating.

    python bench/bench_local_backend.py [--concurrency 16] [--requests 128] [--rounds 5] [--strategy NAME]

Uses the registry in $MOERGE_HOME (build one with `moerge zoo build --register`).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from registry.service import Registry  # noqa: E402
from services.engines.hf import HFEngine  # noqa: E402
from services.gateway.backend import LocalBackend, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--strategy", default=None, help="a strategy to serve both ways instead of one expert")
    args = ap.parse_args()
    if args.strategy:
        return strategy_ways(args)

    registry = Registry()
    adapters = registry.list_experts(kind="adapter", status="ready")
    if not adapters:
        raise SystemExit("no adapters registered: run `moerge zoo build --register` first")
    expert = adapters[0]
    prompts = [e.prompt for e in registry.get_examples(expert.name, expert.version, split="validation")][:16]
    sizes: list[int] = []

    class Counting(HFEngine):
        def generate(self, requests, emits=None):  # noqa: ANN001, ANN201
            sizes.append(len(requests))
            return super().generate(requests, emits)

    backend = LocalBackend(registry, engine_factory=Counting)
    params = SamplingParams(max_tokens=args.max_tokens)

    def ask(i: int) -> None:
        backend.run_expert(expert.name, prompts[i % len(prompts)], params)

    for i in range(4):  # the engine and the adapter loaded
        ask(i)
    rates: dict[str, list[float]] = {"one at a time": [], f"{args.concurrency} clients": []}
    per_call: list[float] = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for i in range(args.requests // 4):
            ask(i)
        rates["one at a time"].append(args.requests // 4 / (time.perf_counter() - t0))
        sizes.clear()
        with ThreadPoolExecutor(args.concurrency) as pool:
            t0 = time.perf_counter()
            list(pool.map(ask, range(args.requests)))
            rates[f"{args.concurrency} clients"].append(args.requests / (time.perf_counter() - t0))
        per_call.append(statistics.mean(sizes))
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(
        f"Machine: {cpu}, {os.cpu_count()} cores, python {platform.python_version()}; expert {expert.name}, "
        f"{args.max_tokens} new tokens, greedy"
    )
    for name, values in rates.items():
        print(
            f"  {name}: {statistics.median(values):.1f} requests/s (rounds: "
            + ", ".join(f"{v:.1f}" for v in values)
            + ")"
        )
    print(f"  requests per engine call with {args.concurrency} clients: {statistics.median(per_call):.1f}")


def strategy_ways(args: argparse.Namespace) -> None:
    from services.gateway.backend import PoolEngine
    from services.serving.strategy_host import StrategyHost

    registry = Registry()
    backend = LocalBackend(registry)
    ways = {
        "own engine (before)": StrategyHost(registry, [args.strategy]),
        "PoolEngine (after)": StrategyHost(
            registry, [args.strategy], engine_factory=lambda pool: PoolEngine(pool, backend)
        ),
    }
    expert = registry.list_experts(kind="adapter", status="ready")[0]
    prompts = [e.prompt for e in registry.get_examples(expert.name, expert.version, split="validation")][:16]
    rates: dict[str, list[float]] = {name: [] for name in ways}
    for host in ways.values():
        for p in prompts[:4]:  # the router fitted, the engines loaded
            host.complete(args.strategy, p, max_new_tokens=args.max_tokens)
    for _ in range(args.rounds):
        for name, host in ways.items():
            with ThreadPoolExecutor(args.concurrency) as pool:
                t0 = time.perf_counter()
                list(
                    pool.map(
                        lambda i, host=host: host.complete(
                            args.strategy,
                            prompts[i % len(prompts)],
                            max_new_tokens=args.max_tokens,
                        ),
                        range(args.requests),
                    )
                )
                rates[name].append(args.requests / (time.perf_counter() - t0))
    print(f"{args.strategy}, {args.concurrency} clients, {args.max_tokens} new tokens:")
    for name, values in rates.items():
        print(
            f"  {name}: {statistics.median(values):.1f} requests/s (rounds: "
            + ", ".join(f"{v:.1f}" for v in values)
            + ")"
        )


if __name__ == "__main__":
    main()
