"""Integration tests of `rembgd run` as a real process on real files (issue 4)."""
from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.helpers import encode, photo, write_config
from harness import Daemon, complete_pngs, wait_for

pytestmark = pytest.mark.slow


def synthetic(i: int, size: int = 256) -> bytes:
    """A distinct image per ``i``: a coloured disc and bars on a gradient."""
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:size, 0:size]
    bg = np.dstack([(xx * rng.uniform(0.2, 1)) % 256, (yy * rng.uniform(0.2, 1)) % 256,
                    np.full_like(xx, rng.integers(0, 255))]).astype(np.uint8)
    cx, cy, r = rng.integers(60, size - 60, 2).tolist() + [int(rng.integers(25, 55))]
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
    bg[disc] = rng.integers(0, 255, 3)
    bg[:, int(rng.integers(0, size - 8)):][:, :6] = rng.integers(0, 255, 3)
    return encode(bg, "JPEG", quality=90)


def chunked_write(path: Path, data: bytes, chunks: int, pause: float, reopen: bool = False) -> None:
    step = -(-len(data) // chunks)
    if reopen:  # open/append/close per chunk, like some SMB and FTP clients
        for i in range(0, len(data), step):
            with open(path, "ab") as fh:
                fh.write(data[i:i + step])
            time.sleep(pause)
        return
    with open(path, "wb") as fh:
        for i in range(0, len(data), step):
            fh.write(data[i:i + step])
            fh.flush()
            os.fsync(fh.fileno())
            time.sleep(pause)


def per_path(events: list[dict]) -> Counter:
    return Counter(e["path"] for e in events if e.get("outcome") not in ("retry",))


@pytest.fixture
def cfg(tmp_path, models_dir):
    return write_config(tmp_path, models_dir)


def test_chunked_write_processed_once_after_complete(tmp_path, cfg):
    data = encode(photo("chelsea"), "JPEG", quality=92)
    with Daemon(cfg) as d:
        chunked_write(tmp_path / "inbox" / "slow.jpg", data, chunks=6, pause=0.25)
        chunked_write(tmp_path / "inbox" / "reopened.jpg", synthetic(1), chunks=5, pause=0.2,
                      reopen=True)
        d.wait_processed(2)
        d.quiet()  # nothing else may happen afterwards
        done = per_path(d.processed())
    assert done == {str(tmp_path / "inbox" / "slow.jpg"): 1,
                    str(tmp_path / "inbox" / "reopened.jpg"): 1}, done
    assert not (tmp_path / "failed").exists()
    out = Image.open(tmp_path / "outbox" / "slow.jpg.png")
    assert out.mode == "RGBA" and out.size == (451, 300)


def test_rename_in_rsync_style(tmp_path, cfg):
    with Daemon(cfg) as d:
        tmp = tmp_path / "inbox" / ".coffee.jpg.Xy12ab"  # rsync's temp name
        tmp.write_bytes(encode(photo("coffee"), "JPEG"))
        d.quiet()  # the daemon must ignore the temp name meanwhile
        # nothing but the claims folder (this daemon's presence file, issue 28 case 5)
        assert [p.name for p in (tmp_path / "outbox").iterdir()] == [".rembgd-claims"]
        os.rename(tmp, tmp_path / "inbox" / "coffee.jpg")
        part = tmp_path / "inbox" / "rocket.jpg.part"
        part.write_bytes(encode(photo("rocket"), "JPEG"))
        os.rename(part, tmp_path / "inbox" / "rocket.jpg")
        d.wait_processed(2)
        d.quiet()
        assert sorted(per_path(d.processed()).values()) == [1, 1]
    assert sorted(p.name for p in complete_pngs(tmp_path / "outbox")) == \
        ["coffee.jpg.png", "rocket.jpg.png"]


def test_polling_mode_and_subfolders(tmp_path, models_dir):
    cfg = write_config(tmp_path, models_dir, observer="polling", poll_interval_s=0.3, settle_s=0.6)
    with Daemon(cfg) as d:
        assert d.wait_log(lambda e: e.get("event") == "watching")[0]["observer"] == "polling"
        sub = tmp_path / "inbox" / "shoot 1" / "day2"
        sub.mkdir(parents=True)
        chunked_write(sub / "a.jpg", synthetic(2), chunks=4, pause=0.3)
        chunked_write(sub / "a.png", encode(photo("astronaut"), "PNG"), chunks=4, pause=0.3)
        d.wait_processed(2)
        d.quiet()
        assert sorted(per_path(d.processed()).values()) == [1, 1]
    outs = complete_pngs(tmp_path / "outbox")
    assert sorted(p.relative_to(tmp_path / "outbox").as_posix() for p in outs) == \
        ["shoot 1/day2/a.jpg.png", "shoot 1/day2/a.png.png"]


def test_catch_up_scan_and_no_redo_after_restart(tmp_path, cfg):
    for i in range(3):
        (tmp_path / "inbox" / f"old{i}.jpg").write_bytes(synthetic(10 + i))
    with Daemon(cfg) as d:
        d.wait_processed(3)
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "outbox").iterdir()}
    with Daemon(cfg) as d:
        started = d.wait_log(lambda e: e.get("event") == "started")[0]
        assert started["catch_up"] == 0  # the catch-up scan found nothing to redo
        wait_for(lambda: (s := d.status()) and s.get("state") == "idle", timeout=30)
        assert d.processed() == []  # unchanged inputs are never redone
        (tmp_path / "inbox" / "old0.jpg").write_bytes(synthetic(99))  # a replaced file is redone
        d.wait_processed(1)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "outbox").iterdir()}
    assert after["old1.jpg.png"] == first["old1.jpg.png"]
    assert after["old0.jpg.png"] != first["old0.jpg.png"]


