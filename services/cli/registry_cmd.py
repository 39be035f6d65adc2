"""Registry commands: ``moerge register``, ``moerge base …``, ``moerge experts …``, ``moerge db …``,
``moerge keys …``.

They read the database and artifact store from MOERGE_DATABASE_URL / MOERGE_HOME (see
``registry.config``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from services.cli import app
from services.cli.output import print_table

console = Console()

base_app = typer.Typer(help="Base models that adapters are trained on.", no_args_is_help=True)
experts_app = typer.Typer(help="List, show and remove registered experts.", no_args_is_help=True)
db_app = typer.Typer(help="Migrate the registry database (Alembic).", no_args_is_help=True)
keys_app = typer.Typer(help="API keys for the gateway.", no_args_is_help=True)
app.add_typer(base_app, name="base")
app.add_typer(experts_app, name="experts")
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")


def _registry():  # imported lazily: `moerge --help` should not open a database
    from registry.service import Registry

    return Registry()


@contextmanager
def _shown_warnings() -> Iterator[None]:
    """A registration's warnings (registry.validation.RegistrationWarning), printed as such."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                if type(w.message).__name__ == "RegistrationWarning":
                    console.print(f"[yellow]warning:[/yellow] {w.message}", highlight=False)


@app.command("register")
def register(
    source: Annotated[
        str,
        typer.Argument(
            help="Adapter or model folder, a hub reference hf://owner/name[@revision] (fetched, then stored "
            "as a folder is), or a litellm model string (openai/gpt-4o-mini) for --kind external."
        ),
    ],
    name: Annotated[str, typer.Option("--name", "-n", help="Expert name (letters, digits, . _ -).")],
    kind: Annotated[str, typer.Option("--kind", "-k", help="adapter | model | external.")] = "adapter",
    base: Annotated[
        Optional[str], typer.Option("--base", "-b", help="Registered base model (required for adapters).")
    ] = None,
    version: Annotated[
        Optional[str], typer.Option("--version", help="Version label; default: the next integer.")
    ] = None,
    domain: Annotated[
        Optional[list[str]], typer.Option("--domain", "-d", help="A domain it covers (repeatable).")
    ] = None,
    skill: Annotated[Optional[list[str]], typer.Option("--skill", "-s", help="A skill it has (repeatable).")] = None,
    description: Annotated[str, typer.Option("--description", help="One or two sentences on what it is good at.")] = "",
    examples: Annotated[
        Optional[Path], typer.Option("--examples", help="JSONL of {prompt, reference?, task?, split?} rows.")
    ] = None,
    cost: Annotated[Optional[float], typer.Option("--cost", help="Cost per 1k tokens (for the leaderboard).")] = None,
    api_base: Annotated[
        Optional[str],
        typer.Option(
            "--api-base", help="External experts: the OpenAI-compatible server to call (http://host:port/v1)."
        ),
    ] = None,
    api_key_env: Annotated[
        Optional[str],
        typer.Option(
            "--api-key-env",
            help="External experts: the NAME of the environment variable that holds the key (the key itself is never stored).",
        ),
    ] = None,
    serve_config: Annotated[
        Optional[Path],
        typer.Option(
            "--serve-config",
            envvar="MOERGE_SERVE_CONFIG",
            help="The serve config the cluster runs with: an adapter its base's engine cannot serve (vLLM and DoRA, a rank above max_lora_rank) is refused now, not at serve time.",
        ),
    ] = None,
) -> None:
    """Register an expert: validate it, copy its files into the artifact store, record it."""
    if serve_config is not None and kind == "adapter" and base:
        from services.gateway.backend import check_servable
        from services.serving.config import load_config

        engines = load_config(serve_config).engines
        check_servable(
            {"name": name, "kind": kind, "base": base, "source": source},
            lambda b: (engines.for_base(b).engine, engines.for_base(b).engine_args),
        )
    with _registry() as reg, _shown_warnings():
        expert = reg.register_expert(
            name,
            kind,
            source,
            base=base,
            version=version,
            domains=domain or (),
            skills=skill or (),
            description=description,
            examples=examples,
            cost=cost,
            api_base=api_base,
            api_key_env=api_key_env,
        )
        n_examples = len(reg.get_examples(expert.name, expert.version))
    console.print(
        f"registered [bold]{expert.name}[/bold] version {expert.version} ({expert.kind}, {expert.status}), "
        f"{n_examples} examples, checksum {expert.checksum[:12] or '-'}",
        highlight=False,
    )


