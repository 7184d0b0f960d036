"""The `clipsearch` command: `serve` and `search` here, every `python -m offline` stage beside them."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

DESCRIPTION = """\
clipsearch: search your photos by what is in them, in words or with another photo.

  clipsearch serve ~/Pictures              ingest a folder and serve the search page on 127.0.0.1:8000
  clipsearch serve --data ../shared/flickr8k   build the model on Flickr8k once, serve all of it
  clipsearch search "a dog on the beach"   answer in the terminal, from a collection, no server
  clipsearch ingest FOLDER                 add or refresh a collection (only new and changed photos)

Run `clipsearch COMMAND --help` for a command's options.
"""

OWN = ("serve", "search")


def build_parser() -> argparse.ArgumentParser:
    from offline import search_cli, serve
    from offline.cli import build_parser as offline_parser

    parser = offline_parser(prog="clipsearch")
    parser.description = DESCRIPTION
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub.metavar = "COMMAND"
    serve.add_parser(sub)
    search_cli.add_parser(sub)
    # the two commands most people want first in `--help`
    sub._choices_actions[:] = sorted(sub._choices_actions, key=lambda a: a.dest not in OWN)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    build_extra: list[str] = []
    if argv[:1] == ["serve"] and "--" in argv:  # anything after `--` goes to `offline build`
        cut = argv.index("--")
        argv, build_extra = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        from offline import serve

        args.build_extra = build_extra
        return serve.run(args)
    if args.command == "search":
        from offline import search_cli

        return search_cli.run(args)
    from offline.cli import main as offline_main

    return offline_main(argv, parser=parser)


if __name__ == "__main__":
    sys.exit(main())
