/* dp_fashion_mlp.c - the model of fashion_mlp.c (784-256-256-10 MLP on
   Fashion-MNIST, examples/mlp.h) trained with dp.h: ONE process, K replicas,
   one thread each, on K CPU threads or K GPUs. No launcher:

       build/examples/dp_fashion_mlp --replicas 4
       build/examples/dp_fashion_mlp --device cuda      (CUDA build: every GPU)

   Each step dp_step() splits the global batch of --batch rows over the
   replicas (uneven splits are fine: r->grad_scale makes the average over
   replicas the mean over the batch), runs every replica's forward and
   backward in parallel, all-reduces the gradients in buckets while backward
   runs, and applies the same optimizer step on every replica. With the same
   seed and batch it trains the same weights as fashion_mlp with K ranks.

   This file holds no library implementation: examples/dp_impl.c (CPU
   builds) or examples/dp_impl.cu (CUDA builds) does. With EXAMPLE_CUDA it is
   linked with examples/mlp_cuda.cu and can train on GPUs.

   Per epoch it prints
       epoch E loss L train_acc A test_acc T samples_per_s S
   and at the end
       result: epochs=E replicas=K test_acc=A samples_per_s=S
   Errors: "dp_fashion_mlp: <ddp_result_string>: <message>", exit 1. */
#define _POSIX_C_SOURCE 200809L
#define MLP_IMPLEMENTATION
#include "mlp.h"
#include "../dp.h"
#ifdef EXAMPLE_CUDA
#include "mlp_cuda.h"
#endif

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define DEFAULT_SGD_LR    0.02f  /* the same defaults as fashion_mlp */
#define DEFAULT_ADAMW_LR  1e-3f
#define ADAMW_WEIGHT_DECAY 0.01f

typedef struct options {
    int epochs, batch, limit, replicas;
    float lr;
    const char *optim, *data, *device;
    uint64_t seed;
} options;

static void usage(FILE *f)
{
    fprintf(f,
        "usage: dp_fashion_mlp [options]   (one process; no launcher)\n"
        "  --replicas K        replicas, one thread each (default: 2 on the CPU, every GPU with cuda)\n"
        "  --epochs E          epochs (default 2)\n"
        "  --batch B           global batch, split over the replicas (default 64)\n"
        "  --lr LR             learning rate (default %g for sgd, %g for adamw)\n"
        "  --optim sgd|adamw   SGD with momentum 0.9 (default) or AdamW (weight decay %g)\n"
        "  --data DIR          Fashion-MNIST IDX files (default %s)\n"
        "  --device cpu|cuda   default: cuda when built with CUDA and a GPU exists\n"
        "  --limit N           train on the first N samples only (smoke tests)\n"
        "  --seed S            initialisation and shuffling seed (default 0)\n",
        (double)DEFAULT_SGD_LR, (double)DEFAULT_ADAMW_LR, (double)ADAMW_WEIGHT_DECAY,
        MLP_FASHION_DEFAULT_DIR);
}

static void die(const char *fmt, const char *arg)
{
    fprintf(stderr, "dp_fashion_mlp: ");
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
        if (a[0] != '-' || a[1] != '-') die("unexpected argument '%s' (try --help)", a);
        if (!v) die("%s needs a value", a);
        i++;
        if (!strcmp(a, "--epochs")) o->epochs = (int)parse_long(a, v, 1, 100000);
        else if (!strcmp(a, "--batch")) o->batch = (int)parse_long(a, v, 1, 1 << 24);
        else if (!strcmp(a, "--replicas")) o->replicas = (int)parse_long(a, v, 1, DP_MAX_DEVICES);
        else if (!strcmp(a, "--limit")) o->limit = (int)parse_long(a, v, 1, 1 << 30);
        else if (!strcmp(a, "--seed")) o->seed = (uint64_t)parse_long(a, v, 0, 0x7fffffffL);
        else if (!strcmp(a, "--lr")) {
            char *end;
            double lr;
            errno = 0;
            lr = strtod(v, &end);
            if (end == v || *end || errno || !(lr > 0)) die("bad value for %s", a);
            o->lr = (float)lr;
        } else if (!strcmp(a, "--data")) o->data = v;
        else if (!strcmp(a, "--optim")) {
            if (strcmp(v, "sgd") && strcmp(v, "adamw")) die("--optim must be sgd or adamw, not '%s'", v);
            o->optim = v;
        } else if (!strcmp(a, "--device")) {
            if (strcmp(v, "cpu") && strcmp(v, "cuda")) die("--device must be cpu or cuda, not '%s'", v);
            o->device = v;
        } else die("unknown option '%s' (try --help)", a);
    }
}

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

