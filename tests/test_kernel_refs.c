/* test_kernel_refs.c - CPU-only checks of the references in ddp_kernels.cuh
   (the GPU tests compare the kernels against these, so they must be right):
   AdamW and SGD against hand-written double-precision steps, bf16/f16
   conversions on known bit patterns, at every rounding midpoint and over
   every 16-bit pattern, sums of squares, non-finite checks, casts.

   Build: cc -std=c99 -I. tests/test_kernel_refs.c -lm */
#define DDP_KERNELS_IMPLEMENTATION
#include "ddp_kernels.cuh"

#include <math.h>
#include <stdio.h>
#include <string.h>

static int g_pass, g_fail;

static void check(int ok, const char *name, const char *detail)
{
    if (ok) g_pass++;
    else g_fail++;
    printf("%s %s%s%s\n", ok ? "PASS" : "FAIL", name, detail[0] ? " " : "", detail);
}

static uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static int rel_close(double got, double want, double tol)
{
    const double d = fabs(got - want), s = fabs(want);
    return got == got && d <= tol * (s > 1e-30 ? s : 1.0);
}

/* ---- conversions --------------------------------------------------------- */

static void test_bf16_patterns(void)
{
    static const struct { uint32_t in; uint16_t out; } t[] = {
        {0x3f800000u, 0x3f80u}, /* 1 */
        {0x80000000u, 0x8000u}, /* -0 */
        {0x3f808000u, 0x3f80u}, /* tie, even below */
        {0x3f818000u, 0x3f82u}, /* tie, even above */
        {0x3f808001u, 0x3f81u}, /* just above a tie */
        {0x3f807fffu, 0x3f80u}, /* just below a tie */
        {0xbf818000u, 0xbf82u}, /* negative tie */
        {0x7f7f7fffu, 0x7f7fu}, /* largest that stays finite */
        {0x7f7fffffu, 0x7f80u}, /* FLT_MAX rounds to Inf */
        {0x7f800000u, 0x7f80u}, /* Inf */
        {0xff800000u, 0xff80u}, /* -Inf */
        {0x00000001u, 0x0000u}, /* tiny subnormal */
        {0x00008000u, 0x0000u}, /* subnormal tie to even (0) */
        {0x00018000u, 0x0002u}, /* subnormal tie to even (2) */
    };
    char buf[96];
    int i, bad = 0;
    for (i = 0; i < (int)(sizeof t / sizeof t[0]); i++) {
        const uint16_t got = ddp_f32_to_bf16_bits(u2f(t[i].in));
        if (got != t[i].out) {
            bad++;
            sprintf(buf, "0x%08x -> 0x%04x, want 0x%04x", (unsigned)t[i].in, got, t[i].out);
            check(0, "bf16_pattern", buf);
        }
    }
    /* NaN stays NaN, quiet, sign kept. */
    {
        const uint16_t a = ddp_f32_to_bf16_bits(u2f(0x7f800001u));
        const uint16_t b = ddp_f32_to_bf16_bits(u2f(0xffc00000u));
        if ((a & 0x7fffu) <= 0x7f80u || (b & 0x7fffu) <= 0x7f80u || !(b & 0x8000u)) bad++;
    }
    sprintf(buf, "%d cases, %d wrong", (int)(sizeof t / sizeof t[0]) + 2, bad);
    check(bad == 0, "bf16_known_patterns", buf);
}

