"""What every query-level composer returns, and the contract it keeps.

A composer turns a router's ``Decision`` plus the user's request into one ``Completion``: the final
text and its provenance (which experts ran with which weights, what each one wrote, how much they
agreed, which expert wrote which segment of a stitched answer, tokens spent on every engine call,
and the router's own decision info). ``Completion.to_dict()`` is plain JSON: it becomes the ``moe``
provenance object of the gateway's responses.

The request is the engine's own ``GenerateRequest`` (its ``target`` is ignored: the composer picks
targets); composers call ``engine.generate`` / ``engine.score`` only, so any engine that keeps the
protocol in ``composer.engine_protocol`` works.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from composer.engine_protocol import Engine, GenerateRequest, GenerateResult, ScoreRequest, ScoreResult
from registry.errors import MoergeError
from routers.base import Decision, Level

if TYPE_CHECKING:
    import torch


class ComposeError(MoergeError):
    """A plan cannot run as asked: no expert to run, an aggregator that is not loaded, a merge of
    incompatible adapters. The message names what to change."""


# ---------------------------------------------------------------------------------- records


@dataclass
class Scored:
    """A text scored through a composer: the engine's result, the experts that made it (with
    their weights) and the engine target that ran (an expert, a merged adapter, the mixture)."""

    result: ScoreResult
    experts: list[tuple[str, float]]
    target: str


@dataclass
class ExpertOutput:
    """One engine call made on the plan's behalf."""

    expert: str  # expert (engine target) name; the engine's base name for the base
    text: str
    weight: float = 0.0  # the router's weight for this expert (0 for an aggregator)
    role: str = "expert"  # expert | aggregator | step
    answer: str = ""  # the normalised answer this output voted for ("" when no vote)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    prompt_rule: str = "raw"  # how the request became this call's prompt (GenerateResult.prompt_rule)


@dataclass
class Segment:
    """A stretch of the final answer's lineage: ``expert`` wrote ``text`` at ``step``."""

    expert: str
    text: str
    step: int
    instruction: str = ""
    prompt: str = ""
    weight: float = 1.0


@dataclass
class Agreement:
    """How much the experts agreed, over their distinct normalised answers.

    ``entropy_bits`` is the Shannon entropy (bits) of the vote mass over distinct answers: 0 when
    all agree, log2(k) when k experts all differ (equal votes). ``winner_share`` is the winning
    answer's share of the vote mass. ``votes`` maps each distinct answer to its mass.
    """

    entropy_bits: float
    winner_share: float
    distinct: int
    votes: dict[str, float]
    method: str = "majority"  # majority (counts) | weighted (router weights)


@dataclass
class Provenance:
    composer: str
    router: str | None
    experts: list[tuple[str, float]]  # experts used, with the weights the plan gave them
    outputs: list[ExpertOutput] = field(default_factory=list)
    agreement: Agreement | None = None
    segments: list[Segment] = field(default_factory=list)
    decision_info: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # composer specifics: merged adapter, lorahub weights …


@dataclass
class Completion:
    text: str
    provenance: Provenance
    finish_reason: str = "stop"

    # -- token accounting: every engine call of the plan, aggregator and steps included
    @property
    def prompt_tokens(self) -> int:
        return sum(o.prompt_tokens for o in self.provenance.outputs)

    @property
    def completion_tokens(self) -> int:
        return sum(o.completion_tokens for o in self.provenance.outputs)

    @property
    def prompt_rule(self) -> str:
        """How the request became the prompt: one rule, or the calls' rules joined by "," where
        they differ (a strategy over experts with and without a chat template)."""
        rules = list(dict.fromkeys(o.prompt_rule for o in self.provenance.outputs))
        return ",".join(rules) if rules else "raw"

    # -- short cuts into the provenance
    @property
    def experts(self) -> list[tuple[str, float]]:
        return self.provenance.experts

    @property
    def outputs(self) -> list[ExpertOutput]:
        return self.provenance.outputs

    @property
    def agreement(self) -> Agreement | None:
        return self.provenance.agreement

    @property
    def segments(self) -> list[Segment]:
        return self.provenance.segments

    def to_dict(self) -> dict:
        """Plain JSON (str / float / int / bool / None / list / dict only)."""
        p = self.provenance
        return jsonable(
            {
                "text": self.text,
                "finish_reason": self.finish_reason,
                "prompt_rule": self.prompt_rule,
                "composer": p.composer,
                "router": p.router,
                "experts": [{"name": n, "weight": w} for n, w in p.experts],
                # shallow copies (these dataclasses are flat): jsonable copies what they hold
                "outputs": [dict(vars(o)) for o in p.outputs],
                "agreement": dict(vars(p.agreement)) if p.agreement is not None else None,
                "segments": [dict(vars(s)) for s in p.segments],
                "usage": {
                    "prompt_tokens": self.prompt_tokens,
                    "completion_tokens": self.completion_tokens,
                    "total_tokens": self.prompt_tokens + self.completion_tokens,
                    "engine_calls": len(p.outputs),
                },
                "decision": p.decision_info,
                "info": p.info,
            }
        )


