#!/usr/bin/env bash
# fashion_mlp started by PyTorch's torchrun (2 workers): the ranks rendezvous
# as clients of torchrun's agent store (TCPStore protocol) and train.
#   torchrun.sh FASHION_MLP TORCHRUN_PY
# Skips (exit 77) where python3-torch or the launcher script is missing.
set -u
exe=$1 launcher=$2
if [ ! -f "$launcher" ] || ! /usr/bin/python3 -c 'import torch.distributed.run' 2>/dev/null; then
  echo "SKIP: needs python3-torch (apt-get install python3-torch) and $launcher"; exit 77
fi
# a free port, not torchrun's default 29500, which another job may hold
port=$(/usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
out=$(timeout 300 /usr/bin/python3 "$launcher" --no_python --nproc_per_node=2 --master_addr=127.0.0.1 --master_port="$port" \
      "$exe" --epochs 1 --limit 6000 2>&1)
rc=$?
echo "$out" | tail -5
[ $rc -eq 0 ] || { echo "torchrun exited $rc"; exit 1; }
echo "$out" | grep -q "fashion_mlp: world 2" || { echo "expected a world of 2"; exit 1; }
echo "$out" | grep -q "^result: epochs=1 test_acc=" || { echo "no result line"; exit 1; }