static void test_f16_patterns(void)
{
    static const struct { uint32_t in; uint16_t out; } t[] = {
        {0x3f800000u, 0x3c00u}, /* 1 */
        {0xbf800000u, 0xbc00u}, /* -1 */
        {0x80000000u, 0x8000u}, /* -0 */
        {0x3f801000u, 0x3c00u}, /* 1 + 2^-11: tie, even below */
        {0x3f803000u, 0x3c02u}, /* 1 + 3*2^-11: tie, even above */
        {0x3f801001u, 0x3c01u}, /* just above a tie */
        {0x477fe000u, 0x7bffu}, /* 65504 = max half */
        {0x477fefffu, 0x7bffu}, /* just below 65520 */
        {0x477ff000u, 0x7c00u}, /* 65520 rounds to Inf */
        {0x7f800000u, 0x7c00u}, /* Inf */
        {0xff800000u, 0xfc00u}, /* -Inf */
        {0x38800000u, 0x0400u}, /* 2^-14, smallest normal */
        {0x387fc000u, 0x03ffu}, /* 1023 * 2^-24, largest subnormal */
        {0x387fe000u, 0x0400u}, /* 1023.5 * 2^-24: tie, even above */
        {0x33800000u, 0x0001u}, /* 2^-24, smallest subnormal */
        {0x33000000u, 0x0000u}, /* 2^-25: tie, even (0) */
        {0x33000001u, 0x0001u}, /* just above 2^-25 */
        {0x33c00000u, 0x0002u}, /* 1.5 * 2^-24: tie, even (2) */
        {0x34200000u, 0x0002u}, /* 2.5 * 2^-24: tie, even (2) */
        {0x00000001u, 0x0000u}, /* f32 subnormal */
        {0x3eaaaaabu, 0x3555u}, /* 1/3 */
    };
    char buf[96];
    int i, bad = 0;
    for (i = 0; i < (int)(sizeof t / sizeof t[0]); i++) {
        const uint16_t got = ddp_f32_to_f16_bits(u2f(t[i].in));
        if (got != t[i].out) {
            bad++;
            sprintf(buf, "0x%08x -> 0x%04x, want 0x%04x", (unsigned)t[i].in, got, t[i].out);
            check(0, "f16_pattern", buf);
        }
    }
    {
        const uint16_t a = ddp_f32_to_f16_bits(u2f(0x7f800001u));
        const uint16_t b = ddp_f32_to_f16_bits(u2f(0xffc00000u));
        if ((a & 0x7fffu) <= 0x7c00u || (b & 0x7fffu) <= 0x7c00u || !(b & 0x8000u)) bad++;
    }
    if (ddp_f16_bits_to_f32(0x0001u) != u2f(0x33800000u)) bad++;
    if (ddp_f16_bits_to_f32(0x3555u) != u2f(0x3eaaa000u)) bad++;
    if (f2u(ddp_f16_bits_to_f32(0x8000u)) != 0x80000000u) bad++;
    if (ddp_f16_bits_to_f32(0xfc00u) != -INFINITY) bad++;
    sprintf(buf, "%d cases, %d wrong", (int)(sizeof t / sizeof t[0]) + 6, bad);
    check(bad == 0, "f16_known_patterns", buf);
}

/* Every 16-bit pattern survives 16 -> 32 -> 16 (NaN stays NaN), and every
   finite value of f32 at, just below and just above each midpoint between
   neighbours rounds to the right one (nearest, ties to even), both signs. */
static void test_exhaustive(int is_bf16)
{
    const char *name = is_bf16 ? "bf16" : "f16";
    const uint16_t exp_mask = is_bf16 ? 0x7f80u : 0x7c00u;
    const uint16_t max_finite = is_bf16 ? 0x7f7fu : 0x7bffu;
    char buf[128];
    unsigned h;
    int bad_rt = 0, bad_mid = 0;
    for (h = 0; h < 65536u; h++) {
        const uint16_t x = (uint16_t)h;
        const float f = is_bf16 ? ddp_bf16_bits_to_f32(x) : ddp_f16_bits_to_f32(x);
        const uint16_t back = is_bf16 ? ddp_f32_to_bf16_bits(f) : ddp_f32_to_f16_bits(f);
        const int is_nan = (x & exp_mask) == exp_mask && (x & (uint16_t)~(exp_mask | 0x8000u));
        if (is_nan ? !((back & exp_mask) == exp_mask && (back & (uint16_t)~(exp_mask | 0x8000u)))
                   : back != x)
            bad_rt++;
    }
    sprintf(buf, "65536 patterns, %d wrong", bad_rt);
    check(bad_rt == 0, is_bf16 ? "bf16_roundtrip_all" : "f16_roundtrip_all", buf);

    for (h = 0; h < max_finite; h++) {
        int s;
        for (s = 0; s < 2; s++) {
            const uint16_t sign = s ? 0x8000u : 0;
            const uint16_t a = (uint16_t)(h | sign), b = (uint16_t)((h + 1) | sign);
            const float fa = is_bf16 ? ddp_bf16_bits_to_f32(a) : ddp_f16_bits_to_f32(a);
            const float fb = is_bf16 ? ddp_bf16_bits_to_f32(b) : ddp_f16_bits_to_f32(b);
            const float mid = (float)(((double)fa + (double)fb) / 2.0); /* exact in f32 */
            const float below = nextafterf(mid, fa), above = nextafterf(mid, fb);
            const uint16_t even = (h & 1u) ? b : a;
#define DDP_T_CV(v) (is_bf16 ? ddp_f32_to_bf16_bits(v) : ddp_f32_to_f16_bits(v))
            if ((double)mid * 2.0 != (double)fa + (double)fb) bad_mid++;
            if (DDP_T_CV(fa) != a || DDP_T_CV(below) != a || DDP_T_CV(above) != b ||
                DDP_T_CV(mid) != even)
                bad_mid++;
#undef DDP_T_CV
        }
    }
    sprintf(buf, "%u midpoints x 2 signs, %d wrong", (unsigned)max_finite, bad_mid);
    check(bad_mid == 0, is_bf16 ? "bf16_round_nearest_even" : "f16_round_nearest_even", buf);
    (void)name;
}

