"""``python -m pipeline COMMAND ...``: the same as the ``vit-atlas`` script."""

import sys

from pipeline.cli import main

sys.exit(main())
