"""The hf engine's adapter switch in merge mode: restoring the base from its copy (what the engine
does) against peft's own unmerge (subtracting the delta again, what it did before), in one run.

    python bench/bench_merge_restore.py [--repeats 21] [--switches 200]

For each tiny Llama (tests/factories.py: ~650K and ~5M parameters, rank-8 LoRA on every linear),
two adapters are switched A -> B -> A …: median milliseconds per switch, the two ways interleaved
so a busy machine slows both alike; and after ``--switches`` switches, how far the base's weights
have drifted from the checkpoint's (max |ΔW|; 0 means bit-identical).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_hf_engine import SIZES, machine  # noqa: E402
from services.engines.hf import HFEngine  # noqa: E402
from tests.factories import make_tiny_base, make_tiny_lora  # noqa: E402


def peft_unmerge(engine: HFEngine) -> None:
    """The engine's switch before: peft's unmerge of every merged layer."""
    if engine._merged is not None:
        for module in engine._peft.modules():
            if isinstance(module, BaseTunerLayer) and module.merged:
                module.unmerge()
        engine._merged = None
        engine._snapshot = []


def peft_merge(engine: HFEngine, target: str) -> None:
    engine._peft.base_model.merge_adapter(adapter_names=[target])
    engine._merged = target


def base_weights(engine: HFEngine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine._peft.get_base_model().state_dict().items() if "lora_" not in k}


def drift(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--switches", type=int, default=200)
    args = ap.parse_args()
    print(machine())
    print(f"median of {args.repeats} switches each way, interleaved; drift after {args.switches} switches\n")
    print(
        "| model | switch, restore the copy (ms) | switch, peft unmerge (ms) | ratio | drift, restore | drift, peft unmerge |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, (hidden, layers) in SIZES.items():
            root = Path(tmp) / label
            base = make_tiny_base(root / "base", hidden_size=hidden, layers=layers)
            engines = {}
            for way in ("restore", "peft"):
                engine = HFEngine(base, adapter_mode="merge")
                for i in range(2):
                    engine.load_adapter(f"a{i}", make_tiny_lora(base, root / f"a{i}", seed=i + 1))
                engines[way] = (engine, base_weights(engine))
            times: dict[str, list[float]] = {"restore": [], "peft": []}
            for i in range(args.repeats):
                target = f"a{i % 2}"  # every call a switch, for both ways
                for way, (engine, _) in engines.items():
                    t0 = time.perf_counter()
                    if way == "restore":
                        engine.activate(target)
                    else:
                        peft_unmerge(engine)
                        engine._peft.set_adapter(target)
                        peft_merge(engine, target)
                    times[way].append(time.perf_counter() - t0)
            for i in range(args.switches):
                target = f"a{(args.repeats + i) % 2}"
                engines["restore"][0].activate(target)
                peft_unmerge(engines["peft"][0])
                engines["peft"][0]._peft.set_adapter(target)
                peft_merge(engines["peft"][0], target)
            engines["restore"][0]._unmerge()
            peft_unmerge(engines["peft"][0])
            r, p = (statistics.median(times[w]) * 1e3 for w in ("restore", "peft"))
            d_restore = drift(base_weights(engines["restore"][0]), engines["restore"][1])
            d_peft = drift(base_weights(engines["peft"][0]), engines["peft"][1])
            print(f"| {label} | {r:.2f} | {p:.2f} | {r / p:.2f} | {d_restore:.1e} | {d_peft:.1e} |")


if __name__ == "__main__":
    main()
