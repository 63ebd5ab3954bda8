"""Sweeps end to end on a local Ray: exact keys, provenance, resume, grids, bad input, failures."""

from __future__ import annotations

import glob
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import torch
import webdataset
from PIL import Image

from pipeline.execution.driver import run_sweep
from pipeline.execution import scheduler
from pipeline.errors import PipelineError
from pipeline.execution.plan import build_plan
from pipeline.execution.worker import VisualizationWorker
from pipeline.store.schemas import SCHEMA_ID
from pipeline.store.store import Store

REPO = Path(__file__).resolve().parents[1]
FAST = ("optim.steps=2", "optim.copies=1", "progress.bar=false", "store.commit_every=2")


def parquet_keys(root: Path) -> list[str]:
    table = ds.dataset(str(root / "parquet"), format="parquet", partitioning="hive").to_table(columns=["key"])
    return table.column("key").to_pylist()


def webdataset_keys(root: Path) -> list[str]:
    shards = sorted(glob.glob(str(root / "webdataset" / "*.tar")))
    return [sample["__key__"] for sample in webdataset.WebDataset(shards, shardshuffle=False)] if shards else []


def test_a_sweep_ends_with_exactly_the_planned_keys_in_both_stores(ray_local, compose, tmp_path, capsys,
                                                                    monkeypatch):
    from pipeline.engine import calibrate

    # The calibration times steps on a worker, never in the driver (a cluster's driver may be a small head node).
    monkeypatch.setattr(calibrate, "step_seconds", lambda *a: pytest.fail("the driver timed a step"))
    cfg = compose("sweep.models=[deit_tiny_patch16_224]", "sweep.layers=[0,11]", "sweep.features=[5,6,7]",
                  f"store.root={tmp_path}", *FAST)
    planned = build_plan(cfg).keys()
    assert run_sweep(cfg) == 0
    assert sorted(parquet_keys(tmp_path)) == sorted(planned)
    assert sorted(webdataset_keys(tmp_path)) == sorted(planned)
    out = capsys.readouterr().out
    assert "plan: 6 planned / 0 already done / 6 to do" in out and f"store: {tmp_path}" in out
    assert "cost: 12 image-steps (" in out  # 6 units x 2 steps x 1 copy
    # measured on what costs the most, on a worker: the precision auto chose with the two rates, the batch
    # (at most 2: 3 units per worker would leave the other idle) and the time
    assert "calibration on a worker, cpu (" in out and "deit_tiny_patch16_224 layer 11" in out
    assert "precision auto -> " in out and "against fp32" in out and "feature-steps/s by batch 1: " in out
    assert "cost: about " in out and "with 2 workers" in out

    dataset = ds.dataset(str(tmp_path / "parquet"), format="parquet", partitioning="hive")
    assert dataset.schema.metadata[b"schema_id"].decode() == SCHEMA_ID
    row = dataset.to_table(filter=ds.field("layer") == 11).to_pylist()[0]
    assert row["model"] == "deit_tiny_patch16_224" and row["weights"] == "random-0" and row["target"] == "mlp"
    assert Image.open(io.BytesIO(row["png"])).size == (224, 224) and row["image_size"] == 224
    assert json.loads(row["config"])["optim"]["steps"] == 2 and row["steps"] == 2
    # the hash covers precision auto as written; the record says what the worker ran
    assert json.loads(row["config"])["optim"]["precision"] == "auto"
    assert json.loads(row["config"])["precision_used"] == row["precision"] in ("fp32", "bf16")
    assert row["device"].startswith("cpu") and row["code_version"] and row["duration_s"] > 0
    assert torch.isfinite(torch.tensor(row["activation"])) and "." not in row["key"]
    sample = next(iter(webdataset.WebDataset(sorted(glob.glob(str(tmp_path / "webdataset" / "*.tar"))),
                                             shardshuffle=False)))
    assert json.loads(sample["json"])["key"] == sample["__key__"]


