/* Training semantics against plain-C references, on N ranks under the
   launcher:

       ddprun -n N test_train MODE

   MODE accum   every accumulation pattern (synced micro-steps, no_sync,
                mixtures, ddp_zero_grad inside a window, ddp_train_step,
                gradient_sum): the gradient every rank sees after every
                ddp_step_end and the weights after every optimizer step,
                against a reference that applies PyTorch DDP's rule to the
                same calls.

   The model is linear regression, y = W x + b, loss = 0.5 * mean over rows
   of |y - t|^2, so the gradient of any set of rows is exact arithmetic the
   reference can redo in double. Each rank checks itself and exits non-zero
   on a failure. */
#define DDP_IMPLEMENTATION
#include "../ddp.h"
#include "testing.h"
#include <math.h>

enum { NIN = 5, NOUT = 3, NW = NIN * NOUT, ROWS = 4, MAXW = 8 };

static int g_rank, g_world;

static double xval(long row, int k) { return sin(0.7 * (double)row + 1.3 * k + 0.1); }
static double tval(long row, int o) { return cos(0.3 * (double)row + o) * 0.5; }

/* Mean-loss gradient of rows [row0, row0 + n) at (W, b), in double. */
static void grad_rows(const double *W, const double *b, long row0, int n, double *gw, double *gb) {
    int r, o, k;
    for (k = 0; k < NW; k++) gw[k] = 0;
    for (o = 0; o < NOUT; o++) gb[o] = 0;
    for (r = 0; r < n; r++) {
        long row = row0 + r;
        for (o = 0; o < NOUT; o++) {
            double y = b[o], e;
            for (k = 0; k < NIN; k++) y += W[o * NIN + k] * xval(row, k);
            e = (y - tval(row, o)) / n;
            gb[o] += e;
            for (k = 0; k < NIN; k++) gw[o * NIN + k] += e * xval(row, k);
        }
    }
}

/* The library side: this rank's gradient of its rows, added into the
   context's gradient buffers (as a backward does), marking both ready. */
static ddp_result backward(ddp_context *ctx, int idw, int idb, long row0, int n) {
    double W[NW], b[NOUT], gw[NW], gb[NOUT];
    const float *pw = (const float *)ddp_param_data(ctx, idw), *pb = (const float *)ddp_param_data(ctx, idb);
    float *qw = (float *)ddp_param_grad(ctx, idw), *qb = (float *)ddp_param_grad(ctx, idb);
    int k;
    for (k = 0; k < NW; k++) W[k] = pw[k];
    for (k = 0; k < NOUT; k++) b[k] = pb[k];
    grad_rows(W, b, row0, n, gw, gb);
    for (k = 0; k < NOUT; k++) qb[k] += (float)gb[k];
    DDP__TRY(ddp_mark_ready(ctx, idb));
    for (k = 0; k < NW; k++) qw[k] += (float)gw[k];
    return ddp_mark_ready(ctx, idw);
}

static void init_weights(float *w, float *b) {
    int k;
    for (k = 0; k < NW; k++) w[k] = (float)(0.3 * sin(1.7 * k + 0.2));
    for (k = 0; k < NOUT; k++) b[k] = (float)(0.1 * k - 0.05);
}

static ddp_context *make_model(ddp_config *c, int *idw, int *idb) {
    ddp_context *ctx = NULL;
    float w[NW], b[NOUT];
    int64_t shape[2] = { NOUT, NIN };
    ddp_result r;
    c->timeout_s = 30;
    c->first_bucket_bytes = 16; /* one bucket per parameter: several collectives per step */
    c->bucket_bytes = 16;
    r = ddp_create(c, &ctx);
    if (r != DDP_SUCCESS) { fprintf(stderr, "ddp_create: %s: %s\n", ddp_result_string(r), ddp_create_error()); exit(2); }
    init_weights(w, b);
    if (ddp_register_param_shape(ctx, "fc.weight", 2, shape, DDP_F32, w, idw) != DDP_SUCCESS ||
        ddp_register_param(ctx, "fc.bias", NOUT, DDP_F32, b, idb) != DDP_SUCCESS ||
        ddp_finalize(ctx) != DDP_SUCCESS) {
        fprintf(stderr, "model: %s\n", ddp_last_error(ctx));
        exit(2);
    }
    return ctx;
}

/* max |a - ref| / max |ref| over the model */
static double rel_diff(const float *aw, const float *ab, const double *rw, const double *rb) {
    double d = 0, m = 1e-30;
    int k;
    for (k = 0; k < NW; k++) { double e = fabs(aw[k] - rw[k]); if (e > d || e != e) d = e != e ? 1e30 : e; if (fabs(rw[k]) > m) m = fabs(rw[k]); }
    for (k = 0; k < NOUT; k++) { double e = fabs(ab[k] - rb[k]); if (e > d || e != e) d = e != e ? 1e30 : e; if (fabs(rb[k]) > m) m = fabs(rb[k]); }
    return d / m;
}

/* PyTorch's SGD in double (momentum, dampening 0, nesterov, weight decay) */
typedef struct ref_sgd { double lr, momentum, wd; int nesterov; double buf[NW + NOUT]; long t; } ref_sgd;
static void ref_sgd_step(ref_sgd *o, double *p, const double *g, int n) {
    int i;
    o->t++;
    for (i = 0; i < n; i++) {
        double d = g[i] + o->wd * p[i];
        if (o->momentum != 0) {
            o->buf[i] = o->t == 1 ? d : o->momentum * o->buf[i] + d;
            d = o->nesterov ? d + o->momentum * o->buf[i] : o->buf[i];
        }
        p[i] -= o->lr * d;
    }
}

/* The gradient of step s on the concatenated batch (every rank's rows). */
static void step_grad(const double *p, long step, double *g) {
    grad_rows(p, p + NW, step * g_world * ROWS, g_world * ROWS, g, g + NW);
}

/* ---- accumulation patterns ------------------------------------------------------ */

/* One character per call between two optimizer steps:
     S  a synced micro-step          N  a micro-step with ddp_set_no_sync(ctx, 1)
     Z  ddp_zero_grad()              T  ddp_train_step(ctx, fn, ., 3, .) */
typedef struct pattern { const char *name, *seq; int gradient_sum; } pattern;

typedef struct accum_job { int idw, idb; long next_micro; } accum_job;

static long micro_row(long micro, int rank) { return (micro * g_world + rank) * ROWS; }

