"""The MoLoRA layer: N LoRA experts mixed per token and per module inside a HF causal LM.

Every LoRA-targeted ``nn.Linear`` of the base is replaced by a ``MoLoRALinear`` that keeps the
original module and the experts' factors. With a routing configuration active, for input h:

    y = W h + Σ_{e kept} p_e · scale_e · B_e A_e h

where p comes from a gate computed per token and module (routing math in fp32) and only the
top-k experts are kept, renormalised. With none active the layer returns ``W h`` unchanged, and
``MoLoRA.uninstall()`` puts the original modules back, so the base is restored exactly.

Gates (``MixtureSpec.gate``), from the routing vectors v_e each router fits per module:
  phatgoose            s_e = LN(h) · LN(v_e) / √d (LN: zero mean, unit variance, no affine;
                       σ is not applied at inference)
  average-activation   the same, with v_e the mean module input over e's training data
  arrow                s_e = |⟨h, v_e⟩|, v_e the top right-singular vector of ΔW_e
  glider               z_e = s_e(phatgoose) + α · g_e, g_e a per-row (per-query) global score
then z / T (T = ``MixtureSpec.temperature``; 1 leaves PHATGOOSE's scores as they are),
softmax over the experts, top-k, renormalise. α = 0 takes the PHATGOOSE path untouched, so it
reproduces PHATGOOSE bit for bit.

Typical use by an engine (the mixture stays installed; each batch activates its configuration):

    mix = MoLoRA(model)
    for name in spec.experts:
        mix.add_expert(name, adapter_path[name], gates={spec.gate: router.gate_vectors(name)})
    with mix.routing(specs) as stats:        # one MixtureSpec, or one per batch row
        out = model.generate(**batch)         # every decoder token is routed again at every step
    stats.per_expert()                        # mean gate probability per expert (provenance)
    mix.uninstall()

``glider`` reads the ``phatgoose`` vectors when an expert has no ``glider`` vectors of its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from routers.base import MixtureSpec
from routers.tokenwise import LoraFactors, read_lora_factors

GATES = ("phatgoose", "average-activation", "arrow", "glider")
_STANDARDISED = {"phatgoose", "average-activation", "glider"}
_LN_EPS = 1e-5  # PHATGOOSE standardises with nn.LayerNorm(elementwise_affine=False), eps 1e-5


def _vector_kind(gate: str) -> tuple[str, ...]:
    """Which stored vectors a gate reads, in order of preference."""
    return ("glider", "phatgoose") if gate == "glider" else (gate,)


@dataclass
class _Config:
    """The active routing configuration, shared by all layers of one model."""

    experts: tuple[str, ...]
    gate: str
    top_k: int
    alpha: float
    temperature: float
    global_scores: torch.Tensor | None  # [rows, N] fp32, or None
    stats: RoutingStats | None


@dataclass
class _Stack:
    """The selected experts' factors and routing vectors of one module, stacked."""

    A: torch.Tensor  # [N*R, d_in], scale folded in (fp32)
    B: torch.Tensor  # [N*R, d_out] (fp32)
    rank: int
    keys: torch.Tensor  # [N, d_in] routing vectors, standardised where the gate asks for it
    present: torch.Tensor | None  # [N] bool: experts that adapt this module (None: all)


