"""LoraHub on the domains zoo: every LoRA expert composed for one domain from 5 of its documents.

For each domain, ``composer.lorahub.lorahub_compose`` searches the weights of every adapter expert
(factor space, nevergrad NGOpt, budget 40, the official recipe) on 5 validation documents of that
domain (each scored as a text after BOS: an empty prompt and the document as the reference), then
the composed adapter scores the domain's test documents (``services.leaderboard.domain_losses``,
one teacher-forced pass each). Reported per domain: the loss, and the share of the oracle's gain
over the base it recovers (the oracle: the domain's gold expert; target ≥ 90 %).

    python bench/bench_domains_lorahub.py [ZOO_DIR] [--shots 5] [--budget 40] [--seeds 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers.utils import logging as hf_logging  # noqa: E402

from bench.machine import load, machine  # noqa: E402
from composer.lorahub import lorahub_compose  # noqa: E402
from registry.config import moerge_home  # noqa: E402
from services.leaderboard.domain_losses import ExpertRef, LossScorer, SuiteLosses, gold_experts, read_documents  # noqa: E402
from services.zoo import domains as D  # noqa: E402
from services.zoo.build import ZooManifest  # noqa: E402
from services.zoo.domains_build import SIZES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoo", nargs="?", type=Path, default=None)
    ap.add_argument("--shots", type=int, default=5, help="documents of the domain LoraHub sees")
    ap.add_argument("--budget", type=int, default=40)
    ap.add_argument("--seeds", default="0", help="comma-separated search seeds")
    args = ap.parse_args()
    hf_logging.disable_progress_bar()
    m = ZooManifest.load(args.zoo or moerge_home() / "zoo" / "domains-small")
    spec = SIZES[m.size]
    print(f"Machine: {machine()}; load {load()}; zoo {m.root} ({m.size}, seed {m.seed})")
    experts = [ExpertRef(e.name, e.kind, m.path_of(e.path), tuple(e.domains)) for e in m.experts]
    adapters = {e.name: e.path for e in experts if e.kind == "adapter"}
    gold = gold_experts(experts)
    base_path = m.path_of(m.base.path)
    scorer = LossScorer(base_path, spec.max_length)
    test = SuiteLosses(read_documents(m.path_of(m.suite["test"])))
    by_domain = {d: [doc for doc in test.documents if doc[0][0] == d] for d in D.DOMAINS}

    def domain_loss(forward, domain: str) -> float:
        totals = scorer.score(forward, by_domain[domain])
        return sum(t.nats[domain] for t in totals) / sum(t.tokens[domain] for t in totals)

    out = Path(tempfile.mkdtemp(prefix="moerge-lorahub-"))
    print("\n| domain | seed | base | gold expert | LoraHub | share of the gold's gain | weights | search s |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    shares = []
    for domain in D.DOMAINS:
        base = domain_loss(scorer.base_forward(), domain)
        g = next(e for e in experts if e.name == gold[domain])
        oracle = domain_loss(scorer.expert_forward(g), domain)
        validation = m.path_of(m.expert(g.name).validation_examples).read_text().splitlines()
        shots = [("", json.loads(x)["prompt"]) for x in validation[: args.shots]]
        for seed in (int(s) for s in args.seeds.split(",")):
            t0 = time.perf_counter()
            result = lorahub_compose(base_path, adapters, shots, out / f"{domain}-{seed}", args.budget, seed)
            seconds = time.perf_counter() - t0
            composed = domain_loss(scorer.adapter_forward(f"lorahub-{domain}-{seed}", result.path), domain)
            share = (base - composed) / (base - oracle)
            shares.append(share)
            weights = ", ".join(
                f"{n.removeprefix('dom-')} {w:+.2f}" for n, w in result.weights.items() if abs(w) >= 0.05
            )
            print(
                f"| {domain} | {seed} | {base:.3f} | {oracle:.3f} ({g.name}) | {composed:.3f} | {share:.0%} "
                f"| {weights} | {seconds:.0f} |",
                flush=True,
            )
    print(f"\nmedian share {sorted(shares)[len(shares) // 2]:.0%}; load {load()}")


if __name__ == "__main__":
    main()
