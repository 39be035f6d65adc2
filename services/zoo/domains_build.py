"""Build the domains zoo: a BPE tokenizer, a Llama base, domain experts, and held-out text.

Issue 17's world, where tokenwise routing and merging are meant to work: five domains whose text
differs token by token (``services.zoo.domains``), documents that mix them, and experts that
each know one domain better than the base does. ``build_domains_zoo`` writes the same layout and
manifest as the skills zoo (``services.zoo.build``), so ``register_zoo`` registers it unchanged::

    out_dir/
      zoo.json                         the manifest (ZooManifest, zoo "domains")
      base/                            a Llama pre-trained on a mix of every domain, with its BPE
      experts/dom-<domain>/            one LoRA per domain
      experts/dom-code/                a LoRA on python and shell: overlaps two other experts
      experts/dom-arithmetic-full/     a full fine-tune on arithmetic: a model, not an adapter
      examples/<expert>/{train,validation}.jsonl   documents ({"prompt": text, "task": domain})
      examples/suite/{test,mixed}.jsonl            held-out documents as labelled segments

Outcomes are held-out loss (nats per token, ``services.leaderboard.text_loss``) of the base and
every expert on every domain's test documents. The floors: each expert at least ``own_gain_min``
below the base on each of its own domains, and the best model on every domain one that owns it.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from services.leaderboard.domain_losses import ExpertRef, LossScorer, pooled
from services.leaderboard.text_loss import document_loss, model_forward
from services.machine import machine_record
from services.zoo import domains as D
from services.zoo.bpe import train_bpe
from services.zoo.build import BaseEntry, ExpertEntry, ZooManifest, _Progress, _threads, _worker_init, _workers
from services.zoo.train import TrainSpec, llama_config, train_full, train_loop, train_lora

BASE_NAME = "zoo-domains-base"
ZOO_KIND = "domains"
SUITE_SPLITS = ("test", "mixed")


@dataclass(frozen=True)
class Job:
    """One expert to train: its name, kind ("adapter" or "model") and the domains of its text."""

    name: str
    kind: str
    domains: tuple[str, ...]


JOBS = (
    *(Job(f"dom-{d}", "adapter", (d,)) for d in D.DOMAINS),
    # overlaps dom-python and dom-shell: what a merge of the two should keep
    Job("dom-code", "adapter", ("python", "shell")),
    Job("dom-arithmetic-full", "model", ("arithmetic",)),
)


@dataclass(frozen=True)
class DomainsSize:
    vocab: int
    hidden: int
    layers: int
    max_length: int  # tokens per document, in training and in the metric
    train_docs: int  # training documents per domain (the base sees every domain's)
    pretrain: TrainSpec
    lora: TrainSpec
    full: TrainSpec
    lora_rank: int
    lora_alpha: int
    # an expert trains until its own domains' validation loss is this far below the base's (then
    # cools down); the floor below is what the test split must show
    stop_gain: float
    own_gain_min: float
    n_validation: int  # validation documents per domain, for the stop check
    n_test: int  # test documents per domain
    n_mixed: int  # mixed test documents
    # share of an expert's training documents drawn from the other domains (replay): an expert
    # that sees only its own text drifts on every other one, and a merge adds up those drifts
    replay: float = 0.0


# Experts train at a constant rate until their check passes, then cool down (train_loop)
_MICRO_EXPERT = TrainSpec(
    steps=150, lr=3e-3, batch_size=16, warmup=5, check_every=10, min_steps=10, cooldown=10, schedule="constant"
)
_SMALL_EXPERT = TrainSpec(
    steps=400,
    lr=4e-3,
    batch_size=16,
    warmup=10,
    sort_chunk=8,
    check_every=25,
    min_steps=25,
    cooldown=25,
    schedule="constant",
)

SIZES: dict[str, DomainsSize] = {
    # Tests: the whole build in about a minute; the experts only have to learn something of their
    # own domain and more of it than of the others.
    "micro": DomainsSize(
        vocab=512,
        hidden=64,
        layers=2,
        max_length=160,
        train_docs=200,
        pretrain=TrainSpec(steps=80, lr=3e-3, batch_size=16, warmup=10, sort_chunk=8),
        lora=_MICRO_EXPERT,
        full=dataclasses.replace(_MICRO_EXPERT, lr=1e-3),
        lora_rank=8,
        lora_alpha=16,
        stop_gain=0.05,
        own_gain_min=0.02,
        n_validation=8,
        n_test=8,
        n_mixed=6,
        replay=0.25,
    ),
    # The benchmark zoo. The base pre-trains briefly on purpose: one trained to convergence on the
    # generated text left the experts nothing to learn (bench/pilot_domains_probe.py, run 1);
    # hidden 256 is where a linear probe of the modules' inputs tells the domains of mixed
    # documents apart (run 4, docs/benchmarks.md).
    "small": DomainsSize(
        vocab=2048,
        hidden=256,
        layers=4,
        max_length=256,
        train_docs=2000,
        pretrain=TrainSpec(steps=160, lr=3e-3, batch_size=32, warmup=30, sort_chunk=8),
        lora=_SMALL_EXPERT,
        full=dataclasses.replace(_SMALL_EXPERT, lr=5e-4),  # the full fine-tune: every weight moves
        lora_rank=8,
        lora_alpha=16,
        stop_gain=0.12,
        own_gain_min=0.10,
        n_validation=24,
        n_test=40,
        n_mixed=60,
        replay=0.25,
    ),
}


def lm_rows(tok: PreTrainedTokenizerFast, texts: list[str], max_length: int) -> list[tuple[list[int], list[int]]]:
    """Language-model rows as the metric reads text: ``tok(text)`` (BOS first), then EOS; every
    token a target."""
    rows = []
    for ids in tok(texts)["input_ids"]:
        ids = (ids + [tok.eos_token_id])[:max_length]
        rows.append((ids, ids))
    return rows


def domain_loss(model: torch.nn.Module, tok, texts: list[str], max_length: int) -> float:
    """Mean nats per token over single-domain documents (tokens pooled, as the leaderboard does)."""
    forward = model_forward(model)
    return pooled(document_loss(forward, tok, [("text", t)], max_length) for t in texts).per_token()


def _train_texts(spec: DomainsSize, seed: int, domain: str) -> list[str]:
    return D.documents(domain, "train", spec.train_docs, seed)


def _own_texts(spec: DomainsSize, seed: int, job: Job) -> list[str]:
    """A job's own training documents: its domains' in turn (a two-domain expert gets half of
    each). These are the examples it is registered with."""
    per = [_train_texts(spec, seed, d)[: spec.train_docs // len(job.domains)] for d in job.domains]
    return [t for group in zip(*per) for t in group]


def _job_texts(spec: DomainsSize, seed: int, job: Job) -> list[str]:
    """What a job trains on: its own documents, then its ``replay`` share from the other domains,
    taken from the end of their training text."""
    own = _own_texts(spec, seed, job)
    others = [d for d in D.DOMAINS if d not in job.domains]
    n = round(len(own) * spec.replay / (1 - spec.replay)) // len(others) if spec.replay else 0
    rest = [_train_texts(spec, seed, d)[::-1][:n] for d in others]
    return own + [t for group in zip(*rest) for t in group]


def build_domains_zoo(size: str, out_dir: Path, seed: int = 0, progress: bool = True) -> ZooManifest:
    if size not in SIZES:
        raise ValueError(f"unknown domains zoo size {size!r}; expected one of {sorted(SIZES)}")
    spec = SIZES[size]
    hf_logging.disable_progress_bar()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    jobs_stats: dict[str, dict] = {}

    with _threads(), _Progress(progress) as bars:
        # -- tokenizer and base -------------------------------------------------------------
        t0 = time.perf_counter()
        train = {d: _train_texts(spec, seed, d) for d in D.DOMAINS}
        corpus = [t for d in D.DOMAINS for t in train[d]]
        digest = D.corpus_digest(corpus)
        tok = train_bpe(corpus, spec.vocab)
        tok.save_pretrained(str(out_dir / "base"))
        timings["tokenizer"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        torch.manual_seed(seed)
        config = llama_config(tok, spec.hidden, spec.layers)
        config.max_position_embeddings = spec.max_length
        base = LlamaForCausalLM(config)
        mix = [t for i in range(spec.train_docs) for t in (train[d][i] for d in D.DOMAINS)]
        stats: dict = {}
        train_loop(
            base,
            lm_rows(tok, mix, spec.max_length),
            spec.pretrain,
            tok.pad_token_id,
            seed,
            on_step=bars.phase("pretrain base", spec.pretrain.budget),
            stats=stats,
        )
        jobs_stats["pretrain_base"] = stats
        base.save_pretrained(out_dir / "base")
        timings["pretrain_base"] = time.perf_counter() - t0
        base_entry = BaseEntry(BASE_NAME, "base", sum(p.numel() for p in base.parameters()))
        del base

        # -- experts, two processes side by side (as the skills zoo trains them) -------------
        t0, t0_epoch = time.perf_counter(), time.time()
        workers = _workers(len(JOBS))
        # the longest first, so that the workers finish together
        run_order = sorted(JOBS, key=lambda j: -_JOB_COST.get(j.name, 1))
        if workers == 1:
            for job in JOBS:
                on_step = bars.phase(f"{job.kind} {job.name}", (spec.full if job.kind == "model" else spec.lora).budget)
                jobs_stats[job.name] = _train_expert(str(out_dir), size, seed, job, on_step)[1]
        else:
            done = bars.advance(f"experts ({workers} processes)", len(JOBS))
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=_worker_init, initargs=(max(1, (os.cpu_count() or 1) // workers),)
            ) as pool:
                for future in as_completed(
                    [pool.submit(_train_expert, str(out_dir), size, seed, j) for j in run_order]
                ):
                    name, job_stats = future.result()
                    jobs_stats[name] = job_stats
                    done()
        for s in jobs_stats.values():
            if "started" in s:
                s["start"] = round(s.pop("started") - t0_epoch, 1)
        experts = [_expert_entry(out_dir, spec, seed, job) for job in JOBS]
        timings["experts"] = time.perf_counter() - t0

        # -- held-out suite: single-domain test documents and mixed ones, as segments ---------
        suite = {}
        for split in SUITE_SPLITS:
            rel = f"examples/suite/{split}.jsonl"
            _write_jsonl(  # the suite-file format (services.leaderboard.suites): `moerge suite add` reads it
                out_dir / rel,
                [{"split": split, "metric": "loss", "segments": segs} for segs in suite_documents(spec, seed, split)],
            )
            suite[split] = rel

        # -- outcomes, from the files on disk -----------------------------------------------
        t0 = time.perf_counter()
        manifest = ZooManifest(
            size,
            seed,
            base_entry,
            experts,
            suite=suite,
            floors={"own_gain_min": spec.own_gain_min},
            machine=machine_record(),
            zoo=ZOO_KIND,
            corpus_sha256=digest,
            root=str(out_dir.resolve()),
        )
        manifest.outcomes = measure_losses(manifest, spec, seed, bars.advance("evaluate", len(experts) + 1))
        timings["evaluate"] = time.perf_counter() - t0

    timings["total"] = time.perf_counter() - t_all
    manifest.timings = {k: round(v, 1) for k, v in timings.items()}
    manifest.jobs = {k: jobs_stats[k] for k in ["pretrain_base", *(j.name for j in JOBS)] if k in jobs_stats}
    manifest.failures = check_loss_floors(manifest)
    manifest.save(out_dir)
    return manifest


# CPU seconds per expert on the small zoo, for ordering only (2026-12-04: data 77, code 53,
# arithmetic 50, python 49, prose 31, shell 30, the full fine-tune 27)
_JOB_COST = {
    "dom-data": 77,
    "dom-code": 53,
    "dom-arithmetic": 50,
    "dom-python": 49,
    "dom-prose": 31,
    "dom-shell": 30,
    "dom-arithmetic-full": 27,
}


def suite_documents(spec: DomainsSize, seed: int, split: str) -> list[list[list[str]]]:
    """The held-out documents of ``split`` as [[domain, text], …] segments: ``test`` holds
    ``n_test`` single-domain documents per domain, ``mixed`` ``n_mixed`` mixed ones."""
    if split == "test":
        return [[[d, t]] for d in D.DOMAINS for t in D.documents(d, "test", spec.n_test, seed)]
    if split == "mixed":
        return [[[s.domain, s.text] for s in segs] for segs in D.mixed_documents("test", spec.n_mixed, seed)]
    raise ValueError(f"unknown split {split!r}; one of {SUITE_SPLITS}")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _train_expert(
    out_dir: str, size: str, seed: int, job: Job, on_step: Callable[[int, float], None] | None = None
) -> tuple[str, dict]:
    """Train one expert from the saved base until its own domains' validation loss is
    ``stop_gain`` below the base's (or its budget runs out); save it under ``experts/``."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    stats: dict = {"worker": os.getpid(), "started": time.time()}
    spec, root = SIZES[size], Path(out_dir)
    tok = cast(PreTrainedTokenizerFast, PreTrainedTokenizerFast.from_pretrained(str(root / "base")))
    base = cast(LlamaForCausalLM, AutoModelForCausalLM.from_pretrained(str(root / "base")))
    base.eval()
    validation = {d: D.documents(d, "validation", spec.n_validation, seed) for d in job.domains}
    before = {d: domain_loss(base, tok, texts, spec.max_length) for d, texts in validation.items()}
    stats["base_validation_loss"] = {d: round(v, 4) for d, v in before.items()}
    job_seed = seed + 1 + JOBS.index(job)
    seen: list[float] = []  # the gain at each check

    def good_enough(model: torch.nn.Module) -> bool:
        gain = min(1 - domain_loss(model, tok, validation[d], spec.max_length) / before[d] for d in job.domains)
        seen.append(round(gain, 4))
        stats["val_gain"] = seen
        return gain >= spec.stop_gain

    rows = lm_rows(tok, _job_texts(spec, seed, job), spec.max_length)
    model: Any  # the full model, or the PeftModel of an adapter
    if job.kind == "model":
        model, _ = train_full(base, tok, [], spec.full, job_seed, on_step, good_enough, stats, rows=rows)
    else:
        model, _ = train_lora(
            base, tok, [], spec.lora, spec.lora_rank, spec.lora_alpha, job_seed, on_step, good_enough, stats, rows=rows
        )
    target = root / "experts" / job.name
    model.save_pretrained(target)
    if job.kind == "model":
        tok.save_pretrained(str(target))
    stats["wall"] = round(time.perf_counter() - t0, 1)
    stats["cpu"] = round(time.process_time() - cpu0, 1)
    return job.name, stats


