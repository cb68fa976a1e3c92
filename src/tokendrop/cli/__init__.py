"""`tokendrop` command line: a thin dispatcher.

Each subcommand lives in its own module of this package and exposes two functions:
``add_parser(subparsers)`` registers its arguments and ``run(args) -> int`` does the work
(the logic itself lives in the library). Bad arguments exit with code 2 and a one-line
message, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand name -> module (imported lazily so `tokendrop env` stays fast).
SUBCOMMANDS = {
    "run": "tokendrop.cli.run",
    "cost": "tokendrop.cli.cost",
    "bench": "tokendrop.cli.bench",
    "data": "tokendrop.cli.data",
    "eval": "tokendrop.cli.eval",
    "train": "tokendrop.cli.train",
    "show": "tokendrop.cli.show",
    "env": "tokendrop.cli.env",
}


class UsageError(Exception):
    """Raised by a subcommand for bad arguments: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokendrop", description="Visual token dropping for HF vision-language models.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, module_name in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:  # subcommand not shipped (yet); anything else is a real error
                continue
            raise
        module.add_parser(subparsers)
        modules[name] = module
    parser.set_defaults(_modules=modules)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["run"]  # the bundled demo
    args = parser.parse_args(argv)
    module = args._modules[args.command]
    try:
        return int(module.run(args) or 0)
    except (UsageError, ValueError, TypeError, FileNotFoundError) as err:
        # Library errors name the parameter and what is allowed: show them as usage errors.
        print(f"tokendrop {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
