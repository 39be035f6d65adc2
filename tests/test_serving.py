"""``moerge serve`` on real Ray Serve: the micro zoo behind the gateway ingress, engine deployments
multiplexing adapters, the strategies deployment; the official openai client over real HTTP;
hot registration and removal through the API; a replica killed mid-run."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import ray
from ray import serve

from services.serving.app import APP_NAME, deployment_name
from tests.ray_cluster import Cluster, adapters, client, local_greedy, ray_cluster, zoo_prompt

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def cluster(micro_zoo, tmp_path_factory) -> Iterator[Cluster]:
    config = {
        "engines": {"default": {"replicas": 2, "num_cpus": 1, "max_adapters_per_replica": 4}},
        "strategies": {"names": ["moe/semantic", "moe/classifier", "moe/skill-k3-vote"], "refresh_interval_s": 0.5},
    }
    with ray_cluster(micro_zoo, tmp_path_factory.mktemp("serve-home"), config) as c:
        yield c


def test_models_lists_experts_and_strategies(cluster: Cluster) -> None:
    ids = {m.id for m in client(cluster).models.list().data}
    assert set(adapters(cluster)) <= ids
    assert {"moe/semantic", "moe/classifier", "moe/skill-k3-vote"} <= ids
    assert "moe/oracle" not in ids  # needs the gold task: evaluated, never served


def test_expert_on_ray_equals_in_process_engine(cluster: Cluster) -> None:
    for name in adapters(cluster)[:3]:
        prompt, _ = zoo_prompt(cluster, name)
        reply = client(cluster).completions.create(model=name, prompt=prompt, max_tokens=24, temperature=0)
        assert reply.choices[0].text == local_greedy(cluster, name, prompt, 24)
        assert reply.usage.completion_tokens > 0


def test_a_base_answers_by_its_name_on_ray(cluster: Cluster) -> None:
    """The base's engine deployment answers for the base itself (no multiplexed id), whole and
    streamed, and /v1/models lists it."""
    from composer.engine_protocol import GenerateRequest
    from services.engines.hf import HFEngine

    assert cluster.base in {m.id for m in client(cluster).models.list().data}
    prompt, _ = zoo_prompt(cluster, adapters(cluster)[0])
    engine = HFEngine(cluster.manifest.path_of(cluster.manifest.base.path))
    want = engine.generate([GenerateRequest(prompt, None, 12)])[0].text
    reply = client(cluster).completions.create(model=cluster.base, prompt=prompt, max_tokens=12)
    assert reply.choices[0].text == want and reply.model_extra["moe"]["info"]["kind"] == "base"
    stream = client(cluster).completions.create(model=cluster.base, prompt=prompt, max_tokens=12, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == want


def test_strategy_streams_with_provenance(cluster: Cluster) -> None:
    name = adapters(cluster)[0]
    prompt, _ = zoo_prompt(cluster, name)
    c = client(cluster)
    whole = c.chat.completions.create(
        model="moe/semantic", messages=[{"role": "user", "content": prompt}], max_tokens=24
    )
    moe = whole.model_extra["moe"]
    assert moe["strategy"] == "moe/semantic" and moe["router"] == "semantic"
    chosen = moe["experts"][0]["name"]
    assert chosen in adapters(cluster) or chosen == cluster.base
    pieces, final = [], None
    stream = c.chat.completions.create(
        model="moe/semantic", messages=[{"role": "user", "content": prompt}], max_tokens=24, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if (chunk.model_extra or {}).get("moe"):
            final = chunk.model_extra["moe"]
    text = whole.choices[0].message.content
    assert "".join(pieces) == text
    assert final is not None and final["strategy"] == "moe/semantic"
    assert final["experts"] == moe["experts"] and final["router"] == "semantic" and final["composer"] == "single"
    assert final["decision"]["router_ms"] > 0
    # one routed expert's answer: its tokens go out as the engine generates them (more pieces than
    # words), where a voting strategy's answer can only go out once it is whole
    if chosen != cluster.base and len(text) >= 2:
        assert len(pieces) > len(re.findall(r"\s*\S+\s*|\s+", text)), pieces
    # the routed expert, asked directly, says the same: the strategy really ran it
    if chosen != cluster.base:
        direct = c.chat.completions.create(model=chosen, messages=[{"role": "user", "content": prompt}], max_tokens=24)
        assert direct.choices[0].message.content == whole.choices[0].message.content


def test_vote_strategy_reports_agreement(cluster: Cluster) -> None:
    prompt, _ = zoo_prompt(cluster, adapters(cluster)[1])
    with httpx.Client(base_url=cluster.url, timeout=120) as h:
        r = h.post("/v1/completions", json={"model": "moe/skill-k3-vote", "prompt": prompt, "max_tokens": 16})
    assert r.status_code == 200, r.text
    moe = r.json()["moe"]
    assert len(moe["experts"]) == 3 and moe["agreement"] is not None
    assert r.headers["x-moe-strategy"] == "moe/skill-k3-vote"


def test_unknown_model_is_404(cluster: Cluster) -> None:
    with pytest.raises(openai.NotFoundError):
        client(cluster).completions.create(model="no-such-expert", prompt="x", max_tokens=2)


def test_expert_streams_as_its_engine_generates(cluster: Cluster) -> None:
    """Through the engine deployment's streaming call: the text goes out token by token while the
    engine generates, not in words once the answer is whole, and joins to the non-streamed answer."""
    c = client(cluster)
    for name in adapters(cluster):
        prompt, _ = zoo_prompt(cluster, name)
        text = c.completions.create(model=name, prompt=prompt, max_tokens=24).choices[0].text
        if len(text) < 2:
            continue
        stream = c.completions.create(model=name, prompt=prompt, max_tokens=24, stream=True)
        pieces = [ch.choices[0].text for ch in stream if ch.choices and ch.choices[0].text]
        assert "".join(pieces) == text
        assert len(pieces) > len(re.findall(r"\s*\S+\s*|\s+", text)), pieces
        return
    pytest.fail("no expert answered with two characters or more")


def test_concurrent_streams_each_get_their_own_text(cluster: Cluster) -> None:
    """Streams arriving together share the engine's batches, with each other and with requests
    not streamed: every stream still joins to exactly its own answer, however long each row runs."""
    c = client(cluster)
    jobs = [
        (name, zoo_prompt(cluster, name, i=i)[0], max_tokens)
        for name in adapters(cluster)[:3]
        for i in range(2)
        for max_tokens in (4, 24)
    ]
    expected = [c.completions.create(model=m, prompt=p, max_tokens=n).choices[0].text for m, p, n in jobs]

    def streamed(job: tuple[str, str, int]) -> str:
        m, p, n = job
        stream = c.completions.create(model=m, prompt=p, max_tokens=n, stream=True)
        return "".join(ch.choices[0].text for ch in stream if ch.choices and ch.choices[0].text)

    def whole(job: tuple[str, str, int]) -> str:
        return c.completions.create(model=job[0], prompt=job[1], max_tokens=job[2]).choices[0].text

    with ThreadPoolExecutor(len(jobs) * 2) as pool:
        streams = [pool.submit(streamed, job) for job in jobs]
        wholes = [pool.submit(whole, job) for job in jobs]
        assert [f.result() for f in streams] == expected
        assert [f.result() for f in wholes] == expected


def test_concurrent_requests_share_engine_batches(cluster: Cluster) -> None:
    """Requests for one expert that arrive together run as few engine batches, and the engine's
    batch_stats account for every one of them (benchmarks read these numbers). Each replica
    counts its own batches, so the test reads every replica's."""
    engine = serve.get_deployment_handle(deployment_name(cluster.base), app_name=APP_NAME)
    replicas = len(_engine_replicas(cluster.base))

    def every_replica_stats() -> list[dict]:
        seen: dict[str, dict] = {}  # the first answer of each replica: reading resets its counts
        for _ in range(200):
            stats = engine.batch_stats.remote(True).result()
            seen.setdefault(stats["replica"], stats)
            if len(seen) == replicas:
                return list(seen.values())
        raise AssertionError(f"batch_stats reached {len(seen)} of {replicas} replicas")

    name = adapters(cluster)[0]
    prompt, _ = zoo_prompt(cluster, name)
    c = client(cluster)
    c.completions.create(model=name, prompt=prompt, max_tokens=4)  # loaded before counting
    every_replica_stats()
    with ThreadPoolExecutor(8) as pool:
        texts = list(
            pool.map(lambda _: c.completions.create(model=name, prompt=prompt, max_tokens=4).choices[0].text, range(8))
        )
    stats = every_replica_stats()
    assert len(set(texts)) == 1  # greedy: one answer, whatever batch each row ran in
    calls, batches = (sum(s[k] for s in stats) for k in ("calls", "batches"))
    assert calls == 8 and sum(s["busy_s"] for s in stats) > 0
    assert all(len(s["sizes"]) == s["batches"] and sum(s["sizes"]) == s["calls"] for s in stats)
    assert batches < 8  # they shared batches


