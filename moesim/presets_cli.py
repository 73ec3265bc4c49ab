"""``moesim presets``: list or show the built-in model, cluster and hardware presets."""

from __future__ import annotations

import argparse

from moesim.errors import MoesimError
from moesim.specs import PRESET_DIR, list_presets, preset_descriptions

KINDS = ("models", "clusters", "hardware", "parallel")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list or print built-in model/cluster/hardware/parallel "
                       "presets",
                       description="List the built-in presets, or print one preset's TOML "
                       "(copy it, edit it, and pass the file's path instead of the name). "
                       "'moesim presets from-hf CONFIG.json -o MODEL.toml' writes a model "
                       "preset from a Hugging Face config.json.")
    p.add_argument("kind", nargs="?", choices=(*KINDS, "from-hf"),
                   help="which presets to list, or from-hf")
    p.add_argument("name", nargs="?", help="print this preset's file (from-hf: the config.json "
                   "or its folder)")
    p.add_argument("-o", "--output", help="from-hf: the model TOML to write")
    p.add_argument("--seq-len", type=int, default=None,
                   help="from-hf: training sequence length (default: 4096, noted in the file)")
    p.add_argument("--tokens-per-rank", type=int, default=None,
                   help="from-hf: tokens per rank per micro-batch (default: the sequence length)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.kind == "from-hf":
        return _from_hf(args)
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


def _from_hf(args: argparse.Namespace) -> int:
    from moesim.presets_hf import write_preset

    if not args.name or not args.output:
        raise MoesimError("usage: moesim presets from-hf CONFIG.json -o MODEL.toml")
    out = write_preset(args.name, args.output, seq_len=args.seq_len,
                       tokens_per_rank=args.tokens_per_rank)
    print(f"wrote {out}: use it as --model {out}")
    return 0
