"""Which adapters an engine can serve, decided from the adapter's folder before it is loaded.

vLLM serves plain LoRA (any rank up to the engine's ``max_lora_rank``, rsLoRA, rank and alpha
patterns) but not DoRA, LoRA biases, nor adapters that carry whole modules of their own
(``modules_to_save``, but for a classification head): its ``PEFTHelper`` refuses them, and only
when a request first asks for one, long after the registration said yes. The registration paths (``moerge register --serve-config``, the Ray
gateway's ``POST /v1/experts``) and ``VLLMEngine.load_adapter`` ask here instead, and name what
refuses. The hf engine (transformers + peft) serves every kind peft makes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# vLLM's own default is 16; moerge's vllm engine starts with 64 unless the serve config says
DEFAULT_MAX_LORA_RANK = 64


def adapter_rank(config: dict[str, Any]) -> int:
    return max(int(r) for r in [config.get("r", 0), *(config.get("rank_pattern") or {}).values()])


def refusal(engine: str, engine_args: dict[str, Any], adapter_dir: str | Path) -> str | None:
    """Why an engine of kind ``engine`` started with ``engine_args`` cannot serve the adapter in
    ``adapter_dir``, in words naming what refuses; None when it can (or when the folder is no
    readable peft adapter: the registry's own checks say what is wrong with it)."""
    if engine != "vllm":
        return None
    try:
        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    if config.get("use_dora"):
        return "vLLM does not serve DoRA adapters (use_dora); serve this base with the hf engine"
    saved = [m for m in config.get("modules_to_save") or () if m not in ("classifier", "score")]
    if saved:  # vLLM's peft_helper takes a classification head only
        return (
            f"vLLM does not serve adapters with modules_to_save ({', '.join(saved)}); "
            "serve this base with the hf engine"
        )
    if config.get("lora_bias"):
        return "vLLM does not serve LoRA adapters with a bias (lora_bias); serve this base with the hf engine"
    if not engine_args.get("enable_lora", True):
        return "this vllm engine is configured without enable_lora"
    max_rank = int(engine_args.get("max_lora_rank", DEFAULT_MAX_LORA_RANK))
    rank = adapter_rank(config)
    if rank > max_rank:
        return (
            f"its LoRA rank {rank} is above the vllm engine's max_lora_rank {max_rank}; "
            f"set engine_args.max_lora_rank >= {rank} in the serve config"
        )
    return None
