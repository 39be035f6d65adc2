"""Tiny real checkpoints for tests: a random Llama base and peft LoRA adapters on it.

They are standard HF / peft folders (config.json + model.safetensors + tokenizer.json;
adapter_config.json + adapter_model.safetensors), built in well under a second, so registry and
engine tests do not wait for a zoo build.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from services.zoo.tokenizer import build_tokenizer

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama_config(hidden_size: int = 64, layers: int = 2) -> LlamaConfig:
    tok = build_tokenizer()
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden_size // 32),
        num_key_value_heads=max(1, hidden_size // 32),
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )


def make_tiny_base(directory: Path, seed: int = 0, hidden_size: int = 64, layers: int = 2) -> Path:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(hidden_size, layers))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)  # safetensors by default
    build_tokenizer().save_pretrained(str(directory))
    return directory


def make_tiny_lora(
    base_dir: Path,
    directory: Path,
    seed: int = 1,
    r: int = 8,
    target_modules: list[str] | None = None,
    scale: float = 0.5,
) -> Path:
    """A LoRA adapter whose B factors are random (peft initialises B to zero, which would make
    the adapter a no-op and hide bugs in how adapters are applied)."""
    base = LlamaForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules or LORA_TARGETS, lora_dropout=0.0)
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    return directory