/* ---- the replicas' work --------------------------------------------------------- */

typedef struct trainer trainer;

typedef struct replica_state {   /* written by its replica's thread only */
    trainer *t;
    const dp_replica *r;
    mlp_workspace ws;
    long correct;
    ddp_result err;
#ifdef EXAMPLE_CUDA
    mlp_cuda *gpu;
#endif
} replica_state;

struct trainer {
    mlp_shape shape;
    int np, ids[MLP_MAX_PARAMS];
    int max_rows;                 /* the most rows a replica gets */
    replica_state rep[DP_MAX_DEVICES];
};

static void replica_params(const dp_replica *r, const trainer *t, float **params, float **grads)
{
    int p;
    for (p = 0; p < t->np; p++) {
        params[p] = (float *)ddp_param_data(r->ctx, t->ids[p]);
        grads[p] = (float *)ddp_param_grad(r->ctx, t->ids[p]);
    }
}

static void on_ready(int p, void *user)
{
    replica_state *s = (replica_state *)user;
    ddp_result r = ddp_mark_ready(s->r->ctx, s->t->ids[p]);
    if (s->err == DDP_SUCCESS) s->err = r;
}

/* runs on replica r's thread: its rows of the batch, its weights */
static int forward_backward(const dp_replica *r, void *user, float *loss)
{
    trainer *t = (trainer *)user;
    replica_state *s = &t->rep[r->index];
    float *params[MLP_MAX_PARAMS], *grads[MLP_MAX_PARAMS], scaled;
    int correct = 0;
    s->t = t;
    s->r = r;
    s->err = DDP_SUCCESS;
    replica_params(r, t, params, grads);
    scaled = mlp_forward_backward(params, (const float *)r->input, (const uint8_t *)r->labels, r->rows,
                                  r->grad_scale, grads, &s->ws, &correct, on_ready, s);
    s->correct += correct;
    *loss = r->grad_scale > 0 ? scaled / r->grad_scale : 0.0f; /* this replica's mean loss */
    return s->err != DDP_SUCCESS;
}

#ifdef EXAMPLE_CUDA
static void on_ready_cuda(int p, void *user)
{
    replica_state *s = (replica_state *)user;
    ddp_result r = ddp_mark_ready_stream(s->r->ctx, s->t->ids[p], s->r->stream);
    if (s->err == DDP_SUCCESS) s->err = r;
}

/* the replica's cuBLAS model lives on its device and stream (created at its
   first step); the loss stays on the GPU: *loss is 0, the epoch's loss comes
   from mlp_cuda_read_stats */
static int forward_backward_cuda(const dp_replica *r, void *user, float *loss)
{
    trainer *t = (trainer *)user;
    replica_state *s = &t->rep[r->index];
    float *params[MLP_MAX_PARAMS], *grads[MLP_MAX_PARAMS];
    char err[512];
    s->t = t;
    s->r = r;
    s->err = DDP_SUCCESS;
    *loss = 0.0f;
    if (!s->gpu && mlp_cuda_create(&t->shape, t->max_rows, r->device, r->stream, 0, &s->gpu, err, sizeof err)) {
        fprintf(stderr, "dp_fashion_mlp: replica %d: %s\n", r->index, err);
        return 1;
    }
    replica_params(r, t, params, grads);
    if (mlp_cuda_upload(s->gpu, (const float *)r->input, (const uint8_t *)r->labels, r->rows) ||
        mlp_cuda_forward_backward(s->gpu, params, grads, r->rows, r->grad_scale, on_ready_cuda, s)) {
        fprintf(stderr, "dp_fashion_mlp: replica %d: %s\n", r->index, mlp_cuda_error(s->gpu));
        return 1;
    }
    return s->err != DDP_SUCCESS;
}
#endif

/* Test accuracy of replica 0's weights (every replica holds the same),
   copied to host (the GPU's replica 0 too) and scored on the CPU. */
