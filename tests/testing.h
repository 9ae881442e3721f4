/* testing.h - the tiny test harness of ddp.h's suites (not part of the library).
   CHECK records a failure and goes on; the summary line is "N passed, M failed". */
#ifndef DDP_TESTING_H
#define DDP_TESTING_H

#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#if defined(_WIN32)
#  include <process.h>
#  include <direct.h>
#  include <io.h>
#else
#  include <unistd.h>
#  include <dirent.h>
#  include <sys/stat.h>
#endif

#if defined(__GNUC__) || defined(__clang__)
#  define T_UNUSED __attribute__((unused))
#else
#  define T_UNUSED
#endif

/* UNDER_ASAN: 1 in an AddressSanitizer build, where a process's memory
   includes the sanitizer's quarantine of freed blocks and its shadow:
   resident-size checks then say nothing about the library. */
#if defined(__SANITIZE_ADDRESS__)
#  define UNDER_ASAN 1
#elif defined(__has_feature)
#  if __has_feature(address_sanitizer)
#    define UNDER_ASAN 1
#  endif
#endif
#ifndef UNDER_ASAN
#  define UNDER_ASAN 0
#endif

/* (unused in the programs that only borrow the helpers below, as tests/fault.c) */
T_UNUSED static int t_pass = 0, t_fail = 0;
T_UNUSED static const char *t_name = "";

/* A file's bytes with a 0 after them (malloc'd), NULL when it cannot be opened. */
T_UNUSED static char *t_slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    char *s;
    long n;
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    s = (char *)malloc((size_t)n + 1);
    n = s ? (long)fread(s, 1, (size_t)n, f) : 0;
    fclose(f);
    if (s) s[n] = 0;
    return s;
}

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

/* A path for a temporary file named `name` in the temporary directory
   (TEMP on Windows, TMPDIR or /tmp elsewhere): the same in every process. */
T_UNUSED static void t_temp_dir_path(char *out, size_t cap, const char *name) {
#if defined(_WIN32)
    const char *d = getenv("TEMP");
    if (!d || !*d) d = getenv("TMP");
    if (!d || !*d) d = ".";
    if (snprintf(out, cap, "%s\\%s", d, name) >= (int)cap) out[0] = 0; /* too long: "" fails loudly */
#else
    const char *d = getenv("TMPDIR");
    if (!d || !*d) d = "/tmp";
    if (snprintf(out, cap, "%s/%s", d, name) >= (int)cap) out[0] = 0; /* too long: "" fails loudly */
#endif
}

/* A path for a temporary file named `name` plus this process's id. */
T_UNUSED static void t_temp_path(char *out, size_t cap, const char *name) {
    char n[512];
    if (snprintf(n, sizeof n, "%s_%d", name, t_getpid()) >= (int)sizeof n) n[0] = 0;
    t_temp_dir_path(out, cap, n);
}

/* A private directory for a test's files: t_temp_path(name) made a directory. 0 on success. */
T_UNUSED static int t_make_dir(char *out, size_t cap, const char *name) {
    t_temp_path(out, cap, name);
#if defined(_WIN32)
    return _mkdir(out);
#else
    return mkdir(out, 0700);
#endif
}

/* Entries of directory dir whose name contains needle ("" for all; "." and
   ".." never count); -1 when dir cannot be read. */
T_UNUSED static int t_dir_count(const char *dir, const char *needle) {
    int n = 0;
#if defined(_WIN32)
    char pat[4096];
    struct _finddata_t fd;
    intptr_t h;
    snprintf(pat, sizeof pat, "%s\\*", dir);
    h = _findfirst(pat, &fd);
    if (h == -1) return -1;
    do {
        if (strcmp(fd.name, ".") && strcmp(fd.name, "..") && strstr(fd.name, needle)) n++;
    } while (_findnext(h, &fd) == 0);
    _findclose(h);
#else
    DIR *d = opendir(dir);
    struct dirent *e;
    if (!d) return -1;
    while ((e = readdir(d)) != NULL)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..") && strstr(e->d_name, needle)) n++;
    closedir(d);
#endif
    return n;
}

/* Remove dir after the files named in names (NULL-terminated): 0 when dir
   is gone, -1 when it held anything else (or could not be removed). */
T_UNUSED static int t_remove_dir(const char *dir, const char *const *names) {
    char path[4096];
    for (; *names; names++) {
        snprintf(path, sizeof path, "%s/%s", dir, *names);
        remove(path);
    }
#if defined(_WIN32)
    return _rmdir(dir) == 0 ? 0 : -1;
#else
    return rmdir(dir) == 0 ? 0 : -1;
#endif
}

#if defined(DDP_IMPLEMENTATION)
/* A free TCP port on the loopback interface (0 if none): the library's
   (only where the implementation is compiled in). */
T_UNUSED static int t_free_port(void) { return ddp__free_loopback_port(); }

/* Raw bytes to a socket, for the suites that speak the store's wire
   protocol by hand (test_security, test_hostile): all of them, or up to
   the first error (fd < 0: nothing). */
T_UNUSED static void t_raw_send(int fd, const void *p, size_t n) {
    const unsigned char *b = (const unsigned char *)p;
    while (n > 0 && fd >= 0) {
        ddp__ssize w = ddp__sock_send(fd, b, n, DDP__SOCK_NOSIGNAL);
        if (w <= 0) return;
        b += w;
        n -= (size_t)w;
    }
}

/* A SET request whose value length field says vlen, followed by send_bytes
   of val (fewer than vlen: a request cut short). */
T_UNUSED static void t_send_set(int fd, const char *key, uint64_t vlen, const void *val, size_t send_bytes) {
    unsigned char op = 0;
    uint64_t kl = strlen(key);
    t_raw_send(fd, &op, 1);
    t_raw_send(fd, &kl, 8);
    t_raw_send(fd, key, kl);
    t_raw_send(fd, &vlen, 8);
    if (val) t_raw_send(fd, val, send_bytes);
}

/* The suites of per-case contexts (test_debug, test_agree): a control
   context on MASTER_PORT that is never mismatched (the barrier between the
   cases), and the cases' port: a free one rank 0 took and broadcast on it
   (not MASTER_PORT + 1, which a client socket may hold as its local port).
   Exits 2 when either fails. */
T_UNUSED static ddp_context *t_control_context(int *case_port) {
    ddp_config c;
    ddp_context *ctl = NULL;
    double port;
    memset(&c, 0, sizeof c);
    c.debug = DDP_DEBUG_OFF;
    c.connect_timeout_s = 60;
    if (ddp_create(&c, &ctl) != DDP_SUCCESS) { fprintf(stderr, "ddp_create: %s\n", ddp_create_error()); exit(2); }
    port = ddp_rank(ctl) == 0 ? (double)t_free_port() : 0.0;
    if (ddp_broadcast(ctl, &port, 1, DDP_F64, 0) != DDP_SUCCESS) { fprintf(stderr, "port broadcast: %s\n", ddp_last_error(ctl)); exit(2); }
    *case_port = (int)port;
    return ctl;
}
#endif

T_UNUSED static int t_summary(const char *suite) {
    printf("%s: %d passed, %d failed\n", suite, t_pass, t_fail);
    return t_fail ? 1 : 0;
}

#endif
