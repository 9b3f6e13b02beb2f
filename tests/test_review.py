"""Review routing and its actions: real files, real images, real daemons."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from daemon import review, verdict
from daemon.config import WatchPair
from daemon.config.schema import ReviewConfig
from daemon.nofollow import LinkedPathError, atomic_write_under
from tests.helpers import encode, photo, write_config
from tests.test_confidence import bottle_shape, busy_shot, coverage, studio_shot


def _pair(tmp_path: Path, after_success: str = "keep") -> WatchPair:
    for d in ("inbox", "outbox"):
        (tmp_path / d).mkdir(exist_ok=True)
    return WatchPair(tmp_path / "inbox", tmp_path / "outbox", tmp_path / "failed",
                     tmp_path / "done", after_success=after_success,
                     review=ReviewConfig(min_confidence=0.5))


def _held(pair: WatchPair, rel: str = "shoot/cat.jpg", confidence: float = 0.2
          ) -> review.ReviewItem:
    """A source in the inbox whose cutout is held for review (as the daemon leaves it)."""
    src = pair.inbox / rel
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(encode(photo("chelsea")))
    out = Path(rel).with_suffix(".jpg.png")
    atomic_write_under(review.review_dir(pair), out, encode(photo("chelsea"), "PNG"))
    item = review.new_item(str(pair.inbox), Path(rel), [out], confidence,
                           ("uncertain alpha over 40% of the subject's area",), "u2netp", "miss",
                           sha256=hashlib.sha256(src.read_bytes()).hexdigest())
    review.hold(review.review_dir(pair), item)
    return item


def _visible(folder: Path) -> list[Path]:
    """What a photographer sees in a folder (the claims folder is rembgd's own)."""
    return [p for p in folder.iterdir() if not p.name.startswith(".")]


def test_the_review_folder_defaults_beside_the_outbox(tmp_path):
    pair = _pair(tmp_path)
    assert review.review_dir(pair) == tmp_path / "review"
    custom = WatchPair(pair.inbox, pair.outbox, pair.failed_dir, pair.done_dir,
                       review=ReviewConfig(dir=tmp_path / "qa"))
    assert review.review_dir(custom) == tmp_path / "qa"


def test_a_held_item_is_listed_with_its_score_and_reasons(tmp_path):
    pair = _pair(tmp_path)
    item = _held(pair)
    sidecar = tmp_path / "review" / ".rembgd-review" / f"{item.key}.json"
    record = json.loads(sidecar.read_text())
    assert record["confidence"] == 0.2 and record["source_rel"] == "shoot/cat.jpg"
    assert record["reasons"] == ["uncertain alpha over 40% of the subject's area"]
    assert record["sha256"] == hashlib.sha256((pair.inbox / "shoot/cat.jpg").read_bytes()
                                              ).hexdigest()  # what the cutout was made from
    assert review.list_items(review.review_dir(pair)) == [item]
    # the id names this hold: the source's key, then this hold's content and time
    assert item.id.startswith(review.source_key(Path("shoot/cat.jpg"))) and len(item.id) == 40


def test_approve_moves_the_outputs_to_the_outbox_and_applies_after_success(tmp_path):
    pair = _pair(tmp_path, after_success="move")
    item = _held(pair)
    held = tmp_path / "review" / "shoot" / "cat.jpg.png"
    data, ino = held.read_bytes(), held.stat().st_ino
    moved = verdict.approve(pair, item.id)
    assert moved == [pair.outbox / "shoot" / "cat.jpg.png"]
    assert moved[0].read_bytes() == data and moved[0].stat().st_ino == ino  # renamed, not copied
    assert not held.exists() and review.list_items(review.review_dir(pair)) == []
    assert not (pair.inbox / "shoot" / "cat.jpg").exists()
    assert (pair.done_dir / "shoot" / "cat.jpg").is_file()  # after_success: move


def test_approve_with_keep_leaves_the_source(tmp_path):
    pair = _pair(tmp_path)
    item = _held(pair)
    verdict.approve(pair, item.id)
    assert (pair.inbox / "shoot" / "cat.jpg").is_file()
    assert (pair.outbox / "shoot" / "cat.jpg.png").is_file()


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "..", "a" * 40,
                                 "0123456789abcdef0123456789abcdef0123456/"])
def test_an_id_that_is_not_an_item_is_refused(tmp_path, bad):
    pair = _pair(tmp_path)
    _held(pair)
    with pytest.raises(review.NotFound):
        verdict.approve(pair, bad)
    with pytest.raises(review.NotFound):
        verdict.redo(pair, bad, "u2net", lambda *_: pytest.fail("submitted"))
    assert _visible(pair.outbox) == []


def test_a_sidecar_naming_a_path_outside_the_review_folder_is_refused(tmp_path):
    pair = _pair(tmp_path)
    item = _held(pair)
    sidecar = tmp_path / "review" / ".rembgd-review" / f"{item.key}.json"
    record = json.loads(sidecar.read_text())
    record["outputs"] = ["../inbox/shoot/cat.jpg"]
    sidecar.write_text(json.dumps(record))
    with pytest.raises(review.ReviewError):
        verdict.approve(pair, item.id)
    assert (pair.inbox / "shoot" / "cat.jpg").is_file() and _visible(pair.outbox) == []


