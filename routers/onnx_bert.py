"""A BERT encoder (MiniLM) through ONNX Runtime, for the one uncached query a routing decision needs.

Why: a routing decision is one short sequence through MiniLM's six layers. In PyTorch that is 36
small fp32 matmuls plus per-op dispatch (~11 ms on this 2-core EPYC even when stepped kernel by
kernel, see ``bert_layers.run_layers``); ONNX Runtime's CPU provider fuses attention, GELU and the
layer norms and runs the same graph in ~5 ms on one thread. The numbers are the same model's to
~5e-6 (fp32 throughout; checked in tests/test_onnx_bert.py against the PyTorch path).

What is exported: the embeddings and every layer, stepped with ``bert_layers.bert_layer`` (the same
kernels as transformers' ``BertLayer``), through ``torch.onnx.export(dynamo=True)``, up to a given
layer: all six for the semantic routers, the five below its trained layer for the classifier. The
classifier's fine-tuned top layer is a graph of its own (``OnnxLayers``: hidden states in and out),
exported once per trained head, so that a retrain re-exports one layer and not the frozen five.
Only an unpadded single sequence goes through them (no attention mask, as ``BertModel`` passes
none for one); batches stay in PyTorch.

``query_backend="onnx-int8"`` runs a second graph made from that one: its weight matmuls quantised
to int8 (``quantize_int8``), about half the time again, at a cost in exactness that
docs/benchmarks.md measures in routing decisions.

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
from typing import Any

import numpy as np
import torch

from routers.base import RouterError
from routers.bert_layers import bert_layer

log = logging.getLogger(__name__)

_SESSIONS: dict[tuple, "OnnxBert"] = {}  # (weights hash, layers, threads, precision) -> session
PRECISIONS = ("fp32", "int8")
# A quantised graph's file names its recipe, so that a changed recipe never reuses an old file.
_RECIPES = {"int8": "int8-matmul-perchannel-w7"}
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

    def __init__(self, bert: Any, layers: int) -> None:  # a transformers BertModel
        super().__init__()
        self.bert, self.layers = bert, layers

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        states = [hidden]
        for layer in self.bert.encoder.layer[: self.layers]:
            hidden = bert_layer(layer, hidden, None)
            states.append(hidden)
        return torch.stack(states)


class _Layers(torch.nn.Module):
    """BERT layers over given hidden states, returning the last layer's: the graph of a classifier's
    fine-tuned top layers, which run on the frozen graph's output."""

    def __init__(self, layers: Any) -> None:  # a sequence of transformers BertLayers
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden = bert_layer(layer, hidden, None)
        return hidden


def _export(module: torch.nn.Module, example: tuple, input_names: list[str], dynamic: dict, path: Path) -> None:
    """``module`` (eval mode) to an ONNX file at ``path``, atomically, every input's axis 1 (the
    sequence) dynamic as ``dynamic`` says."""
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
                module.eval(),
                example,
                dynamo=True,
                input_names=input_names,
                output_names=["hidden_states"],
                dynamic_shapes=dynamic,
                optimize=True,
                verbose=False,
            )
    finally:
        quiet.setLevel(level)
    assert program is not None  # dynamo=True returns the program
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        program.save(tmp)
        os.replace(tmp, path)  # concurrent exporters: the last complete file wins, never a torn one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _seq(bert_config: Any) -> Any:
    return torch.export.Dim("seq", min=2, max=int(bert_config.max_position_embeddings))


def export(bert: Any, layers: int, path: Path) -> None:
    """Export ``bert`` (a transformers BertModel in eval mode) up to its ``layers``-th layer to
    ``path``, atomically."""
    example = torch.tensor([[101, 7592, 2088, 102]])  # any short sequence: the length is dynamic
    seq = _seq(bert.config)
    dynamic = {"input_ids": {1: seq}, "token_type_ids": {1: seq}}
    _export(
        _Stepped(bert, layers), (example, torch.zeros_like(example)), ["input_ids", "token_type_ids"], dynamic, path
    )


def export_layers(layers: Any, path: Path) -> None:
    """Export BERT ``layers`` (in eval mode) as one graph, hidden states in and out, to ``path``."""
    config = layers[0].attention.self.config
    example = torch.zeros(1, 4, int(config.hidden_size))
    _export(_Layers(layers), (example,), ["hidden"], {"hidden": {1: _seq(config)}}, path)


