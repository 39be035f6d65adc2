"""Where and in what precision a model runs: ``device`` and ``dtype``, each ``"auto"`` by default.

``auto`` is what users of transformers and vLLM expect: the GPU when there is one, in bfloat16
where it supports that (else float16), and the CPU in float32 otherwise. Names are torch's
(``"cuda:1"``, ``"bfloat16"``, ``"float16"``, ``"float32"``), as the serve config's ``engine_args``
and the CLI's ``--device`` / ``--dtype`` give them.
"""

from __future__ import annotations

import torch

from composer.engine_protocol import EngineError

DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise EngineError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, auto)") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {device!r} was asked for, but this machine has no CUDA device")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None = "auto", device: torch.device | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        device = device or resolve_device()
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    key = str(dtype).removeprefix("torch.")
    if key not in DTYPES:
        raise EngineError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[key]
