"""A text suite's documents scored by held-out loss: by one expert alone, or through a strategy.

The one code path behind ``moerge eval`` and ``moerge leaderboard run`` on documents (suite rows
of metric ``loss``), so that both print the same numbers. Each document is

- cut to what the base reads in one pass (its context as the engine serves it, less the BOS it
  conditions on);
- routed, for a strategy, on its first ``ROUTE_TOKENS`` tokens (what a query-level router reads
  of it; a tokenwise router still gates every token of the pass), with its gold task for the
  oracle;
- scored in one teacher-forced pass by the engine's ``score`` (an empty prompt, the document as
  the continuation, token offsets back): by the chosen expert, the merged adapter or the MoLoRA
  mixture, as the strategy's composer decides (``MoE.score``);
- booked per segment label: each token's nats go to the segment holding its first character.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from composer.engine_protocol import ScoreRequest, ScoreResult
from services.leaderboard.text_loss import LossTotals, totals_of
from services.moe.strategies import MoE, Strategy
from services.moe.texts import fit_document, opening

ROUTE_TOKENS = 64  # what a router reads of a document: its opening tokens


@dataclass(frozen=True)
class TextQuery:
    """What scoring reads of a document: its labelled segments and gold task."""

    segments: tuple[tuple[str, str], ...]
    task: str

    @classmethod
    def of(cls, query) -> TextQuery:  # noqa: ANN001 - a suite Query, or anything with its fields
        """A suite query's document: its segments (a one-``prompt`` row: one segment, its task)."""
        return cls(tuple(query.segments) or ((query.task, query.prompt),), query.task)


@dataclass
class TextRecord:
    loss: LossTotals
    tokens: int  # tokens scored
    experts: list[tuple[str, float]]  # what scored it, with weights
    target: str  # the engine target that ran: an expert, a merged adapter, mixture/<gate>
    router_ms: float
    score_ms: float  # its token share of the engine time of its batch


class TextScorer:
    """Scores documents on one ``MoE``'s pool: the base's tokenizer cuts and opens them."""

    def __init__(self, moe: MoE) -> None:
        self.moe = moe
        self.pool = moe.pool

    def expert(self, name: str, queries: Sequence[TextQuery]) -> list[TextRecord]:
        """Every document scored by expert ``name`` alone (the base by its own name), in one call."""
        target = None if name == self.pool.base.name else name
        documents = [self.document(q) for q in queries]
        t0 = time.perf_counter()
        results = self.pool.engine.score([score_request(d, target) for d in documents])
        shares = token_shares(results, time.perf_counter() - t0)
        return [
            TextRecord(totals_of(r.token_logprobs, r.offsets, d), r.num_tokens, [(name, 1.0)], name, 0.0, ms)
            for d, r, ms in zip(documents, results, shares)
        ]

    def strategy(self, strategy: Strategy, queries: Sequence[TextQuery]) -> list[TextRecord]:
        """Every document through ``strategy`` (``MoE.score``): routed on its opening, scored by
        what the strategy composes for it."""
        documents = [self.document(q) for q in queries]
        routes = [opening(self.tokenizer, "".join(t for _, t in d), ROUTE_TOKENS) for d in documents]
        t0 = time.perf_counter()
        scored = self.moe.score(
            strategy, [score_request(d, None) for d in documents], routes, [q.task for q in queries]
        )
        routing_s = sum(rt.router_ms for _, rt in scored) / 1000
        shares = token_shares([s.result for s, _ in scored], max(0.0, time.perf_counter() - t0 - routing_s))
        return [
            TextRecord(
                totals_of(s.result.token_logprobs, s.result.offsets, d),
                s.result.num_tokens,
                list(s.experts),
                s.target,
                rt.router_ms,
                ms,
            )
            for d, (s, rt), ms in zip(documents, scored, shares)
        ]

    def document(self, query: TextQuery) -> list[tuple[str, str]]:
        return fit_document(self.tokenizer, query.segments, self.pool.text_tokens)

    @property
    def tokenizer(self):
        return self.pool.tokenizer


def score_request(document: Sequence[tuple[str, str]], target: str | None) -> ScoreRequest:
    return ScoreRequest("", "".join(t for _, t in document), target, offsets=True)


def token_shares(results: Sequence[ScoreResult], seconds: float) -> list[float]:
    """``seconds`` split over results by their tokens, in milliseconds."""
    return time_shares([r.num_tokens for r in results], seconds)


def time_shares(weights: Sequence[int], seconds: float) -> list[float]:
    """``seconds`` split over items in proportion to ``weights``, in milliseconds (evenly when
    every weight is 0): a batch's wall time as each item's share of it."""
    total = sum(weights)
    if not weights:
        return []
    if total <= 0:
        return [seconds * 1000 / len(weights)] * len(weights)
    return [seconds * 1000 * w / total for w in weights]
