/* ddprun — the local launcher for ddp.h programs (one host, N processes).

   It plays the part of `torchrun --standalone --nproc-per-node N` for a program
   that reads the torchrun environment variables, without Python.

   USAGE
       ddprun -n N [--master-addr A] [--master-port P] [--grace S]
              [--no-prefix] [--] program [args...]

       -n N               number of processes (ranks), 1 to 1024; required
       --master-addr A    MASTER_ADDR given to every rank (default 127.0.0.1)
       --master-port P    MASTER_PORT given to every rank (default: a port that
                          was free on 127.0.0.1 a moment before the start; the
                          usual small race with other programs remains)
       --grace S          seconds between SIGTERM and SIGKILL when the ranks
                          are stopped (default 5; may be fractional, or 0)
       --no-prefix        children write straight to ddprun's stdout/stderr
       -h, --help         print the usage and exit 0
       Options end at `--` or at the first argument that is not an option, so
       the program's own options are never taken for ddprun's.
       `--name=value` and `-nN` are accepted too.

   ENVIRONMENT OF EACH RANK (r = 0..N-1), overwriting inherited values
       RANK=r  WORLD_SIZE=N  LOCAL_RANK=r  LOCAL_WORLD_SIZE=N  GROUP_RANK=0
       MASTER_ADDR  MASTER_PORT  DDP_LAUNCHER=ddprun
       DDP_JOB_SECRET  64 random hex digits (from the kernel's random
                       generator), new for every run of ddprun: rank 0's
                       store admits only processes that prove they know it
                       (see SECURITY in ddp.h); it is never printed
       DDP_JOB_ID      ddprun-<host>-<pid>-<random>: the job's name, which
                       ranks compare at rendezvous
       TORCHELASTIC_USE_AGENT_STORE is removed: ddprun runs no agent store, and a
       ddprun started under torchrun must not send its ranks looking for one.

   OUTPUT
       Every line a rank writes is printed as "[r] line", stdout lines on
       ddprun's stdout and stderr lines on its stderr. Lines are read through
       pipes and written whole, so lines of different ranks never mix. A final
       line without a newline is printed with one added. A line longer than
       1 MiB is cut into 1 MiB pieces, each printed as a line. If ddprun's own
       stdout or stderr goes away (EPIPE), that output is dropped; the ranks run on.

   EXIT STATUS
       0      every rank exited with status 0
       c      the first rank to fail exited with status c, or was killed by
              signal s and c = 128 + s (as a shell reports it). That rank is
              named on stderr, the other ranks get SIGTERM, and after --grace
              seconds the ones still running get SIGKILL. When a rank dies by
              a signal, the others usually see it and exit with an error a
              moment later: a failure by signal therefore wins over failures
              by exit status that end within DEATH_SETTLE_S (0.2 s) of it,
              whatever order the kernel reports them in.
       128+s  ddprun got signal s (see SIGNALS) and every rank still exited 0
       2      bad usage (message and usage line on stderr)
       125    ddprun itself failed (fork, pipe, open-file limit, no free port)
       127    a rank's program could not be executed; that child prints
              "ddprun: cannot run 'prog': <reason>" (prefixed like its output)
       ddprun always waits for every rank before it exits: no zombies are left.

   SIGNALS
       Each rank runs in its own process group. A Ctrl-C (or Ctrl-\, Ctrl-Z) on
       the terminal therefore reaches ddprun alone, and ddprun forwards it once
       to every rank's group; had the ranks stayed in the terminal's foreground
       group, they would get the terminal's signal and then ddprun's copy. The
       group also lets one kill reach what a rank started itself (`sh -c`
       children, data-loader workers).
       - SIGINT, SIGTERM, SIGHUP, SIGQUIT: forwarded as they are, and they start
         the grace period: ranks still running --grace seconds after the first
         one get SIGKILL.
       - SIGTSTP: forwarded, then ddprun stops itself; SIGCONT is forwarded, so
         `fg` resumes everyone.
       - A signal that is ignored when ddprun starts (nohup's SIGHUP; SIGINT
         for a job a script started with &) stays ignored, in the ranks too.
       Because the ranks are not in the terminal's foreground group, a rank
       reading a terminal would be stopped (SIGTTIN) and hang the run, so when
       ddprun's stdin is a terminal the ranks get /dev/null as stdin.
       On Linux each rank also gets SIGTERM if ddprun dies (PR_SET_PDEATHSIG),
       so a ddprun killed with SIGKILL leaves no ranks behind.

   WHEN A RANK OR DDPRUN ENDS
       A rank's process group outlives the rank when the rank leaves children
       behind; when the rank ends, ddprun ends its group too (SIGTERM, then
       SIGKILL after --grace), whether the rank failed or not, and removes
       the shared-memory names the rank may have left in /dev/shm (ddp.h
       names them /dev/shm/ddp-<pid>-...; on Linux it uses none, but builds
       without memfd do). ddprun exits only when every group is empty.
       If ddprun itself is killed (even with SIGKILL), a watchdog process it
       started first (in its own process group, so Ctrl-C does not reach it)
       sees ddprun's end and does the same for every rank: SIGTERM to each
       rank's group, SIGKILL after --grace, and the /dev/shm names. What a
       rank started in another process group or session (setsid, a daemon)
       is beyond ddprun's reach.

   FILE DESCRIPTORS
       Ranks inherit only 0, 1 and 2. Every descriptor ddprun opens is
       close-on-exec, and so are those ddprun inherited above 2 (as with
       Python's subprocess, which torchrun uses).

   BUILD
       cc -std=c99 -D_GNU_SOURCE -O2 tools/ddprun.c -o ddprun
*/

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <dirent.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#ifdef __linux__
#include <sys/prctl.h>
#include <sys/syscall.h>
#endif
#include <sys/stat.h>

