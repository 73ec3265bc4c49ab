"""``moesim presets``: list or show the built-in model, cluster and hardware presets."""

from __future__ import annotations

import argparse

from moesim.errors import MoesimError
from moesim.specs import PRESET_DIR, list_presets, preset_descriptions

KINDS = ("models", "clusters", "hardware")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list or print built-in model/cluster/hardware presets",
                       description="List the built-in presets, or print one preset's TOML "
                       "(copy it, edit it, and pass the file's path instead of the name).")
    p.add_argument("kind", nargs="?", choices=KINDS, help="which presets to list")
    p.add_argument("name", nargs="?", help="print this preset's file")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    kinds = [args.kind] if args.kind else list(KINDS)
    if args.name:
        path = PRESET_DIR / args.kind / f"{args.name}.toml"
        if not path.is_file():
            raise MoesimError(f"no {args.kind} preset {args.name!r}; choose one of "
                              f"{', '.join(list_presets(args.kind))}")
        print(path.read_text(), end="")
        return 0
    for kind in kinds:
        print(f"{kind}:")
        for name, text in preset_descriptions(kind).items():
            print(f"  {name:22s} {text}")
    return 0
