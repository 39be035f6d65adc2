"""The MoLoRA layer: N LoRA experts mixed per token and per module inside a HF causal LM.

Every LoRA-targeted ``nn.Linear`` of the base is replaced by a ``MoLoRALinear`` that keeps the
original module and the experts' factors. With a routing configuration active, for input h:

    y = W h + Σ_{e kept} p_e · scale_e · B_e A_e h

where p comes from a gate computed per token and module (routing math in fp32) and only the
top-k experts are kept, renormalised. With none active the layer returns ``W h`` unchanged, and
``MoLoRA.uninstall()`` puts the original modules back, so the base is restored exactly.

Gates (``MixtureSpec.gate``, a name looked up in ``composer.gates.GATES``), from the routing
vectors v_e each router fits per module. Each is a ``routers.tokenwise.Gate`` that declares its
formula, and this layer reads only those fields:
  standardise          s_e = LN(h) · LN(v_e) / √d (LN: zero mean, unit variance, no affine), else
                       s_e = h · v_e; phatgoose, average-activation and glider standardise
  absolute             s_e = |s_e| (arrow: v_e the top right-singular vector of ΔW_e)
  global_term          z_e = s_e + α · g_e, g_e a per-row (per-query) global score (glider)
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

A gate reads the first of its ``vectors`` kinds an expert has: ``glider`` reads the ``phatgoose``
vectors when an expert has no ``glider`` vectors of its own.

How it runs: layers that read the same tensor (q/k/v, gate/up) form a ``_Group`` that routes
the tokens once for all of them. On CPU without autograd (how the engines generate) that is one
numba kernel (``composer/molora_kernels.py``): LayerNorm, gate, top-k and softmax per token; then
each layer adds only its picked experts' products to its base output, one more kernel call (k/N
of the dense work, and two calls instead of some ten PyTorch ops). Elsewhere (autograd, GPUs) the
group computes the gate with PyTorch ops, multiplies the input with every member's and expert's A
at once, and each layer adds its p-weighted B product in one ``addmm_``; the unpicked experts cost
work but weigh 0. Both paths compute the formula above; their floats differ in the last bits from
each other and from a per-module evaluation (the 1/√d is folded into the keys, the softmax is
taken over the top-k logits), which is below what greedy decoding notices but not bit-exact.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from composer import molora_kernels
from composer.base import ComposeError
from composer.gates import GATES, check_vector_kind, get_gate
from routers.base import MixtureSpec
from routers.tokenwise import Gate, LoraFactors, read_lora_factors

__all__ = ["GATES", "Gate", "MoLoRA", "MoLoRALinear", "RoutingStats", "mixture"]


@dataclass
class _Config:
    """The active routing configuration, shared by all layers of one model."""

    experts: tuple[str, ...]
    gate: Gate
    top_k: int
    alpha: float
    temperature: float
    global_scores: torch.Tensor | None  # [rows, N] fp32, or None
    stats: RoutingStats | None


# Sibling projections that a decoder layer feeds the same tensor: q/k/v read the attention input,
# gate/up the MLP input. Sharing is only an optimisation (``_Group`` checks that the input really
# is the same tensor), so a wrong guess costs time, never correctness.
_SHARED_INPUT = (
    frozenset({"q_proj", "k_proj", "v_proj"}),
    frozenset({"gate_proj", "up_proj"}),
    frozenset({"query", "key", "value"}),
    frozenset({"w1", "w3"}),
)


# CPU inference routes and multiplies through the numba kernels; False forces the PyTorch path
# everywhere (the tests compare the two).
_USE_KERNELS = True


@dataclass
class _KernelStack:
    """A group's stack as the CPU kernels read it: float32 numpy views of the stacked tensors
    ``_Group._build`` makes (no copies; built once per configuration)."""

    keys: np.ndarray  # [G, N, d_in] routing vectors, as in _Stack.keys_t
    A: list[np.ndarray]  # per member [N, R, d_in], scale folded in
    B: list[np.ndarray]  # per member [N, R, d_out]
    present: np.ndarray  # [G, N] bool


@dataclass
class _Stack:
    """A group's factors and routing vectors for one configuration, stacked across experts and
    members (G members, N experts, rank R: the largest rank, smaller ones zero-padded)."""

    keys_t: torch.Tensor  # [d_in, G*N] routing vectors as ``Gate.keys`` makes them
    A_t: torch.Tensor  # [d_in, G*N*R] every member's and expert's A, scale folded in (fp32)
    B: list[torch.Tensor]  # per member [N*R, d_out] (fp32)
    index: dict[str, int]  # member module name -> row g; members with none of the experts are absent
    shape: tuple[int, int, int]  # (G, N, R)
    present: torch.Tensor | None  # [G, N] bool: experts that adapt each member (None: all)
    kernel: _KernelStack | None  # the same for the CPU kernels (None off CPU)


@dataclass
class _Routed:
    """One input's routing for a whole group (T tokens)."""

    p: torch.Tensor  # [T, G, N] mixture weights, zero outside the top-k
    ah: torch.Tensor | None  # PyTorch path: [T, G, N*R] p-weighted A h of every expert
    picked: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # kernel path: x [T, d_in], idx / w [T, G, k]


