"""``rembgd process``: the daemon's pipeline over given files and folders, once."""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import structlog
from tqdm import tqdm

from daemon.config import Config, OutputOptions
from daemon.fsutil import output_name
from daemon.pipeline import Job, Pipeline, Result
from daemon.scan import is_ignored

TIER_ORDER = ("exact", "pixel", "near", "miss", "failed")
log = structlog.get_logger("rembgd.oneshot")


def plan(paths: list[Path], out_dir: Path, options: OutputOptions,
         ignore: tuple[str, ...]) -> list[Job]:
    """One job per file; folders are walked and their subfolders mirrored.

    The output folder is skipped when it lies inside a given folder, so that a
    second run does not process the first run's cutouts.
    """
    jobs: list[Job] = []
    out_abs = Path(out_dir).absolute()
    for given in paths:
        given = Path(given)
        if given.is_dir() and not given.is_symlink():
            for src in sorted(given.rglob("*")):
                rel = src.relative_to(given)
                if any(is_ignored(part, ignore) for part in rel.parts):
                    continue
                if src.absolute() == out_abs or out_abs in src.absolute().parents:
                    continue
                if src.is_file() and not src.is_symlink():
                    jobs.append(Job(src, rel, out_dir / output_name(rel), options))
        else:
            rel = Path(given.name)
            jobs.append(Job(given, rel, out_dir / output_name(rel), options))
    return jobs


def run(cfg: Config, pipeline: Pipeline, paths: list[Path], out_dir: Path,
        options: OutputOptions) -> int:
    jobs = plan(paths, out_dir, options, cfg.ignore)
    counts: Counter[str] = Counter()
    failures: list[Result] = []
    claimed: dict[Path, Path] = {}  # output -> source: two inputs named alike must not clobber
    bar = tqdm(total=len(jobs), unit="img", disable=not sys.stderr.isatty(), file=sys.stderr)
    for job in jobs:
        first = claimed.setdefault(job.out.absolute(), job.src)
        if first.absolute() != job.src.absolute():
            res = Result(job, "failed", 0.0, reason="collision",
                         error=f"output {job.out} is already written for {first}; "
                               "process one of them separately or pass their common folder")
            log.warning("processed", path=str(job.src), outcome="failed", ms=0.0,
                        model=job.options.model, error=res.error)
        else:
            res = pipeline.handle(job)
        if res.outcome == "retry":
            res = pipeline.handle(job)  # one more try for a transient error, then report
        outcome = "failed" if res.outcome == "retry" else res.outcome
        counts[outcome] += 1
        if outcome == "failed":
            failures.append(res)
        bar.set_postfix({k: counts[k] for k in TIER_ORDER if counts[k]}, refresh=False)
        bar.update(1)
    bar.close()
    if pipeline.store is not None:
        pipeline.store.flush()
    for res in failures:
        print(f"failed: {res.job.src}: {res.error}", file=sys.stderr)
    summary = ", ".join(f"{k} {counts[k]}" for k in TIER_ORDER)
    print(f"{len(jobs)} files: {summary}")
    return 1 if failures else 0
