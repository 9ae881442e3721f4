/* consumer.c - a program of another project that uses ddp.h as a dependency
   (tests/consumer/run.sh builds it against the installed package, with
   add_subdirectory, with FetchContent and with pkg-config).

   It forks 2 ranks on this host; each all-reduces a buffer and runs one
   training step, and checks the results against values computed here:
   the sum of the ranks' buffers, the gradient averaged over the ranks,
   the SGD update. Prints "consumer (MODE): 2 ranks ok, ddp.h VERSION"
   and exits 0, or names what went wrong and exits 1.

   With CONSUMER_NO_IMPLEMENTATION the implementation is in another file
   (consumer_impl.cu, compiled by nvcc: the ddp::cuda target). */
#ifndef CONSUMER_NO_IMPLEMENTATION
#define DDP_IMPLEMENTATION
#else
#define _POSIX_C_SOURCE 200809L
#endif
#include <ddp.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef CONSUMER_MODE
#define CONSUMER_MODE "unknown"
#endif

#define WORLD 2
#define N_W 12 /* fc.weight [4, 3] */
#define N_B 4  /* fc.bias [4] */
#define LR 0.5f

#define FAIL(...) do { fprintf(stderr, "consumer rank %d: ", rank); fprintf(stderr, __VA_ARGS__); \
                       fputc('\n', stderr); if (ctx) ddp_destroy(ctx); return 1; } while (0)
#define OK(call) do { ddp_result r_ = (call); \
                      if (r_ != DDP_SUCCESS) FAIL("%s: %s: %s", #call, ddp_result_string(r_), ddp_last_error(ctx)); } while (0)

static int free_port(void) {
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    int fd = socket(AF_INET, SOCK_STREAM, 0), port = 0;
    if (fd < 0) return 0;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) == 0 && getsockname(fd, (struct sockaddr *)&a, &len) == 0)
        port = ntohs(a.sin_port);
    close(fd);
    return port;
}

/* each rank's gradient: different on every rank, so the average is visible */
static float grad_of(int rank, int i) { return (float)(i + 1) * (rank == 0 ? 1.0f : 3.0f); }

static int run_rank(int rank, int port) {
    ddp_config cfg;
    ddp_context *ctx = NULL;
    float init_w[N_W], init_b[N_B], buf[5], *g, *p;
    int64_t shape[2] = { 4, 3 };
    int w, b, i;
    memset(&cfg, 0, sizeof cfg);
    cfg.rank = rank;
    cfg.world_size = WORLD;
    cfg.master_addr = "127.0.0.1";
    cfg.master_port = port;
    cfg.device = DDP_DEVICE_CPU;
    cfg.timeout_s = 30;
    cfg.optimizer.type = DDP_OPTIM_SGD;
    cfg.optimizer.lr = LR;
    if (strcmp(ddp_version(), DDP_VERSION) != 0)
        FAIL("the linked implementation is %s, the header %s", ddp_version(), DDP_VERSION);
    if (ddp_create(&cfg, &ctx) != DDP_SUCCESS) FAIL("ddp_create: %s", ddp_create_error());

    /* an all-reduce on a buffer of ours */
    for (i = 0; i < 5; i++) buf[i] = (float)(rank * 10 + i);
    OK(ddp_allreduce(ctx, buf, 5, DDP_F32, DDP_OP_SUM));
    for (i = 0; i < 5; i++)
        if (buf[i] != (float)(10 + 2 * i)) FAIL("all-reduce: element %d is %g, expected %g", i, (double)buf[i], (double)(10 + 2 * i));

    /* a model; rank 1's initial values lose to rank 0's at finalize */
    for (i = 0; i < N_W; i++) init_w[i] = rank == 0 ? 0.25f * (float)i : -1.0f;
    for (i = 0; i < N_B; i++) init_b[i] = rank == 0 ? 1.0f : -1.0f;
    OK(ddp_register_param_shape(ctx, "fc.weight", 2, shape, DDP_F32, init_w, &w));
    OK(ddp_register_param(ctx, "fc.bias", N_B, DDP_F32, init_b, &b));
    OK(ddp_finalize(ctx));

    /* one step: gradients averaged over ranks, then p -= lr * g */
    OK(ddp_step_begin(ctx));
    g = (float *)ddp_param_grad(ctx, b);
    for (i = 0; i < N_B; i++) g[i] += grad_of(rank, i);
    OK(ddp_mark_ready(ctx, b));
    g = (float *)ddp_param_grad(ctx, w);
    for (i = 0; i < N_W; i++) g[i] += grad_of(rank, i);
    OK(ddp_mark_ready(ctx, w));
    OK(ddp_step_end(ctx));
    g = (float *)ddp_param_grad(ctx, w);
    for (i = 0; i < N_W; i++)
        if (g[i] != 2.0f * (float)(i + 1)) FAIL("fc.weight gradient %d is %g, expected the average %g", i, (double)g[i], 2.0 * (i + 1));
    OK(ddp_optimizer_step(ctx));
    p = (float *)ddp_param_data(ctx, w);
    for (i = 0; i < N_W; i++) {
        float want = 0.25f * (float)i - LR * 2.0f * (float)(i + 1);
        if (p[i] != want) FAIL("fc.weight[%d] is %g after the step, expected %g", i, (double)p[i], (double)want);
    }
    p = (float *)ddp_param_data(ctx, b);
    for (i = 0; i < N_B; i++) {
        float want = 1.0f - LR * 2.0f * (float)(i + 1);
        if (p[i] != want) FAIL("fc.bias[%d] is %g after the step, expected %g", i, (double)p[i], (double)want);
    }
    OK(ddp_barrier(ctx));
    ddp_destroy(ctx);
    return 0;
}

int main(void) {
    pid_t pids[WORLD];
    int port = free_port(), r, bad = 0;
    if (!port) { fprintf(stderr, "consumer: no free TCP port on 127.0.0.1\n"); return 1; }
    fflush(stdout);
    for (r = 0; r < WORLD; r++) {
        pids[r] = fork();
        if (pids[r] < 0) { perror("consumer: fork"); return 1; }
        if (pids[r] == 0) _exit(run_rank(r, port));
    }
    for (r = 0; r < WORLD; r++) {
        int st = 0;
        if (waitpid(pids[r], &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, "consumer: rank %d failed (status %d)\n", r, st);
            bad = 1;
        }
    }
    if (bad) return 1;
    printf("consumer (%s): %d ranks ok, ddp.h %s\n", CONSUMER_MODE, WORLD, ddp_version());
    return 0;
}
