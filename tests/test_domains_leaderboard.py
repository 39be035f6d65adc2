"""The domains zoo on the leaderboard: its documents registered as the text suite ``domains``, and
every expert and strategy scored by held-out loss (nats per token) on the test and mixed splits,
through the same engines that answer queries; ``moerge eval`` prints the same numbers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.browser import PageParts, chromium

pytestmark = pytest.mark.slow

STRATEGIES = [
    "moe/oracle",
    "moe/base",
    "moe/best-single",
    "moe/task-arithmetic",
    "moe/phatgoose",
    "moe/python-merged",
    "moe/skill-k3-vote",
]


@pytest.fixture(scope="module")
def domains_home(micro_domains_zoo, tmp_path_factory):
    """A home with the micro domains zoo registered, and one leaderboard run on its suite."""
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("domains-home")
    mp.setenv("MOERGE_HOME", str(home))
    mp.delenv("MOERGE_DATABASE_URL", raising=False)
    mp.delenv("MOERGE_ARTIFACTS", raising=False)
    from registry.service import Registry
    from services.leaderboard.runner import LeaderboardRunner
    from services.leaderboard.store import save_run
    from services.zoo.register import register_zoo

    with Registry() as registry:
        register_zoo(micro_domains_zoo, registry)
        # a merge of one expert alone: what that expert scores, through the merge composer
        registry.add_strategy("python-merged", "all", "merge", experts=["dom-python"])
        registry.add_strategy("quick-phatgoose", "phatgoose", "mixture", router_params={"steps": 10})
        runner = LeaderboardRunner(registry)
        outcome = runner.run("domains", strategies=STRATEGIES)
        run = save_run(registry, outcome)
        yield home, run.id, runner
    mp.undo()


def _board(run_id):
    from registry.service import Registry
    from services.leaderboard.board import build_board

    with Registry() as registry:
        return build_board(registry, run_id)


def test_every_expert_and_strategy_gets_a_loss_on_both_splits(domains_home, micro_domains_zoo):
    _, run_id, _ = domains_home
    board = _board(run_id)
    rows = {r["entry"]: r for r in board.rows}
    experts = {f"expert:{e.name}" for e in micro_domains_zoo.experts}
    scored = experts | set(STRATEGIES) - {"moe/skill-k3-vote"} | {"oracle:per-segment"}
    assert set(rows) == scored | {"moe/skill-k3-vote"}
    for entry in scored:
        for split in ("test", "mixed"):
            value = board.value(rows[entry], f"loss_{split}")
            assert value is not None and 0 < value < math.log(512), (entry, split)  # below uniform over the vocab
    # a vote composes generated answers: it has no loss, and says so
    vote = rows["moe/skill-k3-vote"]
    assert board.value(vote, "loss_all") is None and vote["all"]["skipped"] == vote["all"]["n"] + vote["all"]["skipped"]
    # a text suite has no answers to judge: no accuracy columns, loss columns instead
    keys = [c.key for c in board.columns]
    assert "acc_all" not in keys and "aiq" not in keys
    assert {"loss_test", "loss_mixed", "loss_all", "ppl", "loss_gap"} <= set(keys)
    # each expert is lowest on its own domain among the single experts of that domain
    test = {e: rows[e]["splits"]["test"]["loss"]["labels"] for e in experts}
    for e in micro_domains_zoo.experts:
        if e.kind == "adapter" and len(e.domains) == 1:
            d = e.domains[0]
            base = rows["moe/base"]["splits"]["test"]["loss"]["labels"][d]
            assert test[f"expert:{e.name}"][d][0] / test[f"expert:{e.name}"][d][1] < base[0] / base[1]


def test_oracles_and_a_one_expert_merge_agree_with_the_experts_rows(domains_home):
    _, run_id, _ = domains_home
    rows = {r["entry"]: r for r in _board(run_id).rows}

    def per_token(entry, split):
        labels = rows[entry]["splits"][split]["loss"]["labels"]
        return sum(n for n, _ in labels.values()) / sum(t for _, t in labels.values())

    # single-domain documents: each segment's gold expert is its document's
    assert per_token("oracle:per-segment", "test") == pytest.approx(per_token("moe/oracle", "test"), rel=1e-6)
    # the merge of dom-python alone is dom-python (peft's merge at weight 1), scored by the merge composer
    for split in ("test", "mixed"):
        assert per_token("moe/python-merged", split) == pytest.approx(per_token("expert:dom-python", split), rel=1e-4)
    # the oracle routes each single-domain document to its gold expert
    assert rows["moe/oracle"]["all"]["routing_accuracy"] == 1.0


def test_best_single_is_the_expert_lowest_on_the_validation_documents(domains_home, micro_domains_zoo):
    """On documents, best-single ranks the experts by held-out loss on the shared validation
    documents (exact match would put them all at 0), and its row is its expert's."""
    from composer.engine_protocol import ScoreRequest
    from routers.base import RouteRequest
    from services.moe.texts import fitting_prefix

    _, run_id, runner = domains_home
    moe = runner.moe
    decision = moe.router_for(moe.strategy("moe/best-single")).route(RouteRequest("x"))
    losses = decision.info["losses"]
    assert set(losses) == {e.name for e in micro_domains_zoo.experts}
    documents = moe.validation_pool()
    assert documents and all(not e.reference for e in documents)
    best = decision.top
    assert best == min(losses, key=losses.get)  # one tokenizer: per byte and per token rank alike
    pool = runner.pool
    # each cut to what the base scores in one pass, as the leaderboard cuts a suite's documents
    texts = [fitting_prefix(pool.tokenizer, e.prompt, pool.context - 1) for e in documents]
    assert any(t != e.prompt for t, e in zip(texts, documents))  # the micro zoo's are longer than its context
    scored = pool.engine.score([ScoreRequest("", t, best) for t in texts])
    direct = -sum(r.logprob for r in scored) / sum(r.num_tokens for r in scored)
    assert losses[best] == pytest.approx(direct, abs=1e-4)  # rounded to 4 places in the decision
    assert len(set(losses.values())) > 1  # the experts differ on them: the pick is not a tie
    rows = {r["entry"]: r for r in _board(run_id).rows}
    for split in ("test", "mixed"):
        mine, theirs = (rows[e]["splits"][split]["loss"]["labels"] for e in ("moe/best-single", f"expert:{best}"))
        assert mine.keys() == theirs.keys()
        for label, (nats, tokens) in mine.items():  # batched otherwise: float32's last bits may differ
            assert tokens == theirs[label][1] and nats == pytest.approx(theirs[label][0], rel=1e-5)


