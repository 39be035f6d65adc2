"""Throughput of the tokenwise mixture (MoLoRA, N experts, top-k) against one merged adapter.

    python bench/bench_mixture.py [--repeats 9] [--batch 16] [--new-tokens 32] [--threads 1]
                                  [--widths 512,1024] [--layers 4] [--before-rev 9335244]

Models:
- ``small-zoo``: the registered small zoo (``ExpertPool(Registry())``: its base and its LoRA
  adapters; ``--zoo DIR`` reads a zoo folder instead), the size the target is stated for;
- ``--widths``: random Llama bases of that hidden size (``tests/factories.py``, ``--layers``
  layers, intermediate 2 × hidden) with ``--experts`` random rank-``--rank`` adapters on all seven
  projections: the ratio against width, for context.

Variants, timed alternately within every repeat (so a busy machine slows all alike), one warm-up
round first, medians over the repeats:
- *single*: one of the adapters merged into the base weights (peft ``merge_and_unload``): a
  plain model, no extra work at all — the reference of the ratios;
- *served*: the same adapter as the hf engine serves it in merge mode (a ``PeftModel`` with the
  adapter merged: the LoRA layers stay in place and only call their base layer), for context;
- *mixture*: every adapter in the MoLoRA layer of ``composer/molora.py``, top-k routing per
  token and module, routing statistics recorded as the ``mixture`` composer does;
- *before*: the same with the MoLoRA layer as of ``--before-rev`` (``git show``), when git has it.

Gate vectors are random (seeded): the mixture computes every expert's low-rank product for every
token and then weights them, so its cost does not depend on which experts the gate picks; the
greedy outputs of *mixture* and *before* are compared as a check that both compute the same.
Every generate call is forced to exactly ``--new-tokens`` tokens (``min_new_tokens``), so all
variants run the same number of forward passes. tok/s = batch × new tokens ÷ wall seconds; the
CPU-time ratio (``time.process_time``) is printed too: on a shared machine it is the steadier of
the two, since time spent waiting for a core is left out.
"""

from __future__ import annotations

