#!/usr/bin/env bash
# Jobs that must not mix, as a user starts them: two jobs on one port (with
# and without ddprun), and a rank built from another library version.
#   jobs.sh DDPRUN JOB_WORKER JOB_WORKER_OLD [EMULATOR...]
# EMULATOR (cross-built Windows programs: cmake/wine-run.sh --dir D) runs
# ddprun.exe and the workers started by hand; ddprun.exe starts its ranks
# itself. About 10 s (30 s under Wine).
set -u
DDPRUN=$1 W=$2 OLD=$3
shift 3
EMU=("$@")
T=$(mktemp -d "${TMPDIR:-/tmp}/jobs.XXXXXX") || exit 2
trap 'rm -rf "$T"' EXIT
failures=0 checks=0
ok() { checks=$((checks + 1)); echo "ok   $*"; }
fail() { checks=$((checks + 1)); failures=$((failures + 1)); echo "FAIL $*"; }
check() { local what=$1; shift; if "$@"; then ok "$what"; else fail "$what"; for f in "$T"/*.out; do echo "  --- $f:"; sed 's/^/  | /' "$f" | head -8; done; fi; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo $((20000 + RANDOM % 20000)); }
now_ms() { date +%s%3N; }
# rank R of a world of N on port P, by hand (no launcher): RANK=... program
by_hand() { local r=$1 n=$2 p=$3; shift 3; env RANK=$r WORLD_SIZE=$n MASTER_ADDR=127.0.0.1 MASTER_PORT=$p DDP_TIMEOUT=6 "${EMU[@]}" "$@"; }
unset DDP_JOB_SECRET DDP_JOB_ID

# ---- the issue's case: a job's rank 0 waits for its rank 1; a second job,
# started with ddprun on the same port, comes in. Both fail, at once,
# saying why; nobody joins the other job.
P=$(port)
start=$(now_ms)
by_hand 0 2 "$P" "$W" >"$T/a0.out" 2>&1 &
a0=$!
sleep 0.3
DDP_TIMEOUT=6 timeout 30 "${EMU[@]}" "$DDPRUN" -n 2 --master-port "$P" "$W" >"$T/b.out" 2>&1
brc=$?
wait $a0
arc=$?
took=$(($(now_ms) - start))
check "manual job vs ddprun job: the waiting rank 0 fails (exit $arc), saying another job uses the port" \
    eval '[ "$arc" = 3 ] && grep -q "port $P is used by another job" "$T/a0.out"'
check "... at once, not at its timeout (${took} ms)" [ "$took" -lt 5000 ]
check "... and the ddprun job fails too (exit $brc), its rank 1 saying why" \
    eval '[ "$brc" != 0 ] && grep -q "\[1\] ERROR: DDP_ERROR_MISMATCH: .*port $P is used by another job: rank 1 has a job secret and rank 0 has none" "$T/b.out"'
check "... nobody joined the other job" eval '! grep -q "^OK\|\] OK" "$T/a0.out" "$T/b.out"'

# ---- without any launcher: two jobs with their own DDP_JOB_ID.
P=$(port)
start=$(now_ms)
DDP_JOB_ID=job-A by_hand 0 2 "$P" "$W" >"$T/a0.out" 2>&1 &
a0=$!
sleep 0.3
DDP_JOB_ID=job-B by_hand 1 2 "$P" "$W" >"$T/b1.out" 2>&1
brc=$?
wait $a0
arc=$?
took=$(($(now_ms) - start))
check "two jobs by hand (DDP_JOB_ID job-A, job-B): both fail ($arc, $brc) within ${took} ms" \
    eval '[ "$arc" = 3 ] && [ "$brc" = 3 ] && [ "$took" -lt 5000 ]'
check "... both name both jobs" \
    eval 'grep -q "port $P is used by another job: rank 0 belongs to job .job-A., rank 1 to job .job-B." "$T/a0.out" && grep -q "port $P is used by another job: rank 1 belongs to job .job-B., rank 0 to job .job-A." "$T/b1.out"'

# ---- two ddprun jobs on one port: the first (its rank 1 late) keeps its
# port and finishes; the second cannot get in (another secret) and fails.
P=$(port)
JOB_WORKER_DELAY=1.5 DDP_TIMEOUT=6 timeout 30 "${EMU[@]}" "$DDPRUN" -n 2 --master-port "$P" "$W" >"$T/a.out" 2>&1 &
a=$!
sleep 0.4
DDP_TIMEOUT=6 timeout 30 "${EMU[@]}" "$DDPRUN" -n 2 --master-port "$P" "$W" >"$T/b.out" 2>&1
brc=$?
wait $a
arc=$?
check "two ddprun jobs on one port: the first finishes (exit $arc)" \
    eval '[ "$arc" = 0 ] && [ "$(grep -c "\] OK rank" "$T/a.out")" = 2 ]'
check "... the second fails (exit $brc): its rank 0 finds the port taken, its rank 1 that the secrets differ" \
    eval '[ "$brc" != 0 ] && grep -q "\[0\] ERROR: DDP_ERROR_NETWORK: .*in use (another job or program uses this port)" "$T/b.out" && grep -q "\[1\] ERROR: DDP_ERROR_SECURITY: .*the secrets differ" "$T/b.out"'
check "... the first job's rank 0 logged the stranger it turned away" grep -q "\[0\] log warn \[0\] store: rejected client .* claiming rank 1: it did not prove the job secret" "$T/a.out"

# ---- a rank built from an older ddp.h (a stale binary on one host)
for old_rank in 1 0; do
    P=$(port)
    start=$(now_ms)
    for r in 0 1; do
        prog=$W; [ "$r" = "$old_rank" ] && prog=$OLD
        DDP_JOB_ID=v by_hand $r 2 "$P" "$prog" >"$T/v$r.out" 2>&1 &
        eval "v$r=\$!"
    done
    wait $v0; rc0=$?
    wait $v1; rc1=$?
    took=$(($(now_ms) - start))
    new=$(sed -n 's/.*rank [01] runs ddp.h \([0-9.]*\) but.*/\1/p' "$T/v$((1 - old_rank)).out" | head -1)
    check "an old rank $old_rank: both ranks fail ($rc0, $rc1) within ${took} ms" eval '[ "$rc0" = 3 ] && [ "$rc1" = 3 ] && [ "$took" -lt 5000 ]'
    check "... each names both ranks and both versions" \
        eval 'grep -q "rank $old_rank runs ddp.h [0-9]*\.[0-9]* but rank $((1 - old_rank)) runs ddp.h $new: every rank must be built from the same library version" "$T/v$old_rank.out" &&
              grep -q "rank $((1 - old_rank)) runs ddp.h $new but rank $old_rank runs ddp.h [0-9]*\.[0-9]*" "$T/v$((1 - old_rank)).out" &&
              ! grep -q "runs ddp.h $new but rank $old_rank runs ddp.h $new" "$T/v$((1 - old_rank)).out"'
done

echo "$((checks - failures))/$checks checks passed"
[ "$failures" = 0 ]
