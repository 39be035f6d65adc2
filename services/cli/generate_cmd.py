"""``moerge generate``: one completion from one registered expert (or a base model)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console

from services.cli import app

console = Console()


@app.command("generate")
def generate(
    prompt: str = typer.Argument(..., help="The prompt, sent as is (zoo experts expect their skill's format)."),
    expert: str = typer.Option(..., "--expert", "-e", help="Registered expert name."),
    version: Optional[str] = typer.Option(None, help="Expert version (default: the latest)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy; above 0 samples."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="Nucleus sampling mass."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampled generation (reproducible per seed)."),
    show_usage: bool = typer.Option(False, "--usage", help="Also print token counts and the finish reason."),
) -> None:
    """Generate a completion with one expert, on the hf engine (adapters load on their base)."""
    import litellm

    from registry.service import Registry
    from services.engines.base import GenerateRequest
    from services.engines.loader import hf_engine_for

    with Registry() as registry:
        record = registry.get_expert(expert, version)
        if record.kind == "external":
            reply = litellm.completion(
                model=record.uri,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
            )
            console.print(reply.choices[0].message.content, highlight=False, markup=False)
            return
        engine, target = hf_engine_for(registry, record)
    request = GenerateRequest(prompt, target, max_new_tokens, temperature, top_p, seed)
    result = engine.generate([request])[0]
    console.print(result.text, highlight=False, markup=False)
    if show_usage:
        console.print(
            f"[dim]prompt_tokens={result.prompt_tokens} completion_tokens={result.completion_tokens} "
            f"finish_reason={result.finish_reason}[/dim]"
        )
