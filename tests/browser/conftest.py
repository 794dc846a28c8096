"""Headless Chromium (Debian's ``chromium`` package) driven by Playwright for Python.

Playwright never downloads a browser here: it launches ``/usr/bin/chromium``
(``.ci/run`` installs it when missing).  Each test gets a fresh page whose
console errors and uncaught exceptions are collected, and saves screenshots
under its own ``tmp_path``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("RINGWAY_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    """One Chromium for the browser tests, closed after them: Playwright's sync API keeps
    an event loop running in this thread while it is open, which would change what the
    rest of the suite sees (``asyncio.run`` refuses to start, ``auto`` stops forking)."""
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.fail(
            f"no Chromium at {CHROMIUM}: install Debian's package "
            "(apt-get install -y chromium), as .ci/run does"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            yield b
        finally:
            b.close()


class Page:
    """A page plus what it said on its console, and a screenshot helper."""

    def __init__(self, page: Any, shots: Path) -> None:
        self.page = page
        self.shots = shots
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def screenshot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def metric(self, name: str) -> int:
        """A headline number (``data-metric``) as an int; -1 while it shows none."""
        text = self.page.locator(f'[data-metric="{name}"]').inner_text().replace(",", "")
        return int(text) if text.strip().lstrip("-").isdigit() else -1


@pytest.fixture
def page(browser: Any, tmp_path: Path) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 1100})
    try:
        yield Page(context.new_page(), tmp_path)
    finally:
        context.close()
