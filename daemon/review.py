"""Review: cutouts whose mask confidence is below a pair's ``review.min_confidence``.

Such a cutout is written to the pair's review folder (default ``<outbox>/../review``)
under the same relative path it would have in the outbox, with one sidecar per
source, ``<review>/.rembgd-review/<id>.json``, giving the score and why. The
source stays where it is until the item is approved (then ``after_success``
applies) or redone. ``id`` is the sha1 of the source's path relative to the
inbox: stable, URL-safe, and never a path itself.

Actions: ``approve`` moves the outputs into the outbox (rename, fsync, never
through a link) and drops the sidecar; ``redo`` hands the source back to the
daemon with another model, and the review item is dropped when that delivers
(``drop_for``). Every state change is logged once.
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
from typing import Callable, TypeVar

import structlog

from daemon.config import WatchPair
from daemon.config.schema import ReviewConfig
from daemon.fate import Outcome, finish
from daemon.fsutil import fsync_fd_quietly
from daemon.imaging.confidence import Confidence
from daemon.nofollow import (LinkedPathError, atomic_write_under, dir_under, read_under,
                             unlink_under)
from daemon.pipeline import Plan

log = structlog.get_logger("rembgd.review")

T = TypeVar("T")
TIERS = ("exact", "pixel", "near", "miss")
SIDECARS = ".rembgd-review"
_ID = re.compile(r"[0-9a-f]{40}")


class ReviewError(ValueError):
    """A review action that cannot be done (the message says why)."""


class NotFound(ReviewError):
    """No review item with that id."""


@dataclass(frozen=True)
class ReviewItem:
    id: str
    pair: str  # the inbox, as configured
    source_rel: str  # relative to the inbox
    outputs: tuple[str, ...]  # relative to the review folder (mirroring the outbox)
    confidence: float
    reasons: tuple[str, ...]
    model: str
    tier: str
    created: float

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> ReviewItem:
        """Raises ValueError for a malformed sidecar, or one naming a path that is not
        plain and relative (a sidecar is never trusted to lead out of its folders)."""
        d = json.loads(data)
        if d["tier"] not in TIERS:
            raise ValueError(f"tier {d['tier']!r} is not one of {', '.join(TIERS)}")
        for rel in [d["source_rel"], *d["outputs"]]:
            p = Path(str(rel))
            if p.is_absolute() or any(part in ("", ".", "..") for part in p.parts) \
                    or not p.parts:
                raise ValueError(f"{rel!r} is not a plain relative path")
        return cls(id=str(d["id"]), pair=str(d["pair"]), source_rel=str(d["source_rel"]),
                   outputs=tuple(map(str, d["outputs"])), confidence=float(d["confidence"]),
                   reasons=tuple(map(str, d["reasons"])), model=str(d["model"]),
                   tier=str(d["tier"]), created=float(d["created"]))


def item_id(source_rel: Path) -> str:
    return hashlib.sha1(Path(source_rel).as_posix().encode("utf-8", "surrogateescape")
                        ).hexdigest()


def review_dir(pair: WatchPair) -> Path:
    """The pair's review folder: ``review.dir``, by default ``<outbox>/../review``."""
    return (pair.review or ReviewConfig()).folder(pair.outbox)


def _sidecar(id_: str) -> Path:
    if not _ID.fullmatch(id_):
        raise NotFound(f"{id_!r} is not a review item id")
    return Path(SIDECARS) / f"{id_}.json"


def is_held(route: ReviewConfig | None, judged: Confidence | None) -> bool:
    """Whether a cutout goes to review: its pair routes and its score is below the bar."""
    return route is not None and judged is not None and judged.score < route.min_confidence


def hold(review_dir: Path, item: ReviewItem) -> Path:
    """Record ``item`` (its outputs already written under ``review_dir``)."""
    path = atomic_write_under(review_dir, _sidecar(item.id), item.to_json())
    log.info("review_held", source=item.source_rel, pair=item.pair, id=item.id,
             confidence=item.confidence, reasons=list(item.reasons), outputs=list(item.outputs))
    return path


