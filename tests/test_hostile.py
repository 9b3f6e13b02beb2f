"""Hostile and odd inputs dropped into one running daemon (issue 8).

Every input has exactly one expected result:

* ``output``: a complete RGBA PNG of the right size appears in the outbox;
* ``failed``: the file is moved to failed/ with a ``.error.json`` sidecar whose
  ``reason`` is the expected one (its bytes are kept);
* ``skipped``: nothing is written anywhere, the source is left untouched, and a
  ``skipped`` log line names the path and the reason (symlinks, FIFOs, sockets);
* ``ignored``: dot-names such as ``..jpg`` match the default ignore patterns (the
  temp files of rsync, SMB and macOS) and are left alone silently, by design.

A name whose output name (name + ``.png``) would exceed NAME_MAX (255 bytes),
i.e. a source name of 252 bytes or more, cannot get an output: it fails cleanly,
before any decoding, into failed/ with reason ``name_too_long`` (the sidecar name
is shortened with a hash so that it fits; ``source`` inside names the file).
A 251-byte name gets its 255-byte output.

The corpus goes in in three waves (decoders, file-system oddities, names); after
each wave a canary image must still be processed by the same process.

Root: tests run as root, and root reads a mode-000 file. Where ``setpriv``
works, the daemon is started without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
(uid 0 still: the interpreter lives under /root, which ``nobody`` cannot
reach), so file modes apply to it and the unreadable file is really
unreadable: EACCES is retried (it is transient) and the file then goes to
failed/. Where that is impossible, root reads the file and it gets an output;
``test_unreadable_file_injected_eacces`` covers the EACCES path in-process
either way.

The events that a running daemon cannot be made to race deterministically
(a file deleted, or replaced, between the event and the processing, or
while it is being processed) are driven through ``Intake.process`` directly.
"""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from structlog.testing import capture_logs

from daemon.fate import Kind
from daemon.service.intake import Deferred
from tests.helpers import encode, write_config
from harness import ROOT, Daemon, wait_for

pytestmark = pytest.mark.slow

NAME_MAX = 255
MAX_PIXELS = 2_000_000  # the configured bomb limit of the hostile daemon


# ------------------------------------------------------------- generators


def picture(seed: int, w: int = 128, h: int = 96) -> np.ndarray:
    """A small distinct image: a coloured disc on a gradient."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.dstack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)),
                     np.full_like(xx, int(rng.integers(0, 255)))]).astype(np.uint8)
    cx, cy, r = w // 2, h // 2, max(1, min(w, h) // 3)
    img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 255, 3)
    return img


def jpeg(seed: int, w: int = 128, h: int = 96, **kw) -> bytes:
    return encode(picture(seed, w, h), "JPEG", quality=90, **kw)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_rgb16(w: int = 64, h: int = 48) -> bytes:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow cannot save one)."""
    rgb = picture(5, w, h).astype(">u2") * 257
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b""))


