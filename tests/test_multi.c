/* Multi-process tests of ddp.h: real processes (copies of this program,
   started by tests/testproc.h) on the shm backend. Collectives against
   values computed here, mismatched models, rendezvous failures (port in use,
   unreachable master), a rank killed mid-step, a rank that hangs, a failing
   user callback — each ending in a clear error within the timeout, with no
   shared-memory segment left (/dev/shm; Windows: the session's named
   objects). The same source runs on POSIX and on Windows. */
#define DDP_IMPLEMENTATION
#include "../ddp.h"
#include "testing.h"
#include "testproc.h"
#include <math.h>

/* What a rank function gets besides its identity (each case uses what it needs). */
typedef struct t_arg { int i; double d; } t_arg;
typedef int (*rank_fn)(int rank, int world, int port, const t_arg *arg);

static ddp_config rank_config(int rank, int world, int port, double timeout) {
    ddp_config c;
    memset(&c, 0, sizeof c);
    c.rank = rank;
    c.world_size = world;
    c.master_addr = "127.0.0.1";
    c.master_port = port;
    c.timeout_s = timeout;
    return c;
}

/* Run rank function `name` (see the table in main) in `world` processes;
   exit codes into codes[] (a process that cannot start: -1); returns the
   wall time. A process still running after limit_s is killed (T_KILLED). */
static int last_pids[16];
static int last_world;

static double run_ranks(int world, const char *name, const t_arg *arg, int *codes, double limit_s) {
    t_proc procs[16];
    int port = t_free_port(), r, left = 0;
    double t0 = ddp__now();
    char sr[16], sw[16], sp[16], si[32], sd[32];
    t_arg none = { 0, 0 };
    if (!arg) arg = &none;
    last_world = world;
    snprintf(sw, sizeof sw, "%d", world);
    snprintf(sp, sizeof sp, "%d", port);
    snprintf(si, sizeof si, "%d", arg->i);
    snprintf(sd, sizeof sd, "%.17g", arg->d);
    for (r = 0; r < world; r++) {
        const char *args[] = { "--rank", name, sr, sw, sp, si, sd, NULL };
        snprintf(sr, sizeof sr, "%d", r);
        codes[r] = -1;
        last_pids[r] = 0;
        if (t_proc_spawn_self(&procs[r], args) != 0) { procs[r].done = 1; continue; }
        last_pids[r] = procs[r].pid;
        left++;
    }
    while (left > 0) {
        for (r = 0; r < world; r++)
            if (!procs[r].done && t_proc_poll(&procs[r])) { codes[r] = procs[r].code; left--; }
        if (left > 0 && ddp__now() - t0 > limit_s)
            for (r = 0; r < world; r++) t_proc_kill(&procs[r]);
        ddp__sleep_us(2000);
    }
    return ddp__now() - t0;
}

/* Segments left by the processes of the last run (names are ddp-<pid>-...;
   other suites may run beside this one). */
static int count_shm_segments(void) {
    return t_shm_leftovers(last_pids, last_world);
}

#define RANK_CHECK(cond, ...) do { if (!(cond)) { fprintf(stderr, "rank %d: ", rank); fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); return 10; } } while (0)

/* ---- collectives ---- */

static double val(int rank, size_t i) { return (double)((i * 7 + (size_t)rank * 13) % 101) - 50.0; }

