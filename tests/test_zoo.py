"""The zoo: the skill suite's guarantees, and a real (micro) build of base, adapters and model."""

from __future__ import annotations

import json

import pytest

from services.zoo.skills import (
    COMPOSITIONS,
    GENERIC_TASKS,
    SKILLS,
    SPLITS,
    composition_name,
    exact_match,
    format_prompt,
    make_split,
)

# ---------------------------------------------------------------- suite


def test_suite_shape():
    assert len(SKILLS) >= 8
    for s in SKILLS.values():
        assert s.domain in ("math", "text")
        assert len(s.templates) >= 3 and len(s.paraphrases) >= 2 and s.tags
    assert not set(SKILLS) & set(GENERIC_TASKS)


@pytest.mark.parametrize("split", SPLITS)
def test_splits_deterministic_by_seed(split):
    a, b = make_split(split, 10, seed=3), make_split(split, 10, seed=3)
    assert a == b
    assert a != make_split(split, 10, seed=4)


def test_every_task_gets_its_examples():
    for split in ("train", "validation", "test", "paraphrase"):
        ex = make_split(split, 20, seed=0)
        for name in SKILLS:
            assert sum(e.task == name for e in ex) == 20
    comp = make_split("composition", 20, seed=0)
    assert {e.task for e in comp} == {composition_name(p) for p in COMPOSITIONS}


def test_paraphrase_wordings_never_trained():
    train_instr = {e.instruction for e in make_split("train", 300, seed=0)}
    para_instr = {e.instruction for e in make_split("paraphrase", 50, seed=0)}
    assert para_instr and not train_instr & para_instr
    for s in SKILLS.values():
        assert not set(s.templates) & set(s.paraphrases)


def test_train_and_heldout_inputs_disjoint():
    train = {(e.task, e.input) for e in make_split("train", 500, seed=0)}
    for split in ("validation", "test", "paraphrase"):
        held = {(e.task, e.input) for e in make_split(split, 100, seed=1)}
        assert not train & held, split
    # composition inputs are never a training input of their first skill
    for e in make_split("composition", 100, seed=0):
        assert (e.skills[0], e.input) not in train


def test_identity_and_other_skills_are_wrong():
    for e in make_split("test", 100, seed=0):
        assert not exact_match(e.input, e.reference), e
        for name, s in SKILLS.items():
            if name == e.task:
                continue
            try:
                other = s.apply(e.input)
            except ValueError:
                continue
            assert not exact_match(other, e.reference), (e, name)


def test_composition_reference_is_the_chain():
    for e in make_split("composition", 30, seed=0):
        x = e.input
        for p in e.skills:
            x = SKILLS[p].apply(x)
        assert x == e.reference and e.task == "+".join(e.skills) and len(e.skills) == 2
        assert e.reference not in {e.input} | {SKILLS[p].apply(e.input) for p in e.skills}


def test_prompt_format_and_exact_match():
    e = make_split("test", 1, seed=0)[0]
    assert e.prompt == format_prompt(e.instruction, e.input) and e.prompt.endswith("\nAnswer: ")
    assert exact_match(" abc\n", "abc") and not exact_match("abd", "abc")
    longest = max(len(e.prompt + e.reference) for sp in ("train", "test") for e in make_split(sp, 200, seed=0))
    assert longest <= 64


def test_registered_skills_carry_the_keywords_of_a_one_skill_adapter():
    from services.zoo.build import ExpertEntry
    from services.zoo.register import registered_skills

    adapter = ExpertEntry("skill-reverse", "adapter", "experts/x", "zoo-base", ["text"], ["reverse"], "d", "t", "v")
    assert registered_skills(adapter) == ["reverse", *SKILLS["reverse"].tags]
    model = ExpertEntry("domain-math", "model", "experts/y", "zoo-base", ["math"], ["count", "max"], "d", "t", "v")
    assert registered_skills(model) == ["count", "max"]


# ---------------------------------------------------------------- micro build


