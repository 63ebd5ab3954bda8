"""Precision and batch chosen by measurement (pipeline.engine.calibrate), on machines the tests simulate.

The timings are replaced, so each test is a machine where bf16 is faster, slower or emulated, or where a larger
batch does or does not pay: what auto picks must be the faster one. The model is real (deit_tiny, random
weights): the probe's shape and the batch bound come from its layout. One test times nothing it replaces: oneDNN
and ATen limited to AVX2, this CPU emulates bf16 as an AVX2 CPU does (~50x slower), and the `sweep` command must
see it.
"""

from __future__ import annotations

import re

import pytest
import torch

from installed_script import vit_atlas
from pipeline.engine import calibrate
from pipeline.engine.objectives import parse_objective
from pipeline.config import paper_optim
from pipeline.engine.visualizer import Visualizer
from pipeline.models import weights

MEAN = parse_objective("mean")
ONE_STEP = paper_optim(steps=1, copies=1)


@pytest.fixture(scope="module")
def visualizer():
    return Visualizer("deit_tiny_patch16_224", weights.resolve("deit_tiny_patch16_224", "random"),
                      torch.device("cpu"))


def simulate(monkeypatch, matmul_gflops: dict[torch.dtype, float], step_s: dict[str, float]) -> list[str]:
    """A machine whose probe product runs at ``matmul_gflops`` and whose optimizer step of one feature takes
    ``step_s`` seconds per precision; returns the precisions whose steps were timed."""
    timed = []
    monkeypatch.setattr(calibrate, "matmul_rate", lambda width, hidden, dtype, device: matmul_gflops[dtype])

    def step(visualizer, layer, target, objective, features, optim, precision, directions=None):
        timed.append(precision)
        return step_s[precision] * len(features)

    monkeypatch.setattr(calibrate, "step_seconds", step)
    return timed


def test_auto_picks_bf16_where_a_timed_bf16_step_is_faster(visualizer, monkeypatch):
    timed = simulate(monkeypatch, {torch.float32: 50.0, torch.bfloat16: 180.0}, {"fp32": 1.0, "bf16": 0.55})
    choice = calibrate.choose_precision(visualizer, "auto", 3, "mlp", MEAN, ONE_STEP)
    assert choice.used == "bf16" and "fp32" in timed and "bf16" in timed  # decided by real steps, not the probe
    assert choice.describe() == ("precision auto -> bf16 (bf16 1.82 against fp32 1 feature-steps/s "
                                 "(optimizer steps))")


def test_auto_keeps_fp32_where_a_timed_bf16_step_is_slower(visualizer, monkeypatch):
    # the probe alone would say bf16 (a fast product), the steps say otherwise: the steps decide
    simulate(monkeypatch, {torch.float32: 50.0, torch.bfloat16: 90.0}, {"fp32": 1.0, "bf16": 1.3})
    assert calibrate.choose_precision(visualizer, "auto", 3, "mlp", MEAN, ONE_STEP).used == "fp32"


def test_auto_takes_fp32_from_the_probe_alone_where_bf16_is_emulated(visualizer, monkeypatch):
    """An AVX2 CPU: bf16 products ~50x slower; a bf16 step there would take minutes to time."""
    timed = simulate(monkeypatch, {torch.float32: 58.0, torch.bfloat16: 1.2}, {"fp32": 1.0, "bf16": 50.0})
    choice = calibrate.choose_precision(visualizer, "auto", 3, "mlp", MEAN, ONE_STEP)
    assert choice.used == "fp32" and timed == []
    assert choice.describe() == "precision auto -> fp32 (bf16 1.2 against fp32 58 GFLOP/s (matmul probe))"


# What an AVX2 CPU has: no AVX-512 (BF16) or AMX kernels in oneDNN's matmuls nor in ATen's own.
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def test_on_a_cpu_limited_to_avx2_the_sweep_command_chooses_fp32_and_names_an_explicit_bf16s_slowdown(tmp_path):
    one_unit = ["sweep.models=[deit_tiny_patch16_224]", "model.weights=random", "model.img_size=32",
                "sweep.layers=[0]", "sweep.features=[0]", "optim.steps=1", "optim.copies=1", "cluster.workers=1"]
    auto = vit_atlas("sweep", *one_unit, f"store.root={tmp_path / 'auto'}", cwd=tmp_path, timeout=300, env=AVX2_ONLY)
    assert auto.returncode == 0, auto.stdout[-3000:] + auto.stderr[-3000:]
    line = next(line for line in auto.stdout.splitlines() if line.startswith("calibration on a worker"))
    assert "cpu (AVX2)" in line and "precision auto -> fp32 (bf16 " in line, line
    low, fp32 = map(float, re.search(r"bf16 ([\d.,]+) against fp32 ([\d.,]+) GFLOP/s", line).groups())
    assert low * 5 < fp32, line  # emulated, measured: not a figure the sweep was told

    explicit = vit_atlas("sweep", *one_unit, "optim.precision=bf16", f"store.root={tmp_path / 'bf16'}",
                         cwd=tmp_path, timeout=300, env=AVX2_ONLY)
    assert explicit.returncode == 0, explicit.stdout[-3000:] + explicit.stderr[-3000:]
    assert re.search(r"precision bf16 is [\d.,]+x slower than fp32 on this device", explicit.stdout), explicit.stdout


