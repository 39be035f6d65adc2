"""Folders as people have them: HF cache snapshots, Trainer output folders, hub-id base names,
bases without a tokenizer or with code of their own, base removal, adapters that name another
base or ship a tokenizer of their own. Each refusal leaves no row and no file behind."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
from sqlalchemy import func, select

from registry.errors import NotFoundError, RegistrationError
from registry.models import BaseModel, Expert
from registry.service import Registry
from registry.validation import RegistrationWarning
from tests.chat_models import (
    make_bpe_tokenizer,
    make_chat_lora,
    make_lora_with_added_tokens,
    make_qwen_chat_model,
    with_own_tokenizer,
)

pytest_plugins = ["tests.conftest_db"]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    return make_qwen_chat_model(tmp_path_factory.mktemp("qwen") / "qwen")


@pytest.fixture(scope="module")
def lora(qwen: Path, tmp_path_factory) -> Path:
    return make_chat_lora(qwen, tmp_path_factory.mktemp("lora") / "lora")


def rows(reg: Registry) -> tuple[int, int]:
    with reg.session() as s:
        return s.scalar(select(func.count()).select_from(BaseModel)), s.scalar(select(func.count()).select_from(Expert))


def store_files(reg: Registry) -> list[Path]:
    return [p for p in reg.store.root.rglob("*") if p.is_file()] if reg.store.root.exists() else []


def hf_cache_snapshot(folder: Path, cache: Path, repo: str = "Qwen/tiny-chat", revision: str = "0123abcd") -> Path:
    """``folder`` laid out as huggingface_hub caches it: blobs by hash, a snapshot of symlinks."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / revision
    (repo_dir / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(p for p in folder.iterdir() if p.is_file())):
        blob = repo_dir / "blobs" / f"{i:040x}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob.name)
    return snapshot


