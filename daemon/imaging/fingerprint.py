"""Fingerprints and near-duplicate verification. Pure: arrays in, values out.

Tiers, cheapest first: sha256 of the bytes, a hash of the decoded pixels, a
256-bit pHash (banded for Hamming search), the EfficientNet-Lite0 embedding,
and small CIELAB thumbnails used to *verify* a candidate before its mask is
reused (calibrated in bench/calibrate.py, results in bench/calibration.md):

* ``luma``: 128x128 L*. Compared at the finest scale both images support
  (every thumbnail pixel must average >= 3x3 source pixels): the gradient
  correlation (``edge_corr``) rejects crops, flips, rotations, zooms and a
  product moved or rescaled between two shots; after fitting a tone curve, the
  largest local residual (``luma_max``) rejects local edits.
* ``ab``: 32x32 a*/b* chroma. The largest colour change of any 1/16 x 1/16
  region (``colour_max``) rejects recolours, of the whole image or only of the
  object, which pHash and the embedding both miss (a 120-degree hue shift keeps
  pHash within 0-4 bits and cosine up to 0.98).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from daemon.config import MatchThresholds

PHASH_BITS = 256
BANDS = 16
BAND_BITS = PHASH_BITS // BANDS
LUMA_SIZE = 128
AB_SIZE = 32
LUMA_GRID = 32  # luma_max looks at LUMA_GRID x LUMA_GRID regions (at most one per pixel)
COLOUR_GRID = 16  # colour_max looks at COLOUR_GRID x COLOUR_GRID regions
MIN_PIXELS_PER_CELL = 3  # a compared thumbnail pixel averages >= 3x3 pixels of both images
EMBED_DIM = 1280

# (metric, MatchThresholds field, "max": metric <= threshold passes | "min": >= passes),
# in the order verify() applies them.
CHECKS = (
    ("aspect_delta", "max_aspect_delta", "max"),
    ("phash", "phash_radius", "max"),
    ("cosine", "min_cosine", "min"),
    ("edge_corr", "min_edge_corr", "min"),
    ("luma_max", "max_luma_delta", "max"),
    ("colour_max", "max_colour_delta", "max"),
)
REASONS = {"aspect_delta": "aspect", "phash": "phash", "cosine": "cosine",
           "edge_corr": "structure", "luma_max": "luma", "colour_max": "colour"}
METRIC_DOCS = {
    "aspect_delta": "|log(aspect ratio q / aspect ratio c)| less the slack of 1-pixel rounding.",
    "phash": "Hamming distance of the 256-bit pHashes (the banded index finds every code "
             "within 15).",
    "cosine": "cosine similarity of the EfficientNet-Lite0 embeddings (1280-d, L2-normalised).",
    "edge_corr": "correlation of the L* gradients of the two luma thumbnails, at the finest "
                 "scale (128, 64, 32 or 16 px) where each thumbnail pixel averages >= 3x3 "
                 "pixels of both images.",
    "luma_max": "after fitting L*q ~ a + b L*c + c L*c^2 (exposure, gamma), the largest "
                "|mean residual| (L* units) over a 32x32 grid of regions (one per pixel "
                "below 32 px), same scale as edge_corr.",
    "colour_max": "the largest mean |delta a*b*| (CIELAB chroma distance) over a 16x16 grid of "
                  "regions of the 32x32 chroma thumbnails.",
}


@dataclass(frozen=True)
class Thumbs:
    luma: np.ndarray  # LUMA_SIZE x LUMA_SIZE uint8, L* scaled to 0-255
    ab: np.ndarray  # AB_SIZE x AB_SIZE x 2 uint8, a*/b* offset by 128

    NBYTES = LUMA_SIZE * LUMA_SIZE + AB_SIZE * AB_SIZE * 2

    @property
    def valid(self) -> bool:
        """False for thumbnails of another layout (a row written by an older version)."""
        return self.luma.shape == (LUMA_SIZE, LUMA_SIZE) and self.ab.shape == (AB_SIZE, AB_SIZE, 2)

    def to_bytes(self) -> bytes:
        return self.luma.tobytes() + self.ab.tobytes()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Thumbs:
        if len(raw) != cls.NBYTES:  # another layout: never verifies, so never reused
            return cls(np.zeros((0, 0), np.uint8), np.zeros((0, 0, 2), np.uint8))
        n = LUMA_SIZE * LUMA_SIZE
        luma = np.frombuffer(raw[:n], np.uint8).reshape(LUMA_SIZE, LUMA_SIZE)
        ab = np.frombuffer(raw[n:], np.uint8).reshape(AB_SIZE, AB_SIZE, 2)
        return cls(luma, ab)


@dataclass(frozen=True)
class Fingerprint:
    """Everything the index needs to find and verify an image."""

    sha256: str
    pixel_hash: str
    phash: bytes  # 32 bytes
    width: int
    height: int
    thumbs: Thumbs
    embedding: np.ndarray | None = None  # float32 (EMBED_DIM,), unit length

    @property
    def bands(self) -> tuple[int, ...]:
        return phash_bands(self.phash)


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str
    metrics: dict


# ------------------------------------------------------------------ hashes


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pixel_hash(rgb: np.ndarray) -> str:
    """SHA-256 (first 160 bits) of the shape and every pixel byte: exact, no copy of the
    pixels (the buffer is hashed in place). OpenSSL's SHA-256 runs at ~1.8 GB/s here with
    SHA extensions, twice blake2b's speed: 40 ms for a 24 MP image instead of 90."""
    h = hashlib.sha256()
    h.update(np.asarray(rgb.shape, dtype=np.int64).tobytes())
    h.update(memoryview(np.ascontiguousarray(rgb)).cast("B"))
    return h.hexdigest()[:40]


