"""The config schema: frozen dataclasses, their defaults and the allowed choices.

Each component is handed its own section (``cache``, ``store``, a pair's
``options``...), never the whole Config.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_IGNORE = (
    ".*",  # dotfiles, which also covers ._*, .DS_Store and .syncthing.*
    "._*",
    ".DS_Store",
    "Thumbs.db",
    "desktop.ini",
    "*.part",
    "*.tmp",
    "*.crdownload",
    "~$*",
    ".syncthing.*",
)
AFTER_SUCCESS = ("keep", "move", "delete")
OBSERVERS = ("auto", "inotify", "polling")
POLICIES = ("lru", "lfu", "lfu-decay")  # daemon/prune.py; bench/prune_policy.md
BACKENDS = ("sqlite", "redis")
LOG_FORMATS = ("auto", "json", "text")


class ConfigError(ValueError):
    """A config problem, phrased as ``<file>: <key>: <what is wrong>``."""


@dataclass(frozen=True)
class AlphaMatting:
    enabled: bool = False
    foreground_threshold: int = 240
    background_threshold: int = 10
    erode_size: int = 10


@dataclass(frozen=True)
class OutputOptions:
    """Everything that changes the output pixels or bytes; all of it is in the cache key."""

    model: str = "u2netp"
    only_mask: bool = False
    post_process_mask: bool = False
    alpha_matting: AlphaMatting = field(default_factory=AlphaMatting)
    bgcolor: tuple[int, int, int, int] | None = None
    png_compression: int = 1
    colour: str = "keep"  # the legacy PNG: keep the source's ICC profile | srgb
    metadata: str = "keep"  # keep EXIF (orientation 1), XMP, IPTC | strip

    @property
    def mask_options(self) -> tuple:
        """What changes the cached mask (with the model's checksum): nothing else keys it."""
        return (self.model, self.post_process_mask)


FORMATS = ("png", "tiff", "webp", "jpeg")
COLOURS = ("keep", "srgb")
METADATA = ("keep", "strip")
CROPS = ("none", "subject")
FORMAT_EXT = {"png": ".png", "tiff": ".tif", "webp": ".webp", "jpeg": ".jpg"}


@dataclass(frozen=True)
class Canvas:
    """Place the (cropped) subject on a canvas of a fixed aspect ratio."""

    aspect: tuple[int, int] = (1, 1)  # width:height, e.g. (4, 5)
    long_edge: int = 2000  # px of the canvas's longer side
    fill: float = 0.85  # the subject's longer side spans this fraction of the frame


@dataclass(frozen=True)
class Deliverable:
    """One file written per source: a master, a marketplace JPEG, a web WebP..."""

    name: str = "cutout"  # the subfolder of the outbox it goes to; unique per pair
    format: str = "png"  # png | tiff | webp | jpeg
    quality: int = 90  # jpeg and lossy webp
    compression: int = 1  # png: zlib level 0-9; tiff: 0 none, >0 deflate at that level
    lossless: bool = False  # webp
    background: tuple[int, int, int] | None = None  # None: transparent (jpeg: white)
    crop: str = "none"  # none | subject
    margin: float = 0.0  # around the subject box: % of its longer side (5 = 5%), or px
    margin_unit: str = "%"  # "%" | "px"
    canvas: Canvas | None = None
    max_size: int | None = None  # longest edge in px, downscale only
    colour: str = "keep"  # keep the source's ICC profile | convert to srgb
    metadata: str = "keep"  # keep EXIF (orientation 1), XMP, IPTC | strip

    @property
    def ext(self) -> str:
        return FORMAT_EXT[self.format]

    @property
    def flattened(self) -> tuple[int, int, int] | None:
        """The background colour actually used; jpeg cannot hold alpha, so white by default."""
        if self.background is None and self.format == "jpeg":
            return (255, 255, 255)
        return self.background


@dataclass(frozen=True)
class ReviewConfig:
    """A pair's ``review:``: cutouts whose mask confidence is below ``min_confidence`` go to
    ``dir`` (default ``<outbox>/../review``) instead of the outbox (daemon/review.py)."""

    min_confidence: float = 0.62  # calibrated by bench/routing.py (bench/routing.md)
    dir: Path | None = None


@dataclass(frozen=True)
class WatchPair:
    inbox: Path
    outbox: Path
    failed_dir: Path
    done_dir: Path
    recursive: bool = True
    after_success: str = "keep"
    options: OutputOptions = field(default_factory=OutputOptions)
    outputs: tuple[Deliverable, ...] = ()  # empty: the single legacy PNG of `options`
    review: ReviewConfig | None = None  # None: every cutout goes to the outbox


@dataclass(frozen=True)
class MatchThresholds:
    """Near-duplicate acceptance (``fingerprint.verify``): a cached mask is reused only if
    every check passes. Calibrated by bench/calibrate.py; see bench/calibration.md."""

    phash_radius: int = 12  # of 256 bits; candidates beyond it are never looked at (max 15)
    min_cosine: float = 0.50  # EfficientNet-Lite0: a loose semantic gate only
    max_aspect_delta: float = 0.01  # |log aspect ratio| beyond 1-pixel rounding
    min_edge_corr: float = 0.96  # luma gradient correlation: crops, flips, rotations, moves
    max_luma_delta: float = 6.0  # L* units, largest local residual after a tone-curve fit
    max_colour_delta: float = 8.0  # a*b* units, largest local chroma change: recolours


@dataclass(frozen=True)
class CacheLimits:
    """Applied by ``daemon.cache.pruner``; 0 disables a limit."""

    max_bytes: int = 2 * 1024**3  # distinct blobs + index
    max_entries: int = 200_000
    ttl_days: float = 90.0  # since the last hit
    policy: str = "lru"
    low_water: float = 0.9  # a crossed size limit is pruned down to this fraction of it


@dataclass(frozen=True)
class PruneSchedule:
    interval_s: float = 3600.0  # 0: no periodic run
    daily_at: str | None = None  # "HH:MM", local time
    limit_check_s: float = 60.0  # how often the cheap "limit crossed" check may run


@dataclass(frozen=True)
class CacheConfig:
    dir: Path
    enabled: bool = True
    store_outputs: bool = True
    match: MatchThresholds = field(default_factory=MatchThresholds)
    limits: CacheLimits = field(default_factory=CacheLimits)
    prune: PruneSchedule = field(default_factory=PruneSchedule)


@dataclass(frozen=True)
class StoreConfig:
    backend: str = "sqlite"
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "rembgd"
    local_lru_entries: int = 2048
    claim_ttl_s: float = 60.0
    socket_timeout_s: float = 2.0
    retry_s: float = 10.0  # how often an unavailable cache (store) is re-opened


@dataclass(frozen=True)
class Config:
    source: Path
    watch: tuple[WatchPair, ...]
    cache: CacheConfig
    store: StoreConfig
    models_dir: Path
    observer: str = "auto"
    poll_interval_s: float = 2.0
    settle_s: float = 1.0
    rescan_interval_s: float = 300.0
    progress_interval_s: float = 10.0
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    workers: int = 2
    queue_size: int = 256
    threads: int = 0  # ONNX intra-op threads; 0 = all cores
    max_image_pixels: int = 100_000_000
    memory_budget_mp: float = 120.0  # decoded megapixels in flight across workers
    umask: int = 0o022
    retry_attempts: int = 5
    retry_backoff_s: float = 1.0
    incomplete_timeout_s: float = 900.0  # an empty or growing file waits this long, then fails
    log_level: str = "info"
    log_format: str = "auto"
    state_file: Path | None = None
    output: OutputOptions = field(default_factory=OutputOptions)  # the `output:` section
    outputs: tuple[Deliverable, ...] = ()  # the top-level `outputs:`, every pair's default

    @property
    def output_defaults(self) -> OutputOptions:
        """The `output:` section (what `rembgd process` uses), without per-pair overrides."""
        return self.output
