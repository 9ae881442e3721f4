/* safetensors in ddp.h (world of one):
     test_safetensors             round trip of every dtype and shape, the
                                  errors (missing, extra, dtype, shape, bad
                                  input), a table of malformed files, and a
                                  mutation fuzz: no mutated file crashes the
                                  reader or loads wrong data
     test_safetensors write PATH  write the model below (values: value()),
                                  for tests/safetensors_interop.py to check
     test_safetensors read PATH   load a file written by that script (the
                                  values negated) and check every value
   Environment: DDP_FUZZ_ITERS (default 10000) mutations. */
#define DDP_IMPLEMENTATION
#include "../ddp.h"
#include "testing.h"
#include "testproc.h"
#include <math.h>

/* The model; tests/safetensors_interop.py holds the same table. */
typedef struct spec { const char *name; ddp_dtype dtype; int ndim; int64_t shape[3]; int plain; } spec;
static const spec k_model[] = {
    { "embed.weight",       DDP_F32,  2, { 7, 5, 0 }, 0 },
    { "proj.weight",        DDP_F64,  2, { 4, 3, 0 }, 0 },
    { "proj.bias",          DDP_F64,  1, { 4, 0, 0 }, 1 },  /* registered with ddp_register_param */
    { "norm.w16",           DDP_F16,  3, { 2, 3, 2 }, 0 },
    { "head.bf16",          DDP_BF16, 1, { 9, 0, 0 }, 0 },
    { "caf\xc3\xa9.scale",  DDP_F32,  1, { 1, 0, 0 }, 1 }   /* a UTF-8 name */
};
#define NP ((int)(sizeof k_model / sizeof k_model[0]))

static size_t numel_of(const spec *s) {
    size_t n = 1;
    int k;
    for (k = 0; k < s->ndim; k++) n *= (size_t)s->shape[k];
    return n;
}

/* exact in every dtype for the dyadic part; F32/F64 get a third on top */
static double value(int p, size_t i) {
    double v = (double)((long)((i * 37 + (size_t)p * 11) % 41) - 20) * 0.125;
    if (k_model[p].dtype == DDP_F32 || k_model[p].dtype == DDP_F64) v += (double)(i + 1) / 3.0;
    return v;
}

static void store(void *buf, ddp_dtype t, size_t i, double v) {
    switch (t) {
    case DDP_F32: ((float *)buf)[i] = (float)v; break;
    case DDP_F64: ((double *)buf)[i] = v; break;
    case DDP_F16: ((uint16_t *)buf)[i] = ddp__f32_to_f16((float)v); break;
    case DDP_BF16: ((uint16_t *)buf)[i] = ddp__f32_to_bf16((float)v); break;
    default: break;
    }
}

static double load(const void *buf, ddp_dtype t, size_t i) {
    switch (t) {
    case DDP_F32: return ((const float *)buf)[i];
    case DDP_F64: return ((const double *)buf)[i];
    case DDP_F16: return ddp__f16_to_f32(((const uint16_t *)buf)[i]);
    case DDP_BF16: return ddp__bf16_to_f32(((const uint16_t *)buf)[i]);
    default: return 0;
    }
}

/* the expected value as stored in dtype t */
static double stored(ddp_dtype t, double v) {
    unsigned char b[8];
    store(b, t, 0, v);
    return load(b, t, 0);
}

/* A context with the model (all of k_model but `skip`, plus an extra
   parameter "extra" when add_extra), values sign * value(), or zeros. */
static int g_rank = 0, g_world = 1, g_port = 0;  /* the ranks of test_two_ranks */

static ddp_context *make_model(int skip, int add_extra, double sign, ddp_optimizer opt) {
    ddp_config c;
    ddp_context *ctx = NULL;
    int p, id;
    memset(&c, 0, sizeof c);
    c.rank = g_rank;
    c.world_size = g_world;
    c.master_addr = "127.0.0.1";
    c.master_port = g_port;
    c.timeout_s = 10;
    c.optimizer.type = opt;
    c.optimizer.lr = 0.5f;
    if (ddp_create(&c, &ctx) != DDP_SUCCESS) { fprintf(stderr, "ddp_create: %s\n", ddp_create_error()); exit(2); }
    static const float e[3] = { 1.5f, 2.5f, 3.5f };
    unsigned char *init[NP];   /* read at ddp_finalize */
    for (p = 0; p < NP; p++) {
        const spec *s = &k_model[p];
        size_t n = numel_of(s), i;
        ddp_result r;
        init[p] = (unsigned char *)calloc(n, 8);
        if (p == skip) continue;
        for (i = 0; i < n && sign != 0; i++) store(init[p], s->dtype, i, sign * value(p, i));
        r = s->plain ? ddp_register_param(ctx, s->name, n, s->dtype, init[p], &id)
                     : ddp_register_param_shape(ctx, s->name, s->ndim, s->shape, s->dtype, init[p], &id);
        if (r != DDP_SUCCESS) { fprintf(stderr, "register %s: %s\n", s->name, ddp_last_error(ctx)); exit(2); }
    }
    if (add_extra && ddp_register_param(ctx, "extra", 3, DDP_F32, e, &id) != DDP_SUCCESS) exit(2);
    if (ddp_finalize(ctx) != DDP_SUCCESS) { fprintf(stderr, "finalize: %s\n", ddp_last_error(ctx)); exit(2); }
    for (p = 0; p < NP; p++) free(init[p]);
    return ctx;
}

