#!/usr/bin/env bash
# Behaviour tests for tools/ddprun.c, the local launcher.
#   usage: tests/test_ddprun.sh path/to/ddprun
# Runs real sh children; exits non-zero if any check fails. About 2 s.
# shellcheck disable=SC2016  # the ranks expand $RANK etc., not this script

set -u

DDPRUN=${1:?usage: $0 path/to/ddprun}
case $DDPRUN in /*) ;; *) DDPRUN=$PWD/$DDPRUN ;; esac
[ -x "$DDPRUN" ] || { echo "not executable: $DDPRUN" >&2; exit 2; }

T=$(mktemp -d "${TMPDIR:-/tmp}/test_ddprun.XXXXXX") || exit 2
trap 'rm -rf "$T"' EXIT

failures=0
checks=0
ok() { checks=$((checks + 1)); echo "ok   $*"; }
fail() { checks=$((checks + 1)); failures=$((failures + 1)); echo "FAIL $*"; }
# check DESCRIPTION COMMAND...: passes when COMMAND succeeds
check() { local what=$1; shift; if "$@"; then ok "$what"; else fail "$what"; fi; }
# A guard so a hung launcher fails the test instead of hanging ctest.
if command -v timeout >/dev/null; then
    dr() { timeout -k 5 20 "$DDPRUN" "$@"; }
else
    dr() { "$DDPRUN" "$@"; }
fi
now_ms() { date +%s%3N; }
show() { echo "  --- $1:"; sed 's/^/  | /' "$2" | head -20; }

# Waits (up to 5 s) until the files given exist.
wait_files() {
    local _
    for _ in $(seq 100); do
        local f all=1
        for f in "$@"; do [ -e "$f" ] || all=0; done
        [ "$all" = 1 ] && return 0
        sleep 0.05
    done
    return 1
}

# True if none of the pids in the files is running. A zombie counts as gone:
# a grandchild orphaned to a pid 1 that does not reap (some containers)
# stays a zombie, though it is dead.
all_gone() {
    local f p state
    for f in "$@"; do
        p=$(cat "$f")
        kill -0 "$p" 2>/dev/null || continue
        state=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | cut -c1)
        [ "$state" = Z ] || return 1
    done
    return 0
}

# ---------------------------------------------------------------- environment
dr -n 3 -- sh -c 'echo "$RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $GROUP_RANK $MASTER_ADDR $MASTER_PORT $DDP_LAUNCHER"' \
    >"$T/out" 2>"$T/err"
rc=$?
check "3 ranks, all exit 0 -> exit 0" [ "$rc" = 0 ]
check "exactly three lines" [ "$(wc -l <"$T/out")" = 3 ]
for r in 0 1 2; do
    check "rank $r: prefix and env" \
        grep -Eq "^\[$r\] $r 3 $r 3 0 127\.0\.0\.1 [0-9]+ ddprun\$" "$T/out"
done
ports=$(awk '{print $8}' "$T/out" | sort -u)
check "one default MASTER_PORT, shared by all ranks, in 1..65535" \
    [ "$(echo "$ports" | wc -l)" = 1 -a "$ports" -ge 1 -a "$ports" -le 65535 ]
check "nothing on stderr" [ ! -s "$T/err" ]
[ "$failures" = 0 ] || show stdout "$T/out"

RANK=7 WORLD_SIZE=9 MASTER_ADDR=wrong DDP_LAUNCHER=torchrun TORCHELASTIC_USE_AGENT_STORE=True \
    dr -n 2 --master-addr 10.1.2.3 --master-port 29555 sh -c \
    'echo "$RANK $WORLD_SIZE $MASTER_ADDR $MASTER_PORT $DDP_LAUNCHER ${TORCHELASTIC_USE_AGENT_STORE-unset}"' \
    >"$T/out" 2>&1
check "inherited values overwritten, options applied, agent store var removed" \
    [ "$(sort "$T/out" | tr '\n' '|')" = "[0] 0 2 10.1.2.3 29555 ddprun unset|[1] 1 2 10.1.2.3 29555 ddprun unset|" ]

check "program found through PATH, options after it belong to it" \
    [ "$(dr -n 1 echo -x --grace 3 -- -n 2)" = "[0] -x --grace 3 -- -n 2" ]

# ---------------------------------------------------------------- output
dr -n 2 sh -c 'echo out$RANK; echo err$RANK >&2; printf "tail$RANK"; printf "etail$RANK" >&2' \
    >"$T/out" 2>"$T/err"
check "stdout lines on stdout, prefixed" \
    [ "$(grep -c '^\[[01]\] out[01]$' "$T/out")" = 2 ]
check "stderr lines on stderr, prefixed" \
    [ "$(grep -c '^\[[01]\] err[01]$' "$T/err")" = 2 ]
check "no stderr line on stdout and vice versa" \
    eval '! grep -q err "$T/out" && ! grep -q "out[01]" "$T/err"'
check "final partial line printed with a newline (stdout)" \
    grep -qx '\[1\] tail1' "$T/out"
check "final partial line printed with a newline (stderr)" \
    grep -qx '\[0\] etail0' "$T/err"

# Four ranks write 2000 lines of 300+ bytes each at once; yes(1) writes large
# blocks, so lines arrive cut across reads. Every line must come out whole,
# under its own rank's prefix.
dr -n 4 sh -c 'yes "r$RANK-$(printf "%0300d" 0)" | head -n 2000' >"$T/out"
check "8000 lines from 4 ranks, none mixed or cut" \
    [ "$(grep -Ec '^\[([0-3])\] r\1-0{300}$' "$T/out")" = 8000 -a "$(wc -l <"$T/out")" = 8000 ]

# A 2.5 MiB line without newline is cut into 1 MiB lines.
dr -n 1 sh -c 'head -c 2621440 /dev/zero | tr "\0" a' >"$T/out"
check "over-long line cut into 1 MiB pieces" \
    [ "$(awk '{print length($0)}' "$T/out" | tr '\n' ' ')" = "1048580 1048580 524292 " ]

dr -n 2 --no-prefix sh -c 'echo plain$RANK; echo perr$RANK >&2' >"$T/out" 2>"$T/err"
check "--no-prefix passes stdout through" [ "$(sort "$T/out" | tr '\n' ' ')" = "plain0 plain1 " ]
check "--no-prefix passes stderr through" [ "$(sort "$T/err" | tr '\n' ' ')" = "perr0 perr1 " ]

if [ -d /proc/self/fd ]; then
    # fd 7 and 9 are open in ddprun's caller; the ranks must not see them.
    dr -n 2 sh -c 'ls /proc/$$/fd; true' 7</dev/null 9>"$T/junk" >"$T/out"
    check "ranks get only fds 0 1 2" \
        [ "$(sort -u "$T/out" | tr '\n' ' ')" = "[0] 0 [0] 1 [0] 2 [1] 0 [1] 1 [1] 2 " ]
    dr -n 2 --no-prefix sh -c 'ls /proc/$$/fd; true' 7</dev/null >"$T/out"
    check "ranks get only fds 0 1 2 (--no-prefix)" \
        [ "$(sort -u "$T/out" | tr '\n' ' ')" = "0 1 2 " ]
fi

# ---------------------------------------------------------------- failures
rm -f "$T"/pid.*
start=$(now_ms)
dr -n 3 sh -c '
    echo $$ > "$0/pid.$RANK"
    if [ "$RANK" = 1 ]; then
        i=0; while [ ! -e "$0/pid.0" -o ! -e "$0/pid.2" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
        echo "rank 1 fails"; exit 3
    fi
    exec sleep 30' "$T" >"$T/out" 2>"$T/err"
rc=$?
elapsed=$(($(now_ms) - start))
check "rank 1 exits 3 -> ddprun exits 3 (got $rc)" [ "$rc" = 3 ]
check "... within 10 s (took ${elapsed} ms)" [ "$elapsed" -lt 10000 ]
check "... and names the rank on stderr" \
    grep -Eq '^ddprun: rank 1 \(pid [0-9]+\) exited with code 3; stopping the others$' "$T/err"
check "... after printing its output" grep -qx '\[1\] rank 1 fails' "$T/out"
check "... the sleeping ranks are gone" all_gone "$T/pid.0" "$T/pid.2"

dr -n 2 sh -c 'if [ "$RANK" = 0 ]; then kill -9 $$; fi; exec sleep 30' >"$T/out" 2>"$T/err"
rc=$?
check "rank killed by SIGKILL -> exit 137 (got $rc)" [ "$rc" = 137 ]
check "... reported as a signal death" grep -q 'rank 0 (pid [0-9]*) killed by signal 9 (Killed)' "$T/err"

# What a rank started itself goes too: each rank leads its own process
# group, and the group is what gets SIGTERM.
rm -f "$T"/pid.*
dr -n 2 sh -c '
    if [ "$RANK" = 1 ]; then
        while [ ! -e "$0/pid.0" ]; do sleep 0.05; done
        exit 5
    fi
    sleep 30 &
    echo $! > "$0/pid.0"
    wait' "$T" >"$T/out" 2>"$T/err"
rc=$?
check "grandchild of a rank is stopped with it (exit $rc)" eval '[ "$rc" = 5 ] && all_gone "$T/pid.0"'
if [ -r /proc/self/stat ]; then
    dr -n 2 sh -c 'echo "$$ $(cut -d" " -f5 /proc/$$/stat)"' >"$T/out"
    check "each rank leads its own process group" \
        [ "$(awk '$2 == $3' "$T/out" | wc -l)" = 2 ]
fi

# Rank 1 ignores SIGTERM; after --grace it must get SIGKILL.
rm -f "$T"/pid.*
start=$(now_ms)
dr -n 2 --grace 0.5 sh -c '
    trap "" TERM
    echo $$ > "$0/pid.$RANK"
    if [ "$RANK" = 0 ]; then sleep 0.3; exit 4; fi
    while :; do sleep 0.1; done' "$T" >"$T/out" 2>"$T/err"
rc=$?
elapsed=$(($(now_ms) - start))
check "rank ignoring SIGTERM: exit code of the first failure (got $rc)" [ "$rc" = 4 ]
check "... SIGKILL after the grace period (took ${elapsed} ms)" \
    [ "$elapsed" -ge 700 -a "$elapsed" -lt 5000 ]
check "... and says so" grep -q 'rank 1 (pid [0-9]*) still running .*SIGKILL' "$T/err"
check "... the stubborn rank is gone" all_gone "$T/pid.1"

# The rank that failed first is named, even when a survivor's error exit
# (it saw the first one die: a killed process with many threads and much
# memory is reported by the kernel well after its sockets closed) reaches
# ddprun first. Here rank 1 exits 1, and rank 0 is killed 50 ms later.
bad=0
for i in 1 2 3; do
    rm -f "$T"/pid.* "$T"/gone
    dr -n 2 sh -c '
        if [ "$RANK" = 1 ]; then : > "$0/gone"; exit 1; fi
        while [ ! -e "$0/gone" ]; do :; done
        sleep 0.05; kill -9 $$' "$T" >"$T/out" 2>"$T/err"
    rc=$?
    if [ "$rc" != 137 ] || ! grep -q 'rank 0 (pid [0-9]*) killed by signal 9' "$T/err" || grep -q 'rank 1 (pid [0-9]*) exited' "$T/err"; then
        bad=$((bad + 1)); show stderr "$T/err"
    fi
done
check "a signal death is reported, not a survivor's exit reaped before it (3 runs, $bad wrong)" [ "$bad" = 0 ]

# A rank that exits 0 but leaves a child behind: its group is ended.
rm -f "$T"/pid.*
dr -n 2 --grace 1 sh -c '
    if [ "$RANK" = 0 ]; then sleep 30 & echo $! > "$0/pid.child"; fi
    exit 0' "$T" >"$T/out" 2>"$T/err"
rc=$?
check "a rank's leftover child is ended with its group (exit $rc)" eval '[ "$rc" = 0 ] && all_gone "$T/pid.child"'

# Names a rank left in /dev/shm (ddp.h's named segments: ddp-<pid>-...)
# are removed once ddprun has reaped it.
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
    dr -n 2 sh -c 'echo x > /dev/shm/ddp-$$-test-ctrl; echo $$ > "$0/shm.$RANK"; [ "$RANK" = 1 ] && kill -9 $$; exit 0' "$T" >"$T/out" 2>"$T/err"
    check "a dead rank's /dev/shm names are removed" eval '[ ! -e /dev/shm/ddp-$(cat "$T/shm.0")-test-ctrl ] && [ ! -e /dev/shm/ddp-$(cat "$T/shm.1")-test-ctrl ]'
fi

# The job secret and name: new for each run, the same for every rank.
dr -n 2 sh -c 'echo "$DDP_JOB_SECRET $DDP_JOB_ID"' >"$T/out"
dr -n 1 sh -c 'echo "$DDP_JOB_SECRET $DDP_JOB_ID"' >"$T/out2"
check "DDP_JOB_SECRET: 64 hex digits, one per job" \
    eval '[ "$(sed "s/^\[[01]\] //" "$T/out" | sort -u | wc -l)" = 1 ] && grep -Eq "^\[0\] [0-9a-f]{64} ddprun-" "$T/out" && [ "$(cut -d" " -f2 "$T/out" | head -1)" != "$(cut -d" " -f2 "$T/out2")" ]'
check "DDP_JOB_ID: ddprun-<host>-<pid>-<random>, another per run" \
    eval '[ "$(cut -d" " -f3 "$T/out" | head -1)" != "$(cut -d" " -f3 "$T/out2")" ]'

# ddprun killed with SIGKILL: the ranks and what they started end anyway
# (the ranks by PR_SET_PDEATHSIG, their children by ddprun's watchdog).
if [ "$(uname)" = Linux ]; then
    rm -f "$T"/pid.* "$T"/kid.*
    "$DDPRUN" -n 2 --grace 1 sh -c '
        sleep 60 & echo $! > "$0/kid.$RANK"
        echo $$ > "$0/pid.$RANK"
        trap "" TERM
        wait' "$T" >"$T/out" 2>"$T/err" &
    pid=$!
    wait_files "$T/pid.0" "$T/pid.1" "$T/kid.0" "$T/kid.1"
    kill -9 "$pid"
    wait "$pid" 2>/dev/null
    sleep 2
    check "ddprun SIGKILLed: ranks (ignoring SIGTERM) and their children are gone within --grace" \
        all_gone "$T/pid.0" "$T/pid.1" "$T/kid.0" "$T/kid.1"
fi

dr -n 2 /nonexistent/program >"$T/out" 2>"$T/err"
rc=$?
check "nonexistent program -> exit 127 (got $rc)" [ "$rc" = 127 ]
check "... with the exec error" grep -q "ddprun: cannot run '/nonexistent/program': No such file" "$T/err"

# ---------------------------------------------------------------- signals
# Each rank traps TERM, writes a marker and exits 0: ddprun reports the
# signal it got (128 + 15).
rm -f "$T"/pid.* "$T"/term.*
"$DDPRUN" -n 3 sh -c '
    trap "echo term >> \"$0/term.$RANK\"; exit 0" TERM
    echo $$ > "$0/pid.$RANK"
    sleep 30 & wait $!' "$T" >"$T/out" 2>"$T/err" &
pid=$!
wait_files "$T/pid.0" "$T/pid.1" "$T/pid.2"
kill -TERM "$pid"
wait "$pid"
rc=$?
check "SIGTERM to ddprun -> exit 143 (got $rc)" [ "$rc" = 143 ]
check "... reached every rank once" \
    [ "$(cat "$T"/term.* 2>/dev/null | wc -l)" = 3 -a -e "$T/term.0" -a -e "$T/term.1" -a -e "$T/term.2" ]
check "... and is announced" grep -q '^ddprun: got SIGTERM; forwarding it to the ranks$' "$T/err"
check "... the ranks are gone" all_gone "$T"/pid.*

# Ctrl-C: the terminal signals the whole foreground process group. With job
# control on, ddprun gets a group of its own here, and killing that group is
# what the terminal does. Each rank must see SIGINT exactly once.
rm -f "$T"/pid.* "$T"/int.*
set -m
"$DDPRUN" -n 2 sh -c '
    n=0
    trap "echo int >> \"$0/int.$RANK\"; n=\$((n + 1))" INT
    echo $$ > "$0/pid.$RANK"
    while [ $n = 0 ]; do sleep 0.05; done
    sleep 0.3 # a second SIGINT would be trapped here
    exit 0' "$T" >"$T/out" 2>"$T/err" &
pid=$!
set +m
wait_files "$T/pid.0" "$T/pid.1"
kill -INT -- "-$pid"
wait "$pid"
rc=$?
check "Ctrl-C on ddprun's group -> exit 130 (got $rc)" [ "$rc" = 130 ]
check "... each rank got SIGINT exactly once" \
    [ "$(cat "$T/int.0" "$T/int.1" 2>/dev/null | tr '\n' ' ')" = "int int " ]

# ---------------------------------------------------------------- usage
usage_case() {
    local what=$1 pattern=$2 rc
    shift 2
    "$DDPRUN" "$@" >"$T/out" 2>"$T/err"
    rc=$?
    if [ "$rc" = 2 ] && grep -q -- "$pattern" "$T/err" && grep -q '^usage: ddprun -n N' "$T/err" &&
        [ ! -s "$T/out" ]; then
        ok "bad usage: $what -> 2"
    else
        fail "bad usage: $what -> 2 (got $rc)"
        show stderr "$T/err"
    fi
}
usage_case "missing -n" "missing -n" true
usage_case "-n 0" "-n: '0' is not a whole number" -n 0 true
usage_case "-n abc" "-n: 'abc' is not a whole number" -n abc true
usage_case "-n 1025" "'1025' is not a whole number from 1 to 1024" -n 1025 true
usage_case "-n 2x" "'2x' is not" -n 2x true
usage_case "-n without value" "option -n needs a value" -n
usage_case "no program" "no program given" -n 2
usage_case "no program after --" "no program given" -n 2 --
usage_case "unknown option" "unknown option '--bogus'" -n 2 --bogus true
usage_case "bad port" "--master-port: '70000'" -n 2 --master-port 70000 true
usage_case "bad grace" "--grace: '-1'" -n 2 --grace -1 true

"$DDPRUN" --help >"$T/out" 2>"$T/err"
rc=$?
check "--help -> exit 0 with usage on stdout" \
    eval '[ "$rc" = 0 ] && grep -q "^usage: ddprun -n N" "$T/out" && [ ! -s "$T/err" ]'
check "-nN and --opt=value forms" \
    [ "$(dr -n2 --master-port=1234 --grace=1 sh -c 'echo $MASTER_PORT' | sort | tr '\n' ' ')" = "[0] 1234 [1] 1234 " ]

echo "$((checks - failures))/$checks checks passed"
[ "$failures" = 0 ]
