"""Gateway overhead, streaming, cold adapters and load, on Ray Serve over a registered zoo.

Starts the same Serve application `moerge serve` deploys (local Ray, one engine replica), then:

1. **overhead** — latency of one completion (greedy, ``--max-tokens``) three ways, interleaved:
   *direct* = a Ray Serve handle call to the engine deployment (no HTTP, no gateway, no router);
   *gateway expert* = HTTP through the gateway to the same expert; *gateway strategy* = HTTP to
   ``moe/semantic`` (router + composer + engine); and *HTTP only* = a request the gateway refuses
   (422) before any lookup or engine call: the proxy and FastAPI alone. Added latency = gateway −
   direct, p50 / p99. Then requests/s at concurrency 16: gateway ÷ direct, per round and the
   median over ``--rps-rounds``, with how many requests shared each engine batch.
   ``--ingress``: how HTTP reaches the gateway (services/serving/ingress.py): ``haproxy`` (the
   default of ``moerge serve``) or ``proxy`` (Ray Serve's Python proxy).
2. **stream** — one streamed completion, of the expert and of ``moe/semantic``: time to the first
   text chunk and to the end, against the same request not streamed; then ``--concurrency`` clients at once, streamed and not in
   alternating rounds: requests/s, first-chunk p50 / p99, requests per engine batch. **beside** —
   a streamed ``moe/semantic`` request's first chunk, alone and while 8 clients ask it whole.
3. **cold adapter** — copies of one adapter registered under new names; first-request latency ÷
   the next (warm) request's, median over copies.
4. **load** — ``--load-requests`` requests at concurrency 32 over several experts and strategies:
   errors, lost requests, p50 / p99.

    python bench/bench_gateway.py [--repeats 60] [--rps-rounds 5] [--rps-requests 512]
                                  [--client async|threads|wrk] [--load-requests 500]
                                  [--ingress haproxy|proxy] [--gateway-replicas 1]

The requests/s rounds' clients (``--client``) run on the same cores as the service: ``async``
(the default) keeps 16 coroutines on one event loop in this process (aiohttp; awaited handle
calls), ``threads`` one thread per client (httpx; the handle's blocking ``.result()``), which
spends ~2-3x the client CPU per request through the gateway, and ``wrk`` sends the HTTP paths'
requests with wrk (Debian package ``wrk``: C, ~0.06 ms of CPU per request against aiohttp's
~0.5) while the direct path stays on awaited handle calls. Each round also reports the CPU every
process used per request, and how busy the engine was; the ratio is given both as the ratio of
the paths' medians and as the median of each round's own ratio (the two paths of a round run
back to back, so a drifting machine moves both).

Uses the registry in $MOERGE_HOME (build one with `moerge zoo build --register`).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# --ingress: how HTTP reaches the gateway (services/serving/ingress.py). Serve reads its switches
# when it is imported, in every process, this one included (its handles call the engine over gRPC
# in the high-throughput mode): set here, before the import; start_local_ray forwards them.
from services.serving.ingress import INGRESS_ENV, ingress_env, start_local_ray  # noqa: E402

INGRESS = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--ingress"), "haproxy")
os.environ.update(ingress_env(INGRESS) if INGRESS in INGRESS_ENV else {})

import httpx  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402

from composer.engine_protocol import GenerateRequest  # noqa: E402
from registry.config import database_url, moerge_home  # noqa: E402
from registry.service import Registry  # noqa: E402
from services.serving.app import APP_NAME, build_app, deployment_name  # noqa: E402
from services.serving.engine_server import model_id  # noqa: E402


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return f"{cpu}, {os.cpu_count()} cores, ray {ray.__version__}, python {platform.python_version()}"


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rps-rounds", type=int, default=5, help="rounds of the requests/s comparison (median)")
    ap.add_argument("--rps-requests", type=int, default=512, help="requests per path in each requests/s round")
    ap.add_argument("--load-requests", type=int, default=500)
    ap.add_argument("--load-concurrency", type=int, default=32)
    ap.add_argument("--cold-copies", type=int, default=5)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: overhead, stream, beside, cold, load")
    ap.add_argument(
        "--client",
        choices=["threads", "async", "wrk"],
        default="async",
        help="the requests/s rounds' clients: a thread each (blocking calls: httpx, the Serve "
        "handle's .result()), coroutines on one event loop (aiohttp; awaited handle calls), "
        "or wrk for the HTTP paths (a C load generator; the direct path as with async)",
    )
    ap.add_argument(
        "--ingress",
        choices=sorted(INGRESS_ENV),
        default="haproxy",
        help="how HTTP reaches the gateway (services/serving/ingress.py)",
    )
    ap.add_argument("--gateway-replicas", type=int, default=1, help="replicas of the gateway deployment")
    args = ap.parse_args()

    registry = Registry()
    adapters = [e for e in registry.list_experts(kind="adapter", status="ready")]
    if not adapters:
        raise SystemExit("no adapters registered: run `moerge zoo build --register` first")
    base = adapters[0].base.name
    adapters = [e for e in adapters if e.base.name == base and not e.name.startswith("bench-")]
    expert = adapters[0]
    prompt = registry.get_examples(expert.name, expert.version, split="validation")[0].prompt

    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OMP_WAIT_POLICY") if k in os.environ}
    env.update({"MOERGE_HOME": str(moerge_home()), "MOERGE_DATABASE_URL": database_url()})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start_local_ray(args.ingress, env, "127.0.0.1", port, num_cpus=8)
    config = {
        "strategies": {"names": ["moe/semantic", "moe/classifier", "moe/skill-k3-vote"]},
        "engines": {"default": {"max_adapters_per_replica": 16}},
        "gateway": {"replicas": args.gateway_replicas},
    }
    serve.run(build_app({"config": config}), name=APP_NAME, route_prefix="/")
    engine = serve.get_deployment_handle(deployment_name(base), app_name=APP_NAME)
    url = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=url, timeout=300, limits=httpx.Limits(max_connections=64))
    print(f"Machine: {machine()}; load average at start {load_avg()}")
    print(f"Zoo base {base}, {len(adapters)} adapters; expert {expert.name}; {args.max_tokens} new tokens, greedy\n")

    def direct() -> None:
        h = engine.options(multiplexed_model_id=model_id(expert.name, expert.version, expert.id, expert.checksum))
        h.generate.remote([GenerateRequest(prompt, None, args.max_tokens)]).result()

    def via(model: str) -> None:
        r = http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": args.max_tokens})
        if r.status_code != 200:
            raise SystemExit(f"{model}: HTTP {r.status_code} {r.text}")

    def http_only() -> None:
        """The HTTP path alone: proxy, gateway replica, FastAPI, refused by the schema (422) before
        any registry lookup or engine call."""
        r = http.post("/v1/completions", json={"model": expert.name, "prompt": prompt, "max_tokens": 0})
        if r.status_code != 422:
            raise SystemExit(f"expected 422, got HTTP {r.status_code} {r.text}")

    ASYNC_BASE_URL.append(url)

    async def adirect(_http) -> None:  # noqa: ANN001
        h = engine.options(multiplexed_model_id=model_id(expert.name, expert.version, expert.id, expert.checksum))
        await h.generate.remote([GenerateRequest(prompt, None, args.max_tokens)])

    async def apost(h, body: dict, expect: int) -> None:  # noqa: ANN001
        async with h.post("/v1/completions", json=body) as r:
            text = await r.read()
            if r.status != expect:
                raise SystemExit(f"{body['model']}: HTTP {r.status} (expected {expect}) {text[:300]!r}")

    async def avia(h, model: str) -> None:  # noqa: ANN001
        await apost(h, {"model": model, "prompt": prompt, "max_tokens": args.max_tokens}, 200)

    async def ahttp_only(h) -> None:  # noqa: ANN001
        await apost(h, {"model": expert.name, "prompt": prompt, "max_tokens": 0}, 422)

    def batch_stats(reset: bool = True) -> dict | None:
        try:  # engines before batch_stats existed: no numbers
            return engine.batch_stats.remote(reset).result()
        except Exception:  # noqa: BLE001
            return None

    def timed(fn, *a) -> float:  # noqa: ANN001
        t0 = time.perf_counter()
        fn(*a)
        return (time.perf_counter() - t0) * 1000

    skip = set(filter(None, args.skip.split(",")))
    for _ in range(5):  # warm: expert loaded, router built, classifier trained
        direct(), via(expert.name), via("moe/semantic")
    if "overhead" not in skip:
        overhead(args, direct, via, http_only, batch_stats, timed, expert.name, adirect, avia, ahttp_only, prompt)
        print(f"load average: {load_avg()}")
    if "stream" not in skip:
        streaming(args, http, expert.name, prompt, batch_stats)
    if "beside" not in skip:
        stream_beside_strategy(args, http, prompt)
    if "cold" not in skip:
        cold_adapter(args, registry, expert, base, via, timed)
        print(f"load average: {load_avg()}")
    if "load" not in skip:
        load(args, registry, adapters, http)
        print(f"load average: {load_avg()}")
    serve.shutdown()
    ray.shutdown()


def cpu_by_process() -> dict[str, float]:
    """CPU seconds (user + system) used so far, summed by kind of process: each Serve replica by its
    deployment, the proxy, HAProxy, this client, and Ray's own daemons."""
    import psutil

    out: dict[str, float] = {}
    me = os.getpid()
    for p in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
        try:
            t = p.info["cpu_times"]
            cmd = " ".join(p.info["cmdline"] or []) or p.info["name"] or "?"
        except (psutil.Error, TypeError):
            continue
        if t is None:
            continue
        if p.info["pid"] == me:
            key = "client (this process)"
        elif "ServeReplica:" in cmd:
            key = "replica " + cmd.split("ServeReplica:", 1)[1].split()[0].split(":")[-1]
        elif cmd.startswith("ray::"):
            key = cmd.split()[0]
        elif "haproxy" in cmd:
            key = "haproxy"
        elif any(d in cmd for d in ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env")):
            key = "ray daemons"
        else:
            key = "other"
        out[key] = out.get(key, 0.0) + t.user + t.system
    return out


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


async def async_throughput(fn, n: int, concurrency: int) -> float:  # noqa: ANN001
    """requests/s of ``n`` requests by ``concurrency`` clients, each sending its next request when
    its last is answered, all on one event loop; ``fn(http)`` is one request (an aiohttp session)."""
    import aiohttp  # a Ray dependency; its C HTTP parser costs the client far less CPU than httpx

    async with aiohttp.ClientSession(
        ASYNC_BASE_URL[0], timeout=aiohttp.ClientTimeout(total=300), connector=aiohttp.TCPConnector(limit=64)
    ) as h:
        left = n

        async def client() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await fn(h)

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return n / (time.perf_counter() - t0)


ASYNC_BASE_URL: list[str] = []  # the gateway's URL, set in main


class WrkPath:
    """One POST to /v1/completions, sent by wrk (Debian package ``wrk``): ``concurrency`` keep-alive
    connections on one thread, each sending its next request when its last is answered, as the
    async clients do. Its CPU per request is ~0.06 ms against aiohttp's ~0.5 ms (a real client
    would not share the service's cores at all)."""

    def __init__(self, url: str, body: dict, expect: int) -> None:
        import json

        if shutil.which("wrk") is None:
            raise SystemExit("--client wrk needs wrk on PATH (Debian: apt-get install wrk)")
        self.url, self.expect = url + "/v1/completions", expect
        self.script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)  # noqa: SIM115
        self.script.write(
            f'wrk.method = "POST"\nwrk.body = {json.dumps(json.dumps(body))}\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
        self.script.close()
        atexit.register(os.unlink, self.script.name)

    def run(self, seconds: float, concurrency: int) -> tuple[float, int, float]:
        """requests/s, requests answered, wrk's CPU ms (user + system)."""
        import re
        import subprocess

        proc = subprocess.Popen(
            [
                "wrk",
                "-t1",
                f"-c{concurrency}",
                f"-d{max(1, round(seconds))}s",
                "--timeout",
                "60s",
                "-s",
                self.script.name,
                self.url,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            raise SystemExit(f"wrk failed ({status}):\n{out}")
        sent = int(re.search(r"(\d+) requests in", out).group(1))
        refused = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        refused = int(refused.group(1)) if refused else 0
        if (self.expect == 200 and refused) or (self.expect != 200 and refused != sent):
            raise SystemExit(f"wrk: {refused} of {sent} responses were not HTTP {self.expect}:\n{out}")
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        return rps, sent, (usage.ru_utime + usage.ru_stime) * 1000


def overhead(
    args,
    direct,
    via,
    http_only,
    batch_stats,
    timed,
    expert_name: str,  # noqa: ANN001
    adirect=None,
    avia=None,
    ahttp_only=None,
    prompt: str = "",
) -> None:  # noqa: ANN001
    lat = {"direct": [], "gateway expert": [], "gateway moe/semantic": [], "gateway HTTP only (422)": []}
    for _ in range(args.repeats):
        lat["direct"].append(timed(direct))
        lat["gateway expert"].append(timed(via, expert_name))
        lat["gateway moe/semantic"].append(timed(via, "moe/semantic"))
        lat["gateway HTTP only (422)"].append(timed(http_only))
    print("| path | p50 ms | p99 ms | added p50 ms | added p99 ms |\n|---|---:|---:|---:|---:|")
    d50, d99 = statistics.median(lat["direct"]), pct(lat["direct"], 99)
    for name, values in lat.items():
        p50, p99 = statistics.median(values), pct(values, 99)
        print(f"| {name} | {p50:.1f} | {p99:.1f} | {p50 - d50:+.1f} | {p99 - d99:+.1f} |")

    last_rps = [0.0]  # the round's direct requests/s: a wrk run lasts about as long as n requests took

    def throughput(fn, n: int) -> tuple[float, int, float]:  # noqa: ANN001
        """requests/s, requests sent, and the CPU ms a client process outside this one used."""
        if isinstance(fn, WrkPath):
            return fn.run(max(2.0, n / max(last_rps[0], 1.0)), args.concurrency)
        if args.client in ("async", "wrk"):
            return asyncio.run(async_throughput(fn, n, args.concurrency)), n, 0.0
        with ThreadPoolExecutor(args.concurrency) as pool:
            t0 = time.perf_counter()
            list(pool.map(lambda _: fn(), range(n)))
            return n / (time.perf_counter() - t0), n, 0.0

    n = args.rps_requests
    # the HTTP path alone (refused before any lookup or engine call): the ceiling of client + ingress
    paths = {"direct": direct, "gateway": lambda: via(expert_name), "gateway HTTP only (422)": http_only}
    if args.client == "async":  # the same three requests from one event loop (see --client)
        paths = {"direct": adirect, "gateway": lambda h: avia(h, expert_name), "gateway HTTP only (422)": ahttp_only}
    if args.client == "wrk":  # the HTTP paths by a C client, whose own CPU per request is ~1/10 of aiohttp's
        body = {"model": expert_name, "prompt": prompt, "max_tokens": args.max_tokens}
        paths = {
            "direct": adirect,
            "gateway": WrkPath(ASYNC_BASE_URL[0], body, 200),
            "gateway HTTP only (422)": WrkPath(ASYNC_BASE_URL[0], {**body, "max_tokens": 0}, 422),
        }
    rps: dict[str, list[float]] = {name: [] for name in paths}
    batches: dict[str, list[float]] = {name: [] for name in paths}  # requests per engine batch, per round
    busy: dict[str, list[float]] = {name: [] for name in paths}  # share of the round the engine generated
    cpu: dict[str, list[dict[str, float]]] = {name: [] for name in paths}  # CPU ms per request, by process
    sizes: dict[str, list[list[int]]] = {name: [] for name in paths}  # calls per engine batch, in order
    for _ in range(args.rps_rounds):  # the paths alternate: a busy machine slows them alike
        for name, fn in paths.items():
            batch_stats()
            before, t0 = cpu_by_process(), time.perf_counter()
            r, sent, client_ms = throughput(fn, n)
            rps[name].append(r)
            if name == "direct":
                last_rps[0] = r
            wall, after = time.perf_counter() - t0, cpu_by_process()
            used = {k: (after.get(k, 0.0) - before.get(k, 0.0)) * 1000 / sent for k in after}
            if client_ms:
                used["client (wrk)"] = client_ms / sent
            used["(busy share of all cores)"] = sum(used.values()) * sent / 1000 / wall / (os.cpu_count() or 1)
            cpu[name].append(used)
            b = batch_stats()
            sizes[name].append((b or {}).get("sizes", []))
            batches[name].append(b["calls"] / max(1, b["batches"]) if b else float("nan"))
            busy[name].append(b.get("busy_s", float("nan")) / wall if b else float("nan"))
    d = statistics.median(rps["direct"])
    print(
        f"\nrequests/s at concurrency {args.concurrency} (median of {args.rps_rounds} rounds × {n}; "
        f"requests per engine batch, share of the time the engine generated, in brackets):"
    )
    for name in paths:
        ratios = [r / rd for r, rd in zip(rps[name], rps["direct"])]
        print(
            f"  {name}: {statistics.median(rps[name]):.1f} ({statistics.median(batches[name]):.1f}, "
            f"{statistics.median(busy[name]):.2f})"
            + (
                ""
                if name != "gateway"
                else f", ratio to direct {statistics.median(rps[name]) / d:.2f}, "
                f"median of the rounds' own ratios {statistics.median(ratios):.2f} "
                f"(per round, with the gateway's requests per engine batch: "
                f"{', '.join(f'{r:.2f} @ {b:.1f}' for r, b in zip(ratios, batches[name]))})"
            )
        )
    print(
        "  requests/s per round: " + "; ".join(f"{name} " + ", ".join(f"{r:.0f}" for r in rps[name]) for name in paths)
    )
    for name in ("direct", "gateway"):  # 16 closed-loop clients form cohorts that take turns
        print(
            f"  engine batch sizes, {name}, first 24 batches of each round: "
            + " | ".join(" ".join(map(str, round_sizes[:24])) for round_sizes in sizes[name])
        )
    print(
        "  engine busy per round: "
        + "; ".join(f"{name} " + ", ".join(f"{b:.2f}" for b in busy[name]) for name in ("direct", "gateway"))
    )
    # where the CPU went: if the cores are nearly all busy, the ratio is a CPU budget, not latency
    groups = sorted({k for rounds in cpu.values() for used in rounds for k in used})
    print(
        "\nCPU ms per request by process (median of rounds):\n| process | "
        + " | ".join(paths)
        + " |\n|---|"
        + "---:|" * len(paths)
    )
    for g in groups:
        cells = [statistics.median(u.get(g, 0.0) for u in cpu[name]) for name in paths]
        if max(cells) >= 0.05 or g.startswith("("):
            print(f"| {g} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


def streaming(args, http: httpx.Client, model: str, prompt: str, batch_stats, max_tokens: int = 32) -> None:  # noqa: ANN001
    """A streamed completion of one expert, and of ``moe/semantic`` routing to it: time to the
    first text chunk and to the end, against the same request not streamed; medians over
    ``--repeats``. Then ``--concurrency`` clients of the expert at once, streamed and not, in
    alternating rounds."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    for name in (model, "moe/semantic"):
        stream_latency(args, http, {**body, "model": name})

    def one(stream: bool) -> tuple[float, float]:
        """(ms to the first text chunk, ms to the end) of one request; not streamed: both the end."""
        t0 = time.perf_counter()
        if not stream:
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            end = (time.perf_counter() - t0) * 1000
            return end, end
        t_first = None
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            assert s.status_code == 200, s.read()
            for line in s.iter_lines():
                if t_first is None and line.startswith("data: {") and '"text":"' in line and '"text":""' not in line:
                    t_first = time.perf_counter()
        end = time.perf_counter()
        return ((t_first or end) - t0) * 1000, (end - t0) * 1000

    # many clients at once: streamed requests/s against the same requests not streamed, alternating
    # rounds; how many requests shared each engine batch (streams batched with one another or not)
    n = args.concurrency * 8
    rates: dict[bool, list[float]] = {False: [], True: []}
    firsts: list[float] = []
    per_batch: dict[bool, list[float]] = {False: [], True: []}
    with ThreadPoolExecutor(args.concurrency) as pool:
        for _ in range(args.rps_rounds):
            for stream in (False, True):
                batch_stats(True)
                t0 = time.perf_counter()
                results = list(pool.map(one, [stream] * n))
                rates[stream].append(n / (time.perf_counter() - t0))
                stats = batch_stats(False)
                if stats and stats["batches"]:
                    per_batch[stream].append(stats["calls"] / stats["batches"])
                if stream:
                    firsts += [f for f, _ in results]
    s_rate, w_rate = statistics.median(rates[True]), statistics.median(rates[False])
    batches = {k: f"{statistics.median(v):.1f}" if v else "–" for k, v in per_batch.items()}
    print(
        f"streamed at concurrency {args.concurrency} ({n} requests × {args.rps_rounds} rounds, medians): "
        f"{s_rate:.1f} requests/s (requests per engine batch {batches[True]}), first text chunk p50 "
        f"{statistics.median(firsts):.1f} ms / p99 {pct(firsts, 99):.1f} ms; not streamed {w_rate:.1f} requests/s "
        f"({batches[False]}); streamed ÷ not streamed {s_rate / w_rate:.2f}"
    )


def stream_beside_strategy(args, http: httpx.Client, prompt: str, clients: int = 8, max_tokens: int = 32) -> None:  # noqa: ANN001
    """A streamed ``moe/semantic`` request's first text chunk while ``clients`` others keep asking
    ``moe/semantic`` whole (the strategies replica batches them and waits on the engine): median
    and p90 over ``--repeats``, against the same stream with nobody else asking."""
    import threading

    body = {"model": "moe/semantic", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}

    def first_chunk_ms() -> float:
        t0, first = time.perf_counter(), None
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            assert s.status_code == 200, s.read()
            for line in s.iter_lines():
                if first is None and line.startswith("data: {") and '"text":"' in line and '"text":""' not in line:
                    first = time.perf_counter()
        return ((first or time.perf_counter()) - t0) * 1000

    alone = [first_chunk_ms() for _ in range(args.repeats)]
    stop = threading.Event()

    def ask() -> None:
        with httpx.Client(base_url=http.base_url, timeout=300) as h:
            while not stop.is_set():
                assert h.post("/v1/completions", json=body).status_code == 200

    others = [threading.Thread(target=ask) for _ in range(clients)]
    for t in others:
        t.start()
    time.sleep(1.0)
    try:
        beside = [first_chunk_ms() for _ in range(args.repeats)]
    finally:
        stop.set()
        for t in others:
            t.join()
    print(
        f"moe/semantic streamed, first text chunk p50 / p90 ms: alone {statistics.median(alone):.1f} / "
        f"{pct(alone, 90):.1f}; beside {clients} clients asking it whole {statistics.median(beside):.1f} / "
        f"{pct(beside, 90):.1f}"
    )


def stream_latency(args, http: httpx.Client, body: dict) -> None:  # noqa: ANN001
    """One request streamed: ms to the first text chunk and to the end, and not streamed."""
    model, max_tokens = body["model"], body["max_tokens"]
    first, last, whole, chunks = [], [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        r = http.post("/v1/completions", json=body)
        whole.append((time.perf_counter() - t0) * 1000)
        assert r.status_code == 200, r.text
        t0, t_first, n = time.perf_counter(), None, 0
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            for line in s.iter_lines():
                if line.startswith("data: {") and '"text":"' in line and '"text":""' not in line:
                    n += 1
                    if t_first is None:
                        t_first = time.perf_counter()
        last.append((time.perf_counter() - t0) * 1000)
        first.append(((t_first or time.perf_counter()) - t0) * 1000)
        chunks.append(n)
    print(
        f"\nstreamed {model}, up to {max_tokens} tokens: first text chunk {statistics.median(first):.1f} ms, "
        f"end {statistics.median(last):.1f} ms ({statistics.median(chunks):.0f} text chunks); "
        f"not streamed {statistics.median(whole):.1f} ms"
    )


def cold_adapter(args, registry, expert, base: str, via, timed) -> None:  # noqa: ANN001
    """Copies of one adapter registered now, never loaded: first request vs the next ones."""
    tmp = tempfile.mkdtemp()
    src = registry.expert_path(expert)
    ratios, colds, warms = [], [], []
    for i in range(args.cold_copies):
        name = f"bench-cold-{i}-{os.getpid()}"
        shutil.copytree(src, f"{tmp}/{name}")
        registry.register_expert(name, "adapter", f"{tmp}/{name}", base=base)
        cold = timed(via, name)
        warm = statistics.median(timed(via, name) for _ in range(5))
        colds.append(cold)
        warms.append(warm)
        ratios.append(cold / warm)
        registry.remove_expert(name)
    print(
        f"\ncold adapter: first request {statistics.median(colds):.1f} ms, warm {statistics.median(warms):.1f} ms, "
        f"ratio {statistics.median(ratios):.2f} (median over {args.cold_copies} copies)"
    )


def load(args, registry, adapters, http) -> None:  # noqa: ANN001
    """Experts and strategies mixed, at high concurrency: nothing may fail or get lost."""
    models = [e.name for e in adapters[:4]] + ["moe/semantic", "moe/classifier", "moe/skill-k3-vote"]
    prompts = [ex.prompt for e in adapters[:4] for ex in registry.get_examples(e.name, e.version, split="validation")]
    jobs = [(models[i % len(models)], prompts[i % len(prompts)]) for i in range(args.load_requests)]

    def ask(job: tuple[str, str]) -> tuple[int, float]:
        t0 = time.perf_counter()
        try:
            r = http.post("/v1/completions", json={"model": job[0], "prompt": job[1], "max_tokens": args.max_tokens})
            code = r.status_code
        except httpx.HTTPError:
            code = -1
        return code, (time.perf_counter() - t0) * 1000

    # each model answers once first: a strategy's first request builds its router (the classifier
    # may train its head), a start-up cost the load test is not about (the cold part measures it)
    for model in models:
        ask((model, prompts[0]))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.load_concurrency) as pool:
        results = list(pool.map(ask, jobs))
    wall = time.perf_counter() - t0
    errors = sum(code != 200 for code, _ in results)
    times = [ms for _, ms in results]
    print(
        f"\nload: {len(jobs)} requests at concurrency {args.load_concurrency} over {len(models)} models: "
        f"{len(results)} answered, {errors} errors, {len(jobs) - len(results)} lost; p50 {statistics.median(times):.0f} ms, "
        f"p99 {pct(times, 99):.0f} ms; {len(jobs) / wall:.1f} requests/s"
    )


if __name__ == "__main__":
    main()
