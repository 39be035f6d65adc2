"""Benchmark of the hf engine: LoRA throughput relative to the base, adapter switch and load times.

    python bench/bench_hf_engine.py [--repeats 5] [--new-tokens 64] [--sizes 650k,5m] [--threads N]

Builds random tiny Llama bases (~650K and ~5M parameters, the zoo's char tokenizer) and rank-8
LoRA adapters on every linear layer with tests/factories.py, then reports for each size:

- generated tokens/s of the base, of an adapter served merged (``adapter_mode="merge"``, the
  default: consecutive requests for the adapter, so no switch in the loop), of an adapter merged
  fresh before every call (a switch paid per call), and of an adapter run unmerged
  (``adapter_mode="unmerged"``) — each as a median over repeats after a warm-up, base and adapter
  timed alternately so a busy machine slows both alike; ratio = adapter ÷ base (target >= 0.85);
- a batch of 16 spread over 4 adapters: the engine's grouped batches (merge / unmerged) against
  one mixed-adapter peft ``generate(adapter_names=...)`` call;
- adapter switch time (activate another loaded adapter) and cold load time (peft folder from
  disk), medians.

Prints the machine and markdown tables (pasted into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.factories from a checkout

from services.engines.base import GenerateRequest  # noqa: E402
from services.engines.hf import HFEngine, _pad  # noqa: E402
from tests.factories import make_tiny_base, make_tiny_lora  # noqa: E402

SIZES = {"650k": (128, 4), "5m": (256, 8)}  # hidden size, layers
PROMPT = "Question: what is the capital of"  # 32 characters = 32 tokens


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{cpu}, {cores} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"python {platform.python_version()}"
    )


def tokens_per_s(engine: HFEngine, requests: list[GenerateRequest], before=None) -> float:
    if before:
        before()
    start = time.perf_counter()
    results = engine.generate(requests)
    elapsed = time.perf_counter() - start
    return sum(r.completion_tokens for r in results) / elapsed


def alternate(variants: dict, repeats: int) -> dict[str, float]:
    """Median tokens/s per variant, timing one of each per repeat after one warm-up round."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(repeats + 1):
        for name, run in variants.items():
            value = run()
            if i:  # round 0 is the warm-up
                samples[name].append(value)
    return {name: statistics.median(values) for name, values in samples.items()}


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_size(label: str, hidden: int, layers: int, root: Path, repeats: int, new_tokens: int) -> dict:
    base_dir = make_tiny_base(root / f"base-{label}", hidden_size=hidden, layers=layers)
    adapters = [make_tiny_lora(base_dir, root / f"lora-{label}-{i}", seed=i + 1, r=8) for i in range(4)]
    merged = HFEngine(base_dir, adapter_mode="merge")
    unmerged = HFEngine(base_dir, adapter_mode="unmerged")
    for engine in (merged, unmerged):
        for i, path in enumerate(adapters):
            engine.load_adapter(f"a{i}", path)
    params = sum(p.numel() for n, p in merged._base.named_parameters() if "lora_" not in n)

    row: dict = {"size": label, "params": params}
    for batch in (1, 16):

        def reqs(target, batch=batch):
            return [GenerateRequest(PROMPT, target=target, max_new_tokens=new_tokens) for _ in range(batch)]

        medians = alternate(
            {
                "base": lambda: tokens_per_s(merged, reqs(None)),
                "merged": lambda: tokens_per_s(merged, reqs("a0")),
                # a1 then a0: a0 is merged fresh before every timed call
                "merged+switch": lambda: tokens_per_s(merged, reqs("a0"), before=lambda: merged.activate("a1")),
                "unmerged": lambda: tokens_per_s(unmerged, reqs("a0")),
            },
            repeats,
        )
        row[batch] = medians

    # 16 requests over 4 adapters: grouped batches vs one peft mixed-adapter batch
    names = [f"a{i % 4}" for i in range(16)]
    mixed_requests = [GenerateRequest(PROMPT, target=n, max_new_tokens=new_tokens) for n in names]

    def peft_mixed() -> float:
        tok = unmerged._tokenizer
        ids, mask = _pad([tok(PROMPT)["input_ids"]] * 16, tok.pad_token_id, left=True, device=unmerged.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = unmerged._peft.generate(
                input_ids=ids,
                attention_mask=mask,
                adapter_names=names,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        return (out.shape[1] - ids.shape[1]) * 16 / (time.perf_counter() - start)

    row["mixed"] = alternate(
        {
            "grouped merge": lambda: tokens_per_s(merged, mixed_requests),
            "grouped unmerged": lambda: tokens_per_s(unmerged, mixed_requests),
            "peft adapter_names": peft_mixed,
        },
        repeats,
    )

    # switch: activate another already-loaded adapter
    for mode, engine in (("merge", merged), ("unmerged", unmerged)):
        engine.activate("a0")
        flip = iter(["a1", "a0"] * 100)
        row[f"switch {mode}"] = median_seconds(lambda engine=engine, flip=flip: engine.activate(next(flip)), 21)

    # cold load from disk (a new name each time, unloaded after)
    counter = iter(range(1000))

    def cold_load() -> None:
        name = f"cold{next(counter)}"
        start = time.perf_counter()
        merged.load_adapter(name, adapters[0])
        row.setdefault("_loads", []).append(time.perf_counter() - start)
        merged.unload_adapter(name)

    for _ in range(repeats + 1):
        cold_load()
    row["load"] = statistics.median(row.pop("_loads")[1:])
    return row


def report(rows: list[dict], repeats: int, new_tokens: int) -> str:
    lines = [
        f"Machine: {machine()}",
        f"Prompt {len(PROMPT)} tokens, {new_tokens} new tokens, greedy; medians of {repeats} repeats after a warm-up.",
        "",
        "| model | batch | base tok/s | merged tok/s (ratio) | merged + switch per call (ratio) | unmerged tok/s (ratio) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        for batch in (1, 16):
            m = row[batch]
            cell = lambda k, m=m: f"{m[k]:.0f} ({m[k] / m['base']:.2f})"  # noqa: E731
            lines.append(
                f"| {row['size']} ({row['params'] / 1e6:.2f}M) | {batch} | {m['base']:.0f} | {cell('merged')} "
                f"| {cell('merged+switch')} | {cell('unmerged')} |"
            )
    lines += [
        "",
        "| model | 16 requests over 4 adapters | tok/s |",
        "|---|---|---:|",
    ]
    for row in rows:
        for name, value in row["mixed"].items():
            lines.append(f"| {row['size']} | {name} | {value:.0f} |")
    lines += [
        "",
        "| model | switch, merge mode (ms) | switch, unmerged mode (ms) | cold adapter load (ms) |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['size']} | {row['switch merge'] * 1e3:.2f} | {row['switch unmerged'] * 1e3:.3f} "
            f"| {row['load'] * 1e3:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {sorted(SIZES)}")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.sizes.split(","):
            hidden, layers = SIZES[label]
            rows.append(bench_size(label, hidden, layers, Path(tmp), args.repeats, args.new_tokens))
    print(report(rows, args.repeats, args.new_tokens))


if __name__ == "__main__":
    main()
