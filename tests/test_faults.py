"""Faults and security (issue 8): disk full, cache problems, kill -9, containment.

Real faults where this machine allows them, injected ones where it does not:

* disk full: a tiny tmpfs mounted on the outbox (needs root and mount rights;
  skipped otherwise) and, always, ENOSPC injected in-process from ``fsync``
  of outbox files (file systems such as NFS report ENOSPC only there);
* read-only cache: a read-only bind mount of the cache folder (as root,
  ``chmod`` would not stop the daemon); where mounts are not allowed, the
  index path is made a folder instead, which SQLite cannot open either;
* corrupt cache: garbage written over the SQLite index;
* kill -9: a real daemon killed at 20 seeded random points of one batch.
"""
from __future__ import annotations

import errno
import hashlib
import math
import os
import random
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from tests.helpers import encode, write_config
from harness import ROOT, Daemon, complete_pngs, wait_for

pytestmark = pytest.mark.slow


def picture(seed: int, w: int = 160, h: int = 120) -> bytes:
    """A distinct image per seed (a random mosaic with a disc): never a near-duplicate."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 255, (h // 20 + 1, w // 20 + 1, 3), dtype=np.uint8)
    img = np.repeat(np.repeat(blocks, 20, 0), 20, 1)[:h, :w].copy()
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = int(rng.integers(40, w - 40)), int(rng.integers(40, h - 40))
    img[(xx - cx) ** 2 + (yy - cy) ** 2 < 900] = rng.integers(0, 255, 3)
    return encode(img, "JPEG", quality=90)


def drop(inbox: Path, name: str, data: bytes) -> Path:
    """Write beside the inbox, then rename in: the file appears complete."""
    tmp = inbox.parent / f".drop-{name}"
    tmp.write_bytes(data)
    os.rename(tmp, inbox / name)
    return inbox / name


def run_cmd(*args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(args), capture_output=True, text=True)
    except FileNotFoundError as exc:  # no such tool here
        return subprocess.CompletedProcess(list(args), 127, "", str(exc))


@contextmanager
def mount(target: Path, *how: str):
    """Mount something on ``target`` for the duration; skip the test if not permitted."""
    r = run_cmd("mount", *how, str(target))
    if r.returncode != 0:
        pytest.skip(f"mount {' '.join(how)} not permitted here: {r.stderr.strip()}")
    try:
        yield
    finally:
        run_cmd("umount", "-l", str(target))


def read_only_bind(target: Path) -> bool:
    """Make ``target`` read-only in place (bind mount onto itself, remounted ro)."""
    if run_cmd("mount", "--bind", str(target), str(target)).returncode != 0:
        return False
    if run_cmd("mount", "-o", "remount,bind,ro", str(target)).returncode != 0:
        run_cmd("umount", "-l", str(target))
        return False
    return True


CLAIMS = ".rembgd-claims"  # the claim files (one per source in work), in every outbox


def claims_left(outbox: Path) -> list[str]:
    """Claim files still there (a daemon's presence file beside them is not a claim)."""
    from daemon.coord.presence import PREFIX

    return [p.name for p in (outbox / CLAIMS).iterdir() if not p.name.startswith(PREFIX)]


def events_named(d: Daemon, name: str) -> list[dict]:
    return [e for e in d.events() if e.get("event") == name]


def visible_outputs_complete(outbox: Path) -> list[Path]:
    """Every visible output decodes fully; temp files never carry a final name."""
    return complete_pngs(outbox)


# ------------------------------------------------------------------ disk full


def test_disk_full_outbox_tmpfs(tmp_path, models_dir):
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    cfg = write_config(tmp_path, models_dir, retry_attempts=12, retry_backoff_s=0.2)
    with mount(outbox, "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs"):
        filler = outbox / "filler.bin"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
        try:  # fill it to the last block
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
        with Daemon(cfg) as d:
            names = [f"full{i}.jpg" for i in range(3)]
            for i, name in enumerate(names):
                drop(tmp_path / "inbox", name, picture(60 + i))
            # each file hits ENOSPC and is rescheduled with a growing delay
            retries = d.wait_log(lambda e: e.get("event") == "retry_scheduled"
                                 and "No space left" in e.get("error", ""), count=4, timeout=90)
            by_path: dict[str, list[float]] = {}
            for e in retries:
                by_path.setdefault(e["path"], []).append(e["delay_s"])
            twice = [v for v in by_path.values() if len(v) >= 2]
            assert twice and all(v[1] == 2 * v[0] for v in twice), by_path  # backoff doubles
            # nothing partial, nothing under a final name, no temp file left behind (an
            # attempt in flight may hold its temp for a moment: a leaked one never goes)
            wait_for(lambda: sorted(p.name for p in outbox.iterdir()
                                    if p.name != CLAIMS) == ["filler.bin"], timeout=30)
            assert not (tmp_path / "failed").exists()
            filler.unlink()  # space is back
            wait_for(lambda: all((outbox / f"{n}.png").exists() for n in names), timeout=90)
            d.quiet()
            done = Counter(e["path"] for e in d.processed() if e["outcome"] != "retry")
            assert d.proc.poll() is None
        assert sorted(p.name for p in visible_outputs_complete(outbox)) == \
            sorted(f"{n}.png" for n in names)
        assert sorted(p.name for p in outbox.iterdir() if p.name.startswith(".")) == \
            [CLAIMS, ".rembgd-ledger"]
        assert not claims_left(outbox)  # every claim released
    assert all(n == 1 for n in done.values()) and len(done) == 3, done
    assert not (tmp_path / "failed").exists()  # nothing was given up on, nothing lost
    assert all((tmp_path / "inbox" / n).exists() for n in names)  # after_success: keep


def test_disk_full_injected_enospc(tmp_path, models_dir, shared_engines, monkeypatch):
    """ENOSPC from fsync on outbox files (how NFS and delayed allocation report it)."""
    from daemon import config as configmod
    from daemon.service.supervisor import Supervisor

    cfg = configmod.load(write_config(tmp_path, models_dir, retry_attempts=6,
                                      retry_backoff_s=0.05))
    outbox = cfg.watch[0].outbox
    names = [f"inj{i}.jpg" for i in range(3)]
    for i, name in enumerate(names):
        (tmp_path / "inbox" / name).write_bytes(picture(70 + i))
    failures = Counter()
    real_fsync = os.fsync
    seen_tmp: list[str] = []

    def full_fsync(fd):
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            where = ""
        output = where.startswith(str(outbox) + "/") and "/.rembgd-" not in where  # not the ledger
        if output and failures[where.split(".rembgd-")[0]] < 2:
            failures[where.split(".rembgd-")[0]] += 1
            seen_tmp.append(where)
            assert Path(where).name.startswith(".")  # the data sits under a temp name
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_fsync)
    svc = Supervisor(cfg, engines=shared_engines)
    assert svc.run(once=True) == 0
    assert sum(failures.values()) == 6  # two per file, then space came back
    assert svc.counters.get("retries") == 6 and svc.counters.get("failed") == 0
    assert sorted(p.name for p in complete_pngs(outbox)) == sorted(n + ".png" for n in names)
    hidden = sorted(p.name for p in outbox.iterdir() if p.name.startswith("."))
    assert hidden == [CLAIMS, ".rembgd-ledger"]  # temps cleaned up
    assert not claims_left(outbox)  # every claim released
    assert not any(os.path.exists(t) for t in seen_tmp)


