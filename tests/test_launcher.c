/* What both launchers promise, the same test on POSIX (tools/ddprun.c) and
   on Windows (tools/ddprun_win.c, under Wine in CI): the ranks' environment,
   rank-prefixed whole lines on the right stream, the first failure's exit
   code with the others stopped, 127 for a program that cannot run, usage
   errors. The ranks are this program again (`test_launcher --child MODE
   DIR`).
       test_launcher path/to/ddprun
   tests/test_ddprun.sh adds what only POSIX has (sh children, signals,
   process groups, inherited descriptors). */
#define DDP_IMPLEMENTATION
#include "../ddp.h"
#include "testing.h"
#include "testproc.h"

static const char *ddprun;
static char dir[512];

/* ---- the ranks -------------------------------------------------------------- */

static void path_in(char *out, size_t cap, const char *d, const char *what, const char *rank) {
#if defined(_WIN32)
    snprintf(out, cap, "%s\\%s.%s", d, what, rank);
#else
    snprintf(out, cap, "%s/%s.%s", d, what, rank);
#endif
}

static int file_exists(const char *p) {
    FILE *f = fopen(p, "rb");
    if (f) fclose(f);
    return f != NULL;
}

static void write_pid(const char *d, const char *rank) {
    char p[600];
    FILE *f;
    path_in(p, sizeof p, d, "pid", rank);
    f = fopen(p, "w");
    if (f) { fprintf(f, "%d\n", t_getpid()); fclose(f); }
}

static int child(const char *mode, const char *d) {
    const char *rank = getenv("RANK");
    int r = rank ? atoi(rank) : -1, i;
    if (!rank) return 90;
    if (!strcmp(mode, "env")) {
        static const char *names[] = { "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                                       "MASTER_ADDR", "MASTER_PORT", "DDP_LAUNCHER", "TORCHELASTIC_USE_AGENT_STORE" };
        for (i = 0; i < 9; i++) printf("%s%s", i ? " " : "", getenv(names[i]) ? getenv(names[i]) : "unset");
        printf("\n");
        return 0;
    }
    if (!strcmp(mode, "out")) {
        printf("out%d\n", r);
        fflush(stdout);
        fprintf(stderr, "err%d\n", r);
        fflush(stderr);
        printf("tail%d", r);
        fflush(stdout);
        fprintf(stderr, "etail%d", r);
        return 0;
    }
    if (!strcmp(mode, "plain")) {
        printf("plain%d\n", r);
        fflush(stdout);
        fprintf(stderr, "perr%d\n", r);
        return 0;
    }
    if (!strcmp(mode, "lines")) { /* 2000 lines of 305 bytes, written in big blocks */
        static char block[64 * 306];
        size_t n = 0;
        for (i = 0; i < 2000; i++) {
            n += (size_t)sprintf(block + n, "r%d-%0300d\n", r, 0);
            if (n > sizeof block - 306) { fwrite(block, 1, n, stdout); n = 0; }
        }
        fwrite(block, 1, n, stdout);
        return 0;
    }
    if (!strcmp(mode, "fail")) { /* rank 1 fails once the others run; they would sleep 30 s */
        write_pid(d, rank);
        if (r == 1) {
            char p0[600], p2[600];
            path_in(p0, sizeof p0, d, "pid", "0");
            path_in(p2, sizeof p2, d, "pid", "2");
            for (i = 0; i < 200 && !(file_exists(p0) && file_exists(p2)); i++) ddp__sleep_us(50000);
            printf("rank 1 fails\n");
            return 3;
        }
        ddp__sleep_us(30000000);
        return 0;
    }
    if (!strcmp(mode, "sleep")) { /* write the pid, then sleep 30 s */
        write_pid(d, rank);
        ddp__sleep_us(30000000);
        return 0;
    }
    if (!strcmp(mode, "killed")) { /* rank 0 dies as if killed */
        if (r == 0) t_kill_self();
        ddp__sleep_us(30000000);
        return 0;
    }
    return 91;
}

/* ---- the checks ---------------------------------------------------------------- */

static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    long n;
    char *s;
    if (!f) { s = (char *)calloc(1, 1); return s; }
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    s = (char *)malloc((size_t)n + 1);
    n = s ? (long)fread(s, 1, (size_t)n, f) : 0;
    fclose(f);
    if (!s) return NULL;
    s[n] = 0;
    { /* text mode on Windows may leave \r\n: compare lines without \r */
        char *w = s, *q;
        for (q = s; *q; q++) if (*q != '\r') *w++ = *q;
        *w = 0;
    }
    return s;
}

