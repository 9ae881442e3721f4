/* ddp_kernels.cuh - v0.2.0 - CUDA kernels for ddp.h over flat buffers
   (fused SGD and AdamW steps, mixed-precision variants, scaling, casts,
   squared L2 norms, non-finite checks), each with a plain-C CPU reference

   License: MIT, see the end of this file.

   Do this:
       #define DDP_KERNELS_IMPLEMENTATION
   before you include this file in *one* .cu file (compiled by nvcc) to
   create the implementation. Every other file, C, C++ or CUDA, includes it
   without the macro: the declarations have no CUDA types (streams are
   void *, element types are int codes), so a plain C compiler reads them.

       // in ONE .cu file:
       #define DDP_KERNELS_IMPLEMENTATION
       #include "ddp_kernels.cuh"

   The same macro in a C or C++ file that is NOT compiled by nvcc compiles
   only the CPU references (ddp_ref_*) and the 16-bit conversion helpers:
   that is how CPU-only builds and tests use them.

   COMPILE-TIME SWITCHES (define before including the implementation)

       DDP_KERNELS_IMPLEMENTATION  compile the implementation in this file
       DDP_STATIC                  make every public function static (a
                                   private copy per translation unit)
       DDP_KERNELS_API             your own decoration of public functions
       DDP_KERNELS_CUDA            insist on the kernels: #error when this
                                   file is not compiled by nvcc
       DDP_KERNELS_NO_CUDA         compile only the CPU references, even
                                   under nvcc
       DDP_KERNELS_NO_REFS         leave the CPU references and conversion
                                   helpers out of this implementation (when
                                   another translation unit, say a C file,
                                   already defines them)

   LINK LINES

       nvcc -O3 -arch=sm_90 impl.cu app.c -lcudart -lm
       cc -std=c99 refs.c -lm          (CPU references only)

   LAUNCHERS (asynchronous on stream, a cudaStream_t or NULL; each returns
   0 or the cudaError_t of the failure; a bad argument returns
   cudaErrorInvalidValue (1) and launches nothing; n == 0 launches nothing)

       ddp_k_sgd             SGD step over fp32 params (momentum, Nesterov,
                             weight decay), PyTorch semantics
       ddp_k_sgd_mixed       same on fp32 master weights, writes the 16-bit
                             copy; gradient in f32, f16 or bf16
       ddp_k_adamw           AdamW step over fp32 params (PyTorch semantics)
       ddp_k_adamw_mixed     same on fp32 master weights + 16-bit copy
       ddp_k_optimizer_step  either step from double hyper-parameters, per
                             parameter group (lr and weight-decay scales per
                             chunk of elements), with a gradient multiplier
       ddp_k_scale           x *= alpha
       ddp_k_cast            dst = convert(src * scale), f32/f16/bf16, round
                             to nearest even
       ddp_k_add             dst += src, f32/f16/bf16 (sum in f32)
       ddp_k_sumsq           squared L2 norm of f32 data into one device float
       ddp_k_sumsq_typed     same for f32, f16 or bf16 data
       ddp_k_sumsq_scratch_elems  scratch floats the sumsq launchers use at
                             most (DDP_K_SUMSQ_SCRATCH_ELEMS)
       ddp_k_nonfinite       set a device int to 1 if any element is NaN/Inf

   CPU REFERENCES (plain C, no CUDA needed; the GPU tests compare against
   them): ddp_ref_sgd ddp_ref_sgd_mixed ddp_ref_adamw ddp_ref_adamw_mixed
   ddp_ref_optimizer_step ddp_ref_scale ddp_ref_cast ddp_ref_add ddp_ref_sumsq ddp_ref_sumsq_typed
   ddp_ref_nonfinite, and ddp_f32_to_bf16_bits ddp_bf16_bits_to_f32
   ddp_f32_to_f16_bits ddp_f16_bits_to_f32 (round to nearest even).

   ELEMENT TYPES

       Passed as int: DDP_K_F32 1, DDP_K_F64 2, DDP_K_F16 3, DDP_K_BF16 4,
       the same numbers as ddp.h's ddp_dtype (DDP_F32 ... DDP_BF16), so
       either name works. f64 is accepted by ddp_k_nonfinite only.

   VECTORISATION AND ALIGNMENT

       Every launcher makes one launch over a flat buffer with a grid-stride
       loop over 4-element vectors (16-byte loads for f32, 8-byte for 16-bit
       types). Pointers only need the alignment of their element type (less
       is rejected with cudaErrorInvalidValue): a
       few elements before the first aligned one and after the last vector
       go through a scalar path, and buffers whose misalignments differ
       take the scalar path throughout (slower, still correct). The flat
       buffers of ddp.h are 256-byte aligned and hit the fast path.
       Buffers of one call must not overlap, except that ddp_k_cast may run
       in place when source and destination have the same type.

   DETERMINISM

       Every kernel gives bitwise the same result on every run on the same
       device. ddp_k_sumsq* reduce in two passes (block partials into the
       scratch buffer, then one block adds them in double): no atomics.
       Without scratch (NULL) they run one block, which is slower.
*/
#ifndef DDP_KERNELS_CUH_INCLUDED
#define DDP_KERNELS_CUH_INCLUDED

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__) || defined(__clang__)
#  define DDP_K__UNUSED __attribute__((unused))
#else
#  define DDP_K__UNUSED
#endif

#ifndef DDP_KERNELS_API
#  ifdef DDP_STATIC
#    define DDP_KERNELS_API static DDP_K__UNUSED
#  else
#    define DDP_KERNELS_API extern
#  endif
#endif

/* Under DDP_STATIC a function is declared only where this translation unit
   also defines it (a static function declared but never defined is an
   error or a warning). */
#if !defined(DDP_STATIC) || (defined(DDP_KERNELS_IMPLEMENTATION) && \
    defined(__CUDACC__) && !defined(DDP_KERNELS_NO_CUDA))
#  define DDP_K__DECLARE_LAUNCHERS
#endif
#if !defined(DDP_STATIC) || (defined(DDP_KERNELS_IMPLEMENTATION) && \
    !defined(DDP_KERNELS_NO_REFS))
