/* ddprun (Windows) — the local launcher for ddp.h programs (one host, N
   processes): ddprun.exe. The same command line, output and exit status as
   tools/ddprun.c (read its top comment); what Windows does differently is
   said here.

   USAGE
       ddprun -n N [--master-addr A] [--master-port P] [--grace S]
              [--no-prefix] [--] program [args...]

       Options as in tools/ddprun.c. The program is found as CreateProcess
       finds it (ddprun's directory, the current directory, the system
       directories, then PATH; ".exe" is added when the name has no
       extension). Arguments reach the ranks quoted so that the C runtime
       (CommandLineToArgvW rules) gives them back unchanged.

   ENVIRONMENT OF EACH RANK (r = 0..N-1), overwriting inherited values
       RANK=r  WORLD_SIZE=N  LOCAL_RANK=r  LOCAL_WORLD_SIZE=N  GROUP_RANK=0
       MASTER_ADDR  MASTER_PORT  DDP_LAUNCHER=ddprun; TORCHELASTIC_USE_AGENT_STORE
       removed. Each rank gets its own environment block (names compared
       without regard to case, as Windows does).

   OUTPUT
       As on POSIX: "[r] line", stdout lines on stdout, stderr lines on
       stderr, whole lines, a missing final newline added, lines over 1 MiB
       cut into 1 MiB pieces. One reader thread per pipe. When a rank exits,
       ddprun waits up to one second for what it left in its pipes before
       reporting it (a process the rank started may keep a pipe open).

   EXIT STATUS
       0      every rank exited with status 0
       c      the first rank to fail exited with code c (as a 32-bit Windows
              exit code; an NTSTATUS crash code such as 0xC0000005 is
              returned as it is). A rank that exits with STATUS_CONTROL_C_EXIT
              (0xC000013A, what a console program's default Ctrl-C or
              Ctrl-Break handler exits with) counts as 130, as a shell
              reports SIGINT. That rank is named on stderr and the others are
              stopped (see STOPPING).
       130    ddprun got Ctrl-C or Ctrl-Break and every rank still exited 0
       2      bad usage (message and usage line on stderr)
       125    ddprun itself failed (pipe, job object, no free port)
       127    the program could not be started; "ddprun: cannot run 'prog':
              <reason>" is printed (prefixed like a rank's output)

   STOPPING
       Each rank runs in a job object of its own, with
       JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE: whatever ends ddprun (even
       TerminateProcess) ends every rank and every process a rank started,
       and terminating a rank's job takes those processes with it (what a
       process group is to the POSIX ddprun). Each rank is also its own
       console process group (CREATE_NEW_PROCESS_GROUP, which also keeps
       the console's Ctrl-C from reaching it directly). To stop the ranks
       ddprun sends each group CTRL_BREAK_EVENT (SIGTERM's part) and, --grace
       seconds later, terminates the jobs still running (SIGKILL's part).
       Without a console to deliver CTRL_BREAK_EVENT through, the jobs are
       terminated at once.

   CONSOLE EVENTS (SetConsoleCtrlHandler)
       Ctrl-C reaches ddprun alone; it forwards CTRL_BREAK_EVENT once to every
       rank's group and starts the grace period. Ctrl-Break reaches every
       process of the console, the ranks included: ddprun only starts the
       grace period. Closing the console, log-off and shutdown end ddprun
       (the system does), and its job objects end the ranks.

   HANDLES
       Ranks inherit only their standard handles: the pipe ends are the only
       inheritable handles at each CreateProcess, and the handle list of
       PROC_THREAD_ATTRIBUTE_HANDLE_LIST says so where Windows supports it.
       When ddprun's stdin is a console, the ranks get NUL as stdin.

   BUILD
       cl /O2 tools\ddprun_win.c ws2_32.lib            (MSVC)
       x86_64-w64-mingw32-gcc -O2 -municode tools/ddprun_win.c -o ddprun.exe -lws2_32
*/
#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#ifndef _CRT_SECURE_NO_WARNINGS
#define _CRT_SECURE_NO_WARNINGS
#endif
#include <winsock2.h>
#include <ws2tcpip.h>
#include <windows.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <wchar.h>

#if defined(_MSC_VER)
#pragma comment(lib, "ws2_32.lib")
#endif

#define MAX_RANKS     1024
#define LINE_CAP      (1u << 20) /* longest line kept whole */
#define READ_CHUNK    65536
#define EXIT_USAGE    2
#define EXIT_LAUNCHER 125
#define EXIT_NO_EXEC  127
#define STATUS_CTRL_C_EXIT 0xC000013Aul