@base_app.command("add")
def base_add(
    name: Annotated[
        str,
        typer.Argument(
            help="Name to register the base model under; a hub id such as Qwen/Qwen2.5-7B-Instruct is fine."
        ),
    ],
    path: Annotated[
        str,
        typer.Argument(
            help="Folder with config.json, safetensors weights and a tokenizer (an HF cache snapshot folder works), "
            "or a hub reference hf://owner/name[@revision]: fetched into the HF cache and pinned to its commit."
        ),
    ],
    trust_remote_code: Annotated[
        bool,
        typer.Option(
            "--trust-remote-code",
            help="The model brings its own code (config.json auto_map, .py files) and you allow every engine to run it.",
        ),
    ] = False,
) -> None:
    """Register a base model folder (its files stay where they are)."""
    with _registry() as reg:
        base = reg.register_base(name, path, trust_remote_code=trust_remote_code)
    code = " (runs its own code: --trust-remote-code)" if base.trust_remote_code else ""
    console.print(
        f"registered base [bold]{base.name}[/bold] ({base.architecture}) at {base.uri}{code}", highlight=False
    )


@base_app.command("remove")
def base_remove(
    name: Annotated[str, typer.Argument(help="The base model's name.")],
    cascade: Annotated[
        bool, typer.Option("--cascade", help="Remove the experts built on it too (every version, with their files).")
    ] = False,
) -> None:
    """Remove a base model's record; its folder is left alone. Refused while experts use it, unless --cascade."""
    with _registry() as reg:
        base, removed = reg.remove_base(name, cascade=cascade)
    also = f", and {len(removed)} expert version(s) built on it: {', '.join(e.ref for e in removed)}" if removed else ""
    console.print(f"removed base [bold]{base.name}[/bold]{also}", highlight=False)


@base_app.command("list")
def base_list() -> None:
    """List registered base models."""
    with _registry() as reg:
        bases = reg.list_bases()
    table = Table("name", "architecture", "path", title="base models")
    for b in bases:
        table.add_row(b.name, b.architecture, b.uri)
    print_table(table)


def _expert_record(e) -> dict:
    """One expert version's registry record, as `experts list --json` and `experts show` print it."""
    return {
        "name": e.name,
        "version": e.version,
        "kind": e.kind,
        "base": e.base.name if e.base else None,
        "uri": e.uri,
        "status": e.status,
        "domains": e.domains,
        "skills": e.skills,
        "description": e.description,
        "cost_per_1k_tokens": e.cost_per_1k_tokens,
        "api_base": e.api_base,
        "api_key_env": e.api_key_env,
        "checksum": e.checksum,
        "size_bytes": e.size_bytes,
        "created_at": e.created_at.isoformat(),
    }


@experts_app.command("list")
def experts_list(
    kind: Annotated[Optional[str], typer.Option("--kind", help="Only this kind.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (a list of records) instead of a table.")] = False,
) -> None:
    """List experts, every version, as a table."""
    with _registry() as reg:
        experts = reg.list_experts(kind=kind)
    if as_json:
        print(json.dumps([_expert_record(e) for e in experts], indent=2))
        return
    table = Table("name", "version", "kind", "base", "status", "domains", "skills", "cost/1k", title="experts")
    for e in experts:
        table.add_row(
            e.name,
            e.version,
            e.kind,
            e.base.name if e.base else "-",
            e.status,
            ", ".join(e.domains),
            ", ".join(e.skills),
            "-" if e.cost_per_1k_tokens is None else f"{e.cost_per_1k_tokens:g}",
        )
    print_table(table)


