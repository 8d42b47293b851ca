#!/usr/bin/env bash
# Fuzzes fastonnx's readers of untrusted input for SECONDS in all (default 60), half each:
#   build/fuzz/fuzz_packed_weight  libFuzzer + ASan + UBSan on the C++ packed-weight reader and
#                                  kernel creation (every kernel path must agree exactly)
#   fuzz/fuzz_loaders.py           atheris on the Python readers: blobs, ONNX models, .npz files
# Seeds come from fuzz/make_corpus.py; what the fuzzers learn stays in build/fuzz/run-* for the
# next run. Any crash, hang (-timeout), sanitizer report or unexpected exception fails the script
# and leaves the input in build/fuzz/artifacts/ (turn each into a test; see fuzz/README.md).
#
#   scripts/fuzz.sh          # the CI run: about a minute
#   scripts/fuzz.sh 600      # the longer run (10 minutes)
# Needs clang (apt-get install clang: done here when missing and apt-get is usable) and atheris
# (pip-installed here when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
total=${1:-60}
half=$(( total / 2 > 1 ? total / 2 : 1 ))
out=build/fuzz
mkdir -p "$out/artifacts" "$out/run-blobs" "$out/run-loaders"

# Before installing anything: the Python target fuzzes whatever `import fastonnx` finds, so
# refuse another checkout's (activate this checkout's environment; `pip install -e .`).
where=$(python -c "import fastonnx, os; print(os.path.dirname(os.path.realpath(fastonnx.__file__)))")
if [ "$where" != "$(pwd -P)/fastonnx" ]; then
  echo "fuzz.sh: python imports fastonnx from $where, not this checkout; activate its environment" >&2
  exit 2
fi
if ! command -v clang++ >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    # A new machine may have no package lists yet.
    apt-get update -q >/dev/null && apt-get install -y -q clang >/dev/null
  else
    echo "fuzz.sh: clang++ not found (apt-get install clang)" >&2
    exit 2
  fi
fi
python -c "import atheris" 2>/dev/null ||
  python -m pip install --quiet --disable-pip-version-check "atheris==3.0.0"

python fuzz/make_corpus.py "$out/corpus"

# Rebuild the C++ target when a source is newer than it.
bin=$out/fuzz_packed_weight
sources=(custom_ops/kernels/*.cc custom_ops/kernels/*.h fuzz/fuzz_packed_weight.cc)
if [ ! -x "$bin" ] || [ -n "$(find "${sources[@]}" -newer "$bin" 2>/dev/null)" ]; then
  echo "fuzz.sh: building $bin"
  clang++ -std=c++17 -O1 -g -fno-omit-frame-pointer \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -Wno-unknown-warning-option -Icustom_ops/kernels \
    custom_ops/kernels/*.cc fuzz/fuzz_packed_weight.cc -o "$bin"
fi

common=(-max_total_time="$half" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1
        -artifact_prefix="$out/artifacts/")
status=0
echo "fuzz.sh: C++ packed-weight reader, ${half}s"
UBSAN_OPTIONS=print_stacktrace=1 "$bin" "${common[@]}" "$out/run-blobs" "$out/corpus/blobs" \
  >"$out/blobs.log" 2>&1 || status=1
grep -E "^(#[0-9]+\s+DONE|stat::number_of_executed_units|stat::new_units_added)" "$out/blobs.log" || true
grep -oE "cov: [0-9]+ ft: [0-9]+" "$out/blobs.log" | tail -1 || true

echo "fuzz.sh: Python loaders (blobs, models, .npz), ${half}s"
python fuzz/fuzz_loaders.py "${common[@]}" "$out/run-loaders" "$out/corpus/loaders" \
  >"$out/loaders.log" 2>&1 || status=1
grep -E "^(#[0-9]+\s+DONE|stat::number_of_executed_units|stat::new_units_added)" "$out/loaders.log" || true
grep -oE "cov: [0-9]+ ft: [0-9]+" "$out/loaders.log" | tail -1 || true

if [ "$status" != 0 ]; then
  echo "fuzz.sh: FINDING (see $out/blobs.log, $out/loaders.log; inputs in $out/artifacts/)" >&2
  grep -hE "ERROR|SUMMARY|Uncaught|Error:" "$out/blobs.log" "$out/loaders.log" | head -20 >&2
  exit 1
fi
echo "fuzz.sh: no findings"
