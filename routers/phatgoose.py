"""PHATGOOSE (Muqeeth et al. 2024, r-three/phatgoose) and its Average-Activation baseline.

PHATGOOSE trains, after an expert exists and on that expert's own training data, one gate vector
v ∈ R^{d_in} per LoRA module (initialised to 0) with the forward y = W x + σ(vᵀx) · ΔW x; the base
and the LoRA factors stay frozen and the loss is plain next-token cross-entropy on the *target*
tokens only (reference + EOS; prompt tokens are labelled -100), as the official code's decoder
targets and as the zoo's experts themselves were trained. Official defaults: 100 steps, AdamW
lr 5e-3, constant schedule with 6 % linear warm-up. Deviation: batch 32 without accumulation
(the official effective batch is 32 × 32 = 1024; on 2 CPU cores that is ~30× the time, and
batch 128 measured no better than 32 on the small zoo). At inference the vectors are routing keys
only (see ``composer.molora``).

Average Activation (same code base's baseline): v_e = the mean input of each LoRA module over the
expert's training sequences, read in the expert's own model (base + its LoRA, as the official
code computes them), mean over each sequence's tokens then over at most 1000 sequences (the
official cap); routed exactly like PHATGOOSE.

Stored artifacts carry their ``recipe``; a stored artifact of another recipe is fitted again.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from registry.errors import DefinitionError
from routers.base import Artifact, ExpertInfo
from routers.params import Param
from routers.tokenwise import (
    Gate,
    LoraFactors,
    TokenwiseRouter,
    load_base,
    read_lora_factors,
    require_adapter,
    training_pairs,
)


def _batches(items: list, batch_size: int, seed: int) -> Iterator[list]:
    """Endless shuffled batches (reshuffled every epoch)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(items), generator=gen).tolist()
        for i in range(0, len(order), batch_size):
            yield [items[j] for j in order[i : i + batch_size]]


