"""vit-atlas describe: an old store's records measured once, through the store's commit protocol."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset

from pipeline import cli
from pipeline.engine.descriptors import describe_png
from pipeline.store.schemas import MEASURED_COLUMNS, RECORD_SCHEMA_V1, SCHEMA_ID
from pipeline.store.store import Store
from pipeline.views.readers import open_store
from synthetic_store import DEIT, MODELS, write_v1_store

DEIT_ONLY = [m for m in MODELS if m[0] == DEIT]  # random and planted weights: loadable without a hub


def files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_describe_fills_an_old_store_exactly_once_and_a_second_run_does_nothing(tmp_path, capsys):
    written = write_v1_store(tmp_path, DEIT_ONLY, size=224)
    assert cli.main(["status", f"store.root={tmp_path}"]) == 0
    assert f"record schema: 1 part {RECORD_SCHEMA_V1}; `vit-atlas describe" in capsys.readouterr().out
    assert cli.main(["describe", f"store.root={tmp_path}", "device=cpu"]) == 0
    assert "describe: 1 part(s)" in capsys.readouterr().out
    assert cli.main(["status", f"store.root={tmp_path}"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"record schema: 1 part {SCHEMA_ID}")

    atlas = open_store(str(tmp_path))
    assert set(atlas.versions().values()) == {SCHEMA_ID}
    table = atlas.store.read_records()
    assert sorted(table["key"].to_pylist()) == sorted(r["key"] for r in written)  # every key, once
    for row in table.to_pylist():
        assert all(row[name] is not None for name in MEASURED_COLUMNS), row["key"]
        expected = describe_png(row["png"])
        assert all(row[n] == v or (math.isnan(row[n]) and math.isnan(v)) for n, v in expected.items())
        assert len(row["embedding"]) == 768 and row["activation_noise"] != row["activation_grey"]
        assert row["activation_curve"] is None  # measured only during an optimization, which describe does not run
    samples = {s["__key__"] for s in webdataset.WebDataset(atlas.store.shard_paths(), shardshuffle=False)}
    assert samples == {r["key"] for r in written}  # the WebDataset view holds the rewritten records once too

    before = files(tmp_path)
    assert cli.main(["describe", f"store.root={tmp_path}", "device=cpu"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {k: v for k, v in files(tmp_path).items() if not k.startswith("leases/")} == \
        {k: v for k, v in before.items() if not k.startswith("leases/")}


def test_a_describe_killed_after_its_commit_point_leaves_every_key_once(tmp_path, monkeypatch, capsys):
    write_v1_store(tmp_path, DEIT_ONLY, size=224)
    (old,) = Store.existing(str(tmp_path)).versions()

    def killed(self, cid, path):
        raise KeyboardInterrupt  # dies between publishing the rewrite and retiring the old part

    monkeypatch.setattr(Store, "retire", killed)
    assert cli.main(["describe", f"store.root={tmp_path}", "device=cpu"]) == 130
    assert Path(old).exists()  # both parts are there now: the rewrite is the committed one
    monkeypatch.undo()
    atlas = open_store(str(tmp_path))  # recovery retires the superseded part
    assert not Path(old).exists() and set(atlas.versions().values()) == {SCHEMA_ID}
    keys = atlas.store.read_records(columns=["key"])["key"].to_pylist()
    assert len(keys) == len(set(keys)) == 18
    assert cli.main(["describe", f"store.root={tmp_path}", "device=cpu"]) == 0
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("problem", ["missing", "foreign"])
def test_bad_stores_are_one_paragraph_exit_2_and_nothing_is_written(tmp_path, capsys, problem):
    root = tmp_path / "store"
    if problem == "foreign":
        write_v1_store(root, DEIT_ONLY, size=224)
        (part,) = root.glob("parquet/*/part-*.parquet")
        table = pq.read_table(part)
        pq.write_table(table.replace_schema_metadata({"schema_id": "other/tool/v3"}), part)
        expected = "'other/tool/v3'"
    else:
        expected = "No store at"
    before = files(root) if root.exists() else {}
    assert cli.main(["describe", f"store.root={root}", "device=cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err
    assert (files(root) if root.exists() else {}) == before
