/* Single-process tests of ddp.h: configuration, the table of bad inputs,
   bucket assignment, ready tracking and launch order, optimizers against
   their formulas, accumulation, checkpoints. World size 1 unless noted. */
#define DDP_IMPLEMENTATION
#include "../ddp.h"
#include "testing.h"
#if defined(_WIN32)
#  include <aclapi.h>
#endif
#include <math.h>

static ddp_config base_config(void) {
    ddp_config c;
    memset(&c, 0, sizeof c);
    c.world_size = 1;
    c.timeout_s = 5;
    return c;
}

static ddp_context *make(const ddp_config *c) {
    ddp_context *ctx = NULL;
    ddp_result r = ddp_create(c, &ctx);
    if (r != DDP_SUCCESS) { fprintf(stderr, "ddp_create: %s: %s\n", ddp_result_string(r), ddp_create_error()); exit(2); }
    return ctx;
}

static void test_names(void) {
    TEST("names");
    CHECK(!strcmp(ddp_result_string(DDP_ERROR_TIMEOUT), "DDP_ERROR_TIMEOUT"), "timeout name");
    CHECK(!strcmp(ddp_result_string((ddp_result)-999), "DDP_ERROR_UNKNOWN"), "unknown code name");
    CHECK(ddp_dtype_size(DDP_F32) == 4 && ddp_dtype_size(DDP_F64) == 8 && ddp_dtype_size(DDP_BF16) == 2 &&
          ddp_dtype_size(DDP_F16) == 2 && ddp_dtype_size((ddp_dtype)77) == 0, "dtype sizes");
}

static void test_config(void) {
    ddp_config c = base_config(), q;
    ddp_context *ctx;
    TEST("config");
    c.first_bucket_bytes = 4096;
    ctx = make(&c);
    q = ddp_query_config(ctx);
    CHECK(q.first_bucket_bytes == 4096, "explicit value kept");
    CHECK(q.bucket_bytes == ((size_t)25 << 20), "default bucket cap is 25 MiB, got %zu", q.bucket_bytes);
    CHECK(q.timeout_s == 5, "timeout kept");
    CHECK(q.backend == DDP_BACKEND_SHM, "CPU build resolves to shm");
    CHECK(q.device == DDP_DEVICE_CPU, "CPU device");
    CHECK(q.optimizer.beta2 > 0.998f && q.optimizer.eps > 0, "AdamW defaults filled");
    CHECK(ddp_rank(ctx) == 0 && ddp_world_size(ctx) == 1 && ddp_local_rank(ctx) == 0, "identity");
    ddp_destroy(ctx);
    q = ddp_config_defaults(NULL);
    CHECK(q.first_bucket_bytes == ((size_t)1 << 20) && q.staging_bytes > 0, "defaults of a zero config");
}

static void clear_env(void) {
    static const char *vars[] = { "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                  "DDP_BACKEND", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE",
                                  "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE",
                                  "TORCHELASTIC_USE_AGENT_STORE", "DDP_TIMEOUT" };
    size_t i;
    for (i = 0; i < sizeof vars / sizeof vars[0]; i++) t_unsetenv(vars[i]);
}

/* ddp_create from the environment with the given variables set. */
static ddp_result create_env(const char *const *kv, ddp_context **out) {
    ddp_config c;
    int i;
    clear_env();
    for (i = 0; kv[i]; i += 2) t_setenv(kv[i], kv[i + 1]);
    memset(&c, 0, sizeof c);
    c.timeout_s = 1;
    *out = NULL;
    return ddp_create(&c, out);
}

