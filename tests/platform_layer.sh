#!/usr/bin/env bash
# The PLATFORM section of ddp.h is the only code that knows the operating
# system: outside it (and in dp.h) no OS header, no POSIX or Win32 call, no
# GCC-only builtin, no _WIN32 test. The one exception is the feature-macro
# line at the top of ddp.h, which must precede every system header.
#   platform_layer.sh ddp.h dp.h
set -euo pipefail
ddp=${1:?usage: $0 ddp.h dp.h}
dp=${2:?usage: $0 ddp.h dp.h}
start='^/\* ==== PLATFORM ='
end='^/\* ==== end of PLATFORM'
[ "$(grep -c "$start" "$ddp")" = 1 ] && [ "$(grep -c "$end" "$ddp")" = 1 ] ||
    { echo "FAIL: $ddp must have exactly one PLATFORM section (its start and end rulers)"; exit 1; }

# the code of a file, comments removed, "file:line: code"; with skip=1 the
# PLATFORM section of ddp.h is left out
code() {
    awk -v skipsec="$2" '
        skipsec && /^\/\* ==== PLATFORM =/ { insec = 1 }
        { line = $0; out = ""
          while (line != "") {
              if (inc) { i = index(line, "*/"); if (i == 0) break; line = substr(line, i + 2); inc = 0; continue }
              i = index(line, "/*")
              if (i == 0) { out = out line; break }
              out = out substr(line, 1, i - 1); line = substr(line, i + 2); inc = 1
          }
          if (!insec) print FILENAME ":" FNR ": " out }
        skipsec && /^\/\* ==== end of PLATFORM/ { insec = 0 }' "$1"
}
calls='pthread_[a-z_]+|fork|waitpid|kill|getpid|usleep|nanosleep|clock_gettime|sched_yield|shm_open|shm_unlink|mmap|munmap|ftruncate|posix_fallocate|fstat|fsync|fcntl|pipe|poll|select|socket|setsockopt|getsockopt|getsockname|accept|bind|listen|connect|send|recv|closesocket|ioctlsocket|close|read|write|sigfillset|sigaction|rename|open|Sleep|SwitchToThread|[A-Z][a-zA-Z]+(Handle|Process|Thread|File|Mapping|Event)[A-Za-z]*'
tokens='ssize_t|nfds_t|MSG_NOSIGNAL|MSG_DONTWAIT|__atomic_[a-z_]+|__builtin_[a-z_0-9]+|__thread|_Interlocked[A-Za-z0-9]+|WSA[A-Za-z]+|HANDLE|DWORD|_WIN32|__declspec|EAI_SYSTEM|O_[A-Z]+|SIG[A-Z]+'
headers='#[[:space:]]*include[[:space:]]*<(unistd|pthread|fcntl|signal|sched|poll|netdb|windows|winsock2|ws2tcpip|process|io|intrin|dirent|sys/|netinet/|arpa/)'
hits=$( { code "$ddp" 1; code "$dp" 0; } |
        grep -E "\b($calls)[[:space:]]*\(|\b($tokens)\b|$headers" |
        grep -vF '#if defined(DDP_IMPLEMENTATION) && !defined(_WIN32) && !defined(_GNU_SOURCE)' || true)
if [ -n "$hits" ]; then
    echo "FAIL: operating-system code outside the PLATFORM section of ddp.h:"
    echo "$hits"
    exit 1
fi
echo "platform layer: no OS header, call or _WIN32 test outside ddp.h's PLATFORM section ($(grep -n "$start" "$ddp" | cut -d: -f1)..$(grep -n "$end" "$ddp" | cut -d: -f1)) or in dp.h"
