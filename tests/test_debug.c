/* Desync detection (DDP_DEBUG=detail, config.debug), on N >= 2 ranks under
   the launcher:

       ddprun -n N test_debug detail     with fingerprints: every mismatch
                                         fails every rank at once with
                                         DDP_ERROR_MISMATCH, the message
                                         naming both sides
       ddprun -n N test_debug off        the same mismatches without them:
                                         each rank returns (a wrong result,
                                         a timeout or a peer's error) and
                                         nothing reads or writes out of
                                         bounds (the suite runs under ASan)

   Cases, one context each (a mismatch breaks it):
     kinds     rank 0 in ddp_allreduce of 10 floats, the others in
               ddp_broadcast of 10 floats from rank 0
     counts    ddp_allreduce of 10 floats against 300000 (another path)
     skipped   a training loop in which the last rank skips a step, then
               every rank all-reduces its loss: the last rank's all-reduce
               meets the others' gradient buckets
     dtypes    ddp_allreduce of 10 f32 against 10 f64
     scatter   ddp_reduce_scatter against ddp_allgather
     propagate (detail only) rank 0 finds a mismatch the others never saw
               (fabricated fingerprints): they fail with its message
   and, with fingerprints, a run without mismatch: fine. */
#define DDP_IMPLEMENTATION
#include "../ddp.h"
#include "testing.h"
#include <math.h>

static int g_rank, g_world, g_detail;
static ddp_context *g_control; /* never mismatched: the barrier between the cases */
static int g_case_port;        /* the cases' port: a free one rank 0 took and broadcast on the control context
                                  (not MASTER_PORT + 1, which a client socket may hold as its local port) */

/* A case's context, on g_case_port (the control context holds
   MASTER_PORT). A mismatch breaks it, so the ranks meet on the control
   context after destroying it (done): nobody's next client may reach rank
   0's store of the last case while that closes. */
static ddp_context *make(double timeout) {
    ddp_config c;
    ddp_context *ctx;
    memset(&c, 0, sizeof c);
    c.master_port = g_case_port;
    c.timeout_s = timeout;
    c.connect_timeout_s = 60; /* ranks that timed out in the last case come late */
    c.debug = g_detail ? DDP_DEBUG_DETAIL : DDP_DEBUG_OFF;
    c.first_bucket_bytes = 512;
    c.bucket_bytes = 4096;
    c.optimizer = ddp_optimizer_defaults(DDP_OPTIM_SGD);
    if (ddp_create(&c, &ctx) != DDP_SUCCESS) { fprintf(stderr, "ddp_create: %s\n", ddp_create_error()); exit(2); }
    return ctx;
}

static void done(ddp_context *ctx) {
    ddp_destroy(ctx);
    if (ddp_barrier(g_control) != DDP_SUCCESS) { fprintf(stderr, "control barrier: %s\n", ddp_last_error(g_control)); exit(2); }
}

/* the result of a mismatch: with fingerprints DDP_ERROR_MISMATCH naming
   both sides on every rank, quickly; without, anything but a crash */
static void expect(ddp_context *ctx, ddp_result r, const char *name, const char *side0, const char *side1, double took) {
    const char *m = ddp_last_error(ctx);
    if (g_detail) {
        CHECK(r == DDP_ERROR_MISMATCH, "%s: rank %d got %s: %s", name, g_rank, ddp_result_string(r), m);
        CHECK(strstr(m, side0) && strstr(m, side1), "%s: the message names both sides ('%s', '%s'): %s", name, side0, side1, m);
        CHECK(took < 2.5, "%s: failed at once (%.2f s, timeout 4 s)", name, took);
        if (g_rank == 0) printf("debug %-8s world=%d: %s (%.3f s)\n", name, g_world, m, took);
    } else {
        CHECK(r == DDP_SUCCESS || r == DDP_ERROR_TIMEOUT || r == DDP_ERROR_PEER, "%s: rank %d returned %s: %s", name, g_rank,
              ddp_result_string(r), m);
        if (g_rank == 0) printf("debug off %-8s world=%d: %s\n", name, g_world, ddp_result_string(r));
    }
}

