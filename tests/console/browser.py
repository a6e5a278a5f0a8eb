"""Headless Chromium for the console tests: Playwright's Python package driving the system's Chromium
(Debian's `chromium`; nothing is downloaded). Without a browser the tests skip locally and FAIL in CI
(CI=true or SCALEOT_REQUIRE_BROWSER=1), so a CI machine that lost its browser cannot pass unnoticed."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
REQUIRED = os.environ.get("CI", "").lower() in ("1", "true") or os.environ.get("SCALEOT_REQUIRE_BROWSER") == "1"


def _missing(what: str) -> None:
    message = (
        f"{what}; install it with `apt-get install -y chromium` and `pip install -e '.[test]'` "
        "(or set SCALEOT_CHROMIUM to a Chromium binary)"
    )
    if REQUIRED:
        pytest.fail(f"browser tests are required here (CI): {message}")
    pytest.skip(message)


def chromium_path() -> str:
    explicit = os.environ.get("SCALEOT_CHROMIUM", "").strip()
    if explicit:
        if not Path(explicit).is_file():
            _missing(f"SCALEOT_CHROMIUM={explicit} does not exist")
        return explicit
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    _missing("no Chromium found on PATH")
    raise AssertionError("unreachable")


def launch_chromium() -> Iterator[object]:
    """Yield a launched headless Chromium (playwright.sync_api.Browser)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright Python package is not installed")
    path = chromium_path()
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = p.chromium.launch(
            executable_path=path, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]
        )
        try:
            yield browser
        finally:
            browser.close()


def screenshot_dir(tmp: Path) -> Path:
    """Where screenshots go: SCALEOT_CONSOLE_SCREENSHOTS (e.g. docs/console to refresh the docs), else tmp."""
    out = Path(os.environ.get("SCALEOT_CONSOLE_SCREENSHOTS") or tmp / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out
