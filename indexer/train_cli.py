"""`mammals train mapper|vae --store STORE [options]`: options are generated from the models' config dataclasses,
so every default lives in one place (the dataclass) and the CLI can never drift from it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

from indexer.cli import EXIT_OK, register


def _config_classes() -> dict[str, type]:
    from indexer.models.mapper import MapperConfig
    from indexer.models.vae import VAEConfig

    return {"mapper": MapperConfig, "vae": VAEConfig}


def _add_config_options(p: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        doc = f"default {default}"
        hint = hints[f.name]
        if hint is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=doc)
        elif isinstance(default, tuple) or typing.get_origin(hint) is tuple:
            p.add_argument(flag, type=int, nargs="+", default=None, metavar="N", help=doc)
        elif hint in (int, float, str):
            p.add_argument(flag, type=hint, default=None, help=doc)
        else:  # Optional[...] and other unions: accept the text and let the dataclass validate it
            p.add_argument(flag, type=float if isinstance(default, float) else str, default=None, help=doc)


def _conf_train(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="model", required=True, metavar="MODEL")
    for name, cls in _config_classes().items():
        what = {"mapper": "identity/attribute mapper on the encoder embeddings (breed labels needed)",
                "vae": "convolutional VAE on the photos"}[name]
        sp = sub.add_parser(name, help=what, description=f"Train the {what}.")
        # -q/-v also after MODEL; SUPPRESS keeps a flag given before MODEL from being reset by this parser.
        sp.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
        sp.add_argument("--store", type=Path, required=True)
        sp.add_argument("--json", action="store_true", help="print the training report as JSON")
        if name == "vae":
            sp.add_argument("--workers", type=int, default=1, help="photo decode workers")
        _add_config_options(sp, cls)


def _config_from_args(cls: type, a: argparse.Namespace) -> Any:
    given = {f.name: getattr(a, f.name) for f in dataclasses.fields(cls) if getattr(a, f.name, None) is not None}
    for k, v in given.items():
        if isinstance(v, list):
            given[k] = tuple(v)
    return cls(**given)


def _run_train(a: argparse.Namespace) -> int:
    from indexer.training import train_store_mapper, train_store_vae

    cfg = _config_from_args(_config_classes()[a.model], a)
    if a.model == "mapper":
        out = train_store_mapper(a.store, cfg, progress=not a.quiet)
    else:
        out = train_store_vae(a.store, cfg, progress=not a.quiet, workers=a.workers)
    if a.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        print(f"trained {a.model}: {out['dir']} (sha256 {out['sha256'][:16]}…)")
        for k, v in out["report"].items():
            print(f"  {k:<32} {v:.4f}" if isinstance(v, float) else f"  {k:<32} {v}")
        for k in ("reconstructions_png", "samples_png"):
            if k in out:
                print(f"  {k:<32} {out[k]}")
        print(f"run `mammals index --store {a.store}` to compute its spaces for every image")
    return EXIT_OK


register("train", "train the mapper or the VAE on a store")(_conf_train)(_run_train)