def png_bomb(w: int = 100_000, h: int = 100_000) -> bytes:
    """A valid PNG header declaring w x h pixels, over a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b""))


def jpeg_bomb() -> bytes:
    """A real small JPEG whose SOF0 header is patched to declare 65500 x 65500."""
    data = bytearray(jpeg(6, 32, 32))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 65500, 65500)
    return bytes(data)


def with_app1(data: bytes, payload: bytes) -> bytes:
    """Insert an APP1 (EXIF) segment right after SOI."""
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def corrupt_exif_jpeg() -> bytes:
    # a TIFF header whose first IFD offset points far past the end, then garbage
    payload = b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 0x7FFFFFF0) + os.urandom(40)
    return with_app1(jpeg(7), payload)


def bogus_orientation_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 9  # orientation must be 1-8
    return jpeg(8, exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [Image.fromarray(picture(s, 80, 60)).convert("P") for s in (9, 10, 11)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
    return buf.getvalue()


def palette_png_with_transparency() -> bytes:
    img = Image.fromarray(picture(12, 90, 70)).convert("P", palette=Image.Palette.ADAPTIVE,
                                                        colors=32)
    buf = io.BytesIO()
    img.save(buf, "PNG", transparency=0)
    return buf.getvalue()


def gray16_png() -> bytes:
    arr = (np.add.outer(np.arange(50), np.arange(70)) * 400).astype(np.uint16)
    return encode(arr, "PNG")


def cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(picture(13)).convert("CMYK").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def long_name(nbytes: int, suffix: str = ".jpg", fill: str = "L") -> str:
    base = fill * ((nbytes - len(suffix.encode())) // len(fill.encode()))
    name = base + suffix
    assert len(name.encode()) == nbytes, (len(name.encode()), nbytes)
    return name


# ------------------------------------------------------------ the daemon


DROP_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]


def can_drop_dac() -> bool:
    """Root here: can we start the daemon without the capabilities that ignore file modes?"""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return False
    return subprocess.run([*DROP_DAC, "true"], capture_output=True).returncode == 0


def bypasses_file_modes(pid: int) -> bool:
    """Does this process read files whatever their mode (uid 0 with CAP_DAC_OVERRIDE)?"""
    status = Path(f"/proc/{pid}/status").read_text()
    cap_eff = int(status.split("CapEff:")[1].split()[0], 16)
    euid = int(status.split("Uid:")[1].split()[1])
    return euid == 0 and bool(cap_eff & 0b110)  # CAP_DAC_OVERRIDE | CAP_DAC_READ_SEARCH


class ModeRespectingDaemon(Daemon):
    """The harness's daemon; as root, started without CAP_DAC_OVERRIDE/READ_SEARCH so that
    file modes apply to it as they would to a service user (uid stays 0: the interpreter
    lives under /root here, which an unprivileged account cannot reach)."""

    def start(self, wait_ready: bool = True) -> Daemon:
        if not can_drop_dac():
            return super().start(wait_ready)
        self._fh = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [*DROP_DAC, sys.executable, "-m", "daemon", "-c", str(self.config),
             "--log-format", "json", "run"],
            stdout=self._fh, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        if wait_ready:
            self.wait_log(lambda e: e.get("event") == "started", timeout=60)
        return self


class Corpus:
    """Inputs with their expected results, checked against the daemon's files and logs."""

    def __init__(self, root: Path):
        self.root = root
        self.inbox, self.outbox = root / "inbox", root / "outbox"
        self.failed = root / "failed"
        self.expect: dict[Path, tuple[str, object]] = {}
        self.content: dict[Path, bytes] = {}

    def output(self, name: str, data: bytes, size: tuple[int, int]) -> Path:
        return self._add(name, data, ("output", size))

    def failure(self, name: str, data: bytes, *reasons: str) -> Path:
        return self._add(name, data, ("failed", set(reasons)))

    def ignored(self, name: str, data: bytes) -> Path:
        return self._add(name, data, ("ignored", None))

    def skip(self, path: Path, reason: str) -> Path:
        self.expect[path] = ("skipped", reason)
        return path

    def _add(self, name: str, data: bytes, expect) -> Path:
        path = self.inbox / name
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.root / ".staging"  # write elsewhere, then rename in (complete files)
        staging.write_bytes(data)
        os.rename(staging, path)
        self.expect[path] = expect
        self.content[path] = data
        return path

    def sidecars(self) -> dict[str, dict]:
        out = {}
        for p in self.failed.rglob("*.error.json") if self.failed.exists() else ():
            rec = json.loads(p.read_text())
            out[rec["source"]] = rec
        return out

    def unmet(self, d: Daemon) -> list[str]:
        events = d.events()
        skipped = {e["path"]: e for e in events if e.get("event") == "skipped"}
        sidecars = self.sidecars()
        problems = []
        for path, (kind, detail) in self.expect.items():
            rel = path.relative_to(self.inbox)
            out = self.outbox / rel.with_name(rel.name + ".png")
            if kind == "output" and not os.path.lexists(out):
                problems.append(f"no output for {rel}")
            elif kind == "failed" and str(path) not in sidecars:
                problems.append(f"no sidecar for {rel}")
            elif kind == "skipped" and str(path) not in skipped:
                problems.append(f"no skip log for {rel}")
        return problems

    def wait(self, d: Daemon, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while (left := self.unmet(d)) and time.monotonic() < deadline:
            assert d.proc.poll() is None, f"daemon died:\n{d.tail()}"
            time.sleep(0.2)
        assert not left, f"{left}\n{d.tail(30)}"


def canary(c: Corpus, d: Daemon, n: int) -> None:
    """The same process still turns a good image into an output."""
    path = c.output(f"canary-{n}.jpg", jpeg(100 + n), (128, 96))
    wait_for(lambda: (c.outbox / f"canary-{n}.jpg.png").exists(), timeout=60)
    assert d.proc.poll() is None
    assert path.exists()  # after_success: keep


def test_hostile_corpus_in_one_daemon(tmp_path, models_dir):
    root = tmp_path
    (root / "outside").mkdir()
    cfg = write_config(root, models_dir, max_image_pixels=MAX_PIXELS, retry_attempts=2,
                       retry_backoff_s=0.2, workers=2, incomplete_timeout_s=2)
    c = Corpus(root)
    outside_file = root / "outside" / "secret.jpg"
    outside_file.write_bytes(jpeg(1))
    (root / "outside" / "dir").mkdir()
    (root / "outside" / "dir" / "inner.jpg").write_bytes(jpeg(2))
    before_outside = {p: p.read_bytes() for p in (root / "outside").rglob("*") if p.is_file()}
    passwd = Path("/etc/passwd").read_bytes()
    before_all = snapshot(root)

    d = ModeRespectingDaemon(cfg, log=root / "daemon.log")
    with d:
        reads_anything = bypasses_file_modes(d.proc.pid)
        # -- wave 1: decoders
        c.failure("zero.jpg", b"", "incomplete")  # waited for, then failed as incomplete
        c.failure("truncated.jpg", jpeg(20)[:900], "truncated", "incomplete")
        c.failure("truncated.png", encode(picture(21), "PNG")[:700], "truncated", "incomplete")
        c.failure("text.jpg", b"this is not an image\n" * 20, "unsupported")
        c.failure("html.png", b"<!doctype html><html><body>hi</body></html>", "unsupported")
        c.failure("pdf.jpg", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "unsupported")
        c.failure("random.webp", np.random.default_rng(3).bytes(3000), "unsupported")
        c.failure("bomb.png", png_bomb(), "too_large")
        c.failure("bomb.jpg", jpeg_bomb(), "too_large")
        c.failure("over-limit.jpg", jpeg(22, 1500, 1500), "too_large")  # 2.25 MP > 2 MP
        c.output("one-by-one.png", encode(np.full((1, 1, 3), 200, np.uint8), "PNG"), (1, 1))
        c.output("wide.png", encode(picture(23, 20000, 50), "PNG"), (20000, 50))
        c.output("cmyk.jpg", cmyk_jpeg(), (128, 96))
        c.output("gray16.png", gray16_png(), (70, 50))
        c.output("rgb16.png", png_rgb16(), (64, 48))
        c.output("palette-trns.png", palette_png_with_transparency(), (90, 70))
        c.output("animated.gif", animated_gif(), (80, 60))
        c.output("bogus-orientation.jpg", bogus_orientation_jpeg(), (128, 96))
        c.output("corrupt-exif.jpg", corrupt_exif_jpeg(), (128, 96))
        c.output("really-a-jpeg.png", jpeg(24), (128, 96))  # format from content, not name
        unreadable = c.inbox / "mode000.jpg"
        if not reads_anything:  # really unreadable: EACCES is retried, then failed/
            c.failure("mode000.jpg", jpeg(25), "transient")
        else:  # root with CAP_DAC_OVERRIDE (setpriv unavailable) reads mode 000
            c.output("mode000.jpg", jpeg(25), (128, 96))
        os.chmod(unreadable, 0)
        c.wait(d)
        canary(c, d, 1)

        # -- wave 2: things that are not regular files inside the inbox
        c.skip(c.inbox / "passwd.jpg", "symbolic link")
        os.symlink("/etc/passwd", c.inbox / "passwd.jpg")
        c.skip(c.inbox / "outside.jpg", "symbolic link")
        os.symlink(outside_file, c.inbox / "outside.jpg")
        c.skip(c.inbox / "dangling.jpg", "symbolic link")
        os.symlink(root / "nowhere.jpg", c.inbox / "dangling.jpg")
        c.skip(c.inbox / "linked-dir", "symbolic link")
        os.symlink(root / "outside" / "dir", c.inbox / "linked-dir")
        c.skip(c.inbox / "fifo.jpg", "not a regular file")
        os.mkfifo(c.inbox / "fifo.jpg")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.skip(c.inbox / "socket.jpg", "not a regular file")
        sock.bind(str(c.inbox / "socket.jpg"))
        (c.inbox / "x.jpg").mkdir()  # a folder named like an image is a folder: recursed into
        c.output("x.jpg/inner.jpg", jpeg(26), (128, 96))
        c.wait(d)
        canary(c, d, 2)
        sock.close()

        # -- wave 3: names (one content: after the first, exact cache hits)
        same = jpeg(27)
        c.output("name with  spaces.jpg", same, (128, 96))
        c.output("Ünïcødé 写真 📷.jpg", same, (128, 96))
        c.output("new\nline.jpg", same, (128, 96))
        c.output("-leading-dash.jpg", same, (128, 96))
        c.output("--help", same, (128, 96))
        c.output("a..b..jpg", same, (128, 96))
        c.output("x..", same, (128, 96))
        c.ignored("..jpg", same)  # dot-names are temp files (rsync, SMB, macOS): silent
        c.output("back\\slash ..\\..\\x.jpg", same, (128, 96))
        c.output(os.fsdecode(b"latin1-caf\xe9.jpg"), same, (128, 96))  # not valid UTF-8
        c.output(long_name(240), same, (128, 96))
        c.output(long_name(251, fill="b"), same, (128, 96))  # output name: exactly 255 bytes
        c.output(long_name(244, fill="📷"), same, (128, 96))  # 60 four-byte characters
        # the output name (+ ".png") cannot exist: fail cleanly, before any work
        c.failure(long_name(252, fill="c"), same, "name_too_long")
        c.failure(long_name(255, fill="d"), same, "name_too_long")
        c.wait(d)
        canary(c, d, 3)
        assert d.proc.poll() is None
        time.sleep(1.0)  # nothing more may happen afterwards
        events = d.events()
        assert d.stop() == 0

    assert len(c.expect) >= 30
    # every input got exactly its expected result, and nothing else happened
    sidecars = c.sidecars()
    skipped = {e["path"]: e for e in events if e.get("event") == "skipped"}
    ledger = c.outbox / ".rembgd-ledger"  # the records of what was processed
    outputs = {p for p in c.outbox.rglob("*")
               if p.is_file() and not p.name.startswith(".") and ledger not in p.parents}
    expected_outputs = set()
    for path, (kind, detail) in c.expect.items():
        rel = path.relative_to(c.inbox)
        out = c.outbox / rel.with_name(rel.name + ".png")
        if kind == "output":
            expected_outputs.add(out)
            with Image.open(out) as im:
                im.load()
                assert im.mode == "RGBA" and im.size == detail, (rel, im.mode, im.size)
            assert out.stat().st_mode & 0o777 == 0o644, rel  # default umask 022
            assert str(path) not in sidecars and str(path) not in skipped, rel
        elif kind == "failed":
            rec = sidecars[str(path)]
            assert rec["reason"] in detail, (rel, rec)
            assert rec["error"] and rec["time"], rec
            moved = Path(rec["file"])
            assert c.failed in moved.parents and not path.exists(), rel
            assert moved.read_bytes() == c.content[path], rel  # kept intact
            assert not os.path.lexists(out), rel
        elif kind == "ignored":
            assert path.read_bytes() == c.content[path] and not os.path.lexists(out), rel
            assert str(path) not in sidecars and str(path) not in skipped, rel
            assert not [e for e in events if e.get("path") == str(path)], rel
        else:
            assert detail in skipped[str(path)]["reason"], (rel, skipped[str(path)])
            assert os.path.lexists(path), rel  # left alone
            assert not os.path.lexists(out) and str(path) not in sidecars, rel
    assert outputs == expected_outputs, outputs ^ expected_outputs
    assert not [p for p in c.outbox.rglob("*") if p.name.startswith(".") and p.is_file()]
    # symlinks were never followed out of the inbox: nothing outside changed or got an output
    assert Path("/etc/passwd").read_bytes() == passwd
    after_outside = {p: p.read_bytes() for p in (root / "outside").rglob("*") if p.is_file()}
    assert after_outside == before_outside
    assert not (c.outbox / "linked-dir").exists()
    assert snapshot(root) == before_all, set(snapshot(root).items()) ^ set(before_all.items())
    # nothing crashed inside: no worker or unexpected errors
    assert not [e for e in events if e.get("event") in ("worker_error", "unexpected_error")]


def snapshot(root: Path) -> dict[Path, int]:
    """Files outside the daemon's own folders (its log, config and the test's staging aside)."""
    own = [root / d for d in ("inbox", "outbox", "failed", "cache")]
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and not any(o == p or o in p.parents for o in own)
            and p.name not in ("daemon.log", "config.yaml", ".staging")}