def jsonable(value: Any) -> Any:
    """``value`` made JSON-safe: tensors and numpy values become lists / numbers, paths strings,
    non-finite floats ``None``, anything else unknown its ``str``."""
    # exact types first: every gateway response's provenance goes through here
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        return value if math.isfinite(value) else None
    if kind is dict:
        return {k if type(k) is str else str(k): jsonable(v) for k, v in value.items()}
    if kind is list:
        return [jsonable(v) for v in value]
    if isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return jsonable(value.tolist())
    return str(value)


# ---------------------------------------------------------------------------------- contract


@runtime_checkable
class Composer(Protocol):
    name: str

    def execute(self, decision: Decision, request: GenerateRequest, engine: Engine) -> Completion: ...


class StrategyRuntime(Protocol):
    """What a composer may ask of the runtime that builds it (``services.moe.strategies.MoE``):
    composers import no service code, so this is the whole of what they see of it."""

    @property
    def base_path(self) -> Path: ...

    @property
    def trust_remote_code(self) -> bool:
        """The base runs its own modelling code."""

    @property
    def merge_cache(self) -> Path:
        """Where merged adapters are kept."""

    @property
    def device(self) -> torch.device:
        """Where the strategy's engines run: merges load the base there too."""

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def max_batch_size(self) -> int: ...

    def experts_of(self, strategy: Any) -> list[str]:
        """The experts ``strategy`` may use (its expert set, of the kinds its methods take)."""

    def adapter_paths(self, names: Iterable[str]) -> dict[str, Path]: ...

    def router_for(self, strategy: Any) -> Any:
        """The strategy's router, built over its expert set."""

    def mixture(self) -> tuple[Engine, Any]:
        """The token-level mixture's engine and its MoLoRA layer (composer.molora)."""


class BaseComposer:
    """What the strategy runtime reads of every composer class, declared rather than guessed:
    built-ins and plugins (the ``moerge.composers`` entry-point group) subclass it.

    - ``level``: ``query`` takes a router's ``Decision``; ``token`` a ``MixtureSpec``.
    - ``kinds``: the expert kinds it can combine (with the router's, they bound a strategy's set).
    - ``PARAMS``: its user-settable parameters (routers/params.py), what ``strategies show`` lists.
    - ``runs_on``: the engine ``execute`` is given. ``pool``: the pool's engine, which may be a
      served one in another process. ``local``: the in-process engine, for composers that load
      what they make (a merged adapter). ``mixture``: the engine the MoLoRA layer is installed in.
    - ``engine_only``: every answer is engine calls alone, with no router or in-process model at
      answer time (the single expert, the ensembles): a server may answer it beside the router.
    - ``one_base``: it computes in one base model's weights (a merge, a mixture), so its experts
      are adapters of one base; the others may mix bases, full models and external experts.
    - ``scores_text``: ``score_batch`` gives the log-likelihood of a given text under what the
      decision composes (one expert, a merge, a mixture): a text suite's held-out loss. Composers
      of generated answers (votes, stitching) have none.
    """

    name = "composer"
    level: Level = "query"
    kinds: tuple[str, ...] = ("adapter", "model", "external")
    PARAMS: tuple = ()
    runs_on = "pool"
    engine_only = False
    one_base = False
    scores_text = False

    @staticmethod
    def usable(adapters: Mapping[str, Path | None]) -> tuple[Mapping[str, Path | None], dict[str, str]]:
        """The experts it can take of ``adapters`` (name -> adapter folder), and why it leaves the
        others out: every one, by default."""
        return dict(adapters), {}

    @classmethod
    def from_strategy(cls, runtime: StrategyRuntime, strategy: Any) -> BaseComposer:
        """This composer for ``strategy``: by default, built from its declared parameters alone."""
        return cls(**strategy.composer_params)

    def execute(self, decision: Any, request: GenerateRequest, engine: Engine) -> Completion:
        raise NotImplementedError

    def execute_batch(
        self, decisions: Sequence[Any], requests: Sequence[GenerateRequest], engine: Engine
    ) -> list[Completion]:
        """Many decisions at once; composers that can batch engine calls override it."""
        return [self.execute(d, r, engine) for d, r in zip(decisions, requests)]

    def score_batch(self, decisions: Sequence[Any], requests: Sequence[ScoreRequest], engine: Engine) -> list[Scored]:
        """Each request's continuation scored by what its decision composes (``scores_text``)."""
        raise ComposeError(f"composer {self.name!r} composes generated answers; it cannot score a given text")


