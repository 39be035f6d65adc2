"""HOW ANSWERS COMBINE: single expert, k experts + aggregate, merged adapters, mixtures, stitching.

Query-level plans, each ``execute(decision, request, engine) -> Completion`` (``composer.base``):

- ``single.Single``        the router's top expert answers alone
- ``ensemble.Ensemble``    k experts in one batched call, then majority / weighted vote or an
                           aggregator expert (Symbolic-MoE)
- ``merge.Merged``         the experts merged into one adapter (task arithmetic, TIES, DARE in ΔW
                           space; ``linear_factors`` in factor space), cached on disk
- ``stitch.Stitch``        a compositional request split into steps, each routed to its expert

Also ``merge.merge_adapters`` and ``lorahub`` (gradient-free LoraHub composition), and
``molora`` (the token-level mixture layer the hf engine installs). Nothing heavy is imported here.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from composer.base import BaseComposer

# Every composer by name → "module:Class", imported on first use (merges pull in torch, mixtures
# numba). Installed plugins add theirs through the ``moerge.composers`` entry-point group.
COMPOSERS: dict[str, str] = {
    "single": "composer.single:Single",
    "vote": "composer.ensemble:Ensemble",
    "weighted-vote": "composer.ensemble:WeightedVote",
    "merge": "composer.merge:Merged",
    "stitch": "composer.stitch:Stitch",
    "mixture": "composer.mixture:TokenwiseMixture",
}
PLUGIN_GROUP = "moerge.composers"
_loaded: dict[str, type[BaseComposer]] = {}
_plugins: dict | None = None  # name -> entry point, read once


def _plugin_entry_points() -> dict:
    global _plugins
    if _plugins is None:
        _plugins = {ep.name: ep for ep in entry_points(group=PLUGIN_GROUP) if ep.name not in COMPOSERS}
    return _plugins


def composer_names() -> list[str]:
    return [*COMPOSERS, *_plugin_entry_points()]


def composer_class(name: str) -> type[BaseComposer] | None:
    """The composer class registered as ``name`` (built-in or plugin), or None."""
    if name not in _loaded:
        if name in COMPOSERS:
            module, attr = COMPOSERS[name].split(":")
            _loaded[name] = getattr(import_module(module), attr)
        elif name in _plugin_entry_points():
            from composer.base import BaseComposer, ComposeError

            cls = _plugin_entry_points()[name].load()
            if not (isinstance(cls, type) and issubclass(cls, BaseComposer)):
                # the runtime reads what a composer declares (level, kinds, runs_on, from_strategy)
                raise ComposeError(f"composer plugin {name!r} ({cls!r}) is no subclass of composer.base.BaseComposer")
            _loaded[name] = cls
        else:
            return None
    return _loaded[name]
