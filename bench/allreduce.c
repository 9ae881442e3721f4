/* bench/allreduce: all-reduce bandwidth and latency of the CPU (shm)
   backend through the public API, in the manner of nccl-tests.

       build/ddprun -n N build/bench/allreduce [options]

       --backend B      shm (the CPU default) | staged | nccl; default: the
                        library's choice (DDP_BACKEND in the environment works too)
       --min SIZE       smallest size in bytes (default 4K; K, M, G suffixes
       --max SIZE       largest size (default 256M)      are powers of 1024)
       --step F         size multiplier (default 4)
       --dtype T        f32 (default) | bf16
       --inplace        only buffers in the library's shared storage
       --user           only user-owned malloc'd buffers
                        (default: both, shared storage first)
       --reps R         timed repetitions per size (default 5)
       --iters I        iterations per repetition (default: about 50 ms worth)

   The two modes:
     shared  one parameter of --max bytes is registered, and sub-ranges of
             ddp_flat_grads(ctx) are all-reduced with ddp_allreduce: the
             library sees that the pointer lies in its shared gradient
             segment and reduces in place, without staging (this is where
             DDP keeps gradients).
     user    a malloc'd buffer per rank: the library stages it through its
             shared-memory staging area (copy in, reduce, copy out).

   Every size: a warm-up, then --reps repetitions, each a barrier and a loop
   of --iters all-reduces (sum); the time of a repetition is the slowest
   rank's; the row reports the median repetition. Before and after the timed
   loop each rank fills its buffer with small rank-dependent integers,
   all-reduces once and compares every element with the exact sum.

   Output (rank 0; ddprun prefixes each line with "[0] "): '#' lines are
   comments; then
       baseline memcpy_GBps X
   (one process copying 64 MiB, bytes read + written per second, measured
   in this run while the other ranks wait; when --max is larger, a comment
   line gives the same for a copy of --max bytes), then for each mode a
   comment line naming the mode and one row per size:
       size_bytes count dtype time_us algbw_GBps busbw_GBps wrong
   algbw = size_bytes / time, busbw = algbw * 2(n-1)/n (nccl-tests' bus
   bandwidth; 0 for n = 1), GB = 1e9 bytes; wrong = elements that differed
   from the exact sum, over all ranks and both checks (0 when correct).
   Exit status 1 on any error or wrong element. */
#define DDP_IMPLEMENTATION
#include "../ddp.h"
#include "bench.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BASELINE_BYTES ((size_t)64 << 20)

typedef struct options {
    ddp_backend backend;
    size_t min_bytes, max_bytes;
    unsigned step;
    ddp_dtype dtype;
    int shared, user;      /* which modes to run */
    int reps, iters;
} options;

/* "4096", "4K", "256M", "1G" */
static size_t parse_size(const char *s) {
    char *end;
    unsigned long long v;
    errno = 0;
    v = strtoull(s, &end, 10);
    if (end == s || errno) die("bad size", s);
    if (*end == 'K' || *end == 'k') { v <<= 10; end++; }
    else if (*end == 'M' || *end == 'm') { v <<= 20; end++; }
    else if (*end == 'G' || *end == 'g') { v <<= 30; end++; }
    if (*end == 'B' || *end == 'b') end++;
    if (*end || v == 0) die("bad size", s);
    return (size_t)v;
}

static void parse(int argc, char **argv, options *o) {
    int i, only_shared = 0, only_user = 0;
    memset(o, 0, sizeof *o);
    o->min_bytes = (size_t)4 << 10;
    o->max_bytes = (size_t)256 << 20;
    o->step = 4;
    o->dtype = DDP_F32;
    o->reps = 5;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--inplace")) { only_shared = 1; continue; }
        if (!strcmp(a, "--user")) { only_user = 1; continue; }
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            printf("usage: allreduce [--backend shm|staged|nccl] [--min 4K] [--max 256M] [--step 4]\n"
                   "                 [--dtype f32|bf16] [--inplace | --user] [--reps 5] [--iters N]\n");
            exit(0);
        }
        if (!v) die("option needs a value", a);
        i++;
        if (!strcmp(a, "--min")) o->min_bytes = parse_size(v);
        else if (!strcmp(a, "--max")) o->max_bytes = parse_size(v);
        else if (!strcmp(a, "--step")) o->step = (unsigned)parse_long(v, 2, 1024);
        else if (!strcmp(a, "--reps")) o->reps = (int)parse_long(v, 1, 1000);
        else if (!strcmp(a, "--iters")) o->iters = (int)parse_long(v, 1, 10000000);
        else if (!strcmp(a, "--dtype")) {
            if (!strcmp(v, "f32")) o->dtype = DDP_F32;
            else if (!strcmp(v, "bf16")) o->dtype = DDP_BF16;
            else die("--dtype must be f32 or bf16, not", v);
        } else if (!strcmp(a, "--backend")) {
            if (!strcmp(v, "shm")) o->backend = DDP_BACKEND_SHM;
            else if (!strcmp(v, "staged")) o->backend = DDP_BACKEND_STAGED;
            else if (!strcmp(v, "nccl")) o->backend = DDP_BACKEND_NCCL;
            else die("--backend must be shm, staged or nccl, not", v);
        } else die("unknown option", a);
    }
    if (only_shared && only_user) die("--inplace and --user exclude each other", NULL);
    o->shared = !only_user;
    o->user = !only_shared;
    if (o->min_bytes > o->max_bytes) die("--min is larger than --max", NULL);
}

