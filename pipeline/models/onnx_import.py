"""Weights from an ONNX export of a transformers ViT, DeiT or DINOv2 model, imported into timm.

An ONNX file is a protobuf message: reading it parses data and executes nothing. The importer maps
the backbone's tensors onto the matching timm ``VisionTransformer``; :func:`verify_import` then runs
one seeded input through onnxruntime and through the timm model and compares every block's output
and the final features.

The TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) keeps parameter names only for
tensors it uses as they are: biases, LayerNorm parameters, layer scales, the patch convolution and
the CLS/distillation tokens. Tensors it had to transform are folded into anonymous initializers
(``onnx::MatMul_1966``): every linear weight, stored transposed as (in, out), and the position
embeddings once they are sliced for interpolation. Those are located by following the graph from a
named neighbour, never by their names or their order (the graph computes key, value, query in that
order, for example). Both transformers name layouts are understood: the 4.x one
(``encoder.layer.N.attention.attention.query``) and the 5.x one (``layers.N.attention.q_proj``).

Shapes cannot tell a wrong head count or LayerNorm eps: :func:`verify_import` is what shows that the
timm architecture computes what the file computes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.models.mismatch import describe_mismatch

# Tolerance of verify_import, for values up to 1 in size; it grows with a tensor's largest value,
# as fp32 rounding does (block outputs are the unnormalised residual stream, whose values reach the
# tens in ViT-S and more in larger models). ORT and torch sum the same fp32 products in different
# orders: on the real DINOv2 ViT-S export that leaves relative differences of about 4e-6 after 12
# blocks. 1e-4 keeps more than an order of magnitude above that noise, and far below what a misplaced
# or wrong tensor causes (1e-2 and more).
DEFAULT_ATOL = 1e-4
SUPPORTED = "vit-atlas imports ONNX exports of transformers ViT, DeiT and DINOv2 models"
ORT_THREADS = 2

_PATCH_WEIGHT = "embeddings.patch_embeddings.projection.weight"
_HEADS = (("classifier", "head"), ("cls_classifier", "head"), ("distillation_classifier", "head_dist"))


@dataclass(frozen=True)
class ImportResult:
    state_dict: dict[str, torch.Tensor]  # timm names; pos_embed at the checkpoint's own grid
    grid: tuple[int, int]  # rows, cols of the checkpoint's position grid
    ignored: tuple[str, ...]  # initializers deliberately not imported (decoders, poolers, unmatched heads)
    source_family: str  # vit | deit | dinov2


@dataclass(frozen=True)
class VerifyReport:
    path: str
    atol: float
    max_abs_diff: float  # final features: the last LayerNorm's output over all tokens
    layer_max_abs_diff: dict[str, float]  # timm block name -> max abs diff of that block's output
    tolerances: dict[str, float]  # 'blocks.N' and 'norm' -> atol scaled to that tensor's values
    first_diverging_layer: str | None  # 'blocks.N' or 'norm'; None when all are within tolerance

    def raise_if_diverged(self) -> None:
        """One paragraph naming the first layer beyond tolerance; nothing when all match."""
        if self.first_diverging_layer is None:
            return
        layer = self.first_diverging_layer
        diff = self.max_abs_diff if layer == "norm" else self.layer_max_abs_diff[layer]
        where = "the final LayerNorm (timm 'norm')" if layer == "norm" else f"timm '{layer}'"
        raise PipelineError(
            f"The timm model does not compute what '{self.path}' computes: outputs first diverge at "
            f"{where}, max abs diff {diff:.3g} > tolerance {self.tolerances[layer]:.3g} (atol {self.atol:g} "
            f"scaled to the tensor's values); the final features differ by up to {self.max_abs_diff:.3g}. "
            f"Every layer before it matches, so check what differs there: the architecture's num_heads, "
            f"LayerNorm eps, layer scale or MLP, or the weights loaded into that layer."
        )


_LAYOUTS = {
    # family: the transformers 4.x and 5.x names of one layer's modules, keyed by timm block module.
    "vit": (
        ("encoder.layer", {
            "norm1": "layernorm_before", "attn.q": "attention.attention.query",
            "attn.k": "attention.attention.key", "attn.v": "attention.attention.value",
            "attn.proj": "attention.output.dense", "norm2": "layernorm_after",
            "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
        }),
        ("layers", {
            "norm1": "layernorm_before", "attn.q": "attention.q_proj", "attn.k": "attention.k_proj",
            "attn.v": "attention.v_proj", "attn.proj": "attention.o_proj", "norm2": "layernorm_after",
            "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
        }),
    ),
    "dinov2": (
        ("encoder.layer", {
            "norm1": "norm1", "attn.q": "attention.attention.query", "attn.k": "attention.attention.key",
            "attn.v": "attention.attention.value", "attn.proj": "attention.output.dense",
            "ls1": "layer_scale1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
            "ls2": "layer_scale2",
        }),
        ("encoder.layer", {
            "norm1": "norm1", "attn.q": "attention.q_proj", "attn.k": "attention.k_proj",
            "attn.v": "attention.v_proj", "attn.proj": "attention.o_proj", "ls1": "layer_scale1",
            "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "ls2": "layer_scale2",
        }),
    ),
}


class _Graph:
    """Data-flow index of an ONNX graph: each tensor's producer and consumers, and the constants."""

    def __init__(self, graph) -> None:
        from onnx import numpy_helper

        self._to_array = numpy_helper.to_array
        # Tensor names stored in the file: the initializers, and the Identity copies described below.
        self.stored = {t.name for t in graph.initializer}
        self._constants = {t.name: t for t in graph.initializer}
        self.producer = {}
        self.consumers = defaultdict(list)
        for node in graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
            if node.op_type == "Constant":
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    self._constants[node.output[0]] = value
            # The exporter stores equal parameters once and names the others as Identity copies of it
            # (seen with freshly initialised models, whose LayerNorm weights are all ones).
            elif node.op_type == "Identity" and node.input[0] in self._constants:
                self._constants[node.output[0]] = self._constants[node.input[0]]
                self.stored.add(node.output[0])
        self.inputs = [i for i in graph.input if i.name not in self.stored]

    def is_constant(self, name: str) -> bool:
        return name in self._constants

    def array(self, name: str) -> np.ndarray | None:
        """A floating-point constant as float32, or None."""
        tensor = self._constants.get(name)
        if tensor is None:
            return None
        array = self._to_array(tensor)
        return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else None

    def is_float(self, name: str) -> bool:
        tensor = self._constants.get(name)
        return tensor is not None and tensor.data_type in _FLOAT_TYPES

    def is_weight(self, name: str) -> bool:
        """A floating-point constant with more than one value: the scalars are eps, scales, exponents."""
        return self.is_float(name) and int(np.prod(self._constants[name].dims)) > 1

    def dtype(self, name: str) -> int:
        return self._constants[name].data_type

    def only_consumer(self, name: str, skip: tuple[str, ...] = ("Shape",)) -> object | None:
        nodes = [n for n in self.consumers.get(name, []) if n.op_type not in skip]
        return nodes[0] if len(nodes) == 1 else None

    def constant_source(self, name: str, through: tuple[str, ...]) -> str | None:
        """The constant a tensor is computed from along first inputs of `through` ops, or None."""
        for _ in range(16):
            if self.is_constant(name):
                return name
            node = self.producer.get(name)
            if node is None or node.op_type not in through:
                return None
            name = node.input[0]
        return None

    def matrix(self, name: str) -> tuple[np.ndarray, str] | None:
        """The matrix an op multiplies by, and the constant it comes from (maybe through a Transpose,
        as in exports without constant folding)."""
        if self.is_weight(name):
            return self.array(name), name
        node = self.producer.get(name)
        if node is not None and node.op_type == "Transpose" and self.is_weight(node.input[0]):
            return self.array(node.input[0]).T, node.input[0]
        return None

    def linear_weight(self, bias: str) -> tuple[np.ndarray, str] | None:
        """The (out, in) weight of the nn.Linear whose bias tensor is named `bias`.

        On a 3-D input the exporter writes a Linear as MatMul(x, W^T) and Add(bias, .), folding W^T
        into an anonymous (in, out) initializer; on a 2-D input (a classifier on the CLS token) as
        Gemm(x, W, bias, transB=1). The bias keeps its name either way, so it anchors the weight: the
        matrix multiplied in the node that the bias is added to."""
        for node in self.consumers.get(bias, []):
            if node.op_type == "Gemm" and node.input[2] == bias and not _attribute(node, "transA", 0):
                found = self.matrix(node.input[1])
                if found is not None:
                    matrix, name = found
                    return (matrix if _attribute(node, "transB", 0) else matrix.T), name
            elif node.op_type == "Add":
                other = node.input[1] if node.input[0] == bias else node.input[0]
                matmul = self.producer.get(other)
                if matmul is not None and matmul.op_type == "MatMul":
                    found = self.matrix(matmul.input[1])
                    if found is not None:
                        return found[0].T, found[1]
        return None

    def layer_norm_input(self, weight: str) -> str | None:
        """The tensor a LayerNorm with this weight normalises. Opset < 17 has no LayerNormalization
        op, so the exporter spells it out as (x - mean(x)) / sqrt(var + eps) * weight + bias: x is
        the first input of the Sub under the Div that the weight multiplies."""
        for node in self.consumers.get(weight, []):
            if node.op_type == "LayerNormalization" and node.input[1] == weight:
                return node.input[0]
            if node.op_type == "Mul":
                div = self.producer.get(node.input[0] if node.input[1] == weight else node.input[1])
                sub = self.producer.get(div.input[0]) if div is not None and div.op_type == "Div" else None
                if sub is not None and sub.op_type == "Sub":
                    return sub.input[0]
        return None

    def layer_norm_output(self, bias: str) -> str | None:
        """The output of the LayerNorm with this bias: the Add of the bias when it is spelled out."""
        for node in self.consumers.get(bias, []):
            if (node.op_type == "LayerNormalization" and node.input[2] == bias) or node.op_type == "Add":
                return node.output[0]
        return None

    def data_constants(self, output: str) -> set[str]:
        """Constants the tensor `output` is computed from, leaving out Resize's roi/scales/sizes."""
        seen, constants, pending = set(), set(), [output]
        while pending:
            node = self.producer.get(pending.pop())
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            inputs = node.input[:1] if node.op_type == "Resize" else node.input
            for name in inputs:
                if self.is_constant(name):
                    constants.add(name)
                elif name:
                    pending.append(name)
        return constants


