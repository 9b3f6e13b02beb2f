"""Several daemons, one inbox, one Redis (issue 6): real processes, real Redis."""
from __future__ import annotations

import socket
import threading
import time
from collections import Counter

import pytest

from tests.helpers import REDIS_URL, encode, photo, write_config
from harness import Daemon, complete_pngs, wait_for
from test_daemon import synthetic

pytestmark = [pytest.mark.slow, pytest.mark.redis]


class TcpProxy:
    """A loopback TCP proxy we can cut and restore, standing in for a Redis outage."""

    def __init__(self, target=("127.0.0.1", 6379)):
        self.target = target
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.listener.listen(64)
        self.up = threading.Event()
        self.up.set()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def cut(self):
        self.up.clear()
        with self.lock:
            for s in self.conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
            self.conns.clear()

    def restore(self):
        self.up.set()



def all_idle(*daemons) -> bool:
    """Every daemon has nothing queued, scheduled or in progress (its status file says so)."""
    return all((s := d.status()) and s.get("state") == "idle" for d in daemons)

def redis_config(tmp_path, models_dir, prefix, url=REDIS_URL, name="cfg", **extra):
    """Config for one 'machine': its own local cache dir, the shared inbox/outbox and Redis."""
    machine = tmp_path / name
    machine.mkdir(exist_ok=True)
    path = write_config(tmp_path, models_dir, store={"backend": "redis", "url": url, "prefix": prefix,
                                                      "socket_timeout_s": 0.5, "claim_ttl_s": 4},
                        cache={"dir": str(machine / "cache")}, **extra)
    target = machine / "config.yaml"
    path.rename(target)
    return target


def outcomes(*daemons) -> tuple[Counter, Counter]:
    per_path, tiers = Counter(), Counter()
    for d in daemons:
        for e in d.processed():
            if e["outcome"] != "retry":
                per_path[e["path"]] += 1
                tiers[e["outcome"]] += 1
    return per_path, tiers


def test_two_daemons_one_inbox_each_file_once(tmp_path, models_dir, redis_prefix):
    a = Daemon(redis_config(tmp_path, models_dir, redis_prefix, name="a"), log=tmp_path / "a.log")
    b = Daemon(redis_config(tmp_path, models_dir, redis_prefix, name="b"), log=tmp_path / "b.log")
    n = 12
    with a, b:
        for i in range(n):
            tmp = tmp_path / "inbox" / f".f{i}.tmp"
            tmp.write_bytes(synthetic(100 + i))
            tmp.rename(tmp_path / "inbox" / f"f{i}.jpg")
        wait_for(lambda: len(complete_pngs(tmp_path / "outbox")) == n, timeout=120)
        wait_for(lambda: all_idle(a, b), timeout=30)
    per_path, tiers = outcomes(a, b)
    assert len(complete_pngs(tmp_path / "outbox")) == n
    assert set(per_path.values()) == {1}, per_path  # no file processed twice
    assert tiers["miss"] == n  # each inferred once, by one of the two machines
    assert a.processed() and b.processed(), "both machines should share the work"


def test_mask_from_machine_a_reused_on_machine_b(tmp_path, models_dir, redis_prefix):
    a = Daemon(redis_config(tmp_path, models_dir, redis_prefix, name="a"), log=tmp_path / "a.log")
    with a:
        (tmp_path / "inbox" / "orig.jpg").write_bytes(encode(photo("chelsea"), "JPEG", quality=95))
        a.wait_processed(1)
    b = Daemon(redis_config(tmp_path, models_dir, redis_prefix, name="b"), log=tmp_path / "b.log")
    with b:
        from PIL import Image

        small = Image.fromarray(photo("chelsea")).resize((338, 225))
        import io

        buf = io.BytesIO()
        small.save(buf, "JPEG", quality=80)
        (tmp_path / "inbox" / "reencoded.jpg").write_bytes(buf.getvalue())
        (tmp_path / "inbox" / "copy.jpg").write_bytes((tmp_path / "inbox" / "orig.jpg").read_bytes())
        b.wait_processed(2)
    tiers = {e["path"].rsplit("/", 1)[1]: e["outcome"] for e in b.processed()}
    assert tiers == {"reencoded.jpg": "near", "copy.jpg": "exact"}