# --------------------------------------------- races, driven in-process


@pytest.fixture
def service(tmp_path, models_dir, shared_engines):
    """A Supervisor on a temp inbox, not started: ``intake.process`` is called by the test."""
    from daemon import config as configmod
    from daemon.service.app import App
    from daemon.service.supervisor import Supervisor

    cfg = configmod.load(write_config(tmp_path, models_dir, retry_backoff_s=0.1,
                                      retry_attempts=1))
    svc = Supervisor(cfg)
    svc.app = App.build(cfg, engines=shared_engines)
    yield svc
    svc.app.close()


def _item(svc, name: str):
    from daemon.service.intake import WorkItem

    return WorkItem(svc.cfg.watch[0].key, svc.cfg.watch[0].inbox / name)


def _out(svc, name: str) -> Path:
    return svc.cfg.watch[0].outbox / (name + ".png")


def test_deleted_between_event_and_processing(service):
    svc = service
    item = _item(svc, "gone.jpg")
    item.path.write_bytes(jpeg(50))
    item.path.unlink()  # the event was seen; the file went before a worker got to it
    with capture_logs() as logs:
        assert svc.intake.process(item) is Deferred.SKIPPED
    assert svc.counters.get("vanished") == 1
    assert any(e["event"] == "skipped" and "vanished" in e["reason"] for e in logs)
    assert not _out(svc, "gone.jpg").exists() and not svc.cfg.watch[0].failed_dir.exists()


