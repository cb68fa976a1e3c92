"""``python -m recipes.default_model train --data DIR --out DIR [...]``, from the repository root.

The recipe's command line (``recipes.default_model.cli``); ``--help`` lists the flags and
docs/training_recipe.md the commands of every run.
"""

import sys

from recipes.default_model.cli import main

if __name__ == "__main__":
    sys.exit(main())
