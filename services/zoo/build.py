"""Build the zoo: a Llama base, one LoRA expert per skill, one full fine-tuned domain model.

``build_zoo`` writes standard Hugging Face / peft folders and a manifest, ``zoo.json``::

    out_dir/
      zoo.json                       the manifest (ZooManifest.to_json)
      base/                          config.json, model.safetensors, tokenizer.json, …
      experts/skill-<name>/          adapter_config.json, adapter_model.safetensors
      experts/domain-math/           a full model (config.json, model.safetensors, tokenizer.json)
      examples/<expert>/{train,validation}.jsonl
      examples/suite/{test,paraphrase,composition}.jsonl

Outcomes (exact match on the held-in ``test`` split, every model on every skill) are measured at
the end and checked against the size's floors; the table goes to the manifest and the caller.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from services.machine import machine_record
from services.zoo.evaluate import accuracy_by_task
from services.zoo.skills import SKILLS, Example, generic_probe, make_split
from services.zoo.tokenizer import save_tokenizer
from services.zoo.train import TrainSpec, llama_config, pretrain_base, train_full, train_lora

BASE_NAME = "zoo-base"
MODEL_EXPERT_DOMAIN = "math"
# The full fine-tune covers the counting skills of the math domain. Measured: with increment in
# its mix as well, 500 full fine-tuning steps left increment at 57% (count and max at 100%), so
# the model expert would have claimed a skill it does not have.
MODEL_EXPERT_SKILLS = ("count", "max")


@dataclass(frozen=True)
class Floors:
    """What a build must reach on the test split (fractions of exact match)."""

    own_min: float  # every expert on each of its own skills
    base_max: float  # the base on every skill
    foreign_max: float  # every expert on every skill that is not its own
    best_own_min: float = 0.0  # the best expert on its own skill (micro: learning happened at all)


@dataclass(frozen=True)
class ZooSize:
    hidden: int
    layers: int
    intermediate: int
    pretrain: TrainSpec
    lora: TrainSpec
    lora_rank: int
    lora_alpha: int
    full: TrainSpec
    n_test: int  # test items per skill for the outcomes table
    n_validation: int
    floors: Floors
    text_fraction: float = 0.4  # share of pre-training rows that are plain language modelling
    stop_at: float = 1.01  # expert training stops once validation accuracy reaches this (>1: never)
    # ... or once two checks in a row reach this: a skill that plateaus just under ``stop_at``
    # (increment sat at 38/40 from step ~150 and ran all its steps) stops there
    plateau_at: float = 1.01
    # with ``pretrain.check_every``: the base pre-trains until every BASE_CHECK_TASKS probe is at this
    base_check_at: float = 1.01


# The generic tasks the base's check probes: copying is what every skill builds on
BASE_CHECK_TASKS = ("repeat", "copy")

SIZES: dict[str, ZooSize] = {
    # Tests: the whole build in about a minute. The base barely copies after so few steps, so the
    # experts stay weak; the floors check specialisation (base and foreign skills stay low) and
    # that every expert learned something of its own skill.
    "micro": ZooSize(
        hidden=128,
        layers=2,
        intermediate=384,
        pretrain=TrainSpec(steps=200, lr=3e-3, batch_size=48, warmup=20),
        lora=TrainSpec(steps=40, lr=5e-3, batch_size=32, warmup=5),
        lora_rank=16,
        lora_alpha=32,
        full=TrainSpec(steps=40, lr=2e-3, batch_size=32, warmup=5),
        n_test=24,
        n_validation=16,
        floors=Floors(own_min=0.0, base_max=0.2, foreign_max=0.3, best_own_min=0.25),
        text_fraction=0.0,
    ),
    # The benchmark zoo. The base pre-trains at a constant rate until it copies (BASE_CHECK_TASKS
    # at base_check_at, checked every 100 steps), then cools down for 100 steps: the step where it
    # learns to copy moved from ~600 to ~1,600 between seeds, and a fixed step count stopped
    # inside that transition, where the CPU's float32 rounding decided the outcome. The generic
    # tasks include the slow skills' primitives (skills.GENERIC_TASKS: spaced, triple,
    # shift_back). An expert that has not passed its validation check after its cycle starts a
    # fresh try (new initial weights, another order of its rows), up to 3x the cycle in all
    # (TrainSpec.max_steps). See docs/zoo.md.
    "small": ZooSize(
        hidden=128,
        layers=2,
        intermediate=384,
        pretrain=TrainSpec(
            steps=2400,
            lr=3e-3,
            batch_size=64,
            warmup=30,
            check_every=100,
            min_steps=300,
            cooldown=100,
            schedule="constant",
        ),
        lora=TrainSpec(
            steps=360, lr=4e-3, batch_size=64, warmup=15, check_every=30, min_steps=60, max_steps=1080, cooldown=30
        ),
        lora_rank=32,
        lora_alpha=64,
        full=TrainSpec(steps=500, lr=3e-3, batch_size=64, warmup=10, check_every=50, min_steps=100, max_steps=1500),
        n_test=60,
        n_validation=40,
        floors=Floors(own_min=0.9, base_max=0.2, foreign_max=0.3),
        text_fraction=0.0,
        # 40/40, or two checks in a row at >= 38/40: from the base above the hard skills reach
        # 39/40 at their first check (60 steps), and stopping there gave 92-93% on test
        stop_at=1.0,
        plateau_at=0.95,
        base_check_at=0.75,
    ),
}


@dataclass
class BaseEntry:
    name: str
    path: str  # relative to the manifest's folder
    params: int = 0


@dataclass
class ExpertEntry:
    name: str
    kind: str  # "adapter" | "model"
    path: str  # relative to the manifest's folder
    base: str  # the base model's name (the base a model expert was fine-tuned from)
    domains: list[str]
    skills: list[str]
    description: str
    train_examples: str  # JSONL (prompt, reference, task, split, …), relative path
    validation_examples: str


@dataclass
class ZooManifest:
    size: str
    seed: int
    base: BaseEntry
    experts: list[ExpertEntry]
    # outcomes[model name][skill] = exact match on the test split; model name is the base's or an expert's
    outcomes: dict[str, dict[str, float]] = field(default_factory=dict)
    floors: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # floors a build missed, in words
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    # per training run ("pretrain_base", then one per expert): steps, seconds, validation checks
    # and their seconds, the worker process that ran it
    jobs: dict[str, dict] = field(default_factory=dict)
    suite: dict[str, str] = field(default_factory=dict)  # split name -> JSONL path (held-out splits)
    # where it was trained: CPU, the instruction set torch ran with, package versions
    # (services.machine.machine_record); the same seed gives another model on another CPU
    machine: dict = field(default_factory=dict)
    zoo: str = "skills"  # which world: "skills" (this module) or "domains" (services.zoo.domains_build)
    corpus_sha256: str = ""  # the domains zoo's training text, as services.zoo.domains.corpus_digest
    root: str = ""  # absolute folder of zoo.json; set on load, not saved

    MANIFEST = "zoo.json"

    @property
    def ok(self) -> bool:
        return not self.failures

    def path_of(self, rel: str) -> Path:
        return Path(self.root) / rel

    def expert(self, name: str) -> ExpertEntry:
        for e in self.experts:
            if e.name == name:
                return e
        raise KeyError(name)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("root")
        return d

    def save(self, directory: Path) -> Path:
        path = Path(directory) / self.MANIFEST
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> "ZooManifest":
        path = Path(path)
        if path.is_dir():
            path = path / cls.MANIFEST
        d = json.loads(path.read_text())
        d["base"] = BaseEntry(**d["base"])
        d["experts"] = [ExpertEntry(**e) for e in d["experts"]]
        return cls(**d, root=str(path.parent.resolve()))


def read_examples(path: Path) -> list[Example]:
    return [Example.from_json(json.loads(line)) for line in Path(path).read_text().splitlines() if line]


def _write_examples(path: Path, examples: list[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e.to_json()) + "\n" for e in examples))


@contextmanager
def _threads() -> Iterator[None]:
    """Both cores for the small matrices here. Busy-waiting OpenMP threads collapse when the
    machine is shared, so the CLI and tests set OMP_WAIT_POLICY=PASSIVE before torch loads."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Progress:
    """A rich progress bar per phase, or nothing."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._p = None
        self._last = None  # the task of the latest phase

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._p = Progress(
                TextColumn("{task.description:<28}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                transient=False,
            )
            self._p.__enter__()
        return self

    def __exit__(self, *exc):
        if self._p:
            self._p.__exit__(*exc)

    def phase(self, description: str, total: int) -> Callable[[int, float], None]:
        if not self._p:
            return lambda step, loss: None
        task = self._p.add_task(description, total=total, info="")
        self._last = task

        def on_step(step: int, loss: float) -> None:
            self._p.update(task, completed=step + 1, info=f"loss {loss:.3f}")

        return on_step

    def end_phase(self, note: str = "") -> None:
        """The last phase stopped before its total (a check passed): it is complete where it is,
        and its clock stops."""
        if self._p and self._last is not None:
            task = next(t for t in self._p.tasks if t.id == self._last)
            self._p.update(self._last, total=task.completed, **({"info": note} if note else {}))

    def advance(self, description: str, total: int):
        if not self._p:
            return lambda: None
        task = self._p.add_task(description, total=total, info="")
        return lambda: self._p.advance(task)


def build_zoo(size: str, out_dir: Path, seed: int = 0, progress: bool = True) -> ZooManifest:
    if size not in SIZES:
        raise ValueError(f"unknown zoo size {size!r}; expected one of {sorted(SIZES)}")
    spec = SIZES[size]
    hf_logging.disable_progress_bar()  # per-save shard bars would break up the phase bars
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    with _threads(), _Progress(progress) as bars:
        # -- base -------------------------------------------------------------------------
        t0 = time.perf_counter()
        tok = save_tokenizer(out_dir / "base")
        cfg = llama_config(tok, spec.hidden, spec.layers, intermediate=spec.intermediate)
        jobs_stats: dict[str, dict] = {"pretrain_base": {}}
        base_stats = jobs_stats["pretrain_base"]
        base_check = (
            _passes(tok, generic_probe(BASE_CHECK_TASKS, spec.n_validation, seed), spec.base_check_at, base_stats)
            if spec.pretrain.check_every
            else None
        )
        base, _ = pretrain_base(
            tok,
            cfg,
            spec.pretrain,
            seed,
            spec.text_fraction,
            on_step=bars.phase("pretrain base", spec.pretrain.budget),
            stats=base_stats,
            good_enough=base_check,
        )
        bars.end_phase("copies" if base_stats.get("passed") else "")
        base.save_pretrained(out_dir / "base")
        timings["pretrain_base"] = time.perf_counter() - t0
        base_entry = BaseEntry(BASE_NAME, "base", sum(p.numel() for p in base.parameters()))

        # -- experts: a LoRA per skill and one full fine-tuned domain model ----------------
        # Trained in `workers` processes of one thread each: at these sizes one training run
        # cannot keep two cores busy, two runs side by side can. Every expert is trained from the
        # saved base with its own seed, so the result does not depend on which worker ran it.
        t0, t0_epoch = time.perf_counter(), time.time()
        jobs = [*SKILLS, FULL_JOB]
        # Longest first, so the two workers finish together (CPU seconds measured per job on the
        # small zoo: caesar 82, dashes 75, increment 71, double 67, uppercase 55, reverse 25, the
        # full fine-tune 19, count 16, max 12); the manifest keeps the SKILLS order.
        run_order = sorted(jobs, key=lambda j: -_JOB_COST.get(j, 0))
        workers = _workers(len(jobs))
        if workers == 1:
            for job in jobs:
                on_step = bars.phase(_job_label(job), (spec.full if job == FULL_JOB else spec.lora).budget)
                jobs_stats[_job_name(job)] = _train_expert(str(out_dir), size, seed, job, on_step=on_step)[1]
        else:
            done = bars.advance(f"experts ({workers} processes)", len(jobs))
            ctx = multiprocessing.get_context("spawn")  # fork after torch's threads start is unsafe
            with ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=_worker_init, initargs=(max(1, (os.cpu_count() or 1) // workers),)
            ) as pool:
                for future in as_completed(
                    [pool.submit(_train_expert, str(out_dir), size, seed, job) for job in run_order]
                ):
                    job, stats = future.result()  # a failed expert stops the build with its own error
                    jobs_stats[_job_name(job)] = stats
                    done()
        for stats in jobs_stats.values():  # when each job started, in seconds into the phase
            if "started" in stats:
                stats["start"] = round(stats.pop("started") - t0_epoch, 1)
        experts = [_expert_entry(out_dir, spec, seed, job) for job in jobs]
        timings["experts"] = time.perf_counter() - t0
        del base

        # -- held-out suite files ---------------------------------------------------------
        suite = {}
        for split, n in (("test", spec.n_test), ("paraphrase", spec.n_test), ("composition", spec.n_test)):
            rel = f"examples/suite/{split}.jsonl"
            _write_examples(out_dir / rel, make_split(split, n, seed))
            suite[split] = rel

        # -- outcomes, from the files on disk ---------------------------------------------
        t0 = time.perf_counter()
        manifest = ZooManifest(
            size,
            seed,
            base_entry,
            experts,
            suite=suite,
            floors=asdict(spec.floors),
            machine=machine_record(),
            root=str(out_dir.resolve()),
        )
        manifest.outcomes = measure_outcomes(manifest, advance=bars.advance("evaluate", len(experts) + 1))
        timings["evaluate"] = time.perf_counter() - t0

    timings["total"] = time.perf_counter() - t_all
    manifest.timings = {k: round(v, 1) for k, v in timings.items()}
    manifest.jobs = {k: jobs_stats[k] for k in ["pretrain_base", *(_job_name(j) for j in jobs)] if k in jobs_stats}
    manifest.failures = check_floors(manifest, spec.floors)
    manifest.save(out_dir)
    return manifest


FULL_JOB = "full"  # the job name of the full fine-tuned domain model (the others are skill names)
# Relative cost of each job (CPU seconds on the small zoo; increment's with the plateau stop), for ordering.
_JOB_COST = {
    "caesar": 82,
    "dashes": 75,
    "double": 67,
    "uppercase": 55,
    "increment": 50,
    "reverse": 25,
    FULL_JOB: 19,
    "count": 16,
    "max": 12,
}


def _job_name(job: str) -> str:
    return f"domain-{MODEL_EXPERT_DOMAIN}" if job == FULL_JOB else SKILLS[job].expert_name


def _job_label(job: str) -> str:
    return f"{'full' if job == FULL_JOB else 'LoRA'} {_job_name(job)}"


def _workers(n_jobs: int) -> int:
    """Processes for expert training: MOERGE_ZOO_WORKERS, else one per core (at most 2: the
    per-expert runs are small), never more than the jobs."""
    wanted = int(os.environ.get("MOERGE_ZOO_WORKERS", "0")) or min(2, os.cpu_count() or 1)
    return max(1, min(wanted, n_jobs))


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()


def _expert_data(spec: ZooSize, seed: int, job: str) -> tuple[list[Example], list[Example]]:
    """(train, validation) examples of a job; deterministic, so the parent rebuilds them for the
    manifest instead of receiving them from the worker."""
    if job == FULL_JOB:
        skills = list(MODEL_EXPERT_SKILLS)
        n = spec.full.steps * spec.full.batch_size // len(skills)
    else:
        skills, n = [job], spec.lora.steps * spec.lora.batch_size
    return make_split("train", n, seed, skills), make_split("validation", spec.n_validation, seed, skills)


def _train_expert(
    out_dir: str, size: str, seed: int, job: str, on_step: Callable[[int, float], None] | None = None
) -> tuple[str, dict]:
    """Train one expert from the saved base and save it under ``experts/`` (runs in a worker).
    Returns the job and its training stats (steps, seconds, checks; ``wall``: load to save)."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    stats: dict = {"worker": os.getpid(), "started": time.time()}
    spec, root = SIZES[size], Path(out_dir)
    # the zoo's own base: a Llama with its byte-level BPE tokenizer (build_base)
    tok = cast(PreTrainedTokenizerFast, AutoTokenizer.from_pretrained(str(root / "base")))
    base = cast(LlamaForCausalLM, AutoModelForCausalLM.from_pretrained(str(root / "base")))
    train, val = _expert_data(spec, seed, job)
    model: Any  # the full model, or the PeftModel of an adapter
    pairs = [(e.prompt, e.reference) for e in train]
    if job == FULL_JOB:
        model, _ = train_full(
            base,
            tok,
            pairs,
            spec.full,
            seed,
            on_step=on_step,
            good_enough=_passes(tok, val, spec.stop_at, stats, spec.plateau_at),
            stats=stats,
        )
        rel = root / "experts" / _job_name(job)
        model.save_pretrained(rel)
        tok.save_pretrained(str(rel))
    else:
        i = list(SKILLS).index(job)
        model, _ = train_lora(
            base,
            tok,
            pairs,
            spec.lora,
            spec.lora_rank,
            spec.lora_alpha,
            seed + i,
            on_step=on_step,
            good_enough=_passes(tok, val, spec.stop_at, stats, spec.plateau_at),
            stats=stats,
        )
        model.save_pretrained(root / "experts" / _job_name(job))
    stats["wall"] = round(time.perf_counter() - t0, 1)
    stats["cpu"] = round(time.process_time() - cpu0, 1)  # CPU seconds of this process (load-independent)
    return job, stats