static int accum_fb(ddp_context *ctx, void *user, int m, float *loss) {
    accum_job *j = (accum_job *)user;
    (void)m;
    *loss = 0;
    return backward(ctx, j->idw, j->idb, micro_row(j->next_micro++, g_rank), ROWS) == DDP_SUCCESS ? 0 : 1;
}

/* the reference: reduced part, every rank's local part, PyTorch's rule */
typedef struct acc_ref { double acc[NW + NOUT], loc[MAXW][NW + NOUT]; } acc_ref;

static void ref_micro(acc_ref *a, const double *p, long micro, int synced, double factor) {
    int q, i;
    for (q = 0; q < g_world; q++) {
        double g[NW + NOUT];
        grad_rows(p, p + NW, micro_row(micro, q), ROWS, g, g + NW);
        for (i = 0; i < NW + NOUT; i++) a->loc[q][i] += g[i];
    }
    if (!synced) return;
    for (i = 0; i < NW + NOUT; i++) {
        double s = 0;
        for (q = 0; q < g_world; q++) { s += a->loc[q][i]; a->loc[q][i] = 0; }
        a->acc[i] += factor * s;
    }
}

/* what this rank's gradient buffer must show now */
static double check_visible(ddp_context *ctx, int idw, int idb, const acc_ref *a) {
    double ew[NW], eb[NOUT];
    int i;
    for (i = 0; i < NW; i++) ew[i] = a->acc[i] + a->loc[g_rank][i];
    for (i = 0; i < NOUT; i++) eb[i] = a->acc[NW + i] + a->loc[g_rank][NW + i];
    return rel_diff((const float *)ddp_param_grad(ctx, idw), (const float *)ddp_param_grad(ctx, idb), ew, eb);
}

static void run_pattern(const pattern *pt) {
    ddp_config c;
    ddp_context *ctx;
    accum_job j;
    acc_ref a;
    ref_sgd o;
    double p[NW + NOUT], worst_grad = 0, worst_w = 0;
    float w0[NW], b0[NOUT];
    int s, i, steps = 3;
    memset(&c, 0, sizeof c);
    c.optimizer = ddp_optimizer_defaults(DDP_OPTIM_SGD);
    c.optimizer.lr = 0.1;
    c.optimizer.momentum = 0.9;
    c.optimizer.nesterov = 1;
    c.optimizer.weight_decay = 1e-2;
    c.gradient_sum = pt->gradient_sum;
    ctx = make_model(&c, &j.idw, &j.idb);
    j.next_micro = 0;
    memset(&a, 0, sizeof a);
    memset(&o, 0, sizeof o);
    o.lr = 0.1; o.momentum = 0.9; o.nesterov = 1; o.wd = 1e-2;
    init_weights(w0, b0);
    for (i = 0; i < NW; i++) p[i] = w0[i];
    for (i = 0; i < NOUT; i++) p[NW + i] = b0[i];
    for (s = 0; s < steps; s++) {
        const char *k;
        double factor = pt->gradient_sum ? 1.0 : 1.0 / g_world;
        for (k = pt->seq; *k; k++) {
            ddp_result r = DDP_SUCCESS;
            if (*k == 'Z') {
                r = ddp_zero_grad(ctx);
                memset(&a, 0, sizeof a);
            } else if (*k == 'T') {
                int m;
                r = ddp_train_step(ctx, accum_fb, &j, 3, NULL);
                for (m = 0; m < 3; m++) ref_micro(&a, p, j.next_micro - 3 + m, m == 2, factor / 3);
            } else {
                int sync = *k == 'S';
                r = ddp_set_no_sync(ctx, !sync);
                if (r == DDP_SUCCESS) r = ddp_step_begin(ctx);
                if (r == DDP_SUCCESS) r = backward(ctx, j.idw, j.idb, micro_row(j.next_micro, g_rank), ROWS);
                if (r == DDP_SUCCESS) r = ddp_step_end(ctx);
                ref_micro(&a, p, j.next_micro++, sync, factor);
            }
            CHECK(r == DDP_SUCCESS, "%s: step %d call '%c': %s", pt->name, s, *k, ddp_last_error(ctx));
            if (r != DDP_SUCCESS) { ddp_destroy(ctx); return; }
            if (*k == 'T') {
                /* the optimizer already ran: compare the weights */
                ref_sgd_step(&o, p, a.acc, NW + NOUT);
                memset(&a, 0, sizeof a);
            } else {
                double d = check_visible(ctx, j.idw, j.idb, &a);
                if (d > worst_grad) worst_grad = d;
            }
        }
        if (strchr(pt->seq, 'T') == NULL) {
            ddp_result r = ddp_optimizer_step(ctx);
            CHECK(r == DDP_SUCCESS, "%s: optimizer step %d: %s", pt->name, s, ddp_last_error(ctx));
            ref_sgd_step(&o, p, a.acc, NW + NOUT);
            memset(&a, 0, sizeof a);
        }
        {
            double d = rel_diff((const float *)ddp_param_data(ctx, j.idw), (const float *)ddp_param_data(ctx, j.idb), p, p + NW);
            if (d > worst_w) worst_w = d;
        }
    }
    CHECK(worst_grad <= 1e-5, "%s: gradient differs from PyTorch's rule by %.3g (relative)", pt->name, worst_grad);
    CHECK(worst_w <= 1e-5, "%s: weights differ from the reference by %.3g (relative)", pt->name, worst_w);
    if (g_rank == 0) printf("accum %-28s world=%d grad_diff=%.2g weight_diff=%.2g\n", pt->name, g_world, worst_grad, worst_w);
    ddp_destroy(ctx);
}

static void mode_accum(void) {
    static const pattern pats[] = {
        { "synced micro-steps", "SSS", 0 },
        { "no_sync micro-steps", "NNS", 0 },
        { "mixed", "SNSNNS", 0 },
        { "zero_grad inside", "SZNS", 0 },
        { "ddp_train_step", "T", 0 },
        { "train_step after a sync", "ST", 0 },
        { "gradient_sum no_sync", "NS", 1 },
        { "gradient_sum mixed", "SNSNS", 1 },
    };
    size_t i;
    for (i = 0; i < sizeof pats / sizeof pats[0]; i++) {
        TEST(pats[i].name);
        run_pattern(&pats[i]);
    }
}

/* ---- parameter groups ------------------------------------------------------------ */

typedef struct step_job { int idw, idb; long step; } step_job;

