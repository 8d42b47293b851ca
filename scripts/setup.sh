#!/usr/bin/env bash
# Installs fastonnx (editable: builds custom_ops/ with CMake) and what the tests and demo need.
# torch is installed on its own first: on these machines `torch==2.13.0` is a local CPU wheel,
# while letting a resolver pick torch would pull gigabytes of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check torch==2.13.0
python -m pip install --quiet --disable-pip-version-check -e ".[test,bench]"
