"""Strategies end to end on the micro zoo: the registry holds the zoo, routers fit through it,
composers answer on the hf engine, and ``evaluate`` / the CLI report what happened."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from registry.service import Registry
from services.moe.evaluate import evaluate, load_suite
from services.moe.pool import ExpertPool
from services.moe.strategies import STRATEGIES, MoE, Strategy
from services.zoo.register import register_zoo, registered_skills, zoo_base_name


@pytest.fixture(scope="session")
def zoo_home(micro_zoo, tmp_path_factory):
    """A MOERGE_HOME whose registry holds the micro zoo."""
    home = tmp_path_factory.mktemp("home")
    old = os.environ.get("MOERGE_HOME")
    os.environ["MOERGE_HOME"] = str(home)
    with Registry() as reg:
        register_zoo(micro_zoo, reg)
    yield home
    if old is None:
        os.environ.pop("MOERGE_HOME", None)
    else:
        os.environ["MOERGE_HOME"] = old


@pytest.fixture(scope="session")
def moe(zoo_home):
    return MoE(ExpertPool(Registry()))


def register_reverse_copy(micro_zoo) -> None:
    """One more expert: a copy of skill-reverse under another name (remove it when done)."""
    entry = micro_zoo.expert("skill-reverse")
    with Registry() as reg:
        reg.register_expert(
            "reverse-copy",
            "adapter",
            micro_zoo.path_of(entry.path),
            base=zoo_base_name(micro_zoo),
            domains=["text"],
            skills=["reverse"],
            examples=[
                {"prompt": "Reverse the string\nabc\nAnswer: ", "reference": "cba", "task": "reverse", "split": "train"}
            ],
        )


def test_pool_holds_every_zoo_expert(moe, micro_zoo):
    assert set(moe.pool.names()) == {e.name for e in micro_zoo.experts}
    assert moe.pool.base.name == zoo_base_name(micro_zoo)
    assert set(moe.pool.adapters()) == {e.name for e in micro_zoo.experts if e.kind == "adapter"}


def test_oracle_bounds_the_query_routers_on_held_in_tasks(moe):
    oracle = evaluate("moe/oracle", split="test", moe=moe, n_per_task=6)
    assert oracle.routing_accuracy == 1.0
    for name in ("moe/retrieval", "moe/random", "moe/base"):
        report = evaluate(name, split="test", moe=moe, n_per_task=6)
        assert report.accuracy <= oracle.accuracy, name
    assert evaluate("moe/base", split="test", moe=moe, n_per_task=6).mean_experts == 0


def test_expert_alone_matches_its_oracle_queries(moe):
    """An expert evaluated alone answers its own task exactly as the oracle's single composer does."""
    alone = evaluate("expert:skill-reverse", split="test", moe=moe, n_per_task=6)
    oracle = evaluate("moe/oracle", split="test", moe=moe, n_per_task=6)
    mine = [r.prediction for r in alone.records if r.task == "reverse"]
    routed = [r.prediction for r in oracle.records if r.task == "reverse"]
    assert mine == routed


def test_glider_with_alpha_zero_reproduces_phatgoose(moe):
    phatgoose = evaluate("moe/phatgoose", split="test", moe=moe, n_per_task=3)
    glider0 = Strategy("moe/glider-a0", "glider", "mixture", "GLIDER with α = 0", {"alpha": 0.0})
    glider = evaluate(glider0, split="test", moe=moe, n_per_task=3)
    assert [r.prediction for r in glider.records] == [r.prediction for r in phatgoose.records]


def test_stitch_records_one_segment_per_step(moe):
    report = evaluate("moe/stitch", split="composition", moe=moe, n_per_task=2)
    for record in report.records:
        segments = record.provenance["segments"]
        assert len(segments) == 2
        assert record.prediction.strip() == segments[-1]["text"].strip()


def test_a_strategy_honours_stop_and_top_p(moe):
    """The OpenAI parameters a client sends reach every generation a strategy makes: a stop
    string ends the answer before it, and top_p → 0 leaves only the most likely token, which
    turns even hot sampling back into the greedy answer."""
    prompts = [e.prompt for e in load_suite("skills", "test", 2)][:6]
    for name in ("moe/semantic", "moe/skill-k3-vote"):
        greedy = [c for c, _ in moe.run(name, prompts, max_new_tokens=12)]
        answered = [(p, c) for p, c in zip(prompts, greedy) if c.text]
        assert answered, f"{name}: no answer to cut"
        for prompt, whole in answered:
            stop = whole.text[-1]  # the answer is cut before this character's first occurrence
            [(cut, _)] = moe.run(name, [prompt], max_new_tokens=12, stop=[stop])
            assert cut.text == whole.text[: whole.text.index(stop)], name
            assert cut.finish_reason == "stop"

    def texts(**sampling) -> list[str]:
        return [c.text for c, _ in moe.run("moe/semantic", prompts, max_new_tokens=8, seed=3, **sampling)]

    greedy = texts()
    assert texts(temperature=5.0, top_p=1e-6) == greedy
    assert texts(temperature=5.0, top_p=1.0) != greedy  # hot sampling without the nucleus differs


