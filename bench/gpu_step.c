/* bench/gpu_step: the example model's training step on the GPU, with DDP
   (world size 1, NCCL unless DDP_BACKEND says otherwise) against the same
   loop without the library (plain cudaMalloc'd flat buffers, the same
   cuBLAS forward/backward, the same fused SGD kernel), in the same run.

       ddprun -n 1 build/bench/gpu_step [--steps N]

   Prints one row per model:
     gpu_step model=784-256-256-10 params=P batch=B local_ms=X ddp_ms=Y overhead=Y/X
   (a world of one exchanges nothing; a second row gives the step time with
   the NCCL all-reduce forced anyway, DDP_FORCE_COMM=1)
   and a final line checking the target (overhead <= 1.03).

   Then, per model, where the time goes (issue 13: the world-1 overhead),
   from a separate run of each loop with timers (they cost a little, so the
   headline ratio above comes from the untimed runs):
     gpu_step_host model=... plain: memset= upload= fwd_bwd= sgd= sum= wall=
     gpu_step_host model=... ddp: step_begin= upload= fwd_bwd= (mark_ready= xN)
                                  step_end= optimizer_step= sum= wall=
         host microseconds per step spent inside each call (the library's
         calls one by one; fwd_bwd includes the mark_ready callbacks, which
         are also given alone); wall is the whole step, so wall - sum is the
         loop's own time. A launch-bound step (the small model) shows its
         overhead here.
     gpu_step_device model=... plain: zero= compute= optimizer= ddp: zero=
                                  compute= step_end= optimizer=
         device microseconds per step between CUDA events recorded on the
         stream at the same boundaries (median over the steps): the GPU's
         time for each part, including any idle gap while it waits for
         the host. A GPU-bound step (the large model) shows its overhead
         here (e.g. the library's optimizer launches against one SGD kernel).
     gpu_step_train_step model=... manual_ms= train_step_ms=
         the same DDP step written out by hand and through ddp_train_step. */
#define _GNU_SOURCE 1
#include "../ddp.h"
#include "bench.h"
#include "../ddp_kernels.cuh"
#define MLP_IMPLEMENTATION
#define MLP_NO_ZLIB
#include "../examples/mlp.h"
#include "../examples/mlp_cuda.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <cuda_runtime_api.h> /* C-compatible: the plain loop allocates its own buffers */

typedef struct run {
    mlp_cuda *model;
    mlp_shape shape;
    const float *x;
    const uint8_t *y;
    int batch, nbatches, step;
    ddp_context *ctx;
} run;

/* host time inside ddp_mark_ready_stream, when timing (the breakdown run) */
static int g_timing;
static double g_mark_s;
static long g_mark_calls;

static void mark(int p, void *user) {
    run *r = (run *)user;
    double t0 = g_timing ? now_s() : 0;
    ddp_mark_ready_stream(r->ctx, p, mlp_cuda_stream(r->model));
    if (g_timing) { g_mark_s += now_s() - t0; g_mark_calls++; }
}

static int fb(ddp_context *ctx, void *user, int micro, float *loss) {
    run *r = (run *)user;
    float *params[MLP_MAX_PARAMS], *grads[MLP_MAX_PARAMS];
    int p, b = r->step % r->nbatches;
    (void)micro;
    for (p = 0; p < mlp_num_params(&r->shape); p++) { params[p] = (float *)ddp_param_data(ctx, p); grads[p] = (float *)ddp_param_grad(ctx, p); }
    if (mlp_cuda_upload(r->model, r->x + (size_t)b * r->batch * r->shape.dims[0], r->y + (size_t)b * r->batch, r->batch)) return 1;
    if (mlp_cuda_forward_backward(r->model, params, grads, r->batch, 1.0f, mark, r)) return 2;
    *loss = 0;
    return 0;
}