class MoLoRALinear(nn.Module):
    """A base ``nn.Linear`` plus N LoRA experts mixed per token. Holds the math, nothing else."""

    def __init__(self, base: nn.Linear, name: str):
        super().__init__()
        self.base = base
        self.name = name
        self.factors: dict[str, LoraFactors] = {}
        self.vectors: dict[str, dict[str, torch.Tensor]] = {}  # kind -> expert -> [d_in]
        self.config: _Config | None = None
        self._stack: _Stack | None = None
        self._stack_key: tuple | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # modules that read ``.weight`` (dtype checks) keep working
        return self.base.weight

    def invalidate(self) -> None:
        self._stack, self._stack_key = None, None

    def _build_stack(self, cfg: _Config) -> _Stack | None:
        key = (cfg.experts, cfg.gate)
        if self._stack_key == key:
            return self._stack
        present = [e in self.factors for e in cfg.experts]
        if not any(present):
            stack = None
        else:
            dev = self.base.weight.device
            rank = max(self.factors[e].rank for e in cfg.experts if e in self.factors)
            d_in, d_out = self.in_features, self.out_features
            A = torch.zeros(len(cfg.experts), rank, d_in, device=dev)
            B = torch.zeros(len(cfg.experts), rank, d_out, device=dev)
            keys = torch.zeros(len(cfg.experts), d_in, device=dev)
            for i, e in enumerate(cfg.experts):
                if e not in self.factors:
                    continue
                f = self.factors[e]
                A[i, : f.rank] = f.A.to(dev) * f.scale  # zero-padded to the largest rank
                B[i, : f.rank] = f.B.to(dev).T
                keys[i] = self._vector(cfg.gate, e).to(dev)
            if cfg.gate in _STANDARDISED:
                keys = F.layer_norm(keys, (d_in,), eps=_LN_EPS)
            stack = _Stack(
                A=A.reshape(-1, d_in),
                B=B.reshape(-1, d_out),
                rank=rank,
                keys=keys,
                present=None if all(present) else torch.tensor(present, device=dev),
            )
        self._stack, self._stack_key = stack, key
        return stack

    def _vector(self, gate: str, expert: str) -> torch.Tensor:
        for kind in _vector_kind(gate):
            v = self.vectors.get(kind, {}).get(expert)
            if v is not None:
                return v.float()
        raise KeyError(f"expert {expert!r} has no {gate!r} routing vector for module {self.name}")

    def gate_weights(self, h: torch.Tensor, cfg: _Config, stack: _Stack) -> torch.Tensor:
        """Per-token mixture weights [..., N] in fp32: zero outside the top-k, kept ones sum to 1."""
        h = h.float()
        if cfg.gate in _STANDARDISED:
            z = F.layer_norm(h, (h.shape[-1],), eps=_LN_EPS) @ stack.keys.T / math.sqrt(h.shape[-1])
        elif cfg.gate == "arrow":
            z = (h @ stack.keys.T).abs()
        else:
            raise ValueError(f"unknown gate {cfg.gate!r}")
        if cfg.temperature != 1.0:
            z = z / cfg.temperature
        if cfg.gate == "glider" and cfg.alpha != 0.0 and cfg.global_scores is not None:
            g = cfg.global_scores.to(z.device)
            if g.shape[0] != z.shape[0]:  # num_return_sequences / beams expand the batch row-wise
                g = g.repeat_interleave(z.shape[0] // g.shape[0], dim=0)
            z = z + cfg.alpha * g.view(g.shape[0], *([1] * (z.dim() - 2)), g.shape[1])
        if stack.present is not None:
            z = z.masked_fill(~stack.present, float("-inf"))
        p = torch.softmax(z, dim=-1)
        k = min(cfg.top_k, p.shape[-1])
        if k < p.shape[-1]:
            top, idx = p.topk(k, dim=-1)
            p = torch.zeros_like(p).scatter_(-1, idx, top / top.sum(-1, keepdim=True))
        return p

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.base(h)
        cfg = self.config
        if cfg is None:
            return y
        stack = self._build_stack(cfg)
        if stack is None:
            return y
        p = self.gate_weights(h, cfg, stack)  # [..., N]
        ah = h.float() @ stack.A.T  # all experts' A h at once: [..., N*R]
        ah = (ah.unflatten(-1, (p.shape[-1], stack.rank)) * p.unsqueeze(-1)).flatten(-2)
        if cfg.stats is not None:
            cfg.stats.add(self.name, p)
        return y + (ah @ stack.B).to(y.dtype)


@dataclass
class RoutingStats:
    """Mean gate probability per module and expert over the tokens routed while active.

    Every position the model computes counts, left padding included.
    """

    experts: tuple[str, ...]
    _sums: dict[str, torch.Tensor] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)

    def add(self, module: str, p: torch.Tensor) -> None:
        flat = p.detach().reshape(-1, p.shape[-1])
        s = flat.sum(0)
        self._sums[module] = self._sums[module] + s if module in self._sums else s
        self._counts[module] = self._counts.get(module, 0) + flat.shape[0]

    def per_module(self) -> dict[str, dict[str, float]]:
        return {
            m: dict(zip(self.experts, (s / self._counts[m]).tolist(), strict=True)) for m, s in self._sums.items()
        }

    def per_expert(self) -> dict[str, float]:
        """Mean over modules of the per-module mean gate probability."""
        if not self._sums:
            return {e: 0.0 for e in self.experts}
        means = torch.stack([s / self._counts[m] for m, s in self._sums.items()]).mean(0)
        return dict(zip(self.experts, means.tolist(), strict=True))


