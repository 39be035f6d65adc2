"""Real chat models end to end on the hf engine and the gateway: a tiny random Qwen2 (GQA, tied
embeddings) with a byte-level BPE tokenizer, a chat template and generation_config's eos list
(tests/chat_models.py), and peft adapters of every kind on it.

The reference is what transformers itself does with the same folder: ``apply_chat_template`` then
``generate``, with the model's own generation_config.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from composer.engine_protocol import ContextLengthError, GenerateRequest, RequestError  # noqa: E402
from services.engines.hf import HFEngine  # noqa: E402
from tests.chat_models import (  # noqa: E402
    ENDOFTEXT,
    IM_END,
    IM_START,
    make_chat_lora,
    make_lora_with_added_tokens,
    make_qwen_chat_model,
    make_remote_code_model,
    token_id,
    with_own_tokenizer,
)

SYSTEM = ("system", "You answer in one word.")
HISTORY = (("user", "Name a colour"), ("assistant", "Blue."))
QUESTION = ("user", "Name a fruit")
CONVERSATION = (SYSTEM, *HISTORY, QUESTION)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    return make_qwen_chat_model(tmp_path_factory.mktemp("qwen") / "qwen-chat")


@pytest.fixture(scope="module")
def adapters(qwen: Path, tmp_path_factory) -> dict[str, Path]:
    """One adapter of each kind peft makes, with random non-zero weights."""
    root = tmp_path_factory.mktemp("adapters")
    kinds = {
        "plain": {},
        "dora": {"use_dora": True},
        "patterned": {"target_modules": "all-linear", "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"v_proj": 32}},
        "rslora": {"target_modules": ["gate_proj", "up_proj", "down_proj"], "use_rslora": True},
        "saves": {"modules_to_save": ["norm"]},  # (an adapter name ending in "norm" would clash with it in peft)
        "tied-head": {"target_modules": ["q_proj", "lm_head"]},  # the output layer is the tied embedding
    }
    return {name: make_chat_lora(qwen, root / name, seed=i + 1, **kw) for i, (name, kw) in enumerate(kinds.items())}


def reference(
    folder: Path,
    messages,
    max_new_tokens: int = 12,
    adapter: Path | None = None,
    tokenizer: Path | None = None,
    **generate_kwargs,
):
    """transformers' own answer: the chat template (of ``tokenizer``'s folder, else the model's),
    then greedy ``generate`` with the model's generation_config (its eos list)."""
    tok = AutoTokenizer.from_pretrained(tokenizer or folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    chat = [{"role": r, "content": c} for r, c in messages]
    inputs = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    # greedy, without the model's own sampling defaults (its repetition_penalty 1.05): a request
    # to moerge says what it wants, as vLLM's SamplingParams do
    generate_kwargs = {"repetition_penalty": 1.0, "top_k": None, "top_p": None, "temperature": None, **generate_kwargs}
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
    ids = out[0, inputs["input_ids"].shape[1] :].tolist()
    return ids, inputs["input_ids"].shape[1], tok


def text_of(tok, ids: list[int]) -> str:
    """The text an engine gives for ``ids``: decoded without special tokens, and without the bytes
    of a character cut off at the end (vLLM's incremental detokenizer holds those back)."""
    return tok.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def chat(messages=CONVERSATION, **kw) -> GenerateRequest:
    last_user = ([c for r, c in messages if r == "user"] or [""])[-1]
    return GenerateRequest(last_user, messages=messages, **{"max_new_tokens": 12, **kw})


# ------------------------------------------------------------------------------------- prompts


def test_chat_equals_transformers_on_the_chat_template(qwen: Path) -> None:
    engine = HFEngine(qwen)
    [result] = engine.generate([chat()])
    ids, prompt_len, tok = reference(qwen, CONVERSATION)
    ends = {token_id(qwen, IM_END), token_id(qwen, ENDOFTEXT)}
    want = ids[: next((i + 1 for i, t in enumerate(ids) if t in ends), len(ids))]
    assert result.prompt_rule == "chat_template"
    assert result.prompt_tokens == prompt_len
    assert result.token_ids == want
    assert result.text == text_of(tok, [t for t in want if t not in ends])


def test_a_mistral_chat_model_equals_transformers_too(tmp_path: Path) -> None:
    """A second family: BOS written by the template (not added again), no pad token, a system
    prompt folded into the last user turn, and a template that refuses a role out of place."""
    from composer.engine_protocol import ChatTemplateError
    from tests.chat_models import make_mistral_chat_model

    folder = make_mistral_chat_model(tmp_path / "mistral")
    engine = HFEngine(folder)
    second_turn = (SYSTEM, *HISTORY, QUESTION)
    results = engine.generate([chat(second_turn, max_new_tokens=10), chat((QUESTION,), max_new_tokens=10)])
    for result, messages in zip(results, (second_turn, (QUESTION,))):
        ids, prompt_len, tok = reference(folder, messages, max_new_tokens=10)
        eos = tok.eos_token_id
        want = ids[: ids.index(eos) + 1] if eos in ids else ids
        assert (result.token_ids, result.prompt_tokens, result.prompt_rule) == (want, prompt_len, "chat_template")
        rendered = tok.apply_chat_template(
            [{"role": r, "content": c} for r, c in messages], tokenize=False, add_generation_prompt=True
        )
        assert rendered.count("<s>") == 1  # the template's BOS, not one more from the tokenizer
    with pytest.raises(ChatTemplateError, match="Only user and assistant roles"):
        engine.generate([chat((QUESTION, ("system", "late system prompt"), QUESTION))])


def test_history_and_system_change_the_prompt(qwen: Path) -> None:
    engine = HFEngine(qwen)
    whole, alone, other_system = engine.generate(
        [chat(), chat((QUESTION,)), chat((("system", "Answer at length."), *HISTORY, QUESTION))]
    )
    assert whole.prompt_tokens > alone.prompt_tokens
    assert whole.prompt_tokens != other_system.prompt_tokens
    assert len({whole.prompt_tokens, alone.prompt_tokens, other_system.prompt_tokens}) == 3


def test_an_assistant_prefill_is_continued(qwen: Path) -> None:
    tok = AutoTokenizer.from_pretrained(qwen)
    prefill = (*CONVERSATION, ("assistant", "Apple"))
    [result] = HFEngine(qwen).generate([chat(prefill)])
    rendered = tok.apply_chat_template(
        [{"role": r, "content": c} for r, c in prefill], tokenize=False, continue_final_message=True
    )
    assert rendered.endswith("<|im_start|>assistant\nApple")
    assert result.prompt_tokens == len(tok(rendered, add_special_tokens=False)["input_ids"])


def test_a_model_without_template_gets_the_last_user_turn(tmp_path: Path) -> None:
    folder = make_qwen_chat_model(tmp_path / "no-template", chat_template=None)
    engine = HFEngine(folder)
    [with_history, raw] = engine.generate([chat(), GenerateRequest(QUESTION[1], max_new_tokens=12)])
    assert with_history.prompt_rule == "last_user_message"
    assert (with_history.token_ids, with_history.prompt_tokens) == (raw.token_ids, raw.prompt_tokens)
    with pytest.raises(RequestError, match="no user message"):
        engine.generate([chat((SYSTEM,))])


def test_a_prompt_over_the_context_is_refused(qwen: Path) -> None:
    with pytest.raises(ContextLengthError, match="context is 256 tokens"):
        HFEngine(qwen).generate([chat(max_new_tokens=250)])


# ------------------------------------------------------------------------------------- stops


def test_stops_on_every_eos_of_generation_config(qwen: Path) -> None:
    """<|endoftext|> is in generation_config's eos list, not the tokenizer's EOS (<|im_end|>)."""
    engine = HFEngine(qwen)
    endoftext, im_end = token_id(qwen, ENDOFTEXT), token_id(qwen, IM_END)
    for end in (endoftext, im_end):
        [r] = engine.generate([chat(logit_bias=((end, 100.0),))])
        assert (r.token_ids, r.finish_reason, r.text) == ([end], "stop", "")
    [r] = engine.generate([chat(logit_bias=((endoftext, 100.0),), ignore_eos=True, max_new_tokens=5)])
    assert (r.token_ids, r.finish_reason) == ([endoftext] * 5, "length")
    [r] = engine.generate(
        [chat(logit_bias=((endoftext, 100.0),), ignore_eos=True, max_new_tokens=3, skip_special_tokens=False)]
    )
    assert r.text == ENDOFTEXT * 3


def test_stop_token_ids_and_stop_strings(qwen: Path) -> None:
    engine = HFEngine(qwen)
    [free] = engine.generate([chat(ignore_eos=True, max_new_tokens=8)])
    assert free.finish_reason == "length"
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    [r] = engine.generate([chat(ignore_eos=True, max_new_tokens=8, stop_token_ids=(stop_at,))])
    assert (r.token_ids, r.finish_reason) == (free.token_ids[: first + 1], "stop")


# ------------------------------------------------------------------------------------- sampling


def test_penalties_and_bias_change_greedy_as_vllm_defines_them(qwen: Path) -> None:
    """A step-by-step reference: logit_bias, then repetition (prompt + completion), frequency and
    presence (completion) penalties, then the argmax."""
    tok = AutoTokenizer.from_pretrained(qwen)
    model = AutoModelForCausalLM.from_pretrained(qwen).eval()
    bias_token = tok.convert_tokens_to_ids(tok.tokenize(" the"))[0]
    params = {
        "repetition_penalty": 1.3,
        "frequency_penalty": 2.0,
        "presence_penalty": 1.5,
        "logit_bias": ((bias_token, 12.0),),
    }
    prompt = tok.apply_chat_template(
        [{"role": r, "content": c} for r, c in CONVERSATION], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(10):
            logits = model(torch.tensor([ids + out])).logits[0, -1].float()
            logits[bias_token] += 12.0
            seen = torch.tensor(sorted(set(ids + out)))
            picked = logits[seen]
            logits[seen] = torch.where(picked > 0, picked / 1.3, picked * 1.3)
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
            logits -= 2.0 * counts + 1.5 * (counts > 0).float()
            out.append(int(logits.argmax()))
    [r] = HFEngine(qwen).generate([chat(max_new_tokens=10, ignore_eos=True, **params)])
    [plain] = HFEngine(qwen).generate([chat(max_new_tokens=10, ignore_eos=True)])
    assert r.token_ids == out
    assert r.token_ids != plain.token_ids


def test_the_models_own_sampling_defaults_are_not_applied(qwen: Path) -> None:
    """generation_config.json says repetition_penalty 1.2: a greedy request without one is not
    penalised (transformers' generate would fill it in), one that asks for 1.2 is."""
    engine = HFEngine(qwen)
    plain, asked = engine.generate(
        [chat(ignore_eos=True, max_new_tokens=16), chat(ignore_eos=True, max_new_tokens=16, repetition_penalty=1.2)]
    )
    ids, _, _ = reference(qwen, CONVERSATION, max_new_tokens=16, eos_token_id=None)
    penalised, _, _ = reference(qwen, CONVERSATION, max_new_tokens=16, eos_token_id=None, repetition_penalty=1.2)
    assert plain.token_ids == ids and asked.token_ids == penalised
    assert ids != penalised  # the penalty matters on this model: the test can tell them apart
    with pytest.raises(RequestError, match="outside this model's vocabulary"):
        engine.generate([chat(logit_bias=((10**6, 1.0),))])


def test_top_k_one_is_greedy_and_sampling_is_seeded(qwen: Path) -> None:
    engine = HFEngine(qwen)
    greedy, top1, a, b = engine.generate(
        [
            chat(ignore_eos=True),
            chat(ignore_eos=True, temperature=1.5, top_k=1, seed=3),
            chat(ignore_eos=True, temperature=1.5, min_p=0.05, seed=3),
            chat(ignore_eos=True, temperature=1.5, min_p=0.05, seed=3),
        ]
    )
    assert top1.token_ids == greedy.token_ids
    assert a.token_ids == b.token_ids


# ------------------------------------------------------------------------------------- adapters


def _base_state(engine: HFEngine) -> dict[str, torch.Tensor]:
    model = engine._peft.get_base_model() if engine._peft is not None else engine._base
    return {
        k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k and "modules_to_save" not in k
    }


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    def plain(k: str) -> str:
        return k.replace(".base_layer", "").replace(".original_module", "")

    pa, pb = {plain(k): v for k, v in a.items()}, {plain(k): v for k, v in b.items()}
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("mode", ["merge", "unmerged"])
def test_every_adapter_kind_answers_as_peft_and_the_base_stays_bit_identical(
    qwen: Path, adapters: dict[str, Path], mode: str
) -> None:
    engine = HFEngine(qwen, adapter_mode=mode)
    before = _base_state(engine)
    [base_answer] = engine.generate([chat(ignore_eos=True)])
    for name, folder in adapters.items():
        engine.load_adapter(name, folder)
    for _ in range(2):  # switch through every adapter twice: merges and unmerges in turn
        answers = engine.generate([chat(ignore_eos=True, target=name) for name in adapters])
    for (name, folder), answer in zip(adapters.items(), answers):
        ids, _, _ = reference(qwen, CONVERSATION, adapter=folder, eos_token_id=None)
        assert answer.token_ids == ids, name
    [again] = engine.generate([chat(ignore_eos=True)])
    assert again.token_ids == base_answer.token_ids
    assert _same(_base_state(engine), before)
    for name in adapters:
        engine.unload_adapter(name)
    assert _same(_base_state(engine), before)


def test_a_failed_adapter_load_leaves_the_engine_as_it_was(
    qwen: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    other = make_qwen_chat_model(tmp_path / "other")  # same architecture, other vocabulary size? no: other weights
    wrong = make_chat_lora(other, tmp_path / "wrong-shape", r=8)
    cfg = (wrong / "adapter_config.json").read_text()
    # a wrong shape: the adapter's weights say rank 8, its config says rank 4
    (wrong / "adapter_config.json").write_text(cfg.replace('"r": 8', '"r": 4'))
    for first in (True, False):
        engine = HFEngine(qwen)
        if not first:
            engine.load_adapter("plain", adapters["plain"])
        before = _base_state(engine)
        answers = engine.generate([chat(ignore_eos=True)] + ([] if first else [chat(ignore_eos=True, target="plain")]))
        with pytest.raises(Exception, match="does not load"):
            engine.load_adapter("wrong", wrong)
        assert "wrong" not in engine.targets()
        assert _same(_base_state(engine), before)
        again = engine.generate([chat(ignore_eos=True)] + ([] if first else [chat(ignore_eos=True, target="plain")]))
        assert [a.token_ids for a in again] == [a.token_ids for a in answers]


def test_an_adapter_with_its_own_tokenizer_is_rendered_and_ended_by_it(
    qwen: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    """An adapter folder with a tokenizer of its own (a template, an EOS): its chats are rendered
    with its template and end at its EOS; the base and the other adapters keep theirs."""
    own = with_own_tokenizer(adapters["plain"], qwen, tmp_path / "own", eos_token=IM_START)
    engine = HFEngine(qwen)
    engine.load_adapter("own", own)
    engine.load_adapter("plain", adapters["plain"])
    question = (QUESTION,)  # no system turn: the two templates write different default ones
    got, plain = engine.generate([chat(question, target="own"), chat(question, target="plain")])
    ids, prompt_len, tok = reference(qwen, question, adapter=own, tokenizer=own)
    ends = {token_id(qwen, IM_END), token_id(qwen, ENDOFTEXT), token_id(qwen, IM_START)}
    assert got.prompt_tokens == prompt_len != plain.prompt_tokens
    assert got.token_ids == ids[: next((i + 1 for i, t in enumerate(ids) if t in ends), len(ids))]
    im_start = token_id(qwen, IM_START)
    forced = [chat(question, target=t, logit_bias=((im_start, 100.0),), max_new_tokens=3) for t in ("own", "plain")]
    ended, ran_on = engine.generate(forced)
    assert (ended.token_ids, ended.finish_reason) == ([im_start], "stop")  # the adapter's EOS ...
    assert (ran_on.token_ids, ran_on.finish_reason) == ([im_start] * 3, "length")  # ... is not the others'
    engine.unload_adapter("own")
    with pytest.raises(Exception, match="has 401 tokens, its base's 400"):
        engine.load_adapter("added", make_lora_with_added_tokens(qwen, tmp_path / "added"))
    assert sorted(engine.targets()) == sorted([engine.base_name, "plain"])


# ------------------------------------------------------------------------------------- gateway


@pytest.fixture(scope="module")
def gateway(qwen: Path, adapters: dict[str, Path], tmp_path_factory):
    """The gateway over real HTTP, its registry holding the Qwen base and every adapter kind."""
    from registry.service import Registry
    from services.gateway import GatewaySettings, LocalBackend, create_app
    from tests.servers import serve

    root = tmp_path_factory.mktemp("chat-gateway")
    registry = Registry(f"sqlite:///{root / 'registry.db'}", artifact_root=root / "store")
    registry.register_base("qwen-tiny", qwen)
    for name, folder in adapters.items():
        registry.register_expert(name, "adapter", folder, base="qwen-tiny", description=f"{name} adapter")
    with serve(create_app(LocalBackend(registry), registry, GatewaySettings(require_keys=False))) as url:
        yield url
    registry.close()


def _client(url: str):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_gateway_chat_through_the_openai_client_equals_transformers(
    gateway: str, qwen: Path, adapters: dict[str, Path]
) -> None:
    messages = [{"role": r, "content": c} for r, c in CONVERSATION]
    for model, adapter in (("plain", adapters["plain"]), ("dora", adapters["dora"])):
        raw = _client(gateway).chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=12)
        reply = raw.parse()
        ids, prompt_len, tok = reference(qwen, CONVERSATION, adapter=adapter)
        ends = {token_id(qwen, IM_END), token_id(qwen, ENDOFTEXT)}
        want = ids[: next((i for i, t in enumerate(ids) if t in ends), len(ids))]
        assert reply.choices[0].message.content == text_of(tok, want)
        assert reply.usage.prompt_tokens == prompt_len
        assert raw.headers["x-moe-prompt-rule"] == "chat_template"
        assert reply.model_extra["moe"]["prompt_rule"] == "chat_template"
        stream = _client(gateway).chat.completions.create(model=model, messages=messages, max_tokens=12, stream=True)
        assert (
            "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reply.choices[0].message.content
        )


def test_gateway_stops_on_generation_config_eos_and_honours_the_parameters(gateway: str, qwen: Path) -> None:
    import openai

    client = _client(gateway)
    messages = [{"role": "user", "content": "Hello"}]
    endoftext = token_id(qwen, ENDOFTEXT)
    reply = client.chat.completions.create(
        model="plain", messages=messages, max_tokens=20, logit_bias={str(endoftext): 100}
    )
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == ("", "stop")
    assert reply.usage.completion_tokens == 1
    reply = client.chat.completions.create(
        model="plain",
        messages=messages,
        max_tokens=4,
        logit_bias={str(endoftext): 100},
        extra_body={"ignore_eos": True},
    )
    assert (reply.choices[0].finish_reason, reply.usage.completion_tokens) == ("length", 4)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="plain", messages=messages, max_tokens=250)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="plain", messages=messages, logprobs=True)
    assert info.value.code == "unsupported_parameter"


def test_after_a_dora_adapter_served_the_others_answer_as_before(gateway: str) -> None:
    client = _client(gateway)
    messages = [{"role": r, "content": c} for r, c in CONVERSATION]
    others = ["plain", "patterned", "rslora", "saves"]

    def answers() -> list[str]:
        return [
            client.chat.completions.create(model=m, messages=messages, max_tokens=8, extra_body={"ignore_eos": True})
            .choices[0]
            .message.content
            for m in others
        ]

    before = answers()
    for _ in range(3):
        client.chat.completions.create(model="dora", messages=messages, max_tokens=8)
    assert answers() == before


# ------------------------------------------------------------------------------------- strategies


def test_strategies_answer_over_unusual_experts_and_say_whom_they_left_out(
    qwen: Path, adapters: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    """An expert without examples, a DoRA adapter, one with modules_to_save: example-based routers
    and token-level mixtures leave out what they cannot use, and answer with the rest."""
    from registry.service import Registry
    from services.moe.pool import ExpertPool
    from services.moe.strategies import MoE

    monkeypatch.setenv("MOERGE_HOME", str(tmp_path / "home"))
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}", artifact_root=tmp_path / "store")
    registry.register_base("qwen-tiny", qwen)
    topics = {
        "plain": "colours",
        "dora": "fruit",
        "patterned": "rivers",
        "rslora": "numbers",
        "saves": "trees",
        "tied-head": "birds",
    }
    for name, folder in adapters.items():
        examples = [
            {
                "prompt": f"Tell me about {topics[name]} number {i}",
                "reference": f"{topics[name]} {i}",
                "task": topics[name],
                "split": split,
            }
            for i, split in ((i, "train" if i < 6 else "validation") for i in range(8))
        ]
        registry.register_expert(name, "adapter", folder, base="qwen-tiny", examples=examples)
    registry.register_expert("silent", "adapter", adapters["plain"], base="qwen-tiny")  # no examples at all
    moe = MoE(ExpertPool(registry))
    messages = (("system", "Be brief."), ("user", "Tell me about fruit number 3"))
    for strategy, left in (
        ("moe/semantic", {"silent"}),
        ("moe/glider", {"silent", "dora", "saves"}),
        ("moe/ties", {"dora", "saves"}),
    ):
        [(completion, routed)] = moe.run(
            strategy, ["Tell me about fruit number 3"], max_new_tokens=6, messages=messages
        )
        assert completion.finish_reason in ("stop", "length")
        assert completion.prompt_rule == "chat_template", strategy
        assert set(completion.provenance.info.get("left_out", {})) == left, strategy
        used = {name for name, _ in completion.experts}
        assert not used & left, strategy
    registry.close()


def test_a_trusted_remote_code_base_merges_and_fits_token_routers(
    qwen: Path, adapters: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    """A base registered with --trust-remote-code runs its own code in every path that loads it:
    the engines, the merges and the token routers' fitting (which loaded it without trust and
    failed)."""
    from registry.service import Registry
    from services.moe.pool import ExpertPool
    from services.moe.strategies import MoE

    custom = make_remote_code_model(qwen, tmp_path / "custom-qwen")
    with pytest.raises(ValueError, match="trust_remote_code"):  # what the flag guards
        AutoModelForCausalLM.from_pretrained(custom)
    monkeypatch.setenv("MOERGE_HOME", str(tmp_path / "home"))
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}", artifact_root=tmp_path / "store")
    registry.register_base("custom-qwen", custom, trust_remote_code=True)
    for name, topic in (("plain", "colours"), ("rslora", "numbers")):
        examples = [
            {
                "prompt": f"Tell me about {topic} number {i}",
                "reference": f"{topic} {i}",
                "task": topic,
                "split": "train" if i < 6 else "validation",
            }
            for i in range(8)
        ]
        registry.register_expert(name, "adapter", adapters[name], base="custom-qwen", examples=examples)
    moe = MoE(ExpertPool(registry))
    for strategy in ("moe/ties", "moe/phatgoose"):
        [(completion, _)] = moe.run(
            strategy,
            ["Tell me about numbers number 3"],
            max_new_tokens=4,
            messages=(("user", "Tell me about numbers number 3"),),
        )
        assert completion.finish_reason in ("stop", "length"), strategy
        assert {name for name, _ in completion.experts} <= {"plain", "rslora"}, strategy
        assert completion.experts, strategy
    registry.close()


def test_the_admin_api_refuses_what_the_served_engine_cannot_serve(
    qwen: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    """The Ray gateway's backend knows the serve config (vLLM for this base): POST /v1/experts of
    a DoRA or modules_to_save adapter is refused, and leaves nothing behind."""
    import anyio

    from registry.errors import RegistrationError
    from registry.service import Registry
    from services.gateway import LocalBackend

    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}", artifact_root=tmp_path / "store")
    registry.register_base("qwen-tiny", qwen)
    backend = LocalBackend(registry, engine_for_base=lambda base: ("vllm", {"max_lora_rank": 64}))
    for name, why in (("dora", "does not serve DoRA"), ("saves", r"modules_to_save \(norm\)")):
        spec = {"name": name, "kind": "adapter", "source": str(adapters[name]), "base": "qwen-tiny"}
        with pytest.raises(RegistrationError, match=why):
            anyio.run(backend.register_expert, spec)
    anyio.run(
        backend.register_expert,
        {"name": "plain", "kind": "adapter", "source": str(adapters["plain"]), "base": "qwen-tiny"},
    )
    assert [e.name for e in registry.list_experts()] == ["plain"]
    assert sorted(p.name for p in (tmp_path / "store" / "experts").iterdir()) == ["plain"]
    registry.close()


# ------------------------------------------------------------------------------------- devices


def test_device_and_dtype_reach_the_engines(qwen: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    import torch

    from composer.engine_protocol import EngineError
    from registry.service import Registry
    from services.engines.devices import resolve_device, resolve_dtype
    from services.gateway import LocalBackend
    from services.gateway.backend import SamplingParams

    assert (resolve_device("auto"), resolve_dtype("auto")) == (
        (torch.device("cuda"), resolve_dtype("auto"))
        if torch.cuda.is_available()
        else (torch.device("cpu"), torch.float32)
    )
    engine = HFEngine(qwen, dtype="bfloat16")
    assert {p.dtype for p in engine.base_model.parameters()} == {torch.bfloat16}
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="no CUDA device"):
            HFEngine(qwen, device="cuda")
    with pytest.raises(EngineError, match="dtype 'float8'"):
        HFEngine(qwen, dtype="float8")
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}", artifact_root=tmp_path / "store")
    registry.register_base("qwen-tiny", qwen)
    registry.register_expert("plain", "adapter", adapters["plain"], base="qwen-tiny")
    # what `moerge serve --no-ray` builds from the serve config's engine_args for this base
    backend = LocalBackend(registry, engine_for_base=lambda base: ("hf", {"dtype": "bfloat16"}))
    done = backend.run_expert("plain", "Hello", SamplingParams(max_tokens=3, messages=(("user", "Hello"),)))
    assert done.outputs[0].prompt_rule == "chat_template"
    [slot] = backend._slots.values()
    assert slot.engine.dtype == torch.bfloat16
    registry.close()