static int step_fb(ddp_context *ctx, void *user, int m, float *loss) {
    step_job *j = (step_job *)user;
    (void)m;
    *loss = 0;
    return backward(ctx, j->idw, j->idb, (j->step * g_world + g_rank) * ROWS, ROWS) == DDP_SUCCESS ? 0 : 1;
}

/* PyTorch's SGD (momentum, no dampening) or AdamW in double, with a
   per-element lr and weight decay (what param_groups give) */
typedef struct ref_opt { int adamw; double m[NW + NOUT], v[NW + NOUT]; long t; } ref_opt;
static void ref_opt_step(ref_opt *o, double *p, const double *g, const double *lr, const double *wd) {
    int i;
    double bc1, bc2;
    o->t++;
    bc1 = 1 - pow(0.9, (double)o->t);
    bc2 = 1 - pow(0.999, (double)o->t);
    for (i = 0; i < NW + NOUT; i++) {
        if (o->adamw) {
            p[i] *= 1 - lr[i] * wd[i];
            o->m[i] = 0.9 * o->m[i] + (1 - 0.9) * g[i];
            o->v[i] = 0.999 * o->v[i] + (1 - 0.999) * g[i] * g[i];
            p[i] -= (lr[i] / bc1) * o->m[i] / (sqrt(o->v[i]) / sqrt(bc2) + 1e-8);
        } else {
            double d = g[i] + wd[i] * p[i];
            o->m[i] = o->t == 1 ? d : 0.9 * o->m[i] + d;
            p[i] -= lr[i] * o->m[i];
        }
    }
}

/* fc.weight decays with lr x lr_w; fc.bias does not decay (no_weight_decay) */
static void run_groups(ddp_optimizer type, double lr_w, int steps) {
    ddp_config c;
    ddp_context *ctx;
    ddp_param_options ow, ob;
    step_job j;
    ref_opt rg, rp;
    double p[NW + NOUT], plain[NW + NOUT], g[NW + NOUT], lr_g[NW + NOUT], wd_g[NW + NOUT], lr_p[NW + NOUT], wd_p[NW + NOUT];
    double d, effect = 0;
    float w[NW], b[NOUT];
    int64_t shape[2] = { NOUT, NIN };
    int s, i, idw, idb;
    ddp_result r;
    char name[64];
    snprintf(name, sizeof name, "groups %s lr_scale %g", type == DDP_OPTIM_SGD ? "sgd" : "adamw", lr_w);
    TEST(name);
    memset(&c, 0, sizeof c);
    c.timeout_s = 30;
    c.optimizer = ddp_optimizer_defaults(type);
    c.optimizer.lr = 0.05;
    c.optimizer.weight_decay = 0.2;
    if (type == DDP_OPTIM_SGD) c.optimizer.momentum = 0.9;
    if (ddp_create(&c, &ctx) != DDP_SUCCESS) { fprintf(stderr, "%s\n", ddp_create_error()); exit(2); }
    init_weights(w, b);
    ddp_register_param_shape(ctx, "fc.weight", 2, shape, DDP_F32, w, &idw);
    ddp_register_param(ctx, "fc.bias", NOUT, DDP_F32, b, &idb);
    /* the options go between registration and ddp_finalize() */
    memset(&ow, 0, sizeof ow);
    ow.lr_scale = lr_w;
    memset(&ob, 0, sizeof ob);
    ob.no_weight_decay = 1;
    CHECK_OK(ddp_set_param_options(ctx, idw, &ow), ctx);
    CHECK_OK(ddp_set_param_options(ctx, idb, &ob), ctx);
    CHECK_OK(ddp_finalize(ctx), ctx);
    CHECK(ddp_get_param_options(ctx, idb).no_weight_decay == 1 && ddp_get_param_options(ctx, idw).lr_scale == (lr_w ? lr_w : 1),
          "options in force");
    memset(&rg, 0, sizeof rg);
    memset(&rp, 0, sizeof rp);
    rg.adamw = rp.adamw = type == DDP_OPTIM_ADAMW;
    for (i = 0; i < NW + NOUT; i++) {
        p[i] = plain[i] = i < NW ? w[i] : b[i - NW];
        lr_g[i] = i < NW ? 0.05 * (lr_w ? lr_w : 1.0) : 0.05;
        wd_g[i] = i < NW ? 0.2 : 0.0;
        lr_p[i] = 0.05;
        wd_p[i] = 0.2;
    }
    j.idw = idw; j.idb = idb;
    for (s = 0; s < steps; s++) {
        j.step = s;
        r = ddp_train_step(ctx, step_fb, &j, 1, NULL);
        CHECK(r == DDP_SUCCESS, "step %d: %s", s, ddp_last_error(ctx));
        if (r != DDP_SUCCESS) break;
        step_grad(p, s, g);
        ref_opt_step(&rg, p, g, lr_g, wd_g);
        step_grad(plain, s, g);
        ref_opt_step(&rp, plain, g, lr_p, wd_p);
    }
    d = rel_diff((const float *)ddp_param_data(ctx, idw), (const float *)ddp_param_data(ctx, idb), p, p + NW);
    for (i = 0; i < NW + NOUT; i++) if (fabs(p[i] - plain[i]) > effect) effect = fabs(p[i] - plain[i]);
    CHECK(d <= 1e-5, "%s: weights differ from the reference by %.3g", name, d);
    CHECK(effect > 1e-3, "%s: the groups change the result (by %.3g)", name, effect);
    if (g_rank == 0) printf("%-32s world=%d diff=%.2g effect_of_groups=%.2g\n", name, g_world, d, effect);
    ddp_destroy(ctx);
}

/* every rank must set the same options: a difference is named at finalize */
static void groups_mismatch(void) {
    ddp_config c;
    ddp_context *ctx;
    ddp_param_options o;
    int idw, idb;
    ddp_result r;
    TEST("groups mismatch");
    if (g_world < 2) return;
    memset(&c, 0, sizeof c);
    c.timeout_s = 30;
    c.optimizer = ddp_optimizer_defaults(DDP_OPTIM_ADAMW);
    if (ddp_create(&c, &ctx) != DDP_SUCCESS) { fprintf(stderr, "%s\n", ddp_create_error()); exit(2); }
    ddp_register_param(ctx, "fc.weight", NW, DDP_F32, NULL, &idw);
    ddp_register_param(ctx, "fc.bias", NOUT, DDP_F32, NULL, &idb);
    memset(&o, 0, sizeof o);
    o.no_weight_decay = g_rank != 1;
    CHECK_OK(ddp_set_param_options(ctx, idb, &o), ctx);
    r = ddp_finalize(ctx);
    CHECK(r == DDP_ERROR_MISMATCH && strstr(ddp_last_error(ctx), "'fc.bias'") && strstr(ddp_last_error(ctx), "weight_decay_scale=0"),
          "finalize: %s: %s", ddp_result_string(r), ddp_last_error(ctx));
    ddp_destroy(ctx);
}

