"""The page in a real headless browser (Debian chromium + chromedriver, driven by selenium):
it loads, Retry is clicked, and the file shows up processed with its thumbnails.

Under CI=true a missing browser is a failure, never a skip (.ci/run installs both).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

import pytest

from tests.helpers import encode, photo, write_config
from daemon.web.items import pair_tag
from tests.harness import Daemon, hold_two_cutouts, wait_for as _wait_for

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def wait_for(pred, **kw):
    """harness.wait_for, reading an element the page replaced meanwhile (a form's submit
    loads a new page: an element found in the old one is stale) as "not yet"."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    def attempt():
        try:
            return pred()
        except (NoSuchElementException, StaleElementReferenceException):
            return None

    return _wait_for(attempt, **kw)


@pytest.fixture(scope="module")
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
    driver.set_window_size(1280, 900)
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
        assert "chair.jpg" in browser.find_element(
            By.CSS_SELECTOR, "section[aria-labelledby=failed]").text
        waiting = browser.find_element(By.CSS_SELECTOR, "section[aria-labelledby=waiting]").text
        assert "copying.jpg" in waiting and "empty or truncated" in waiting
        browser.find_element(By.XPATH, "//form[@action='/retry']/button").click()  # not fixed
        wait_for(lambda: "Retry failed again: chair.jpg: unsupported" in browser.find_element(
            By.ID, "msg").text, timeout=30)
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