#  define DDP_K__DECLARE_REFS
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* The version of ddp.h this file belongs to (see ddp.h's VERSION section). */
#define DDP_KERNELS_VERSION_MAJOR 0
#define DDP_KERNELS_VERSION_MINOR 2
#define DDP_KERNELS_VERSION_PATCH 0

/* Element type codes: the values of ddp.h's ddp_dtype. */
#define DDP_K_F32  1
#define DDP_K_F64  2
#define DDP_K_F16  3
#define DDP_K_BF16 4

/* Most scratch floats ddp_k_sumsq* use (the number of partial sums). */
#define DDP_K_SUMSQ_SCRATCH_ELEMS 2048

/* ---- one optimizer step, described (ddp_k_optimizer_step) ----------------- */

#define DDP_K_SGD   1
#define DDP_K_ADAMW 2
#define DDP_K_MAX_GROUPS 16

/* Hyper-parameters in double, as PyTorch's Python floats; each constant is
   rounded to f32 once, on the host (so beta2 = 0.999 gives PyTorch's
   1 - beta2 exactly, unlike the float launchers below). */
typedef struct ddp_k_optim {
    int     type;          /* DDP_K_SGD or DDP_K_ADAMW */
    double  lr;            /* times the group's lr_scale */
    double  momentum;      /* SGD */
    double  dampening;     /* SGD */
    int     nesterov;      /* SGD */
    double  weight_decay;  /* times the group's wd_scale; SGD: L2 in the gradient, AdamW: decoupled */
    double  beta1, beta2, eps;  /* AdamW */
    int64_t step;          /* the step being taken, 1-based (SGD: 1 only writes the momentum buffer) */
    double  grad_scale;    /* every gradient is multiplied by it first (unscale x clip); 0 means 1 */
} ddp_k_optim;

/* Parameter groups over the elements of a call: element i belongs to group
   map[(first + i) >> chunk_log2] (so a slice of a larger buffer keeps the
   buffer's map: pass its element offset as first). */
typedef struct ddp_k_groups {
    const unsigned char *map; /* device memory for ddp_k_*, host for ddp_ref_*; NULL: all in group 0 */
    size_t first;
    int    chunk_log2;
    int    count;             /* 1..DDP_K_MAX_GROUPS; every map entry must be below it */
    double lr_scale[DDP_K_MAX_GROUPS];
    double wd_scale[DDP_K_MAX_GROUPS];
} ddp_k_groups;

#ifdef DDP_K__DECLARE_LAUNCHERS

/* ---- optimizer steps ----------------------------------------------------- */

/* PyTorch SGD (dampening 0), per element:
       g = grad + weight_decay * param
       if momentum != 0:
           buf = first_step ? g : momentum * buf + g
           g   = nesterov ? g + momentum * buf : buf
       param -= lr * g
   momentum_buf may be NULL when momentum == 0; with first_step it is only
   written. */
DDP_KERNELS_API int ddp_k_sgd(float *param, const float *grad, float *momentum_buf,
                              size_t n, float lr, float momentum, float weight_decay,
                              int nesterov, int first_step, void *stream);

/* The same step on fp32 master weights; grad has grad_dtype (f32, f16,
   bf16); the updated master is rounded into param16 (param16_dtype f16,
   bf16, or f32 for a plain copy). */
DDP_KERNELS_API int ddp_k_sgd_mixed(void *param16, int param16_dtype, float *master,
                                    const void *grad, int grad_dtype, float *momentum_buf,
                                    size_t n, float lr, float momentum, float weight_decay,
                                    int nesterov, int first_step, void *stream);

/* PyTorch AdamW, step t = step (1-based, the step being taken now):
       param *= 1 - lr * weight_decay
       m = beta1 * m + (1 - beta1) * g
       v = beta2 * v + (1 - beta2) * g * g
       param -= (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
   Bias corrections are computed on the host in double. m and v start at
   zero for step 1 (the caller zeroes them). Needs 0 <= beta < 1.
   The hyper-parameters are f32, so 1 - beta2 comes from 0.999f, not from
   0.999 as in PyTorch with a Python float: the v increment differs by
   1.3e-5 relative (like passing beta2 = 0.99900001287 to PyTorch);
   ddp_k_optimizer_step takes double hyper-parameters and has no such
   difference. */
DDP_KERNELS_API int ddp_k_adamw(float *param, const float *grad, float *m, float *v,
                                size_t n, float lr, float beta1, float beta2, float eps,
                                float weight_decay, int step, void *stream);

/* AdamW on fp32 master weights, gradient in grad_dtype, result rounded into
   param16 (param16_dtype f16, bf16 or f32). */
DDP_KERNELS_API int ddp_k_adamw_mixed(void *param16, int param16_dtype, float *master,
                                      const void *grad, int grad_dtype, float *m, float *v,
                                      size_t n, float lr, float beta1, float beta2, float eps,
                                      float weight_decay, int step, void *stream);

/* SGD or AdamW as described by opt, over parameter groups (groups may be
   NULL: one group, scales 1), on fp32 master weights with an optional
   16-bit copy (param16_dtype f16/bf16/f32, or 0 with param16 NULL when
   master is the parameter itself); gradient in grad_dtype (f32, f16, bf16).
   m is the SGD momentum buffer (NULL allowed without momentum) or AdamW's
   first moment, v AdamW's second. The per-element arithmetic is that of
   ddp_k_sgd / ddp_k_adamw, plus the gradient multiplier and dampening. */
DDP_KERNELS_API int ddp_k_optimizer_step(void *param16, int param16_dtype, float *master,
                                         const void *grad, int grad_dtype, float *m, float *v,
                                         size_t n, const ddp_k_optim *opt,
                                         const ddp_k_groups *groups, void *stream);

/* ---- element-wise utilities ---------------------------------------------- */

/* x *= alpha. */
DDP_KERNELS_API int ddp_k_scale(float *x, size_t n, float alpha, void *stream);

/* dst[i] = convert(src[i] * scale) between f32, f16 and bf16 (the product is
   taken in f32, then rounded to nearest even). */
DDP_KERNELS_API int ddp_k_cast(void *dst, int dst_dtype, const void *src, int src_dtype,
                               size_t n, float scale, void *stream);

/* dst[i] = dst[i] + src[i], both of dtype (f32, f16 or bf16); the sum is
   taken in f32, then rounded to nearest even. */
DDP_KERNELS_API int ddp_k_add(void *dst, const void *src, int dtype, size_t n, void *stream);

/* ---- reductions and checks ----------------------------------------------- */

/* DDP_K_SUMSQ_SCRATCH_ELEMS: pass a scratch buffer of that many floats for
   full speed (fewer is allowed: fewer blocks). */
DDP_KERNELS_API size_t ddp_k_sumsq_scratch_elems(void);

/* *out_device = sum of x[i]^2 (overwritten, also for n == 0). Per-thread
   sums in f32, block partials into scratch, final sum in double. scratch
   may be NULL (one block does all the work, in double). */
DDP_KERNELS_API int ddp_k_sumsq(const float *x, size_t n, float *out_device,
                                float *scratch, size_t scratch_elems, void *stream);
/* Same for x of dtype f32, f16 or bf16. */
DDP_KERNELS_API int ddp_k_sumsq_typed(const void *x, int dtype, size_t n, float *out_device,
                                      float *scratch, size_t scratch_elems, void *stream);

/* Sets *flag_device to 1 if any of the n elements of x (dtype f32, f64,
   f16 or bf16) is NaN or infinite; never clears it (zero it first). */
DDP_KERNELS_API int ddp_k_nonfinite(const void *x, int dtype, size_t n, int *flag_device,
                                    void *stream);

#endif /* DDP_K__DECLARE_LAUNCHERS */

#ifdef DDP_K__DECLARE_REFS

/* ---- CPU references (plain C) -------------------------------------------- */
/* Same arguments and arithmetic as the launchers, on host memory, without
   the stream. Those taking dtypes return 0, or 1 for a bad argument. */

DDP_KERNELS_API uint16_t ddp_f32_to_bf16_bits(float f);   /* nearest even; NaN stays NaN */
DDP_KERNELS_API float    ddp_bf16_bits_to_f32(uint16_t h);
DDP_KERNELS_API uint16_t ddp_f32_to_f16_bits(float f);    /* nearest even, subnormals, Inf */
DDP_KERNELS_API float    ddp_f16_bits_to_f32(uint16_t h);

DDP_KERNELS_API void ddp_ref_sgd(float *param, const float *grad, float *momentum_buf,
                                 size_t n, float lr, float momentum, float weight_decay,
                                 int nesterov, int first_step);
DDP_KERNELS_API int  ddp_ref_sgd_mixed(void *param16, int param16_dtype, float *master,
                                       const void *grad, int grad_dtype, float *momentum_buf,
                                       size_t n, float lr, float momentum, float weight_decay,
                                       int nesterov, int first_step);
DDP_KERNELS_API int  ddp_ref_adamw(float *param, const float *grad, float *m, float *v,
                                   size_t n, float lr, float beta1, float beta2, float eps,
                                   float weight_decay, int step);
DDP_KERNELS_API int  ddp_ref_adamw_mixed(void *param16, int param16_dtype, float *master,
                                         const void *grad, int grad_dtype, float *m, float *v,
                                         size_t n, float lr, float beta1, float beta2,
                                         float eps, float weight_decay, int step);
DDP_KERNELS_API int  ddp_ref_optimizer_step(void *param16, int param16_dtype, float *master,
                                            const void *grad, int grad_dtype, float *m, float *v,
                                            size_t n, const ddp_k_optim *opt,
                                            const ddp_k_groups *groups);
DDP_KERNELS_API void ddp_ref_scale(float *x, size_t n, float alpha);
DDP_KERNELS_API int  ddp_ref_cast(void *dst, int dst_dtype, const void *src, int src_dtype,
                                  size_t n, float scale);
DDP_KERNELS_API int  ddp_ref_add(void *dst, const void *src, int dtype, size_t n);
/* Sums in double; ddp_ref_sumsq_typed returns -1 for a bad dtype. */
DDP_KERNELS_API double ddp_ref_sumsq(const float *x, size_t n);
DDP_KERNELS_API double ddp_ref_sumsq_typed(const void *x, int dtype, size_t n);
DDP_KERNELS_API int  ddp_ref_nonfinite(const void *x, int dtype, size_t n, int *flag);

#endif /* DDP_K__DECLARE_REFS */

#ifdef __cplusplus
}
#endif
#endif /* DDP_KERNELS_CUH_INCLUDED */

/* ========================================================================== */
/*                              IMPLEMENTATION                                */
/* ========================================================================== */

#if defined(DDP_KERNELS_IMPLEMENTATION) && !defined(DDP_KERNELS_IMPLEMENTATION_DONE)
#define DDP_KERNELS_IMPLEMENTATION_DONE

