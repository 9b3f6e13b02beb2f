"""Deliverables end to end: real files -> job -> pipeline (real u2netp, real SQLite cache)
-> the files of `outputs:`; also `rembgd process` and a real daemon reloaded with SIGHUP.

What the unit tests of ``daemon.imaging`` cannot show: one inference feeds every
deliverable, a reload that adds a deliverable or changes a background costs no
inference, ICC/EXIF/16-bit survive the whole path, and a failed deliverable
keeps the others and sends the source to failed/ naming it.
"""
from __future__ import annotations

import dataclasses
import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image, ImageOps
from scipy import ndimage

import iccprofiles
from tests.helpers import photo, write_config
from daemon import config as configmod
from daemon import job as jobmod
from daemon.imaging import despill
from daemon.imaging import fingerprint as fpmod
from daemon.imaging import keys as keysmod
from daemon.imaging import render as rendermod
from daemon.imaging.colour import srgb_profile
from daemon.imaging.decode import decode
from daemon.imaging.deliver import render
from daemon.service.app import App
from harness import Daemon, wait_for

ROOT = Path(__file__).resolve().parents[1]
COPYRIGHT = "(c) 2024 Studio Nord"
KEYWORD = "kw-red-sneaker"
XMP = (b'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?>'
       b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
       b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
       b'xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:subject><rdf:Bag><rdf:li>'
       + KEYWORD.encode() + b'</rdf:li></rdf:Bag></dc:subject></rdf:Description></rdf:RDF>'
       b'</x:xmpmeta><?xpacket end="w"?>')

MASTER = {"name": "master", "format": "png"}
MARKET = {"name": "marketplace", "format": "jpeg", "quality": 92, "background": "#ffffff",
          "crop": "subject", "margin": "2%", "colour": "srgb",
          "canvas": {"aspect": "1:1", "long_edge": 300, "fill": 0.85}}
WEB = {"name": "web", "format": "webp", "quality": 85, "max_size": 160, "colour": "srgb"}


# ------------------------------------------------------------------ helpers


def coffee() -> np.ndarray:
    """A cup on a plain table: u2netp leaves about half of it at alpha 0. 300 x 200."""
    return np.ascontiguousarray(photo("coffee")[::2, ::2])


H, W = 200, 300


def save(pixels: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **kw)
    return buf.getvalue()


class Studio:
    """A config with these outputs over tmp_path, and the App (the daemon's runtime) for it."""

    def __init__(self, tmp_path: Path, models_dir: Path, engines, outputs: list[dict], **over):
        self.root = tmp_path
        pair = {"inbox": str(tmp_path / "inbox"), "outbox": str(tmp_path / "outbox"),
                "outputs": outputs, "after_success": over.pop("after_success", "keep")}
        self.path = write_config(tmp_path, models_dir, watch=[pair], **over)
        self.cfg = configmod.load(self.path)
        self.app = App.build(self.cfg, engines=engines)
        self.pair = self.cfg.watch[0]

    def drop(self, rel: str, data: bytes) -> Path:
        src = self.pair.inbox / rel
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(data)
        return src

    def run(self, rel: str) -> jobmod.Outcome:
        p = self.pair
        job = jobmod.Job.for_pair(p, Path(rel), self.app.plan(p.key),
                                  ledger=self.app.ledgers[p.key])
        return jobmod.run(job, self.app.pipeline)

    def out(self, name: str, rel: str, ext: str) -> Path:
        return self.pair.outbox / name / (rel + ext)

    def close(self) -> None:
        self.app.close()


@pytest.fixture
def studio(tmp_path, models_dir, shared_engines):
    made: list[Studio] = []

    def make(outputs: list[dict], sub: str = "", **over) -> Studio:
        folder = tmp_path / sub if sub else tmp_path
        folder.mkdir(exist_ok=True)
        s = Studio(folder, models_dir, shared_engines, outputs, **over)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.fixture