LOSS_ON = ("auto", "answer", "sequence")


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], device, max_length: int | None, loss_on: str = "auto"):
    """(input_ids, attention_mask, labels, answer_mask) for ``prompt + answer`` rows, right-padded
    (padding at the end leaves every real token's position and context as in an unpadded run).

    ``loss_on="answer"``: labels only on the answer (reference + EOS), the prompt masked to -100 —
    the target tokens the expert was trained to produce (the official code's decoder targets).
    ``loss_on="sequence"``: labels on every token. ``loss_on="auto"``: the answer, except in rows
    whose answer is EOS alone (an expert trained on plain text: a document with no reference),
    which are labelled on every token, as the expert learnt them."""
    if loss_on not in LOSS_ON:
        raise DefinitionError(f"loss_on must be one of {', '.join(LOSS_ON)}, not {loss_on!r}")
    full = tokenizer([p + a for p, a in pairs])["input_ids"]
    prompt = tokenizer([p for p, _ in pairs])["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for ids, p in zip(full, prompt):
        text_row = loss_on == "sequence" or (loss_on == "auto" and len(ids) - len(p) <= 1)  # EOS alone after it
        ids = ids[:max_length] if max_length is not None else ids
        rows.append((ids, min(len(p), len(ids) - 1), text_row))  # at least one answer token stays labelled
    n = max(len(ids) for ids, _, _ in rows)
    input_ids = torch.full((len(rows), n), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    answer = torch.zeros((len(rows), n), dtype=torch.bool)
    for i, (ids, k, text_row) in enumerate(rows):
        t = torch.tensor(ids)
        input_ids[i, : len(ids)] = t
        mask[i, : len(ids)] = 1
        first = 0 if text_row else k
        labels[i, first : len(ids)] = t[first:]
        answer[i, k : len(ids)] = True
    return input_ids.to(device), mask.to(device), labels.to(device), answer.to(device)


def _hook_lora(model: torch.nn.Module, factors: dict[str, LoraFactors], gates: dict[str, torch.Tensor] | None = None):
    """Adds each module's ΔW x to its output (times σ(vᵀx) where ``gates`` are given); returns the
    hook handles. The model itself is not changed."""
    device = next(model.parameters()).device
    on_device = {m: (f.A.to(device), f.B.to(device), f.scale) for m, f in factors.items()}

    def hook(name):
        A, B, scale = on_device[name]
        v = gates[name] if gates is not None else None

        def apply(_module, inputs, out):
            x = inputs[0]
            delta = ((x.float() @ A.T) @ B.T) * scale
            if v is not None:
                delta = torch.sigmoid(x.float() @ v).unsqueeze(-1) * delta
            return out + delta.to(out.dtype)

        return apply

    return [model.get_submodule(m).register_forward_hook(hook(m)) for m in factors]


def train_gates(
    model: torch.nn.Module,
    tokenizer,
    factors: dict[str, LoraFactors],
    pairs: list[tuple[str, str]],
    steps: int = 100,
    lr: float = 5e-3,
    batch_size: int = 32,
    warmup: float = 0.06,
    max_length: int | None = 512,
    seed: int = 0,
    loss_on: str = "auto",
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train PHATGOOSE gate vectors for one expert on its (prompt, answer) pairs; ``model`` is the
    frozen base (it is hooked during training and left exactly as it was). Returns the vectors
    and a loss summary."""
    device = next(model.parameters()).device
    gates = {m: torch.zeros(f.A.shape[1], device=device, requires_grad=True) for m, f in factors.items()}
    handles = _hook_lora(model, factors, gates)
    was_training = model.training
    model.eval()  # no dropout: the base is frozen and deterministic
    try:
        probe = encode_pairs(tokenizer, pairs[:batch_size], device, max_length, loss_on)

        def probe_loss() -> float:
            with torch.no_grad():
                return float(model(input_ids=probe[0], attention_mask=probe[1], labels=probe[2]).loss)

        before = probe_loss()
        opt = torch.optim.AdamW(list(gates.values()), lr=lr, weight_decay=0.0)
        warm = max(1, round(warmup * steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        losses = []
        batches = _batches(pairs, batch_size, seed)
        for _ in range(steps):
            ids, mask, labels, _ = encode_pairs(tokenizer, next(batches), device, max_length, loss_on)
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
    pairs: list[tuple[str, str]],
    batch_size: int = 64,
    max_length: int | None = 512,
    expert: dict[str, LoraFactors] | None = None,
    tokens: str = "all",
) -> dict[str, torch.Tensor]:
    """Mean input of each named module over ``prompt + answer`` sequences: the mean over each
    sequence's tokens, averaged over the sequences (the official code's masked mean per example).
    ``expert``: the LoRA factors to apply while reading (the expert's own model, as the official
    code computes them); None reads the bare base."""
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    weights: list[torch.Tensor] = []

    def hook(name):
        def record(_module, inputs):
            x = inputs[0].float()
            s = torch.einsum("bt,btd->d", weights[0], x)
            sums[name] = sums[name] + s if name in sums else s

        return record

    handles = [model.get_submodule(m).register_forward_pre_hook(hook(m)) for m in modules]
    handles += _hook_lora(model, expert) if expert else []
    count = 0
    try:
        for i in range(0, len(pairs), batch_size):
            ids, mask, _, answer = encode_pairs(tokenizer, pairs[i : i + batch_size], device, max_length)
            if tokens == "all":
                m = mask.float()
            elif tokens == "answer":
                m = answer.float()
            elif tokens == "last":
                m = torch.zeros_like(mask, dtype=torch.float)
                m[torch.arange(len(m)), mask.sum(1) - 1] = 1.0
            else:
                raise DefinitionError(f"tokens must be 'all', 'answer' or 'last', not {tokens!r}")
            weights[:] = [m / m.sum(1, keepdim=True)]
            model(input_ids=ids, attention_mask=mask)
            count += ids.shape[0]
    finally:
        for h in handles:
            h.remove()
    return {m: (s / count).cpu() for m, s in sums.items()}


# s_e = LN(h) · LN(v_e) / √d; σ is not applied at inference (the vectors are routing keys only)
PHATGOOSE = Gate("phatgoose", standardise=True)
# routed exactly like PHATGOOSE, from its own (mean-activation) vectors
AVERAGE_ACTIVATION = Gate("average-activation", standardise=True)


class PhatgooseRouter(TokenwiseRouter):
    """Token-level router with post-hoc trained gate vectors (PHATGOOSE); top-k = 2 by default."""

    name = "phatgoose"
    gate = PHATGOOSE
    needs = frozenset({"placement"})  # fitting runs the base: on the strategy's device, in its dtype
    PARAMS: tuple[Param, ...] = (
        Param("top_k", "int", 2, "experts mixed per token and module", minimum=1),
        Param("steps", "int", 100, "gate training steps per expert", minimum=1, fit=True),
        Param("lr", "float", 5e-3, "gate learning rate", minimum=0, fit=True),
        Param("max_examples", "int", None, "training examples per expert (default: all)", minimum=1, fit=True),
        Param("seed", "int", 0, "gate training seed", fit=True),
    )

    def __init__(
        self,
        top_k: int = 2,
        steps: int = 100,
        lr: float = 5e-3,
        batch_size: int = 32,
        warmup: float = 0.06,
        max_length: int | None = 512,
        max_examples: int | None = None,
        seed: int = 0,
        loss_on: str = "auto",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__(top_k=top_k, device=device, dtype=dtype)
        self.steps, self.lr, self.batch_size, self.warmup = steps, lr, batch_size, warmup
        self.max_length, self.max_examples, self.seed, self.loss_on = max_length, max_examples, seed, loss_on

    @property
    def recipe(self) -> str:
        return f"gates/loss={self.loss_on}/steps={self.steps}/lr={self.lr}/batch={self.batch_size}/warmup={self.warmup}"

    def accepts_artifact(self, artifact: Artifact) -> bool:
        return artifact.metadata.get("recipe") == self.recipe

    def fit_expert(self, expert: ExpertInfo) -> Artifact:
        adapter = require_adapter(expert)
        model, tokenizer = load_base(str(expert.base_path), expert.base_trust_remote_code, self.device, self.dtype)
        pairs = training_pairs(expert, tokenizer.eos_token, limit=self.max_examples)
        factors = read_lora_factors(adapter)
        vectors, summary = train_gates(
            model,
            tokenizer,
            factors,
            pairs,
            self.steps,
            self.lr,
            self.batch_size,
            self.warmup,
            self.max_length,
            self.seed,
            self.loss_on,
        )
        meta = {k: f"{v:.6f}" for k, v in summary.items()}
        meta.update(
            steps=str(self.steps),
            lr=str(self.lr),
            batch_size=str(self.batch_size),
            loss=self.loss_on,
            recipe=self.recipe,
        )
        return Artifact(tensors=vectors, metadata=meta)


class AverageActivationRouter(TokenwiseRouter):
    """PHATGOOSE's Average-Activation baseline: v_e = mean module input over e's training data,
    read in e's own model (base + e's LoRA)."""

    name = "average-activation"
    gate = AVERAGE_ACTIVATION
    needs = frozenset({"placement"})
    PARAMS: tuple[Param, ...] = (
        Param("top_k", "int", 2, "experts mixed per token and module", minimum=1),
        Param("max_examples", "int", 1000, "examples averaged per expert", minimum=1, fit=True),
        Param("with_expert", "bool", True, "read activations in the expert's own model (else the base's)", fit=True),
        Param("tokens", "str", "all", "which tokens are averaged", choices=("all", "answer", "last"), fit=True),
    )

    def __init__(
        self,
        top_k: int = 2,
        batch_size: int = 64,
        max_length: int | None = 512,
        max_examples: int | None = 1000,
        with_expert: bool = True,
        tokens: str = "all",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__(top_k=top_k, device=device, dtype=dtype)
        self.batch_size, self.max_length, self.max_examples = batch_size, max_length, max_examples
        self.with_expert, self.tokens = with_expert, tokens

    @property
    def recipe(self) -> str:
        return f"mean/{'expert' if self.with_expert else 'base'}/tokens={self.tokens}/examples={self.max_examples}"

    def accepts_artifact(self, artifact: Artifact) -> bool:
        return artifact.metadata.get("recipe") == self.recipe

    def fit_expert(self, expert: ExpertInfo) -> Artifact:
        adapter = require_adapter(expert)
        model, tokenizer = load_base(str(expert.base_path), expert.base_trust_remote_code, self.device, self.dtype)
        pairs = training_pairs(expert, tokenizer.eos_token, limit=self.max_examples)
        factors = read_lora_factors(adapter)
        vectors = mean_activations(
            model,
            tokenizer,
            list(factors),
            pairs,
            self.batch_size,
            self.max_length,
            expert=factors if self.with_expert else None,
            tokens=self.tokens,
        )
        return Artifact(tensors=vectors, metadata={"examples": str(len(pairs)), "recipe": self.recipe})
