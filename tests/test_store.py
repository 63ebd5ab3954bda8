"""The store's guarantees: both read paths agree, exactly once, crash safety, clear errors."""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import glob
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import webdataset
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.store.schemas import RECORD_SCHEMA, SCHEMA_ID, UNIT_SCHEMA, unit_key
import pipeline.store.writer as writer_module
from pipeline.store.files import StoreFiles
from pipeline.store.layout import model_dir
from pipeline.store.store import Store, StoreError
from synthetic_store import measured

DOTTED = "vit_base_patch32_clip_224.openai"
OTHER = "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k"  # '/' and ':' must survive the partition directory
REPO = Path(__file__).resolve().parents[1]


def _png(i: int) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", (4, 4), (i % 256, 0, 0))
    image.putpixel((0, 0), (255, 255, 255))  # not flat: its spectral descriptors are numbers, not NaN
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_unit(i: int, model: str = DOTTED, layer: int = 0) -> dict:
    fields = dict(model=model, weights="pretrained-openai", target="mlp", objective="mean", layer=layer,
                  feature=i, seed=0, config_hash="c0")
    return dict(fields, key=unit_key(**fields), family="vit")


def make_record(i: int, model: str = DOTTED, layer: int = 0) -> dict:
    return dict(
        make_unit(i, model, layer),
        config='{"steps": 2}', label=None, png=_png(i), activation=float(i), activation_trace=[0.5, float(i)],
        activation_curve=[0.0, float(i)],
        steps=2, image_size=4, device="cpu", precision="fp32", duration_s=0.1, code_version="test",
        timestamp=dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc), **measured(_png(i), float(i), i),
    )


def parquet_keys(root: Path) -> list[str]:
    """Keys as an outside reader sees them: the plain hive call from the layout contract."""
    table = ds.dataset(str(root / "parquet"), format="parquet", partitioning="hive").to_table(columns=["key"])
    return table["key"].to_pylist()


def webdataset_samples(store: Store) -> list[dict]:
    return list(webdataset.WebDataset(store.shard_paths(), shardshuffle=False))


def raw_shards(root: Path) -> list[str]:
    return sorted(glob.glob(str(root / "webdataset" / "*.tar")))


def plain_glob_keys(store: Store) -> list[str]:
    """Keys as a reader who knows only the layout sees them: every webdataset/*.tar, no store code.

    Locally that is the recipe the sweep prints, ``WebDataset(sorted(glob(root + '/webdataset/*.tar')))``;
    on mock:// it is the same ``*.tar`` match (hidden names excluded, as glob does) over a listing.
    A list, so a key held twice shows up twice.
    """
    if "://" not in store.root:
        shards = raw_shards(Path(store.root))
        return [s["__key__"] for s in webdataset.WebDataset(shards, shardshuffle=False)] if shards else []
    selector = pafs.FileSelector(store.paths.webdataset, allow_not_found=True)
    keys = []
    for info in sorted(store.filesystem.get_file_info(selector), key=lambda i: i.path):
        if info.type == pafs.FileType.File and fnmatch.fnmatch(info.base_name, "[!.]*.tar"):
            with store.filesystem.open_input_stream(info.path) as f:
                names = tarfile.open(fileobj=io.BytesIO(f.read())).getnames()
            keys += [name.rsplit(".", 1)[0] for name in names if name.endswith(".json")]
    return keys


def staged_shards(store: Store) -> list[str]:
    """Shards written but not (yet) moved to their final name: hidden from every reader."""
    selector = pafs.FileSelector(store.paths.webdataset, allow_not_found=True)
    return [i.path for i in store.filesystem.get_file_info(selector) if i.base_name.endswith(".tar.staged")]


