"""Fixtures of the end-to-end tests: real headless Chromium, driven with Selenium.

Chromium and its driver come from Debian (``apt-get install chromium
chromium-driver``; ``.ci/run`` installs them). Without them these tests are
skipped, except under CI (``CI=true``), where a missing browser fails them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.browsers import ARTIFACTS, Browsers, browser_missing


@pytest.fixture(scope="session")
def browser_pool() -> Iterator[Browsers]:
    missing = browser_missing()
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the end-to-end tests need a browser under CI: {missing}", pytrace=False)
        pytest.skip(missing)
    ARTIFACTS.mkdir(exist_ok=True)
    pool = Browsers()
    yield pool
    pool.close()


@pytest.fixture
def browsers(browser_pool: Browsers) -> Iterator[Browsers]:
    """The session's browsers, each on a blank page without cookies."""
    yield browser_pool
    browser_pool.reset()
