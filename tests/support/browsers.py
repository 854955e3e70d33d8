"""Real headless Chromium, driven with Selenium, for the end-to-end tests.

Chromium and its driver come from Debian (``apt-get install chromium
chromium-driver``; ``.ci/run`` installs them). The fixtures that hand these out
are in ``tests/e2e/conftest.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.support.servers import ROOT

CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER_BIN", "/usr/bin/chromedriver")
ARTIFACTS = ROOT / "test-artifacts"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1000,720")


def browser_missing() -> str | None:
    """Why the browser cannot run here, or None if it can."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{path} is missing: apt-get install -y chromium chromium-driver"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[test]'"
    return None


class Browsers:
    """Chromium instances started on first use and kept for the session.

    Each is its own browser process with its own cookies, so two of them are
    two users; each test starts them from a blank page with no cookies.
    """

    def __init__(self) -> None:
        self._drivers: list[Any] = []

    def get(self, index: int) -> Any:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        while len(self._drivers) <= index:
            options = webdriver.ChromeOptions()
            options.binary_location = CHROMIUM
            for flag in FLAGS:
                options.add_argument(flag)
            driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
            driver.set_script_timeout(15)
            self._drivers.append(driver)
        return self._drivers[index]

    def reset(self) -> None:
        for driver in self._drivers:
            driver.get("about:blank")
            driver.delete_all_cookies()

    def close(self) -> None:
        for driver in self._drivers:
            driver.quit()


def screenshot(driver: Any, name: str) -> Path:
    """Save a PNG of the page into test-artifacts/ for a reviewer to look at."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