/* ---- element values: small integers, so every sum is exact -------------- */

/* rank r's value of element i: 1..8 (sums of up to 32 ranks stay exact in bf16) */
static float value(int r, size_t i) { return (float)((i * 5 + (size_t)r * 3) % 8 + 1); }

/* small integers convert to bf16 exactly by truncation */
static uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16);
}

static float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void fill(void *buf, size_t n, ddp_dtype t, int rank) {
    size_t i;
    if (t == DDP_BF16) for (i = 0; i < n; i++) ((uint16_t *)buf)[i] = to_bf16(value(rank, i));
    else for (i = 0; i < n; i++) ((float *)buf)[i] = value(rank, i);
}

/* elements that differ from the exact sum over world ranks */
static double count_wrong(const void *buf, size_t n, ddp_dtype t, int world) {
    size_t i, wrong = 0;
    for (i = 0; i < n; i++) {
        float want = 0, got;
        int r;
        for (r = 0; r < world; r++) want += value(r, i);
        got = t == DDP_BF16 ? from_bf16(((const uint16_t *)buf)[i]) : ((const float *)buf)[i];
        wrong += got != want;
    }
    return (double)wrong;
}

/* ---- measurement ------------------------------------------------------------ */

static double max_over_ranks(ddp_context *ctx, double v) {
    check(ctx, ddp_allreduce(ctx, &v, 1, DDP_F64, DDP_OP_MAX), "all-reduce of a timing");
    return v;
}

static double sum_over_ranks(ddp_context *ctx, double v) {
    check(ctx, ddp_allreduce(ctx, &v, 1, DDP_F64, DDP_OP_SUM), "all-reduce of a count");
    return v;
}

/* seconds per iteration of `iters` all-reduces, this rank's clock */
static double loop(ddp_context *ctx, void *buf, size_t n, ddp_dtype t, int iters) {
    double t0 = now_s();
    int i;
    for (i = 0; i < iters; i++) check(ctx, ddp_allreduce(ctx, buf, n, t, DDP_OP_SUM), "ddp_allreduce");
    return (now_s() - t0) / iters;
}

/* fill, reduce once, verify; the number of wrong elements over all ranks */
static double checked(ddp_context *ctx, void *buf, size_t n, ddp_dtype t) {
    fill(buf, n, t, ddp_rank(ctx));
    check(ctx, ddp_allreduce(ctx, buf, n, t, DDP_OP_SUM), "ddp_allreduce (checked)");
    return sum_over_ranks(ctx, count_wrong(buf, n, t, ddp_world_size(ctx)));
}

