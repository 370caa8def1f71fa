"""`python -m prunekit.cli ...` (used by torchrun) — same as the `prunekit` console script."""
import sys

from . import main

sys.exit(main())
