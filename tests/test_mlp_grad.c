/* test_mlp_grad.c - checks examples/mlp.h, the model the examples train:
   the float backward against double central differences of an independent
   double forward, += accumulation, grad_scale, the on_grad_ready order, the
   data-parallel identity of the loss scaling, and that initialisation and
   shuffling are the same bits everywhere. Exit status 0 when all pass.

   cc -std=c99 -O2 -I. tests/test_mlp_grad.c -lm     (no zlib needed) */
#define MLP_NO_ZLIB
#define MLP_IMPLEMENTATION
#include "../examples/mlp.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int g_failed, g_passed;

static void check(int ok, const char *what, double value, double limit)
{
    if (ok) g_passed++; else g_failed++;
    printf("%s %-52s %.3g (limit %.3g)\n", ok ? "PASS" : "FAIL", what, value, limit);
}

/* ---- a double reference model, written independently of mlp.h ------------ */

static double ref_loss(const mlp_shape *s, double *const *P, const float *x,
                       const uint8_t *y, int B)
{
    double total = 0.0;
    int b, l, i, o;
    double a[64], z[64];
    for (b = 0; b < B; b++) {
        int n = s->dims[0];
        for (i = 0; i < n; i++) a[i] = x[(size_t)b * n + i];
        for (l = 0; l < s->num_layers; l++) {
            int in = s->dims[l], out = s->dims[l + 1];
            for (o = 0; o < out; o++) {
                double v = P[2 * l + 1][o];
                for (i = 0; i < in; i++) v += P[2 * l][(size_t)o * in + i] * a[i];
                z[o] = (l < s->num_layers - 1 && v < 0.0) ? 0.0 : v;
            }
            for (o = 0; o < out; o++) a[o] = z[o];
        }
        {
            int C = s->dims[s->num_layers];
            double mx = a[0], sum = 0.0;
            for (i = 1; i < C; i++) if (a[i] > mx) mx = a[i];
            for (i = 0; i < C; i++) sum += exp(a[i] - mx);
            total += log(sum) + mx - a[y[b]];
        }
    }
    return total / B;
}

/* ---- helpers ---------------------------------------------------------------- */

typedef struct model {
    mlp_shape s;
    int np;
    float *p[MLP_MAX_PARAMS], *g[MLP_MAX_PARAMS];
} model;

static void model_init(model *m, const mlp_shape *s, uint64_t seed)
{
    int p;
    m->s = *s;
    m->np = mlp_num_params(s);
    for (p = 0; p < m->np; p++) {
        m->p[p] = (float *)malloc(mlp_param_numel(s, p) * sizeof(float));
        m->g[p] = (float *)calloc(mlp_param_numel(s, p), sizeof(float));
    }
    mlp_init_params(s, seed, m->p);
    /* bigger biases than the default init so that some ReLUs are off and
       the net is far from its init symmetry */
    for (p = 1; p < m->np; p += 2) {
        size_t i;
        for (i = 0; i < mlp_param_numel(s, p); i++) m->p[p][i] *= 3.0f;
    }
}

static void model_zero_grads(model *m)
{
    int p;
    for (p = 0; p < m->np; p++) memset(m->g[p], 0, mlp_param_numel(&m->s, p) * sizeof(float));
}

static void model_free(model *m)
{
    int p;
    for (p = 0; p < m->np; p++) { free(m->p[p]); free(m->g[p]); }
}

/* max |a - b| / max |b| over one tensor */
static double rel_err(const float *a, const float *b, size_t n, float k)
{
    double d = 0.0, r = 0.0;
    size_t i;
    for (i = 0; i < n; i++) {
        double e = fabs((double)a[i] - (double)k * b[i]);
        if (e > d) d = e;
        if (fabs((double)k * b[i]) > r) r = fabs((double)k * b[i]);
    }
    return r > 0.0 ? d / r : d;
}

typedef struct order_log { int n; int ids[64]; } order_log;

static void on_ready(int p, void *user)
{
    order_log *o = (order_log *)user;
    if (o->n < 64) o->ids[o->n] = p;
    o->n++;
}

/* ---- tests -------------------------------------------------------------- */

