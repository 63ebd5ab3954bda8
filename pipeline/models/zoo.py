"""The model zoo: which timm models are supported, and where their features live.

Support is by architecture, not by a hand-kept list: a family is a timm model
module, and every model timm registers there is a candidate. What a model's
layers are is not written down either; it is *traced*: the architecture is built
on the meta device (no memory, no weights), one forward pass runs with hooks on
every MLP non-linearity, attention projection and block, and the order and shapes
of those calls give the layers (blocks in forward order, flattened across stages),
features per layer and the token layout. Shared modules (CoaT's parallel blocks
run one MLP at three scales) give one layer per call. A layer's ``residual``
target is its block's output tokens (the residual stream), whose width can change
from stage to stage (PiT, Swin, Twins, CoaT-lite) and differs from the MLP's.

    vit-atlas zoo
    vit-atlas zoo describe=[deit_tiny_patch16_224]
"""

from __future__ import annotations

import difflib
import functools
import math
from dataclasses import dataclass, field

import timm
import torch
from torch import nn

from pipeline.errors import PipelineError

TARGETS = ("mlp", "keys", "queries", "values", "attn_out", "residual")


@dataclass(frozen=True)
class Family:
    name: str
    timm_module: str
    description: str
    exclude: tuple[str, ...] = ()  # name fragments that belong to another family
    only: tuple[str, ...] = ()  # name fragments required to belong here

    def owns(self, model_name: str) -> bool:
        arch = model_name.split(".")[0]
        if any(fragment in arch for fragment in self.exclude):
            return False
        return not self.only or any(fragment in arch for fragment in self.only)


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("deit", "deit", "DeiT and DeiT III, plain and distilled (CLS + distillation token)"),
        Family("coat", "coat", "CoaT, lite (serial blocks) and full (serial + parallel blocks)"),
        Family("convit", "convit", "ConViT (gated positional self-attention; CLS joins late)"),
        Family("pit", "pit", "PiT, plain and distilled (pooling stages change the token grid)"),
        Family("swin", "swin_transformer", "Swin Transformer v1 (windowed attention, no CLS)"),
        Family("twins", "twins", "Twins, PCPVT and SVT (no CLS)"),
        Family("vit", "vision_transformer", "original ViT (Dosovitskiy et al.) and its timm variants",
               exclude=("_clip_",)),
        Family("clip", "vision_transformer", "CLIP image towers (use the *_quickgelu_* variants for OpenAI's weights)",
               only=("_clip_",)),
    )
}


@functools.lru_cache(maxsize=None)
def _family_members(family_name: str) -> tuple[str, ...]:
    family = FAMILIES[family_name]
    return tuple(name for name in timm.list_models(module=family.timm_module) if family.owns(name))


def family_models() -> dict[str, tuple[str, ...]]:
    """Architectures per family, as registered in the installed timm."""
    return {name: _family_members(name) for name in FAMILIES}


def in_zoo(model_name: str) -> bool:
    """Whether a supported family owns the architecture of ``model_name`` (``arch`` or ``arch.tag``)."""
    arch = model_name.partition(".")[0]
    return any(arch in _family_members(name) for name in FAMILIES)


def check_tag(model_name: str) -> None:
    """Refuse ``arch.tag`` where timm has no such pretrained tag for the architecture."""
    arch, _, tag = model_name.partition(".")
    if tag and model_name not in timm.list_pretrained(model_name):
        tags = [n.partition(".")[2] for n in timm.list_pretrained(arch + ".*")]
        raise PipelineError(
            f"Model '{model_name}': timm knows the architecture '{arch}' but not the pretrained tag "
            f"'{tag}'. Known tags: {', '.join(tags) or 'none'}. Use one of them, or the bare "
            f"architecture name for its default weights."
        )