_FLOAT_TYPES = {1, 10, 11, 16}  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


def _attribute(node, name: str, default):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


@dataclass
class _Backbone:
    """The backbone found in a graph: its tensors under timm names, and the tensors to compare."""

    family: str
    prefix: str  # of the transformers names: 'backbone.', 'vit.', '' ...
    element_type: int  # onnx.TensorProto type of its weights and activations
    prefix_tokens: int = 0  # CLS, and DeiT's distillation token
    grid: tuple[int, int] = (0, 0)
    tensors: dict[str, tuple[np.ndarray, str]] = field(default_factory=dict)  # timm name -> (array, source)
    consumed: set[str] = field(default_factory=set)  # stored tensors that were mapped
    final_features: str | None = None  # the final LayerNorm's output
    block_outputs: list[str | None] = field(default_factory=list)
    backbone_constants: set[str] = field(default_factory=set)  # the constants the final features use

    def take(self, timm_name: str, array: np.ndarray | None, *sources: str) -> None:
        """Map `sources` to `timm_name`; a source the file lacks (array None) leaves it missing."""
        if array is not None:
            self.tensors[timm_name] = (array, " + ".join(sources))
            self.consumed.update(sources)


def _read_model(path: Path, data: bytes | None = None):
    """The parsed file; ``data``: its bytes already read (the bytes a worker hashed and checked)."""
    import io

    import onnx
    from google.protobuf.message import DecodeError

    if data is None and not path.is_file():
        raise PipelineError(f"ONNX file '{path}' does not exist. Check the path.")
    try:
        # Protobuf parsing only: an ONNX file holds data, nothing in it is executed.
        proto = onnx.load(io.BytesIO(data) if data is not None else str(path))
    except (DecodeError, ValueError, OSError, onnx.checker.ValidationError) as error:
        raise PipelineError(
            f"'{path}' could not be read as an ONNX model ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200] if str(error) else 'no detail'}). It may be truncated, "
            f"not an ONNX file, or missing its external data files; export or download it again."
        ) from None
    if not proto.graph.node:
        raise PipelineError(f"'{path}' is not an ONNX model: it has no graph. Export or download it again.")
    return proto