static int param_id(ddp_context *ctx, const char *name) {
    int i;
    for (i = 0; i < ddp_param_count(ctx); i++)
        if (!strcmp(ddp_param_name(ctx, i), name)) return i;
    return -1;
}

/* how many values of the model's parameters differ from sign * value() */
static int count_wrong(ddp_context *ctx, double sign) {
    int p, bad = 0;
    for (p = 0; p < NP; p++) {
        int id = param_id(ctx, k_model[p].name);
        size_t i, n = numel_of(&k_model[p]);
        if (id < 0) continue;
        for (i = 0; i < n; i++)
            if (load(ddp_param_data(ctx, id), k_model[p].dtype, i) != stored(k_model[p].dtype, sign * value(p, i))) bad++;
    }
    return bad;
}

static unsigned char *read_all(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    unsigned char *b;
    long n;
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    b = (unsigned char *)malloc((size_t)n + 1);
    if (fread(b, 1, (size_t)n, f) != (size_t)n) { free(b); fclose(f); return NULL; }
    fclose(f);
    *len = (size_t)n;
    return b;
}

static void write_all(const char *path, const unsigned char *b, size_t n) {
    FILE *f;
    remove(path);  /* a new file: ext4 flushes a truncated-and-rewritten one at close */
    f = fopen(path, "wb");
    if (!f || fwrite(b, 1, n, f) != n) { fprintf(stderr, "cannot write %s\n", path); exit(2); }
    fclose(f);
}

static uint64_t header_len(const unsigned char *b) {
    uint64_t n = 0;
    int i;
    for (i = 7; i >= 0; i--) n = (n << 8) | b[i];
    return n;
}

static char g_dir[256];

static void test_roundtrip(void) {
    static const char *meta[] = { "epoch", "3", "note", "a \"quote\", a \\ and\na newline", NULL };
    char path[300], header[4096];
    unsigned char *file;
    size_t len = 0, i;
    uint64_t n;
    ddp_context *a, *b;
    TEST("round trip");
    snprintf(path, sizeof path, "%s/model.safetensors", g_dir);
    a = make_model(-1, 0, 1.0, DDP_OPTIM_NONE);
    CHECK_OK(ddp_save_safetensors(a, path, meta), a);
    file = read_all(path, &len);
    CHECK(file != NULL && len > 8, "the file exists");
    if (!file) return;
    n = header_len(file);
    CHECK(n % 8 == 0 && 8 + n <= len && file[8] == '{', "header: %llu bytes, a multiple of 8, begins with '{'", (unsigned long long)n);
    memcpy(header, file + 8, n < sizeof header ? (size_t)n : sizeof header - 1);
    header[n < sizeof header ? (size_t)n : sizeof header - 1] = 0;
    CHECK(strstr(header, "\"__metadata__\":{\"format\":\"pt\",\"epoch\":\"3\",\"note\":\"a \\\"quote\\\", a \\\\ and\\u000aa newline\"}") != NULL,
          "metadata with format pt and escapes: %s", header);
    CHECK(strstr(header, "\"proj.bias\":{\"dtype\":\"F64\",\"shape\":[4]") != NULL, "1-D parameter: shape [count]");
    CHECK(strstr(header, "\"norm.w16\":{\"dtype\":\"F16\",\"shape\":[2,3,2]") != NULL, "3-D shape");
    /* widest first: the F64 tensors start the data */
    CHECK(strstr(header, "\"proj.weight\":{\"dtype\":\"F64\",\"shape\":[4,3],\"data_offsets\":[0,96]}") != NULL, "F64 first: %s", header);
    for (i = 8 + (size_t)n - 1; file[i] == ' '; i--) { }
    CHECK(file[i] == '}', "padding is spaces after the closing brace");
    free(file);

    b = make_model(-1, 0, 0.0, DDP_OPTIM_NONE);
    CHECK(count_wrong(b, 1.0) > 0, "a fresh model holds other values");
    CHECK_OK(ddp_load_safetensors(b, path, 0), b);
    CHECK(count_wrong(b, 1.0) == 0, "every value loads back exactly (%d wrong)", count_wrong(b, 1.0));
    ddp_destroy(b);

    /* 16-bit parameters: the optimizer's f32 master copies follow the load
       (a step with zero gradients keeps the loaded values) */
    b = make_model(-1, 0, 0.0, DDP_OPTIM_SGD);
    CHECK_OK(ddp_step_begin(b), b);
    { int p; for (p = 0; p < ddp_param_count(b); p++) ddp_mark_ready(b, p); }
    CHECK_OK(ddp_step_end(b), b);
    CHECK_OK(ddp_optimizer_step(b), b);           /* master copies now exist, of zeros */
    CHECK_OK(ddp_load_safetensors(b, path, 0), b);
    CHECK_OK(ddp_step_begin(b), b);
    { int p; for (p = 0; p < ddp_param_count(b); p++) ddp_mark_ready(b, p); }
    CHECK_OK(ddp_step_end(b), b);
    CHECK_OK(ddp_optimizer_step(b), b);
    CHECK(count_wrong(b, 1.0) == 0, "after a zero-gradient step the loaded values stay (%d wrong)", count_wrong(b, 1.0));
    ddp_destroy(b);
    ddp_destroy(a);
}