def predictions(shared_engines, monkeypatch) -> list[tuple[int, int]]:
    """Every call of the real u2netp engine's predict (input shapes), counted at the source."""
    engine = shared_engines.mask("u2netp")
    calls: list[tuple[int, int]] = []
    real = engine.predict

    def counting(rgb):
        calls.append(rgb.shape[:2])
        return real(rgb)

    monkeypatch.setattr(engine, "predict", counting)
    return calls


def _open(path: Path) -> Image.Image:
    img = Image.open(path)
    img.load()
    return img


def _tiff(path: Path) -> tuple[np.ndarray, dict]:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        return page.asarray(), {t.code: t.value for t in page.tags.values()}


def _icc(path: Path) -> bytes | None:
    if path.suffix == ".tif":
        return _tiff(path)[1].get(34675)
    return _open(path).info.get("icc_profile")


# ------------------------------------------------------- one inference, three files


def test_three_deliverables_from_one_inference(studio, predictions):
    s = studio([MASTER, MARKET, WEB])
    s.drop("shoot/cup.jpg", save(coffee(), "JPEG", quality=95))
    res = s.run("shoot/cup.jpg")
    assert res.kind == "miss", res.error
    assert len(predictions) == 1 and s.app.pipeline.inferences == 1
    master, market, web = (s.out("master", "shoot/cup.jpg", ".png"),
                           s.out("marketplace", "shoot/cup.jpg", ".jpg"),
                           s.out("web", "shoot/cup.jpg", ".webp"))
    assert sorted(res.written) == sorted([master, market, web])
    assert sorted(p.relative_to(s.pair.outbox).as_posix() for p in s.pair.outbox.rglob("*.*")
                  if ".rembgd-ledger" not in p.parts) == \
        ["marketplace/shoot/cup.jpg.jpg", "master/shoot/cup.jpg.png", "web/shoot/cup.jpg.webp"]
    m, j, w = _open(master), _open(market), _open(web)
    assert (m.format, m.mode, m.size) == ("PNG", "RGBA", (W, H))
    assert (j.format, j.mode, j.size) == ("JPEG", "RGB", (300, 300))
    assert (w.format, w.mode, w.size) == ("WEBP", "RGBA", (160, round(160 * H / W)))
    alpha = np.asarray(m)[..., 3]
    assert (alpha == 0).mean() > 0.2 and (alpha > 250).mean() > 0.1  # a real cut-out

    # the JPEG is pure white wherever its alpha would have been 0 (more than one 16 px MCU
    # away from the subject's edge, where JPEG blocks mix): the same geometry rendered from
    # the master's alpha (the mask) as a transparent PNG
    spec = dataclasses.replace(s.pair.outputs[1], format="png", background=None, colour="keep")
    src = decode((s.pair.inbox / "shoot/cup.jpg").read_bytes())
    ref = np.asarray(_open_bytes(render(src.full, alpha, spec, src.meta)))
    assert ref.shape[:2] == (300, 300)
    clear = ndimage.distance_transform_edt(ref[..., 3] == 0) > 16
    assert clear.mean() > 0.15, clear.mean()
    jpeg = np.asarray(j)
    assert (jpeg[clear] == 255).all(), np.unique(jpeg[clear].reshape(-1, 3), axis=0)[:5]
    # the subject is there and not white
    solid = ndimage.binary_erosion(ref[..., 3] > 200, iterations=4)
    assert solid.sum() > 1000 and jpeg[solid].mean() < 200

    # an exact repeat: the stored outputs, byte for byte, no inference
    before = {p: p.read_bytes() for p in (master, market, web)}
    assert s.run("shoot/cup.jpg").kind == "exact"
    assert len(predictions) == 1
    assert {p: p.read_bytes() for p in before} == before


