"""Review: cutouts whose mask confidence is below a pair's ``review.min_confidence``.

Such a cutout is written to the pair's review folder (default ``<outbox>/../review``)
under the same relative path it would have in the outbox, with one sidecar per
source, ``<review>/.rembgd-review/<key>.json``, giving the score, why, and the
sha256 of the source bytes the cutout was made from. ``key`` is the first 20 hex
digits of the sha1 of the source's path relative to the inbox; an item's ``id``
is that key followed by 20 hex digits of this very hold (the content hash and
the time), so an id names one cutout, never a later one of the same source
(URL-safe, and never a path itself). Sidecars of older versions
(``<sha1>.json``, whose id is the sha1) are still read.

This module keeps the held items and moves their files: ``hold``, ``get``,
``list_items``, ``drop``, ``deliver`` (every output into the outbox, or none).
What a reviewer decides, Approve and Redo, is ``daemon.verdict``; recording an
item and dropping one that a redo delivered is ``daemon.fate``'s. Every state
change is logged once.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

from daemon.cache.base import Tier
from daemon.config import WatchPair
from daemon.config.schema import ReviewConfig
from daemon.fsutil import fsync_fd_quietly
from daemon.imaging.confidence import Confidence
from daemon.imaging.stamp import read_stamp
from daemon.nofollow import (LinkedPathError, atomic_write_under, dir_under, open_under,
                             read_under, unlink_under)

log = structlog.get_logger("rembgd.review")

SIDECARS = ".rembgd-review"
KEY_HEX = 20  # of an id: the source's key; the rest names the hold
_ID = re.compile(r"[0-9a-f]{40}")


class ReviewError(ValueError):
    """A review action that cannot be done (the message says why)."""


class NotFound(ReviewError):
    """No review item with that id."""


class Replaced(ReviewError):
    """The id names a cutout of a source that has since been held again: the reviewer
    has not seen the one that waits now."""


@dataclass(frozen=True)
class ReviewItem:
    id: str
    pair: str  # the inbox, as configured
    source_rel: str  # relative to the inbox
    outputs: tuple[str, ...]  # relative to the review folder (mirroring the outbox)
    confidence: float
    reasons: tuple[str, ...]
    model: str
    tier: Tier
    created: float
    sha256: str | None = None  # of the source bytes the cutout was made from (None: older)

    @property
    def key(self) -> str:
        """The source's key: one item per source waits at a time."""
        return self.id[:KEY_HEX]

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> ReviewItem:
        """Raises ValueError for a malformed sidecar, or one naming a path that is not
        plain and relative (a sidecar is never trusted to lead out of its folders)."""
        d = json.loads(data)
        if Tier.named(d["tier"]) is None:
            raise ValueError(f"tier {d['tier']!r} is not one of {', '.join(Tier)}")
        for rel in [d["source_rel"], *d["outputs"]]:
            p = Path(str(rel))
            if p.is_absolute() or any(part in ("", ".", "..") for part in p.parts) \
                    or not p.parts:
                raise ValueError(f"{rel!r} is not a plain relative path")
        return cls(id=str(d["id"]), pair=str(d["pair"]), source_rel=str(d["source_rel"]),
                   outputs=tuple(map(str, d["outputs"])), confidence=float(d["confidence"]),
                   reasons=tuple(map(str, d["reasons"])), model=str(d["model"]),
                   tier=Tier(d["tier"]), created=float(d["created"]),
                   sha256=str(d["sha256"]) if d.get("sha256") else None)


def _path_sha1(source_rel: Path) -> str:
    return hashlib.sha1(Path(source_rel).as_posix().encode("utf-8", "surrogateescape")
                        ).hexdigest()


def source_key(source_rel: Path) -> str:
    """The key of a source's sidecar (the first part of its items' ids)."""
    return _path_sha1(source_rel)[:KEY_HEX]


def item_id(source_rel: Path, sha256: str | None, created: float) -> str:
    """The id of one hold of ``source_rel``: its key, then this hold's content and time."""
    hold = hashlib.sha1(f"{sha256}:{created!r}".encode()).hexdigest()
    return source_key(source_rel) + hold[:40 - KEY_HEX]


def review_dir(pair: WatchPair) -> Path:
    """The pair's review folder: ``review.dir``, by default ``<outbox>/../review``."""
    return (pair.review or ReviewConfig()).folder(pair.outbox)


