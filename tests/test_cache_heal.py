"""A damaged SQLite index heals: set aside, fresh index, blobs reused; transient errors do not.

Real index files damaged the ways a disk or an operator damages them
(truncated, overwritten, removed), real photos' fingerprints, and the cache
guard that notices and re-opens.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import structlog

from tests.helpers import encode, photo
from daemon import config as configmod
from daemon.cache.base import StoreDamaged, StoreUnavailable
from daemon.cache.guard import CacheGuard
from daemon.service.app import open_cache
from daemon.cache.sqlite import SqliteStore
from daemon.imaging.fingerprint import Fingerprint, fingerprint

KEY = "k" * 32


@pytest.fixture(scope="module")
def fps() -> list[Fingerprint]:
    """Real fingerprints (no embedding needed here), with distinct digests."""
    out = []
    for name in ("chelsea", "coffee", "astronaut"):
        rgb = photo(name)
        out.append(fingerprint(encode(rgb, "JPEG", quality=90), rgb))
    more = []
    for i in range(12):  # enough rows for an index of several pages
        tag = hashlib.sha256(f"row{i}".encode()).hexdigest()
        more.append(dataclasses.replace(out[i % 3], sha256=tag, pixel_hash=tag[:40]))
    return out + more


def mask_of(i: int) -> bytes:
    return encode(photo("camera")[:, :, 0][::4, ::4] // (i + 1), "PNG")


def fill(store: SqliteStore, fps: list[Fingerprint]):
    return [store.put(KEY, "u2netp", fp, mask_of(i), None) for i, fp in enumerate(fps)]


def checkpoint(index: Path) -> None:
    """Move the WAL into the index file, as any connection (another daemon's) may do."""
    db = sqlite3.connect(index)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def set_aside(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if ".corrupt-" in p.name)


def cfg_for(tmp_path: Path, **store):
    return configmod.parse({"cache": {"dir": str(tmp_path / "cache")},
                            "store": {"retry_s": 0.2, **store}},
                           tmp_path / "config.yaml", check_folders=False)


# ------------------------------------------------------------ at open


def test_garbage_index_is_set_aside_and_a_fresh_one_works(tmp_path, fps):
    cache = tmp_path / "cache"
    store = SqliteStore(cache)
    first = fill(store, fps[:3])
    blob = store.blobs.path(first[0].mask_digest)
    store.close()
    index = cache / "index.sqlite3"
    index.write_bytes(b"this is not an SQLite file, it is garbage " * 500)
    with structlog.testing.capture_logs() as logs:
        healed = SqliteStore(cache)
    moved = set_aside(cache)
    assert len(moved) == 1 and moved[0].startswith("index.sqlite3.corrupt-")
    assert healed.set_aside == cache / moved[0]
    assert (cache / moved[0]).read_bytes().startswith(b"this is not an SQLite file")
    event = next(e for e in logs if e["event"] == "cache_index_corrupt")
    assert event["log_level"] == "error" and event["moved_to"] == str(cache / moved[0])
    assert "blob" in event["effect"]
    assert healed.count() == 0 and healed.health().available
    # the blob file stayed, and a put of the same mask reuses it (not rewritten)
    ino = blob.stat().st_ino
    again = healed.put(KEY, "u2netp", fps[0], mask_of(0), None)
    assert again.mask_digest == first[0].mask_digest and blob.stat().st_ino == ino
    assert healed.find_exact(KEY, fps[0].sha256).id == again.id
    healed.close()


def test_a_blob_that_does_not_verify_is_rewritten_on_put(tmp_path, fps):
    store = SqliteStore(tmp_path / "cache")
    e = store.put(KEY, "u2netp", fps[0], mask_of(0), None)
    path = store.blobs.path(e.mask_digest)
    path.write_bytes(b"x" * len(mask_of(0)))  # same size, rotten bytes
    store.put(KEY, "u2netp", fps[1], mask_of(0), None)
    assert store.get_blob(e.mask_digest) == mask_of(0)
    store.close()


def test_heal_false_reports_damage_and_changes_nothing(tmp_path):
    cache = tmp_path / "cache"
    SqliteStore(cache).close()
    (cache / "index.sqlite3").write_bytes(b"\0garbage" * 1000)
    with pytest.raises(StoreDamaged):
        SqliteStore(cache, heal=False)
    assert set_aside(cache) == []


def test_an_unopenable_index_is_unavailable_not_set_aside(tmp_path):
    """A directory where the index should be: SQLite cannot open it; nothing is moved."""
    cache = tmp_path / "cache"
    (cache / "index.sqlite3").mkdir(parents=True)
    with pytest.raises(StoreUnavailable) as info:
        SqliteStore(cache)
    assert not isinstance(info.value, StoreDamaged)
    assert set_aside(cache) == [] and (cache / "index.sqlite3").is_dir()


def read_only(folder: Path):
    """Make ``folder`` read-only for this process: chmod (non-root) or a read-only bind mount."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    ok = subprocess.run(["mount", "--bind", str(folder), str(folder)],
                        capture_output=True).returncode == 0
    if ok and subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)],
                             capture_output=True).returncode == 0:
        return lambda: subprocess.run(["umount", "-l", str(folder)], check=True)
    if ok:
        subprocess.run(["umount", "-l", str(folder)])
    pytest.skip("root without mount privileges: cannot make a folder read-only here")


def test_read_only_cache_is_not_set_aside_and_heals_once_writable(tmp_path, fps):
    cache = tmp_path / "cache"
    store = SqliteStore(cache)
    fill(store, fps[:1])
    store.close()
    index = cache / "index.sqlite3"
    for p in cache.glob("index.sqlite3-*"):
        p.unlink()
    index.write_bytes(b"garbage, on a read-only folder" * 200)
    undo = read_only(cache)
    try:
        with pytest.raises(StoreUnavailable):
            SqliteStore(cache)
        cfg = cfg_for(tmp_path)
        guard = CacheGuard(cfg.store, cfg.cache)
        st = guard.status()
        assert st["available"] is False and st["error"]
        assert guard.call(lambda s: s.count(), default="none") == "none"
    finally:
        undo()
    assert set_aside(cache) == []  # nothing was moved while read-only
    assert index.read_bytes().startswith(b"garbage")
    time.sleep(0.25)  # store.retry_s
    assert guard.status()["available"] is True  # re-opened: set aside, fresh index
    assert len(set_aside(cache)) == 1 and guard.call(lambda s: s.count()) == 0
    guard.close()


# ------------------------------------------------------------ while open


def truncate(index: Path) -> None:
    os.truncate(index, 4096 * 2)  # the header survives; the rows' pages are gone


def overwrite(index: Path) -> None:
    size = index.stat().st_size
    with open(index, "r+b") as fh:  # in place: same inode, as a disk fault would
        fh.write(os.urandom(size))


def remove(index: Path) -> None:
    index.unlink()


@pytest.mark.parametrize("damage", [truncate, overwrite, remove])
def test_damage_under_a_running_store_is_noticed_and_the_guard_heals_it(tmp_path, fps, damage):
    cfg = cfg_for(tmp_path)
    cache = cfg.cache.dir
    with structlog.testing.capture_logs() as logs:
        guard = CacheGuard(cfg.store, cfg.cache)
        made = guard.call(lambda s: fill(s, fps))
        assert len(made) == len(fps) and guard.status()["available"]
        store = guard.store
        blob = store.blobs.path(made[0].mask_digest)
        ino = blob.stat().st_ino
        index = store.index_path
        checkpoint(index)
        assert index.stat().st_size > 4096 * 2, "the rows must sit in the index file itself"
        assert store.health().available

        damage(index)
        health = store.health()
        assert not health.available and health.damaged and health.error
        with pytest.raises(StoreDamaged):
            store.count()  # never served from SQLite's page cache once damaged

        st = guard.status()  # notices, re-opens: heals
        assert st["available"] is True, st
        assert guard.store is not store and guard.store.health().available
        assert guard.call(lambda s: s.count()) == 0  # a fresh index
        again = guard.call(lambda s: s.put(KEY, "u2netp", fps[0], mask_of(0), None))
        assert again.mask_digest == made[0].mask_digest and blob.stat().st_ino == ino
        assert guard.call(lambda s: s.find_exact(KEY, fps[0].sha256)).id == again.id
        guard.close()
    moved = set_aside(cache)
    if damage is remove:
        assert moved == []  # nothing left to set aside
    else:
        assert moved and moved[0].startswith("index.sqlite3.corrupt-")
        assert any(e["event"] == "cache_index_corrupt" for e in logs)
    events = [e["event"] for e in logs if e["event"] in ("cache_unavailable", "cache_recovered")]
    assert events == ["cache_unavailable", "cache_recovered"], events


def test_guard_catches_only_store_errors(tmp_path):
    cfg = cfg_for(tmp_path)
    guard = CacheGuard(cfg.store, cfg.cache)
    with pytest.raises(KeyError):
        guard.call(lambda s: {}["a bug"])
    assert guard.status()["store_errors"] == 0 and guard.status()["available"]

    def fail(s):
        raise StoreUnavailable("disk on fire")

    assert guard.call(fail, default="fallback") == "fallback"
    st = guard.status()
    assert st["store_errors"] == 1 and st["available"] is False and "disk on fire" in st["error"]
    guard.close()


def test_check_index_runs_a_full_quick_check(tmp_path, fps):
    store = SqliteStore(tmp_path / "cache")
    fill(store, fps[:3])
    assert store.check_index() == []
    store.close()


def test_disabled_cache_opens_nothing(tmp_path):
    cfg = configmod.parse({"cache": {"dir": str(tmp_path / "cache"), "enabled": False}},
                          tmp_path / "config.yaml", check_folders=False)
    assert open_cache(cfg) is None  # no store, no guard, no locks
    assert not (tmp_path / "cache").exists()


def test_transaction_commits_or_rolls_back(tmp_path, fps):
    store = SqliteStore(tmp_path / "cache")
    with store.transaction() as db:
        db.execute("INSERT INTO meta VALUES ('bench', '1')")
    with pytest.raises(RuntimeError):
        with store.transaction() as db:
            db.execute("INSERT INTO meta VALUES ('gone', '1')")
            raise RuntimeError("abort")
    with store.transaction() as db:
        names = {r[0] for r in db.execute("SELECT name FROM meta")}
    assert "bench" in names and "gone" not in names
    store.close()


# ------------------------------------------------- verify --repair after a heal


def test_verify_repair_keeps_the_blobs_a_heal_kept(tmp_path, fps, models_dir):
    """Issue 20.4: the heal says "blobs are kept and reused"; --repair must agree."""
    import sys

    from tests.helpers import write_config
    from harness import ROOT

    cfg = write_config(tmp_path, models_dir, cache={"dir": str(tmp_path / "cache")})
    cache = tmp_path / "cache"
    store = SqliteStore(cache)
    rows = fill(store, fps)
    blobs = sorted(p.name for p in (cache / "blobs").glob("*/*"))
    assert len(blobs) == len(rows)
    store.close()
    (cache / "index.sqlite3").write_bytes(b"garbage, not SQLite " * 400)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "daemon", "-c", str(cfg), "cache",
                               "verify", *args], capture_output=True, text=True, cwd=ROOT,
                              timeout=120)

    res = cli("--repair")  # opens (heals) and repairs in one go, as the issue ran it
    assert res.returncode == 0, res.stdout + res.stderr
    assert "blobs are kept and reused" in res.stderr
    assert f"{len(blobs)} blobs kept from the healed index" in res.stdout, res.stdout
    assert sorted(p.name for p in (cache / "blobs").glob("*/*")) == blobs  # all kept
    healed = SqliteStore(cache)  # and reused: the same mask's put finds its blob
    ino = healed.blobs.path(rows[0].mask_digest).stat().st_ino
    assert healed.put(KEY, "u2netp", fps[0], mask_of(0), None).mask_digest == rows[0].mask_digest
    assert healed.blobs.path(rows[0].mask_digest).stat().st_ino == ino
    stray = healed.put_blob(b"written after the heal, no row")  # a real orphan
    healed.close()
    res = cli("--repair")
    assert res.returncode == 0 and "deleted 0 rows and 1 orphan blobs" in res.stdout, res.stdout
    assert not (cache / "blobs" / stray[:2] / stray).exists()
    assert (cache / "blobs" / blobs[-1][:2] / blobs[-1]).exists()

    # ttl_days (90) after the heal, the pruner's age rule no longer keeps them
    moved = next(p for p in cache.iterdir() if ".corrupt-" in p.name)
    long_ago = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() - 91 * 86400))
    moved.rename(cache / f"index.sqlite3.corrupt-{long_ago}")
    res = cli("--repair")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"deleted 0 rows and {len(blobs) - 1} orphan blobs" in res.stdout, res.stdout
    assert sorted(p.name for p in (cache / "blobs").glob("*/*")) == [rows[0].mask_digest]
