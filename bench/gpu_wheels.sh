#!/usr/bin/env bash
# Download, here, the wheels bench/bench_gpu_scale.py needs on a GPU machine that has PyTorch, transformers, peft,
# lightning and accelerate but no package index (a lent machine with CUDA): TRL and the part of its needs such an
# image usually lacks. They go to ./.whl (or $1), for bench/gpu_session.sh to install there with --no-index.
#
#     bash bench/gpu_wheels.sh            # then carry .whl to the GPU machine with the working tree
#
# The versions are the ones bench/requirements-bench.txt pins (TRL) and the newest that TRL's and datasets' own
# requirements admit. The target is CPython 3.12 on x86-64 Linux (the lent H200 image's Python); WHEEL_PYTHON=3.11
# fetches them for this machine's Python instead, to rehearse bench/gpu_session.sh here.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
trl=$(sed -n 's/^trl==\([^ ]*\).*/\1/p' bench/requirements-bench.txt)
mkdir -p "$dest"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$dest" \
    "trl==$trl" "datasets==5.2.0" "dill<0.4.2" "multiprocess<0.70.20" 2>&1 | grep -v "is ignored" || true
ls "$dest"/trl-"$trl"-*.whl "$dest"/datasets-*.whl "$dest"/dill-*.whl "$dest"/multiprocess-*.whl >/dev/null
du -sh "$dest"