def visible_files(root: Path) -> list[str]:
    """Files a reader listing the store sees: no path component hidden."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and not any(c.startswith(".") for c in p.relative_to(root).parts))


def open_store(kind: str, tmp_path: Path, monkeypatch) -> Store:
    if kind == "local":
        return Store(str(tmp_path))
    store = Store("mock:///atlas")  # one in-memory filesystem per Store: reopen writers on this instance
    if kind == "object-store":  # mock:// with S3's semantics: objects written in place, copy + delete to move
        store.files.atomic_uploads = True
        for directory in (store.paths.webdataset, store.paths.failures, store.paths.parquet):
            store.filesystem.create_dir(directory)  # S3 has no directories to create; mock needs them
        store.filesystem.create_dir(f"{store.paths.parquet}/{model_dir(DOTTED)}")
    return store


STORE_KINDS = ["local", "mock", "object-store"]
_PROMOTE = StoreFiles.promote  # the move of a staged shard to its final name, for tests that cut it


def test_unit_keys_are_the_unit_key_of_each_feature_and_stay_what_they_were():
    from pipeline.store.schemas import unit_keys

    fields = ("hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", "sha256-ab", "values", "position-1-2", 3)
    keys = unit_keys(*fields, [0, 17, 123456], -1, "c0ffee")
    assert keys == [unit_key(*fields, feature, -1, "c0ffee") for feature in (0, 17, 123456)]
    # Stores hold these keys: a change of the formula would make every resumed sweep start over.
    assert keys[1] == "hf_hub_timm_vit_tiny_patch16_224_augreg_in21k-values-l003-f00017-s-1-" + hashlib.sha256(
        "|".join(map(str, (*fields, 17, -1, "c0ffee"))).encode()).hexdigest()[:12]


def test_round_trip_through_hive_parquet_and_webdataset(tmp_path):
    records = [make_record(i, DOTTED) for i in range(3)] + [make_record(i, OTHER, layer=1) for i in range(2)]
    store = Store(str(tmp_path))
    with store.writer(commit_every=3) as writer:  # the first commit spans both models
        assert all(writer.add(r) for r in records)
    assert writer.committed == 5

    dataset = ds.dataset(str(tmp_path / "parquet"), format="parquet", partitioning="hive")
    assert dataset.schema.names == RECORD_SCHEMA.names
    assert [f.type for f in dataset.schema] == [f.type for f in RECORD_SCHEMA]
    assert dataset.schema.field("model").type == pa.string()
    assert dataset.schema.metadata[b"schema_id"] == SCHEMA_ID.encode()
    for part in dataset.files:
        assert pq.read_schema(part).metadata[b"schema_id"] == SCHEMA_ID.encode()

    dotted = dataset.to_table(filter=ds.field("model") == DOTTED)
    assert sorted(dotted["key"].to_pylist()) == sorted(r["key"] for r in records[:3])
    assert set(dataset.to_table(filter=ds.field("model") == OTHER)["model"].to_pylist()) == {OTHER}
    by_key = {row["key"]: row for row in dataset.to_table().to_pylist()}
    for record in records:
        assert by_key[record["key"]] == record

    samples = webdataset_samples(store)
    assert sorted(s["__key__"] for s in samples) == sorted(by_key)
    for sample in samples:
        record = by_key[sample["__key__"]]
        fields = json.loads(sample["json"])
        assert sample["png"] == record["png"]
        assert set(fields) == set(RECORD_SCHEMA.names) - {"png"}
        assert fields["timestamp"] == record["timestamp"].isoformat()
        assert fields["activation_trace"] == record["activation_trace"]
        assert fields["model"] == record["model"]


def test_worker_encoded_batches_commit_the_same_values_to_both_stores(tmp_path):
    """What workers send (pipeline.store.records): float32 arrays, a member name past tar's 100 characters,
    a key twice in one batch; both stores then hold the same values, and a rebuilt shard the same bytes."""
    import numpy as np

    from pipeline.store.records import encode_records

    long_model = "hf-hub:timm/" + "x" * 80  # its members' names need a pax header
    records = [make_record(i, long_model if i == 2 else DOTTED) for i in range(3)]
    for i, record in enumerate(records):
        record["embedding"] = np.linspace(0, 1 / 3, 5, dtype=np.float32) + i
        record["activation_trace"] = np.array([0.1, i / 3], dtype=np.float32)
    encoded = encode_records(records + [records[0]])
    store = Store(str(tmp_path))
    with store.writer(commit_every=10) as writer:
        assert writer.add_encoded(encoded) == 3  # the repeated key counts once
    rows = {row["key"]: row for row in store.read_records().to_pylist()}
    samples = webdataset_samples(store)
    assert len(samples) == 3 and len(max(rows, key=len)) + len(".json") > 100
    for sample in samples:
        row, fields = rows[sample["__key__"]], json.loads(sample["json"])
        assert sample["png"] == row["png"]
        # float32 in the JSON too: exact once read as float32
        lists = ("embedding", "activation_trace", "activation_curve")
        assert {name: np.float32(fields.pop(name)).tolist() for name in lists} == {name: row[name] for name in lists}
        assert fields == {name: value.isoformat() if name == "timestamp" else value
                          for name, value in row.items() if name not in ("png", *lists)}
    for shard in raw_shards(tmp_path):
        before = Path(shard).read_bytes()
        with tarfile.open(shard) as tar:  # every header (ustar, and pax for the long names) is tarfile's own
            for member in tar.getmembers():
                info = tarfile.TarInfo(member.name)
                info.size, info.mtime, info.mode, info.uname, info.gname = (member.size, member.mtime, 0o444,
                                                                            "bigdata", "bigdata")
                form = tarfile.USTAR_FORMAT if len(member.name) <= 100 else tarfile.PAX_FORMAT
                assert before[member.offset:member.offset_data] == info.tobuf(form), member.name
        Path(shard).unlink()  # a lost shard, which repair rebuilds from its part
        store.repair(store.verify())
        assert Path(shard).read_bytes() == before


def test_object_store_uri_round_trip():
    # mock:// is pyarrow's in-memory filesystem: the non-local code path, end to end.
    store = Store("mock:///atlas")
    with store.writer(commit_every=2, recover_after_s=0) as writer:
        for i in range(3):
            writer.add(make_record(i))
    assert store.committed_keys() == {make_record(i)["key"] for i in range(3)}
    shards = store.shard_paths()
    assert len(shards) == 2 and all(s.startswith("mock://atlas/webdataset/shard-") for s in shards)
    names = []
    for shard in shards:
        with store.filesystem.open_input_stream(shard.removeprefix("mock://")) as f:
            names += tarfile.open(fileobj=io.BytesIO(f.read())).getnames()
    assert len(names) == 6  # a .png and a .json per record
    listing = store.filesystem.get_file_info(pafs.FileSelector("atlas", recursive=True))
    assert not any(info.base_name.startswith(".") for info in listing)  # temporaries were renamed away


def test_duplicates_dropped_in_buffer_and_after_reopen(tmp_path):
    store = Store(str(tmp_path))
    with store.writer(commit_every=10) as writer:
        assert writer.add(make_record(0)) is True
        assert writer.add(make_record(0)) is False  # late duplicate, still buffered
        assert writer.add(make_record(1)) is True
    with store.writer() as writer:
        assert writer.add(make_record(1)) is False  # already committed
        assert writer.add(make_record(2)) is True
    assert writer.committed == 1
    keys = parquet_keys(tmp_path)
    assert sorted(keys) == sorted(make_record(i)["key"] for i in range(3))
    assert sorted(s["__key__"] for s in webdataset_samples(store)) == sorted(keys)


KILLED_WRITER = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[3])
from test_store import make_record
from pipeline.store.store import Store
kill_at = sys.argv[4]
if kill_at != "outside":
    # kill -9 ourselves at one step of the third commit: just before its Parquet part is
    # renamed into place ("before-part"), or before its staged shard is ("before-move").
    replace, calls = os.replace, []
    def replace_then_die(src, dst):
        step = "before-part" if dst.endswith(".parquet") else "before-move" if src.endswith(".staged") else ""
        if step == kill_at:
            calls.append(dst)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        replace(src, dst)
    os.replace = replace_then_die
writer = Store(sys.argv[1]).writer(commit_every=2)
for i in range(int(sys.argv[2])):
    writer.add(make_record(i))
    print(i, flush=True)
    time.sleep(0.03)
"""


