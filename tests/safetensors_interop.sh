#!/usr/bin/env bash
# safetensors_interop.sh - ddp.h's safetensors files against an independent reader
# and writer in Python (tests/safetensors_interop.py: json + struct, and torch when
# it imports).
#   safetensors_interop.sh files  TEST_SAFETENSORS     library file -> Python, Python file -> library
#   safetensors_interop.sh export DDPRUN FASHION_MLP   fashion_mlp --export on 2 ranks -> Python/PyTorch
# Exit 77 (skip) without python3.
set -u
here=$(cd "$(dirname "$0")" && pwd)
py=""
for c in /usr/bin/python3 python3; do   # prefer one with torch (Debian's python3-torch)
  if command -v "$c" > /dev/null 2>&1 && "$c" -c 'import torch' > /dev/null 2>&1; then py=$c; break; fi
done
if [ -z "$py" ]; then
  for c in python3 /usr/bin/python3; do
    if command -v "$c" > /dev/null 2>&1; then py=$c; break; fi
  done
fi
[ -n "$py" ] || { echo "SKIP: no python3"; exit 77; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
set -e
case $1 in
files)
  "$2" write "$dir/lib.safetensors"
  "$py" "$here/safetensors_interop.py" check "$dir/lib.safetensors"
  "$py" "$here/safetensors_interop.py" write "$dir/py.safetensors"
  "$2" read "$dir/py.safetensors"
  ;;
export)
  out=$("$2" -n 2 -- "$3" --epochs 1 --limit 6000 --export "$dir/fashion.safetensors" 2>&1)
  printf '%s\n' "$out" | tail -3
  acc=$(printf '%s\n' "$out" | sed -n 's/.*result: epochs=1 test_acc=\([0-9.]*\).*/\1/p')
  data=$(printf '%s\n' "$out" | sed -n 's/.* test samples from \([^ ]*\).*/\1/p' | head -1)
  [ -n "$acc" ] || { echo "no result line from fashion_mlp"; exit 1; }
  "$py" "$here/safetensors_interop.py" export "$dir/fashion.safetensors" "$data" "$acc"
  ;;
*)
  echo "usage: safetensors_interop.sh files TEST_SAFETENSORS | export DDPRUN FASHION_MLP"; exit 2 ;;
esac
