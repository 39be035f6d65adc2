"""The hf engine against peft's own reference: merged weights, plain base, hand-computed log-probs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

from registry.errors import MoergeError
from services.engines.base import Engine, EngineError, GenerateRequest, ScoreRequest
from services.engines.hf import HFEngine
from tests.factories import make_tiny_base, make_tiny_lora

MODES = ["merge", "unmerged"]
PROMPTS = ["The cat", "2 + 2 =", "q", "A longer prompt, with punctuation!"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_engine")
    base = make_tiny_base(root / "base", seed=0)
    return {
        "base": base,
        "a": make_tiny_lora(base, root / "a", seed=1),
        "b": make_tiny_lora(base, root / "b", seed=2, r=4, target_modules=["q_proj", "v_proj"]),
        "expert": make_tiny_base(root / "expert", seed=7),
        "eos": make_eos_base(root / "eos"),
    }


@pytest.fixture(params=MODES)
def engine(request, zoo) -> HFEngine:
    eng = HFEngine(zoo["base"], adapter_mode=request.param)
    eng.load_adapter("a", zoo["a"])
    eng.load_adapter("b", zoo["b"])
    return eng


def make_eos_base(directory: Path) -> Path:
    """A tiny base that answers '?' with '!' and '!' with EOS (and never emits EOS otherwise).

    One residual dimension per rule carries +1000 for the trigger token's embedding and -1000 for
    every other token, so after the final RMSNorm it has a large, known sign; one lm_head weight
    on that dimension turns it into the logit of the answer.
    """
    make_tiny_base(directory, seed=3)
    tok = AutoTokenizer.from_pretrained(directory)
    model = LlamaForCausalLM.from_pretrained(directory)
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    with torch.no_grad():
        for dim, (trigger, answer) in enumerate([("?", "!"), ("!", tok.eos_token)]):
            emb[:, dim] = -1000.0
            emb[tok.convert_tokens_to_ids(trigger), dim] = 1000.0
            head[:, dim] = 0.0
            head[tok.convert_tokens_to_ids(answer), dim] = 5.0
    model.save_pretrained(directory)
    return directory


def reference_generate(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, ids.shape[1] :].tolist()


def merged_reference(zoo, adapter: str):
    base = LlamaForCausalLM.from_pretrained(zoo["base"])
    return PeftModel.from_pretrained(base, str(zoo[adapter])).merge_and_unload().eval()


def test_engine_satisfies_protocol(engine):
    assert isinstance(engine, Engine)
    assert engine.targets() == {"base": "base", "a": "adapter", "b": "adapter"}


@pytest.mark.parametrize("adapter", ["a", "b"])
def test_adapter_greedy_equals_peft_merged_weights(engine, zoo, adapter):
    reference = merged_reference(zoo, adapter)
    tokenizer = AutoTokenizer.from_pretrained(zoo["base"])
    for prompt in PROMPTS:
        [result] = engine.generate([GenerateRequest(prompt, target=adapter, max_new_tokens=12)])
        assert result.token_ids == reference_generate(reference, tokenizer, prompt, 12), prompt
        assert result.prompt_tokens == len(tokenizer(prompt)["input_ids"])
        assert result.completion_tokens == len(result.token_ids) == 12
        assert result.finish_reason == "length"
        assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)


def test_adapters_change_the_output(engine):
    outs = {
        t: engine.generate([GenerateRequest(PROMPTS[0], target=t, max_new_tokens=12)])[0].token_ids
        for t in (None, "a", "b")
    }
    assert outs[None] != outs["a"] and outs[None] != outs["b"] and outs["a"] != outs["b"]


def test_base_equals_plain_base_even_after_adapters_ran(engine, zoo):
    plain = LlamaForCausalLM.from_pretrained(zoo["base"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(zoo["base"])
    engine.generate([GenerateRequest(PROMPTS[0], target="a", max_new_tokens=4)])  # merge / activate a
    for prompt in PROMPTS:
        for target in (None, "base"):  # None and the base's own name are the same target
            [result] = engine.generate([GenerateRequest(prompt, target=target, max_new_tokens=12)])
            assert result.token_ids == reference_generate(plain, tokenizer, prompt, 12), prompt


def test_mixed_batch_equals_each_alone(engine):
    targets = ["a", None, "b", "a", None, "b", "a"]
    requests = [
        GenerateRequest(PROMPTS[i % len(PROMPTS)], target=t, max_new_tokens=8 + i) for i, t in enumerate(targets)
    ]
    batched = engine.generate(requests)
    alone = [engine.generate([r])[0] for r in requests]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert [r.completion_tokens for r in batched] == [8 + i for i in range(len(targets))]


def test_full_model_expert(engine, zoo):
    engine.load_model("expert", zoo["expert"])
    assert engine.targets()["expert"] == "model"
    plain = LlamaForCausalLM.from_pretrained(zoo["expert"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(zoo["expert"])
    results = engine.generate(
        [GenerateRequest(p, target="expert", max_new_tokens=10) for p in PROMPTS]
        + [GenerateRequest(PROMPTS[0], target="a", max_new_tokens=10)]
    )
    for prompt, result in zip(PROMPTS, results):
        assert result.token_ids == reference_generate(plain, tokenizer, prompt, 10)
    assert results[0].token_ids != results[-1].token_ids
    engine.unload_model("expert")
    with pytest.raises(EngineError, match="expert"):
        engine.generate([GenerateRequest("x", target="expert")])


def test_sampling_is_reproducible_per_seed(engine):
    def sample(seed, target="a", **extra):
        request = GenerateRequest("Once", target=target, max_new_tokens=16, temperature=1.0, top_p=0.95, seed=seed)
        return engine.generate([request], **extra)[0].token_ids

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    # a seeded item's sample does not depend on what else is in the batch
    batch = engine.generate(
        [
            GenerateRequest("Other prompt", target="a", max_new_tokens=5, temperature=0.7, seed=9),
            GenerateRequest("Once", target="a", max_new_tokens=16, temperature=1.0, top_p=0.95, seed=1),
            GenerateRequest("Greedy", target="a", max_new_tokens=5),
        ]
    )
    assert batch[1].token_ids == sample(1)


def test_top_p_tiny_is_greedy(engine):
    greedy = engine.generate([GenerateRequest("Once", target="b", max_new_tokens=10)])[0]
    nucleus = engine.generate(
        [GenerateRequest("Once", target="b", max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=4)]
    )[0]
    assert nucleus.token_ids == greedy.token_ids


def test_stop_on_eos_sets_finish_reason(zoo):
    engine = HFEngine(zoo["eos"])
    tokenizer = AutoTokenizer.from_pretrained(zoo["eos"])
    stopped, running = engine.generate(
        [GenerateRequest("ab?", max_new_tokens=6), GenerateRequest("abc", max_new_tokens=6)]
    )
    assert stopped.token_ids == [tokenizer.convert_tokens_to_ids("!"), tokenizer.eos_token_id]
    assert stopped.text == "!"
    assert stopped.finish_reason == "stop" and stopped.completion_tokens == 2
    assert running == engine.generate([GenerateRequest("abc", max_new_tokens=6)])[0]
    assert running.finish_reason == "length" and running.completion_tokens == 6


def test_stop_strings(engine):
    [full] = engine.generate([GenerateRequest(PROMPTS[1], target="a", max_new_tokens=12)])
    stop = full.text[4]  # a character the greedy completion produces
    cut = full.text.index(stop)
    [short] = engine.generate([GenerateRequest(PROMPTS[1], target="a", max_new_tokens=12, stop=(stop, "never"))])
    assert short.text == full.text[:cut]
    assert short.finish_reason == "stop"
    assert short.token_ids == full.token_ids[: cut + 1]  # up to the token that completed the stop


def test_streaming_hands_out_the_text_as_it_is_generated(engine):
    """Pieces go out while the engine generates (one per token here: the tiny tokenizer's tokens
    each decode to text), joined they are the answer, and a stop string never leaks out: what
    could still become one is held back until it cannot."""
    request = GenerateRequest(PROMPTS[1], target="a", max_new_tokens=12)
    [whole] = engine.generate([request])
    pieces: list[str] = []
    [result] = engine.generate([request], [pieces.append])
    assert result == whole and "".join(pieces) == whole.text
    assert len(pieces) > 1  # not the whole text at the end
    for stop in (whole.text[4:6], whole.text[-2:], "never"):
        cut_request = GenerateRequest(PROMPTS[1], target="a", max_new_tokens=12, stop=(stop,))
        [expected] = engine.generate([cut_request])
        pieces = []
        assert engine.generate([cut_request], [pieces.append]) == [expected]
        assert "".join(pieces) == expected.text, stop


def test_streamed_rows_share_a_batch_with_whole_ones(engine):
    """Streams batched together and with unstreamed requests: each streamed row gets its own text
    and nothing of its neighbours', though rows end at different steps (a stop string, a shorter
    limit, EOS) while the batch runs on; every result equals the request's answer alone."""
    [probe] = engine.generate([GenerateRequest(PROMPTS[1], target="a", max_new_tokens=12)])
    requests = [
        GenerateRequest(PROMPTS[1], target="a", max_new_tokens=12),
        GenerateRequest(PROMPTS[1], target="a", max_new_tokens=3),  # ends first
        GenerateRequest(PROMPTS[0], target="a", max_new_tokens=12),  # not streamed
        GenerateRequest(PROMPTS[1], target="a", max_new_tokens=12, stop=(probe.text[4:6],)),
        GenerateRequest(PROMPTS[0], target="b", max_new_tokens=12),  # another adapter's batch
    ]
    alone = [engine.generate([r])[0] for r in requests]
    pieces: list[list[str]] = [[] for _ in requests]
    emits = [p.append for p in pieces]
    emits[2] = None
    results = engine.generate(requests, emits)
    assert results == alone
    for row, (got, result) in enumerate(zip(pieces, results)):
        if row == 2:
            assert got == []
            continue
        assert "".join(got) == result.text, row
    assert len(pieces[0]) > 1 and len(pieces[1]) <= 3


