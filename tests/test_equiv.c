/* The property of DESIGN.md: N replicas, each on its own share of the batch,
   end with the same weights as one replica on the whole batch, from the same
   initial weights. Run under the launcher:

       ddprun -n N test_equiv [--optim sgd|adamw] [--accum K] [--steps S]

   Every rank trains its DDP replica (K micro-steps of B rows per step), and
   also a single replica (a world-1 context of its own) on the concatenated
   N*K*B rows; then it compares the two and checks that all ranks hold the
   same bits. Exit status 0 only when both hold. */
#define DDP_IMPLEMENTATION
#include "../ddp.h"
#define MLP_IMPLEMENTATION
#define MLP_NO_ZLIB
#include "../examples/mlp.h"
#include <math.h>

typedef struct job {
    mlp_shape shape;
    mlp_workspace ws;
    const float *x;
    const uint8_t *y;
    int rows;          /* per micro-step */
    int first_row;     /* this micro-step's rows, set per call */
    int step, world, rank, accum;
} job;

static ddp_context *grad_ctx;

static void on_ready(int p, void *user) { (void)user; ddp_mark_ready(grad_ctx, p); }

static int fb(ddp_context *ctx, void *user, int micro, float *loss) {
    job *j = (job *)user;
    float *params[MLP_MAX_PARAMS], *grads[MLP_MAX_PARAMS];
    int p, np = mlp_num_params(&j->shape);
    /* global step layout: [micro 0: rank 0 rows, rank 1 rows, ...][micro 1: ...] */
    int row = (j->step * j->accum * j->world + micro * j->world + j->rank) * j->rows;
    for (p = 0; p < np; p++) { params[p] = (float *)ddp_param_data(ctx, p); grads[p] = (float *)ddp_param_grad(ctx, p); }
    grad_ctx = ctx;
    *loss = mlp_forward_backward(params, j->x + (size_t)row * (size_t)j->shape.dims[0], j->y + row, j->rows, 1.0f,
                                 grads, &j->ws, NULL, on_ready, NULL);
    return 0;
}

static ddp_context *make_model(ddp_config *c, const mlp_shape *s, float *const *init) {
    ddp_context *ctx;
    int p, id;
    ddp_result r = ddp_create(c, &ctx);
    if (r != DDP_SUCCESS) { fprintf(stderr, "ddp_create: %s: %s\n", ddp_result_string(r), ddp_create_error()); exit(2); }
    for (p = 0; p < mlp_num_params(s); p++) {
        char name[32];
        int64_t dims[2];
        int nd = mlp_param_shape(s, p, dims);
        mlp_param_name(p, name, sizeof name);
        if (ddp_register_param_shape(ctx, name, nd, dims, DDP_F32, init[p], &id) != DDP_SUCCESS) {
            fprintf(stderr, "register: %s\n", ddp_last_error(ctx));
            exit(2);
        }
    }
    if (ddp_finalize(ctx) != DDP_SUCCESS) { fprintf(stderr, "finalize: %s\n", ddp_last_error(ctx)); exit(2); }
    return ctx;
}

