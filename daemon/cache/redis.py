"""Shared store: Redis index + blobs, for several daemons on one NAS inbox.

Key layout
----------
Everything lives under ``P = "{prefix}:v{SCHEMA_VERSION}:"`` (``prefix`` from
``store.prefix``), so two caches or two schema versions never collide and a
whole cache can be dropped with ``SCAN MATCH P*``::

    P e:{id}                     hash    one entry: key, model, sha, pix, ph (hex), w, h,
                                         th (thumbnails), emb (float16 bytes), mask, out,
                                         nb, sz, c (created), lh (last_hit), hits, o (origin)
    P sha:{key}:{sha256}         zset    exact index: entry ids scored by created
    P pix:{key}:{pixel_hash}     zset    pixel index: entry ids scored by created
    P band:{key}:{i}:{value}     set     pHash band i (0-15) == value (16-bit int);
                                         inferred entries only (aliases are no near-candidates)
    P ids                        hash    id -> "phash-hex|-\\tkey\\tsha\\tpix\\tmask\\tout\\tsz":
                                         the skeleton of each entry, enough to find and
                                         remove every index membership even after the
                                         entry hash itself is gone; HLEN = count()
    P bytes                      string  sum of ``sz`` (blob bytes + index bytes) = total_bytes()
    P blob:{sha256}              string  blob bytes, checked against the digest on every read
    P bref:{sha256}              set     ids of the entries referencing that blob
    P tiers:{hour}               hash    tier -> lookups in that hour (kept 400 days)
    P tier_hours                 zset    the hours that have a tiers hash
    P lock:{name}                string  lock token (``daemon.coord.locks.RedisLocks``)

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

Eviction
--------
The project's own pruning (``daemon/prune.py``: TTL, max entries, max bytes,
run by one daemon at a time under the ``prune`` lock) is the primary mechanism
and keeps the cache below its limits. Redis eviction is the safety net for a
Redis that also serves other things or whose ``maxmemory`` is smaller than the
cache limits. Recommended:

* ``maxmemory-policy volatile-lru`` (best): entry hashes and blobs, the bulk of
  the memory, carry a TTL of ``cache.limits.ttl_days`` + 1 day, renewed when
  coalesced hits are flushed, so only they are evicted; the small bookkeeping
  keys (indexes, ``ids``, ``bytes``, ``bref``) have no TTL and are never
  evicted, so counts stay exact and cleanup is complete. With ``ttl_days: 0``
  nothing carries a TTL and volatile-lru cannot free anything: use allkeys-lru.
* ``maxmemory-policy allkeys-lru`` also works: any key may go, every loss reads
  as a miss and heals itself, but an evicted bookkeeping key makes ``count()``,
  ``total_bytes()`` or ``entries()`` (the pruner's view) incomplete until the
  affected entries are touched or expire.
* ``noeviction`` (Redis' default) with a ``maxmemory``: writes fail with OOM
  once full; ``put`` raises, the pipeline processes without caching new
  results, lookups keep working.

What an eviction does:

* a **blob** (``blob:*``): the entry reads as a miss (lookups check the mask
  blob; a missing output blob makes the pipeline drop the entry), and the entry
  is deleted; the image is inferred again and cached anew;
* an **entry hash** (``e:*``): every index pointing at it skips it, removes the
  dead member and deletes the rest of the entry through its skeleton;
  ``entries()`` does the same for entries nobody looks up;
* an **index** (``sha:*``, ``pix:*``, ``band:*``): that tier misses for those
  entries (a later tier or inference still answers; a new put re-indexes);
* ``ids``/``bytes``/``bref:*`` (allkeys-lru only): see above; a blob whose
  ``bref`` set vanished may be deleted while still referenced, which again
  reads as a miss.

Local tier
----------
An in-process LRU sits in front of Redis: blobs by digest (content-addressed,
so a cached blob is always right; bounded by ``store.local_lru_entries`` and
``LOCAL_BLOB_BYTES``) and entries by id. A cached entry is only used after the
lookup script has confirmed, in the same round trip, that the index still
points at it and that it and its mask blob still exist, so a deleted entry is
never returned; the cache merely saves transferring and decoding its thumbnails
and embedding (~20 KB). Hit counters in a cached entry may lag by ``ENTRY_FRESH_S``.

Outages
-------
Every call goes through a ``RedisLink`` (shared with ``RedisLocks``). It uses
``store.socket_timeout_s`` for connect and read, retries a broken pooled
connection once and never retries a timeout, so a dead or unreachable Redis
raises ``StoreUnavailable`` (the redis error is its cause) within about one
timeout. After a failure the link fails fast with ``StoreUnavailable`` for a
backoff (0.5 s, doubling per consecutive failure, at most 30 s) before trying
again; the next successful call ends the outage. Any other Redis error (OOM,
a script error) raises ``StoreError``. ``health()`` reports the outage state
(and probes with one PING once the backoff has passed); the cache guard
(``daemon.cache.guard``) turns it into the status file and the log.

Not for Redis Cluster: scripts touch keys derived from stored data.
"""
from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Callable, Iterator