/* the loop without the library: the same model, flat buffers, one SGD kernel */
static double plain_ms(const mlp_shape *s, const mlp_dataset *d, int batch, int steps, float *const *init) {
    mlp_cuda *m;
    char err[256];
    size_t total = 0, off[MLP_MAX_PARAMS];
    float *flat_p = NULL, *flat_g = NULL, *mom = NULL, *params[MLP_MAX_PARAMS], *grads[MLP_MAX_PARAMS];
    int p, i, nb = d->count / batch;
    double t0 = 0;
    if (mlp_cuda_create(s, batch, -1, NULL, MLP_CUDA_NEW_STREAM, &m, err, sizeof err)) { fprintf(stderr, "%s\n", err); exit(1); }
    for (p = 0; p < mlp_num_params(s); p++) { off[p] = total; total += (mlp_param_numel(s, p) + 63) / 64 * 64; }
    if (cudaMalloc((void **)&flat_p, total * 4) != cudaSuccess || cudaMalloc((void **)&flat_g, total * 4) != cudaSuccess ||
        cudaMalloc((void **)&mom, total * 4) != cudaSuccess) { fprintf(stderr, "cudaMalloc failed\n"); exit(1); }
    for (p = 0; p < mlp_num_params(s); p++) {
        params[p] = flat_p + off[p]; grads[p] = flat_g + off[p];
        mlp_cuda_to_device(m, params[p], init[p], mlp_param_numel(s, p) * 4);
    }
    for (i = 0; i < steps + 20; i++) {
        int b = i % nb;
        if (i == 20) { mlp_cuda_read_stats(m, NULL, NULL, NULL, 1); t0 = now_s(); }
        cudaMemsetAsync(flat_g, 0, total * 4, (cudaStream_t)mlp_cuda_stream(m));
        mlp_cuda_upload(m, d->x + (size_t)b * batch * s->dims[0], d->y + (size_t)b * batch, batch);
        mlp_cuda_forward_backward(m, params, grads, batch, 1.0f, NULL, NULL);
        ddp_k_sgd(flat_p, flat_g, mom, total, 0.01f, 0.9f, 0.0f, 0, i == 0, mlp_cuda_stream(m));
    }
    mlp_cuda_read_stats(m, NULL, NULL, NULL, 1); /* synchronises */
    t0 = (now_s() - t0) * 1e3 / steps;
    cudaFree(flat_p); cudaFree(flat_g); cudaFree(mom);
    mlp_cuda_destroy(m);
    return t0;
}

static double ddp_ms(const mlp_shape *s, const mlp_dataset *d, int batch, int steps, float *const *init) {
    ddp_config c;
    ddp_context *ctx;
    run r;
    char err[256];
    int p, id, i;
    double t0 = 0;
    memset(&c, 0, sizeof c);
    c.device = DDP_DEVICE_CUDA;
    c.optimizer.type = DDP_OPTIM_SGD; c.optimizer.lr = 0.01f; c.optimizer.momentum = 0.9f;
    if (ddp_create(&c, &ctx) != DDP_SUCCESS) { fprintf(stderr, "ddp_create: %s\n", ddp_create_error()); exit(1); }
    for (p = 0; p < mlp_num_params(s); p++) {
        char name[32];
        mlp_param_name(p, name, sizeof name);
        ddp_register_param(ctx, name, mlp_param_numel(s, p), DDP_F32, init[p], &id);
    }
    if (ddp_finalize(ctx) != DDP_SUCCESS) { fprintf(stderr, "finalize: %s\n", ddp_last_error(ctx)); exit(1); }
    memset(&r, 0, sizeof r);
    if (mlp_cuda_create(s, batch, -1, NULL, MLP_CUDA_NEW_STREAM, &r.model, err, sizeof err)) { fprintf(stderr, "%s\n", err); exit(1); }
    ddp_set_stream(ctx, mlp_cuda_stream(r.model));
    r.shape = *s; r.x = d->x; r.y = d->y; r.batch = batch; r.nbatches = d->count / batch; r.ctx = ctx;
    for (i = 0; i < steps + 20; i++) {
        if (i == 20) { ddp_synchronize(ctx); t0 = now_s(); }
        r.step = i;
        if (ddp_train_step(ctx, fb, &r, 1, NULL) != DDP_SUCCESS) { fprintf(stderr, "step: %s\n", ddp_last_error(ctx)); exit(1); }
    }
    ddp_synchronize(ctx);
    t0 = (now_s() - t0) * 1e3 / steps;
    mlp_cuda_destroy(r.model);
    ddp_destroy(ctx);
    return t0;
}

/* ---- the breakdown (host timers and CUDA events around each call) ---- */

enum { NSEG = 6, NEV = 5 };
typedef struct breakdown {
    double host[NSEG];   /* seconds summed over the timed steps */
    double wall;
    float *dev[NEV - 1]; /* per step: device ms between consecutive events */
} breakdown;

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}
static double median_us(float *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_float);
    return n ? 1e3 * v[n / 2] : 0;
}

/* events[k][i]: boundary k of timed step i on stream s */
static void record(cudaEvent_t *ev, void *s) { cudaEventRecord(*ev, (cudaStream_t)s); }

