/* mlp.h - the user's side of the ddp.h examples: a small MLP classifier
   (Linear-ReLU-...-Linear, softmax cross-entropy) with a CPU forward and
   backward in plain C, deterministic initialisation, an IDX (MNIST /
   Fashion-MNIST) loader and a synthetic data set.

   License: MIT, the same as ddp.h.

   Do this:
       #define MLP_IMPLEMENTATION
   before you include this file in *one* C or C++ file; every other file
   includes it without the macro.

   COMPILE-TIME SWITCHES

       MLP_IMPLEMENTATION   compile the implementation in this file
       MLP_STATIC           make every function static (private copy)
       MLP_NO_ZLIB          leave out the IDX loader (then no -lz is needed)
       MLP_FASHION_DEFAULT_DIR  where to look without --data
                            (default /usr/share/datasets/fashion-mnist)

   LINK LINE

       cc -O2 app.c -lz -lm

   THE MODEL

       dims[0] -> dims[1] -> ... -> dims[num_layers]   (default 784-256-256-10)
       Layer l (0-based) is fc{l+1}: z = a W^T + b, W is [out, in] row-major
       (PyTorch's nn.Linear layout), ReLU after every layer but the last.
       Parameter p: p = 2l is fc{l+1}.weight, p = 2l + 1 is fc{l+1}.bias;
       that is forward order, the order in which to register them with ddp.
       Every array (inputs, activations, weights) is row-major float.

   LOSS AND DATA PARALLELISM

       mlp_forward() returns the mean cross-entropy over the B rows it was
       given. mlp_backward() ADDS (+=) grad_scale times the gradient of that
       mean into the gradient arrays: ddp zeroes them after each optimizer
       step, and gradient accumulation relies on the +=.

       ddp averages gradients over ranks. With equal per-rank batches
       (B_r = B / world) the average over ranks of per-rank means is exactly
       the mean over the concatenated global batch: use grad_scale = 1.
       With unequal shards (the global batch does not divide by world, or
       the last batch of an epoch), use
           grad_scale = world * B_r / B
       then  (1/world) sum_r grad_scale_r * (1/B_r) sum_{i in r} g_i
           = (1/B) sum_i g_i, the global mean again (a rank with B_r = 0
       contributes zero and must still mark its gradients ready).

   OVERLAP

       mlp_backward() calls on_grad_ready(p, user) right after parameter p's
       gradient is final, in backward order (fc3.bias, fc3.weight, fc2.bias,
       ...): call ddp_mark_ready() there so the all-reduce of the last
       layers overlaps the backward of the first ones.
*/
#ifndef MLP_H_INCLUDED
#define MLP_H_INCLUDED

#include <stddef.h>
#include <stdint.h>

#ifndef MLP_API
#  ifdef MLP_STATIC
#    define MLP_API static
#  else
#    define MLP_API extern
#  endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define MLP_MAX_LAYERS 8
#define MLP_MAX_PARAMS (2 * MLP_MAX_LAYERS)

/* Fashion-MNIST pixel statistics (of x / 255 over the training set), used
   when a loader is asked to normalise. */
#define MLP_FASHION_MEAN 0.2860f
#define MLP_FASHION_STD  0.3530f

/* ---- shape and parameters ---------------------------------------------- */

typedef struct mlp_shape {
    int num_layers;                 /* linear layers, 1..MLP_MAX_LAYERS */
    int dims[MLP_MAX_LAYERS + 1];   /* dims[0] inputs ... dims[num_layers] classes */
} mlp_shape;

/* Called right after parameter p's gradient is final (CPU: written; GPU:
   queued on the model's stream). */
typedef void (*mlp_grad_ready_fn)(int param_index, void *user);

/* 784-256-256-10 */
MLP_API mlp_shape mlp_shape_default(void);
/* "784,256,256,10" (commas or 'x' or '-'); 0 on success, -1 on bad text. */
MLP_API int    mlp_shape_parse(const char *text, mlp_shape *out);
/* 0 if usable: 1..MLP_MAX_LAYERS layers, every dim in 1..1<<20. */
MLP_API int    mlp_shape_check(const mlp_shape *s);
MLP_API int    mlp_num_params(const mlp_shape *s);          /* 2 * num_layers */
MLP_API size_t mlp_param_numel(const mlp_shape *s, int p);
/* Writes [out, in] (weights) or [out] (biases) to dims, returns ndim. */
MLP_API int    mlp_param_shape(const mlp_shape *s, int p, int64_t dims[2]);
/* "fc1.weight", "fc1.bias", ... */
MLP_API void   mlp_param_name(int p, char *buf, size_t size);
MLP_API size_t mlp_total_numel(const mlp_shape *s);

/* Deterministic initialisation, bit-identical on every platform: PyTorch's
   nn.Linear default (kaiming_uniform_(a = sqrt(5))): weights and biases
   uniform in [-1/sqrt(fan_in), 1/sqrt(fan_in)). Parameter p is drawn from
   its own stream (seed, p), so layer sizes do not shift other layers'
   values. params[p] holds mlp_param_numel(s, p) floats. */
MLP_API void mlp_init_params(const mlp_shape *s, uint64_t seed, float *const *params);

