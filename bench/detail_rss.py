"""Peak RSS and wall of one cold 24 MP miss: `rembgd process` with the detail stage and
despill on (the default) and off, side by side (and `rembg p` with ``--rembg``: it needs
rembg's CLI extras, or ``REMBG_CLI`` naming a `rembg` that has them; bench/camera.py).

    PYTHONPATH=. .venv/bin/python bench/detail_rss.py     # prints a markdown table

Files: bench/camera.py's studio composite (a photo on a backdrop, grain sigma 4) and
bench/detailscenes.py's white-sweep bag with its thin structures, both 6000 x 4000 JPEG
q90. Each file is its own folder; the three commands run in rotating order, ``--runs``
times; peak RSS is psutil's, sampled every 0.05 s over the process tree (bench/camera.py).
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
from pathlib import Path

from PIL import Image

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import camera  # noqa: E402
import detailscenes as ds  # noqa: E402

OUT = BENCH / "out" / "detail_rss"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--rembg", action="store_true", help="also `rembg p` (rembg[cli])")
    args = ap.parse_args(argv)
    files = {"composite": lambda: camera.camera_jpeg(7, (6000, 4000)),
             "bag with detail": lambda: _jpeg(ds.scene("white", 5).rgb)}
    rows = []
    for name, make in files.items():
        src = OUT / name.replace(" ", "_") / "in"
        src.mkdir(parents=True, exist_ok=True)
        (src / "photo.jpg").write_bytes(make())
        on = camera.config(OUT / name.replace(" ", "_") / "on")
        off = camera.config(OUT / name.replace(" ", "_") / "off",
                            output={"detail": False, "despill": False})
        cmds = [("rembgd, detail + despill on", lambda: _fresh(on, src)),
                ("rembgd, both off", lambda: _fresh(off, src))]
        if args.rembg:
            cmds.append(("rembg p", lambda: camera.rembg_p(src, OUT / "r")))
        runs = {label: [] for label, _ in cmds}
        for i in range(args.runs):
            for label, run in cmds[i % len(cmds):] + cmds[:i % len(cmds)]:
                res = run()
                runs[label].append(res)
                camera.log(f"{name}: {label}: {res['wall_s']:.1f} s, "
                           f"{res['peak_rss'] / 2**20:.0f} MB")
        rows.append((name, runs))
    print("| file | command | wall s (median) | peak RSS MB (max) |")
    print("|---|---|---:|---:|")
    for name, runs in rows:
        for label, res in runs.items():
            print(f"| {name} | {label} | {statistics.median(r['wall_s'] for r in res):.1f} | "
                  f"{max(r['peak_rss'] for r in res) / 2**20:.0f} |")
    return 0


def _fresh(cfg: Path, src: Path) -> dict:
    import shutil

    shutil.rmtree(cfg.parent / "cache", ignore_errors=True)  # a miss every time
    return camera.rembgd_process(cfg, src, cfg.parent / "outbox")


def _jpeg(rgb) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    return buf.getvalue()


if __name__ == "__main__":
    sys.exit(main())
