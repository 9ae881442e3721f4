/* fault_worker: the rank program the fault suite (tests/fault.c) kills.
   Rank and world come from the environment (ddprun, or the suite itself).

       fault_worker DIR            train: rendezvous, finalize, STEPS steps of
                                   SGD, a checkpoint DIR/ckpt every 2 steps
       fault_worker --verify DIR   world of one: DIR/ckpt loads (checksum,
                                   names), and every weight is what STEPS
                                   steps give, STEPS being the count it says

   Every weight starts at init(i) and every gradient is 1 on every rank, so
   after s steps of SGD (lr 0.5) weight i is init(i) minus 0.5, s times (each
   subtraction exact to one rounding): a checkpoint is either one of those
   states, whole, or it is not a checkpoint.

   The rank writes DIR/pid.<rank> first, and DIR/phase.<rank> as it goes
   (create, finalize, step, save, done), so the suite knows whom it killed
   where. On a failure it prints "ERROR: <message>" on stderr and exits 3. */
#define DDP_IMPLEMENTATION
#include "../ddp.h"

#define NPARAM  (1u << 20)  /* 4 MiB of f32: a checkpoint write takes a while */
#define STEPS   8
#define EVERY   2

static const char *dir;
static int rank = -1;

static void phase(const char *what) {
    char path[4096];
    FILE *f;
    snprintf(path, sizeof path, "%s/phase.%d", dir, rank);
    f = fopen(path, "a");
    if (f) { fprintf(f, "%.6f %s\n", ddp__now(), what); fclose(f); }
}

static float init_value(size_t i) { return (float)(i % 1000) * 0.001f; }

static int fail(const char *what, ddp_result r, const char *msg) {
    fprintf(stderr, "ERROR: %s: %s: %s\n", what, ddp_result_string(r), msg);
    return 3;
}

static void log_stderr(ddp_log_level lvl, int r, const char *msg, void *user) {
    (void)user;
    fprintf(stderr, "log %d [%d] %s\n", (int)lvl, r, msg);
}

static ddp_config config(void) {
    ddp_config c;
    memset(&c, 0, sizeof c);
    c.logger.func = log_stderr;
    c.logger.level = DDP_LOG_WARN;
    c.optimizer.type = DDP_OPTIM_SGD;
    c.optimizer.lr = 0.5f;
    return c;
}

static int verify(void) {
    ddp_config c = config();
    ddp_context *ctx;
    float *init = (float *)malloc(NPARAM * sizeof(float)), *w;
    char path[4096];
    ddp_result r;
    int id;
    int64_t s, k;
    size_t i;
    c.world_size = 1;
    for (i = 0; i < NPARAM; i++) init[i] = 123.0f; /* never a checkpoint's value */
    if ((r = ddp_create(&c, &ctx)) != DDP_SUCCESS) { free(init); return fail("create", r, ddp_create_error()); }
    ddp_register_param(ctx, "w", NPARAM, DDP_F32, init, &id);
    snprintf(path, sizeof path, "%s/ckpt", dir);
    if ((r = ddp_finalize(ctx)) != DDP_SUCCESS || (r = ddp_load_checkpoint(ctx, path)) != DDP_SUCCESS) {
        int code = fail("load", r, ddp_last_error(ctx));
        ddp_destroy(ctx);
        free(init);
        return code;
    }
    s = ddp_optimizer_steps(ctx);
    if (s < EVERY || s > STEPS || s % EVERY != 0) {
        fprintf(stderr, "ERROR: the checkpoint says %lld steps: not a state that was saved\n", (long long)s);
        ddp_destroy(ctx);
        free(init);
        return 3;
    }
    w = (float *)ddp_param_data(ctx, id);
    for (i = 0; i < NPARAM; i++) {
        float want = init_value(i);
        for (k = 0; k < s; k++) want -= 0.5f;
        if (w[i] != want) {
            fprintf(stderr, "ERROR: weight %zu is %.9g, %lld steps give %.9g: a torn checkpoint\n", i, (double)w[i], (long long)s, (double)want);
            ddp_destroy(ctx);
            free(init);
            return 3;
        }
    }
    /* the next save is what removes a temporary a killed writer left in the
       instant between naming and renaming its file */
    if ((r = ddp_save_checkpoint(ctx, path)) != DDP_SUCCESS) {
        int code = fail("save", r, ddp_last_error(ctx));
        ddp_destroy(ctx);
        free(init);
        return code;
    }
    printf("verified: %lld steps\n", (long long)s);
    ddp_destroy(ctx);
    free(init);
    return 0;
}

int main(int argc, char **argv) {
    ddp_config c = config();
    ddp_context *ctx = NULL;
    float *init;
    char path[4096];
    const char *what = "ddp_create";
    ddp_result r;
    int id, step, code = 0;
    size_t i;
    FILE *f;
    if (argc == 3 && !strcmp(argv[1], "--verify")) { dir = argv[2]; rank = 0; return verify(); }
    if (argc != 2) { fprintf(stderr, "usage: fault_worker DIR | --verify DIR\n"); return 2; }
    dir = argv[1];
    rank = getenv("RANK") ? atoi(getenv("RANK")) : 0;
    snprintf(path, sizeof path, "%s/pid.%d.tmp", dir, rank);
    f = fopen(path, "w");
    if (f) {
        char final[4096];
        fprintf(f, "%d\n", ddp__getpid());
        fclose(f);
        snprintf(final, sizeof final, "%s/pid.%d", dir, rank);
        rename(path, final);
    }
    init = (float *)malloc(NPARAM * sizeof(float));
    for (i = 0; i < NPARAM; i++) init[i] = init_value(i);
    phase("create");
    if ((r = ddp_create(&c, &ctx)) != DDP_SUCCESS) { code = fail(what, r, ddp_create_error()); goto done; }
    ddp_register_param(ctx, "w", NPARAM, DDP_F32, init, &id);
    phase("finalize");
    what = "ddp_finalize";
    if ((r = ddp_finalize(ctx)) != DDP_SUCCESS) goto failed;
    snprintf(path, sizeof path, "%s/ckpt", dir);
    for (step = 1; step <= STEPS; step++) {
        float *g;
        phase("step");
        what = "a step";
        if ((r = ddp_step_begin(ctx)) != DDP_SUCCESS) goto failed;
        g = (float *)ddp_param_grad(ctx, id);
        for (i = 0; i < NPARAM; i++) g[i] += 1.0f;
        if ((r = ddp_mark_ready(ctx, id)) != DDP_SUCCESS || (r = ddp_step_end(ctx)) != DDP_SUCCESS ||
            (r = ddp_optimizer_step(ctx)) != DDP_SUCCESS)
            goto failed;
        if (step % EVERY == 0) {
            phase("save");
            what = "ddp_save_checkpoint";
            if ((r = ddp_save_checkpoint(ctx, path)) != DDP_SUCCESS) goto failed;
        }
    }
    phase("done");
    goto done;
failed:
    code = fail(what, r, ddp_last_error(ctx));
done:
    ddp_destroy(ctx);
    free(init);
    return code;
}