_PHASH_SIZE, _PHASH_INPUT = 16, 64  # imagehash.phash(hash_size=16): highfreq_factor 4


def _dct_rows(n: int, keep: int) -> np.ndarray:
    """The first ``keep`` rows of scipy.fftpack's unnormalised DCT-II matrix of size n."""
    k = np.arange(keep)[:, None]
    return 2.0 * np.cos(np.pi * k * (2 * np.arange(n)[None, :] + 1) / (2 * n))


_DCT = _dct_rows(_PHASH_INPUT, _PHASH_SIZE)


def phash256(img: Image.Image) -> bytes:
    """imagehash.phash(img, hash_size=16), bit for bit (tests), without SciPy: the 16x16
    low frequencies of the 64x64 DCT-II as two small matrix products. Importing
    scipy.fftpack for imagehash cost ~0.35 s of a near hit's start-up."""
    small = img.convert("L").resize((_PHASH_INPUT, _PHASH_INPUT), Image.Resampling.LANCZOS)
    pixels = np.asarray(small, dtype=np.float64)
    low = _DCT @ pixels @ _DCT.T
    bits = (low > np.median(low)).flatten()
    return np.packbits(bits).tobytes()


def phash_bands(code: bytes) -> tuple[int, ...]:
    """16 bands of 16 bits: any code within distance <= 15 shares at least one band."""
    arr = np.frombuffer(code, dtype=">u2")
    return tuple(int(v) for v in arr)


def hamming(a: bytes, b: bytes) -> int:
    x = np.bitwise_xor(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8))
    return int(np.unpackbits(x).sum())


# -------------------------------------------------------------- thumbnails

_RGB_TO_XYZ_D65 = np.array([[0.4124564, 0.3575761, 0.1804375],
                            [0.2126729, 0.7151522, 0.0721750],
                            [0.0193339, 0.1191920, 0.9503041]])
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (uint8 or 0-1 floats, ...x3) -> CIELAB (D65), float64."""
    c = np.asarray(rgb, np.float64)
    if np.asarray(rgb).dtype == np.uint8:
        c = c / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    t = lin @ (_RGB_TO_XYZ_D65 / _WHITE_D65[:, None]).T
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], axis=-1)


def _pool(a: np.ndarray, k: int) -> np.ndarray:
    """Mean over k x k blocks of a square (n, n, ...) array."""
    if k == 1:
        return a
    n = a.shape[0] // k
    return a.reshape(n, k, n, k, *a.shape[2:]).mean(axis=(1, 3))


def thumbnails(img: Image.Image) -> Thumbs:
    # bicubic, not box: a box filter *upsampling* a small image duplicates pixels unevenly,
    # which reads as a local change when compared with the thumbnail of the large original
    small = img.resize((LUMA_SIZE, LUMA_SIZE), Image.Resampling.BICUBIC)
    lab = rgb_to_lab(np.asarray(small))
    luma = np.clip(lab[..., 0] * 2.55 + 0.5, 0, 255).astype(np.uint8)
    ab = _pool(lab[..., 1:], LUMA_SIZE // AB_SIZE)
    ab = np.clip(ab + 128.5, 0, 255).astype(np.uint8)
    return Thumbs(luma, ab)


def working_copy(img: Image.Image) -> Image.Image:
    """An exact k x k box reduction to a shorter side of 512-1023 px, for speed.

    pHash's Lanczos resize of a 12 MP image alone costs ~0.4 s; of this copy, ~5 ms.
    """
    k = min(img.size) // 512
    return img.reduce(k) if k > 1 else img


def fingerprint(data: bytes, rgb: np.ndarray, embedding: np.ndarray | None = None, *,
                sha256: str | None = None, small: Image.Image | None = None) -> Fingerprint:
    """``sha256``: the bytes' digest when the caller already has it (never hashed twice);
    ``small``: ``working_copy`` of ``rgb`` when the caller already made it."""
    img = small if small is not None else working_copy(Image.fromarray(rgb, "RGB"))
    return Fingerprint(
        sha256=sha256 or sha256_bytes(data),
        pixel_hash=pixel_hash(rgb),
        phash=phash256(img),
        width=int(rgb.shape[1]),
        height=int(rgb.shape[0]),
        thumbs=thumbnails(img),
        embedding=embedding,
    )


# ------------------------------------------------------------ verification


def compare_size(*sides: int) -> int:
    """The finest luma scale (128, 64, 32 or 16 px) at which both images are compared.

    Each thumbnail pixel must average at least 3x3 pixels of the smaller image, so the
    two thumbnails are equally well anti-aliased and a resize does not read as a change.
    """
    smallest = min(sides)
    size = LUMA_SIZE
    while size > 16 and smallest < MIN_PIXELS_PER_CELL * size:
        size //= 2
    return size


def edge_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of the finite-difference gradients of two equally sized luma maps."""
    def grads(x: np.ndarray) -> np.ndarray:
        return np.concatenate([np.diff(x, axis=1).ravel(), np.diff(x, axis=0).ravel()])

    ga, gb = grads(a), grads(b)
    ga, gb = ga - ga.mean(), gb - gb.mean()
    # explicit sums, not BLAS: no thread pool to wake up for a 32k-element product
    denom = float(np.sqrt((ga * ga).sum() * (gb * gb).sum()))
    if denom < 1e-6:  # at least one is flat: the same only if both are flat and equally bright
        flat = max(float(np.abs(ga).max()), float(np.abs(gb).max())) < 1.0
        return 1.0 if flat and abs(float(a.mean()) - float(b.mean())) < 3 else 0.0
    return float((ga * gb).sum() / denom)


