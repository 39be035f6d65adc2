"""PHATGOOSE (Muqeeth et al. 2024, r-three/phatgoose) and its Average-Activation baseline.

PHATGOOSE trains, after an expert exists and on that expert's own training data, one gate vector
v ∈ R^{d_in} per LoRA module (initialised to 0) with the forward y = W x + σ(vᵀx) · ΔW x; the base
and the LoRA factors stay frozen and the loss is plain next-token cross-entropy. moerge trains on
the expert's train examples as ``prompt + reference + EOS`` with the loss on every token of that
sequence (padding excluded). Official defaults: 100 steps, AdamW lr 5e-3, constant schedule with
6 % linear warm-up. At inference the vectors are routing keys only (see ``composer.molora``).

Average Activation (same code base's baseline): v_e = the mean input of each LoRA module over the
expert's training tokens; routed exactly like PHATGOOSE.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from routers.base import Artifact, ExpertInfo
from routers.tokenwise import LoraFactors, TokenwiseRouter, load_base, read_lora_factors, require_adapter, training_texts


def _batches(texts: list[str], batch_size: int, seed: int) -> Iterator[list[str]]:
    """Endless shuffled batches (reshuffled every epoch)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(texts), generator=gen).tolist()
        for i in range(0, len(order), batch_size):
            yield [texts[j] for j in order[i : i + batch_size]]


def _encode(tokenizer, texts: list[str], device, max_length: int | None):
    enc = tokenizer(
        texts, return_tensors="pt", padding=True, truncation=max_length is not None, max_length=max_length
    ).to(device)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return enc["input_ids"], enc["attention_mask"], labels


def train_gates(
    model: torch.nn.Module,
    tokenizer,
    factors: dict[str, LoraFactors],
    texts: list[str],
    steps: int = 100,
    lr: float = 5e-3,
    batch_size: int = 8,
    warmup: float = 0.06,
    max_length: int | None = 512,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train PHATGOOSE gate vectors for one expert; ``model`` is the frozen base (it is hooked
    during training and left exactly as it was). Returns the vectors and a loss summary."""
    device = next(model.parameters()).device
    gates = {m: torch.zeros(f.A.shape[1], device=device, requires_grad=True) for m, f in factors.items()}
    on_device = {m: (f.A.to(device), f.B.to(device), f.scale) for m, f in factors.items()}

    def hook(name):
        A, B, scale = on_device[name]
        v = gates[name]

        def apply(_module, inputs, out):
            x = inputs[0]
            sigma = torch.sigmoid(x.float() @ v).unsqueeze(-1)
            delta = ((x.float() @ A.T) @ B.T) * scale
            return out + (sigma * delta).to(out.dtype)

        return apply

    handles = [model.get_submodule(m).register_forward_hook(hook(m)) for m in factors]
    was_training = model.training
    model.eval()  # no dropout: the base is frozen and deterministic
    try:
        probe = _encode(tokenizer, texts[:batch_size], device, max_length)

        def probe_loss() -> float:
            with torch.no_grad():
                return float(model(input_ids=probe[0], attention_mask=probe[1], labels=probe[2]).loss)

        before = probe_loss()
        opt = torch.optim.AdamW(list(gates.values()), lr=lr)
        warm = max(1, round(warmup * steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        losses = []
        batches = _batches(texts, batch_size, seed)
        for _ in range(steps):
            ids, mask, labels = _encode(tokenizer, next(batches), device, max_length)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        after = probe_loss()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    summary = {"loss_before": before, "loss_after": after, "loss_first_step": losses[0] if losses else before}
    summary["loss_last_step"] = losses[-1] if losses else after
    return {m: v.detach().cpu() for m, v in gates.items()}, summary


@torch.no_grad()
def mean_activations(
    model: torch.nn.Module,
    tokenizer,
    modules: list[str],
    texts: list[str],
    batch_size: int = 8,
    max_length: int | None = 512,
) -> dict[str, torch.Tensor]:
    """Mean input of each named module over all (non-padding) tokens of ``texts``."""
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    mask_now: list[torch.Tensor] = []

    def hook(name):
        def record(_module, inputs):
            x = inputs[0].float()
            m = mask_now[0].to(x.dtype).unsqueeze(-1)
            s = (x * m).reshape(-1, x.shape[-1]).sum(0)
            sums[name] = sums[name] + s if name in sums else s

        return record

    handles = [model.get_submodule(m).register_forward_pre_hook(hook(m)) for m in modules]
    count = 0
    try:
        for i in range(0, len(texts), batch_size):
            ids, mask, _ = _encode(tokenizer, texts[i : i + batch_size], device, max_length)
            mask_now[:] = [mask]
            model(input_ids=ids, attention_mask=mask)
            count += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    return {m: (s / count).cpu() for m, s in sums.items()}


class PhatgooseRouter(TokenwiseRouter):
    """Token-level router with post-hoc trained gate vectors (PHATGOOSE); top-k = 2 by default."""

    name = "phatgoose"
    gate = "phatgoose"

    def __init__(
        self,
        top_k: int = 2,
        steps: int = 100,
        lr: float = 5e-3,
        batch_size: int = 8,
        warmup: float = 0.06,
        max_length: int | None = 512,
        max_examples: int | None = None,
        seed: int = 0,
    ):
        super().__init__(top_k=top_k)
        self.steps, self.lr, self.batch_size, self.warmup = steps, lr, batch_size, warmup
        self.max_length, self.max_examples, self.seed = max_length, max_examples, seed

    def fit_expert(self, expert: ExpertInfo) -> Artifact:
        require_adapter(expert)
        model, tokenizer = load_base(str(expert.base_path))
        texts = training_texts(expert, tokenizer.eos_token, limit=self.max_examples)
        factors = read_lora_factors(expert.adapter_path)
        vectors, summary = train_gates(
            model, tokenizer, factors, texts, self.steps, self.lr, self.batch_size, self.warmup, self.max_length, self.seed
        )
        meta = {k: f"{v:.6f}" for k, v in summary.items()}
        meta.update(steps=str(self.steps), lr=str(self.lr), batch_size=str(self.batch_size), loss="whole sequence")
        return Artifact(tensors=vectors, metadata=meta)


class AverageActivationRouter(TokenwiseRouter):
    """PHATGOOSE's Average-Activation baseline: v_e = mean module input over e's training data."""

    name = "average-activation"
    gate = "average-activation"

    def __init__(self, top_k: int = 2, batch_size: int = 8, max_length: int | None = 512, max_examples: int | None = None):
        super().__init__(top_k=top_k)
        self.batch_size, self.max_length, self.max_examples = batch_size, max_length, max_examples

    def fit_expert(self, expert: ExpertInfo) -> Artifact:
        require_adapter(expert)
        model, tokenizer = load_base(str(expert.base_path))
        texts = training_texts(expert, tokenizer.eos_token, limit=self.max_examples)
        modules = list(read_lora_factors(expert.adapter_path))
        vectors = mean_activations(model, tokenizer, modules, texts, self.batch_size, self.max_length)
        return Artifact(tensors=vectors, metadata={"examples": str(len(texts))})
