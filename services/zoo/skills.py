"""The zoo's skill suite: small string and number skills with held-in and unseen wordings.

Every skill has a reference function, an input generator whose inputs make the copy answer wrong,
three instruction templates used for train / validation / test and two paraphrases that training
never sees. ``make_split`` draws examples deterministically from a seed; an input lands in the
training pool or the held-out pool by a hash of (skill, input), so train and test never share an
input whatever their sizes. Inputs are rejected when another skill's answer, or a generic
pre-training task's answer, would coincide with the reference: a model that does the wrong thing
then scores zero rather than by luck.

The *generic* tasks (copy, rotate, lowercase, subtract, min, …) are what the base model is
pre-trained on. They are deliberately related to the suite but never equal to it, so the base can
emit every character the experts need without knowing any skill.
"""

from __future__ import annotations

import random
import string
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

LOWER = string.ascii_lowercase
DIGITS = string.digits

SPLITS = ("train", "validation", "test", "paraphrase", "composition")
ANSWER_CUE = "\nAnswer: "


def format_prompt(instruction: str, text: str) -> str:
    """The one prompt format of the zoo: instruction, the input on its own line, an answer cue."""
    return f"{instruction}\n{text}{ANSWER_CUE}"


def exact_match(pred: str, ref: str) -> bool:
    return pred.strip() == ref.strip()


# --------------------------------------------------------------------------------------------
# Reference functions and input generators
# --------------------------------------------------------------------------------------------


def _letters(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(LOWER) for _ in range(rng.randint(lo, hi)))


def _digits(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(DIGITS) for _ in range(rng.randint(lo, hi)))


def _increment(x: str) -> str:
    if not x.isdigit():
        raise ValueError("increment takes a number")
    return str(int(x) + 1)


def _count(x: str) -> str:
    if not x.isalpha():
        raise ValueError("count takes letters")
    return str(len(x))


def _max_digit(x: str) -> str:
    if not x.isdigit():
        raise ValueError("max takes digits")
    return max(x)


def _reverse(x: str) -> str:
    return x[::-1]


def _double(x: str) -> str:
    return "".join(c + c for c in x)


def _upper(x: str) -> str:
    return x.upper()


def _caesar(x: str) -> str:
    return "".join(LOWER[(LOWER.index(c) + 1) % 26] if c in LOWER else c for c in x)


def _dashes(x: str) -> str:
    return "-".join(x)


def _gen_increment(rng: random.Random) -> str:
    return str(rng.randint(0, 999))


def _gen_count(rng: random.Random) -> str:
    return _letters(rng, 2, 9)


def _gen_max(rng: random.Random) -> str:
    while True:
        x = _digits(rng, 4, 7)
        if len(set(x)) > 1:
            return x


def _gen_reverse(rng: random.Random) -> str:
    while True:
        x = _letters(rng, 4, 8)
        if x != x[::-1]:
            return x


def _gen_double(rng: random.Random) -> str:
    return _letters(rng, 2, 6)


def _gen_upper(rng: random.Random) -> str:
    return _letters(rng, 3, 8)


def _gen_caesar(rng: random.Random) -> str:
    return _letters(rng, 3, 8)


def _gen_dashes(rng: random.Random) -> str:
    return _letters(rng, 2, 8)


@dataclass(frozen=True)
class Skill:
    name: str
    domain: str  # "math" | "text"
    tags: tuple[str, ...]
    templates: tuple[str, ...]  # held-in wordings: train / validation / test
    paraphrases: tuple[str, ...]  # unseen wordings, never trained on
    clause: str  # how a chained request names this step ("reverse it")
    generate: Callable[[random.Random], str] = field(repr=False)
    apply: Callable[[str], str] = field(repr=False)

    @property
    def expert_name(self) -> str:
        return f"skill-{self.name}"


