"""fate.finish: what becomes of a source, on real files (no model needed)."""
from __future__ import annotations

import json
from pathlib import Path

from daemon.fate import Fate, Outcome, finish
from daemon.source import Source


def _source(tmp_path: Path, after_success: str, done_dir: Path | None = None) -> Source:
    inbox = tmp_path / "inbox"
    (inbox / "shoot").mkdir(parents=True)
    src = inbox / "shoot" / "a.jpg"
    src.write_bytes(b"the photo")
    return Source(src, Path("shoot/a.jpg"), tmp_path / "outbox",
                  failed_dir=tmp_path / "failed", done_dir=done_dir or tmp_path / "done",
                  after_success=after_success)


def test_delivered_sources_are_kept_moved_or_deleted(tmp_path):
    for after, where in (("keep", "inbox"), ("move", "done"), ("delete", None)):
        source = _source(tmp_path / after, after)
        assert finish(Outcome(source, "miss")).kind == "miss"
        left = sorted(p.relative_to(tmp_path / after).as_posix()
                      for p in (tmp_path / after).rglob("a.jpg"))
        assert left == ([f"{where}/shoot/a.jpg"] if where else []), (after, left)


def test_waiting_and_retried_sources_stay_put(tmp_path):
    job = _source(tmp_path, "move")
    for kind, fate in (("retry", Fate.RETRY), ("not_ready", Fate.WAIT)):
        done = finish(Outcome(job, kind, error="busy"))
        assert (done.kind, done.fate) == (kind, fate)
        assert job.src.read_bytes() == b"the photo"
    assert not (tmp_path / "done").exists() and not (tmp_path / "failed").exists()


def test_given_up_and_timed_out_go_to_failed_with_why(tmp_path):
    source = _source(tmp_path, "keep")
    finish(Outcome(source, "retry", error="disk full", reason="transient").given_up(3))
    rec = json.loads((tmp_path / "failed" / "shoot" / "a.jpg.error.json").read_text())
    assert rec["reason"] == "transient" and rec["error"] == "gave up after 3 attempts: disk full"
    assert not source.src.exists()

    source = _source(tmp_path / "t", "keep")
    finish(Outcome(source, "not_ready", error="empty file (0 bytes)").timed_out(900))
    rec = json.loads((tmp_path / "t" / "failed" / "shoot" / "a.jpg.error.json").read_text())
    assert rec["reason"] == "incomplete" and rec["error"].startswith("still incomplete after 900 s")


def test_a_move_to_done_that_fails_is_finished_as_that_failure(tmp_path):
    not_a_folder = tmp_path / "done-file"
    not_a_folder.write_bytes(b"")
    source = _source(tmp_path, "move", done_dir=not_a_folder)
    outcome = finish(Outcome(source, "miss", sha256="ab" * 32))
    assert outcome.kind == "failed" and outcome.reason == "io_error"
    assert outcome.sha256 == "ab" * 32
    rec = json.loads((tmp_path / "failed" / "shoot" / "a.jpg.error.json").read_text())
    assert rec["reason"] == "io_error" and (tmp_path / "failed" / "shoot" / "a.jpg").exists()


def test_withdraw_removes_only_what_this_job_wrote(tmp_path):
    """A source gone mid-job: its outputs are withdrawn, but an output that another
    actor (another daemon, an Approve) put under the same name meanwhile stays."""
    from daemon.fate import identity
    from daemon.nofollow import atomic_write_under

    source = _source(tmp_path, "move")
    mine = atomic_write_under(source.outbox, Path("master/shoot/a.jpg.png"), b"this job's")
    theirs = atomic_write_under(source.outbox, Path("web/shoot/a.jpg.webp"), b"this job's")
    ids = {mine: identity(mine), theirs: identity(theirs)}
    atomic_write_under(source.outbox, Path("web/shoot/a.jpg.webp"), b"delivered by another")
    source.src.unlink()
    finish(Outcome(source, "withdrawn", written=[mine, theirs], identities=ids))
    assert not mine.exists()
    assert theirs.read_bytes() == b"delivered by another"


def test_fate_review_and_verdict_never_import_the_job():
    """Issue 26: no circle fate <-> job <-> review; they take a Source."""
    import ast

    root = Path(__file__).resolve().parents[1] / "daemon"
    banned = {"fate": {"daemon.job", "daemon.verdict"}, "review": {"daemon.job", "daemon.fate",
              "daemon.verdict"}, "verdict": {"daemon.job"}, "source": {"daemon.job",
              "daemon.fate", "daemon.review"}}
    for name, never in banned.items():
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        assert not imported & never, (name, imported & never)


def test_kinds_and_tiers_are_str_enums_declared_once(tmp_path):
    """Issue 26.3: one declaration each; logs, counters and JSON still read the value."""
    from daemon.cache.base import Tier
    from daemon.fate import FATES, Kind

    assert set(FATES) == set(Kind)
    assert [t.value for t in Tier] == ["exact", "pixel", "near", "miss"]
    assert all(Kind(t).tier is t for t in Tier)  # a rendered tier names its kind
    assert Kind.UP_TO_DATE.tier is None and Kind.REVIEW.tier is None
    assert json.dumps({Kind.MISS: Tier.NEAR}) == '{"miss": "near"}' and f"{Kind.FAILED}" == "failed"
    job = _source(tmp_path, "keep")
    assert Outcome(job, Tier.PIXEL).kind is Kind.PIXEL and Outcome(job, "failed").fate is Fate.FAIL
    try:
        Outcome(job, "exactish")
    except ValueError:
        pass
    else:
        raise AssertionError("an unknown kind was accepted")


def test_the_failed_sidecar_is_read_beside_its_writer(tmp_path):
    """Issue 26.3: ``read_failure`` reads what ``write_failure`` writes; a sidecar that
    names a file outside failed/, or a gone file, reads as nothing."""
    from daemon.nofollow import failure_sidecars, read_failure, write_failure

    job = _source(tmp_path, "keep")
    failed = tmp_path / "failed"
    sidecar = write_failure(job.src, job.rel, failed, reason="undecodable",
                            exc=ValueError("bad"), detail="not an image")
    assert [p for _, p in failure_sidecars(failed)] == [sidecar]
    got = read_failure(failed, sidecar)
    assert (got.rel, got.reason, got.error) == (Path("shoot/a.jpg"), "undecodable", "not an image")
    rec = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**rec, "file": str(tmp_path / "inbox" / "shoot" / "b.jpg")}))
    assert read_failure(failed, sidecar) is None  # outside failed/
    sidecar.write_text(json.dumps(rec))
    (failed / "shoot" / "a.jpg").unlink()
    assert read_failure(failed, sidecar) is None  # the file is gone
    (failed / ".dismissed").mkdir()
    (failed / ".dismissed" / "c.jpg.error.json").write_text("{}")
    assert [p for _, p in failure_sidecars(failed)] == [sidecar]
