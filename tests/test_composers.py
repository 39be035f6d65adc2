"""Composers: single, ensemble (votes, aggregator), merging (task arithmetic, TIES, DARE, cache),
LoraHub and stitching.

The vote arithmetic runs on ``ScriptedEngine`` (fixed texts per target, nothing else); everything
else runs on real tiny Llama checkpoints and peft adapters from ``tests.factories`` through the
real ``HFEngine``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import safetensors.torch
import torch

from composer.base import ComposeError, Composer
from composer.engine_protocol import GenerateRequest, GenerateResult, ScoreRequest, ScoreResult
from composer.ensemble import Ensemble
from composer.merge import SIDECAR, Merged, merge_adapters
from composer.single import Single
from composer.stitch import Stitch
from routers.base import Decision, RouteRequest
from tests.factories import make_tiny_base, make_tiny_lora

# ------------------------------------------------------------------------------ fakes


class ScriptedEngine:
    """Answers each target with a fixed text (or a function of the prompt); records every call."""

    kind = "scripted"

    def __init__(self, script: dict[str, str | Callable[[str], str]]) -> None:
        self.script = script
        self.calls: list[list[GenerateRequest]] = []

    def targets(self) -> dict[str, str]:
        return {"base": "base", **{name: "adapter" for name in self.script if name != "base"}}

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        self.calls.append(list(requests))
        out = []
        for r in requests:
            answer = self.script[r.target or "base"]
            text = answer(r.prompt) if callable(answer) else answer
            out.append(GenerateResult(text, list(range(len(text))), len(r.prompt), len(text), "stop"))
        return out

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:  # pragma: no cover
        raise NotImplementedError

    def load_adapter(self, name, path):  # pragma: no cover
        raise NotImplementedError

    unload_adapter = load_model = unload_model = load_adapter


class KeywordRouter:
    """Routes a prompt to the expert whose keyword it contains."""

    name = "keyword"

    def __init__(self, keywords: dict[str, str]) -> None:
        self.keywords = keywords
        self.seen: list[str] = []

    def route(self, request: RouteRequest) -> Decision:
        self.seen.append(request.prompt)
        for word, expert in self.keywords.items():
            if word in request.prompt.lower():
                return Decision(self.name, [(expert, 1.0)], {"keyword": word})
        return Decision(self.name, [], {"fallback": "no keyword"})


def decision(*experts: tuple[str, float]) -> Decision:
    return Decision("test-router", list(experts), {"scores": {n: w for n, w in experts}})


REQUEST = GenerateRequest("Question?", max_new_tokens=8)


# ------------------------------------------------------------------------------ tiny checkpoints


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("composers")
    base = make_tiny_base(root / "base")
    adapters = {f"e{i}": make_tiny_lora(base, root / f"e{i}", seed=i) for i in (1, 2, 3)}
    return base, adapters, root


@pytest.fixture(scope="module")
def engine(tiny):
    from services.engines.hf import HFEngine

    base, adapters, _ = tiny
    eng = HFEngine(base)
    for name, path in adapters.items():
        eng.load_adapter(name, path)
    return eng


def merged_weights(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter))
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def base_weights(base: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(base).state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ------------------------------------------------------------------------------ single


def test_single_expert_is_the_engines_own_output(engine):
    request = GenerateRequest("Reverse the string\nabc\nAnswer: ", max_new_tokens=6)
    direct = engine.generate([GenerateRequest(request.prompt, target="e2", max_new_tokens=6)])[0]
    done = Single().execute(decision(("e2", 0.7), ("e1", 0.3)), request, engine)
    assert isinstance(Single(), Composer)
    assert done.text == direct.text
    assert done.experts == [("e2", 0.7)]
    assert (done.prompt_tokens, done.completion_tokens) == (direct.prompt_tokens, direct.completion_tokens)
    assert json.loads(json.dumps(done.to_dict()))["experts"] == [{"name": "e2", "weight": 0.7}]


def test_single_with_empty_decision_falls_back_to_the_base():
    eng = ScriptedEngine({"base": "from base"})
    done = Single().execute(Decision("r", []), REQUEST, eng)
    assert done.text == "from base" and done.experts == [("base", 1.0)]
    assert "fallback" in done.provenance.info


# ------------------------------------------------------------------------------ ensemble: votes


def test_majority_vote_picks_the_most_frequent_answer():
    eng = ScriptedEngine({"a": "abc", "b": " abc ", "c": "xyz"})
    done = Ensemble(k=3).execute(decision(("c", 0.5), ("a", 0.3), ("b", 0.2)), REQUEST, eng)
    assert done.text.strip() == "abc"
    assert len(eng.calls) == 1 and len(eng.calls[0]) == 3  # one batched call for the recruits
    ag = done.agreement
    assert ag.distinct == 2
    assert ag.winner_share == pytest.approx(2 / 3)
    assert ag.entropy_bits == pytest.approx(-(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3))


def test_majority_vote_entropy_zero_when_all_agree_and_max_when_all_differ():
    same = Ensemble(k=3).execute(
        decision(("a", 0.4), ("b", 0.3), ("c", 0.3)), REQUEST, ScriptedEngine({"a": "42", "b": "42", "c": "42"})
    )
    assert same.text == "42" and same.agreement.entropy_bits == 0.0 and same.agreement.winner_share == 1.0
    differ = Ensemble(k=3).execute(
        decision(("a", 0.4), ("b", 0.3), ("c", 0.3)), REQUEST, ScriptedEngine({"a": "1", "b": "2", "c": "3"})
    )
    assert differ.agreement.entropy_bits == pytest.approx(math.log2(3))
    assert differ.text == "1"  # a three-way tie goes to the heaviest expert


def test_majority_ties_break_by_router_weight_then_rank():
    eng = ScriptedEngine({"a": "x", "b": "y", "c": "y", "d": "x"})
    # 2 - 2 tie; y carries 0.5 against x's 0.3
    done = Ensemble(k=4).execute(decision(("a", 0.2), ("b", 0.25), ("c", 0.25), ("d", 0.1)), REQUEST, eng)
    assert done.text == "y"
    # 2 - 2 tie with equal weight: the answer of the better-ranked expert wins
    done = Ensemble(k=4).execute(decision(("b", 0.25), ("a", 0.25), ("c", 0.25), ("d", 0.25)), REQUEST, eng)
    assert done.text == "y"


def test_weighted_vote_respects_router_weights():
    eng = ScriptedEngine({"a": "x", "b": "y", "c": "y"})
    d = decision(("a", 0.6), ("b", 0.2), ("c", 0.2))
    assert Ensemble(k=3, vote="majority").execute(d, REQUEST, eng).text == "y"
    done = Ensemble(k=3, vote="weighted").execute(d, REQUEST, eng)
    assert done.text == "x"
    assert done.agreement.method == "weighted"
    assert done.agreement.winner_share == pytest.approx(0.6)
    assert done.agreement.votes == pytest.approx({"x": 0.6, "y": 0.4})


def test_only_the_top_k_are_recruited_with_renormalised_weights():
    eng = ScriptedEngine({"a": "x", "b": "y", "c": "z"})
    done = Ensemble(k=2, vote="weighted").execute(decision(("a", 0.3), ("b", 0.2), ("c", 0.5)), REQUEST, eng)
    assert [n for n, _ in done.experts] == ["a", "b"]
    assert sum(w for _, w in done.experts) == pytest.approx(1.0)
    assert [r.target for r in eng.calls[0]] == ["a", "b"]


def test_aggregator_gets_the_candidates_in_a_configurable_prompt():
    seen: list[str] = []

    def aggregator(prompt: str) -> str:
        seen.append(prompt)
        return "final"

    eng = ScriptedEngine({"a": "x", "b": "y", "c": "x", "judge": aggregator})
    composer = Ensemble(
        k=3, vote="aggregate", aggregator="judge", aggregate_prompt=lambda q, cands: f"{q} | " + " / ".join(cands)
    )
    done = composer.execute(decision(("a", 0.5), ("b", 0.3), ("c", 0.2)), REQUEST, eng)
    assert done.text == "final"
    assert seen == ["Question? | x / y"]  # distinct candidates, best-ranked first
    assert [o.role for o in done.outputs] == ["expert"] * 3 + ["aggregator"]
    assert done.agreement.entropy_bits > 0
    # tokens are summed over all four engine calls
    assert done.completion_tokens == 1 + 1 + 1 + len("final")
    assert done.prompt_tokens == 3 * len("Question?") + len("Question? | x / y")
    assert json.loads(json.dumps(done.to_dict()))["usage"]["engine_calls"] == 4


def test_aggregator_must_be_named_and_loaded():
    with pytest.raises(ComposeError):
        Ensemble(vote="aggregate")
    with pytest.raises(ComposeError, match="judge"):
        Ensemble(k=1, vote="aggregate", aggregator="judge").execute(
            decision(("a", 1.0)), REQUEST, ScriptedEngine({"a": "x"})
        )


def test_ensemble_end_to_end_on_the_hf_engine(engine):
    prompt = "Sort the letters\ndcba\nAnswer: "
    done = Ensemble(k=3).execute(
        decision(("e1", 0.5), ("e2", 0.3), ("e3", 0.2)), GenerateRequest(prompt, max_new_tokens=5), engine
    )
    direct = engine.generate([GenerateRequest(prompt, target=e, max_new_tokens=5) for e in ("e1", "e2", "e3")])
    assert [o.text for o in done.outputs] == [r.text for r in direct]
    assert done.text in {r.text for r in direct}
    assert done.completion_tokens == sum(r.completion_tokens for r in direct)
    payload = json.loads(json.dumps(done.to_dict()))
    assert payload["composer"] == "ensemble-majority-k3" and payload["decision"]["scores"]["e1"] == 0.5


# ------------------------------------------------------------------------------ merging


def test_task_arithmetic_of_one_adapter_equals_its_delta_w(tiny, tmp_path):
    base, adapters, _ = tiny
    expected = merged_weights(base, adapters["e1"])
    for combination in ("svd", "cat"):
        merged = merge_adapters(base, {"e1": adapters["e1"]}, [1.0], "task_arithmetic", None, combination, tmp_path)
        assert max_diff(merged_weights(base, merged.path), expected) < 1e-5


def test_task_arithmetic_of_two_adapters_is_the_weighted_delta_sum(tiny, tmp_path):
    base, adapters, _ = tiny
    w0 = base_weights(base)
    d1 = {k: v - w0[k] for k, v in merged_weights(base, adapters["e1"]).items()}
    d2 = {k: v - w0[k] for k, v in merged_weights(base, adapters["e2"]).items()}
    expected = {k: w0[k] + 0.7 * d1[k] - 0.4 * d2[k] for k in w0}
    pair = {"e1": adapters["e1"], "e2": adapters["e2"]}
    for combination in ("svd", "cat"):
        merged = merge_adapters(base, pair, [0.7, -0.4], "task_arithmetic", None, combination, tmp_path)
        assert max_diff(merged_weights(base, merged.path), expected) < 1e-4, combination


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "linear_factors"])
def test_other_methods_give_loadable_adapters_that_differ_from_task_arithmetic(tiny, tmp_path, engine, method):
    base, adapters, _ = tiny
    pair = {"e1": adapters["e1"], "e2": adapters["e2"]}
    ta = merged_weights(base, merge_adapters(base, pair, [0.5, 0.5], "task_arithmetic", None, "svd", tmp_path).path)
    other = merge_adapters(base, pair, [0.5, 0.5], method, 0.5, "svd", tmp_path)
    assert json.loads((other.path / SIDECAR).read_text())["method"] == method
    assert max_diff(merged_weights(base, other.path), ta) > 1e-3
    name = f"m-{method}"
    engine.load_adapter(name, other.path)
    try:
        [out] = engine.generate([GenerateRequest("abc", target=name, max_new_tokens=3)])
        assert out.completion_tokens >= 1
    finally:
        engine.unload_adapter(name)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_a_merge_on_a_bfloat16_base_equals_the_float32_merge(tiny, tmp_path, method):
    # the base loads in the strategy's dtype; peft keeps the adapters' factors in float32, so the
    # merged adapter is the float32 one up to float32 rounding
    base, adapters, _ = tiny
    pair = {"e1": adapters["e1"], "e2": adapters["e2"]}
    f32 = merge_adapters(base, pair, [0.6, 0.4], method, 0.5, "svd", tmp_path / "f32")
    bf16 = merge_adapters(base, pair, [0.6, 0.4], method, 0.5, "svd", tmp_path / "bf16", dtype=torch.bfloat16)
    a, b = (
        safetensors.torch.load_file(f32.path / "adapter_model.safetensors"),
        safetensors.torch.load_file(bf16.path / "adapter_model.safetensors"),
    )
    assert set(a) == set(b) and all(v.dtype == torch.float32 for v in b.values())
    assert max_diff(merged_weights(base, bf16.path), merged_weights(base, f32.path)) < 1e-4


def test_dare_is_reproducible_from_its_seed(tiny, tmp_path):
    base, adapters, _ = tiny
    pair = {"e1": adapters["e1"], "e2": adapters["e2"]}
    a = merge_adapters(base, pair, [0.5, 0.5], "dare_linear", 0.5, "svd", tmp_path / "a", seed=3)
    b = merge_adapters(base, pair, [0.5, 0.5], "dare_linear", 0.5, "svd", tmp_path / "b", seed=3)
    assert max_diff(merged_weights(base, a.path), merged_weights(base, b.path)) < 1e-6


def test_ties_and_dare_refuse_cat(tiny, tmp_path):
    base, adapters, _ = tiny
    with pytest.raises(ComposeError, match="svd"):
        merge_adapters(base, {"e1": adapters["e1"], "e2": adapters["e2"]}, None, "ties", 0.5, "cat", tmp_path)


def test_merge_cache_returns_the_same_folder_without_recomputing(tiny, tmp_path, monkeypatch):
    import composer.merge as merge_module

    base, adapters, _ = tiny
    pair = {"e1": adapters["e1"], "e2": adapters["e2"]}
    first = merge_adapters(base, pair, [0.5, 0.5], "ties", 0.3, "svd", tmp_path)
    assert not first.cached
    stamp = (first.path / "adapter_model.safetensors").stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("recomputed a cached merge")

    monkeypatch.setattr(merge_module, "_build", boom)
    again = merge_adapters(base, pair, [0.5, 0.5], "ties", 0.3, "svd", tmp_path)
    assert again.cached and again.path == first.path and again.key == first.key
    assert (again.path / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    assert os.fspath(again) == str(first.path)
    # another parameter is another key
    with pytest.raises(AssertionError, match="recomputed"):
        merge_adapters(base, pair, [0.5, 0.5], "ties", 0.4, "svd", tmp_path)


def test_merged_composer_serves_and_reuses_the_merge(tiny, tmp_path, engine):
    base, adapters, _ = tiny
    composer = Merged(base, adapters, tmp_path, "task_arithmetic", k=2)
    d = decision(("e3", 0.6), ("e1", 0.4))
    first = composer.execute(d, GenerateRequest("abc", max_new_tokens=4), engine)
    second = composer.execute(d, GenerateRequest("abc", max_new_tokens=4), engine)
    assert first.text == second.text
    assert not first.provenance.info["cache_hit"] and second.provenance.info["cache_hit"]
    assert first.experts == [("e3", 0.6), ("e1", 0.4)]
    json.dumps(second.to_dict())


def test_merged_scores_share_one_merge_and_keep_each_decision_s_order(tiny, tmp_path, engine):
    """The same two experts in either order are one uniform merge (one adapter, one engine call);
    each scored text still names its own router's top expert first."""
    from composer.engine_protocol import ScoreRequest

    base, adapters, _ = tiny
    composer = Merged(base, adapters, tmp_path, "task_arithmetic", k=2, weighting="uniform")
    decisions = [decision(("e3", 0.6), ("e1", 0.4)), decision(("e1", 0.7), ("e3", 0.3))]
    first, second = composer.score_batch(decisions, [ScoreRequest("abc", " def")] * 2, engine)
    assert first.target == second.target and first.result.token_logprobs == second.result.token_logprobs
    assert [n for n, _ in first.experts] == ["e3", "e1"] and [n for n, _ in second.experts] == ["e1", "e3"]