def test_deleted_after_the_checks_before_the_read(service, monkeypatch):
    import daemon.job as pl

    svc = service
    item = _item(svc, "late.jpg")
    item.path.write_bytes(jpeg(51))
    real = pl.read_regular_file

    def vanish_then_read(path, *a, **kw):
        os.unlink(path)
        return real(path, *a, **kw)

    monkeypatch.setattr(pl, "read_regular_file", vanish_then_read)
    assert svc.intake.process(item) is Kind.RETRY  # ENOENT is transient: nothing fails
    assert svc.counters.get("retries") == 1 and svc.counters.get("failed") == 0
    monkeypatch.setattr(pl, "read_regular_file", real)
    assert svc.intake.process(item) is Deferred.SKIPPED  # the retry finds it gone
    assert svc.counters.get("vanished") == 1
    assert not _out(svc, "late.jpg").exists() and not svc.cfg.watch[0].failed_dir.exists()


def test_replaced_between_event_and_processing(service):
    svc = service
    item = _item(svc, "swap.jpg")
    item.path.write_bytes(jpeg(52, 100, 80))
    tmp = item.path.with_name(".swap.tmp")
    tmp.write_bytes(jpeg(53, 120, 60))
    os.replace(tmp, item.path)  # replaced after the event
    svc.intake.process(item)
    with Image.open(_out(svc, "swap.jpg")) as im:
        assert im.size == (120, 60)  # the new content, not the announced one

    # replaced by a symlink, a FIFO: skipped, never followed or read
    for name, make in (("swap-link.jpg", lambda p: os.symlink("/etc/passwd", p)),
                       ("swap-fifo.jpg", os.mkfifo)):
        item = _item(svc, name)
        item.path.write_bytes(jpeg(54))
        item.path.unlink()
        make(item.path)
        with capture_logs() as logs:
            svc.intake.process(item)
        assert any(e["event"] == "skipped" and e["path"] == str(item.path) for e in logs), logs
        assert not _out(svc, name).exists() and not svc.cfg.watch[0].failed_dir.exists()


