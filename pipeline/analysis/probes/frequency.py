"""Frequency: top-1 against the cut-off radius of low-pass and high-pass 2-D FFT filters.

The filter acts on the model's crop in [0, 1] pixels (per channel, centred
spectrum), before normalization; the radius is in cycles per image, so 112 is
the Nyquist limit along an axis of a 224 crop. Ideal filters keep frequencies
inside (low-pass) or outside (high-pass) the radius; Gaussian ones weight them by
exp(-d^2 / 2 r^2) or one minus it. Filtered pixels are not clamped: a high-pass
image has no mean, and clamping would put low frequencies back.
"""

from __future__ import annotations

import pyarrow as pa
import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.analysis.probes import classifier
from pipeline.analysis.probes.base import Batch, Condition, Probe, Tally, aggregate, topk_hits
from pipeline.analysis.probes.plots import figure, png

KINDS = ("lowpass", "highpass")
FILTERS = ("ideal", "gaussian")


def frequency_filter(crops: torch.Tensor, kind: str, shape: str, radius: float) -> torch.Tensor:
    """(B, 3, H, W) -> the same images with the filter applied in the Fourier domain."""
    height, width = crops.shape[-2:]
    fy = torch.fft.fftshift(torch.fft.fftfreq(height, device=crops.device)) * height
    fx = torch.fft.fftshift(torch.fft.fftfreq(width, device=crops.device)) * width
    distance = torch.sqrt(fy.view(-1, 1) ** 2 + fx.view(1, -1) ** 2)
    if shape == "ideal":
        low = (distance <= radius).float()
    else:
        low = torch.exp(-distance**2 / (2 * radius**2))
    gain = low if kind == "lowpass" else 1 - low
    spectrum = torch.fft.fftshift(torch.fft.fft2(crops), dim=(-2, -1)) * gain
    return torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real


class FrequencyProbe(Probe):
    name = "frequency"

    def conditions(self, params: dict, model: str) -> list[Condition]:
        classifier.check_classifier(model)
        for key, allowed in (("kinds", KINDS), ("filters", FILTERS)):
            bad = [v for v in params[key] if v not in allowed]
            if bad:
                raise PipelineError(f"probe.frequency.{key} has {bad}; allowed: {', '.join(allowed)}.")
        if not params["radii"] or any(r <= 0 for r in params["radii"]):
            raise PipelineError("probe.frequency.radii must be a non-empty list of positive cut-off radii "
                                "(cycles per image).")
        return [Condition("full")] + [Condition(f"{kind}_{shape}", float(r)) for kind in params["kinds"]
                                      for shape in params["filters"] for r in params["radii"]]

    @torch.no_grad()
    def measure(self, model: nn.Module, batch: Batch, conditions: list[Condition], params: dict, tally: Tally,
                model_name: str) -> None:
        crops = batch.crops().to(batch.device)
        for condition in conditions:
            images = crops
            if condition.name != "full":
                kind, shape = condition.name.split("_")
                images = frequency_filter(crops, kind, shape, condition.param)
            top1, top5 = topk_hits(model(batch.model_input(images)), batch.labels)
            tally.add(condition, "top1", top1, len(batch.images))
            tally.add(condition, "top5", top5, len(batch.images))

    def report(self, results: pa.Table) -> str:
        rows = [r for r in aggregate(results) if r["metric"] == "top1"]
        radii = sorted({r["param"] for r in rows if r["param"] is not None})
        lines = ["| model | filter | " + " | ".join(f"r={r:g}" for r in radii) + " |",
                 "|---|---|" + "---|" * len(radii)]
        for model, weights in sorted({(r["model"], r["weights"]) for r in rows}):
            mine = [r for r in rows if (r["model"], r["weights"]) == (model, weights)]
            full = next((r["value"] for r in mine if r["condition"] == "full"), float("nan"))
            lines.append(f"| {model} [{weights}] | none (top-1 {100 * full:.2f}) |" + " |" * len(radii))
            for name in sorted({r["condition"] for r in mine} - {"full"}):
                by_radius = {r["param"]: r["value"] for r in mine if r["condition"] == name}
                cells = [f"{100 * by_radius[r]:.2f}" if r in by_radius else "" for r in radii]
                lines.append(f"| {model} [{weights}] | {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def plot(self, results: pa.Table) -> bytes:
        rows = [r for r in aggregate(results) if r["metric"] == "top1" and r["condition"] != "full"]
        fig, axes = figure(2)
        for axis, kind in zip(axes, KINDS):
            for model, weights in sorted({(r["model"], r["weights"]) for r in rows}):
                for shape, style in zip(FILTERS, ("o-", "s--")):
                    points = sorted((r["param"], 100 * r["value"]) for r in rows if r["model"] == model
                                    and r["weights"] == weights and r["condition"] == f"{kind}_{shape}")
                    if points:
                        axis.plot(*zip(*points), style, label=f"{model} {shape}")
            axis.set(xlabel="cut-off radius (cycles per image)", ylabel="top-1 (%)", title=kind, xscale="log")
            axis.legend(fontsize=7)
        return png(fig)
