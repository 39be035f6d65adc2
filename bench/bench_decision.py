"""Router decision time of the MiniLM routers (classifier, semantic), before and after, in one run.

    python bench/bench_decision.py [--n-time 60] [--check-per-task 20] [--variants 1,2,1:bf16]
                                   [--before-rev 9335244]

*before* is ``routers/{embedder,semantic,classifier}.py`` as of ``--before-rev`` (``git show``,
imported as a separate package), *after* the working tree. Both share one copy of the MiniLM
weights, the same fitted artifacts and — for the classifier — the very same trained head, so any
difference in their decisions comes from how the forward pass is run, nothing else.

- **Decision time**: per query, after a warm-up, on prompts none of the routers was fitted on,
  with both embedding caches cleared before every query (a cached embedding would time a dict
  look-up); before and after alternate query by query so the shared machine slows both alike.
  Wall-clock p50/p95 (what ``MoE.route`` reports as ``router_ms``) and the calling thread's CPU
  time (``time.thread_time``: leaves out time spent waiting for a core on a busy machine).
- **Decisions**: the chosen expert of before and after on the suite's validation, test and
  paraphrase prompts; they must be identical. Routing accuracy: the chosen expert was trained on
  the prompt's task (as ``services.moe.evaluate`` counts it).

Experts come from the registered zoo (``ExpertPool(Registry())``), read only: the routers are fitted
in memory and nothing is written to the registry.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from machine import load, machine  # noqa: E402  (bench/machine.py; scripts run with bench/ on sys.path)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from routers.base import RouteRequest  # noqa: E402
from routers.classifier import ClassifierRouter  # noqa: E402
from routers.common import expert_tasks  # noqa: E402
from routers.embedder import Embedder  # noqa: E402
from routers.semantic import SemanticRouter  # noqa: E402

MODULES = ("embedder", "semantic", "classifier")


def routers_at(rev: str):
    """The three modules as of ``rev``, as package ``routers_before`` (None without git or rev)."""
    pkg = Path(tempfile.mkdtemp()) / "routers_before"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in MODULES:
        try:
            src = subprocess.run(
                ["git", "show", f"{rev}:routers/{name}.py"], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout
        except (OSError, subprocess.CalledProcessError):
            return None
        (pkg / f"{name}.py").write_text(src.replace("routers.embedder", "routers_before.embedder"))
    sys.path.insert(0, str(pkg.parent))
    return {name: importlib.import_module(f"routers_before.{name}") for name in MODULES}


def parse_variants(spec: str) -> list[tuple[str, dict]]:
    """ "1,1:onnx-int8,1:torch,1:bf16" -> after variants: Embedder(query_threads=n) on its default
    query path (ONNX fp32, or ``onnx``), on ONNX with int8 weight matmuls (``onnx-int8``), on the
    PyTorch path (``torch``), or on PyTorch with bf16 matmuls (``bf16``)."""
    out = []
    for item in spec.split(","):
        threads, _, dtype = item.partition(":")
        kw = {"query_threads": int(threads)}
        if dtype in ("torch", "onnx", "onnx-int8"):
            kw["query_backend"] = dtype
        elif dtype:
            kw["query_dtype"] = getattr(torch, {"bf16": "bfloat16"}.get(dtype, dtype))
        out.append((f"after ({threads} thr{', ' + dtype if dtype else ''})", kw))
    return out


def build(experts, before_mods, after: list[tuple[str, dict]]):
    """Routers per kind and variant: the ``after`` variants, then "before"; all share the first
    embedder's weights, the same artifacts and the same classifier head."""
    first = Embedder(**after[0][1])
    first.model  # noqa: B018 - load the weights once, here
    clf0, sem0 = ClassifierRouter(embedder=first), SemanticRouter(embedder=first)
    artifacts = {
        kind: {e.name: r.add_expert(e) for e in experts} for kind, r in (("classifier", clf0), ("semantic", sem0))
    }
    clf0.retrain()
    variants = {after[0][0]: (first, clf0, sem0)}
    makers = [(name, lambda kw=kw: (Embedder(**kw), ClassifierRouter, SemanticRouter)) for name, kw in after[1:]]
    if before_mods is not None:
        makers.append(
            (
                "before",
                lambda: (
                    before_mods["embedder"].Embedder(),
                    before_mods["classifier"].ClassifierRouter,
                    before_mods["semantic"].SemanticRouter,
                ),
            )
        )
    for name, make in makers:
        emb, clf_cls, sem_cls = make()
        emb._st = first._st  # the same weights
        clf, sem = clf_cls(embedder=emb), sem_cls(embedder=emb)
        for kind, router in (("classifier", clf), ("semantic", sem)):
            for e in experts:
                router.load_expert(e, artifacts[kind][e.name])
        clf.head, clf.labels, clf._stale = clf0.head, clf0.labels, False  # the same head
        variants[name] = (emb, clf, sem)
    return variants


