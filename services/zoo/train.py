"""Training for the zoo: pre-train a small Llama base, fine-tune LoRA and full-model experts.

Everything runs on the CPU in minutes. The base learns the prompt format and the vocabulary from
generic tasks and random text (``skills.GENERIC_TASKS``, ``skills.random_text``); experts learn one
skill (LoRA) or one domain (full fine-tune) from ``skills.make_split("train", …)`` with the loss on
the answer and the EOS token only.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from services.zoo.skills import generic_example, random_text

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORE = -100


@dataclass(frozen=True)
class TrainSpec:
    steps: int  # one learning-rate cycle; with ``check_every`` training stops earlier once good enough
    lr: float
    batch_size: int = 64
    warmup: int = 20
    weight_decay: float = 0.0
    check_every: int = 0  # evaluate the stop condition every N steps (0: never, run all steps)
    min_steps: int = 0
    # >1: draw this many batches' rows at a time, sort them by length and cut them into batches
    # (in random order), so a batch pads little; 0 or 1: plain random batches
    sort_chunk: int = 0
    # the budget: a run whose check still fails after ``steps`` goes on, up to this many steps in
    # all (0: ``steps``): with a new try from fresh weights where the caller can give them
    # (``train_loop``'s ``fresh_start``), else with a new cosine cycle (a warm restart at half the
    # last peak). Float32 sums run in another order on another CPU, so the same seed needs more
    # steps on one machine than on another: the check decides when a model is done, the budget
    # only bounds the time.
    max_steps: int = 0
    # after the check passes, this many more steps with the rate falling linearly to 0, then stop:
    # a run stopped at its first passing check stops near the peak rate, where one check's
    # verdict says little (measured: dashes at 40/40 on validation, 88% on test)
    cooldown: int = 0
    # "cosine": warm-up, then cosine cycles (above); "constant": warm-up, then the peak rate until
    # the check passes, then the cool-down (warmup-stable-decay). A run that stops at a check has no
    # step count to aim a cosine at: the small base learns to copy after ~600 to ~1,600 steps,
    # depending on the seed and the CPU (docs/zoo.md)
    schedule: str = "cosine"

    @property
    def budget(self) -> int:
        return max(self.steps, self.max_steps)


def llama_config(
    tok: PreTrainedTokenizerFast, hidden: int, layers: int, head_dim: int = 32, intermediate: int | None = None
) -> LlamaConfig:
    heads = hidden // head_dim
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=head_dim,
        max_position_embeddings=256,
        rope_theta=10000.0,  # type: ignore[call-arg]  # read from kwargs into rope_parameters
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )


# --------------------------------------------------------------------------------------------
# Data: (ids, labels) pairs, padded per batch
# --------------------------------------------------------------------------------------------


def encode_pairs(tok: PreTrainedTokenizerFast, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """``prompt + answer + EOS`` with labels on the answer and EOS only. No BOS: the prompt is
    tokenised exactly as ``tokenizer(prompt)`` does at inference, on every engine."""
    prompts = tok([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    answers = tok([a for _, a in pairs], add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    return [(p + a + [eos], [IGNORE] * len(p) + a + [eos]) for p, a in zip(prompts, answers)]


def encode_texts(tok: PreTrainedTokenizerFast, texts: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """Plain language modelling: every token is a target."""
    ids = tok(list(texts), add_special_tokens=False)["input_ids"]
    return [(x + [tok.eos_token_id], x + [tok.eos_token_id]) for x in ids]


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    n = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):  # right padding for training; RoPE makes it equivalent
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def train_loop(
    model: torch.nn.Module,
    rows: Sequence[tuple[list[int], list[int]]],
    spec: TrainSpec,
    pad_id: int,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
    good_enough: Callable[[], bool] | None = None,
    stats: dict | None = None,
    fresh_start: Callable[[int], None] | None = None,
) -> list[float]:
    """AdamW with linear warm-up and cosine decay over random mini-batches of ``rows``.

    With ``good_enough`` and ``spec.check_every``, training stops at the first check (after
    ``spec.min_steps``) where it returns True: skills differ a lot in how many steps they need,
    and a validation check spends the CPU budget where it is needed. A run that has not passed by
    ``spec.steps`` restarts the cosine cycle and goes on, up to ``spec.budget`` steps. With
    ``fresh_start``, it starts a new try instead: ``fresh_start(k)`` sets the trainable weights
    afresh for try k (1, 2, …), the optimizer forgets its moments, the rows come in another order,
    and the schedule starts over at its peak: a run stuck under its check from one start often
    passes from another within one cycle, where warm restarts stayed stuck (docs/zoo.md).
    ``stats``, when given, gets the steps run, the tries, whether the last check passed, the
    seconds spent and the number and cost of the checks."""
    t_start = time.perf_counter()
    checks, check_s = 0, 0.0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98))

    cycle = max(1, spec.steps - spec.warmup)

    tries = [0, 0]  # [the try (0: the first), the step it started at]

    def lr_at(step: int) -> float:
        step -= tries[1]
        if step < spec.warmup:
            return (step + 1) / spec.warmup
        if spec.schedule == "constant":
            return 1.0
        restarts, pos = divmod(step - spec.warmup, cycle)
        # each restart peaks at half the last one: a restart at the full rate threw away what the
        # run had learnt (measured: caesar's validation 0.79 -> 0.39 within 30 steps of a restart)
        return 0.5**restarts * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * pos / cycle)))

    cool: list[float] = []  # [the step the cool-down started, its starting factor] once a check passed

    def factor(step: int) -> float:
        if cool:
            return cool[1] * max(0.0, 1 - (step - cool[0]) / spec.cooldown)
        return lr_at(step)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    rng = random.Random(seed)
    model.train()
    losses = []
    order: list[int] = []
    pending: list[list[int]] = []  # batches drawn but not run yet
    bs, chunk = spec.batch_size, max(1, spec.sort_chunk)
    passed = None  # the last check's verdict (None: no check ran)
    for step in range(spec.budget if good_enough and spec.check_every else spec.steps):
        if not pending:
            if len(order) < bs:  # epochs without replacement
                order = list(range(len(rows)))
                rng.shuffle(order)
            n = min(len(order), bs * chunk)
            take = [order.pop() for _ in range(n - n % bs if n >= bs else n)]
            if chunk > 1:
                take.sort(key=lambda i: len(rows[i][0]))
            pending = [take[i : i + bs] for i in range(0, len(take), bs)]
            if chunk > 1:
                rng.shuffle(pending)
            pending.reverse()  # pop() takes them in order
        batch = collate([rows[i] for i in pending.pop()], pad_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step:
            on_step(step, losses[-1])
        done = step + 1
        if cool:
            if done - cool[0] >= spec.cooldown:
                break
            continue
        if good_enough and spec.check_every and done - tries[1] >= spec.min_steps and done % spec.check_every == 0:
            model.eval()
            t0 = time.perf_counter()
            passed = good_enough()
            checks, check_s = checks + 1, check_s + time.perf_counter() - t0
            if passed:
                if spec.cooldown <= 0:
                    break
                cool[:] = [done, factor(done)]
            elif fresh_start is not None and done - tries[1] >= spec.steps and done < spec.budget:
                tries[:] = [tries[0] + 1, done]
                fresh_start(tries[0])
                opt.state.clear()  # AdamW's moments and step counts start again with the weights
                rng, order, pending = random.Random(f"{seed}:try{tries[0]}"), [], []
            model.train()
    model.eval()
    if stats is not None:
        stats.update(
            steps=len(losses),
            tries=tries[0] + 1,
            passed=passed,
            seconds=round(time.perf_counter() - t_start, 1),
            checks=checks,
            check_seconds=round(check_s, 1),
            final_loss=round(losses[-1], 4) if losses else None,
        )
    return losses


def pretrain_base(
    tok: PreTrainedTokenizerFast,
    config: LlamaConfig,
    spec: TrainSpec,
    seed: int = 0,
    text_fraction: float = 0.2,
    on_step: Callable[[int, float], None] | None = None,
    stats: dict | None = None,
    good_enough: Callable[[torch.nn.Module], bool] | None = None,
) -> tuple[LlamaForCausalLM, list[float]]:
    """A base that knows the prompt format and emits every character, but none of the skills.
    With ``good_enough`` (and ``spec.check_every``) it trains until that check passes, within
    ``spec.budget`` steps."""
    torch.manual_seed(seed)
    rng = random.Random(f"{seed}:pretrain")
    n = (spec.budget if good_enough and spec.check_every else spec.steps) * spec.batch_size
    n_text = int(n * text_fraction)
    rows = encode_pairs(tok, [generic_example(rng) for _ in range(n - n_text)])
    if n_text:
        rows += encode_texts(tok, [random_text(rng) for _ in range(n_text)])
    model = LlamaForCausalLM(config)
    check = (lambda: good_enough(model)) if good_enough else None
    losses = train_loop(model, rows, spec, tok.pad_token_id, seed, on_step, check, stats)
    return model, losses


def lora_config(r: int, alpha: int) -> LoraConfig:
    return LoraConfig(
        r=r, lora_alpha=alpha, target_modules=LORA_TARGETS, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"
    )


def train_lora(
    base: LlamaForCausalLM,
    tok: PreTrainedTokenizerFast,
    pairs: Sequence[tuple[str, str]],
    spec: TrainSpec,
    r: int,
    alpha: int,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
    good_enough: Callable[[torch.nn.Module], bool] | None = None,
    stats: dict | None = None,
    rows: Sequence[tuple[list[int], list[int]]] | None = None,
) -> tuple[PeftModel, list[float]]:
    """A LoRA on ``base`` (which it wraps in place: pass a fresh copy per expert), trained on
    ``pairs`` (loss on the answers), or on ``rows`` of (ids, labels) already encoded."""
    torch.manual_seed(seed)
    model = get_peft_model(base, lora_config(r, alpha))
    check = (lambda: good_enough(model)) if good_enough else None
    losses = train_loop(
        model,
        encode_pairs(tok, pairs) if rows is None else rows,
        spec,
        tok.pad_token_id,
        seed,
        on_step,
        check,
        stats,
        fresh_start=lambda k: reset_lora(model, seed + 1000 * k),
    )
    return model, losses


@torch.no_grad()
def reset_lora(model: PeftModel, seed: int) -> None:
    """peft's own initialisation of every LoRA layer again, A drawn from ``seed`` and B = 0: the
    adapter is a no-op once more (a fresh try of ``train_loop``)."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.active_adapters:
                module.reset_lora_parameters(name, True)


def train_full(
    base: LlamaForCausalLM,
    tok: PreTrainedTokenizerFast,
    pairs: Sequence[tuple[str, str]],
    spec: TrainSpec,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
    good_enough: Callable[[torch.nn.Module], bool] | None = None,
    stats: dict | None = None,
    rows: Sequence[tuple[list[int], list[int]]] | None = None,
) -> tuple[LlamaForCausalLM, list[float]]:
    """Every weight of ``base`` (in place), on ``pairs`` or on ``rows``, as ``train_lora``."""
    torch.manual_seed(seed)
    check = (lambda: good_enough(base)) if good_enough else None
    start = {name: p.detach().clone() for name, p in base.named_parameters()}

    @torch.no_grad()
    def fresh_start(k: int) -> None:  # the base's weights again; the rows come in another order
        for name, p in base.named_parameters():
            p.copy_(start[name])

    losses = train_loop(
        base,
        encode_pairs(tok, pairs) if rows is None else rows,
        spec,
        tok.pad_token_id,
        seed,
        on_step,
        check,
        stats,
        fresh_start,
    )
    return base, losses
