/* job_worker: a small ddp.h rank for the launcher-level tests (jobs.sh,
   small_shm.sh). Rank and world from the environment.

       job_worker [N]   register N floats (default 1000), finalize, one
                        step and an all-reduce whose result it checks;
                        prints "OK rank r" or "ERROR: <code>: <message>"
                        (exit 3). Log lines (warnings) go to stderr.

   JOB_WORKER_DELAY (seconds) delays ddp_create on ranks other than 0.
   Built three times: as it is, with DDP__WIRE_VERSION one minor version
   older (job_worker_old: a stale binary), and with named shared-memory
   segments (job_worker_named: the /dev/shm fallback). */
#if defined(JOB_WORKER_OLD)
/* the library version this rank claims: one minor version before the real one */
#  define DDP__WIRE_VERSION (DDP_VERSION_MAJOR * 1000 + DDP_VERSION_MINOR - 1)
#endif
#define DDP_IMPLEMENTATION
#include "../ddp.h"

static void log_stderr(ddp_log_level lvl, int rank, const char *msg, void *user) {
    (void)user;
    fprintf(stderr, "log %s [%d] %s\n", lvl == DDP_LOG_ERROR ? "error" : lvl == DDP_LOG_WARN ? "warn" : "info", rank, msg);
}

int main(int argc, char **argv) {
    ddp_config c;
    ddp_context *ctx;
    ddp_result r;
    size_t n = argc > 1 ? (size_t)strtoull(argv[1], NULL, 10) : 1000, i;
    float *init, x, *g;
    int id, rank = getenv("RANK") ? atoi(getenv("RANK")) : 0;
    const char *delay = getenv("JOB_WORKER_DELAY");
    memset(&c, 0, sizeof c);
    c.logger.func = log_stderr;
    c.logger.level = DDP_LOG_WARN;
    if (delay && rank != 0) ddp__sleep_us((long)(atof(delay) * 1e6));
    r = ddp_create(&c, &ctx);
    if (r != DDP_SUCCESS) { printf("ERROR: %s: %s\n", ddp_result_string(r), ddp_create_error()); return 3; }
    init = (float *)calloc(n, sizeof(float));
    ddp_register_param(ctx, "w", n, DDP_F32, init, &id);
    if ((r = ddp_finalize(ctx)) == DDP_SUCCESS && (r = ddp_step_begin(ctx)) == DDP_SUCCESS) {
        g = (float *)ddp_param_grad(ctx, id);
        for (i = 0; i < n; i++) g[i] += (float)(rank + 1);
        if ((r = ddp_mark_ready(ctx, id)) == DDP_SUCCESS) r = ddp_step_end(ctx);
    }
    x = 1.0f;
    if (r == DDP_SUCCESS) r = ddp_allreduce(ctx, &x, 1, DDP_F32, DDP_OP_SUM);
    if (r != DDP_SUCCESS) { printf("ERROR: %s: %s\n", ddp_result_string(r), ddp_last_error(ctx)); ddp_destroy(ctx); free(init); return 3; }
    g = (float *)ddp_param_grad(ctx, id);
    if (x != (float)ddp_world_size(ctx) || g[n - 1] != (float)(ddp_world_size(ctx) + 1) / 2.0f) {
        printf("ERROR: wrong results: sum %g, mean gradient %g\n", (double)x, (double)g[n - 1]);
        ddp_destroy(ctx);
        free(init);
        return 4;
    }
    printf("OK rank %d of %d\n", rank, ddp_world_size(ctx));
    ddp_destroy(ctx);
    free(init);
    return 0;
}
