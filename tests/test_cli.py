"""One command line for every command: help pages, override errors, experiments, validation, packaging."""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
import tracemalloc
import typing
import zipfile
from pathlib import Path

import pytest
import yaml

from pipeline import cli, commands, config, shell
from pipeline.execution import scheduler

REPO = Path(__file__).resolve().parents[1]
COMMANDS = list(commands.COMMANDS)
EXPERIMENTS = sorted((REPO / "conf" / "experiment").glob("*.yaml"))
SWEEP_EXPERIMENTS = ["demo", "paper_clip_b32", "paper_families", "paper_vit_b32", "smoke"]
PROBE_EXPERIMENTS = ["probe_fgbg", "probe_frequency", "probe_spatial", "probe_tokens"]


def run_main(name: str, capsys, *args: str):
    code = cli.main([name, *args])
    output = capsys.readouterr()
    return code, output.out, output.err


@pytest.fixture
def no_compute(monkeypatch, tmp_path):
    """Bad input must stop before Ray, and nothing may be written (the cwd stays empty)."""
    monkeypatch.setattr(scheduler, "start_ray", lambda *a, **k: pytest.fail("bad input reached Ray"))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    yield tmp_path / "store"
    assert not (tmp_path / "store").exists(), "bad input wrote the store"
    assert not list(work.iterdir()), f"bad input wrote {list(work.iterdir())}"


def assert_one_paragraph_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


# ----------------------------------------------------------------------------- help

@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_its_own_help_page(name, capsys):
    code, out, err = run_main(name, capsys, "--help")
    assert code == 0 and not err
    lines = out.splitlines()
    assert lines[0] == f"vit-atlas {name}: {commands.COMMANDS[name].purpose}."
    assert f"usage: vit-atlas {name} " in out and f"python -m pipeline {name} " in out
    assert "Hydra" not in lines[0] and "powered by" not in out
    settings = out[out.index("\nsettings ("):out.index("\nexamples:\n")]
    for key, value in cli.flatten_settings(_default_container(name)).items():
        assert f"  {key}={cli.format_setting(value)}" in settings, (key, value)
    examples = out[out.index("\nexamples:\n"):].strip().splitlines()[1:]
    assert 2 <= len(examples) <= 3 and all(e.strip().startswith(f"vit-atlas {name}") for e in examples)


def _default_container(name: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cli.compose(name), throw_on_missing=False)


def test_help_lists_only_the_commands_own_experiments(capsys):
    _, sweep_help, _ = run_main("sweep", capsys, "--help")
    _, probes_help, _ = run_main("probes", capsys, "--help")
    experiment_line = next(line for line in sweep_help.splitlines() if line.strip().startswith("experiment "))
    assert experiment_line.split()[1:-2] == [f"{e}," for e in SWEEP_EXPERIMENTS[:-1]] + [SWEEP_EXPERIMENTS[-1]]
    probes_line = next(line for line in probes_help.splitlines() if line.strip().startswith("experiment "))
    assert all(e in probes_line for e in PROBE_EXPERIMENTS) and not any(e in probes_line for e in SWEEP_EXPERIMENTS)
    assert "optim " in sweep_help and "paper_text" in sweep_help and "cluster " in probes_help
    _, status_help, _ = run_main("status", capsys, "--help")
    assert "config groups" not in status_help and "store.root=???" in status_help


def test_each_command_is_declared_once_and_no_module_shares_its_name():
    import importlib.util

    assert {path.stem for path in config.conf_dir().glob("*.yaml")} == set(commands.COMMANDS)
    for name, command in commands.COMMANDS.items():
        defaults = yaml.safe_load((config.conf_dir() / f"{name}.yaml").read_text())["defaults"]
        assert defaults[0] == f"{name}_schema", f"conf/{name}.yaml is not typed by its command's schema first"
        assert command.name == name and command.purpose and dataclasses.is_dataclass(command.schema)
        assert importlib.util.find_spec(f"pipeline.{name}") is None, f"pipeline/{name}.py shares the command's name"


