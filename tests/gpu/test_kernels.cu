/* test_kernels.cu - every kernel of ddp_kernels.cuh against its CPU reference

   For each kernel: fresh random inputs (never zeros; the seed is printed,
   --seed S repeats a run), outputs poisoned with NaN before each launch,
   guard elements around every buffer (a write outside [0, n) fails),
   sizes 1, 7, 4099 and 1000003, buffers aligned, all misaligned by one
   element (vector path with a scalar head and tail) and misaligned by
   different amounts (scalar path throughout). Optimizers run 3 steps.

   Pass: ||out - ref|| / ||ref|| <= 1e-5 for f32 outputs, <= 1e-2 for
   f16/bf16 outputs, no NaN where the reference has none; sums of squares
   within 1e-5 of the double reference; non-finite flags exact.

   Prints one line per check, "PASS name size err=..." or "FAIL ...", then
   "kernels: N passed, M failed"; exits 0 only if all passed.

   Build: nvcc -std=c++17 -O3 -arch=sm_90 -I. tests/gpu/test_kernels.cu -o test_kernels */
#define DDP_KERNELS_IMPLEMENTATION
#include "ddp_kernels.cuh"

#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <string>
#include <vector>

static int g_pass, g_fail;
static cudaStream_t g_stream;

static void summary_and_exit(int code)
{
    printf("kernels: %d passed, %d failed\n", g_pass, g_fail);
    fflush(stdout);
    exit(code);
}

/* A failing CUDA call ends the run: after a kernel fault the context is
   unusable. */
#define CK(call)                                                                          \
    do {                                                                                  \
        const cudaError_t e_ = (call);                                                    \
        if (e_ != cudaSuccess) {                                                          \
            printf("FAIL cuda %s at %s:%d: %s (%d)\n", #call, __FILE__, __LINE__,         \
                   cudaGetErrorString(e_), (int)e_);                                      \
            g_fail++;                                                                     \
            summary_and_exit(1);                                                          \
        }                                                                                 \
    } while (0)

struct Check;
static void check_fail(Check &c, const std::string &why);

/* After a launcher: its return code, then the runtime's view, then the
   stream (so a fault is reported at the kernel that caused it). */
static int launched(int rc, Check &c)
{
    if (rc != 0) {
        char msg[160];
        snprintf(msg, sizeof msg, "launcher returned %d (%s)", rc,
                 cudaGetErrorString((cudaError_t)rc));
        check_fail(c, msg);
        return 0;
    }
    CK(cudaGetLastError());
    CK(cudaStreamSynchronize(g_stream));
    return 1;
}

/* ---- random numbers ------------------------------------------------------ */

