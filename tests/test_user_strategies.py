"""Strategies as data: definitions checked against what each method declares, stored in the
registry, read from a YAML file, and served hot through the gateway to the openai client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import openai  # noqa: E402  (the [test] extra installs it: a missing client must fail, not skip)
import pytest

from registry.errors import DefinitionError
from registry.service import Registry
from services.moe.definitions import load_file, parse_definition
from services.moe.evaluate import load_suite
from services.zoo.register import register_zoo
from tests.servers import serve

# ---------------------------------------------------------------------------------- definitions


@pytest.mark.parametrize(
    "definition, fragment",
    [
        ({"name": "x", "router": "semantik", "composer": "single"}, "routers: classifier, semantic"),
        ({"name": "x", "router": "semantic", "composer": "singel"}, "composers: single, vote"),
        ({"name": "x", "router": "phatgoose", "composer": "single"}, "use mixture"),
        ({"name": "x", "router": "semantic", "composer": "mixture"}, "decides per query"),
        (
            {"name": "x", "router": "semantic", "composer": "single", "router_params": {"kk": 1}},
            "its parameters: k, top_m, keep",
        ),
        ({"name": "x", "router": "semantic", "composer": "single", "router_params": {"k": "two"}}, "takes int"),
        ({"name": "x", "router": "semantic", "composer": "single", "router_params": {"keep": 2.0}}, "must be ≤ 1"),
        (
            {"name": "x", "router": "all", "composer": "merge", "composer_params": {"method": "soup"}},
            "one of task_arithmetic, ties",
        ),
        ({"name": "x", "router": "semantic", "composer": "single", "experts": ["colour:red"]}, "filters are domain:"),
        ({"name": "classifier", "router": "semantic", "composer": "single"}, "built-in"),
        ({"name": "a/b", "router": "semantic", "composer": "single"}, "invalid strategy name"),
        ({"name": "x", "router": "semantic", "composer": "single", "colour": "red"}, "unknown field(s) colour"),
    ],
)
def test_a_bad_definition_is_refused_with_the_valid_choices(definition, fragment):
    with pytest.raises(DefinitionError, match=None) as exc:
        parse_definition(definition)
    assert fragment in str(exc.value)


def test_parameters_are_typed_by_their_declaration():
    s = parse_definition(
        {
            "name": "legal",
            "router": "semantic",
            "composer": "vote",
            "router_params": {"k": "3", "keep": "0.9"},
            "composer_params": {"k": 3},
            "experts": "a, domain:legal",
            "fallback": "a",
        }
    )
    assert s.name == "moe/legal" and s.router_params == {"k": 3, "keep": 0.9}
    assert s.experts == ("a", "domain:legal") and s.fallback == "a" and s.source == "registry"


def test_a_strategies_file_is_a_list_of_definitions(tmp_path):
    path = tmp_path / "strategies.yaml"
    path.write_text(
        "- name: two\n  router: semantic\n  composer: single\n  experts: [a, b]\n"
        "- name: three\n  router: skill\n  composer: vote\n  composer_params: {k: 2}\n"
    )
    assert [s.name for s in load_file(path)] == ["moe/two", "moe/three"]
    path.write_text(
        "- name: two\n  router: semantic\n  composer: single\n- name: two\n  router: semantic\n  composer: single\n"
    )
    with pytest.raises(DefinitionError, match="defined twice"):
        load_file(path)
    path.write_text("- name: x\n  router: semantic\n  composer: single\n  router_params: {k: 0}\n")
    with pytest.raises(DefinitionError, match="entry 1: .*must be ≥ 1"):
        load_file(path)


# ---------------------------------------------------------------------------------- on the zoo


@pytest.fixture(scope="module")
def zoo_home(micro_zoo, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    strategies = home / "strategies.yaml"
    strategies.write_text(
        "- name: text-semantic\n  router: semantic\n  composer: single\n"
        "  experts: [domain:text]\n  description: the text experts, by their examples\n"
    )
    old = {k: os.environ.get(k) for k in ("MOERGE_HOME", "MOERGE_STRATEGIES")}
    os.environ["MOERGE_HOME"] = str(home)
    os.environ["MOERGE_STRATEGIES"] = str(strategies)
    with Registry() as reg:
        register_zoo(micro_zoo, reg)
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _zoo_prompt(task: str) -> str:
    return next(e.prompt for e in load_suite("skills", "test", 2) if e.task == task)


def _expert_set(micro_zoo, domain: str) -> set[str]:
    return {e.name for e in micro_zoo.experts if domain in e.domains}


def test_an_expert_set_limits_what_the_router_chooses(zoo_home, micro_zoo):
    from services.moe.catalog import StrategyCatalog
    from services.moe.pool import ExpertPool
    from services.moe.strategies import MoE

    text = _expert_set(micro_zoo, "text")
    moe = MoE(ExpertPool(Registry()), catalog=StrategyCatalog(Registry()))
    everyone = moe.route("moe/semantic", _zoo_prompt("count"))
    assert everyone.decision.top not in text  # a math prompt goes to a math expert …
    routed = moe.route("moe/text-semantic", _zoo_prompt("count"))
    assert routed.decision.top in text  # … unless the strategy's experts are the text ones
    assert set(moe.router_for(moe.strategy("moe/text-semantic")).names) == text


def test_a_fitting_parameter_keeps_its_artifacts_apart(zoo_home):
    from services.moe.pool import ExpertPool
    from services.moe.strategies import MoE

    reg = Registry()
    catalog_strategy = parse_definition(
        {"name": "short-retrieval", "router": "retrieval", "composer": "single", "router_params": {"max_examples": 3}}
    )
    moe = MoE(ExpertPool(reg))
    before = {a.id for a in reg.get_artifacts(router="retrieval")}
    moe.route("moe/retrieval", _zoo_prompt("reverse"))
    moe.route(catalog_strategy, _zoo_prompt("reverse"))
    default = reg.get_artifacts(router="retrieval")
    short = reg.get_artifacts(router="retrieval.max_examples-3")
    assert {a.id for a in default} >= before and len(short) == len(moe.pool.experts)
    # the defaults' artifacts still hold every training prompt's embedding, the short ones three
    from services.moe.pool import ARTIFACT_FILE, read_artifact

    sizes = {len(next(iter(read_artifact(reg.artifact_path(a) / ARTIFACT_FILE).tensors.values()))) for a in short}
    assert sizes == {3}


def test_the_cli_adds_shows_and_removes_a_strategy(zoo_home, micro_zoo):
    def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(
            [sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, env={**os.environ}
        )
        assert (out.returncode == 0) == ok, out.stderr
        return out

    refused = cli(
        "strategies",
        "add",
        "broken",
        "--router",
        "semantic",
        "--composer",
        "single",
        "--router-param",
        "k=zero",
        ok=False,
    )
    assert "parameter 'k' takes int" in refused.stderr
    refused = cli(
        "strategies",
        "add",
        "broken",
        "--router",
        "semantic",
        "--composer",
        "single",
        "--experts",
        "domain:poetry",
        ok=False,
    )
    assert "no ready expert matches domain:poetry" in refused.stderr
    refused = cli(
        "strategies", "add", "broken", "--router", "arrow", "--composer", "mixture", "--experts", "kind:model", ok=False
    )
    assert "takes adapter experts, not domain-math (model)" in refused.stderr
    assert not Registry().list_strategies()  # nothing stored

    math = sorted(_expert_set(micro_zoo, "math"))
    cli(
        "strategies",
        "add",
        "math-vote",
        "--router",
        "skill",
        "--composer",
        "vote",
        "--router-param",
        "k=2",
        "--composer-param",
        "k=2",
        "--experts",
        "domain:math",
        "--description",
        "math experts vote",
    )
    shown = json.loads(cli("strategies", "show", "math-vote", "--json").stdout)
    assert shown["router_params"] == {"k": 2} and sorted(shown["chooses_among"]) == math
    assert {"name": "k", "type": "int", "default": 3, "value": 2}.items() <= shown["router_parameters"][0].items()
    listed = {s["name"]: s["source"] for s in json.loads(cli("strategies", "list", "--json").stdout)}
    assert listed["moe/math-vote"] == "registry" and listed["moe/text-semantic"].startswith("file:")
    assert "accuracy=" in cli("eval", "-s", "moe/math-vote", "--split", "test", "--n-per-task", "1").stdout
    refused = cli("strategies", "remove", "text-semantic", ok=False)
    assert "edit that file" in refused.stderr
    cli("strategies", "remove", "math-vote")
    assert not Registry().list_strategies()


def test_strategies_defined_in_a_file_and_over_the_api_answer_through_openai(zoo_home, micro_zoo):
    """`moerge serve --no-ray`'s wiring: a strategy added over the API is listed and answers
    within seconds, without a restart; a bad one is refused and nothing is stored."""
    import httpx

    from services.gateway import GatewaySettings, LocalBackend, create_app
    from services.gateway.backend import PoolEngine
    from services.moe.catalog import StrategyCatalog
    from services.serving.strategy_host import StrategyHost, backend_strategies

    registry = Registry()
    backend = LocalBackend(registry)
    catalog = StrategyCatalog(registry, refresh_interval_s=0.2)
    host = StrategyHost(
        registry, engine_factory=lambda pool: PoolEngine(pool, backend), refresh_interval_s=0.2, catalog=catalog
    )
    backend.add_strategies(backend_strategies(host))
    text, reverse = _expert_set(micro_zoo, "text"), _zoo_prompt("reverse")
    with serve(create_app(backend, registry, GatewaySettings(require_keys=False), catalog=catalog)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        models = {m.id for m in client.models.list().data}
        assert "moe/text-semantic" in models and "moe/oracle" not in models
        out = client.completions.create(model="moe/text-semantic", prompt=_zoo_prompt("count"), max_tokens=8)
        assert out.model_extra["moe"]["experts"][0]["name"] in text

        bad = httpx.post(
            f"{url}/v1/strategies",
            json={"name": "x", "router": "semantic", "composer": "single", "experts": ["no-such-expert"]},
        )
        assert bad.status_code == 400 and "no ready expert named no-such-expert" in bad.json()["error"]["message"]
        assert not registry.list_strategies()

        posted = httpx.post(
            f"{url}/v1/strategies",
            json={
                "name": "reverse-or-base",
                "router": "base",
                "composer": "single",
                "fallback": "skill-reverse",
                "description": "the base router chooses no expert: the fallback answers",
            },
        )
        assert posted.status_code == 201, posted.text
        assert posted.json()["source"] == "registry"
        deadline = time.monotonic() + 10
        while "moe/reverse-or-base" not in {m.id for m in client.models.list().data}:
            assert time.monotonic() < deadline, "the posted strategy was not listed within 10 s"
            time.sleep(0.2)
        chat = client.chat.completions.create(
            model="moe/reverse-or-base", max_tokens=12, messages=[{"role": "user", "content": reverse}]
        )
        direct = client.chat.completions.create(
            model="skill-reverse", max_tokens=12, messages=[{"role": "user", "content": reverse}]
        )
        assert chat.choices[0].message.content == direct.choices[0].message.content
        assert [e["name"] for e in chat.model_extra["moe"]["experts"]] == ["skill-reverse"]

        assert httpx.delete(f"{url}/v1/strategies/text-semantic").status_code == 400  # the file's
        assert httpx.delete(f"{url}/v1/strategies/reverse-or-base").status_code == 200
        time.sleep(0.5)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="moe/reverse-or-base", prompt=reverse, max_tokens=4)


def test_a_plugin_router_and_composer_serve_as_strategies(zoo_home, tmp_path):
    """The keyword router and the longest-answer composer in tests/plugins, installed as a
    package: moerge finds them by their ``moerge.routers`` and ``moerge.composers`` entry points,
    checks their declared parameters, and answers with them."""
    from pathlib import Path

    target = tmp_path / "site"
    package = Path(__file__).parent / "plugins" / "keyword-router"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--target",
            str(target),
            str(package),
        ],
        check=True,
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}

    def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, env=env)
        assert (out.returncode == 0) == ok, out.stderr
        return out

    methods = json.loads(cli("strategies", "methods", "--json").stdout)
    keyword = next(r for r in methods["routers"] if r["name"] == "keyword")
    assert keyword["level"] == "query" and keyword["parameters"][0]["name"] == "case_sensitive"
    assert (
        "takes bool"
        in cli(
            "strategies",
            "add",
            "kw",
            "--router",
            "keyword",
            "--composer",
            "single",
            "--router-param",
            "case_sensitive=maybe",
            ok=False,
        ).stderr
    )
    longest = next(c for c in methods["composers"] if c["name"] == "longest")
    assert longest["level"] == "query" and longest["parameters"][0]["name"] == "k"
    refused = cli(
        "strategies", "add", "kwl", "--router", "keyword", "--composer", "longest", "--composer-param", "k=0", ok=False
    )
    assert "k" in refused.stderr and "≥ 1" in refused.stderr
    cli("strategies", "add", "kw", "--router", "keyword", "--composer", "single")
    cli("strategies", "add", "kwl", "--router", "keyword", "--composer", "longest", "--composer-param", "k=2")
    try:
        routed = cli("route", "-s", "moe/kw", _zoo_prompt("reverse"), "--answer", "-n", "12").stdout
        assert "skill-reverse" in routed and "answer:" in routed
        longest_routed = cli("route", "-s", "moe/kwl", _zoo_prompt("reverse"), "--answer", "-n", "12").stdout
        assert "skill-reverse" in longest_routed and "answer:" in longest_routed
        assert "accuracy=" in cli("eval", "-s", "moe/kw", "--split", "test", "--n-per-task", "1").stdout
        # without the plugin, the stored strategy is left out; every other strategy still runs
        names = json.loads(
            subprocess.run(
                [sys.executable, "-m", "services.cli", "strategies", "list", "--json"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        assert "moe/kw" not in {s["name"] for s in names} and "moe/semantic" in {s["name"] for s in names}
        assert "moe/kwl" not in {s["name"] for s in names}
    finally:
        cli("strategies", "remove", "kw")
        cli("strategies", "remove", "kwl")
