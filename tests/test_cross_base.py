"""A query-level strategy over experts of two base models and an external one: the micro zoo's
Llama adapters, a LoRA on a Qwen2 chat base, and a model behind an OpenAI-compatible API (a
moerge gateway of its own, called through litellm). Each chosen expert answers on the engine of
its own base, or through its API, as it answers when called alone; a merge over two bases is
refused with nothing stored."""

from __future__ import annotations

import pytest

from composer.engine_protocol import GenerateRequest
from registry.errors import DefinitionError
from registry.hub import model_folder
from registry.service import Registry
from services.engines.loader import hf_engine_for
from services.gateway import GatewaySettings, LocalBackend, create_app
from services.moe.catalog import StrategyCatalog
from services.moe.pool import ExpertPool
from services.moe.strategies import MoE
from services.zoo.register import register_zoo
from tests.chat_models import make_chat_lora, make_qwen_chat_model
from tests.servers import serve

REVERSE = "Reverse the string\nhello\nAnswer: "
LAW = "Which clause limits the liability?"


@pytest.fixture
def home(micro_zoo, tmp_path, monkeypatch):
    """The micro zoo, a Qwen2 chat base with one adapter (domain law), in a home of its own."""
    monkeypatch.setenv("MOERGE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MOERGE_STRATEGIES", raising=False)
    qwen = make_qwen_chat_model(tmp_path / "qwen")
    law = make_chat_lora(qwen, tmp_path / "law")
    with Registry() as reg:
        register_zoo(micro_zoo, reg)
        reg.register_base("qwen-chat", qwen)
        reg.register_expert("law", "adapter", law, base="qwen-chat", domains=["law"])
    return tmp_path / "home"


def test_a_query_strategy_chooses_across_bases_and_external_experts(home):
    registry = Registry()
    provider = LocalBackend(registry)  # the "provider": moerge's own gateway over the zoo
    with serve(create_app(provider, registry, GatewaySettings(require_keys=False))) as url:
        registry.register_expert(
            "remote-reverse", "external", "openai/skill-reverse", api_base=f"{url}/v1", domains=["remote"]
        )
        catalog = StrategyCatalog(registry)
        experts = ["skill-reverse", "law", "remote-reverse"]
        with pytest.raises(DefinitionError, match="one base"):  # a merge computes in one base's weights
            catalog.add({"name": "spread-merge", "router": "all", "composer": "merge", "experts": experts[:2]})
        assert "moe/spread-merge" not in catalog.all()
        spread = catalog.add({"name": "spread", "router": "oracle", "composer": "single", "experts": experts})
        placement = catalog.placement_of(spread)
        assert placement is not None
        # the pool of one base (one expert each: the first name), the others as extra experts
        on_base = {"qwen-chat": "law"}.get(placement.base, "skill-reverse")
        assert set(placement.extra) == set(experts) - {on_base}

        moe = MoE(ExpertPool(registry, placement.base, extra=placement.extra), catalog=catalog)
        answers = moe.run(spread, [REVERSE, LAW, REVERSE], tasks=["reverse", "law", "remote"], max_new_tokens=6)
        [(local, _), (law_answer, _), (remote, _)] = answers
        assert [c.experts[0][0] for c, _ in answers] == ["skill-reverse", "law", "remote-reverse"]

        # the Qwen adapter ran on its own base, as it answers alone
        engine, target = hf_engine_for(registry, registry.get_expert("law"))
        [alone] = engine.generate([GenerateRequest(LAW, target, max_new_tokens=6)])
        assert law_answer.text == alone.text
        # the external expert is the provider's skill-reverse, called over HTTP
        assert remote.text == local.text and local.text.strip()

        # answers are budgeted in the tokens of every base the pool runs, not its own base's
        # alone: in a pool on either base, with the other base's expert, a reference the other
        # tokenizer cuts finer still fits
        from transformers import AutoTokenizer

        micro = micro_zoo_base(registry)
        folders = {micro.name: model_folder(micro.uri), "qwen-chat": home.parent / "qwen"}
        references = [LAW, REVERSE, "liability clause §4.2 — 1,000,000 USD", "olleh dlrow"]
        longest = {
            name: max(
                len(AutoTokenizer.from_pretrained(str(f))(r, add_special_tokens=False)["input_ids"]) for r in references
            )
            for name, f in folders.items()
        }
        assert len(set(longest.values())) == 2  # one base's tokenizer cuts them finer
        for base, other in ((micro.name, "law"), ("qwen-chat", "skill-reverse")):
            assert ExpertPool(registry, base, extra=[other]).token_budget(references) == max(longest.values()) + 4


def micro_zoo_base(registry: Registry):
    [base] = [b for b in registry.list_bases() if b.name != "qwen-chat"]
    return base