SKILLS: dict[str, Skill] = {
    s.name: s
    for s in [
        Skill(
            "increment",
            "math",
            ("arithmetic", "addition", "successor", "numbers"),
            ("Add one to the number", "Increment the number", "What comes after this number?"),
            ("Give the next integer", "Count one up from here"),
            "add one",
            _gen_increment,
            _increment,
        ),
        Skill(
            "count",
            "math",
            ("counting", "length", "letters", "numbers"),
            ("Count the letters", "How many letters?", "Give the length"),
            ("Number of characters here?", "Tell me how long this word is"),
            "count the letters",
            _gen_count,
            _count,
        ),
        Skill(
            "max",
            "math",
            ("maximum", "largest", "digits", "comparison"),
            ("Find the largest digit", "Which digit is biggest?", "Give the max digit"),
            ("Pick the highest digit", "What is the greatest digit here?"),
            "take the largest digit",
            _gen_max,
            _max_digit,
        ),
        Skill(
            "reverse",
            "text",
            ("reversal", "string", "order", "backwards"),
            ("Reverse the string", "Write it backwards", "Reverse this text"),
            ("Flip the letter order", "Spell it back to front"),
            "reverse it",
            _gen_reverse,
            _reverse,
        ),
        Skill(
            "double",
            "text",
            ("doubling", "repeat", "letters", "stutter"),
            ("Double every letter", "Write each letter twice", "Repeat each letter"),
            ("Say every character two times", "Stutter each letter"),
            "double every letter",
            _gen_double,
            _double,
        ),
        Skill(
            "uppercase",
            "text",
            ("case", "capital", "uppercase", "letters"),
            ("Convert to uppercase", "Make it upper case", "Write in capitals"),
            ("Use all capital letters", "Shout this word"),
            "make it uppercase",
            _gen_upper,
            _upper,
        ),
        Skill(
            "caesar",
            "text",
            ("cipher", "shift", "encode", "letters"),
            ("Shift each letter by one", "Apply a Caesar shift of 1", "Encode with shift +1"),
            ("Move every letter one step on", "Replace each letter by the next"),
            "shift each letter by one",
            _gen_caesar,
            _caesar,
        ),
        Skill(
            "dashes",
            "text",
            ("separators", "hyphens", "spelling", "letters"),
            ("Put dashes between the letters", "Spell it with hyphens", "Join the letters with dashes"),
            ("Separate each character by a minus sign", "Hyphenate every letter"),
            "put dashes between the letters",
            _gen_dashes,
            _dashes,
        ),
    ]
}

DOMAINS: dict[str, tuple[str, ...]] = {
    d: tuple(n for n, s in SKILLS.items() if s.domain == d) for d in ("math", "text")
}

# Chained text skills (first, second). Pairs whose chain equals one component (reverse then sort
# is just sort) or which need an input the first step may not give (dedupe second) are left out.
COMPOSITIONS: tuple[tuple[str, str], ...] = (
    ("reverse", "uppercase"),
    ("caesar", "reverse"),
    ("reverse", "caesar"),
    ("caesar", "uppercase"),
    ("reverse", "dashes"),
    ("caesar", "dashes"),
)
COMPOSITION_TEMPLATES = ("{a}, then {b}", "First {a}, and then {b}")


def composition_name(parts: tuple[str, ...]) -> str:
    return "+".join(parts)


# --------------------------------------------------------------------------------------------
# Generic pre-training tasks: related to the suite, never equal to it
# --------------------------------------------------------------------------------------------

MIXED = string.ascii_letters + string.digits


def _mixed(rng: random.Random, lo: int, hi: int, alphabet: str = MIXED) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


@dataclass(frozen=True)
class GenericTask:
    name: str
    templates: tuple[str, ...]
    generate: Callable[[random.Random], str] = field(repr=False)
    apply: Callable[[str], str] = field(repr=False)
    weight: int = 1  # relative share of pre-training rows


