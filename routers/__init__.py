"""WHO ANSWERS: the Router protocol and its implementations (query-level and token-level)."""

from __future__ import annotations

from routers.baselines import BaseModelRouter, BestSingleRouter, OracleRouter, RandomRouter
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
}
