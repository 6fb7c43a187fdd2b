"""The search page in a real browser: Debian's chromium, headless, driven
over WebDriver (chromedriver), against ``mmembed serve --search-in`` over a
table that ``mmembed batch`` made from ``make-scenes`` media.

Needs MMEMBED_BIN (the mmembed binary) and MMEMBED_MAKE_SCENES (the
make-scenes example); CHROMIUM and CHROMEDRIVER default to Debian's paths.
Screenshots go to MMEMBED_TEST_ARTIFACTS (default target/test-artifacts).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

ROOT = Path(__file__).resolve().parents[2]


def need(var: str) -> str:
    v = os.environ.get(var)
    if not v:
        pytest.fail(f"{var} is not set (scripts/test.sh sets it)")
    return v


@pytest.fixture(scope="session")
def artifacts() -> Path:
    d = Path(os.environ.get("MMEMBED_TEST_ARTIFACTS", ROOT / "target" / "test-artifacts"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("page")
    subprocess.run(
        [need("MMEMBED_MAKE_SCENES"), str(d / "media"), "12", "--slideshow"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [need("MMEMBED_BIN"), "batch", str(d / "media"), "-o", str(d / "media.parquet"),
         "--model", "demo", "--interval", "4"],
        check=True,
        capture_output=True,
    )
    return d


@pytest.fixture(scope="session")
def server(media):
    """``mmembed serve --search-in`` on a free loopback port; its base URL."""
    proc = subprocess.Popen(
        [need("MMEMBED_BIN"), "serve", "--search-in", str(media / "media.parquet"), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://[0-9.]+:\d+", line)
        assert m, f"no address in {line!r}"
        base = m.group(0)
        deadline = time.time() + 60
        while True:
            with urllib.request.urlopen(f"{base}/api/info") as r:
                if json.load(r)["ready"]:
                    break
            if time.time() > deadline:
                raise TimeoutError("the model did not load in 60 s")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
              "--window-size=1280,900", "--autoplay-policy=no-user-gesture-required"):
        opts.add_argument(a)
    # The driver's path is given, so Selenium never tries to download one.
    service = Service(executable_path=os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
    driver = webdriver.Chrome(options=opts, service=service)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
