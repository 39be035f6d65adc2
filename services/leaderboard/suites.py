"""Benchmark suites: the zoo's ``skills`` suite built in, and user suites imported from JSONL.

A user suite is one JSON object per line::

    {"prompt": "...", "reference": "...", "task": "reverse", "split": "test", "metric": "exact_match"}
    {"prompt": "...", "reference": "b", "choices": ["a", "b", "c"], "split": "test", "metric": "multiple_choice"}

``prompt``, ``reference`` and ``split`` are required; ``task`` (the gold task, for routing accuracy
and the oracle) defaults to ""; ``metric`` is ``exact_match`` (default), ``contains`` or
``multiple_choice`` (log-likelihood of each of ``choices``; ``reference`` must be one of them)
or ``loss``: a text suite's document, scored by its held-out loss in nats per token rather than
by an answer. A ``loss`` row gives its text as ``prompt`` or as labelled ``segments`` (a document
that mixes domains), and needs no ``reference``::

    {"segments": [["prose", "Intro text. "], ["python", "def f():\n    return 1\n"]], "split": "mixed", "metric": "loss"}
    {"prompt": "SELECT 1;", "task": "sql", "split": "test", "metric": "loss"}

Each token's loss is booked to the segment its first character is in (a ``prompt`` row is one
segment, labelled with its ``task``, else ``text``); ``task`` defaults to the first segment's label.
Import checks every line first and reports every bad one with its line number; the suite is then
stored in one transaction, so a file with any bad row imports nothing.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from registry.errors import MoergeError, NotFoundError
from registry.models import SUITE_METRICS, Suite
from registry.service import Registry

BUILTIN_SUITES = ("skills",)
SKILLS_SPLITS = ("test", "paraphrase", "composition")
RESERVED_SPLITS = ("all",)  # the leaderboard's pooled row
FIELDS = {"prompt", "reference", "task", "split", "metric", "choices", "segments"}
TEXT_LABEL = "text"  # the segment label of a loss row given as one ``prompt``
SPLIT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
MAX_ROWS = 200_000
MAX_TEXT = 100_000
MAX_ERRORS_SHOWN = 20


class SuiteImportError(MoergeError):
    """A suite file with bad rows; ``errors`` holds (line, message) for every one of them."""

    def __init__(self, path: str | Path, errors: list[tuple[int, str]]) -> None:
        self.errors = errors
        shown = "\n".join(f"  line {n}: {msg}" for n, msg in errors[:MAX_ERRORS_SHOWN])
        more = f"\n  … and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
        super().__init__(f"{path}: {len(errors)} bad row(s), nothing was imported:\n{shown}{more}")


@dataclass(frozen=True)
class Query:
    """One question of a suite, whatever its origin."""

    prompt: str
    reference: str
    task: str
    split: str
    metric: str = "exact_match"
    choices: tuple[str, ...] = ()
    segments: tuple[tuple[str, str], ...] = ()  # metric loss: (label, text) in document order


# ------------------------------------------------------------------------------------ metrics


def is_correct(query: Query, prediction: str) -> bool:
    """Generation metrics; ``multiple_choice`` predictions are the chosen choice itself."""
    if query.metric == "contains":
        return query.reference.strip().lower() in prediction.lower()
    return prediction.strip() == query.reference.strip()  # exact_match, and the chosen choice


# ------------------------------------------------------------------------------------ import


def parse_rows(path: str | Path) -> list[dict]:
    """Validate a suite JSONL file; returns its rows (with their ``line``) or raises
    ``SuiteImportError`` naming every bad line."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"suite file {str(path)!r} does not exist")
    rows: list[dict] = []
    errors: list[tuple[int, str]] = []
    seen: dict[tuple[str, str], int] = {}
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                errors.append((n, f"not UTF-8 ({exc.reason} at byte {exc.start})"))
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                errors.append((n, f"not valid JSON ({exc.msg}, column {exc.colno})"))
                continue
            problems = _row_problems(obj)
            if problems:
                errors.extend((n, p) for p in problems)
                continue
            loss = obj.get("metric") == "loss"
            segments = [(str(d), str(t)) for d, t in obj["segments"]] if "segments" in obj else None
            if loss and segments is None:
                segments = [(obj.get("task") or TEXT_LABEL, obj["prompt"])]
            prompt = "".join(t for _, t in segments) if segments else obj["prompt"]
            key = (obj["split"], prompt)
            if key in seen:
                errors.append((n, f"duplicate of line {seen[key]} (same prompt in split {obj['split']!r})"))
                continue
            seen[key] = n
            rows.append(
                {
                    "line": n,
                    "prompt": prompt,
                    "reference": obj.get("reference", ""),
                    "task": obj.get("task") or (segments[0][0] if segments else ""),
                    "split": obj["split"],
                    "metric": obj.get("metric", "exact_match"),
                    "choices": list(obj["choices"]) if obj.get("metric") == "multiple_choice" else None,
                    "segments": [list(seg) for seg in segments] if segments else None,
                }
            )
            if len(rows) > MAX_ROWS:
                errors.append((n, f"more than {MAX_ROWS} rows"))
                break
    if not rows and not errors:
        errors.append((0, "the file has no rows"))
    if errors:
        raise SuiteImportError(path, errors)
    return rows