@pytest.mark.parametrize(("method", "each"), [("task_arithmetic", 0.5), ("ties", 1.0), ("dare_ties", 1.0)])
def test_equal_weights_sum_to_one_or_average_one_where_the_merge_averages(tiny, tmp_path, engine, method, each):
    """A strategy's equal weights: 1/n for a sum (the uniform task-arithmetic merge), 1 each for
    TIES and DARE-TIES, whose merge is itself a mean over the experts agreeing on each entry's
    sign (their papers' λ = 1); weights of 1/n there would divide that mean by n once more."""
    base, adapters, _ = tiny
    composer = Merged(base, adapters, tmp_path, method, k=2, weighting="uniform", density=0.5)
    done = composer.execute(decision(("e3", 0.6), ("e1", 0.4)), GenerateRequest("abc", max_new_tokens=2), engine)
    assert done.experts == [("e3", each), ("e1", each)]
    assert json.loads((Path(done.provenance.info["merged_adapter"]) / SIDECAR).read_text())["weights"] == [each, each]


# ------------------------------------------------------------------------------ LoraHub


def test_lorahub_weights_stay_in_bounds_and_never_lose_to_w_zero(tiny, tmp_path, engine):
    from composer.lorahub import LoraHubObjective, lorahub_compose, lorahub_weights

    base, adapters, _ = tiny
    examples = [
        ("Reverse the string\nabc\nAnswer: ", "cba"),
        ("Reverse the string\nxyz\nAnswer: ", "zyx"),
        ("Reverse the string\nhello\nAnswer: ", "olleh"),
    ]
    weights, loss = lorahub_weights(base, adapters, examples, budget=5, seed=0)
    assert set(weights) == set(adapters)
    assert all(-1.5 <= w <= 1.5 for w in weights.values())
    at_zero = LoraHubObjective(base, adapters, examples)([0.0] * len(adapters))
    assert loss <= at_zero + 1e-9

    result = lorahub_compose(base, adapters, examples, tmp_path / "hub", budget=5, seed=0)
    assert result.loss <= result.loss_at_zero + 1e-9
    assert result.loss_at_zero == pytest.approx(at_zero)
    assert result.weights == pytest.approx(weights)  # the seed fixes the search
    sidecar = json.loads((result.path / SIDECAR).read_text())
    assert sidecar["method"] == "lorahub" and sidecar["weights"] == pytest.approx(list(weights.values()))
    # the composed folder is a peft adapter whose objective is the one reported
    objective = LoraHubObjective(base, {"hub": result.path}, examples, l1=0.0)
    ce = objective([1.0])
    reg = 0.05 * sum(abs(w) for w in weights.values()) / len(weights)
    assert ce + reg == pytest.approx(result.loss, rel=1e-4)
    engine.load_adapter("hub", result.path)
    engine.unload_adapter("hub")