def family_of(model_name: str) -> str:
    """The family that owns a model name (``arch`` or ``arch.tag``); a clear error otherwise."""
    arch = model_name.partition(".")[0]
    for name in FAMILIES:
        if arch in _family_members(name):
            check_tag(model_name)
            return name
    near = suggestions(arch, [m for members in family_models().values() for m in members])
    hint = f" Did you mean: {', '.join(near)}?" if near else ""
    if arch in timm.list_models():
        raise PipelineError(
            f"Model '{model_name}' is a timm model, but not of a supported ViT family "
            f"({', '.join(FAMILIES)}); `vit-atlas zoo` lists what is supported.{hint}"
        )
    raise PipelineError(
        f"Unknown model '{model_name}': it is not a timm architecture.{hint} "
        f"`vit-atlas zoo` lists the supported models by family."
    )


def suggestions(typed: str, known: list[str], n: int = 5) -> list[str]:
    """Names for a mistyped one: those that start with what was typed first (shortest first, so
    ``swin_tiny`` gives swin_tiny_patch4_window7_224), then the closest by similarity."""
    starting = sorted((name for name in known if name.startswith(typed)), key=lambda name: (len(name), name))
    similar = difflib.get_close_matches(typed, known, n=n + len(starting), cutoff=0.6)
    return list(dict.fromkeys([*starting, *similar]))[:n]


@dataclass(frozen=True)
class TargetSite:
    """Where one kind of target of one layer is read: a module's output at its n-th call."""

    module: str  # dotted module path, as in model.named_modules()
    call: int  # which call of that module within one forward (shared modules are called repeatedly)
    features: int
    channel_offset: int = 0  # keys/queries/values are slices of one qkv projection
    output_index: int = 0  # which tensor of a tuple output (CoaT's parallel blocks return one per scale)


@dataclass(frozen=True)
class LayerInfo:
    index: int
    block: str  # module path of the transformer block
    tokens: int  # sequence length at this block, prefix tokens included
    prefix_tokens: int  # CLS / distillation tokens, excluded from objectives
    grid: tuple[int, int]  # patch grid (rows, cols) of the image tokens
    sites: dict[str, TargetSite] = field(default_factory=dict)

    @property
    def features(self) -> int:
        return self.sites["mlp"].features


@dataclass(frozen=True)
class ModelLayout:
    name: str
    family: str
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    activation: str  # the MLP non-linearity's class name (GELU, QuickGELU, ...)
    layers: tuple[LayerInfo, ...]

    def layer(self, index: int) -> LayerInfo:
        if not 0 <= index < len(self.layers):
            raise PipelineError(
                f"Layer {index} is out of range for '{self.name}', which has {len(self.layers)} layers: "
                f"valid layers are 0..{len(self.layers) - 1}."
            )
        return self.layers[index]

    def site(self, index: int, target: str) -> TargetSite:
        layer = self.layer(index)
        if target not in TARGETS:
            raise PipelineError(f"Unknown target '{target}'; targets are {', '.join(TARGETS)}.")
        if target not in layer.sites:
            why = ("its output holds no tensor of the layer's tokens" if target == "residual" else
                   "its attention does not expose a token-aligned qkv/proj projection")
            raise PipelineError(
                f"Target '{target}' is not available at layer {index} of '{self.name}' ({layer.block}): {why}. "
                f"Targets there: {', '.join(layer.sites)}."
            )
        return layer.sites[target]

    def check_features(self, index: int, target: str, features: list[int]) -> None:
        width = self.site(index, target).features
        bad = [f for f in features if not 0 <= f < width]
        if bad:
            raise PipelineError(
                f"Feature(s) {bad[:5]} out of range for target '{target}' at layer {index} of '{self.name}', "
                f"which has {width} features: valid features are 0..{width - 1}."
            )


def native_size(model_name: str) -> int:
    """The input side the architecture is registered with (DINOv2: 518; most others 224 or 384)."""
    return int(timm.models.get_pretrained_cfg(model_name).input_size[-1])


def create_architecture(model_name: str, device: torch.device | str = "cpu", img_size: int | None = None) -> nn.Module:
    """The timm architecture with its pretrained config attached, initialised but without weights.

    ``img_size`` builds it for N x N inputs (absolute position embeddings sized for that grid).
    """
    family_of(model_name)
    size = {"img_size": img_size} if img_size else {}
    try:
        with torch.device(device):
            return timm.create_model(model_name, pretrained=False, **size).eval()
    except (AssertionError, ValueError, RuntimeError) as error:
        raise _bad_size(model_name, img_size, f"timm cannot build it ({error})") from None