static int collectives_rank(int rank, int world, int port, const t_arg *arg) {
    ddp_config c = rank_config(rank, world, port, 10);
    ddp_context *ctx;
    static const size_t sizes[] = { 1, 5, 1000, 16411, 70000 };
    size_t si, i;
    int q;
    (void)arg;
    c.staging_bytes = 64 << 10; /* small staging: large messages go in chunks */
    if (ddp_create(&c, &ctx) != DDP_SUCCESS) { fprintf(stderr, "rank %d: %s\n", rank, ddp_create_error()); return 2; }
    for (si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
        size_t n = sizes[si];
        float *f = (float *)malloc(n * sizeof(float)), *g = (float *)malloc(n * world * sizeof(float));
        double *d = (double *)malloc(n * sizeof(double));
        int32_t *k = (int32_t *)malloc(n * sizeof(int32_t));
        uint16_t *h = (uint16_t *)malloc(n * sizeof(uint16_t));
        for (i = 0; i < n; i++) { f[i] = (float)val(rank, i); d[i] = val(rank, i) * 0.5; k[i] = (int32_t)val(rank, i); h[i] = ddp__f32_to_bf16((float)val(rank, i)); }
        RANK_CHECK(ddp_allreduce(ctx, f, n, DDP_F32, DDP_OP_SUM) == DDP_SUCCESS, "f32 sum: %s", ddp_last_error(ctx));
        RANK_CHECK(ddp_allreduce(ctx, d, n, DDP_F64, DDP_OP_AVG) == DDP_SUCCESS, "f64 avg: %s", ddp_last_error(ctx));
        RANK_CHECK(ddp_allreduce(ctx, k, n, DDP_I32, DDP_OP_MAX) == DDP_SUCCESS, "i32 max: %s", ddp_last_error(ctx));
        RANK_CHECK(ddp_allreduce(ctx, h, n, DDP_BF16, DDP_OP_SUM) == DDP_SUCCESS, "bf16 sum: %s", ddp_last_error(ctx));
        for (i = 0; i < n; i++) {
            double s = 0, mx = -1e9;
            for (q = 0; q < world; q++) { s += val(q, i); if (val(q, i) > mx) mx = val(q, i); }
            RANK_CHECK(f[i] == (float)s, "f32 sum n=%zu i=%zu: %g != %g", n, i, (double)f[i], s);
            RANK_CHECK(fabs(d[i] - s * 0.5 / world) < 1e-12, "f64 avg n=%zu i=%zu", n, i);
            RANK_CHECK(k[i] == (int32_t)mx, "i32 max n=%zu i=%zu: %d != %g", n, i, k[i], mx);
            RANK_CHECK(ddp__bf16_to_f32(h[i]) == (float)s, "bf16 sum n=%zu i=%zu", n, i);
        }
        /* broadcast from the last rank */
        for (i = 0; i < n; i++) f[i] = (float)(rank * 1000 + (int)(i % 1000));
        RANK_CHECK(ddp_broadcast(ctx, f, n, DDP_F32, world - 1) == DDP_SUCCESS, "broadcast: %s", ddp_last_error(ctx));
        for (i = 0; i < n; i++) RANK_CHECK(f[i] == (float)((world - 1) * 1000 + (int)(i % 1000)), "broadcast n=%zu i=%zu", n, i);
        /* all-gather */
        for (i = 0; i < n; i++) f[i] = (float)val(rank, i);
        RANK_CHECK(ddp_allgather(ctx, f, g, n, DDP_F32) == DDP_SUCCESS, "allgather: %s", ddp_last_error(ctx));
        for (q = 0; q < world; q++)
            for (i = 0; i < n; i++) RANK_CHECK(g[(size_t)q * n + i] == (float)val(q, i), "allgather n=%zu q=%d i=%zu", n, q, i);
        /* reduce-scatter with min: block r of the result is min over ranks of their block r */
        for (q = 0; q < world; q++)
            for (i = 0; i < n; i++) g[(size_t)q * n + i] = (float)val(rank, (size_t)q * n + i);
        RANK_CHECK(ddp_reduce_scatter(ctx, g, f, n, DDP_F32, DDP_OP_MIN) == DDP_SUCCESS, "reduce-scatter: %s", ddp_last_error(ctx));
        for (i = 0; i < n; i++) {
            double mn = 1e9;
            for (q = 0; q < world; q++) if (val(q, (size_t)rank * n + i) < mn) mn = val(q, (size_t)rank * n + i);
            RANK_CHECK(f[i] == (float)mn, "reduce-scatter n=%zu i=%zu", n, i);
        }
        free(f); free(g); free(d); free(k); free(h);
    }
    RANK_CHECK(ddp_barrier(ctx) == DDP_SUCCESS, "barrier: %s", ddp_last_error(ctx));
    ddp_destroy(ctx);
    return 0;
}