def _open_bytes(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_rembgd_process_writes_the_top_level_outputs(tmp_path, models_dir):
    """`rembgd process` renders the top-level `outputs:` (not a pair's)."""
    cfg = tmp_path / "process.yaml"
    cfg.write_text(yaml.safe_dump({"models": {"dir": str(models_dir)},
                                   "cache": {"dir": str(tmp_path / "cache")}, "threads": 2,
                                   "outputs": [MASTER, MARKET]}))
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "sub" / "cup.png").write_bytes(save(coffee(), "PNG"))
    proc = subprocess.run([sys.executable, "-m", "daemon", "-c", str(cfg), "process",
                           str(tmp_path / "in"), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    made = sorted(p.relative_to(tmp_path / "out").as_posix()
                  for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert made == ["marketplace/sub/cup.png.jpg", "master/sub/cup.png.png"], made
    assert _open(tmp_path / "out/marketplace/sub/cup.png.jpg").size == (300, 300)


# ------------------------------------------------------- reloads on a warm cache


def test_new_deliverable_and_background_on_a_warm_cache_cost_no_inference(studio, predictions):
    """Two Apps over one cache dir, as a reload builds them: the second adds a JPEG and gives
    the master a background; the mask comes from the cache."""
    data = save(coffee(), "JPEG", quality=95)
    first = studio([MASTER])
    first.drop("a.jpg", data)
    assert first.run("a.jpg").kind == "miss"
    assert len(predictions) == 1
    transparent = np.asarray(_open(first.out("master", "a.jpg", ".png")))
    first.close()

    again = studio([{**MASTER, "background": [40, 80, 120]}, MARKET])
    assert again.cfg.cache.dir == first.cfg.cache.dir
    again.drop("b.jpg", data)  # the same photo delivered again, under another name
    res = again.run("b.jpg")
    assert res.kind == "exact", res.error  # the mask by these bytes' sha256
    assert len(predictions) == 1 and again.app.pipeline.inferences == 0
    flat = np.asarray(_open(again.out("master", "b.jpg", ".png")))
    assert flat.shape == (H, W, 3)  # flattened: no alpha any more
    a = transparent[..., 3:].astype(np.uint32)
    assert (a == 0).mean() > 0.2 and (a > 200).mean() > 0.1
    bg = np.array([40, 80, 120], np.uint32)
    expected = (transparent[..., :3] * a + bg * (255 - a) + 127) // 255
    assert np.array_equal(flat, expected)  # the same mask, composited on the new colour
    assert _open(again.out("marketplace", "b.jpg", ".jpg")).size == (300, 300)


def test_daemon_reload_adds_a_deliverable_without_inference(tmp_path, models_dir):
    """A real `rembgd run`: SIGHUP with a config that adds a JPEG and changes the master's
    background; the same photo dropped again is served from the cached mask."""
    data = save(coffee(), "JPEG", quality=95)
    pair = {"inbox": str(tmp_path / "inbox"), "outbox": str(tmp_path / "outbox"),
            "outputs": [MASTER]}
    path = write_config(tmp_path, models_dir, watch=[pair], rescan_interval_s=0,
                        progress_interval_s=0.2)
    with Daemon(path) as d:
        (tmp_path / "inbox" / "a.jpg").write_bytes(data)
        (first,) = d.wait_processed(1)
        assert first["outcome"] == "miss"
        wait_for(lambda: d.status().get("inferences") == 1, timeout=20)

        pair["outputs"] = [{**MASTER, "background": "white"}, MARKET]
        path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "watch": [pair]}))
        d.signal(signal.SIGHUP)
        d.wait_log(lambda e: e.get("event") == "config_reloaded")
        (tmp_path / "inbox" / "b.jpg").write_bytes(data)
        second = d.wait_processed(2)[1]
        assert second["outcome"] == "exact", second
        st = wait_for(lambda: (lambda s: s if s.get("counters", {}).get("exact") == 1 else None)(
            d.status()), timeout=20)
        assert st["inferences"] == 1, st  # a running total: the reload added none
        assert st["counters"].get("miss") == 1, st["counters"]
    out = tmp_path / "outbox"
    assert _open(out / "marketplace" / "b.jpg.jpg").mode == "RGB"
    assert _open(out / "master" / "b.jpg.png").mode == "RGB"  # on white now
    assert _open(out / "master" / "a.jpg.png").mode == "RGBA"  # written before the reload


