"""``python -m qscope_plugin.cli``: what ``torchrun -m qscope_plugin.cli footprints ...`` launches per rank."""

import sys

from qscope_plugin.cli import main

sys.exit(main())
