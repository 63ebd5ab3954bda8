"""A dictionary of directions in a ViT's activations: the units of a sweep beyond single neurons.

    vit-atlas directions layer=L images.path=PATH [method=pca|topk_sae] [n=64] [model.name=...]

Fits ``n`` directions (pipeline.analysis.dictionary: PCA components, or the latents of a
top-k sparse autoencoder) to the patch-token vectors of one model's ``target.kind``
activations at ``layer`` over an image set, and writes the matrix into the store:

    directions/<name>.safetensors     float32 W_enc (d, n), b_enc (n), W_dec (n, d), b_dec (d); unit i is
                                      (x - b_dec) @ W_enc[:, i] + b_enc[i]: for topk_sae latent i's
                                      pre-activation, for pca component i's score (W_enc's columns the
                                      unit-norm components, each turned away from the content-free
                                      images, b_dec the tokens' mean, b_enc 0)
    directions/<name>.json            provenance: images and their digests, weights id, layer, target,
                                      method, seed, and the fit's explained variance or reconstruction error
                                      (pca: with each component's scores of flat grey and uniform noise)

and prints the matrix's path, for the sweep's ``target.directions=``. The activations
are read with the truncated forward (stopped after the target layer) a slice of images
at a time; each slice's token vectors are committed as a part of the store
(``directions/tokens-<id>/``, schemas.direction_tokens) as soon as it is read, so a job
killed while gathering resumes with the slices it lacks, and the token parts serve every
later fit of the same activations (another method, n or seed reads no image again). After the
slices, one more part (``references``) holds the tokens of the content-free images that the
sweep measures every unit against, flat grey and uniform noise (pipeline.engine.measures):
a PCA component is turned away from them. The
fit runs from the parts; it is recorded (``directions/fits/``) only once its matrix and
provenance are written, so a job killed while fitting fits again, and a finished job run
again does nothing but print where its matrix is.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys

import pyarrow as pa
import pyarrow.compute as pc
import torch

import pipeline
from pipeline.analysis import dictionary
from pipeline.analysis import images as images_lib
from pipeline.config import DirectionsConfig
from pipeline.errors import PipelineError
from pipeline.models import weights as weights_lib
from pipeline.models import zoo
from pipeline.store.schemas import DIRECTION_FITS, direction_tokens
from pipeline.store.store import PartTable, Store

# v3: a pca fit's components are turned away from the content-free images (v2: to the long tail of their
# scores; v1: a .npy of the components, projections uncentred, signs by the largest coordinate). The fit's id
# includes it, so an older fit is not taken for a v3 one.
FORMAT = "vit-atlas/directions/v3"
REFERENCES = "references"  # the tokens table's part for the content-free images, beside the slices' parts
NOISE_REFERENCES = 4  # uniform noise images; their pooled tokens barely differ, and their mean is the reference
SAFETENSORS_KEY = "vit-atlas"  # the provenance JSON, also inside a .safetensors file's metadata
_UNSAFE = re.compile(r"[^A-Za-z0-9_]+")


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_directions(cfg: DirectionsConfig) -> int:
    width, image_set, store = _checked(cfg)
    # Pretrained weights are fetched (or found in the cache) and named by their revision only now.
    choice = weights_lib.resolve(cfg.model.name, cfg.model.weights, cfg.model.init_seed, cfg.model.img_size)
    sampled = [cfg.tokens_per_image, cfg.seed] if cfg.tokens_per_image else None
    gather_id = _digest(cfg.model.name, choice.weights_id, choice.img_size, cfg.layer, cfg.target.kind,
                        image_set.fingerprint(), cfg.slice_size, sampled)
    method = [cfg.sae.k, cfg.sae.steps, cfg.sae.batch_size, cfg.sae.lr] if cfg.method == "topk_sae" else None
    fit_id = _digest(gather_id, cfg.method, cfg.n, cfg.seed, method, FORMAT)
    fits = store.table(DIRECTION_FITS)
    if fit_id in fits.done():
        path = fits.read({fit_id}, columns=["path"])["path"][0].as_py()
        print(f"directions: already fitted; nothing to do\ntarget.directions={path}", flush=True)
        return 0

    tokens = store.table(direction_tokens(gather_id))
    slices = math.ceil(len(image_set) / cfg.slice_size)
    done = tokens.done()
    todo = [i for i in range(slices) if _part(i) not in done]
    _say(f"directions: {len(image_set)} images in {slices} slice(s), {slices - len(todo)} gathered, "
         f"{len(todo)} to read ({cfg.model.name} layer {cfg.layer} {cfg.target.kind}, {width} features)")
    if todo or REFERENCES not in done:
        _gather(cfg, choice, image_set, tokens, todo)
    parts = sorted(_part(i) for i in range(slices))
    provenance = {
        "format": FORMAT, "method": cfg.method, "n": cfg.n, "width": width, "model": cfg.model.name,
        "weights": choice.weights_id, "weights_given": cfg.model.weights, "img_size": choice.img_size,
        "layer": cfg.layer, "target": cfg.target.kind, "seed": cfg.seed, "code_version": pipeline.__version__,
        "images": _images_provenance(cfg, image_set, tokens, parts),
    }
    if cfg.method == "pca":
        references, provenance["references"] = _references(tokens, width)
        data, provenance["fit"] = _fit_pca(tokens, parts, width, cfg.n, references, provenance)
        quality = f"explained variance {provenance['fit']['explained_variance']:.4f}"
    else:
        data, provenance["fit"] = _fit_sae(tokens, parts, width, cfg, provenance)
        quality = f"reconstruction FVU {provenance['fit']['fvu']:.4f}"
    # The matrix and its provenance first, the fit's part last: its presence is what says the job is done.
    name = f"{_UNSAFE.sub('_', cfg.model.name)}-{cfg.target.kind}-l{cfg.layer:02d}-{cfg.method}-n{cfg.n}-{fit_id}"
    path = store.write_artifact(f"directions/{name}.safetensors", data)
    about = store.write_artifact(f"directions/{name}.json", (json.dumps(provenance, indent=1) + "\n").encode())
    fits.write(fit_id, pa.table({
        "fit_id": [fit_id], "path": [path], "model": [cfg.model.name], "weights": [choice.weights_id],
        "layer": [cfg.layer], "target": [cfg.target.kind], "method": [cfg.method], "n": [cfg.n],
        "provenance": [json.dumps(provenance)]}))
    print(f"directions: {cfg.method} n={cfg.n} over {provenance['images']['tokens']} tokens of "
          f"{len(image_set)} images, {quality}\nprovenance: {about}\ntarget.directions={path}", flush=True)
    return 0


def _checked(cfg: DirectionsConfig) -> tuple[int, images_lib.ImageSet, Store]:
    """The target's width, the images and the store, once every setting is checked; nothing written yet."""
    model = cfg.model
    unpinned = weights_lib.resolve(model.name, model.weights, model.init_seed, model.img_size, pin=False)
    width = zoo.layout(model.name, unpinned.img_size).site(cfg.layer, cfg.target.kind).features
    if cfg.method == "pca" and cfg.n > width:
        raise PipelineError(f"n={cfg.n} is more principal components than the {width} features of target "
                            f"'{cfg.target.kind}' at layer {cfg.layer} of '{model.name}': choose n <= {width}.")
    image_set = images_lib.open_images(cfg.images.path, limit=cfg.images.limit)
    store = Store(cfg.store.root)
    store.check_writable()
    store.recover()
    return width, image_set, store