#if defined(DDP_KERNELS_CUDA) && !defined(__CUDACC__)
#  error "ddp_kernels.cuh: DDP_KERNELS_CUDA asks for the CUDA kernels, but this file is not compiled by nvcc. Compile the file that defines DDP_KERNELS_IMPLEMENTATION as a .cu file with nvcc, or leave DDP_KERNELS_CUDA undefined to get only the CPU references."
#endif
#if defined(DDP_KERNELS_CUDA) && defined(DDP_KERNELS_NO_CUDA)
#  error "ddp_kernels.cuh: define DDP_KERNELS_CUDA or DDP_KERNELS_NO_CUDA, not both."
#endif

#if defined(__CUDACC__) && !defined(DDP_KERNELS_NO_CUDA)
#  define DDP_K__CUDA 1
#else
#  define DDP_K__CUDA 0
#endif
#if defined(DDP_KERNELS_NO_REFS)
#  define DDP_K__REFS 0
#else
#  define DDP_K__REFS 1
#endif

#include <math.h>
#include <string.h>

#if defined(DDP_H_INCLUDED)
/* The dtype codes are ddp.h's; fail the build if they ever drift apart. */
typedef char ddp_k__dtype_codes_match[(DDP_F32 == DDP_K_F32 && DDP_F64 == DDP_K_F64 &&
                                       DDP_F16 == DDP_K_F16 && DDP_BF16 == DDP_K_BF16) ? 1 : -1];
#endif

/* Functions shared by the kernels and the references: one formula, two
   compilers. */
#if defined(__CUDACC__)
#  define DDP_K__HD static __host__ __device__ __forceinline__ DDP_K__UNUSED
#else
#  define DDP_K__HD static inline DDP_K__UNUSED
#endif

/* ---- per-element arithmetic ---------------------------------------------- */

/* One optimizer step's constants, prepared on the host from double
   hyper-parameters (like PyTorch: scalars in double, each rounded to f32
   once), per parameter group where they depend on the group. */
typedef struct ddp_k__ocs {
    int   adamw;
    float lr[DDP_K_MAX_GROUPS], wd[DDP_K_MAX_GROUPS];       /* SGD */
    float decay[DDP_K_MAX_GROUPS];                          /* AdamW: 1 - lr * weight_decay */
    float step_size[DDP_K_MAX_GROUPS];                      /* AdamW: lr / (1 - beta1^t) */
    float momentum, omd;                                    /* SGD: momentum, 1 - dampening */
    int   nesterov, first;                                  /* SGD */
    float b1, b2, omb1, omb2, eps, sqrt_bc2;                /* AdamW */
    float gs;                                               /* gradient multiplier */
    const unsigned char *map;                               /* group of each chunk, or NULL */
    size_t map_first;
    int   log2;
} ddp_k__ocs;

static DDP_K__UNUSED int ddp_k__opt_prepare(const ddp_k_optim *o, const ddp_k_groups *gr, ddp_k__ocs *c)
{
    int k, count = gr ? gr->count : 1;
    double bc1 = 1.0, bc2 = 1.0;
    memset(c, 0, sizeof *c);
    if (!o || (o->type != DDP_K_SGD && o->type != DDP_K_ADAMW) || o->step < 1) return 1;
    if (gr && (count < 1 || count > DDP_K_MAX_GROUPS || gr->chunk_log2 < 0 || gr->chunk_log2 > 62)) return 1;
    c->adamw = o->type == DDP_K_ADAMW;
    if (c->adamw) {
        if (!(o->beta1 >= 0.0 && o->beta1 < 1.0) || !(o->beta2 >= 0.0 && o->beta2 < 1.0)) return 1;
        bc1 = 1.0 - pow(o->beta1, (double)o->step);
        bc2 = 1.0 - pow(o->beta2, (double)o->step);
    }
    for (k = 0; k < count; k++) {
        const double lr = o->lr * (gr ? gr->lr_scale[k] : 1.0);
        const double wd = o->weight_decay * (gr ? gr->wd_scale[k] : 1.0);
        c->lr[k] = (float)lr;
        c->wd[k] = (float)wd;
        c->decay[k] = (float)(1.0 - lr * wd);
        c->step_size[k] = (float)(lr / bc1);
    }
    c->momentum = (float)o->momentum;
    c->omd = (float)(1.0 - o->dampening);
    c->nesterov = o->nesterov;
    c->first = o->step == 1;
    c->b1 = (float)o->beta1;
    c->b2 = (float)o->beta2;
    c->omb1 = (float)(1.0 - o->beta1);
    c->omb2 = (float)(1.0 - o->beta2);
    c->eps = (float)o->eps;
    c->sqrt_bc2 = (float)sqrt(bc2);
    c->gs = o->grad_scale == 0.0 ? 1.0f : (float)o->grad_scale;
    c->map = gr ? gr->map : NULL;
    c->map_first = gr ? gr->first : 0;
    c->log2 = gr ? gr->chunk_log2 : 0;
    return 0;
}

/* The parameter group of element i of a call. */
DDP_K__HD int ddp_k__grp(const ddp_k__ocs *c, size_t i)
{
    return c->map ? (int)c->map[(c->map_first + i) >> c->log2] : 0;
}

/* PyTorch's AdamW on one element of group k: returns the new param,
   updates *m and *v. */
DDP_K__HD float ddp_k__adamw_el(float p, float g, float *m, float *v, const ddp_k__ocs *c, int k)
{
    float mm, vv, denom;
    g = g * c->gs;
    mm = c->b1 * *m + c->omb1 * g;
    vv = c->b2 * *v + c->omb2 * g * g;
    denom = sqrtf(vv) / c->sqrt_bc2 + c->eps;
    *m = mm;
    *v = vv;
    return p * c->decay[k] - c->step_size[k] * (mm / denom);
}

/* PyTorch's SGD on one element of group k: returns the new param; *buf
   holds the old momentum (unused on the first step) and receives the new. */
DDP_K__HD float ddp_k__sgd_el(float p, float g, float *buf, const ddp_k__ocs *c, int k)
{
    g = g * c->gs;
    if (c->wd[k] != 0.0f) g = g + c->wd[k] * p;
    if (c->momentum != 0.0f) {
        const float b = c->first ? g : c->momentum * *buf + c->omd * g;
        *buf = b;
        g = c->nesterov ? g + c->momentum * b : b;
    }
    return p - c->lr[k] * g;
}

DDP_K__HD int ddp_k__float_dtype(int dt)
{
    return dt == DDP_K_F32 || dt == DDP_K_F16 || dt == DDP_K_BF16;
}

/* ---- CUDA infrastructure ------------------------------------------------- */

#if DDP_K__CUDA
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <atomic>

#define DDP_K__THREADS       256
#define DDP_K__MAX_DEVICES   64
#define DDP_K__BAD           ((int)cudaErrorInvalidValue)

/* Element access by dtype code: scalar get/put and 4-element vectors. */
template <int DT> struct ddp_k__io;

template <> struct ddp_k__io<DDP_K_F32> {
    typedef float T;
    static __device__ __forceinline__ float get(const T *p, size_t i) { return p[i]; }
    static __device__ __forceinline__ void put(T *p, size_t i, float x) { p[i] = x; }
    static __device__ __forceinline__ void get4(const T *p, size_t i, float *r)
    {
        const float4 a = *reinterpret_cast<const float4 *>(p + i);
        r[0] = a.x; r[1] = a.y; r[2] = a.z; r[3] = a.w;
    }
    static __device__ __forceinline__ void put4(T *p, size_t i, const float *r)
    {
        *reinterpret_cast<float4 *>(p + i) = make_float4(r[0], r[1], r[2], r[3]);
    }
};

