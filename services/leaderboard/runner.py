"""Run the leaderboard: every expert alone and every strategy on every split of a suite.

*Grouped* (the default) is Symbolic-MoE's batching trick: an expert alone gets ONE
``engine.generate`` over all its queries of all splits (and one ``engine.score`` for its
multiple-choice queries), so its adapter is merged into the base once and its queries run in
full batches; a strategy runs through ``MoE.run`` once per split, which batches by chosen expert
(single composer) or by mixture chunk. *Naive* answers one query at a time in query order, every
entry in turn: what a per-query harness does. Both give the same answers; only the wall time
differs (``bench/bench_leaderboard.py``).

Strategies are evaluated by ``services.moe.evaluate``'s own per-split code path, so a strategy's
numbers are those ``moerge eval`` prints for the same suite, split, sample size and seed. Stateful
routers (the seeded random router) are rewound before every split, as a fresh ``moerge eval`` is.

Cost: each engine call costs (prompt + completion tokens) / 1000 × the expert's
``cost_per_1k_tokens`` from the registry; experts without one, and the base, are charged
``default_cost``. A call that no single expert made (a tokenwise mixture, a merged adapter) is
charged the experts' rates averaged with the provenance's weights. Latency per query is amortised
over the batch that answered it: the query's own routing time plus its token share of the batch's
generation time (naive mode measures each query's call directly).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

from composer.base import ComposeError
from composer.engine_protocol import GenerateRequest, ScoreRequest
from registry.errors import MoergeError, NotFoundError
from registry.service import Registry
from routers.base import Decision
from services.leaderboard.domain_losses import gold_by_domain
from services.leaderboard.store import ALL
from services.leaderboard.suites import Query, is_correct, load_queries
from services.leaderboard.text_loss import LossTotals
from services.leaderboard.text_scores import TextQuery, TextRecord, TextScorer, time_shares
from services.moe.evaluate import strategy_records as evaluate_strategy_records  # moerge eval's own code path
from services.moe.pool import ExpertPool
from services.moe.strategies import MoE, Strategy

MODES = ("grouped", "naive")
EXPERT_PREFIX = "expert:"
NO_EXPERT = "(base)"  # what the confusion records when a router chose no expert
SEGMENT_ORACLE = "oracle:per-segment"  # a text suite's bound: each segment scored by its gold expert

Progress = Callable[[str, int], None]  # (what is running, queries just finished)


@dataclass
class QueryOutcome:
    split: str
    task: str
    correct: bool
    prediction: str
    experts: list[tuple[str, float]]
    chosen: str | None  # query-level strategies: the top expert (for the confusion heatmap)
    routing_correct: bool | None
    prompt_tokens: int
    completion_tokens: int
    cost: float
    latency_ms: float
    loss: LossTotals | None = None  # a text suite's document (metric loss): nats per segment label


@dataclass
class EntryOutcome:
    entry: str
    kind: str  # expert | strategy
    split: str
    outcomes: list[QueryOutcome] = field(default_factory=list)
    skipped: int = 0  # queries this entry cannot answer (multiple choice through a non-single composer)
    seconds: float = 0.0

    def summary(self) -> dict:
        """The entry's ``LeaderboardResult`` columns."""
        return summarise(self.entry, self.kind, self.split, self.outcomes, self.skipped, self.seconds)


@dataclass
class RunOutcome:
    suite: str
    base_model: str
    seed: int
    n_per_task: int | None
    splits: list[str]
    mode: str
    entries: list[str]
    results: dict[tuple[str, str], EntryOutcome]
    n_queries: int
    seconds: float
    settings: dict

    def result_rows(self) -> list[dict]:
        """Per entry: one row per split, then the pooled ``all`` row."""
        rows: list[dict] = []
        for entry in self.entries:
            parts = [self.results[(entry, s)] for s in self.splits]
            rows.extend(p.summary() for p in parts)
            pooled = [o for p in parts for o in p.outcomes]
            rows.append(
                summarise(
                    entry, parts[0].kind, ALL, pooled, sum(p.skipped for p in parts), sum(p.seconds for p in parts)
                )
            )
        return rows

    def run_row(self) -> dict:
        return {
            "suite": self.suite,
            "base_model": self.base_model,
            "seed": self.seed,
            "n_per_task": self.n_per_task,
            "splits": list(self.splits),
            "mode": self.mode,
            "n_queries": self.n_queries,
            "seconds": self.seconds,
            "settings": dict(self.settings),
        }


