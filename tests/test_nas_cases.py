"""Issue 15's NAS and sync-tool cases, end to end, one regression test per defect.

Each test runs a real ``rembgd run`` process (``harness.Daemon``) on real files
in a temp inbox/outbox and watches only what a studio would see: the files in
the outbox, ``failed/`` and ``done/``, the JSON log and ``rembgd status``. Two
things a real process cannot show are checked on an in-process ``Supervisor``:
the ONNX thread count a reload applies, and an outbox that vanishes in the instant
between the standby check and the writes.

Defect -> test:

1. replaced input with an older mtime (rsync -a, cp -p) -> ``test_replaced_*``
2. held-open / paused / touched-then-copied files -> ``test_incomplete_files_*``
3. symlinked subfolders in outbox, failed/, done/ -> ``test_symlinked_subfolders_*``
4, 10. reload: unprovisioned model, workers, logging.level, threads -> ``test_reload_*``
5. temp files orphaned by kill -9 -> ``test_stale_temp_files_*``
6. a real name containing ``.rembgd-`` -> ``test_real_name_with_rembgd_marker_*``
8. share outage -> ``test_share_outage_*`` (folder renamed away; read-only bind mount,
   skipped where mounting is not permitted), ``test_outbox_vanishing_*``

Defect 7 (polling CPU) is a benchmark (bench/polling_idle.py) and 9 (cache heal)
is covered in tests/test_faults.py.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import encode, photo, write_config
from daemon.ledger import Ledger
from harness import Daemon, wait_for

pytestmark = pytest.mark.slow

SUCCESS = ("exact", "pixel", "near", "miss")


# ------------------------------------------------------------------ helpers


def jpg(name: str, w: int, h: int) -> bytes:
    """A real photo (scikit-image sample), resized so each test photo has its own size."""
    return encode(np.asarray(Image.fromarray(photo(name)).resize((w, h))), "JPEG", quality=90)


A = ("astronaut", 120, 100)
B = ("coffee", 150, 90)
C = ("chelsea", 96, 128)
D = ("rocket", 110, 140)


def size_of(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.load()  # complete, not just a header
        return im.size


def config(tmp_path: Path, models_dir: Path, **kw) -> Path:
    kw.setdefault("settle_s", 0.2)
    kw.setdefault("poll_interval_s", 0.2)
    return write_config(tmp_path, models_dir, **kw)


def done_for(d: Daemon, path: Path) -> list[dict]:
    """Finished processing of ``path`` (success or failure, never an intermediate retry)."""
    return [e for e in d.processed() if e.get("path") == str(path) and e.get("outcome") != "retry"]


def named(d: Daemon, event: str) -> list[dict]:
    return [e for e in d.events() if e.get("event") == event]


def replace_like_rsync(dest: Path, data: bytes, mtime: float) -> None:
    """rsync -a: a hidden temp beside the file, its mtime set to the source's, renamed over."""
    tmp = dest.with_name(f".{dest.name}.Xq7v2a")
    tmp.write_bytes(data)
    os.utime(tmp, (mtime, mtime))
    os.replace(tmp, dest)


def replace_like_cp_p(dest: Path, data: bytes, mtime: float) -> None:
    """cp -p over an existing file: truncated and rewritten in place, then the old mtime set."""
    with open(dest, "r+b") as fh:
        fh.truncate(0)
        fh.write(data)
    os.utime(dest, (mtime, mtime))


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")) if folder.exists() else []


def sidecar(failed: Path, name: str) -> dict:
    return json.loads((failed / (name + ".error.json")).read_text())


def edit_config(cfg: Path, edit) -> None:
    data = yaml.safe_load(cfg.read_text())
    edit(data)
    cfg.write_text(yaml.safe_dump(data))


# ------------------------------------------- 1. replaced input, older mtime