def _prefix_and_grid(tokens: int, hint: int) -> tuple[int, tuple[int, int]]:
    """Split a token count into prefix tokens and a square patch grid.

    Square inputs give square grids, and n - p is a perfect square for only one
    small p, so the split is unambiguous; the model's own num_prefix_tokens is
    tried first (register tokens), then none, one or two (ConViT's late CLS).
    """
    for prefix in dict.fromkeys((hint, 0, 1, 2)):
        side = math.isqrt(tokens - prefix) if tokens > prefix else 0
        if side and side * side == tokens - prefix:
            return prefix, (side, side)
    raise PipelineError(f"Cannot split {tokens} tokens into prefix tokens and a square patch grid.")


def layout(model_name: str, img_size: int | None = None) -> ModelLayout:
    """Trace a model's layers at its native size or at ``img_size``; cached per process (tracing on
    meta costs well under a second). A size the architecture cannot take is refused, naming valid ones."""
    return _traced_layout(model_name, img_size)  # one cache entry however the size is passed, or left out


@functools.lru_cache(maxsize=None)
def _traced_layout(model_name: str, img_size: int | None) -> ModelLayout:
    family = family_of(model_name)
    if img_size is not None and (isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1):
        raise PipelineError(f"model.img_size={img_size!r} is not a positive integer (pixels per side), or null "
                            f"for the model's native size.")
    model = create_architecture(model_name, device="meta", img_size=img_size)
    modules = dict(model.named_modules())
    mlps = {path: m for path, m in modules.items() if hasattr(m, "fc1") and hasattr(m, "act")}
    if not mlps:
        raise PipelineError(
            f"Model '{model_name}' has no MLP with fc1 -> act (a gated or otherwise unsupported MLP), so it "
            f"has no feature to visualize. Supported architectures: see `vit-atlas zoo`."
        )
    calls: list[tuple[str, tuple[int, ...]]] = []
    block_outputs: dict[str, list[tuple[tuple[int, ...], ...]]] = {}  # block -> per call, its output tensors' shapes
    handles = []
    watched: dict[str, nn.Module] = {f"{p}.act": m.act for p, m in mlps.items()}
    blocks = {path.rpartition(".")[0] for path in mlps}
    for block in blocks:
        for name in ("attn.qkv", "attn.proj"):
            if f"{block}.{name}" in modules:
                watched[f"{block}.{name}"] = modules[f"{block}.{name}"]
    try:
        for path, module in watched.items():
            handles.append(module.register_forward_hook(
                lambda _m, _i, out, path=path: calls.append((path, tuple(out.shape)))))
        for block in blocks:
            handles.append(modules[block].register_forward_hook(
                lambda _m, _i, out, block=block: block_outputs.setdefault(block, []).append(_tensor_shapes(out))))
        height = width = img_size or native_size(model_name)
        with torch.no_grad():
            model(torch.empty(1, 3, height, width, device="meta"))
    except (AssertionError, ValueError, RuntimeError) as error:
        raise _bad_size(model_name, img_size, f"its forward pass fails at that size ({error})") from None
    finally:
        for handle in handles:
            handle.remove()

    hint = int(getattr(model, "num_prefix_tokens", 0) or 0)
    call_counts: dict[str, int] = {}
    layers = []
    for path, shape in calls:
        call = call_counts.get(path, 0)
        call_counts[path] = call + 1
        if not path.endswith(".act"):
            continue
        mlp_path = path[: -len(".act")]
        if len(shape) == 4:  # (B, H, W, C) token maps
            prefix, grid, tokens = 0, (shape[1], shape[2]), shape[1] * shape[2]
        else:
            tokens = shape[1]
            prefix, grid = _prefix_and_grid(tokens, hint)
        sites = {"mlp": TargetSite(f"{mlp_path}.act", call, shape[-1])}
        block = mlp_path.rpartition(".")[0]
        sites.update(_attention_sites(block, calls, tokens))
        sites.update(_residual_site(block, block_outputs.get(block, []), tokens))
        layers.append(LayerInfo(len(layers), block, tokens, prefix, grid, sites))
    cfg = model.pretrained_cfg
    info = ModelLayout(
        name=model_name,
        family=family,
        input_size=(3, height, width),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        activation=type(next(iter(mlps.values())).act).__name__,
        layers=tuple(layers),
    )
    if img_size is not None:
        _check_size(model_name, model, info, img_size)
    return info