# ------------------------------------------------------------------ fidelity


@pytest.mark.parametrize("profile", ["adobe_rgb", "display_p3"])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_icc_profile_kept_byte_for_byte_or_converted(studio, profile, fmt):
    icc = getattr(iccprofiles, profile)()
    s = studio([{"name": "png", "format": "png"}, {"name": "tiff", "format": "tiff"},
                {"name": "webp", "format": "webp"}, {"name": "jpeg", "format": "jpeg"},
                {"name": "srgb", "format": "jpeg", "colour": "srgb"}])
    s.drop("tagged", save(coffee(), fmt, icc_profile=icc, **({"quality": 95} if fmt == "JPEG"
                                                           else {})))
    assert s.run("tagged").kind == "miss"
    for name, ext in (("png", ".png"), ("tiff", ".tif"), ("webp", ".webp"), ("jpeg", ".jpg")):
        assert _icc(s.out(name, "tagged", ext)) == icc, name
    converted = _icc(s.out("srgb", "tagged", ".jpg"))
    assert converted == srgb_profile() and converted != icc
    desc = iccprofiles.load(converted).profile.profile_description
    assert "sRGB" in desc, desc


def _sideways_jpeg() -> tuple[bytes, np.ndarray]:
    """The photo stored rotated (orientation 6: display rotated 90 degrees clockwise)."""
    upright = coffee()
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # what a camera held sideways stores
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x8298] = COPYRIGHT
    return save(stored, "JPEG", quality=95, exif=exif.tobytes(), xmp=XMP), upright


def test_exif_orientation_copyright_and_strip(studio):
    data, upright = _sideways_jpeg()
    outputs = [{"name": f, "format": f} for f in ("png", "tiff", "webp", "jpeg")]
    outputs += [{"name": f"{f}-strip", "format": f, "metadata": "strip"}
                for f in ("png", "tiff", "webp", "jpeg")]
    s = studio(outputs)
    s.drop("side.jpg", data)
    assert s.run("side.jpg").kind == "miss"
    for fmt, ext in (("png", ".png"), ("tiff", ".tif"), ("webp", ".webp"), ("jpeg", ".jpg")):
        for name in (fmt, f"{fmt}-strip"):
            path = s.out(name, "side.jpg", ext)
            raw = path.read_bytes()
            if fmt == "tiff":
                pixels, tags = _tiff(path)
                exif = {k: v for k, v in tags.items() if k in (274, 33432)}
                xmp = tags.get(700)
            else:
                img = _open(path)
                pixels, exif = np.asarray(img), dict(img.getexif())
                xmp = img.info.get("xmp") or img.info.get("XML:com.adobe.xmp")
                xmp = xmp.encode() if isinstance(xmp, str) else xmp
            assert pixels.shape[:2] == upright.shape[:2], name  # upright, not the stored W x H
            assert exif.get(0x0112, 1) == 1, name
            if name == fmt:
                assert exif[0x8298] == COPYRIGHT, name
                assert KEYWORD.encode() in xmp, name
            else:
                assert 0x8298 not in exif and not xmp, name
                assert COPYRIGHT.encode() not in raw and KEYWORD.encode() not in raw, name
    shown = np.asarray(ImageOps.exif_transpose(_open_bytes(data)).convert("RGB")).astype(int)
    cutout = np.asarray(_open(s.out("png", "side.jpg", ".png"))).astype(int)
    kept = cutout[..., 3] > despill.HIGH  # the subject's pixels: neither despilled nor cleared
    assert kept.mean() > 0.2
    # really rotated as a viewer shows it, not re-tagged
    assert np.array_equal(cutout[..., :3][kept], shown[kept])