@experts_app.command("show")
def experts_show(
    name: Annotated[str, typer.Argument(help="Expert name.")],
    version: Annotated[Optional[str], typer.Option("--version", help="Version; default: the latest.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show one expert: its record, example counts and routing artifacts."""
    with _registry() as reg:
        e = reg.get_expert(name, version)
        examples = reg.get_examples(e.name, e.version)
        artifacts = reg.get_artifacts(expert=e.name, version=e.version)
    splits: dict[str, int] = {}
    for x in examples:
        splits[x.split] = splits.get(x.split, 0) + 1
    info = {**_expert_record(e), "examples": splits, "artifacts": [f"{a.router}/{a.kind}" for a in artifacts]}
    if as_json:
        print(json.dumps(info, indent=2))
        return
    table = Table(show_header=False, title=f"{e.name}@{e.version}")
    for key, value in info.items():
        shown = ", ".join(f"{k}: {v}" for k, v in value.items()) if isinstance(value, dict) else value
        shown = ", ".join(shown) if isinstance(shown, list) else shown
        table.add_row(key, "-" if shown in (None, "") else str(shown))
    print_table(table)


@experts_app.command("remove")
def experts_remove(
    name: Annotated[str, typer.Argument(help="Expert name.")],
    version: Annotated[
        Optional[str], typer.Option("--version", help="Only this version; default: every version.")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove an expert (one version, or all of them) with its files and routing artifacts."""
    with _registry() as reg:
        if version is not None:
            targets = [reg.get_expert(name, version)]
        else:
            targets = [e for e in reg.list_experts() if e.name == name]
            if not targets:
                reg.get_expert(name)  # raises NotFoundError
        refs = ", ".join(e.ref for e in targets)
        if not yes:
            typer.confirm(f"remove {refs} and their files?", abort=True)
        removed = reg.remove_expert(name, version)
    console.print(f"removed {', '.join(e.ref for e in removed)}", highlight=False)


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Option("--revision", help="Target revision.")] = "head",
) -> None:
    """Migrate the database up to a revision (default: head)."""
    from registry import db

    db.upgrade(None, revision)
    console.print(f"database at revision {db.current_revision()}", highlight=False)


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision ('base' drops every table).")],
) -> None:
    """Migrate the database down to a revision."""
    from registry import db

    db.downgrade(None, revision)
    console.print(f"database at revision {db.current_revision() or 'base (empty)'}", highlight=False)


@db_app.command("current")
def db_current() -> None:
    """Print the database's revision and the head this moerge expects."""
    from registry import db

    console.print(f"current {db.current_revision() or 'none'}, head {db.head_revision()}", highlight=False)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="A name for the key (who or what uses it).")],
    scope: Annotated[str, typer.Option("--scope", help="user | admin.")] = "user",
    model: Annotated[
        Optional[list[str]], typer.Option("--model", "-m", help="A model it may call (repeatable); default: all.")
    ] = None,
    rpm: Annotated[Optional[int], typer.Option("--rpm", help="Requests per minute; default: unlimited.")] = None,
) -> None:
    """Create an API key and print it once (only its hash is stored)."""
    with _registry() as reg:
        record, plaintext = reg.create_key(name, scope=scope, models=model or (), rpm=rpm)
    console.print(f"created {record.scope} key [bold]{record.name}[/bold]; store it now, it is not shown again:")
    print(plaintext)


@keys_app.command("list")
def keys_list() -> None:
    """List API keys (names, scopes and limits; never the keys)."""
    with _registry() as reg:
        keys = reg.list_keys()
    table = Table("name", "scope", "models", "rpm", "prefix", "created", "active", title="API keys")
    for k in keys:
        table.add_row(
            k.name,
            k.scope,
            ", ".join(k.allowed_models) or "all",
            "-" if k.rpm_limit is None else str(k.rpm_limit),
            k.key_prefix + "…",
            k.created_at.strftime("%Y-%m-%d %H:%M"),
            "yes" if k.active else "revoked",
        )
    print_table(table)


@keys_app.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(help="The key's name.")]) -> None:
    """Revoke an API key."""
    with _registry() as reg:
        reg.revoke_key(name)
    console.print(f"revoked key {name}", highlight=False)
