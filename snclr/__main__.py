"""``python -m snclr``: the same command as the installed ``snclr`` script."""

import sys

from snclr.training.cli import main

sys.exit(main())
