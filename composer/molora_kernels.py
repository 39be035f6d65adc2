"""CPU kernels of the MoLoRA layer, compiled by numba: per-token top-k routing and the sparse
low-rank products, in the manner of punica's BGMV (one pass per token and picked expert).

Why kernels: at a decode step (batch 16, top-2 of 8, the small zoo's widths) the mixture's own
arithmetic is small, and done with PyTorch ops it is dominated by their dispatch (some 40 ops per
decoder layer) or, done densely over every expert, by 4 × the products it needs. Here a group of
sibling layers routes its tokens in one call, and each layer adds its picked experts' products to
its base output in one more. Both read plain float32 arrays (``Tensor.numpy()`` views, no copies)
and release the GIL. ``composer/molora.py`` uses them for CPU inference and keeps its PyTorch path
for autograd and other devices; the tests compare the two.

Compiled on first use (about 1.5 s) and cached by numba next to this file, or in its user-wide
cache where this folder is read-only; where neither can be written, compiled in every process.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numba
import numpy as np


def _compiled(fn: Callable) -> Callable:
    try:
        return numba.njit(cache=True, fastmath=True, nogil=True)(fn)
    except RuntimeError:  # numba found no writable cache location (a read-only install)
        return numba.njit(fastmath=True, nogil=True)(fn)


@_compiled
def route(x, keys, standardise, eps, temperature, bias, seq, present, k, idx, w, p):  # pragma: no cover - compiled
    """Top-k mixture weights of every token for every member of a group.

    x [T, d] the input; keys [G, N, d] routing vectors (standardised gates: LN(v)/√d, else v);
    standardise: score LN(x)·key (PHATGOOSE family) or |x·key| (Arrow); temperature divides the
    scores; bias [rows, N] is added to every token of a row (GLIDER's α·global score; rows = 0:
    none), a row being ``seq`` consecutive tokens; present [G, N] marks the experts that adapt each
    member (the others are never picked). Writes idx / w [T, G, k] (the kept experts, best first,
    and their softmax over the kept scores) and p [T, G, N] (w scattered, zero elsewhere).
    """
    T, d = x.shape
    G, N, _ = keys.shape
    xs = np.empty(d, dtype=np.float32)
    z = np.empty(N, dtype=np.float32)
    for t in range(T):
        if standardise:  # LayerNorm without affine, as nn.LayerNorm(elementwise_affine=False)
            mean = np.float32(0.0)
            for i in range(d):
                mean += x[t, i]
            mean /= d
            var = np.float32(0.0)
            for i in range(d):
                var += (x[t, i] - mean) * (x[t, i] - mean)
            inv = np.float32(1.0 / math.sqrt(var / d + eps))
            for i in range(d):
                xs[i] = (x[t, i] - mean) * inv
        else:
            for i in range(d):
                xs[i] = x[t, i]
        for g in range(G):
            for n in range(N):
                s = np.float32(0.0)
                for i in range(d):
                    s += xs[i] * keys[g, n, i]
                if not standardise:
                    s = abs(s)
                if temperature != 1.0:
                    s = s / temperature
                if bias.shape[0] > 0:
                    s += bias[t // seq, n]
                z[n] = s if present[g, n] else -np.inf
                p[t, g, n] = 0.0
            for j in range(k):  # selection of the k largest: k and N are small
                best = -1
                for n in range(N):
                    taken = False
                    for jj in range(j):
                        if idx[t, g, jj] == n:
                            taken = True
                    if not taken and (best < 0 or z[n] > z[best]):
                        best = n
                idx[t, g, j] = best
                w[t, g, j] = z[best]
            top = w[t, g, 0]
            total = np.float32(0.0)
            for j in range(k):
                e = np.float32(math.exp(w[t, g, j] - top))  # an absent expert's -inf gives 0
                w[t, g, j] = e
                total += e
            for j in range(k):
                w[t, g, j] /= total
            for j in range(k):
                p[t, g, idx[t, g, j]] += w[t, g, j]


@_compiled
def add_products(y, x, A, B, idx, w, g):  # pragma: no cover - compiled
    """y [T, d_out] += Σ_j w[t, g, j] · B_e (A_e x_t), e = idx[t, g, j]: member g's picked experts
    only. A [N, R, d_in] (scale folded in), B [N, R, d_out].

    Four rows of A (and of B) per pass: x_t is read once for four dot products, and y_t once for
    four rank-one updates; LLVM vectorises each inner loop. 25-30 % faster than a row at a time at
    the small zoo's widths."""
    T, d_in = x.shape
    R = A.shape[1]
    d_out = y.shape[1]
    k = idx.shape[2]
    ah = np.empty(R, dtype=np.float32)
    R4 = R - R % 4
    for t in range(T):
        for j in range(k):
            e = idx[t, g, j]
            wt = w[t, g, j]
            if wt == 0.0:
                continue
            for r in range(0, R4, 4):
                s0 = s1 = s2 = s3 = np.float32(0.0)
                for i in range(d_in):
                    xi = x[t, i]
                    s0 += A[e, r, i] * xi
                    s1 += A[e, r + 1, i] * xi
                    s2 += A[e, r + 2, i] * xi
                    s3 += A[e, r + 3, i] * xi
                ah[r], ah[r + 1], ah[r + 2], ah[r + 3] = s0 * wt, s1 * wt, s2 * wt, s3 * wt
            for r in range(R4, R):
                s = np.float32(0.0)
                for i in range(d_in):
                    s += A[e, r, i] * x[t, i]
                ah[r] = s * wt
            for r in range(0, R4, 4):
                a0, a1, a2, a3 = ah[r], ah[r + 1], ah[r + 2], ah[r + 3]
                for o in range(d_out):
                    y[t, o] += a0 * B[e, r, o] + a1 * B[e, r + 1, o] + a2 * B[e, r + 2, o] + a3 * B[e, r + 3, o]
            for r in range(R4, R):
                a = ah[r]
                for o in range(d_out):
                    y[t, o] += a * B[e, r, o]