# ------------------------------------------------------------------------------ stitching


def _step_engine() -> ScriptedEngine:
    def take_input(prompt: str) -> str:
        return prompt.split(": ", 1)[1]

    return ScriptedEngine(
        {
            "rev": lambda p: take_input(p)[::-1],
            "up": lambda p: take_input(p).upper() + "\n",
            "base": lambda p: "base:" + p,
        }
    )


def test_stitching_feeds_step_one_into_step_two_and_records_who_wrote_what():
    router = KeywordRouter({"reverse": "rev", "uppercase": "up"})
    eng = _step_engine()
    done = Stitch(router).execute(
        Decision("whole", [("rev", 1.0)]), GenerateRequest("Reverse it, then make it uppercase: abc"), eng
    )
    assert done.text == "CBA"
    assert [(s.expert, s.text, s.step) for s in done.segments] == [("rev", "cba", 0), ("up", "CBA", 1)]
    assert router.seen == ["Reverse it: abc", "Make it uppercase: cba"]  # step 1's output is step 2's input
    assert [c[0].prompt for c in eng.calls] == router.seen
    assert done.experts == [("rev", 1.0), ("up", 1.0)]
    payload = json.loads(json.dumps(done.to_dict()))
    assert [s["expert"] for s in payload["segments"]] == ["rev", "up"]
    assert payload["usage"]["engine_calls"] == 2


