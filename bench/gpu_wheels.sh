#!/usr/bin/env bash
# What bench/gpu_check.py carries to a lent GPU machine (no package registry there), into .whl/ (git-ignored;
# the device call names it in `carry`): the wheels of the Python packages the check imports that the machine's
# image lacks, at constraints.txt's versions, for CPython 3.11 to 3.13 (the image's python3 was 3.12; pip
# there picks each package's file for its own Python), and, given a checkout of the authors' code
# (TheLuoFengLab/DDDM), its DDDM package for bench_peer's comparison.
#
#     bash bench/gpu_wheels.sh [PEER_CHECKOUT]
#
# The image already has PyTorch, numpy, scipy, scikit-learn, pillow, pyarrow and fsspec (the device tool's
# KINDS.md lists its packages), which together would not fit the 64 MiB a call carries; it lacks pydantic and
# its helpers. PyYAML, psutil and tqdm are small, so they come along in case an image lacks them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
PACKAGES="pydantic pydantic_core annotated-types typing-inspection typing_extensions PyYAML psutil tqdm"
LIMIT_MIB=48  # of the 64 MiB a device call carries: the working tree travels too

pins=()
for name in $PACKAGES; do
    pattern="^${name//[-_]/[-_]}=="
    pin=$(grep -i -E "$pattern" constraints.txt) || { echo "gpu_wheels: $name is not in constraints.txt" >&2; exit 1; }
    pins+=("$pin")
done
rm -rf .whl
mkdir -p .whl
for version in 3.11 3.12 3.13; do
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp --python-version "$version" \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --dest .whl "${pins[@]}"
done
if [ $# -gt 0 ]; then
    test -f "$1/DDDM/unet.py" || { echo "gpu_wheels: $1 has no DDDM/unet.py (a checkout of TheLuoFengLab/DDDM)" >&2; exit 1; }
    mkdir -p .whl/peer/DDDM
    cp "$1"/DDDM/*.py .whl/peer/DDDM/
fi
ls -l .whl
size=$(du -sm .whl | cut -f1)
echo "gpu_wheels: .whl holds ${size} MiB"
if [ "$size" -gt "$LIMIT_MIB" ]; then
    echo "gpu_wheels: more than ${LIMIT_MIB} MiB: the device call carries 64 MiB with the working tree" >&2
    exit 1
fi
