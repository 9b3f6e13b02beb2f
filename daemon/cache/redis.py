"""Shared store: Redis index + blobs, for several daemons on one NAS inbox.

Owns the store operations over Redis: lookups, writes, coalesced hits,
deletes, scans and totals, and the local tier in front of them. Split out:
the key layout, entry encoding, TTLs and what Redis eviction does
(``daemon.cache.redis_keys``), the server-side scripts
(``daemon.cache.redis_lua``) and the connection with its outage breaker
(``daemon.cache.redis_link``, shared with ``daemon.coord.locks.RedisLocks``).

Consistency
-----------
``put`` writes the blobs first, then the entry and all its index memberships in
one MULTI/EXEC, then re-checks that the blobs still exist (a concurrent delete
may have dropped a blob that looked orphaned between the two steps) and writes
them again if not. ``delete`` is a Lua script: per id it removes the entry, its
index memberships, its ``bref`` memberships and every blob left unreferenced,
atomically. Lookups are Lua scripts that check that the entry hash *and* its
mask blob exist; an index member that fails the check is skipped, removed from
that index at once and the entry is then deleted completely (lazy cleanup).

Local tier
----------
An in-process LRU sits in front of Redis: blobs by digest (content-addressed,
so a cached blob is always right; bounded by ``store.local_lru_entries`` and
``LOCAL_BLOB_BYTES``) and entries by id. A cached entry is only used after the
lookup script has confirmed, in the same round trip, that the index still
points at it and that it and its mask blob still exist, so a deleted entry is
never returned; the cache merely saves transferring and decoding its thumbnails
and embedding (~20 KB). Hit counters in a cached entry may lag by ``ENTRY_FRESH_S``.

Outages: every call goes through a ``RedisLink``; a dead or unreachable Redis
raises ``StoreUnavailable`` within about one socket timeout, then fails fast
for a growing backoff; any other Redis error raises ``StoreError``.

Not for Redis Cluster: scripts touch keys derived from stored data.
"""
from __future__ import annotations

import hashlib
import threading
import time
import uuid
from typing import Callable, Iterable, Iterator

import numpy as np
import structlog

from daemon.cache import redis_lua as lua
from daemon.cache.base import (Tier, Entry, HitBuffer, StoreError, StoreHealth, StoreUnavailable,
                               describe)
from daemon.cache.lru import LRU
from daemon.cache.redis_keys import SCHEMA_VERSION, RedisKeys, pairs, text, warn_about_eviction
from daemon.cache.redis_link import OUTAGE_ERRORS, RedisLink
from daemon.config import CacheConfig, StoreConfig
from daemon.imaging.fingerprint import Fingerprint, phash_bands

__all__ = ["RedisStore", "RedisLink", "SCHEMA_VERSION", "OUTAGE_ERRORS"]

log = structlog.get_logger("rembgd.store")

NEAR_LIMIT = 16
TIER_HOURS_KEPT = 400 * 24
SCAN_BATCH = 500


