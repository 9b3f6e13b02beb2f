"""config.yaml validation: every error names the key path and the file."""
from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from daemon import config as C
from daemon.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _write(folder: Path, data) -> Path:
    path = folder / "studio.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


@pytest.fixture
def tree(tmp_path) -> Path:
    for d in ("in", "in2", "in/sub"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    return tmp_path


def base() -> dict:
    return {"watch": [{"inbox": "in", "outbox": "out"}], "models": {"dir": "models"},
            "cache": {"dir": "cache"}}


def _error(folder: Path, data, **kw) -> str:
    path = _write(folder, data)
    with pytest.raises(ConfigError) as info:
        C.load(path, **kw)
    message = str(info.value)
    assert str(path.resolve()) in message or str(path) in message, message
    assert "\n" not in message, message
    return message


# -------------------------------------------------------------- the shipped file


def test_default_config_yaml_loads():
    cfg = C.load(ROOT / "config.yaml", check_folders=False)
    assert cfg.source == (ROOT / "config.yaml").resolve()
    (pair,) = cfg.watch
    assert pair.inbox == ROOT / "var" / "inbox"
    assert pair.outbox == ROOT / "var" / "outbox"
    assert cfg.cache.dir == ROOT / "var" / "cache"
    assert cfg.models_dir == ROOT / "var" / "models"
    opts = cfg.output_defaults
    assert opts.model == "u2netp"  # the offline model, never bria-rmbg
    assert opts.png_compression == 1
    assert not opts.only_mask and not opts.alpha_matting.enabled and opts.bgcolor is None
    assert cfg.threads == 0 and cfg.max_image_pixels == 100_000_000
    assert cfg.store.backend == "sqlite" and cfg.log_format == "auto"


def test_default_config_passes_folder_checks_when_inbox_exists(tmp_path):
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    (tmp_path / "var" / "inbox").mkdir(parents=True)
    cfg = C.load(tmp_path / "config.yaml")
    assert cfg.watch[0].inbox == tmp_path / "var" / "inbox"
    assert cfg.watch[0].failed_dir == tmp_path / "var" / "failed"
    assert cfg.watch[0].done_dir == tmp_path / "var" / "done"


def test_default_config_every_key_is_known():
    """Every key written in config.yaml is parsed (the loader rejects unknown ones)."""
    data = yaml.safe_load((ROOT / "config.yaml").read_text())
    C.parse(data, ROOT / "config.yaml", check_folders=False)


# ---------------------------------------------------------- the error messages


def _set(data: dict, dotted: str, value) -> dict:
    data = copy.deepcopy(data)
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        if part.startswith("watch["):
            node = node["watch"][int(part[6:-1])]
        else:
            node = node.setdefault(part, {})
    node[parts[-1]] = value
    return data


BAD = [
    # (dotted key to set, value, key path expected in the message, words expected)
    ("colour", "red", "colour", "unknown key"),
    ("cache.limts", {"max_bytes": 1}, "cache.limts", "did you mean 'limits'"),
    ("cache.limits.max_byte", 1, "cache.limits.max_byte", "unknown key"),
    ("output.alpha_matting.enable", True, "output.alpha_matting.enable", "did you mean 'enabled'"),
    ("watch[0].inbx", "x", "watch[0].inbx", "unknown key"),
    ("watch[0].options.modle", "u2net", "watch[0].options.modle", "did you mean 'model'"),
    ("workers", "two", "workers", "expected int, got str"),
    ("workers", True, "workers", "expected int, got bool"),
    ("workers", 2.5, "workers", "expected int, got float"),
    ("workers", 0, "workers", "must be >= 1"),
    ("settle_s", "1s", "settle_s", "expected float"),
    ("output.only_mask", "yes", "output.only_mask", "expected bool"),
    ("output.png_compression", 12, "output.png_compression", "must be <= 9"),
    ("output.bgcolor", [255, 255, 255], "output.bgcolor", "four integers"),
    ("output.bgcolor", "white", "output.bgcolor", "expected list"),
    ("output.alpha_matting.erode_size", -1, "output.alpha_matting.erode_size", ">= 0"),
    ("output.alpha_matting", True, "output.alpha_matting", "must be a mapping"),
    ("models.dir", 5, "models.dir", "expected str"),
    ("cache.match.phash_radius", 40, "cache.match.phash_radius", "must be <= 15"),
    ("observer", "fsevents", "observer", "must be one of auto, inotify, polling"),
    ("cache.limits.policy", "fifo", "cache.limits.policy", "must be one of lru, lfu"),
    ("store.backend", "postgres", "store.backend", "must be one of sqlite, redis"),
    ("logging.format", "xml", "logging.format", "must be one of auto, json, text"),
    ("watch[0].after_success", "archive", "watch[0].after_success", "keep, move, delete"),
    ("umask", "999", "umask", "octal"),
    ("ignore", [1, 2], "ignore", "glob"),
    ("watch", {"inbox": "in"}, "watch", "must be a list"),
]


@pytest.mark.parametrize("dotted,value,key,words", BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_bad_value_names_key_and_file(tree, dotted, value, key, words):
    message = _error(tree, _set(base(), dotted, value), check_folders=False)
    assert f": {key}: " in message, message
    assert words in message, message


def test_not_a_mapping(tree):
    assert "must be a mapping" in _error(tree, "- just\n- a list\n", check_folders=False)


def test_invalid_yaml_is_one_line_with_position(tree):
    message = _error(tree, "watch: [\n  {inbox: in\n", check_folders=False)
    assert "invalid YAML at line" in message


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        C.load(tmp_path / "missing.yaml")


# ----------------------------------------------------------------- the folders


def test_missing_inbox_folder(tree):
    message = _error(tree, _set(base(), "watch[0].inbox", "nowhere"))
    assert ": watch[0].inbox: " in message and "does not exist" in message
    assert str(tree / "nowhere") in message


def test_inbox_that_is_a_file(tree):
    (tree / "file").write_text("x")
    assert "is not a folder" in _error(tree, _set(base(), "watch[0].inbox", "file"))


def test_missing_inbox_key(tree):
    data = {"watch": [{"outbox": "out"}]}
    assert ": watch[0].inbox: is required" in _error(tree, data)


def test_no_pair_at_all_for_the_service(tree):
    assert ": watch: at least one" in _error(tree, {"models": {"dir": "m"}})
    C.load(_write(tree, {"models": {"dir": "m"}}), check_folders=False)  # fine for `process`


@pytest.mark.parametrize("key,value", [
    ("outbox", "in/out"), ("outbox", "in"), ("failed_dir", "in/failed"),
    ("done_dir", "in/sub/done"), ("outbox", "."), ("failed_dir", ".")])
def test_output_folders_inside_or_around_inbox(tree, key, value):
    message = _error(tree, _set(base(), f"watch[0].{key}", value))
    assert f": watch[0].{key}: " in message, message
    assert "inbox" in message


def test_cache_inside_inbox(tree):
    message = _error(tree, _set(base(), "cache.dir", "in/.cache"))
    assert "watch[0].inbox" in message and "cache.dir" in message


@pytest.mark.parametrize("second", ["in/sub", "in", "."])
def test_overlapping_inboxes(tree, second):
    data = base()
    data["watch"].append({"inbox": second, "outbox": "out2"})
    message = _error(tree, data)
    assert ": watch[1]." in message and "overlaps" in message or "inside" in message, message


def test_outbox_of_one_pair_in_inbox_of_another(tree):
    """Pair 1 writing into pair 0's inbox would feed its own outputs back (either order)."""
    data = base()
    data["watch"].append({"inbox": "in2", "outbox": "in/from-pair-1"})
    message = _error(tree, data)
    assert ": watch[1].outbox: " in message and "watch[0].inbox" in message
    data = base()
    data["watch"][0]["outbox"] = "in2/out"
    data["watch"].append({"inbox": "in2", "outbox": "out2"})
    message = _error(tree, data)
    assert ": watch[0].outbox: " in message and "watch[1].inbox" in message


def test_failed_dir_of_one_pair_in_inbox_of_another(tree):
    data = base()
    data["watch"].append({"inbox": "in2", "outbox": "out2", "failed_dir": "in/failed"})
    assert ": watch[1].failed_dir: " in _error(tree, data)


def test_two_pairs_one_outbox(tree):
    data = base()
    data["watch"].append({"inbox": "in2", "outbox": "out"})
    assert ": watch[1].outbox: " in _error(tree, data)


def test_two_good_pairs(tree):
    data = base()
    data["watch"].append({"inbox": "in2", "outbox": "out2", "failed_dir": "failed2",
                          "done_dir": "done2"})
    cfg = C.load(_write(tree, data))
    assert [p.inbox for p in cfg.watch] == [tree / "in", tree / "in2"]


# ------------------------------------------------------- paths and overrides


def test_relative_paths_resolve_against_the_config_folder(tree, monkeypatch):
    elsewhere = tree / "in" / "sub"
    monkeypatch.chdir(elsewhere)  # not the config's folder
    cfg = C.load(_write(tree, {**base(), "state_file": "run/status.json"}))
    pair = cfg.watch[0]
    assert pair.inbox == tree / "in" and pair.outbox == tree / "out"
    assert cfg.cache.dir == tree / "cache" and cfg.models_dir == tree / "models"
    assert cfg.state_file == tree / "run" / "status.json"
    assert C.state_path(cfg) == tree / "run" / "status.json"


def test_absolute_and_home_paths(tree, monkeypatch):
    monkeypatch.setenv("HOME", str(tree))
    data = _set(base(), "watch[0].inbox", str(tree / "in"))
    data["models"]["dir"] = "~/models"
    cfg = C.load(_write(tree / "in2", data))
    assert cfg.watch[0].inbox == tree / "in"
    assert cfg.watch[0].outbox == tree / "in2" / "out"  # relative: beside the config file
    assert cfg.models_dir == tree / "models"


def test_per_pair_options_override_output(tree):
    data = base()
    data["output"] = {"model": "u2netp", "only_mask": True, "png_compression": 3,
                      "bgcolor": [0, 0, 0, 255],
                      "alpha_matting": {"enabled": True, "erode_size": 5}}
    data["watch"].append({"inbox": "in2", "outbox": "out2", "failed_dir": "f2", "done_dir": "d2",
                          "options": {"png_compression": 9, "only_mask": False,
                                      "alpha_matting": {"foreground_threshold": 200}}})
    cfg = C.load(_write(tree, data))
    first, second = (p.options for p in cfg.watch)
    assert first.only_mask and first.png_compression == 3 and first.bgcolor == (0, 0, 0, 255)
    assert first.alpha_matting == C.AlphaMatting(True, 240, 10, 5)
    # overridden keys change, the rest is inherited from `output:`
    assert not second.only_mask and second.png_compression == 9
    assert second.bgcolor == (0, 0, 0, 255) and second.model == "u2netp"
    assert second.alpha_matting == C.AlphaMatting(True, 200, 10, 5)
    assert cfg.output_defaults == first


def test_defaults_without_output_section(tree):
    cfg = C.load(_write(tree, base()))
    assert cfg.watch[0].options == C.OutputOptions()
    assert cfg.watch[0].failed_dir == tree / "failed" and cfg.watch[0].done_dir == tree / "done"


def test_int_accepted_for_float_and_null_means_default(tree):
    cfg = C.load(_write(tree, {**base(), "settle_s": 2, "output": None, "cache": {"dir": "c",
                                                                                  "prune": None}}))
    assert cfg.settle_s == 2.0 and isinstance(cfg.settle_s, float)
    assert cfg.output_defaults == C.OutputOptions()


def test_umask_octal_string(tree):
    assert C.load(_write(tree, {**base(), "umask": "027"})).umask == 0o027


# ------------------------------------------------------------------------ CLI


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "daemon", *map(str, args)], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


@pytest.mark.parametrize("command", [["process", "x.jpg", "-o", "out"], ["run"],
                                     ["models", "check"]])
def test_cli_exits_2_with_one_line(tree, command):
    path = _write(tree, _set(base(), "cache.limts", {}))
    proc = _cli("-c", path, *command)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("rembgd: config error: ")
    assert str(path) in lines[0] and "cache.limts" in lines[0]
    assert "Traceback" not in proc.stderr


def test_cli_run_checks_folders(tree):
    path = _write(tree, _set(base(), "watch[0].outbox", "in/out"))
    proc = _cli("-c", path, "run", "--once")
    assert proc.returncode == 2
    assert "watch[0].outbox" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_cli_missing_config_file(tmp_path):
    proc = _cli("-c", tmp_path / "nope.yaml", "models", "check")
    assert proc.returncode == 2 and "cannot read config" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_output_section_is_what_process_uses(tree):
    """`output:` is the default for `rembgd process`, even with no pairs or a pair override."""
    data = {"output": {"only_mask": True, "png_compression": 4}, "models": {"dir": "m"}}
    cfg = C.load(_write(tree, data), check_folders=False)
    assert cfg.output_defaults.only_mask and cfg.output_defaults.png_compression == 4
    data["watch"] = [{"inbox": "in", "outbox": "out", "options": {"png_compression": 9}}]
    cfg = C.load(_write(tree, data))
    assert cfg.watch[0].options.png_compression == 9
    assert cfg.output_defaults.png_compression == 4 and cfg.output_defaults.only_mask


# ------------------------------------------------------------ outputs: deliverables


def _with_outputs(*outputs, where: str = "pair") -> dict:
    data = base()
    if where == "pair":
        data["watch"][0]["outputs"] = list(outputs)
    else:
        data["outputs"] = list(outputs)
    return data


MASTER = {"name": "master", "format": "png"}
BAD_OUTPUTS = [
    # (the second output, key path expected, words expected)
    ({"name": "x", "format": "gif"}, "watch[0].outputs[1].format", "must be one of png, tiff"),
    ({"name": "x", "canvas": {"fill": 1.2}}, "watch[0].outputs[1].canvas.fill", "must be <= 1.0"),
    ({"name": "x", "canvas": {"fill": 0}}, "watch[0].outputs[1].canvas.fill", "must be >= 0.05"),
    ({"name": "MASTER"}, "watch[0].outputs[1].name", "is also watch[0].outputs[0].name"),
    ({"name": "a/b"}, "watch[0].outputs[1].name", "folder name"),
    ({"name": ".hidden"}, "watch[0].outputs[1].name", "not starting with '.'"),
    ({"name": ".."}, "watch[0].outputs[1].name", "folder name"),
    ({"name": "web."}, "watch[0].outputs[1].name", "ending with '.'"),
    ({"name": "nul"}, "watch[0].outputs[1].name", "reserved device name"),
    ({"name": ""}, "watch[0].outputs[1].name", "folder name"),
    ({"format": "png"}, "watch[0].outputs[1].name", "is required"),
    ({"name": 7}, "watch[0].outputs[1].name", "expected str"),
    ({"name": "x", "format": "jpeg", "background": "transparent"},
     "watch[0].outputs[1].background", "jpeg cannot be transparent"),
    ({"name": "x", "background": "#fff"}, "watch[0].outputs[1].background", "#rrggbb"),
    ({"name": "x", "background": [255, 255, 256]}, "watch[0].outputs[1].background", "0-255"),
    ({"name": "x", "background": [255, 255, 255, 255]}, "watch[0].outputs[1].background",
     "[r, g, b]"),
    ({"name": "x", "crop": "subject", "margin": "5"}, "watch[0].outputs[1].margin", "\"40px\""),
    ({"name": "x", "crop": "subject", "margin": "-5%"}, "watch[0].outputs[1].margin", "\"4%\""),
    ({"name": "x", "crop": "subject", "margin": "150%"}, "watch[0].outputs[1].margin",
     "at most 100%"),
    ({"name": "x", "crop": "subject", "margin": -3}, "watch[0].outputs[1].margin", "pixels"),
    ({"name": "x", "margin": "5%"}, "watch[0].outputs[1].margin", "only with crop: subject"),
    ({"name": "x", "crop": "box"}, "watch[0].outputs[1].crop", "must be one of none, subject"),
    ({"name": "x", "canvas": {"aspect": "square"}}, "watch[0].outputs[1].canvas.aspect", "ratio"),
    ({"name": "x", "canvas": {"aspect": "0:1"}}, "watch[0].outputs[1].canvas.aspect", "ratio"),
    ({"name": "x", "canvas": {"aspect": "101:1"}}, "watch[0].outputs[1].canvas.aspect", "1-100 each side"),
    ({"name": "x", "canvas": {"aspect": 4}}, "watch[0].outputs[1].canvas.aspect", "ratio"),
    ({"name": "x", "canvas": {"aspect": "1:1", "long_edge": 8}},
     "watch[0].outputs[1].canvas.long_edge", "must be >= 16"),
    ({"name": "x", "canvas": {"fil": 0.8}}, "watch[0].outputs[1].canvas.fil", "did you mean 'fill'"),
    ({"name": "x", "canvas": "1:1"}, "watch[0].outputs[1].canvas", "must be a mapping"),
    ({"name": "x", "quality": 101, "format": "jpeg"}, "watch[0].outputs[1].quality", "<= 100"),
    ({"name": "x", "quality": 80}, "watch[0].outputs[1].quality", "jpeg and webp only, not png"),
    ({"name": "x", "format": "jpeg", "compression": 6}, "watch[0].outputs[1].compression",
     "png and tiff only"),
    ({"name": "x", "format": "png", "lossless": True}, "watch[0].outputs[1].lossless",
     "webp only"),
    ({"name": "x", "max_size": 8}, "watch[0].outputs[1].max_size", "must be >= 16"),
    ({"name": "x", "colour": "cmyk"}, "watch[0].outputs[1].colour", "keep, srgb"),
    ({"name": "x", "metadata": "some"}, "watch[0].outputs[1].metadata", "keep, strip"),
    ({"name": "x", "formt": "png"}, "watch[0].outputs[1].formt", "did you mean 'format'"),
    ("jpeg", "watch[0].outputs[1]", "must be a mapping"),
]


@pytest.mark.parametrize("second,key,words", BAD_OUTPUTS,
                         ids=[f"{b[1].rsplit('.', 1)[-1]}={b[0]!r}" for b in BAD_OUTPUTS])
def test_bad_output_names_key_and_file(tree, second, key, words):
    message = _error(tree, _with_outputs(MASTER, second), check_folders=False)
    assert f": {key}: " in message, message
    assert words in message, message


@pytest.mark.parametrize("value,words", [([], "non-empty list"), ({"name": "x"}, "non-empty list"),
                                         ("png", "non-empty list")])
def test_outputs_must_be_a_list(tree, value, words):
    data = base()
    data["outputs"] = value
    message = _error(tree, data, check_folders=False)
    assert ": outputs: " in message and words in message, message


def test_top_level_output_errors_name_the_top_level_key(tree):
    message = _error(tree, _with_outputs(MASTER, {"name": "x", "canvas": {"fill": 2}},
                                         where="top"), check_folders=False)
    assert ": outputs[1].canvas.fill: " in message, message


def test_valid_outputs_parse_to_deliverables(tree):
    text = """
outputs:
  - {name: master, format: tiff, compression: 0}
  - name: marketplace
    format: jpg
    quality: 92
    background: "#ffffff"
    crop: subject
    margin: 5%
    canvas: {aspect: 4:5, long_edge: 2000, fill: 0.85}
    colour: srgb
  - {name: web, format: WEBP, background: [255, 255, 255], max_size: 1200, metadata: strip}
  - {name: framed, crop: subject, margin: 40px, background: white}
  - {name: edge, crop: subject, margin: 12.5}
watch:
  - {inbox: in, outbox: out}
  - {inbox: in2, outbox: out2, outputs: [{name: only, format: png}]}
"""
    cfg = C.load(_write(tree, text))
    master, market, web, framed, edge = cfg.watch[0].outputs
    assert master == C.Deliverable(name="master", format="tiff", compression=0)
    assert market == C.Deliverable(
        name="marketplace", format="jpeg", quality=92, background=(255, 255, 255),
        crop="subject", margin=5.0, margin_unit="%", colour="srgb",
        canvas=C.Canvas(aspect=(4, 5), long_edge=2000, fill=0.85))
    assert market.ext == ".jpg" and market.flattened == (255, 255, 255)
    assert (web.format, web.background, web.max_size, web.metadata) == \
        ("webp", (255, 255, 255), 1200, "strip")
    assert (framed.margin, framed.margin_unit, framed.background) == (40.0, "px", (255, 255, 255))
    assert (edge.margin, edge.margin_unit) == (12.5, "px")
    assert master.flattened is None and master.ext == ".tif"
    # the top-level list is every pair's default and `rembgd process`'s; a pair's own replaces it
    assert cfg.outputs == cfg.watch[0].outputs
    assert cfg.watch[1].outputs == (C.Deliverable(name="only"),)


def test_jpeg_is_white_by_default_and_canvas_defaults(tree):
    cfg = C.load(_write(tree, _with_outputs({"name": "j", "format": "jpeg", "canvas": {}})))
    (j,) = cfg.watch[0].outputs
    assert j.background is None and j.flattened == (255, 255, 255)
    assert j.canvas == C.Canvas() == C.Canvas(aspect=(1, 1), long_edge=2000, fill=0.85)


def test_no_outputs_is_the_legacy_png(tree):
    cfg = C.load(_write(tree, base()))
    assert cfg.watch[0].outputs == () and cfg.outputs == ()


@pytest.mark.parametrize("where,option,value,key", [
    ("output", "bgcolor", [255, 255, 255, 255], "output.bgcolor"),
    ("output", "only_mask", True, "output.only_mask"),
    ("output", "alpha_matting", {"enabled": True}, "output.alpha_matting.enabled"),
    ("pair", "bgcolor", [0, 0, 0, 255], "watch[0].options.bgcolor"),
    ("pair", "alpha_matting", {"enabled": True}, "watch[0].options.alpha_matting.enabled"),
])
def test_legacy_png_options_that_deliverables_ignore_are_errors(tree, where, option, value, key):
    data = _with_outputs(MASTER)
    if where == "output":
        data["output"] = {option: value}
    else:
        data["watch"][0]["options"] = {option: value}
    message = _error(tree, data, check_folders=False)
    assert f": {key}: has no effect on the deliverables of watch[0].outputs" in message, message


def test_legacy_png_options_stay_fine_for_a_pair_without_outputs(tree):
    data = base()
    data["output"] = {"bgcolor": [255, 255, 255, 255]}
    data["watch"].append({"inbox": "in2", "outbox": "out2", "failed_dir": "f2",
                          "done_dir": "d2", "options": {"bgcolor": None},
                          "outputs": [MASTER]})
    message = _error(tree, data)  # pair 1 inherits bgcolor from output:, which it ignores
    assert ": output.bgcolor: " in message and "watch[1].outputs" in message, message
    data["watch"].pop()
    assert C.load(_write(tree, data)).watch[0].options.bgcolor == (255, 255, 255, 255)


def test_default_config_outputs_example_parses():
    """The commented `outputs:` example in config.yaml, uncommented, is valid and says what
    the README promises: marketplace JPEG on white, square, fill 0.85, sRGB; a web WebP."""
    lines, inside = [], False
    for line in (ROOT / "config.yaml").read_text().splitlines():
        inside = line.startswith("# outputs:") or inside and line.startswith("#   ")
        lines.append(line[2:] if inside else line)
    cfg = C.parse(yaml.safe_load("\n".join(lines)), ROOT / "config.yaml", check_folders=False)
    by_name = {d.name: d for d in cfg.outputs}
    assert set(by_name) == {"master", "marketplace", "web"}
    market, web = by_name["marketplace"], by_name["web"]
    assert market.format == "jpeg" and market.flattened == (255, 255, 255)
    assert market.crop == "subject" and market.colour == "srgb"
    assert market.canvas == C.Canvas(aspect=(1, 1), long_edge=2000, fill=0.85)
    assert web.format == "webp" and web.max_size == 1200
    assert by_name["master"].format in ("png", "tiff") and by_name["master"].background is None


def test_readme_deliverables_example_parses():
    """The README's `outputs:` example is a valid config (docs never drift from the loader)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Deliverables"):]
    block = section[section.index("```yaml") + len("```yaml"):]
    block = block[:block.index("```")]
    cfg = C.parse(yaml.safe_load(block), ROOT / "README.md", check_folders=False)
    assert [d.format for d in cfg.outputs] == ["tiff", "jpeg", "webp"]
    market = cfg.outputs[1]
    assert (market.margin, market.margin_unit, market.flattened) == (2.0, "%", (255, 255, 255))
    assert market.canvas == C.Canvas(aspect=(1, 1), long_edge=2000, fill=0.85)


# ------------------------------------------------------- issue 28: the web token rule


def test_web_token_rule_is_stated_once_and_every_accepted_token_works(tree):
    """A token the config accepts must work as a bearer and through the login form (whose
    body is capped): too long or non-ASCII is refused here, naming the key and the rule."""
    from urllib.parse import urlencode

    from daemon.config.schema import TOKEN_MAX, TOKEN_MIN, TOKEN_RULE
    from daemon.web.auth import Gate
    from daemon.web.server import MAX_FORM

    def with_token(token):
        return {**base(), "web": {"listen": "0.0.0.0:8765", "token": token}}

    for bad, why in (("x" * (TOKEN_MIN - 1), f"it has {TOKEN_MIN - 1} characters"),
                     ("y" * 20_000, "it has 20000 characters"),
                     ("sécret-token-1234567890", "'é'"),
                     ("token with spaces 1234", "' '")):
        message = _error(tree, with_token(bad))
        assert "web.token" in message and TOKEN_RULE in message and why in message, message
    printable = "".join(chr(c) for c in range(0x21, 0x7F))
    worst = ("%&+=#" * TOKEN_MAX)[:TOKEN_MAX - len(printable)] + printable
    for token in ("z" * TOKEN_MIN, worst):
        cfg = C.load(_write(tree, with_token(token)))
        gate = Gate(cfg.web)
        assert gate.bearer_ok(f"Bearer {token}")
        assert gate.login(token) is not None
        assert len(urlencode({"token": token}).encode()) <= MAX_FORM  # the form takes it


def test_a_pair_is_named_by_its_name_else_its_inbox(tree):
    """Issue 26.2: the pair's stable key, whatever its place in the list."""
    data = base()
    data["watch"].append({"inbox": "in2", "outbox": "out2", "name": "studio-2.web_a"})
    pairs = C.load(_write(tree, data)).watch
    assert [p.key for p in pairs] == [str((tree / "in").resolve()), "studio-2.web_a"]


@pytest.mark.parametrize("name, words", [
    ("a/b", "must be 1-64 letters"), ("../x", "must be 1-64 letters"), ("x.", "must be 1-64"),
    ("", "must be 1-64"), ("é", "must be 1-64"), ("a" * 65, "must be 1-64"),
    (3, "expected str")])
def test_a_bad_pair_name_is_named(tree, name, words):
    data = base()
    data["watch"][0]["name"] = name
    message = _error(tree, data)
    assert ": watch[0].name: " in message and words in message, message


def test_two_pairs_one_name(tree):
    data = base()
    data["watch"][0]["name"] = "studio"
    data["watch"].append({"inbox": "in2", "outbox": "out2", "name": "studio"})
    message = _error(tree, data)
    assert ": watch[1].name: " in message and "also the name of watch[0]" in message, message
