/* Hostile clients against whole jobs (real ranks in forked processes, on
   127.0.0.1): strangers flooding rank 0's store while a job runs, with and
   without a job secret; a stranger forging the shared-memory reference
   (before rank 0 writes it, on a store that cannot refuse it, and after);
   a second job on the same port; a rank of another library version.
   Every job either finishes with the right result or fails with the named
   error; rank 0's memory stays under the store's cap; rank 0's
   ddp_destroy returns within 1 s whatever is connected; nobody takes
   memory from a stranger. */
#define DDP_IMPLEMENTATION
#include "../ddp.h"
#include "testing.h"

#include <sys/wait.h>

#define SECRET "hostile-test-secret-0123456789abcdef"
#define STORE_CAP ((size_t)64 << 20)

static long status_kib(const char *field) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long v = -1;
    size_t n = strlen(field);
    if (!f) return -1;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, field, n)) v = strtol(line + n, NULL, 10);
    fclose(f);
    return v;
}

static int raw_connect(int port) {
    struct sockaddr_in a;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons((uint16_t)port);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) { close(fd); return -1; }
    return fd;
}

static void touch(const char *path) { FILE *f = fopen(path, "w"); if (f) fclose(f); }
static int exists(const char *path) { return access(path, F_OK) == 0; }

/* ---- a job and its log ---- */

typedef struct job {
    int world, port;
    const char *secret, *job_id;
    const char *dir;        /* flags between the ranks and the stranger */
    int wait_attack;        /* rank 0 waits for "<dir>/attacked" before finalize */
    int agent;              /* ranks use an outside store (torchrun's role) at port */
} job;

static FILE *rank_log;
static size_t store_peak; /* rank 0: the most its store held, sampled while it runs */
static int sampling;

static void *sample_store(void *arg) {
    const ddp__store_server *sv = (const ddp__store_server *)arg;
    while (__atomic_load_n(&sampling, __ATOMIC_ACQUIRE)) {
        size_t b = ddp__store_server_bytes(sv);
        if (b > store_peak) store_peak = b;
        ddp__sleep_us(500);
    }
    return NULL;
}
static void file_logger(ddp_log_level lvl, int rank, const char *msg, void *user) {
    (void)user;
    if (rank_log) { fprintf(rank_log, "[%d] %d %s\n", rank, (int)lvl, msg); fflush(rank_log); }
}

/* One rank of a job: create, finalize, a few steps whose result is known,
   destroy (rank 0 times it). Exit 0 finished right; 3 failed with an error
   (written to <dir>/err.<rank>); 4 finished wrong. */
