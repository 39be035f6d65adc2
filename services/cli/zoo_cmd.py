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
from services.cli.output import print_table  # noqa: E402

zoo_app = typer.Typer(
    help="Build the offline zoo: a small Llama base, LoRA experts, a full-model expert.", no_args_is_help=True
)
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
    register: bool = typer.Option(
        False,
        "--register",
        help="Register the base and every expert (with examples) in the registry; only when every floor held.",
    ),
) -> None:
    """Train the zoo on the CPU and print every model's score on every skill.

    Exits 1, naming each expert and floor, when a floor still fails after the training budget; such
    a zoo is written (to look at) but not registered."""
    from registry.config import moerge_home
    from registry.errors import MoergeError
    from services.machine import describe
    from services.zoo.build import SIZES, build_zoo

    if size not in SIZES:
        raise MoergeError(f"unknown zoo size {size!r}; expected one of {', '.join(SIZES)}")
    out_dir = out or moerge_home() / "zoo" / size
    manifest = build_zoo(size, out_dir, seed=seed, progress=True)
    print_table(outcomes_table(manifest))
    console.print("timings (s): " + ", ".join(f"{k} {v}" for k, v in manifest.timings.items()))
    console.print(f"trained on: {describe(manifest.machine)}", highlight=False)
    console.print(f"zoo written to {Path(manifest.root) / manifest.MANIFEST}")
    _print_floors(manifest)
    if manifest.failures:
        raise typer.Exit(1)
    if register:
        _register(manifest)


def _print_floors(manifest) -> None:
    """The one line that says whether every floor held, then each miss on its own line."""
    if not manifest.failures:
        f = manifest.floors
        console.print(
            f"[bold green]floors: every floor held[/bold green] (seed {manifest.seed}: "
            f"{len(manifest.experts)} experts ≥ {f['own_min']:.0%} on their own skills, "
            f"≤ {f['foreign_max']:.0%} on the others; the base ≤ {f['base_max']:.0%})",
            highlight=False,
        )
        return
    console.print(
        f"[bold red]floors: {len(manifest.failures)} missed[/bold red]; the zoo is not registered", highlight=False
    )
    for f in manifest.failures:
        console.print(f"[red]below floor:[/red] {f}", highlight=False)


@zoo_app.command("register")
def register_cmd(
    path: Path = typer.Argument(..., help="A built zoo: its folder or its zoo.json.", exists=True),
    below_floors: bool = typer.Option(False, "--below-floors", help="Register it even though its build missed floors."),
) -> None:
    """Register an already built zoo (base, experts, examples) in the registry. A zoo whose build
    missed a floor is refused unless --below-floors says so."""
    from registry.errors import MoergeError
    from services.zoo.build import ZooManifest

    manifest = ZooManifest.load(path)
    if manifest.failures and not below_floors:
        raise MoergeError(
            f"this zoo missed {len(manifest.failures)} floor(s) when it was built "
            f"({manifest.failures[0]}); rebuild it, or pass --below-floors to register it anyway"
        )
    _register(manifest)


def _register(manifest) -> None:
    from registry.service import Registry
    from services.zoo.register import register_zoo, zoo_base_name

    with Registry() as registry, console.status("registering the zoo …") as status:
        experts = register_zoo(manifest, registry, on_expert=lambda name: status.update(f"registered {name}"))
    console.print(
        f"registered base {zoo_base_name(manifest)} and {len(experts)} experts: "
        + ", ".join(f"{e.name}@{e.version}" for e in experts),
        highlight=False,
    )