def test_a_hub_id_names_a_base_and_a_cache_snapshot_registers(
    registry: Registry, qwen: Path, lora: Path, tmp_path: Path
) -> None:
    base = hf_cache_snapshot(qwen, tmp_path / "hub")
    trained = Path(shutil.copytree(lora, tmp_path / "trained-on-the-hub-id"))
    config = json.loads((trained / "adapter_config.json").read_text())
    (trained / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "Qwen/tiny-chat"}))
    adapter = hf_cache_snapshot(trained, tmp_path / "hub", repo="someone/tiny-chat-lora")
    registry.register_base("Qwen/tiny-chat", base)
    assert registry.get_base("Qwen/tiny-chat").architecture == "Qwen2ForCausalLM"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RegistrationWarning)  # it names the snapshot's hub id: no warning
        expert = registry.register_expert("chat-lora", "adapter", adapter, base="Qwen/tiny-chat")
    copied = registry.expert_path(expert)
    assert sorted(p.name for p in copied.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert not any(p.is_symlink() for p in copied.iterdir())  # the blobs' bytes, not the links


def test_a_symlink_out_of_the_cache_is_refused(registry: Registry, qwen: Path, lora: Path, tmp_path: Path) -> None:
    adapter = hf_cache_snapshot(lora, tmp_path / "hub", repo="someone/lora")
    registry.register_base("qwen", qwen)
    outside = tmp_path / "elsewhere.json"
    outside.write_text("{}")
    (adapter / "extra.json").symlink_to(outside)
    with pytest.raises(RegistrationError, match="escapes the model's cache folder"):
        registry.register_expert("x", "adapter", adapter, base="qwen")
    assert rows(registry) == (1, 0) and store_files(registry) == []


def test_a_trainer_output_folder_registers_without_its_leftovers(
    registry: Registry, qwen: Path, lora: Path, tmp_path: Path
) -> None:
    folder = Path(shutil.copytree(lora, tmp_path / "checkpoint-500"))
    for leftover in ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "rng_state_1.pth"):
        (folder / leftover).write_bytes(b"\x80\x04pickle")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 500}))
    registry.register_base("qwen", qwen)
    expert = registry.register_expert("trained", "adapter", folder, base="qwen")
    kept = sorted(p.name for p in registry.expert_path(expert).iterdir())
    assert kept == ["README.md", "adapter_config.json", "adapter_model.safetensors", "trainer_state.json"]
    # a pickle that is not a Trainer leftover is still refused
    (folder / "model.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(RegistrationError, match="pickled weights are refused"):
        registry.register_expert("trained", "adapter", folder, base="qwen")
    assert rows(registry) == (1, 1)


@pytest.mark.parametrize("name", ["Qwen/tiny/chat", "/tiny", "tiny/", "a b"])
def test_bad_base_names(registry: Registry, qwen: Path, name: str) -> None:
    with pytest.raises(RegistrationError, match="invalid base model name"):
        registry.register_base(name, qwen)
    assert rows(registry) == (0, 0)


def test_a_base_without_tokenizer_is_refused(registry: Registry, qwen: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(qwen / f, folder / f)
    with pytest.raises(RegistrationError, match="has no tokenizer"):
        registry.register_base("bare", folder)
    assert rows(registry) == (0, 0)


def test_a_base_with_its_own_code_needs_trust_remote_code(registry: Registry, qwen: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(qwen, tmp_path / "custom"))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_custom.py").write_text("raise SystemExit('this code must not run at registration')\n")
    with pytest.raises(RegistrationError, match="--trust-remote-code"):
        registry.register_base("custom", folder)
    assert rows(registry) == (0, 0)
    assert registry.register_base("custom", folder, trust_remote_code=True).trust_remote_code is True
    assert registry.register_base("plain", qwen, trust_remote_code=True).trust_remote_code is False  # nothing to trust


def test_base_remove_is_refused_while_used_unless_cascade(registry: Registry, qwen: Path, lora: Path) -> None:
    registry.register_base("qwen", qwen)
    registry.register_expert("a", "adapter", lora, base="qwen")
    registry.register_expert("a", "adapter", lora, base="qwen")
    with pytest.raises(RegistrationError, match="used by 1 expert"):
        registry.remove_base("qwen")
    assert rows(registry) == (1, 2)
    base, removed = registry.remove_base("qwen", cascade=True)
    assert base.name == "qwen" and [e.ref for e in removed] == ["a@1", "a@2"]
    assert rows(registry) == (0, 0) and store_files(registry) == []
    assert qwen.is_dir()  # the base's own folder is never touched
    with pytest.raises(NotFoundError):
        registry.remove_base("qwen")


def test_an_adapter_trained_on_another_model_is_registered_with_a_warning(
    registry: Registry, qwen: Path, lora: Path, tmp_path: Path
) -> None:
    folder = Path(shutil.copytree(lora, tmp_path / "other-base"))
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    registry.register_base("qwen", qwen)
    with pytest.warns(RegistrationWarning, match="trained on 'meta-llama/Llama-3.2-1B', not on base 'qwen'"):
        registry.register_expert("x", "adapter", folder, base="qwen")


def test_an_external_experts_connection_is_checked_and_never_holds_a_key(registry: Registry, lora: Path) -> None:
    e = registry.register_expert(
        "gpt", "external", "openai/gpt-4o-mini", api_base="http://10.0.0.5:8000/v1", api_key_env="TEAM_OPENAI_KEY"
    )
    assert (e.api_base, e.api_key_env) == ("http://10.0.0.5:8000/v1", "TEAM_OPENAI_KEY")
    for kwargs, why in (
        ({"api_key_env": "sk-proj-abcdefghijklmnop"}, "never the key itself"),
        ({"api_key_env": "my key"}, "not an environment variable name"),
        ({"api_base": "10.0.0.5:8000"}, "not an http"),
    ):
        with pytest.raises(RegistrationError, match=why):
            registry.register_expert("gpt", "external", "openai/gpt-4o-mini", **kwargs)
    with pytest.raises(RegistrationError, match="external experts only"):
        registry.register_expert("x", "model", lora, api_base="http://h/v1")
    assert rows(registry) == (0, 1)


def test_an_adapter_with_its_own_tokenizer_registers_unless_it_changes_the_vocabulary(
    registry: Registry, qwen: Path, lora: Path, tmp_path: Path
) -> None:
    registry.register_base("qwen", qwen)
    # the base's vocabulary with a chat template of its own (a Trainer's checkpoint): kept whole
    own = with_own_tokenizer(lora, qwen, tmp_path / "instruct")
    expert = registry.register_expert("instruct", "adapter", own, base="qwen")
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in registry.expert_path(expert).iterdir()}
    kept = store_files(registry)
    # tokens added (embeddings resized and saved whole): refused, saying why and what to do instead
    added = make_lora_with_added_tokens(qwen, tmp_path / "added")
    with pytest.raises(
        RegistrationError, match=r"adds 1 token\(s\) to the vocabulary of base 'qwen'.*'<tool_call>'.*kind 'model'"
    ):
        registry.register_expert("added", "adapter", added, base="qwen")
    # another model's tokenizer altogether
    other = Path(shutil.copytree(lora, tmp_path / "other-tokenizer"))
    make_bpe_tokenizer(vocab_size=300).save_pretrained(str(other))
    with pytest.raises(
        RegistrationError,
        match=r"tokenizer is not the one of base 'qwen': of its 300 tokens 0 have other ids and 0 are new, and 100 of",
    ):
        registry.register_expert("other", "adapter", other, base="qwen")
    assert rows(registry) == (1, 1) and store_files(registry) == kept


def hub_cache(folder: Path, cache: Path, repo: str, commit: str) -> Path:
    """A cache that huggingface_hub itself would answer from: the snapshot and refs/main."""
    snapshot = hf_cache_snapshot(folder, cache, repo=repo, revision=commit)
    refs = cache / f"models--{repo.replace('/', '--')}" / "refs"
    refs.mkdir()
    (refs / "main").write_text(commit)
    return snapshot


def test_a_hub_reference_registers_pinned_and_loads_from_the_cache(
    registry: Registry, qwen: Path, lora: Path, tmp_path: Path, monkeypatch
) -> None:
    from registry.hub import HubUnavailableError, model_folder
    from services.engines.hf import HFEngine

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = hub_cache(qwen, tmp_path / "hub", "acme/tiny-chat", commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # what exists offline: the cache
    base = registry.register_base("acme/tiny-chat", "hf://acme/tiny-chat")  # the default branch …
    assert base.uri == f"hf://acme/tiny-chat@{commit}"  # … pinned to its commit
    assert model_folder(base.uri) == snapshot
    with pytest.warns(RegistrationWarning, match="trained on"):  # the lora names its local folder
        registry.register_expert("chat-lora", "adapter", lora, base="acme/tiny-chat")  # checked on the snapshot
    engine = HFEngine(model_folder(base.uri), base_name=base.name)
    assert engine.base_model.config.architectures == ["Qwen2ForCausalLM"]

    # a reference the cache cannot answer, offline: a clear error, and nothing recorded
    with pytest.raises(RegistrationError, match="cannot be reached.*HF_HUB_CACHE"):
        registry.register_base("acme/other", "hf://acme/other@main")
    with pytest.raises(RegistrationError, match="not a hub reference"):
        registry.register_base("acme/bad", "hf://acme")
    assert rows(registry) == (1, 1)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(HubUnavailableError, match="acme/tiny-chat"):  # a node whose cache lacks it
        model_folder(base.uri)