def _size_constraints(model: nn.Module, info: ModelLayout) -> tuple[int, list[str]]:
    """The side every valid input size is a multiple of, and why: the patch embedding's stride, each
    stage's downsampling (a stage must not drop pixels) and, for Swin, windows that tile each stage."""
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    stride = int(proj.stride[0]) if isinstance(proj, nn.Conv2d) else 1
    multiple, reasons = stride, [f"the patch embedding's stride {stride}"] if stride > 1 else []
    side = info.input_size[-1]
    modules = dict(model.named_modules())
    for layer in info.layers:
        factor = side // layer.grid[0] if side % layer.grid[0] == 0 else 1
        window = getattr(modules[layer.block], "window_size", None)
        window = int(window[0] if isinstance(window, (tuple, list)) else window or 1)
        need = factor * window
        if need > 1 and need % multiple and multiple % need:
            multiple = math.lcm(multiple, need)
        elif need > multiple:
            multiple = need
        else:
            continue
        reasons.append(f"layer {layer.index}: {factor}x downsampling" + (f" in {window}x{window} windows"
                                                                        if window > 1 else ""))
    return multiple, reasons


def _check_size(model_name: str, model: nn.Module, info: ModelLayout, img_size: int) -> None:
    native = layout(model_name)
    multiple, reasons = _size_constraints(model, native)
    if img_size % multiple:
        raise _bad_size(model_name, img_size, f"it must be a multiple of {multiple} ({'; '.join(reasons)})",
                        multiple)


def size_multiple(model_name: str) -> int:
    """The side every valid input size of the model is a multiple of (``_size_constraints``)."""
    return _size_constraints(create_architecture(model_name, "meta"), layout(model_name))[0]


def parameter_bytes(model_name: str, img_size: int | None = None) -> int:
    """What the model's parameters take in fp32 when built at ``img_size`` (position embeddings grow with the
    grid); counted on the meta device, so nothing is allocated."""
    return sum(p.numel() * 4 for p in create_architecture(model_name, "meta", img_size).parameters())


def _bad_size(model_name: str, img_size: int | None, why: str, multiple: int | None = None) -> PipelineError:
    if multiple is None:
        multiple = size_multiple(model_name)
    # Sizes around the one asked for, never that one: it is the size being refused.
    base = (img_size or 0) // multiple * multiple
    near = sorted({max(multiple, base + k * multiple) for k in (-1, 0, 1, 2, 3)} - {img_size})[:4]
    return PipelineError(
        f"model.img_size={img_size} does not fit '{model_name}': {why}. Valid sizes are multiples of "
        f"{multiple}, e.g. {', '.join(map(str, near))}; its native size is {native_size(model_name)} "
        f"(model.img_size=null)."
    )


def _attention_sites(block: str, calls: list[tuple[str, tuple[int, ...]]], tokens: int) -> dict[str, TargetSite]:
    """Keys/queries/values/attention output, where the block's attention is token-aligned.

    Only a block whose attention runs once per forward over the same tokens as its
    MLP qualifies (ViT, DeiT, PiT, CoaT-serial style); windowed or sub-sampled
    attention (Swin, Twins) reshapes tokens, so those targets would not be
    per-patch features.
    """
    qkv_calls = sum(1 for path, _ in calls if path == f"{block}.attn.qkv")
    shapes = {p: s for p, s in calls if p in (f"{block}.attn.qkv", f"{block}.attn.proj")}
    qkv, proj = shapes.get(f"{block}.attn.qkv"), shapes.get(f"{block}.attn.proj")
    if qkv_calls != 1 or qkv is None or proj is None or len(qkv) != 3 or qkv[1] != tokens or proj[1] != tokens:
        return {}
    width = qkv[-1] // 3
    return {
        "queries": TargetSite(f"{block}.attn.qkv", 0, width, 0),
        "keys": TargetSite(f"{block}.attn.qkv", 0, width, width),
        "values": TargetSite(f"{block}.attn.qkv", 0, width, 2 * width),
        "attn_out": TargetSite(f"{block}.attn.proj", 0, proj[-1]),
    }


