"""moerge's gateway against LiteLLM's proxy, in front of the same OpenAI-compatible backend.

Three HTTP paths to one answer, all sent by wrk (Debian package ``wrk``) on this machine:

- *direct*: the backend itself, ``moerge serve --no-ray`` over a tiny Qwen2 chat model (built here
  in seconds, ``tests/chat_models.py``), called by the base's name;
- *moerge*: a second ``moerge serve --no-ray --require-keys`` where the backend is registered as an
  external expert (``--kind external --api-base``), called with a moerge key;
- *LiteLLM*: ``litellm --config`` (the proxy, from the peers' venv) with the backend in its
  ``model_list`` and a ``master_key``, called with that key.

Keys are on on both sides and both access logs are at their defaults. Each round runs every path
at concurrency 1 (wrk ``--latency``: p50 / p99) and then at 16 (requests/s), the paths in turns.
Added latency = a path's percentile − the direct path's in the same round; the table gives the
medians over rounds. The three answers are checked to be the same text first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MOERGE = [sys.executable, "-m", "services.cli"]
PROMPT = "Reverse the string\nhello"
MAX_TOKENS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited (rc {proc.returncode}); its log is above")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers (an auth error is an answer)
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{url}: not ready after {seconds:.0f} s")


def chat(url: str, model: str, key: str | None) -> str:
    body = json.dumps(request_body(model)).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url + "/v1/chat/completions", body, headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())["choices"][0]["message"]["content"]
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"{url} ({model}): HTTP {exc.code}: {exc.read().decode()[:2000]}") from exc


def request_body(model: str) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }


class Wrk:
    """One chat completion, POSTed by wrk over keep-alive connections on one thread."""

    UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}

    def __init__(self, url: str, model: str, key: str | None, script: Path) -> None:
        self.url = url + "/v1/chat/completions"
        self.script = script
        lines = [
            'wrk.method = "POST"',
            f"wrk.body = {json.dumps(json.dumps(request_body(model)))}",
            'wrk.headers["Content-Type"] = "application/json"',
        ]
        if key:
            lines.append(f'wrk.headers["Authorization"] = "Bearer {key}"')
        self.script.write_text("\n".join(lines) + "\n")
        # the same request, with wrk printing what a refused one got back: for the error message
        self.debug = self.script.with_suffix(".debug.lua")
        self.debug.write_text(
            self.script.read_text() + "response = function(status, headers, body)\n"
            '  if status ~= 200 then io.write(status, " ", body, "\\n") end\nend\n'
        )

    def run(self, seconds: int, concurrency: int) -> dict:
        out = subprocess.run(
            ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "60s", "--latency"]
            + ["-s", str(self.script), self.url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        sent = int(re.search(r"(\d+) requests in", out).group(1))
        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        if bad or not sent:
            seen = subprocess.run(
                ["wrk", "-t1", "-c1", "-d1s", "-s", str(self.debug), self.url], capture_output=True, text=True
            ).stdout
            raise SystemExit(f"wrk against {self.url}: not every answer was 2xx:\n{out}\n{seen[:3000]}")
        pct = {
            int(p): float(v) * self.UNITS[u]
            for p, v, u in re.findall(r"^\s+(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        }
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        return {"rps": rps, "p50": pct[50], "p99": pct[99], "sent": sent}


def run_cli(env: dict, *args: str) -> str:
    done = subprocess.run([*MOERGE, *args], env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"moerge {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def gateway(args, peers_python: Path) -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("the gateway comparison sends its load with wrk: apt-get install wrk")
    litellm_bin = peers_python.parent / "litellm"
    if not litellm_bin.exists():
        raise SystemExit(f"no LiteLLM proxy at {litellm_bin}: run `make peers`")
    sys.path.insert(0, str(ROOT))
    from tests.chat_models import make_qwen_chat_model

    work = Path(tempfile.mkdtemp(prefix="moerge-peers-gateway-"))
    procs: list[subprocess.Popen] = []
    try:
        base = make_qwen_chat_model(work / "tiny-chat")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOERGE_")}
        env["PYTHONPATH"] = str(ROOT)
        backend_env = {**env, "MOERGE_HOME": str(work / "backend-home")}
        gateway_env = {
            **env,
            "MOERGE_HOME": str(work / "gateway-home"),
            "BENCH_BACKEND_KEY": "unused",
            "MOERGE_EXTERNAL_KEY_VARS": "BENCH_BACKEND_KEY",  # the variables external experts may read
        }
        ports = {name: free_port() for name in ("direct", "moerge", "litellm")}
        urls = {name: f"http://127.0.0.1:{p}" for name, p in ports.items()}

        run_cli(backend_env, "base", "add", "tiny-chat", str(base))
        api_base = urls["direct"] + "/v1"
        run_cli(
            gateway_env,
            *("register", "openai/tiny-chat", "--name", "ext", "--kind", "external"),
            *("--api-base", api_base, "--api-key-env", "BENCH_BACKEND_KEY"),
        )
        moerge_key = run_cli(gateway_env, "keys", "create", "bench").strip().split()[-1]
        master_key = "sk-moerge-bench-" + os.urandom(6).hex()
        config = work / "litellm.yaml"
        config.write_text(
            "model_list:\n"
            "  - model_name: ext\n"
            "    litellm_params:\n"
            "      model: openai/tiny-chat\n"
            f"      api_base: {api_base}\n"
            "      api_key: unused\n"
            "general_settings:\n"
            f"  master_key: {master_key}\n"
        )
        logs = work / "logs"
        logs.mkdir()

        def start(name: str, cmd: list[str], proc_env: dict) -> None:
            log = open(logs / f"{name}.log", "w")  # noqa: SIM115 - lives as long as the server
            procs.append(subprocess.Popen(cmd, env=proc_env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
            try:
                wait_ready(urls[name] + "/v1/models", procs[-1])
            except SystemExit:
                print((logs / f"{name}.log").read_text()[-4000:], file=sys.stderr)
                raise

        serve = ["serve", "--no-ray", "--host", "127.0.0.1"]
        start("direct", [*MOERGE, *serve, "--port", str(ports["direct"])], backend_env)
        start("moerge", [*MOERGE, *serve, "--require-keys", "--port", str(ports["moerge"])], gateway_env)
        # no model-cost download at start-up (offline); nothing else is changed from the proxy's defaults
        litellm_env = {**env, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        start("litellm", [str(litellm_bin), "--config", str(config), "--port", str(ports["litellm"])], litellm_env)

        paths = {
            "direct": ("tiny-chat", None),
            "moerge gateway (external expert)": ("ext", moerge_key),
            "LiteLLM proxy": ("ext", master_key),
        }
        where = dict(zip(paths, urls.values(), strict=True))
        answers = {name: chat(where[name], model, key) for name, (model, key) in paths.items()}
        if len(set(answers.values())) != 1:
            raise SystemExit(f"the three paths answered differently: {answers}")
        clients = {
            name: Wrk(where[name], model, key, work / f"wrk-{i}.lua")
            for i, (name, (model, key)) in enumerate(paths.items())
        }
        for c in clients.values():
            c.run(1, 1)  # warm-up: connections, caches, the first generate
        seconds = 2 if args.short else args.gateway_seconds
        rounds = 1 if args.short else args.gateway_rounds
        got: dict[str, list[dict]] = {name: [] for name in paths}
        for _ in range(rounds):
            for name, c in clients.items():
                lat = c.run(seconds, 1)
                lat["rps16"] = c.run(seconds, 16)["rps"]
                got[name].append(lat)
        report(got, rounds, seconds, answers["direct"])
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


def report(got: dict[str, list[dict]], rounds: int, seconds: int, answer: str) -> None:
    print(f"\n## Gateway: the same backend, {MAX_TOKENS} tokens of chat, wrk; {rounds} round(s) of {seconds} s a run\n")
    print(f"(every path answered {answer!r})\n")
    direct = got["direct"]
    print("| path | p50 ms | p99 ms | added p50 ms | added p99 ms | requests/s at c16 | ÷ direct |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    med: dict[str, dict[str, float]] = {}
    for name, runs in got.items():
        row = {k: statistics.median(r[k] for r in runs) for k in ("p50", "p99", "rps16")}
        row["add50"] = statistics.median(r["p50"] - d["p50"] for r, d in zip(runs, direct, strict=True))
        row["add99"] = statistics.median(r["p99"] - d["p99"] for r, d in zip(runs, direct, strict=True))
        row["ratio"] = statistics.median(r["rps16"] / d["rps16"] for r, d in zip(runs, direct, strict=True))
        med[name] = row
        added = ("", "") if name == "direct" else (f"{row['add50']:.1f}", f"{row['add99']:.1f}")
        print(
            f"| {name} | {row['p50']:.1f} | {row['p99']:.1f} | {added[0]} | {added[1]} | "
            f"{row['rps16']:.0f} | {row['ratio']:.2f} |"
        )
    ours, peer = med["moerge gateway (external expert)"], med["LiteLLM proxy"]
    print(
        f"\n- moerge ÷ LiteLLM: requests/s at c16 {ours['rps16'] / peer['rps16']:.2f}×; "
        f"added p50 {ours['add50']:.1f} vs {peer['add50']:.1f} ms, added p99 {ours['add99']:.1f} vs {peer['add99']:.1f} ms"
    )
