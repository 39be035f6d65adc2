"""Semantic router: nearest experts by example embeddings, behind one jointly calibrated gate.

Per expert (``fit_expert``): MiniLM embeddings of up to ``max_examples`` training prompts, and the
scores of held-out in-distribution prompts against them (its validation examples; without any,
the last 20 % of its train prompts are held out of the calibration reference).

Score of expert e for a query q: the mean of the top-``top_m`` cosines between q and e's example
embeddings. Chosen over the centroid cosine because an expert's prompts are often several
templates (multi-modal): the centroid sits between them, while top-m stays near whichever
template the query resembles, and m > 1 keeps one stray example from deciding (which is the
Retrieval baseline, m = 1).

Route: the top-``k`` experts by score answer, weighted by softmax(score / ``temperature``), if
the best score clears the **gate**; else the configured ``fallback`` generalist if registered,
else the base model (``experts == []``). The gate is one threshold for all experts, set from
held-out prompts on both sides of it:
- what fits: every expert's held-out scores, pooled, and their (1 − ``keep``) quantile F;
- what fits nothing: everyday requests (``routers/off_topic.py``) scored against every expert,
  and the ``keep`` quantile N of their best scores.
The gate is halfway between them, (F + N) / 2, where N < F; where an expert covers everyday topics
itself (N ≥ F), it is F, so that ``keep`` of what fits still clears it.

Before 2026-12-02 each expert had a threshold of its own (the first rule, alone on its own
scores) and the best-scoring expert above its own threshold answered. A paraphrased query then
often scored highest for the right expert but under that expert's threshold, and went to an
expert with a lower one (docs/benchmarks.md). Each expert's artifact still depends on its own
data only; the gate is derived from all of them when the expert set changes.
"""

from __future__ import annotations

import torch

from routers.base import Artifact, Decision, ExpertInfo, RouteRequest
from routers.common import EmbeddingRouter, stack_rows
from routers.embedder import Embedder
from routers.off_topic import OFF_TOPIC_PROMPTS
from routers.params import Param


def top_m_mean(sims: torch.Tensor, m: int) -> torch.Tensor:
    """Mean of the top-m values along the last dim (m clipped to its size)."""
    m = max(1, min(m, sims.shape[-1]))
    return sims.topk(m, dim=-1).values.mean(-1)