/* ---- random numbers (splitmix64; identical on all platforms) ------------ */

typedef struct mlp_rng { uint64_t state; } mlp_rng;

MLP_API mlp_rng  mlp_rng_seed(uint64_t seed);
MLP_API uint64_t mlp_rng_next(mlp_rng *r);
MLP_API float    mlp_rng_uniform(mlp_rng *r);               /* [0, 1), 24 bits */
MLP_API uint32_t mlp_rng_below(mlp_rng *r, uint32_t n);     /* [0, n), unbiased */
/* idx = a permutation of 0..n-1 (Fisher-Yates), a function of seed only. */
MLP_API void     mlp_permutation(int *idx, int n, uint64_t seed);

/* ---- CPU forward and backward ------------------------------------------- */

typedef struct mlp_workspace {
    mlp_shape shape;
    int    max_batch;
    float *act[MLP_MAX_LAYERS + 1];  /* act[l], 1 <= l < L: ReLU outputs [B, dims[l]] */
    float *probs;                    /* [B, dims[L]]: logits, then softmax */
    float *delta[2];                 /* [B, max dim]: backward ping-pong */
    float *wt;                       /* every weight transposed, [in, out] */
    size_t wt_offset[MLP_MAX_LAYERS];
    int    batch;                    /* rows of the last forward */
} mlp_workspace;

/* 0 on success, -1 on a bad shape or out of memory. */
MLP_API int  mlp_workspace_init(mlp_workspace *ws, const mlp_shape *s, int max_batch);
MLP_API void mlp_workspace_free(mlp_workspace *ws);

/* Forward over batch rows of x ([batch, dims[0]]), 0 <= batch <= max_batch.
   With labels: returns the mean cross-entropy and, if correct is not NULL,
   the number of rows whose argmax equals the label. labels may be NULL
   (inference only; returns 0). The workspace keeps what backward needs.
   params are read only. */
MLP_API float mlp_forward(float *const *params, const float *x, const uint8_t *labels,
                          int batch, mlp_workspace *ws, int *correct);
/* Backward of the last mlp_forward (same params, x, labels, batch): ADDS
   grad_scale * d(mean loss)/d(param) into grads[p] and calls
   on_grad_ready(p, user) (if not NULL) as each one is final, in backward
   order. batch 0 adds nothing and still calls on_grad_ready for every p. */
MLP_API void  mlp_backward(float *const *params, const float *x, const uint8_t *labels,
                           int batch, float grad_scale, float *const *grads,
                           mlp_workspace *ws, mlp_grad_ready_fn on_grad_ready, void *user);
/* Both; returns grad_scale * mean loss (the loss whose gradient was added,
   the value to hand ddp_train_step). */
MLP_API float mlp_forward_backward(float *const *params, const float *x, const uint8_t *labels,
                                   int batch, float grad_scale, float *const *grads,
                                   mlp_workspace *ws, int *correct,
                                   mlp_grad_ready_fn on_grad_ready, void *user);
/* Correct predictions over count rows, in chunks of ws->max_batch. */
MLP_API int mlp_evaluate(float *const *params, const float *x, const uint8_t *labels,
                         int count, mlp_workspace *ws);

/* ---- data --------------------------------------------------------------- */

typedef struct mlp_dataset {
    int      count;        /* rows */
    int      dim;          /* floats per row (rows * cols for images) */
    int      rows, cols;   /* image size (0 for synthetic data) */
    int      num_classes;  /* max label + 1 */
    float   *x;            /* [count, dim] */
    uint8_t *y;            /* [count] */
} mlp_dataset;

MLP_API void mlp_dataset_free(mlp_dataset *d);
/* Copy rows idx[0..n-1] into x ([n, dim]) and y ([n]). */
MLP_API void mlp_gather(const mlp_dataset *d, const int *idx, int n, float *x, uint8_t *y);
/* count rows of dim floats in [0, 1], labels in [0, num_classes): each
   class a random prototype plus noise; learnable, a function of seed only.
   0 on success, -1 on bad arguments or out of memory. */
MLP_API int  mlp_synthetic(mlp_dataset *out, int count, int dim, int num_classes,
                           uint64_t seed);

#ifndef MLP_NO_ZLIB
/* Read an IDX image file (magic 0x803) and label file (magic 0x801),
   gzip-compressed or plain. Pixels become x / 255, then (normalize != 0)
   (x - MLP_FASHION_MEAN) / MLP_FASHION_STD. limit > 0 keeps only the
   first limit rows. 0 on success; -1 with a message in err that names the
   file and what is wrong. */
MLP_API int mlp_load_idx(const char *images_path, const char *labels_path, int normalize,
                         int limit, mlp_dataset *out, char *err, size_t err_size);
/* Find the Fashion-MNIST files: in dir (if not NULL; e.g. from --data), else
   in MLP_FASHION_DEFAULT_DIR. Writes the directory to out. 0 on success;
   -1 with a message that names the places looked at and the Debian package. */
MLP_API int mlp_find_data_dir(const char *dir, char *out, size_t out_size,
                              char *err, size_t err_size);
/* train != 0: train-images-idx3-ubyte(.gz) + train-labels-idx1-ubyte(.gz),
   else the t10k-* pair, from dir. */