def test_a_completed_plan_starts_no_workers_and_a_partial_one_does_only_the_rest(
        ray_local, compose, tmp_path, capsys, monkeypatch):
    small = compose("sweep.layers=[0]", "sweep.features=[1,2]", f"store.root={tmp_path}", *FAST)
    assert run_sweep(small) == 0
    first = {r["key"]: r["timestamp"] for r in Store(str(tmp_path)).parquet_dataset()
             .to_table(columns=["key", "timestamp"]).to_pylist()}
    larger = compose("sweep.layers=[0]", "sweep.features=[1,2,3]", f"store.root={tmp_path}", *FAST)
    capsys.readouterr()
    assert run_sweep(larger) == 0
    out = capsys.readouterr().out
    assert "plan: 3 planned / 2 already done / 1 to do" in out
    assert f"not re-read: `vit-atlas status store.root={tmp_path} verify=true`" in out  # says it did not verify
    rows = Store(str(tmp_path)).parquet_dataset().to_table(columns=["key", "timestamp"]).to_pylist()
    assert len(rows) == 3 and all(first[r["key"]] == r["timestamp"] for r in rows if r["key"] in first)

    monkeypatch.setattr(scheduler, "run_plan", lambda *a, **k: pytest.fail("a completed plan started work"))
    monkeypatch.setattr(scheduler, "start_ray", lambda *a, **k: pytest.fail("a completed plan started Ray"))
    assert run_sweep(larger) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert len(parquet_keys(tmp_path)) == 3


def test_a_hyper_parameter_grid_gives_one_record_per_config(ray_local, compose, tmp_path):
    cfg = compose("sweep.layers=[0]", "sweep.features=[4]", "+sweep.grid={optim.tv:[0.1,1.0]}",
                  f"store.root={tmp_path}", *FAST)
    assert run_sweep(cfg) == 0
    table = Store(str(tmp_path)).parquet_dataset().to_table(columns=["config_hash", "config"]).to_pylist()
    assert len({r["config_hash"] for r in table}) == 2
    assert sorted(json.loads(r["config"])["optim"]["tv"] for r in table) == [0.1, 1.0]


def test_a_three_way_parameterization_grid_over_two_layers_is_one_command_into_one_store(ray_local, tmp_path):
    from pipeline.cli import main
    from pipeline.views.atlas import build_site

    # The command as written, with 2 steps of 1 copy instead of 10 steps of 8.
    assert main(["sweep", "sweep.models=[deit_tiny_patch16_224]", "model.weights=planted", "sweep.layers=[1,2]",
                 "sweep.features=first:2", "sweep.grid={optim.param:[pixel,fourier,maco]}", "optim.steps=2",
                 "optim.copies=1", "progress.bar=false", f"store.root={tmp_path / 'store'}"]) == 0
    rows = Store(str(tmp_path / "store")).parquet_dataset().to_table(
        columns=["key", "layer", "feature", "config_hash", "config"]).to_pylist()
    units: dict[tuple, list[dict]] = {}
    for row in rows:
        units.setdefault((row["layer"], row["feature"]), []).append(row)
    assert sorted(units) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for same in units.values():
        assert sorted(json.loads(r["config"])["optim"]["param"]["name"] for r in same) == ["fourier", "maco", "pixel"]
        assert len({r["config_hash"] for r in same}) == 3
    assert len({r["config_hash"] for r in rows}) == 3  # one config per param, shared by both layers

    build_site(str(tmp_path / "store"), tmp_path / "site")
    page = (tmp_path / "site" / "features" / f"{rows[0]['key']}.html").read_text()
    block = page[page.index('<section class="configs">'):]
    assert block[:block.index("</section>")].count("<img ") == 3