static void test_errors(void) {
    char path[300], missing[300];
    ddp_context *a, *b;
    TEST("errors");
    snprintf(path, sizeof path, "%s/model.safetensors", g_dir);
    snprintf(missing, sizeof missing, "%s/no/such/dir/x.safetensors", g_dir);
    a = make_model(-1, 0, 1.0, DDP_OPTIM_NONE);
    CHECK_OK(ddp_save_safetensors(a, path, NULL), a);

    b = make_model(-1, 1, 0.0, DDP_OPTIM_NONE);     /* has a parameter the file lacks */
    CHECK_ERR(ddp_load_safetensors(b, path, 0), DDP_ERROR_MISMATCH, b, "has no tensor 'extra'");
    CHECK(count_wrong(b, 0.0) == 0, "a failed load changes nothing");
    CHECK_OK(ddp_load_safetensors(b, path, DDP_SAFETENSORS_ALLOW_MISSING), b);
    CHECK(count_wrong(b, 1.0) == 0, "ALLOW_MISSING loads the others");
    CHECK(((float *)ddp_param_data(b, param_id(b, "extra")))[2] == 3.5f, "ALLOW_MISSING keeps the missing one");
    ddp_destroy(b);

    b = make_model(4, 0, 0.0, DDP_OPTIM_NONE);      /* lacks head.bf16 */
    CHECK_ERR(ddp_load_safetensors(b, path, 0), DDP_ERROR_MISMATCH, b, "has tensor 'head.bf16', which is no parameter");
    CHECK_OK(ddp_load_safetensors(b, path, DDP_SAFETENSORS_ALLOW_EXTRA), b);
    CHECK(count_wrong(b, 1.0) == 0, "ALLOW_EXTRA skips the extra tensor, loads the rest");
    CHECK_ERR(ddp_load_safetensors(b, path, 4), DDP_ERROR_INVALID_ARGUMENT, b, "unknown flags");
    CHECK_ERR(ddp_load_safetensors(b, NULL, 0), DDP_ERROR_INVALID_ARGUMENT, b, "path");
    CHECK_ERR(ddp_load_safetensors(b, missing, 0), DDP_ERROR_IO, b, "cannot open");
    CHECK_ERR(ddp_save_safetensors(b, missing, NULL), DDP_ERROR_IO, b, "cannot create");
    { const char *m[] = { "k", NULL };
      CHECK_ERR(ddp_save_safetensors(b, path, m), DDP_ERROR_INVALID_ARGUMENT, b, "metadata key 'k' has no value"); }
    { const char *m[] = { "k", "1", "k", "2", NULL };
      CHECK_ERR(ddp_save_safetensors(b, path, m), DDP_ERROR_INVALID_ARGUMENT, b, "'k' is given twice"); }
    { const char *m[] = { "k", "\xff", NULL };
      CHECK_ERR(ddp_save_safetensors(b, path, m), DDP_ERROR_INVALID_ARGUMENT, b, "not valid UTF-8"); }
    ddp_destroy(b);

    {   /* dtype and shape mismatches name the tensor */
        ddp_config c;
        ddp_context *x;
        int id;
        int64_t bad_shape[2] = { 5, 7 }, plain_shape[1] = { 35 };
        const int64_t *shapes[3] = { bad_shape, plain_shape, NULL };
        int ndims[3] = { 2, 1, 2 };
        ddp_dtype types[3] = { DDP_F32, DDP_F32, DDP_F64 };
        const char *want[3] = { "tensor 'embed.weight' is F32 [7,5] in the file; the parameter is 'embed.weight' f32 [5,7]",
                                "register it with ddp_register_param_shape",
                                "tensor 'embed.weight' is F32 [7,5] in the file; the parameter is 'embed.weight' f64 [7,5]" };
        int k;
        for (k = 0; k < 3; k++) {
            int64_t right[2] = { 7, 5 };
            memset(&c, 0, sizeof c);
            c.world_size = 1;
            ddp_create(&c, &x);
            ddp_register_param_shape(x, "embed.weight", ndims[k], shapes[k] ? shapes[k] : right, types[k], NULL, &id);
            ddp_finalize(x);
            CHECK_ERR(ddp_load_safetensors(x, path, DDP_SAFETENSORS_ALLOW_EXTRA), DDP_ERROR_MISMATCH, x, want[k]);
            ddp_destroy(x);
        }
    }
    {   /* names the format cannot hold */
        ddp_config c;
        ddp_context *x;
        int id;
        memset(&c, 0, sizeof c);
        c.world_size = 1;
        ddp_create(&c, &x);
        ddp_register_param(x, "__metadata__", 2, DDP_F32, NULL, &id);
        ddp_finalize(x);
        CHECK_ERR(ddp_save_safetensors(x, path, NULL), DDP_ERROR_INVALID_ARGUMENT, x, "reserved key");
        ddp_destroy(x);
        ddp_create(&c, &x);
        ddp_register_param(x, "bad\xc3(name", 2, DDP_F32, NULL, &id);
        ddp_finalize(x);
        CHECK_ERR(ddp_save_safetensors(x, path, NULL), DDP_ERROR_INVALID_ARGUMENT, x, "not valid UTF-8");
        ddp_destroy(x);
    }
    /* nothing is left beside the file: no temporary */
    CHECK(t_dir_count(g_dir, "tmp") == 0, "no temporary file left in %s (%d)", g_dir, t_dir_count(g_dir, "tmp"));
    ddp_destroy(a);
}

