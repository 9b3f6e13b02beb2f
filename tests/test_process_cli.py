"""`rembgd process`: files and folder trees, failures, options, logs, and parity with rembg."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import io
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
import structlog
import yaml
from PIL import Image

from tests.helpers import cut_from, encode, photo
from daemon import cli
from daemon.config import AlphaMatting, OutputOptions
from daemon.fsutil import is_temp_name

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

GOOD = {  # relative path -> (photo, format, save kwargs)
    "a.jpg": ("chelsea", "JPEG", {"quality": 92}),
    "a.png": ("coffee", "PNG", {}),
    "sub/b.webp": ("astronaut", "WEBP", {"quality": 90}),
    "sub/deeper/c.tif": ("rocket", "TIFF", {}),
    "sub/png-named.jpg": ("immunohistochemistry", "PNG", {}),  # format by content, not name
}


# rembg parity holds for the model's mask as is: edge refinement (the default, which
# re-decides the edges from the photo) is tested in test_refine.py
PARITY = {"refine": "none", "detail": False, "despill": False}  # rembg's own cutout


def _config(folder: Path, models_dir: Path, **extra) -> Path:
    data = {"models": {"dir": str(models_dir)}, "cache": {"dir": str(folder / "cache")},
            "threads": 2, **extra}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _png_info(path: Path) -> tuple[str, str, tuple[int, int]]:
    with Image.open(path) as img:
        return img.format, img.mode, img.size


def _no_temp_files(folder: Path) -> None:
    names = [p.name for p in folder.rglob("*")]
    assert not [n for n in names if is_temp_name(n) or n.startswith(".")], names


# ----------------------------------------------------- one real run, many checks


def _run_on_pty(cmd: list[str], cwd: Path) -> tuple[int, str, str]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a real size
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
                            cwd=cwd)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    stdout = proc.stdout.read().decode()
    return proc.wait(timeout=120), stdout, b"".join(chunks).decode(errors="replace")


class Proc:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr




@pytest.fixture(scope="module")
def tree_run(tmp_path_factory, models_dir):
    """One `python -m daemon process` over a folder tree plus a single file.

    stderr is a terminal (a pty), as for a person at a shell: the tqdm bar shares it with
    the JSON log lines, which must still parse.
    """
    base = tmp_path_factory.mktemp("process")
    photos = base / "photos"
    sizes = {}
    for rel, (name, fmt, kw) in GOOD.items():
        (photos / rel).parent.mkdir(parents=True, exist_ok=True)
        rgb = np.ascontiguousarray(photo(name)[::2, ::2])
        (photos / rel).write_bytes(encode(rgb, fmt, **kw))
        sizes[rel] = (rgb.shape[1], rgb.shape[0])
    jpeg = encode(photo("astronaut"), "JPEG")
    (photos / "sub" / "broken.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (photos / "notes.jpg").write_text("not an image, just text named .jpg\n")
    (photos / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (photos / "sub" / "._b.webp").write_bytes(b"\x00\x05\x16\x07")
    single = base / "extra" / "d.bmp"
    single.parent.mkdir()
    man = np.ascontiguousarray(photo("camera")[::2, ::2])  # not "cat": that is chelsea again
    single.write_bytes(encode(man, "BMP"))
    sizes["d.bmp"] = (man.shape[1], man.shape[0])
    out = base / "out"
    cfg = _config(base, models_dir, output=PARITY)
    cmd = [sys.executable, "-m", "daemon", "-c", str(cfg), "--log-format", "json", "process",
           str(photos), str(single), "-o", str(out)]
    rc, stdout, tty = _run_on_pty(cmd, base)
    stderr = ANSI.sub("", tty).replace("\r\n", "\n")
    lines = []
    for piece in re.split(r"[\r\n]", stderr):
        if "{" in piece:  # a JSON log line, possibly written right after a bar refresh
            lines.append(piece[piece.index("{"):])
        elif piece.strip():
            lines.append(piece)
    return {"proc": Proc(rc, stdout, "\n".join(lines)), "tty": stderr, "base": base,
            "photos": photos, "out": out, "sizes": sizes}


def test_exit_code_and_summary(tree_run):
    proc = tree_run["proc"]
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == \
        "8 files: exact 0, pixel 0, near 0, miss 6, failed 2"
    assert "Traceback" not in proc.stderr


def test_one_clear_line_per_failure(tree_run):
    photos = tree_run["photos"]
    lines = [ln for ln in tree_run["proc"].stderr.splitlines() if ln.startswith("failed: ")]
    assert len(lines) == 2, tree_run["proc"].stderr
    by_path = {ln.split(": ")[1]: ln for ln in lines}
    broken = by_path[str(photos / "sub" / "broken.jpg")]
    notes = by_path[str(photos / "notes.jpg")]
    assert re.match(rf"failed: {re.escape(str(photos))}/sub/broken\.jpg: truncated", broken)
    assert "not a supported image" in notes
    # the sources are reported, never moved or deleted by a one-shot run
    assert (photos / "sub" / "broken.jpg").exists() and (photos / "notes.jpg").exists()


def test_outputs_mirror_the_tree(tree_run):
    out = tree_run["out"]
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == ["a.jpg.png", "a.png.png", "d.bmp.png", "sub/b.webp.png",
                       "sub/deeper/c.tif.png", "sub/png-named.jpg.png"]


def test_outputs_are_rgba_pngs_of_the_input_size(tree_run):
    out = tree_run["out"]
    for rel, size in tree_run["sizes"].items():
        fmt, mode, got = _png_info(out / (rel + ".png"))
        assert (fmt, mode, got) == ("PNG", "RGBA", size), rel
        alpha = np.asarray(Image.open(out / (rel + ".png")))[..., 3]
        assert alpha.min() == 0 and alpha.max() == 255, rel  # a real cutout, not a copy


def test_same_stem_two_outputs(tree_run):
    out = tree_run["out"]
    a_jpg = np.asarray(Image.open(out / "a.jpg.png"))
    a_png = np.asarray(Image.open(out / "a.png.png"))
    assert a_jpg.shape != a_png.shape  # the cat and the coffee, not one overwriting the other


def test_no_temp_files_left(tree_run):
    _no_temp_files(tree_run["out"])


def test_json_log_line_per_file(tree_run):
    events = [json.loads(ln) for ln in tree_run["proc"].stderr.splitlines() if ln.startswith("{")]
    processed = [e for e in events if e.get("event") == "processed"]
    assert len(processed) == 8
    for e in processed:
        assert {"path", "outcome", "ms", "model"} <= set(e), e
        assert isinstance(e["ms"], (int, float)) and e["ms"] >= 0
        assert e["model"] == "u2netp"
    outcomes = {Path(e["path"]).name: e["outcome"] for e in processed}
    assert outcomes == {"a.jpg": "miss", "a.png": "miss", "b.webp": "miss", "c.tif": "miss",
                        "d.bmp": "miss", "png-named.jpg": "miss", "broken.jpg": "failed",
                        "notes.jpg": "failed"}
    failed = [e for e in processed if e["outcome"] == "failed"]
    assert all(e.get("error") for e in failed)


def test_progress_bar_on_a_tty(tree_run):
    bars = re.findall(r"(\d+)%\|[^|\n\r]*\| (\d+)/8 \[", tree_run["tty"])
    assert bars and bars[-1] == ("100", "8"), tree_run["tty"][-2000:]
    assert "img/s" in tree_run["tty"] and "miss=6" in tree_run["tty"]  # postfix: outcome counts


def test_matches_rembg_remove(tree_run, models_dir, monkeypatch):
    """Default options: rembg.remove()'s alpha with its u2netp session; the colours are the
    source's own (unassociated alpha), where rembg darkens them by the alpha."""
    from rembg import new_session, remove

    monkeypatch.setenv("U2NET_HOME", str(models_dir))
    session = new_session("u2netp")
    for rel in ("a.png",):  # a lossless input: identical decoded pixels
        with Image.open(tree_run["photos"] / rel) as img:
            rgb = np.asarray(img.convert("RGB"))
            expected = np.asarray(remove(img.convert("RGB"), session=session))
        got = np.asarray(Image.open(tree_run["out"] / (rel + ".png")))
        assert got.shape == expected.shape
        alpha = got[..., 3].astype(int)
        assert np.abs(alpha - expected[..., 3]).max() <= 1, rel
        assert (alpha == expected[..., 3]).mean() > 0.999, rel
        shown = alpha > 0  # the source's own colours; black under alpha 0, as rembg's
        assert np.array_equal(got[..., :3][shown], rgb[shown]), rel
        assert not got[..., :3][~shown].any() and not expected[..., :3][~shown].any(), rel
        opaque = alpha == 255
        assert np.array_equal(got[opaque][:, :3], expected[opaque][:, :3]), rel