static void test_collectives(void) {
    int codes[4], w, r;
    for (w = 2; w <= 3; w++) {
        TEST(w == 2 ? "collectives w=2" : "collectives w=3");
        run_ranks(w, "collectives", NULL, codes, 60);
        for (r = 0; r < w; r++) CHECK(codes[r] == 0, "rank %d exited %d", r, codes[r]);
    }
}

/* ---- gradients through the reducer: every rank's bucket holds the average ---- */

static int reducer_rank(int rank, int world, int port, const t_arg *arg) {
    ddp_config c = rank_config(rank, world, port, 10);
    ddp_context *ctx;
    int ids[5], i, step, p;
    char name[16];
    (void)arg;
    c.first_bucket_bytes = 1000;
    c.bucket_bytes = 3000;
    if (ddp_create(&c, &ctx) != DDP_SUCCESS) { fprintf(stderr, "rank %d: %s\n", rank, ddp_create_error()); return 2; }
    for (p = 0; p < 5; p++) {
        snprintf(name, sizeof name, "p%d", p);
        RANK_CHECK(ddp_register_param(ctx, name, (size_t)(100 + 300 * p), DDP_F32, NULL, &ids[p]) == DDP_SUCCESS, "register");
    }
    RANK_CHECK(ddp_finalize(ctx) == DDP_SUCCESS, "finalize: %s", ddp_last_error(ctx));
    RANK_CHECK(ddp_bucket_count(ctx) >= 3, "several buckets");
    for (step = 0; step < 4; step++) {
        /* gradients accumulate until ddp_zero_grad() (or an optimizer step): each step here stands alone */
        RANK_CHECK(ddp_zero_grad(ctx) == DDP_SUCCESS, "zero: %s", ddp_last_error(ctx));
        RANK_CHECK(ddp_step_begin(ctx) == DDP_SUCCESS, "begin: %s", ddp_last_error(ctx));
        for (p = 4; p >= 0; p--) {
            float *g = (float *)ddp_param_grad(ctx, ids[p]);
            for (i = 0; i < 100 + 300 * p; i++) g[i] += (float)(rank + 1) * (float)(i + p + step);
            RANK_CHECK(ddp_mark_ready(ctx, ids[p]) == DDP_SUCCESS, "mark: %s", ddp_last_error(ctx));
        }
        RANK_CHECK(ddp_step_end(ctx) == DDP_SUCCESS, "end: %s", ddp_last_error(ctx));
        for (p = 0; p < 5; p++) {
            float *g = (float *)ddp_param_grad(ctx, ids[p]);
            for (i = 0; i < 100 + 300 * p; i++) {
                float want = (float)(world + 1) / 2.0f * (float)(i + p + step);
                RANK_CHECK(fabsf(g[i] - want) <= 1e-6f * fabsf(want), "step %d p%d[%d] = %g, want %g", step, p, i, (double)g[i], (double)want);
            }
        }
    }
    ddp_destroy(ctx);
    return 0;
}

static void test_reducer(void) {
    int codes[4], r;
    TEST("reducer w=3");
    run_ranks(3, "reducer", NULL, codes, 60);
    for (r = 0; r < 3; r++) CHECK(codes[r] == 0, "rank %d exited %d", r, codes[r]);
}

/* ---- mismatched models ---- */