def test_stitching_with_a_suite_format():
    def zoo_prompt(instruction: str, text: str) -> str:  # the zoo's "instruction\ninput\nAnswer: " format
        return f"{instruction}\n{text}\nAnswer: "

    def zoo_expert(transform):
        return lambda p: transform(p.split("\n")[1])

    eng = ScriptedEngine({"rev": zoo_expert(lambda x: x[::-1]), "up": zoo_expert(str.upper)})
    router = KeywordRouter({"reverse": "rev", "uppercase": "up"})
    done = Stitch(router, make_step_prompt=zoo_prompt).execute(
        Decision("whole", []), GenerateRequest("First reverse it, and then make it uppercase\nabc\nAnswer: "), eng
    )
    assert done.text == "CBA"
    assert router.seen == ["Reverse it\nabc\nAnswer: ", "Make it uppercase\ncba\nAnswer: "]


@pytest.mark.parametrize(
    "request_prompt, seen",
    [
        # each step laid out as the request was: its instruction line, input line and cue line
        (
            "First reverse it, and then make it uppercase\nabc\nAnswer: ",
            ["Reverse it\nabc\nAnswer: ", "Make it uppercase\ncba\nAnswer: "],
        ),
        ("Reverse it, then make it uppercase\nabc", ["Reverse it\nabc", "Make it uppercase\ncba"]),
        ("Reverse it, then make it uppercase: abc", ["Reverse it: abc", "Make it uppercase: cba"]),
    ],
)
def test_stitched_steps_keep_the_requests_own_layout(request_prompt, seen):
    def expert(transform):  # reads the input from either layout
        return lambda p: transform(p.split("\n")[1] if "\n" in p else p.split(": ", 1)[1])

    eng = ScriptedEngine({"rev": expert(lambda x: x[::-1]), "up": expert(str.upper)})
    router = KeywordRouter({"reverse": "rev", "uppercase": "up"})
    done = Stitch(router).execute(Decision("whole", []), GenerateRequest(request_prompt), eng)
    assert done.text == "CBA"
    assert router.seen == seen


