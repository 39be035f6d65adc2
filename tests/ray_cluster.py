"""A real Ray Serve cluster for tests: the micro zoo registered in a fresh home, ``moerge serve``'s
application deployed with a given config behind HAProxy, and helpers to talk to it."""

from __future__ import annotations

import os
import random
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import openai

from composer.engine_protocol import GenerateRequest
from registry.service import Registry
from services.zoo.build import read_examples
from services.zoo.register import register_zoo, zoo_base_name


@dataclass
class Cluster:
    url: str
    registry: Registry
    manifest: object
    base: str
    spare: Path  # an adapter folder not registered yet


def free_port() -> int:
    """A port free now for a server that binds it a little later (HAProxy, ``moerge serve``).

    Drawn below Linux's ephemeral range (32768-60999 by default) and above Ray's worker ports
    (10002-19999): a port from the ephemeral range can be taken, between this check and the
    server's bind, by the local end of any outgoing connection, and Ray opens many while it
    starts (a CI run failed on exactly that: "cannot bind socket (Address already in use)")."""
    draw = random.Random()
    for _ in range(100):
        port = draw.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # the whole range busy: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ray_cluster(micro_zoo, home: Path, config: dict) -> Iterator[Cluster]:  # noqa: ANN001
    """Local Ray started as `moerge serve` starts it (HAProxy on a free port, straight to the
    gateway replicas) with the serve ``config``; shut down and the environment restored after."""
    import ray
    from ray import serve

    from services.serving.app import APP_NAME, build_app
    from services.serving.ingress import ingress_env, start_local_ray

    db = f"sqlite:///{home / 'moerge.db'}"
    env = {
        "MOERGE_HOME": str(home),
        "MOERGE_DATABASE_URL": db,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    saved = {k: os.environ.get(k) for k in env}
    saved.update({k: os.environ.get(k) for k in ingress_env("haproxy")})
    os.environ.update(env)
    registry = Registry(db, artifact_root=home / "artifacts")
    # everything from here on is undone however it ends, a failed start included: a cluster left
    # running, or this environment left set, would fail the tests that come after
    try:
        register_zoo(micro_zoo, registry)
        spare = home / "spare-adapter"
        first = next(e for e in micro_zoo.experts if e.kind == "adapter")
        shutil.copytree(micro_zoo.path_of(first.path), spare)

        # logical CPUs: the deployments ask for fractions; the 2 real cores are shared by all of them
        port = free_port()
        start_local_ray("haproxy", env, "127.0.0.1", port, num_cpus=8)
        serve.run(build_app({"config": config}), name=APP_NAME, route_prefix="/")
        yield Cluster(f"http://127.0.0.1:{port}", registry, micro_zoo, zoo_base_name(micro_zoo), spare)
    finally:
        if ray.is_initialized():
            serve.shutdown()
        ray.shutdown()
        registry.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def client(c: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=c.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def zoo_prompt(c: Cluster, expert: str, split: str = "validation", i: int = 0) -> tuple[str, str]:
    entry = next(e for e in c.manifest.experts if e.name == expert)
    rel = entry.validation_examples if split == "validation" else entry.train_examples
    ex = read_examples(c.manifest.path_of(rel))[i]
    return ex.prompt, ex.reference


def local_greedy(c: Cluster, expert: str, prompt: str, max_new: int) -> str:
    from services.engines.hf import HFEngine

    engine = HFEngine(c.manifest.path_of(c.manifest.base.path), base_name="base")
    entry = next(e for e in c.manifest.experts if e.name == expert)
    engine.load_adapter(expert, c.manifest.path_of(entry.path))
    return engine.generate([GenerateRequest(prompt, expert, max_new)])[0].text


def adapters(c: Cluster) -> list[str]:
    return [e.name for e in c.manifest.experts if e.kind == "adapter"]
