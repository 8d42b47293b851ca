#!/usr/bin/env bash
# Fetch ONNX Runtime's C/C++ API headers from Debian's libonnxruntime-dev package into DEST,
# without touching the system's apt configuration (a private sources list and lists folder).
# The PyPI onnxruntime wheel ships no headers; headers of API version N work with any ORT >= N.
set -euo pipefail
dest=${1:?usage: fetch_ort_headers.sh DEST [SUITE]}
suite=${2:-trixie}
command -v apt-get >/dev/null || { echo "apt-get not found: cannot fetch ORT headers" >&2; exit 3; }
command -v dpkg >/dev/null || { echo "dpkg not found: cannot fetch ORT headers" >&2; exit 3; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/archives/partial"
echo "deb http://deb.debian.org/debian $suite main" > "$work/sources.list"
opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
      -o "Dir::State::Lists=$work/lists" -o "Dir::Cache::Archives=$work/archives"
      -o Debug::NoLocking=1 -o APT::Sandbox::User=root -qq)
apt-get "${opts[@]}" update >&2
(cd "$work" && apt-get "${opts[@]}" download libonnxruntime-dev >&2)
dpkg -x "$work"/libonnxruntime-dev_*.deb "$work/x"
test -f "$work/x/usr/include/onnxruntime/onnxruntime_c_api.h"
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.tmp" && cp -r "$work/x/usr/include/onnxruntime" "$dest.tmp" && mv "$dest.tmp" "$dest"
echo "ORT headers installed in $dest" >&2
