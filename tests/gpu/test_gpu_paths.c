/* tests/gpu/test_gpu_paths.c - the GPU paths of ddp.h that had never run on
   a GPU, each compared against the library's CPU path on the same data.

     [ddprun -n N] test_gpu_paths MODE [--device cuda|cpu] [--sabotage]

   MODE is one of
     alloc      config.device_allocator and config.allocator: count every
                call and free, everything returned at ddp_destroy, the
                weights bitwise equal to a run with the default allocators
                and equal to the CPU run (AdamW, f32 + bf16 parameters with
                master weights, two synced steps per optimizer step so the
                accumulation buffer is allocated, config.compress so the
                compression buffer is, one ddp_allreduce of a host buffer)
     clip       clipping, config.optimizer.max_grad_norm and an explicit
                ddp_clip_grad_norm, for f32, bf16 and f16 parameters (fp32
                master weights): the norm and clip factor of every step and
                the weights against the CPU run
     ckpt       a checkpoint saved by the device run and resumed on the CPU,
                and one saved by the CPU run and resumed on the device
                (ddp_save_checkpoint / ddp_load_checkpoint: AdamW, schedule,
                loss scaling with a skipped step, parameter groups, bf16
                parameters), and the same with safetensors (plain SGD, which
                has no state): the continued run equals the uninterrupted one
     compress   config.compress = bf16 and f16: the reduced gradient of the
                first step within 16-bit rounding of the CPU run's f32 one
                and different from the device's own uncompressed run (the
                compression happened), the weights within 16-bit tolerance
     lossscale  dynamic loss scaling with an inf injected into the last
                rank's gradient at step 2 and a NaN into rank 0's at step 5:
                every rank skips exactly the steps the CPU run skips, the
                scale of every step equals the CPU run's, the weights agree
                and every replica holds the same bits (f32 SGD, f16 AdamW)
     groups     ddp_set_param_options (lr_scale, no_weight_decay,
                weight_decay_scale) through the fused optimizer kernels:
                SGD and AdamW, f32, bf16 and f16 parameters, against the CPU
     schedule   config.schedule (cosine and linear with warmup, step) and a
                ddp_set_lr in the middle: the lr of every step (ddp_get_lr)
                equal to the CPU run's and the weights equal

   The device under test (DUT) is the GPU (--device cuda, the default) or
   the CPU (--device cpu: the same comparisons between two CPU runs, which
   must agree exactly; CI runs this so the comparison code is exercised
   without a GPU). The reference (REF) is always a CPU context of the same
   world size (ranks from the environment: ddprun). Multi-rank runs use
   whatever backend DDP_BACKEND names for the DUT (staged to share one GPU).

   The "model" is a quadratic with per-rank, per-step noise, computed on the
   host from the DUT's own current weights: g = a (w - t) + 0.3 noise, times
   the loss scale, converted to the parameter's dtype and added into
   ddp_param_grad (copied to the device on the DUT stream, then
   ddp_mark_ready_stream). Both contexts therefore get bit-identical inputs
   whenever their weights are bit-identical, and every difference comes from
   the library path under test.

   --sabotage adds 0.2 to every gradient element of the DUT's first
   parameter: every check must then FAIL; the program exits 0 only if all
   of them did (proof that the comparisons can fail).

   Prints one PASS/FAIL line per check with its numbers, and exits 0 when
   every check passed, 77 when the DUT is cuda and there is no GPU (or the
   build has no CUDA), 1 otherwise. */
#define _GNU_SOURCE 1
#include "../../ddp.h"
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#if defined(TGP_CUDA)
#include <cuda_runtime_api.h>
#endif

#define MAXP 8
#define MAXS 16

/* ---- 16-bit conversions (round to nearest even), as the library stores them ---- */

static float bf16_to_f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static uint16_t f_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static float f16_to_f(uint16_t h) {
    int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    float v;
    if (e == 0) v = ldexpf((float)m, -24);
    else if (e == 31) v = m ? NAN : INFINITY;
    else v = ldexpf((float)(m | 0x400), e - 25);
    return (h & 0x8000) ? -v : v;
}
static uint16_t f_to_f16(float f) {
    uint16_t sign = signbit(f) ? 0x8000 : 0;
    float a = fabsf(f);
    int e;
    float m;
    uint32_t q;
    if (a != a) return 0x7e00;
    if (a >= 65520.0f) return (uint16_t)(sign | 0x7c00); /* rounds to inf */
    if (a < ldexpf(1.0f, -14)) { /* subnormal: units of 2^-24 */
        q = (uint32_t)nearbyintf(a * 16777216.0f);
        return (uint16_t)(sign | q);
    }
    m = frexpf(a, &e); /* a = m 2^e, m in [0.5, 1) */
    q = (uint32_t)nearbyintf(ldexpf(m, 11)); /* 11 significant bits */
    if (q == 2048) { q = 1024; e++; }
    return (uint16_t)(sign | (uint16_t)((e + 14) << 10) | (uint16_t)(q & 0x3ff));
}