def test_an_explicit_emulated_bf16_runs_and_names_its_slowdown(visualizer, monkeypatch):
    simulate(monkeypatch, {torch.float32: 58.0, torch.bfloat16: 1.16}, {"fp32": 1.0, "bf16": 50.0})
    choice = calibrate.choose_precision(visualizer, "bf16", 3, "mlp", MEAN, ONE_STEP)
    assert choice.used == "bf16"
    assert choice.describe().startswith("precision bf16 is 50.0x slower than fp32 on this device (bf16 1.16 "
                                        "against fp32 58 GFLOP/s")


def test_the_visualizer_measures_auto_once_and_its_runs_use_the_choice(visualizer, monkeypatch):
    fresh = Visualizer("deit_tiny_patch16_224", visualizer.weights, torch.device("cpu"))
    simulate(monkeypatch, {torch.float32: 50.0, torch.bfloat16: 180.0}, {"fp32": 1.0, "bf16": 0.5})
    assert fresh.precision("auto", 0, "mlp", MEAN, ONE_STEP).used == "bf16"
    simulate(monkeypatch, {torch.float32: 50.0, torch.bfloat16: 1.0}, {"fp32": 1.0, "bf16": 50.0})
    assert fresh.precision("auto", 5, "mlp", MEAN, ONE_STEP).used == "bf16"  # one choice per worker and model


def batches(monkeypatch, seconds: dict[int, float]) -> list[int]:
    """A device where a step of a batch of b features takes ``seconds[b]``; returns the batches timed."""
    timed = []

    def step(visualizer, layer, target, objective, features, optim, precision, directions=None):
        timed.append(len(features))
        return seconds[len(features)]

    monkeypatch.setattr(calibrate, "step_seconds", step)
    return timed


def test_auto_batch_doubles_while_throughput_rises_by_the_margin(visualizer, monkeypatch):
    # feature-steps/s: 1, 2, 2.67 (+33 %), 2.76 (+3 %: not worth a batch twice as large)
    timed = batches(monkeypatch, {1: 1.0, 2: 1.0, 4: 1.5, 8: 2.9})
    choice = calibrate.choose_batch(visualizer, 0, "mlp", MEAN, ONE_STEP, "fp32", most=64)
    assert choice.batch == 4 and timed == [1, 1, 2, 4, 8]  # a warm-up, then the ladder
    assert choice.seconds_per_feature_step == pytest.approx(1.5 / 4)
    assert "8 was not 10% faster" in choice.describe()


def test_auto_batch_stays_at_one_where_batching_is_slower(visualizer, monkeypatch):
    """A CPU: two features together take longer per feature than one."""
    batches(monkeypatch, {1: 1.0, 2: 2.3})
    assert calibrate.choose_batch(visualizer, 0, "mlp", MEAN, ONE_STEP, "fp32", most=64).batch == 1


def test_auto_batch_keeps_to_its_time_budget_and_to_the_work_per_worker(visualizer, monkeypatch):
    budget = calibrate.BATCH_BUDGET_S["cpu"]
    timed = batches(monkeypatch, {1: budget / 2.5, 2: budget / 2.5})  # batch 2 would pass the budget
    choice = calibrate.choose_batch(visualizer, 0, "mlp", MEAN, ONE_STEP, "fp32", most=64)
    assert choice.batch == 1 and timed == [1, 1] and "budget" in choice.stopped
    timed = batches(monkeypatch, {1: 0.1, 2: 0.1, 3: 0.1})
    assert calibrate.choose_batch(visualizer, 0, "mlp", MEAN, ONE_STEP, "fp32", most=3).batch == 3
    assert timed == [1, 1, 2, 3]


def test_the_batch_search_after_timed_precision_steps_does_not_time_its_batch_one_again(visualizer, monkeypatch):
    """A worker's calibration: the precision's timed step of feature 0 is the search's batch 1 (a step takes
    seconds on a CPU); the search times only the larger batches, and decides as it would have."""
    timed = simulate(monkeypatch, {torch.float32: 50.0, torch.bfloat16: 180.0}, {"fp32": 1.0, "bf16": 0.5})
    choice = calibrate.choose_precision(visualizer, "auto", 3, "mlp", MEAN, ONE_STEP)
    assert choice.used == "bf16" and len(timed) == 4  # a warm-up and a timed step in each precision
    batch = calibrate.choose_batch(visualizer, 3, "mlp", MEAN, ONE_STEP, "bf16", most=4, timed=choice.step)
    assert timed[4:] == ["bf16"]  # batch 2 only: no warm-up, no batch 1
    assert batch.measured == ((1, 2.0), (2, 2.0)) and batch.batch == 1 and "2 was not 10% faster" in batch.stopped
    # a step of another layer (or precision, or optimizer) is not this search's batch 1: it times its own
    calibrate.choose_batch(visualizer, 5, "mlp", MEAN, ONE_STEP, "bf16", most=2, timed=choice.step)
    assert timed[5:] == ["bf16"] * 3