# ---------------------------------------------------------------------------------- helpers

_SPACES = re.compile(r"\s+")


def normalise_answer(text: str) -> str:
    """The default vote key: surrounding whitespace dropped and inner runs collapsed to one space.
    Case and punctuation are kept (the zoo's uppercase skill would otherwise vote with its input)."""
    return _SPACES.sub(" ", text).strip()


def vote_agreement(votes: Mapping[str, float], method: str) -> Agreement:
    total = sum(votes.values())
    if total <= 0 or not votes:
        return Agreement(0.0, 0.0, len(votes), dict(votes), method)
    shares = [v / total for v in votes.values() if v > 0]
    entropy = -sum(p * math.log2(p) for p in shares)
    return Agreement(
        entropy_bits=max(0.0, entropy),  # -0.0 from a single answer
        winner_share=max(votes.values()) / total,
        distinct=len(votes),
        votes=dict(votes),
        method=method,
    )


def output_of(
    expert: str, result: GenerateResult, *, weight: float = 0.0, role: str = "expert", answer: str = ""
) -> ExpertOutput:
    return ExpertOutput(
        expert=expert,
        text=result.text,
        weight=weight,
        role=role,
        answer=answer,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        finish_reason=result.finish_reason,
        prompt_rule=getattr(result, "prompt_rule", "raw"),
    )


def base_target(engine: Engine) -> str:
    """The engine's name for its base model (what an empty decision falls back to)."""
    return next((name for name, kind in engine.targets().items() if kind == "base"), "base")


def top_experts(decision: Decision, k: int | None = None) -> list[tuple[str, float]]:
    """The decision's first ``k`` experts with their weights renormalised to sum to 1 (uniform
    when the router gave no positive weight)."""
    chosen = list(decision.experts if k is None else decision.experts[:k])
    total = sum(max(0.0, float(w)) for _, w in chosen)
    if total <= 0:
        return [(n, 1.0 / len(chosen)) for n, _ in chosen] if chosen else []
    return [(n, max(0.0, float(w)) / total) for n, w in chosen]


def require_targets(engine: Engine, names: Iterable[str], what: str) -> None:
    loaded = engine.targets()
    missing = [n for n in names if n not in loaded]
    if missing:
        raise ComposeError(
            f"{what}: {missing} not loaded on the engine (loaded: {sorted(loaded)}); load the experts first"
        )


def with_target(request: GenerateRequest, target: str | None, prompt: str | None = None) -> GenerateRequest:
    """``request`` for ``target``; with ``prompt``, a new text to answer (a stitched step, an
    aggregator's brief). In a chat, that text becomes the last user turn, after the system message
    and the history before it, so the next expert gets it through its own chat template."""
    if prompt is None:
        return replace(request, target=target)
    messages = request.messages
    if messages:
        last_user = max((i for i, (role, _) in enumerate(messages) if role == "user"), default=len(messages))
        messages = (*messages[:last_user], ("user", prompt))
    return replace(request, target=target, prompt=prompt, messages=messages)
