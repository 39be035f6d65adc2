"""How HTTP reaches the gateway: the config's choice and the switches it hands Ray.

The serving tests (tests/test_serving.py) run the whole service behind the default ingress,
HAProxy; the Helm chart's test checks that its pods carry the same switches."""

from __future__ import annotations

import pytest

from registry.errors import MoergeError
from services.serving.config import load_config
from services.serving.ingress import INGRESS_ENV, ingress_env


def test_haproxy_is_the_default_ingress_and_a_typo_is_refused():
    assert load_config(None).ingress == "haproxy"
    assert load_config({"ingress": "proxy"}).ingress == "proxy"
    with pytest.raises(MoergeError, match="ingress"):
        load_config({"ingress": "nginx"})


def test_haproxy_switches_turn_on_haproxy_and_grpc_and_proxy_adds_none(monkeypatch):
    for name in INGRESS_ENV["haproxy"]:
        monkeypatch.delenv(name, raising=False)
    env = ingress_env("haproxy")
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "1"
    # the wholesale switch would also move every handle's router onto the replica's loop, which
    # the strategies replica's blocking calls from worker threads cannot use
    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED" not in env
    assert ingress_env("proxy") == {}


def test_an_operators_own_setting_wins(monkeypatch):
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "30")
    assert ingress_env("haproxy")["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "30"
