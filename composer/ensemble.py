"""k experts answer in parallel; one answer is chosen by vote or synthesised by an aggregator.

The decision's first ``k`` experts (Symbolic-MoE recruits k = 3) all answer the same prompt in one
batched ``engine.generate`` call; the engine groups the items by adapter, so each expert's weights
are bound once. Then, by ``vote``:

- ``"majority"``: the most frequent normalised answer wins. Ties go to the answer whose experts
  carry more router weight, then to the one given by the better-ranked expert.
- ``"weighted"``: each answer collects the router weights (renormalised over the k recruits) of
  the experts that gave it; the heaviest wins; ties go to more votes, then the better rank.
- ``"aggregate"``: the aggregator target (Symbolic-MoE's per-task aggregator; any loaded target)
  gets a prompt listing the candidate answers and writes the final one. The prompt builder is
  configurable (``aggregate_prompt(question, candidates) -> str``) because small zoo models only
  understand their own skill formats; the default is a Symbolic-MoE / Mixture-of-Agents style
  instruction for instruction-tuned models.

Agreement (vote entropy in bits and the winner's share) is reported for every mode; for
``"aggregate"`` it is computed over the candidates with one vote each. The text returned for a
winning answer is the raw output of its best-ranked expert (not the normalised key).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from composer.base import (
    BaseComposer,
    Completion,
    ComposeError,
    ExpertOutput,
    Provenance,
    normalise_answer,
    output_of,
    require_targets,
    top_experts,
    vote_agreement,
    with_target,
)
from composer.engine_protocol import Engine, GenerateRequest
from routers.base import Decision
from routers.params import Param

VOTES = ("majority", "weighted", "aggregate")

AggregatePrompt = Callable[[str, list[str]], str]


def default_aggregate_prompt(question: str, candidates: list[str]) -> str:
    """Symbolic-MoE / MoA style: the question, the candidates numbered, a request to synthesise."""
    listed = "\n".join(f"Response {i + 1}: {c}" for i, c in enumerate(candidates))
    return (
        "Several models answered the question below. Some answers may be wrong. Judge them "
        "critically and write the single best answer.\n\n"
        f"Question:\n{question}\n\nResponses:\n{listed}\n\nFinal answer:"
    )


class Ensemble(BaseComposer):
    level = "query"
    engine_only = True
    PARAMS: tuple[Param, ...] = (
        Param("k", "int", 3, "experts that answer each query (the router's top k)", minimum=1),
        Param("aggregator", "str", None, "an expert that writes the final answer from the others' (vote = aggregate)"),
        Param("vote", "str", "majority", "how the answers combine", choices=VOTES),
    )

    def __init__(
        self,
        k: int = 3,
        vote: str = "majority",
        *,
        aggregator: str | None = None,
        aggregate_prompt: AggregatePrompt = default_aggregate_prompt,
        distinct_candidates: bool = True,
        normalise: Callable[[str], str] = normalise_answer,
    ) -> None:
        if vote not in VOTES:
            raise ComposeError(f"vote must be one of {VOTES}, got {vote!r}")
        if vote == "aggregate" and not aggregator:
            raise ComposeError("vote='aggregate' needs an aggregator target (an expert or the base)")
        if k < 1:
            raise ComposeError(f"k must be at least 1, got {k}")
        self.k = k
        self.vote = vote
        self.aggregator = aggregator
        self.aggregate_prompt = aggregate_prompt
        self.distinct_candidates = distinct_candidates  # list each distinct answer once to the aggregator
        self.normalise = normalise
        self.name = f"ensemble-{vote}-k{k}"

    def execute(self, decision: Decision, request: GenerateRequest, engine: Engine) -> Completion:
        return self.execute_batch([decision], [request], engine)[0]

    def execute_batch(
        self, decisions: Sequence[Decision], requests: Sequence[GenerateRequest], engine: Engine
    ) -> list[Completion]:
        """Every recruit of every request in one engine call (the engine groups them by expert):
        the same answers as ``execute`` one by one, each expert loaded once."""
        plans = [top_experts(d, self.k) for d in decisions]
        for decision, recruits in zip(decisions, plans):
            if not recruits:
                raise ComposeError(f"{self.name}: the router ({decision.router}) recruited no expert")
        needed = {n for recruits in plans for n, _ in recruits}
        if self.vote == "aggregate" and self.aggregator is not None:  # __init__ requires it
            needed.add(self.aggregator)
        require_targets(engine, sorted(needed), self.name)
        flat = [with_target(r, name) for r, recruits in zip(requests, plans) for name, _ in recruits]
        results = engine.generate(flat)
        out, start = [], 0
        for decision, request, recruits in zip(decisions, requests, plans):
            mine = results[start : start + len(recruits)]
            start += len(recruits)
            out.append(self._compose(decision, request, recruits, mine, engine))
        return out

    def _compose(
        self,
        decision: Decision,
        request: GenerateRequest,
        recruits: list[tuple[str, float]],
        results: list,
        engine: Engine,
    ) -> Completion:
        outputs = [
            output_of(name, r, weight=w, answer=self.normalise(r.text)) for (name, w), r in zip(recruits, results)
        ]
        counts, masses, first_rank = _tally(outputs)
        info: dict = {}

        if self.vote == "aggregate":
            agreement = vote_agreement(counts, "majority")
            candidates = _candidates(outputs, first_rank, self.distinct_candidates)
            prompt = self.aggregate_prompt(request.prompt, candidates)
            [agg] = engine.generate([with_target(request, self.aggregator, prompt)])
            outputs.append(output_of(self.aggregator, agg, role="aggregator"))  # type: ignore[arg-type]
            text, finish = agg.text, str(agg.finish_reason)
            info.update(aggregator=self.aggregator, candidates=candidates)
        else:
            if self.vote == "majority":
                agreement = vote_agreement(counts, "majority")
                order = lambda a: (-counts[a], -masses[a], first_rank[a])  # noqa: E731
            else:
                agreement = vote_agreement(masses, "weighted")
                order = lambda a: (-masses[a], -counts[a], first_rank[a])  # noqa: E731
            winner = min(counts, key=order)
            chosen = outputs[first_rank[winner]]
            text, finish = chosen.text, chosen.finish_reason
            info.update(winner=winner, winner_expert=chosen.expert)

        return Completion(
            text=text,
            finish_reason=finish,
            provenance=Provenance(
                composer=self.name,
                router=decision.router,
                experts=recruits,
                outputs=outputs,
                agreement=agreement,
                decision_info=decision.info,
                info=info,
            ),
        )


def _tally(outputs: list[ExpertOutput]) -> tuple[dict[str, float], dict[str, float], dict[str, int]]:
    """Per distinct answer: number of votes, summed router weight, rank of its first (best) expert."""
    counts: dict[str, float] = {}
    masses: dict[str, float] = {}
    first_rank: dict[str, int] = {}
    for rank, o in enumerate(outputs):
        counts[o.answer] = counts.get(o.answer, 0.0) + 1.0
        masses[o.answer] = masses.get(o.answer, 0.0) + o.weight
        first_rank.setdefault(o.answer, rank)
    return counts, masses, first_rank


def _candidates(outputs: list[ExpertOutput], first_rank: dict[str, int], distinct: bool) -> list[str]:
    if not distinct:
        return [o.text.strip() for o in outputs]
    return [outputs[rank].text.strip() for rank in sorted(first_rank.values())]


class WeightedVote(Ensemble):
    """``Ensemble`` whose vote weighs each answer by the router's weight for its expert."""

    PARAMS = tuple(replace(p, default="weighted") if p.name == "vote" else p for p in Ensemble.PARAMS)

    def __init__(self, k: int = 3, vote: str = "weighted", **kwargs) -> None:  # noqa: ANN003
        super().__init__(k, vote, **kwargs)
