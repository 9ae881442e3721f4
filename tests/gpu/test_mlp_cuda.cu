/* test_mlp_cuda.cu - the GPU model (examples/mlp_cuda.cu) against its CPU
   reference (examples/mlp.h): same weights, same batch, same starting
   gradients; compares the loss, the correct count, every gradient (what
   was ADDED, so beta = 1 accumulation is checked too), the on_grad_ready
   order, batch 0, statistics reset and evaluation. cuBLAS in pedantic FP32
   (no TF32), so the tolerance is 1e-4 relative.

   nvcc -std=c++17 -arch=sm_90 -O2 -I. tests/gpu/test_mlp_cuda.cu \
        examples/mlp_cuda.cu -lcublas -o test_mlp_cuda

   Prints PASS/FAIL lines and "mlp_cuda: N passed, M failed"; exit status 0
   when all pass, 1 on a failure, 77 (skip) without a CUDA device. */
#define MLP_NO_ZLIB
#define MLP_IMPLEMENTATION
#include "../../examples/mlp.h"
#include "../../examples/mlp_cuda.h"

#include <cuda_runtime.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int g_passed, g_failed;

static void check(bool ok, const char *tag, const char *what, double value, double limit)
{
    if (ok) g_passed++; else g_failed++;
    printf("%s %-22s %-34s %.3g (limit %.3g)\n", ok ? "PASS" : "FAIL", tag, what, value, limit);
    fflush(stdout);
}

/* stops the test on a CUDA failure outside the model */
#define CUDA_OK(call)                                                               \
    do {                                                                            \
        cudaError_t e_ = (call);                                                    \
        if (e_ != cudaSuccess) {                                                    \
            printf("FAIL %s at %s:%d: %s\n", #call, __FILE__, __LINE__,             \
                   cudaGetErrorString(e_));                                         \
            printf("mlp_cuda: %d passed, %d failed\n", g_passed, g_failed + 1);     \
            exit(1);                                                                \
        }                                                                           \
    } while (0)

#define MODEL_OK(m, call)                                                           \
    do {                                                                            \
        if ((call) != 0) {                                                          \
            printf("FAIL %s: %s\n", #call, mlp_cuda_error(m));                      \
            printf("mlp_cuda: %d passed, %d failed\n", g_passed, g_failed + 1);     \
            exit(1);                                                                \
        }                                                                           \
    } while (0)

typedef struct order_log { int n; int ids[64]; } order_log;

static void on_ready(int p, void *user)
{
    order_log *o = (order_log *)user;
    if (o->n < 64) o->ids[o->n] = p;
    o->n++;
}

static bool order_ok(const order_log *o, int np)
{
    if (o->n != np) return false;
    for (int i = 0; i < np; i++) if (o->ids[i] != np - 1 - i) return false;
    return true;
}

/* max |a - b| / max |b| */
static double rel_err(const float *a, const float *b, size_t n)
{
    double d = 0.0, r = 0.0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - (double)b[i]);
        if (e > d) d = e;
        if (fabs((double)b[i]) > r) r = fabs((double)b[i]);
    }
    return r > 0.0 ? d / r : d;
}

