"""The store under faults: crashes at the named moments, two drivers, flipped and truncated files, crafted
keys, full disks, link loops. Each case broke a promise once: nothing lost, nothing duplicated, no hang."""

from __future__ import annotations

import errno
import glob
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import webdataset

from pipeline.execution.driver import run_sweep
from pipeline.store import lease as lease_module
from pipeline.store.errors import DamagedStoreError, StoreError
from pipeline.store.lease import LeaseHeld
from pipeline.store.store import Store
from pipeline.views.readers import open_store
from test_store import make_record

REPO = Path(__file__).resolve().parents[1]
FAST = ("sweep.models=[deit_tiny_patch16_224]", "sweep.layers=[0]", "model.weights=random", "optim.copies=1",
        "progress.bar=false")


class ProcessDied(BaseException):
    """A death at a chosen moment: unlike an error, it runs no clean-up (as kill -9 would not)."""


def shard_files(root: Path) -> list[str]:
    return sorted(glob.glob(str(root / "webdataset" / "*.tar")))


def write_records(root: Path, count: int = 3) -> list[str]:
    with Store(str(root)).writer(commit_every=count + 1) as writer:
        for i in range(count):
            writer.add(make_record(i))
    return sorted(make_record(i)["key"] for i in range(count))


def die_before_the_shard_moves(monkeypatch) -> None:
    def promote(self, staged, final):
        raise ProcessDied("killed between publishing the part and moving its shard")

    monkeypatch.setattr(Store, "_promote", promote)


# ------------------------------------------------------------------ recovery on every open


def test_a_kill_after_the_last_part_is_repaired_by_status_not_only_by_a_writer(tmp_path, monkeypatch, capsys):
    from pipeline import cli

    die_before_the_shard_moves(monkeypatch)
    with pytest.raises(ProcessDied):
        write_records(tmp_path)
    monkeypatch.undo()
    assert shard_files(tmp_path) == []  # the gap: Parquet holds the records, the WebDataset view none

    assert cli.main(["status", f"store.root={tmp_path}"]) == 0
    assert len(shard_files(tmp_path)) == 1
    keys = [s["__key__"] for s in webdataset.WebDataset(shard_files(tmp_path), shardshuffle=False)]
    assert sorted(keys) == sorted(make_record(i)["key"] for i in range(3))


def test_a_sweep_with_nothing_to_do_finishes_an_interrupted_last_commit(compose, tmp_path, ray_local, monkeypatch):
    cfg = compose(*FAST, "sweep.features=[0,1]", "optim.steps=2", f"store.root={tmp_path}")
    die_before_the_shard_moves(monkeypatch)
    with pytest.raises(ProcessDied):
        run_sweep(cfg)
    monkeypatch.undo()
    assert shard_files(tmp_path) == [] and len(Store(str(tmp_path)).committed_keys()) == 2

    assert run_sweep(cfg) == 0  # every key is done: no writer opens, yet the shard is moved into place
    assert len(shard_files(tmp_path)) == 1


# ------------------------------------------------------------------ one driver at a time


def test_a_second_lease_on_a_store_is_refused_with_who_holds_it(tmp_path):
    store = Store(str(tmp_path))
    with store.lease():
        with pytest.raises(LeaseHeld, match=rf"pid {os.getpid()} on .*last seen \d+ s ago"):
            Store(str(tmp_path)).lease().acquire()
    with Store(str(tmp_path)).lease():  # released: the next driver gets it
        pass
    assert not list((tmp_path / "leases").rglob("*-*"))


def test_a_dead_drivers_lease_is_taken_over(tmp_path, monkeypatch):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    store = Store(str(tmp_path))
    held = store.lease()
    monkeypatch.setattr(lease_module.os, "getpid", lambda: dead_pid)
    held.acquire()  # a claim by a process that has exited since (killed with -9, say)
    held._stop.set()
    monkeypatch.undo()
    with Store(str(tmp_path)).lease() as taken:
        assert [c.lease_id for c in taken._claims()] == [taken.lease_id]  # the dead claim is cleaned up

    other_host = Store(str(tmp_path)).lease()
    other_host.acquire()
    other_host._stop.set()
    monkeypatch.setattr(lease_module, "EXPIRE_S", 0.0)  # its heartbeat is now past the expiry
    time.sleep(0.01)
    with Store(str(tmp_path)).lease():
        pass


