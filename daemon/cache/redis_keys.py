"""The shared store's key layout in Redis: key names, entry encoding, TTLs and eviction.

Owns where and how a ``RedisStore`` keeps its data (``daemon.cache.redis``
owns the operations, ``daemon.cache.redis_lua`` the scripts that walk these keys).

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

Eviction
--------
The project's own pruning (``daemon.cache.pruner``: TTL, max entries, max bytes,
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

* a **blob** (``blob:*``): an entry whose mask blob is gone reads as a miss
  (lookups check the mask blob) and is deleted; a missing output blob makes
  the pipeline drop that output row (the deliverable is re-rendered from the
  cached mask, or the image inferred again when the mask is gone too);
* an **entry hash** (``e:*``): every index pointing at it skips it, removes the
  dead member and deletes the rest of the entry through its skeleton;
  ``entries()`` does the same for entries nobody looks up;
* an **index** (``sha:*``, ``pix:*``, ``band:*``): that tier misses for those
  entries (a later tier or inference still answers; a new put re-indexes);
* ``ids``/``bytes``/``bref:*`` (allkeys-lru only): see above; a blob whose
  ``bref`` set vanished may be deleted while still referenced, which again
  reads as a miss.
"""
from __future__ import annotations

from typing import Any

import redis
import structlog

from daemon.cache.base import Entry, embedding_bytes, fingerprint_from

log = structlog.get_logger("rembgd.store")

SCHEMA_VERSION = 1


def warn_about_eviction(client: redis.Redis, key_ttl_s: int) -> None:
    """Log when Redis' eviction policy does not suit these keys (see "Eviction" above).

    Never raises a Redis error: a warning that cannot be checked is skipped.
    """
    try:
        mem = client.info("memory")
    except redis.exceptions.RedisError:
        return  # INFO may be disabled on a managed Redis
    policy, maxmem = mem.get("maxmemory_policy"), int(mem.get("maxmemory") or 0)
    if maxmem and policy == "noeviction":
        log.warning("redis_noeviction", maxmemory=maxmem,
                    effect="writes fail once Redis is full; use maxmemory-policy "
                           "volatile-lru (or allkeys-lru)")
    elif maxmem and str(policy).startswith("volatile") and not key_ttl_s:
        log.warning("redis_volatile_without_ttl", policy=policy,
                    effect="cache.limits.ttl_days is 0, so no key has a TTL and "
                           "nothing can be evicted; use allkeys-lru")


def text(v: bytes | str | None) -> str:
    """A Redis reply field as str ("" for None)."""
    return v.decode() if isinstance(v, bytes) else (v or "")


def pairs(flat: list) -> dict:
    """An HGETALL reply from a script (a flat list) as a dict."""
    return dict(zip(flat[::2], flat[1::2]))


class RedisKeys:
    """Key names under one prefix, and an entry's hash, skeleton and memberships."""

    def __init__(self, prefix: str):
        self.P = f"{prefix}:v{SCHEMA_VERSION}:"
        self.ids = f"{self.P}ids"
        self.bytes = f"{self.P}bytes"
        self.tier_hours = f"{self.P}tier_hours"

    def entry(self, eid: str) -> str:
        return f"{self.P}e:{eid}"

    def sha(self, key: str, sha: str) -> str:
        return f"{self.P}sha:{key}:{sha}"

    def pix(self, key: str, pix: str) -> str:
        return f"{self.P}pix:{key}:{pix}"

    def band(self, key: str, i: int, value: int) -> str:
        return f"{self.P}band:{key}:{i}:{value}"

    def blob(self, digest: str) -> str:
        return f"{self.P}blob:{digest}"

    def bref(self, digest: str) -> str:
        return f"{self.P}bref:{digest}"

    def tiers(self, hour: int | str) -> str:
        return f"{self.P}tiers:{hour}"

    # --------------------------------------------------------- encoding

    @staticmethod
    def fields(entry: Entry) -> dict[str, Any]:
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
    def decode(eid: str, raw: dict) -> Entry:
        h = {text(k): v for k, v in raw.items()}
        fp = fingerprint_from(text(h["sha"]), text(h["pix"]), bytes.fromhex(text(h["ph"])),
                              int(h["w"]), int(h["h"]), h["th"], h.get("emb") or None)
        return Entry(id=eid, key=text(h["key"]), model=text(h["model"]), fp=fp,
                     mask_digest=text(h["mask"]), output_digest=text(h.get("out")) or None,
                     nbytes=int(h["nb"]), created=float(h["c"]), last_hit=float(h["lh"]),
                     hits=int(h["hits"]), origin=text(h.get("o")) or None)

    def queue_entry(self, pipe, entry: Entry, ttl_s: int) -> None:
        """Queue the entry hash, its index memberships and its bookkeeping on ``pipe``."""
        fields = self.fields(entry)
        fp = entry.fp
        alias = entry.origin is not None
        digests = [d for d in (entry.mask_digest, entry.output_digest) if d]
        size = entry.nbytes + sum(len(v) if isinstance(v, bytes) else len(str(v))
                                  for v in fields.values()) + 64 * 24 + (0 if alias else 16 * 48)
        fields["sz"] = size
        skel = "\t".join(("-" if alias else fields["ph"], entry.key, fp.sha256, fp.pixel_hash,
                          entry.mask_digest, entry.output_digest or "", str(size)))
        ek = self.entry(entry.id)
        pipe.hset(ek, mapping=fields)
        if ttl_s:
            pipe.expire(ek, ttl_s)
        pipe.zadd(self.sha(entry.key, fp.sha256), {entry.id: entry.created})
        pipe.zadd(self.pix(entry.key, fp.pixel_hash), {entry.id: entry.created})
        if not alias:
            for i, v in enumerate(fp.bands):
                pipe.sadd(self.band(entry.key, i, v), entry.id)
        for d in digests:
            pipe.sadd(self.bref(d), entry.id)
            if ttl_s:
                pipe.expire(self.blob(d), ttl_s)
        pipe.hset(self.ids, entry.id, skel)
        pipe.incrby(self.bytes, size)
