"""Registry reads under concurrency on the embedded SQLite: read-only transactions vs the write lock.

    python bench/bench_registry_reads.py [--threads 16] [--reads 50] [--repeats 5]

16 threads each make ``--reads`` rounds of the reads a server and the CLI make (``list_experts``,
``get_expert``, ``get_examples``), while one more thread registers and removes an external expert
in a loop (a writer, as during hot registration). Two ways, alternating within every repeat, on
the same database file:

- *read-only*: what the registry does now (``Registry.reading``: a deferred ``BEGIN``, SQLite's
  shared lock only);
- *write lock*: every read opening with ``BEGIN IMMEDIATE`` like a write, as before (the
  registry's read sessions swapped for its write sessions).

Wall seconds for all reads, p50 / p99 of one round, and how many register + remove pairs the
writer got through per second meanwhile, medians over the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from machine import machine  # bench/machine.py

from registry.service import Registry


def run(reg: Registry, threads: int, reads: int) -> tuple[float, list[float], int]:
    stop = threading.Event()
    written = [0]

    def writer() -> None:
        while not stop.is_set():
            reg.register_expert(f"w{written[0]}", "external", "openai/gpt-4o-mini")
            reg.remove_expert(f"w{written[0]}")
            written[0] += 1

    rounds: list[float] = []
    lock = threading.Lock()

    def reader() -> None:
        mine = []
        for _ in range(reads):
            t0 = time.perf_counter()
            reg.list_experts()
            reg.get_expert("gpt")
            reg.get_examples("gpt")
            mine.append((time.perf_counter() - t0) * 1000)
        with lock:
            rounds.extend(mine)

    w = threading.Thread(target=writer)
    w.start()
    pool = [threading.Thread(target=reader) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = time.perf_counter() - t0
    stop.set()
    w.join()
    return wall, rounds, written[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--reads", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp())
    reg = Registry(f"sqlite:///{root / 'moerge.db'}", artifact_root=root / "store")
    reg.register_expert(
        "gpt",
        "external",
        "openai/gpt-4o-mini",
        examples=[{"prompt": f"q{i}", "reference": "a", "split": "validation"} for i in range(20)],
    )
    read_only = reg._read_sessions
    ways = {"read-only": read_only, "write lock": reg._sessions}
    walls: dict[str, list[float]] = {k: [] for k in ways}
    p50s: dict[str, list[float]] = {k: [] for k in ways}
    p99s: dict[str, list[float]] = {k: [] for k in ways}
    writes: dict[str, list[float]] = {k: [] for k in ways}
    run(reg, 2, 5)  # warm-up
    for _ in range(args.repeats):
        for name, sessions in ways.items():
            reg._read_sessions = sessions
            wall, rounds, written = run(reg, args.threads, args.reads)
            writes[name].append(written / wall)
            walls[name].append(wall)
            p50s[name].append(statistics.median(rounds))
            p99s[name].append(statistics.quantiles(rounds, n=100)[98])
    reg._read_sessions = read_only
    print(f"Machine: {machine()}")
    print(
        f"{args.threads} reader threads × {args.reads} rounds (list_experts + get_expert + get_examples), "
        f"one writer registering and removing; medians of {args.repeats} repeats\n"
    )
    print(
        "| reads | wall s | round p50 ms | round p99 ms | writer: registrations + removals /s |\n"
        "|---|---:|---:|---:|---:|"
    )
    for name in ways:
        print(
            f"| {name} | {statistics.median(walls[name]):.2f} | {statistics.median(p50s[name]):.1f} | "
            f"{statistics.median(p99s[name]):.1f} | {statistics.median(writes[name]):.1f} |"
        )


if __name__ == "__main__":
    main()
