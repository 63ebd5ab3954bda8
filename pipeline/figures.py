"""``vit-atlas figures store.root=DIR out=DIR [models=[a,b]] [target=mlp]`` (``python -m pipeline.figures``):
paper-style figures from a store, as PNG and PDF."""

from __future__ import annotations

import sys

from pipeline import cli


def _run(cfg) -> None:
    from pipeline.views.figures import write_figures

    written = write_figures(cfg.store.root, cfg.out, list(cfg.models) or None, cfg.target, cfg.per_layer)
    print(f"figures: wrote {len(written)} files ({len(written) // 2} figures, PNG and PDF) to {cfg.out}")


COMMAND = cli.Command("figures", _run, examples=(
    "vit-atlas figures store.root=outputs/store out=figures",
    "vit-atlas figures store.root=outputs/store out=figures models=[deit_tiny_patch16_224,vit_base_patch32_384]",
    "vit-atlas figures store.root=outputs/store out=figures models=[vit_small_patch14_dinov2] per_layer=3",
))


def main(argv: list[str] | None = None) -> int:
    return cli.run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
