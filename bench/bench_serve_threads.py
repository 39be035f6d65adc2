"""`moerge serve --no-ray`: the engines' torch threads against the HTTP event loop, on this machine.

    python bench/bench_serve_threads.py [--rounds 3] [--seconds 8]

Starts the in-process server over a tiny Qwen2 chat model (``tests/chat_models.py``) twice: with
its default (torch on every core but one, ``leave_a_core_for_http``) and with torch on every core
(``OMP_NUM_THREADS`` = the core count, what it did before). Each round, in turns:

- **c1, back to back**: one client that sends its next request as soon as the last is answered
  (wrk ``-c1``): p50 / p99, and the server's CPU ms per request (from /proc);
- **c1, spaced**: the same requests 50 ms apart (a Python client): p50;
- **c16**: requests/s (wrk).

Medians over rounds.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench.machine import load, machine  # noqa: E402
from bench.peers_gateway import MOERGE, Wrk, free_port, request_body, run_cli, wait_ready  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spaced_p50(port: int, model: str, n: int = 40, gap_s: float = 0.05) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port)
    body = json.dumps(request_body(model))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        conn.getresponse().read()
        times.append((time.perf_counter() - t0) * 1e3)
        time.sleep(gap_s)
    conn.close()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=8, help="seconds of each wrk run")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("this bench sends its load with wrk: apt-get install wrk")
    from tests.chat_models import make_qwen_chat_model

    cores = len(os.sched_getaffinity(0))
    work = Path(tempfile.mkdtemp(prefix="moerge-serve-threads-"))
    procs: dict[str, subprocess.Popen] = {}
    try:
        base = make_qwen_chat_model(work / "tiny-chat")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOERGE_") and k != "OMP_NUM_THREADS"}
        env.update(PYTHONPATH=str(ROOT), MOERGE_HOME=str(work / "home"))
        run_cli(env, "base", "add", "tiny-chat", str(base))
        variants = {
            f"default ({cores - 1} torch thread(s))": {},
            f"every core ({cores})": {"OMP_NUM_THREADS": str(cores)},
        }
        ports = {}
        for name, extra in variants.items():
            ports[name] = free_port()
            log = open(work / f"{len(ports)}.log", "w")  # noqa: SIM115 - lives as long as the server
            cmd = [*MOERGE, "serve", "--no-ray", "--port", str(ports[name])]
            procs[name] = subprocess.Popen(cmd, env={**env, **extra}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            wait_ready(f"http://127.0.0.1:{ports[name]}/v1/models", procs[name])
        clients = {n: Wrk(f"http://127.0.0.1:{p}", "tiny-chat", None, work / f"{p}.lua") for n, p in ports.items()}
        for c in clients.values():
            c.run(1, 1)
        got: dict[str, list[dict]] = {n: [] for n in variants}
        start = load()
        for _ in range(args.rounds):
            for name, c in clients.items():
                pid = procs[name].pid
                cpu0 = cpu_seconds(pid)
                back = c.run(args.seconds, 1)
                cpu = cpu_seconds(pid) - cpu0
                back["cpu_ms"] = cpu * 1e3 / back["sent"]
                back["spaced"] = spaced_p50(ports[name], "tiny-chat")
                back["rps16"] = c.run(args.seconds, 16)["rps"]
                got[name].append(back)
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(timeout=20)
        shutil.rmtree(work, ignore_errors=True)

    print(f"Machine: {machine()}; load {start} → {load()}; {args.rounds} rounds, {args.seconds} s per wrk run\n")
    print(
        "| moerge serve --no-ray | c1 back to back p50 / p99 ms | CPU ms per request | c1 spaced 50 ms p50 | c16 requests/s |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, runs in got.items():
        m = {k: statistics.median(r[k] for r in runs) for k in ("p50", "p99", "cpu_ms", "spaced", "rps16")}
        print(
            f"| {name} | {m['p50']:.1f} / {m['p99']:.1f} | {m['cpu_ms']:.1f} | {m['spaced']:.1f} | {m['rps16']:.0f} |"
        )


if __name__ == "__main__":
    main()