def test_the_loss_is_transformers_own_on_the_same_text(domains_home, micro_domains_zoo):
    """Each test document's nats, summed, as ``model(ids, labels=ids).loss`` gives them with the
    expert's adapter on the base: the leaderboard's number for expert:dom-python."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from registry.service import Registry
    from services.leaderboard.suites import load_queries
    from services.leaderboard.text_scores import TextQuery

    _, run_id, runner = domains_home
    m = micro_domains_zoo
    tok = AutoTokenizer.from_pretrained(str(m.path_of(m.base.path)))
    base = AutoModelForCausalLM.from_pretrained(str(m.path_of(m.base.path))).eval()
    model = PeftModel.from_pretrained(base, str(m.path_of(m.expert("dom-python").path))).eval()
    with Registry() as registry:
        [queries] = load_queries(registry, "domains", ["test"]).values()
    nats = tokens = 0.0
    with torch.no_grad():
        for q in queries:
            [(_, text)] = runner.texts.document(TextQuery(q.segments, q.task))
            ids = torch.tensor([tok(text)["input_ids"]])
            assert ids[0, 0] == tok.bos_token_id
            n = ids.shape[1] - 1
            nats += model(input_ids=ids, labels=ids).loss.item() * n
            tokens += n
    row = next(r for r in _board(run_id).rows if r["entry"] == "expert:dom-python")
    labels = row["splits"]["test"]["loss"]["labels"]
    assert sum(t for _, t in labels.values()) == tokens
    assert sum(n for n, _ in labels.values()) / tokens == pytest.approx(nats / tokens, rel=1e-5)


def test_eval_prints_the_leaderboard_s_loss_and_the_report_plots_it(domains_home):
    from typer.testing import CliRunner

    from services.cli import app

    _, run_id, _ = domains_home
    result = CliRunner().invoke(app, ["eval", "-s", "expert:dom-python", "--suite", "domains", "--split", "mixed"])
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("loss=")
    row = next(r for r in _board(run_id).rows if r["entry"] == "expert:dom-python")
    labels = row["splits"]["mixed"]["loss"]["labels"]
    assert float(last.removeprefix("loss=")) == pytest.approx(
        sum(n for n, _ in labels.values()) / sum(t for _, t in labels.values()), abs=1e-4
    )
    result = CliRunner().invoke(app, ["leaderboard", "report", "--run", str(run_id)])
    assert result.exit_code == 0, result.output
    path = Path(result.output.strip().splitlines()[-1])
    assert 'id="plot-loss"' in path.read_text(encoding="utf-8")
    # as a browser lays it out: the table, and one loss bar per entry and split that has a loss
    page = PageParts()
    page.feed(chromium("--dump-dom", path.as_uri()).stdout)
    board = _board(run_id)
    assert page.ready == "1" and page.rows == [r["entry"] for r in board.rows]
    # no accuracy or cost-accuracy plots: no answer was judged; the routers' confusion heatmaps
    # (gold task against chosen expert) stay, one shown at a time
    assert page.plots[0] == "plot-loss" and page.plots[1:] == ["heatmap"] * page.heatmaps and page.heatmaps >= 1
    losses = sum(board.value(r, f"loss_{sp}") is not None for r in board.rows for sp in ("test", "mixed"))
    assert page.bars == losses > 0 and page.drawn == {"plots": 2, "bars": losses, "points": 0}
