"""The ``outputs:`` section: a list of deliverables, validated one key at a time.

Each entry becomes a ``Deliverable``; its name is a folder of the outbox, so
it must be a safe, portable folder name (no '/', no leading '.', no Windows
device name, since outboxes are often SMB shares) and unique per list, ignoring
case (macOS and Windows shares fold case). A key that cannot apply to the
format (``quality`` on a PNG, ``margin`` without ``crop: subject``, a
transparent JPEG) is an error rather than silently ignored. Errors name the
key path, e.g. ``watch[0].outputs[1].canvas.fill``.

Also checks the legacy ``output:`` options that deliverables do not use
(``only_mask``, ``alpha_matting``, ``bgcolor``): set together with ``outputs:``
they would be ignored, so they are an error naming where they were set.
"""
from __future__ import annotations

import re
from typing import Any

from daemon.config.fields import read_key, read_section
from daemon.config.reader import Reader
from daemon.config.schema import (ASPECT_RULE, ASPECT_SIDES, FORMATS, Canvas, ConfigError,
                                   Deliverable, OutputOptions)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
WINDOWS_DEVICES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)),
                   *(f"lpt{i}" for i in range(1, 10))}
FORMAT_ALIASES = {"jpg": "jpeg", "tif": "tiff"}
NAMED_COLOURS = {"white": (255, 255, 255), "black": (0, 0, 0)}
APPLIES_TO = {  # key -> the formats it means something for
    "quality": ("jpeg", "webp"),
    "compression": ("png", "tiff"),
    "lossless": ("webp",),
    "hidden": ("png", "tiff", "webp"),  # jpeg is always flattened
}


def parse_outputs(r: Reader, key: str, default: tuple[Deliverable, ...]
                  ) -> tuple[Deliverable, ...]:
    """The ``outputs:`` list under ``r`` (``default`` when absent or null)."""
    raw = r.raw(key)
    if raw is None:
        return default
    where = r.where(key)
    if not isinstance(raw, list) or not raw:
        r.fail("must be a non-empty list of deliverables ({name, format, ...})", key)
    out: list[Deliverable] = []
    for i, item in enumerate(raw):
        d = Reader(r.source, item, f"{where}[{i}]")
        deliverable = parse_deliverable(d)
        for j, other in enumerate(out):
            if other.name.lower() == deliverable.name.lower():
                d.fail(f"{deliverable.name!r} is also {where}[{j}].name (names are folders, "
                       "compared ignoring case): each output needs its own name", "name")
        out.append(deliverable)
    return tuple(out)


def parse_deliverable(d: Reader) -> Deliverable:
    name = _name(d)
    fmt = _format(d)
    for key, formats in APPLIES_TO.items():
        if d.data.get(key) is not None and fmt not in formats:
            named = f"{', '.join(formats[:-1])} and {formats[-1]}" if len(formats) > 1 \
                else formats[0]
            d.fail(f"applies to {named} only, not {fmt}", key)
    bg_raw = d.raw("background")
    if fmt == "jpeg" and bg_raw == "transparent":
        d.fail("jpeg cannot be transparent; give a colour (default white)", "background")
    crop = read_key(d, Deliverable, "crop")
    margin_raw = d.raw("margin")
    if margin_raw is not None and crop != "subject":
        d.fail("applies only with crop: subject", "margin")
    margin, unit = _margin(d, margin_raw)
    return read_section(d, Deliverable, given={
        "name": name, "format": fmt, "background": _colour(d, "background", bg_raw),
        "crop": crop, "margin": margin, "margin_unit": unit, "canvas": _canvas(d)})


def _name(d: Reader) -> str:
    name = d.get("name", str, None)
    if name is None:
        d.fail("is required (it names the outbox subfolder)", "name")
    if not NAME_RE.match(name) or name.endswith("."):
        d.fail("must be 1-64 letters, digits, '.', '_' or '-', not starting with '.' or "
               f"ending with '.' (it becomes a folder name), got {name!r}", "name")
    if name.split(".")[0].lower() in WINDOWS_DEVICES:
        d.fail(f"{name!r} is a reserved device name on Windows shares; choose another", "name")
    return name


