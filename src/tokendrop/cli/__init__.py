"""`tokendrop` command line: a thin dispatcher.

Each subcommand lives in its own module of this package and exposes two functions:
``add_parser(subparsers)`` registers its arguments and ``run(args) -> int`` does the work (the
logic lives in the library; `train` only points to the recipe's own command, `python -m recipes.default_model
train`, run from a clone). Subcommand modules import torch and transformers inside `run`, so
`tokendrop --help`, `env` and `methods` answer at once.

Errors: a user's mistake (a bad flag value, a model that cannot be loaded, an unreadable image) is a
`UsageError`: one line naming the flag, exit code 2. Anything else is a bug: its traceback, a line
asking to report it with `tokendrop env`, exit code 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

# Subcommand name -> module.
SUBCOMMANDS = {
    "run": "tokendrop.cli.run",
    "methods": "tokendrop.cli.methods",
    "cost": "tokendrop.cli.cost",
    "bench": "tokendrop.cli.bench",
    "data": "tokendrop.cli.data",
    "eval": "tokendrop.cli.eval",
    "show": "tokendrop.cli.show",
    "train": "tokendrop.cli.train",
    "env": "tokendrop.cli.env",
    "serve": "tokendrop.cli.serve",
    "serve-bench": "tokendrop.cli.serve_bench",
}


class UsageError(Exception):
    """A user's mistake, found by a subcommand: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokendrop", description="Visual token dropping for HF vision-language models.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
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
    except UsageError as err:
        print(f"tokendrop {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tokendrop {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(f"tokendrop {args.command}: internal error (the traceback above is tokendrop's bug, not your input). "
              "Please report it with the command, the traceback and the output of `tokendrop env`.", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
