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
* ``"changed"``: a record that does not match: the file is processed again,
  whether its mtime is newer or older (``rsync -a``, ``cp -p``), and whatever
  changed (a ``touch`` or a chmod too: the cache's exact tier makes that redo
  cheap); the job's ``record`` then makes it ``"done"``.
* ``"unknown"``: no record (or an unreadable one): a new file, one processed by
  a version before the ledger, or a record lost (ledger deleted, torn record).

Without a trustworthy record the content decides (``vouch``): every output
carries the sha256 of the source it was made from (``daemon.imaging.stamp``);
when each output's stamp equals the source's sha256 the record is written again
and the file is done, otherwise it is processed. An mtime never vouches for a
file, however old: an ``rsync -a`` of another photo keeps its own old mtime.

Migration (outputs written before stamps): only on upgrade, i.e. until this
version's first full scan of the outbox is done (``adopted_mark``, a file in the
daemon's state folder, so that losing the ledger does not reopen it), the old
rule applies to a file with no record file at all and no stamped output: an
output at least as new as its source is adopted as done with a record without a
sha256, so from then on any change to the source is seen (and redone).
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

import structlog

from daemon.fsutil import atomic_write_bytes
from daemon.imaging.stamp import read_stamp
from daemon.nofollow import LinkedPathError, atomic_write_under, open_under, read_under

LEDGER_DIR = ".rembgd-ledger"
VERSION = 1

log = structlog.get_logger("rembgd.ledger")


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

    def __init__(self, outbox: Path, *, host: str | None = None,
                 adopted_mark: Path | None = None):
        """``adopted_mark``: the file that says the upgrade's adoption is over (None: no
        adoption at all, e.g. a ledger opened only to be read)."""
        self.outbox = Path(outbox)
        self.host = host or socket.gethostname()
        self.adopted_mark = adopted_mark
        self._adoption_closed = adopted_mark is None  # memo: once the mark is seen it stays

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

    def vouch(self, rel: Path, st: os.stat_result, src: Path, outputs: list[Path], *,
              hash_source: bool = True) -> bool:
        """For an inbox file with no trustworthy record (``state`` says "unknown"): True,
        with the record written again, when every output (relative to the outbox)
        carries the sha256 of ``src`` as it is; else False (process it). Outputs with no
        stamp at all count only on upgrade, by the old rule (see the module docstring).
        ``hash_source`` False (a scan: no reading of whole photos): stamped outputs give
        False, and the worker that gets the file checks again, hashing it."""
        stamps = [self._stamp(out) for out in outputs]
        torn = self._record_present(rel)
        if torn and hash_source:
            log.warning("ledger_record_unreadable", path=_rel_text(rel),
                        effect="the source stamps in its outputs decide whether it is redone")
        if any(stamp is not None for stamp in stamps):
            if not hash_source:
                return False
            sha = _sha256_file(src)
            if all(stamp == sha for stamp in stamps):
                self.record(rel, st, sha, outputs)
                log.debug("ledger_record_restored", path=_rel_text(rel),
                          reason="its outputs carry the source's sha256")
                return True
            return False
        if torn or not self.adoption_open():
            return False  # a torn record is no upgrade; after the upgrade only content counts
        return self._adopt_legacy(rel, st, outputs[0])

    def _stamp(self, output: Path) -> str | None:
        """``output``'s stamp; None (the source is redone) when it has none or it cannot
        be read: no error reading one output may stop the rescan or a worker."""
        try:
            with open_under(self.outbox, output) as fh:
                return read_stamp(fh)
        except OSError:  # missing, a link (never vouches), unreadable: no stamp
            return None
        except Exception as exc:  # a reader's bug on an odd file: the same, said once
            log.warning("output_stamp_unreadable", output=_rel_text(output),
                        error=f"{type(exc).__name__}: {exc}",
                        effect="taken as no stamp: the source is processed again")
            return None

    def _record_present(self, rel: Path) -> bool:
        try:
            os.lstat(self.outbox / record_name(rel))
        except OSError:
            return False
        return True

    def adoption_open(self) -> bool:
        """True until the first full scan of this version over the outbox is done."""
        if not self._adoption_closed:
            self._adoption_closed = os.path.lexists(self.adopted_mark)
        return not self._adoption_closed

    def close_adoption(self) -> None:
        """The upgrade's scan is done: outputs without a stamp never vouch again."""
        if self.adoption_open():
            atomic_write_bytes(self.adopted_mark, json.dumps(
                {"outbox": str(self.outbox), "time": time.time()}).encode())
            self._adoption_closed = True

    def _adopt_legacy(self, rel: Path, st: os.stat_result, output: Path) -> bool:
        """The previous version's rule: done if ``output`` (relative to the outbox) is at
        least as new as the source; then recorded as such (no sha256)."""
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


def _sha256_file(path: Path) -> str:
    """sha256 of a regular file, opened without following a link."""
    with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW)) as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def adopted_mark(state_dir: Path, outbox: Path) -> Path:
    """Where the daemon notes that ``outbox``'s upgrade adoption is over."""
    return Path(state_dir, "ledger-adopted",
                hashlib.sha1(os.fsencode(os.path.abspath(outbox))).hexdigest()[:16])