static void mode_groups(void) {
    run_groups(DDP_OPTIM_ADAMW, 0.5, 6);
    run_groups(DDP_OPTIM_ADAMW, 0, 6);
    run_groups(DDP_OPTIM_SGD, 2.0, 6);
    groups_mismatch();
}

/* ---- loss scaling ------------------------------------------------------------------ */

enum { SN = 37 };

/* rank r's gradient at step s is w - target(s, r): their average pulls w
   to the mean target */
static double target(int step, int rank, int i) { return sin(0.3 * i + 0.7 * step + 1.1 * rank) * 0.5; }

enum { INJ_NONE, INJ_INF_LAST, INJ_NAN_FIRST };

typedef struct scaler_run {
    float w[SN];            /* final weights (as f32) */
    double scale[16];       /* ddp_loss_scale() after each step */
    int skipped[16];
    int unchanged_when_skipped;
} scaler_run;

/* steps of SGD with momentum; loss scaling on (S from init) or off, in
   which case the steps listed in skip_without are left out by hand */
static void scaler_train(ddp_dtype dt, int scaling, double init, int interval, const int *inject, const int *skip_without,
                         int steps, scaler_run *out) {
    ddp_config c;
    ddp_context *ctx;
    float w0[SN];
    uint16_t w16[SN];
    int s, i, id;
    memset(&c, 0, sizeof c);
    c.timeout_s = 30;
    c.optimizer = ddp_optimizer_defaults(DDP_OPTIM_SGD);
    c.optimizer.lr = 0.25;
    c.optimizer.momentum = 0.5;
    c.loss_scale.enabled = scaling;
    c.loss_scale.init_scale = init;
    c.loss_scale.growth_interval = interval;
    if (ddp_create(&c, &ctx) != DDP_SUCCESS) { fprintf(stderr, "%s\n", ddp_create_error()); exit(2); }
    for (i = 0; i < SN; i++) { w0[i] = (float)cos(0.5 * i); w16[i] = ddp__f32_to_f16(w0[i]); }
    ddp_register_param(ctx, "w", SN, dt, dt == DDP_F16 ? (void *)w16 : (void *)w0, &id);
    if (ddp_finalize(ctx) != DDP_SUCCESS) { fprintf(stderr, "%s\n", ddp_last_error(ctx)); exit(2); }
    out->unchanged_when_skipped = 1;
    for (s = 0; s < steps; s++) {
        unsigned char before[SN * 4];
        double S = ddp_loss_scale(ctx);
        void *g;
        memcpy(before, ddp_param_data(ctx, id), SN * ddp_dtype_size(dt));
        CHECK_OK(ddp_step_begin(ctx), ctx);
        g = ddp_param_grad(ctx, id);
        for (i = 0; i < SN; i++) {
            /* the gradient of S * loss */
            double w = dt == DDP_F16 ? ddp__f16_to_f32(((uint16_t *)ddp_param_data(ctx, id))[i]) : ((float *)ddp_param_data(ctx, id))[i];
            float v = (float)(S * (w - target(s, g_rank, i)));
            if (i == 7 && inject[s] == INJ_INF_LAST && g_rank == g_world - 1) v = (float)HUGE_VAL;
            if (i == 20 && inject[s] == INJ_NAN_FIRST && g_rank == 0) v = (float)(0.0 / 0.0);
            if (dt == DDP_F16) ((uint16_t *)g)[i] = ddp__f32_to_f16(ddp__f16_to_f32(((uint16_t *)g)[i]) + v);
            else ((float *)g)[i] += v;
        }
        CHECK_OK(ddp_mark_ready(ctx, id), ctx);
        CHECK_OK(ddp_step_end(ctx), ctx);
        if (!scaling && skip_without[s]) CHECK_OK(ddp_zero_grad(ctx), ctx);
        else CHECK_OK(ddp_optimizer_step(ctx), ctx);
        out->scale[s] = ddp_loss_scale(ctx);
        out->skipped[s] = ddp_last_step_skipped(ctx);
        if (out->skipped[s] && memcmp(before, ddp_param_data(ctx, id), SN * ddp_dtype_size(dt)) != 0) out->unchanged_when_skipped = 0;
    }
    for (i = 0; i < SN; i++)
        out->w[i] = dt == DDP_F16 ? ddp__f16_to_f32(((uint16_t *)ddp_param_data(ctx, id))[i]) : ((float *)ddp_param_data(ctx, id))[i];
    if (scaling) {
        int n = 0;
        for (s = 0; s < steps; s++) n += out->skipped[s];
        CHECK(ddp_skipped_steps(ctx) == n && ddp_optimizer_steps(ctx) == steps - n, "counters: skipped %lld taken %lld",
              (long long)ddp_skipped_steps(ctx), (long long)ddp_optimizer_steps(ctx));
    }
    ddp_destroy(ctx);
}

/* GradScaler's rule, written out */
static void expect_scales(double S, int interval, const int *bad, int steps, double *want) {
    int s, tracker = 0;
    for (s = 0; s < steps; s++) {
        if (bad[s]) { S = (float)(S * 0.5); tracker = 0; }
        else if (++tracker == interval) { S = (float)(S * 2.0); tracker = 0; }
        want[s] = S;
    }
}

