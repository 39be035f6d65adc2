"""Held-out loss of a text given its context: nats per token, per labelled segment.

The domains suite scores a model (an expert, a merge, a routed mixture) by how well it predicts
held-out text, not by exact match: one teacher-forced forward pass per document, and each
predicted token's negative log-likelihood is booked to the segment (domain) its first character
belongs to. The document is tokenized as the model's own tokenizer does by default
(``tokenizer(text)``: a BOS where the model's tokenizer adds one), and token t is predicted from
tokens < t, exactly as transformers' ``model(input_ids, labels=input_ids).loss`` does, so the mean
over a whole document is that loss (a test checks it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class LossTotals:
    """Summed nats and predicted tokens per label; ``add`` merges another's."""

    nats: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    def book(self, label: str, nats: float, tokens: int) -> None:
        self.nats[label] = self.nats.get(label, 0.0) + nats
        self.tokens[label] = self.tokens.get(label, 0) + tokens

    def add(self, other: "LossTotals") -> None:
        for label in other.nats:
            self.book(label, other.nats[label], other.tokens[label])

    def per_token(self, label: str | None = None) -> float:
        """Mean nats per token of ``label`` (None: over every label)."""
        if label is None:
            n = sum(self.tokens.values())
            return sum(self.nats.values()) / n if n else math.nan
        n = self.tokens.get(label, 0)
        return self.nats[label] / n if n else math.nan

    def perplexity(self, label: str | None = None) -> float:
        return math.exp(self.per_token(label))


def tokenize_segments(tokenizer, segments: Sequence[tuple[str, str]], max_length: int | None = None):
    """The document's ids as ``tokenizer(text)`` gives them (truncated to ``max_length``) and, per
    token, the label of the segment that holds its first character (a special token added by the
    tokenizer takes the first segment's)."""
    text, starts, pos = "", [], 0
    for label, part in segments:
        starts.append((pos, label))
        text += part
        pos += len(part)
    enc = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if max_length is not None:
        ids, offsets = ids[:max_length], offsets[:max_length]
    labels = []
    for start, end in offsets:
        if start == end:  # a special token: no characters of its own
            labels.append(starts[0][1])
            continue
        labels.append([label for p, label in starts if p <= start][-1])
    return ids, labels


@torch.no_grad()
def document_loss(
    forward: Callable[[torch.Tensor], torch.Tensor],
    tokenizer,
    segments: Sequence[tuple[str, str]],
    max_length: int | None = None,
    device: str | torch.device = "cpu",
) -> LossTotals:
    """Nats per segment label for one document, in one pass. ``forward(input_ids [1, T])``
    returns logits [1, T, V]: a model's forward, or one with a mixture or merge active."""
    ids, labels = tokenize_segments(tokenizer, segments, max_length)
    totals = LossTotals()
    if len(ids) < 2:
        return totals
    logits = forward(torch.tensor([ids], device=device))[0, :-1].float()
    nll = F.cross_entropy(logits, torch.tensor(ids[1:], device=logits.device), reduction="none").cpu()
    for label, value in zip(labels[1:], nll.tolist()):
        totals.book(label, value, 1)
    return totals


def model_forward(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A transformers causal LM as ``document_loss``'s ``forward``."""
    return lambda input_ids: model(input_ids=input_ids).logits


# ------------------------------------------------------------------ through an engine's score


def totals_of(
    token_logprobs: Sequence[float], offsets: Sequence[tuple[int, int]], segments: Sequence[tuple[str, str]]
) -> LossTotals:
    """A scored document's nats per segment label: each continuation token (an engine's
    ``ScoreResult`` with ``offsets``) is booked to the segment that holds its first character."""
    if len(token_logprobs) != len(offsets):
        raise ValueError(f"{len(token_logprobs)} log-probabilities for {len(offsets)} token offsets")
    starts, pos = [], 0
    for label, part in segments:
        starts.append((pos, label))
        pos += len(part)
    totals = LossTotals()
    for logprob, (start, _) in zip(token_logprobs, offsets):
        label = next(label for p, label in reversed(starts) if p <= start)
        totals.book(label, -logprob, 1)
    return totals
