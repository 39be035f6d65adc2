"""Issue 17's pilot: how well each routed module's input tells a token's domain, and how well
PHATGOOSE's gates follow it.

Builds, in a temporary folder and in minutes: the domains corpora (``services.zoo.domains``), a
byte-level BPE trained on them (``services.zoo.bpe``), a small Llama base pre-trained on the mix
of all domains, and one LoRA expert per chosen domain. Then, on the bare base's hidden states:

- **probe**: per layer and LoRA target module, a linear classifier (multinomial logistic
  regression, full batch) from the module's input to the token's domain, fitted on tokens of
  validation documents (single-domain and mixed) and scored on tokens of test documents of both
  kinds (each token of a mixed document labelled with its segment's domain);
- **PHATGOOSE**: each expert's gate vectors trained as ``routers.phatgoose.train_gates`` does
  (loss on every token), then per token and module the top-1 expert by PHATGOOSE's score
  (``PHATGOOSE.torch_scores``) against the token's domain, beside a probe over the experts'
  domains only;
- the experts' held-out loss on each domain against the base's.

    python bench/pilot_domains_probe.py --experts python,prose,data
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import load, machine  # noqa: E402
from routers.phatgoose import PHATGOOSE, train_gates  # noqa: E402
from routers.tokenwise import read_lora_factors  # noqa: E402
from services.leaderboard.text_loss import LossTotals, document_loss, model_forward, tokenize_segments  # noqa: E402
from services.zoo import domains as D  # noqa: E402
from services.zoo.bpe import train_bpe  # noqa: E402
from services.zoo.domains_build import lm_rows  # noqa: E402
from services.zoo.train import LORA_TARGETS, TrainSpec, llama_config, train_loop  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def token_labels(tok, segments: list[D.Segment], domains: tuple[str, ...], max_len: int) -> tuple[list[int], list[int]]:
    """ids of the document and, per token, the index of its segment's domain in ``domains`` (-1:
    a domain outside them), as the loss metric books them."""
    ids, labels = tokenize_segments(tok, [(s.domain, s.text) for s in segments], max_len)
    out = [domains.index(d) if d in domains else -1 for d in labels]
    if ids and ids[0] == tok.bos_token_id:
        out[0] = -1  # BOS belongs to no domain
    return ids, out


@torch.no_grad()
def module_inputs(model, modules: list[str], docs: list[tuple[list[int], list[int]]], max_len: int):
    """Every module's input at every labelled token: {module: [N, d]}, labels [N]."""
    got: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
    keep: list[torch.Tensor] = []

    def hook(name):
        def record(_m, inputs):
            got[name].append(inputs[0][0][keep[-1]].float())

        return record

    handles = [model.get_submodule(m).register_forward_pre_hook(hook(m)) for m in modules]
    labels = []
    try:
        for ids, lab in docs:
            ids, lab = ids[:max_len], torch.tensor(lab[:max_len])
            keep.append(lab >= 0)
            model(input_ids=torch.tensor([ids]))
            labels.append(lab[lab >= 0])
    finally:
        for h in handles:
            h.remove()
    return {m: torch.cat(v) for m, v in got.items()}, torch.cat(labels)


