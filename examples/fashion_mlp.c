/* fashion_mlp.c - data-parallel training of a 784-256-256-10 MLP on
   Fashion-MNIST with ddp.h: the complete program a user would write.

       build/ddprun -n 2 build/examples/fashion_mlp
       torchrun --no_python --nproc_per_node=2 build/examples/fashion_mlp
       build/examples/fashion_mlp                    (one process works too)

   Every rank walks the same shuffled order of the training set (seeded,
   identical everywhere) and takes its contiguous shard of each global batch
   of --batch rows. The model's loss is the mean over the rank's rows,
   scaled by world * rows / global rows (1 when the batch divides evenly),
   so ddp's average over ranks is exactly the mean over the global batch
   (see mlp.h, LOSS AND DATA PARALLELISM): N ranks train the same weights as
   one process with the whole batch.

   This file includes ddp.h without the implementation; examples/ddp_impl.c
   (CPU builds) or examples/ddp_impl.cu (CUDA builds) holds it. With
   EXAMPLE_CUDA defined it is linked with examples/mlp_cuda.cu and can train
   on the GPU (--device cuda, the default when a GPU exists).

   Per epoch rank 0 prints
       epoch E loss L train_acc A test_acc T samples_per_s S overlap=O% exposed_ms=X
   where O is the share of the gradient communication hidden behind the
   backward (ddp_get_step_stats: 1 - exposed / communication time) and X
   the communication time per step the training thread waited for.
   DDP_TRACE=trace.json writes the timeline (trace.rank0.json, ...).
   and at the end
       result: epochs=E test_acc=A samples_per_s=S
   --export PATH writes the weights as safetensors (fc1.weight [256,784],
   fc1.bias [256], ... as PyTorch's nn.Linear holds them).
   Errors: "fashion_mlp: <ddp_result_string>: <ddp_last_error>", exit 1. */
#define _POSIX_C_SOURCE 200809L
#define MLP_IMPLEMENTATION
#include "mlp.h"
#include "../ddp.h"
#ifdef EXAMPLE_CUDA
#include "mlp_cuda.h"
#endif

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- options ---------------------------------------------------------------- */

typedef struct options {
    int epochs, batch, limit;
    float lr;                 /* 0: the optimizer's default below */
    const char *optim;        /* sgd | adamw */
    const char *data;
    const char *device;       /* NULL: auto */
    const char *backend;      /* NULL: library default */
    double timeout;
    uint64_t seed;
    const char *save, *resume, *export_path;
    int zero;                 /* --zero: ZeRO-1, the optimizer state sharded across the ranks */
    int bucket_kb;            /* --bucket-kb: both bucket caps (0: the library's 1 MiB / 25 MiB) */
} options;

#define DEFAULT_SGD_LR    0.02f  /* momentum 0.9: 0.86 test accuracy after 2 epochs */
#define DEFAULT_ADAMW_LR  1e-3f
#define ADAMW_WEIGHT_DECAY 0.01f

static void usage(FILE *f)
{
    fprintf(f,
        "usage: fashion_mlp [options]   (launch with ddprun -n N or torchrun --no_python)\n"
        "  --epochs E          epochs (default 2)\n"
        "  --batch B           global batch, split over the ranks (default 64)\n"
        "  --lr LR             learning rate (default %g for sgd, %g for adamw)\n"
        "  --optim sgd|adamw   SGD with momentum 0.9 (default) or AdamW (weight decay %g)\n"
        "  --data DIR          Fashion-MNIST IDX files (default %s)\n"
        "  --device cpu|cuda   default: cuda when built with CUDA and a GPU exists\n"
        "  --limit N           train on the first N samples only (smoke tests)\n"
        "  --seed S            initialisation and shuffling seed (default 0)\n"
        "  --backend shm|nccl|staged   communication backend (default: the library's)\n"
        "  --timeout S         seconds any wait may take (default: the library's)\n"
        "  --save PATH         write a checkpoint at the end\n"
        "  --resume PATH       start from a checkpoint (--epochs counts from its start)\n"
        "  --export PATH       write the weights as safetensors at the end (PyTorch:\n"
        "                      safetensors.torch.load_file(PATH))\n"
        "  --bucket-kb K       close gradient buckets at K KiB (default: the library's\n"
        "                      1 MiB first, 25 MiB later; smaller ones overlap more)\n"
        "  --zero              ZeRO-1: each rank keeps and updates 1/N of the optimizer\n"
        "                      state (the same weights, bit for bit)\n",
        (double)DEFAULT_SGD_LR, (double)DEFAULT_ADAMW_LR, (double)ADAMW_WEIGHT_DECAY,
        MLP_FASHION_DEFAULT_DIR);
}