static void run_case(const char *dims, int B, float scale, uint64_t seed)
{
    mlp_shape s;
    char tag[64], err[512];
    if (mlp_shape_parse(dims, &s)) { check(false, dims, "parse shape", 0, 0); return; }
    snprintf(tag, sizeof tag, "%s B=%d", dims, B);
    const int np = mlp_num_params(&s);
    float *hp[MLP_MAX_PARAMS] = {0}, *g0[MLP_MAX_PARAMS] = {0};
    float *gc[MLP_MAX_PARAMS] = {0}, *gg[MLP_MAX_PARAMS] = {0};
    float *dp[MLP_MAX_PARAMS] = {0}, *dg[MLP_MAX_PARAMS] = {0};
    mlp_rng r = mlp_rng_seed(seed + 17);

    mlp_cuda *m = NULL;
    if (mlp_cuda_create(&s, B, 0, NULL, MLP_CUDA_NEW_STREAM | MLP_CUDA_PEDANTIC, &m, err, sizeof err)) {
        check(false, tag, err, 0, 0);
        return;
    }
    for (int p = 0; p < np; p++) {
        size_t n = mlp_param_numel(&s, p);
        hp[p] = (float *)malloc(n * sizeof(float));
        g0[p] = (float *)malloc(n * sizeof(float));
        gc[p] = (float *)malloc(n * sizeof(float));
        gg[p] = (float *)malloc(n * sizeof(float));
        /* nonzero start: checks +=; small, so that subtracting it again to
           get the increment does not cancel away the digits compared */
        for (size_t i = 0; i < n; i++) g0[p][i] = 1e-3f * (mlp_rng_uniform(&r) - 0.5f);
        CUDA_OK(cudaMalloc((void **)&dp[p], n * sizeof(float)));
        CUDA_OK(cudaMalloc((void **)&dg[p], n * sizeof(float)));
    }
    mlp_init_params(&s, seed, hp);
    for (int p = 0; p < np; p++) {
        size_t n = mlp_param_numel(&s, p);
        memcpy(gc[p], g0[p], n * sizeof(float));
        CUDA_OK(cudaMemcpy(dp[p], hp[p], n * sizeof(float), cudaMemcpyHostToDevice));
        CUDA_OK(cudaMemcpy(dg[p], g0[p], n * sizeof(float), cudaMemcpyHostToDevice));
    }
    mlp_dataset d;
    if (mlp_synthetic(&d, B, s.dims[0], s.dims[s.num_layers], seed + 5)) {
        check(false, tag, "synthetic data", 0, 0);
        return;
    }

    /* CPU reference */
    mlp_workspace ws;
    if (mlp_workspace_init(&ws, &s, B)) { check(false, tag, "workspace", 0, 0); return; }
    int ok_cpu = 0;
    float loss_cpu = mlp_forward_backward(hp, d.x, d.y, B, scale, gc, &ws, &ok_cpu, NULL, NULL);

    /* GPU */
    order_log ord;
    memset(&ord, 0, sizeof ord);
    MODEL_OK(m, mlp_cuda_upload(m, d.x, d.y, B));
    MODEL_OK(m, mlp_cuda_forward_backward(m, dp, dg, B, scale, on_ready, &ord));
    double loss_gpu = 0.0;
    int64_t ok_gpu = -1, calls = -1;
    MODEL_OK(m, mlp_cuda_read_stats(m, &loss_gpu, &ok_gpu, &calls, 1));

    double le = fabs(loss_gpu - loss_cpu) / fabs((double)loss_cpu);
    check(le <= 1e-4, tag, "loss (scaled mean)", le, 1e-4);
    check(ok_gpu == ok_cpu && calls == 1, tag, "correct count, calls", (double)ok_gpu, ok_cpu);
    check(order_ok(&ord, np), tag, "on_grad_ready backward order", ord.n, np);
    for (int p = 0; p < np; p++) {
        size_t n = mlp_param_numel(&s, p);
        char name[32], what[64];
        MODEL_OK(m, mlp_cuda_to_host(m, gg[p], dg[p], n * sizeof(float)));
        for (size_t i = 0; i < n; i++) { gg[p][i] -= g0[p][i]; gc[p][i] -= g0[p][i]; }
        double e = rel_err(gg[p], gc[p], n);
        mlp_param_name(p, name, sizeof name);
        snprintf(what, sizeof what, "%s added gradient", name);
        check(e <= 1e-4, tag, what, e, 1e-4);
    }

    /* statistics were reset; batch 0 adds nothing and reports every id */
    memset(&ord, 0, sizeof ord);
    MODEL_OK(m, mlp_cuda_upload(m, d.x, d.y, 0));
    MODEL_OK(m, mlp_cuda_forward_backward(m, dp, dg, 0, scale, on_ready, &ord));
    MODEL_OK(m, mlp_cuda_read_stats(m, &loss_gpu, &ok_gpu, &calls, 0));
    {
        double moved = 0.0;
        for (int p = 0; p < np; p++) {
            size_t n = mlp_param_numel(&s, p);
            float *t = (float *)malloc(n * sizeof(float));
            MODEL_OK(m, mlp_cuda_to_host(m, t, dg[p], n * sizeof(float)));
            for (size_t i = 0; i < n; i++) moved += fabs((double)t[i] - (gg[p][i] + g0[p][i]));
            free(t);
        }
        check(moved == 0.0 && order_ok(&ord, np) && loss_gpu == 0.0 && ok_gpu == 0 && calls == 1,
              tag, "batch 0: no change, all marked", moved, 0);
    }

    /* errors are reported, not crashes: more rows than uploaded */
    check(mlp_cuda_forward_backward(m, dp, dg, B + 1, 1.0f, NULL, NULL) != 0 &&
          strstr(mlp_cuda_error(m), "uploaded") != NULL, tag, "batch > uploaded is an error", 0, 0);

    for (int p = 0; p < np; p++) {
        free(hp[p]); free(g0[p]); free(gc[p]); free(gg[p]);
        CUDA_OK(cudaFree(dp[p])); CUDA_OK(cudaFree(dg[p]));
    }
    mlp_workspace_free(&ws);
    mlp_dataset_free(&d);
    mlp_cuda_destroy(m);
}

/* evaluation over many chunks (last one partial) vs the CPU count, and a
   forward-only pass */