GENERIC_TASKS: dict[str, GenericTask] = {
    t.name: t
    for t in [
        # Copying is what every skill builds on (measured: a base that copies well lets a rank-16
        # LoRA learn a copy-family skill in ~150 steps; one that does not, never gets there), so
        # half of the pre-training rows are copies, of lowercase words and of mixed text (which
        # also makes the base emit uppercase letters and digits).
        GenericTask(
            "repeat", ("Repeat it", "Say it again", "Echo the text"), lambda r: _letters(r, 2, 9), lambda x: x, weight=2
        ),
        GenericTask(
            "copy",
            ("Copy the text", "Repeat it exactly", "Write the same"),
            lambda r: _mixed(r, 2, 9, MIXED + "-.,:"),
            lambda x: x,
            weight=2,
        ),
        GenericTask(
            "twice",
            ("Write it twice", "Say it two times", "Double the text"),
            lambda r: _mixed(r, 1, 5),
            lambda x: x + x,
        ),
        GenericTask(
            "rotate",
            ("Move the first letter to the end", "Rotate left by one", "Rotate the text"),
            lambda r: _mixed(r, 3, 8),
            lambda x: x[1:] + x[:1],
        ),
        GenericTask(
            "lowercase",
            ("Convert to lowercase", "Make it lower case", "Write in small letters"),
            lambda r: _mixed(r, 3, 8, string.ascii_letters),
            lambda x: x.lower(),
        ),
        GenericTask(
            "capitalize",
            ("Capitalize the first letter", "Start with a capital", "Capitalize it"),
            lambda r: _letters(r, 2, 8),
            lambda x: x[:1].upper() + x[1:],
        ),
        # The primitives of the slow skills, with other constants (measured: from a base without
        # them, dashes, double and caesar needed up to the whole 1,080-step budget): spaces
        # between the characters (dashes), each character three times (double), every letter
        # one back (caesar).
        GenericTask(
            "spaced",
            ("Put spaces between the characters", "Spell it with spaces", "Space it out"),
            lambda r: _mixed(r, 2, 8),
            lambda x: " ".join(x),
        ),
        GenericTask(
            "triple",
            ("Write each character three times", "Triple every character", "Say each one thrice"),
            lambda r: _mixed(r, 1, 4),
            lambda x: "".join(c * 3 for c in x),
        ),
        GenericTask(
            "shift_back",
            ("Shift each letter back by one", "Move every letter one step back", "Decode with shift -1"),
            lambda r: _letters(r, 3, 8),
            lambda x: "".join(LOWER[(LOWER.index(c) - 1) % 26] if c in LOWER else c for c in x),
        ),
    ]
}


def generic_example(rng: random.Random) -> tuple[str, str]:
    """One (prompt, answer) pair of a random generic task: the base's instruction-format data."""
    tasks = list(GENERIC_TASKS.values())
    task = rng.choices(tasks, weights=[t.weight for t in tasks])[0]
    x = task.generate(rng)
    return format_prompt(rng.choice(task.templates), x), task.apply(x)