def test_the_dispatcher_lists_the_commands_and_runs_them(capsys):
    assert cli.main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(f"  {name} " in listing for name in COMMANDS)
    assert cli.main(["swep"]) == 2 and "Did you mean: sweep?" in capsys.readouterr().err
    assert cli.main(["status", "--help"]) == 0 and capsys.readouterr().out.startswith("vit-atlas status:")


# ----------------------------------------------------------------------------- bad command lines

@pytest.mark.parametrize("override,fragments", [
    ("optim.steps=abc", ("optim.steps", "could not be converted to Integer")),
    ("sweep.features=[0,", ("Cannot read 'sweep.features=[0,'",)),
    ("sweep.colour=red", ("Unknown setting 'sweep.colour'", "chunk_size, estimate, features")),
    ("+sweep.colour=red", ("Unknown setting 'sweep.colour'",)),
    ("colour=red", ("Unknown setting 'colour'",)),
    ("experiment=nope", ("experiment=nope is not one of", "demo, paper_clip_b32")),
    ("experiment=probe_fgbg", ("'probe_fgbg' is an experiment of `vit-atlas probes`",)),
    ("optim.tv=0.1,1.0", ("add -m (--multirun)",)),
    ("hydra.run.dir=/tmp/x", ("remove it",)),
    ("store.root", ("not of the form key=value",)),
    ("--verbose", ("Unknown option '--verbose'",)),
])
def test_a_bad_override_is_one_paragraph_exit_2_and_writes_nothing(override, fragments, no_compute, capsys):
    code, out, err = run_main("sweep", capsys, override, f"store.root={no_compute}", "experiment=smoke")
    assert_one_paragraph_error(code, err, *fragments)
    assert not out


