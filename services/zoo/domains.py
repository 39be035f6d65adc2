"""The domains suite's text: five domains whose tokens differ, and documents that mix them.

Every document is generated from a seed, so every machine gets the same bytes without a download
(``corpus_digest`` is what a build records and checks). The domains:

- ``python``: functions and classes, loops, conditions, calls, comments;
- ``prose``: English paragraphs (narrative and explanatory sentences);
- ``arithmetic``: worked arithmetic, one step per line;
- ``data``: JSON records, CSV tables and YAML configs;
- ``shell``: shell sessions and scripts (commands, flags, paths, pipes).

Mixed documents interleave them as real files do: Python with docstrings, Markdown with fenced
code and data blocks, prose with inline worked arithmetic. Each is a list of ``Segment``s, so every
character (and so every token) carries the domain it belongs to.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

DOMAINS = ("python", "prose", "arithmetic", "data", "shell")
SPLITS = ("train", "validation", "test")

NOUNS = (
    "river city garden window teacher market letter mountain village doctor library kitchen "
    "harbor bridge forest student engine island painter station orchard valley museum story "
    "journey morning winter summer road lamp table family neighbour season lesson question "
    "answer picture coast field farmer ship storm voice friend child house book song tower"
).split()
VERBS = (
    "load parse build fetch merge filter count sort render update check compute format read "
    "write split clean index score train send"
).split()
ADVERBS = "slowly carefully quickly quietly often rarely always gladly suddenly finally".split()
PREPOSITIONS = "near across behind beside under over through along toward beyond".split()
CONNECTORS = ("However,", "Later,", "In the morning,", "Because of this,", "At last,", "Meanwhile,", "Still,")
NAMES = "Anna Tomas Mira Jonah Elena Felix Priya Oskar Lena Hugo".split()
FIELDS = "id name price count city status email score created_at active tags owner size level".split()
STATUSES = ("open", "closed", "pending", "failed", "ready")
PATHS = ("/var/log", "/etc/nginx", "~/projects", "/tmp/build", "src", "data/raw", "/usr/local/bin", "logs")
FILES = ("app.log", "config.yaml", "main.py", "notes.txt", "report.csv", "backup.tar.gz", "index.html", "Makefile")
COMMANDS = (
    "ls -la {path}",
    "cd {path}",
    'grep -rn "{word}" {path} | sort | uniq -c',
    'find {path} -name "*.{ext}" -mtime -{n}',
    "tar -czf {word}-{n}.tar.gz {path}",
    "cp {file} {path}/",
    "mkdir -p {path}/{word}",
    "chmod +x {path}/{word}.sh",
    'export {VAR}="{path}"',
    'echo "${VAR}" >> {file}',
    "cat {file} | wc -l",
    "du -sh {path}/* | sort -h",
    "ps aux | grep {word} | head -n {n}",
    "git log --oneline -n {n}",
    "curl -s http://localhost:{port}/{word} | jq .",
    "sed -i 's/{word}/{word2}/g' {file}",
    "rm -rf {path}/{word}",
    "ssh deploy@{word}.example.org 'systemctl restart {word}'",
)


@dataclass(frozen=True)
class Segment:
    domain: str
    text: str


# ---------------------------------------------------------------------------------------------
# One document per domain
# ---------------------------------------------------------------------------------------------


# Prose keeps to one topic per paragraph and one person per paragraph: a model learns, from the
# first sentence on, which dozen nouns and verbs can follow; structure beyond the next word that a
# prose expert has more to learn of than a base trained on everything
TOPICS = {
    "sea": ("harbor ship coast wave sailor island lighthouse net fisherman tide".split(),
            "salty stormy calm blue windy".split(), "sailed anchored steered mended watched".split()),
    "farm": ("orchard field farmer barn harvest tractor goat meadow fence well".split(),
             "golden dusty green muddy wide".split(), "planted gathered fed ploughed repaired".split()),
    "city": ("station market street tower bridge tram cafe museum crowd square".split(),
             "crowded busy noisy grey bright".split(), "crossed visited passed entered left".split()),
    "school": ("teacher student lesson library book question classroom pencil exam desk".split(),
               "patient careful quiet early clever".split(), "explained wrote read answered studied".split()),
    "mountain": ("valley trail summit forest cabin river glacier pine ridge storm".split(),
                 "steep cold distant narrow silent".split(), "climbed reached followed crossed descended".split()),
    "home": ("kitchen table window lamp garden family neighbour door letter chair".split(),
             "warm small old gentle empty".split(), "opened cleaned painted carried found".split()),
}  # fmt: skip


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _sentence(rng: random.Random, topic: str, person: str) -> str:
    nouns, adjectives, verbs = TOPICS[topic]
    noun, other = rng.sample(nouns, 2)
    adj, verb = rng.choice(adjectives), rng.choice(verbs)
    forms = (
        f"The {adj} {noun} {verb} the {other} {rng.choice(PREPOSITIONS)} the {rng.choice(nouns)}",
        f"{person} {verb} {_a(adj)} {noun} and {rng.choice(ADVERBS)} {rng.choice(verbs)} it",
        f"{rng.choice(CONNECTORS)} the {noun} was {adj} and the {other} was {rng.choice(adjectives)}",
        f"Every {noun} has {_a(adj)} {other}, and {person} {verb} each one",
        f"{person} said that the {noun} {rng.choice(PREPOSITIONS)} the {other} was {adj}",
        f"It was {_a(adj)} {rng.choice(('day', 'night', 'week', 'year'))}, and {person} {verb} "
        f"the {other} {rng.choice(ADVERBS)}",
    )
    return rng.choice(forms) + rng.choice((".", ".", ".", "!"))


def prose(rng: random.Random, sentences: tuple[int, int] = (3, 7)) -> str:
    """One paragraph: one topic, one person."""
    topic, person = rng.choice(sorted(TOPICS)), rng.choice(NAMES)
    return " ".join(_sentence(rng, topic, person) for _ in range(rng.randint(*sentences)))


def _ident(rng: random.Random) -> str:
    return f"{rng.choice(VERBS)}_{rng.choice(NOUNS)}"


def _statements(rng: random.Random, indent: str, depth: int) -> list[str]:
    var, item, coll = (
        rng.choice(("result", "total", "value", "out")),
        rng.choice(("x", "item", "row")),
        rng.choice(NOUNS) + "s",
    )
    options = [
        [
            f"{var} = []",
            f"for {item} in {coll}:",
            f"    if {item}.{rng.choice(FIELDS)} > {rng.randint(0, 99)}:",
            f"        {var}.append({item})",
        ],
        [f"{var} = {rng.choice(('len', 'sum', 'max', 'sorted'))}({coll})"],
        [f"if {var} is None:", f'    raise ValueError("no {rng.choice(NOUNS)}")'],
        [f"{var} = {{k: v for k, v in {coll}.items() if v}}"],
        [f"# {rng.choice(VERBS)} the {rng.choice(NOUNS)} first"],
        [f"{var} = self.{_ident(rng)}({item}, limit={rng.randint(1, 64)})"],
        [f'with open("{rng.choice(FILES)}") as f:', f"    {var} = f.read().splitlines()"],
        ["try:", f"    {var} = int({item})", "except ValueError:", f"    {var} = {rng.randint(0, 9)}"],
        [f"{var} += {rng.randint(1, 9)} * {item}"],
        [f"while {var} < {rng.randint(10, 500)}:", f"    {var} = {var} * 2"],
    ]
    lines: list[str] = []
    for _ in range(rng.randint(2, 4) if depth else rng.randint(1, 2)):
        lines += rng.choice(options)
    lines.append(f"return {var}")
    return [indent + line for line in lines]


def _function(rng: random.Random, indent: str = "", docstring: str | None = None) -> list[str]:
    args = ", ".join(rng.sample(("items", "path", "limit", "config", "name", "data", "key"), rng.randint(1, 3)))
    head = [f"{indent}def {_ident(rng)}({'self, ' if indent else ''}{args}):"]
    doc = [f'{indent}    """{docstring}"""'] if docstring is not None else []
    return head + doc + _statements(rng, indent + "    ", 1)


def python_code(rng: random.Random, docstrings: Callable[[], str] | None = None) -> list[Segment]:
    """A module: imports, then functions or a class with methods. With ``docstrings``, each
    function gets one (a prose segment between the code's)."""
    segments: list[Segment] = []
    code = [f"import {m}" for m in rng.sample(("os", "json", "re", "math", "sys", "time", "csv"), rng.randint(1, 3))]
    code.append("")

    def function(indent: str) -> None:
        nonlocal code
        if docstrings is None:
            code += _function(rng, indent) + [""]
            return
        head = _function(rng, indent, "")
        # the docstring's text is prose; its quotes and everything around it are code
        code.append(head[0])
        code.append(f'{indent}    """')
        segments.append(Segment("python", "\n".join(code)))
        segments.append(Segment("prose", docstrings()))
        code = ['"""'] + head[2:] + [""]

    if rng.random() < 0.4:
        code.append(f"class {rng.choice(NOUNS).title()}{rng.choice(('Store', 'Index', 'Client', 'Model'))}:")
        code.append(f"    def __init__(self, {rng.choice(('path', 'name', 'config'))}):")
        code.append(f"        self.{rng.choice(FIELDS)} = {rng.choice(('path', 'name', 'config'))}")
        code.append("")
        for _ in range(rng.randint(1, 2)):
            function("    ")
    else:
        for _ in range(rng.randint(1, 3)):
            function("")
    segments.append(Segment("python", "\n".join(code).rstrip() + "\n"))
    return segments


def arithmetic(rng: random.Random, problems: tuple[int, int] = (1, 3)) -> str:
    out = []
    for _ in range(rng.randint(*problems)):
        # operands small enough that the products and sums are facts a small model can learn: with
        # a, b up to 99 and c up to 12, a LoRA on a base that knew the format stayed 8-9 % below it
        a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 9)
        kind = rng.randrange(4)
        if kind == 0:
            out.append(f"{a} + {b} * {c}\n= {a} + {b * c}\n= {a + b * c}")
        elif kind == 1:
            out.append(f"({a} + {b}) * {c}\n= {a + b} * {c}\n= {(a + b) * c}")
        elif kind == 2:
            out.append(f"{a * c} / {c} - {b}\n= {a} - {b}\n= {a - b}")
        else:
            out.append(f"{a} * {c} - {b} * {c}\n= {a * c} - {b * c}\n= {a * c - b * c}")
    return "\n\n".join(out)