#define MAX_RANKS      1024
#define LINE_CAP       (1u << 20)  /* longest line kept whole */
#define READ_CHUNK     65536
#define EXIT_USAGE     2
#define EXIT_LAUNCHER  125
#define EXIT_NO_EXEC   127
#define DEATH_SETTLE_S 0.2         /* a signal death beats exit failures this close to it */

static const char usage_line[] =
    "usage: ddprun -n N [--master-addr A] [--master-port P] [--grace S] "
    "[--no-prefix] [--] program [args...]\n";

/* ---------------------------------------------------------------- state */

struct buf {
    char *p;
    size_t len, cap;
};

/* One pipe from a rank's stdout or stderr, and the line it has not finished. */
struct stream {
    int fd;      /* read end, -1 once closed */
    int out;     /* 1 or 2: where its lines go */
    int rank;
    struct buf partial;
};

struct rank {
    pid_t pid;   /* also its process group id */
    int alive;   /* not yet reaped */
    struct stream streams[2];
};

static struct {
    int n;
    const char *master_addr;
    char master_port[16];
    double grace;
    int prefix;
    char **argv;             /* program and its arguments */
} opt;

static struct rank ranks[MAX_RANKS];
static int nstarted;          /* ranks forked */
static int live;              /* ranks forked and not yet reaped */
static int stopping;          /* SIGTERM (or a forwarded signal) was sent */
static int killed;            /* the grace period ended with SIGKILL */
static double deadline;       /* when the grace period ends */
static int fail_code = -1;    /* exit status of the first failure */
static int got_signal;        /* first terminating signal ddprun received */
static int out_dead[3];       /* ddprun's stdout/stderr is gone (EPIPE) */
static struct buf outbuf;     /* prefixed lines waiting for one write() */
static char job_secret[65];   /* DDP_JOB_SECRET for the ranks */
static char job_id[160];      /* DDP_JOB_ID */
static pid_t watchdog = -1;   /* ends the ranks' groups if ddprun dies */
static int watchdog_fd = -1;  /* ddprun's end of the pipe to it */
static struct {               /* a failure by exit status, waiting DEATH_SETTLE_S for a signal death */
    struct rank *rk;
    int status;
    double until;
} pend;

/* ---------------------------------------------------------------- helpers */