static float load_elem(const unsigned char *p, size_t i, ddp_dtype t) {
    uint16_t h;
    float f;
    if (t == DDP_F32) { memcpy(&f, p + 4 * i, 4); return f; }
    memcpy(&h, p + 2 * i, 2);
    return t == DDP_BF16 ? bf16_to_f(h) : f16_to_f(h);
}
static void store_elem(unsigned char *p, size_t i, ddp_dtype t, float f) {
    uint16_t h;
    if (t == DDP_F32) { memcpy(p + 4 * i, &f, 4); return; }
    h = t == DDP_BF16 ? f_to_bf16(f) : f_to_f16(f);
    memcpy(p + 2 * i, &h, 2);
}
/* one unit in the last place of a 16-bit value near x */
static double ulp16(double x, ddp_dtype t) {
    int e;
    double a = fabs(x);
    if (t == DDP_F16 && a < ldexp(1.0, -14)) return ldexp(1.0, -24);
    if (a == 0) return t == DDP_BF16 ? ldexp(1.0, -133) : ldexp(1.0, -24);
    frexp(a, &e); /* a in [2^(e-1), 2^e) */
    return ldexp(1.0, e - 1 - (t == DDP_BF16 ? 7 : 10));
}

/* deterministic values in [-1, 1) */
static double hashv(unsigned a, unsigned b, unsigned c, unsigned d) {
    uint64_t h = 0x9e3779b97f4a7c15ull ^ ((uint64_t)a << 40) ^ ((uint64_t)b << 20) ^ (uint64_t)c ^ ((uint64_t)d << 52);
    h ^= h >> 33; h *= 0xff51afd7ed558ccdull; h ^= h >> 33; h *= 0xc4ceb9fe1a85ec53ull; h ^= h >> 33;
    return (double)(h >> 11) / (double)(1ull << 52) - 1.0;
}

/* ---- counting allocators ---- */

typedef struct counts {
    long host_allocs, host_frees, dev_allocs, dev_frees, bad_frees;
    long long host_live, dev_live;
} counts;
static counts g_counts;

typedef struct hdr { size_t size; size_t magic; } hdr;
#define HMAGIC ((size_t)0x5eed5eedu)
static void *count_alloc(size_t size, void *user) {
    hdr *h = (hdr *)malloc(sizeof(hdr) + size + 16);
    (void)user;
    if (!h) return NULL;
    h->size = size; h->magic = HMAGIC;
    g_counts.host_allocs++;
    g_counts.host_live += (long long)size;
    return h + 1;
}
static void count_free(void *p, void *user) {
    hdr *h;
    (void)user;
    if (!p) return;
    h = (hdr *)p - 1;
    if (h->magic != HMAGIC) { g_counts.bad_frees++; return; }
    h->magic = 0;
    g_counts.host_frees++;
    g_counts.host_live -= (long long)h->size;
    free(h);
}

/* device memory from one pool the test owns (a bump allocator; the pool
   is cudaMalloc'd once), every block in a table so a bad free is seen */
#define MAXBLK 512
static unsigned char *g_pool;
static size_t g_pool_size, g_pool_used;
static struct { void *p; size_t size; } g_blk[MAXBLK];
static void *dev_count_alloc(size_t size, void *user) {
    size_t at = (g_pool_used + 255) / 256 * 256;
    int i;
    (void)user;
    if (!g_pool || at + size > g_pool_size) return NULL;
    for (i = 0; i < MAXBLK && g_blk[i].p; i++) {}
    if (i == MAXBLK) return NULL;
    g_blk[i].p = g_pool + at; g_blk[i].size = size;
    g_pool_used = at + size;
    g_counts.dev_allocs++;
    g_counts.dev_live += (long long)size;
    return g_blk[i].p;
}
static void dev_count_free(void *p, void *user) {
    int i;
    (void)user;
    if (!p) return;
    for (i = 0; i < MAXBLK && g_blk[i].p != p; i++) {}
    if (i == MAXBLK) { g_counts.bad_frees++; return; }
    g_counts.dev_frees++;
    g_counts.dev_live -= (long long)g_blk[i].size;
    g_blk[i].p = NULL;
}

/* ---- the device ---- */

static int g_cuda;          /* the DUT is the GPU */
static int g_sabotage;
#if defined(TGP_CUDA)
static cudaStream_t g_stream;
#endif

#if defined(TGP_CUDA)
static int is_dev(ddp_context *ctx) { return ddp_query_device(ctx) == DDP_DEVICE_CUDA; }
#endif

static int get_bytes(ddp_context *ctx, void *dst, const void *src, size_t n) {
#if defined(TGP_CUDA)
    if (is_dev(ctx)) {
        if (ddp_synchronize(ctx) != DDP_SUCCESS) return -1;
        if (cudaStreamSynchronize(g_stream) != cudaSuccess) return -1;
        return cudaMemcpy(dst, src, n, cudaMemcpyDeviceToHost) == cudaSuccess ? 0 : -1;
    }
#endif
    (void)ctx;
    memcpy(dst, src, n);
    return 0;
}
static int put_bytes(ddp_context *ctx, void *dst, const void *src, size_t n) {
#if defined(TGP_CUDA)
    if (is_dev(ctx)) {
        if (cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, g_stream) != cudaSuccess) return -1;
        return cudaStreamSynchronize(g_stream) == cudaSuccess ? 0 : -1; /* the host buffer is reused */
    }
#endif
    (void)ctx;
    memcpy(dst, src, n);
    return 0;
}
static int mark(ddp_context *ctx, int p) {
#if defined(TGP_CUDA)
    if (is_dev(ctx)) return ddp_mark_ready_stream(ctx, p, g_stream);
#endif
    return ddp_mark_ready(ctx, p);
}

/* ---- one training run ---- */

typedef struct model {
    int n;
    size_t numel[MAXP];
    ddp_dtype dtype[MAXP];
    ddp_param_options opt[MAXP];
    int use_opt;
} model;