/* ---- malformed files ---- */

/* writes u64 len(header) + header + data (data_len bytes of 0x3f) */
static void make_file(const char *path, const char *header, size_t data_len, long len_override) {
    size_t hn = strlen(header), i;
    unsigned char *b = (unsigned char *)malloc(8 + hn + data_len + 1);
    uint64_t n = len_override >= 0 ? (uint64_t)len_override : hn;
    for (i = 0; i < 8; i++) b[i] = (unsigned char)(n >> (8 * i));
    memcpy(b + 8, header, hn);
    memset(b + 8 + hn, 0x3f, data_len);
    write_all(path, b, 8 + hn + data_len);
    free(b);
}

typedef struct bad_case { const char *header; size_t data; long n; int flags; ddp_result code; const char *needle; } bad_case;

static void test_malformed(void) {
    static char deep[2100], many_dims[600];
    char path[300];
    ddp_context *m;
    int k;
    /* "x": F32 [2] = 8 bytes; the model here has one parameter "x" f32 [2] */
#define T(s) "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}" s "}"
    bad_case cases[] = {
        { T(""), 8, -1, 0, DDP_SUCCESS, "" },
        { T("") "      ", 8, -1, 0, DDP_SUCCESS, "" },                                        /* padding */
        { "{\"__metadata__\":{},\"\\u0078\":{\"shape\":[2],\"data_offsets\":[0,8],\"dtype\":\"F32\"}}", 8, -1, 0, DDP_SUCCESS, "" },
        { T(",\"s\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[8,12]},\"z\":{\"dtype\":\"I64\",\"shape\":[0,3],\"data_offsets\":[12,12]}"), 12, -1,
          DDP_SAFETENSORS_ALLOW_EXTRA, DDP_SUCCESS, "" },                                     /* a scalar and an empty tensor */
        { T(""), 8, 100000001, 0, DDP_ERROR_CORRUPT, "over the format's limit" },
        { T(""), 8, 5000, 0, DDP_ERROR_CORRUPT, "has only" },
        { " " T(""), 8, -1, 0, DDP_ERROR_CORRUPT, "must begin with '{'" },
        { "[1]", 0, -1, 0, DDP_ERROR_CORRUPT, "must begin with '{'" },
        { "{\"x\xff\":{}}", 0, -1, 0, DDP_ERROR_CORRUPT, "not valid UTF-8" },
        { "{\"\xc0\xaf\":{}}", 0, -1, 0, DDP_ERROR_CORRUPT, "not valid UTF-8" },               /* overlong '/' */
        { "{\"\xed\xa0\x80\":{}}", 0, -1, 0, DDP_ERROR_CORRUPT, "not valid UTF-8" },           /* a surrogate */
        { T(",\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}"), 16, -1, 0, DDP_ERROR_CORRUPT, "'x' appears twice" },
        { "{\"__metadata__\":{},\"__metadata__\":{}}", 0, -1, 0, DDP_ERROR_CORRUPT, "\"__metadata__\" appears twice" },
        { "{\"__metadata__\":{\"a\":1}}", 0, -1, 0, DDP_ERROR_CORRUPT, "not a string" },
        { "{\"__metadata__\":{\"a\":{\"b\":\"c\"}}}", 0, -1, 0, DDP_ERROR_CORRUPT, "not a string" },
        { "{\"x\":{\"dtype\":\"F33\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, -1, 0, DDP_ERROR_CORRUPT, "dtype \"F33\", which this reader does not know" },
        { "{\"x\":{\"dtype\":\"F32\",\"shape\":[2.0],\"data_offsets\":[0,8]}}", 8, -1, 0, DDP_ERROR_CORRUPT, "fraction" },
        { "{\"x\":{\"dtype\":\"F32\",\"shape\":[2e0],\"data_offsets\":[0,8]}}", 8, -1, 0, DDP_ERROR_CORRUPT, "exponent" },
        { "{\"x\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, -1, 0, DDP_ERROR_CORRUPT, "non-negative integer" },
        { "{\"x\":{\"dtype\":\"F32\",\"shape\":[02],\"data_offsets\":[0,8]}}", 8, -1, 0, DDP_ERROR_CORRUPT, "leading zero" },
        { "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,18446744073709551616]}}", 8, -1, 0, DDP_ERROR_CORRUPT, "does not fit in 64 bits" },
        { "{\"x\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,2],\"data_offsets\":[0,8]}}", 8, -1, 0, DDP_ERROR_CORRUPT, "overflows" },
        { "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,12]}}", 12, -1, 0, DDP_ERROR_CORRUPT, "do not hold its 2 elements of F32" },
        { "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8, -1, 0, DDP_ERROR_CORRUPT, "do not hold" },
        { "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, -1, 0, DDP_ERROR_CORRUPT, "a hole" },
        { T(",\"y\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}"), 12, -1, DDP_SAFETENSORS_ALLOW_EXTRA, DDP_ERROR_CORRUPT, "an overlap" },
        { T(""), 9, -1, 0, DDP_ERROR_CORRUPT, "bytes after its last tensor" },
        { T(""), 7, -1, 0, DDP_ERROR_CORRUPT, "truncated in the data of tensor 'x'" },
        { T("") " x", 8, -1, 0, DDP_ERROR_CORRUPT, "bytes after the header's closing" },
        { T("") "\x01", 8, -1, 0, DDP_ERROR_CORRUPT, "bytes after the header's closing" },
        { "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],\"extra\":1}}", 8, -1, 0, DDP_ERROR_CORRUPT, "has a key \"extra\"" },
        { "{\"x\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8, -1, 0, DDP_ERROR_CORRUPT, "lacks \"data_offsets\"" },
        { "{\"x\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, -1, 0, DDP_ERROR_CORRUPT, "two \"dtype\" keys" },
        { "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8,9]}}", 8, -1, 0, DDP_ERROR_CORRUPT, "after the two data_offsets" },
        { "{\"x\":{}}", 0, -1, 0, DDP_ERROR_CORRUPT, "empty entry" },
        { "{\"x\":null}", 0, -1, 0, DDP_ERROR_CORRUPT, "expected '{'" },
        { "{\"x\":{\"dtype\":true}}", 0, -1, 0, DDP_ERROR_CORRUPT, "expected a string" },
        { "{\"a\\qb\":{}}", 0, -1, 0, DDP_ERROR_CORRUPT, "bad escape" },
        { "{\"a\\ud800b\":{}}", 0, -1, 0, DDP_ERROR_CORRUPT, "without its low half" },
        { "{\"a\\udc00\":{}}", 0, -1, 0, DDP_ERROR_CORRUPT, "lone low surrogate" },
        { "{\"a\\u0000\":{}}", 0, -1, 0, DDP_ERROR_CORRUPT, "\\u0000" },
        { "{\"a\\u12\":{}}", 0, -1, 0, DDP_ERROR_CORRUPT, "hex digit" },
        { "{\"a\tb\":{}}", 0, -1, 0, DDP_ERROR_CORRUPT, "control character" },
        { "{\"x\":{\"dtype\":\"F32\"", 0, -1, 0, DDP_ERROR_CORRUPT, "the header ends" },
        { "{\"x\"", 0, -1, 0, DDP_ERROR_CORRUPT, "the header ends" },
        { "{", 0, -1, 0, DDP_ERROR_CORRUPT, "expected a string" },
        { "{}", 0, -1, 0, DDP_ERROR_MISMATCH, "has no tensor 'x'" },
        { "{}", 0, -1, DDP_SAFETENSORS_ALLOW_MISSING, DDP_SUCCESS, "" },
        { "{\"x\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4, -1, 0, DDP_ERROR_MISMATCH, "is BF16 [2] in the file" },
        { "", 0, -1, 0, DDP_ERROR_CORRUPT, "must begin with '{'" },
        { deep, 0, -1, 0, DDP_ERROR_CORRUPT, "expected '{'" },
        { many_dims, 0, -1, 0, DDP_ERROR_CORRUPT, "more than 64 dimensions" }
    };
#undef T
    TEST("malformed files");
    {   /* a nesting bomb, and a tensor of 65 dimensions */
        size_t i, n = 0;
        n += (size_t)snprintf(deep, sizeof deep, "{\"x\":");
        for (i = 0; i < 1000; i++) deep[n++] = '[';
        for (i = 0; i < 1000; i++) deep[n++] = ']';
        deep[n++] = '}';
        deep[n] = 0;
        n = (size_t)snprintf(many_dims, sizeof many_dims, "{\"x\":{\"dtype\":\"F32\",\"shape\":[");
        for (i = 0; i < 65; i++) n += (size_t)snprintf(many_dims + n, sizeof many_dims - n, i ? ",1" : "1");
        snprintf(many_dims + n, sizeof many_dims - n, "],\"data_offsets\":[0,4]}}");
    }
    snprintf(path, sizeof path, "%s/bad.safetensors", g_dir);
    {
        ddp_config c;
        float init[2] = { -7.0f, -7.0f };
        int id;
        memset(&c, 0, sizeof c);
        c.world_size = 1;
        ddp_create(&c, &m);
        ddp_register_param(m, "x", 2, DDP_F32, init, &id);
        ddp_finalize(m);
    }
    for (k = 0; k < (int)(sizeof cases / sizeof cases[0]); k++) {
        const bad_case *bc = &cases[k];
        float *x = (float *)ddp_param_data(m, 0);
        ddp_result r;
        x[0] = x[1] = -7.0f;
        make_file(path, bc->header, bc->data, bc->n);
        r = ddp_load_safetensors(m, path, bc->flags);
        CHECK(r == bc->code, "case %d (%.60s): %s, expected %s: %s", k, bc->header, ddp_result_string(r), ddp_result_string(bc->code), ddp_last_error(m));
        if (r != DDP_SUCCESS) {
            CHECK(strstr(ddp_last_error(m), bc->needle) != NULL, "case %d: message '%s' lacks '%s'", k, ddp_last_error(m), bc->needle);
            CHECK(x[0] == -7.0f && x[1] == -7.0f, "case %d: a failed load changed the parameter", k);
        } else if (bc->header[0] && bc->data) {
            float q;
            memset(&q, 0x3f, sizeof q);
            CHECK(x[0] == q && x[1] == q, "case %d: the file's bytes were loaded", k);
        }
    }
    ddp_destroy(m);
}

/* ---- mutation fuzz ---- */

static uint64_t rng_state = 0x243f6a8885a308d3ull;
static uint64_t rnd(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void test_fuzz(void) {
    static const char interesting[] = "{}[]\":,0123456789 \\u-.eE\x00\xff\x80";
    char good[300], path[300];
    unsigned char *orig, *buf;
    size_t len = 0;
    uint64_t n;
    ddp_context *a, *m;
    int it, iters = 10000, loaded = 0, refused = 0;
    const char *env = getenv("DDP_FUZZ_ITERS");
    if (env && atoi(env) > 0) iters = atoi(env);
    TEST("fuzz");
    snprintf(good, sizeof good, "%s/fuzz-good.safetensors", g_dir);
    snprintf(path, sizeof path, "%s/fuzz.safetensors", g_dir);
    a = make_model(-1, 0, 1.0, DDP_OPTIM_NONE);
    CHECK_OK(ddp_save_safetensors(a, good, NULL), a);
    ddp_destroy(a);
    orig = read_all(good, &len);
    if (!orig) { CHECK(0, "cannot read %s", good); return; }
    n = header_len(orig);
    buf = (unsigned char *)malloc(len + 64);
    m = make_model(-1, 0, 0.0, DDP_OPTIM_NONE);
    for (it = 0; it < iters; it++) {
        size_t blen = len, at, k;
        int kind = (int)(rnd() % 6), must_fail = 1;
        ddp_result r;
        memcpy(buf, orig, len);
        switch (kind) {
        case 0: case 1: {  /* 1..3 bytes of the header changed: random or JSON-ish */
            int changes = 1 + (int)(rnd() % 3);
            for (k = 0; k < (size_t)changes; k++) {
                at = 8 + (size_t)(rnd() % n);
                buf[at] = kind == 0 ? (unsigned char)rnd() : (unsigned char)interesting[rnd() % (sizeof interesting - 1)];
            }
            must_fail = 0; /* may still be valid (a changed padding space, say): then it must load the right values */
            break;
        }
        case 2:            /* truncated anywhere */
            blen = (size_t)(rnd() % len);
            break;
        case 3:            /* bytes appended */
            for (k = 0; k < 1 + rnd() % 16; k++) buf[blen++] = (unsigned char)rnd();
            break;
        case 4: {          /* another header length */
            uint64_t v = rnd() % 5 == 0 ? rnd() : (rnd() % (2 * n + 16));
            if (v == n) v = n + 8;
            for (k = 0; k < 8; k++) buf[k] = (unsigned char)(v >> (8 * k));
            break;
        }
        default:           /* a byte inserted into or deleted from the header */
            at = 8 + (size_t)(rnd() % n);
            if (rnd() & 1) { memmove(buf + at + 1, buf + at, len - at); buf[at] = (unsigned char)rnd(); blen++; }
            else { memmove(buf + at, buf + at + 1, len - at - 1); blen--; }
            break;
        }
        write_all(path, buf, blen);
        {   /* poison the model: a failed load must leave exactly this */
            int p;
            for (p = 0; p < ddp_param_count(m); p++)
                memset(ddp_param_data(m, p), 0x5a, ddp_param_numel(m, p) * ddp_dtype_size(k_model[p].dtype));
        }
        r = ddp_load_safetensors(m, path, 0);
        if (r == DDP_SUCCESS) {
            loaded++;
            CHECK(!must_fail, "iteration %d (kind %d): a damaged file loaded", it, kind);
            CHECK(count_wrong(m, 1.0) == 0, "iteration %d (kind %d): loaded wrong values", it, kind);
        } else {
            int p, changed = 0;
            size_t i;
            refused++;
            CHECK(r == DDP_ERROR_CORRUPT || r == DDP_ERROR_MISMATCH, "iteration %d: %s: %s", it, ddp_result_string(r), ddp_last_error(m));
            for (p = 0; p < ddp_param_count(m); p++) {
                const unsigned char *d = (const unsigned char *)ddp_param_data(m, p);
                for (i = 0; i < ddp_param_numel(m, p) * ddp_dtype_size(k_model[p].dtype); i++) changed |= d[i] != 0x5a;
            }
            CHECK(!changed, "iteration %d (kind %d): a refused file changed the model", it, kind);
        }
    }
    printf("fuzz: %d mutated files, %d refused, %d loaded (all with the right values)\n", iters, refused, loaded);
    CHECK(refused > iters / 2, "most mutations are refused (%d of %d)", refused, iters);
    ddp_destroy(m);
    free(buf);
    free(orig);
}

/* ---- two ranks: rank 0 writes, every rank loads ---- */

#define RANK_CHECK(cond, ...) do { if (!(cond)) { fprintf(stderr, "rank %d: ", g_rank); fprintf(stderr, __VA_ARGS__); \
                                                  fputc('\n', stderr); return 10; } } while (0)

static int two_ranks_body(void) {
    char path[300], nowhere[300];
    ddp_context *ctx;
    ddp_result r;
    int p;
    snprintf(path, sizeof path, "%s/two.safetensors", g_dir);
    snprintf(nowhere, sizeof nowhere, "%s/not-here.safetensors", g_dir);
    /* rank 1 starts from other values: rank 0's win at finalize */
    ctx = make_model(-1, 0, g_rank == 0 ? 1.0 : 0.5, DDP_OPTIM_NONE);
    RANK_CHECK(count_wrong(ctx, 1.0) == 0, "rank 0's weights after finalize");
    r = ddp_save_safetensors(ctx, path, NULL);
    RANK_CHECK(r == DDP_SUCCESS, "save: %s", ddp_last_error(ctx));
    for (p = 0; p < ddp_param_count(ctx); p++) memset(ddp_param_data(ctx, p), 0, ddp_param_numel(ctx, p) * ddp_dtype_size(k_model[p].dtype));
    r = ddp_load_safetensors(ctx, path, 0);
    RANK_CHECK(r == DDP_SUCCESS, "load: %s", ddp_last_error(ctx));
    RANK_CHECK(count_wrong(ctx, 1.0) == 0, "every rank loaded the file rank 0 wrote");
    /* rank 1 cannot read its file: every rank fails, rank 0 naming rank 1 */
    r = ddp_load_safetensors(ctx, g_rank == 1 ? nowhere : path, 0);
    RANK_CHECK(r == DDP_ERROR_IO, "a load that fails on rank 1 returned %s on rank %d", ddp_result_string(r), g_rank);
    RANK_CHECK(strstr(ddp_last_error(ctx), g_rank == 1 ? "cannot open" : "failed on rank 1") != NULL, "message: %s", ddp_last_error(ctx));
    ddp_destroy(ctx);
    return 0;
}

/* Each rank is a copy of this program: test_safetensors --rank R PORT DIR */
static void test_two_ranks(void) {
    t_proc procs[2];
    char sr[2][8], sp[16];
    int r, left = 2;
    double t0 = ddp__now();
    TEST("two ranks");
    ddp__net_start();
    snprintf(sp, sizeof sp, "%d", t_free_port());
    ddp__net_stop();
    fflush(stdout);
    fflush(stderr);
    for (r = 0; r < 2; r++) {
        const char *args[] = { "--rank", sr[r], sp, g_dir, NULL };
        snprintf(sr[r], sizeof sr[r], "%d", r);
        CHECK(t_proc_spawn_self(&procs[r], args) == 0, "rank %d started", r);
    }
    while (left > 0 && ddp__now() - t0 < 120) {
        for (r = 0; r < 2; r++)
            if (!procs[r].done && t_proc_poll(&procs[r])) left--;
        if (left > 0) ddp__sleep_us(10000);
    }
    for (r = 0; r < 2; r++) {
        if (!procs[r].done) t_proc_kill(&procs[r]);
        CHECK(procs[r].done && procs[r].code == 0, "rank %d exited with status %d", r, procs[r].code);
    }
}

/* ---- the Python side's files ---- */

static int interop(const char *mode, const char *path) {
    static const char *meta[] = { "producer", "ddp.h tests/test_safetensors.c", NULL };
    ddp_context *ctx;
    int wrong;
    if (!strcmp(mode, "write")) {
        ctx = make_model(-1, 0, 1.0, DDP_OPTIM_NONE);
        if (ddp_save_safetensors(ctx, path, meta) != DDP_SUCCESS) { fprintf(stderr, "%s\n", ddp_last_error(ctx)); return 1; }
        printf("wrote %s\n", path);
        ddp_destroy(ctx);
        return 0;
    }
    ctx = make_model(-1, 0, 0.0, DDP_OPTIM_NONE);
    if (ddp_load_safetensors(ctx, path, 0) != DDP_SUCCESS) { fprintf(stderr, "%s\n", ddp_last_error(ctx)); return 1; }
    wrong = count_wrong(ctx, -1.0);
    printf("loaded %s: %d of the values differ from the writer's (-value())\n", path, wrong);
    ddp_destroy(ctx);
    return wrong != 0;
}

int main(int argc, char **argv) {
    static const char *const files[] = { "model.safetensors", "bad.safetensors", "fuzz-good.safetensors",
                                         "fuzz.safetensors", "two.safetensors", NULL };
    t_proc_init(argv[0]);
    if (argc == 5 && !strcmp(argv[1], "--rank")) {
        g_rank = atoi(argv[2]);
        g_world = 2;
        g_port = atoi(argv[3]);
        snprintf(g_dir, sizeof g_dir, "%s", argv[4]);
        return two_ranks_body();
    }
    if (argc == 3) return interop(argv[1], argv[2]);
    if (t_make_dir(g_dir, sizeof g_dir, "ddp-safetensors") != 0) { fprintf(stderr, "cannot create %s\n", g_dir); return 2; }
    test_roundtrip();
    test_errors();
    test_malformed();
    test_two_ranks();
    test_fuzz();
    TEST("clean-up");
    CHECK(t_remove_dir(g_dir, files) == 0, "%s held only the test's own files (%d entries left)", g_dir, t_dir_count(g_dir, ""));
    return t_summary("test_safetensors");
}
