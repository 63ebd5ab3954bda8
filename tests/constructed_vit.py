"""A deit_tiny whose answers are known: class evidence is written into chosen residual dimensions.

Residual layout (width 192): dims 0-2 hold the evidence for classes 0-2, dims 3-5 its
negation (so LayerNorm's mean stays zero), the rest a constant +A/-A carrier that
fixes LayerNorm's scale, so every LayerNorm acts linearly on the evidence. Every
block is the identity (zero attention output and MLP output) unless ``pool_last``:
then the last block's attention is uniform and copies the evidence, so every token,
CLS included, receives the average evidence over all tokens (global pooling).
The head reads class c from dim c; a small bias on class NULL wins when no evidence
is present. Evidence per patch:

* ``colour``: channel-opponent patch mean (zero for grey and for black), 2/3 for a pure colour;
* ``checker``: correlation of channel c with a one-pixel checkerboard (a Nyquist-frequency signal).
"""

from __future__ import annotations

import math

import torch

import pipeline  # noqa: F401  (torchvision shim before timm)

MODEL = "deit_tiny_patch16_224"
NULL = 999
CARRIER = 10.0
HEAD_GAIN = 100.0
NULL_BIAS = 0.01
SIGNAL_DIMS = 3


def constructed_state_dict(evidence: str = "colour", pool_last: bool = False, spatial_unit: bool = False) -> dict:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    width = model.embed_dim
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    carrier_dims = list(range(2 * SIGNAL_DIMS, width))
    carrier = torch.zeros(width)
    carrier[carrier_dims] = CARRIER * torch.tensor([1.0, -1.0]).repeat(len(carrier_dims) // 2)
    sigma = CARRIER * math.sqrt(len(carrier_dims) / width)  # LayerNorm's scale, set by the carrier

    weight = torch.zeros_like(sd["patch_embed.proj.weight"])
    bias = carrier.clone()
    checker = (-1.0) ** (torch.arange(16).view(-1, 1) + torch.arange(16).view(1, -1))
    for c in range(SIGNAL_DIMS):
        raw = torch.zeros(3, 16, 16)  # a filter on raw [0, 1] pixels, converted to act on normalized input
        if evidence == "colour":
            raw[:] = -1.0 / 3 / 256
            raw[c] += 1.0 / 256
        else:
            raw[c] = checker / 256
        for dim, sign in ((c, 1.0), (c + SIGNAL_DIMS, -1.0)):
            weight[dim] = sign * raw * std
            bias[dim] = sign * (raw * mean).sum()
    sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"] = weight, bias
    sd["pos_embed"].zero_()
    sd["cls_token"] = carrier.view(1, 1, -1).clone()
    blocks = len(model.blocks)
    for b in range(blocks):
        for name in ("attn.proj.weight", "attn.proj.bias", "mlp.fc2.weight", "mlp.fc2.bias"):
            sd[f"blocks.{b}.{name}"].zero_()
        for norm in ("norm1", "norm2"):
            sd[f"blocks.{b}.{norm}.weight"].fill_(1.0)
            sd[f"blocks.{b}.{norm}.bias"].zero_()
    if pool_last:
        last = f"blocks.{blocks - 1}"
        qkv_w, qkv_b = sd[f"{last}.attn.qkv.weight"], sd[f"{last}.attn.qkv.bias"]
        qkv_w.zero_()
        qkv_b.zero_()  # zero queries and keys: uniform attention
        for dim in range(2 * SIGNAL_DIMS):
            qkv_w[2 * width + dim, dim] = 1.0  # values carry the evidence
            sd[f"{last}.attn.proj.weight"][dim, dim] = sigma  # undo LayerNorm's scale
    if spatial_unit:  # block 0, MLP unit 0: GELU of class-0 evidence; every other unit is off
        sd["blocks.0.mlp.fc1.weight"].zero_()
        sd["blocks.0.mlp.fc1.bias"].fill_(-10.0)
        sd["blocks.0.mlp.fc1.weight"][0, 0] = 3.0 * sigma
        sd["blocks.0.mlp.fc1.weight"][0, SIGNAL_DIMS] = -3.0 * sigma
        sd["blocks.0.mlp.fc1.bias"][0] = 0.0
    sd["norm.weight"].fill_(1.0)
    sd["norm.bias"].zero_()
    sd["head.weight"].zero_()
    sd["head.bias"].zero_()
    sd["head.bias"][NULL] = NULL_BIAS
    for c in range(SIGNAL_DIMS):
        sd["head.weight"][c, c] = HEAD_GAIN
        sd["head.weight"][c, c + SIGNAL_DIMS] = -HEAD_GAIN
    return sd


def save_constructed(path, **kwargs) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in constructed_state_dict(**kwargs).items()}, str(path))
    return str(path)
