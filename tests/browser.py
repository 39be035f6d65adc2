"""A page as a browser lays it out: Debian's chromium, headless, and what the leaderboard's
rendered DOM holds (rows, plots, their marks, and what its script counted as drawn)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from html.parser import HTMLParser

import pytest


def chromium(*args: str) -> subprocess.CompletedProcess:
    """Debian's chromium, headless; a missing browser is a failure (CI installs it: .ci/run)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail(
            "chromium is not installed (Debian: apt-get install -y chromium); .ci/run installs it", pytrace=False
        )
    with tempfile.TemporaryDirectory() as profile:
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
        ]
        out = subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


class PageParts(HTMLParser):
    """What the rendered page holds: table rows, plots and their marks."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[str] = []
        self.plots: list[str] = []
        self.bars = self.points = self.frontiers = self.heatmaps = 0
        self.ready = None
        self.drawn: dict[str, int] = {}
        self._tbody = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        if tag == "body":
            self.ready = a.get("data-ready")
            self.drawn = {k: int(a[f"data-{k}-drawn"]) for k in ("plots", "bars", "points") if f"data-{k}-drawn" in a}
        elif tag == "tbody":
            self._tbody = True
        elif tag == "tr" and self._tbody:
            self.rows.append(a.get("data-entry"))
        elif tag == "svg" and "plot" in classes:
            self.plots.append(a.get("id") or "heatmap")
            self.heatmaps += "heatmap" in classes
        elif tag == "rect" and "bar" in classes:
            self.bars += 1
        elif tag == "circle" and "point" in classes:
            self.points += 1
        elif tag == "polyline" and "frontier" in classes:
            self.frontiers += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "tbody":
            self._tbody = False
