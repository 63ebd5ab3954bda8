"""Every model family README names, swept end to end by the `vit-atlas sweep` command as a user runs it.

One command, one Ray, one store: the smallest model of each family (DeiT distilled, CoaT, ConViT,
PiT, Swin, Twins, ViT, CLIP, and DINOv2 from a random-weight file at a non-default size), every
layer, one feature, one step, with the real cost estimate; and the residual stream of each one's last
layer, where the stages that widen it (PiT, Swin, Twins, CoaT-lite) have changed its width. What breaks one family (a FLOP count, a
layout, a checkpoint's resampling) shows here, whichever stage it is in.
"""

from __future__ import annotations

from installed_script import vit_atlas
from pipeline import cli
from pipeline.execution.plan import build_plan
from pipeline.models import zoo
from pipeline.store.store import Store

# The cheapest member of each family; all but Swin (whose windows need 224 px) at 32 px.
SMALL = ["deit_tiny_distilled_patch16_224", "coat_lite_tiny", "convit_tiny", "pit_ti_224", "twins_pcpvt_small",
         "vit_tiny_patch16_224", "vit_xsmall_patch16_clip_224"]
SWIN = "swin_tiny_patch4_window7_224"
DINOV2 = "vit_small_patch14_dinov2"  # native 518 px; its file is resampled to 56
RESIDUAL = "target.kind: residual, sweep.layers: last:1"


def test_every_family_sweeps_every_layer_into_one_store(tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    checkpoint = tmp_path / f"{DINOV2}.safetensors"
    torch.manual_seed(0)
    save_file(timm.create_model(DINOV2, pretrained=False).state_dict(), str(checkpoint))
    root = tmp_path / "store"
    overrides = [
        # One feature per layer makes chunks of one; saying so spares a batch-size search.
        "model.weights=random", "sweep.layers=all", "sweep.features=[0]", "sweep.chunk_size=1", "optim.steps=1",
        "optim.copies=1",
        f"sweep.variants=[{{sweep.models: [{', '.join(SMALL)}], model.img_size: 32}}, {{sweep.models: [{SWIN}]}}, "
        f"{{sweep.models: [{DINOV2}], model.weights: '{checkpoint}', model.img_size: 56}}, "
        f"{{sweep.models: [{', '.join(SMALL)}], model.img_size: 32, {RESIDUAL}}}, {{sweep.models: [{SWIN}], {RESIDUAL}}}]",
        f"store.root={root}",
    ]
    result = vit_atlas("sweep", *overrides, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "image-steps (" in result.stdout, result.stdout  # the FLOP count of every model ran, not replaced

    plan = build_plan(cli.load("sweep", *overrides))
    assert {zoo.family_of(group.model) for group in plan.groups} == set(zoo.FAMILIES)
    assert {group.model for group in plan.groups} == {*SMALL, SWIN, DINOV2}
    assert all(len(zoo.layout(g.model, g.weights.img_size).layers) == sum(h.model == g.model for h in plan.groups
                                                                              if h.target == "mlp")
               for g in plan.groups)  # every layer of every model
    residual = {(g.model, g.layer) for g in plan.groups if g.target == "residual"}
    assert residual == {(m, len(zoo.layout(m, None if m == SWIN else 32).layers) - 1) for m in (*SMALL, SWIN)}
    assert Store(str(root)).committed_keys() == set(plan.keys())