def input_size(path: str | Path) -> int | None:
    """The side of the square image the file takes, or None when its spatial dimensions are dynamic."""
    graph = _read_model(Path(path)).graph
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] if len(graph.input) == 1 else []
    return dims[2] if len(dims) == 4 and dims[2] and dims[2] == dims[3] else None


def _not_supported(path: Path, what: str) -> PipelineError:
    return PipelineError(
        f"'{path}' is not supported: {SUPPORTED} (ViTModel, DeiTModel, Dinov2Model and their "
        f"classification models, exported with torch.onnx.export), and this graph {what}."
    )


def _find_backbone(graph: _Graph, path: Path) -> _Backbone:
    patch_weights = [name for name in graph.stored if name.endswith(_PATCH_WEIGHT)]
    if len(patch_weights) != 1:
        raise _not_supported(path, f"has {len(patch_weights) or 'no'} '{_PATCH_WEIGHT}' tensor")
    prefix = patch_weights[0].removesuffix(_PATCH_WEIGHT)
    family, layer_root, modules = _layout(graph, prefix, path)
    conv = graph.only_consumer(patch_weights[0])
    if conv is None or conv.op_type != "Conv":
        raise _not_supported(path, "does not apply its patch projection as a Conv")
    backbone = _Backbone(family, prefix, graph.dtype(patch_weights[0]))

    for timm_name, source in zip(("patch_embed.proj.weight", "patch_embed.proj.bias"), conv.input[1:]):
        backbone.take(timm_name, graph.array(source), source)
    prefix_tokens, positions = _embeddings(graph, conv, path)
    backbone.prefix_tokens = len(prefix_tokens)
    if len(prefix_tokens) == 2:
        backbone.family = "deit"
    for timm_name, source in zip(("cls_token", "dist_token"), prefix_tokens):
        backbone.take(timm_name, graph.array(source), source)
    if positions is not None:
        pos_embed, sources, backbone.grid = _position_embedding(graph, positions, len(prefix_tokens), conv, path)
        backbone.take("pos_embed", pos_embed, *sources)

    depth = 0
    while f"{prefix}{layer_root}.{depth}.{modules['norm1']}.weight" in graph.stored:
        depth += 1
    block_inputs = []
    for index in range(depth):
        layer, block = f"{prefix}{layer_root}.{index}.", f"blocks.{index}."
        block_inputs.append(graph.layer_norm_input(f"{layer}{modules['norm1']}.weight"))
        for part in ("norm1", "norm2"):
            for kind in ("weight", "bias"):
                source = f"{layer}{modules[part]}.{kind}"
                backbone.take(f"{block}{part}.{kind}", graph.array(source), source)
        for part in ("ls1", "ls2"):
            if part in modules:
                source = f"{layer}{modules[part]}.lambda1"
                backbone.take(f"{block}{part}.gamma", graph.array(source), source)
        for part in ("attn.proj", "mlp.fc1", "mlp.fc2"):
            _take_linear(backbone, graph, f"{block}{part}", [f"{layer}{modules[part]}.bias"])
        # timm computes q, k and v with one linear, their weights stacked in that order.
        qkv_biases = [f"{layer}{modules[part]}.bias" for part in ("attn.q", "attn.k", "attn.v")]
        _take_linear(backbone, graph, f"{block}attn.qkv", qkv_biases)

    for kind in ("weight", "bias"):
        backbone.take(f"norm.{kind}", graph.array(f"{prefix}layernorm.{kind}"), f"{prefix}layernorm.{kind}")
    backbone.final_features = graph.layer_norm_output(f"{prefix}layernorm.bias")
    # Block N's output is what the next LayerNorm normalises: block N+1's first norm, or the final one.
    backbone.block_outputs = block_inputs[1:] + [graph.layer_norm_input(f"{prefix}layernorm.weight")]
    if backbone.final_features is not None:
        backbone.backbone_constants = graph.data_constants(backbone.final_features)
    return backbone