@pytest.mark.parametrize("kill_at", ["outside", "before-part", "before-move"])
def test_sigkill_then_rerun_holds_each_key_once_in_both_stores(tmp_path, kill_at):
    planned = 16
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path), str(planned), str(Path(__file__).parent), kill_at],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:
            if kill_at == "outside" and int(line) >= 6:
                process.send_signal(signal.SIGKILL)
                break
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL

    store = Store(str(tmp_path))
    # Whatever readers can see is complete.
    for part in ds.dataset(str(tmp_path / "parquet"), format="parquet", partitioning="hive").files:
        assert not os.path.basename(part).startswith(".")
        pq.read_table(part)
    for shard in raw_shards(tmp_path):
        with tarfile.open(shard) as tar:
            assert all(tar.extractfile(m).read() is not None for m in tar.getmembers())
    committed = parquet_keys(tmp_path)
    assert len(committed) == len(set(committed))
    # Before the re-run a shard may still be staged, but nothing uncommitted is visible.
    visible = plain_glob_keys(store)
    assert len(visible) == len(set(visible)) and set(visible) <= set(committed)
    assert sorted(s["__key__"] for s in webdataset_samples(store)) == sorted(visible)
    if kill_at == "outside":
        assert len(committed) >= 6
    elif kill_at == "before-part":  # the third commit staged its shard, then died: not committed
        assert len(committed) == 4 and len(visible) == 4 and len(staged_shards(store)) == 1
    else:  # the third commit is in Parquet, its shard still staged
        assert len(committed) == 6 and len(visible) == 4 and len(staged_shards(store)) == 1

    with store.writer(commit_every=4) as writer:  # default grace period: the re-run comes at once
        # Opening the writer moved every committed shard into place.
        assert raw_shards(tmp_path) == store.shard_paths()
        assert sorted(plain_glob_keys(store)) == sorted(committed)
        accepted = [writer.add(make_record(i)) for i in range(planned)]
    assert sum(accepted) == planned - len(committed)

    expected = sorted(make_record(i)["key"] for i in range(planned))
    assert sorted(parquet_keys(tmp_path)) == expected  # every planned key, exactly once
    assert sorted(plain_glob_keys(store)) == expected
    assert sorted(s["__key__"] for s in webdataset_samples(store)) == expected
    # Leftovers of the killed commit stay hidden; nothing else is there to see.
    for name in visible_files(tmp_path):
        assert any(fnmatch.fnmatch(name, p) for p in ("parquet/model=*/part-*.parquet", "webdataset/shard-*.tar"))
    store.writer(recover_after_s=0).close()  # once past the grace period, they go
    assert not list(tmp_path.rglob(".*"))
    assert sorted(plain_glob_keys(store)) == expected


