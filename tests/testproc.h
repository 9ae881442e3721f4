/* testproc.h - processes for the multi-process tests (not part of the
   library), POSIX and Windows: start copies of the test program itself,
   watch and kill them, and look for shared-memory segments they left.
   Include after ddp.h's implementation. */
#ifndef DDP_TESTPROC_H
#define DDP_TESTPROC_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(_WIN32)
#  include <windows.h>
#  include <winternl.h>
#else
#  include <dirent.h>
#  include <signal.h>
#  include <sys/types.h>
#  include <sys/wait.h>
#  include <unistd.h>
#endif

#if defined(__GNUC__) || defined(__clang__)
#  define TP_UNUSED __attribute__((unused))
#else
#  define TP_UNUSED
#endif

/* The exit code t_proc_poll reports for a process killed by t_proc_kill or
   t_kill_self: -SIGKILL on POSIX (the harness reports -signal), 137 on
   Windows (the code TerminateProcess is given). */
#if defined(_WIN32)
#  define T_KILLED 137
#else
#  define T_KILLED (-SIGKILL)
#endif

typedef struct t_proc {
#if defined(_WIN32)
    HANDLE h;
#endif
    int pid;
    int done, code;
} t_proc;

static char t_self_path[4096];

/* Call first in main. */
TP_UNUSED static void t_proc_init(const char *argv0) {
#if defined(_WIN32)
    (void)argv0;
    GetModuleFileNameA(NULL, t_self_path, (DWORD)sizeof t_self_path);
    SetErrorMode(SEM_FAILCRITICALERRORS | SEM_NOGPFAULTERRORBOX);
#else
    ssize_t n = readlink("/proc/self/exe", t_self_path, sizeof t_self_path - 1);
    if (n > 0) t_self_path[n] = 0;
    else snprintf(t_self_path, sizeof t_self_path, "%s", argv0);
    signal(SIGPIPE, SIG_IGN);
#endif
}

/* Start program `path` with args (NULL-terminated; simple words). */
TP_UNUSED static int t_proc_spawn(t_proc *p, const char *path, const char *const *args) {
#if defined(_WIN32)
    char cmd[8192];
    size_t n;
    int i;
    STARTUPINFOA si;
    PROCESS_INFORMATION pi;
    HANDLE std[3];
    n = (size_t)snprintf(cmd, sizeof cmd, "\"%s\"", path);
    for (i = 0; args[i] && n < sizeof cmd; i++) n += (size_t)snprintf(cmd + n, sizeof cmd - n, " %s", args[i]);
    memset(&si, 0, sizeof si);
    si.cb = sizeof si;
    si.dwFlags = STARTF_USESTDHANDLES;
    std[0] = GetStdHandle(STD_INPUT_HANDLE);
    std[1] = GetStdHandle(STD_OUTPUT_HANDLE);
    std[2] = GetStdHandle(STD_ERROR_HANDLE);
    for (i = 0; i < 3; i++) /* the children write to our stdout/stderr */
        if (std[i] && std[i] != INVALID_HANDLE_VALUE) SetHandleInformation(std[i], HANDLE_FLAG_INHERIT, HANDLE_FLAG_INHERIT);
    si.hStdInput = std[0];
    si.hStdOutput = std[1];
    si.hStdError = std[2];
    memset(p, 0, sizeof *p);
    if (!CreateProcessA(NULL, cmd, NULL, NULL, TRUE, 0, NULL, NULL, &si, &pi)) return -1;
    CloseHandle(pi.hThread);
    p->h = pi.hProcess;
    p->pid = (int)pi.dwProcessId;
    return 0;
#else
    const char *argv[64];
    int i;
    pid_t pid;
    argv[0] = path;
    for (i = 0; args[i] && i < 62; i++) argv[i + 1] = args[i];
    argv[i + 1] = NULL;
    fflush(stdout);
    fflush(stderr);
    memset(p, 0, sizeof *p);
    pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        execv(path, (char *const *)argv);
        _exit(127);
    }
    p->pid = (int)pid;
    return 0;
#endif
}

/* Start this program again with args. */
TP_UNUSED static int t_proc_spawn_self(t_proc *p, const char *const *args) {
    return t_proc_spawn(p, t_self_path, args);
}

/* 1 when process pid no longer runs (a zombie counts as gone: an orphan of
   a pid 1 that does not reap, in some containers, stays one). */
