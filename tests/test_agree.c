/* The configuration every rank must share (see AGREEMENT in ddp.h), on
   N >= 2 ranks under the launcher:

       ddprun -n N test_agree

   Cases, one context each: the last rank differs from the others in one
   field (config.zero_stage, DDP_ZERO_STAGE, config.debug, config.compress,
   config.bucket_bytes, config.optimizer.lr, config.optimizer.max_grad_norm,
   config.loss_scale.enabled, a communication hook). ddp_finalize must fail
   on every rank with DDP_ERROR_MISMATCH, quickly (the timeout is 30 s), and
   the message must name the field, rank 0, the last rank and both values.
   First, the same non-default configuration on every rank: ddp_finalize
   succeeds and a step goes through. */
#define DDP_IMPLEMENTATION
#include "../ddp.h"
#include "testing.h"

static int g_rank, g_world;
static ddp_context *g_control; /* never mismatched: the barrier between the cases */
static int g_case_port;        /* the cases' port: a free one rank 0 took and broadcast on the control context
                                  (not MASTER_PORT + 1, which a client socket may hold as its local port) */

typedef void (*mutate_fn)(ddp_config *c);

static void base(ddp_config *c) {
    memset(c, 0, sizeof *c);
    c->master_port = g_case_port;
    c->timeout_s = 30;
    c->connect_timeout_s = 60; /* ranks come late after a failed case */
    c->debug = DDP_DEBUG_OFF;
    c->first_bucket_bytes = 512;
    c->bucket_bytes = 4096;
    c->optimizer = ddp_optimizer_defaults(DDP_OPTIM_SGD);
    c->optimizer.lr = 0.1;
}

/* a case's context, on g_case_port; the ranks meet on the control
   context after destroying it (as tests/test_debug.c) */
static ddp_context *make(mutate_fn differ, const char *env, const char *env_value) {
    ddp_config c;
    ddp_context *ctx;
    base(&c);
    if (g_rank == g_world - 1 && differ) differ(&c);
    if (g_rank == g_world - 1 && env) t_setenv(env, env_value);
    if (ddp_create(&c, &ctx) != DDP_SUCCESS) { fprintf(stderr, "ddp_create: %s\n", ddp_create_error()); exit(2); }
    if (env) t_unsetenv(env);
    return ctx;
}

static void done(ddp_context *ctx) {
    ddp_destroy(ctx);
    if (ddp_barrier(g_control) != DDP_SUCCESS) { fprintf(stderr, "control barrier: %s\n", ddp_last_error(g_control)); exit(2); }
}

static void reg(ddp_context *ctx, int *id) {
    if (ddp_register_param(ctx, "w", 1000, DDP_F32, NULL, &id[0]) != DDP_SUCCESS ||
        ddp_register_param(ctx, "b", 10, DDP_F32, NULL, &id[1]) != DDP_SUCCESS) {
        fprintf(stderr, "register: %s\n", ddp_last_error(ctx));
        exit(2);
    }
}

/* one field differs on the last rank: every rank fails at once, naming it */
static void mismatch(const char *name, mutate_fn differ, const char *env, const char *env_value, int hook,
                     const char *field, const char *v0, const char *vlast) {
    ddp_context *ctx = make(differ, env, env_value);
    int id[2];
    double t0, took;
    ddp_result r;
    const char *m;
    char who[32];
    TEST(name);
    reg(ctx, id);
    if (hook && g_rank == g_world - 1) CHECK_OK(ddp_register_comm_hook(ctx, ddp_comm_hook_allreduce, NULL), ctx);
    t0 = ddp__now();
    r = ddp_finalize(ctx);
    took = ddp__now() - t0;
    m = ddp_last_error(ctx);
    snprintf(who, sizeof who, "on rank %d", g_world - 1);
    CHECK(r == DDP_ERROR_MISMATCH, "%s: rank %d got %s: %s", name, g_rank, ddp_result_string(r), m);
    CHECK(strstr(m, field) != NULL, "%s: the message names %s: %s", name, field, m);
    CHECK(strstr(m, "on rank 0") && strstr(m, who), "%s: the message names rank 0 and rank %d: %s", name, g_world - 1, m);
    {
        char a[96], b[96];
        snprintf(a, sizeof a, "is %s on rank 0", v0);
        snprintf(b, sizeof b, "but %s on rank %d", vlast, g_world - 1);
        CHECK(strstr(m, a) && strstr(m, b), "%s: the message has both values ('%s', '%s'): %s", name, a, b, m);
    }
    CHECK(took < 10, "%s: failed at once (%.2f s, timeout 30 s)", name, took);
    if (g_rank == 0) printf("agree %-14s world=%d: %s (%.3f s)\n", name, g_world, m, took);
    /* broken: only ddp_destroy is allowed */
    CHECK(ddp_barrier(ctx) != DDP_SUCCESS, "%s: the context is broken after the mismatch", name);
    done(ctx);
}

