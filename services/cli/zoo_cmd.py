"""``moerge zoo …``: build the offline model zoo (placeholder until the zoo lands)."""

import typer

from services.cli import app

zoo_app = typer.Typer(help="Build the offline zoo: a small Llama base, LoRA experts, a full-model expert.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