def _sidecar(key: str) -> Path:
    return Path(SIDECARS) / f"{key}.json"


def _sidecars_of(id_: str) -> list[Path]:
    """Where the item ``id_`` may be recorded: its source's sidecar, then (an id made by
    an older version, the sha1 of the path) that version's."""
    if not _ID.fullmatch(id_):
        raise NotFound(f"{id_!r} is not a review item id")
    return [_sidecar(id_[:KEY_HEX]), _sidecar(id_)]


def _legacy_sidecar(source_rel: Path) -> Path:
    return _sidecar(_path_sha1(source_rel))


def is_held(route: ReviewConfig | None, judged: Confidence | None) -> bool:
    """Whether a cutout goes to review: its pair routes and its score is below the bar."""
    return route is not None and judged is not None and judged.score < route.min_confidence


def hold(review_dir: Path, item: ReviewItem) -> Path:
    """Record ``item`` (its outputs already written under ``review_dir``); it replaces
    the source's item held before."""
    path = atomic_write_under(review_dir, _sidecar(item.key), item.to_json())
    unlink_under(review_dir, _legacy_sidecar(Path(item.source_rel)))
    log.info("review_held", source=item.source_rel, pair=item.pair, id=item.id,
             confidence=item.confidence, reasons=list(item.reasons), outputs=list(item.outputs))
    return path


def is_waiting(review_dir: Path, source_rel: Path) -> bool:
    """Whether ``source_rel``'s cutout waits in ``review_dir`` (a sidecar that cannot be
    read counts: the source is left for the reviewer)."""
    try:
        return waiting(review_dir, source_rel) is not None
    except ReviewError:
        return True


def waiting(review_dir: Path, source_rel: Path) -> ReviewItem | None:
    """The item of ``source_rel`` waiting in ``review_dir``, if any (ReviewError: its
    sidecar cannot be read)."""
    for sidecar in (_sidecar(source_key(source_rel)), _legacy_sidecar(source_rel)):
        try:
            return _read(review_dir, sidecar)
        except FileNotFoundError:
            continue
    return None


def _read(review_dir: Path, sidecar: Path) -> ReviewItem:
    try:
        return ReviewItem.from_json(read_under(review_dir, sidecar))
    except (ValueError, KeyError, TypeError) as exc:
        raise ReviewError(f"review item {sidecar.stem} has an unreadable sidecar: {exc}"
                          ) from None


def current(review_dir: Path, id_: str) -> ReviewItem:
    """The item that waits now for the source of ``id_`` (``id_`` itself, or a later hold
    of the same source); NotFound when none waits (never a path)."""
    for sidecar in _sidecars_of(id_):
        try:
            return _read(review_dir, sidecar)
        except FileNotFoundError:
            continue
    raise NotFound(f"no review item {id_}")


def get(review_dir: Path, id_: str) -> ReviewItem:
    """The item ``id_``: NotFound for an id that is not one (never a path), Replaced when
    its source has been held again since (the reviewer saw another cutout)."""
    item = current(review_dir, id_)
    if item.id != id_:
        raise Replaced(
            f"the cutout of {item.source_rel} was replaced by a newer one (held at "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(item.created))}); reload "
            "the page and review that one")
    return item


def list_items(review_dir: Path) -> list[ReviewItem]:
    """Every item waiting in ``review_dir``, newest first (an unreadable sidecar is
    logged and skipped)."""
    try:
        with dir_under(review_dir, Path(SIDECARS), create=False) as dfd:
            names = [n for n in os.listdir(dfd) if n.endswith(".json")]
    except FileNotFoundError:
        return []
    items = []
    for name in names:
        try:
            items.append(_read(review_dir, Path(SIDECARS) / name))
        except (ReviewError, OSError) as exc:
            log.warning("review_sidecar_unreadable", dir=str(review_dir), name=name,
                        error=str(exc))
    return sorted(items, key=lambda i: (-i.created, i.id))


