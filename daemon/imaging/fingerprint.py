"""Fingerprints, pure: arrays in, values out (``daemon.imaging.match`` compares them).

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


PHASH_BITS = 256
BANDS = 16
BAND_BITS = PHASH_BITS // BANDS
LUMA_SIZE = 128
AB_SIZE = 32
LUMA_GRID = 32  # luma_max looks at LUMA_GRID x LUMA_GRID regions (at most one per pixel)
COLOUR_GRID = 16  # colour_max looks at COLOUR_GRID x COLOUR_GRID regions
MIN_PIXELS_PER_CELL = 3  # a compared thumbnail pixel averages >= 3x3 pixels of both images
EMBED_DIM = 1280

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


def pool(a: np.ndarray, k: int) -> np.ndarray:
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
    ab = pool(lab[..., 1:], LUMA_SIZE // AB_SIZE)
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