static void test_bad_environment(void) {
    ddp_context *ctx = NULL;
    TEST("environment");
    { const char *kv[] = { "RANK", "abc", "WORLD_SIZE", "2", NULL };
      CHECK_ERR(create_env(kv, &ctx), DDP_ERROR_ENVIRONMENT, NULL, "RANK='abc'"); }
    { const char *kv[] = { "RANK", "0", "WORLD_SIZE", "2x", NULL };
      CHECK_ERR(create_env(kv, &ctx), DDP_ERROR_ENVIRONMENT, NULL, "WORLD_SIZE='2x'"); }
    { const char *kv[] = { "RANK", "0", "WORLD_SIZE", "0", NULL };
      CHECK_ERR(create_env(kv, &ctx), DDP_ERROR_ENVIRONMENT, NULL, "at least 1"); }
    { const char *kv[] = { "RANK", "2", "WORLD_SIZE", "2", NULL };
      CHECK_ERR(create_env(kv, &ctx), DDP_ERROR_ENVIRONMENT, NULL, "RANK=2"); }
    { const char *kv[] = { "RANK", "-1", "WORLD_SIZE", "2", NULL };
      CHECK_ERR(create_env(kv, &ctx), DDP_ERROR_ENVIRONMENT, NULL, "RANK=-1"); }
    { const char *kv[] = { "RANK", "0", NULL };
      CHECK_ERR(create_env(kv, &ctx), DDP_ERROR_ENVIRONMENT, NULL, "WORLD_SIZE is not"); }
#if defined(_WIN32) /* Windows' C library removes a variable set to "": a blank value instead */
    { const char *kv[] = { "RANK", "0", "WORLD_SIZE", "2", "LOCAL_RANK", " ", NULL };
      CHECK_ERR(create_env(kv, &ctx), DDP_ERROR_ENVIRONMENT, NULL, "LOCAL_RANK=' '"); }
#else
    { const char *kv[] = { "RANK", "0", "WORLD_SIZE", "2", "LOCAL_RANK", "", NULL };
      CHECK_ERR(create_env(kv, &ctx), DDP_ERROR_ENVIRONMENT, NULL, "LOCAL_RANK=''"); }
#endif
    { const char *kv[] = { "RANK", "0", "WORLD_SIZE", "2", "LOCAL_RANK", "5", NULL };
      CHECK_ERR(create_env(kv, &ctx), DDP_ERROR_ENVIRONMENT, NULL, "LOCAL_RANK=5"); }
    { const char *kv[] = { "RANK", "0", "WORLD_SIZE", "2", "LOCAL_WORLD_SIZE", "zwei", NULL };
      CHECK_ERR(create_env(kv, &ctx), DDP_ERROR_ENVIRONMENT, NULL, "LOCAL_WORLD_SIZE='zwei'"); }
    { const char *kv[] = { "RANK", "0", "WORLD_SIZE", "2", "MASTER_PORT", "99999", NULL };
      CHECK_ERR(create_env(kv, &ctx), DDP_ERROR_ENVIRONMENT, NULL, "MASTER_PORT=99999"); }
    { const char *kv[] = { "RANK", "0", "WORLD_SIZE", "2", "MASTER_PORT", "http", NULL };
      CHECK_ERR(create_env(kv, &ctx), DDP_ERROR_ENVIRONMENT, NULL, "MASTER_PORT='http'"); }
    { const char *kv[] = { "RANK", "0", "WORLD_SIZE", "1", "DDP_BACKEND", "gloo", NULL };
      CHECK_ERR(create_env(kv, &ctx), DDP_ERROR_ENVIRONMENT, NULL, "DDP_BACKEND='gloo'"); }
    { const char *kv[] = { "RANK", "0", "WORLD_SIZE", "1", "DDP_TIMEOUT", "soon", NULL };
      CHECK_ERR(create_env(kv, &ctx), DDP_ERROR_ENVIRONMENT, NULL, "DDP_TIMEOUT='soon'"); }
    { const char *kv[] = { "RANK", "0", "WORLD_SIZE", "1", "DDP_TIMEOUT", "-5", NULL };
      CHECK_ERR(create_env(kv, &ctx), DDP_ERROR_ENVIRONMENT, NULL, "DDP_TIMEOUT='-5'"); }
    { const char *kv[] = { "RANK", "0", "WORLD_SIZE", "4", "LOCAL_WORLD_SIZE", "2", NULL };
      CHECK_ERR(create_env(kv, &ctx), DDP_ERROR_UNSUPPORTED, NULL, "one host"); }
    { const char *kv[] = { "OMPI_COMM_WORLD_RANK", "1", "OMPI_COMM_WORLD_SIZE", "1", NULL };
      CHECK_ERR(create_env(kv, &ctx), DDP_ERROR_ENVIRONMENT, NULL, "OMPI_COMM_WORLD_RANK=1"); }
    { const char *kv[] = { "SLURM_PROCID", "0", "SLURM_NTASKS", "x", NULL };
      CHECK_ERR(create_env(kv, &ctx), DDP_ERROR_ENVIRONMENT, NULL, "SLURM_NTASKS='x'"); }
    { const char *kv[] = { "RANK", "0", "WORLD_SIZE", "1", "MASTER_PORT", "1234", NULL };
      CHECK_OK(create_env(kv, &ctx), NULL);
      CHECK(ctx && ddp_world_size(ctx) == 1, "RANK=0 WORLD_SIZE=1 works");
      ddp_destroy(ctx); }
    { const char *kv[] = { "SLURM_PROCID", "0", "SLURM_NTASKS", "1", "SLURM_NTASKS_PER_NODE", "1(x2)", NULL };
      CHECK_OK(create_env(kv, &ctx), NULL);
      ddp_destroy(ctx); }
    clear_env();
    {
        ddp_config c = base_config();
        CHECK_ERR(ddp_create(&c, NULL), DDP_ERROR_INVALID_ARGUMENT, NULL, "out is NULL");
        c.world_size = -3;
        CHECK_ERR(ddp_create(&c, &ctx), DDP_ERROR_INVALID_ARGUMENT, NULL, "world_size is -3");
        c.world_size = 2; c.rank = 2;
        CHECK_ERR(ddp_create(&c, &ctx), DDP_ERROR_INVALID_ARGUMENT, NULL, "rank 2");
        c = base_config(); c.master_port = 70000; c.world_size = 2;
        CHECK_ERR(ddp_create(&c, &ctx), DDP_ERROR_INVALID_ARGUMENT, NULL, "master_port 70000");
        c = base_config(); c.backend = (ddp_backend)42;
        CHECK_ERR(ddp_create(&c, &ctx), DDP_ERROR_INVALID_ARGUMENT, NULL, "config.backend 42");
        c = base_config(); c.device = DDP_DEVICE_CUDA;
        CHECK_ERR(ddp_create(&c, &ctx), DDP_ERROR_UNSUPPORTED, NULL, "without CUDA");
        c = base_config(); c.backend = DDP_BACKEND_NCCL;
        CHECK_ERR(ddp_create(&c, &ctx), DDP_ERROR_UNSUPPORTED, NULL, "nccl");
        c = base_config(); c.optimizer.type = DDP_OPTIM_SGD; c.optimizer.nesterov = 1;
        CHECK_ERR(ddp_create(&c, &ctx), DDP_ERROR_INVALID_ARGUMENT, NULL, "nesterov");
        c = base_config(); c.staging_bytes = 100;
        CHECK_ERR(ddp_create(&c, &ctx), DDP_ERROR_INVALID_ARGUMENT, NULL, "staging_bytes");
        c = base_config(); c.compress = DDP_I32;
        CHECK_ERR(ddp_create(&c, &ctx), DDP_ERROR_INVALID_ARGUMENT, NULL, "compress");
        CHECK(ctx == NULL, "no context after a failed create");
    }
}

