/* Communication hooks (ddp_register_comm_hook), on N ranks under the
   launcher:

       ddprun -n N test_hooks

   - a hook of the test's own (multiply by the scale, then sum) gets every
     bucket with the right arguments and trains as the built-in average does
     (the same bits when the scale is a power of two, 1e-6 otherwise);
   - ddp_comm_hook_allreduce is the built-in average, bit for bit;
   - ddp_comm_hook_bf16 / _fp16 train within 16-bit tolerance of f32, move
     half the bytes, and config.compress selects them;
   - hooks see a bucket of several ranges (learned order) as one span;
   - with ZeRO-1, a hook's result is what the sharded optimizer uses;
   - a hook that fails on one rank fails the step on every rank with
     DDP_ERROR_USER, well within the timeout.
   Each rank checks itself. */
#define DDP_IMPLEMENTATION
#include "../ddp.h"
#include "testing.h"
#include <math.h>

enum { NP = 5, STEPS = 6, MAXN = 3000 };
static const size_t sizes[NP] = { 3000, 60, 1500, 40, 700 };

static int g_rank, g_world;

typedef struct weights { float w[NP][MAXN]; ddp_step_stats st; } weights;

/* the test's hook: records what it gets, multiplies by the scale, sums */
typedef struct my_hook {
    int calls, bad_args, fail_at_call, fail_rank;
    size_t counts[256];
} my_hook;

static ddp_result scale_then_sum(const ddp_comm_bucket *b, void *state) {
    my_hook *h = (my_hook *)state;
    float *g = (float *)b->grad;
    size_t i;
    if (h->fail_at_call >= 0 && h->calls == h->fail_at_call && b->rank == h->fail_rank) { h->calls++; return DDP_ERROR_INVALID_STATE; }
    if (b->rank != g_rank || b->world != g_world || b->dtype != DDP_F32 || !b->grad || b->count == 0 || b->on_device || !b->allreduce)
        h->bad_args++;
    if (h->calls < 256) h->counts[h->calls] = b->count;
    h->calls++;
    for (i = 0; i < b->count; i++) g[i] *= (float)b->scale;
    return b->allreduce(b->comm, g, b->count, DDP_F32, DDP_OP_SUM, 1.0);
}

