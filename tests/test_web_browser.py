"""The page in a real headless browser (Debian chromium + chromedriver, driven by selenium):
it loads, Retry is clicked, and the file shows up processed with its thumbnails.

Under CI=true a missing browser is a failure, never a skip (.ci/run installs both).
"""
from __future__ import annotations

import os
import shutil

import pytest

from tests.helpers import encode, photo, write_config
from tests.harness import Daemon, wait_for

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        why = f"{' and '.join(missing)} missing (apt-get install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"the browser test must run under CI: {why}")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_browser_retry_then_the_file_is_processed(tmp_path, models_dir, browser):
    from selenium.webdriver.common.by import By

    config = write_config(tmp_path, models_dir, web={"listen": "127.0.0.1:0"})
    (tmp_path / "inbox" / "chair.jpg").write_bytes(b"not an image yet")
    whole = encode(photo("coffee"))
    (tmp_path / "inbox" / "copying.jpg").write_bytes(whole[: len(whole) // 2])
    with Daemon(config) as daemon:
        url = daemon.wait_log(lambda e: e.get("event") == "web_listening")[0]["url"]
        daemon.wait_processed(1)
        daemon.wait_log(lambda e: e.get("event") == "not_ready")
        browser.get(url)
        assert "chair.jpg" in browser.find_element(By.ID, "failed").find_element(
            By.XPATH, "following-sibling::table").text
        waiting = browser.find_element(By.ID, "waiting").find_element(
            By.XPATH, "following-sibling::table").text
        assert "copying.jpg" in waiting and "empty or truncated" in waiting
        (tmp_path / "failed" / "chair.jpg").write_bytes(encode(photo("chelsea")))  # fixed
        browser.find_element(By.XPATH, "//form[@action='/retry']/button").click()
        daemon.wait_log(lambda e: e.get("event") == "processed" and e.get("outcome") == "miss")

        def shown():
            browser.get(url)
            imgs = browser.find_elements(By.CSS_SELECTOR, "img.chk[alt='chair.jpg.png']")
            return imgs and browser.execute_script(
                "return arguments[0].complete && arguments[0].naturalWidth", imgs[0])

        assert wait_for(shown, timeout=30) == 256  # the cutout's thumbnail, loaded
        assert "no failed files" in browser.page_source
