"""Geometry of a deliverable: subject box, crop with margin, canvas placement, size cap.

Boxes are ``(x0, y0, x1, y1)`` in pixels, half-open (x1, y1 exclusive), as
Pillow's ``crop`` takes them. Pixel arrays are HxWxC uint8 or uint16 with the
alpha last; resampling is LANCZOS on premultiplied alpha, so that the colour
of transparent pixels never bleeds into the edge.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]

ALPHA_THRESHOLD = 26  # 10% of 255
SPECK_FRACTION = 0.001  # components under 0.1% of the subject's area are ignored
_EIGHT = np.ones((3, 3), bool)


def subject_box(mask: np.ndarray) -> Box | None:
    """Bounding box of alpha >= 10%, ignoring specks; None when there is no subject."""
    fg = np.asarray(mask) >= ALPHA_THRESHOLD
    # Label only the rows/columns that hold anything: the labelling is the costly part.
    rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
    if rows.size == 0:
        return None
    oy, ox = int(rows[0]), int(cols[0])
    fg = fg[oy:rows[-1] + 1, ox:cols[-1] + 1]
    from scipy import ndimage  # lazy: an all-hit run never imports scipy

    labels, n = ndimage.label(fg, structure=_EIGHT)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        fg = (sizes >= SPECK_FRACTION * sizes.sum())[labels]
        rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
    else:
        rows, cols = rows - oy, cols - ox
    return (ox + int(cols[0]), oy + int(rows[0]), ox + int(cols[-1]) + 1, oy + int(rows[-1]) + 1)


def crop_box(box: Box, margin: float, unit: str, image_size: tuple[int, int]) -> Box:
    """``box`` grown by ``margin`` on every side, clamped to the image (width, height).

    unit "%": ``margin`` is a percentage of the box's longer side (5 = 5%);
    unit "px": pixels.
    """
    x0, y0, x1, y1 = box
    if unit == "%":
        pad = margin / 100.0 * max(x1 - x0, y1 - y0)
    elif unit == "px":
        pad = float(margin)
    else:
        raise ValueError(f"margin unit must be '%' or 'px', not {unit!r}")
    if pad < 0:
        raise ValueError(f"margin must not be negative, got {margin}{unit}")
    p = int(round(pad))
    w, h = image_size
    return (max(0, x0 - p), max(0, y0 - p), min(w, x1 + p), min(h, y1 + p))


def crop(pixels: np.ndarray, box: Box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return pixels[y0:y1, x0:x1]


def canvas_size(aspect: tuple[int, int], long_edge: int) -> tuple[int, int]:
    """(width, height) of a canvas of ``aspect`` (w, h) whose longer side is ``long_edge``."""
    aw, ah = aspect
    if aw >= ah:
        return long_edge, max(1, int(round(long_edge * ah / aw)))
    return max(1, int(round(long_edge * aw / ah))), long_edge


def resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """LANCZOS resize of HxWx4 (alpha last) or HxWx3 uint8/uint16 pixels to (width, height)."""
    h, w = pixels.shape[:2]
    if (w, h) == tuple(size):
        return pixels
    if pixels.dtype == np.uint8:
        mode = "RGBA" if pixels.shape[2] == 4 else "RGB"  # Pillow premultiplies RGBA itself
        img = Image.fromarray(np.ascontiguousarray(pixels), mode)
        return np.asarray(img.resize(size, Image.Resampling.LANCZOS))
    return _resize16(pixels, size)


def _resize_plane(plane: np.ndarray, size: tuple[int, int], top: float) -> np.ndarray:
    """LANCZOS in two passes, clipped to [0, top] between them, as Pillow's 8-bit resize does."""
    img = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), "F")
    if img.size[0] != size[0]:
        img = Image.fromarray(np.clip(np.asarray(img.resize((size[0], img.size[1]),
                                                            Image.Resampling.LANCZOS)), 0, top), "F")
    if img.size[1] != size[1]:
        img = img.resize(size, Image.Resampling.LANCZOS)
    return np.clip(np.asarray(img), 0, top)


def _resize16(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint16: each channel as a float32 plane ('F' mode), alpha premultiplied."""
    has_alpha = pixels.shape[2] == 4
    alpha = pixels[..., 3].astype(np.float32) / 65535.0 if has_alpha else None
    planes = []
    for c in range(3):
        plane = pixels[..., c].astype(np.float32)
        planes.append(_resize_plane(plane * alpha if has_alpha else plane, size, 65535.0))
    if has_alpha:
        a = _resize_plane(alpha, size, 1.0)
        safe = np.where(a > 0, a, 1.0)
        planes = [np.where(a > 0, p / safe, 0.0) for p in planes] + [a * 65535.0]
    out = np.stack(planes, axis=-1)
    return np.clip(np.rint(out), 0, 65535).astype(np.uint16)


def place_on_canvas(pixels: np.ndarray, aspect: tuple[int, int], long_edge: int,
                    fill: float) -> np.ndarray:
    """Scale HxWx4 ``pixels`` so their binding side spans ``fill`` of the canvas, centred.

    The canvas is transparent; scaling goes up as well as down so that the
    subject always spans the same fraction of every deliverable.
    """
    if not 0 < fill <= 1:
        raise ValueError(f"canvas fill must be in (0, 1], got {fill}")
    if pixels.shape[2] != 4:
        raise ValueError("place_on_canvas needs RGBA pixels")
    cw, ch = canvas_size(aspect, long_edge)
    h, w = pixels.shape[:2]
    scale = min(fill * cw / w, fill * ch / h)
    sw, sh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    scaled = resize(pixels, (sw, sh))
    out = np.zeros((ch, cw, 4), pixels.dtype)
    x, y = (cw - sw) // 2, (ch - sh) // 2
    out[y:y + sh, x:x + sw] = scaled
    return out


def limit_size(pixels: np.ndarray, max_size: int | None) -> np.ndarray:
    """Downscale (never up) so that the longer side is at most ``max_size``."""
    h, w = pixels.shape[:2]
    if not max_size or max(w, h) <= max_size:
        return pixels
    scale = max_size / max(w, h)
    return resize(pixels, (max(1, int(round(w * scale))), max(1, int(round(h * scale)))))