static void mode_scaler(void) {
    enum { STEPS = 12 };
    static const int inject[STEPS] = { 0, 0, INJ_INF_LAST, 0, 0, 0, INJ_NAN_FIRST, 0, 0, 0, 0, 0 };
    static const int none[STEPS] = { 0 };
    int bad[STEPS], s, i, same = 1;
    double want[STEPS];
    scaler_run a, b;
    TEST("loss scaling, f32, inf and NaN on one rank");
    for (s = 0; s < STEPS; s++) bad[s] = inject[s] != 0;
    scaler_train(DDP_F32, 1, 1024, 3, inject, none, STEPS, &a);
    expect_scales(1024, 3, bad, STEPS, want);
    for (s = 0; s < STEPS; s++) {
        CHECK(a.skipped[s] == bad[s], "step %d: skipped %d, want %d (every rank the same)", s, a.skipped[s], bad[s]);
        CHECK(a.scale[s] == want[s], "step %d: scale %g, want %g", s, a.scale[s], want[s]);
    }
    CHECK(a.unchanged_when_skipped, "a skipped step leaves the weights as they were");
    /* the same run without scaling, leaving out the bad steps: a power-of-two
       scale changes no bit */
    scaler_train(DDP_F32, 0, 0, 3, none, bad, STEPS, &b);
    for (i = 0; i < SN; i++) same &= a.w[i] == b.w[i];
    CHECK(same, "weights with loss scaling equal the unscaled run without the skipped steps, bit for bit");
    if (g_rank == 0) printf("loss scaling f32 world=%d: skipped steps 2 and 6, scale 1024 -> %g, bitwise equal to the unscaled run: %s\n",
                            g_world, a.scale[STEPS - 1], same ? "yes" : "no");

    /* fp16 parameters and gradients with a scale too large for f16: the
       scaled gradients overflow on every rank; the scale backs off until
       they fit, then training proceeds */
    TEST("loss scaling, f16 overflow");
    {
        double d = 0, S = 1 << 24;
        int nskip = 0, first_taken = -1;
        scaler_train(DDP_F16, 1, S, 4, none, none, STEPS, &a);
        for (s = 0; s < STEPS; s++) {
            if (a.skipped[s]) nskip++;
            else if (first_taken < 0) first_taken = s;
        }
        /* |S * (w - t)| fits f16 (< 65504) only from S = 2^15 down for these values */
        CHECK(nskip >= 1 && first_taken == nskip, "the first %d steps skipped, then steps taken (first at %d)", nskip, first_taken);
        CHECK(a.unchanged_when_skipped, "skipped f16 steps leave the weights");
        for (s = 0; s < nskip; s++) CHECK(a.scale[s] == (float)(S / (2 << s)), "halved at step %d: %g", s, a.scale[s]);
        {
            int skip_ref[STEPS];
            for (s = 0; s < STEPS; s++) skip_ref[s] = s < nskip;
            scaler_train(DDP_F32, 0, 0, 4, none, skip_ref, STEPS, &b);
        }
        for (i = 0; i < SN; i++) if (fabs(a.w[i] - b.w[i]) > d) d = fabs(a.w[i] - b.w[i]);
        CHECK(d < 2e-2, "f16 weights follow the f32 run that skips the same steps (max diff %.3g)", d);
        if (g_rank == 0) printf("loss scaling f16 world=%d: %d overflow steps skipped, scale 2^24 -> %g, max diff to f32 %.2g\n",
                                g_world, nskip, a.scale[STEPS - 1], d);
    }
}

/* ---- schedules across a checkpoint ------------------------------------------------- */

typedef struct resume_job { int idw, idb; long step; } resume_job;

/* the gradient of S * loss, with an inf on the last rank at steps 4 and 9 */
static int resume_fb(ddp_context *ctx, void *user, int m, float *loss) {
    resume_job *j = (resume_job *)user;
    double W[NW], b[NOUT], gw[NW], gb[NOUT], S = ddp_loss_scale(ctx);
    const float *pw = (const float *)ddp_param_data(ctx, j->idw), *pb = (const float *)ddp_param_data(ctx, j->idb);
    float *qw = (float *)ddp_param_grad(ctx, j->idw), *qb = (float *)ddp_param_grad(ctx, j->idb);
    int k;
    for (k = 0; k < NW; k++) W[k] = pw[k];
    for (k = 0; k < NOUT; k++) b[k] = pb[k];
    grad_rows(W, b, ((j->step * 2 + m) * g_world + g_rank) * ROWS, ROWS, gw, gb);
    for (k = 0; k < NOUT; k++) qb[k] += (float)(S * gb[k]);
    if ((j->step == 4 || j->step == 9) && g_rank == g_world - 1 && m == 1) qb[1] = (float)HUGE_VAL;
    if (ddp_mark_ready(ctx, j->idb) != DDP_SUCCESS) return 1;
    for (k = 0; k < NW; k++) qw[k] += (float)(S * gw[k]);
    *loss = 0;
    return ddp_mark_ready(ctx, j->idw) == DDP_SUCCESS ? 0 : 1;
}

static ddp_context *resume_model(const ddp_schedule_desc *sd, resume_job *j) {
    ddp_config c;
    ddp_context *ctx;
    ddp_param_options o;
    float w[NW], b[NOUT];
    int64_t shape[2] = { NOUT, NIN };
    memset(&c, 0, sizeof c);
    c.timeout_s = 30;
    c.optimizer = ddp_optimizer_defaults(DDP_OPTIM_ADAMW);
    c.optimizer.lr = 0.02;
    c.optimizer.max_grad_norm = 0.5;
    c.schedule = *sd;
    c.loss_scale.enabled = 1;
    c.loss_scale.init_scale = 256;
    c.loss_scale.growth_interval = 2;
    if (ddp_create(&c, &ctx) != DDP_SUCCESS) { fprintf(stderr, "%s\n", ddp_create_error()); exit(2); }
    init_weights(w, b);
    ddp_register_param_shape(ctx, "fc.weight", 2, shape, DDP_F32, w, &j->idw);
    ddp_register_param(ctx, "fc.bias", NOUT, DDP_F32, b, &j->idb);
    memset(&o, 0, sizeof o);
    o.lr_scale = 0.5;
    ddp_set_param_options(ctx, j->idw, &o);
    memset(&o, 0, sizeof o);
    o.no_weight_decay = 1;
    ddp_set_param_options(ctx, j->idb, &o);
    if (ddp_finalize(ctx) != DDP_SUCCESS) { fprintf(stderr, "%s\n", ddp_last_error(ctx)); exit(2); }
    return ctx;
}

static void resume_steps(ddp_context *ctx, resume_job *j, long from, long to, double *lrs) {
    for (j->step = from; j->step < to; j->step++) {
        ddp_result r;
        if (j->step == 3) CHECK_OK(ddp_set_lr(ctx, 0.03), ctx);
        lrs[j->step] = ddp_get_lr(ctx);
        r = ddp_train_step(ctx, resume_fb, j, 2, NULL);
        CHECK(r == DDP_SUCCESS, "step %ld: %s", j->step, ddp_last_error(ctx));
    }
}