static int mismatch_rank(int rank, int world, int port, const t_arg *arg) {
    ddp_config c = rank_config(rank, world, port, 5);
    ddp_context *ctx;
    int id, kind = arg->i;
    int64_t shape[2] = { 16, rank == 1 && kind == 0 ? 8 : 4 };
    ddp_result r;
    if (ddp_create(&c, &ctx) != DDP_SUCCESS) return 2;
    ddp_register_param(ctx, "embed", 10, DDP_F32, NULL, &id);
    ddp_register_param_shape(ctx, "fc.weight", 2, shape, kind == 2 && rank == 2 ? DDP_F64 : DDP_F32, NULL, &id);
    if (!(kind == 1 && rank == 1)) ddp_register_param(ctx, "fc.bias", 16, DDP_F32, NULL, &id);
    r = ddp_finalize(ctx);
    RANK_CHECK(r == DDP_ERROR_MISMATCH, "finalize returned %s: %s", ddp_result_string(r), ddp_last_error(ctx));
    if (kind == 0) RANK_CHECK(strstr(ddp_last_error(ctx), "parameter 1: rank 0 has 'fc.weight' f32 [16,4], rank 1 has 'fc.weight' f32 [16,8]") != NULL, "message: %s", ddp_last_error(ctx));
    if (kind == 1) RANK_CHECK(strstr(ddp_last_error(ctx), "rank 0 registered 3 parameters, rank 1 registered 2") != NULL, "message: %s", ddp_last_error(ctx));
    if (kind == 2) RANK_CHECK(strstr(ddp_last_error(ctx), "rank 2 has 'fc.weight' f64") != NULL, "message: %s", ddp_last_error(ctx));
    ddp_destroy(ctx);
    return 0;
}

static void test_mismatch(void) {
    int codes[4], r, kind;
    for (kind = 0; kind < 3; kind++) {
        t_arg a = { 0, 0 };
        a.i = kind;
        TEST(kind == 0 ? "mismatch shape" : kind == 1 ? "mismatch count" : "mismatch dtype");
        run_ranks(3, "mismatch", &a, codes, 30);
        for (r = 0; r < 3; r++) CHECK(codes[r] == 0, "rank %d exited %d", r, codes[r]);
    }
}

/* ---- rendezvous failures ---- */

static int port_in_use_rank(int rank, int world, int port, const t_arg *arg) {
    ddp_config c = rank_config(rank, world, arg->i, 2);
    ddp_context *ctx;
    ddp_result r;
    double t0 = ddp__now();
    (void)port;
    c.connect_timeout_s = 2;
    r = ddp_create(&c, &ctx);
    if (rank == 0) {
        RANK_CHECK(r == DDP_ERROR_NETWORK, "rank 0 got %s: %s", ddp_result_string(r), ddp_create_error());
        RANK_CHECK(strstr(ddp_create_error(), "in use") != NULL, "message: %s", ddp_create_error());
    } else {
        /* the port answers (it is the other listener), but it does not speak the store protocol */
        RANK_CHECK(r != DDP_SUCCESS, "rank 1 must fail");
    }
    RANK_CHECK(ddp__now() - t0 < 8, "failed in %.1f s", ddp__now() - t0);
    return 0;
}

static void test_port_in_use(void) {
    int codes[2], fd;
    struct sockaddr_in a;
    t_arg port = { 0, 0 };
    TEST("port in use");
    fd = ddp__sock_open(AF_INET, SOCK_STREAM, 0);
    ddp__sock_listen_prepare(fd);
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    ddp__sock_bind(fd, (struct sockaddr *)&a, sizeof a);
    ddp__sock_listen(fd, 4);
    {
        socklen_t len = sizeof a;
        ddp__sock_name(fd, (struct sockaddr *)&a, &len);
        port.i = ntohs(a.sin_port);
    }
    run_ranks(2, "port_in_use", &port, codes, 30);
    CHECK(codes[0] == 0 && codes[1] == 0, "codes %d %d", codes[0], codes[1]);
    ddp__sock_close(fd);
}

