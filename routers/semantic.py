"""Semantic router: nearest experts by example embeddings, with a calibrated "is anything close" gate.

Per expert (``fit_expert``): MiniLM embeddings of up to ``max_examples`` training prompts, and a
threshold calibrated on held-out in-distribution prompts (its validation examples; without any,
the last 20 % of its train prompts are held out of the calibration reference).

Score of expert e for a query q: the mean of the top-``top_m`` cosines between q and e's example
embeddings. Chosen over the centroid cosine because an expert's prompts are often several
templates (multi-modal): the centroid sits between them, while top-m stays near whichever
template the query resembles, and m > 1 keeps one stray example from deciding (which is the
Retrieval baseline, m = 1).

Threshold of e: the (1 − ``keep``) quantile of that score over e's held-out prompts, so about
``keep`` (95 %) of in-distribution queries clear it, lowered by ``margin`` (0.1) because a handful
of calibration prompts (10 here) estimates a 5 % quantile poorly — without it one in ten
in-distribution queries fell back in the tests, while far queries score ~0.2 below it. Each expert's threshold
depends on its own data only, so registering another expert changes nothing already fitted.

Route: experts whose score clears their own threshold are candidates; the top-``k`` of them by
score answer, weighted by softmax(score / ``temperature``). No candidate: the configured
``fallback`` generalist if registered, else the base model (``experts == []``).
"""

from __future__ import annotations

import torch

from routers.base import Artifact, Decision, ExpertInfo, RouteRequest
from routers.common import EmbeddingRouter, stack_rows
from routers.embedder import Embedder


def top_m_mean(sims: torch.Tensor, m: int) -> torch.Tensor:
    """Mean of the top-m values along the last dim (m clipped to its size)."""
    m = max(1, min(m, sims.shape[-1]))
    return sims.topk(m, dim=-1).values.mean(-1)


class SemanticRouter(EmbeddingRouter):
    name = "semantic"

    def __init__(
        self,
        embedder: Embedder | None = None,
        k: int = 1,
        top_m: int = 5,
        keep: float = 0.95,
        fallback: str | None = None,
        max_examples: int = 200,
        temperature: float = 0.05,
        margin: float = 0.1,
    ) -> None:
        super().__init__()
        self.embedder = embedder
        self.k = k
        self.top_m = top_m
        self.keep = keep
        self.fallback_expert = fallback
        self.max_examples = max_examples
        self.temperature = temperature
        self.margin = margin
        self._matrix: torch.Tensor | None = None
        self._owner: torch.Tensor | None = None

    def fit_expert(self, expert: ExpertInfo) -> Artifact:
        train = self.train_prompts(expert, self.max_examples)
        embeddings = self.emb.encode(train)
        held_out = expert.prompts("validation")
        if held_out:
            reference, calib = embeddings, self.emb.encode(held_out)
            source = "validation"
        elif len(train) >= 2:
            cut = max(1, len(train) // 5)
            reference, calib = embeddings[:-cut], embeddings[-cut:]
            source = "train-holdout"
        else:
            reference, calib, source = embeddings, embeddings, "train"
        calib_scores = top_m_mean(calib @ reference.T, self.top_m)
        quantile = float(torch.quantile(calib_scores, 1.0 - self.keep)) if len(calib_scores) > 1 else float(calib_scores.min())
        threshold = quantile - self.margin
        return Artifact(
            tensors={"embeddings": embeddings.contiguous(), "centroid": torch.nn.functional.normalize(embeddings.mean(0), dim=0)},
            metadata={
                "encoder": "all-MiniLM-L6-v2",
                "threshold": repr(threshold),
                "keep": repr(self.keep),
                "quantile": repr(quantile),
                "margin": repr(self.margin),
                "top_m": str(self.top_m),
                "calibration": source,
                "calibration_n": str(len(calib_scores)),
            },
        )

    def _changed(self) -> None:
        self._matrix = None

    def _index(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._matrix is None:
            self._matrix, self._owner = stack_rows(
                [self.artifacts[n].tensors["embeddings"] for n in self.names], self.emb.dim
            )
            self._thresholds = torch.tensor([float(self.artifacts[n].metadata["threshold"]) for n in self.names])
            counts = torch.bincount(self._owner, minlength=len(self.names)).tolist()
            self._slices = [(sum(counts[:i]), sum(counts[: i + 1])) for i in range(len(counts))]
        return self._matrix, self._owner

    def scores(self, prompt: str) -> torch.Tensor:
        """Top-m-mean cosine per registered expert, in registration order."""
        mat, _ = self._index()
        sims = mat @ self.emb.encode(prompt)[0]
        return torch.stack([top_m_mean(sims[a:b], self.top_m) for a, b in self._slices])

    def route(self, request: RouteRequest) -> Decision:
        if (single := self.single_expert()) is not None:
            return single
        if not self.experts:
            return self.fallback(self.fallback_expert, reason="no experts")
        scores = self.scores(request.prompt)
        info = {
            "scores": {n: round(float(s), 4) for n, s in zip(self.names, scores)},
            "thresholds": {n: round(float(t), 4) for n, t in zip(self.names, self._thresholds)},
        }
        passed = (scores >= self._thresholds).nonzero().flatten()
        if len(passed) == 0:
            return self.fallback(self.fallback_expert, reason="no expert close enough", **info)
        chosen = passed[scores[passed].argsort(descending=True)][: self.k]
        weights = torch.softmax(scores[chosen] / self.temperature, dim=0)
        return self.decision([(self.names[int(i)], float(w)) for i, w in zip(chosen, weights)], **info)
