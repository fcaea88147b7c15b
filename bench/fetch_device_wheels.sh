#!/usr/bin/env bash
# Wheels the device check needs on the GPU machine and that machine lacks (it has torch, transformers, tokenizers,
# safetensors, accelerate, peft, pandas, pyarrow, scipy, numpy, tqdm, rich; not pydantic, and no internet).
# Downloaded here, where PyPI is reachable, into an ignored folder that travels with the working tree;
# bench/device_check.py installs them there with `pip install --no-index --no-deps --target`. The versions are the ones
# this project is tested with (2.8 MB in all).
#
#   bash bench/fetch_device_wheels.sh [DEST] [PYTHON_VERSION]      # defaults: bench/device_wheels 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-bench/device_wheels}"
PYV="${2:-3.12}"
PIP="${PIP:-.venv/bin/pip}"
[ -x "$PIP" ] || PIP="python3 -m pip"
mkdir -p "$DEST"
# pydantic and exactly what it imports; pydantic-core is the one compiled part: a CPython PYV manylinux x86-64 wheel
if ! log=$($PIP download --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PYV" --implementation cp --platform manylinux_2_17_x86_64 --dest "$DEST" \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 2>&1); then
    echo "$log" >&2
    exit 1
fi
ls -l "$DEST"
du -sh "$DEST"