static void resume_case(const char *name, const ddp_schedule_desc *sd) {
    enum { T = 14, T1 = 6 };
    char path[256];
    const char *port = getenv("MASTER_PORT");
    ddp_context *a, *b;
    resume_job ja, jb;
    double lra[T], lrb[T];
    unsigned char pa[(NW + NOUT) * 4], pb[(NW + NOUT) * 4];
    int s, same_lr = 1;
    TEST(name);
    {   /* one path for every rank of this job (rank 0 writes, all read) */
        char name[64];
        snprintf(name, sizeof name, "ddp_test_resume_%s_%d.ckpt", port ? port : "0", (int)sd->type);
        t_temp_dir_path(path, sizeof path, name);
    }
    a = resume_model(sd, &ja);
    resume_steps(a, &ja, 0, T, lra);
    memcpy(pa, ddp_param_data(a, ja.idw), NW * 4);
    memcpy(pa + NW * 4, ddp_param_data(a, ja.idb), NOUT * 4);
    /* the interrupted run: T1 steps, save, a new context, load, the rest */
    b = resume_model(sd, &jb);
    resume_steps(b, &jb, 0, T1, lrb);
    CHECK_OK(ddp_save_checkpoint(b, path), b);
    ddp_destroy(b);
    b = resume_model(sd, &jb);
    CHECK_OK(ddp_load_checkpoint(b, path), b);
    CHECK(ddp_get_lr(b) == lra[T1] && ddp_loss_scale(b) != 256, "restored: lr %g (want %g), loss scale %g", ddp_get_lr(b), lra[T1], ddp_loss_scale(b));
    resume_steps(b, &jb, T1, T, lrb);
    memcpy(pb, ddp_param_data(b, jb.idw), NW * 4);
    memcpy(pb + NW * 4, ddp_param_data(b, jb.idb), NOUT * 4);
    for (s = 0; s < T; s++) same_lr &= lra[s] == lrb[s];
    CHECK(same_lr, "%s: the lr of every step is the same", name);
    CHECK(memcmp(pa, pb, sizeof pa) == 0, "%s: the resumed run is bit-identical to the uninterrupted one", name);
    CHECK(ddp_loss_scale(a) == ddp_loss_scale(b) && ddp_skipped_steps(a) == 2 && ddp_skipped_steps(b) == 2 &&
          ddp_optimizer_steps(a) == ddp_optimizer_steps(b),
          "%s: loss scale %g / %g, skipped %lld / %lld", name, ddp_loss_scale(a), ddp_loss_scale(b),
          (long long)ddp_skipped_steps(a), (long long)ddp_skipped_steps(b));
    if (g_rank == 0)
        printf("resume %-22s world=%d lr %.4g -> %.4g, bit-identical: %s\n", name, g_world, lra[0], lra[T - 1],
               memcmp(pa, pb, sizeof pa) == 0 ? "yes" : "no");
    ddp_destroy(a);
    ddp_destroy(b);
    if (g_rank == 0) remove(path);
}

static void mode_resume(void) {
    static const ddp_schedule_desc cases[] = {
        { DDP_SCHEDULE_CONSTANT, 2, 0, 0, 0, 0 },
        { DDP_SCHEDULE_COSINE, 3, 12, 0.001, 0, 0 },
        { DDP_SCHEDULE_LINEAR, 2, 10, 0.002, 0, 0 },
        { DDP_SCHEDULE_STEP, 1, 0, 0, 3, 0.5 },
    };
    static const char *names[] = { "warmup + constant", "warmup + cosine", "warmup + linear", "warmup + step decay" };
    int k;
    for (k = 0; k < 4; k++) resume_case(names[k], &cases[k]);
}

/* ---- uneven inputs (join) ------------------------------------------------------------ */

static int batches_of(int rank) {
    static const int n3[] = { 10, 7, 3 }, n4[] = { 10, 7, 3, 0 }, n2[] = { 10, 7 };
    if (g_world == 1) return 5;
    if (g_world == 2) return n2[rank];
    if (g_world == 3) return n3[rank];
    return n4[rank];
}

static double loss_rows(const double *W, const double *b, long row0, int n) {
    double l = 0;
    int r, o, k;
    for (r = 0; r < n; r++)
        for (o = 0; o < NOUT; o++) {
            double y = b[o];
            for (k = 0; k < NIN; k++) y += W[o * NIN + k] * xval(row0 + r, k);
            l += 0.5 * (y - tval(row0 + r, o)) * (y - tval(row0 + r, o)) / n;
        }
    return l;
}

/* rank r's rows for micro-step m of its step t (phase 1 ranks up to 10 steps) */
static long join_row(int phase, long t, int m, int r) { return (((phase * 16 + t) * 2 + m) * MAXW + r) * ROWS; }

typedef struct join_job { int idw, idb, phase; long t; int micro; } join_job;

static int join_fb(ddp_context *ctx, void *user, int m, float *loss) {
    join_job *j = (join_job *)user;
    double W[NW], b[NOUT];
    const float *pw = (const float *)ddp_param_data(ctx, j->idw), *pb = (const float *)ddp_param_data(ctx, j->idb);
    int k;
    for (k = 0; k < NW; k++) W[k] = pw[k];
    for (k = 0; k < NOUT; k++) b[k] = pb[k];
    *loss = (float)loss_rows(W, b, join_row(j->phase, j->t, m, g_rank), ROWS);
    return backward(ctx, j->idw, j->idb, join_row(j->phase, j->t, m, g_rank), ROWS) == DDP_SUCCESS ? 0 : 1;
}

/* One step of every rank that has data, on the reference: the sum of their
   mean gradients over `micro` micro-steps, divided by the contributors (or
   the world), then AdamW. Returns the mean loss over contributors. */
static double join_ref_step(ref_opt *o, double *p, int phase, long t, int micro, int by_world, const int *has) {
    double g[NW + NOUT], acc[NW + NOUT], lr[NW + NOUT], wd[NW + NOUT], loss = 0;
    int q, m, i, n = 0;
    memset(acc, 0, sizeof acc);
    for (q = 0; q < g_world; q++) {
        if (!has[q]) continue;
        n++;
        for (m = 0; m < micro; m++) {
            grad_rows(p, p + NW, join_row(phase, t, m, q), ROWS, g, g + NW);
            loss += loss_rows(p, p + NW, join_row(phase, t, m, q), ROWS) / micro;
            for (i = 0; i < NW + NOUT; i++) acc[i] += g[i] / micro;
        }
    }
    for (i = 0; i < NW + NOUT; i++) { acc[i] /= by_world ? g_world : n; lr[i] = 0.01; wd[i] = 0.01; }
    ref_opt_step(o, p, acc, lr, wd);
    return loss / n;
}

