/* ZeRO-1 (config.zero_stage = 1) against the unsharded optimizer, on N
   ranks under the launcher:

       ddprun -n N test_zero equiv          every case twice, unsharded and
                                            sharded: the weights after K
                                            steps are the same bits, and so
                                            are the checkpoint files
       ddprun -n N test_zero save DIR       (resume test) K steps of each
                                            case with ZeRO-1 and without,
                                            saved to DIR: the files agree
       ddprun -n M test_zero resume DIR     both files loaded at another
                                            world size M, sharded and not,
                                            K more steps: the same bits

   The model has parameters of several sizes and types (f32, f64, bf16)
   in several buckets, so that shards cut through parameters and buckets.
   The gradient of step s on rank r is a fixed function of the weights,
   s and r: any difference in the weights shows in the next gradients.
   Each rank checks itself and exits non-zero on a failure. */
#define DDP_IMPLEMENTATION
#include "../ddp.h"
#include "testing.h"
#include <math.h>

static int g_rank, g_world;

enum { NP = 6, K = 6 };
static const size_t sizes[NP] = { 1000, 37, 2500, 7, 513, 300 };
static const ddp_dtype types[NP] = { DDP_F32, DDP_F32, DDP_F32, DDP_F64, DDP_BF16, DDP_F32 };

typedef enum { ACC_NONE, ACC_TRAIN3, ACC_MIXED } acc_mode;

typedef struct zcase {
    const char *name;
    ddp_optimizer opt;
    acc_mode acc;
    double clip;
    int scaling;        /* loss scaling, an inf on the last rank at step 2 */
    int groups;         /* parameter groups and a warmup + cosine schedule */
    int mixed_types;    /* f64 and bf16 parameters too */
} zcase;

static const zcase cases[] = {
    { "sgd", DDP_OPTIM_SGD, ACC_NONE, 0, 0, 0, 0 },
    { "adamw", DDP_OPTIM_ADAMW, ACC_NONE, 0, 0, 0, 0 },
    { "sgd accum (train_step 3)", DDP_OPTIM_SGD, ACC_TRAIN3, 0, 0, 0, 0 },
    { "adamw accum (synced, no_sync, synced)", DDP_OPTIM_ADAMW, ACC_MIXED, 0, 0, 0, 0 },
    { "sgd clip", DDP_OPTIM_SGD, ACC_NONE, 0.05, 0, 0, 0 },
    { "adamw clip accum", DDP_OPTIM_ADAMW, ACC_TRAIN3, 0.05, 0, 0, 0 },
    { "adamw groups schedule f64 bf16", DDP_OPTIM_ADAMW, ACC_NONE, 0.5, 0, 1, 1 },
    { "sgd scaling clip f64 bf16", DDP_OPTIM_SGD, ACC_MIXED, 0.5, 1, 0, 1 },
};
#define NCASES ((int)(sizeof cases / sizeof cases[0]))

static double target(int step, int rank, int p, size_t i) {
    return sin(0.37 * (double)i + 0.9 * step + 1.3 * rank + 0.5 * p) * 0.7;
}

typedef struct model { ddp_context *ctx; int id[NP]; const zcase *zc; int step; } model;

static double wval(model *m, int p, size_t i) {
    const void *w = ddp_param_data(m->ctx, m->id[p]);
    ddp_dtype t = m->zc->mixed_types ? types[p] : DDP_F32;
    if (t == DDP_F64) return ((const double *)w)[i];
    if (t == DDP_BF16) return ddp__bf16_to_f32(((const uint16_t *)w)[i]);
    return ((const float *)w)[i];
}

/* this rank's gradient of micro-step `micro` added in, parameters marked in reverse order */
static int backward(model *m, int micro) {
    int p;
    double S = ddp_loss_scale(m->ctx);
    for (p = NP - 1; p >= 0; p--) {
        ddp_dtype t = m->zc->mixed_types ? types[p] : DDP_F32;
        void *g = ddp_param_grad(m->ctx, m->id[p]);
        size_t i;
        for (i = 0; i < sizes[p]; i++) {
            double v = S * (wval(m, p, i) - target(m->step * 4 + micro, g_rank, p, i)) * (1.0 + 0.1 * p);
            if (m->zc->scaling && m->step == 2 && g_rank == g_world - 1 && p == 2 && i == 11) v = HUGE_VAL;
            if (t == DDP_F64) ((double *)g)[i] += v;
            else if (t == DDP_BF16) ((uint16_t *)g)[i] = ddp__f32_to_bf16(ddp__bf16_to_f32(((uint16_t *)g)[i]) + (float)v);
            else ((float *)g)[i] += (float)v;
        }
        if (ddp_mark_ready(m->ctx, m->id[p]) != DDP_SUCCESS) return 1;
    }
    return 0;
}