def test_second_run_is_served_from_the_cache(tree_run, run_cli):
    base = tree_run["base"]
    out2 = base / "out-again"
    rc, stdout, err = run_cli("-c", base / "config.yaml", "process", tree_run["photos"] / "a.png",
                              "-o", out2)
    assert rc == 0, err
    assert "exact 1" in stdout
    assert (out2 / "a.png.png").read_bytes() == (tree_run["out"] / "a.png.png").read_bytes()


# ----------------------------------------------------------------- TTY + text


# --------------------------------------------------------- options, in-process


@pytest.fixture
def run_cli(capsys, monkeypatch, shared_engines):
    """Call `rembgd` in this process, on the already loaded session; restores structlog."""
    import daemon.inference.engine

    saved = structlog.get_config()
    monkeypatch.setattr(daemon.inference.engine, "Engines",
                        lambda models_dir, threads=0: shared_engines)

    def run(*args) -> tuple[int, str, str]:
        rc = cli.main([str(a) for a in args])
        captured = capsys.readouterr()
        return rc, captured.out, captured.err

    yield run
    structlog.configure(**saved)


@pytest.fixture(scope="module")
def astro(shared_engines):
    """A small real photo (128 x 128: matting stays fast), its raw mask and default cutout."""
    rgb = np.ascontiguousarray(photo("astronaut")[::4, ::4])
    mask = shared_engines.mask("u2netp").predict(rgb)
    return rgb, mask, np.dstack([cut_from(rgb, mask), mask])  # the source's colours, alpha = mask


