"""WHO ANSWERS: the Router protocol and its implementations (query-level and token-level)."""

from __future__ import annotations

from importlib.metadata import entry_points

from routers.base import BaseRouter, RouterError
from routers.baselines import AllExpertsRouter, BaseModelRouter, BestSingleRouter, OracleRouter, RandomRouter
from routers.classifier import ClassifierRouter
from routers.retrieval import RetrievalRouter
from routers.semantic import SemanticRouter
from routers.skill import SkillRouter

# Query-level routers by name (RouteLLM style): ``QUERY_ROUTERS[name](**params)``.
QUERY_ROUTERS: dict[str, type[BaseRouter]] = {
    "classifier": ClassifierRouter,
    "semantic": SemanticRouter,
    "retrieval": RetrievalRouter,
    "skill": SkillRouter,
    "oracle": OracleRouter,
    "random": RandomRouter,
    "base": BaseModelRouter,
    "best-single": BestSingleRouter,
    "all": AllExpertsRouter,
}

from routers.arrow import ArrowRouter  # noqa: E402
from routers.glider import GliderRouter  # noqa: E402
from routers.phatgoose import AverageActivationRouter, PhatgooseRouter  # noqa: E402

# Token-level routers by name: their decisions are MixtureSpecs the MoLoRA layer applies.
TOKEN_ROUTERS: dict[str, type[BaseRouter]] = {
    "phatgoose": PhatgooseRouter,
    "average-activation": AverageActivationRouter,
    "arrow": ArrowRouter,
    "glider": GliderRouter,
}

# Every router by name: the built-ins, then installed plugins (the ``moerge.routers`` entry-point
# group: ``name = "package.module:RouterClass"``). A plugin cannot shadow a built-in.
ROUTERS: dict[str, type[BaseRouter]] = {**QUERY_ROUTERS, **TOKEN_ROUTERS}
PLUGIN_GROUP = "moerge.routers"
_plugins: dict[str, type] | None = None


def plugin_routers() -> dict[str, type]:
    """Routers that installed packages add through the ``moerge.routers`` entry points (loaded once)."""
    global _plugins
    if _plugins is None:
        found = {}
        for ep in entry_points(group=PLUGIN_GROUP):
            if ep.name not in ROUTERS:
                found[ep.name] = ep.load()
        _plugins = found
    return _plugins


def router_class(name: str) -> type[BaseRouter] | None:
    """The router class registered as ``name`` (built-in or plugin), or None."""
    cls = ROUTERS.get(name) or plugin_routers().get(name)
    if cls is not None and not (isinstance(cls, type) and issubclass(cls, BaseRouter)):
        # the runtime reads what a router declares (level, kinds, needs, PARAMS)
        raise RouterError(f"router plugin {name!r} ({cls!r}) is no subclass of routers.base.BaseRouter")
    return cls


def router_names() -> list[str]:
    return [*ROUTERS, *plugin_routers()]