static void test_unreachable(void) {
    ddp_config c = rank_config(1, 2, t_free_port(), 1);
    ddp_context *ctx = NULL;
    double t0 = ddp__now();
    char needle[64];
    TEST("unreachable master");
    c.connect_timeout_s = 1.5;
    CHECK(ddp_create(&c, &ctx) == DDP_ERROR_TIMEOUT, "timeout expected: %s", ddp_create_error());
    snprintf(needle, sizeof needle, "127.0.0.1:%d", c.master_port);
    CHECK(strstr(ddp_create_error(), needle) != NULL, "message names the address: %s", ddp_create_error());
    CHECK(ddp__now() - t0 < 5, "within the timeout (%.1f s)", ddp__now() - t0);
    c.master_addr = "no-such-host.invalid";
    CHECK(ddp_create(&c, &ctx) != DDP_SUCCESS, "bad host name fails");
    CHECK(strstr(ddp_create_error(), "no-such-host.invalid") != NULL, "message names the host: %s", ddp_create_error());
    CHECK(ctx == NULL, "no context");
}

/* ---- failures in the middle of training ---- */

enum { FAIL_KILL, FAIL_HANG, FAIL_USER, FAIL_UNUSED };

typedef struct fail_case { int kind; double timeout; } fail_case;

static int cb_fail(ddp_context *ctx, void *user, int micro, float *loss) {
    (void)ctx; (void)user; (void)micro; (void)loss;
    return 3;
}

static int failing_rank(int rank, int world, int port, const t_arg *arg) {
    fail_case fcase, *fc = &fcase;
    ddp_config c;
    ddp_context *ctx;
    int ids[4], p, step;
    ddp_result r = DDP_SUCCESS;
    double t0;
    fcase.kind = arg->i;
    fcase.timeout = arg->d;
    c = rank_config(rank, world, port, fc->timeout);
    c.first_bucket_bytes = 4096;
    c.bucket_bytes = 4096;
    if (ddp_create(&c, &ctx) != DDP_SUCCESS) return 2;
    for (p = 0; p < 4; p++) {
        char name[8];
        snprintf(name, sizeof name, "w%d", p);
        ddp_register_param(ctx, name, 2000, DDP_F32, NULL, &ids[p]);
    }
    RANK_CHECK(ddp_finalize(ctx) == DDP_SUCCESS, "finalize: %s", ddp_last_error(ctx));
    for (step = 0; step < 3 && r == DDP_SUCCESS; step++) {
        int victim = step == 2 && rank == world - 1;
        if (victim && fc->kind == FAIL_USER) { r = ddp_train_step(ctx, cb_fail, NULL, 1, NULL); break; }
        t0 = ddp__now();
        r = ddp_step_begin(ctx);
        for (p = 3; p >= 0 && r == DDP_SUCCESS; p--) {
            if (victim && p == 1) {
                if (fc->kind == FAIL_KILL) t_kill_self();
                if (fc->kind == FAIL_HANG) { ddp__sleep_us((long)(fc->timeout * 4e6)); return 0; }
                if (fc->kind == FAIL_UNUSED) break;
            }
            r = ddp_mark_ready(ctx, ids[p]);
        }
        if (r == DDP_SUCCESS) r = ddp_step_end(ctx);
    }
    if (rank == world - 1 && fc->kind == FAIL_USER) {
        RANK_CHECK(r == DDP_ERROR_USER, "victim got %s", ddp_result_string(r));
    } else if (rank == world - 1 && fc->kind == FAIL_UNUSED) {
        RANK_CHECK(r == DDP_ERROR_INVALID_STATE && strstr(ddp_last_error(ctx), "'w1', 'w0'") == NULL &&
                   strstr(ddp_last_error(ctx), "'w0', 'w1'") != NULL, "victim got %s: %s", ddp_result_string(r), ddp_last_error(ctx));
    } else {
        double took = ddp__now() - t0;
        RANK_CHECK(r == DDP_ERROR_PEER || r == DDP_ERROR_TIMEOUT, "survivor got %s: %s", ddp_result_string(r), ddp_last_error(ctx));
        RANK_CHECK(took < fc->timeout + 3.0, "survivor took %.1f s (timeout %.1f)", took, fc->timeout);
        if (fc->kind == FAIL_KILL) RANK_CHECK(strstr(ddp_last_error(ctx), "exited") || strstr(ddp_last_error(ctx), "timed out"), "message: %s", ddp_last_error(ctx));
        if (fc->kind == FAIL_HANG) RANK_CHECK(r == DDP_ERROR_TIMEOUT || strstr(ddp_last_error(ctx), "timed out"), "message: %s", ddp_last_error(ctx));
        if (fc->kind == FAIL_USER) RANK_CHECK(strstr(ddp_last_error(ctx), "returned 3") != NULL, "message: %s", ddp_last_error(ctx));
        if (fc->kind == FAIL_UNUSED) RANK_CHECK(strstr(ddp_last_error(ctx), "never marked ready") != NULL, "message: %s", ddp_last_error(ctx));
        r = ddp_step_begin(ctx);
        RANK_CHECK(r != DDP_SUCCESS && strstr(ddp_last_error(ctx), "broken"), "context is broken afterwards: %s", ddp_last_error(ctx));
        if (fc->kind == FAIL_KILL || fc->kind == FAIL_HANG)
            RANK_CHECK(r == DDP_ERROR_PEER || r == DDP_ERROR_TIMEOUT, "a broken context keeps answering the peer's error, got %s", ddp_result_string(r));
    }
    ddp_destroy(ctx);
    return 0;
}