static void usage_error(const char *fmt, ...)
{
    va_list ap;
    fputs("ddprun: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    fputs(usage_line, stderr);
    fputs("Try 'ddprun --help' for more information.\n", stderr);
    exit(EXIT_USAGE);
}

static void print_help(void)
{
    fputs(usage_line, stdout);
    fputs("\n"
          "Start N processes of `program args...` on this host, with the torchrun\n"
          "variables set (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,\n"
          "GROUP_RANK=0, MASTER_ADDR, MASTER_PORT, DDP_LAUNCHER=ddprun), and a\n"
          "new job secret and job id for every run (DDP_JOB_SECRET, DDP_JOB_ID).\n"
          "\n"
          "  -n N               number of processes, 1 to 1024 (required)\n"
          "  --master-addr A    MASTER_ADDR (default 127.0.0.1)\n"
          "  --master-port P    MASTER_PORT (default: a free port on 127.0.0.1)\n"
          "  --grace S          seconds from SIGTERM to SIGKILL when stopping\n"
          "                     the ranks (default 5)\n"
          "  --no-prefix        do not prefix output lines with \"[rank] \"\n"
          "  -h, --help         print this help\n"
          "\n"
          "Exit status: 0 if every rank exits 0; else the first failing rank's\n"
          "status (128+signal if it was killed), after the others are stopped;\n"
          "2 bad usage; 125 ddprun itself failed; 127 the program cannot run.\n"
          "SIGINT, SIGTERM, SIGHUP and SIGQUIT are forwarded to every rank.\n"
          "Each rank runs in its own process group, which ends with it; if ddprun\n"
          "is killed, a watchdog ends the ranks' groups.\n",
          stdout);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static int buf_reserve(struct buf *b, size_t extra)
{
    size_t cap = b->cap ? b->cap : 256;
    char *p;
    if (b->len + extra <= b->cap)
        return 0;
    while (cap < b->len + extra)
        cap *= 2;
    p = realloc(b->p, cap);
    if (!p)
        return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

static void kill_all(int sig);

/* Out of memory while relaying output: the ranks cannot be left unsupervised. */
static void buf_add(struct buf *b, const void *data, size_t n)
{
    if (buf_reserve(b, n) != 0) {
        fputs("ddprun: out of memory; killing the ranks\n", stderr);
        kill_all(SIGKILL);
        while (wait(NULL) > 0 || errno == EINTR)
            ;
        exit(EXIT_LAUNCHER);
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

/* Writes all of p to ddprun's stdout (fd 1) or stderr (fd 2). A stdout left
   non-blocking by whoever started us is waited on rather than dropped. */
static void write_all(int fd, const char *p, size_t n)
{
    while (n > 0 && !out_dead[fd]) {
        ssize_t w = write(fd, p, n);
        if (w > 0) {
            p += w;
            n -= (size_t)w;
        } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct pollfd pfd;
            pfd.fd = fd;
            pfd.events = POLLOUT;
            poll(&pfd, 1, 100);
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else {
            out_dead[fd] = 1;
        }
    }
}

/* ---------------------------------------------------------------- output */

/* Appends "[r] " + line (+ '\n' if it lacks one) to outbuf. */
static void emit_line(int rank, const char *line, size_t n)
{
    char prefix[16];
    int plen = snprintf(prefix, sizeof prefix, "[%d] ", rank);
    buf_add(&outbuf, prefix, (size_t)plen);
    buf_add(&outbuf, line, n);
    if (n == 0 || line[n - 1] != '\n')
        buf_add(&outbuf, "\n", 1);
}

static void flush_outbuf(int fd)
{
    write_all(fd, outbuf.p, outbuf.len);
    outbuf.len = 0;
}

/* Splits data into lines; complete ones go out (in one write per call, so a
   burst of lines costs one syscall), the unfinished tail waits in s->partial. */
static void feed(struct stream *s, const char *data, size_t n)
{
    while (n > 0) {
        const char *nl = memchr(data, '\n', n);
        size_t take = nl ? (size_t)(nl - data) + 1 : n;
        size_t room = LINE_CAP - s->partial.len;
        if (take > room) {
            /* too long to hold: print what fits as its own line */
            buf_add(&s->partial, data, room);
            emit_line(s->rank, s->partial.p, s->partial.len);
            s->partial.len = 0;
            data += room;
            n -= room;
            continue;
        }
        if (!nl) {
            buf_add(&s->partial, data, n);
            break;
        }
        if (s->partial.len > 0) {
            buf_add(&s->partial, data, take);
            emit_line(s->rank, s->partial.p, s->partial.len);
            s->partial.len = 0;
        } else {
            emit_line(s->rank, data, take);
        }
        data += take;
        n -= take;
    }
    flush_outbuf(s->out);
}

static void close_stream(struct stream *s)
{
    if (s->partial.len > 0) {
        emit_line(s->rank, s->partial.p, s->partial.len);
        s->partial.len = 0;
        flush_outbuf(s->out);
    }
    if (s->fd >= 0)
        close(s->fd);
    s->fd = -1;
}

/* One read; 0 when the pipe is empty for now (or closed), 1 if data came. */
static int pump(struct stream *s)
{
    static char chunk[READ_CHUNK];
    ssize_t r;
    if (s->fd < 0)
        return 0;
    do
        r = read(s->fd, chunk, sizeof chunk);
    while (r < 0 && errno == EINTR);
    if (r > 0) {
        feed(s, chunk, (size_t)r);
        return 1;
    }
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        return 0;
    close_stream(s); /* EOF, or an error we cannot recover from */
    return 0;
}

/* Reads everything a rank left in its pipes. They are non-blocking, so a
   grandchild still holding a pipe open cannot make this wait. */
static void drain_rank(struct rank *rk)
{
    int i;
    for (i = 0; i < 2; i++)
        while (pump(&rk->streams[i]))
            ;
}

/* ---------------------------------------------------------------- signals */

static const int handled[] = {SIGCHLD, SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGTSTP, SIGCONT};
#define NHANDLED ((int)(sizeof handled / sizeof handled[0]))

static volatile sig_atomic_t pending[NHANDLED];
static int wake[2] = {-1, -1}; /* self-pipe: a handler's byte wakes poll() */

static void on_signal(int sig)
{
    int saved = errno, i;
    ssize_t w;
    for (i = 0; i < NHANDLED; i++)
        if (handled[i] == sig)
            pending[i] = 1;
    w = write(wake[1], "", 1); /* pipe full: poll wakes anyway */
    (void)w;
    errno = saved;
}

static int take_pending(int sig)
{
    int i;
    for (i = 0; i < NHANDLED; i++) {
        if (handled[i] == sig && pending[i]) {
            pending[i] = 0;
            return 1;
        }
    }
    return 0;
}

/* A signal ignored when ddprun starts (nohup's SIGHUP, SIGINT for a job a
   script put in the background) stays ignored, for ddprun and its ranks. */
static int inherited_ignore[NHANDLED];

static int may_ignore(int sig)
{
    return sig != SIGCHLD && sig != SIGCONT;
}

static void install_handlers(void)
{
    struct sigaction sa, old;
    int i;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    for (i = 0; i < NHANDLED; i++) {
        if (may_ignore(handled[i]) && sigaction(handled[i], NULL, &old) == 0 &&
            old.sa_handler == SIG_IGN) {
            inherited_ignore[i] = 1;
            continue;
        }
        sa.sa_flags = SA_RESTART | (handled[i] == SIGCHLD ? SA_NOCLDSTOP : 0);
        sigaction(handled[i], &sa, NULL);
    }
    /* A closed stdout must not kill the launcher while ranks are running. */
    signal(SIGPIPE, SIG_IGN);
}

/* Signals a rank's whole process group; the plain pid covers the instant
   before the group exists. */
static void signal_rank(const struct rank *rk, int sig)
{
    if (kill(-rk->pid, sig) != 0 && errno == ESRCH)
        kill(rk->pid, sig);
}

static void kill_all(int sig)
{
    int i;
    for (i = 0; i < nstarted; i++)
        if (ranks[i].alive)
            signal_rank(&ranks[i], sig);
}

static void start_grace(void)
{
    if (!stopping) {
        stopping = 1;
        deadline = now_s() + opt.grace;
    }
}

/* SIGCONT after SIGTERM: a stopped rank would otherwise hold the signal
   pending until the SIGKILL. */
static void stop_all(void)
{
    start_grace();
    kill_all(SIGTERM);
    kill_all(SIGCONT);
}

static const char *signal_name(int sig)
{
    switch (sig) {
    case SIGINT: return "SIGINT";
    case SIGTERM: return "SIGTERM";
    case SIGHUP: return "SIGHUP";
    case SIGQUIT: return "SIGQUIT";
    default: return "a signal";
    }
}

static void handle_signals(void)
{
    static const int terminating[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT};
    int i;
    for (i = 0; i < 4; i++) {
        int sig = terminating[i];
        if (!take_pending(sig))
            continue;
        if (!got_signal)
            got_signal = sig;
        if (live > 0)
            fprintf(stderr, "ddprun: got %s; forwarding it to the ranks\n",
                    signal_name(sig));
        start_grace();
        kill_all(sig);
    }
    if (take_pending(SIGTSTP)) {
        kill_all(SIGTSTP);
        raise(SIGSTOP); /* SIGCONT resumes us here, and is forwarded below */
    }
    if (take_pending(SIGCONT))
        kill_all(SIGCONT);
}

/* ---------------------------------------------------------------- children */

static void on_failure(struct rank *rk, int status)
{
    char what[96];
    if (fail_code >= 0)
        return; /* the first failure wins */
    if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        fail_code = 128 + sig;
        snprintf(what, sizeof what, "killed by signal %d (%s)", sig, strsignal(sig));
    } else {
        fail_code = WEXITSTATUS(status);
        snprintf(what, sizeof what, "exited with code %d", fail_code);
    }
    fprintf(stderr, "ddprun: rank %d (pid %ld) %s%s\n", (int)(rk - ranks),
            (long)rk->pid, what,
            live > 0 && !stopping ? "; stopping the others" : "");
    if (!stopping)
        stop_all();
}

/* The verdict waiting in pend is final. */
static void settle(void)
{
    if (pend.rk) {
        struct rank *rk = pend.rk;
        pend.rk = NULL;
        on_failure(rk, pend.status);
    }
}

/* A rank failed: a death by signal is the verdict at once (nothing beats
   it); an exit status waits DEATH_SETTLE_S, in case the rank only exited
   because another was killed and the kernel reported them out of order. */
static void candidate(struct rank *rk, int status)
{
    if (fail_code >= 0)
        return;
    if (stopping) { /* we are stopping them: no race to judge */
        on_failure(rk, status);
        return;
    }
    if (WIFSIGNALED(status)) {
        pend.rk = NULL;
        on_failure(rk, status);
        return;
    }
    if (!pend.rk) {
        pend.rk = rk;
        pend.status = status;
        pend.until = now_s() + DEATH_SETTLE_S;
    }
}

/* Names ddp.h may have given shared memory in /dev/shm: "ddp-<pid>-...".
   A rank killed at the wrong instant leaves them; once it is reaped they
   serve nobody (whoever mapped them keeps the memory). */
static void sweep_shm(pid_t pid)
{
#ifdef __linux__
    DIR *d = opendir("/dev/shm");
    struct dirent *e;
    char prefix[32], path[300];
    size_t n;
    if (!d)
        return;
    n = (size_t)snprintf(prefix, sizeof prefix, "ddp-%ld-", (long)pid);
    while ((e = readdir(d)) != NULL) {
        struct stat sb;
        if (strncmp(e->d_name, prefix, n) != 0)
            continue;
        snprintf(path, sizeof path, "/dev/shm/%s", e->d_name);
        if (lstat(path, &sb) == 0 && S_ISREG(sb.st_mode) && sb.st_uid == geteuid())
            unlink(path);
    }
    closedir(d);
#else
    (void)pid;
#endif
}

static void reap(void)
{
    for (;;) {
        int status, i;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid <= 0)
            return;
        for (i = 0; i < nstarted; i++) {
            struct rank *rk = &ranks[i];
            if (rk->pid != pid || !rk->alive)
                continue;
            rk->alive = 0;
            live--;
            drain_rank(rk); /* its last words come before our verdict */
            sweep_shm(pid);
            if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
                candidate(rk, status);
            break;
        }
    }
}

/* Every rank is reaped; what is left of their process groups (children
   they left behind) is ended too: SIGTERM, SIGKILL after --grace. */
static void end_groups(void)
{
    double until = now_s() + opt.grace;
    int i, left, sent = 0;
    for (;;) {
        left = 0;
        for (i = 0; i < nstarted; i++)
            if (ranks[i].pid > 0 && kill(-ranks[i].pid, 0) == 0)
                left++;
        if (left == 0)
            return;
        if (!sent) {
            for (i = 0; i < nstarted; i++)
                if (ranks[i].pid > 0 && kill(-ranks[i].pid, 0) == 0) {
                    kill(-ranks[i].pid, SIGTERM);
                    kill(-ranks[i].pid, SIGCONT);
                }
            sent = 1;
        }
        if (now_s() >= until) {
            for (i = 0; i < nstarted; i++)
                if (ranks[i].pid > 0)
                    kill(-ranks[i].pid, SIGKILL);
            return;
        }
        while (waitpid(-1, NULL, WNOHANG) > 0) /* children of ours among them */
            ;
        poll(NULL, 0, 20);
    }
}

/* ---------------------------------------------------------------- secret */

/* n random bytes from the kernel (getrandom, else /dev/urandom). */
static int random_bytes(unsigned char *p, size_t n)
{
    int fd;
#if defined(__linux__) && defined(SYS_getrandom)
    while (n > 0) {
        long r = syscall(SYS_getrandom, p, n, 0);
        if (r > 0) { p += r; n -= (size_t)r; continue; }
        if (r < 0 && errno == EINTR) continue;
        break;
    }
    if (n == 0)
        return 0;
#endif
    fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    while (n > 0) {
        ssize_t r = read(fd, p, n);
        if (r > 0) { p += r; n -= (size_t)r; continue; }
        if (r < 0 && errno == EINTR) continue;
        close(fd);
        return -1;
    }
    close(fd);
    return 0;
}

static void hex(const unsigned char *p, size_t n, char *out)
{
    static const char d[] = "0123456789abcdef";
    size_t i;
    for (i = 0; i < n; i++) {
        out[2 * i] = d[p[i] >> 4];
        out[2 * i + 1] = d[p[i] & 15];
    }
    out[2 * n] = 0;
}

/* The job's secret and name, new for every run. */
static int make_job_identity(void)
{
    unsigned char r[36];
    char h[16], tag[9];
    if (random_bytes(r, sizeof r) != 0)
        return -1;
    hex(r, 32, job_secret);
    hex(r + 32, 4, tag);
    if (gethostname(h, sizeof h) != 0)
        strcpy(h, "host");
    h[sizeof h - 1] = 0;
    snprintf(job_id, sizeof job_id, "ddprun-%s-%ld-%s", h, (long)getpid(), tag);
    memset(r, 0, sizeof r);
    return 0;
}

/* ---------------------------------------------------------------- watchdog */

/* Runs in the watchdog: reads "<pid>\n" lines (the ranks, as they start)
   until ddprun closes the pipe. "done" first means ddprun ended normally;
   anything else means it died, and the ranks' groups are ended here. */
static void watchdog_main(int fd)
{
    static pid_t pids[MAX_RANKS];
    int n = 0, done = 0, i, left;
    char buf[4096], line[64];
    size_t ll = 0;
    double until;
    for (;;) {
        ssize_t r = read(fd, buf, sizeof buf), k;
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        for (k = 0; k < r; k++) {
            if (buf[k] != '\n') {
                if (ll + 1 < sizeof line)
                    line[ll++] = buf[k];
                continue;
            }
            line[ll] = 0;
            ll = 0;
            if (!strcmp(line, "done"))
                done = 1;
            else if (n < MAX_RANKS && atol(line) > 0)
                pids[n++] = (pid_t)atol(line);
        }
    }
    if (done)
        _exit(0);
    for (i = 0; i < n; i++) {
        kill(-pids[i], SIGTERM);
        kill(-pids[i], SIGCONT);
    }
    until = now_s() + opt.grace;
    do {
        poll(NULL, 0, 20);
        for (left = 0, i = 0; i < n; i++)
            if (kill(-pids[i], 0) == 0)
                left++;
    } while (left > 0 && now_s() < until);
    for (i = 0; i < n; i++)
        kill(-pids[i], SIGKILL);
    poll(NULL, 0, 50);
    for (i = 0; i < n; i++)
        sweep_shm(pids[i]);
    _exit(0);
}

/* Started before the ranks. Its own process group: a Ctrl-C meant for
   ddprun and the ranks does not end it before it is needed. */
static void start_watchdog(void)
{
    int p[2], i;
    sigset_t none;
    if (pipe2(p, O_CLOEXEC) != 0)
        return; /* the ranks still get PR_SET_PDEATHSIG */
    watchdog = fork();
    if (watchdog == 0) {
        struct sigaction sa;
        close(p[1]);
        setpgid(0, 0);
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = SIG_DFL;
        sigemptyset(&sa.sa_mask);
        for (i = 0; i < NHANDLED; i++)
            sigaction(handled[i], &sa, NULL);
        sa.sa_handler = SIG_IGN; /* a hang-up of the terminal is not ddprun's death */
        sigaction(SIGHUP, &sa, NULL);
        sigaction(SIGINT, &sa, NULL);
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        i = open("/dev/null", O_RDWR); /* it prints nothing, and must not hold the caller's pipes */
        if (i >= 0) {
            dup2(i, 0);
            dup2(i, 1);
            dup2(i, 2);
            if (i > 2)
                close(i);
        }
        watchdog_main(p[0]);
    }
    close(p[0]);
    if (watchdog < 0) {
        close(p[1]);
        return;
    }
    setpgid(watchdog, watchdog);
    watchdog_fd = p[1];
}

static void watchdog_add(pid_t pid)
{
    char line[32];
    int n = snprintf(line, sizeof line, "%ld\n", (long)pid);
    if (watchdog_fd >= 0 && write(watchdog_fd, line, (size_t)n) != n) {
        close(watchdog_fd);
        watchdog_fd = -1;
    }
}

/* ddprun ends normally: the watchdog goes quietly. */
static void watchdog_done(void)
{
    if (watchdog_fd >= 0) {
        if (write(watchdog_fd, "done\n", 5) != 5) {
            /* it is gone already */
        }
        close(watchdog_fd);
        watchdog_fd = -1;
    }
    if (watchdog > 0)
        waitpid(watchdog, NULL, 0);
}

static void setenv_int(const char *name, long v)
{
    char s[24];
    snprintf(s, sizeof s, "%ld", v);
    setenv(name, s, 1);
}

/* Runs in the forked child; never returns. ddprun is single-threaded, so
   setenv/fprintf are safe here. */
static void exec_rank(int r, const int out_w[2], int devnull,
                      const sigset_t *orig_mask, const struct rlimit *orig_nofile,
                      pid_t launcher)
{
    struct sigaction sa;
    int i;

    setpgid(0, 0);
#ifdef __linux__
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != launcher) /* ddprun died before prctl took effect */
        _exit(EXIT_LAUNCHER);
#else
    (void)launcher;
#endif
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    sigemptyset(&sa.sa_mask);
    for (i = 0; i < NHANDLED; i++)
        if (!inherited_ignore[i])
            sigaction(handled[i], &sa, NULL);
    sigaction(SIGPIPE, &sa, NULL); /* an ignored signal would survive exec */

    /* dup2 clears close-on-exec on the copies; the originals close at exec.
       fds 0-2 are known to be open, so out_w[] are >= 3 and never equal. */
    if (out_w[0] >= 0 && (dup2(out_w[0], 1) < 0 || dup2(out_w[1], 2) < 0))
        _exit(EXIT_LAUNCHER);
    if (devnull >= 0 && dup2(devnull, 0) < 0)
        _exit(EXIT_LAUNCHER);
    setrlimit(RLIMIT_NOFILE, orig_nofile);

    setenv_int("RANK", r);
    setenv_int("WORLD_SIZE", opt.n);
    setenv_int("LOCAL_RANK", r);
    setenv_int("LOCAL_WORLD_SIZE", opt.n);
    setenv("GROUP_RANK", "0", 1);
    setenv("MASTER_ADDR", opt.master_addr, 1);
    setenv("MASTER_PORT", opt.master_port, 1);
    setenv("DDP_LAUNCHER", "ddprun", 1);
    setenv("DDP_JOB_SECRET", job_secret, 1);
    setenv("DDP_JOB_ID", job_id, 1);
    unsetenv("TORCHELASTIC_USE_AGENT_STORE");

    sigprocmask(SIG_SETMASK, orig_mask, NULL);
    execvp(opt.argv[0], opt.argv);
    fprintf(stderr, "ddprun: cannot run '%s': %s\n", opt.argv[0], strerror(errno));
    _exit(EXIT_NO_EXEC);
}

static int open_pipe(int p[2])
{
    if (pipe2(p, O_CLOEXEC) != 0)
        return -1;
    fcntl(p[0], F_SETFL, fcntl(p[0], F_GETFL) | O_NONBLOCK);
    return 0;
}

/* Forks the ranks. On a failure part way, the started ranks are stopped
   like after a rank failure, and the main loop collects them. */
static void spawn_all(const struct rlimit *orig_nofile)
{
    sigset_t block, orig_mask;
    int devnull = -1, r, i;
    pid_t self = getpid();

    if (isatty(0))
        devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);

    /* Blocked across fork so a signal cannot run our handler in a child
       before exec; the child unblocks once its handlers are reset. */
    sigemptyset(&block);
    for (i = 0; i < NHANDLED; i++)
        sigaddset(&block, handled[i]);
    sigprocmask(SIG_BLOCK, &block, &orig_mask);

    for (r = 0; r < opt.n; r++) {
        struct rank *rk = &ranks[r];
        int out[2] = {-1, -1}, err[2] = {-1, -1}, w[2] = {-1, -1};
        pid_t pid;

        if (opt.prefix && (open_pipe(out) != 0 || open_pipe(err) != 0)) {
            fprintf(stderr, "ddprun: cannot create a pipe for rank %d: %s\n",
                    r, strerror(errno));
            if (out[0] >= 0) {
                close(out[0]);
                close(out[1]);
            }
            fail_code = EXIT_LAUNCHER;
            break;
        }
        w[0] = out[1];
        w[1] = err[1];
        pid = fork();
        if (pid == 0)
            exec_rank(r, w, devnull, &orig_mask, orig_nofile, self);
        if (pid < 0) {
            fprintf(stderr, "ddprun: cannot start rank %d: %s\n", r, strerror(errno));
            fail_code = EXIT_LAUNCHER;
        } else {
            setpgid(pid, pid); /* also here, so the group exists before any kill */
            watchdog_add(pid);
            rk->pid = pid;
            rk->alive = 1;
            nstarted++;
            live++;
        }
        for (i = 0; i < 2; i++) {
            struct stream *s = &rk->streams[i];
            s->rank = r;
            s->out = i + 1;
            s->fd = pid > 0 ? (i == 0 ? out[0] : err[0]) : -1;
            if (pid < 0 && opt.prefix)
                close(i == 0 ? out[0] : err[0]);
        }
        if (opt.prefix) {
            close(out[1]);
            close(err[1]);
        }
        if (pid < 0)
            break;
    }
    if (devnull >= 0)
        close(devnull);
    sigprocmask(SIG_SETMASK, &orig_mask, NULL);
    if (fail_code >= 0 && live > 0) {
        fputs("ddprun: stopping the ranks already started\n", stderr);
        stop_all();
    }
}

/* ---------------------------------------------------------------- main loop */

static void supervise(void)
{
    static struct pollfd pfd[2 * MAX_RANKS + 1];
    static struct stream *who[2 * MAX_RANKS + 1];
    char sink[64];
    int i, j;

    for (;;) {
        int np = 0, timeout = -1;

        handle_signals();
        take_pending(SIGCHLD); /* reap() runs every turn: waitpid is cheap */
        reap();
        if (pend.rk && (live == 0 || now_s() >= pend.until))
            settle();
        if (live == 0)
            break;
        if (pend.rk) {
            double left = pend.until - now_s();
            timeout = (int)(left * 1000.0) + 1;
        }
        if (stopping && !killed) {
            double left = deadline - now_s();
            if (left <= 0) {
                for (i = 0; i < nstarted; i++) {
                    if (!ranks[i].alive)
                        continue;
                    fprintf(stderr, "ddprun: rank %d (pid %ld) still running %g s "
                            "after being told to stop; sending SIGKILL\n",
                            i, (long)ranks[i].pid, opt.grace);
                    signal_rank(&ranks[i], SIGKILL);
                }
                killed = 1;
            } else if (timeout < 0 || (int)(left * 1000.0) + 1 < timeout) {
                timeout = (int)(left * 1000.0) + 1;
            }
        }

        pfd[np].fd = wake[0];
        pfd[np].events = POLLIN;
        who[np++] = NULL;
        for (i = 0; i < nstarted; i++) {
            for (j = 0; j < 2; j++) {
                struct stream *s = &ranks[i].streams[j];
                if (s->fd < 0)
                    continue;
                pfd[np].fd = s->fd;
                pfd[np].events = POLLIN;
                who[np++] = s;
            }
        }
        if (poll(pfd, (nfds_t)np, timeout) < 0)
            continue; /* EINTR: the wake pipe has the news too */
        if (pfd[0].revents)
            while (read(wake[0], sink, sizeof sink) > 0)
                ;
        for (i = 1; i < np; i++)
            if (pfd[i].revents)
                pump(who[i]);
    }
    /* Everyone is reaped: print what is left and forget pipes that a
       grandchild may still hold open. */
    for (i = 0; i < nstarted; i++) {
        drain_rank(&ranks[i]);
        for (j = 0; j < 2; j++)
            close_stream(&ranks[i].streams[j]);
    }
}

/* ---------------------------------------------------------------- setup */

/* The option at argv[*i] if it is `name`: "--name v", "--name=v", or for a
   one-letter name "-nV" too. Advances *i past it. */
static const char *option_value(int argc, char **argv, int *i, const char *name)
{
    const char *a = argv[*i];
    size_t len = strlen(name);
    int is_long = name[1] == '-';
    if (strncmp(a, name, len) != 0)
        return NULL;
    if (a[len] == '\0') {
        if (*i + 1 >= argc)
            usage_error("option %s needs a value", name);
        *i += 2;
        return argv[*i - 1];
    }
    if (is_long && a[len] != '=')
        return NULL;
    *i += 1;
    return is_long ? a + len + 1 : a + len;
}

static int parse_long(const char *s, long lo, long hi, long *out)
{
    char *end;
    long v;
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

static void parse_args(int argc, char **argv)
{
    int i = 1, have_n = 0;
    long v;
    const char *val;
    char *end;

    opt.master_addr = "127.0.0.1";
    opt.grace = 5.0;
    opt.prefix = 1;
    while (i < argc) {
        const char *a = argv[i];
        if (strcmp(a, "--") == 0) {
            i++;
            break;
        }
        if (a[0] != '-' || a[1] == '\0')
            break; /* the program: everything from here is its command line */
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            print_help();
            exit(0);
        }
        if (strcmp(a, "--no-prefix") == 0) {
            opt.prefix = 0;
            i++;
        } else if ((val = option_value(argc, argv, &i, "-n"))) {
            if (parse_long(val, 1, MAX_RANKS, &v) != 0)
                usage_error("-n: '%s' is not a whole number from 1 to %d", val, MAX_RANKS);
            opt.n = (int)v;
            have_n = 1;
        } else if ((val = option_value(argc, argv, &i, "--master-addr"))) {
            if (*val == '\0')
                usage_error("--master-addr: empty address");
            opt.master_addr = val;
        } else if ((val = option_value(argc, argv, &i, "--master-port"))) {
            if (parse_long(val, 1, 65535, &v) != 0)
                usage_error("--master-port: '%s' is not a port number from 1 to 65535", val);
            snprintf(opt.master_port, sizeof opt.master_port, "%ld", v);
        } else if ((val = option_value(argc, argv, &i, "--grace"))) {
            opt.grace = strtod(val, &end);
            if (end == val || *end != '\0' || !(opt.grace >= 0 && opt.grace <= 1e6))
                usage_error("--grace: '%s' is not a number of seconds from 0 to 1e6", val);
        } else {
            usage_error("unknown option '%s'", a);
        }
    }
    if (!have_n)
        usage_error("missing -n N (the number of processes to start)");
    if (i >= argc)
        usage_error("no program given");
    opt.argv = argv + i;
}

/* Asks the kernel for a free port; it may be taken again before rank 0
   binds it, the same race torchrun's standalone mode accepts. */
static int find_free_port(char *out, size_t n)
{
    struct sockaddr_in a;
    socklen_t alen = sizeof a;
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), rc = -1;
    if (s < 0)
        return -1;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = 0;
    if (bind(s, (struct sockaddr *)&a, sizeof a) == 0 &&
        getsockname(s, (struct sockaddr *)&a, &alen) == 0) {
        snprintf(out, n, "%u", (unsigned)ntohs(a.sin_port));
        rc = 0;
    }
    close(s);
    return rc;
}

