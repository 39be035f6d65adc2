"""Arrow (Ostapenko et al. 2024, microsoft/mttl): training-free token-level routing.

Per expert and LoRA module the prototype is the top right-singular vector of ΔW = B A, the input
direction the adapter amplifies most. It is computed from the factors alone: with Aᵀ = Q_a R_a and
B = Q_b R_b, ΔW = Q_b (R_b R_aᵀ) Q_aᵀ, so the SVD of the r×r core gives the right-singular vectors
as Q_a V; the dense d_out×d_in ΔW is never formed. At inference logit_e = |⟨h, v_e⟩| / T (the
absolute value removes the SVD sign ambiguity; neither h nor v is normalised), top-k softmax.
"""

from __future__ import annotations

import torch

from routers.base import Artifact, ExpertInfo
from routers.params import Param
from routers.tokenwise import Gate, TokenwiseRouter, read_lora_factors, require_adapter

# s_e = |⟨h, v_e⟩|, neither h nor v normalised
ARROW = Gate("arrow", absolute=True)


def top_right_singular_vector(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Unit top right-singular vector of B @ A (A [r, d_in], B [d_out, r]), from QR + an r×r SVD."""
    qa, ra = torch.linalg.qr(A.double().T)  # Aᵀ = Q_a R_a, Q_a [d_in, r]
    qb, rb = torch.linalg.qr(B.double())  # B = Q_b R_b
    _, _, vh = torch.linalg.svd(rb @ ra.T)
    return (qa @ vh[0]).float()


def arrow_prototypes(adapter_path) -> dict[str, torch.Tensor]:
    return {m: top_right_singular_vector(f.A, f.B) for m, f in read_lora_factors(adapter_path).items()}


class ArrowRouter(TokenwiseRouter):
    """Token-level router with SVD prototypes; no data needed. T = 1 by default (PHATGOOSE's
    comparison runs used 10)."""

    name = "arrow"
    gate = ARROW
    PARAMS = (
        Param("top_k", "int", 2, "experts mixed per token and module", minimum=1),
        Param("temperature", "float", 1.0, "softmax temperature of the per-token scores", minimum=1e-6),
    )

    def __init__(self, top_k: int = 2, temperature: float = 1.0):
        super().__init__(top_k=top_k, temperature=temperature)

    def fit_expert(self, expert: ExpertInfo) -> Artifact:
        require_adapter(expert)
        return Artifact(
            tensors=arrow_prototypes(expert.adapter_path), metadata={"prototype": "top right-singular vector"}
        )