MLP_API int mlp_load_fashion(const char *dir, int train, int normalize, int limit,
                             mlp_dataset *out, char *err, size_t err_size);
#endif

#ifndef MLP_FASHION_DEFAULT_DIR  /* Debian's dataset-fashion-mnist puts the files here */
#define MLP_FASHION_DEFAULT_DIR "/usr/share/datasets/fashion-mnist"
#endif
#define MLP_FASHION_PACKAGE     "dataset-fashion-mnist"

#ifdef __cplusplus
}
#endif
#endif /* MLP_H_INCLUDED */

/* ======================================================================== */
#ifdef MLP_IMPLEMENTATION
#ifndef MLP_IMPLEMENTATION_DONE
#define MLP_IMPLEMENTATION_DONE

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifndef MLP_NO_ZLIB
#include <zlib.h>
#endif

#ifdef __cplusplus
#  define MLP__RESTRICT __restrict
#else
#  define MLP__RESTRICT restrict
#endif

/* gcc -O2 (cheap vectoriser cost model) only vectorises loops whose trip
   count is a multiple of the vector width: the hot loops run over chunks of
   MLP__CHUNK with a fixed inner count, then a scalar tail. */
#define MLP__CHUNK 8

/* ---- shape -------------------------------------------------------------- */

MLP_API mlp_shape mlp_shape_default(void)
{
    mlp_shape s;
    memset(&s, 0, sizeof s);
    s.num_layers = 3;
    s.dims[0] = 784; s.dims[1] = 256; s.dims[2] = 256; s.dims[3] = 10;
    return s;
}

MLP_API int mlp_shape_check(const mlp_shape *s)
{
    int l;
    if (!s || s->num_layers < 1 || s->num_layers > MLP_MAX_LAYERS) return -1;
    for (l = 0; l <= s->num_layers; l++)
        if (s->dims[l] < 1 || s->dims[l] > (1 << 20)) return -1;
    return 0;
}

MLP_API int mlp_shape_parse(const char *text, mlp_shape *out)
{
    mlp_shape s;
    int n = 0;
    const char *p = text;
    memset(&s, 0, sizeof s);
    if (!text || !out) return -1;
    for (;;) {
        char *end;
        long v;
        errno = 0;
        v = strtol(p, &end, 10);
        if (end == p || errno || v < 1 || v > (1 << 20) || n > MLP_MAX_LAYERS) return -1;
        s.dims[n++] = (int)v;
        p = end;
        if (*p == '\0') break;
        if (*p != ',' && *p != 'x' && *p != '-') return -1;
        p++;
    }
    if (n < 2) return -1;
    s.num_layers = n - 1;
    *out = s;
    return 0;
}

MLP_API int mlp_num_params(const mlp_shape *s) { return 2 * s->num_layers; }

MLP_API size_t mlp_param_numel(const mlp_shape *s, int p)
{
    int l = p / 2;
    if (p < 0 || l >= s->num_layers) return 0;
    return (p & 1) ? (size_t)s->dims[l + 1] : (size_t)s->dims[l + 1] * (size_t)s->dims[l];
}

MLP_API int mlp_param_shape(const mlp_shape *s, int p, int64_t dims[2])
{
    int l = p / 2;
    if (p < 0 || l >= s->num_layers) return 0;
    dims[0] = s->dims[l + 1];
    if (p & 1) return 1;
    dims[1] = s->dims[l];
    return 2;
}

MLP_API void mlp_param_name(int p, char *buf, size_t size)
{
    if (!buf || size == 0) return;
    snprintf(buf, size, "fc%d.%s", p / 2 + 1, (p & 1) ? "bias" : "weight");
}

MLP_API size_t mlp_total_numel(const mlp_shape *s)
{
    size_t n = 0;
    int p;
    for (p = 0; p < mlp_num_params(s); p++) n += mlp_param_numel(s, p);
    return n;
}

/* ---- random numbers ------------------------------------------------------- */

MLP_API mlp_rng mlp_rng_seed(uint64_t seed)
{
    mlp_rng r;
    r.state = seed;
    return r;
}