/* ---- optimizers ---------------------------------------------------------- */

static void test_adamw(void)
{
    /* Two steps written out in double from PyTorch's formula, with the
       hyper-parameters as the f32 values the API receives (0.999f is not
       0.999); the final params were also computed independently (Python,
       double, same f32-rounded hyper-parameters). */
    const double want_py[3] = {0.8714672981392735, -0.6906786043146089, 2.189119964013022};
    const double lr = 0.1f, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f, wd = 0.01f;
    const float g1[3] = {0.5f, 0.125f, -1.0f}, g2[3] = {-0.25f, 0.375f, -0.5f};
    float p[3] = {1.0f, -0.5f, 2.0f}, m[3] = {0, 0, 0}, v[3] = {0, 0, 0};
    double dp[3] = {1.0, -0.5, 2.0}, dm[3] = {0, 0, 0}, dv[3] = {0, 0, 0};
    char buf[160];
    int t, i, ok = 1, rc = 0;
    double worst = 0;
    for (t = 1; t <= 2; t++) {
        const float *g = t == 1 ? g1 : g2;
        rc |= ddp_ref_adamw(p, g, m, v, 3, (float)lr, (float)b1, (float)b2, (float)eps,
                            (float)wd, t);
        for (i = 0; i < 3; i++) {
            const double bc1 = 1.0 - pow(b1, t), bc2 = 1.0 - pow(b2, t);
            dp[i] *= 1.0 - lr * wd;
            dm[i] = b1 * dm[i] + (1.0 - b1) * g[i];
            dv[i] = b2 * dv[i] + (1.0 - b2) * (double)g[i] * g[i];
            dp[i] -= (lr / bc1) * dm[i] / (sqrt(dv[i]) / sqrt(bc2) + eps);
        }
    }
    for (i = 0; i < 3; i++) {
        const double e = fabs(p[i] - dp[i]) / fabs(dp[i]);
        if (e > worst) worst = e;
        ok &= rel_close(p[i], dp[i], 1e-6) && rel_close(dp[i], want_py[i], 1e-12) &&
              rel_close(m[i], dm[i], 1e-6) && rel_close(v[i], dv[i], 1e-6);
    }
    sprintf(buf, "3 err=%.2e p=[%.9f %.9f %.9f]", worst, p[0], p[1], p[2]);
    check(ok && rc == 0, "ref_adamw_2_steps", buf);

    /* Bad arguments are refused. */
    check(ddp_ref_adamw(p, g1, m, v, 3, 0.1f, 0.9f, 0.999f, 1e-8f, 0.0f, 0) == 1 &&
          ddp_ref_adamw(p, g1, m, v, 3, 0.1f, 1.0f, 0.999f, 1e-8f, 0.0f, 1) == 1,
          "ref_adamw_bad_args", "");
}