import numpy as np
import redis
import structlog
from redis.backoff import NoBackoff
from redis.retry import Retry

from daemon.cache.base import (TIERS, Entry, HitBuffer, StoreError, StoreHealth, StoreUnavailable,
                               describe, embedding_bytes, fingerprint_from)
from daemon.config import CacheConfig, StoreConfig
from daemon.imaging.fingerprint import Fingerprint, phash_bands

log = structlog.get_logger("rembgd.store")

SCHEMA_VERSION = 1
NEAR_LIMIT = 16
OUTAGE_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
TIER_HOURS_KEPT = 400 * 24
SCAN_BATCH = 500

# ------------------------------------------------------------------ Lua

# Shared by the scripts: split a skeleton or read the same fields from an entry hash.
_LUA_SKELETON = r"""
local function skeleton(P, id)
  local s = redis.call('HGET', P .. 'ids', id)
  if s then
    local f = {}
    for part in (s .. '\t'):gmatch('(.-)\t') do f[#f + 1] = part end
    return f, true
  end
  local h = redis.call('HMGET', P .. 'e:' .. id, 'ph', 'key', 'sha', 'pix', 'mask', 'out', 'sz', 'o')
  if not h[2] then return nil, false end
  local ph = h[1]
  if h[8] and h[8] ~= '' then ph = '-' end
  return {ph, h[2], h[3], h[4], h[5], h[6] or '', h[7] or '0'}, false
end
"""

# ARGV: P, nkeep, keep digests..., ids...  ->  {removed, {freed digests}}
_LUA_DELETE = _LUA_SKELETON + r"""
local P = ARGV[1]
local nkeep = tonumber(ARGV[2])
local keep = {}
for i = 3, 2 + nkeep do keep[ARGV[i]] = true end
local removed, freed = 0, {}
for i = 3 + nkeep, #ARGV do
  local id = ARGV[i]
  local f, counted = skeleton(P, id)
  if f then
    local key = f[2]
    redis.call('ZREM', P .. 'sha:' .. key .. ':' .. f[3], id)
    redis.call('ZREM', P .. 'pix:' .. key .. ':' .. f[4], id)
    if f[1] ~= '-' and #f[1] == 64 then
      for b = 0, 15 do
        local v = tonumber(string.sub(f[1], 4 * b + 1, 4 * b + 4), 16)
        redis.call('SREM', P .. 'band:' .. key .. ':' .. b .. ':' .. string.format('%d', v), id)
      end
    end
    redis.call('DEL', P .. 'e:' .. id)
    if counted then
      redis.call('HDEL', P .. 'ids', id)
      redis.call('DECRBY', P .. 'bytes', f[7])
    end
    local digests = {f[5]}
    if f[6] ~= '' and f[6] ~= f[5] then digests[2] = f[6] end
    for _, d in ipairs(digests) do
      if d ~= '' then
        local rk = P .. 'bref:' .. d
        redis.call('SREM', rk, id)
        if redis.call('SCARD', rk) == 0 and not keep[d] then
          redis.call('DEL', P .. 'blob:' .. d)
          freed[#freed + 1] = d
        end
      end
    end
    removed = removed + 1
  end
end
return {removed, freed}
"""

