"""The in-process backend (``moerge serve --no-ray``) under concurrent clients.

``--concurrency`` threads call ``LocalBackend.run_expert`` on one adapter of the registered zoo
(greedy, ``--max-tokens`` new tokens), each sending its next request when its last is answered,
against the same requests one at a time: requests/s, and how many requests each engine call held.
Medians over ``--rounds``, the two alternating.

    python bench/bench_local_backend.py [--concurrency 16] [--requests 128] [--rounds 5]

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
    args = ap.parse_args()

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
    print(f"Machine: {cpu}, {os.cpu_count()} cores, python {platform.python_version()}; expert {expert.name}, "
          f"{args.max_tokens} new tokens, greedy")
    for name, values in rates.items():
        print(f"  {name}: {statistics.median(values):.1f} requests/s (rounds: "
              + ", ".join(f"{v:.1f}" for v in values) + ")")
    print(f"  requests per engine call with {args.concurrency} clients: {statistics.median(per_call):.1f}")


if __name__ == "__main__":
    main()