static int run_rank(const job *j, int rank) {
    ddp_config c;
    ddp_context *ctx;
    char path[512];
    float w0[1000], *w;
    int id, step, i;
    ddp_result r;
    long rss0 = status_kib("VmRSS:");
    FILE *ef;
    double t;
    pthread_t sampler;
    snprintf(path, sizeof path, "%s/log.%d", j->dir, rank);
    rank_log = fopen(path, "w");
    snprintf(path, sizeof path, "%s/err.%d", j->dir, rank);
    ef = fopen(path, "w");
    memset(&c, 0, sizeof c);
    if (j->agent) {
        char v[32];
        setenv("TORCHELASTIC_USE_AGENT_STORE", "True", 1);
        setenv("TORCHELASTIC_RESTART_COUNT", "0", 1);
        snprintf(v, sizeof v, "%d", rank); setenv("RANK", v, 1); setenv("LOCAL_RANK", v, 1);
        snprintf(v, sizeof v, "%d", j->world); setenv("WORLD_SIZE", v, 1); setenv("LOCAL_WORLD_SIZE", v, 1);
        setenv("MASTER_ADDR", "127.0.0.1", 1);
        snprintf(v, sizeof v, "%d", j->port); setenv("MASTER_PORT", v, 1);
    } else {
        c.rank = rank;
        c.world_size = j->world;
        c.master_addr = "127.0.0.1";
        c.master_port = j->port;
    }
    c.timeout_s = 4;
    c.job_secret = j->secret;
    c.job_id = j->job_id;
    c.store_max_bytes = STORE_CAP;
    c.optimizer.type = DDP_OPTIM_SGD;
    c.optimizer.lr = 0.5f;
    c.logger.func = file_logger;
    c.logger.level = DDP_LOG_WARN;
    for (i = 0; i < 1000; i++) w0[i] = (float)i;
    r = ddp_create(&c, &ctx);
    if (r != DDP_SUCCESS) { fprintf(ef, "%s: %s\n", ddp_result_string(r), ddp_create_error()); fclose(ef); return 3; }
    if (ctx->server) {
        sampling = 1;
        pthread_create(&sampler, NULL, sample_store, ctx->server);
    }
    if (rank == 0 && j->wait_attack) {
        snprintf(path, sizeof path, "%s/attacked", j->dir);
        for (t = ddp__now(); !exists(path) && ddp__now() - t < 10; ) ddp__sleep_us(5000);
    }
    ddp_register_param(ctx, "w", 1000, DDP_F32, w0, &id);
    r = ddp_finalize(ctx);
    for (step = 0; step < 4 && r == DDP_SUCCESS; step++) {
        float *g;
        r = ddp_step_begin(ctx);
        if (r != DDP_SUCCESS) break;
        g = (float *)ddp_param_grad(ctx, id);
        for (i = 0; i < 1000; i++) g[i] += (float)(rank + 1); /* average over ranks: (world + 1) / 2 */
        if ((r = ddp_mark_ready(ctx, id)) == DDP_SUCCESS && (r = ddp_step_end(ctx)) == DDP_SUCCESS) r = ddp_optimizer_step(ctx);
    }
    if (sampling) { __atomic_store_n(&sampling, 0, __ATOMIC_RELEASE); pthread_join(sampler, NULL); }
    if (r != DDP_SUCCESS) {
        fprintf(ef, "%s: %s\n", ddp_result_string(r), ddp_last_error(ctx));
        fclose(ef);
        ddp_destroy(ctx);
        return 3;
    }
    w = (float *)ddp_param_data(ctx, id);
    for (i = 0; i < 1000; i++) {
        float want = (float)i;
        for (step = 0; step < 4; step++) want -= 0.5f * (float)(j->world + 1) / 2.0f;
        if (w[i] != want) { fprintf(ef, "weight %d is %g, want %g\n", i, (double)w[i], (double)want); fclose(ef); return 4; }
    }
    if (sampling) { __atomic_store_n(&sampling, 0, __ATOMIC_RELEASE); pthread_join(sampler, NULL); }
    t = ddp__now();
    ddp_destroy(ctx);
    fprintf(ef, "ok destroy %.3f rss_growth_kib %ld hwm_kib %ld rss0_kib %ld store_peak %zu\n", ddp__now() - t, status_kib("VmHWM:") - rss0,
            status_kib("VmHWM:"), rss0, store_peak);
    fclose(ef);
    return 0;
}

/* Runs the job's ranks (and attack(), in the parent, meanwhile); exit codes in codes[]. */
static void run_job(const job *j, int *codes, void (*attack)(const job *), double limit_s) {
    pid_t pids[4];
    int r, left = j->world;
    double t0 = ddp__now();
    fflush(stdout); fflush(stderr);
    for (r = 0; r < j->world; r++) {
        pids[r] = fork();
        if (pids[r] == 0) _exit(run_rank(j, r));
        codes[r] = -1;
    }
    if (attack) attack(j);
    while (left > 0) {
        int st;
        pid_t p = waitpid(-1, &st, WNOHANG);
        if (p > 0) {
            for (r = 0; r < j->world; r++) if (pids[r] == p) { codes[r] = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st); left--; }
            continue;
        }
        if (ddp__now() - t0 > limit_s) for (r = 0; r < j->world; r++) if (codes[r] == -1) kill(pids[r], SIGKILL);
        ddp__sleep_us(2000);
    }
}

/* a file's text, "" when it is missing */
static char *slurp(const char *path) {
    char *s = t_slurp(path);
    return s ? s : (char *)calloc(1, 1);
}

static char *rank_file(const job *j, const char *what, int r) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s.%d", j->dir, what, r);
    return slurp(path);
}