MLP_API uint64_t mlp_rng_next(mlp_rng *r)
{
    uint64_t z = (r->state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

MLP_API float mlp_rng_uniform(mlp_rng *r)
{
    /* 24 random bits times 2^-24: exact, so identical everywhere */
    return (float)(mlp_rng_next(r) >> 40) * (1.0f / 16777216.0f);
}

MLP_API uint32_t mlp_rng_below(mlp_rng *r, uint32_t n)
{
    uint64_t limit, v;
    if (n <= 1) return 0;
    limit = UINT64_MAX - UINT64_MAX % n;  /* reject the biased tail */
    do v = mlp_rng_next(r); while (v >= limit);
    return (uint32_t)(v % n);
}

MLP_API void mlp_permutation(int *idx, int n, uint64_t seed)
{
    mlp_rng r = mlp_rng_seed(seed);
    int i;
    for (i = 0; i < n; i++) idx[i] = i;
    for (i = n - 1; i > 0; i--) {
        int j = (int)mlp_rng_below(&r, (uint32_t)i + 1u);
        int t = idx[i]; idx[i] = idx[j]; idx[j] = t;
    }
}

MLP_API void mlp_init_params(const mlp_shape *s, uint64_t seed, float *const *params)
{
    int p;
    for (p = 0; p < mlp_num_params(s); p++) {
        /* each parameter from its own stream: (seed, p) mixed once */
        mlp_rng mix = mlp_rng_seed(seed ^ (0xD1B54A32D192ED03ull * (uint64_t)(p + 1)));
        mlp_rng r = mlp_rng_seed(mlp_rng_next(&mix));
        int fan_in = s->dims[p / 2];
        /* bound / 2^23 is exact (power of two), and one multiply of an exact
           integer-valued float cannot be contracted into an FMA: the
           result is the same bits on every platform and compiler. */
        float step = (1.0f / sqrtf((float)fan_in)) * (1.0f / 8388608.0f);
        size_t i, n = mlp_param_numel(s, p);
        float *w = params[p];
        for (i = 0; i < n; i++) {
            int32_t v = (int32_t)(mlp_rng_next(&r) >> 40) - 8388608; /* [-2^23, 2^23) */
            w[i] = (float)v * step;
        }
    }
}

/* ---- workspace ------------------------------------------------------------ */

MLP_API void mlp_workspace_free(mlp_workspace *ws)
{
    int l;
    if (!ws) return;
    for (l = 0; l <= MLP_MAX_LAYERS; l++) free(ws->act[l]);
    free(ws->probs);
    free(ws->delta[0]);
    free(ws->delta[1]);
    free(ws->wt);
    memset(ws, 0, sizeof *ws);
}

MLP_API int mlp_workspace_init(mlp_workspace *ws, const mlp_shape *s, int max_batch)
{
    int l, L, maxd = 0;
    size_t B, wt = 0;
    if (!ws) return -1;
    memset(ws, 0, sizeof *ws);
    if (mlp_shape_check(s) || max_batch < 1) return -1;
    ws->shape = *s;
    ws->max_batch = max_batch;
    L = s->num_layers;
    B = (size_t)max_batch;
    for (l = 1; l <= L; l++) if (s->dims[l] > maxd) maxd = s->dims[l];
    for (l = 1; l < L; l++) {
        ws->act[l] = (float *)malloc(B * (size_t)s->dims[l] * sizeof(float));
        if (!ws->act[l]) goto oom;
    }
    for (l = 0; l < L; l++) {
        ws->wt_offset[l] = wt;
        wt += (size_t)s->dims[l] * (size_t)s->dims[l + 1];
    }
    ws->probs = (float *)malloc(B * (size_t)s->dims[L] * sizeof(float));
    ws->delta[0] = (float *)malloc(B * (size_t)maxd * sizeof(float));
    ws->delta[1] = (float *)malloc(B * (size_t)maxd * sizeof(float));
    ws->wt = (float *)malloc(wt * sizeof(float));
    if (!ws->probs || !ws->delta[0] || !ws->delta[1] || !ws->wt) goto oom;
    return 0;
oom:
    mlp_workspace_free(ws);
    return -1;
}

/* ---- CPU kernels ------------------------------------------------------------ */

/* y[0..n) += a * x[0..n) */
static void mlp__axpy(float *MLP__RESTRICT y, const float *MLP__RESTRICT x, float a, int n)
{
    int j = 0, k;
    for (; j + MLP__CHUNK <= n; j += MLP__CHUNK)
        for (k = 0; k < MLP__CHUNK; k++) y[j + k] += a * x[j + k];
    for (; j < n; j++) y[j] += a * x[j];
}

/* y_r[0..n) += a_r * x[0..n) for four rows: x is read once for four */
static void mlp__axpy4(float *MLP__RESTRICT y0, float *MLP__RESTRICT y1,
                       float *MLP__RESTRICT y2, float *MLP__RESTRICT y3,
                       const float *MLP__RESTRICT x,
                       float a0, float a1, float a2, float a3, int n)
{
    int j = 0, k;
    for (; j + MLP__CHUNK <= n; j += MLP__CHUNK)
        for (k = 0; k < MLP__CHUNK; k++) {
            float v = x[j + k];
            y0[j + k] += a0 * v; y1[j + k] += a1 * v;
            y2[j + k] += a2 * v; y3[j + k] += a3 * v;
        }
    for (; j < n; j++) {
        float v = x[j];
        y0[j] += a0 * v; y1[j] += a1 * v; y2[j] += a2 * v; y3[j] += a3 * v;
    }
}

/* y[0..n) += a0 x0 + a1 x1 + a2 x2 + a3 x3: four rows into one */
static void mlp__axpy4_into(float *MLP__RESTRICT y,
                            const float *MLP__RESTRICT x0, const float *MLP__RESTRICT x1,
                            const float *MLP__RESTRICT x2, const float *MLP__RESTRICT x3,
                            float a0, float a1, float a2, float a3, int n)
{
    int j = 0, k;
    for (; j + MLP__CHUNK <= n; j += MLP__CHUNK)
        for (k = 0; k < MLP__CHUNK; k++)
            y[j + k] += a0 * x0[j + k] + a1 * x1[j + k] + a2 * x2[j + k] + a3 * x3[j + k];
    for (; j < n; j++) y[j] += a0 * x0[j] + a1 * x1[j] + a2 * x2[j] + a3 * x3[j];
}

/* t[in, out] = w[out, in]^T, in tiles so both sides stay in cache */
static void mlp__transpose(float *MLP__RESTRICT t, const float *MLP__RESTRICT w, int out, int in)
{
    const int T = 32;
    int o0, i0, o, i;
    for (o0 = 0; o0 < out; o0 += T)
        for (i0 = 0; i0 < in; i0 += T) {
            int oe = o0 + T < out ? o0 + T : out, ie = i0 + T < in ? i0 + T : in;
            for (i = i0; i < ie; i++)
                for (o = o0; o < oe; o++) t[(size_t)i * out + o] = w[(size_t)o * in + i];
        }
}

/* z[B, out] = a[B, in] w^T + bias, with wt = w^T [in, out] (i-k-j order) */
static void mlp__linear(float *z, const float *a, const float *wt, const float *bias,
                        int B, int in, int out)
{
    int b = 0, i;
    for (b = 0; b < B; b++) memcpy(z + (size_t)b * out, bias, (size_t)out * sizeof(float));
    for (b = 0; b + 4 <= B; b += 4) {
        const float *a0 = a + (size_t)b * in;
        float *z0 = z + (size_t)b * out;
        for (i = 0; i < in; i++)
            mlp__axpy4(z0, z0 + out, z0 + 2 * (size_t)out, z0 + 3 * (size_t)out,
                       wt + (size_t)i * out,
                       a0[i], a0[in + i], a0[2 * (size_t)in + i], a0[3 * (size_t)in + i], out);
    }
    for (; b < B; b++)
        for (i = 0; i < in; i++)
            mlp__axpy(z + (size_t)b * out, wt + (size_t)i * out, a[(size_t)b * in + i], out);
}

/* gw[out, in] += dz[B, out]^T a[B, in] */
static void mlp__grad_weight(float *gw, const float *dz, const float *a, int B, int in, int out)
{
    int b = 0, o;
    for (b = 0; b + 4 <= B; b += 4) {
        const float *d = dz + (size_t)b * out, *a0 = a + (size_t)b * in;
        for (o = 0; o < out; o++)
            mlp__axpy4_into(gw + (size_t)o * in, a0, a0 + in, a0 + 2 * (size_t)in,
                            a0 + 3 * (size_t)in, d[o], d[out + o], d[2 * (size_t)out + o],
                            d[3 * (size_t)out + o], in);
    }
    for (; b < B; b++)
        for (o = 0; o < out; o++)
            mlp__axpy(gw + (size_t)o * in, a + (size_t)b * in, dz[(size_t)b * out + o], in);
}

/* gb[out] += column sums of dz[B, out] */
static void mlp__grad_bias(float *gb, const float *dz, int B, int out)
{
    int b;
    for (b = 0; b < B; b++) mlp__axpy(gb, dz + (size_t)b * out, 1.0f, out);
}

/* da[B, in] = (dz[B, out] w[out, in]) * (act > 0) */
static void mlp__grad_input(float *da, const float *dz, const float *w, const float *act,
                            int B, int in, int out)
{
    int b = 0, o;
    size_t i, n = (size_t)B * in;
    memset(da, 0, n * sizeof(float));
    for (b = 0; b + 4 <= B; b += 4) {
        const float *d = dz + (size_t)b * out;
        float *x0 = da + (size_t)b * in;
        for (o = 0; o < out; o++)
            mlp__axpy4(x0, x0 + in, x0 + 2 * (size_t)in, x0 + 3 * (size_t)in,
                       w + (size_t)o * in, d[o], d[out + o], d[2 * (size_t)out + o],
                       d[3 * (size_t)out + o], in);
    }
    for (; b < B; b++)
        for (o = 0; o < out; o++)
            mlp__axpy(da + (size_t)b * in, w + (size_t)o * in, dz[(size_t)b * out + o], in);
    for (i = 0; i < n; i++) if (!(act[i] > 0.0f)) da[i] = 0.0f;
}

static void mlp__relu(float *z, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) z[i] = z[i] > 0.0f ? z[i] : 0.0f;
}

/* Softmax in place over each row (labels NULL: logits left as they are);
   returns the summed cross-entropy and counts argmax == label. */
static double mlp__softmax_xent(float *p, const uint8_t *labels, int B, int C, int *correct)
{
    double loss = 0.0;
    int b, c, ok = 0;
    for (b = 0; b < B; b++) {
        float *z = p + (size_t)b * C;
        float mx = z[0], sum = 0.0f, zy;
        int arg = 0, y;
        for (c = 1; c < C; c++) if (z[c] > mx) { mx = z[c]; arg = c; }
        if (!labels) continue;
        y = labels[b] < C ? labels[b] : C - 1; /* the loaders validate labels */
        ok += (arg == (int)labels[b]);
        zy = z[y] - mx;
        for (c = 0; c < C; c++) { z[c] = expf(z[c] - mx); sum += z[c]; }
        loss += (double)(logf(sum) - zy);
        for (c = 0; c < C; c++) z[c] /= sum;
    }
    if (correct) *correct = ok;
    return loss;
}

static float mlp__forward(float *const *params, const float *x, const uint8_t *labels,
                          int batch, mlp_workspace *ws, int *correct, int transpose)
{
    const mlp_shape *s = &ws->shape;
    int l, L = s->num_layers;
    const float *a = x;
    double loss;
    if (correct) *correct = 0;
    ws->batch = batch;
    if (batch <= 0) return 0.0f;
    for (l = 0; l < L; l++) {
        int in = s->dims[l], out = s->dims[l + 1];
        float *wt = ws->wt + ws->wt_offset[l];
        float *z = (l == L - 1) ? ws->probs : ws->act[l + 1];
        if (transpose) mlp__transpose(wt, params[2 * l], out, in);
        mlp__linear(z, a, wt, params[2 * l + 1], batch, in, out);
        if (l < L - 1) mlp__relu(z, (size_t)batch * out);
        a = z;
    }
    loss = mlp__softmax_xent(ws->probs, labels, batch, s->dims[L], correct);
    return labels ? (float)(loss / batch) : 0.0f;
}

MLP_API float mlp_forward(float *const *params, const float *x, const uint8_t *labels,
                          int batch, mlp_workspace *ws, int *correct)
{
    if (batch > ws->max_batch) batch = ws->max_batch; /* never write past the workspace */
    return mlp__forward(params, x, labels, batch, ws, correct, 1);
}

MLP_API void mlp_backward(float *const *params, const float *x, const uint8_t *labels,
                          int batch, float grad_scale, float *const *grads,
                          mlp_workspace *ws, mlp_grad_ready_fn on_grad_ready, void *user)
{
    const mlp_shape *s = &ws->shape;
    int l, b, c, L = s->num_layers, C = s->dims[L];
    float *dz = ws->delta[0], *da = ws->delta[1];
    if (batch > ws->max_batch) batch = ws->max_batch;
    if (batch <= 0) {
        for (l = 2 * L - 1; l >= 0; l--) if (on_grad_ready) on_grad_ready(l, user);
        return;
    }
    /* d(scale * mean loss)/dz = scale * (softmax - onehot) / B */
    {
        float k = grad_scale / (float)batch;
        for (b = 0; b < batch; b++) {
            const float *p = ws->probs + (size_t)b * C;
            float *d = dz + (size_t)b * C;
            int y = labels[b] < C ? labels[b] : C - 1;
            for (c = 0; c < C; c++) d[c] = k * p[c];
            d[y] -= k;
        }
    }
    for (l = L - 1; l >= 0; l--) {
        int in = s->dims[l], out = s->dims[l + 1];
        const float *a = l == 0 ? x : ws->act[l];
        mlp__grad_bias(grads[2 * l + 1], dz, batch, out);
        if (on_grad_ready) on_grad_ready(2 * l + 1, user);
        mlp__grad_weight(grads[2 * l], dz, a, batch, in, out);
        if (on_grad_ready) on_grad_ready(2 * l, user);
        if (l > 0) {
            float *t;
            mlp__grad_input(da, dz, params[2 * l], ws->act[l], batch, in, out);
            t = dz; dz = da; da = t;
        }
    }
}

MLP_API float mlp_forward_backward(float *const *params, const float *x, const uint8_t *labels,
                                   int batch, float grad_scale, float *const *grads,
                                   mlp_workspace *ws, int *correct,
                                   mlp_grad_ready_fn on_grad_ready, void *user)
{
    float loss = mlp_forward(params, x, labels, batch, ws, correct);
    mlp_backward(params, x, labels, batch, grad_scale, grads, ws, on_grad_ready, user);
    return grad_scale * loss;
}

MLP_API int mlp_evaluate(float *const *params, const float *x, const uint8_t *labels,
                         int count, mlp_workspace *ws)
{
    int i, total = 0, dim = ws->shape.dims[0];
    for (i = 0; i < count; i += ws->max_batch) {
        int n = count - i < ws->max_batch ? count - i : ws->max_batch, ok = 0;
        /* weights are fixed during evaluation: transpose them once */
        mlp__forward(params, x + (size_t)i * dim, labels + i, n, ws, &ok, i == 0);
        total += ok;
    }
    return total;
}

/* ---- data ------------------------------------------------------------------ */

MLP_API void mlp_dataset_free(mlp_dataset *d)
{
    if (!d) return;
    free(d->x);
    free(d->y);
    memset(d, 0, sizeof *d);
}

MLP_API void mlp_gather(const mlp_dataset *d, const int *idx, int n, float *x, uint8_t *y)
{
    int i;
    for (i = 0; i < n; i++) {
        memcpy(x + (size_t)i * d->dim, d->x + (size_t)idx[i] * d->dim,
               (size_t)d->dim * sizeof(float));
        y[i] = d->y[idx[i]];
    }
}

MLP_API int mlp_synthetic(mlp_dataset *out, int count, int dim, int num_classes, uint64_t seed)
{
    mlp_rng r = mlp_rng_seed(seed);
    float *proto;
    int i, j;
    if (!out) return -1;
    memset(out, 0, sizeof *out);
    if (count < 0 || dim < 1 || num_classes < 1 || num_classes > 256) return -1;
    proto = (float *)malloc((size_t)num_classes * dim * sizeof(float));
    out->x = (float *)malloc(((size_t)count * dim + 1) * sizeof(float));
    out->y = (uint8_t *)malloc((size_t)count + 1);
    if (!proto || !out->x || !out->y) {
        free(proto);
        mlp_dataset_free(out);
        return -1;
    }
    for (i = 0; i < num_classes * dim; i++) proto[i] = mlp_rng_uniform(&r);
    for (i = 0; i < count; i++) {
        int y = (int)mlp_rng_below(&r, (uint32_t)num_classes);
        float *x = out->x + (size_t)i * dim;
        const float *p = proto + (size_t)y * dim;
        out->y[i] = (uint8_t)y;
        for (j = 0; j < dim; j++) x[j] = 0.6f * p[j] + 0.4f * mlp_rng_uniform(&r);
    }
    free(proto);
    out->count = count;
    out->dim = dim;
    out->num_classes = num_classes;
    return 0;
}

#ifndef MLP_NO_ZLIB

static void mlp__err(char *err, size_t size, const char *fmt, ...)
{
    va_list ap;
    if (!err || size == 0) return;
    va_start(ap, fmt);
    vsnprintf(err, size, fmt, ap);
    va_end(ap);
}

/* Read exactly n bytes; 0 on success, else a message. */
static int mlp__gzread_all(gzFile f, void *buf, size_t n, const char *path, const char *what,
                           char *err, size_t err_size)
{
    unsigned char *p = (unsigned char *)buf;
    size_t done = 0;
    while (done < n) {
        size_t want = n - done > (1u << 30) ? (1u << 30) : n - done;
        int got = gzread(f, p + done, (unsigned)want);
        if (got < 0) {
            int zerr = 0;
            const char *msg = gzerror(f, &zerr);
            mlp__err(err, err_size, "%s: read error in %s: %s", path, what,
                     zerr == Z_ERRNO ? strerror(errno) : msg);
            return -1;
        }
        if (got == 0) {
            mlp__err(err, err_size, "%s: file ends in %s (%zu of %zu bytes; truncated download?)",
                     path, what, done, n);
            return -1;
        }
        done += (size_t)got;
    }
    return 0;
}

static uint32_t mlp__be32(const unsigned char *b)
{
    return ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) | ((uint32_t)b[2] << 8) | b[3];
}

