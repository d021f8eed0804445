"""``python -m rulewright.service``: same as ``rulewright-engine``."""

import sys

from .cli import main

sys.exit(main())
