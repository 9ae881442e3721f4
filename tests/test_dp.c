/* dp.h on CPU replicas (threads): the DESIGN.md property with uneven splits,
   bitwise-identical replicas, a failing callback on one replica, bad input;
   and with --dump, the weights after the same run test_equiv does, for the
   dp-vs-ddp comparison (tests/dp_vs_ddp.sh). */
#define DP_IMPLEMENTATION
#include "../dp.h"
#define MLP_IMPLEMENTATION
#define MLP_NO_ZLIB
#include "../examples/mlp.h"
#include "testing.h"

typedef struct model {
    mlp_shape shape;
    mlp_workspace ws[DP_MAX_DEVICES];
    int fail_replica;      /* -1: none */
} model;

static void on_ready(int p, void *user) { ddp_mark_ready((ddp_context *)user, p); }

static int fb(const dp_replica *r, void *user, float *loss) {
    model *m = (model *)user;
    float *params[MLP_MAX_PARAMS], *grads[MLP_MAX_PARAMS];
    int p;
    if (r->index == m->fail_replica) return 42;
    for (p = 0; p < mlp_num_params(&m->shape); p++) {
        params[p] = (float *)ddp_param_data(r->ctx, p);
        grads[p] = (float *)ddp_param_grad(r->ctx, p);
    }
    *loss = mlp_forward_backward(params, (const float *)r->input, (const uint8_t *)r->labels, r->rows, r->grad_scale,
                                 grads, &m->ws[r->index], NULL, on_ready, r->ctx) / (r->grad_scale > 0 ? r->grad_scale : 1);
    return 0;
}

static void set_optim(ddp_config *c, int adamw) {
    memset(c, 0, sizeof *c);
    c->timeout_s = 20;
    c->first_bucket_bytes = 512;
    c->bucket_bytes = 1024;
    if (adamw) { c->optimizer.type = DDP_OPTIM_ADAMW; c->optimizer.lr = 0.01f; c->optimizer.weight_decay = 0.01f; }
    else { c->optimizer.type = DDP_OPTIM_SGD; c->optimizer.lr = 0.1f; c->optimizer.momentum = 0.9f; c->optimizer.nesterov = 1; c->optimizer.weight_decay = 1e-3f; }
}

static int g_groups; /* 1: biases without weight decay, the first layer at half the lr */

static dp_context *make_dp(int K, int adamw, const mlp_shape *s, float *const *init) {
    dp_config c;
    dp_context *dp;
    int p, id;
    memset(&c, 0, sizeof c);
    c.num_devices = K;
    c.device = DDP_DEVICE_CPU;
    set_optim(&c.ddp, adamw);
    if (dp_create(&c, &dp) != DDP_SUCCESS) { fprintf(stderr, "dp_create: %s\n", ddp_create_error()); exit(2); }
    for (p = 0; p < mlp_num_params(s); p++) {
        char name[32];
        mlp_param_name(p, name, sizeof name);
        dp_register_param(dp, name, mlp_param_numel(s, p), DDP_F32, init[p], &id);
        if (g_groups) {
            ddp_param_options o;
            memset(&o, 0, sizeof o);
            o.no_weight_decay = p & 1;
            o.lr_scale = p < 2 ? 0.5 : 1.0;
            if (dp_set_param_options(dp, id, &o) != DDP_SUCCESS) { fprintf(stderr, "%s\n", dp_last_error(dp)); exit(2); }
        }
    }
    if (dp_finalize(dp) != DDP_SUCCESS) { fprintf(stderr, "dp_finalize: %s\n", dp_last_error(dp)); exit(2); }
    return dp;
}

