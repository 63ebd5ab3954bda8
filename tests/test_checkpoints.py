"""Checkpoint files: a file replaced after planning fails its units."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.execution import worker
from pipeline.execution.plan import build_plan
from pipeline.models import weights, zoo

VIT = "vit_tiny_patch16_224"


def google_npz(model: torch.nn.Module, path) -> dict[str, np.ndarray]:
    """``model``'s weights under the names and layouts of Google's ViT checkpoints (what timm's
    ``_load_weights`` reads for an original ViT), saved to ``path``."""
    dim, heads = model.embed_dim, model.blocks[0].attn.num_heads
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    arrays = {
        "embedding/kernel": state["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": state["patch_embed.proj.bias"],
        "cls": state["cls_token"],
        "Transformer/posembed_input/pos_embedding": state["pos_embed"],
        "Transformer/encoder_norm/scale": state["norm.weight"],
        "Transformer/encoder_norm/bias": state["norm.bias"],
        "head/kernel": state["head.weight"].T,
        "head/bias": state["head.bias"],
    }
    for i in range(len(model.blocks)):
        block, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        attention = block + "MultiHeadDotProductAttention_1/"
        qkv_w, qkv_b = state[b + "attn.qkv.weight"], state[b + "attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            arrays[f"{attention}{name}/kernel"] = qkv_w[j * dim:(j + 1) * dim].T.reshape(dim, heads, -1)
            arrays[f"{attention}{name}/bias"] = qkv_b[j * dim:(j + 1) * dim].reshape(heads, -1)
        arrays[attention + "out/kernel"] = state[b + "attn.proj.weight"].reshape(dim, heads, -1).transpose(1, 2, 0)
        arrays[attention + "out/bias"] = state[b + "attn.proj.bias"]
        for norm, ours in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            arrays[f"{block}{norm}/scale"] = state[f"{b}{ours}.weight"]
            arrays[f"{block}{norm}/bias"] = state[f"{b}{ours}.bias"]
        for r in range(2):
            arrays[f"{block}MlpBlock_3/Dense_{r}/kernel"] = state[f"{b}mlp.fc{r + 1}.weight"].T
            arrays[f"{block}MlpBlock_3/Dense_{r}/bias"] = state[f"{b}mlp.fc{r + 1}.bias"]
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    np.savez(path, **arrays)
    return arrays


@pytest.fixture(scope="module")
def vit_npz(tmp_path_factory):
    torch.manual_seed(7)
    source = zoo.create_architecture(VIT)
    path = tmp_path_factory.mktemp("npz") / "ViT-Ti_16.npz"
    arrays = google_npz(source, path)
    return path, source.state_dict(), arrays


def replace_checkpoint(path) -> None:
    torch.manual_seed(99)
    google_npz(zoo.create_architecture(VIT), path)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_a_checkpoint_replaced_after_planning_fails_its_units_and_records_nothing(vit_npz, compose, tmp_path,
                                                                                  suffix):
    from safetensors.torch import save_file

    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".npz":
        path.write_bytes(vit_npz[0].read_bytes())
    else:
        save_file({k: v.contiguous() for k, v in vit_npz[1].items()}, str(path))
    plan = build_plan(compose(f"sweep.models=[{VIT}]", "sweep.layers=[0]", "sweep.features=[0,1]",
                              f"model.weights={path}", "optim.steps=2"))
    planned = plan.groups[0].weights.weights_id
    if suffix == ".npz":
        replace_checkpoint(path)
    else:
        torch.manual_seed(99)
        save_file({k: v.contiguous() for k, v in zoo.create_architecture(VIT).state_dict().items()}, str(path))
    found = f"sha256-{weights._sha256(str(path), path.stat().st_mtime_ns)}"
    assert found != planned
    result = worker.VisualizationWorker("cpu").run(plan.chunks(set(), 8)[0])
    assert not result.records
    assert [u["feature"] for u, _, _ in result.failures] == [0, 1]
    assert {reason for _, reason, _ in result.failures} == {
        f"the checkpoint at {path} changed since the sweep was planned: planned {planned}, found {found}; "
        f"re-run to plan with the new file"}
    path.unlink()
    gone = worker.VisualizationWorker("cpu").run(plan.chunks(set(), 8)[0])
    assert not gone.records and "is gone since the sweep was planned" in gone.failures[0][1]

