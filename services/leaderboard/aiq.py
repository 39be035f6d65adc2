"""RouterBench's cost-quality frontier and AIQ (Hu et al. 2024, "RouterBench", §3.2).

A point is (cost per query, accuracy). Mixing two operating points at random per query reaches
every point on the segment between them, and paying more for the same accuracy is always
possible, so what a system can reach is bounded by the *non-decreasing convex hull* of its points:
the upper concave envelope from the cheapest point up to the most accurate one, flat after it.

``aiq(points, cost_range)`` is the area under that frontier over ``cost_range`` divided by the
range's width: 1/(c_max − c_min) ∫ R̃(c) dc. Below the cheapest point nothing is reachable (the
frontier is 0 there); a zero-width range gives the frontier's value at that cost. The leaderboard
evaluates every strategy's frontier over one shared cost range, so AIQs compare (docs/leaderboard.md
says which points make a strategy's frontier).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from itertools import pairwise

Point = tuple[float, float]


def frontier(points: Iterable[Sequence[float]]) -> list[Point]:
    """The vertices of the non-decreasing convex hull, by increasing cost (ends at the most accurate
    point; the frontier is flat after its last vertex)."""
    best: dict[float, float] = {}
    for c, a in points:
        c, a = float(c), float(a)
        if math.isnan(c) or math.isnan(a):
            raise ValueError("frontier: points must not be NaN")
        best[c] = max(a, best.get(c, a))
    pts = sorted(best.items())
    if not pts:
        return []
    # Andrew's monotone chain, upper half: drop a vertex that lies on or below the chord of its
    # neighbours (cross product >= 0 means a non-right turn, i.e. not concave there)
    hull: list[Point] = []
    for p in pts:
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) >= 0:
            hull.pop()
        hull.append(p)
    top = max(range(len(hull)), key=lambda i: (hull[i][1], -i))  # the cheapest most-accurate vertex
    return hull[: top + 1]


def _cross(o: Point, a: Point, b: Point) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def value_at(hull: Sequence[Point], cost: float) -> float:
    """The frontier's accuracy at ``cost`` (0 below its cheapest point, flat after its last)."""
    if not hull or cost < hull[0][0]:
        return 0.0
    for (c0, a0), (c1, a1) in pairwise(hull):
        if c0 <= cost <= c1:
            return a0 + (a1 - a0) * (cost - c0) / (c1 - c0)
    return hull[-1][1]


def aiq(points: Iterable[Sequence[float]], cost_range: tuple[float, float] | None = None) -> float:
    """Area under the non-decreasing convex hull of ``points``, normalised over ``cost_range``
    (default: the points' own cost range)."""
    pts = [(float(c), float(a)) for c, a in points]
    hull = frontier(pts)
    if not hull:
        raise ValueError("aiq: no points")
    lo, hi = cost_range if cost_range is not None else (hull[0][0], max(c for c, _ in pts))
    if hi < lo:
        raise ValueError(f"aiq: cost range ({lo}, {hi}) is reversed")
    if hi == lo:
        return value_at(hull, lo)
    # the frontier is piecewise linear: integrate it exactly, piece by piece, over [lo, hi]
    knots = sorted({lo, hi, *(c for c, _ in hull if lo < c < hi)})
    area = 0.0
    for x0, x1 in pairwise(knots):
        if x1 <= hull[0][0]:  # nothing is reachable below the cheapest point
            continue
        area += (x1 - x0) * (value_at(hull, x0) + value_at(hull, x1)) / 2
    return area / (hi - lo)
