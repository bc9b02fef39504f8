"""``python -m agi_bridge``: the same as the ``agi-bridge`` command."""

import sys

from agi_bridge.cli import main

sys.exit(main())
