#!/usr/bin/env bash
# The test command: set up, then run the fast test suite (slow/real-model tests: -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python -m pytest -q "$@"