static gzFile mlp__gzopen(const char *path, char *err, size_t err_size)
{
    gzFile f;
    errno = 0;
    f = gzopen(path, "rb");
    if (!f)
        mlp__err(err, err_size, "%s: cannot open: %s", path,
                 errno ? strerror(errno) : "out of memory");
    return f;
}

MLP_API int mlp_load_idx(const char *images_path, const char *labels_path, int normalize,
                         int limit, mlp_dataset *out, char *err, size_t err_size)
{
    unsigned char h[16];
    unsigned char *pix = NULL;
    gzFile fi = NULL, fl = NULL;
    uint32_t n_img, n_lab, rows, cols;
    size_t i, n, dim;
    int maxlab = 0;
    if (!images_path || !labels_path || !out) {
        mlp__err(err, err_size, "mlp_load_idx: null argument");
        return -1;
    }
    memset(out, 0, sizeof *out);
    if (!(fi = mlp__gzopen(images_path, err, err_size))) goto fail;
    if (!(fl = mlp__gzopen(labels_path, err, err_size))) goto fail;

    if (mlp__gzread_all(fi, h, 16, images_path, "the header", err, err_size)) goto fail;
    if (mlp__be32(h) != 0x00000803u) {
        mlp__err(err, err_size, "%s: not an IDX image file: magic number 0x%08x, expected "
                 "0x00000803 (unsigned bytes, 3 dimensions)", images_path, (unsigned)mlp__be32(h));
        goto fail;
    }
    n_img = mlp__be32(h + 4); rows = mlp__be32(h + 8); cols = mlp__be32(h + 12);
    if (n_img == 0 || n_img > (1u << 26) || rows == 0 || cols == 0 || rows > 4096 || cols > 4096) {
        mlp__err(err, err_size, "%s: implausible sizes in the header: %u images of %u x %u",
                 images_path, (unsigned)n_img, (unsigned)rows, (unsigned)cols);
        goto fail;
    }
    if (mlp__gzread_all(fl, h, 8, labels_path, "the header", err, err_size)) goto fail;
    if (mlp__be32(h) != 0x00000801u) {
        mlp__err(err, err_size, "%s: not an IDX label file: magic number 0x%08x, expected "
                 "0x00000801 (unsigned bytes, 1 dimension)", labels_path, (unsigned)mlp__be32(h));
        goto fail;
    }
    n_lab = mlp__be32(h + 4);
    if (n_lab != n_img) {
        mlp__err(err, err_size, "%s has %u labels but %s has %u images", labels_path,
                 (unsigned)n_lab, images_path, (unsigned)n_img);
        goto fail;
    }
    n = n_img;
    if (limit > 0 && (size_t)limit < n) n = (size_t)limit;
    dim = (size_t)rows * cols;
    pix = (unsigned char *)malloc(n * dim);
    out->x = (float *)malloc(n * dim * sizeof(float));
    out->y = (uint8_t *)malloc(n);
    if (!pix || !out->x || !out->y) {
        mlp__err(err, err_size, "%s: out of memory for %zu images", images_path, n);
        goto fail;
    }
    if (mlp__gzread_all(fi, pix, n * dim, images_path, "the pixels", err, err_size)) goto fail;
    if (mlp__gzread_all(fl, out->y, n, labels_path, "the labels", err, err_size)) goto fail;
    for (i = 0; i < n; i++) {
        if (out->y[i] > maxlab) maxlab = out->y[i];
    }
    {
        float mean = normalize ? MLP_FASHION_MEAN : 0.0f;
        float k = normalize ? 1.0f / (255.0f * MLP_FASHION_STD) : 1.0f / 255.0f;
        float m = normalize ? mean / MLP_FASHION_STD : 0.0f;
        for (i = 0; i < n * dim; i++) out->x[i] = (float)pix[i] * k - m;
    }
    free(pix);
    gzclose(fi);
    gzclose(fl);
    out->count = (int)n;
    out->dim = (int)dim;
    out->rows = (int)rows;
    out->cols = (int)cols;
    out->num_classes = maxlab + 1;
    return 0;
fail:
    free(pix);
    if (fi) gzclose(fi);
    if (fl) gzclose(fl);
    mlp_dataset_free(out);
    return -1;
}

