#!/usr/bin/env bash
# A short run with a schedule, parameter groups and clipping, on 2 ranks,
# against PyTorch 1.13 itself (Debian's python3-torch).
#   torch_compare.sh DDPRUN TEST_TRAIN SCRIPT
# Skips (exit 77) where python3-torch is missing.
set -u
ddprun=$1 train=$2 script=$3
if ! /usr/bin/python3 -c 'import torch' 2>/dev/null; then
  echo "SKIP: needs python3-torch (apt-get install python3-torch)"; exit 77
fi
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$ddprun" -n 2 -- "$train" torch "$dir/ours.bin" || { echo "test_train torch failed"; exit 1; }
/usr/bin/python3 "$script" "$dir/ours.bin" 2
