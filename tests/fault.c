/* fault: kill ranks of real jobs at random instants and check what is left.

       fault WORKER DDPRUN [--trials N] [--seed S] [--timeout T] [--quiet]

   Each trial starts a job of fault_worker (world 2 or 3; through ddprun or
   started here directly, half of those with a job secret), waits until
   every rank runs, then kills one rank at a random instant of the job's
   life (rendezvous, finalize, steps, checkpoint writes, teardown): SIGKILL
   or SIGTERM on POSIX; on Windows, which has no signals for other
   processes, TerminateProcess with exit code 137 or 143 (128 + the signal
   number). The seed fixes every choice. For each trial:

   - no process hangs: every rank (and ddprun) ends within timeout + 2 s of
     the kill (a process still there 5 s later is killed and counted);
   - every survivor either finished its work (a kill after the victim's last
     collective) or failed with a message that names the dead rank, within
     timeout + 2 s; under ddprun, ddprun reports the victim (by its signal;
     on Windows by its exit code);
   - nothing of the trial's processes is left: no entry in /dev/shm (on
     Windows, no named object "ddp-<pid>-..." in the session's namespace);
   - no temporary checkpoint file is left (one named in the microseconds
     between naming and renaming would be removed by the next save, which
     the verification runs, and is counted apart);
   - the checkpoint, if there is one, loads and holds exactly the weights of
     a step count that was saved (fault_worker --verify).

   It prints one line per trial and a summary (trials, hangs, leaks, time
   from the kill to the last survivor's error: median and maximum) and
   exits 1 if any trial broke a rule. docs/RELIABILITY.md has the figures. */
#define DDP_IMPLEMENTATION
#include "../ddp.h"
#include "testing.h"
#include "testproc.h"

#define MAXW 3

static const char *worker, *ddprun;
static double timeout_s = 3.0;
static double span = 0.3; /* a job's life from its ranks' start: measured by calibrate() */
static int quiet;

/* the workers stamp their phases with the same clock */
static double now(void) { return ddp__now(); }

static void sleep_s(double s) {
    if (s > 0) ddp__sleep_us((long)(s * 1e6));
}

