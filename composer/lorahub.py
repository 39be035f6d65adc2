"""LoraHub: gradient-free composition of LoRA experts for a task seen through a few examples.

As in sail-sg/lorahub:

- composition in factor space: Â = Σ w_i A_i, B̂ = Σ w_i B_i over every LoRA module (the adapters
  must share rank, alpha and target modules);
- objective on K few-shot (prompt, reference) pairs: mean cross-entropy of the reference tokens
  + 0.05 · mean |w|;
- nevergrad ``NGOpt`` over w ∈ [-1.5, 1.5]^n starting at w = 0, budget 40.

moerge differences, all small: the base is a decoder-only LM, so the cross-entropy covers the
reference tokens after the prompt (plus EOS, so the composed adapter also learns where to stop);
the loss is the mean over examples of each example's mean token cross-entropy; and the result is
the best *evaluated* w (w = 0 is always evaluated first), not NGOpt's model-based recommendation,
so the loss returned is never worse than the base's.

Candidates are scored on one peft model held for the whole search: each candidate's composed
factors are written into a single LoRA slot (``set_peft_model_state_dict``) and the K examples
run as one batch, so a candidate costs one forward pass.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from composer.base import ComposeError
from composer.merge import SIDECAR, combine_factor_states, load_factor_states, write_adapter_folder

L1 = 0.05
BOUND = 1.5
SLOT = "lorahub"


@dataclass
class LoraHubResult:
    weights: dict[str, float]
    loss: float  # objective (cross-entropy + L1 term) at ``weights``
    loss_at_zero: float  # objective at w = 0, i.e. the base model's cross-entropy
    path: Path | None = None  # the composed adapter folder, when one was written
    history: list[float] = field(default_factory=list)  # objective of every evaluation, in order


class LoraHubObjective:
    """loss(w) = mean cross-entropy of the references under the base + Σ w_i LoRA_i, + l1 · mean|w|."""

    def __init__(
        self,
        base_path: str | Path,
        adapters: Mapping[str, str | Path],
        examples: Sequence[tuple[str, str]],
        *,
        l1: float = L1,
        batch_size: int = 16,
        append_eos: bool = True,
        trust_remote_code: bool = False,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not adapters:
            raise ComposeError("lorahub: no adapters given")
        if not examples:
            raise ComposeError("lorahub: no few-shot examples given")
        self.names = list(adapters)
        self.paths = [Path(adapters[n]) for n in self.names]
        self.configs, self.states = load_factor_states(self.paths)
        self.l1 = l1
        self.batch_size = batch_size
        # the base's own code only for a base registered with --trust-remote-code
        self.tokenizer = AutoTokenizer.from_pretrained(str(base_path), trust_remote_code=trust_remote_code)
        base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=dtype, trust_remote_code=trust_remote_code)
        self.device = torch.device(device)
        base.to(self.device)  # type: ignore[arg-type]  # transformers' wrapped .to
        self.model = PeftModel.from_pretrained(base, str(self.paths[0]), adapter_name=SLOT, is_trainable=False)
        self.model.eval()
        self.rows = [self._encode(p, r, append_eos) for p, r in examples]

    def _encode(self, prompt: str, reference: str, append_eos: bool) -> tuple[list[int], int]:
        tok = self.tokenizer
        context = tok(prompt)["input_ids"]
        if not context and tok.bos_token_id is not None:
            context = [tok.bos_token_id]
        target = tok(reference, add_special_tokens=False)["input_ids"]
        if append_eos and tok.eos_token_id is not None:
            target = target + [tok.eos_token_id]
        if not context or not target:
            raise ComposeError(f"lorahub: example ({prompt!r}, {reference!r}) has an empty prompt or reference")
        return context + target, len(context)

    def compose(self, weights: Sequence[float] | np.ndarray) -> dict[str, torch.Tensor]:
        return combine_factor_states(self.states, weights)

    @torch.inference_mode()
    def cross_entropy(self, weights: Sequence[float] | np.ndarray) -> float:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, self.compose(weights), adapter_name=SLOT)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        per_example: list[float] = []
        for start in range(0, len(self.rows), self.batch_size):
            chunk = self.rows[start : start + self.batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            labels = torch.full_like(ids, -100)
            for i, (row, n_ctx) in enumerate(chunk):
                ids[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = 1
                labels[i, n_ctx : len(row)] = ids[i, n_ctx : len(row)]
            ids, mask, labels = ids.to(self.device), mask.to(self.device), labels.to(self.device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
            )
            counted = (labels[:, 1:] != -100).sum(1)
            per_example.extend((nll.sum(1) / counted).tolist())
        return float(np.mean(per_example))

    def __call__(self, weights: Sequence[float] | np.ndarray) -> float:
        w = np.asarray(weights, dtype=float)
        return self.cross_entropy(w) + self.l1 * float(np.abs(w).mean())


def lorahub_search(
    base_path: str | Path,
    adapters: Mapping[str, str | Path],
    examples: Sequence[tuple[str, str]],
    budget: int = 40,
    seed: int = 0,
    *,
    bound: float = BOUND,
    l1: float = L1,
    trust_remote_code: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoraHubResult:
    import nevergrad as ng

    objective = LoraHubObjective(
        base_path, adapters, examples, l1=l1, trust_remote_code=trust_remote_code, device=device, dtype=dtype
    )
    n = len(objective.names)
    seen: dict[tuple[float, ...], float] = {}
    history: list[float] = []

    def evaluate(w: np.ndarray) -> float:
        key = tuple(float(x) for x in w)
        if key not in seen:
            seen[key] = objective(w)
        history.append(seen[key])
        return seen[key]

    zero = np.zeros(n)
    loss_at_zero = evaluate(zero)
    best_w, best = zero, loss_at_zero
    param = ng.p.Array(init=zero, lower=-bound, upper=bound)
    param.random_state = np.random.RandomState(seed)
    optimizer = ng.optimizers.NGOpt(parametrization=param, budget=budget)
    for _ in range(budget):
        candidate = optimizer.ask()
        w = np.clip(np.asarray(candidate.value, dtype=float), -bound, bound)
        loss = evaluate(w)
        optimizer.tell(candidate, loss)
        if loss < best:
            best_w, best = w, loss
    return LoraHubResult(
        weights={name: float(x) for name, x in zip(objective.names, best_w)},
        loss=float(best),
        loss_at_zero=float(loss_at_zero),
        history=history,
    )


def lorahub_weights(
    base_path: str | Path,
    adapters: Mapping[str, str | Path],
    examples: Sequence[tuple[str, str]],
    budget: int = 40,
    seed: int = 0,
    *,
    trust_remote_code: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, float], float]:
    """The LoraHub weights per expert and the objective they reach."""
    result = lorahub_search(
        base_path, adapters, examples, budget, seed, trust_remote_code=trust_remote_code, device=device, dtype=dtype
    )
    return result.weights, result.loss


def write_composed_adapter(
    adapters: Mapping[str, str | Path], weights: Mapping[str, float], out_dir: str | Path, **record
) -> Path:
    """The factor-space composition as a peft folder, the weights in a ``moerge_merge.json`` sidecar."""
    names = list(adapters)
    configs, states = load_factor_states([Path(adapters[n]) for n in names])
    out = Path(out_dir)
    write_adapter_folder(out, configs[0], combine_factor_states(states, [weights[n] for n in names]))
    sidecar = {
        "method": "lorahub",
        "space": "factors",
        "experts": names,
        "weights": [float(weights[n]) for n in names],
        **record,
    }
    (out / SIDECAR).write_text(json.dumps(sidecar, indent=2))
    return out


def lorahub_compose(
    base_path: str | Path,
    adapters: Mapping[str, str | Path],
    examples: Sequence[tuple[str, str]],
    out_dir: str | Path,
    budget: int = 40,
    seed: int = 0,
    *,
    trust_remote_code: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoraHubResult:
    """Search the weights and write the composed adapter to ``out_dir``."""
    result = lorahub_search(
        base_path, adapters, examples, budget, seed, trust_remote_code=trust_remote_code, device=device, dtype=dtype
    )
    result.path = write_composed_adapter(
        adapters,
        result.weights,
        out_dir,
        loss=result.loss,
        loss_at_zero=result.loss_at_zero,
        budget=budget,
        seed=seed,
        examples=len(examples),
        l1=L1,
        bound=BOUND,
    )
    return result
