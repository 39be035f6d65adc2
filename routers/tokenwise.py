"""Shared ground of the token-level routers (PHATGOOSE, Average Activation, Arrow, GLIDER).

A token-level router does not pick an expert per query: it fits per expert and per LoRA module a
routing vector (its artifact, keyed by the base model's module name such as
``model.layers.0.self_attn.q_proj``) and answers ``route`` with a ``MixtureSpec`` that the engine
applies inside the forward pass through ``composer.molora``. The engine takes each expert's
vectors from ``router.gate_vectors(name)``.

How the vectors score a token is the router's ``Gate``, declared next to the router class and
registered in ``composer.gates.GATES`` under the name ``MixtureSpec.gate`` carries; the MoLoRA
layer (its PyTorch path and its CPU kernel alike) reads the gate's fields, never its name.

This module also holds the reader of peft LoRA folders (``read_lora_factors``), used both by the
routers that fit from factors and by the MoLoRA layer: composer depends on routers' types, never
the other way round.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.utils import load_peft_weights
from peft.utils.other import get_pattern_key

from routers.base import Artifact, BaseRouter, ExpertInfo, ExpertUnusable, MixtureSpec, RouteRequest

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoraFactors:
    """One module's LoRA: ΔW = scale · B @ A with A [r, d_in] and B [d_out, r]."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def read_lora_factors(adapter_path: str | Path, device: str | torch.device = "cpu") -> dict[str, LoraFactors]:
    """LoRA factors of a peft adapter folder (safetensors), keyed by the base model's module name."""
    config = LoraConfig.from_pretrained(str(adapter_path))
    if getattr(config, "use_dora", False):
        raise ExpertUnusable(f"{adapter_path}: DoRA adapters are not supported by the MoLoRA mixture")
    if getattr(config, "lora_bias", False):
        raise ExpertUnusable(f"{adapter_path}: LoRA adapters with a bias are not supported by the MoLoRA mixture")
    if getattr(config, "fan_in_fan_out", False):
        raise ExpertUnusable(f"{adapter_path}: fan_in_fan_out (Conv1D) adapters are not supported")
    if getattr(config, "modules_to_save", None):
        # a mixture combines LoRA deltas; the adapter's own copies of whole modules have no place in it
        raise ExpertUnusable(
            f"{adapter_path}: adapters with modules_to_save ({', '.join(config.modules_to_save)}) "
            "are not supported by the MoLoRA mixture"
        )
    weights = load_peft_weights(str(adapter_path), device=str(device))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        m = _LORA_KEY.match(key)
        if m is None:
            if "lora_embedding" in key or "lora_magnitude" in key:
                raise ExpertUnusable(f"{adapter_path}: unsupported LoRA tensor {key}")
            continue  # modules_to_save etc. are not part of a LoRA mixture
        parts.setdefault(m["module"], {})[m["which"]] = tensor.float()
    out: dict[str, LoraFactors] = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise ExpertUnusable(f"{adapter_path}: module {module} lacks lora_A or lora_B")
        r = ab["A"].shape[0]
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        scale = alpha / (r**0.5 if config.use_rslora else r)
        out[module] = LoraFactors(A=ab["A"], B=ab["B"], scale=float(scale))
    if not out:
        raise ExpertUnusable(f"{adapter_path}: no LoRA factors found")
    return out


@dataclass(frozen=True)
class Gate:
    """A token-level gate formula: how the routing vectors v_e score a module input h.

        s_e = LN(h) · LN(v_e) / √d   ``standardise`` (PHATGOOSE: LN is zero mean, unit variance
                                     over d, no affine, as nn.LayerNorm(elementwise_affine=False))
        s_e = h · v_e                otherwise
        s_e = |s_e|                  ``absolute`` (Arrow: removes the SVD sign ambiguity)
        z_e = s_e / T + α · g_e      ``global_term`` (GLIDER: g_e the query's global score per
                                     expert, ``MixtureSpec.global_scores``; α = 0 leaves s_e / T)

    then softmax over the experts, keep the top-k, renormalise (``composer.molora``, which reads
    these fields in its PyTorch path and passes them to its CPU kernel). ``vectors``: the stored
    vector kinds the gate reads, in order of preference (default: its own name). ``top_k``: the
    default k of a router that declares this gate.
    """

    name: str
    vectors: tuple[str, ...] = ()
    standardise: bool = False
    absolute: bool = False
    global_term: bool = False
    top_k: int = 2
    eps: float = 1e-5  # PHATGOOSE standardises with nn.LayerNorm's default eps

    def __post_init__(self) -> None:
        if not self.vectors:
            object.__setattr__(self, "vectors", (self.name,))

    def keys(self, v: torch.Tensor) -> torch.Tensor:
        """Routing vectors [..., d] as the scores read them: LN(v) / √d where standardised (the
        1/√d folded into the keys once instead of scaling every token), else v itself."""
        if not self.standardise:
            return v
        d = v.shape[-1]
        return F.layer_norm(v, (d,), eps=self.eps) / math.sqrt(d)

    def torch_scores(self, x: torch.Tensor, keys_t: torch.Tensor) -> torch.Tensor:
        """s [T, M] for tokens x [T, d] (fp32) and keys_t [d, M], columns made by ``keys``;
        before the temperature and the global term."""
        z = (F.layer_norm(x, (x.shape[-1],), eps=self.eps) if self.standardise else x) @ keys_t
        return z.abs() if self.absolute else z

    @property
    def kernel_args(self) -> tuple[bool, bool, float]:
        """``composer.molora_kernels.route``'s (standardise, absolute, eps) for this gate."""
        return self.standardise, self.absolute, self.eps


