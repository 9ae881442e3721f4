/* GPU checks of ddp.h, written as a C user would: this file is C (gcc), the
   implementation TU is examples/ddp_impl.cu (nvcc), the model is
   examples/mlp_cuda.cu (cuBLAS).

     test_gpu_ddp equiv [--steps S] [--accum K] [--backend nccl|staged] [--features]
         under ddprun -n N: DDP on the GPU (nccl needs one GPU per rank;
         staged lets N ranks share one), then one CPU replica (a world-1 CPU
         context, the plain C model) on the concatenated batch; the weights
         must agree within fp32 tolerance and every replica hold the same bits.
         --features: both contexts also use parameter groups (biases
         without decay, the first layer at half the lr), a warmup + cosine
         schedule, clipping and dynamic loss scaling (ddp_k_optimizer_step's
         group map and multiplier, ddp_k_nonfinite).
         --zero: the GPU context shards its optimizer state (ZeRO-1:
         reduce-scatter, the sharded fused step, the parameter all-gather;
         nccl: ncclReduceScatter/ncclAllGather, staged: the shm exchange)
         and saves a checkpoint (its state gathered from the devices) that a
         CPU context loads: the same weights and step count.
         --hook allreduce|bf16|fp16: the GPU context reduces its buckets
         through a communication hook (ddp_comm_hook_allreduce, or the
         compression hooks: ddp_k_cast on the communication stream, the
         16-bit all-reduce, back); 16-bit hooks within 2e-2 of the CPU.
     test_gpu_ddp kill
         3 forked ranks on the staged backend; rank 2 is killed in the middle
         of a step; the others must fail within the timeout, and nothing is
         left in /dev/shm.

     test_gpu_ddp safetensors
         a world-1 GPU context saves its weights as safetensors (device to
         host), a CPU context reads them; a CPU file with other values loads
         into the GPU context (host to device), which saves them again: every
         value must come back exactly.

   Prints PASS/FAIL lines and exits 0 only when everything passed. */
#define _GNU_SOURCE 1 /* fork, kill, clock_gettime */
#include "../../ddp.h"
#define MLP_IMPLEMENTATION
#define MLP_NO_ZLIB
#include "../../examples/mlp.h"
#include "../../examples/mlp_cuda.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <unistd.h>
#include <dirent.h>
#include <sys/wait.h>
#include <time.h>

typedef struct job {
    ddp_context *ctx;
    mlp_cuda *model;
    mlp_shape shape;
    const float *x;
    const uint8_t *y;
    int rows, step, world, rank, accum;
    int kill_at_step; /* -1: never */
} job;

static void on_ready(int p, void *user) {
    job *j = (job *)user;
    if (j->kill_at_step == j->step && p == 1) raise(SIGKILL);
    ddp_mark_ready_stream(j->ctx, p, mlp_cuda_stream(j->model));
}

static int fb(ddp_context *ctx, void *user, int micro, float *loss) {
    job *j = (job *)user;
    float *params[MLP_MAX_PARAMS], *grads[MLP_MAX_PARAMS];
    int p, row = (j->step * j->accum * j->world + micro * j->world + j->rank) * j->rows;
    for (p = 0; p < mlp_num_params(&j->shape); p++) {
        params[p] = (float *)ddp_param_data(ctx, p);
        grads[p] = (float *)ddp_param_grad(ctx, p);
    }
    if (mlp_cuda_upload(j->model, j->x + (size_t)row * (size_t)j->shape.dims[0], j->y + row, j->rows) != 0) return 1;
    if (mlp_cuda_forward_backward(j->model, params, grads, j->rows, (float)ddp_loss_scale(ctx), on_ready, j) != 0) return 2;
    *loss = 0;
    return 0;
}

static int g_features, g_zero;
static const char *g_hook;