static void test_gradcheck(const mlp_shape *s, int B, const char *tag)
{
    model m;
    mlp_dataset d;
    mlp_workspace ws;
    double *P[MLP_MAX_PARAMS] = {0};
    double worst_rel = 0.0, lossd;
    float lossf;
    int p, correct = 0;
    char what[128];
    order_log ord;
    memset(&ord, 0, sizeof ord);

    model_init(&m, s, 1234);
    if (mlp_synthetic(&d, B, s->dims[0], s->dims[s->num_layers], 99) ||
        mlp_workspace_init(&ws, s, B)) {
        check(0, "setup", 0, 0);
        return;
    }
    for (p = 0; p < m.np; p++) {
        size_t i, n = mlp_param_numel(s, p);
        P[p] = (double *)malloc(n * sizeof(double));
        for (i = 0; i < n; i++) P[p][i] = m.p[p][i];
    }
    lossf = mlp_forward_backward(m.p, d.x, d.y, B, 1.0f, m.g, &ws, &correct, on_ready, &ord);
    lossd = ref_loss(s, P, d.x, d.y, B);
    snprintf(what, sizeof what, "%s: float loss vs double loss", tag);
    check(fabs(lossf - lossd) / lossd <= 1e-5, what, fabs(lossf - lossd) / lossd, 1e-5);

    for (p = 0; p < m.np; p++) {
        size_t i, n = mlp_param_numel(s, p);
        double maxfd = 0.0, maxerr = 0.0;
        double *fd = (double *)malloc(n * sizeof(double));
        for (i = 0; i < n; i++) {
            double w = P[p][i], h = 1e-6;
            P[p][i] = w + h; { double lp = ref_loss(s, P, d.x, d.y, B);
            P[p][i] = w - h;   double lm = ref_loss(s, P, d.x, d.y, B);
            fd[i] = (lp - lm) / (2.0 * h); }
            P[p][i] = w;
            if (fabs(fd[i]) > maxfd) maxfd = fabs(fd[i]);
        }
        /* error relative to the tensor's largest entry (a float gradient
           carries absolute error ~1e-7 of the terms summed into it) */
        for (i = 0; i < n; i++) {
            double e = fabs((double)m.g[p][i] - fd[i]);
            if (e > maxerr) maxerr = e;
        }
        maxerr = maxfd > 0.0 ? maxerr / maxfd : maxerr;
        if (maxerr > worst_rel) worst_rel = maxerr;
        {
            char name[32];
            mlp_param_name(p, name, sizeof name);
            snprintf(what, sizeof what, "%s: %s grad vs central differences", tag, name);
            check(maxerr <= 1e-4 && maxfd > 0.0, what, maxerr, 1e-4);
        }
        free(fd);
    }
    {
        int ok = ord.n == m.np;
        for (p = 0; ok && p < m.np; p++) ok = ord.ids[p] == m.np - 1 - p;
        snprintf(what, sizeof what, "%s: on_grad_ready once each, backward order", tag);
        check(ok, what, ord.n, m.np);
    }
    snprintf(what, sizeof what, "%s: evaluate() agrees with forward's count", tag);
    check(mlp_evaluate(m.p, d.x, d.y, B, &ws) == correct, what, correct, correct);

    for (p = 0; p < m.np; p++) free(P[p]);
    mlp_workspace_free(&ws);
    mlp_dataset_free(&d);
    model_free(&m);
}

/* += accumulation, grad_scale, batch 0, and: averaging equal-shard means,
   or unequal shards with grad_scale = world * B_r / B, equals the full
   batch's gradient (the contract ddp relies on). */