static void case_kinds(void) {
    ddp_context *ctx = make(4);
    float x[10];
    double t0;
    ddp_result r;
    int i;
    TEST("kinds");
    for (i = 0; i < 10; i++) x[i] = (float)(g_rank + i);
    t0 = ddp__now();
    r = g_rank == 0 ? ddp_allreduce(ctx, x, 10, DDP_F32, DDP_OP_SUM) : ddp_broadcast(ctx, x, 10, DDP_F32, 0);
    expect(ctx, r, "kinds", "rank 0 is in ddp_allreduce", "is in ddp_broadcast", ddp__now() - t0);
    done(ctx);
}

static void case_counts(void) {
    ddp_context *ctx = make(4);
    float *x = (float *)calloc(300000, sizeof(float));
    double t0;
    ddp_result r;
    TEST("counts");
    t0 = ddp__now();
    r = ddp_allreduce(ctx, x, g_rank == 0 ? 10 : 300000, DDP_F32, DDP_OP_SUM);
    expect(ctx, r, "counts", "10 x f32", "300000 x f32", ddp__now() - t0);
    free(x);
    done(ctx);
}

static void case_dtypes(void) {
    ddp_context *ctx = make(4);
    double x[10];
    double t0;
    ddp_result r;
    TEST("dtypes");
    memset(x, 0, sizeof x);
    t0 = ddp__now();
    r = ddp_allreduce(ctx, x, 10, g_rank == 0 ? DDP_F32 : DDP_F64, DDP_OP_SUM);
    expect(ctx, r, "dtypes", "10 x f32", "10 x f64", ddp__now() - t0);
    done(ctx);
}

static void case_scatter(void) {
    ddp_context *ctx = make(4);
    float *a = (float *)calloc((size_t)g_world * 1000, sizeof(float)), *b = (float *)calloc((size_t)g_world * 1000, sizeof(float));
    double t0;
    ddp_result r;
    TEST("scatter");
    t0 = ddp__now();
    r = g_rank == 0 ? ddp_reduce_scatter(ctx, a, b, 1000, DDP_F32, DDP_OP_SUM) : ddp_allgather(ctx, a, b, 700, DDP_F32);
    expect(ctx, r, "scatter", "ddp_reduce_scatter", "ddp_allgather", ddp__now() - t0);
    free(a);
    free(b);
    done(ctx);
}

/* The ranks that did not compare learn of the mismatch from the one that
   did (white box, detail only): rank 0 runs the library's comparison on
   two fabricated fingerprints that differ, as it does when it saw every
   rank's fingerprint before a slower rank finished its scan; the others
   wait in ddp_barrier for rank 0's fingerprint, which never comes. They
   must fail with DDP_ERROR_MISMATCH and rank 0's message, not with a
   peer's failure (CI once saw "rank 0 gave up while rank 1 waited for the
   peers' fingerprints" as DDP_ERROR_PEER at world 3). */
static void case_propagate(void) {
    ddp_context *ctx = make(4);
    double t0 = ddp__now();
    ddp_result r;
    TEST("propagate");
    if (g_rank == 0) {
        ddp__fp fp[2];
        memset(fp, 0, sizeof fp);
        fp[0].seq = fp[1].seq = 1;
        fp[0].count = 10;
        fp[1].count = 20;
        fp[0].kind = fp[1].kind = DDP__FP_ALLREDUCE;
        fp[0].arg = fp[1].arg = -1;
        ddp__copy_str(fp[0].site, sizeof fp[0].site, "ddp_allreduce");
        ddp__copy_str(fp[1].site, sizeof fp[1].site, "ddp_allreduce");
        {
            int world = ctx->world;
            ctx->world = 2; /* compare these two only */
            r = ddp__fp_compare(ctx, fp, (int)sizeof fp[0]);
            ctx->world = world;
        }
    } else {
        r = ddp_barrier(ctx);
    }
    expect(ctx, r, "propagate", "rank 0 is in ddp_allreduce (collective #1: all-reduce of 10 x f32",
           "rank 1 is in ddp_allreduce (collective #1: all-reduce of 20 x f32", ddp__now() - t0);
    CHECK(ddp_barrier(ctx) == DDP_ERROR_MISMATCH, "rank %d: the broken context answers DDP_ERROR_MISMATCH after", g_rank);
    done(ctx);
}