struct ddp_k__cvt_f16 {
    static __device__ __forceinline__ float in(unsigned short h)
    { return __half2float(__ushort_as_half(h)); }
    static __device__ __forceinline__ unsigned short out(float x)
    { return __half_as_ushort(__float2half_rn(x)); }
};
struct ddp_k__cvt_bf16 {
    static __device__ __forceinline__ float in(unsigned short h)
    { return __uint_as_float((unsigned)h << 16); }
    static __device__ __forceinline__ unsigned short out(float x)
    { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
};

template <class C> struct ddp_k__io16 {
    typedef unsigned short T;
    static __device__ __forceinline__ float get(const T *p, size_t i) { return C::in(p[i]); }
    static __device__ __forceinline__ void put(T *p, size_t i, float x) { p[i] = C::out(x); }
    static __device__ __forceinline__ void get4(const T *p, size_t i, float *r)
    {
        const uint2 a = *reinterpret_cast<const uint2 *>(p + i);
        r[0] = C::in((unsigned short)(a.x & 0xffffu));
        r[1] = C::in((unsigned short)(a.x >> 16));
        r[2] = C::in((unsigned short)(a.y & 0xffffu));
        r[3] = C::in((unsigned short)(a.y >> 16));
    }
    static __device__ __forceinline__ void put4(T *p, size_t i, const float *r)
    {
        uint2 a;
        a.x = (unsigned)C::out(r[0]) | ((unsigned)C::out(r[1]) << 16);
        a.y = (unsigned)C::out(r[2]) | ((unsigned)C::out(r[3]) << 16);
        *reinterpret_cast<uint2 *>(p + i) = a;
    }
};
template <> struct ddp_k__io<DDP_K_F16> : ddp_k__io16<ddp_k__cvt_f16> {};
template <> struct ddp_k__io<DDP_K_BF16> : ddp_k__io16<ddp_k__cvt_bf16> {};

/* DT 0: "no such buffer" (an optimizer without a 16-bit copy). */
template <> struct ddp_k__io<0> {
    typedef float T;
    static __device__ __forceinline__ void put(T *, size_t, float) {}
    static __device__ __forceinline__ void put4(T *, size_t, const float *) {}
};

static size_t ddp_k__dtype_size(int dt)
{
    switch (dt) {
    case DDP_K_F32: return 4;
    case DDP_K_F64: return 8;
    case DDP_K_F16: case DDP_K_BF16: return 2;
    default: return 0;
    }
}

/* Elements [0, head) and [head + V*nvec, n) take the scalar path; vectors
   of V elements start at head. ok 0: a pointer is not even aligned to its
   element size (the launch must not happen). */
struct ddp_k__plan { size_t head, nvec; int ok; };

static ddp_k__plan ddp_k__make_plan(size_t n, size_t V, int count, const void *const *ptr,
                                    const size_t *es)
{
    ddp_k__plan pl;
    size_t head, vb;
    uintptr_t a0 = (uintptr_t)ptr[0];
    int k;
    pl.head = n; /* all scalar unless every buffer lines up */
    pl.nvec = 0;
    pl.ok = 1;
    for (k = 0; k < count; k++)
        if ((uintptr_t)ptr[k] % es[k] != 0) pl.ok = 0;
    if (!pl.ok) return pl;
    vb = V * es[0];
    head = (size_t)((vb - a0 % vb) % vb) / es[0];
    if (head >= n) return pl;
    for (k = 0; k < count; k++) {
        const uintptr_t a = (uintptr_t)ptr[k] + head * es[k];
        if (a % (V * es[k]) != 0) return pl;
    }
    pl.head = head;
    pl.nvec = (n - head) / V;
    return pl;
}

/* One full wave of resident blocks (multiprocessors x blocks that fit on
   one), fewer for small work. Both numbers are asked once per device;
   occ_cache belongs to the calling kernel. */
template <class K>
static int ddp_k__grid(K kernel, std::atomic<int> *occ_cache, size_t work, unsigned *blocks)
{
    static std::atomic<int> sm_cache[DDP_K__MAX_DEVICES];
    int dev = 0, sms = 0, occ = 0;
    size_t want, cap;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess) return (int)e;
    if (dev >= 0 && dev < DDP_K__MAX_DEVICES) {
        sms = sm_cache[dev].load(std::memory_order_relaxed);
        occ = occ_cache[dev].load(std::memory_order_relaxed);
    }
    if (sms <= 0) {
        e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
        if (e != cudaSuccess) return (int)e;
        if (sms <= 0) sms = 1;
        if (dev >= 0 && dev < DDP_K__MAX_DEVICES)
            sm_cache[dev].store(sms, std::memory_order_relaxed);
    }
    if (occ <= 0) {
        e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, DDP_K__THREADS, 0);
        if (e != cudaSuccess) return (int)e;
        if (occ <= 0) occ = 1;
        if (dev >= 0 && dev < DDP_K__MAX_DEVICES)
            occ_cache[dev].store(occ, std::memory_order_relaxed);
    }
    want = (work + DDP_K__THREADS - 1) / DDP_K__THREADS;
    cap = (size_t)sms * (size_t)occ;
    if (want < 1) want = 1;
    *blocks = (unsigned)(want < cap ? want : cap);
    return 0;
}

/* The element-wise kernel: Op::vec4(i) handles elements i..i+3 (aligned),
   Op::one(i) a single element. */
template <class Op>
static __global__ void __launch_bounds__(DDP_K__THREADS)
ddp_k__ew_kernel(const Op op, size_t head, size_t nvec, size_t n)
{
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    const size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t rest = n - 4 * nvec;
    size_t j;
    for (j = t; j < nvec; j += stride) op.vec4(head + 4 * j);
    for (j = t; j < rest; j += stride) op.one(j < head ? j : j + 4 * nvec);
}

template <class Op>
static int ddp_k__run_ew(const Op &op, size_t n, ddp_k__plan pl, void *stream)
{
    unsigned blocks = 0;
    const size_t rest = n - 4 * pl.nvec;
    static std::atomic<int> occ[DDP_K__MAX_DEVICES];
    int e;
    if (!pl.ok) return DDP_K__BAD;
    e = ddp_k__grid(ddp_k__ew_kernel<Op>, occ, pl.nvec > rest ? pl.nvec : rest, &blocks);
    if (e) return e;
    ddp_k__ew_kernel<Op><<<blocks, DDP_K__THREADS, 0, (cudaStream_t)stream>>>(op, pl.head,
                                                                               pl.nvec, n);
    return (int)cudaGetLastError();
}
#endif /* DDP_K__CUDA */

/* ---- 16-bit conversions (host) ------------------------------------------- */

#if DDP_K__REFS
static uint32_t ddp_k__f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float ddp_k__u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