TP_UNUSED static int t_pid_gone(int pid) {
#if defined(_WIN32)
    HANDLE h = OpenProcess(SYNCHRONIZE, FALSE, (DWORD)pid);
    int gone;
    if (!h) return 1;
    gone = WaitForSingleObject(h, 0) == WAIT_OBJECT_0;
    CloseHandle(h);
    return gone;
#else
    char path[64], buf[512], *rp;
    FILE *f;
    if (kill((pid_t)pid, 0) != 0) return 1;
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    f = fopen(path, "r");
    if (!f) return 0;
    buf[0] = 0;
    if (!fgets(buf, sizeof buf, f)) buf[0] = 0;
    fclose(f);
    rp = strrchr(buf, ')');
    return rp && rp[1] == ' ' && rp[2] == 'Z';
#endif
}

/* 1 once the process has exited (p->code: its exit code, -signal on POSIX). */
TP_UNUSED static int t_proc_poll(t_proc *p) {
#if defined(_WIN32)
    DWORD code;
    if (p->done) return 1;
    if (WaitForSingleObject(p->h, 0) != WAIT_OBJECT_0) return 0;
    GetExitCodeProcess(p->h, &code);
    CloseHandle(p->h);
    p->h = NULL;
    p->code = (int)code;
#else
    int st;
    if (p->done) return 1;
    if (waitpid((pid_t)p->pid, &st, WNOHANG) != (pid_t)p->pid) return 0;
    p->code = WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st);
#endif
    p->done = 1;
    return 1;
}

TP_UNUSED static void t_proc_kill(t_proc *p) {
    if (p->done) return;
#if defined(_WIN32)
    TerminateProcess(p->h, T_KILLED);
#else
    kill((pid_t)p->pid, SIGKILL);
#endif
}

/* Die at once, as if killed from outside (no atexit, no cleanup). */
TP_UNUSED static void t_kill_self(void) {
#if defined(_WIN32)
    TerminateProcess(GetCurrentProcess(), T_KILLED);
#else
    raise(SIGKILL);
#endif
}

/* Run argv (argv[0] a path) with stdout and stderr into files (NULL: ours),
   the environment ours; *code gets the exit code (-signal on POSIX). A run
   longer than limit_s is killed. 0, or -1 when it could not start. */
TP_UNUSED static int t_run_capture(const char *const *argv, const char *out_path, const char *err_path,
                                   double limit_s, int *code) {
#if defined(_WIN32)
    char cmd[16384];
    size_t n = 0;
    int i;
    STARTUPINFOA si;
    PROCESS_INFORMATION pi;
    SECURITY_ATTRIBUTES sa;
    HANDLE f[2] = { NULL, NULL };
    DWORD c = 1, ms = limit_s > 0 ? (DWORD)(limit_s * 1000.0) : INFINITE;
    const char *paths[2];
    paths[0] = out_path;
    paths[1] = err_path;
    for (i = 0; argv[i] && n < sizeof cmd; i++)
        n += (size_t)snprintf(cmd + n, sizeof cmd - n, i ? " %s" : "\"%s\"", argv[i]);
    sa.nLength = sizeof sa;
    sa.lpSecurityDescriptor = NULL;
    sa.bInheritHandle = TRUE;
    for (i = 0; i < 2; i++) {
        if (!paths[i]) { f[i] = GetStdHandle(i ? STD_ERROR_HANDLE : STD_OUTPUT_HANDLE); continue; }
        f[i] = CreateFileA(paths[i], GENERIC_WRITE, FILE_SHARE_READ | FILE_SHARE_WRITE, &sa, CREATE_ALWAYS,
                           FILE_ATTRIBUTE_NORMAL, NULL);
        if (f[i] == INVALID_HANDLE_VALUE) return -1;
    }
    memset(&si, 0, sizeof si);
    si.cb = sizeof si;
    si.dwFlags = STARTF_USESTDHANDLES;
    si.hStdInput = GetStdHandle(STD_INPUT_HANDLE);
    si.hStdOutput = f[0];
    si.hStdError = f[1];
    if (!CreateProcessA(NULL, cmd, NULL, NULL, TRUE, 0, NULL, NULL, &si, &pi)) {
        for (i = 0; i < 2; i++) if (paths[i]) CloseHandle(f[i]);
        return -1;
    }
    CloseHandle(pi.hThread);
    if (WaitForSingleObject(pi.hProcess, ms) != WAIT_OBJECT_0) {
        TerminateProcess(pi.hProcess, T_KILLED);
        WaitForSingleObject(pi.hProcess, INFINITE);
    }
    GetExitCodeProcess(pi.hProcess, &c);
    CloseHandle(pi.hProcess);
    for (i = 0; i < 2; i++) if (paths[i]) CloseHandle(f[i]);
    *code = (int)c;
    return 0;
#else
    pid_t pid;
    int st;
    double t0;
    fflush(stdout);
    fflush(stderr);
    pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        FILE *o = out_path ? freopen(out_path, "w", stdout) : stdout;
        FILE *e = err_path ? freopen(err_path, "w", stderr) : stderr;
        if (!o || !e) _exit(126);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    t0 = ddp__now();
    for (;;) {
        pid_t w = waitpid(pid, &st, WNOHANG);
        if (w == pid) break;
        if (limit_s > 0 && ddp__now() - t0 > limit_s) kill(pid, SIGKILL);
        ddp__sleep_us(2000);
    }
    *code = WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st);
    return 0;
