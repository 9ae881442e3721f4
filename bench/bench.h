/* bench.h - helpers shared by the benchmark programs (not part of the
   library). Include after ddp.h; set bench_name first thing in main(). */
#ifndef DDP_BENCH_H
#define DDP_BENCH_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <errno.h>

#if defined(__GNUC__)
#  define BENCH_UNUSED __attribute__((unused)) /* not every program uses every helper */
#else
#  define BENCH_UNUSED
#endif

static const char *bench_name = "bench";

/* monotonic seconds: the library's own clock in a file that holds the
   implementation (every CPU benchmark; it works on Windows too) */
BENCH_UNUSED static double now_s(void) {
#if defined(DDP__IMPLEMENTED)
    return ddp__now();
#else
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
#endif
}

/* set / remove an environment variable (Windows: _putenv_s; "" removes) */
BENCH_UNUSED static void bench_setenv(const char *name, const char *value) {
#if defined(_WIN32)
    _putenv_s(name, value ? value : "");
#else
    if (value) setenv(name, value, 1);
    else unsetenv(name);
#endif
}

BENCH_UNUSED static void die(const char *what, const char *detail) {
    fprintf(stderr, "%s: %s%s%s\n", bench_name, what, detail ? ": " : "", detail ? detail : "");
    exit(1);
}

/* exit with the library's message when a call failed */
BENCH_UNUSED static void check(ddp_context *ctx, ddp_result r, const char *what) {
    if (r != DDP_SUCCESS) {
        fprintf(stderr, "%s: %s: %s: %s\n", bench_name, what, ddp_result_string(r), ddp_last_error(ctx));
        exit(1);
    }
}

/* a whole decimal number in [lo, hi], or exit naming it */
BENCH_UNUSED static long parse_long(const char *s, long lo, long hi) {
    char *end;
    long v;
    errno = 0;
    v = strtol(s, &end, 10);
    if (end == s || *end || errno || v < lo || v > hi) die("bad number", s);
    return v;
}

BENCH_UNUSED static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* the median of n > 0 values; v is left as it is */
BENCH_UNUSED static double median(const double *v, int n) {
    double *s = (double *)malloc((size_t)n * sizeof *s), m;
    if (!s) die("out of memory", NULL);
    memcpy(s, v, (size_t)n * sizeof *s);
    qsort(s, (size_t)n, sizeof *s, cmp_double);
    m = n % 2 ? s[n / 2] : 0.5 * (s[n / 2 - 1] + s[n / 2]);
    free(s);
    return m;
}

#endif