@pytest.mark.slow
def test_micro_zoo_outcomes(micro_zoo):
    from services.zoo.build import SIZES

    floors = SIZES["micro"].floors
    assert micro_zoo.outcomes and not micro_zoo.failures, micro_zoo.failures
    base = micro_zoo.outcomes[micro_zoo.base.name]
    assert set(base) == set(SKILLS) and max(base.values()) <= floors.base_max
    for e in micro_zoo.experts:
        row = micro_zoo.outcomes[e.name]
        assert min(row[s] for s in e.skills) >= floors.own_min, (e.name, row)
        assert max(v for s, v in row.items() if s not in e.skills) <= floors.foreign_max, (e.name, row)


@pytest.mark.slow
def test_micro_zoo_manifest(micro_zoo):
    from services.zoo.build import ZooManifest, read_examples

    again = ZooManifest.load(micro_zoo.path_of(ZooManifest.MANIFEST))
    assert again.to_json() == micro_zoo.to_json()
    assert {e.name for e in again.experts} >= {s.expert_name for s in SKILLS.values()}
    assert sum(e.kind == "model" for e in again.experts) == 1
    for e in again.experts:
        assert e.base == again.base.name and e.skills and e.domains and e.description
        train = read_examples(again.path_of(e.train_examples))
        val = read_examples(again.path_of(e.validation_examples))
        assert train and val and {x.task for x in train} == set(e.skills)
        row = json.loads(again.path_of(e.train_examples).read_text().splitlines()[0])
        assert {"prompt", "reference", "task", "split"} <= set(row)
    assert set(again.timings) >= {"pretrain_base", "experts", "evaluate", "total"}


