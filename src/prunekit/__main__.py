"""`python -m prunekit ...` — same as the `prunekit` console script (handy under torchrun)."""
import sys

from .cli import main

sys.exit(main())
