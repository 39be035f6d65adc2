"""``evaluate(strategy, suite, split)``: accuracy and per-query provenance of a strategy (or of one
expert alone) on a suite split. The leaderboard builds on it.

The built-in suite ``skills`` is the zoo's skill suite (``services/zoo/skills.py``), drawn
deterministically from ``seed``: the same arguments give the same examples and, with greedy
decoding, the same numbers.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

from composer.engine_protocol import GenerateRequest
from registry.errors import NotFoundError
from services.moe.pool import ExpertPool
from services.moe.strategies import MoE, Strategy
from services.zoo.skills import SPLITS, Example, exact_match, make_split

SUITES = ("skills",)
DEFAULT_PER_TASK = {"test": 25, "paraphrase": 25, "composition": 20, "validation": 16}
CONTAINS_MAX_NEW_TOKENS = 64  # the leaderboard's default for `contains` queries


def load_suite(suite: str, split: str, n_per_task: int | None = None, seed: int = 0, registry=None) -> list[Example]:
    """A split's queries: the built-in skills suite drawn from ``seed``, or a suite registered with
    ``moerge suite add`` (exact-match and contains queries; ``n_per_task`` takes the
    leaderboard's seeded sample of each task)."""
    if suite not in SUITES:
        if registry is None:
            raise NotFoundError(f"unknown suite {suite!r}; built in: {', '.join(SUITES)}")
        from services.leaderboard.suites import load_queries  # the leaderboard's own reading of it

        [queries] = load_queries(registry, suite, [split], n_per_task, seed).values()
        if any(q.metric == "multiple_choice" for q in queries):
            raise NotFoundError(
                f"suite {suite!r}/{split} has multiple-choice queries, which are scored by "
                "log-likelihood: run them with `moerge leaderboard run`"
            )
        return [Example(q.prompt, q.reference, q.task, q.split, (), "", metric=q.metric) for q in queries]
    if split not in SPLITS or split == "train":
        raise NotFoundError(f"unknown split {split!r}; evaluate on one of test, paraphrase, composition, validation")
    return make_split(split, n_per_task or DEFAULT_PER_TASK.get(split, 25), seed)


class Question(Protocol):
    """What scoring an answer reads of a query: the zoo's ``Example``, a leaderboard ``Query``."""

    @property
    def prompt(self) -> str: ...
    @property
    def reference(self) -> str: ...
    @property
    def task(self) -> str: ...
    @property
    def metric(self) -> str: ...


def is_correct(example: Question, prediction: str) -> bool:
    if example.metric == "contains":
        return example.reference.strip().lower() in prediction.lower()
    return exact_match(prediction, example.reference)


@dataclass
class QueryRecord:
    prompt: str
    reference: str
    task: str
    prediction: str
    correct: bool
    experts: list[tuple[str, float]]
    router_ms: float
    routing_correct: bool | None  # chosen top expert was trained on the gold task (None: not applicable)
    prompt_tokens: int
    completion_tokens: int
    provenance: dict


@dataclass
class EvalReport:
    strategy: str
    suite: str
    split: str
    accuracy: float
    n: int
    per_task: dict[str, float]
    routing_accuracy: float | None
    mean_experts: float
    router_ms_p50: float
    router_ms_p95: float
    seconds: float
    records: list[QueryRecord] = field(default_factory=list)
    # a text suite (metric loss): held-out nats per token over every document, and per task
    # (the segment labels); accuracy is then not measured
    loss: float | None = None
    loss_per_task: dict[str, float] = field(default_factory=dict)

    def to_dict(self, records: bool = True) -> dict:
        d = asdict(self)
        if not records:
            d.pop("records")
        return d


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return float(values[0])
    return float(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1])