@pytest.mark.parametrize(
    "instruction, steps",
    [
        ("Reverse it, then make it uppercase", ["Reverse it", "Make it uppercase"]),
        ("First reverse it, and then make it uppercase", ["Reverse it", "Make it uppercase"]),
        ("sort the letters; then reverse it then shift", ["Sort the letters", "Reverse it", "Shift"]),
        ("Strengthen the argument", ["Strengthen the argument"]),  # "then" only as a word
        ("Reverse the string", ["Reverse the string"]),
    ],
)
def test_splitter(instruction, steps):
    assert Stitch(KeywordRouter({})).split(instruction) == steps


def test_a_request_that_does_not_split_runs_as_one_step():
    eng = _step_engine()
    done = Stitch(KeywordRouter({})).execute(Decision("whole", [("rev", 1.0)]), GenerateRequest("Reverse it: abc"), eng)
    assert done.text == "cba"
    assert len(done.segments) == 1 and done.segments[0].expert == "rev"
    assert eng.calls[0][0].prompt == "Reverse it: abc"  # the original prompt, unchanged


def test_completion_dict_is_plain_json():
    eng = ScriptedEngine({"a": "x"})
    d = Decision("r", [("a", 1.0)], {"tensor": torch.tensor([0.25, 0.75]), "path": Path("/x"), "nan": float("nan")})
    payload = Single().execute(d, REQUEST, eng).to_dict()
    assert json.loads(json.dumps(payload))["decision"] == {"tensor": [0.25, 0.75], "path": "/x", "nan": None}


