"""Greedy evaluation of zoo models on the skill suite (exact match).

``generate_greedy`` is the one place that generates; a serving engine replaces it later.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from services.zoo.skills import Example, exact_match


@torch.inference_mode()
def generate_greedy(
    model, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 128
) -> list[str]:
    """Greedy completions, batched with left padding, stopping at EOS."""
    model.eval()
    tokenizer.padding_side = "left"
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def accuracy_by_task(model, tokenizer, examples: Sequence[Example], batch_size: int = 128) -> dict[str, float]:
    """Exact-match accuracy per task; prompts are grouped by task so each batch decodes only as
    many tokens as that task's longest reference needs."""
    by_task: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        by_task[e.task].append(e)
    acc = {}
    for task, exs in by_task.items():
        longest = max(len(tokenizer(e.reference, add_special_tokens=False)["input_ids"]) for e in exs)
        preds = generate_greedy(model, tokenizer, [e.prompt for e in exs], longest + 2, batch_size)
        acc[task] = sum(exact_match(p, e.reference) for p, e in zip(preds, exs)) / len(exs)
    return acc