static const char *const mlp__fashion_files[4] = {
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
};

/* dir/name.gz if readable, else dir/name if readable; 0 if found. */
static int mlp__data_file(const char *dir, const char *name, char *path, size_t size)
{
    FILE *f;
    snprintf(path, size, "%s/%s.gz", dir, name);
    if ((f = fopen(path, "rb")) != NULL) { fclose(f); return 0; }
    snprintf(path, size, "%s/%s", dir, name);
    if ((f = fopen(path, "rb")) != NULL) { fclose(f); return 0; }
    return -1;
}

/* 0 if dir holds all four files; else the first missing name in *missing */
static int mlp__has_fashion(const char *dir, const char **missing)
{
    char path[4096];
    int i;
    for (i = 0; i < 4; i++)
        if (mlp__data_file(dir, mlp__fashion_files[i], path, sizeof path)) {
            *missing = mlp__fashion_files[i];
            return -1;
        }
    return 0;
}

MLP_API int mlp_find_data_dir(const char *dir, char *out, size_t out_size,
                              char *err, size_t err_size)
{
    const char *miss_given = NULL, *miss_default = NULL;
    const char *found = NULL;
    if (dir && *dir && mlp__has_fashion(dir, &miss_given) == 0) found = dir;
    else if (mlp__has_fashion(MLP_FASHION_DEFAULT_DIR, &miss_default) == 0) found = MLP_FASHION_DEFAULT_DIR;
    if (found) {
        if (strlen(found) + 1 > out_size) {
            mlp__err(err, err_size, "data directory path too long: %s", found);
            return -1;
        }
        memcpy(out, found, strlen(found) + 1);
        return 0;
    }
    if (dir && *dir)
        mlp__err(err, err_size,
                 "Fashion-MNIST not found: %s has no %s(.gz), and %s has no %s(.gz). "
                 "Install the Debian package %s (apt-get install %s) or pass --data DIR "
                 "with the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                 "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)",
                 dir, miss_given, MLP_FASHION_DEFAULT_DIR, miss_default,
                 MLP_FASHION_PACKAGE, MLP_FASHION_PACKAGE);
    else
        mlp__err(err, err_size,
                 "Fashion-MNIST not found: no --data DIR given, and %s has no %s(.gz). "
                 "Install the Debian package %s (apt-get install %s) or pass --data DIR "
                 "with the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                 "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)",
                 MLP_FASHION_DEFAULT_DIR, miss_default, MLP_FASHION_PACKAGE, MLP_FASHION_PACKAGE);
    return -1;
}

