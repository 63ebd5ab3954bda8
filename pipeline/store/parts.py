"""Tables of analysis results beside a store: one Parquet part per finished unit of work.

Analysis jobs (dataset examples, probes) write under the store root, next to the
visualizations, as ``ROOT/<table>/part-<unit id>.parquet``. A part appears
complete or not at all (the store's publish: hidden temporary, fsync, rename),
so the part ids present are exactly the units done, and a re-run skips them.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.store.store import Store

PREFIX, SUFFIX = "part-", ".parquet"


class PartTable:
    def __init__(self, store: Store, table: str, schema: pa.Schema):
        self.store = store
        self.schema = schema
        self.path = f"{store.paths.root}/{table}"

    def done(self) -> set[str]:
        """Ids of the parts already written."""
        selector = pafs.FileSelector(self.path, recursive=False, allow_not_found=True)
        names = (info.base_name for info in self.store.filesystem.get_file_info(selector)
                 if info.type == pafs.FileType.File)
        return {name[len(PREFIX):-len(SUFFIX)] for name in names if name.startswith(PREFIX) and name.endswith(SUFFIX)}

    def write(self, part_id: str, table: pa.Table) -> None:
        table = table.select(self.schema.names).cast(self.schema)
        self.store._publish(f"{self.path}/{PREFIX}{part_id}{SUFFIX}", lambda out: pq.write_table(table, out))

    def read(self, part_ids: set[str] | None = None) -> pa.Table:
        """The parts named (all when None) as one table."""
        ids = self.done() if part_ids is None else self.done() & set(part_ids)
        if not ids:
            return self.schema.empty_table()
        files = [f"{self.path}/{PREFIX}{i}{SUFFIX}" for i in sorted(ids)]
        return ds.dataset(files, schema=self.schema, format="parquet", filesystem=self.store.filesystem).to_table()

    def delete(self, part_ids: set[str]) -> None:
        for part_id in part_ids:
            self.store.filesystem.delete_file(f"{self.path}/{PREFIX}{part_id}{SUFFIX}")
