"""The prune policy, pure: which cache entries to evict, in which order, and why.

``plan_prune``: entries, limits and a clock value in, an ordered list of
victims (each with the reason it goes and the bytes it frees) out.
``daemon.cache.pruner`` runs a plan against a store.

Decisions:

* **Aliases stay valid without their origin.** An alias row (``entry.origin``
  set: a pixel- or near-duplicate that reused another entry's mask) references
  its own ``mask_digest``/``output_digest``; the blobs are content-addressed and
  a store deletes a blob only when no remaining row references it. So evicting
  an origin never breaks its aliases and there is no cascade. An origin is,
  however, the only row near-duplicate search can find (aliases are not
  near-candidates), so an origin is ranked by its *family*: its last_hit is the
  newest of its own and its aliases', its hits the sum. A hot alias keeps its
  origin (a row, its blobs are shared anyway); a cold alias goes on its own.
* **Shared blobs are counted once.** Bytes are the sum of the distinct blobs
  referenced plus the index. Evicting an entry frees only the blobs no other
  surviving row references (``estimate_blob_sizes`` splits ``entry.nbytes``
  into per-blob sizes). The index (``index_bytes``: ``store.total_bytes()``
  minus the rows' ``nbytes``, i.e. the SQLite file and its WAL) is charged per
  row, ``index_bytes / n`` each: SQLite does not shrink its file (no VACUUM, it
  would block lookups), but new rows reuse the freed pages.
* **Hysteresis.** A run triggered by a crossed limit prunes down to
  ``limits.low_water`` of it (default 0.9), so the cache does not thrash by
  pruning one entry per insert.
* ``0`` disables a limit (``ttl_days``, ``max_entries``, ``max_bytes``).
* **Policies**: ``lru`` (oldest last hit first), ``lfu`` (fewest hits, ties by
  last hit) and ``lfu-decay`` (hits halved for every ``DECAY_GAPS`` median hit
  gaps an entry goes unhit; see ``bench/prune_policy.md``).
* **Deleting** goes through ``store.delete`` in batches of at most ``BATCH_IDS``,
  sized from the measured time of the previous batch to hold the store about
  ``BATCH_TARGET_MS``, with a short sleep between them. A deleted entry is
  simply not found by lookups (a miss), and the store removes a blob only when
  no row references it. Only one pruner runs at a time per store
  (``store.try_lock("prune")``), which matters when several daemons share a
  Redis cache. A plan is made from a snapshot: an entry hit between the plan
  and its batch is still deleted (a later miss).
"""
from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from daemon.config import CacheLimits

REASONS = ("ttl", "max_entries", "max_bytes")
DAY_S = 86400.0
BATCH_IDS = 200  # most ids per store.delete call
BATCH_MIN_IDS = 10
BATCH_TARGET_MS = 5.0  # batches are sized so one store.delete holds the store about this long
BATCH_PAUSE_S = 0.005  # between batches: the store mutex and the GIL go to lookups
LOCK_NAME = "prune"
LOCK_TTL_S = 300.0
DECAY_GAPS = 4.0  # lfu-decay half-life in median hit gaps (bench/prune_policy.md)


@dataclass(slots=True)
class Rec:
    """The fields of ``store.base.Entry`` a plan needs (no fingerprints: 200k rows fit)."""

    id: str
    model: str
    mask_digest: str
    output_digest: str | None
    nbytes: int
    created: float
    last_hit: float
    hits: int
    origin: str | None = None

    @classmethod
    def of(cls, e: Any) -> Rec:
        return cls(e.id, e.model, e.mask_digest, e.output_digest, int(e.nbytes), float(e.created),
                   float(e.last_hit), int(e.hits), e.origin)

    def digests(self) -> tuple[str, ...]:
        if self.output_digest and self.output_digest != self.mask_digest:
            return (self.mask_digest, self.output_digest)
        return (self.mask_digest,)


def slim(entries: Iterable[Any]) -> list[Rec]:
    """Stream entries into ``Rec``s, dropping fingerprints as it goes."""
    return [e if isinstance(e, Rec) else Rec.of(e) for e in entries]


@dataclass(frozen=True)
class Victim:
    id: str
    reason: str  # ttl | max_entries | max_bytes
    nbytes: int  # bytes freed: blobs no survivor references + the row's share of the index
    model: str = ""
    last_hit: float = 0.0
    hits: int = 0


