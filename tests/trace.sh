#!/usr/bin/env bash
# The timeline: test_trace writes it on N ranks (and checks the step
# statistics itself), tools/ddptrace draws it, tests/trace_check.py reads
# both with Python's json and xml modules. Skipped (77) without python3.
#   trace.sh DDPRUN TEST_TRACE DDPTRACE CHECK_PY N
set -euo pipefail
run=$1 bin=$2 draw=$3 check=$4 n=$5
command -v python3 >/dev/null || { echo "SKIP: no python3"; exit 77; }
dir=$(mktemp -d /tmp/ddp_trace_test.XXXXXX)
trap 'rm -rf "$dir"' EXIT
"$run" -n "$n" -- "$bin" "$dir"
files=()
for ((r = 0; r < n; r++)); do files+=("$dir/trace.rank$r.json"); done
"$draw" --title "test_trace, $n ranks" -o "$dir/timeline.svg" "${files[@]}"
python3 "$check" "$dir" "$n"