class _Group:
    """MoLoRA layers that read the same input. The first of them called on a tensor computes, for
    all of them at once, the one LayerNorm, the gate matmul, the routing and (dense path) the A
    products; the others reuse the result when they are called on that same tensor. At small
    widths these small kernels cost as much as the matmuls, so sharing them matters."""

    def __init__(self, members: list[MoLoRALinear]):
        self.members = members
        self._stack: _Stack | None = None
        self._stack_key: tuple | None = None
        self._cache: tuple | None = None  # (h, h version, config, _Routed)

    def invalidate(self) -> None:
        self._stack, self._stack_key, self._cache = None, None, None

    def release(self) -> None:
        """Drop the last input's results (they hold that activation tensor alive)."""
        self._cache = None

    def stack(self, cfg: _Config) -> _Stack | None:
        key = (cfg.experts, cfg.gate)
        if self._stack_key != key:
            self._stack, self._stack_key, self._cache = self._build(cfg), key, None
        return self._stack

    def _build(self, cfg: _Config) -> _Stack | None:
        members = [m for m in self.members if any(e in m.factors for e in cfg.experts)]
        if not members:
            return None
        dev = members[0].base.weight.device
        d_in = members[0].in_features
        G, N = len(members), len(cfg.experts)
        R = max(m.factors[e].rank for m in members for e in cfg.experts if e in m.factors)
        A = torch.zeros(G, N, R, d_in, device=dev)
        keys = torch.zeros(G, N, d_in, device=dev)
        present = torch.zeros(G, N, dtype=torch.bool, device=dev)
        B = []
        for g, m in enumerate(members):
            Bg = torch.zeros(N, R, m.out_features, device=dev)
            for i, e in enumerate(cfg.experts):
                if e not in m.factors:
                    continue
                f = m.factors[e]
                A[g, i, : f.rank] = f.A.to(dev) * f.scale  # zero-padded to the largest rank
                Bg[i, : f.rank] = f.B.to(dev).T
                keys[g, i] = m._vector(cfg.gate, e).to(dev)
                present[g, i] = True
            B.append(Bg)
        keys = cfg.gate.keys(keys)  # standardised gates: LN(v)/√d, the 1/√d folded in once
        kernel = None
        if dev.type == "cpu":
            kernel = _KernelStack(
                keys=keys.detach().numpy(),
                A=[a.detach().numpy() for a in A],
                B=[b.detach().numpy() for b in B],  # the same memory as _Stack.B
                present=present.numpy(),
            )
        return _Stack(
            keys_t=keys.reshape(G * N, d_in).T.contiguous(),
            A_t=A.reshape(G * N * R, d_in).T.contiguous(),
            B=[b.reshape(N * R, b.shape[-1]) for b in B],
            index={m.name: g for g, m in enumerate(members)},
            shape=(G, N, R),
            present=None if bool(present.all()) else present,
            kernel=kernel,
        )

    def route(self, h: torch.Tensor, cfg: _Config, stack: _Stack) -> _Routed:
        """The routing of input h [..., d_in] (flattened to T tokens) for every member; computed
        once per input tensor and configuration."""
        c = self._cache
        version = _version(h)
        if c is not None and c[0] is h and c[1] == version and c[2] is cfg:
            return c[3]
        x = h.reshape(-1, h.shape[-1]).float()  # routing math in fp32 (no copy when already fp32)
        G, N, R = stack.shape
        # the kernels write into numpy views of their outputs, which autograd cannot follow
        if stack.kernel is not None and _USE_KERNELS and not torch.is_grad_enabled():
            routed = self._route_kernel(x, cfg, stack)
        else:
            p = self._gate(h.shape[0], x, cfg, stack)
            ah = ((x @ stack.A_t).view(-1, G, N, R) * p.unsqueeze(-1)).view(-1, G, N * R)
            routed = _Routed(p, ah, None)
        if cfg.stats is not None:
            cfg.stats.add_group(tuple(stack.index), routed.p)
        self._cache = (h, version, cfg, routed)
        return routed

    @staticmethod
    def _route_kernel(x: torch.Tensor, cfg: _Config, stack: _Stack) -> _Routed:
        """_gate's routing, every token in one kernel call, which also keeps each member's top-k
        (expert, weight) pairs for the products."""
        ks = stack.kernel
        assert ks is not None  # the kernel path runs on CPU, where the stack has one
        G, N, _ = stack.shape
        T = x.shape[0]
        k = min(cfg.top_k, N)
        bias, seq = np.zeros((0, N), dtype=np.float32), 1
        if cfg.gate.global_term and cfg.alpha != 0.0 and cfg.global_scores is not None:
            bias = (cfg.alpha * cfg.global_scores).cpu().numpy()  # [queries, N]
            # a query's tokens are consecutive: its batch row's, or its rows' where
            # num_return_sequences / beams expanded the batch row-wise (as _gate's repeat_interleave)
            seq = T // bias.shape[0]
        xn = x.contiguous().numpy()
        idx = np.empty((T, G, k), dtype=np.int64)
        w = np.empty((T, G, k), dtype=np.float32)
        p = torch.empty(T, G, N)
        standardise, absolute, eps = cfg.gate.kernel_args
        molora_kernels.route(
            xn,
            ks.keys,
            standardise,
            absolute,
            eps,
            cfg.temperature,
            bias,
            seq,
            ks.present,
            k,
            idx,
            w,
            p.numpy(),
        )
        return _Routed(p, None, (xn, idx, w))

    @staticmethod
    def _gate(rows: int, x: torch.Tensor, cfg: _Config, stack: _Stack) -> torch.Tensor:
        """Mixture weights p [T, G, N]: zero outside each member's top-k, the kept ones sum to 1."""
        G, N, _ = stack.shape
        z = cfg.gate.torch_scores(x, stack.keys_t).view(-1, G, N)  # standardised keys carry the 1/√d
        if cfg.temperature != 1.0:
            z = z / cfg.temperature
        if cfg.gate.global_term and cfg.alpha != 0.0 and cfg.global_scores is not None:
            g = cfg.global_scores.to(z.device)
            if g.shape[0] != rows:  # num_return_sequences / beams expand the batch row-wise
                g = g.repeat_interleave(rows // g.shape[0], dim=0)
            z = (z.view(rows, -1, G, N) + cfg.alpha * g.view(rows, 1, 1, N)).view(-1, G, N)
        if stack.present is not None:
            z = z.masked_fill(~stack.present, float("-inf"))
        k = min(cfg.top_k, N)
        if k == N:
            return torch.softmax(z, dim=-1)
        # softmax restricted to the top-k logits == top-k of the softmax, renormalised
        top, idx = z.topk(k, dim=-1)
        return torch.zeros_like(z).scatter_(-1, idx, torch.softmax(top, dim=-1))


def _version(h: torch.Tensor) -> int | None:
    """The tensor's in-place edit counter. Inference tensors (``torch.inference_mode``, as the
    engines generate) keep none; for them identity alone must do, which holds because a decoder
    layer calls its sibling projections back to back on the one normed input."""
    return None if h.is_inference() else h._version


class MoLoRALinear(nn.Module):
    """A base ``nn.Linear`` plus N LoRA experts mixed per token. Holds the factors; the math is
    shared with the siblings of its ``_Group`` that read the same input."""

    def __init__(self, base: nn.Linear, name: str):
        super().__init__()
        self.base = base
        self.name = name
        self.factors: dict[str, LoraFactors] = {}
        self.vectors: dict[str, dict[str, torch.Tensor]] = {}  # kind -> expert -> [d_in]
        self.config: _Config | None = None
        self.group = _Group([self])

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
        self.group.invalidate()

    def _build_stack(self, cfg: _Config) -> _Stack | None:
        stack = self.group.stack(cfg)
        return stack if stack is not None and self.name in stack.index else None

    def _vector(self, gate: Gate, expert: str) -> torch.Tensor:
        for kind in gate.vectors:
            v = self.vectors.get(kind, {}).get(expert)
            if v is not None:
                return v.float()
        raise ComposeError(f"expert {expert!r} has no {gate.name!r} routing vector for module {self.name}")

    def gate_weights(self, h: torch.Tensor, cfg: _Config, stack: _Stack) -> torch.Tensor:
        """Per-token mixture weights [..., N] in fp32: zero outside the top-k, kept ones sum to 1."""
        p = _Group._gate(h.shape[0], h.reshape(-1, h.shape[-1]).float(), cfg, stack)
        return p[:, stack.index[self.name]].reshape(*h.shape[:-1], stack.shape[1])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.base(h)
        cfg = self.config
        if cfg is None:
            return y
        stack = self._build_stack(cfg)
        if stack is None:
            return y
        routed = self.group.route(h, cfg, stack)
        g = stack.index[self.name]
        flat = y.reshape(-1, y.shape[-1])
        if routed.picked is not None:  # kernel: each token's picked experts only
            x, idx, w = routed.picked
            assert stack.kernel is not None  # routed by the kernel: the CPU stack
            A, B = stack.kernel.A[g], stack.kernel.B[g]
            if flat.dtype == torch.float32 and flat.is_contiguous():  # into the fresh base output
                molora_kernels.add_products(flat.numpy(), x, A, B, idx, w, g)
                return flat.view(y.shape)
            acc = torch.zeros(flat.shape)
            molora_kernels.add_products(acc.numpy(), x, A, B, idx, w, g)
            return (flat + acc.to(flat.dtype)).view(y.shape)
        assert routed.ah is not None  # the PyTorch path's products
        delta = routed.ah[:, g]  # all experts in one product, the unpicked ones weigh 0
        if flat.dtype == torch.float32:  # y += delta @ B in one kernel, into the fresh base output
            return flat.addmm_(delta, stack.B[g]).view(y.shape)
        return (flat + (delta @ stack.B[g]).to(flat.dtype)).view(y.shape)


@dataclass
class RoutingStats:
    """Mean gate probability per module and expert over the tokens routed while active.

    Every position the model computes counts, left padding included. Groups hand over their
    [tokens, members, experts] weights as they are; they are summed in batches, not per step.
    """

    experts: tuple[str, ...]
    _sums: dict[str, torch.Tensor] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)
    _pending: dict[tuple[str, ...], list[torch.Tensor]] = field(default_factory=dict)

    def add(self, module: str, p: torch.Tensor) -> None:
        self.add_group((module,), p.unsqueeze(-2))

    def add_group(self, modules: tuple[str, ...], p: torch.Tensor) -> None:
        """p [..., len(modules), N]: the weights of several modules routed on the same tokens."""
        pending = self._pending.setdefault(modules, [])
        pending.append(p.detach().reshape(-1, len(modules), p.shape[-1]))
        if len(pending) >= 64:
            self._flush(modules)

    def _flush(self, modules: tuple[str, ...]) -> None:
        ps = self._pending.pop(modules, [])
        if not ps:
            return
        flat = torch.cat(ps) if len(ps) > 1 else ps[0]
        sums = flat.sum(0)
        for i, module in enumerate(modules):
            self._sums[module] = self._sums[module] + sums[i] if module in self._sums else sums[i]
            self._counts[module] = self._counts.get(module, 0) + flat.shape[0]

    def per_module(self) -> dict[str, dict[str, float]]:
        for modules in list(self._pending):
            self._flush(modules)
        return {m: dict(zip(self.experts, (s / self._counts[m]).tolist(), strict=True)) for m, s in self._sums.items()}

    def per_expert(self) -> dict[str, float]:
        """Mean over modules of the per-module mean gate probability."""
        for modules in list(self._pending):
            self._flush(modules)
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
        vectors per kind (the kinds registered gates read): ``{"phatgoose": {module: v}, ...}``."""
        factors = read_lora_factors(adapter) if isinstance(adapter, (str, Path)) else dict(adapter)
        linears = {n: m for n, m in self.model.named_modules() if isinstance(m, nn.Linear)}
        for module in factors:
            if module not in self.layers and module not in linears:
                raise ComposeError(f"expert {name!r} adapts {module!r}, which is no nn.Linear of the base model")
        for module, f in factors.items():
            layer = self.layers.get(module) or self._wrap(module, linears[module])
            base = layer.base
            if f.A.shape[1] != base.in_features or f.B.shape[0] != base.out_features:
                raise ComposeError(f"expert {name!r}: factor shapes do not fit {module}")
            layer.factors[name] = f
        self._regroup()
        self.experts.add(name)
        for kind, vectors in (gates or {}).items():
            self.set_gate_vectors(name, kind, vectors)

    def set_gate_vectors(self, name: str, kind: str, vectors: Mapping[str, torch.Tensor]) -> None:
        check_vector_kind(kind)  # UnknownGate, naming the kinds the registered gates read
        for module, layer in self.layers.items():
            if name in layer.factors:
                if module not in vectors:
                    raise ComposeError(f"{kind} vectors of expert {name!r} lack module {module}")
                layer.vectors.setdefault(kind, {})[name] = vectors[module].detach().float()
                layer.invalidate()

    def remove_expert(self, name: str) -> None:
        self.experts.discard(name)
        for module in list(self.layers):
            layer = self.layers[module]
            layer.factors.pop(name, None)
            for per_kind in layer.vectors.values():
                per_kind.pop(name, None)
            if not layer.factors:
                self._unwrap(module)
        self._regroup()

    def uninstall(self) -> None:
        """Put every original module back: the model is the base model again."""
        self.deactivate()
        for module in list(self.layers):
            self._unwrap(module)
        self.experts.clear()

    def _wrap(self, module: str, linear: nn.Linear) -> MoLoRALinear:
        layer = MoLoRALinear(linear, module)
        parent, _, child = module.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, layer)
        self.layers[module] = layer
        return layer

    def _unwrap(self, module: str) -> None:
        layer = self.layers.pop(module)
        parent, _, child = module.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, layer.base)

    def _regroup(self) -> None:
        """Fresh groups (and so fresh stacks): siblings of one parent that read the same input
        (``_SHARED_INPUT``) and have the same input width share one; every other layer is alone."""
        groups: dict[tuple, list[MoLoRALinear]] = {}
        for module, layer in self.layers.items():
            parent, _, child = module.rpartition(".")
            family = next((i for i, names in enumerate(_SHARED_INPUT) if child in names), None)
            key = (parent, family, layer.in_features) if family is not None else (module,)
            groups.setdefault(key, []).append(layer)
        for members in groups.values():
            group = _Group(members)
            for layer in members:
                layer.group = group

    # -- routing -----------------------------------------------------------------------------
    def activate(self, specs: MixtureSpec | Sequence[MixtureSpec], record_stats: bool = True) -> RoutingStats | None:
        """Set the routing for the next forward passes. One spec for the whole batch, or one per
        row: rows may differ only in their GLIDER global scores."""
        rows = [specs] if isinstance(specs, MixtureSpec) else list(specs)
        if not rows:
            raise ComposeError("no MixtureSpec given")
        first = rows[0]
        shared = (tuple(first.experts), first.gate, first.top_k, first.alpha, first.temperature)
        for s in rows[1:]:
            if (tuple(s.experts), s.gate, s.top_k, s.alpha, s.temperature) != shared:
                raise ComposeError("rows of one batch must share experts, gate, top_k, alpha and temperature")
        gate = get_gate(first.gate)  # UnknownGate, naming the registered ones
        missing = [e for e in first.experts if e not in self.experts]
        if missing:
            raise ComposeError(f"experts not installed in this mixture: {missing}")
        if not first.experts or first.top_k < 1:
            raise ComposeError("a mixture needs at least one expert and top_k >= 1")
        global_scores = None
        if gate.global_term and first.alpha != 0.0:
            scores = [s.global_scores for s in rows]
            if any(s is None for s in scores):
                raise ComposeError(f"gate {gate.name!r} with alpha != 0 needs global_scores for every row")
            global_scores = torch.tensor(
                [[float(s[e]) for e in first.experts] for s in scores if s is not None],
                dtype=torch.float32,
                device=next(self.model.parameters()).device,
            )
        stats = RoutingStats(tuple(first.experts)) if record_stats else None
        self._config = _Config(
            experts=tuple(first.experts),
            gate=gate,
            top_k=first.top_k,
            alpha=float(first.alpha),
            temperature=float(first.temperature),
            global_scores=global_scores,
            stats=stats,
        )
        for layer in self.layers.values():
            layer.config = self._config
            layer.group.release()
        return stats

    def deactivate(self) -> None:
        self._config = None
        for layer in self.layers.values():
            layer.config = None
            layer.group.release()

    @contextmanager
    def routing(
        self, specs: MixtureSpec | Sequence[MixtureSpec], record_stats: bool = True
    ) -> Iterator[RoutingStats | None]:
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
