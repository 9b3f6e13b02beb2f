"""``rembgd process``: the daemon's jobs over given files and folders, once."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog
from tqdm import tqdm

from daemon import job as jobmod
from daemon.budget import PixelBudget
from daemon.cache.base import Tier
from daemon.config import AlphaMatting, Config, OutputOptions
from daemon.config.schema import REFINES
from daemon.fate import Kind
from daemon.pipeline import Pipeline, Plan
from daemon.scan import is_ignored
from daemon.source import Source

TIER_ORDER = (*Tier, Kind.FAILED)
log = structlog.get_logger("rembgd.process")


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _color(text: str) -> tuple[int, int, int, int]:
    parts = [int(p) for p in text.split(",")]
    if len(parts) == 3:
        parts.append(255)
    if len(parts) != 4 or not all(0 <= p <= 255 for p in parts):
        raise argparse.ArgumentTypeError("expected R,G,B or R,G,B,A with values 0-255")
    return tuple(parts)  # type: ignore[return-value]


def add_parser(sub) -> None:
    proc = sub.add_parser("process", help="remove backgrounds from files or folders, once")
    proc.add_argument("-c", "--config", dest="config_sub", help=argparse.SUPPRESS)
    proc.add_argument("paths", nargs="+", type=Path)
    proc.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    proc.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    g = proc.add_argument_group("output options (override config)")
    g.add_argument("-m", "--model", help="rembg model name (default from config: u2netp)")
    g.add_argument("--only-mask", type=_bool, metavar="BOOL")
    g.add_argument("--post-process-mask", type=_bool, metavar="BOOL")
    g.add_argument("--alpha-matting", type=_bool, metavar="BOOL")
    g.add_argument("--alpha-matting-foreground-threshold", type=int, metavar="N")
    g.add_argument("--alpha-matting-background-threshold", type=int, metavar="N")
    g.add_argument("--alpha-matting-erode-size", type=int, metavar="N")
    g.add_argument("--bgcolor", type=_color, metavar="R,G,B[,A]")
    g.add_argument("--png-compression", type=int, choices=range(10), metavar="0-9")
    g.add_argument("--refine", choices=REFINES, help="edge refinement (default from config: "
                   "edges)")


def _given(value, default):
    return default if value is None else value


def options_from(args: argparse.Namespace, base: OutputOptions) -> OutputOptions:
    am = base.alpha_matting
    matting = AlphaMatting(
        enabled=am.enabled if args.alpha_matting is None else args.alpha_matting,
        foreground_threshold=_given(args.alpha_matting_foreground_threshold, am.foreground_threshold),
        background_threshold=_given(args.alpha_matting_background_threshold, am.background_threshold),
        erode_size=_given(args.alpha_matting_erode_size, am.erode_size),
    )
    pick = lambda name: _given(getattr(args, name), getattr(base, name))  # noqa: E731
    return dataclasses.replace(
        base, model=pick("model"), only_mask=pick("only_mask"),
        post_process_mask=pick("post_process_mask"), alpha_matting=matting,
        bgcolor=pick("bgcolor"), png_compression=pick("png_compression"),
        refine=pick("refine"))


def plan_jobs(paths: list[Path], out_dir: Path, plan: Plan,
              ignore: tuple[str, ...]) -> list[jobmod.Job]:
    """One job per file; folders are walked and their subfolders mirrored.

    The output folder is skipped when it lies inside a given folder, so that a
    second run does not process the first run's cutouts.
    """
    jobs: list[jobmod.Job] = []
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
                    jobs.append(jobmod.Job(Source(src, rel, out_dir), plan))
        else:
            jobs.append(jobmod.Job(Source(given, Path(given.name), out_dir), plan))
    return jobs


def run(args: argparse.Namespace, cfg: Config) -> int:
    """Process the given paths; prints the failures and a tier summary."""
    from daemon.inference.engine import Engines
    from daemon.service.app import make_pipeline, open_cache

    plan = Plan(options_from(args, cfg.output), cfg.outputs)
    if args.no_cache:
        cfg = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, enabled=False))
    cache = open_cache(cfg)
    pipeline = make_pipeline(cfg, Engines(cfg.models_dir, cfg.threads), cache,
                             PixelBudget(cfg.memory_budget_mp * 1e6))
    try:
        pipeline.targets(plan)  # verify the model now: a missing model fails before any file
        return _run_jobs(pipeline, plan_jobs(args.paths, args.out, plan, cfg.ignore), cfg.umask,
                         cfg.workers)
    finally:
        if cache is not None:
            cache.close()


def _run_jobs(pipeline: Pipeline, jobs: list[jobmod.Job], umask: int, workers: int) -> int:
    """``workers`` jobs at a time, like the daemon: decoding and encoding overlap with
    inference. Two inputs that would write the same output are caught before any runs."""
    counts: Counter[str] = Counter()
    failures: list[tuple[Path, str]] = []
    claimed: dict[Path, Path] = {}  # output -> source: two inputs named alike must not clobber
    runnable: list[jobmod.Job] = []
    for job in jobs:
        out = job.outputs[0].absolute()
        first = claimed.setdefault(out, job.src)
        if first.absolute() == job.src.absolute():
            runnable.append(job)
            continue
        error = (f"output {out} is already written for {first}; process one of them "
                 "separately or pass their common folder")
        log.warning("processed", path=str(job.src), outcome=Kind.FAILED, ms=0.0,
                    model=job.plan.options.model, error=error)
        counts[Kind.FAILED] += 1
        failures.append((job.src, error))
    bar = tqdm(total=len(jobs), initial=len(failures), unit="img",
               disable=not sys.stderr.isatty(), file=sys.stderr)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="job") as pool:
        for job, res in zip(runnable, pool.map(lambda j: _run_one(pipeline, j, umask),
                                               runnable)):
            outcome = Kind.FAILED if res.kind is Kind.RETRY else res.kind
            counts[outcome] += 1
            if outcome is Kind.FAILED:
                failures.append((job.src, res.error or ""))
            bar.set_postfix({k: counts[k] for k in TIER_ORDER if counts[k]}, refresh=False)
            bar.update(1)
    bar.close()
    for src, error in failures:
        print(f"failed: {src}: {error}", file=sys.stderr)
    summary = ", ".join(f"{k} {counts[k]}" for k in TIER_ORDER)
    print(f"{len(jobs)} files: {summary}")
    return 1 if failures else 0


def _run_one(pipeline: Pipeline, job: jobmod.Job, umask: int) -> jobmod.Outcome:
    res = jobmod.run(job, pipeline, umask=umask)
    if res.kind is Kind.RETRY:
        res = jobmod.run(job, pipeline, umask=umask)  # one more try, then report
    return res