static void test_accumulate_and_shards(void)
{
    mlp_shape s;
    model full, acc, sh;
    mlp_dataset d;
    mlp_workspace ws;
    float *ref[MLP_MAX_PARAMS];
    int p, B = 12;
    double e_acc = 0, e_scale = 0, e_eq = 0, e_uneq = 0, e_zero = 0;
    float l_full, l_sh;
    order_log ord;
    memset(&ord, 0, sizeof ord);

    mlp_shape_parse("21,18,9,4", &s);
    model_init(&full, &s, 7);
    model_init(&acc, &s, 7);
    model_init(&sh, &s, 7);
    mlp_synthetic(&d, B, 21, 4, 5);
    mlp_workspace_init(&ws, &s, B);

    l_full = mlp_forward_backward(full.p, d.x, d.y, B, 1.0f, full.g, &ws, NULL, NULL, NULL);
    for (p = 0; p < full.np; p++) {
        ref[p] = (float *)malloc(mlp_param_numel(&s, p) * sizeof(float));
        memcpy(ref[p], full.g[p], mlp_param_numel(&s, p) * sizeof(float));
    }
    /* twice into the same buffers: 2 g */
    mlp_forward_backward(acc.p, d.x, d.y, B, 1.0f, acc.g, &ws, NULL, NULL, NULL);
    mlp_forward_backward(acc.p, d.x, d.y, B, 1.0f, acc.g, &ws, NULL, NULL, NULL);
    for (p = 0; p < s.num_layers * 2; p++) {
        double e = rel_err(acc.g[p], ref[p], mlp_param_numel(&s, p), 2.0f);
        if (e > e_acc) e_acc = e;
    }
    check(e_acc <= 1e-6, "backward adds (+=) into the gradients", e_acc, 1e-6);

    model_zero_grads(&acc);
    mlp_forward_backward(acc.p, d.x, d.y, B, 0.25f, acc.g, &ws, NULL, NULL, NULL);
    for (p = 0; p < s.num_layers * 2; p++) {
        double e = rel_err(acc.g[p], ref[p], mlp_param_numel(&s, p), 0.25f);
        if (e > e_scale) e_scale = e;
    }
    check(e_scale <= 1e-6, "grad_scale scales the gradient", e_scale, 1e-6);

    /* batch 0: nothing added, every parameter still reported ready */
    mlp_forward(acc.p, d.x, d.y, 0, &ws, NULL);
    mlp_backward(acc.p, d.x, d.y, 0, 1.0f, acc.g, &ws, on_ready, &ord);
    for (p = 0; p < s.num_layers * 2; p++) {
        double e = rel_err(acc.g[p], ref[p], mlp_param_numel(&s, p), 0.25f);
        if (e > e_zero) e_zero = e;
    }
    check(e_zero <= 1e-6 && ord.n == 6, "batch 0 adds nothing, marks all 6 ready", e_zero, 1e-6);

    /* 3 equal shards of 4, scale 1, summed then averaged */
    {
        int r;
        float loss_avg = 0.0f;
        for (r = 0; r < 3; r++)
            loss_avg += mlp_forward_backward(sh.p, d.x + (size_t)r * 4 * 21, d.y + r * 4, 4, 1.0f,
                                             sh.g, &ws, NULL, NULL, NULL) / 3.0f;
        for (p = 0; p < s.num_layers * 2; p++) {
            double e = rel_err(sh.g[p], ref[p], mlp_param_numel(&s, p), 3.0f);
            if (e > e_eq) e_eq = e;
        }
        check(e_eq <= 1e-5, "3 equal shards, averaged == full batch", e_eq, 1e-5);
        check(fabs(loss_avg - l_full) <= 1e-5 * l_full, "3 equal shards: mean loss == full",
              fabs(loss_avg - l_full), 1e-5 * l_full);
    }
    /* shards of 5, 7, 0 with grad_scale = world * B_r / B */
    {
        int sizes[3] = {5, 7, 0}, off = 0, r;
        model_zero_grads(&sh);
        l_sh = 0.0f;
        for (r = 0; r < 3; r++) {
            float k = 3.0f * (float)sizes[r] / (float)B;
            l_sh += mlp_forward_backward(sh.p, d.x + (size_t)off * 21, d.y + off, sizes[r], k,
                                         sh.g, &ws, NULL, NULL, NULL) / 3.0f;
            off += sizes[r];
        }
        for (p = 0; p < s.num_layers * 2; p++) {
            double e = rel_err(sh.g[p], ref[p], mlp_param_numel(&s, p), 3.0f);
            if (e > e_uneq) e_uneq = e;
        }
        check(e_uneq <= 1e-5, "shards 5/7/0, scale w*B_r/B, averaged == full", e_uneq, 1e-5);
        check(fabs(l_sh - l_full) <= 1e-5 * l_full, "shards 5/7/0: scaled loss average == full",
              fabs(l_sh - l_full), 1e-5 * l_full);
    }
    for (p = 0; p < s.num_layers * 2; p++) free(ref[p]);
    mlp_workspace_free(&ws);
    mlp_dataset_free(&d);
    model_free(&full); model_free(&acc); model_free(&sh);
}