typedef struct spec {
    int dut;                 /* 1: the device under test, 0: the CPU reference */
    model m;
    ddp_optimizer_desc optim;
    ddp_schedule_desc sched;
    ddp_loss_scale_desc ls;
    ddp_dtype compress;
    double clip_explicit;    /* > 0: ddp_clip_grad_norm(max) before each optimizer step */
    int syncs;               /* synced steps per optimizer step (0 means 1) */
    int from, to;            /* steps [from, to) */
    int inf_rank, inf_step, nan_rank, nan_step; /* -1: none */
    int set_lr_step; double set_lr; /* ddp_set_lr before that step (-1: never) */
    int counting;            /* the counting allocators */
    int host_allreduce;      /* one ddp_allreduce of a host buffer after the first step */
    const char *load; int load_st;
    const char *save; int save_st;
} spec;

typedef struct result {
    int ok, world, rank;
    double lr[MAXS], scale[MAXS], norm[MAXS];
    int skipped[MAXS];
    float *w, *g0;           /* final weights, first reduced gradient (floats, params concatenated) */
    size_t n;
    int64_t opt_steps, skipped_total;
    int replicas_same, traces_same;
    counts c;                /* allocator counts after ddp_destroy */
    char err[400];
} result;

static void spec_init(spec *s, int dut, const model *m) {
    memset(s, 0, sizeof *s);
    s->dut = dut;
    s->m = *m;
    s->inf_rank = s->inf_step = s->nan_rank = s->nan_step = -1;
    s->set_lr_step = -1;
}

static size_t model_numel(const model *m) {
    size_t n = 0;
    int p;
    for (p = 0; p < m->n; p++) n += m->numel[p];
    return n;
}

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) { h ^= ((const unsigned char *)p)[i]; h *= 0x100000001b3ull; }
    return h;
}

#define FAILR(...) do { snprintf(r->err, sizeof r->err, __VA_ARGS__); goto out; } while (0)
#define TRYR(call) do { ddp_result e_ = (call); if (e_ != DDP_SUCCESS) FAILR("%s: %s: %s", #call, ddp_result_string(e_), ddp_last_error(ctx)); } while (0)

/* read every parameter (or gradient) of ctx as floats */
static int read_floats(ddp_context *ctx, const model *m, int grads, unsigned char *tmp, float *out) {
    int p;
    size_t i, k = 0;
    if (get_bytes(ctx, tmp, grads ? ddp_flat_grads(ctx) : ddp_flat_params(ctx), ddp_flat_bytes(ctx)) != 0) return -1;
    for (p = 0; p < m->n; p++)
        for (i = 0; i < m->numel[p]; i++) out[k++] = load_elem(tmp + ddp_param_offset(ctx, p), i, m->dtype[p]);
    return 0;
}