def _move_in(review_dir: Path, rel: Path, outbox: Path) -> Path:
    """Rename ``review_dir/rel`` over ``outbox/rel`` (both walked without following a
    link), fsync the folder; across file systems, an atomic copy and then an unlink."""
    with dir_under(review_dir, rel.parent, create=False) as sfd, \
            dir_under(outbox, rel.parent, make_root=False) as dfd:
        st = os.stat(rel.name, dir_fd=sfd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            raise LinkedPathError(review_dir / rel)
        if not stat.S_ISREG(st.st_mode):
            raise ReviewError(f"{review_dir / rel} is not a regular file")
        try:
            os.rename(rel.name, rel.name, src_dir_fd=sfd, dst_dir_fd=dfd)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            atomic_write_under(outbox, rel, read_under(review_dir, rel), stat.S_IMODE(st.st_mode),
                               make_root=False)
            os.unlink(rel.name, dir_fd=sfd)
        fsync_fd_quietly(dfd)
    return outbox / rel


def _held_file(review_dir: Path, rel: Path) -> bool:
    """Whether ``review_dir/rel`` is a regular file (reached without following a link:
    LinkedPathError; anything else there: ReviewError)."""
    try:
        with dir_under(review_dir, rel.parent, create=False) as dfd:
            st = os.stat(rel.name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        raise LinkedPathError(review_dir / rel)
    if not stat.S_ISREG(st.st_mode):
        raise ReviewError(f"{review_dir / rel} is not a regular file")
    return True


def _delivered_before(outbox: Path, rel: Path, sha256: str | None) -> bool:
    """Whether ``outbox/rel`` is this item's output, moved by an approval cut short: its
    stamp names the item's source (an item of an older version: it is a file)."""
    try:
        with open_under(outbox, rel) as fh:
            return sha256 is None or read_stamp(fh) == sha256
    except Exception:  # absent, a link, unreadable, not stamped: not this item's
        return False


def deliver(review_dir: Path, item: ReviewItem, outbox: Path) -> list[Path]:
    """Move every output of ``item`` into ``outbox``, or none: each is checked first (a
    regular file in the review folder, or already in the outbox from an approval cut
    short), and a move that still fails puts the moved ones back. Returns the outputs'
    new paths; ReviewError (nothing moved) says what is missing."""
    rels = [Path(rel) for rel in item.outputs]
    todo = []
    for rel in rels:
        if _held_file(review_dir, rel):
            todo.append(rel)
        elif not _delivered_before(outbox, rel, item.sha256):
            raise ReviewError(f"{rel} is missing from {review_dir}; nothing was delivered "
                              "(Redo the item to make it again)")
    moved: list[Path] = []
    try:
        for rel in todo:
            _move_in(review_dir, rel, outbox)
            moved.append(rel)
    except BaseException:
        for rel in reversed(moved):  # all or none: the review folder gets them back
            try:
                _move_in(outbox, rel, review_dir)
            except OSError as exc:
                log.error("review_rollback_failed", path=str(outbox / rel), error=str(exc))
        raise
    return [outbox / rel for rel in rels]


def drop(review_dir: Path, item: ReviewItem, why: str) -> None:
    """Remove ``item``'s outputs and sidecar (its source was delivered otherwise)."""
    for rel in item.outputs:
        unlink_under(review_dir, Path(rel))
    forget(review_dir, item)
    log.info("review_dropped", source=item.source_rel, pair=item.pair, id=item.id, why=why)


def forget(review_dir: Path, item: ReviewItem) -> None:
    """Remove ``item``'s sidecar (its outputs were delivered or dropped)."""
    unlink_under(review_dir, _sidecar(item.key))
    unlink_under(review_dir, _legacy_sidecar(Path(item.source_rel)))


def drop_for(review_dir: Path, source_rel: Path, why: str) -> bool:
    """Drop the review item of ``source_rel`` if there is one; whether there was."""
    item = waiting(review_dir, source_rel)
    if item is None:
        return False
    drop(review_dir, item, why)
    return True


def new_item(pair: str, source_rel: Path, outputs: list[Path], confidence: float,
             reasons: tuple[str, ...], model: str, tier: Tier, *, sha256: str | None = None,
             created: float | None = None) -> ReviewItem:
    """The record of a cutout of ``source_rel`` (whose bytes hash to ``sha256``) held now."""
    created = time.time() if created is None else created
    return ReviewItem(item_id(source_rel, sha256, created), pair, Path(source_rel).as_posix(),
                      tuple(Path(o).as_posix() for o in outputs), confidence, reasons, model,
                      tier, created, sha256)