def _expert_entry(out_dir: Path, spec: DomainsSize, seed: int, job: Job) -> ExpertEntry:
    rows = {
        "train": _own_texts(spec, seed, job),
        "validation": [t for d in job.domains for t in D.documents(d, "validation", spec.n_validation, seed)],
    }
    paths = {}
    for split, texts in rows.items():
        rel = f"examples/{job.name}/{split}.jsonl"
        task = "+".join(job.domains)
        _write_jsonl(
            out_dir / rel,
            [{"prompt": t, "reference": "", "task": task, "split": split, "skills": [], "domain": task} for t in texts],
        )
        paths[split] = rel
    what = (
        f"Full fine-tune of {BASE_NAME} on {job.domains[0]} text: a standalone model, not an adapter."
        if job.kind == "model"
        else f"LoRA (r={spec.lora_rank}) on {BASE_NAME} for {' and '.join(job.domains)} text."
    )
    if spec.replay:
        what += f" {spec.replay:.0%} of its training documents come from the other domains (replay)."
    return ExpertEntry(
        job.name,
        job.kind,
        f"experts/{job.name}",
        BASE_NAME,
        list(job.domains),
        [],
        what,
        paths["train"],
        paths["validation"],
    )


def measure_losses(
    manifest: ZooManifest, spec: DomainsSize, seed: int, advance: Callable[[], None] = lambda: None
) -> dict[str, dict[str, float]]:
    """Held-out loss (nats per token) of the base and of every expert on every domain's test
    documents, read from the files on disk."""
    scorer = LossScorer(manifest.path_of(manifest.base.path), spec.max_length)
    test = {d: [[(d, t)] for t in D.documents(d, "test", spec.n_test, seed)] for d in D.DOMAINS}

    def row(forward) -> dict[str, float]:
        return {d: round(pooled(scorer.score(forward, docs)).per_token(), 4) for d, docs in test.items()}

    out = {manifest.base.name: row(scorer.base_forward())}
    advance()
    for e in manifest.experts:
        out[e.name] = row(scorer.expert_forward(ExpertRef(e.name, e.kind, manifest.path_of(e.path), tuple(e.domains))))
        advance()
    return out