def chosen(decision) -> str:
    return decision.experts[0][0] if decision.experts else "(base)"


def time_decisions(routers, embedders, prompts: list[str], warmup: int = 5) -> list[dict]:
    """Per variant, wall and CPU ms of each query; the variants take turns query by query."""
    for p in prompts[:warmup]:
        for r in routers:
            r.route(RouteRequest(p))
    out = [{"wall": [], "cpu": []} for _ in routers]
    for p in prompts[warmup:]:
        for i, r in enumerate(routers):
            for e in embedders:
                e.clear_cache()
            t0, c0 = time.perf_counter(), time.process_time()
            r.route(RouteRequest(p))
            out[i]["wall"].append((time.perf_counter() - t0) * 1e3)
            out[i]["cpu"].append((time.process_time() - c0) * 1e3)
    return out


def p50_p95(values: list[float]) -> str:
    q = statistics.quantiles(values, n=100, method="inclusive")
    return f"{statistics.median(values):.1f} / {q[94]:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-time", type=int, default=60, help="timed queries per router (after 5 warm-up)")
    ap.add_argument("--check-per-task", type=int, default=20, help="prompts per task and split for the decision check")
    ap.add_argument("--before-rev", default="9335244", help="git revision of the routers to compare ('' skips)")
    ap.add_argument("--threads", type=int, default=0, help="process intra-op threads (0: torch's default)")
    ap.add_argument(
        "--variants",
        default="1",
        help="after variants, comma-separated: n (query_threads), n:onnx, n:onnx-int8, "
        "n:torch or n:bf16 (and query_dtype=torch.bfloat16); the first is the default",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from registry.service import Registry
    from services.moe.evaluate import load_suite
    from services.moe.pool import ExpertPool

    before_mods = routers_at(args.before_rev) if args.before_rev else None
    experts = list(ExpertPool(Registry()).experts.values())
    t0 = time.perf_counter()
    variants = build(experts, before_mods, parse_variants(args.variants))
    names = list(variants)
    embedders = [v[0] for v in variants.values()]
    print(f"Machine: {machine()}")
    print(f"Experts: {len(experts)}; routers fitted in {time.perf_counter() - t0:.0f} s")

    # a seed the fitting did not use: fresh inputs
    timing_prompts = [e.prompt for e in load_suite("skills", "test", 8, seed=12345)][: args.n_time + 5]
    check = [
        e for split in ("validation", "test", "paraphrase") for e in load_suite("skills", split, args.check_per_task)
    ]
    check_prompts = [e.prompt for e in check]
    trained = {e.name: set(expert_tasks(e)) for e in experts}  # routing is right if trained on the task

    print(f"\nDecision time per query (ms), {args.n_time} queries, embedding cache cleared before each:\n")
    print("| router | variant | wall p50 / p95 | CPU p50 / p95 | load avg |")
    print("|---|---|---:|---:|---|")
    for k, kind in ((1, "classifier"), (2, "semantic")):
        start = load()
        res = time_decisions([v[k] for v in variants.values()], embedders, timing_prompts)
        end = load()
        for name, r in zip(names, res):
            print(f"| {kind} | {name} | {p50_p95(r['wall'])} | {p50_p95(r['cpu'])} | {start} → {end} |", flush=True)

    if len(names) > 1:
        print(
            f"\nDecisions on {len(check_prompts)} suite prompts (validation, test, paraphrase), against {names[-1]}:\n"
        )
        for k, kind in ((1, "classifier"), (2, "semantic")):
            ref = [chosen(variants[names[-1]][k].route(RouteRequest(p))) for p in check_prompts]
            for name in names[:-1]:
                got = [chosen(variants[name][k].route(RouteRequest(p))) for p in check_prompts]
                moved = [(ex, a, b) for ex, a, b in zip(check, got, ref) if a != b]
                hits = [sum(ex.task in trained.get(c, ()) for ex, c in zip(check, picks)) for picks in (got, ref)]
                print(
                    f"- {kind}, {name}: {len(check) - len(moved)}/{len(check)} identical; routing accuracy "
                    f"{hits[0]}/{len(check)} vs {hits[1]}/{len(check)}"
                )
                for ex, a, b in moved[:5]:
                    print(f"    {ex.prompt!r} (task {ex.task}): {a} instead of {b}")


if __name__ == "__main__":
    main()
