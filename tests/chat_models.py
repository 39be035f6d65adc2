"""Tiny real chat models for tests, in the shape people download them: a random Qwen2 (GQA, tied
embeddings) with a byte-level BPE tokenizer trained here on local text, a Qwen-style chat
template, and a ``generation_config.json`` whose eos list holds both ``<|im_end|>`` and
``<|endoftext|>``, as Qwen2.5-Instruct's does. Built in about a second, offline.

The models are random, so tests drive the cases they need through the request itself
(``logit_bias`` to make a given token come next, ``ignore_eos`` to run on).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# Qwen2.5-Instruct's template, shortened: a default system turn when the conversation has none
QWEN_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


# Mistral-Instruct's: BOS once, [INST] … [/INST] per user turn, the system prompt before the
# last user turn's text, EOS after each assistant turn
MISTRAL_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set system = none %}"
    "{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system is not none %}{{- '[INST] ' + system + '\n\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles after an optional system message') }}"
    "{%- endif %}{%- endfor %}"
)


# The BPE is trained on this fixed text, not on files of the repository: the same bytes on every
# machine and at every commit, so the test models (and what their greedy answers are) never move.
_WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an have not "
    "model expert adapter router token answer question system user assistant chat template "
    "colour fruit river number tree bird apple blue green red yellow orange water stone"
).split()
_CODE = [
    "def add(a, b):",
    "    return a + b",
    "for i in range(10):",
    "    print(i * 2)",
    "import json",
    "data = json.loads(text)",
    "if x is None:",
    "    raise ValueError('no value')",
    "class Model:",
    "    def __init__(self, name):",
    "        self.name = name",
]


def _corpus() -> list[str]:
    import random

    rng = random.Random(0)
    prose = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 14))).capitalize() + "." for _ in range(400)]
    return prose + ["\n".join(rng.sample(_CODE, 5)) for _ in range(100)]


def make_bpe_tokenizer(chat_template: str | None = QWEN_TEMPLATE, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(), trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=IM_END, pad_token=ENDOFTEXT, additional_special_tokens=[IM_START]
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def make_qwen_chat_model(
    directory: Path, seed: int = 0, chat_template: str | None = QWEN_TEMPLATE, eos_list: bool = True
) -> Path:
    """A Qwen2-architecture chat model folder: config, weights, tokenizer with its template,
    generation_config.json (eos ``[<|im_end|>, <|endoftext|>]`` when ``eos_list``)."""
    tok = make_bpe_tokenizer(chat_template)
    im_end, endoftext = tok.convert_tokens_to_ids([IM_END, ENDOFTEXT])
    config = Qwen2Config(
        # head_dim 32: the smallest vLLM's CPU attention kernels take
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=im_end,
        pad_token_id=endoftext,
        initializer_range=0.2,  # peaked logits: a random model that does not repeat one token forever
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tok.save_pretrained(str(directory))
    eos = [im_end, endoftext] if eos_list else im_end
    # sampling defaults as Qwen2.5-Instruct ships them (its repetition_penalty is 1.05; 1.2 here, so
    # that applying it changes this model's greedy answer): moerge's engines must not apply them
    GenerationConfig(
        eos_token_id=eos,
        pad_token_id=endoftext,
        bos_token_id=None,
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        repetition_penalty=1.2,
    ).save_pretrained(directory)
    return directory


def token_id(directory: Path, token: str) -> int:
    vocab = json.loads((Path(directory) / "tokenizer.json").read_text())["model"]["vocab"]
    added = {
        t["content"]: t["id"] for t in json.loads((Path(directory) / "tokenizer.json").read_text())["added_tokens"]
    }
    return added.get(token, vocab.get(token))


def make_chat_lora(base_dir: Path, directory: Path, seed: int = 1, scale: float = 0.3, **lora_kwargs) -> Path:
    """A peft adapter on ``base_dir`` with random (non-zero) weights; ``lora_kwargs`` go to
    ``LoraConfig`` (``use_dora``, ``rank_pattern``, ``use_rslora``, ``modules_to_save``, …)."""
    from peft import LoraConfig, get_peft_model

    base = Qwen2ForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(
        **{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0, **lora_kwargs}
    )
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # A, B and DoRA's magnitude: all away from their no-op init
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    return directory


def make_mistral_chat_model(directory: Path, seed: int = 0) -> Path:
    """A Mistral-architecture instruct model folder: sliding-window attention, BOS <s>, EOS </s>,
    the Mistral template; generation_config's eos is </s> alone (an int, as Mistral ships it)."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = MISTRAL_TEMPLATE
    bos, eos = tok.convert_tokens_to_ids(["<s>", "</s>"])
    config = MistralConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        sliding_window=128,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = MistralForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tok.save_pretrained(str(directory))
    GenerationConfig(bos_token_id=bos, eos_token_id=eos).save_pretrained(directory)
    return directory


# A model that ships its own modelling code, as some hub models do: transformers runs it only with
# trust_remote_code. It subclasses Qwen2, so Qwen2 adapters load on it.
_REMOTE_CODE = """from transformers import Qwen2Config, Qwen2ForCausalLM


class CustomQwen2Config(Qwen2Config):
    model_type = "custom_qwen2"


class CustomQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = CustomQwen2Config
"""


def make_remote_code_model(chat_model: Path, directory: Path) -> Path:
    """``chat_model``'s folder with its own modelling code (``auto_map``, a ``model_type``
    transformers does not know): it loads only with ``trust_remote_code=True``."""
    import shutil

    directory = Path(shutil.copytree(chat_model, directory))
    (directory / "modeling_custom.py").write_text(_REMOTE_CODE)
    config = json.loads((directory / "config.json").read_text())
    config.update(
        model_type="custom_qwen2",
        architectures=["CustomQwen2ForCausalLM"],
        auto_map={
            "AutoConfig": "modeling_custom.CustomQwen2Config",
            "AutoModelForCausalLM": "modeling_custom.CustomQwen2ForCausalLM",
        },
    )
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


# An instruction-tuned adapter's template: the base's, with another default system turn
ADAPTER_TEMPLATE = QWEN_TEMPLATE.replace("You are a helpful assistant.", "You are a tuned expert.")


def with_own_tokenizer(
    adapter: Path, base_dir: Path, directory: Path, chat_template: str = ADAPTER_TEMPLATE, eos_token: str | None = None
) -> Path:
    """A copy of ``adapter`` with a tokenizer saved beside it, as a Trainer saves one: the base's
    vocabulary, with ``chat_template`` (and ``eos_token``) of its own."""
    import shutil

    from transformers import AutoTokenizer

    directory = Path(shutil.copytree(adapter, directory))
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.chat_template = chat_template
    if eos_token is not None:
        tok.eos_token = eos_token
    tok.save_pretrained(str(directory))
    return directory


def make_lora_with_added_tokens(base_dir: Path, directory: Path, tokens: tuple[str, ...] = ("<tool_call>",)) -> Path:
    """An adapter trained with tokens added to the tokenizer, the way peft's docs show it: the
    embeddings resized, then saved whole (``modules_to_save``), the larger tokenizer beside it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.add_tokens(list(tokens), special_tokens=True)
    base = Qwen2ForCausalLM.from_pretrained(base_dir)
    base.resize_token_embeddings(len(tok))
    model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens"])
    )
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tok.save_pretrained(str(directory))
    return directory