def test_replaced_input_with_older_mtime_is_redone_live_and_across_restart(tmp_path, models_dir):
    cfg = config(tmp_path, models_dir)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    a, b, keep = inbox / "a.jpg", inbox / "b.jpg", inbox / "keep.jpg"
    with Daemon(cfg) as d:
        a.write_bytes(jpg(*A))
        b.write_bytes(jpg(*A))
        keep.write_bytes(jpg(*C))
        wait_for(lambda: len(done_for(d, a)) == 1 and len(done_for(d, b)) == 1
                 and len(done_for(d, keep)) == 1, timeout=30)
        assert size_of(outbox / "a.jpg.png") == A[1:]
        older = a.stat().st_mtime - 3600  # older than the source, and than the output

        replace_like_rsync(a, jpg(*B), older)  # a different photo, an hour older
        replace_like_cp_p(b, jpg(*B), older)
        wait_for(lambda: len(done_for(d, a)) >= 2 and len(done_for(d, b)) >= 2, timeout=30)
        wait_for(lambda: size_of(outbox / "a.jpg.png") == B[1:]
                 and size_of(outbox / "b.jpg.png") == B[1:], timeout=10)
        assert done_for(d, a)[-1]["outcome"] in SUCCESS
        assert len(done_for(d, keep)) == 1
        # cp -p sets the mtime after the close: b.jpg may be redone once more (an exact
        # hit); stop only once the ledger holds every file as it is now
        ledger = Ledger(outbox)
        wait_for(lambda: all(ledger.state(Path(p.name), p.stat()) == "done" for p in (a, b, keep)),
                 timeout=20)
        assert d.stop() == 0

    # replaced while the daemon is stopped: the catch-up scan must redo it (and only it)
    replace_like_cp_p(a, jpg(*D), older - 3600)
    with Daemon(cfg) as d2:
        started = named(d2, "started")[0]
        assert started["catch_up"] == 1, started  # a.jpg; b.jpg and keep.jpg are unchanged
        wait_for(lambda: done_for(d2, a), timeout=30)
        wait_for(lambda: size_of(outbox / "a.jpg.png") == D[1:], timeout=10)
        assert done_for(d2, a)[0]["outcome"] in SUCCESS
        time.sleep(0.5)  # a wrongly queued file would be processed by now (settle 0.2 s)
        assert not done_for(d2, b) and not done_for(d2, keep)
        assert size_of(outbox / "keep.jpg.png") == C[1:]


def test_replaced_input_with_older_mtime_and_move_is_processed_not_just_moved(tmp_path,
                                                                              models_dir):
    inbox = tmp_path / "inbox"
    cfg = config(tmp_path, models_dir, watch=[{
        "inbox": str(inbox), "outbox": str(tmp_path / "outbox"), "after_success": "move"}])
    done_dir, out = tmp_path / "done", tmp_path / "outbox" / "a.jpg.png"
    a = inbox / "a.jpg"
    with Daemon(cfg) as d:
        a.write_bytes(jpg(*A))
        wait_for(lambda: (done_dir / "a.jpg").exists(), timeout=30)
        assert size_of(out) == A[1:]
        older = out.stat().st_mtime - 3600

        replace_like_rsync(a, jpg(*B), older)  # the same name again, a new photo, older mtime
        wait_for(lambda: len(done_for(d, a)) == 2 and not a.exists(), timeout=30)
        assert done_for(d, a)[-1]["outcome"] in SUCCESS, done_for(d, a)
        assert size_of(out) == B[1:]
        moved = sorted(p.read_bytes() for p in done_dir.iterdir())
        assert moved == sorted([jpg(*A), jpg(*B)])  # both kept, nothing overwritten


# ------------------------------------------------------ 2. incomplete files


