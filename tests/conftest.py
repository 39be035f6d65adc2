"""Shared pytest fixtures.

``micro_zoo`` builds the micro zoo (a real Llama base, LoRA experts, a full-model expert; under a
minute on two CPU cores) once per session; any test that needs trained checkpoints reuses it.
"""

from __future__ import annotations

import os

# Busy-waiting OpenMP threads stall on a shared 2-core machine; must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def micro_zoo(tmp_path_factory):
    """The micro zoo's ``ZooManifest`` (``manifest.root`` is its folder)."""
    from services.zoo.build import build_zoo

    return build_zoo("micro", tmp_path_factory.mktemp("zoo") / "micro", seed=0, progress=False)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An embedded home folder (SQLite registry, artifact store) of this test's own."""
    monkeypatch.setenv("MOERGE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MOERGE_DATABASE_URL", raising=False)
    monkeypatch.delenv("MOERGE_ARTIFACTS", raising=False)
    return tmp_path / "home"
