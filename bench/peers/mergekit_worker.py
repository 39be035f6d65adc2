"""mergekit, as a peer process for ``bench/bench_peers.py``'s merge comparison.

It runs in the peers' venv (``make peers``), spoken to over stdin/stdout, one JSON object per line:

    {"merge": {"method": "ties", "base": path, "adapters": [path, ...], "weight": w,
               "density": d, "seed": s, "out": path}}  ->  {"seconds": t, "out": path}

Each adapter enters as mergekit's own ``base+adapter`` model reference, so mergekit applies the
LoRA itself (through peft) before it merges: what a user of mergekit does with LoRA experts.
``seconds`` is ``run_merge`` alone, timed here: the LoRA application, the merge and the write of the
merged model (no import, no pipe). Every other option is mergekit's default, on the CPU.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def merge(msg: dict) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    parameters = {"weight": msg["weight"]}
    if msg.get("density") is not None:
        parameters["density"] = msg["density"]
    config = MergeConfiguration.model_validate(
        {
            "merge_method": msg["method"],
            "base_model": msg["base"],
            "models": [{"model": f"{msg['base']}+{a}", "parameters": parameters} for a in msg["adapters"]],
            "dtype": "float32",
        }
    )
    with tempfile.TemporaryDirectory() as cache:  # a fresh LoRA-merge cache: every run applies the adapters
        options = MergeOptions(
            lora_merge_cache=cache,
            random_seed=msg.get("seed"),
            copy_tokenizer=False,
            write_model_card=False,
            quiet=True,
        )
        t0 = time.perf_counter()
        run_merge(config, msg["out"], options=options)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "out": msg["out"]}


def main() -> None:
    import mergekit
    import torch

    version = getattr(mergekit, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("mergekit")
    print(json.dumps({"ready": True, "version": version, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            reply = merge(msg["merge"]) if "merge" in msg else {"error": f"unknown message {sorted(msg)}"}
        except Exception as exc:  # noqa: BLE001 - the bench prints it and stops
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
