/* mlp_cuda.cu - the MLP of mlp.h on a CUDA GPU (declarations and contract
   in mlp_cuda.h). cuBLAS does the GEMMs, small kernels do the rest; the
   CPU reference for every kernel is the matching function in mlp.h, and
   tests/gpu/test_mlp_cuda.cu compares the two.

   Row-major data through column-major cuBLAS: a row-major [r, c] matrix is
   the column-major [c, r] matrix with leading dimension c, its transpose.
   So for a layer with x [B, in], W [out, in], z [B, out] (all row-major):
       z  = x W^T        ->  z^T  = W x^T  : gemm(T, N, out, B, in,  W, in,  x, in,  z, out)
       dW += dz^T x      ->  dW^T += x^T dz: gemm(N, T, in, out, B,  x, in,  dz, out, dW, in), beta 1
       dx = dz W         ->  dx^T = W^T dz^T: gemm(N, N, in, B, out, W, in,  dz, out, dx, in)

   nvcc -std=c++17 -O2 -c examples/mlp_cuda.cu ; link -lcublas -lcudart */
#include "mlp_cuda.h"

#include <cuda_runtime.h>
#include <cublas_v2.h>

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct mlp_cuda {
    mlp_shape shape;
    int max_batch, device, flags, batch;
    cudaStream_t stream;
    int own_stream;
    cublasHandle_t blas;
    float *x;                          /* [max_batch, dims[0]] */
    uint8_t *y;                        /* [max_batch] */
    float *act[MLP_MAX_LAYERS + 1];    /* ReLU outputs, 1 <= l < L */
    float *logits;                     /* [max_batch, C] */
    float *delta[2];                   /* [max_batch, max dim] */
    float *row_loss;                   /* [max_batch] */
    int *row_ok;                       /* [max_batch] */
    double *stat_loss;                 /* device: sum of scaled mean losses */
    long long *stat_ok;                /* device: [0] train correct, [1] eval correct */
    long long calls;                   /* host: forward calls since reset */
    float *stage_x[2];                 /* pinned */
    uint8_t *stage_y[2];
    cudaEvent_t staged[2];             /* the copy out of stage slot k is done */
    int slot;
    void *host_stats;                  /* pinned: double + 2 long long */
    char error[512];
};

/* ---- errors -------------------------------------------------------------- */

static void mlp_cuda__set_error(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    if (!buf || size == 0) return;
    va_start(ap, fmt);
    vsnprintf(buf, size, fmt, ap);
    va_end(ap);
}

/* Each check evaluates its call once, keeps the result, and returns -1 with
   the message (call, place, error string) in the model. */
#define MLP_CUDA_CHECK(m, call)                                                          \
    do {                                                                                 \
        cudaError_t mlp_e_ = (call);                                                     \
        if (mlp_e_ != cudaSuccess) {                                                     \
            mlp_cuda__set_error((m)->error, sizeof (m)->error, "%s failed at %s:%d: %s (%s)", \
                                #call, __FILE__, __LINE__, cudaGetErrorString(mlp_e_),   \
                                cudaGetErrorName(mlp_e_));                               \
            return -1;                                                                   \
        }                                                                                \
    } while (0)

#define MLP_CUBLAS_CHECK(m, call)                                                        \
    do {                                                                                 \
        cublasStatus_t mlp_s_ = (call);                                                  \
        if (mlp_s_ != CUBLAS_STATUS_SUCCESS) {                                           \
            mlp_cuda__set_error((m)->error, sizeof (m)->error, "%s failed at %s:%d: %s (%s)", \
                                #call, __FILE__, __LINE__, cublasGetStatusString(mlp_s_), \
                                cublasGetStatusName(mlp_s_));                            \
            return -1;                                                                   \
        }                                                                                \
    } while (0)

/* after a kernel launch: a bad configuration shows up here */
#define MLP_CUDA_LAUNCHED(m) MLP_CUDA_CHECK(m, cudaGetLastError())

static unsigned mlp_cuda__blocks(size_t n, unsigned threads)
{
    return (unsigned)((n + threads - 1) / threads);
}

