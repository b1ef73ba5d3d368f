"""``python -m abm.viz``: see ``abm.viz.server``."""

import sys

from abm.viz.server import main

sys.exit(main())
