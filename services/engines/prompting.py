"""From a request to the token ids a model sees, and the tokens that end its answer.

Both local engines (hf, vllm) go through here, so the same request gives the same prompt ids and
the same end tokens on either, as transformers and vLLM themselves define them:

- A chat (``GenerateRequest.messages``) is rendered by the target tokenizer's own chat template
  (``apply_chat_template(..., add_generation_prompt=True)``; a final assistant turn is continued
  with ``continue_final_message``) and tokenised without adding special tokens, because the
  template writes them itself (what ``apply_chat_template(tokenize=True)`` and vLLM's chat do).
  A tokenizer without a template gets ``prompt``: the last user turn, raw. An adapter that ships a
  tokenizer of its own (its template, its EOS; the base's vocabulary) is rendered with that one.
- A completion prompt is tokenised as ``tokenizer(prompt)`` does (BOS where the tokenizer adds one).
- The end tokens are every ``eos_token_id`` of the model's generation_config (an int or a list:
  Qwen and Llama 3 chat models end turns with a token that is not the tokenizer's EOS) and the
  tokenizer's own EOS, which is what vLLM stops on too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from composer.engine_protocol import (
    ChatTemplateError,
    ContextLengthError,
    EngineError,
    GenerateRequest,
    PromptRule,
    RequestError,
    ScoreRequest,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def ships_tokenizer(folder: str | Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(folder: str | Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:  # explicit either way: left unset, transformers asks on stdin whether to run its code
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise EngineError(f"no usable tokenizer in {folder}: {exc}") from exc


def adapter_tokenizer(folder: str | Path, base_tokenizer: Any) -> Any | None:
    """The tokenizer an adapter folder ships, where it renders prompts or ends turns otherwise than
    its base's (a chat template of its own, another EOS); None where it ships none or the same one.
    A Trainer saves the tokenizer beside every checkpoint, and an instruction-tuned adapter of a
    plain base brings the template it was trained with. The vocabulary must be the base's: the
    adapter runs on its base's embeddings (registration refuses the others, naming why)."""
    if not ships_tokenizer(folder):
        return None
    own = load_tokenizer(folder)
    if len(own) != len(base_tokenizer):
        raise EngineError(
            f"the tokenizer in adapter folder {folder} has {len(own)} tokens, its base's "
            f"{len(base_tokenizer)}: an adapter runs on its base's vocabulary"
        )
    return None if _rendering(own) == _rendering(base_tokenizer) else own


def _rendering(tokenizer: Any) -> tuple:
    """What decides the prompt ids and the end of an answer: the template, the special tokens, and
    whether the tokenizer adds BOS/EOS to a plain prompt."""
    return (tokenizer.chat_template, tokenizer.bos_token_id, tokenizer.eos_token_id, tuple(tokenizer("a")["input_ids"]))


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer: Any, request: GenerateRequest) -> tuple[list[int], PromptRule]:
    """The prompt's token ids and the rule that made them."""
    if request.messages and has_chat_template(tokenizer):
        messages = [{"role": role, "content": content} for role, content in request.messages]
        prefill = messages[-1]["role"] == "assistant"
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=not prefill, continue_final_message=prefill
            )
        except Exception as exc:  # jinja2's TemplateError, or a template's own raise_exception
            raise ChatTemplateError(f"the model's chat template refuses these messages: {exc}", "messages") from exc
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]), "chat_template"
    if request.messages and not any(role == "user" for role, _ in request.messages):
        raise RequestError(
            "messages holds no user message, and this model has no chat template to render "
            "the others with (its prompt is the last user message)",
            "messages",
        )
    rule: PromptRule = "last_user_message" if request.messages else "raw"
    return list(tokenizer(request.prompt)["input_ids"]), rule


def end_token_ids(tokenizer: Any, generation_config: Any = None) -> tuple[int, ...]:
    """The model's own end tokens: generation_config's ``eos_token_id`` (int or list) and the
    tokenizer's EOS, in that order, without repeats."""
    found: list[int] = []
    configured = getattr(generation_config, "eos_token_id", None)
    for token in [*_ids(configured), *_ids(getattr(tokenizer, "eos_token_id", None))]:
        if token not in found:
            found.append(token)
    return tuple(found)


def stop_ids(request: GenerateRequest, ends: tuple[int, ...]) -> frozenset[int]:
    """What ends this request's answer: the model's end tokens (unless ``ignore_eos``) and its own
    ``stop_token_ids``."""
    return frozenset(request.stop_token_ids) | (frozenset() if request.ignore_eos else frozenset(ends))


def check_context(prompt_tokens: int, request: GenerateRequest, context: int | None) -> None:
    """A prompt that cannot fit with the tokens asked for is refused, as vLLM's server does."""
    if context and prompt_tokens + request.max_new_tokens > context:
        raise ContextLengthError(
            f"this model's context is {context} tokens; the prompt has {prompt_tokens} and "
            f"{request.max_new_tokens} more were asked for (max_tokens). Shorten the prompt or ask for fewer.",
            "messages" if request.messages else "prompt",
        )


def check_score_context(tokens: int, context: int | None) -> None:
    """A score request whose context and continuation together do not fit one pass is refused
    (cut a long text first: ``services.moe.texts.fitting_prefix``)."""
    if context and tokens > context:
        raise ContextLengthError(
            f"this model scores at most {context} tokens in one pass; the text to score has {tokens}. Cut it to fit.",
            "continuation",
        )


def check_logit_bias(request: GenerateRequest, vocab_size: int) -> None:
    bad = [t for t, _ in request.logit_bias if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(
            f"logit_bias names token ids outside this model's vocabulary of {vocab_size}: "
            f"{', '.join(map(str, bad[:5]))}",
            "logit_bias",
        )


def context_length(config: Any) -> int | None:
    """The model's context in tokens, from its config (what vLLM takes as max_model_len)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _ids(value: Any) -> Iterable[int]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def score_tokens(tokenizer: Any, request: ScoreRequest) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """A score request's context and continuation ids, tokenized apart (``ScoreRequest``'s rule),
    and the continuation tokens' character offsets when the request asks for them. An empty
    context is the BOS token, else the EOS token (GPT-2 style models separate documents with it)."""
    context = list(tokenizer(request.prompt)["input_ids"])
    if not context:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise EngineError("score: the prompt is empty and the tokenizer has neither a BOS nor an EOS token")
        context = [start]
    enc = tokenizer(request.continuation, add_special_tokens=False, return_offsets_mapping=request.offsets)
    continuation = list(enc["input_ids"])
    if not continuation:
        raise EngineError(f"score: the continuation {request.continuation!r} has no tokens")
    offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"]] if request.offsets else []
    return context, continuation, offsets