def _part(slice_index: int) -> str:
    return f"{slice_index:06d}"


def _gather(cfg: DirectionsConfig, choice: weights_lib.WeightsChoice, image_set: images_lib.ImageSet,
            tokens: PartTable, todo: list[int]) -> None:
    """Read the slices ``todo`` through the truncated forward, committing each slice's tokens as one part, then
    the content-free references' (all of their tokens: only their mean is used) as the part ``references``."""
    from pipeline.engine.activations import ActivationReader
    from pipeline.engine.visualizer import pick_device

    verified = weights_lib.ensure_verified(cfg.model.name, choice)  # an ONNX file's import, checked once
    if verified:
        _say(verified)
    device = pick_device(cfg.device)
    model = weights_lib.load(cfg.model.name, choice, device)
    layout = zoo.layout(cfg.model.name, choice.img_size)
    reader = ActivationReader(model, layout)
    preprocess = images_lib.Preprocess.for_model(model, layout.input_size)
    for number, index in enumerate(todo, 1):
        part = image_set.slice(index * cfg.slice_size, (index + 1) * cfg.slice_size)
        generator = torch.Generator().manual_seed(int(_digest(cfg.seed, index), 16))  # a stream per slice
        rows: dict[str, list] = {"image_id": [], "pixels_sha256": [], "tokens": [], "vectors": []}
        for loaded in part.batches(cfg.batch_size):
            crops = torch.stack([preprocess.crop(image.pixels) for image in loaded])
            with torch.inference_mode():
                activations = reader(preprocess.normalize(crops.to(device)), cfg.layer, cfg.target.kind)
            for image, vectors in zip(loaded, activations.float().cpu()):
                if cfg.tokens_per_image and cfg.tokens_per_image < vectors.shape[0]:
                    keep = torch.randperm(vectors.shape[0], generator=generator)[:cfg.tokens_per_image].sort().values
                    vectors = vectors[keep]
                rows["image_id"].append(image.ref.image_id)
                rows["pixels_sha256"].append(_pixels_sha256(image.pixels))
                rows["tokens"].append(vectors.shape[0])
                rows["vectors"].append(vectors.numpy().ravel())
        tokens.write(_part(index), pa.table(rows))
        _say(f"directions: slice {index + 1}/{math.ceil(len(image_set) / cfg.slice_size)} gathered "
             f"({number}/{len(todo)} this run)")
    names, images = zip(*_reference_images(layout.input_size[1:]))
    with torch.inference_mode():
        activations = reader(preprocess.normalize(torch.stack(images).to(device)), cfg.layer, cfg.target.kind)
    tokens.write(REFERENCES, pa.table({
        "image_id": list(names),
        "pixels_sha256": [hashlib.sha256(image.numpy().tobytes()).hexdigest() for image in images],
        "tokens": [vectors.shape[0] for vectors in activations],
        "vectors": [vectors.float().cpu().numpy().ravel() for vectors in activations]}))
    _say(f"directions: references gathered ({', '.join(names)})")


