"""A BERT encoder (MiniLM) through ONNX Runtime, for the one uncached query a routing decision needs.

Why: a routing decision is one short sequence through MiniLM's six layers. In PyTorch that is 36
small fp32 matmuls plus per-op dispatch (~11 ms on this 2-core EPYC even when stepped kernel by
kernel, see ``embedder.run_layers``); ONNX Runtime's CPU provider fuses attention, GELU and the
layer norms and runs the same graph in ~5 ms on one thread. The numbers are the same model's to
~5e-6 (fp32 throughout; checked in tests/test_onnx_bert.py against the PyTorch path).

What is exported: the embeddings and every layer, stepped with ``embedder._bert_layer`` (the same
kernels as transformers' ``BertLayer``), through ``torch.onnx.export(dynamo=True)``, up to a given
layer: all six for the semantic routers, the five below its trained layer for the classifier. Only an unpadded single
sequence goes through it (no attention mask, as ``BertModel`` passes none for one); batches stay
in PyTorch.

Export takes ~5 s, so the graph is cached on disk under ``$MOERGE_CACHE`` (default
``~/.cache/moerge``) keyed by a hash of the weights, and in memory per process: every Embedder on
the same weights shares one session.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

_SESSIONS: dict[tuple[str, int, int], "OnnxBert"] = {}
_SESSIONS_LOCK = threading.Lock()


def cache_dir() -> Path:
    """Where exported graphs are kept: ``$MOERGE_CACHE/onnx`` (default ``~/.cache/moerge/onnx``)."""
    return Path(os.environ.get("MOERGE_CACHE") or Path.home() / ".cache" / "moerge").expanduser() / "onnx"


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes): a graph is reused only for
    exactly the weights it was exported from."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


class _Stepped(torch.nn.Module):
    """Embeddings + the first ``layers`` layers, returning their hidden states stacked: the graph
    we export."""

    def __init__(self, bert: torch.nn.Module, layers: int) -> None:
        super().__init__()
        self.bert, self.layers = bert, layers

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        from routers.embedder import _bert_layer  # embedder imports this module lazily; no cycle at load

        hidden = self.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        states = [hidden]
        for layer in self.bert.encoder.layer[: self.layers]:
            hidden = _bert_layer(layer, hidden, None)
            states.append(hidden)
        return torch.stack(states)


def export(bert: torch.nn.Module, layers: int, path: Path) -> None:
    """Export ``bert`` (a transformers BertModel in eval mode) up to its ``layers``-th layer to
    ``path``, atomically."""
    example = torch.tensor([[101, 7592, 2088, 102]])  # any short sequence: the length is dynamic
    seq = torch.export.Dim("seq", min=2, max=int(bert.config.max_position_embeddings))
    path.parent.mkdir(parents=True, exist_ok=True)
    # The exporter reports its own internals (deprecations, "torchvision is not installed", the
    # renaming of the dynamic axis) as warnings and log lines; none concerns this graph.
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _Stepped(bert, layers).eval(),
                (example, torch.zeros_like(example)),
                dynamo=True,
                input_names=["input_ids", "token_type_ids"],
                output_names=["hidden_states"],
                dynamic_shapes={"input_ids": {1: seq}, "token_type_ids": {1: seq}},
                optimize=True,
                verbose=False,
            )
    finally:
        quiet.setLevel(level)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        program.save(tmp)
        os.replace(tmp, path)  # concurrent exporters: the last complete file wins, never a torn one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class OnnxBert:
    """One ONNX Runtime session over a BERT encoder's exported graph."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def hidden_states(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """The hidden states for one unpadded sequence: [layers + 1, 1, seq, dim] (fp32), the
        embeddings' output first."""
        ids = input_ids.cpu().numpy().astype(np.int64, copy=False)
        types = np.zeros_like(ids) if token_type_ids is None else token_type_ids.cpu().numpy().astype(np.int64, copy=False)
        (out,) = self.session.run(None, {"input_ids": ids, "token_type_ids": types})
        return torch.from_numpy(out)

    @classmethod
    def for_model(cls, bert: torch.nn.Module, layers: int | None = None, threads: int = 1) -> "OnnxBert":
        """The session for ``bert``'s weights up to ``layers`` layers (None: all): from this
        process's sessions, else the disk cache, else a fresh export (~5 s). The classifier runs
        the layers below its trained ones, so it needs a graph that stops there."""
        layers = len(bert.encoder.layer) if layers is None else layers
        key = (weights_hash(bert), layers, threads)
        with _SESSIONS_LOCK:
            if key in _SESSIONS:
                return _SESSIONS[key]
            name = f"bert-{key[0][:32]}-L{layers}.onnx"
            path = cache_dir() / name
            if not path.exists():
                log.info("exporting the encoder's first %d layers to ONNX (once per weights): %s", layers, path)
                try:
                    export(bert, layers, path)
                except OSError:  # the cache is not writable (a read-only home in a container): this process only
                    path = Path(tempfile.mkdtemp(prefix="moerge-onnx-")) / name
                    export(bert, layers, path)
            session = _SESSIONS[key] = cls(path, threads)
            return session
