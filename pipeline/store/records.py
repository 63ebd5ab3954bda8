"""Records in the form the store commits them: validated as one Arrow table, their WebDataset samples
laid out around the table's images.

Workers encode their chunk's records here (``encode_records``), so that the driver, the one writer of the
store, only drops duplicate keys, concatenates tables and joins bytes: at zoo scale hundreds of records a
second arrive at one driver, and building a row and a JSON sample per record there was what capped it. A
record that does not fit RECORD_SCHEMA fails where it was made, and its chunk is reported failed with the
reason.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass
import pyarrow as pa

from pipeline.store.schemas import KEY_PATTERN, MEASURED_COLUMNS, RECORD_SCHEMA
from pipeline.store.shards import sample_layout

# What a record must not leave null when written: the measured columns are nullable only so that v1 parts read.
_REQUIRED = {f.name for f in RECORD_SCHEMA if not f.nullable} | set(MEASURED_COLUMNS)
_NAMES = set(RECORD_SCHEMA.names)


@dataclass(frozen=True)
class EncodedRecords:
    """Validated records: ``table`` (RECORD_SCHEMA rows) and ``layout``, what their WebDataset samples hold
    besides the images, made from the table's own values (pipeline.store.shards.sample_layout): row i's
    at ``layout[offsets[i]:offsets[i + 1]]``."""

    table: pa.Table
    layout: bytes
    offsets: list[int]

    def __len__(self) -> int:
        return self.table.num_rows

    def __reduce__(self):
        # From a worker to the driver as one Arrow IPC buffer, which Ray passes out of band and the driver
        # reads without a copy: about a third less CPU on both sides than pickling the table column by column.
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, self.table.schema) as stream:
            stream.write_table(self.table)
        return _from_ipc, (sink.getvalue(), self.layout, self.offsets)

    @property
    def keys(self) -> list[str]:
        return self.table["key"].to_pylist()

    @functools.cached_property
    def nbytes(self) -> int:
        """What the records hold in memory (the table's buffers and the layout); counted once, as a writer
        asks it of every buffered batch each time one arrives."""
        return self.table.nbytes + len(self.layout)

    def take(self, rows: list[int]) -> "EncodedRecords":
        if rows == list(range(len(self))):
            return self
        layout = memoryview(self.layout)
        pieces = [layout[self.offsets[i]:self.offsets[i + 1]] for i in rows]
        offsets = [0]
        for piece in pieces:
            offsets.append(offsets[-1] + len(piece))
        return EncodedRecords(self.table.take(pa.array(rows, pa.int64())), b"".join(pieces), offsets)

    @property
    def shard_batch(self) -> tuple[pa.Table, bytes, list[int]]:
        """What pipeline.store.shards.write_shard takes of these records."""
        return self.table, self.layout, self.offsets


def _from_ipc(buffer: pa.Buffer, layout: bytes, offsets: list[int]) -> EncodedRecords:
    return EncodedRecords(pa.ipc.open_stream(buffer).read_all(), layout, offsets)


def encode_records(records: list[dict]) -> EncodedRecords:
    """Check ``records`` against RECORD_SCHEMA and encode them; a ValueError names the first that does not fit.

    List columns (the activation trace, the embedding) may be Python lists or numpy arrays; arrays convert
    without a Python float per value.
    """
    for record in records:
        _check(record)
    try:
        table = pa.Table.from_pylist(records, schema=RECORD_SCHEMA)
    except (pa.ArrowException, TypeError, ValueError) as error:
        raise ValueError(f"records {records[0]['key']!r}...: a value does not fit RECORD_SCHEMA ({error})") from None
    return EncodedRecords(table, *sample_layout(table))


def _check(record: dict) -> None:
    missing, extra = _NAMES - set(record), set(record) - _NAMES
    nulls = sorted(name for name in _REQUIRED & set(record) if record[name] is None)
    if missing or extra or nulls:
        raise ValueError(f"record {record.get('key')!r}: missing {sorted(missing)}, unknown {sorted(extra)}, "
                         f"null {nulls}")
    if not isinstance(record["key"], str) or not KEY_PATTERN.fullmatch(record["key"]):
        raise ValueError(f"record key {record['key']!r} is not a key of pipeline.store.schemas.unit_key "
                         f"({KEY_PATTERN.pattern}); keys become file names and HTML attributes, and WebDataset "
                         "splits them at dots")
    if not isinstance(record["timestamp"], dt.datetime) or record["timestamp"].tzinfo is None:
        raise ValueError(f"record {record['key']!r}: timestamp must be a timezone-aware datetime")
