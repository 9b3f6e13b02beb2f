"""Lock backends (flock, Redis, claim files), the single lease keeper and the claim policy.

Real files, real processes (a killed holder), the real Redis (a unique prefix)
and, for outages, a redis-server of our own on a free port.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import REDIS_URL
from daemon import config as configmod
from daemon.cache.base import StoreError, StoreUnavailable
from daemon.coord.claims import claim, claim_name
from daemon.coord.leases import LeaseKeeper, Leases, try_lease, waiting_lease
from daemon.coord.locks import FileClaims, FlockLocks, RedisLocks, open_locks



def outbox_claims(tmp_path):
    """The claim folder of an outbox that exists (the daemon makes the outbox at start;
    claim files never re-create a vanished one)."""
    (tmp_path / "outbox").mkdir(exist_ok=True)
    return tmp_path / "outbox" / ".rembgd-claims"

def redis_store_cfg(tmp_path: Path, prefix: str, url: str = REDIS_URL):
    return configmod.parse(
        {"store": {"backend": "redis", "url": url, "prefix": prefix, "socket_timeout_s": 0.5},
         "cache": {"dir": str(tmp_path / "cache")}},
        tmp_path / "config.yaml", check_folders=False).store


def redis_locks(tmp_path: Path, prefix: str, url: str = REDIS_URL) -> RedisLocks:
    locks = open_locks(redis_store_cfg(tmp_path, prefix, url), tmp_path / "cache")
    assert isinstance(locks, RedisLocks)
    return locks


@pytest.fixture(params=["flock", "redis", "files"])
def pair(request, tmp_path):
    """Two lock objects on one lock space: this daemon and another process (or machine)."""
    if request.param == "flock":
        a, b = FlockLocks(tmp_path / "locks"), FlockLocks(tmp_path / "locks")
        yield request.param, a, b
        a.close()
        b.close()
    elif request.param == "redis":
        prefix = request.getfixturevalue("redis_prefix")
        a, b = redis_locks(tmp_path, prefix), redis_locks(tmp_path, prefix)
        yield request.param, a, b
        a.link.close()
        b.link.close()
    else:
        yield request.param, FileClaims(tmp_path / "claims"), FileClaims(tmp_path / "claims")


def wait_for(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


# ------------------------------------------------------------ contract


def test_lock_contract(pair):
    kind, locks, other = pair
    token = locks.try_lock("flight:abc", 30)
    assert token
    assert locks.try_lock("flight:abc", 30) is None
    assert other.try_lock("flight:abc", 30) is None  # another process / machine
    assert locks.refresh_lock("flight:abc", "not-the-token", 30) is False
    assert locks.refresh_lock("flight:abc", token, 30) is True
    locks.unlock("flight:abc", "not-the-token")  # ignored
    assert other.try_lock("flight:abc", 30) is None
    t_free = locks.try_lock("claim:inbox/a b/ü.jpg", 30)  # names are free-form, independent
    assert t_free
    locks.unlock("flight:abc", token)
    assert locks.refresh_lock("flight:abc", token, 30) is False
    t2 = other.try_lock("flight:abc", 30)
    assert t2 and t2 != token
    other.unlock("flight:abc", t2)
    locks.unlock("claim:inbox/a b/ü.jpg", t_free)
    assert other.try_lock("claim:inbox/a b/ü.jpg", 30)
    assert locks.shared_across_hosts is (kind != "flock")


def test_redis_lock_lapses_after_its_ttl(tmp_path, redis_prefix):
    a, b = redis_locks(tmp_path, redis_prefix), redis_locks(tmp_path, redis_prefix)
    token = a.try_lock("claim:x", 0.3)
    assert token and b.try_lock("claim:x", 30) is None
    time.sleep(0.45)
    t2 = b.try_lock("claim:x", 30)
    assert t2  # the holder stopped renewing: lapsed
    assert a.refresh_lock("claim:x", token, 30) is False
    a.unlock("claim:x", token)  # a stale token never releases the new holder's lock
    assert a.try_lock("claim:x", 30) is None


def test_claim_file_lapses_after_its_ttl(tmp_path):
    a, b = FileClaims(tmp_path / "claims"), FileClaims(tmp_path / "claims")
    token = a.try_lock("claim:x", 0.3)
    assert token and b.try_lock("claim:x", 0.3) is None
    time.sleep(0.45)  # not refreshed (touched) for longer than the TTL
    t2 = b.try_lock("claim:x", 0.3)
    assert t2
    assert a.refresh_lock("claim:x", token, 0.3) is False
    a.unlock("claim:x", token)
    assert a.try_lock("claim:x", 30) is None


def test_flock_ignores_the_ttl_but_dies_with_its_holder(tmp_path):
    """Stronger than a TTL: the kernel drops the lock the moment its holder process dies."""
    a, b = FlockLocks(tmp_path / "locks"), FlockLocks(tmp_path / "locks")
    token = a.try_lock("claim:x", 0.2)
    time.sleep(0.35)
    assert b.try_lock("claim:x", 30) is None  # a live holder keeps it
    assert a.refresh_lock("claim:x", token, 0.2) is True
    a.unlock("claim:x", token)

    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from daemon.coord.locks import FlockLocks;"
         f"assert FlockLocks(Path({str(tmp_path / 'locks')!r})).try_lock('claim:y', 0.2);"
         "print('held', flush=True); time.sleep(60)"],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert b.try_lock("claim:y", 30) is None
        holder.kill()  # kill -9: no unlock, no cleanup
        holder.wait(5)
        assert b.try_lock("claim:y", 30)
    finally:
        holder.kill()
        holder.wait(5)


def test_dead_owner_claim_file_is_broken_at_once(tmp_path):
    holder = subprocess.run(
        [sys.executable, "-c",
         "from pathlib import Path; from daemon.coord.locks import FileClaims;"
         f"assert FileClaims(Path({str(tmp_path / 'claims')!r})).try_lock('claim:z', 60)"],
        cwd=Path(__file__).resolve().parents[1], timeout=30)
    assert holder.returncode == 0  # it exited holding the claim (a crash, for the claim)
    assert FileClaims(tmp_path / "claims").try_lock("claim:z", 60)


def test_unwritable_lock_folder_is_a_store_error(tmp_path):
    (tmp_path / "locks").write_text("a file where the folder should be")
    with pytest.raises(StoreUnavailable):
        FlockLocks(tmp_path / "locks").try_lock("x", 5)


# ------------------------------------------------------------ leases


def keeper_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == LeaseKeeper.THREAD_NAME]


def test_one_renewal_thread_for_all_leases(tmp_path):
    """10 leases with a short TTL: one keeper thread renews them all; it ends with the last."""
    before = len(keeper_threads())
    keeper = LeaseKeeper()
    locks, other = FileClaims(tmp_path / "claims"), FileClaims(tmp_path / "claims")
    threads_before = threading.active_count()
    leases = [try_lease(locks, f"claim:{i}", 0.3, keeper) for i in range(10)]
    assert all(leases) and len(keeper) == 10
    assert len(keeper_threads()) == before + 1
    assert threading.active_count() == threads_before + 1
    time.sleep(0.8)  # well past the TTL: every claim was renewed, none can be broken
    assert all(other.try_lock(f"claim:{i}", 0.3) is None for i in range(10))
    assert not any(lease.lost.is_set() for lease in leases)
    for lease in leases:
        lease.release()
        lease.release()  # idempotent
    assert len(keeper) == 0
    assert wait_for(lambda: len(keeper_threads()) == before, timeout=2)
    assert all(other.try_lock(f"claim:{i}", 0.3) for i in range(10))


def test_a_lease_whose_lock_was_taken_is_lost(tmp_path):
    keeper = LeaseKeeper()
    claims = FileClaims(tmp_path / "claims")
    lease = try_lease(claims, "claim:a", 0.3, keeper)
    keep = try_lease(claims, "claim:b", 0.3, keeper)
    claims.path("claim:a").write_text("otherhost:1:someone-else")  # broken and re-taken
    assert lease.lost.wait(2)
    assert not keep.lost.is_set()  # the others are still renewed
    assert len(keeper) == 1
    lease.release()
    keep.release()


class Flaky:
    """A lock backend whose refreshes fail (an outage) while ``down`` is set."""

    shared_across_hosts = True

    def __init__(self):
        self.down = threading.Event()
        self.unlocked: list[str] = []

    def try_lock(self, name, ttl):
        return "token"

    def refresh_lock(self, name, token, ttl):
        if self.down.is_set():
            raise StoreUnavailable("backend down")
        return True

    def unlock(self, name, token):
        if self.down.is_set():
            raise StoreUnavailable("backend down")
        self.unlocked.append(name)


def test_a_lease_survives_a_short_outage_and_is_lost_after_its_ttl():
    keeper = LeaseKeeper()
    flaky = Flaky()
    lease = try_lease(flaky, "x", 0.6, keeper)
    flaky.down.set()
    time.sleep(0.3)
    assert not lease.lost.is_set()  # shorter than the TTL: kept trying
    assert lease.lost.wait(2)  # longer: the lock has lapsed
    lease.release()  # an unreachable backend: no raise, the TTL releases it
    assert flaky.unlocked == []


def test_waiting_lease_gets_the_lock_when_it_is_released(tmp_path):
    a, b = FlockLocks(tmp_path / "locks"), FlockLocks(tmp_path / "locks")
    held = try_lease(a, "flight:k", 5)
    threading.Timer(0.2, held.release).start()
    t0 = time.monotonic()
    with waiting_lease(b, "flight:k", 5, timeout=5) as lease:
        assert lease is not None and 0.15 < time.monotonic() - t0 < 3
    with waiting_lease(b, "flight:k", 5, timeout=0.1) as first:
        with waiting_lease(a, "flight:k", 5, timeout=0.2) as second:
            assert first is not None and second is None


# ------------------------------------------------------------ claims


def test_claim_name_keeps_undecodable_names_distinct():
    bad = Path(os.fsdecode(b"caf\xe9.jpg"))
    name = claim_name("inbox", Path("shoot") / bad)
    assert name == "claim:inbox/shoot/caf\\xe9.jpg"
    assert name.encode("utf-8")  # a valid key
    assert claim_name("inbox", Path("shoot/café.jpg")) == "claim:inbox/shoot/café.jpg"


def test_claim_with_flocks_takes_a_claim_file_too(tmp_path):
    """Daemons each with its own SQLite cache (flocks in their own folders) still see each
    other's claims: the claim file on the share (issue 28, case 5)."""
    a, b = FlockLocks(tmp_path / "a-locks"), FlockLocks(tmp_path / "b-locks")
    claims_dir = outbox_claims(tmp_path)
    got = claim(a, claims_dir, "claim:inbox/1.jpg", 30)
    assert isinstance(got, Leases) and len(got.leases) == 2
    assert len(list(claims_dir.iterdir())) == 1
    assert claim(b, claims_dir, "claim:inbox/1.jpg", 30) is None
    got.release()
    again = claim(b, claims_dir, "claim:inbox/1.jpg", 30)
    assert again is not None
    again.release()