static const char usage_line[] =
    "usage: ddprun -n N [--master-addr A] [--master-port P] [--grace S] "
    "[--no-prefix] [--] program [args...]\n";

/* ---------------------------------------------------------------- state */

struct buf {
    char *p;
    size_t len, cap;
};

/* One pipe from a rank's stdout or stderr, read by its own thread. */
struct stream {
    HANDLE rd;     /* read end; NULL when unused */
    HANDLE thread; /* the reader */
    int out;       /* 1 or 2: where its lines go */
    int rank;
    struct buf partial; /* the line not finished yet */
    struct buf lines;   /* prefixed lines waiting for one write */
};

struct rank {
    HANDLE proc, job;
    DWORD pid;
    int alive;
    struct stream streams[2];
};

static struct {
    int n;
    const wchar_t *master_addr;
    wchar_t master_port[16];
    double grace;
    int prefix;
    wchar_t **argv; /* program and its arguments */
    int argc;
} opt;

static struct rank ranks[MAX_RANKS];
static int nstarted, live;
static int stopping, killed;
static double deadline;
static long long fail_code = -1; /* exit status of the first failure */
static int got_event;            /* 130 once Ctrl-C or Ctrl-Break came */
static HANDLE wake;              /* set by the console handler */
static volatile LONG pending_c, pending_break;
static CRITICAL_SECTION out_lock;
static HANDLE std_out[3];
static int out_dead[3];

/* ---------------------------------------------------------------- helpers */

static double now_s(void)
{
    LARGE_INTEGER f, c;
    QueryPerformanceFrequency(&f);
    QueryPerformanceCounter(&c);
    return (double)(c.QuadPart / f.QuadPart) + (double)(c.QuadPart % f.QuadPart) / (double)f.QuadPart;
}

/* Writes all of p to ddprun's stdout (1) or stderr (2); a dead handle drops it. */
static void write_all(int fd, const char *p, size_t n)
{
    while (n > 0 && !out_dead[fd]) {
        DWORD w = 0, chunk = n > 0x40000000u ? 0x40000000u : (DWORD)n;
        if (!WriteFile(std_out[fd], p, chunk, &w, NULL) || w == 0) {
            out_dead[fd] = 1;
            return;
        }
        p += w;
        n -= w;
    }
}

/* ddprun's own messages, whole, between the ranks' lines. */
static void msg(const char *fmt, ...)
{
    char b[2048];
    int n;
    va_list ap;
    va_start(ap, fmt);
    n = vsnprintf(b, sizeof b, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n >= sizeof b) n = (int)sizeof b - 1;
    EnterCriticalSection(&out_lock);
    write_all(2, b, (size_t)n);
    LeaveCriticalSection(&out_lock);
}

static void usage_error(const char *fmt, ...)
{
    char b[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b, sizeof b, fmt, ap);
    va_end(ap);
    fprintf(stderr, "ddprun: %s\n%sTry 'ddprun --help' for more information.\n", b, usage_line);
    exit(EXIT_USAGE);
}

static void print_help(void)
{
    fputs(usage_line, stdout);
    fputs("\n"
          "Start N processes of `program args...` on this host, with the torchrun\n"
          "variables set (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,\n"
          "GROUP_RANK=0, MASTER_ADDR, MASTER_PORT, DDP_LAUNCHER=ddprun).\n"
          "\n"
          "  -n N               number of processes, 1 to 1024 (required)\n"
          "  --master-addr A    MASTER_ADDR (default 127.0.0.1)\n"
          "  --master-port P    MASTER_PORT (default: a free port on 127.0.0.1)\n"
          "  --grace S          seconds from CTRL_BREAK_EVENT to terminating\n"
          "                     the ranks when stopping them (default 5)\n"
          "  --no-prefix        do not prefix output lines with \"[rank] \"\n"
          "  -h, --help         print this help\n"
          "\n"
          "Exit status: 0 if every rank exits 0; else the first failing rank's\n"
          "exit code, after the others are stopped; 2 bad usage; 125 ddprun\n"
          "itself failed; 127 the program cannot run. Ctrl-C is forwarded to\n"
          "every rank as CTRL_BREAK_EVENT. Every rank runs in a job object\n"
          "that ends with ddprun.\n",
          stdout);
}

/* UTF-8 for messages */
static const char *narrow(const wchar_t *w, char *out, int cap)
{
    if (!WideCharToMultiByte(CP_UTF8, 0, w, -1, out, cap, NULL, NULL)) out[0] = 0;
    return out;
}

