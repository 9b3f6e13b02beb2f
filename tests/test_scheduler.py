"""The settle queue: stability before hand-out, and incomplete files that wait, not fail."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from daemon.service.settle import SettleQueue


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


@pytest.fixture
def rig():
    clock = FakeClock()
    got: list[tuple[int, Path, int, float]] = []
    sched = SettleQueue(1.0, lambda pair, path, attempt, model: got.append((pair, path, attempt, clock())),
                      incomplete_timeout_s=120.0, max_backoff_s=16.0, clock=clock)
    return sched, clock, got


def _run_until(sched: SettleQueue, clock: FakeClock, got: list, until: float, step: float = 0.05,
               *, stop_on_handout: bool = False) -> None:
    end = clock() + until
    while clock() < end:
        sched.run_due()
        if stop_on_handout and got:
            return
        clock.advance(step)


def test_a_path_is_handed_out_once_stable_for_settle_s(tmp_path, rig):
    sched, clock, got = rig
    f = tmp_path / "a.jpg"
    f.write_bytes(b"x")
    start = clock()
    sched.settle("main", f)
    sched.settle("main", f)  # a second event for a scheduled path adds nothing
    _run_until(sched, clock, got, 0.9)
    assert got == []
    _run_until(sched, clock, got, 1.0)
    assert [(p, path) for p, path, _, _ in got] == [("main", f)]
    assert 1.0 <= got[0][3] - start <= 1.5
    assert len(sched) == 0


def test_a_growing_file_is_held_until_it_stops(tmp_path, rig):
    sched, clock, got = rig
    f = tmp_path / "a.jpg"
    f.write_bytes(b"x")
    sched.settle("main", f)
    for i in range(10):  # grows every 0.5 s for 5 s
        _run_until(sched, clock, got, 0.5)
        with open(f, "ab") as fh:
            fh.write(b"more")
    assert got == []
    _run_until(sched, clock, got, 2.0)
    assert len(got) == 1


def test_close_after_write_skips_the_wait_and_is_never_handed_out_twice(tmp_path, rig):
    sched, clock, got = rig
    f = tmp_path / "a.jpg"
    f.write_bytes(b"x")
    sched.settle("main", f)
    sched.settle("main", f, complete=True)
    assert sched.run_due() == 1
    _run_until(sched, clock, got, 3.0)
    assert len(got) == 1


def test_an_empty_file_waits_with_growing_backoff_then_is_handed_out_again(tmp_path, rig):
    sched, clock, got = rig
    f = tmp_path / "a.jpg"
    f.write_bytes(b"")  # created, nothing written yet
    handouts = []
    sched.settle("main", f)
    _run_until(sched, clock, got, 2.0)
    assert len(got) == 1  # stable and empty: the worker sees it is not ready
    for _ in range(6):
        asked = clock()
        got.clear()
        assert sched.not_ready("main", f) is True
        _run_until(sched, clock, got, 40.0, step=0.25, stop_on_handout=True)
        assert len(got) == 1, "it comes back by itself"
        handouts.append(got[0][3] - asked)
    # backoff 1, 2, 4, 8, 16, 16 (capped), each plus settle_s of stability
    assert handouts == pytest.approx([2, 3, 5, 9, 17, 17], abs=0.6)


def test_the_writer_comes_back_and_the_file_is_processed(tmp_path, rig):
    sched, clock, got = rig
    f = tmp_path / "a.jpg"
    f.write_bytes(b"")
    first = clock()
    assert sched.not_ready("main", f, first_seen=first)
    _run_until(sched, clock, got, 0.5)
    f.write_bytes(b"the photo, at last")  # written mid-wait: stability starts over
    _run_until(sched, clock, got, 5.0)
    assert len(got) == 1 and f.stat().st_size > 0
    sched.ready(f)


def test_waiting_lists_each_incomplete_file_with_its_time_left(tmp_path, rig):
    sched, clock, got = rig
    early, late = tmp_path / "early.jpg", tmp_path / "late.jpg"
    early.write_bytes(b"")
    late.write_bytes(b"\xff\xd8")
    assert sched.waiting() == []
    assert sched.not_ready("main", early)
    _run_until(sched, clock, got, 10.0)
    assert sched.not_ready("main", late)
    (p1, left1, tries1), (p2, left2, tries2) = sched.waiting()
    assert (p1, p2) == (early, late)  # the soonest to give up first
    assert left1 == pytest.approx(120.0 - 10.0, abs=0.5) and tries1 >= 1
    assert left2 == pytest.approx(120.0, abs=0.01) and tries2 == 1
    sched.ready(early)
    assert [w[0] for w in sched.waiting()] == [late]
    late.unlink()
    assert sched.not_ready("main", late)  # vanished: forgotten
    assert sched.waiting() == []


def test_after_the_timeout_without_change_it_is_failed(tmp_path, rig):
    sched, clock, got = rig
    f = tmp_path / "a.jpg"
    f.write_bytes(b"")
    first = clock()
    rounds = 0
    while sched.not_ready("main", f, first_seen=first):
        rounds += 1
        got.clear()
        _run_until(sched, clock, got, 40.0, step=0.5, stop_on_handout=True)
        assert len(got) == 1
        assert rounds < 50
    assert 120.0 <= clock() - first <= 140.0  # incomplete_timeout_s, not earlier


def test_any_change_restarts_the_timeout(tmp_path, rig):
    sched, clock, got = rig
    f = tmp_path / "a.jpg"
    f.write_bytes(b"")
    first = clock()
    for i in range(8):  # a very slow writer: a few bytes every ~30 s, for 4 minutes
        assert sched.not_ready("main", f, first_seen=first)
        _run_until(sched, clock, got, 30.0, step=0.5)
        with open(f, "ab") as fh:
            fh.write(b"x")
    assert clock() - first > 120.0 and sched.not_ready("main", f)


def test_a_vanished_file_is_dropped(tmp_path, rig):
    sched, clock, got = rig
    f = tmp_path / "a.jpg"
    f.write_bytes(b"")
    assert sched.not_ready("main", f)
    f.unlink()
    _run_until(sched, clock, got, 40.0, step=0.5)
    assert got == [] and len(sched) == 0


def test_the_thread_hands_out_in_real_time(tmp_path):
    done = threading.Event()
    got = []
    sched = SettleQueue(0.1, lambda pair, path, attempt, model: (got.append(path), done.set()))
    sched.start()
    try:
        f = tmp_path / "a.jpg"
        f.write_bytes(b"x")
        sched.settle(3, f)
        assert done.wait(5.0)
        assert got == [f]
    finally:
        sched.stop()


def test_a_redo_keeps_its_model_through_retries(tmp_path, rig):
    """A reviewer's 'Redo with <model>' that hits a transient error is retried with that model."""
    from daemon.fate import Outcome
    from daemon.service.intake import WorkItem
    from daemon.service.status import Counters
    from daemon.service.workers import RetryPolicy

    sched, clock, got = rig
    f = tmp_path / "a.jpg"
    f.write_bytes(b"x")
    handed: list[tuple] = []
    sched.submit = lambda pair, path, attempt, model: handed.append((pair, path, attempt, model))
    policy = RetryPolicy(lambda item, delay: sched.retry(item.pair, item.path, item.attempt,
                                                         delay, item.model),
                         Counters(), attempts=lambda: 3, backoff_s=lambda: 0.5)
    outcome = Outcome(source=None, kind="retry", error="transient")
    assert policy.retry(WorkItem("main", f, 0, model="u2net"), outcome) is False
    _run_until(sched, clock, got, 1.0)
    assert handed == [("main", f, 1, "u2net")]