static ddp_context *make_ctx(ddp_config *c, const mlp_shape *s, float *const *init) {
    ddp_context *ctx;
    int p, id;
    ddp_result r = ddp_create(c, &ctx);
    if (r != DDP_SUCCESS) { fprintf(stderr, "ddp_create: %s: %s\n", ddp_result_string(r), ddp_create_error()); exit(3); }
    for (p = 0; p < mlp_num_params(s); p++) {
        char name[32];
        int64_t dims[2];
        int nd = mlp_param_shape(s, p, dims);
        mlp_param_name(p, name, sizeof name);
        if (ddp_register_param_shape(ctx, name, nd, dims, DDP_F32, init[p], &id) != DDP_SUCCESS) { fprintf(stderr, "%s\n", ddp_last_error(ctx)); exit(3); }
        if (g_features) {
            ddp_param_options o;
            memset(&o, 0, sizeof o);
            o.no_weight_decay = p & 1;
            o.lr_scale = p < 2 ? 0.5 : 1.0;
            if (ddp_set_param_options(ctx, id, &o) != DDP_SUCCESS) { fprintf(stderr, "%s\n", ddp_last_error(ctx)); exit(3); }
        }
    }
    if (ddp_finalize(ctx) != DDP_SUCCESS) { fprintf(stderr, "finalize: %s\n", ddp_last_error(ctx)); exit(3); }
    return ctx;
}

static void set_optimizer(ddp_config *c, const char *optim) {
    if (!strcmp(optim, "adamw")) { c->optimizer.type = DDP_OPTIM_ADAMW; c->optimizer.lr = 0.01f; c->optimizer.weight_decay = 0.01f; }
    else { c->optimizer.type = DDP_OPTIM_SGD; c->optimizer.lr = 0.1f; c->optimizer.momentum = 0.9f; c->optimizer.weight_decay = 1e-3f; }
}