def _screenshot(browser, tmp_path, name: str) -> Path:
    """Saved under $REMBGD_SCREENSHOTS (docs/ uses them) or the test's tmp folder."""
    folder = Path(os.environ.get("REMBGD_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    browser.save_screenshot(str(path))
    return path


def _overflowing(browser) -> list[str]:
    """Elements reaching past the viewport's right edge (empty: no horizontal scroll)."""
    return browser.execute_script("""
        const w = document.documentElement.clientWidth;
        if (document.documentElement.scrollWidth <= w) return [];
        return Array.from(document.querySelectorAll('body *'))
          .filter((e) => e.getBoundingClientRect().right > w + 0.5)
          .map((e) => e.tagName + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right))
          .slice(0, 12);""")


def test_browser_item_view_touchup_redrop_search_batch_and_phone(tmp_path, models_dir, browser):
    """The review desk as a retoucher uses it: search past the newest 24, open an item,
    zoom to 100%, switch the background, draw a remove stroke (the output changes inside
    the stroke only), re-drop the photo (the correction is reused), batch approve, and
    the phone layout at 390 px without horizontal scroll."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.by import By

    from daemon import review
    from daemon.imaging import touchup
    from daemon.imaging.touchup import Stroke
    from daemon.web.controller import RecentOutput
    from daemon.web.journal import Journal
    from tests.helpers import png_alpha

    journal = Journal(tmp_path / "cache" / "web" / "recent.sqlite")
    for i in range(30):
        journal.add(RecentOutput(1_700_000_000 + i, 0, "inbox", f"old/img{i:05d}.jpg",
                                 (f"old/img{i:05d}.jpg.png",), "near", "u2netp", 5.0))
    journal.close()
    config = write_config(tmp_path, models_dir, web={"listen": "127.0.0.1:0"})
    cat = encode(photo("chelsea"))
    (tmp_path / "inbox" / "cat.jpg").write_bytes(cat)
    with Daemon(config) as daemon:
        url = daemon.wait_log(lambda e: e.get("event") == "web_listening")[0]["url"]
        daemon.wait_processed(1)
        output = tmp_path / "outbox" / "cat.jpg.png"
        before = png_alpha(output.read_bytes())

        browser.set_window_size(1280, 900)
        browser.get(url)
        box = browser.find_element(By.CSS_SELECTOR, "form.search input[name=q]")
        box.send_keys("img00002")
        box.submit()
        wait_for(lambda: "old/img00002.jpg" in browser.find_element(
            By.CSS_SELECTOR, "section[aria-labelledby=recent]").text)
        assert "1–1 of 1" in browser.page_source

        # open the item
        browser.get(url)
        browser.find_element(By.LINK_TEXT, "cat.jpg").click()
        wait_for(lambda: browser.find_element(By.ID, "item").get_attribute("data-painted"))
        assert "u2netp" in browser.find_element(By.CLASS_NAME, "deliverables").text
        # zoom to 100%: one source pixel is one screen pixel
        browser.find_element(By.CSS_SELECTOR, "[data-zoom='1']").click()
        assert browser.find_element(By.ID, "zoomlevel").text == "100%"
        width = browser.execute_script(
            "return document.getElementById('img-out').getBoundingClientRect().width")
        assert abs(width - 451) < 1
        # switch the background
        browser.find_element(By.CSS_SELECTOR, "[data-bg='black']").click()
        assert browser.execute_script("return getComputedStyle(document.getElementById("
                                      "'pane-out')).backgroundColor") == "rgb(0, 0, 0)"
        browser.find_element(By.CSS_SELECTOR, "[data-bg='checker']").click()
        browser.find_element(By.CSS_SELECTOR, "[data-zoom='fit']").click()
        _screenshot(browser, tmp_path, "web-item.png")

        # draw a remove stroke over the cat's face, in source px (150,150) -> (220,160)
        browser.find_element(By.CSS_SELECTOR, "[data-tool='remove']").click()
        rect = browser.execute_script(
            "const r = document.getElementById('img-out').getBoundingClientRect();"
            "return [r.left, r.top, r.width / 451];")
        left, top, k = rect
        browser.execute_script(f"const b = document.getElementById('brush'); b.value = "
                               f"{round(40 * k)}; b.dispatchEvent(new Event('input'));")
        actions = ActionBuilder(browser)
        pointer = actions.pointer_action
        points = [(150 + 70 * t / 10, 150 + 10 * t / 10) for t in range(11)]
        pointer.move_to_location(int(left + points[0][0] * k), int(top + points[0][1] * k))
        pointer.pointer_down()
        for x, y in points[1:]:
            pointer.move_to_location(int(left + x * k), int(top + y * k))
        pointer.pointer_up()
        actions.perform()
        _screenshot(browser, tmp_path, "web-touchup.png")
        drawn = browser.execute_script("return document.getElementById('apply').disabled")
        assert drawn is False
        facts = browser.find_element(By.ID, "facts").text  # judged at a glance, in the header
        assert "miss · u2netp" in facts, facts
        viewer_top = browser.find_element(By.ID, "viewer").rect["y"]
        browser.find_element(By.ID, "apply").click()
        wait_for(lambda: "Touched up" in browser.find_element(By.ID, "msg").text, timeout=60)
        assert browser.find_element(By.ID, "viewer").rect["y"] == viewer_top  # nothing jumps
        after = png_alpha(output.read_bytes())
        radius = 20.0  # the brush: 40 screen px at this zoom
        s = Stroke("remove", radius, ((150.0, 150.0), (220.0, 160.0)))
        core = touchup.paint([Stroke("remove", radius - 2 * touchup.REACH - 2, s.points)],
                             451, 300) > 0
        reach = touchup.paint([Stroke("remove", radius + 3, s.points)], 451, 300,
                              grow=touchup.REACH) > 0
        assert before[core].mean() > 200 and after[core].max() <= 8  # changed inside
        assert np.abs(after[~reach].astype(int) - before[~reach]).max() <= 1  # same outside
        wait_for(lambda: browser.execute_script(  # the view shows the new cutout
            "const i = document.getElementById('img-out');"
            "return i.complete && i.naturalWidth > 0 && i.src.endsWith(i.dataset.url);"))
        _screenshot(browser, tmp_path, "web-touchup-done.png")

        # re-drop the same photo (another name): the corrected cutout, not the model's
        (tmp_path / "inbox" / "cat-again.jpg").write_bytes(cat)
        daemon.wait_processed(2)
        again = png_alpha((tmp_path / "outbox" / "cat-again.jpg.png").read_bytes())
        assert (again == after).all()

        # batch approve two held cutouts: the pair now holds every cutout (a reload)
        hold_two_cutouts(daemon, config, tmp_path / "inbox")
        browser.get(url)
        browser.find_element(By.CSS_SELECTOR, "input[data-select-all=review]").click()
        browser.find_element(By.CSS_SELECTOR, "button[data-batch=approve]").click()
        wait_for(lambda: "approve: 2 done" in browser.find_element(By.ID, "msg").text)
        assert (tmp_path / "outbox" / "a.jpg.png").is_file()
        assert (tmp_path / "outbox" / "b.jpg.png").is_file()
        wait_for(lambda: "Waiting for review (0)" in browser.page_source)
        assert "approved" in browser.find_element(
            By.CSS_SELECTOR, "section[aria-labelledby=recent]").text

        # the phone: 390 px, no horizontal scroll, on the list and on an item
        (tmp_path / "inbox" / "a.jpg").unlink()
        browser.set_window_size(390, 844)
        browser.get(url)
        over = _overflowing(browser)
        assert over == [], "; ".join(over)
        # a.jpg's source is gone from the inbox: a placeholder, not a broken image
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".pic.nopic"))
        _screenshot(browser, tmp_path, "web-phone.png")
        # a cutout held for review (cat.jpg's again: its source is in the inbox), on the
        # phone: Approve within thumb reach at the bottom of the screen
        held = review.new_item(str(tmp_path / "inbox"), Path("cat.jpg"), [Path("cat.jpg.png")],
                               0.42, ("uncertain edge",), "u2netp", "miss")
        folder = tmp_path / "review"
        (folder / "cat.jpg.png").write_bytes(output.read_bytes())
        review.hold(folder, held)
        tag = pair_tag(str(tmp_path / "inbox"))
        browser.get(url.rstrip("/") + f"/item/r{tag}-{held.id}")
        wait_for(lambda: browser.find_element(By.ID, "item").get_attribute("data-painted"))
        over = _overflowing(browser)
        assert over == [], "; ".join(over)
        approve = browser.find_element(By.ID, "approve").rect
        height = browser.execute_script("return window.innerHeight")
        assert approve["height"] >= 40
        assert height - 120 <= approve["y"] <= height - approve["height"]  # at the bottom
        assert "waiting for review" in browser.find_element(By.ID, "facts").text
        _screenshot(browser, tmp_path, "web-phone-item.png")
        browser.set_window_size(1280, 900)
