"""The Router contract shared by every routing method.

A router is fitted per expert (``fit_expert``) so that registering one more expert makes it
routable without retraining the others wherever the method allows; what it fits is returned as
tensors (plus string metadata) that services/ stores through the registry as the expert's
routing artifact for this router, and hands back with ``load_expert`` on the next start.

Routers import registry types only; services/ turns registry records into ``ExpertInfo``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import torch

from registry.errors import MoergeError
from routers.params import Param


class RouterError(MoergeError):
    """A router cannot fit or route as it is set up: no experts loaded, a fitting hook missing,
    a query back end that does not exist. The gateway answers 503 (the strategy exists, but
    cannot answer now)."""


class ExpertUnusable(RouterError):
    """This router (or composer) cannot use this expert: no examples to fit on, an adapter kind
    it cannot express. The strategy leaves the expert out and says so; other errors still fail."""


@dataclass(frozen=True)
class ExpertExample:
    prompt: str
    reference: str
    task: str
    split: str  # train | validation | …


@dataclass(frozen=True)
class ExpertInfo:
    """What a router may know of an expert."""

    name: str
    kind: str  # adapter | model | external
    domains: tuple[str, ...] = ()
    skills: tuple[str, ...] = ()
    description: str = ""
    examples: tuple[ExpertExample, ...] = ()
    adapter_path: Path | None = None  # peft folder, for routers that read LoRA factors
    base_path: Path | None = None
    # the base was registered with --trust-remote-code: fitting code may run its own modelling code
    base_trust_remote_code: bool = False

    def prompts(self, split: str = "train", limit: int | None = None) -> list[str]:
        out = [e.prompt for e in self.examples if e.split == split]
        return out[:limit] if limit is not None else out


@dataclass(frozen=True)
class RouteRequest:
    prompt: str
    task: str | None = None  # the gold task when known (oracle router, routing accuracy)


@dataclass
class Decision:
    """A query-level decision: experts ranked best first, weights summing to 1."""

    router: str
    experts: list[tuple[str, float]]
    info: dict = field(default_factory=dict)  # scores, fallback reason, … (goes into provenance)

    @property
    def top(self) -> str | None:
        return self.experts[0][0] if self.experts else None


@dataclass
class MixtureSpec:
    """A token-level decision: the engine mixes these adapters inside its forward pass."""

    router: str
    experts: list[str]
    gate: str  # phatgoose | average-activation | arrow | glider
    top_k: int = 2
    alpha: float = 0.0  # GLIDER's global weight; 0 reproduces PHATGOOSE
    temperature: float = 1.0
    global_scores: dict[str, float] | None = None  # GLIDER g_e per expert for this query
    info: dict = field(default_factory=dict)


@dataclass
class Artifact:
    """What ``fit_expert`` produced for one expert: tensors plus string metadata."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Router(Protocol):
    name: str

    def fit_expert(self, expert: ExpertInfo) -> Artifact:
        """Compute this expert's routing artifact (pure: does not change the router)."""

    def load_expert(self, expert: ExpertInfo, artifact: Artifact) -> None:
        """Make the expert routable from its stored artifact."""

    def remove_expert(self, name: str) -> None: ...

    def route(self, request: RouteRequest) -> Decision | MixtureSpec: ...

    def add_expert(self, expert: ExpertInfo) -> Artifact:
        """fit + load in one step; returns the artifact to store."""


# query: a Decision per query | token: a MixtureSpec the MoLoRA layer applies
Level = Literal["query", "token"]


class BaseRouter:
    """What the strategy runtime reads of every router class (built-ins and ``moerge.routers``
    plugins subclass it), and ``add_expert`` as ``fit_expert`` followed by ``load_expert``."""

    name = "router"
    level: Level = "query"
    kinds: tuple[str, ...] = ("adapter", "model")  # the expert kinds it can choose among
    # what the strategy runtime hands it (``MoE._supply`` in services/moe/strategies.py): embedder,
    # validation (evaluate_fn + validation_examples), validation_loss (loss_fn), task_skills, seed,
    # gold_task, local, head, placement (``device`` and ``dtype``: where the runtime's engines run
    # the base)
    needs: frozenset[str] = frozenset()
    PARAMS: tuple[Param, ...] = ()  # user-settable parameters (routers/params.py)

    def fit_expert(self, expert: ExpertInfo) -> Artifact:
        raise NotImplementedError

    def load_expert(self, expert: ExpertInfo, artifact: Artifact) -> None:
        raise NotImplementedError

    def remove_expert(self, name: str) -> None:
        raise NotImplementedError

    def route(self, request: RouteRequest) -> Decision | MixtureSpec:
        raise NotImplementedError

    def accepts_artifact(self, artifact: Artifact) -> bool:
        """Whether a stored artifact is one this router can load (False: fitted by an older
        recipe, so the pool fits it again)."""
        return True

    def add_expert(self, expert: ExpertInfo) -> Artifact:
        artifact = self.fit_expert(expert)
        self.load_expert(expert, artifact)
        return artifact