class ProcessDied(BaseException):
    """A death in the middle of a write: unlike an error, it runs no clean-up (as kill -9 would not)."""


def test_crash_after_staging_before_part_is_invisible_then_recomputed_once(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    with store.writer() as writer:
        writer.add(make_record(0))
    crashed = store.writer(commit_every=10)
    crashed.add(make_record(1))

    def torn_write(table, where, **kwargs):  # the process dies halfway through the Parquet part
        where.write(b"PAR1 torn")
        raise ProcessDied("simulated crash")

    monkeypatch.setattr(pq, "write_table", torn_write)
    with pytest.raises(ProcessDied, match="simulated crash"):
        crashed.commit()
    monkeypatch.undo()

    temporaries = list((tmp_path / "parquet").rglob(".*.tmp"))
    staged = staged_shards(store)
    assert len(temporaries) == 1 and len(staged) == 1  # a staged shard and a torn part, both hidden
    assert len(raw_shards(tmp_path)) == 1  # the plain glob sees only the first commit's shard
    assert parquet_keys(tmp_path) == [make_record(0)["key"]]  # the plain reader skips the temporary
    assert plain_glob_keys(store) == [make_record(0)["key"]]
    assert [s["__key__"] for s in webdataset_samples(store)] == [make_record(0)["key"]]

    # A re-run within the grace period: the staged shard may be a concurrent writer's commit
    # in flight, so it stays; it is invisible, and the key, not committed, is computed again.
    with store.writer() as writer:
        assert staged[0] in staged_shards(store) and temporaries[0].exists()
        assert writer.add(make_record(1))
    expected = sorted(make_record(i)["key"] for i in range(2))
    assert sorted(parquet_keys(tmp_path)) == expected
    assert sorted(plain_glob_keys(store)) == expected  # once each
    assert sorted(s["__key__"] for s in webdataset_samples(store)) == expected

    store.writer(recover_after_s=0).close()
    assert staged_shards(store) == [] and not temporaries[0].exists()
    assert sorted(plain_glob_keys(store)) == expected


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_crash_after_part_before_move_rolls_forward_on_reopen(tmp_path, monkeypatch, kind):
    store = open_store(kind, tmp_path, monkeypatch)
    with store.writer() as writer:
        writer.add(make_record(0))

    def crash(self, staged, final):  # the process dies right after the commit point
        raise OSError("simulated crash")

    monkeypatch.setattr(StoreFiles, "promote", crash)
    with pytest.raises(OSError, match="simulated crash"):
        with store.writer(commit_every=1) as writer:  # leaving the with commits again: nothing left to
            writer.add(make_record(1))               # commit, as the keys are already in Parquet
    monkeypatch.setattr(StoreFiles, "promote", _PROMOTE)

    expected = sorted(make_record(i)["key"] for i in range(2))
    assert sorted(store.committed_keys()) == expected and len(store.parquet_dataset().files) == 2
    assert plain_glob_keys(store) == [make_record(0)["key"]] and len(staged_shards(store)) == 1

    with store.writer() as writer:  # default grace: committed shards need no waiting
        assert sorted(plain_glob_keys(store)) == expected  # once each
        assert staged_shards(store) == []
        assert len(store.shard_paths()) == 2
        assert writer.add(make_record(1)) is False
    assert sorted(plain_glob_keys(store)) == expected


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_recovery_racing_a_live_writer_moves_each_shard_once(tmp_path, monkeypatch, kind):
    store = open_store(kind, tmp_path, monkeypatch)
    raced = []

    def promote_after_a_recovery(self, staged, final):
        if not raced:  # another process opens a writer between this one's part and its move
            raced.append(staged)
            store.writer().close()
            assert staged not in staged_shards(store)  # it rolled this commit forward
        _PROMOTE(self, staged, final)  # ...and this writer's own move must still succeed

    monkeypatch.setattr(StoreFiles, "promote", promote_after_a_recovery)
    with store.writer(commit_every=2) as writer:
        for i in range(4):
            writer.add(make_record(i))
    assert raced and staged_shards(store) == []
    expected = sorted(make_record(i)["key"] for i in range(4))
    assert sorted(plain_glob_keys(store)) == expected and sorted(store.committed_keys()) == expected


def test_object_store_move_cut_between_copy_and_delete_is_finished(monkeypatch, tmp_path):
    store = open_store("object-store", tmp_path, monkeypatch)
    monkeypatch.setattr(StoreFiles, "promote", lambda self, staged, final: self.filesystem.copy_file(staged, final))
    with store.writer() as writer:  # the copy lands, the staged object's delete never happens
        writer.add(make_record(0))
    monkeypatch.setattr(StoreFiles, "promote", _PROMOTE)
    assert len(staged_shards(store)) == 1 and plain_glob_keys(store) == [make_record(0)["key"]]
    store.writer().close()
    assert staged_shards(store) == [] and plain_glob_keys(store) == [make_record(0)["key"]]


def test_malformed_records_are_rejected_at_add(tmp_path):
    with Store(str(tmp_path)).writer() as writer:
        for broken in (dict(make_record(0), key="has.dot"), dict(make_record(0), timestamp=dt.datetime(2025, 1, 1)),
                       {k: v for k, v in make_record(0).items() if k != "png"}, dict(make_record(0), steps=None)):
            with pytest.raises(ValueError):
                writer.add(broken)
        assert writer.add(make_record(0))  # the rejected attempts did not claim the key


def test_exception_inside_with_still_commits_buffered_records(tmp_path):
    store = Store(str(tmp_path))
    with pytest.raises(RuntimeError, match="worker lost"):
        with store.writer(commit_every=10) as writer:
            writer.add(make_record(0))
            raise RuntimeError("worker lost")
    assert store.committed_keys() == {make_record(0)["key"]}


def committed_soon(store: Store, count: int, within_s: float = 10.0) -> set[str]:
    """The committed keys once ``count`` are in: a commit that add() or maybe_commit() starts runs on the
    writer's thread."""
    deadline = time.monotonic() + within_s
    while len(keys := store.committed_keys()) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return keys


def shards_take(monkeypatch, seconds: float) -> None:
    """Every commit's shard takes ``seconds`` longer to write: a slow disk."""
    write_shard = writer_module.write_shard

    def slow_disk(out, batches):
        time.sleep(seconds)
        write_shard(out, batches)

    monkeypatch.setattr(writer_module, "write_shard", slow_disk)


def test_a_caller_waits_only_when_every_commit_slot_is_busy_and_the_writer_counts_it(tmp_path, monkeypatch):
    from pipeline.store.writer import COMMITS_IN_FLIGHT

    store = Store(str(tmp_path))
    writer = store.writer(commit_every=1)
    writer.add(make_record(0))
    committed_soon(store, 1)
    writer.add(make_record(1))  # the first commit had ended: nothing to wait for
    committed_soon(store, 2)
    assert writer.waited_s < 0.1
    shards_take(monkeypatch, 0.5)
    started = time.monotonic()
    for i in range(2, 2 + COMMITS_IN_FLIGHT):  # each starts a commit that takes half a second, at once
        writer.add(make_record(i))
    assert time.monotonic() - started < 0.3 and writer.waited_s < 0.1
    writer.add(make_record(2 + COMMITS_IN_FLIGHT))  # waits for the oldest, then starts its own
    assert writer.waited_s > 0.3 and len(store.committed_keys()) >= 3
    writer.close()
    assert len(store.committed_keys()) == 3 + COMMITS_IN_FLIGHT == writer.committed


def test_commits_in_flight_at_once_commit_every_key_once_to_both_stores(tmp_path, monkeypatch):
    shards_take(monkeypatch, 0.05)  # so that the next commit starts while this one runs
    store = Store(str(tmp_path))
    records = [make_record(i, DOTTED if i % 3 else OTHER) for i in range(40)]
    with store.writer(commit_every=2) as writer:  # twenty commits, each started while another runs
        assert all(writer.add(record) for record in records)
    expected = sorted(record["key"] for record in records)
    assert writer.committed == 40 and sorted(parquet_keys(tmp_path)) == expected
    assert sorted(s["__key__"] for s in webdataset_samples(store)) == expected
    assert store.verify().ok


def test_commit_seconds_commits_before_commit_every(tmp_path):
    store = Store(str(tmp_path))
    writer = store.writer(commit_every=100, commit_seconds=0.2)
    writer.add(make_record(0))
    writer.maybe_commit()
    time.sleep(0.1)
    assert store.committed_keys() == set()  # too young
    time.sleep(0.15)
    writer.maybe_commit()
    assert committed_soon(store, 1) == {make_record(0)["key"]}
    writer.add(make_record(1))
    time.sleep(0.25)
    writer.add(make_record(2))  # add() checks the age too
    assert len(committed_soon(store, 3)) == 3
    writer.close()
    assert writer.committed == 3


def test_a_failed_background_commit_raises_at_the_next_call_and_is_retried(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    writer = store.writer(commit_every=2)
    publish = StoreFiles.publish
    broken = {"once": True}

    def full_disk_once(self, path, write):
        if broken.pop("once", False):
            raise OSError(28, "No space left on device")
        publish(self, path, write)

    monkeypatch.setattr(StoreFiles, "publish", full_disk_once)
    writer.add(make_record(0))
    writer.add(make_record(1))  # starts a commit, which fails on the committer thread
    with pytest.raises(OSError, match="No space left"):
        for _ in range(500):  # the next call raises it, once the commit has ended
            writer.maybe_commit()
            time.sleep(0.01)
    assert store.committed_keys() == set() and writer.committed == 0
    writer.close()  # the records that failed are buffered again and committed now, once
    assert sorted(parquet_keys(tmp_path)) == sorted(make_record(i)["key"] for i in range(2))
    assert writer.committed == 2


def test_commit_bytes_commits_before_commit_every(tmp_path):
    store = Store(str(tmp_path))
    from pipeline.store.records import encode_records

    record_bytes = encode_records([make_record(0)]).nbytes
    writer = store.writer(commit_every=100, commit_bytes=int(2.5 * record_bytes))
    writer.add(make_record(0))
    writer.add(make_record(1))
    time.sleep(0.1)
    assert store.committed_keys() == set()  # two records' bytes are under the bound
    writer.add(make_record(2))
    assert len(committed_soon(store, 3)) == 3 and len(store.parquet_dataset().files) == 1
    writer.add(make_record(3))  # the count starts again from the commit
    assert len(store.committed_keys()) == 3
    writer.close()
    assert writer.committed == 4


def test_a_stored_plan_is_not_tabulated_again(tmp_path):
    units = [make_unit(i) for i in range(3)]
    store = Store(str(tmp_path))
    store.write_plan(lambda: pa.Table.from_pylist(units, schema=UNIT_SCHEMA), [u["key"] for u in units])
    store.write_plan(lambda: pytest.fail("a stored plan was built again"), [u["key"] for u in units[::-1]])
    store.write_plan(pa.Table.from_pylist(units, schema=UNIT_SCHEMA))  # a table names the same plan
    assert len(list((tmp_path / "plan").glob("plan-*.parquet"))) == 1


def test_failures_and_status_come_from_the_store_alone(tmp_path):
    units = [make_unit(i, DOTTED, layer=0) for i in range(3)] + [make_unit(i, OTHER, layer=1) for i in range(2)]
    store = Store(str(tmp_path))
    store.write_plan(pa.Table.from_pylist(units, schema=UNIT_SCHEMA))
    store.write_plan(pa.Table.from_pylist(units[::-1], schema=UNIT_SCHEMA))  # same plan: no second file
    assert len(list((tmp_path / "plan").glob("plan-*.parquet"))) == 1
    with store.writer() as writer:
        writer.add(make_record(0, DOTTED, 0))
        writer.add_failure(make_unit(1, DOTTED, 0), "CUDA out of memory", attempts=3)
        writer.add_failure(make_unit(0, OTHER, 1), "NaN loss", attempts=2)
    assert store.failed_keys() == {make_unit(1)["key"], make_unit(0, OTHER, 1)["key"]}
    with store.writer() as writer:
        writer.add(make_record(1, DOTTED, 0))  # the retry succeeded
    assert store.failed_keys() == {make_unit(0, OTHER, 1)["key"]}

    status = Store(str(tmp_path)).status().to_pylist()  # a fresh handle: nothing kept in memory
    assert status == [
        {"model": OTHER, "layer": 1, "planned": 2, "done": 0, "failed": 1},
        {"model": DOTTED, "layer": 0, "planned": 3, "done": 2, "failed": 0},
    ]


def test_empty_store_reads_as_empty(tmp_path):
    store = Store(str(tmp_path / "new"))
    assert store.committed_keys() == set() and store.shard_paths() == []
    assert store.status().num_rows == 0
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("make_root", [
    lambda tmp: tmp / "a_file",  # the root is a file
    lambda tmp: tmp / "a_file" / "store",  # its parent is a file: root ignores chmod, not this
    lambda tmp: tmp / "read_only" / "store",  # a directory we may not write (skipped as root)
], ids=["root-is-file", "parent-is-file", "read-only-parent"])
def test_bad_local_roots_raise_and_write_nothing(tmp_path, make_root):
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "read_only").mkdir(mode=0o555)
    root = make_root(tmp_path)
    if "read_only" in str(root) and os.access(tmp_path / "read_only", os.W_OK):
        pytest.skip("running as root: permissions do not stop writes")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(StoreError) as raised:
        Store(str(root)).check_writable()
    assert isinstance(raised.value, PipelineError)
    assert str(root) in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(StoreError):
        Store(str(root)).writer()
    assert sorted(tmp_path.rglob("*")) == before
    assert (tmp_path / "a_file").read_text() == "not a directory"


def test_unknown_scheme_raises_store_error():
    with pytest.raises(StoreError, match="nope://bucket/atlas"):
        Store("nope://bucket/atlas").check_writable()


def test_good_root_checks_without_creating_anything(tmp_path, monkeypatch):
    Store(str(tmp_path / "a" / "b")).check_writable()
    monkeypatch.chdir(tmp_path)
    relative = Store("rel/store")
    relative.check_writable()
    assert relative.root == str(tmp_path / "rel" / "store")
    assert list(tmp_path.iterdir()) == []