def _format(d: Reader) -> str:
    fmt = d.get("format", str, Deliverable.format)
    fmt = FORMAT_ALIASES.get(fmt.lower(), fmt.lower())
    if fmt not in FORMATS:
        d.fail(f"must be one of {', '.join(FORMATS)}, got {d.data['format']!r}", "format")
    return fmt


def _colour(d: Reader, key: str, raw: Any) -> tuple[int, int, int] | None:
    """``transparent``, ``white``, ``black``, ``"#rrggbb"`` or ``[r, g, b]``."""
    if raw is None or raw == "transparent":
        return None
    if isinstance(raw, str) and raw.lower() in NAMED_COLOURS:
        return NAMED_COLOURS[raw.lower()]
    if isinstance(raw, str) and re.fullmatch(r"#[0-9a-fA-F]{6}", raw):
        return tuple(int(raw[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
    if (isinstance(raw, list) and len(raw) == 3
            and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in raw)):
        return tuple(raw)  # type: ignore[return-value]
    d.fail("must be transparent, white, black, \"#rrggbb\" or [r, g, b] with values 0-255, "
           f"got {raw!r}", key)
    return None


def _margin(d: Reader, raw: Any) -> tuple[float, str]:
    """``"4%"`` of the subject's longer side, ``"40px"``, or a number of px."""
    if raw is None:
        return Deliverable.margin, Deliverable.margin_unit
    if isinstance(raw, (int, float)) and not isinstance(raw, bool) and 0 <= raw <= 100_000:
        return float(raw), "px"
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(%|px)\s*", raw) if isinstance(raw, str) else None
    if m is None:
        d.fail(f"must be a percentage like \"4%\" or pixels like \"40px\", got {raw!r}", "margin")
    value, unit = float(m.group(1)), m.group(2)
    if unit == "%" and value > 100:
        d.fail(f"must be at most 100%, got {raw!r}", "margin")
    return value, unit


def _canvas(d: Reader) -> Canvas | None:
    if d.data.get("canvas") is None:
        d.seen.add("canvas")
        return None
    c = d.child("canvas")
    raw = c.raw("aspect")
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 60:
        raw = "%d:%d" % divmod(raw, 60)  # YAML 1.1 reads an unquoted 4:5 as 4*60+5 = 245
    m = re.fullmatch(r"\s*([0-9]+)\s*:\s*([0-9]+)\s*", raw) if isinstance(raw, str) else None
    if raw is None:
        aspect = Canvas.aspect
    elif m is None or int(m.group(1)) not in ASPECT_SIDES or int(m.group(2)) not in ASPECT_SIDES:
        c.fail(f"must be a ratio like \"1:1\" or \"4:5\" ({ASPECT_RULE}), got {raw!r}",
               "aspect")
    else:
        aspect = (int(m.group(1)), int(m.group(2)))
    return read_section(c, Canvas, given={"aspect": aspect})


def check_unused_options(source, where_outputs: str, options: OutputOptions,
                         set_at: dict[str, str]) -> None:
    """Deliverables ignore ``only_mask``, ``alpha_matting`` and ``bgcolor`` (the legacy PNG's
    options): set together with ``outputs:`` they are an error at the key that set them
    (``set_at``: option -> its key path)."""
    unused = {"only_mask": options.only_mask,
              "alpha_matting": options.alpha_matting.enabled,
              "bgcolor": options.bgcolor is not None}
    for option, is_set in unused.items():
        if is_set:
            hint = {"bgcolor": "give each output a background instead",
                    "only_mask": "remove it, or the outputs",
                    "alpha_matting": "disable it, or remove the outputs"}[option]
            raise ConfigError(f"{source}: {set_at[option]}: has no effect on the deliverables "
                              f"of {where_outputs} (only on the single PNG of `output:`); "
                              f"{hint}")
