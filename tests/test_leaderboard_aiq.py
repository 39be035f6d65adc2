"""RouterBench's AIQ on hand-made points: the non-decreasing convex hull and its normalised area."""

from __future__ import annotations

import pytest

from services.leaderboard.aiq import aiq, frontier, value_at


def test_two_points_give_the_triangle_under_their_chord():
    assert aiq([(0, 0), (1, 1)]) == pytest.approx(0.5)
    assert frontier([(1, 1), (0, 0)]) == [(0.0, 0.0), (1.0, 1.0)]


def test_points_below_the_hull_change_nothing():
    hull_only = aiq([(0, 0.2), (2, 1.0)])
    assert aiq([(0, 0.2), (2, 1.0), (1, 0.5), (1.5, 0.7)]) == pytest.approx(hull_only)
    assert frontier([(0, 0.2), (2, 1.0), (1, 0.5)]) == [(0.0, 0.2), (2.0, 1.0)]


def test_a_point_above_the_chord_lifts_the_frontier():
    # (0, .5) -> (.5, 1) then flat to cost 1: 0.5·0.75 + 0.5·1
    assert aiq([(0, 0.5), (1, 0.5), (0.5, 1.0)]) == pytest.approx(0.875)
    assert frontier([(0, 0.5), (1, 0.5), (0.5, 1.0)]) == [(0.0, 0.5), (0.5, 1.0)]


def test_paying_more_never_lowers_the_frontier():
    # the costly, worse point (2, .5) is dominated: the frontier stays at 1.0 after cost 1
    points = [(0, 0.2), (1, 1.0), (2, 0.5)]
    assert frontier(points) == [(0.0, 0.2), (1.0, 1.0)]
    assert value_at(frontier(points), 2.0) == 1.0
    assert aiq(points) == pytest.approx((0.6 + 1.0) / 2)


def test_the_convex_hull_bridges_a_concave_dip():
    # (1, .3) lies below the chord from (0, 0) to (2, 1): it is not a vertex
    points = [(0, 0), (1, 0.3), (2, 1.0), (3, 1.0)]
    assert frontier(points) == [(0.0, 0.0), (2.0, 1.0)]
    assert aiq(points) == pytest.approx((1.0 + 1.0) / 3)


def test_ties_in_cost_keep_the_best_accuracy():
    assert frontier([(1, 0.2), (1, 0.6), (2, 0.4)]) == [(1.0, 0.6)]


def test_a_shared_cost_range_counts_nothing_below_the_cheapest_point():
    # reachable only from cost 1: [0, 1) adds 0, [1, 2] adds (0.5 + 1) / 2
    assert aiq([(1, 0.5), (2, 1.0)], (0, 2)) == pytest.approx(0.375)
    # and the frontier continues flat past its last point
    assert aiq([(1, 1.0)], (0, 4)) == pytest.approx(0.75)


def test_single_point_and_zero_width_range():
    assert aiq([(3, 0.7)]) == pytest.approx(0.7)
    assert aiq([(1, 0.2), (2, 0.9)], (1.5, 1.5)) == pytest.approx(0.55)


def test_cheaper_and_better_scores_higher():
    experts = [(1.0, 0.2), (1.2, 0.3)]
    good = aiq([(1.0, 0.9), *experts], (1.0, 3.0))
    costly = aiq([(3.0, 0.9), *experts], (1.0, 3.0))
    alone = aiq(experts, (1.0, 3.0))
    assert good > costly > alone


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="no points"):
        aiq([])
    with pytest.raises(ValueError, match="reversed"):
        aiq([(0, 1)], (2, 1))
    with pytest.raises(ValueError, match="NaN"):
        aiq([(float("nan"), 1)])
