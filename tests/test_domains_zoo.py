"""The domains zoo (issue 17), on its micro size: experts that know their own domain's text better
than the base does, in standard folders, with held-out documents labelled by segment, and a CLI
that builds and registers it like the skills zoo."""

from __future__ import annotations

import json

import pytest

from services.zoo import domains as D


@pytest.mark.slow
def test_every_expert_is_best_on_its_own_domain_and_below_the_base(micro_domains_zoo):
    m = micro_domains_zoo
    assert m.zoo == "domains" and m.ok, m.failures
    base = m.outcomes[m.base.name]
    assert set(base) == set(D.DOMAINS)
    for e in m.experts:
        for d in e.domains:
            assert m.outcomes[e.name][d] < base[d] * (1 - m.floors["own_gain_min"]), (e.name, d)
    for d in D.DOMAINS:  # the lowest loss on a domain is an expert's that owns it
        best = min(m.experts, key=lambda e: m.outcomes[e.name][d])
        assert d in best.domains, (d, best.name)
    kinds = {e.name: e.kind for e in m.experts}
    assert kinds["dom-arithmetic-full"] == "model" and kinds["dom-code"] == "adapter"
    assert {e.name for e in m.experts if set(e.domains) & {"python"}} == {"dom-python", "dom-code"}


@pytest.mark.slow
def test_the_zoo_is_in_standard_folders_with_its_own_bpe(micro_domains_zoo):
    from peft import PeftConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = micro_domains_zoo
    tok = AutoTokenizer.from_pretrained(str(m.path_of("base")))
    ids = tok("def f(x):\n    return x")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) < len("def f(x):\n    return x")  # merges, not bytes
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    for e in m.experts:
        if e.kind == "adapter":
            assert PeftConfig.from_pretrained(str(m.path_of(e.path))).base_model_name_or_path
        else:
            model = AutoModelForCausalLM.from_pretrained(str(m.path_of(e.path)))
            assert model.config.vocab_size == len(tok)
    assert m.corpus_sha256 == D.corpus_digest([t for d in D.DOMAINS for t in D.documents(d, "train", 200, 0)])


@pytest.mark.slow
def test_held_out_documents_are_labelled_segments(micro_domains_zoo):
    m = micro_domains_zoo
    rows = {s: [json.loads(x) for x in m.path_of(p).read_text().splitlines()] for s, p in m.suite.items()}
    assert set(rows) == {"test", "mixed"}
    assert all(len(r["segments"]) == 1 for r in rows["test"])
    assert {r["segments"][0][0] for r in rows["test"]} == set(D.DOMAINS)
    mixed_domains = [{d for d, _ in r["segments"]} for r in rows["mixed"]]
    assert all(len(ds) >= 2 for ds in mixed_domains)
    # held out: no test document is a training document of any expert
    train = {json.loads(x)["prompt"] for e in m.experts for x in m.path_of(e.train_examples).read_text().splitlines()}
    assert not train & {r["segments"][0][1] for r in rows["test"]}


@pytest.mark.slow
def test_cli_builds_and_registers_the_domains_zoo(micro_domains_zoo, home, monkeypatch):
    from typer.testing import CliRunner

    import services.zoo.domains_build as domains_build
    from registry.service import Registry
    from services.cli import app

    monkeypatch.setattr(domains_build, "build_domains_zoo", lambda *a, **k: micro_domains_zoo)
    result = CliRunner().invoke(app, ["zoo", "build", "--suite", "domains", "--size", "micro", "--register"])
    assert result.exit_code == 0, result.output
    assert "held-out loss" in result.output and "floors: every floor held" in result.output
    with Registry() as registry:
        experts = {e.name: e for e in registry.list_experts()}
        assert set(experts) == {e.name for e in micro_domains_zoo.experts}
        assert all(e.base.name == "zoo-domains-base-micro" for e in experts.values() if e.kind == "adapter")
        assert experts["dom-code"].domains == ["python", "shell"]
        examples = registry.get_examples("dom-shell", split="train")
        assert examples and all(x.task == "shell" and x.prompt.startswith(("$ ", "#!/bin/bash")) for x in examples)

    result = CliRunner().invoke(app, ["zoo", "build", "--suite", "nope", "--size", "micro"])
    assert result.exit_code == 1 and "unknown zoo suite" in str(result.exception)


