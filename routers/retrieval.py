"""PHATGOOSE's Retrieval baseline (r-three/phatgoose): nearest training example decides.

Per expert: MiniLM (all-MiniLM-L6-v2) embeddings of at most 1000 of its training examples (the
first 1000, for determinism). A query is embedded the same way and goes wholly (weight 1) to the
single expert owning the training example with the highest cosine — i.e. argmax over experts of
the max-cosine. No threshold, no fallback: that is the baseline as published.
"""

from __future__ import annotations

import torch

from routers.base import Artifact, Decision, ExpertInfo, RouteRequest
from routers.common import EmbeddingRouter, stack_rows
from routers.embedder import Embedder
from routers.params import Param


class RetrievalRouter(EmbeddingRouter):
    name = "retrieval"
    needs = frozenset({"embedder"})
    PARAMS = (Param("max_examples", "int", 1000, "embedded training prompts per expert", minimum=1, fit=True),)

    def __init__(self, embedder: Embedder | None = None, max_examples: int = 1000) -> None:
        super().__init__()
        self.embedder = embedder
        self.max_examples = max_examples
        self._matrix: torch.Tensor | None = None
        self._owner: torch.Tensor | None = None

    def fit_expert(self, expert: ExpertInfo) -> Artifact:
        prompts = self.train_prompts(expert, self.max_examples)
        return Artifact(
            tensors={"embeddings": self.emb.encode(prompts).contiguous()},
            metadata={"encoder": "all-MiniLM-L6-v2", "n": str(len(prompts))},
        )

    def _changed(self) -> None:
        self._matrix = None

    def _index(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._matrix is None:
            self._matrix, self._owner = stack_rows(
                [self.artifacts[n].tensors["embeddings"] for n in self.names], self.emb.dim if self.experts else 0
            )
        assert self._owner is not None
        return self._matrix, self._owner

    def scores(self, prompt: str) -> torch.Tensor:
        """Max cosine per registered expert, in registration order."""
        mat, owner = self._index()
        sims = mat @ self.emb.encode(prompt)[0]
        best = torch.full((len(self.experts),), -2.0)
        return best.scatter_reduce(0, owner, sims, reduce="amax")

    def route(self, request: RouteRequest) -> Decision:
        if not self.experts:
            return self.decision([], fallback="base", reason="no experts")
        scores = self.scores(request.prompt)
        best = int(scores.argmax())
        return self.decision(
            [(self.names[best], 1.0)],
            scores={n: round(float(s), 4) for n, s in zip(self.names, scores)},
            method="max-cosine",
        )
