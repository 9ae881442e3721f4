/* gpu_adamw.cu - bandwidth of the fused optimizer kernels of ddp_kernels.cuh
   against a device-to-device copy measured in the same run

   Usage: gpu_adamw [--n N] [--reps R]     (N default 100000000, R >= 20)

   Output, one row per measurement (GB/s = 1e9 bytes per second; bytes
   read + written; time is the median of R reps after 3 warm-ups, timed
   with CUDA events around each launch):

       device name=<name> sms=<count>
       baseline d2d_copy_GBps <X> n=<N> time_us=<t>        cudaMemcpyAsync of 4N bytes, counted 8N
       adamw n=<N> time_us=<t> GBps=<X> ratio_vs_copy=<r>   28 bytes/element: reads param grad m v, writes param m v
       sgd n=<N> time_us=<t> GBps=<X> ratio_vs_copy=<r>     momentum 0.9: 20 bytes/element
       adamw_mixed_bf16 n=<N> time_us=<t> GBps=<X> ratio_vs_copy=<r>   bf16 grad and copy: 28 bytes/element
       sumsq n=<N> time_us=<t> GBps=<X> ratio_vs_copy=<r>   4 bytes/element
       target adamw >= 0.80 of copy: PASS|MISS

   Exit status 0 when it measured (PASS or MISS), 1 on a CUDA error, 2 on
   bad arguments.

   Build: nvcc -std=c++17 -O3 -arch=sm_90 -I. bench/gpu_adamw.cu -o gpu_adamw */
#define DDP_KERNELS_IMPLEMENTATION
#include "ddp_kernels.cuh"

#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <algorithm>
#include <vector>

#define CK(call)                                                                          \
    do {                                                                                  \
        const cudaError_t e_ = (call);                                                    \
        if (e_ != cudaSuccess) {                                                          \
            fprintf(stderr, "gpu_adamw: %s at %s:%d: %s (%d)\n", #call, __FILE__, __LINE__, \
                    cudaGetErrorString(e_), (int)e_);                                     \
            exit(1);                                                                      \
        }                                                                                 \
    } while (0)

/* A launcher's return code is a cudaError_t. */
#define CKL(call) CK((cudaError_t)(call))

static __device__ __forceinline__ uint32_t hash32(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return (uint32_t)x;
}

/* x[i] = bias + scale * u, u uniform in (-1, 1) (or (0, 1) if positive),
   never exactly 0. */
static __global__ void init_kernel(float *x, size_t n, uint32_t salt, float scale, float bias,
                                   int positive)
{
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t i;
    for (i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float u = ((float)(hash32(i * 0x9e3779b97f4a7c15ull + salt) >> 8) + 0.5f) *
                        (1.0f / 16777216.0f); /* (0, 1) */
        x[i] = bias + scale * (positive ? u : 2.0f * u - 1.0f + (1.0f / 33554432.0f));
    }
}

static cudaStream_t g_stream; /* everything runs on it, in order */
static cudaEvent_t g_ev0, g_ev1;

static void init(float *x, size_t n, uint32_t salt, float scale, float bias, int positive)
{
    init_kernel<<<1024, 256, 0, g_stream>>>(x, n, salt, scale, bias, positive);
    CK(cudaGetLastError());
}

/* Median time in microseconds of fn(rep) over reps timed launches, after 3
   warm-ups. */
template <class F> static double median_us(F fn, int reps)
{
    std::vector<float> ms((size_t)reps);
    int r;
    for (r = 0; r < 3; r++) fn(r);
    CK(cudaStreamSynchronize(g_stream));
    for (r = 0; r < reps; r++) {
        CK(cudaEventRecord(g_ev0, g_stream));
        fn(3 + r);
        CK(cudaEventRecord(g_ev1, g_stream));
        CK(cudaEventSynchronize(g_ev1));
        CK(cudaEventElapsedTime(&ms[(size_t)r], g_ev0, g_ev1));
    }
    std::sort(ms.begin(), ms.end());
    return 1e3 * (reps % 2 ? ms[(size_t)reps / 2]
                           : 0.5 * (ms[(size_t)reps / 2 - 1] + ms[(size_t)reps / 2]));
}

static double gbps(double bytes, double us) { return bytes / (us * 1e3); }

static void row(const char *name, size_t n, double us, double bytes, double copy_gbps)
{
    printf("%s n=%zu time_us=%.1f GBps=%.1f ratio_vs_copy=%.3f\n", name, n, us, gbps(bytes, us),
           gbps(bytes, us) / copy_gbps);
    fflush(stdout);
}