def evaluate(
    strategy: Strategy | str,
    suite: str = "skills",
    split: str = "test",
    *,
    moe: MoE | None = None,
    pool: ExpertPool | None = None,
    n_per_task: int | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> EvalReport:
    """Run ``strategy`` (a ``moe/…`` name, or ``expert:<name>`` for one expert alone) on a split."""
    if moe is None:
        if pool is None:
            from registry.service import Registry

            pool = ExpertPool(Registry())
        moe = MoE(pool, seed=seed)
    name = strategy.name if isinstance(strategy, Strategy) else strategy
    if suite not in SUITES:
        from services.leaderboard.suites import load_queries

        [queries] = load_queries(moe.pool.registry, suite, [split], n_per_task, seed).values()
        if queries and all(q.metric == "loss" for q in queries):
            return _evaluate_texts(moe, name, suite, split, queries, progress)
        if any(q.metric == "loss" for q in queries):
            raise NotFoundError(
                f"suite {suite!r}/{split} mixes scored texts (metric loss) with questions: "
                "run it with `moerge leaderboard run`"
            )
    examples = load_suite(suite, split, n_per_task, seed, registry=moe.pool.registry)
    if not examples:
        raise NotFoundError(f"suite {suite!r} has no queries in split {split!r}")
    # the leaderboard's budgets: exact-match answers as long as the longest reference, in the
    # base's tokens, + 4; a `contains` answer may say more around its reference
    exact = [e.reference for e in examples if e.metric != "contains"]
    budgets = [moe.pool.token_budget(exact)] if exact else []
    if len(exact) < len(examples):
        budgets.append(CONTAINS_MAX_NEW_TOKENS)
    max_new = max(budgets)
    t0 = time.perf_counter()
    if name.startswith("expert:"):
        records = _expert_alone(moe, name.removeprefix("expert:"), examples, max_new)
    else:
        records = strategy_records(moe, moe.strategy(strategy), examples, max_new)
    if progress:
        progress(len(examples))
    seconds = time.perf_counter() - t0

    by_task: dict[str, list[bool]] = {}
    for r in records:
        by_task.setdefault(r.task, []).append(r.correct)
    return _report(
        name,
        suite,
        split,
        records,
        seconds,
        accuracy=sum(r.correct for r in records) / len(records),
        per_task={t: sum(v) / len(v) for t, v in sorted(by_task.items())},
    )


def _report(name: str, suite: str, split: str, records: list[QueryRecord], seconds: float, **scores) -> EvalReport:
    """The report of ``records``: routing and timing columns from them, the scores as given."""
    routed = [r.routing_correct for r in records if r.routing_correct is not None]
    times = [r.router_ms for r in records]
    return EvalReport(
        strategy=name,
        suite=suite,
        split=split,
        n=len(records),
        routing_accuracy=(sum(routed) / len(routed)) if routed else None,
        mean_experts=statistics.fmean(len(r.experts) for r in records) if records else 0.0,
        router_ms_p50=_percentile(times, 50),
        router_ms_p95=_percentile(times, 95),
        seconds=seconds,
        records=records,
        **scores,
    )


def _evaluate_texts(moe: MoE, name: str, suite: str, split: str, queries, progress) -> EvalReport:
    """A text suite's split: every document's held-out loss, scored as the leaderboard scores it
    (``services.leaderboard.text_scores``)."""
    from services.leaderboard.text_loss import LossTotals
    from services.leaderboard.text_scores import TextQuery, TextScorer

    scorer = TextScorer(moe)
    texts = [TextQuery.of(q) for q in queries]
    t0 = time.perf_counter()
    if name.startswith("expert:"):
        expert = name.removeprefix("expert:")
        if expert != moe.pool.base.name and expert not in moe.pool.experts:
            raise NotFoundError(f"no expert {expert!r} on base {moe.pool.base.name!r}")
        scored = scorer.expert(expert, texts)
        level = None
    else:
        chosen = moe.strategy(name)
        scored = scorer.strategy(chosen, texts)
        level = chosen.level
    if progress:
        progress(len(texts))
    seconds = time.perf_counter() - t0
    trained = _trained_tasks(moe)
    total, records = LossTotals(), []
    for q, r in zip(queries, scored):
        total.add(r.loss)
        top = r.experts[0][0] if r.experts and level == "query" else None
        records.append(
            QueryRecord(
                prompt=q.prompt,
                reference="",
                task=q.task,
                prediction="",
                correct=False,
                experts=[(n, float(w)) for n, w in r.experts],
                router_ms=r.router_ms,
                routing_correct=(q.task in trained.get(top, set())) if top in trained else None,
                prompt_tokens=r.tokens,
                completion_tokens=0,
                provenance={"target": r.target, "loss": {k: [r.loss.nats[k], r.loss.tokens[k]] for k in r.loss.nats}},
            )
        )
    return _report(
        name,
        suite,
        split,
        records,
        seconds,
        accuracy=0.0,
        per_task={},
        loss=total.per_token(),
        loss_per_task={label: total.per_token(label) for label in sorted(total.nats)},
    )


def _trained_tasks(moe: MoE) -> dict[str, set[str]]:
    return {
        name: {ex.task for ex in info.examples if ex.split == "train" and ex.task}
        for name, info in moe.pool.experts.items()
    }


def strategy_records(moe: MoE, strategy: Strategy, examples: Sequence[Question], max_new: int) -> list[QueryRecord]:
    """Run ``strategy`` on ``examples`` (batched through ``MoE.run``) and score each answer: the
    per-query records of ``evaluate``, also what the leaderboard stores."""
    tasks = [e.task for e in examples]
    results = moe.run(strategy, [e.prompt for e in examples], tasks, max_new_tokens=max_new)
    trained = _trained_tasks(moe)
    out = []
    for ex, (completion, routed) in zip(examples, results):
        # the base answering (a router's fallback) is no expert call
        experts = [(n, float(w)) for n, w in completion.experts if n != moe.pool.base.name]
        top = experts[0][0] if experts and strategy.level == "query" else None
        single_task = "+" not in ex.task
        routing_ok = (ex.task in trained.get(top, set())) if (top is not None and single_task) else None
        out.append(
            QueryRecord(
                prompt=ex.prompt,
                reference=ex.reference,
                task=ex.task,
                prediction=completion.text,
                correct=is_correct(ex, completion.text),
                experts=experts,
                router_ms=routed.router_ms,
                routing_correct=routing_ok,
                prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens,
                provenance=completion.to_dict(),
            )
        )
    return out


def _expert_alone(moe: MoE, expert: str, examples: list[Example], max_new: int) -> list[QueryRecord]:
    engine = moe.pool.engine
    if expert != moe.pool.base.name and expert not in moe.pool.experts:
        raise NotFoundError(f"no expert {expert!r} on base {moe.pool.base.name!r}")
    target = None if expert == moe.pool.base.name else expert
    results = engine.generate([GenerateRequest(e.prompt, target, max_new) for e in examples])
    return [
        QueryRecord(
            prompt=e.prompt,
            reference=e.reference,
            task=e.task,
            prediction=r.text,
            correct=is_correct(e, r.text),
            experts=[(expert, 1.0)],
            router_ms=0.0,
            routing_correct=None,
            prompt_tokens=r.prompt_tokens,
            completion_tokens=r.completion_tokens,
            provenance={"expert": expert},
        )
        for e, r in zip(examples, results)
    ]