static void test_adamw_mixed(void)
{
    /* The mixed step equals the f32 step on the master weights, with the
       gradient read through the 16-bit type and the result rounded. */
    enum { N = 64 };
    float mw[N], m1[N], v1[N], p[N], m2[N], v2[N], g32[N];
    uint16_t g16[N], p16[N];
    int i, t, ok = 1, gd;
    for (gd = 0; gd < 2; gd++) {
        const int gdt = gd ? DDP_K_BF16 : DDP_K_F16, pdt = gd ? DDP_K_F16 : DDP_K_BF16;
        for (i = 0; i < N; i++) {
            mw[i] = p[i] = (float)sin(i + 1.0);
            m1[i] = m2[i] = 0.01f * (float)cos(i * 3.0);
            v1[i] = v2[i] = 0.001f * (float)(1.0 + sin(i * 0.7));
        }
        for (t = 1; t <= 3; t++) {
            for (i = 0; i < N; i++) {
                const float g = (float)cos(i * 1.3 + t);
                g16[i] = gd ? ddp_f32_to_bf16_bits(g) : ddp_f32_to_f16_bits(g);
                g32[i] = gd ? ddp_bf16_bits_to_f32(g16[i]) : ddp_f16_bits_to_f32(g16[i]);
            }
            ok &= ddp_ref_adamw_mixed(p16, pdt, mw, g16, gdt, m1, v1, N, 1e-2f, 0.9f, 0.95f,
                                      1e-8f, 0.1f, t) == 0;
            ok &= ddp_ref_adamw(p, g32, m2, v2, N, 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, t) == 0;
            for (i = 0; i < N; i++) {
                const uint16_t want = gd ? ddp_f32_to_f16_bits(p[i]) : ddp_f32_to_bf16_bits(p[i]);
                ok &= mw[i] == p[i] && m1[i] == m2[i] && v1[i] == v2[i] && p16[i] == want;
            }
        }
    }
    check(ok, "ref_adamw_mixed_matches_f32", "");
    check(ddp_ref_adamw_mixed(p16, DDP_K_F64, mw, g16, DDP_K_F16, m1, v1, N, 1e-2f, 0.9f,
                              0.95f, 1e-8f, 0.1f, 1) == 1,
          "ref_adamw_mixed_bad_dtype", "");
}

static void test_sgd(void)
{
    const float g[3][3] = {{0.5f, 0.125f, -1.0f}, {-0.25f, 0.375f, -0.5f}, {1.0f, -2.0f, 0.75f}};
    const double lr = 0.1, mom = 0.9, wd = 0.01;
    char name[64], buf[96];
    int nest, usemom;
    for (usemom = 0; usemom < 2; usemom++)
        for (nest = 0; nest < 2; nest++) {
            float p[3] = {1.0f, -0.5f, 2.0f}, b[3];
            float *bp = usemom ? b : NULL; /* NULL buffer allowed without momentum */
            double dp[3] = {1.0, -0.5, 2.0}, db[3] = {0, 0, 0}, worst = 0;
            int t, i, ok = 1;
            const float mm = usemom ? (float)mom : 0.0f;
            if (!usemom && nest) continue;
            for (i = 0; i < 3; i++) b[i] = NAN; /* first step must only write it */
            for (t = 0; t < 3; t++) {
                ddp_ref_sgd(p, g[t], bp, 3, (float)lr, mm, (float)wd, nest, t == 0);
                for (i = 0; i < 3; i++) {
                    double d = g[t][i] + wd * dp[i];
                    if (usemom) {
                        db[i] = t == 0 ? d : mom * db[i] + d;
                        d = nest ? d + mom * db[i] : db[i];
                    }
                    dp[i] -= lr * d;
                }
            }
            for (i = 0; i < 3; i++) {
                const double e = fabs(p[i] - dp[i]) / fabs(dp[i]);
                if (e > worst) worst = e;
                ok &= rel_close(p[i], dp[i], 1e-6);
                if (usemom) ok &= rel_close(b[i], db[i], 1e-6);
            }
            sprintf(name, "ref_sgd_3_steps%s%s", usemom ? "_momentum" : "", nest ? "_nesterov" : "");
            sprintf(buf, "3 err=%.2e", worst);
            check(ok, name, buf);
        }
}

/* ddp_ref_optimizer_step: groups by chunk map (with an offset into the
   map), double hyper-parameters, dampening, the gradient multiplier */
