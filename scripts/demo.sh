#!/usr/bin/env bash
# The main job on its built-in default: set up, then the whole pipeline on all-MiniLM-L6-v2:
# fine-tune a sentence-polarity teacher, prune + distill 80% and 90% block-sparse students,
# `fastonnx optimize` them, and print the accuracy table and `fastonnx bench` speed tables.
# About 15 minutes on 2 quiet cores after installs (the students' 350 length-grouped steps cost
# less than the 200 random-batch steps before; much longer on a shared machine); reruns reuse
# .cache/models. Options go to models/demo.py (--tiny: a random tiny BERT in a minute; --full:
# the long recipe; --target avx512_vnni|amx|avx2 or --block-shape 1x4|16x4: the students' block
# shape, default this CPU's).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# OpenVINO (on PyPI) is the strongest CPU peer: the speed tables compare against it.
python -m pip install --quiet --disable-pip-version-check -e ".[recipes,openvino]"
fastonnx info
python models/demo.py "$@"
