"""Where a whole `rembgd process` run spends its samples, by stage, from py-spy's raw output.

    py-spy record --threads -f raw -r 100 -o spy.txt -- python -m daemon -c cfg process SRC -o OUT
    .venv/bin/python bench/spy_stages.py spy.txt [--rate 100]

Each sampled stack is charged to the innermost stage function on it (``STAGES``,
innermost wins: the embedder inside the cache lookup counts as the embedder), or to
"start-up / other" when it is on no job thread. Prints samples and seconds (samples /
rate) per stage, summed over the Python threads (ORT's own pool thread is not a Python
thread and is not sampled).
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import Counter

STAGES = (  # (label, frame text), innermost match wins
    ("ORT mask run", "U2netSession.predict (daemon/inference/engine.py"),
    ("model input resize + maths", "u2net_input ("),
    ("embedder", "Embedder.embed ("),
    ("mask back to working size", "fit_mask ("),
    ("cache put_mask", "MaskCache.put_mask ("),
    ("cache lookup", "MaskCache.lookup ("),
    ("cache commit (outputs)", "MaskCache.commit ("),
    ("cache stored_outputs", "MaskCache.stored_outputs ("),
    ("fingerprint", "fingerprint (daemon/imaging/fingerprint.py"),
    ("decode", "decode (daemon/imaging/decode.py"),
    ("render targets (refine, despill, encode)", "Pipeline._render_matte ("),
    ("stamp", "stamp_files ("),
    ("sha256 of bytes", "sha256_bytes ("),
    ("write outputs", "atomic_write_under ("),
    ("read source", "read_regular_file ("),
    ("job other", "_process (daemon/job.py"),
)
SUBSTAGES = (  # reported inside render targets
    ("refine", "refine (daemon/imaging/refine.py"),
    ("despill / matte colours", "Matte.colours ("),
    ("alpha (full size)", "Matte.alpha ("),
    ("encode PNG", "encode_png ("),
)
_LINE = re.compile(r"^(.*) (\d+)$")
# with --native, a thread blocked on a lock is sampled as if it ran: charged apart
_WAIT = re.compile(r"(acquire_lock|pthread_cond_(timed)?wait|sem_wait|sem_timedwait)[^;]*(;[^;]*){0,3}$")


def stage_of(stack: str, table) -> str | None:
    best, pos = None, -1
    for label, needle in table:
        at = stack.rfind(needle)
        if at > pos:
            best, pos = label, at
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("raw")
    ap.add_argument("--rate", type=float, default=100.0)
    args = ap.parse_args()
    stages: Counter[str] = Counter()
    subs: Counter[str] = Counter()
    total = 0
    with open(args.raw) as fh:
        for line in fh:
            m = _LINE.match(line.rstrip("\n"))
            if not m:
                continue
            stack, n = m.group(1), int(m.group(2))
            total += n
            label = "waiting (locks)" if _WAIT.search(stack) else \
                stage_of(stack, STAGES) or "start-up / other"
            stages[label] += n
            if label.startswith("render targets"):
                subs[stage_of(stack, SUBSTAGES) or "other"] += n
    print(f"{total} samples = {total / args.rate:.2f} thread-s at {args.rate:g} Hz")
    for label, n in stages.most_common():
        print(f"  {label:42s} {n:6d}  {n / args.rate:6.2f} s  {100 * n / total:5.1f} %")
        if label.startswith("render targets"):
            for sub, k in subs.most_common():
                print(f"      {sub:38s} {k:6d}  {k / args.rate:6.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
