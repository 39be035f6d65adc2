"""The leaderboard end to end on the micro zoo: ``moerge leaderboard run`` stores a run and prints
its table and report; its numbers are ``evaluate``'s / ``moerge eval``'s; the same seed reproduces
them; grouped and naive execution answer alike; user suites with every metric; and the gateway's
``GET /leaderboard`` page in a real headless Chromium (a missing browser fails, never skips)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from composer.engine_protocol import GenerateRequest, ScoreRequest
from registry.service import Registry
from services.gateway import GatewaySettings, LocalBackend, create_app
from services.leaderboard.board import build_board
from services.leaderboard.runner import LeaderboardRunner
from services.leaderboard.store import ALL, save_run
from services.leaderboard.suites import import_suite, load_queries
from services.moe.evaluate import evaluate
from services.moe.pool import ExpertPool
from services.moe.strategies import MoE
from services.zoo.register import register_zoo
from services.zoo.skills import make_split
from tests.browser import PageParts, chromium
from tests.servers import serve

STRATEGIES = ["moe/oracle", "moe/random", "moe/base", "moe/semantic", "moe/skill-k3-vote", "moe/arrow", "moe/stitch"]
N = 2  # queries per task and split: 16 test, 16 paraphrase, 12 composition
DETERMINISTIC = (
    "n",
    "correct",
    "accuracy",
    "skipped",
    "routed",
    "routing_accuracy",
    "mean_experts",
    "prompt_tokens",
    "completion_tokens",
    "cost",
    "per_task",
    "confusion",
)
ARTIFACTS = Path(os.environ.get("MOERGE_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, check=False)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def home(micro_zoo, tmp_path_factory) -> Iterator[Path]:
    """A MOERGE_HOME (this module only) whose registry holds the micro zoo."""
    home = tmp_path_factory.mktemp("leaderboard-home")
    saved = {k: os.environ.get(k) for k in ("MOERGE_HOME", "MOERGE_DATABASE_URL", "MOERGE_ARTIFACTS")}
    for k in saved:
        os.environ.pop(k, None)
    os.environ["MOERGE_HOME"] = str(home)
    with Registry() as reg:
        register_zoo(micro_zoo, reg)
    yield home
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def cli_run(home) -> dict:
    """One `moerge leaderboard run` through the CLI, as a user types it."""
    out = cli("leaderboard", "run", "--strategies", ",".join(STRATEGIES), "--n-per-task", str(N), "--seed", "0")
    with Registry() as reg:
        run = reg.get_leaderboard_run()
        rows = {(r.entry, r.split): r for r in reg.get_leaderboard_results(run.id)}
    return {"stdout": out.stdout, "run": run, "rows": rows}


def test_cli_run_prints_the_table_and_the_report_path(cli_run, micro_zoo):
    lines = cli_run["stdout"].strip().splitlines()
    assert lines[-1].startswith("report: ")
    report = Path(lines[-1].removeprefix("report: "))
    assert report.is_file() and report.suffix == ".html"
    html = report.read_text()
    assert "<script src" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")  # offline
    table = cli_run["stdout"]
    for entry in STRATEGIES:
        assert entry in table
    for expert in micro_zoo.experts:
        assert expert.name in table
    run = cli_run["run"]
    assert (run.suite, run.seed, run.n_per_task, run.splits) == ("skills", 0, N, ["test", "paraphrase", "composition"])
    entries = {e for e, _ in cli_run["rows"]}
    assert entries == set(STRATEGIES) | {f"expert:{e.name}" for e in micro_zoo.experts}
    assert cli_run["rows"][("moe/oracle", "test")].n == 8 * N


def test_numbers_are_those_of_evaluate(cli_run, home):
    """Every stored (entry, split) equals `evaluate` on a fresh MoE with the same arguments."""
    moe = MoE(ExpertPool(Registry()), seed=0)
    for (entry, split), row in sorted(cli_run["rows"].items()):
        if split == ALL:
            continue
        random_router = moe.router("random")
        random_router.reset()  # a fresh `moerge eval` starts the seeded draw anew
        report = evaluate(entry, "skills", split, moe=moe, n_per_task=N, seed=0)
        assert (row.n, row.accuracy) == (report.n, pytest.approx(report.accuracy)), (entry, split)
        assert row.routing_accuracy == (
            pytest.approx(report.routing_accuracy) if report.routing_accuracy is not None else None
        ), (entry, split)
        assert row.mean_experts == pytest.approx(report.mean_experts), (entry, split)
        assert row.prompt_tokens == sum(r.prompt_tokens for r in report.records), (entry, split)
        assert row.completion_tokens == sum(r.completion_tokens for r in report.records), (entry, split)


def test_numbers_are_those_of_moerge_eval(cli_run):
    """`moerge eval` itself, on the second split (the seeded random router must start afresh there)."""
    for strategy, split in (("moe/random", "paraphrase"), ("expert:skill-reverse", "composition")):
        out = cli("eval", "--strategy", strategy, "--split", split, "--n-per-task", str(N), "--seed", "0")
        printed = out.stdout.strip().splitlines()[-1]
        assert printed == f"accuracy={cli_run['rows'][(strategy, split)].accuracy:.4f}"


def test_the_pooled_row_adds_up_the_splits(cli_run):
    for entry in {e for e, _ in cli_run["rows"]}:
        parts = [cli_run["rows"][(entry, s)] for s in ("test", "paraphrase", "composition")]
        pooled = cli_run["rows"][(entry, ALL)]
        assert pooled.n == sum(p.n for p in parts)
        assert pooled.correct == sum(p.correct for p in parts)
        assert pooled.cost == pytest.approx(sum(p.cost for p in parts))
        assert pooled.routed == sum(p.routed for p in parts)


def test_the_same_seed_reproduces_the_same_numbers(cli_run, home):
    """A second run (new process state: routers loaded from their stored artifacts) stores the
    same numbers; only timings may differ."""
    with Registry() as reg:
        runner = LeaderboardRunner(reg, seed=0)
        again = save_run(reg, runner.run("skills", strategies=STRATEGIES, n_per_task=N))
        rows = {(r.entry, r.split): r for r in reg.get_leaderboard_results(again.id)}
    assert set(rows) == set(cli_run["rows"])
    for key, row in rows.items():
        first = cli_run["rows"][key]
        assert {c: getattr(row, c) for c in DETERMINISTIC} == {c: getattr(first, c) for c in DETERMINISTIC}, key
    # and the seed does change what is asked
    with Registry() as reg:
        assert load_queries(reg, "skills", ["test"], N, seed=1) != load_queries(reg, "skills", ["test"], N, seed=0)


def test_grouped_and_naive_give_the_same_answers(home):
    with Registry() as reg:
        runner = LeaderboardRunner(reg, seed=0)
        kwargs = {
            "strategies": ["moe/oracle", "moe/random", "moe/skill-k3-vote"],
            "experts": ["skill-reverse", "domain-math"],
            "splits": ["test", "composition"],
            "n_per_task": N,
        }
        grouped = runner.run("skills", mode="grouped", **kwargs)
        naive = runner.run("skills", mode="naive", **kwargs)
    assert grouped.results.keys() == naive.results.keys()
    for key, part in grouped.results.items():
        other = naive.results[key]
        assert [o.prediction for o in part.outcomes] == [o.prediction for o in other.outcomes], key
        assert [o.experts for o in part.outcomes] == [o.experts for o in other.outcomes], key


def test_a_user_suite_with_every_metric(home, tmp_path):
    """Exact match, contains and multiple choice (log-likelihood through the engine's `score`):
    what the leaderboard stores equals what the engine says when asked directly."""
    reverse = make_split("test", 3, seed=5, skills=["reverse"])
    maxes = make_split("test", 3, seed=5, skills=["max"])
    rows = [{"prompt": e.prompt, "reference": e.reference, "task": "reverse", "split": "gen"} for e in reverse]
    rows += [
        {"prompt": e.prompt, "reference": e.reference[:2], "task": "reverse", "split": "gen", "metric": "contains"}
        for e in make_split("test", 3, seed=6, skills=["reverse"])
    ]
    rows += [
        {
            "prompt": e.prompt,
            "reference": e.reference,
            "task": "max",
            "split": "mc",
            "metric": "multiple_choice",
            "choices": sorted({e.reference, e.input[0], e.input[-1], "0"}),
        }
        for e in maxes
    ]
    path = tmp_path / "suite.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with Registry() as reg:
        import_suite(reg, "mine", path)
        runner = LeaderboardRunner(reg, seed=0)
        out = runner.run(
            "mine",
            strategies=["moe/oracle", "moe/skill-k3-vote"],
            experts=["skill-reverse", "skill-max", "domain-math"],
        )
        stored = save_run(reg, out)
        board = build_board(reg, stored.id)
    assert out.splits == ["gen", "mc"]
    engine = runner.pool.engine
    queries = load_queries(Registry(), "mine")
    for expert in ("skill-reverse", "skill-max"):
        gen = queries["gen"]
        budget = max(len(q.reference) + 4 if q.metric == "exact_match" else 64 for q in gen)
        answers = engine.generate([GenerateRequest(q.prompt, expert, budget) for q in gen])
        expected = sum(
            (a.text.strip() == q.reference) if q.metric == "exact_match" else (q.reference.lower() in a.text.lower())
            for q, a in zip(gen, answers)
        )
        assert out.results[(f"expert:{expert}", "gen")].summary()["correct"] == expected
        mc = queries["mc"]
        picks = []
        for q in mc:
            scores = engine.score([ScoreRequest(q.prompt, c, expert) for c in q.choices])
            picks.append(q.choices[max(range(len(scores)), key=lambda j: (scores[j].logprob, -j))])
        mine = out.results[(f"expert:{expert}", "mc")]
        assert [o.prediction for o in mine.outcomes] == picks
        assert mine.summary()["correct"] == sum(p == q.reference for p, q in zip(picks, mc))
    # the oracle routes multiple choice to an expert trained on the gold task, which scores the
    # choices exactly as it does alone; a vote cannot score choices and skips them
    oracle_mc = out.results[("moe/oracle", "mc")]
    [chosen] = {o.chosen for o in oracle_mc.outcomes}
    assert (
        oracle_mc.skipped == 0 and "max" in runner._trained[chosen] and oracle_mc.summary()["routing_accuracy"] == 1.0
    )
    alone = out.results[(f"expert:{chosen}", "mc")]
    assert [o.prediction for o in oracle_mc.outcomes] == [o.prediction for o in alone.outcomes]
    vote = {r["entry"]: r for r in board.rows}["moe/skill-k3-vote"]
    assert vote["splits"]["mc"]["skipped"] == 3 and vote["splits"]["mc"]["n"] == 0
    assert board.value(vote, "acc_mc") is None


# ------------------------------------------------------------------------------------ the page


def test_the_gateway_page_renders_in_chromium(cli_run, home):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with Registry() as reg:
        run = reg.get_leaderboard_run()
        results = reg.get_leaderboard_results(run.id)
        app = create_app(LocalBackend(reg), reg, GatewaySettings(require_keys=True))
        with serve(app) as url:
            dom = chromium("--dump-dom", f"{url}/leaderboard").stdout
            shot = ARTIFACTS / "leaderboard.png"
            shot.unlink(missing_ok=True)
            chromium(f"--screenshot={shot}", "--window-size=1400,2600", "--hide-scrollbars", f"{url}/leaderboard")
            data = httpx.get(f"{url}/v1/leaderboard").json()
            assert httpx.get(f"{url}/v1/models").status_code == 401  # keys are on; the board needs none
            missing = httpx.get(f"{url}/v1/leaderboard", params={"run": 10_000})
            assert missing.status_code == 404 and "no leaderboard run 10000" in missing.json()["error"]["message"]
            assert httpx.get(f"{url}/leaderboard", params={"run": 10_000}).status_code == 404
            runs = httpx.get(f"{url}/v1/leaderboard/runs").json()["data"]
    (ARTIFACTS / "leaderboard.html").write_text(dom)

    page = PageParts()
    page.feed(dom)
    assert page.ready == "1"  # the page's script ran to its end
    db_entries = list(dict.fromkeys(r.entry for r in results))
    assert page.rows == db_entries  # one table row per DB entry, in the DB's order
    assert page.plots[:2] == ["plot-accuracy", "plot-frontier"] and page.heatmaps >= 1
    split_rows = [r for r in results if r.split != ALL]
    assert page.bars == sum(1 for r in split_rows if r.n)
    assert page.points == sum(1 for r in results if r.split == ALL and r.n)
    assert page.frontiers == 1 + sum(1 for r in results if r.split == ALL and r.kind == "strategy" and r.n)
    # laid out by the browser with a size: the three plots shown (one heatmap at a time), every bar
    # (a zero is a hairline) and every point
    assert page.drawn == {"plots": 3, "bars": page.bars, "points": page.points}
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000

    assert [r["entry"] for r in data["rows"]] == db_entries
    pooled = {r.entry: r for r in results if r.split == ALL}
    for row in data["rows"]:
        assert row["values"]["acc_all"] == pytest.approx(pooled[row["entry"]].accuracy)
    assert runs[0]["id"] == run.id
