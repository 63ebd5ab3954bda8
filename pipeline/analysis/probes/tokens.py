"""Table 1: what the last layer does with the tokens (CLS isolation, pooling, a patch token in place of CLS)."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.analysis.probes import classifier
from pipeline.analysis.probes.base import Batch, Condition, Probe, Tally, aggregate, topk_hits
from pipeline.analysis.probes.plots import figure, png


class TokensProbe(Probe):
    name = "tokens"

    def conditions(self, params: dict, model: str) -> list[Condition]:
        classifier.check_token_vit(model)
        depth = classifier.depth(model)
        patches = _patch_count(model)
        conditions = [Condition("natural")]
        for name in ("isolate", "drop"):
            bad = [l for l in params[name] if not 0 <= int(l) <= depth]
            if bad:
                raise PipelineError(f"probe.tokens.{name} has blocks {bad}, but '{model}' has {depth} blocks: "
                                    f"valid values are 0..{depth}.")
            conditions += [Condition(name, float(l)) for l in params[name]]
        for pooling in params["pooling"]:
            if pooling not in ("mean", "max"):
                raise PipelineError(f"probe.tokens.pooling has '{pooling}'; poolings are mean and max.")
            conditions.append(Condition(f"patch_{pooling}"))
        for token in params["tokens"]:
            if token == "random":
                conditions.append(Condition("random_token"))
            elif isinstance(token, int) and 0 <= token < patches:
                conditions.append(Condition("patch_token", float(token)))
            else:
                raise PipelineError(f"probe.tokens.tokens has {token!r}: give patch indices 0..{patches - 1} "
                                    f"(row-major over the patch grid) or 'random'.")
        return conditions

    @torch.no_grad()
    def measure(self, model: nn.Module, batch: Batch, conditions: list[Condition], params: dict, tally: Tally,
                model_name: str) -> None:
        inputs = batch.model_input(batch.crops())
        patches = _patch_count(model_name)
        # A random but reproducible patch per image: the same image gets the same token in every run.
        random_index = torch.tensor([int(hashlib.sha256(i.ref.image_id.encode()).hexdigest(), 16) % patches
                                     for i in batch.images], device=batch.device)
        for condition in conditions:
            param = None if condition.param is None else int(condition.param)
            logits = classifier.vit_logits(model, inputs, condition.name, param, random_index)
            top1, top5 = topk_hits(logits, batch.labels)
            tally.add(condition, "top1", top1, len(batch.images))
            tally.add(condition, "top5", top5, len(batch.images))

    def report(self, results: pa.Table) -> str:
        rows = aggregate(results)
        models = sorted({(r["model"], r["weights"]) for r in rows})
        labels = sorted({_label(r) for r in rows}, key=_order)
        lines = ["| model | condition | top-1 | top-5 |", "|---|---|---|---|"]
        for model, weights in models:
            values = {(_label(r), r["metric"]): r["value"] for r in rows if (r["model"], r["weights"]) == (model, weights)}
            for label in labels:
                if (label, "top1") in values:
                    lines.append(f"| {model} [{weights}] | {label} | {100 * values[label, 'top1']:.2f} | "
                                 f"{100 * values[label, 'top5']:.2f} |")
        return "\n".join(lines)

    def plot(self, results: pa.Table) -> bytes:
        rows = [r for r in aggregate(results) if r["metric"] == "top1"]
        fig, (sweep, bars) = figure(2)
        for model, weights in sorted({(r["model"], r["weights"]) for r in rows}):
            mine = [r for r in rows if (r["model"], r["weights"]) == (model, weights)]
            for name, style in (("isolate", "o-"), ("drop", "s--")):
                points = sorted((r["param"], 100 * r["value"]) for r in mine if r["condition"] == name)
                if points:
                    sweep.plot(*zip(*points), style, label=f"{model} {name}")
            others = sorted((r for r in mine if r["condition"] not in ("isolate", "drop")), key=_order_row)
            bars.barh([f"{model}\n{_label(r)}" for r in others], [100 * r["value"] for r in others])
        sweep.set(xlabel="block l", ylabel="top-1 (%)", title="CLS isolated / patches dropped up to block l")
        sweep.legend(fontsize=7)
        bars.set(xlabel="top-1 (%)", title="token fed to the head")
        return png(fig)


def _patch_count(model: str) -> int:
    net = classifier.check_classifier(model)
    return net.patch_embed.num_patches


def _label(row: dict) -> str:
    if row["param"] is None:
        return row["condition"]
    return f"{row['condition']} {int(row['param'])}"


def _order(label: str) -> tuple:
    name, _, param = label.partition(" ")
    rank = ["natural", "isolate", "drop", "patch_mean", "patch_max", "patch_token", "random_token"]
    return (rank.index(name) if name in rank else len(rank), int(param) if param else -1)


def _order_row(row: dict) -> tuple:
    return _order(_label(row))
