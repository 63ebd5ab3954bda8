#!/usr/bin/env bash
# The first thing to run on a GPU: every GPU path once, its figures appended to docs/benchmarks.md.
#
#   make gpu-check                    # from a fresh clone on a machine with one NVIDIA GPU
#   make gpu-check ARGS=--dry-run     # print the commands; run nothing (works on a CPU)
#   TORCH_INDEX=https://download.pytorch.org/whl/cu126 make gpu-check   # another CUDA build of torch
#
# It runs, each under a time limit (about 8 min in all on one H100/H200):
#   1. set-up with the CUDA build of torch (make setup TORCH_INDEX=...) and the demo's weights;
#   2. the GPU tests (pytest -k cuda);
#   3. the engine benchmark on cuda in bf16, with % of the device's dense peak (bench/engine.py);
#   4. the demo at the paper's 400 steps;
#   5. a sweep on one GPU shared by four workers (cluster.gpus_per_worker=0.25);
#   6. a sweep with sweep.chunk_size=auto, which prints the batch it chose and its throughput.
# Each step's output is kept under outputs/gpu-check/; the figures (bench table, the plan's
# calibration and cost lines, each step's wall time) are appended to docs/benchmarks.md with the
# device and the date. A step that fails is reported and the others still run; the exit status
# is 1 if any failed.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo" || exit 2
dry_run=0
for arg in "$@"; do
    case $arg in
        --dry-run) dry_run=1 ;;
        *) echo "gpu-check: unknown argument '$arg' (only --dry-run)" >&2; exit 2 ;;
    esac
done

torch_index=${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}
venv=${VENV:-.venv}
out=outputs/gpu-check
stamp=$(date -u +%Y%m%d-%H%M%S)
stores=/tmp/vit-atlas-gpu-check-$stamp
report=$out/report-$stamp.md
export RAY_USAGE_STATS_ENABLED=0
failed=()

# step NAME LIMIT_S COMMAND...: run (or, with --dry-run, print) one step, its output in $out/NAME.log.
step() {
    local name=$1 limit=$2
    shift 2
    if (( dry_run )); then
        printf '+ timeout %s %s\n' "$limit" "$*"
        return 0
    fi
    echo "== $name (at most ${limit} s)"
    local started=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local status=${PIPESTATUS[0]}
    printf '| %s | %d s | %s |\n' "$name" $((SECONDS - started)) \
        "$([ "$status" = 0 ] && echo ok || echo "failed ($status)")" >> "$report.steps"
    (( status == 0 )) || failed+=("$name")
}

if (( dry_run )); then
    echo "would run (gpu-check, dry run):"
else
    mkdir -p "$out"
    : > "$report.steps"
fi

step setup 600 make setup demo-weights TORCH_INDEX="$torch_index"
if (( ! dry_run )) && ! "$venv/bin/python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu-check: torch in $venv sees no GPU (a CPU build, or no driver): make clean, then make gpu-check" >&2
    exit 2
fi
step gpu-tests 90 "$venv/bin/python" -m pytest -q -k cuda tests/
step bench 120 "$venv/bin/python" bench/engine.py --device cuda --precision bf16 --features 64 --copies 8 \
    --steps 20 --repeats 2
step demo-400-steps 120 "$venv/bin/vit-atlas" sweep experiment=demo sweep.budget_s=null optim.steps=400 \
    progress.bar=false "store.root=$stores/demo"
step quarter-gpu-workers 75 "$venv/bin/vit-atlas" sweep "sweep.models=[vit_base_patch16_224]" \
    model.weights=random "sweep.layers=[0,6,11]" sweep.features=first:16 optim.steps=100 \
    cluster.gpus_per_worker=0.25 sweep.chunk_size=4 progress.bar=false "store.root=$stores/quarter"
step auto-batch 75 "$venv/bin/vit-atlas" sweep "sweep.models=[vit_base_patch16_224]" model.weights=random \
    "sweep.layers=[11]" sweep.features=first:256 optim.steps=50 sweep.chunk_size=auto \
    cluster.gpus_per_worker=1 progress.bar=false "store.root=$stores/auto"
if (( dry_run )); then
    echo "+ append the figures to docs/benchmarks.md"
    exit 0
fi

device=$("$venv/bin/python" -c "import torch; print(torch.cuda.get_device_name(0))")
{
    echo
    echo "## GPU check: $device, $(date -u +%Y-%m-%d)"
    echo
    echo "\`make gpu-check\` (jobs/gpu-check.sh), torch $("$venv/bin/python" -c "import torch; print(torch.__version__)")."
    echo
    echo "| step | wall time | result |"
    echo "|---|---|---|"
    cat "$report.steps"
    echo
    echo "Engine, bf16 (bench/engine.py; % of the dense bf16 peak: H100/H200 989 TFLOP/s, A100 312, L4 121):"
    echo
    grep -E '^(#|\|)' "$out/bench.log" 2>/dev/null
    for name in demo-400-steps quarter-gpu-workers auto-batch; do
        echo
        echo "\`$name\`:"
        echo
        echo '```'
        grep -E '^(calibration|size:|cost:|done:)' "$out/$name.log" 2>/dev/null
        echo '```'
    done
} > "$report"
cat "$report" >> docs/benchmarks.md
echo "gpu-check: figures appended to docs/benchmarks.md (also in $report)"
if (( ${#failed[@]} )); then
    echo "gpu-check: failed steps: ${failed[*]} (their output: $out/<step>.log)" >&2
    exit 1
fi