static void test_bad_params(void) {
    ddp_config c = base_config();
    ddp_context *ctx = make(&c);
    int id = 7;
    int64_t shape[2] = { 3, 0 };
    float g[4];
    TEST("bad parameters");
    CHECK_ERR(ddp_register_param(ctx, NULL, 4, DDP_F32, NULL, &id), DDP_ERROR_INVALID_ARGUMENT, ctx, "name is NULL");
    CHECK(id == -1, "out_id reset on failure");
    CHECK_ERR(ddp_register_param(ctx, "", 4, DDP_F32, NULL, &id), DDP_ERROR_INVALID_ARGUMENT, ctx, "empty");
    CHECK_ERR(ddp_register_param(ctx, "w", 0, DDP_F32, NULL, &id), DDP_ERROR_INVALID_ARGUMENT, ctx, "'w' has 0 elements");
    CHECK_ERR(ddp_register_param(ctx, "w", (size_t)-1, DDP_F32, NULL, &id), DDP_ERROR_INVALID_ARGUMENT, ctx, "'w' has");
    CHECK_ERR(ddp_register_param(ctx, "w", 4, (ddp_dtype)99, NULL, &id), DDP_ERROR_INVALID_ARGUMENT, ctx, "dtype 99");
    CHECK_ERR(ddp_register_param(ctx, "w", 4, DDP_I32, NULL, &id), DDP_ERROR_INVALID_ARGUMENT, ctx, "'w' has dtype");
    CHECK_ERR(ddp_register_param(ctx, "w", 4, DDP_F32, NULL, NULL), DDP_ERROR_INVALID_ARGUMENT, ctx, "out_id is NULL");
    CHECK_ERR(ddp_register_param_shape(ctx, "w", 0, shape, DDP_F32, NULL, &id), DDP_ERROR_INVALID_ARGUMENT, ctx, "0 dimensions");
    CHECK_ERR(ddp_register_param_shape(ctx, "w", 2, shape, DDP_F32, NULL, &id), DDP_ERROR_INVALID_ARGUMENT, ctx, "dimension 1");
    CHECK_ERR(ddp_register_param_shape(ctx, "w", 2, NULL, DDP_F32, NULL, &id), DDP_ERROR_INVALID_ARGUMENT, ctx, "shape not NULL");
    CHECK_ERR(ddp_finalize(ctx), DDP_ERROR_INVALID_STATE, ctx, "no parameters");
    CHECK_ERR(ddp_step_begin(ctx), DDP_ERROR_INVALID_STATE, ctx, "ddp_finalize");
    CHECK_OK(ddp_register_param(ctx, "w", 4, DDP_F32, NULL, &id), ctx);
    CHECK(id == 0, "first id is 0");
    CHECK_ERR(ddp_register_param(ctx, "w", 4, DDP_F32, NULL, &id), DDP_ERROR_INVALID_ARGUMENT, ctx, "'w' is already registered");
    CHECK(ddp_param_data(ctx, 0) == NULL, "no data before finalize");
    CHECK_OK(ddp_finalize(ctx), ctx);
    CHECK_ERR(ddp_finalize(ctx), DDP_ERROR_INVALID_STATE, ctx, "twice");
    CHECK_ERR(ddp_register_param(ctx, "late", 4, DDP_F32, NULL, &id), DDP_ERROR_INVALID_STATE, ctx, "'late' registered after ddp_finalize");
    CHECK(ddp_param_data(ctx, 1) == NULL && ddp_param_grad(ctx, -1) == NULL, "bad ids give NULL");
    CHECK_ERR(ddp_mark_ready(ctx, 0), DDP_ERROR_INVALID_STATE, ctx, "no step in progress");
    CHECK_ERR(ddp_step_end(ctx), DDP_ERROR_INVALID_STATE, ctx, "no step in progress");
    CHECK_ERR(ddp_optimizer_step(ctx), DDP_ERROR_INVALID_STATE, ctx, "DDP_OPTIM_NONE");
    CHECK_ERR(ddp_allreduce(ctx, NULL, 4, DDP_F32, DDP_OP_SUM), DDP_ERROR_INVALID_ARGUMENT, ctx, "buffer is NULL");
    CHECK_ERR(ddp_allreduce(ctx, g, 4, (ddp_dtype)42, DDP_OP_SUM), DDP_ERROR_INVALID_ARGUMENT, ctx, "dtype 42");
    CHECK_ERR(ddp_allreduce(ctx, g, 4, DDP_F32, (ddp_op)9), DDP_ERROR_INVALID_ARGUMENT, ctx, "op 9");
    CHECK_ERR(ddp_broadcast(ctx, g, 4, DDP_F32, 1), DDP_ERROR_INVALID_ARGUMENT, ctx, "root 1");
    CHECK_ERR(ddp_train_step(ctx, NULL, NULL, 1, NULL), DDP_ERROR_INVALID_ARGUMENT, ctx, "fn is NULL");
    CHECK_ERR(ddp_mark_ready_stream(ctx, 0, NULL), DDP_ERROR_INVALID_STATE, ctx, "no step");
    CHECK_OK(ddp_step_begin(ctx), ctx);
    CHECK_ERR(ddp_step_begin(ctx), DDP_ERROR_INVALID_STATE, ctx, "not ended");
    CHECK_ERR(ddp_mark_ready(ctx, 3), DDP_ERROR_INVALID_ARGUMENT, ctx, "3 is not a parameter id");
    CHECK_ERR(ddp_mark_ready_stream(ctx, 0, NULL), DDP_ERROR_UNSUPPORTED, ctx, "ddp_mark_ready()");
    CHECK_ERR(ddp_allreduce(ctx, g, 4, DDP_F32, DDP_OP_SUM), DDP_ERROR_INVALID_STATE, ctx, "ddp_step_begin");
    CHECK_ERR(ddp_set_no_sync(ctx, 1), DDP_ERROR_INVALID_STATE, ctx, "inside a step");
    CHECK_OK(ddp_mark_ready(ctx, 0), ctx);
    CHECK_ERR(ddp_mark_ready(ctx, 0), DDP_ERROR_INVALID_STATE, ctx, "parameter 0 'w' was marked ready twice");
    CHECK_ERR(ddp_step_end(ctx), DDP_ERROR_INVALID_STATE, ctx, "broken");
    ddp_destroy(ctx);
    ddp_destroy(NULL);
}

/* the list of unmarked parameters is cut, never overflowed */
static void test_missing_mark_long_names(void) {
    ddp_config c = base_config();
    ddp_context *ctx = make(&c);
    char name[128];
    int i, id;
    TEST("missing mark, long names");
    for (i = 0; i < 8; i++) {
        memset(name, 'a' + i, 120);
        name[120] = 0;
        ddp_register_param(ctx, name, 4, DDP_F32, NULL, &id);
    }
    CHECK_OK(ddp_finalize(ctx), ctx);
    CHECK_OK(ddp_step_begin(ctx), ctx);
    CHECK_ERR(ddp_step_end(ctx), DDP_ERROR_INVALID_STATE, ctx, "8 parameter(s) never marked ready");
    CHECK(strstr(ddp_last_error(ctx), ", ...") != NULL, "the list says it was cut: %s", ddp_last_error(ctx));
    ddp_destroy(ctx);
}

