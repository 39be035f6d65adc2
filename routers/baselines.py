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
  Validation examples with no reference are texts (a domain expert's documents): on those the
  expert is measured by its held-out loss (an injected ``loss_fn``), ranked per byte of text so
  that experts with other tokenizers compare. Accuracy on the answered examples ranks first and
  the loss breaks its ties; on a pool of texts alone the lowest loss wins. With no validation
  result at all (no examples), the base answers.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence

from routers.base import Artifact, Decision, ExpertExample, ExpertInfo, RouteRequest
from routers.common import EvaluateFn, LossFn, QueryRouter, dumps, expert_tasks, validation_set
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
    needs = frozenset({"validation", "validation_loss"})
    PARAMS = (Param("expert", "str", None, "the expert to always choose (default: the best on validation)"),)
    # artifacts of the recipe that scored texts by exact match too (every text expert at 0) are fitted again
    RECIPE = "2"

    def __init__(
        self,
        expert: str | None = None,
        accuracies: Mapping[str, float] | None = None,
        evaluate_fn: EvaluateFn | None = None,
        validation_examples: Sequence[ExpertExample] | None = None,
        loss_fn: LossFn | None = None,
    ) -> None:
        super().__init__()
        self.expert = expert
        self.accuracies = dict(accuracies or {})
        self.evaluate_fn = evaluate_fn
        self.loss_fn = loss_fn
        self.validation_examples = list(validation_examples) if validation_examples is not None else None

    def accepts_artifact(self, artifact: Artifact) -> bool:
        return artifact.metadata.get("recipe") == self.RECIPE or artifact.metadata.get("source") == "given"

    def fit_expert(self, expert: ExpertInfo) -> Artifact:
        if expert.name in self.accuracies:
            return Artifact(
                tensors={}, metadata={"accuracy": repr(float(self.accuracies[expert.name])), "source": "given"}
            )
        examples = validation_set(expert, self.validation_examples)
        # a row with no reference is a text to be continued, not a question: no answer to match
        answered = [e for e in examples if e.reference.strip()]
        texts = [e for e in examples if not e.reference.strip()]
        metadata = {"recipe": self.RECIPE}
        if answered and self.evaluate_fn is not None:
            correct = list(self.evaluate_fn(expert, answered))
            metadata |= {"accuracy": repr(sum(map(bool, correct)) / len(correct)), "n": str(len(correct))}
        if texts and self.loss_fn is not None:
            nats, tokens, n_bytes = self.loss_fn(expert, texts)
            if tokens and n_bytes:
                metadata |= {
                    "loss": repr(nats / tokens),
                    "loss_per_byte": repr(nats / n_bytes),
                    "loss_tokens": str(tokens),
                }
        if len(metadata) > 1:
            metadata["source"] = "validation"
        # else nothing was measured: usable with a configured expert only
        return Artifact(tensors={}, metadata=metadata)

    def accuracy(self, name: str) -> float | None:
        acc = self.artifacts[name].metadata.get("accuracy")
        return float(acc) if acc is not None else self.accuracies.get(name)

    def loss(self, name: str, per: str = "token") -> float | None:
        """Held-out nats per token (what the leaderboard reports) or per byte (what ranks: a
        text's bytes are the same whichever tokenizer reads it)."""
        loss = self.artifacts[name].metadata.get("loss" if per == "token" else "loss_per_byte")
        return float(loss) if loss is not None else None

    def route(self, request: RouteRequest) -> Decision:
        if self.expert is not None and self.expert in self.experts:
            return self.decision([(self.expert, 1.0)], reason="configured")
        if (single := self.single_expert()) is not None:
            return single
        accs = {n: a for n in self.names if (a := self.accuracy(n)) is not None}
        per_byte = {n: v for n in self.names if (v := self.loss(n, "byte")) is not None}
        if not accs and not per_byte:
            return self.decision([], fallback="base", reason="no validation results")
        # accuracy on the answered examples first; the held-out loss on the texts breaks its
        # ties (and ranks alone on a pool of texts); then the first registered
        best = max(
            accs.keys() | per_byte.keys(),
            key=lambda n: (accs.get(n, 0.0), -per_byte.get(n, math.inf), -self.names.index(n)),
        )
        losses = {n: v for n in per_byte if (v := self.loss(n)) is not None}
        info = {"accuracies": {n: round(a, 4) for n, a in accs.items()}} if accs else {}
        if losses:
            info["losses"] = {n: round(v, 4) for n, v in losses.items()}
        return self.decision([(best, 1.0)], **info)


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
