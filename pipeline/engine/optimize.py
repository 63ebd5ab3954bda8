"""The paper's visualization optimizer, batched over many images at once.

The optimizer knows nothing about models: it maximizes a *score*, a function
that maps augmented images (features, copies, 3, H, W) in pixel space [0, 1]
to one score per image (features, copies). Each feature has its own image, its
own random stream (seeded like the released code: with the feature index, plus
``seed * 1_000_003``) and, since Adam is element-wise and the loss is a sum of
per-feature terms, its own independent optimization: batching F features is F
single runs done in one forward pass.

Per step, as in ../shared/PAPER.md: copies of each image -> colour shift ->
noise -> jitter (circular shift) -> score; loss = -mean score over copies
(divided by the number of copies, as the released code's ``diag().mean()`` does,
unless ``objective_scale`` is ``paper``) + lambda * TV(augmented copies); Adam(betas 0.5, 0.99), cosine-annealed lr; clamp
to [0, 1] after every step. The image comes from the parameterization ``config.param`` names
(pipeline/engine/parameterizations.py): the paper's raw pixels by default, or Lucid's
Fourier basis or MACO's phase, whose tensors Adam optimizes instead of the pixels;
the augmentation ensemble and TV act on the images they produce.

Two lines are recorded during the run: the *trace*, the augmented copies' mean score (the objective
the optimizer sees; it scores jittered, noised, colour-shifted copies, so it need not follow the
image's own activation: 0.14 against 5.03 at the end of the demo's DINOv2 layer 1 feature 0), and the
*curve*, the un-augmented image scored as the final activation is, which ends at that activation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.config import OptimConfig
from pipeline.engine import parameterizations

SEED_STRIDE = 1_000_003  # seed 0 reproduces the released code's "seed = feature index"

Score = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Visualization:
    images: torch.Tensor  # (F, 3, H, W) in [0, 1], on the CPU
    activations: torch.Tensor  # (F,) score of each final image, un-augmented
    traces: torch.Tensor  # (F, trace points): mean score over copies during the run, the optimizer's objective
    # (F, curve points): the score of the un-augmented image (as ``activations`` is scored) at steps 0, k, 2k, ...
    # (k = ceil(steps / trace_points), each before that step's update), then of the final image: the activation
    # the run drives up, its last column ``activations`` itself
    curves: torch.Tensor
    finite: torch.Tensor  # (F,) bool: image and activation are finite


def visualize(score: Score, seeds: list[int], image_size: tuple[int, int], config: OptimConfig,
              device: torch.device | str = "cpu") -> Visualization:
    """Optimize one image per entry of ``seeds`` (one generator each) to maximize ``score``."""
    device = torch.device(device)
    height, width = image_size
    generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
    parameterization = parameterizations.create(config.param)
    params = parameterization.init(generators, (height, width), device)
    optimizer = torch.optim.Adam(params, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps, eta_min=0.0)
    trace_every = max(1, math.ceil(config.steps / max(1, config.trace_points)))
    traces, curves = [], []
    for step in range(config.steps):
        images = parameterization.images(params)
        if step % trace_every == 0:
            # One un-augmented forward of the batch, no graph: at trace_points=20, about 1% of a run (deit_tiny,
            # one feature, 100 steps, one CPU thread: 0.12 CPU s at layer 0, 1.05 at layer 11; 1.2% of the
            # FLOPs; docs/benchmarks.md, "The clean activation curve").
            with torch.no_grad():
                curves.append(score(images.detach().unsqueeze(1)).float()[:, 0])
        copies = augment(images, generators, step, config)
        scores = score(copies)  # (F, copies)
        loss = losses(scores, copies, config).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            parameterization.project(params)
        if step % trace_every == 0 or step == config.steps - 1:
            traces.append(scores.detach().float().mean(dim=1))
    with torch.no_grad():
        final = parameterization.images(params).detach()
        activations = score(final.unsqueeze(1)).float()[:, 0]
    curves.append(activations)
    finite = torch.isfinite(activations) & torch.isfinite(final).flatten(1).all(dim=1)
    return Visualization(final.cpu(), activations.cpu(), torch.stack(traces, dim=1).cpu(),
                         torch.stack(curves, dim=1).cpu(), finite.cpu())


def losses(scores: torch.Tensor, copies: torch.Tensor, config: OptimConfig) -> torch.Tensor:
    """(F, copies) scores of the augmented copies (F, copies, 3, H, W) -> (F,) each feature's loss.

    Adam is insensitive to the loss's overall scale but not to the balance of its terms: the
    released code's objective, ``-all_feats[:8, f].diag().mean()``, is the mean of an 8 x 8
    diagonal matrix, i.e. the copies' mean divided by 8, so its figures were made with TV
    weighing 8x (the number of copies x) the stated lambda against the objective.
    """
    objective = scores.float().mean(dim=1)
    if config.objective_scale == "code":
        objective = objective / scores.shape[1]
    return -objective + config.tv_weight * total_variation(copies)


def seed_for(feature: int, seed: int, attempt: int = 0) -> int:
    """The random stream of one unit; a retry after a non-finite result shifts it by ``attempt``."""
    return feature + (seed + attempt * 7919) * SEED_STRIDE


def augment(images: torch.Tensor, generators: list[torch.Generator], step: int, config: OptimConfig) -> torch.Tensor:
    """(F, 3, H, W) -> (F, copies, 3, H, W): colour shift, noise, jitter; fresh draws each step."""
    count, copies = images.shape[0], config.copies
    height, width = images.shape[-2:]
    device = images.device
    x = images.unsqueeze(1).expand(count, copies, 3, height, width)

    if config.colour_shift != "none":
        uniform = torch.stack([torch.rand(2, copies, 3, generator=g, device=device) for g in generators], dim=1)
        mu = (uniform[0] * 2 - 1)[..., None, None]
        sigma = torch.exp(uniform[1] * 2 - 1)[..., None, None]
        x = (x - mu) / sigma if config.colour_shift == "code" else sigma * x + mu

    if config.noise == "code":
        remaining = (config.steps - step) / config.steps
        offsets = torch.stack([torch.randn(copies, 3, generator=g, device=device) for g in generators])
        x = x + offsets[..., None, None] * config.noise_std * remaining
    elif config.noise == "paper":
        x = x + torch.stack([torch.randn(copies, 3, height, width, generator=g, device=device) for g in generators])

    if config.jitter:
        span = 2 * config.jitter + 1
        shifts = torch.stack([torch.randint(0, span, (2,), generator=g, device=device) for g in generators])
        x = roll_each(x, shifts[:, 0] - config.jitter, shifts[:, 1] - config.jitter)
    return x


def roll_each(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """``torch.roll`` over (H, W) with a different shift per leading index, all copies alike."""
    count, copies, channels, height, width = x.shape
    rows = (torch.arange(height, device=x.device)[None, :] - dy[:, None]) % height
    cols = (torch.arange(width, device=x.device)[None, :] - dx[:, None]) % width
    x = x.gather(3, rows[:, None, None, :, None].expand(count, copies, channels, height, width))
    return x.gather(4, cols[:, None, None, None, :].expand(count, copies, channels, height, width))


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """(F, copies, 3, H, W) -> (F,): four directions, each the L2 norm of differences over H x W,
    averaged over copies and channels, summed over directions."""
    differences = (
        x[..., 1:, :] - x[..., :-1, :],
        x[..., :, 1:] - x[..., :, :-1],
        x[..., 1:, 1:] - x[..., :-1, :-1],
        x[..., 1:, :-1] - x[..., :-1, 1:],
    )
    return sum(d.flatten(-2).norm(dim=-1).mean(dim=(1, 2)) for d in differences)