def test_replaced_while_being_processed(service, monkeypatch):
    """New content arriving mid-processing must not be shadowed by the old output."""
    svc = service
    item = _item(svc, "mid.jpg")
    item.path.write_bytes(jpeg(55, 100, 80))
    real = svc.app.pipeline.render

    def render_then_replace(data, plan, **kw):
        rendered = real(data, plan, **kw)
        tmp = item.path.with_name(".mid.tmp")
        tmp.write_bytes(jpeg(56, 64, 64))
        os.replace(tmp, item.path)
        return rendered

    monkeypatch.setattr(svc.app.pipeline, "render", render_then_replace)
    svc.intake.process(item)
    monkeypatch.setattr(svc.app.pipeline, "render", real)
    svc.intake.process(item)  # the retry (or the new file's own event)
    with Image.open(_out(svc, "mid.jpg")) as im:
        assert im.size == (64, 64)
    assert svc.counters.get("retries") == 1 and svc.counters.get("failed") == 0


def test_unreadable_file_injected_eacces(service, monkeypatch):
    """The EACCES path without relying on uid: retried, then moved to failed/ with the reason."""
    import daemon.job as pl

    svc = service
    item = _item(svc, "locked.jpg")
    item.path.write_bytes(jpeg(57))

    def denied(path, *a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(pl, "read_regular_file", denied)
    svc.intake.process(item)
    assert svc.counters.get("retries") == 1
    svc.intake.process(type(item)(item.pair, item.path, attempt=1))  # retry_attempts=1: give up
    rec = json.loads((svc.cfg.watch[0].failed_dir / "locked.jpg.error.json").read_text())
    assert rec["reason"] == "transient" and "Permission denied" in rec["error"]
    assert (svc.cfg.watch[0].failed_dir / "locked.jpg").exists() and not item.path.exists()


def test_folder_swapped_for_symlink_is_never_followed(service, monkeypatch, tmp_path):
    """inbox/sub/a.jpg is announced, then sub becomes a link to a folder outside."""
    import daemon.job as pl

    svc = service
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "a.jpg").write_bytes(jpeg(58))
    inbox = svc.cfg.watch[0].inbox

    def swap():
        os.rename(inbox / "sub", tmp_path / "old-sub")
        os.symlink(outside, inbox / "sub")

    # swapped before the worker looks: skipped with a log line
    (inbox / "sub").mkdir()
    (inbox / "sub" / "a.jpg").write_bytes(jpeg(59))
    item = _item(svc, "sub/a.jpg")
    swap()
    with capture_logs() as logs:
        svc.intake.process(item)
    assert any(e["event"] == "skipped" and "symbolic link" in e["reason"] for e in logs), logs
    assert not _out(svc, "sub/a.jpg").exists()

    # swapped after the checks, just before the read: the read refuses, nothing is moved
    os.unlink(inbox / "sub")
    os.rename(tmp_path / "old-sub", inbox / "sub")
    real = pl.read_regular_file

    def swap_then_read(path, *a, **kw):
        swap()
        return real(path, *a, **kw)

    monkeypatch.setattr(pl, "read_regular_file", swap_then_read)
    svc.intake.process(item)
    assert not _out(svc, "sub/a.jpg").exists()
    assert (outside / "a.jpg").read_bytes() == jpeg(58)  # the outside file stays put
    rec = json.loads((svc.cfg.watch[0].failed_dir / "sub" / "a.jpg.error.json").read_text())
    assert rec["reason"] == "symlink" and "leads out of" in rec["error"]