/* which: 0 none, 1 the test's, 2 ddp_comm_hook_allreduce, 3 bf16, 4 fp16, 5 config.compress = bf16 */
static ddp_result train(int which, int zero, int scrambled, int micro, my_hook *h, weights *out) {
    static const int order[NP] = { 3, 0, 4, 1, 2 }; /* scrambled registration */
    static const char *const names[NP] = { "p0", "p1", "p2", "p3", "p4" };
    ddp_config c;
    ddp_context *ctx;
    int id[NP], p, s, m, k;
    ddp_result r = DDP_SUCCESS;
    memset(&c, 0, sizeof c);
    c.timeout_s = 30;
    c.first_bucket_bytes = 2048;  /* several buckets */
    c.bucket_bytes = 6000;
    c.zero_stage = zero;
    c.optimizer = ddp_optimizer_defaults(DDP_OPTIM_SGD);
    c.optimizer.lr = 0.05;
    c.optimizer.momentum = 0.9;
    if (which == 5) c.compress = DDP_BF16;
    if (ddp_create(&c, &ctx) != DDP_SUCCESS) { fprintf(stderr, "ddp_create: %s\n", ddp_create_error()); exit(2); }
    static float init_all[NP][MAXN]; /* read at ddp_finalize */
    for (k = 0; k < NP; k++) {
        float *init;
        size_t i;
        p = scrambled ? order[k] : k;
        init = init_all[p];
        for (i = 0; i < sizes[p]; i++) init[i] = (float)(0.5 * cos(0.07 * (double)i + p));
        if (ddp_register_param(ctx, names[p], sizes[p], DDP_F32, init, &id[p]) != DDP_SUCCESS) { fprintf(stderr, "%s\n", ddp_last_error(ctx)); exit(2); }
    }
    if (ddp_finalize(ctx) != DDP_SUCCESS) { fprintf(stderr, "%s\n", ddp_last_error(ctx)); exit(2); }
    if (which == 1) CHECK_OK(ddp_register_comm_hook(ctx, scale_then_sum, h), ctx);
    if (which == 2) CHECK_OK(ddp_register_comm_hook(ctx, ddp_comm_hook_allreduce, NULL), ctx);
    if (which == 3) CHECK_OK(ddp_register_comm_hook(ctx, ddp_comm_hook_bf16, NULL), ctx);
    if (which == 4) CHECK_OK(ddp_register_comm_hook(ctx, ddp_comm_hook_fp16, NULL), ctx);
    for (s = 0; s < STEPS && r == DDP_SUCCESS; s++) {
        for (m = 0; m < micro && r == DDP_SUCCESS; m++) {
            r = ddp_set_no_sync(ctx, m < micro - 1);
            if (r == DDP_SUCCESS) r = ddp_step_begin(ctx);
            if (r == DDP_SUCCESS && s == 0 && m == 0) {
                /* not inside a step */
                ddp_result e = ddp_register_comm_hook(ctx, NULL, NULL);
                CHECK(e == DDP_ERROR_INVALID_STATE, "ddp_register_comm_hook inside a step: %s", ddp_result_string(e));
            }
            for (p = NP - 1; p >= 0 && r == DDP_SUCCESS; p--) {
                float *g = (float *)ddp_param_grad(ctx, id[p]);
                const float *w = (const float *)ddp_param_data(ctx, id[p]);
                size_t i;
                for (i = 0; i < sizes[p]; i++)
                    g[i] += (float)((w[i] - sin(0.13 * (double)i + 0.7 * s + 0.3 * m + 0.9 * g_rank)) * (1.0 + 0.2 * p));
                r = ddp_mark_ready(ctx, id[p]);
            }
            if (r == DDP_SUCCESS) r = ddp_step_end(ctx);
        }
        if (r == DDP_SUCCESS) r = ddp_optimizer_step(ctx);
    }
    if (r == DDP_SUCCESS) {
        for (p = 0; p < NP; p++) memcpy(out->w[p], ddp_param_data(ctx, id[p]), sizes[p] * sizeof(float));
        ddp_get_step_stats(ctx, NULL, &out->st);
    } else if (h) {
        /* keep the message for the caller */
        fprintf(stderr, "rank %d: %s: %s\n", g_rank, ddp_result_string(r), ddp_last_error(ctx));
        CHECK(strstr(ddp_last_error(ctx), "communication hook") != NULL, "the message names the hook: %s", ddp_last_error(ctx));
    }
    ddp_destroy(ctx);
    return r;
}

/* max |a - b| / max |b| */
static double rel(const weights *a, const weights *b) {
    double d = 0, m = 1e-30;
    int p;
    size_t i;
    for (p = 0; p < NP; p++)
        for (i = 0; i < sizes[p]; i++) {
            double e = fabs((double)a->w[p][i] - (double)b->w[p][i]);
            if (e > d || e != e) d = e != e ? 1e30 : e;
            if (fabs(b->w[p][i]) > m) m = fabs(b->w[p][i]);
        }
    return d / m;
}

static int same(const weights *a, const weights *b) {
    int p, ok = 1;
    for (p = 0; p < NP; p++) ok &= memcmp(a->w[p], b->w[p], sizes[p] * sizeof(float)) == 0;
    return ok;
}

static weights g_ref, g_x, g_y;

