#!/usr/bin/env bash
# The main job on its built-in default: set up, show what fastonnx detected, then benchmark the
# sparse INT8 kernels against ORT on MiniLM-L6's linear-layer shapes (M=128, 1 thread).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
fastonnx info
fastonnx bench kernels --models minilm "$@"
