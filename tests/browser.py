"""Headless Chromium (Debian's `chromium` and `chromium-driver`) driven with Selenium."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import TypeVar

from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

T = TypeVar("T")
# The machine's network is closed: without these Chromium keeps trying to reach its services.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,900",
)


def unavailable_reason() -> str | None:
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (scripts/test_prereqs.sh installs them)"
    return None


@contextlib.contextmanager
def chromium() -> Iterator[webdriver.Chrome]:
    """A fresh browser (its own profile, so nothing carries over between tests)."""
    with tempfile.TemporaryDirectory(prefix="ringserve-chromium-") as profile:
        options = webdriver.ChromeOptions()
        # Both paths given: Selenium then never looks for (or downloads) a browser or driver.
        options.binary_location = str(shutil.which("chromium"))
        for flag in (*FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
        try:
            yield driver
        finally:
            driver.quit()


def wait_for(driver: WebDriver, condition: Callable[[], T | None], seconds: float = 20) -> T:
    """The first truthy value of `condition` within `seconds` (an AssertionError otherwise)."""
    waiting = WebDriverWait(
        driver,
        seconds,
        poll_frequency=0.1,
        ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
    )
    try:
        seen = waiting.until(lambda _: condition())
    except TimeoutException as exc:
        raise AssertionError(f"not seen within {seconds} s") from exc
    assert seen is not None  # `until` returns only a truthy value
    return seen
