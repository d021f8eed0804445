"""``python -m rulewright.service``: same as ``rulewright-engine``."""

import sys

from rulewright.service.cli import main

sys.exit(main())