static void test_missing_mark(void) {
    ddp_config c = base_config();
    ddp_context *ctx;
    int a, b, d;
    float *g;
    TEST("missing mark");
    ctx = make(&c);
    ddp_register_param(ctx, "layer.a", 8, DDP_F32, NULL, &a);
    ddp_register_param(ctx, "layer.b", 8, DDP_F32, NULL, &b);
    ddp_register_param(ctx, "layer.c", 8, DDP_F32, NULL, &d);
    CHECK_OK(ddp_finalize(ctx), ctx);
    CHECK_OK(ddp_step_begin(ctx), ctx);
    CHECK_OK(ddp_mark_ready(ctx, b), ctx);
    CHECK_ERR(ddp_step_end(ctx), DDP_ERROR_INVALID_STATE, ctx, "2 parameter(s) never marked ready in this step: 'layer.a', 'layer.c'");
    ddp_destroy(ctx);

    c.allow_unused_parameters = 1;
    ctx = make(&c);
    ddp_register_param(ctx, "layer.a", 8, DDP_F32, NULL, &a);
    ddp_register_param(ctx, "layer.b", 8, DDP_F32, NULL, &b);
    CHECK_OK(ddp_finalize(ctx), ctx);
    CHECK_OK(ddp_step_begin(ctx), ctx);
    g = (float *)ddp_param_grad(ctx, b);
    g[3] = 2.0f;
    CHECK_OK(ddp_mark_ready(ctx, b), ctx);
    CHECK_OK(ddp_step_end(ctx), ctx);
    CHECK(((float *)ddp_param_grad(ctx, a))[0] == 0.0f && g[3] == 2.0f, "unused gradient is zero, used one kept");
    ddp_destroy(ctx);
}

/* logger that records "launch bucket N" in order */
static int launched[64], n_launched;
static void record_log(ddp_log_level lvl, int rank, const char *msg, void *user) {
    int b;
    (void)rank; (void)user;
    if (lvl == DDP_LOG_DEBUG && sscanf(msg, "launch bucket %d", &b) == 1 && n_launched < 64) launched[n_launched++] = b;
}

static void test_buckets(void) {
    ddp_config c = base_config();
    ddp_context *ctx;
    int id[7], i, nb, np;
    size_t off, bytes;
    ddp_dtype dt;
    /* floats per parameter, in forward order; p4 is f64 */
    static const size_t n[7] = { 100, 300, 500, 1000, 64, 200, 50 };
    char name[16];
    TEST("buckets");
    c.first_bucket_bytes = 1024;
    c.bucket_bytes = 4096;
    c.logger.func = record_log;
    c.logger.level = DDP_LOG_DEBUG;
    ctx = make(&c);
    for (i = 0; i < 7; i++) {
        snprintf(name, sizeof name, "p%d", i);
        CHECK_OK(ddp_register_param(ctx, name, n[i], i == 4 ? DDP_F64 : DDP_F32, NULL, &id[i]), ctx);
    }
    CHECK_OK(ddp_finalize(ctx), ctx);
    /* reverse order: p6 (200 B) + p5 (800 B) -> 1024 B span reaches the 1 KiB cap?
       p6 at 0 (200 B), p5 at 256 (800 B) -> 1056 >= 1024: bucket 0 closes.
       p4 is f64: bucket 1 alone. p3 (4000 B) bucket 2 reaches 4096? 4000 < 4096, so p2 joins:
       p3 at X, p2 at X+4096 -> closes. p1 and p0 in bucket 3. */
    CHECK(ddp_param_offset(ctx, id[6]) == 0, "last parameter first in the flat buffer");
    for (i = 0; i < 7; i++) CHECK(ddp_param_offset(ctx, id[i]) % 256 == 0, "p%d offset %zu is 256-aligned", i, ddp_param_offset(ctx, id[i]));
    CHECK(ddp_param_bucket(ctx, id[6]) == 0 && ddp_param_bucket(ctx, id[5]) == 0, "p6,p5 in bucket 0");
    CHECK(ddp_param_bucket(ctx, id[4]) == 1, "f64 p4 alone in bucket 1, got %d", ddp_param_bucket(ctx, id[4]));
    CHECK(ddp_param_bucket(ctx, id[3]) == 2 && ddp_param_bucket(ctx, id[2]) == 2, "p3,p2 in bucket 2 (%d %d)",
          ddp_param_bucket(ctx, id[3]), ddp_param_bucket(ctx, id[2]));
    CHECK(ddp_param_bucket(ctx, id[1]) == 3 && ddp_param_bucket(ctx, id[0]) == 3, "p1,p0 in bucket 3 (%d %d)",
          ddp_param_bucket(ctx, id[1]), ddp_param_bucket(ctx, id[0]));
    nb = ddp_bucket_count(ctx);
    CHECK(nb == 4, "4 buckets, got %d", nb);
    for (i = 0; i < nb; i++) {
        CHECK_OK(ddp_bucket_info(ctx, i, &off, &bytes, &dt, &np), ctx);
        CHECK(off % 256 == 0 && bytes > 0, "bucket %d offset %zu", i, off);
        CHECK((i == 1) == (dt == DDP_F64), "bucket %d dtype %s", i, ddp_dtype_name(dt));
    }
    CHECK(ddp_bucket_info(ctx, 4, &off, &bytes, &dt, &np) == DDP_ERROR_INVALID_ARGUMENT, "bucket 4 does not exist");
    /* views: the gradient of each parameter lies inside its bucket */
    for (i = 0; i < 7; i++) {
        ddp_bucket_info(ctx, ddp_param_bucket(ctx, id[i]), &off, &bytes, &dt, &np);
        CHECK((char *)ddp_param_grad(ctx, id[i]) >= (char *)ddp_flat_grads(ctx) + off &&
              (char *)ddp_param_grad(ctx, id[i]) + n[i] * ddp_dtype_size(dt) <= (char *)ddp_flat_grads(ctx) + off + bytes,
              "p%d grad view inside its bucket", i);
    }

    /* launch order: buckets launch strictly in order, as soon as complete */
    n_launched = 0;
    CHECK_OK(ddp_step_begin(ctx), ctx);
    ddp_mark_ready(ctx, id[0]); ddp_mark_ready(ctx, id[1]);   /* bucket 3 complete, must wait */
    CHECK(n_launched == 0, "bucket 3 waits for buckets 0..2 (launched %d)", n_launched);
    ddp_mark_ready(ctx, id[6]);
    CHECK(n_launched == 0, "bucket 0 incomplete");
    ddp_mark_ready(ctx, id[5]);
    CHECK(n_launched == 1 && launched[0] == 0, "bucket 0 launched when complete");
    ddp_mark_ready(ctx, id[3]); ddp_mark_ready(ctx, id[2]);   /* bucket 2 complete, bucket 1 not */
    CHECK(n_launched == 1, "bucket 2 waits for bucket 1");
    ddp_mark_ready(ctx, id[4]);
    CHECK(n_launched == 4 && launched[1] == 1 && launched[2] == 2 && launched[3] == 3, "1, 2, 3 launched in order (%d)", n_launched);
    CHECK_OK(ddp_step_end(ctx), ctx);
    ddp_destroy(ctx);
}