@pytest.fixture
def small(tmp_path, models_dir, astro):
    rgb, mask, default = astro
    src = tmp_path / "astro.png"
    src.write_bytes(encode(rgb, "PNG"))
    return {"rgb": rgb, "mask": mask, "default": default, "src": src,
            "cfg": _config(tmp_path, models_dir, output=PARITY), "tmp": tmp_path}


def _process(run_cli, small, *options, out="out"):
    out_dir = small["tmp"] / out
    rc, stdout, err = run_cli("-c", small["cfg"], "--log-format", "json", "process", small["src"],
                              "-o", out_dir, "--no-cache", *options)
    assert rc == 0, err
    path = out_dir / "astro.png.png"
    _no_temp_files(out_dir)
    with Image.open(path) as img:
        img.load()
        return img, path


def test_default_options(run_cli, small):
    img, _ = _process(run_cli, small)
    assert img.mode == "RGBA" and np.array_equal(np.asarray(img), small["default"])


def test_option_only_mask(run_cli, small):
    mask, _ = _process(run_cli, small, "--only-mask", "true", out="mask")
    assert mask.mode == "L" and mask.size == (128, 128)
    assert np.array_equal(np.asarray(mask), small["default"][..., 3])
    assert np.array_equal(np.asarray(mask), small["mask"])


def test_option_bgcolor(run_cli, small):
    img, _ = _process(run_cli, small, "--bgcolor", "255,255,255", out="white")
    arr = np.asarray(img)
    assert img.mode == "RGBA" and (arr[..., 3] == 255).all()  # opaque everywhere
    alpha = small["default"][..., 3]
    assert (arr[alpha == 0][:, :3] == 255).all()  # background became white
    inside = alpha == 255
    assert np.array_equal(arr[inside][:, :3], small["rgb"][inside])


def test_option_post_process_mask(run_cli, small):
    post, _ = _process(run_cli, small, "--only-mask", "true", "--post-process-mask", "true",
                       out="post")
    raw, post = small["mask"], np.asarray(post)
    assert not np.array_equal(raw, post)
    soft = lambda m: ((m > 10) & (m < 245)).mean()  # noqa: E731
    assert soft(post) < soft(raw)  # smoothed towards a crisp 0/255 matte


