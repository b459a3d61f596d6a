"""`python -m dds ...` is the `dds` command (so `accelerate launch -m dds edit ...` works)."""

import sys

from dds.cli import main

if __name__ == "__main__":
    sys.exit(main())
