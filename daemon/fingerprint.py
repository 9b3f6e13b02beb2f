"""Fingerprints and near-duplicate verification. Pure: arrays in, values out.

Tiers, cheapest first: sha256 of the bytes, a hash of the decoded pixels, a
256-bit pHash (banded for Hamming search), the EfficientNet-Lite0 embedding,
and small thumbnails used to *verify* a candidate before its mask is reused:

* ``ab``: 32x32 Lab chroma (a*, b*), which catches recolours that pHash and
  embeddings both miss (a 120-degree hue shift keeps pHash within 0-4 bits);
* ``luma``: 64x64 L*, whose gradient correlation catches shifts, crops, flips
  and small rotations, while tolerating re-encodes, resizes and +-5% exposure.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image
from skimage.color import rgb2lab

from .config import MatchThresholds

PHASH_BITS = 256
BANDS = 16
BAND_BITS = PHASH_BITS // BANDS
LUMA_SIZE = 64
AB_SIZE = 32
HUE_BINS = 18
EMBED_DIM = 1280


@dataclass(frozen=True)
class Thumbs:
    luma: np.ndarray  # LUMA_SIZE x LUMA_SIZE uint8, L* scaled to 0-255
    ab: np.ndarray  # AB_SIZE x AB_SIZE x 2 uint8, a*/b* offset by 128

    def to_bytes(self) -> bytes:
        return self.luma.tobytes() + self.ab.tobytes()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Thumbs:
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
    h = hashlib.blake2b(digest_size=20)
    h.update(np.asarray(rgb.shape, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(rgb).tobytes())
    return h.hexdigest()


def phash256(img: Image.Image) -> bytes:
    bits = imagehash.phash(img, hash_size=16).hash.flatten()
    return np.packbits(bits).tobytes()


def phash_bands(code: bytes) -> tuple[int, ...]:
    """16 bands of 16 bits: any code within distance <= 15 shares at least one band."""
    arr = np.frombuffer(code, dtype=">u2")
    return tuple(int(v) for v in arr)


def hamming(a: bytes, b: bytes) -> int:
    x = np.bitwise_xor(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8))
    return int(np.unpackbits(x).sum())


# -------------------------------------------------------------- thumbnails


def thumbnails(img: Image.Image) -> Thumbs:
    small = np.asarray(img.resize((LUMA_SIZE, LUMA_SIZE), Image.Resampling.BOX), np.float64)
    lab = rgb2lab(small / 255.0)
    luma = np.clip(lab[..., 0] * 2.55 + 0.5, 0, 255).astype(np.uint8)
    # average 2x2 blocks of chroma down to AB_SIZE
    ab = lab[..., 1:].reshape(AB_SIZE, 2, AB_SIZE, 2, 2).mean(axis=(1, 3))
    ab = np.clip(ab + 128.5, 0, 255).astype(np.uint8)
    return Thumbs(luma, ab)


def fingerprint(data: bytes, rgb: np.ndarray, embedding: np.ndarray | None = None) -> Fingerprint:
    img = Image.fromarray(rgb, "RGB")
    return Fingerprint(
        sha256=sha256_bytes(data),
        pixel_hash=pixel_hash(rgb),
        phash=phash256(img),
        width=int(rgb.shape[1]),
        height=int(rgb.shape[0]),
        thumbs=thumbnails(img),
        embedding=embedding,
    )


# ------------------------------------------------------------ verification


def _lab(thumbs: Thumbs) -> tuple[np.ndarray, np.ndarray]:
    luma = thumbs.luma.astype(np.float64) / 2.55
    ab = thumbs.ab.astype(np.float64) - 128.0
    luma_small = luma.reshape(AB_SIZE, 2, AB_SIZE, 2).mean(axis=(1, 3))
    return luma_small, ab


def hue_histogram(ab: np.ndarray) -> np.ndarray:
    """Chroma-weighted hue histogram; grey pixels carry (almost) no weight."""
    a, b = ab[..., 0].ravel(), ab[..., 1].ravel()
    chroma = np.hypot(a, b)
    weight = np.clip(chroma - 4.0, 0, None)  # ignore near-neutral noise
    hue = (np.degrees(np.arctan2(b, a)) + 360.0) % 360.0
    hist, _ = np.histogram(hue, bins=HUE_BINS, range=(0, 360), weights=weight)
    total = hist.sum()
    return hist / total if total > 1e-9 else hist


def _gradients(luma: np.ndarray) -> np.ndarray:
    f = luma.astype(np.float64)
    gx = np.diff(f, axis=1)[:-1, :]
    gy = np.diff(f, axis=0)[:, :-1]
    return np.concatenate([gx.ravel(), gy.ravel()])


def edge_correlation(a: np.ndarray, b: np.ndarray) -> float:
    ga, gb = _gradients(a), _gradients(b)
    ga, gb = ga - ga.mean(), gb - gb.mean()
    denom = float(np.linalg.norm(ga) * np.linalg.norm(gb))
    if denom < 1e-9:  # flat images: fall back to direct equality of the flat level
        return 1.0 if abs(float(a.mean()) - float(b.mean())) < 3 else 0.0
    return float(ga @ gb / denom)


def colour_metrics(q: Thumbs, c: Thumbs) -> dict:
    lq, abq = _lab(q)
    lc, abc = _lab(c)
    # exposure-tolerant: compare L after removing the global offset
    dl = (lq - lq.mean()) - (lc - lc.mean())
    de = np.sqrt(dl**2 + ((abq - abc) ** 2).sum(axis=-1))
    hq, hc = hue_histogram(abq), hue_histogram(abc)
    mass_q = float(np.clip(np.hypot(abq[..., 0], abq[..., 1]) - 4, 0, None).mean())
    mass_c = float(np.clip(np.hypot(abc[..., 0], abc[..., 1]) - 4, 0, None).mean())
    # total variation only means something when both images carry colour
    hue_tv = 0.5 * float(np.abs(hq - hc).sum()) if min(mass_q, mass_c) > 0.5 else 0.0
    return {
        "lab_mean": float(de.mean()),
        "lab_p95": float(np.percentile(de, 95)),
        "hue_tv": hue_tv,
        "edge_corr": edge_correlation(q.luma, c.luma),
    }


def aspect_delta(wq: int, hq: int, wc: int, hc: int) -> float:
    """Relative aspect-ratio difference, less what 1-pixel rounding can explain."""
    rel = abs(np.log((wq / hq) / (wc / hc)))
    slack = 1.0 / min(wq, hq, wc, hc)
    return float(max(0.0, rel - slack))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.astype(np.float32), b.astype(np.float32)))


def verify(query: Fingerprint, cand: Fingerprint, t: MatchThresholds) -> Verdict:
    """Accept ``cand``'s mask for ``query`` only if every check passes."""
    m: dict = {"aspect_delta": aspect_delta(query.width, query.height, cand.width, cand.height)}
    if m["aspect_delta"] > t.max_aspect_delta:
        return Verdict(False, "aspect", m)
    m["phash"] = hamming(query.phash, cand.phash)
    if m["phash"] > t.phash_radius:
        return Verdict(False, "phash", m)
    if query.embedding is None or cand.embedding is None:
        return Verdict(False, "no_embedding", m)
    m["cosine"] = cosine(query.embedding, cand.embedding)
    if m["cosine"] < t.min_cosine:
        return Verdict(False, "cosine", m)
    m.update(colour_metrics(query.thumbs, cand.thumbs))
    if m["edge_corr"] < t.min_edge_corr:
        return Verdict(False, "structure", m)
    if m["lab_mean"] > t.max_lab_delta or m["lab_p95"] > t.max_lab_p95:
        return Verdict(False, "colour", m)
    if m["hue_tv"] > t.max_hue_tv:
        return Verdict(False, "hue", m)
    return Verdict(True, "verified", m)