static const char *win_error(DWORD e, char *out, size_t cap)
{
    DWORD n = FormatMessageA(FORMAT_MESSAGE_FROM_SYSTEM | FORMAT_MESSAGE_IGNORE_INSERTS | FORMAT_MESSAGE_MAX_WIDTH_MASK,
                             NULL, e, 0, out, (DWORD)cap, NULL);
    while (n > 0 && (out[n - 1] == ' ' || out[n - 1] == '\r' || out[n - 1] == '\n' || out[n - 1] == '.')) n--;
    if (n == 0) snprintf(out, cap, "Windows error %lu", (unsigned long)e);
    else out[n] = 0;
    return out;
}

static void kill_all_now(void);

static int buf_add(struct buf *b, const void *data, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        char *p;
        while (cap < b->len + n) cap *= 2;
        p = (char *)realloc(b->p, cap);
        if (!p) {
            /* the ranks cannot be left unsupervised */
            msg("ddprun: out of memory; killing the ranks\n");
            kill_all_now();
            ExitProcess(EXIT_LAUNCHER);
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
    return 0;
}

/* ---------------------------------------------------------------- output */

/* Appends "[r] " + line (+ '\n' if it lacks one) to s->lines. */
static void emit_line(struct stream *s, const char *line, size_t n)
{
    char prefix[16];
    int plen = snprintf(prefix, sizeof prefix, "[%d] ", s->rank);
    buf_add(&s->lines, prefix, (size_t)plen);
    buf_add(&s->lines, line, n);
    if (n == 0 || line[n - 1] != '\n') buf_add(&s->lines, "\n", 1);
}

static void flush_lines(struct stream *s)
{
    if (s->lines.len == 0) return;
    EnterCriticalSection(&out_lock);
    write_all(s->out, s->lines.p, s->lines.len);
    LeaveCriticalSection(&out_lock);
    s->lines.len = 0;
}

/* Splits data into lines; complete ones go out in one write per read. */
static void feed(struct stream *s, const char *data, size_t n)
{
    while (n > 0) {
        const char *nl = (const char *)memchr(data, '\n', n);
        size_t take = nl ? (size_t)(nl - data) + 1 : n;
        size_t room = LINE_CAP - s->partial.len;
        if (take > room) { /* too long to hold: print what fits as its own line */
            buf_add(&s->partial, data, room);
            emit_line(s, s->partial.p, s->partial.len);
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
            emit_line(s, s->partial.p, s->partial.len);
            s->partial.len = 0;
        } else {
            emit_line(s, data, take);
        }
        data += take;
        n -= take;
    }
    flush_lines(s);
}

static DWORD WINAPI reader_main(void *arg)
{
    struct stream *s = (struct stream *)arg;
    DWORD got;
    char *chunk = (char *)malloc(READ_CHUNK);
    if (!chunk) {
        msg("ddprun: out of memory; killing the ranks\n");
        kill_all_now();
        ExitProcess(EXIT_LAUNCHER);
    }
    while (ReadFile(s->rd, chunk, READ_CHUNK, &got, NULL) && got > 0) feed(s, chunk, got);
    if (s->partial.len > 0) { /* a final line without a newline */
        emit_line(s, s->partial.p, s->partial.len);
        s->partial.len = 0;
        flush_lines(s);
    }
    free(chunk);
    return 0;
}

/* ---------------------------------------------------------------- console events */

static BOOL WINAPI on_console_event(DWORD ev)
{
    switch (ev) {
    case CTRL_C_EVENT:
        InterlockedExchange(&pending_c, 1);
        SetEvent(wake);
        return TRUE;
    case CTRL_BREAK_EVENT:
        InterlockedExchange(&pending_break, 1);
        SetEvent(wake);
        return TRUE;
    default:
        /* close, log-off, shutdown: ddprun ends, and with it (job objects) every rank */
        return FALSE;
    }
}

/* ---------------------------------------------------------------- stopping */

static void terminate_rank(struct rank *rk)
{
    if (rk->job) TerminateJobObject(rk->job, 1);
    else TerminateProcess(rk->proc, 1);
}

static void kill_all_now(void)
{
    int i;
    for (i = 0; i < nstarted; i++)
        if (ranks[i].alive) terminate_rank(&ranks[i]);
}

static void start_grace(void)
{
    if (!stopping) {
        stopping = 1;
        deadline = now_s() + opt.grace;
    }
}

/* CTRL_BREAK_EVENT to every rank still running; a rank it cannot reach
   (no console) is terminated at once. */
static void break_all(void)
{
    int i;
    for (i = 0; i < nstarted; i++) {
        struct rank *rk = &ranks[i];
        if (!rk->alive) continue;
        if (opt.grace <= 0 || !GenerateConsoleCtrlEvent(CTRL_BREAK_EVENT, rk->pid)) terminate_rank(rk);
    }
}

static void stop_all(void)
{
    start_grace();
    break_all();
}

static void handle_events(void)
{
    if (InterlockedExchange(&pending_c, 0)) {
        if (!got_event) got_event = 130;
        if (live > 0) msg("ddprun: got Ctrl-C; forwarding it to the ranks\n");
        start_grace();
        break_all();
    }
    if (InterlockedExchange(&pending_break, 0)) {
        /* the console delivered it to the ranks too */
        if (!got_event) got_event = 130;
        if (live > 0) msg("ddprun: got Ctrl-Break; the ranks got it too\n");
        start_grace();
    }
}

/* ---------------------------------------------------------------- children */

static void on_failure(struct rank *rk, DWORD code)
{
    char what[96];
    if (fail_code >= 0) return; /* the first failure wins */
    if (code == STATUS_CTRL_C_EXIT) {
        fail_code = 130;
        snprintf(what, sizeof what, "ended by Ctrl-C/Ctrl-Break (exit code 0x%08lX)", (unsigned long)code);
    } else if (code >= 0xC0000000ul) {
        fail_code = (long long)code;
        snprintf(what, sizeof what, "exited with code 0x%08lX (an exception)", (unsigned long)code);
    } else {
        fail_code = (long long)code;
        snprintf(what, sizeof what, "exited with code %lu", (unsigned long)code);
    }
    msg("ddprun: rank %d (pid %lu) %s%s\n", (int)(rk - ranks), (unsigned long)rk->pid, what,
        live > 0 && !stopping ? "; stopping the others" : "");
    if (!stopping) stop_all();
}

/* A rank exited: collect its last output (bounded), then judge it. */
static void reap(struct rank *rk)
{
    DWORD code = 1;
    int i;
    GetExitCodeProcess(rk->proc, &code);
    rk->alive = 0;
    live--;
    for (i = 0; i < 2; i++)
        if (rk->streams[i].thread) WaitForSingleObject(rk->streams[i].thread, 1000);
    if (code != 0) on_failure(rk, code);
}

/* "NAME=" at the start of entry e, without regard to case */
static int env_is(const wchar_t *e, const wchar_t *name)
{
    size_t n = wcslen(name);
    return _wcsnicmp(e, name, n) == 0 && e[n] == L'=';
}

static int env_cmp(const void *a, const void *b)
{
    return _wcsicmp(*(const wchar_t *const *)a, *(const wchar_t *const *)b);
}

static const wchar_t *const replaced[] = {
    L"RANK", L"WORLD_SIZE", L"LOCAL_RANK", L"LOCAL_WORLD_SIZE", L"GROUP_RANK", L"MASTER_ADDR",
    L"MASTER_PORT", L"DDP_LAUNCHER", L"TORCHELASTIC_USE_AGENT_STORE", NULL
};

/* The inherited environment without the variables above, then ours,
   sorted, as one block; NULL when out of memory. */
static wchar_t *make_env(int r)
{
    wchar_t ours[8][128], *block = NULL, **list = NULL;
    const wchar_t *base = GetEnvironmentStringsW(), *e;
    size_t count = 0, chars = 0, k, i;
    if (!base) return NULL;
    swprintf(ours[0], 128, L"RANK=%d", r);
    swprintf(ours[1], 128, L"WORLD_SIZE=%d", opt.n);
    swprintf(ours[2], 128, L"LOCAL_RANK=%d", r);
    swprintf(ours[3], 128, L"LOCAL_WORLD_SIZE=%d", opt.n);
    swprintf(ours[4], 128, L"GROUP_RANK=0");
    swprintf(ours[5], 128, L"MASTER_ADDR=%ls", opt.master_addr);
    swprintf(ours[6], 128, L"MASTER_PORT=%ls", opt.master_port);
    swprintf(ours[7], 128, L"DDP_LAUNCHER=ddprun");
    for (e = base; *e; e += wcslen(e) + 1) count++;
    list = (wchar_t **)malloc((count + 8) * sizeof *list);
    if (!list) goto out;
    for (k = 0, e = base; *e; e += wcslen(e) + 1) {
        int skip = 0;
        for (i = 0; replaced[i]; i++) skip |= env_is(e, replaced[i]);
        if (!skip) list[k++] = (wchar_t *)e;
    }
    for (i = 0; i < 8; i++) list[k++] = ours[i];
    qsort(list, k, sizeof *list, env_cmp);
    for (i = 0; i < k; i++) chars += wcslen(list[i]) + 1;
    block = (wchar_t *)malloc((chars + 1) * sizeof *block);
    if (block) {
        wchar_t *p = block;
        for (i = 0; i < k; i++) {
            size_t len = wcslen(list[i]) + 1;
            memcpy(p, list[i], len * sizeof *p);
            p += len;
        }
        *p = 0;
    }
out:
    free(list);
    FreeEnvironmentStringsW((wchar_t *)base);
    return block;
}

/* One argument as the C runtime will split it back. */
static void quote_arg(wchar_t *out, size_t *len, const wchar_t *a)
{
    const wchar_t *p;
    if (*a && !wcspbrk(a, L" \t\n\v\"")) {
        size_t n = wcslen(a);
        if (out) memcpy(out + *len, a, n * sizeof *a);
        *len += n;
        return;
    }
    if (out) out[*len] = L'"';
    (*len)++;
    for (p = a;; p++) {
        size_t bs = 0, j;
        while (*p == L'\\') { bs++; p++; }
        if (*p == 0) bs *= 2;
        else if (*p == L'"') bs = bs * 2 + 1;
        for (j = 0; j < bs; j++) { if (out) out[*len] = L'\\'; (*len)++; }
        if (*p == 0) break;
        if (out) out[*len] = *p;
        (*len)++;
    }
    if (out) out[*len] = L'"';
    (*len)++;
}

static wchar_t *make_cmdline(void)
{
    size_t len = 0;
    int i, pass;
    wchar_t *out = NULL;
    for (pass = 0; pass < 2; pass++) {
        len = 0;
        for (i = 0; i < opt.argc; i++) {
            if (i) { if (out) out[len] = L' '; len++; }
            quote_arg(out, &len, opt.argv[i]);
        }
        if (pass == 0) {
            out = (wchar_t *)malloc((len + 1) * sizeof *out);
            if (!out) return NULL;
        }
    }
    out[len] = 0;
    return out;
}

/* A pipe whose write end the rank inherits; 0 or -1. */
static int make_pipe(HANDLE *rd, HANDLE *wr)
{
    SECURITY_ATTRIBUTES sa;
    sa.nLength = sizeof sa;
    sa.lpSecurityDescriptor = NULL;
    sa.bInheritHandle = TRUE;
    if (!CreatePipe(rd, wr, &sa, 0)) return -1;
    SetHandleInformation(*rd, HANDLE_FLAG_INHERIT, 0);
    return 0;
}

/* An inheritable copy of one of ddprun's standard handles (NULL if none). */
static HANDLE inheritable(HANDLE h)
{
    HANDLE d = NULL;
    if (!h || h == INVALID_HANDLE_VALUE) return NULL;
    if (!DuplicateHandle(GetCurrentProcess(), h, GetCurrentProcess(), &d, 0, TRUE, DUPLICATE_SAME_ACCESS)) return NULL;
    return d;
}

static HANDLE new_job(void)
{
    JOBOBJECT_EXTENDED_LIMIT_INFORMATION li;
    HANDLE job = CreateJobObjectW(NULL, NULL);
    if (!job) return NULL;
    memset(&li, 0, sizeof li);
    li.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE | JOB_OBJECT_LIMIT_DIE_ON_UNHANDLED_EXCEPTION;
    if (!SetInformationJobObject(job, JobObjectExtendedLimitInformation, &li, sizeof li)) {
        CloseHandle(job);
        return NULL;
    }
    return job;
}

/* Starts the ranks. On a failure part way, the started ranks are stopped
   like after a rank failure, and the main loop collects them. */
static void spawn_all(void)
{
    wchar_t *cmd = make_cmdline();
    HANDLE in = GetStdHandle(STD_INPUT_HANDLE), in_copy = NULL, nul = NULL, out_copy = NULL, err_copy = NULL;
    int r, i;
    char name[1024], why[512];
    if (!cmd) {
        msg("ddprun: out of memory\n");
        fail_code = EXIT_LAUNCHER;
        return;
    }
    if (in && in != INVALID_HANDLE_VALUE && GetFileType(in) == FILE_TYPE_CHAR) {
        /* a console: the ranks must not compete for it */
        SECURITY_ATTRIBUTES sa;
        sa.nLength = sizeof sa;
        sa.lpSecurityDescriptor = NULL;
        sa.bInheritHandle = TRUE;
        nul = CreateFileW(L"NUL", GENERIC_READ, FILE_SHARE_READ | FILE_SHARE_WRITE, &sa, OPEN_EXISTING, 0, NULL);
        if (nul == INVALID_HANDLE_VALUE) nul = NULL;
    } else {
        in_copy = inheritable(in);
    }
    if (!opt.prefix) {
        out_copy = inheritable(std_out[1]);
        err_copy = inheritable(std_out[2]);
    }
    for (r = 0; r < opt.n; r++) {
        struct rank *rk = &ranks[r];
        HANDLE wr[2] = {NULL, NULL}, inherit[3];
        STARTUPINFOEXW si;
        PROCESS_INFORMATION pi;
        LPPROC_THREAD_ATTRIBUTE_LIST attrs = NULL;
        SIZE_T attr_size = 0;
        wchar_t *env;
        DWORD flags = CREATE_SUSPENDED | CREATE_NEW_PROCESS_GROUP | CREATE_UNICODE_ENVIRONMENT;
        int ninherit = 0;
        BOOL ok;
        for (i = 0; i < 2; i++) {
            rk->streams[i].rank = r;
            rk->streams[i].out = i + 1;
        }
        if (opt.prefix && (make_pipe(&rk->streams[0].rd, &wr[0]) != 0 || make_pipe(&rk->streams[1].rd, &wr[1]) != 0)) {
            msg("ddprun: cannot create a pipe for rank %d: %s\n", r, win_error(GetLastError(), why, sizeof why));
            for (i = 0; i < 2; i++) {
                if (rk->streams[i].rd) CloseHandle(rk->streams[i].rd);
                if (wr[i]) CloseHandle(wr[i]);
                rk->streams[i].rd = NULL;
            }
            fail_code = EXIT_LAUNCHER;
            break;
        }
        env = make_env(r);
        rk->job = new_job();
        if (!env || !rk->job) {
            msg("ddprun: cannot prepare rank %d: %s\n", r, env ? win_error(GetLastError(), why, sizeof why) : "out of memory");
            fail_code = EXIT_LAUNCHER;
        }
        memset(&si, 0, sizeof si);
        si.StartupInfo.cb = sizeof si.StartupInfo;
        si.StartupInfo.dwFlags = STARTF_USESTDHANDLES;
        si.StartupInfo.hStdInput = nul ? nul : in_copy;
        si.StartupInfo.hStdOutput = opt.prefix ? wr[0] : out_copy;
        si.StartupInfo.hStdError = opt.prefix ? wr[1] : err_copy;
        if (si.StartupInfo.hStdInput) inherit[ninherit++] = si.StartupInfo.hStdInput;
        if (si.StartupInfo.hStdOutput) inherit[ninherit++] = si.StartupInfo.hStdOutput;
        if (si.StartupInfo.hStdError && si.StartupInfo.hStdError != si.StartupInfo.hStdOutput)
            inherit[ninherit++] = si.StartupInfo.hStdError;
        /* only the standard handles, where Windows supports saying so */
        if (fail_code < 0 && ninherit > 0) {
            InitializeProcThreadAttributeList(NULL, 1, 0, &attr_size);
            attrs = (LPPROC_THREAD_ATTRIBUTE_LIST)malloc(attr_size ? attr_size : 1);
            if (attrs && InitializeProcThreadAttributeList(attrs, 1, 0, &attr_size)) {
                if (UpdateProcThreadAttribute(attrs, 0, PROC_THREAD_ATTRIBUTE_HANDLE_LIST, inherit,
                                              (SIZE_T)ninherit * sizeof(HANDLE), NULL, NULL)) {
                    si.StartupInfo.cb = sizeof si;
                    si.lpAttributeList = attrs;
                    flags |= EXTENDED_STARTUPINFO_PRESENT;
                } else {
                    DeleteProcThreadAttributeList(attrs);
                    free(attrs);
                    attrs = NULL;
                }
            } else {
                free(attrs);
                attrs = NULL;
            }
        }
        ok = fail_code < 0 && CreateProcessW(NULL, cmd, NULL, NULL, TRUE, flags, env, NULL, &si.StartupInfo, &pi);
        if (fail_code < 0 && !ok) {
            DWORD e = GetLastError();
            char line[1600];
            int n = snprintf(line, sizeof line, "ddprun: cannot run '%s': %s\n", narrow(opt.argv[0], name, sizeof name),
                             win_error(e, why, sizeof why));
            if (opt.prefix) {
                struct stream tmp;
                memset(&tmp, 0, sizeof tmp);
                tmp.rank = r;
                tmp.out = 2;
                emit_line(&tmp, line, (size_t)n);
                flush_lines(&tmp);
                free(tmp.lines.p);
            } else {
                msg("%s", line);
            }
            fail_code = EXIT_NO_EXEC;
        }
        if (attrs) {
            DeleteProcThreadAttributeList(attrs);
            free(attrs);
        }
        free(env);
        for (i = 0; i < 2; i++)
            if (wr[i]) CloseHandle(wr[i]); /* the rank has its copies */
        if (!ok) {
            for (i = 0; i < 2; i++) {
                if (rk->streams[i].rd) CloseHandle(rk->streams[i].rd);
                rk->streams[i].rd = NULL;
            }
            if (rk->job) CloseHandle(rk->job);
            rk->job = NULL;
            break;
        }
        /* in its job before it runs, so nothing it starts escapes */
        if (!AssignProcessToJobObject(rk->job, pi.hProcess)) {
            CloseHandle(rk->job); /* e.g. a job of ours that allows no nesting: terminate it directly */
            rk->job = NULL;
        }
        rk->proc = pi.hProcess;
        rk->pid = pi.dwProcessId;
        rk->alive = 1;
        nstarted++;
        live++;
        for (i = 0; i < 2; i++) {
            struct stream *s = &rk->streams[i];
            if (!s->rd) continue;
            s->thread = CreateThread(NULL, 64 * 1024, reader_main, s, STACK_SIZE_PARAM_IS_A_RESERVATION, NULL);
            if (!s->thread) {
                msg("ddprun: cannot start a reader thread for rank %d: %s\n", r, win_error(GetLastError(), why, sizeof why));
                fail_code = EXIT_LAUNCHER;
            }
        }
        ResumeThread(pi.hThread);
        CloseHandle(pi.hThread);
        if (fail_code >= 0) break;
    }
    if (nul) CloseHandle(nul);
    if (in_copy) CloseHandle(in_copy);
    if (out_copy) CloseHandle(out_copy);
    if (err_copy) CloseHandle(err_copy);
    free(cmd);
    if (fail_code >= 0 && live > 0) {
        msg("ddprun: stopping the ranks already started\n");
        stop_all();
    }
}

/* ---------------------------------------------------------------- main loop */

static void supervise(void)
{
    HANDLE h[MAXIMUM_WAIT_OBJECTS];
    int i;
    for (;;) {
        DWORD timeout = INFINITE, nh = 0;
        handle_events();
        for (i = 0; i < nstarted; i++)
            if (ranks[i].alive && WaitForSingleObject(ranks[i].proc, 0) == WAIT_OBJECT_0) reap(&ranks[i]);
        if (live == 0) break;
        if (stopping && !killed) {
            double left = deadline - now_s();
            if (left <= 0) {
                for (i = 0; i < nstarted; i++) {
                    if (!ranks[i].alive) continue;
                    msg("ddprun: rank %d (pid %lu) still running %g s after being told to stop; terminating it\n", i,
                        (unsigned long)ranks[i].pid, opt.grace);
                    terminate_rank(&ranks[i]);
                }
                killed = 1;
            } else {
                timeout = (DWORD)(left * 1000.0) + 1;
            }
        }
        h[nh++] = wake;
        for (i = 0; i < nstarted && nh < MAXIMUM_WAIT_OBJECTS; i++)
            if (ranks[i].alive) h[nh++] = ranks[i].proc;
        if (nh == MAXIMUM_WAIT_OBJECTS && live > (int)nh - 1 && (timeout == INFINITE || timeout > 20))
            timeout = 20; /* more ranks than one wait takes: look at the rest often */
        WaitForMultipleObjects(nh, h, FALSE, timeout);
        ResetEvent(wake);
    }
}

/* ---------------------------------------------------------------- setup */

/* The option at argv[*i] if it is `name`: "--name v", "--name=v", or for a
   one-letter name "-nV" too. Advances *i past it. */
static const wchar_t *option_value(int argc, wchar_t **argv, int *i, const wchar_t *name)
{
    const wchar_t *a = argv[*i];
    size_t len = wcslen(name);
    int is_long = name[1] == L'-';
    char nb[64];
    if (wcsncmp(a, name, len) != 0) return NULL;
    if (a[len] == 0) {
        if (*i + 1 >= argc) usage_error("option %s needs a value", narrow(name, nb, sizeof nb));
        *i += 2;
        return argv[*i - 1];
    }
    if (is_long && a[len] != L'=') return NULL;
    *i += 1;
    return is_long ? a + len + 1 : a + len;
}

static int parse_long(const wchar_t *s, long lo, long hi, long *out)
{
    wchar_t *end;
    long v;
    errno = 0;
    v = wcstol(s, &end, 10);
    if (errno != 0 || end == s || *end != 0 || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

static void parse_args(int argc, wchar_t **argv)
{
    int i = 1, have_n = 0;
    long v;
    const wchar_t *val;
    wchar_t *end;
    char nb[512];
    opt.master_addr = L"127.0.0.1";
    opt.grace = 5.0;
    opt.prefix = 1;
    while (i < argc) {
        const wchar_t *a = argv[i];
        if (wcscmp(a, L"--") == 0) {
            i++;
            break;
        }
        if (a[0] != L'-' || a[1] == 0) break; /* the program: everything from here is its command line */
        if (wcscmp(a, L"-h") == 0 || wcscmp(a, L"--help") == 0) {
            print_help();
            exit(0);
        }
        if (wcscmp(a, L"--no-prefix") == 0) {
            opt.prefix = 0;
            i++;
        } else if ((val = option_value(argc, argv, &i, L"-n"))) {
            if (parse_long(val, 1, MAX_RANKS, &v) != 0)
                usage_error("-n: '%s' is not a whole number from 1 to %d", narrow(val, nb, sizeof nb), MAX_RANKS);
            opt.n = (int)v;
            have_n = 1;
        } else if ((val = option_value(argc, argv, &i, L"--master-addr"))) {
            if (*val == 0) usage_error("--master-addr: empty address");
            if (wcslen(val) > 100) usage_error("--master-addr: longer than 100 characters");
            opt.master_addr = val;
        } else if ((val = option_value(argc, argv, &i, L"--master-port"))) {
            if (parse_long(val, 1, 65535, &v) != 0)
                usage_error("--master-port: '%s' is not a port number from 1 to 65535", narrow(val, nb, sizeof nb));
            swprintf(opt.master_port, 16, L"%ld", v);
        } else if ((val = option_value(argc, argv, &i, L"--grace"))) {
            opt.grace = wcstod(val, &end);
            if (end == val || *end != 0 || !(opt.grace >= 0 && opt.grace <= 1e6))
                usage_error("--grace: '%s' is not a number of seconds from 0 to 1e6", narrow(val, nb, sizeof nb));
        } else {
            usage_error("unknown option '%s'", narrow(a, nb, sizeof nb));
        }
    }
    if (!have_n) usage_error("missing -n N (the number of processes to start)");
    if (i >= argc) usage_error("no program given");
    opt.argv = argv + i;
    opt.argc = argc - i;
}

/* Asks the system for a free port; it may be taken again before rank 0
   binds it, the same race torchrun's standalone mode accepts. */
static int find_free_port(wchar_t *out, size_t n)
{
    WSADATA d;
    struct sockaddr_in a;
    int alen = sizeof a, rc = -1;
    SOCKET s;
    if (WSAStartup(MAKEWORD(2, 2), &d) != 0) return -1;
    s = socket(AF_INET, SOCK_STREAM, 0);
    if (s != INVALID_SOCKET) {
        memset(&a, 0, sizeof a);
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (bind(s, (struct sockaddr *)&a, sizeof a) == 0 && getsockname(s, (struct sockaddr *)&a, &alen) == 0) {
            swprintf(out, n, L"%u", (unsigned)ntohs(a.sin_port));
            rc = 0;
        }
        closesocket(s);
    }
    WSACleanup();
    return rc;
}

int wmain(int argc, wchar_t **argv)
{
    int i, j;
    std_out[1] = GetStdHandle(STD_OUTPUT_HANDLE);
    std_out[2] = GetStdHandle(STD_ERROR_HANDLE);
    InitializeCriticalSection(&out_lock);
    parse_args(argc, argv);
    /* no error dialogs from the ranks (inherited): a crash is an exit code */
    SetErrorMode(SEM_FAILCRITICALERRORS | SEM_NOGPFAULTERRORBOX);
    if (opt.master_port[0] == 0 && find_free_port(opt.master_port, 16) != 0) {
        msg("ddprun: cannot find a free port on 127.0.0.1 (use --master-port)\n");
        return EXIT_LAUNCHER;
    }
    wake = CreateEventW(NULL, TRUE, FALSE, NULL);
    if (!wake) {
        msg("ddprun: cannot create an event\n");
        return EXIT_LAUNCHER;
    }
    SetConsoleCtrlHandler(on_console_event, TRUE);
    spawn_all();
    supervise();
    /* Everyone is reaped. Closing the jobs ends what the ranks left running
       (and so the pipes they held); then the readers finish. */
    for (i = 0; i < nstarted; i++) {
        if (ranks[i].job) CloseHandle(ranks[i].job);
        CloseHandle(ranks[i].proc);
    }
    for (i = 0; i < nstarted; i++)
        for (j = 0; j < 2; j++) {
            struct stream *s = &ranks[i].streams[j];
            if (!s->thread) continue;
            if (WaitForSingleObject(s->thread, 2000) != WAIT_OBJECT_0) continue; /* leave it; exit ends it */
            CloseHandle(s->thread);
            CloseHandle(s->rd);
            free(s->partial.p);
            free(s->lines.p);
        }
    if (fail_code >= 0) return (int)fail_code;
    return got_event;
}
