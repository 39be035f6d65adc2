"""The domains suite's text and its BPE: the same bytes from the same seed, labelled segments, a
tokenizer that round-trips every domain and speaks ChatML."""

from __future__ import annotations

import pytest

from services.zoo import domains as D
from services.zoo.bpe import EOS, IM_END, IM_START, train_bpe


def test_the_same_seed_gives_the_same_bytes_and_splits_are_disjoint():
    for domain in D.DOMAINS:
        a = D.documents(domain, "train", 30, seed=0)
        assert a == D.documents(domain, "train", 30, seed=0)
        assert D.corpus_digest(a) != D.corpus_digest(D.documents(domain, "train", 30, seed=1))
        held_out = set(D.documents(domain, "test", 30, seed=0))
        # generated from other streams: a test document is at most rarely a training one
        assert len(held_out & set(a)) <= 1, domain


def test_the_corpus_bytes_do_not_depend_on_the_machine():
    # Python's random is the same Mersenne Twister on every platform and the generators use no
    # floats in the text: this digest, computed once, holds on any machine, and pins the generators
    # (a change to them changes the suite, and must change this value on purpose)
    texts = [t for d in D.DOMAINS for t in D.documents(d, "train", 5, seed=0)]
    assert D.corpus_digest(texts) == "c9bd5c4d2a2dfaa2b3dbd2a804f80b08d3a18b27708308dee705a08105054dbd"


def test_each_domain_reads_as_its_kind():
    one = {d: D.documents(d, "validation", 20, seed=3) for d in D.DOMAINS}
    assert all("def " in t or "class " in t for t in one["python"])
    assert all("=" in t and t.split("\n")[-1].startswith("= ") for t in one["arithmetic"])
    assert all(t.startswith(("$ ", "#!/bin/bash")) for t in one["shell"])
    assert all(t[0].isupper() and t.rstrip().endswith((".", "!")) for t in one["prose"])
    assert all(t.startswith("[") or "," in t.split("\n")[0] or t.split("\n")[0].endswith(":") for t in one["data"])


@pytest.mark.parametrize("kind", D.MIXED_KINDS)
def test_mixed_documents_interleave_labelled_domains(kind):
    import random

    rng = random.Random(7)
    for _ in range(10):
        segments = D.mixed_document(kind, rng)
        domains = [s.domain for s in segments]
        assert set(domains) <= set(D.DOMAINS) and len(set(domains)) >= 2, domains
        assert all(s.text for s in segments)
    with pytest.raises(ValueError, match="unknown mixed kind"):
        D.mixed_document("poetry", rng)
    docs = D.mixed_documents("test", 6, seed=0)
    assert docs == D.mixed_documents("test", 6, seed=0)


def test_the_bpe_round_trips_every_domain_and_has_domain_tokens():
    texts = [t for d in D.DOMAINS for t in D.documents(d, "train", 200, seed=0)]
    tok = train_bpe(texts, vocab_size=1024)
    assert len(tok) == 1024
    for segments in D.mixed_documents("test", 6, seed=0):
        text = "".join(s.text for s in segments)
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # frequent domain strings became tokens of their own: fewer tokens than bytes by far
    code = D.documents("python", "test", 5, seed=0)[0]
    assert len(tok(code)["input_ids"]) < len(code.encode()) / 2
    assert tok.eos_token == EOS and tok.pad_token_id is not None
    chat = tok.apply_chat_template([{"role": "user", "content": "ls -la"}], tokenize=False, add_generation_prompt=True)
    assert chat == f"{IM_START}user\nls -la{IM_END}\n{IM_START}assistant\n"
    assert tok.convert_tokens_to_ids(IM_END) != tok.unk_token_id