static int run_equiv(int steps, int accum, const char *optim) {
    ddp_config c;
    ddp_context *gpu, *cpu;
    mlp_shape shape;
    mlp_dataset data;
    mlp_workspace ws;
    float *init[MLP_MAX_PARAMS], *params[MLP_MAX_PARAMS], *grads[MLP_MAX_PARAMS], *host;
    int rows = 16, p, s, i, world, rank, failed = 0;
    double maxdiff = 0, maxref = 0;
    uint64_t h = 0xcbf29ce484222325ull, *all;
    char err[512];
    job j;
    mlp_shape_parse("64,48,32,10", &shape);
    for (p = 0; p < mlp_num_params(&shape); p++) init[p] = (float *)malloc(mlp_param_numel(&shape, p) * sizeof(float));
    mlp_init_params(&shape, 77, init);
    memset(&c, 0, sizeof c);
    c.device = DDP_DEVICE_CUDA;
    c.timeout_s = 60;
    c.first_bucket_bytes = 4096;
    c.bucket_bytes = 8192;
    set_optimizer(&c, optim);
    if (g_features) {
        c.optimizer.max_grad_norm = 1.0;
        c.schedule.type = DDP_SCHEDULE_COSINE;
        c.schedule.warmup_steps = 2;
        c.schedule.total_steps = steps;
        c.loss_scale.enabled = 1;
        c.loss_scale.init_scale = 1024;
        c.loss_scale.growth_interval = 2;
    }
    c.zero_stage = g_zero;
    gpu = make_ctx(&c, &shape, init);
    c.zero_stage = 0;
    if (g_hook) {
        ddp_comm_hook hk = !strcmp(g_hook, "bf16") ? ddp_comm_hook_bf16 : !strcmp(g_hook, "fp16") ? ddp_comm_hook_fp16 : ddp_comm_hook_allreduce;
        if (ddp_register_comm_hook(gpu, hk, NULL) != DDP_SUCCESS) { fprintf(stderr, "hook: %s\n", ddp_last_error(gpu)); return 1; }
    }
    world = ddp_world_size(gpu);
    rank = ddp_rank(gpu);
    if (mlp_synthetic(&data, steps * accum * world * rows, 64, 10, 5) != 0) return 3;
    memset(&j, 0, sizeof j);
    j.ctx = gpu; j.shape = shape; j.x = data.x; j.y = data.y; j.rows = rows; j.world = world; j.rank = rank;
    j.accum = accum; j.kill_at_step = -1;
    if (mlp_cuda_create(&shape, rows, -1, NULL, MLP_CUDA_NEW_STREAM | MLP_CUDA_PEDANTIC, &j.model, err, sizeof err) != 0) {
        fprintf(stderr, "mlp_cuda_create: %s\n", err);
        return 3;
    }
    ddp_set_stream(gpu, mlp_cuda_stream(j.model));
    for (s = 0; s < steps; s++) {
        ddp_result r;
        j.step = s;
        r = ddp_train_step(gpu, fb, &j, accum, NULL);
        if (r != DDP_SUCCESS) { fprintf(stderr, "rank %d step %d: %s: %s\n", rank, s, ddp_result_string(r), ddp_last_error(gpu)); return 1; }
    }
    if (ddp_synchronize(gpu) != DDP_SUCCESS) { fprintf(stderr, "synchronize: %s\n", ddp_last_error(gpu)); return 1; }

    /* the reference: one CPU replica on the concatenated batches */
    c.world_size = 1; c.rank = 0; c.device = DDP_DEVICE_CPU; c.backend = DDP_BACKEND_SHM; /* whatever DDP_BACKEND says */
    cpu = make_ctx(&c, &shape, init);
    mlp_workspace_init(&ws, &shape, rows * accum * world);
    for (s = 0; s < steps; s++) {
        int g = rows * accum * world;
        ddp_step_begin(cpu);
        for (p = 0; p < mlp_num_params(&shape); p++) { params[p] = (float *)ddp_param_data(cpu, p); grads[p] = (float *)ddp_param_grad(cpu, p); }
        mlp_forward_backward(params, data.x + (size_t)s * (size_t)g * 64, data.y + s * g, g, (float)ddp_loss_scale(cpu), grads, &ws, NULL, NULL, NULL);
        for (p = 0; p < mlp_num_params(&shape); p++) ddp_mark_ready(cpu, p);
        if (ddp_step_end(cpu) != DDP_SUCCESS || ddp_optimizer_step(cpu) != DDP_SUCCESS) { fprintf(stderr, "reference: %s\n", ddp_last_error(cpu)); return 3; }
    }
    for (p = 0; p < mlp_num_params(&shape); p++) {
        size_t n = mlp_param_numel(&shape, p);
        const float *b = (const float *)ddp_param_data(cpu, p);
        host = (float *)malloc(n * sizeof(float));
        mlp_cuda_to_host(j.model, host, ddp_param_data(gpu, p), n * sizeof(float));
        for (i = 0; i < (int)n; i++) {
            double d = fabs((double)host[i] - (double)b[i]);
            if (!(host[i] == host[i])) d = INFINITY;
            if (d > maxdiff) maxdiff = d;
            if (fabs(b[i]) > maxref) maxref = fabs(b[i]);
        }
        for (i = 0; i < (int)(n * sizeof(float)); i++) { h ^= ((unsigned char *)host)[i]; h *= 0x100000001b3ull; }
        free(host);
    }
    all = (uint64_t *)malloc(sizeof(uint64_t) * (size_t)world);
    if (ddp_allgather(gpu, &h, all, 2, DDP_I32) != DDP_SUCCESS) { fprintf(stderr, "allgather: %s\n", ddp_last_error(gpu)); return 1; }
    for (i = 0; i < world; i++) if (all[i] != h) failed = 1;
    if (maxdiff / maxref > (g_hook && strcmp(g_hook, "allreduce") ? 2e-2 : 1e-4)) failed = 1;
    if (g_zero) {
        /* the sharded state, gathered from the GPUs into a checkpoint, loads
           into a CPU context with the GPU's weights and step count */
        char path[128];
        ddp_context *back;
        int same = 1;
        snprintf(path, sizeof path, "/tmp/ddp_gpu_zero_%d.ckpt", (int)ddp_query_config(gpu).master_port);
        if (ddp_save_checkpoint(gpu, path) != DDP_SUCCESS) { fprintf(stderr, "save: %s\n", ddp_last_error(gpu)); failed = 1; }
        else if (rank == 0) {
            back = make_ctx(&c, &shape, init);
            if (ddp_load_checkpoint(back, path) != DDP_SUCCESS) { fprintf(stderr, "load: %s\n", ddp_last_error(back)); failed = 1; }
            for (p = 0; p < mlp_num_params(&shape) && !failed; p++) {
                size_t n = mlp_param_numel(&shape, p);
                host = (float *)malloc(n * sizeof(float));
                mlp_cuda_to_host(j.model, host, ddp_param_data(gpu, p), n * sizeof(float));
                same &= memcmp(host, ddp_param_data(back, p), n * sizeof(float)) == 0;
                free(host);
            }
            if (!same || ddp_optimizer_steps(back) != ddp_optimizer_steps(gpu)) failed = 1;
            printf("%s gpu_zero_checkpoint weights_equal=%s steps %lld/%lld state_bytes gpu=%zu cpu=%zu\n", same && !failed ? "PASS" : "FAIL",
                   same ? "yes" : "no", (long long)ddp_optimizer_steps(back), (long long)ddp_optimizer_steps(gpu),
                   ddp_optimizer_state_bytes(gpu), ddp_optimizer_state_bytes(back));
            ddp_destroy(back);
            remove(path);
        }
    }
    if (rank == 0)
        printf("%s gpu_equiv backend=%s world=%d optim=%s accum=%d steps=%d features=%d zero=%d hook=%s max_rel_diff_vs_cpu=%.3g replicas_identical=%s\n",
               failed ? "FAIL" : "PASS", ddp_backend_name(ddp_query_backend(gpu)), world, optim, accum, steps, g_features, g_zero,
               g_hook ? g_hook : "none",
               maxdiff / maxref, all[0] == h ? "yes" : "no");
    free(all);
    mlp_workspace_free(&ws);
    mlp_cuda_destroy(j.model);
    ddp_destroy(cpu);
    ddp_destroy(gpu);
    mlp_dataset_free(&data);
    for (p = 0; p < mlp_num_params(&shape); p++) free(init[p]);
    return failed;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int kill_rank(int rank, int port) {
    ddp_config c;
    ddp_context *ctx;
    mlp_shape shape;
    mlp_dataset data;
    float *init[MLP_MAX_PARAMS];
    int p, s;
    char err[512];
    ddp_result r = DDP_SUCCESS;
    double t0 = 0;
    job j;
    mlp_shape_parse("64,48,32,10", &shape);
    for (p = 0; p < mlp_num_params(&shape); p++) init[p] = (float *)calloc(mlp_param_numel(&shape, p), sizeof(float));
    memset(&c, 0, sizeof c);
    c.rank = rank; c.world_size = 3; c.master_addr = "127.0.0.1"; c.master_port = port;
    c.device = DDP_DEVICE_CUDA; c.backend = DDP_BACKEND_STAGED; c.timeout_s = 5;
    c.first_bucket_bytes = 4096; c.bucket_bytes = 4096;
    set_optimizer(&c, "sgd");
    ctx = make_ctx(&c, &shape, init);
    mlp_synthetic(&data, 3 * 16 * 4, 64, 10, 5);
    memset(&j, 0, sizeof j);
    j.ctx = ctx; j.shape = shape; j.x = data.x; j.y = data.y; j.rows = 16; j.world = 3; j.rank = rank; j.accum = 1;
    j.kill_at_step = rank == 2 ? 2 : -1;
    if (mlp_cuda_create(&shape, 16, -1, NULL, MLP_CUDA_NEW_STREAM, &j.model, err, sizeof err) != 0) return 3;
    ddp_set_stream(ctx, mlp_cuda_stream(j.model));
    for (s = 0; s < 4 && r == DDP_SUCCESS; s++) {
        j.step = s;
        t0 = now_s();
        r = ddp_train_step(ctx, fb, &j, 1, NULL);
        if (r == DDP_SUCCESS) r = ddp_synchronize(ctx);
    }
    if (r != DDP_ERROR_PEER && r != DDP_ERROR_TIMEOUT) { fprintf(stderr, "rank %d: expected an error, got %s\n", rank, ddp_result_string(r)); return 4; }
    if (now_s() - t0 > 5 + 3) { fprintf(stderr, "rank %d: took %.1f s to fail\n", rank, now_s() - t0); return 5; }
    printf("rank %d failed as expected in %.2f s: %s\n", rank, now_s() - t0, ddp_last_error(ctx));
    ddp_destroy(ctx);
    return 0;
}

static int run_kill(void) {
    pid_t pids[3];
    int codes[3], r, port = 20000 + (int)(getpid() % 20000), ok = 1, left = 0;
    DIR *d;
    struct dirent *e;
    fflush(stdout);
    for (r = 0; r < 3; r++) {
        pids[r] = fork();
        if (pids[r] == 0) _exit(kill_rank(r, port));
    }
    for (r = 0; r < 3; r++) {
        int st;
        waitpid(pids[r], &st, 0);
        codes[r] = WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st);
    }
    ok = codes[0] == 0 && codes[1] == 0 && codes[2] == -SIGKILL;
    d = opendir("/dev/shm");
    while (d && (e = readdir(d)) != NULL)
        for (r = 0; r < 3; r++) {
            char prefix[32];
            snprintf(prefix, sizeof prefix, "ddp-%d-", (int)pids[r]);
            if (!strncmp(e->d_name, prefix, strlen(prefix))) left++;
        }
    if (d) closedir(d);
    printf("%s gpu_kill staged world=3 codes=%d,%d,%d shm_left=%d\n", ok && !left ? "PASS" : "FAIL", codes[0], codes[1], codes[2], left);
    return ok && !left ? 0 : 1;
}