def _reference_images(size: tuple[int, int]) -> list[tuple[str, torch.Tensor]]:
    """(name, (3, H, W) pixels in [0, 1]) of the content-free images, as the sweep's baselines draw them."""
    from pipeline.engine import measures

    grey = torch.full((3, *size), measures.GREY_LEVEL)
    return [("flat grey", grey)] + [(f"uniform noise {seed}", measures.noise_image(seed, size))
                                    for seed in range(NOISE_REFERENCES)]


def _references(tokens: PartTable, width: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The pooled token vector (d,) of flat grey and of uniform noise (the mean over its images): what the
    sweep's objective reads of each, the mean over image-patch tokens; and each reference image's digest."""
    table = tokens.read({REFERENCES}, columns=["image_id", "pixels_sha256", "vectors"])
    digests = dict(zip(table["image_id"].to_pylist(), table["pixels_sha256"].to_pylist()))
    pooled = {name: torch.from_numpy(vectors.values.to_numpy().reshape(-1, width).copy()).double().mean(0)
              for name, vectors in zip(table["image_id"].to_pylist(), table["vectors"])}
    noise = torch.stack([vector for name, vector in pooled.items() if name.startswith("uniform noise")])
    return {"flat_grey": pooled["flat grey"], "uniform_noise": noise.mean(0)}, digests


def _pixels_sha256(pixels: torch.Tensor) -> str:
    """sha256 of an image's decoded 8-bit RGB pixels (H, W, 3), as pipeline.analysis.photos digests crops."""
    array = (pixels * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return hashlib.sha256(array.tobytes()).hexdigest()


def _vectors(tokens: PartTable, part: str, width: int) -> torch.Tensor:
    column = tokens.read({part}, columns=["vectors"])["vectors"].combine_chunks()
    return torch.from_numpy(column.flatten().to_numpy().reshape(-1, width).copy())  # Arrow's buffer is read-only


def _images_provenance(cfg: DirectionsConfig, image_set: images_lib.ImageSet, tokens: PartTable,
                       parts: list[str]) -> dict:
    table = pa.concat_tables(tokens.read({part}, columns=["image_id", "pixels_sha256", "tokens"]) for part in parts)
    digest = hashlib.sha256()
    for image_id, sha256 in zip(table["image_id"].to_pylist(), table["pixels_sha256"].to_pylist()):
        digest.update(f"{image_id}\t{sha256}\n".encode())
    return {"path": cfg.images.path, "limit": cfg.images.limit, "count": len(image_set),
            "fingerprint": image_set.fingerprint(), "pixels_sha256": digest.hexdigest(),
            "tokens": int(pc.sum(table["tokens"]).as_py()), "tokens_per_image": cfg.tokens_per_image,
            "per_image": dict(zip(table["image_id"].to_pylist(), table["pixels_sha256"].to_pylist()))}


def _fit_pca(tokens: PartTable, parts: list[str], width: int, n: int, references: dict[str, torch.Tensor],
             provenance: dict) -> tuple[bytes, dict]:
    from safetensors.torch import save

    moments = dictionary.Moments(width)
    for part in parts:  # one part in memory at a time
        moments.add(_vectors(tokens, part, width))
    fit = dictionary.pca(moments, n)
    fit = fit.flipped(dictionary.signs_away_from(fit, torch.stack(list(references.values()))))
    about = {"explained_variance": fit.explained_variance,
             "explained_variance_ratio": [round(float(v), 6) for v in fit.explained_variance_ratio],
             "reference_scores": {name: [round(float(v), 6) for v in fit.scores(vector[None])[0]]
                                  for name, vector in references.items()}}
    return save(fit.encoder(), metadata={SAFETENSORS_KEY: json.dumps({**provenance, "fit": about}, sort_keys=True)}), about


def _fit_sae(tokens: PartTable, parts: list[str], width: int, cfg: DirectionsConfig,
             provenance: dict) -> tuple[bytes, dict]:
    from safetensors.torch import save

    vectors = torch.cat([_vectors(tokens, part, width) for part in parts])
    fit = dictionary.train_topk_sae(vectors, cfg.n, cfg.sae.k, cfg.sae.steps, cfg.sae.batch_size, cfg.sae.lr,
                                    cfg.seed, progress=_say)
    about = {"k": cfg.sae.k, "steps": cfg.sae.steps, "batch_size": cfg.sae.batch_size, "lr": cfg.sae.lr,
             "fvu": fit.fvu, "fvu_curve": [[step, round(value, 6)] for step, value in fit.fvu_curve],
             "dead_latents": fit.dead_latents}
    metadata = {SAFETENSORS_KEY: json.dumps({**provenance, "fit": about}, sort_keys=True)}
    return save(fit.sae.tensors(), metadata=metadata), about