/* reference SGD/AdamW in double, straight from PyTorch's documented formulas */
static void ref_sgd(double *p, const double *g, double *buf, int n, double lr, double mom, double wd, int nest, int t) {
    int i;
    for (i = 0; i < n; i++) {
        double d = g[i] + wd * p[i];
        if (mom > 0) { buf[i] = t == 1 ? d : mom * buf[i] + d; d = nest ? d + mom * buf[i] : buf[i]; }
        p[i] -= lr * d;
    }
}
static void ref_adamw(double *p, const double *g, double *m, double *v, int n, double lr, double b1, double b2,
                      double eps, double wd, int t) {
    int i;
    for (i = 0; i < n; i++) {
        p[i] *= 1 - lr * wd;
        m[i] = b1 * m[i] + (1 - b1) * g[i];
        v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
        p[i] -= lr * (m[i] / (1 - pow(b1, t))) / (sqrt(v[i] / (1 - pow(b2, t))) + eps);
    }
}

static double grad_of(int step, int i) { return sin(0.37 * i + 1.3 * step) * (1 + 0.1 * i); }

static void run_optimizer_case(ddp_optimizer type, int nesterov, ddp_dtype dtype, double tol) {
    enum { N = 37, STEPS = 4 };
    ddp_config c = base_config();
    ddp_context *ctx;
    double p[N], m[N], v[N], g[N];
    float init32[N];
    double init64[N];
    uint16_t init16[N];
    int id, i, s;
    double maxerr = 0;
    c.optimizer.type = type;
    c.optimizer.lr = 0.05f;
    c.optimizer.momentum = type == DDP_OPTIM_SGD ? 0.9f : 0;
    c.optimizer.nesterov = nesterov;
    c.optimizer.weight_decay = 0.01f;
    ctx = make(&c);
    for (i = 0; i < N; i++) {
        p[i] = cos(0.5 * i);
        init32[i] = (float)p[i];
        init64[i] = p[i];
        m[i] = v[i] = 0;
    }
    if (dtype == DDP_BF16 || dtype == DDP_F16) {
        for (i = 0; i < N; i++) {
            init16[i] = dtype == DDP_BF16 ? ddp__f32_to_bf16(init32[i]) : ddp__f32_to_f16(init32[i]);
            p[i] = dtype == DDP_BF16 ? ddp__bf16_to_f32(init16[i]) : ddp__f16_to_f32(init16[i]);
        }
    }
    CHECK_OK(ddp_register_param(ctx, "w", N, dtype, dtype == DDP_F64 ? (void *)init64 : dtype == DDP_F32 ? (void *)init32 : (void *)init16, &id), ctx);
    CHECK_OK(ddp_finalize(ctx), ctx);
    for (s = 1; s <= STEPS; s++) {
        void *gp;
        CHECK_OK(ddp_step_begin(ctx), ctx);
        gp = ddp_param_grad(ctx, id);
        for (i = 0; i < N; i++) {
            g[i] = grad_of(s, i);
            if (dtype == DDP_F32) ((float *)gp)[i] += (float)g[i];
            else if (dtype == DDP_F64) ((double *)gp)[i] += g[i];
            else if (dtype == DDP_BF16) { ((uint16_t *)gp)[i] = ddp__f32_to_bf16((float)g[i]); g[i] = ddp__bf16_to_f32(((uint16_t *)gp)[i]); }
            else { ((uint16_t *)gp)[i] = ddp__f32_to_f16((float)g[i]); g[i] = ddp__f16_to_f32(((uint16_t *)gp)[i]); }
        }
        CHECK_OK(ddp_mark_ready(ctx, id), ctx);
        CHECK_OK(ddp_step_end(ctx), ctx);
        CHECK_OK(ddp_optimizer_step(ctx), ctx);
        /* the hyper-parameters are floats in the config: use exactly those values */
        if (type == DDP_OPTIM_SGD) ref_sgd(p, g, m, N, 0.05f, 0.9f, 0.01f, nesterov, s);
        else ref_adamw(p, g, m, v, N, 0.05f, 0.9f, 0.999f, 1e-8f, 0.01f, s);
    }
    for (i = 0; i < N; i++) {
        double got = dtype == DDP_F32 ? ((float *)ddp_param_data(ctx, id))[i]
                   : dtype == DDP_F64 ? ((double *)ddp_param_data(ctx, id))[i]
                   : dtype == DDP_BF16 ? ddp__bf16_to_f32(((uint16_t *)ddp_param_data(ctx, id))[i])
                   : ddp__f16_to_f32(((uint16_t *)ddp_param_data(ctx, id))[i]);
        double e = fabs(got - p[i]) / (fabs(p[i]) + 1e-3);
        if (e > maxerr) maxerr = e;
    }
    CHECK(maxerr <= tol, "%s nesterov=%d %s: max relative error %.3g > %.3g",
          type == DDP_OPTIM_SGD ? "sgd" : "adamw", nesterov, ddp_dtype_name(dtype), maxerr, tol);
    CHECK(ddp_optimizer_steps(ctx) == STEPS, "step counter");
    ddp_destroy(ctx);
}

static void test_optimizers(void) {
    TEST("optimizers");
    run_optimizer_case(DDP_OPTIM_SGD, 0, DDP_F32, 1e-5);
    run_optimizer_case(DDP_OPTIM_SGD, 1, DDP_F32, 1e-5);
    run_optimizer_case(DDP_OPTIM_ADAMW, 0, DDP_F32, 1e-5);
    run_optimizer_case(DDP_OPTIM_SGD, 1, DDP_F64, 1e-12);
    run_optimizer_case(DDP_OPTIM_ADAMW, 0, DDP_F64, 1e-12);
    /* 16-bit parameters: f32 master weights, the stored copy is rounded */
    run_optimizer_case(DDP_OPTIM_ADAMW, 0, DDP_BF16, 1e-2);
    run_optimizer_case(DDP_OPTIM_SGD, 0, DDP_F16, 2e-3);
}

