"""Any input size: layouts, checkpoints and unit keys follow model.img_size; sizes a model cannot take fail early."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.execution.plan import build_plan
from pipeline.models import weights, zoo


@pytest.mark.parametrize("model,native,smaller", [("vit_small_patch14_dinov2", 518, 224),
                                                  ("deit_tiny_distilled_patch16_224", 224, 112),
                                                  ("pit_ti_224", 224, 160)])
def test_layouts_at_native_and_smaller_sizes_keep_the_token_arithmetic(model, native, smaller):
    for size in (native, smaller):
        info = zoo.layout(model, size)
        assert info.input_size == (3, size, size)
        for layer in info.layers:
            assert layer.tokens == layer.grid[0] * layer.grid[1] + layer.prefix_tokens
    big, small = zoo.layout(model, native), zoo.layout(model, smaller)
    assert len(big.layers) == len(small.layers) and big.layers[0].prefix_tokens == small.layers[0].prefix_tokens
    assert small.layers[0].grid[0] < big.layers[0].grid[0]


@pytest.mark.parametrize("model,size,valid", [("vit_small_patch14_dinov2", 230, "224, 238"),
                                              ("swin_tiny_patch4_window7_224", 256, "224, 448"),
                                              ("twins_svt_small", 240, "224, 256")])
def test_a_size_the_architecture_cannot_take_names_the_valid_sizes(model, size, valid):
    with pytest.raises(PipelineError, match=rf"model.img_size={size} does not fit .*Valid sizes are multiples.*{valid}"):
        zoo.layout(model, size)


def test_a_checkpoint_of_the_native_grid_is_resampled_into_a_smaller_model(tmp_path):
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed

    import timm

    torch.manual_seed(0)
    native = timm.create_model("deit_tiny_patch16_224")
    path = tmp_path / "deit_tiny_patch16_224.safetensors"
    save_file({k: v.contiguous() for k, v in native.state_dict().items()}, str(path))
    choice = weights.resolve("deit_tiny_patch16_224", str(path), img_size=112)
    assert choice.img_size == 112 and choice.weights_id.startswith("sha256-")
    model = weights.load("deit_tiny_patch16_224", choice)
    assert model.pos_embed.shape == (1, 1 + 7 * 7, 192)
    expected = resample_abs_pos_embed(native.pos_embed.detach(), [7, 7], num_prefix_tokens=1, antialias=False)
    torch.testing.assert_close(model.pos_embed, expected)
    torch.testing.assert_close(model.blocks[3].mlp.fc1.weight, native.blocks[3].mlp.fc1.weight)
    assert weights.resolve("deit_tiny_patch16_224", str(path), img_size=224).img_size is None  # native: one identity


def test_the_image_size_changes_unit_keys_and_records_but_the_native_size_does_not(compose):
    base = ("sweep.models=[deit_tiny_patch16_224]", "sweep.layers=[0]", "sweep.features=[0]")
    native = build_plan(compose(*base)).keys()
    assert build_plan(compose(*base, "model.img_size=224")).keys() == native
    small = build_plan(compose(*base, "model.img_size=112"))
    assert small.keys() != native and small.groups[0].weights.img_size == 112
    with pytest.raises(PipelineError, match="multiple of 16"):
        build_plan(compose(*base, "model.img_size=100"))


def test_a_sweep_at_another_size_records_it(compose, tmp_path, ray_local):
    from pipeline.execution.driver import run_sweep
    from pipeline.store import Store

    cfg = compose("sweep.models=[deit_tiny_patch16_224]", "sweep.layers=[1]", "sweep.features=[0]", "optim.steps=2",
                  "optim.copies=1", "model.img_size=112", "progress.bar=false", f"store.root={tmp_path}")
    assert run_sweep(cfg) == 0
    (row,) = Store(str(tmp_path)).read_records(["image_size", "png"]).to_pylist()
    from PIL import Image
    import io

    assert row["image_size"] == 112 and Image.open(io.BytesIO(row["png"])).size == (112, 112)


def test_describe_follows_the_size():
    text = zoo.describe("vit_small_patch14_dinov2", 224)
    assert "input 224x224" in text and "16x16" in text and "257" in text