static int count_lines(const char *s) {
    int n = 0;
    for (; *s; s++) n += *s == '\n';
    return n;
}

static int has_line(const char *s, const char *line) {
    size_t n = strlen(line);
    const char *p = s;
    while ((p = strstr(p, line)) != NULL) {
        if ((p == s || p[-1] == '\n') && (p[n] == '\n' || p[n] == 0)) return 1;
        p += n;
    }
    return 0;
}

static char out_path[600], err_path[600];

/* ddprun args... ; *out and *err receive what it printed (free them). */
static int run(const char *const *args, char **out, char **err) {
    const char *argv[32];
    int i, code = -1000;
    argv[0] = ddprun;
    for (i = 0; args[i] && i < 30; i++) argv[i + 1] = args[i];
    argv[i + 1] = NULL;
    if (t_run_capture(argv, out_path, err_path, 60, &code) != 0) code = -1000;
    *out = slurp(out_path);
    *err = slurp(err_path);
    return code;
}

static void test_env(void) {
    const char *a1[] = { "-n", "3", "--", t_self_path, "--child", "env", dir, NULL };
    const char *a2[] = { "-n", "2", "--master-addr", "10.1.2.3", "--master-port", "29555", t_self_path, "--child", "env", dir, NULL };
    char *out, *err, line[256], port[16] = "";
    int code, r;
    TEST("environment");
    code = run(a1, &out, &err);
    CHECK(code == 0, "3 ranks exit 0 -> exit 0, got %d (stderr: %s)", code, err);
    CHECK(count_lines(out) == 3, "three lines, got:\n%s", out);
    for (r = 0; r < 3; r++) {
        const char *p;
        snprintf(line, sizeof line, "[%d] %d 3 %d 3 0 127.0.0.1 ", r, r, r);
        p = strstr(out, line);
        CHECK(p != NULL, "rank %d's line and environment: %s", r, out);
        if (p) {
            char got[16] = "";
            sscanf(p + strlen(line), "%15s", got);
            if (r == 0) memcpy(port, got, sizeof port);
            CHECK(atoi(got) >= 1 && atoi(got) <= 65535 && !strcmp(got, port), "one MASTER_PORT for all, got '%s' and '%s'", port, got);
            CHECK(strstr(p, " ddprun unset") != NULL, "DDP_LAUNCHER=ddprun, no agent store: %s", p);
        }
    }
    CHECK(err[0] == 0, "nothing on stderr: %s", err);
    free(out); free(err);

    t_setenv("RANK", "7");
    t_setenv("WORLD_SIZE", "9");
    t_setenv("MASTER_ADDR", "wrong");
    t_setenv("DDP_LAUNCHER", "torchrun");
    t_setenv("TORCHELASTIC_USE_AGENT_STORE", "True");
    code = run(a2, &out, &err);
    t_unsetenv("RANK"); t_unsetenv("WORLD_SIZE"); t_unsetenv("MASTER_ADDR"); t_unsetenv("DDP_LAUNCHER");
    t_unsetenv("TORCHELASTIC_USE_AGENT_STORE");
    CHECK(code == 0 && has_line(out, "[0] 0 2 0 2 0 10.1.2.3 29555 ddprun unset") &&
          has_line(out, "[1] 1 2 1 2 0 10.1.2.3 29555 ddprun unset"),
          "inherited values overwritten, options applied, agent store variable removed (exit %d):\n%s", code, out);
    free(out); free(err);
}