def _layout(graph: _Graph, prefix: str, path: Path) -> tuple[str, str, dict[str, str]]:
    """Family and layer names, from layer 0's names (4.x and 5.x transformers spell them differently)."""
    for family, layouts in _LAYOUTS.items():
        for layer_root, modules in layouts:
            layer0 = f"{prefix}{layer_root}.0."
            if {f"{layer0}{modules['norm1']}.weight", f"{layer0}{modules['attn.q']}.bias"} <= graph.stored:
                return family, layer_root, modules
    raise _not_supported(path, f"has no transformer layers named like ViT's or DINOv2's under '{prefix}'")


def _take_linear(backbone: _Backbone, graph: _Graph, timm_name: str, biases: list[str]) -> None:
    """A timm linear from the transformers linears with these biases, stacked along their outputs."""
    weights = [graph.linear_weight(bias) for bias in biases]
    bias_arrays = [graph.array(bias) for bias in biases]
    if any(found is None for found in weights) or any(array is None for array in bias_arrays):
        return
    backbone.take(f"{timm_name}.weight", np.concatenate([w for w, _ in weights]), *(name for _, name in weights))
    backbone.take(f"{timm_name}.bias", np.concatenate(bias_arrays), *biases)


def _embeddings(graph: _Graph, conv, path: Path) -> tuple[list[str], str | None]:
    """The prefix-token constants and the tensor of position embeddings added to the token sequence.

    transformers computes projection(x).flatten(2).transpose(1, 2), concatenates the expanded CLS
    (and DeiT's distillation) token in front of it along axis 1, then adds the position embeddings:
    so the first Concat downstream of the patch Conv holds the prefix tokens before the patch path,
    and the Add that consumes it adds the positions."""
    patches = conv.output[0]
    concat = None
    for _ in range(8):
        node = graph.only_consumer(patches)
        if node is None:
            break
        if node.op_type == "Concat":
            concat = node
            break
        patches = node.output[0]
    if concat is None or _attribute(concat, "axis", 0) != 1 or list(concat.input).index(patches) == 0:
        raise _not_supported(path, "does not prepend a CLS token to the patch tokens")
    prefix_tokens = []
    for name in concat.input[: list(concat.input).index(patches)]:
        source = graph.constant_source(name, through=("Expand", "Identity", "Cast"))
        if source is None:
            raise _not_supported(path, "prepends a token that is not a stored tensor")
        prefix_tokens.append(source)
    if len(concat.input) > len(prefix_tokens) + 1 or len(prefix_tokens) > 2:
        raise _not_supported(path, "concatenates tokens other than CLS, distillation and patch tokens")
    add = graph.only_consumer(concat.output[0])
    if add is None or add.op_type != "Add":
        return prefix_tokens, None
    return prefix_tokens, add.input[1] if add.input[0] == concat.output[0] else add.input[0]


