"""Run a probe: plan it over models and images, run it on Ray, report and plot.

    python -m pipeline probes experiment=probe_tokens images.path=/data/imagenet/val
    python -m pipeline probes experiment=probe_fgbg images.path=/data/imagenet/train images.boxes=/data/boxes

Everything is validated before any compute (models, weights, probe parameters,
images, boxes); a bad input is one paragraph and exit status 2. Each unit (one
model x one slice of images) commits its sums as a Parquet part; a re-run only
runs the units without a part, then re-aggregates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

from pipeline.analysis import images as images_lib
from pipeline.config import ProbesConfig
from pipeline.models import weights as weights_lib
from pipeline.errors import PipelineError
from pipeline.analysis.probes import PROBES
from pipeline.analysis.probes.worker import ProbeTask, ProbeWorker
from pipeline.store.schemas import probe_results
from pipeline.store.store import Store

EXIT_FAILURES = 1


def plan_tasks(cfg: ProbesConfig, image_set: images_lib.ImageSet) -> list[ProbeTask]:
    name = cfg.probe.name
    probe = PROBES[name]
    section = getattr(cfg.probe, name, None)  # the probe's parameters, where it has any
    params = dataclasses.asdict(section) if dataclasses.is_dataclass(section) else {}
    slices = math.ceil(len(image_set) / cfg.slice_size)
    tasks = []
    for model in cfg.probe.models:
        choice = weights_lib.resolve(str(model), cfg.probe.weights, cfg.probe.init_seed, plain_timm=True)
        conditions = tuple(probe.conditions(params, str(model)))
        identity = json.dumps([name, str(model), choice.weights_id, params, image_set.fingerprint(), cfg.slice_size])
        digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
        for i in range(slices):
            tasks.append(ProbeTask(f"{digest}-{i:06d}", name, str(model), choice, conditions, params,
                                   image_set.slice(i * cfg.slice_size, (i + 1) * cfg.slice_size), cfg.batch_size))
    return tasks


def _check(cfg: ProbesConfig, image_set: images_lib.ImageSet) -> None:
    if cfg.probe.name not in PROBES:
        raise PipelineError(f"probe.name='{cfg.probe.name}' is not a probe; probes are {', '.join(PROBES)}.")
    if not cfg.probe.models:
        raise PipelineError("probe.models is empty: name at least one model.")
    if cfg.slice_size < 1 or cfg.batch_size < 1:
        raise PipelineError("slice_size and batch_size must be at least 1.")
    if PROBES[cfg.probe.name].needs_boxes and not image_set.boxes:
        raise PipelineError(f"The {cfg.probe.name} probe measures against object boxes: set images.boxes to a "
                            f"directory of ImageNet XML annotations or a CSV image_id,xmin,ymin,xmax,ymax[,label].")


def run_probes(cfg: ProbesConfig) -> int:
    store = Store(cfg.store.root)
    store.check_writable()
    store.recover()
    image_set = images_lib.open_images(cfg.images.path, cfg.images.boxes, cfg.images.limit)
    _check(cfg, image_set)
    tasks = plan_tasks(cfg, image_set)  # pretrained weights are fetched here, in the driver, to name their revision
    for model, choice in dict.fromkeys((task.model, task.weights) for task in tasks):
        verified = weights_lib.ensure_verified(model, choice)  # an ONNX file, as a sweep checks it
        if verified:
            print(verified, flush=True)
    with store.lease(f"probes/{cfg.probe.name}"):
        return _run_probe(store, tasks, image_set, cfg)


def _run_probe(store: Store, tasks: list[ProbeTask], image_set: images_lib.ImageSet, cfg: ProbesConfig) -> int:
    parts = store.table(probe_results(cfg.probe.name))
    done = parts.done()
    todo = [task for task in tasks if task.part_id not in done]
    print(f"probe {cfg.probe.name}: {len(cfg.probe.models)} model(s) x {len(image_set)} images = {len(tasks)} units, "
          f"{len(tasks) - len(todo)} done, {len(todo)} to run", flush=True)

    from pipeline.execution.scheduler import run_part_tasks

    summary = run_part_tasks(ProbeWorker, todo, parts, cfg.cluster, cfg.device, cfg.progress)
    results = parts.read({task.part_id for task in tasks})
    probe = PROBES[cfg.probe.name]
    report = probe.report(results)
    complete = len(parts.done() & {task.part_id for task in tasks}) == len(tasks)
    written = [f"{parts.location}/part-*.parquet"]
    if results.num_rows:
        written.append(store.write_artifact(f"{parts.spec.name}/report.md", (report + "\n").encode()))
        written.append(store.write_artifact(f"{parts.spec.name}/{cfg.probe.name}.png", probe.plot(results)))
    print(report)
    print(f"{'complete' if complete else 'PARTIAL (re-run to finish)'}: {summary.done} units run, "
          f"{summary.failed} failed\nresults: {', '.join(written)}", flush=True)
    for part_id, reason in summary.failures[:10]:
        print(f"  failed {part_id}: {reason}")
    return EXIT_FAILURES if summary.failed else 0
