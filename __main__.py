"""`python -m slimfx ...` is the `slimfx` command."""

import sys

from slimfx.compiler.cli import main

sys.exit(main())