def test_vote_reports_agreement(moe):
    report = evaluate("moe/skill-k3-vote", split="test", moe=moe, n_per_task=2)
    for record in report.records:
        agreement = record.provenance["agreement"]
        assert agreement is not None and agreement["entropy_bits"] >= 0
        assert 1 <= len(record.experts) <= 3


def test_a_new_expert_is_fitted_alone(zoo_home, micro_zoo, tmp_path):
    """Routing artifacts are stored: a second pool loads them instead of fitting again, and one
    more registered expert is the only one fitted."""
    first = MoE(ExpertPool(Registry()))
    first.router("semantic")
    second = MoE(ExpertPool(Registry()))
    second.router("semantic")
    assert second.fit_seconds["semantic"] == {}

    register_reverse_copy(micro_zoo)
    try:
        third = MoE(ExpertPool(Registry()))
        router = third.router("semantic")
        assert set(third.fit_seconds["semantic"]) == {"reverse-copy"}
        assert "reverse-copy" in router.names
    finally:
        with Registry() as reg:
            reg.remove_expert("reverse-copy")


def test_a_tokenwise_artifact_fitted_by_another_recipe_is_fitted_again(zoo_home):
    """Stored gate vectors carry their recipe: the same recipe loads them, a changed one refits."""
    params = {"max_examples": 4, "batch_size": 4}
    first = MoE(ExpertPool(Registry()))
    first.router("average-activation", params)
    experts = set(first.pool.names("adapter"))
    assert set(first.fit_seconds["average-activation:batch_size=4:max_examples=4"]) == experts
    again = MoE(ExpertPool(Registry()))
    again.router("average-activation", params)
    assert again.fit_seconds["average-activation:batch_size=4:max_examples=4"] == {}
    changed = MoE(ExpertPool(Registry()))
    changed.router("average-activation", {**params, "max_examples": 6})
    assert set(changed.fit_seconds["average-activation:batch_size=4:max_examples=6"]) == experts


def test_every_named_strategy_is_listed_by_the_cli(zoo_home):
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "strategies", "list", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert {s["name"] for s in json.loads(out.stdout)} == set(STRATEGIES)


def test_cli_eval_ends_with_accuracy_and_json_has_records(zoo_home):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "eval",
            "--strategy",
            "moe/oracle",
            "--split",
            "test",
            "--n-per-task",
            "2",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("accuracy=") and 0.0 <= float(last.split("=")[1]) <= 1.0

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "eval",
            "--strategy",
            "moe/oracle",
            "--split",
            "test",
            "--n-per-task",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    report = json.loads(out.stdout)  # JSON and nothing else
    assert len(report["records"]) == report["n"] == 16 and 0.0 <= report["accuracy"] <= 1.0
    assert {"prompt", "prediction", "correct", "experts", "provenance"} <= set(report["records"][0])


def test_cli_route_shows_the_chosen_expert(zoo_home):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "route",
            "--strategy",
            "moe/oracle",
            "--task",
            "reverse",
            "Reverse the string\nabcd\nAnswer: ",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "skill-reverse" in out.stdout and "1.000" in out.stdout


def test_unknown_strategy_is_one_clear_error(zoo_home):
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "eval", "--strategy", "moe/nope"], capture_output=True, text=True
    )
    assert out.returncode == 1
    assert "unknown strategy 'moe/nope'" in out.stderr and "Traceback" not in out.stderr


def test_cli_registers_a_built_zoo(micro_zoo, tmp_path):
    env = {**os.environ, "MOERGE_HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "zoo", "register", micro_zoo.root],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    listed = subprocess.run(
        [sys.executable, "-m", "services.cli", "experts", "list"], capture_output=True, text=True, env=env, check=True
    ).stdout
    for e in micro_zoo.experts:
        assert e.name in listed
    # a second registration of the same zoo adds versions; the base record is reused
    again = subprocess.run(
        [sys.executable, "-m", "services.cli", "zoo", "register", micro_zoo.root],
        capture_output=True,
        text=True,
        env=env,
    )
    assert again.returncode == 0, again.stderr
    assert "skill-reverse@2" in again.stdout