def test_claim_across_machines_takes_the_lock_and_a_claim_file(tmp_path, redis_prefix):
    a, b = redis_locks(tmp_path, redis_prefix), redis_locks(tmp_path, redis_prefix)
    claims_dir = outbox_claims(tmp_path)
    got = claim(a, claims_dir, "claim:inbox/2.jpg", 30)
    assert got is not None and len(got.leases) == 2
    assert len(list(claims_dir.iterdir())) == 1
    assert claim(b, claims_dir, "claim:inbox/2.jpg", 30) is None
    got.release()
    assert list(claims_dir.iterdir()) == []
    again = claim(b, claims_dir, "claim:inbox/2.jpg", 30)
    assert again is not None
    again.release()


def test_claim_file_held_elsewhere_releases_the_lock(tmp_path, redis_prefix):
    """A daemon that fell back to claim files holds the file: no claim, and no lock left held."""
    a, b = redis_locks(tmp_path, redis_prefix), redis_locks(tmp_path, redis_prefix)
    claims_dir = outbox_claims(tmp_path)
    assert FileClaims(claims_dir).try_lock("claim:inbox/3.jpg", 30)
    assert claim(a, claims_dir, "claim:inbox/3.jpg", 30) is None
    token = b.try_lock("claim:inbox/3.jpg", 30)
    assert token  # a released its Redis lock
    b.unlock("claim:inbox/3.jpg", token)