static void die(const char *fmt, const char *arg)
{
    fprintf(stderr, "fashion_mlp: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n");
    exit(1);
}

static long parse_long(const char *opt, const char *s, long lo, long hi)
{
    char *end;
    long v;
    errno = 0;
    v = strtol(s, &end, 10);
    if (end == s || *end || errno || v < lo || v > hi) die("bad value for %s", opt);
    return v;
}

static double parse_double(const char *opt, const char *s, double lo)
{
    char *end;
    double v;
    errno = 0;
    v = strtod(s, &end);
    if (end == s || *end || errno || !(v > lo)) die("bad value for %s", opt);
    return v;
}

static void parse(int argc, char **argv, options *o)
{
    int i;
    memset(o, 0, sizeof *o);
    o->epochs = 2;
    o->batch = 64;
    o->optim = "sgd";
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); exit(0); }
        if (!strcmp(a, "--zero")) { o->zero = 1; continue; }
        if (a[0] != '-' || a[1] != '-') die("unexpected argument '%s' (try --help)", a);
        if (!v) die("%s needs a value", a);
        i++;
        if (!strcmp(a, "--epochs")) o->epochs = (int)parse_long(a, v, 0, 100000);
        else if (!strcmp(a, "--batch")) o->batch = (int)parse_long(a, v, 1, 1 << 24);
        else if (!strcmp(a, "--limit")) o->limit = (int)parse_long(a, v, 1, 1 << 30);
        else if (!strcmp(a, "--seed")) o->seed = (uint64_t)parse_long(a, v, 0, 0x7fffffffL);
        else if (!strcmp(a, "--lr")) o->lr = (float)parse_double(a, v, 0.0);
        else if (!strcmp(a, "--timeout")) o->timeout = parse_double(a, v, 0.0);
        else if (!strcmp(a, "--bucket-kb")) o->bucket_kb = (int)parse_long(a, v, 1, 1 << 20);
        else if (!strcmp(a, "--data")) o->data = v;
        else if (!strcmp(a, "--save")) o->save = v;
        else if (!strcmp(a, "--resume")) o->resume = v;
        else if (!strcmp(a, "--export")) o->export_path = v;
        else if (!strcmp(a, "--optim")) {
            if (strcmp(v, "sgd") && strcmp(v, "adamw")) die("--optim must be sgd or adamw, not '%s'", v);
            o->optim = v;
        } else if (!strcmp(a, "--device")) {
            if (strcmp(v, "cpu") && strcmp(v, "cuda")) die("--device must be cpu or cuda, not '%s'", v);
            o->device = v;
        } else if (!strcmp(a, "--backend")) {
            if (strcmp(v, "shm") && strcmp(v, "nccl") && strcmp(v, "staged"))
                die("--backend must be shm, nccl or staged, not '%s'", v);
            o->backend = v;
        } else die("unknown option '%s' (try --help)", a);
    }
}

/* ---- helpers ------------------------------------------------------------------ */

static double now_s(void)
{
    struct timespec t;
#if defined(_WIN32)
    (void)t;
    return (double)clock() / CLOCKS_PER_SEC; /* Windows' C library: wall-clock time since the start */
#else
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
#endif
}

static ddp_context *g_ctx; /* for the error exits */

/* The one error format: which ddp call class failed and the library's message. */
static void die_ddp(ddp_result r, const char *message)
{
    fprintf(stderr, "fashion_mlp: %s: %s\n", ddp_result_string(r), message);
    if (g_ctx) ddp_destroy(g_ctx);
    exit(1);
}

#define DDP_OK(call)                                                       \
    do {                                                                   \
        ddp_result r_ = (call);                                            \
        if (r_ != DDP_SUCCESS) die_ddp(r_, ddp_last_error(g_ctx));         \
    } while (0)

static void die_msg(const char *message)
{
    fprintf(stderr, "fashion_mlp: %s\n", message);
    if (g_ctx) ddp_destroy(g_ctx);
    exit(1);
}

/* The first of these environment variables that is set, else fallback. */
static int env_int(const char *const *names, int fallback)
{
    int i;
    for (i = 0; names[i]; i++) {
        const char *v = getenv(names[i]);
        if (v && *v) return atoi(v);
    }
    return fallback;
}

