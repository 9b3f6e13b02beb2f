"""The source stamp: every deliverable format carries the source's sha256 and decodes unchanged."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import tifffile
from PIL import Image

import iccprofiles
from tests.helpers import photo
from daemon.config.schema import Deliverable
from daemon.imaging.deliver import render
from daemon.imaging.meta import SourceMeta
from daemon.imaging.stamp import read_stamp, stamp

SHA = hashlib.sha256(b"the source photo").hexdigest()
META = SourceMeta(icc=iccprofiles.adobe_rgb(), exif=b"Exif\x00\x00" + bytes.fromhex(
    "49492a00080000000100983302000a0000001a00000000000000436f707972696768740000"),
    xmp=b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>')

SPECS = [
    Deliverable("png", "png"),
    Deliverable("png16", "png", colour="srgb"),
    Deliverable("tiff", "tiff", compression=6),
    Deliverable("tiff-plain", "tiff", compression=0, metadata="strip"),
    Deliverable("jpeg", "jpeg", background=(255, 255, 255), quality=92),
    Deliverable("jpeg-strip", "jpeg", background=(255, 255, 255), metadata="strip"),
    Deliverable("webp", "webp", quality=80),
    Deliverable("webp-flat", "webp", background=(255, 255, 255), metadata="strip"),
    Deliverable("webp-lossless", "webp", lossless=True, metadata="strip"),
    Deliverable("webp-lossless-flat", "webp", lossless=True, background=(0, 0, 0),
                metadata="strip"),
]


@pytest.fixture(scope="module")
def cutout():
    rgb = np.asarray(Image.fromarray(photo("astronaut")).resize((240, 200)))
    mask = np.zeros((200, 240), np.uint8)
    mask[40:170, 60:200] = 255
    return rgb, mask


def _pixels(data: bytes, fmt: str) -> np.ndarray:
    if fmt == "tiff":
        return tifffile.imread(io.BytesIO(data))
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return np.asarray(img)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("meta", [META, SourceMeta()], ids=["meta", "no-meta"])
def test_every_format_carries_the_stamp_and_decodes_unchanged(cutout, spec, meta):
    plain = render(*cutout, spec, meta)
    assert read_stamp(io.BytesIO(plain)) is None  # unstamped: as the cache stores it
    stamped = stamp(plain, spec.format, SHA)
    assert read_stamp(io.BytesIO(stamped)) == SHA
    assert np.array_equal(_pixels(stamped, spec.format), _pixels(plain, spec.format))
    assert stamp(plain, spec.format, SHA) == stamped  # deterministic: hits == misses
    other = hashlib.sha256(b"another photo").hexdigest()
    assert read_stamp(io.BytesIO(stamp(plain, spec.format, other))) == other
    if spec.format == "png":
        with Image.open(io.BytesIO(stamped)) as img:
            assert img.text["rembgd:source-sha256"] == SHA
            assert img.info.get("icc_profile") == (meta.icc if spec.colour == "keep" else
                                                   img.info.get("icc_profile"))
    if spec.format == "webp":  # a simple VP8/VP8L file became an extended one, size intact
        with Image.open(io.BytesIO(stamped)) as img:
            assert img.size == (240, 200)
            assert img.mode == ("RGBA" if spec.background is None else "RGB")
        assert stamped[12:16] == b"VP8X"


def test_foreign_and_broken_files_have_no_stamp(cutout):
    png = render(*cutout, Deliverable("png", "png"), SourceMeta())
    for data in (b"", b"not an image", png[:40], stamp(png, "png", SHA)[:60]):
        assert read_stamp(io.BytesIO(data)) is None
    with pytest.raises(ValueError):
        stamp(b"GIF89a...", "png", SHA)
    with pytest.raises(ValueError):
        stamp(png, "png", "not-a-digest")


# --------------------------------- issue 28.1: read as the rescan reads (fd-backed files)


def _read_as_the_rescan(root, name: str, data: bytes) -> str | None:
    """``read_stamp`` through ``open_under``, the fd-backed open of ``Ledger.vouch`` (its
    ``.name`` is an int, which tifffile once took for a path)."""
    from pathlib import Path

    from daemon.nofollow import open_under

    (root / name).write_bytes(data)
    with open_under(root, Path(name)) as fh:
        assert isinstance(fh.name, int)
        return read_stamp(fh)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_every_stamp_reads_through_the_fd_backed_open_of_the_rescan(cutout, spec, tmp_path):
    plain = render(*cutout, spec, META)
    stamped = stamp(plain, spec.format, SHA)
    assert _read_as_the_rescan(tmp_path, "out", stamped) == SHA
    assert _read_as_the_rescan(tmp_path, "plain", plain) is None
    # truncated anywhere (a kill -9 of a copy, a full disk): a stamp or no stamp, no error
    for cut in sorted({1, 8, 12, 16, 40, 100, 200, 400, len(stamped) // 2, len(stamped) - 1}):
        assert _read_as_the_rescan(tmp_path, "cut", stamped[:cut]) in (SHA, None), cut
    # the header of one format, the body of another, or garbage after a good header
    for head in (b"II*\x00", b"MM\x00*", b"\x89PNG\r\n\x1a\n", b"\xff\xd8", b"RIFF\x00\x00\x00\x00WEBP"):
        for body in (stamped[12:], b"\xff" * 300, b"\x00" * 300, plain[len(head):]):
            assert _read_as_the_rescan(tmp_path, "odd", head + body) in (SHA, None), head


def test_a_tiff_whose_tags_were_rewritten_by_another_tool_has_no_stamp(cutout, tmp_path):
    """metadata stripped by a tool after delivery: tifffile rewrites the pixels only."""
    stamped = stamp(render(*cutout, Deliverable("t", "tiff"), META), "tiff", SHA)
    buf = io.BytesIO()
    tifffile.imwrite(buf, tifffile.imread(io.BytesIO(stamped)))
    assert _read_as_the_rescan(tmp_path, "rewritten.tif", buf.getvalue()) is None
    assert _read_as_the_rescan(tmp_path, "stamped.tif", stamped) == SHA
