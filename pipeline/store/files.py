"""The file layer under a store root: list, read, publish, move and delete files, on a local disk or an
object store (any pyarrow filesystem), so that each file becomes visible only when complete.

Local files are written under a hidden name ('.'-prefixed), fsynced and renamed; object stores publish an
object only when its upload completes, so there they are uploaded in place from a buffer; a write that
fails removes its own temporary at once. ``publish_before`` is the commit protocol's pair of writes (a
commit's staged shard, then its part: pipeline.store.store's docstring) and ``promote`` its step 3. The
store (pipeline.store.store), its writer, leases, part tables and verify do every file operation here.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# Filesystems whose objects appear atomically when their upload completes, and which have no rename.
ATOMIC_UPLOAD_FILESYSTEMS = {"s3", "gcs", "abfs"}
_IMAGE_COLUMNS = {"png"}  # written plain: see write_parquet


def write_parquet(table: pa.Table, out) -> None:
    """Write ``table`` to the binary file object ``out`` as every Parquet file of a store is written."""
    # Page checksums let readers (and verify) tell a flipped bit from data. Images are deflated already
    # and each is unique: a dictionary, compression and statistics of theirs cost a fifth of a commit's
    # Parquet time (at 224 px) to save about 1% of their bytes.
    names = table.schema.names
    others = [name for name in names if name not in _IMAGE_COLUMNS]  # all of a table without images
    pq.write_table(table, out, write_page_checksum=True, use_dictionary=others, write_statistics=others,
                   compression={name: "none" if name in _IMAGE_COLUMNS else "snappy" for name in names})


@dataclass(frozen=True)
class HiddenFile:
    """A file written but not yet visible (StoreFiles.write_hidden): its temporary, or the bytes to upload."""

    path: str
    temp: str | None = None
    buffer: io.BytesIO | None = None


class StoreFiles:
    """Files on one pyarrow filesystem; paths are '/'-separated, without a scheme."""

    def __init__(self, filesystem: pafs.FileSystem, uri_prefix: str = ""):
        self.filesystem = filesystem
        self.uri_prefix = uri_prefix  # what makes a path a URI others can open: "s3://", or "" locally
        self.local = filesystem.type_name == "local"
        self.atomic_uploads = filesystem.type_name in ATOMIC_UPLOAD_FILESYSTEMS
        # Parquet read with its page checksums verified: a flipped bit fails the read, it is not data.
        self.parquet_format = ds.ParquetFileFormat(
            default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True))

    def uri(self, path: str) -> str:
        """``path`` as readers outside the store open it: a local path, or a URI."""
        return self.uri_prefix + path

    # ---------------------------------------------------------------- reading

    def list(self, path: str, recursive: bool) -> list[pafs.FileInfo]:
        """The files under ``path`` (none when it does not exist)."""
        selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
        return [info for info in self.filesystem.get_file_info(selector) if info.type == pafs.FileType.File]

    def is_file(self, path: str) -> bool:
        return self.filesystem.get_file_info(path).type == pafs.FileType.File

    def exists(self, path: str) -> bool:
        return self.filesystem.get_file_info(path).type != pafs.FileType.NotFound

    def read(self, path: str) -> bytes:
        with self.filesystem.open_input_stream(path) as handle:
            return handle.read()

    def open(self, path: str):
        """A binary input stream of ``path``."""
        return self.filesystem.open_input_stream(path)

    def parquet(self, paths: list[str], schema: pa.Schema, **options) -> ds.Dataset:
        """Parquet files as one dataset of ``schema``, read with checksums verified."""
        return ds.dataset(paths, schema=schema, format=self.parquet_format, filesystem=self.filesystem, **options)

    # ---------------------------------------------------------------- writing

    def publish(self, path: str, write: Callable) -> None:
        """Make ``path`` appear complete or not at all; ``write`` fills a binary file object."""
        self.reveal(self.write_hidden(path, write))

    def publish_parquet(self, path: str, table: pa.Table) -> None:
        self.publish(path, lambda out: write_parquet(table, out))

    def publish_before(self, first: tuple[str, Callable], then: tuple[str, Callable],
                       pool: concurrent.futures.Executor, check: Callable[[], None] = lambda: None) -> None:
        """``publish`` two files whose bytes are written at once, ``first`` on ``pool``'s thread; ``then``
        appears only after ``first`` has, and after ``check`` (a writer's lease check) passed; if it raises,
        neither file stays. A commit's staged shard and its part: the part's Parquet encoding then overlaps
        the shard's disk time, instead of waiting for it."""
        earlier = pool.submit(self.publish, *first)
        try:
            hidden = self.write_hidden(*then)
        finally:  # however this ends, the other file's write has ended too, as it would have in one thread
            concurrent.futures.wait([earlier])
        try:
            earlier.result()
        except Exception:
            if hidden.temp is not None:  # an object store's buffer just goes
                self.delete_if_present(hidden.temp)
            raise
        try:
            check()
        except BaseException:
            if hidden.temp is not None:
                self.delete_if_present(hidden.temp)
            self.delete_if_present(first[0])
            raise
        self.reveal(hidden)

    def write_hidden(self, path: str, write: Callable) -> HiddenFile:
        """The first half of ``publish``: ``write``'s bytes, complete (locally, fsynced) where no reader
        looks: a hidden temporary beside ``path``, or, for an object store, a buffer to upload."""
        parent, name = posixpath.split(path)
        if self.atomic_uploads:
            # Closing an object-store stream completes the upload even when ``write`` raised
            # midway, which would publish a truncated object; filling a buffer first means a
            # failed ``write`` uploads nothing.
            buffer = io.BytesIO()
            write(buffer)
            return HiddenFile(path, buffer=buffer)
        temp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
        try:
            if self.local:
                os.makedirs(parent, exist_ok=True)
                with open(temp, "wb") as out:
                    write(out)
                    out.flush()
                    os.fsync(out.fileno())  # the rename must not outlive the data on power loss
            else:
                self.filesystem.create_dir(parent, recursive=True)
                with self.filesystem.open_output_stream(temp) as out:
                    write(out)
        except Exception:
            # A full disk fails every retry: each must take its own temporary with it, not leave
            # it for a recovery ten minutes later. A kill (or Ctrl-C) may leave one: recovery's.
            self.delete_if_present(temp)
            raise
        return HiddenFile(path, temp=temp)

    def reveal(self, hidden: HiddenFile) -> None:
        """The second half of ``publish``: the file appears under its name, whole."""
        if hidden.buffer is not None:
            with self.filesystem.open_output_stream(hidden.path) as out:
                out.write(hidden.buffer.getbuffer())
            return
        try:
            if self.local:
                os.replace(hidden.temp, hidden.path)
                _fsync_dir(posixpath.dirname(hidden.path))
            else:
                self.filesystem.move(hidden.temp, hidden.path)
        except Exception:
            self.delete_if_present(hidden.temp)
            raise

    # ------------------------------------------------------- moving, deleting

    def promote(self, staged: str, final: str) -> None:
        """Step 3 of a commit: give a committed part's staged shard its final name.

        Idempotent and safe to race (a recovering writer and the committing one
        move the same complete file): losing the race is success.
        """
        try:
            if self.local:
                os.replace(staged, final)
                _fsync_dir(posixpath.dirname(final))
            elif self.atomic_uploads:
                # Object stores have no rename: the copy appears whole, then the staged object goes.
                self.filesystem.copy_file(staged, final)
                self.filesystem.delete_file(staged)
            else:
                self.filesystem.move(staged, final)
        except FileNotFoundError:
            if not self.is_file(final):
                raise

    def move(self, source: str, target: str) -> None:
        """Move a file to ``target``, creating its directory."""
        if self.local:
            os.makedirs(posixpath.dirname(target), exist_ok=True)
            os.replace(source, target)
        else:
            self.filesystem.create_dir(posixpath.dirname(target), recursive=True)
            self.filesystem.copy_file(source, target)
            self.filesystem.delete_file(source)

    def delete_if_present(self, path: str) -> None:
        try:
            self.filesystem.delete_file(path)
        except FileNotFoundError:
            pass  # a concurrent recovery or writer got there first


def _fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable: later steps must not outlive it on power loss."""
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
