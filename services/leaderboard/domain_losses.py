"""Held-out loss of every expert, oracle and merge on a text suite of labelled documents.

A text suite's document is a list of (domain, text) segments (``services.zoo.domains_build``
writes them as ``{"segments": [[domain, text], ...]}`` rows). Each model is scored in one
teacher-forced pass per document (``text_loss.document_loss``), and the per-document totals are
kept, so that the oracles are look-ups rather than more passes:

- **per-document oracle**: each document scored by the gold expert of its first segment's domain;
- **per-segment oracle**: each segment's tokens booked from the pass of its own domain's gold
  expert over the whole document (the context read by the same expert);
- **query-level choice**: each document scored by the expert a router picked for it.

An expert's *gold* domains are the ones it was registered with; the gold expert of a domain is the
adapter that has that domain alone (the specialist a tokenwise router mixes), else any expert
that lists it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.leaderboard.text_loss import LossTotals, document_loss, model_forward

Document = list[tuple[str, str]]


def read_documents(path: str | Path) -> list[Document]:
    """A text suite's JSONL: one ``{"segments": [[domain, text], ...]}`` per line."""
    docs = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        segments = row.get("segments")
        if not segments or not all(isinstance(s, list) and len(s) == 2 for s in segments):
            raise ValueError(f"{path} line {n}: expected 'segments' as [[domain, text], ...]")
        docs.append([(str(d), str(t)) for d, t in segments])
    return docs


def pooled(totals: Iterable[LossTotals]) -> LossTotals:
    """Tokens pooled over documents: a long document weighs more than a short one."""
    out = LossTotals()
    for t in totals:
        out.add(t)
    return out


@dataclass(frozen=True)
class ExpertRef:
    name: str
    kind: str  # "adapter" | "model"
    path: Path
    domains: tuple[str, ...]


def gold_experts(experts: Sequence[ExpertRef]) -> dict[str, str]:
    """Domain -> the expert scored as that domain's gold (see the module's docstring)."""
    return gold_by_domain((e.name, e.kind, e.domains) for e in experts)


def gold_by_domain(experts: Iterable[tuple[str, str, Sequence[str]]]) -> dict[str, str]:
    """Domain -> its gold expert, of (name, kind, domains) in order: the first adapter with that
    domain alone, else the first expert that lists it."""
    experts = list(experts)
    gold: dict[str, str] = {}
    for name, kind, domains in experts:  # specialists first
        if kind == "adapter" and len(domains) == 1:
            gold.setdefault(domains[0], name)
    for name, _, domains in experts:
        for d in domains:
            gold.setdefault(d, name)
    return gold


@dataclass
class SuiteLosses:
    """Per model: one ``LossTotals`` per document, in the suite's order."""

    documents: list[Document]
    per_document: dict[str, list[LossTotals]] = field(default_factory=dict)

    def total(self, model: str) -> LossTotals:
        return pooled(self.per_document[model])

    def chosen(self, choices: Sequence[str]) -> LossTotals:
        """Each document scored by the model named for it."""
        return pooled(self.per_document[name][i] for i, name in enumerate(choices))

    def document_oracle(self, gold: Mapping[str, str]) -> LossTotals:
        return self.chosen([gold[doc[0][0]] for doc in self.documents])

    def segment_oracle(self, gold: Mapping[str, str]) -> LossTotals:
        out = LossTotals()
        for i, doc in enumerate(self.documents):
            for domain in dict.fromkeys(d for d, _ in doc):
                mine = self.per_document[gold[domain]][i]
                if domain in mine.nats:
                    out.book(domain, mine.nats[domain], mine.tokens[domain])
        return out


class LossScorer:
    """Scores documents with the base, its adapters (loaded once, switched by name), full-model
    experts and merged adapters."""

    def __init__(self, base_path: str | Path, max_length: int | None = None, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.base_path, self.max_length, self.device = Path(base_path), max_length, device
        self.tokenizer = AutoTokenizer.from_pretrained(str(base_path))
        # transformers' wrapped .to() confuses mypy
        self.base = AutoModelForCausalLM.from_pretrained(str(base_path)).to(device).eval()  # type: ignore[arg-type]
        self._peft: Any = None  # the PeftModel once an adapter is loaded

    def score(self, forward: Callable[[torch.Tensor], torch.Tensor], documents: Sequence[Document]) -> list[LossTotals]:
        return [document_loss(forward, self.tokenizer, doc, self.max_length, self.device) for doc in documents]

    def base_forward(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self._peft is None:
            return model_forward(self.base)
        peft = self._peft

        def forward(ids: torch.Tensor) -> torch.Tensor:
            with peft.disable_adapter():
                return peft(input_ids=ids).logits

        return forward

    def adapter_forward(self, name: str, path: str | Path) -> Callable[[torch.Tensor], torch.Tensor]:
        from peft import PeftModel

        if self._peft is None:
            self._peft = PeftModel.from_pretrained(self.base, str(path), adapter_name=name).eval()
        elif name not in self._peft.peft_config:
            self._peft.load_adapter(str(path), adapter_name=name)
        self._peft.set_adapter(name)
        return model_forward(self._peft)

    def model_forward(self, path: str | Path) -> Callable[[torch.Tensor], torch.Tensor]:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path)).to(self.device).eval()  # type: ignore[arg-type]
        return model_forward(model)

    def expert_forward(self, expert: ExpertRef) -> Callable[[torch.Tensor], torch.Tensor]:
        if expert.kind == "adapter":
            return self.adapter_forward(expert.name, expert.path)
        return self.model_forward(expert.path)