/* ---- kernels ---------------------------------------------------------------- */
/* CPU reference: mlp__linear's bias and mlp__relu in mlp.h */
__global__ void mlp_bias_act_kernel(float *z, const float *bias, int B, int out, int relu)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)B * out) return;
    float v = z[i] + bias[i % out];
    z[i] = (relu && !(v > 0.0f)) ? 0.0f : v;
}

/* CPU reference: mlp__grad_input's mask */
__global__ void mlp_relu_backward_kernel(float *da, const float *act, size_t n)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n && !(act[i] > 0.0f)) da[i] = 0.0f;
}

/* CPU reference: mlp__softmax_xent and the start of mlp_backward. One warp
   per row. row_loss[b] = logsumexp(z) - z[y], row_ok[b] = argmax == y (the
   first maximum, like the CPU). dz (if not NULL) = k * (softmax - onehot). */
__global__ void mlp_softmax_xent_kernel(const float *logits, const uint8_t *labels, int B, int C,
                                        float k, float *dz, float *row_loss, int *row_ok)
{
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= B) return;  /* whole warps leave together */
    const float *z = logits + (size_t)row * C;
    float mx = -INFINITY;
    int arg = C;
    for (int c = lane; c < C; c += 32)
        if (z[c] > mx || arg == C) { mx = z[c]; arg = c; }
    for (int o = 16; o > 0; o /= 2) {
        float mo = __shfl_xor_sync(0xffffffffu, mx, o);
        int ao = __shfl_xor_sync(0xffffffffu, arg, o);
        if (mo > mx || (mo == mx && ao < arg)) { mx = mo; arg = ao; }
    }
    float sum = 0.0f;
    for (int c = lane; c < C; c += 32) sum += expf(z[c] - mx);
    for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    int y = labels[row] < C ? labels[row] : C - 1;
    if (dz) {
        float *d = dz + (size_t)row * C;
        for (int c = lane; c < C; c += 32) d[c] = k * (expf(z[c] - mx) / sum - (c == y ? 1.0f : 0.0f));
    }
    if (lane == 0) {
        row_loss[row] = logf(sum) - (z[y] - mx);
        row_ok[row] = (arg == (int)labels[row]);
    }
}

/* One block: stat_loss += scale * mean(row_loss); ok += sum(row_ok).
   A fixed reduction order, so the statistics are deterministic. */
__global__ void mlp_stats_kernel(const float *row_loss, const int *row_ok, int B, float scale,
                                 double *stat_loss, long long *stat_ok)
{
    __shared__ double sl[256];
    __shared__ long long so[256];
    double l = 0.0;
    long long ok = 0;
    for (int i = threadIdx.x; i < B; i += blockDim.x) { l += row_loss[i]; ok += row_ok[i]; }
    sl[threadIdx.x] = l;
    so[threadIdx.x] = ok;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s /= 2) {
        if ((int)threadIdx.x < s) { sl[threadIdx.x] += sl[threadIdx.x + s]; so[threadIdx.x] += so[threadIdx.x + s]; }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        if (stat_loss) *stat_loss += (double)scale * sl[0] / (double)B;
        *stat_ok += so[0];
    }
}

/* CPU reference: mlp__grad_bias. gb[o] += sum_b dz[b, o]: 32 columns per
   block (coalesced), 8 partial sums per column, fixed order. */
__global__ void mlp_bias_grad_kernel(const float *dz, int B, int out, float *gb)
{
    __shared__ float part[8][33];
    int o = blockIdx.x * 32 + threadIdx.x;
    float s = 0.0f;
    if (o < out)
        for (int b = threadIdx.y; b < B; b += 8) s += dz[(size_t)b * out + o];
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && o < out) {
        float t = 0.0f;
        for (int j = 0; j < 8; j++) t += part[j][threadIdx.x];
        gb[o] += t;
    }
}

/* ---- launchers -------------------------------------------------------------- */

static int mlp_cuda__bias_act(mlp_cuda *m, float *z, const float *bias, int B, int out, int relu)
{
    size_t n = (size_t)B * out;
    mlp_bias_act_kernel<<<mlp_cuda__blocks(n, 256), 256, 0, m->stream>>>(z, bias, B, out, relu);
    MLP_CUDA_LAUNCHED(m);
    return 0;
}

