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

# Reassociation lets LLVM vectorise the dot products' sums, contraction fuse multiply-adds; the
# other fast-math flags stay off (no assumptions about NaN or infinities in the inputs).
_FASTMATH = {"reassoc", "contract"}


def _compiled(fn: Callable) -> Callable:
    try:
        return numba.njit(cache=True, fastmath=_FASTMATH, nogil=True)(fn)
    except RuntimeError:  # numba found no writable cache location (a read-only install)
        return numba.njit(fastmath=_FASTMATH, nogil=True)(fn)


@_compiled
def route(x, keys, standardise, absolute, eps, temperature, bias, seq, present, k, idx, w, p):  # pragma: no cover
    """Top-k mixture weights of every token for every member of a group.

    The gate's formula comes as its fields (``routers.tokenwise.Gate.kernel_args``), never its
    name: x [T, d] the input; keys [G, N, d] routing vectors as ``Gate.keys`` made them
    (standardised gates: LN(v)/√d, else v); standardise: score LN(x)·key (LayerNorm eps ``eps``;
    the PHATGOOSE family), else x·key; absolute: take |score| (Arrow); temperature divides the
    scores; bias [rows, N] is added to every token of a row (a gate's α·global term, GLIDER's;
    rows = 0: none), a row being ``seq`` consecutive tokens; present [G, N] marks the experts that
    adapt each member (the others are never picked). Writes idx / w [T, G, k] (the kept experts,
    best first, and their softmax over the kept scores; idx -1 with weight 0 where fewer than k
    are present) and p [T, G, N] (w scattered, zero elsewhere).
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
                if absolute:
                    s = abs(s)
                if temperature != 1.0:
                    s = s / temperature
                if bias.shape[0] > 0:
                    s += bias[t // seq, n]
                z[n] = s
                p[t, g, n] = 0.0
            for j in range(k):  # the k largest scores of the present experts: k and N are small
                best = -1
                for n in range(N):
                    if not present[g, n]:
                        continue
                    taken = False
                    for jj in range(j):
                        if idx[t, g, jj] == n:
                            taken = True
                    if not taken and (best < 0 or z[n] > z[best]):
                        best = n
                idx[t, g, j] = best  # -1: fewer than k experts adapt this member; weight 0
                w[t, g, j] = z[best] if best >= 0 else np.float32(0.0)
            top = w[t, g, 0]  # a group's member has at least one present expert
            total = np.float32(0.0)
            for j in range(k):
                if idx[t, g, j] >= 0:
                    e = np.float32(math.exp(w[t, g, j] - top))
                    w[t, g, j] = e
                    total += e
            for j in range(k):
                w[t, g, j] /= total
                if idx[t, g, j] >= 0:
                    p[t, g, idx[t, g, j]] += w[t, g, j]


@_compiled
def add_products(y, x, A, B, idx, w, g):  # pragma: no cover - compiled
    """y [T, d_out] += Σ_j w[t, g, j] · B_e (A_e x_t), e = idx[t, g, j]: member g's picked experts
    only. A [N, R, d_in] (scale folded in), B [N, R, d_out].

    The (token, expert) pairs go expert by expert, two tokens at a time: each row of A_e and B_e
    is read once for both, and four rows per pass read x_t and y_t once for four products. LLVM
    vectorises the inner loops. At the small zoo's widths this is 35-40 % faster than a pair at a
    time, and that 25-30 % faster than a row at a time."""
    N, R = A.shape[0], A.shape[1]
    tokens, weights, start = _pairs_by_expert(idx, w, g, N)
    ah = np.empty((2, R), dtype=np.float32)
    for e in range(N):
        for q in range(start[e], start[e + 1], 2):
            a = tokens[q]
            two = q + 1 < start[e + 1]
            b = tokens[q + 1] if two else a
            _shrink(x, A, e, a, b, weights[q], weights[q + 1] if two else np.float32(0.0), ah)
            _expand(y, B, e, a, b, two, ah)


@_compiled
def _pairs_by_expert(idx, w, g, N):  # pragma: no cover - compiled
    """Member g's (token, weight) pairs with a nonzero weight, grouped by expert (counting sort):
    expert e's are tokens[start[e]:start[e + 1]]."""
    T, _, k = idx.shape
    start = np.zeros(N + 1, dtype=np.int64)
    for t in range(T):
        for j in range(k):
            if idx[t, g, j] >= 0 and w[t, g, j] != 0.0:
                start[idx[t, g, j] + 1] += 1
    for e in range(N):
        start[e + 1] += start[e]
    fill = start[:N].copy()
    tokens = np.empty(start[N], dtype=np.int64)
    weights = np.empty(start[N], dtype=np.float32)
    for t in range(T):
        for j in range(k):
            e = idx[t, g, j]
            if e >= 0 and w[t, g, j] != 0.0:
                tokens[fill[e]] = t
                weights[fill[e]] = w[t, g, j]
                fill[e] += 1
    return tokens, weights, start


