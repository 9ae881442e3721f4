/* Security tests of ddp.h, no GPU: the primitives (SHA-256 and HMAC-SHA-256
   against FIPS 180 and RFC 4231 vectors), identity records, and rank 0's
   store under hostile clients on 127.0.0.1: the job secret's
   challenge-response, another job on the same port, garbage, huge lengths,
   truncated and slow requests, unread replies, floods of idle connections,
   tampering with keys the job writes once, text where a counter belongs.
   Each case asserts what the store and the ranks do, and that the store's
   memory stays under its cap. (The same attacks against whole jobs, with
   real ranks, are in test_hostile.c.) The same source runs on Windows
   (under Wine in CI): everything here goes through ddp.h's platform layer. */
#define DDP_IMPLEMENTATION
#include "../ddp.h"
#include "testing.h"

#if defined(_WIN32)
#  include <psapi.h>
#endif

/* ---- helpers ---- */

static void unhex(const char *h, unsigned char *out, size_t *n) {
    size_t i, len = strlen(h) / 2;
    for (i = 0; i < len; i++) {
        unsigned v;
        sscanf(h + 2 * i, "%2x", &v);
        out[i] = (unsigned char)v;
    }
    *n = len;
}

static char logbuf[65536];
static ddp__mutex log_mu; /* initialized first in main */

static void capture_log(int level, const char *msg, void *user) {
    size_t n;
    (void)level; (void)user;
    ddp__mutex_lock(&log_mu);
    n = strlen(logbuf);
    if (n + strlen(msg) + 2 < sizeof logbuf) { strcat(logbuf, msg); strcat(logbuf, "\n"); }
    ddp__mutex_unlock(&log_mu);
}

static int log_has(const char *needle) {
    int r;
    ddp__mutex_lock(&log_mu);
    r = strstr(logbuf, needle) != NULL;
    ddp__mutex_unlock(&log_mu);
    return r;
}

static void log_clear(void) {
    ddp__mutex_lock(&log_mu);
    logbuf[0] = 0;
    ddp__mutex_unlock(&log_mu);
}

/* This process's resident memory (Windows: its working set), KiB. */
static long rss_kib(void) {
#if defined(_WIN32)
    PROCESS_MEMORY_COUNTERS pmc;
    memset(&pmc, 0, sizeof pmc);
    pmc.cb = sizeof pmc;
    if (!K32GetProcessMemoryInfo(GetCurrentProcess(), &pmc, sizeof pmc)) return -1;
    return (long)(pmc.WorkingSetSize / 1024);
#else
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long v = -1;
    if (!f) return -1;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "VmRSS:", 6)) v = strtol(line + 6, NULL, 10);
    fclose(f);
    return v;
#endif
}

/* memmem (not in every C library) */
static const void *find_bytes(const void *hay, size_t hn, const void *needle, size_t nn) {
    const unsigned char *h = (const unsigned char *)hay;
    size_t i;
    if (nn == 0) return hay;
    for (i = 0; i + nn <= hn; i++)
        if (h[i] == *(const unsigned char *)needle && !memcmp(h + i, needle, nn)) return h + i;
    return NULL;
}