int main(int argc, char **argv) {
    ddp_config c;
    ddp_context *ddp, *ref;
    mlp_shape shape;
    mlp_dataset data;
    float *init[MLP_MAX_PARAMS], *params[MLP_MAX_PARAMS], *grads[MLP_MAX_PARAMS];
    int accum = 1, steps = 5, rows = 6, i, p, s, world, rank, failed = 0;
    const char *optim = "sgd", *dump = NULL;
    double maxdiff = 0, maxref = 0;
    uint64_t h = 0xcbf29ce484222325ull, *all;
    job j;
    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--optim") && i + 1 < argc) optim = argv[++i];
        else if (!strcmp(argv[i], "--accum") && i + 1 < argc) accum = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--dump") && i + 1 < argc) dump = argv[++i];
        else { fprintf(stderr, "usage: test_equiv [--optim sgd|adamw] [--accum K] [--steps S] [--dump FILE]\n"); return 2; }
    }
    mlp_shape_parse("20,16,12,5", &shape);
    memset(&c, 0, sizeof c);
    c.timeout_s = 30;
    c.first_bucket_bytes = 512;  /* several buckets even for this small model */
    c.bucket_bytes = 1024;
    if (!strcmp(optim, "adamw")) {
        c.optimizer.type = DDP_OPTIM_ADAMW; c.optimizer.lr = 0.01f; c.optimizer.weight_decay = 0.01f;
    } else {
        c.optimizer.type = DDP_OPTIM_SGD; c.optimizer.lr = 0.1f; c.optimizer.momentum = 0.9f;
        c.optimizer.nesterov = 1; c.optimizer.weight_decay = 1e-3f;
    }
    for (p = 0; p < mlp_num_params(&shape); p++) init[p] = (float *)malloc(mlp_param_numel(&shape, p) * sizeof(float));
    mlp_init_params(&shape, 1234, init);

    ddp = make_model(&c, &shape, init);
    world = ddp_world_size(ddp);
    rank = ddp_rank(ddp);
    if (mlp_synthetic(&data, steps * accum * world * rows, 20, 5, 99) != 0) { fprintf(stderr, "synthetic data\n"); return 2; }

    memset(&j, 0, sizeof j);
    j.shape = shape; j.x = data.x; j.y = data.y; j.rows = rows; j.world = world; j.rank = rank; j.accum = accum;
    mlp_workspace_init(&j.ws, &shape, rows * accum * world);
    for (s = 0; s < steps; s++) {
        ddp_result r;
        j.step = s;
        r = ddp_train_step(ddp, fb, &j, accum, NULL);
        if (r != DDP_SUCCESS) { fprintf(stderr, "rank %d step %d: %s: %s\n", rank, s, ddp_result_string(r), ddp_last_error(ddp)); return 1; }
    }

    if (dump && rank == 0) { /* the DDP weights, for the comparison with dp.h */
        FILE *f = fopen(dump, "wb");
        if (!f) { fprintf(stderr, "cannot write %s\n", dump); return 2; }
        for (p = 0; p < mlp_num_params(&shape); p++) fwrite(ddp_param_data(ddp, p), sizeof(float), mlp_param_numel(&shape, p), f);
        fclose(f);
    }

    /* one replica on the concatenated batch of each step */
    c.world_size = 1; c.rank = 0;
    ref = make_model(&c, &shape, init);
    for (s = 0; s < steps; s++) {
        int g = accum * world * rows;
        ddp_step_begin(ref);
        for (p = 0; p < mlp_num_params(&shape); p++) { params[p] = (float *)ddp_param_data(ref, p); grads[p] = (float *)ddp_param_grad(ref, p); }
        grad_ctx = ref;
        mlp_forward_backward(params, data.x + (size_t)s * (size_t)g * 20, data.y + s * g, g, 1.0f, grads, &j.ws, NULL, on_ready, NULL);
        if (ddp_step_end(ref) != DDP_SUCCESS || ddp_optimizer_step(ref) != DDP_SUCCESS) { fprintf(stderr, "reference: %s\n", ddp_last_error(ref)); return 2; }
    }
    for (p = 0; p < mlp_num_params(&shape); p++) {
        const float *a = (const float *)ddp_param_data(ddp, p), *b = (const float *)ddp_param_data(ref, p);
        for (i = 0; i < (int)mlp_param_numel(&shape, p); i++) {
            double d = fabs((double)a[i] - (double)b[i]);
            if (d > maxdiff) maxdiff = d;
            if (fabs(b[i]) > maxref) maxref = fabs(b[i]);
            if (!(a[i] == a[i])) maxdiff = INFINITY;
        }
        for (i = 0; i < (int)(mlp_param_numel(&shape, p) * sizeof(float)); i++) {
            h ^= ((const unsigned char *)a)[i];
            h *= 0x100000001b3ull;
        }
    }
    /* every replica must hold the same bits */
    all = (uint64_t *)malloc(sizeof(uint64_t) * (size_t)world);
    if (ddp_allgather(ddp, &h, all, 2, DDP_I32) != DDP_SUCCESS) { fprintf(stderr, "allgather: %s\n", ddp_last_error(ddp)); return 1; }
    for (i = 0; i < world; i++)
        if (all[i] != h) { fprintf(stderr, "rank %d: replica %d differs from mine\n", rank, i); failed = 1; }
    if (maxdiff / maxref > 1e-5) {
        fprintf(stderr, "rank %d: max |ddp - single| / max |single| = %.3g > 1e-5\n", rank, maxdiff / maxref);
        failed = 1;
    }
    if (rank == 0)
        printf("equiv: world=%d optim=%s accum=%d steps=%d rows_per_rank=%d max_rel_diff=%.3g replicas_identical=%s\n",
               world, optim, accum, steps, rows, maxdiff / maxref, failed ? "no" : "yes");
    mlp_workspace_free(&j.ws);
    mlp_dataset_free(&data);
    for (p = 0; p < mlp_num_params(&shape); p++) free(init[p]);
    free(all);
    ddp_destroy(ref);
    ddp_destroy(ddp);
    return failed;
}
