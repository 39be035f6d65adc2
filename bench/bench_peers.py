"""moerge against the tools users already know, on the same prompts, machine and encoder, in one run.

    make peers                                   # once: the peers' own venv, .venv-peers
    python bench/bench_peers.py [--seed 0] [--n-per-task 20] [--peers-python .venv-peers/bin/python]
    python bench/bench_peers.py --short          # what CI runs: a few prompts, to keep it working

Installs nothing at run time. A peer whose requirements clash with moerge's venv runs in the peers'
venv as a worker process (``bench/peers/*_worker.py``), spoken to over a pipe, and times its own
calls. So the pipe is not in its numbers.

**Routing** (``routing``): aurelio's ``semantic-router`` (``IndexedRouter`` with its defaults over
``LocalEncoder``) against ``moe/semantic``, ``moe/classifier`` and ``moe/retrieval``. Both use the
same all-MiniLM-L6-v2 from the same offline package. Experts are the small zoo's, as a build with
``--seed`` registers them: each skill's LoRA and the domain-math model, with their train prompts
(up to 200, the same set for every router) and validation prompts. Nothing is trained or loaded
but the routers, and nothing is read from or written to a registry, so a fresh clone can run it.
- strict: the top choice is the skill's own expert; lenient: the top choice trained on the
  prompt's task (as ``services.moe.evaluate`` counts routing accuracy). A prompt that falls back
  (no route, the base) counts as wrong in both.
- decision p50/p95: per query, moerge's routers and the peer in turns, prompt by prompt, with
  moerge's embedding cache cleared before every query.

**Merges** (``merges``, ``bench/peers_merge.py``): mergekit's task arithmetic, TIES and DARE
against moerge's on the same base and LoRA adapters: the merged ΔW, and the time of a merge.

**Arrow** (``arrow``, ``bench/peers_arrow.py``): peft's ``create_arrow_model`` against ``moe/arrow``
and ``moe/phatgoose``: tokens/s at batch 16, and the agreement of the top-k choices.

**Gateway** (``gateway``, ``bench/peers_gateway.py``): LiteLLM's proxy against moerge's gateway with
an external expert, in front of the same backend, with wrk: added p50/p99 at concurrency 1 and
requests/s at 16, keys on on both sides.

Merges, Arrow and the gateway build their own tiny models (``tests/factories.py``,
``tests/chat_models.py``) in seconds, so a fresh clone runs every comparison.

Not compared: RouteLLM (``routellm`` 0.2.0). None of its routers can be fitted offline through its
own interfaces: importing any router constructs an OpenAI client (``similarity_weighted/utils.py``),
``mf`` and ``sw_ranking`` embed every query with OpenAI's ``text-embedding-3-small``, ``mf``'s
model ids are a hard-coded list of 64 Arena models and its trainer is hard-wired to CUDA, ``bert``
ships no trainer, and ``causal_llm`` downloads its prompts from the hub and needs Llama-3-8B on
CUDA. And its ``route`` picks between two models (a strong and a weak one, by a win-rate
threshold), never among N experts. docs/benchmarks.md ("Against peers") has the details.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Both processes, ours and the peer's (which inherits this): an OpenMP thread that spins after its
# call would take a core from the other process's next call.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import load, machine  # noqa: E402
from bench.peer_worker import Worker  # noqa: E402
from bench.peers_arrow import arrow  # noqa: E402
from bench.peers_gateway import gateway  # noqa: E402
from bench.peers_merge import merges  # noqa: E402
from bench.zoo_experts import zoo_experts  # noqa: E402
from routers.base import RouteRequest  # noqa: E402
from routers.classifier import ClassifierRouter  # noqa: E402
from routers.embedder import Embedder  # noqa: E402
from routers.retrieval import RetrievalRouter  # noqa: E402
from routers.semantic import SemanticRouter  # noqa: E402
from services.zoo.skills import SKILLS, make_split  # noqa: E402

PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"


def p50_p95(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=100, method="inclusive")
    return statistics.median(values), q[94]


def routing(args, peers_python: Path) -> None:
    experts = zoo_experts(args.seed)
    gold = {t: s.expert_name for t, s in SKILLS.items()}
    trained = {e.name: {x.task for x in e.examples} for e in experts}
    print(f"\n## Routing: {len(experts)} experts of the small zoo (seed {args.seed}), the same MiniLM\n")

    worker = Worker(peers_python, "aurelio_worker.py")
    worker.ask(fit={e.name: [x.prompt for x in e.examples if x.split == "train"] for e in experts})

    ours: dict[str, object] = {}
    embedders = []
    for label, backend in (("", "onnx"), (" (int8 query path)", "onnx-int8")):
        emb = Embedder(query_backend=backend)
        if embedders:
            emb._st = embedders[0]._load()  # one copy of the weights
        embedders.append(emb)
        kinds = (
            ("moe/semantic", SemanticRouter),
            ("moe/classifier", ClassifierRouter),
            ("moe/retrieval", RetrievalRouter),
        )
        for name, cls in kinds if not label else kinds[:2]:
            router = cls(embedder=emb)
            for e in experts:
                router.add_expert(e)
            if isinstance(router, ClassifierRouter):
                router.retrain()
            router.route(RouteRequest("warm up"))
            ours[name + label] = router

    names = [*ours, "aurelio semantic-router"]
    splits = {s: make_split(s, args.n_per_task, args.seed) for s in ("test", "paraphrase")}
    picks = {n: {s: [] for s in splits} for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    start = load()
    for split, examples in splits.items():
        for ex in examples:
            for name, router in ours.items():
                for emb in embedders:
                    emb.clear_cache()
                t0 = time.perf_counter()
                decision = router.route(RouteRequest(ex.prompt))
                times[name].append((time.perf_counter() - t0) * 1e3)
                picks[name][split].append(decision.top)
            reply = worker.ask(route=ex.prompt)
            times["aurelio semantic-router"].append(reply["ms"])
            picks["aurelio semantic-router"][split].append(reply["name"])
    worker.close()
    # the same queries again with no peer's turn between them: what a decision costs on its own
    alone: dict[str, list[float]] = {n: [] for n in ours}
    for examples in splits.values():
        for ex in examples:
            for name, router in ours.items():
                for emb in embedders:
                    emb.clear_cache()
                t0 = time.perf_counter()
                router.route(RouteRequest(ex.prompt))
                alone[name].append((time.perf_counter() - t0) * 1e3)
    print(
        f"Machine: {machine()}; load {start} → {load()}; aurelio semantic-router {worker.hello['version']} "
        f"on {worker.hello['threads']} torch threads, moerge's query path on 1\n"
    )
    print(
        "| router | test strict | test lenient | paraphrase strict | paraphrase lenient | decision p50 / p95 ms "
        "| p50 / p95 ms, moerge alone |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = {}
    for name in names:
        cells = []
        for split, examples in splits.items():
            chosen = picks[name][split]
            strict = sum(c == gold[e.task] for c, e in zip(chosen, examples)) / len(examples)
            lenient = sum(e.task in trained.get(c, ()) for c, e in zip(chosen, examples)) / len(examples)
            cells += [strict, lenient]
        p50, p95 = p50_p95(times[name])
        rows[name] = (cells, p50)
        solo = "{:.1f} / {:.1f}".format(*p50_p95(alone[name])) if name in alone else ""
        print(f"| {name} | {' | '.join(f'{c:.3f}' for c in cells)} | {p50:.1f} / {p95:.1f} | {solo} |")
    peer_cells, peer_p50 = rows["aurelio semantic-router"]
    print()
    for name in ours:
        cells, p50 = rows[name]
        print(
            f"- {name} ÷ aurelio: paraphrase strict {cells[2] / max(peer_cells[2], 1e-9):.2f}×, "
            f"decision p50 {p50 / peer_p50:.2f}×"
        )
    print(f"\n({sum(len(v) for v in splits.values())} prompts: {args.n_per_task} per task and split)")


COMPARISONS = {"routing": routing, "merges": merges, "arrow": arrow, "gateway": gateway}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0, help="the zoo build whose experts' prompts are used")
    ap.add_argument("--n-per-task", type=int, default=20, help="test and paraphrase prompts per task")
    ap.add_argument(
        "--peers-python", type=Path, default=PEERS_PYTHON, help="the interpreter of the peers' venv (make peers)"
    )
    ap.add_argument("--merge-rounds", type=int, default=3, help="merges: merges of each method on each side")
    ap.add_argument("--arrow-repeats", type=int, default=5, help="arrow: timed generations of each mixture")
    ap.add_argument("--gateway-rounds", type=int, default=3, help="gateway: rounds of every path at c1 and c16")
    ap.add_argument("--gateway-seconds", type=int, default=10, help="gateway: seconds of each wrk run")
    ap.add_argument("--short", action="store_true", help="a few prompts and seconds: checks that it runs")
    ap.add_argument("--only", action="append", choices=list(COMPARISONS), help="run this comparison only (repeatable)")
    args = ap.parse_args()
    if args.short:
        args.n_per_task = 2
    if not args.peers_python.exists():
        raise SystemExit(f"no peers' venv at {args.peers_python}: run `make peers` (or pass --peers-python)")
    print(f"Machine: {machine()}; load {load()}")
    for name in args.only or COMPARISONS:
        COMPARISONS[name](args, args.peers_python)


if __name__ == "__main__":
    main()
