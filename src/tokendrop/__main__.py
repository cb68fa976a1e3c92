"""`python -m tokendrop ...` (and `torchrun -m tokendrop eval ...`): the same as the `tokendrop` command."""

import sys

from tokendrop.cli import main

sys.exit(main())
