/* The bucket order learned from the first step, on N ranks under the
   launcher:

       ddprun -n N test_order

   A model registered in scrambled order (its backward marks the
   parameters in quite another order than reverse registration):
     - step 1 runs the registration-order buckets: the first launch comes
       late (a bucket waits for a parameter marked near the end);
     - from step 2 every bucket launches inside the ddp_mark_ready() call
       that completes it, buckets in mark order (0, 1, 2, ...), seen
       through the DEBUG log's "launch bucket" lines;
     - the weights are the same bits as with config.static_bucket_order
       (and with ZeRO-1 on top);
     - the parameter pointers you took after ddp_finalize() stay valid;
     - a rank that marks in another order in the first step is told so in
       a DEBUG line, and every rank uses rank 0's order.
   Each rank checks itself. */
#define DDP_IMPLEMENTATION
#include "../ddp.h"
#include "testing.h"
#include <math.h>

enum { NP = 8, STEPS = 4 };
/* forward order a..d (weight, bias); registered scrambled, the first
   layer's weight last: in reverse registration order it opens bucket 0,
   but the backward marks it last */
static const char *const reg_names[NP] = { "c.weight", "d.bias", "b.weight", "c.bias", "b.bias", "d.weight", "a.bias", "a.weight" };
static const size_t reg_sizes[NP] = { 700, 30, 600, 50, 45, 500, 40, 800 };
/* backward marks the last layer first (registration ids) */
static const char *const mark_names[NP] = { "d.bias", "d.weight", "c.bias", "c.weight", "b.bias", "b.weight", "a.bias", "a.weight" };
static int mark_ids[NP];

static int g_rank, g_world;
static int g_marks_done;                    /* marks so far in this step */
static int g_launch_at[64], g_launch_b[64], g_nlaunch;
static int g_told_other_order;

static void logger(ddp_log_level lvl, int rank, const char *msg, void *user) {
    (void)lvl; (void)rank; (void)user;
    if (!strncmp(msg, "launch bucket ", 14) && g_nlaunch < 64) {
        g_launch_b[g_nlaunch] = atoi(msg + 14);
        g_launch_at[g_nlaunch++] = g_marks_done;
    }
    if (strstr(msg, "another order than rank 0")) g_told_other_order = 1;
}

typedef struct run_result { float w[NP][800]; } run_result;

