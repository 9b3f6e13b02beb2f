"""The real Pipeline over RedisStores: what several studio machines sharing one Redis see.

Each "machine" is a Pipeline over its own RedisStore (its own connection, outage
breaker and Redis locks) on one key prefix, through a ``CacheGuard``. The cache
layout these tests rely on: one mask row per image, keyed by
``pipeline.mask_key(options)``, and (``cache.store_outputs``, the default) one
output row per deliverable, keyed by its ``output_key``, sharing the mask blob.
"""
from __future__ import annotations

import hashlib
import io
import threading
import time

import numpy as np
import pytest
import redis
import structlog
from PIL import Image

from tests.helpers import REDIS_URL, encode, photo, pipeline_over, render_legacy, write_config
from daemon import config as configmod
from daemon.cache.redis import RedisStore
from daemon.pipeline import Plan
from test_store_redis import proxy, raw, wait_for  # noqa: F401  (fixtures)


@pytest.fixture
def machines(tmp_path, models_dir, shared_engines, redis_prefix):
    """``machines(n, **store overrides)`` -> (cfg, [Pipeline, ...]) sharing one Redis prefix."""
    guards = []

    def make(n: int, **store):
        cfg = configmod.load(write_config(tmp_path, models_dir, store={
            "backend": "redis", "url": REDIS_URL, "prefix": redis_prefix, **store}))
        out = []
        for _ in range(n):
            p = pipeline_over(cfg, shared_engines, RedisStore(cfg.store, cfg.cache))
            guards.append(p.masks.guard)
            out.append(p)
        return cfg, out

    yield make
    for g in guards:
        g.close()


def store_of(pipeline) -> RedisStore:
    return pipeline.masks.guard.store


def blob_key(prefix: str, digest: str) -> str:
    return f"{prefix}:v1:blob:{digest}"


