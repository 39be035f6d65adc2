"""Every strategy (and every expert alone) on every split of the skills suite, on a registered zoo.

Prints one table of accuracies per split, routing accuracy, router decision time p50/p95 (after
warm-up) and the time to make one newly registered expert routable per router, plus the tokenwise
mixture's throughput against a single adapter. Record the output in docs/benchmarks.md.

    python bench/bench_strategies.py [--n-per-task 25] [--strategies moe/oracle,moe/glider]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from composer.engine_protocol import GenerateRequest  # noqa: E402
from registry.service import Registry  # noqa: E402
from routers.embedder import get_embedder  # noqa: E402
from services.moe.evaluate import evaluate, load_suite  # noqa: E402
from services.moe.pool import ExpertPool  # noqa: E402
from services.moe.strategies import STRATEGIES, MoE  # noqa: E402

SPLITS = ("test", "paraphrase", "composition")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), python {platform.python_version()}"


def decision_times(moe: MoE, name: str, prompts: list[str], warmup: int = 5) -> tuple[float, float]:
    """Per-query decision time on prompts the router has not seen, with the embedding cache
    cleared before every query (a cached embedding would time a dict look-up, not a decision)."""
    for p in prompts[:warmup]:
        moe.route(name, p)
    times = []
    for p in prompts[warmup:]:
        get_embedder().clear_cache()
        times.append(moe.route(name, p).router_ms)
    q = statistics.quantiles(times, n=100, method="inclusive")
    return statistics.median(times), q[94]


def new_expert_routable(registry: Registry, pool: ExpertPool, routers: list[str]) -> dict[str, float]:
    """Register a copy of one adapter under a new name; seconds until each router can route to it
    (fit of that one expert + reload of stored artifacts of the others + classifier retrain)."""
    name = "bench-new-expert"
    src = next(iter(pool.adapters().items()))
    info = pool.experts[src[0]]
    examples = [{"prompt": e.prompt, "reference": e.reference, "task": e.task, "split": e.split} for e in info.examples]
    registry.register_expert(
        name,
        "adapter",
        src[1],
        base=pool.base.name,
        domains=list(info.domains),
        skills=list(info.skills),
        description=info.description,
        examples=examples,
    )
    out = {}
    try:
        for router in routers:
            moe = MoE(ExpertPool(registry, pool.base.name))
            get_embedder().clear_cache()
            t0 = time.perf_counter()
            moe.router(router)
            out[router] = time.perf_counter() - t0
    finally:
        registry.remove_expert(name)  # its artifacts go with it
    return out


def mixture_throughput(moe: MoE, batch: int = 16, new_tokens: int = 32, repeats: int = 3) -> dict[str, float]:
    """Generated tokens/s of moe/phatgoose vs one adapter alone, end to end through the engine.

    Answers stop at EOS (after 4-9 tokens on this suite), so tokens are counted from the outputs,
    not assumed to be ``new_tokens``; bench/bench_mixture.py forces equal lengths and is the
    measurement of record for the mixture layer itself."""
    prompts = [e.prompt for e in load_suite("skills", "test", 4)][:batch]
    adapter = next(iter(moe.pool.adapters()))
    engine = moe.pool.engine
    reqs = [GenerateRequest(p, adapter, new_tokens) for p in prompts]

    def single() -> int:
        return sum(r.completion_tokens for r in engine.generate(reqs))

    def mixture() -> int:
        return sum(c.completion_tokens for c, _ in moe.run("moe/phatgoose", prompts, max_new_tokens=new_tokens))

    def tokens_per_s(fn) -> float:
        fn()  # warm-up (and PHATGOOSE fitting for the mixture)
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            tokens = fn()
            rates.append(tokens / (time.perf_counter() - t0))
        return statistics.median(rates)

    a, m = tokens_per_s(single), tokens_per_s(mixture)
    return {"single_adapter_tok_s": a, "mixture_8x_top2_tok_s": m, "ratio": m / a}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-per-task", type=int, default=25)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--skip-experts", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true", help="only timings, throughput, new-expert cost")
    args = ap.parse_args()
    registry = Registry()
    pool = ExpertPool(registry)
    moe = MoE(pool)
    print(f"Machine: {machine()}")
    print(f"Zoo base: {pool.base.name}; experts: {', '.join(pool.names())}; {args.n_per_task} queries per task\n")

    names = [s for s in args.strategies.split(",") if s] if not args.skip_accuracy else []
    if not args.skip_experts:
        names = [f"expert:{n}" for n in pool.names()] + names
    rows = []
    for name in names:
        accs, routing, secs = {}, None, 0.0
        for split in SPLITS:
            t0 = time.perf_counter()
            report = evaluate(name, split=split, moe=moe, n_per_task=args.n_per_task)
            secs += time.perf_counter() - t0
            accs[split] = report.accuracy
            if split == "test":
                routing = report.routing_accuracy
        rows.append((name, accs, routing, secs))
        print(f"  {name}: " + " ".join(f"{s}={a:.3f}" for s, a in accs.items()), flush=True)

    print("\n| strategy | test | paraphrase | composition | routing acc (test) | eval s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, accs, routing, secs in rows:
        r = f"{routing:.3f}" if routing is not None else "–"
        print(
            f"| {name} | {accs['test']:.3f} | {accs['paraphrase']:.3f} | {accs['composition']:.3f} | {r} | {secs:.1f} |"
        )

    # a seed the evaluation did not use: fresh inputs the embedder has not cached
    prompts = [e.prompt for e in load_suite("skills", "test", 8, seed=12345)]
    print("\n| router | decision p50 ms | p95 ms |")
    print("|---|---:|---:|")
    for name in ("moe/classifier", "moe/semantic", "moe/retrieval", "moe/skill-k3-vote", "moe/glider", "moe/arrow"):
        p50, p95 = decision_times(moe, name, prompts)
        print(f"| {STRATEGIES[name].router} | {p50:.2f} | {p95:.2f} |")

    print("\nTokenwise mixture, 8 experts top-2 (PHATGOOSE) vs one adapter, batch 16, 32 new tokens:")
    print(mixture_throughput(moe))

    routers = ["classifier", "semantic", "retrieval", "skill", "phatgoose", "arrow", "glider"]
    print("\nSeconds until one newly registered expert is routable (fit it, load the others' stored artifacts):")
    for router, secs in new_expert_routable(registry, pool, routers).items():
        print(f"  {router}: {secs:.1f}")


if __name__ == "__main__":
    main()