static int mlp_cuda__relu_backward(mlp_cuda *m, float *da, const float *act, size_t n)
{
    mlp_relu_backward_kernel<<<mlp_cuda__blocks(n, 256), 256, 0, m->stream>>>(da, act, n);
    MLP_CUDA_LAUNCHED(m);
    return 0;
}

static int mlp_cuda__softmax_xent(mlp_cuda *m, int B, float k, float *dz)
{
    int C = m->shape.dims[m->shape.num_layers];
    mlp_softmax_xent_kernel<<<mlp_cuda__blocks((size_t)B, 8), 256, 0, m->stream>>>(
        m->logits, m->y, B, C, k, dz, m->row_loss, m->row_ok);
    MLP_CUDA_LAUNCHED(m);
    return 0;
}

static int mlp_cuda__stats(mlp_cuda *m, int B, float scale, int eval)
{
    mlp_stats_kernel<<<1, 256, 0, m->stream>>>(m->row_loss, m->row_ok, B, scale,
                                               eval ? NULL : m->stat_loss,
                                               m->stat_ok + (eval ? 1 : 0));
    MLP_CUDA_LAUNCHED(m);
    return 0;
}

static int mlp_cuda__bias_grad(mlp_cuda *m, const float *dz, int B, int out, float *gb)
{
    dim3 block(32, 8);
    mlp_bias_grad_kernel<<<mlp_cuda__blocks((size_t)out, 32), block, 0, m->stream>>>(dz, B, out, gb);
    MLP_CUDA_LAUNCHED(m);
    return 0;
}

/* ---- create / destroy ----------------------------------------------------- */

extern "C" int mlp_cuda_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError(); /* no driver / no device: not an error here */
        return 0;
    }
    return n;
}

extern "C" const char *mlp_cuda_error(const mlp_cuda *m) { return m ? m->error : "no model"; }
extern "C" void *mlp_cuda_stream(const mlp_cuda *m) { return m ? (void *)m->stream : NULL; }

extern "C" void mlp_cuda_destroy(mlp_cuda *m)
{
    int i;
    if (!m) return;
    if (m->device >= 0) (void)cudaSetDevice(m->device);
    if (m->stream || !m->own_stream) (void)cudaStreamSynchronize(m->stream);
    /* teardown: keep going past errors, free what can be freed */
    if (m->blas) (void)cublasDestroy(m->blas);
    (void)cudaFree(m->x);
    (void)cudaFree(m->y);
    for (i = 0; i <= MLP_MAX_LAYERS; i++) (void)cudaFree(m->act[i]);
    (void)cudaFree(m->logits);
    (void)cudaFree(m->delta[0]);
    (void)cudaFree(m->delta[1]);
    (void)cudaFree(m->row_loss);
    (void)cudaFree(m->row_ok);
    (void)cudaFree(m->stat_loss);
    (void)cudaFree(m->stat_ok);
    for (i = 0; i < 2; i++) {
        (void)cudaFreeHost(m->stage_x[i]);
        (void)cudaFreeHost(m->stage_y[i]);
        if (m->staged[i]) (void)cudaEventDestroy(m->staged[i]);
    }
    (void)cudaFreeHost(m->host_stats);
    if (m->own_stream && m->stream) (void)cudaStreamDestroy(m->stream);
    free(m);
}

static int mlp_cuda__alloc(mlp_cuda *m, void **p, size_t bytes)
{
    MLP_CUDA_CHECK(m, cudaMalloc(p, bytes ? bytes : 1));
    return 0;
}