def is_text_suite(queries: dict[str, list[Query]]) -> bool:
    """Every query is a text to score (metric loss): no answer is generated."""
    return all(q.metric == "loss" for qs in queries.values() for q in qs)


def percentile(values: Sequence[float], q: int) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return float(values[0])
    return float(statistics.quantiles(values, n=100, method="inclusive")[q - 1])


def summarise(entry: str, kind: str, split: str, outcomes: list[QueryOutcome], skipped: int, seconds: float) -> dict:
    n = len(outcomes)
    correct = sum(o.correct for o in outcomes)
    documents = [o.loss for o in outcomes if o.loss is not None]
    graded = n - len(documents)  # queries with an answer to judge (the others are scored texts)
    routed = [o.routing_correct for o in outcomes if o.routing_correct is not None]
    per_task: dict[str, list[int]] = {}
    confusion: dict[str, Counter] = defaultdict(Counter)
    for o in outcomes:
        if o.loss is None:
            c_n = per_task.setdefault(o.task, [0, 0])
            c_n[0] += int(o.correct)
            c_n[1] += 1
        if o.chosen is not None:
            confusion[o.task][o.chosen] += 1
    latencies = [o.latency_ms for o in outcomes]
    return {
        "entry": entry,
        "kind": kind,
        "split": split,
        "n": n,
        "correct": correct,
        "accuracy": correct / graded if graded else 0.0,
        "skipped": skipped,
        "routed": len(routed),
        "routing_accuracy": sum(routed) / len(routed) if routed else None,
        "mean_experts": statistics.fmean(len(o.experts) for o in outcomes) if outcomes else 0.0,
        "prompt_tokens": sum(o.prompt_tokens for o in outcomes),
        "completion_tokens": sum(o.completion_tokens for o in outcomes),
        "cost": sum(o.cost for o in outcomes),
        "latency_p50_ms": percentile(latencies, 50),
        "latency_p95_ms": percentile(latencies, 95),
        "seconds": seconds,
        "per_task": dict(sorted(per_task.items())),
        "confusion": {t: dict(sorted(c.items())) for t, c in sorted(confusion.items())},
        "loss": loss_summary(documents) if documents else None,
    }


def loss_summary(documents: list[LossTotals]) -> dict:
    """A ``LeaderboardResult.loss``: how many documents, and nats and tokens per label."""
    total = LossTotals()
    for d in documents:
        total.add(d)
    return {
        "documents": len(documents),
        "labels": {label: [total.nats[label], total.tokens[label]] for label in sorted(total.nats)},
    }