@_compiled
def _shrink(x, A, e, a, b, wa, wb, ah):  # pragma: no cover - compiled
    """ah[0] = wa · A_e x_a, ah[1] = wb · A_e x_b (b = a and wb = 0 for a lone token)."""
    R, d_in = A.shape[1], A.shape[2]
    R4 = R - R % 4
    for r in range(0, R4, 4):
        s0 = s1 = s2 = s3 = np.float32(0.0)
        u0 = u1 = u2 = u3 = np.float32(0.0)
        for i in range(d_in):
            xa, xb = x[a, i], x[b, i]
            a0, a1, a2, a3 = A[e, r, i], A[e, r + 1, i], A[e, r + 2, i], A[e, r + 3, i]
            s0 += a0 * xa
            s1 += a1 * xa
            s2 += a2 * xa
            s3 += a3 * xa
            u0 += a0 * xb
            u1 += a1 * xb
            u2 += a2 * xb
            u3 += a3 * xb
        ah[0, r], ah[0, r + 1], ah[0, r + 2], ah[0, r + 3] = s0 * wa, s1 * wa, s2 * wa, s3 * wa
        ah[1, r], ah[1, r + 1], ah[1, r + 2], ah[1, r + 3] = u0 * wb, u1 * wb, u2 * wb, u3 * wb
    for r in range(R4, R):
        s = u = np.float32(0.0)
        for i in range(d_in):
            s += A[e, r, i] * x[a, i]
            u += A[e, r, i] * x[b, i]
        ah[0, r], ah[1, r] = s * wa, u * wb


@_compiled
def _expand(y, B, e, a, b, two, ah):  # pragma: no cover - compiled
    """y_a += B_eᵀ ah[0], and y_b += B_eᵀ ah[1] when two."""
    R, d_out = B.shape[1], B.shape[2]
    R4 = R - R % 4
    for r in range(0, R4, 4):
        p0, p1, p2, p3 = ah[0, r], ah[0, r + 1], ah[0, r + 2], ah[0, r + 3]
        if two:
            q0, q1, q2, q3 = ah[1, r], ah[1, r + 1], ah[1, r + 2], ah[1, r + 3]
            for o in range(d_out):
                b0, b1, b2, b3 = B[e, r, o], B[e, r + 1, o], B[e, r + 2, o], B[e, r + 3, o]
                y[a, o] += p0 * b0 + p1 * b1 + p2 * b2 + p3 * b3
                y[b, o] += q0 * b0 + q1 * b1 + q2 * b2 + q3 * b3
        else:
            for o in range(d_out):
                y[a, o] += p0 * B[e, r, o] + p1 * B[e, r + 1, o] + p2 * B[e, r + 2, o] + p3 * B[e, r + 3, o]
    for r in range(R4, R):
        for o in range(d_out):
            y[a, o] += ah[0, r] * B[e, r, o]
            if two:
                y[b, o] += ah[1, r] * B[e, r, o]