class RedisStore:
    """The shared backend (see module docstring)."""

    name = "redis"
    HIT_FLUSH_S = 2.0
    ENTRY_FRESH_S = 30.0
    LOCAL_BLOB_BYTES = 64 * 1024 * 1024
    MAX_PENDING_HITS = 100_000  # kept across a failed flush, at most

    def __init__(self, store_cfg: StoreConfig, cache_cfg: CacheConfig,
                 link: RedisLink | None = None):
        """Never raises for an outage: the store starts unavailable and recovers by itself.

        ``link``: share another object's connection (it stays that object's to close).
        """
        sc = store_cfg
        self.url, self.prefix = sc.url, sc.prefix
        self.keys = RedisKeys(sc.prefix)
        self.P = self.keys.P
        days = cache_cfg.limits.ttl_days
        self.key_ttl_s = int((days + 1) * 86400) if days > 0 else 0
        self._owns_link = link is None
        self.link = link if link is not None else RedisLink(sc)
        self.client = self.link.client
        self._closed = False
        self._delete_script = self.client.register_script(lua.DELETE)
        self._lookup_script = self.client.register_script(lua.LOOKUP)
        self._near_script = self.client.register_script(lua.NEAR)
        self._fetch_script = self.client.register_script(lua.FETCH)
        self._hits_script = self.client.register_script(lua.HITS)

        n = sc.local_lru_entries
        self._blobs = LRU(n, self.LOCAL_BLOB_BYTES)
        self._entries = LRU(n)  # id -> (Entry, monotonic time fetched)
        self._hints = LRU(n)  # index key -> id it last resolved to

        self._mutex = threading.Lock()
        self._buffer = HitBuffer(self.MAX_PENDING_HITS)
        try:
            self._call(self.client.ping)
            warn_about_eviction(self.client, self.key_ttl_s)
        except StoreUnavailable:
            pass  # health() says so; the cache guard logs it

    def health(self) -> StoreHealth:
        if self._closed:
            return StoreHealth(False, error="the Redis store is closed")
        return self.link.health()

    def _call(self, fn: Callable, *args, **kw):
        if self._closed:
            raise StoreUnavailable("the Redis store is closed")
        return self.link.call(fn, *args, **kw)

    # ------------------------------------------------------------- keys

    # ------------------------------------------------------------ lookups

    def _lookup(self, index_key: str) -> Entry | None:
        hint = self._hints.get(index_key)
        cached = self._entries.get(hint) if hint else None
        if cached is None or time.monotonic() - cached[1] > self.ENTRY_FRESH_S:
            hint, cached = "", None
        eid, flat, dead = self._call(self._lookup_script, keys=[index_key], args=[self.P, hint])
        if dead:
            self._delete([text(d) for d in dead])
        eid = text(eid)
        if not eid:
            self._hints.pop(index_key)
            return None
        if cached is not None and not flat:
            return cached[0]
        entry = self.keys.decode(eid, pairs(flat))
        self._hints.put(index_key, eid)
        self._entries.put(eid, (entry, time.monotonic()))
        return entry

    def find_exact(self, key: str, sha256: str) -> Entry | None:
        return self._lookup(self.keys.sha(key, sha256))

    def find_pixel(self, key: str, pixel_hash: str) -> Entry | None:
        return self._lookup(self.keys.pix(key, pixel_hash))

    def find_near(self, key: str, phash: bytes, radius: int) -> list[Entry]:
        bands = phash_bands(phash)
        band_keys = [self.keys.band(key, i, v) for i, v in enumerate(bands)]
        ids, phs = self._call(self._near_script, keys=[*band_keys, self.keys.ids], args=[])
        if not ids:
            return []
        ids = [text(i) for i in ids]
        lost = [i for i, p in zip(ids, phs) if not p]
        if lost:  # skeleton gone (allkeys-lru): read the pHash from the entry itself
            with self.client.pipeline(transaction=False) as pipe:
                for eid in lost:
                    pipe.hget(self.keys.entry(eid), "ph")
                found = dict(zip(lost, self._call(pipe.execute)))
            gone = [eid for eid, p in found.items() if not p]
            if gone:
                with self.client.pipeline(transaction=False) as pipe:
                    for k in band_keys:
                        pipe.srem(k, *gone)
                    self._call(pipe.execute)
            phs = [p or found.get(eid) for eid, p in zip(ids, phs)]
        keep = [(eid, text(p)) for eid, p in zip(ids, phs) if p and len(p) == 64]
        if not keep:
            return []
        codes = np.frombuffer(bytes.fromhex("".join(p for _, p in keep)), np.uint8).reshape(-1, 32)
        query = np.frombuffer(bytes(phash), np.uint8)
        dist = np.unpackbits(codes ^ query, axis=1).sum(axis=1)
        close = sorted((int(d), eid) for d, (eid, _) in zip(dist, keep) if d <= radius)
        ids = [eid for _, eid in close[:NEAR_LIMIT]]
        if not ids:
            return []
        rows = self._call(self._fetch_script, keys=[], args=[self.P, *ids])
        out, dead = [], []
        for eid, flat in zip(ids, rows):
            if flat:
                out.append(self.keys.decode(eid, pairs(flat)))
            else:
                dead.append(eid)
        if dead:
            self._delete(dead)
        return out

    def get_blob(self, digest: str) -> bytes | None:
        data = self._blobs.get(digest)
        if data is not None:
            return data
        data = self._call(self.client.get, self.keys.blob(digest))
        if data is None:
            return None
        if hashlib.sha256(data).hexdigest() != digest:
            log.warning("cache_blob_corrupt", digest=digest[:12], effect="blob deleted")
            self._call(self.client.delete, self.keys.blob(digest))
            return None
        self._blobs.put(digest, data, len(data))
        return data

    # -------------------------------------------------------------- writes

    def put_blob(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        self._call(self.client.set, self.keys.blob(digest), data, ex=self.key_ttl_s or None)
        return digest

    def put(self, key: str, model: str, fp: Fingerprint, mask_png: bytes,
            output_png: bytes | None, origin: str | None = None) -> Entry:
        blobs = {self.put_blob(mask_png): mask_png}
        out_digest = None
        if output_png is not None:
            out_digest = self.put_blob(output_png)
            blobs[out_digest] = output_png
        now = time.time()
        entry = Entry(id=uuid.uuid4().hex, key=key, model=model, fp=fp,
                      mask_digest=next(iter(blobs)), output_digest=out_digest,
                      nbytes=len(mask_png) + (len(output_png) if output_png else 0),
                      created=now, last_hit=now, hits=0, origin=origin)
        self._write(entry, blobs, fresh=True)
        return entry

    def restore(self, entry: Entry) -> None:
        self._write(entry, {}, fresh=False)

    def _write(self, entry: Entry, blobs: dict[str, bytes], fresh: bool) -> None:
        digests = [d for d in (entry.mask_digest, entry.output_digest) if d]
        if not fresh:  # INSERT OR REPLACE: drop the old row, never the blobs we point to
            self._entries.pop(entry.id)
            self._call(self._delete_script, keys=[],
                       args=[self.P, len(digests), *digests, entry.id])
        with self.client.pipeline(transaction=True) as pipe:
            self._queue_entry(pipe, entry)
            for d in digests:
                pipe.exists(self.keys.blob(d))
            results = self._call(pipe.execute)
        # a concurrent delete may have dropped a blob it saw as orphaned: write it again
        for d, there in zip(digests, results[-len(digests):]):
            if not there and d in blobs:
                self._call(self.client.set, self.keys.blob(d), blobs[d], ex=self.key_ttl_s or None)

    def restore_many(self, entries: list[Entry], blobs: Iterable[bytes] = ()) -> None:
        """Write ``blobs``, then insert ``entries`` as-is, new ones in one pipeline; an id
        already stored is replaced as ``restore`` does."""
        known = self._call(self.client.hmget, self.keys.ids, [e.id for e in entries]) \
            if entries else []
        with self.client.pipeline(transaction=False) as pipe:
            for data in blobs:
                pipe.set(self.keys.blob(hashlib.sha256(data).hexdigest()), data,
                         ex=self.key_ttl_s or None)
            for e, there in zip(entries, known):
                if there is None:
                    self._queue_entry(pipe, e)
            self._call(pipe.execute)
        for e, there in zip(entries, known):
            if there is not None:
                self.restore(e)

    def _queue_entry(self, pipe, entry: Entry) -> None:
        self.keys.queue_entry(pipe, entry, self.key_ttl_s)

    def record(self, entry_id: str | None, tier: str) -> None:
        """Buffered; flushed every HIT_FLUSH_S and by ``flush()``.

        During an outage the count is kept for a later flush, but the call still
        raises, so that the caller does not take the store for recovered.
        """
        with self._mutex:
            self._buffer.add(entry_id, tier, time.time())
            due = self._buffer.due(self.HIT_FLUSH_S)
        if due or self.link.outage.unreachable:
            self.flush()  # on failure the counts are merged back for the next flush

    def flush(self) -> None:
        with self._mutex:
            hits, tiers = self._buffer.take()
        if not hits and not tiers:
            return
        try:
            with self.client.pipeline(transaction=False) as pipe:
                items = list(hits.items())
                for start in range(0, len(items), 1000):
                    args: list = [self.P, self.key_ttl_s]
                    for eid, (t, n) in items[start:start + 1000]:
                        args += [eid, repr(t), n]
                    self._hits_script(keys=[], args=args, client=pipe)
                hours = set()
                for (hour, tier), n in tiers.items():
                    pipe.hincrby(self.keys.tiers(hour), tier, n)
                    hours.add(hour)
                for hour in hours:
                    pipe.expire(self.keys.tiers(hour), TIER_HOURS_KEPT * 3600)
                    pipe.zadd(self.keys.tier_hours, {str(hour): hour})
                if hours:
                    pipe.zremrangebyscore(self.keys.tier_hours, 0, min(hours) - TIER_HOURS_KEPT)
                self._call(pipe.execute)
        except BaseException:
            self._merge_back(hits, tiers)
            raise
        for eid in hits:  # the local copies now lag behind: refetch on next use
            self._entries.pop(eid)

    def _merge_back(self, hits: dict, tiers: dict) -> None:
        with self._mutex:
            self._buffer.merge_back(hits, tiers)

    def delete(self, ids: list[str]) -> int:
        return self._delete(list(ids))

    def _delete(self, ids: list[str]) -> int:
        removed = 0
        for start in range(0, len(ids), 200):
            chunk = ids[start:start + 200]
            for eid in chunk:
                self._entries.pop(eid)
            n, freed = self._call(self._delete_script, keys=[], args=[self.P, 0, *chunk])
            removed += int(n)
            for d in freed:
                self._blobs.pop(text(d))
        return removed

    def delete_blob(self, digest: str) -> None:
        self._blobs.pop(digest)
        self._call(self.client.delete, self.keys.blob(digest))

    # ------------------------------------------------------------- scanning

    def entries(self) -> Iterator[Entry]:
        """Every entry, via HSCAN of the skeletons; dead ones are cleaned up on the way."""
        seen: set[str] = set()
        cursor = 0
        while True:
            cursor, batch = self._call(self.client.hscan, self.keys.ids, cursor,
                                       count=SCAN_BATCH)
            ids = [eid for eid in (text(b) for b in batch) if eid not in seen]
            seen.update(ids)
            if ids:
                with self.client.pipeline(transaction=False) as pipe:
                    for eid in ids:
                        pipe.hgetall(self.keys.entry(eid))
                    rows = self._call(pipe.execute)
                dead = []
                for eid, raw in zip(ids, rows):
                    if raw:
                        yield self.keys.decode(eid, raw)
                    else:
                        dead.append(eid)
                if dead:
                    self._delete(dead)
            if cursor == 0:
                return

    def blob_digests(self) -> Iterator[str]:
        seen: set[str] = set()
        cursor = 0
        plen = len(self.P) + len("blob:")
        while True:
            cursor, keys = self._call(self.client.scan, cursor, match=f"{self.P}blob:*",
                                      count=1000)
            for k in keys:
                d = text(k)[plen:]
                if d not in seen:
                    seen.add(d)
                    yield d
            if cursor == 0:
                return

    def tier_counts(self, since: float) -> dict[str, int]:
        self.flush()
        hours = self._call(self.client.zrangebyscore, self.keys.tier_hours,
                           int(since // 3600), "+inf")
        counts = dict.fromkeys(Tier, 0)
        if hours:
            with self.client.pipeline(transaction=False) as pipe:
                for h in hours:
                    pipe.hgetall(self.keys.tiers(text(h)))
                for row in self._call(pipe.execute):
                    for tier, n in row.items():
                        counts[text(tier)] = counts.get(text(tier), 0) + int(n)
        return counts

    def total_bytes(self) -> int:
        return max(0, int(self._call(self.client.get, self.keys.bytes) or 0))

    def count(self) -> int:
        return int(self._call(self.client.hlen, self.keys.ids))

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
        except StoreError as exc:
            log.warning("hit_counts_lost", error=describe(exc))
        finally:
            self._closed = True
            self._blobs.clear()
            self._entries.clear()
            if self._owns_link:
                self.link.close()