def test_hot_registration_then_removal(cluster: Cluster) -> None:
    # a made-up skill whose examples look like nothing else: the semantic router must find it
    examples = [
        {"prompt": f"Zorblify the quux token number {i}", "reference": "zorb", "split": "train"} for i in range(6)
    ]
    body = {
        "name": "zorblifier",
        "kind": "adapter",
        "path": str(cluster.spare),
        "base": cluster.base,
        "domains": ["zorb"],
        "skills": ["zorblify"],
        "description": "zorblifies quux tokens",
        "examples": examples,
    }
    c = client(cluster)
    with httpx.Client(base_url=cluster.url, timeout=120) as h:
        r = h.post("/v1/experts", json=body)
        assert r.status_code == 201, r.text
        t0 = time.monotonic()
        # servable at once: the engine deployment loads it on its first request
        reply = c.completions.create(model="zorblifier", prompt="Zorblify the quux token number 9", max_tokens=8)
        assert reply.choices[0].text is not None
        # routable once the strategies replica sees the registry change (seconds, no restart)
        chosen = None
        while time.monotonic() - t0 < 60:
            r = h.post(
                "/v1/completions",
                json={"model": "moe/semantic", "prompt": "Zorblify the quux token number 7", "max_tokens": 8},
            )
            assert r.status_code == 200, r.text
            chosen = r.json()["moe"]["experts"][0]["name"]
            if chosen == "zorblifier":
                break
            time.sleep(0.5)
        assert chosen == "zorblifier"

        assert h.delete("/v1/experts/zorblifier").status_code == 200
        r = h.post("/v1/completions", json={"model": "zorblifier", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = h.post(
                "/v1/completions",
                json={"model": "moe/semantic", "prompt": "Zorblify the quux token number 7", "max_tokens": 8},
            )
            assert r.status_code == 200, r.text
            if r.json()["moe"]["experts"][0]["name"] != "zorblifier":
                break
            time.sleep(0.5)
        assert r.json()["moe"]["experts"][0]["name"] != "zorblifier"

        # the next registration may get the deleted row's id (SQLite): the replica still caches the
        # removed expert's weights under that id, and must serve the new expert, not them
        other = cluster.manifest.path_of(
            next(e for e in cluster.manifest.experts if e.name == adapters(cluster)[1]).path
        )
        body = {**body, "name": "zorblifier-two", "path": str(other), "examples": []}
        r = h.post("/v1/experts", json=body)
        assert r.status_code == 201, r.text
        prompt, _ = zoo_prompt(cluster, adapters(cluster)[1])
        reply = c.completions.create(model="zorblifier-two", prompt=prompt, max_tokens=24)
        assert reply.choices[0].text == local_greedy(cluster, adapters(cluster)[1], prompt, 24)
        assert h.delete("/v1/experts/zorblifier-two").status_code == 200


def test_a_strategy_posted_while_serving_answers_without_a_restart(cluster: Cluster) -> None:
    """POST /v1/strategies on Ray: the gateway replicas list it and the strategies replica answers
    it (whole and streamed) within seconds; a bad one is refused with nothing stored."""
    names = adapters(cluster)[:2]
    prompt, _ = zoo_prompt(cluster, names[1])
    c = client(cluster)
    with httpx.Client(base_url=cluster.url, timeout=120) as h:
        bad = h.post(
            "/v1/strategies",
            json={
                "name": "pair",
                "router": "semantic",
                "composer": "vote",
                "composer_params": {"k": 0},
                "experts": names,
            },
        )
        assert bad.status_code == 400 and "must be ≥ 1" in bad.json()["error"]["message"]
        assert not cluster.registry.list_strategies()
        r = h.post(
            "/v1/strategies", json={"name": "pair", "router": "semantic", "composer": "single", "experts": names}
        )
        assert r.status_code == 201, r.text
        deadline = time.monotonic() + 30
        while "moe/pair" not in {m.id for m in c.models.list().data}:
            assert time.monotonic() < deadline, "moe/pair was not listed within 30 s"
            time.sleep(0.5)
        while True:  # the strategies replica re-reads the registry every refresh_interval_s
            r = h.post("/v1/completions", json={"model": "moe/pair", "prompt": prompt, "max_tokens": 12})
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert r.status_code == 200, r.text
        chosen = r.json()["moe"]["experts"][0]["name"]
        assert chosen in names
        streamed = "".join(
            chunk.choices[0].text
            for chunk in c.completions.create(model="moe/pair", prompt=prompt, max_tokens=12, stream=True)
            if chunk.choices
        )
        assert streamed == r.json()["choices"][0]["text"]
        assert h.delete("/v1/strategies/pair").status_code == 200


def test_an_adapter_on_a_base_registered_while_serving_answers_without_a_restart(cluster: Cluster) -> None:
    """No engine deployment exists for a base registered after start-up: its adapters run on the
    models deployment, each on an engine of its own, and answer as they do in process."""
    name = adapters(cluster)[2]
    base_dir = cluster.manifest.path_of(cluster.manifest.base.path)
    cluster.registry.register_base("late-base", base_dir)
    adapter_dir = cluster.manifest.path_of(next(e for e in cluster.manifest.experts if e.name == name).path)
    with httpx.Client(base_url=cluster.url, timeout=120) as h:
        r = h.post(
            "/v1/experts",
            json={"name": "late-adapter", "kind": "adapter", "path": str(adapter_dir), "base": "late-base"},
        )
        assert r.status_code == 201, r.text
        prompt, _ = zoo_prompt(cluster, name)
        reply = client(cluster).completions.create(model="late-adapter", prompt=prompt, max_tokens=24)
        assert reply.choices[0].text == local_greedy(cluster, name, prompt, 24)
        assert h.delete("/v1/experts/late-adapter").status_code == 200


def _engine_replicas(base: str) -> list[str]:
    from services.serving.app import deployment_name

    marker = f"#{deployment_name(base)}#"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if marker in a["name"]]


def test_replica_killed_mid_run(cluster: Cluster) -> None:
    names = adapters(cluster)
    jobs = [(names[i % len(names)], zoo_prompt(cluster, names[i % len(names)], "train", i)[0]) for i in range(24)]
    replicas = _engine_replicas(cluster.base)
    assert len(replicas) == 2, replicas
    c = client(cluster)

    def ask(job: tuple[str, str]) -> str:
        model, prompt = job
        return c.completions.create(model=model, prompt=prompt, max_tokens=16).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, job) for job in jobs]
        time.sleep(1.0)  # requests are in flight
        ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
        answers = [f.result() for f in futures]  # none raised: retried on the surviving replica
    assert len(answers) == len(jobs)
    expected = {job: local_greedy(cluster, job[0], job[1], 16) for job in jobs[:4]}
    assert [answers[i] for i in range(4)] == list(expected.values())

    # the controller replaces the dead replica: two healthy replicas again
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = _engine_replicas(cluster.base)
        if len(now) == 2 and replicas[0] not in now:
            status = serve.status().applications["moerge"]
            if status.status == "RUNNING":
                break
        time.sleep(1)
    now = _engine_replicas(cluster.base)
    assert len(now) == 2 and replicas[0] not in now
    assert ask(jobs[0]) == answers[0]


