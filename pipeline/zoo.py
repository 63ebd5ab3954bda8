"""``vit-atlas zoo`` (``python -m pipeline.zoo``): the supported models and their traced layers.

    vit-atlas zoo                                   # every supported architecture, by family
    vit-atlas zoo describe=[pit_ti_distilled_224]   # traced layers, features, token grids
"""

from __future__ import annotations

import inspect
import sys

from pipeline import cli
from pipeline.errors import PipelineError


def _list() -> str:
    from pipeline.models.zoo import FAMILIES, family_models

    lines = []
    for name, members in family_models().items():
        family = FAMILIES[name]
        lines.append(f"{name} ({len(members)} architectures; {family.description}; timm module {family.timm_module})")
        lines.extend(f"  {member}" for member in members)
    return "\n".join(lines)


def _describe(names: list[str], img_size: int | None) -> str:
    from pipeline.models.zoo import describe

    options = {}
    if img_size is not None:
        if "img_size" not in inspect.signature(describe).parameters:
            raise PipelineError("model.img_size is not supported by this version's model zoo (it describes each "
                                "model at its own input size): leave model.img_size unset.")
        options["img_size"] = img_size
    return "\n\n".join(describe(name, **options) for name in names)


def _run(cfg) -> None:
    if cfg.describe:
        print(_describe(list(cfg.describe), cfg.model.img_size))
    elif cfg.model.img_size is not None:
        raise PipelineError("model.img_size applies to described models: add describe=[MODEL,...].")
    else:
        print(_list())


COMMAND = cli.Command("zoo", _run, examples=(
    "vit-atlas zoo                                    # the supported architectures, by family",
    "vit-atlas zoo describe=[pit_ti_distilled_224]    # traced layers, features, token grids",
    "vit-atlas zoo describe=[deit_tiny_patch16_224,swin_tiny_patch4_window7_224]",
))


def main(argv: list[str] | None = None) -> int:
    return cli.run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