int main(void) {
    const char *rs = getenv("RANK"), *ws = getenv("WORLD_SIZE");
    char suite[64];
    my_hook h;
    double d;
    int pow2, k;
    g_rank = rs ? atoi(rs) : 0;
    g_world = ws ? atoi(ws) : 1;
    pow2 = (g_world & (g_world - 1)) == 0;

    TEST("reference (no hook)");
    CHECK_OK(train(0, 0, 0, 1, NULL, &g_ref), NULL);

    TEST("the test's hook: scale, then sum");
    memset(&h, 0, sizeof h);
    h.fail_at_call = -1;
    CHECK_OK(train(1, 0, 0, 1, &h, &g_x), NULL);
    d = rel(&g_x, &g_ref);
    CHECK(h.calls > 0 && h.calls % STEPS == 0 && h.bad_args == 0, "hook calls %d, bad arguments %d", h.calls, h.bad_args);
    CHECK(pow2 ? same(&g_x, &g_ref) : d <= 1e-6, "scale-then-sum equals the built-in average (rel diff %.3g, world %d)", d, g_world);
    CHECK(g_x.st.bytes == g_ref.st.bytes, "the hook's all-reduces moved the buckets' bytes: %llu vs %llu",
          (unsigned long long)g_x.st.bytes, (unsigned long long)g_ref.st.bytes);
    if (g_rank == 0) printf("hooks world=%d scale_then_sum rel_diff=%.3g bitwise=%s calls=%d\n", g_world, d, same(&g_x, &g_ref) ? "yes" : "no", h.calls);
    {
        /* inside ddp_train_step-like windows of 2 micro-steps the scale is 1 / (2 world) */
        weights ref2;
        memset(&h, 0, sizeof h);
        h.fail_at_call = -1;
        CHECK_OK(train(0, 0, 0, 2, NULL, &ref2), NULL);
        CHECK_OK(train(1, 0, 0, 2, &h, &g_x), NULL);
        CHECK(rel(&g_x, &ref2) <= 1e-6, "with no_sync windows too (%.3g)", rel(&g_x, &ref2));
    }

    TEST("ddp_comm_hook_allreduce");
    CHECK_OK(train(2, 0, 0, 1, NULL, &g_x), NULL);
    CHECK(same(&g_x, &g_ref), "the built-in average as a hook: the same bits");

    TEST("ddp_comm_hook_bf16 and _fp16");
    for (k = 3; k <= 5; k++) {
        CHECK_OK(train(k, 0, 0, 1, NULL, &g_x), NULL);
        d = rel(&g_x, &g_ref);
        CHECK(d <= (k == 4 ? 2e-3 : 1e-2), "%s within 16-bit tolerance of f32 training: %.3g", k == 4 ? "fp16" : "bf16", d);
        CHECK(g_world == 1 || d > 0, "the compression shows (%.3g)", d);
        CHECK(g_x.st.bytes * 2 == g_ref.st.bytes, "half the bytes: %llu vs %llu", (unsigned long long)g_x.st.bytes, (unsigned long long)g_ref.st.bytes);
        if (k == 3) g_y = g_x;
        if (k == 5) CHECK(same(&g_x, &g_y), "config.compress = DDP_BF16 is the bf16 hook");
        if (g_rank == 0) printf("hooks world=%d %s rel_diff_vs_f32=%.3g bytes=%llu (f32 %llu)\n", g_world,
                                k == 3 ? "bf16" : k == 4 ? "fp16" : "config.compress=bf16", d,
                                (unsigned long long)g_x.st.bytes, (unsigned long long)g_ref.st.bytes);
    }

    TEST("learned order: a bucket of several ranges, packed");
    {
        weights scr;
        memset(&h, 0, sizeof h);
        h.fail_at_call = -1;
        CHECK_OK(train(0, 0, 1, 1, NULL, &scr), NULL);
        CHECK(same(&scr, &g_ref), "scrambled registration, no hook: the same bits");
        CHECK_OK(train(2, 0, 1, 1, NULL, &g_x), NULL);
        CHECK(same(&g_x, &g_ref), "scrambled registration, ddp_comm_hook_allreduce on packed buckets: the same bits");
        CHECK_OK(train(1, 0, 1, 1, &h, &g_x), NULL);
        CHECK(h.bad_args == 0 && (pow2 ? same(&g_x, &g_ref) : rel(&g_x, &g_ref) <= 1e-6), "the test's hook on packed buckets");
    }

    TEST("ZeRO-1 with hooks");
    CHECK_OK(train(2, 1, 0, 1, NULL, &g_x), NULL);
    CHECK(same(&g_x, &g_ref), "ZeRO-1 + ddp_comm_hook_allreduce: the same bits");
    CHECK_OK(train(3, 1, 0, 1, NULL, &g_x), NULL);
    CHECK(same(&g_x, &g_y), "ZeRO-1 + bf16: the unsharded bf16 run's bits");

    TEST("a hook that fails on one rank");
    {
        double t0 = ddp__now(), took;
        ddp_result r;
        memset(&h, 0, sizeof h);
        h.fail_at_call = 7;              /* in the second step */
        h.fail_rank = g_world - 1;
        r = train(1, 0, 0, 1, &h, &g_x);
        took = ddp__now() - t0;
        CHECK(r == DDP_ERROR_USER, "rank %d: the step fails with DDP_ERROR_USER, got %s", g_rank, ddp_result_string(r));
        CHECK(took < 10, "no hang: %.1f s (timeout 30 s)", took);
        if (g_rank == 0) printf("hooks world=%d failing hook on rank %d: %s on rank 0 after %.2f s\n", g_world, g_world - 1,
                                ddp_result_string(r), took);
    }
    snprintf(suite, sizeof suite, "test_hooks rank %d", g_rank);
    return t_summary(suite);
}