static void test_optimizer_step(void)
{
    enum { N = 40 };
    static const unsigned char map[] = {1, 0, 2, 2, 1, 0, 1, 2, 0, 1, 0, 2};
    ddp_k_optim o;
    ddp_k_groups gr;
    float p[N], m[N], v[N], g[N], q[N], qm[N], qv[N], qg[N];
    double dp[N], dm[N], dv[N];
    int i, t, type, ok = 1;
    char buf[96];
    double worst = 0;
    memset(&gr, 0, sizeof gr);
    gr.map = map;
    gr.first = 3;         /* element 0 is element 3 of the map's numbering */
    gr.chunk_log2 = 2;    /* chunks of 4 elements */
    gr.count = 3;
    gr.lr_scale[0] = 1.0; gr.lr_scale[1] = 0.5; gr.lr_scale[2] = 2.0;
    gr.wd_scale[0] = 1.0; gr.wd_scale[1] = 0.0; gr.wd_scale[2] = 3.0;
    for (type = DDP_K_SGD; type <= DDP_K_ADAMW; type++) {
        memset(&o, 0, sizeof o);
        o.type = type;
        o.lr = 0.05; o.momentum = 0.9; o.dampening = 0.25; o.weight_decay = 0.1;
        o.beta1 = 0.9; o.beta2 = 0.999; o.eps = 1e-8;
        o.grad_scale = 0.5;
        for (i = 0; i < N; i++) {
            p[i] = (float)sin(i + 0.5); dp[i] = p[i];
            m[i] = v[i] = 0; dm[i] = dv[i] = 0;
        }
        for (t = 1; t <= 3; t++) {
            o.step = t;
            for (i = 0; i < N; i++) g[i] = (float)cos(1.3 * i + t);
            ok &= ddp_ref_optimizer_step(NULL, 0, p, g, DDP_K_F32, m, v, N, &o, &gr) == 0;
            for (i = 0; i < N; i++) {
                const int k = map[(3 + i) >> 2];
                const double lr = 0.05 * gr.lr_scale[k], wd = 0.1 * gr.wd_scale[k], gi = 0.5 * g[i];
                if (type == DDP_K_SGD) {
                    double d = gi + wd * dp[i];
                    dm[i] = t == 1 ? d : 0.9 * dm[i] + 0.75 * d;
                    dp[i] -= lr * dm[i];
                } else {
                    dp[i] *= 1 - lr * wd;
                    dm[i] = 0.9 * dm[i] + 0.1 * gi;
                    dv[i] = 0.999 * dv[i] + 0.001 * gi * gi;
                    dp[i] -= lr / (1 - pow(0.9, t)) * dm[i] / (sqrt(dv[i]) / sqrt(1 - pow(0.999, t)) + 1e-8);
                }
            }
        }
        for (i = 0; i < N; i++) {
            const double e = fabs(p[i] - dp[i]) / (fabs(dp[i]) + 1e-3);
            if (e > worst) worst = e;
        }
    }
    sprintf(buf, "err=%.2e", worst);
    check(ok && worst < 1e-5, "ref_optimizer_step_groups", buf);

    /* with double betas, 1 - beta2 is PyTorch's (float)(1 - 0.999), not
       1 - 0.999f: one step from v = 0 gives v = (float)0.001 * g * g */
    memset(&o, 0, sizeof o);
    o.type = DDP_K_ADAMW; o.lr = 0.01; o.beta1 = 0.9; o.beta2 = 0.999; o.eps = 1e-8; o.step = 1;
    p[0] = 1; m[0] = v[0] = 0; g[0] = 3;
    ok = ddp_ref_optimizer_step(NULL, 0, p, g, DDP_K_F32, m, v, 1, &o, NULL) == 0;
    check(ok && v[0] == (float)(1.0 - 0.999) * 3.0f * 3.0f && v[0] != (1.0f - 0.999f) * 3.0f * 3.0f,
          "ref_optimizer_step_double_beta2", "");

    /* grad_scale s on g is the step on s * g (power of two: the same bits) */
    for (type = DDP_K_SGD; type <= DDP_K_ADAMW; type++) {
        memset(&o, 0, sizeof o);
        o.type = type; o.lr = 0.1; o.momentum = 0.9; o.beta1 = 0.9; o.beta2 = 0.99; o.eps = 1e-8; o.weight_decay = 0.01;
        for (i = 0; i < N; i++) { p[i] = q[i] = (float)sin(i); m[i] = v[i] = qm[i] = qv[i] = 0; }
        ok = 1;
        for (t = 1; t <= 2; t++) {
            o.step = t;
            for (i = 0; i < N; i++) { g[i] = 4096.0f * (float)cos(i + t); qg[i] = g[i] / 4096.0f; }
            o.grad_scale = 1.0 / 4096.0;
            ok &= ddp_ref_optimizer_step(NULL, 0, p, g, DDP_K_F32, m, v, N, &o, NULL) == 0;
            o.grad_scale = 1.0;
            ok &= ddp_ref_optimizer_step(NULL, 0, q, qg, DDP_K_F32, qm, qv, N, &o, NULL) == 0;
        }
        for (i = 0; i < N; i++) ok &= p[i] == q[i];
        check(ok, type == DDP_K_SGD ? "ref_optimizer_step_grad_scale_sgd" : "ref_optimizer_step_grad_scale_adamw", "");
    }

    /* bad arguments: a group index past count, a bad type, param16 without a dtype */
    memset(&o, 0, sizeof o);
    o.type = DDP_K_SGD; o.lr = 0.1; o.step = 1;
    gr.count = 2; /* map holds 2s */
    check(ddp_ref_optimizer_step(NULL, 0, p, g, DDP_K_F32, m, v, N, &o, &gr) == 1, "ref_optimizer_step_bad_group", "");
    o.type = 7;
    check(ddp_ref_optimizer_step(NULL, 0, p, g, DDP_K_F32, m, v, N, &o, NULL) == 1, "ref_optimizer_step_bad_type", "");
    o.type = DDP_K_SGD;
    check(ddp_ref_optimizer_step(p, 0, p, g, DDP_K_F32, m, v, N, &o, NULL) == 1, "ref_optimizer_step_param16_without_dtype", "");
}