def test_score_equals_hand_computed_log_softmax(engine, zoo):
    tokenizer = AutoTokenizer.from_pretrained(zoo["base"])
    models = {"a": merged_reference(zoo, "a"), None: LlamaForCausalLM.from_pretrained(zoo["base"]).eval()}
    cases = [("Question: 2+2=", " 4"), ("Q", "uite a long continuation"), ("The cat", " sat.")]
    requests = [ScoreRequest(p, c, target=t) for t in ("a", None) for p, c in cases]
    results = engine.score(requests)
    for request, result in zip(requests, results):
        context = tokenizer(request.prompt)["input_ids"]
        continuation = tokenizer(request.continuation, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            logprobs = torch.log_softmax(models[request.target](ids).logits[0].float(), dim=-1)
        expected = sum(logprobs[len(context) - 1 + j, tok].item() for j, tok in enumerate(continuation))
        assert result.num_tokens == len(continuation)
        assert result.logprob == pytest.approx(expected, abs=1e-4)
        assert len(result.token_logprobs) == len(continuation)


def test_score_is_greedy_flag(engine):
    [result] = engine.generate([GenerateRequest("The cat", target="a", max_new_tokens=5)])
    [scored] = engine.score([ScoreRequest("The cat", result.text, target="a")])
    assert scored.is_greedy


def test_unloaded_adapter_raises_clear_error(engine, zoo):
    engine.generate([GenerateRequest("x", target="a", max_new_tokens=2)])
    engine.unload_adapter("a")
    assert "a" not in engine.targets()
    for call in (
        lambda: engine.generate([GenerateRequest("x", target="a")]),
        lambda: engine.score([ScoreRequest("x", "y", target="a")]),
    ):
        with pytest.raises(EngineError, match="'a' is not loaded"):
            call()
    assert issubclass(EngineError, MoergeError)
    # the other adapter still works, and unloading the last one leaves the plain base
    reference = merged_reference(zoo, "b")
    tokenizer = AutoTokenizer.from_pretrained(zoo["base"])
    assert engine.generate([GenerateRequest("hi", target="b", max_new_tokens=6)])[0].token_ids == reference_generate(
        reference, tokenizer, "hi", 6
    )
    engine.unload_adapter("b")
    plain = LlamaForCausalLM.from_pretrained(zoo["base"]).eval()
    assert engine.generate([GenerateRequest("hi", max_new_tokens=6)])[0].token_ids == reference_generate(
        plain, tokenizer, "hi", 6
    )
    # and an adapter can be loaded again after that
    engine.load_adapter("a", zoo["a"])
    assert engine.targets()["a"] == "adapter"


def test_loading_errors(engine, zoo, tmp_path):
    with pytest.raises(EngineError, match="already taken"):
        engine.load_adapter("a", zoo["a"])
    with pytest.raises(EngineError, match="already taken"):
        engine.load_model("base", zoo["expert"])
    with pytest.raises(EngineError, match="adapter_config.json"):
        engine.load_adapter("c", tmp_path)
    with pytest.raises(EngineError, match="not loaded"):
        engine.unload_adapter("nope")


def test_request_validation():
    with pytest.raises(EngineError):
        GenerateRequest("x", max_new_tokens=0)
    with pytest.raises(EngineError):
        GenerateRequest("x", top_p=0)
    assert GenerateRequest("x", stop="\n").stop == ("\n",)
