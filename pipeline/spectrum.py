"""``vit-atlas spectrum folder=DIR out=FILE`` (``python -m pipeline.spectrum``): average the magnitude spectrum
of a folder of images, for MACO's ``optim.maco_spectrum``; prints the file's id (``sha256-<hex>``), which every
record made with it names."""

from __future__ import annotations

import sys

from pipeline import cli


def _run(cfg) -> int:
    from pipeline.engine.parameterizations import decorrelate
    from pipeline.engine.spectra import spectrum_from_folder

    print(spectrum_from_folder(cfg.folder, cfg.out, decorrelate, (cfg.size, cfg.size), cfg.force,
                               progress=lambda line: print(line, file=sys.stderr)))
    return 0


COMMAND = cli.Command("spectrum", _run, examples=(
    "vit-atlas spectrum folder=/data/imagenet/val out=imagenet-224.npy   # then optim.maco_spectrum=imagenet-224.npy",
    "vit-atlas spectrum folder=/data/photos out=photos-384.safetensors size=384",
))


def main(argv: list[str] | None = None) -> int:
    return cli.run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
