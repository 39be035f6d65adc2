"""The semantic router's gate, before and after the joint calibration, in one run.

    python bench/bench_semantic_gate.py [--seeds 0,1,2] [--n-per-task 20]

Experts are the small zoo's, as a build with that seed registers them: each skill's LoRA and the
domain-math model, with the same train and validation prompts (``services.zoo.build``); no model is
trained or loaded, routing needs only the prompts. Both rules run on the same fitted artifacts:

- *before*: a threshold per expert, the 5 % quantile of its own held-out scores minus 0.1, and the
  best-scoring expert above its own threshold answers (moerge up to 2026-12-01);
- *after*: ``routers/semantic.py``, one gate between what fits and what fits nothing.

Printed per seed: strict routing accuracy (the top expert is the skill's own) on the held-in test
split and on the paraphrase split, how many of those fell back, and how many of a few everyday
requests that are not in the gate's reference (``EVERYDAY``) fell back, as they should.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.machine import load, machine  # noqa: E402
from bench.zoo_experts import zoo_experts  # noqa: E402
from routers.base import RouteRequest  # noqa: E402
from routers.embedder import Embedder  # noqa: E402
from routers.semantic import SemanticRouter  # noqa: E402
from services.zoo.skills import SKILLS, make_split  # noqa: E402

EVERYDAY = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "How do I fix a flat bicycle tyre?",
    "Explain the theory of relativity.",
    "hi there",
    "What time does the sun set in July?",
    "Plan a picnic menu for six people.",
    "Which houseplants are easy to keep alive?",
]


def zoo_router(embedder: Embedder, seed: int) -> SemanticRouter:
    router = SemanticRouter(embedder=embedder)
    for expert in zoo_experts(seed, router.max_examples):
        router.add_expert(expert)
    return router


def before_rule(router: SemanticRouter, prompt: str) -> str | None:
    """The per-expert thresholds of moerge up to 2026-12-01, on the same artifacts."""
    scores = router.scores(prompt)
    thresholds = torch.tensor(
        [float(torch.quantile(router.artifacts[n].tensors["calibration_scores"], 0.05)) - 0.1 for n in router.names]
    )
    passed = (scores >= thresholds).nonzero().flatten()
    return router.names[int(passed[scores[passed].argmax()])] if len(passed) else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n-per-task", type=int, default=20)
    args = ap.parse_args()
    print(f"machine: {machine()}; load {load()}")
    embedder = Embedder()
    gold = {t: s.expert_name for t, s in SKILLS.items()}
    print(
        "| seed | rule | test strict | test fell back | paraphrase strict | paraphrase fell back | everyday fell back | gate |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for seed in (int(s) for s in args.seeds.split(",")):
        router = zoo_router(embedder, seed)
        splits = {s: make_split(s, args.n_per_task, seed) for s in ("test", "paraphrase")}
        rules = {
            "before": lambda p, router=router: before_rule(router, p),
            "after": lambda p, router=router: router.route(RouteRequest(p)).top,
        }
        for rule, choose in rules.items():
            cells = []
            for exs in splits.values():
                chosen = [choose(e.prompt) for e in exs]
                cells += [
                    f"{sum(c == gold[e.task] for c, e in zip(chosen, exs)) / len(exs):.3f}",
                    str(sum(c is None for c in chosen)),
                ]
            everyday = sum(choose(q) is None for q in EVERYDAY)
            info = router.route(RouteRequest(EVERYDAY[0])).info
            gate = (
                (
                    f"{info['gate']:.3f} (fits {info['gate_from']['fits']:.3f}, nothing "
                    f"{info['gate_from']['fits_nothing']:.3f})"
                )
                if rule == "after"
                else "per expert"
            )
            print(f"| {seed} | {rule} | {' | '.join(cells)} | {everyday}/{len(EVERYDAY)} | {gate} |")


if __name__ == "__main__":
    main()
