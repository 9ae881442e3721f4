#!/usr/bin/env bash
# The shared-memory all-reduce of the Linux build and of the Windows build
# (mingw-w64, run under Wine) on the same machine, in the same run:
#
#   bench/wine_vs_linux.sh LINUX_BUILD WINE_BUILD [ROUNDS]
#
# e.g. after `cmake -B build && cmake --build build -j2` and
# `cmake -B build-wine --toolchain cmake/mingw-w64.cmake && cmake --build build-wine -j2`:
#   bench/wine_vs_linux.sh build build-wine
#
# ROUNDS (default 9) times, alternating, each build runs on 2 ranks
#   ddprun -n 2 bench/allreduce --inplace --min 4K --max 64M --reps 9
# (Windows: cmake/wine-run.sh --dir WINE_BUILD/wine WINE_BUILD/ddprun.exe ...
# WINE_BUILD/bench/allreduce.exe, the same options): the all-reduce of
# sub-ranges of the library's own gradient storage, reduced in place. One
# row per run:
#   run R linux|wine memcpy_GBps M busbw_64MiB_GBps B time_4KiB_us T
# then the medians of each build and
#   ratio wine/linux 64MiB busbw X (target >= 0.8)
# The memory is the same; only the OS layer differs (Win32 file mappings,
# Wine's wineserver, waits that sleep on a Windows timer).
set -euo pipefail
linux=${1:?usage: $0 LINUX_BUILD WINE_BUILD [ROUNDS]}
wine=${2:?usage: $0 LINUX_BUILD WINE_BUILD [ROUNDS]}
rounds=${3:-9}
here=$(cd "$(dirname "$0")/.." && pwd)
opts=(--inplace --min 4K --max 64M --reps 9)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# "memcpy busbw time4k" from one run's output (a Windows program ends its lines with \r\n)
parse() {
    tr -d '\r' < "$1" | awk '$2 == "baseline" { m = $4 }
         $2 == 4096 { t = $5 }
         $2 == 67108864 { b = $7 }
         END { if (m == "" || b == "" || t == "") exit 1; print m, b, t }'
}

for r in $(seq 1 "$rounds"); do
    "$linux/ddprun" -n 2 "$linux/bench/allreduce" "${opts[@]}" > "$tmp/linux.$r"
    "$here/cmake/wine-run.sh" --dir "$wine/wine" "$wine/ddprun.exe" -n 2 "$wine/bench/allreduce.exe" "${opts[@]}" > "$tmp/wine.$r"
    for os in linux wine; do
        read -r m b t < <(parse "$tmp/$os.$r") || { echo "no result from the $os run $r:"; cat "$tmp/$os.$r"; exit 1; }
        printf 'run %d %-5s memcpy_GBps %6.2f busbw_64MiB_GBps %6.2f time_4KiB_us %7.2f\n' "$r" "$os" "$m" "$b" "$t"
        echo "$m $b $t" >> "$tmp/$os.all"
    done
done
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
for os in linux wine; do
    m=$(cut -d' ' -f1 "$tmp/$os.all" | median)
    b=$(cut -d' ' -f2 "$tmp/$os.all" | median)
    t=$(cut -d' ' -f3 "$tmp/$os.all" | median)
    printf 'median %-5s memcpy_GBps %6.2f busbw_64MiB_GBps %6.2f time_4KiB_us %7.2f\n' "$os" "$m" "$b" "$t"
    echo "$b" > "$tmp/$os.b"
done
awk -v l="$(cat "$tmp/linux.b")" -v w="$(cat "$tmp/wine.b")" \
    'BEGIN { printf "ratio wine/linux 64MiB busbw %.3f (target >= 0.8)\n", w / l }'