static int run(const spec *s, result *r) {
    ddp_config c;
    ddp_context *ctx = NULL;
    const model *m = &s->m;
    unsigned char *pb = NULL, *gb = NULL;
    float *init = NULL;
    size_t total = model_numel(m), i, k;
    int p, st, sync, id, to_dev = s->dut && g_cuda;
    uint64_t hw = 0xcbf29ce484222325ull, ht = 0xcbf29ce484222325ull;
    memset(r, 0, sizeof *r);
    r->n = total;
    r->w = (float *)calloc(total, sizeof(float));
    r->g0 = (float *)calloc(total, sizeof(float));
    init = (float *)malloc(total * sizeof(float) * 2 + 64);
    if (!r->w || !r->g0 || !init) { snprintf(r->err, sizeof r->err, "out of memory"); free(init); return 0; }
    memset(&c, 0, sizeof c);
    c.device = to_dev ? DDP_DEVICE_CUDA : DDP_DEVICE_CPU;
    if (!to_dev) c.backend = DDP_BACKEND_SHM; /* whatever DDP_BACKEND says */
    c.timeout_s = 60;
    c.first_bucket_bytes = 4096;
    c.bucket_bytes = 8192;
    c.optimizer = s->optim;
    c.schedule = s->sched;
    c.loss_scale = s->ls;
    c.compress = s->compress;
    if (s->counting) {
        c.allocator.alloc = count_alloc; c.allocator.free = count_free;
        if (to_dev) { c.device_allocator.alloc = dev_count_alloc; c.device_allocator.free = dev_count_free; }
        memset(&g_counts, 0, sizeof g_counts);
        g_pool_used = 0;
    }
    if (ddp_create(&c, &ctx) != DDP_SUCCESS) { snprintf(r->err, sizeof r->err, "ddp_create: %s", ddp_create_error()); free(init); return 0; }
    r->world = ddp_world_size(ctx);
    r->rank = ddp_rank(ctx);
#if defined(TGP_CUDA)
    if (to_dev) TRYR(ddp_set_stream(ctx, g_stream));
#endif
    /* weights in [-0.5, 0.5), the same for every run and rank */
    for (p = 0, k = 0; p < m->n; p++) {
        unsigned char *v = (unsigned char *)init + 4 * k; /* read at ddp_finalize: one buffer per parameter */
        char name[16];
        for (i = 0; i < m->numel[p]; i++) store_elem(v, i, m->dtype[p], (float)(0.5 * hashv(1, (unsigned)p, (unsigned)i, 0)));
        snprintf(name, sizeof name, "p%d", p);
        TRYR(ddp_register_param(ctx, name, m->numel[p], m->dtype[p], v, &id));
        if (m->use_opt) TRYR(ddp_set_param_options(ctx, id, &m->opt[p]));
        k += m->numel[p];
    }
    TRYR(ddp_finalize(ctx));
    pb = (unsigned char *)malloc(ddp_flat_bytes(ctx));
    gb = (unsigned char *)malloc(ddp_flat_bytes(ctx));
    if (!pb || !gb) FAILR("out of memory");
    if (s->load) TRYR(s->load_st ? ddp_load_safetensors(ctx, s->load, 0) : ddp_load_checkpoint(ctx, s->load));
    for (st = s->from; st < s->to; st++) {
        double S;
        if (st == s->set_lr_step) TRYR(ddp_set_lr(ctx, s->set_lr));
        r->lr[st] = ddp_get_lr(ctx);
        r->scale[st] = S = ddp_loss_scale(ctx);
        for (sync = 0; sync < (s->syncs > 0 ? s->syncs : 1); sync++) {
            TRYR(ddp_step_begin(ctx));
            if (get_bytes(ctx, pb, ddp_flat_params(ctx), ddp_flat_bytes(ctx)) != 0 ||
                get_bytes(ctx, gb, ddp_flat_grads(ctx), ddp_flat_bytes(ctx)) != 0) FAILR("reading the buffers at step %d", st);
            for (p = m->n - 1; p >= 0; p--) { /* backward order */
                size_t off = ddp_param_offset(ctx, p);
                unsigned char *gp = gb + off;
                for (i = 0; i < m->numel[p]; i++) {
                    double a = 1.0 + 0.5 * hashv(2, (unsigned)p, (unsigned)i, 0), t = 0.5 * hashv(3, (unsigned)p, (unsigned)i, 0);
                    double w = load_elem(pb + off, i, m->dtype[p]);
                    double g = a * (w - t) + 0.3 * hashv(4 + (unsigned)sync, (unsigned)p, (unsigned)i, (unsigned)(st * 64 + r->rank));
                    float v;
                    if (g_sabotage && s->dut && p == 0) g += 0.2;
                    v = (float)(g * S);
                    if (i == 0 && p == 1 && st == s->inf_step && r->rank == s->inf_rank) v = INFINITY;
                    if (i == 3 && p == 2 && st == s->nan_step && r->rank == s->nan_rank) v = NAN;
                    store_elem(gp, i, m->dtype[p], load_elem(gp, i, m->dtype[p]) + v);
                }
                if (put_bytes(ctx, ddp_param_grad(ctx, p), gp, m->numel[p] * ddp_dtype_size(m->dtype[p])) != 0) FAILR("writing gradient %d", p);
                TRYR(mark(ctx, p));
            }
            TRYR(ddp_step_end(ctx));
        }
        if (st == s->from && read_floats(ctx, m, 1, gb, r->g0) != 0) FAILR("reading the reduced gradients");
        if (st == s->from && s->host_allreduce) {
            float v[3] = { 1.0f, 2.0f, (float)r->rank };
            TRYR(ddp_allreduce(ctx, v, 3, DDP_F32, DDP_OP_SUM));
            if (v[0] != (float)r->world || v[1] != 2.0f * (float)r->world) FAILR("ddp_allreduce of a host buffer gave %g %g", v[0], v[1]);
        }
        TRYR(ddp_clip_grad_norm(ctx, s->clip_explicit > 0 ? s->clip_explicit : 0, &r->norm[st]));
        TRYR(ddp_optimizer_step(ctx));
        r->skipped[st] = ddp_last_step_skipped(ctx);
        if (s->save && st + 1 == s->to) TRYR(s->save_st ? ddp_save_safetensors(ctx, s->save, NULL) : ddp_save_checkpoint(ctx, s->save));
        ht = fnv(ht, &r->lr[st], sizeof(double));
        ht = fnv(ht, &r->scale[st], sizeof(double));
        ht = fnv(ht, &r->skipped[st], sizeof(int));
    }
    if (read_floats(ctx, m, 0, pb, r->w) != 0) FAILR("reading the weights");
    hw = fnv(hw, r->w, total * sizeof(float));
    r->opt_steps = ddp_optimizer_steps(ctx);
    r->skipped_total = ddp_skipped_steps(ctx);
    {   /* every replica: the same weights, the same trace */
        uint64_t mine[2], *all = (uint64_t *)malloc(2 * sizeof(uint64_t) * (size_t)r->world);
        int q;
        mine[0] = hw; mine[1] = ht;
        if (!all) FAILR("out of memory");
        if (ddp_allgather(ctx, mine, all, 4, DDP_I32) != DDP_SUCCESS) { free(all); FAILR("allgather: %s", ddp_last_error(ctx)); }
        r->replicas_same = r->traces_same = 1;
        for (q = 0; q < r->world; q++) {
            if (all[2 * q] != hw) r->replicas_same = 0;
            if (all[2 * q + 1] != ht) r->traces_same = 0;
        }
        free(all);
    }
    r->ok = 1;
out:
    free(pb);
    free(gb);
    free(init);
    if (ctx) ddp_destroy(ctx);
    if (s->counting) r->c = g_counts;
    return r->ok;
}

static void result_free(result *r) { free(r->w); free(r->g0); r->w = r->g0 = NULL; }

/* ---- comparisons ---- */

typedef struct cmpres { double rel32; long ulp1, bad16; size_t n16; } cmpres;

/* f32 parameters: max |a - b| / max |b|; 16-bit ones: elements more than
   one unit in the last place apart (bad16) and exactly one apart (ulp1) */