static void test_clip(void) {
    ddp_config c = base_config();
    ddp_context *ctx;
    int a, b;
    float norm = 0, *ga, *gb;
    TEST("clip");
    ctx = make(&c);
    ddp_register_param(ctx, "a", 2, DDP_F32, NULL, &a);
    ddp_register_param(ctx, "b", 1, DDP_F32, NULL, &b);
    ddp_finalize(ctx);
    ddp_step_begin(ctx);
    ga = (float *)ddp_param_grad(ctx, a); gb = (float *)ddp_param_grad(ctx, b);
    ga[0] = 3; ga[1] = 0; gb[0] = 4;
    ddp_mark_ready(ctx, a); ddp_mark_ready(ctx, b);
    CHECK_OK(ddp_step_end(ctx), ctx);
    CHECK_OK(ddp_clip_grad_norm(ctx, 0, &norm), ctx);
    CHECK(fabsf(norm - 5) < 1e-6f && ga[0] == 3, "measure only: norm %g", (double)norm);
    CHECK_OK(ddp_clip_grad_norm(ctx, 1.0f, &norm), ctx);
    CHECK(fabsf(norm - 5) < 1e-6f && fabsf(ga[0] - 0.6f) < 1e-5f && fabsf(gb[0] - 0.8f) < 1e-5f, "clipped to norm 1: %g %g", (double)ga[0], (double)gb[0]);
    CHECK_OK(ddp_clip_grad_norm(ctx, 10.0f, &norm), ctx);
    CHECK(fabsf(ga[0] - 0.6f) < 1e-5f, "no change under the limit");
    ddp_destroy(ctx);
}

/* micro-steps accumulate; the synced step averages over them; grads restart from zero */
static void test_accumulation(void) {
    ddp_config c = base_config();
    ddp_context *ctx;
    int id, k;
    float *g;
    TEST("accumulation");
    ctx = make(&c);
    ddp_register_param(ctx, "w", 3, DDP_F32, NULL, &id);
    ddp_finalize(ctx);
    for (k = 0; k < 3; k++) {
        CHECK_OK(ddp_set_no_sync(ctx, k < 2), ctx);
        CHECK_OK(ddp_step_begin(ctx), ctx);
        g = (float *)ddp_param_grad(ctx, id);
        g[0] += (float)(k + 1); g[1] += 1.0f; g[2] += 0.0f;
        CHECK_OK(ddp_mark_ready(ctx, id), ctx);
        CHECK_OK(ddp_step_end(ctx), ctx);
        if (k == 0) CHECK_ERR(ddp_optimizer_step(ctx), DDP_ERROR_INVALID_STATE, ctx, "never reduced");
    }
    g = (float *)ddp_param_grad(ctx, id);
    CHECK(fabsf(g[0] - 2.0f) < 1e-6f && fabsf(g[1] - 1.0f) < 1e-6f, "average over 3 micro-steps: %g %g", (double)g[0], (double)g[1]);
    CHECK_OK(ddp_step_begin(ctx), ctx);
    CHECK(g[0] == 0 && g[1] == 0, "next step starts from zero");
    ddp_mark_ready(ctx, id);
    ddp_step_end(ctx);
    ddp_destroy(ctx);

    c.gradient_sum = 1;
    ctx = make(&c);
    ddp_register_param(ctx, "w", 1, DDP_F32, NULL, &id);
    ddp_finalize(ctx);
    for (k = 0; k < 2; k++) {
        ddp_set_no_sync(ctx, k == 0);
        ddp_step_begin(ctx);
        ((float *)ddp_param_grad(ctx, id))[0] += 3.0f;
        ddp_mark_ready(ctx, id);
        CHECK_OK(ddp_step_end(ctx), ctx);
    }
    CHECK(((float *)ddp_param_grad(ctx, id))[0] == 6.0f, "gradient_sum leaves the sum");
    ddp_destroy(ctx);
}

static int fb_calls;
static int fb_fail_at = -1;
static int forward_backward(ddp_context *ctx, void *user, int micro, float *loss) {
    int id = *(int *)user;
    float *g = (float *)ddp_param_grad(ctx, id), *w = (float *)ddp_param_data(ctx, id);
    fb_calls++;
    if (micro == fb_fail_at) return 7;
    g[0] += 2.0f * w[0];          /* loss = w^2 */
    *loss = w[0] * w[0] + (float)micro;
    return ddp_mark_ready(ctx, id) == DDP_SUCCESS ? 0 : 1;
}

static void test_train_step(void) {
    ddp_config c = base_config();
    ddp_context *ctx;
    int id;
    float init = 1.0f, loss = 0;
    TEST("train step");
    c.optimizer.type = DDP_OPTIM_SGD;
    c.optimizer.lr = 0.25f;
    ctx = make(&c);
    ddp_register_param(ctx, "w", 1, DDP_F32, &init, &id);
    ddp_finalize(ctx);
    CHECK(((float *)ddp_param_data(ctx, id))[0] == 1.0f, "init copied at finalize");
    fb_calls = 0;
    CHECK_OK(ddp_train_step(ctx, forward_backward, &id, 2, &loss), ctx);
    CHECK(fb_calls == 2, "fn called per micro-step");
    CHECK(fabsf(loss - 1.5f) < 1e-6f, "loss averaged over micro-steps: %g", (double)loss);
    CHECK(fabsf(((float *)ddp_param_data(ctx, id))[0] - 0.5f) < 1e-6f, "w = 1 - 0.25 * 2: %g", (double)((float *)ddp_param_data(ctx, id))[0]);
    fb_fail_at = 1;
    CHECK_ERR(ddp_train_step(ctx, forward_backward, &id, 2, &loss), DDP_ERROR_USER, ctx, "returned 7 in micro-step 1");
    fb_fail_at = -1;
    ddp_destroy(ctx);
}

static ddp_context *ck_model(int variant, ddp_optimizer opt) {
    ddp_config c = base_config();
    ddp_context *ctx;
    int id;
    int64_t shape[2] = { 4, variant == 1 ? 5 : 3 };
    float init[20];
    int i;
    for (i = 0; i < 20; i++) init[i] = 0.1f * (float)i - 0.7f;
    c.optimizer.type = opt;
    c.optimizer.lr = 0.1f;
    ctx = make(&c);
    ddp_register_param_shape(ctx, "fc.weight", 2, shape, DDP_F32, init, &id);
    ddp_register_param(ctx, variant == 2 ? "fc.b" : "fc.bias", 4, DDP_F32, init, &id);
    ddp_finalize(ctx);
    return ctx;
}

static void train_some(ddp_context *ctx, int steps) {
    int s, i, p;
    for (s = 0; s < steps; s++) {
        ddp_step_begin(ctx);
        for (p = ddp_param_count(ctx) - 1; p >= 0; p--) {
            float *g = (float *)ddp_param_grad(ctx, p), *w = (float *)ddp_param_data(ctx, p);
            for (i = 0; i < (int)ddp_param_numel(ctx, p); i++) g[i] += w[i] - 0.3f * (float)i;
            ddp_mark_ready(ctx, p);
        }
        ddp_step_end(ctx);
        ddp_optimizer_step(ctx);
    }
}