static double evaluate(dp_context *dp, const trainer *t, int use_cuda, float *const *host,
                       const mlp_dataset *test, mlp_workspace *ws)
{
    int p, ok;
    for (p = 0; p < t->np; p++) {
        const void *src = ddp_param_data(dp_replica_context(dp, 0), t->ids[p]);
        size_t bytes = mlp_param_numel(&t->shape, p) * sizeof(float);
#ifdef EXAMPLE_CUDA
        if (use_cuda) {
            if (!t->rep[0].gpu) die("%s", "replica 0 has no GPU model yet (it is made at the first step)");
            if (mlp_cuda_to_host(t->rep[0].gpu, host[p], src, bytes)) die("%s", mlp_cuda_error(t->rep[0].gpu));
            continue;
        }
#endif
        (void)use_cuda;
        memcpy(host[p], src, bytes);
    }
    ok = mlp_evaluate(host, test->x, test->y, test->count, ws);
    return test->count ? (double)ok / test->count : 0.0;
}

/* ---- main --------------------------------------------------------------------------- */

static dp_context *g_dp;

static void die_dp(ddp_result r, const char *message)
{
    fprintf(stderr, "dp_fashion_mlp: %s: %s\n", ddp_result_string(r), message);
    if (g_dp) dp_destroy(g_dp);
    exit(1);
}

#define DP_OK(call)                                                        \
    do {                                                                   \
        ddp_result r_ = (call);                                            \
        if (r_ != DDP_SUCCESS) die_dp(r_, dp_last_error(g_dp));            \
    } while (0)