# ------------------------------------------------------------------------------------ batching


def test_paced_batcher_batches_at_the_pace_of_the_work() -> None:
    """Calls arriving while a batch runs wait for the next batch together (not one batch each);
    a caller's own error reaches that caller alone; a batch that fails fails all its callers."""
    import asyncio

    from services.serving.batching import PacedBatcher

    seen: list[list[int]] = []

    async def run(items: list[int]) -> list[object]:
        seen.append(list(items))
        await asyncio.sleep(0.05)  # the engine is busy
        if -1 in items and len(items) == 1:
            raise RuntimeError("whole batch")
        return [ValueError(f"bad {i}") if i == 13 else i * 10 for i in items]

    async def main() -> None:
        b = PacedBatcher(run, max_calls=4, wait_s=0.002)
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.01)  # batch [0] is running
        rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 7)]
        await asyncio.sleep(0.005)
        assert await first == 0
        assert await asyncio.gather(*rest) == [10, 20, 30, 40, 50, 60]
        assert seen == [[0], [1, 2, 3, 4], [5, 6]]  # arrivals during [0] share batches of max_calls

        ok, bad = b.submit(1), b.submit(13)
        results = await asyncio.gather(ok, bad, return_exceptions=True)
        assert results[0] == 10 and isinstance(results[1], ValueError)

        with pytest.raises(RuntimeError, match="whole batch"):
            await b.submit(-1)

        gone = asyncio.ensure_future(b.submit(2))
        kept = asyncio.ensure_future(b.submit(3))
        await asyncio.sleep(0)
        gone.cancel()  # its caller went away before the batch closed: skipped
        assert await kept == 30
        assert seen[-1] == [3]

    asyncio.run(main())