def _source16() -> np.ndarray:
    """A real photo widened to 16 bits with low bits that 8 bits cannot hold."""
    rgb = coffee().astype(np.uint16)
    return rgb * 256 + (np.arange(rgb.size, dtype=np.uint16).reshape(rgb.shape) % 251)


@pytest.mark.parametrize("container", ["png", "tiff"])
def test_16_bit_in_16_bit_out(studio, container):
    src16 = _source16()
    if container == "png":
        data = imagecodecs.png_encode(src16)
    else:
        buf = io.BytesIO()
        tifffile.imwrite(buf, src16, photometric="rgb", compression="zlib")
        data = buf.getvalue()
    s = studio([{"name": "png", "format": "png"}, {"name": "tiff", "format": "tiff"},
                {"name": "ref", "format": "webp", "lossless": True}])
    s.drop("deep", data)
    assert s.run("deep").kind == "miss"
    mask = np.asarray(_open(s.out("ref", "deep", ".webp")))[..., 3]  # 8-bit, lossless
    assert (mask == 0).any() and ((mask > 0) & (mask < 255)).any()
    png = imagecodecs.png_decode(s.out("png", "deep", ".png").read_bytes())
    tif, tags = _tiff(s.out("tiff", "deep", ".tif"))
    assert tags[338] in (2, (2,))  # ExtraSamples: unassociated alpha
    for name, out in (("png", png), ("tiff", tif)):
        assert out.dtype == np.uint16 and out.shape == (H, W, 4), (name, out.dtype)
        assert np.array_equal(out[..., 3], mask.astype(np.uint16) * 257), name
        partial = (mask >= despill.LOW) & (mask <= despill.HIGH)  # despilled: new colours
        kept = mask > despill.HIGH
        assert partial.any() and kept.mean() > 0.2
        assert np.array_equal(out[..., :3][kept], src16[kept]), name  # every bit kept
        assert (out[..., :3][partial] % 257 != 0).mean() > 0.5, name  # solved in 16 bits
        assert not out[..., :3][mask == 0].any(), name  # hidden: clear


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heic_and_avif_are_processed(studio, fmt):
    buf = io.BytesIO()
    if fmt == "HEIF":  # written with pillow-heif's own API: rembgd registers the opener itself
        pillow_heif = pytest.importorskip("pillow_heif")
        pillow_heif.from_pillow(Image.fromarray(coffee())).save(buf, format="HEIF", quality=90)
        assert buf.getvalue()[4:12] in (b"ftypheic", b"ftypmif1")
    else:
        Image.fromarray(coffee()).save(buf, fmt, quality=90)
    name = "phone.heic" if fmt == "HEIF" else "web.avif"
    s = studio([MASTER, {"name": "web", "format": "webp"}])
    s.drop(name, buf.getvalue())
    res = s.run(name)
    assert res.kind == "miss", res.error
    master = np.asarray(_open(s.out("master", name, ".png")))
    assert master.shape == (H, W, 4)
    shown = master[..., 3] > 0
    assert np.abs(master[..., :3][shown].astype(int) - coffee()[shown]).mean() < 6
    assert (master[..., 3] == 0).mean() > 0.2
    assert _open(s.out("web", name, ".webp")).mode == "RGBA"


# ------------------------------------------------------------ a failed deliverable


def _sidecar(s: Studio, rel: str) -> dict:
    return json.loads((s.pair.failed_dir / (rel + ".error.json")).read_text())