DDP_KERNELS_API uint16_t ddp_f32_to_bf16_bits(float f)
{
    uint32_t u = ddp_k__f2u(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

DDP_KERNELS_API float ddp_bf16_bits_to_f32(uint16_t h)
{
    return ddp_k__u2f((uint32_t)h << 16);
}

DDP_KERNELS_API uint16_t ddp_f32_to_f16_bits(float f)
{
    const uint32_t x = ddp_k__f2u(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t u = x & 0x7fffffffu;
    uint32_t r, rem;
    if (u > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((u >> 13) & 0x3ffu)); /* NaN */
    if (u >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* >= 65520 rounds to Inf */
    if (u >= 0x38800000u) {                                  /* normal half */
        r = (u - 0x38000000u) >> 13;
        rem = u & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r++;
        return (uint16_t)(sign | r);
    }
    if (u <= 0x33000000u) return (uint16_t)sign;             /* <= 2^-25 rounds to 0 */
    {                                                        /* subnormal half */
        const uint32_t e = u >> 23;
        const uint32_t m = (u & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126u - e;                     /* 14..24 */
        const uint32_t half = 1u << (shift - 1u);
        r = m >> shift;
        rem = m & ((1u << shift) - 1u);
        if (rem > half || (rem == half && (r & 1u))) r++;
        return (uint16_t)(sign | r);
    }
}

DDP_KERNELS_API float ddp_f16_bits_to_f32(uint16_t h)
{
    const uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    const uint32_t e = ((uint32_t)h >> 10) & 0x1fu;
    const uint32_t m = (uint32_t)h & 0x3ffu;
    if (e == 0) { /* zero or subnormal: m * 2^-24, exact in f32 */
        const float f = (float)m * (1.0f / 16777216.0f);
        return ddp_k__u2f(ddp_k__f2u(f) | sign);
    }
    if (e == 31) return ddp_k__u2f(sign | 0x7f800000u | (m << 13));
    return ddp_k__u2f(sign | ((e + 112u) << 23) | (m << 13));
}

static float ddp_k__ref_get(const void *p, int dt, size_t i)
{
    switch (dt) {
    case DDP_K_F32: return ((const float *)p)[i];
    case DDP_K_F16: return ddp_f16_bits_to_f32(((const uint16_t *)p)[i]);
    case DDP_K_BF16: return ddp_bf16_bits_to_f32(((const uint16_t *)p)[i]);
    default: return 0.0f;
    }
}

static void ddp_k__ref_put(void *p, int dt, size_t i, float x)
{
    switch (dt) {
    case DDP_K_F32: ((float *)p)[i] = x; break;
    case DDP_K_F16: ((uint16_t *)p)[i] = ddp_f32_to_f16_bits(x); break;
    case DDP_K_BF16: ((uint16_t *)p)[i] = ddp_f32_to_bf16_bits(x); break;
    default: break;
    }
}
#endif /* DDP_K__REFS */

/* ---- optimizer steps: SGD and AdamW ------------------------------------- */

#if DDP_K__CUDA
/* PD 0: the f32 buffer w is the parameter itself, no 16-bit copy. */
template <int GD, int PD, int ADAMW> struct ddp_k__opt_op {
    float *w;
    const typename ddp_k__io<GD>::T *g;
    float *m, *v;
    typename ddp_k__io<PD>::T *p16;
    ddp_k__ocs c;

    __device__ __forceinline__ int uses_m() const { return ADAMW || c.momentum != 0.0f; }
    __device__ __forceinline__ void one(size_t i) const
    {
        float M = 0.0f, V = 0.0f, p;
        const int k = ddp_k__grp(&c, i);
        if (ADAMW || (c.momentum != 0.0f && !c.first)) M = m[i];
        if (ADAMW) V = v[i];
        p = ADAMW ? ddp_k__adamw_el(w[i], ddp_k__io<GD>::get(g, i), &M, &V, &c, k)
                  : ddp_k__sgd_el(w[i], ddp_k__io<GD>::get(g, i), &M, &c, k);
        w[i] = p;
        if (uses_m()) m[i] = M;
        if (ADAMW) v[i] = V;
        ddp_k__io<PD>::put(p16, i, p);
    }
    __device__ __forceinline__ void vec4(size_t i) const
    {
        float W[4], G[4], M[4] = {0.0f, 0.0f, 0.0f, 0.0f}, V[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        int k;
        ddp_k__io<DDP_K_F32>::get4(w, i, W);
        ddp_k__io<GD>::get4(g, i, G);
        if (ADAMW || (c.momentum != 0.0f && !c.first)) ddp_k__io<DDP_K_F32>::get4(m, i, M);
        if (ADAMW) ddp_k__io<DDP_K_F32>::get4(v, i, V);
#pragma unroll
        for (k = 0; k < 4; k++) {
            const int grp = ddp_k__grp(&c, i + (size_t)k);
            W[k] = ADAMW ? ddp_k__adamw_el(W[k], G[k], &M[k], &V[k], &c, grp)
                         : ddp_k__sgd_el(W[k], G[k], &M[k], &c, grp);
        }
        ddp_k__io<DDP_K_F32>::put4(w, i, W);
        if (uses_m()) ddp_k__io<DDP_K_F32>::put4(m, i, M);
        if (ADAMW) ddp_k__io<DDP_K_F32>::put4(v, i, V);
        ddp_k__io<PD>::put4(p16, i, W);
    }
};

struct ddp_k__opt_args {
    void *param16; int pd; float *w; const void *g; int gd; float *m, *v; size_t n; void *stream;
};

template <int GD, int PD, int ADAMW> static int ddp_k__opt_run(const ddp_k__opt_args &a, const ddp_k__ocs &c)
{
    ddp_k__opt_op<GD, PD, ADAMW> op;
    const void *ptr[5];
    size_t es[5];
    int count = 0;
    op.w = a.w;
    op.g = (const typename ddp_k__io<GD>::T *)a.g;
    op.m = a.m;
    op.v = a.v;
    op.p16 = (typename ddp_k__io<PD>::T *)a.param16;
    op.c = c;
    ptr[count] = a.w; es[count++] = 4;
    ptr[count] = a.g; es[count++] = ddp_k__dtype_size(GD);
    if (ADAMW || c.momentum != 0.0f) { ptr[count] = a.m; es[count++] = 4; }
    if (ADAMW) { ptr[count] = a.v; es[count++] = 4; }
    if (PD != 0) { ptr[count] = a.param16; es[count++] = ddp_k__dtype_size(PD); }
    return ddp_k__run_ew(op, a.n, ddp_k__make_plan(a.n, 4, count, ptr, es), a.stream);
}

template <int PD, int ADAMW> static int ddp_k__opt_g(const ddp_k__opt_args &a, const ddp_k__ocs &c)
{
    switch (a.gd) {
    case DDP_K_F32: return ddp_k__opt_run<DDP_K_F32, PD, ADAMW>(a, c);
    case DDP_K_F16: return ddp_k__opt_run<DDP_K_F16, PD, ADAMW>(a, c);
    case DDP_K_BF16: return ddp_k__opt_run<DDP_K_BF16, PD, ADAMW>(a, c);
    default: return DDP_K__BAD;
    }
}

template <int ADAMW> static int ddp_k__opt_p(const ddp_k__opt_args &a, const ddp_k__ocs &c)
{
    switch (a.pd) {
    case 0: return ddp_k__opt_g<0, ADAMW>(a, c);
    case DDP_K_F32: return ddp_k__opt_g<DDP_K_F32, ADAMW>(a, c);
    case DDP_K_F16: return ddp_k__opt_g<DDP_K_F16, ADAMW>(a, c);
    default: return ddp_k__opt_g<DDP_K_BF16, ADAMW>(a, c);
    }
}

static int ddp_k__opt_launch(const ddp_k__opt_args &a, const ddp_k_optim *o, const ddp_k_groups *gr)
{
    ddp_k__ocs c;
    if (!ddp_k__float_dtype(a.gd)) return DDP_K__BAD;
    if (a.pd != 0 && !ddp_k__float_dtype(a.pd)) return DDP_K__BAD;
    if (ddp_k__opt_prepare(o, gr, &c)) return DDP_K__BAD;
    if (a.n == 0) return 0;
    if (!a.w || !a.g || (c.adamw && (!a.m || !a.v)) || (!c.adamw && c.momentum != 0.0f && !a.m) ||
        (a.pd != 0 && !a.param16))
        return DDP_K__BAD;
    return c.adamw ? ddp_k__opt_p<1>(a, c) : ddp_k__opt_p<0>(a, c);
}

static ddp_k__opt_args ddp_k__args(void *param16, int pd, float *w, const void *g, int gd, float *m,
                                   float *v, size_t n, void *stream)
{
    ddp_k__opt_args a;
    a.param16 = param16; a.pd = pd; a.w = w; a.g = g; a.gd = gd; a.m = m; a.v = v; a.n = n;
    a.stream = stream;
    return a;
}
#endif /* DDP_K__CUDA */

/* The float-argument launchers and references as one ddp_k_optim. */
static DDP_K__UNUSED ddp_k_optim ddp_k__sgd_optim(float lr, float momentum, float weight_decay,
                                                  int nesterov, int first_step)
{
    ddp_k_optim o;
    memset(&o, 0, sizeof o);
    o.type = DDP_K_SGD;
    o.lr = lr; o.momentum = momentum; o.weight_decay = weight_decay; o.nesterov = nesterov;
    o.step = first_step ? 1 : 2;
    o.grad_scale = 1.0;
    return o;
}

static DDP_K__UNUSED ddp_k_optim ddp_k__adamw_optim(float lr, float beta1, float beta2, float eps,
                                                    float weight_decay, int step)
{
    ddp_k_optim o;
    memset(&o, 0, sizeof o);
    o.type = DDP_K_ADAMW;
    o.lr = lr; o.beta1 = beta1; o.beta2 = beta2; o.eps = eps; o.weight_decay = weight_decay;
    o.step = step;
    o.grad_scale = 1.0;
    return o;
}

#if DDP_K__CUDA
DDP_KERNELS_API int ddp_k_sgd(float *param, const float *grad, float *momentum_buf,
                              size_t n, float lr, float momentum, float weight_decay,
                              int nesterov, int first_step, void *stream)
{
    const ddp_k_optim o = ddp_k__sgd_optim(lr, momentum, weight_decay, nesterov, first_step);
    return ddp_k__opt_launch(ddp_k__args(NULL, 0, param, grad, DDP_K_F32, momentum_buf, NULL, n, stream), &o, NULL);
}

DDP_KERNELS_API int ddp_k_sgd_mixed(void *param16, int param16_dtype, float *master,
                                    const void *grad, int grad_dtype, float *momentum_buf,
                                    size_t n, float lr, float momentum, float weight_decay,
                                    int nesterov, int first_step, void *stream)
{
    const ddp_k_optim o = ddp_k__sgd_optim(lr, momentum, weight_decay, nesterov, first_step);
    if (!ddp_k__float_dtype(param16_dtype)) return DDP_K__BAD;
    return ddp_k__opt_launch(ddp_k__args(param16, param16_dtype, master, grad, grad_dtype, momentum_buf, NULL, n, stream), &o, NULL);
}

DDP_KERNELS_API int ddp_k_adamw(float *param, const float *grad, float *m, float *v,
                                size_t n, float lr, float beta1, float beta2, float eps,
                                float weight_decay, int step, void *stream)
{
    const ddp_k_optim o = ddp_k__adamw_optim(lr, beta1, beta2, eps, weight_decay, step);
    return ddp_k__opt_launch(ddp_k__args(NULL, 0, param, grad, DDP_K_F32, m, v, n, stream), &o, NULL);
}

DDP_KERNELS_API int ddp_k_adamw_mixed(void *param16, int param16_dtype, float *master,
                                      const void *grad, int grad_dtype, float *m, float *v,
                                      size_t n, float lr, float beta1, float beta2, float eps,
                                      float weight_decay, int step, void *stream)
{
    const ddp_k_optim o = ddp_k__adamw_optim(lr, beta1, beta2, eps, weight_decay, step);
    if (!ddp_k__float_dtype(param16_dtype)) return DDP_K__BAD;
    return ddp_k__opt_launch(ddp_k__args(param16, param16_dtype, master, grad, grad_dtype, m, v, n, stream), &o, NULL);
}

DDP_KERNELS_API int ddp_k_optimizer_step(void *param16, int param16_dtype, float *master,
                                         const void *grad, int grad_dtype, float *m, float *v,
                                         size_t n, const ddp_k_optim *opt,
                                         const ddp_k_groups *groups, void *stream)
{
    if ((param16_dtype == 0) != (param16 == NULL)) return DDP_K__BAD;
    return ddp_k__opt_launch(ddp_k__args(param16, param16_dtype, master, grad, grad_dtype, m, v, n, stream), opt, groups);
}
#endif /* DDP_K__CUDA */

#if DDP_K__REFS
DDP_KERNELS_API int ddp_ref_optimizer_step(void *param16, int param16_dtype, float *master,
                                           const void *grad, int grad_dtype, float *m, float *v,
                                           size_t n, const ddp_k_optim *opt,
                                           const ddp_k_groups *groups)
{
    ddp_k__ocs c;
    size_t i;
    if (!ddp_k__float_dtype(grad_dtype)) return 1;
    if (param16_dtype != 0 && !ddp_k__float_dtype(param16_dtype)) return 1;
    if ((param16_dtype == 0) != (param16 == NULL)) return 1;
    if (ddp_k__opt_prepare(opt, groups, &c)) return 1;
    if (n == 0) return 0;
    if (!master || !grad || (c.adamw && (!m || !v)) || (!c.adamw && c.momentum != 0.0f && !m)) return 1;
    if (c.map)
        for (i = 0; i < n; i++)
            if ((int)c.map[(c.map_first + i) >> c.log2] >= groups->count) return 1;
    for (i = 0; i < n; i++) {
        const int k = ddp_k__grp(&c, i);
        const float g = ddp_k__ref_get(grad, grad_dtype, i);
        float M = 0.0f, V = 0.0f;
        if (c.adamw || (c.momentum != 0.0f && !c.first)) M = m[i];
        if (c.adamw) V = v[i];
        master[i] = c.adamw ? ddp_k__adamw_el(master[i], g, &M, &V, &c, k) : ddp_k__sgd_el(master[i], g, &M, &c, k);
        if (c.adamw || c.momentum != 0.0f) m[i] = M;
        if (c.adamw) v[i] = V;
        if (param16_dtype != 0) ddp_k__ref_put(param16, param16_dtype, i, master[i]);
    }
    return 0;
}

DDP_KERNELS_API void ddp_ref_sgd(float *param, const float *grad, float *momentum_buf,
                                 size_t n, float lr, float momentum, float weight_decay,
                                 int nesterov, int first_step)
{
    const ddp_k_optim o = ddp_k__sgd_optim(lr, momentum, weight_decay, nesterov, first_step);
    (void)ddp_ref_optimizer_step(NULL, 0, param, grad, DDP_K_F32, momentum_buf, NULL, n, &o, NULL);
}

DDP_KERNELS_API int ddp_ref_sgd_mixed(void *param16, int param16_dtype, float *master,
                                      const void *grad, int grad_dtype, float *momentum_buf,
                                      size_t n, float lr, float momentum, float weight_decay,
                                      int nesterov, int first_step)
{
    const ddp_k_optim o = ddp_k__sgd_optim(lr, momentum, weight_decay, nesterov, first_step);
    if (!ddp_k__float_dtype(param16_dtype)) return 1;
    return ddp_ref_optimizer_step(param16, param16_dtype, master, grad, grad_dtype, momentum_buf, NULL, n, &o, NULL);
}

DDP_KERNELS_API int ddp_ref_adamw(float *param, const float *grad, float *m, float *v,
                                  size_t n, float lr, float beta1, float beta2, float eps,
                                  float weight_decay, int step)
{
    const ddp_k_optim o = ddp_k__adamw_optim(lr, beta1, beta2, eps, weight_decay, step);
    return ddp_ref_optimizer_step(NULL, 0, param, grad, DDP_K_F32, m, v, n, &o, NULL);
}

DDP_KERNELS_API int ddp_ref_adamw_mixed(void *param16, int param16_dtype, float *master,
                                        const void *grad, int grad_dtype, float *m, float *v,
                                        size_t n, float lr, float beta1, float beta2,
                                        float eps, float weight_decay, int step)
{
    const ddp_k_optim o = ddp_k__adamw_optim(lr, beta1, beta2, eps, weight_decay, step);
    if (!ddp_k__float_dtype(param16_dtype)) return 1;
    return ddp_ref_optimizer_step(param16, param16_dtype, master, grad, grad_dtype, m, v, n, &o, NULL);
}
#endif /* DDP_K__REFS */

/* ---- scale --------------------------------------------------------------- */

#if DDP_K__CUDA
struct ddp_k__scale_op {
    float *x;
    float alpha;
    __device__ __forceinline__ void one(size_t i) const { x[i] = x[i] * alpha; }
    __device__ __forceinline__ void vec4(size_t i) const
    {
        float r[4];
        int k;
        ddp_k__io<DDP_K_F32>::get4(x, i, r);
#pragma unroll
        for (k = 0; k < 4; k++) r[k] = r[k] * alpha;
        ddp_k__io<DDP_K_F32>::put4(x, i, r);
    }
};

DDP_KERNELS_API int ddp_k_scale(float *x, size_t n, float alpha, void *stream)
{
    ddp_k__scale_op op;
    const void *ptr[1];
    size_t es[1];
    if (n == 0) return 0;
    if (!x) return DDP_K__BAD;
    op.x = x;
    op.alpha = alpha;
    ptr[0] = x; es[0] = 4;
    return ddp_k__run_ew(op, n, ddp_k__make_plan(n, 4, 1, ptr, es), stream);
}
#endif /* DDP_K__CUDA */

#if DDP_K__REFS
DDP_KERNELS_API void ddp_ref_scale(float *x, size_t n, float alpha)
{
    size_t i;
    for (i = 0; i < n; i++) x[i] = x[i] * alpha;
}
#endif /* DDP_K__REFS */

/* ---- cast ---------------------------------------------------------------- */

#if DDP_K__CUDA
template <int DD, int SD> struct ddp_k__cast_op {
    typename ddp_k__io<DD>::T *d;
    const typename ddp_k__io<SD>::T *s;
    float scale;
    __device__ __forceinline__ void one(size_t i) const
    {
        ddp_k__io<DD>::put(d, i, ddp_k__io<SD>::get(s, i) * scale);
    }
    __device__ __forceinline__ void vec4(size_t i) const
    {
        float r[4];
        int k;
        ddp_k__io<SD>::get4(s, i, r);
#pragma unroll
        for (k = 0; k < 4; k++) r[k] = r[k] * scale;
        ddp_k__io<DD>::put4(d, i, r);
    }
};

template <int DD, int SD>
static int ddp_k__cast_run(void *dst, const void *src, size_t n, float scale, void *stream)
{
    ddp_k__cast_op<DD, SD> op;
    const void *ptr[2];
    size_t es[2];
    op.d = (typename ddp_k__io<DD>::T *)dst;
    op.s = (const typename ddp_k__io<SD>::T *)src;
    op.scale = scale;
    ptr[0] = dst; es[0] = ddp_k__dtype_size(DD);
    ptr[1] = src; es[1] = ddp_k__dtype_size(SD);
    return ddp_k__run_ew(op, n, ddp_k__make_plan(n, 4, 2, ptr, es), stream);
}

template <int DD>
static int ddp_k__cast_s(void *dst, const void *src, int sd, size_t n, float scale, void *stream)
{
    switch (sd) {
    case DDP_K_F32: return ddp_k__cast_run<DD, DDP_K_F32>(dst, src, n, scale, stream);
    case DDP_K_F16: return ddp_k__cast_run<DD, DDP_K_F16>(dst, src, n, scale, stream);
    case DDP_K_BF16: return ddp_k__cast_run<DD, DDP_K_BF16>(dst, src, n, scale, stream);
    default: return DDP_K__BAD;
    }
}

DDP_KERNELS_API int ddp_k_cast(void *dst, int dst_dtype, const void *src, int src_dtype,
                               size_t n, float scale, void *stream)
{
    if (!ddp_k__float_dtype(dst_dtype) || !ddp_k__float_dtype(src_dtype)) return DDP_K__BAD;
    if (n == 0) return 0;
    if (!dst || !src) return DDP_K__BAD;
    switch (dst_dtype) {
    case DDP_K_F32: return ddp_k__cast_s<DDP_K_F32>(dst, src, src_dtype, n, scale, stream);
    case DDP_K_F16: return ddp_k__cast_s<DDP_K_F16>(dst, src, src_dtype, n, scale, stream);
    default: return ddp_k__cast_s<DDP_K_BF16>(dst, src, src_dtype, n, scale, stream);
    }
}
#endif /* DDP_K__CUDA */

#if DDP_K__REFS
DDP_KERNELS_API int ddp_ref_cast(void *dst, int dst_dtype, const void *src, int src_dtype,
                                 size_t n, float scale)
{
    size_t i;
    if (!ddp_k__float_dtype(dst_dtype) || !ddp_k__float_dtype(src_dtype)) return 1;
    for (i = 0; i < n; i++)
        ddp_k__ref_put(dst, dst_dtype, i, ddp_k__ref_get(src, src_dtype, i) * scale);
    return 0;
}
#endif /* DDP_K__REFS */

/* ---- add ----------------------------------------------------------------- */

#if DDP_K__CUDA
template <int DT> struct ddp_k__add_op {
    typename ddp_k__io<DT>::T *d;
    const typename ddp_k__io<DT>::T *s;
    __device__ __forceinline__ void one(size_t i) const
    {
        ddp_k__io<DT>::put(d, i, ddp_k__io<DT>::get(d, i) + ddp_k__io<DT>::get(s, i));
    }
    __device__ __forceinline__ void vec4(size_t i) const
    {
        float a[4], b[4];
        int k;
        ddp_k__io<DT>::get4(d, i, a);
        ddp_k__io<DT>::get4(s, i, b);
#pragma unroll
        for (k = 0; k < 4; k++) a[k] = a[k] + b[k];
        ddp_k__io<DT>::put4(d, i, a);
    }
};

template <int DT> static int ddp_k__add_run(void *dst, const void *src, size_t n, void *stream)
{
    ddp_k__add_op<DT> op;
    const void *ptr[2];
    size_t es[2];
    op.d = (typename ddp_k__io<DT>::T *)dst;
    op.s = (const typename ddp_k__io<DT>::T *)src;
    ptr[0] = dst; es[0] = ddp_k__dtype_size(DT);
    ptr[1] = src; es[1] = ddp_k__dtype_size(DT);
    return ddp_k__run_ew(op, n, ddp_k__make_plan(n, 4, 2, ptr, es), stream);
}

DDP_KERNELS_API int ddp_k_add(void *dst, const void *src, int dtype, size_t n, void *stream)
{
    if (!ddp_k__float_dtype(dtype)) return DDP_K__BAD;
    if (n == 0) return 0;
    if (!dst || !src) return DDP_K__BAD;
    switch (dtype) {
    case DDP_K_F32: return ddp_k__add_run<DDP_K_F32>(dst, src, n, stream);
    case DDP_K_F16: return ddp_k__add_run<DDP_K_F16>(dst, src, n, stream);
    default: return ddp_k__add_run<DDP_K_BF16>(dst, src, n, stream);
    }
}
#endif /* DDP_K__CUDA */

#if DDP_K__REFS
DDP_KERNELS_API int ddp_ref_add(void *dst, const void *src, int dtype, size_t n)
{
    size_t i;
    if (!ddp_k__float_dtype(dtype)) return 1;
    for (i = 0; i < n; i++)
        ddp_k__ref_put(dst, dtype, i, ddp_k__ref_get(dst, dtype, i) + ddp_k__ref_get(src, dtype, i));
    return 0;
}
#endif /* DDP_K__REFS */

/* ---- squared L2 norm ----------------------------------------------------- */

#if DDP_K__CUDA
/* Sum over the block; the result is valid in thread 0. Needs blockDim.x ==
   DDP_K__THREADS. */
template <typename T> static __device__ __forceinline__ T ddp_k__block_sum(T s)
{
    __shared__ T warp_sums[DDP_K__THREADS / 32];
    const int lane = (int)(threadIdx.x & 31u), warp = (int)(threadIdx.x >> 5);
    int o;
    for (o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
    if (lane == 0) warp_sums[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < DDP_K__THREADS / 32 ? warp_sums[lane] : (T)0;
        for (o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
    }
    return s;
}

/* Pass 1: one partial per block into out[blockIdx.x]. Acc float (many
   blocks) or double (a single block doing everything). */
template <int DT, typename Acc>
static __global__ void __launch_bounds__(DDP_K__THREADS)
ddp_k__sumsq_kernel(const typename ddp_k__io<DT>::T *x, size_t head, size_t nvec, size_t n,
                    float *out)
{
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    const size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t rest = n - 4 * nvec;
    Acc a0 = 0, a1 = 0, a2 = 0, a3 = 0, s;
    size_t j;
    for (j = t; j < nvec; j += stride) {
        float r[4];
        ddp_k__io<DT>::get4(x, head + 4 * j, r);
        a0 += (Acc)r[0] * (Acc)r[0];
        a1 += (Acc)r[1] * (Acc)r[1];
        a2 += (Acc)r[2] * (Acc)r[2];
        a3 += (Acc)r[3] * (Acc)r[3];
    }
    for (j = t; j < rest; j += stride) {
        const Acc r = (Acc)ddp_k__io<DT>::get(x, j < head ? j : j + 4 * nvec);
        a0 += r * r;
    }
    s = ddp_k__block_sum<Acc>((a0 + a1) + (a2 + a3));
    if (threadIdx.x == 0) out[blockIdx.x] = (float)s;
}

/* Pass 2: one block adds the partials in double, in a fixed order. */
static __global__ void __launch_bounds__(DDP_K__THREADS)
ddp_k__sumsq_final(const float *partial, unsigned count, float *out)
{
    double s = 0.0;
    unsigned i;
    for (i = threadIdx.x; i < count; i += blockDim.x) s += (double)partial[i];
    s = ddp_k__block_sum<double>(s);
    if (threadIdx.x == 0) *out = (float)s;
}

template <int DT>
static int ddp_k__sumsq_run(const void *x, size_t n, float *out, float *scratch,
                            size_t scratch_elems, void *stream)
{
    const typename ddp_k__io<DT>::T *xt = (const typename ddp_k__io<DT>::T *)x;
    const cudaStream_t st = (cudaStream_t)stream;
    const void *ptr[1];
    size_t es[1], rest, cap;
    ddp_k__plan pl;
    static std::atomic<int> occ[DDP_K__MAX_DEVICES];
    unsigned blocks = 0;
    int e;
    ptr[0] = x; es[0] = ddp_k__dtype_size(DT);
    pl = ddp_k__make_plan(n, 4, 1, ptr, es);
    if (!pl.ok) return DDP_K__BAD;
    rest = n - 4 * pl.nvec;
    e = ddp_k__grid(ddp_k__sumsq_kernel<DT, float>, occ, pl.nvec > rest ? pl.nvec : rest,
                    &blocks);
    if (e) return e;
    cap = scratch ? scratch_elems : 0;
    if (cap > DDP_K_SUMSQ_SCRATCH_ELEMS) cap = DDP_K_SUMSQ_SCRATCH_ELEMS;
    if (blocks > cap) blocks = (unsigned)cap;
    if (blocks <= 1) {
        ddp_k__sumsq_kernel<DT, double><<<1, DDP_K__THREADS, 0, st>>>(xt, pl.head, pl.nvec, n,
                                                                      out);
        return (int)cudaGetLastError();
    }
    ddp_k__sumsq_kernel<DT, float><<<blocks, DDP_K__THREADS, 0, st>>>(xt, pl.head, pl.nvec, n,
                                                                      scratch);
    e = (int)cudaGetLastError();
    if (e) return e;
    ddp_k__sumsq_final<<<1, DDP_K__THREADS, 0, st>>>(scratch, blocks, out);
    return (int)cudaGetLastError();
}

DDP_KERNELS_API size_t ddp_k_sumsq_scratch_elems(void)
{
    return DDP_K_SUMSQ_SCRATCH_ELEMS;
}

DDP_KERNELS_API int ddp_k_sumsq_typed(const void *x, int dtype, size_t n, float *out_device,
                                      float *scratch, size_t scratch_elems, void *stream)
{
    if (!ddp_k__float_dtype(dtype) || !out_device || (n > 0 && !x)) return DDP_K__BAD;
    if (n == 0) return (int)cudaMemsetAsync(out_device, 0, sizeof(float), (cudaStream_t)stream);
    switch (dtype) {
    case DDP_K_F32:
        return ddp_k__sumsq_run<DDP_K_F32>(x, n, out_device, scratch, scratch_elems, stream);
    case DDP_K_F16:
        return ddp_k__sumsq_run<DDP_K_F16>(x, n, out_device, scratch, scratch_elems, stream);
    default:
        return ddp_k__sumsq_run<DDP_K_BF16>(x, n, out_device, scratch, scratch_elems, stream);
    }
}

DDP_KERNELS_API int ddp_k_sumsq(const float *x, size_t n, float *out_device, float *scratch,
                                size_t scratch_elems, void *stream)
{
    return ddp_k_sumsq_typed(x, DDP_K_F32, n, out_device, scratch, scratch_elems, stream);
}
#endif /* DDP_K__CUDA */

#if DDP_K__REFS
DDP_KERNELS_API double ddp_ref_sumsq(const float *x, size_t n)
{
    double s = 0.0;
    size_t i;
    for (i = 0; i < n; i++) s += (double)x[i] * (double)x[i];
    return s;
}

DDP_KERNELS_API double ddp_ref_sumsq_typed(const void *x, int dtype, size_t n)
{
    double s = 0.0;
    size_t i;
    if (!ddp_k__float_dtype(dtype)) return -1.0;
    for (i = 0; i < n; i++) {
        const double r = (double)ddp_k__ref_get(x, dtype, i);
        s += r * r;
    }
    return s;
}
#endif /* DDP_K__REFS */

/* ---- non-finite check ---------------------------------------------------- */

#if DDP_K__CUDA
/* Bit tests on raw words: an element is NaN/Inf when its exponent is all
   ones. V elements per 16-byte vector. */
template <int DT> struct ddp_k__nf;
template <> struct ddp_k__nf<DDP_K_F32> {
    enum { V = 4, ES = 4 };
    static __device__ __forceinline__ int word(unsigned w)
    { return (w & 0x7f800000u) == 0x7f800000u; }
    static __device__ __forceinline__ int elem(const unsigned char *p)
    { return word(*(const unsigned *)p); }
    static __device__ __forceinline__ int vec(uint4 q)
    { return word(q.x) | word(q.y) | word(q.z) | word(q.w); }
};
template <unsigned EXP> struct ddp_k__nf16 {
    enum { V = 8, ES = 2 };
    static __device__ __forceinline__ int word(unsigned w)
    { return (w & EXP) == EXP || (w & (EXP << 16)) == (EXP << 16); }
    static __device__ __forceinline__ int elem(const unsigned char *p)
    { return ((unsigned)*(const unsigned short *)p & EXP) == EXP; }
    static __device__ __forceinline__ int vec(uint4 q)
    { return word(q.x) | word(q.y) | word(q.z) | word(q.w); }
};
template <> struct ddp_k__nf<DDP_K_F16> : ddp_k__nf16<0x7c00u> {};
template <> struct ddp_k__nf<DDP_K_BF16> : ddp_k__nf16<0x7f80u> {};
template <> struct ddp_k__nf<DDP_K_F64> {
    enum { V = 2, ES = 8 };
    static __device__ __forceinline__ int hi(unsigned w)
    { return (w & 0x7ff00000u) == 0x7ff00000u; }
    static __device__ __forceinline__ int elem(const unsigned char *p)
    { return hi((unsigned)(*(const unsigned long long *)p >> 32)); }
    static __device__ __forceinline__ int vec(uint4 q)
    { return hi(q.y) | hi(q.w); }
};

template <int DT>
static __global__ void __launch_bounds__(DDP_K__THREADS)
ddp_k__nonfinite_kernel(const unsigned char *x, size_t head, size_t nvec, size_t n, int *flag)
{
    typedef ddp_k__nf<DT> NF;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    const size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t rest = n - (size_t)NF::V * nvec;
    int bad = 0;
    size_t j;
    for (j = t; j < nvec; j += stride)
        bad |= NF::vec(*reinterpret_cast<const uint4 *>(x + (head + (size_t)NF::V * j) * NF::ES));
    for (j = t; j < rest; j += stride)
        bad |= NF::elem(x + (j < head ? j : j + (size_t)NF::V * nvec) * NF::ES);
    if (bad) *(volatile int *)flag = 1; /* every writer stores the same value */
}

template <int DT>
static int ddp_k__nonfinite_run(const void *x, size_t n, int *flag, void *stream)
{
    typedef ddp_k__nf<DT> NF;
    const void *ptr[1];
    size_t es[1], rest;
    static std::atomic<int> occ[DDP_K__MAX_DEVICES];
    ddp_k__plan pl;
    unsigned blocks = 0;
    int e;
    ptr[0] = x; es[0] = NF::ES;
    pl = ddp_k__make_plan(n, NF::V, 1, ptr, es);
    if (!pl.ok) return DDP_K__BAD;
    rest = n - (size_t)NF::V * pl.nvec;
    e = ddp_k__grid(ddp_k__nonfinite_kernel<DT>, occ, pl.nvec > rest ? pl.nvec : rest, &blocks);
    if (e) return e;
    ddp_k__nonfinite_kernel<DT><<<blocks, DDP_K__THREADS, 0, (cudaStream_t)stream>>>(
        (const unsigned char *)x, pl.head, pl.nvec, n, flag);
    return (int)cudaGetLastError();
}

DDP_KERNELS_API int ddp_k_nonfinite(const void *x, int dtype, size_t n, int *flag_device,
                                    void *stream)
{
    if (!ddp_k__float_dtype(dtype) && dtype != DDP_K_F64) return DDP_K__BAD;
    if (n == 0) return 0;
    if (!x || !flag_device) return DDP_K__BAD;
    switch (dtype) {
    case DDP_K_F32: return ddp_k__nonfinite_run<DDP_K_F32>(x, n, flag_device, stream);
    case DDP_K_F64: return ddp_k__nonfinite_run<DDP_K_F64>(x, n, flag_device, stream);
    case DDP_K_F16: return ddp_k__nonfinite_run<DDP_K_F16>(x, n, flag_device, stream);
    default: return ddp_k__nonfinite_run<DDP_K_BF16>(x, n, flag_device, stream);
    }
}
#endif /* DDP_K__CUDA */

#if DDP_K__REFS
DDP_KERNELS_API int ddp_ref_nonfinite(const void *x, int dtype, size_t n, int *flag)
{
    size_t i;
    int bad = 0;
    if (!ddp_k__float_dtype(dtype) && dtype != DDP_K_F64) return 1;
    for (i = 0; i < n && !bad; i++) {
        if (dtype == DDP_K_F64) {
            uint64_t u;
            memcpy(&u, (const unsigned char *)x + 8 * i, 8);
            bad = ((u >> 52) & 0x7ffu) == 0x7ffu;
        } else {
            const float f = ddp_k__ref_get(x, dtype, i);
            bad = (ddp_k__f2u(f) & 0x7f800000u) == 0x7f800000u;
        }
    }
    if (bad) *flag = 1;
    return 0;
}
#endif /* DDP_K__REFS */

#endif /* DDP_KERNELS_IMPLEMENTATION */

/*
------------------------------------------------------------------------------
MIT License

Copyright (c) 2025 the ddp.h authors

Permission is hereby granted, free of charge, to any person obtaining a copy of
this software and associated documentation files (the "Software"), to deal in
the Software without restriction, including without limitation the rights to
use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies
of the Software, and to permit persons to whom the Software is furnished to do
so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
------------------------------------------------------------------------------
*/