static void test_checkpoint(void) {
    char path[256], bad[300];
    ddp_context *a, *b;
    FILE *f;
    long size;
    unsigned char *bytes;
    TEST("checkpoint");
    t_temp_path(path, sizeof path, "ddp_test_ckpt.bin");
    a = ck_model(0, DDP_OPTIM_ADAMW);
    train_some(a, 3);
    CHECK_OK(ddp_save_checkpoint(a, path), a);
    b = ck_model(0, DDP_OPTIM_ADAMW);
    CHECK_OK(ddp_load_checkpoint(b, path), b);
    CHECK(memcmp(ddp_flat_params(a), ddp_flat_params(b), ddp_flat_bytes(a)) == 0, "parameters restored");
    CHECK(ddp_optimizer_steps(b) == 3, "step count restored");
    train_some(a, 2);
    train_some(b, 2);
    CHECK(memcmp(ddp_flat_params(a), ddp_flat_params(b), ddp_flat_bytes(a)) == 0, "resumed training equals uninterrupted (optimizer state restored)");
    ddp_destroy(b);

    /* saving over an existing checkpoint replaces it whole (rename on POSIX,
       MoveFileEx on Windows, where rename() refuses an existing target) and
       leaves no temporary file */
    CHECK_OK(ddp_save_checkpoint(a, path), a);
    b = ck_model(0, DDP_OPTIM_ADAMW);
    CHECK_OK(ddp_load_checkpoint(b, path), b);
    CHECK(ddp_optimizer_steps(b) == 5, "the second save replaced the first: %lld steps", (long long)ddp_optimizer_steps(b));
    CHECK(memcmp(ddp_flat_params(a), ddp_flat_params(b), ddp_flat_bytes(a)) == 0, "the replaced checkpoint holds the new weights");
    ddp_destroy(b);
    snprintf(bad, sizeof bad, "%s.tmp.%d", path, t_getpid());
    f = fopen(bad, "rb");
    CHECK(f == NULL, "no temporary file '%s' left", bad);
    if (f) fclose(f);

    b = ck_model(1, DDP_OPTIM_ADAMW);
    CHECK_ERR(ddp_load_checkpoint(b, path), DDP_ERROR_MISMATCH, b, "parameter 0 is 'fc.weight' f32 [4,3] there, 'fc.weight' f32 [4,5] here");
    ddp_destroy(b);
    b = ck_model(2, DDP_OPTIM_ADAMW);
    CHECK_ERR(ddp_load_checkpoint(b, path), DDP_ERROR_MISMATCH, b, "'fc.bias'");
    ddp_destroy(b);
    b = ck_model(0, DDP_OPTIM_SGD);
    CHECK_ERR(ddp_load_checkpoint(b, path), DDP_ERROR_MISMATCH, b, "optimizer");
    ddp_destroy(b);

    /* a checkpoint saved before any step holds no optimizer state: loading
       it into a trained context gives fresh state, as if newly built */
    {
        ddp_context *fresh = ck_model(0, DDP_OPTIM_ADAMW), *trained = ck_model(0, DDP_OPTIM_ADAMW);
        char early[300];
        snprintf(early, sizeof early, "%s.early", path);
        CHECK_OK(ddp_save_checkpoint(fresh, early), fresh);
        train_some(trained, 3);
        CHECK_OK(ddp_load_checkpoint(trained, early), trained);
        CHECK(ddp_optimizer_steps(trained) == 0, "step count reset, got %lld", (long long)ddp_optimizer_steps(trained));
        train_some(fresh, 2);
        train_some(trained, 2);
        CHECK(memcmp(ddp_flat_params(fresh), ddp_flat_params(trained), ddp_flat_bytes(fresh)) == 0,
              "no stale moments after loading a checkpoint without optimizer state");
        ddp_destroy(fresh);
        ddp_destroy(trained);
        remove(early);
    }

    /* corrupt one byte in the data: checksum error, and the model is untouched */
    f = fopen(path, "rb");
    fseek(f, 0, SEEK_END); size = ftell(f); fseek(f, 0, SEEK_SET);
    bytes = (unsigned char *)malloc((size_t)size);
    CHECK(fread(bytes, 1, (size_t)size, f) == (size_t)size, "read back");
    fclose(f);
    snprintf(bad, sizeof bad, "%s.bad", path);
    bytes[size - 20] ^= 0x40;
    f = fopen(bad, "wb"); fwrite(bytes, 1, (size_t)size, f); fclose(f);
    b = ck_model(0, DDP_OPTIM_ADAMW);
    {
        float before = ((float *)ddp_param_data(b, 0))[1];
        CHECK_ERR(ddp_load_checkpoint(b, bad), DDP_ERROR_CORRUPT, b, "checksum");
        CHECK(((float *)ddp_param_data(b, 0))[1] == before, "a corrupt checkpoint changes nothing");
    }
    bytes[size - 20] ^= 0x40;
    f = fopen(bad, "wb"); fwrite(bytes, 1, (size_t)size - 9, f); fclose(f);
    CHECK_ERR(ddp_load_checkpoint(b, bad), DDP_ERROR_CORRUPT, b, "truncated");
    f = fopen(bad, "wb"); fputs("hello, world", f); fclose(f);
    CHECK_ERR(ddp_load_checkpoint(b, bad), DDP_ERROR_CORRUPT, b, "not a ddp.h checkpoint");
    CHECK_ERR(ddp_load_checkpoint(b, "/nonexistent/dir/x.ckpt"), DDP_ERROR_IO, b, "cannot open");
    CHECK_ERR(ddp_save_checkpoint(b, "/nonexistent/dir/x.ckpt"), DDP_ERROR_IO, b, "cannot create");
    CHECK_ERR(ddp_save_checkpoint(b, NULL), DDP_ERROR_INVALID_ARGUMENT, b, "path");
    ddp_destroy(b);
    free(bytes);
    remove(bad);
    remove(path);
    ddp_destroy(a);
}