/* ---- the floods ---- */

static int wait_port(int port) {
    double t0 = ddp__now();
    int fd;
    while ((fd = raw_connect(port)) < 0 && ddp__now() - t0 < 10) ddp__sleep_us(2000);
    return fd;
}

static int idle_fds[400], nidle;

static void flood(const job *j) {
    int fd = wait_port(j->port), i, n;
    char *big = (char *)malloc((size_t)1 << 20), path[512];
    unsigned char g[4096];
    memset(big, 'x', (size_t)1 << 20);
    for (i = 0; i < 4096; i++) g[i] = (unsigned char)(i * 131 + 7);
    if (fd >= 0) close(fd);
    /* a stranger that says hello without the secret, and one with a wrong one */
    {
        ddp__store st;
        char err[512], ident[DDP__IDENT_MAX + 1];
        ddp__ident me;
        memset(&me, 0, sizeof me);
        me.version = DDP__WIRE_VERSION; me.world = j->world; me.rank = 1; me.pid = 999999;
        me.secret = 0;
        ddp__copy_str(me.job, sizeof me.job, j->job_id ? j->job_id : "-");
        ddp__copy_str(me.host, sizeof me.host, "stranger"); ddp__copy_str(me.nonce, sizeof me.nonce, "-");
        ddp__ident_format(&me, ident, sizeof ident);
        if (j->secret) {
            ddp__store_connect_hello(&st, "127.0.0.1", j->port, 2.0, ident, NULL, 0, err, sizeof err);
            ddp__store_close(&st);
            me.secret = 1;
            ddp__ident_format(&me, ident, sizeof ident);
            ddp__store_connect_hello(&st, "127.0.0.1", j->port, 2.0, ident, "not-the-job-secret-at-all", 25, err, sizeof err);
            ddp__store_close(&st);
        }
    }
    /* garbage, a huge length, truncated requests, a slow writer */
    fd = raw_connect(j->port); g[0] = 0xEE; t_raw_send(fd, g, sizeof g); close(fd);
    fd = raw_connect(j->port); t_send_set(fd, "junk/huge", (uint64_t)1 << 62, NULL, 0); close(fd);
    for (i = 0; i < 10; i++) { fd = raw_connect(j->port); t_send_set(fd, "junk/t", 1000, big, (size_t)i * 30); close(fd); }
    idle_fds[nidle++] = raw_connect(j->port);
    t_send_set(idle_fds[nidle - 1], "junk/slow", 100, "s", 1);
    /* hello-less requests: without a secret a bare TCPStore client is served
       (torch's own keys would look like this); with one, it is dropped */
    for (n = 0; n < 4; n++) {
        unsigned char q = 2;
        uint64_t kl = 10;
        fd = raw_connect(j->port);
        t_send_set(fd, "junk/big/0", (uint64_t)1 << 20, big, (size_t)1 << 20);
        for (i = 0; i < 150; i++) { t_raw_send(fd, &q, 1); t_raw_send(fd, &kl, 8); t_raw_send(fd, "junk/big/0", 10); }
        idle_fds[nidle++] = fd; /* never read */
    }
    for (n = 0; n < 8; n++) { /* values that would pass the memory cap */
        char key[32];
        fd = raw_connect(j->port);
        snprintf(key, sizeof key, "junk/m%d", n);
        t_send_set(fd, key, (uint64_t)12 << 20, NULL, 0);
        for (i = 0; i < 12; i++) t_raw_send(fd, big, (size_t)1 << 20);
        idle_fds[nidle++] = fd;
    }
    /* and hundreds of connections that say nothing, left open */
    while (nidle < 300) idle_fds[nidle++] = raw_connect(j->port);
    free(big);
    snprintf(path, sizeof path, "%s/attacked", j->dir);
    touch(path);
}

static void close_idle(void) {
    int i;
    for (i = 0; i < nidle; i++) if (idle_fds[i] >= 0) close(idle_fds[i]);
    nidle = 0;
}