def _expert_entry(out_dir: Path, spec: ZooSize, seed: int, job: str) -> ExpertEntry:
    train, val = _expert_data(spec, seed, job)
    if job == FULL_JOB:
        name = _job_name(job)
        skills = list(MODEL_EXPERT_SKILLS)
        return _entry(
            out_dir,
            name,
            "model",
            f"experts/{name}",
            [MODEL_EXPERT_DOMAIN],
            skills,
            f"Full fine-tune of {BASE_NAME} on the {MODEL_EXPERT_DOMAIN} domain's counting skills "
            f"({', '.join(skills)}): a standalone model, not an adapter.",
            train,
            val,
        )
    skill = SKILLS[job]
    return _entry(
        out_dir,
        skill.expert_name,
        "adapter",
        f"experts/{skill.expert_name}",
        [skill.domain],
        [job],
        f"LoRA (r={spec.lora_rank}) on {BASE_NAME} for the '{job}' skill: "
        f"{skill.templates[0].lower()}. Tags: {', '.join(skill.tags)}.",
        train,
        val,
    )


def _passes(
    tok, validation: list[Example], threshold: float, stats: dict | None = None, plateau: float = 1.01
) -> Callable[[torch.nn.Module], bool]:
    """Stop condition for expert training: every task of the validation split at ``threshold``,
    or at ``plateau`` on two checks in a row. With ``stats``, each check's accuracy (the lowest
    over the tasks) goes to ``stats["val"]``."""
    seen: list[float] = []

    def check(model: torch.nn.Module) -> bool:
        acc = min(accuracy_by_task(model, tok, validation).values())
        seen.append(acc)
        if stats is not None:
            stats["val"] = [round(a, 3) for a in seen]
        return acc >= threshold or (len(seen) >= 2 and min(seen[-2:]) >= plateau)

    return check