def test_claim_of_a_killed_daemon_expires(tmp_path, models_dir, redis_prefix):
    from daemon import config as configmod
    from daemon.coord.locks import open_locks

    cfg_b = redis_config(tmp_path, models_dir, redis_prefix, name="b")
    # a daemon that died holding a claim: the lock exists and nobody refreshes it
    cfg = configmod.load(cfg_b)
    ghost = open_locks(cfg.store, cfg.cache.dir)
    assert ghost.try_lock("claim:inbox/held.jpg", 4.0)
    (tmp_path / "inbox" / "held.jpg").write_bytes(synthetic(7))
    (tmp_path / "inbox" / "free.jpg").write_bytes(synthetic(8))
    with Daemon(cfg_b, log=tmp_path / "b.log") as b:
        b.wait_processed(1)
        assert not (tmp_path / "outbox" / "held.jpg.png").exists()
        t0 = time.monotonic()
        b.wait_processed(2, timeout=30)
        assert time.monotonic() - t0 < 15
    assert (tmp_path / "outbox" / "held.jpg.png").exists()

    # and a real kill -9 mid-batch: the survivor finishes everything, once
    names = [f"k{i}.jpg" for i in range(8)]
    a = Daemon(redis_config(tmp_path, models_dir, redis_prefix, name="a"), log=tmp_path / "a.log")
    a.start()
    for i, name in enumerate(names):
        (tmp_path / "inbox" / name).write_bytes(synthetic(200 + i))
    a.wait_processed(3)
    a.kill9()
    with Daemon(cfg_b, log=tmp_path / "b2.log") as b2:
        wait_for(lambda: all((tmp_path / "outbox" / f"{n}.png").exists() for n in names), timeout=90)
        wait_for(lambda: all_idle(b2), timeout=30)
    per_path, _ = outcomes(a, b2)
    assert all(per_path[str(tmp_path / "inbox" / n)] == 1 for n in names
               if str(tmp_path / "inbox" / n) in per_path)
    complete_pngs(tmp_path / "outbox")


def test_redis_outage_mid_run_every_file_once(tmp_path, models_dir, redis_prefix):
    proxy = TcpProxy()
    a = Daemon(redis_config(tmp_path, models_dir, redis_prefix, url=proxy.url, name="a"),
               log=tmp_path / "a.log")
    b = Daemon(redis_config(tmp_path, models_dir, redis_prefix, url=proxy.url, name="b"),
               log=tmp_path / "b.log")
    with a, b:
        for i in range(4):
            (tmp_path / "inbox" / f"before{i}.jpg").write_bytes(synthetic(300 + i))
        wait_for(lambda: len(complete_pngs(tmp_path / "outbox")) == 4, timeout=60)
        proxy.cut()
        for i in range(4):
            (tmp_path / "inbox" / f"during{i}.jpg").write_bytes(synthetic(310 + i))
        wait_for(lambda: len(complete_pngs(tmp_path / "outbox")) == 8, timeout=90)
        st = wait_for(lambda: (s := a.status()) and s["cache"]["store_errors"] + s["counters"].get(
            "claim_fallbacks", 0) > 0 and s, timeout=20)
        assert st["running"]
        proxy.restore()
        for i in range(4):
            (tmp_path / "inbox" / f"after{i}.jpg").write_bytes(synthetic(320 + i))
        wait_for(lambda: len(complete_pngs(tmp_path / "outbox")) == 12, timeout=90)
        wait_for(lambda: all_idle(a, b), timeout=30)
    per_path, _ = outcomes(a, b)
    assert len(per_path) == 12 and set(per_path.values()) == {1}, per_path
    logged = [e["event"] for e in a.events() + b.events()]
    assert "cache_unavailable" in logged or "claim_store_unavailable" in logged