static int mlp_cuda__setup(mlp_cuda *m, void *stream)
{
    const mlp_shape *s = &m->shape;
    int l, L = s->num_layers, maxd = 0;
    size_t B = (size_t)m->max_batch, in0 = (size_t)s->dims[0];
    if (m->device >= 0) MLP_CUDA_CHECK(m, cudaSetDevice(m->device));
    else MLP_CUDA_CHECK(m, cudaGetDevice(&m->device));
    if (m->flags & MLP_CUDA_NEW_STREAM) {
        MLP_CUDA_CHECK(m, cudaStreamCreate(&m->stream));
        m->own_stream = 1;
    } else {
        m->stream = (cudaStream_t)stream;
    }
    MLP_CUBLAS_CHECK(m, cublasCreate(&m->blas));
    MLP_CUBLAS_CHECK(m, cublasSetStream(m->blas, m->stream));
    MLP_CUBLAS_CHECK(m, cublasSetPointerMode(m->blas, CUBLAS_POINTER_MODE_HOST));
    MLP_CUBLAS_CHECK(m, cublasSetMathMode(m->blas,
        (m->flags & MLP_CUDA_TF32) ? CUBLAS_TF32_TENSOR_OP_MATH :
        (m->flags & MLP_CUDA_PEDANTIC) ? CUBLAS_PEDANTIC_MATH : CUBLAS_DEFAULT_MATH));

    for (l = 1; l <= L; l++) if (s->dims[l] > maxd) maxd = s->dims[l];
    if (mlp_cuda__alloc(m, (void **)&m->x, B * in0 * sizeof(float))) return -1;
    if (mlp_cuda__alloc(m, (void **)&m->y, B)) return -1;
    for (l = 1; l < L; l++)
        if (mlp_cuda__alloc(m, (void **)&m->act[l], B * (size_t)s->dims[l] * sizeof(float))) return -1;
    if (mlp_cuda__alloc(m, (void **)&m->logits, B * (size_t)s->dims[L] * sizeof(float))) return -1;
    if (mlp_cuda__alloc(m, (void **)&m->delta[0], B * (size_t)maxd * sizeof(float))) return -1;
    if (mlp_cuda__alloc(m, (void **)&m->delta[1], B * (size_t)maxd * sizeof(float))) return -1;
    if (mlp_cuda__alloc(m, (void **)&m->row_loss, B * sizeof(float))) return -1;
    if (mlp_cuda__alloc(m, (void **)&m->row_ok, B * sizeof(int))) return -1;
    if (mlp_cuda__alloc(m, (void **)&m->stat_loss, sizeof(double))) return -1;
    if (mlp_cuda__alloc(m, (void **)&m->stat_ok, 2 * sizeof(long long))) return -1;
    MLP_CUDA_CHECK(m, cudaMemsetAsync(m->stat_loss, 0, sizeof(double), m->stream));
    MLP_CUDA_CHECK(m, cudaMemsetAsync(m->stat_ok, 0, 2 * sizeof(long long), m->stream));
    for (l = 0; l < 2; l++) {
        MLP_CUDA_CHECK(m, cudaMallocHost((void **)&m->stage_x[l], B * in0 * sizeof(float)));
        MLP_CUDA_CHECK(m, cudaMallocHost((void **)&m->stage_y[l], B));
        MLP_CUDA_CHECK(m, cudaEventCreateWithFlags(&m->staged[l], cudaEventDisableTiming));
    }
    MLP_CUDA_CHECK(m, cudaMallocHost(&m->host_stats, sizeof(double) + 2 * sizeof(long long)));
    MLP_CUDA_CHECK(m, cudaStreamSynchronize(m->stream));
    return 0;
}

extern "C" int mlp_cuda_create(const mlp_shape *shape, int max_batch, int device, void *stream,
                               int flags, mlp_cuda **out, char *err, size_t err_size)
{
    mlp_cuda *m;
    if (out) *out = NULL;
    if (!out || !shape || mlp_shape_check(shape) || max_batch < 1) {
        mlp_cuda__set_error(err, err_size, "mlp_cuda_create: %s",
                            !out || !shape ? "null argument" :
                            max_batch < 1 ? "max_batch < 1" : "bad shape");
        return -1;
    }
    m = (mlp_cuda *)calloc(1, sizeof *m);
    if (!m) {
        mlp_cuda__set_error(err, err_size, "mlp_cuda_create: out of memory");
        return -1;
    }
    m->shape = *shape;
    m->max_batch = max_batch;
    m->device = device;
    m->flags = flags;
    if (mlp_cuda__setup(m, stream)) {
        mlp_cuda__set_error(err, err_size, "mlp_cuda_create: %s", m->error);
        mlp_cuda_destroy(m);
        return -1;
    }
    *out = m;
    return 0;
}

/* ---- data ------------------------------------------------------------------ */