@pytest.mark.parametrize("override,message", [
    ("sweep.models=[deit_tiny_patch16_22]", "Did you mean: deit_tiny_patch16_224"),
    ("sweep.layers=[12]", r"valid layers are 0\.\.11"),
    ("sweep.features=[768]", r"valid features are 0\.\.767"),
    ("sweep.features=lots", "Cannot read feature selection"),
    ("model.weights=/nonexistent/ckpt.safetensors", "neither 'pretrained'"),
    ("target.kind=keys", "not available"),  # swin's windowed attention at layer 0
    ("target.objective=position-20-0", "outside the 14x14 patch grid"),
    ("optim.colour_shift=sepia", r"optim.colour_shift: Invalid value 'sepia', expected one of \[code, paper, none\]"),
    ("+sweep.grid={store.root:[a,b]}", "is not a hyper-parameter"),
])
def test_bad_input_is_refused_before_any_compute_and_writes_nothing(compose, tmp_path, monkeypatch, override,
                                                                     message):
    monkeypatch.setattr(scheduler, "start_ray", lambda *a, **k: pytest.fail("bad input reached Ray"))
    model = "swin_tiny_patch4_window7_224" if override == "target.kind=keys" else "deit_tiny_patch16_224"
    root = tmp_path / "store"
    with pytest.raises(PipelineError, match=message):  # a choice not allowed is refused as the config is composed
        run_sweep(compose(f"sweep.models=[{model}]", "sweep.layers=[0]", "sweep.features=[0]", f"store.root={root}",
                          override))
    assert not root.exists()


def test_checkpoint_problems_are_named(compose, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    import timm

    monkeypatch.setattr(scheduler, "start_ray", lambda *a, **k: pytest.fail("bad input reached Ray"))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    mismatched = tmp_path / "small.safetensors"
    state = timm.create_model("deit_small_patch16_224").state_dict()
    save_file({k: v.contiguous() for k, v in list(state.items())[:-2]}, str(mismatched))
    for path, message in ((corrupt, "could not be read"), (mismatched, r"missing: head.bias, head.weight; shape mismatch: blocks.0.attn.proj.bias \(384,\) vs \(192,\)")):
        cfg = compose("sweep.layers=[0]", "sweep.features=[0]", f"model.weights={path}",
                      f"store.root={tmp_path / 'store'}")
        with pytest.raises(PipelineError, match=message):
            run_sweep(cfg)
    assert not (tmp_path / "store").exists()


def test_checkpoint_files_and_directories_load_with_their_hash_as_weights_id(tmp_path):
    from safetensors.torch import save_file

    from pipeline.models import weights

    torch.manual_seed(3)
    source = weights.load("deit_tiny_patch16_224", weights.resolve("deit_tiny_patch16_224", "random", 3))
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "deit_tiny_patch16_224.safetensors"))
    torch.save(state, tmp_path / "plain.pth")
    for spec in (str(tmp_path), str(tmp_path / "plain.pth")):
        choice = weights.resolve("deit_tiny_patch16_224", spec)
        assert choice.weights_id.startswith("sha256-") and len(choice.weights_id) == 7 + 64
        loaded = weights.load("deit_tiny_patch16_224", choice)
        torch.testing.assert_close(loaded.state_dict()["blocks.3.mlp.fc1.weight"], state["blocks.3.mlp.fc1.weight"])
    torch.save({"note": Path("an arbitrary pickled object")}, tmp_path / "pickled.pth")
    with pytest.raises(PipelineError, match="could not be read"):
        weights.resolve("deit_tiny_patch16_224", str(tmp_path / "pickled.pth"))


def test_pretrained_weights_offline_fail_with_remedies(monkeypatch):
    from pipeline.models import weights

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PipelineError, match="HF_HUB_OFFLINE is set.*model.weights=random"):
        weights.resolve("deit_tiny_patch16_224", "pretrained")  # naming the weights by revision needs the file
    choice = weights.resolve("deit_tiny_patch16_224", "pretrained", pin=False)
    assert choice.weights_id == "pretrained-fb_in1k"
    with pytest.raises(PipelineError, match="HF_HUB_OFFLINE is set.*model.weights=random"):
        weights.load("deit_tiny_patch16_224", choice)


