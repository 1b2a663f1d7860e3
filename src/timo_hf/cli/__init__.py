"""The `timo` command line. Each sub-command lives in its own module with `add_parser(subparsers)` and `run(args)`."""

import argparse
import sys

from . import convert, embed, export, info, predict

COMMANDS = [convert, predict, embed, export, info]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="timo", description="TiMo for satellite image time series.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers).set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (FileNotFoundError, ValueError) as error:
        print(f"timo {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
