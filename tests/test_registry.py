"""Registration: what is accepted, what is refused, and that a refusal leaves nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sqlalchemy import func, select

from registry.artifacts import verify
from registry.errors import NotFoundError, RegistrationError
from registry.models import Artifact, Expert, ExpertExample
from registry.service import Registry
from registry.validation import Limits
from tests.factories import make_tiny_base, make_tiny_lora

pytest_plugins = ["tests.conftest_db"]


# --- tiny checkpoints, built once ------------------------------------------------------------------


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    base = make_tiny_base(root / "base")
    other = make_tiny_base(root / "base32", hidden_size=32)
    return {
        "base": base,
        "base32": other,
        "lora": make_tiny_lora(base, root / "lora"),
        "lora_qv": make_tiny_lora(base, root / "lora_qv", r=4, target_modules=["q_proj", "v_proj"]),
        "lora32": make_tiny_lora(other, root / "lora32"),
    }


@pytest.fixture
def reg(registry: Registry, zoo: dict[str, Path]) -> Registry:
    registry.register_base("tiny", zoo["base"])
    return registry


@pytest.fixture
def lora(zoo: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the adapter folder, free to be broken by the test."""
    return Path(shutil.copytree(zoo["lora"], tmp_path / "lora"))


def counts(reg: Registry) -> tuple[int, int, int]:
    with reg.session() as s:
        return tuple(s.scalar(select(func.count()).select_from(t)) for t in (Expert, ExpertExample, Artifact))


def store_entries(reg: Registry) -> list[str]:
    root = reg.store.root
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def assert_refused(reg: Registry, match: str, **kwargs) -> RegistrationError:
    before, rows = store_entries(reg), counts(reg)
    with pytest.raises(RegistrationError, match=match) as info:
        reg.register_expert(**kwargs)
    assert counts(reg) == rows, "a refused registration left rows behind"
    assert store_entries(reg) == before, "a refused registration left files in the artifact store"
    assert not (reg.store.root / ".staging").exists() or not any((reg.store.root / ".staging").iterdir())
    return info.value


