"""Engine throughput: the batched, truncated optimizer beside the released code's loop.

    python bench/engine.py                       # CPU defaults, about 3 minutes on 2 cores
    python bench/engine.py --device cuda --precision bf16 --features 64 --copies 8 --steps 20

For each model (random weights) at an early, a middle and the last layer, two
ways of visualizing the layer's MLP features with the same optimizer settings:

- engine: ``--features`` features in one batch, the forward pass stopped right
  after the target layer (pipeline.Visualizer.run);
- reference: one feature per batch and every block run, as the released code
  does, timed on ``--reference-features`` features (each is an independent run,
  so its per-feature rate does not depend on how many are timed).

Figures: feature images per second, image-steps per second (feature images x
copies x steps per second) and FLOP/s, where FLOPs per step are counted once with
torch.utils.flop_counter.FlopCounterMode (matmuls and attention: augmentation and
element-wise work are not counted). On CUDA the FLOP/s is also given as a share of
the device's dense peak for the chosen precision (--peak-tflops overrides the
table). Each timed run includes its set-up and the final scoring pass, as a
sweep's unit does.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import time
from dataclasses import dataclass

import pipeline  # noqa: F401  (installs the torchvision shim before timm is imported)
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.engine.calibrate import PRECISIONS
from pipeline.engine.visualizer import Visualizer, pick_device
from pipeline.models import weights
from pipeline.models import zoo
from pipeline.engine.objectives import parse_objective
from pipeline.config import OptimConfig, paper_optim
from pipeline.engine.optimize import augment, seed_for, total_variation, visualize

MODELS = ("deit_tiny_patch16_224", "vit_base_patch32_224")
# Dense peaks in TFLOP/s from the vendors' data sheets (SXM parts). fp32 matmuls use
# tensor cores (the tf32 figure) only when torch.backends.cuda.matmul.allow_tf32 is set.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
}


@dataclass
class Measurement:
    features: int
    seconds: float
    step_flops: float  # one optimizer step over all features in the batch

    def feature_images_per_s(self) -> float:
        return self.features / self.seconds

    def image_steps_per_s(self, config: OptimConfig) -> float:
        return self.features * config.copies * config.steps / self.seconds

    def flops_per_s(self, config: OptimConfig, batches: int) -> float:
        return self.step_flops * config.steps * batches / self.seconds


def step_flops(score, features: int, image_size: tuple[int, int], config: OptimConfig,
               device: torch.device) -> float:
    """FLOPs of one optimizer step (augment, score, loss, backward) over ``features`` images."""
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in range(features)]
    images = torch.rand(features, 3, *image_size, device=device, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        copies = augment(images, generators, 0, config)
        loss = (-score(copies).float().mean(dim=1) + config.tv_weight * total_variation(copies)).sum()
        loss.backward()
    return float(counter.get_total_flops())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare(visualizer: Visualizer, channels_last: bool, compile_blocks: bool, layer: int) -> None:
    """GPU options: channels-last patch embedding; torch.compile of every block but the target's.

    The target block stays eager because its forward hook stops the pass by raising,
    which a compiled graph must not swallow; blocks after it never run when truncated.
    """
    if channels_last:
        visualizer.model.to(memory_format=torch.channels_last)
    if compile_blocks:
        for index, block in enumerate(visualizer.model.blocks):
            if index != layer:
                block.compile()


def timed(run, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def measure_pair(visualizer, layer, objective, config, device, features: list[int], reference_features: list[int],
                 repeats: int) -> tuple[Measurement, Measurement]:
    """(engine, reference), each timed ``repeats`` times, alternating, keeping the fastest run.

    Alternating and keeping the minimum makes the ratio robust to other processes
    on a shared machine, which only ever slow a run down.
    """
    seeds = [seed_for(feature, 0) for feature in features]
    engine_score = visualizer.score(layer, "mlp", objective, features, config.precision)
    reference_scores = [visualizer.score(layer, "mlp", objective, [feature], config.precision, truncate=False)
                        for feature in reference_features]

    def run_engine() -> None:
        visualizer.run(layer, "mlp", objective, features, seeds, config)

    def run_reference() -> None:
        for feature, score in zip(reference_features, reference_scores):
            visualize(score, [seed_for(feature, 0)], visualizer.image_size, config, device)

    engine_s, reference_s = [], []
    for _ in range(repeats):
        engine_s.append(timed(run_engine, device))
        reference_s.append(timed(run_reference, device))
    return (Measurement(len(features), min(engine_s),
                        step_flops(engine_score, len(features), visualizer.image_size, config, device)),
            Measurement(len(reference_features), min(reference_s),
                        step_flops(reference_scores[0], 1, visualizer.image_size, config, device)))


def peak_flops(device: torch.device, precision: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        precision = "tf32"
    name = torch.cuda.get_device_name(device)
    for part, peaks in PEAK_TFLOPS.items():
        if part in name:
            return peaks[precision] * 1e12
    return None


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    # Other processes on a shared CPU slow both ways alike but make absolute figures noisy.
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"load average at start {load} on {os.cpu_count()} cores")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS),
                        help="bf16/fp16 run the model under autocast; the image and optimizer stay fp32")
    parser.add_argument("--features", type=int, default=4, help="features per batch in the engine")
    parser.add_argument("--reference-features", type=int, default=1, help="features timed in the reference loop")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each way; the fastest counts")
    parser.add_argument("--copies", type=int, default=4, help="augmented copies per image (the paper: 8)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format for the model")
    parser.add_argument("--compile", action="store_true", help="torch.compile every block but the target's")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for the share-of-peak column")
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    config = paper_optim(steps=args.steps, copies=args.copies, precision=args.precision)
    objective = parse_objective("mean")
    peak = peak_flops(device, args.precision, args.peak_tflops)
    print(f"# engine benchmark, {dt.date.today().isoformat()}, {device_description(device)}, torch {torch.__version__}")
    print(f"# precision {args.precision}, steps {args.steps}, copies {args.copies}, engine batch {args.features} "
          f"features, reference {args.reference_features} feature(s) one at a time, full forward, "
          f"fastest of {args.repeats} alternating runs"
          + (", channels-last" if args.channels_last else "") + (", compiled blocks" if args.compile else ""))
    header = ["model", "layer", "way", "feature img/s", "image-steps/s", "GFLOP/step", "GFLOP/s"]
    if peak:
        header.append("% of peak")
    header.append("engine / reference")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for model in args.models:
        choice = weights.resolve(model, "random")
        depth = len(zoo.layout(model).layers)
        for layer in sorted({0, depth // 2, depth - 1}):
            # A fresh model per layer: compiled blocks depend on which block is the target.
            visualizer = Visualizer(model, choice, device)
            prepare(visualizer, args.channels_last, args.compile, layer)
            ours, theirs = measure_pair(visualizer, layer, objective, config, device, list(range(args.features)),
                                        list(range(args.reference_features)), args.repeats)
            ratio = ours.feature_images_per_s() / theirs.feature_images_per_s()
            for way, result, batches in (("engine", ours, 1), ("reference", theirs, theirs.features)):
                flops = result.flops_per_s(config, batches)
                row = [model, str(layer), way, f"{result.feature_images_per_s():.3f}",
                       f"{result.image_steps_per_s(config):.1f}", f"{result.step_flops / 1e9:.1f}",
                       f"{flops / 1e9:.1f}"]
                if peak:
                    row.append(f"{100 * flops / peak:.1f}")
                row.append(f"{ratio:.2f}x" if way == "engine" else "")
                print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