static void check_finished(const job *j, const int *codes, int want_rejections) {
    int r;
    for (r = 0; r < j->world; r++) {
        char *e = rank_file(j, "err", r);
        CHECK(codes[r] == 0, "rank %d exited %d: %s", r, codes[r], e);
        if (r == 0 && codes[r] == 0) {
            double destroy = 9;
            long growth = -1;
            char *p = strstr(e, "destroy ");
            if (p) destroy = atof(p + 8);
            p = strstr(e, "rss_growth_kib ");
            if (p) growth = atol(p + 15);
            CHECK(destroy < 1.0, "rank 0's ddp_destroy took %.3f s with strangers connected", destroy);
            CHECK(growth >= 0 && (UNDER_ASAN || growth < (long)(STORE_CAP / 1024) + 48 * 1024),
                  "rank 0 grew by %ld KiB at its peak (store cap %zu KiB)", growth, STORE_CAP / 1024);
            p = strstr(e, "store_peak ");
            CHECK(p && (size_t)atol(p + 11) <= STORE_CAP, "the store's own count stayed under its cap: %s", p ? p : e);
        }
        free(e);
    }
    if (want_rejections) {
        char *l = rank_file(j, "log", 0);
        CHECK(strstr(l, "rejected client") && strstr(l, "has no job secret") && strstr(l, "did not prove the job secret"),
              "rank 0's log names the strangers it rejected: %.600s", l);
        free(l);
    }
}

static void test_floods(const char *dir) {
    job j;
    int codes[4];
    memset(&j, 0, sizeof j);
    j.world = 2; j.dir = dir; j.wait_attack = 1; j.job_id = "floods";
    TEST("strangers flood the store of a job with a secret");
    j.port = t_free_port(); j.secret = SECRET;
    run_job(&j, codes, flood, 60);
    close_idle();
    check_finished(&j, codes, 1);

    TEST("strangers flood the store of a job without a secret");
    j.port = t_free_port(); j.secret = NULL;
    run_job(&j, codes, flood, 60);
    close_idle();
    check_finished(&j, codes, 0);
}

/* ---- forged shared memory ---- */

/* The stranger's memory: 42.0 everywhere, a socket handing it to anyone
   (counting who asks), or a name in /dev/shm. Runs in its own process. */
static void stranger_memory(const char *dir, int named, unsigned mode, size_t bytes, char *ref, size_t cap) {
    int fd = -1, lfd = -1, p[2];
    size_t i;
    float *m;
    if (pipe(p) != 0) return;
    if (fork() == 0) {
        char name[128], path[512];
        double t0 = ddp__now();
        int asked = 0;
        close(p[0]);
        if (named) {
            snprintf(name, sizeof name, "/ddp-evil-%d", (int)getpid());
            fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, mode);
            fchmod(fd, mode);
            if (ftruncate(fd, (off_t)bytes) != 0) _exit(1);
        } else {
            ddp__shm_obj_anon(bytes, &fd);
            fchmod(fd, mode);
            ddp__sock_local_listen(name, sizeof name, &lfd);
        }
        m = (float *)mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        for (i = 0; i < bytes / 4; i++) m[i] = 42.0f;
        if (write(p[1], name, strlen(name) + 1) < 0) _exit(1);
        close(p[1]);
        /* serve the memory to whoever asks, for a few seconds */
        while (ddp__now() - t0 < 6) {
            int c = lfd >= 0 ? ddp__sock_local_accept(lfd) : -1;
            if (c >= 0) {
                unsigned char req[24];
                double t1 = ddp__now();
                ssize_t got = 0;
                while (got < 24 && ddp__now() - t1 < 1) {
                    ssize_t k = recv(c, req + got, (size_t)(24 - got), MSG_DONTWAIT);
                    if (k > 0) got += k;
                    else if (k == 0) break;
                    else ddp__sleep_us(1000);
                }
                if (got == 24) { asked++; ddp__sock_send_fd(c, fd, 0); }
                close(c);
            }
            ddp__sleep_us(2000);
        }
        for (i = 0; i < bytes / 4; i++) if (m[i] != 42.0f) break;
        snprintf(path, sizeof path, "%s/stranger", dir);
        {
            FILE *f = fopen(path, "w");
            if (f) { fprintf(f, "asked %d intact %d\n", asked, i == bytes / 4); fclose(f); }
        }
        if (named) shm_unlink(name);
        _exit(0);
    }
    close(p[1]);
    if (read(p[0], ref, cap) <= 0) ref[0] = 0;
    close(p[0]);
}

