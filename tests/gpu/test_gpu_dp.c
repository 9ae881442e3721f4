/* dp.h on the GPU: two replicas on GPU 0 (the staged backend, since the GPU
   repeats), each with its own cuBLAS model on its replica stream, an uneven
   split (16 and 15 rows). Must match one CPU replica on the whole batch
   within fp32 tolerance, with the replicas bitwise identical.
   C (gcc); the implementation TU is examples/dp_impl.cu. */
#include "../../dp.h"
#define MLP_IMPLEMENTATION
#define MLP_NO_ZLIB
#include "../../examples/mlp.h"
#include "../../examples/mlp_cuda.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct state {
    mlp_shape shape;
    mlp_cuda *model[DP_MAX_DEVICES];
    mlp_workspace ws;      /* the CPU reference */
    int max_rows;
} state;

static void on_ready(int p, void *user) {
    const dp_replica *r = (const dp_replica *)user;
    ddp_mark_ready_stream(r->ctx, p, r->stream);
}

static int gpu_fb(const dp_replica *r, void *user, float *loss) {
    state *st = (state *)user;
    float *params[MLP_MAX_PARAMS], *grads[MLP_MAX_PARAMS];
    char err[256];
    int p;
    if (!st->model[r->index] &&
        mlp_cuda_create(&st->shape, st->max_rows, r->device, r->stream, MLP_CUDA_PEDANTIC, &st->model[r->index], err, sizeof err) != 0) {
        fprintf(stderr, "replica %d: %s\n", r->index, err);
        return 1;
    }
    for (p = 0; p < mlp_num_params(&st->shape); p++) {
        params[p] = (float *)ddp_param_data(r->ctx, p);
        grads[p] = (float *)ddp_param_grad(r->ctx, p);
    }
    if (mlp_cuda_upload(st->model[r->index], (const float *)r->input, (const uint8_t *)r->labels, r->rows) != 0) return 2;
    if (mlp_cuda_forward_backward(st->model[r->index], params, grads, r->rows, r->grad_scale, on_ready, (void *)r) != 0) return 3;
    *loss = 0;
    return 0;
}

static void cpu_ready(int p, void *user) { ddp_mark_ready((ddp_context *)user, p); }

static int cpu_fb(const dp_replica *r, void *user, float *loss) {
    state *st = (state *)user;
    float *params[MLP_MAX_PARAMS], *grads[MLP_MAX_PARAMS];
    int p;
    for (p = 0; p < mlp_num_params(&st->shape); p++) {
        params[p] = (float *)ddp_param_data(r->ctx, p);
        grads[p] = (float *)ddp_param_grad(r->ctx, p);
    }
    *loss = mlp_forward_backward(params, (const float *)r->input, (const uint8_t *)r->labels, r->rows, r->grad_scale,
                                 grads, &st->ws, NULL, cpu_ready, r->ctx);
    return 0;
}

static dp_context *make(ddp_device dev, int K, const int *ids, const mlp_shape *s, float *const *init) {
    dp_config c;
    dp_context *dp;
    int p, id;
    memset(&c, 0, sizeof c);
    c.num_devices = K;
    c.device_ids = ids;
    c.device = dev;
    c.ddp.timeout_s = 60;
    c.ddp.optimizer.type = DDP_OPTIM_ADAMW;
    c.ddp.optimizer.lr = 0.01f;
    c.ddp.optimizer.weight_decay = 0.01f;
    c.ddp.first_bucket_bytes = 4096;
    c.ddp.bucket_bytes = 8192;
    if (dp_create(&c, &dp) != DDP_SUCCESS) { fprintf(stderr, "dp_create: %s\n", ddp_create_error()); exit(3); }
    for (p = 0; p < mlp_num_params(s); p++) {
        char name[32];
        mlp_param_name(p, name, sizeof name);
        dp_register_param(dp, name, mlp_param_numel(s, p), DDP_F32, init[p], &id);
    }
    if (dp_finalize(dp) != DDP_SUCCESS) { fprintf(stderr, "dp_finalize: %s\n", dp_last_error(dp)); exit(3); }
    return dp;
}

