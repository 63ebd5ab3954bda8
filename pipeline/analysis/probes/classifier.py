"""Classifiers for the probes: zoo ViTs (any weights the sweep accepts) and plain timm models (CNNs).

Their weights are resolved and loaded by :mod:`pipeline.models.weights` as a sweep's are
(``resolve(..., plain_timm=True)`` lets in timm classifiers outside the zoo: resnet50,
mobilenetv2_100, densenet121, ...), with the same checks: a checkpoint's suffix and names, its
sha256 checked again at load, the hub revision in the weights id.

:func:`vit_logits` is the ViT forward with the token manipulations of the
paper's Table 1, built from timm's own VisionTransformer parts.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from pipeline.errors import PipelineError


@functools.lru_cache(maxsize=None)
def check_classifier(model: str) -> nn.Module:
    """The architecture on the meta device (cached), after checking that it has a classification head."""
    import timm

    with torch.device("meta"):
        net = timm.create_model(model, pretrained=False)
    if not getattr(net, "num_classes", 0):
        raise PipelineError(f"'{model}' has no classification head (num_classes=0, e.g. a CLIP image tower), so "
                            f"it has no accuracy to probe. Use a classifier.")
    return net


def check_token_vit(model: str) -> None:
    """Table 1's manipulations need a timm VisionTransformer that classifies from its CLS token."""
    from timm.models.vision_transformer import VisionTransformer

    net = check_classifier(model)
    if not isinstance(net, VisionTransformer) or net.cls_token is None or net.global_pool != "token":
        raise PipelineError(
            f"The tokens probe needs a ViT/DeiT-style model whose head reads the CLS token (timm "
            f"VisionTransformer with global_pool='token'); '{model}' is a {type(net).__name__}"
            f"{'' if not isinstance(net, VisionTransformer) else f' with global_pool={net.global_pool!r}'}."
        )


def depth(model: str) -> int:
    return len(check_classifier(model).blocks)


def _head(model: nn.Module, token: torch.Tensor) -> torch.Tensor:
    """The classifier head on one token per image; distilled models average both heads, as timm does in eval."""
    x = model.head_drop(model.fc_norm(token))
    logits = model.head(x)
    if getattr(model, "head_dist", None) is not None:
        logits = (logits + model.head_dist(x)) / 2
    return logits


def vit_logits(model: nn.Module, images: torch.Tensor, condition: str, param: int | None = None,
               random_index: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of a CLS-token ViT under one Table 1 condition.

    natural: the model as is; isolate (l): prefix tokens and patch tokens run the first l
    blocks separately, then together; drop (l): patch tokens are dropped after block l;
    patch_mean / patch_max / patch_token (i) / random_token: that pooled or chosen patch
    token, after the final norm, replaces CLS at the head.
    """
    tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    prefix = model.num_prefix_tokens
    blocks = list(model.blocks)
    if condition == "isolate":
        head, patches = tokens[:, :prefix], tokens[:, prefix:]
        for block in blocks[:param]:
            head, patches = block(head), block(patches)
        tokens = torch.cat([head, patches], dim=1)
        blocks = blocks[param:]
    elif condition == "drop":
        for block in blocks[:param]:
            tokens = block(tokens)
        tokens = tokens[:, :prefix]
        blocks = blocks[param:]
    for block in blocks:
        tokens = block(tokens)
    tokens = model.norm(tokens)
    if condition in ("natural", "isolate", "drop"):
        return model.forward_head(tokens)
    patches = tokens[:, prefix:]
    if condition == "patch_mean":
        return _head(model, patches.mean(1))
    if condition == "patch_max":
        return _head(model, patches.amax(1))
    if condition == "patch_token":
        return _head(model, patches[:, param])
    if condition == "random_token":
        return _head(model, patches[torch.arange(patches.shape[0]), random_index])
    raise ValueError(f"unknown tokens condition {condition!r}")