def _position_embedding(graph: _Graph, positions: str, prefix_count: int, conv, path: Path):
    """The position embeddings (1, prefix + rows * cols, dim) at their stored grid, their sources, the grid.

    Added as stored when the model runs at its own size (ViT, DeiT). Otherwise transformers slices
    them into prefix and patch parts, reshapes the patch part to its square grid, resizes it
    bicubically to the input's grid, and concatenates the two again (always so for DINOv2, whose
    export traces the interpolation). Slicing a parameter is constant-folded, so the prefix part is
    the constant in that Concat, and the patch part the constant the Resize's input comes from."""
    if graph.is_weight(positions):
        full = graph.array(positions)
        patch_count = full.shape[1] - prefix_count
        return full, [positions], _grid(patch_count, _input_grid(graph, conv), path)
    concat = graph.producer.get(positions)
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 2:
        raise _not_supported(path, "adds position embeddings that are neither stored nor resampled")
    prefix_part = graph.constant_source(concat.input[0], through=("Identity", "Cast"))
    patch_part = graph.constant_source(concat.input[1], through=("Reshape", "Transpose", "Cast", "Resize", "Identity"))
    if prefix_part is None or patch_part is None or graph.array(patch_part).ndim != 3:
        raise _not_supported(path, "resamples position embeddings along a path vit-atlas does not know")
    prefix_array, patch_array = graph.array(prefix_part), graph.array(patch_part)
    if prefix_array.shape[1] != prefix_count:
        raise _not_supported(path, f"has {prefix_array.shape[1]} prefix positions for {prefix_count} prefix tokens")
    # transformers reshapes the stored patch positions to a square grid before resampling them.
    grid = _grid(patch_array.shape[1], None, path)
    return np.concatenate([prefix_array, patch_array], axis=1), [prefix_part, patch_part], grid