static void collect(cudaEvent_t (*ev)[NEV], int steps, int nev, breakdown *b) {
    int i, k;
    cudaEventSynchronize(ev[steps - 1][nev - 1]);
    for (k = 0; k + 1 < nev; k++)
        for (i = 0; i < steps; i++) cudaEventElapsedTime(&b->dev[k][i], ev[i][k], ev[i][k + 1]);
}

static cudaEvent_t (*make_events(int steps))[NEV] {
    cudaEvent_t (*ev)[NEV] = (cudaEvent_t (*)[NEV])calloc((size_t)steps, sizeof *ev);
    int i, k;
    if (!ev) { fprintf(stderr, "out of memory\n"); exit(1); }
    for (i = 0; i < steps; i++)
        for (k = 0; k < NEV; k++)
            if (cudaEventCreate(&ev[i][k]) != cudaSuccess) { fprintf(stderr, "cudaEventCreate failed\n"); exit(1); }
    return ev;
}
static void free_events(cudaEvent_t (*ev)[NEV], int steps) {
    int i, k;
    for (i = 0; i < steps; i++) for (k = 0; k < NEV; k++) cudaEventDestroy(ev[i][k]);
    free(ev);
}

/* plain loop, timed: memset, upload, fwd_bwd, sgd */
static void plain_breakdown(const mlp_shape *s, const mlp_dataset *d, int batch, int steps, float *const *init, breakdown *out) {
    mlp_cuda *m;
    char err[256];
    size_t total = 0, off[MLP_MAX_PARAMS];
    float *flat_p = NULL, *flat_g = NULL, *mom = NULL, *params[MLP_MAX_PARAMS], *grads[MLP_MAX_PARAMS];
    int p, i, k, nb = d->count / batch;
    double t0 = 0, t;
    cudaEvent_t (*ev)[NEV] = make_events(steps);
    void *st;
    memset(out->host, 0, sizeof out->host);
    if (mlp_cuda_create(s, batch, -1, NULL, MLP_CUDA_NEW_STREAM, &m, err, sizeof err)) { fprintf(stderr, "%s\n", err); exit(1); }
    st = mlp_cuda_stream(m);
    for (p = 0; p < mlp_num_params(s); p++) { off[p] = total; total += (mlp_param_numel(s, p) + 63) / 64 * 64; }
    if (cudaMalloc((void **)&flat_p, total * 4) != cudaSuccess || cudaMalloc((void **)&flat_g, total * 4) != cudaSuccess ||
        cudaMalloc((void **)&mom, total * 4) != cudaSuccess) { fprintf(stderr, "cudaMalloc failed\n"); exit(1); }
    for (p = 0; p < mlp_num_params(s); p++) {
        params[p] = flat_p + off[p]; grads[p] = flat_g + off[p];
        mlp_cuda_to_device(m, params[p], init[p], mlp_param_numel(s, p) * 4);
    }
    for (i = 0; i < steps + 20; i++) {
        int b = i % nb, j = i - 20;
        if (i == 20) { mlp_cuda_read_stats(m, NULL, NULL, NULL, 1); t0 = now_s(); }
        if (j >= 0) record(&ev[j][0], st);
        t = now_s();
        cudaMemsetAsync(flat_g, 0, total * 4, (cudaStream_t)st);
        if (j >= 0) { out->host[0] += now_s() - t; record(&ev[j][1], st); }
        t = now_s();
        mlp_cuda_upload(m, d->x + (size_t)b * batch * s->dims[0], d->y + (size_t)b * batch, batch);
        if (j >= 0) out->host[1] += now_s() - t;
        t = now_s();
        mlp_cuda_forward_backward(m, params, grads, batch, 1.0f, NULL, NULL);
        if (j >= 0) { out->host[2] += now_s() - t; record(&ev[j][2], st); }
        t = now_s();
        ddp_k_sgd(flat_p, flat_g, mom, total, 0.01f, 0.9f, 0.0f, 0, i == 0, st);
        if (j >= 0) { out->host[3] += now_s() - t; record(&ev[j][3], st); }
    }
    mlp_cuda_read_stats(m, NULL, NULL, NULL, 1);
    out->wall = now_s() - t0;
    for (k = 0; k < 3; k++) out->dev[k] = (float *)malloc(sizeof(float) * (size_t)steps);
    collect(ev, steps, 4, out);
    free_events(ev, steps);
    cudaFree(flat_p); cudaFree(flat_g); cudaFree(mom);
    mlp_cuda_destroy(m);
}

/* the DDP step written out, timed: step_begin, upload, fwd_bwd (with the
   mark_ready callbacks), step_end, optimizer_step */
