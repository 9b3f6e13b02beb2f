"""One contract for every ``Store`` backend: SqliteStore and RedisStore run the same tests.

Locks are not part of a store: ``tests/test_locks.py`` tests each lock backend.
Fingerprints are real (scikit-image photos, real EfficientNet-Lite0 embeddings);
near-search distances are controlled by flipping chosen bits of a real pHash.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REDIS_URL, encode, photo
from daemon import config as configmod
from daemon.imaging.fingerprint import Fingerprint, fingerprint, hamming
from daemon.cache.base import Entry, Tier, StoreError, StoreHealth

KEY = "k" * 32
OTHER_KEY = "o" * 32


# ------------------------------------------------------------- backends


class SqliteBackend:
    name = "sqlite"

    def __init__(self, tmp_path: Path):
        self.dir = tmp_path / "cache"
        self.opened: list = []

    def open(self):
        from daemon.cache.sqlite import SqliteStore

        store = SqliteStore(self.dir)
        self.opened.append(store)
        return store

    def corrupt_blob(self, digest: str) -> None:
        from daemon.cache.blobs import BlobDir

        BlobDir(self.dir / "blobs").path(digest).write_bytes(b"bit rot")

    def close(self) -> None:
        for s in self.opened:
            s.close()


class RedisBackend:
    name = "redis"

    def __init__(self, tmp_path: Path, prefix: str):
        self.cfg = configmod.parse(
            {"store": {"backend": "redis", "url": REDIS_URL, "prefix": prefix},
             "cache": {"dir": str(tmp_path / "cache")}},
            tmp_path / "config.yaml", check_folders=False)
        self.opened: list = []

    def open(self):
        from daemon.cache.redis import RedisStore

        store = RedisStore(self.cfg.store, self.cfg.cache)
        self.opened.append(store)
        return store

    def corrupt_blob(self, digest: str) -> None:
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        key = f"{self.cfg.store.prefix}:v1:blob:{digest}"
        assert client.exists(key)
        client.set(key, b"bit rot")

    def close(self) -> None:
        for s in self.opened:
            s.close()


@pytest.fixture(params=["sqlite", "redis"])
def backend(request, tmp_path):
    if request.param == "sqlite":
        b = SqliteBackend(tmp_path)
    else:
        b = RedisBackend(tmp_path, request.getfixturevalue("redis_prefix"))
    yield b
    b.close()


@pytest.fixture
def store(backend):
    return backend.open()


# --------------------------------------------------------- fingerprints


@pytest.fixture(scope="module")
def real(shared_engines) -> dict[str, Fingerprint]:
    """Real fingerprints (with real embeddings) of real photos."""
    embedder = shared_engines.embedder()
    out = {}
    for name in ("chelsea", "coffee", "astronaut"):
        rgb = photo(name)
        data = encode(rgb, "JPEG", quality=95)
        out[name] = fingerprint(data, rgb, embedder.embed(rgb))
    rgb = photo("chelsea")
    small = np.asarray(Image.fromarray(rgb).resize((rgb.shape[1] // 2, rgb.shape[0] // 2)))
    out["chelsea_q80_half"] = fingerprint(encode(small, "JPEG", quality=80), small,
                                          embedder.embed(small))
    return out


def flipped(phash: bytes, bits: list[int]) -> bytes:
    arr = np.unpackbits(np.frombuffer(phash, np.uint8)).copy()
    arr[bits] ^= 1
    return np.packbits(arr).tobytes()


def variant(fp: Fingerprint, distance: int, salt: str, bands_hit: int | None = None) -> Fingerprint:
    """``fp`` with a pHash exactly ``distance`` bits away (and its own sha / pixel hash).

    Bits are spread over ``bands_hit`` bands (default: as many as possible) so that
    the banded index has the fewest equal bands to find it through.
    """
    nb = min(16, distance) if bands_hit is None else bands_hit
    bits = [(i % nb) * 16 + i // nb for i in range(distance)]
    tag = hashlib.sha256(f"{salt}:{distance}".encode()).hexdigest()
    return dataclasses.replace(fp, phash=flipped(fp.phash, bits), sha256=tag, pixel_hash=tag[:40])


def mask_bytes(n: int) -> bytes:
    return f"mask-{n}".encode() * 50


def same_fp(a: Fingerprint, b: Fingerprint) -> None:
    assert (a.sha256, a.pixel_hash, bytes(a.phash), a.width, a.height) == \
        (b.sha256, b.pixel_hash, bytes(b.phash), b.width, b.height)
    assert np.array_equal(a.thumbs.luma, b.thumbs.luma)
    assert np.array_equal(a.thumbs.ab, b.thumbs.ab)
    if a.embedding is None or b.embedding is None:
        assert a.embedding is None and b.embedding is None
    else:
        assert a.embedding.shape == b.embedding.shape
        assert np.allclose(a.embedding, b.embedding, atol=2e-3)  # stored as float16


def same_entry(a: Entry, b: Entry) -> None:
    same_fp(a.fp, b.fp)
    assert (a.id, a.key, a.model, a.mask_digest, a.output_digest, a.nbytes, a.hits, a.origin) == \
        (b.id, b.key, b.model, b.mask_digest, b.output_digest, b.nbytes, b.hits, b.origin)
    assert a.created == pytest.approx(b.created) and a.last_hit == pytest.approx(b.last_hit)


# ------------------------------------------------------------------ tests


def test_put_then_find_exact_and_pixel(store, real):
    fp = real["chelsea"]
    e = store.put(KEY, "u2netp", fp, b"mask-png", b"output-png")
    assert e.nbytes == len(b"mask-png") + len(b"output-png")
    assert e.origin is None and e.hits == 0
    same_entry(store.find_exact(KEY, fp.sha256), e)
    same_entry(store.find_pixel(KEY, fp.pixel_hash), e)
    assert store.find_exact(KEY, "0" * 64) is None
    assert store.find_pixel(KEY, "0" * 40) is None
    assert store.find_exact(OTHER_KEY, fp.sha256) is None  # another model/options: a miss
    assert store.find_pixel(OTHER_KEY, fp.pixel_hash) is None
    assert store.find_near(OTHER_KEY, fp.phash, 15) == []


def test_exact_and_pixel_return_the_oldest_entry(store, real):
    fp = real["coffee"]
    first = store.put(KEY, "u2netp", fp, b"m1", b"o1")
    time.sleep(0.01)
    store.put(KEY, "u2netp", fp, b"m2", b"o2")
    assert store.find_exact(KEY, fp.sha256).id == first.id
    assert store.find_pixel(KEY, fp.pixel_hash).id == first.id
    store.delete([first.id])
    assert store.find_exact(KEY, fp.sha256).mask_digest == hashlib.sha256(b"m2").hexdigest()


def test_find_near_radius_order_and_limit(store, real):
    base = real["chelsea"]
    made = {}
    for d in (0, 3, 1, 7, 10, 11, 15, 40):
        made[d] = store.put(KEY, "u2netp", variant(base, d, "near"), mask_bytes(d), None)
    got = store.find_near(KEY, base.phash, 10)
    assert [e.id for e in got] == [made[d].id for d in (0, 1, 3, 7, 10)]  # nearest first
    same_fp(got[2].fp, made[3].fp)
    assert [e.id for e in store.find_near(KEY, base.phash, 9)] == \
        [made[d].id for d in (0, 1, 3, 7)]
    assert [e.id for e in store.find_near(KEY, base.phash, 0)] == [made[0].id]
    # distance 15 spread over 15 bands: one equal band left, still found (exact recall)
    assert made[15].id in [e.id for e in store.find_near(KEY, base.phash, 15)]
    assert made[40].id not in [e.id for e in store.find_near(KEY, base.phash, 15)]

    for i in range(20):  # more than 16 within radius: at most 16, still nearest first
        store.put(KEY, "u2netp", variant(base, 5, f"many{i}", bands_hit=1), mask_bytes(100 + i),
                  None)
    got = store.find_near(KEY, base.phash, 10)
    assert len(got) == 16
    dists = [hamming(base.phash, e.fp.phash) for e in got]
    assert dists == sorted(dists) and dists[:4] == [0, 1, 3, 5]


def test_near_excludes_aliases(store, real):
    base = real["astronaut"]
    origin = store.put(KEY, "u2netp", base, b"mask", b"out")
    near_fp = variant(base, 2, "alias")
    alias = store.put(KEY, "u2netp", near_fp, b"mask2", b"out2", origin.id)
    assert alias.origin == origin.id
    assert [e.id for e in store.find_near(KEY, near_fp.phash, 10)] == [origin.id]
    assert store.find_exact(KEY, near_fp.sha256).id == alias.id  # aliases are exact hits
    assert store.find_pixel(KEY, near_fp.pixel_hash).id == alias.id
    store.delete([origin.id])
    assert store.find_near(KEY, near_fp.phash, 10) == []
    assert store.find_exact(KEY, near_fp.sha256).id == alias.id  # the alias outlives its origin


def test_real_reencode_is_near(store, real):
    src, dup = real["chelsea"], real["chelsea_q80_half"]
    d = hamming(src.phash, dup.phash)
    assert d <= 10, d
    e = store.put(KEY, "u2netp", src, b"mask", None)
    store.put(KEY, "u2netp", real["coffee"], b"mask-coffee", None)
    assert [x.id for x in store.find_near(KEY, dup.phash, 10)] == [e.id]
    if d > 0:
        assert store.find_near(KEY, dup.phash, d - 1) == []
    assert store.find_exact(KEY, dup.sha256) is None
    got = store.find_near(KEY, dup.phash, 10)[0]
    cos = float(np.dot(got.fp.embedding, dup.embedding))
    assert cos > 0.9  # the stored (float16) embedding still verifies


def test_blob_round_trip(store, real):
    data = encode(photo("coffee"), "PNG")
    digest = store.put_blob(data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert store.get_blob(digest) == data
    assert store.put_blob(data) == digest  # idempotent
    assert store.get_blob("f" * 64) is None
    e = store.put(KEY, "u2netp", real["coffee"], b"the mask", None)
    assert e.output_digest is None
    assert store.get_blob(e.mask_digest) == b"the mask"
    assert store.find_exact(KEY, real["coffee"].sha256).output_digest is None


def test_corrupted_blob_reads_as_none(backend, store, real):
    e = store.put(KEY, "u2netp", real["chelsea"], b"good mask", b"good output")
    backend.corrupt_blob(e.output_digest)
    assert store.get_blob(e.output_digest) is None
    assert e.output_digest not in set(store.blob_digests())  # removed, not served again
    assert store.get_blob(e.mask_digest) == b"good mask"


def test_delete_removes_rows_and_orphans_but_keeps_shared_blobs(store, real):
    a = store.put(KEY, "u2netp", real["chelsea"], b"shared mask", b"out a")
    b = store.put(KEY, "u2netp", real["coffee"], b"shared mask", b"out b")
    assert a.mask_digest == b.mask_digest
    assert store.count() == 2
    assert store.delete([a.id]) == 1
    assert store.find_exact(KEY, real["chelsea"].sha256) is None
    assert store.find_pixel(KEY, real["chelsea"].pixel_hash) is None
    assert a.id not in [e.id for e in store.find_near(KEY, real["chelsea"].phash, 15)]
    digests = set(store.blob_digests())
    assert a.output_digest not in digests and store.get_blob(a.output_digest) is None
    assert b.mask_digest in digests and store.get_blob(b.mask_digest) == b"shared mask"
    assert store.find_exact(KEY, real["coffee"].sha256).id == b.id
    assert store.delete([a.id, "no-such-id"]) == 0
    assert store.delete([]) == 0
    assert store.delete([b.id]) == 1
    assert set(store.blob_digests()) == set()
    assert store.count() == 0


def test_record_flush_updates_hits_and_tier_counts(backend, store, real):
    before = time.time()
    e = store.put(KEY, "u2netp", real["chelsea"], b"m", b"o")
    assert store.tier_counts(before - 3600) == dict.fromkeys(Tier, 0)
    time.sleep(0.01)
    store.record(e.id, "exact")
    store.record(e.id, "exact")
    store.record(e.id, "near")
    store.record(None, "miss")
    store.record(e.id, "miss")  # a miss never counts as a hit
    store.flush()
    got = store.find_exact(KEY, real["chelsea"].sha256)
    assert got.hits == 3
    assert got.last_hit > e.last_hit and got.last_hit >= before
    counts = store.tier_counts(before - 60)
    assert counts == {"exact": 2, "pixel": 0, "near": 1, "miss": 2}
    assert store.tier_counts(time.time() + 7200) == dict.fromkeys(Tier, 0)
    other = backend.open()  # another process / machine sees the flushed counts
    assert other.tier_counts(before - 60) == counts
    assert [x.hits for x in other.entries()] == [3]
    store.record(e.id, "pixel")
    assert store.tier_counts(before - 60)["pixel"] == 1  # tier_counts flushes first


def test_restore_keeps_id_times_and_hits(backend, store, real):
    fp = real["astronaut"]
    mask, out = store.put_blob(b"restored mask"), store.put_blob(b"restored out")
    entry = Entry(id="restored-entry-1", key=KEY, model="u2netp", fp=fp, mask_digest=mask,
                  output_digest=out, nbytes=25, created=1_000_000.0, last_hit=1_500_000.0, hits=7)
    store.restore(entry)
    same_entry(store.find_exact(KEY, fp.sha256), entry)
    same_entry(store.find_near(KEY, fp.phash, 0)[0], entry)
    same_entry(next(iter(backend.open().entries())), entry)
    store.restore(dataclasses.replace(entry, hits=9))  # replace, not duplicate
    assert store.count() == 1
    assert [e.hits for e in store.entries()] == [9]
    assert store.get_blob(mask) == b"restored mask"  # replacing kept the blobs
    alias = dataclasses.replace(entry, id="restored-alias", fp=variant(fp, 1, "r"),
                                origin=entry.id)
    store.restore(alias)
    assert store.find_exact(KEY, alias.fp.sha256).origin == entry.id
    assert [e.id for e in store.find_near(KEY, alias.fp.phash, 5)] == [entry.id]


def test_count_bytes_entries_and_digests(backend, store, real):
    assert store.count() == 0
    assert list(store.entries()) == []
    assert set(store.blob_digests()) == set()
    made = [store.put(KEY, "u2netp", real[n], f"mask {n}".encode(), f"out {n}".encode())
            for n in ("chelsea", "coffee", "astronaut")]
    made.append(store.put(OTHER_KEY, "isnet", real["chelsea"], b"mask x", None))
    assert store.count() == 4
    assert store.total_bytes() >= sum(e.nbytes for e in made)
    listed = {e.id: e for e in store.entries()}
    assert set(listed) == {e.id for e in made}
    for e in made:
        same_entry(listed[e.id], e)
    want = {d for e in made for d in (e.mask_digest, e.output_digest) if d}
    assert set(store.blob_digests()) == want
    seen = backend.open()
    assert seen.count() == 4 and {e.id for e in seen.entries()} == set(listed)
    store.delete_blob(made[0].output_digest)
    assert store.get_blob(made[0].output_digest) is None
    assert made[0].output_digest not in set(store.blob_digests())
    assert store.delete([e.id for e in made]) == 4
    assert store.count() == 0 and list(store.entries()) == []
    assert set(store.blob_digests()) == set()
    if backend.name == "redis":
        assert store.total_bytes() == 0


def test_health_and_name(backend, store, real):
    assert store.name == backend.name
    assert store.health() == StoreHealth(available=True, error=None, damaged=False)
    store.put(KEY, "u2netp", real["coffee"], b"mask", None)
    assert store.health().available


def test_closed_store_raises_store_error_not_a_bug(backend, real):
    store = backend.open()
    store.put(KEY, "u2netp", real["coffee"], b"mask", None)
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError):
        store.find_exact(KEY, real["coffee"].sha256)


def test_bugs_are_not_store_errors(store):
    """A wrong argument is a bug: it must not read as "cache unavailable"."""
    with pytest.raises(Exception) as info:
        store.find_near(KEY, None, 10)
    assert not isinstance(info.value, StoreError)


def test_bulk_load_finds_every_entry_as_stored(backend, store, real):
    from daemon.cache.maintenance import bulk_load

    base = real["coffee"]
    masks = [mask_bytes(200 + i) for i in range(5)]
    entries = [Entry(id=f"bulk-{i}", key=KEY, model="u2netp", fp=variant(base, 3 * i, "bulk"),
                     mask_digest=hashlib.sha256(m).hexdigest(), output_digest=None,
                     nbytes=len(m), created=1_000_000.0 + i, last_hit=1_200_000.0, hits=i)
               for i, m in enumerate(masks)]
    assert bulk_load(store, zip(entries, masks), batch=2) == 5  # three batches
    assert store.count() == 5
    for e, m in zip(entries, masks):
        same_entry(store.find_exact(KEY, e.fp.sha256), e)
        same_entry(store.find_pixel(KEY, e.fp.pixel_hash), e)
        assert store.get_blob(e.mask_digest) == m
    assert [x.id for x in store.find_near(KEY, base.phash, 7)] == ["bulk-0", "bulk-1", "bulk-2"]
    assert {x.id for x in backend.open().entries()} == {e.id for e in entries}
    again = dataclasses.replace(entries[1], hits=40)
    assert bulk_load(store, [(again, None)]) == 1  # an id already stored is replaced
    assert store.count() == 5 and store.find_exact(KEY, again.fp.sha256).hits == 40
    assert store.get_blob(again.mask_digest) == masks[1]
