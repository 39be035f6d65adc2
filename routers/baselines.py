"""Reference routers every method is compared with: oracle, random, base, best-single.

- ``oracle``: the gold ``request.task`` picks the expert trained on it (its train examples' tasks,
  then its domains / skills). The upper bound on held-in tasks. An unknown or missing task goes to
  the configured fallback, else the base model.
- ``random``: a uniformly random expert (``k`` distinct ones, equal weights) from a seeded
  generator; the same seed and the same calls give the same decisions, whatever the load order.
- ``base``: no expert at all (``Decision.experts == []``): the base model answers.
- ``all``: every loaded expert with equal weight (what a uniform merge of all experts consumes).
- ``best-single``: always the one expert with the best mean validation accuracy — measured at
  ``fit_expert`` by an injected ``evaluate_fn`` on a shared validation pool (or the expert's own
  validation examples), or given as ``accuracies``; a configured ``expert`` name overrides both.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence

from routers.base import Artifact, Decision, ExpertExample, ExpertInfo, RouteRequest
from routers.common import EvaluateFn, QueryRouter, dumps, expert_tasks, validation_set
from routers.params import Param


class OracleRouter(QueryRouter):
    name = "oracle"
    needs = frozenset({"gold_task"})
    PARAMS = (Param("fallback", "str", None, "the expert that answers when no expert fits the query"),)

    def __init__(self, fallback: str | None = None) -> None:
        super().__init__()
        self.fallback_expert = fallback

    def fit_expert(self, expert: ExpertInfo) -> Artifact:
        return Artifact(
            tensors={},
            metadata={"tasks": dumps(expert_tasks(expert)), "tags": dumps([*expert.domains, *expert.skills])},
        )

    def expert_for(self, task: str) -> str | None:
        for key in ("tasks", "tags"):  # trained-on tasks beat tags
            for name in self.names:
                if task in json.loads(self.artifacts[name].metadata.get(key, "[]")):
                    return name
        return None

    def route(self, request: RouteRequest) -> Decision:
        if (single := self.single_expert()) is not None:
            return single
        name = self.expert_for(request.task) if request.task else None
        if name is None:
            return self.fallback(self.fallback_expert, reason="no expert for gold task", task=request.task)
        return self.decision([(name, 1.0)], task=request.task)


class RandomRouter(QueryRouter):
    name = "random"
    needs = frozenset({"seed"})
    PARAMS = (
        Param("seed", "int", 0, "the random generator's seed (default: the strategy runtime's)"),
        Param("k", "int", 1, "experts drawn per query", minimum=1),
    )

    def __init__(self, seed: int = 0, k: int = 1) -> None:
        super().__init__()
        self.seed = seed
        self.k = k
        self.rng = random.Random(seed)

    def fit_expert(self, expert: ExpertInfo) -> Artifact:
        return Artifact(tensors={}, metadata={})

    def reset(self) -> None:
        self.rng = random.Random(self.seed)

    def route(self, request: RouteRequest) -> Decision:
        names = sorted(self.names)  # load order must not change the draw
        if not names:
            return self.decision([], fallback="base", reason="no experts")
        picked = self.rng.sample(names, min(self.k, len(names)))
        return self.decision([(n, 1.0) for n in picked], seed=self.seed)


class BaseModelRouter(QueryRouter):
    name = "base"

    def fit_expert(self, expert: ExpertInfo) -> Artifact:
        return Artifact(tensors={}, metadata={})

    def route(self, request: RouteRequest) -> Decision:
        return self.decision([], base=True, reason="base model, no expert")


class BestSingleRouter(QueryRouter):
    name = "best-single"
    needs = frozenset({"validation"})
    PARAMS = (Param("expert", "str", None, "the expert to always choose (default: the best on validation)"),)

    def __init__(
        self,
        expert: str | None = None,
        accuracies: Mapping[str, float] | None = None,
        evaluate_fn: EvaluateFn | None = None,
        validation_examples: Sequence[ExpertExample] | None = None,
    ) -> None:
        super().__init__()
        self.expert = expert
        self.accuracies = dict(accuracies or {})
        self.evaluate_fn = evaluate_fn
        self.validation_examples = list(validation_examples) if validation_examples is not None else None

    def fit_expert(self, expert: ExpertInfo) -> Artifact:
        if expert.name in self.accuracies:
            return Artifact(
                tensors={}, metadata={"accuracy": repr(float(self.accuracies[expert.name])), "source": "given"}
            )
        if self.evaluate_fn is None:
            return Artifact(tensors={}, metadata={})  # only usable with a configured expert name
        examples = validation_set(expert, self.validation_examples)
        correct = list(self.evaluate_fn(expert, examples)) if examples else []
        acc = sum(map(bool, correct)) / len(correct) if correct else 0.0
        return Artifact(tensors={}, metadata={"accuracy": repr(acc), "n": str(len(correct)), "source": "evaluate_fn"})

    def accuracy(self, name: str) -> float | None:
        acc = self.artifacts[name].metadata.get("accuracy")
        return float(acc) if acc is not None else self.accuracies.get(name)

    def route(self, request: RouteRequest) -> Decision:
        if self.expert is not None and self.expert in self.experts:
            return self.decision([(self.expert, 1.0)], reason="configured")
        if (single := self.single_expert()) is not None:
            return single
        accs = {n: a for n in self.names if (a := self.accuracy(n)) is not None}
        if not accs:
            return self.decision([], fallback="base", reason="no validation accuracies")
        best = max(accs, key=lambda n: (accs[n], -self.names.index(n)))  # ties: first registered
        return self.decision([(best, 1.0)], accuracies={n: round(a, 4) for n, a in accs.items()})


class AllExpertsRouter(QueryRouter):
    """Every expert, equal weights: the input of static merges (task arithmetic, TIES, DARE of
    the whole pool)."""

    name = "all"

    def fit_expert(self, expert: ExpertInfo) -> Artifact:
        return Artifact(tensors={}, metadata={})

    def route(self, request: RouteRequest) -> Decision:
        names = self.names
        if not names:
            return self.decision([], fallback="base", reason="no experts")
        return self.decision([(n, 1.0 / len(names)) for n in names])
