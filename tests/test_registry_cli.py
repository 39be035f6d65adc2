"""The registry commands of the ``moerge`` CLI, end to end on an embedded home folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli import app, main
from tests.factories import make_tiny_base, make_tiny_lora


def run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_register_list_show_remove(home: Path, tmp_path: Path) -> None:
    base = make_tiny_base(tmp_path / "base")
    lora = make_tiny_lora(base, tmp_path / "lora")
    examples = tmp_path / "ex.jsonl"
    examples.write_text('{"prompt": "2+2?", "reference": "4"}\n{"prompt": "3+3?", "split": "validation"}\n')

    assert "registered base tiny" in run("base", "add", "tiny", str(base))
    out = run(
        "register",
        str(lora),
        "--name",
        "math",
        "--kind",
        "adapter",
        "--base",
        "tiny",
        "--domain",
        "math",
        "--skill",
        "arithmetic",
        "--examples",
        str(examples),
        "--cost",
        "0.02",
    )
    assert "registered math version 1" in out and "2 examples" in out
    assert "version 2" in run("register", "openai/gpt-4o-mini", "--name", "math", "--kind", "external")

    listing = run("experts", "list")
    assert "math" in listing and "adapter" in listing and "external" in listing
    listed = json.loads(run("experts", "list", "--json"))
    assert [(e["name"], e["version"], e["kind"], e["base"]) for e in listed] == [
        ("math", "1", "adapter", "tiny"),
        ("math", "2", "external", None),
    ]

    shown = json.loads(run("experts", "show", "math", "--version", "1", "--json"))
    assert shown["base"] == "tiny" and shown["examples"] == {"train": 1, "validation": 1}
    assert shown["cost_per_1k_tokens"] == 0.02 and Path(shown["uri"]).is_dir()
    assert "math@2" in run("experts", "show", "math")

    assert "removed math@1" in run("experts", "remove", "math", "--version", "1", "--yes")
    assert not Path(shown["uri"]).exists()
    assert "removed math@2" in run("experts", "remove", "math", "--yes")
    assert "math" not in run("experts", "list").split("experts", 1)[1]


def test_remove_asks_for_confirmation(home: Path) -> None:
    run("register", "openai/gpt-4o-mini", "--name", "gpt", "--kind", "external")
    result = CliRunner().invoke(app, ["experts", "remove", "gpt"], input="n\n")
    assert result.exit_code != 0
    assert "gpt" in run("experts", "list")


def test_keys_create_and_list(home: Path) -> None:
    out = run("keys", "create", "alice", "--scope", "user", "--model", "math", "--rpm", "30")
    key = out.strip().splitlines()[-1]
    assert key.startswith("mk-")
    listing = run("keys", "list")
    assert "alice" in listing and key not in listing and "30" in listing


def test_db_upgrade_downgrade(home: Path) -> None:
    assert "revision 0006" in run("db", "upgrade")
    assert "revision 0001" in run("db", "downgrade", "0001")
    assert "base (empty)" in run("db", "downgrade", "base")
    assert "revision 0006" in run("db", "upgrade", "--revision", "head")


def test_error_prints_one_red_line_and_exits_1(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setattr(
        sys, "argv", ["moerge", "register", str(tmp_path / "nowhere"), "--name", "x", "--kind", "model"]
    )
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines at the terminal width
    assert err.startswith("error: source") and err.endswith("nowhere' does not exist")
    assert err.count("error:") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["register"],
        ["base", "add"],
        ["experts", "list"],
        ["experts", "show"],
        ["experts", "remove"],
        ["db", "upgrade"],
        ["db", "downgrade"],
        ["keys", "create"],
        ["keys", "list"],
    ],
)
def test_every_command_has_help(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_base_add_with_a_hub_id_and_remove(home: Path, tmp_path: Path) -> None:
    base = make_tiny_base(tmp_path / "base")
    lora = make_tiny_lora(base, tmp_path / "lora")
    assert "registered base meta/tiny" in run("base", "add", "meta/tiny", str(base))
    run("register", str(lora), "--name", "a", "--base", "meta/tiny")
    refused = CliRunner().invoke(app, ["base", "remove", "meta/tiny"])
    assert refused.exit_code == 1 and "used by 1 expert(s) (a)" in str(refused.exception)
    assert "--cascade" in str(refused.exception)
    assert "meta/tiny" in run("base", "list")
    out = run("base", "remove", "meta/tiny", "--cascade")
    assert "removed base meta/tiny" in out and "a@1" in out
    assert "meta/tiny" not in run("base", "list") and base.is_dir()


def test_register_prints_the_registrations_warnings(home: Path, tmp_path: Path) -> None:
    base = make_tiny_base(tmp_path / "base")
    lora = make_tiny_lora(base, tmp_path / "lora")
    config = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/other-model"}))
    run("base", "add", "tiny", str(base))
    out = run("register", str(lora), "--name", "a", "--base", "tiny")
    assert "warning:" in out and "'org/other-model'" in out and "registered a version 1" in out


def test_register_refuses_what_the_configured_engine_cannot_serve(home: Path, tmp_path: Path) -> None:
    """With the serve config the cluster runs (vLLM for this base, max_lora_rank 8), a rank-16 and a
    DoRA adapter are refused at registration, naming what refuses; the hf engine takes both."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = make_tiny_base(tmp_path / "base")
    big = make_tiny_lora(base, tmp_path / "r16", r=16)
    dora = tmp_path / "dora"
    get_peft_model(
        LlamaForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    ).save_pretrained(dora)
    config = tmp_path / "serve.yaml"
    config.write_text("engines:\n  bases:\n    tiny: {engine: vllm, engine_args: {max_lora_rank: 8}}\n")
    run("base", "add", "tiny", str(base))
    for folder, why in ((big, "rank 16 is above the vllm engine's max_lora_rank 8"), (dora, "does not serve DoRA")):
        result = CliRunner().invoke(
            app, ["register", str(folder), "--name", "x", "--base", "tiny", "--serve-config", str(config)]
        )
        assert result.exit_code == 1 and why in str(result.exception), result.output
    assert "x" not in run("experts", "list").split("experts", 1)[1]
    run("register", str(dora), "--name", "x", "--base", "tiny")  # no serve config: the hf engine serves it


def test_tables_through_a_pipe_keep_every_cell_whole(home: Path, tmp_path: Path) -> None:
    """rich would fit the table to 80 columns off a terminal ("ada…"); scripts grep these cells."""
    base = make_tiny_base(tmp_path / "base")
    run("base", "add", "a-base-model-with-a-rather-long-name", str(base))
    lora = make_tiny_lora(base, tmp_path / "lora")
    domains = ["contract-law-and-regulatory-compliance", "international-arbitration"]
    run(
        "register",
        str(lora),
        "--name",
        "legal-expert-for-long-contracts",
        "--kind",
        "adapter",
        "--base",
        "a-base-model-with-a-rather-long-name",
        *[a for d in domains for a in ("--domain", d)],
        "--skill",
        "clause-extraction-and-summarisation",
        "--cost",
        "0.125",
    )
    listing = run("experts", "list")
    assert "…" not in listing
    row = next(line for line in listing.splitlines() if "legal-expert-for-long-contracts" in line)
    for cell in (
        "adapter",
        "a-base-model-with-a-rather-long-name",
        ", ".join(domains),
        "clause-extraction-and-summarisation",
        "0.125",
    ):
        assert cell in row, (cell, row)
