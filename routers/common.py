"""Helpers shared by the query-level routers: the registered-expert table, decisions, artifacts.

Rules every query-level router here follows (ALGORITHMS.md, sanity checks):
- weights are fp32-computed, non-negative and renormalised to sum to 1;
- with exactly one expert registered there is nothing to choose: it is returned (weight 1), even
  where the method would otherwise fall back — ``info["reason"] == "single expert"`` says so;
- ``fit_expert`` is pure (it reads the expert and the router's configuration, never its state), so
  one expert's artifact never depends on which others are registered.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import torch

from routers.base import Artifact, BaseRouter, Decision, ExpertExample, ExpertInfo, ExpertUnusable
from routers.embedder import Embedder, get_embedder

# Runs an expert on examples and says which answers were correct (services/ passes one that drives
# the engine and the suite's metric).
EvaluateFn = Callable[[ExpertInfo, Sequence[ExpertExample]], Sequence[bool]]
# an expert's held-out loss on texts (examples with no reference): (nats in all, tokens scored,
# UTF-8 bytes of the text scored); per byte it compares experts whose tokenizers differ
LossFn = Callable[[ExpertInfo, Sequence[ExpertExample]], tuple[float, int, int]]


class QueryRouter(BaseRouter):
    """Base for query-level routers: keeps loaded experts in registration order."""

    name: str = "query"
    # a query-level decision names experts to call: any kind an engine can answer, external APIs
    # included (a strategy's expert set names them; the default pools hold adapters and models)
    kinds: tuple[str, ...] = ("adapter", "model", "external")

    def __init__(self) -> None:
        self.experts: OrderedDict[str, ExpertInfo] = OrderedDict()
        self.artifacts: dict[str, Artifact] = {}

    # -- registry side -------------------------------------------------------------------------

    def load_expert(self, expert: ExpertInfo, artifact: Artifact) -> None:
        self.experts[expert.name] = expert
        self.artifacts[expert.name] = artifact
        self._changed()

    def remove_expert(self, name: str) -> None:
        self.experts.pop(name, None)
        self.artifacts.pop(name, None)
        self._changed()

    def _changed(self) -> None:
        """Hook: rebuild whatever the router derives from the loaded artifacts."""

    @property
    def names(self) -> list[str]:
        return list(self.experts)

    # -- decisions -----------------------------------------------------------------------------

    def decision(self, experts: Iterable[tuple[str, float]], **info) -> Decision:
        return make_decision(self.name, experts, **info)

    def single_expert(self) -> Decision | None:
        if len(self.experts) == 1:
            return self.decision([(self.names[0], 1.0)], reason="single expert")
        return None

    def fallback(self, fallback: str | None, **info) -> Decision:
        """The generalist when one is configured and registered, else the base model (no expert)."""
        if fallback is not None and fallback in self.experts:
            return self.decision([(fallback, 1.0)], fallback=fallback, **info)
        return self.decision([], fallback="base", **info)


def make_decision(router: str, experts: Iterable[tuple[str, float]], **info) -> Decision:
    """Best first, weights clipped at 0 and renormalised to sum to 1 (uniform if all zero)."""
    pairs = [(n, max(float(w), 0.0)) for n, w in experts]
    total = sum(w for _, w in pairs)
    if pairs:
        pairs = [(n, w / total) for n, w in pairs] if total > 0 else [(n, 1.0 / len(pairs)) for n, _ in pairs]
        pairs.sort(key=lambda p: -p[1])
    return Decision(router=router, experts=pairs, info=info)


def expert_tasks(expert: ExpertInfo) -> list[str]:
    """Tasks the expert was trained for: its train examples' tasks (else any split), first seen first."""
    tasks = [e.task for e in expert.examples if e.split == "train" and e.task]
    if not tasks:
        tasks = [e.task for e in expert.examples if e.task]
    return list(dict.fromkeys(tasks))


def primary_domain(expert: ExpertInfo) -> str:
    """What a classifier label stands for: the first domain, else skill, else task, else the name."""
    for seq in (expert.domains, expert.skills, tuple(expert_tasks(expert))):
        if seq:
            return seq[0]
    return expert.name


def split_examples(expert: ExpertInfo, split: str) -> list[ExpertExample]:
    return [e for e in expert.examples if e.split == split]


def validation_set(expert: ExpertInfo, pool: Sequence[ExpertExample] | None) -> list[ExpertExample]:
    """The shared validation pool when given (every expert answers the same set, as in the
    papers); otherwise the expert's own validation examples."""
    if pool is not None:
        return list(pool)
    return split_examples(expert, "validation")


def stack_rows(tensors: Sequence[torch.Tensor], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate per-expert [n_i, d] matrices; also return the owner index of every row."""
    if not tensors:
        return torch.empty(0, dim), torch.empty(0, dtype=torch.long)
    mat = torch.cat([t.float() for t in tensors])
    owner = torch.cat([torch.full((len(t),), i, dtype=torch.long) for i, t in enumerate(tensors)])
    return mat, owner


def dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True)


class EmbeddingRouter(QueryRouter):
    """Base for routers that embed prompts with the shared MiniLM (injectable ``embedder``)."""

    embedder: Embedder | None = None

    @property
    def emb(self) -> Embedder:
        return self.embedder or get_embedder()

    def train_prompts(self, expert: ExpertInfo, limit: int | None) -> list[str]:
        prompts = expert.prompts("train", limit=limit)
        if not prompts:
            raise ExpertUnusable(f"{self.name}: expert {expert.name!r} has no train examples")
        return prompts