static void check_forged(const job *j, const int *codes, const char *what) {
    int r, finished = 0;
    char path[512], *s;
    int st;
    while (waitpid(-1, &st, 0) > 0) { } /* the stranger */
    for (r = 0; r < j->world; r++) {
        char *e = rank_file(j, "err", r);
        if (codes[r] == 0) finished++;
        else
            CHECK(codes[r] == 3 && (strstr(e, "DDP_ERROR_SECURITY") || strstr(e, "DDP_ERROR_PEER") || strstr(e, "DDP_ERROR_TIMEOUT")) &&
                  (strstr(e, "store tampering") || strstr(e, "not by rank 0") || strstr(e, "open to other users") ||
                   strstr(e, "not this context's") || strstr(e, "gave up") || strstr(e, "exited") || strstr(e, "refused") || strstr(e, "rank 0 did not publish")),
                  "%s: rank %d exited %d with: %s", what, r, codes[r], e);
        free(e);
    }
    CHECK(finished == 0 || finished == j->world, "%s: the job finishes or fails, as a whole (%d of %d finished)", what, finished, j->world);
    snprintf(path, sizeof path, "%s/stranger", j->dir);
    s = slurp(path);
    CHECK(strstr(s, "asked 0 intact 1") != NULL, "%s: nobody asked for or wrote the stranger's memory: %s", what, s);
    free(s);
}

/* The forged reference on a store that cannot refuse it (torchrun's role),
   set before the ranks run and set again and again. */
static const char *forged_value;
static int forged_port;
static void forge_repeatedly(const job *j) {
    ddp__store x;
    char err[256];
    double t0 = ddp__now();
    (void)j;
    if (ddp__store_connect_proto(&x, "127.0.0.1", forged_port, 2.0, DDP__STORE_PROTO_V1, err, sizeof err) != 0) return;
    while (ddp__now() - t0 < 3) {
        ddp__store_set(&x, "/worker/attempt_0/ddp/1/shm/ctrl", forged_value, strlen(forged_value) + 1, err, sizeof err);
        ddp__sleep_us(500);
    }
    ddp__store_close(&x);
}

static void test_forged(const char *dir) {
    static const struct { int named; unsigned mode; const char *name; } kinds[] = {
        { 0, 0600, "a stranger's socket handing out its memory" },
        { 1, 0666, "a stranger's world-writable named segment" },
        { 1, 0600, "a stranger's private named segment (no nonce)" },
    };
    int k, codes[4];
    for (k = 0; k < 3; k++) {
        ddp__store_server *bare = NULL;
        char ref[160], val[300], err[256];
        job j;
        memset(&j, 0, sizeof j);
        j.world = 2; j.dir = dir; j.agent = 1;
        TEST(kinds[k].name);
        ddp__store_server_start("127.0.0.1", 0, NULL, &bare, err, sizeof err);
        j.port = forged_port = ddp__store_server_port(bare);
        stranger_memory(dir, kinds[k].named, kinds[k].mode, ddp__ctrl_header_bytes(2) + 2 * ((size_t)16 << 20), ref, sizeof ref);
        snprintf(val, sizeof val, "%s %s bytes=%zu", kinds[k].named ? "name" : "fd", ref, ddp__ctrl_header_bytes(2) + 2 * ((size_t)16 << 20));
        forged_value = val;
        run_job(&j, codes, forge_repeatedly, 60);
        ddp__store_server_stop(bare);
        check_forged(&j, codes, kinds[k].name);
    }
}

/* After rank 0 wrote it, on rank 0's own store: refused and reported. */
static void overwrite_after(const job *j) {
    ddp__store x;
    char err[256];
    const char *k = "ddp/1/shm/ctrl";
    wait_port(j->port);
    if (ddp__store_connect_proto(&x, "127.0.0.1", j->port, 5.0, DDP__STORE_PROTO_V1, err, sizeof err) != 0) return;
    if (ddp__store_wait(&x, &k, 1, err, sizeof err) == 0)
        ddp__store_set(&x, k, forged_value, strlen(forged_value) + 1, err, sizeof err);
    ddp__store_close(&x);
}

