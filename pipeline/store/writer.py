"""The store's writer: buffers finished records and commits them, in the background, by the commit protocol
of pipeline.store.store's docstring (stage the shard, publish the part, roll the shard forward)."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import threading
import time
import uuid
from collections import deque
import pyarrow as pa

from pipeline.store.files import StoreFiles, write_parquet
from pipeline.store.layout import StorePaths, new_commit_id
from pipeline.store.lease import Lease
from pipeline.store.records import EncodedRecords, encode_records
from pipeline.store.schemas import FAILURE_SCHEMA, UNIT_SCHEMA
from pipeline.store.shards import write_shard

# A commit of 512 records makes parts large enough that a million records are a few thousand files
# to list and open; the byte bound keeps such a buffer of 224 px images (about 120 KB each) in memory.
DEFAULT_COMMIT_EVERY = 512
DEFAULT_COMMIT_BYTES = 64 * 2**20
# A writer's commits running at once: while one waits for the disk (fsync) or an upload, the next encodes
# and writes; at zoo rates a commit at a time kept the driver waiting for it most of the time.
COMMITS_IN_FLIGHT = 2


class StoreWriter:
    """Buffers records and commits them to both stores, dropping duplicate keys.

    Exactly-once holds per writer: it knows the keys committed when it opened
    plus everything it accepted since. ``committed`` is that set as the caller just read it
    under the store's lease (the writer adds to it). ``lease``, the store's lease the caller holds: each commit carries its epoch and is
    made only while the lease is still this writer's (``Lease.check`` right before the commit
    point; a lost lease raises LeaseLost and commits nothing more). Use it as a context
    manager; leaving the ``with`` commits what is buffered, also on an exception.

    A commit that ``add`` or ``maybe_commit`` starts runs on one of the writer's own threads, so the caller
    (the driver, taking results as they come) never waits for the disk or an object store unless
    COMMITS_IN_FLIGHT commits are still running: at most that many commits' records wait beside the buffer.
    Commits in flight hold distinct keys, so their order does not matter. A commit's error, if it fails, is
    raised by a later call, and its records that were not committed are buffered again.
    """

    def __init__(self, files: StoreFiles, paths: StorePaths, committed: set[str], commit_every: int,
                 commit_seconds: float, commit_bytes: int = DEFAULT_COMMIT_BYTES, lease: Lease | None = None):
        if commit_every < 1 or commit_seconds <= 0 or commit_bytes < 1:
            raise ValueError(f"need commit_every >= 1, commit_seconds > 0 and commit_bytes >= 1, got "
                             f"{commit_every}, {commit_seconds}, {commit_bytes}")
        self.files = files
        self.paths = paths
        self.commit_every = commit_every
        self.commit_seconds = commit_seconds
        self.commit_bytes = commit_bytes
        self.lease = lease
        self.committed = 0
        self.waited_s = 0.0  # how long callers waited for commits in flight: the store keeping up, or not
        # Keys committed or buffered: a key in it is never buffered again.
        self.keys_seen = committed
        self._records: dict[str, list[EncodedRecords]] = {}  # buffered, by model
        self._failures: list[dict] = []
        self._oldest: float | None = None  # monotonic time the oldest buffered item arrived
        self._closed = False
        self._committer = concurrent.futures.ThreadPoolExecutor(COMMITS_IN_FLIGHT, thread_name_prefix="store-commit")
        self._shard_writer = concurrent.futures.ThreadPoolExecutor(COMMITS_IN_FLIGHT,
                                                                   thread_name_prefix="store-commit-shard")
        # The commits running on the committer threads, oldest first, and the records each holds until done.
        self._in_flight: deque[tuple[concurrent.futures.Future, dict[str, list[EncodedRecords]], list[dict]]] = deque()
        # The driver may call maybe_commit() from a timer thread while add() runs.
        self._lock = threading.RLock()
        self._count_lock = threading.Lock()  # commits in flight add to ``committed`` at once

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def add(self, record: dict) -> bool:
        """Buffer a record; False if its key is already committed or buffered."""
        return self.add_encoded(encode_records([record])) == 1

    def add_encoded(self, records: EncodedRecords) -> int:
        """Buffer records a worker encoded (pipeline.store.records); returns how many were new, the rest
        being keys already committed or buffered."""
        keys, models = records.keys, records.table["model"].to_pylist()
        with self._lock:
            if self._closed:
                raise RuntimeError("add() on a closed StoreWriter")
            fresh: dict[str, list[int]] = {}
            for row, (key, model) in enumerate(zip(keys, models)):
                if key not in self.keys_seen:
                    self.keys_seen.add(key)
                    fresh.setdefault(model, []).append(row)
            for model, rows in fresh.items():
                self._records.setdefault(model, []).append(records.take(rows))
            if fresh:
                self._touch()
                self.maybe_commit()
            return sum(map(len, fresh.values()))

    def add_failure(self, unit: dict, reason: str, attempts: int) -> None:
        """Buffer a failed unit (any mapping with the UNIT_SCHEMA fields)."""
        failure = {name: unit[name] for name in UNIT_SCHEMA.names}
        failure.update(reason=reason, attempts=attempts, timestamp=dt.datetime.now(dt.timezone.utc))
        with self._lock:
            self._failures.append(failure)
            self._touch()
            self.maybe_commit()

    def maybe_commit(self) -> None:
        """Start a commit on the committer thread if commit_every records or commit_bytes bytes are buffered,
        or the oldest has waited commit_seconds; raise the error of a commit that failed since the last call."""
        with self._lock:
            while self._in_flight and self._in_flight[0][0].done():
                self._finish_oldest()
            batches = [batch for model in self._records.values() for batch in model]
            full = (sum(map(len, batches)) >= self.commit_every
                    or sum(batch.nbytes for batch in batches) >= self.commit_bytes)
            stale = self._oldest is not None and time.monotonic() - self._oldest >= self.commit_seconds
            if full or stale:
                if len(self._in_flight) >= COMMITS_IN_FLIGHT:
                    self._finish_oldest()
                records, failures = self._take()
                self._in_flight.append((self._committer.submit(self._write, records, failures), records, failures))

    def commit(self) -> None:
        """Write everything buffered now, in this thread (after the commits in flight, if any)."""
        with self._lock:
            self._finish_all()
            records, failures = self._take()
            try:
                self._write(records, failures)
            except BaseException:
                self._put_back(records, failures)
                raise

    def close(self) -> None:
        """Commit the remainder; further adds raise."""
        with self._lock:
            if not self._closed:
                try:
                    self.commit()
                finally:
                    self._committer.shutdown()
                    self._shard_writer.shutdown()
                    self._closed = True

    def _take(self) -> tuple[dict[str, list[EncodedRecords]], list[dict]]:
        """Empty the buffer into a commit."""
        records, failures = self._records, self._failures
        self._records, self._failures, self._oldest = {}, [], None
        return records, failures

    def _finish_all(self) -> None:
        """Wait for every commit in flight; raise the first error once all have ended."""
        error = None
        while self._in_flight:
            try:
                self._finish_oldest()
            except BaseException as failed:
                error = error or failed
        if error is not None:
            raise error

    def _finish_oldest(self) -> None:
        """Wait for the oldest commit in flight; if it failed, buffer again what it did not commit and raise."""
        future, records, failures = self._in_flight.popleft()
        started = time.monotonic()
        try:
            future.result()
        except BaseException:
            self._put_back(records, failures)
            raise
        finally:
            self.waited_s += time.monotonic() - started

    def _put_back(self, records: dict[str, list[EncodedRecords]], failures: list[dict]) -> None:
        """Buffer again, first, what a failed commit did not write."""
        for model, batches in records.items():
            self._records[model] = batches + self._records.get(model, [])
        self._failures[:0] = failures
        if records or failures:
            self._oldest = time.monotonic() if self._oldest is None else self._oldest

    def _write(self, records: dict[str, list[EncodedRecords]], failures: list[dict]) -> None:
        """Per model stage a shard, publish a part, move the shard; then failures. What is committed leaves
        ``records`` and ``failures``, so what is left after an error is exactly what a retry must write."""
        # One commit id per model keeps "part exists" the commit point for
        # every key in a shard. A failed move (step 3) comes after that: the keys
        # stay committed exactly once, and the next writer opened on the store moves the shard.
        for model in sorted(records):
            batches = records[model]
            staged, final = self._stage_and_commit(model, batches)
            del records[model]
            with self._count_lock:
                self.committed += sum(map(len, batches))
            self.files.promote(staged, final)
        if failures:
            self._check_lease()
            table = pa.Table.from_pylist(failures, schema=FAILURE_SCHEMA)
            self.files.publish_parquet(f"{self.paths.failures}/part-{uuid.uuid4().hex}.parquet", table)
            failures.clear()

    def _touch(self) -> None:
        if self._oldest is None:
            self._oldest = time.monotonic()

    def _stage_and_commit(self, model: str, batches: list[EncodedRecords]) -> tuple[str, str]:
        """Steps 1 and 2: stage the shard, publish the part; returns (staged, final) shard paths."""
        cid = new_commit_id(self.lease.epoch if self.lease else None)
        staged, final = self.paths.shards(cid)
        table = pa.concat_tables(batch.table for batch in batches)
        self.files.publish_before(
            (staged, lambda out: write_shard(out, [batch.shard_batch for batch in batches])),
            (self.paths.record_part(model, cid), lambda out: write_parquet(table, out)),
            self._shard_writer, self._check_lease)
        return staged, final

    def _check_lease(self) -> None:
        if self.lease is not None:
            self.lease.check()
