"""Process-wide settings, set in one place: no module changes global state on import.

``configure(cfg)`` is called by the CLI commands and by the service at start
and on reload: the umask, Pillow's decompression-bomb limit and truncated-image
policy, the guard that makes model downloads impossible, and warning filters.
"""
from __future__ import annotations

import os
import warnings

from PIL import Image, ImageFile

from daemon.config import Config


def configure(cfg: Config) -> None:
    os.umask(cfg.umask)
    configure_imaging(cfg.max_image_pixels)
    from daemon.inference.engine import refuse_downloads

    refuse_downloads()


def configure_imaging(max_pixels: int) -> None:
    """Pillow's bomb limit and truncated-image policy, and its noisy warnings off."""
    set_max_pixels(max_pixels)
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a grey half
    # decode() enforces the pixel limit itself and maps Pillow's errors; the warnings are
    # noise. Process-wide filters: warnings.catch_warnings() is not thread-safe.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="PIL.TiffImagePlugin")


def set_max_pixels(limit: int) -> None:
    """Pin Pillow's bomb guard (process-wide)."""
    Image.MAX_IMAGE_PIXELS = int(limit)
