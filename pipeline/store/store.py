"""The storage stage: finished records land here exactly once, readable two ways.

Layout under a store root (a local directory or a pyarrow filesystem URI)::

    parquet/model=<model>/part-<commit_id>.parquet   RECORD_SCHEMA, hive-partitioned by model
                                                     (commit_id: e<epoch, 12 digits>-<uuid> under a lease)
    webdataset/shard-<commit_id>.tar                 <key>.png + <key>.json per record
    failures/part-<commit_id>.parquet                FAILURE_SCHEMA
    plan/plan-<hash>.parquet                         UNIT_SCHEMA, one file per distinct plan
    <table>/part-<part id>.parquet                   a part table (dataset examples, probe results):
                                                     one part per finished unit of an analysis job
    <job>/<artifact>                                 a job's report or plot (probes/<probe>/report.md)
    leases/<job>/                                    claims, heartbeats and the last epoch granted
                                                     (pipeline.store.lease)

The Parquet part keeps its ``model`` column although the directory also names the
model: a part read on its own is then a complete RECORD_SCHEMA table, and
``pyarrow.dataset`` merges the two into one string ``model`` field in schema
order. Model names are percent-encoded in the directory (pyarrow's hive reader
decodes them), so dots, slashes and colons in timm / hf-hub names are safe.

A commit is "stage, commit, roll forward", per model under one commit id:

1. stage: the WebDataset shard is written complete (and, locally, fsynced)
   under the hidden name ``webdataset/.shard-<commit_id>.tar.staged``, which
   neither ``glob('webdataset/*.tar')`` nor pyarrow.dataset sees;
2. commit: the writer checks that it still holds the store's lease (its claim is
   there and its epoch is the last granted: ``Lease.check``); if not, it deletes
   what it staged and stops (``LeaseLost``). Then the Parquet part is published:
   its arrival is the commit point (its bytes are written to a hidden temporary
   while the shard's are, but it is renamed into place only once the staged shard
   is and the check passed);
3. roll forward: the staged shard is moved to ``webdataset/shard-<commit_id>.tar``
   (a local rename; on object stores a copy, which appears whole, then a delete).

So a final shard exists only for a committed part, and a plain glob of
``webdataset/*.tar`` never shows a key that Parquet lacks. A process killed
between 2 and 3 leaves a committed part whose shard is still staged: opening a
writer finishes step 3 for every such part, at once (it is exactly what the
interrupted writer would have done next, so a live writer doing the same is
harmless: whichever moves second finds the shard in place). A process killed
before 2 leaves only hidden files and uncommitted keys, which the next run
recomputes; opening a writer deletes such staged shards and temporaries once
older than ``recover_after_s``, so a concurrent writer's commit in flight is
never touched. Readers of this module (``shard_paths``) list only final shards
of committed parts. Each file becomes visible only when complete: local files
are written under a hidden name ('.'-prefixed), fsynced and renamed; object
stores publish an object only when its upload completes, so there they are
written in place; a write that fails removes its own temporary at once.

A part written by an older record schema without the measured columns (v1) is
brought to this version by a *rewrite* (``vit-atlas describe``), the same three
steps under the commit id ``<old id>-v<this version>`` (``-v3`` today): stage its shard, publish its part (the commit point: the old
part is superseded from then on), then roll forward: move the shard into place
and delete the old part and its shard. A rewrite holds exactly the old part's
keys, so a key is committed once before and once after; a process killed after
the commit point leaves both parts, and ``recover`` deletes the superseded one
(readers meanwhile show each key once).

Every command that opens a store (a sweep, also one with nothing to do, status,
the readers, the atlas) first finishes interrupted commits (``recover``), so a
kill between steps 2 and 3 of the last commit never leaves a permanent gap in the
WebDataset view. Writers hold the store's lease (pipeline.store.lease): two
drivers never commit into one store at once, and a driver paused past its lease
commits nothing after the next driver took the lease over (step 2). A pause that
falls between the check and the rename can still commit a key twice (as can stores
written before leases): the commit id carries the writer's epoch, and every reader
(``committed_keys``, ``read_records``, ``record_batches``, ``shards_with``, hence the
atlas and status) takes each key once, from the part first in ``commit_order``: the
lowest epoch, then the lowest commit id. ``verify`` names such duplicates and
``repair`` removes the copies that do not count. Parquet is written with page
checksums and read with their verification; ``verify`` (pipeline.store.verify)
checks every part against its shard.

Where each piece lives: this module's ``Store`` reads, recovers and rewrites;
``StoreWriter`` (pipeline.store.writer) makes commits: steps 1 and 2 are
``StoreFiles.publish_before``, step 3 is ``StoreFiles.promote``, and every file is
written, listed, moved and deleted by ``StoreFiles`` (pipeline.store.files); the
paths above, commit ids and ``commit_order`` are pipeline.store.layout's.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import posixpath
import time
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from pipeline.store.errors import DamagedStoreError, StoreError, UnknownSchemaError, repair_command
from pipeline.store.files import StoreFiles
from pipeline.store.layout import REWRITE_SUFFIX, StorePaths, commit_order, id_between, is_rewrite, superseded
from pipeline.store.lease import Lease
from pipeline.store.records import encode_records
from pipeline.store.schemas import FAILURE_SCHEMA, READABLE_SCHEMA_IDS, RECORD_SCHEMA, UNIT_SCHEMA, TableSpec
from pipeline.store.shards import write_shard
from pipeline.store.tables import PartTable
from pipeline.store.verify import VerifyReport, repair, verify
from pipeline.store.writer import DEFAULT_COMMIT_BYTES, DEFAULT_COMMIT_EVERY, StoreWriter

log = logging.getLogger(__name__)

# Older uncommitted leftovers than this are surely abandoned: a live writer stages
# a shard and publishes its part within seconds, so deleting younger ones could
# break a concurrent writer's commit in flight. Rolling forward committed parts
# needs no grace period.
DEFAULT_RECOVER_AFTER_S = 600.0

_MODEL_PARTITIONING = ds.partitioning(pa.schema([("model", pa.string())]), flavor="hive")


class Store:
    """A store root: where records, failures and plans live, and what they say."""

    def __init__(self, root: str):
        if "://" in root:
            try:
                self.filesystem, path = pafs.FileSystem.from_uri(root)
            except (pa.ArrowException, OSError) as err:
                raise StoreError(
                    f"The store root {root!r} is not a local path or a URI that pyarrow can open ({err}). "
                    "Use a local directory, or a URI with a scheme pyarrow supports such as "
                    "s3://bucket/prefix, gs://bucket/prefix or file:///absolute/path."
                ) from err
            self.root = root.rstrip("/")
            uri_prefix = "" if self.filesystem.type_name == "local" else root.split("://", 1)[0] + "://"
        else:
            self.filesystem = pafs.LocalFileSystem()
            path = os.path.abspath(os.path.expanduser(root))
            self.root = path
            uri_prefix = ""
        self.files = StoreFiles(self.filesystem, uri_prefix)
        self.paths = StorePaths.under(path.rstrip("/") or "/")
        self._tables: dict[TableSpec, PartTable] = {}  # opened once: each checks a part's columns once
        self._part_versions: dict[str, str] = {}  # record parts checked, and the schema id each was written with

    @classmethod
    def existing(cls, root: str) -> "Store":
        """A store that a sweep has written to; a clear error if there is none at ``root``."""
        store = cls(root)
        try:
            found = store.filesystem.get_file_info(store.paths.parquet).type == pafs.FileType.Directory
        except OSError as err:
            raise StoreError(
                f"The store at {root!r} cannot be read ({err}). Check the location and this machine's "
                "credentials for it."
            ) from err
        if not found:
            raise StoreError(
                f"No store at {root!r}: it has no parquet/ directory of committed records. Point store.root "
                "at the directory a sweep wrote (the sweep's store.root), or run a sweep there first."
            )
        store.recover()
        return store

    # ----------------------------------------------------------------- checks

    def check_readable(self) -> None:
        """Raise StoreError if the root cannot be a store to read (a link loop, a file); a root that does not
        exist yet is an empty store."""
        if self.files.local:
            _check_no_link_loop(self.paths.root, self.root)
        try:
            info = self.filesystem.get_file_info(self.paths.root)
        except OSError as err:
            raise StoreError(
                f"The store root {self.root!r} cannot be inspected ({err}). Check the location and this "
                "machine's credentials for it, or choose another store root."
            ) from err
        if info.type == pafs.FileType.File:
            raise StoreError(
                f"The store root {self.root!r} is a file, not a store: a store is a directory that a sweep "
                "wrote (parquet/, webdataset/, plan/, ...). Point store.root at the directory given to the "
                "sweep as its store.root."
            )

    def check_writable(self) -> None:
        """Raise StoreError if the root cannot hold a store; writes nothing.

        On object stores, permission is only known at the first write; this
        catches roots that are files and unreachable filesystems.
        """
        if self.files.local:
            _check_no_link_loop(self.paths.root, self.root)
        try:
            info = self.filesystem.get_file_info(self.paths.root)
            # The root may not exist yet: it will be created under its nearest
            # existing ancestor, which must therefore be a writable directory.
            ancestor = self.paths.root
            while info.type == pafs.FileType.NotFound:
                parent = posixpath.dirname(ancestor)
                if parent == ancestor or not parent:
                    break
                ancestor = parent
                info = self.filesystem.get_file_info(ancestor)
        except OSError as err:
            raise StoreError(
                f"The store root {self.root!r} cannot be inspected ({err}). Check that the location exists "
                "and that this machine's credentials may read and write it, or choose another store root."
            ) from err
        if info.type == pafs.FileType.File and ancestor == self.paths.root:
            raise StoreError(
                f"The store root {self.root!r} is an existing file, not a directory. Point the store "
                "root at a directory (it may not exist yet), or move the file out of the way."
            )
        if info.type == pafs.FileType.File:
            raise StoreError(
                f"The store root {self.root!r} cannot be created because {ancestor!r} is a file, not a "
                "directory. Choose a store root whose existing parent is a directory you can write to."
            )
        if self.files.local and info.type == pafs.FileType.Directory and not os.access(ancestor, os.W_OK | os.X_OK):
            raise StoreError(
                f"The store root {self.root!r} cannot be written because {ancestor!r} is not writable by "
                "this user (or is on a read-only filesystem). Choose a store root under a directory you can "
                "write to, or grant write permission on it."
            )

    # ---------------------------------------------------------------- reading

    def parquet_dataset(self, touching: ds.Expression | None = None) -> ds.Dataset:
        """All committed records, RECORD_SCHEMA, filterable on ``model``.

        Every part the ``touching`` filter can reach (all parts when None) is first checked
        for a schema id this code reads (READABLE_SCHEMA_IDS), so a store written by an
        incompatible version fails with a clear message, not a type error. Columns a part's
        version lacks (v1's measured columns) read as null.
        """
        dataset = self._records_dataset()
        self._check_versions(dataset, touching)
        return dataset

    def _records_dataset(self) -> ds.Dataset:
        """The committed parts as one dataset, in commit order (``commit_order``): a key that the gap between
        a writer's lease check and its commit point let in twice reads first from the copy that counts, so
        keeping each key's first row is the store's one rule. A part that a committed rewrite supersedes (a
        rewrite killed before it deleted the old part) is left out."""
        parts = self._committed_parts()
        for cid in superseded(set(parts)):
            del parts[cid]
        files = [parts[cid] for cid in sorted(parts, key=commit_order)]
        return ds.dataset(files, schema=RECORD_SCHEMA, format=self.files.parquet_format, filesystem=self.filesystem,
                          partitioning=_MODEL_PARTITIONING, partition_base_dir=self.paths.parquet)

    def _check_versions(self, dataset: ds.Dataset, touching: ds.Expression | None) -> None:
        """Record (and check) the schema id of every part of ``dataset`` that ``touching`` can reach."""
        fragments = dataset.get_fragments(filter=touching) if touching is not None else dataset.get_fragments()
        for fragment in fragments:
            if fragment.path not in self._part_versions:
                self._part_versions[fragment.path] = self._schema_id(fragment)

    def versions(self) -> dict[str, str]:
        """The record schema id of every committed part, by path (also checks each is readable)."""
        dataset = self.parquet_dataset()
        return {path: self._part_versions[path] for path in sorted(dataset.files)}

    def read_part(self, path: str) -> pa.Table:
        """One committed part in full (every RECORD_SCHEMA column, nulls where its version lacks one)."""
        return self._read(self.files.parquet([path], RECORD_SCHEMA), None)

    def rewrite_part(self, path: str, records: list[dict]) -> str:
        """Replace the committed part at ``path`` by ``records`` (the same keys, this version's schema);
        returns the new part's path. Stage, commit, roll forward (see the module's docstring); hold the
        store's lease, as writers do."""
        cid = id_between(posixpath.basename(path), "part-", ".parquet")
        if cid is None or is_rewrite(cid):
            raise ValueError(f"{path} is not a part of this store that a rewrite can replace")
        encoded = encode_records(records)
        keys = set(encoded.keys)
        old_keys = set(self._read(self.files.parquet([path], RECORD_SCHEMA), ["key"])["key"].to_pylist())
        if keys != old_keys or len(keys) != len(records):
            raise ValueError(f"a rewrite of {path} must hold exactly its {len(old_keys)} keys, once each")
        new = f"{cid}{REWRITE_SUFFIX}"
        staged, final = self.paths.shards(new)
        self.files.publish(staged, lambda out: write_shard(out, [encoded.shard_batch]))
        new_path = f"{posixpath.dirname(path)}/part-{new}.parquet"
        self.files.publish_parquet(new_path, encoded.table)
        self.files.promote(staged, final)
        self.retire(cid, path)
        return new_path

    def retire(self, cid: str, path: str) -> None:
        """The last step of a rewrite: the superseded part goes first (its keys are committed in the new one),
        then its shard, so no final shard is ever left without a part by this step."""
        self.files.delete_if_present(path)
        for shard in self.paths.shards(cid):
            self.files.delete_if_present(shard)

    def _schema_id(self, fragment) -> str:
        try:
            metadata = fragment.physical_schema.metadata or {}
        except (pa.ArrowException, OSError) as error:
            raise self.damaged(fragment.path, error) from None
        found = metadata.get(b"schema_id", b"").decode() or "none"
        if found not in READABLE_SCHEMA_IDS:
            raise UnknownSchemaError(
                f"The Parquet part {fragment.path} was written with record schema {found!r}, but this "
                f"version of vit-atlas reads {' and '.join(map(repr, READABLE_SCHEMA_IDS))}. Read the store "
                "with the vit-atlas version that wrote it, or rewrite the part with this version; parts from "
                "other tools do not belong under the store's parquet/ directory."
            )
        return found

    def shard_paths(self) -> list[str]:
        """Sorted committed shard locations, for ``webdataset.WebDataset(urls)``.

        Local paths for a local root, ``<scheme>://...`` URIs otherwise. Shards
        of an unfinished commit (no Parquet part yet) are left out.
        """
        committed = self._part_commit_ids()
        shards = []
        for info in self.files.list(self.paths.webdataset, recursive=False):
            cid = id_between(info.base_name, "shard-", ".tar")
            if cid in committed:
                shards.append(self.files.uri(info.path))
        return sorted(shards)

    def shards_with(self, expression: ds.Expression | None) -> dict[str, set[str]]:
        """Per commit id whose shard holds records matching ``expression``, the keys to read from it.

        A part and its shard share a commit id, so only the shards of matching parts need opening.
        A key committed twice (see ``commit_order``) is read from one shard only: the copy that counts.
        """
        present = {info.base_name for info in self.files.list(self.paths.webdataset, recursive=False)}
        commits: dict[str, set[str]] = {}
        seen: set[str] = set()
        for fragment in self.parquet_dataset(expression).get_fragments(filter=expression):
            matched = set(self._read_fragment(fragment, ["key"], expression)["key"].to_pylist()) - seen
            if not matched:
                continue
            cid = id_between(posixpath.basename(fragment.path), "part-", ".parquet")
            staged, final = (posixpath.basename(p) for p in self.paths.shards(cid))
            # A committed part's shard is complete under either name: staged until the writer
            # (or the next one opened, after a crash) moves it into place.
            if final not in present and staged not in present:
                raise StoreError(
                    f"The store at {self.root!r} has the Parquet part {fragment.path} but no WebDataset shard "
                    f"for it ({final}). Read this store through table()/frame(), or restore the webdataset/ "
                    "directory from the same copy as parquet/."
                )
            commits[cid] = matched
            seen |= matched
        return commits

    def open_shard(self, commit_id: str):
        """A committed shard as a binary input stream, wherever the commit protocol left it."""
        staged, final = self.paths.shards(commit_id)
        # Final name, else staged (not moved into place yet), else final again (moved between
        # the first two tries); the last try's error is the real one.
        for attempt, path in enumerate((final, staged, final), 1):
            try:
                return self.files.open(path)
            except OSError:
                if attempt == 3:
                    raise

    def committed_keys(self) -> set[str]:
        """Keys of all committed records (reads only the ``key`` column).

        These are the keys of the Parquet parts; ``verify`` checks that their shards agree.
        """
        return set(self.read_records(columns=["key"])["key"].to_pylist())

    def read_records(self, columns: list[str] | None = None, filter: ds.Expression | None = None) -> pa.Table:
        """Committed records as one table; a damaged part is named in the error, with the remedy.

        Read first and checked after (as parquet_dataset checks): a scan keeps each part's footer, so
        the check costs no second read of thousands of footers; a part of an unknown schema id that
        fails the read is named as that, not as damaged.
        """
        dataset = self._records_dataset()
        try:
            table = dataset.to_table(columns=columns, filter=filter)
        except (pa.ArrowException, OSError) as error:
            self._check_versions(dataset, filter)
            raise self.damaged(self._damaged_file(dataset, error), error) from None
        self._check_versions(dataset, filter)
        return table

    def record_batches(self, columns: list[str], filter: ds.Expression | None = None,
                       batch_size: int = 256) -> Iterator[pa.RecordBatch]:
        """Committed records in bounded batches (with ``key``), for passes over more image bytes than fit in
        memory; a damaged part is named in the error.

        One part at a time: a dataset scanner reads parts ahead of a slow consumer (one writing atlas
        pages held about a gigabyte of a 10,000-record store's images), a part's own scan only that part.
        With a filter, a part is first counted on the filter's columns alone, so the other columns (images)
        of a part without a match are never read: a filter on keys cannot skip parts by their statistics
        (every part's keys span the same layers and features), and an atlas re-run wants few keys.
        """
        dataset = self.parquet_dataset(filter)
        wanted = list(dict.fromkeys([*columns, "key"]))
        for fragment in dataset.get_fragments(filter=filter) if filter is not None else dataset.get_fragments():
            try:
                if filter is not None and not fragment.scanner(schema=dataset.schema, filter=filter).count_rows():
                    continue
                yield from fragment.to_batches(schema=dataset.schema, columns=wanted, filter=filter,
                                               batch_size=batch_size, batch_readahead=0, fragment_readahead=0)
            except (pa.ArrowException, OSError) as error:
                raise self.damaged(fragment.path, error) from None

    def damaged(self, path: str, error: Exception) -> DamagedStoreError:
        detail = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
        return DamagedStoreError(
            f"The store at {self.root!r} has a damaged file, {path} ({type(error).__name__}: {detail}). "
            f"Run `{repair_command(self.root)}`: it checks every part "
            "against its shard, rebuilds damaged shards from their parts and moves unreadable parts to "
            "quarantine/, so the next sweep recomputes their units."
        )

    def _read_fragment(self, fragment, columns: list[str], expression: ds.Expression | None) -> pa.Table:
        try:
            return fragment.to_table(columns=columns, filter=expression)
        except (pa.ArrowException, OSError) as error:
            raise self.damaged(fragment.path, error) from None

    def failed_keys(self, committed: set[str] | None = None) -> set[str]:
        """Keys that have a recorded failure and no committed record; ``committed``: the committed keys,
        when the caller has just read them (a million take seconds to read again)."""
        failed = self._read(self._dataset(self.paths.failures, FAILURE_SCHEMA), ["key"])["key"]
        return set(failed.to_pylist()) - (self.committed_keys() if committed is None else committed)

    def status(self) -> pa.Table:
        """Per (model, layer): distinct keys planned, done and failed-not-done."""
        group = ["model", "layer"]
        planned = self._read(self._dataset(self.paths.plan, UNIT_SCHEMA), group + ["key"])
        done = self.read_records(columns=group + ["key"])
        failed = self._read(self._dataset(self.paths.failures, FAILURE_SCHEMA), group + ["key"])
        failed = failed.filter(pc.invert(pc.is_in(failed["key"], value_set=done["key"].combine_chunks())))
        counts = None
        for name, table in (("planned", planned), ("done", done), ("failed", failed)):
            count = table.group_by(group).aggregate([("key", "count_distinct")])
            count = count.select(group + ["key_count_distinct"]).rename_columns(group + [name])
            counts = count if counts is None else counts.join(count, keys=group, join_type="full outer")
        columns = {name: counts[name] for name in group}
        columns.update({name: pc.fill_null(counts[name], 0) for name in ("planned", "done", "failed")})
        return pa.table(columns).sort_by([("model", "ascending"), ("layer", "ascending")])

    # ------------------------------------------------------- part tables, artifacts

    def table(self, spec: TableSpec) -> PartTable:
        """A named part table of this store (its schema from pipeline.store.schemas)."""
        if spec not in self._tables:
            self._tables[spec] = PartTable(self.files, self.paths.root, spec)
        return self._tables[spec]

    def verify(self) -> VerifyReport:
        """Every part against its shard, record by record (pipeline.store.verify)."""
        return verify(self)

    def repair(self, report: VerifyReport) -> list[str]:
        """Rebuild damaged shards from their parts; quarantine unreadable parts (pipeline.store.verify)."""
        return repair(self, report)

    def lease(self, name: str = "records", expire_s: float | None = None) -> Lease:
        """The store's lease for one writing job (``with store.lease(): ...``); see pipeline.store.lease.
        ``expire_s``: how long after its last heartbeat a silent holder counts as dead (default EXPIRE_S)."""
        return Lease(self.files, self.root, f"{self.paths.root}/leases/{name}", name, expire_s)

    def write_artifact(self, name: str, data: bytes) -> str:
        """Publish a job's report or plot at ``<root>/<name>`` (complete or not at all); returns where."""
        path = f"{self.paths.root}/{name}"
        self.files.publish(path, lambda out: out.write(data))
        return self.files.uri(path)

    # ---------------------------------------------------------------- writing

    def write_plan(self, units: pa.Table | Callable[[], pa.Table], keys: Iterable[str] | None = None) -> None:
        """Record a planned sweep once, named by a digest of its distinct keys; the same set of keys again
        is a no-op. Given the plan's ``keys``, ``units`` may be a function that builds the table: a resumed
        sweep's plan is usually stored already, and a million units take seconds to tabulate."""
        if keys is None:
            keys = units["key"].to_pylist()
        digest = hashlib.sha256("\n".join(sorted(set(keys))).encode()).hexdigest()[:16]
        path = f"{self.paths.plan}/plan-{digest}.parquet"
        if self.files.is_file(path):
            return
        table = (units() if callable(units) else units).select(UNIT_SCHEMA.names).cast(UNIT_SCHEMA)
        # Two processes writing the same plan write identical bytes, so the race is harmless.
        self.files.publish_parquet(path, table)

    def writer(self, commit_every: int = DEFAULT_COMMIT_EVERY, commit_seconds: float = 300.0,
               recover_after_s: float = DEFAULT_RECOVER_AFTER_S, commit_bytes: int = DEFAULT_COMMIT_BYTES,
               committed: set[str] | None = None, lease: Lease | None = None) -> StoreWriter:
        """Check the root, finish interrupted commits, open a writer. ``committed``: the committed keys, when
        the caller has just read them under the store's lease (see StoreWriter); otherwise they are read now.

        Committed parts whose shard is still staged get it moved into place now;
        uncommitted staged shards and temporaries are deleted once older than
        ``recover_after_s``.
        """
        self.check_writable()
        self.recover(recover_after_s)
        return StoreWriter(self.files, self.paths, self.committed_keys() if committed is None else committed,
                           commit_every, commit_seconds, commit_bytes, lease)

    # -------------------------------------------------------------- internals

    def _dataset(self, path: str, schema: pa.Schema, partitioning=None) -> ds.Dataset:
        # A fresh store has no directories yet; reading must not create them.
        if not self.files.exists(path):
            return self.files.parquet([], schema)
        return self.files.parquet(path, schema, partitioning=partitioning)

    def _read(self, dataset: ds.Dataset, columns: list[str] | None,
              filter: ds.Expression | None = None) -> pa.Table:
        """``dataset.to_table``, naming the damaged file when a part cannot be read."""
        try:
            return dataset.to_table(columns=columns, filter=filter)
        except (pa.ArrowException, OSError) as error:
            raise self.damaged(self._damaged_file(dataset, error), error) from None

    def _damaged_file(self, dataset: ds.Dataset, error: Exception) -> str:
        named = next((path for path in dataset.files if path in str(error)), None)
        if named is not None:
            return named
        # pyarrow did not say which file: find it part by part
        return next((path for path in dataset.files if not self._readable(path, dataset.schema)), "(unknown file)")

    def _readable(self, path: str, schema: pa.Schema) -> bool:
        try:
            self.files.parquet([path], schema).to_table()
            return True
        except (pa.ArrowException, OSError):
            return False

    def _part_commit_ids(self) -> set[str]:
        return set(self._committed_parts())

    def _committed_parts(self) -> dict[str, str]:
        """Commit id -> path of every published Parquet part."""
        parts = {}
        for info in self.files.list(self.paths.parquet, True):
            cid = id_between(info.base_name, "part-", ".parquet")
            if cid:
                parts[cid] = info.path
        return parts

    def recover(self, older_than_s: float = DEFAULT_RECOVER_AFTER_S) -> None:
        """Finish interrupted commits: roll committed parts' staged shards forward; delete abandoned
        uncommitted leftovers older than ``older_than_s``. Safe beside a live writer, and idempotent.

        Every command runs this when it opens a store. Where the store cannot be written (a
        read-only copy), readers still read: they open a committed shard under either name.
        """
        try:
            self._recover(older_than_s)
        except PermissionError as error:
            log.warning("Could not finish interrupted commits in %s (%s); reading it as it is.", self.root, error)

    def _recover(self, older_than_s: float) -> None:
        cutoff_ns = time.time_ns() - int(older_than_s * 1e9)
        parts = self._committed_parts()  # listed before the shards: see the warning below
        for cid in sorted(superseded(set(parts))):  # a rewrite killed after its commit point
            self.retire(cid, parts.pop(cid))
        committed = set(parts)
        shards = {info.base_name for info in self.files.list(self.paths.webdataset, recursive=False)}
        for cid in sorted(committed):
            staged, final = self.paths.shards(cid)
            if posixpath.basename(staged) in shards:
                if posixpath.basename(final) in shards:
                    # An object-store move that copied but did not delete yet.
                    self.files.delete_if_present(staged)
                else:
                    self.files.promote(staged, final)
            elif posixpath.basename(final) not in shards and not self.files.is_file(final):
                # A part is published only after its shard is staged complete, so
                # only a deletion from outside (or a writer stalled past the grace
                # period) gets here; its records are in Parquet but not WebDataset.
                log.warning("Committed Parquet part %s has no WebDataset shard (neither %s nor %s); its "
                            "records are missing from the WebDataset view.", cid, final, staged)
        for directory in (self.paths.parquet, self.paths.webdataset, self.paths.failures, self.paths.plan):
            for info in self.files.list(directory, recursive=True):
                if info.mtime_ns is not None and info.mtime_ns > cutoff_ns:
                    continue
                if id_between(info.base_name, ".shard-", ".tar.staged") in committed:
                    continue  # rolled forward above; never delete a committed shard
                # Final shards without a part come from stores written before
                # shards were staged (the shard was published first then).
                shard_id = id_between(info.base_name, "shard-", ".tar")
                orphan = directory == self.paths.webdataset and shard_id is not None and shard_id not in committed
                if info.base_name.startswith(".") or orphan:
                    self.files.delete_if_present(info.path)

def _check_no_link_loop(path: str, root: str) -> None:
    """A symbolic link loop on the way to the root would pass every other check, then fail mid-run."""
    probe = path
    while probe and probe != os.path.dirname(probe):
        if os.path.islink(probe):
            try:
                os.stat(probe)
            except OSError as error:
                if error.errno == errno.ELOOP:
                    raise StoreError(
                        f"The store root {root!r} cannot be used: {probe!r} is a symbolic link that points back "
                        "to itself (a link loop). Remove or fix the link, or choose another store root."
                    ) from None
        probe = os.path.dirname(probe)