def test_incomplete_files_wait_and_only_a_stuck_empty_file_fails(tmp_path, models_dir):
    cfg = config(tmp_path, models_dir, incomplete_timeout_s=3)
    inbox, outbox, failed = tmp_path / "inbox", tmp_path / "outbox", tmp_path / "failed"
    data = jpg(*A)
    staged = tmp_path / "staged.jpg"  # the copy's source, outside the inbox
    staged.write_bytes(jpg(*B))

    def held_open():  # created, open and empty for 2 s, then written through the same handle
        with open(inbox / "held.jpg", "wb") as fh:
            time.sleep(2.0)
            fh.write(data)

    def touched_then_copied():
        (inbox / "touched.jpg").touch()
        time.sleep(2.0)
        shutil.copyfile(staged, inbox / "touched.jpg")

    def paused():  # half the photo, a pause far longer than settle_s, then the rest
        with open(inbox / "paused.jpg", "wb") as fh:
            fh.write(data[:len(data) // 2])
            fh.flush()
            time.sleep(1.5)
            fh.write(data[len(data) // 2:])

    with Daemon(cfg) as d:
        t0 = time.monotonic()
        (inbox / "empty.jpg").touch()  # never grows
        writers = [threading.Thread(target=f) for f in (held_open, touched_then_copied, paused)]
        for t in writers:
            t.start()
        for t in writers:
            t.join()
        names = ("held.jpg", "touched.jpg", "paused.jpg")
        wait_for(lambda: all(done_for(d, inbox / n) for n in names), timeout=30)
        wait_for(lambda: (failed / "empty.jpg.error.json").exists(), timeout=20)
        failed_after = time.monotonic() - t0
        time.sleep(0.5)  # a second processing of any of them would show by now
        for n in names:
            runs = done_for(d, inbox / n)
            assert [e["outcome"] for e in runs] in ([o] for o in SUCCESS), (n, runs)
            assert (outbox / (n + ".png")).exists()
        assert size_of(outbox / "held.jpg.png") == A[1:]
        assert size_of(outbox / "touched.jpg.png") == B[1:]
        assert sorted(p.name for p in failed.iterdir()) == ["empty.jpg", "empty.jpg.error.json"]
        assert sidecar(failed, "empty.jpg")["reason"] == "incomplete"
        assert failed_after >= 3.0  # waited incomplete_timeout_s, not failed at once
        assert named(d, "not_ready")  # the waits were logged

        # the same name, now a complete photo, is processed normally
        (inbox / "empty.jpg").write_bytes(jpg(*C))
        wait_for(lambda: (outbox / "empty.jpg.png").exists(), timeout=20)
        assert size_of(outbox / "empty.jpg.png") == C[1:]


# ------------------------------------------------------ 3. symlinked folders


def test_symlinked_subfolders_are_never_written_through(tmp_path, models_dir):
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    failed, done_dir = tmp_path / "failed", tmp_path / "done"
    cfg = config(tmp_path, models_dir, watch=[{
        "inbox": str(inbox), "outbox": str(outbox), "after_success": "move"}])
    elsewhere = {k: tmp_path / "elsewhere" / k for k in ("out", "failed", "done")}
    for folder in (*elsewhere.values(), failed, done_dir, inbox / "sub", inbox / "sub2",
                   inbox / "sub3"):
        folder.mkdir(parents=True, exist_ok=True)
    (outbox / "sub").symlink_to(elsewhere["out"], target_is_directory=True)
    (failed / "sub2").symlink_to(elsewhere["failed"], target_is_directory=True)
    (done_dir / "sub3").symlink_to(elsewhere["done"], target_is_directory=True)

    with Daemon(cfg) as d:
        (inbox / "sub" / "x.jpg").write_bytes(jpg(*A))  # its output would go through outbox/sub
        (inbox / "sub2" / "bad.jpg").write_bytes(b"not an image at all " * 50)  # failed/sub2
        (inbox / "sub3" / "y.jpg").write_bytes(jpg(*B))  # its move would go through done/sub3
        wait_for(lambda: all((failed / f"{n}.error.json").exists()
                             for n in ("x.jpg", "bad.jpg", "y.jpg")), timeout=30)

        assert files_under(tmp_path / "elsewhere") == sorted(elsewhere.values())  # all empty
        x, bad, y = (sidecar(failed, n) for n in ("x.jpg", "bad.jpg", "y.jpg"))
        assert x["reason"] == "linked_folder" and str(outbox / "sub") in x["error"], x
        assert bad["reason"] == "unsupported" and str(failed / "sub2") in bad["error"], bad
        assert y["reason"] == "linked_folder" and str(done_dir / "sub3") in y["error"], y
        assert (failed / "x.jpg").read_bytes() == jpg(*A)  # the inputs, kept, at the top
        assert (failed / "y.jpg").read_bytes() == jpg(*B)
        assert (failed / "bad.jpg").exists()
        assert not any(list((inbox / s).iterdir()) for s in ("sub", "sub2", "sub3"))
        assert named(d, "failed_dir_link_refused")
        assert os.path.islink(outbox / "sub") and os.path.islink(failed / "sub2")


# ---------------------------------------------------------------- 4. reload


def test_reload_refuses_unprovisioned_model_and_restart_only_settings(tmp_path, models_dir):
    assert not (Path(models_dir) / "u2net_human_seg.onnx").exists()
    cfg = config(tmp_path, models_dir)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    pristine = cfg.read_text()
    with Daemon(cfg) as d:
        edit_config(cfg, lambda c: c["watch"][0].update(options={"model": "u2net_human_seg"}))
        d.signal(signal.SIGHUP)
        refused = d.wait_log(lambda e: e.get("event") == "config_reload_refused")[0]
        assert "u2net_human_seg" in refused["error"], refused
        assert "rembgd models install --model u2net_human_seg" in refused["error"], refused
        (inbox / "a.jpg").write_bytes(jpg(*A))  # the old pair keeps working, on its model
        ev = wait_for(lambda: done_for(d, inbox / "a.jpg"), timeout=30)[0]
        assert ev["outcome"] in SUCCESS and ev["model"] == "u2netp"
        assert size_of(outbox / "a.jpg.png") == A[1:]

        cfg.write_text(pristine)
        edit_config(cfg, lambda c: c.update(workers=3))
        d.signal(signal.SIGHUP)
        refused = d.wait_log(lambda e: e.get("event") == "config_reload_refused", count=2)[1]
        assert "workers" in refused["error"] and "restart" in refused["error"], refused
        assert not named(d, "config_reloaded")

        cfg.write_text(pristine)
        edit_config(cfg, lambda c: c.update(threads=1, logging={"format": "json",
                                                                "level": "debug"}))
        d.signal(signal.SIGHUP)
        ok = d.wait_log(lambda e: e.get("event") == "config_reloaded")[0]
        assert ok["threads"] == 1 and ok["log_level"] == "debug"
        assert not [e for e in d.events() if e.get("level") == "debug"]
        # a write-close without a change: the intake finds it up to date, said at debug level
        os.close(os.open(inbox / "a.jpg", os.O_WRONLY))
        d.wait_log(lambda e: e.get("level") == "debug", timeout=20)
        (inbox / "b.jpg").write_bytes(jpg(*B))  # and it still works
        wait_for(lambda: done_for(d, inbox / "b.jpg"), timeout=30)
        assert d.proc.poll() is None
        assert d.stop() == 0


def test_reload_applies_threads_in_process(tmp_path, models_dir, shared_engines):
    from daemon import config as configmod
    from daemon.service.app import App
    from daemon.service.supervisor import Supervisor

    cfg_path = config(tmp_path, models_dir)  # threads: 2, as the shared engines
    svc = Supervisor(configmod.load(cfg_path))
    svc.app = App.build(svc.cfg, engines=shared_engines)
    try:
        edit_config(cfg_path, lambda c: c.update(threads=1))
        assert svc.reload()
        assert svc.cfg.threads == 1
        assert svc.app.engines is not shared_engines and svc.app.engines.threads == 1
    finally:
        svc.stop_watching()
        svc.app.close()


# ------------------------------------------------------ 5, 6. temp names


def test_stale_temp_files_are_removed_at_start_fresh_ones_kept(tmp_path, models_dir):
    from daemon.fsutil import temp_name

    cfg = config(tmp_path, models_dir)
    outbox, failed = tmp_path / "outbox", tmp_path / "failed"
    (outbox / "sub").mkdir(parents=True)
    failed.mkdir()
    old = time.time() - 20 * 60
    stale = [outbox / temp_name("a.jpg.png"), outbox / "sub" / temp_name("b.jpg.png"),
             failed / temp_name("c.jpg")]
    fresh = outbox / temp_name("d.jpg.png")  # a live writer (another host) may own it
    studio = outbox / "e.rembgd-final.jpg.png"  # a studio's name, not a temp
    for p in (*stale, fresh, studio):
        p.write_bytes(os.urandom(64 * 1024))
    for p in (*stale, studio):
        os.utime(p, (old, old))

    with Daemon(cfg) as d:
        assert not any(p.exists() for p in stale)
        assert fresh.exists() and studio.exists()
        logged = named(d, "stale_temps_removed")
        assert sum(e["count"] for e in logged) == len(stale), logged


def test_real_name_with_rembgd_marker_is_processed(tmp_path, models_dir):
    cfg = config(tmp_path, models_dir)
    src = tmp_path / "inbox" / "photo.rembgd-final.jpg"
    with Daemon(cfg) as d:
        src.write_bytes(jpg(*A))
        ev = wait_for(lambda: done_for(d, src), timeout=30)[0]
        assert ev["outcome"] in SUCCESS
        assert size_of(tmp_path / "outbox" / "photo.rembgd-final.jpg.png") == A[1:]


# ----------------------------------------------------------- 8. share outage


def _outage_then_recovery(d: Daemon, tmp_path: Path, break_it, mend_it, names: list[str],
                          check_during=lambda: None) -> None:
    inbox, outbox, failed = tmp_path / "inbox", tmp_path / "outbox", tmp_path / "failed"
    break_it()
    for i, n in enumerate(names):
        (inbox / n).write_bytes(jpg(*(A, B, C)[i % 3]))
    ev = d.wait_log(lambda e: e.get("event") == "pair_standby", timeout=20)[0]
    assert "outbox" in ev["reason"], ev
    st = wait_for(lambda: (s := d.status()).get("state") == "standby" and s, timeout=10)
    assert "outbox" in st["standby"]["0"]["reason"], st
    check_during()
    time.sleep(1.0)  # the files keep arriving at the workers while the share is out
    check_during()
    assert not done_for(d, inbox / names[0])
    mend_it()
    d.wait_log(lambda e: e.get("event") == "pair_resumed", timeout=30)
    # the backoff is the pair's: every waiting file resumes with the probe that finds the
    # share working, none left behind on a longer per-file backoff (up to 60 s)
    wait_for(lambda: all(done_for(d, inbox / n) for n in names), timeout=20)
    for n in names:
        assert [e["outcome"] for e in done_for(d, inbox / n)][0] in SUCCESS
        assert (outbox / (n + ".png")).exists()
    assert not failed.exists() or not any(failed.iterdir())
    assert len(named(d, "pair_standby")) == 1  # logged once
    wait_for(lambda: d.status().get("state") in ("idle", "busy"), timeout=10)


def test_share_outage_outbox_renamed_away_means_standby(tmp_path, models_dir):
    cfg = config(tmp_path, models_dir)
    outbox, away = tmp_path / "outbox", tmp_path / "outbox.unmounted"

    def not_recreated():  # never silently re-created on the local disk
        assert not outbox.exists(), sorted(outbox.rglob("*"))

    with Daemon(cfg) as d:
        _outage_then_recovery(d, tmp_path, lambda: outbox.rename(away),
                              lambda: away.rename(outbox), [f"p{i}.jpg" for i in range(6)],
                              not_recreated)


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def test_share_outage_read_only_outbox_means_standby(tmp_path, models_dir):
    cfg = config(tmp_path, models_dir)
    outbox, scratch = tmp_path / "outbox", tmp_path / "scratch"
    scratch.mkdir()
    if os.geteuid() != 0 or _run("mount", "--bind", str(scratch), str(scratch)).returncode:
        pytest.skip("a read-only bind mount needs root and mount permission")
    ro = _run("mount", "-o", "remount,bind,ro", str(scratch)).returncode == 0
    _run("umount", "-l", str(scratch))
    if not ro:
        pytest.skip("remounting read-only is not permitted here")
    mounted = False

    def break_it():  # the NAS hiccup: the outbox turns read-only under the running daemon
        nonlocal mounted
        assert _run("mount", "--bind", str(outbox), str(outbox)).returncode == 0
        mounted = True
        assert _run("mount", "-o", "remount,bind,ro", str(outbox)).returncode == 0

    def mend():
        nonlocal mounted
        assert _run("umount", str(outbox)).returncode == 0
        mounted = False

    try:
        with Daemon(cfg) as d:
            _outage_then_recovery(d, tmp_path, break_it, mend, [f"r{i}.jpg" for i in range(4)])
    finally:
        if mounted:
            _run("umount", "-l", str(outbox))


@pytest.mark.parametrize("cache", ["sqlite", "disabled"])
def test_outbox_vanishing_right_after_the_check_is_not_recreated(tmp_path, models_dir,
                                                                  shared_engines, cache):
    """The race the standby check cannot close: the share goes between the check and the
    writes. In-process, since a real process cannot be made to hit that instant."""
    from daemon import config as configmod
    from daemon.service.app import App
    from daemon.service.intake import WorkItem
    from daemon.service.supervisor import Supervisor

    extra = {"cache": {"dir": str(tmp_path / "cache"), "enabled": False}} if cache == "disabled" \
        else {}
    svc = Supervisor(configmod.load(config(tmp_path, models_dir, **extra)))
    svc.app = App.build(svc.cfg, engines=shared_engines)
    try:
        outbox = svc.cfg.watch[0].outbox
        src = svc.cfg.watch[0].inbox / "late.jpg"
        src.write_bytes(jpg(*A))
        admit = svc.intake.admit

        def unmount_then_admit(*args):  # the standby check has passed; then:
            outbox.rename(tmp_path / "outbox.unmounted")
            return admit(*args)

        svc.intake.admit = unmount_then_admit
        assert svc.intake.process(WorkItem(0, src)) == "standby"
        assert not outbox.exists()
        assert svc.standby.active(0) and "outbox" in svc.standby.snapshot()["0"]["reason"]
        assert src.exists() and not (tmp_path / "failed").exists()
    finally:
        svc.app.close()
