"""Engines by kind, and an engine that can answer for a registered expert (used by the CLI's
one-off commands; the Ray deployments keep engines alive instead)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from registry.errors import MoergeError
from registry.hub import model_folder
from registry.models import Expert
from registry.service import Registry
from services.engines.hf import HFEngine

# kind -> (module, class), imported on demand: vllm and litellm take seconds to import, and vllm
# need not be installed where no vllm engine runs.
ENGINE_KINDS: dict[str, tuple[str, str]] = {
    "hf": ("services.engines.hf", "HFEngine"),
    "vllm": ("services.engines.vllm", "VLLMEngine"),
    "external": ("services.engines.external", "ExternalEngine"),
}


def engine_class(kind: str) -> Callable[..., Any]:
    """The engine class for ``kind``; each is called as ``cls(path_or_model, base_name=..., **kwargs)``
    (the external engine takes a litellm model string where the others take a folder)."""
    try:
        module, name = ENGINE_KINDS[kind]
    except KeyError:
        raise MoergeError(f"unknown engine kind {kind!r} (known: {', '.join(ENGINE_KINDS)})") from None
    return getattr(importlib.import_module(module), name)


def make_engine(kind: str, path: str | Path | None = None, **engine_kwargs: Any) -> Any:
    """A new engine of ``kind`` on ``path`` (the external engine's default model, may be None)."""
    return engine_class(kind)(path, **engine_kwargs)


def hf_engine_for(registry: Registry, expert: Expert, **engine_kwargs) -> tuple[HFEngine, str | None]:
    """An ``HFEngine`` holding ``expert`` and the target name to ask for.

    An adapter is loaded on its registered base; a full model is loaded by itself as the engine's
    base (the target is then ``None``).
    """
    path = registry.expert_path(expert)
    if path is None:  # an external expert: it has no files here
        raise MoergeError(
            f"{expert.name!r} is an external expert ({expert.uri}); it is called through litellm, not the hf engine"
        )
    if expert.kind == "adapter":
        if expert.base is None:
            raise MoergeError(f"adapter {expert.name!r} has no base model recorded")
        engine = HFEngine(
            model_folder(expert.base.uri),
            base_name=expert.base.name,
            **{"trust_remote_code": bool(expert.base.trust_remote_code), **engine_kwargs},
        )
        engine.load_adapter(expert.name, path)
        return engine, expert.name
    if expert.kind == "model":
        return HFEngine(path, base_name=expert.name, **engine_kwargs), None
    raise MoergeError(f"{expert.name!r} is a {expert.kind!r} expert, which the hf engine cannot load")