/* A blocking connection to 127.0.0.1:port; -1 on failure. */
static int raw_connect(int port) {
    struct sockaddr_in a;
    int fd = ddp__sock_open(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons((uint16_t)port);
    if (ddp__sock_connect(fd, (struct sockaddr *)&a, sizeof a) != 0) { ddp__sock_close(fd); return -1; }
    return fd;
}

static void raw_close(int fd) { if (fd >= 0) ddp__sock_close(fd); }

/* What is there to read on fd within ms (-1 none, 0 closed, > 0 bytes). */
static long raw_recv(int fd, void *buf, size_t n, int ms) {
    struct pollfd p;
    ddp__ssize r;
    p.fd = fd; p.events = POLLIN; p.revents = 0;
    if (ddp__sock_poll(&p, 1, ms) <= 0) return -1;
    r = ddp__sock_recv(fd, buf, n, 0);
    if (r < 0) return ddp__sock_errno() == ECONNRESET || ddp__sock_errno() == ECONNABORTED ? 0 : -1;
    return (long)r;
}

/* 1 if the server closed fd within s seconds (reading and discarding). */
static int closed_within(int fd, double s) {
    double end = ddp__now() + s;
    static char buf[65536];
    if (fd < 0) return 1;
    while (ddp__now() < end)
        if (raw_recv(fd, buf, sizeof buf, 50) == 0) return 1;
    return 0;
}

static void make_ident(char *out, size_t cap, int version, int world, int rank, int secret, int pid, const char *job) {
    ddp__ident id;
    memset(&id, 0, sizeof id);
    id.version = version; id.world = world; id.rank = rank; id.secret = secret; id.pid = pid; id.uid = ddp__proc_uid();
    ddp__ident_word(id.job, sizeof id.job, job);
    ddp__copy_str(id.host, sizeof id.host, "testhost");
    ddp__copy_str(id.nonce, sizeof id.nonce, rank == 0 ? "00112233445566778899aabbccddeeff" : "-");
    ddp__ident_format(&id, out, cap);
}

static const char SECRET[] = "0123456789abcdef-the-job-secret";

/* A store as rank 0 runs it: secret (or none), rank 0's identity, protection. */
static ddp__store_server *start_store(const char *secret, const char *job, int world, size_t max_bytes, double idle, double slow) {
    ddp__store_opts o;
    ddp__store_server *sv = NULL;
    char ident[DDP__IDENT_MAX + 1], err[512];
    make_ident(ident, sizeof ident, DDP__WIRE_VERSION, world, 0, secret != NULL, ddp__getpid(), job);
    memset(&o, 0, sizeof o);
    o.secret = (const unsigned char *)secret;
    o.secret_len = secret ? strlen(secret) : 0;
    o.ident = ident;
    o.protect = "ddp/";
    o.max_bytes = max_bytes;
    o.world = world;
    o.idle_timeout_s = idle;
    o.slow_timeout_s = slow;
    o.log = capture_log;
    if (ddp__store_server_start("127.0.0.1", 0, &o, &sv, err, sizeof err) != 0) { fprintf(stderr, "store: %s\n", err); exit(2); }
    return sv;
}

static int client(ddp__store *st, ddp__store_server *sv, int version, int world, int rank, const char *secret, int pid,
                  const char *job, char *err, size_t errlen) {
    char ident[DDP__IDENT_MAX + 1];
    make_ident(ident, sizeof ident, version, world, rank, secret != NULL, pid, job);
    return ddp__store_connect_hello(st, "127.0.0.1", ddp__store_server_port(sv), 3.0, ident, secret,
                                    secret ? strlen(secret) : 0, err, errlen);
}

/* ---- SHA-256, HMAC-SHA-256 ---- */

static void test_sha256(void) {
    static const struct { const char *msg, *hex; } v[] = {
        { "", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" },
        { "abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" },
        { "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
          "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1" },
    };
    int i;
    TEST("sha256 FIPS 180 vectors");
    for (i = 0; i < 3; i++) {
        ddp__sha256 s;
        unsigned char d[32];
        char hex[65];
        ddp__sha256_init(&s);
        ddp__sha256_update(&s, v[i].msg, strlen(v[i].msg));
        ddp__sha256_final(&s, d);
        ddp__hex(d, 32, hex);
        CHECK(!strcmp(hex, v[i].hex), "sha256('%s') = %s", v[i].msg, hex);
    }
    {   /* a million 'a's, fed in uneven pieces */
        ddp__sha256 s;
        unsigned char d[32], a[1024];
        char hex[65];
        size_t done = 0, piece = 1;
        memset(a, 'a', sizeof a);
        ddp__sha256_init(&s);
        while (done < 1000000) {
            size_t n = 1000000 - done < piece ? 1000000 - done : piece;
            ddp__sha256_update(&s, a, n);
            done += n;
            piece = piece % 997 + 13;
        }
        ddp__sha256_final(&s, d);
        ddp__hex(d, 32, hex);
        CHECK(!strcmp(hex, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"), "sha256(10^6 'a') = %s", hex);
    }
}

static void test_hmac_rfc4231(void) {
    /* RFC 4231, test cases 1-7 (HMAC-SHA-256); case 5 compares 128 bits */
    static const struct { const char *key, *data, *mac; size_t trunc; } v[] = {
        { "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b", "4869205468657265",
          "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7", 32 },
        { "4a656665", "7768617420646f2079612077616e7420666f72206e6f7468696e673f",
          "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843", 32 },
        { "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
          "dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd",
          "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe", 32 },
        { "0102030405060708090a0b0c0d0e0f10111213141516171819",
          "cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd",
          "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b", 32 },
        { "0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c", "546573742057697468205472756e636174696f6e",
          "a3b6167473100ee06e0c796c2955552b", 16 },
        { "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
          "54657374205573696e67204c6172676572205468616e20426c6f636b2d53697a65204b6579202d2048617368204b6579204669727374",
          "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54", 32 },
        { "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
          "5468697320697320612074657374207573696e672061206c6172676572207468616e20626c6f636b2d73697a65206b657920616e642061206c6172676572207468616e20626c6f636b2d73697a6520646174612e20546865206b6579206e6565647320746f20626520686173686564206265666f7265206265696e6720757365642062792074686520484d414320616c676f726974686d2e",
          "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2", 32 },
    };
    int i;
    TEST("hmac-sha256 RFC 4231");
    for (i = 0; i < 7; i++) {
        unsigned char key[256], data[256], mac[32], want[32];
        size_t kl, dl, ml;
        unhex(v[i].key, key, &kl);
        unhex(v[i].data, data, &dl);
        unhex(v[i].mac, want, &ml);
        /* split the message in three parts, as the store's proofs are built */
        ddp__hmac_sha256(key, kl, data, dl / 3, data + dl / 3, dl / 3, data + 2 * (dl / 3), dl - 2 * (dl / 3), mac);
        CHECK(memcmp(mac, want, v[i].trunc) == 0, "RFC 4231 test case %d", i + 1);
    }
    {
        unsigned char a[32], b[32];
        memset(a, 7, 32); memcpy(b, a, 32);
        CHECK(ddp__ct_equal(a, b, 32), "equal");
        b[31] ^= 1;
        CHECK(!ddp__ct_equal(a, b, 32), "last byte differs");
    }
}

/* ---- identity records ---- */

static void test_ident(void) {
    ddp__ident a, b;
    char text[DDP__IDENT_MAX + 1], msg[768];
    TEST("identity records");
    make_ident(text, sizeof text, 1, 3, 2, 1, 4242, "job one");
    CHECK(ddp__ident_parse(text, strlen(text) + 1, &a) == 0, "parses: %s", text);
    CHECK(a.version == 1 && a.world == 3 && a.rank == 2 && a.secret == 1 && a.pid == 4242, "fields");
    CHECK(!strcmp(a.job, "job_one"), "job id is one word: %s", a.job);
#define PARSE(str) ddp__ident_parse(str, strlen(str), &b)
    CHECK(PARSE("ddp-ident 1 version=1 world=2 rank=1 future=thing") == 0, "unknown words are skipped");
    CHECK(PARSE("ddp-ident 1 version=1 world=2 rank=2") != 0, "rank outside the world");
    CHECK(PARSE("ddp-ident 1 world=2 rank=1") != 0, "no version");
    CHECK(PARSE("hello there") != 0, "not a record");
    CHECK(PARSE("ddp-ident 1 version=x world=2 rank=1") != 0, "text where a number belongs");
    CHECK(PARSE("ddp-ident 2 version=1 world=2 rank=1") != 0, "another record format");

    b = a; b.rank = 0; b.version = 2;
    CHECK(ddp__ident_compare(&a, &b, 29500, msg, sizeof msg) == DDP_ERROR_MISMATCH, "versions differ");
    CHECK(strstr(msg, "rank 2 runs ddp.h 0.1 but rank 0 runs ddp.h 0.2") != NULL, "names both ranks and versions: %s", msg);
    b = a; b.rank = 0; ddp__copy_str(b.job, sizeof b.job, "job_two");
    CHECK(ddp__ident_compare(&a, &b, 29500, msg, sizeof msg) == DDP_ERROR_MISMATCH &&
          strstr(msg, "port 29500 is used by another job: rank 2 belongs to job 'job_one', rank 0 to job 'job_two'"), "jobs differ: %s", msg);
    b = a; b.world = 4;
    CHECK(ddp__ident_compare(&a, &b, 7, msg, sizeof msg) == DDP_ERROR_MISMATCH && strstr(msg, "port 7 is used by another job") &&
          strstr(msg, "world of 4"), "worlds differ: %s", msg);
    b = a; b.secret = 0;
    CHECK(ddp__ident_compare(&a, &b, 7, msg, sizeof msg) == DDP_ERROR_MISMATCH && strstr(msg, "has a job secret"), "secret on one side: %s", msg);
    b = a; b.pid = 1; b.rank = 1; ddp__copy_str(b.host, sizeof b.host, "elsewhere");
    CHECK(ddp__ident_compare(&a, &b, 7, msg, sizeof msg) == DDP_SUCCESS, "pid and host are no part of the job");
}

/* ---- the job secret ---- */

static void test_secret(void) {
    ddp__store_server *sv = start_store(SECRET, "j", 2, 0, 0, 0);
    ddp__store st;
    char err[1024];
    void *v = NULL;
    size_t len = 0;
    int fd;
    TEST("secret: a rank that knows it");
    log_clear();
    CHECK(client(&st, sv, DDP__WIRE_VERSION, 2, 1, SECRET, 5, "j", err, sizeof err) == 0, "accepted: %s", err);
    CHECK(ddp__store_set(&st, "ddp/1/k", "v", 1, err, sizeof err) == 0, "set after the proof: %s", err);
    CHECK(ddp__store_get(&st, "ddp/1/k", &v, &len, err, sizeof err) == 0 && len == 1, "get: %s", err);
    free(v);
    CHECK(strstr(st.peer_ident, "rank=0") != NULL, "rank 0's identity record after the proof: %s", st.peer_ident);
    CHECK(ddp__store_server_rank_clients(sv) == 1, "one rank connected");
    ddp__store_close(&st);

    TEST("secret: a wrong one");
    CHECK(client(&st, sv, DDP__WIRE_VERSION, 2, 1, "another-secret-of-16+", 6, "j", err, sizeof err) != 0, "refused");
    CHECK(st.fatal == DDP_ERROR_SECURITY && strstr(err, "the secrets differ"), "the message says the secrets differ: %s", err);
    ddp__store_close(&st);

    TEST("secret: none");
    CHECK(client(&st, sv, DDP__WIRE_VERSION, 2, 1, NULL, 7, "j", err, sizeof err) != 0, "refused");
    CHECK(st.fatal == DDP_ERROR_SECURITY && strstr(err, "requires the job secret and this rank has none"), "message: %s", err);
    ddp__store_close(&st);
    ddp__sleep_us(100000);
    CHECK(log_has("rejected client") && log_has("has no job secret"), "rank 0's log says why: %s", logbuf);
    CHECK(log_has("did not prove the job secret"), "the wrong secret is logged too: %s", logbuf);

    TEST("secret: a request before the proof");
    log_clear();
    fd = raw_connect(ddp__store_server_port(sv));
    {   /* V1 GETNUMKEYS, then a SET */
        unsigned char q = 6;
        t_raw_send(fd, &q, 1);
    }
    CHECK(closed_within(fd, 2.0), "dropped");
    raw_close(fd);
    ddp__sleep_us(50000);
    CHECK(log_has("before it proved the job secret"), "logged: %s", logbuf);
    CHECK(ddp__store_server_event(sv, NULL, 0) == 0, "strangers without the secret end nothing");

    TEST("secret: the proof is never the secret");
    {   /* what a client sends holds no copy of the secret */
        int lfd, cfd, afd;
        struct sockaddr_in a;
        socklen_t al = sizeof a;
        unsigned char buf[4096];
        long got;
        char ident[DDP__IDENT_MAX + 1];
        memset(&a, 0, sizeof a);
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        lfd = ddp__sock_open(AF_INET, SOCK_STREAM, 0);
        ddp__sock_listen_prepare(lfd);
        ddp__sock_bind(lfd, (struct sockaddr *)&a, sizeof a);
        ddp__sock_listen(lfd, 1);
        ddp__sock_name(lfd, (struct sockaddr *)&a, &al);
        make_ident(ident, sizeof ident, DDP__WIRE_VERSION, 2, 1, 1, 9, "j");
        memset(&st, 0, sizeof st);
        st.fd = -1;
        ddp__copy_str(st.host, sizeof st.host, "127.0.0.1");
        st.port = ntohs(a.sin_port);
        ddp__store_set_hello(&st, ident, SECRET, strlen(SECRET), err, sizeof err);
        cfd = -1;
        ddp__store_tcp_connect("127.0.0.1", st.port, ddp__now() + 2, 0, &cfd, err, sizeof err);
        {   /* the connection may still be on its way to the listener */
            struct pollfd p;
            p.fd = lfd; p.events = POLLIN; p.revents = 0;
            ddp__sock_poll(&p, 1, 2000);
        }
        afd = ddp__sock_accept(lfd, NULL, NULL);
        {   /* a fake store: read the hello, answer a challenge with a made-up proof */
            int again = 0;
            unsigned char reply[9 + 8 + 64];
            uint32_t m = DDP__STORE_REPLY_MAGIC, z = 0;
            memcpy(reply, &m, 4);
            reply[4] = DDP__HELLO_CHALLENGE;
            memcpy(reply + 5, &z, 4);
            memcpy(reply + 9, &z, 4);
            memset(reply + 13, 0x5a, 64);
            t_raw_send(afd, reply, 13 + 64);
            CHECK(ddp__store_hello(&st, cfd, ddp__now() + 2, &again, err, sizeof err) != 0, "a store that cannot prove the secret is refused");
            CHECK(strstr(err, "does not know this rank's job secret") != NULL, "message: %s", err);
        }
        got = raw_recv(afd, buf, sizeof buf, 0);
        CHECK(got > 0 && find_bytes(buf, (size_t)got, SECRET, strlen(SECRET)) == NULL, "the hello holds no copy of the secret");
        raw_close(afd); raw_close(cfd); raw_close(lfd);
    }
    ddp__store_server_stop(sv);
}

/* ---- another job on the port, another version ---- */

typedef struct waiter { ddp__store st; int rc; double took; char err[1024]; } waiter;

static void *wait_thread(void *arg) { /* a ddp__thread_fn */
    waiter *w = (waiter *)arg;
    const char *k = "ddp/1/never";
    double t0 = ddp__now();
    w->rc = ddp__store_wait(&w->st, &k, 1, w->err, sizeof w->err);
    w->took = ddp__now() - t0;
    return NULL;
}

static void test_other_job(void) {
    ddp__store_server *sv;
    ddp__store st;
    waiter w;
    ddp__thread th;
    char err[1024], ev[1024];
    int kind;

    TEST("another job: both sides fail at once");
    sv = start_store(NULL, "job-A", 2, 0, 0, 0);
    memset(&w, 0, sizeof w);
    CHECK(client(&w.st, sv, DDP__WIRE_VERSION, 2, 0, NULL, ddp__getpid(), "job-A", err, sizeof err) == 0, "rank 0's own client: %s", err);
    w.st.timeout_s = 10;
    ddp__thread_start(&th, wait_thread, &w);
    ddp__sleep_us(100000);
    CHECK(client(&st, sv, DDP__WIRE_VERSION, 2, 1, NULL, 77, "job-B", err, sizeof err) != 0, "the other job's rank is refused");
    CHECK(st.fatal == DDP_ERROR_MISMATCH && strstr(err, "is used by another job: rank 1 belongs to job 'job-B', rank 0 to job 'job-A'"), "its message: %s", err);
    ddp__store_close(&st);
    ddp__thread_join(&th);
    CHECK(w.rc != 0 && w.took < 2.0, "rank 0's pending wait ended at once (%.2f s)", w.took);
    CHECK(strstr(w.err, "port") && strstr(w.err, "is used by another job"), "rank 0's side: %s", w.err);
    kind = ddp__store_server_event(sv, ev, sizeof ev);
    CHECK(kind == DDP__EVENT_MISMATCH && strstr(ev, "job 'job-B'"), "the event: %s", ev);
    ddp__store_close(&w.st);
    ddp__store_server_stop(sv);

    TEST("another job: a secret on one side only");
    sv = start_store(NULL, "j", 2, 0, 0, 0);
    CHECK(client(&st, sv, DDP__WIRE_VERSION, 2, 1, SECRET, 78, "j", err, sizeof err) != 0, "refused");
    CHECK(strstr(err, "is used by another job: rank 1 has a job secret and rank 0 has none"), "message: %s", err);
    CHECK(ddp__store_server_event(sv, ev, sizeof ev) == DDP__EVENT_MISMATCH, "rank 0 fails too: %s", ev);
    ddp__store_close(&st);
    ddp__store_server_stop(sv);

    TEST("another version");
    sv = start_store(SECRET, "j", 2, 0, 0, 0);
    CHECK(client(&st, sv, DDP__WIRE_VERSION - 1, 2, 1, SECRET, 79, "j", err, sizeof err) != 0, "refused");
    {
        char want[160];
        snprintf(want, sizeof want, "rank 1 runs ddp.h %d.%d but rank 0 runs ddp.h %d.%d", (DDP__WIRE_VERSION - 1) / 1000,
                 (DDP__WIRE_VERSION - 1) % 1000, DDP__WIRE_VERSION / 1000, DDP__WIRE_VERSION % 1000);
        CHECK(strstr(err, want) != NULL, "the old rank's message names both: %s", err);
        snprintf(want, sizeof want, "rank 0 runs ddp.h %d.%d but rank 1 runs ddp.h %d.%d", DDP__WIRE_VERSION / 1000,
                 DDP__WIRE_VERSION % 1000, (DDP__WIRE_VERSION - 1) / 1000, (DDP__WIRE_VERSION - 1) % 1000);
        CHECK(ddp__store_server_event(sv, ev, sizeof ev) == DDP__EVENT_MISMATCH && strstr(ev, want), "rank 0's: %s", ev);
    }
    ddp__store_close(&st);
    ddp__store_server_stop(sv);

    TEST("two processes claim one rank");
    sv = start_store(NULL, "j", 3, 0, 0, 0);
    {
        ddp__store a;
        CHECK(client(&a, sv, DDP__WIRE_VERSION, 3, 1, NULL, 1001, "j", err, sizeof err) == 0, "first claim: %s", err);
        CHECK(client(&st, sv, DDP__WIRE_VERSION, 3, 1, NULL, 1001, "j", err, sizeof err) == 0, "the same process again (a reconnect): %s", err);
        ddp__store_close(&st);
        CHECK(client(&st, sv, DDP__WIRE_VERSION, 3, 1, NULL, 1002, "j", err, sizeof err) != 0, "another process: refused");
        CHECK(strstr(err, "two processes claim rank 1"), "message: %s", err);
        ddp__store_close(&st);
        ddp__store_close(&a);
    }
    ddp__store_server_stop(sv);
}

/* ---- keys the job writes once, counters ---- */

static void test_tamper(void) {
    ddp__store_server *sv = start_store(NULL, "j", 2, 0, 0, 0);
    ddp__store r0, x;
    char err[1024], ev[1024];
    void *v = NULL;
    size_t len = 0;
    int64_t n;
    TEST("tampering: a write-once key changed");
    CHECK(client(&r0, sv, DDP__WIRE_VERSION, 2, 0, NULL, ddp__getpid(), "j", err, sizeof err) == 0, "rank 0: %s", err);
    CHECK(ddp__store_set(&r0, "ddp/1/shm/ctrl", "fd @ddp-1-abc bytes=4096", 25, err, sizeof err) == 0, "rank 0 writes");
    CHECK(ddp__store_set(&r0, "ddp/1/shm/ctrl", "fd @ddp-1-abc bytes=4096", 25, err, sizeof err) == 0, "the same value again is no change");
    CHECK(ddp__store_server_event(sv, NULL, 0) == 0, "no event yet");
    /* a bare TCPStore client (no hello, as torch's) */
    CHECK(ddp__store_connect_proto(&x, "127.0.0.1", ddp__store_server_port(sv), 2.0, DDP__STORE_PROTO_V1, err, sizeof err) == 0, "stranger: %s", err);
    ddp__store_set(&x, "ddp/1/shm/ctrl", "fd @evil bytes=4096", 19, err, sizeof err);
    ddp__sleep_us(100000);
    CHECK(ddp__store_server_event(sv, ev, sizeof ev) == DDP__EVENT_TAMPER && strstr(ev, "store tampering: SET of key 'ddp/1/shm/ctrl'"), "event: %s", ev);
    {   /* a plain GET (a WAIT would be answered "aborted" now) */
        ddp__store_buf b;
        ddp__store_req(&r0, &b, DDP__STORE_Q_GET);
        ddp__store_req_key(&r0, &b, "ddp/1/shm/ctrl");
        CHECK(ddp__store_rpc(&r0, &b, DDP__STORE_Q_GET, "k", NULL, 0, err, sizeof err) == 0 &&
              ddp__store_recv_blob(&r0, DDP__STORE_Q_GET, "k", &v, &len, err, sizeof err) == 0 && len == 25 && !memcmp(v, "fd @ddp-1", 9),
              "the value rank 0 wrote is kept: %s", err);
        free(v);
    }
    {
        const char *k = "ddp/1/anything";
        CHECK(ddp__store_wait(&r0, &k, 1, err, sizeof err) != 0 && strstr(err, "ended the rendezvous: store tampering"),
              "after the event every wait ends with it: %s", err);
    }
    ddp__store_close(&x);
    ddp__store_close(&r0);
    ddp__store_server_stop(sv);

    TEST("tampering: text where a counter is expected");
    sv = start_store(NULL, "j", 2, 0, 0, 0);
    CHECK(client(&r0, sv, DDP__WIRE_VERSION, 2, 0, NULL, ddp__getpid(), "j", err, sizeof err) == 0, "rank 0: %s", err);
    ddp__store_connect_proto(&x, "127.0.0.1", ddp__store_server_port(sv), 2.0, DDP__STORE_PROTO_V1, err, sizeof err);
    CHECK(ddp__store_set(&x, "ddp/1/b/count", "abc", 3, err, sizeof err) == 0, "sent");
    ddp__sleep_us(100000);
    CHECK(ddp__store_server_event(sv, ev, sizeof ev) == DDP__EVENT_TAMPER && strstr(ev, "ddp/1/b/count"), "a SET of a counter is tampering: %s", ev);
    ddp__store_close(&x);
    ddp__store_close(&r0);
    ddp__store_server_stop(sv);

    /* a store that protects nothing (torch's agent store): the client
       itself names the key */
    TEST("text where a counter is expected, on a store that protects nothing");
    {
        ddp__store_server *bare = NULL;
        ddp__store_server_start("127.0.0.1", 0, NULL, &bare, err, sizeof err);
        ddp__store_connect_proto(&x, "127.0.0.1", ddp__store_server_port(bare), 2.0, DDP__STORE_PROTO_V1, err, sizeof err);
        ddp__store_set(&x, "w/a/count", "hello", 5, err, sizeof err);
        CHECK(ddp__store_add(&x, "w/a/count", 1, &n, err, sizeof err) != 0, "ADD on text fails");
        CHECK(strstr(err, "key 'w/a/count' holds 'hello' where a counter is expected"), "message names the key: %s", err);
        ddp__store_close(&x);
        ddp__store_server_stop(bare);
    }
}

/* The library's keys through ddp__kv_set_once/verify_pinned, as the NCCL
   id travels (a CPU build checks the key, not NCCL). */
static void test_pinned_key(void) {
    ddp__store_server *bare = NULL;
    ddp_context *ctx = (ddp_context *)calloc(1, sizeof *ctx);
    ddp__store *st = (ddp__store *)calloc(1, sizeof *st), x;
    unsigned char id[128];
    char err[512];
    ddp_result r;
    int i;
    TEST("a modified NCCL-id key (torchrun's store cannot refuse it)");
    for (i = 0; i < 128; i++) id[i] = (unsigned char)i;
    ddp__store_server_start("127.0.0.1", 0, NULL, &bare, err, sizeof err);
    ddp__store_connect_proto(st, "127.0.0.1", ddp__store_server_port(bare), 2.0, DDP__STORE_PROTO_V1, err, sizeof err);
    ctx->store = st;
    ctx->cfg.master_port = ddp__store_server_port(bare);
    ctx->cfg.timeout_s = ctx->cfg.connect_timeout_s = 2;
    ddp__mutex_init(&ctx->err_mu);
    ddp__copy_str(ctx->key_prefix, sizeof ctx->key_prefix, "/worker/attempt_0/ddp/1/");
    CHECK_OK(ddp__kv_set_once(ctx, "nccl/id", id, sizeof id), ctx);
    CHECK_OK(ddp__kv_verify_pinned(ctx), ctx);
    CHECK_OK(ddp__kv_set_once(ctx, "nccl/id", id, sizeof id), ctx);
    ddp__store_connect_proto(&x, "127.0.0.1", ddp__store_server_port(bare), 2.0, DDP__STORE_PROTO_V1, err, sizeof err);
    id[5] ^= 0xff;
    ddp__store_set(&x, "/worker/attempt_0/ddp/1/nccl/id", id, sizeof id, err, sizeof err);
    ddp__sleep_us(100000); /* a SET has no answer: let the store take it */
    r = ddp__kv_verify_pinned(ctx);
    CHECK(r == DDP_ERROR_SECURITY && strstr(ddp_last_error(ctx), "store tampering: key '/worker/attempt_0/ddp/1/nccl/id' changed"),
          "%s: %s", ddp_result_string(r), ddp_last_error(ctx));
    ddp__store_close(&x);
    ddp__store_close(st);
    ddp__store_server_stop(bare);

    TEST("a modified NCCL-id key (rank 0's store refuses it)");
    {
        ddp__store_server *sv = start_store(NULL, "j", 2, 0, 0, 0);
        ddp__store_close(st);
        memset(ctx, 0, sizeof *ctx);
        ddp__mutex_init(&ctx->err_mu);
        client(st, sv, DDP__WIRE_VERSION, 2, 0, NULL, ddp__getpid(), "j", err, sizeof err);
        ctx->store = st;
        ctx->server = sv;
        ctx->cfg.master_port = ddp__store_server_port(sv);
        ddp__copy_str(ctx->key_prefix, sizeof ctx->key_prefix, "ddp/1/");
        CHECK_OK(ddp__kv_set_once(ctx, "nccl/id", id, sizeof id), ctx);
        ddp__store_connect_proto(&x, "127.0.0.1", ddp__store_server_port(sv), 2.0, DDP__STORE_PROTO_V1, err, sizeof err);
        id[6] ^= 0xff;
        ddp__store_set(&x, "ddp/1/nccl/id", id, sizeof id, err, sizeof err);
        ddp__sleep_us(100000);
        r = ddp__kv_verify_pinned(ctx);
        CHECK(r == DDP_ERROR_SECURITY && strstr(ddp_last_error(ctx), "store tampering: SET of key 'ddp/1/nccl/id'"),
              "%s: %s", ddp_result_string(r), ddp_last_error(ctx));
        ddp__store_close(&x);
        ddp__store_close(st);
        ddp__store_server_stop(sv);
    }
    ddp__mutex_destroy(&ctx->err_mu);
    free(st);
    free(ctx);
}

/* ---- limits ---- */

static int legit_roundtrip(ddp__store_server *sv, const char *secret, const char *key) {
    ddp__store st;
    char err[512];
    void *v = NULL;
    size_t len = 0;
    int ok;
    if (client(&st, sv, DDP__WIRE_VERSION, 2, 1, secret, 4000, "j", err, sizeof err) != 0) { fprintf(stderr, "legit: %s\n", err); return 0; }
    ok = ddp__store_set(&st, key, "42", 2, err, sizeof err) == 0 && ddp__store_get(&st, key, &v, &len, err, sizeof err) == 0 && len == 2;
    if (!ok) fprintf(stderr, "legit: %s\n", err);
    free(v);
    ddp__store_close(&st);
    return ok;
}

static void test_limits(void) {
    size_t cap = (size_t)64 << 20;
    ddp__store_server *sv = start_store(NULL, "j", 2, cap, 0.5, 0.5);
    int port = ddp__store_server_port(sv), fds[300], i, n;
    long rss0 = rss_kib(), peak = rss0;
    char *big = (char *)malloc((size_t)1 << 20);
    double t0;
    memset(big, 'x', (size_t)1 << 20);

    TEST("limits: a value over the cap");
    fds[0] = raw_connect(port);
    t_send_set(fds[0], "ddp/9/huge", (uint64_t)DDP__STORE_MAX_VALUE_LEN + 1, NULL, 0);
    CHECK(closed_within(fds[0], 2.0), "dropped at once");
    raw_close(fds[0]);

    TEST("limits: a huge length field");
    fds[0] = raw_connect(port);
    t_send_set(fds[0], "ddp/9/x", (uint64_t)1 << 62, NULL, 0);
    CHECK(closed_within(fds[0], 2.0), "dropped");
    raw_close(fds[0]);
    fds[0] = raw_connect(port);
    {
        unsigned char q = 0;
        uint64_t kl = (uint64_t)1 << 40;
        t_raw_send(fds[0], &q, 1);
        t_raw_send(fds[0], &kl, 8);
    }
    CHECK(closed_within(fds[0], 2.0), "a huge key length: dropped");
    raw_close(fds[0]);

    TEST("limits: garbage");
    fds[0] = raw_connect(port);
    {
        unsigned char g[4096];
        unsigned s = 12345;
        for (i = 0; i < 4096; i++) { s = s * 1103515245u + 12345u; g[i] = (unsigned char)(s >> 16); }
        g[0] = 0xEE;
        t_raw_send(fds[0], g, sizeof g);
    }
    CHECK(closed_within(fds[0], 2.0), "dropped");
    raw_close(fds[0]);

    TEST("limits: truncated requests");
    for (i = 0; i < 20; i++) {
        fds[0] = raw_connect(port);
        t_send_set(fds[0], "ddp/9/t", 1000, big, (size_t)(i * 40));
        raw_close(fds[0]);
    }
    ddp__sleep_us(100000);
    CHECK(ddp__store_server_bytes(sv) < ((size_t)1 << 20), "nothing kept from them (%zu bytes held)", ddp__store_server_bytes(sv));
    CHECK(legit_roundtrip(sv, NULL, "ddp/1/after-truncated"), "a rank is still served");

    TEST("limits: unread replies");
    {
        ddp__store st;
        char err[256];
        unsigned char q = 2;
        uint64_t kl = 9;
        client(&st, sv, DDP__WIRE_VERSION, 2, 1, NULL, 4001, "j", err, sizeof err);
        ddp__store_set(&st, "ddp/9/big", big, (size_t)1 << 20, err, sizeof err);
        ddp__store_close(&st);
        fds[0] = raw_connect(port);
        for (i = 0; i < 300; i++) { t_raw_send(fds[0], &q, 1); t_raw_send(fds[0], &kl, 8); t_raw_send(fds[0], "ddp/9/big", 9); }
        /* read nothing for a second: the server must drop us, not buffer 300 MiB */
        for (i = 0; i < 50; i++) {
            long r = rss_kib();
            if (r > peak) peak = r;
            ddp__sleep_us(20000);
        }
        CHECK(ddp__store_server_bytes(sv) <= cap, "held %zu bytes, cap %zu", ddp__store_server_bytes(sv), cap);
        CHECK(ddp__store_server_clients(sv) == 0, "the client that does not read is dropped (%d connected)", ddp__store_server_clients(sv));
        CHECK(closed_within(fds[0], 3.0), "... and sees the close");
        raw_close(fds[0]);
    }

    TEST("limits: total memory");
    for (i = 0; i < 12; i++) {
        char key[32];
        fds[i] = raw_connect(port);
        snprintf(key, sizeof key, "ddp/9/m%d", i);
        t_send_set(fds[i], key, (uint64_t)8 << 20, NULL, 0);
        for (n = 0; n < 8; n++) t_raw_send(fds[i], big, (size_t)1 << 20);
    }
    ddp__sleep_us(300000);
    {
        long r = rss_kib();
        if (r > peak) peak = r;
    }
    CHECK(ddp__store_server_bytes(sv) <= cap, "held %zu bytes, cap %zu", ddp__store_server_bytes(sv), cap);
    for (n = 0, i = 0; i < 12; i++) { n += closed_within(fds[i], 0.2); raw_close(fds[i]); }
    CHECK(n >= 4, "the writers that would pass the cap were dropped (%d of 12)", n);

    TEST("limits: a WAIT flood");
    for (i = 0; i < 20; i++) {
        unsigned char q = 5;
        uint64_t cnt = 1024, kl = 4000;
        int k;
        fds[i] = raw_connect(port);
        t_raw_send(fds[i], &q, 1);
        t_raw_send(fds[i], &cnt, 8);
        for (k = 0; k < 1024; k++) {
            char key[4000];
            memset(key, 'w', sizeof key);
            snprintf(key, 32, "ddp/9/w%d/%d", i, k);
            key[strlen(key)] = 'w';
            t_raw_send(fds[i], &kl, 8);
            t_raw_send(fds[i], key, kl);
        }
    }
    ddp__sleep_us(300000);
    {
        long r = rss_kib();
        if (r > peak) peak = r;
    }
    CHECK(ddp__store_server_bytes(sv) <= cap, "held %zu bytes, cap %zu", ddp__store_server_bytes(sv), cap);
    for (i = 0; i < 20; i++) raw_close(fds[i]);

    TEST("limits: a slow writer");
    fds[0] = raw_connect(port);
    t0 = ddp__now();
    t_send_set(fds[0], "ddp/9/slow", 100, NULL, 0);
    for (i = 0; i < 40 && !closed_within(fds[0], 0.05); i++) t_raw_send(fds[0], "s", 1);
    CHECK(ddp__now() - t0 < 1.6, "dropped %.2f s after its request started (slow timeout 0.5 s)", ddp__now() - t0);
    raw_close(fds[0]);

    TEST("limits: hundreds of idle connections");
    ddp__sleep_us(1100000); /* a new second for the log's rate limit */
    log_clear();
    for (i = 0; i < 300; i++) fds[i] = raw_connect(port);
    ddp__sleep_us(200000);
    CHECK(ddp__store_server_clients(sv) <= 2 * 2 + DDP__STORE_CONN_HEADROOM, "at most the cap is held (%d)", ddp__store_server_clients(sv));
    CHECK(log_has("evicted"), "evictions are logged");
    t0 = ddp__now(); /* the last ones were accepted just now: 0.5 s from then, and some slack for a loaded machine */
    while (ddp__store_server_clients(sv) > 0 && ddp__now() - t0 < 3.0) ddp__sleep_us(10000);
    CHECK(ddp__store_server_clients(sv) == 0, "silent connections time out (%d left)", ddp__store_server_clients(sv));
    for (i = 0; i < 300; i++) raw_close(fds[i]);
    ddp__store_server_stop(sv);

    TEST("limits: a store under attack keeps serving, and stops at once");
    sv = start_store(SECRET, "j", 2, cap, 0, 0);
    port = ddp__store_server_port(sv);
    for (i = 0; i < 60; i++) fds[i] = raw_connect(port);
    for (i = 60; i < 120; i++) { fds[i] = raw_connect(port); t_send_set(fds[i], "ddp/9/p", 1000, big, 10); }
    CHECK(legit_roundtrip(sv, SECRET, "ddp/1/while-attacked"), "a rank with the secret is served");
    t0 = ddp__now();
    ddp__store_server_stop(sv);
    CHECK(ddp__now() - t0 < 1.0, "stopped in %.3f s with 120 strangers connected", ddp__now() - t0);
    for (i = 0; i < 120; i++) raw_close(fds[i]);
    {
        long r = rss_kib();
        if (r > peak) peak = r;
    }
    if (!UNDER_ASAN)
        CHECK(peak - rss0 < (long)(cap / 1024) + 32 * 1024, "this process grew by %ld KiB at most (cap %zu KiB)", peak - rss0, cap / 1024);
    free(big);
}

int main(void) {
#if !defined(_WIN32)
    signal(SIGPIPE, SIG_IGN);
#endif
    ddp__mutex_init(&log_mu);
    if (ddp__net_start() != 0) { fprintf(stderr, "test_security: cannot start the sockets layer\n"); return 2; }
    test_sha256();
    test_hmac_rfc4231();
    test_ident();
    test_secret();
    test_other_job();
    test_tamper();
    test_pinned_key();
    test_limits();
    ddp__net_stop();
    return t_summary("test_security");
}
