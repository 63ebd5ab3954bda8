"""The store: the one data layer. Every file under a store root is written, listed and read here."""

from pipeline.store.errors import repair_command
from pipeline.store.store import Store, StoreError
from pipeline.store.writer import StoreWriter

__all__ = ["Store", "StoreError", "StoreWriter", "repair_command"]
