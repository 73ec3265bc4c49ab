"""``moesim policies``: list the registered placement policies, their knobs, defaults and the
values each knob accepts (``--json`` for scripts)."""

from __future__ import annotations

import argparse
import json
import textwrap

from moesim.errors import MoesimError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policies", help="list placement policies with their knobs",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="List every registered policy with a one-line description "
                       "and each knob's default and valid values; with NAME, also what each "
                       "knob does. Knobs are set with --knob NAME=VALUE on simulate, run, "
                       "validate and in search specs.")
    p.add_argument("name", nargs="?", help="show one policy in full")
    p.add_argument("--json", action="store_true", help="write the listing as JSON on stdout")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from moesim.policies.base import available_policies
    from moesim.policies.catalog import catalog, describe_policy, format_catalog

    if args.name and args.name not in available_policies():
        raise MoesimError(f"unknown policy {args.name!r}; choose one of "
                          f"{', '.join(available_policies())}")
    entries = [describe_policy(args.name)] if args.name else catalog()
    if args.json:
        print(json.dumps(entries[0] if args.name else entries, indent=2))
        return 0
    print(format_catalog(entries))
    if args.name:
        print()
        for knob in entries[0]["knobs"]:
            text = knob["description"] or "(not described in the Config docstring)"
            print(textwrap.fill(f"{knob['name']}: {text}", width=96, subsequent_indent="    "))
    return 0
