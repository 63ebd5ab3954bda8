"""What goes wrong with a store, as errors a user can act on (one paragraph each, exit status 2)."""

from pipeline.errors import PipelineError


class StoreError(PipelineError):
    """The store root cannot be used; the message says why and what to do."""


class UnknownSchemaError(StoreError):
    """A Parquet part was written with a record schema this code does not understand."""


class DamagedStoreError(StoreError):
    """A file under the store root is unreadable or disagrees with its twin; the message names it."""


def repair_command(root: str) -> str:
    """The command that verifies the store at ``root`` and repairs what it finds, as a user types it."""
    return f"vit-atlas status store.root={root} verify=true repair=true"