def _entry(
    out_dir: Path,
    name: str,
    kind: str,
    rel: str,
    domains: list[str],
    skills: list[str],
    description: str,
    train: list[Example],
    val: list[Example],
) -> ExpertEntry:
    tr, va = f"examples/{name}/train.jsonl", f"examples/{name}/validation.jsonl"
    _write_examples(out_dir / tr, train)
    _write_examples(out_dir / va, val)
    return ExpertEntry(name, kind, rel, BASE_NAME, domains, skills, description, tr, va)


def measure_outcomes(manifest: ZooManifest, advance: Callable[[], None] = lambda: None) -> dict[str, dict[str, float]]:
    """Exact match of the base and of every expert on every skill's test split."""
    test = read_examples(manifest.path_of(manifest.suite["test"]))
    base_dir = manifest.path_of(manifest.base.path)
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    out = {manifest.base.name: accuracy_by_task(base, tok, test)}
    advance()
    adapters = [e for e in manifest.experts if e.kind == "adapter"]
    if adapters:
        peft_model = PeftModel.from_pretrained(
            base, str(manifest.path_of(adapters[0].path)), adapter_name=adapters[0].name
        )
        for e in adapters[1:]:
            peft_model.load_adapter(str(manifest.path_of(e.path)), adapter_name=e.name)
        for e in adapters:
            peft_model.set_adapter(e.name)
            out[e.name] = accuracy_by_task(peft_model, tok, test)
            advance()
    for e in manifest.experts:
        if e.kind == "model":
            model = AutoModelForCausalLM.from_pretrained(str(manifest.path_of(e.path)))
            out[e.name] = accuracy_by_task(model, tok, test)
            advance()
    return out


def check_floors(manifest: ZooManifest, floors: Floors) -> list[str]:
    failures = []
    for skill, acc in manifest.outcomes.get(manifest.base.name, {}).items():
        if acc > floors.base_max:
            failures.append(f"{manifest.base.name} scores {acc:.0%} on {skill} (max {floors.base_max:.0%})")
    for e in manifest.experts:
        for skill, acc in manifest.outcomes.get(e.name, {}).items():
            if skill in e.skills and acc < floors.own_min:
                failures.append(f"{e.name} scores {acc:.0%} on its own skill {skill} (min {floors.own_min:.0%})")
            if skill not in e.skills and acc > floors.foreign_max:
                failures.append(f"{e.name} scores {acc:.0%} on foreign skill {skill} (max {floors.foreign_max:.0%})")
    own = [acc for e in manifest.experts for s, acc in manifest.outcomes.get(e.name, {}).items() if s in e.skills]
    if own and max(own) < floors.best_own_min:
        failures.append(f"no expert reaches {floors.best_own_min:.0%} on its own skill (best {max(own):.0%})")
    return failures
