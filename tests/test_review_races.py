"""Approve, Redo and the job on one source: one owner at a time (issue 28, case 4).

Real functions on real files and a real Supervisor's intake (no worker threads):
races are started from a barrier, never timed with sleeps, and each is run 20
times."""
from __future__ import annotations

import hashlib
import shutil
import threading
from pathlib import Path

import pytest

from daemon import review, verdict
from daemon.imaging.stamp import read_stamp
from daemon.nofollow import atomic_write_under
from daemon.service.intake import WorkItem
from tests.helpers import encode, photo
from tests.test_review import _drop_shots, _held, _pair, _visible, svc  # noqa: F401 (fixture)

ROUNDS = 20


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stamp(path: Path) -> str | None:
    with open(path, "rb") as fh:
        return read_stamp(fh)


def _attempt(action):
    """What ``action`` returned, or the exception it raised."""
    try:
        return action()
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc


def _race(*actions):
    """Run each action on its own thread, released together by one barrier."""
    barrier = threading.Barrier(len(actions))
    results: list = [None] * len(actions)

    def go(i, action):
        barrier.wait()
        results[i] = _attempt(action)

    threads = [threading.Thread(target=go, args=(i, a)) for i, a in enumerate(actions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# ------------------------------------------------------------------ Approve alone


def test_approve_refuses_a_source_that_is_not_the_held_one(tmp_path):
    """The issue's reproduction: `mv chelsea.jpg in/a.jpg`, then Approve at once, with
    after_success: delete. Nothing is delivered and the new photo stays."""
    pair = _pair(tmp_path, after_success="delete")
    item = _held(pair, rel="a.jpg")
    (tmp_path / "chelsea.jpg").write_bytes(encode(photo("coffee")))  # any other photo
    (tmp_path / "chelsea.jpg").rename(pair.inbox / "a.jpg")
    with pytest.raises(review.ReviewError, match="not the file its cutout was made from"):
        verdict.approve(pair, item.id)
    assert (pair.inbox / "a.jpg").read_bytes() == encode(photo("coffee"))  # not deleted
    assert _visible(pair.outbox) == [] and review.list_items(review.review_dir(pair)) == [item]


def test_approve_of_a_replaced_cutout_is_refused(tmp_path):
    """Replace then re-hold: the id the reviewer saw names the first cutout, never the
    one that waits now."""
    pair = _pair(tmp_path)
    first = _held(pair, rel="a.jpg")
    second = _held(pair, rel="a.jpg", confidence=0.3)  # the same source, held again
    assert first.id != second.id and first.key == second.key
    with pytest.raises(review.Replaced, match="replaced by a newer one"):
        verdict.approve(pair, first.id)
    assert _visible(pair.outbox) == []
    assert verdict.approve(pair, second.id) == [pair.outbox / "a.jpg.png"]


def test_approve_moves_every_deliverable_or_none(tmp_path):
    pair = _pair(tmp_path, after_success="move")
    src = pair.inbox / "a.jpg"
    src.write_bytes(encode(photo("chelsea")))
    folder = review.review_dir(pair)
    outs = [Path("master/a.jpg.png"), Path("web/a.jpg.webp")]
    for out in outs:
        atomic_write_under(folder, out, b"a held cutout")
    pair.outbox.joinpath("master").mkdir()
    pair.outbox.joinpath("web").mkdir()
    item = review.new_item(str(pair.inbox), Path("a.jpg"), outs, 0.2, (), "u2netp", "miss",
                           sha256=_sha(src))
    review.hold(folder, item)
    (folder / "web" / "a.jpg.webp").unlink()
    with pytest.raises(review.ReviewError, match="web/a.jpg.webp is missing"):
        verdict.approve(pair, item.id)
    assert (folder / "master" / "a.jpg.png").is_file()  # not half a set in the outbox
    assert not (pair.outbox / "master" / "a.jpg.png").exists()
    assert src.is_file() and review.list_items(folder) == [item]


def test_an_approval_cut_short_is_finished_only_with_this_items_outputs(tmp_path):
    """An output already in the outbox counts as moved only when its stamp names the held
    source: an older delivery of another content does not."""
    from daemon.imaging.stamp import stamp

    pair = _pair(tmp_path)
    item = _held(pair, rel="a.jpg")
    held = review.review_dir(pair) / "a.jpg.png"
    old = stamp(held.read_bytes(), "png", "ab" * 32)
    held.unlink()
    (pair.outbox / "a.jpg.png").write_bytes(old)
    with pytest.raises(review.ReviewError, match="missing"):
        verdict.approve(pair, item.id)
    (pair.outbox / "a.jpg.png").write_bytes(stamp(old, "png", item.sha256))
    assert verdict.approve(pair, item.id) == [pair.outbox / "a.jpg.png"]


# ------------------------------------------------------------------ races, 20 times


def test_approve_racing_a_replace_never_deletes_the_new_photo(tmp_path):
    for i in range(ROUNDS):
        (tmp_path / str(i)).mkdir()
        pair = _pair(tmp_path / str(i), after_success="delete")
        item = _held(pair, rel="a.jpg")
        new = tmp_path / str(i) / "new.jpg"
        new.write_bytes(encode(photo("coffee")))
        approved, _ = _race(lambda: verdict.approve(pair, item.id),
                            lambda: new.rename(pair.inbox / "a.jpg"))
        # whichever came first, the new photo is in the inbox, unprocessed and whole
        assert (pair.inbox / "a.jpg").read_bytes() == encode(photo("coffee")), (i, approved)
        if isinstance(approved, Exception):
            assert isinstance(approved, review.ReviewError), approved
            assert _visible(pair.outbox) == []
        else:
            assert approved == [pair.outbox / "a.jpg.png"]


def test_approve_racing_approve_delivers_once(tmp_path):
    for i in range(ROUNDS):
        (tmp_path / str(i)).mkdir()
        pair = _pair(tmp_path / str(i), after_success="move")
        item = _held(pair, rel="a.jpg")
        results = _race(*[lambda: verdict.approve(pair, item.id)] * 3)
        assert sum(r == [pair.outbox / "a.jpg.png"] for r in results) == 1, results
        assert all(isinstance(r, (review.NotFound, verdict.Busy)) for r in results
                   if isinstance(r, Exception)), results
        assert (pair.outbox / "a.jpg.png").is_file() and (pair.done_dir / "a.jpg").is_file()


def _hold_for_redo(svc, name: str, shot: bytes, cutout: bytes) -> review.ReviewItem:
    """``name`` in the inbox, its cutout held (as the daemon holds one: same bytes, same
    sidecar); the redo renders it from the cache (an exact hit)."""
    pair = svc.cfg.watch[0]
    src = pair.inbox / name
    src.write_bytes(shot)
    atomic_write_under(review.review_dir(pair), Path(name + ".png"), cutout)
    item = review.new_item(str(pair.inbox), Path(name), [Path(name + ".png")], 0.2, (),
                           "u2netp", "miss", sha256=_sha(src))
    review.hold(review.review_dir(pair), item)
    return item


def _delivered_once(svc, name: str, shot: bytes) -> None:
    """Every output of ``name`` in the outbox, stamped with its source; the source in
    done/; nothing left in the inbox or the review folder."""
    pair = svc.cfg.watch[0]
    out = pair.outbox / (name + ".png")
    assert out.is_file(), f"{name}: the outputs were lost"
    assert _stamp(out) == hashlib.sha256(shot).hexdigest()
    assert (pair.done_dir / name).read_bytes() == shot
    assert not (pair.inbox / name).exists()
    assert not (review.review_dir(pair) / (name + ".png")).exists()
    assert review.waiting(review.review_dir(pair), Path(name)) is None


def test_redo_then_approve_never_loses_the_outputs(svc, tmp_path):
    """The issue's reproduction (after_success: move): Redo, then Approve at once. Either
    Approve comes first (the redo is cancelled) or it is refused while the redo runs (the
    redo delivers); the outputs are in the outbox either way."""
    pair = svc.cfg.watch[0]
    _, busy = _drop_shots(pair.inbox)
    assert svc.intake.process(WorkItem(pair.key, busy)) == "review"
    shot = (pair.inbox / "busy.png").read_bytes()
    cutout = (review.review_dir(pair) / "busy.png.png").read_bytes()
    seen = set()
    for i in range(ROUNDS):
        name = f"busy{i}.png"
        item = _hold_for_redo(svc, name, shot, cutout)
        redo, approve = _race(
            lambda: verdict.redo(pair, item.id, "u2netp", lambda path, model: svc.intake.process(
                WorkItem(pair.key, path, model=model))),
            lambda: verdict.approve(pair, item.id, claim=svc.intake.claim))
        assert not isinstance(redo, Exception) or isinstance(redo, review.NotFound), redo
        assert not isinstance(approve, Exception) or isinstance(
            approve, (verdict.Busy, review.NotFound)), approve
        seen.add((str(redo), type(approve).__name__))
        _delivered_once(svc, name, shot)
    print("interleavings seen:", sorted(seen))


def test_approve_while_the_redo_job_runs_is_refused(svc, monkeypatch):
    """Deterministic: Approve arrives while the redo job renders (the interleaving that
    lost everything in 6 of 6 runs). It is refused, and the redo delivers."""
    pair = svc.cfg.watch[0]
    _, busy = _drop_shots(pair.inbox)
    assert svc.intake.process(WorkItem(pair.key, busy)) == "review"
    [item] = review.list_items(review.review_dir(pair))
    shot = busy.read_bytes()
    answers = []
    real = svc.app.pipeline.render

    def render_then_approve(data, plan):
        rendered = real(data, plan)
        t = threading.Thread(target=lambda: answers.append(_attempt(
            lambda: verdict.approve(pair, item.id, claim=svc.intake.claim))))
        t.start()
        t.join()
        return rendered

    monkeypatch.setattr(svc.app.pipeline, "render", render_then_approve)
    assert verdict.redo(pair, item.id, "u2netp", lambda path, model: svc.intake.process(
        WorkItem(pair.key, path, model=model))).tier is not None
    assert len(answers) == 1 and isinstance(answers[0], verdict.Busy), answers
    assert "being processed" in str(answers[0])
    _delivered_once(svc, "busy.png", shot)


def test_a_redo_after_approve_is_cancelled(svc):
    pair = svc.cfg.watch[0]
    _, busy = _drop_shots(pair.inbox)
    assert svc.intake.process(WorkItem(pair.key, busy)) == "review"
    [item] = review.list_items(review.review_dir(pair))
    shot = busy.read_bytes()
    queued = verdict.redo(pair, item.id, "u2netp", lambda path, model: WorkItem(
        pair.key, path, model=model))  # queued, not yet run
    verdict.approve(pair, item.id, claim=svc.intake.claim)
    shutil.copy(pair.done_dir / "busy.png", busy)  # even with the source back in place
    assert svc.intake.process(queued) == "skipped"  # the redo is cancelled
    assert (pair.outbox / "busy.png.png").is_file() and _stamp(
        pair.outbox / "busy.png.png") == hashlib.sha256(shot).hexdigest()


# ------------------------------------------------------------ the runs, on a daemon

TOKEN = "a-token-for-the-race-tests-0123456789"


def _post(url: str, path: str, form: dict) -> tuple[int, str]:
    """A POST as a bearer client (the page's buttons send the same form)."""
    import http.client
    from urllib.parse import urlencode, urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("POST", path, body=urlencode(form).encode(), headers={
        "Content-Type": "application/x-www-form-urlencoded",
        "Authorization": f"Bearer {TOKEN}"})
    resp = conn.getresponse()
    body = resp.read().decode(errors="replace")
    conn.close()
    return resp.status, body


def _daemon(tmp_path: Path, models_dir: Path, after_success: str):
    from tests.helpers import write_config
    from tests.harness import Daemon

    # a redo that found the source claimed by an Approve is queued again at claim_ttl_s / 2
    config = write_config(tmp_path, models_dir, web={"listen": "127.0.0.1:0", "token": TOKEN},
                          store={"claim_ttl_s": 4},
                          watch=[{"inbox": str(tmp_path / "inbox"),
                                  "outbox": str(tmp_path / "outbox"),
                                  "after_success": after_success,
                                  "review": {"min_confidence": 1.0}}])  # every cutout is held
    return Daemon(config)


def _url(daemon) -> str:
    return daemon.wait_log(lambda e: e.get("event") == "web_listening", timeout=30)[0]["url"]


def _wait_held(daemon, folder: Path, rel: str, count: int) -> review.ReviewItem:
    from tests.harness import wait_for

    daemon.wait_log(lambda e: e.get("event") == "review_held" and e.get("source") == rel,
                    count=count, timeout=90)
    return wait_for(lambda: review.waiting(folder, Path(rel)))


@pytest.mark.slow
def test_on_a_daemon_redo_then_approve_at_once_keeps_the_outputs(tmp_path, models_dir):
    """Issue 28 case 4, as filed (6 of 6 runs lost everything): after_success: move, the
    photo held, POST Redo then at once POST Approve."""
    from tests.harness import wait_for

    daemon = _daemon(tmp_path, models_dir, "move")
    folder = tmp_path / "review"
    answers = []
    with daemon:
        url = _url(daemon)
        for i in range(6):
            name = f"r{i}.jpg"
            shot = encode(photo("chelsea")[i:, 2 * i:])  # another photo each round
            (tmp_path / "inbox" / name).write_bytes(shot)
            item = _wait_held(daemon, folder, name, 1)
            pair = str(tmp_path / "inbox")  # its key: the inbox path (no name)
            redo = _post(url, "/redo", {"pair": pair, "item": item.id, "model": "u2netp"})
            approve = _post(url, "/approve", {"pair": pair, "item": item.id})
            answers.append((redo[0], approve[0]))
            assert redo[0] == 303 and approve[0] in (303, 409), (redo, approve)
            if approve[0] == 409:
                assert "being processed" in approve[1], approve
            out = tmp_path / "outbox" / f"{name}.png"
            wait_for(lambda: (tmp_path / "done" / name).is_file() and out.is_file(), timeout=60)
            daemon.quiet()
            assert out.is_file() and _stamp(out) == hashlib.sha256(shot).hexdigest()
            assert not (tmp_path / "inbox" / name).exists()
            assert review.waiting(folder, Path(name)) is None
    events = daemon.events()
    assert not [e for e in events if e.get("outcome") == "withdrawn"]
    print("(redo, approve) answers:", answers)


@pytest.mark.slow
def test_on_a_daemon_approve_after_the_source_was_replaced_is_refused(tmp_path, models_dir):
    """Issue 28 case 4, as filed: after_success: delete; coffee held as a.jpg; `mv chelsea.jpg
    in/a.jpg`, then at once POST Approve. Refused; chelsea is processed, never deleted
    unprocessed, and coffee's cutout is never delivered."""
    daemon = _daemon(tmp_path, models_dir, "delete")
    folder = tmp_path / "review"
    coffee, chelsea = encode(photo("coffee")), encode(photo("chelsea"))
    with daemon:
        url = _url(daemon)
        (tmp_path / "inbox" / "a.jpg").write_bytes(coffee)
        item = _wait_held(daemon, folder, "a.jpg", 1)
        assert item.sha256 == hashlib.sha256(coffee).hexdigest()
        (tmp_path / "chelsea.jpg").write_bytes(chelsea)
        (tmp_path / "chelsea.jpg").rename(tmp_path / "inbox" / "a.jpg")
        status, body = _post(url, "/approve", {"pair": str(tmp_path / "inbox"),
                                               "item": item.id})
        # refused, saying why: the new photo is being processed, or is not the held one
        assert status == 409 and ("not the file its cutout was made from" in body
                                  or "being processed" in body), (status, body)
        again = _wait_held(daemon, folder, "a.jpg", 2)  # chelsea, processed and held
        daemon.quiet()
    assert again.sha256 == hashlib.sha256(chelsea).hexdigest() and again.id != item.id
    assert (tmp_path / "inbox" / "a.jpg").read_bytes() == chelsea
    assert not (tmp_path / "outbox" / "a.jpg.png").exists()


@pytest.mark.parametrize("backend", ["flock", "redis"])
def test_approve_waits_for_the_sources_owner_on_both_lock_backends(tmp_path, backend, request):
    """Another daemon (its own lock backend: flocks in its own cache folder, or the shared
    Redis) holds the source's claim: Approve is refused and nothing moves; once released,
    Approve goes through."""
    from daemon.coord.claims import claim_source
    from daemon.coord.locks import FlockLocks, open_locks
    from daemon.source import Source

    if backend == "flock":
        mine, theirs = FlockLocks(tmp_path / "a" / "locks"), FlockLocks(tmp_path / "b" / "locks")
    else:
        from tests.test_locks import redis_store_cfg

        prefix = request.getfixturevalue("redis_prefix")
        mine, theirs = (open_locks(redis_store_cfg(tmp_path, prefix), tmp_path / d)
                        for d in ("a", "b"))
    pair = _pair(tmp_path, after_success="move")
    item = _held(pair, rel="a.jpg")
    owner = claim_source(theirs, Source.for_pair(pair, Path("a.jpg")))
    assert owner is not None
    for _ in range(ROUNDS):
        with pytest.raises(verdict.Busy, match="being processed"):
            verdict.approve(pair, item.id, claim=lambda s: claim_source(mine, s))
    assert _visible(pair.outbox) == [] and (pair.inbox / "a.jpg").is_file()
    owner.release()
    assert verdict.approve(pair, item.id, claim=lambda s: claim_source(mine, s)) == \
        [pair.outbox / "a.jpg.png"]
    assert (pair.done_dir / "a.jpg").is_file()
    mine.close()
    theirs.close()
