"""1 MP near hits, drop to output in a warm `rembgd run`, with `refine: none` and `edges`.

Both modes alternate in one run (two rounds of 7 near hits each), so the difference is
what refinement adds to the daemon's latency. Prints the per-drop times and the medians.
Reproduce: `.venv/bin/python bench/near_refine.py`.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import camera  # noqa: E402


def main() -> int:
    plain_config = camera.config
    times: dict[str, list[float]] = {"none": [], "edges": []}
    original = camera.camera_jpeg(401, (1200, 900))  # the camera bench's 1 MP near-hit image
    for _ in range(2):
        for mode in times:
            camera.config = lambda d, _mode=mode, **kw: plain_config(
                d, output={"refine": _mode}, **kw)
            run = camera.near_hits(f"refine-{mode}", original, 7)
            times[mode] += run["near_ms"]
            print(mode, [round(ms) for ms in run["near_ms"]], run["tiers"], flush=True)
    for mode, ms in times.items():
        print(f"refine: {mode}: median {statistics.median(ms):.0f} ms over {len(ms)} near hits")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