static int train_fb(ddp_context *ctx, void *user, int micro, float *loss) {
    (void)ctx;
    *loss = 0;
    return backward((model *)user, micro);
}

static ddp_result one_step(model *m) {
    ddp_result r = DDP_SUCCESS;
    if (m->zc->acc == ACC_TRAIN3) {
        r = ddp_train_step(m->ctx, train_fb, m, 3, NULL);
    } else {
        int k, n = m->zc->acc == ACC_MIXED ? 3 : 1;
        for (k = 0; k < n && r == DDP_SUCCESS; k++) {
            r = ddp_set_no_sync(m->ctx, m->zc->acc == ACC_MIXED && k == 1);
            if (r == DDP_SUCCESS) r = ddp_step_begin(m->ctx);
            if (r == DDP_SUCCESS && backward(m, k)) r = DDP_ERROR_USER;
            if (r == DDP_SUCCESS) r = ddp_step_end(m->ctx);
        }
        if (r == DDP_SUCCESS) r = ddp_optimizer_step(m->ctx);
    }
    m->step++;
    return r;
}

static void make(model *m, const zcase *zc, int zero) {
    ddp_config c;
    unsigned char *inits[NP];
    int p;
    memset(&c, 0, sizeof c);
    memset(m, 0, sizeof *m);
    m->zc = zc;
    c.timeout_s = 30;
    c.zero_stage = zero;
    c.first_bucket_bytes = 3000;  /* several buckets */
    c.bucket_bytes = 6000;
    c.optimizer = ddp_optimizer_defaults(zc->opt);
    c.optimizer.lr = zc->opt == DDP_OPTIM_SGD ? 0.05 : 0.02;
    if (zc->opt == DDP_OPTIM_SGD) { c.optimizer.momentum = 0.9; c.optimizer.weight_decay = 1e-3; }
    c.optimizer.max_grad_norm = zc->clip;
    if (zc->scaling) { c.loss_scale.enabled = 1; c.loss_scale.init_scale = 1024; c.loss_scale.growth_interval = 2; }
    if (zc->groups) {
        c.schedule.type = DDP_SCHEDULE_COSINE;
        c.schedule.warmup_steps = 2;
        c.schedule.total_steps = 10;
        c.schedule.min_lr = 1e-3;
    }
    if (ddp_create(&c, &m->ctx) != DDP_SUCCESS) { fprintf(stderr, "ddp_create: %s\n", ddp_create_error()); exit(2); }
    for (p = 0; p < NP; p++) {
        char name[32];
        ddp_dtype t = zc->mixed_types ? types[p] : DDP_F32;
        size_t i, es = ddp_dtype_size(t);
        unsigned char *init = inits[p] = (unsigned char *)malloc(sizes[p] * es); /* read at ddp_finalize */
        for (i = 0; i < sizes[p]; i++) {
            double v = cos(0.11 * (double)i + p) * 0.5;
            if (t == DDP_F64) ((double *)init)[i] = v;
            else if (t == DDP_BF16) ((uint16_t *)init)[i] = ddp__f32_to_bf16((float)v);
            else ((float *)init)[i] = (float)v;
        }
        snprintf(name, sizeof name, "layer%d.%s", p / 2, p % 2 ? "bias" : "weight");
        if (ddp_register_param(m->ctx, name, sizes[p], t, init, &m->id[p]) != DDP_SUCCESS) {
            fprintf(stderr, "register: %s\n", ddp_last_error(m->ctx));
            exit(2);
        }
        if (zc->groups && p % 2) {
            ddp_param_options o;
            memset(&o, 0, sizeof o);
            o.no_weight_decay = 1;
            o.lr_scale = 0.5;
            ddp_set_param_options(m->ctx, m->id[p], &o);
        }
    }
    if (ddp_finalize(m->ctx) != DDP_SUCCESS) { fprintf(stderr, "finalize: %s\n", ddp_last_error(m->ctx)); exit(2); }
    for (p = 0; p < NP; p++) free(inits[p]);
}

/* what a run leaves: the weights, its counters, its state bytes */
typedef struct result {
    unsigned char w[NP][2500 * 8];
    int64_t steps, skipped;
    double scale;
    size_t state_bytes;
    int buckets;
} result;

static int same_result(const result *a, const result *b, const zcase *zc) {
    int p, same = 1;
    for (p = 0; p < NP; p++)
        same &= memcmp(a->w[p], b->w[p], sizes[p] * ddp_dtype_size(zc->mixed_types ? types[p] : DDP_F32)) == 0;
    return same;
}