def test_the_cli_writes_no_hydra_directories_even_for_errors(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline", "sweep", "optim.steps=abc"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_cfg_job_prints_the_composed_config_and_runs_nothing(no_compute, capsys):
    code, out, err = run_main("probes", capsys, "experiment=probe_fgbg", "--cfg", "job")
    assert code == 0 and not err
    composed = yaml.safe_load(out)
    assert composed["probe"]["name"] == "fgbg" and "resnet50.tv_in1k" in composed["probe"]["models"]
    code, out, _ = run_main("sweep", capsys, "-m", "optim.tv=0.1,1.0", "--cfg", "job")
    assert code == 0 and out.count("# job ") == 2 and "tv: 0.1" in out and "tv: 1.0" in out


# ----------------------------------------------------------------------------- experiments

def _flatten_yaml(node, prefix: str = "") -> dict:
    if isinstance(node, dict) and node:
        flat = {}
        for key, value in node.items():
            flat.update(_flatten_yaml(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: node}


def _owners(experiment: Path) -> list[str]:
    return [name for name in COMMANDS if experiment.stem in cli.config_groups(name).get("experiment", [])]


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_experiment_composes_to_its_own_values(experiment):
    from omegaconf import OmegaConf

    owners = _owners(experiment)
    assert owners, f"{experiment.name} belongs to no command"
    values = _flatten_yaml(yaml.safe_load(experiment.read_text()))
    for name in owners:
        composed = OmegaConf.to_container(cli.compose(name, [f"experiment={experiment.stem}"]))
        flat = _flatten_yaml(composed)
        for key, value in values.items():
            assert key in flat, f"{name} experiment={experiment.stem}: {key} missing"
            assert flat[key] == value, f"{name} experiment={experiment.stem}: {key}={flat[key]!r}, file says {value!r}"


def test_experiments_belong_to_the_commands_they_were_written_for():
    assert [p.stem for p in EXPERIMENTS if _owners(p) == ["sweep"]] == SWEEP_EXPERIMENTS
    assert [p.stem for p in EXPERIMENTS if _owners(p) == ["probes"]] == PROBE_EXPERIMENTS


def test_the_fgbg_probe_without_boxes_stops_in_the_driver_before_any_worker(tmp_path, monkeypatch, capsys):
    from tests.analysis_fixtures import save_image
    import numpy as np

    monkeypatch.setattr(scheduler, "start_ray", lambda *a, **k: pytest.fail("a worker started"))
    for label in ("a", "b"):
        save_image(tmp_path / "images" / label / "0.png", np.full((8, 8, 3), 0.5))
    code, out, err = run_main("probes", capsys, "experiment=probe_fgbg", "probe.weights=random",
                              f"images.path={tmp_path / 'images'}", f"store.root={tmp_path / 'store'}")
    assert_one_paragraph_error(code, err, "The fgbg probe measures against object boxes: set images.boxes",
                               "CSV image_id,xmin,ymin,xmax,ymax[,label].")
    assert "results:" not in out and "probe tokens" not in out
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("name", ["probes", "examples"])
def test_a_missing_image_set_names_the_images_path_setting(name, no_compute, capsys):
    code, _, err = run_main(name, capsys, f"store.root={no_compute}")
    assert_one_paragraph_error(code, err, "set images.path=PATH")


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("override,fragments", [
    ("store.commit_every=0", ("store.commit_every=0 is not valid: it must be >= 1",)),
    ("store.commit_seconds=-1", ("store.commit_seconds=-1.0 is not valid: it must be > 0",)),
    ("store.commit_bytes=0", ("store.commit_bytes=0 is not valid: it must be >= 1", "67108864 for 64 MiB")),
    ("cluster.cpus_per_worker=-1", ("cluster.cpus_per_worker=-1.0 is not valid: it must be > 0",)),
    ("cluster.max_failures=-1", ("cluster.max_failures=-1 is not valid: it must be >= 0", "0 at the first failure")),
    ("cluster.workers=0", ("cluster.workers=0 is not valid: use auto or a whole number >= 1",)),
    ("cluster.gpus_per_worker=-0.5", ("cluster.gpus_per_worker=-0.5 is not valid",)),
    ("sweep.chunk_size=0", ("sweep.chunk_size=0 is not valid",)),
    ("sweep.features=5-2", ("Cannot read feature selection '5-2'", "write it as 2-5")),
    ("sweep.layers=3-1", ("Cannot read layer selection '3-1'", "write it as 1-3")),
    ("sweep.features=0-999999999", ("Feature 0-999999999 out of range", "valid features are 0..767")),
    ("sweep.features=last:999999999", ("Feature last:999999999 out of range", "valid features are 0..767",
                                       "last:N takes N up to 768")),
    ("sweep.features=first:769", ("Feature first:769 out of range", "first:N takes N up to 768")),
    ("sweep.layers=last:13", ("Layer last:13 out of range for 'deit_tiny_patch16_224'", "valid layers are 0..11")),
])
def test_bad_settings_stop_before_any_compute_with_exit_2(override, fragments, no_compute, capsys):
    code, out, err = run_main("sweep", capsys, "experiment=smoke", override, f"store.root={no_compute}")
    assert_one_paragraph_error(code, err, *fragments)
    assert "done:" not in out


@pytest.mark.parametrize("override,fragments", [
    ("optim.lr=nan", ("optim.lr=nan is not a finite number",)),
    ("optim.lr=inf", ("optim.lr=inf is not a finite number",)),
    ("optim.tv=-inf", ("optim.tv=-inf is not a finite number",)),
    ("optim.beta2=1.0", ("optim.beta2=1.0 is out of range: it must be >= 0 and < 1",)),
    ("optim.eps=0", ("optim.eps=0.0 is out of range: it must be >= 0 and > 0",)),
    ("+sweep.grid={optim.lr:[0.1,nan]}", ("sweep.grid.optim.lr[1]=nan is not a finite number",)),
    ("store.commit_seconds=nan", ("store.commit_seconds=nan is not a finite number",)),
    ("cluster.gpu_wait_s=inf", ("cluster.gpu_wait_s=inf is not a finite number",)),
    ("store.lease_expire_s=0", ("store.lease_expire_s=0.0 is not valid: it must be > 0",)),
    ("sweep.seeds=[]", ("sweep.seeds=[] selects no seeds", "e.g. sweep.seeds=[0]")),
    ("sweep.layers=[]", ("sweep.layers=[] selects no layers",)),
    ("sweep.features=[]", ("sweep.features=[] selects no features",)),
    ("sweep.models=[]", ("sweep.models is empty",)),  # held before; here beside the other axes
])
def test_every_number_is_finite_and_in_range_and_no_axis_is_empty_before_any_compute(override, fragments,
                                                                                      no_compute, capsys):
    code, out, err = run_main("sweep", capsys, "experiment=smoke", override, f"store.root={no_compute}")
    assert_one_paragraph_error(code, err, *fragments)
    assert "plan:" not in out  # nothing written: no_compute checks the store root (no leases/) and the cwd


@pytest.mark.parametrize("overrides,fragments", [
    (["model.img_size=100000"], ("model.img_size=100000 is too large for 'deit_tiny_patch16_224': 39,062,500 patch "
                                 "tokens per image", "more than model.max_tokens=16,384",
                                 "Valid sizes are multiples of 16 up to 2048, e.g. 2000, 2016, 2032, 2048;")),
    (["model.img_size=4096", "model.max_tokens=70000", "optim.copies=64"],
     ("model.img_size=4096 needs at least 1,0", "GiB for 'deit_tiny_patch16_224'", "65,537x65,537 attention map",
      "more than this machine's")),
    (["model.max_tokens=0"], ("model.max_tokens=0 is not valid: it must be >= 1",)),
])
def test_an_input_size_beyond_the_token_bound_or_this_machines_memory_stops_before_any_allocation(
        overrides, fragments, no_compute, capsys):
    code, out, err = run_main("sweep", capsys, "experiment=smoke", "sweep.models=[deit_tiny_patch16_224]",
                              *overrides, f"store.root={no_compute}")
    assert_one_paragraph_error(code, err, *fragments)  # from the plan: before the lease, Ray or any model
    listed = err.partition("e.g. ")[2].partition(";")[0]
    assert "100000" not in listed  # the refused size is never offered as a valid one


def directions_file(folder: Path, problem: str) -> Path:
    """A target.directions file with one problem, for deit_tiny's MLP (768 wide) at layer 0."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    folder.mkdir(exist_ok=True)
    rows = np.eye(3, 768, dtype=np.float32)
    if problem in ("features", "missing"):
        np.save(folder / "rows.npy", rows)  # a good file: the sweep asks for a row it lacks, or names another
    elif problem == "width":
        np.save(folder / "rows.npy", rows[:, :192])
    elif problem == "nan":
        rows[1, 5] = np.nan
        np.save(folder / "rows.npy", rows)
    elif problem == "inf bias":
        save_file({"W_enc": torch.eye(768, 3), "b_enc": torch.tensor([0.0, float("inf"), 0.0])},
                  str(folder / "sae.safetensors"))
    elif problem == "no W_enc":
        save_file({"W_dec": torch.eye(3, 768), "b_dec": torch.zeros(768)}, str(folder / "sae.safetensors"))
    elif problem == "shapes":
        save_file({"W_enc": torch.eye(768, 3), "b_enc": torch.zeros(4)}, str(folder / "sae.safetensors"))
    elif problem == "corrupt":
        (folder / "sae.safetensors").write_bytes(b"\x00" * 64)
    elif problem == "pickle":
        torch.save({"W_enc": torch.eye(768, 3), "note": object()}, folder / "sae.pt")
    elif problem == "1-D":
        np.save(folder / "rows.npy", rows[0])
    elif problem == "suffix":
        np.savetxt(folder / "rows.csv", rows)
    return folder / "missing.npy" if problem == "missing" else next(folder.iterdir())


@pytest.mark.parametrize("problem,fragments", [
    ("width", ("holds directions of width 192, but target 'mlp' at layer 0 of 'deit_tiny_patch16_224' has width 768",
               "`vit-atlas zoo describe=[MODEL]` lists the widths")),
    ("nan", ("holds values that are not finite (NaN or inf) in its directions, rows [1]",)),
    ("inf bias", ("not finite (NaN or inf) in its b_enc, entries [1]",)),
    ("no W_enc", ("has no W_enc (found ['W_dec', 'b_dec'])",)),
    ("shapes", ("inconsistent shapes (b_enc (4,))", "b_enc (n)")),
    ("corrupt", ("could not be read as a safetensors file",)),
    ("pickle", ("could not be read as a torch file", "pickled data (refused for safety)")),
    ("1-D", ("holds an array of shape (768,): a matrix of directions is 2-D",)),
    ("suffix", ("has an unknown format '.csv'", "a .npy of rows (n, d)")),
    ("missing", ("missing.npy' cannot be read (FileNotFoundError",)),
    ("features", ("Feature [3] out of range for the directions of target 'mlp' at layer 0", "valid features are 0..2")),
])
def test_a_bad_directions_file_is_one_paragraph_before_any_compute(problem, fragments, no_compute, tmp_path, capsys):
    path = directions_file(tmp_path / "files", problem)
    features = "[3]" if problem == "features" else "all"
    code, out, err = run_main("sweep", capsys, "experiment=smoke", "sweep.models=[deit_tiny_patch16_224]",
                              "sweep.layers=[0]", f"sweep.features={features}", f"target.directions={path}",
                              f"store.root={no_compute}")
    named = [f"target.directions='{path}'"] if problem != "features" else []
    assert_one_paragraph_error(code, err, *named, *fragments)
    assert "plan:" not in out  # nothing written: no_compute checks the store root (no leases/) and the cwd


def test_the_residual_stream_is_validated_per_layer_as_other_targets(no_compute, capsys):
    # Swin's stream widens stage by stage: 96 at layer 0, 192 at layer 2.
    code, _, err = run_main("sweep", capsys, "experiment=smoke", "sweep.models=[swin_tiny_patch4_window7_224]",
                            "target.kind=residual", "sweep.layers=[0,2]", "sweep.features=[150]",
                            f"store.root={no_compute}")
    assert_one_paragraph_error(code, err, "Feature [150] out of range for target 'residual' at layer 0 of "
                                          "'swin_tiny_patch4_window7_224', which has 96 features")
    code, out, err = run_main("zoo", capsys, "describe=[swin_tiny_patch4_window7_224]")
    assert code == 0 and "residual" in out.splitlines()[2]
    rows = [line.split() for line in out.splitlines()[3:]]
    assert [row[3] for row in rows if row[0] in ("0", "2", "11")] == ["96", "192", "768"]  # its width per layer
    assert all(row[-1].endswith("residual") for row in rows)


def test_a_huge_feature_range_is_refused_without_building_it(compose):
    from pipeline.errors import PipelineError
    from pipeline.execution.plan import build_plan

    cfg = compose("sweep.layers=[0]", "sweep.features=0-3000000")
    tracemalloc.start()
    with pytest.raises(PipelineError, match="out of range"):
        build_plan(cfg)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 20 * 2**20, f"refusing the range allocated {peak / 2**20:.0f} MiB"


def test_commands_hand_typed_sections_to_the_stages(compose):
    cfg = compose("experiment=demo")
    assert isinstance(cfg, config.SweepConfig) and isinstance(cfg.optim, config.OptimConfig)
    assert cfg.optim.noise is config.Noise.code and cfg.target.kind is config.TargetKind.mlp  # checked choices
    assert isinstance(cfg.cluster, config.ClusterSection) and isinstance(cfg.store, config.StoreSection)
    assert cfg.optim.lr == "auto" and cfg.optim.precision == "auto" and cfg.store.commit_seconds == 120.0
    assert cfg.sweep.budget_s == 210 and cfg.sweep.sizes[-1] == {"steps": 20, "copies": 4}  # sized as measured
    probes = cli.load("probes", "experiment=probe_frequency")
    assert isinstance(probes.probe.frequency, config.FrequencyParams) and probes.probe.frequency.radii[0] == 2.0


def _sections(schema: type) -> list[type]:
    hints = typing.get_type_hints(schema)
    nested = [hints[f.name] for f in dataclasses.fields(schema) if dataclasses.is_dataclass(hints[f.name])]
    return [schema, *(section for child in nested for section in _sections(child))]


def test_the_schemas_are_types_only_and_the_paper_settings_live_in_the_yaml():
    from pipeline.engine import parameterizations

    sections = {section for schema in (command.schema for command in commands.COMMANDS.values()) for section in _sections(schema)}
    sections |= set(parameterizations.PARAMETERIZATIONS.values())  # the types of optim.param, by its name
    assert config.OptimConfig in sections and config.ClusterSection in sections and len(sections) > 20
    for section in sections:
        defaulted = [f.name for f in dataclasses.fields(section)
                     if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
        assert not defaulted, f"{section.__name__} has defaults {defaulted}"

    paper = yaml.safe_load((REPO / "conf" / "optim" / "paper.yaml").read_text())
    assert paper.pop("defaults") == [{"param": "pixel"}, "_self_"]
    pixel = yaml.safe_load((REPO / "conf" / "optim" / "param" / "pixel.yaml").read_text())
    built = dataclasses.asdict(config.paper_optim(steps=7))
    assert built == {**paper, "steps": 7, "lr": 0.1, "param": pixel}
    assert config.paper_optim(family="clip").lr == 1.0
    fourier = config.paper_optim(param={"name": "fourier", "decay": 1.5})
    assert fourier.lr == 0.05 and fourier.param == {**config.param_values("fourier"), "decay": 1.5}


# ----------------------------------------------------------------------------- other commands

def test_status_and_zoo_take_settings_like_every_command(synthetic_store_root, capsys):
    code, out, err = run_main("status", capsys, f"store.root={synthetic_store_root}")
    assert code == 0 and out.startswith(f"store {synthetic_store_root}") and "total" in out
    code, _, err = run_main("status", capsys)
    assert_one_paragraph_error(code, err, "store.root is required")
    code, _, err = run_main("zoo", capsys, "list")
    assert_one_paragraph_error(code, err, "'list' is not of the form key=value")
    code, _, err = run_main("zoo", capsys, "describe=[swin_tiny]")
    assert_one_paragraph_error(code, err, "Did you mean: swin_tiny_patch4_window7_224")


def test_zoo_passes_img_size_only_where_describe_takes_it(capsys):
    import inspect

    from pipeline.models import zoo

    code, out, err = run_main("zoo", capsys, "describe=[deit_tiny_patch16_224]", "model.img_size=224")
    if "img_size" in inspect.signature(zoo.describe).parameters:
        assert code == 0 and "deit_tiny_patch16_224" in out
    else:
        assert_one_paragraph_error(code, err, "model.img_size is not supported")


def test_printed_commands_work_as_printed_in_a_new_shell(synthetic_store_root, tmp_path, monkeypatch, capsys):
    from pipeline.execution import driver
    from pipeline.store.store import Store

    driver.print_where(Store(str(synthetic_store_root)))
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.strip().startswith("status:"))
    status = shlex.split(line.partition("status:")[2])
    script = Path(sys.executable).with_name("vit-atlas")
    expected = [str(script), "status"] if script.is_file() else [sys.executable, "-m", "pipeline", "status"]
    assert status == [*expected, f"store.root={synthetic_store_root}"]
    # A new shell: no virtual environment on PATH, another directory.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
           "RAY_USAGE_STATS_ENABLED": "0"}
    result = subprocess.run(status, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"store {synthetic_store_root}")
    # With a vit-atlas script beside the interpreter, that script is what is printed.
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "vit-atlas").write_text("#!/bin/sh\n")
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    assert shell.shell_command("atlas", "store.root=/a b", "out=site") == f"{bin_dir}/vit-atlas atlas 'store.root=/a b' out=site"


# ----------------------------------------------------------------------------- packaging

def test_the_wheel_holds_every_config_file_and_the_vit_atlas_script(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(REPO, source, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "outputs", "*.egg-info",
                                                  "__pycache__", ".pytest_cache", "site"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("vit_atlas-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"pipeline/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")}
    assert len(expected) >= 15 and expected <= names, sorted(expected - names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "vit-atlas = pipeline.cli:script" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_config_directory_is_found_through_the_package():
    assert config.conf_dir().resolve() == (REPO / "conf").resolve()
    assert (REPO / "pipeline" / "conf").is_symlink()
