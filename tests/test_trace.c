/* The timeline (config.trace_path / DDP_TRACE) and the step statistics,
   on N ranks under the launcher:

       ddprun -n N test_trace DIR

   Trains a small model in several buckets: synced steps, one window with
   a no_sync micro-step, an optimizer step each, a checkpoint, a collective
   of its own; checks ddp_get_step_stats against what it did, and writes
   DIR/trace.rank<r>.json (the timeline) and DIR/info.rank<r>.json (what a
   checker must find in it: counts, bytes, the statistics).
   tests/trace_check.py then reads both with Python's json module. A second
   context with a ring of 20 events must drop events and say so. */
#define DDP_IMPLEMENTATION
#include "../ddp.h"
#include "testing.h"
#include <math.h>

enum { NP = 4, STEPS = 5 };
static const size_t sizes[NP] = { 3000, 100, 2000, 50 };

static int g_rank, g_world;

static ddp_context *make(const char *trace, size_t ring, int *id) {
    ddp_config c;
    ddp_context *ctx;
    int p;
    memset(&c, 0, sizeof c);
    c.timeout_s = 30;
    c.first_bucket_bytes = 256; /* buckets {layer1.*}, {layer0.bias}, {layer0.weight} */
    c.bucket_bytes = 300;
    c.optimizer = ddp_optimizer_defaults(DDP_OPTIM_SGD);
    c.optimizer.lr = 0.01;
    c.trace_path = trace;
    c.trace_events = ring;
    if (ddp_create(&c, &ctx) != DDP_SUCCESS) { fprintf(stderr, "ddp_create: %s\n", ddp_create_error()); exit(2); }
    for (p = 0; p < NP; p++) {
        char name[32];
        snprintf(name, sizeof name, "layer%d.%s", p / 2, p % 2 ? "bias" : "weight");
        if (ddp_register_param(ctx, name, sizes[p], DDP_F32, NULL, &id[p]) != DDP_SUCCESS) { fprintf(stderr, "%s\n", ddp_last_error(ctx)); exit(2); }
    }
    if (ddp_finalize(ctx) != DDP_SUCCESS) { fprintf(stderr, "%s\n", ddp_last_error(ctx)); exit(2); }
    return ctx;
}

/* a micro-step: some work, then each gradient marked (last layer first) */
static void micro(ddp_context *ctx, const int *id, int s) {
    int p;
    CHECK_OK(ddp_step_begin(ctx), ctx);
    for (p = NP - 1; p >= 0; p--) {
        float *g = (float *)ddp_param_grad(ctx, id[p]);
        size_t i;
        volatile double spin = 0;
        for (i = 0; i < 20000; i++) spin += sin((double)i); /* backward takes a while */
        for (i = 0; i < sizes[p]; i++) g[i] += (float)(0.001 * (double)(i % 7) + 0.01 * s + 0.1 * g_rank);
        CHECK_OK(ddp_mark_ready(ctx, id[p]), ctx);
    }
    CHECK_OK(ddp_step_end(ctx), ctx);
}

