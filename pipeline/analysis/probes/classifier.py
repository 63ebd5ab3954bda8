"""Classifiers for the probes: zoo ViTs (any weights the sweep accepts) and plain timm models (CNNs).

Zoo models go through :mod:`pipeline.models.weights` (pretrained, random, planted, a
file). Other timm classifiers (resnet50, mobilenetv2_100, densenet121, ...) need
no zoo layout: they take ``pretrained``, ``random`` or a checkpoint path. Either
way the choice is validated and given an id before any compute.

:func:`vit_logits` is the ViT forward with the token manipulations of the
paper's Table 1, built from timm's own VisionTransformer parts.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.models import weights as weights_lib
from pipeline.models import zoo
from pipeline.errors import PipelineError


@dataclass(frozen=True)
class ClassifierChoice:
    model: str
    weights_id: str
    zoo_weights: weights_lib.WeightsChoice | None  # for zoo models
    kind: str = "zoo"  # zoo | random | pretrained | file
    path: str | None = None
    init_seed: int = 0


def _is_zoo(model: str) -> bool:
    try:
        zoo.family_of(model)
        return True
    except PipelineError:
        return False


def resolve(model: str, weights: str, init_seed: int = 0) -> ClassifierChoice:
    import timm

    if _is_zoo(model):
        choice = weights_lib.resolve(model, weights, init_seed)
        return ClassifierChoice(model, choice.weights_id, choice)
    if not timm.is_model(model.split(".")[0]):
        raise PipelineError(f"Unknown model '{model}': it is neither a supported ViT (`vit-atlas zoo`) "
                            f"nor a timm architecture (e.g. resnet50, mobilenetv2_100, densenet121).")
    if weights == "random":
        return ClassifierChoice(model, f"random-{init_seed}", None, "random", init_seed=init_seed)
    if weights == "pretrained":
        cfg = timm.models.get_pretrained_cfg(model)
        if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
            raise PipelineError(f"timm has no pretrained weights for '{model}'; use weights=random or a checkpoint.")
        return ClassifierChoice(model, f"pretrained-{cfg.tag or 'default'}", None, "pretrained")
    path = Path(weights).expanduser()
    if path.is_dir():
        found = [path / f"{model}{s}" for s in weights_lib.CHECKPOINT_SUFFIXES if (path / f"{model}{s}").is_file()]
        path = found[0] if found else path / f"{model}.safetensors"
    if not path.is_file():
        raise PipelineError(f"weights='{weights}' is neither pretrained, random nor a checkpoint for '{model}' "
                            f"(looked for {path}).")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return ClassifierChoice(model, f"sha256-{digest}", None, "file", path=str(path))


def load(choice: ClassifierChoice, device: torch.device) -> nn.Module:
    import timm

    if choice.zoo_weights is not None:
        model = weights_lib.load(choice.model, choice.zoo_weights, device)
    elif choice.kind == "pretrained":
        try:
            model = timm.create_model(choice.model, pretrained=True)
        except Exception as error:  # the hub client raises many types; all mean "not available here"
            raise PipelineError(f"Pretrained weights for '{choice.model}' could not be loaded ({error}). Put them "
                                f"in the Hugging Face cache (HF_HOME) or pass a checkpoint path.") from None
    else:
        torch.manual_seed(choice.init_seed)
        model = timm.create_model(choice.model, pretrained=False)
        if choice.kind == "file":
            timm.models.load_checkpoint(model, choice.path, strict=True)
    model.requires_grad_(False)
    return model.eval().to(device)


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
