"""``moerge zoo …``: build the offline model zoo (a small Llama base, LoRA experts, a full model)."""

from __future__ import annotations

import os

# Busy-waiting OpenMP threads stall when the 2 cores are shared; this must be set before torch
# loads, and the zoo imports torch lazily (inside the command) so that it takes effect.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from services.cli import app  # noqa: E402

zoo_app = typer.Typer(help="Build the offline zoo: a small Llama base, LoRA experts, a full-model expert.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
console = Console()


def outcomes_table(manifest) -> Table:
    """Rows: the base and every expert; columns: skills; cells: exact match on the test split,
    green where an expert is on its own skill."""
    skills = list(next(iter(manifest.outcomes.values())).keys()) if manifest.outcomes else []
    own = {e.name: set(e.skills) for e in manifest.experts}
    table = Table(title=f"zoo '{manifest.size}' — exact match on the test split")
    table.add_column("model")
    for s in skills:
        table.add_column(s, justify="right")
    for name, row in manifest.outcomes.items():
        cells = []
        for s in skills:
            v = f"{row.get(s, float('nan')):.0%}"
            cells.append(f"[bold green]{v}[/bold green]" if s in own.get(name, ()) else v)
        table.add_row(name, *cells)
    return table


@zoo_app.command("build")
def build(
    size: str = typer.Option("small", "--size", help="micro (tests, < 1 min) or small (the benchmark zoo)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default $MOERGE_HOME/zoo/<size>)."),
    seed: int = typer.Option(0, "--seed", help="Seed for data and initialisation."),
    register: bool = typer.Option(False, "--register", help="Register the base and every expert (with examples) in the registry."),
) -> None:
    """Train the zoo on the CPU and print every model's score on every skill."""
    from registry.config import moerge_home
    from registry.errors import MoergeError
    from services.zoo.build import SIZES, build_zoo

    if size not in SIZES:
        raise MoergeError(f"unknown zoo size {size!r}; expected one of {', '.join(SIZES)}")
    out_dir = out or moerge_home() / "zoo" / size
    manifest = build_zoo(size, out_dir, seed=seed, progress=True)
    console.print(outcomes_table(manifest))
    console.print("timings (s): " + ", ".join(f"{k} {v}" for k, v in manifest.timings.items()))
    for f in manifest.failures:
        console.print(f"[yellow]below target:[/yellow] {f}")
    console.print(f"zoo written to {Path(manifest.root) / manifest.MANIFEST}")
    if register:
        _register(manifest)


@zoo_app.command("register")
def register_cmd(
    path: Path = typer.Argument(..., help="A built zoo: its folder or its zoo.json.", exists=True),
) -> None:
    """Register an already built zoo (base, experts, examples) in the registry."""
    from services.zoo.build import ZooManifest

    _register(ZooManifest.load(path))


def _register(manifest) -> None:
    from registry.service import Registry
    from services.zoo.register import register_zoo, zoo_base_name

    with Registry() as registry, console.status("registering the zoo …") as status:
        experts = register_zoo(manifest, registry, on_expert=lambda name: status.update(f"registered {name}"))
    console.print(f"registered base {zoo_base_name(manifest)} and {len(experts)} experts: "
                  + ", ".join(f"{e.name}@{e.version}" for e in experts), highlight=False)
