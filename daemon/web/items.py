"""Items as the page and the API show them: one record per output, review item or
failed file, with an id that names it and is never a path.

Ids: ``o<row>`` an output in the journal, ``r<pair>-<id>`` a review item (its
``daemon.review.item_id``), ``f<pair>-<sha1>`` a failed file (the sha1 of its path
relative to failed/). ``<pair>`` is the pair's tag: 10 hex digits of the sha1 of its
key (``WatchPair.key``), so an id names the same pair after a reload that reorders
or inserts pairs, and never holds a path. Pure: the records in, dicts out.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from daemon.web.controller import FailedFile, RecentOutput

TAG_HEX = 10
_ID = re.compile(r"(?:o(\d{1,18})|([rf])([0-9a-f]{%d})-([0-9a-f]{40}))" % TAG_HEX)


class BadId(ValueError):
    """Not an item id (400)."""


@dataclass(frozen=True)
class ItemRef:
    kind: str  # output | review | failed
    row: int | None = None  # output
    tag: str | None = None  # review, failed: the pair's tag (``pair_tag``)
    key: str | None = None  # review: the item's id; failed: the sha1 of its path


def parse_id(text: str) -> ItemRef:
    m = _ID.fullmatch(text or "")
    if m is None:
        raise BadId(f"{text!r} is not an item id (o<n>, r<pair>-<id> or f<pair>-<sha1>)")
    if m.group(1) is not None:
        return ItemRef("output", row=int(m.group(1)))
    return ItemRef("review" if m.group(2) == "r" else "failed", tag=m.group(3),
                   key=m.group(4))


def pair_tag(pair: str) -> str:
    """The tag of the pair whose key is ``pair``, as item ids carry it."""
    return hashlib.sha1(pair.encode("utf-8", "surrogateescape")).hexdigest()[:TAG_HEX]


def failed_key(rel: str) -> str:
    return hashlib.sha1(rel.encode("utf-8", "surrogateescape")).hexdigest()


def failed_id(f: FailedFile) -> str:
    return f"f{pair_tag(f.pair)}-{failed_key(f.rel)}"


def review_id(pair: str, item) -> str:
    return f"r{pair_tag(pair)}-{item.id}"


def _file(pair: str, root: str | None, rel: str) -> dict:
    return {"pair": pair, "root": root, "path": rel}


def output_json(o: RecentOutput) -> dict:
    """An output of the journal as the API gives it."""
    return {"id": f"o{o.id}", "kind": "output", "pair": o.pair, "event": o.event,
            "time": o.time, "source": _file(o.pair, o.source_root, o.source_rel),
            "outputs": [_file(o.pair, o.outputs_root, rel) for rel in o.outputs],
            "tier": o.tier, "model": o.model, "confidence": o.confidence,
            "reasons": list(o.reasons), "ms": o.ms}


def review_json(pair: str, item) -> dict:
    return {"id": review_id(pair, item), "kind": "review", "pair": pair, "event": "held",
            "time": item.created, "source": _file(pair, "inbox", item.source_rel),
            "outputs": [_file(pair, "review", rel) for rel in item.outputs],
            "tier": item.tier, "model": item.model, "confidence": item.confidence,
            "reasons": list(item.reasons)}


def failed_json(f: FailedFile) -> dict:
    return {"id": failed_id(f), "kind": "failed", "pair": f.pair, "event": "failed",
            "time": f.time, "source": _file(f.pair, "failed", f.rel), "outputs": [],
            "tier": None, "model": None, "confidence": None, "reasons": [f.reason],
            "error": f.error}


def failure_groups(failed: list[FailedFile]) -> list[dict]:
    """Identical failures together: one group per (reason, error), the biggest first."""
    groups: dict[tuple[str, str], list[FailedFile]] = {}
    for f in failed:
        groups.setdefault((f.reason, f.error), []).append(f)
    return [{"reason": reason, "error": error, "files": files,
             "ids": [failed_id(f) for f in files]}
            for (reason, error), files in sorted(groups.items(), key=lambda g: -len(g[1]))]
