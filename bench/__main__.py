"""``python -m bench [--quick]``: see ``bench.run``."""

import sys

from .run import main

sys.exit(main())