static void eval_case(void)
{
    const char *tag = "eval 784-256-256-10";
    mlp_shape s = mlp_shape_default();
    char err[512];
    float *hp[MLP_MAX_PARAMS] = {0}, *dp[MLP_MAX_PARAMS] = {0};
    const int n = 1000;
    mlp_dataset d;
    mlp_workspace ws;
    mlp_cuda *m = NULL;
    if (mlp_cuda_create(&s, 64, 0, NULL, MLP_CUDA_NEW_STREAM | MLP_CUDA_PEDANTIC, &m, err, sizeof err)) {
        check(false, tag, err, 0, 0);
        return;
    }
    for (int p = 0; p < 6; p++) {
        size_t k = mlp_param_numel(&s, p);
        hp[p] = (float *)malloc(k * sizeof(float));
        CUDA_OK(cudaMalloc((void **)&dp[p], k * sizeof(float)));
    }
    mlp_init_params(&s, 3, hp);
    for (int p = 0; p < 6; p++)
        CUDA_OK(cudaMemcpy(dp[p], hp[p], mlp_param_numel(&s, p) * sizeof(float), cudaMemcpyHostToDevice));
    if (mlp_synthetic(&d, n, 784, 10, 11) || mlp_workspace_init(&ws, &s, 64)) {
        check(false, tag, "setup", 0, 0);
        return;
    }
    int cpu = mlp_evaluate(hp, d.x, d.y, n, &ws), gpu = -1;
    MODEL_OK(m, mlp_cuda_evaluate(m, dp, d.x, d.y, n, &gpu));
    /* a row whose two top logits are within rounding may flip */
    check(abs(cpu - gpu) <= 1, tag, "correct count vs CPU", gpu, cpu);

    int ok_cpu = 0;
    float loss_cpu = mlp_forward(hp, d.x, d.y, 64, &ws, &ok_cpu);
    double loss = 0.0;
    int64_t ok = -1, calls = -1;
    MODEL_OK(m, mlp_cuda_upload(m, d.x, d.y, 64));
    MODEL_OK(m, mlp_cuda_forward(m, dp, 64));
    MODEL_OK(m, mlp_cuda_upload(m, d.x, d.y, 64));
    MODEL_OK(m, mlp_cuda_forward(m, dp, 64));
    MODEL_OK(m, mlp_cuda_read_stats(m, &loss, &ok, &calls, 1));
    double le = fabs(loss - 2.0 * loss_cpu) / (2.0 * loss_cpu);
    check(le <= 1e-4 && ok == 2 * ok_cpu && calls == 2, tag, "forward x2: stats accumulate", le, 1e-4);

    /* how long a training step of the model takes (information only) */
    {
        float *dg[6] = {0};
        cudaEvent_t t0, t1;
        float ms = 0.0f;
        const int steps = 200;
        for (int p = 0; p < 6; p++) {
            CUDA_OK(cudaMalloc((void **)&dg[p], mlp_param_numel(&s, p) * sizeof(float)));
            CUDA_OK(cudaMemset(dg[p], 0, mlp_param_numel(&s, p) * sizeof(float)));
        }
        cudaStream_t st = (cudaStream_t)mlp_cuda_stream(m);
        CUDA_OK(cudaEventCreate(&t0));
        CUDA_OK(cudaEventCreate(&t1));
        MODEL_OK(m, mlp_cuda_upload(m, d.x, d.y, 64));
        MODEL_OK(m, mlp_cuda_forward_backward(m, dp, dg, 64, 1.0f, NULL, NULL));
        CUDA_OK(cudaEventRecord(t0, st));
        for (int i = 0; i < steps; i++) {
            MODEL_OK(m, mlp_cuda_upload(m, d.x + (size_t)(i % 8) * 64 * 784, d.y + (i % 8) * 64, 64));
            MODEL_OK(m, mlp_cuda_forward_backward(m, dp, dg, 64, 1.0f, NULL, NULL));
        }
        CUDA_OK(cudaEventRecord(t1, st));
        CUDA_OK(cudaEventSynchronize(t1));
        CUDA_OK(cudaEventElapsedTime(&ms, t0, t1));
        printf("INFO 784-256-256-10 B=64 upload+forward+backward: %.1f us/step (%.0f samples/s)\n",
               1000.0 * ms / steps, 64.0 * steps / (ms / 1000.0));
        CUDA_OK(cudaEventDestroy(t0));
        CUDA_OK(cudaEventDestroy(t1));
        for (int p = 0; p < 6; p++) CUDA_OK(cudaFree(dg[p]));
    }

    for (int p = 0; p < 6; p++) { free(hp[p]); CUDA_OK(cudaFree(dp[p])); }
    mlp_workspace_free(&ws);
    mlp_dataset_free(&d);
    mlp_cuda_destroy(m);
}

int main(void)
{
    /* belt and braces: no TF32 anywhere (the models ask for pedantic FP32) */
    setenv("NVIDIA_TF32_OVERRIDE", "0", 1);
    if (mlp_cuda_device_count() < 1) {
        printf("SKIP no CUDA device\nmlp_cuda: 0 passed, 0 failed (skipped)\n");
        return 77;
    }
    {
        cudaDeviceProp prop;
        CUDA_OK(cudaGetDeviceProperties(&prop, 0));
        printf("INFO device 0: %s, sm_%d%d\n", prop.name, prop.major, prop.minor);
    }
    run_case("784,256,256,10", 64, 1.0f, 1);
    run_case("37,19,23,7", 13, 0.75f, 2);   /* odd sizes: catches ld / transpose mix-ups */
    run_case("5,3", 1, 2.0f, 3);            /* one layer, one row */
    run_case("40,70,33,5,12", 37, 1.0f, 4); /* four layers, classes < 32 lanes and > labels */
    eval_case();
    printf("mlp_cuda: %d passed, %d failed\n", g_passed, g_failed);
    return g_failed ? 1 : 0;
}
