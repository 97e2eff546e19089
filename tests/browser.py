"""Headless Chromium for page tests: Debian's ``chromium`` + ``chromium-driver``, driven by Selenium.

The session fixture installs both with apt-get when they are missing (CI machines are fresh and we
are root there); an install that fails fails the tests, it never skips them. Selenium gets the
driver and browser paths explicitly, so it never tries to download anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGES = ("chromium", "chromium-driver")


def _binaries() -> tuple[str | None, str | None]:
    return shutil.which("chromium"), shutil.which("chromedriver")


def ensure_chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installing the Debian packages first if needed."""
    browser, driver = _binaries()
    if browser and driver:
        return browser, driver
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.fail(
            f"headless Chromium is missing: run `apt-get update && apt-get install -y {' '.join(PACKAGES)}` as root"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            pytest.fail(f"`{' '.join(cmd)}` failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    browser, driver = _binaries()
    if not (browser and driver):
        pytest.fail(f"installed {' '.join(PACKAGES)} but chromium/chromedriver are not on PATH")
    return browser, driver


@pytest.fixture(scope="session")
def chromium() -> Iterator:
    """One headless Chromium (a Selenium WebDriver) for the whole test session."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = ensure_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def full_page_screenshot(driver, path: Path) -> Path:
    """Save a PNG of the whole page, below the fold included (Chrome DevTools captureBeyondViewport)."""
    import base64

    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    path.write_bytes(base64.b64decode(shot["data"]))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return path
