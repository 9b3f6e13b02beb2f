"""The Prometheus exposition after real processing (a real Supervisor, real files)."""
from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.service.intake import WorkItem
from tests.helpers import encode, photo, write_config
from tests.test_confidence import bottle_shape, busy_shot, coverage


@pytest.fixture
def svc(tmp_path, models_dir, shared_engines):
    from daemon import config as configmod
    from daemon.service.app import App
    from daemon.service.supervisor import Supervisor

    (tmp_path / "in2").mkdir()
    (tmp_path / "out2").mkdir()
    path = write_config(tmp_path, models_dir, watch=[
        {"inbox": str(tmp_path / "inbox"), "outbox": str(tmp_path / "outbox")},
        {"inbox": str(tmp_path / "in2"), "outbox": str(tmp_path / "out2"), "review": {}}])
    cfg = configmod.load(path)
    s = Supervisor(cfg, engines=shared_engines)
    s.app = App.build(cfg, engines=shared_engines)
    yield s
    s.app.close()


def _samples(svc) -> dict[tuple, float]:
    body, content_type = svc.metrics.render()
    assert content_type.startswith("text/plain; version=")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def test_counts_and_labels_after_real_processing(svc, tmp_path):
    inbox, in2 = str(tmp_path / "inbox"), str(tmp_path / "in2")
    data = encode(photo("coffee"))
    for name, payload in (("a.jpg", data), ("b.jpg", data), ("broken.jpg", b"not an image")):
        (tmp_path / "inbox" / name).write_bytes(payload)
    (tmp_path / "in2" / "busy.png").write_bytes(encode(busy_shot(coverage(bottle_shape)), "PNG"))
    outcomes = [svc.intake.process(WorkItem(svc.cfg.watch[0].key, tmp_path / "inbox" / n))
                for n in ("a.jpg", "b.jpg", "broken.jpg")]
    outcomes.append(svc.intake.process(WorkItem(svc.cfg.watch[1].key,
                                                tmp_path / "in2" / "busy.png")))
    assert outcomes == ["miss", "exact", "failed", "review"]

    got = _samples(svc)
    processed = {k[1]: v for k, v in got.items() if k[0] == "rembgd_files_processed_total"}
    assert processed == {(("pair", inbox), ("tier", "miss")): 1.0,
                         (("pair", inbox), ("tier", "exact")): 1.0,
                         (("pair", in2), ("tier", "miss")): 1.0}
    assert got[("rembgd_files_failed_total", (("pair", inbox), ("reason", "unsupported")))] == 1.0
    assert got[("rembgd_files_reviewed_total", (("pair", in2),))] == 1.0
    assert got[("rembgd_processing_seconds_count", (("tier", "miss"),))] == 2.0
    assert got[("rembgd_processing_seconds_count", (("tier", "exact"),))] == 1.0
    assert got[("rembgd_inference_seconds_count", ())] == 2.0
    assert 0 < got[("rembgd_inference_seconds_sum", ())] < 60
    assert got[("rembgd_queue_depth", ())] == 0.0
    assert got[("rembgd_pair_standby", (("pair", inbox),))] == 0.0
    assert got[("rembgd_pair_standby", (("pair", in2),))] == 0.0
    assert got[("rembgd_cache_entries", ())] >= 2.0  # two masks (and their outputs)
    assert got[("rembgd_cache_hit_ratio", ())] == pytest.approx(1 / 3)


def test_a_failing_gauge_callback_does_not_fail_the_scrape():
    from daemon.service.metrics import Metrics

    def broken():
        raise OSError("cache unreachable")

    m = Metrics(queue_depth=lambda: 4, cache=broken)
    m.processed("/in", "near", 0.02)
    text = m.render()[0].decode()
    assert "rembgd_queue_depth 4.0" in text and "rembgd_cache_entries" not in text
    assert 'rembgd_files_processed_total{pair="/in",tier="near"} 1.0' in text
    assert "rembgd_cache_hit_ratio 1.0" in text


def test_a_cache_outage_shows_in_metrics_status_and_page_and_its_error_never_nests(
        tmp_path, models_dir, shared_engines, own_redis):
    """Issue 28.6, with a redis-server of our own that is stopped mid-run."""
    import uuid

    from daemon import config as configmod
    from daemon.service.app import App
    from daemon.service.supervisor import Supervisor

    cfg = configmod.load(write_config(tmp_path, models_dir, store={
        "backend": "redis", "url": own_redis.url, "prefix": f"t28-{uuid.uuid4().hex[:8]}",
        "socket_timeout_s": 0.2}, web={"listen": "127.0.0.1:0"}))
    svc = Supervisor(cfg, engines=shared_engines)
    svc.app = App.build(cfg, engines=shared_engines)
    svc.web.apply(cfg)  # the real page server, in this process

    def page() -> str:
        with urllib.request.urlopen(svc.web.url + "/", timeout=10) as resp:
            return resp.read().decode()

    try:
        inbox = tmp_path / "inbox"
        (inbox / "a.jpg").write_bytes(encode(photo("coffee")))
        assert svc.intake.process(WorkItem(svc.cfg.watch[0].key, inbox / "a.jpg")) == "miss"
        got = _samples(svc)
        assert got[("rembgd_cache_available", ())] == 1.0
        assert got[("rembgd_cache_outages_total", ())] == 0.0
        assert "mask cache is unavailable" not in page()

        own_redis.kill()  # the outage
        own_redis.wait(5)
        for i, name in enumerate(("chelsea", "rocket", "astronaut", "coffee", "chelsea")):
            (inbox / f"{i}.jpg").write_bytes(encode(photo(name)[::2, ::2]))
            item = WorkItem(svc.cfg.watch[0].key, inbox / f"{i}.jpg")
            assert svc.intake.process(item) == "miss"  # no cache
        cache = svc.status()["cache"]
        assert cache["available"] is False and cache["outages"] == 1, cache
        error = cache["error"]
        # the first cause once, and a count: never the previous message inside the new one
        assert error.count("unavailable (") <= 1 and error.count("Error") <= 2, error
        assert "more failures since" in error and len(error) < 400, error
        got = _samples(svc)
        assert got[("rembgd_cache_available", ())] == 0.0
        assert got[("rembgd_cache_outages_total", ())] == 1.0
        html = page()
        assert 'class="banner"' in html and "mask cache is unavailable" in html, html[:800]
    finally:
        svc.web.close()
        svc.app.close()