def test_broken_file_goes_to_failed_and_daemon_continues(tmp_path, cfg):
    with Daemon(cfg) as d:
        (tmp_path / "inbox" / "notes.jpg").write_text("this is not an image")
        d.wait_processed(1)
        (tmp_path / "inbox" / "good.jpg").write_bytes(synthetic(3))
        d.wait_processed(2)
    sidecar = json.loads((tmp_path / "failed" / "notes.jpg.error.json").read_text())
    assert sidecar["reason"] == "unsupported"
    assert sidecar["exception"].endswith("UnsupportedImage")
    assert "not a supported image" in sidecar["error"] and sidecar["time"]
    assert (tmp_path / "failed" / "notes.jpg").read_text() == "this is not an image"
    assert (tmp_path / "outbox" / "good.jpg.png").exists()


def test_event_storm_is_bounded_and_idle_cpu(tmp_path, cfg):
    with Daemon(cfg) as d:
        (tmp_path / "inbox" / "one.jpg").write_bytes(encode(photo("chelsea"), "JPEG"))
        d.wait_processed(1)
        d.quiet()
        events_after_work = d.status()["events_seen"]
        cpu0 = d.cpu_seconds()
        time.sleep(5)
        cpu = d.cpu_seconds() - cpu0
        events_idle = d.status()["events_seen"]
        assert len(d.processed()) == 1
    # rembg's own watch mode saw ~10,000 handler calls per second for one file
    assert events_after_work <= 12, events_after_work
    assert events_idle == events_after_work  # our own reads and writes trigger nothing
    assert cpu < 0.25, f"idle daemon used {cpu:.2f} s CPU in 5 s"


def test_sighup_reload_valid_and_invalid(tmp_path, cfg):
    with Daemon(cfg) as d:
        data = yaml.safe_load(cfg.read_text())
        out2 = tmp_path / "outbox2"
        out2.mkdir()
        data["watch"][0]["outbox"] = str(out2)
        cfg.write_text(yaml.safe_dump(data))
        d.signal(signal.SIGHUP)
        d.wait_log(lambda e: e.get("event") == "config_reloaded")
        (tmp_path / "inbox" / "a.jpg").write_bytes(synthetic(4))
        d.wait_processed(1)
        assert (out2 / "a.jpg.png").exists()

        cfg.write_text(cfg.read_text() + "\nnot_a_key: 1\n")
        d.signal(signal.SIGHUP)
        refused = d.wait_log(lambda e: e.get("event") == "config_reload_refused")[0]
        assert "not_a_key" in refused["error"] and str(cfg) in refused["error"]
        (tmp_path / "inbox" / "b.jpg").write_bytes(synthetic(5))
        d.wait_processed(2)  # still running on the old, valid config
        assert (out2 / "b.jpg.png").exists()


def test_sigterm_during_work_leaves_nothing_half_written(tmp_path, cfg):
    d = Daemon(cfg).start()
    try:
        for i in range(6):
            (tmp_path / "inbox" / f"s{i}.jpg").write_bytes(synthetic(20 + i))
        d.wait_log(lambda e: e.get("event") == "processed")
        d.signal(signal.SIGTERM)
        assert d.proc.wait(timeout=60) == 0
    finally:
        d.__exit__()
    assert any(e.get("event") == "stopped" for e in d.events())
    outs = complete_pngs(tmp_path / "outbox")
    hidden = [p for p in (tmp_path / "outbox").iterdir() if p.name.startswith(".")]
    assert all(p.name in (".rembgd-claims", ".rembgd-ledger") for p in hidden), hidden  # no temps
    assert not list((tmp_path / "outbox" / ".rembgd-claims").glob("*")), "a clean stop drops its claims"
    # what was not done is picked up by the next start
    with Daemon(cfg) as d2:
        d2.wait_processed(6 - len(outs))
    assert len(complete_pngs(tmp_path / "outbox")) == 6