static int run_mode(ddp_context *ctx, const options *o, void *buf, const char *mode) {
    int rank = ddp_rank(ctx), world = ddp_world_size(ctx), bad = 0;
    size_t es = ddp_dtype_size(o->dtype), bytes;
    double *reps = (double *)malloc((size_t)o->reps * sizeof *reps);
    if (!reps) die("out of memory", NULL);
    if (rank == 0) {
        printf("# mode=%s (%s) ranks=%d backend=%s dtype=%s reps=%d\n", mode,
               !strcmp(mode, "shared") ? "sub-ranges of ddp_flat_grads: in place, no staging"
                                       : "malloc'd buffers: staged through shared memory",
               world, ddp_backend_name(ddp_query_backend(ctx)), ddp_dtype_name(o->dtype), o->reps);
        printf("# %12s %11s %5s %10s %10s %10s %5s\n", "size_bytes", "count", "dtype", "time_us",
               "algbw_GBps", "busbw_GBps", "wrong");
        fflush(stdout);
    }
    for (bytes = o->min_bytes; bytes <= o->max_bytes; bytes *= o->step) {
        size_t n = bytes / es;
        double wrong, t, algbw;
        int iters = o->iters, k;
        if (n == 0) continue;
        wrong = checked(ctx, buf, n, o->dtype);
        /* timing runs on zeros: sums of zeros never overflow to inf */
        memset(buf, 0, n * es);
        check(ctx, ddp_barrier(ctx), "ddp_barrier");
        t = max_over_ranks(ctx, loop(ctx, buf, n, o->dtype, 3)); /* warm-up */
        if (iters == 0) {
            double want = 0.05 / (t > 1e-9 ? t : 1e-9);
            iters = want < 2 ? 2 : want > 100000 ? 100000 : (int)want;
            t = max_over_ranks(ctx, loop(ctx, buf, n, o->dtype, iters / 4 + 1)); /* warm-up at speed */
        }
        for (k = 0; k < o->reps; k++) {
            check(ctx, ddp_barrier(ctx), "ddp_barrier");
            reps[k] = max_over_ranks(ctx, loop(ctx, buf, n, o->dtype, iters));
        }
        wrong += checked(ctx, buf, n, o->dtype);
        t = median(reps, o->reps);
        algbw = (double)(n * es) / t / 1e9;
        if (rank == 0) {
            printf("%14zu %11zu %5s %10.2f %10.3f %10.3f %5.0f\n", n * es, n, ddp_dtype_name(o->dtype),
                   t * 1e6, algbw, world > 1 ? algbw * 2.0 * (world - 1) / world : 0.0, wrong);
            fflush(stdout);
        }
        if (wrong != 0) bad = 1;
        if (bytes > o->max_bytes / o->step) break; /* no overflow past --max */
    }
    free(reps);
    return bad;
}

/* One process copies `bytes`; bytes read + written per second, median of 9. */
static double memcpy_baseline(size_t bytes) {
    unsigned char *src = (unsigned char *)malloc(bytes), *dst = (unsigned char *)malloc(bytes);
    double v[9];
    int k;
    if (!src || !dst) die("out of memory for the baseline", NULL);
    memset(src, 1, bytes);
    memset(dst, 2, bytes); /* no page faults in the timed copies */
    memcpy(dst, src, bytes);
    for (k = 0; k < 9; k++) {
        double t0 = now_s();
        memcpy(dst, src, bytes);
        v[k] = now_s() - t0;
        src[k] = dst[k + 1]; /* keep the copies observable */
    }
    free(src);
    free(dst);
    return 2.0 * (double)bytes / median(v, 9) / 1e9;
}

int main(int argc, char **argv) {
    options o;
    ddp_config c;
    ddp_context *ctx;
    ddp_result r;
    int rank, bad = 0, id;
    size_t es;
    bench_name = "allreduce";
    parse(argc, argv, &o);
    es = ddp_dtype_size(o.dtype);
    memset(&c, 0, sizeof c);
    c.backend = o.backend;
    c.device = DDP_DEVICE_CPU;
    r = ddp_create(&c, &ctx);
    if (r != DDP_SUCCESS) die(ddp_result_string(r), ddp_create_error());
    rank = ddp_rank(ctx);
    /* the shared storage: one parameter of the largest size */
    check(ctx, ddp_register_param(ctx, "bench", o.max_bytes / es, o.dtype, NULL, &id), "ddp_register_param");
    check(ctx, ddp_finalize(ctx), "ddp_finalize");

    check(ctx, ddp_barrier(ctx), "ddp_barrier");
    if (rank == 0) {
        printf("# allreduce: ranks=%d backend=%s dtype=%s sizes %zu..%zu x%u\n", ddp_world_size(ctx),
               ddp_backend_name(ddp_query_backend(ctx)), ddp_dtype_name(o.dtype), o.min_bytes, o.max_bytes, o.step);
        printf("baseline memcpy_GBps %.3f\n", memcpy_baseline(BASELINE_BYTES));
        if (o.max_bytes > BASELINE_BYTES) /* the largest size streams from memory: its own copy rate */
            printf("# memcpy_GBps at %zu bytes: %.3f\n", o.max_bytes, memcpy_baseline(o.max_bytes));
        fflush(stdout);
    }
    check(ctx, ddp_barrier(ctx), "ddp_barrier");

    if (o.shared) bad |= run_mode(ctx, &o, ddp_flat_grads(ctx), "shared");
    if (o.user) {
        void *buf = malloc(o.max_bytes);
        if (!buf) die("out of memory for the user buffer", NULL);
        memset(buf, 0, o.max_bytes);
        bad |= run_mode(ctx, &o, buf, "user");
        free(buf);
    }
    check(ctx, ddp_barrier(ctx), "ddp_barrier");
    ddp_destroy(ctx);
    if (bad && rank == 0) fprintf(stderr, "allreduce: WRONG results (see the wrong column)\n");
    return bad ? 1 : 0;
}
