"""Headless Chromium from Debian's packages, driven by Selenium through Debian's chromedriver (no download).

The flags keep it off the network (see FACTS.md, "Headless Chromium for page tests"); the console log is
kept so a test can check the page logged no errors.
"""

from __future__ import annotations

import pathlib
import shutil

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
PAGE_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def browser(tmp_path_factory, monkeypatch_module):
    """A headless Chromium for the module's tests; quit when they are done."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    assert not missing, f"{missing} missing: install Debian's chromium and chromium-driver (scripts/test.sh does)"
    monkeypatch_module.setenv("SE_OFFLINE", "true")  # never let Selenium Manager look for a driver online
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def console_errors(driver) -> list[str]:
    """The page's console errors since the last call (Chromium hands each entry out once)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def screenshot(driver, path: pathlib.Path, width: int, height: int) -> pathlib.Path:
    """Save the page at `width` x `height` CSS pixels (the whole page's height when it is taller)."""
    driver.set_window_size(width, height)
    full = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, max(height, full))
    driver.save_screenshot(str(path))
    return path