static void join_case(int train_step, int by_world) {
    ddp_config c;
    ddp_context *ctx;
    join_job j;
    ref_opt ro;
    double p[NW + NOUT], worst_loss = 0, longest = 0, t0, d;
    float w[NW], b[NOUT];
    int mine = batches_of(g_rank), most = 0, q, i, has[MAXW];
    long t;
    char name[96];
    ddp_result r;
    snprintf(name, sizeof name, "join %s, %s", train_step ? "ddp_train_step(2)" : "manual steps",
             by_world ? "divide_by_initial_world_size" : "average over contributors");
    TEST(name);
    for (q = 0; q < g_world; q++) if (batches_of(q) > most) most = batches_of(q);
    memset(&c, 0, sizeof c);
    c.uneven_inputs = 1;
    c.join_divide_by_initial_world_size = by_world;
    c.optimizer = ddp_optimizer_defaults(DDP_OPTIM_ADAMW);
    c.optimizer.lr = 0.01;
    ctx = make_model(&c, &j.idw, &j.idb); /* timeout 30 s: a wait on the timeout would show */
    memset(&ro, 0, sizeof ro);
    ro.adamw = 1;
    init_weights(w, b);
    for (i = 0; i < NW; i++) p[i] = w[i];
    for (i = 0; i < NOUT; i++) p[NW + i] = b[i];
    j.phase = 0;
    j.micro = train_step ? 2 : 1;
    t0 = ddp__now();
    for (t = 0; t < mine; t++) {
        double s0 = ddp__now(), want;
        float loss = 0;
        for (q = 0; q < g_world; q++) has[q] = batches_of(q) > t;
        j.t = t;
        if (train_step) {
            r = ddp_train_step(ctx, join_fb, &j, 2, &loss);
        } else {
            float l;
            r = ddp_step_begin(ctx);
            if (r == DDP_SUCCESS) r = join_fb(ctx, &j, 0, &l) ? DDP_ERROR_USER : DDP_SUCCESS;
            if (r == DDP_SUCCESS) r = ddp_step_end(ctx);
            if (r == DDP_SUCCESS) r = ddp_optimizer_step(ctx);
        }
        CHECK(r == DDP_SUCCESS, "%s: rank %d step %ld: %s", name, g_rank, t, ddp_last_error(ctx));
        if (r != DDP_SUCCESS) { ddp_destroy(ctx); return; }
        if (ddp__now() - s0 > longest) longest = ddp__now() - s0;
        want = join_ref_step(&ro, p, 0, t, j.micro, by_world, has);
        if (train_step && fabs(loss - want) > worst_loss) worst_loss = fabs(loss - want);
        /* while a rank has joined, other collectives are refused at once */
        if (t == 5 && g_world >= 3) {
            float x = 1;
            r = ddp_allreduce(ctx, &x, 1, DDP_F32, DDP_OP_SUM);
            CHECK(r == DDP_ERROR_INVALID_STATE && strstr(ddp_last_error(ctx), "rank(s) 2") && strstr(ddp_last_error(ctx), " joined"), "a collective while rank 2 is out: %s: %s",
                  ddp_result_string(r), ddp_last_error(ctx));
        }
    }
    /* the reference runs the steps of the ranks that had more */
    for (t = mine; t < most; t++) {
        for (q = 0; q < g_world; q++) has[q] = batches_of(q) > t;
        join_ref_step(&ro, p, 0, t, j.micro, by_world, has);
    }
    r = ddp_join(ctx);
    CHECK(r == DDP_SUCCESS, "%s: ddp_join: %s", name, ddp_last_error(ctx));
    d = rel_diff((const float *)ddp_param_data(ctx, j.idw), (const float *)ddp_param_data(ctx, j.idb), p, p + NW);
    CHECK(d <= 1e-5, "%s: rank %d (%d batches) ends %.3g from the reference", name, g_rank, mine, d);
    CHECK(worst_loss <= 1e-5, "%s: the loss is the mean over the ranks with data (off by %.3g)", name, worst_loss);
    CHECK(longest < 5.0 && ddp__now() - t0 < 15.0, "no step waits long: longest %.2f s, all %.2f s (timeout 30 s)", longest, ddp__now() - t0);
    CHECK(ddp_optimizer_steps(ctx) == most, "every rank has the training state of the last ones: %lld steps", (long long)ddp_optimizer_steps(ctx));
    /* afterwards: collectives work, and the next epoch has every rank again */
    {
        float x = (float)(g_rank + 1);
        CHECK_OK(ddp_allreduce(ctx, &x, 1, DDP_F32, DDP_OP_SUM), ctx);
        CHECK(x == (float)(g_world * (g_world + 1) / 2), "all-reduce after the join: %g", (double)x);
    }
    j.phase = 1;
    for (t = 0; t < 2; t++) {
        for (q = 0; q < g_world; q++) has[q] = 1;
        j.t = t;
        CHECK_OK(ddp_train_step(ctx, join_fb, &j, j.micro, NULL), ctx);
        join_ref_step(&ro, p, 1, t, j.micro, by_world, has);
    }
    d = rel_diff((const float *)ddp_param_data(ctx, j.idw), (const float *)ddp_param_data(ctx, j.idb), p, p + NW);
    CHECK(d <= 1e-5, "%s: the next epoch, every rank again: %.3g from the reference", name, d);
    if (g_rank == 0) printf("%-60s world=%d diff=%.2g longest_step=%.3fs\n", name, g_world, d, longest);
    ddp_destroy(ctx);
}

static void mode_join(void) {
    join_case(1, 0);
    join_case(0, 0);
    join_case(1, 1);
}

/* ---- against PyTorch (tests/torch_compare.py replays these runs) -------------------- */

/* The runs: optimizer, schedule, groups (fc.weight at half the lr, fc.bias
   without weight decay), f32 and f64. Keep in step with torch_compare.py. */
typedef struct torch_case { const char *name; ddp_optimizer opt; ddp_dtype dt; } torch_case;
static const torch_case torch_cases[] = {
    { "adamw clip warmup+cosine f32", DDP_OPTIM_ADAMW, DDP_F32 },
    { "adamw clip warmup+cosine f64", DDP_OPTIM_ADAMW, DDP_F64 },
    { "sgd nesterov warmup+step f32", DDP_OPTIM_SGD, DDP_F32 },
    { "sgd nesterov warmup+step f64", DDP_OPTIM_SGD, DDP_F64 },
};

typedef struct torch_job { int idw, idb; ddp_dtype dt; long step; } torch_job;