# KEYS[1]: index zset. ARGV: P, hint id  ->  {id or '', fields or {}, {dead ids}}
_LUA_LOOKUP = r"""
local P, hint = ARGV[1], ARGV[2]
local dead = {}
for _ = 1, 32 do
  local first = redis.call('ZRANGE', KEYS[1], 0, 0)
  local id = first[1]
  if not id then break end
  local ek = P .. 'e:' .. id
  local mask = redis.call('HGET', ek, 'mask')
  if mask and redis.call('EXISTS', P .. 'blob:' .. mask) == 1 then
    if id == hint then return {id, {}, dead} end
    return {id, redis.call('HGETALL', ek), dead}
  end
  redis.call('ZREM', KEYS[1], id)
  dead[#dead + 1] = id
end
return {'', {}, dead}
"""

# KEYS[1..16]: band sets, KEYS[17]: ids hash  ->  {{ids}, {phash hex or false}}
_LUA_NEAR = r"""
local ids = redis.call('SUNION', unpack(KEYS, 1, 16))
local phs = {}
for i = 1, #ids, 2000 do
  local j = math.min(i + 1999, #ids)
  local part = redis.call('HMGET', KEYS[17], unpack(ids, i, j))
  for k = 1, j - i + 1 do
    local s = part[k]
    if s then phs[#phs + 1] = string.sub(s, 1, 64) else phs[#phs + 1] = false end
  end
end
return {ids, phs}
"""

# ARGV: P, ids...  ->  {fields or {} per id}; {} when the entry or its mask blob is gone
_LUA_FETCH = r"""
local P = ARGV[1]
local out = {}
for i = 2, #ARGV do
  local ek = P .. 'e:' .. ARGV[i]
  local mask = redis.call('HGET', ek, 'mask')
  if mask and redis.call('EXISTS', P .. 'blob:' .. mask) == 1 then
    out[#out + 1] = redis.call('HGETALL', ek)
  else
    out[#out + 1] = {}
  end
end
return out
"""

# ARGV: P, ttl seconds (0: none), then (id, last_hit, n) triples
_LUA_HITS = r"""
local P = ARGV[1]
local ttl = tonumber(ARGV[2])
for i = 3, #ARGV, 3 do
  local ek = P .. 'e:' .. ARGV[i]
  if redis.call('EXISTS', ek) == 1 then
    redis.call('HINCRBY', ek, 'hits', ARGV[i + 2])
    local last = tonumber(redis.call('HGET', ek, 'lh') or '0') or 0
    if tonumber(ARGV[i + 1]) > last then redis.call('HSET', ek, 'lh', ARGV[i + 1]) end
    if ttl > 0 then
      redis.call('EXPIRE', ek, ttl)
      local d = redis.call('HMGET', ek, 'mask', 'out')
      if d[1] and d[1] ~= '' then redis.call('EXPIRE', P .. 'blob:' .. d[1], ttl) end
      if d[2] and d[2] ~= '' then redis.call('EXPIRE', P .. 'blob:' .. d[2], ttl) end
    end
  end
end
return 1
"""



# ------------------------------------------------------------ local tier