# -------------------------------------------------------------- cache problems


def cache_config(tmp_path: Path, models_dir: Path, retry_s: float = 0.5) -> Path:
    return write_config(tmp_path, models_dir, state_file=str(tmp_path / "status.json"),
                        store={"retry_s": retry_s})


def status(d: Daemon) -> dict:
    return wait_for(lambda: d.status() or None, timeout=10)


def check_degraded_then_recovered(tmp_path: Path, d: Daemon, fix, retry_s: float) -> None:
    inbox = tmp_path / "inbox"
    loud = d.wait_log(lambda e: e.get("event") == "cache_unavailable")[0]
    assert loud["level"] == "error" and loud["error"] and "without the cache" in loud["effect"]
    st = wait_for(lambda: (s := d.status()) and s.get("cache", {}).get("error") and s)
    assert st["cache"]["available"] is False and st["running"]
    proc = psutil.Process(d.proc.pid)
    fds = proc.num_fds()
    img = picture(80)
    drop(inbox, "a1.jpg", img)
    drop(inbox, "a2.jpg", img)  # the same bytes: no cache, so a second miss
    d.wait_processed(2)
    assert [e["outcome"] for e in d.processed()] == ["miss", "miss"]
    d.wait_ticks(math.ceil(2.2 * retry_s))  # re-opens (each tick after retry_s): no fd leak
    assert proc.num_fds() <= fds + 2, (fds, proc.num_fds())
    fix()
    d.wait_log(lambda e: e.get("event") == "cache_recovered", timeout=30)
    wait_for(lambda: d.status().get("cache", {}).get("available") is True, timeout=10)
    drop(inbox, "a3.jpg", img)
    d.wait_processed(3)
    drop(inbox, "a4.jpg", img)
    d.wait_processed(4)
    assert [e["outcome"] for e in d.processed()][2:] == ["miss", "exact"]  # the cache works again
    assert len(complete_pngs(tmp_path / "outbox")) == 4