#endif
}

/* Shared-memory segments whose name starts with "ddp-<pid>-" for one of
   pids: POSIX, in /dev/shm; Windows, among the named objects of this
   session (the library's segments are "Local\ddp-<pid>-..."). */
#if defined(_WIN32)
typedef struct { UNICODE_STRING name, type; } t_dirent;
typedef LONG (NTAPI *t_open_dir_fn)(HANDLE *, ACCESS_MASK, OBJECT_ATTRIBUTES *);
typedef LONG (NTAPI *t_query_dir_fn)(HANDLE, void *, ULONG, BOOLEAN, BOOLEAN, ULONG *, ULONG *);
#endif

TP_UNUSED static int t_shm_leftovers(const int *pids, int n) {
    int count = 0, r;
    char prefix[40];
#if defined(_WIN32)
    HMODULE nt = GetModuleHandleA("ntdll.dll");
    t_open_dir_fn open_dir = nt ? (t_open_dir_fn)(void (*)(void))GetProcAddress(nt, "NtOpenDirectoryObject") : NULL;
    t_query_dir_fn query_dir = nt ? (t_query_dir_fn)(void (*)(void))GetProcAddress(nt, "NtQueryDirectoryObject") : NULL;
    DWORD session = 0;
    wchar_t path[64];
    UNICODE_STRING us;
    OBJECT_ATTRIBUTES oa;
    HANDLE dir;
    ULONG ctx = 0, len;
    static unsigned char buf[65536];
    if (!open_dir || !query_dir) return -1;
    ProcessIdToSessionId(GetCurrentProcessId(), &session);
    swprintf(path, 64, L"\\Sessions\\%lu\\BaseNamedObjects", (unsigned long)session);
    us.Buffer = path;
    us.Length = (USHORT)(wcslen(path) * sizeof(wchar_t));
    us.MaximumLength = (USHORT)(us.Length + sizeof(wchar_t));
    memset(&oa, 0, sizeof oa);
    oa.Length = sizeof oa;
    oa.ObjectName = &us;
    if (open_dir(&dir, 0x0001 | 0x0002 /* query, traverse */, &oa) != 0) return -1;
    while (query_dir(dir, buf, sizeof buf, TRUE, FALSE, &ctx, &len) == 0) {
        const t_dirent *e = (const t_dirent *)buf;
        char name[256];
        int k, m = e->name.Length / 2;
        for (k = 0; k < m && k < 255; k++) name[k] = (char)e->name.Buffer[k];
        name[k] = 0;
        for (r = 0; r < n; r++) {
            snprintf(prefix, sizeof prefix, "ddp-%d-", pids[r]);
            if (!strncmp(name, prefix, strlen(prefix))) count++;
        }
    }
    CloseHandle(dir);
#else
    DIR *d = opendir("/dev/shm");
    struct dirent *e;
    if (!d) return 0;
    while ((e = readdir(d)) != NULL)
        for (r = 0; r < n; r++) {
            snprintf(prefix, sizeof prefix, "ddp-%d-", pids[r]);
            if (!strncmp(e->d_name, prefix, strlen(prefix))) count++;
        }
    closedir(d);
#endif
    return count;
}

#endif
