"""The ``moerge`` command line (Typer + rich).

Each command group lives in its own module and registers itself on ``app``. Errors a user can act
on (``MoergeError``) print one red line and exit 1; set ``MOERGE_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import os
import sys
import warnings

# No model hub is reachable offline, and library chatter (shard-writing bars, deprecation notices
# from peft's calls into transformers) would bury moerge's own progress bars and tables.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

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
from services.cli import generate_cmd, leaderboard_cmd, moe_cmd, registry_cmd, serve_cmd, zoo_cmd  # noqa: E402,F401


def main() -> None:
    # Standalone mode lets Typer handle usage errors (usage + message, exit 2) and --help itself;
    # everything else that escapes a command is reported here in one line.
    try:
        app()
    except MoergeError as exc:
        if os.environ.get("MOERGE_DEBUG"):
            raise
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("aborted")
        sys.exit(130)
    except Exception as exc:
        if os.environ.get("MOERGE_DEBUG"):
            raise
        err_console.print(f"[red]error:[/red] {type(exc).__name__}: {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