def check_loss_floors(manifest: ZooManifest) -> list[str]:
    """Each expert ``own_gain_min`` below the base on each of its domains; on every domain the
    lowest loss an expert's that owns it."""
    failures = []
    floor = manifest.floors["own_gain_min"]
    base = manifest.outcomes[manifest.base.name]
    below = gains(manifest)
    for e in manifest.experts:
        for d in e.domains:
            gain = below[e.name][d]
            if gain < floor:
                failures.append(f"{e.name} is {gain:.1%} below the base on its own domain {d} (min {floor:.0%})")
    for d in base:
        best = min(manifest.experts, key=lambda e: manifest.outcomes[e.name][d])
        if d not in best.domains:
            failures.append(
                f"{best.name} has the lowest loss on {d} ({manifest.outcomes[best.name][d]:.3f}), "
                "a domain that is not its own"
            )
    return failures


def gains(manifest: ZooManifest) -> dict[str, dict[str, float]]:
    """Per model and domain: the fraction by which its loss is below the base's."""
    base = manifest.outcomes[manifest.base.name]
    return {m: {d: 1 - v / base[d] for d, v in row.items()} for m, row in manifest.outcomes.items()}


def floors_summary(manifest: ZooManifest) -> str:
    return (
        f"{len(manifest.experts)} experts ≥ {manifest.floors['own_gain_min']:.0%} below the base on their own "
        "domains, each domain's lowest loss its own expert's"
    )
