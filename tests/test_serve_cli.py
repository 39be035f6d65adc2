"""The ``moerge serve`` command itself, as a user starts it: a subprocess on a registered micro zoo,
answered through its default ingress (HAProxy) by the official openai client, stopped by SIGTERM
(what docker, Kubernetes and systemd send) without leaving the service behind."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from registry.service import Registry
from services.zoo.register import register_zoo
from tests.ray_cluster import free_port

pytestmark = pytest.mark.timeout(600)


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in log.read_text():
            return
        if proc.poll() is not None:
            pytest.fail(f"moerge serve exited with {proc.returncode} before {text!r}:\n{log.read_text()}")
        time.sleep(0.5)
    pytest.fail(f"no {text!r} after {timeout_s} s:\n{log.read_text()}")


def test_moerge_serve_answers_through_haproxy_and_stops_on_sigterm(micro_zoo, tmp_path):
    home = tmp_path / "home"
    db = f"sqlite:///{home / 'moerge.db'}"
    registry = Registry(db, artifact_root=home / "artifacts")
    register_zoo(micro_zoo, registry)
    expert = next(e.name for e in micro_zoo.experts if e.kind == "adapter")
    registry.close()
    config = tmp_path / "serve.yaml"
    config.write_text("strategies: {names: [moe/semantic]}\n")
    port = free_port()
    env = {
        **os.environ,
        "MOERGE_HOME": str(home),
        "MOERGE_DATABASE_URL": db,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    moerge = shutil.which("moerge", path=os.path.dirname(sys.executable)) or "moerge"
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [moerge, "serve", "--port", str(port), "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        _wait_for(log, "serving on", proc, 300)
        assert "ingress: haproxy" in log.read_text()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        assert {expert, "moe/semantic"} <= {m.id for m in client.models.list().data}
        reply = client.completions.create(model=expert, prompt="abc", max_tokens=4, temperature=0)
        assert reply.model == expert and reply.usage.completion_tokens > 0

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Serve, HAProxy and the local Ray went with it: nothing listens on the port any more
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))