static void test_overwrite(const char *dir) {
    job j;
    int codes[4];
    char ref[160], val[300];
    memset(&j, 0, sizeof j);
    j.world = 2; j.dir = dir; j.job_id = "overwrite";
    TEST("a stranger overwrites the shared-memory reference on rank 0's store");
    j.port = t_free_port();
    stranger_memory(dir, 0, 0600, ddp__ctrl_header_bytes(2) + 2 * ((size_t)16 << 20), ref, sizeof ref);
    snprintf(val, sizeof val, "fd %s bytes=%zu", ref, ddp__ctrl_header_bytes(2) + 2 * ((size_t)16 << 20));
    forged_value = val;
    run_job(&j, codes, overwrite_after, 60);
    check_forged(&j, codes, "overwrite");
    {
        char *e = rank_file(&j, "err", 0);
        if (codes[0] != 0) CHECK(strstr(e, "store tampering") != NULL, "rank 0 names the tampering: %s", e);
        free(e);
    }
}

/* ---- another job on the port ---- */

static void second_job(const job *j) {
    /* rank 1 of another job comes to the port while the first job's rank 0
       waits for its own rank 1 (which starts later) */
    ddp_config c;
    ddp_context *ctx = NULL;
    char path[512];
    FILE *f;
    ddp_result r;
    memset(&c, 0, sizeof c);
    c.rank = 1; c.world_size = 2; c.master_addr = "127.0.0.1"; c.master_port = j->port; c.timeout_s = 4;
    c.job_id = "job-B";
    c.job_secret = j->secret ? "the-other-jobs-secret-0123456789" : NULL;
    wait_port(j->port);
    r = ddp_create(&c, &ctx);
    snprintf(path, sizeof path, "%s/second", j->dir);
    f = fopen(path, "w");
    if (f) { fprintf(f, "%s: %s\n", ddp_result_string(r), r == DDP_SUCCESS ? "JOINED" : ddp_create_error()); fclose(f); }
    if (ctx) ddp_destroy(ctx);
}

static void test_two_jobs(const char *dir) {
    int codes[4], s;
    for (s = 0; s < 2; s++) {
        job j;
        pid_t p;
        char path[512], *e0, *e1, *sec;
        int st;
        memset(&j, 0, sizeof j);
        j.world = 1; /* only rank 0 of job A is started by run_job */
        j.dir = dir; j.job_id = "job-A"; j.secret = s ? SECRET : NULL;
        TEST(s ? "two jobs on one port, with secrets" : "two jobs on one port, without secrets");
        j.port = t_free_port();
        /* job A: ranks 0 and 1 of a world of 2, rank 1 late (with a secret,
           job A must still work); the other job's rank 1 comes first */
        p = fork();
        if (p == 0) {
            job a = j;
            a.world = 2;
            _exit(run_rank(&a, 0));
        }
        if (s && fork() == 0) { job a = j; a.world = 2; ddp__sleep_us(1000000); _exit(run_rank(&a, 1)); }
        if (fork() == 0) { second_job(&j); _exit(0); }
        codes[1] = 0;
        waitpid(p, &st, 0);
        codes[0] = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
        while (waitpid(-1, &st, 0) > 0) codes[1] = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
        snprintf(path, sizeof path, "%s/second", dir);
        sec = slurp(path);
        e0 = rank_file(&j, "err", 0);
        e1 = rank_file(&j, "err", 1);
        CHECK(strstr(sec, "JOINED") == NULL, "the other job's rank did not join: %s", sec);
        if (!s) {
            CHECK(strstr(sec, "DDP_ERROR_MISMATCH") && strstr(sec, "is used by another job") && strstr(sec, "'job-B'") && strstr(sec, "'job-A'"),
                  "the other job's rank fails, naming both jobs: %s", sec);
            CHECK(codes[0] == 3 && strstr(e0, "is used by another job"), "job A's rank 0 fails at once as well (%d): %s", codes[0], e0);
        } else {
            CHECK(strstr(sec, "DDP_ERROR_SECURITY") && strstr(sec, "the secrets differ"), "the other job's rank: the secrets differ: %s", sec);
            CHECK(codes[0] == 0 && codes[1] == 0, "job A, which has the secret, carries on (%d %d): %s / %s", codes[0], codes[1], e0, e1);
        }
        free(sec); free(e0); free(e1);
    }
}

