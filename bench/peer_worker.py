"""A peer that runs in the peers' own venv, spoken to over a pipe (``bench/peers/*_worker.py``)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Worker:
    """A peer in its own venv: one JSON line per request, one per reply."""

    def __init__(self, python: Path, script: str) -> None:
        self.proc = subprocess.Popen(
            [str(python), str(ROOT / "bench" / "peers" / script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"peer worker exited (rc {self.proc.wait()}); its stderr is above")
        return json.loads(line)

    def ask(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        reply = self._read()
        if "error" in reply:
            raise SystemExit(f"peer worker: {reply['error']}")
        return reply

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
