#!/usr/bin/env python
"""Calibrate near-duplicate verification on a labelled set of image pairs.

    .venv/bin/python bench/calibrate.py [--models var/models] [--out bench/calibration.md]
                                        [--iou] [--json bench/out/pairs.json]

Every pair is (cached image, query image) and is labelled:

* positive: the query is the cached photo after a re-encode, resize, format conversion,
  metadata edit or a small exposure change -- reusing the cached mask is right;
* hard negative: a recolour (whole image or only the object), a crop, a flip, a rotation,
  the other half of a stereo pair, the next shot of a product series, another photo of the
  same kind -- reusing the mask would be wrong, or at least unproven.

Each image goes through the real decoder and the real ``daemon.fingerprint`` functions
(pHash, pixel hash, thumbnails, EfficientNet-Lite0 embedding from ``Engines``), and each
pair through ``fingerprint.measure`` and ``fingerprint.verify`` with the thresholds of
``MatchThresholds()``. The report gives recall per positive transform, the false hits per
negative transform (must be 0), the metric ranges of both classes, and the safety margin:
how far every threshold could be relaxed towards the negatives before the first one would
be accepted. ``--iou`` also runs u2netp on every positive query and reports the IoU of the
reused (resized) mask against fresh inference.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from daemon import fingerprint as fpmod  # noqa: E402
from daemon.config import MatchThresholds  # noqa: E402
from daemon.decode import decode  # noqa: E402
from daemon.render import fit_mask  # noqa: E402

MAX_SIDE = 1024  # larger samples are downscaled first, to keep the run short

# --------------------------------------------------------------- images


def _skimage(name: str) -> np.ndarray | None:
    import skimage.data

    try:
        arr = getattr(skimage.data, name)()
    except Exception:  # not in this wheel, or needs a download
        return None
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = np.dstack([arr] * 3)
    if arr.shape[2] == 4:  # composite on white, like the decoder does
        a = arr[..., 3:4].astype(np.float64) / 255
        arr = arr[..., :3] * a + 255 * (1 - a)
    return _cap(np.ascontiguousarray(arr[..., :3]).astype(np.uint8))


def _cap(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    if max(h, w) <= MAX_SIDE:
        return rgb
    s = MAX_SIDE / max(h, w)
    img = Image.fromarray(rgb).resize((round(w * s), round(h * s)), Image.Resampling.LANCZOS)
    return np.asarray(img)


COLOUR_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
                 "hubble_deep_field", "retina", "colorwheel", "logo")
GREY_PHOTOS = ("camera", "coins", "clock", "moon", "brick", "grass", "gravel", "page")


def stereo() -> tuple[np.ndarray, np.ndarray]:
    import skimage.data

    left, right, _ = skimage.data.stereo_motorcycle()
    return _cap(left), _cap(right)


def _smoothstep(d: np.ndarray, aa: float) -> np.ndarray:
    return np.clip(0.5 - d / aa, 0, 1)


def studio_shot(seed: int, product: int, dx: float = 0.0, dy: float = 0.0, scale: float = 1.0,
                size: tuple[int, int] = (600, 480)) -> np.ndarray:
    """A generated packshot: one product on a lit seamless backdrop with a soft shadow.

    ``seed`` fixes the backdrop and light (one "session"), ``product`` the object;
    ``dx``/``dy`` (fractions of the width/height) and ``scale`` move it, as between two
    shots of a series.
    """
    h, w = size
    rs = np.random.default_rng(seed)
    rp = np.random.default_rng(1000 + product)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    # backdrop: warm/cool light grey, vertical falloff, vignette, light from the upper left
    tint = np.array([1.0, 1.0, 1.0]) + rs.uniform(-0.04, 0.04, 3)
    level = rs.uniform(200, 240)
    fall = 1 - 0.18 * (yy / h) - 0.08 * (xx / w)
    vig = 1 - 0.25 * (((xx - w / 2) / w) ** 2 + ((yy - h / 2) / h) ** 2)
    img = level * (fall * vig)[..., None] * tint
    # product geometry
    cx = w * (rp.uniform(0.35, 0.65) + dx)
    cy = h * (rp.uniform(0.5, 0.62) + dy)
    pw = w * rp.uniform(0.16, 0.3) * scale
    ph = h * rp.uniform(0.35, 0.55) * scale
    colour = np.array(rp.uniform(0.1, 0.95, 3))
    colour[rp.integers(0, 3)] = rp.uniform(0.75, 1.0)  # keep it saturated
    kind = product % 3
    x0, y0 = cx - pw / 2, cy - ph / 2
    if kind == 0:  # bottle: body, shoulder, neck, cap
        body = np.maximum(np.abs(xx - cx) - pw / 2, np.maximum(y0 + ph * 0.3 - yy, yy - (y0 + ph)))
        shoulder = np.hypot((xx - cx) / (pw / 2), (yy - (y0 + ph * 0.3)) / (ph * 0.15)) - 1
        shoulder = shoulder * pw / 2
        neck = np.maximum(np.abs(xx - cx) - pw * 0.16, np.maximum(y0 - yy, yy - (y0 + ph * 0.3)))
        sdf = np.minimum(np.minimum(body, shoulder), neck)
    elif kind == 1:  # box
        sdf = np.maximum(np.abs(xx - cx) - pw / 2, np.abs(yy - cy) - ph / 2 * 0.8)
    else:  # jar: rounded rectangle with a lid
        r = pw * 0.2
        qx = np.maximum(np.abs(xx - cx) - (pw / 2 - r), 0)
        qy = np.maximum(np.abs(yy - cy) - (ph / 2 * 0.7 - r), 0)
        sdf = np.hypot(qx, qy) - r
    inside = _smoothstep(sdf, 1.5)
    # shadow on the floor, offset away from the light
    sh = np.hypot((xx - cx - pw * 0.25) / (pw * 0.75), (yy - (cy + ph * 0.45)) / (ph * 0.08))
    img *= (1 - 0.35 * np.clip(1 - sh, 0, 1) ** 1.5)[..., None]
    # cylindrical shading, highlight on the left, a label band with "text" stripes
    u = np.clip((xx - x0) / max(pw, 1), 0, 1)
    shade = 0.55 + 0.45 * np.sin(np.pi * u) ** 0.6 + 0.35 * np.exp(-((u - 0.28) / 0.07) ** 2)
    prod = 255 * colour[None, None, :] * np.clip(shade, 0, 1.4)[..., None]
    band = (yy > cy - ph * 0.05) & (yy < cy + ph * 0.18) & (np.abs(xx - cx) < pw * 0.45)
    label = np.array([245.0, 242.0, 235.0]) * np.clip(shade, 0.6, 1.1)[..., None]
    stripes = band & (((yy - cy) // max(ph * 0.025, 1)) % 3 == 1) & \
        (np.abs(xx - cx - pw * rp.uniform(-0.1, 0.1)) < pw * rp.uniform(0.2, 0.4))
    label[stripes] *= 0.25
    prod = np.where(band[..., None], label, prod)
    img = img * (1 - inside[..., None]) + prod * inside[..., None]
    img += rs.normal(0, 1.8, img.shape)  # sensor noise
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------- transforms


def encode(rgb: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    if fmt == "PNG":
        kw.setdefault("compress_level", 1)  # lossless either way; level 6 would triple the run
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **kw)
    return buf.getvalue()


def resize(rgb: np.ndarray, f: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    img = Image.fromarray(rgb).resize((max(1, round(w * f)), max(1, round(h * f))),
                                      Image.Resampling.LANCZOS)
    return np.asarray(img)


def gamma(rgb: np.ndarray, g: float) -> np.ndarray:
    return np.clip(255 * (rgb / 255.0) ** g + 0.5, 0, 255).astype(np.uint8)


def brightness(rgb: np.ndarray, f: float) -> np.ndarray:
    return np.clip(rgb * f + 0.5, 0, 255).astype(np.uint8)


def hue_shift(rgb: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate the HSV hue of every pixel (saturation and value unchanged)."""
    img = Image.fromarray(rgb).convert("HSV")
    hsv = np.asarray(img).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + round(degrees / 360 * 256)) % 256
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def blend(fg: np.ndarray, bg: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``fg`` where the soft mask ``alpha`` (0-255) is on, ``bg`` elsewhere."""
    a = alpha[..., None].astype(np.float32) / 255.0
    return np.clip(fg * a + bg * (1 - a) + 0.5, 0, 255).astype(np.uint8)


def crop(rgb: np.ndarray, frac: float, where: str, back: bool) -> np.ndarray:
    h, w = rgb.shape[:2]
    if where == "centre":
        dy, dx = round(h * frac / 2), round(w * frac / 2)
        out = rgb[dy:h - dy, dx:w - dx]
    else:  # one side
        out = rgb[:, round(w * frac):]
    if back:
        out = np.asarray(Image.fromarray(np.ascontiguousarray(out)).resize(
            (w, h), Image.Resampling.LANCZOS))
    return np.ascontiguousarray(out)


def rotate(rgb: np.ndarray, degrees: float) -> np.ndarray:
    img = Image.fromarray(rgb).rotate(degrees, Image.Resampling.BICUBIC, expand=False,
                                      fillcolor=tuple(int(v) for v in np.median(rgb, (0, 1))))
    return np.asarray(img)


def exif_bytes(rgb: np.ndarray, text: str) -> bytes:
    exif = Image.Exif()
    exif[0x0131] = text  # Software
    exif[0x013B] = "Studio " + text  # Artist
    return encode(rgb, "JPEG", quality=90, exif=exif.tobytes())


# ---------------------------------------------------------------- pairs


@dataclass
class Sample:
    data: bytes
    rgb: np.ndarray = field(repr=False, default=None)
    fp: fpmod.Fingerprint | None = field(repr=False, default=None)


@dataclass
class Pair:
    label: str  # pos | neg
    group: str  # transform name, e.g. "jpeg q50" or "hue 120 object"
    base: str
    cached: Sample
    query: Sample
    metrics: dict = field(default_factory=dict)
    tier: str = ""  # pixel | near | miss under the chosen thresholds
    reason: str = ""
    iou: float | None = None


def build_pairs(masks) -> tuple[list[Pair], dict]:
    """All labelled pairs. ``masks(name, rgb)`` returns u2netp's mask for object recolours."""
    pairs: list[Pair] = []
    info: dict = {"bases": [], "skipped": []}

    def add(label, group, base, cached, query):
        pairs.append(Pair(label, group, base, cached, query))

    bases: list[tuple[str, np.ndarray, bool]] = []
    for name in COLOUR_PHOTOS:
        arr = _skimage(name)
        if arr is not None:
            bases.append((name, arr, True))
    left, right = stereo()
    bases.append(("motorcycle_left", left, True))
    for name in GREY_PHOTOS:
        arr = _skimage(name)
        if arr is not None:
            bases.append((name, arr, False))
    for i in range(4):
        bases.append((f"studio{i}", studio_shot(seed=i, product=i), True))
    info["bases"] = [(n, f"{a.shape[1]}x{a.shape[0]}", "colour" if c else "grey")
                     for n, a, c in bases]

    for name, rgb, colour in bases:
        orig = Sample(encode(rgb))
        jpeg90 = Sample(encode(rgb, "JPEG", quality=90))
        webp = Sample(encode(rgb, "WEBP", quality=80))
        # ---- positives
        for q in (50, 70, 95):
            add("pos", f"jpeg q{q}", name, orig, Sample(encode(rgb, "JPEG", quality=q)))
        for pct in (25, 50, 75, 150, 200):
            add("pos", f"resize {pct}%", name, orig, Sample(encode(resize(rgb, pct / 100))))
        add("pos", "png -> jpeg", name, orig, jpeg90)
        add("pos", "png -> webp", name, orig, webp)
        jrgb = decode(jpeg90.data).rgb
        add("pos", "jpeg -> webp", name, jpeg90, Sample(encode(jrgb, "WEBP", quality=80)))
        wrgb = decode(webp.data).rgb
        add("pos", "webp -> jpeg", name, webp, Sample(encode(wrgb, "JPEG", quality=90)))
        add("pos", "jpeg -> png (same pixels)", name, jpeg90, Sample(encode(jrgb)))
        add("pos", "exif-only change", name, Sample(exif_bytes(rgb, "A")),
            Sample(exif_bytes(rgb, "B-edited")))
        for g in (0.95, 1.05):
            add("pos", f"gamma {g}", name, orig, Sample(encode(gamma(rgb, g))))
        for f in (0.95, 1.05):
            add("pos", f"brightness {f - 1:+.0%}", name, orig, Sample(encode(brightness(rgb, f))))
        # ---- hard negatives
        if colour:
            alpha = masks(name, rgb)
            area = float((alpha >= 128).mean())
            for deg in (60, 120, 180):
                shifted = hue_shift(rgb, deg)
                add("neg", f"hue {deg} whole", name, orig, Sample(encode(shifted)))
                if area >= 0.02:
                    add("neg", f"hue {deg} object", name, orig,
                        Sample(encode(blend(shifted, rgb, alpha))))
            if area < 0.02:
                info["skipped"].append(f"{name}: object recolour (u2netp mask covers "
                                       f"{area:.1%} of the image)")
        for frac in (0.05, 0.10):
            pct = round(frac * 100)
            add("neg", f"crop {pct}% centre, resized back", name, orig,
                Sample(encode(crop(rgb, frac, "centre", True))))
            add("neg", f"crop {pct}% centre", name, orig, Sample(encode(crop(rgb, frac, "centre", False))))
            add("neg", f"crop {pct}% one side", name, orig, Sample(encode(crop(rgb, frac, "side", False))))
            add("neg", f"crop {pct}% one side, resized back", name, orig,
                Sample(encode(crop(rgb, frac, "side", True))))
        add("neg", "flip horizontal", name, orig, Sample(encode(np.ascontiguousarray(rgb[:, ::-1]))))
        for deg in (3, 15):
            add("neg", f"rotate {deg}", name, orig, Sample(encode(rotate(rgb, deg))))

    # ---- other photos of the same kind
    add("neg", "stereo pair (motorcycle L/R)", "motorcycle", Sample(encode(left)),
        Sample(encode(right)))
    for sess in range(3):  # the next shot of a product series, same backdrop and light
        ref = studio_shot(sess, 10 + sess)
        orig = Sample(encode(ref))
        for dx in (0.01, 0.02, 0.05):
            add("neg", f"studio series: product moved {dx:.0%}", f"session{sess}", orig,
                Sample(encode(studio_shot(sess, 10 + sess, dx=dx))))
        for s in (0.97, 1.05):
            add("neg", f"studio series: product scaled {s - 1:+.0%}", f"session{sess}", orig,
                Sample(encode(studio_shot(sess, 10 + sess, scale=s))))
        for other in range(3):
            if other != sess:
                add("neg", "studio series: another product", f"session{sess}", orig,
                    Sample(encode(studio_shot(sess, 10 + other))))
    hub = _skimage("hubble_deep_field")
    ret = _skimage("retina")
    for nm, arr in (("hubble_deep_field", hub), ("retina", ret)):
        if arr is None:
            continue
        h, w = arr.shape[:2]
        c0 = arr[: h * 3 // 4, : w * 3 // 4]
        for off in (0.02, 0.08):  # two frames of one scene, panned
            oy, ox = round(h * off), round(w * off)
            add("neg", f"same scene, panned {off:.0%}", nm, Sample(encode(np.ascontiguousarray(c0))),
                Sample(encode(np.ascontiguousarray(arr[oy:oy + h * 3 // 4, ox:ox + w * 3 // 4]))))
    for a, b in (("brick", "gravel"), ("grass", "gravel"), ("brick", "grass"),
                 ("chelsea", "coffee"), ("astronaut", "camera"), ("coins", "clock")):
        ra, rb = _skimage(a), _skimage(b)
        if ra is None or rb is None:
            continue
        add("neg", "another photo of the same kind", f"{a}/{b}",
            Sample(encode(ra)), Sample(encode(resize(rb, 1.0))))
    # ---- every pair of distinct bases (phash usually rejects them outright)
    encoded = [(n, Sample(encode(a))) for n, a, _ in bases]
    for i, (na, sa) in enumerate(encoded):
        for nb, sb in encoded[i + 1:]:
            add("neg", "unrelated photos", f"{na}/{nb}", sa, sb)
    return pairs, info


# ------------------------------------------------------------ measuring


def fingerprint_all(pairs: list[Pair], embed) -> int:
    seen: dict[int, Sample] = {}
    for p in pairs:
        for s in (p.cached, p.query):
            if id(s) in seen:
                continue
            seen[id(s)] = s
            s.rgb = decode(s.data).rgb
            s.fp = fpmod.fingerprint(s.data, s.rgb, embed(s.rgb))
    return len(seen)


def judge(pairs: list[Pair], t: MatchThresholds) -> None:
    for p in pairs:
        q, c = p.query.fp, p.cached.fp
        if q.sha256 == c.sha256:
            p.tier, p.reason = "exact", "same bytes"
        elif q.pixel_hash == c.pixel_hash:
            p.tier, p.reason = "pixel", "same pixels"
        else:
            p.metrics = fpmod.measure(q, c)
            v = fpmod.verify(q, c, t)
            p.tier, p.reason = ("near" if v.accepted else "miss"), v.reason


# Which way each metric must go to pass, and how it is reported.
CHECKS = {  # metric: (threshold field, "max" if metric <= threshold passes else "min")
    name: (fld, kind) for name, fld, kind in fpmod.CHECKS
}


def margins(pairs: list[Pair], t: MatchThresholds) -> tuple[float, Pair | None]:
    """The largest common relaxation of all thresholds that still accepts no negative.

    A relaxation r multiplies every "max" threshold by (1 + r) and moves every "min"
    threshold (a similarity in [-1, 1]) r of the way ... down: ``thr - r * (1 - thr)``.
    Returned as the r at which the first negative would pass, and that negative.
    """
    lo, hi = 0.0, 4.0
    worst = None
    for _ in range(40):
        mid = (lo + hi) / 2
        relaxed = relax(t, mid)
        bad = [p for p in pairs if p.label == "neg" and p.metrics and
               fpmod.verify(p.query.fp, p.cached.fp, relaxed).accepted]
        if bad:
            hi, worst = mid, bad[0]
        else:
            lo = mid
    return lo, worst


def relax(t: MatchThresholds, r: float) -> MatchThresholds:
    changes = {}
    for _, fld, kind in fpmod.CHECKS:
        v = getattr(t, fld)
        if kind == "max":
            nv = v * (1 + r)
            changes[fld] = int(min(15, math.floor(nv))) if isinstance(v, int) else nv
        else:
            changes[fld] = v - r * (1 - v)
    return dataclasses.replace(t, **changes)


def mask_ious(pairs: list[Pair], predict) -> None:
    cache: dict[int, np.ndarray] = {}

    def mask(s: Sample) -> np.ndarray:
        if id(s) not in cache:
            cache[id(s)] = predict(s.rgb)
        return cache[id(s)]

    for p in pairs:
        if p.label != "pos" or p.tier == "exact":
            continue
        q = p.query.rgb
        reused = fit_mask(mask(p.cached), q.shape[1], q.shape[0]) >= 128
        fresh = mask(p.query) >= 128
        union = np.logical_or(reused, fresh).sum()
        p.iou = float(np.logical_and(reused, fresh).sum() / union) if union else 1.0


# -------------------------------------------------------------- report


def _fmt(v: float) -> str:
    if isinstance(v, int) or float(v).is_integer() and abs(v) >= 1:
        return f"{int(v)}"
    return f"{v:.3f}"


def report(pairs: list[Pair], t: MatchThresholds, info: dict, elapsed: float, n_images: int,
           relax_r: float, worst: Pair | None, with_iou: bool) -> str:
    lines: list[str] = []
    w = lines.append
    pos = [p for p in pairs if p.label == "pos"]
    neg = [p for p in pairs if p.label == "neg"]
    hits = lambda ps: [p for p in ps if p.tier in ("exact", "pixel", "near")]  # noqa: E731
    w("# Near-duplicate verification: calibration")
    w("")
    w(f"Generated by `bench/calibrate.py` in {elapsed:.0f} s: {len(pairs)} labelled pairs "
      f"({len(pos)} positive, {len(neg)} negative) over {n_images} decoded images, every "
      "fingerprint computed by `daemon/fingerprint.py` and every decision by "
      "`fingerprint.verify()` with the defaults of `MatchThresholds` (= `config.yaml`).")
    w("")
    rec = len(hits(pos)) / len(pos)
    w(f"**Result: recall {rec:.1%} on positives ({len(hits(pos))}/{len(pos)}), "
      f"false hits {len(hits(neg))} of {len(neg)} negatives; every threshold can be relaxed "
      f"by r = {relax_r:.2f} (see *Margin*) before the first negative would be accepted.**")
    w("")
    w("Base images: " + ", ".join(f"{n} ({s}, {c})" for n, s, c in info["bases"]) + ".")
    if info["skipped"]:
        w("")
        w("Skipped: " + "; ".join(info["skipped"]) + ".")
    w("")
    w("## Thresholds (`MatchThresholds` defaults, `cache.match` in config.yaml)")
    w("")
    w("| check | threshold | positives seen (worst) | negatives seen (closest) | margin |")
    w("|---|---|---|---|---|")
    measured = [p for p in pairs if p.metrics]
    for metric, fld, kind in fpmod.CHECKS:
        thr = getattr(t, fld)
        pv = [p.metrics[metric] for p in measured if p.label == "pos"]
        nv = [p.metrics[metric] for p in measured if p.label == "neg"]
        if kind == "max":
            pworst, nclose = max(pv), min(nv)
            cmp = "<="
        else:
            pworst, nclose = min(pv), max(nv)
            cmp = ">="
        w(f"| `{metric}` {cmp} | `{fld}: {_fmt(thr)}` | {_fmt(min(pv))} .. {_fmt(max(pv))} "
          f"(worst {_fmt(pworst)}) | {_fmt(min(nv))} .. {_fmt(max(nv))} (closest {_fmt(nclose)}) "
          f"| {_margin_text(kind, thr, pworst, nclose)} |")
    w("")
    w("A check alone need not separate the classes: each negative has to fail at least one of "
      "them. The table *Closest negatives* shows, for each negative transform, the metric "
      "that rejects it with the most room.")
    w("")
    w("## Positives: recall per transform")
    w("")
    w("| transform | pairs | hits | recall | tiers | misses (why) | " +
      ("reused-mask IoU min / mean | " if with_iou else "") + "worst metrics |")
    w("|---|---|---|---|---|---|" + ("---|" if with_iou else "") + "---|")
    for group, ps in _groups(pos):
        h = hits(ps)
        tiers = _count(p.tier for p in ps)
        why = _count(f"{p.base}: {p.reason}" for p in ps if p not in h) or "-"
        worst_m = _worst_metrics([p for p in ps if p.metrics], "pos")
        row = f"| {group} | {len(ps)} | {len(h)} | {len(h) / len(ps):.0%} | {tiers} | {why} | "
        if with_iou:
            ious = [p.iou for p in ps if p.iou is not None]
            row += f"{min(ious):.3f} / {np.mean(ious):.3f} | " if ious else "- | "
        w(row + worst_m + " |")
    w("")
    w("## Hard negatives: false hits per transform (must be 0)")
    w("")
    w("| transform | pairs | false hits | rejected by | closest negative: metrics vs thresholds |")
    w("|---|---|---|---|---|")
    for group, ps in _groups(neg):
        fh = hits(ps)
        reasons = _count(p.reason for p in ps)
        w(f"| {group} | {len(ps)} | **{len(fh)}** | {reasons} | {_closest(ps, t)} |")
    w("")
    w("## Margin")
    w("")
    w("Relaxing every threshold at once by r (a maximum becomes `max * (1 + r)`, a minimum "
      "similarity becomes `min - r * (1 - min)`), the first negative is accepted at "
      f"r = {relax_r:.2f}" + (f": {worst.group} ({worst.base})." if worst else
                              " (none up to r = 4)."))
    r_pos = sum(1 for p in pos if p.tier in ("exact", "pixel", "near"))
    w(f"At r = 0 (the defaults) recall is {r_pos}/{len(pos)}.")
    w("")
    w("## Metrics")
    w("")
    for metric, doc in fpmod.METRIC_DOCS.items():
        w(f"- `{metric}`: {doc}")
    w("")
    return "\n".join(lines)


def _margin_text(kind: str, thr: float, pworst: float, nclose: float) -> str:
    if kind == "max":
        return f"pos {thr - pworst:+.3g} / neg {nclose - thr:+.3g}"
    return f"pos {pworst - thr:+.3g} / neg {thr - nclose:+.3g}"


def _groups(ps: list[Pair]) -> list[tuple[str, list[Pair]]]:
    out: dict[str, list[Pair]] = defaultdict(list)
    for p in ps:
        out[p.group].append(p)
    return list(out.items())


def _count(items) -> str:
    c: dict[str, int] = defaultdict(int)
    for i in items:
        c[i] += 1
    return ", ".join(f"{k} {v}" if v > 1 else k for k, v in c.items())


def _worst_metrics(ps: list[Pair], label: str) -> str:
    if not ps:
        return "-"
    parts = []
    for metric, _, kind in fpmod.CHECKS:
        vals = [p.metrics[metric] for p in ps]
        parts.append(f"{metric} {_fmt(max(vals) if kind == 'max' else min(vals))}")
    return ", ".join(parts)


def _closest(ps: list[Pair], t: MatchThresholds) -> str:
    """The negative of this group that is nearest to acceptance, and its best rejection."""
    ms = [p for p in ps if p.metrics]
    if not ms:
        return "-"
    best = min(ms, key=lambda p: _slack(p.metrics, t)[0])
    slack, metric = _slack(best.metrics, t)
    fld, kind = CHECKS[metric]
    thr = getattr(t, fld)
    cmp = ">" if kind == "max" else "<"
    return (f"{best.base}: `{metric}` {_fmt(best.metrics[metric])} {cmp} {_fmt(thr)} "
            f"(phash {best.metrics['phash']}, cosine {best.metrics['cosine']:.3f})")


def _slack(m: dict, t: MatchThresholds) -> tuple[float, str]:
    """How far the most decisive failed check is beyond its threshold, relative."""
    best = (-1.0, "phash")
    for metric, fld, kind in fpmod.CHECKS:
        thr = getattr(t, fld)
        v = m[metric]
        if kind == "max":
            s = (v - thr) / max(abs(thr), 1e-9)
        else:
            s = (thr - v) / max(1 - thr, 1e-9)
        if s > best[0]:
            best = (s, metric)
    return best


# ----------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=ROOT / "var" / "models")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "calibration.md")
    ap.add_argument("--json", type=Path, help="also dump every pair's metrics here")
    ap.add_argument("--iou", action="store_true",
                    help="run u2netp on every positive query: IoU of reused vs fresh mask")
    args = ap.parse_args(argv)

    from daemon.engine import Engines

    start = time.perf_counter()
    engines = Engines(args.models, threads=2)
    mask_engine = engines.mask("u2netp")
    embedder = engines.embedder()
    pairs, info = build_pairs(lambda name, rgb: mask_engine.predict(rgb))
    n = fingerprint_all(pairs, embedder.embed)
    t = MatchThresholds()
    judge(pairs, t)
    relax_r, worst = margins(pairs, t)
    if args.iou:
        mask_ious(pairs, mask_engine.predict)
    elapsed = time.perf_counter() - start
    text = report(pairs, t, info, elapsed, n, relax_r, worst, args.iou)
    args.out.write_text(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([
            {"label": p.label, "group": p.group, "base": p.base, "tier": p.tier,
             "reason": p.reason, "iou": p.iou, **p.metrics} for p in pairs], indent=1))
    pos = [p for p in pairs if p.label == "pos"]
    neg = [p for p in pairs if p.label == "neg"]
    ok_pos = sum(p.tier != "miss" for p in pos)
    bad_neg = sum(p.tier != "miss" for p in neg)
    print(f"{len(pairs)} pairs in {elapsed:.1f} s: recall {ok_pos}/{len(pos)} "
          f"({ok_pos / len(pos):.1%}), false hits {bad_neg}/{len(neg)}, margin r={relax_r:.2f}; "
          f"wrote {args.out}")
    return 0 if bad_neg == 0 and ok_pos >= 0.9 * len(pos) else 1


if __name__ == "__main__":
    sys.exit(main())
