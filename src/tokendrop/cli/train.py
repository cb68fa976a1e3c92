"""`tokendrop train`: train the default model (small stock LLaVA-NeXT) on synthetic VQA data.

The flags are defined here; the recipe they configure lives outside the library, in the
repository's ``recipes/default_model`` (not installed with the wheel, ``recipes.default_model.cli``
runs it), so this command runs from a clone (``pip install -e .``). The recipe and the exact command
used for the shipped model are in docs/training_recipe.md.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

_RECIPE = "recipes.default_model"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train the default model on a synthetic dataset (tokendrop data)")
    p.add_argument("--data", required=True, help="training dataset folder (from `tokendrop data`)")
    p.add_argument("--out", required=True, help="output model folder (save_pretrained: model + processor)")
    p.add_argument("--val", help="validation dataset folder: accuracy is reported after training")
    p.add_argument("--val-n", type=int, default=200, help="validation questions to evaluate (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage1-steps", type=int, default=850, help="stage-1 (vision tower) steps")
    p.add_argument("--stage2-steps", type=int, default=2650, help="stage-2 (VLM) steps")
    p.add_argument("--batch", type=int, default=8, help="stage-2 batch size (images)")
    p.add_argument("--bucket", type=int, default=1,
                   help="stage-2 batches per length-sorted pool: batches of similar image-token counts pad less "
                        "(default %(default)s: plain shuffled batches)")
    p.add_argument("--lr", type=float, default=1e-3, help="stage-2 peak learning rate")
    p.add_argument("--minutes", type=float, help="wall-clock budget: run both stages by time, not step counts")
    p.add_argument("--threads", type=int, default=2, help="torch threads (use 1 when another job shares the cores)")
    p.add_argument("--tiny", action="store_true", help="a very small model (smoke tests)")
    p.add_argument("--fp16", action="store_true", help="store the weights in fp16 (load with dtype=torch.float32)")
    p.add_argument("--pdrop", action="store_true", help="train stage 2 with PyramidDrop (td.PyramidDrop()) patched in")
    p.add_argument("--ground-weight", type=float, default=1.0,
                   help="stage-2 grounding loss weight: an LM attention head must look at what each question is about "
                        "(default %(default)s; 0: off)")
    p.add_argument("--tally-weight", type=float, default=1.0,
                   help="stage-2 tally loss weight: another head's attention on itself must be 1/(n+1) for n objects "
                        "matching the question (default %(default)s; 0: off)")
    p.add_argument("--match-init", type=float, default=0.0,
                   help="start the grounded and tally heads as word matchers: a question word and an image token "
                        "showing it score this logit (default %(default)s: random start)")
    p.add_argument("--centre-weight", type=float, default=0.0,
                   help="stage-1 loss weight: the tower marks the patch holding each object's centre "
                        "(default %(default)s; 0: off)")
    p.add_argument("--tally-mark", choices=("objects", "centres"), default="objects",
                   help="image tokens of the matching objects the tally loss puts n/(n+1) on: all their patches or "
                        "each object's centre patches (needs a stage 1 with --centre-weight > 0) (default %(default)s)")
    p.add_argument("--tally-balance", action="store_true",
                   help="weigh every count n equally in the tally loss (n >= 2 is rare in the data)")
    p.add_argument("--drop-share", type=float, default=None,
                   help="share of stage-2 steps whose images go through HiRED / RandomDrop / SpatialDrop "
                        "(equally likely) at a budget in [0.1, 0.5] (default 0.3, 0 with --pdrop; 0: all tokens)")
    p.add_argument("--rope-theta", type=float, default=10000.0,
                   help="RoPE base of the language model (default %(default)s, Llama's)")
    p.add_argument("--stage1-checkpoint", help="file: load stage 1 from it when it exists, else save stage 1 there")


def recipe_module(name: str = ""):
    """Import ``recipes.default_model`` (or its submodule ``name``) from the clone this package runs from.

    The repository root is the folder holding ``src/tokendrop``; it goes on ``sys.path`` so that
    ``recipes`` imports as a package. Raises ``UsageError`` when there is no recipe there (an install
    from a wheel).
    """
    import tokendrop
    from tokendrop.cli import UsageError

    root = Path(tokendrop.__file__).resolve().parents[2]
    if not (root / "recipes" / "default_model" / "__init__.py").is_file():
        raise UsageError("`tokendrop train` runs the default model's recipe from a clone of the repository "
                         f"(recipes/default_model), not found in {root}: clone the repository and `pip install -e .`")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    module = importlib.import_module(f"{_RECIPE}.{name}" if name else _RECIPE)
    if root not in Path(module.__file__).resolve().parents:
        raise UsageError(f"`import {_RECIPE}` found {module.__file__}, not the recipe of the clone in {root}")
    return module


def run(args) -> int:
    from tokendrop.cli import UsageError

    recipe = recipe_module("cli")
    try:
        config = recipe.config_from_args(args)  # the flags' checks: ValueError naming the flag
    except ValueError as err:
        raise UsageError(str(err)) from None
    return recipe.run(args, config)
