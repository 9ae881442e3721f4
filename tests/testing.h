/* testing.h - the tiny test harness of ddp.h's suites (not part of the library).
   CHECK records a failure and goes on; the summary line is "N passed, M failed". */
#ifndef DDP_TESTING_H
#define DDP_TESTING_H

#include <stdio.h>
#include <string.h>
#include <stdlib.h>

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

static int t_summary(const char *suite) {
    printf("%s: %d passed, %d failed\n", suite, t_pass, t_fail);
    return t_fail ? 1 : 0;
}

#endif
