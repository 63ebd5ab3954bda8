"""Checkpoint files: Google .npz checked at plan time, a file replaced after planning fails its units,
and a sweep whose units all failed says so in its exit status."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.execution import driver, scheduler, worker
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


def test_a_google_npz_is_checked_at_plan_time_and_loads_the_same_weights(vit_npz):
    path, state, _ = vit_npz
    choice = weights.resolve(VIT, str(path))
    assert choice.weights_id.startswith("sha256-")
    loaded = weights.load(VIT, choice).state_dict()
    for name in ("patch_embed.proj.weight", "blocks.5.attn.qkv.weight", "blocks.11.mlp.fc2.weight", "pos_embed"):
        torch.testing.assert_close(loaded[name], state[name])


def test_a_corrupt_or_unrelated_npz_is_refused_at_plan_time_in_one_paragraph(vit_npz, tmp_path):
    path, _, arrays = vit_npz
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"\x00" * 512)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    unrelated = tmp_path / "unrelated.npz"
    np.savez(unrelated, weights=np.zeros(3), labels=np.arange(4))
    shallow = tmp_path / "shallow.npz"
    np.savez(shallow, **{k: v for k, v in arrays.items() if "encoderblock_11/" not in k})
    cases = [
        (corrupt, VIT, r"is not a NumPy .npz archive \(a zip of named arrays"),
        (truncated, VIT, "could not be read as a NumPy .npz archive|does not load into"),
        (unrelated, VIT, "does not load into the architecture 'vit_tiny_patch16_224' through timm's Google ViT "
                         "loader"),
        (shallow, VIT, "it has 11 encoder blocks, the architecture 12"),
        (path, "vit_small_patch16_224", "does not load into the architecture 'vit_small_patch16_224'"),
        (path, "deit_tiny_distilled_patch16_224", "does not load into|lacks the array"),
        (path, "swin_tiny_patch4_window7_224", "only original ViT models can load"),
    ]
    for file, model, message in cases:
        with pytest.raises(PipelineError, match=message) as raised:
            weights.resolve(model, str(file))
        assert "\n" not in str(raised.value)


def test_a_sweep_with_a_bad_npz_stops_before_ray(compose, tmp_path, monkeypatch):
    monkeypatch.setattr(scheduler, "start_ray", lambda *a, **k: pytest.fail("bad input reached Ray"))
    bad = tmp_path / "bad.npz"
    np.savez(bad, something=np.zeros(2))
    cfg = compose(f"sweep.models=[{VIT}]", "sweep.layers=[0]", "sweep.features=[0]", f"model.weights={bad}",
                  f"store.root={tmp_path / 'store'}")
    with pytest.raises(PipelineError, match="Google ViT loader"):
        driver.run_sweep(cfg)
    assert not (tmp_path / "store").exists()


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
    found = f"sha256-{hashlib.sha256(path.read_bytes()).hexdigest()}"  # what a checkpoint's id names
    assert found != planned
    result = worker.VisualizationWorker("cpu").run(plan.chunks(set(), 8)[0])
    assert not result.records
    assert [u["feature"] for u, _, _ in result.failures] == [0, 1]
    assert {reason for _, reason, _ in result.failures} == {
        f"the checkpoint at {path} changed since the run was planned: planned {planned}, found {found}; "
        f"re-run to plan with the new file"}
    path.unlink()
    gone = worker.VisualizationWorker("cpu").run(plan.chunks(set(), 8)[0])
    assert not gone.records and "is gone since the run was planned" in gone.failures[0][1]


def test_a_sweep_whose_units_all_failed_exits_1_with_the_reasons(ray_local, vit_npz, compose, tmp_path,
                                                                  monkeypatch, capsys):
    path = tmp_path / "ckpt.npz"
    path.write_bytes(vit_npz[0].read_bytes())
    cfg = compose(f"sweep.models=[{VIT}]", "sweep.layers=[0]", "sweep.features=[0,1,2]", f"model.weights={path}",
                  "optim.steps=2", "sweep.chunk_size=1", "progress.bar=false", f"store.root={tmp_path / 'store'}")
    run_plan = scheduler.run_plan

    def replaced_after_planning(*args, **kwargs):
        replace_checkpoint(path)
        return run_plan(*args, **kwargs)

    monkeypatch.setattr(scheduler, "run_plan", replaced_after_planning)
    assert driver.run_sweep(cfg) == driver.EXIT_FAILURES
    out = capsys.readouterr().out
    assert "done: 0 new records, 3 failed" in out
    assert "failed units (3; a re-run retries them):" in out
    assert f"3 x the checkpoint at {path} changed since the run was planned" in out


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_torch_compiled_checkpoint_with_orig_mod_prefixes_loads(tmp_path, suffix):
    from safetensors.torch import save_file

    torch.manual_seed(5)
    state = zoo.create_architecture(VIT).state_dict()
    compiled = {f"_orig_mod.{name}": tensor.contiguous() for name, tensor in state.items()}  # torch.compile's names
    path = tmp_path / f"compiled{suffix}"
    save_file(compiled, str(path)) if suffix == ".safetensors" else torch.save({"model": compiled}, path)
    loaded = weights.load(VIT, weights.resolve(VIT, str(path))).state_dict()
    torch.testing.assert_close(loaded["blocks.4.attn.qkv.weight"], state["blocks.4.attn.qkv.weight"])


def test_url_weights_in_torchs_hub_cache_are_found_offline_and_named_by_their_bytes(tmp_path, monkeypatch):
    import hashlib

    import timm

    url = "https://example.invalid/releases/vit_tiny-0123abcd.pth"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda name: timm.models.PretrainedCfg(url=url))
    weights.ensure_pretrained.cache_clear()
    try:
        with pytest.raises(PipelineError, match=r"Pretrained weights for 'url_model' could not be loaded: "
                                                r"HF_HUB_OFFLINE is set, and they are not in") as raised:
            weights.ensure_pretrained("url_model")
        assert "\n" not in str(raised.value)
        weights.ensure_pretrained.cache_clear()
        cached = tmp_path / "torch" / "hub" / "checkpoints" / "vit_tiny-0123abcd.pth"
        cached.parent.mkdir(parents=True)
        cached.write_bytes(b"the file timm's loader would read")
        assert weights.ensure_pretrained("url_model") == f"sha256-{hashlib.sha256(cached.read_bytes()).hexdigest()}"
    finally:
        weights.ensure_pretrained.cache_clear()
