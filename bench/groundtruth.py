"""Synthetic studio shots with exact alpha, for scoring mask models against ground truth.

Real matting sets cannot be downloaded here, so the scenes are composited:
``image = alpha * subject + (1 - alpha) * backdrop``, with ``alpha`` known
exactly (shapes drawn at 4x and box-filtered, so edges carry fractional
coverage). Each scene is one studio difficulty:

- ``portrait``: head and shoulders textured with ``astronaut``, hair strands
  (1-2 px wide) around the head;
- ``product``: a bottle textured with ``coffee``, a handle with a hole and a
  2 px strap;
- ``glass``: a tumbler whose body has alpha 0.3-0.6, opaque rim and base;
- ``white-on-white``: a white box on a white sweep (edge contrast of a few
  grey levels);
- ``cat``: a cat textured with ``chelsea``, fur fringe and whiskers;
- ``outline`` (not in ``KINDS``: the edge-band figure only): an opaque lacquered
  product with a hard outline, straight and curved, faintly shaded by ``camera``;
- ``shaded`` and ``shaded-fill`` (not in ``KINDS``: ``ADVERSARIAL``, the see-through
  safety check): an OPAQUE matte grey cylinder lit by the same light as the sweep,
  so its shading follows the sweep's vertical gradient row by row (``shaded``: that
  light only, the pixel proportional to the backdrop beside it; ``shaded-fill``: plus
  a uniform fill light, ``FILL`` of it, which gives it an offset as a glass's own light
  would), with Lambertian shading across it.

Every backdrop is a sweep (smooth vertical gradient, faint vignette) with a
soft floor shadow under the subject; the shadow darkens the backdrop and is
not part of the subject (alpha 0 there). Mild sensor noise goes on last.
Deterministic for a given (kind, seed, size) and ``GENERATOR_VERSION``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

GENERATOR_VERSION = "1"
KINDS = ("portrait", "product", "glass", "white-on-white", "cat")
HARD_EDGE = "outline"
ADVERSARIAL = ("shaded", "shaded-fill")
FILL = {"shaded": 0.0, "shaded-fill": 0.3}  # share of uniform fill light on the cylinder
SS = 4  # supersampling factor for exact fractional edge coverage


@dataclass
class Scene:
    name: str
    kind: str
    rgb: np.ndarray    # uint8 HxWx3
    alpha: np.ndarray  # float32 HxW in [0, 1]: the subject's exact coverage


# ------------------------------------------------------------------ building blocks


def _photo(name: str, w: int, h: int) -> np.ndarray:
    """A scikit-image photo scaled to cover w x h (float32 0-1, RGB)."""
    import skimage.data

    arr = getattr(skimage.data, name)()
    if arr.ndim == 2:
        arr = np.dstack([arr] * 3)
    img = Image.fromarray(arr[..., :3].astype(np.uint8))
    scale = max(w / img.width, h / img.height)
    img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))),
                     Image.Resampling.BICUBIC)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    return np.asarray(img.crop((left, top, left + w, top + h)), np.float32) / 255


def _coverage(w: int, h: int, draw_fn) -> np.ndarray:
    """Draw at SS x resolution with ``draw_fn(ImageDraw, s)``, box-filter to w x h coverage."""
    big = Image.new("L", (w * SS, h * SS), 0)
    draw_fn(ImageDraw.Draw(big), SS)
    return np.asarray(big.resize((w, h), Image.Resampling.BOX), np.float32) / 255


def _sweep(rng, w: int, h: int, top, bottom) -> np.ndarray:
    """A studio sweep: smooth vertical gradient (cove curve) with a faint vignette."""
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    x = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    t = 0.5 - 0.5 * np.cos(np.pi * np.clip(y * 1.15, 0, 1))  # the cove bends smoothly
    top, bottom = np.asarray(top, np.float32), np.asarray(bottom, np.float32)
    bg = top[None, None] * (1 - t[..., None]) + bottom[None, None] * t[..., None]
    vignette = 1 - 0.06 * (x ** 2)[..., None] - 0.03 * ((y - 0.5) ** 2)[..., None]
    return np.clip(bg * vignette, 0, 1)


def _shadow(w: int, h: int, cx: float, floor: float, half_w: float, rng) -> np.ndarray:
    """Soft floor shadow (0-1 darkening strength) under a subject standing at ``floor``."""
    img = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(img)
    sx = half_w * rng.uniform(1.0, 1.4)
    d.ellipse((cx - sx, floor - 0.08 * sx, cx + sx, floor + 0.12 * sx), fill=255)
    soft = img.filter(ImageFilter.GaussianBlur(radius=max(6.0, 0.12 * sx)))
    return np.asarray(soft, np.float32) / 255


def _curve(p0, p1, bend: float, n: int = 12):
    """Points of a gently bent segment (a strand, a strap)."""
    (x0, y0), (x1, y1) = p0, p1
    mx, my = (x0 + x1) / 2, (y0 + y1) / 2
    nx, ny = -(y1 - y0), x1 - x0
    cx, cy = mx + bend * nx, my + bend * ny
    t = np.linspace(0, 1, n)
    xs = (1 - t) ** 2 * x0 + 2 * (1 - t) * t * cx + t ** 2 * x1
    ys = (1 - t) ** 2 * y0 + 2 * (1 - t) * t * cy + t ** 2 * y1
    return list(zip(xs, ys))


def _strands(w, h, rng, roots, length, width_px, spread) -> np.ndarray:
    """Coverage of thin strands growing outward from ``roots`` [(x, y, angle)]."""
    def draw(d, s):
        for x, y, ang in roots:
            a = ang + rng.normal(0, spread)
            L = length * rng.uniform(0.6, 1.2)
            end = (x + L * np.cos(a), y + L * np.sin(a))
            pts = _curve((x, y), end, rng.normal(0, 0.15))
            d.line([(px * s, py * s) for px, py in pts], fill=255,
                   width=max(1, round(rng.uniform(*width_px) * s)))
    return _coverage(w, h, draw)


def _over(alpha, colour, a2, c2):
    """Porter-Duff ``(a2, c2)`` over ``(alpha, colour)`` (premultiplied internally)."""
    out_a = a2 + alpha * (1 - a2)
    prem = c2 * a2[..., None] + colour * (alpha * (1 - a2))[..., None]
    return out_a, prem / np.maximum(out_a, 1e-6)[..., None]


# ------------------------------------------------------------------ the scenes


def _portrait(rng, w, h):
    tex = _photo("astronaut", w, h)
    cx, head_y, r = w * rng.uniform(0.4, 0.6), h * rng.uniform(0.32, 0.4), h * rng.uniform(0.13, 0.16)

    def body(d, s):
        d.ellipse(((cx - r * 0.8) * s, (head_y - r) * s, (cx + r * 0.8) * s, (head_y + r) * s), fill=255)
        d.rounded_rectangle(((cx - r * 0.35) * s, (head_y + 0.8 * r) * s,
                             (cx + r * 0.35) * s, (head_y + 1.4 * r) * s), radius=r * 0.1 * s, fill=255)
        d.pieslice(((cx - 2.6 * r) * s, (head_y + 1.25 * r) * s, (cx + 2.6 * r) * s,
                    (head_y + 4.5 * r) * s), 180, 360, fill=255)
        d.rectangle(((cx - 2.6 * r) * s, (head_y + 2.85 * r) * s, (cx + 2.6 * r) * s, h * s), fill=255)

    alpha = _coverage(w, h, body)
    colour = tex
    n = int(rng.integers(80, 140))
    angles = rng.uniform(np.pi * 1.05, np.pi * 1.95, n)
    roots = [(cx + 0.75 * r * np.cos(a), head_y + 0.9 * r * np.sin(a), a) for a in angles]
    hair = _strands(w, h, rng, roots, 0.55 * r, (0.8, 2.0), 0.35)
    hair_colour = np.broadcast_to(np.array([0.22, 0.14, 0.08], np.float32), colour.shape)
    alpha, colour = _over(alpha, colour, hair, hair_colour)
    return alpha, colour, (cx, h * 1.02, 2.6 * r)


def _product(rng, w, h):
    tex = _photo("coffee", w, h)
    cx, bw = w * rng.uniform(0.4, 0.6), w * rng.uniform(0.12, 0.16)
    top, floor = h * rng.uniform(0.2, 0.28), h * rng.uniform(0.8, 0.86)

    def bottle(d, s):
        d.rounded_rectangle(((cx - bw) * s, (top + 0.25 * (floor - top)) * s, (cx + bw) * s,
                             floor * s), radius=bw * 0.35 * s, fill=255)
        d.rectangle(((cx - 0.3 * bw) * s, top * s, (cx + 0.3 * bw) * s,
                     (top + 0.3 * (floor - top)) * s), fill=255)
        # a handle with a hole in it (the hole shows the backdrop)
        hx, hy, hr = cx + bw, top + 0.55 * (floor - top), 0.45 * bw
        d.ellipse(((hx - hr) * s, (hy - 1.3 * hr) * s, (hx + hr) * s, (hy + 1.3 * hr) * s), fill=255)
        d.ellipse(((hx - 0.55 * hr) * s, (hy - 0.8 * hr) * s, (hx + 0.55 * hr) * s,
                   (hy + 0.8 * hr) * s), fill=0)
        # a thin strap hanging from the neck
        pts = _curve((cx - 0.3 * bw, top + 0.1 * (floor - top)),
                     (cx - 1.6 * bw, top + 0.5 * (floor - top)), 0.25, n=24)
        d.line([(x * s, y * s) for x, y in pts], fill=255, width=round(2 * s))

    alpha = _coverage(w, h, bottle)
    return alpha, tex, (cx, floor, bw)


def _glass(rng, w, h):
    cx, gw = w * rng.uniform(0.4, 0.6), w * rng.uniform(0.1, 0.14)
    top, floor = h * rng.uniform(0.25, 0.32), h * rng.uniform(0.78, 0.85)
    xs = (np.arange(w, dtype=np.float32) - cx) / gw
    body = _coverage(w, h, lambda d, s: d.rectangle(((cx - gw) * s, top * s, (cx + gw) * s,
                                                      floor * s), fill=255))
    # fresnel-like: 0.3 in the middle, 0.6 at the sides
    body_alpha = body * np.clip(0.3 + 0.3 * np.abs(xs) ** 2, 0.3, 0.6)[None, :]

    def opaque(d, s):
        d.rectangle(((cx - gw) * s, top * s, (cx + gw) * s, (top + 3) * s), fill=255)  # rim
        for x in (cx - gw, cx + gw - 2):
            d.rectangle((x * s, top * s, (x + 2) * s, floor * s), fill=255)  # walls
        d.rectangle(((cx - gw) * s, (floor - 0.08 * (floor - top)) * s, (cx + gw) * s,
                     floor * s), fill=255)  # thick base

    solid = _coverage(w, h, opaque)
    tint = np.broadcast_to(np.array([0.78, 0.88, 0.92], np.float32), (h, w, 3))
    edge = np.broadcast_to(np.array([0.55, 0.65, 0.7], np.float32), (h, w, 3))
    alpha, colour = _over(body_alpha, tint, solid, edge)
    return alpha, colour, (cx, floor, gw)


def _white_on_white(rng, w, h):
    cx, bw = w * rng.uniform(0.4, 0.6), w * rng.uniform(0.14, 0.2)
    top, floor = h * rng.uniform(0.3, 0.4), h * rng.uniform(0.78, 0.85)
    alpha = _coverage(w, h, lambda d, s: d.rounded_rectangle(
        ((cx - bw) * s, top * s, (cx + bw) * s, floor * s), radius=0.08 * bw * s, fill=255))
    lum = _photo("chelsea", w, h).mean(axis=2, keepdims=True)
    xs = np.linspace(-1, 1, w, dtype=np.float32)[None, :, None]
    shade = 0.955 + 0.02 * (lum - lum.mean()) - 0.01 * xs  # white card, faint texture
    return alpha, np.clip(np.repeat(shade, 3, axis=2), 0, 1), (cx, floor, bw)


def _cat(rng, w, h):
    tex = _photo("chelsea", w, h)
    cx, r = w * rng.uniform(0.42, 0.58), h * rng.uniform(0.16, 0.19)
    head_y, floor = h * rng.uniform(0.34, 0.4), h * rng.uniform(0.84, 0.9)

    def body(d, s):
        d.ellipse(((cx - r) * s, (head_y - 0.85 * r) * s, (cx + r) * s, (head_y + 0.85 * r) * s), fill=255)
        for side in (-1, 1):  # ears
            d.polygon([((cx + side * 0.85 * r) * s, (head_y - 0.3 * r) * s),
                       ((cx + side * 0.75 * r) * s, (head_y - 1.35 * r) * s),
                       ((cx + side * 0.2 * r) * s, (head_y - 0.8 * r) * s)], fill=255)
        d.ellipse(((cx - 1.5 * r) * s, (head_y + 0.5 * r) * s, (cx + 1.5 * r) * s, floor * s), fill=255)

    alpha = _coverage(w, h, body)
    colour = tex
    # fur fringe all around the body outline
    n = int(rng.integers(150, 250))
    ang = rng.uniform(0, 2 * np.pi, n)
    by, byr = (head_y + 0.5 * r + floor) / 2, (floor - head_y - 0.5 * r) / 2
    roots = [(cx + 1.45 * r * np.cos(a), by + 0.97 * byr * np.sin(a), a) for a in ang if np.sin(a) < 0.6]
    fur = _strands(w, h, rng, roots, 0.12 * r, (0.7, 1.5), 0.3)
    alpha, colour = _over(alpha, colour, fur, tex * 0.9)
    # whiskers: long, 1 px, light
    wroots = [(cx + side * 0.35 * r, head_y + 0.35 * r, (0 if side > 0 else np.pi) + rng.normal(0, 0.2))
              for side in (-1, 1) for _ in range(4)]
    whisk = _strands(w, h, rng, wroots, 0.9 * r, (0.7, 1.0), 0.15)
    light = np.broadcast_to(np.array([0.93, 0.92, 0.88], np.float32), colour.shape)
    alpha, colour = _over(alpha, colour, whisk, light)
    return alpha, colour, (cx, floor, 1.5 * r)


def _outline(rng, w, h):
    lum = _photo("camera", w, h).mean(axis=2, keepdims=True)
    tex = np.array([0.12, 0.22, 0.5], np.float32) * (0.85 + 0.3 * lum)
    cx, bw = w * rng.uniform(0.42, 0.58), w * rng.uniform(0.14, 0.18)
    top, floor = h * rng.uniform(0.2, 0.26), h * rng.uniform(0.8, 0.86)

    def bag(d, s):
        d.rounded_rectangle(((cx - bw) * s, (top + 0.3 * (floor - top)) * s, (cx + bw) * s,
                             floor * s), radius=0.12 * bw * s, fill=255)
        d.polygon([((cx - 0.7 * bw) * s, (top + 0.3 * (floor - top)) * s), (cx * s, top * s),
                   ((cx + 0.7 * bw) * s, (top + 0.3 * (floor - top)) * s)], fill=255)
        d.ellipse(((cx + 0.6 * bw) * s, (top + 0.45 * (floor - top)) * s, (cx + 1.4 * bw) * s,
                   (top + 0.75 * (floor - top)) * s), fill=255)

    return _coverage(w, h, bag), tex, (cx, floor, bw)


def _shaded(rng, w, h):
    """Albedo times shading across the cylinder; ``scene`` multiplies in the sweep's light."""
    cx, bw = w * rng.uniform(0.42, 0.58), w * rng.uniform(0.1, 0.14)
    top, floor = h * rng.uniform(0.22, 0.3), h * rng.uniform(0.8, 0.86)
    alpha = _coverage(w, h, lambda d, s: d.rounded_rectangle(
        ((cx - bw) * s, top * s, (cx + bw) * s, floor * s), radius=0.25 * bw * s, fill=255))
    u = np.clip((np.arange(w, dtype=np.float32) - cx) / bw, -1, 1)
    lambert = 0.55 + 0.45 * np.sqrt(1 - u ** 2)  # lit from the camera's side
    albedo = rng.uniform(0.6, 0.85)  # a neutral grey: it takes the light's colour exactly
    colour = np.broadcast_to((albedo * lambert)[None, :, None], (h, w, 3))
    return alpha, colour, (cx, floor, bw)