/* steps of a small model; the last rank skips step 2; then a loss all-reduce */
static void case_skipped(int skip) {
    ddp_context *ctx = make(4);
    int id[3], s, p;
    ddp_result r = DDP_SUCCESS;
    double t0 = 0;
    float loss = 1;
    static const size_t n[3] = { 300, 20, 200 };
    TEST(skip ? "skipped" : "no mismatch");
    for (p = 0; p < 3; p++) {
        char name[16];
        snprintf(name, sizeof name, "w%d", p);
        if (ddp_register_param(ctx, name, n[p], DDP_F32, NULL, &id[p]) != DDP_SUCCESS) exit(2);
    }
    if (ddp_finalize(ctx) != DDP_SUCCESS) { fprintf(stderr, "%s\n", ddp_last_error(ctx)); exit(2); }
    for (s = 0; s < 4 && r == DDP_SUCCESS; s++) {
        if (skip && s == 2 && g_rank == g_world - 1) continue;
        t0 = ddp__now();
        r = ddp_step_begin(ctx);
        for (p = 2; p >= 0 && r == DDP_SUCCESS; p--) {
            float *g = (float *)ddp_param_grad(ctx, id[p]);
            size_t i;
            for (i = 0; i < n[p]; i++) g[i] = (float)sin((double)i + s);
            r = ddp_mark_ready(ctx, id[p]);
        }
        if (r == DDP_SUCCESS) r = ddp_step_end(ctx);
        if (r == DDP_SUCCESS) r = ddp_optimizer_step(ctx);
        if (r == DDP_SUCCESS) { t0 = ddp__now(); r = ddp_allreduce(ctx, &loss, 1, DDP_F32, DDP_OP_AVG); }
    }
    if (r == DDP_SUCCESS) { t0 = ddp__now(); r = ddp_barrier(ctx); }
    if (skip) {
        expect(ctx, r, "skipped", "gradient bucket", "ddp_barrier", ddp__now() - t0);
        if (g_detail) CHECK(strstr(ddp_last_error(ctx), "step 4") && strstr(ddp_last_error(ctx), "step 3"),
                            "the step counts show the skip: %s", ddp_last_error(ctx));
    } else {
        CHECK(r == DDP_SUCCESS, "with fingerprints and no mismatch, the run goes through: %s", ddp_last_error(ctx));
    }
    done(ctx);
}

int main(int argc, char **argv) {
    const char *r = getenv("RANK"), *w = getenv("WORLD_SIZE");
    char suite[64];
    g_rank = r ? atoi(r) : 0;
    g_world = w ? atoi(w) : 1;
    if (argc != 2 || (strcmp(argv[1], "detail") && strcmp(argv[1], "off"))) { fprintf(stderr, "usage: test_debug detail|off\n"); return 2; }
    g_detail = !strcmp(argv[1], "detail");
    if (g_world < 2) { printf("test_debug needs 2 or more ranks\n"); return 77; }
    g_control = t_control_context(&g_case_port);
    if (g_detail) case_skipped(0);
    if (g_detail) case_propagate();
    case_kinds();
    case_counts();
    case_dtypes();
    case_scatter();
    case_skipped(1);
    ddp_destroy(g_control); /* the last barrier was done()'s */
    {
        /* the environment variable: a bad value is named */
        ddp_config c;
        ddp_context *ctx = NULL;
        TEST("DDP_DEBUG");
        memset(&c, 0, sizeof c);
        c.world_size = 1;
        t_setenv("DDP_DEBUG", "verbose");
        CHECK_ERR(ddp_create(&c, &ctx), DDP_ERROR_ENVIRONMENT, NULL, "DDP_DEBUG");
        t_setenv("DDP_DEBUG", "detail");
        CHECK_OK(ddp_create(&c, &ctx), NULL);
        if (ctx) { CHECK(ddp_query_config(ctx).debug == DDP_DEBUG_DETAIL, "DDP_DEBUG=detail is in force"); ddp_destroy(ctx); }
        t_unsetenv("DDP_DEBUG");
    }
    snprintf(suite, sizeof suite, "test_debug %s rank %d", argv[1], g_rank);
    return t_summary(suite);
}
