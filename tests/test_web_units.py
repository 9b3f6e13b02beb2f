"""The page's pure parts: sessions and form tokens, the journal's search, item ids."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from daemon.config.schema import Secret, WebConfig
from daemon.web import items
from daemon.web.auth import Gate
from daemon.web.controller import FailedFile, RecentOutput
from daemon.web.journal import Journal, QueryError, parse_query

TOKEN = "s3cret-token-for-tests-0123456789"


class Clock:
    def __init__(self):
        self.t = 1_800_000_000.0

    def __call__(self):
        return self.t


def cookie_header(set_cookie: str) -> dict:
    return {"Cookie": set_cookie.split(";")[0]}


def test_a_session_expires_after_session_hours_and_cannot_be_forged():
    clock = Clock()
    gate = Gate(WebConfig(token=Secret(TOKEN), session_hours=12), now=clock)
    set_cookie = gate.login(TOKEN)
    assert "Max-Age=43200" in set_cookie and "HttpOnly" in set_cookie and TOKEN not in set_cookie
    headers = cookie_header(set_cookie)
    assert gate.authenticated(headers)
    clock.t += 12 * 3600 - 1
    assert gate.authenticated(headers)
    clock.t += 2
    assert not gate.authenticated(headers) and gate.session(headers) is None  # expired
    forged = headers["Cookie"].replace(headers["Cookie"].split("=")[1].split(".")[0],
                                       str(int(clock.t) + 3600))  # a later expiry, same MAC
    assert not gate.authenticated({"Cookie": forged})
    assert gate.login("wrong-token-0123456789") is None
    # the cookie is keyed by the token: another token's server refuses it
    other = Gate(WebConfig(token=Secret(TOKEN + "x")), now=clock)
    clock.t -= 100
    assert not other.authenticated(cookie_header(gate.login(TOKEN)))


def test_the_form_token_is_per_session_and_a_bearer_needs_none():
    gate = Gate(WebConfig(token=Secret(TOKEN)))
    a, b = cookie_header(gate.login(TOKEN)), cookie_header(gate.login(TOKEN))
    token_a, token_b = (gate.form_token(gate.session(h)) for h in (a, b))
    assert token_a != token_b
    assert gate.form_ok(a, {"form_token": token_a})
    assert gate.form_ok({**a, "X-Form-Token": token_a}, {})
    assert not gate.form_ok(a, {"form_token": token_b})  # another browser's token
    assert not gate.form_ok(a, {})
    assert not gate.form_ok({}, {"form_token": token_a})  # the token without the cookie
    assert gate.form_ok({"Authorization": f"Bearer {TOKEN}"}, {})
    local = Gate(WebConfig())  # no token: still a session per browser for its form token
    session, set_cookie = local.new_session()
    assert local.form_ok(cookie_header(set_cookie), {"form_token": local.form_token(session)})
    assert not local.form_ok(cookie_header(set_cookie), {"form_token": token_a})


def test_the_journal_searches_every_output_by_name_tier_model_reason_and_date(tmp_path):
    journal = Journal(tmp_path / "j.sqlite")
    day = time.mktime((2026, 3, 14, 12, 0, 0, 0, 0, -1))
    for i in range(60):
        journal.add(RecentOutput(day + (i - 30) * 86400 / 10, "main", "inbox",
                                 f"shoot/img_{i:03d}.jpg",
                                 (f"shoot/img_{i:03d}.jpg.png",), ("miss", "near")[i % 2],
                                 "u2netp" if i < 50 else "isnet-general-use", 1.0,
                                 reasons=("uncertain edge",) if i == 7 else ()))
    journal.add(RecentOutput(day, "main", "inbox", "100%_cotton.jpg", ("x.png",), "exact",
                             "u2netp", 1.0,
                             event="touched-up"))
    total, page = journal.search(parse_query(""), 24, 0)
    assert total == 61 and len(page) == 24 and page[0].source_rel == "100%_cotton.jpg"
    total, found = journal.search(parse_query("IMG_03"), 24, 0)  # past the newest 24
    assert total == 10 and {o.source_rel for o in found} == {f"shoot/img_{i:03d}.jpg"
                                                             for i in range(30, 40)}
    assert journal.search(parse_query("tier:near img_00"), 24, 0)[0] == 5
    assert journal.search(parse_query("model:isnet-general-use"), 24, 0)[0] == 10
    assert journal.search(parse_query("reason:edge"), 24, 0)[1][0].source_rel == "shoot/img_007.jpg"
    assert journal.search(parse_query("event:touched-up"), 24, 0)[0] == 1
    assert journal.search(parse_query("date:2026-03-14"), 100, 0)[0] == 11  # 10 + the cotton
    assert journal.search(parse_query("date:2026-03"), 100, 0)[0] == 61
    assert journal.search(parse_query("100%"), 24, 0)[0] == 1  # % is a character, not a wildcard
    assert journal.search(parse_query("_"), 24, 0)[0] == 61
    assert journal.search(parse_query("0%_"), 24, 0)[0] == 1
    found = journal.search(parse_query(""), 10, 55)[1]
    assert [o.source_rel for o in found] == [f"shoot/img_{i:03d}.jpg" for i in range(5, -1, -1)]
    for bad in ("date:2026-13", "date:yesterday", "tier:"):
        with pytest.raises(QueryError):
            parse_query(bad)
    got = journal.get(page[0].id)
    assert got == page[0] and journal.latest_for("main", "shoot/img_007.jpg").reasons == (
        "uncertain edge",)
    journal.close()


def test_item_ids_name_items_never_paths():
    assert items.parse_id("o12") == items.ItemRef("output", row=12)
    tag = items.pair_tag("/srv/studio/in")  # a pair's key: its inbox path (or its name)
    assert len(tag) == 10 and tag != items.pair_tag("/srv/studio/in2")
    ref = items.parse_id(f"r{tag}-" + "a" * 40)
    assert (ref.kind, ref.tag, ref.key) == ("review", tag, "a" * 40)
    assert items.review_id("/srv/studio/in", type("I", (), {"id": "a" * 40})) == f"r{tag}-" + "a" * 40
    for bad in ("", "o", "../etc", f"r{tag}-" + "a" * 39, f"f{tag}-" + "g" * 40, "o1/..", "x12",
                "r1-" + "a" * 40, "r/srv/in-" + "a" * 40):  # an index or a path is no tag
        with pytest.raises(items.BadId):
            items.parse_id(bad)
    same = [FailedFile("main", "a.jpg", "unsupported", "not an image", 1.0),
            FailedFile("main", "b.jpg", "unsupported", "not an image", 2.0),
            FailedFile("main", "c.jpg", "undecodable", "truncated", 3.0)]
    groups = items.failure_groups(same)
    assert [len(g["files"]) for g in groups] == [2, 1] and groups[0]["reason"] == "unsupported"
    assert items.parse_id(items.failed_id(same[0])).key == items.failed_key("a.jpg")


def test_the_prefetcher_never_blocks_makes_one_at_a_time_at_the_lowest_priority(tmp_path):
    """``want`` returns at once even while a preview is being made and the queue is
    full (the extra file is dropped: made on first view instead); the files are made on
    one thread at nice 19, one at a time, and end up in the cache on disk."""
    import os
    import threading

    from PIL import Image

    from daemon.web.prefetch import Prefetcher
    from daemon.web.thumbs import Thumbnails

    for i in range(4):
        Image.new("RGB", (600, 400), (i * 40, 90, 200)).save(tmp_path / f"p{i}.jpg")
    release, running, seen = threading.Event(), [], []

    class Slow(Thumbnails):
        def _make(self, fh):
            running.append(1)
            seen.append((len(running), os.getpriority(os.PRIO_PROCESS,
                                                      threading.get_native_id())))
            release.wait(10)
            data = super()._make(fh)
            running.pop()
            return data

    previews = Slow(tmp_path / "previews", 64)
    pre = Prefetcher([previews], depth=2)
    pre.start()
    try:
        assert pre.want(tmp_path, Path("p0.jpg"))
        wait = time.monotonic() + 10
        while not running and time.monotonic() < wait:  # p0 is being made, held
            time.sleep(0.01)
        t0 = time.monotonic()
        assert pre.want(tmp_path, Path("p1.jpg")) and pre.want(tmp_path, Path("p2.jpg"))
        assert pre.want(tmp_path, Path("p1.jpg"))  # already waiting: not queued twice
        assert not pre.want(tmp_path, Path("p3.jpg"))  # queue full: dropped, not waited
        assert time.monotonic() - t0 < 0.5 and pre.dropped == 1
        release.set()
        assert pre.wait_idle(30)
    finally:
        pre.stop()
    assert pre.made == 3 and seen == [(1, 19)] * 3
    assert len(list((tmp_path / "previews").glob("*.webp"))) == 3
    assert previews.get(tmp_path, Path("p3.jpg"))  # the dropped one: made on request


def test_a_request_waits_for_the_file_being_made_but_not_for_long(tmp_path, monkeypatch):
    """A request for a preview the prefetcher is making gets that one (made once); if the
    making takes longer than ``WAIT_FOR_OTHER_S`` the request makes it itself."""
    import threading

    from PIL import Image

    from daemon.web import thumbs as thumbsmod

    Image.new("RGB", (300, 200), (10, 120, 200)).save(tmp_path / "a.jpg")
    monkeypatch.setattr(thumbsmod, "WAIT_FOR_OTHER_S", 0.3)
    started, release, makes = threading.Event(), threading.Event(), []

    class Held(thumbsmod.Thumbnails):
        def _make(self, fh):
            makes.append(threading.current_thread().name)
            if threading.current_thread().name == "prefetch":
                started.set()
                release.wait(10)
            return super()._make(fh)

    for slow in (False, True):
        makes.clear()
        started.clear()
        release.clear()
        maker = Held(tmp_path / f"previews-{slow}", 64)
        first = threading.Thread(target=maker.get, args=(tmp_path, Path("a.jpg")),
                                 name="prefetch")
        first.start()
        assert started.wait(10)
        if not slow:
            threading.Timer(0.05, release.set).start()  # done well within the wait
        got = maker.get(tmp_path, Path("a.jpg"))
        release.set()
        first.join(10)
        assert got and makes == (["prefetch", "MainThread"] if slow else ["prefetch"])


def test_a_journal_that_named_pairs_by_index_is_rekeyed_once(tmp_path):
    """Issue 26.2: rows of an older journal keep '#<index>' (no pair's key: they never act
    on the pair that now stands at that place); a name that looks like a number stays text."""
    import sqlite3

    path = tmp_path / "recent.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE recent (id INTEGER PRIMARY KEY, time REAL NOT NULL, "
               "pair INTEGER NOT NULL, source_root TEXT, source_rel TEXT NOT NULL, "
               "outputs TEXT NOT NULL, tier TEXT NOT NULL, model TEXT NOT NULL, ms REAL NOT NULL)")
    db.execute("INSERT INTO recent VALUES (1, 1.0, 0, 'inbox', 'a.jpg', '[\"a.jpg.png\"]', "
               "'miss', 'u2netp', 5.0)")
    db.commit()
    db.close()
    journal = Journal(path)
    [old] = journal.last(5)
    assert (old.pair, old.source_rel, old.event) == ("#0", "a.jpg", "delivered")
    assert journal.latest_for("0", "a.jpg") is None
    journal.add(RecentOutput(2.0, "0123", "inbox", "b.jpg", ("b.jpg.png",), "exact", "u2netp", 1.0))
    journal.close()
    again = Journal(path)  # opened again: nothing to rekey
    assert [o.pair for o in again.last(5)] == ["0123", "#0"]
    assert again.latest_for("0123", "b.jpg").source_rel == "b.jpg"
    again.close()