import argparse
import importlib.util
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.factories from a checkout

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from composer import molora  # noqa: E402
from routers.base import MixtureSpec  # noqa: E402
from routers.tokenwise import read_lora_factors  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def molora_at(rev: str):
    """composer/molora.py as of ``rev``, imported under another name; None without git or rev."""
    try:
        src = subprocess.run(
            ["git", "show", f"{rev}:composer/molora.py"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / "molora_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("molora_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["molora_before"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def prompts(n: int) -> list[str]:
    from services.moe.evaluate import load_suite

    return [e.prompt for e in load_suite("skills", "test", 4)][:n]


def small_zoo(zoo: str | None) -> tuple[Path, list[Path]]:
    if zoo:
        root = Path(zoo)
        experts = sorted(p for p in (root / "experts").iterdir() if (p / "adapter_config.json").is_file())
        return root / "base", experts
    from registry.service import Registry
    from services.moe.pool import ExpertPool

    pool = ExpertPool(Registry())
    return pool.base_path, [Path(p) for _, p in sorted(pool.adapters().items())]


def random_zoo(root: Path, hidden: int, layers: int, experts: int, rank: int) -> tuple[Path, list[Path]]:
    from tests.factories import make_tiny_base, make_tiny_lora

    base = make_tiny_base(root / f"base-{hidden}", hidden_size=hidden, layers=layers)
    # small factors: random ones at scale 0.5 blow the activations up at these widths
    adapters = [
        make_tiny_lora(base, root / f"lora-{hidden}-{i}", seed=i + 1, r=rank, scale=0.02) for i in range(experts)
    ]
    return base, adapters


def bench_model(label: str, base_dir: Path, adapters: list[Path], texts: list[str], args, before) -> dict:
    tok = AutoTokenizer.from_pretrained(base_dir)
    batch = tok(texts, return_tensors="pt", padding=True)

    def fresh():
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()

    single = PeftModel.from_pretrained(fresh(), str(adapters[0])).merge_and_unload().eval()
    served = PeftModel.from_pretrained(fresh(), str(adapters[0])).eval()
    served.base_model.merge_adapter()  # what HFEngine(adapter_mode="merge") runs
    names = [p.name for p in adapters]
    factors = {n: read_lora_factors(p) for n, p in zip(names, adapters)}
    spec = MixtureSpec("bench", names, "phatgoose", top_k=min(args.top_k, len(names)))

    def install(module):
        model = fresh()
        mix = module.MoLoRA(model)
        gen = torch.Generator().manual_seed(0)
        for n in names:
            vectors = {m: torch.randn(f.A.shape[1], generator=gen) for m, f in factors[n].items()}
            mix.add_expert(n, factors[n], {"phatgoose": vectors})
        return model, mix

    def generate(model):
        with torch.inference_mode():
            return model.generate(
                **batch,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )

    def timed(model, mix=None):
        t0, c0 = time.perf_counter(), time.process_time()
        if mix is None:
            out = generate(model)
        else:
            with mix.routing(spec) as stats:
                out = generate(model)
            stats.per_expert()  # what the mixture composer reads after every batch
        assert out.shape[1] - batch["input_ids"].shape[1] == args.new_tokens
        return time.perf_counter() - t0, time.process_time() - c0, out

    variants = {"single": (single, None), "served": (served, None), "mixture": install(molora)}
    if before is not None:
        variants["before"] = install(before)
    same = None
    if before is not None:
        same = torch.equal(timed(*variants["mixture"])[2], timed(*variants["before"])[2])

    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    load_before = load()
    for i in range(args.repeats + 1):
        for name, (model, mix) in variants.items():
            w, c, _ = timed(model, mix)
            if i:  # round 0 is the warm-up
                wall[name].append(w)
                cpu[name].append(c)
    tokens = len(texts) * args.new_tokens
    cfg = single.config
    return {
        "label": label,
        "hidden": cfg.hidden_size,
        "layers": cfg.num_hidden_layers,
        "experts": f"{len(names)} × r{max(f.rank for fs in factors.values() for f in fs.values())}",
        "modules": len(variants["mixture"][1].layers),
        "tok_s": {k: tokens / statistics.median(v) for k, v in wall.items()},
        "cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
        "same": same,
        "load": f"{load_before} → {load()}",
    }


def report(rows: list[dict], args) -> str:
    lines = [
        f"Machine: {machine()}",
        (
            f"Batch {args.batch}, {args.new_tokens} new tokens (forced), greedy, top-{args.top_k}; medians of "
            f"{args.repeats} repeats after a warm-up, variants alternating within each repeat."
        ),
        "",
        (
            "| model | hidden × layers | experts × rank (modules) | single tok/s | served tok/s | mixture tok/s (÷ single) "
            "| mixture ÷ served | before tok/s (÷ single) | CPU-time ratio mixture / before | same tokens | load avg 1/5/15 min |"
        ),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        t, c = r["tok_s"], r["cpu_s"]
        ratio = {k: t[k] / t["single"] for k in t}
        cpu_ratio = {k: c["single"] / c[k] for k in c}
        before = f"{t['before']:.0f} ({ratio['before']:.2f})" if "before" in t else "–"
        cpu_before = f"{cpu_ratio['before']:.2f}" if "before" in c else "–"
        same = {None: "–", True: "yes", False: "no"}[r["same"]]
        lines.append(
            f"| {r['label']} | {r['hidden']} × {r['layers']} | {r['experts']} ({r['modules']}) | {t['single']:.0f} "
            f"| {t['served']:.0f} | {t['mixture']:.0f} ({ratio['mixture']:.2f}) | {t['mixture'] / t['served']:.2f} "
            f"| {before} | {cpu_ratio['mixture']:.2f} / {cpu_before} "
            f"| {same} | {r['load']} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--zoo", default=None, help="a zoo folder instead of the registered zoo")
    ap.add_argument("--skip-zoo", action="store_true")
    ap.add_argument("--widths", default="", help="comma-separated hidden sizes of random bases, e.g. 512,1024")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--before-rev", default="9335244", help="git revision of the MoLoRA layer to compare ('' skips)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    before = molora_at(args.before_rev) if args.before_rev else None
    texts = prompts(args.batch)
    rows = []
    if not args.skip_zoo:
        base, adapters = small_zoo(args.zoo)
        rows.append(bench_model("small zoo", base, adapters, texts, args, before))
        print(report(rows, args), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for width in [int(w) for w in args.widths.split(",") if w]:
            base, adapters = random_zoo(Path(tmp), width, args.layers, args.experts, args.rank)
            rows.append(bench_model(f"random {width}", base, adapters, texts, args, before))
            print(report(rows, args).splitlines()[-1], flush=True)
    print()
    print(report(rows, args))


if __name__ == "__main__":
    main()