/* ---- where the store listens ---- */

/* The local address of the socket listening on port (from /proc/net), as
   "127.0.0.1", "0.0.0.0", "::" or "other"; "" when nothing listens. */
static void listen_addr(int port, char *out, size_t cap) {
    static const char *files[2] = { "/proc/net/tcp", "/proc/net/tcp6" };
    int k;
    out[0] = 0;
    for (k = 0; k < 2; k++) {
        FILE *f = fopen(files[k], "r");
        char line[512];
        if (!f) continue;
        while (fgets(line, sizeof line, f)) {
            char local[64];
            unsigned p, st;
            char *colon;
            if (sscanf(line, " %*d: %63s %*s %x", local, &st) != 2 || st != 0x0A) continue;
            colon = strchr(local, ':');
            if (!colon || sscanf(colon + 1, "%x", &p) != 1 || (int)p != port) continue;
            *colon = 0;
            if (!strcmp(local, "0100007F")) snprintf(out, cap, "127.0.0.1");
            else if (!strcmp(local, "00000000")) snprintf(out, cap, "0.0.0.0");
            else if (!strcmp(local, "00000000000000000000000000000000")) snprintf(out, cap, "::");
            else snprintf(out, cap, "other");
        }
        fclose(f);
    }
}

static void test_bind(void) {
    static const struct { const char *bind; const char *want; const char *name; } cases[] = {
        { NULL, "127.0.0.1", "the store listens on the master address (127.0.0.1), not every interface" },
        { "*", "::", "store_bind \"*\": every interface, when asked" },
    };
    int k;
    for (k = 0; k < 2; k++) {
        int port = t_free_port();
        pid_t p;
        char got[32];
        double t0 = ddp__now();
        TEST(cases[k].name);
        p = fork();
        if (p == 0) {
            ddp_config c;
            ddp_context *ctx;
            memset(&c, 0, sizeof c);
            c.rank = 0; c.world_size = 2; c.master_addr = "127.0.0.1"; c.master_port = port; c.timeout_s = 3;
            c.store_bind = cases[k].bind;
            _exit(ddp_create(&c, &ctx) == DDP_SUCCESS ? 0 : 3);
        }
        do { listen_addr(port, got, sizeof got); if (!got[0]) ddp__sleep_us(5000); } while (!got[0] && ddp__now() - t0 < 3);
        kill(p, SIGKILL);
        waitpid(p, NULL, 0);
        if (!strcmp(cases[k].want, "::") && !strcmp(got, "0.0.0.0")) ddp__copy_str(got, sizeof got, "::"); /* a host without IPv6 */
        CHECK(!strcmp(got, cases[k].want), "listening on '%s', expected '%s'", got, cases[k].want);
    }
}

int main(void) {
    char dir[] = "/tmp/test_hostile.XXXXXX";
    signal(SIGPIPE, SIG_IGN);
    if (!mkdtemp(dir)) return 2;
    if (!getenv("ONLY") || strstr(getenv("ONLY"), "bind")) test_bind();
    if (!getenv("ONLY") || strstr(getenv("ONLY"), "flood")) test_floods(dir);
    if (!getenv("ONLY") || strstr(getenv("ONLY"), "forged")) test_forged(dir);
    if (!getenv("ONLY") || strstr(getenv("ONLY"), "overwrite")) test_overwrite(dir);
    if (!getenv("ONLY") || strstr(getenv("ONLY"), "two")) test_two_jobs(dir);
    {
        char cmd[600];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
        if (!getenv("KEEP") && system(cmd) != 0) fprintf(stderr, "cannot remove %s\n", dir);
    }
    return t_summary("test_hostile");
}
