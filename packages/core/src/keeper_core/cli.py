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


class KeeperParser(argparse.ArgumentParser):
    """An ArgumentParser whose trailing words (``key=value`` overrides) may also follow flags.

    argparse fills a ``nargs="*"`` positional from the first run of bare words only, so in
    ``keeper export MODEL --output x merge=false`` the ``merge=false`` would be "unrecognized".
    A parser whose one positional is ``nargs="*"`` (every keeper command's overrides) takes such
    later bare words too, in order; an unknown ``--flag`` is still refused. Subparsers inherit the
    class (``add_subparsers``' default ``parser_class`` is the parent's).
    """

    def parse_known_args(  # type: ignore[override]  # argparse's overloads, as one
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        positionals = self._get_positional_actions()
        if extras and len(positionals) == 1 and positionals[0].nargs == argparse.ZERO_OR_MORE:
            dest, flag = positionals[0].dest, tuple(self.prefix_chars)
            bare = [w for w in extras if not w.startswith(flag)]
            if bare:
                setattr(parsed, dest, [*(getattr(parsed, dest, None) or []), *bare])
                extras = [w for w in extras if w.startswith(flag)]
        return parsed, extras


def build_parser() -> argparse.ArgumentParser:
    parser = KeeperParser(prog="keeper", description="Find the keepers in large image collections.")
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


def _size(text: str) -> tuple[int, int]:
    """``--size``: synthetic's own parser, imported only when the flag is given (numpy, PIL)."""
    from keeper_core.synthetic import parse_size

    return parse_size(text)


def _photo(name: str) -> str:
    """``--photos``: one of synthetic's ``PHOTOS``, or ``all`` (a choice checked lazily, so that
    building the parser does not import numpy and PIL)."""
    from keeper_core.synthetic import PHOTOS

    if name not in (*PHOTOS, "all"):
        raise argparse.ArgumentTypeError(
            f"invalid choice: {name!r} (choose from all, {', '.join(PHOTOS)})"
        )
    return name


def add_corpus_parser(subparsers: Any) -> None:  # argparse._SubParsersAction is private
    """``keeper corpus``: the best-of-series benchmark corpus generator (keeper_core.synthetic).

    Flags not given are not passed on: synthetic's own defaults apply.
    """
    p = subparsers.add_parser("corpus", help="generate a best-of-series benchmark corpus")
    p.add_argument("--out", required=True, help="output folder (images and manifest.csv)")
    p.add_argument("--series", type=int, help="number of series (default 150)")
    p.add_argument("--seed", type=int, help="corpus seed (default 0)")
    p.add_argument(
        "--size", type=_size, metavar="WxH", help="WIDTHxHEIGHT of every shot (default 320x240)"
    )
    p.add_argument(
        "--photos",
        nargs="+",
        type=_photo,
        metavar="PHOTO",
        help="base photo names (scikit-image's: astronaut, chelsea, ...), or 'all' (default: the "
        "six colour photos)",
    )

    def run(args: argparse.Namespace) -> int:
        from keeper_core import synthetic

        kwargs: dict[str, Any] = {"n_series": 150 if args.series is None else args.series}
        if args.seed is not None:
            kwargs["seed"] = args.seed
        if args.size is not None:
            kwargs["image_size"] = args.size
        if args.photos:
            kwargs["photos"] = synthetic.PHOTOS if "all" in args.photos else args.photos
        print(synthetic.generate_corpus(args.out, **kwargs))
        return 0

    p.set_defaults(func=run)


if __name__ == "__main__":
    sys.exit(main())
