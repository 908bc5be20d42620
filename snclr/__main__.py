"""``python -m snclr``: the same command as the installed ``snclr`` script."""

import sys

from snclr.training import main

sys.exit(main())
