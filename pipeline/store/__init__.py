"""The store: the one data layer. Every file under a store root is written, listed and read here."""

from pipeline.store.store import Store, StoreError, StoreWriter

__all__ = ["Store", "StoreError", "StoreWriter"]