def test_kill9_mid_batch_then_restart_exactly_once(tmp_path, models_dir):
    cfg = write_config(tmp_path, models_dir)
    data = yaml.safe_load(cfg.read_text())
    data["watch"][0]["after_success"] = "move"
    cfg.write_text(yaml.safe_dump(data))
    names = [f"k{i}.jpg" for i in range(10)]
    for i, name in enumerate(names):
        (tmp_path / "inbox" / name).write_bytes(synthetic(40 + i))
    d1 = Daemon(cfg, log=tmp_path / "run1.log").start()
    try:
        d1.wait_processed(3)
        d1.kill9()
    finally:
        d1.__exit__()
    complete_pngs(tmp_path / "outbox")  # nothing partial is visible after the crash
    d2 = Daemon(cfg, log=tmp_path / "run2.log")
    with d2:
        wait_for(lambda: len(list((tmp_path / "done").glob("*.jpg"))) == 10, timeout=90)
        d2.quiet()
    done = per_path(d1.processed()) + per_path(d2.processed())
    assert all(n == 1 for n in done.values()), done  # nothing processed twice
    assert len(done) <= 10
    assert sorted(p.name for p in complete_pngs(tmp_path / "outbox")) == sorted(n + ".png" for n in names)
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == sorted(names)
    assert not list((tmp_path / "inbox").iterdir())


def test_status_command_and_counters(tmp_path, cfg):
    with Daemon(cfg) as d:
        img = encode(photo("coffee"), "JPEG")
        (tmp_path / "inbox" / "a.jpg").write_bytes(img)
        d.wait_processed(1)
        (tmp_path / "inbox" / "b.jpg").write_bytes(img)
        d.wait_processed(2)
        st = wait_for(lambda: (s := d.status()) and s["counters"].get("exact")
                      and s["line"].startswith("idle") and s)
        assert st["running"] and st["pid"] == d.proc.pid
        assert st["counters"]["miss"] == 1 and st["counters"]["exact"] == 1
        assert st["line"].startswith("idle; since start: 1 hits / 1 misses")
        assert d.stop() == 0
    st = json.loads((tmp_path / "cache" / "status.json").read_text())
    assert st["state"] == "stopped"


def test_burst_of_1000_files_bounded_memory_and_progress(tmp_path, models_dir):
    cfg = write_config(tmp_path, models_dir, progress_interval_s=1.0, queue_size=64)
    img = encode(photo("coffee"), "JPEG", quality=85)
    with Daemon(cfg) as d:
        (tmp_path / "inbox" / "first.jpg").write_bytes(img)
        d.wait_processed(1)
        import psutil

        rss0 = psutil.Process(d.proc.pid).memory_info().rss
        burst = tmp_path / "inbox" / "burst"
        staging = tmp_path / "staging"
        staging.mkdir()
        for i in range(1000):  # written elsewhere, then moved in at once
            (staging / f"{i:04d}.jpg").write_bytes(img)
        os.rename(staging, burst)
        d.wait_processed(1001, timeout=240)
        rss1 = psutil.Process(d.proc.pid).memory_info().rss
        progress = [e for e in d.events() if e.get("event") == "progress"]
    outs = list((tmp_path / "outbox" / "burst").iterdir())
    assert len(outs) == 1000
    assert progress, "a burst must report progress in the logs"
    assert {"queued", "done", "hits", "misses"} <= set(progress[-1])
    assert progress[-1]["done"] >= progress[0]["done"]
    growth = (rss1 - rss0) / 2**20
    assert growth < 80, f"RSS grew by {growth:.0f} MiB over a 1000-file burst"


def test_after_success_delete(tmp_path, models_dir):
    cfg = write_config(tmp_path, models_dir)
    data = yaml.safe_load(cfg.read_text())
    data["watch"][0]["after_success"] = "delete"
    cfg.write_text(yaml.safe_dump(data))
    with Daemon(cfg) as d:
        (tmp_path / "inbox" / "gone.jpg").write_bytes(synthetic(7))
        d.wait_processed(1)
        wait_for(lambda: not (tmp_path / "inbox" / "gone.jpg").exists(), timeout=10)
    assert (tmp_path / "outbox" / "gone.jpg.png").exists()


def test_copied_in_file_is_queued_once(tmp_path, cfg):
    """created/modified + closed-after-write for one copy must not queue it twice."""
    with Daemon(cfg) as d:
        for i in range(2):
            (tmp_path / "inbox" / f"c{i}.jpg").write_bytes(synthetic(60 + i))
        d.wait_processed(2)
        d.quiet()  # a stale settle check would fire by now
        assert d.stop() == 0
    stopped = [e for e in d.events() if e.get("event") == "stopped"][-1]
    assert stopped.get("queued_total") == 2, stopped
    assert "up_to_date" not in stopped and "claimed_elsewhere" not in stopped