/* weights through safetensors files between a GPU and a CPU context */
static int run_safetensors(void) {
    ddp_config c;
    ddp_context *gpu, *cpu;
    mlp_shape shape;
    float *init[MLP_MAX_PARAMS] = {0};
    char a[64], b[64];
    int p, bad = 0, ok;
    size_t i;
    mlp_shape_parse("64,48,32,10", &shape);
    for (p = 0; p < mlp_num_params(&shape); p++) init[p] = (float *)malloc(mlp_param_numel(&shape, p) * sizeof(float));
    mlp_init_params(&shape, 5, init);
    snprintf(a, sizeof a, "/tmp/ddp-gpu-st-%d-a.safetensors", (int)getpid());
    snprintf(b, sizeof b, "/tmp/ddp-gpu-st-%d-b.safetensors", (int)getpid());
    memset(&c, 0, sizeof c);
    c.world_size = 1;
    c.timeout_s = 60;
    c.device = DDP_DEVICE_CUDA;
    gpu = make_ctx(&c, &shape, init);
    c.device = DDP_DEVICE_CPU;
    cpu = make_ctx(&c, &shape, init);
    for (p = 0; p < mlp_num_params(&shape); p++) memset(ddp_param_data(cpu, p), 0, mlp_param_numel(&shape, p) * sizeof(float));
    ok = ddp_save_safetensors(gpu, a, NULL) == DDP_SUCCESS && ddp_load_safetensors(cpu, a, 0) == DDP_SUCCESS;
    for (p = 0; ok && p < mlp_num_params(&shape); p++)
        for (i = 0; i < mlp_param_numel(&shape, p); i++) bad += ((float *)ddp_param_data(cpu, p))[i] != init[p][i];
    /* other values, from the CPU into the GPU context and back out */
    for (p = 0; ok && p < mlp_num_params(&shape); p++)
        for (i = 0; i < mlp_param_numel(&shape, p); i++) ((float *)ddp_param_data(cpu, p))[i] = 2.0f * init[p][i] + 1.0f;
    ok = ok && ddp_save_safetensors(cpu, b, NULL) == DDP_SUCCESS && ddp_load_safetensors(gpu, b, 0) == DDP_SUCCESS &&
         ddp_save_safetensors(gpu, a, NULL) == DDP_SUCCESS && ddp_load_safetensors(cpu, a, 0) == DDP_SUCCESS;
    for (p = 0; ok && p < mlp_num_params(&shape); p++)
        for (i = 0; i < mlp_param_numel(&shape, p); i++) bad += ((float *)ddp_param_data(cpu, p))[i] != 2.0f * init[p][i] + 1.0f;
    if (!ok) fprintf(stderr, "gpu: %s / cpu: %s\n", ddp_last_error(gpu), ddp_last_error(cpu));
    printf("%s gpu_safetensors save/load device<->host values_wrong=%d\n", ok && !bad ? "PASS" : "FAIL", bad);
    ddp_destroy(gpu);
    ddp_destroy(cpu);
    remove(a);
    remove(b);
    for (p = 0; p < mlp_num_params(&shape); p++) free(init[p]);
    return ok && !bad ? 0 : 1;
}

int main(int argc, char **argv) {
    int steps = 4, accum = 1, i;
    const char *optim = "sgd";
    if (argc < 2) { fprintf(stderr, "usage: test_gpu_ddp equiv|kill|safetensors [--steps S] [--accum K] [--optim sgd|adamw] [--features] [--zero] [--hook allreduce|bf16|fp16]\n"); return 2; }
    for (i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--accum") && i + 1 < argc) accum = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--optim") && i + 1 < argc) optim = argv[++i];
        else if (!strcmp(argv[i], "--features")) g_features = 1;
        else if (!strcmp(argv[i], "--zero")) g_zero = 1;
        else if (!strcmp(argv[i], "--hook") && i + 1 < argc) g_hook = argv[++i];
    }
    /* fork before anything touches CUDA: a process that initialised CUDA
       must not fork children that use it */
    if (!strcmp(argv[1], "kill")) return run_kill();
    if (mlp_cuda_device_count() == 0) { printf("SKIP no CUDA device\n"); return 77; }
    if (!strcmp(argv[1], "equiv")) return run_equiv(steps, accum, optim);
    if (!strcmp(argv[1], "safetensors")) return run_safetensors();
    fprintf(stderr, "unknown mode '%s'\n", argv[1]);
    return 2;
}