static void d_zero(ddp_config *c) { c->zero_stage = 1; }
static void d_debug(ddp_config *c) { c->debug = DDP_DEBUG_DETAIL; }
static void d_compress(ddp_config *c) { c->compress = DDP_BF16; }
static void d_bucket(ddp_config *c) { c->bucket_bytes = 8192; }
static void d_lr(ddp_config *c) { c->optimizer.lr = 0.2; }
static void d_clip(ddp_config *c) { c->optimizer.max_grad_norm = 1.0; }
static void d_scale(ddp_config *c) { c->loss_scale.enabled = 1; }

/* everything non-default, the same everywhere: no false alarm */
static void d_all(ddp_config *c) {
    c->zero_stage = 1;
    c->compress = DDP_BF16;
    c->optimizer.max_grad_norm = 1.0;
    c->optimizer.momentum = 0.9;
    c->loss_scale.enabled = 1;
    c->schedule.type = DDP_SCHEDULE_COSINE;
    c->schedule.total_steps = 100;
}

static void equal(void) {
    ddp_config c;
    ddp_context *ctx;
    int id[2], s;
    ddp_result r;
    TEST("equal");
    base(&c);
    d_all(&c);
    if (ddp_create(&c, &ctx) != DDP_SUCCESS) { fprintf(stderr, "ddp_create: %s\n", ddp_create_error()); exit(2); }
    reg(ctx, id);
    r = ddp_finalize(ctx);
    CHECK(r == DDP_SUCCESS, "equal configurations pass: %s", ddp_last_error(ctx));
    for (s = 0; s < 2 && r == DDP_SUCCESS; s++) {
        r = ddp_step_begin(ctx);
        if (r == DDP_SUCCESS) r = ddp_mark_ready(ctx, id[1]);
        if (r == DDP_SUCCESS) r = ddp_mark_ready(ctx, id[0]);
        if (r == DDP_SUCCESS) r = ddp_step_end(ctx);
        if (r == DDP_SUCCESS) r = ddp_optimizer_step(ctx);
        CHECK(r == DDP_SUCCESS, "a step with equal configurations: %s", ddp_last_error(ctx));
    }
    done(ctx);
}

int main(void) {
    const char *r = getenv("RANK"), *w = getenv("WORLD_SIZE");
    char suite[64];
    g_rank = r ? atoi(r) : 0;
    g_world = w ? atoi(w) : 1;
    if (g_world < 2) { printf("test_agree needs 2 or more ranks\n"); return 77; }
    t_unsetenv("DDP_ZERO_STAGE");
    t_unsetenv("DDP_DEBUG");
    g_control = t_control_context(&g_case_port);
    equal();
    mismatch("zero_stage", d_zero, NULL, NULL, 0, "config.zero_stage", "0", "1");
    mismatch("DDP_ZERO_STAGE", NULL, "DDP_ZERO_STAGE", "1", 0, "DDP_ZERO_STAGE", "0", "1");
    mismatch("debug", d_debug, NULL, NULL, 0, "config.debug", "off", "detail");
    mismatch("compress", d_compress, NULL, NULL, 0, "config.compress", "none", "bf16");
    mismatch("bucket_bytes", d_bucket, NULL, NULL, 0, "config.bucket_bytes", "4096", "8192");
    mismatch("lr", d_lr, NULL, NULL, 0, "config.optimizer.lr", "0.1", "0.2");
    mismatch("max_grad_norm", d_clip, NULL, NULL, 0, "config.optimizer.max_grad_norm", "0", "1");
    mismatch("loss_scale", d_scale, NULL, NULL, 0, "config.loss_scale.enabled", "0", "1");
    mismatch("hook", NULL, NULL, NULL, 1, "communication hook", "none", "ddp_comm_hook_allreduce");
    ddp_destroy(g_control); /* the last barrier was done()'s */
    snprintf(suite, sizeof suite, "test_agree rank %d", g_rank);
    return t_summary(suite);
}
