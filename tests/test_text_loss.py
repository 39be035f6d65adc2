"""The domains suite's metric: nats per token of held-out text, booked per segment, equal to
transformers' own loss on the same ids."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from services.leaderboard.text_loss import LossTotals, document_loss, model_forward, tokenize_segments
from services.zoo import domains as D
from services.zoo.bpe import BOS, train_bpe
from tests.chat_models import make_qwen_chat_model

SEGMENTS = [
    ("prose", "The river was quiet and the lamp was warm.\n\n```python\n"),
    ("python", "def load_river(path):\n    return len(path)\n"),
    ("prose", "```\n\nAt last, the city slept."),
]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    folder = make_qwen_chat_model(tmp_path_factory.mktemp("qwen"))
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def llama():
    tok = train_bpe([t for d in D.DOMAINS for t in D.documents(d, "train", 50)], vocab_size=600)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tok


@pytest.mark.parametrize("which", ["qwen", "llama"])
def test_the_loss_equals_transformers_loss_on_the_same_ids(which, request):
    model, tok = request.getfixturevalue(which)
    totals = document_loss(model_forward(model), tok, SEGMENTS)
    text = "".join(part for _, part in SEGMENTS)
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = float(model(input_ids=ids, labels=ids).loss)
    assert sum(totals.tokens.values()) == ids.shape[1] - 1
    assert totals.per_token() == pytest.approx(want, rel=1e-5)
    assert totals.perplexity() == pytest.approx(math.exp(want), rel=1e-5)
    assert set(totals.tokens) == {"prose", "python"}


def test_tokens_are_booked_to_the_segment_of_their_first_character(llama):
    _, tok = llama
    ids, labels = tokenize_segments(tok, SEGMENTS)
    assert ids[0] == tok.convert_tokens_to_ids(BOS) and labels[0] == "prose"  # the BOS this tokenizer adds
    pieces = [tok.decode([i]) for i in ids[1:]]
    python_text = "".join(p for p, label in zip(pieces, labels[1:]) if label == "python")
    assert python_text.strip() == SEGMENTS[1][1].strip()
    truncated, cut = tokenize_segments(tok, SEGMENTS, max_length=5)
    assert truncated == ids[:5] and cut == labels[:5]


def test_totals_merge_and_average_per_label():
    a, b = LossTotals(), LossTotals()
    a.book("code", 6.0, 3)
    b.book("code", 2.0, 1)
    b.book("prose", 1.0, 2)
    a.add(b)
    assert a.per_token("code") == 2.0 and a.per_token("prose") == 0.5 and a.per_token() == 9.0 / 6
    assert math.isnan(a.per_token("shell"))


@pytest.mark.parametrize("which", ["qwen", "llama"])
def test_a_long_document_is_cut_to_fit_and_its_opening_is_its_first_tokens(which, request):
    from services.moe.texts import fit_document, fitting_prefix, opening

    _, tok = request.getfixturevalue(which)
    text = "".join(part for _, part in SEGMENTS)
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    assert fit_document(tok, SEGMENTS, n) == SEGMENTS  # fits: unchanged
    for limit in (n - 1, n // 2, 3):
        cut = fit_document(tok, SEGMENTS, limit)
        kept = "".join(part for _, part in cut)
        assert text.startswith(kept) and len(tok(kept, add_special_tokens=False)["input_ids"]) <= limit
        assert [label for label, _ in cut] == [label for label, _ in SEGMENTS][: len(cut)]
    first = opening(tok, text, 5)
    assert tok(first, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"][:5]
    assert opening(tok, "short", 64) == "short"
    assert fitting_prefix(tok, text, 0) == "" and fitting_prefix(tok, text, None) == text
