#!/usr/bin/env bash
# dp.h with K replicas in one process and ddp.h with K processes, on the same
# data and the same split, must end with the same bits.
#   dp_vs_ddp.sh DDPRUN TEST_EQUIV TEST_DP K [EMULATOR...]
# EMULATOR (cross-built Windows programs: cmake/wine-run.sh --dir D) runs
# ddprun and test_dp; ddprun.exe starts test_equiv itself.
set -eu
ddprun=$1 equiv=$2 dp=$3 k=$4
shift 4
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$@" "$ddprun" -n "$k" -- "$equiv" --optim sgd --dump "$dir/ddp.bin" > /dev/null
"$@" "$dp" --dump "$k" "$dir/dp.bin"
if cmp -s "$dir/ddp.bin" "$dir/dp.bin"; then
  echo "dp_vs_ddp K=$k: identical ($(stat -c %s "$dir/dp.bin") bytes)"
else
  echo "dp_vs_ddp K=$k: the weights differ"; cmp "$dir/ddp.bin" "$dir/dp.bin" | head -3; exit 1
fi