/* K replicas, batch of B rows per step (uneven when B % K != 0), vs one replica */
static void check_equivalence(int K, int B, int adamw, int steps) {
    mlp_shape shape;
    mlp_dataset data;
    float *init[MLP_MAX_PARAMS];
    model m, m1;
    dp_context *dp, *one;
    int p, s, i, same = 0;
    double maxdiff = 0, maxref = 0;
    float loss = 0, loss1 = 0, losses[DP_MAX_DEVICES];
    char name[64];
    snprintf(name, sizeof name, "dp K=%d B=%d %s%s", K, B, adamw ? "adamw" : "sgd", g_groups ? " groups" : "");
    TEST(name);
    mlp_shape_parse("20,16,12,5", &shape);
    for (p = 0; p < mlp_num_params(&shape); p++) init[p] = (float *)malloc(mlp_param_numel(&shape, p) * sizeof(float));
    mlp_init_params(&shape, 1234, init);
    mlp_synthetic(&data, steps * B, 20, 5, 7);
    memset(&m, 0, sizeof m); memset(&m1, 0, sizeof m1);
    m.shape = m1.shape = shape;
    m.fail_replica = m1.fail_replica = -1;
    for (i = 0; i < K; i++) mlp_workspace_init(&m.ws[i], &shape, B);
    mlp_workspace_init(&m1.ws[0], &shape, B);
    dp = make_dp(K, adamw, &shape, init);
    one = make_dp(1, adamw, &shape, init);
    for (s = 0; s < steps; s++) {
        dp_batch b;
        memset(&b, 0, sizeof b);
        b.input = data.x + (size_t)s * B * 20; b.input_row_bytes = 20 * sizeof(float); b.rows = B;
        b.labels = data.y + (size_t)s * B; b.labels_row_bytes = 1;
        CHECK_OK(dp_step(dp, &b, fb, &m, &loss, losses), NULL);
        CHECK_OK(dp_step(one, &b, fb, &m1, &loss1, NULL), NULL);
        CHECK(fabsf(loss - loss1) <= 1e-5f * fabsf(loss1), "step %d: batch loss %g vs single replica %g", s, (double)loss, (double)loss1);
    }
    for (p = 0; p < mlp_num_params(&shape); p++) {
        const float *a = (const float *)ddp_param_data(dp_replica_context(dp, K - 1), p);
        const float *r = (const float *)ddp_param_data(dp_replica_context(one, 0), p);
        for (i = 0; i < (int)mlp_param_numel(&shape, p); i++) {
            double d = fabs((double)a[i] - r[i]);
            if (d > maxdiff || d != d) maxdiff = d != d ? 1e30 : d;
            if (fabs(r[i]) > maxref) maxref = fabs(r[i]);
        }
    }
    CHECK(maxdiff / maxref <= 1e-5, "max relative difference %.3g", maxdiff / maxref);
    CHECK_OK(dp_check_replicas(dp, &same), NULL);
    CHECK(same == 1, "replicas bitwise identical");
    printf("%s: max_rel_diff=%.3g identical=%d\n", name, maxdiff / maxref, same);
    dp_destroy(dp);
    dp_destroy(one);
    for (i = 0; i < K; i++) mlp_workspace_free(&m.ws[i]);
    mlp_workspace_free(&m1.ws[0]);
    for (p = 0; p < mlp_num_params(&shape); p++) free(init[p]);
    mlp_dataset_free(&data);
}

static void check_failure(void) {
    mlp_shape shape;
    mlp_dataset data;
    float *init[MLP_MAX_PARAMS];
    model m;
    dp_context *dp;
    dp_batch b;
    int p, i;
    ddp_result r;
    double t0;
    TEST("dp failing callback");
    mlp_shape_parse("20,16,12,5", &shape);
    for (p = 0; p < mlp_num_params(&shape); p++) init[p] = (float *)calloc(mlp_param_numel(&shape, p), sizeof(float));
    mlp_synthetic(&data, 12, 20, 5, 7);
    memset(&m, 0, sizeof m);
    m.shape = shape;
    m.fail_replica = 1;
    for (i = 0; i < 3; i++) mlp_workspace_init(&m.ws[i], &shape, 12);
    dp = make_dp(3, 0, &shape, init);
    memset(&b, 0, sizeof b);
    b.input = data.x; b.input_row_bytes = 20 * sizeof(float); b.rows = 12; b.labels = data.y; b.labels_row_bytes = 1;
    t0 = ddp__now();
    r = dp_step(dp, &b, fb, &m, NULL, NULL);
    CHECK(r == DDP_ERROR_USER, "got %s: %s", ddp_result_string(r), dp_last_error(dp));
    CHECK(strstr(dp_last_error(dp), "replica 1") && strstr(dp_last_error(dp), "returned 42"), "message: %s", dp_last_error(dp));
    CHECK(ddp__now() - t0 < 5, "no hang: %.1f s", ddp__now() - t0);
    m.fail_replica = -1;
    r = dp_step(dp, &b, fb, &m, NULL, NULL);
    CHECK(r == DDP_ERROR_INVALID_STATE && strstr(dp_last_error(dp), "broken"), "after a failure: %s: %s", ddp_result_string(r), dp_last_error(dp));
    /* every later refusal names the failure that broke it, once */
    (void)dp_zero_grad(dp);
    r = dp_step(dp, &b, fb, &m, NULL, NULL);
    {
        const char *e = dp_last_error(dp), *first = strstr(e, "broken");
        CHECK(r == DDP_ERROR_INVALID_STATE && strstr(e, "replica 1") && strstr(e, "returned 42") && first && !strstr(first + 1, "broken"),
              "the cause, once: %s", e);
    }
    dp_destroy(dp);
    for (i = 0; i < 3; i++) mlp_workspace_free(&m.ws[i]);
    for (p = 0; p < mlp_num_params(&shape); p++) free(init[p]);
    mlp_dataset_free(&data);
}

