"""Issue 17's rows that need no router: the domains zoo's experts, oracles and merges, by
held-out loss (nats per token) on the test split (single-domain documents) and the mixed split.

Reads a built domains zoo (``moerge zoo build --suite domains --size small``) and scores, one
teacher-forced pass per document (``services.leaderboard.domain_losses``):
- the base, every expert alone, the per-document and per-segment oracles;
- merges of every adapter expert with ``composer.merge.merge_adapters`` (peft's
  ``add_weighted_adapter``): task arithmetic with weights 1/n (the uniform merge), 0.3, 0.5 and 1
  per expert; TIES and DARE-TIES (density 0.5) with weights 0.5 and 1; each as the fraction of
  the oracle's gain over the base it recovers (the per-document oracle on the test split, the
  per-segment one on the mixed split);
- tokenwise mixtures of every adapter expert (``composer.molora.mixture``, top-2 per token and
  module): PHATGOOSE, its gates trained by ``routers.phatgoose.train_gates`` on each expert's
  registered documents (loss on every token), and Arrow.

    python bench/bench_domains_zoo.py [ZOO_DIR] [--gate-steps 100 --gate-batch 32]   # default $MOERGE_HOME/zoo/domains-small
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
from composer.merge import merge_adapters  # noqa: E402
from composer.molora import mixture  # noqa: E402
from registry.config import moerge_home  # noqa: E402
from routers.arrow import arrow_prototypes  # noqa: E402
from routers.base import MixtureSpec  # noqa: E402
from routers.phatgoose import train_gates  # noqa: E402
from routers.tokenwise import read_lora_factors  # noqa: E402
from services.leaderboard.domain_losses import ExpertRef, LossScorer, SuiteLosses, gold_experts, read_documents  # noqa: E402
from services.leaderboard.text_loss import LossTotals  # noqa: E402
from services.zoo import domains as D  # noqa: E402
from services.zoo.build import ZooManifest  # noqa: E402
from services.zoo.domains_build import SIZES  # noqa: E402

MERGES = (  # label, method, weight per expert (None: 1/n)
    ("uniform merge (task arithmetic, 1/n)", "task_arithmetic", None),
    ("task arithmetic, weights 0.3", "task_arithmetic", 0.3),
    ("task arithmetic, weights 0.5", "task_arithmetic", 0.5),
    ("task arithmetic, weights 1", "task_arithmetic", 1.0),
    ("TIES, weights 0.5, density 0.5", "ties", 0.5),
    ("TIES, weights 1, density 0.5", "ties", 1.0),
    ("DARE-TIES, weights 0.5, density 0.5", "dare_ties", 0.5),
    ("DARE-TIES, weights 1, density 0.5", "dare_ties", 1.0),
)


def row(label: str, t: LossTotals, base: LossTotals | None, domains) -> str:
    cells = [f"{t.per_token(d):.3f}" for d in domains] + [f"**{t.per_token():.3f}**"]
    if base is not None:
        cells.append(f"{t.per_token() / base.per_token() - 1:+.1%}")
    return f"| {label} | " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoo", nargs="?", type=Path, default=None)
    ap.add_argument("--gate-steps", type=int, default=100, help="PHATGOOSE gate training steps per expert")
    ap.add_argument("--gate-batch", type=int, default=32)
    args = ap.parse_args()
    hf_logging.disable_progress_bar()
    m = ZooManifest.load(args.zoo or moerge_home() / "zoo" / "domains-small")
    spec = SIZES[m.size]
    print(f"Machine: {machine()}; load {load()}; zoo {m.root} ({m.size}, seed {m.seed})")
    t_all = time.perf_counter()
    experts = [ExpertRef(e.name, e.kind, m.path_of(e.path), tuple(e.domains)) for e in m.experts]
    adapters = [e for e in experts if e.kind == "adapter"]
    gold = gold_experts(experts)
    scorer = LossScorer(m.path_of(m.base.path), spec.max_length)
    splits = {s: SuiteLosses(read_documents(m.path_of(p))) for s, p in m.suite.items()}

    def score_all(name, forward):
        for losses in splits.values():
            losses.per_document[name] = scorer.score(forward, losses.documents)

    score_all("base", scorer.base_forward())
    for e in experts:
        score_all(e.name, scorer.expert_forward(e))
    merged_dir = Path(tempfile.mkdtemp(prefix="moerge-merges-"))
    for label, method, w in MERGES:
        t0 = time.perf_counter()
        weights = [w if w is not None else 1 / len(adapters)] * len(adapters)
        merged = merge_adapters(
            m.path_of(m.base.path), {e.name: e.path for e in adapters}, weights, method, out_dir=merged_dir
        )
        score_all(label, scorer.adapter_forward(f"merge-{len(splits['test'].per_document)}", merged.path))
        print(f"{label}: merged and scored in {time.perf_counter() - t0:.1f} s")

    # -- tokenwise mixtures over every adapter expert, top-2 per token and module --------------
    from transformers import AutoModelForCausalLM

    mix_base = AutoModelForCausalLM.from_pretrained(str(m.path_of(m.base.path))).eval()
    paths = {e.name: e.path for e in adapters}
    t0 = time.perf_counter()
    phatgoose = {}
    for e in adapters:
        texts = [json.loads(x)["prompt"] for x in m.path_of(m.expert(e.name).train_examples).read_text().splitlines()]
        phatgoose[e.name], _ = train_gates(
            mix_base,
            scorer.tokenizer,
            read_lora_factors(e.path),
            [("", t) for t in texts],
            steps=args.gate_steps,
            batch_size=args.gate_batch,
            max_length=spec.max_length,
            loss_on="sequence",
        )
    print(f"PHATGOOSE gates ({args.gate_steps} steps, batch {args.gate_batch}): {time.perf_counter() - t0:.0f} s")
    arrow = {e.name: arrow_prototypes(e.path) for e in adapters}
    tokenwise = [("PHATGOOSE, top-2", "phatgoose", phatgoose), ("Arrow, top-2", "arrow", arrow)]
    for label, gate, vectors in tokenwise:
        t0 = time.perf_counter()
        spec_ = MixtureSpec(router=gate, experts=list(paths), gate=gate, top_k=2)
        with mixture(mix_base, paths, spec_, {n: {gate: v} for n, v in vectors.items()}):
            score_all(label, lambda ids: mix_base(input_ids=ids).logits)
        print(f"{label}: scored in {time.perf_counter() - t0:.1f} s")

    for split, losses in splits.items():
        base = losses.total("base")
        doc_oracle = losses.document_oracle(gold) if split == "test" else None
        print(f"\n### {split} split ({len(losses.documents)} documents): nats per token per domain\n")
        print("| model | " + " | ".join(D.DOMAINS) + " | all | vs base |")
        print("|---|" + "---:|" * (len(D.DOMAINS) + 2))
        print(row("base", base, None, D.DOMAINS) + " |")
        for e in experts:
            print(row(e.name, losses.total(e.name), base, D.DOMAINS))
        if doc_oracle is not None:
            print(row("per-document oracle", doc_oracle, base, D.DOMAINS))
        seg = losses.segment_oracle(gold)
        print(row("per-segment oracle", seg, base, D.DOMAINS))
        for label, _, _ in tokenwise:
            print(row(label, losses.total(label), base, D.DOMAINS))
        best = min(experts, key=lambda e: losses.total(e.name).per_token())
        print(f"\nbest single expert on {split}: {best.name} ({losses.total(best.name).per_token():.3f})")
        oracle = doc_oracle or seg
        gain = base.per_token() - oracle.per_token()
        print("\n| merge | " + " | ".join(D.DOMAINS) + " | all | vs base | share of the oracle's gain |")
        print("|---|" + "---:|" * (len(D.DOMAINS) + 3))
        for label, _, _ in MERGES:
            t = losses.total(label)
            print(row(label, t, base, D.DOMAINS) + f" {(base.per_token() - t.per_token()) / gain:.0%} |")
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s; load {load()}")


if __name__ == "__main__":
    main()
