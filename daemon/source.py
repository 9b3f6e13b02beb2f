"""A source's identity: which inbox file it is and where its fate takes it.

``Source`` is the small value that ``daemon.fate`` (keep, done/, delete,
failed/, withdraw), ``daemon.review`` (held items) and ``daemon.verdict``
(Approve, Redo) take, so none of them needs the job that renders it. It is built
from a configured pair in one place, ``Source.for_pair``; ``daemon.job.Job``
wraps one with what rendering needs (the plan, the ledger).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from daemon.config import WatchPair
    from daemon.config.schema import ReviewConfig


@dataclass(frozen=True)
class Source:
    src: Path  # the file in the inbox
    rel: Path  # relative to the inbox; mirrored in the outbox
    outbox: Path
    failed_dir: Path | None = None  # None: report only (one-shot mode)
    done_dir: Path | None = None
    after_success: str = "keep"  # keep | move (to done_dir) | delete
    review: ReviewConfig | None = None  # the pair's review route (its folder), if any

    @classmethod
    def for_pair(cls, pair: WatchPair, rel: Path) -> Source:
        """The inbox file ``rel`` of ``pair``."""
        rel = Path(rel)
        return cls(pair.inbox / rel, rel, pair.outbox, pair.failed_dir, pair.done_dir,
                   pair.after_success, pair.review)

    @property
    def inbox(self) -> Path:
        return self.src.parents[len(self.rel.parts) - 1]

    @property
    def review_folder(self) -> Path | None:
        """Where this source's held cutouts go (None: its pair does not review)."""
        return self.review.folder(self.outbox) if self.review is not None else None

    def routed(self, review: ReviewConfig | None) -> Source:
        """The same source under another review route (a redo's, which never holds)."""
        return replace(self, review=review)