def test_the_classifier_head_is_stored_and_reused_until_the_experts_change(zoo_home, micro_zoo, monkeypatch):
    """The classifier trains once over all experts; the next process loads that head from the
    registry (same decisions, no retrain), and a new expert makes it train and store again."""
    from routers.classifier import ClassifierRouter

    first = MoE(ExpertPool(Registry()))
    trained = first.router("classifier")
    prompts = ["Reverse the string\nhello\nAnswer: ", "Uppercase the text\nabc\nAnswer: ", "Tell me about jazz."]
    expected = [trained.probabilities(p) for p in prompts]

    def no_retrain(self):
        raise AssertionError("retrained although a stored head fits")

    with monkeypatch.context() as m:
        m.setattr(ClassifierRouter, "retrain", no_retrain)
        second = MoE(ExpertPool(Registry()))
        restored = second.router("classifier")
    assert "(retrain)" not in second.fit_seconds["classifier"]
    assert restored.labels == trained.labels
    for p, probs in zip(prompts, expected):
        assert restored.probabilities(p) == pytest.approx(probs, abs=1e-6)

    register_reverse_copy(micro_zoo)
    try:
        third = MoE(ExpertPool(Registry()))
        assert "reverse-copy" in third.router("classifier").labels
        assert "(retrain)" in third.fit_seconds["classifier"]  # the stored head no longer fits
        with Registry() as reg:
            heads = [a for a in reg.get_artifacts(router="classifier", kind="head") if a.expert_id is None]
        assert len(heads) == 1  # replaced, not piled up
    finally:
        with Registry() as reg:
            reg.remove_expert("reverse-copy")


def test_a_strategys_generation_on_a_remote_engine_does_not_hold_up_routing(zoo_home):
    """On Ray the strategies replica answers a single-expert strategy by calling the engine
    deployments; while that generation runs, the next request's routing (a stream's ``decide``)
    goes ahead instead of waiting for the host's lock."""
    import threading

    from services.serving.strategy_host import StrategyHost

    generating, release = threading.Event(), threading.Event()

    class GatedEngine:
        """Stands for ``RemoteEngine`` (the engine deployments): the pool's own hf engine, whose
        ``generate`` waits until the test lets it finish."""

        def __init__(self, pool) -> None:  # noqa: ANN001
            self.inner = pool.local_engine

        def targets(self):  # noqa: ANN201
            return self.inner.targets()

        def generate(self, requests, emits=None):  # noqa: ANN001, ANN201
            generating.set()
            assert release.wait(60)
            return self.inner.generate(requests)

    host = StrategyHost(Registry(), ["moe/semantic"], engine_factory=GatedEngine)
    prompt = load_suite("skills", "test", 1)[0].prompt
    host.decide("moe/semantic", prompt)  # the router built before the clock starts
    answered: list = []
    worker = threading.Thread(target=lambda: answered.append(host.complete("moe/semantic", prompt, max_new_tokens=4)))
    worker.start()
    try:
        assert generating.wait(60)
        decided: list = []
        router = threading.Thread(target=lambda: decided.append(host.decide("moe/semantic", prompt)))
        router.start()
        router.join(10)
        assert decided and decided[0].decision.top  # routed while the other request generates
    finally:
        release.set()
        worker.join(60)
    assert answered and answered[0].provenance.experts