_BUILDERS = {"outline": _outline, "shaded": _shaded, "shaded-fill": _shaded, "portrait": _portrait, "product": _product, "glass": _glass,
             "white-on-white": _white_on_white, "cat": _cat}


def scene(kind: str, seed: int, size: tuple[int, int] = (1224, 816)) -> Scene:
    """One composite of ``kind`` (KINDS, HARD_EDGE or ADVERSARIAL) at ``size`` (w, h),
    deterministic per seed.

    Sizes are in pixels, so at 6000 x 4000 a strand is still 1-2 px and the strap 2 px:
    a camera file's fine detail, not a 1 MP scene magnified."""
    w, h = size
    rng = np.random.default_rng([seed, (*KINDS, HARD_EDGE, *ADVERSARIAL).index(kind)])
    alpha, colour, (cx, floor, half_w) = _BUILDERS[kind](rng, w, h)
    if kind == "white-on-white":
        top, bottom = [rng.uniform(0.95, 0.98)] * 3, [rng.uniform(0.9, 0.94)] * 3
    else:
        base = rng.uniform(0.45, 0.85)
        tint = rng.uniform(-0.05, 0.05, 3)
        top, bottom = base + tint, np.clip(base + 0.12 + tint, 0, 1)
    bg = _sweep(rng, w, h, top, bottom)
    if kind in ADVERSARIAL:  # lit by the sweep's light (row by row), plus the fill
        fill = FILL[kind]
        colour = colour * (fill * bg.mean(axis=(0, 1)) + (1 - fill) * bg)
    shadow = _shadow(w, h, cx, floor, half_w, rng)
    bg = bg * (1 - rng.uniform(0.35, 0.55) * shadow)[..., None]
    img = alpha[..., None] * colour + (1 - alpha[..., None]) * bg
    img = img + rng.normal(0, 1.2 / 255, img.shape).astype(np.float32)
    rgb = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return Scene(f"{kind}-{seed}", kind, rgb, np.clip(alpha, 0, 1).astype(np.float32))


def scenes(seed: int, per_kind: int, size: tuple[int, int] = (1224, 816)) -> list[Scene]:
    return [scene(kind, seed + i, size) for i in range(per_kind) for kind in KINDS]
