"""``--device`` and ``--dtype``, one wording for every command that loads models."""

from __future__ import annotations

import typer

DEVICE_HELP = "cpu, cuda, cuda:N, or auto (CUDA when present)."
DTYPE_HELP = "float32, bfloat16, float16, or auto (bfloat16 on CUDA, else float32)."


def device_option() -> str:
    return typer.Option("auto", "--device", help=DEVICE_HELP)


def dtype_option() -> str:
    return typer.Option("auto", "--dtype", help=DTYPE_HELP)
