"""The source ledger: what was processed, per input, so "done" never rests on mtimes alone.

One small JSON record per inbox file, ``<outbox>/.rembgd-ledger/<ab>/<sha1 of rel>.json``
(``ab``: the hash's first two hex digits, so no folder holds more than ~1/256 of them),
written atomically and link-proof (``daemon.fsutil``), so several daemons on
several hosts sharing the outbox over NFS/SMB see the same ledger. A record holds
the source's size, mtime_ns, ctime_ns, inode, device and host, its sha256 and the
outputs written (names relative to the outbox).

``state(rel, st)``:

* ``"done"``: a record whose size, mtime_ns, ctime_ns and inode all match (and the
  device too when this host wrote it: device numbers differ between NFS clients).
* ``"changed"``: a record that does not match. The caller hashes the file: if
  ``same_content(rel, sha256)`` it is done (e.g. ``touch``, a chmod, another host's
  inode numbers; refresh with ``record``), else it is processed again, whether
  its mtime is newer or older (``rsync -a``, ``cp -p``).
* ``"unknown"``: no record (or an unreadable one): a new file, or one processed by
  the version before the ledger.

Migration (outputs written before the ledger existed): ``adopt_legacy`` applies
the old rule once (output mtime >= source mtime) and, if it holds, writes a
record without a sha256, so from then on any change to the source is seen; such
a record's ``same_content`` is always False, so a "changed" legacy file is redone
rather than trusted. Without an output (or an older one) the file is processed.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from daemon.nofollow import LinkedPathError, atomic_write_under, read_under

LEDGER_DIR = ".rembgd-ledger"
VERSION = 1


@dataclass(frozen=True)
class Record:
    rel: str
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    dev: int
    host: str
    sha256: str | None
    outputs: tuple[str, ...]
    recorded: float
    legacy: bool = False

    def matches(self, st: os.stat_result, host: str) -> bool:
        same = (self.size, self.mtime_ns, self.ctime_ns, self.ino) == \
            (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        return same and (self.host != host or self.dev == st.st_dev)


def record_name(rel: Path) -> Path:
    """Where the record of inbox path ``rel`` lives, relative to the outbox."""
    key = hashlib.sha1(os.fsencode(Path(rel).as_posix())).hexdigest()
    return Path(LEDGER_DIR, key[:2], key + ".json")


def _rel_text(rel: Path) -> str:
    # undecodable bytes in a name must still make valid JSON
    return os.fsencode(Path(rel).as_posix()).decode("utf-8", "backslashreplace")


class Ledger:
    """The ledger of one outbox. Cheap to create; holds no state beyond the folder."""

    def __init__(self, outbox: Path, *, host: str | None = None):
        self.outbox = Path(outbox)
        self.host = host or socket.gethostname()

    def get(self, rel: Path) -> Record | None:
        """The record for ``rel``, or None (absent, unreadable or for another path)."""
        try:
            raw = json.loads(read_under(self.outbox, record_name(rel)))
            rec = Record(rel=raw["rel"], size=raw["size"], mtime_ns=raw["mtime_ns"],
                         ctime_ns=raw["ctime_ns"], ino=raw["ino"], dev=raw["dev"],
                         host=raw["host"], sha256=raw["sha256"], outputs=tuple(raw["outputs"]),
                         recorded=raw["recorded"], legacy=raw.get("legacy", False))
        except (FileNotFoundError, NotADirectoryError, LinkedPathError):
            return None  # a link planted in the ledger never vouches for anything
        except (ValueError, KeyError, TypeError):
            return None  # a torn or foreign record: treated as no record
        return rec if rec.rel == _rel_text(rel) else None

    def record(self, rel: Path, st: os.stat_result, sha256: str | None,
               outputs: list[Path] | tuple[Path, ...], *, legacy: bool = False) -> Record:
        """Note that ``rel``, as ``st`` describes it and with content ``sha256``, was
        processed into ``outputs`` (relative to the outbox)."""
        rec = Record(rel=_rel_text(rel), size=st.st_size, mtime_ns=st.st_mtime_ns,
                     ctime_ns=st.st_ctime_ns, ino=st.st_ino, dev=st.st_dev, host=self.host,
                     sha256=sha256, outputs=tuple(Path(o).as_posix() for o in outputs),
                     recorded=time.time(), legacy=legacy)
        data = {"version": VERSION, **rec.__dict__, "outputs": list(rec.outputs)}
        # never re-creates a vanished outbox (a share outage) on the local disk
        atomic_write_under(self.outbox, record_name(rel), (json.dumps(data) + "\n").encode(),
                           make_root=False)
        return rec

    def state(self, rel: Path, st: os.stat_result) -> str:
        """``"done"``, ``"changed"`` or ``"unknown"`` (see the module docstring)."""
        rec = self.get(rel)
        if rec is None:
            return "unknown"
        return "done" if rec.matches(st, self.host) else "changed"

    def same_content(self, rel: Path, sha256: str) -> bool:
        """True when ``rel`` was processed with exactly this content (by its sha256)."""
        rec = self.get(rel)
        return rec is not None and rec.sha256 is not None and rec.sha256 == sha256

    def adopt_legacy(self, rel: Path, st: os.stat_result, output: Path) -> bool:
        """For an inbox file with no record: if the previous version's rule says done
        (``output``, relative to the outbox, is at least as new as the source), record
        it as such (no sha256) and return True; else False (process it)."""
        try:
            out_st = os.stat(self.outbox / output, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
                return False
            raise
        if out_st.st_mtime_ns < st.st_mtime_ns:
            return False
        self.record(rel, st, None, [output], legacy=True)
        return True
