"""vit-atlas: synthesize and study images that maximally activate single ViT features.

Data flows one way: config -> plan of work units -> scheduler -> worker
(model + optimizer) -> store -> readers, atlas, analysis.
"""

from pipeline._torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()

__version__ = "0.1.0"
