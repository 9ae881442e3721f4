#!/usr/bin/env bash
# examples/fashion_mlp --zero trains to the same accuracy as without: the
# ZeRO-1 weights are the unsharded ones, bit for bit, so the result lines
# must agree to the last digit; and rank 0 holds about half the state.
#   zero_example.sh EMULATOR DDPRUN FASHION_MLP ARGS...
# (EMULATOR: empty, or the ;-list that runs a Windows program under Wine)
set -euo pipefail
IFS=';' read -r -a emu <<< "$1"
run=$2 bin=$3
shift 3
plain=$("${emu[@]}" "$run" -n 2 -- "$bin" "$@")
zero=$("${emu[@]}" "$run" -n 2 -- "$bin" "$@" --zero)
echo "$plain"
echo "$zero"
a=$(echo "$plain" | grep -o 'result: epochs=[0-9]* test_acc=[0-9.]*')
b=$(echo "$zero" | grep -o 'result: epochs=[0-9]* test_acc=[0-9.]*')
sa=$(echo "$plain" | sed -n 's/.*optimizer state \([0-9]*\) bytes.*/\1/p')
sb=$(echo "$zero" | sed -n 's/.*optimizer state \([0-9]*\) bytes.*/\1/p')
echo "plain: $a, state $sa bytes; zero: $b, state $sb bytes"
[ -n "$a" ] || { echo "no result line"; exit 1; }
[ "$a" = "$b" ] || { echo "FAIL: --zero reached another accuracy"; exit 1; }
echo "$a" | grep -Eq 'test_acc=0\.[6-9]' || { echo "FAIL: did not learn"; exit 1; }
[ "$sb" -le $(( sa / 2 + 16384 )) ] || { echo "FAIL: rank 0 holds $sb bytes of state with --zero, $sa without"; exit 1; }
echo "PASS: the same accuracy with ZeRO-1, state $sb of $sa bytes on rank 0"