def test_provenance_json_is_plain_and_detached() -> None:
    """A completion's ``to_dict`` (every gateway response's ``moe`` object) holds plain JSON only,
    whatever the provenance carries, and copies rather than shares the provenance's containers."""
    import numpy as np

    from composer.base import Agreement, Completion, ExpertOutput, Provenance, Segment, jsonable

    votes = {"a": 2.0, "b": float("nan")}
    done = Completion(
        text="a",
        finish_reason="stop",
        provenance=Provenance(
            composer="vote",
            router="r",
            experts=[("e1", 0.5), ("e2", float("inf"))],
            outputs=[ExpertOutput(expert="e1", text="a", weight=float("-inf"), prompt_tokens=3, completion_tokens=1)],
            agreement=Agreement(entropy_bits=1.0, winner_share=0.5, distinct=2, votes=votes, method="vote"),
            segments=[Segment(expert="e1", text="a", step=0)],
            decision_info={
                "scores": torch.tensor([0.25, 0.75]),
                3: np.float32(0.5),
                "path": Path("/x"),
                "pair": (1, {2}),
                "seg": Segment(expert="e2", text="b", step=1),
            },
            info={"nested": {"deep": [float("nan"), True, None]}},
        ),
    )
    payload = done.to_dict()
    assert json.loads(json.dumps(payload, allow_nan=False)) == payload  # strict JSON: no NaN or inf left
    assert payload["experts"] == [{"name": "e1", "weight": 0.5}, {"name": "e2", "weight": None}]
    assert payload["outputs"][0]["weight"] is None and payload["outputs"][0]["completion_tokens"] == 1
    assert payload["agreement"]["votes"] == {"a": 2.0, "b": None}
    assert payload["segments"] == [
        {"expert": "e1", "text": "a", "step": 0, "instruction": "", "prompt": "", "weight": 1.0}
    ]
    assert payload["decision"] == {
        "scores": [0.25, 0.75],
        "3": 0.5,
        "path": "/x",
        "pair": [1, [2]],
        "seg": {"expert": "e2", "text": "b", "step": 1, "instruction": "", "prompt": "", "weight": 1.0},
    }
    assert payload["info"] == {"nested": {"deep": [None, True, None]}}
    payload["agreement"]["votes"]["c"] = 1.0
    payload["info"]["nested"]["deep"].append(1)
    assert "c" not in votes and len(done.provenance.info["nested"]["deep"]) == 3
    assert jsonable(float("nan")) is None and jsonable(True) is True and jsonable(7) == 7