def _input_grid(graph: _Graph, conv) -> tuple[int, int] | None:
    """The patch grid of a graph with a fixed input size, or None when its spatial sizes are dynamic."""
    dims = [d.dim_value for d in graph.inputs[0].type.tensor_type.shape.dim] if len(graph.inputs) == 1 else []
    strides = _attribute(conv, "strides", [1, 1])
    if len(dims) != 4 or not all(dims[2:]):
        return None
    return dims[2] // strides[0], dims[3] // strides[1]


def _grid(patch_count: int, input_grid: tuple[int, int] | None, path: Path) -> tuple[int, int]:
    if input_grid is not None and input_grid[0] * input_grid[1] == patch_count:
        return input_grid
    side = int(round(patch_count**0.5))
    if side * side != patch_count:
        raise _not_supported(path, f"has {patch_count} patch positions, which form no known grid")
    return side, side


def onnx_state_dict(path: str | Path, model: nn.Module, data: bytes | None = None) -> ImportResult:
    """The backbone weights of an ONNX export (read from ``data`` when given), under the timm names of
    `model` (which may be on meta).

    Raises one PipelineError paragraph for unreadable files, unsupported graphs, and for missing,
    unexpected or mis-shaped tensors. ``pos_embed`` keeps the checkpoint's grid; resample it with
    :func:`pipeline.models.positions.resample_position_embedding` for a model built at another image size."""
    from timm.models.vision_transformer import VisionTransformer

    path = Path(path)
    if not isinstance(model, VisionTransformer):
        raise PipelineError(
            f"ONNX import needs a timm VisionTransformer as its target, not {type(model).__name__}; "
            f"{SUPPORTED}."
        )
    graph = _Graph(_read_model(path, data).graph)
    backbone = _find_backbone(graph, path)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    # Classification models hold the backbone under one module ('vit.', 'deit.') beside their heads.
    head_base = backbone.prefix[: backbone.prefix.rstrip(".").rfind(".") + 1]
    for source, timm_head in _HEADS:
        found = graph.linear_weight(f"{head_base}{source}.bias")
        if found is not None and expected.get(f"{timm_head}.weight") == found[0].shape:
            _take_linear(backbone, graph, timm_head, [f"{head_base}{source}.bias"])
    tensors, consumed = backbone.tensors, backbone.consumed

    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(
        [f"{name} (from {tensors[name][1]})" for name in set(tensors) - set(expected)]
        + [name for name in backbone.backbone_constants - consumed if graph.is_weight(name)]
    )
    mismatched = sorted(
        f"{name} {tensors[name][0].shape} vs {shape}"
        for name, shape in expected.items()
        if name in tensors and not _shape_fits(name, tensors[name][0].shape, shape, backbone.prefix_tokens, model)
    )
    if missing or unexpected or mismatched:
        architecture = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise PipelineError(
            f"ONNX file '{path}' ({backbone.family} export) does not match the architecture "
            f"'{architecture}' — {describe_mismatch(missing, unexpected, mismatched)}. Check that the timm architecture has the export's "
            f"width, depth, patch size, prefix tokens and layer scale, and no head unless the file has one."
        )
    ignored = tuple(sorted(
        name for name in graph.stored - consumed - backbone.backbone_constants if graph.is_float(name)
    ))
    state_dict = {name: torch.from_numpy(np.ascontiguousarray(array)) for name, (array, _) in tensors.items()}
    return ImportResult(state_dict, backbone.grid, ignored, backbone.family)


def _shape_fits(name: str, shape: tuple, expected: tuple, prefix_tokens: int, model: nn.Module) -> bool:
    """Exact shapes, except pos_embed's patch positions, which follow the grid they were stored at."""
    if name != "pos_embed":
        return shape == expected
    model_prefix_positions = 0 if model.no_embed_class else model.num_prefix_tokens
    return len(shape) == 3 and shape[2] == expected[2] and prefix_tokens == model_prefix_positions


