"""The status page, its actions and its guards, against a real `rembgd run` over real HTTP."""
from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import numpy as np
import pytest
import yaml
from PIL import Image

from daemon.web.items import pair_tag
from tests.helpers import encode, photo, write_config
from tests.harness import ROOT, Daemon, hold_two_cutouts, wait_for

pytestmark = pytest.mark.slow

PAIR = "studio"  # the pair's name: forms, URLs and item ids name it, never its place
TAG = pair_tag(PAIR)
TOKEN = "s3cret-token-for-tests-0123456789"


JARS: dict[str, dict[str, str]] = {}  # per server: the cookies it set, as a browser keeps them


def fetch(url: str, path: str, *, method: str = "GET", form: dict | None = None,
          headers: dict | None = None, json_body=None, jar: bool = True
          ) -> tuple[int, dict, bytes]:
    """One real HTTP request (redirects are not followed): (status, headers, body). Like
    a browser it keeps the server's cookies (``jar``) unless a Cookie header is given."""
    parts = urlsplit(url)
    cookies = JARS.setdefault(parts.netloc, {})
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    if json_body is not None:
        body, hdrs = json.dumps(json_body).encode(), {"Content-Type": "application/json"}
    else:
        body = urlencode(form).encode() if form is not None else None
        hdrs = {"Content-Type": "application/x-www-form-urlencoded"} if body else {}
    if jar and cookies:
        hdrs["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
    conn.request(method, path, body=body, headers={**hdrs, **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    for name, value in resp.getheaders():
        if name.lower() == "set-cookie" and jar:
            key, _, rest = value.split(";")[0].partition("=")
            if "Max-Age=0" in value:
                cookies.pop(key, None)
            else:
                cookies[key] = rest
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def start(config: Path) -> tuple[Daemon, str]:
    daemon = Daemon(config).start()
    event = daemon.wait_log(lambda e: e.get("event") == "web_listening", timeout=30)[0]
    return daemon, event["url"]


def form_token(html: bytes | str) -> str:
    text = html.decode() if isinstance(html, bytes) else html
    return re.search(r'name="form_token" value="([^"]+)"', text).group(1)


@pytest.fixture(scope="module")
def local(tmp_path_factory, models_dir):
    """A daemon with the page on 127.0.0.1 (no token), one photo done and one file failed."""
    tmp = tmp_path_factory.mktemp("web")
    config = write_config(tmp, models_dir, web={"listen": "127.0.0.1:0"}, watch=[{
        "inbox": str(tmp / "inbox"), "outbox": str(tmp / "outbox"), "name": PAIR,
        "review": {"min_confidence": 0.0}}])  # nothing is held but what a test holds
    (tmp / "inbox" / "cat.jpg").write_bytes(encode(photo("chelsea")))
    (tmp / "inbox" / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    daemon, url = start(config)
    daemon.wait_processed(2)
    yield tmp, daemon, url
    daemon.stop()


def test_previews_are_made_when_an_output_is_delivered_and_served_from_disk(local):
    """The item view's previews of a delivered output and its source are made by the
    daemon before anyone opens the item (first in this module: nothing has asked for a
    preview); opening it makes nothing, it serves the cached files."""
    tmp, daemon, url = local
    folder = tmp / "cache" / "web" / "previews"
    made = wait_for(lambda: sorted(folder.glob("*.webp")) if folder.is_dir()
                    and len(list(folder.glob("*.webp"))) == 2 else None, timeout=60)
    before = {f.name: f.stat().st_mtime_ns for f in made}
    cached = {f.read_bytes() for f in made}
    item = json.loads(fetch(url, "/api/outputs?limit=1")[2])["items"][0]["id"]
    assert fetch(url, f"/item/{item}")[0] == 200
    for root, rel in (("outbox", "cat.jpg.png"), ("inbox", "cat.jpg")):
        status, headers, data = fetch(url, "/preview?" + urlencode(
            {"pair": PAIR, "root": root, "path": rel}))
        assert status == 200 and headers["content-type"] == "image/webp" and data in cached
    assert {f.name: f.stat().st_mtime_ns for f in folder.glob("*.webp")} == before


def test_page_lists_outputs_failures_and_serves_thumbnails(local):
    tmp, daemon, url = local
    status, headers, html = fetch(url, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    page = html.decode()
    assert "watching" in page and str(tmp / "inbox") in page
    # the counts are totals since start and say so; the queue is what is there now
    assert re.search(r"idle; since start: 0 hits / 1 misses, 1 failed; now: 0 queued, 0 in "
                     r"progress", page), re.search(r'id="line">[^<]*', page)
    assert "cat.jpg" in page and "miss" in page and "u2netp" in page  # recent output
    assert "broken.jpg" in page and "unsupported" in page and ">Retry<" in page
    for root, rel in (("outbox", "cat.jpg.png"), ("inbox", "cat.jpg")):
        status, headers, data = fetch(url, f"/thumb?pair=studio&root={root}&path={rel}")
        assert status == 200 and headers["content-type"] == "image/webp"
        with Image.open(io.BytesIO(data)) as thumb:
            assert max(thumb.size) == 256
            assert thumb.mode == ("RGBA" if root == "outbox" else "RGB")  # the cutout's alpha
    assert len(list((tmp / "cache" / "web" / "thumbs").iterdir())) == 2  # cached on disk
    # `rembgd status` keeps working, and names the page (its file is rewritten each tick)
    line = "idle; since start: 0 hits / 1 misses, 1 failed"
    st = wait_for(lambda: (s := daemon.status())["line"] == line and s)
    assert st["running"] and st["web"] == url and st["incomplete"] == 0

    status, headers, body = fetch(url, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    text = body.decode()
    inbox = tmp / "inbox"
    assert f'rembgd_files_processed_total{{pair="{inbox}",tier="miss"}} 1.0' in text
    assert f'rembgd_files_failed_total{{pair="{inbox}",reason="unsupported"}} 1.0' in text
    assert "rembgd_queue_depth 0.0" in text and f'rembgd_pair_standby{{pair="{inbox}"}} 0.0' in text


def test_review_approve_and_redo(local):
    """A cutout held for review (as obs's routing holds it) is approved into the outbox;
    another is redone with a different model."""
    from daemon import review

    tmp, daemon, url = local
    folder = tmp / "review"
    cutout = tmp / "outbox" / "cat.jpg.png"
    folder.mkdir()
    cutout.rename(folder / "cat.jpg.png")  # routed to review instead of the outbox
    review.hold(folder, review.new_item(str(tmp / "inbox"), Path("cat.jpg"),
                                        [Path("cat.jpg.png")], 0.31, ("uncertain edge",),
                                        "u2netp", "miss"))
    html = fetch(url, "/")[2].decode()
    assert "Waiting for review (1)" in html and "uncertain edge" in html and "0.31" in html
    item = re.search(r'name="item" value="([0-9a-f]{40})"', html).group(1)
    status, _, data = fetch(url, "/thumb?" + urlencode(
        {"pair": PAIR, "root": "review", "path": "cat.jpg.png"}))
    assert status == 200 and Image.open(io.BytesIO(data)).mode == "RGBA"
    for bad in ("../x", "not-an-id", item + "/.."):
        assert fetch(url, "/approve", method="POST", form={
            "pair": PAIR, "item": bad, "form_token": form_token(html)})[0] in (400, 404)
    status, _, _ = fetch(url, "/approve", method="POST",
                         form={"pair": PAIR, "item": item, "form_token": form_token(html)})
    assert status == 303 and cutout.is_file() and not (folder / "cat.jpg.png").exists()
    assert "nothing waiting for review" in fetch(url, "/")[2].decode()

    before = len(daemon.processed())
    review.hold(folder, review.new_item(str(tmp / "inbox"), Path("cat.jpg"), [], 0.2, (),
                                        "u2net_human_seg", "miss"))
    html = fetch(url, "/")[2].decode()
    assert ">Redo with u2netp<" in html
    held = re.search(r'name="item" value="([0-9a-f]{40})"', html).group(1)
    assert held != item  # an id per hold: Approve by the earlier one is refused
    assert fetch(url, "/approve", method="POST", form={
        "pair": PAIR, "item": item, "form_token": form_token(html)})[0] == 409
    assert fetch(url, "/redo", method="POST", form={
        "pair": PAIR, "item": held, "model": "bria-rmbg", "form_token": form_token(html)})[0] == 409
    item = held
    status, _, _ = fetch(url, "/redo", method="POST", form={
        "pair": PAIR, "item": item, "model": "u2netp", "form_token": form_token(html)})
    assert status == 303
    redone = daemon.wait_log(lambda e: e.get("event") == "processed", count=before + 1)[-1]
    assert redone["path"] == str(tmp / "inbox" / "cat.jpg") and redone["model"] == "u2netp"
    wait_for(lambda: "nothing waiting for review" in fetch(url, "/")[2].decode())  # dropped


def test_retry_moves_the_failed_file_back_and_it_is_processed(local):
    tmp, daemon, url = local
    failed = tmp / "failed" / "broken.jpg"
    failed.write_bytes(encode(photo("astronaut")))  # the retoucher fixed the file
    token = form_token(fetch(url, "/")[2])
    assert fetch(url, "/retry", method="POST", form={"pair": PAIR, "path": "broken.jpg"})[0] == 403
    assert failed.exists()  # no form token: refused, nothing moved
    status, headers, _ = fetch(url, "/retry", method="POST",
                               form={"pair": PAIR, "path": "broken.jpg", "form_token": token})
    assert status == 303 and headers["location"].startswith("/?msg=Retrying")
    assert not failed.exists() and not (tmp / "failed" / "broken.jpg.error.json").exists()
    daemon.wait_log(lambda e: e.get("event") == "processed" and e.get("outcome") == "miss"
                    and e["path"].endswith("broken.jpg"))
    assert (tmp / "outbox" / "broken.jpg.png").is_file()
    page = wait_for(lambda: (p := fetch(url, "/")[2].decode()).count("broken.jpg") and p)
    assert "no failed files" in page


def test_an_incomplete_file_is_listed_as_waiting_until_it_completes(tmp_path, models_dir):
    """A truncated JPEG (a copy still running, or broken) is shown as waiting, with when
    it will go to failed/; once the copy completes it is processed and leaves the list."""
    config = write_config(tmp_path, models_dir, web={"listen": "127.0.0.1:0"},
                          incomplete_timeout_s=600, pair={"name": PAIR})
    whole = encode(photo("coffee"))
    (tmp_path / "inbox" / "copying.jpg").write_bytes(whole[: len(whole) // 2])
    daemon, url = start(config)
    try:
        daemon.wait_log(lambda e: e.get("event") == "not_ready")
        # (the job logs not_ready before the intake puts the file on the waiting list)
        page = wait_for(lambda: "copying.jpg" in (p := fetch(url, "/")[2].decode()) and p)
        section = page[page.index('id="waiting"'):page.index('id="recent"')]
        assert "Waiting: incomplete (1)" in section and "copying.jpg" in section
        assert "empty or truncated" in section
        gives_up = re.search(r"<td>(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)</td></tr>", section).group(1)
        left = time.mktime(time.strptime(gives_up, "%Y-%m-%d %H:%M:%S")) - time.time()
        assert 500 < left <= 601  # incomplete_timeout_s from the first check
        # no thumb yet
        assert fetch(url, "/thumb?pair=studio&root=inbox&path=copying.jpg")[0] == 415
        assert not list((tmp_path / "failed").glob("copying.jpg*"))
        assert b"rembgd_files_incomplete 1.0" in fetch(url, "/metrics")[2]
        assert daemon.wait_ticks(1)["incomplete"] == 1  # `rembgd status` counts it too

        (tmp_path / "inbox" / "copying.jpg").write_bytes(whole)  # the copy completes
        daemon.wait_processed(1)
        page = fetch(url, "/")[2].decode()
        assert "Waiting: incomplete (0)" in page and "no incomplete files" in page
        assert b"rembgd_files_incomplete 0.0" in fetch(url, "/metrics")[2]
    finally:
        daemon.stop()


def test_path_traversal_links_and_foreign_hosts_are_refused(local, tmp_path):
    tmp, _daemon, url = local
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the web")
    os.symlink(secret, tmp / "outbox" / "link.png")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.png").write_bytes(encode(photo("coffee"), "PNG"))
    os.symlink(outside, tmp / "outbox" / "linked_dir")
    refused = ["../config.yaml", "/etc/passwd", "a/../../config.yaml", "./cat.jpg.png",
               "link.png", "linked_dir/x.png", "%2e%2e/config.yaml", "a//b"]
    for rel in refused:
        for route in ("thumb", "file"):
            status, _, body = fetch(url, f"/{route}?pair=studio&root=outbox&path={rel}")
            assert status in (400, 404), (route, rel, status)
            assert b"not for the web" not in body and b"watch" not in body
    assert fetch(url, "/file?pair=studio&root=cache&path=index.sqlite")[0] == 400
    assert fetch(url, "/file?pair=7&root=outbox&path=cat.jpg.png")[0] == 404
    (tmp / "failed" / "keep.jpg").write_bytes(b"x")
    (tmp / "failed" / "keep.jpg.error.json").write_text(json.dumps(
        {"file": str(tmp / "failed" / "keep.jpg"), "reason": "unsupported", "error": "x"}))
    token = form_token(fetch(url, "/")[2])  # the page shows keep.jpg's Retry form
    for rel in ("../inbox/cat.jpg", str(tmp / "failed" / "keep.jpg"), "sub/../keep.jpg"):
        status, _, _ = fetch(url, "/retry", method="POST",
                             form={"pair": PAIR, "path": rel, "form_token": token})
        assert status == 400, rel
    os.symlink(secret, tmp / "failed" / "evil.jpg")
    (tmp / "failed" / "evil.jpg.error.json").write_text(json.dumps(
        {"file": str(tmp / "failed" / "evil.jpg"), "reason": "unsupported", "error": "x"}))
    assert fetch(url, "/retry", method="POST",
                 form={"pair": PAIR, "path": "evil.jpg", "form_token": token})[0] == 400
    assert secret.read_text() == "not for the web" and (tmp / "failed" / "keep.jpg").exists()
    odd = '<img src=x onerror="alert(1)">.jpg'
    (tmp / "failed" / odd).write_bytes(b"x")
    (tmp / "failed" / (odd + ".error.json")).write_text(json.dumps(
        {"file": str(tmp / "failed" / odd), "reason": "<b>why</b>", "error": "x"}))
    page = fetch(url, "/")[2].decode()
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;.jpg" in page and "<b>why" not in page
    assert "<img src=x" not in page
    assert fetch(url, "/", headers={"Host": "attacker.example:80"})[0] == 403  # DNS rebinding
    assert fetch(url, "/", headers={"Host": "127.evil.example"})[0] == 403


def test_off_localhost_the_token_is_required(tmp_path, models_dir):
    config = write_config(tmp_path, models_dir, web={"listen": "127.0.0.2:0"}, pair={"name": PAIR})
    out = subprocess.run([sys.executable, "-m", "daemon", "-c", str(config), "run"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2
    assert f"{config}: web.token: is required when web.listen is 127.0.0.2:0" in out.stderr

    config = write_config(tmp_path, models_dir, web={"listen": "127.0.0.2:0", "token": TOKEN},
                          pair={"name": PAIR})
    (tmp_path / "inbox" / "a.jpg").write_bytes(b"not an image at all")
    daemon, url = start(config)
    daemon.wait_processed(1)
    try:
        assert urlsplit(url).hostname == "127.0.0.2"
        assert fetch(url, "/")[0] == 303  # to the login form
        assert fetch(url, "/metrics")[0] == 401
        assert fetch(url, "/thumb?pair=studio&root=inbox&path=x.jpg")[0] == 401
        assert fetch(url, "/", headers={"Authorization": "Bearer wrong-token-0123456789"})[0] == 303
        assert fetch(url, "/", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert fetch(url, "/login", method="POST", form={"token": "nope"})[0] == 403
        status, headers, _ = fetch(url, "/login", method="POST", form={"token": TOKEN})
        cookie = headers["set-cookie"]
        assert status == 303 and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert TOKEN not in cookie
        session = {"Cookie": cookie.split(";")[0]}
        status, _, html = fetch(url, "/", headers=session)
        assert status == 200 and b"watching" in html and b"a.jpg" in html
        failed = tmp_path / "failed" / "a.jpg"
        failed.write_bytes(encode(photo("coffee")))
        # the cookie alone (what a cross-site form would carry) is not enough to act
        assert fetch(url, "/retry", method="POST", form={"pair": PAIR, "path": "a.jpg"},
                     headers=session)[0] == 403
        assert failed.exists()
        status, _, _ = fetch(url, "/retry", method="POST", headers=session,
                             form={"pair": PAIR, "path": "a.jpg", "form_token": form_token(html)})
        assert status == 303 and not failed.exists()
        daemon.wait_log(lambda e: e.get("event") == "processed" and e.get("outcome") == "miss")
        # log out: the page's button clears the cookie in the browser
        assert b">Log out<" in html
        status, headers, _ = fetch(url, "/logout", method="POST", headers=session,
                                   form={"form_token": form_token(html)})
        assert status == 303 and headers["location"].endswith("/login")
        cleared = headers["set-cookie"]
        assert "Max-Age=0" in cleared and cleared.split(";")[0] == "rembgd_session="
        assert fetch(url, "/", headers={"Cookie": cleared.split(";")[0]})[0] == 303

        write_config(tmp_path, models_dir, web={"listen": "127.0.0.1:0"},  # reload: restarted
                     pair={"name": PAIR})
        daemon.signal(signal.SIGHUP)
        local_url = daemon.wait_log(lambda e: e.get("event") == "web_listening", count=2)[1]["url"]
        assert urlsplit(local_url).hostname == "127.0.0.1" and fetch(local_url, "/")[0] == 200
        with pytest.raises(ConnectionRefusedError):
            fetch(url, "/")
    finally:
        daemon.stop()


def test_api_search_bearer_csrf_touchup_revert_and_batch(tmp_path, models_dir):
    """The JSON API on a daemon with a token: search past the newest 24, an item, the
    bearer token, the session's form token, a touch-up (the file changes inside the
    stroke only), concurrent touch-ups of one source, revert, and batch approve."""
    import threading

    from daemon.web.controller import RecentOutput
    from daemon.web.journal import Journal
    from tests.helpers import png_alpha

    journal = Journal(tmp_path / "cache" / "web" / "recent.sqlite")
    for i in range(40):  # older outputs than the page's first 24
        journal.add(RecentOutput(1_700_000_000 + i, PAIR, "inbox", f"old/img{i:05d}.jpg",
                                 (f"old/img{i:05d}.jpg.png",), "near", "u2netp", 5.0))
    journal.close()
    config = write_config(tmp_path, models_dir, web={"listen": "127.0.0.1:0", "token": TOKEN},
                          watch=[{"inbox": str(tmp_path / "inbox"), "name": PAIR,
                                  "outbox": str(tmp_path / "outbox"),
                                  "review": {"min_confidence": 0.0}}])
    (tmp_path / "inbox" / "cat.jpg").write_bytes(encode(photo("chelsea")))
    daemon, url = start(config)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    try:
        daemon.wait_processed(1)
        assert fetch(url, "/api/outputs", jar=False)[0] == 401
        # the journal records an output just after its "processed" line is logged
        page = wait_for(lambda: (p := json.loads(fetch(url, "/api/outputs?limit=24",
                                                       headers=bearer, jar=False)[2]))
                        ["total"] == 41 and p)
        assert len(page["items"]) == 24
        assert page["items"][0]["source"]["path"] == "cat.jpg"
        found = json.loads(fetch(url, "/api/outputs?q=img00003", headers=bearer, jar=False)[2])
        assert found["total"] == 1 and found["items"][0]["source"]["path"] == "old/img00003.jpg"
        assert json.loads(fetch(url, "/api/outputs?q=tier:miss+cat", headers=bearer,
                                jar=False)[2])["total"] == 1
        assert fetch(url, "/api/outputs?q=date:2026-13", headers=bearer, jar=False)[0] == 400
        cat = page["items"][0]
        assert set(cat) >= {"id", "source", "outputs", "tier", "model", "confidence"}
        status, _, body = fetch(url, f"/api/items/{cat['id']}", headers=bearer, jar=False)
        assert status == 200 and json.loads(body)["outputs"][0]["path"] == "cat.jpg.png"
        for bad in ("o99999", f"r{TAG}-" + "0" * 40, f"f{TAG}-" + "0" * 40):
            assert fetch(url, f"/api/items/{bad}", headers=bearer, jar=False)[0] == 404
        assert fetch(url, "/api/items/..%2f..%2fetc", headers=bearer, jar=False)[0] == 404
        assert fetch(url, "/preview?pair=studio&root=outbox&path=../config.yaml", headers=bearer,
                     jar=False)[0] == 400

        output = tmp_path / "outbox" / "cat.jpg.png"
        before = png_alpha(output.read_bytes())
        stroke = {"mode": "remove", "radius": 20, "points": [[150, 150], [220, 160]]}
        act = f"/api/items/{cat['id']}/touchup"
        # a browser session: its cookie alone, or another session's form token, is refused
        fetch(url, "/login", method="POST", form={"token": TOKEN})
        html = fetch(url, "/")[2]
        mine = form_token(html)
        assert fetch(url, act, method="POST", json_body={"strokes": [stroke]})[0] == 403
        other = fetch(url, "/login", method="POST", form={"token": TOKEN}, jar=False)[1]
        theirs = form_token(fetch(url, "/", jar=False, headers={
            "Cookie": other["set-cookie"].split(";")[0]})[2])
        assert theirs != mine
        assert fetch(url, act, method="POST", json_body={"strokes": [stroke]},
                     headers={"X-Form-Token": theirs})[0] == 403
        assert fetch(url, act, method="POST", json_body={"strokes": "x"},
                     headers={"X-Form-Token": mine})[0] == 400
        assert (png_alpha(output.read_bytes()) == before).all()  # nothing done so far
        # a brush picked: the source is made ready in the background (answered at once)
        status, _, body = fetch(url, f"/api/items/{cat['id']}/prepare", method="POST",
                                headers={"X-Form-Token": mine})
        assert status == 200 and "ready for touch-up" in json.loads(body)["message"]
        daemon.wait_log(lambda e: e.get("event") == "web_prepared"
                        and e.get("source") == "cat.jpg", timeout=60)
        status, _, body = fetch(url, act, method="POST", json_body={"strokes": [stroke]},
                                headers={"X-Form-Token": mine})
        result = json.loads(body)
        assert status == 200 and result["message"].startswith("Touched up → outbox/cat.jpg.png")
        after = png_alpha(output.read_bytes())
        from daemon.imaging import touchup
        from daemon.imaging.touchup import Stroke

        s = Stroke("remove", 20.0, ((150.0, 150.0), (220.0, 160.0)))
        core = touchup.paint([Stroke("remove", 20.0 - 2 * touchup.REACH, s.points)], 451, 300) > 0
        reach = touchup.paint([s], 451, 300, grow=touchup.REACH) > 0
        assert before[core].mean() > 200 and after[core].max() <= 8
        assert np.abs(after[~reach].astype(int) - before[~reach]).max() <= 1
        listed = json.loads(fetch(url, "/api/outputs?limit=1", headers=bearer, jar=False)[2])
        assert listed["items"][0]["event"] == "touched-up" and result["item"] == \
            listed["items"][0]["id"]

        # concurrent touch-ups of one source: each is done whole or refused (409)
        statuses = []

        def touch():
            statuses.append(fetch(url, act, method="POST", headers=bearer, jar=False,
                                  json_body={"strokes": [stroke]})[0])
        threads = [threading.Thread(target=touch) for _ in range(3)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert 200 in statuses and set(statuses) <= {200, 409}, statuses
        assert (png_alpha(output.read_bytes())[core] <= 8).all()

        status, _, body = fetch(url, f"/api/items/{cat['id']}/revert", method="POST",
                                headers=bearer, jar=False)
        assert status == 200 and "Reverted" in json.loads(body)["message"]
        assert (png_alpha(output.read_bytes()) == before).all()
        assert fetch(url, f"/api/items/{cat['id']}/revert", method="POST", headers=bearer,
                     jar=False)[0] == 409  # nothing left to revert

        # batch approve: the pair now holds every cutout (a reload); two are held, then
        # approved at once
        held = hold_two_cutouts(daemon, config, tmp_path / "inbox")
        ids = [f"r{TAG}-{e['id']}" for e in held]
        status, _, body = fetch(url, "/api/batch", method="POST", headers=bearer, jar=False,
                                json_body={"action": "approve", "ids": ids + ["o99999"]})
        result = json.loads(body)
        assert status == 200 and result["done"] == 2 and result["refused"] == 1, result["results"]
        assert (tmp_path / "outbox" / "a.jpg.png").is_file()
        assert (tmp_path / "outbox" / "b.jpg.png").is_file()
        text = fetch(url, "/metrics", headers=bearer, jar=False)[2].decode()
        assert "rembgd_review_pending 0.0" in text and "rembgd_failed_files 0.0" in text, text
        assert "rembgd_build_info{" in text and "rembgd_last_processed_timestamp_seconds" in text
    finally:
        daemon.stop()


def test_a_second_touch_up_of_a_source_while_one_runs_is_refused_and_nothing_mixes(
        tmp_path, models_dir, shared_engines):
    """The real server and a real pipeline: the first touch-up is held inside the
    daemon (after the request was accepted, before any pixel is computed) while a second
    one of the same source, with another stroke, arrives: it is refused with 409 and
    changes nothing. The file then delivered is byte for byte the first touch-up alone,
    as a fresh pipeline makes it; after it, the second stroke is accepted and applied on
    top (serialised, never mixed)."""
    import threading

    from daemon import config as configmod
    from daemon.cache.sqlite import SqliteStore
    from daemon.config.schema import Secret, WebConfig
    from daemon.fsutil import atomic_write_bytes
    from daemon.imaging.touchup import Stroke
    from daemon.pipeline import Plan
    from daemon.web.controller import RecentOutput
    from daemon.web.journal import Journal
    from daemon.web.server import WebServer
    from daemon.web.thumbs import Thumbnails
    from tests.helpers import pipeline_over, png_alpha

    def make_pipeline(where: Path):
        cfg = configmod.load(write_config(where, models_dir))
        return cfg, pipeline_over(cfg, shared_engines, SqliteStore(cfg.cache.dir))

    jpeg = encode(photo("chelsea"), "JPEG", quality=92)
    cfg, pipe = make_pipeline(tmp_path / "desk")
    plan = Plan(cfg.output_defaults)
    roots = {"inbox": tmp_path / "desk" / "inbox", "outbox": tmp_path / "desk" / "outbox"}
    (roots["inbox"] / "cat.jpg").write_bytes(jpeg)
    output = roots["outbox"] / "cat.jpg.png"
    output.parent.mkdir(exist_ok=True)
    atomic_write_bytes(output, pipe.render(jpeg, plan).files[""])
    model = output.read_bytes()
    journal = Journal(tmp_path / "recent.sqlite")
    journal.add(RecentOutput(time.time(), str(roots["inbox"]), "inbox", "cat.jpg",
                             ("cat.jpg.png",), "miss", "u2netp", 1.0))
    entered, release = threading.Event(), threading.Event()

    class Desk:  # the Controller's touch-up as the daemon's: render, then write atomically
        def roots(self, pair):
            return roots

        def output(self, row):
            return journal.get(row)

        def latest_output(self, pair, rel):
            return journal.latest_for(pair, rel)

        def touchup(self, pair, root, rel, strokes):
            if not entered.is_set():
                entered.set()
                assert release.wait(60)
            data = (roots[root] / rel).read_bytes()
            atomic_write_bytes(output, pipe.touch_up(data, plan, strokes).files[""])
            return [output]

    server = WebServer(WebConfig(listen="127.0.0.1:0", token=Secret(TOKEN)), Desk(),
                       Thumbnails(tmp_path / "t"))
    url = server.start()
    first = {"mode": "remove", "radius": 20, "points": [[150, 150], [220, 160]]}
    second = {"mode": "remove", "radius": 15, "points": [[330, 200]]}
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    act = "/api/items/o1/touchup"
    answers = []
    try:
        runner = threading.Thread(target=lambda: answers.append(fetch(
            url, act, method="POST", json_body={"strokes": [first]},
            headers=bearer, jar=False)))
        runner.start()
        assert entered.wait(60)  # the first touch-up is inside the daemon now
        status, _, body = fetch(url, act, method="POST", json_body={"strokes": [second]},
                                headers=bearer, jar=False)
        assert status == 409 and "is running; try again" in json.loads(body)["error"]
        assert output.read_bytes() == model  # nothing written by the refused one
        release.set()
        runner.join(60)
        assert answers and answers[0][0] == 200, answers
        after_first = output.read_bytes()
        status = fetch(url, act, method="POST", json_body={"strokes": [second]},
                       headers=bearer, jar=False)[0]
        assert status == 200  # once the first is done, the next is taken
        after_both = output.read_bytes()
    finally:
        server.stop()
        journal.close()

    # the references: the same touch-ups, one at a time, by a fresh pipeline and cache
    _, fresh = make_pipeline(tmp_path / "fresh")
    fresh.render(jpeg, plan)
    s1 = Stroke("remove", 20.0, ((150.0, 150.0), (220.0, 160.0)))
    s2 = Stroke("remove", 15.0, ((330.0, 200.0),))
    only_first = fresh.touch_up(jpeg, plan, [s1]).files[""]
    then_second = fresh.touch_up(jpeg, plan, [s2]).files[""]
    assert after_first == only_first  # the first whole, nothing of the refused second
    assert after_both == then_second
    assert png_alpha(after_first)[200, 330] == png_alpha(model)[200, 330] > 200
    assert png_alpha(after_both)[200, 330] <= 8


def _hidden_forms(html: str, action: str) -> list[dict[str, str]]:
    """The hidden fields of every ``action`` form of the page, as a browser would send them."""
    import html as htmlmod

    forms = re.findall(rf'<form method="post" action="/{action}"[^>]*>(.*?)</form>', html, re.S)
    return [{k: htmlmod.unescape(v) for k, v in
             re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', f)}
            for f in forms]


def test_a_reload_that_reorders_pairs_between_page_and_click_acts_on_the_right_pair(
        tmp_path, models_dir):
    """Issue 26.2: the page is rendered, then a reload puts a new pair first and swaps the
    other two; Approve and Retry clicked on that page still act on the pair they showed
    (never on the one that now stands at its old place in the list)."""
    from daemon import review

    folders = {k: {"inbox": str(tmp_path / k / "in"), "outbox": str(tmp_path / k / "out"),
                   "review": {"min_confidence": 1.0}}  # every cutout is held
               for k in ("A", "B", "C")}
    for f in folders.values():
        Path(f["inbox"]).mkdir(parents=True)
    config = write_config(tmp_path, models_dir, web={"listen": "127.0.0.1:0"},
                          watch=[folders["A"], folders["B"]])
    shot = encode(photo("coffee")[::4, ::4])
    for k in ("A", "B"):
        (tmp_path / k / "in" / f"{k}.jpg").write_bytes(shot)
        (tmp_path / k / "in" / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    daemon, url = start(config)
    try:
        daemon.wait_log(lambda e: e.get("event") == "review_held", count=2)
        wait_for(lambda: all((tmp_path / k / "failed" / "broken.jpg.error.json").exists()
                             for k in ("A", "B")))
        [held_a] = review.list_items(tmp_path / "A" / "review")
        html = wait_for(lambda: (p := fetch(url, "/")[2].decode()).count('action="/retry"') == 2
                        and p)
        token = form_token(html)
        [approve_a] = [f for f in _hidden_forms(html, "approve") if f["item"] == held_a.id]
        # the Retry of A's broken.jpg as rendered: its pair field names pair A (its key;
        # a build that named pairs by their place rendered 0)
        [retry_a] = [f for f in _hidden_forms(html, "retry")
                     if f["pair"] in (folders["A"]["inbox"], "0")]
        b_failed = tmp_path / "B" / "failed" / "broken.jpg"
        b_before = b_failed.stat()

        data = yaml.safe_load(config.read_text())
        data["watch"] = [folders["C"], folders["B"], folders["A"]]  # inserted and reordered
        config.write_text(yaml.safe_dump(data))
        daemon.signal(signal.SIGHUP)
        daemon.wait_log(lambda e: e.get("event") == "config_reloaded")

        status, headers, _ = fetch(url, "/approve", method="POST",
                                   form={**approve_a, "form_token": token})
        assert status == 303 and "Approved" in headers["location"], headers
        assert (tmp_path / "A" / "out" / "A.jpg.png").is_file()
        assert not (tmp_path / "B" / "out" / "B.jpg.png").exists()  # B's cutout still waits
        assert len(review.list_items(tmp_path / "B" / "review")) == 1

        status, headers, _ = fetch(url, "/retry", method="POST",
                                   form={**retry_a, "form_token": token})
        assert status == 303 and "Retrying" in headers["location"], headers
        [retried] = daemon.wait_log(lambda e: e.get("event") == "web_retry")
        assert retried["to"] == str(tmp_path / "A" / "in" / "broken.jpg")
        after = b_failed.stat()  # B's failed file was not touched
        assert (after.st_ino, after.st_mtime_ns) == (b_before.st_ino, b_before.st_mtime_ns)
    finally:
        daemon.stop()