static cmpres compare(const model *m, const float *a, const float *b) {
    cmpres c;
    double md = 0, mr = 0;
    size_t i, k = 0;
    int p;
    memset(&c, 0, sizeof c);
    for (p = 0; p < m->n; p++)
        for (i = 0; i < m->numel[p]; i++, k++) {
            double d = fabs((double)a[k] - (double)b[k]);
            if (a[k] != a[k] || b[k] != b[k]) d = (a[k] != a[k]) == (b[k] != b[k]) ? 0 : INFINITY;
            if (m->dtype[p] == DDP_F32) {
                if (d > md) md = d;
                if (fabs(b[k]) > mr) mr = fabs(b[k]);
            } else {
                double u = ulp16(b[k], m->dtype[p]);
                c.n16++;
                if (d > 1.01 * u) c.bad16++;
                else if (d > 0) c.ulp1++;
            }
        }
    c.rel32 = mr > 0 ? md / mr : md;
    return c;
}
/* within tol (f32, relative) and, for 16-bit values, none more than an ulp
   apart and at most 1% one ulp apart (a master weight a rounding away) */
static int cmp_ok(cmpres c, double tol) { return c.rel32 <= tol && c.bad16 == 0 && (double)c.ulp1 <= 0.01 * (double)c.n16; }

static const char *dn(ddp_dtype t) { return t == DDP_F32 ? "f32" : t == DDP_BF16 ? "bf16" : t == DDP_F16 ? "f16" : "?"; }

