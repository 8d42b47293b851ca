#!/usr/bin/env bash
# Builds the native library (the pybind11 module and the ORT custom-op library) with
# AddressSanitizer + UndefinedBehaviorSanitizer (GCC, the project's compiler) into build/asan,
# stages it with the Python sources in build/asan/stage, and runs the kernel, packed-weight,
# ORT-op and hostile-input tests against it. Any sanitizer report aborts the run (exit != 0).
#
#   scripts/sanitize.sh                 # the default test set
#   scripts/sanitize.sh tests/test_kernels.py -k amx    # other pytest arguments
#
# Python itself is not sanitized, so the ASan runtime is preloaded; leak checking is off (the
# interpreter's own allocations would drown real reports).
set -euo pipefail
cd "$(dirname "$0")/.."
build=build/asan
flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined" \
  -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" \
  -DPython_EXECUTABLE="$(command -v python)" >"$build.configure.log" 2>&1 ||
  { cat "$build.configure.log" >&2; exit 2; }
cmake --build "$build" --parallel "${CMAKE_BUILD_PARALLEL_LEVEL:-1}" >"$build.build.log" 2>&1 ||
  { tail -40 "$build.build.log" >&2; exit 2; }

stage=$build/stage
rm -rf "$stage" && mkdir -p "$stage"
cp -r fastonnx "$stage/fastonnx"
find "$stage/fastonnx" \( -name "*.so" -o -name __pycache__ \) -prune -exec rm -rf {} +
cp "$build"/custom_ops/_native*.so "$build"/custom_ops/libfastonnx_ops.so "$stage/fastonnx/"

if [ $# -eq 0 ]; then
  set -- tests/test_kernels.py tests/test_packed_weight.py tests/test_sparse_linear_op.py \
    tests/test_hostile_input.py $(ls tests/test_attention_op.py 2>/dev/null) \
    -q -p no:cacheprovider
fi
# Reports go to files: pytest captures the tests' stderr, and a sanitizer ends the process
# before pytest could show it.
reports=$build/reports
rm -rf "$reports" && mkdir -p "$reports"
status=0
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:strict_string_checks=1:log_path=$reports/asan \
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=$reports/ubsan \
  python scripts/sanitized_pytest.py "$stage" "$@" || status=$?
if compgen -G "$reports/*" >/dev/null; then
  echo "sanitize.sh: SANITIZER REPORT" >&2
  head -60 "$reports"/* >&2
  exit 1
fi
echo "sanitize.sh: pytest exit $status, no sanitizer report"
exit "$status"