def test_cache_read_only_then_fixed(tmp_path, models_dir):
    from daemon.cache.sqlite import SqliteStore

    # retry_s 2 s: a write failure keeps the status "unavailable" for longer than the
    # daemon's 1 s status tick, so a poll of `rembgd status` reliably sees it
    cfg = cache_config(tmp_path, models_dir, retry_s=2.0)
    cache = tmp_path / "cache"
    SqliteStore(cache).close()  # an existing, healthy cache
    mounted = read_only_bind(cache)
    if mounted:
        def fix():
            r = run_cmd("umount", str(cache))  # busy: the daemon kept a descriptor in it
            assert r.returncode == 0, r.stderr
    else:  # no mounts here: make the index unopenable another way
        index = cache / "index.sqlite3"
        for p in cache.glob("index.sqlite3*"):
            p.unlink()
        index.mkdir()

        def fix():
            index.rmdir()
    try:
        with Daemon(cfg) as d:
            check_degraded_then_recovered(tmp_path, d, fix, retry_s=2.0)
            if mounted:  # again, while running: the index is open, new writes fail
                assert read_only_bind(cache)
                inbox = tmp_path / "inbox"
                drop(inbox, "b1.jpg", picture(81))
                d.wait_processed(5)
                d.wait_log(lambda e: e.get("event") == "cache_unavailable", count=2)
                wait_for(lambda: d.status()["cache"]["available"] is False, timeout=10)
                drop(inbox, "b2.jpg", picture(82))  # reads work, writes fail: no flapping
                d.wait_processed(6)
                fix()  # store.retry_s without a failure: recovered
                d.wait_log(lambda e: e.get("event") == "cache_recovered", count=2, timeout=30)
                drop(inbox, "b3.jpg", picture(83))
                d.wait_processed(7)
                drop(inbox, "b4.jpg", picture(83))
                d.wait_processed(8)
                assert d.processed()[-1]["outcome"] == "exact"
                # once per outage, at most once per store.retry_s: never once per call
                # (it used to flip unavailable/recovered twice per file)
                down = len(events_named(d, "cache_unavailable"))
                assert down in (2, 3) and len(events_named(d, "cache_recovered")) == down
                assert d.status()["cache"]["available"] is True
                assert len(complete_pngs(tmp_path / "outbox")) == 8
    finally:
        run_cmd("umount", "-l", str(cache))