/* 1 if the files hold the same bytes */
static int same_file(const char *x, const char *y) {
    FILE *a = fopen(x, "rb"), *b = fopen(y, "rb");
    int same = a && b, ca, cb;
    while (same) {
        ca = fgetc(a);
        cb = fgetc(b);
        if (ca != cb) same = 0;
        if (ca == EOF || cb == EOF) break;
    }
    if (a) fclose(a);
    if (b) fclose(b);
    return same;
}

/* One context after the other (contexts on one port are made in turn):
   optionally load, n steps, optionally save; the result. */
static void run(const zcase *zc, int zero, const char *load, int first_step, int n, const char *save, result *out) {
    model m;
    int s, p;
    make(&m, zc, zero);
    if (load) {
        CHECK_OK(ddp_load_checkpoint(m.ctx, load), m.ctx);
        CHECK(ddp_optimizer_steps(m.ctx) > 0, "%s: the file holds steps", zc->name);
    }
    m.step = first_step;
    for (s = 0; s < n; s++) {
        ddp_result r = one_step(&m);
        CHECK(r == DDP_SUCCESS, "%s (zero_stage %d) step %d: %s", zc->name, zero, m.step, ddp_last_error(m.ctx));
        if (r != DDP_SUCCESS) exit(1);
    }
    for (p = 0; p < NP; p++)
        memcpy(out->w[p], ddp_param_data(m.ctx, m.id[p]), sizes[p] * ddp_dtype_size(zc->mixed_types ? types[p] : DDP_F32));
    out->steps = ddp_optimizer_steps(m.ctx);
    out->skipped = ddp_skipped_steps(m.ctx);
    out->scale = ddp_loss_scale(m.ctx);
    out->state_bytes = ddp_optimizer_state_bytes(m.ctx);
    out->buckets = ddp_bucket_count(m.ctx);
    if (save) CHECK_OK(ddp_save_checkpoint(m.ctx, save), m.ctx);
    ddp_destroy(m.ctx);
}

static result g_a, g_b;

static void mode_equiv(void) {
    int k;
    const char *port = getenv("MASTER_PORT");
    for (k = 0; k < NCASES; k++) {
        const zcase *zc = &cases[k];
        char pa[256], pb[256];
        size_t pad;
        int same;
        TEST(zc->name);
        char na[128], nb[128];
        snprintf(na, sizeof na, "ddp_test_zero_%s_%d_plain.ckpt", port ? port : "0", k);
        snprintf(nb, sizeof nb, "ddp_test_zero_%s_%d_zero.ckpt", port ? port : "0", k);
        t_temp_dir_path(pa, sizeof pa, na);
        t_temp_dir_path(pb, sizeof pb, nb);
        run(zc, 0, NULL, 0, K, pa, &g_a);
        run(zc, 1, NULL, 0, K, pb, &g_b);
        same = same_result(&g_a, &g_b, zc);
        CHECK(same, "%s: ZeRO-1 weights after %d steps are the unsharded ones, bit for bit (world %d)", zc->name, K, g_world);
        CHECK(g_a.steps == g_b.steps && g_a.skipped == g_b.skipped && g_a.scale == g_b.scale, "%s: counters", zc->name);
        if (zc->scaling) CHECK(g_b.skipped == 1, "%s: the inf on one rank skipped the step on all", zc->name);
        /* optimizer state: at most 1/world of the unsharded, plus padding
           (per storage bucket and state array: the shard's alignment to 256
           bytes and the bucket's padding to world * 256 bytes) */
        pad = (size_t)g_b.buckets * 3 * 1024;
        CHECK(g_a.state_bytes > 0 && g_b.state_bytes > 0 && g_b.state_bytes <= g_a.state_bytes / (size_t)g_world + pad,
              "%s: state bytes %zu sharded, %zu unsharded, world %d", zc->name, g_b.state_bytes, g_a.state_bytes, g_world);
        /* the checkpoint of the sharded run (the gathered state) is the unsharded one's, byte for byte */
        if (g_rank == 0) {
            CHECK(same_file(pa, pb), "%s: the ZeRO-1 checkpoint equals the unsharded one", zc->name);
            printf("zero %-40s world=%d bitwise=%s files_equal=%s state_bytes plain=%zu zero=%zu (%.3f)\n", zc->name, g_world,
                   same ? "yes" : "NO", same_file(pa, pb) ? "yes" : "NO", g_a.state_bytes, g_b.state_bytes,
                   (double)g_b.state_bytes / (double)g_a.state_bytes);
            remove(pa);
            remove(pb);
        }
    }
}