int main(void) {
    static const int ids[2] = { 0, 0 };
    state gs, cs;
    mlp_dataset data;
    float *init[MLP_MAX_PARAMS], *host;
    dp_context *gpu, *cpu;
    int p, s, i, same = 0, steps = 4, rows = 31, ok;
    double maxdiff = 0, maxref = 0;
    if (mlp_cuda_device_count() == 0) { printf("SKIP no CUDA device\n"); return 77; }
    memset(&gs, 0, sizeof gs);
    memset(&cs, 0, sizeof cs);
    mlp_shape_parse("64,48,32,10", &gs.shape);
    cs.shape = gs.shape;
    gs.max_rows = rows;
    mlp_workspace_init(&cs.ws, &cs.shape, rows);
    for (p = 0; p < mlp_num_params(&gs.shape); p++) init[p] = (float *)malloc(mlp_param_numel(&gs.shape, p) * sizeof(float));
    mlp_init_params(&gs.shape, 3, init);
    mlp_synthetic(&data, steps * rows, 64, 10, 11);
    gpu = make(DDP_DEVICE_CUDA, 2, ids, &gs.shape, init);
    cpu = make(DDP_DEVICE_CPU, 1, NULL, &cs.shape, init);
    for (s = 0; s < steps; s++) {
        dp_batch b;
        memset(&b, 0, sizeof b);
        b.input = data.x + (size_t)s * rows * 64; b.input_row_bytes = 64 * sizeof(float); b.rows = rows;
        b.labels = data.y + (size_t)s * rows; b.labels_row_bytes = 1;
        if (dp_step(gpu, &b, gpu_fb, &gs, NULL, NULL) != DDP_SUCCESS) { fprintf(stderr, "FAIL gpu step: %s\n", dp_last_error(gpu)); return 1; }
        if (dp_step(cpu, &b, cpu_fb, &cs, NULL, NULL) != DDP_SUCCESS) { fprintf(stderr, "FAIL cpu step: %s\n", dp_last_error(cpu)); return 1; }
    }
    if (dp_check_replicas(gpu, &same) != DDP_SUCCESS) { fprintf(stderr, "FAIL check: %s\n", dp_last_error(gpu)); return 1; }
    for (p = 0; p < mlp_num_params(&gs.shape); p++) {
        size_t n = mlp_param_numel(&gs.shape, p);
        const float *ref = (const float *)ddp_param_data(dp_replica_context(cpu, 0), p);
        host = (float *)malloc(n * sizeof(float));
        mlp_cuda_to_host(gs.model[1], host, ddp_param_data(dp_replica_context(gpu, 1), p), n * sizeof(float));
        for (i = 0; i < (int)n; i++) {
            double d = fabs((double)host[i] - ref[i]);
            if (!(d == d)) d = INFINITY;
            if (d > maxdiff) maxdiff = d;
            if (fabs(ref[i]) > maxref) maxref = fabs(ref[i]);
        }
        free(host);
    }
    ok = same && maxdiff / maxref <= 1e-4;
    printf("%s dp_gpu replicas=2 device=0,0 backend=%s rows=16+15 max_rel_diff_vs_cpu=%.3g replicas_identical=%s\n",
           ok ? "PASS" : "FAIL", ddp_backend_name(ddp_query_backend(dp_replica_context(gpu, 0))), maxdiff / maxref, same ? "yes" : "no");
    for (i = 0; i < 2; i++) mlp_cuda_destroy(gs.model[i]);
    dp_destroy(gpu);
    dp_destroy(cpu);
    mlp_workspace_free(&cs.ws);
    mlp_dataset_free(&data);
    for (p = 0; p < mlp_num_params(&gs.shape); p++) free(init[p]);
    return ok ? 0 : 1;
}
