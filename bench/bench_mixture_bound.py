"""What bounds the tokenwise mixture's decode step on the small zoo: its matrix products alone.

    python bench/bench_mixture_bound.py [--tokens 16] [--experts 8] [--rank 32] [--top-k 2]

The small zoo's shapes (hidden 128, intermediate 384, 2 layers; 8 rank-32 experts on all seven
projections), one decode step of a batch of ``--tokens``, one torch thread:

1. the fp32 matmul rate at those shapes (GFLOP/s), against the base's own products;
2. every extra product the dense mixture does in one step (composer/molora.py: per group of
   layers one ``x @ A`` for all members and experts, per layer one ``(p · Ah) @ B``), back to back
   with their real weights: with the caches warm, and with the caches flushed before each step
   (the model's other weights evict them in a real step);
3. the sparse alternative for one group: only each token's top-k experts, through
   ``F.embedding_bag`` (a fused gather + weighted sum: A products as bags of A's rows weighted
   by x, B products as bags of B's rows weighted by Ah), against the dense products.

Medians of ``--repeats`` timings of ``--inner`` calls each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from machine import machine  # noqa: E402  (bench/machine.py)

HIDDEN, INTERMEDIATE, LAYERS = 128, 384, 2


def timed_us(fn, inner: int, repeats: int) -> float:  # noqa: ANN001
    for _ in range(inner // 10 + 1):
        fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        runs.append((time.perf_counter() - t0) / inner * 1e6)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    T, N, R, k, d, m = args.tokens, args.experts, args.rank, args.top_k, HIDDEN, INTERMEDIATE
    NR = N * R
    print(f"Machine: {machine()}; {T} tokens, {N} experts × rank {R}, top-{k}, 1 thread\n")

    # 1. rate at the decode shapes: (rows, inner, cols) of x @ W
    shapes = {
        "base q/k/v/o": (T, d, d),
        "base gate/up": (T, d, m),
        "base down": (T, m, d),
        "A of q/k/v (3 × N × R)": (T, d, 3 * NR),
        "B of one layer": (T, NR, d),
    }
    print("| product | µs | GFLOP/s |\n|---|---:|---:|")
    for name, (rows, inner, cols) in shapes.items():
        x, w = torch.randn(rows, inner), torch.randn(inner, cols)
        us = timed_us(lambda: x @ w, args.inner, args.repeats)  # noqa: B023
        print(f"| {name} [{rows}×{inner}]·[{inner}×{cols}] | {us:.1f} | {2 * rows * inner * cols / us / 1e3:.0f} |")

    # 2. every extra product of one decode step, with real (distinct) weights
    per_layer = [
        (d, 3 * NR),
        (NR, d),
        (NR, d),
        (NR, d),  # q/k/v group: one A, three B
        (d, NR),
        (NR, d),  # o
        (d, 2 * NR),
        (NR, m),
        (NR, m),  # gate/up group
        (m, NR),
        (NR, d),
    ]  # down
    weights = [torch.randn(i, o) for _ in range(LAYERS) for i, o in per_layer]
    inputs = {i: torch.randn(T, i) for i in {i for i, _ in per_layer}}
    base = [torch.randn(i, o) for _ in range(LAYERS) for i, o in [(d, d)] * 4 + [(d, m)] * 2 + [(m, d)]]
    flush = torch.randn(8 << 20)  # 32 MB: more than this CPU's L2 and its share of L3

    def extra() -> None:
        for w in weights:
            inputs[w.shape[0]] @ w

    def base_step() -> None:
        for w in base:
            inputs[w.shape[0]] @ w

    hot = timed_us(extra, args.inner // 10, args.repeats)
    flush_only = timed_us(lambda: flush.mul_(1.0), args.inner // 10, args.repeats)
    cold = timed_us(lambda: (flush.mul_(1.0), extra()), args.inner // 10, args.repeats) - flush_only
    base_us = timed_us(base_step, args.inner // 10, args.repeats)
    mb = sum(w.numel() for w in weights) * 4 / 1e6
    base_mb = sum(w.numel() for w in base) * 4 / 1e6
    macs = sum(T * w.shape[0] * w.shape[1] for w in weights)
    base_macs = sum(T * w.shape[0] * w.shape[1] for w in base)
    print(
        f"\none decode step, {LAYERS} layers: the base's products {base_us:.0f} µs ({base_macs / 1e6:.1f} M MACs, "
        f"{base_mb:.1f} MB of weights); the dense mixture's extra products {hot:.0f} µs with warm caches, "
        f"{cold:.0f} µs with flushed caches ({macs / 1e6:.1f} M MACs = {macs / base_macs:.1f} × the base's, "
        f"{mb:.1f} MB of factors)"
    )

    # 3. sparse (top-k only, embedding_bag) against dense, for the q/k/v group (G = 3 members)
    G = 3
    x = torch.randn(T, d)
    A = torch.randn(G, N, R, d)
    A_t = A.reshape(G * N * R, d).T.contiguous()
    A_rows = A.transpose(-1, -2).reshape(G * N * d, R).contiguous()  # row (g, e, j) = A[g, e, :, j]
    B = torch.randn(NR, d)
    idx = torch.randint(0, N, (T, G, k))
    offsets_a = torch.arange(0, T * G * k * d, d)
    cols = torch.arange(d)
    ah_dense = torch.randn(T, NR)
    ah_top = torch.randn(T, k * R)

    def a_indices() -> torch.Tensor:
        return (((torch.arange(G).view(1, G, 1) * N + idx) * d).unsqueeze(-1) + cols).view(-1)

    ind_a, w_a = a_indices(), x.unsqueeze(1).expand(T, G * k, d).reshape(-1)
    ind_b = (idx[:, 0, :].unsqueeze(-1) * R + torch.arange(R)).view(T, k * R)
    dense_a = (x @ A_t).view(T, G, N, R)
    sparse_a = F.embedding_bag(ind_a, A_rows, offsets_a, per_sample_weights=w_a, mode="sum").view(T, G, k, R)
    want = torch.gather(dense_a, 2, idx.unsqueeze(-1).expand(T, G, k, R))
    assert torch.allclose(sparse_a, want, atol=1e-4), "the sparse A products differ from the dense ones"
    rows = {
        "A, dense (all experts)": lambda: x @ A_t,
        "A, sparse: embedding_bag only": lambda: F.embedding_bag(
            ind_a, A_rows, offsets_a, per_sample_weights=w_a, mode="sum"
        ),
        "A, sparse: its indices": a_indices,
        "B of one member, dense": lambda: ah_dense @ B,
        "B of one member, sparse (embedding_bag)": lambda: F.embedding_bag(
            ind_b, B, per_sample_weights=ah_top, mode="sum"
        ),
    }
    print("\n| q/k/v group, one step | µs |\n|---|---:|")
    for name, fn in rows.items():
        print(f"| {name} | {timed_us(fn, args.inner, args.repeats):.1f} |")


if __name__ == "__main__":
    main()