static int g_rank0 = 1, g_world = 1, g_npass, g_nfail;
static void report(int pass, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
static void report(int pass, const char *fmt, ...) {
    va_list ap;
    if (pass) g_npass++; else g_nfail++;
    if (!g_rank0) return;
    printf("%s ", pass ? "PASS" : "FAIL");
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
}

static model model_of(ddp_dtype t) {
    static const size_t sizes[5] = { 1000, 37, 4099, 64, 3000 };
    model m;
    int p;
    memset(&m, 0, sizeof m);
    m.n = 5;
    for (p = 0; p < 5; p++) { m.numel[p] = sizes[p]; m.dtype[p] = t; }
    return m;
}

static ddp_optimizer_desc sgd(void) {
    ddp_optimizer_desc o = ddp_optimizer_defaults(DDP_OPTIM_SGD);
    o.lr = 0.05; o.momentum = 0.9; o.weight_decay = 0.01;
    return o;
}
static ddp_optimizer_desc adamw(void) {
    ddp_optimizer_desc o = ddp_optimizer_defaults(DDP_OPTIM_ADAMW);
    o.lr = 0.01; o.weight_decay = 0.1;
    return o;
}

/* the DUT and the REF run of one spec (the REF is the same spec on the CPU) */
static int pair(const spec *s, result *dut, result *ref, const char *what) {
    spec t = *s;
    int ok;
    t.dut = 1;
    ok = run(&t, dut);
    if (!ok && g_rank0) fprintf(stderr, "%s (device under test): %s\n", what, dut->err);
    t.dut = 0;
    if (!run(&t, ref)) { if (g_rank0) fprintf(stderr, "%s (CPU reference): %s\n", what, ref->err); ok = 0; }
    return ok;
}

#define F32_TOL 1e-5

/* ---- the checks ---- */

static int check_alloc(void) {
    model m = model_of(DDP_F32);
    spec s;
    result a, b, ref;
    cmpres vs_cpu;
    int ok, bit_equal;
    m.dtype[1] = m.dtype[3] = DDP_BF16; /* master weights */
    spec_init(&s, 1, &m);
    s.optim = adamw();
    s.to = 4;
    s.syncs = 2;              /* the accumulation buffer */
    s.compress = DDP_BF16;    /* the compression buffer (GPU) */
    s.host_allreduce = 1;     /* staging of a host buffer (NCCL) */
    s.counting = 1;
    ok = run(&s, &a);
    if (!ok && g_rank0) fprintf(stderr, "alloc (counting): %s\n", a.err);
    s.counting = 0;
    ok = pair(&s, &b, &ref, "alloc") && ok;
    bit_equal = a.w && b.w && memcmp(a.w, b.w, a.n * sizeof(float)) == 0;
    vs_cpu = compare(&m, a.w, ref.w);
    /* compression may apply (a forced NCCL or staged exchange): bf16 tolerance against the CPU */
    ok = ok && bit_equal && cmp_ok(vs_cpu, 2e-2) && a.c.host_allocs > 0 && a.c.host_allocs == a.c.host_frees &&
         a.c.host_live == 0 && a.c.dev_allocs == a.c.dev_frees && a.c.dev_live == 0 && a.c.bad_frees == 0 &&
         (!g_cuda || a.c.dev_allocs >= 6);
    report(ok, "gpu_paths alloc device=%s world=%d host_allocs=%ld host_frees=%ld host_live=%lld dev_allocs=%ld dev_frees=%ld dev_live=%lld "
           "bad_frees=%ld pool_used=%zu bitwise_vs_default_allocator=%s max_rel_vs_cpu=%.3g bf16_bad=%ld",
           g_cuda ? "cuda" : "cpu", a.world, a.c.host_allocs, a.c.host_frees, a.c.host_live, a.c.dev_allocs, a.c.dev_frees, a.c.dev_live,
           a.c.bad_frees, g_pool_used, bit_equal ? "yes" : "no", vs_cpu.rel32, vs_cpu.bad16);
    result_free(&a); result_free(&b); result_free(&ref);
    return ok;
}

static int check_clip(void) {
    static const ddp_dtype types[3] = { DDP_F32, DDP_BF16, DDP_F16 };
    int all = 1, t, explicit_;
    for (t = 0; t < 3; t++)
        for (explicit_ = 0; explicit_ < 2; explicit_++) {
            model m = model_of(types[t]);
            spec s;
            result d, r;
            cmpres c;
            double worst_norm = 0, worst_factor = 0;
            int ok, st, clipped = 0;
            spec_init(&s, 1, &m);
            s.optim = explicit_ ? sgd() : adamw();
            if (explicit_) s.clip_explicit = 2.0; else s.optim.max_grad_norm = 2.0;
            s.to = 5;
            ok = pair(&s, &d, &r, "clip");
            for (st = 0; ok && st < s.to; st++) {
                double fd = 2.0 / (d.norm[st] + 1e-6), fr = 2.0 / (r.norm[st] + 1e-6);
                double en = fabs(d.norm[st] - r.norm[st]) / r.norm[st];
                if (fd > 1) fd = 1;
                if (fr > 1) fr = 1;
                if (fr < 1) clipped++;
                if (en > worst_norm) worst_norm = en;
                if (fabs(fd - fr) / fr > worst_factor) worst_factor = fabs(fd - fr) / fr;
            }
            c = compare(&m, d.w, r.w);
            ok = ok && clipped > 0 && worst_norm <= 1e-5 && worst_factor <= 1e-5 && cmp_ok(c, F32_TOL);
            report(ok, "gpu_paths clip %s %s %s: steps=%d clipped_steps=%d norm0=%.4g factor0=%.4g max_rel_norm=%.3g max_rel_factor=%.3g "
                   "weights max_rel=%.3g ulp1=%ld bad16=%ld",
                   dn(types[t]), explicit_ ? "ddp_clip_grad_norm" : "max_grad_norm", explicit_ ? "sgd" : "adamw", s.to, clipped,
                   r.norm[0], 2.0 / (r.norm[0] + 1e-6), worst_norm, worst_factor, c.rel32, c.ulp1, c.bad16);
            all &= ok;
            result_free(&d); result_free(&r);
        }
    return all;
}

static void tmp_path(char *out, size_t n, const char *tag) {
    const char *port = getenv("MASTER_PORT");
    const char *dir = getenv("TMPDIR");
    snprintf(out, n, "%s/ddp-gpu-paths-%s-%d-%s", dir && *dir ? dir : "/tmp", port ? port : "solo", port ? 0 : (int)getpid(), tag);
}

/* A: the uninterrupted run on the device and on the CPU; B: half on one,
   saved, the other half on the other; the continued run must equal the
   uninterrupted run of the device it ended on. */
static int check_ckpt_kind(int st_kind) {
    model m = model_of(DDP_F32);
    spec s, h;
    result ud, uc, x, y;
    char path[256];
    int ok = 1, dir, half = 5, tr, good;
    if (!st_kind) { /* bf16 weights (master copies in the checkpoint); safetensors would drop the master's extra bits */
        m.dtype[2] = DDP_BF16;
        m.use_opt = 1;
        m.opt[1].no_weight_decay = 1; m.opt[3].no_weight_decay = 1;
        m.opt[0].lr_scale = 0.5;
    }
    spec_init(&s, 1, &m);
    if (st_kind) {  /* safetensors hold weights only: a stateless optimizer */
        s.optim = ddp_optimizer_defaults(DDP_OPTIM_SGD);
        s.optim.lr = 0.05;
    } else {
        s.optim = adamw();
        s.sched.type = DDP_SCHEDULE_COSINE; s.sched.warmup_steps = 2; s.sched.total_steps = 10;
        s.ls.enabled = 1; s.ls.init_scale = 256; s.ls.growth_interval = 2;
        s.inf_rank = 0; s.inf_step = 3;
    }
    s.to = 2 * half;
    ok = pair(&s, &ud, &uc, "ckpt uninterrupted");
    tmp_path(path, sizeof path, st_kind ? "st" : "ckpt");
    for (dir = 0; dir < 2; dir++) { /* 0: device saves, CPU resumes; 1: CPU saves, device resumes */
        cmpres c;
        const result *u = dir ? &ud : &uc;
        int same_trace = 1;
        h = s;
        h.dut = !dir; h.to = half; h.save = path; h.save_st = st_kind;
        if (!run(&h, &x)) { ok = 0; if (g_rank0) fprintf(stderr, "ckpt save: %s\n", x.err); }
        h.dut = dir; h.from = half; h.to = 2 * half; h.save = NULL; h.load = path; h.load_st = st_kind;
        if (!run(&h, &y)) { ok = 0; if (g_rank0) fprintf(stderr, "ckpt resume: %s\n", y.err); }
        for (tr = half; tr < 2 * half; tr++)
            same_trace &= y.lr[tr] == u->lr[tr] && y.scale[tr] == u->scale[tr] && y.skipped[tr] == u->skipped[tr];
        c = compare(&m, y.w, u->w);
        /* a safetensors file holds no step count: only a checkpoint continues the counts */
        good = x.ok && y.ok && same_trace && cmp_ok(c, F32_TOL) &&
               (st_kind || (y.opt_steps == u->opt_steps && y.skipped_total == u->skipped_total));
        ok = ok && good;
        report(good,
               "gpu_paths %s saved on %s resumed on %s: steps %d+%d lr/scale/skips_equal=%s opt_steps=%lld/%lld skipped=%lld/%lld "
               "max_rel_vs_uninterrupted=%.3g ulp1=%ld bad16=%ld",
               st_kind ? "safetensors" : "checkpoint", dir ? "cpu" : (g_cuda ? "cuda" : "cpu(dut)"), dir ? (g_cuda ? "cuda" : "cpu(dut)") : "cpu",
               half, half, same_trace ? "yes" : "no", (long long)y.opt_steps, (long long)u->opt_steps,
               (long long)y.skipped_total, (long long)u->skipped_total, c.rel32, c.ulp1, c.bad16);
        result_free(&x); result_free(&y);
        if (g_rank0) remove(path);
    }
    result_free(&ud); result_free(&uc);
    return ok;
}
static int check_ckpt(void) {
    int a = check_ckpt_kind(0);
    int b = check_ckpt_kind(1);
    return a && b;
}

static int check_compress(void) {
    static const ddp_dtype types[2] = { DDP_BF16, DDP_F16 };
    int all = 1, t;
    for (t = 0; t < 2; t++) {
        model m = model_of(DDP_F32);
        spec s;
        result d, plain, r;
        cmpres c;
        size_t i, bad = 0, differ = 0;
        double rel = types[t] == DDP_BF16 ? ldexp(1.0, -7) : ldexp(1.0, -10), gmax = 0;
        int ok;
        spec_init(&s, 1, &m);
        s.optim = sgd();
        s.to = 6;
        s.compress = types[t];
        ok = pair(&s, &d, &r, "compress");
        s.compress = DDP_DTYPE_DEFAULT;
        if (!run(&s, &plain)) { ok = 0; if (g_rank0) fprintf(stderr, "compress (uncompressed): %s\n", plain.err); }
        for (i = 0; ok && i < d.n; i++) if (fabs(r.g0[i]) > gmax) gmax = fabs(r.g0[i]);
        for (i = 0; ok && i < d.n; i++) {
            if (fabs((double)d.g0[i] - (double)r.g0[i]) > rel * fabs(r.g0[i]) + 1e-6 * gmax) bad++;
            if (d.g0[i] != plain.g0[i]) differ++;
        }
        c = compare(&m, d.w, r.w);
        /* the CPU backend has no compression: only the GPU must show it */
        ok = ok && bad == 0 && (differ > 0 || !g_cuda) && cmp_ok(c, types[t] == DDP_BF16 ? 2e-2 : 4e-3) && d.replicas_same;
        report(ok, "gpu_paths compress %s world=%d: grad0 outside %.2g rel=%zu of %zu, grad0 differing from uncompressed=%zu%s, "
               "weights after %d steps max_rel_vs_f32_cpu=%.3g, replicas_identical=%s",
               dn(types[t]), d.world, rel, bad, d.n, differ, differ == 0 ? " (compression NOT applied)" : "", s.to, c.rel32,
               d.replicas_same ? "yes" : "no");
        all &= ok;
        result_free(&d); result_free(&plain); result_free(&r);
    }
    return all;
}

static int check_lossscale(void) {
    int all = 1, v;
    for (v = 0; v < 2; v++) {
        model m = model_of(v ? DDP_F16 : DDP_F32);
        spec s;
        result d, r;
        cmpres c;
        int ok, st, same = 1, n_skip = 0;
        char pattern[MAXS + 1], scales[256];
        size_t n;
        spec_init(&s, 1, &m);
        s.optim = v ? adamw() : sgd();
        s.ls.enabled = 1; s.ls.init_scale = 256; s.ls.growth_interval = 2;
        s.to = 8;
        s.inf_rank = g_world - 1; s.inf_step = 2;
        s.nan_rank = 0; s.nan_step = 5;
        ok = pair(&s, &d, &r, "lossscale");
        for (st = 0; st < s.to; st++) {
            same &= d.skipped[st] == r.skipped[st] && d.scale[st] == r.scale[st];
            n_skip += d.skipped[st];
            pattern[st] = d.skipped[st] ? 'S' : '.';
        }
        pattern[s.to] = 0;
        c = compare(&m, d.w, r.w);
        /* the skipped steps back the scale off (the next step's scale is lower) */
        ok = ok && same && d.skipped[2] && d.skipped[5] && d.scale[3] < d.scale[2] && d.scale[6] < d.scale[5] &&
             d.skipped_total == r.skipped_total && d.replicas_same && d.traces_same &&
             cmp_ok(c, F32_TOL);
        for (st = 0, n = 0; st < s.to && n < sizeof scales - 16; st++)
            n += (size_t)snprintf(scales + n, sizeof scales - n, "%s%g", st ? "," : "", d.scale[st]);
        report(ok, "gpu_paths lossscale %s %s world=%d: skips=%s (cpu %lld) scales=%s (cpu at the end %g) equal_to_cpu=%s "
               "every_rank_same_trace=%s replicas_identical=%s max_rel=%.3g ulp1=%ld bad16=%ld",
               dn(m.dtype[0]), v ? "adamw" : "sgd", d.world, pattern, (long long)r.skipped_total, scales,
               r.scale[s.to - 1], same ? "yes" : "no", d.traces_same ? "yes" : "no", d.replicas_same ? "yes" : "no",
               c.rel32, c.ulp1, c.bad16);
        all &= ok;
        result_free(&d); result_free(&r);
    }
    return all;
}

static int check_groups(void) {
    static const ddp_dtype types[3] = { DDP_F32, DDP_BF16, DDP_F16 };
    int all = 1, t, o;
    for (t = 0; t < 3; t++)
        for (o = 0; o < 2; o++) {
            model m = model_of(types[t]), plain;
            spec s;
            result d, r, n;
            cmpres c, effect;
            int ok;
            m.use_opt = 1;
            m.opt[0].lr_scale = 0.5;
            m.opt[1].no_weight_decay = 1;
            m.opt[2].weight_decay_scale = 3.0;
            m.opt[4].lr_scale = 2.0; m.opt[4].no_weight_decay = 1;
            spec_init(&s, 1, &m);
            s.optim = o ? adamw() : sgd();
            s.to = 5;
            ok = pair(&s, &d, &r, "groups");
            plain = m; plain.use_opt = 0;
            spec_init(&s, 1, &plain);
            s.optim = o ? adamw() : sgd();
            s.to = 5;
            if (!run(&s, &n)) { ok = 0; if (g_rank0) fprintf(stderr, "groups (no groups): %s\n", n.err); }
            c = compare(&m, d.w, r.w);
            effect = compare(&m, n.w, d.w);
            ok = ok && cmp_ok(c, F32_TOL) && !cmp_ok(effect, F32_TOL);
            report(ok, "gpu_paths groups %s %s: 4 groups, max_rel_vs_cpu=%.3g ulp1=%ld bad16=%ld (groups change the result: %s)",
                   dn(types[t]), o ? "adamw" : "sgd", c.rel32, c.ulp1, c.bad16, !cmp_ok(effect, F32_TOL) ? "yes" : "NO");
            all &= ok;
            result_free(&d); result_free(&r); result_free(&n);
        }
    return all;
}

static int check_schedule(void) {
    int all = 1, k;
    for (k = 0; k < 3; k++) {
        model m = model_of(k == 2 ? DDP_BF16 : DDP_F32);
        spec s;
        result d, r;
        cmpres c;
        int ok, st, same = 1;
        spec_init(&s, 1, &m);
        s.optim = k == 1 ? sgd() : adamw();
        s.to = 10;
        if (k == 0) { s.sched.type = DDP_SCHEDULE_COSINE; s.sched.warmup_steps = 2; s.sched.total_steps = 10; s.sched.min_lr = 1e-3; }
        if (k == 1) { s.sched.type = DDP_SCHEDULE_LINEAR; s.sched.warmup_steps = 1; s.sched.total_steps = 8; }
        if (k == 2) { s.sched.type = DDP_SCHEDULE_STEP; s.sched.step_size = 3; s.sched.gamma = 0.5; }
        s.set_lr_step = 6; s.set_lr = s.optim.lr * 2;
        ok = pair(&s, &d, &r, "schedule");
        for (st = 0; st < s.to; st++) same &= d.lr[st] == r.lr[st];
        c = compare(&m, d.w, r.w);
        ok = ok && same && r.lr[0] != r.lr[5] && cmp_ok(c, F32_TOL);
        report(ok, "gpu_paths schedule %s %s %s: lr per step equal to cpu=%s (lr %.4g %.4g %.4g ... %.4g) max_rel=%.3g ulp1=%ld bad16=%ld",
               k == 0 ? "cosine+warmup" : k == 1 ? "linear+warmup" : "step", dn(m.dtype[0]), k == 1 ? "sgd" : "adamw",
               same ? "yes" : "no", r.lr[0], r.lr[1], r.lr[2], r.lr[s.to - 1], c.rel32, c.ulp1, c.bad16);
        all &= ok;
        result_free(&d); result_free(&r);
    }
    return all;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    int i, ok;
    static const char *modes[] = { "alloc", "clip", "ckpt", "compress", "lossscale", "groups", "schedule" };
    static int (*const fns[])(void) = { check_alloc, check_clip, check_ckpt, check_compress, check_lossscale, check_groups, check_schedule };
    int which = -1;
    g_cuda = 1;
    for (i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--device") && i + 1 < argc) { i++; g_cuda = strcmp(argv[i], "cpu") != 0; }
        else if (!strcmp(argv[i], "--sabotage")) g_sabotage = 1;
        else { fprintf(stderr, "unknown argument '%s'\n", argv[i]); return 2; }
    }
    for (i = 0; i < (int)(sizeof modes / sizeof modes[0]); i++) if (!strcmp(mode, modes[i])) which = i;
    if (which < 0) {
        fprintf(stderr, "usage: test_gpu_paths alloc|clip|ckpt|compress|lossscale|groups|schedule [--device cuda|cpu] [--sabotage]\n");
        return 2;
    }
    {
        const char *r = getenv("RANK"), *w = getenv("WORLD_SIZE");
        g_rank0 = !r || atoi(r) == 0;
        g_world = w && atoi(w) > 0 ? atoi(w) : 1;
    }
    if (g_cuda) {
#if defined(TGP_CUDA)
        int n = 0;
        if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) { printf("SKIP no CUDA device\n"); return 77; }
        {   /* the library's choice: LOCAL_RANK (nccl), LOCAL_RANK modulo the count (staged) */
            const char *lr = getenv("LOCAL_RANK");
            if (cudaSetDevice((lr ? atoi(lr) : 0) % n) != cudaSuccess) { fprintf(stderr, "cudaSetDevice failed\n"); return 3; }
        }
        if (cudaStreamCreate(&g_stream) != cudaSuccess) { fprintf(stderr, "cudaStreamCreate failed\n"); return 3; }
        g_pool_size = (size_t)64 << 20;
        if (cudaMalloc((void **)&g_pool, g_pool_size) != cudaSuccess) { fprintf(stderr, "cudaMalloc of the pool failed\n"); return 3; }
#else
        printf("SKIP this build has no CUDA (use --device cpu)\n");
        return 77;
#endif
    }
    ok = fns[which]();
    if (g_sabotage) { /* every comparison must have failed */
        int caught = g_npass == 0 && g_nfail > 0;
        if (g_rank0) printf("%s sabotage: %d of %d %s comparisons detected the 0.2 added to the device run's gradients\n",
                            caught ? "PASS" : "FAIL", g_nfail, g_npass + g_nfail, mode);
        ok = caught;
    }
#if defined(TGP_CUDA)
    if (g_pool) cudaFree(g_pool);
    if (g_cuda) cudaStreamDestroy(g_stream);
#endif
    return ok ? 0 : 1;
}
