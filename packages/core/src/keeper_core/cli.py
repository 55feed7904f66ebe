"""The one ``keeper`` command. Each installed package adds its own subcommands.

A package contributes commands through the ``keeper.commands`` entry-point group; each entry
point names a function ``add_parser(subparsers) -> None`` that adds one subparser and sets
``func`` (a callable taking the parsed namespace and returning an exit code). So the CLI never
makes keeper_train import keeper_serve, or the reverse, and a machine with only keeper-serve
installed still has ``keeper serve``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any

from keeper_core.errors import KeeperError

GROUP = "keeper.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keeper", description="Find the keepers in large image collections."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        ep.load()(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except KeeperError as e:
        print(f"keeper {args.command}: error: {e}", file=sys.stderr)
        return 2


def add_corpus_parser(subparsers: Any) -> None:  # argparse._SubParsersAction is private
    """``keeper corpus``: the best-of-series benchmark corpus generator (keeper_core.synthetic).

    Flags not given are not passed on: synthetic's own defaults apply.
    """
    p = subparsers.add_parser("corpus", help="generate a best-of-series benchmark corpus")
    p.add_argument("--out", required=True, help="output folder (images and manifest.csv)")
    p.add_argument("--series", type=int, help="number of series (default 150)")
    p.add_argument("--seed", type=int, help="corpus seed (default 0)")
    p.add_argument("--size", help="WIDTHxHEIGHT of every shot (default 320x240)")
    p.add_argument(
        "--photos", nargs="+", help="base photo names, or 'all' (default: the six colour photos)"
    )

    def run(args: argparse.Namespace) -> int:
        from keeper_core import synthetic

        argv = ["--out", args.out, "--series", str(150 if args.series is None else args.series)]
        for flag, value in (("--seed", args.seed), ("--size", args.size)):
            argv += [flag, str(value)] if value is not None else []
        argv += ["--photos", *args.photos] if args.photos else []
        return synthetic.main(argv)

    p.set_defaults(func=run)


if __name__ == "__main__":
    sys.exit(main())