MLP_API int mlp_load_fashion(const char *dir, int train, int normalize, int limit,
                             mlp_dataset *out, char *err, size_t err_size)
{
    char ipath[4096], lpath[4096];
    const char *iname = mlp__fashion_files[train ? 0 : 2];
    const char *lname = mlp__fashion_files[train ? 1 : 3];
    if (mlp__data_file(dir, iname, ipath, sizeof ipath))
        snprintf(ipath, sizeof ipath, "%s/%s.gz", dir, iname); /* let the loader name the error */
    if (mlp__data_file(dir, lname, lpath, sizeof lpath))
        snprintf(lpath, sizeof lpath, "%s/%s.gz", dir, lname);
    if (mlp_load_idx(ipath, lpath, normalize, limit, out, err, err_size)) return -1;
    if (out->rows != 28 || out->cols != 28 || out->num_classes > 10) {
        mlp__err(err, err_size, "%s, %s: not Fashion-MNIST (%d x %d images, labels up to %d; "
                 "expected 28 x 28, labels 0..9)", ipath, lpath, out->rows, out->cols,
                 out->num_classes - 1);
        mlp_dataset_free(out);
        return -1;
    }
    return 0;
}

#endif /* MLP_NO_ZLIB */

#endif /* MLP_IMPLEMENTATION_DONE */
#endif /* MLP_IMPLEMENTATION */