def test_cache_corrupt_index_heals_at_start_and_while_running(tmp_path, models_dir):
    """A damaged index is set aside with an error log and a fresh one started, at start
    and when it is damaged under the running daemon; no operator is needed."""
    from daemon.cache.sqlite import SqliteStore

    cfg = cache_config(tmp_path, models_dir)
    cache, inbox = tmp_path / "cache", tmp_path / "inbox"
    SqliteStore(cache).close()
    index = cache / "index.sqlite3"
    for p in cache.glob("index.sqlite3-*"):
        p.unlink()
    index.write_bytes(b"SQLite format 3\x00" + np.random.default_rng(1).bytes(64 * 1024))
    with Daemon(cfg) as d:
        first = d.wait_log(lambda e: e.get("event") == "cache_index_corrupt")[0]
        assert first["level"] == "error" and Path(first["moved_to"]).is_file()
        assert not events_named(d, "cache_unavailable")
        wait_for(lambda: d.status().get("cache", {}).get("available") is True, timeout=10)
        img = picture(80)
        drop(inbox, "a1.jpg", img)
        d.wait_processed(1)
        drop(inbox, "a2.jpg", img)
        d.wait_processed(2)
        assert [e["outcome"] for e in d.processed()] == ["miss", "exact"]

        with open(index, "r+b") as fh:  # damaged under the running daemon, while idle
            fh.truncate(0)
        noticed = d.wait_log(lambda e: e.get("event") == "cache_unavailable", timeout=30)[0]
        assert "truncated" in noticed["error"]  # the health check saw it, no lookup needed
        d.wait_log(lambda e: e.get("event") == "cache_recovered", timeout=30)  # re-opened
        wait_for(lambda: d.status().get("cache", {}).get("available") is True, timeout=10)
        drop(inbox, "a3.jpg", img)
        d.wait_processed(3)
        drop(inbox, "a4.jpg", img)
        d.wait_processed(4)
        third, fourth = [e["outcome"] for e in d.processed()][2:]
        assert third in ("miss", "exact") and fourth == "exact"  # the cache works again
    assert len(complete_pngs(tmp_path / "outbox")) == 4


# ------------------------------------------------------------------- kill -9


def test_kill9_at_12_random_points_exactly_once(tmp_path, models_dir):
    """12 kills (seeded), each kind three times: at random times while working, right after an output appears (the
    window before the source is moved), and during start-up. Then one clean run."""
    rng = random.Random(8)
    cfg = write_config(tmp_path, models_dir, settle_s=0.1)
    data = yaml.safe_load(cfg.read_text())
    data["watch"][0]["after_success"] = "move"
    cfg.write_text(yaml.safe_dump(data))
    inbox, outbox, done = tmp_path / "inbox", tmp_path / "outbox", tmp_path / "done"
    names: list[str] = []
    distinct = 0

    def add_work(n: int) -> None:  # n new pictures, each also under a second name (exact hit)
        nonlocal distinct
        for _ in range(n):
            for copy in "ab":
                names.append(f"p{distinct:02d}{copy}.jpg")
                drop(inbox, names[-1], picture(100 + distinct))
            distinct += 1

    add_work(8)
    logs, kinds = [], Counter()
    deadline = time.monotonic() + 120
    for k in range(12):
        if len(list(inbox.iterdir())) < 4:  # keep the batch going on fast machines
            add_work(2)
        d = Daemon(cfg, log=tmp_path / f"run{k:02d}.log")
        logs.append(d)
        d.start(wait_ready=False)
        mode = ("working", "working", "on_output", "starting")[k % 4]
        outputs_before = len(list(outbox.glob("*.png")))
        try:
            if mode == "starting":
                time.sleep(rng.uniform(0.1, 1.2))
            else:
                d.wait_log(lambda e: e.get("event") == "started", timeout=60)
                if mode == "working":
                    time.sleep(rng.uniform(0.0, 2.0))
                else:
                    before = {p.name for p in outbox.iterdir()}
                    end = time.monotonic() + (10 if any(inbox.iterdir()) else 0)
                    while time.monotonic() < end and not {p.name for p in outbox.iterdir()
                                                          if p.suffix == ".png"} - before:
                        time.sleep(0.002)
        finally:
            d.kill9()
            d.__exit__()
        # at every point: no partial output, no file in two places, nothing duplicated
        visible_outputs_complete(outbox)
        in_inbox = {p.name for p in inbox.iterdir()}
        in_done = {p.name for p in done.iterdir()} if done.exists() else set()
        assert not in_inbox & in_done
        assert in_inbox | in_done == set(names), (in_inbox, in_done)
        assert all((outbox / (n + ".png")).exists() for n in in_done)
        kinds[mode] += 1
        kinds["rounds_with_new_outputs"] += len(list(outbox.glob("*.png"))) > outputs_before
        kinds["output_not_yet_moved"] += sum((outbox / (n + ".png")).exists() for n in in_inbox)
        kinds["done_during_kills"] = len(in_done)
        assert time.monotonic() < deadline, f"the kill rounds took too long ({k} done)"
    final = Daemon(cfg, log=tmp_path / "final.log")
    logs.append(final)
    with final:
        wait_for(lambda: not list(inbox.iterdir()), timeout=90)
        final.quiet()
    processed = Counter()
    for d in logs:
        processed.update(e["path"] for e in d.processed() if e["outcome"] != "retry")
    print(f"kill -9 rounds: {dict(kinds)}")
    assert kinds["rounds_with_new_outputs"] >= 5, kinds  # the kills really landed mid-batch
    assert all(n == 1 for n in processed.values()), processed  # never completed twice
    assert sorted(p.name for p in complete_pngs(outbox)) == sorted(n + ".png" for n in names)
    assert sorted(p.name for p in done.iterdir()) == sorted(names)  # each moved once, none lost
    assert not (tmp_path / "failed").exists()
    db = sqlite3.connect(tmp_path / "cache" / "index.sqlite3")
    inferred = "SELECT COUNT(*) FROM entries WHERE origin IS NULL"  # not aliases or outputs
    assert db.execute(inferred).fetchone()[0] == distinct  # no redone miss
    db.close()