@pytest.mark.timeout(300)
def test_two_drivers_started_at_once_commit_every_key_once(tmp_path):
    overrides = [*FAST, "sweep.features=first:4", "optim.steps=40", "cluster.workers=1", "sweep.chunk_size=1",
                 "store.commit_every=1", f"store.root={tmp_path / 'store'}"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    drivers = [subprocess.Popen([sys.executable, "-m", "pipeline", "sweep", *overrides], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(d.wait(timeout=280), *d.communicate()) for d in drivers]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, _, err in results if code == 2)
    assert "Another driver is writing records of the store" in refused and refused.count("\n") == 1
    keys = ds.dataset(str(tmp_path / "store" / "parquet"), format="parquet", partitioning="hive") \
        .to_table(columns=["key"])["key"].to_pylist()
    assert len(keys) == 4 == len(set(keys))
    samples = list(webdataset.WebDataset(shard_files(tmp_path / "store"), shardshuffle=False))
    assert len(samples) == 4


def test_readers_show_a_key_committed_twice_once(tmp_path):
    """Stores written by two drivers before leases existed hold duplicates; readers de-duplicate by key."""
    write_records(tmp_path, 2)
    with Store(str(tmp_path)).writer() as writer:  # a writer that did not know the store's keys
        writer._seen.clear()
        writer.add(make_record(0))
    atlas = open_store(str(tmp_path))
    assert Store(str(tmp_path)).read_records(["key"]).num_rows == 3
    assert sorted(atlas.table()["key"].to_pylist()) == sorted(make_record(i)["key"] for i in range(2))
    assert sum(b.num_rows for b in atlas.batches(["key"])) == 2
    assert sorted(s["key"] for s in atlas.torch_samples()) == sorted(make_record(i)["key"] for i in range(2))


# ------------------------------------------------------------------ damaged files


def flip_bit(path: str, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ 0x10]))


def test_a_flipped_bit_in_a_tar_header_is_found_named_and_repaired(tmp_path, capsys):
    from pipeline import cli

    keys = write_records(tmp_path, 3)
    (shard,) = shard_files(tmp_path)
    members = [m for m in __import__("tarfile").open(shard).getmembers()]
    flip_bit(shard, members[2].offset + 100)  # inside the third member's header: tarfile stops there silently
    atlas = open_store(str(tmp_path))
    with pytest.raises(DamagedStoreError, match=r"lacks \d of the 3 records"):
        list(atlas.torch_samples())

    assert cli.main(["status", f"store.root={tmp_path}", "verify=true"]) == 2
    out = capsys.readouterr().out
    assert "records missing" in out and os.path.basename(shard) in out and "repair=true" in out

    assert cli.main(["status", f"store.root={tmp_path}", "verify=true", "repair=true"]) == 0
    assert "after repair: verified 1 parts, 1 shards, 3 records: no damage found" in capsys.readouterr().out
    assert sorted(s["key"] for s in open_store(str(tmp_path)).torch_samples()) == keys


def test_a_truncated_part_is_named_by_every_command_and_repair_quarantines_it(tmp_path, capsys):
    from pipeline import cli

    keys = write_records(tmp_path, 3)
    (part,) = glob.glob(str(tmp_path / "parquet" / "*" / "part-*.parquet"))
    with open(part, "r+b") as handle:
        handle.truncate(os.path.getsize(part) // 2)

    assert cli.main(["status", f"store.root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and part in err and "repair=true" in err and err.count("\n") == 1
    with pytest.raises(DamagedStoreError, match="damaged file"):
        open_store(str(tmp_path)).table()
    assert cli.main(["atlas", f"store.root={tmp_path}", f"out={tmp_path / 'site'}"]) == 2
    assert part in capsys.readouterr().err

    assert cli.main(["status", f"store.root={tmp_path}", "verify=true", "repair=true"]) == 0
    out = capsys.readouterr().out
    assert "unreadable part" in out and "quarantine" in out
    assert Store(str(tmp_path)).committed_keys() == set()  # its units are recomputed by the next sweep
    assert (tmp_path / "quarantine" / os.path.relpath(part, tmp_path)).exists()
    assert shard_files(tmp_path) == [] and keys


def test_a_flipped_bit_inside_a_parquet_page_fails_its_checksum(tmp_path):
    write_records(tmp_path, 3)
    (part,) = glob.glob(str(tmp_path / "parquet" / "*" / "part-*.parquet"))
    png = next(column for column in (pq.ParquetFile(part).metadata.row_group(0).column(i) for i in range(22))
               if column.path_in_schema == "png")
    flip_bit(part, png.data_page_offset - 5)  # the end of the png column's dictionary page: image bytes
    with pytest.raises(DamagedStoreError, match=os.path.basename(part)):
        Store(str(tmp_path)).read_records()


# ------------------------------------------------------------------ hostile input, full disks


@pytest.mark.parametrize("key", ["<script>alert(1)</script>", '"onmouseover=alert(1)', "/etc/passwd",
                                 "../../outside", "a" * 20, "x-mlp-l000-f00000-s0-0123456789ab.png"])
def test_keys_that_are_not_unit_keys_are_refused_at_commit(tmp_path, key):
    with Store(str(tmp_path)).writer() as writer:
        with pytest.raises(ValueError, match="is not a key of"):
            writer.add(dict(make_record(0), key=key))
    assert not (tmp_path / "parquet").exists()


def test_a_full_disk_leaves_no_temporaries_behind(tmp_path, monkeypatch):
    from pipeline.store import store as store_module

    store = Store(str(tmp_path))
    writer = store.writer(commit_every=1)

    def disk_full(table, out, **kwargs):
        out.write(b"PAR1 half a part")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module.pq, "write_table", disk_full)
    writer.add(make_record(0))  # starts a commit on the writer's thread
    for _ in range(3):  # every retry fails alike; the first reports the commit add() started
        with pytest.raises(OSError, match="No space left"):
            writer.commit()
    assert [p for p in tmp_path.rglob(".*") if p.name.endswith(".tmp")] == []


def test_a_store_root_in_a_symlink_loop_is_refused_before_anything_runs(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(StoreError, match="link loop"):
        Store(str(loop / "store")).check_writable()