class SemanticRouter(EmbeddingRouter):
    name = "semantic"
    needs = frozenset({"embedder"})
    PARAMS = (
        Param("k", "int", 1, "experts in the decision", minimum=1),
        Param("top_m", "int", 5, "nearest examples per expert that score it", minimum=1),
        Param("keep", "float", 0.95, "share of the calibrated margin an expert must clear", minimum=0, maximum=1),
        Param("fallback", "str", None, "the expert that answers when no expert fits the query"),
        Param("temperature", "float", 0.05, "softmax temperature of the weights", minimum=1e-6),
        Param("max_examples", "int", 200, "embedded training prompts per expert", minimum=1, fit=True),
    )

    def __init__(
        self,
        embedder: Embedder | None = None,
        k: int = 1,
        top_m: int = 5,
        keep: float = 0.95,
        fallback: str | None = None,
        max_examples: int = 200,
        temperature: float = 0.05,
    ) -> None:
        super().__init__()
        self.embedder = embedder
        self.k = k
        self.top_m = top_m
        self.keep = keep
        self.fallback_expert = fallback
        self.max_examples = max_examples
        self.temperature = temperature
        self._matrix: torch.Tensor | None = None
        self._owner: torch.Tensor | None = None
        self._grouped: torch.Tensor | None = None
        self._off_topic: torch.Tensor | None = None  # OFF_TOPIC_PROMPTS' embeddings, encoded once

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
        return Artifact(
            tensors={
                "embeddings": embeddings.contiguous(),
                "centroid": torch.nn.functional.normalize(embeddings.mean(0), dim=0),
                "calibration_scores": calib_scores.contiguous(),
            },
            metadata={
                "encoder": "all-MiniLM-L6-v2",
                "top_m": str(self.top_m),
                "calibration": source,
                "calibration_n": str(len(calib_scores)),
            },
        )

    def accepts_artifact(self, artifact: Artifact) -> bool:
        """Artifacts stored before the joint gate hold no calibration scores: those are refit."""
        return "calibration_scores" in artifact.tensors and artifact.metadata.get("top_m") == str(self.top_m)

    def _changed(self) -> None:
        self._matrix = None

    def _index(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._matrix is None:
            self._matrix, self._owner = stack_rows(
                [self.artifacts[n].tensors["embeddings"] for n in self.names], self.emb.dim
            )
            counts = torch.bincount(self._owner, minlength=len(self.names)).tolist()
            self._slices = [(sum(counts[:i]), sum(counts[: i + 1])) for i in range(len(counts))]
            self._grouped = self._grouping(counts)
            self._gate, self._gate_parts = self._calibrate_gate()
        assert self._owner is not None
        return self._matrix, self._owner

    def _calibrate_gate(self) -> tuple[float, dict[str, float]]:
        """The one threshold the best score must clear (the module docstring says why)."""
        fits = torch.cat([self.artifacts[n].tensors["calibration_scores"].float() for n in self.names])
        fit = float(torch.quantile(fits, 1.0 - self.keep)) if len(fits) > 1 else float(fits.min())
        if self._off_topic is None:
            self._off_topic = self.emb.encode(list(OFF_TOPIC_PROMPTS))
        nothing = float(torch.quantile(self._scores_of(self._off_topic).max(dim=1).values, self.keep))
        gate = (fit + nothing) / 2 if nothing < fit else fit
        return gate, {"fits": round(fit, 4), "fits_nothing": round(nothing, 4)}

    def _grouping(self, counts: list[int]) -> torch.Tensor | None:
        """Row indices [experts, most rows] (-1 pads the shorter experts) for scoring every expert
        in one top-k, where each has at least ``top_m`` rows; else None (scored one by one)."""
        if not counts or min(counts) < self.top_m:
            return None
        index = torch.full((len(counts), max(counts)), -1, dtype=torch.long)
        for i, (a, b) in enumerate(self._slices):
            index[i, : b - a] = torch.arange(a, b)
        return index

    def _scores_of(self, queries: torch.Tensor) -> torch.Tensor:
        """[queries, experts] top-m-mean cosines of unit-norm query embeddings."""
        assert self._matrix is not None  # _index() built it
        sims = queries @ self._matrix.T
        if self._grouped is None:
            return torch.stack([top_m_mean(sims[:, a:b], self.top_m) for a, b in self._slices], dim=1)
        # one top-k over [queries, experts, rows]: the per-expert loop's Python cost was most of
        # the routing time after the encoder (docs/benchmarks.md, "Against peers"); a pad is -inf,
        # never among an expert's top m
        rows = self._grouped.shape[1]
        if sims.shape[1] == self._grouped.shape[0] * rows:  # every expert has as many rows: a view
            grouped = sims.view(sims.shape[0], -1, rows)
        else:
            grouped = sims[:, self._grouped.clamp(min=0)]
            grouped.masked_fill_(self._grouped < 0, float("-inf"))
        return grouped.topk(self.top_m, dim=-1).values.mean(-1)

    def scores(self, prompt: str) -> torch.Tensor:
        """Top-m-mean cosine per registered expert, in registration order."""
        self._index()
        return self._scores_of(self.emb.encode(prompt))[0]

    def route(self, request: RouteRequest) -> Decision:
        if (single := self.single_expert()) is not None:
            return single
        if not self.experts:
            return self.fallback(self.fallback_expert, reason="no experts")
        scores = self.scores(request.prompt)
        info = {
            "scores": {n: round(float(s), 4) for n, s in zip(self.names, scores)},
            "gate": round(self._gate, 4),
            "gate_from": self._gate_parts,
        }
        passed = (scores >= self._gate).nonzero().flatten()
        if len(passed) == 0:
            return self.fallback(self.fallback_expert, reason="no expert close enough", **info)
        chosen = passed[scores[passed].argsort(descending=True)][: self.k]
        weights = torch.softmax(scores[chosen] / self.temperature, dim=0)
        return self.decision([(self.names[int(i)], float(w)) for i, w in zip(chosen, weights)], **info)
