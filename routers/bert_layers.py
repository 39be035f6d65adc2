"""BERT layers stepped kernel by kernel: what the MiniLM query path runs between the embeddings
and the pooled sentence embedding (``Embedder``), what the classifier's fine-tuned layers run, and
what the ONNX export traces (``onnx_bert``). One module that all three import, so none of them
reaches into another's private helpers.
"""

from __future__ import annotations

import contextvars
import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


def steppable(layer: torch.nn.Module) -> bool:
    """Whether ``bert_layer`` reproduces this layer: a transformers BertLayer in eval mode with sdpa
    attention, no chunked feed-forward, no cross-attention (all true for MiniLM as loaded here)."""
    att = getattr(getattr(layer, "attention", None), "self", None)
    config = getattr(att, "config", None)
    return (
        config is not None
        and hasattr(att, "scaling")
        and not layer.training
        and config._attn_implementation == "sdpa"
        and not getattr(layer, "chunk_size_feed_forward", 0)
        and not getattr(layer, "add_cross_attention", False)
    )


# dtype of the stepped layers' matmuls (None: the weights' own), set by ``Embedder.query_context``
MATMUL_DTYPE: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar("matmul_dtype", default=None)
# Linear -> (weight version, weight, bias) cast to that dtype; the version catches in-place training
_CAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if type(module) is not torch.nn.Linear:  # e.g. a quantised linear: its own forward
        return module(x)
    dtype = MATMUL_DTYPE.get()
    if dtype is None or dtype == module.weight.dtype:
        return F.linear(x, module.weight, module.bias)
    w = module.weight
    key = (None if w.is_inference() else w._version, dtype)
    cached = _CAST.get(module)
    if cached is None or cached[0] != key:
        bias = module.bias.to(dtype) if module.bias is not None else None
        cached = _CAST[module] = (key, w.to(dtype), bias)
    return F.linear(x.to(dtype), cached[1], cached[2]).to(x.dtype)


def bert_layer(layer: Any, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """transformers' BertLayer (``Any``: torch types submodules as Tensor | Module) forward (eval, sdpa), kernel for kernel in the same order — so the
    same numbers — without its Python: module dispatch and a signature inspection on every call
    (``apply_chunking_to_forward``) cost ~0.3 ms per layer, a fifth of a routing decision."""
    att, out = layer.attention.self, layer.attention.output
    shape = (*hidden.shape[:-1], -1, att.attention_head_size)
    q = _linear(att.query, hidden).view(shape).transpose(1, 2)
    k = _linear(att.key, hidden).view(shape).transpose(1, 2)
    v = _linear(att.value, hidden).view(shape).transpose(1, 2)
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=att.scaling, is_causal=False)
    ctx = ctx.transpose(1, 2).contiguous().reshape(*hidden.shape[:-1], -1)
    ln = out.LayerNorm
    hidden = F.layer_norm(_linear(out.dense, ctx) + hidden, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
    inner = layer.intermediate.intermediate_act_fn(_linear(layer.intermediate.dense, hidden))
    ln = layer.output.LayerNorm
    return F.layer_norm(_linear(layer.output.dense, inner) + hidden, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def run_layers(
    layers: Sequence[torch.nn.Module] | torch.nn.ModuleList, hidden: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """BERT layers over ``hidden`` with ``mask`` as the layers' attention_mask (None: attend to
    everything, as BertModel passes for an unpadded batch; or an additive float mask). Layers in
    training mode (dropout) go through their own forward."""
    for layer in layers:
        if steppable(layer):
            hidden = bert_layer(layer, hidden, mask)
        else:
            out = layer(hidden, attention_mask=mask)
            hidden = out[0] if isinstance(out, tuple) else out
    return hidden