def test_deliverable_that_cannot_render_keeps_the_others(studio, monkeypatch):
    from daemon.imaging import deliver

    def broken(*_a, **_kw):
        raise OSError("webp encoder out of memory")

    monkeypatch.setitem(deliver._ENCODERS, "webp", broken)
    s = studio([MASTER, WEB, MARKET], after_success="move")
    src = s.drop("shoot/cup.jpg", save(coffee(), "JPEG", quality=95))
    res = s.run("shoot/cup.jpg")
    assert res.kind == "failed" and res.reason == "deliverable_failed"
    assert s.out("master", "shoot/cup.jpg", ".png").is_file()
    assert s.out("marketplace", "shoot/cup.jpg", ".jpg").is_file()
    assert not s.out("web", "shoot/cup.jpg", ".webp").exists()
    assert not src.exists() and (s.pair.failed_dir / "shoot/cup.jpg").is_file()
    assert not (s.pair.done_dir / "shoot/cup.jpg").exists()  # never disposed as done
    side = _sidecar(s, "shoot/cup.jpg")
    assert side["reason"] == "deliverable_failed"
    assert "web: OSError: webp encoder out of memory" in side["error"], side


def test_deliverable_whose_folder_is_a_file_keeps_the_others(studio):
    """A realistic write failure: someone left a file named like an output's folder."""
    s = studio([MASTER, WEB, MARKET], after_success="move")
    s.pair.outbox.mkdir(parents=True, exist_ok=True)
    (s.pair.outbox / "web").write_text("not a folder")
    src = s.drop("cup.jpg", save(coffee(), "JPEG", quality=95))
    res = s.run("cup.jpg")
    assert res.kind == "failed"
    assert s.out("master", "cup.jpg", ".png").is_file()
    assert s.out("marketplace", "cup.jpg", ".jpg").is_file(), \
        "the deliverable after the failed one was not written"
    assert not src.exists() and (s.pair.failed_dir / "cup.jpg").is_file()
    side = _sidecar(s, "cup.jpg")
    assert side["reason"] == "deliverable_failed", side
    assert "web: NotADirectoryError" in side["error"], side
    assert "master" not in side["error"] and "marketplace" not in side["error"], side


# ---------------------------------------------------------------- old cache rows


def test_cache_rows_of_another_key_version_are_misses(studio, monkeypatch):
    """Rows written under older MASK/RENDER versions for these very bytes hold a wrong mask
    (all transparent) and a wrong output; the current version must serve neither."""
    s = studio([MASTER])
    data = save(coffee(), "JPEG", quality=95)
    plan = s.app.plan(s.pair.key)
    checksum = s.app.engines.model_file("u2netp").md5
    decoded = decode(data)
    fp = fpmod.fingerprint(data, decoded.rgb, s.app.engines.embedder().embed(decoded.rgb))
    wrong_mask = rendermod.encode_mask(np.zeros((H, W), np.uint8))
    wrong_output = save(np.zeros((H, W, 4), np.uint8), "PNG")
    mask_now, render_now = keysmod.MASK_VERSION, keysmod.RENDER_VERSION
    for mask_v, render_v in ((mask_now - 1, render_now - 1), (mask_now - 1, render_now),
                             (mask_now, render_now - 1)):
        with monkeypatch.context() as m:
            m.setattr(keysmod, "MASK_VERSION", mask_v)
            m.setattr(keysmod, "RENDER_VERSION", render_v)
            mkey = keysmod.mask_key(plan.options, checksum)
            (target,) = keysmod.targets(mkey, plan.options, plan.outputs)
        if mask_v != mask_now:  # a mask row under the current key would be a valid row
            s.app.cache.guard.call(lambda st: st.put(mkey, "u2netp", fp, wrong_mask, None))
        s.app.cache.guard.call(lambda st: st.put(target.output_key, "u2netp", fp, wrong_mask,
                                           wrong_output))
    assert s.app.pipeline.targets(plan)[0].output_key != target.output_key
    engine = s.app.engines.mask("u2netp")
    real, calls = engine.predict, []
    monkeypatch.setattr(engine, "predict", lambda rgb: calls.append(1) or real(rgb))

    s.drop("cup.jpg", data)
    res = s.run("cup.jpg")
    assert res.kind == "miss" and len(calls) == 1
    alpha = np.asarray(_open(s.out("master", "cup.jpg", ".png")))[..., 3]
    assert (alpha > 250).mean() > 0.1  # the real mask, not the stale all-transparent one
