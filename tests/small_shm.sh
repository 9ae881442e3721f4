#!/usr/bin/env bash
# A container's small /dev/shm (Docker's default is 64 MiB), in a private
# mount namespace: the example trains at world 4, with anonymous shared
# memory (the default on Linux) and with named segments in /dev/shm (the
# fallback), whose staging area shrinks to fit, with a log line; gradients
# that cannot fit fail with the bytes needed and the remedy. Nothing is
# left in /dev/shm. Needs root (unshare -m, mount): exits 77 (skipped)
# where that is not permitted.
#   small_shm.sh DDPRUN FASHION_MLP FASHION_MLP_NAMED JOB_WORKER_NAMED
set -u
DDPRUN=$1 EX=$2 EXN=$3 JWN=$4
if ! unshare -m sh -c 'mount -t tmpfs -o size=1m tmpfs /dev/shm' 2>/dev/null; then
    echo "SKIP: needs root to make a private mount namespace (unshare -m) with a small tmpfs on /dev/shm"
    exit 77
fi
T=$(mktemp -d "${TMPDIR:-/tmp}/small_shm.XXXXXX") || exit 2
trap 'rm -rf "$T"' EXIT
failures=0 checks=0
ok() { checks=$((checks + 1)); echo "ok   $*"; }
fail() { checks=$((checks + 1)); failures=$((failures + 1)); echo "FAIL $*"; sed 's/^/  | /' "$T/out" | tail -12; }
check() { local what=$1; shift; if "$@"; then ok "$what"; else fail "$what"; fi; }
# in_shm SIZE CMD...: run CMD with a private SIZE tmpfs on /dev/shm; then
# list what is left there into $T/left
in_shm() {
    local size=$1; shift
    unshare -m sh -c 'mount -t tmpfs -o size="$0" tmpfs /dev/shm || exit 99; "$@"; rc=$?; ls -A /dev/shm > "'"$T"'/left"; exit $rc' "$size" "$@" >"$T/out" 2>&1
}

in_shm 64m "$DDPRUN" -n 4 "$EX" --epochs 1 --limit 2000
rc=$?
check "64 MiB /dev/shm, world 4, the example (anonymous shared memory) trains (exit $rc)" \
    eval '[ "$rc" = 0 ] && grep -q "^\[0\] result: epochs=1 test_acc=0\.[5-9]" "$T/out"'
check "... nothing left in /dev/shm" [ ! -s "$T/left" ]

in_shm 64m "$DDPRUN" -n 4 "$EXN" --epochs 1 --limit 2000
rc=$?
check "64 MiB /dev/shm, world 4, the example with named segments trains (exit $rc)" \
    eval '[ "$rc" = 0 ] && grep -q "^\[0\] result: epochs=1 test_acc=0\.[5-9]" "$T/out"'
check "... nothing left in /dev/shm" [ ! -s "$T/left" ]

in_shm 8m "$DDPRUN" -n 4 "$JWN" 1000
rc=$?
check "8 MiB /dev/shm, world 4, named segments: the staging area shrinks, the job runs (exit $rc)" \
    eval '[ "$rc" = 0 ] && [ "$(grep -c "\] OK rank" "$T/out")" = 4 ] && grep -q "/dev/shm has [0-9]* bytes free; the staging area .* is reduced from 16777216 to [0-9]* bytes per rank" "$T/out"'
check "... nothing left in /dev/shm" [ ! -s "$T/left" ]

in_shm 4m "$DDPRUN" -n 4 "$JWN" 2000000
rc=$?
check "4 MiB /dev/shm, gradients of 4 x 8 MB: a clear error with the bytes needed and the remedy (exit $rc)" \
    eval '[ "$rc" != 0 ] && grep -q "\[0\] ERROR: DDP_ERROR_OUT_OF_MEMORY: the gradients need [0-9]* bytes of shared memory (4 ranks x [0-9]* bytes) but /dev/shm has [0-9]* bytes free: give it more (docker run --shm-size=" "$T/out"'
check "... nothing left in /dev/shm" [ ! -s "$T/left" ]

echo "$((checks - failures))/$checks checks passed"
[ "$failures" = 0 ]
