"""Tolerances for comparing two float32 computations of the same thing, on any CPU.

Two float32 paths that sum in another order (another kernel, another instruction set: AVX-512,
AVX2 or none) differ by rounding alone. The worst-case bound for a sum of n float32 terms is
n·ε·Σ|terms| (ε = 2⁻²³); a network's output goes through one such sum per matrix product on its
way. A fixed absolute tolerance holds on one CPU and fails on another, so the tolerance here
grows with the output's magnitude and the reductions along the path.
"""

from __future__ import annotations

import torch

EPS32 = torch.finfo(torch.float32).eps


def decoder_reductions(config) -> int:
    """The float32 terms summed on the way from the embeddings to a logit of a Llama-style
    decoder: per layer q/k/v (hidden), the attention scores (head_dim) and their weighted sum
    (positions, bounded by the context), o (hidden), gate/up (hidden) and down (intermediate);
    then the LM head (hidden)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    per_layer = 3 * hidden + head_dim + config.max_position_embeddings + inter
    return config.num_hidden_layers * per_layer + hidden


def assert_close_float32(actual: torch.Tensor, expected: torch.Tensor, reductions: int) -> None:
    """``actual`` equals ``expected`` up to float32 rounding over ``reductions`` summed terms,
    relative to the largest magnitude of either."""
    scale = max(float(expected.abs().max()), float(actual.abs().max()), 1.0)
    tol = reductions * EPS32 * scale
    diff = float((actual.float() - expected.float()).abs().max())
    assert diff <= tol, (
        f"max |difference| {diff:.3g} over the float32 bound {tol:.3g} ({reductions} terms × ε × {scale:.3g})"
    )