static const char *const k_local_rank_env[] = {
    "LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", NULL
};
static const char *const k_local_size_env[] = {
    "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE",
    "WORLD_SIZE", NULL
};

/* ---- the step --------------------------------------------------------------------- */

typedef struct trainer {
    ddp_context *ctx;
    mlp_shape shape;
    int np, ids[MLP_MAX_PARAMS];
    float *params[MLP_MAX_PARAMS], *grads[MLP_MAX_PARAMS];
    /* this step's shard */
    const float *x;
    const uint8_t *y;
    int rows;
    float scale;
    /* CPU model */
    mlp_workspace ws;
    /* epoch statistics on this rank (CUDA: loss and correct stay on the GPU) */
    double loss_sum;
    long correct, seen;
    /* the first failure inside the callback */
    ddp_result inner;
    char inner_msg[1024];
#ifdef EXAMPLE_CUDA
    mlp_cuda *gpu;
#endif
} trainer;

static void keep_inner(trainer *t, ddp_result r, const char *msg)
{
    if (t->inner != DDP_SUCCESS || r == DDP_SUCCESS) return;
    t->inner = r;
    snprintf(t->inner_msg, sizeof t->inner_msg, "%s", msg);
}

static void on_grad_ready(int p, void *user)
{
    trainer *t = (trainer *)user;
    keep_inner(t, ddp_mark_ready(t->ctx, t->ids[p]), ddp_last_error(t->ctx));
}

static int forward_backward(ddp_context *ctx, void *user, int micro_step, float *loss)
{
    trainer *t = (trainer *)user;
    int correct = 0;
    (void)ctx;
    (void)micro_step;
    *loss = mlp_forward_backward(t->params, t->x, t->y, t->rows, t->scale, t->grads, &t->ws,
                                 &correct, on_grad_ready, t);
    t->loss_sum += *loss;
    t->correct += correct;
    t->seen += t->rows;
    return t->inner != DDP_SUCCESS;
}

#ifdef EXAMPLE_CUDA
static void on_grad_ready_cuda(int p, void *user)
{
    trainer *t = (trainer *)user;
    keep_inner(t, ddp_mark_ready_stream(t->ctx, t->ids[p], mlp_cuda_stream(t->gpu)),
               ddp_last_error(t->ctx));
}

/* The loss stays on the GPU (reading it back every step would stall the
   pipeline): *loss is 0 and the epoch's loss comes from mlp_cuda_read_stats. */
static int forward_backward_cuda(ddp_context *ctx, void *user, int micro_step, float *loss)
{
    trainer *t = (trainer *)user;
    (void)ctx;
    (void)micro_step;
    *loss = 0.0f;
    if (mlp_cuda_forward_backward(t->gpu, t->params, t->grads, t->rows, t->scale,
                                  on_grad_ready_cuda, t)) {
        keep_inner(t, DDP_ERROR_CUDA, mlp_cuda_error(t->gpu));
        return 1;
    }
    t->seen += t->rows;
    return t->inner != DDP_SUCCESS;
}
#endif

/* ---- main --------------------------------------------------------------------------- */

