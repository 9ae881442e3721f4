/* bench/gpu_step: the example model's training step on the GPU, with DDP
   (world size 1, NCCL unless DDP_BACKEND says otherwise) against the same
   loop without the library (plain cudaMalloc'd flat buffers, the same
   cuBLAS forward/backward, the same fused SGD kernel), in the same run.

       ddprun -n 1 build/bench/gpu_step [--steps N]

   Prints one row per model:
     gpu_step model=784-256-256-10 params=P batch=B local_ms=X ddp_ms=Y overhead=Y/X
   (a world of one exchanges nothing; a second row gives the step time with
   the NCCL all-reduce forced anyway, DDP_FORCE_COMM=1)
   and a final line checking the target (overhead <= 1.03). */
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

static void mark(int p, void *user) {
    run *r = (run *)user;
    ddp_mark_ready_stream(r->ctx, p, mlp_cuda_stream(r->model));
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
        for (p = 0; p < mlp_num_params(&s); p++) free(init[p]);
        mlp_dataset_free(&d);
    }
    printf("target ddp world 1 overhead <= 1.03: %s\n", worst_ok ? "PASS" : "MISS");
    return 0;
}
