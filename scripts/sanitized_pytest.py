"""Runs pytest against a staged fastonnx package (scripts/sanitize.sh builds and stages one with
ASan + UBSan), not the installed one.

    python scripts/sanitized_pytest.py STAGE_DIR PYTEST_ARGS...

An editable install puts an import hook ahead of sys.path; it is removed here so ``import
fastonnx`` finds STAGE_DIR/fastonnx (and its sanitized _native module and custom-op library).
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> int:
    stage = Path(sys.argv[1]).resolve()
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
    sys.path.insert(0, str(stage))
    sys.modules.pop("fastonnx", None)
    import pytest

    import fastonnx
    from fastonnx import _native

    where = Path(_native.__file__).resolve()
    if stage not in where.parents:
        print(f"sanitized_pytest: fastonnx._native came from {where}, not {stage}", file=sys.stderr)
        return 2
    print(f"sanitized_pytest: fastonnx from {Path(fastonnx.__file__).parent}")
    return int(pytest.main(sys.argv[2:]))


if __name__ == "__main__":
    sys.exit(main())