def test_an_unreachable_hub_is_detected_once_and_quickly(monkeypatch, tmp_path):
    import time

    import huggingface_hub.constants

    from pipeline.models import weights

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    weights.hub_unreachable.cache_clear()
    started = time.monotonic()
    try:
        with pytest.raises(PipelineError) as raised:
            weights.ensure_pretrained("deit_tiny_patch16_224")
    finally:
        weights.hub_unreachable.cache_clear()
    assert time.monotonic() - started < 10
    message = str(raised.value)
    assert "The hub (127.0.0.1) cannot be reached from this machine" in message and "not in the Hugging Face" \
        in message and "\n" not in message
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # later downloads (workers' too) read the cache only


def test_a_sweep_without_its_pretrained_weights_stops_before_any_compute(compose, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(scheduler, "start_ray", lambda *a, **k: pytest.fail("reached Ray without weights"))
    cfg = compose("sweep.models=[deit_tiny_patch16_224]", "sweep.layers=[0]", "model.weights=pretrained",
                  f"store.root={tmp_path / 'store'}")
    with pytest.raises(PipelineError, match="Pretrained weights for 'deit_tiny_patch16_224'.*Remedies"):
        run_sweep(cfg)
    assert not (tmp_path / "store").exists()


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline", "sweep", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_bad_input_exits_2_with_one_paragraph_and_writes_nothing(tmp_path):
    root = tmp_path / "store"
    result = run_cli("sweep.models=[deit_tiny_patch16_224]", "sweep.layers=[40]", f"store.root={root}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "valid layers are 0..11" in result.stderr
    assert not root.exists()
    unwritable = tmp_path / "a-file"
    unwritable.write_text("not a directory")
    result = run_cli(f"store.root={unwritable}/store", cwd=tmp_path)
    assert result.returncode == 2 and "store" in result.stderr.lower()
    malformed = run_cli("optim.steps=abc", f"store.root={root}", cwd=tmp_path)
    assert malformed.returncode != 0 and "optim.steps" in malformed.stderr
    assert malformed.returncode == 2 and malformed.stderr.startswith("error: ") and malformed.stderr.count("\n") == 1
    assert not root.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing written for any of them


DEMO_WEIGHTS_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"  # jobs/fetch-demo-weights.sh


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")
                                              if not p.stem.startswith("probe_")))
def test_every_sweep_experiment_plans_without_touching_weights(compose, experiment):
    plan = build_plan(compose(f"experiment={experiment}"), pin_weights=False)
    assert len(plan) == len(set(plan.keys())) > 0
    if experiment.startswith("paper_"):
        assert {g.optim.tv for g in plan.groups} == {0.1, 1.0}
        assert all(g.weights.weights_id.startswith("pretrained-") for g in plan.groups)
        assert all(g.optim.lr == (1.0 if g.family == "clip" else 0.1) for g in plan.groups)
    if experiment == "demo":  # the trained DINOv2 at 224 px (`make demo-weights`) beside the planted units
        dinov2 = [g for g in plan.groups if g.model == "vit_small_patch14_dinov2"]
        assert {g.weights.weights_id for g in dinov2} == {f"sha256-{DEMO_WEIGHTS_SHA256}"}
        assert {g.weights.img_size for g in dinov2} == {224} and {g.layer for g in dinov2} == {1, 4, 7, 10}
        assert {g.weights.kind for g in plan.groups} == {"file", "planted"}


