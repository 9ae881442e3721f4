#!/bin/sh
# wine-run.sh --dir DIR program.exe [args...]   run a cross-built program under Wine
# wine-run.sh --dir DIR --stop                  stop that Wine (its wineserver) and clean up
#
# The CMAKE_CROSSCOMPILING_EMULATOR of cmake/mingw-w64.cmake. DIR holds a
# Wine prefix of its own (DIR/prefix, made on first use, a few seconds);
# Wine's temporary files go to a directory of this prefix's own in /dev/shm
# (Wine backs named file mappings, the library's shared memory, with a file
# there, and the wineserver's socket lives there: one TMPDIR per prefix); one
# persistent wineserver serves every program (without it each program pays
# for a server start). It stops by itself 120 s after the last program, or
# with --stop.
set -e
if [ "$1" != --dir ] || [ -z "$2" ] || [ -z "$3" ]; then
    echo "usage: $0 --dir DIR program [args...] | --dir DIR --stop" >&2
    exit 2
fi
dir=$2
shift 2
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
WINEPREFIX=$dir/prefix
WINEDEBUG=-all
TMPDIR=/dev/shm/wine-ddp-$(id -u)-$(printf '%s' "$dir" | cksum | cut -d' ' -f1)
export WINEPREFIX WINEDEBUG TMPDIR
if [ "$1" = --stop ]; then
    [ -d "$WINEPREFIX" ] && [ -d "$TMPDIR" ] && wineserver -k 2>/dev/null || true
    rm -rf "$TMPDIR"
    exit 0
fi
mkdir -p "$TMPDIR" "$WINEPREFIX"
# Start-up, one caller at a time (ctest -j): the persistent server first; on
# a new server Wine starts its own background programs (services.exe,
# explorer.exe, ...) with the first program, which must not be one whose
# output ctest waits on: wineboot, with its output going nowhere.
# (What is started here must not inherit the lock's descriptor: the server
# would hold the lock for as long as it runs.)
exec 9>"$dir/.lock"
flock 9
if wineserver -p120 </dev/null >/dev/null 2>&1 9>&- || [ ! -f "$WINEPREFIX/.ddp-ready" ]; then
    if [ -f "$WINEPREFIX/.ddp-ready" ]; then
        wineboot </dev/null >/dev/null 2>&1 9>&- || true
    else
        wineboot -i </dev/null >/dev/null 2>&1 9>&- || true # a new prefix: a few seconds
        touch "$WINEPREFIX/.ddp-ready"
    fi
fi
exec 9>&-
exec wine "$@"
