"""Where a result was computed: the CPU, the instruction set the numerics ran with, the versions.

Float32 sums run in another order on a CPU with another instruction set (AVX-512, AVX2, none), so
a trained model or a measured number is only reproducible with this record beside it.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata

# Packages whose numerics or formats shape a trained zoo and its scores.
PACKAGES = ("torch", "transformers", "peft", "tokenizers", "safetensors", "numpy", "numba")
# The settings that hold torch, oneDNN, MKL and numba to a lower instruction set than the CPU's.
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "NUMBA_CPU_NAME")
_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.machine())


def cpu_flags() -> list[str]:
    """The vector-unit flags of the CPU that matter for float32 kernels (Linux only)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return []
    return [f for f in _FLAGS if f in flags]


def machine_record() -> dict:
    """A JSON-ready description of this process's machine and numerics."""
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_flags": cpu_flags(),
        # what torch's own kernels dispatch to in this process (lowered by ATEN_CPU_CAPABILITY)
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_settings": {k: os.environ[k] for k in ISA_VARIABLES if k in os.environ},
        "python": platform.python_version(),
        "packages": versions,
    }


def describe(record: dict) -> str:
    """One line for a table caption or a log."""
    isa = record.get("torch_cpu_capability", "?")
    settings = ", ".join(f"{k}={v}" for k, v in record.get("isa_settings", {}).items())
    return f"{record.get('cpu', '?')}, {record.get('cores', '?')} cores, torch kernels {isa}" + (
        f" ({settings})" if settings else ""
    )