class _LRU:
    """A small thread-safe LRU, bounded by item count and (optionally) total size."""

    def __init__(self, max_items: int, max_size: int | None = None):
        self.max_items, self.max_size = max_items, max_size
        self._data: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, k: Any) -> Any:
        with self._lock:
            item = self._data.get(k)
            if item is None:
                return None
            self._data.move_to_end(k)
            return item[0]

    def put(self, k: Any, v: Any, size: int = 0) -> None:
        if self.max_items <= 0 or (self.max_size is not None and size > self.max_size // 8):
            return
        with self._lock:
            old = self._data.pop(k, None)
            if old is not None:
                self._size -= old[1]
            self._data[k] = (v, size)
            self._size += size
            while self._data and (len(self._data) > self.max_items or
                                  (self.max_size is not None and self._size > self.max_size)):
                _, (_, s) = self._data.popitem(last=False)
                self._size -= s

    def pop(self, k: Any) -> None:
        with self._lock:
            old = self._data.pop(k, None)
            if old is not None:
                self._size -= old[1]

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._size = 0


# ------------------------------------------------------------------ store


def _s(v: bytes | str | None) -> str:
    return v.decode() if isinstance(v, bytes) else (v or "")


class RedisLink:
    """One Redis connection pool and its outage breaker (see "Outages" above).

    Shared by a ``RedisStore`` and its ``RedisLocks``. Thread-safe.
    """

    BACKOFF_START_S = 0.5
    BACKOFF_MAX_S = 30.0

    def __init__(self, store_cfg: StoreConfig):
        self.url = store_cfg.url
        self.client = redis.Redis.from_url(
            store_cfg.url, socket_timeout=store_cfg.socket_timeout_s,
            socket_connect_timeout=store_cfg.socket_timeout_s, socket_keepalive=True,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
            health_check_interval=0)
        self._health = threading.Lock()
        self._down = False
        self._down_until = 0.0
        self._backoff = self.BACKOFF_START_S
        self.outages = 0
        self.last_error: str | None = None

    @property
    def down(self) -> bool:
        """In an outage (the last call failed to reach Redis)."""
        return self._down

    def health(self) -> StoreHealth:
        """The outage state; probes Redis (one PING) once the backoff has passed."""
        if self._down and time.monotonic() >= self._down_until:
            try:
                self.call(self.client.ping)
            except StoreError:
                pass
        down = self._down
        return StoreHealth(available=not down, outages=self.outages,
                           error=self.last_error if down else None)

    def call(self, fn: Callable, *args, **kw):
        """``fn(*args, **kw)``; Redis errors become ``StoreUnavailable``/``StoreError``."""
        if self._down and time.monotonic() < self._down_until:
            raise StoreUnavailable(f"redis {_redacted(self.url)} unavailable "
                                   f"({self.last_error}); retrying in "
                                   f"{self._down_until - time.monotonic():.1f}s")
        try:
            result = fn(*args, **kw)
        except OUTAGE_ERRORS as exc:
            self._failed(exc)
            raise StoreUnavailable(f"redis {_redacted(self.url)} unreachable: "
                                   f"{type(exc).__name__}: {exc}") from exc
        except redis.exceptions.RedisError as exc:  # OOM, script or type errors: Redis answered
            raise StoreError(f"redis {_redacted(self.url)}: {type(exc).__name__}: {exc}") from exc
        if self._down:
            with self._health:
                if self._down:
                    self._down = False
                    self._backoff = self.BACKOFF_START_S
                    log.info("redis_reachable", url=_redacted(self.url))
        return result

    def _failed(self, exc: BaseException) -> None:
        with self._health:
            self.last_error = f"{type(exc).__name__}: {exc}"
            now = time.monotonic()
            if not self._down:
                self._down = True
                self.outages += 1
                self._backoff = self.BACKOFF_START_S
            elif now < self._down_until:
                return  # another thread's failure already set this window
            else:
                self._backoff = min(self._backoff * 2, self.BACKOFF_MAX_S)
            self._down_until = now + self._backoff

    def close(self) -> None:
        self.client.close()


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
        self.P = f"{sc.prefix}:v{SCHEMA_VERSION}:"
        days = cache_cfg.limits.ttl_days
        self.key_ttl_s = int((days + 1) * 86400) if days > 0 else 0
        self._owns_link = link is None
        self.link = link if link is not None else RedisLink(sc)
        self.client = self.link.client
        self._closed = False
        self._delete_script = self.client.register_script(_LUA_DELETE)
        self._lookup_script = self.client.register_script(_LUA_LOOKUP)
        self._near_script = self.client.register_script(_LUA_NEAR)
        self._fetch_script = self.client.register_script(_LUA_FETCH)
        self._hits_script = self.client.register_script(_LUA_HITS)

        n = sc.local_lru_entries
        self._blobs = _LRU(n, self.LOCAL_BLOB_BYTES)
        self._entries = _LRU(n)  # id -> (Entry, monotonic time fetched)
        self._hints = _LRU(n)  # index key -> id it last resolved to

        self._mutex = threading.Lock()
        self._buffer = HitBuffer(self.MAX_PENDING_HITS)
        try:
            self._call(self.client.ping)
            self._warn_about_eviction()
        except StoreUnavailable:
            pass  # health() says so; the cache guard logs it

    def health(self) -> StoreHealth:
        if self._closed:
            return StoreHealth(False, self.link.outages, "the Redis store is closed")
        return self.link.health()

    def _call(self, fn: Callable, *args, **kw):
        if self._closed:
            raise StoreUnavailable("the Redis store is closed")
        return self.link.call(fn, *args, **kw)

    def _warn_about_eviction(self) -> None:
        try:
            mem = self.client.info("memory")
        except redis.exceptions.RedisError:
            return  # INFO may be disabled on a managed Redis
        policy, maxmem = mem.get("maxmemory_policy"), int(mem.get("maxmemory") or 0)
        if maxmem and policy == "noeviction":
            log.warning("redis_noeviction", maxmemory=maxmem,
                        effect="writes fail once Redis is full; use maxmemory-policy "
                               "volatile-lru (or allkeys-lru)")
        elif maxmem and str(policy).startswith("volatile") and not self.key_ttl_s:
            log.warning("redis_volatile_without_ttl", policy=policy,
                        effect="cache.limits.ttl_days is 0, so no key has a TTL and "
                               "nothing can be evicted; use allkeys-lru")

    # -------------------------------------------------------------- keys

    def _k_entry(self, eid: str) -> str:
        return f"{self.P}e:{eid}"

    def _k_sha(self, key: str, sha: str) -> str:
        return f"{self.P}sha:{key}:{sha}"

    def _k_pix(self, key: str, pix: str) -> str:
        return f"{self.P}pix:{key}:{pix}"

    def _k_band(self, key: str, i: int, value: int) -> str:
        return f"{self.P}band:{key}:{i}:{value}"

    def _k_blob(self, digest: str) -> str:
        return f"{self.P}blob:{digest}"

    def _k_bref(self, digest: str) -> str:
        return f"{self.P}bref:{digest}"

    # --------------------------------------------------------- encoding

    @staticmethod
    def _fields(entry: Entry) -> dict[str, Any]:
        fp = entry.fp
        return {
            "key": entry.key, "model": entry.model, "sha": fp.sha256, "pix": fp.pixel_hash,
            "ph": bytes(fp.phash).hex(), "w": fp.width, "h": fp.height,
            "th": fp.thumbs.to_bytes(), "emb": embedding_bytes(fp.embedding),
            "mask": entry.mask_digest, "out": entry.output_digest or "",
            "nb": entry.nbytes, "c": repr(float(entry.created)),
            "lh": repr(float(entry.last_hit)), "hits": entry.hits, "o": entry.origin or "",
        }

    @staticmethod
    def _entry(eid: str, raw: dict) -> Entry:
        h = {_s(k): v for k, v in raw.items()}
        fp = fingerprint_from(_s(h["sha"]), _s(h["pix"]), bytes.fromhex(_s(h["ph"])),
                              int(h["w"]), int(h["h"]), h["th"], h.get("emb") or None)
        return Entry(id=eid, key=_s(h["key"]), model=_s(h["model"]), fp=fp,
                     mask_digest=_s(h["mask"]), output_digest=_s(h.get("out")) or None,
                     nbytes=int(h["nb"]), created=float(h["c"]), last_hit=float(h["lh"]),
                     hits=int(h["hits"]), origin=_s(h.get("o")) or None)

    @staticmethod
    def _pairs(flat: list) -> dict:
        return dict(zip(flat[::2], flat[1::2]))

    # ------------------------------------------------------------ lookups

    def _lookup(self, index_key: str) -> Entry | None:
        hint = self._hints.get(index_key)
        cached = self._entries.get(hint) if hint else None
        if cached is None or time.monotonic() - cached[1] > self.ENTRY_FRESH_S:
            hint, cached = "", None
        eid, flat, dead = self._call(self._lookup_script, keys=[index_key], args=[self.P, hint])
        if dead:
            self._delete([_s(d) for d in dead])
        eid = _s(eid)
        if not eid:
            self._hints.pop(index_key)
            return None
        if cached is not None and not flat:
            return cached[0]
        entry = self._entry(eid, self._pairs(flat))
        self._hints.put(index_key, eid)
        self._entries.put(eid, (entry, time.monotonic()))
        return entry

    def find_exact(self, key: str, sha256: str) -> Entry | None:
        return self._lookup(self._k_sha(key, sha256))

    def find_pixel(self, key: str, pixel_hash: str) -> Entry | None:
        return self._lookup(self._k_pix(key, pixel_hash))

    def find_near(self, key: str, phash: bytes, radius: int) -> list[Entry]:
        bands = phash_bands(phash)
        band_keys = [self._k_band(key, i, v) for i, v in enumerate(bands)]
        ids, phs = self._call(self._near_script, keys=[*band_keys, f"{self.P}ids"], args=[])
        if not ids:
            return []
        ids = [_s(i) for i in ids]
        lost = [i for i, p in zip(ids, phs) if not p]
        if lost:  # skeleton gone (allkeys-lru): read the pHash from the entry itself
            with self.client.pipeline(transaction=False) as pipe:
                for eid in lost:
                    pipe.hget(self._k_entry(eid), "ph")
                found = dict(zip(lost, self._call(pipe.execute)))
            gone = [eid for eid, p in found.items() if not p]
            if gone:
                with self.client.pipeline(transaction=False) as pipe:
                    for k in band_keys:
                        pipe.srem(k, *gone)
                    self._call(pipe.execute)
            phs = [p or found.get(eid) for eid, p in zip(ids, phs)]
        keep = [(eid, _s(p)) for eid, p in zip(ids, phs) if p and len(p) == 64]
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
                out.append(self._entry(eid, self._pairs(flat)))
            else:
                dead.append(eid)
        if dead:
            self._delete(dead)
        return out

    def get_blob(self, digest: str) -> bytes | None:
        data = self._blobs.get(digest)
        if data is not None:
            return data
        data = self._call(self.client.get, self._k_blob(digest))
        if data is None:
            return None
        if hashlib.sha256(data).hexdigest() != digest:
            log.warning("cache_blob_corrupt", digest=digest[:12], effect="blob deleted")
            self._call(self.client.delete, self._k_blob(digest))
            return None
        self._blobs.put(digest, data, len(data))
        return data

    # -------------------------------------------------------------- writes

    def put_blob(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        self._call(self.client.set, self._k_blob(digest), data, ex=self.key_ttl_s or None)
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
                pipe.exists(self._k_blob(d))
            results = self._call(pipe.execute)
        # a concurrent delete may have dropped a blob it saw as orphaned: write it again
        for d, there in zip(digests, results[-len(digests):]):
            if not there and d in blobs:
                self._call(self.client.set, self._k_blob(d), blobs[d], ex=self.key_ttl_s or None)

    def _queue_entry(self, pipe, entry: Entry) -> None:
        """Queue the entry hash, its index memberships and its bookkeeping on ``pipe``."""
        fields = self._fields(entry)
        fp = entry.fp
        alias = entry.origin is not None
        digests = [d for d in (entry.mask_digest, entry.output_digest) if d]
        size = entry.nbytes + sum(len(v) if isinstance(v, bytes) else len(str(v))
                                  for v in fields.values()) + 64 * 24 + (0 if alias else 16 * 48)
        fields["sz"] = size
        skel = "\t".join(("-" if alias else fields["ph"], entry.key, fp.sha256, fp.pixel_hash,
                          entry.mask_digest, entry.output_digest or "", str(size)))
        ek = self._k_entry(entry.id)
        pipe.hset(ek, mapping=fields)
        if self.key_ttl_s:
            pipe.expire(ek, self.key_ttl_s)
        pipe.zadd(self._k_sha(entry.key, fp.sha256), {entry.id: entry.created})
        pipe.zadd(self._k_pix(entry.key, fp.pixel_hash), {entry.id: entry.created})
        if not alias:
            for i, v in enumerate(fp.bands):
                pipe.sadd(self._k_band(entry.key, i, v), entry.id)
        for d in digests:
            pipe.sadd(self._k_bref(d), entry.id)
            if self.key_ttl_s:
                pipe.expire(self._k_blob(d), self.key_ttl_s)
        pipe.hset(f"{self.P}ids", entry.id, skel)
        pipe.incrby(f"{self.P}bytes", size)

    def record(self, entry_id: str | None, tier: str) -> None:
        """Buffered; flushed every HIT_FLUSH_S and by ``flush()``.

        During an outage the count is kept for a later flush, but the call still
        raises, so that the caller does not take the store for recovered.
        """
        with self._mutex:
            self._buffer.add(entry_id, tier, time.time())
            due = self._buffer.due(self.HIT_FLUSH_S)
        if due or self.link.down:
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
                    pipe.hincrby(f"{self.P}tiers:{hour}", tier, n)
                    hours.add(hour)
                for hour in hours:
                    pipe.expire(f"{self.P}tiers:{hour}", TIER_HOURS_KEPT * 3600)
                    pipe.zadd(f"{self.P}tier_hours", {str(hour): hour})
                if hours:
                    pipe.zremrangebyscore(f"{self.P}tier_hours", 0, min(hours) - TIER_HOURS_KEPT)
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
                self._blobs.pop(_s(d))
        return removed

    def delete_blob(self, digest: str) -> None:
        self._blobs.pop(digest)
        self._call(self.client.delete, self._k_blob(digest))

    # ------------------------------------------------------------- scanning

    def entries(self) -> Iterator[Entry]:
        """Every entry, via HSCAN of the skeletons; dead ones are cleaned up on the way."""
        seen: set[str] = set()
        cursor = 0
        while True:
            cursor, batch = self._call(self.client.hscan, f"{self.P}ids", cursor,
                                       count=SCAN_BATCH)
            ids = [eid for eid in (_s(b) for b in batch) if eid not in seen]
            seen.update(ids)
            if ids:
                with self.client.pipeline(transaction=False) as pipe:
                    for eid in ids:
                        pipe.hgetall(self._k_entry(eid))
                    rows = self._call(pipe.execute)
                dead = []
                for eid, raw in zip(ids, rows):
                    if raw:
                        yield self._entry(eid, raw)
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
                d = _s(k)[plen:]
                if d not in seen:
                    seen.add(d)
                    yield d
            if cursor == 0:
                return

    def tier_counts(self, since: float) -> dict[str, int]:
        self.flush()
        hours = self._call(self.client.zrangebyscore, f"{self.P}tier_hours",
                           int(since // 3600), "+inf")
        counts = dict.fromkeys(TIERS, 0)
        if hours:
            with self.client.pipeline(transaction=False) as pipe:
                for h in hours:
                    pipe.hgetall(f"{self.P}tiers:{_s(h)}")
                for row in self._call(pipe.execute):
                    for tier, n in row.items():
                        counts[_s(tier)] = counts.get(_s(tier), 0) + int(n)
        return counts

    def total_bytes(self) -> int:
        return max(0, int(self._call(self.client.get, f"{self.P}bytes") or 0))

    def count(self) -> int:
        return int(self._call(self.client.hlen, f"{self.P}ids"))

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


def _redacted(url: str) -> str:
    """The URL without a password."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