def random_text(rng: random.Random, lo: int = 16, hi: int = 48) -> str:
    """Language-modelling filler over the whole printable vocabulary: word-like runs of letters,
    digits and punctuation, so every character the experts emit has been a training target. Half
    of the lines repeat one random chunk: predicting a repeat is dense practice at copying from
    context (the induction heads every skill builds on)."""
    n = rng.randint(lo, hi)
    if rng.random() < 0.5:
        chunk = _mixed(rng, 3, 10, MIXED if rng.random() < 0.5 else LOWER)
        sep = rng.choice([" ", "\n", " | ", ", "])
        return sep.join([chunk] * (n // (len(chunk) + len(sep)) + 1))[:n]
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < n:
        kind = rng.random()
        if kind < 0.45:
            w = _letters(rng, 1, 7)
        elif kind < 0.65:
            w = _mixed(rng, 1, 6, string.ascii_uppercase)
        elif kind < 0.85:
            w = _digits(rng, 1, 4)
        else:
            w = _mixed(rng, 1, 3, string.punctuation)
        words.append(w)
    return " ".join(words)[:n]


# --------------------------------------------------------------------------------------------
# Examples and splits
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    prompt: str
    reference: str
    task: str  # a skill name, or "a+b" for a composition
    split: str
    skills: tuple[str, ...]
    domain: str
    instruction: str = ""
    input: str = ""
    metric: str = "exact_match"  # a user suite's query may be scored by "contains" (services.moe.evaluate)

    def to_json(self) -> dict:
        return {
            "prompt": self.prompt,
            "reference": self.reference,
            "task": self.task,
            "split": self.split,
            "skills": list(self.skills),
            "domain": self.domain,
            "instruction": self.instruction,
            "input": self.input,
        }

    @classmethod
    def from_json(cls, d: dict) -> "Example":
        return cls(**{**d, "skills": tuple(d["skills"])})


def _bucket(task: str, x: str) -> str:
    """Which pool an input belongs to, fixed by its hash: 70% train, 10% validation, 20% held out
    (test, paraphrase and composition). Independent of the seed, so no seed ever leaks."""
    b = zlib.crc32(f"{task}|{x}".encode()) % 10
    return "train" if b < 7 else "validation" if b == 7 else "heldout"


def _pool(split: str) -> str:
    return {"train": "train", "validation": "validation"}.get(split, "heldout")


def _other_answers(x: str, exclude: str) -> set[str]:
    """The answers every other skill and generic task would give on ``x`` (where they apply)."""
    out = {x}
    fns = [s.apply for n, s in SKILLS.items() if n != exclude] + [t.apply for t in GENERIC_TASKS.values()]
    for fn in fns:
        try:
            out.add(fn(x))
        except (ValueError, IndexError):
            pass
    return out


def _draw(
    rng: random.Random, gen: Callable[[random.Random], str], ok: Callable[[str], bool], n: int, key: str, pool: str
) -> list[str]:
    seen: list[str] = []
    have: set[str] = set()
    for _ in range(n * 200):
        if len(seen) == n:
            break
        x = gen(rng)
        if x in have or _bucket(key, x) != pool or not ok(x):
            continue
        have.add(x)
        seen.append(x)
    return seen


def skill_examples(skill: str, split: str, n: int, seed: int = 0) -> list[Example]:
    s = SKILLS[skill]
    rng = random.Random(f"{seed}:{split}:{skill}")
    templates = s.paraphrases if split == "paraphrase" else s.templates
    inputs = _draw(rng, s.generate, lambda x: s.apply(x) not in _other_answers(x, skill), n, skill, _pool(split))
    out = []
    for i, x in enumerate(inputs):
        instr = templates[i % len(templates)] if split != "train" else rng.choice(templates)
        out.append(Example(format_prompt(instr, x), s.apply(x), skill, split, (skill,), s.domain, instr, x))
    return out


def composition_examples(parts: tuple[str, ...], n: int, seed: int = 0) -> list[Example]:
    first = SKILLS[parts[0]]
    rng = random.Random(f"{seed}:composition:{composition_name(parts)}")

    def chain(x: str) -> str:
        for p in parts:
            x = SKILLS[p].apply(x)
        return x

    def ok(x: str) -> bool:
        y = chain(x)
        return y not in {x} | {SKILLS[p].apply(x) for p in parts}

    inputs = _draw(rng, first.generate, ok, n, parts[0], "heldout")
    out = []
    for i, x in enumerate(inputs):
        clauses = [SKILLS[p].clause for p in parts]
        instr = COMPOSITION_TEMPLATES[i % len(COMPOSITION_TEMPLATES)].format(a=clauses[0], b=clauses[1])
        instr = instr[0].upper() + instr[1:]
        out.append(
            Example(
                format_prompt(instr, x),
                chain(x),
                composition_name(parts),
                "composition",
                tuple(parts),
                "text",
                instr,
                x,
            )
        )
    return out


def make_split(split: str, n_per_task: int, seed: int = 0, skills: list[str] | None = None) -> list[Example]:
    """``n_per_task`` examples of every skill (or of every composition) for one split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if split == "composition":
        return [e for parts in COMPOSITIONS for e in composition_examples(parts, n_per_task, seed)]
    return [e for name in (skills or SKILLS) for e in skill_examples(name, split, n_per_task, seed)]


def generic_probe(tasks: Sequence[str], n_per_task: int, seed: int = 0) -> list[Example]:
    """Held-out prompts of generic pre-training tasks, to check what the base has learnt. Drawn
    from their own random stream, so they are not the pre-training rows (short inputs may still
    coincide with some: a probe, not a test split)."""
    rng = random.Random(f"{seed}:probe")
    out = []
    for name in tasks:
        task = GENERIC_TASKS[name]
        for _ in range(n_per_task):
            x = task.generate(rng)
            instruction = rng.choice(task.templates)
            out.append(
                Example(format_prompt(instruction, x), task.apply(x), name, "probe", (name,), "generic", instruction, x)
            )
    return out