def test_hydra_multirun_runs_one_sweep_per_value_into_the_same_store(tmp_path):
    root = tmp_path / "store"
    result = run_cli("-m", "experiment=smoke", "optim.tv=0.1,1.0", f"store.root={root}", "progress.bar=false",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("plan: 2 planned / 0 already done / 2 to do") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no outputs/, multirun/ or .hydra/
    assert "[pipeline.progress][INFO] - progress 2/2" in result.stdout  # logging goes to the console
    tvs = [json.loads(c)["optim"]["tv"] for c in Store(str(root)).parquet_dataset().to_table(columns=["config"])
           .column("config").to_pylist()]
    assert sorted(tvs) == [0.1, 0.1, 1.0, 1.0]


@pytest.mark.slow
def test_the_documented_command_runs_exactly_as_written(tmp_path):
    root = tmp_path / "some-dir"
    result = run_cli("sweep.models=[deit_tiny_patch16_224]", "sweep.layers=[1]", "sweep.features=[5,6]",
                     "sweep.seeds=[0]", "model.weights=random", "optim.steps=150", f"store.root={root}",
                     cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = Store(str(root)).parquet_dataset().to_table(columns=["layer", "feature", "steps"]).to_pylist()
    assert sorted((r["layer"], r["feature"], r["steps"]) for r in rows) == [(1, 5, 150), (1, 6, 150)]


def test_pretrained_weights_come_from_an_existing_hugging_face_cache_offline(tmp_path):
    """HF_HOME holding timm's repository layout is enough; HF_HUB_OFFLINE forbids the network."""
    from safetensors.torch import save_file

    import timm

    torch.manual_seed(11)
    state = {k: v.contiguous() for k, v in timm.create_model("deit_tiny_patch16_224").state_dict().items()}
    repo = tmp_path / "hf" / "hub" / "models--timm--deit_tiny_patch16_224.fb_in1k"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file(state, str(snapshot / "model.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    script = (
        "import torch, pipeline\n"
        "from pipeline.models import weights\n"
        "choice = weights.resolve('deit_tiny_patch16_224', 'pretrained')\n"
        "weights.ensure_available('deit_tiny_patch16_224', choice)\n"
        "model = weights.load('deit_tiny_patch16_224', choice)\n"
        "print(choice.weights_id, float(model.state_dict()['blocks.0.mlp.fc1.weight'].sum()))\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    weights_id, checksum = result.stdout.split()
    assert weights_id == f"pretrained-fb_in1k@{'0' * 40}"  # the revision of the file loaded
    assert abs(float(checksum) - float(state["blocks.0.mlp.fc1.weight"].sum())) < 1e-3


def hugging_face_cache(home: Path, revisions: dict[str, int], main: str) -> dict[str, dict]:
    """timm's repository for deit_tiny_patch16_224.fb_in1k in a Hugging Face cache made by hand: one snapshot
    per revision (weights from its seed), refs/main naming ``main``. Returns each revision's state dict."""
    from safetensors.torch import save_file

    import timm

    repo = home / "hub" / "models--timm--deit_tiny_patch16_224.fb_in1k"
    states = {}
    for revision, seed in revisions.items():
        torch.manual_seed(seed)
        states[revision] = {k: v.contiguous() for k, v in timm.create_model("deit_tiny_patch16_224").state_dict().items()}
        (repo / "snapshots" / revision).mkdir(parents=True, exist_ok=True)
        save_file(states[revision], str(repo / "snapshots" / revision / "model.safetensors"))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(main)
    return states


def test_pretrained_weights_are_named_by_the_hub_revision_loaded_and_records_load_their_own(tmp_path):
    """Two caches at two revisions of one tag: two weights ids; a record's id loads its revision, whichever
    the cache's newest is; an id from before ids named a revision still loads."""
    old, new = "1" * 40, "2" * 40
    states = hugging_face_cache(tmp_path / "hf", {old: 11, new: 12}, main=old)
    script = (
        "import sys, pipeline\n"
        "from pipeline.models import weights\n"
        "choice = weights.resolve('deit_tiny_patch16_224', 'pretrained')\n"
        "recorded = weights.choice_of_record('deit_tiny_patch16_224', sys.argv[1], 'pretrained', 224)\n"
        "model = weights.load('deit_tiny_patch16_224', recorded)\n"
        "print(choice.weights_id, recorded.weights_id, float(model.state_dict()['blocks.0.mlp.fc1.weight'].sum()))\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}

    def run(recorded: str, main: str) -> list[str]:
        (tmp_path / "hf" / "hub" / "models--timm--deit_tiny_patch16_224.fb_in1k" / "refs" / "main").write_text(main)
        result = subprocess.run([sys.executable, "-c", script, recorded], env=env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout.split()

    def checksum(revision: str) -> float:
        return float(states[revision]["blocks.0.mlp.fc1.weight"].sum())

    planned, recorded, loaded = run(f"pretrained-fb_in1k@{old}", main=new)  # the cache moved on since
    assert planned == f"pretrained-fb_in1k@{new}" and recorded == f"pretrained-fb_in1k@{old}"
    assert abs(float(loaded) - checksum(old)) < 1e-3 and abs(checksum(old) - checksum(new)) > 1e-2
    planned, recorded, loaded = run("pretrained-fb_in1k", main=new)  # a record from before ids named revisions
    assert recorded == "pretrained-fb_in1k" and abs(float(loaded) - checksum(new)) < 1e-3


@pytest.mark.slow  # two sweeps, each starting its own Ray
def test_a_resume_that_finds_the_tag_at_another_revision_plans_new_units_beside_the_old_and_says_so(tmp_path):
    old, new = "1" * 40, "2" * 40
    hugging_face_cache(tmp_path / "hf", {old: 11, new: 12}, main=old)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    command = [sys.executable, "-m", "pipeline", "sweep", "sweep.models=[deit_tiny_patch16_224.fb_in1k]",
               "sweep.layers=[0]", "sweep.features=[0,1]", "model.weights=pretrained", "optim.steps=2",
               "optim.copies=1", "progress.bar=false", f"store.root={tmp_path / 'store'}"]
    first = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-2000:]
    (tmp_path / "hf" / "hub" / "models--timm--deit_tiny_patch16_224.fb_in1k" / "refs" / "main").write_text(new)
    second = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "plan: 2 planned / 0 already done / 2 to do" in second.stdout
    assert (f"weights: the store holds records of deit_tiny_patch16_224.fb_in1k made with pretrained-fb_in1k@{old}"
            f": the same weights tag from other bytes") in second.stdout
    assert f"This run loads pretrained-fb_in1k@{new}, so its units are planned beside those" in second.stdout
    weights = Store(str(tmp_path / "store")).read_records(["weights"])["weights"].to_pylist()
    assert sorted(weights) == [f"pretrained-fb_in1k@{old}"] * 2 + [f"pretrained-fb_in1k@{new}"] * 2


def test_the_cost_counts_what_is_left_with_the_flop_counter(compose):
    from pipeline.models import zoo

    plan = build_plan(compose("sweep.layers=[0,11]", "sweep.features=[1,2]", "optim.steps=10", "optim.copies=4"))
    forward = zoo.target_flops("deit_tiny_patch16_224")
    assert forward[11] > 10 * forward[0] > 0  # the last layer's truncated forward runs every block
    image_steps, flops, notes = plan.cost(done=set())
    assert image_steps == 4 * 10 * 4 and flops == pytest.approx(2 * 10 * 4 * 3 * (forward[0] + forward[11]))
    assert notes == []
    half = {plan.groups[0].key(1), plan.groups[0].key(2)}
    assert plan.cost(done=half) == (2 * 10 * 4, pytest.approx(2 * 10 * 4 * 3 * forward[11]), [])


def test_a_plan_hashes_each_key_once_however_often_the_driver_asks(compose, monkeypatch):
    """A resumed driver reads the keys to do, their cost, the costliest group and the chunks: at a
    million units each pass over freshly hashed keys cost seconds."""
    from pipeline.execution import plan as plan_module

    calls = []
    real_unit_keys = plan_module.unit_keys

    def counted(*fields):
        keys = real_unit_keys(*fields)
        calls.extend(keys)
        return keys

    monkeypatch.setattr(plan_module, "unit_keys", counted)
    plan = build_plan(compose("sweep.layers=[0,1,2]", "sweep.features=first:5", "sweep.seeds=[0,1]"))
    keys = plan.keys()
    done = set(keys[:7])
    chunks = plan.chunks(done, 4)
    plan.cost(done)
    plan.costliest_group(done)
    assert plan.keys() == keys and len(set(keys)) == len(plan) == 30
    assert sum(len(chunk.features) for chunk in chunks) == 23
    assert len(calls) == len(plan)


def test_a_resumed_sweep_reads_the_committed_keys_once_under_the_lease(compose, tmp_path, monkeypatch, capsys):
    from pipeline.execution.scheduler import RunSummary
    from pipeline.store.lease import Lease
    from synthetic_store import write_store

    written = write_store(tmp_path)
    cfg = compose("sweep.layers=[0]", "sweep.features=[1,2]", f"store.root={tmp_path}", *FAST)
    reads, held = [], []
    read_records = Store.read_records
    monkeypatch.setattr(Store, "read_records", lambda self, *a, **k: reads.append(held[:]) or read_records(self, *a, **k))
    acquire, release = Lease.acquire, Lease.release
    monkeypatch.setattr(Lease, "acquire", lambda self: held.append(self.name) or acquire(self))
    monkeypatch.setattr(Lease, "release", lambda self: held.remove(self.name) or release(self))
    monkeypatch.setattr(scheduler, "start_ray", lambda cluster: None)
    monkeypatch.setattr(scheduler, "gpus_per_worker", lambda cluster: 0)
    seen = {}

    def run_plan(plan, done, chunk_size, cluster, writer, *rest):
        seen.update(done=done, writer=set(writer.keys_seen))
        return RunSummary()

    monkeypatch.setattr(scheduler, "run_plan", run_plan)
    assert run_sweep(cfg) == 0
    assert reads == [["records"]]  # once, and under the lease
    assert seen["done"] == set() and seen["writer"] == {r["key"] for r in written}  # the writer got the set read
    assert len(list((tmp_path / "plan").glob("plan-*.parquet"))) == 1


class UncalibratedWorker(VisualizationWorker):
    """A worker whose calibration fails (a model whose step cannot be timed, say); its chunks run."""

    def calibrate(self, *args):
        raise RuntimeError("simulated calibration failure")


@pytest.fixture
def broken_flop_counter(monkeypatch):
    """torch's FLOP counter failing on the model, as it did on PiT's tuple-input stages."""
    from pipeline.engine import cost
    from pipeline.models import zoo

    def target_flops(*args):
        raise AssertionError("Expected gradient function to be set")

    cost.forward_flops.cache_clear()
    monkeypatch.setattr(zoo, "target_flops", target_flops)
    yield
    monkeypatch.undo()
    cost.forward_flops.cache_clear()


def test_a_failing_flop_count_and_a_failing_calibration_do_not_stop_the_sweep(
        ray_local, compose, tmp_path, capsys, broken_flop_counter):
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests/
    cfg = compose("sweep.layers=[0]", "sweep.features=[1,2]", f"store.root={tmp_path}", *FAST)
    assert run_sweep(cfg, UncalibratedWorker) == 0
    assert sorted(parquet_keys(tmp_path)) == sorted(build_plan(cfg).keys())
    out = capsys.readouterr().out
    assert ("cost: the FLOP counter failed on deit_tiny_patch16_224 (AssertionError: Expected gradient function "
            "to be set); counted from the model's layout instead\n") in out
    assert "cost: 4 image-steps (" in out
    assert ("calibration: failed on a worker (worker raised RuntimeError: simulated calibration failure); "
            "no time estimate, chunks of 1\n") in out


class LoggingWorker(VisualizationWorker):
    """Writes each call it runs (what, on which features, from when to when) to ``directory``/<its pid>."""

    directory = ""

    def _logged(self, call: str, features, work):
        started = time.monotonic()  # one clock for every process of the machine
        result = work()
        with open(os.path.join(self.directory, str(os.getpid())), "a") as log:
            log.write(json.dumps([call, list(features), started, time.monotonic()]) + "\n")
        return result

    def calibrate(self, group, *args):
        return self._logged("calibrate", (), lambda: super(LoggingWorker, self).calibrate(group, *args))

    def run(self, chunk):
        return self._logged("run", chunk.features, lambda: super(LoggingWorker, self).run(chunk))


def test_while_the_first_worker_calibrates_the_others_start_on_a_feature_each(ray_local, compose, tmp_path,
                                                                             monkeypatch):
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests/
    logs = tmp_path / "calls"
    logs.mkdir()
    monkeypatch.setattr(LoggingWorker, "directory", str(logs))
    cfg = compose("sweep.layers=[0]", "sweep.features=[1,2,3]", f"store.root={tmp_path / 'store'}", *FAST)
    assert run_sweep(cfg, LoggingWorker) == 0
    calibrating, other = sorted(([json.loads(line) for line in log.read_text().splitlines()]
                                 for log in logs.iterdir()), key=lambda calls: calls[0][0])
    assert calibrating[0][0] == "calibrate"
    # the other worker took the group's last feature at once, before the calibration had ended ...
    assert other[0][:2] == ["run", [3]] and other[0][2] < calibrating[0][3]
    # ... and the rest, chunked at the calibrated size, ran once each
    ran = sorted(f for calls in (calibrating, other) for call, features, *_ in calls if call == "run" for f in features)
    assert ran == [1, 2, 3] and sorted(parquet_keys(tmp_path / "store")) == sorted(build_plan(cfg).keys())


def test_estimate_false_measures_nothing_unless_a_choice_is_left_to_measure(compose, tmp_path, capsys,
                                                                            monkeypatch):
    from pipeline.execution.scheduler import RunSummary

    monkeypatch.setattr(scheduler, "start_ray", lambda cluster: None)
    monkeypatch.setattr(scheduler, "gpus_per_worker", lambda cluster: 0)
    calibrations = []
    monkeypatch.setattr(scheduler, "run_plan", lambda *args: calibrations.append(args[-1]) or RunSummary())
    fixed = ("sweep.layers=[0]", "sweep.features=[1,2]", "sweep.estimate=false", f"store.root={tmp_path}", *FAST)
    assert run_sweep(compose(*fixed, "sweep.chunk_size=2", "optim.precision=fp32")) == 0
    assert calibrations == [None] and "cost:" not in capsys.readouterr().out
    # with the estimate off, chunk_size=auto and a precision other than fp32 are still measured on a worker
    for choice in (("sweep.chunk_size=auto", "optim.precision=fp32"), ("sweep.chunk_size=2", "optim.precision=auto")):
        assert run_sweep(compose(*fixed, *choice)) == 0
    assert len(calibrations) == 3 and all(callable(calibrate) for calibrate in calibrations[1:])
    assert "cost:" not in capsys.readouterr().out


def test_a_budget_sizes_the_sweep_by_measured_speed_and_a_second_run_keeps_the_size_it_finds(
        ray_local, compose, tmp_path, capsys):
    sized = ("sweep.layers=[0]", "sweep.features=[1,2]", "sweep.sizes=[{steps: 3}, {steps: 2, copies: 1}]",
             f"store.root={tmp_path}", "optim.copies=2", "progress.bar=false")
    # no size fits a microsecond: the last is taken, and said so
    assert run_sweep(compose(*sized, "sweep.budget_s=0.000001")) == 0
    out = capsys.readouterr().out
    assert "calibration on a worker, cpu (" in out
    assert ("size: optim.steps=2, optim.copies=1 (sweep.sizes), the last, and it does not fit sweep.budget_s=1e-06 "
            "with 2 workers: about ") in out
    first = build_plan(compose(*sized[:2], "optim.steps=2", "optim.copies=1"))
    assert sorted(parquet_keys(tmp_path)) == sorted(first.keys())
    # an hour would fit the larger size, but the one in the store is kept: nothing to do, nothing measured
    assert run_sweep(compose(*sized, "sweep.budget_s=3600")) == 0
    out = capsys.readouterr().out
    assert "size: optim.steps=2, optim.copies=1 (sweep.sizes), the size already in the store" in out
    assert "nothing to do" in out and "calibration" not in out