/* The same bits on every platform: values computed once, pinned here. */
static void test_determinism(void)
{
    mlp_shape s = mlp_shape_default();
    float *p[MLP_MAX_PARAMS];
    int i, perm[10], ok;
    char name[32];
    mlp_shape t;
    static const uint32_t want_w[4] = { 0xbc97b8ceu, 0x3c8ec74cu, 0xbc080720u, 0xbc9dee04u };
    static const int want_perm[10] = { 2, 8, 7, 4, 5, 6, 0, 1, 9, 3 };
    uint32_t bits[4];
    for (i = 0; i < 6; i++) p[i] = (float *)malloc(mlp_param_numel(&s, i) * sizeof(float));
    mlp_init_params(&s, 42, p);
    memcpy(&bits[0], &p[0][0], 4);
    memcpy(&bits[1], &p[0][783], 4);
    memcpy(&bits[2], &p[3][5], 4);
    memcpy(&bits[3], &p[4][2559], 4);
    ok = 1;
    for (i = 0; i < 4; i++) ok &= bits[i] == want_w[i];
    check(ok, "mlp_init_params(seed 42): pinned bits", 0, 0);
    {
        float bound = 1.0f / sqrtf(784.0f), mx = 0.0f;
        size_t j;
        for (j = 0; j < mlp_param_numel(&s, 0); j++) if (fabsf(p[0][j]) > mx) mx = fabsf(p[0][j]);
        check(mx <= bound && mx > 0.99f * bound, "fc1.weight within +-1/sqrt(784)", mx, bound);
    }
    mlp_permutation(perm, 10, 3);
    ok = 1;
    for (i = 0; i < 10; i++) ok &= perm[i] == want_perm[i];
    check(ok, "mlp_permutation(10, seed 3): pinned", 0, 0);
    for (i = 0; i < 6; i++) free(p[i]);

    mlp_param_name(4, name, sizeof name);
    check(strcmp(name, "fc3.weight") == 0, "mlp_param_name(4) == fc3.weight", 0, 0);
    check(mlp_shape_parse("784,256,256,10", &t) == 0 && t.num_layers == 3 && t.dims[3] == 10 &&
          mlp_shape_parse("784,", &t) != 0 && mlp_shape_parse("5", &t) != 0,
          "mlp_shape_parse", 0, 0);
}

int main(void)
{
    mlp_shape s;
    if (getenv("MLP_PRINT_PINS")) {  /* how the pinned values were made */
        mlp_shape d = mlp_shape_default();
        float *p[6];
        int i, perm[10];
        uint32_t b;
        for (i = 0; i < 6; i++) p[i] = (float *)malloc(mlp_param_numel(&d, i) * sizeof(float));
        mlp_init_params(&d, 42, p);
        memcpy(&b, &p[0][0], 4); printf("0x%08x ", (unsigned)b);
        memcpy(&b, &p[0][783], 4); printf("0x%08x ", (unsigned)b);
        memcpy(&b, &p[3][5], 4); printf("0x%08x ", (unsigned)b);
        memcpy(&b, &p[4][2559], 4); printf("0x%08x\n", (unsigned)b);
        mlp_permutation(perm, 10, 3);
        for (i = 0; i < 10; i++) printf("%d,", perm[i]);
        printf("\n");
        return 0;
    }
    mlp_shape_parse("19,17,9,5", &s);
    test_gradcheck(&s, 6, "19-17-9-5 B=6");
    mlp_shape_parse("10,3", &s);
    test_gradcheck(&s, 3, "10-3 B=3");
    mlp_shape_parse("33,40,12,8,7", &s);
    test_gradcheck(&s, 9, "33-40-12-8-7 B=9");
    test_accumulate_and_shards();
    test_determinism();
    printf("test_mlp_grad: %d passed, %d failed\n", g_passed, g_failed);
    return g_failed ? 1 : 0;
}