static void ddp_breakdown(const mlp_shape *s, const mlp_dataset *d, int batch, int steps, float *const *init, breakdown *out) {
    ddp_config c;
    ddp_context *ctx;
    run r;
    char err[256];
    int p, id, i, k;
    double t0 = 0, t;
    cudaEvent_t (*ev)[NEV] = make_events(steps);
    void *st;
    float *params[MLP_MAX_PARAMS], *grads[MLP_MAX_PARAMS];
    memset(out->host, 0, sizeof out->host);
    memset(&c, 0, sizeof c);
    c.device = DDP_DEVICE_CUDA;
    c.optimizer.type = DDP_OPTIM_SGD; c.optimizer.lr = 0.01f; c.optimizer.momentum = 0.9f;
    if (ddp_create(&c, &ctx) != DDP_SUCCESS) { fprintf(stderr, "ddp_create: %s\n", ddp_create_error()); exit(1); }
    for (p = 0; p < mlp_num_params(s); p++) {
        char name[32];
        mlp_param_name(p, name, sizeof name);
        ddp_register_param(ctx, name, mlp_param_numel(s, p), DDP_F32, init[p], &id);
    }
    if (ddp_finalize(ctx) != DDP_SUCCESS) { fprintf(stderr, "finalize: %s\n", ddp_last_error(ctx)); exit(1); }
    memset(&r, 0, sizeof r);
    if (mlp_cuda_create(s, batch, -1, NULL, MLP_CUDA_NEW_STREAM, &r.model, err, sizeof err)) { fprintf(stderr, "%s\n", err); exit(1); }
    st = mlp_cuda_stream(r.model);
    ddp_set_stream(ctx, st);
    r.shape = *s; r.ctx = ctx;
    for (p = 0; p < mlp_num_params(s); p++) { params[p] = (float *)ddp_param_data(ctx, p); grads[p] = (float *)ddp_param_grad(ctx, p); }
    for (i = 0; i < steps + 20; i++) {
        int b = i % (d->count / batch), j = i - 20, bad = 0;
        if (i == 20) { ddp_synchronize(ctx); t0 = now_s(); g_mark_s = 0; g_mark_calls = 0; g_timing = 1; }
        if (j >= 0) record(&ev[j][0], st);
        t = now_s();
        bad |= ddp_step_begin(ctx) != DDP_SUCCESS;
        if (j >= 0) { out->host[0] += now_s() - t; record(&ev[j][1], st); }
        t = now_s();
        bad |= mlp_cuda_upload(r.model, d->x + (size_t)b * batch * s->dims[0], d->y + (size_t)b * batch, batch) != 0;
        if (j >= 0) out->host[1] += now_s() - t;
        t = now_s();
        bad |= mlp_cuda_forward_backward(r.model, params, grads, batch, 1.0f, mark, &r) != 0;
        if (j >= 0) { out->host[2] += now_s() - t; record(&ev[j][2], st); }
        t = now_s();
        bad |= ddp_step_end(ctx) != DDP_SUCCESS;
        if (j >= 0) { out->host[3] += now_s() - t; record(&ev[j][3], st); }
        t = now_s();
        bad |= ddp_optimizer_step(ctx) != DDP_SUCCESS;
        if (j >= 0) { out->host[4] += now_s() - t; record(&ev[j][4], st); }
        if (bad) { fprintf(stderr, "step %d: %s\n", i, ddp_last_error(ctx)); exit(1); }
    }
    ddp_synchronize(ctx);
    out->wall = now_s() - t0;
    g_timing = 0;
    out->host[5] = g_mark_s;
    for (k = 0; k < 4; k++) out->dev[k] = (float *)malloc(sizeof(float) * (size_t)steps);
    collect(ev, steps, 5, out);
    free_events(ev, steps);
    mlp_cuda_destroy(r.model);
    ddp_destroy(ctx);
}

