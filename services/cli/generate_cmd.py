"""``moerge generate``: one completion from one registered expert (or a base model)."""

from __future__ import annotations

from typing import Any, Optional

import typer
from rich.console import Console

from services.cli import app
from services.cli.placement import device_option, dtype_option

console = Console()


@app.command("generate")
def generate(
    prompt: str = typer.Argument(..., help="The prompt: sent as is, or as a user message with --chat."),
    expert: str = typer.Option(..., "--expert", "-e", help="Registered expert name."),
    version: Optional[str] = typer.Option(None, help="Expert version (default: the latest)."),
    chat: bool = typer.Option(
        False,
        "--chat",
        help="Send the prompt as a user message through the model's chat "
        "template (its last user turn, raw, where it has none).",
    ),
    system: Optional[str] = typer.Option(None, "--system", help="With --chat: a system message before it."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy; above 0 samples."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="Nucleus sampling mass."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampled generation (reproducible per seed)."),
    device: str = device_option(),
    dtype: str = dtype_option(),
    show_usage: bool = typer.Option(
        False, "--usage", help="Also print token counts, the finish reason and the prompt rule."
    ),
) -> None:
    """Generate a completion with one expert, on the hf engine (adapters load on their base)."""
    from registry.service import Registry
    from services.engines.base import GenerateRequest
    from services.engines.external import external_engine_for
    from services.engines.loader import hf_engine_for

    messages = ((("system", system),) if system else ()) + (("user", prompt),) if chat else ()
    with Registry() as registry:
        record = registry.get_expert(expert, version)
        engine: Any  # an HFEngine or an ExternalEngine: the same Engine protocol
        target: str | None
        if record.kind == "external":
            engine, target = external_engine_for(record), "external"
            engine.load_model(target, record.uri)
        else:
            engine, target = hf_engine_for(registry, record, device=device, dtype=dtype)
    request = GenerateRequest(prompt, target, max_new_tokens, temperature, top_p, seed, messages=messages)
    result = engine.generate([request])[0]
    console.print(result.text, highlight=False, markup=False)
    if show_usage:
        console.print(
            f"[dim]prompt_tokens={result.prompt_tokens} completion_tokens={result.completion_tokens} "
            f"finish_reason={result.finish_reason} prompt_rule={result.prompt_rule}[/dim]"
        )