static void test_output(void) {
    const char *a1[] = { "-n", "2", t_self_path, "--child", "out", dir, NULL };
    const char *a2[] = { "-n", "4", t_self_path, "--child", "lines", dir, NULL };
    const char *a3[] = { "-n", "2", "--no-prefix", t_self_path, "--child", "plain", dir, NULL };
    char *out, *err, want[400];
    int code, r, whole = 0;
    const char *p;
    TEST("output");
    code = run(a1, &out, &err);
    CHECK(code == 0, "exit %d", code);
    CHECK(has_line(out, "[0] out0") && has_line(out, "[1] out1"), "stdout lines on stdout, prefixed:\n%s", out);
    CHECK(has_line(err, "[0] err0") && has_line(err, "[1] err1"), "stderr lines on stderr, prefixed:\n%s", err);
    CHECK(!strstr(out, "err") && !strstr(err, "out"), "no line on the other stream");
    CHECK(has_line(out, "[1] tail1") && has_line(err, "[0] etail0"), "final partial lines printed with a newline");
    free(out); free(err);

    code = run(a2, &out, &err);
    CHECK(code == 0, "exit %d", code);
    for (r = 0; r < 4; r++) {
        snprintf(want, sizeof want, "[%d] r%d-%0300d\n", r, r, 0);
        for (p = out; (p = strstr(p, want)) != NULL; p += strlen(want)) whole++;
    }
    CHECK(whole == 8000 && count_lines(out) == 8000, "8000 lines from 4 ranks, none mixed or cut: %d whole of %d", whole, count_lines(out));
    free(out); free(err);

    code = run(a3, &out, &err);
    CHECK(code == 0 && has_line(out, "plain0") && has_line(out, "plain1") && !strstr(out, "[0]"), "--no-prefix passes stdout through:\n%s", out);
    CHECK(has_line(err, "perr0") && has_line(err, "perr1") && !strstr(err, "[0]"), "--no-prefix passes stderr through:\n%s", err);
    free(out); free(err);
}

static int pid_gone(const char *which) {
    char p[600], *s;
    int pid;
    path_in(p, sizeof p, dir, "pid", which);
    s = slurp(p);
    pid = s ? atoi(s) : 0;
    free(s);
    remove(p);
    return pid > 0 && ddp__proc_dead(pid);
}

static void test_failure(void) {
    const char *a1[] = { "-n", "3", "--grace", "1", t_self_path, "--child", "fail", dir, NULL };
    const char *a2[] = { "-n", "2", "--grace", "1", t_self_path, "--child", "killed", dir, NULL };
    const char *a3[] = { "-n", "2", "/nonexistent/program", NULL };
    char *out, *err;
    int code;
    double t0 = ddp__now(), took;
    TEST("failures");
    code = run(a1, &out, &err);
    took = ddp__now() - t0;
    CHECK(code == 3, "rank 1 exits 3 -> ddprun exits 3, got %d", code);
    CHECK(took < 10, "within 10 s, took %.1f s", took);
    CHECK(strstr(err, "ddprun: rank 1 (pid ") && strstr(err, ") exited with code 3; stopping the others"), "names the rank:\n%s", err);
    CHECK(has_line(out, "[1] rank 1 fails"), "after printing its output:\n%s", out);
    CHECK(pid_gone("0") && pid_gone("2"), "the sleeping ranks are gone");
    free(out); free(err);

    t0 = ddp__now();
    code = run(a2, &out, &err);
    CHECK(code == 137, "a rank killed (SIGKILL; Windows: terminated with code 137) -> 137, got %d:\n%s", code, err);
    CHECK(ddp__now() - t0 < 10, "within 10 s");
    free(out); free(err);

    code = run(a3, &out, &err);
    CHECK(code == 127, "nonexistent program -> 127, got %d", code);
    CHECK(strstr(err, "ddprun: cannot run '/nonexistent/program': ") != NULL, "with the reason:\n%s", err);
    free(out); free(err);
}

/* No rank outlives the launcher, however it ends: killed (SIGKILL, or
   TerminateProcess), its ranks end too (Linux: PR_SET_PDEATHSIG; Windows:
   the job objects close with it). */