class LeaderboardRunner:
    """Runs entries over one ``MoE`` (one expert pool, one base). ``seed`` draws the suite and
    seeds the routers; the same seed reproduces the same answers."""

    def __init__(
        self,
        registry: Registry,
        *,
        base: str | None = None,
        seed: int = 0,
        default_cost: float = 1.0,
        max_new_tokens: int = 64,
        moe: MoE | None = None,
        device: str = "auto",
        dtype: str = "auto",
    ) -> None:
        if default_cost < 0:
            raise MoergeError(f"the default cost per 1k tokens must be >= 0, not {default_cost}")
        self.registry = registry
        self.seed = seed
        self.moe = moe if moe is not None else MoE(ExpertPool(registry, base, device=device, dtype=dtype), seed=seed)
        self.pool = self.moe.pool
        self.default_cost = default_cost
        self.max_new_tokens = max_new_tokens  # generation budget of `contains` queries
        self.rates = {
            name: (rec.cost_per_1k_tokens if rec.cost_per_1k_tokens is not None else default_cost)
            for name, rec in self.pool.records.items()
        }
        self._trained = {
            name: {ex.task for ex in info.examples if ex.split == "train" and ex.task}
            for name, info in self.pool.experts.items()
        }
        self._known_tasks = set().union(*self._trained.values()) if self._trained else set()
        self.texts = TextScorer(self.moe)
        self._idle: set[str] = set()  # the running suite's strategies with nothing to do on it

    # ------------------------------------------------------------------ what runs

    def _runs_here(self, strategy: Strategy) -> bool:
        """Whether a user strategy's expert set is on this pool's base (built-ins always are)."""
        if strategy.source == "builtin":
            return True
        try:
            self.moe.experts_of(strategy)
        except ComposeError:
            return False
        return True

    def resolve(
        self, strategies: Sequence[str] | None, experts: Sequence[str] | None, texts_only: bool = False
    ) -> list[str]:
        """Entry names: ``expert:<name>`` for every chosen expert, then the chosen strategies.
        ``texts_only`` (a suite of scored texts alone): by default, only the strategies whose
        composer can score a text (``MoE.scores_text``): a vote has no loss to give."""
        names = list(self.pool.names()) if experts is None else list(experts)
        unknown = [n for n in names if n not in self.pool.experts]
        if unknown:
            raise NotFoundError(
                f"no ready expert {', '.join(map(repr, unknown))} on base {self.pool.base.name!r}; "
                f"experts: {', '.join(self.pool.names())}"
            )
        if strategies is None:  # every built-in, and every user strategy over this pool's experts
            chosen = [
                name
                for name, strategy in self.moe.catalog.all().items()
                if self._runs_here(strategy) and (not texts_only or self.moe.scores_text(strategy))
            ]
        else:
            chosen = [self.moe.strategy(s).name for s in strategies]
        return [EXPERT_PREFIX + n for n in dict.fromkeys(names)] + list(dict.fromkeys(chosen))

    def run(
        self,
        suite: str = "skills",
        *,
        strategies: Sequence[str] | None = None,
        experts: Sequence[str] | None = None,
        splits: Sequence[str] | None = None,
        n_per_task: int | None = None,
        mode: str = "grouped",
        progress: Progress | None = None,
    ) -> RunOutcome:
        if mode not in MODES:
            raise MoergeError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        queries = load_queries(self.registry, suite, list(splits) if splits else None, n_per_task, self.seed)
        entries = self.resolve(strategies, experts, texts_only=is_text_suite(queries))
        if not entries:
            raise MoergeError("nothing to run: no expert and no strategy chosen")
        empty = [s for s, qs in queries.items() if not qs]
        if empty:
            raise MoergeError(f"suite {suite!r} has no queries in split(s) {', '.join(empty)}")
        progress = progress or (lambda what, n: None)
        t0 = time.perf_counter()
        results: dict[tuple[str, str], EntryOutcome] = {}
        for entry in entries:
            kind = "expert" if entry.startswith(EXPERT_PREFIX) else "strategy"
            for split in queries:
                results[(entry, split)] = EntryOutcome(entry, kind, split)
        strategy_entries = [e for e in entries if not e.startswith(EXPERT_PREFIX)]
        self._idle = {e for e in strategy_entries if not self._has_work(self.moe.strategy(e), queries)}
        self._warm_up(strategy_entries, queries, progress)
        if mode == "grouped":
            self._grouped(entries, queries, results, progress)
        else:
            self._naive(entries, queries, results, progress)
        if any(q.metric == "loss" for qs in queries.values() for q in qs):
            bound = self._segment_oracle(entries, queries, results)
            if bound is not None:
                entries = [*entries, SEGMENT_ORACLE]
                results.update(bound)
        return RunOutcome(
            suite=suite,
            base_model=self.pool.base.name,
            seed=self.seed,
            n_per_task=n_per_task,
            splits=list(queries),
            mode=mode,
            entries=entries,
            results=results,
            n_queries=sum(len(q) for q in queries.values()),
            seconds=time.perf_counter() - t0,
            settings={
                "default_cost_per_1k_tokens": self.default_cost,
                "expert_cost_per_1k_tokens": dict(sorted(self.rates.items())),
                "max_new_tokens_contains": self.max_new_tokens,
            },
        )

    # ------------------------------------------------------------------ schedules

    def _grouped(
        self,
        entries: list[str],
        queries: dict[str, list[Query]],
        results: dict[tuple[str, str], EntryOutcome],
        progress: Progress,
    ) -> None:
        everything = [q for qs in queries.values() for q in qs]
        max_new = self._max_new(queries)
        for entry in entries:
            if entry.startswith(EXPERT_PREFIX):
                name = entry.removeprefix(EXPERT_PREFIX)
                t0 = time.perf_counter()
                outcomes = self._expert(name, everything, max_new)
                seconds = time.perf_counter() - t0
                for q, o in zip(everything, outcomes):
                    results[(entry, q.split)].outcomes.append(o)
                for split, qs in queries.items():  # wall time attributed to splits by query count
                    results[(entry, split)].seconds = seconds * len(qs) / len(everything)
                progress(entry, len(everything))
            else:
                strategy = self.moe.strategy(entry)
                for split, qs in queries.items():
                    self._rewind(strategy)
                    t0 = time.perf_counter()
                    outcomes, skipped = self._strategy(strategy, qs, max_new[split])
                    part = results[(entry, split)]
                    part.outcomes, part.skipped, part.seconds = outcomes, skipped, time.perf_counter() - t0
                    progress(f"{entry} · {split}", len(qs))

    def _naive(
        self,
        entries: list[str],
        queries: dict[str, list[Query]],
        results: dict[tuple[str, str], EntryOutcome],
        progress: Progress,
    ) -> None:
        max_new = self._max_new(queries)
        for split, qs in queries.items():
            for entry in entries:
                if not entry.startswith(EXPERT_PREFIX):
                    self._rewind(self.moe.strategy(entry))
            for q in qs:
                for entry in entries:
                    part = results[(entry, split)]
                    t0 = time.perf_counter()
                    if entry.startswith(EXPERT_PREFIX):
                        [outcome] = self._expert(entry.removeprefix(EXPERT_PREFIX), [q], max_new)
                        outcomes, skipped = [outcome], 0
                    else:
                        outcomes, skipped = self._strategy(self.moe.strategy(entry), [q], max_new[split])
                    part.outcomes.extend(outcomes)
                    part.skipped += skipped
                    part.seconds += time.perf_counter() - t0
                progress(f"query {q.split}", len(entries))

    # ------------------------------------------------------------------ one entry

    def _expert(self, name: str, queries: list[Query], max_new: dict[str, int]) -> list[QueryOutcome]:
        """Every query answered by expert ``name`` alone: one generate call for the generation
        queries, one score call for the multiple-choice ones. Outcomes in query order."""
        target = None if name == self.pool.base.name else name
        rate = self.rates.get(name, self.default_cost)
        gen = [i for i, q in enumerate(queries) if q.metric not in ("multiple_choice", "loss")]
        mc = [i for i, q in enumerate(queries) if q.metric == "multiple_choice"]
        texts = [i for i, q in enumerate(queries) if q.metric == "loss"]
        out: dict[int, QueryOutcome] = {}
        if texts:
            docs = [queries[i] for i in texts]
            for i, o in zip(texts, self._texts(self.texts.expert(name, [TextQuery.of(q) for q in docs]), docs, False)):
                out[i] = o
        if gen:
            t0 = time.perf_counter()
            answers = self.pool.engine.generate(
                [GenerateRequest(queries[i].prompt, target, max_new[queries[i].split]) for i in gen]
            )
            shares = time_shares([r.prompt_tokens + r.completion_tokens for r in answers], time.perf_counter() - t0)
            for i, r, ms in zip(gen, answers, shares):
                q = queries[i]
                out[i] = QueryOutcome(
                    q.split,
                    q.task,
                    is_correct(q, r.text),
                    r.text,
                    [(name, 1.0)],
                    None,
                    None,
                    r.prompt_tokens,
                    r.completion_tokens,
                    (r.prompt_tokens + r.completion_tokens) / 1000 * rate,
                    ms,
                )
        if mc:
            for i, (choice, p_tok, c_tok, ms) in zip(mc, self._choose([queries[i] for i in mc], [target] * len(mc))):
                q = queries[i]
                out[i] = QueryOutcome(
                    q.split,
                    q.task,
                    is_correct(q, choice),
                    choice,
                    [(name, 1.0)],
                    None,
                    None,
                    p_tok,
                    c_tok,
                    (p_tok + c_tok) / 1000 * rate,
                    ms,
                )
        return [out[i] for i in range(len(queries))]

    def _strategy(self, strategy: Strategy, queries: list[Query], max_new: int) -> tuple[list[QueryOutcome], int]:
        """One split through ``moerge eval``'s code path (MoE.run, batched); multiple-choice queries
        through the routed expert's log-likelihoods where the composer is ``single``."""
        gen = [q for q in queries if q.metric not in ("multiple_choice", "loss")]
        mc = [q for q in queries if q.metric == "multiple_choice"]
        texts = [q for q in queries if q.metric == "loss"]
        outcomes: list[QueryOutcome] = []
        query_level = strategy.level == "query"
        skipped = 0
        if texts and self.moe.scores_text(strategy):
            scored = self.texts.strategy(strategy, [TextQuery.of(q) for q in texts])
            outcomes.extend(self._texts(scored, texts, query_level))
        else:
            skipped += len(texts)
        if gen:
            t0 = time.perf_counter()
            records = evaluate_strategy_records(self.moe, strategy, gen, max_new)
            elapsed_ms = (time.perf_counter() - t0) * 1000
            routing_ms = sum(r.router_ms for r in records)
            shares = time_shares(
                [r.prompt_tokens + r.completion_tokens for r in records], max(0.0, elapsed_ms - routing_ms) / 1000
            )
            for q, r, ms in zip(gen, records, shares):
                chosen = (r.experts[0][0] if r.experts else NO_EXPERT) if query_level else None
                outcomes.append(
                    QueryOutcome(
                        q.split,
                        q.task,
                        is_correct(q, r.prediction),
                        r.prediction,
                        list(r.experts),
                        chosen,
                        r.routing_correct if q.task in self._known_tasks else None,
                        r.prompt_tokens,
                        r.completion_tokens,
                        self._cost(r.provenance, r.experts),
                        r.router_ms + ms,
                    )
                )
        if mc and strategy.composer == "single" and query_level:
            routed = [self.moe.route(strategy, q.prompt, q.task) for q in mc]
            tops = [cast(Decision, rt.decision).top for rt in routed]  # query-level: a Decision each
            base = self.pool.base.name
            targets = [None if t in (None, base) else t for t in tops]
            for q, t, rt, (choice, p_tok, c_tok, ms) in zip(mc, targets, routed, self._choose(mc, targets)):
                experts = [(t, 1.0)] if t is not None else []
                judged = q.task in self._known_tasks  # a gold task some expert was trained on
                routing_ok = (q.task in self._trained.get(t, set())) if (t is not None and judged) else None
                rate = self.rates.get(t, self.default_cost) if t is not None else self.default_cost
                outcomes.append(
                    QueryOutcome(
                        q.split,
                        q.task,
                        is_correct(q, choice),
                        choice,
                        experts,
                        t if t is not None else NO_EXPERT,
                        routing_ok,
                        p_tok,
                        c_tok,
                        (p_tok + c_tok) / 1000 * rate,
                        rt.router_ms + ms,
                    )
                )
        else:
            skipped += len(mc)
        return outcomes, skipped

    def _choose(self, queries: list[Query], targets: list[str | None]) -> list[tuple[str, int, int, float]]:
        """Multiple choice by log-likelihood: every choice scored after the prompt (one batched score
        call); the choice with the highest summed log-probability wins (first on ties). Returns
        (choice, prompt tokens, scored tokens, latency ms) per query."""
        requests = [ScoreRequest(q.prompt, c, t) for q, t in zip(queries, targets) for c in q.choices]
        t0 = time.perf_counter()
        scores = self.pool.engine.score(requests)
        seconds = time.perf_counter() - t0
        tokenizer = self.pool.tokenizer
        out, k = [], 0
        for q in queries:
            mine = scores[k : k + len(q.choices)]
            k += len(q.choices)
            best = max(range(len(mine)), key=lambda j: (mine[j].logprob, -j))
            out.append(
                (q.choices[best], len(tokenizer(q.prompt)["input_ids"]) * len(mine), sum(s.num_tokens for s in mine))
            )
        shares = time_shares([p + c for _, p, c in out], seconds)
        return [(c, p, n, ms) for (c, p, n), ms in zip(out, shares)]

    # ------------------------------------------------------------------ text suites (metric loss)

    def _segment_oracle(
        self, entries: list[str], queries: dict[str, list[Query]], results: dict[tuple[str, str], EntryOutcome]
    ) -> dict[tuple[str, str], EntryOutcome] | None:
        """Each scored document's segments booked from its label's gold expert, by
        ``gold_by_domain`` of every ready expert's registered domains (by name): the bound a
        tokenwise mixture chases. None when some label has no gold expert, or its gold expert
        was not run alone here."""
        ran = {e.removeprefix(EXPERT_PREFIX) for e in entries if e.startswith(EXPERT_PREFIX)}
        gold = gold_by_domain((n, e.kind, e.domains) for n, e in sorted(self.pool.experts.items()))
        out: dict[tuple[str, str], EntryOutcome] = {}
        for split, qs in queries.items():
            labels = {label for q in qs if q.metric == "loss" for label, _ in (q.segments or ((q.task, ""),))}
            if not labels <= set(gold) or not {gold[label] for label in labels} <= ran:
                return None
            part = out[(SEGMENT_ORACLE, split)] = EntryOutcome(SEGMENT_ORACLE, "bound", split)
            rows = {n: results[(EXPERT_PREFIX + n, split)].outcomes for n in set(gold.values())}
            for i, q in enumerate(qs):
                if q.metric != "loss":
                    continue
                totals = LossTotals()
                for label in dict.fromkeys(label for label, _ in (q.segments or ((q.task, ""),))):
                    mine = rows[gold[label]][i].loss
                    if mine is not None and label in mine.nats:
                        totals.book(label, mine.nats[label], mine.tokens[label])
                experts = sorted({gold[label] for label in totals.nats})
                part.outcomes.append(
                    QueryOutcome(
                        q.split, q.task, False, "", [(n, 1.0) for n in experts], None, None, 0, 0, 0.0, 0.0, totals
                    )
                )
        return out

    def _texts(self, records: list[TextRecord], queries: list[Query], query_level: bool) -> list[QueryOutcome]:
        """Scored documents as outcomes: tokens scored as prompt tokens, at the scorer's rate."""
        out = []
        for q, r in zip(queries, records):
            chosen = routing_ok = None
            if query_level:
                top = r.experts[0][0] if r.experts else None
                chosen = NO_EXPERT if top in (None, self.pool.base.name) else top
                if q.task in self._known_tasks and chosen != NO_EXPERT:
                    routing_ok = q.task in self._trained.get(chosen, set())
            rate = self._rate(r.target, r.experts)
            out.append(
                QueryOutcome(
                    q.split,
                    q.task,
                    False,
                    "",
                    list(r.experts),
                    chosen,
                    routing_ok,
                    r.tokens,
                    0,
                    r.tokens / 1000 * rate,
                    r.router_ms + r.score_ms,
                    loss=r.loss,
                )
            )
        return out

    # ------------------------------------------------------------------ helpers

    def _cost(self, provenance: dict, experts: list[tuple[str, float]]) -> float:
        """Every engine call of a completion at its expert's rate (see the module doc)."""
        total = 0.0
        for o in provenance.get("outputs", []):
            tokens = o.get("prompt_tokens", 0) + o.get("completion_tokens", 0)
            total += tokens / 1000 * self._rate(o.get("expert", ""), experts)
        return total

    def _rate(self, name: str, experts: list[tuple[str, float]]) -> float:
        if name in self.rates:
            return self.rates[name]
        if name == self.pool.base.name or not experts:
            return self.default_cost
        weights = [max(0.0, w) for _, w in experts]
        total = sum(weights)
        if total <= 0:
            return statistics.fmean(self.rates.get(n, self.default_cost) for n, _ in experts)
        return sum(self.rates.get(n, self.default_cost) * w for (n, _), w in zip(experts, weights)) / total

    def _max_new(self, queries: dict[str, list[Query]]) -> dict[str, int]:
        """A split's generation budget, as ``evaluate`` sets it: the longest exact-match reference
        in the base's own tokens, plus 4; ``contains`` queries get ``max_new_tokens``."""
        out = {}
        for split, qs in queries.items():
            exact = [q.reference for q in qs if q.metric == "exact_match"]
            budgets = ([self.pool.token_budget(exact)] if exact else []) + [
                self.max_new_tokens for q in qs if q.metric == "contains"
            ]
            out[split] = max(budgets, default=1)
        return out

    def _warm_up(self, strategies: list[str], queries: dict[str, list[Query]], progress: Progress) -> None:
        """Build (fit or load) every strategy's router and composer before anything is timed, and
        answer one query so that lazy work (a merged adapter, mixture experts) is done too. A
        strategy with nothing to do on the suite (a vote on scored texts) is not built."""
        self.pool.engine  # noqa: B018 - loads every expert now, not inside the first timed call
        first = next((q for qs in queries.values() for q in qs if q.metric not in ("multiple_choice", "loss")), None)
        first_text = next((q for qs in queries.values() for q in qs if q.metric == "loss"), None)
        for name in strategies:
            progress(f"fitting / loading {name}", 0)
            strategy = self.moe.strategy(name)
            if name in self._idle:
                continue
            self.moe.router_for(strategy)
            self.moe.composer(strategy)
            if first is not None:
                self.moe.run(
                    strategy, [first.prompt], [first.task], max_new_tokens=self.pool.token_budget([first.reference])
                )
            if first_text is not None and self.moe.scores_text(strategy):
                self.texts.strategy(strategy, [TextQuery.of(first_text)])

    def _has_work(self, strategy: Strategy, queries: dict[str, list[Query]]) -> bool:
        """Whether ``strategy`` answers or scores any of ``queries`` (else they are all skipped)."""
        kinds = {q.metric for qs in queries.values() for q in qs}
        generates = bool(kinds - {"loss", "multiple_choice"})
        chooses = "multiple_choice" in kinds and strategy.composer == "single" and strategy.level == "query"
        return generates or chooses or ("loss" in kinds and self.moe.scores_text(strategy))

    def _rewind(self, strategy: Strategy) -> None:
        if strategy.name in self._idle:
            return  # never built: it has nothing to do on this suite
        router = self.moe.router_for(strategy)
        if hasattr(router, "reset"):
            router.reset()
