"""Build an engine that can answer for a registered expert (used by the CLI's one-off commands;
the Ray deployments keep engines alive instead)."""

from __future__ import annotations

from pathlib import Path

from registry.errors import MoergeError
from registry.models import Expert
from registry.service import Registry
from services.engines.hf import HFEngine


def hf_engine_for(registry: Registry, expert: Expert, **engine_kwargs) -> tuple[HFEngine, str | None]:
    """An ``HFEngine`` holding ``expert`` and the target name to ask for.

    An adapter is loaded on its registered base; a full model is loaded by itself as the engine's
    base (the target is then ``None``).
    """
    path = registry.expert_path(expert)
    if expert.kind == "adapter":
        if expert.base is None:
            raise MoergeError(f"adapter {expert.name!r} has no base model recorded")
        engine = HFEngine(Path(expert.base.uri), base_name=expert.base.name, **engine_kwargs)
        engine.load_adapter(expert.name, path)
        return engine, expert.name
    if expert.kind == "model":
        return HFEngine(path, base_name=expert.name, **engine_kwargs), None
    raise MoergeError(
        f"{expert.name!r} is an external expert ({expert.uri}); it is called through litellm, not the hf engine"
    )
