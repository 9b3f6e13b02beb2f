"""RedisStore beyond the shared contract: eviction, outages, locks sharing its connection,
two machines on one cache, and the cache guard over a Redis outage."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REDIS_URL, encode, photo
from daemon import config as configmod
from daemon.imaging.fingerprint import fingerprint
from daemon.cache.base import StoreError, StoreUnavailable
from daemon.cache.guard import CacheGuard
from daemon.coord.leases import LeaseKeeper, try_lease
from daemon.coord.locks import RedisLocks, open_locks

import redis  # noqa: E402  (a declared dependency: never skipped, CI or not)

KEY = "k" * 32
OUTAGE = StoreError  # a backend raises nothing else for backend trouble
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


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
        cfg = store_cfg(tmp_path, redis_prefix, **store)
        s = RedisStore(cfg.store, cfg.cache)
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


def test_lease_keeps_a_claim_across_machines_until_released(tmp_path, redis_prefix, stores):
    a, b = stores(), stores()
    cfg = store_cfg(tmp_path, redis_prefix)
    la = open_locks(cfg.store, tmp_path / "cache", link=a.link)
    lb = open_locks(cfg.store, tmp_path / "cache", link=b.link)
    assert isinstance(la, RedisLocks) and la.link is a.link  # one connection, one breaker
    lease = try_lease(la, "claim:inbox/shoot/001.jpg", 0.6, LeaseKeeper())
    assert lease is not None
    time.sleep(1.5)  # well past the TTL: the keeper kept extending it
    assert lb.try_lock("claim:inbox/shoot/001.jpg", 0.6) is None
    assert not lease.lost.is_set()
    lease.release()
    assert lb.try_lock("claim:inbox/shoot/001.jpg", 0.6)


# --------------------------------------------------------------- outages


def proxied(tmp_path, prefix, proxy, backoff: float):
    from daemon.cache.redis import RedisStore

    cfg = store_cfg(tmp_path, prefix, url=proxy.url, socket_timeout_s=0.5)
    s = RedisStore(cfg.store, cfg.cache)
    s.link.outage.BACKOFF_START_S = backoff
    return cfg, s


def test_outage_fails_fast_and_recovers(tmp_path, redis_prefix, proxy, fps):
    cfg, s = proxied(tmp_path, redis_prefix, proxy, 0.3)
    locks = open_locks(cfg.store, tmp_path / "cache", link=s.link)
    fp = fps["coffee"]
    e = s.put(KEY, "u2netp", fp, b"mask", b"out")
    assert s.health().available

    proxy.stop()
    took, exc = timed(lambda: s.find_exact(KEY, fp.sha256))
    assert isinstance(exc, StoreUnavailable) and took < 3, (took, exc)
    assert isinstance(exc.__cause__, REDIS_DOWN)
    h = s.health()
    assert not h.available and "ConnectionError" in h.error
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
        "try_lock": lambda: locks.try_lock("x", 5),  # the locks share the store's breaker
        "flush": s.flush,
    }
    with pytest.raises(StoreUnavailable):
        s.record(e.id, "exact")  # buffered for later, but the outage is not hidden
    for name, call in calls.items():
        took, exc = timed(call)
        assert isinstance(exc, StoreUnavailable) and took < 3, (name, took, exc)
    time.sleep(0.4)  # past the first backoff: the next call really tries (and fails) again
    took, exc = timed(s.count)
    assert isinstance(exc, StoreUnavailable) and isinstance(exc.__cause__, REDIS_DOWN)
    took, exc = timed(s.count)  # within the (doubled) backoff: no network at all
    assert isinstance(exc, StoreUnavailable) and exc.__cause__ is None and took < 0.05

    proxy.start()  # same port
    assert wait_for(lambda: s.health().available, timeout=5)
    assert s.find_exact(KEY, fp.sha256).id == e.id
    s.flush()
    assert s.find_exact(KEY, fp.sha256).hits == 1  # the hit recorded during the outage survived
    s.close()


def test_unresponsive_redis_times_out(tmp_path, redis_prefix, proxy, fps):
    from daemon.cache.redis import RedisStore

    cfg, s = proxied(tmp_path, redis_prefix, proxy, 0.2)
    fp = fps["chelsea"]
    s.put(KEY, "u2netp", fp, b"mask", None)
    proxy.stall = True  # connections stay open, nothing comes back
    took, exc = timed(lambda: s.find_exact(KEY, fp.sha256))
    assert isinstance(exc, StoreUnavailable) and took < 3, (took, exc)
    assert isinstance(exc.__cause__, redis.exceptions.TimeoutError)
    assert not s.health().available
    t0 = time.monotonic()
    fresh = RedisStore(cfg.store, cfg.cache)  # a daemon starting during the outage: no raise
    fresh.link.outage.BACKOFF_START_S = 0.2
    assert time.monotonic() - t0 < 3
    assert not fresh.health().available
    proxy.stall = False
    assert wait_for(lambda: s.health().available and fresh.health().available, timeout=5)
    assert fresh.find_exact(KEY, fp.sha256) is not None
    s.close()
    fresh.close()


def test_store_created_while_redis_is_down(tmp_path, redis_prefix, proxy, fps):
    proxy.stop()
    _, s = proxied(tmp_path, redis_prefix, proxy, 0.2)
    assert not s.health().available
    with pytest.raises(StoreUnavailable):
        s.find_exact(KEY, fps["coffee"].sha256)
    proxy.start()
    assert wait_for(lambda: s.health().available, timeout=5)
    assert s.find_exact(KEY, fps["coffee"].sha256) is None
    s.close()


def test_redis_errors_that_are_not_outages_are_store_errors(stores, raw, fps):
    """Redis answered with an error (here: a key of the wrong type): StoreError, no outage."""
    a = stores()
    fp = fps["coffee"]
    raw.set(f"{stores.prefix}sha:{KEY}:{fp.sha256}", b"not a zset")
    with pytest.raises(StoreError) as info:
        a.find_exact(KEY, fp.sha256)
    assert not isinstance(info.value, StoreUnavailable)
    assert isinstance(info.value.__cause__, redis.exceptions.ResponseError)
    assert a.health().available


def test_guard_degrades_during_an_outage_and_recovers(tmp_path, redis_prefix, proxy, fps):
    """The guard owns "is the cache down": one cache_unavailable, defaults, one cache_recovered."""
    import structlog

    from daemon.cache.redis import RedisStore

    cfg = store_cfg(tmp_path, redis_prefix, url=proxy.url, socket_timeout_s=0.5, retry_s=0.3)

    def opener():
        s = RedisStore(cfg.store, cfg.cache)
        s.link.outage.BACKOFF_START_S = 0.2
        return s

    fp = fps["coffee"]
    with structlog.testing.capture_logs() as logs:
        guard = CacheGuard(cfg.store, cfg.cache, opener=opener)
        e = guard.call(lambda s: s.put(KEY, "u2netp", fp, b"mask", None))
        assert guard.status()["available"] and e is not None
        proxy.stop()
        for _ in range(5):
            assert guard.call(lambda s: s.find_exact(KEY, fp.sha256), default="down") == "down"
        st = guard.status()
        assert st["available"] is False and st["store_errors"] == 5 and st["outages"] == 1
        assert st["error"] and st["backend"] == "redis"
        proxy.start()
        assert wait_for(lambda: guard.status()["available"], timeout=5)
        assert guard.call(lambda s: s.find_exact(KEY, fp.sha256)).id == e.id
        guard.close()
    events = [x["event"] for x in logs if x["event"].startswith("cache_")]
    assert events == ["cache_unavailable", "cache_recovered"], events
    down = next(x for x in logs if x["event"] == "cache_unavailable")
    assert down["log_level"] == "error" and "without the cache" in down["effect"]


def test_the_cache_its_locks_and_its_guard_share_one_outage(tmp_path, redis_prefix, proxy, fps):
    """open_cache: a lock that cannot reach Redis opens the fail-fast window for the store
    too (one connection, one Outage), and the guard reports that very outage."""
    from daemon.service.app import open_cache

    cfg = store_cfg(tmp_path, redis_prefix, url=proxy.url, socket_timeout_s=0.5, retry_s=0.3)
    cache = open_cache(cfg)
    try:
        assert cache.guard.outage is cache.link.outage
        assert cache.guard.call(lambda s: s.count()) == 0
        proxy.stop()
        took, exc = timed(lambda: cache.locks.try_lock("claim:inbox/a.jpg", 5))
        assert isinstance(exc, StoreUnavailable) and isinstance(exc.__cause__, REDIS_DOWN)
        t0 = time.monotonic()
        assert cache.guard.call(lambda s: s.find_exact(KEY, fps["coffee"].sha256),
                                default="down") == "down"
        assert time.monotonic() - t0 < 0.05  # no network: the lock's failure already told
        st = cache.guard.status()
        assert not st["available"] and st["outages"] == 1 and "ConnectionError" in st["error"]
        proxy.start()
        assert wait_for(lambda: cache.guard.status()["available"], timeout=5)
        assert cache.locks.try_lock("claim:inbox/a.jpg", 5)
    finally:
        cache.close()