def test_in_process_strategies_generate_on_the_servers_engines(zoo_home, moe):
    """`moerge serve --no-ray`: strategies generate on the gateway backend's engines (``PoolEngine``),
    one engine for the base shared with direct expert requests, and answer as the pool's own
    engine does."""
    import asyncio

    from services.engines.hf import HFEngine
    from services.gateway.backend import LocalBackend, PoolEngine, SamplingParams
    from services.serving.strategy_host import StrategyHost, backend_strategies

    built: list[str] = []

    class Counting(HFEngine):
        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            built.append(kwargs["base_name"])
            super().__init__(*args, **kwargs)

    backend = LocalBackend(Registry(), engine_factory=Counting)
    host = StrategyHost(
        Registry(), ["moe/semantic", "moe/skill-k3-vote"], engine_factory=lambda pool: PoolEngine(pool, backend)
    )
    backend.add_strategies(backend_strategies(host))
    prompts = [e.prompt for e in load_suite("skills", "test", 1)][:3]
    params = SamplingParams(max_tokens=12)
    for name in ("moe/semantic", "moe/skill-k3-vote"):
        expected = moe.run(name, prompts, max_new_tokens=12)
        for prompt, (want, _) in zip(prompts, expected):
            got = asyncio.run(backend.complete(name, prompt, params))
            assert got.text == want.text and got.provenance.experts == want.provenance.experts
    chosen = expected[0][0].provenance.outputs[0].expert
    assert (
        backend.run_expert(chosen, prompts[0], params).text
        == moe.pool.engine.generate([params.request(prompts[0], chosen)])[0].text
    )
    # one engine for the base, for strategies and experts alike (full-model experts have their own)
    assert built.count(host.moe().pool.base.name) == 1 and len(set(built)) == len(built)
    assert host.moe().pool._engine is None  # the strategy host's pool never loaded a copy of its own
    # texts it scores are cut to what the server's engine of the base reads (the micro base's 256)
    assert host.moe().pool.context == 256 and host.moe().pool._engine is None


def test_cli_eval_takes_a_registered_suite(zoo_home, micro_zoo, tmp_path):
    """A suite added for the leaderboard is a suite for `moerge eval` too; the oracle scores what
    it scores on the same queries of the built-in suite."""
    from services.zoo.build import read_examples

    test = read_examples(micro_zoo.path_of(micro_zoo.suite["test"]))
    picked = [e for e in test if e.task in ("reverse", "uppercase")][:6]
    rows = tmp_path / "mine.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"prompt": e.prompt, "reference": e.reference, "task": e.task, "split": "held-out"}) + "\n"
            for e in picked
        )
    )
    added = subprocess.run(
        [sys.executable, "-m", "services.cli", "suite", "add", "mine", str(rows)], capture_output=True, text=True
    )
    assert added.returncode == 0, added.stderr
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "eval",
            "--strategy",
            "moe/oracle",
            "--suite",
            "mine",
            "--split",
            "held-out",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["n"] == len(picked) and report["suite"] == "mine"
    want = [e.reference for e in picked]
    assert [r["reference"] for r in report["records"]] == want
    moe = MoE(ExpertPool(Registry()))
    alone = [
        moe.run("moe/oracle", [e.prompt], [e.task], max_new_tokens=len(e.reference) + 4)[0][0].text for e in picked
    ]
    assert [r["prediction"] for r in report["records"]] == alone
    bad = subprocess.run(
        [sys.executable, "-m", "services.cli", "eval", "--strategy", "moe/oracle", "--suite", "nope"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "nope" in bad.stderr


def test_skill_keywords_are_the_ones_the_experts_registered(moe, micro_zoo):
    # Symbolic-MoE's per-question keywords: each task's, from the skills its expert declared
    router = moe.router_for(moe.strategy("moe/skill-k3-vote"))
    checked = 0
    for entry in micro_zoo.experts:
        tasks = {e.task for e in moe.pool.experts[entry.name].examples if e.task}
        if entry.kind == "adapter" and len(tasks) == 1:
            registered = list(moe.pool.experts[entry.name].skills)
            # the skill it was trained on, then its keywords (the zoo registers them)
            assert registered == registered_skills(entry) and registered[0] == entry.skills[0] and len(registered) > 1
            assert router.task_skills[tasks.pop()] == registered
            checked += 1
    assert checked >= 2


def test_a_pool_runs_where_its_engine_args_say(zoo_home):
    # the serve config's engine_args per base (and the CLI's --device/--dtype) reach the pool's
    # engines, its merges and its token routers' fitting
    pool = ExpertPool(Registry(), engine_args=lambda base: {"device": "cpu", "dtype": "bfloat16"})
    assert (pool.device.type, pool.dtype) == ("cpu", torch.bfloat16)
    moe = MoE(pool)
    assert (moe.device, moe.dtype) == (pool.device, torch.bfloat16)  # what merges load the base in
    router = moe.router("phatgoose")
    assert (router.device, router.dtype) == (pool.device, torch.bfloat16)
    assert pool.local_engine.dtype == torch.bfloat16
    [(completion, _)] = moe.run("moe/phatgoose", [load_suite("skills", "test", 1)[0].prompt], max_new_tokens=4)
    assert completion.finish_reason in ("stop", "length")
    mixture_engine, _ = pool.mixture_engine()
    assert next(mixture_engine.base_model.parameters()).dtype == torch.bfloat16