/* loss scaling through c.ddp: a replica's inf skips the step on every replica */
typedef struct ls_model { int bad_step, step; } ls_model;
static int ls_fb(const dp_replica *r, void *user, float *loss) {
    ls_model *m = (ls_model *)user;
    float *g = (float *)ddp_param_grad(r->ctx, 0), *w = (float *)ddp_param_data(r->ctx, 0);
    float S = (float)ddp_loss_scale(r->ctx);
    int i;
    for (i = 0; i < 8; i++) g[i] += S * (w[i] - (float)(r->index + i));
    if (m->step == m->bad_step && r->index == 1) g[3] = 1.0f / 0.0f;
    *loss = 0;
    return ddp_mark_ready(r->ctx, 0) == DDP_SUCCESS ? 0 : 1;
}

static void check_loss_scale(void) {
    dp_config c;
    dp_context *dp;
    ls_model m;
    int id, i, same = 0;
    TEST("dp loss scaling");
    memset(&c, 0, sizeof c);
    c.num_devices = 3;
    c.device = DDP_DEVICE_CPU;
    c.ddp.timeout_s = 20;
    c.ddp.optimizer = ddp_optimizer_defaults(DDP_OPTIM_SGD);
    c.ddp.optimizer.lr = 0.1;
    c.ddp.loss_scale.enabled = 1;
    c.ddp.loss_scale.init_scale = 256;
    CHECK_OK(dp_create(&c, &dp), NULL);
    dp_register_param(dp, "w", 8, DDP_F32, NULL, &id);
    CHECK_OK(dp_finalize(dp), NULL);
    m.bad_step = 1;
    for (m.step = 0; m.step < 3; m.step++) {
        CHECK_OK(dp_step(dp, NULL, ls_fb, &m, NULL, NULL), NULL);
        for (i = 0; i < 3; i++) {
            ddp_context *r = dp_replica_context(dp, i);
            CHECK(ddp_last_step_skipped(r) == (m.step == 1), "step %d replica %d: skipped %d", m.step, i, ddp_last_step_skipped(r));
            CHECK(ddp_loss_scale(r) == (m.step == 0 ? 256 : 128), "step %d replica %d: scale %g", m.step, i, ddp_loss_scale(r));
        }
    }
    CHECK_OK(dp_check_replicas(dp, &same), NULL);
    CHECK(same == 1, "replicas identical");
    CHECK(ddp_optimizer_steps(dp_replica_context(dp, 0)) == 2, "2 steps taken");
    dp_destroy(dp);
}