int main(int argc, char **argv)
{
    options o;
    ddp_config cfg;
    ddp_context *ctx = NULL;
    ddp_result r;
    trainer t;
    mlp_dataset train, test;
    char dir[4096], err[2048];
    float *init[MLP_MAX_PARAMS] = {0};
    int *perm = NULL, rank, world, p, use_cuda = 0, ndev = 0, local_max, epoch, start_epoch;
    int steps_per_epoch;
    float *xb = NULL;
    uint8_t *yb = NULL;
    double total_time = 0.0, total_samples = 0.0, test_acc = 0.0;
    int epochs_run = 0;

    parse(argc, argv, &o);
    memset(&t, 0, sizeof t);
    memset(&cfg, 0, sizeof cfg);

    /* where to train */
#ifdef EXAMPLE_CUDA
    ndev = mlp_cuda_device_count();
#endif
    if (o.device && !strcmp(o.device, "cuda")) {
#ifndef EXAMPLE_CUDA
        die_msg("--device cuda: this build has no CUDA support (build with CUDA to get it)");
#endif
        if (ndev < 1) die_msg("--device cuda: no CUDA device found");
        use_cuda = 1;
    } else if (!o.device) {
        use_cuda = ndev > 0;
    }

    cfg.device = use_cuda ? DDP_DEVICE_CUDA : DDP_DEVICE_CPU;
    if (o.timeout > 0.0) cfg.timeout_s = o.timeout;
    if (o.backend) {
        cfg.backend = !strcmp(o.backend, "shm") ? DDP_BACKEND_SHM
                    : !strcmp(o.backend, "nccl") ? DDP_BACKEND_NCCL : DDP_BACKEND_STAGED;
    }
    if (use_cuda) {
        int local_rank = env_int(k_local_rank_env, 0);
        int local_size = env_int(k_local_size_env, 1);
        /* several ranks per GPU (one GPU, ddprun -n 2): share it; NCCL cannot
           put two ranks on one device, so the default becomes staged */
        cfg.cuda_device = 1 + (local_rank % ndev);
        if (!o.backend && !getenv("DDP_BACKEND") && local_size > ndev)
            cfg.backend = DDP_BACKEND_STAGED;
    }
    if (!strcmp(o.optim, "adamw")) {
        cfg.optimizer.type = DDP_OPTIM_ADAMW;
        cfg.optimizer.lr = o.lr > 0.0f ? o.lr : DEFAULT_ADAMW_LR;
        cfg.optimizer.weight_decay = ADAMW_WEIGHT_DECAY;
    } else {
        cfg.optimizer.type = DDP_OPTIM_SGD;
        cfg.optimizer.lr = o.lr > 0.0f ? o.lr : DEFAULT_SGD_LR;
        cfg.optimizer.momentum = 0.9f;
    }

    cfg.zero_stage = o.zero;
    cfg.first_bucket_bytes = cfg.bucket_bytes = (size_t)o.bucket_kb << 10; /* 0: the defaults */
    r = ddp_create(&cfg, &ctx);
    if (r != DDP_SUCCESS) die_ddp(r, ddp_create_error());
    g_ctx = ctx;
    rank = ddp_rank(ctx);
    world = ddp_world_size(ctx);

    /* the model: rank 0's initial weights win at ddp_finalize */
    t.ctx = ctx;
    t.shape = mlp_shape_default();
    t.np = mlp_num_params(&t.shape);
    for (p = 0; p < t.np; p++) {
        init[p] = (float *)malloc(mlp_param_numel(&t.shape, p) * sizeof(float));
        if (!init[p]) die_msg("out of memory");
    }
    mlp_init_params(&t.shape, o.seed, init);
    for (p = 0; p < t.np; p++) {
        char name[32];
        int64_t dims[2];
        int nd = mlp_param_shape(&t.shape, p, dims);
        mlp_param_name(p, name, sizeof name);
        DDP_OK(ddp_register_param_shape(ctx, name, nd, dims, DDP_F32, init[p], &t.ids[p]));
    }
    DDP_OK(ddp_finalize(ctx));
    for (p = 0; p < t.np; p++) {
        free(init[p]);
        t.params[p] = (float *)ddp_param_data(ctx, t.ids[p]);
        t.grads[p] = (float *)ddp_param_grad(ctx, t.ids[p]);
    }
    if (o.resume) DDP_OK(ddp_load_checkpoint(ctx, o.resume));

    /* the data: every rank reads it all and uses its shard of each batch */
    if (mlp_find_data_dir(o.data, dir, sizeof dir, err, sizeof err)) die_msg(err);
    if (o.data && strcmp(o.data, dir) && rank == 0)
        fprintf(stderr, "fashion_mlp: warning: no Fashion-MNIST files in %s, using %s\n", o.data, dir);
    if (mlp_load_fashion(dir, 1, 1, o.limit, &train, err, sizeof err)) die_msg(err);
    if (mlp_load_fashion(dir, 0, 1, 0, &test, err, sizeof err)) die_msg(err);
    if (o.batch < world) {
        snprintf(err, sizeof err, "--batch %d is smaller than the world size %d: every rank "
                 "needs at least one row of each batch", o.batch, world);
        die_msg(err);
    }
    local_max = (o.batch + world - 1) / world;
    steps_per_epoch = (train.count + o.batch - 1) / o.batch;
    perm = (int *)malloc((size_t)train.count * sizeof(int));
    xb = (float *)malloc((size_t)local_max * train.dim * sizeof(float));
    yb = (uint8_t *)malloc((size_t)local_max);
    if (!perm || !xb || !yb) die_msg("out of memory");
    if (mlp_workspace_init(&t.ws, &t.shape, local_max > 256 ? local_max : 256))
        die_msg("out of memory for the model's workspace");
#ifdef EXAMPLE_CUDA
    if (use_cuda &&
        mlp_cuda_create(&t.shape, local_max > 1024 ? local_max : 1024, cfg.cuda_device - 1, NULL,
                        MLP_CUDA_NEW_STREAM, &t.gpu, err, sizeof err))
        die_msg(err);
    /* gradient zeroing, the end-of-step wait and the optimizer go on the
       model's stream, so every step is ordered after the previous one */
    if (use_cuda) DDP_OK(ddp_set_stream(ctx, mlp_cuda_stream(t.gpu)));
#endif

    start_epoch = (int)(ddp_optimizer_steps(ctx) / steps_per_epoch);
    if (rank == 0) {
        ddp_config q = ddp_query_config(ctx);
        printf("fashion_mlp: world %d, backend %s, device %s, batch %d (%d per rank), %s lr %g%s, "
               "%d train / %d test samples from %s%s\n",
               world, ddp_backend_name(ddp_query_backend(ctx)), use_cuda ? "cuda" : "cpu",
               o.batch, local_max, o.optim, (double)q.optimizer.lr, q.zero_stage ? ", ZeRO-1" : "",
               train.count, test.count, dir, start_epoch > 0 ? " (resumed)" : "");
        fflush(stdout);
    }

    for (epoch = start_epoch; epoch < o.epochs; epoch++) {
        double t0 = now_s(), sums[6], tmax, overlap, exposed_ms;
        int s, test_lo, test_hi, test_ok = 0;
        int64_t gpu_ok = 0;
        ddp_step_stats st0, st1;
        DDP_OK(ddp_get_step_stats(ctx, NULL, &st0));
        t.loss_sum = 0.0;
        t.correct = t.seen = 0;
        mlp_permutation(perm, train.count, o.seed * 1000003u + (uint64_t)epoch);
        for (s = 0; s < steps_per_epoch; s++) {
            int g0 = s * o.batch;
            int rows = train.count - g0 < o.batch ? train.count - g0 : o.batch;
            int lo = g0 + (int)((long)rows * rank / world);
            int hi = g0 + (int)((long)rows * (rank + 1) / world);
            t.rows = hi - lo;
            t.scale = (float)world * (float)t.rows / (float)rows; /* 1 for equal shards */
            mlp_gather(&train, perm + lo, t.rows, xb, yb);
            t.x = xb;
            t.y = yb;
            t.inner = DDP_SUCCESS;
#ifdef EXAMPLE_CUDA
            if (use_cuda) {
                if (mlp_cuda_upload(t.gpu, xb, yb, t.rows)) die_msg(mlp_cuda_error(t.gpu));
                r = ddp_train_step(ctx, forward_backward_cuda, &t, 1, NULL);
            } else
#endif
                r = ddp_train_step(ctx, forward_backward, &t, 1, NULL);
            if (r != DDP_SUCCESS) {
                if (t.inner != DDP_SUCCESS) die_ddp(t.inner, t.inner_msg);
                die_ddp(r, ddp_last_error(ctx));
            }
        }
#ifdef EXAMPLE_CUDA
        if (use_cuda) {
            int64_t calls = 0;
            DDP_OK(ddp_synchronize(ctx));
            if (mlp_cuda_read_stats(t.gpu, &t.loss_sum, &gpu_ok, &calls, 1))
                die_msg(mlp_cuda_error(t.gpu));
            t.correct = (long)gpu_ok;
        }
#endif
        (void)gpu_ok;
        tmax = now_s() - t0;
        DDP_OK(ddp_get_step_stats(ctx, NULL, &st1));
        {
            double comm = st1.comm_s - st0.comm_s, exposed = st1.exposed_s - st0.exposed_s;
            int64_t n = st1.steps - st0.steps;
            overlap = comm > 0 ? 1.0 - exposed / comm : 0.0;
            if (overlap < 0) overlap = 0;
            exposed_ms = n > 0 ? exposed / (double)n * 1e3 : 0.0;
        }

        /* test accuracy: each rank scores its shard of the 10k test images */
        test_lo = (int)((long)test.count * rank / world);
        test_hi = (int)((long)test.count * (rank + 1) / world);
#ifdef EXAMPLE_CUDA
        if (use_cuda) {
            if (mlp_cuda_evaluate(t.gpu, t.params, test.x + (size_t)test_lo * test.dim,
                                  test.y + test_lo, test_hi - test_lo, &test_ok))
                die_msg(mlp_cuda_error(t.gpu));
        } else
#endif
            test_ok = mlp_evaluate(t.params, test.x + (size_t)test_lo * test.dim,
                                   test.y + test_lo, test_hi - test_lo, &t.ws);

        sums[0] = t.loss_sum;            /* sum over steps of this rank's scaled loss */
        sums[1] = (double)t.correct;
        sums[2] = (double)t.seen;
        sums[3] = (double)test_ok;
        sums[4] = (double)(test_hi - test_lo);
        sums[5] = (double)steps_per_epoch;
        DDP_OK(ddp_allreduce(ctx, sums, 6, DDP_F64, DDP_OP_SUM));
        DDP_OK(ddp_allreduce(ctx, &tmax, 1, DDP_F64, DDP_OP_MAX));
        total_time += tmax;
        total_samples += sums[2];
        test_acc = sums[4] > 0 ? sums[3] / sums[4] : 0.0;
        epochs_run++;
        if (rank == 0) {
            /* per step the global loss is the average over ranks of the
               scaled losses; sums[5] is steps * world */
            printf("epoch %d loss %.4f train_acc %.4f test_acc %.4f samples_per_s %.0f overlap=%.0f%% exposed_ms=%.3f\n",
                   epoch + 1, sums[5] > 0 ? sums[0] / sums[5] : 0.0,
                   sums[2] > 0 ? sums[1] / sums[2] : 0.0, test_acc,
                   tmax > 0 ? sums[2] / tmax : 0.0, overlap * 100.0, exposed_ms);
            fflush(stdout);
        }
    }

    if (epochs_run == 0) {
        /* nothing to train (resumed at or past --epochs): report the test accuracy */
        int lo = (int)((long)test.count * rank / world);
        int hi = (int)((long)test.count * (rank + 1) / world), ok = 0;
        double sums[2];
#ifdef EXAMPLE_CUDA
        if (use_cuda) {
            DDP_OK(ddp_synchronize(ctx));
            if (mlp_cuda_evaluate(t.gpu, t.params, test.x + (size_t)lo * test.dim, test.y + lo,
                                  hi - lo, &ok))
                die_msg(mlp_cuda_error(t.gpu));
        } else
#endif
            ok = mlp_evaluate(t.params, test.x + (size_t)lo * test.dim, test.y + lo, hi - lo, &t.ws);
        sums[0] = ok;
        sums[1] = hi - lo;
        DDP_OK(ddp_allreduce(ctx, sums, 2, DDP_F64, DDP_OP_SUM));
        test_acc = sums[1] > 0 ? sums[0] / sums[1] : 0.0;
    }
    if (o.save) DDP_OK(ddp_save_checkpoint(ctx, o.save));
    if (o.export_path) {
        /* the weights for PyTorch & co: fc1.weight [256,784] ... as nn.Linear holds them */
        char epochs[32], acc[32];
        const char *meta[] = { "producer", "ddp.h examples/fashion_mlp", "model", "784-256-256-10 MLP, ReLU",
                               "epochs", epochs, "test_acc", acc, NULL };
        snprintf(epochs, sizeof epochs, "%d", o.epochs);
        snprintf(acc, sizeof acc, "%.4f", test_acc);
        DDP_OK(ddp_save_safetensors(ctx, o.export_path, meta));
        if (rank == 0) printf("fashion_mlp: wrote the weights to %s (safetensors)\n", o.export_path);
    }
    if (rank == 0) {
        printf("fashion_mlp: optimizer state %zu bytes on rank 0%s\n", ddp_optimizer_state_bytes(ctx),
               o.zero ? " (ZeRO-1: its shard)" : "");
        printf("result: epochs=%d test_acc=%.4f samples_per_s=%.0f\n", o.epochs, test_acc,
               total_time > 0 ? total_samples / total_time : 0.0);
        fflush(stdout);
    }

#ifdef EXAMPLE_CUDA
    mlp_cuda_destroy(t.gpu);
#endif
    mlp_workspace_free(&t.ws);
    mlp_dataset_free(&train);
    mlp_dataset_free(&test);
    free(perm);
    free(xb);
    free(yb);
    ddp_destroy(ctx);
    return 0;
}
