"""RedisStore beyond the shared contract: eviction, outages, two machines on one cache."""
from __future__ import annotations

import hashlib
import io
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REDIS_URL, encode, photo, write_config
from daemon import config as configmod
from daemon.imaging.fingerprint import fingerprint
from daemon.coord.leases import try_lease
from daemon.cache.base import StoreUnavailable

import redis  # noqa: E402  (a declared dependency: never skipped, CI or not)

KEY = "k" * 32
OUTAGE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, StoreUnavailable)


# ------------------------------------------------------------- helpers


def store_cfg(tmp_path: Path, prefix: str, **store):
    return configmod.parse(
        {"store": {"backend": "redis", "url": REDIS_URL, "prefix": prefix, **store},
         "cache": {"dir": str(tmp_path / "cache"), "limits": {"ttl_days": 30}}},
        tmp_path / "config.yaml", check_folders=False)


@pytest.fixture
def raw():
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def stores(tmp_path, redis_prefix):
    """A factory of RedisStores on one prefix: each one is another 'machine'."""
    from daemon.cache.redis import RedisStore

    opened = []

    def make(**store):
        s = RedisStore(store_cfg(tmp_path, redis_prefix, **store))
        opened.append(s)
        return s

    make.prefix = f"{redis_prefix}:v1:"
    yield make
    for s in opened:
        s.close()


@pytest.fixture(scope="module")
def fps():
    rng = np.random.default_rng(7)
    emb = rng.normal(size=1280).astype(np.float32)
    emb /= np.linalg.norm(emb)  # a deterministic unit vector
    out = {}
    for name in ("chelsea", "coffee"):
        rgb = photo(name)
        out[name] = fingerprint(encode(rgb, "JPEG", quality=95), rgb, emb)
    return out


def keys_of(raw, prefix: str) -> set[str]:
    return {k.decode()[len(prefix):] for k in raw.scan_iter(match=f"{prefix}*", count=1000)}


BOOKKEEPING = {"bytes", "tier_hours"}