static uint64_t g_rng;
static uint64_t rnd_u64(void)
{
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static float rnd_pos(void) { return (float)((rnd_u64() >> 40) + 1) * (1.0f / 16777216.0f); } /* (0, 1] */
static float rnd_sym(void) { const float u = rnd_pos(); return (rnd_u64() & 1) ? u : -u; }
static size_t rnd_index(size_t n) { return (size_t)(rnd_u64() % n); }

/* ---- element access by dtype --------------------------------------------- */

static size_t dt_size(int dt) { return dt == DDP_K_F64 ? 8 : dt == DDP_K_F32 ? 4 : 2; }
static const char *dt_name(int dt)
{
    switch (dt) {
    case DDP_K_F32: return "f32";
    case DDP_K_F64: return "f64";
    case DDP_K_F16: return "f16";
    case DDP_K_BF16: return "bf16";
    default: return "?";
    }
}
static double get_el(const void *p, int dt, size_t i)
{
    switch (dt) {
    case DDP_K_F32: { float f; memcpy(&f, (const char *)p + 4 * i, 4); return f; }
    case DDP_K_F64: { double d; memcpy(&d, (const char *)p + 8 * i, 8); return d; }
    case DDP_K_F16: { uint16_t h; memcpy(&h, (const char *)p + 2 * i, 2); return ddp_f16_bits_to_f32(h); }
    default: { uint16_t h; memcpy(&h, (const char *)p + 2 * i, 2); return ddp_bf16_bits_to_f32(h); }
    }
}
static void put_el(void *p, int dt, size_t i, double x)
{
    switch (dt) {
    case DDP_K_F32: { const float f = (float)x; memcpy((char *)p + 4 * i, &f, 4); break; }
    case DDP_K_F64: memcpy((char *)p + 8 * i, &x, 8); break;
    case DDP_K_F16: { const uint16_t h = ddp_f32_to_f16_bits((float)x); memcpy((char *)p + 2 * i, &h, 2); break; }
    default: { const uint16_t h = ddp_f32_to_bf16_bits((float)x); memcpy((char *)p + 2 * i, &h, 2); break; }
    }
}

/* ---- device buffers with guards ------------------------------------------ */

enum { GUARD = 8 };
enum fill_kind { FILL_SYM, FILL_SMALL, FILL_POS, FILL_WIDE, FILL_NAN };

/* The allocation holds off + n + GUARD elements; the kernel sees
   [off, off + n). img is what the device holds outside the kernel's
   writes (guards) and what was uploaded. */
struct Buf {
    int dt;
    size_t es, n, off, total;
    std::vector<unsigned char> img;
    unsigned char *dev;
};

static double fill_value(fill_kind k)
{
    switch (k) {
    case FILL_SYM: return rnd_sym();
    case FILL_SMALL: return 0.1 * rnd_sym();
    case FILL_POS: return 0.01 * rnd_pos();
    case FILL_WIDE: return rnd_sym() * ldexp(1.0, (int)(rnd_u64() % 29) - 20); /* 2^-20 .. 2^8 */
    default: return NAN;
    }
}

static void buf_fill(Buf &b, fill_kind k)
{
    size_t i;
    for (i = 0; i < b.n; i++) put_el(b.img.data(), b.dt, b.off + i, fill_value(k));
}

static void buf_upload(Buf &b)
{
    CK(cudaMemcpy(b.dev, b.img.data(), b.total * b.es, cudaMemcpyHostToDevice));
}

static void buf_create(Buf &b, int dt, size_t n, size_t off, fill_kind k)
{
    size_t i;
    b.dt = dt;
    b.es = dt_size(dt);
    b.n = n;
    b.off = off;
    b.total = off + n + GUARD;
    b.img.assign(b.total * b.es, 0);
    for (i = 0; i < b.total; i++) put_el(b.img.data(), dt, i, rnd_sym()); /* guards too */
    buf_fill(b, k);
    b.dev = NULL;
    CK(cudaMalloc((void **)&b.dev, b.total * b.es));
    buf_upload(b);
}

static void buf_free(Buf &b)
{
    if (b.dev) CK(cudaFree(b.dev));
    b.dev = NULL;
}

static void *dptr(Buf &b) { return b.dev + b.off * b.es; }
static void *hptr(Buf &b) { return b.img.data() + b.off * b.es; }

static std::vector<unsigned char> buf_download(const Buf &b)
{
    std::vector<unsigned char> got(b.total * b.es);
    CK(cudaMemcpy(got.data(), b.dev, b.total * b.es, cudaMemcpyDeviceToHost));
    return got;
}

/* A check accumulates the worst error over its arrays and steps. */
struct Check {
    std::string name;
    size_t n;
    double err;
    int ok;
    std::string why;
};

static void check_begin(Check &c, const std::string &name, size_t n)
{
    c.name = name;
    c.n = n;
    c.err = 0.0;
    c.ok = 1;
    c.why.clear();
}

static void check_fail(Check &c, const std::string &why)
{
    if (c.ok) c.why = why;
    c.ok = 0;
}

static void check_end(const Check &c)
{
    if (c.ok) g_pass++;
    else g_fail++;
    printf("%s %s %zu err=%.3e%s%s\n", c.ok ? "PASS" : "FAIL", c.name.c_str(), c.n, c.err,
           c.ok ? "" : " ", c.ok ? "" : c.why.c_str());
}

/* Compare the device's copy of b (downloaded) with ref (n elements of b.dt,
   host), and the guards with what was uploaded. */
static void compare(Check &c, const Buf &b, const void *ref, double tol, const char *what)
{
    const std::vector<unsigned char> got = buf_download(b);
    double num = 0.0, den = 0.0, err;
    size_t i, nan = 0;
    char msg[160];
    if (memcmp(got.data(), b.img.data(), b.off * b.es) != 0 ||
        memcmp(got.data() + (b.off + b.n) * b.es, b.img.data() + (b.off + b.n) * b.es,
               GUARD * b.es) != 0) {
        snprintf(msg, sizeof msg, "%s: guard elements changed (write out of bounds)", what);
        check_fail(c, msg);
    }
    for (i = 0; i < b.n; i++) {
        const double o = get_el(got.data(), b.dt, b.off + i), r = get_el(ref, b.dt, i);
        if (!isfinite(o) && isfinite(r)) { nan++; continue; }
        num += (o - r) * (o - r);
        den += r * r;
    }
    err = den > 0.0 ? sqrt(num / den) : sqrt(num);
    if (err > c.err || err != err) c.err = err;
    if (nan) {
        snprintf(msg, sizeof msg, "%s: %zu non-finite outputs (first poison survived?)", what, nan);
        check_fail(c, msg);
    } else if (!(err <= tol)) {
        snprintf(msg, sizeof msg, "%s: err %.3e > %.0e", what, err, tol);
        check_fail(c, msg);
    }
}

/* The buffer must be bitwise what was uploaded (an input, or a buffer the
   kernel must not touch). */
static void compare_unchanged(Check &c, const Buf &b, const char *what)
{
    const std::vector<unsigned char> got = buf_download(b);
    if (memcmp(got.data(), b.img.data(), b.total * b.es) != 0)
        check_fail(c, std::string(what) + " changed");
}

static std::vector<unsigned char> region(Buf &b)
{
    const unsigned char *p = (const unsigned char *)hptr(b);
    return std::vector<unsigned char>(p, p + b.n * b.es);
}

/* ---- test matrix --------------------------------------------------------- */

static const size_t k_sizes[] = {1, 7, 4099, 1000003};
enum { NSIZES = sizeof k_sizes / sizeof k_sizes[0] };
/* Offsets, in elements, of buffer k: aligned, all misaligned alike (vector
   path with a scalar head), misaligned differently (scalar path). */
static const char *k_off_name[3] = {"aligned", "off1", "offmix"};
static size_t off_of(int cfg, int k) { return cfg == 0 ? 0 : cfg == 1 ? 1 : (size_t)(k % 4); }

static const double TOL32 = 1e-5, TOL16 = 1e-2;

/* ---- scale --------------------------------------------------------------- */

static void test_scale(void)
{
    int s, cfg;
    for (s = 0; s < NSIZES; s++)
        for (cfg = 0; cfg < 2; cfg++) {
            const size_t n = k_sizes[s];
            const float alpha = 0.25f + rnd_pos();
            Check c;
            Buf x;
            check_begin(c, std::string("scale/") + k_off_name[cfg], n);
            buf_create(x, DDP_K_F32, n, off_of(cfg, 1), FILL_SYM);
            std::vector<unsigned char> ref = region(x);
            ddp_ref_scale((float *)ref.data(), n, alpha);
            if (launched(ddp_k_scale((float *)dptr(x), n, alpha, g_stream), c))
                compare(c, x, ref.data(), TOL32, "x");
            check_end(c);
            buf_free(x);
        }
}

/* ---- cast ---------------------------------------------------------------- */

static void test_cast(void)
{
    static const int dts[3] = {DDP_K_F32, DDP_K_F16, DDP_K_BF16};
    int s, cfg, di, si;
    for (di = 0; di < 3; di++)
        for (si = 0; si < 3; si++)
            for (s = 0; s < NSIZES; s++)
                for (cfg = 0; cfg < 3; cfg++) {
                    const size_t n = k_sizes[s];
                    const int dd = dts[di], sd = dts[si];
                    const float scale = 0.25f + rnd_pos();
                    Check c;
                    Buf dst, src;
                    check_begin(c, std::string("cast/") + dt_name(dd) + "<-" + dt_name(sd) + "/" +
                                       k_off_name[cfg], n);
                    buf_create(dst, dd, n, off_of(cfg, 0), FILL_NAN);
                    buf_create(src, sd, n, off_of(cfg, 1), FILL_WIDE);
                    std::vector<unsigned char> ref(n * dst.es);
                    if (ddp_ref_cast(ref.data(), dd, hptr(src), sd, n, scale) != 0)
                        check_fail(c, "reference refused the dtypes");
                    if (launched(ddp_k_cast(dptr(dst), dd, dptr(src), sd, n, scale, g_stream), c)) {
                        compare(c, dst, ref.data(), dd == DDP_K_F32 ? TOL32 : TOL16, "dst");
                        compare_unchanged(c, src, "src (an input)");
                    }
                    check_end(c);
                    buf_free(dst);
                    buf_free(src);
                }
}

/* ---- SGD ----------------------------------------------------------------- */

/* variant: 0 plain (momentum 0, buffer NULL), 1 momentum, 2 Nesterov. pd 0:
   ddp_k_sgd, else ddp_k_sgd_mixed with a pd copy and a gd gradient. */
static void run_sgd(int pd, int gd, int variant, size_t n, int cfg)
{
    const float lr = 0.01f + 0.05f * rnd_pos();
    const float momentum = variant ? 0.9f : 0.0f;
    const float wd = (variant == 1) ? 0.0f : 0.01f;
    const int nesterov = variant == 2;
    static const char *vname[3] = {"plain", "momentum", "nesterov"};
    Check c;
    Buf w, g, buf, p16;
    int step;
    std::string name = pd ? std::string("sgd_mixed/p=") + dt_name(pd) + ",g=" + dt_name(gd) + "/"
                          : std::string("sgd/");
    name += std::string(vname[variant]) + "/" + k_off_name[cfg];
    check_begin(c, name, n);
    buf_create(w, DDP_K_F32, n, off_of(cfg, 0), FILL_SYM);
    buf_create(g, gd, n, off_of(cfg, 1), FILL_SYM);
    buf_create(buf, DDP_K_F32, n, off_of(cfg, 2), FILL_NAN); /* first step only writes it */
    if (pd) buf_create(p16, pd, n, off_of(cfg, 3), FILL_NAN);
    std::vector<unsigned char> rw = region(w), rbuf = region(buf), rp16(pd ? n * dt_size(pd) : 1);
    for (step = 1; step <= 3 && c.ok; step++) {
        const int first = step == 1;
        float *bufp = variant ? (float *)dptr(buf) : NULL;
        int rc;
        if (step > 1) { buf_fill(g, FILL_SYM); buf_upload(g); }
        if (pd) { buf_fill(p16, FILL_NAN); buf_upload(p16); }
        if (pd) {
            rc = ddp_k_sgd_mixed(dptr(p16), pd, (float *)dptr(w), dptr(g), gd, bufp, n, lr,
                                 momentum, wd, nesterov, first, g_stream);
            if (ddp_ref_sgd_mixed(rp16.data(), pd, (float *)rw.data(), hptr(g), gd,
                                  variant ? (float *)rbuf.data() : NULL, n, lr, momentum, wd,
                                  nesterov, first) != 0)
                check_fail(c, "reference refused the dtypes");
        } else {
            rc = ddp_k_sgd((float *)dptr(w), (const float *)dptr(g), bufp, n, lr, momentum, wd,
                           nesterov, first, g_stream);
            ddp_ref_sgd((float *)rw.data(), (const float *)hptr(g),
                        variant ? (float *)rbuf.data() : NULL, n, lr, momentum, wd, nesterov,
                        first);
        }
        if (!launched(rc, c)) break;
        compare(c, w, rw.data(), TOL32, "param");
        if (variant) compare(c, buf, rbuf.data(), TOL32, "momentum_buf");
        else compare_unchanged(c, buf, "momentum_buf (momentum is 0)");
        if (pd) compare(c, p16, rp16.data(), pd == DDP_K_F32 ? TOL32 : TOL16, "param16");
        compare_unchanged(c, g, "grad (an input)");
    }
    check_end(c);
    buf_free(w); buf_free(g); buf_free(buf);
    if (pd) buf_free(p16);
}

static void test_sgd(void)
{
    static const int p16s[2] = {DDP_K_F16, DDP_K_BF16};
    static const int gds[3] = {DDP_K_F32, DDP_K_F16, DDP_K_BF16};
    int s, cfg, v, pi, gi;
    for (s = 0; s < NSIZES; s++)
        for (cfg = 0; cfg < 3; cfg++)
            for (v = 0; v < 3; v++) run_sgd(0, DDP_K_F32, v, k_sizes[s], cfg);
    for (pi = 0; pi < 2; pi++)
        for (gi = 0; gi < 3; gi++)
            for (s = 0; s < NSIZES; s++)
                for (cfg = 0; cfg < 3; cfg++)
                    run_sgd(p16s[pi], gds[gi], 1 + (int)((s + cfg) % 2), k_sizes[s], cfg);
}

/* ---- AdamW --------------------------------------------------------------- */

static void run_adamw(int pd, int gd, size_t n, int cfg)
{
    const float lr = 1e-3f * (0.5f + rnd_pos());
    const float b1 = 0.9f, b2 = 0.999f, eps = 1e-8f, wd = 0.01f;
    Check c;
    Buf w, g, m, v, p16;
    int step;
    std::string name = pd ? std::string("adamw_mixed/p=") + dt_name(pd) + ",g=" + dt_name(gd) + "/"
                          : std::string("adamw/");
    name += k_off_name[cfg];
    check_begin(c, name, n);
    buf_create(w, DDP_K_F32, n, off_of(cfg, 0), FILL_SYM);
    buf_create(g, gd, n, off_of(cfg, 1), FILL_SYM);
    buf_create(m, DDP_K_F32, n, off_of(cfg, 2), FILL_SMALL);
    buf_create(v, DDP_K_F32, n, off_of(cfg, 3), FILL_POS);
    if (pd) buf_create(p16, pd, n, off_of(cfg, 4), FILL_NAN);
    std::vector<unsigned char> rw = region(w), rm = region(m), rv = region(v),
                               rp16(pd ? n * dt_size(pd) : 1);
    for (step = 1; step <= 3 && c.ok; step++) {
        int rc;
        if (step > 1) { buf_fill(g, FILL_SYM); buf_upload(g); }
        if (pd) { buf_fill(p16, FILL_NAN); buf_upload(p16); }
        if (pd) {
            rc = ddp_k_adamw_mixed(dptr(p16), pd, (float *)dptr(w), dptr(g), gd, (float *)dptr(m),
                                   (float *)dptr(v), n, lr, b1, b2, eps, wd, step, g_stream);
            if (ddp_ref_adamw_mixed(rp16.data(), pd, (float *)rw.data(), hptr(g), gd,
                                    (float *)rm.data(), (float *)rv.data(), n, lr, b1, b2, eps,
                                    wd, step) != 0)
                check_fail(c, "reference refused the arguments");
        } else {
            rc = ddp_k_adamw((float *)dptr(w), (const float *)dptr(g), (float *)dptr(m),
                             (float *)dptr(v), n, lr, b1, b2, eps, wd, step, g_stream);
            if (ddp_ref_adamw((float *)rw.data(), (const float *)hptr(g), (float *)rm.data(),
                              (float *)rv.data(), n, lr, b1, b2, eps, wd, step) != 0)
                check_fail(c, "reference refused the arguments");
        }
        if (!launched(rc, c)) break;
        compare(c, w, rw.data(), TOL32, "param");
        compare(c, m, rm.data(), TOL32, "m");
        compare(c, v, rv.data(), TOL32, "v");
        if (pd) compare(c, p16, rp16.data(), pd == DDP_K_F32 ? TOL32 : TOL16, "param16");
        compare_unchanged(c, g, "grad (an input)");
    }
    check_end(c);
    buf_free(w); buf_free(g); buf_free(m); buf_free(v);
    if (pd) buf_free(p16);
}

static void test_adamw(void)
{
    static const int p16s[2] = {DDP_K_F16, DDP_K_BF16};
    static const int gds[3] = {DDP_K_F32, DDP_K_F16, DDP_K_BF16};
    int s, cfg, pi, gi;
    for (s = 0; s < NSIZES; s++)
        for (cfg = 0; cfg < 3; cfg++) run_adamw(0, DDP_K_F32, k_sizes[s], cfg);
    for (pi = 0; pi < 2; pi++)
        for (gi = 0; gi < 3; gi++)
            for (s = 0; s < NSIZES; s++)
                for (cfg = 0; cfg < 3; cfg++) run_adamw(p16s[pi], gds[gi], k_sizes[s], cfg);
}

/* ---- ddp_k_optimizer_step: groups, double hyper-parameters, multiplier ---- */

static void run_optimizer_step(int type, int pd, int gd, size_t n, int cfg)
{
    ddp_k_optim o;
    ddp_k_groups gr;
    Check c;
    Buf w, g, m, v, p16;
    const size_t first = 3 + rnd_index(200), chunks = (first + n) / 64 + 2;
    std::vector<unsigned char> map(chunks);
    unsigned char *dmap = NULL;
    size_t i;
    int step, k;
    std::string name = std::string(type == DDP_K_SGD ? "optimizer_step/sgd/" : "optimizer_step/adamw/") +
                       (pd ? std::string("p=") + dt_name(pd) + ",g=" + dt_name(gd) + "/" : std::string()) + k_off_name[cfg];
    memset(&o, 0, sizeof o);
    memset(&gr, 0, sizeof gr);
    o.type = type;
    o.lr = 1e-2 * (0.5 + rnd_pos());
    o.momentum = 0.9; o.dampening = 0.1; o.weight_decay = 0.01;
    o.beta1 = 0.9; o.beta2 = 0.999; o.eps = 1e-8;
    o.grad_scale = 0.25;
    gr.count = 3;
    gr.chunk_log2 = 6;
    gr.first = first;
    for (k = 0; k < 3; k++) { gr.lr_scale[k] = 0.5 + k; gr.wd_scale[k] = k == 1 ? 0.0 : 1.0 + k; }
    for (i = 0; i < chunks; i++) map[i] = (unsigned char)(rnd_u64() % 3);
    CK(cudaMalloc((void **)&dmap, chunks));
    CK(cudaMemcpy(dmap, map.data(), chunks, cudaMemcpyHostToDevice));
    check_begin(c, name, n);
    buf_create(w, DDP_K_F32, n, off_of(cfg, 0), FILL_SYM);
    buf_create(g, gd, n, off_of(cfg, 1), FILL_SYM);
    buf_create(m, DDP_K_F32, n, off_of(cfg, 2), FILL_SMALL);
    buf_create(v, DDP_K_F32, n, off_of(cfg, 3), FILL_POS);
    if (pd) buf_create(p16, pd, n, off_of(cfg, 4), FILL_NAN);
    std::vector<unsigned char> rw = region(w), rm = region(m), rv = region(v), rp16(pd ? n * dt_size(pd) : 1);
    for (step = 1; step <= 3 && c.ok; step++) {
        ddp_k_groups hg = gr;
        int rc;
        o.step = step;
        if (step > 1) { buf_fill(g, FILL_SYM); buf_upload(g); }
        if (pd) { buf_fill(p16, FILL_NAN); buf_upload(p16); }
        gr.map = dmap;
        rc = ddp_k_optimizer_step(pd ? dptr(p16) : NULL, pd, (float *)dptr(w), dptr(g), gd, (float *)dptr(m),
                                  (float *)dptr(v), n, &o, &gr, g_stream);
        hg.map = map.data();
        if (ddp_ref_optimizer_step(pd ? rp16.data() : NULL, pd, (float *)rw.data(), hptr(g), gd, (float *)rm.data(),
                                   (float *)rv.data(), n, &o, &hg) != 0)
            check_fail(c, "reference refused the arguments");
        if (!launched(rc, c)) break;
        compare(c, w, rw.data(), TOL32, "param");
        compare(c, m, rm.data(), TOL32, "m");
        if (type == DDP_K_ADAMW) compare(c, v, rv.data(), TOL32, "v");
        else compare_unchanged(c, v, "v (SGD has none)");
        if (pd) compare(c, p16, rp16.data(), pd == DDP_K_F32 ? TOL32 : TOL16, "param16");
        compare_unchanged(c, g, "grad (an input)");
    }
    check_end(c);
    buf_free(w); buf_free(g); buf_free(m); buf_free(v);
    if (pd) buf_free(p16);
    CK(cudaFree(dmap));
}

static void test_optimizer_step(void)
{
    int s, cfg, type;
    for (type = DDP_K_SGD; type <= DDP_K_ADAMW; type++)
        for (s = 0; s < NSIZES; s++)
            for (cfg = 0; cfg < 3; cfg++) run_optimizer_step(type, 0, DDP_K_F32, k_sizes[s], cfg);
    for (type = DDP_K_SGD; type <= DDP_K_ADAMW; type++)
        for (s = 0; s < NSIZES; s++) {
            run_optimizer_step(type, DDP_K_F16, DDP_K_F16, k_sizes[s], 0);
            run_optimizer_step(type, DDP_K_BF16, DDP_K_BF16, k_sizes[s], 1);
        }
}

/* ---- add ----------------------------------------------------------------- */

static void test_add(void)
{
    static const int dts[3] = {DDP_K_F32, DDP_K_F16, DDP_K_BF16};
    int s, cfg, d;
    for (d = 0; d < 3; d++)
        for (s = 0; s < NSIZES; s++)
            for (cfg = 0; cfg < 3; cfg++) {
                const size_t n = k_sizes[s];
                Check c;
                Buf x, y;
                check_begin(c, std::string("add/") + dt_name(dts[d]) + "/" + k_off_name[cfg], n);
                buf_create(x, dts[d], n, off_of(cfg, 0), FILL_SYM);
                buf_create(y, dts[d], n, off_of(cfg, 1), FILL_SYM);
                std::vector<unsigned char> ref = region(x);
                ddp_ref_add(ref.data(), hptr(y), dts[d], n);
                if (launched(ddp_k_add(dptr(x), dptr(y), dts[d], n, g_stream), c)) {
                    compare(c, x, ref.data(), dts[d] == DDP_K_F32 ? TOL32 : TOL16, "dst");
                    compare_unchanged(c, y, "src (an input)");
                }
                check_end(c);
                buf_free(x);
                buf_free(y);
            }
}

/* ---- sum of squares ------------------------------------------------------ */

/* scratch_mode 0: full scratch, 1: NULL (one block), 2: 5 floats. */
static void run_sumsq(int dt, size_t n, int off, int scratch_mode)
{
    static const char *sname[3] = {"scratch", "noscratch", "scratch5"};
    const size_t se = ddp_k_sumsq_scratch_elems();
    const float fnan = NAN;
    Check c;
    Buf x;
    float *out = NULL, *scratch = NULL, got = 0.0f;
    std::vector<float> poison(se, fnan);
    double ref, err;
    int rc;
    std::string name = std::string(dt == DDP_K_F32 ? "sumsq/" : "sumsq_typed/") + dt_name(dt) +
                       "/" + (off ? "off1/" : "aligned/") + sname[scratch_mode];
    check_begin(c, name, n);
    buf_create(x, dt, n, (size_t)off, FILL_SYM);
    CK(cudaMalloc((void **)&out, sizeof(float)));
    CK(cudaMalloc((void **)&scratch, se * sizeof(float)));
    CK(cudaMemcpy(out, &fnan, sizeof(float), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(scratch, poison.data(), se * sizeof(float), cudaMemcpyHostToDevice));
    ref = ddp_ref_sumsq_typed(hptr(x), dt, n);
    {
        float *sp = scratch_mode == 1 ? NULL : scratch;
        const size_t sn = scratch_mode == 0 ? se : scratch_mode == 2 ? 5 : 0;
        rc = dt == DDP_K_F32 ? ddp_k_sumsq((const float *)dptr(x), n, out, sp, sn, g_stream)
                             : ddp_k_sumsq_typed(dptr(x), dt, n, out, sp, sn, g_stream);
    }
    if (launched(rc, c)) {
        CK(cudaMemcpy(&got, out, sizeof(float), cudaMemcpyDeviceToHost));
        err = fabs((double)got - ref) / ref;
        c.err = err;
        if (!(err <= TOL32)) {
            char msg[128];
            snprintf(msg, sizeof msg, "got %.9g want %.9g", (double)got, ref);
            check_fail(c, msg);
        }
        compare_unchanged(c, x, "x (an input)");
    }
    check_end(c);
    buf_free(x);
    CK(cudaFree(out));
    CK(cudaFree(scratch));
}

static void test_sumsq(void)
{
    int s, off, mode;
    for (s = 0; s < NSIZES; s++)
        for (off = 0; off < 2; off++)
            for (mode = 0; mode < 3; mode++) run_sumsq(DDP_K_F32, k_sizes[s], off, mode);
    for (mode = 0; mode < 2; mode++) run_sumsq(DDP_K_F32, (1u << 24) + 3, 1, mode);
    for (s = 0; s < NSIZES; s++)
        for (off = 0; off < 2; off++) {
            run_sumsq(DDP_K_F16, k_sizes[s], off, off ? 1 : 0);
            run_sumsq(DDP_K_BF16, k_sizes[s], off, off ? 0 : 2);
        }
}

/* ---- non-finite ---------------------------------------------------------- */

/* plant: 0 none, 1 NaN at a random index, 2 +Inf at a random index, 3 -Inf
   at the last index, 4 NaN at index 0, 5 none with the flag already 1. */
static void run_nonfinite(int dt, size_t n, int off, int plant)
{
    static const char *pname[6] = {"clean", "nan", "inf", "neginf_last", "nan_first", "keeps_flag"};
    Check c;
    Buf x;
    int *flag = NULL, got = -1, want, ref_flag;
    const int start = plant == 5 ? 1 : 0;
    size_t at = 0;
    std::string name = std::string("nonfinite/") + dt_name(dt) + "/" + (off ? "off1/" : "aligned/") +
                       pname[plant];
    check_begin(c, name, n);
    buf_create(x, dt, n, (size_t)off, FILL_SYM);
    if (plant >= 1 && plant <= 4) {
        at = plant == 3 ? n - 1 : plant == 4 ? 0 : rnd_index(n);
        put_el(x.img.data(), dt, x.off + at, plant == 1 || plant == 4 ? NAN : plant == 2 ? INFINITY : -INFINITY);
        buf_upload(x);
    }
    ref_flag = start;
    if (ddp_ref_nonfinite(hptr(x), dt, n, &ref_flag) != 0) check_fail(c, "reference refused the dtype");
    want = (plant >= 1) ? 1 : 0;
    if (ref_flag != want) check_fail(c, "reference disagrees with the planted value");
    CK(cudaMalloc((void **)&flag, sizeof(int)));
    CK(cudaMemcpy(flag, &start, sizeof(int), cudaMemcpyHostToDevice));
    if (launched(ddp_k_nonfinite(dptr(x), dt, n, flag, g_stream), c)) {
        CK(cudaMemcpy(&got, flag, sizeof(int), cudaMemcpyDeviceToHost));
        if (got != want) {
            char msg[96];
            snprintf(msg, sizeof msg, "flag %d, want %d (planted at %zu)", got, want, at);
            check_fail(c, msg);
            c.err = 1.0;
        }
    }
    check_end(c);
    buf_free(x);
    CK(cudaFree(flag));
}

static void test_nonfinite(void)
{
    static const int dts[4] = {DDP_K_F32, DDP_K_F64, DDP_K_F16, DDP_K_BF16};
    int d, s, off, p;
    for (d = 0; d < 4; d++)
        for (s = 0; s < NSIZES; s++)
            for (off = 0; off < 2; off++)
                for (p = 0; p < 6; p++) run_nonfinite(dts[d], k_sizes[s], off, p);
}

/* ---- argument checks ----------------------------------------------------- */

static void api_check(int ok, const char *name)
{
    Check c;
    check_begin(c, name, 0);
    if (!ok) { check_fail(c, "unexpected return code"); c.err = 1.0; }
    check_end(c);
    CK(cudaGetLastError());
}

static void test_api(void)
{
    const int bad = (int)cudaErrorInvalidValue;
    const float fnan = NAN;
    float *d = NULL, got = -1.0f;
    int *flag = NULL;
    CK(cudaMalloc((void **)&d, 64 * sizeof(float)));
    CK(cudaMalloc((void **)&flag, sizeof(int)));
    api_check(ddp_k_cast(d, DDP_K_F64, d + 16, DDP_K_F32, 4, 1.0f, g_stream) == bad, "api/cast_bad_dtype");
    api_check(ddp_k_nonfinite(d, 7, 4, flag, g_stream) == bad, "api/nonfinite_bad_dtype");
    api_check(ddp_k_adamw(d, d + 8, d + 16, d + 24, 4, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.0f, 0,
                          g_stream) == bad, "api/adamw_step0");
    api_check(ddp_k_adamw(d, d + 8, d + 16, d + 24, 4, 1e-3f, 1.0f, 0.999f, 1e-8f, 0.0f, 1,
                          g_stream) == bad, "api/adamw_beta1_is_1");
    api_check(ddp_k_sgd(d, d + 8, NULL, 4, 0.1f, 0.9f, 0.0f, 0, 0, g_stream) == bad,
              "api/sgd_momentum_without_buffer");
    api_check(ddp_k_sgd_mixed(d, DDP_K_F64, d + 8, d + 16, DDP_K_F32, NULL, 4, 0.1f, 0.0f, 0.0f,
                              0, 1, g_stream) == bad, "api/sgd_mixed_bad_dtype");
    api_check(ddp_k_scale((float *)((char *)d + 2), 4, 2.0f, g_stream) == bad,
              "api/scale_misaligned_element");
    api_check(ddp_k_scale(NULL, 0, 2.0f, g_stream) == 0 &&
              ddp_k_sgd(NULL, NULL, NULL, 0, 0.1f, 0.9f, 0.0f, 0, 1, g_stream) == 0 &&
              ddp_k_adamw(NULL, NULL, NULL, NULL, 0, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.0f, 1, g_stream) == 0 &&
              ddp_k_cast(NULL, DDP_K_F16, NULL, DDP_K_F32, 0, 1.0f, g_stream) == 0 &&
              ddp_k_nonfinite(NULL, DDP_K_F32, 0, NULL, g_stream) == 0,
              "api/n0_is_a_no_op");
    CK(cudaMemcpy(d, &fnan, sizeof(float), cudaMemcpyHostToDevice));
    {
        const int rc = ddp_k_sumsq(d + 8, 0, d, NULL, 0, g_stream);
        CK(cudaStreamSynchronize(g_stream));
        CK(cudaMemcpy(&got, d, sizeof(float), cudaMemcpyDeviceToHost));
        api_check(rc == 0 && got == 0.0f, "api/sumsq_n0_writes_zero");
    }
    CK(cudaFree(d));
    CK(cudaFree(flag));
}

int main(int argc, char **argv)
{
    uint64_t seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    int i, ndev = 0;
    cudaDeviceProp prop;
    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--seed") && i + 1 < argc) seed = strtoull(argv[++i], NULL, 0);
        else { fprintf(stderr, "usage: %s [--seed S]\n", argv[0]); return 2; }
    }
    g_rng = seed;
    CK(cudaGetDeviceCount(&ndev));
    CK(cudaSetDevice(0));
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("device %s sm_%d%d sms=%d\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount);
    printf("seed %llu\n", (unsigned long long)seed);
    fflush(stdout);
    CK(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking));

    test_api();
    test_scale();
    test_cast();
    test_sgd();
    test_adamw();
    test_optimizer_step();
    test_add();
    test_sumsq();
    test_nonfinite();

    CK(cudaStreamDestroy(g_stream));
    CK(cudaDeviceSynchronize());
    summary_and_exit(g_fail ? 1 : 0);
    return 0;
}
