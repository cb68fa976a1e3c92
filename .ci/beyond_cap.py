"""Exit 0 when the transformers release given is newer than tokendrop's supported range allows (.ci/run)."""

import sys

from packaging.version import Version

import tokendrop.compat as compat  # noqa: E402  (imports transformers: the installed release is in range here)

newest = Version(sys.argv[1])
cap = Version(f"{compat.CAP[0]}.{compat.CAP[1]}")
sys.exit(0 if newest >= cap else 1)
