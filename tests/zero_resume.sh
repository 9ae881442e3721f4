#!/usr/bin/env bash
# ZeRO-1 checkpoints hold the full state: saved at world 3 (sharded and
# unsharded runs, files equal), resumed at worlds 2 and 4 (sharded and
# unsharded, crossed over, the same bits).
#   zero_resume.sh DDPRUN TEST_ZERO [EMULATOR...]
# (EMULATOR: how the Wine build runs a Windows program, ddprun.exe here)
set -euo pipefail
run=$1 bin=$2
shift 2
dir=$(mktemp -d /tmp/ddp_zero_resume.XXXXXX)
trap 'rm -rf "$dir"' EXIT
"$@" "$run" -n 3 -- "$bin" save "$dir"
"$@" "$run" -n 2 -- "$bin" resume "$dir"
"$@" "$run" -n 4 -- "$bin" resume "$dir"