def mixed_token_info(docs: list[tuple[list[int], list[int]]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per kept token of the mixed documents: the document's kind (its index in
    ``D.MIXED_KINDS``, as ``mixed_documents`` cycles them) and its distance in tokens from the
    start of its segment (a change of label)."""
    kinds, dist = [], []
    for n, (_, lab) in enumerate(docs):
        since, last = 0, None
        for label in lab[:max_len]:
            since = 0 if label != last else since + 1
            last = label
            if label >= 0:
                kinds.append(n % len(D.MIXED_KINDS))
                dist.append(since)
    return torch.tensor(kinds), torch.tensor(dist)


def content_tokens(tok, docs: list[tuple[list[int], list[int]]], max_len: int) -> torch.Tensor:
    """Per kept token (as ``module_inputs`` keeps them): whether it holds a letter or digit; the
    rest are whitespace and punctuation, which several domains share."""
    flags = []
    for ids, lab in docs:
        for i, label in zip(ids[:max_len], lab[:max_len]):
            if label >= 0:
                flags.append(any(c.isalnum() for c in tok.decode([i])))
    return torch.tensor(flags)


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300) -> torch.nn.Linear:
    """Multinomial logistic regression on standardised inputs, full batch (L-BFGS)."""
    torch.manual_seed(0)
    probe = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")
    xs = torch.nn.functional.layer_norm(x, (x.shape[1],))

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(xs), y) + 1e-4 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return probe


def probe_accuracy(probe, x, y) -> float:
    with torch.no_grad():
        pred = probe(torch.nn.functional.layer_norm(x, (x.shape[1],))).argmax(-1)
    return float((pred == y).float().mean())


def mean_loss(model, tok, texts: list[str], max_len: int) -> float:
    totals = LossTotals()
    for t in texts:
        totals.add(document_loss(model_forward(model), tok, [("text", t)], max_len))
    return totals.per_token()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", default="python,prose,data", help="domains that get a LoRA expert")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--base-steps", type=int, default=1200)
    ap.add_argument("--expert-steps", type=int, default=300)
    ap.add_argument("--gate-steps", type=int, default=100)
    ap.add_argument("--train-docs", type=int, default=2000, help="training documents per domain")
    ap.add_argument("--probe-docs", type=int, default=40, help="documents per domain to fit probes, and to score them")
    ap.add_argument("--max-len", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    experts = tuple(args.experts.split(","))
    t_all = time.perf_counter()
    print(f"Machine: {machine()}; load {load()}")

    train = {d: D.documents(d, "train", args.train_docs, args.seed) for d in D.DOMAINS}
    digest = D.corpus_digest([t for d in D.DOMAINS for t in train[d]])
    tok = train_bpe([t for d in D.DOMAINS for t in train[d]], args.vocab)
    lens = {d: statistics.mean(len(tok(t)["input_ids"]) for t in train[d][:200]) for d in D.DOMAINS}
    log(
        f"corpus sha256 {digest[:16]}; vocab {len(tok)}; tokens per document "
        + ", ".join(f"{d} {v:.0f}" for d, v in lens.items())
    )

    config = llama_config(tok, args.hidden, args.layers)
    config.max_position_embeddings = args.max_len + 8
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM(config)
    mix = [t for i in range(args.train_docs) for t in (train[d][i] for d in D.DOMAINS)]
    rows = lm_rows(tok, mix, args.max_len)
    spec = TrainSpec(steps=args.base_steps, lr=3e-3, batch_size=32, warmup=50, sort_chunk=8)
    t0 = time.perf_counter()
    losses = train_loop(base, rows, spec, tok.pad_token_id, args.seed)
    log(
        f"base: {sum(p.numel() for p in base.parameters()) / 1e6:.2f} M parameters, {args.base_steps} steps in "
        f"{time.perf_counter() - t0:.0f} s, last loss {statistics.mean(losses[-20:]):.3f}"
    )

    test = {d: D.documents(d, "test", args.probe_docs, args.seed) for d in D.DOMAINS}
    base_loss = {d: mean_loss(base, tok, test[d], args.max_len) for d in D.DOMAINS}

    # -- experts ------------------------------------------------------------------------------
    from peft import get_peft_model

    from services.zoo.train import lora_config

    folder = Path(tempfile.mkdtemp(prefix="moerge-pilot-"))
    factors, expert_loss = {}, {}
    for d in experts:
        t0 = time.perf_counter()
        model = get_peft_model(copy.deepcopy(base), lora_config(8, 16))
        rows = lm_rows(tok, train[d], args.max_len)
        train_loop(
            model,
            rows,
            TrainSpec(steps=args.expert_steps, lr=2e-3, batch_size=32, warmup=20, sort_chunk=8),
            tok.pad_token_id,
            args.seed,
        )
        model.save_pretrained(folder / d)
        factors[d] = read_lora_factors(folder / d)
        expert_loss[d] = {o: mean_loss(model, tok, test[o], args.max_len) for o in D.DOMAINS}
        log(
            f"expert {d}: {time.perf_counter() - t0:.0f} s; own-domain loss {expert_loss[d][d]:.3f} "
            f"vs base {base_loss[d]:.3f} ({1 - expert_loss[d][d] / base_loss[d]:.1%} lower)"
        )

    print("\n### Held-out loss, nats per token (rows: model; columns: domain)\n")
    print("| model | " + " | ".join(D.DOMAINS) + " |")
    print("|---|" + "---:|" * len(D.DOMAINS))
    print("| base | " + " | ".join(f"{base_loss[d]:.3f}" for d in D.DOMAINS) + " |")
    for e in experts:
        print(f"| {e} LoRA | " + " | ".join(f"{expert_loss[e][d]:.3f}" for d in D.DOMAINS) + " |")

    # -- probes on the bare base ------------------------------------------------------------------
    modules = [n for n, m in base.named_modules() if n.split(".")[-1] in LORA_TARGETS]
    # fitted on held-out documents of both kinds: single-domain ones and mixed ones
    fit_docs = [
        token_labels(tok, [D.Segment(d, t)], D.DOMAINS, args.max_len)
        for d in D.DOMAINS
        for t in D.documents(d, "validation", args.probe_docs, args.seed)
    ]
    fit_docs += [
        token_labels(tok, segs, D.DOMAINS, args.max_len)
        for segs in D.mixed_documents("validation", 3 * args.probe_docs, args.seed)
    ]
    single = [token_labels(tok, [D.Segment(d, t)], D.DOMAINS, args.max_len) for d in D.DOMAINS for t in test[d]]
    mixed = [
        token_labels(tok, segs, D.DOMAINS, args.max_len)
        for segs in D.mixed_documents("test", 3 * args.probe_docs, args.seed)
    ]
    x_fit, y_fit = module_inputs(base, modules, fit_docs, args.max_len)
    x_single, y_single = module_inputs(base, modules, single, args.max_len)
    x_mixed, y_mixed = module_inputs(base, modules, mixed, args.max_len)
    content = content_tokens(tok, mixed, args.max_len)
    kinds, dist = mixed_token_info(mixed, args.max_len)
    # the experts' domains only: what PHATGOOSE chooses among
    idx = [D.DOMAINS.index(e) for e in experts]
    remap = torch.full((len(D.DOMAINS),), -1, dtype=torch.long)
    remap[idx] = torch.arange(len(idx))

    def among_experts(x, y):
        keep = remap[y] >= 0
        return {m: v[keep] for m, v in x.items()}, remap[y][keep]

    xe_fit, ye_fit = among_experts(x_fit, y_fit)
    xe_single, ye_single = among_experts(x_single, y_single)
    xe_mixed, ye_mixed = among_experts(x_mixed, y_mixed)
    log(f"probe tokens: fit {len(y_fit)}, single-domain {len(y_single)}, mixed {len(y_mixed)}")

    # -- PHATGOOSE gates ----------------------------------------------------------------------
    gates = {}
    for e in experts:
        t0 = time.perf_counter()
        pairs = [("", t) for t in train[e][:800]]
        gates[e], summary = train_gates(
            base,
            tok,
            factors[e],
            pairs,
            steps=args.gate_steps,
            max_length=args.max_len,
            seed=args.seed,
            loss_on="sequence",
        )
        log(
            f"gates {e}: {time.perf_counter() - t0:.0f} s, loss {summary['loss_before']:.3f} -> {summary['loss_after']:.3f}"
        )

    def phatgoose_top1(m: str, x, y) -> float:
        keys = torch.stack([PHATGOOSE.keys(gates[e][m].float()) for e in experts], dim=1)
        return float((PHATGOOSE.torch_scores(x[m], keys).argmax(-1) == y).float().mean())

    print("\n### Probe accuracy per module (bare base), and PHATGOOSE's top-1 agreement with the token's domain\n")
    print(
        f"probe over all {len(D.DOMAINS)} domains; PHATGOOSE and its probe over the experts' {len(experts)} ({', '.join(experts)})\n"
    )
    print(
        "| module | probe, 5 domains: single / mixed / mixed, letters and digits "
        "| probe, experts' domains: single / mixed | PHATGOOSE top-1: single / mixed |"
    )
    print("|---|---:|---:|---:|")
    rows_out, probes = [], {}
    for m in modules:
        p5 = probes[m] = fit_probe(x_fit[m], y_fit, len(D.DOMAINS))
        pe = fit_probe(xe_fit[m], ye_fit, len(experts))
        r = (
            probe_accuracy(p5, x_single[m], y_single),
            probe_accuracy(p5, x_mixed[m], y_mixed),
            probe_accuracy(p5, x_mixed[m][content], y_mixed[content]),
            probe_accuracy(pe, xe_single[m], ye_single),
            probe_accuracy(pe, xe_mixed[m], ye_mixed),
            phatgoose_top1(m, xe_single, ye_single),
            phatgoose_top1(m, xe_mixed, ye_mixed),
        )
        rows_out.append(r)
        short = m.replace("model.layers.", "L").replace(".self_attn.", ".").replace(".mlp.", ".")
        print(f"| {short} | {r[0]:.3f} / {r[1]:.3f} / {r[2]:.3f} | {r[3]:.3f} / {r[4]:.3f} | {r[5]:.3f} / {r[6]:.3f} |")
    n = len(rows_out)
    over = sum(r[0] >= 0.9 for r in rows_out)
    print(
        f"\nmodules with 5-domain probe ≥ 0.9 on single-domain tokens: {over} of {n}; "
        f"on mixed tokens: {sum(r[1] >= 0.9 for r in rows_out)} of {n}; "
        f"on mixed letter-or-digit tokens: {sum(r[2] >= 0.9 for r in rows_out)} of {n}"
    )
    means = [sum(r[i] for r in rows_out) / n for i in range(7)]
    print("means: " + ", ".join(f"{v:.3f}" for v in means))
    print(f"chance over the experts' domains: {1 / len(experts):.3f}")

    print("\n### Where the 5-domain probe errs on mixed documents\n")
    buckets = {"0-1": dist <= 1, "2-7": (dist >= 2) & (dist <= 7), "8+": dist >= 8}
    head = [f"kind {k}" for k in D.MIXED_KINDS] + [f"{b} tokens into the segment" for b in buckets]
    print("| module | " + " | ".join(head) + " |")
    print("|---|" + "---:|" * len(head))
    share = [f"{float((kinds == i).float().mean()):.2f}" for i in range(len(D.MIXED_KINDS))]
    share += [f"{float(v.float().mean()):.2f}" for v in buckets.values()]
    print("| (share of tokens) | " + " | ".join(share) + " |")
    for m in [
        m
        for m in modules
        if m.endswith(("layers.1.mlp.gate_proj", "layers.2.mlp.down_proj", "layers.3.self_attn.q_proj"))
    ]:
        cells = [
            probe_accuracy(probes[m], x_mixed[m][kinds == i], y_mixed[kinds == i]) for i in range(len(D.MIXED_KINDS))
        ]
        cells += [probe_accuracy(probes[m], x_mixed[m][v], y_mixed[v]) for v in buckets.values()]
        print(f"| {m} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    print(f"total {time.perf_counter() - t_all:.0f} s; load {load()}")


if __name__ == "__main__":
    main()
