"""Issue 17's targets, read from a stored leaderboard run of the domains suite.

    moerge leaderboard run --suite domains          # after `moerge zoo build --suite domains --size small --register`
    python bench/domains_targets.py [--run ID]      # default: the newest run of suite `domains`

Prints each row the issue names with its measured value and whether it meets the target:
- test split (single-domain documents): the tokenwise mixtures (PHATGOOSE, Arrow, average
  activation, GLIDER) within 5 % of the per-document oracle's loss (``moe/oracle``), and below the
  base's and the uniform merge's (``moe/task-arithmetic``); the query-level routers (classifier,
  semantic, retrieval) within 2 %;
- mixed split: every tokenwise mixture below every query-level router and the best single
  expert; the best one's share of the gap from the best query-level router to the per-segment
  oracle (target ≥ 50 %);
- merges (task arithmetic, TIES, DARE of every adapter): the share of the oracle's gain over the
  base on the test split (target ≥ 50 %).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from registry.service import Registry  # noqa: E402
from services.leaderboard.board import build_board, nats_per_token  # noqa: E402

TOKENWISE = ("moe/phatgoose", "moe/arrow", "moe/average-activation", "moe/glider")
QUERY_LEVEL = ("moe/classifier", "moe/semantic", "moe/retrieval")
MERGES = ("moe/task-arithmetic", "moe/ties", "moe/dare")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=int, default=None)
    args = ap.parse_args()
    with Registry() as registry:
        board = build_board(registry, args.run, None if args.run else "domains")
    rows = {r["entry"]: r for r in board.rows}

    def loss(entry: str, split: str) -> float | None:
        return nats_per_token(rows[entry]["splits"].get(split)) if entry in rows else None

    out: list[tuple[str, str, str, bool | None]] = []  # (row, measured, target, met)

    def check(label: str, measured: str, target: str, met: bool | None) -> None:
        out.append((label, measured, target, met))

    oracle, base, uniform = loss("moe/oracle", "test"), loss("moe/base", "test"), loss("moe/task-arithmetic", "test")
    experts = [e for e, r in rows.items() if r["kind"] == "expert"]
    for entry in TOKENWISE:
        value = loss(entry, "test")
        if value is None or oracle is None:
            check(f"{entry} test", "not in the run", "≤ oracle + 5 %", None)
            continue
        below = (base is None or value < base) and (uniform is None or value < uniform)
        check(
            f"{entry} test",
            f"{value:.3f} ({value / oracle - 1:+.1%} vs oracle {oracle:.3f})",
            "≤ +5 %, below base and uniform merge",
            value <= oracle * 1.05 and below,
        )
    for entry in QUERY_LEVEL:
        value = loss(entry, "test")
        if value is None or oracle is None:
            check(f"{entry} test", "not in the run", "≤ oracle + 2 %", None)
            continue
        check(f"{entry} test", f"{value:.3f} ({value / oracle - 1:+.1%})", "≤ +2 %", value <= oracle * 1.02)

    mixed = {e: loss(e, "mixed") for e in rows}
    ran_tokenwise = [e for e in TOKENWISE if mixed.get(e) is not None]
    ran_query = [e for e in QUERY_LEVEL if mixed.get(e) is not None]
    best_expert = min(experts, key=lambda e: mixed[e] or float("inf")) if experts else None
    segment = mixed.get("oracle:per-segment")
    for entry in ran_tokenwise:
        rivals = [*ran_query, *([best_expert] if best_expert else [])]
        worst_gap = min((mixed[r] - mixed[entry] for r in rivals), default=None)  # type: ignore[operator]
        check(
            f"{entry} mixed",
            f"{mixed[entry]:.3f} (best rival by {worst_gap:+.3f})" if worst_gap is not None else f"{mixed[entry]:.3f}",
            "below every query-level router and the best single expert",
            worst_gap is not None and worst_gap > 0,
        )
    if ran_tokenwise and ran_query and segment is not None:
        best = min(ran_tokenwise, key=lambda e: mixed[e])  # type: ignore[arg-type, return-value]
        best_query = min(ran_query, key=lambda e: mixed[e])  # type: ignore[arg-type, return-value]
        gap = mixed[best_query] - segment  # type: ignore[operator]
        share = (mixed[best_query] - mixed[best]) / gap if gap > 0 else float("nan")  # type: ignore[operator]
        check(
            f"best tokenwise ({best}) mixed",
            f"{share:.0%} of the gap from {best_query} ({mixed[best_query]:.3f}) to the per-segment oracle ({segment:.3f})",
            "≥ 50 %",
            share >= 0.5,
        )
    for entry in MERGES:
        value = loss(entry, "test")
        if value is None or oracle is None or base is None:
            check(f"{entry} test", "not in the run", "≥ 50 % of the oracle's gain", None)
            continue
        share = (base - value) / (base - oracle)
        check(f"{entry} test", f"{value:.3f} ({share:.0%} of the oracle's gain)", "≥ 50 %", share >= 0.5)

    run = board.run
    print(f"leaderboard run {run['id']} ({run['suite']}, {run['base_model']}; {run['settings'].get('machine', '?')})\n")
    print("| row | measured | target | met |")
    print("|---|---|---|---|")
    for label, measured, target, met in out:
        print(f"| {label} | {measured} | {target} | {'–' if met is None else ('yes' if met else '**no**')} |")


if __name__ == "__main__":
    main()
