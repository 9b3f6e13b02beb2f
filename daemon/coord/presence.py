"""Which daemons watch an inbox: one small presence file each, beside the claim files.

Every running daemon keeps ``<outbox>/.rembgd-claims/daemon.<host>.<pid>.json``
(what it watches, since when) and touches it while it runs; a file not touched
for ``STALE_S`` seconds, or left by a dead process on this host, is someone
gone. A daemon that finds another one on its inbox logs ``inbox_shared`` once
per peer: the claim files in that folder keep each source to one owner of its
fate, whatever the two caches are (issue 28, case 5). The file is removed at a
clean stop.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from daemon.coord.locks import _owner_is_dead
from daemon.nofollow import atomic_write_under

log = structlog.get_logger("rembgd.claims")

STALE_S = 30.0
REFRESH_S = 5.0
PREFIX = "daemon."


@dataclass
class Presence:
    claims_dir: Path
    inbox: Path
    cache: str  # the cache backend, for the log
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    seen: set[str] = field(default_factory=set)  # peers already logged
    _last: float = float("-inf")

    @property
    def path(self) -> Path:
        return self.claims_dir / f"{PREFIX}{self.host}.{self.pid}.json"

    def announce(self) -> None:
        """Write this daemon's presence file (never creating the outbox itself)."""
        self.claims_dir.mkdir(exist_ok=True)
        record = {"host": self.host, "pid": self.pid, "inbox": str(self.inbox),
                  "cache": self.cache, "started": time.time()}
        # the one atomic writer: its temp never outlives a failed write (a full disk)
        atomic_write_under(self.claims_dir, Path(self.path.name), json.dumps(record).encode())

    def tick(self, now: float | None = None) -> list[dict]:
        """Touch this daemon's file (every ``REFRESH_S``) and log any new peer on the same
        inbox; returns the peers seen now. A share outage is quiet (the pair is on standby
        and says so)."""
        now = time.monotonic() if now is None else now
        if now - self._last < REFRESH_S:
            return []
        self._last = now
        try:
            try:
                os.utime(self.path)
            except FileNotFoundError:
                self.announce()
            peers = self.peers()
        except OSError:
            return []
        for peer in peers:
            key = f"{peer['host']}:{peer['pid']}"
            if key not in self.seen:
                self.seen.add(key)
                log.warning("inbox_shared", inbox=str(self.inbox), other=key,
                            other_cache=peer.get("cache"), cache=self.cache,
                            effect=f"claim files in {self.claims_dir} keep each source to "
                                   "one daemon; every output is written once")
        return peers

    def peers(self) -> list[dict]:
        """The other live daemons in this claims folder whose inbox has this one's name."""
        found = []
        for entry in os.scandir(self.claims_dir):
            if not entry.name.startswith(PREFIX) or entry.name == self.path.name:
                continue
            try:
                if time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_S:
                    continue
                record = json.loads(Path(entry.path).read_text())
            except (OSError, ValueError):
                continue
            # another host may mount the share elsewhere: the claim keys name the inbox's
            # folder name, and the claims folder is the shared outbox's
            if not isinstance(record, dict) or Path(str(record.get("inbox"))).name != \
                    self.inbox.name:
                continue
            if _owner_is_dead(f"{record.get('host')}:{record.get('pid')}:"):
                continue
            found.append(record)
        return found

    def withdraw(self) -> None:
        try:
            self.path.unlink()
        except OSError:
            pass