def test_a_link_in_the_review_folder_is_never_followed(tmp_path):
    pair = _pair(tmp_path)
    item = _held(pair)
    elsewhere = tmp_path / "elsewhere"
    os.rename(tmp_path / "review" / "shoot", elsewhere)
    os.symlink(elsewhere, tmp_path / "review" / "shoot")
    with pytest.raises(LinkedPathError):
        verdict.approve(pair, item.id)
    assert (elsewhere / "cat.jpg.png").is_file() and _visible(pair.outbox) == []


def test_redo_submits_the_source_with_the_model(tmp_path):
    pair = _pair(tmp_path)
    item = _held(pair)
    assert verdict.redo(pair, item.id, "u2net", lambda path, model: (path, model)) == \
        (pair.inbox / "shoot" / "cat.jpg", "u2net")
    (pair.inbox / "shoot" / "cat.jpg").unlink()
    with pytest.raises(review.ReviewError, match="no longer in"):
        verdict.redo(pair, item.id, "u2net", lambda *_: pytest.fail("submitted"))


# ------------------------------------------------------------------ in the daemon


@pytest.fixture
def svc(tmp_path, models_dir, shared_engines):
    """A real Supervisor (no threads) over a pair with review on and after_success: move."""
    from daemon import config as configmod
    from daemon.service.app import App
    from daemon.service.supervisor import Supervisor

    path = write_config(tmp_path, models_dir, watch=[{
        "inbox": str(tmp_path / "inbox"), "outbox": str(tmp_path / "outbox"),
        "after_success": "move", "review": {}}])
    cfg = configmod.load(path)
    s = Supervisor(cfg, engines=shared_engines)
    s.app = App.build(cfg, engines=shared_engines)
    yield s
    s.app.close()


def _drop_shots(inbox: Path) -> tuple[Path, Path]:
    alpha = coverage(bottle_shape)
    clean, busy = inbox / "clean.png", inbox / "busy.png"
    clean.write_bytes(encode(studio_shot(alpha), "PNG"))
    busy.write_bytes(encode(busy_shot(alpha), "PNG"))
    return clean, busy


def test_a_low_confidence_cutout_is_held_for_review_and_approved(svc, tmp_path):
    from daemon.service.intake import WorkItem

    pair = svc.cfg.watch[0]
    clean, busy = _drop_shots(pair.inbox)
    assert svc.intake.process(WorkItem(svc.cfg.watch[0].key, clean)) == "miss"
    assert (pair.outbox / "clean.png.png").is_file() and (pair.done_dir / "clean.png").is_file()

    assert svc.intake.process(WorkItem(svc.cfg.watch[0].key, busy)) == "review"
    held = tmp_path / "review" / "busy.png.png"
    assert held.is_file() and not (pair.outbox / "busy.png.png").exists()
    assert busy.is_file()  # not disposed of while under review
    [item] = review.list_items(review.review_dir(pair))
    assert item.source_rel == "busy.png" and item.outputs == ("busy.png.png",)
    assert item.confidence < ReviewConfig().min_confidence and item.reasons
    assert (item.model, item.tier) == ("u2netp", "miss")
    assert svc.rescan(immediate=True) == 1  # after_success: move: the intake looks again
    assert svc.intake.process(svc.workers.queue.get_nowait()) == "under_review"
    assert busy.is_file()  # left for the reviewer

    data = held.read_bytes()
    assert verdict.approve(pair, item.id) == [pair.outbox / "busy.png.png"]
    assert (pair.outbox / "busy.png.png").read_bytes() == data
    assert not busy.exists() and (pair.done_dir / "busy.png").is_file()  # after_success
    assert review.list_items(review.review_dir(pair)) == []


def test_redo_delivers_to_the_outbox_and_drops_the_item(svc, tmp_path):
    from daemon.service.intake import WorkItem

    pair = svc.cfg.watch[0]
    _, busy = _drop_shots(pair.inbox)
    assert svc.intake.process(WorkItem(svc.cfg.watch[0].key, busy)) == "review"
    [item] = review.list_items(review.review_dir(pair))
    # as the web page's Redo does, but processed here and now rather than queued
    assert verdict.redo(pair, item.id, "u2netp", lambda path, model: svc.intake.process(
        WorkItem(pair.key, path, model=model))) == "exact"  # delivered whatever its score
    assert (pair.outbox / "busy.png.png").is_file() and (pair.done_dir / "busy.png").is_file()
    assert review.list_items(review.review_dir(pair)) == []
    assert not (tmp_path / "review" / "busy.png.png").exists()


def test_the_status_line_counts_cutouts_held_for_review():
    from daemon.service.status import status_line

    line = status_line("idle", {"exact": 1, "miss": 2, "review": 3, "failed": 1}, 0)
    assert line == "idle; since start: 1 hits / 2 misses, 3 held for review, 1 failed"
    assert status_line("busy", {"miss": 1}, 4) == "busy; since start: 0 hits / 1 misses; 4 queued now"


def test_an_unreadable_sidecar_leaves_the_source_for_the_reviewer(tmp_path):
    """Delivering a source whose held sidecar is garbage never crashes the worker: the
    source still counts as waiting, and the delivery logs that it could not drop it."""
    from daemon.fate import Outcome, finish
    from daemon.source import Source

    pair = _pair(tmp_path)
    item = _held(pair)
    (tmp_path / "review" / ".rembgd-review" / f"{item.key}.json").write_text("{not json")
    assert review.is_waiting(review.review_dir(pair), Path("shoot/cat.jpg"))
    source = Source.for_pair(pair, Path("shoot/cat.jpg"))
    assert finish(Outcome(source, "miss")).kind == "miss"
