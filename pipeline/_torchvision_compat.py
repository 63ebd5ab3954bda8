"""Let timm import on a CPU-only torch paired with a CUDA build of torchvision.

PyPI ships torchvision for Linux only as CUDA builds. Next to the CPU wheel of
torch, torchvision's C++ extension cannot load (it links libtorch_cuda), and
torchvision then fails at import because two of its fake-kernel registrations
(``nms`` and ``qnms``) are not guarded by its own ``_has_ops()`` check. timm
imports torchvision unconditionally, so without this nothing here would import.

When the extension loads (any matched torch/torchvision pair, the GPU route),
this module does nothing. When it cannot, it declares the two operator schemas
so those registrations succeed; the operators themselves stay unavailable and
torchvision keeps raising its own clear error if anything calls them. This
project never does: it uses torchvision only through timm's model code.
"""

import importlib.util
from pathlib import Path

import torch

_UNGUARDED_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
# A torch.library.Library drops its definitions when it is garbage-collected: keep it.
_schema_libraries: list[torch.library.Library] = []


def _extension_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision: nothing to fix, timm's import error will say so
    for location in spec.submodule_search_locations:
        for candidate in Path(location).glob("_C*.so"):
            try:
                torch.ops.load_library(str(candidate))
                return True
            except OSError:
                return False
    return False


def ensure_torchvision_importable() -> None:
    if hasattr(torch.ops.torchvision, "nms") or _extension_loads():
        return
    library = torch.library.Library("torchvision", "DEF")
    for schema in _UNGUARDED_SCHEMAS:
        library.define(schema)
    _schema_libraries.append(library)
