"""List the graph passes, in pipeline order, with their options."""

from __future__ import annotations

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from passes import format_pass_list, list_passes

    if args.json:
        print(json.dumps([dataclasses.asdict(i) for i in list_passes()], indent=2, default=str))
    else:
        print(format_pass_list())
    return 0