def test_option_alpha_matting_small_image(run_cli, small):
    matted, _ = _process(run_cli, small, "--alpha-matting", "true",
                         "--alpha-matting-erode-size", "5", out="matted")
    assert matted.mode == "RGBA" and matted.size == (128, 128)
    alpha = np.asarray(matted)[..., 3]
    assert not np.array_equal(alpha, small["default"][..., 3])
    from rembg.bg import alpha_matting_cutout

    expected = alpha_matting_cutout(Image.fromarray(small["rgb"]), Image.fromarray(small["mask"]),
                                    240, 10, 5)
    assert np.array_equal(np.asarray(matted), np.asarray(expected))


def test_option_refine(run_cli, small):
    from daemon.imaging.refine import refine

    img, _ = _process(run_cli, small, "--refine", "edges", out="edges")  # over the config's none
    alpha = np.asarray(img)[..., 3]
    assert np.array_equal(alpha, refine(small["rgb"], small["mask"]))
    assert not np.array_equal(alpha, small["mask"])


def test_option_png_compression(run_cli, small):
    _, fast = _process(run_cli, small, "--png-compression", "0", out="l0")
    _, tight = _process(run_cli, small, "--png-compression", "9", out="l9")
    assert fast.stat().st_size > tight.stat().st_size * 1.3
    assert np.array_equal(np.asarray(Image.open(fast)), np.asarray(Image.open(tight)))


def test_options_from_config(run_cli, small, models_dir):
    _config(small["tmp"], models_dir, output={"only_mask": True, "png_compression": 9})
    img, _ = _process(run_cli, small, out="cfg")
    assert img.mode == "L"
    img, _ = _process(run_cli, small, "--only-mask", "false", out="cli-wins")
    assert img.mode == "RGBA"


def test_text_log_format_is_readable(run_cli, small):
    rc, _, err = run_cli("-c", small["cfg"], "--log-format", "text", "process", small["src"],
                         "-o", small["tmp"] / "t", "--no-cache")
    assert rc == 0
    (line,) = [ln for ln in err.splitlines() if "processed" in ln]
    assert not ANSI.search(line) and not line.startswith("{")
    assert f"path={small['src']}" in line and "outcome=miss" in line and "model=u2netp" in line
    assert re.search(r"ms=\d+(\.\d+)?", line)


def test_same_name_from_two_folders_is_not_overwritten(run_cli, small):
    tmp = small["tmp"]
    for folder, name in (("x", "chelsea"), ("y", "coffee")):
        (tmp / folder).mkdir()
        (tmp / folder / "p.png").write_bytes(encode(photo(name)[::4, ::4], "PNG"))
    rc, out, err = run_cli("-c", small["cfg"], "process", tmp / "x" / "p.png", tmp / "y" / "p.png",
                           "-o", tmp / "o", "--no-cache")
    assert rc == 1
    assert Image.open(tmp / "o" / "p.png.png").size == (113, 75)  # the first one, kept
    (line,) = [ln for ln in err.splitlines() if ln.startswith("failed: ")]
    assert line.startswith(f"failed: {tmp / 'y' / 'p.png'}: output ") and "already" in line
    events = [json.loads(ln) for ln in err.splitlines() if ln.startswith("{")]
    assert sorted((e["path"], e["outcome"]) for e in events if e["event"] == "processed") == \
        [(str(tmp / "x" / "p.png"), "miss"), (str(tmp / "y" / "p.png"), "failed")]


def test_output_folder_inside_the_input_is_skipped(run_cli, small):
    tmp = small["tmp"]
    shoot = tmp / "shoot"
    shoot.mkdir()
    (shoot / "p.png").write_bytes(encode(small["rgb"], "PNG"))
    for _ in range(2):
        rc, out, err = run_cli("-c", small["cfg"], "process", shoot, "-o", shoot / "cutouts")
        assert rc == 0, err
        assert out.startswith("1 files:")
    assert sorted(str(p.relative_to(shoot)) for p in shoot.rglob("*") if p.is_file()) == \
        ["cutouts/p.png.png", "p.png"]