@pytest.mark.slow
def test_phatgoose_routing_follows_the_segments_of_mixed_documents(micro_domains_zoo):
    """Gates trained as PHATGOOSE trains them (on each domain expert's own text), then per token
    and module the top-1 expert against the token's segment. Mixed documents are mostly prose, so
    the measure is the mean recall per domain (balanced accuracy): always picking one expert scores
    1 / 5 (measured on the micro zoo: 0.46)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from routers.phatgoose import PHATGOOSE, train_gates
    from routers.tokenwise import read_lora_factors
    from services.leaderboard.text_loss import tokenize_segments

    m = micro_domains_zoo
    tok = AutoTokenizer.from_pretrained(str(m.path_of(m.base.path)))
    base = AutoModelForCausalLM.from_pretrained(str(m.path_of(m.base.path))).eval()
    experts = [e for e in m.experts if e.kind == "adapter" and len(e.domains) == 1]
    domains = [e.domains[0] for e in experts]
    assert sorted(domains) == sorted(D.DOMAINS)
    keys = {}
    for e in experts:
        pairs = [("", t) for t in D.documents(e.domains[0], "train", 100, m.seed)]
        gates, _ = train_gates(
            base,
            tok,
            read_lora_factors(m.path_of(e.path)),
            pairs,
            steps=30,
            batch_size=16,
            max_length=160,
            loss_on="sequence",
        )
        keys[e.name] = {mod: PHATGOOSE.keys(v.float()) for mod, v in gates.items()}
    modules = list(keys[experts[0].name])

    inputs: dict[str, list[torch.Tensor]] = {mod: [] for mod in modules}

    def record(mod):
        return lambda _module, args: inputs[mod].append(args[0][0].float())

    hooks = [base.get_submodule(mod).register_forward_pre_hook(record(mod)) for mod in modules]
    labels: list[int] = []
    try:
        for segments in D.mixed_documents("test", 12, m.seed):
            ids, segment_of = tokenize_segments(tok, [(s.domain, s.text) for s in segments], 160)
            with torch.no_grad():
                base(input_ids=torch.tensor([ids]))
            labels += [domains.index(d) for d in segment_of]
    finally:
        for h in hooks:
            h.remove()
    y = torch.tensor(labels)
    present = [c for c in range(len(domains)) if (y == c).any()]
    assert len(present) >= 4  # the mixed documents hold most domains
    balanced = []
    for mod in modules:
        top1 = PHATGOOSE.torch_scores(torch.cat(inputs[mod]), torch.stack([keys[e.name][mod] for e in experts], 1))
        top1 = top1.argmax(-1)
        balanced.append(sum(float((top1[y == c] == c).float().mean()) for c in present) / len(present))
    assert sum(balanced) / len(balanced) >= 0.3, [round(b, 2) for b in balanced]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "weights", "density"), [("task_arithmetic", (0.5, 0.5), None), ("ties", (1.0, 1.0), 1.0)]
)
def test_a_merge_of_an_expert_with_itself_is_that_expert(micro_domains_zoo, tmp_path, method, weights, density):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from composer.merge import merge_adapters

    m = micro_domains_zoo
    expert = m.path_of(m.expert("dom-shell").path)
    merged = merge_adapters(
        m.path_of(m.base.path), {"a": expert, "b": expert}, weights, method, density, out_dir=tmp_path
    )
    ids = torch.tensor([list(range(3, 60))])

    def logits(adapter):
        base = AutoModelForCausalLM.from_pretrained(str(m.path_of(m.base.path)))
        with torch.no_grad():
            return PeftModel.from_pretrained(base, str(adapter)).eval()(input_ids=ids).logits

    want, got = logits(expert), logits(merged.path)
    # float32: peft re-factors the merged ΔW by SVD; its rounding is far below any routing effect
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(
        want, AutoModelForCausalLM.from_pretrained(str(m.path_of(m.base.path)))(input_ids=ids).logits
    )