/* With 0-2 closed, pipe() would hand out those numbers and a child's dup2
   onto them would go wrong; park /dev/null there instead. */
static void ensure_std_fds(void)
{
    int fd;
    for (fd = 0; fd < 3; fd++)
        if (fcntl(fd, F_GETFD) < 0 && errno == EBADF)
            if (open("/dev/null", O_RDWR) < 0)
                exit(EXIT_LAUNCHER);
}

static void set_cloexec(int fd)
{
    int flags = fcntl(fd, F_GETFD);
    if (flags >= 0 && !(flags & FD_CLOEXEC))
        fcntl(fd, F_SETFD, flags | FD_CLOEXEC);
}

/* Descriptors ddprun inherited above 2 must not reach the ranks. */
static void cloexec_inherited(void)
{
    DIR *d = opendir("/proc/self/fd");
    long fd, max;
    if (d) {
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            fd = strtol(e->d_name, NULL, 10);
            if (fd > 2 && fd != dirfd(d))
                set_cloexec((int)fd);
        }
        closedir(d);
        return;
    }
    max = sysconf(_SC_OPEN_MAX);
    if (max < 0 || max > 65536)
        max = 65536;
    for (fd = 3; fd < max; fd++)
        set_cloexec((int)fd);
}

/* Two pipe ends per rank stay open in ddprun; 1024 ranks need more than
   the common soft limit of 1024. The ranks get the original limit back. */
