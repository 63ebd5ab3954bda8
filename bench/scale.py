"""Zoo scale, by simulation: the driver, the store, status and the atlas at many units, without a model.

    make bench-scale                                  # defaults: 10,000 units, 32 simulated workers, chunks of 32
    make bench-scale ARGS="--units 10000 100000"      # a row per plan size
    make bench-scale ARGS="--units 10000 --plan-only 1000000 --status-records 1000000"

The real planner, scheduler, actors and store run with :class:`SimulatedWorker` in place of the
visualization worker: it returns at once the records a chunk would give, every column of the record
schema filled (the v2 measured columns included), with PNGs of realistic size and entropy for the
model's image size (about 120 KB at 224 px: smooth gratings under pixel noise, a few encoded once per
actor, each record's made distinct by a text chunk naming its key, so that no store layer can share
bytes between records). It encodes them for the store as a real worker does (pipeline.store.records).
So what is timed is everything but the optimization: dispatch, result transfer, validation, commits
to Parquet and WebDataset.

Each measurement runs in a fresh process, so its peak memory (VmHWM) is its own: the write side (the
driver: plan, run, commits), then on the store it made: ``status``, ``Store.committed_keys`` (what a
resumed sweep reads), the readers (a filtered frame without images, one layer's images), ``verify``,
and the atlas (a first build, then a re-run after 1% new records; only for stores of at most
``--atlas-max`` records, as an atlas build writes files per record). ``--plan-only`` sizes time the
driver's planning alone (plan, key set, chunks, plan table) and its memory per planned unit.
``--status-records`` sizes write a store of that many planned units, all but 0.1% of them done, with
small (32 px) images, straight through the store's writer (no Ray: disk and time would not allow 224 px
images there), and time ``status``, ``committed_keys`` and a resumed sweep (the real driver, simulated
workers) on it. ``--atlas-model`` builds the atlas of a store of that model's units written without Ray
(``deit_base_patch16_224``: 37k MLP features, so a model of that many), ``--atlas-only`` times the atlas
alone; after the atlas's builds, headless Chromium (selenium, /usr/bin/chromedriver) opens its biggest model
page and the front page over loopback HTTP and times their loading, a scroll, a filter and a search.
Stores and sites go under a temporary directory that is deleted at the end (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import pickle
import shutil
import socket
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import io  # noqa: E402
import zlib  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import pipeline  # noqa: E402  (torchvision shim before timm)
from pipeline import cli  # noqa: E402
from pipeline.engine.descriptors import describe_png  # noqa: E402
from pipeline.engine.measures import EMBEDDING_LAYER  # noqa: E402
from pipeline.execution.plan import Chunk, build_plan  # noqa: E402
from pipeline.execution.worker import ChunkResult  # noqa: E402
from pipeline.models import zoo  # noqa: E402
from pipeline.store.records import encode_records  # noqa: E402

MODEL = "deit_tiny_patch16_224"
DISTINCT_IMAGES = 8  # PNGs each simulated worker encodes once and reuses
PIXEL_NOISE = 16.0  # standard deviation, in 8-bit levels: about 120 KB per PNG at 224 px


def simulated_png(side: int, seed: int) -> bytes:
    """A smooth image (a few random gratings) under Gaussian pixel noise: the size and entropy of a
    feature visualization's PNG, which is mostly high-frequency texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    base = np.zeros((side, side, 3))
    for _ in range(6):
        fx, fy = rng.uniform(0.5, 6, 2)
        base += rng.uniform(0.2, 1, 3) * np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 2 * np.pi))[..., None]
    pixels = np.clip(128 + 40 * base / 3 + rng.normal(0, PIXEL_NOISE, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def with_text(png: bytes, text: str) -> bytes:
    """``png`` with a tEXt chunk (``key``: ``text``) before its IEND chunk (the last 12 bytes): the same
    image, distinct bytes."""
    data = b"key\0" + text.encode()
    chunk = len(data).to_bytes(4, "big") + b"tEXt" + data + zlib.crc32(b"tEXt" + data).to_bytes(4, "big")
    image = memoryview(png)
    return b"".join((image[:-12], chunk, image[-12:]))


def trace_length(steps: int, trace_points: int) -> int:
    """How many points pipeline.engine.optimize samples the objective at over a run: every ``every``-th
    step, and the last."""
    every = max(1, math.ceil(steps / max(1, trace_points)))
    return math.ceil(steps / every) + ((steps - 1) % every != 0)


class SimulatedWorker:
    """A stand-in for pipeline.execution.worker.VisualizationWorker: a chunk's records at once, no model.

    Built the way the scheduler builds workers, ``(device, model_cache, threads)``; the arguments
    mean nothing here. Its images have the model's size, or IMAGE_SIDE px in a subclass made by
    :func:`simulated_worker`, which may also set START_GATE: a file whose appearance ``run`` waits
    for, so that a measurement can start once every worker is up.
    """

    IMAGE_SIDE: int | None = None
    START_GATE: str | None = None

    def __init__(self, device: str = "cpu", model_cache: int = 2, threads: int | None = None):
        self.device = f"{device} ({socket.gethostname()}, simulated)"
        self._images: dict[int, list[tuple[bytes, dict]]] = {}  # side -> (png, its descriptors)
        # Made before the worker counts as up, as a worker's model is: the images, the layout run() reads, and
        # the first encoding and serialization of records (a few hundred ms of imports and set-up).
        self.images(self.IMAGE_SIDE or zoo.layout(MODEL).input_size[-1])
        pickle.dumps(encode_records([]))

    def images(self, side: int) -> list[tuple[bytes, dict]]:
        if side not in self._images:
            pngs = [simulated_png(side, seed) for seed in range(DISTINCT_IMAGES)]
            self._images[side] = [(png, describe_png(png)) for png in pngs]
        return self._images[side]

    def run(self, chunk: Chunk) -> ChunkResult:
        while self.START_GATE and not os.path.exists(self.START_GATE):
            time.sleep(0.01)
        started = time.perf_counter()
        group = chunk.group
        layout = zoo.layout(group.model, group.weights.img_size)
        side = self.IMAGE_SIDE or json.loads(group.config_json)["image_size"]
        embedding_width = layout.site(min(EMBEDDING_LAYER, len(layout.layers) - 1), "mlp").features
        trace = trace_length(group.optim.steps, group.optim.trace_points)
        images = self.images(side)
        records = []
        ramp = np.arange(1, trace + 1, dtype=np.float32) / trace
        width = np.arange(embedding_width)
        for feature in chunk.features:
            unit = group.unit(feature)
            png, descriptors = images[feature % len(images)]
            png = with_text(png, unit["key"])
            activation = 1.0 + feature / 1000
            records.append({
                **unit,
                "config": group.config_json,
                "label": None,
                "png": png,
                "activation": activation,
                "activation_trace": activation * ramp,
                "activation_curve": activation * ramp,
                "steps": group.optim.steps,
                "image_size": side,
                "device": self.device,
                "precision": group.optim.precision,
                "duration_s": 0.0,
                "code_version": pipeline.__version__,
                "timestamp": datetime.now(timezone.utc),
                **descriptors,
                "png_bytes": float(len(png)),
                "activation_noise": activation / 4,
                "activation_grey": activation / 2,
                # the feature's direction, and the seed's own part: seeds of a unit agree, not exactly
                "embedding": (((feature + width) % 17) / 17 + ((group.seed + width) % 7) / 28).astype(np.float32),
            })
        return ChunkResult(encode_records(records), busy_s=time.perf_counter() - started)


def simulated_worker(image_side: int | None = None, start_gate: str | None = None) -> type:
    """The worker class for the scheduler: SimulatedWorker, with images of ``image_side`` px if given and
    waiting for the file ``start_gate`` if given."""
    if image_side is None and start_gate is None:
        return SimulatedWorker
    return type("SimulatedWorkerVariant", (SimulatedWorker,), {"IMAGE_SIDE": image_side, "START_GATE": start_gate})


# ------------------------------------------------------------------ plans


def sweep_config(units: int, root: str, workers: int, first_seed: int = 0, *overrides: str, model: str = MODEL):
    """A sweep of about ``units`` units of ``model``: every layer, the first F features, S seeds (S planes
    of layers x features, as few as reach the count)."""
    layout = zoo.layout(model)
    width = layout.site(0, "mlp").features
    per_seed = len(layout.layers) * width
    seeds = math.ceil(units / per_seed)
    features = math.ceil(units / (len(layout.layers) * seeds))
    return cli.load("sweep", f"sweep.models=[{model}]", "sweep.layers=all", f"sweep.features=first:{features}",
                    f"sweep.seeds=[{','.join(str(first_seed + s) for s in range(seeds))}]",
                    f"cluster.workers={workers}", f"cluster.cpus_per_worker={2 / workers}",
                    "cluster.gpus_per_worker=0", "progress.bar=false", f"store.root={root}", *overrides)


# ------------------------------------------------------------------ measuring


def rss_kib(field: str = "VmRSS") -> int:
    """This process's resident memory (VmRSS) or its peak so far (VmHWM), KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def shared_memory_mib() -> float:
    """MiB in use on /dev/shm, where a local Ray's object store maps its memory: pages it has touched stay
    in use until it shuts down, so the growth over a run is the store's high-water mark."""
    stat = os.statvfs("/dev/shm")
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize / 2**20


def cpu_by_role() -> dict[str, float]:
    """CPU seconds used so far by this process and its descendants (a local Ray's processes), by role:
    the driver (this process), the actors, raylet and GCS, and Ray's other helpers."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents, used, names = {}, {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                name, _, rest = stat.read().rpartition(")")
        except OSError:  # ended meanwhile
            continue
        fields = rest.split()
        pid = int(entry)
        parents[pid], names[pid] = int(fields[1]), name.partition("(")[2]
        used[pid] = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    roles: dict[str, float] = {}
    for pid in used:
        ancestor = pid
        while ancestor not in (os.getpid(), 0, 1) and ancestor in parents:
            ancestor = parents[ancestor]
        if ancestor != os.getpid():
            continue
        name = names[pid]
        role = ("driver" if pid == os.getpid() else "workers" if name.startswith("ray::")
                else "raylet and GCS" if name in ("raylet", "gcs_server") else "other Ray processes")
        roles[role] = roles.get(role, 0.0) + used[pid]
    return roles


class FirstCommit(threading.Thread):
    """When ``committed()`` first turned positive, polled every ``every_s`` from ``start()`` on."""

    def __init__(self, committed, every_s: float = 0.05):
        super().__init__(daemon=True)
        self.committed, self.every_s = committed, every_s
        self.after_s: float | None = None
        self._finished = threading.Event()

    def run(self) -> None:
        started = time.perf_counter()
        while self.after_s is None and not self._finished.wait(self.every_s):
            if self.committed() > 0:
                self.after_s = time.perf_counter() - started

    def stop(self) -> None:
        self._finished.set()
        self.join()


def measure_write(units: int, root: str, workers: int, chunk_size: int, commit_every: int | None,
                  image_side: int | None = None) -> dict:
    """The driver's side of a sweep of ``units`` simulated units into a new store at ``root``, with images
    of the model's size or ``image_side`` px.

    Actors start a few at a time (each imports torch and timm), so the workers hold their first tasks
    until all of them are up (SimulatedWorker.START_GATE): what follows is the driver's steady state.
    """
    import ray

    from pipeline.execution import scheduler
    from pipeline.execution.progress import Progress
    from pipeline.store.store import Store

    gate = f"{root}.all-workers-up"  # beside the store, not in it
    workers_wanted = workers

    class OpenGateWhenAllUp(Progress):
        up_after_s: float | None = None
        cpu_when_up: dict[str, float] = {}
        done_when_up = 0
        busy: tuple[float, int] | None = None  # (seconds since all were up, records) when the queue ran dry

        def update(self, done: int, failed: int, workers: tuple[int, int] | None = None) -> None:
            super().update(done, failed, workers)
            if self.up_after_s is None and workers and workers[0] == workers[1]:
                self.up_after_s = time.perf_counter() - started
                self.done_when_up = done
                self.cpu_when_up = cpu_by_role()
                open(gate, "w").close()
                first_commit.start()
            # Every worker has work until the last in-flight window: the scheduler keeps 2 chunks per worker
            window = 2 * workers_wanted * chunk_size
            if self.up_after_s is not None and self.busy is None and len(plan) > window and done >= len(plan) - window:
                self.busy = (time.perf_counter() - started - self.up_after_s, done - self.done_when_up)

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    # Ray's workers cannot import this script (run as __main__, or __mp_main__ here): ship its code.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    shared_before = shared_memory_mib()
    try:
        commits = [f"store.commit_every={commit_every}"] if commit_every else []
        cfg = sweep_config(units, root, workers, 0, *commits)  # imports Hydra, timm
        before = rss_kib()
        started = time.perf_counter()
        plan = build_plan(cfg)
        planned = set(plan.keys())
        plan_s = time.perf_counter() - started
        plan_kib = rss_kib() - before
        store = Store(root)
        store.write_plan(plan.units_table())
        with store.writer(cfg.store.commit_every, cfg.store.commit_seconds,
                          commit_bytes=cfg.store.commit_bytes) as writer:
            first_commit = FirstCommit(lambda: writer.committed)
            progress = OpenGateWhenAllUp(len(plan), bar=False)
            started = time.perf_counter()
            summary = scheduler.run_plan(plan, set(), chunk_size, cfg.cluster, writer, progress, "cpu",
                                         simulated_worker(image_side, gate))
            cpu_at_end = cpu_by_role()
            object_store_mib = shared_memory_mib() - shared_before
            commit_wait_s = writer.waited_s  # before close(), whose last commit every run ends with
        wall = time.perf_counter() - started
        first_commit.stop()
        assert summary.done == len(planned) and not summary.failed, summary
        steady = wall - progress.up_after_s
        busy_s, busy_records = progress.busy or (steady, summary.done)
        return {"units": len(planned), "plan_s": plan_s, "plan_bytes_per_unit": 1024 * plan_kib / len(planned),
                "workers_up_s": progress.up_after_s, "first_commit_s": first_commit.after_s, "steady_s": steady,
                "records_per_s": summary.done / steady,
                # while every worker had work: the rate of a plan much longer than the in-flight window
                "busy_records_per_s": busy_records / busy_s, "busy_s": busy_s,
                # CPU milliseconds per committed record, by process role, while all workers were up
                "cpu_ms_per_record": {role: 1000 * (used - progress.cpu_when_up.get(role, 0.0)) / summary.done
                                      for role, used in cpu_at_end.items()},
                "driver_peak_mib": rss_kib("VmHWM") / 1024, "object_store_mib": object_store_mib,
                # taking no results meanwhile: where this nears steady_s, the store's commits are the bottleneck
                "commit_wait_s": commit_wait_s}
    finally:
        ray.shutdown()
        if os.path.exists(gate):
            os.remove(gate)


def add_records(root: str, units: int, first_seed: int, image_side: int | None = None, leave_out: int = 0,
                processes: int = 1, model: str = MODEL) -> int:
    """Plan ``units`` more simulated units of ``model`` (seeds from ``first_seed`` on) and write their records
    straight through the store's writer, no Ray: a store's growth between two atlas builds, a large store for
    status and resume, or the atlas's store of a wide model. With ``leave_out`` N, every N-th chunk of 64 is
    planned but not written. With ``processes`` P, P processes each write every P-th chunk through a writer
    of their own."""
    from pipeline.store.store import Store

    cfg = sweep_config(units, root, 1, first_seed, model=model)
    plan = build_plan(cfg)
    Store(root).write_plan(plan.units_table, plan.keys())
    if processes == 1:
        _write_share(root, units, first_seed, image_side, leave_out, 0, 1, model)
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
            shares = [pool.submit(_write_share, root, units, first_seed, image_side, leave_out, share, processes,
                                  model) for share in range(processes)]
            for share in shares:
                share.result()
    return len(plan)


def _write_share(root: str, units: int, first_seed: int, image_side: int | None, leave_out: int, share: int,
                 shares: int, model: str) -> None:
    """add_records' writing, of the chunks numbered ``share`` modulo ``shares``."""
    from pipeline.store.store import Store

    cfg = sweep_config(units, root, 1, first_seed, model=model)
    plan = build_plan(cfg)  # the same plan in every process: keys are a function of the config
    worker = simulated_worker(image_side)()
    # Shares write disjoint keys; each writer knows the keys committed before (a write interrupted and started
    # again skips them).
    with Store(root).writer(cfg.store.commit_every, cfg.store.commit_seconds,
                            commit_bytes=cfg.store.commit_bytes) as writer:
        for number, chunk in enumerate(plan.chunks(set(), 64)):
            if number % shares != share or (leave_out and number % leave_out == 0):
                continue
            writer.add_encoded(worker.run(chunk).records)


def read_step(name: str, root: str, site: str) -> dict:
    """One read-side command on the store at ``root``: seconds, and what it found."""
    from pipeline.store.store import Store
    from pipeline.views import status
    from pipeline.views.atlas import build_site
    from pipeline.views.readers import open_store

    started = time.perf_counter()
    if name == "status":  # what `vit-atlas status` prints
        found = len(status.render(Store.existing(root)).splitlines())
    elif name == "committed_keys":  # what a resumed sweep subtracts from its plan
        found = len(Store(root).committed_keys())
    elif name == "frame":  # two layers' metadata
        found = len(open_store(root).frame(layer=[0, 11]))
    elif name == "layer_images":  # one layer's records with their PNGs, as one table
        found = open_store(root).table(with_images=True, layer=5).num_rows
    elif name == "verify":
        report = Store(root).verify()
        assert report.ok, report.render()
        found = report.records
    elif name == "atlas":
        found = build_site(root, site).pages_written
    else:
        raise ValueError(name)
    return {"step": name, "s": time.perf_counter() - started, "found": found}


def measure_plan(units: int) -> dict:
    """The driver's planning alone: build_plan, the planned key set, the chunks and the plan table."""
    times = {}
    cfg = sweep_config(units, "unused", 32)  # imports Hydra and timm
    before = rss_kib()
    started = time.perf_counter()
    plan = build_plan(cfg)
    times["build_plan_s"] = time.perf_counter() - started
    planned = set(plan.keys())
    times["keys_s"] = time.perf_counter() - started - times["build_plan_s"]
    state_kib = rss_kib() - before
    mark = time.perf_counter()
    plan.chunks(set(), 8)
    times["chunks_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    plan.units_table()
    times["units_table_s"] = time.perf_counter() - mark
    return {"units": len(planned), "bytes_per_unit": 1024 * state_kib / len(planned), **times}


def measure_resume(units: int, root: str, workers: int) -> dict:
    """A resumed sweep, the real driver (pipeline.execution.driver.run_sweep) with simulated workers, on a
    store that holds most of its plan: seconds to the first new record (its timestamp) and to the end."""
    import contextlib

    import pyarrow.dataset as ds
    import ray

    from pipeline.execution import driver
    from pipeline.store.store import Store

    cfg = sweep_config(units, root, workers)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        since = datetime.now(timezone.utc)
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            exit_status = driver.run_sweep(cfg, SimulatedWorker)
        wall = time.perf_counter() - started
    finally:
        ray.shutdown()
    assert exit_status == 0, printed.getvalue()
    new = Store(root).read_records(columns=["timestamp"], filter=ds.field("timestamp") >= since)
    first = (min(new["timestamp"].to_pylist()) - since).total_seconds()
    return {"units": units, "new": new.num_rows, "first_record_s": first, "wall_s": wall}


def measure_atlas(base: str, units: int, model: str | None, root: str | None = None) -> None:
    """Print the atlas's first build, its re-run after 1% new records, and its biggest model page in
    headless Chromium. On the store at ``root``, or on a new one of ``units`` units of ``model`` (MODEL if
    None) written without Ray (about 400 records/s: a 37k-feature model needs no sweep to be timed)."""
    model = model or MODEL
    if root is None:
        root = f"{base}/atlas-store-{units}"
        started = time.perf_counter()
        in_fresh_process(add_records, root, units, 0, None, 0, os.cpu_count() or 1, model)
        print(f"\natlas store of {model}, {units:,} units, written without Ray in "
              f"{time.perf_counter() - started:.0f} s ({_du(root) / 2**30:.2f} GiB)", flush=True)
    site = f"{base}/site-{units}"
    first = in_fresh_process(read_step, "atlas", root, site)
    print(f"  {'atlas':<15} {first['s']:>7.2f} s  peak {first['peak_mib']:>6.0f} MiB  "
          f"({first['found']:,} feature pages written; page writers' peak {first['children_peak_mib']:.0f} MiB, "
          f"CPU {first['cpu_s']:.0f} s)", flush=True)
    in_fresh_process(add_records, root, max(1, first["found"] // 100), 10_000, None, 0, 1, model)
    again = in_fresh_process(read_step, "atlas", root, site)
    print(f"  {'atlas +1%':<15} {again['s']:>7.2f} s  peak {again['peak_mib']:>6.0f} MiB  "
          f"({again['found']:,} feature pages written, CPU {again['cpu_s']:.0f} s)", flush=True)
    browser = in_fresh_process(measure_browser, site)
    for line in browser["lines"]:
        print(f"  chromium        {line}", flush=True)


# What a page costs in the browser, from the Navigation and Resource Timing entries (ms since navigation
# start; bytes as served over HTTP, whether or not the browser had them cached: Resource Timing leaves
# out the sizes of files opened from file://).
_PAGE_COST = """
const [page] = performance.getEntriesByType("navigation");
const resources = performance.getEntriesByType("resource");
const bytes = (entries) => entries.reduce((sum, entry) => sum + entry.encodedBodySize, 0);
return {dom_ready_ms: page.domContentLoadedEventEnd, load_ms: page.loadEventEnd,
        nodes: document.getElementsByTagName("*").length, images: document.images.length, html_bytes: page.encodedBodySize,
        script_bytes: bytes(resources.filter((entry) => /\\.(js|css)$/.test(entry.name))),
        image_bytes: bytes(resources.filter((entry) => entry.initiatorType === "img"))};
"""

# ms from an action (args[0], a function's source) to the second frame after it: the page has handled it
# and painted.
_ACTION_MS = """
const done = arguments[arguments.length - 1];
const started = performance.now();
(new Function(arguments[0]))();
requestAnimationFrame(() => requestAnimationFrame(() => done(performance.now() - started)));
"""


def measure_browser(site: str) -> dict:
    """The biggest model page of the atlas at ``site`` in headless Chromium, served over loopback HTTP: the
    overview of its largest model and its heaviest grid page (load, DOM, bytes; a scroll to the bottom
    and a layer filter), and a search on the front page for one feature of every layer."""
    import functools
    import http.server
    from pathlib import Path

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    pages = sorted(Path(site, "models").glob("*.html"), key=lambda page: page.stat().st_size)
    heaviest = pages[-1]
    overview = min((page for page in pages if heaviest.stem.startswith(page.stem)), key=lambda page: len(page.stem))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    class QuietServer(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # the browser drops connections of lazy images it no longer wants: not an error of the site

    server = QuietServer(("127.0.0.1", 0), functools.partial(Quiet, directory=site))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='bench-chromium-')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_page_load_timeout(300)
    driver.set_script_timeout(300)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    lines = []
    try:
        for what, page in (("model page", overview), ("grid page", heaviest)):
            driver.get(f"{url}models/{page.name}")
            cost = driver.execute_script(_PAGE_COST)
            scroll = driver.execute_async_script(_ACTION_MS, "scrollTo(0, document.body.scrollHeight)")
            layer = driver.execute_script("return document.querySelector('tr[data-layer]')?.dataset.layer ?? ''")
            action = ("const input = document.getElementById('filter-layer'); "
                      f"input.value = '{layer}'; input.dispatchEvent(new Event('input'))")
            filtering = driver.execute_async_script(_ACTION_MS, action)
            lines.append(f"{what} {page.name} ({page.stat().st_size / 2**10:.0f} KiB): DOM ready "
                         f"{cost['dom_ready_ms']:.0f} ms, load {cost['load_ms']:.0f} ms, {cost['nodes']:,} DOM nodes, "
                         f"{cost['images']:,} images; HTML {cost['html_bytes'] / 2**10:.0f} KiB, scripts "
                         f"and styles {cost['script_bytes'] / 2**10:.0f} KiB, images so far "
                         f"{cost['image_bytes'] / 2**10:.0f} KiB; scroll to the bottom {scroll:.0f} ms, "
                         f"layer filter {filtering:.0f} ms")
        driver.get(f"{url}index.html")
        cost = driver.execute_script(_PAGE_COST)
        started = time.perf_counter()
        driver.execute_script("const input = document.getElementById('search-feature'); "
                              "input.value = '7'; input.dispatchEvent(new Event('input'))")
        while not driver.execute_script("return document.getElementById('search-count').textContent"):
            time.sleep(0.01)
        searched = time.perf_counter() - started
        count = driver.execute_script("return document.getElementById('search-count').textContent")
        loaded = driver.execute_script("return performance.getEntriesByType('resource')"
                                       ".filter((entry) => entry.name.includes('/search/'))"
                                       ".reduce((sum, entry) => [sum[0] + 1, sum[1] + entry.encodedBodySize], [0, 0])")
        lines.append(f"index page: load {cost['load_ms']:.0f} ms, {cost['nodes']:,} DOM nodes, HTML "
                     f"{cost['html_bytes'] / 2**10:.0f} KiB, scripts and styles "
                     f"{cost['script_bytes'] / 2**10:.0f} KiB; "
                     f"search 'feature 7' {1000 * searched:.0f} ms to '{count}' ({loaded[0]} index parts, "
                     f"{loaded[1] / 2**10:.0f} KiB)")
    finally:
        driver.quit()
        server.shutdown()
    return {"lines": lines}


def in_fresh_process(function, *args) -> dict:
    """``function(*args)`` in a new interpreter, with that process's peak resident memory added."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_with_peak, function, *args).result()


def _with_peak(function, *args) -> dict:
    import resource

    result = function(*args)
    if not isinstance(result, dict):
        return result
    # The largest of its ended child processes (the atlas's page writers), which VmHWM leaves out, and the
    # CPU time of all: on a machine other work shares, CPU seconds / cores bounds an idle machine's wall time.
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    cpu = sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for field in ("ru_utime", "ru_stime"))
    return {**result, "peak_mib": rss_kib("VmHWM") / 1024, "children_peak_mib": children, "cpu_s": cpu}


# ------------------------------------------------------------------ the benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--units", type=int, nargs="*", default=[10_000], help="plan sizes run end to end")
    parser.add_argument("--workers", type=int, default=32, help="simulated workers (actors; 2 CPUs shared)")
    # 32: what the zoo's experiments (conf/experiment/paper_*.yaml) batch on a GPU; the sweep's default is 8
    parser.add_argument("--chunk-size", type=int, default=32, help="features per chunk (sweep.chunk_size)")
    parser.add_argument("--commit-every", type=int, default=None,
                        help="records per commit (store.commit_every; default: the sweep's)")
    parser.add_argument("--atlas-max", type=int, default=10_000, help="build the atlas of stores up to this size")
    parser.add_argument("--atlas-model", default=None,
                        help="build the atlas of a store of this model's units written without Ray, e.g. "
                             "deit_base_patch16_224 (37k MLP features: a model page of that many), not the sweep's")
    parser.add_argument("--atlas-only", action="store_true", help="time the atlas alone, not the write and reads")
    parser.add_argument("--plan-only", type=int, nargs="*", default=[], help="plan sizes timed without running")
    parser.add_argument("--status-records", type=int, nargs="*", default=[],
                        help="stores of this many 32 px records for status and resume")
    parser.add_argument("--dir", default=None, help="where stores go (default: a new temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the stores and sites")
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="bench-scale-", dir=args.dir)
    store = cli.load("sweep").store  # the sweep's defaults
    print(f"scale benchmark: {MODEL}, {args.workers} simulated workers, chunks of {args.chunk_size}, "
          f"commits of {args.commit_every or store.commit_every} records (or {store.commit_bytes / 2**20:g} MiB), "
          f"{os.cpu_count()} cores; stores under {base}", flush=True)
    try:
        for units in args.units:
            root = f"{base}/store-{units}"
            if args.atlas_only:
                measure_atlas(base, units, args.atlas_model)
                continue
            write = in_fresh_process(measure_write, units, root, args.workers, args.chunk_size, args.commit_every)
            print(f"\nwrite {write['units']:,} units: plan {write['plan_s']:.1f} s "
                  f"({write['plan_bytes_per_unit']:.0f} B/unit); {args.workers} workers up after "
                  f"{write['workers_up_s']:.1f} s, first commit {write['first_commit_s']:.2f} s later; then "
                  f"{write['busy_records_per_s']:.0f} records/s committed while every worker had work "
                  f"({write['busy_s']:.1f} s; {write['records_per_s']:.0f} records/s to the last commit, "
                  f"{write['steady_s']:.1f} s); driver peak "
                  f"{write['driver_peak_mib']:.0f} MiB, object store high-water {write['object_store_mib']:.0f} MiB, "
                  f"store {_du(root) / 2**30:.2f} GiB", flush=True)
            print("  CPU per record: " + ", ".join(f"{role} {ms:.2f} ms" for role, ms in
                                                  sorted(write["cpu_ms_per_record"].items()))
                  + f"; the driver waited {write['commit_wait_s']:.1f} s for commits in flight", flush=True)
            steps = ["status", "committed_keys", "frame", "layer_images", "verify"]
            for step in steps:
                result = in_fresh_process(read_step, step, root, f"{base}/site-{units}")
                print(f"  {step:<15} {result['s']:>7.2f} s  peak {result['peak_mib']:>6.0f} MiB  "
                      f"({result['found']:,})", flush=True)
            if units <= args.atlas_max:  # as asked for: a plan rounds up to whole layers
                measure_atlas(base, units, args.atlas_model, None if args.atlas_model else root)
        for units in args.plan_only:
            plan = in_fresh_process(measure_plan, units)
            print(f"\nplan {plan['units']:,} units: build_plan {plan['build_plan_s']:.1f} s, "
                  f"keys {plan['keys_s']:.1f} s, chunks {plan['chunks_s']:.1f} s, "
                  f"plan table {plan['units_table_s']:.1f} s; {plan['bytes_per_unit']:.0f} B/unit, "
                  f"peak {plan['peak_mib']:.0f} MiB", flush=True)
        for records in args.status_records:
            root = f"{base}/small-{records}"
            started = time.perf_counter()
            planned = in_fresh_process(add_records, root, records, 0, 32, 1000, os.cpu_count() or 1)
            print(f"\nwrote a store of {planned:,} planned units, every 1,000th chunk of 64 left to do, 32 px, "
                  f"without Ray, in {time.perf_counter() - started:.0f} s ({_du(root) / 2**30:.2f} GiB)", flush=True)
            for step in ("status", "committed_keys"):
                result = in_fresh_process(read_step, step, root, "")
                print(f"  {step:<15} {result['s']:>7.2f} s  peak {result['peak_mib']:>6.0f} MiB", flush=True)
            resume = in_fresh_process(measure_resume, records, root, 4)
            print(f"  resume          first new record after {resume['first_record_s']:.1f} s, "
                  f"{resume['new']:,} records in {resume['wall_s']:.1f} s, driver peak {resume['peak_mib']:.0f} MiB",
                  flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


if __name__ == "__main__":
    sys.exit(main())
