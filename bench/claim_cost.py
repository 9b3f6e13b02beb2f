"""What a source's claim costs now that it always takes a claim file (issue 28, case 5).

Claims and releases N names, interleaving the two ways in rounds so that the
machine's noise falls on both alike: the flock alone (a SQLite daemon before),
and the flock plus the claim file in the outbox's claims folder (now). Prints
the median per claim+release of each and their ratio.

    PYTHONPATH=$PWD python bench/claim_cost.py [--n 2000] [--rounds 5] [--dir /tmp/x]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from daemon.coord.claims import claim
from daemon.coord.leases import Leases, try_lease
from daemon.coord.locks import FlockLocks


def flock_alone(locks: FlockLocks, names: list[str], _claims: Path) -> None:
    for name in names:
        Leases(try_lease(locks, name, 60.0)).release()


def flock_and_file(locks: FlockLocks, names: list[str], claims: Path) -> None:
    for name in names:
        claim(locks, claims, name, 60.0).release()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None, help="where the outbox goes (a share)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        locks = FlockLocks(Path(tmp) / "cache" / "locks")
        claims = Path(tmp) / "outbox" / ".rembgd-claims"
        claims.parent.mkdir()
        names = [f"claim:inbox/shoot/{i:05d}.jpg" for i in range(args.n)]
        times: dict[str, list[float]] = {"flock alone": [], "flock + claim file": []}
        for _ in range(args.rounds):
            for label, way in (("flock alone", flock_alone),
                               ("flock + claim file", flock_and_file)):
                t0 = time.perf_counter()
                way(locks, names, claims)
                times[label].append((time.perf_counter() - t0) / args.n * 1e6)
    med = {k: statistics.median(v) for k, v in times.items()}
    for label, us in med.items():
        print(f"{label:20s} {us:8.1f} us per claim+release (median of {args.rounds} rounds "
              f"of {args.n})")
    print(f"ratio {med['flock + claim file'] / med['flock alone']:.2f}")


if __name__ == "__main__":
    main()
