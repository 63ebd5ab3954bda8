"""Part tables: the results of analysis jobs beside a store's records, one Parquet part per unit of work."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.store.errors import StoreError
from pipeline.store.schemas import TableSpec

if TYPE_CHECKING:
    from pipeline.store.store import Store


class PartTable:
    """Results of an analysis job beside the records: one Parquet part per finished unit of work.

    ``<root>/<table>/part-<part id>.parquet``: a part is published complete or not at all
    (the store's publish), and part ids are the units' deterministic ids, so the ids present
    are exactly the units done, a re-run skips them, and a unit published twice (a retry, a
    second driver) overwrites itself with the same rows rather than duplicating them.
    """

    PREFIX, SUFFIX = "part-", ".parquet"

    def __init__(self, store: Store, spec: TableSpec):
        self.store = store
        self.spec = spec
        self.path = f"{store.paths.root}/{spec.name}"

    @property
    def location(self) -> str:
        return self.store._uri_prefix + self.path

    def done(self) -> set[str]:
        """Ids of the parts already written."""
        ids = (_part_id(info.base_name) for info in self.store._list(self.path, False))
        return {part_id for part_id in ids if part_id}

    def write(self, part_id: str, table: pa.Table) -> None:
        table = table.select(self.spec.schema.names).cast(self.spec.schema)
        self.store._publish(self._file(part_id), lambda out: self.store._write_parquet(table, out))

    def dataset(self, part_ids: set[str] | None = None) -> ds.Dataset:
        """The parts named (all when None) as one dataset of the table's schema.

        Parts are read as the table's schema (an int32 column written as int64 reads fine);
        a part that lacks a column or holds another kind of value is named in the error.
        """
        ids = self.done() if part_ids is None else self.done() & set(part_ids)
        files = [self._file(part_id) for part_id in sorted(ids)]
        dataset = ds.dataset(files, schema=self.spec.schema, format=self.store._parquet_format,
                             filesystem=self.store.filesystem)
        for fragment in dataset.get_fragments():
            if fragment.path in self.store._checked_parts:
                continue
            found = fragment.physical_schema
            wrong = [f"{field.name} ({field.type})" for field in self.spec.schema
                     if field.name not in found.names or not _castable(found.field(field.name).type, field.type)]
            if wrong:
                raise StoreError(
                    f"The {self.spec.name} part {fragment.path} lacks or mistypes {', '.join(wrong)} (it has "
                    f"{', '.join(f'{f.name}: {f.type}' for f in found) or 'no columns'}). Parts under "
                    f"{self.location} must be written by vit-atlas; move this file out of the store."
                )
            self.store._checked_parts.add(fragment.path)
        return dataset

    def read(self, part_ids: set[str] | None = None, columns: list[str] | None = None,
             filter: ds.Expression | None = None) -> pa.Table:
        return self.dataset(part_ids).to_table(columns=columns, filter=filter)

    def delete(self, part_ids: set[str]) -> None:
        for part_id in part_ids:
            self.store._delete_if_present(self._file(part_id))

    def _file(self, part_id: str) -> str:
        return f"{self.path}/{self.PREFIX}{part_id}{self.SUFFIX}"




def _part_id(name: str) -> str | None:
    prefix, suffix = PartTable.PREFIX, PartTable.SUFFIX
    return name[len(prefix):-len(suffix)] if name.startswith(prefix) and name.endswith(suffix) else None


def _castable(actual: pa.DataType, wanted: pa.DataType) -> bool:
    """Whether a part's column reads as the table's type: the same kind of value, any width."""
    kinds = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_timestamp)
    for kind in kinds:
        if kind(wanted):
            return kind(actual) or (pa.types.is_floating(wanted) and pa.types.is_integer(actual))
    if pa.types.is_list(wanted):
        return (pa.types.is_list(actual) or pa.types.is_large_list(actual)) and _castable(actual.value_type,
                                                                                             wanted.value_type)
    if pa.types.is_binary(wanted):
        return pa.types.is_binary(actual) or pa.types.is_large_binary(actual)
    if pa.types.is_string(wanted):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    return actual.equals(wanted)
