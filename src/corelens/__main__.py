"""``python -m corelens ...`` (and ``torchrun ... -m corelens score ...``): the command line."""

import sys

from corelens.cli import main

sys.exit(main())