def half_q80(rgb: np.ndarray) -> bytes:
    """A near-duplicate: half the size, re-encoded at JPEG quality 80."""
    small = Image.fromarray(rgb).resize((rgb.shape[1] // 2, rgb.shape[0] // 2),
                                        Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=80)
    return buf.getvalue()


# ------------------------------------------------------------ eviction


def test_evicted_output_blob_re_renders_and_evicted_mask_blob_re_infers(machines, raw,
                                                                       redis_prefix):
    """Redis evicts blobs on its own (volatile-lru): an evicted blob is never an error.

    Adapted to the mask/output layout: the old test expected any evicted blob to
    cost a fresh inference. Now an evicted OUTPUT blob only drops that output row
    and the deliverable is re-rendered from the cached mask (tier "exact", no
    inference), while an evicted MASK blob makes the mask row and every output row
    sharing that blob dead (the lookup scripts check the mask blob), so the image
    is inferred again. Both machines see the same Redis.
    """
    cfg, (a, b) = machines(2)
    opts = cfg.output_defaults
    data = encode(photo("coffee"), "JPEG", quality=90)
    sha = hashlib.sha256(data).hexdigest()
    out_key = b.targets(Plan(opts))[0].output_key
    mask_key = b.mask_key(opts)

    first = render_legacy(a, data, opts)
    assert first.tier == "miss" and first.inferred and a.inferences == 1
    out_row = store_of(b).find_exact(out_key, sha)  # machine B sees A's rows
    mask_row = store_of(b).find_exact(mask_key, sha)
    assert out_row.mask_digest == mask_row.mask_digest  # one mask blob, shared
    assert raw.delete(blob_key(redis_prefix, out_row.output_digest)) == 1  # evicted

    again = render_legacy(b, data, opts)
    assert again.tier == "exact" and not again.inferred and b.inferences == 0
    assert again.files[""] == first.files[""]  # same mask, same bytes
    assert raw.exists(blob_key(redis_prefix, out_row.output_digest))  # stored again by B
    assert render_legacy(a, data, opts).tier == "exact"  # A reads B's new output row
    assert a.inferences == 1

    assert raw.delete(blob_key(redis_prefix, mask_row.mask_digest)) == 1  # mask evicted
    third = render_legacy(a, data, opts)
    assert third.tier == "miss" and third.inferred and a.inferences == 2
    assert render_legacy(b, data, opts).tier == "exact" and b.inferences == 0
    for p in (a, b):
        assert p.masks.guard.store_errors == 0 and p.masks.guard.available
    # the dead rows were cleaned up on the way: one live mask row again
    assert [e.key for e in store_of(a).entries()].count(mask_key) == 1


# ------------------------------------------------------------ sharing


def test_two_machines_share_near_duplicates(machines):
    cfg, (a, b) = machines(2)  # studio machines A and B, same Redis
    opts = cfg.output_defaults
    rgb = photo("chelsea")
    original = encode(rgb, "JPEG", quality=95)
    assert render_legacy(a, original, opts).tier == "miss"

    dup = half_q80(rgb)
    rb = render_legacy(b, dup, opts)
    assert rb.tier == "near", rb
    assert rb.metrics and not rb.inferred and b.inferences == 0  # verified before reuse
    out = Image.open(io.BytesIO(rb.files[""]))
    assert out.mode == "RGBA" and out.size == (rgb.shape[1] // 2, rgb.shape[0] // 2)
    # the rows B wrote make the re-encode an exact hit for every machine, A included
    # (now served from B's stored output row, which shares A's mask blob)
    assert render_legacy(a, dup, opts).tier == "exact"
    assert render_legacy(b, original, opts).tier == "exact"
    assert a.inferences == 1 and b.inferences == 0
    # only A's inferred mask row is a near-candidate: aliases and output rows are not
    mask_key = a.mask_key(opts)
    store = store_of(b)
    inferred = store.find_exact(mask_key, hashlib.sha256(original).hexdigest())
    near = store.find_near(mask_key, inferred.fp.phash, 10)
    assert [e.id for e in near] == [inferred.id]
    for p in (a, b):
        store_of(p).flush()
    counts = store_of(a).tier_counts(time.time() - 60)
    assert counts["miss"] == 1 and counts["near"] == 1 and counts["exact"] == 2, counts
    assert a.masks.guard.store_errors == 0 and b.masks.guard.store_errors == 0


def test_two_machines_infer_a_new_image_once(machines):
    """Single flight across machines: the Redis lease makes the second one wait and reuse.

    Each Pipeline's in-process single flight is its own, so only the lease in
    Redis can keep the second machine from inferring. Adapted: the waiting
    machine finds the mask row ("exact") and, with ``store_outputs``, also writes
    an output row of its own, so the check is one mask row, not one row in all.
    """
    cfg, pipes = machines(2)
    data = encode(photo("astronaut"), "JPEG", quality=90)
    results: list = [None, None]
    start = threading.Barrier(2)

    def work(i: int) -> None:
        start.wait()
        results[i] = render_legacy(pipes[i], data, cfg.output_defaults)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(r is not None for r in results), results
    assert sorted(r.tier for r in results) == ["exact", "miss"]  # exactly one inference
    assert sum(p.inferences for p in pipes) == 1
    assert results[0].files[""] == results[1].files[""]
    rows = list(store_of(pipes[0]).entries())
    mask_key = pipes[0].mask_key(cfg.output_defaults)
    masks = [e for e in rows if e.key == mask_key]
    assert len(masks) == 1
    outputs = [e for e in rows if e.key != mask_key]
    assert outputs and {e.mask_digest for e in outputs} == {masks[0].mask_digest}


# ------------------------------------------------------------ outages


def test_pipeline_degrades_to_no_cache_during_an_outage(proxy, machines):  # noqa: F811
    cfg, (p,) = machines(1, url=proxy.url, socket_timeout_s=0.5, retry_s=0.3)
    store = store_of(p)
    store.link.outage.BACKOFF_START_S = 0.2
    opts = cfg.output_defaults
    cached = encode(photo("coffee"), "JPEG", quality=90)
    assert render_legacy(p, cached, opts).tier == "miss"

    with structlog.testing.capture_logs() as logs:
        proxy.stop()
        t0 = time.monotonic()
        r = render_legacy(p, encode(photo("rocket"), "JPEG", quality=90), opts)
        took = time.monotonic() - t0
    assert r.tier == "miss" and r.inferred and r.files[""]  # processed, without the cache
    Image.open(io.BytesIO(r.files[""])).verify()
    assert took < 10, took
    assert p.masks.guard.store_errors > 0 and not p.masks.guard.available
    assert [x["event"] for x in logs if x["event"].startswith("cache_")] == ["cache_unavailable"]

    proxy.start()  # same port
    assert wait_for(lambda: p.masks.guard.available, timeout=5)
    again = render_legacy(p, cached, opts)
    assert again.tier == "exact" and not again.inferred
    assert p.inferences == 2  # the first image once, the one rendered during the outage once