def is_waiting(review_dir: Path, source_rel: Path) -> bool:
    """Whether ``source_rel``'s cutout waits in ``review_dir``."""
    try:
        read_under(review_dir, _sidecar(item_id(source_rel)))
    except FileNotFoundError:
        return False
    return True


def get(review_dir: Path, id_: str) -> ReviewItem:
    """The item ``id_``; NotFound for an id that is not one (never a path)."""
    sidecar = _sidecar(id_)
    try:
        return ReviewItem.from_json(read_under(review_dir, sidecar))
    except FileNotFoundError:
        raise NotFound(f"no review item {id_}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ReviewError(f"review item {id_} has an unreadable sidecar: {exc}") from None


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
            items.append(get(review_dir, name[:-len(".json")]))
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


def approve(pair: WatchPair, id_: str) -> list[Path]:
    """Move the item's outputs into the pair's outbox, drop its sidecar, then apply the
    pair's ``after_success`` to the source. Returns the outputs' new paths."""
    folder = review_dir(pair)
    item = get(folder, id_)
    moved = []
    for rel in item.outputs:
        try:
            moved.append(_move_in(folder, Path(rel), pair.outbox))
        except FileNotFoundError:
            if not (pair.outbox / rel).is_file():  # moved by an approval cut short
                raise ReviewError(f"{rel} is missing from {folder}") from None
            moved.append(pair.outbox / rel)
    unlink_under(folder, _sidecar(item.id))
    log.info("review_approved", source=item.source_rel, pair=item.pair, id=item.id,
             outputs=[str(p) for p in moved])
    from daemon.job import Job  # here: the job imports this module to hold its cutouts

    rel = Path(item.source_rel)
    finish(Outcome(Job(pair.inbox / rel, rel, pair.outbox, Plan(pair.options, pair.outputs),
                       pair.failed_dir, pair.done_dir, pair.after_success), item.tier))
    return moved


def drop(review_dir: Path, item: ReviewItem, why: str) -> None:
    """Remove ``item``'s outputs and sidecar (its source was delivered otherwise)."""
    for rel in item.outputs:
        unlink_under(review_dir, Path(rel))
    unlink_under(review_dir, _sidecar(item.id))
    log.info("review_dropped", source=item.source_rel, pair=item.pair, id=item.id, why=why)


def drop_for(review_dir: Path, source_rel: Path, why: str) -> bool:
    """Drop the review item of ``source_rel`` if there is one; whether there was."""
    try:
        item = get(review_dir, item_id(source_rel))
    except NotFound:
        return False
    drop(review_dir, item, why)
    return True


def redo(pair: WatchPair, id_: str, model: str, submit: Callable[[Path, str], T]) -> T:
    """Hand the item's source back for processing with ``model``: ``submit(path, model)``,
    whose result is returned. Its outputs go to the outbox, and the item is dropped once
    they are written (the job's ``drop_for``)."""
    item = get(review_dir(pair), id_)
    inbox = pair.inbox
    source = inbox / item.source_rel
    try:
        st = os.lstat(source)
    except FileNotFoundError:
        raise ReviewError(f"the source {item.source_rel} is no longer in {inbox}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ReviewError(f"the source {item.source_rel} is not a regular file")
    log.info("review_redo", source=item.source_rel, pair=item.pair, id=item.id, model=model,
             was=item.model)
    return submit(source, model)


def new_item(pair: str, source_rel: Path, outputs: list[Path], confidence: float,
             reasons: tuple[str, ...], model: str, tier: str) -> ReviewItem:
    return ReviewItem(item_id(source_rel), pair, Path(source_rel).as_posix(),
                      tuple(Path(o).as_posix() for o in outputs), confidence, reasons, model,
                      tier, time.time())