def test_symlinks_in_a_folder_are_not_followed(run_cli, small):
    tmp = small["tmp"]
    (tmp / "links").mkdir()
    (tmp / "links" / "l.png").symlink_to(small["src"])
    rc, out, _ = run_cli("-c", small["cfg"], "process", tmp / "links", "-o", tmp / "lo",
                         "--no-cache")
    assert rc == 0 and out.startswith("0 files:")


# ------------------------------------------------- render == rembg, every option


class FixedMaskSession:
    """A stand-in rembg session that returns a given mask."""

    def __init__(self, mask: np.ndarray):
        self.mask = mask

    def predict(self, img, *args, **kwargs):
        return [Image.fromarray(self.mask, "L")]


OPTION_SETS = {
    "default": OutputOptions(),
    "only_mask": OutputOptions(only_mask=True),
    "post_process": OutputOptions(post_process_mask=True),
    "post_only_mask": OutputOptions(post_process_mask=True, only_mask=True),
    "bgcolor": OutputOptions(bgcolor=(10, 200, 30, 255)),
    "bgcolor_translucent": OutputOptions(bgcolor=(0, 0, 0, 128), post_process_mask=True),
    "matting": OutputOptions(alpha_matting=AlphaMatting(True, 240, 10, 5)),
    "matting_bg": OutputOptions(alpha_matting=AlphaMatting(True, 230, 20, 3),
                                bgcolor=(255, 255, 255, 255)),
}


@pytest.fixture(scope="module")
def real_mask(shared_engines):
    rgb = np.ascontiguousarray(photo("chelsea")[::3, ::3])
    return rgb, shared_engines.mask("u2netp").predict(rgb)


@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_render_is_rembgs_cutout(real_mask, name):
    from rembg import remove

    rgb, mask = real_mask
    o = OPTION_SETS[name]
    expected = remove(Image.fromarray(rgb), session=FixedMaskSession(mask), only_mask=o.only_mask,
                      post_process_mask=o.post_process_mask, bgcolor=o.bgcolor,
                      alpha_matting=o.alpha_matting.enabled,
                      alpha_matting_foreground_threshold=o.alpha_matting.foreground_threshold,
                      alpha_matting_background_threshold=o.alpha_matting.background_threshold,
                      alpha_matting_erode_size=o.alpha_matting.erode_size)
    got = render_png(rgb, mask, o)
    assert got.mode == expected.mode
    if o.only_mask or o.bgcolor is not None or o.alpha_matting.enabled:  # rembg's own code
        assert np.array_equal(np.asarray(got), np.asarray(expected))
    else:  # the same alpha; the source's own colours where rembg darkens them by the alpha
        assert np.array_equal(np.asarray(got)[..., 3], np.asarray(expected)[..., 3])
        assert np.array_equal(np.asarray(got)[..., :3], cut_from(rgb, np.asarray(got)[..., 3]))


def render_png(rgb: np.ndarray, mask: np.ndarray, o: OutputOptions) -> Image.Image:
    """What the pipeline writes for the legacy PNG, given the model's raw mask."""
    from rembg.bg import post_process

    from daemon.imaging.decode import Decoded
    from daemon.imaging.keys import targets
    from daemon.imaging.render import render_target

    if o.post_process_mask:  # done on the mask before it is cached
        mask = np.ascontiguousarray(post_process(mask), dtype=np.uint8)
    (target,) = targets("mask-key", o, ())
    img = Image.open(io.BytesIO(render_target(target, Decoded(rgb=rgb, format="PNG"), mask)))
    img.load()
    return img


@pytest.mark.parametrize("fill", [0, 255, 128])
def test_render_degenerate_trimap_falls_back_like_rembg(fill):
    """A mask with no sure foreground (or background): rembg falls back, so must we."""
    from rembg import remove

    rgb = np.ascontiguousarray(photo("coffee")[::8, ::8])
    mask = np.full(rgb.shape[:2], fill, np.uint8)
    mask[:, : mask.shape[1] // 3] //= 2
    o = OutputOptions(alpha_matting=AlphaMatting(True, 240, 10, 10))
    expected = remove(Image.fromarray(rgb), session=FixedMaskSession(mask), alpha_matting=True)
    assert np.array_equal(np.asarray(render_png(rgb, mask, o)), np.asarray(expected))
