"""Part tables: the results of analysis jobs beside a store's records, one Parquet part per unit of work."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as ds

from pipeline.store.errors import StoreError
from pipeline.store.files import StoreFiles
from pipeline.store.layout import id_between
from pipeline.store.schemas import TableSpec


class PartTable:
    """Results of an analysis job beside the records: one Parquet part per finished unit of work.

    ``<root>/<table>/part-<part id>.parquet``: a part is published complete or not at all
    (``StoreFiles.publish``), and part ids are the units' deterministic ids, so the ids present
    are exactly the units done, a re-run skips them, and a unit published twice (a retry, a
    second driver) overwrites itself with the same rows rather than duplicating them.
    """

    PREFIX, SUFFIX = "part-", ".parquet"

    def __init__(self, files: StoreFiles, root: str, spec: TableSpec):
        self.files = files
        self.spec = spec
        self.path = f"{root}/{spec.name}"
        self._checked: set[str] = set()  # parts whose columns were checked

    @property
    def location(self) -> str:
        return self.files.uri(self.path)

    def done(self) -> set[str]:
        """Ids of the parts already written."""
        ids = (id_between(info.base_name, self.PREFIX, self.SUFFIX) for info in self.files.list(self.path, False))
        return {part_id for part_id in ids if part_id}

    def write(self, part_id: str, table: pa.Table) -> None:
        self.files.publish_parquet(self._file(part_id), table.select(self.spec.schema.names).cast(self.spec.schema))

    def dataset(self, part_ids: set[str] | None = None) -> ds.Dataset:
        """The parts named (all when None) as one dataset of the table's schema.

        Parts are read as the table's schema (an int32 column written as int64 reads fine; a nullable column
        added since a part was written reads as null); a part that lacks another column or holds another kind
        of value is named in the error.
        """
        ids = self.done() if part_ids is None else self.done() & set(part_ids)
        files = [self._file(part_id) for part_id in sorted(ids)]
        dataset = self.files.parquet(files, self.spec.schema)
        for fragment in dataset.get_fragments():
            if fragment.path in self._checked:
                continue
            found = fragment.physical_schema
            wrong = [f"{field.name} ({field.type})" for field in self.spec.schema
                     if (field.name not in found.names and not field.nullable)
                     or (field.name in found.names and not _castable(found.field(field.name).type, field.type))]
            if wrong:
                raise StoreError(
                    f"The {self.spec.name} part {fragment.path} lacks or mistypes {', '.join(wrong)} (it has "
                    f"{', '.join(f'{f.name}: {f.type}' for f in found) or 'no columns'}). Parts under "
                    f"{self.location} must be written by vit-atlas; move this file out of the store."
                )
            self._checked.add(fragment.path)
        return dataset

    def read(self, part_ids: set[str] | None = None, columns: list[str] | None = None,
             filter: ds.Expression | None = None) -> pa.Table:
        return self.dataset(part_ids).to_table(columns=columns, filter=filter)

    def delete(self, part_ids: set[str]) -> None:
        for part_id in part_ids:
            self.files.delete_if_present(self._file(part_id))

    def _file(self, part_id: str) -> str:
        return f"{self.path}/{self.PREFIX}{part_id}{self.SUFFIX}"


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