def _value(rng: random.Random, field: str) -> str:
    if field in ("id", "count", "size", "level"):
        return str(rng.randint(1, 999))
    if field in ("price", "score"):
        return f"{rng.randint(0, 99)}.{rng.randint(0, 99):02d}"
    if field == "active":
        return rng.choice(("true", "false"))
    if field == "status":
        return rng.choice(STATUSES)
    if field == "email":
        return f"{rng.choice(NAMES).lower()}@example.org"
    if field == "created_at":
        return f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    return rng.choice(NOUNS)


def data(rng: random.Random) -> str:
    fields = rng.sample(FIELDS, rng.randint(3, 5))
    rows = rng.randint(2, 4)
    kind = rng.randrange(3)
    if kind == 0:  # JSON records
        records = []
        for _ in range(rows):
            cells = []
            for f in fields:
                v = _value(rng, f)
                numeric = v.replace(".", "").isdigit() or v in ("true", "false")
                cells.append(f'"{f}": {v if numeric else chr(34) + v + chr(34)}')
            records.append("  {" + ", ".join(cells) + "}")
        return "[\n" + ",\n".join(records) + "\n]"
    if kind == 1:  # CSV
        lines = [",".join(fields)] + [",".join(_value(rng, f) for f in fields) for _ in range(rows)]
        return "\n".join(lines)
    lines = []  # YAML
    for _ in range(rows):
        lines.append(f"{rng.choice(NOUNS)}:")
        lines += [f"  {f}: {_value(rng, f)}" for f in fields]
    return "\n".join(lines)


