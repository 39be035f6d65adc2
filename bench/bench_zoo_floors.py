"""Does the small zoo meet its floors on any CPU? Builds it for several seeds, and once more with
torch, oneDNN, MKL and numba held to a lower instruction set (scripts/lower-isa.sh), one build
after another, then prints each build's outcomes, timings and machine as Markdown.

    python bench/bench_zoo_floors.py [--seeds 0,1,2] [--lower-isa-seed 0] [--out /tmp/zoo-floors]
    python bench/bench_zoo_floors.py --report DIR [DIR …]     # only print built zoos' tables

Each build is `moerge zoo build --size small --seed N --out DIR` (exit 1 when a floor failed);
run it on an idle machine: the timings are the build's own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(out: Path, seed: int, lower_isa: bool) -> int:
    cmd = [
        str(Path(sys.executable).parent / "moerge"),
        "zoo",
        "build",
        "--size",
        "small",
        "--seed",
        str(seed),
        "--out",
        str(out),
    ]
    if lower_isa:
        cmd = [str(ROOT / "scripts" / "lower-isa.sh"), sys.executable, *cmd]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


def report(zoo_dir: Path) -> str:
    m = json.loads((zoo_dir / "zoo.json").read_text())
    from services.machine import describe

    skills = list(next(iter(m["outcomes"].values())))
    own = {e["name"]: set(e["skills"]) for e in m["experts"]}
    t = m["timings"]
    steps = ", ".join(f"{name.removeprefix('skill-')} {job['steps']}" for name, job in m["jobs"].items())
    lines = [
        f"**seed {m['seed']}**, {describe(m.get('machine', {}))}: total **{t['total']:.0f} s** "
        f"(pre-train {t['pretrain_base']:.0f} s, experts {t['experts']:.0f} s, evaluate {t['evaluate']:.0f} s); "
        + ("every floor held" if not m["failures"] else "missed: " + "; ".join(m["failures"])),
        "",
        f"steps: {steps}",
        "",
        "| model | " + " | ".join(skills) + " |",
        "|---|" + "---:|" * len(skills),
    ]
    for name, row in m["outcomes"].items():
        cells = [f"**{row[s]:.0%}**" if s in own.get(name, ()) else f"{row[s]:.0%}" for s in skills]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument(
        "--lower-isa-seed",
        type=int,
        default=0,
        help="the seed built once more under a lower instruction set (-1: none)",
    )
    ap.add_argument("--out", type=Path, default=Path("/tmp/zoo-floors"))
    ap.add_argument("--report", type=Path, nargs="+", help="print these built zoos' tables and build nothing")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.report:
        print("\n".join(report(d) for d in args.report))
        return 0
    runs = [(int(s), False) for s in args.seeds.split(",") if s]
    if args.lower_isa_seed >= 0:
        runs.append((args.lower_isa_seed, True))
    dirs, failed = [], 0
    for seed, lower in runs:
        d = args.out / f"seed{seed}{'-lower-isa' if lower else ''}"
        failed += build(d, seed, lower) != 0
        dirs.append(d)
    print("\n".join(report(d) for d in dirs))
    print(f"{len(runs) - failed} of {len(runs)} builds met every floor")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