def write_examples(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


# --- successful registrations --------------------------------------------------------------------


def test_register_adapter_with_examples(reg: Registry, lora: Path, tmp_path: Path) -> None:
    examples = write_examples(
        tmp_path / "ex.jsonl",
        [
            {"prompt": "2+2?", "reference": "4", "task": "add", "split": "train"},
            {"prompt": "3+3?", "reference": "6", "task": "add", "split": "validation"},
            {"prompt": "5+1?"},
        ],
    )
    e = reg.register_expert(
        "math",
        "adapter",
        lora,
        base="tiny",
        domains=["math"],
        skills=["arithmetic"],
        description="adds",
        examples=examples,
        cost=0.01,
    )
    assert (e.name, e.version, e.kind, e.status) == ("math", "1", "adapter", "ready")
    assert e.base is not None and e.base.name == "tiny"
    assert e.domains == ["math"] and e.skills == ["arithmetic"] and e.cost_per_1k_tokens == 0.01
    path = reg.expert_path(e)
    assert path == reg.store.root / "experts" / "math" / "1"
    assert (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()
    assert len(e.checksum) == 64 and verify(path, e.checksum)
    assert e.size_bytes == sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert [x.split for x in reg.get_examples("math")] == ["train", "validation", "train"]
    assert len(reg.get_examples("math", split="train")) == 2
    assert counts(reg) == (1, 3, 0)
    assert store_entries(reg) == sorted(
        ["experts", "experts/math", "experts/math/1"] + [f"experts/math/1/{p.name}" for p in lora.iterdir()]
    )


def test_register_adapter_subset_of_modules_and_lower_rank(reg: Registry, zoo: dict[str, Path]) -> None:
    e = reg.register_expert("qv", "adapter", zoo["lora_qv"], base="tiny")
    assert e.version == "1"


def test_register_model_expert(reg: Registry, zoo: dict[str, Path]) -> None:
    e = reg.register_expert("full", "model", zoo["base32"], examples=[{"prompt": "hi", "task": "chat"}])
    path = reg.expert_path(e)
    assert e.kind == "model" and e.base is None
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    assert reg.get_examples("full")[0].task == "chat"


def test_register_external_expert(reg: Registry) -> None:
    e = reg.register_expert("gpt", "external", "openai/gpt-4o-mini", cost=0.15)
    assert e.uri == "openai/gpt-4o-mini" and e.store_path is None and e.checksum == ""
    assert reg.expert_path(e) is None
    assert store_entries(reg) == []


def test_versions_increment_and_latest(reg: Registry, lora: Path) -> None:
    assert reg.register_expert("math", "adapter", lora, base="tiny").version == "1"
    assert reg.register_expert("math", "adapter", lora, base="tiny").version == "2"
    assert reg.register_expert("math", "adapter", lora, base="tiny", version="exp-a").version == "exp-a"
    assert reg.register_expert("math", "adapter", lora, base="tiny").version == "3"
    assert reg.get_expert("math").version == "3"
    assert reg.get_expert("math", "2").version == "2"
    assert [e.version for e in reg.list_experts()] == ["1", "2", "exp-a", "3"]
    assert {p.name for p in (reg.store.root / "experts" / "math").iterdir()} == {"1", "2", "3", "exp-a"}


def test_remove_one_version_then_all(reg: Registry, lora: Path) -> None:
    for _ in range(2):
        reg.register_expert("math", "adapter", lora, base="tiny", examples=[{"prompt": "1+1"}])
    reg.add_artifact("glider", "embedding", b"\x00" * 16, expert="math", version="1", filename="emb.bin")
    removed = reg.remove_expert("math", "1")
    assert [e.version for e in removed] == ["1"]
    assert counts(reg) == (1, 1, 0)
    assert not (reg.store.root / "experts" / "math" / "1").exists()
    assert not (reg.store.root / "routers").exists()
    assert (reg.store.root / "experts" / "math" / "2").is_dir()
    reg.remove_expert("math")
    assert counts(reg) == (0, 0, 0)
    assert store_entries(reg) == []
    with pytest.raises(NotFoundError):
        reg.get_expert("math")
    with pytest.raises(NotFoundError):
        reg.remove_expert("math")


def test_artifacts_per_expert_and_router(reg: Registry, lora: Path, tmp_path: Path) -> None:
    reg.register_expert("math", "adapter", lora, base="tiny")
    a = reg.add_artifact("phatgoose", "gates", b"abc", expert="math", filename="gates.safetensors")
    assert reg.artifact_path(a).joinpath("gates.safetensors").read_bytes() == b"abc"
    b = reg.add_artifact("phatgoose", "gates", b"abcd", expert="math", filename="gates.safetensors")
    assert not reg.artifact_path(a).exists(), "a replaced artifact's files are deleted"
    (tmp_path / "clf").mkdir()
    (tmp_path / "clf" / "labels.json").write_text('["math"]')
    g = reg.add_artifact("classifier", "head", tmp_path / "clf")
    assert g.expert_id is None and (reg.artifact_path(g) / "labels.json").is_file()
    assert [x.id for x in reg.get_artifacts(router="phatgoose", expert="math")] == [b.id]
    assert {x.router for x in reg.get_artifacts()} == {"phatgoose", "classifier"}
    assert reg.remove_artifacts("classifier") == 1 and not reg.artifact_path(g).exists()


def test_set_status(reg: Registry) -> None:
    reg.register_expert("gpt", "external", "openai/gpt-4o-mini", status="pending")
    assert reg.get_expert("gpt").status == "pending"
    assert reg.set_status("gpt", "1", "ready").status == "ready"
    assert reg.list_experts(status="ready")[0].name == "gpt"


# --- refusals: the error names the problem, nothing is left behind -------------------------------


def test_refuses_missing_adapter_config(reg: Registry, lora: Path) -> None:
    (lora / "adapter_config.json").unlink()
    assert_refused(reg, "no adapter_config.json", name="x", kind="adapter", source=lora, base="tiny")


def test_refuses_unparseable_adapter_config(reg: Registry, lora: Path) -> None:
    (lora / "adapter_config.json").write_text("{not json")
    assert_refused(reg, "adapter_config.json does not parse", name="x", kind="adapter", source=lora, base="tiny")


def test_refuses_non_lora_peft_type(reg: Registry, lora: Path) -> None:
    cfg = json.loads((lora / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (lora / "adapter_config.json").write_text(json.dumps(cfg))
    assert_refused(reg, "peft_type is 'IA3'", name="x", kind="adapter", source=lora, base="tiny")


def test_refuses_unregistered_base(reg: Registry, lora: Path) -> None:
    with pytest.raises(NotFoundError, match="no base model named 'nope'"):
        reg.register_expert("x", "adapter", lora, base="nope")
    assert counts(reg) == (0, 0, 0) and store_entries(reg) == []
    assert_refused(reg, "needs --base", name="x", kind="adapter", source=lora)


def test_refuses_target_module_missing_from_base(reg: Registry, lora: Path) -> None:
    cfg = json.loads((lora / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "c_attn"]
    (lora / "adapter_config.json").write_text(json.dumps(cfg))
    assert_refused(
        reg, "target module 'c_attn' does not exist in base 'tiny'", name="x", kind="adapter", source=lora, base="tiny"
    )


def test_refuses_shapes_that_do_not_fit_the_base(reg: Registry, zoo: dict[str, Path]) -> None:
    # trained on a hidden-32 base, registered against the hidden-64 one
    err = assert_refused(reg, "has shape", name="x", kind="adapter", source=zoo["lora32"], base="tiny")
    assert "needs" in str(err)


def test_refuses_rank_mismatch(reg: Registry, lora: Path) -> None:
    cfg = json.loads((lora / "adapter_config.json").read_text())
    cfg["r"] = 4
    (lora / "adapter_config.json").write_text(json.dumps(cfg))
    assert_refused(reg, "with rank 4 needs", name="x", kind="adapter", source=lora, base="tiny")


@pytest.mark.parametrize("filename", ["adapter_model.bin", "extra.pt", "optimizer.pth", "state.pkl"])
def test_refuses_pickled_weights(reg: Registry, lora: Path, filename: str) -> None:
    # never unpickled: refused by name (the content would run code when loaded)
    (lora / filename).write_bytes(b"\x80\x04not-really-a-pickle")
    assert_refused(reg, f"{filename}: pickled weights are refused", name="x", kind="adapter", source=lora, base="tiny")


def test_refuses_adapter_with_only_pickled_weights(reg: Registry, lora: Path) -> None:
    (lora / "adapter_model.safetensors").rename(lora / "adapter_model.bin")
    assert_refused(reg, "pickled weights are refused", name="x", kind="adapter", source=lora, base="tiny")


def test_refuses_corrupt_safetensors(reg: Registry, lora: Path) -> None:
    data = (lora / "adapter_model.safetensors").read_bytes()
    (lora / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    assert_refused(reg, "not a valid safetensors file", name="x", kind="adapter", source=lora, base="tiny")


def test_refuses_symlink_escaping_the_source(reg: Registry, lora: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    (lora / "notes.txt").symlink_to(outside)
    assert_refused(
        reg, "notes.txt is a symlink that escapes the source folder", name="x", kind="adapter", source=lora, base="tiny"
    )
    (lora / "notes.txt").unlink()
    (lora / "up.txt").symlink_to(Path("..") / "secret.txt")
    assert_refused(reg, "up.txt is a symlink that escapes", name="x", kind="adapter", source=lora, base="tiny")


def test_symlink_inside_the_source_is_copied(reg: Registry, lora: Path) -> None:
    (lora / "README.txt").symlink_to(lora / "README.md")
    e = reg.register_expert("x", "adapter", lora, base="tiny")
    stored = reg.expert_path(e) / "README.txt"
    assert stored.is_file() and not stored.is_symlink()


def test_refuses_source_that_is_not_a_folder(reg: Registry, lora: Path, tmp_path: Path) -> None:
    assert_refused(
        reg, "is not a directory", name="x", kind="adapter", source=lora / "adapter_config.json", base="tiny"
    )
    assert_refused(reg, "does not exist", name="x", kind="adapter", source=tmp_path / "nowhere", base="tiny")


def test_refuses_unknown_file_type(reg: Registry, lora: Path) -> None:
    (lora / "run.sh").write_text("echo hi")
    assert_refused(reg, "run.sh: unsupported file type '.sh'", name="x", kind="adapter", source=lora, base="tiny")


def test_refuses_duplicate_name_and_version(reg: Registry, lora: Path) -> None:
    reg.register_expert("math", "adapter", lora, base="tiny", version="1")
    before = store_entries(reg)
    with pytest.raises(RegistrationError, match="expert math version 1 already exists"):
        reg.register_expert("math", "adapter", lora, base="tiny", version="1", examples=[{"prompt": "p"}])
    assert counts(reg) == (1, 0, 0)
    assert store_entries(reg) == before


def test_refuses_too_large_and_too_many_files(
    db_url: str, artifact_root: Path, zoo: dict[str, Path], lora: Path
) -> None:
    from registry.db import upgrade

    upgrade(db_url)
    with Registry(db_url, artifact_root, limits=Limits(max_expert_bytes=10_000)) as small:
        small.register_base("tiny", zoo["base"])
        assert_refused(
            small, "larger than the limit of 10000 bytes", name="x", kind="adapter", source=lora, base="tiny"
        )
    with Registry(db_url, artifact_root, limits=Limits(max_files=2)) as few:
        assert_refused(few, "more than 2 files", name="x", kind="adapter", source=lora, base="tiny")


def test_refuses_bad_example_rows_with_line_numbers(reg: Registry, lora: Path, tmp_path: Path) -> None:
    ok = {"prompt": "fine"}
    bad_json = write_examples(tmp_path / "a.jsonl", [ok, ok, "{oops"])
    assert_refused(
        reg,
        r"examples a.jsonl line 3: not valid JSON",
        name="x",
        kind="adapter",
        source=lora,
        base="tiny",
        examples=bad_json,
    )
    no_prompt = write_examples(tmp_path / "b.jsonl", [ok, {"reference": "r"}])
    assert_refused(
        reg,
        r"examples b.jsonl line 2: 'prompt' must be a non-empty string",
        name="x",
        kind="adapter",
        source=lora,
        base="tiny",
        examples=no_prompt,
    )
    bad_split = write_examples(tmp_path / "c.jsonl", [{"prompt": "p", "split": "holdout"}])
    assert_refused(
        reg,
        r"line 1: split 'holdout' is not one of",
        name="x",
        kind="adapter",
        source=lora,
        base="tiny",
        examples=bad_split,
    )
    assert_refused(
        reg,
        r"examples item 1: expected a JSON object",
        name="x",
        kind="adapter",
        source=lora,
        base="tiny",
        examples=[ok, "p"],
    )


def test_refuses_bad_names_kinds_and_external_strings(reg: Registry, lora: Path) -> None:
    assert_refused(reg, "invalid expert name 'a/b'", name="a/b", kind="adapter", source=lora, base="tiny")
    assert_refused(reg, "invalid expert name '../x'", name="../x", kind="adapter", source=lora, base="tiny")
    assert_refused(reg, "invalid version '../1'", name="x", kind="adapter", source=lora, base="tiny", version="../1")
    assert_refused(reg, "expert kind must be one of", name="x", kind="lora", source=lora, base="tiny")
    assert_refused(reg, "not a litellm model string", name="x", kind="external", source="gpt 4")
    assert_refused(reg, "cost per 1k tokens", name="x", kind="external", source="openai/gpt-4o", cost=-1)


def test_refuses_model_without_config_or_with_pickled_weights(
    reg: Registry, zoo: dict[str, Path], tmp_path: Path
) -> None:
    model = Path(shutil.copytree(zoo["base"], tmp_path / "model"))
    (model / "config.json").unlink()
    assert_refused(reg, "model folder has no config.json", name="x", kind="model", source=model)
    shutil.copy(zoo["base"] / "config.json", model / "config.json")
    (model / "model.safetensors").unlink()
    assert_refused(reg, "no .safetensors weights", name="x", kind="model", source=model)
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04")
    assert_refused(reg, "pytorch_model.bin: pickled weights are refused", name="x", kind="model", source=model)


def test_refuses_base_with_pickled_weights_only(reg: Registry, zoo: dict[str, Path], tmp_path: Path) -> None:
    base = Path(shutil.copytree(zoo["base"], tmp_path / "b"))
    (base / "model.safetensors").rename(base / "pytorch_model.bin")
    with pytest.raises(RegistrationError, match="no .safetensors weights found"):
        reg.register_base("b", base)
    with pytest.raises(RegistrationError, match="already registered"):
        reg.register_base("tiny", zoo["base"])


def test_failure_after_staging_leaves_nothing(reg: Registry, lora: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure between copying and committing (here: the move into place) rolls everything back."""

    def broken_publish(staging: Path, rel: str) -> Path:
        raise OSError("disk full")

    monkeypatch.setattr(reg.store, "publish", broken_publish)
    assert_refused(
        reg,
        "registering math failed, nothing was kept: disk full",
        name="math",
        kind="adapter",
        source=lora,
        base="tiny",
        examples=[{"prompt": "p"}],
    )
