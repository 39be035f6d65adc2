"""Leaderboard wall time: work grouped by expert (the default) against naive per-query order.

Grouped: each expert alone answers all its queries of all splits in one batched
``engine.generate`` (its adapter merged once); each strategy runs through ``MoE.run`` once per
split. Naive: one query at a time, every entry in turn (what a per-query harness does: batch size
1 and an adapter switch before nearly every call). Both modes answer identically (checked here);
the target is grouped ÷ naive ≤ 0.5. Routers are fitted / loaded and every strategy answers one
warm-up query before anything is timed; the modes alternate within each repeat so a busy machine
slows both alike. Record the output in docs/benchmarks.md.

    python bench/bench_leaderboard.py [--n-per-task 5] [--repeats 3] [--strategies moe/oracle,...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from registry.service import Registry
from services.leaderboard.runner import LeaderboardRunner
from services.leaderboard.store import machine

# query-level strategies: per-query (naive) execution of the tokenwise mixtures takes minutes per
# split on this CPU, and what grouping saves for them is the same batching measured here
DEFAULT_STRATEGIES = (
    "moe/oracle,moe/random,moe/base,moe/best-single,moe/classifier,moe/semantic,moe/retrieval,"
    "moe/skill-k3-vote,moe/stitch"
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-per-task", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--strategies", default=DEFAULT_STRATEGIES)
    args = ap.parse_args()
    strategies = [s for s in args.strategies.split(",") if s]

    registry = Registry()
    runner = LeaderboardRunner(registry, seed=0)
    print(f"Machine: {machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(
        f"Zoo base {runner.pool.base.name}; {len(runner.pool.names())} experts alone + {len(strategies)} "
        f"strategies; skills suite, {args.n_per_task} per task (test, paraphrase, composition)"
    )
    first = runner.run("skills", strategies=strategies, n_per_task=args.n_per_task)  # fits / loads routers
    print(f"{first.n_queries} queries × {len(first.entries)} entries; first (fitting) run {first.seconds:.1f} s\n")

    times: dict[str, list[float]] = {"grouped": [], "naive": []}
    answers: dict[str, dict] = {}
    for i in range(args.repeats):
        for mode in ("grouped", "naive") if i % 2 == 0 else ("naive", "grouped"):
            t0 = time.perf_counter()
            out = runner.run("skills", strategies=strategies, n_per_task=args.n_per_task, mode=mode)
            times[mode].append(time.perf_counter() - t0)
            answers[mode] = {k: [o.prediction for o in v.outcomes] for k, v in out.results.items()}
            print(f"  repeat {i + 1} {mode}: {times[mode][-1]:.1f} s", flush=True)
    same = answers["grouped"] == answers["naive"]
    grouped, naive = statistics.median(times["grouped"]), statistics.median(times["naive"])
    print("\n| mode | median s | runs (s) |")
    print("|---|---:|---|")
    for mode in ("grouped", "naive"):
        print(f"| {mode} | {statistics.median(times[mode]):.1f} | {', '.join(f'{t:.1f}' for t in times[mode])} |")
    print(f"\ngrouped / naive = {grouped / naive:.3f} (target <= 0.5); identical answers: {same}")


if __name__ == "__main__":
    main()