static void test_add(void)
{
    float a[5] = {1, 2, 3, 4, 5}, b[5] = {0.5f, -2, 1e-8f, 4, 0};
    uint16_t h[2], hb[2];
    int ok;
    ok = ddp_ref_add(a, b, DDP_K_F32, 5) == 0 && a[0] == 1.5f && a[1] == 0 && a[2] == 3.0f && a[3] == 8;
    h[0] = ddp_f32_to_bf16_bits(1.0f); h[1] = ddp_f32_to_bf16_bits(256.0f);
    hb[0] = ddp_f32_to_bf16_bits(0.5f); hb[1] = ddp_f32_to_bf16_bits(1.0f);
    ok &= ddp_ref_add(h, hb, DDP_K_BF16, 2) == 0 && ddp_bf16_bits_to_f32(h[0]) == 1.5f &&
          ddp_bf16_bits_to_f32(h[1]) == 256.0f; /* 257 rounds to even in bf16 */
    ok &= ddp_ref_add(a, b, DDP_K_F64, 5) == 1;
    check(ok, "ref_add", "");
}

/* ---- reductions, checks, casts ------------------------------------------- */

static void test_sumsq(void)
{
    static float big[1000003];
    const float x[3] = {1.0f, 2.0f, 3.0f};
    uint16_t h[3], bh[3];
    double want = 0, got;
    char buf[96];
    size_t i;
    check(ddp_ref_sumsq(x, 3) == 14.0 && ddp_ref_sumsq(x, 0) == 0.0, "ref_sumsq_small", "");
    h[0] = ddp_f32_to_f16_bits(1.0f); h[1] = ddp_f32_to_f16_bits(-2.0f); h[2] = ddp_f32_to_f16_bits(0.5f);
    bh[0] = ddp_f32_to_bf16_bits(1.0f); bh[1] = ddp_f32_to_bf16_bits(-2.0f); bh[2] = ddp_f32_to_bf16_bits(0.5f);
    check(ddp_ref_sumsq_typed(h, DDP_K_F16, 3) == 5.25 &&
          ddp_ref_sumsq_typed(bh, DDP_K_BF16, 3) == 5.25 &&
          ddp_ref_sumsq_typed(x, DDP_K_F32, 3) == 14.0 &&
          ddp_ref_sumsq_typed(x, DDP_K_F64, 3) == -1.0,
          "ref_sumsq_typed", "");
    for (i = 0; i < 1000003; i++) {
        big[i] = (float)sin((double)i * 0.001);
        want += (double)big[i] * big[i];
    }
    got = ddp_ref_sumsq(big, 1000003);
    sprintf(buf, "1000003 err=%.2e", fabs(got - want) / want);
    check(rel_close(got, want, 1e-12), "ref_sumsq_large", buf);
}

