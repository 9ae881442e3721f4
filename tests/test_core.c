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

static void test_version(void) {
    char want[32];
    TEST("version");
    snprintf(want, sizeof want, "%d.%d.%d", DDP_VERSION_MAJOR, DDP_VERSION_MINOR, DDP_VERSION_PATCH);
    CHECK(!strcmp(DDP_VERSION, want), "DDP_VERSION '%s' is not MAJOR.MINOR.PATCH '%s'", DDP_VERSION, want);
    CHECK(!strcmp(ddp_version(), DDP_VERSION), "ddp_version() '%s' vs DDP_VERSION '%s'", ddp_version(), DDP_VERSION);
    CHECK(ddp_version_number() == DDP_VERSION_MAJOR * 10000 + DDP_VERSION_MINOR * 100 + DDP_VERSION_PATCH &&
          ddp_version_number() == DDP_VERSION_NUMBER, "ddp_version_number() %d", ddp_version_number());
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
                                  "TORCHELASTIC_USE_AGENT_STORE", "DDP_TIMEOUT", "DDP_JOB_SECRET" };
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
    { const char *kv[] = { "RANK", "0", "WORLD_SIZE", "1", "DDP_JOB_SECRET", "too-short", NULL };
      CHECK_ERR(create_env(kv, &ctx), DDP_ERROR_ENVIRONMENT, NULL, "environment variable DDP_JOB_SECRET has 9 characters"); }
    {   /* the same mistake in the config is a bad argument */
        ddp_config c;
        clear_env();
        memset(&c, 0, sizeof c);
        c.world_size = 1;
        c.job_secret = "too-short";
        CHECK_ERR(ddp_create(&c, &ctx), DDP_ERROR_INVALID_ARGUMENT, NULL, "config.job_secret has 9 characters");
    }
    {   /* a NULL config is a zeroed one: defaults, identity from the environment */
        clear_env();
        CHECK_OK(ddp_create(NULL, &ctx), NULL);
        CHECK(ctx && ddp_world_size(ctx) == 1 && ddp_rank(ctx) == 0, "ddp_create(NULL): world 1, rank 0");
        if (ctx) CHECK(ddp_query_config(ctx).backend == DDP_BACKEND_SHM, "ddp_create(NULL): the default backend");
        ddp_destroy(ctx);
        ctx = NULL;
    }
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
    /* later refusals name the error that broke the context, not the last
       refusal: no "broken by ... broken by ..." growing with each call */
    (void)ddp_set_lr(ctx, -1);
    CHECK_ERR(ddp_step_end(ctx), DDP_ERROR_INVALID_STATE, ctx, "parameter 0 'w' was marked ready twice");
    CHECK_ERR(ddp_step_end(ctx), DDP_ERROR_INVALID_STATE, ctx, "parameter 0 'w' was marked ready twice");
    {
        const char *m = ddp_last_error(ctx), *first = strstr(m, "broken");
        CHECK(first && !strstr(first + 1, "broken") && !strstr(m, "ddp_set_lr"), "one cause, the first: %s", m);
    }
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
    int id[7], i, nb, np = 0;
    size_t off = 0, bytes = 0;
    ddp_dtype dt = DDP_DTYPE_DEFAULT;
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
        CHECK_OK(ddp_bucket_info(ctx, ddp_param_bucket(ctx, id[i]), &off, &bytes, &dt, &np), ctx);
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
static void ref_sgd(double *p, const double *g, double *buf, int n, double lr, double mom, double damp, double wd, int nest, int t) {
    int i;
    for (i = 0; i < n; i++) {
        double d = g[i] + wd * p[i];
        if (mom > 0) { buf[i] = t == 1 ? d : mom * buf[i] + (1 - damp) * d; d = nest ? d + mom * buf[i] : buf[i]; }
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

/* the optimizer from ddp_optimizer_defaults() with a few changes, N steps
   against the double reference */
static void run_optimizer_case(ddp_optimizer type, int nesterov, double damp, ddp_dtype dtype, double tol) {
    enum { N = 37, STEPS = 4 };
    ddp_config c = base_config();
    ddp_context *ctx;
    double p[N], m[N], v[N], g[N];
    float init32[N];
    double init64[N];
    uint16_t init16[N];
    int id, i, s;
    double maxerr = 0;
    c.optimizer = ddp_optimizer_defaults(type);
    c.optimizer.lr = 0.05;
    c.optimizer.momentum = type == DDP_OPTIM_SGD ? 0.9 : 0;
    c.optimizer.dampening = damp;
    c.optimizer.nesterov = nesterov;
    c.optimizer.weight_decay = 0.01;
    if (type == DDP_OPTIM_ADAMW) c.optimizer.beta2 = 0.95;
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
    } else if (dtype == DDP_F32) {
        for (i = 0; i < N; i++) p[i] = init32[i];
    }
    CHECK_OK(ddp_register_param(ctx, "w", N, dtype, dtype == DDP_F64 ? (void *)init64 : dtype == DDP_F32 ? (void *)init32 : (void *)init16, &id), ctx);
    CHECK_OK(ddp_finalize(ctx), ctx);
    for (s = 1; s <= STEPS; s++) {
        void *gp;
        CHECK_OK(ddp_step_begin(ctx), ctx);
        gp = ddp_param_grad(ctx, id);
        for (i = 0; i < N; i++) {
            g[i] = grad_of(s, i);
            if (dtype == DDP_F32) { ((float *)gp)[i] += (float)g[i]; g[i] = (float)g[i]; }
            else if (dtype == DDP_F64) ((double *)gp)[i] += g[i];
            else if (dtype == DDP_BF16) { ((uint16_t *)gp)[i] = ddp__f32_to_bf16((float)g[i]); g[i] = ddp__bf16_to_f32(((uint16_t *)gp)[i]); }
            else { ((uint16_t *)gp)[i] = ddp__f32_to_f16((float)g[i]); g[i] = ddp__f16_to_f32(((uint16_t *)gp)[i]); }
        }
        CHECK_OK(ddp_mark_ready(ctx, id), ctx);
        CHECK_OK(ddp_step_end(ctx), ctx);
        CHECK_OK(ddp_optimizer_step(ctx), ctx);
        if (type == DDP_OPTIM_SGD) ref_sgd(p, g, m, N, 0.05, 0.9, damp, 0.01, nesterov, s);
        else ref_adamw(p, g, m, v, N, 0.05, 0.9, 0.95, 1e-8, 0.01, s);
    }
    for (i = 0; i < N; i++) {
        double got = dtype == DDP_F32 ? ((float *)ddp_param_data(ctx, id))[i]
                   : dtype == DDP_F64 ? ((double *)ddp_param_data(ctx, id))[i]
                   : dtype == DDP_BF16 ? ddp__bf16_to_f32(((uint16_t *)ddp_param_data(ctx, id))[i])
                   : ddp__f16_to_f32(((uint16_t *)ddp_param_data(ctx, id))[i]);
        double e = fabs(got - p[i]) / (fabs(p[i]) + 1e-3);
        if (e > maxerr) maxerr = e;
    }
    CHECK(maxerr <= tol, "%s nesterov=%d dampening=%g %s: max relative error %.3g > %.3g",
          type == DDP_OPTIM_SGD ? "sgd" : "adamw", nesterov, damp, ddp_dtype_name(dtype), maxerr, tol);
    CHECK(ddp_optimizer_steps(ctx) == STEPS, "step counter");
    ddp_destroy(ctx);
}

static void test_optimizers(void) {
    TEST("optimizers");
    run_optimizer_case(DDP_OPTIM_SGD, 0, 0, DDP_F32, 1e-5);
    run_optimizer_case(DDP_OPTIM_SGD, 1, 0, DDP_F32, 1e-5);
    run_optimizer_case(DDP_OPTIM_SGD, 0, 0.3, DDP_F32, 1e-5);
    run_optimizer_case(DDP_OPTIM_ADAMW, 0, 0, DDP_F32, 1e-5);
    /* f64: double hyper-parameters, so PyTorch's f64 arithmetic to the last bits */
    run_optimizer_case(DDP_OPTIM_SGD, 1, 0, DDP_F64, 1e-14);
    run_optimizer_case(DDP_OPTIM_SGD, 0, 0.3, DDP_F64, 1e-14);
    run_optimizer_case(DDP_OPTIM_ADAMW, 0, 0, DDP_F64, 1e-14);
    /* 16-bit parameters: f32 master weights, the stored copy is rounded */
    run_optimizer_case(DDP_OPTIM_ADAMW, 0, 0, DDP_BF16, 1e-2);
    run_optimizer_case(DDP_OPTIM_SGD, 0, 0, DDP_F16, 2e-3);
}

/* ddp_optimizer_defaults() gives PyTorch's defaults, and values are used as
   written (zero means zero); a zeroed desc keeps meaning "defaults" */
static void test_optimizer_defaults(void) {
    ddp_optimizer_desc d;
    ddp_config c = base_config(), q;
    ddp_context *ctx;
    TEST("optimizer defaults");
    d = ddp_optimizer_defaults(DDP_OPTIM_ADAMW);
    CHECK(d.exact == 1 && d.lr == 1e-3 && d.beta1 == 0.9 && d.beta2 == 0.999 && d.eps == 1e-8 && d.weight_decay == 1e-2 &&
          d.max_grad_norm == 0, "AdamW defaults: lr %g betas (%g, %g) eps %g weight_decay %g", d.lr, d.beta1, d.beta2, d.eps, d.weight_decay);
    d = ddp_optimizer_defaults(DDP_OPTIM_SGD);
    CHECK(d.exact == 1 && d.lr == 1e-3 && d.momentum == 0 && d.dampening == 0 && d.nesterov == 0 && d.weight_decay == 0,
          "SGD defaults: lr %g momentum %g dampening %g weight_decay %g", d.lr, d.momentum, d.dampening, d.weight_decay);
    /* exact: zero stays zero */
    c.optimizer = ddp_optimizer_defaults(DDP_OPTIM_ADAMW);
    c.optimizer.beta1 = 0;
    c.optimizer.eps = 0;
    c.optimizer.weight_decay = 0;
    ctx = make(&c);
    q = ddp_query_config(ctx);
    CHECK(q.optimizer.beta1 == 0 && q.optimizer.eps == 0 && q.optimizer.weight_decay == 0 && q.optimizer.beta2 == 0.999,
          "exact desc: beta1 %g eps %g weight_decay %g kept", q.optimizer.beta1, q.optimizer.eps, q.optimizer.weight_decay);
    ddp_destroy(ctx);
    /* a zeroed (legacy) desc: zero means the default, AdamW's weight decay included */
    c = base_config();
    c.optimizer.type = DDP_OPTIM_ADAMW;
    c.optimizer.lr = 0.01;
    ctx = make(&c);
    q = ddp_query_config(ctx);
    CHECK(q.optimizer.lr == 0.01 && q.optimizer.beta1 == 0.9 && q.optimizer.beta2 == 0.999 && q.optimizer.eps == 1e-8 &&
          q.optimizer.weight_decay == 1e-2 && q.optimizer.exact == 1,
          "zeroed desc resolved to defaults: beta1 %g weight_decay %g", q.optimizer.beta1, q.optimizer.weight_decay);
    ddp_destroy(ctx);
    c = base_config();
    c.optimizer.type = DDP_OPTIM_SGD;
    ctx = make(&c);
    q = ddp_query_config(ctx);
    CHECK(q.optimizer.weight_decay == 0 && q.optimizer.lr == 1e-3, "zeroed SGD desc: weight_decay 0, lr 1e-3");
    ddp_destroy(ctx);
    /* bad values name the field */
    {
        ddp_context *bad = NULL;
        c = base_config();
        c.optimizer = ddp_optimizer_defaults(DDP_OPTIM_ADAMW);
        c.optimizer.beta2 = 1.0;
        CHECK_ERR(ddp_create(&c, &bad), DDP_ERROR_INVALID_ARGUMENT, NULL, "config.optimizer.beta2 = 1");
        c.optimizer = ddp_optimizer_defaults(DDP_OPTIM_SGD);
        c.optimizer.lr = -1;
        CHECK_ERR(ddp_create(&c, &bad), DDP_ERROR_INVALID_ARGUMENT, NULL, "config.optimizer.lr = -1");
        c.optimizer.lr = 0.1;
        c.optimizer.weight_decay = 0.0 / 0.0;
        CHECK_ERR(ddp_create(&c, &bad), DDP_ERROR_INVALID_ARGUMENT, NULL, "config.optimizer.weight_decay");
        c.optimizer.weight_decay = 0;
        c.optimizer.momentum = 0.9;
        c.optimizer.dampening = 0.1;
        c.optimizer.nesterov = 1;
        CHECK_ERR(ddp_create(&c, &bad), DDP_ERROR_INVALID_ARGUMENT, NULL, "dampening 0");
        c.optimizer.nesterov = 0;
        c.optimizer.max_grad_norm = -2;
        CHECK_ERR(ddp_create(&c, &bad), DDP_ERROR_INVALID_ARGUMENT, NULL, "config.optimizer.max_grad_norm = -2");
        CHECK(bad == NULL, "no context");
    }
}

/* per-parameter options: the API, its errors, and the group limit */
static void test_param_options(void) {
    ddp_config c = base_config();
    ddp_context *ctx;
    ddp_param_options o, q;
    int id, i;
    char name[16];
    TEST("parameter options");
    ctx = make(&c);
    ddp_register_param(ctx, "w", 8, DDP_F32, NULL, &id);
    memset(&o, 0, sizeof o);
    q = ddp_get_param_options(ctx, id);
    CHECK(q.lr_scale == 1 && q.weight_decay_scale == 1 && !q.no_weight_decay, "defaults: scales 1");
    CHECK_ERR(ddp_set_param_options(ctx, 5, &o), DDP_ERROR_INVALID_ARGUMENT, ctx, "5 is not a parameter id");
    CHECK_ERR(ddp_set_param_options(ctx, id, NULL), DDP_ERROR_INVALID_ARGUMENT, ctx, "'w' are NULL");
    o.lr_scale = -1;
    CHECK_ERR(ddp_set_param_options(ctx, id, &o), DDP_ERROR_INVALID_ARGUMENT, ctx, "parameter 'w': lr_scale -1");
    o.lr_scale = 0.5;
    o.weight_decay_scale = 0.0 / 0.0;
    CHECK_ERR(ddp_set_param_options(ctx, id, &o), DDP_ERROR_INVALID_ARGUMENT, ctx, "weight_decay_scale");
    o.weight_decay_scale = 0;
    o.no_weight_decay = 1;
    CHECK_OK(ddp_set_param_options(ctx, id, &o), ctx);
    q = ddp_get_param_options(ctx, id);
    CHECK(q.lr_scale == 0.5 && q.weight_decay_scale == 0 && q.no_weight_decay, "set: lr 0.5, no decay");
    CHECK_OK(ddp_finalize(ctx), ctx);
    CHECK_ERR(ddp_set_param_options(ctx, id, &o), DDP_ERROR_INVALID_STATE, ctx, "before ddp_finalize");
    ddp_destroy(ctx);
    /* 17 distinct options: one too many */
    ctx = make(&c);
    for (i = 0; i < DDP_MAX_PARAM_GROUPS + 1; i++) {
        snprintf(name, sizeof name, "p%d", i);
        ddp_register_param(ctx, name, 4, DDP_F32, NULL, &id);
        memset(&o, 0, sizeof o);
        o.lr_scale = 1.0 + i;
        ddp_set_param_options(ctx, id, &o);
    }
    CHECK_ERR(ddp_finalize(ctx), DDP_ERROR_INVALID_ARGUMENT, ctx, "'p16' makes a 17th distinct set");
    ddp_destroy(ctx);
}

/* the schedules, written out independently */
static double want_lr(const ddp_schedule_desc *d, double lr, long t) {
    if (t < d->warmup_steps) return lr * (t + 1.0) / (double)d->warmup_steps;
    if (d->type == DDP_SCHEDULE_COSINE || d->type == DDP_SCHEDULE_LINEAR) {
        double x = (double)(t - d->warmup_steps) / (double)(d->total_steps - d->warmup_steps);
        if (t >= d->total_steps) return d->min_lr;
        if (d->type == DDP_SCHEDULE_COSINE) return d->min_lr + (lr - d->min_lr) * (1 + cos(3.14159265358979323846 * x)) / 2;
        return d->min_lr + (lr - d->min_lr) * (1 - x);
    }
    if (d->type == DDP_SCHEDULE_STEP) {
        double f = 1;
        long k;
        for (k = 0; k < (t - d->warmup_steps) / d->step_size; k++) f *= d->gamma == 0 ? 0.1 : d->gamma;
        return lr * f;
    }
    return lr;
}

/* every schedule: ddp_get_lr before each step, and the weights of plain
   SGD (p -= lr_t * g) against the same lrs */
static void test_schedules(void) {
    static const ddp_schedule_desc cases[] = {
        { DDP_SCHEDULE_CONSTANT, 0, 0, 0, 0, 0 },
        { DDP_SCHEDULE_CONSTANT, 3, 0, 0, 0, 0 },
        { DDP_SCHEDULE_COSINE, 4, 12, 0.01, 0, 0 },
        { DDP_SCHEDULE_COSINE, 0, 9, 0, 0, 0 },
        { DDP_SCHEDULE_LINEAR, 2, 10, 0.02, 0, 0 },
        { DDP_SCHEDULE_STEP, 0, 0, 0, 4, 0 },
        { DDP_SCHEDULE_STEP, 2, 0, 0, 3, 0.5 },
    };
    size_t k;
    TEST("schedules");
    for (k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        ddp_config c = base_config();
        ddp_context *ctx;
        int id, t, ok_lr = 1;
        float w0 = 1.0f;
        double p = 1.0, worst = 0;
        c.optimizer = ddp_optimizer_defaults(DDP_OPTIM_SGD);
        c.optimizer.lr = 0.2;
        c.schedule = cases[k];
        ctx = make(&c);
        ddp_register_param(ctx, "w", 1, DDP_F32, &w0, &id);
        ddp_finalize(ctx);
        for (t = 0; t < 15; t++) {
            double lr = want_lr(&cases[k], 0.2, t), got = ddp_get_lr(ctx);
            if (fabs(got - lr) > 1e-15 * lr) { ok_lr = 0; fprintf(stderr, "case %zu t=%d: lr %.17g, want %.17g\n", k, t, got, lr); }
            CHECK_OK(ddp_step_begin(ctx), ctx);
            ((float *)ddp_param_grad(ctx, id))[0] += 0.5f;
            ddp_mark_ready(ctx, id);
            CHECK_OK(ddp_step_end(ctx), ctx);
            CHECK_OK(ddp_optimizer_step(ctx), ctx);
            p -= (double)(float)lr * 0.5;
            if (fabs(((float *)ddp_param_data(ctx, id))[0] - p) > worst) worst = fabs(((float *)ddp_param_data(ctx, id))[0] - p);
        }
        CHECK(ok_lr, "schedule case %zu: ddp_get_lr follows the formula", k);
        CHECK(worst < 1e-6, "schedule case %zu: weights off by %.3g", k, worst);
        ddp_destroy(ctx);
    }
    {   /* ddp_set_lr sets the lr the schedule starts from */
        ddp_config c = base_config();
        ddp_context *ctx, *bad = NULL;
        int id;
        c.optimizer = ddp_optimizer_defaults(DDP_OPTIM_SGD);
        c.schedule.type = DDP_SCHEDULE_STEP;
        c.schedule.step_size = 1;
        c.schedule.gamma = 0.5;
        ctx = make(&c);
        ddp_register_param(ctx, "w", 1, DDP_F32, NULL, &id);
        ddp_finalize(ctx);
        CHECK(ddp_get_lr(ctx) == 1e-3, "lr at step 0: %g", ddp_get_lr(ctx));
        CHECK_OK(ddp_set_lr(ctx, 0.4), ctx);
        CHECK(ddp_get_lr(ctx) == 0.4, "after ddp_set_lr: %g", ddp_get_lr(ctx));
        CHECK_ERR(ddp_set_lr(ctx, -1), DDP_ERROR_INVALID_ARGUMENT, ctx, "lr -1");
        ddp_step_begin(ctx); ddp_mark_ready(ctx, id); ddp_step_end(ctx); ddp_optimizer_step(ctx);
        CHECK(ddp_get_lr(ctx) == 0.2, "one step later: %g", ddp_get_lr(ctx));
        ddp_destroy(ctx);
        c = base_config();
        c.schedule.type = DDP_SCHEDULE_COSINE;
        c.schedule.warmup_steps = 10;
        c.schedule.total_steps = 10;
        CHECK_ERR(ddp_create(&c, &bad), DDP_ERROR_INVALID_ARGUMENT, NULL, "config.schedule.total_steps = 10");
        c.schedule.type = DDP_SCHEDULE_STEP;
        CHECK_ERR(ddp_create(&c, &bad), DDP_ERROR_INVALID_ARGUMENT, NULL, "config.schedule.step_size = 0");
        c.schedule.type = (ddp_schedule)9;
        CHECK_ERR(ddp_create(&c, &bad), DDP_ERROR_INVALID_ARGUMENT, NULL, "config.schedule.type 9");
        c.schedule.type = DDP_SCHEDULE_CONSTANT;
        c.schedule.min_lr = -1;
        CHECK_ERR(ddp_create(&c, &bad), DDP_ERROR_INVALID_ARGUMENT, NULL, "config.schedule.min_lr = -1");
    }
}

static void test_clip(void) {
    ddp_config c = base_config();
    ddp_context *ctx;
    int a, b;
    double norm = 0;
    float *ga, *gb;
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
    CHECK(fabs(norm - 5) < 1e-12 && ga[0] == 3, "measure only: norm %g", norm);
    CHECK_OK(ddp_clip_grad_norm(ctx, 1.0, &norm), ctx);
    CHECK(fabs(norm - 5) < 1e-12 && fabsf(ga[0] - 0.6f) < 1e-5f && fabsf(gb[0] - 0.8f) < 1e-5f, "clipped to norm 1: %g %g", (double)ga[0], (double)gb[0]);
    CHECK_OK(ddp_clip_grad_norm(ctx, 10.0, &norm), ctx);
    CHECK(fabsf(ga[0] - 0.6f) < 1e-5f, "no change under the limit");
    ddp_destroy(ctx);
}

/* One micro-step on a world of one: add v to every element of w's gradient. */
static void micro(ddp_context *ctx, int id, int no_sync, float v) {
    float *g;
    size_t i;
    CHECK_OK(ddp_set_no_sync(ctx, no_sync), ctx);
    CHECK_OK(ddp_step_begin(ctx), ctx);
    g = (float *)ddp_param_grad(ctx, id);
    for (i = 0; i < ddp_param_numel(ctx, id); i++) g[i] += v * (float)(i + 1);
    CHECK_OK(ddp_mark_ready(ctx, id), ctx);
    CHECK_OK(ddp_step_end(ctx), ctx);
}

static int noop_fb(ddp_context *ctx, void *user, int m, float *loss) { (void)ctx; (void)user; (void)m; (void)loss; return 0; }

/* the accumulation rule (ACCUMULATION): gradients accumulate until
   ddp_optimizer_step() or ddp_zero_grad(), whatever mix of synced and
   no_sync steps; on a world of one the average over ranks is the identity */
static void test_accumulation(void) {
    ddp_config c = base_config();
    ddp_context *ctx;
    int id;
    float *g;
    TEST("accumulation");
    ctx = make(&c);
    ddp_register_param(ctx, "w", 3, DDP_F32, NULL, &id);
    ddp_finalize(ctx);
    g = (float *)ddp_param_grad(ctx, id);
    /* no_sync, no_sync, synced: the sum of the three (PyTorch's no_sync) */
    micro(ctx, id, 1, 1.0f);
    CHECK_ERR(ddp_optimizer_step(ctx), DDP_ERROR_INVALID_STATE, ctx, "never reduced");
    micro(ctx, id, 1, 2.0f);
    micro(ctx, id, 0, 3.0f);
    CHECK(g[0] == 6.0f && g[2] == 18.0f, "sum over 3 micro-steps: %g %g", (double)g[0], (double)g[2]);
    /* synced steps without an optimizer step keep accumulating */
    micro(ctx, id, 0, 0.5f);
    CHECK(g[0] == 6.5f && g[2] == 19.5f, "a second synced step adds: %g %g", (double)g[0], (double)g[2]);
    /* after a reduce, a no_sync step shows the reduced part plus the local one */
    micro(ctx, id, 1, 0.25f);
    CHECK(g[0] == 6.75f && g[1] == 13.5f, "no_sync after a reduce shows R + L: %g %g", (double)g[0], (double)g[1]);
    micro(ctx, id, 1, 0.25f);
    CHECK(g[0] == 7.0f, "and keeps accumulating: %g", (double)g[0]);
    micro(ctx, id, 0, 1.0f);
    CHECK(g[0] == 8.0f && g[2] == 24.0f, "mixed sequence: %g %g", (double)g[0], (double)g[2]);
    /* ddp_zero_grad ends it */
    CHECK_OK(ddp_zero_grad(ctx), ctx);
    CHECK(g[0] == 0 && g[2] == 0, "zeroed");
    micro(ctx, id, 0, 2.0f);
    CHECK(g[0] == 2.0f, "from zero after ddp_zero_grad: %g", (double)g[0]);
    ddp_destroy(ctx);

    /* with an optimizer: the step ends the accumulation; the gradient stays
       readable until the next step begins */
    c.optimizer = ddp_optimizer_defaults(DDP_OPTIM_SGD);
    c.optimizer.lr = 0.5;
    ctx = make(&c);
    ddp_register_param(ctx, "w", 3, DDP_F32, NULL, &id);
    ddp_finalize(ctx);
    g = (float *)ddp_param_grad(ctx, id);
    micro(ctx, id, 0, 1.0f);
    micro(ctx, id, 0, 1.0f);
    CHECK_OK(ddp_optimizer_step(ctx), ctx);
    CHECK(g[0] == 2.0f && ((float *)ddp_param_data(ctx, id))[0] == -1.0f, "step used the sum of 2 synced micro-steps (w %g)",
          (double)((float *)ddp_param_data(ctx, id))[0]);
    micro(ctx, id, 0, 1.0f);
    CHECK(g[0] == 1.0f, "the next step starts from zero: %g", (double)g[0]);
    /* ddp_train_step refuses to swallow un-reduced no_sync micro-steps */
    CHECK_OK(ddp_optimizer_step(ctx), ctx);
    micro(ctx, id, 1, 1.0f);
    CHECK_ERR(ddp_train_step(ctx, noop_fb, NULL, 2, NULL), DDP_ERROR_INVALID_STATE, ctx, "not reduced yet");
    ddp_destroy(ctx);

    c = base_config();
    c.gradient_sum = 1;
    ctx = make(&c);
    ddp_register_param(ctx, "w", 1, DDP_F32, NULL, &id);
    ddp_finalize(ctx);
    micro(ctx, id, 1, 3.0f);
    micro(ctx, id, 0, 3.0f);
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
    char path[256], bad[600];
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
    {   /* the writer's temporary is "PATH.tmp.<host>.<pid>" */
        char host[256];
        ddp__proc_hostname(host, sizeof host);
        snprintf(bad, sizeof bad, "%s.tmp.%s.%d", path, host, t_getpid());
    }
    f = fopen(bad, "rb");
    CHECK(f == NULL, "no temporary file '%s' left", bad);
    if (f) fclose(f);

    /* temporaries of writers killed in the instant between naming and
       renaming: those of dead writers on this host go (the next save
       removes them), those of live writers and of other hosts stay */
    {
        char host[256], dead[600], live[600], other[600], *names[3];
        int k, n;
        ddp__proc_hostname(host, sizeof host);
        snprintf(dead, sizeof dead, "%s.tmp.%s.%d", path, host, 2147483000); /* no such process */
        snprintf(live, sizeof live, "%s.tmp.%s.%d", path, host, t_getpid());
        snprintf(other, sizeof other, "%s.tmp.%s-elsewhere.%d", path, host, 2147483000);
        names[0] = dead; names[1] = live; names[2] = other;
        for (k = 0; k < 3; k++) {
            f = fopen(names[k], "wb");
            CHECK(f != NULL, "make '%s'", names[k]);
            if (f) { fputs("half a checkpoint", f); fclose(f); }
        }
        n = ddp__file_sweep_tmp(path);
        CHECK(n == 1, "the sweep removed one temporary, got %d", n);
        f = fopen(dead, "rb");
        CHECK(f == NULL, "a dead writer's temporary is removed");
        if (f) fclose(f);
        f = fopen(live, "rb");
        CHECK(f != NULL, "a live writer's temporary stays");
        if (f) fclose(f);
        f = fopen(other, "rb");
        CHECK(f != NULL, "another host's temporary stays");
        if (f) fclose(f);
        remove(live);
        f = fopen(dead, "wb");
        if (f) { fputs("half a checkpoint", f); fclose(f); }
        CHECK_OK(ddp_save_checkpoint(a, path), a);
        f = fopen(dead, "rb");
        CHECK(f == NULL, "the next save removes a dead writer's temporary");
        if (f) fclose(f);
        remove(dead);
        remove(other);
        b = ck_model(0, DDP_OPTIM_ADAMW);
        CHECK_OK(ddp_load_checkpoint(b, path), b);
        CHECK(ddp_optimizer_steps(b) == 5, "and writes the checkpoint: %lld steps", (long long)ddp_optimizer_steps(b));
        ddp_destroy(b);
    }

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

/* ---- checkpoint tampering: every header field range-checked ---- */

static uint64_t fnv(const unsigned char *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    size_t i;
    for (i = 0; i < n; i++) { h ^= p[i]; h *= 0x100000001b3ull; }
    return h;
}

/* write bytes with a recomputed checksum */
static void write_signed(const char *path, unsigned char *b, size_t n) {
    uint64_t h = fnv(b, n - 8);
    FILE *f = fopen(path, "wb");
    memcpy(b + n - 8, &h, 8);
    fwrite(b, 1, n, f);
    fclose(f);
}

static unsigned char *read_all(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    unsigned char *b;
    long sz;
    fseek(f, 0, SEEK_END); sz = ftell(f); fseek(f, 0, SEEK_SET);
    b = (unsigned char *)malloc((size_t)sz);
    *n = fread(b, 1, (size_t)sz, f);
    fclose(f);
    return b;
}

typedef struct tamper { size_t off; int len; int64_t i; double d; int is_double; const char *field; } tamper;

static void test_checkpoint_tampering(void) {
    /* the v2 layout for ck_model(0): header 120 bytes, then 'fc.weight' (9
       chars, 2 dims) at 120: namelen 120, name 124, dtype 133, numel 137,
       ndim 145, shape 149, lr_scale 165, weight_decay_scale 173 */
    static const tamper cases[] = {
        { 8, 4, 0, 0, 0, "'version'" }, { 8, 4, 3, 0, 0, "'version'" }, { 8, 4, 0xffffffffll, 0, 0, "'version'" },
        { 12, 4, 0, 0, 0, "'nparams'" }, { 12, 4, 0xffffffffll, 0, 0, "'nparams'" },
        { 16, 4, 7, 0, 0, "'optimizer'" },
        { 20, 4, 0x80, 0, 0, "'flags'" }, { 20, 4, 1, 0, 0, "'flags'" }, { 20, 4, 7, 0, 0, "'flags'" },
        { 24, 8, INT64_MAX, 0, 0, "'steps'" }, { 24, 8, -1, 0, 0, "'steps'" }, { 24, 8, ((int64_t)1 << 53) + 1, 0, 0, "'steps'" },
        { 32, 8, -1, 0, 0, "'sched_steps'" }, { 32, 8, 99, 0, 0, "'sched_steps'" },
        { 40, 8, 0, -1.0, 1, "'lr'" }, { 40, 8, 0, 0.0 / 0.0, 1, "'lr'" }, { 40, 8, 0, 1.0 / 0.0, 1, "'lr'" },
        { 48, 4, 9, 0, 0, "'schedule'" },
        { 52, 8, -5, 0, 0, "'warmup_steps'" }, { 60, 8, INT64_MIN, 0, 0, "'total_steps'" },
        { 68, 8, 0, -0.5, 1, "'min_lr'" }, { 76, 8, -1, 0, 0, "'step_size'" }, { 84, 8, 0, 1.0 / 0.0, 1, "'gamma'" },
        { 92, 4, 2, 0, 0, "'loss_scaling'" },
        { 96, 8, 0, 0.0, 1, "'loss_scale'" }, { 96, 8, 0, 1.0 / 0.0, 1, "'loss_scale'" }, { 96, 8, 0, 0.1, 1, "'loss_scale'" },
        { 104, 8, -1, 0, 0, "'growth_tracker'" }, { 112, 8, -1, 0, 0, "'skipped'" }, { 112, 8, INT64_MAX, 0, 0, "'skipped'" },
        { 120, 4, 0, 0, 0, "'namelen' of parameter '0" }, { 120, 4, 100000, 0, 0, "'namelen' of parameter '0" },
        { 133, 4, 9, 0, 0, "'dtype' of parameter 0 'fc.weight'" }, { 133, 4, 5, 0, 0, "'dtype' of parameter 0" },
        { 137, 8, 0, 0, 0, "'numel' of parameter 0" }, { 137, 8, (int64_t)1 << 41, 0, 0, "'numel' of parameter 0" },
        { 137, 8, 13, 0, 0, "'shape' of parameter 0" },
        { 145, 4, 0, 0, 0, "'ndim' of parameter 0" }, { 145, 4, 9, 0, 0, "'ndim' of parameter 0" },
        { 149, 8, 0, 0, 0, "'shape' of parameter 0" }, { 149, 8, -4, 0, 0, "'shape' of parameter 0" },
        { 165, 8, 0, 0.0 / 0.0, 1, "'lr_scale' of parameter 0" }, { 173, 8, 0, -1.0, 1, "'weight_decay_scale' of parameter 0" },
    };
    char path[256], bad[300];
    unsigned char *orig, *b;
    size_t n, k;
    ddp_context *a, *m;
    TEST("checkpoint tampering");
    snprintf(path, sizeof path, "/tmp/ddp_test_tamper_%d.bin", (int)getpid());
    snprintf(bad, sizeof bad, "%s.bad", path);
    a = ck_model(0, DDP_OPTIM_ADAMW);
    train_some(a, 3);
    CHECK_OK(ddp_save_checkpoint(a, path), a);
    orig = read_all(path, &n);
    b = (unsigned char *)malloc(n);
    m = ck_model(0, DDP_OPTIM_ADAMW);
    {   /* the layout above is the file's */
        uint32_t v, nl;
        memcpy(&v, orig + 8, 4);
        memcpy(&nl, orig + 120, 4);
        CHECK(v == 2 && nl == 9 && !memcmp(orig + 124, "fc.weight", 9), "version 2 layout (version %u, namelen %u)", v, nl);
    }
    for (k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        const tamper *t = &cases[k];
        float before = ((float *)ddp_param_data(m, 0))[2];
        ddp_result r;
        memcpy(b, orig, n);
        if (t->is_double) memcpy(b + t->off, &t->d, 8);
        else if (t->len == 4) { uint32_t u = (uint32_t)t->i; memcpy(b + t->off, &u, 4); }
        else memcpy(b + t->off, &t->i, 8);
        write_signed(bad, b, n);
        r = ddp_load_checkpoint(m, bad);
        CHECK(r == DDP_ERROR_CORRUPT && strstr(ddp_last_error(m), t->field) != NULL,
              "offset %zu = %lld/%g: %s: %s (expected CORRUPT naming %s)", t->off, (long long)t->i, t->d, ddp_result_string(r),
              ddp_last_error(m), t->field);
        CHECK(((float *)ddp_param_data(m, 0))[2] == before && ddp_optimizer_steps(m) == 0, "a rejected file changes nothing");
    }
    /* an in-range count of another model is a mismatch, not corruption */
    memcpy(b, orig, n);
    { uint32_t u = 5; memcpy(b + 12, &u, 4); }
    write_signed(bad, b, n);
    CHECK_ERR(ddp_load_checkpoint(m, bad), DDP_ERROR_MISMATCH, m, "it has 5 parameters, this model 2");
    /* the untouched bytes, re-signed, load */
    memcpy(b, orig, n);
    write_signed(bad, b, n);
    CHECK_OK(ddp_load_checkpoint(m, bad), m);
    CHECK(ddp_optimizer_steps(m) == 3, "steps restored");

    /* version 1 (no training-state block, no scales) is still read */
    {
        ddp_context *v1 = ck_model(0, DDP_OPTIM_ADAMW);
        unsigned char *o = (unsigned char *)malloc(n);
        size_t at = 0, i = 0, len;
        uint32_t one = 1;
        int q;
        memcpy(o, orig, 32); at = 32;          /* magic .. steps */
        memcpy(o + 8, &one, 4);
        i = 120;
        for (q = 0; q < 2; q++) {              /* parameter headers without the scales */
            uint32_t nl, nd;
            memcpy(&nl, orig + i, 4);
            memcpy(&nd, orig + i + 4 + nl + 12, 4);
            len = 4 + nl + 4 + 8 + 4 + 8 * (size_t)nd;
            memcpy(o + at, orig + i, len);
            at += len;
            i += len + 16;
        }
        memcpy(o + at, orig + i, n - i);       /* data, state, checksum */
        at += n - i;
        write_signed(bad, o, at);
        CHECK_OK(ddp_load_checkpoint(v1, bad), v1);
        CHECK(memcmp(ddp_flat_params(a), ddp_flat_params(v1), ddp_flat_bytes(a)) == 0 && ddp_optimizer_steps(v1) == 3,
              "a version-1 file loads the weights and the optimizer state");
        train_some(a, 2);
        train_some(v1, 2);
        CHECK(memcmp(ddp_flat_params(a), ddp_flat_params(v1), ddp_flat_bytes(a)) == 0, "and training goes on as from the original");
        free(o);
        ddp_destroy(v1);
    }
    free(b);
    free(orig);
    remove(bad);
    remove(path);
    ddp_destroy(m);
    ddp_destroy(a);
}

/* a file without the optimizer state a context needs is an error, unless
   the call asks for a fresh optimizer */
static void test_checkpoint_reset(void) {
    char path[256];
    ddp_context *none, *adam, *sgd, *mom;
    ddp_config c = base_config();
    int id;
    TEST("checkpoint without optimizer state");
    snprintf(path, sizeof path, "/tmp/ddp_test_reset_%d.bin", (int)getpid());
    none = ck_model(0, DDP_OPTIM_NONE);
    CHECK_OK(ddp_save_checkpoint(none, path), none);
    adam = ck_model(0, DDP_OPTIM_ADAMW);
    train_some(adam, 2);
    CHECK_ERR(ddp_load_checkpoint(adam, path), DDP_ERROR_MISMATCH, adam, "holds no optimizer state");
    CHECK(ddp_optimizer_steps(adam) == 2, "refused: state kept");
    CHECK_ERR(ddp_load_checkpoint_ex(adam, path, 8), DDP_ERROR_INVALID_ARGUMENT, adam, "unknown bits");
    CHECK_OK(ddp_load_checkpoint_ex(adam, path, DDP_LOAD_RESET_OPTIMIZER), adam);
    CHECK(ddp_optimizer_steps(adam) == 0 && memcmp(ddp_flat_params(adam), ddp_flat_params(none), ddp_flat_bytes(none)) == 0,
          "reset: the weights, step 0");
    {   /* and it trains like a new context from those weights */
        ddp_context *fresh = ck_model(0, DDP_OPTIM_ADAMW);
        CHECK_OK(ddp_load_checkpoint_ex(fresh, path, DDP_LOAD_RESET_OPTIMIZER), fresh);
        train_some(fresh, 2);
        train_some(adam, 2);
        CHECK(memcmp(ddp_flat_params(adam), ddp_flat_params(fresh), ddp_flat_bytes(fresh)) == 0, "no stale moments after the reset");
        ddp_destroy(fresh);
    }
    /* plain SGD at step 3 has no momentum buffer: a momentum SGD needs one */
    sgd = ck_model(0, DDP_OPTIM_SGD);
    train_some(sgd, 3);
    CHECK_OK(ddp_save_checkpoint(sgd, path), sgd);
    CHECK_ERR(ddp_load_checkpoint(adam, path), DDP_ERROR_MISMATCH, adam, "holds the state of optimizer SGD, this context uses AdamW");
    c.optimizer = ddp_optimizer_defaults(DDP_OPTIM_SGD);
    c.optimizer.momentum = 0.9;
    mom = make(&c);
    {
        int64_t shape[2] = { 4, 3 };
        ddp_register_param_shape(mom, "fc.weight", 2, shape, DDP_F32, NULL, &id);
        ddp_register_param(mom, "fc.bias", 4, DDP_F32, NULL, &id);
        ddp_finalize(mom);
    }
    CHECK_ERR(ddp_load_checkpoint(mom, path), DDP_ERROR_MISMATCH, mom, "no momentum / first-moment state for this optimizer at step 3");
    CHECK_OK(ddp_load_checkpoint_ex(mom, path, DDP_LOAD_RESET_OPTIMIZER), mom);
    /* other parameter options than at save time */
    {
        ddp_context *g = make(&c);
        ddp_param_options o;
        int64_t shape[2] = { 4, 3 };
        memset(&o, 0, sizeof o);
        o.no_weight_decay = 1;
        ddp_register_param_shape(g, "fc.weight", 2, shape, DDP_F32, NULL, &id);
        ddp_register_param(g, "fc.bias", 4, DDP_F32, NULL, &id);
        ddp_set_param_options(g, id, &o);
        ddp_finalize(g);
        train_some(g, 1);
        CHECK_OK(ddp_save_checkpoint(g, path), g);
        CHECK_ERR(ddp_load_checkpoint(mom, path), DDP_ERROR_MISMATCH, mom, "other options for parameter 1 'fc.bias'");
        CHECK_OK(ddp_load_checkpoint_ex(mom, path, DDP_LOAD_RESET_OPTIMIZER), mom);
        ddp_destroy(g);
    }
    ddp_destroy(mom);
    ddp_destroy(sgd);
    ddp_destroy(adam);
    ddp_destroy(none);
    remove(path);
}

static void test_join_world1(void) {
    ddp_config c = base_config();
    ddp_context *ctx;
    int id;
    TEST("join, world 1");
    ctx = make(&c);
    ddp_register_param(ctx, "w", 4, DDP_F32, NULL, &id);
    ddp_finalize(ctx);
    CHECK_ERR(ddp_join(ctx), DDP_ERROR_INVALID_STATE, ctx, "config.uneven_inputs");
    ddp_destroy(ctx);
    c.uneven_inputs = 1;
    c.optimizer = ddp_optimizer_defaults(DDP_OPTIM_SGD);
    ctx = make(&c);
    ddp_register_param(ctx, "w", 4, DDP_F32, NULL, &id);
    ddp_finalize(ctx);
    CHECK_OK(ddp_step_begin(ctx), ctx);
    CHECK_ERR(ddp_join(ctx), DDP_ERROR_INVALID_STATE, ctx, "inside a step");
    ddp_mark_ready(ctx, id);
    CHECK_OK(ddp_step_end(ctx), ctx);
    CHECK_OK(ddp_optimizer_step(ctx), ctx);
    CHECK_OK(ddp_join(ctx), ctx);
    CHECK_ERR(ddp_train_step(ctx, noop_fb, NULL, 70000, NULL), DDP_ERROR_INVALID_ARGUMENT, ctx, "above 65536");
    ddp_destroy(ctx);
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

/* Named shared-memory segments, the kind Windows (and POSIX without memfd)
   uses: rank 0 makes one (ddp__seg_create) under a name with its pid and 96
   random bits that exists once (O_EXCL), lives until ddp__shm_obj_unlink
   (Windows: the handle the creator keeps), the mapping until it is
   unmapped; the memory is the current user's and nobody else's (Windows:
   owned by the user's SID, a DACL of that one entry), in whole pages; a
   receiver (ddp__seg_verify) accepts it with rank 0's nonce and refuses it
   with another, and refuses memory that others may open. */
static void test_shm_segments(void) {
    ddp_context *r0 = (ddp_context *)calloc(1, sizeof *r0), *r1 = (ddp_context *)calloc(1, sizeof *r1);
    char name[64], who[300];
    int fd = -1, fd2 = -1, t;
    size_t size = 0, bytes = (size_t)1 << 16;
    void *p = NULL, *q = NULL;
    const char *rnd;
    TEST("shared-memory segments");
    r0->world = r1->world = 2;
    r1->rank = 1;
    r0->shm.named = r1->shm.named = 1;
    ddp__mutex_init(&r0->err_mu);
    ddp__mutex_init(&r1->err_mu);
    CHECK(ddp__sys_random(r0->shm.nonce, sizeof r0->shm.nonce) == 0, "random bytes");
    memcpy(r1->shm.nonce, r0->shm.nonce, sizeof r1->shm.nonce);
    CHECK(ddp__seg_create(r0, "test", bytes, bytes, &fd, name, sizeof name, &p) == DDP_SUCCESS, "create: %s", r0->err);
    CHECK(!strncmp(name, DDP__SHM_NAME_PREFIX "ddp-", strlen(DDP__SHM_NAME_PREFIX) + 4) && atoi(name + strlen(DDP__SHM_NAME_PREFIX) + 4) == ddp__getpid(),
          "name '%s' starts with the creator's pid", name);
    rnd = strrchr(name, '-');
    CHECK(rnd && strlen(rnd + 1) == 24 && strspn(rnd + 1, "0123456789abcdef") == 24, "96 random bits in '%s'", name);
    CHECK(ddp__shm_obj_create_named(name, bytes, &fd2) != 0 && errno == EEXIST, "a second create of '%s' fails (O_EXCL)", name);
    if (p) ddp__seg_header((ddp__seg_hdr *)p, r0, 1, bytes, 0);
    t = ddp__shm_obj_trust(fd, &size, who, sizeof who);
    CHECK(t == DDP__SHM_TRUSTED && size == bytes, "the creator's own, nobody else's, %zu bytes (%d, %zu, %s)", bytes, t, size, who);
    ddp__shm_obj_close(fd);
    CHECK(ddp__shm_obj_open_named(name, &fd2) == 0, "the name outlives the creator's handle: %s", ddp__strerror(errno));
    CHECK(ddp__seg_verify(r1, fd2, "shm/test", 1, bytes) == DDP_SUCCESS, "a receiver with rank 0's nonce accepts it: %s", r1->err);
    CHECK(ddp__seg_verify(r1, fd2, "shm/test", 1, bytes * 2) == DDP_ERROR_SECURITY && strstr(r1->err, "expected"),
          "... not when the size differs: %s", r1->err);
    r1->shm.nonce[3] ^= 1;
    CHECK(ddp__seg_verify(r1, fd2, "shm/test", 1, bytes) == DDP_ERROR_SECURITY && strstr(r1->err, "not this context's"),
          "... nor with another nonce: %s", r1->err);
    r1->shm.nonce[3] ^= 1;
    q = ddp__shm_obj_map(fd2, bytes, 1);
    CHECK(q != NULL, "second map");
    if (p && q) {
        ((volatile int *)p)[100] = 4242;
        CHECK(((volatile int *)q)[100] == 4242, "both views share the memory");
    }
#if defined(_WIN32)
    {
        HANDLE m = OpenFileMappingA(READ_CONTROL, FALSE, name);
        PACL dacl = NULL;
        PSID owner = NULL;
        PSECURITY_DESCRIPTOR sd = NULL;
        void *ace = NULL;
        union { TOKEN_USER tu; unsigned char b[256]; } user;
        HANDLE tok;
        DWORD len = 0;
        CHECK(m != NULL, "open for READ_CONTROL");
        CHECK(m && GetSecurityInfo(m, SE_KERNEL_OBJECT, OWNER_SECURITY_INFORMATION | DACL_SECURITY_INFORMATION, &owner, NULL, &dacl, NULL, &sd) == ERROR_SUCCESS,
              "read its security");
        CHECK(dacl && dacl->AceCount == 1 && GetAce(dacl, 0, &ace), "a DACL of one entry (%d)", dacl ? (int)dacl->AceCount : -1);
        CHECK(OpenProcessToken(GetCurrentProcess(), TOKEN_QUERY, &tok), "token");
        CHECK(GetTokenInformation(tok, TokenUser, user.b, sizeof user.b, &len), "token user");
        CloseHandle(tok);
        CHECK(ace && ((ACE_HEADER *)ace)->AceType == ACCESS_ALLOWED_ACE_TYPE &&
              EqualSid((PSID)&((ACCESS_ALLOWED_ACE *)ace)->SidStart, user.tu.User.Sid), "the entry allows the current user");
        CHECK(owner && EqualSid(owner, user.tu.User.Sid), "the current user owns it");
        if (sd) LocalFree(sd);
        if (m) CloseHandle(m);
    }
#endif
    ddp__shm_obj_close(fd2);
    ddp__shm_obj_unlink(name);
    CHECK(ddp__shm_obj_open_named(name, &fd2) != 0, "the name is gone after unlink");
    if (q && p) CHECK(((volatile int *)q)[100] == 4242, "the mappings stay valid after unlink");
    ddp__shm_obj_unmap(p, bytes);
    ddp__shm_obj_unmap(q, bytes);

    /* memory others may open (default security) is refused */
    {
        char other[96];
        int ofd = -1;
        snprintf(other, sizeof other, DDP__SHM_NAME_PREFIX "ddp-%d-0-open-test", ddp__getpid());
#if defined(_WIN32)
        {
            HANDLE m = CreateFileMappingA(INVALID_HANDLE_VALUE, NULL, PAGE_READWRITE | SEC_COMMIT, 0, (DWORD)bytes, other);
            CHECK(m != NULL, "a mapping with default security");
            ofd = m ? (int)(INT_PTR)m : -1;
        }
#else
        ofd = shm_open(other, O_RDWR | O_CREAT | O_EXCL, 0644);
        CHECK(ofd >= 0 && fchmod(ofd, 0644) == 0 && ftruncate(ofd, (off_t)bytes) == 0, "a segment of mode 644");
        shm_unlink(other);
#endif
        if (ofd >= 0) {
            CHECK(ddp__shm_obj_trust(ofd, &size, who, sizeof who) == DDP__SHM_SHARED, "... is open to others: %s", who);
            CHECK(ddp__seg_verify(r1, ofd, "shm/x", 1, bytes) == DDP_ERROR_SECURITY && strstr(r1->err, "open to other users"),
                  "... and refused: %s", r1->err);
            ddp__shm_obj_close(ofd);
        }
    }
    ddp__mutex_destroy(&r0->err_mu);
    ddp__mutex_destroy(&r1->err_mu);
    free(r0);
    free(r1);
}

int main(void) {
    clear_env();
    test_shm_segments();
    test_names();
    test_version();
    test_config();
    test_bad_environment();
    test_bad_params();
    test_missing_mark();
    test_missing_mark_long_names();
    test_buckets();
    test_optimizers();
    test_optimizer_defaults();
    test_param_options();
    test_schedules();
    test_clip();
    test_accumulation();
    test_train_step();
    test_checkpoint();
    test_checkpoint_tampering();
    test_checkpoint_reset();
    test_collectives_world1();
    test_join_world1();
    test_f16_conversions();
    return t_summary("test_core");
}
