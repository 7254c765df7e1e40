"""``python -m maskedssl`` = the ``maskedssl`` command (also what torchrun launches: ``-m maskedssl``)."""

import sys

from .cli import main

sys.exit(main())