def tone_residual(q: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``q`` minus the best quadratic tone curve of ``c`` (absorbs exposure and gamma)."""
    x, y = c.ravel() / 100.0, q.ravel()
    powers = [np.ones_like(x), x, x * x]
    gram = np.array([[float((u * v).sum()) for v in powers] for u in powers])
    rhs = np.array([float((u * y).sum()) for u in powers])
    coef = np.linalg.lstsq(gram + 1e-9 * np.eye(3), rhs, rcond=None)[0]
    return q - (coef[0] + coef[1] * x + coef[2] * x * x).reshape(q.shape)


def thumb_metrics(q: Thumbs, c: Thumbs, size: int) -> dict:
    """Structure and colour metrics of two thumbnails, luma compared at ``size`` px."""
    k = LUMA_SIZE // size
    lq = _pool(q.luma.astype(np.float64) / 2.55, k)
    lc = _pool(c.luma.astype(np.float64) / 2.55, k)
    dab = np.sqrt(((q.ab.astype(np.float64) - c.ab.astype(np.float64)) ** 2).sum(axis=-1))
    return {
        "edge_corr": edge_correlation(lq, lc),
        "luma_max": float(np.abs(_pool(tone_residual(lq, lc), max(1, size // LUMA_GRID))).max()),
        "colour_max": float(_pool(dab, AB_SIZE // COLOUR_GRID).max()),
    }


def aspect_delta(wq: int, hq: int, wc: int, hc: int) -> float:
    """Relative aspect-ratio difference, less what 1-pixel rounding can explain."""
    rel = abs(np.log((wq / hq) / (wc / hc)))
    slack = 1.0 / min(wq, hq, wc, hc)
    return float(max(0.0, rel - slack))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.astype(np.float32) * b.astype(np.float32)).sum())


def measure(query: Fingerprint, cand: Fingerprint) -> dict:
    """Every metric of CHECKS for a pair (None where a fingerprint lacks the input)."""
    m: dict = {
        "aspect_delta": aspect_delta(query.width, query.height, cand.width, cand.height),
        "phash": hamming(query.phash, cand.phash),
        "cosine": None,
        "compare_px": compare_size(query.width, query.height, cand.width, cand.height),
    }
    if query.embedding is not None and cand.embedding is not None:
        m["cosine"] = cosine(query.embedding, cand.embedding)
    if query.thumbs.valid and cand.thumbs.valid:
        m.update(thumb_metrics(query.thumbs, cand.thumbs, m["compare_px"]))
    else:
        m.update(dict.fromkeys(("edge_corr", "luma_max", "colour_max")))
    return m


def verify(query: Fingerprint, cand: Fingerprint, t: MatchThresholds) -> Verdict:
    """Accept ``cand``'s mask for ``query`` only if every check of CHECKS passes.

    The reason names the first failed check (``missing`` when a fingerprint lacks its
    embedding or has thumbnails of another layout); ``metrics`` has every value.
    """
    return decide(measure(query, cand), t)


def decide(m: dict, t: MatchThresholds) -> Verdict:
    """Apply the thresholds to the metrics from ``measure``."""
    for metric, field_name, kind in CHECKS:
        value, limit = m[metric], getattr(t, field_name)
        if value is None:
            return Verdict(False, "missing", m)
        if value > limit if kind == "max" else value < limit:
            return Verdict(False, REASONS[metric], m)
    return Verdict(True, "verified", m)
