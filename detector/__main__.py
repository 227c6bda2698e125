"""`python -m detector ...` is the `detector` command (torchrun launches the ranks of a DDP run this way)."""

import sys

from detector.cli import main

sys.exit(main())
