"""``python -m pixel_sail_ros.bench`` = ``pixel-sail-bench``."""

import sys

from . import main

sys.exit(main())