static void test_nonfinite(void)
{
    float f[5] = {1, 2, 3, 4, 5};
    double d[3] = {1, 2, 3};
    uint16_t h[4], b[4];
    int flag, ok = 1, i;
    for (i = 0; i < 4; i++) {
        h[i] = ddp_f32_to_f16_bits((float)i);
        b[i] = ddp_f32_to_bf16_bits((float)i);
    }
    flag = 0; ok &= ddp_ref_nonfinite(f, DDP_K_F32, 5, &flag) == 0 && flag == 0;
    f[4] = NAN; flag = 0; ok &= ddp_ref_nonfinite(f, DDP_K_F32, 5, &flag) == 0 && flag == 1;
    f[4] = -INFINITY; flag = 0; ok &= ddp_ref_nonfinite(f, DDP_K_F32, 5, &flag) == 0 && flag == 1;
    f[4] = 5; flag = 1; ok &= ddp_ref_nonfinite(f, DDP_K_F32, 5, &flag) == 0 && flag == 1; /* not cleared */
    flag = 0; ok &= ddp_ref_nonfinite(d, DDP_K_F64, 3, &flag) == 0 && flag == 0;
    d[1] = INFINITY; flag = 0; ok &= ddp_ref_nonfinite(d, DDP_K_F64, 3, &flag) == 0 && flag == 1;
    flag = 0; ok &= ddp_ref_nonfinite(h, DDP_K_F16, 4, &flag) == 0 && flag == 0;
    h[2] = 0x7c00u; flag = 0; ok &= ddp_ref_nonfinite(h, DDP_K_F16, 4, &flag) == 0 && flag == 1;
    h[2] = 0x7bffu; flag = 0; ok &= ddp_ref_nonfinite(h, DDP_K_F16, 4, &flag) == 0 && flag == 0;
    flag = 0; ok &= ddp_ref_nonfinite(b, DDP_K_BF16, 4, &flag) == 0 && flag == 0;
    b[3] = 0xffc1u; flag = 0; ok &= ddp_ref_nonfinite(b, DDP_K_BF16, 4, &flag) == 0 && flag == 1;
    ok &= ddp_ref_nonfinite(b, 99, 4, &flag) == 1;
    check(ok, "ref_nonfinite", "");
}

static void test_cast(void)
{
    const float src[4] = {1.0f, -0.5f, 3.0f, 65504.0f};
    uint16_t h[4], bf[4];
    float back[4], s[4];
    int ok = 1, i;
    ok &= ddp_ref_cast(h, DDP_K_F16, src, DDP_K_F32, 4, 2.0f) == 0;
    ok &= h[0] == 0x4000u && h[1] == 0xbc00u && h[2] == 0x4600u && h[3] == 0x7c00u; /* overflow */
    ok &= ddp_ref_cast(bf, DDP_K_BF16, h, DDP_K_F16, 3, 0.5f) == 0;
    ok &= bf[0] == 0x3f80u && bf[1] == 0xbf00u && bf[2] == 0x4040u;
    ok &= ddp_ref_cast(back, DDP_K_F32, bf, DDP_K_BF16, 3, 1.0f) == 0;
    ok &= back[0] == 1.0f && back[1] == -0.5f && back[2] == 3.0f;
    for (i = 0; i < 4; i++) s[i] = src[i];
    ddp_ref_scale(s, 4, 0.25f);
    ok &= s[0] == 0.25f && s[3] == 16376.0f;
    ok &= ddp_ref_cast(h, DDP_K_F64, src, DDP_K_F32, 4, 1.0f) == 1;
    check(ok, "ref_cast_scale", "");
}

int main(void)
{
    test_bf16_patterns();
    test_f16_patterns();
    test_exhaustive(1);
    test_exhaustive(0);
    test_adamw();
    test_adamw_mixed();
    test_sgd();
    test_optimizer_step();
    test_add();
    test_sumsq();
    test_nonfinite();
    test_cast();
    printf("kernel refs: %d passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}