int main(int argc, char **argv)
{
    size_t n = 100000000;
    int reps = 30, i;
    float *p, *g, *m, *v, *scratch, *out;
    void *p16, *g16;
    cudaDeviceProp prop;
    double copy_us, copy_gbps, adamw_us, t;
    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--n") && i + 1 < argc) n = (size_t)strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else { fprintf(stderr, "usage: %s [--n N] [--reps R]\n", argv[0]); return 2; }
    }
    if (n < 1 || reps < 20) {
        fprintf(stderr, "gpu_adamw: need N >= 1 and R >= 20\n");
        return 2;
    }
    CK(cudaSetDevice(0));
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("device name=%s sms=%d\n", prop.name, prop.multiProcessorCount);
    CK(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking));
    CK(cudaEventCreate(&g_ev0));
    CK(cudaEventCreate(&g_ev1));
    CK(cudaMalloc((void **)&p, n * sizeof(float)));
    CK(cudaMalloc((void **)&g, n * sizeof(float)));
    CK(cudaMalloc((void **)&m, n * sizeof(float)));
    CK(cudaMalloc((void **)&v, n * sizeof(float)));
    CK(cudaMalloc(&p16, n * 2));
    CK(cudaMalloc(&g16, n * 2));
    CK(cudaMalloc((void **)&scratch, ddp_k_sumsq_scratch_elems() * sizeof(float)));
    CK(cudaMalloc((void **)&out, sizeof(float)));
    init(p, n, 1, 1.0f, 0.0f, 0);
    init(g, n, 2, 1.0f, 0.0f, 0);
    CK(cudaStreamSynchronize(g_stream));

    /* Baseline: copy 4N bytes (grad into m), counted read + write. */
    copy_us = median_us([&](int) { CK(cudaMemcpyAsync(m, g, n * sizeof(float),
                                                      cudaMemcpyDeviceToDevice, g_stream)); },
                        reps);
    copy_gbps = gbps(8.0 * (double)n, copy_us);
    printf("baseline d2d_copy_GBps %.1f n=%zu time_us=%.1f\n", copy_gbps, n, copy_us);
    fflush(stdout);

    init(m, n, 3, 0.1f, 0.0f, 0);
    init(v, n, 4, 0.01f, 1e-6f, 1);
    CK(cudaStreamSynchronize(g_stream));
    adamw_us = median_us([&](int r) { CKL(ddp_k_adamw(p, g, m, v, n, 1e-4f, 0.9f, 0.999f, 1e-8f,
                                                      0.01f, 1 + r, g_stream)); },
                         reps);
    row("adamw", n, adamw_us, 28.0 * (double)n, copy_gbps);

    /* m serves as the momentum buffer (any finite values). */
    t = median_us([&](int) { CKL(ddp_k_sgd(p, g, m, n, 1e-4f, 0.9f, 0.0f, 0, 0, g_stream)); },
                  reps);
    row("sgd", n, t, 20.0 * (double)n, copy_gbps);

    init(m, n, 3, 0.1f, 0.0f, 0);
    CKL(ddp_k_cast(g16, DDP_K_BF16, g, DDP_K_F32, n, 1.0f, g_stream));
    CK(cudaStreamSynchronize(g_stream));
    t = median_us([&](int r) { CKL(ddp_k_adamw_mixed(p16, DDP_K_BF16, p, g16, DDP_K_BF16, m, v,
                                                     n, 1e-4f, 0.9f, 0.999f, 1e-8f, 0.01f,
                                                     1 + r, g_stream)); },
                  reps);
    row("adamw_mixed_bf16", n, t, 28.0 * (double)n, copy_gbps);

    t = median_us([&](int) { CKL(ddp_k_sumsq(g, n, out, scratch, ddp_k_sumsq_scratch_elems(),
                                             g_stream)); },
                  reps);
    row("sumsq", n, t, 4.0 * (double)n, copy_gbps);

    CK(cudaDeviceSynchronize());
    printf("target adamw >= 0.80 of copy: %s\n",
           gbps(28.0 * (double)n, adamw_us) >= 0.80 * copy_gbps ? "PASS" : "MISS");

    CK(cudaFree(p)); CK(cudaFree(g)); CK(cudaFree(m)); CK(cudaFree(v));
    CK(cudaFree(p16)); CK(cudaFree(g16)); CK(cudaFree(scratch)); CK(cudaFree(out));
    CK(cudaEventDestroy(g_ev0));
    CK(cudaEventDestroy(g_ev1));
    CK(cudaStreamDestroy(g_stream));
    return 0;
}