def _row_problems(obj: object) -> list[str]:
    if not isinstance(obj, dict):
        return [f"expected a JSON object, got {type(obj).__name__}"]
    out = []
    unknown = sorted(set(obj) - FIELDS)
    if unknown:
        out.append(f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(FIELDS))}")
    metric = obj.get("metric", "exact_match")
    loss = metric == "loss"
    required = ("split",) if loss else ("prompt", "reference", "split")
    for key in required:
        if key not in obj:
            out.append(f"missing {key!r}")
    for key in ("prompt", "reference", "task", "split", "metric"):
        if key in obj and not isinstance(obj[key], str):
            out.append(f"{key!r} must be a string, not {type(obj[key]).__name__}")
        elif key in obj and len(obj[key]) > MAX_TEXT:
            out.append(f"{key!r} is longer than {MAX_TEXT} characters")
    if loss:
        out.extend(_text_problems(obj))
    elif "segments" in obj:
        out.append("'segments' is only for metric loss")
    elif isinstance(obj.get("prompt"), str) and not obj["prompt"].strip():
        out.append("'prompt' is empty")
    split = obj.get("split")
    if isinstance(split, str) and not SPLIT_RE.match(split):
        out.append(f"split {split!r}: use 1-32 letters, digits, '.', '_' or '-'")
    elif isinstance(split, str) and split in RESERVED_SPLITS:
        out.append(f"split {split!r} is reserved (the leaderboard's pooled row)")
    if isinstance(obj.get("task"), str) and len(obj["task"]) > 128:
        out.append("'task' is longer than 128 characters")
    if isinstance(metric, str) and metric not in SUITE_METRICS:
        out.append(f"metric {metric!r} is not one of {', '.join(SUITE_METRICS)}")
    if metric == "contains" and isinstance(obj.get("reference"), str) and not obj["reference"].strip():
        out.append("metric contains needs a non-empty 'reference' (every answer contains the empty string)")
    choices = obj.get("choices")
    if metric == "multiple_choice":
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            out.append("multiple_choice needs 'choices': a list of at least 2 non-empty strings")
        elif len(set(choices)) != len(choices):
            out.append("'choices' has duplicates")
        elif isinstance(obj.get("reference"), str) and obj["reference"] not in choices:
            out.append(f"reference {obj['reference']!r} is not one of the choices")
    elif choices is not None:
        out.append("'choices' is only for metric multiple_choice")
    return out


def _text_problems(obj: dict) -> list[str]:
    """A loss row's text: ``prompt`` or ``segments`` ([[label, text], ...]), one of the two."""
    if "segments" in obj and "prompt" in obj:
        return ["give the text as 'prompt' or as 'segments', not both"]
    if "segments" not in obj:
        if isinstance(obj.get("prompt"), str) and not obj["prompt"].strip():
            return ["'prompt' is empty"]
        return [] if "prompt" in obj else ["metric loss needs the text: 'prompt' or 'segments'"]
    segments = obj["segments"]
    if (
        not isinstance(segments, list)
        or not segments
        or not all(isinstance(s, list) and len(s) == 2 and all(isinstance(x, str) for x in s) for s in segments)
    ):
        return ["'segments' must be a non-empty list of [label, text] string pairs"]
    out = []
    if any(not label.strip() or len(label) > 128 for label, _ in segments):
        out.append("every segment needs a label of 1-128 characters")
    if any(not text for _, text in segments):
        out.append("a segment's text is empty")
    if sum(len(text) for _, text in segments) > MAX_TEXT:
        out.append(f"the segments' text is longer than {MAX_TEXT} characters")
    return out


def import_suite(
    registry: Registry, name: str, path: str | Path, *, description: str = "", replace: bool = False
) -> Suite:
    """Validate ``path`` completely, then store it as suite ``name`` in one transaction."""
    if name in BUILTIN_SUITES:
        raise MoergeError(f"suite name {name!r} is built in; choose another name")
    rows = parse_rows(path)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return registry.add_suite(
        name, rows, description=description, source=str(Path(path).resolve()), checksum=digest, replace=replace
    )


# ------------------------------------------------------------------------------------ loading


def suite_splits(registry: Registry, suite: str) -> list[str]:
    """The splits a suite has, in a stable order (the skills suite: test, paraphrase, composition)."""
    if suite == "skills":
        return list(SKILLS_SPLITS)
    return list(dict.fromkeys(e.split for e in registry.get_suite_examples(suite)))


def load_queries(
    registry: Registry, suite: str, splits: list[str] | None = None, n_per_task: int | None = None, seed: int = 0
) -> dict[str, list[Query]]:
    """The suite's queries per split. The skills suite is drawn from ``seed`` exactly as
    ``evaluate`` draws it; a user suite keeps file order, and with ``n_per_task`` takes a seeded
    sample of each task (in file order), so the same seed always gives the same queries."""
    available = suite_splits(registry, suite)
    splits = list(splits or available)
    unknown = [s for s in splits if s not in available and not (suite == "skills" and s == "validation")]
    if unknown:
        raise NotFoundError(
            f"suite {suite!r} has no split {', '.join(map(repr, unknown))}; it has {', '.join(available)}"
        )
    if suite == "skills":
        from services.moe.evaluate import load_suite

        return {
            split: [Query(e.prompt, e.reference, e.task, split) for e in load_suite("skills", split, n_per_task, seed)]
            for split in splits
        }
    rows = registry.get_suite_examples(suite)
    out: dict[str, list[Query]] = {}
    for split in splits:
        chosen = [r for r in rows if r.split == split]
        if n_per_task is not None:
            by_task: dict[str, list] = defaultdict(list)
            for r in chosen:
                by_task[r.task].append(r)
            keep: set[int] = set()
            for task, items in by_task.items():
                picked = (
                    items
                    if len(items) <= n_per_task
                    else random.Random(f"{seed}:{split}:{task}").sample(items, n_per_task)
                )
                keep.update(r.id for r in picked)
            chosen = [r for r in chosen if r.id in keep]
        out[split] = [
            Query(
                r.prompt,
                r.reference,
                r.task,
                r.split,
                r.metric,
                tuple(r.choices or ()),
                tuple((str(d), str(t)) for d, t in (r.segments or ())),
            )
            for r in chosen
        ]
    return out