def verify_import(path: str | Path, model: nn.Module, atol: float = DEFAULT_ATOL) -> VerifyReport:
    """Run one seeded input through onnxruntime and through `model` (a CPU timm model holding the
    imported weights, built at the file's input size; put in eval mode) and compare every block's
    output and the final features. Call :meth:`VerifyReport.raise_if_diverged` to turn a mismatch into an error."""
    path = Path(path)
    proto = _read_model(path)
    graph = _Graph(proto.graph)
    backbone = _find_backbone(graph, path)
    compared = [backbone.final_features, *backbone.block_outputs]
    if None in compared:
        raise _not_supported(path, "has no LayerNorm output where vit-atlas expects a block's output")
    if len(model.blocks) != len(backbone.block_outputs):
        raise PipelineError(
            f"The timm model has {len(model.blocks)} blocks and '{path}' has {len(backbone.block_outputs)}: "
            f"build the architecture with depth={len(backbone.block_outputs)}."
        )
    pixels = _probe_input(graph, model, path)
    onnx_final, *onnx_blocks = _run_onnxruntime(proto, graph, compared, backbone.element_type, pixels)
    timm_final, timm_blocks = _run_timm(model, pixels)
    names = [f"blocks.{index}" for index in range(len(onnx_blocks))] + ["norm"]
    pairs = dict(zip(names, zip([*onnx_blocks, onnx_final], [*timm_blocks, timm_final])))
    diffs = {name: _max_abs_diff(reference, ours, path) for name, (reference, ours) in pairs.items()}
    tolerances = {name: atol * max(1.0, float(np.abs(reference).max())) for name, (reference, _) in pairs.items()}
    first = next((name for name in names if diffs[name] > tolerances[name]), None)
    final_diff = diffs.pop("norm")
    return VerifyReport(str(path), atol, final_diff, diffs, tolerances, first)


def _probe_input(graph: _Graph, model: nn.Module, path: Path) -> np.ndarray:
    """A seeded random image, normalised as the model's inputs are, at the file's input size
    (the model's own size where the file's is dynamic)."""
    from onnx import helper

    if len(graph.inputs) != 1:
        raise _not_supported(path, f"has {len(graph.inputs)} inputs, not one image")
    tensor_type = graph.inputs[0].type.tensor_type
    if tensor_type.elem_type not in _FLOAT_TYPES:
        raise _not_supported(path, "takes a non-float image")
    dims = [d.dim_value for d in tensor_type.shape.dim]
    channels = model.patch_embed.proj.in_channels
    height, width = model.patch_embed.img_size
    if len(dims) != 4 or dims[1] not in (0, channels) or (all(dims[2:]) and tuple(dims[2:]) != (height, width)):
        raise PipelineError(
            f"'{path}' takes inputs of shape {dims} (0: any size) and the timm model takes "
            f"(batch, {channels}, {height}, {width}): build the architecture with img_size={tuple(dims[2:])}."
        )
    config = getattr(model, "pretrained_cfg", None) or {}
    mean = torch.tensor(config.get("mean", (0.485, 0.456, 0.406))).view(1, -1, 1, 1)
    std = torch.tensor(config.get("std", (0.229, 0.224, 0.225))).view(1, -1, 1, 1)
    image = torch.rand(1, channels, height, width, generator=torch.Generator().manual_seed(0))
    pixels = ((image - mean) / std).numpy()
    return pixels.astype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))


def _run_onnxruntime(
    proto, graph: _Graph, outputs: list[str], element_type: int, pixels: np.ndarray
) -> list[np.ndarray]:
    """The given tensors, made the graph's outputs in `proto`, the in-memory model read for this check."""
    import onnxruntime
    from onnx import helper

    del proto.graph.output[:]
    proto.graph.output.extend(helper.make_tensor_value_info(name, element_type, None) for name in outputs)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = ORT_THREADS
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # it warns for every initializer that only the dropped outputs used
    session = onnxruntime.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(outputs, {graph.inputs[0].name: pixels})


def _run_timm(model: nn.Module, pixels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    block_outputs = []
    hooks = [block.register_forward_hook(lambda _m, _i, output: block_outputs.append(output)) for block in model.blocks]
    try:
        with torch.no_grad():
            final = model.eval().forward_features(torch.from_numpy(pixels).float())
    finally:
        for hook in hooks:
            hook.remove()
    return final.numpy(), [output.numpy() for output in block_outputs]


def _max_abs_diff(reference: np.ndarray, ours: np.ndarray, path: Path) -> float:
    if reference.shape != ours.shape:
        raise PipelineError(
            f"'{path}' and the timm model give tensors of different shapes ({reference.shape} vs {ours.shape}): "
            f"build the architecture with the file's input size and prefix tokens."
        )
    return float(np.abs(reference.astype(np.float64) - ours.astype(np.float64)).max())