def test_cli_generate_chats_through_the_template(qwen: Path, adapters: dict[str, Path], home: Path) -> None:
    from typer.testing import CliRunner

    from services.cli import app

    def run(*args: str) -> str:
        result = CliRunner().invoke(app, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    run("base", "add", "Qwen/tiny-chat", str(qwen))
    run("register", str(adapters["plain"]), "--name", "plain", "--base", "Qwen/tiny-chat")
    out = run(
        "generate",
        "Name a fruit",
        "--expert",
        "plain",
        "--chat",
        "--system",
        "Be brief.",
        "-n",
        "4",
        "--usage",
        "--dtype",
        "bfloat16",
    )
    assert "prompt_rule=chat_template" in out
    raw = run("generate", "Name a fruit", "--expert", "plain", "-n", "4", "--usage")
    assert "prompt_rule=raw" in raw


def test_the_admin_api_returns_a_registrations_warnings(qwen: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    import json
    import shutil

    import anyio

    from registry.service import Registry
    from services.gateway import LocalBackend

    folder = Path(shutil.copytree(adapters["plain"], tmp_path / "other"))
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/else"}))
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}", artifact_root=tmp_path / "store")
    registry.register_base("qwen-tiny", qwen)
    backend = LocalBackend(registry)
    for name in ("a", "b"):  # every registration's warning, not only the process's first
        card = anyio.run(
            backend.register_expert, {"name": name, "kind": "adapter", "source": str(folder), "base": "qwen-tiny"}
        )
        assert len(card["warnings"]) == 1 and "'org/else'" in card["warnings"][0]
    registry.close()


def test_a_base_answers_by_its_name(gateway: str, qwen: Path) -> None:
    """`model` may name a registered base: it answers itself, through its chat template, on the
    engine its adapters share; /v1/models lists it."""
    client = _client(gateway)
    assert ("qwen-tiny", "base") in {(m.id, m.model_extra["kind"]) for m in client.models.list().data}
    messages = [{"role": r, "content": c} for r, c in CONVERSATION]
    raw = client.chat.completions.with_raw_response.create(model="qwen-tiny", messages=messages, max_tokens=12)
    reply = raw.parse()
    ids, prompt_len, tok = reference(qwen, CONVERSATION)
    ends = {token_id(qwen, IM_END), token_id(qwen, ENDOFTEXT)}
    want = ids[: next((i for i, t in enumerate(ids) if t in ends), len(ids))]
    assert reply.choices[0].message.content == text_of(tok, want)
    assert reply.usage.prompt_tokens == prompt_len and raw.headers["x-moe-prompt-rule"] == "chat_template"
    assert reply.model_extra["moe"]["info"]["kind"] == "base"
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)


def test_a_text_scored_from_an_empty_prompt_reads_eos_where_there_is_no_bos(qwen: Path) -> None:
    """A Qwen tokenizer has no BOS: a whole text (a text suite's document) is scored after its EOS
    token, and every token of the text is scored; each comes with its characters."""
    from composer.engine_protocol import ScoreRequest

    tok = AutoTokenizer.from_pretrained(str(qwen))
    model = AutoModelForCausalLM.from_pretrained(str(qwen)).eval()
    assert tok.bos_token_id is None
    text = "The loader reads a file, then returns it."
    [result] = HFEngine(qwen).score([ScoreRequest("", text, offsets=True)])
    ids = [tok.eos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(torch.tensor(result.token_logprobs), expected, atol=1e-5, rtol=1e-5)
    assert "".join(text[a:b] for a, b in result.offsets) == text and len(result.offsets) == len(ids) - 1
