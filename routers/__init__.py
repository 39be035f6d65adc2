"""WHO ANSWERS: the Router protocol and its implementations (query-level and token-level)."""

from __future__ import annotations

from routers.baselines import AllExpertsRouter, BaseModelRouter, BestSingleRouter, OracleRouter, RandomRouter
from routers.classifier import ClassifierRouter
from routers.retrieval import RetrievalRouter
from routers.semantic import SemanticRouter
from routers.skill import SkillRouter

# Query-level routers by name (RouteLLM style): ``QUERY_ROUTERS[name](**params)``.
QUERY_ROUTERS: dict[str, type] = {
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
TOKEN_ROUTERS: dict[str, type] = {
    "phatgoose": PhatgooseRouter,
    "average-activation": AverageActivationRouter,
    "arrow": ArrowRouter,
    "glider": GliderRouter,
}