static uint64_t rng_state;
static uint64_t rnd(void) { /* splitmix64: the same sequence everywhere */
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static double rnd01(void) { return (double)(rnd() >> 11) / 9007199254740992.0; }

static void path_in(char *out, size_t cap, const char *dir, const char *name) {
#if defined(_WIN32)
    snprintf(out, cap, "%s\\%s", dir, name);
#else
    snprintf(out, cap, "%s/%s", dir, name);
#endif
}


/* The last phase a rank wrote at or before time t ("" if none). */
static void phase_at(const char *dir, int r, double t, char *out, size_t cap) {
    char path[512], line[128];
    FILE *f;
    char name[32];
    snprintf(name, sizeof name, "phase.%d", r);
    path_in(path, sizeof path, dir, name);
    out[0] = 0;
    f = fopen(path, "r");
    if (!f) return;
    while (fgets(line, sizeof line, f)) {
        double ts;
        char what[32];
        if (sscanf(line, "%lf %31s", &ts, what) == 2 && ts <= t) snprintf(out, cap, "%s", what);
    }
    fclose(f);
}

/* What one of these pids left of its shared memory ("ddp-<pid>-..."). */
static int shm_left(const int *pids, int n) {
    int k = t_shm_leftovers(pids, n);
    return k < 0 ? 0 : k;
}

static int tmp_left(const char *dir) {
    int n = t_dir_count(dir, "ckpt.tmp");
    return n < 0 ? 0 : n;
}

static void rm_rf(const char *dir) {
#if defined(_WIN32)
    char pat[600], path[600];
    WIN32_FIND_DATAA fd;
    HANDLE h;
    snprintf(pat, sizeof pat, "%s\\*", dir);
    h = FindFirstFileA(pat, &fd);
    if (h != INVALID_HANDLE_VALUE) {
        do {
            if (!strcmp(fd.cFileName, ".") || !strcmp(fd.cFileName, "..")) continue;
            path_in(path, sizeof path, dir, fd.cFileName);
            DeleteFileA(path);
        } while (FindNextFileA(h, &fd));
        FindClose(h);
    }
    RemoveDirectoryA(dir);
#else
    DIR *d = opendir(dir);
    struct dirent *e;
    char path[600];
    if (!d) return;
    while ((e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        path_in(path, sizeof path, dir, e->d_name);
        unlink(path);
    }
    closedir(d);
    rmdir(dir);
#endif
}

/* A new private directory for a trial. */
static void make_dir(char *dir, size_t cap) {
    static int seq = 0;
    char name[64];
    snprintf(name, sizeof name, "fault.%d", ++seq);
    if (t_make_dir(dir, cap, name) != 0) {
        rm_rf(dir); /* a stale one of an earlier run with the same pid */
        if (t_make_dir(dir, cap, name) != 0) { fprintf(stderr, "fault: cannot make directory %s\n", dir); exit(2); }
    }
}

/* Start a process with stdout/stderr into files, env additions "K=V", in a
   process group of its own (POSIX). */
static int spawn(t_proc *p, const char *const argv[], const char *out, const char *err, const char *const *env) {
    return t_proc_start(p, argv, out, err, env, 1);
}

/* End p and whatever it started (POSIX: its process group; Windows: ddprun's
   job objects end its ranks with it). */
static void kill_tree(t_proc *p) {
#if defined(_WIN32)
    t_proc_kill(p);
#else
    kill(-(pid_t)p->pid, SIGKILL);
#endif
}

/* An exit status as "exited with code c" (POSIX: -s for a death by signal s). */
static int exited_ok(const t_proc *p) { return p->code == 0; }
static int exited_with(const t_proc *p, int c) { return p->code == c; }

typedef struct { int trials, failures, hangs, shm_leaks, tmp_leaks, tmp_swept, errors; double ttf[4096]; int nttf; int phases[6]; } stats;
static const char *phase_names[6] = { "before-create", "create", "finalize", "step", "save", "done" };

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int fail_line(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("  FAIL ", stdout);
    vprintf(fmt, ap);
    va_end(ap);
    fputc('\n', stdout);
    return 1;
}

static const char *sig_name(int sig) {
#if defined(_WIN32)
    return sig == T_SIGKILL ? "TerminateProcess(137)" : "TerminateProcess(143)";
#else
    return sig == T_SIGKILL ? "SIGKILL" : "SIGTERM";
#endif
}

/* One trial; returns the number of broken rules. */
static int trial(int i, stats *st) {
    char dir[512], path[600], ph[32], portstr[16];
    int world = 2 + (int)(rnd() % 2), with_ddprun = (int)(rnd() % 2), secret = (int)(rnd() % 2);
    int victim = (int)(rnd() % (uint64_t)world), sig = rnd() % 2 ? T_SIGKILL : T_SIGTERM;
    double frac = rnd01(), t0, t_kill = 0, deadline, last_exit = 0, took = -1;
    int pids[MAXW];
    t_proc launcher, direct[MAXW];
    int done[MAXW], r, bad = 0, ldone = 0, port = t_free_port(), k;
    char *envs[MAXW][12], bufs[MAXW][12][160];
    memset(pids, 0, sizeof pids);
    memset(done, 0, sizeof done);
    memset(&launcher, 0, sizeof launcher);
    memset(direct, 0, sizeof direct);
    ph[0] = 0;
    if (rnd() % 3 == 0) frac *= 0.15; /* a third of the kills in the rendezvous and finalize */
    make_dir(dir, sizeof dir);
    snprintf(portstr, sizeof portstr, "%d", port);
    for (r = 0; r < world; r++) {
        int e = 0;
        snprintf(bufs[r][e], 160, "RANK=%d", r); envs[r][e] = bufs[r][e]; e++;
        snprintf(bufs[r][e], 160, "WORLD_SIZE=%d", world); envs[r][e] = bufs[r][e]; e++;
        snprintf(bufs[r][e], 160, "LOCAL_RANK=%d", r); envs[r][e] = bufs[r][e]; e++;
        snprintf(bufs[r][e], 160, "LOCAL_WORLD_SIZE=%d", world); envs[r][e] = bufs[r][e]; e++;
        snprintf(bufs[r][e], 160, "MASTER_ADDR=127.0.0.1"); envs[r][e] = bufs[r][e]; e++;
        snprintf(bufs[r][e], 160, "MASTER_PORT=%d", port); envs[r][e] = bufs[r][e]; e++;
        snprintf(bufs[r][e], 160, "DDP_TIMEOUT=%g", timeout_s); envs[r][e] = bufs[r][e]; e++;
        snprintf(bufs[r][e], 160, "DDP_JOB_ID=fault-%d-%d", ddp__getpid(), i); envs[r][e] = bufs[r][e]; e++;
        snprintf(bufs[r][e], 160, "DDP_JOB_SECRET=%s", secret ? "fault-suite-secret-0123456789" : ""); envs[r][e] = bufs[r][e]; e++;
        envs[r][e] = NULL;
    }
    t0 = now();
    if (with_ddprun) {
        char n[8];
        const char *argv[] = { ddprun, "-n", n, "--master-port", portstr, "--grace", "2", "--", worker, dir, NULL };
        const char *env[] = { bufs[0][6], NULL };
        char o[600], e2[600];
        snprintf(n, sizeof n, "%d", world);
        path_in(o, sizeof o, dir, "ddprun.out");
        path_in(e2, sizeof e2, dir, "ddprun.err");
        if (spawn(&launcher, argv, o, e2, env) != 0) { fprintf(stderr, "fault: cannot start %s\n", ddprun); exit(2); }
    } else {
        for (r = 0; r < world; r++) {
            const char *argv[] = { worker, dir, NULL };
            char o[600], e2[600], name[32];
            snprintf(name, sizeof name, "out.%d", r);
            path_in(o, sizeof o, dir, name);
            snprintf(name, sizeof name, "err.%d", r);
            path_in(e2, sizeof e2, dir, name);
            if (spawn(&direct[r], argv, o, e2, (const char *const *)envs[r]) != 0) { fprintf(stderr, "fault: cannot start %s\n", worker); exit(2); }
        }
    }
    /* every rank runs (has written its pid); the kill lands anywhere in the
       job's life and a little after (a kill after the end is no error) */
    for (r = 0; r < world; r++) {
        while (!pids[r] && now() - t0 < 20) {
            char *s, name[32];
            snprintf(name, sizeof name, "pid.%d", r);
            path_in(path, sizeof path, dir, name);
            s = t_slurp(path);
            if (s) { pids[r] = atoi(s); free(s); }
            else sleep_s(0.002);
        }
        if (!pids[r]) { bad += fail_line("trial %d: rank %d never started", i, r); }
    }
    if (!bad) {
        sleep_s(frac * span);
        t_kill = now();
        phase_at(dir, victim, t_kill, ph, sizeof ph);
        t_pid_signal(pids[victim], sig);
    }
    /* everyone ends: reap (promptly: a zombie still "exists" for its peers) */
    deadline = t_kill + timeout_s + 2.0;
    for (;;) {
        int all = 1;
        if (with_ddprun) {
            if (!ldone && t_proc_poll(&launcher)) { ldone = 1; last_exit = now(); }
            all = ldone;
        } else {
            for (r = 0; r < world; r++) {
                if (!done[r] && t_proc_poll(&direct[r])) {
                    done[r] = 1;
                    if (r != victim) last_exit = now();
                }
                all &= done[r];
            }
        }
        if (all) break;
        if (now() > deadline + 5.0) {
            st->hangs++;
            bad += fail_line("trial %d: a process still runs %.1f s after the kill: killed, counted as a hang", i, now() - t_kill);
            if (with_ddprun) { kill_tree(&launcher); for (r = 0; r < world; r++) t_pid_signal(pids[r], T_SIGKILL); }
            else for (r = 0; r < world; r++) t_proc_kill(&direct[r]);
            deadline = 1e300;
        }
        sleep_s(0.001);
    }
    /* ranks under ddprun: gone too (ddprun waits for them) */
    for (r = 0; r < world; r++)
        if (with_ddprun && !t_pid_gone(pids[r])) bad += fail_line("trial %d: rank %d outlived ddprun", i, r);

    for (k = 0; k < 6; k++) if (!strcmp(ph[0] ? ph : "before-create", phase_names[k])) st->phases[k]++;
    if (with_ddprun) {
        char *err;
        path_in(path, sizeof path, dir, "ddprun.err");
        err = t_slurp(path);
        if (exited_ok(&launcher)) {
            if (strcmp(ph, "done") != 0 && strcmp(ph, "save") != 0)
                bad += fail_line("trial %d: ddprun exited 0 although rank %d was killed in phase '%s'", i, victim, ph);
        } else {
            char want[80];
#if defined(_WIN32)
            snprintf(want, sizeof want, "rank %d (pid %d) exited with code %d", victim, pids[victim], 128 + sig);
#else
            snprintf(want, sizeof want, "rank %d (pid %d) killed by signal %d", victim, pids[victim], sig);
#endif
            if (!err || !strstr(err, want))
                bad += fail_line("trial %d: ddprun does not report '%s': %s", i, want, err ? err : "(no stderr)");
            if (last_exit - t_kill > timeout_s + 2.0)
                bad += fail_line("trial %d: ddprun ended %.2f s after the kill", i, last_exit - t_kill);
            else if (st->nttf < 4096) st->ttf[st->nttf++] = last_exit - t_kill;
            took = last_exit - t_kill;
            st->errors++;
        }
        free(err);
    } else {
        int errors = 0;
        for (r = 0; r < world; r++) {
            char *err, want[32], rph[32], name[32];
            if (r == victim) continue;
            snprintf(name, sizeof name, "err.%d", r);
            path_in(path, sizeof path, dir, name);
            err = t_slurp(path);
            snprintf(want, sizeof want, "rank %d", victim);
            phase_at(dir, r, 1e300, rph, sizeof rph);
            if (exited_ok(&direct[r])) {
                if (strcmp(rph, "done") != 0) bad += fail_line("trial %d: rank %d exited 0 without finishing", i, r);
            } else if (!exited_with(&direct[r], 3)) {
                bad += fail_line("trial %d: survivor rank %d ended with status %d", i, r, direct[r].code);
            } else {
                /* the error line itself (log lines come before it) */
                char *line = err ? strstr(err, "ERROR: ") : NULL, *nl = line ? strchr(line, '\n') : NULL;
                if (nl) *nl = 0;
                errors++;
                if (!line || !strstr(line, want))
                    bad += fail_line("trial %d: survivor rank %d's error does not name rank %d: %s", i, r, victim, err ? err : "");
                if (nl) *nl = '\n';
            }
            free(err);
        }
        if (errors) {
            if (last_exit - t_kill > timeout_s + 2.0) bad += fail_line("trial %d: the last survivor failed %.2f s after the kill", i, last_exit - t_kill);
            else if (st->nttf < 4096) st->ttf[st->nttf++] = last_exit - t_kill;
            took = last_exit - t_kill;
            st->errors++;
        }
    }
    /* nothing left behind */
    k = shm_left(pids, world);
    if (k) { st->shm_leaks += k; bad += fail_line("trial %d: %d shared-memory objects of the trial's processes left", i, k); }
    path_in(path, sizeof path, dir, "ckpt");
    {
        FILE *ck = fopen(path, "rb");
        if (ck) {
            const char *argv[] = { worker, "--verify", dir, NULL };
            char vo[600], ve[600];
            int had_tmp = tmp_left(dir), vs = -1;
            fclose(ck);
            path_in(vo, sizeof vo, dir, "verify.out");
            path_in(ve, sizeof ve, dir, "verify.err");
            if (t_run_capture(argv, vo, ve, 60, &vs) != 0) vs = -1;
            if (vs != 0) {
                char *v = t_slurp(ve);
                bad += fail_line("trial %d: the checkpoint is not a complete saved state (%d): %s", i, vs, v ? v : "");
                free(v);
            } else if (had_tmp) {
                st->tmp_swept += had_tmp;
            }
        }
    }
    k = tmp_left(dir);
    if (k) { st->tmp_leaks += k; bad += fail_line("trial %d: %d temporary checkpoint files left", i, k); }
    if (!quiet || bad)
        printf("trial %3d: world %d %-7s %-9s rank %d %s in %-13s -> %s%s\n", i, world, with_ddprun ? "ddprun" : "direct",
               secret ? "secret" : "no-secret", victim, sig_name(sig), ph[0] ? ph : "before-create",
               bad ? "FAILED" : "ok", took >= 0 ? (took > 1.0 ? " (error at the timeout)" : " (error within 1 s)") : " (finished)");
    fflush(stdout);
    if (!bad) rm_rf(dir);
    else printf("  (kept %s)\n", dir);
    st->trials++;
    if (bad) st->failures++;
    return bad;
}

/* How long a job lives here (this machine, this build, this load): a
   world of 3 without a kill, from the ranks' start to the last exit. */
static double calibrate(void) {
    char dir[512], path[600], port[32], n1[32], n2[32];
    t_proc p[3];
    double t0, t1 = 0;
    int r, ok = 1;
    make_dir(dir, sizeof dir);
    snprintf(port, sizeof port, "MASTER_PORT=%d", t_free_port());
    t0 = now();
    for (r = 0; r < 3; r++) {
        const char *argv[] = { worker, dir, NULL };
        char rk[16], lr[16], name[32];
        const char *env[] = { rk, lr, n1, n2, "MASTER_ADDR=127.0.0.1", port, "DDP_JOB_ID=fault-calibration", NULL };
        snprintf(rk, sizeof rk, "RANK=%d", r);
        snprintf(lr, sizeof lr, "LOCAL_RANK=%d", r);
        snprintf(n1, sizeof n1, "WORLD_SIZE=3");
        snprintf(n2, sizeof n2, "LOCAL_WORLD_SIZE=3");
        snprintf(name, sizeof name, "out.%d", r);
        path_in(path, sizeof path, dir, name);
        if (spawn(&p[r], argv, path, NULL, env) != 0) { fprintf(stderr, "fault: cannot start %s\n", worker); exit(2); }
    }
    for (r = 0; r < 3; r++) {
        while (!t_proc_poll(&p[r])) sleep_s(0.001);
        ok &= p[r].code == 0;
        t1 = now();
    }
    rm_rf(dir);
    if (!ok) { fprintf(stderr, "fault: the calibration job failed\n"); exit(1); }
    return t1 - t0;
}

int main(int argc, char **argv) {
    int trials = 30, i;
    unsigned long seed = 1;
    stats st;
    double t0 = now();
    if (argc < 3) { fprintf(stderr, "usage: fault WORKER DDPRUN [--trials N] [--seed S] [--timeout T] [--quiet]\n"); return 2; }
    t_proc_init(argv[0]);
    worker = argv[1];
    ddprun = argv[2];
    for (i = 3; i < argc; i++) {
        if (!strcmp(argv[i], "--trials") && i + 1 < argc) trials = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--seed") && i + 1 < argc) seed = strtoul(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--timeout") && i + 1 < argc) timeout_s = atof(argv[++i]);
        else if (!strcmp(argv[i], "--quiet")) quiet = 1;
        else { fprintf(stderr, "fault: unknown argument '%s'\n", argv[i]); return 2; }
    }
    if (trials < 1 || trials > 4096) { fprintf(stderr, "fault: --trials 1..4096\n"); return 2; }
    if (ddp__net_start() != 0) { fprintf(stderr, "fault: cannot start the sockets layer\n"); return 2; }
    memset(&st, 0, sizeof st);
    rng_state = seed * 0x2545f4914f6cdd1dull + 1;
    for (i = 0; i < trials; i++) {
        /* how long a job lives depends on the machine's load: measured
           again every 40 trials (the middle of three runs) */
        if (i % 40 == 0) {
            double a = calibrate(), b = calibrate(), c = calibrate(), m = a < b ? (b < c ? b : (a < c ? c : a)) : (a < c ? a : (b < c ? c : b));
            span = 1.2 * m;
            if (!quiet || i == 0) printf("fault: a job lives %.3f s here; kills land in 0..%.3f s after its ranks start\n", m, span);
        }
        trial(i, &st);
    }
    qsort(st.ttf, (size_t)st.nttf, sizeof st.ttf[0], cmp_double);
    printf("fault: seed %lu, %d trials in %.0f s: %d failed, %d hangs, %d shared-memory objects left, %d temporary checkpoints left "
           "(%d removed by the next save), %d trials ended in an error naming the victim",
           seed, st.trials, now() - t0, st.failures, st.hangs, st.shm_leaks, st.tmp_leaks, st.tmp_swept, st.errors);
    if (st.nttf) {
        int fast = 0;
        for (i = 0; i < st.nttf; i++) fast += st.ttf[i] < 1.0;
        printf("; kill to error: median %.3f s, max %.3f s (timeout %.1f s); %d within 1 s, %d at the timeout",
               st.ttf[st.nttf / 2], st.ttf[st.nttf - 1], timeout_s, fast, st.nttf - fast);
    }
    printf("\nfault: kills by the victim's phase:");
    for (i = 0; i < 6; i++) printf(" %s %d", phase_names[i], st.phases[i]);
    printf("\n");
    ddp__net_stop();
    return st.failures ? 1 : 0;
}
