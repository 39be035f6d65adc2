"""A byte-level BPE tokenizer trained by the build, in the shape real chat models ship theirs.

The domains zoo needs a vocabulary where a domain's frequent strings (``def ``, ``": "``, ``$ ``,
`` = ``) are tokens of their own, as in Llama's or Qwen's tokenizers, and not the skills zoo's one
token per character. Trained with ``tokenizers`` on the zoo's own training text, so every machine
builds the same vocabulary from the same bytes; saved as a standard ``tokenizer.json`` with a
ChatML template that ``apply_chat_template``, vLLM and moerge's engines read like any other.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|begin_of_text|>", "<|endoftext|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]

# ChatML, as Qwen2.5-Instruct's template without its tools branch
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE of ``vocab_size`` tokens (the 256 bytes, the special tokens and the
    merges learnt from ``texts``), GPT-2's pre-tokenizer, no prefix space; ``tokenizer(text)`` puts
    BOS first, as Llama's do."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    # BOS before every text, as Llama's tokenizers add it: the first real token is predicted too
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, core.token_to_id(BOS))]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="left"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