extern "C" int mlp_cuda_upload(mlp_cuda *m, const float *x, const uint8_t *y, int batch)
{
    int k = m->slot;
    size_t xb = (size_t)batch * m->shape.dims[0] * sizeof(float);
    if (batch < 0 || batch > m->max_batch) {
        mlp_cuda__set_error(m->error, sizeof m->error, "mlp_cuda_upload: batch %d not in 0..%d",
                            batch, m->max_batch);
        return -1;
    }
    m->batch = batch;
    if (batch == 0) return 0;
    /* the copy that last read this staging slot (two uploads ago) is done */
    MLP_CUDA_CHECK(m, cudaEventSynchronize(m->staged[k]));
    memcpy(m->stage_x[k], x, xb);
    memcpy(m->stage_y[k], y, (size_t)batch);
    MLP_CUDA_CHECK(m, cudaMemcpyAsync(m->x, m->stage_x[k], xb, cudaMemcpyHostToDevice, m->stream));
    MLP_CUDA_CHECK(m, cudaMemcpyAsync(m->y, m->stage_y[k], (size_t)batch, cudaMemcpyHostToDevice,
                                      m->stream));
    MLP_CUDA_CHECK(m, cudaEventRecord(m->staged[k], m->stream));
    m->slot = k ^ 1;
    return 0;
}

extern "C" int mlp_cuda_to_host(mlp_cuda *m, void *host, const void *device, size_t bytes)
{
    MLP_CUDA_CHECK(m, cudaMemcpyAsync(host, device, bytes, cudaMemcpyDeviceToHost, m->stream));
    MLP_CUDA_CHECK(m, cudaStreamSynchronize(m->stream));
    return 0;
}

extern "C" int mlp_cuda_to_device(mlp_cuda *m, void *device, const void *host, size_t bytes)
{
    MLP_CUDA_CHECK(m, cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, m->stream));
    MLP_CUDA_CHECK(m, cudaStreamSynchronize(m->stream));
    return 0;
}

/* ---- forward / backward ---------------------------------------------------- */

static int mlp_cuda__check_batch(mlp_cuda *m, int batch, const char *fn)
{
    if (batch < 0 || batch > m->max_batch || batch > m->batch) {
        mlp_cuda__set_error(m->error, sizeof m->error,
                            "%s: batch %d, but %d rows were uploaded (max_batch %d)",
                            fn, batch, m->batch, m->max_batch);
        return -1;
    }
    return 0;
}

/* Linear layers and activations; leaves the logits in m->logits. */
static int mlp_cuda__layers(mlp_cuda *m, float *const *params, int B)
{
    const mlp_shape *s = &m->shape;
    const float one = 1.0f, zero = 0.0f;
    const float *a = m->x;
    int l, L = s->num_layers;
    for (l = 0; l < L; l++) {
        int in = s->dims[l], out = s->dims[l + 1];
        float *z = (l == L - 1) ? m->logits : m->act[l + 1];
        MLP_CUBLAS_CHECK(m, cublasSgemm(m->blas, CUBLAS_OP_T, CUBLAS_OP_N, out, B, in, &one,
                                        params[2 * l], in, a, in, &zero, z, out));
        if (mlp_cuda__bias_act(m, z, params[2 * l + 1], B, out, l < L - 1)) return -1;
        a = z;
    }
    return 0;
}

extern "C" int mlp_cuda_forward(mlp_cuda *m, float *const *params, int batch)
{
    if (mlp_cuda__check_batch(m, batch, "mlp_cuda_forward")) return -1;
    m->calls++;
    if (batch == 0) return 0;
    if (mlp_cuda__layers(m, params, batch)) return -1;
    if (mlp_cuda__softmax_xent(m, batch, 0.0f, NULL)) return -1;
    return mlp_cuda__stats(m, batch, 1.0f, 0);
}

