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


def losses_table(manifest) -> Table:
    """The domains zoo's outcomes. Rows: the base and every expert; columns: domains; cells:
    held-out loss in nats per token on the test split and, for experts, how far below the base it
    is; green on an expert's own domains."""
    from services.zoo.domains_build import gains

    base = manifest.outcomes[manifest.base.name]
    below = gains(manifest)
    own = {e.name: set(e.domains) for e in manifest.experts}
    table = Table(title=f"domains zoo '{manifest.size}' — held-out loss, nats per token (test split)")
    table.add_column("model")
    for d in base:
        table.add_column(d, justify="right")
    for name, row in manifest.outcomes.items():
        cells = []
        for d, v in row.items():
            cell = f"{v:.3f}" if name == manifest.base.name else f"{v:.3f} ({-below[name][d]:+.0%})"
            cells.append(f"[bold green]{cell}[/bold green]" if d in own.get(name, ()) else cell)
        table.add_row(name, *cells)
    return table


@zoo_app.command("build")
def build(
    suite: str = typer.Option(
        "skills",
        "--suite",
        help="skills (exact-match tasks, the demo's zoo) or domains (five text domains and mixed documents, "
        "scored by held-out loss).",
    ),
    size: str = typer.Option("small", "--size", help="micro (tests, < 1 min) or small (the benchmark zoo)."),
    out: Optional[Path] = typer.Option(
        None,
        "--out",
        help="Output folder (default $MOERGE_HOME/zoo/<size>, or zoo/domains-<size> for --suite domains).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for data and initialisation."),
    register: bool = typer.Option(
        False,
        "--register",
        help="Register the base and every expert (with examples) in the registry; only when every floor held.",
    ),
) -> None:
    """Train the zoo on the CPU and print every model's score: exact match on every skill, or
    held-out loss on every domain.

    Exits 1, naming each expert and floor, when a floor still fails after the training budget; such
    a zoo is written (to look at) but not registered."""
    from registry.config import moerge_home
    from registry.errors import MoergeError
    from services.machine import describe
    from services.zoo import build as skills_zoo
    from services.zoo import domains_build

    if suite not in ("skills", "domains"):
        raise MoergeError(f"unknown zoo suite {suite!r}; expected skills or domains")
    sizes = domains_build.SIZES if suite == "domains" else skills_zoo.SIZES
    if size not in sizes:
        raise MoergeError(f"unknown zoo size {size!r}; expected one of {', '.join(sizes)}")
    if suite == "domains":
        out_dir = out or moerge_home() / "zoo" / f"domains-{size}"
        manifest = domains_build.build_domains_zoo(size, out_dir, seed=seed, progress=True)
        print_table(losses_table(manifest))
    else:
        out_dir = out or moerge_home() / "zoo" / size
        manifest = skills_zoo.build_zoo(size, out_dir, seed=seed, progress=True)
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
    if not manifest.failures and manifest.zoo == "domains":
        from services.zoo.domains_build import floors_summary

        console.print(
            f"[bold green]floors: every floor held[/bold green] (seed {manifest.seed}: {floors_summary(manifest)})",
            highlight=False,
        )
        return
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
