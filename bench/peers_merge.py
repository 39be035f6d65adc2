"""moerge's merges against mergekit's, on the same base and LoRA adapters.

The same random Llama base (hidden 128, 2 layers) and 4 rank-8 LoRA adapters on all seven linear
projections (``tests/factories.py``), built here. Each method runs once per round on each side:

- **moerge**: ``composer.merge.merge_adapters`` (peft's ``add_weighted_adapter`` in ΔW space),
  weights 1.0, ``svd_rank`` = the modules' full rank (128), so that the re-factored adapter holds
  the merged ΔW exactly and the comparison sees the merge, not a truncation. Its ΔW is
  scale · B @ A of the merged adapter.
- **mergekit** (peers' venv, ``bench/peers/mergekit_worker.py``): the same method over
  ``base+adapter`` models (mergekit applies each LoRA itself), weights 1.0, its defaults otherwise.
  Its ΔW is the merged model's weight − the base's.

Compared: the largest |ΔW_moerge − ΔW_mergekit| over every routed module, relative to the largest
|ΔW|, and the time of one merge (moerge: load, merge, SVD, write the adapter; mergekit: apply the
LoRAs, merge, write the model). TIES at weight 1 has the same definition on both sides (magnitude
top-k, sign elected by the summed mass, the mean of the agreeing entries), so it must agree to
float32 rounding. DARE draws random masks, and the two rescale the kept entries differently
(peft: 1 / density; mergekit: the tensor's L1 norm restored), so no two DARE merges are equal: for
DARE the table shows how far each lands from the task-arithmetic sum instead.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
N_ADAPTERS, RANK, HIDDEN, FULL_RANK = 4, 8, 128, 128
METHODS = (("task_arithmetic", None), ("ties", 0.5), ("dare_linear", 0.5), ("dare_ties", 0.5))


def deltas_of_adapter(path: Path) -> dict[str, torch.Tensor]:
    from routers.tokenwise import read_lora_factors

    return {m: (f.scale * f.B.double() @ f.A.double()) for m, f in read_lora_factors(path).items()}


def deltas_of_model(path: Path, base: dict[str, torch.Tensor], modules) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    merged: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        merged.update(load_file(str(shard)))
    untouched = [k for k in base if not any(k == f"{m}.weight" for m in modules)]
    moved = max((merged[k] - base[k]).abs().max().item() for k in untouched)
    if moved > 0:
        raise SystemExit(f"mergekit changed a tensor no adapter touches (max {moved:.2e})")
    return {m: merged[f"{m}.weight"].double() - base[f"{m}.weight"].double() for m in modules}


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(max |a − b|, that ÷ max |b|) over every module."""
    diff = max((a[m] - b[m]).abs().max().item() for m in b)
    scale = max(b[m].abs().max().item() for m in b)
    return diff, diff / scale


def relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(((a[m] - b[m]) ** 2).sum().item() for m in b)
    return (num / sum((b[m] ** 2).sum().item() for m in b)) ** 0.5


def merges(args, peers_python: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from safetensors.torch import load_file

    from bench.peer_worker import Worker
    from composer.merge import merge_adapters
    from tests.factories import make_tiny_base, make_tiny_lora

    rounds = 1 if args.short else args.merge_rounds
    work = Path(tempfile.mkdtemp(prefix="moerge-peers-merge-"))
    worker = Worker(peers_python, "mergekit_worker.py")
    try:
        base = make_tiny_base(work / "base", hidden_size=HIDDEN, layers=2)
        adapters = {
            f"a{i}": make_tiny_lora(base, work / f"a{i}", seed=200 + i, r=RANK, scale=0.05) for i in range(N_ADAPTERS)
        }
        base_weights = load_file(str(base / "model.safetensors"))
        each = {name: deltas_of_adapter(path) for name, path in adapters.items()}
        modules = sorted(next(iter(each.values())))
        task_sum = {m: sum(d[m] for d in each.values()) for m in modules}

        def ours(method: str, density: float | None, out_dir: Path):
            return merge_adapters(
                base,
                adapters,
                [1.0] * N_ADAPTERS,
                method=method,
                density=density,
                out_dir=out_dir,
                svd_rank=FULL_RANK,
                seed=0,
            )

        def theirs(method: str, density: float | None, out: Path) -> dict:
            return worker.ask(
                merge={
                    "method": method,
                    "base": str(base),
                    "adapters": [str(p) for p in adapters.values()],
                    "weight": 1.0,
                    "density": density,
                    "seed": 0,
                    "out": str(out),
                }
            )

        ours("task_arithmetic", None, work / "warm-up")  # imports and first-call costs, on both sides
        theirs("task_arithmetic", None, work / "warm-up-mergekit")
        rows = []
        for method, density in METHODS:
            ours_s, theirs_s = [], []
            for r in range(rounds):
                t0 = time.perf_counter()
                merged = ours(method, density, work / f"moerge-{r}")  # a fresh cache each round: every round merges
                ours_s.append(time.perf_counter() - t0)
                out = work / f"mergekit-{method}-{r}"
                theirs_s.append(theirs(method, density, out)["seconds"])
            ours_delta = deltas_of_adapter(merged.path)
            theirs_delta = deltas_of_model(out, base_weights, modules)
            diff, rel = largest_difference(ours_delta, theirs_delta)
            rows.append(
                (
                    method,
                    density,
                    diff,
                    rel,
                    relative_distance(ours_delta, task_sum),
                    relative_distance(theirs_delta, task_sum),
                    statistics.median(ours_s),
                    statistics.median(theirs_s),
                )
            )
    finally:
        worker.close()
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\n## Merges: {N_ADAPTERS} rank-{RANK} LoRA adapters on a random Llama (hidden {HIDDEN}, 2 layers), "
        f"mergekit {worker.hello['version']}\n"
    )
    print(f"Weights 1.0, density as shown; times are the median of {rounds} round(s).\n")
    print(
        "| method | density | max abs ΔW difference | ÷ max abs ΔW | moerge from the TA sum | "
        "mergekit from the TA sum | moerge s | mergekit s | mergekit ÷ moerge time |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for method, density, diff, rel, d_ours, d_theirs, t_ours, t_theirs in rows:
        print(
            f"| {method} | {density if density is not None else '—'} | {diff:.2e} | {rel:.2e} | "
            f"{d_ours:.3f} | {d_theirs:.3f} | {t_ours:.2f} | {t_theirs:.2f} | {t_theirs / t_ours:.2f} |"
        )
    print('\n("from the TA sum": ‖ΔW − Σ ΔW_i‖ / ‖Σ ΔW_i‖ over every module; DARE\'s masks are random on both sides)')
