"""The WebDataset view of the records: one sample per record, ``<key>.json`` and ``<key>.png``.

A shard is a plain tar of those members, as webdataset.TarWriter writes them (the same order, mode and
owner). Workers lay out everything but the images (``sample_layout``): the members' headers and the
JSON, which holds every column but the image as the Parquet part holds it (float32 lists as float32,
timestamps in UTC), so both stores agree value for value. The driver then only interleaves those bytes
with the images its table already holds (``write_shard``): no image is copied into a second buffer,
or sent twice from a worker.
"""

from __future__ import annotations

import tarfile
from typing import BinaryIO, Iterable

import numpy as np
import orjson
import pyarrow as pa

_OWNER = "bigdata"  # what webdataset.TarWriter writes as the members' user and group
_MODE = 0o444
_ZEROS = memoryview(bytes(tarfile.RECORDSIZE))


def sample_layout(table: pa.Table) -> tuple[bytes, list[int]]:
    """For every row, what precedes its image in the shard (the JSON member, then the image's header),
    back to back, and where each row's bytes start (and, last, end)."""
    lists = [field.name for field in table.schema if pa.types.is_list(field.type)]
    scalars = table.drop_columns(["png", *lists]).to_pylist()
    arrays = {name: _one_array(table[name]).to_numpy(zero_copy_only=False) for name in lists}
    sizes = np.diff(_image_offsets(_one_array(table["png"])))
    names = [name for name in table.schema.names if name != "png"]
    pieces, offsets, size = [], [0], 0
    for row, fields in enumerate(scalars):
        timestamp = fields["timestamp"]
        fields["timestamp"] = timestamp.isoformat()
        fields.update((name, values[row]) for name, values in arrays.items())
        metadata = orjson.dumps({name: fields[name] for name in names}, option=orjson.OPT_SERIALIZE_NUMPY)
        mtime = int(timestamp.timestamp())
        key = fields["key"]
        piece = (_header(f"{key}.json", len(metadata), mtime) + metadata + _ZEROS[:_padding(len(metadata))]
                 + _header(f"{key}.png", int(sizes[row]), mtime))
        pieces.append(piece)
        size += len(piece)
        offsets.append(size)
    return b"".join(pieces), offsets


def write_shard(out: BinaryIO, batches: Iterable[tuple[pa.Table, bytes, list[int]]]) -> None:
    """Write records as one tar into the binary file object ``out``: per batch its table (for the images)
    and its layout (``sample_layout``)."""
    size = 0
    for table, layout, offsets in batches:
        pngs = _one_array(table["png"])
        images, ends = memoryview(pngs.buffers()[2] or b""), _image_offsets(pngs)
        layout = memoryview(layout)
        for row in range(table.num_rows):
            image = images[ends[row]:ends[row + 1]]
            padding = _ZEROS[:_padding(len(image))]
            for piece in (layout[offsets[row]:offsets[row + 1]], image, padding):
                out.write(piece)
                size += len(piece)
    end = 2 * tarfile.BLOCKSIZE  # two zero blocks end the archive; tarfile pads it to whole records
    out.write(bytes(end + -(size + end) % tarfile.RECORDSIZE))


def _one_array(column: pa.ChunkedArray) -> pa.Array:
    """The column as one array: its only chunk as it is (``combine_chunks`` copies even one chunk, and a
    batch's images are megabytes)."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _image_offsets(pngs: pa.BinaryArray) -> np.ndarray:
    """Where each image starts in the array's data buffer (and, last, where the last one ends)."""
    buffer = pngs.buffers()[1]
    if buffer is None:
        return np.zeros(1, np.int64)
    return np.frombuffer(buffer, np.int32)[pngs.offset:pngs.offset + len(pngs) + 1]


def _padding(size: int) -> int:
    return -size % tarfile.BLOCKSIZE


def _header(name: str, size: int, mtime: int) -> bytes:
    """The member header webdataset.TarWriter's tarfile writes: a shard has two per record, so a ustar one is
    laid into a header tarfile made once (tarfile builds every field anew, a tenth of a millisecond a record)."""
    if len(name) > _NAME_FIELD or not name.isascii() or not 0 <= size < _OCTAL_LIMIT or not 0 <= mtime < _OCTAL_LIMIT:
        return _tarfile_header(name, size, mtime)  # pax, or fields ustar cannot hold: tarfile's own rules
    block = bytearray(_USTAR_TEMPLATE)
    block[:len(name)] = name.encode()
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"%011o\0" % mtime
    block[148:155] = b"%06o\0" % sum(block)  # summed with its own field as spaces, as tarfile does
    return bytes(block)


def _tarfile_header(name: str, size: int, mtime: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, _MODE
    info.uname = info.gname = _OWNER
    try:
        return info.tobuf(tarfile.USTAR_FORMAT)
    except ValueError:  # a name over 100 characters: a pax header carries it
        return info.tobuf(tarfile.PAX_FORMAT)


_NAME_FIELD = 100  # bytes of a ustar header's name field
_OCTAL_LIMIT = 8**11  # size and mtime are 11 octal digits


def _ustar_template() -> bytes:
    """Every field but name, size, mtime and checksum as tarfile writes them; the checksum field is spaces."""
    header = _tarfile_header("", 0, 0)
    return header[:148] + b" " * 8 + header[156:]


_USTAR_TEMPLATE = _ustar_template()