static void test_failures(void) {
    static const char *names[] = { "rank killed mid-step", "rank hangs mid-step", "user callback fails", "unused parameter on one rank" };
    int codes[4], r, kind;
    for (kind = 0; kind < 4; kind++) {
        fail_case fc;
        double took;
        fc.kind = kind;
        fc.timeout = 3.0;
        TEST(names[kind]);
        {
            t_arg a;
            a.i = fc.kind;
            a.d = fc.timeout;
            took = run_ranks(3, "failing", &a, codes, 30);
        }
        for (r = 0; r < 3; r++) {
            if (kind == FAIL_KILL && r == 2) CHECK(codes[r] == T_KILLED, "victim killed (%d)", codes[r]);
            else CHECK(codes[r] == 0, "rank %d exited %d", r, codes[r]);
        }
        CHECK(took < 15, "whole case took %.1f s", took);
        CHECK(count_shm_segments() == 0, "nothing left in /dev/shm");
    }
}

/* a slow but steady peer (each bucket within the timeout, the whole step
   longer than it) is not a failure */
static int slow_rank(int rank, int world, int port, const t_arg *arg) {
    ddp_config c = rank_config(rank, world, port, 2.0);
    ddp_context *ctx;
    int ids[9], p;
    (void)arg;
    c.first_bucket_bytes = 1024; c.bucket_bytes = 1024;
    if (ddp_create(&c, &ctx) != DDP_SUCCESS) return 2;
    /* 9 buckets, 1.5 s apart: 13.5 s in all, longer than timeout + 10 s */
    for (p = 0; p < 9; p++) {
        char name[8];
        snprintf(name, sizeof name, "w%d", p);
        ddp_register_param(ctx, name, 256, DDP_F32, NULL, &ids[p]);
    }
    RANK_CHECK(ddp_finalize(ctx) == DDP_SUCCESS, "finalize: %s", ddp_last_error(ctx));
    RANK_CHECK(ddp_bucket_count(ctx) == 9, "one bucket per parameter");
    RANK_CHECK(ddp_step_begin(ctx) == DDP_SUCCESS, "begin");
    for (p = 8; p >= 0; p--) {
        if (rank == 1) ddp__sleep_us(1500000);
        RANK_CHECK(ddp_mark_ready(ctx, ids[p]) == DDP_SUCCESS, "mark: %s", ddp_last_error(ctx));
    }
    RANK_CHECK(ddp_step_end(ctx) == DDP_SUCCESS, "a slow, steady peer is no failure: %s", ddp_last_error(ctx));
    ddp_destroy(ctx);
    return 0;
}

