/* testing.h - the tiny test harness of ddp.h's suites (not part of the library).
   CHECK records a failure and goes on; the summary line is "N passed, M failed". */
#ifndef DDP_TESTING_H
#define DDP_TESTING_H

#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#if defined(_WIN32)
#  include <process.h>
#else
#  include <unistd.h>
#endif

static int t_pass = 0, t_fail = 0;
static const char *t_name = "";

#define CHECK(cond, ...) do { \
    if (cond) t_pass++; \
    else { t_fail++; fprintf(stderr, "FAIL %s:%d [%s] %s: ", __FILE__, __LINE__, t_name, #cond); \
           fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); } \
} while (0)

/* a call that must fail with `code` and a message that contains `needle` */
#define CHECK_ERR(call, code, ctx, needle) do { \
    ddp_result r_ = (call); \
    const char *m_ = (ctx) ? ddp_last_error(ctx) : ddp_create_error(); \
    CHECK(r_ == (code), "%s returned %s, expected %s (message: %s)", #call, ddp_result_string(r_), ddp_result_string(code), m_); \
    CHECK(strstr(m_, (needle)) != NULL, "message of %s is '%s', expected it to mention '%s'", #call, m_, (needle)); \
} while (0)

#define CHECK_OK(call, ctx) do { \
    ddp_result r_ = (call); \
    CHECK(r_ == DDP_SUCCESS, "%s returned %s: %s", #call, ddp_result_string(r_), (ctx) ? ddp_last_error(ctx) : ddp_create_error()); \
} while (0)

#define TEST(name) t_name = name

/* ---- the little the tests need from the OS (POSIX and Windows) ---- */

#if defined(__GNUC__) || defined(__clang__)
#  define T_UNUSED __attribute__((unused))
#else
#  define T_UNUSED
#endif

T_UNUSED static int t_setenv(const char *name, const char *value) {
#if defined(_WIN32)
    return _putenv_s(name, value);
#else
    return setenv(name, value, 1);
#endif
}

T_UNUSED static int t_unsetenv(const char *name) {
#if defined(_WIN32)
    return _putenv_s(name, ""); /* an empty value removes it */
#else
    return unsetenv(name);
#endif
}

T_UNUSED static int t_getpid(void) {
#if defined(_WIN32)
    return _getpid();
#else
    return (int)getpid();
#endif
}

/* A path for a temporary file named `name` (plus this process's id). */
T_UNUSED static void t_temp_path(char *out, size_t cap, const char *name) {
#if defined(_WIN32)
    const char *d = getenv("TEMP");
    if (!d || !*d) d = getenv("TMP");
    if (!d || !*d) d = ".";
    snprintf(out, cap, "%s\\%s_%d", d, name, t_getpid());
#else
    const char *d = getenv("TMPDIR");
    if (!d || !*d) d = "/tmp";
    snprintf(out, cap, "%s/%s_%d", d, name, t_getpid());
#endif
}

static int t_summary(const char *suite) {
    printf("%s: %d passed, %d failed\n", suite, t_pass, t_fail);
    return t_fail ? 1 : 0;
}

#endif