static void test_collectives_world1(void) {
    ddp_config c = base_config();
    ddp_context *ctx = make(&c);
    float x[3] = { 1, 2, 3 }, y[3];
    int32_t k[2] = { 5, -7 };
    TEST("collectives world 1");
    CHECK_OK(ddp_allreduce(ctx, x, 3, DDP_F32, DDP_OP_AVG), ctx);
    CHECK(x[0] == 1 && x[2] == 3, "avg over one rank");
    CHECK_OK(ddp_allreduce(ctx, k, 2, DDP_I32, DDP_OP_MAX), ctx);
    CHECK(k[1] == -7, "max over one rank");
    CHECK_OK(ddp_allgather(ctx, x, y, 3, DDP_F32), ctx);
    CHECK(y[1] == 2, "allgather world 1");
    CHECK_OK(ddp_reduce_scatter(ctx, x, y, 3, DDP_F32, DDP_OP_SUM), ctx);
    CHECK(y[2] == 3, "reduce-scatter world 1");
    CHECK_OK(ddp_barrier(ctx), ctx);
    CHECK_OK(ddp_broadcast(ctx, x, 3, DDP_F32, 0), ctx);
    ddp_destroy(ctx);
}

static void test_f16_conversions(void) {
    TEST("16-bit conversions");
    CHECK(ddp__f32_to_bf16(1.0f) == 0x3f80, "bf16(1)");
    CHECK(ddp__f32_to_f16(1.0f) == 0x3c00 && ddp__f32_to_f16(-2.0f) == 0xc000, "f16(1), f16(-2)");
    CHECK(ddp__f16_to_f32(0x7bff) == 65504.0f, "f16 max");
    CHECK(ddp__f32_to_f16(1e6f) == 0x7c00, "f16 overflow to inf");
    CHECK(ddp__f16_to_f32(0x0001) == ldexpf(1.0f, -24), "f16 smallest subnormal");
    CHECK(ddp__f32_to_f16(ldexpf(1.0f, -24)) == 0x0001, "to f16 subnormal");
    CHECK(ddp__f32_to_bf16(1.0f + ldexpf(1.0f, -8)) == 0x3f80, "bf16 ties to even (down)");
    CHECK(ddp__f32_to_bf16(1.0f + 3 * ldexpf(1.0f, -8)) == 0x3f82, "bf16 ties to even (up)");
}

/* A segment's name lives until ddp__shm_unlink (Windows: the handle
   ddp__shm_create keeps), the mapping until it is unmapped; on Windows the
   segment is the current user's alone (one ACE, the user's SID) and its
   name carries 96 random bits. */
static void test_shm_segments(void) {
    char name[64];
    ddp__shm_handle h, h2;
    int e = 0;
    void *p, *q;
    TEST("shared-memory segments");
    ddp__shm_name(NULL, name, sizeof name, "test");
    CHECK(!strncmp(name, DDP__SHM_NAME_PREFIX "ddp-", strlen(DDP__SHM_NAME_PREFIX) + 4), "name '%s'", name);
    CHECK(ddp__shm_create(name, 1 << 16, &h, &e) == DDP__SHM_OK, "create '%s': %s", name, ddp__strerror(e));
    CHECK(ddp__shm_create(name, 1 << 16, &h2, &e) == DDP__SHM_E_OPEN, "a second create of '%s' fails (O_EXCL)", name);
    p = ddp__shm_map_view(h, 1 << 16, &e);
    CHECK(p != NULL, "map: %s", ddp__strerror(e));
    ddp__shm_close(h);
    CHECK(ddp__shm_open(name, 1 << 17, &h2, &e) == DDP__SHM_E_SMALL, "opening for more bytes than it has fails");
    CHECK(ddp__shm_open(name, 1 << 16, &h2, &e) == DDP__SHM_OK, "the name outlives the creator's handle: %s", ddp__strerror(e));
    q = ddp__shm_map_view(h2, 1 << 16, &e);
    ddp__shm_close(h2);
    CHECK(q != NULL, "second map");
    if (p && q) {
        ((volatile int *)p)[100] = 4242;
        CHECK(((volatile int *)q)[100] == 4242, "both views share the memory");
    }
#if defined(_WIN32)
    {
        HANDLE m = OpenFileMappingA(READ_CONTROL, FALSE, name);
        PACL dacl = NULL;
        PSECURITY_DESCRIPTOR sd = NULL;
        void *ace = NULL;
        union { TOKEN_USER tu; unsigned char b[256]; } user;
        HANDLE tok;
        DWORD len = 0;
        const char *rnd = strrchr(name, '-');
        CHECK(rnd && strlen(rnd + 1) == 24 && strspn(rnd + 1, "0123456789abcdef") == 24, "96 random bits in '%s'", name);
        CHECK(m != NULL, "open for READ_CONTROL");
        CHECK(m && GetSecurityInfo(m, SE_KERNEL_OBJECT, DACL_SECURITY_INFORMATION, NULL, NULL, &dacl, NULL, &sd) == ERROR_SUCCESS,
              "read its security");
        CHECK(dacl && dacl->AceCount == 1 && GetAce(dacl, 0, &ace), "a DACL of one entry (%d)", dacl ? (int)dacl->AceCount : -1);
        CHECK(OpenProcessToken(GetCurrentProcess(), TOKEN_QUERY, &tok), "token");
        CHECK(GetTokenInformation(tok, TokenUser, user.b, sizeof user.b, &len), "token user");
        CloseHandle(tok);
        CHECK(ace && ((ACE_HEADER *)ace)->AceType == ACCESS_ALLOWED_ACE_TYPE &&
              EqualSid((PSID)&((ACCESS_ALLOWED_ACE *)ace)->SidStart, user.tu.User.Sid), "the entry allows the current user");
        if (sd) LocalFree(sd);
        if (m) CloseHandle(m);
    }
#endif
    ddp__shm_unlink(name);
    CHECK(ddp__shm_open(name, 1 << 16, &h2, &e) == DDP__SHM_E_OPEN, "the name is gone after unlink");
    if (q && p) CHECK(((volatile int *)q)[100] == 4242, "the mappings stay valid after unlink");
    if (p) ddp__shm_unmap(p, 1 << 16);
    if (q) ddp__shm_unmap(q, 1 << 16);
}

int main(void) {
    clear_env();
    test_shm_segments();
    test_names();
    test_config();
    test_bad_environment();
    test_bad_params();
    test_missing_mark();
    test_missing_mark_long_names();
    test_buckets();
    test_optimizers();
    test_clip();
    test_accumulation();
    test_train_step();
    test_checkpoint();
    test_collectives_world1();
    test_f16_conversions();
    return t_summary("test_core");
}