extern "C" int mlp_cuda_forward_backward(mlp_cuda *m, float *const *params, float *const *grads,
                                         int batch, float grad_scale,
                                         mlp_grad_ready_fn on_grad_ready, void *user)
{
    const mlp_shape *s = &m->shape;
    const float one = 1.0f, zero = 0.0f;
    int l, L = s->num_layers;
    float *dz = m->delta[0], *da = m->delta[1];
    if (mlp_cuda__check_batch(m, batch, "mlp_cuda_forward_backward")) return -1;
    m->calls++;
    if (batch == 0) {
        for (l = 2 * L - 1; l >= 0; l--) if (on_grad_ready) on_grad_ready(l, user);
        return 0;
    }
    if (mlp_cuda__layers(m, params, batch)) return -1;
    if (mlp_cuda__softmax_xent(m, batch, grad_scale / (float)batch, dz)) return -1;
    if (mlp_cuda__stats(m, batch, grad_scale, 0)) return -1;
    for (l = L - 1; l >= 0; l--) {
        int in = s->dims[l], out = s->dims[l + 1];
        const float *a = l == 0 ? m->x : m->act[l];
        if (mlp_cuda__bias_grad(m, dz, batch, out, grads[2 * l + 1])) return -1;
        if (on_grad_ready) on_grad_ready(2 * l + 1, user);
        /* beta = 1: add into ddp's gradient buffer */
        MLP_CUBLAS_CHECK(m, cublasSgemm(m->blas, CUBLAS_OP_N, CUBLAS_OP_T, in, out, batch, &one,
                                        a, in, dz, out, &one, grads[2 * l], in));
        if (on_grad_ready) on_grad_ready(2 * l, user);
        if (l > 0) {
            float *t;
            MLP_CUBLAS_CHECK(m, cublasSgemm(m->blas, CUBLAS_OP_N, CUBLAS_OP_N, in, batch, out, &one,
                                            params[2 * l], in, dz, out, &zero, da, in));
            if (mlp_cuda__relu_backward(m, da, m->act[l], (size_t)batch * in)) return -1;
            t = dz; dz = da; da = t;
        }
    }
    return 0;
}

extern "C" int mlp_cuda_read_stats(mlp_cuda *m, double *loss_sum, int64_t *correct,
                                   int64_t *calls, int reset)
{
    double *hl = (double *)m->host_stats;
    long long *ho = (long long *)(hl + 1);
    MLP_CUDA_CHECK(m, cudaMemcpyAsync(hl, m->stat_loss, sizeof(double), cudaMemcpyDeviceToHost,
                                      m->stream));
    MLP_CUDA_CHECK(m, cudaMemcpyAsync(ho, m->stat_ok, sizeof(long long), cudaMemcpyDeviceToHost,
                                      m->stream));
    MLP_CUDA_CHECK(m, cudaStreamSynchronize(m->stream));
    if (loss_sum) *loss_sum = *hl;
    if (correct) *correct = (int64_t)*ho;
    if (calls) *calls = (int64_t)m->calls;
    if (reset) {
        MLP_CUDA_CHECK(m, cudaMemsetAsync(m->stat_loss, 0, sizeof(double), m->stream));
        MLP_CUDA_CHECK(m, cudaMemsetAsync(m->stat_ok, 0, sizeof(long long), m->stream));
        m->calls = 0;
    }
    return 0;
}

extern "C" int mlp_cuda_evaluate(mlp_cuda *m, float *const *params, const float *x,
                                 const uint8_t *y, int count, int *correct)
{
    long long *ho = (long long *)((double *)m->host_stats + 1) + 1;
    int i, dim = m->shape.dims[0];
    MLP_CUDA_CHECK(m, cudaMemsetAsync(m->stat_ok + 1, 0, sizeof(long long), m->stream));
    for (i = 0; i < count; i += m->max_batch) {
        int n = count - i < m->max_batch ? count - i : m->max_batch;
        if (mlp_cuda_upload(m, x + (size_t)i * dim, y + i, n)) return -1;
        if (mlp_cuda__layers(m, params, n)) return -1;
        if (mlp_cuda__softmax_xent(m, n, 0.0f, NULL)) return -1;
        if (mlp_cuda__stats(m, n, 0.0f, 1)) return -1;
    }
    MLP_CUDA_CHECK(m, cudaMemcpyAsync(ho, m->stat_ok + 1, sizeof(long long),
                                      cudaMemcpyDeviceToHost, m->stream));
    MLP_CUDA_CHECK(m, cudaStreamSynchronize(m->stream));
    if (correct) *correct = (int)*ho;
    m->batch = 0; /* the input buffer now holds evaluation rows */
    return 0;
}