int main(int argc, char **argv)
{
    options o;
    dp_config cfg;
    dp_context *dp = NULL;
    ddp_result r;
    trainer t;
    mlp_dataset train, test;
    mlp_workspace eval_ws;
    char dir[4096], err[2048];
    float *init[MLP_MAX_PARAMS] = {0}, *host[MLP_MAX_PARAMS] = {0};
    int *perm = NULL, p, i, K, use_cuda = 0, epoch, steps_per_epoch;
    float *xb = NULL;
    uint8_t *yb = NULL;
    double total_time = 0.0, total_samples = 0.0, test_acc = 0.0;

    parse(argc, argv, &o);
    memset(&t, 0, sizeof t);
    memset(&cfg, 0, sizeof cfg);
#ifdef EXAMPLE_CUDA
    if (o.device && !strcmp(o.device, "cuda") && mlp_cuda_device_count() < 1) die("--device cuda: %s", "no CUDA device found");
    use_cuda = o.device ? !strcmp(o.device, "cuda") : mlp_cuda_device_count() > 0;
#else
    if (o.device && !strcmp(o.device, "cuda")) die("--device cuda: %s", "this build has no CUDA support (build with CUDA to get it)");
#endif

    cfg.num_devices = o.replicas;       /* 0: every GPU, or 2 CPU replicas */
    cfg.device = use_cuda ? DDP_DEVICE_CUDA : DDP_DEVICE_CPU;
    if (!strcmp(o.optim, "adamw")) {
        cfg.ddp.optimizer.type = DDP_OPTIM_ADAMW;
        cfg.ddp.optimizer.lr = o.lr > 0.0f ? o.lr : DEFAULT_ADAMW_LR;
        cfg.ddp.optimizer.weight_decay = ADAMW_WEIGHT_DECAY;
    } else {
        cfg.ddp.optimizer.type = DDP_OPTIM_SGD;
        cfg.ddp.optimizer.lr = o.lr > 0.0f ? o.lr : DEFAULT_SGD_LR;
        cfg.ddp.optimizer.momentum = 0.9f;
    }
    r = dp_create(&cfg, &dp);
    if (r != DDP_SUCCESS) die_dp(r, dp_last_error(NULL));
    g_dp = dp;
    K = dp_num_replicas(dp);

    /* the model: replica 0's initial weights are every replica's */
    t.shape = mlp_shape_default();
    t.np = mlp_num_params(&t.shape);
    for (p = 0; p < t.np; p++) {
        init[p] = (float *)malloc(mlp_param_numel(&t.shape, p) * sizeof(float));
        host[p] = (float *)malloc(mlp_param_numel(&t.shape, p) * sizeof(float));
        if (!init[p] || !host[p]) die("%s", "out of memory");
    }
    mlp_init_params(&t.shape, o.seed, init);
    for (p = 0; p < t.np; p++) {
        char name[32];
        mlp_param_name(p, name, sizeof name);
        DP_OK(dp_register_param(dp, name, mlp_param_numel(&t.shape, p), DDP_F32, init[p], &t.ids[p]));
    }
    DP_OK(dp_finalize(dp));

    /* the data: the process reads it once; dp_step splits each batch */
    if (mlp_find_data_dir(o.data, dir, sizeof dir, err, sizeof err)) die("%s", err);
    if (mlp_load_fashion(dir, 1, 1, o.limit, &train, err, sizeof err)) die("%s", err);
    if (mlp_load_fashion(dir, 0, 1, 0, &test, err, sizeof err)) die("%s", err);
    t.max_rows = (o.batch + K - 1) / K;
    steps_per_epoch = (train.count + o.batch - 1) / o.batch;
    perm = (int *)malloc((size_t)train.count * sizeof(int));
    xb = (float *)malloc((size_t)o.batch * train.dim * sizeof(float));
    yb = (uint8_t *)malloc((size_t)o.batch);
    if (!perm || !xb || !yb) die("%s", "out of memory");
    for (i = 0; i < K; i++)
        if (mlp_workspace_init(&t.rep[i].ws, &t.shape, t.max_rows > 1 ? t.max_rows : 1))
            die("%s", "out of memory for the model's workspace");
    if (mlp_workspace_init(&eval_ws, &t.shape, 256)) die("%s", "out of memory for the model's workspace");

    printf("dp_fashion_mlp: %d replicas (%s), batch %d, %s lr %g, %d train / %d test samples from %s\n",
           K, use_cuda ? "cuda" : "cpu threads", o.batch, o.optim, (double)cfg.ddp.optimizer.lr,
           train.count, test.count, dir);
    fflush(stdout);

    for (epoch = 0; epoch < o.epochs; epoch++) {
        double t0 = now_s(), loss_sum = 0.0, seconds;
        long correct = 0;
        int s;
        for (i = 0; i < K; i++) t.rep[i].correct = 0;
        mlp_permutation(perm, train.count, o.seed * 1000003u + (uint64_t)epoch);
        for (s = 0; s < steps_per_epoch; s++) {
            int g0 = s * o.batch;
            dp_batch b;
            float loss = 0.0f;
            memset(&b, 0, sizeof b);
            b.rows = train.count - g0 < o.batch ? train.count - g0 : o.batch;
            mlp_gather(&train, perm + g0, b.rows, xb, yb);
            b.input = xb;
            b.input_row_bytes = (size_t)train.dim * sizeof(float);
            b.labels = yb;
            b.labels_row_bytes = 1;
#ifdef EXAMPLE_CUDA
            if (use_cuda) r = dp_step(dp, &b, forward_backward_cuda, &t, &loss, NULL);
            else
#endif
                r = dp_step(dp, &b, forward_backward, &t, &loss, NULL);
            if (r != DDP_SUCCESS) die_dp(r, dp_last_error(dp));
            loss_sum += loss;
        }
        for (i = 0; i < K; i++) correct += t.rep[i].correct;
#ifdef EXAMPLE_CUDA
        if (use_cuda) {  /* the loss and accuracy the GPU models kept */
            loss_sum = 0.0;
            for (i = 0; i < K; i++) {
                double ls = 0.0;
                int64_t c = 0;
                if (!t.rep[i].gpu) continue;
                if (mlp_cuda_read_stats(t.rep[i].gpu, &ls, &c, NULL, 1)) die("%s", mlp_cuda_error(t.rep[i].gpu));
                loss_sum += ls / K;     /* the mean over replicas of grad-scaled means is the batch mean */
                correct += (long)c;
            }
        }
#endif
        seconds = now_s() - t0;
        test_acc = evaluate(dp, &t, use_cuda, host, &test, &eval_ws);
        total_time += seconds;
        total_samples += train.count;
        printf("epoch %d loss %.4f train_acc %.4f test_acc %.4f samples_per_s %.0f\n", epoch + 1,
               steps_per_epoch ? loss_sum / steps_per_epoch : 0.0,
               train.count ? (double)correct / train.count : 0.0, test_acc,
               seconds > 0 ? train.count / seconds : 0.0);
        fflush(stdout);
    }
    printf("result: epochs=%d replicas=%d test_acc=%.4f samples_per_s=%.0f\n", o.epochs, K, test_acc,
           total_time > 0 ? total_samples / total_time : 0.0);
    fflush(stdout);

    for (i = 0; i < K; i++) {
#ifdef EXAMPLE_CUDA
        mlp_cuda_destroy(t.rep[i].gpu);  /* before dp_destroy: it runs on the replica's stream */
#endif
        mlp_workspace_free(&t.rep[i].ws);
    }
    mlp_workspace_free(&eval_ws);
    for (p = 0; p < t.np; p++) { free(init[p]); free(host[p]); }
    mlp_dataset_free(&train);
    mlp_dataset_free(&test);
    free(perm);
    free(xb);
    free(yb);
    dp_destroy(dp);
    return 0;
}