def shell(rng: random.Random, commands: tuple[int, int] = (3, 6)) -> str:
    # One session works on one project: its folder, names, file, variable and port come back from
    # command to command (each command draws afresh one time in five), as prose keeps its topic.
    # Measured: with every command drawn afresh, a shell LoRA stayed 7-9 % below the base.
    exts, variables, ports = (
        ("py", "log", "txt", "csv"),
        ("DATA_DIR", "LOG_DIR", "BUILD", "TARGET"),
        (8000, 8080, 5432, 9090),
    )
    path, words, ext = rng.choice(PATHS), rng.sample(NOUNS, 2), rng.choice(exts)
    var, file, port = rng.choice(variables), rng.choice(FILES), rng.choice(ports)
    lines = ["#!/bin/bash", "set -euo pipefail"] if rng.random() < 0.3 else []
    for _ in range(rng.randint(*commands)):
        fresh = rng.random() < 0.2
        pair = rng.sample(NOUNS, 2) if fresh else words
        line = rng.choice(COMMANDS).format(
            path=rng.choice(PATHS) if fresh else path,
            word=pair[0],
            word2=pair[1],
            ext=rng.choice(exts) if fresh else ext,
            n=rng.randint(1, 30),
            VAR=rng.choice(variables) if fresh else var,
            file=rng.choice(FILES) if fresh else file,
            port=rng.choice(ports) if fresh else port,
        )
        lines.append(("$ " if not lines or lines[0] != "#!/bin/bash" else "") + line)
    return "\n".join(lines)