/* contexts one after another on the same port: each rendezvous finds its
   own store, never the previous context's keys */
static int sequential_rank(int rank, int world, int port, const t_arg *arg) {
    int k, id;
    (void)arg;
    for (k = 0; k < 3; k++) {
        ddp_config c = rank_config(rank, world, port, 10);
        ddp_context *ctx;
        float x = (float)(rank + k);
        if (rank == 1 && k == 1) ddp__sleep_us(300000); /* a late rank */
        RANK_CHECK(ddp_create(&c, &ctx) == DDP_SUCCESS, "context %d: %s", k, ddp_create_error());
        ddp_register_param(ctx, "w", 100 + 10 * (size_t)k, DDP_F32, NULL, &id);
        RANK_CHECK(ddp_finalize(ctx) == DDP_SUCCESS, "context %d finalize: %s", k, ddp_last_error(ctx));
        RANK_CHECK(ddp_allreduce(ctx, &x, 1, DDP_F32, DDP_OP_SUM) == DDP_SUCCESS, "allreduce: %s", ddp_last_error(ctx));
        RANK_CHECK(x == (float)(world * (world - 1) / 2 + world * k), "context %d: sum %g", k, (double)x);
        ddp_destroy(ctx);
    }
    return 0;
}

static void test_sequential_contexts(void) {
    int codes[3], r;
    double took;
    TEST("sequential contexts, same port");
    took = run_ranks(3, "sequential", NULL, codes, 60);
    for (r = 0; r < 3; r++) CHECK(codes[r] == 0, "rank %d exited %d", r, codes[r]);
    CHECK(took < 8, "took %.1f s", took);
}

static void test_slow_peer(void) {
    int codes[2];
    TEST("slow but steady peer");
    run_ranks(2, "slow", NULL, codes, 40);
    CHECK(codes[0] == 0 && codes[1] == 0, "codes %d %d", codes[0], codes[1]);
}

/* A child: `test_multi --rank NAME RANK WORLD PORT I D` runs one rank. */
static int rank_main(int argc, char **argv) {
    static const struct { const char *name; rank_fn fn; } cases[] = {
        { "collectives", collectives_rank }, { "reducer", reducer_rank }, { "mismatch", mismatch_rank },
        { "port_in_use", port_in_use_rank }, { "failing", failing_rank }, { "slow", slow_rank },
        { "sequential", sequential_rank }
    };
    t_arg a;
    size_t k;
    int code;
    if (argc != 8) { fprintf(stderr, "usage: test_multi --rank NAME RANK WORLD PORT I D\n"); return 2; }
    a.i = atoi(argv[6]);
    a.d = atof(argv[7]);
    for (k = 0; k < sizeof cases / sizeof cases[0]; k++)
        if (!strcmp(cases[k].name, argv[2])) {
            code = cases[k].fn(atoi(argv[3]), atoi(argv[4]), atoi(argv[5]), &a);
            fflush(stdout);
            fflush(stderr);
            return code;
        }
    fprintf(stderr, "test_multi: no rank function '%s'\n", argv[2]);
    return 2;
}

int main(int argc, char **argv) {
    t_proc_init(argv[0]);
    if (ddp__net_start() != 0) { fprintf(stderr, "test_multi: cannot start the sockets layer\n"); return 1; }
    if (argc > 1 && !strcmp(argv[1], "--rank")) return rank_main(argc, argv);
    test_collectives();
    test_reducer();
    test_mismatch();
    test_port_in_use();
    test_unreachable();
    test_failures();
    test_slow_peer();
    test_sequential_contexts();
    TEST("end");
    CHECK(count_shm_segments() == 0, "nothing left in /dev/shm");
    return t_summary("test_multi");
}
