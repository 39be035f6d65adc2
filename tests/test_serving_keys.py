"""API keys on Ray with two gateway replicas: a key's requests-per-minute limit holds across the
replicas HAProxy spreads its requests over (services/serving/rate_limits.py), not per replica."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.ray_cluster import Cluster, ray_cluster

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def keyed_cluster(micro_zoo, tmp_path_factory) -> Iterator[Cluster]:
    config = {"gateway": {"replicas": 2, "require_keys": True}, "strategies": {"names": ["moe/random"]}}
    with ray_cluster(micro_zoo, tmp_path_factory.mktemp("serve-keys-home"), config) as c:
        yield c


def test_a_keys_limit_holds_across_gateway_replicas(keyed_cluster: Cluster) -> None:
    _, key = keyed_cluster.registry.create_key("limited", rpm=6)
    codes = []
    for _ in range(16):
        # a new connection each time: HAProxy picks a replica per connection and per request
        with httpx.Client(base_url=keyed_cluster.url, timeout=60) as h:
            r = h.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        codes.append(r.status_code)
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
            assert int(r.headers["retry-after"]) >= 1
    assert codes.count(200) == 6 and codes.count(429) == 10, codes
    assert codes[:6] == [200] * 6

    # another key has its own window; no key at all is refused before any counting
    _, other = keyed_cluster.registry.create_key("other", rpm=6)
    with httpx.Client(base_url=keyed_cluster.url, timeout=60) as h:
        assert h.get("/v1/models", headers={"Authorization": f"Bearer {other}"}).status_code == 200
        assert h.get("/v1/models").status_code == 401