def document(domain: str, rng: random.Random) -> str:
    """One single-domain document."""
    if domain == "python":
        return python_code(rng)[0].text
    return {"prose": prose, "arithmetic": arithmetic, "data": data, "shell": shell}[domain](rng)


# ---------------------------------------------------------------------------------------------
# Mixed documents
# ---------------------------------------------------------------------------------------------

MIXED_KINDS = ("python-docstrings", "markdown-code", "prose-arithmetic")


def mixed_document(kind: str, rng: random.Random) -> list[Segment]:
    """A document of ``kind`` (``MIXED_KINDS``) as labelled segments, in order."""
    if kind == "python-docstrings":
        return python_code(rng, docstrings=lambda: prose(rng, (1, 3)))
    if kind == "markdown-code":
        out = [Segment("prose", f"# {rng.choice(NOUNS).title()} notes\n\n" + prose(rng, (2, 4)) + "\n\n")]
        for block in rng.sample(("shell", "python", "data"), rng.randint(2, 3)):
            fence = {"shell": "bash", "python": "python", "data": rng.choice(("json", "yaml", "csv"))}[block]
            out.append(Segment("prose", f"```{fence}\n"))  # the fence belongs to the Markdown around it
            out.append(Segment(block, document(block, rng) + "\n"))
            out.append(Segment("prose", "```\n\n" + prose(rng, (1, 3)) + "\n\n"))
        return out
    if kind == "prose-arithmetic":
        out = []
        for _ in range(rng.randint(2, 3)):
            out.append(Segment("prose", prose(rng, (1, 3)) + "\n\n"))
            out.append(Segment("arithmetic", arithmetic(rng, (1, 1)) + "\n\n"))
        out.append(Segment("prose", prose(rng, (1, 2))))
        return out
    raise ValueError(f"unknown mixed kind {kind!r}; one of {MIXED_KINDS}")


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def documents(domain: str, split: str, n: int, seed: int = 0) -> list[str]:
    """``n`` documents of ``domain`` for ``split``: disjoint streams per (seed, domain, split)."""
    rng = random.Random(f"domains:{seed}:{domain}:{split}")
    return [document(domain, rng) for _ in range(n)]


def mixed_documents(split: str, n: int, seed: int = 0) -> list[list[Segment]]:
    rng = random.Random(f"domains:{seed}:mixed:{split}")
    return [mixed_document(MIXED_KINDS[i % len(MIXED_KINDS)], rng) for i in range(n)]


def corpus_digest(texts: list[str]) -> str:
    """sha256 over the texts in order: the same on every machine for the same seed and sizes."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()
