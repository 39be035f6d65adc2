"""The gateway over real HTTP: uvicorn on a loopback port, a LocalBackend over a registry in tmp
(SQLite) holding a tiny Llama base and two LoRA experts, and the official clients (openai, litellm)
talking to it."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch when litellm loads

import openai  # noqa: E402  (the [test] extra installs it: a missing client must fail, not skip)

from composer.base import Completion, Provenance  # noqa: E402
from composer.engine_protocol import EngineError  # noqa: E402
from registry.errors import NotFoundError  # noqa: E402
from registry.service import Registry  # noqa: E402
from services.gateway import GatewaySettings, LocalBackend, create_app  # noqa: E402
from services.gateway.backend import SamplingParams  # noqa: E402
from tests.factories import make_tiny_base, make_tiny_lora  # noqa: E402
from tests.servers import serve  # noqa: E402

# ------------------------------------------------------------------------------------- fixtures


class World:
    """What the tests share: folders, registry, backend, keys and the running gateways."""

    root: Path
    registry: Registry
    backend: LocalBackend
    url: str  # keys required
    open_url: str  # no keys, short timeout
    admin: str
    user: str  # may use alpha and moe/first only
    limited: str  # 3 requests per minute
    spare_lora: Path
    bin_lora: Path


def _first(backend: LocalBackend):  # noqa: ANN202
    """A trivial strategy: alpha answers, the provenance claims a routed 75/25 decision."""

    def strategy(prompt: str, params: SamplingParams) -> Completion:
        done = backend.run_expert("alpha", prompt, params)
        p = done.provenance
        return replace(
            done,
            provenance=Provenance(
                composer="test",
                router="test-router",
                experts=[("alpha", 0.75), ("beta", 0.25)],
                outputs=p.outputs,
                decision_info={"router_ms": 2.5},
            ),
        )

    return strategy


def _broken(prompt: str, params: SamplingParams) -> Completion:
    raise EngineError("the engine is on fire")


def _slow(prompt: str, params: SamplingParams) -> Completion:
    time.sleep(2.0)
    return Completion(text="late", provenance=Provenance(composer="test", router=None, experts=[]))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:  # noqa: ANN001
    w = World()
    w.root = tmp_path_factory.mktemp("gateway")
    base = make_tiny_base(w.root / "base")
    lora_a = make_tiny_lora(base, w.root / "lora-a", seed=1)
    lora_b = make_tiny_lora(base, w.root / "lora-b", seed=2)
    w.spare_lora = make_tiny_lora(base, w.root / "lora-c", seed=3)
    w.bin_lora = w.root / "lora-bin"
    w.bin_lora.mkdir()
    (w.bin_lora / "adapter_config.json").write_text((lora_a / "adapter_config.json").read_text())
    (w.bin_lora / "adapter_model.bin").write_bytes(b"\x80\x04pickle")

    w.registry = Registry(f"sqlite:///{w.root / 'registry.db'}", artifact_root=w.root / "store")
    w.registry.register_base("tiny", base)
    w.registry.register_expert("alpha", "adapter", lora_a, base="tiny", domains=["math"], description="alpha")
    w.registry.register_expert("beta", "adapter", lora_b, base="tiny", skills=["upper"])
    w.admin = w.registry.create_key("ops", scope="admin")[1]
    w.user = w.registry.create_key("app", scope="user", models=["alpha", "moe/first"])[1]
    w.limited = w.registry.create_key("slowpoke", scope="user", rpm=3)[1]

    w.backend = LocalBackend(w.registry)
    w.backend.add_strategy("first", _first(w.backend))
    w.backend.add_strategy("moe/broken", _broken)
    settings = GatewaySettings(require_keys=True, max_prompt_chars=500, request_timeout_s=60)
    open_settings = GatewaySettings(require_keys=False, request_timeout_s=0.5)
    open_backend = LocalBackend(w.registry, {"slow": _slow, "first": _first(w.backend)})
    with (
        serve(create_app(w.backend, w.registry, settings)) as url,
        serve(create_app(open_backend, w.registry, open_settings)) as open_url,
    ):
        w.url, w.open_url = url, open_url
        yield w
    w.registry.close()


def client(w: World, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{w.url}/v1", api_key=key or w.admin, max_retries=0, timeout=60)


def http(w: World, key: str | None = None, url: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url or w.url, headers=headers, timeout=60)


def assert_error(response: httpx.Response, status: int, type_: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if type_ is not None:
        assert body["error"]["type"] == type_, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


CHAT = {"model": "alpha", "messages": [{"role": "user", "content": "12+7="}], "max_tokens": 6}


# ------------------------------------------------------------------------------------- tests


def test_healthz(world: World) -> None:
    with http(world) as h:
        r = h.get("/healthz")
    assert r.status_code == 200
    assert r.json()["status"] == "ok" and r.json()["models"] >= 3


def test_models_list(world: World) -> None:
    with http(world, world.admin) as h:
        body = h.get("/v1/models").json()
    assert body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert {"alpha", "beta", "moe/first", "moe/broken"} <= set(by_id)
    for m in body["data"]:
        assert m["object"] == "model" and isinstance(m["created"], int) and m["owned_by"]
    assert by_id["alpha"]["kind"] == "adapter" and by_id["moe/first"]["kind"] == "strategy"
    # the official client reads it, and a restricted key sees only what it may use
    ids = {m.id for m in client(world, world.user).models.list()}
    assert ids == {"alpha", "moe/first"}


def test_chat_streamed_equals_non_streamed(world: World) -> None:
    c = client(world)
    for model in ("alpha", "beta"):
        messages = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "abc def"}]
        reply = c.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
        text = reply.choices[0].message.content
        assert reply.object == "chat.completion" and reply.model == model
        assert reply.choices[0].message.role == "assistant"
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 8
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        assert reply.model_extra["moe"]["experts"] == [{"name": model, "weight": 1.0}]

        chunks = list(
            c.chat.completions.create(
                model=model, messages=messages, max_tokens=8, stream=True, stream_options={"include_usage": True}
            )
        )
        streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert streamed == text
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == reply.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    # two adapters of one base share one engine
    assert [k for k in world.backend._slots] == ["base:tiny"]


def test_completion_streamed_equals_non_streamed(world: World) -> None:
    c = client(world)
    reply = c.completions.create(model="beta", prompt="hello world", max_tokens=8)
    assert reply.object == "text_completion"
    text = reply.choices[0].text
    chunks = list(c.completions.create(model="beta", prompt="hello world", max_tokens=8, stream=True))
    pieces = [ch.choices[0].text for ch in chunks if ch.choices and ch.choices[0].text]
    assert "".join(pieces) == text
    # an expert's text goes out token by token as the engine makes it, not in words (with their
    # trailing space) once the answer is whole
    assert len(pieces) > len(re.findall(r"\s*\S+\s*|\s+", text))
    # alpha and beta answer differently: each request really runs its own adapter
    other = c.completions.create(model="alpha", prompt="hello world", max_tokens=8).choices[0].text
    assert other != text


def test_concurrent_requests_match_serial(world: World) -> None:
    bodies = [
        {**CHAT, "model": m, "messages": [{"role": "user", "content": f"q{i}"}]}
        for i, m in enumerate(["alpha", "beta"] * 3)
    ]

    def ask(body: dict) -> str:
        with http(world, world.admin) as h:
            return h.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]

    serial = [ask(b) for b in bodies]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, bodies)) == serial


def test_litellm_completion(world: World) -> None:
    import litellm

    reply = litellm.completion(
        model="openai/alpha",
        api_base=f"{world.url}/v1",
        api_key=world.admin,
        messages=[{"role": "user", "content": "12+7="}],
        max_tokens=6,
        temperature=0,
    )
    direct = client(world).chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "12+7="}], max_tokens=6, temperature=0
    )
    assert reply.choices[0].message.content == direct.choices[0].message.content


def test_provenance_direct_expert(world: World) -> None:
    with http(world, world.admin) as h:
        r = h.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.headers["x-moe-strategy"] == "direct"
    assert r.headers["x-moe-experts"] == "alpha:1"
    assert r.headers["x-moe-router-ms"] == "0.000"
    moe = r.json()["moe"]
    assert moe["composer"] == "direct" and moe["router"] is None and moe["strategy"] is None
    assert moe["experts"] == [{"name": "alpha", "weight": 1.0}]
    assert moe["outputs"][0]["expert"] == "alpha"
    assert moe["usage"]["engine_calls"] == 1
    assert moe["info"]["version"] == "1"


def test_provenance_strategy(world: World) -> None:
    with http(world, world.user) as h:
        r = h.post("/v1/completions", json={"model": "moe/first", "prompt": "12+7=", "max_tokens": 6})
        streamed = h.post(
            "/v1/completions", json={"model": "moe/first", "prompt": "12+7=", "max_tokens": 6, "stream": True}
        )
    assert r.status_code == 200, r.text
    assert r.headers["x-moe-strategy"] == "moe/first"
    assert r.headers["x-moe-experts"] == "alpha:0.75,beta:0.25"
    assert r.headers["x-moe-router-ms"] == "2.500"
    moe = r.json()["moe"]
    assert moe["strategy"] == "moe/first" and moe["router"] == "test-router"
    assert moe["experts"] == [{"name": "alpha", "weight": 0.75}, {"name": "beta", "weight": 0.25}]
    assert moe["decision"] == {"router_ms": 2.5}
    assert {"agreement", "segments", "outputs"} <= set(moe)

    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.headers["x-moe-strategy"] == "moe/first"
    events = sse_events(streamed)
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert final["choices"][0]["finish_reason"] in ("stop", "length")
    assert final["moe"]["experts"] == moe["experts"]
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == r.json()["choices"][0]["text"]


def test_auth_required(world: World) -> None:
    with http(world) as h:
        assert_error(h.get("/v1/models"), 401, "authentication_error", "missing_api_key")
        assert_error(h.post("/v1/chat/completions", json=CHAT), 401, "authentication_error")
        bad = h.get("/v1/models", headers={"Authorization": "Bearer mk-not-a-real-key"})
        assert_error(bad, 401, "authentication_error", "invalid_api_key")
        assert_error(h.get("/v1/models", headers={"Authorization": "Basic abc"}), 401)
        # the key is checked before the body
        assert_error(h.post("/v1/chat/completions", content=b"{oops"), 401)
    with pytest.raises(openai.AuthenticationError):
        client(world, "mk-wrong").chat.completions.create(model="alpha", messages=CHAT["messages"])


def test_revoked_key(world: World) -> None:
    _, key = world.registry.create_key("short-lived")
    with http(world, key) as h:
        assert h.get("/v1/models").status_code == 200
        world.registry.revoke_key("short-lived")
        assert_error(h.get("/v1/models"), 401, code="invalid_api_key")


def test_model_allow_list(world: World) -> None:
    with http(world, world.user) as h:
        assert h.post("/v1/chat/completions", json=CHAT).status_code == 200
        err = assert_error(
            h.post("/v1/chat/completions", json={**CHAT, "model": "beta"}), 403, "permission_error", "model_not_allowed"
        )
        assert err["param"] == "model"
        assert_error(h.get("/v1/experts/beta"), 403, "permission_error")
        assert {e["name"] for e in h.get("/v1/experts").json()["data"]} == {"alpha"}
    with pytest.raises(openai.PermissionDeniedError):
        client(world, world.user).completions.create(model="beta", prompt="x", max_tokens=2)


def test_rate_limit(world: World) -> None:
    with http(world, world.limited) as h:
        for _ in range(3):
            assert h.get("/v1/models").status_code == 200
        r = h.get("/v1/models")
        assert_error(r, 429, "rate_limit_error", "rate_limit_exceeded")
        assert int(r.headers["retry-after"]) >= 1
    # other keys are not affected
    with http(world, world.admin) as h:
        assert h.get("/v1/models").status_code == 200


def test_registration_is_admin_only(world: World) -> None:
    body = {"name": "sneaky", "kind": "adapter", "source": str(world.spare_lora), "base": "tiny"}
    with http(world, world.user) as h:
        assert_error(h.post("/v1/experts", json=body), 403, "permission_error", "admin_required")
        assert_error(h.delete("/v1/experts/alpha"), 403, "permission_error")
    with http(world) as h:
        assert_error(h.post("/v1/experts", json=body), 401)
    assert "sneaky" not in {e.name for e in world.registry.list_experts()}
    assert "alpha" in {e.name for e in world.registry.list_experts()}


def test_hot_registration_and_removal(world: World) -> None:
    body = {
        "name": "gamma",
        "kind": "adapter",
        "path": str(world.spare_lora),
        "base": "tiny",
        "domains": ["poetry"],
        "skills": ["rhyme"],
        "description": "writes rhymes",
        "examples": [{"prompt": "roses are", "reference": "red"}, {"prompt": "sky is", "split": "validation"}],
    }
    with http(world, world.admin) as h:
        r = h.post("/v1/experts", json=body)
        assert r.status_code == 201, r.text
        card = r.json()
        assert card["name"] == "gamma" and card["version"] == "1" and card["status"] == "ready"
        assert card["base"] == "tiny" and card["domains"] == ["poetry"] and card["checksum"]

        assert "gamma" in {m["id"] for m in h.get("/v1/models").json()["data"]}
        detail = h.get("/v1/experts/gamma").json()
        assert detail["examples"] == 2 and detail["versions"] == ["1"] and detail["skills"] == ["rhyme"]

        # servable at once, no restart
        reply = client(world).completions.create(model="gamma", prompt="roses are", max_tokens=5)
        assert reply.choices[0].text is not None and reply.usage.completion_tokens > 0
        assert h.post("/v1/completions", json={"model": "gamma@1", "prompt": "x", "max_tokens": 2}).status_code == 200

        gone = h.delete("/v1/experts/gamma")
        assert gone.status_code == 200 and gone.json()["deleted"] is True
        assert [v["version"] for v in gone.json()["versions"]] == ["1"]
        assert_error(h.post("/v1/completions", json={"model": "gamma", "prompt": "x"}), 404, code="model_not_found")
        assert_error(h.delete("/v1/experts/gamma"), 404, code="expert_not_found")
        assert_error(h.get("/v1/experts/gamma"), 404, code="expert_not_found")
    assert "gamma" not in {e.name for e in world.registry.list_experts()}


def test_full_model_expert(world: World) -> None:
    """A ``model`` expert runs on an engine of its own, dropped when the expert is removed."""
    base_dir = world.root / "base"
    with http(world, world.admin) as h:
        r = h.post("/v1/experts", json={"name": "solo", "kind": "model", "source": str(base_dir)})
        assert r.status_code == 201, r.text
        assert r.json()["base"] is None and r.json()["kind"] == "model"
        reply = h.post("/v1/completions", json={"model": "solo", "prompt": "abc", "max_tokens": 4})
        assert reply.status_code == 200, reply.text
        assert reply.json()["moe"]["info"]["kind"] == "model"
        assert any(k.startswith("model:") for k in world.backend._slots)
        assert h.delete("/v1/experts/solo").status_code == 200
    assert not any(k.startswith("model:") for k in world.backend._slots)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"name": "pickled", "kind": "adapter", "source": "BIN", "base": "tiny"}, ".bin"),
        ({"name": "orphan", "kind": "adapter", "source": "SPARE", "base": "no-such-base"}, "no-such-base"),
        ({"name": "bad name!", "kind": "adapter", "source": "SPARE", "base": "tiny"}, "name"),
        ({"name": "nobase", "kind": "adapter", "source": "SPARE"}, "base"),
    ],
)
def test_refused_registration(world: World, body: dict, fragment: str) -> None:
    body = {**body, "source": str(world.bin_lora if body["source"] == "BIN" else world.spare_lora)}
    before = {(e.name, e.version) for e in world.registry.list_experts()}
    with http(world, world.admin) as h:
        err = assert_error(h.post("/v1/experts", json=body), 400, "invalid_request_error", "registration_refused")
    assert fragment in err["message"]
    assert {(e.name, e.version) for e in world.registry.list_experts()} == before
    store = world.root / "store"
    assert not any(body["name"] in p.name for p in store.rglob("*"))


def test_malformed_admin_body(world: World) -> None:
    with http(world, world.admin) as h:
        err = assert_error(h.post("/v1/experts", json={"name": "x", "source": "/tmp", "colour": "red"}), 422)
        assert err["param"] == "colour"
        assert_error(h.post("/v1/experts", json={"name": "x"}), 422, "invalid_request_error")


def test_unknown_model(world: World) -> None:
    with http(world, world.admin) as h:
        for path, body in [
            ("/v1/chat/completions", {**CHAT, "model": "nope"}),
            ("/v1/completions", {"model": "nope", "prompt": "x"}),
            ("/v1/chat/completions", {**CHAT, "model": "moe/nope", "stream": True}),
            ("/v1/completions", {"model": "alpha@99", "prompt": "x"}),
        ]:
            err = assert_error(h.post(path, json=body), 404, code="model_not_found")
            assert err["param"] == "model"
        assert_error(h.get("/v1/no-such-route"), 404)
    with pytest.raises(openai.NotFoundError):
        client(world).chat.completions.create(model="nope", messages=CHAT["messages"])


def test_malformed_requests(world: World) -> None:
    with http(world, world.admin) as h:
        post = h.post
        bad_json = post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
        assert_error(bad_json, 400, "invalid_request_error", "invalid_json")
        err = assert_error(post("/v1/chat/completions", json={"model": "alpha"}), 422, "invalid_request_error")
        assert err["param"] == "messages"
        assert_error(post("/v1/chat/completions", json={**CHAT, "temperature": -1}), 422)
        assert_error(post("/v1/chat/completions", json={**CHAT, "max_tokens": 0}), 422)
        assert_error(post("/v1/completions", json={"model": "alpha", "prompt": ["a", "b"]}), 422)
        assert_error(post("/v1/chat/completions", json={**CHAT, "n": 2}), 400, code="unsupported_parameter")
        assert_error(post("/v1/completions", json={"model": "alpha", "prompt": "x", "echo": True}), 400)
        assert_error(post("/v1/chat/completions", json={**CHAT, "max_tokens": 100_000}), 400)
        # the tiny Llama has no chat template: its prompt is the last user turn, and there is none
        no_user = {**CHAT, "messages": [{"role": "system", "content": "hi"}]}
        err = assert_error(post("/v1/chat/completions", json=no_user), 400, code="invalid_request")
        assert err["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        client(world).chat.completions.create(model="alpha", messages=CHAT["messages"], n=3)


def test_prompt_too_long(world: World) -> None:
    long = "x" * 501
    with http(world, world.admin) as h:
        body = {**CHAT, "messages": [{"role": "user", "content": long}]}
        assert_error(h.post("/v1/chat/completions", json=body), 413, code="prompt_too_long")
        assert_error(h.post("/v1/completions", json={"model": "alpha", "prompt": long, "stream": True}), 413)
        # under the gateway's limit, over the model's context (the tiny Llama's is 128 tokens)
        over = {**CHAT, "messages": [{"role": "user", "content": "x" * 500}], "max_tokens": 1}
        err = assert_error(h.post("/v1/chat/completions", json=over), 400, code="context_length_exceeded")
        assert "context is 128 tokens" in err["message"] and err["param"] == "messages"
        err = assert_error(
            h.post("/v1/completions", json={"model": "alpha", "prompt": "x" * 120, "max_tokens": 20}),
            400,
            code="context_length_exceeded",
        )
        assert err["param"] == "prompt"
        ok = {**CHAT, "messages": [{"role": "user", "content": "x" * 120}], "max_tokens": 1}
        assert h.post("/v1/chat/completions", json=ok).status_code == 200


def test_engine_failure_is_503(world: World) -> None:
    with http(world, world.admin) as h:
        err = assert_error(
            h.post("/v1/chat/completions", json={**CHAT, "model": "moe/broken"}), 503, code="engine_unavailable"
        )
        assert "on fire" in err["message"]
        assert_error(h.post("/v1/completions", json={"model": "moe/broken", "prompt": "x", "stream": True}), 503)
    with pytest.raises(openai.InternalServerError):
        client(world).chat.completions.create(model="moe/broken", messages=CHAT["messages"])


def test_pending_expert_is_503(world: World) -> None:
    world.registry.register_expert("delta", "adapter", world.spare_lora, base="tiny", status="pending")
    try:
        with http(world, world.admin) as h:
            assert "delta" not in {m["id"] for m in h.get("/v1/models").json()["data"]}
            err = assert_error(h.post("/v1/completions", json={"model": "delta", "prompt": "x"}), 503)
            assert "pending" in err["message"]
    finally:
        world.registry.remove_expert("delta")


def test_timeout_is_504(world: World) -> None:
    with http(world, url=world.open_url) as h:
        started = time.monotonic()
        r = h.post("/v1/completions", json={"model": "moe/slow", "prompt": "x"})
        assert time.monotonic() - started < 1.8  # answered at the deadline, not when the work ends
        assert_error(r, 504, "timeout_error", "request_timeout")
        assert_error(h.post("/v1/completions", json={"model": "moe/slow", "prompt": "x", "stream": True}), 504)


def test_no_keys_mode(world: World, caplog: pytest.LogCaptureFixture) -> None:
    with http(world, url=world.open_url) as h:
        assert h.get("/v1/models").status_code == 200
        assert h.post("/v1/chat/completions", json={**CHAT, "model": "moe/first"}).status_code == 200
        # any header is ignored, as vLLM does without --api-key (clients send "EMPTY")
        assert h.get("/v1/models", headers={"Authorization": "Bearer EMPTY"}).status_code == 200
    with caplog.at_level(logging.WARNING, logger="moerge.gateway"):
        app = create_app(LocalBackend(world.registry), world.registry, GatewaySettings(require_keys=False))
        assert not any("not required" in r.getMessage() for r in caplog.records)
        with serve(app):  # the warning comes at start-up
            pass
    assert any("not required" in r.getMessage() for r in caplog.records)


def test_stream_error_after_start_is_an_event(tmp_path: Path) -> None:
    """A failure after the status line went out reaches the client as an error event."""

    class HalfBackend:
        def models(self) -> list:
            return []

        async def complete(self, model, prompt, params):  # noqa: ANN001, ANN201
            raise AssertionError("not used")

        async def stream(self, model, prompt, params):  # noqa: ANN001, ANN201
            yield "partial "
            raise EngineError("the expert crashed mid-answer")

        async def register_expert(self, spec: dict) -> dict:
            raise AssertionError

        async def remove_expert(self, name, version=None):  # noqa: ANN001, ANN201
            raise AssertionError

    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}", artifact_root=tmp_path / "store")
    app = create_app(HalfBackend(), registry, GatewaySettings(require_keys=False))
    with serve(app) as url:
        with httpx.Client(base_url=url) as h:
            r = h.post("/v1/chat/completions", json={**CHAT, "model": "any", "stream": True})
            assert r.status_code == 200
            events = sse_events(r)
        assert events[-1] == "[DONE]"
        assert events[1]["choices"][0]["delta"]["content"] == "partial "
        assert events[-2]["error"]["code"] == "engine_unavailable"
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0)
        with pytest.raises(openai.APIError, match="crashed"):
            list(c.chat.completions.create(model="any", messages=CHAT["messages"], stream=True))
    registry.close()


def test_metrics(world: World) -> None:
    with http(world, world.admin) as h:
        assert h.post("/v1/chat/completions", json=CHAT).status_code == 200
        h.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
        h.post("/v1/completions", json={"model": "moe/first", "prompt": "x", "max_tokens": 2})
        r = h.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    from prometheus_client.parser import text_string_to_metric_families

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    chat = "/v1/chat/completions"
    assert value("moerge_gateway_requests_total", endpoint=chat, model="alpha", status="200") >= 1
    assert value("moerge_gateway_requests_total", endpoint=chat, model="", status="404") >= 1
    assert value("moerge_gateway_request_seconds_count", endpoint=chat, model="alpha") >= 1
    assert value("moerge_expert_selections_total", model="moe/first", expert="alpha") >= 1
    assert value("moerge_router_decision_seconds_count", strategy="moe/first") >= 1
    assert value("moerge_tokens_total", model="alpha", kind="completion") >= 1
    assert value("moerge_gateway_errors_total", endpoint=chat, type="invalid_request_error") >= 1
    assert ("moerge_gateway_requests_in_flight", ()) in samples
    # the app's own registry: nothing from prometheus-client's global one (process_*, python_gc_*)
    assert "python_gc_objects_collected_total" not in text


def test_backend_run_expert_unknown(world: World) -> None:
    with pytest.raises(NotFoundError):
        world.backend.run_expert("nobody", "x", SamplingParams())


def test_concurrent_requests_share_the_engines_next_call(world: World) -> None:
    """In-process, requests that wait for one base's engine run together in its next generate
    call (adapters mixed, each with its own tokens), and each gets exactly its own answer; a
    request that breaks its batch fails alone."""
    from services.engines.hf import HFEngine

    calls: list[int] = []

    class Recording(HFEngine):
        def generate(self, requests, emits=None):  # noqa: ANN001, ANN201
            calls.append(len(requests))
            if any(r.max_new_tokens == 13 for r in requests) and len(requests) > 1:
                raise RuntimeError("a request that breaks the batch")  # the batch fails; each reruns alone
            if len(calls) == 1:
                time.sleep(0.5)  # the first call holds the engine while the others queue
            return super().generate(requests, emits)

    backend = LocalBackend(world.registry, engine_factory=Recording)
    asks = [("alpha" if i % 2 else "beta", f"question {i}", SamplingParams(max_tokens=4 + i % 3)) for i in range(8)]
    alone = [LocalBackend(world.registry).run_expert(*a).text for a in asks]
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(backend.run_expert, *asks[0])
        time.sleep(0.2)  # the engine is loaded and busy with the first
        rest = [pool.submit(backend.run_expert, *a) for a in asks[1:]]
        texts = [first.result().text] + [f.result().text for f in rest]
    assert texts == alone
    assert calls[:2] == [1, 7], calls  # the seven that waited went in one call

    calls.clear()
    with ThreadPoolExecutor(3) as pool:
        jobs = [
            pool.submit(backend.run_expert, "alpha", f"q{i}", SamplingParams(max_tokens=13 if i == 0 else 5))
            for i in range(3)
        ]
        outcomes = [j.exception() or j.result().text for j in jobs]
    assert all(isinstance(o, str) for o in outcomes[1:]), outcomes