static void check_bad_input(void) {
    dp_config c;
    dp_context *dp = NULL;
    int id;
    TEST("dp bad input");
    memset(&c, 0, sizeof c);
    CHECK_ERR(dp_create(&c, NULL), DDP_ERROR_INVALID_ARGUMENT, NULL, "out is NULL");
    CHECK_ERR(dp_create(NULL, &dp), DDP_ERROR_INVALID_ARGUMENT, NULL, "config is NULL");
    c.num_devices = -1;
    CHECK_ERR(dp_create(&c, &dp), DDP_ERROR_INVALID_ARGUMENT, NULL, "num_devices -1");
    c.num_devices = 3; c.device = DDP_DEVICE_CPU;
    {   /* create and destroy at once: no waiting for the rendezvous store */
        double t0 = ddp__now();
        CHECK_OK(dp_create(&c, &dp), NULL);
        dp_destroy(dp);
        CHECK(ddp__now() - t0 < 3, "create + destroy took %.1f s", ddp__now() - t0);
    }
    c.num_devices = 2;
    CHECK_OK(dp_create(&c, &dp), NULL);
    CHECK(dp_register_param(dp, "w", 0, DDP_F32, NULL, &id) == DDP_ERROR_INVALID_ARGUMENT && strstr(dp_last_error(dp), "'w' has 0"), "zero count: %s", dp_last_error(dp));
    CHECK(dp_finalize(dp) == DDP_ERROR_INVALID_STATE, "finalize without parameters");
    CHECK(dp_step(dp, NULL, fb, NULL, NULL, NULL) == DDP_ERROR_INVALID_STATE, "step before finalize");
    dp_register_param(dp, "w", 4, DDP_F32, NULL, &id);
    CHECK_OK(dp_finalize(dp), NULL);
    CHECK(dp_step(dp, NULL, NULL, NULL, NULL, NULL) == DDP_ERROR_INVALID_ARGUMENT, "NULL fn");
    {   /* an empty batch is a mistake, not a step that only decays the weights */
        static const float x[4] = { 1, 2, 3, 4 };
        dp_batch b;
        memset(&b, 0, sizeof b);
        b.input = x; b.input_row_bytes = sizeof x; b.rows = 0;
        CHECK(dp_step(dp, &b, fb, NULL, NULL, NULL) == DDP_ERROR_INVALID_ARGUMENT && strstr(dp_last_error(dp), "0 rows"),
              "a batch of 0 rows: %s", dp_last_error(dp));
        b.rows = -2;
        CHECK(dp_step(dp, &b, fb, NULL, NULL, NULL) == DDP_ERROR_INVALID_ARGUMENT && strstr(dp_last_error(dp), "-2 rows"),
              "a batch of -2 rows: %s", dp_last_error(dp));
    }
    dp_destroy(dp);
}

/* The run test_equiv makes (5 steps, 6 rows per replica, even split), for
   comparison with ddp.h processes. */
static int dump_run(int K, const char *path) {
    mlp_shape shape;
    mlp_dataset data;
    float *init[MLP_MAX_PARAMS];
    model m;
    dp_context *dp;
    int p, s, i, rows = 6, steps = 5;
    FILE *f;
    mlp_shape_parse("20,16,12,5", &shape);
    for (p = 0; p < mlp_num_params(&shape); p++) init[p] = (float *)malloc(mlp_param_numel(&shape, p) * sizeof(float));
    mlp_init_params(&shape, 1234, init);
    mlp_synthetic(&data, steps * K * rows, 20, 5, 99);
    memset(&m, 0, sizeof m);
    m.shape = shape;
    m.fail_replica = -1;
    for (i = 0; i < K; i++) mlp_workspace_init(&m.ws[i], &shape, rows);
    dp = make_dp(K, 0, &shape, init);
    for (s = 0; s < steps; s++) {
        dp_batch b;
        memset(&b, 0, sizeof b);
        b.input = data.x + (size_t)s * K * rows * 20; b.input_row_bytes = 20 * sizeof(float); b.rows = K * rows;
        b.labels = data.y + (size_t)s * K * rows; b.labels_row_bytes = 1;
        if (dp_step(dp, &b, fb, &m, NULL, NULL) != DDP_SUCCESS) { fprintf(stderr, "%s\n", dp_last_error(dp)); return 1; }
    }
    f = fopen(path, "wb");
    if (!f) return 1;
    for (p = 0; p < mlp_num_params(&shape); p++)
        fwrite(ddp_param_data(dp_replica_context(dp, 0), p), sizeof(float), mlp_param_numel(&shape, p), f);
    fclose(f);
    dp_destroy(dp);
    for (i = 0; i < K; i++) mlp_workspace_free(&m.ws[i]);
    for (p = 0; p < mlp_num_params(&shape); p++) free(init[p]);
    mlp_dataset_free(&data);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 4 && !strcmp(argv[1], "--dump")) return dump_run(atoi(argv[2]), argv[3]);
    check_bad_input();
    check_equivalence(1, 12, 0, 4);
    check_equivalence(2, 12, 0, 4);
    check_equivalence(3, 10, 0, 4);   /* 4, 3, 3 rows */
    check_equivalence(3, 10, 1, 4);
    check_equivalence(2, 7, 1, 3);    /* 4, 3 rows */
    check_equivalence(4, 3, 0, 3);    /* 1, 1, 1, 0 rows: an empty replica still takes part */
    g_groups = 1;                     /* parameter groups through dp_set_param_options */
    check_equivalence(3, 10, 1, 4);
    check_equivalence(2, 8, 0, 3);
    g_groups = 0;
    check_failure();
    check_loss_scale();
    return t_summary("test_dp");
}