static void raise_fd_limit(struct rlimit *orig)
{
    struct rlimit rl;
    rlim_t need = (rlim_t)(opt.prefix ? 2 * opt.n : 0) + 32;
    if (getrlimit(RLIMIT_NOFILE, orig) != 0) {
        orig->rlim_cur = orig->rlim_max = RLIM_INFINITY;
        return;
    }
    if (orig->rlim_cur == RLIM_INFINITY || orig->rlim_cur >= need)
        return;
    rl = *orig;
    rl.rlim_cur = need;
    if (orig->rlim_max != RLIM_INFINITY && orig->rlim_max < need) {
        fprintf(stderr, "ddprun: %d ranks need %lu open files, the hard limit is %lu\n",
                opt.n, (unsigned long)need, (unsigned long)orig->rlim_max);
        exit(EXIT_LAUNCHER);
    }
    setrlimit(RLIMIT_NOFILE, &rl);
}

int main(int argc, char **argv)
{
    struct rlimit orig_nofile;
    int i;

    parse_args(argc, argv);
    ensure_std_fds();
    cloexec_inherited();
    if (opt.master_port[0] == '\0' &&
        find_free_port(opt.master_port, sizeof opt.master_port) != 0) {
        fprintf(stderr, "ddprun: cannot find a free port on 127.0.0.1: %s "
                "(use --master-port)\n", strerror(errno));
        return EXIT_LAUNCHER;
    }
    raise_fd_limit(&orig_nofile);
    if (pipe2(wake, O_CLOEXEC | O_NONBLOCK) != 0) {
        fprintf(stderr, "ddprun: cannot create a pipe: %s\n", strerror(errno));
        return EXIT_LAUNCHER;
    }
    if (make_job_identity() != 0) {
        fprintf(stderr, "ddprun: cannot read random bytes for the job secret: %s\n", strerror(errno));
        return EXIT_LAUNCHER;
    }
    install_handlers();
    start_watchdog();
    spawn_all(&orig_nofile);
    supervise();
    end_groups();
    watchdog_done();
    memset(job_secret, 0, sizeof job_secret);
    close(wake[0]);
    close(wake[1]);
    free(outbuf.p);
    for (i = 0; i < nstarted; i++) {
        free(ranks[i].streams[0].partial.p);
        free(ranks[i].streams[1].partial.p);
    }
    if (fail_code >= 0)
        return fail_code;
    return got_signal ? 128 + got_signal : 0;
}