static int torch_fb(ddp_context *ctx, void *user, int m, float *loss) {
    torch_job *j = (torch_job *)user;
    double W[NW], b[NOUT], gw[NW], gb[NOUT];
    int k;
    (void)m;
    for (k = 0; k < NW; k++) W[k] = j->dt == DDP_F64 ? ((double *)ddp_param_data(ctx, j->idw))[k] : ((float *)ddp_param_data(ctx, j->idw))[k];
    for (k = 0; k < NOUT; k++) b[k] = j->dt == DDP_F64 ? ((double *)ddp_param_data(ctx, j->idb))[k] : ((float *)ddp_param_data(ctx, j->idb))[k];
    grad_rows(W, b, (j->step * g_world + g_rank) * ROWS, ROWS, gw, gb);
    for (k = 0; k < NOUT; k++) {
        if (j->dt == DDP_F64) ((double *)ddp_param_grad(ctx, j->idb))[k] += gb[k];
        else ((float *)ddp_param_grad(ctx, j->idb))[k] += (float)gb[k];
    }
    if (ddp_mark_ready(ctx, j->idb) != DDP_SUCCESS) return 1;
    for (k = 0; k < NW; k++) {
        if (j->dt == DDP_F64) ((double *)ddp_param_grad(ctx, j->idw))[k] += gw[k];
        else ((float *)ddp_param_grad(ctx, j->idw))[k] += (float)gw[k];
    }
    *loss = 0;
    return ddp_mark_ready(ctx, j->idw) == DDP_SUCCESS ? 0 : 1;
}

static void mode_torch(const char *dump) {
    FILE *f = NULL;
    size_t k;
    TEST("torch runs");
    if (g_rank == 0 && !(f = fopen(dump, "wb"))) { fprintf(stderr, "cannot write %s\n", dump); exit(2); }
    for (k = 0; k < sizeof torch_cases / sizeof torch_cases[0]; k++) {
        const torch_case *tc = &torch_cases[k];
        ddp_config c;
        ddp_context *ctx;
        ddp_param_options o;
        torch_job j;
        float w32[NW], b32[NOUT];
        double w64[NW], b64[NOUT], out[NW + NOUT];
        int64_t shape[2] = { NOUT, NIN };
        int i;
        memset(&c, 0, sizeof c);
        c.timeout_s = 30;
        c.optimizer = ddp_optimizer_defaults(tc->opt);
        if (tc->opt == DDP_OPTIM_ADAMW) {
            c.optimizer.lr = 0.05;
            c.optimizer.weight_decay = 0.1;
            c.optimizer.max_grad_norm = 0.5;
            c.schedule.type = DDP_SCHEDULE_COSINE;
            c.schedule.warmup_steps = 3;
            c.schedule.total_steps = 12;
            c.schedule.min_lr = 0.005;
        } else {
            c.optimizer.lr = 0.1;
            c.optimizer.momentum = 0.9;
            c.optimizer.nesterov = 1;
            c.optimizer.weight_decay = 0.01;
            c.schedule.type = DDP_SCHEDULE_STEP;
            c.schedule.warmup_steps = 2;
            c.schedule.step_size = 4;
            c.schedule.gamma = 0.5;
        }
        if (ddp_create(&c, &ctx) != DDP_SUCCESS) { fprintf(stderr, "%s\n", ddp_create_error()); exit(2); }
        init_weights(w32, b32);
        for (i = 0; i < NW; i++) w64[i] = w32[i];
        for (i = 0; i < NOUT; i++) b64[i] = b32[i];
        ddp_register_param_shape(ctx, "fc.weight", 2, shape, tc->dt, tc->dt == DDP_F64 ? (void *)w64 : (void *)w32, &j.idw);
        ddp_register_param(ctx, "fc.bias", NOUT, tc->dt, tc->dt == DDP_F64 ? (void *)b64 : (void *)b32, &j.idb);
        memset(&o, 0, sizeof o);
        o.lr_scale = 0.5;
        ddp_set_param_options(ctx, j.idw, &o);
        memset(&o, 0, sizeof o);
        o.no_weight_decay = 1;
        ddp_set_param_options(ctx, j.idb, &o);
        if (ddp_finalize(ctx) != DDP_SUCCESS) { fprintf(stderr, "%s\n", ddp_last_error(ctx)); exit(2); }
        j.dt = tc->dt;
        for (j.step = 0; j.step < 14; j.step++) CHECK_OK(ddp_train_step(ctx, torch_fb, &j, 1, NULL), ctx);
        for (i = 0; i < NW; i++) out[i] = tc->dt == DDP_F64 ? ((double *)ddp_param_data(ctx, j.idw))[i] : ((float *)ddp_param_data(ctx, j.idw))[i];
        for (i = 0; i < NOUT; i++) out[NW + i] = tc->dt == DDP_F64 ? ((double *)ddp_param_data(ctx, j.idb))[i] : ((float *)ddp_param_data(ctx, j.idb))[i];
        if (f) fwrite(out, sizeof out[0], NW + NOUT, f);
        ddp_destroy(ctx);
    }
    if (f) fclose(f);
}

/* ---- main -------------------------------------------------------------------------- */

static void identity(void) {
    /* rank and world from the launcher's environment, as every mode's contexts use */
    const char *r = getenv("RANK"), *w = getenv("WORLD_SIZE");
    g_rank = r ? atoi(r) : 0;
    g_world = w ? atoi(w) : 1;
    if (g_world < 1 || g_world > MAXW) { fprintf(stderr, "test_train: a world of 1..%d ranks\n", MAXW); exit(2); }
}

int main(int argc, char **argv) {
    char suite[64];
    if (argc < 2) { fprintf(stderr, "usage: test_train accum|groups|scaler|resume|join|torch FILE\n"); return 2; }
    identity();
    if (!strcmp(argv[1], "accum")) mode_accum();
    else if (!strcmp(argv[1], "groups")) mode_groups();
    else if (!strcmp(argv[1], "scaler")) mode_scaler();
    else if (!strcmp(argv[1], "resume")) mode_resume();
    else if (!strcmp(argv[1], "join")) mode_join();
    else if (!strcmp(argv[1], "torch") && argc == 3) mode_torch(argv[2]);
    else { fprintf(stderr, "test_train: unknown mode '%s'\n", argv[1]); return 2; }
    snprintf(suite, sizeof suite, "test_train %s rank %d", argv[1], g_rank);
    return t_summary(suite);
}
