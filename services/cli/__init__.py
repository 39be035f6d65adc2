"""The ``moerge`` command line (Typer + rich).

Each command group lives in its own module and registers itself on ``app``. Errors a user can act
on (``MoergeError``) print one red line and exit 1; set ``MOERGE_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console

from registry.errors import MoergeError

app = typer.Typer(
    name="moerge",
    help="Model-MoErging: register expert LLMs, route and compose them, serve and measure them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)

# Command modules register their commands on `app` when imported.
from services.cli import registry_cmd, zoo_cmd  # noqa: E402,F401


def main() -> None:
    try:
        app(standalone_mode=False)
    except MoergeError as exc:
        if os.environ.get("MOERGE_DEBUG"):
            raise
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click usage errors and the like
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if os.environ.get("MOERGE_DEBUG"):
            raise
        err_console.print(f"[red]error:[/red] {type(exc).__name__}: {exc}", highlight=False)
        sys.exit(1)
