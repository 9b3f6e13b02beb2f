"""A reviewer's verdict on a held cutout: Approve or Redo (``daemon.review`` keeps the items).

One owner decides a source's fate at a time: Approve holds the source's claim
(``daemon.coord.claims.claim_source``, the one a job holds while it processes
the file) from before it looks at the item until the source is finished, so it
never races a running job, a redo, another Approve or another daemon. It
refuses (``ReviewError``, HTTP 409 on the page, saying why) when

* the source is being processed right now (``Busy``);
* the id names a cutout of the source that has been replaced by a newer one
  (``review.Replaced``): the reviewer never saw what waits now;
* the source's bytes are not the ones the cutout was made from (sha256), or it
  is gone: the new content is processed as it comes, nothing is delivered;
* an output is missing: nothing is moved (all the outputs or none).

Then it moves every output into the outbox, forgets the item and applies the
pair's ``after_success`` (``fate.finish``). Redo hands the source back to the
daemon with another model; that job, under the claim, goes ahead only while the
source still waits for review (an Approve that came first wins).
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import Callable, TypeVar

import structlog

from daemon import review
from daemon.config import WatchPair
from daemon.coord.claims import claim_source
from daemon.coord.leases import Leases
from daemon.fate import Outcome, finish
from daemon.nofollow import open_under
from daemon.review import ReviewError, ReviewItem
from daemon.source import Source

log = structlog.get_logger("rembgd.review")

T = TypeVar("T")
Claim = Callable[[Source], "Leases | None"]


class Busy(ReviewError):
    """The source is being processed (or decided) right now."""


def approve(pair: WatchPair, id_: str, *, claim: Claim | None = None) -> list[Path]:
    """Move the item's outputs into the pair's outbox, forget it, then apply the pair's
    ``after_success`` to the source; returns the outputs' new paths. ``claim``: how to
    claim the source (the daemon's locks; default: the claim file alone)."""
    folder = review.review_dir(pair)
    item = review.get(folder, id_)  # NotFound or Replaced before anything is claimed
    source = Source.for_pair(pair, Path(item.source_rel))
    lease = claim(source) if claim is not None else claim_source(None, source)
    if lease is None:
        raise Busy(f"{item.source_rel} is being processed right now; try again when it is "
                   "done (the page then shows what waits)")
    try:
        item = review.get(folder, id_)  # again, now that nobody else can change it
        made_from = _same_source(source, item)
        moved = review.deliver(folder, item, pair.outbox)
        review.forget(folder, item)
        log.info("review_approved", source=item.source_rel, pair=item.pair, id=item.id,
                 outputs=[str(p) for p in moved])
        finish(Outcome(source, item.tier, sha256=item.sha256, model=item.model,
                       written=moved, source_id=made_from))
    finally:
        lease.release()
    return moved


def _same_source(source: Source, item: ReviewItem) -> tuple[int, int]:
    """Refuse unless the inbox holds the very bytes the cutout was made from; returns that
    file's (st_dev, st_ino), so that only it is moved or deleted."""
    try:
        with open_under(source.inbox, source.rel) as fh:
            st = os.fstat(fh.fileno())
            now = hashlib.file_digest(fh, "sha256").hexdigest() if item.sha256 else None
    except FileNotFoundError:
        raise ReviewError(f"the source {item.source_rel} is no longer in {source.inbox}; "
                          "nothing was delivered") from None
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        raise ReviewError(f"the source {item.source_rel} is not a regular file") from None
    if item.sha256 is None:  # held by an older version: the file must not have changed since
        if max(st.st_mtime, st.st_ctime) > item.created:  # ctime: a file renamed over it
            raise ReviewError(f"the source {item.source_rel} changed after its cutout was "
                              "held; nothing was delivered, and the new file is processed")
    elif now != item.sha256:
        log.warning("review_source_changed", source=item.source_rel, id=item.id,
                    held=item.sha256, now=now, effect="not approved")
        raise ReviewError(f"the source {item.source_rel} is not the file its cutout was made "
                          f"from (sha256 {item.sha256[:12]}… then, {now[:12]}… now); nothing "
                          "was delivered, and the new file is processed as it comes")
    return (st.st_dev, st.st_ino)


def redo(pair: WatchPair, id_: str, model: str, submit: Callable[[Path, str], T]) -> T:
    """Hand the item's source back for processing with ``model``: ``submit(path, model)``,
    whose result is returned. Its outputs go to the outbox, and the item is dropped once
    they are written (``fate.finish``). An id of an earlier hold redoes the source too."""
    item = review.current(review.review_dir(pair), id_)
    source = Source.for_pair(pair, Path(item.source_rel))
    try:
        st = os.lstat(source.src)
    except FileNotFoundError:
        raise ReviewError(f"the source {item.source_rel} is no longer in {pair.inbox}"
                          ) from None
    if not stat.S_ISREG(st.st_mode):
        raise ReviewError(f"the source {item.source_rel} is not a regular file")
    log.info("review_redo", source=item.source_rel, pair=item.pair, id=item.id, model=model,
             was=item.model)
    return submit(source.src, model)