class MoLoRA:
    """LoRA experts installed into a HF causal LM as ``MoLoRALinear`` modules."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers: dict[str, MoLoRALinear] = {}
        self.experts: set[str] = set()
        self._config: _Config | None = None

    # -- experts -----------------------------------------------------------------------------
    def add_expert(
        self,
        name: str,
        adapter: str | Path | Mapping[str, LoraFactors],
        gates: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        """Load an expert's LoRA factors (a peft folder, or factors already read) and its routing
        vectors per gate kind: ``{"phatgoose": {module: v}, "arrow": {...}, ...}``."""
        factors = read_lora_factors(adapter) if isinstance(adapter, (str, Path)) else dict(adapter)
        modules = dict(self.model.named_modules())
        for module in factors:
            if module not in self.layers and not isinstance(modules.get(module), nn.Linear):
                raise ValueError(f"expert {name!r} adapts {module!r}, which is no nn.Linear of the base model")
        for module, f in factors.items():
            layer = self.layers.get(module) or self._wrap(module, modules[module])
            base = layer.base
            if f.A.shape[1] != base.in_features or f.B.shape[0] != base.out_features:
                raise ValueError(f"expert {name!r}: factor shapes do not fit {module}")
            layer.factors[name] = f
            layer.invalidate()
        self.experts.add(name)
        for kind, vectors in (gates or {}).items():
            self.set_gate_vectors(name, kind, vectors)

    def set_gate_vectors(self, name: str, kind: str, vectors: Mapping[str, torch.Tensor]) -> None:
        if kind not in GATES:
            raise ValueError(f"unknown gate kind {kind!r}; expected one of {GATES}")
        for module, layer in self.layers.items():
            if name in layer.factors:
                if module not in vectors:
                    raise KeyError(f"{kind} vectors of expert {name!r} lack module {module}")
                layer.vectors.setdefault(kind, {})[name] = vectors[module].detach().float()
                layer.invalidate()

    def remove_expert(self, name: str) -> None:
        self.experts.discard(name)
        for module in list(self.layers):
            layer = self.layers[module]
            layer.factors.pop(name, None)
            for per_kind in layer.vectors.values():
                per_kind.pop(name, None)
            layer.invalidate()
            if not layer.factors:
                self._unwrap(module)

    def uninstall(self) -> None:
        """Put every original module back: the model is the base model again."""
        self.deactivate()
        for module in list(self.layers):
            self._unwrap(module)
        self.experts.clear()

    def _wrap(self, module: str, linear: nn.Module) -> MoLoRALinear:
        layer = MoLoRALinear(linear, module)
        parent, _, child = module.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, layer)
        self.layers[module] = layer
        return layer

    def _unwrap(self, module: str) -> None:
        layer = self.layers.pop(module)
        parent, _, child = module.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, layer.base)

    # -- routing -----------------------------------------------------------------------------
    def activate(self, specs: MixtureSpec | Sequence[MixtureSpec], record_stats: bool = True) -> RoutingStats | None:
        """Set the routing for the next forward passes. One spec for the whole batch, or one per
        row: rows may differ only in their GLIDER global scores."""
        rows = [specs] if isinstance(specs, MixtureSpec) else list(specs)
        if not rows:
            raise ValueError("no MixtureSpec given")
        first = rows[0]
        shared = (tuple(first.experts), first.gate, first.top_k, first.alpha, first.temperature)
        for s in rows[1:]:
            if (tuple(s.experts), s.gate, s.top_k, s.alpha, s.temperature) != shared:
                raise ValueError("rows of one batch must share experts, gate, top_k, alpha and temperature")
        if first.gate not in GATES:
            raise ValueError(f"unknown gate {first.gate!r}; expected one of {GATES}")
        missing = [e for e in first.experts if e not in self.experts]
        if missing:
            raise KeyError(f"experts not installed in this mixture: {missing}")
        if not first.experts or first.top_k < 1:
            raise ValueError("a mixture needs at least one expert and top_k >= 1")
        global_scores = None
        if first.gate == "glider" and first.alpha != 0.0:
            if any(s.global_scores is None for s in rows):
                raise ValueError("GLIDER with alpha != 0 needs global_scores for every row")
            global_scores = torch.tensor(
                [[float(s.global_scores[e]) for e in first.experts] for s in rows],
                dtype=torch.float32,
                device=next(self.model.parameters()).device,
            )
        stats = RoutingStats(tuple(first.experts)) if record_stats else None
        self._config = _Config(
            experts=tuple(first.experts),
            gate=first.gate,
            top_k=first.top_k,
            alpha=float(first.alpha),
            temperature=float(first.temperature),
            global_scores=global_scores,
            stats=stats,
        )
        for layer in self.layers.values():
            layer.config = self._config
        return stats

    def deactivate(self) -> None:
        self._config = None
        for layer in self.layers.values():
            layer.config = None

    @contextmanager
    def routing(self, specs: MixtureSpec | Sequence[MixtureSpec], record_stats: bool = True) -> Iterator[RoutingStats | None]:
        stats = self.activate(specs, record_stats)
        try:
            yield stats
        finally:
            self.deactivate()


@contextmanager
def mixture(
    model: nn.Module,
    adapters: Mapping[str, str | Path],
    specs: MixtureSpec | Sequence[MixtureSpec],
    gates: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]] | None = None,
) -> Iterator[RoutingStats | None]:
    """Install, route and uninstall in one go: ``gates[expert][kind][module] = v``."""
    mix = MoLoRA(model)
    try:
        for name, path in adapters.items():
            mix.add_expert(name, path, (gates or {}).get(name))
        with mix.routing(specs) as stats:
            yield stats
    finally:
        mix.uninstall()
