"""Studio shots with thin structures and exact alpha, for the detail stage (bench/detail.py).

A bag (textured with ``coffee``) stands on a sweep, with, attached to it:

- a strap (handle): 24-44 px wide, arching over the bag;
- a cord: 5-10 px, hanging from its right side;
- a chain: rings of 2 px wire, 12-16 px across, hanging from its left side;
- strands: a fringe of 2-4 px strands from its bottom left corner;

and, not subject (alpha 0): a soft floor shadow under it, dust specks (3-10 px) lying
apart from it, a paper seam across the sweep (a few levels darker) and paper texture.
Sweeps: ``white``, ``grey``, ``coloured``; ``busy``: the same bag in front of a
scikit-image photo (a room, not a sweep), the control where the stage must do no harm.

Structures are drawn at ``SS`` x in their own boxes and box-filtered (exact fractional
coverage); the image is ``alpha * colour + (1 - alpha) * backdrop`` plus sensor noise.
Deterministic per (sweep, seed, size).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

import groundtruth as gt

SWEEPS = ("white", "grey", "coloured", "busy")
STRUCTURES = ("strap", "cord", "chain", "strands")
SS = 4


@dataclass
class DetailScene:
    name: str
    sweep: str
    rgb: np.ndarray  # uint8 HxWx3
    alpha: np.ndarray  # float32 HxW, exact
    colour: np.ndarray  # float32 HxWx3 (0-1): the subject's own colour (where alpha > 0)
    body: np.ndarray  # bool HxW: the main body (alpha of the body alone > 0)
    parts: dict[str, np.ndarray] = field(default_factory=dict)  # structure -> coverage
    shadow: np.ndarray | None = None  # bool: floor-shadow pixels (darkened by > 10%)
    specks: np.ndarray | None = None  # bool: dust specks
    seam: np.ndarray | None = None  # bool: the paper seam


def _boxed(w, h, box, draw_fn) -> np.ndarray:
    """Coverage (float32 HxW) of what ``draw_fn(draw, s, x0, y0)`` draws inside ``box``."""
    x0, y0, x1, y1 = (int(max(box[0], 0)), int(max(box[1], 0)), int(min(box[2], w)),
                      int(min(box[3], h)))
    out = np.zeros((h, w), np.float32)
    big = Image.new("L", ((x1 - x0) * SS, (y1 - y0) * SS), 0)
    draw_fn(ImageDraw.Draw(big), SS, x0, y0)
    out[y0:y1, x0:x1] = np.asarray(big.resize((x1 - x0, y1 - y0), Image.Resampling.BOX),
                                   np.float32) / 255
    return out


def _pts(points, s, x0, y0):
    return [((x - x0) * s, (y - y0) * s) for x, y in points]


def scene(sweep: str, seed: int, size=(6000, 4000)) -> DetailScene:
    w, h = size
    rng = np.random.default_rng([seed, SWEEPS.index(sweep), 29])
    u = w / 6000  # structure sizes are in px at 24 MP and scale with the frame
    cx, bw = w * rng.uniform(0.45, 0.55), w * rng.uniform(0.13, 0.16)
    top, floor = h * rng.uniform(0.42, 0.47), h * rng.uniform(0.76, 0.8)
    body = _boxed(w, h, (cx - bw - 2, top - 2, cx + bw + 2, floor + 2), lambda d, s, x0, y0:
                  d.rounded_rectangle(((cx - bw - x0) * s, (top - y0) * s, (cx + bw - x0) * s,
                                       (floor - y0) * s), radius=0.15 * bw * s, fill=255))
    tex = gt._photo("coffee", w, h).mean(axis=2, keepdims=True)
    leather = np.array([0.42, 0.24, 0.13], np.float32) * (0.7 + 0.6 * tex)
    parts, colours = {}, {}
    # strap: a handle arching over the bag
    sw = rng.uniform(24, 44) * u
    strap_pts = gt._curve((cx - 0.6 * bw, top + 5), (cx + 0.6 * bw, top + 5), 0.9, n=60)
    parts["strap"] = _boxed(w, h, (cx - bw, top - 1.3 * bw, cx + bw, top + sw),
                            lambda d, s, x0, y0: d.line(_pts(strap_pts, s, x0, y0), fill=255,
                                                        width=round(sw * s), joint="curve"))
    colours["strap"] = np.array([0.3, 0.17, 0.09], np.float32)
    # cord: hanging from the right side
    cw = rng.uniform(5, 10) * u
    p0 = (cx + bw - 5, top + 0.3 * (floor - top))
    p1 = (cx + bw + 0.5 * bw, top + 0.3 * (floor - top) + 0.5 * bw)
    cord_pts = gt._curve(p0, p1, -0.3, n=40)
    parts["cord"] = _boxed(w, h, (p0[0] - 20, p0[1] - 0.4 * bw, p1[0] + 20, p1[1] + 0.4 * bw),
                           lambda d, s, x0, y0: d.line(_pts(cord_pts, s, x0, y0), fill=255,
                                                       width=round(cw * s), joint="curve"))
    colours["cord"] = np.array([0.08, 0.08, 0.1], np.float32)
    # chain: rings of 2 px wire along a curve hanging from the left side
    ring = rng.uniform(12, 16) * u
    q0 = (cx - bw + 5, top + 0.25 * (floor - top))
    q1 = (cx - bw - 0.45 * bw, top + 0.25 * (floor - top) + 0.55 * bw)
    path = np.array(gt._curve(q0, q1, 0.3, n=400))
    step = np.r_[0, np.cumsum(np.hypot(*np.diff(path, axis=0).T))]
    centres = [path[np.searchsorted(step, t)] for t in np.arange(0, step[-1], 0.8 * ring)]

    def chain(d, s, x0, y0):
        for x, y in centres:
            r = ring / 2
            d.ellipse(((x - r - x0) * s, (y - r - y0) * s, (x + r - x0) * s, (y + r - y0) * s),
                      outline=255, width=round(2 * u * s))
    parts["chain"] = _boxed(w, h, (q1[0] - 0.4 * bw, q0[1] - 0.3 * bw, q0[0] + 20, q1[1] + 0.4 * bw),
                            chain)
    colours["chain"] = np.array([0.8, 0.62, 0.25], np.float32)
    # strands: a fringe from the bottom left corner, outwards and down
    roots = [(cx - bw + rng.uniform(0.05, 0.5) * bw, floor - rng.uniform(0.02, 0.2) * (floor - top),
              np.pi * rng.uniform(0.55, 0.75)) for _ in range(40)]
    lens = rng.uniform(0.25, 0.45, len(roots)) * bw
    widths = rng.uniform(2, 4, len(roots)) * u
    bends = rng.normal(0, 0.12, len(roots))

    def strands(d, s, x0, y0):
        for (x, y, a), L, sw_, b in zip(roots, lens, widths, bends):
            pts = gt._curve((x, y), (x + L * np.cos(a), y + L * np.sin(a) * 0.35), b, n=20)
            d.line(_pts(pts, s, x0, y0), fill=255, width=max(1, round(sw_ * s)), joint="curve")
    parts["strands"] = _boxed(w, h, (cx - 1.5 * bw, floor - 0.4 * (floor - top), cx, floor + 0.2 * bw),
                              strands)
    colours["strands"] = np.array([0.55, 0.4, 0.26], np.float32)
    # composite the subject: body, then each structure over it
    alpha, colour = body.copy(), leather
    for name in STRUCTURES:
        c = np.broadcast_to(colours[name], (h, w, 3))
        alpha, colour = gt._over(alpha, colour, parts[name], c)
    outside = body <= 0
    parts = {k: np.where(outside, v, 0) for k, v in parts.items()}
    # the backdrop
    if sweep == "busy":
        bg = gt._photo(("astronaut", "coffee", "chelsea", "rocket")[seed % 4], w, h)
        shadow_s = np.zeros((h, w), np.float32)
    else:
        if sweep == "white":
            top_c, bot_c = np.full(3, rng.uniform(0.93, 0.97)), np.full(3, rng.uniform(0.88, 0.92))
        elif sweep == "grey":
            top_c, bot_c = np.full(3, rng.uniform(0.55, 0.65)), np.full(3, rng.uniform(0.62, 0.72))
        else:
            base = np.array([0.45, 0.65, 0.85]) if seed % 2 else np.array([0.9, 0.75, 0.4])
            top_c, bot_c = base, np.clip(base + 0.08, 0, 1)
        bg = gt._sweep(rng, w, h, top_c, bot_c)
        shadow_s = gt._shadow(w, h, cx, floor, bw, rng) * rng.uniform(0.35, 0.55)
        # a paper seam across the sweep (3 levels darker, 6 px) and paper texture
        sy = int(h * rng.uniform(0.3, 0.38))
        seam = np.zeros((h, w), np.float32)
        seam[sy:sy + max(1, round(6 * u))] = 3 / 255
        grain = np.asarray(Image.fromarray(
            (rng.normal(128, 40, (h // 4, w // 4))).clip(0, 255).astype(np.uint8)).resize(
                (w, h), Image.Resampling.BILINEAR), np.float32)
        bg = bg - seam[..., None] + ((grain - 128) / 40 * 0.8 / 255)[..., None]
        bg = bg * (1 - shadow_s)[..., None]
    # dust specks apart from the subject (part of the backdrop: alpha 0)
    specks = np.zeros((h, w), np.float32)
    sd = ImageDraw.Draw(sp := Image.new("L", (w, h), 0))
    near_subject = np.asarray(Image.fromarray((alpha > 0).astype(np.uint8) * 255).filter(
        ImageFilter.MaxFilter(1)))
    n_specks = 0
    while n_specks < 30:
        x, y = rng.uniform(0.05, 0.95) * w, rng.uniform(0.1, 0.95) * h
        r = rng.uniform(1.5, 5) * u
        if (abs(x - cx) < 1.8 * bw and y > top - 1.4 * bw) or near_subject[int(y), int(x)]:
            continue
        sd.ellipse((x - r, y - r, x + r, y + r), fill=255)
        n_specks += 1
    specks = np.asarray(sp, np.float32) / 255
    if sweep != "busy":
        bg = bg * (1 - 0.6 * specks)[..., None]
    img = alpha[..., None] * colour + (1 - alpha[..., None]) * bg
    img = img + rng.normal(0, 1.2 / 255, img.shape).astype(np.float32)
    rgb = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return DetailScene(f"{sweep}-{seed}", sweep, rgb, np.clip(alpha, 0, 1).astype(np.float32),
                       np.ascontiguousarray(colour, dtype=np.float32), body > 0, parts,
                       shadow=(shadow_s > 0.1) & (alpha <= 0) if sweep != "busy" else None,
                       specks=(specks > 0.5) & (alpha <= 0),
                       seam=(seam > 0) & (alpha <= 0) if sweep != "busy" else None)
