"""`tokendrop train`: a pointer to the default model's training recipe, which runs from a clone.

The recipe lives in the repository's ``recipes/default_model`` (not installed with the wheel) and owns
its command line: ``python -m recipes.default_model train --data DIR --out DIR ...`` at the repository
root (docs/training_recipe.md). The library defines none of its flags and never imports it. Whatever
its arguments, this command trains nothing: it prints that line and exits with code 2, a usage error,
so that a script written for the old command stops there instead of going on without a model.
"""

from __future__ import annotations

POINTER = ("the default model's training recipe runs from a clone of the repository: "
           "`python -m recipes.default_model train --data DIR --out DIR ...` at its root (docs/training_recipe.md)")


def add_parser(subparsers) -> None:
    # prefix_chars without "-": every word after `train`, flags included, is one of ARGS. (With "-",
    # argparse hands an unknown flag such as --data to the top parser, which refuses it before `run`.)
    # No command-line word can start with NUL, so no word is read as an option of this parser.
    p = subparsers.add_parser("train", help="moved to the repository: python -m recipes.default_model train ...",
                              description=POINTER, usage="%(prog)s [-h] [ARGS ...]", prefix_chars="\0",
                              add_help=False)
    p.add_argument("words", nargs="*", metavar="ARGS", help="any: `tokendrop train` only prints the line above")
    p.set_defaults(train_help=p.format_help)


def run(args) -> int:
    from tokendrop.cli import UsageError

    if {"-h", "--help"} & set(args.words):
        print(args.train_help(), end="")
        return 0
    raise UsageError(POINTER)
