"""Benchmark workloads built from the real photos bundled in the scikit-image wheel.

Every "distinct" image is a studio-style composite: a generated backdrop
(gradient, colour, low-frequency texture, vignette) with one or two crops of a
real photo placed on it at a random scale and position. Backdrop colours, crop
windows, flips and placement all come from a seeded RNG, so two distinct images
share neither bytes, pixels nor a near-duplicate signature, while each still
looks like a subject on a backdrop (what background removal is for).

Duplicates are made the way they happen in a studio: byte-identical copies
(the same file synced twice), JPEG re-encodes of the decoded pixels, and
resizes (an export at another size).
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

# Only the photos that ship inside the wheel (others would be downloaded).
COLOUR = ("astronaut", "chelsea", "coffee", "rocket", "cat", "hubble_deep_field",
          "immunohistochemistry", "retina", "colorwheel", "logo", "stereo_left", "stereo_right")
GREY = ("camera", "moon", "coins", "grass", "gravel", "brick", "clock", "cell", "page", "text")

PHOTO_SIZES = ((640, 480), (800, 600), (1024, 768), (768, 1024), (1024, 1024), (960, 720))
SMALL_SIZES = ((256, 192), (320, 240), (240, 320), (256, 256), (288, 216))


@dataclass
class Item:
    name: str            # file name in the inbox (unique stem: rembg drops the extension)
    data: bytes
    kind: str            # original | unique | exact | reencode | resize
    group: int           # index of the original it derives from (-1: none)
    size: tuple[int, int] = (0, 0)


@dataclass
class Workload:
    name: str
    items: list[Item]
    note: str
    meta: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(len(i.data) for i in self.items)


_PHOTOS: dict[str, np.ndarray] = {}


def photo(name: str) -> np.ndarray:
    if name not in _PHOTOS:
        import skimage.data as sd

        if name in ("stereo_left", "stereo_right"):
            left, right, _ = sd.stereo_motorcycle()
            _PHOTOS["stereo_left"], _PHOTOS["stereo_right"] = left, right
        else:
            arr = getattr(sd, name)()
            if arr.dtype == bool:
                arr = arr.astype(np.uint8) * 255
            if arr.ndim == 2:
                arr = np.dstack([arr] * 3)
            _PHOTOS[name] = np.ascontiguousarray(arr[..., :3].astype(np.uint8))
    return _PHOTOS[name]


def encode_jpeg(rgb: np.ndarray | Image.Image, quality: int = 92) -> bytes:
    im = rgb if isinstance(rgb, Image.Image) else Image.fromarray(rgb)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _backdrop(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    top, bottom = rng.integers(20, 250, 3), rng.integers(20, 250, 3)
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    if rng.random() < 0.5:  # horizontal sweep instead
        t = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
    img = top * (1 - t) + bottom * t
    img = np.broadcast_to(img, (h, w, 3)).astype(np.float32)
    # low-frequency texture: a small random field, upsampled
    gh, gw = int(rng.integers(3, 9)), int(rng.integers(3, 9))
    field_ = rng.normal(0, rng.uniform(3, 12), (gh, gw, 3)).astype(np.float32)
    tex = np.asarray(Image.fromarray(np.clip(field_ + 128, 0, 255).astype(np.uint8))
                     .resize((w, h), Image.BICUBIC), dtype=np.float32) - 128
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h * rng.uniform(0.3, 0.7), w * rng.uniform(0.3, 0.7)
    vign = 1.0 - rng.uniform(0.1, 0.4) * (((yy - cy) / h) ** 2 + ((xx - cx) / w) ** 2)[..., None]
    return np.clip((img + tex) * vign, 0, 255)


def _subject(rng: np.random.Generator, name: str, max_w: int, max_h: int,
             tint: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    src = photo(name)
    H, W = src.shape[:2]
    f = rng.uniform(0.45, 0.95)
    ch, cw = max(16, int(H * f * rng.uniform(0.8, 1.0))), max(16, int(W * f * rng.uniform(0.8, 1.0)))
    y0, x0 = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
    crop = src[y0:y0 + ch, x0:x0 + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    scale = min(max_w / cw, max_h / ch)
    tw, th = max(8, int(cw * scale)), max(8, int(ch * scale))
    im = Image.fromarray(np.ascontiguousarray(crop)).resize((tw, th), Image.BILINEAR)
    arr = np.asarray(im, dtype=np.float32)
    if tint is not None:
        arr = arr * tint[None, None, :] / 255.0
    # soft-edged ellipse or rounded rectangle as the subject's silhouette
    mask = Image.new("L", (tw, th), 0)
    from PIL import ImageDraw

    d = ImageDraw.Draw(mask)
    pad = max(2, min(tw, th) // 20)
    if rng.random() < 0.5:
        d.ellipse((pad, pad, tw - pad, th - pad), fill=255)
    else:
        d.rounded_rectangle((pad, pad, tw - pad, th - pad), radius=min(tw, th) // 6, fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(max(1, pad // 2)))
    return arr, np.asarray(mask, dtype=np.float32)[..., None] / 255.0


def composite(seed: int, size: tuple[int, int]) -> np.ndarray:
    """One distinct studio-style image, fully determined by ``seed``."""
    rng = np.random.default_rng(seed)
    w, h = size
    canvas = _backdrop(rng, w, h)
    names = [COLOUR[int(rng.integers(len(COLOUR)))]]
    if rng.random() < 0.6:  # a prop: a tinted grey photo, smaller
        names.append(GREY[int(rng.integers(len(GREY)))])
    for k, name in enumerate(names):
        frac = rng.uniform(0.5, 0.8) if k == 0 else rng.uniform(0.2, 0.35)
        tint = None if k == 0 else rng.integers(90, 256, 3).astype(np.float32)
        arr, alpha = _subject(rng, name, int(w * frac), int(h * frac), tint)
        sh, sw = arr.shape[:2]
        y = int(rng.integers(0, max(1, h - sh)))
        x = int(rng.integers(0, max(1, w - sw)))
        region = canvas[y:y + sh, x:x + sw]
        canvas[y:y + sh, x:x + sw] = region * (1 - alpha) + arr * alpha
    return canvas.astype(np.uint8)


def _variants(rng: random.Random, rgb: np.ndarray, original: bytes, kinds: list[str]) -> list[tuple[str, bytes, tuple[int, int]]]:
    h, w = rgb.shape[:2]
    out = []
    for kind in kinds:
        if kind == "exact":
            out.append((kind, original, (w, h)))
        elif kind == "reencode":
            out.append((kind, encode_jpeg(rgb, quality=rng.choice((75, 80, 85))), (w, h)))
        elif kind == "resize":
            f = rng.choice((0.5, 0.6, 0.75))
            im = Image.fromarray(rgb).resize((max(8, int(w * f)), max(8, int(h * f))), Image.LANCZOS)
            out.append((kind, encode_jpeg(im, quality=90), im.size))
        else:
            raise ValueError(kind)
    return out


def distinct(n: int, seed: int = 1000) -> Workload:
    items = []
    for i in range(n):
        size = PHOTO_SIZES[i % len(PHOTO_SIZES)]
        items.append(Item(f"d{i:04d}.jpg", encode_jpeg(composite(seed + i, size)), "unique", -1, size))
    return Workload("distinct", items, f"{n} distinct photo composites, {_sizes(items)}")


def studio(n: int = 200, originals: int = 40, seed: int = 2000) -> Workload:
    """``n`` files: 60% exact repeats and near-duplicates of ``originals`` originals.

    With n=200 and 40 originals: 40 originals + 120 duplicates (per original one
    exact copy, one JPEG re-encode, one resize) + 40 unrelated one-offs.
    """
    rng = random.Random(seed)
    n_dup = round(n * 0.6)
    per = max(1, n_dup // originals)
    n_unique = n - originals - originals * per
    if n_unique < 0:
        raise ValueError("too few files for that many originals")
    entries: list[tuple[str, bytes, int, tuple[int, int]]] = []
    cycle = ["exact", "reencode", "resize"]
    for g in range(originals):
        size = PHOTO_SIZES[g % len(PHOTO_SIZES)]
        rgb = composite(seed + g, size)
        data = encode_jpeg(rgb)
        entries.append(("original", data, g, size))
        kinds = [cycle[(g + k) % 3] for k in range(per)]
        for kind, vdata, vsize in _variants(rng, rgb, data, kinds):
            entries.append((kind, vdata, g, vsize))
    for u in range(n_unique):
        size = PHOTO_SIZES[u % len(PHOTO_SIZES)]
        entries.append(("unique", encode_jpeg(composite(seed + 500 + u, size)), -1, size))
    rng.shuffle(entries)
    items = [Item(f"s{i:04d}.jpg", d, k, g, s) for i, (k, d, g, s) in enumerate(entries)]
    return Workload("studio", items,
                    f"{n} files: {originals} originals + {originals * per} duplicates of them "
                    f"(exact copies, JPEG re-encodes, resizes; {100 * originals * per / n:.0f}%) "
                    f"+ {n_unique} one-offs, {_sizes(items)}, shuffled",
                    {"originals": originals, "duplicates": originals * per, "one_offs": n_unique})


def burst(n: int = 1000, bases: int = 100, seed: int = 3000) -> Workload:
    """``n`` small files from ``bases`` distinct thumbnails (the rest: repeats and near-duplicates)."""
    rng = random.Random(seed)
    per = n // bases
    entries = []
    for b in range(bases):
        size = SMALL_SIZES[b % len(SMALL_SIZES)]
        rgb = composite(seed + b, size)
        data = encode_jpeg(rgb, quality=88)
        entries.append(("original", data, b, size))
        kinds = [rng.choice(("exact", "exact", "reencode", "resize")) for _ in range(per - 1)]
        for kind, vdata, vsize in _variants(rng, rgb, data, kinds):
            entries.append((kind, vdata, b, vsize))
    while len(entries) < n:
        entries.append(entries[len(entries) % bases])
    rng.shuffle(entries)
    items = [Item(f"b{i:04d}.jpg", d, k, g, s) for i, (k, d, g, s) in enumerate(entries[:n])]
    return Workload("burst", items,
                    f"{n} small files ({_sizes(items)}) dropped at once: {bases} distinct "
                    f"thumbnails, each repeated or near-duplicated {per} times in all",
                    {"bases": bases})


def probe_1024(seed: int = 4000) -> bytes:
    """The 1024x1024 JPEG of the exact-hit latency probe."""
    return encode_jpeg(composite(seed, (1024, 1024)))


def _sizes(items: list[Item]) -> str:
    ws = [i.size[0] * i.size[1] for i in items]
    lo, hi = min(ws), max(ws)
    return f"{lo / 1e6:.2f}-{hi / 1e6:.2f} MP, {sum(len(i.data) for i in items) / 1e6:.0f} MB"


def write(items: list[Item], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for it in items:
        (folder / it.name).write_bytes(it.data)