def only_bookkeeping(raw, prefix: str) -> bool:
    left = {k for k in keys_of(raw, prefix) if not k.startswith("tiers:")}
    return left <= BOOKKEEPING


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of Redis that a test can stop, restart or stall.

    ``stop()`` closes the listener and cuts every connection (Redis is down:
    connections are refused); ``stall = True`` keeps connections open but
    forwards nothing (Redis hangs or the network black-holes packets).
    """

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.port = 0
        self.stall = False
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._running = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Proxy:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        ls.settimeout(0.05)
        self.port = ls.getsockname()[1]
        self._running.set()
        self._thread = threading.Thread(target=self._accept, args=(ls,), daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self, ls: socket.socket) -> None:
        try:
            while self._running.is_set():
                try:
                    client, _ = ls.accept()
                except socket.timeout:
                    continue
                client.settimeout(None)
                try:
                    up = socket.create_connection(self.upstream, timeout=2)
                    up.settimeout(None)
                except OSError:
                    client.close()
                    continue
                with self._lock:
                    self._socks |= {client, up}
                for a, b in ((client, up), (up, client)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()
        finally:
            ls.close()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self.stall:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                self._close(s)

    def _close(self, s: socket.socket) -> None:
        with self._lock:
            self._socks.discard(s)
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()

    def stop(self) -> None:
        self._running.clear()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            self._close(s)


@pytest.fixture
def proxy():
    host, port = REDIS_URL.split("//")[1].split("/")[0].split(":")
    p = Proxy((host, int(port))).start()
    yield p
    p.stop()


def wait_for(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def timed(fn):
    t0 = time.monotonic()
    try:
        fn()
    except OUTAGE as exc:
        return time.monotonic() - t0, exc
    return time.monotonic() - t0, None


# ------------------------------------------------------------ eviction


def test_evicted_mask_blob_reads_as_miss_and_heals(stores, raw, fps):
    a, b = stores(), stores()
    fp = fps["chelsea"]
    e = a.put(KEY, "u2netp", fp, b"mask", b"output")
    raw.delete(stores.prefix + "blob:" + e.mask_digest)  # evicted by Redis
    assert b.get_blob(e.mask_digest) is None
    assert b.find_exact(KEY, fp.sha256) is None
    assert b.find_pixel(KEY, fp.pixel_hash) is None
    assert b.find_near(KEY, fp.phash, 10) == []
    # healed: the entry, its indexes and its now unreferenced output blob are gone
    assert b.count() == 0 and a.count() == 0
    assert only_bookkeeping(raw, stores.prefix), keys_of(raw, stores.prefix)
    assert b.total_bytes() == 0


def test_evicted_mask_blob_found_by_near_only(stores, raw, fps):
    a = stores()
    e = a.put(KEY, "u2netp", fps["coffee"], b"mask", None)
    raw.delete(stores.prefix + "blob:" + e.mask_digest)
    assert a.find_near(KEY, fps["coffee"].phash, 10) == []
    assert a.count() == 0


def test_evicted_entry_hash_is_skipped_and_cleaned(stores, raw, fps):
    a, b = stores(), stores()
    fp = fps["chelsea"]
    e = a.put(KEY, "u2netp", fp, b"mask", b"output")
    assert a.find_exact(KEY, fp.sha256).id == e.id  # now in a's local entry cache
    raw.delete(stores.prefix + "e:" + e.id)
    assert a.find_exact(KEY, fp.sha256) is None  # the local tier never outlives the entry
    assert b.find_pixel(KEY, fp.pixel_hash) is None
    assert b.find_near(KEY, fp.phash, 10) == []
    assert b.count() == 0
    assert only_bookkeeping(raw, stores.prefix), keys_of(raw, stores.prefix)


def test_evicted_entry_found_only_by_near_is_cleaned(stores, raw, fps):
    a = stores()
    e = a.put(KEY, "u2netp", fps["coffee"], b"mask", b"output")
    raw.delete(stores.prefix + "e:" + e.id)
    assert a.find_near(KEY, fps["coffee"].phash, 10) == []
    assert only_bookkeeping(raw, stores.prefix), keys_of(raw, stores.prefix)


def test_index_skips_a_dead_member_to_the_next_live_one(stores, raw, fps):
    a = stores()
    fp = fps["chelsea"]
    old = a.put(KEY, "u2netp", fp, b"mask 1", b"out 1")
    time.sleep(0.01)
    new = a.put(KEY, "u2netp", fp, b"mask 2", b"out 2")
    raw.delete(stores.prefix + "e:" + old.id)
    assert a.find_exact(KEY, fp.sha256).id == new.id
    assert a.find_pixel(KEY, fp.pixel_hash).id == new.id
    assert [x.id for x in a.find_near(KEY, fp.phash, 0)] == [new.id]
    assert a.count() == 1


def test_entries_cleans_dead_entries_nobody_looks_up(stores, raw, fps):
    a = stores()
    keep = a.put(KEY, "u2netp", fps["chelsea"], b"m1", None)
    gone = a.put(KEY, "u2netp", fps["coffee"], b"m2", None)
    raw.delete(stores.prefix + "e:" + gone.id)
    assert a.count() == 2  # not noticed yet
    assert [e.id for e in a.entries()] == [keep.id]
    assert a.count() == 1
    assert gone.mask_digest not in set(a.blob_digests())


def test_evicted_bookkeeping_keys_degrade_gracefully(stores, raw, fps):
    """allkeys-lru may take the skeletons hash: lookups, near search and delete still work."""
    a = stores()
    fp = fps["chelsea"]
    e = a.put(KEY, "u2netp", fp, b"mask", b"out")
    raw.delete(stores.prefix + "ids", stores.prefix + "bytes")
    assert a.find_exact(KEY, fp.sha256).id == e.id
    assert [x.id for x in a.find_near(KEY, fp.phash, 5)] == [e.id]  # pHash read from the entry
    assert a.delete([e.id]) == 1
    assert a.find_exact(KEY, fp.sha256) is None
    left = keys_of(raw, stores.prefix)
    assert not any(k.startswith(("e:", "sha:", "pix:", "band:", "blob:", "bref:")) for k in left)


def test_pipeline_re_infers_when_the_output_blob_was_evicted(tmp_path, models_dir,
                                                             shared_engines, redis_prefix, raw):
    from daemon.pipeline import Pipeline
    from daemon.cache.redis import RedisStore

    cfg = configmod.load(write_config(tmp_path, models_dir, store={
        "backend": "redis", "url": REDIS_URL, "prefix": redis_prefix}))
    a = Pipeline(cfg, shared_engines, RedisStore(cfg))
    b = Pipeline(cfg, shared_engines, RedisStore(cfg))
    data = encode(photo("coffee"), "JPEG", quality=90)
    opts = cfg.output_defaults
    first = a.render_bytes(data, opts)
    assert first.tier == "miss"
    entry = b.store.find_exact(a.key_for(opts)[0], hashlib.sha256(data).hexdigest())
    raw.delete(f"{redis_prefix}:v1:blob:{entry.output_digest}")
    again = b.render_bytes(data, opts)
    assert again.tier == "miss" and again.png == first.png  # a miss, never an error
    assert b.store_errors == 0 and a.store_errors == 0
    assert a.render_bytes(data, opts).tier == "exact"
    for p in (a, b):
        p.store.close()


def test_put_rewrites_a_blob_dropped_by_a_concurrent_delete(stores, raw, fps):
    a = stores()
    orig = a.put_blob

    def put_then_lose(data: bytes) -> str:
        digest = orig(data)
        raw.delete(stores.prefix + "blob:" + digest)  # another machine's delete got there
        return digest

    a.put_blob = put_then_lose
    e = a.put(KEY, "u2netp", fps["coffee"], b"mask", b"out")
    assert raw.exists(stores.prefix + "blob:" + e.mask_digest)
    assert stores().get_blob(e.output_digest) == b"out"


# ---------------------------------------------------------------- layout


def test_key_layout_and_ttls(stores, raw, fps):
    a = stores()
    fp = fps["chelsea"]
    e = a.put(KEY, "u2netp", fp, b"mask", b"out")
    P = stores.prefix
    keys = keys_of(raw, P)
    assert f"e:{e.id}" in keys and "ids" in keys and "bytes" in keys
    assert f"sha:{KEY}:{fp.sha256}" in keys and f"pix:{KEY}:{fp.pixel_hash}" in keys
    assert {f"band:{KEY}:{i}:{v}" for i, v in enumerate(fp.bands)} <= keys
    assert {f"blob:{e.mask_digest}", f"bref:{e.mask_digest}", f"blob:{e.output_digest}"} <= keys
    day = 86400
    # volatile-lru can evict entries and blobs (TTL: ttl_days + 1), never the bookkeeping
    assert 30 * day < raw.ttl(P + "e:" + e.id) <= 31 * day
    assert 30 * day < raw.ttl(P + "blob:" + e.mask_digest) <= 31 * day
    for k in ("ids", "bytes", f"sha:{KEY}:{fp.sha256}", f"bref:{e.mask_digest}"):
        assert raw.ttl(P + k) == -1, k
    # a flushed hit renews the TTLs of the entry and its blobs
    raw.expire(P + "e:" + e.id, 100)
    raw.expire(P + "blob:" + e.output_digest, 100)
    a.record(e.id, "exact")
    a.flush()
    assert raw.ttl(P + "e:" + e.id) > 30 * day
    assert raw.ttl(P + "blob:" + e.output_digest) > 30 * day
    a.delete([e.id])
    assert only_bookkeeping(raw, P), keys_of(raw, P)
    assert int(raw.get(P + "bytes")) == 0


def test_hits_are_coalesced_until_flush(stores, raw, fps):
    a = stores()
    a.HIT_FLUSH_S = 3600
    e = a.put(KEY, "u2netp", fps["coffee"], b"mask", b"out")
    for _ in range(500):
        a.record(e.id, "exact")
    assert raw.hget(stores.prefix + "e:" + e.id, "hits") == b"0"  # reads stayed reads
    a.flush()
    assert raw.hget(stores.prefix + "e:" + e.id, "hits") == b"500"


# ----------------------------------------------------------- local tier


def test_local_tier_serves_blobs_but_never_deleted_entries(stores, raw, fps):
    a, b = stores(), stores()
    fp = fps["chelsea"]
    e = a.put(KEY, "u2netp", fp, b"mask", b"out")
    assert a.get_blob(e.output_digest) == b"out"
    raw.delete(stores.prefix + "blob:" + e.output_digest)
    assert a.get_blob(e.output_digest) == b"out"  # content-addressed: still the right bytes
    assert stores(local_lru_entries=0).get_blob(e.output_digest) is None
    assert a.find_exact(KEY, fp.sha256).id == e.id
    b.delete([e.id])  # another machine prunes it
    assert a.find_exact(KEY, fp.sha256) is None  # noticed at once
    assert a.find_pixel(KEY, fp.pixel_hash) is None


# ---------------------------------------------------------------- locks


def test_lease_keeps_a_claim_across_machines_until_released(stores):
    a, b = stores(), stores()
    lease = try_lease(a, "claim:inbox/shoot/001.jpg", 0.6)
    assert lease is not None
    time.sleep(1.5)  # well past the TTL: the lease thread kept extending it
    assert b.try_lock("claim:inbox/shoot/001.jpg", 0.6) is None
    assert not lease.lost.is_set()
    lease.release()
    assert b.try_lock("claim:inbox/shoot/001.jpg", 0.6)


# --------------------------------------------------------------- outages


def test_outage_fails_fast_and_recovers(tmp_path, redis_prefix, proxy, fps):
    from daemon.cache.redis import RedisStore

    s = RedisStore(store_cfg(tmp_path, redis_prefix, url=proxy.url, socket_timeout_s=0.5))
    s.BACKOFF_START_S = 0.3
    fp = fps["coffee"]
    e = s.put(KEY, "u2netp", fp, b"mask", b"out")
    assert s.available and s.outages == 0

    proxy.stop()
    took, exc = timed(lambda: s.find_exact(KEY, fp.sha256))
    assert exc is not None and took < 3, (took, exc)
    assert not s.available and s.outages == 1
    calls = {
        "find_pixel": lambda: s.find_pixel(KEY, fp.pixel_hash),
        "find_near": lambda: s.find_near(KEY, fp.phash, 10),
        "get_blob": lambda: s.get_blob(e.mask_digest),
        "put": lambda: s.put(KEY, "u2netp", fp, b"m", None),
        "delete": lambda: s.delete([e.id]),
        "entries": lambda: list(s.entries()),
        "count": s.count,
        "total_bytes": s.total_bytes,
        "tier_counts": lambda: s.tier_counts(0),
        "try_lock": lambda: s.try_lock("x", 5),
        "flush": s.flush,
    }
    with pytest.raises(StoreUnavailable):
        s.record(e.id, "exact")  # buffered for later, but the outage is not hidden
    for name, call in calls.items():
        took, exc = timed(call)
        assert exc is not None and took < 3, (name, took, exc)
    time.sleep(0.4)  # past the first backoff: the next call really tries (and fails) again
    took, exc = timed(s.count)
    assert isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError))
    took, exc = timed(s.count)  # within the (doubled) backoff: no network at all
    assert isinstance(exc, StoreUnavailable) and took < 0.05
    assert s.outages == 1  # one outage, however many failed calls

    proxy.start()  # same port
    assert wait_for(lambda: s.available, timeout=5)
    assert s.find_exact(KEY, fp.sha256).id == e.id
    s.flush()
    assert s.find_exact(KEY, fp.sha256).hits == 1  # the hit recorded during the outage survived
    assert s.outages == 1
    s.close()


def test_unresponsive_redis_times_out(tmp_path, redis_prefix, proxy, fps):
    from daemon.cache.redis import RedisStore

    cfg = store_cfg(tmp_path, redis_prefix, url=proxy.url, socket_timeout_s=0.5)
    s = RedisStore(cfg)
    s.BACKOFF_START_S = 0.2
    fp = fps["chelsea"]
    s.put(KEY, "u2netp", fp, b"mask", None)
    proxy.stall = True  # connections stay open, nothing comes back
    took, exc = timed(lambda: s.find_exact(KEY, fp.sha256))
    assert isinstance(exc, redis.exceptions.TimeoutError) and took < 3, (took, exc)
    assert not s.available
    t0 = time.monotonic()
    fresh = RedisStore(cfg)  # a daemon starting during the outage: no hang, no raise
    assert time.monotonic() - t0 < 3 and not fresh.available and fresh.outages == 1
    proxy.stall = False
    assert wait_for(lambda: s.available and fresh.available, timeout=5)
    assert fresh.find_exact(KEY, fp.sha256) is not None
    s.close()
    fresh.close()


def test_store_created_while_redis_is_down(tmp_path, redis_prefix, proxy, fps):
    from daemon.cache.redis import RedisStore

    proxy.stop()
    s = RedisStore(store_cfg(tmp_path, redis_prefix, url=proxy.url, socket_timeout_s=0.5))
    s.BACKOFF_START_S = 0.2
    assert not s.available and s.outages == 1
    with pytest.raises(OUTAGE):
        s.find_exact(KEY, fps["coffee"].sha256)
    proxy.start()
    assert wait_for(lambda: s.available, timeout=5)
    assert s.find_exact(KEY, fps["coffee"].sha256) is None
    s.close()


# ------------------------------------------------------- two machines


def _half_q80(rgb: np.ndarray) -> bytes:
    small = Image.fromarray(rgb).resize((rgb.shape[1] // 2, rgb.shape[0] // 2),
                                        Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=80)
    return buf.getvalue()


def test_two_machines_share_near_duplicates(tmp_path, models_dir, shared_engines, redis_prefix):
    from daemon.pipeline import Pipeline
    from daemon.cache.redis import RedisStore

    path = write_config(tmp_path, models_dir, store={
        "backend": "redis", "url": REDIS_URL, "prefix": redis_prefix})
    cfg = configmod.load(path)
    a = Pipeline(cfg, shared_engines, RedisStore(cfg))  # studio machine A
    b = Pipeline(cfg, shared_engines, RedisStore(cfg))  # studio machine B, same Redis
    opts = cfg.output_defaults
    rgb = photo("chelsea")
    original = encode(rgb, "JPEG", quality=95)
    ra = a.render_bytes(original, opts)
    assert ra.tier == "miss"

    dup = _half_q80(rgb)
    rb = b.render_bytes(dup, opts)
    assert rb.tier == "near", rb
    assert rb.metrics  # verified before reuse
    out = Image.open(io.BytesIO(rb.png))
    assert out.mode == "RGBA" and out.size == (rgb.shape[1] // 2, rgb.shape[0] // 2)
    # B's alias makes the re-encode an exact hit for every machine, A included
    assert a.render_bytes(dup, opts).tier == "exact"
    assert b.render_bytes(original, opts).tier == "exact"
    key = a.key_for(opts)[0]
    assert len(b.store.find_near(key, b.store.find_exact(key, hashlib.sha256(original).hexdigest()).fp.phash, 10)) == 1
    for p in (a, b):
        p.store.flush()
    counts = a.store.tier_counts(time.time() - 60)
    assert counts["miss"] == 1 and counts["near"] == 1 and counts["exact"] == 2
    assert a.store_errors == 0 and b.store_errors == 0
    for p in (a, b):
        p.store.close()


def test_two_machines_infer_a_new_image_once(tmp_path, models_dir, shared_engines, redis_prefix):
    """Single flight across machines: the Redis lock makes the second one wait and reuse."""
    from daemon.pipeline import Pipeline
    from daemon.cache.redis import RedisStore

    cfg = configmod.load(write_config(tmp_path, models_dir, store={
        "backend": "redis", "url": REDIS_URL, "prefix": redis_prefix}))
    machines = [Pipeline(cfg, shared_engines, RedisStore(cfg)) for _ in range(2)]
    data = encode(photo("astronaut"), "JPEG", quality=90)
    results: list = [None, None]
    start = threading.Barrier(2)

    def work(i: int) -> None:
        start.wait()
        results[i] = machines[i].render_bytes(data, cfg.output_defaults)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    tiers = sorted(r.tier for r in results)
    assert tiers[0] != tiers[1] and "miss" in tiers, tiers  # exactly one inference
    assert results[0].png == results[1].png
    assert machines[0].store.count() == 1
    for p in machines:
        p.store.close()


def test_pipeline_degrades_to_no_cache_during_an_outage(tmp_path, models_dir, shared_engines,
                                                        redis_prefix, proxy):
    from daemon.pipeline import Pipeline
    from daemon.cache.redis import RedisStore

    cfg = configmod.load(write_config(tmp_path, models_dir, store={
        "backend": "redis", "url": proxy.url, "prefix": redis_prefix, "socket_timeout_s": 0.5}))
    store = RedisStore(cfg)
    store.BACKOFF_START_S = 0.2
    p = Pipeline(cfg, shared_engines, store)
    opts = cfg.output_defaults
    cached = encode(photo("coffee"), "JPEG", quality=90)
    assert p.render_bytes(cached, opts).tier == "miss"
    proxy.stop()
    t0 = time.monotonic()
    r = p.render_bytes(encode(photo("rocket"), "JPEG", quality=90), opts)
    assert r.tier == "miss" and r.png  # processed, without the cache
    assert time.monotonic() - t0 < 10
    assert p.store_errors > 0 and not store.available
    proxy.start()
    assert wait_for(lambda: store.available, timeout=5)
    assert p.render_bytes(cached, opts).tier == "exact"
    store.close()