def test_restart_finishes_a_file_killed_between_output_and_move(tmp_path, models_dir,
                                                               shared_engines):
    """Killed after the output was written, before the source was moved to done/."""
    from daemon import config as configmod
    from daemon.service.app import App
    from daemon.service.supervisor import Supervisor

    path = write_config(tmp_path, models_dir)
    data = yaml.safe_load(path.read_text())
    data["watch"][0]["after_success"] = "move"
    path.write_text(yaml.safe_dump(data))
    cfg = configmod.load(path)
    svc = Supervisor(cfg)
    svc.app = App.build(cfg, engines=shared_engines)
    from daemon.imaging.png import encode_png
    from daemon.imaging.stamp import stamp

    src = tmp_path / "inbox" / "k.jpg"
    src.write_bytes(picture(95))
    written = stamp(encode_png(np.zeros((4, 4, 4), np.uint8)), "png",  # as a job writes it:
                    hashlib.sha256(picture(95)).hexdigest())  # stamped with its source
    (tmp_path / "outbox" / "k.jpg.png").write_bytes(written)  # ...then the kill: no record
    assert svc.rescan(immediate=True) == 1  # the catch-up scan must not skip it
    svc.intake.process(svc.workers.queue.get_nowait())
    assert svc.counters.get("up_to_date") == 1
    assert not src.exists() and (tmp_path / "done" / "k.jpg").exists()


# ------------------------------------------------------------------ security


