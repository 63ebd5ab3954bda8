"""Spatial information: per layer, how concentrated each feature's activation map is on the object.

For every image with boxes of its own class and every selected MLP feature, the
map's positive part over the patch grid gives two numbers: the share of its mass
on patches covered by the object box (against the box's share of the grid, the
value of a map that ignores the image), and its entropy normalized by log(patches)
(1 = uniform, 0 = one patch). The paper's claim is that patch tokens keep
spatial information in every layer but the last.
"""

from __future__ import annotations

import math

import pyarrow as pa
import torch
from torch import nn

from pipeline.models import zoo
from pipeline.engine.activations import ActivationReader
from pipeline.errors import PipelineError
from pipeline.execution.plan import select
from pipeline.analysis.probes.base import Batch, Condition, Probe, Tally, aggregate
from pipeline.analysis.probes.plots import figure, png

# A map with less positive mass than this (summed over patches) is silent, not concentrated:
# rounding alone leaves GELU outputs around 1e-7 on inputs that are zero in exact arithmetic.
MIN_MASS = 1e-4


class SpatialProbe(Probe):
    name = "spatial"
    needs_boxes = True

    def conditions(self, params: dict, model: str) -> list[Condition]:
        try:
            layout = zoo.layout(model)
        except PipelineError as error:
            raise PipelineError(f"The spatial probe reads MLP features, so it needs a zoo model: {error}") from None
        layers = select(params["layers"], len(layout.layers), "layer", f"'{model}'")
        for layer in layers:
            select(params["features"], layout.layer(layer).features, "feature", f"layer {layer} of '{model}'")
        return [Condition("layer", float(layer)) for layer in layers]

    @torch.no_grad()
    def measure(self, model: nn.Module, batch: Batch, conditions: list[Condition], params: dict, tally: Tally,
                model_name: str) -> None:
        keep = batch.boxed()
        if not keep:
            return
        layout = zoo.layout(model_name)
        crops = torch.stack([batch.preprocess.crop(batch.images[i].pixels) for i in keep])
        layers = [int(c.param) for c in conditions]
        reader = ActivationReader(model, layout)
        activations = reader.read_layers(batch.model_input(crops), layers)
        for condition in conditions:
            layer = int(condition.param)
            info = layout.layer(layer)
            features = torch.tensor(select(params["features"], info.features, "feature", ""), device=batch.device)
            maps = activations[layer].index_select(-1, features).float().clamp(min=0)  # (B, P, F)
            cover = torch.stack([batch.preprocess.box_cover(batch.images[i].true_class_boxes(),
                                                            *batch.images[i].pixels.shape[-2:], info.grid)
                                 for i in keep]).to(batch.device)  # (B, P)
            mass = maps.sum(1)  # (B, F)
            live = mass > MIN_MASS
            share = (maps * cover[..., None]).sum(1) / mass.clamp(min=1e-12)
            p = maps / mass.clamp(min=1e-12)[:, None]
            entropy = -(p * torch.log(p.clamp(min=1e-12))).sum(1) / math.log(maps.shape[1])
            counts = live.sum(0).cpu()
            tally.add_many(condition, "share_in_box", (share * live).sum(0).cpu(), counts, features.tolist())
            tally.add_many(condition, "entropy", (entropy * live).sum(0).cpu(), counts, features.tolist())
            tally.add(condition, "box_area", float(cover.mean(1).sum()), len(keep))

    def report(self, results: pa.Table) -> str:
        layers = _per_layer(results)
        lines = ["| model | layer | box share of grid | map mass in box (mean over features) | map entropy / log(P) |",
                 "|---|---|---|---|---|"]
        for (model, weights, layer), v in sorted(layers.items()):
            lines.append(f"| {model} [{weights}] | {layer} | {v['box_area']:.3f} | {v['share_in_box']:.3f} | "
                         f"{v['entropy']:.3f} |")
        return "\n".join(lines)

    def plot(self, results: pa.Table) -> bytes:
        layers = _per_layer(results)
        fig, (share, entropy) = figure(2)
        for model, weights in sorted({(m, w) for m, w, _ in layers}):
            points = sorted((l, v) for (m, w, l), v in layers.items() if (m, w) == (model, weights))
            xs = [l for l, _ in points]
            share.plot(xs, [v["share_in_box"] for _, v in points], "o-", label=f"{model} map mass in box")
            share.plot(xs, [v["box_area"] for _, v in points], ":", label=f"{model} box area")
            entropy.plot(xs, [v["entropy"] for _, v in points], "o-", label=model)
        share.set(xlabel="layer", ylabel="share", title="activation inside the object box")
        entropy.set(xlabel="layer", ylabel="entropy / log(patches)", title="spread of activation maps")
        share.legend(fontsize=7)
        entropy.legend(fontsize=7)
        return png(fig)


def _per_layer(results: pa.Table) -> dict[tuple[str, str, int], dict[str, float]]:
    """Mean over features of each per-feature value, per (model, weights, layer)."""
    sums: dict[tuple[str, str, int], dict[str, list[float]]] = {}
    for row in aggregate(results):
        if row["count_sum"] == 0:
            continue
        cell = sums.setdefault((row["model"], row["weights"], int(row["param"])), {})
        cell.setdefault(row["metric"], []).append(row["value"])
    return {key: {metric: sum(v) / len(v) for metric, v in cell.items()} for key, cell in sums.items()}
