"""``rembgd models install | check | list``: provision, verify and show the model files."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from daemon.inference import registry
from daemon.inference.models import (
    EMBEDDER_NAME, ModelError, checked_embedder, checked_mask_model, embedder_path,
    file_digests, mask_model_path, read_record, verify, verify_embedder)


def add_parser(subparsers) -> argparse.ArgumentParser:
    models = subparsers.add_parser("models", help="provision, check or list model files (offline)")
    msub = models.add_subparsers(dest="models_command", required=True)

    inst = msub.add_parser("install", help="install models from the package index or a file")
    inst.add_argument("--model", action="append",
                      help="model name, repeatable (default: those in the config)")
    inst.add_argument("--force", action="store_true", help="re-install even if present and valid")
    inst.add_argument("--from", dest="source", type=Path, metavar="FILE",
                      help="install one model (--model NAME) from this .onnx file")
    inst.add_argument("--allow-download", action="store_true",
                      help="let rembg download a model that no registry package ships")
    inst.add_argument("--accept-licence", action="store_true",
                      help="acknowledge a non-commercial licence (bria-rmbg)")
    inst.add_argument("--quantize", choices=sorted(registry.QUANT_SUFFIX),
                      help="install the quantised variant of each --model (u2net -> u2net-int8), "
                           "made here from the fp32 file and kept only if it passes its quality gate")

    chk = msub.add_parser("check", help="verify the installed models")
    chk.add_argument("--model", action="append", help="model name (default: those in the config)")

    lst = msub.add_parser("list", help="installed models: size, checksum, licence, source")
    lst.add_argument("--all", action="store_true", help="also list known models not installed")
    lst.add_argument("--json", action="store_true")

    for p in (inst, chk, lst):
        p.add_argument("-c", "--config", dest="config_sub", help=argparse.SUPPRESS)
    return models


def _wanted(args, cfg) -> list[str]:
    return args.model or sorted({p.options.model for p in cfg.watch} | {cfg.output_defaults.model})


def run(args: argparse.Namespace, cfg) -> int:
    if args.models_command == "install":
        return _install(args, cfg)
    if args.models_command == "list":
        return _list(args, cfg)
    for name in _wanted(args, cfg):
        m = checked_mask_model(cfg.models_dir, name)
        print(f"{m.name}: ok ({m.path}, md5 {m.md5})")
    e = checked_embedder(cfg.models_dir)
    print(f"{e.name}: ok ({e.path}, md5 {e.md5})")
    return 0


def _install(args, cfg) -> int:
    from daemon.inference.install import install

    if args.source is not None and not args.model:
        raise ModelError("--from needs --model NAME: which model is this file?")
    wanted = _wanted(args, cfg)
    if args.quantize:
        if args.source is not None:
            raise ModelError("--quantize makes its model from the fp32 one: drop --from")
        try:
            wanted = [registry.quantised_name(name, args.quantize) for name in wanted]
        except registry.UnknownModel as exc:
            raise ModelError(str(exc)) from None
    install(cfg.models_dir, wanted, force=args.force, source=args.source,
            allow_download=args.allow_download, accept_licence=args.accept_licence,
            log=lambda msg: print(msg, flush=True))
    return 0


def _row(name: str, path: Path, spec) -> dict:
    row = {"model": name, "file": str(path), "installed": path.is_file(),
           "licence": spec.licence if spec else "Apache-2.0",
           "provisioning": spec.provisioning if spec else "converted from its pip package"}
    if not path.is_file():
        row["install"] = spec.fix() if spec else "rembgd models install"
        return row
    d = file_digests(path)
    row.update(size=d.size, md5=d.md5, sha256=d.sha256)
    try:
        rec = verify_embedder(path)[1] if spec is None else verify(path, name, spec)[1]
        row["status"] = "ok"
    except ModelError as exc:
        rec = read_record(path, name)
        row["status"] = f"invalid: {exc}"
    if rec is not None:
        row.update(source=rec.source, source_kind=rec.source_kind, installed_at=rec.installed_at,
                   warnings=rec.warnings)
    else:
        row.update(source="no install record (a known file)", source_kind="unrecorded")
    return row


def _list(args, cfg) -> int:
    rows = [_row(s.name, mask_model_path(cfg.models_dir, s.name), s)
            for s in registry.local_specs()]
    rows.append(_row(EMBEDDER_NAME, embedder_path(cfg.models_dir), None))
    if not args.all:
        rows = [r for r in rows if r["installed"]]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no models installed in {cfg.models_dir}; run `rembgd models install`")
    for r in rows:
        if not r["installed"]:
            print(f"{r['model']}: not installed ({r['provisioning']}; `{r['install']}`)")
            print(f"    licence: {r['licence']}")
            continue
        print(f"{r['model']}: {r['status']}  {r['size'] / 1e6:.1f} MB  md5 {r['md5']}")
        print(f"    sha256:  {r['sha256']}")
        print(f"    licence: {r['licence']}")
        when = f", {r['installed_at']}" if r.get("installed_at") else ""
        print(f"    source:  {r['source']} ({r['source_kind']}{when})")
        for w in r.get("warnings") or []:
            print(f"    warning: {w}")
    return 0