static void run(int static_order, int zero, int other_order_on_rank1, run_result *out, int check_launches) {
    ddp_config c;
    ddp_context *ctx;
    int id[NP], p, s;
    float *wp[NP], *gp[NP];
    memset(&c, 0, sizeof c);
    c.timeout_s = 30;
    c.first_bucket_bytes = 1000;  /* several buckets */
    c.bucket_bytes = 2500;
    c.static_bucket_order = static_order;
    c.zero_stage = zero;
    c.optimizer = ddp_optimizer_defaults(DDP_OPTIM_ADAMW);
    c.optimizer.lr = 0.01;
    c.logger.func = logger;
    c.logger.level = DDP_LOG_DEBUG;
    if (ddp_create(&c, &ctx) != DDP_SUCCESS) { fprintf(stderr, "ddp_create: %s\n", ddp_create_error()); exit(2); }
    static float init_all[NP][800]; /* read at ddp_finalize */
    for (p = 0; p < NP; p++) {
        float *init = init_all[p];
        size_t i;
        for (i = 0; i < reg_sizes[p]; i++) init[i] = (float)cos(0.1 * (double)i + p);
        if (ddp_register_param(ctx, reg_names[p], reg_sizes[p], DDP_F32, init, &id[p]) != DDP_SUCCESS ||
            (p == NP - 1 && ddp_finalize(ctx) != DDP_SUCCESS)) {
            fprintf(stderr, "model: %s\n", ddp_last_error(ctx));
            exit(2);
        }
    }
    /* pointers taken once, after ddp_finalize, as examples/fashion_mlp does */
    for (p = 0; p < NP; p++) { wp[p] = (float *)ddp_param_data(ctx, id[p]); gp[p] = (float *)ddp_param_grad(ctx, id[p]); }
    for (s = 0; s < STEPS; s++) {
        int k, nb;
        g_nlaunch = 0;
        g_marks_done = 0;
        CHECK_OK(ddp_step_begin(ctx), ctx);
        for (k = 0; k < NP; k++) {
            /* rank 1 may mark in another order in the first step (its last two swapped) */
            int q = other_order_on_rank1 && g_rank == 1 && s == 0 && k >= NP - 2 ? mark_ids[2 * NP - 3 - k] : mark_ids[k];
            size_t i;
            for (i = 0; i < reg_sizes[q]; i++) gp[q][i] += (float)(wp[q][i] - sin(0.3 * (double)i + s + 0.5 * g_rank)) * 0.1f;
            g_marks_done++;
            CHECK_OK(ddp_mark_ready(ctx, id[q]), ctx);
        }
        CHECK_OK(ddp_step_end(ctx), ctx);
        CHECK_OK(ddp_optimizer_step(ctx), ctx);
        nb = ddp_bucket_count(ctx);
        if (!check_launches) continue;
        if (s == 0) {
            /* registration order: bucket 0 holds the last registered parameters, among them one marked late */
            CHECK(g_nlaunch == nb && g_launch_at[0] == NP, "step 1: the first launch after %d of %d marks", g_launch_at[0], NP);
        } else {
            /* learned: bucket k launches as soon as its last parameter is marked, in order */
            int b, done = 0, ok = g_nlaunch == nb;
            for (b = 0; b < nb && ok; b++) {
                int np_b = 0;
                CHECK_OK(ddp_bucket_info(ctx, b, NULL, NULL, NULL, &np_b), ctx);
                done += np_b;
                ok = g_launch_b[b] == b && g_launch_at[b] == done;
            }
            CHECK(ok, "step %d: buckets launch in mark order, each at its last mark (%d launches of %d buckets, first after %d marks)",
                  s + 1, g_nlaunch, nb, g_nlaunch ? g_launch_at[0] : -1);
            CHECK(ddp_param_bucket(ctx, id[mark_ids[0]]) == 0 && ddp_param_bucket(ctx, id[mark_ids[NP - 1]]) == nb - 1,
                  "the first marked parameter is in bucket 0, the last in the last bucket");
        }
    }
    if (check_launches) {
        /* the learned buckets are ranges of the unmoved flat buffers */
        int b, multi = 0;
        size_t off, bytes;
        for (b = 0; b < ddp_bucket_count(ctx); b++) multi |= ddp_bucket_range(ctx, b, 1, &off, &bytes) == DDP_SUCCESS;
        CHECK(multi, "a learned bucket spans several ranges of the flat buffers");
        for (p = 0; p < NP; p++)
            CHECK(ddp_param_data(ctx, id[p]) == (void *)wp[p] && ddp_param_grad(ctx, id[p]) == (void *)gp[p], "pointers of %s unchanged", reg_names[p]);
    }
    for (p = 0; p < NP; p++) memcpy(out->w[p], wp[p], reg_sizes[p] * sizeof(float));
    ddp_destroy(ctx);
}

static run_result g_a, g_b;

int main(void) {
    const char *r = getenv("RANK"), *w = getenv("WORLD_SIZE");
    char suite[64];
    int p, same;
    g_rank = r ? atoi(r) : 0;
    g_world = w ? atoi(w) : 1;
    for (p = 0; p < NP; p++) {
        int k;
        for (k = 0; k < NP; k++) if (!strcmp(mark_names[p], reg_names[k])) mark_ids[p] = k;
    }

    TEST("learned order");
    run(0, 0, 0, &g_a, 1);
    CHECK(!g_told_other_order, "every rank marked in rank 0's order");
    TEST("static order");
    run(1, 0, 0, &g_b, 0);
    for (same = 1, p = 0; p < NP; p++) same &= memcmp(g_a.w[p], g_b.w[p], reg_sizes[p] * sizeof(float)) == 0;
    CHECK(same, "learned and registration order give the same weights, bit for bit");
    if (g_rank == 0) printf("order world=%d learned == static bitwise: %s\n", g_world, same ? "yes" : "NO");

    TEST("learned order with ZeRO-1");
    run(0, 1, 0, &g_b, 1);
    for (same = 1, p = 0; p < NP; p++) same &= memcmp(g_a.w[p], g_b.w[p], reg_sizes[p] * sizeof(float)) == 0;
    CHECK(same, "with ZeRO-1 too");

    TEST("ranks disagree in the first step");
    g_told_other_order = 0;
    run(0, 0, 1, &g_b, 0);
    CHECK(g_told_other_order == (g_rank == 1 && g_world > 1), "rank %d told: %d", g_rank, g_told_other_order);
    /* the order of the marks changes no value: rank 0's order everywhere, the same weights */
    for (same = 1, p = 0; p < NP; p++) same &= memcmp(g_a.w[p], g_b.w[p], reg_sizes[p] * sizeof(float)) == 0;
    CHECK(same, "the same weights when ranks disagreed on the first step's order");
    snprintf(suite, sizeof suite, "test_order rank %d", g_rank);
    return t_summary(suite);
}
