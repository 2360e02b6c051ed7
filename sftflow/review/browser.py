"""Headless Chromium for the Prefect and MLflow UIs (single-page apps: they render only after their
JavaScript ran, so every call gives the page a virtual-time budget before reading the DOM or the pixels)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage",
         "--no-first-run", "--hide-scrollbars", "--disable-extensions", "--mute-audio"]


class BrowserError(RuntimeError):
    pass


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    raise BrowserError("no Chromium found: install Debian's `chromium` (`.ci/install` does, as root)")


def _run(args: list[str], budget_ms: int) -> str:
    with tempfile.TemporaryDirectory(prefix="sftflow-chromium-") as profile:
        proc = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}",
                               f"--virtual-time-budget={budget_ms}", *args],
                              capture_output=True, text=True, timeout=budget_ms / 1000 + 120)
    if proc.returncode != 0:
        raise BrowserError(f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


def dump_dom(url: str, budget_ms: int = 15000) -> str:
    """The DOM after the page's scripts ran (what a user would see, as HTML)."""
    return _run(["--dump-dom", url], budget_ms)


def screenshot(url: str, path: Path, size: tuple[int, int] = (1600, 1000), budget_ms: int = 15000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _run([f"--screenshot={path.resolve()}", f"--window-size={size[0]},{size[1]}", url], budget_ms)
    if not path.exists() or path.stat().st_size == 0:
        raise BrowserError(f"chromium wrote no screenshot of {url}")
    return path
