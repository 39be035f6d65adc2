"""Where moerge keeps its state: the home folder, the database URL and the artifact store.

Embedded default: a SQLite file and the artifact store under ``$MOERGE_HOME`` (``~/.moerge``).
Production: ``MOERGE_DATABASE_URL=postgresql+psycopg://…``.
"""

from __future__ import annotations

import os
from pathlib import Path


def moerge_home() -> Path:
    return Path(os.environ.get("MOERGE_HOME") or Path.home() / ".moerge").expanduser()


def database_url() -> str:
    url = os.environ.get("MOERGE_DATABASE_URL")
    if url:
        return url
    return f"sqlite:///{moerge_home() / 'moerge.db'}"


def artifact_root() -> Path:
    """Root of the artifact store: expert weights, routing artifacts, zoo builds."""
    return Path(os.environ.get("MOERGE_ARTIFACTS") or moerge_home() / "artifacts").expanduser()
