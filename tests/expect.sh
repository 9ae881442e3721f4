#!/usr/bin/env bash
# expect.sh REGEX COMMAND [ARGS...] - run COMMAND; pass when it exits 0 AND its
# output (stdout and stderr) has a line matching the extended regex REGEX.
# (ctest's PASS_REGULAR_EXPRESSION alone ignores the exit code.)
set -u
re=$1; shift
out=$("$@" 2>&1)
rc=$?
printf '%s\n' "$out"
[ $rc -eq 0 ] || { echo "expect.sh: '$*' exited $rc"; exit 1; }
printf '%s\n' "$out" | grep -Eq -- "$re" || { echo "expect.sh: no line of the output matches '$re'"; exit 1; }