static void print_breakdown(const char *model, const mlp_shape *s, const mlp_dataset *d, int batch, int steps, float *const *init) {
    breakdown pl, dd;
    double u = 1e6 / steps, psum, dsum;
    int k;
    long marks;
    plain_breakdown(s, d, batch, steps, init, &pl);
    ddp_breakdown(s, d, batch, steps, init, &dd);
    marks = g_mark_calls;
    psum = pl.host[0] + pl.host[1] + pl.host[2] + pl.host[3];
    dsum = dd.host[0] + dd.host[1] + dd.host[2] + dd.host[3] + dd.host[4];
    printf("gpu_step_host model=%s plain: memset=%.2f upload=%.2f fwd_bwd=%.2f sgd=%.2f sum=%.2f wall=%.2f us/step\n",
           model, pl.host[0] * u, pl.host[1] * u, pl.host[2] * u, pl.host[3] * u, psum * u, pl.wall * u);
    printf("gpu_step_host model=%s ddp: step_begin=%.2f upload=%.2f fwd_bwd=%.2f (mark_ready=%.2f x%ld) step_end=%.2f optimizer_step=%.2f "
           "sum=%.2f wall=%.2f us/step; library calls=%.2f us/step vs plain memset+sgd=%.2f\n",
           model, dd.host[0] * u, dd.host[1] * u, dd.host[2] * u, dd.host[5] * u, steps ? marks / steps : 0, dd.host[3] * u, dd.host[4] * u,
           dsum * u, dd.wall * u, (dd.host[0] + dd.host[5] + dd.host[3] + dd.host[4]) * u, (pl.host[0] + pl.host[3]) * u);
    printf("gpu_step_device model=%s plain: zero=%.2f compute=%.2f optimizer=%.2f ddp: zero=%.2f compute=%.2f step_end=%.2f optimizer=%.2f "
           "us/step (medians)\n",
           model, median_us(pl.dev[0], steps), median_us(pl.dev[1], steps), median_us(pl.dev[2], steps),
           median_us(dd.dev[0], steps), median_us(dd.dev[1], steps), median_us(dd.dev[2], steps), median_us(dd.dev[3], steps));
    for (k = 0; k < 3; k++) free(pl.dev[k]);
    for (k = 0; k < 4; k++) free(dd.dev[k]);
    printf("gpu_step_train_step model=%s manual_ms=%.4f (with the timers) train_step_ms=%.4f (ddp_train_step, no timers)\n", model, dd.wall * 1e3 / steps,
           ddp_ms(s, d, batch, steps, init));
}

int main(int argc, char **argv) {
    static const char *models[2] = { "784,256,256,10", "784,1024,1024,10" };
    static const int batches[2] = { 64, 128 };
    int steps = 1000, k, p, worst_ok = 1;
    bench_name = "gpu_step";
    if (argc == 3 && !strcmp(argv[1], "--steps")) steps = atoi(argv[2]);
    if (mlp_cuda_device_count() == 0) { printf("SKIP no CUDA device\n"); return 77; }
    for (k = 0; k < 2; k++) {
        mlp_shape s;
        mlp_dataset d;
        float *init[MLP_MAX_PARAMS];
        double a, b, a2, b2;
        mlp_shape_parse(models[k], &s);
        mlp_synthetic(&d, batches[k] * 16, 784, 10, 1);
        for (p = 0; p < mlp_num_params(&s); p++) init[p] = (float *)malloc(mlp_param_numel(&s, p) * 4);
        mlp_init_params(&s, 1, init);
        /* alternate, twice each, and keep the better of each: the spread shows in the two rows */
        a = plain_ms(&s, &d, batches[k], steps, init);
        b = ddp_ms(&s, &d, batches[k], steps, init);
        a2 = plain_ms(&s, &d, batches[k], steps, init);
        b2 = ddp_ms(&s, &d, batches[k], steps, init);
        {   /* for reference: the same with the NCCL all-reduce forced at world 1 */
            double f;
            bench_setenv("DDP_FORCE_COMM", "1");
            f = ddp_ms(&s, &d, batches[k], steps, init);
            bench_setenv("DDP_FORCE_COMM", NULL);
            printf("gpu_step model=%s forced_nccl_ms=%.4f\n", models[k], f);
        }
        printf("gpu_step model=%s params=%zu batch=%d local_ms=%.4f ddp_ms=%.4f overhead=%.3f (runs: local %.4f %.4f, ddp %.4f %.4f)\n",
               models[k], mlp_total_numel(&s), batches[k], a < a2 ? a : a2, b < b2 ? b : b2,
               (b < b2 ? b : b2) / (a < a2 ? a : a2), a, a2, b, b2);
        if ((b < b2 ? b : b2) / (a < a2 ? a : a2) > 1.03) worst_ok = 0;
        print_breakdown(models[k], &s, &d, batches[k], steps < 500 ? steps : 500, init);
        for (p = 0; p < mlp_num_params(&s); p++) free(init[p]);
        mlp_dataset_free(&d);
    }
    printf("target ddp world 1 overhead <= 1.03: %s\n", worst_ok ? "PASS" : "MISS");
    return 0;
}
