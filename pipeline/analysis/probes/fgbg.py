"""Table 2: accuracy on the object alone and on the background alone.

Masked pixels are set to 0 at full resolution, before the model's resize and
crop (as in the paper); only images with boxes of their own class count. The
report gives top-1/top-5 per condition and each masked top-5 as a share of the
full-image top-5, the paper's number.
"""

from __future__ import annotations

import pyarrow as pa
import torch
from torch import nn

from pipeline.analysis import images as images_lib
from pipeline.analysis.probes import classifier
from pipeline.analysis.probes.base import Batch, Condition, Probe, Tally, aggregate, topk_hits
from pipeline.analysis.probes.plots import figure, png

CONDITIONS = ("full", "foreground", "background")


class ForegroundBackgroundProbe(Probe):
    name = "fgbg"
    needs_boxes = True

    def conditions(self, params: dict, model: str) -> list[Condition]:
        classifier.check_classifier(model)
        return [Condition(name) for name in CONDITIONS]

    @torch.no_grad()
    def measure(self, model: nn.Module, batch: Batch, conditions: list[Condition], params: dict, tally: Tally,
                model_name: str) -> None:
        keep = batch.boxed()
        if not keep:
            return
        labels = batch.labels[keep]
        for condition in conditions:
            crops = []
            for i in keep:
                image = batch.images[i]
                inside = images_lib.box_mask(*image.pixels.shape[-2:], image.true_class_boxes())
                mask = {"full": None, "foreground": inside, "background": ~inside}[condition.name]
                pixels = image.pixels if mask is None else image.pixels * mask
                crops.append(batch.preprocess.crop(pixels))
            top1, top5 = topk_hits(model(batch.model_input(torch.stack(crops))), labels)
            tally.add(condition, "top1", top1, len(keep))
            tally.add(condition, "top5", top5, len(keep))

    def report(self, results: pa.Table) -> str:
        values = _values(results)
        lines = ["| model | images | full top-1 / top-5 | foreground only top-1 / top-5 | background only top-1 / top-5 "
                 "| foreground (% of full top-5) | background (% of full top-5) |", "|---|---|---|---|---|---|---|"]
        for (model, weights), v in sorted(values.items()):
            full5 = v["full", "top5"]
            share = [f"{100 * v[c, 'top5'] / full5:.2f}" if full5 else "n/a" for c in ("foreground", "background")]
            cells = [f"{100 * v[c, 'top1']:.2f} / {100 * v[c, 'top5']:.2f}" for c in CONDITIONS]
            lines.append(f"| {model} [{weights}] | {v['images']} | {' | '.join(cells)} | {' | '.join(share)} |")
        return "\n".join(lines)

    def plot(self, results: pa.Table) -> bytes:
        values = _values(results)
        fig, axis = figure(1)
        names = [f"{m}" for m, _ in sorted(values)]
        width = 0.8 / len(CONDITIONS)
        for j, condition in enumerate(CONDITIONS):
            axis.bar([i + j * width for i in range(len(names))],
                     [100 * v[condition, "top5"] for _, v in sorted(values.items())], width, label=condition)
        axis.set_xticks([i + width for i in range(len(names))], names, rotation=30, ha="right", fontsize=8)
        axis.set(ylabel="top-5 (%)", title="object only vs background only")
        axis.legend()
        return png(fig)


def _values(results: pa.Table) -> dict[tuple[str, str], dict]:
    values: dict[tuple[str, str], dict] = {}
    for row in aggregate(results):
        cell = values.setdefault((row["model"], row["weights"]), {})
        cell[row["condition"], row["metric"]] = row["value"]
        cell["images"] = row["count_sum"]
    return values
