"""The small zoo's experts as routers see them, without building the zoo.

A build with a given seed registers each skill's LoRA and the domain-math model with train and
validation prompts that ``services.zoo.build`` derives from that seed alone, so the routing
benchmarks rebuild the same ``ExpertInfo`` records here (no weights, no registry).
"""

from __future__ import annotations

from routers.base import ExpertExample, ExpertInfo
from services.zoo import build as zoo_build
from services.zoo.skills import SKILLS


def zoo_experts(seed: int, max_examples: int = 200) -> list[ExpertInfo]:
    """Each expert's name, its first ``max_examples`` train prompts and its validation prompts."""
    spec = zoo_build.SIZES["small"]
    out = []
    for job in [*SKILLS, zoo_build.FULL_JOB]:
        train, val = zoo_build._expert_data(spec, seed, job)
        examples = tuple(ExpertExample(e.prompt, e.reference, e.task, "train") for e in train[:max_examples]) + tuple(
            ExpertExample(e.prompt, e.reference, e.task, "validation") for e in val
        )
        out.append(ExpertInfo(name=zoo_build._job_name(job), kind="adapter", examples=examples))
    return out