@dataclass
class PrunePlan:
    victims: list[Victim]
    entries_before: int
    bytes_before: int
    entries_after: int
    bytes_after: int
    policy: str

    @property
    def ids(self) -> list[str]:
        return [v.id for v in self.victims]


# ------------------------------------------------------------- blob sizes


def _refs(recs: list[Rec]) -> dict[str, int]:
    refs: dict[str, int] = {}
    get = refs.get
    for r in recs:
        refs[r.mask_digest] = get(r.mask_digest, 0) + 1
        o = r.output_digest
        if o and o != r.mask_digest:
            refs[o] = get(o, 0) + 1
    return refs


def estimate_blob_sizes(recs: list[Rec], resolve: Callable[[str], int] | None = None,
                        refs: dict[str, int] | None = None) -> dict[str, int]:
    """Per-blob sizes from per-entry ``nbytes`` (mask + output), each blob counted once.

    ``nbytes = size(mask) + size(output)`` for every row, and rows that share a
    digest share its size, so known sizes propagate (an entry without output
    gives its mask's size; a known mask gives the output's). What stays unknown
    is a digest pair seen only together: if neither blob is shared, the split
    does not matter (they are freed together) and the output takes it all; if
    one is shared (a near alias reusing a same-size mask), ``resolve`` (e.g. the
    length of ``store.get_blob``) gives the exact size, else the shared blob is
    charged 0 and the unshared one the whole ``nbytes``: an overestimate, so a
    prune errs on freeing a little more.
    """
    refs = _refs(recs) if refs is None else refs
    size: dict[str, int] = {}
    pairs_of: dict[str, list[Rec]] = {}  # shared digest -> the two-blob rows referencing it
    pairs: list[Rec] = []
    for r in recs:
        m, o = r.mask_digest, r.output_digest
        if not o or o == m:
            size.setdefault(m, r.nbytes if not o else r.nbytes // 2)
        elif refs[m] == 1 and refs[o] == 1:  # freed together: the split does not matter
            size[m], size[o] = 0, r.nbytes
        else:
            pairs.append(r)
            for d in (m, o):
                if refs[d] > 1:
                    pairs_of.setdefault(d, []).append(r)

    def settle(queue: list[str]) -> None:  # propagate known sizes through shared digests
        while queue:
            d = queue.pop()
            for r in pairs_of.get(d, ()):
                other = r.output_digest if d == r.mask_digest else r.mask_digest
                if other not in size:
                    size[other] = max(0, r.nbytes - size[d])
                    queue.append(other)

    settle([d for d in pairs_of if d in size])
    for r in pairs:
        m, o = r.mask_digest, r.output_digest
        if m in size and o in size:
            continue
        if m in size or o in size:
            settle([m if m in size else o])
            continue
        shared = m if refs[m] > 1 else o
        size[shared] = max(0, min(r.nbytes, resolve(shared))) if resolve else 0
        settle([shared])
    return size


# ------------------------------------------------------------------ policy


def _families(recs: list[Rec]) -> tuple[list[float], list[int]]:
    """Effective (last_hit, hits) per position: an origin gets its aliases' too."""
    last = [r.last_hit for r in recs]
    hits = [r.hits for r in recs]
    pos: dict[str, int] | None = None
    for r in recs:
        if r.origin:
            if pos is None:
                pos = {x.id: k for k, x in enumerate(recs)}
            j = pos.get(r.origin)
            if j is not None:
                last[j] = max(last[j], r.last_hit)
                hits[j] += r.hits
    return last, hits


def decay_half_life(recs: list[Rec]) -> float:
    """``lfu-decay``'s half-life: DECAY_GAPS x the median gap between hits of hit entries.

    Adaptive, so it needs no setting and works in any time unit: an entry's
    count halves for every such stretch it goes unhit. Scaling on hit gaps
    (rather than on entry ages) keeps stale entries from slowing their own decay.
    With no hit entries at all it is infinite (plain LFU, which is then LRU).
    """
    gaps = sorted((r.last_hit - r.created) / r.hits for r in recs if r.hits > 0)
    if not gaps:
        return math.inf
    return max(DECAY_GAPS * gaps[len(gaps) // 2], 1.0)


def _order(recs: list[Rec], policy: str, now: float, last: list[float],
           hits: list[int]) -> list[int]:
    created = [r.created for r in recs]
    ids = [r.id for r in recs]
    if policy == "lru":
        key = lambda k: (last[k], created[k], ids[k])  # noqa: E731
    elif policy == "lfu":
        key = lambda k: (hits[k], last[k], created[k], ids[k])  # noqa: E731
    elif policy == "lfu-decay":
        rate = -math.log(2) / decay_half_life(recs)
        exp = math.exp
        key = lambda k: ((hits[k] + 1) * exp(rate * (now - last[k])),  # noqa: E731
                         last[k], created[k], ids[k])
    else:
        raise ValueError(f"unknown cache policy {policy!r}")
    return sorted(range(len(recs)), key=key)


def policy_order(recs: list[Rec], policy: str, now: float) -> list[Rec]:
    """``recs`` sorted coldest first under ``policy``."""
    recs = slim(recs)
    last, hits = _families(recs)
    return [recs[k] for k in _order(recs, policy, now, last, hits)]


def plan_prune(entries: Iterable[Any], limits: CacheLimits, now: float, index_bytes: int = 0,
               *, blob_sizes: dict[str, int] | None = None) -> PrunePlan:
    """The victims, in deletion order, each with its reason. Pure: nothing is deleted.

    1. ``ttl``: effective last hit older than ``ttl_days`` (all of them).
    2. ``max_entries``: if the survivors are more than ``max_entries``, the
       coldest under ``limits.policy`` until ``low_water * max_entries`` remain.
    3. ``max_bytes``: if the distinct blobs + index exceed ``max_bytes``, the
       coldest until it is at most ``low_water * max_bytes``.
    """
    recs = slim(entries)
    n = len(recs)
    refs = _refs(recs)
    sizes = blob_sizes if blob_sizes is not None else estimate_blob_sizes(recs, refs=refs)
    row_index = index_bytes / n if n else 0.0
    total = float(sum(sizes.get(d, 0) for d in refs) + index_bytes)
    bytes_before = int(total)
    victims: list[Victim] = []
    gone: set[int] = set()

    def evict(k: int, reason: str) -> None:
        nonlocal total
        r = recs[k]
        freed = row_index
        for d in r.digests():
            refs[d] -= 1
            if refs[d] == 0:
                freed += sizes.get(d, 0)
        total -= freed
        gone.add(k)
        victims.append(Victim(r.id, reason, int(round(freed)), r.model, r.last_hit, r.hits))

    last, hits = _families(recs)
    if limits.ttl_days > 0:
        cutoff = now - limits.ttl_days * DAY_S
        for k in sorted((k for k in range(n) if last[k] < cutoff), key=lambda k: last[k]):
            evict(k, "ttl")
    low = min(max(limits.low_water, 0.0), 1.0)
    over_n = limits.max_entries > 0 and n - len(gone) > limits.max_entries
    over_b = limits.max_bytes > 0 and total > limits.max_bytes
    if over_n or over_b:
        target_n = math.floor(limits.max_entries * low)
        target_b = limits.max_bytes * low
        # ranked over everything, so a family still counts members that went by ttl
        order = [k for k in _order(recs, limits.policy, now, last, hits) if k not in gone]
        i = 0
        if over_n:
            while i < len(order) and n - len(gone) > target_n:
                evict(order[i], "max_entries")
                i += 1
        if limits.max_bytes > 0 and (over_b or total > limits.max_bytes):
            while i < len(order) and total > target_b:
                evict(order[i], "max_bytes")
                i += 1
    return PrunePlan(victims, n, bytes_before, n - len(gone), int(round(max(total, 0))),
                     limits.policy)


# ------------------------------------------------------------------ runner


def last_daily(hhmm: str, now: float) -> float:
    """The latest local ``HH:MM`` at or before ``now`` (epoch seconds)."""
    hh, mm = (int(x) for x in hhmm.split(":"))
    local = _dt.datetime.fromtimestamp(now)
    at = local.replace(hour=hh, minute=mm, second=0, microsecond=0)
    if at.timestamp() > now:
        at = (local - _dt.timedelta(days=1)).replace(hour=hh, minute=mm, second=0, microsecond=0)
    return at.timestamp()
