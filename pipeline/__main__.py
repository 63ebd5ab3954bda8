"""``python -m pipeline COMMAND ...``: the same as the ``vit-atlas`` script."""

from pipeline.cli import script

script()