def _tensor_shapes(output) -> tuple[tuple[int, ...], ...]:
    """The shapes of a module's output tensors: one for a block, one per scale for CoaT's parallel blocks."""
    tensors = output if isinstance(output, (tuple, list)) else (output,)
    return tuple(tuple(t.shape) for t in tensors if isinstance(t, torch.Tensor))


def _residual_site(block: str, outputs: list[tuple[tuple[int, ...], ...]], tokens: int) -> dict[str, TargetSite]:
    """The block's output tokens (the residual stream after it), where exactly one tensor the block returns
    holds the layer's tokens: (B, N, C) with its prefix, or Swin's (B, H, W, C) map. CoaT's parallel block is
    one module whose MLP runs at three scales, three layers; each reads the output of its own scale."""
    def token_count(shape: tuple[int, ...]) -> int:
        return shape[1] * shape[2] if len(shape) == 4 else shape[1] if len(shape) == 3 else -1

    found = [(call, index, shape[-1]) for call, shapes in enumerate(outputs)
             for index, shape in enumerate(shapes) if token_count(shape) == tokens]
    if len(found) != 1:
        return {}
    call, index, width = found[0]
    return {"residual": TargetSite(block, call, width, output_index=index)}


@functools.lru_cache(maxsize=None)
def target_flops(model_name: str, img_size: int | None = None) -> tuple[int, ...]:
    """Forward FLOPs of one image up to each layer's MLP target (a truncated forward's cost), counted
    by torch's FLOP counter on the meta device: no memory, no weights, a second or two per model."""
    from torch.utils.flop_counter import FlopCounterMode

    info = layout(model_name, img_size)
    # No parameter may require grad: the counter's module tracker hooks the autograd graph of every input
    # that does, and a view of a parameter made under no_grad (PiT's cls token passed between stages in a
    # tuple) requires grad with no graph, on which the tracker asserts "Expected gradient function to be set".
    model = create_architecture(model_name, "meta", img_size).requires_grad_(False)
    modules = dict(model.named_modules())
    counter = FlopCounterMode(display=False)
    totals: list[int] = []
    handles = [modules[path].register_forward_hook(lambda *_: totals.append(counter.get_total_flops()))
               for path in {layer.sites["mlp"].module for layer in info.layers}]
    try:
        with counter:
            model(torch.empty(1, *info.input_size, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return tuple(totals)


def describe(model_name: str, img_size: int | None = None) -> str:
    info = layout(model_name, img_size)
    lines = [
        f"{info.name}  (family {info.family}, {len(info.layers)} layers, MLP activation {info.activation})",
        f"input {info.input_size[1]}x{info.input_size[2]}, normalization mean={info.mean} std={info.std}",
        f"{'layer':>5}  {'module':<34} {'features':>8}  {'residual':>8}  {'tokens':>6}  {'prefix':>6}  {'grid':>7}  "
        f"targets",
    ]
    for layer in info.layers:
        site = layer.sites["mlp"]
        module = site.module + (f" (call {site.call})" if site.call else "")
        residual = layer.sites["residual"].features if "residual" in layer.sites else "-"
        lines.append(
            f"{layer.index:>5}  {module:<34} {layer.features:>8}  {residual:>8}  {layer.tokens:>6}  "
            f"{layer.prefix_tokens:>6}  {layer.grid[0]:>3}x{layer.grid[1]:<3}  {','.join(layer.sites)}"
        )
    return "\n".join(lines)