@lru_cache(maxsize=2)
def load_base(
    base_path: str,
    trust_remote_code: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """The (frozen, eval-mode) base model and its tokenizer, cached: several experts share one base.

    Fitting code only hooks the returned model and removes its hooks afterwards; it never
    changes its parameters. ``trust_remote_code`` only for a base registered with
    ``--trust-remote-code`` (``ExpertInfo.base_trust_remote_code``); never a prompt asking.
    ``device`` and ``dtype``: where the strategy's engines run (the router's ``placement`` need);
    the fitting hooks compute in float32 whatever the base's dtype.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, trust_remote_code=trust_remote_code)
    model.to(device)  # type: ignore[arg-type]  # transformers' wrapped .to
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def training_pairs(
    expert: ExpertInfo, eos_token: str, split: str = "train", limit: int | None = None
) -> list[tuple[str, str]]:
    """The expert's own training examples as (prompt, reference + EOS): the part the expert was
    trained to produce is kept apart, for fitting code that puts the loss on it alone."""
    pairs = [(e.prompt, e.reference + eos_token) for e in expert.examples if e.split == split]
    if not pairs:
        raise ExpertUnusable(f"expert {expert.name!r} has no {split!r} examples to fit on")
    return pairs[:limit] if limit is not None else pairs


def require_adapter(expert: ExpertInfo) -> Path:
    """The expert's adapter folder; an expert that is no LoRA adapter on a known base is unusable."""
    if expert.kind != "adapter" or expert.adapter_path is None or expert.base_path is None:
        raise ExpertUnusable(f"expert {expert.name!r}: token-level routing needs a LoRA adapter on a known base")
    return expert.adapter_path


class TokenwiseRouter(BaseRouter):
    """Keeps each expert's per-module routing vectors and answers with a ``MixtureSpec``.

    Subclasses set ``name`` and ``gate`` (their ``Gate``, registered in ``composer.gates``) and
    implement ``fit_expert``.
    """

    name = "tokenwise"
    gate: Gate
    level = "token"
    kinds = ("adapter",)

    def __init__(
        self,
        top_k: int | None = None,
        temperature: float = 1.0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.top_k = self.gate.top_k if top_k is None else top_k
        self.temperature = temperature
        # where fitting runs the base (subclasses that read activations); the runtime supplies
        # its engines' own (the ``placement`` need)
        self.device, self.dtype = device, dtype
        self.experts: dict[str, ExpertInfo] = {}
        self._vectors: dict[str, dict[str, torch.Tensor]] = {}

    # -- contract ----------------------------------------------------------------------------
    def fit_expert(self, expert: ExpertInfo) -> Artifact:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_expert(self, expert: ExpertInfo, artifact: Artifact) -> None:
        self.experts[expert.name] = expert
        self._vectors[expert.name] = {k: v.detach().float().cpu() for k, v in artifact.tensors.items()}

    def remove_expert(self, name: str) -> None:
        self.experts.pop(name, None)
        self._vectors.pop(name, None)

    def route(self, request: RouteRequest) -> MixtureSpec:
        if not self.experts:
            raise LookupError(f"router {self.name!r} has no experts")
        names = list(self.experts)
        return MixtureSpec(
            router=self.name,
            experts=names,
            gate=self.gate.name,
            top_k=min(self.top_k, len(names)),
            temperature=self.temperature,
        )

    # -- for the engine ----------------------------------------------------------------------
    def gate_vectors(self, name: str) -> dict[str, torch.Tensor]:
        """Per-module routing vectors of one expert, as the MoLoRA layer expects them."""
        return self._vectors[name]
