"""What the web page reads and does, as one Protocol (the supervisor implements it in
``daemon.service.console``), plus the plain records it hands over.

Pairs are named by their key (``WatchPair.key``: the pair's ``name``, else its inbox
path), which a reload that reorders or inserts pairs does not change; paths are
relative to one of the pair's roots (see ``ROOTS``) and are always resolved there
link-proof.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

ROOTS = ("outbox", "failed", "review", "inbox", "done")  # the only folders files come from


class Refused(ValueError):
    """An action that cannot be done now; the message says why (HTTP 409)."""


@dataclass(frozen=True)
class PairView:
    key: str  # WatchPair.key
    inbox: str  # as configured: the pair's label everywhere (page, metrics)
    outbox: str
    state: str  # watching | busy | standby
    why: str | None = None  # why it is on standby


@dataclass(frozen=True)
class RecentOutput:
    """One processed source, as the recent-outputs journal keeps it."""

    time: float
    pair: str  # WatchPair.key
    source_root: str | None  # "inbox" or "done" (where the source is now); None: deleted
    source_rel: str
    outputs: tuple[str, ...]  # relative to the outbox
    tier: str  # exact | pixel | near | miss
    model: str
    ms: float
    id: int | None = None  # the journal's row id (None until it is written)
    event: str = "delivered"  # delivered | held | approved | touched-up | reverted
    confidence: float | None = None  # the mask's score, when it was judged
    reasons: tuple[str, ...] = ()
    outputs_root: str = "outbox"  # "review" while held


@dataclass(frozen=True)
class FailedFile:
    pair: str  # WatchPair.key
    rel: str  # relative to failed/
    reason: str
    error: str
    time: float


@dataclass(frozen=True)
class WaitingFile:
    """A file in the inbox found empty or truncated: it is checked again with a backoff and
    goes to failed/ at ``gives_up`` unless it changes (a copy still running)."""

    pair: str  # WatchPair.key
    rel: str  # relative to the inbox
    gives_up: float  # wall-clock time
    checks: int


class Controller(Protocol):
    def snapshot(self) -> dict:
        """{"pairs": [PairView], "queued": int, "in_progress": int, "line": str, "cache":
        the status file's ``cache`` (``available`` False with ``error``: an outage)}; the
        line's counts are totals since the daemon started and say so ("since start:")."""

    def recent_outputs(self, limit: int) -> list[RecentOutput]:
        """The last ``limit`` outputs, newest first."""

    def failed_files(self) -> list[FailedFile]:
        """Files in failed/ with a sidecar, newest first."""

    def waiting_files(self) -> list[WaitingFile]:
        """Files waiting to become complete, the soonest to give up first."""

    def review_items(self) -> list:
        """``daemon.review.ReviewItem`` of every pair, newest first."""

    def roots(self, pair: str) -> dict[str, Path]:
        """The pair's folders by ``ROOTS`` name; FileNotFoundError for an unknown pair
        (as every method that takes a pair)."""

    def retry(self, pair: str, rel: str) -> Path:
        """Move failed/<rel> back into the inbox (its sidecar removed); where it landed."""

    def approve(self, pair: str, item_id: str) -> list[Path]:
        """Move a review item's outputs to the outbox, all or none (FileNotFoundError: no
        such item; Refused, saying why: the source is being processed, its bytes are not
        the ones the cutout was made from, the item was replaced by a newer cutout of the
        same source since the page was rendered, or an output is missing)."""

    def redo(self, pair: str, item_id: str, model: str) -> None:
        """Queue a review item's source again with ``model`` (Refused: an unknown or
        broken model, or the source is gone). The queued job goes ahead only while the
        source still waits for review (an Approve that came first wins)."""

    def models(self) -> list[str]:
        """Installed mask models a review item can be redone with."""

    def metrics(self) -> tuple[bytes, str]:
        """The Prometheus exposition (body, content type)."""

    def search_outputs(self, query: str, limit: int, offset: int
                       ) -> tuple[int, list[RecentOutput]]:
        """(how many outputs of the journal match ``query``, the page from ``offset``),
        newest first (``daemon.web.journal.parse_query``; QueryError for a bad term)."""

    def output(self, row: int) -> RecentOutput | None:
        """One output of the journal by its row id."""

    def latest_output(self, pair: str, source_rel: str) -> RecentOutput | None:
        """The newest journal entry of one source."""

    def dismiss(self, pair: str, rel: str) -> Path:
        """Move failed/<rel> and its sidecar aside into failed/.dismissed/ (never deleted);
        where the file went."""

    def touchup(self, pair: str, source_root: str, source_rel: str, strokes: list) -> list[Path]:
        """Apply brush strokes (``daemon.imaging.touchup.Stroke``) to the source's mask,
        re-render every deliverable and deliver them (a held item goes to the outbox);
        the corrected mask is kept in the cache. The delivered paths."""

    def prepare(self, pair: str, source_root: str, source_rel: str) -> None:
        """Start getting the source ready for a touch-up (decoded, its alpha made) in the
        background; returns at once."""

    def revert(self, pair: str, source_root: str, source_rel: str) -> list[Path]:
        """Drop the source's correction and deliver the model's mask again."""