int main(int argc, char **argv) {
    const char *r = getenv("RANK"), *w = getenv("WORLD_SIZE");
    char trace[512], info[512], ckpt[512], suite[64];
    ddp_context *ctx;
    ddp_step_stats last, total;
    int id[NP], s, b, nb, micro_steps = 0;
    uint64_t bucket_bytes = 0;
    float x = 1;
    FILE *f;
    memset(&last, 0, sizeof last);
    memset(&total, 0, sizeof total);
    g_rank = r ? atoi(r) : 0;
    g_world = w ? atoi(w) : 1;
    if (argc != 2) { fprintf(stderr, "usage: test_trace DIR\n"); return 2; }
    snprintf(trace, sizeof trace, "%s/trace.json", argv[1]);
    snprintf(ckpt, sizeof ckpt, "%s/model.ckpt", argv[1]);
    TEST("timeline");
    ctx = make(trace, 0, id);
    nb = ddp_bucket_count(ctx);
    for (b = 0; b < nb; b++) {
        size_t bytes = 0;
        CHECK_OK(ddp_bucket_info(ctx, b, NULL, &bytes, NULL, NULL), ctx);
        bucket_bytes += bytes;
    }
    CHECK(nb >= 3, "several buckets (%d)", nb);
    for (s = 0; s < STEPS; s++) {
        if (s == 2) { /* a window of two micro-steps: no_sync, then synced */
            CHECK_OK(ddp_set_no_sync(ctx, 1), ctx);
            micro(ctx, id, s);
            micro_steps++;
            CHECK_OK(ddp_set_no_sync(ctx, 0), ctx);
        }
        micro(ctx, id, s);
        micro_steps++;
        CHECK_OK(ddp_optimizer_step(ctx), ctx);
    }
    CHECK_OK(ddp_allreduce(ctx, &x, 1, DDP_F32, DDP_OP_SUM), ctx);
    CHECK_OK(ddp_save_checkpoint(ctx, ckpt), ctx);
    CHECK_OK(ddp_trace_flush(ctx), ctx);
    CHECK_OK(ddp_get_step_stats(ctx, &last, &total), ctx);
    CHECK(total.steps == STEPS && last.steps == 1, "synced steps counted: %lld (last %lld)", (long long)total.steps, (long long)last.steps);
    CHECK(total.bytes == (uint64_t)STEPS * bucket_bytes && last.bytes == bucket_bytes,
          "bytes reduced: %llu, want %d x %llu", (unsigned long long)total.bytes, STEPS, (unsigned long long)bucket_bytes);
    CHECK(total.comm_s > 0 && total.compute_s > 0 && total.exposed_s > 0 && total.optimizer_s > 0,
          "times: compute %g comm %g exposed %g optimizer %g", total.compute_s, total.comm_s, total.exposed_s, total.optimizer_s);
    CHECK(last.compute_s <= total.compute_s && last.comm_s <= total.comm_s, "the last step is part of the total");
    CHECK(strstr(ddp_query_config(ctx).trace_path, "trace.rank") != NULL, "the rank's file: %s", ddp_query_config(ctx).trace_path);
    /* what the checker must find */
    snprintf(info, sizeof info, "%s/info.rank%d.json", argv[1], g_rank);
    f = fopen(info, "w");
    CHECK(f != NULL, "write %s", info);
    if (f) {
        fprintf(f, "{\"rank\":%d,\"world\":%d,\"params\":%d,\"buckets\":%d,\"synced_steps\":%d,\"micro_steps\":%d,"
                   "\"bucket_bytes\":%llu,\"comm_s\":%.9f,\"compute_s\":%.9f,\"exposed_s\":%.9f,\"optimizer_s\":%.9f,\"bytes\":%llu}\n",
                g_rank, g_world, NP, nb, STEPS, micro_steps, (unsigned long long)bucket_bytes, total.comm_s, total.compute_s,
                total.exposed_s, total.optimizer_s, (unsigned long long)total.bytes);
        fclose(f);
    }
    if (g_rank == 0)
        printf("trace world=%d steps=%lld compute=%.2fms comm=%.2fms exposed=%.2fms overlap=%.0f%% bytes=%llu\n", g_world,
               (long long)total.steps, total.compute_s * 1e3, total.comm_s * 1e3, total.exposed_s * 1e3,
               total.comm_s > total.exposed_s ? 100.0 * (1 - total.exposed_s / total.comm_s) : 0.0, (unsigned long long)total.bytes);
    ddp_destroy(ctx);
    if (g_rank == 0) remove(ckpt);

    /* a ring of 20 events: the oldest are dropped, and the file says how many */
    TEST("bounded ring");
    snprintf(trace, sizeof trace, "%s/small_%%r.json", argv[1]);
    ctx = make(trace, 20, id);
    for (s = 0; s < STEPS; s++) { micro(ctx, id, s); CHECK_OK(ddp_optimizer_step(ctx), ctx); }
    ddp_destroy(ctx);

    /* a trace file that cannot be created fails ddp_create, naming it */
    TEST("trace path errors");
    {
        ddp_config c;
        memset(&c, 0, sizeof c);
        c.world_size = 1;
        c.trace_path = "/nonexistent-dir/trace.json";
        CHECK_ERR(ddp_create(&c, &ctx), DDP_ERROR_IO, NULL, "/nonexistent-dir/trace.rank0.json");
    }
    snprintf(suite, sizeof suite, "test_trace rank %d", g_rank);
    return t_summary(suite);
}
