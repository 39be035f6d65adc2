"""One decoder layer's MoLoRA work, group by group: the CPU kernels against the PyTorch path.

    python bench/bench_molora_kernels.py [--repeats 300] [--experts 8] [--rank 32] [--top-k 2]
                                         [--hidden 128] [--intermediate 384] [--threads 1]

A Llama-shaped layer of random ``nn.Linear`` s (q/k/v/o: hidden → hidden, gate/up: hidden →
intermediate, down: intermediate → hidden; the small zoo's widths by default) with N random
rank-R experts on all seven in ``composer/molora.py``'s ``MoLoRA``, PHATGOOSE gates (random
vectors). Each group is called as a decoder layer calls it: q, k and v on one tensor, o alone,
gate and up on one tensor, down alone; for a decode step of batch 16 (16 tokens) and for the
prefill of 16 prompts of 42 tokens (672). Variants, timed alternately, median µs per group call:

- *base*: no mixture active (the seven base linears alone);
- *pytorch*: the mixture through PyTorch ops (``molora._USE_KERNELS = False``: what autograd and
  GPUs run) — dense over every expert;
- *kernels*: the mixture through the numba kernels (what CPU inference runs).

The extra time of a mixture is the variant minus *base*.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from machine import machine  # noqa: E402  (bench/machine.py; scripts run with bench/ on sys.path)
from torch import nn

from composer import molora
from routers.base import MixtureSpec
from routers.tokenwise import LoraFactors

GROUPS = {
    "q/k/v": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate/up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


class Layer(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, name, nn.Linear(hidden, hidden, bias=False))
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.mlp.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.mlp.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def module(self, name: str) -> nn.Module:
        return getattr(self.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else self.mlp, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    layer = Layer(args.hidden, args.intermediate).eval()
    mix = molora.MoLoRA(layer)
    names = [f"e{i}" for i in range(args.experts)]
    modules = {
        f"{'self_attn' if n in GROUPS['q/k/v'] + GROUPS['o'] else 'mlp'}.{n}": n
        for group in GROUPS.values()
        for n in group
    }
    for e in names:
        factors, gates = {}, {}
        for path, n in modules.items():
            lin = layer.module(n)
            A = torch.randn(args.rank, lin.in_features, generator=gen) * 0.05
            B = torch.randn(lin.out_features, args.rank, generator=gen) * 0.05
            factors[path] = LoraFactors(A, B, 1.0)
            gates[path] = torch.randn(lin.in_features, generator=gen)
        mix.add_expert(e, factors, {"phatgoose": gates})
    spec = MixtureSpec("bench", names, "phatgoose", top_k=args.top_k)

    print(f"Machine: {machine()}; torch threads {args.threads}")
    print(
        f"{args.experts} experts × rank {args.rank}, top-{args.top_k}, hidden {args.hidden}, "
        f"intermediate {args.intermediate}; median µs per group call over {args.repeats} repeats\n"
    )
    print("| group | tokens | base | pytorch (extra) | kernels (extra) |\n|---|---:|---:|---:|---:|")
    totals: dict[int, list[float]] = {}
    for tokens in (16, 672):
        rows = tokens // 16
        for label, members in GROUPS.items():
            lins = [layer.module(n) for n in members]
            h = torch.randn(16, rows, lins[0].in_features, generator=gen)

            def call(lins=lins, h=h) -> None:
                for lin in lins:
                    lin(h)

            times: dict[str, list[float]] = {"base": [], "pytorch": [], "kernels": []}
            repeats = max(20, args.repeats * 16 // tokens)
            with torch.inference_mode():
                for i in range(repeats + 5):
                    for variant in times:
                        molora._USE_KERNELS = variant == "kernels"
                        if variant != "base":
                            mix.activate(spec, record_stats=False)
                        t0 = time.perf_counter()
                        call()
                        dt = time.perf_counter() - t0
                        mix.deactivate()
                        if i >= 5:  # warm-up (and the kernels' compilation)
                            times[variant].append(dt * 1e6)
            med = {k: statistics.median(v) for k, v in times.items()}
            total = totals.setdefault(tokens, [0.0, 0.0, 0.0])
            for j, k in enumerate(times):
                total[j] += med[k]
            print(
                f"| {label} | {tokens} | {med['base']:.1f} | {med['pytorch']:.1f} (+{med['pytorch'] - med['base']:.1f}) "
                f"| {med['kernels']:.1f} (+{med['kernels'] - med['base']:.1f}) |"
            )
    for tokens, (b, p, k) in totals.items():
        print(f"| whole layer | {tokens} | {b:.1f} | {p:.1f} (+{p - b:.1f}) | {k:.1f} (+{k - b:.1f}) |")
    molora._USE_KERNELS = True


if __name__ == "__main__":
    main()