/* the cases the resume test runs: AdamW with accumulation, with groups and
   schedule and 16-bit parameters, SGD with loss scaling */
static const int resume_cases[] = { 3, 6, 7 };

static void mode_save(const char *dir) {
    size_t j;
    for (j = 0; j < sizeof resume_cases / sizeof resume_cases[0]; j++) {
        const zcase *zc = &cases[resume_cases[j]];
        char pa[512], pb[512];
        TEST(zc->name);
        snprintf(pa, sizeof pa, "%s/case%d_plain.ckpt", dir, resume_cases[j]);
        snprintf(pb, sizeof pb, "%s/case%d_zero.ckpt", dir, resume_cases[j]);
        run(zc, 0, NULL, 0, K, pa, &g_a);
        run(zc, 1, NULL, 0, K, pb, &g_b);
        if (g_rank == 0) {
            CHECK(same_file(pa, pb), "%s: saved at world %d, the files agree", zc->name, g_world);
            printf("zero save %-40s world=%d files_equal=%s\n", zc->name, g_world, same_file(pa, pb) ? "yes" : "NO");
        }
    }
}

static void mode_resume(const char *dir) {
    size_t j;
    for (j = 0; j < sizeof resume_cases / sizeof resume_cases[0]; j++) {
        const zcase *zc = &cases[resume_cases[j]];
        char pa[512], pb[512], qa[512], qb[512];
        int same;
        TEST(zc->name);
        snprintf(pa, sizeof pa, "%s/case%d_plain.ckpt", dir, resume_cases[j]);
        snprintf(pb, sizeof pb, "%s/case%d_zero.ckpt", dir, resume_cases[j]);
        snprintf(qa, sizeof qa, "%s/case%d_plain_w%d.ckpt", dir, resume_cases[j], g_world);
        snprintf(qb, sizeof qb, "%s/case%d_zero_w%d.ckpt", dir, resume_cases[j], g_world);
        /* crossed over: the unsharded run resumes the sharded run's file and vice versa */
        run(zc, 0, pb, K, K, qa, &g_a);
        run(zc, 1, pa, K, K, qb, &g_b);
        same = same_result(&g_a, &g_b, zc);
        CHECK(same, "%s: resumed at world %d with ZeRO-1, the unsharded run's bits", zc->name, g_world);
        if (g_rank == 0) {
            CHECK(same_file(qa, qb), "%s: saved again at world %d, the files agree", zc->name, g_world);
            printf("zero resume %-40s world=%d bitwise=%s files_equal=%s\n", zc->name, g_world, same ? "yes" : "NO",
                   same_file(qa, qb) ? "yes" : "NO");
            remove(qa);
            remove(qb);
        }
    }
}

/* wrong configurations are named */
static void mode_errors(void) {
    ddp_config c;
    ddp_context *ctx = NULL;
    TEST("errors");
    memset(&c, 0, sizeof c);
    c.zero_stage = 2;
    CHECK_ERR(ddp_create(&c, &ctx), DDP_ERROR_UNSUPPORTED, NULL, "config.zero_stage");
    c.zero_stage = 1;
    c.uneven_inputs = 1;
    CHECK_ERR(ddp_create(&c, &ctx), DDP_ERROR_UNSUPPORTED, NULL, "uneven_inputs");
    c.uneven_inputs = 0;
    t_setenv("DDP_ZERO_STAGE", "3");
    c.zero_stage = 0;
    CHECK_ERR(ddp_create(&c, &ctx), DDP_ERROR_ENVIRONMENT, NULL, "DDP_ZERO_STAGE");
    t_unsetenv("DDP_ZERO_STAGE");
    CHECK(ctx == NULL, "no context");
}

int main(int argc, char **argv) {
    const char *r = getenv("RANK"), *w = getenv("WORLD_SIZE");
    char suite[64];
    g_rank = r ? atoi(r) : 0;
    g_world = w ? atoi(w) : 1;
    if (argc < 2) { fprintf(stderr, "usage: test_zero equiv | save DIR | resume DIR | errors\n"); return 2; }
    if (!strcmp(argv[1], "equiv")) mode_equiv();
    else if (!strcmp(argv[1], "save") && argc == 3) mode_save(argv[2]);
    else if (!strcmp(argv[1], "resume") && argc == 3) mode_resume(argv[2]);
    else if (!strcmp(argv[1], "errors")) mode_errors();
    else { fprintf(stderr, "test_zero: unknown mode '%s'\n", argv[1]); return 2; }
    snprintf(suite, sizeof suite, "test_zero %s rank %d", argv[1], g_rank);
    return t_summary(suite);
}
