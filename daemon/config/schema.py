"""The config schema: frozen dataclasses, their defaults, rules and one line of meaning each.

Every config key is a field declared with :func:`setting`: its default, its doc line (for
docs/configuration.md) and its rules (``minimum``, ``maximum``, ``choices``). The loader
reads fields by these rules and the reference is generated from them, so a key is declared
once. Most components get their own section (``cache``, ``store``, a pair's ``options``);
the service and the CLI get the whole Config.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

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
POLICIES = ("lru", "lfu", "lfu-decay")  # daemon/cache/policy.py; bench/prune_policy.md
BACKENDS = ("sqlite", "redis")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "text")
FORMATS = ("png", "tiff", "webp", "jpeg")
COLOURS = ("keep", "srgb")
METADATA = ("keep", "strip")
CROPS = ("none", "subject")
HIDDEN = ("clear", "keep")  # the colour under alpha 0
REFINES = ("none", "edges", "glass")  # daemon/imaging/refine.py, see_through.py
REFINE_DOC = ("edges: re-decide the mask's soft edge band from the full-size photo (crisp "
              "product edges, partial alpha on hair and glass; bench/quality.md); none: the "
              "plain bilinear upscale of the model's mask; glass: edges, then partial alpha where "
              "the sweep visibly shows through the subject, dimmed (transparent products; "
              "opt-in: an opaque product shaded like the sweep can be mistaken for glass)")
DETAIL_DOC = ("recover thin structures attached to the subject that the model misses (straps, "
              "cords, chains, strands) from the full-size photo, where the backdrop is a plain "
              "sweep; does nothing on a busy backdrop (bench/detail.md); off: the refined mask "
              "as it is")
DESPILL_DOC = ("write the subject's own colour, not the backdrop's mix, in partly transparent "
               "pixels (edges, strands, glass), solved against the fitted backdrop where it is "
               "a plain sweep, else against the subject's and the background's colours "
               "estimated around the edge, in the source's colour space and bit depth "
               "(bench/detail.md); off: the photo's pixels")
FORMAT_EXT = {"png": ".png", "tiff": ".tif", "webp": ".webp", "jpeg": ".jpg"}
COLOUR_DOC = "keep: embed the source's ICC profile; srgb: convert to sRGB (littleCMS)"


class ConfigError(ValueError):
    """A config problem, phrased as ``<file>: <key>: <what is wrong>``."""


def setting(default: Any = MISSING, doc: str = "", *, factory: Any = MISSING,
            **rules: Any) -> Any:
    """A config key: its default (or ``factory``), its meaning and the loader's rules.

    Rules: ``minimum``, ``maximum``, ``choices``; ``key``: the YAML path when it is not
    the field name (``"logging.level"``), None for a field that is no key; ``type_doc``
    and ``default_doc``: how the reference shows a type or default it cannot derive.
    """
    return field(default=default, default_factory=factory, metadata={"doc": doc, **rules})


def default_models_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "rembgd" / "models"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "rembgd"


@dataclass(frozen=True)
class AlphaMatting:
    """rembg's alpha matting of the mask's edges (the single PNG of ``output:`` only)."""

    enabled: bool = setting(False, "matte the edges; slow: about 45 s and 3.4 GB at 6 MP")
    foreground_threshold: int = setting(240, "trimap: mask values above it are foreground",
                                        minimum=0, maximum=255)
    background_threshold: int = setting(10, "trimap: mask values below it are background",
                                        minimum=0, maximum=255)
    erode_size: int = setting(10, "erosion of the trimap's sure regions, in px",
                              minimum=0, maximum=100)


@dataclass(frozen=True)
class OutputOptions:
    """The single PNG a pair without ``outputs:`` writes, and the model. Everything here is
    in the cache key: ``model`` and ``post_process_mask`` key the mask, the rest the PNG."""

    model: str = setting("u2netp", "the segmentation model (offline default; bria-rmbg, "
                         "whose licence needs a paid agreement, is never chosen silently)")
    only_mask: bool = setting(False, "write the 8-bit grey mask instead of the cutout")
    post_process_mask: bool = setting(False, "rembg's mask post-processing (smooths and "
                                      "thresholds the mask)")
    alpha_matting: AlphaMatting = setting(factory=AlphaMatting)
    bgcolor: tuple[int, int, int, int] | None = setting(
        None, "a background colour instead of transparency, e.g. [255, 255, 255, 255]",
        type_doc="[r, g, b, a], 0-255, or null")
    png_compression: int = setting(1, "zlib level; 1-3: ISA-L (7-12x Pillow's speed at "
                                   "24 MP), 4-9: zlib", minimum=0, maximum=9)
    colour: str = setting("keep", COLOUR_DOC, choices=COLOURS)
    metadata: str = setting("keep", "keep: EXIF (orientation set to 1) and XMP; strip: none",
                            choices=METADATA)
    refine: str = setting("edges", REFINE_DOC + "; the deliverables' default", choices=REFINES)
    detail: bool = setting(True, DETAIL_DOC + "; the deliverables' default")
    despill: bool = setting(True, DESPILL_DOC + "; the deliverables' default")

    @property
    def mask_options(self) -> tuple:
        """What changes the cached mask (with the model's checksum): nothing else keys it."""
        return (self.model, self.post_process_mask)


ASPECT_SIDES = range(1, 101)  # each side of a canvas's "W:H"
ASPECT_RULE = f"{ASPECT_SIDES.start}-{ASPECT_SIDES.stop - 1} each side"


@dataclass(frozen=True)
class Canvas:
    """Place the (cropped) subject on a frame of a fixed aspect ratio."""

    aspect: tuple[int, int] = setting((1, 1), "width:height of the frame",
                                      type_doc=f'"W:H", {ASPECT_RULE}', default_doc='`"1:1"`')
    long_edge: int = setting(2000, "px of the frame's longer side", minimum=16, maximum=30000)
    fill: float = setting(0.85, "the subject's longer side spans this fraction of the frame",
                          minimum=0.05, maximum=1.0)


@dataclass(frozen=True)
class Deliverable:
    """One file written per source, to ``<outbox>/<name>/<subfolders>/<source name><ext>``.
    A key that cannot apply (``quality`` on a PNG, ``margin`` without ``crop: subject``, a
    transparent JPEG) is an error."""

    name: str = setting("cutout", "the outbox subfolder it goes to: 1-64 letters, digits, "
                        "., _, -; unique per list, ignoring case", default_doc="required")
    format: str = setting("png", "aliases: jpg, tif",
                          choices=FORMATS)
    quality: int = setting(90, "jpeg and lossy webp (jpeg >= 90: 4:4:4 chroma)",
                           minimum=1, maximum=100)
    compression: int = setting(1, "png: zlib level 0-9; tiff: 0 none, >0 deflate at that "
                               "level", minimum=0, maximum=9)
    lossless: bool = setting(False, "webp: lossless")
    background: tuple[int, int, int] | None = setting(
        None, "flatten onto this colour; jpeg always flattens",
        type_doc='transparent, white, black, "#rrggbb" or [r, g, b]',
        default_doc="transparent (jpeg: white)")
    crop: str = setting("none", "subject: crop to the alpha's box (alpha >= 10%, specks "
                        "under 0.1% of the subject ignored)", choices=CROPS)
    margin: float = setting(0.0, "around the subject box, with crop: subject",
                            type_doc='"5%" of its longer side, "40px", or a number of px',
                            default_doc="`0`")
    margin_unit: str = setting("%", key=None)  # "%" | "px", from `margin`
    canvas: Canvas | None = setting(None, "centre the subject on a frame",
                                    default_doc="`null`")
    max_size: int | None = setting(None, "longest edge in px, downscale only",
                                   minimum=16, maximum=65535)
    colour: str = setting("keep", COLOUR_DOC, choices=COLOURS)
    metadata: str = setting("keep", "keep: EXIF (orientation set to 1), XMP, and IPTC where "
                            "the format holds it (JPEG, TIFF); strip: none", choices=METADATA)
    hidden: str = setting("clear", "the colour of fully transparent pixels: clear: black, "
                          "as rembg writes them (the photo's backdrop is not delivered; a "
                          "24 MP PNG about half the size); keep: the photo's own",
                          choices=HIDDEN)
    refine: str | None = setting(None, REFINE_DOC, choices=REFINES,
                                 default_doc="the pair's `options.refine`")
    detail: bool | None = setting(None, DETAIL_DOC, default_doc="the pair's `options.detail`")
    despill: bool | None = setting(None, DESPILL_DOC,
                                   default_doc="the pair's `options.despill`")

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
    ``dir`` instead of the outbox, each with a sidecar saying why (daemon/review.py)."""

    min_confidence: float = setting(0.46, "route a cutout whose mask confidence (0-1) is "
                                    "below this; 0.46 was calibrated by bench/routing.py",
                                    minimum=0.0, maximum=1.0)
    dir: Path | None = setting(None, "where held cutouts go (subfolders mirror the outbox)",
                               default_doc="`review` beside the outbox")

    def folder(self, outbox: Path) -> Path:
        return self.dir or Path(outbox).parent / "review"


@dataclass(frozen=True)
class WatchPair:
    """An inbox watched for images and the outbox their outputs go to (subfolders
    mirrored). No folder may lie inside another pair's inbox."""

    inbox: Path = setting(doc="the hot folder watched for new images", default_doc="required")
    outbox: Path = setting(doc="where the outputs go", default_doc="required")
    failed_dir: Path = setting(doc="broken files, each with a <name>.error.json sidecar",
                               default_doc="`failed` beside the outbox")
    done_dir: Path = setting(doc="originals, with after_success: move",
                             default_doc="`done` beside the inbox")
    name: str | None = setting(None, "the pair's stable name (1-64 letters, digits, '.', '_' "
                               "or '-'; unique): the page, the journal and queued work "
                               "name the pair by it, whatever its place in the list",
                               default_doc="its inbox path")
    recursive: bool = setting(True, "watch subfolders too")
    after_success: str = setting("keep", "the source, once every output is written; move: "
                                 "to done_dir", choices=AFTER_SUCCESS)
    options: OutputOptions = setting(factory=OutputOptions, doc="this pair's overrides of "
                                     "any `output:` key", type_doc="mapping",
                                     default_doc="`output:`")
    outputs: tuple[Deliverable, ...] = setting(
        (), "this pair's own deliverables; they replace the top-level list",
        type_doc="list of deliverables", default_doc="the top-level `outputs:`")
    review: ReviewConfig | None = setting(
        None, "route low-confidence cutouts to a review folder instead of the outbox",
        default_doc="off: every cutout goes to the outbox")

    @property
    def key(self) -> str:
        """The pair's stable identity across reloads: its ``name``, else its inbox path
        (inboxes never overlap, and a name has no '/')."""
        return self.name or str(self.inbox)

    def written_folders(self) -> dict[str, Path]:
        """Every folder rembgd writes into for this pair, by config key: the one list the
        folder rules (``daemon.config.folders``) and the sweeper of orphaned temps
        (``Supervisor``) share, so a folder added here is checked and swept alike."""
        named = {"outbox": self.outbox, "failed_dir": self.failed_dir, "done_dir": self.done_dir}
        if self.review is not None:
            named["review.dir"] = self.review.folder(self.outbox)
        return named


@dataclass(frozen=True)
class MatchThresholds:
    """Near-duplicate acceptance (``imaging.match.verify``): a cached mask is reused only if
    every check passes. Calibrated by bench/calibrate.py; see bench/calibration.md."""

    phash_radius: int = setting(12, "pHash candidates within this many of 256 bits (the "
                                "banded index reaches 15)", minimum=0, maximum=15)
    min_cosine: float = setting(0.50, "EfficientNet-Lite0 embedding cosine: a loose "
                                "semantic gate only", minimum=-1, maximum=1)
    max_aspect_delta: float = setting(0.01, "|log aspect ratio| beyond 1-pixel rounding",
                                      minimum=0)
    min_edge_corr: float = setting(0.96, "luma-gradient correlation: rejects crops, flips, "
                                   "rotations, moves", minimum=-1, maximum=1)
    max_luma_delta: float = setting(6.0, "largest local L* change after a tone-curve fit: "
                                    "local edits", minimum=0)
    max_colour_delta: float = setting(8.0, "largest local a*b* change: recolours of the "
                                      "object or the whole", minimum=0)


@dataclass(frozen=True)
class CacheLimits:
    """Applied by the pruner (``daemon.cache.pruner``); 0 disables a limit."""

    max_bytes: int = setting(2 * 1024**3, "distinct blobs (shared ones once) + index",
                             minimum=0)
    max_entries: int = setting(200_000, "cached entries", minimum=0)
    ttl_days: float = setting(90.0, "since the last hit (an old entry hit today stays)",
                              minimum=0)
    policy: str = setting("lru", "lfu-decay: frequency with aging (bench/prune_policy.md)",
                          choices=POLICIES)
    low_water: float = setting(0.9, "a crossed size limit is pruned down to this fraction "
                               "of it", minimum=0.5, maximum=1)


@dataclass(frozen=True)
class PruneSchedule:
    """When the pruner runs: at start-up, every ``interval_s``, at ``daily_at``, and when a
    limit is crossed."""

    interval_s: float = setting(3600.0, "0: no periodic run", minimum=0)
    daily_at: str | None = setting(None, "local time of a daily run",
                                   type_doc='"HH:MM" or null')
    limit_check_s: float = setting(60.0, "how often the cheap \"limit crossed\" check runs",
                                   minimum=1)


@dataclass(frozen=True)
class CacheConfig:
    """The mask cache: index, mask blobs and stored outputs."""

    dir: Path = setting(factory=default_cache_dir, doc="the SQLite index and the blobs",
                        default_doc="`$XDG_CACHE_HOME/rembgd`")
    enabled: bool = setting(True, "false: every file is inferred, nothing is stored")
    store_outputs: bool = setting(True, "keep the encoded outputs too: exact repeats skip "
                                  "decoding and encoding")
    match: MatchThresholds = setting(factory=MatchThresholds)
    limits: CacheLimits = setting(factory=CacheLimits)
    prune: PruneSchedule = setting(factory=PruneSchedule)


@dataclass(frozen=True)
class StoreConfig:
    """Where the cache index lives: SQLite in ``cache.dir``, or Redis shared by several
    machines."""

    backend: str = setting("sqlite", "sqlite: embedded; redis: shared by several "
                           "machines", choices=BACKENDS)
    url: str = setting("redis://127.0.0.1:6379/0", "the Redis server (backend: redis)")
    prefix: str = setting("rembgd", "Redis key prefix (backend: redis)")
    local_lru_entries: int = setting(2048, "in-process tier in front of Redis", minimum=0)
    claim_ttl_s: float = setting(60.0, "a claim on a file lapses this long after its last "
                                 "renewal", minimum=1)
    socket_timeout_s: float = setting(2.0, "Redis socket timeout", minimum=0.05)
    retry_s: float = setting(10.0, "while the cache is unusable, re-open it this often",
                             minimum=0.1)


class Secret:
    """A password-like value: shown as hidden in ``config show``, logs and reprs."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "<hidden>"

    __str__ = __repr__


LOCAL_HOSTS = ("127.0.0.1", "::1", "localhost")  # `web.listen` without a token

# `web.token`: long enough not to be guessed, short enough for the login form (whose body
# is capped), and printable ASCII without spaces, as an HTTP header and a form carry it
# byte for byte (a bearer header is Latin-1 on the wire, a form field UTF-8)
TOKEN_MIN, TOKEN_MAX = 16, 1024
TOKEN_RULE = (f"{TOKEN_MIN} to {TOKEN_MAX} printable ASCII characters, no spaces "
              "(e.g. the output of `openssl rand -hex 24`)")


def token_problem(token: str) -> str | None:
    """Why ``token`` breaks ``TOKEN_RULE``, or None."""
    if not TOKEN_MIN <= len(token) <= TOKEN_MAX:
        return f"must be {TOKEN_RULE}; it has {len(token)} characters"
    bad = sorted({c for c in token if not "!" <= c <= "~"})
    if bad:
        return f"must be {TOKEN_RULE}; it contains {', '.join(map(repr, bad[:5]))}"
    return None


def split_listen(listen: str) -> tuple[str, int] | None:
    """``HOST:PORT`` or ``[IPv6]:PORT`` as (host, port), or None if it is neither."""
    host, sep, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        return None
    return host, int(port)


@dataclass(frozen=True)
class WebConfig:
    """The status page and ``/metrics`` (docs/web.md). Absent: no HTTP server at all."""

    listen: str = setting("127.0.0.1:8765", "HOST:PORT or [IPv6]:PORT; any host but "
                          "127.0.0.1, ::1 and localhost needs `token`")
    token: Secret | None = setting(None, "every request must carry it (bearer header or "
                                   "the login cookie); `config show` hides it",
                                   type_doc=f"string: {TOKEN_RULE}")
    session_hours: float = setting(12.0, "a browser's session (login and form token) "
                                   "expires this long after it began", minimum=0.01)

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]

    @property
    def local(self) -> bool:
        return self.host in LOCAL_HOSTS


@dataclass(frozen=True)
class Config:
    """The whole config file."""

    source: Path = setting(key=None)  # the file it was read from
    watch: tuple[WatchPair, ...] = setting(doc="inbox -> outbox pairs; `rembgd run` needs "
                                           "at least one", default_doc="none")
    cache: CacheConfig = setting()
    store: StoreConfig = setting()
    models_dir: Path = setting(factory=default_models_dir, key="models.dir",
                               doc="the provisioned models (`rembgd models install`)",
                               default_doc="`$XDG_DATA_HOME/rembgd/models`")
    observer: str = setting("auto", "auto: polling when an inbox is on a network file "
                            "system (SMB/CIFS, NFS...), else inotify", choices=OBSERVERS)
    poll_interval_s: float = setting(2.0, "how often the poller looks", minimum=0.05)
    settle_s: float = setting(1.0, "size and mtime must be stable this long before a file "
                              "is processed", minimum=0)
    rescan_interval_s: float = setting(300.0, "safety-net rescan; 0 disables", minimum=0)
    progress_interval_s: float = setting(10.0, "a `progress` log line this often while "
                                         "busy", minimum=0.1)
    ignore: tuple[str, ...] = setting(DEFAULT_IGNORE, "names never processed",
                                      type_doc="list of glob patterns")
    workers: int = setting(2, "jobs at once: decode, fingerprint and encode overlap with "
                           "inference (restart to change)", minimum=1, maximum=64)
    queue_size: int = setting(256, "files queued at most (restart to change)", minimum=1)
    threads: int = setting(0, "ONNX Runtime intra-op threads; 0 = all cores",
                           minimum=0, maximum=256)
    max_image_pixels: int = setting(150_000_000, "decompression-bomb limit: a bigger image "
                                    "goes to failed/ (150 MP admits medium format; a file "
                                    "over memory_budget_mp runs alone)", minimum=1)
    memory_budget_mp: float = setting(120.0, "decoded megapixels in flight across workers "
                                      "(a bigger file runs alone)", minimum=1)
    umask: int = setting(0o022, "permissions of the files written",
                         type_doc="octal string", default_doc='`"022"`')
    retry_attempts: int = setting(5, "retries of a transient error of one file (disk "
                                  "full, EACCES, vanished file)", minimum=0)
    retry_backoff_s: float = setting(1.0, "the first retry's delay, doubled each time",
                                     minimum=0)
    incomplete_timeout_s: float = setting(900.0, "an empty, truncated or still-changing "
                                          "file waits this long, then fails", minimum=0)
    log_level: str = setting("info", "log level", key="logging.level", choices=LOG_LEVELS)
    log_format: str = setting("auto", "auto: json under systemd or when not a TTY, text "
                              "on a TTY", key="logging.format", choices=LOG_FORMATS)
    state_file: Path | None = setting(None, "the status file `rembgd status` reads",
                                      default_doc="`<cache.dir>/status.json`")
    output: OutputOptions = setting(factory=OutputOptions)
    outputs: tuple[Deliverable, ...] = setting(
        (), "deliverables of every pair and of `rembgd process`; none: the single PNG of "
        "`output:`", default_doc="none")
    web: WebConfig | None = setting(None, "the status page and /metrics; absent: off",
                                    default_doc="`null` (off)")

    @property
    def output_defaults(self) -> OutputOptions:
        """The `output:` section (what `rembgd process` uses), without per-pair overrides."""
        return self.output


def replace(cfg: Config, **changes: Any) -> Config:
    return dataclasses.replace(cfg, **changes)


def state_path(cfg: Config) -> Path:
    return cfg.state_file or cfg.cache.dir / "status.json"