def test_unwritable_claim_file_raises_oserror_and_releases_the_lock(tmp_path, redis_prefix):
    a, b = redis_locks(tmp_path, redis_prefix), redis_locks(tmp_path, redis_prefix)
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    (outbox / ".rembgd-claims").write_text("a file where the folder should be")
    with pytest.raises(OSError):
        claim(a, outbox / ".rembgd-claims", "claim:inbox/4.jpg", 30)
    assert b.try_lock("claim:inbox/4.jpg", 30)


def test_claim_without_locks_is_the_claim_file_alone(tmp_path):
    claims_dir = outbox_claims(tmp_path)
    got = claim(None, claims_dir, "claim:inbox/5.jpg", 30)
    assert got is not None and len(got.leases) == 1 and len(list(claims_dir.iterdir())) == 1
    assert claim(None, claims_dir, "claim:inbox/5.jpg", 30) is None
    got.release()




def test_claim_falls_back_to_claim_files_when_the_backend_is_down(tmp_path, own_redis,
                                                                   redis_prefix):
    down = redis_locks(tmp_path, "fallback", own_redis.url)  # this daemon's Redis goes away
    claims_dir = outbox_claims(tmp_path)
    own_redis.kill()
    own_redis.wait(5)
    fallbacks: list[StoreError] = []
    got = claim(down, claims_dir, "claim:inbox/6.jpg", 30, on_fallback=fallbacks.append)
    assert got is not None and len(got.leases) == 1  # the claim file alone
    assert len(fallbacks) == 1 and isinstance(fallbacks[0], StoreUnavailable)
    assert len(list(claims_dir.iterdir())) == 1
    # a daemon that still reaches its Redis gets the lock, but not the file
    other = redis_locks(tmp_path, redis_prefix)
    assert claim(other, claims_dir, "claim:inbox/6.jpg", 30) is None
    got.release()
    assert list(claims_dir.iterdir()) == []
    again = claim(other, claims_dir, "claim:inbox/6.jpg", 30)
    assert again is not None
    again.release()
    other.link.close()
    down.link.close()


def test_presence_names_live_daemons_on_the_same_inbox_only(tmp_path):
    """Issue 28 case 5: a daemon sees another one on its inbox (logged once as
    inbox_shared); a dead one on this host, a stale one or another inbox's is not one."""
    from daemon.coord.presence import Presence

    claims = outbox_claims(tmp_path)
    inbox = tmp_path / "inbox"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    me = Presence(claims, inbox, "sqlite")
    live = Presence(claims, Path("/mnt/elsewhere/inbox"), "sqlite", host="other-host", pid=4242)
    dead = Presence(claims, inbox, "sqlite", pid=gone.pid)  # this host, a process that ended
    other = Presence(claims, tmp_path / "photos", "sqlite", host="h2", pid=1)
    stale = Presence(claims, inbox, "redis", host="h3", pid=1)
    for p in (live, dead, other, stale):
        p.announce()
    os.utime(stale.path, (0, 0))
    assert [p["host"] for p in me.tick(0.0)] == ["other-host"]
    assert me.path.is_file() and me.seen == {"other-host:4242"}
    assert me.tick(1.0) == []  # touched at most every REFRESH_S
    me.withdraw()
    assert not me.path.exists()