static void test_launcher_killed(void) {
    const char *args[] = { "-n", "2", "--grace", "1", t_self_path, "--child", "sleep", dir, NULL };
    char p0[600], p1[600];
    t_proc run;
    double t0 = ddp__now();
    int i, gone = 0;
    TEST("launcher killed");
    path_in(p0, sizeof p0, dir, "pid", "0");
    path_in(p1, sizeof p1, dir, "pid", "1");
    remove(p0);
    remove(p1);
    CHECK(t_proc_spawn(&run, ddprun, args) == 0, "ddprun started");
    while (!(file_exists(p0) && file_exists(p1)) && ddp__now() - t0 < 20) ddp__sleep_us(20000);
    CHECK(file_exists(p0) && file_exists(p1), "both ranks started");
    ddp__sleep_us(100000); /* the pid files are written whole */
    t_proc_kill(&run);
    while (!t_proc_poll(&run)) ddp__sleep_us(10000);
    {
        char *s0 = slurp(p0), *s1 = slurp(p1);
        int pid0 = s0 ? atoi(s0) : 0, pid1 = s1 ? atoi(s1) : 0;
        free(s0);
        free(s1);
        for (i = 0; i < 500 && !gone; i++) { /* 5 s */
            gone = pid0 > 0 && pid1 > 0 && t_pid_gone(pid0) && t_pid_gone(pid1);
            if (!gone) ddp__sleep_us(10000);
        }
        CHECK(gone, "the ranks (pids %d %d) ended with the killed launcher", pid0, pid1);
    }
    remove(p0);
    remove(p1);
}

static void usage_case(const char *what, const char *needle, const char *const *args) {
    char *out, *err;
    int code = run(args, &out, &err);
    CHECK(code == 2 && strstr(err, needle) && strstr(err, "usage: ddprun -n N") && !out[0],
          "bad usage: %s -> 2, got %d:\n%s", what, code, err);
    free(out); free(err);
}

static void test_usage(void) {
    const char *a1[] = { "true", NULL };
    const char *a2[] = { "-n", "0", "true", NULL };
    const char *a3[] = { "-n", "1025", "true", NULL };
    const char *a4[] = { "-n", NULL };
    const char *a5[] = { "-n", "2", "--", NULL };
    const char *a6[] = { "-n", "2", "--bogus", "true", NULL };
    const char *a7[] = { "-n", "2", "--master-port", "70000", "true", NULL };
    const char *a8[] = { "-n", "2", "--grace", "-1", "true", NULL };
    const char *h[] = { "--help", NULL };
    const char *f[] = { "-n2", "--master-port=1234", "--grace=1", t_self_path, "--child", "env", dir, NULL };
    char *out, *err;
    int code;
    TEST("usage");
    usage_case("missing -n", "missing -n", a1);
    usage_case("-n 0", "-n: '0' is not a whole number", a2);
    usage_case("-n 1025", "'1025' is not a whole number from 1 to 1024", a3);
    usage_case("-n without value", "option -n needs a value", a4);
    usage_case("no program after --", "no program given", a5);
    usage_case("unknown option", "unknown option '--bogus'", a6);
    usage_case("bad port", "--master-port: '70000'", a7);
    usage_case("bad grace", "--grace: '-1'", a8);
    code = run(h, &out, &err);
    CHECK(code == 0 && strstr(out, "usage: ddprun -n N") == out && !err[0], "--help -> 0, usage on stdout");
    free(out); free(err);
    code = run(f, &out, &err);
    CHECK(code == 0 && strstr(out, "[0] 0 2 0 2 0 127.0.0.1 1234 ") && strstr(out, "[1] 1 2 1 2 0 127.0.0.1 1234 "),
          "-nN and --opt=value forms:\n%s", out);
    free(out); free(err);
}

int main(int argc, char **argv) {
    t_proc_init(argv[0]);
    if (argc == 4 && !strcmp(argv[1], "--child")) return child(argv[2], argv[3]);
    if (argc != 2) { fprintf(stderr, "usage: test_launcher path/to/ddprun\n"); return 2; }
    ddprun = argv[1];
    t_temp_path(dir, sizeof dir, "ddp_test_launcher");
#if defined(_WIN32)
    CreateDirectoryA(dir, NULL);
#else
    mkdir(dir, 0700);
#endif
    path_in(out_path, sizeof out_path, dir, "out", "txt");
    path_in(err_path, sizeof err_path, dir, "err", "txt");
    test_env();
    test_output();
    test_failure();
    test_launcher_killed();
    test_usage();
    remove(out_path);
    remove(err_path);
#if defined(_WIN32)
    RemoveDirectoryA(dir);
#else
    rmdir(dir);
#endif
    return t_summary("test_launcher");
}
