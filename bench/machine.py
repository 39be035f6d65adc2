"""What every benchmark prints about where it ran: the CPU, cores, torch threads, load."""

from __future__ import annotations

import os
import platform

import torch

from services.machine import cpu_model


def machine() -> str:
    cpu = cpu_model()
    cores = len(os.sched_getaffinity(0))
    return (
        f"{cpu}, {cores} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"python {platform.python_version()}"
    )


def load() -> str:
    """The 1, 5 and 15 minute load averages: a shared machine slows every timing."""
    return "/".join(f"{x:.1f}" for x in os.getloadavg())