@pytest.mark.slow
def test_micro_zoo_checkpoints_load(micro_zoo):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.zoo.evaluate import generate_greedy

    base_dir = micro_zoo.path_of(micro_zoo.base.path)
    assert (base_dir / "model.safetensors").exists() and (base_dir / "tokenizer.json").exists()
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    cfg = base.config
    assert cfg.model_type == "llama" and cfg.head_dim in (32, 64) and cfg.max_position_embeddings >= 128
    adapter = next(e for e in micro_zoo.experts if e.kind == "adapter")
    adir = micro_zoo.path_of(adapter.path)
    assert (adir / "adapter_config.json").exists() and (adir / "adapter_model.safetensors").exists()
    assert json.loads((adir / "adapter_config.json").read_text())["r"] in (8, 16, 32, 64)
    peft_model = PeftModel.from_pretrained(base, str(adir))
    skill = adapter.skills[0]
    test = [e for e in make_split("test", 8, seed=micro_zoo.seed) if e.task == skill]
    preds = generate_greedy(peft_model, tok, [e.prompt for e in test], 12, batch_size=4)
    assert len(preds) == len(test) and all(isinstance(p, str) for p in preds)
    enc = tok([test[0].prompt], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():  # the trained adapter changes what the base predicts
        with_adapter = peft_model(**enc).logits
        with peft_model.disable_adapter():
            without = peft_model(**enc).logits
    assert not torch.allclose(with_adapter, without)
    full = next(e for e in micro_zoo.experts if e.kind == "model")
    model = AutoModelForCausalLM.from_pretrained(str(micro_zoo.path_of(full.path)))
    AutoTokenizer.from_pretrained(str(micro_zoo.path_of(full.path)))
    with torch.no_grad():
        assert not torch.equal(model.lm_head.weight, base.lm_head.weight)


@pytest.mark.slow
def test_micro_zoo_records_its_machine(micro_zoo):
    import torch

    machine = micro_zoo.machine
    assert machine["cpu"] and machine["cores"] >= 1
    assert machine["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["packages"]["torch"] == torch.__version__
    assert {"transformers", "peft", "tokenizers"} <= set(machine["packages"])


# ---------------------------------------------------------------- floors gate registration


def _registered_experts() -> list[str]:
    from registry.service import Registry

    with Registry() as registry:
        return [e.name for e in registry.list_experts()]


@pytest.mark.slow
def test_build_below_a_floor_exits_non_zero_and_registers_nothing(micro_zoo, home, monkeypatch):
    import dataclasses

    from typer.testing import CliRunner

    import services.zoo.build as build
    from services.cli import app

    missed = dataclasses.replace(micro_zoo, failures=["skill-max scores 40% on its own skill max (min 90%)"])
    monkeypatch.setattr(build, "build_zoo", lambda *a, **k: missed)
    result = CliRunner().invoke(app, ["zoo", "build", "--size", "micro", "--register"])
    assert result.exit_code == 1, result.output
    assert "floors: 1 missed" in result.output and "skill-max scores 40%" in result.output
    assert _registered_experts() == []

    monkeypatch.setattr(build, "build_zoo", lambda *a, **k: micro_zoo)
    result = CliRunner().invoke(app, ["zoo", "build", "--size", "micro"])
    assert result.exit_code == 0, result.output
    assert "floors: every floor held" in result.output


@pytest.mark.slow
def test_register_refuses_a_zoo_that_missed_floors(micro_zoo, home, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from registry.errors import MoergeError
    from services.cli import app
    from services.zoo.build import ZooManifest

    copy = tmp_path / "zoo"
    shutil.copytree(micro_zoo.root, copy)
    manifest = ZooManifest.load(copy)
    manifest.failures = ["skill-max scores 40% on its own skill max (min 90%)"]
    manifest.save(copy)
    result = CliRunner().invoke(app, ["zoo", "register", str(copy)])
    # the CLI's entry point prints a MoergeError as one red line and exits 1
    assert result.exit_code == 1 and isinstance(result.exception, MoergeError)
    assert "missed 1 floor" in str(result.exception) and "--below-floors" in str(result.exception)
    assert _registered_experts() == []
    result = CliRunner().invoke(app, ["zoo", "register", str(copy), "--below-floors"])
    assert result.exit_code == 0, result.output
    assert set(_registered_experts()) == {e.name for e in manifest.experts}


# ---------------------------------------------------------------- training reaches a check


def _tiny_rows_and_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=16,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    rows = [([1, 2, 3, 4], [1, 2, 3, 4]), ([5, 6, 7], [5, 6, 7])] * 4
    return LlamaForCausalLM(cfg), rows


def _record_rates(monkeypatch) -> list[float]:
    """The learning rate of every optimizer step, in order."""
    import torch

    lrs: list[float] = []
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return lrs


def test_training_goes_past_its_cycle_until_the_check_passes():
    from services.zoo.train import TrainSpec, train_loop

    model, rows = _tiny_rows_and_model()
    spec = TrainSpec(steps=10, lr=1e-3, batch_size=4, warmup=2, check_every=5, max_steps=30)
    calls = []
    stats: dict = {}
    losses = train_loop(
        model, rows, spec, pad_id=0, good_enough=lambda: calls.append(1) or len(calls) == 3, stats=stats
    )
    assert len(losses) == 15 and stats["steps"] == 15 and stats["passed"] is True and stats["checks"] == 3


def test_training_stops_at_its_budget_and_says_the_check_failed(monkeypatch):
    from services.zoo.train import TrainSpec, train_loop

    model, rows = _tiny_rows_and_model()
    spec = TrainSpec(steps=10, lr=1e-3, batch_size=4, warmup=2, check_every=5, max_steps=30)
    lrs = _record_rates(monkeypatch)
    stats: dict = {}
    losses = train_loop(model, rows, spec, pad_id=0, good_enough=lambda: False, stats=stats)
    assert len(losses) == 30 and stats["passed"] is False and stats["checks"] == 6
    # each cycle after the warm-up starts again, at half the last one's peak, and decays
    assert lrs[2] == pytest.approx(1e-3) and lrs[10] == pytest.approx(5e-4) and lrs[18] == pytest.approx(2.5e-4)
    assert lrs[9] < lrs[5] < lrs[2] and lrs[17] < lrs[13] < lrs[10]
    # without a check the cycle is the whole run
    model, rows = _tiny_rows_and_model()
    assert len(train_loop(model, rows, spec, pad_id=0)) == 10


def test_a_cycle_that_fails_its_check_starts_a_fresh_try(monkeypatch):
    """With ``fresh_start``, each failed cycle ends its try: new weights, an optimizer without
    moments, the schedule from its warm-up at the full peak, and no try begun at the budget's end."""
    import torch

    from services.zoo.train import TrainSpec, train_loop

    model, rows = _tiny_rows_and_model()
    spec = TrainSpec(steps=10, lr=1e-3, batch_size=4, warmup=2, check_every=5, max_steps=30)
    lrs = _record_rates(monkeypatch)
    adam_steps: list[int] = []
    recording_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        out = recording_step(self, *a, **k)
        adam_steps.append(int(self.state[self.param_groups[0]["params"][0]]["step"]))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    started: list[int] = []
    stats: dict = {}
    losses = train_loop(model, rows, spec, pad_id=0, good_enough=lambda: False, stats=stats, fresh_start=started.append)
    assert len(losses) == 30 and started == [1, 2] and stats["tries"] == 3 and stats["passed"] is False
    for start in (0, 10, 20):  # every try: the warm-up, the full peak, the decay, and fresh moments
        assert (
            lrs[start] == pytest.approx(5e-4)
            and lrs[start + 2] == pytest.approx(1e-3)
            and lrs[start + 9] < lrs[start + 5]
        )
        assert adam_steps[start] == 1 and adam_steps[start + 9] == 10
    # a try that passes ends the run, with the steps of every try counted
    model, rows = _tiny_rows_and_model()
    calls: list[int] = []
    stats = {}
    losses = train_loop(
        model,
        rows,
        spec,
        pad_id=0,
        good_enough=lambda: calls.append(1) or len(calls) == 4,
        stats=stats,
        fresh_start=lambda k: None,
    )
    assert len(losses) == 20 and stats["tries"] == 2 and stats["passed"] is True


def test_a_fresh_lora_try_starts_from_a_no_op_adapter():
    """reset_lora: peft's initialisation again, so the adapter answers as the base until it trains,
    and A is drawn anew from the try's seed."""
    import torch
    from peft import get_peft_model

    from services.zoo.train import lora_config, reset_lora

    base, _ = _tiny_rows_and_model()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        want = base(ids).logits.clone()
    model = get_peft_model(base, lora_config(4, 8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_()
        assert not torch.allclose(model(ids).logits, want)
        a_trained = {n: p.clone() for n, p in model.named_parameters() if "lora_A" in n}
        reset_lora(model, seed=1001)
        assert torch.equal(model(ids).logits, want)
        assert all(not torch.equal(p, a_trained[n]) for n, p in model.named_parameters() if "lora_A" in n)
        first = {n: p.clone() for n, p in model.named_parameters() if "lora_A" in n}
        reset_lora(model, seed=1001)  # the try's seed decides A
        assert all(torch.equal(p, first[n]) for n, p in model.named_parameters() if "lora_A" in n)


def test_a_constant_rate_holds_until_the_check_then_cools_down_to_zero(monkeypatch):
    """The base's schedule: the peak rate after the warm-up for as long as the check fails; once
    it passes, ``cooldown`` more steps with the rate falling linearly to 0, and no more checks."""
    from services.zoo.train import TrainSpec, train_loop

    model, rows = _tiny_rows_and_model()
    spec = TrainSpec(
        steps=100, lr=1e-3, batch_size=4, warmup=2, check_every=5, max_steps=100, cooldown=4, schedule="constant"
    )
    lrs = _record_rates(monkeypatch)
    calls: list[int] = []
    stats: dict = {}
    losses = train_loop(
        model, rows, spec, pad_id=0, good_enough=lambda: calls.append(1) or len(calls) == 3, stats=stats
    )
    assert len(losses) == 15 + 4 and stats["passed"] is True and stats["checks"] == 3
    assert lrs[2:15] == pytest.approx([1e-3] * 13)  # no decay before the check passed at step 15
    assert lrs[15:] == pytest.approx([1e-3 * f for f in (1.0, 0.75, 0.5, 0.25)])