def test_security_umask_links_listeners(tmp_path, models_dir):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(picture(90))
    cfg = write_config(tmp_path, models_dir, umask="027")
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    os.symlink(outside, inbox / "linked-at-start")  # present at start: the catch-up scan
    with Daemon(cfg) as d:
        proc = psutil.Process(d.proc.pid)
        conns = proc.net_connections(kind="all")
        assert not [c for c in conns if c.status == psutil.CONN_LISTEN], conns
        assert not [c for c in conns if c.family in (2, 10)], conns  # no inet socket at all
        os.symlink(outside, inbox / "linked-later")  # created while running
        (inbox / "sub").mkdir()
        drop(inbox / "sub", "ok.jpg", picture(91))
        drop(inbox, "bad.jpg", b"not an image")
        d.wait_processed(2)
        d.wait_log(lambda e: e.get("event") == "skipped" and e["path"].endswith("linked-later"))
        d.quiet()
        assert not [c for c in proc.net_connections(kind="all")
                    if c.status == psutil.CONN_LISTEN]
    out = outbox / "sub" / "ok.jpg.png"
    assert out.stat().st_mode & 0o777 == 0o640  # umask 027
    assert (outbox / "sub").stat().st_mode & 0o777 == 0o750
    sidecar = tmp_path / "failed" / "bad.jpg.error.json"
    assert sidecar.stat().st_mode & 0o777 == 0o640
    assert sorted(p.relative_to(outbox).as_posix() for p in complete_pngs(outbox)) == \
        ["sub/ok.jpg.png"]  # nothing from the linked folders
    assert (outside / "secret.jpg").exists() and len(list(outside.iterdir())) == 1


def test_config_paths_resolved_and_checked(tmp_path, models_dir):
    from daemon import config as configmod
    from daemon.config import ConfigError

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "inbox").mkdir()
    base = {"models": {"dir": str(models_dir)}, "cache": {"dir": "./a/b/../../cache"}}
    path = tmp_path / "c.yaml"

    def load(watch, **extra):
        path.write_text(yaml.safe_dump({**base, "watch": [watch], **extra}))
        return configmod.load(path)

    cfg = load({"inbox": "./a/b/../../inbox", "outbox": "a/../outbox"})
    pair = cfg.watch[0]
    assert pair.inbox == tmp_path / "inbox" and pair.outbox == tmp_path / "outbox"
    assert ".." not in pair.inbox.parts and cfg.cache.dir == tmp_path / "cache"
    assert pair.failed_dir == tmp_path / "failed"

    with pytest.raises(ConfigError, match=r"watch\[0\]\.outbox: .* must not be inside inbox"):
        load({"inbox": "inbox", "outbox": "inbox/out"})
    with pytest.raises(ConfigError, match=r"must not be inside inbox"):
        load({"inbox": "inbox", "outbox": "a/../inbox/./x/../out"})
    os.symlink(tmp_path / "inbox", tmp_path / "alias")  # the same folder by another name
    with pytest.raises(ConfigError, match=r"outbox"):
        load({"inbox": "inbox", "outbox": "alias/out"})
    with pytest.raises(ConfigError, match=r"failed_dir"):
        load({"inbox": "inbox", "outbox": "outbox", "failed_dir": "alias/failed"})
    # the daemon refuses to start on it, naming the file and the key
    path.write_text(yaml.safe_dump({**base, "watch": [{"inbox": "inbox", "outbox": "inbox/o"}]}))
    r = subprocess.run([sys.executable, "-m", "daemon", "-c", str(path), "run"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "watch[0].outbox" in r.stderr and str(path) in r.stderr


def test_decompression_bomb_limit_is_configurable(tmp_path, models_dir):
    from daemon import config as configmod
    from daemon.config import ConfigError
    from daemon.imaging.decode import ImageTooLarge, decode

    from daemon.imaging.decode import DEFAULT_MAX_PIXELS

    cfg = configmod.load(write_config(tmp_path, models_dir))
    assert cfg.max_image_pixels == DEFAULT_MAX_PIXELS == 150_000_000  # medium format fits
    small = configmod.load(write_config(tmp_path, models_dir, max_image_pixels=10_000))
    assert small.max_image_pixels == 10_000
    img = picture(92, 120, 100)  # a real JPEG of 12,000 pixels: just over the limit
    with pytest.raises(ImageTooLarge, match=r"120x100 = 12000 pixels exceeds the limit of "
                       r"10000; to process it, raise `max_image_pixels` in the config to at "
                       r"least 12000"):
        decode(img, max_pixels=small.max_image_pixels)
    assert decode(img, max_pixels=cfg.max_image_pixels).width == 120
    for bad in (0, -5, "lots", 1.5):
        with pytest.raises(ConfigError, match="max_image_pixels"):
            configmod.load(write_config(tmp_path, models_dir, max_image_pixels=bad))