def quantize_int8(fp32_path: Path, path: Path) -> None:
    """``fp32_path``'s graph with every weight MatMul in int8, atomically at ``path``.

    ONNX Runtime's dynamic quantisation: each weight matrix per output channel in signed int8, each
    activation per tensor in uint8 with its range taken at run time (MatMulInteger); the layer
    norms, softmax, GELU and the attention's own products stay fp32. Nothing to calibrate, so it
    is a pure function of the weights. ``reduce_range`` keeps the weights to 7 bits: on x86 CPUs
    without VNNI, MLAS multiplies u8 by s8 with ``vpmaddubsw``, whose int16 pair sums saturate at
    full range (ONNX Runtime's quantisation docs); at 7 bits no sum can, so the integer products
    are exact on every CPU. The hidden states move away from the fp32 graph's, and so can a close
    routing decision: docs/benchmarks.md measures how many."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    os.close(fd)
    quiet = logging.getLogger()  # quantize_dynamic advises pre-processing through the root logger
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            str(fp32_path),
            tmp,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            reduce_range=True,
            weight_type=QuantType.QInt8,
        )
        os.replace(tmp, path)
    finally:
        quiet.setLevel(level)
        if os.path.exists(tmp):
            os.unlink(tmp)


def _graph(fp32: Path, precision: str, make: Any) -> Path:
    """The graph file ``fp32`` in ``precision``: made by ``make(path)`` if missing, and quantised
    from it if asked and missing."""
    if not fp32.exists():
        log.info("exporting %s to ONNX (once per weights)", fp32.name)
        make(fp32)
    if precision == "fp32":
        return fp32
    path = fp32.with_name(f"{fp32.stem}-{_RECIPES[precision]}.onnx")
    if not path.exists():
        log.info("quantising %s to %s (once per weights)", fp32.name, precision)
        quantize_int8(fp32, path)
    return path


def _cached_graph(name: str, precision: str, make: Any) -> Path:
    """``_graph`` under ``cache_dir()``, or in a temporary folder where the cache is not writable
    (a read-only home in a container): then for this process only."""
    try:
        return _graph(cache_dir() / name, precision, make)
    except OSError:
        return _graph(Path(tempfile.mkdtemp(prefix="moerge-onnx-")) / name, precision, make)


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
        types = (
            np.zeros_like(ids) if token_type_ids is None else token_type_ids.cpu().numpy().astype(np.int64, copy=False)
        )
        (out,) = self.session.run(None, {"input_ids": ids, "token_type_ids": types})
        return torch.from_numpy(out)

    @classmethod
    def for_model(cls, bert: Any, layers: int | None = None, threads: int = 1, precision: str = "fp32") -> "OnnxBert":
        """The session for ``bert``'s weights up to ``layers`` layers (None: all) in ``precision``
        (``PRECISIONS``): from this process's sessions, else the disk cache, else a fresh export
        (~5 s; int8 quantises that graph, ~3 s more). The classifier runs the layers below its
        trained ones, so it needs a graph that stops there."""
        layers = len(bert.encoder.layer) if layers is None else layers
        digest = weights_hash(bert)
        return cls._session(
            (digest, layers, threads, precision),
            f"bert-{digest[:32]}-L{layers}.onnx",
            lambda path: export(bert, layers, path),
        )

    @classmethod
    def _session(cls, key: tuple, name: str, make: Any) -> Any:
        precision = key[-1]
        if precision not in PRECISIONS:
            raise RouterError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        with _SESSIONS_LOCK:
            if key in _SESSIONS:
                return _SESSIONS[key]
            session = _SESSIONS[key] = cls(_cached_graph(name, precision, make), key[-2])
            return session


class OnnxLayers(OnnxBert):
    """One ONNX Runtime session over BERT layers alone: hidden states in, the last layer's out."""

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """The layers over one unpadded sequence's hidden states [1, seq, dim] (fp32)."""
        (out,) = self.session.run(None, {"hidden": hidden.detach().cpu().float().numpy()})
        return torch.from_numpy(out)

    @classmethod
    def for_layers(cls, layers: Any, threads: int = 1, precision: str = "fp32") -> "OnnxLayers":
        """The session for these layers' weights in ``precision``: as ``OnnxBert.for_model``, an
        export of ~3 s once per weights (a classifier's head: once per training)."""
        digest = weights_hash(torch.nn.ModuleList(layers))
        return cls._session(
            (digest, "layers", threads, precision),
            f"layers-{digest[:32]}-N{len(layers)}.onnx",
            lambda path: export_layers(layers, path),
        )
