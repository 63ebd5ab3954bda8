#!/usr/bin/env bash
# Submit a sweep to an existing Ray cluster as a Ray job.
#
#   jobs/submit.sh [options] [--] [HYDRA_OVERRIDE ...]
#   jobs/submit.sh --address http://head:8265 experiment=smoke store.root=s3://bucket/atlas
#   jobs/submit.sh --dry-run sweep.models=[deit_tiny_patch16_224] 'sweep.layers=[0,5]'
#
# The job runs `python -m pipeline sweep cluster=ray OVERRIDES...` on the head node, with
# this checkout uploaded as the job's working directory (so the cluster runs exactly this
# code and conf/). The cluster's nodes need the project's dependencies at the same Ray
# version: run them from docker/Dockerfile.{gpu,cpu} (docs/deploy.md).
#
# Options:
#   --address URL         Ray dashboard address (default: $RAY_ADDRESS, else http://127.0.0.1:8265)
#   --submission-id ID    job id (default: vit-atlas-sweep-<UTC time>); a re-submit of a finished
#                         sweep's overrides does only the missing work
#   --no-wait             return once submitted instead of following the logs
#   --dry-run             print the command and runtime environment; submit nothing
#
# AWS_ENDPOINT_URL and AWS_REGION are passed to the job when set here. Credentials are
# not: they would be stored in the job's metadata, visible on the dashboard. Give the
# cluster's nodes their own (instance role, Kubernetes secret, environment).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
address=${RAY_ADDRESS:-http://127.0.0.1:8265}
submission_id="vit-atlas-sweep-$(date -u +%Y%m%d-%H%M%S)"
dry_run=0
wait_flag=()
overrides=()

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
    exit "$1"
}

while (($#)); do
    case $1 in
        --address) address=${2:?--address needs a URL}; shift 2 ;;
        --address=*) address=${1#*=}; shift ;;
        --submission-id) submission_id=${2:?--submission-id needs an id}; shift 2 ;;
        --submission-id=*) submission_id=${1#*=}; shift ;;
        --no-wait) wait_flag=(--no-wait); shift ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) usage 0 ;;
        --) shift; overrides+=("$@"); break ;;
        -*) echo "submit.sh: unknown option $1" >&2; usage 2 ;;
        *) overrides+=("$1"); shift ;;
    esac
done

# The project's venv has the Ray CLI at the version the images pin; fall back to PATH.
if [[ -x $repo/.venv/bin/ray ]]; then
    ray_cli=$repo/.venv/bin/ray
    python=$repo/.venv/bin/python
else
    ray_cli=ray
    python=python3
fi

# JSON built by Python, so endpoint URLs and regions need no shell escaping.
runtime_env=$("$python" - <<'PY'
import json, os
forwarded = {name: os.environ[name] for name in ("AWS_ENDPOINT_URL", "AWS_REGION") if os.environ.get(name)}
print(json.dumps({
    "excludes": [".git", ".venv", "outputs", "multirun", "**/__pycache__", "*.egg-info", ".pytest_cache"],
    "env_vars": {"RAY_USAGE_STATS_ENABLED": "0", **forwarded},
}))
PY
)

command=("$ray_cli" job submit
    --address "$address"
    --submission-id "$submission_id"
    --working-dir "$repo"
    --runtime-env-json "$runtime_env"
    "${wait_flag[@]}"
    -- python -m pipeline sweep cluster=ray "${overrides[@]}")

if ((dry_run)); then
    echo "would run:"
    "$python" -c 'import shlex, sys; print(shlex.join(sys.argv[1:]))' "${command[@]}"
    exit 0
fi
exec "${command[@]}"
