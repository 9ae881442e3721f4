/* dp.h - v0.2.0 - DataParallel for C and C++: one process drives several devices

   License: MIT, see the end of ddp.h.

   Do this:
       #define DP_IMPLEMENTATION
   before you include this file in *one* C, C++ or CUDA (.cu) file. That file
   also gets ddp.h's implementation (dp.h is built on it and includes it):
   do not define DDP_IMPLEMENTATION in another file of the same program.

   WHAT IT IS

   PyTorch's nn.DataParallel copies the model to every GPU on every step,
   gathers outputs and gradients on GPU 0, and runs one Python thread per
   GPU under the GIL. dp.h keeps one persistent replica per device, created
   once and initialised from replica 0; one host thread per device runs your
   forward/backward on that device's stream; gradients are all-reduced in
   buckets while backward runs (the reducer of ddp.h: each replica is a
   ddp.h context of a world of K inside this process); every replica then
   applies the same optimizer step, so the replicas stay identical without a
   broadcast.

   Devices are GPU ids, or CPU "devices" (threads with host memory) so that
   everything also runs without a GPU. A GPU id may repeat (several replicas
   on one GPU). Backends: NCCL with one communicator per device when the GPUs
   are distinct and NCCL is built in; host-staged reduction through shared
   memory otherwise (and on the CPU, and always on Windows, which has no
   NCCL). Platforms: those of ddp.h (POSIX and Windows).

   STEP BY STEP

       dp_config c = {0};
       c.num_devices = 2;                 // or c.device_ids = ids
       c.ddp.optimizer = ddp_optimizer_defaults(DDP_OPTIM_SGD); c.ddp.optimizer.lr = 0.1;
       dp_create(&c, &dp);
       dp_register_param(dp, "fc1.weight", n, DDP_F32, init, &id);  // for each
       dp_set_param_options(dp, bias_id, &no_decay);  // optional: parameter groups
       dp_finalize(dp);
       for each step:
           dp_batch b = { x, row_bytes, rows, y, y_row_bytes };  // rows >= 1
           dp_step(dp, &b, my_forward_backward, my_state, &loss, NULL);
       w = ddp_param_data(dp_replica_context(dp, 0), id);  // the weights
       dp_destroy(dp);

   my_forward_backward(const dp_replica *r, void *user, float *loss) runs on
   replica r->index's thread: its rows are r->input (r->rows of them, r->rows
   may be 0), its weights ddp_param_data(r->ctx, id), its gradients
   ddp_param_grad(r->ctx, id) (ADD into them, scaled by r->grad_scale), and
   it calls ddp_mark_ready(r->ctx, id) (GPU: ddp_mark_ready_stream(r->ctx,
   id, r->stream)) as each gradient is final. With uneven splits, scaling
   the gradient of your per-replica mean loss by r->grad_scale
   (= K * rows_r / rows) makes the average over replicas the mean over the
   whole batch. *loss is your per-replica mean loss; dp_step returns the mean
   over the whole batch (weighted by rows), and each replica's in its last
   argument (an array of K floats, or NULL). With b.output (a host buffer
   of rows x b.output_row_bytes) your callback writes its r->rows rows of
   output at r->output, which points into it.

   The weights: every replica holds the same; read them through replica
   0's context, dp_replica_context(dp, 0), between dp_step calls:
   ddp_param_data gives host memory on the CPU, device memory of replica
   0's GPU otherwise. (ddp.h's collective calls, checkpoints among them,
   need every replica's thread: not through this context.)

   Or pass a NULL batch: each replica loads its own shard (r->input NULL,
   r->grad_scale 1).

   TRAINING SEMANTICS

   Each replica is a ddp.h context, so ddp.h's manual applies (ACCUMULATION,
   OPTIMIZERS, PARAMETER GROUPS, SCHEDULES, LOSS SCALING): the optimizer,
   the schedule (c.ddp.schedule) and loss scaling (c.ddp.loss_scale) come
   from c.ddp; per-parameter options from dp_set_param_options. With loss
   scaling your callback also multiplies its gradients by
   ddp_loss_scale(r->ctx) (the same on every replica); a step with a
   non-finite gradient on any replica is skipped on all. dp_step runs one
   ddp_train_step per replica: without an optimizer (DDP_OPTIM_NONE) the
   gradients accumulate across dp_step calls until dp_zero_grad. Uneven
   inputs (ddp_join) do not apply: dp_step splits one batch.

   ERRORS

   dp_* calls return ddp_result. A failure on one device (your callback
   returned non-zero, a CUDA error, a timeout) stops the step on every device
   and dp_step returns one error; dp_last_error() says which replica and why.
   After that only dp_destroy() is allowed: later calls answer
   DDP_ERROR_INVALID_STATE with that first message. No thread is left
   hanging. Bad arguments (a NULL function, a batch of 0 or fewer rows, a
   batch without input) are refused and change nothing.

   THREAD SAFETY

   A dp_context is used by one thread at a time.

   SECURITY

   The replicas meet through a ddp.h store on 127.0.0.1 (a free port) and
   shared memory handed from replica 0 to the others inside the process.
   dp_create makes a random job secret for them (unless c.ddp.job_secret
   is set), so no other process of the host can join or read their store.
*/
#ifndef DP_H_INCLUDED
#define DP_H_INCLUDED

#if defined(DP_IMPLEMENTATION) && !defined(DDP_IMPLEMENTATION)
#  define DDP_IMPLEMENTATION
#endif
#include "ddp.h"

#ifndef DP_API
#  ifdef DDP_STATIC
#    define DP_API DDP_API
#  else
#    define DP_API extern
#  endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define DP_MAX_DEVICES 64

typedef struct dp_config {
    int         num_devices;  /* K; 0: the length of device_ids, or every GPU, or 2 CPU replicas */
    const int  *device_ids;   /* GPU ids (may repeat); NULL: 0..K-1 (GPU) or K CPU replicas */
    ddp_device  device;       /* DDP_DEVICE_DEFAULT: cuda when built with CUDA and a GPU exists */
    ddp_backend backend;      /* default: nccl for distinct GPUs, staged when a GPU repeats, shm on the CPU */
    ddp_config  ddp;          /* per-replica settings: optimizer, buckets, timeout, logger, allocators */
    int         check_replicas; /* debug: after each optimizer step, verify by checksum that replicas agree */
} dp_config;

typedef struct dp_context dp_context;

/* What a replica's callback gets. */
typedef struct dp_replica {
    int          index;       /* 0..K-1 */
    int          device;      /* GPU id, or -1 for a CPU replica */
    void        *stream;      /* cudaStream_t of this replica (NULL on the CPU) */
    ddp_context *ctx;         /* this replica's context: data, grads, marking */
    const void  *input;       /* this replica's first row (NULL without a batch) */
    const void  *labels;      /* its first label row (NULL if none) */
    void        *output;      /* its first output row on the host (NULL if none) */
    int          row_offset;  /* first row of the global batch */
    int          rows;        /* rows for this replica (may be 0) */
    int          total_rows;  /* rows of the whole batch */
    float        grad_scale;  /* K * rows / total_rows: scale for your gradients */
} dp_replica;

/* A host batch split along its first dimension. */
typedef struct dp_batch {
    const void *input;        /* rows x input_row_bytes */
    size_t      input_row_bytes;
    int         rows;
    const void *labels;       /* optional, rows x labels_row_bytes */
    size_t      labels_row_bytes;
    void       *output;       /* optional host buffer, rows x output_row_bytes, filled by your callback */
    size_t      output_row_bytes;
} dp_batch;

typedef int (*dp_forward_backward_fn)(const dp_replica *r, void *user, float *loss);

DP_API ddp_result  dp_create(const dp_config *config, dp_context **out);
DP_API void        dp_destroy(dp_context *dp);
DP_API const char *dp_last_error(const dp_context *dp);
DP_API int         dp_num_replicas(const dp_context *dp);
DP_API ddp_context *dp_replica_context(dp_context *dp, int replica);

DP_API ddp_result dp_register_param(dp_context *dp, const char *name, size_t count,
                                    ddp_dtype dtype, const void *init, int *out_id);
/* ddp_set_param_options for every replica (before dp_finalize). */
DP_API ddp_result dp_set_param_options(dp_context *dp, int id, const ddp_param_options *options);
DP_API ddp_result dp_finalize(dp_context *dp);

/* One training step: split the batch, run fn on every replica in parallel,
   all-reduce gradients, optimizer step on every replica. *loss (may be NULL)
   is the batch-weighted mean of the replicas' losses; losses (may be NULL)
   receives each replica's loss. */
DP_API ddp_result dp_step(dp_context *dp, const dp_batch *batch, dp_forward_backward_fn fn,
                          void *user, float *loss, float *losses);

/* Zero every replica's gradients (ddp_zero_grad). Gradients accumulate
   until the optimizer step; with config.ddp.optimizer.type DDP_OPTIM_NONE
   (your own optimizer) call this between steps. */
DP_API ddp_result dp_zero_grad(dp_context *dp);

/* 1 if every replica's parameters and optimizer state hold the same bits. */
DP_API ddp_result dp_check_replicas(dp_context *dp, int *identical);

#ifdef __cplusplus
}
#endif
#endif /* DP_H_INCLUDED */

/* ======================================================================== */
#ifdef DP_IMPLEMENTATION
#ifndef DP__IMPLEMENTED
#define DP__IMPLEMENTED

#ifndef DDP__IMPLEMENTED
#  error "dp.h: the implementation needs ddp.h's implementation in the same file: define DP_IMPLEMENTATION (it defines DDP_IMPLEMENTATION) before the first #include of ddp.h or dp.h"
#endif

#ifdef __cplusplus
extern "C" {
#endif

enum { DP__CMD_NONE, DP__CMD_CREATE, DP__CMD_FINALIZE, DP__CMD_STEP, DP__CMD_CHECKSUM, DP__CMD_ZERO, DP__CMD_EXIT };

typedef struct dp__param {
    char name[DDP__MAX_NAME]; size_t count; ddp_dtype dtype; const void *init;
    ddp_param_options options; int has_options;
} dp__param;

typedef struct dp__worker {
    struct dp_context *dp;
    int index;
    ddp__thread thread;
    int started;
    ddp_context *ctx;
    dp_replica rep;
    ddp_result result;
    char err[DDP__ERRLEN];
    float loss;                 /* this replica's own loss in the last step */
    uint64_t checksum;
    int cmd_seen;
} dp__worker;

struct dp_context {
    dp_config cfg;
    int K;
    int devices[DP_MAX_DEVICES];
    int port;
    char secret[65];            /* the replicas' job secret: nobody else joins their store */
    dp__worker w[DP_MAX_DEVICES];
    ddp__mutex mu;
    ddp__cond cv_cmd, cv_done;
    int cmd, cmd_id, pending;
    int failed;                 /* a replica failed in the current command */
    int first_failed;           /* which one failed first */
    int broken;
    char err[DDP__ERRLEN];
    char broke_why[DDP__ERRLEN]; /* the message of the error that broke the context */
    dp__param *params;
    int num_params, cap_params, finalized;
    /* the current step */
    const dp_batch *batch;
    dp_forward_backward_fn fn;
    void *user;
};

DDP__PRINTF(3, 4)
static ddp_result dp__fail(dp_context *dp, ddp_result code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(dp->err, sizeof dp->err, fmt, ap);
    va_end(ap);
    if (dp->cfg.ddp.logger.func) dp->cfg.ddp.logger.func(DDP_LOG_ERROR, 0, dp->err, dp->cfg.ddp.logger.user);
    return code;
}

/* The context is broken by the error just written to dp->err: keep that
   message, which later refusals name (not the last refusal). */
static ddp_result dp__break(dp_context *dp, ddp_result code) {
    if (!dp->broken) memcpy(dp->broke_why, dp->err, sizeof dp->broke_why);
    dp->broken = 1;
    return code;
}

static ddp_result dp__refuse_broken(dp_context *dp, const char *fn) {
    return dp__fail(dp, DDP_ERROR_INVALID_STATE, "%s: the context is broken by an earlier error (%s); only dp_destroy() is allowed", fn,
                    dp->broke_why);
}

/* A failure on one replica: stop the others wherever they wait. */
static void dp__stop_others(dp_context *dp, int self) {
    int i;
    for (i = 0; i < dp->K; i++) {
        ddp_context *c = dp->w[i].ctx;
        if (i == self || !c) continue;
        ddp__set_broken(c, DDP_ERROR_PEER);
        if (c->shm.ctrl) ddp__shm_abort(c, "another replica of this dp context failed");
    }
}

static int dp__cb(ddp_context *ctx, void *user, int micro, float *loss) {
    dp__worker *w = (dp__worker *)user;
    int rc;
    (void)ctx; (void)micro;
    rc = w->dp->fn(&w->rep, w->dp->user, loss);
    w->loss = *loss;
    return rc;
}

static ddp_result dp__run_create(dp__worker *w) {
    dp_context *dp = w->dp;
    ddp_config c = dp->cfg.ddp;
    ddp_context *ctx = NULL;
    ddp_result r;
    c.rank = w->index;
    c.world_size = dp->K;
    c.local_rank = w->index;
    c.local_world_size = dp->K;
    c.master_addr = "127.0.0.1";
    c.master_port = dp->port;
    if (!c.job_secret) c.job_secret = dp->secret;
    c.device = dp->cfg.device;
    c.backend = dp->cfg.backend;
    c.cuda_device = dp->devices[w->index] >= 0 ? dp->devices[w->index] + 1 : 0;
    r = ddp_create(&c, &ctx);
    if (r != DDP_SUCCESS) ddp__copy_str(w->err, sizeof w->err, ddp_create_error());
    ddp__mutex_lock(&dp->mu);   /* dp__stop_others reads it under the lock */
    w->ctx = ctx;
    ddp__mutex_unlock(&dp->mu);
    return r;
}

static ddp_result dp__run_finalize(dp__worker *w) {
    dp_context *dp = w->dp;
    int i, id;
    for (i = 0; i < dp->num_params; i++) {
        DDP__TRY(ddp_register_param(w->ctx, dp->params[i].name, dp->params[i].count, dp->params[i].dtype, dp->params[i].init, &id));
        if (dp->params[i].has_options) DDP__TRY(ddp_set_param_options(w->ctx, id, &dp->params[i].options));
    }
    DDP__TRY(ddp_finalize(w->ctx));
#if defined(DDP_CUDA)
    if (ddp_query_device(w->ctx) == DDP_DEVICE_CUDA) {
        cudaStream_t s;
        if (cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) != cudaSuccess)
            return ddp__fail(w->ctx, DDP_ERROR_CUDA, "replica %d: cannot create its stream", w->index);
        w->rep.stream = s;
        ddp_set_stream(w->ctx, s);
    }
#endif
    return DDP_SUCCESS;
}

static ddp_result dp__run_step(dp__worker *w) {
    dp_context *dp = w->dp;
    const dp_batch *b = dp->batch;
    w->rep.ctx = w->ctx;
    w->rep.input = w->rep.labels = NULL;
    w->rep.output = NULL;
    w->rep.grad_scale = 1.0f;
    w->rep.rows = w->rep.row_offset = w->rep.total_rows = 0;
    if (b) {
        int per = b->rows / dp->K, extra = b->rows % dp->K;
        w->rep.rows = per + (w->index < extra);
        w->rep.row_offset = w->index * per + (w->index < extra ? w->index : extra);
        w->rep.total_rows = b->rows;
        w->rep.input = (const unsigned char *)b->input + (size_t)w->rep.row_offset * b->input_row_bytes;
        if (b->labels) w->rep.labels = (const unsigned char *)b->labels + (size_t)w->rep.row_offset * b->labels_row_bytes;
        if (b->output) w->rep.output = (unsigned char *)b->output + (size_t)w->rep.row_offset * b->output_row_bytes;
        w->rep.grad_scale = b->rows ? (float)((double)dp->K * w->rep.rows / b->rows) : 0.0f;
    }
    w->loss = 0;
    return ddp_train_step(w->ctx, dp__cb, w, 1, NULL);
}

static uint64_t dp__hash(uint64_t h, const void *p, size_t n) {
    const unsigned char *s = (const unsigned char *)p;
    size_t i;
    for (i = 0; i < n; i++) { h ^= s[i]; h *= 0x100000001b3ull; }
    return h;
}

static ddp_result dp__run_checksum(dp__worker *w) {
    ddp_context *c = w->ctx;
    size_t n = ddp_flat_bytes(c);
    uint64_t h = 0xcbf29ce484222325ull;
    void *bufs[4];
    int k;
    bufs[0] = ddp_flat_params(c); bufs[1] = c->opt_m; bufs[2] = c->opt_v; bufs[3] = c->opt_master;
    /* with ZeRO-1 each replica holds its own shard of the state: only the weights agree */
    for (k = 0; k < (c->zero ? 1 : 4); k++) {
        size_t bytes = k == 0 ? n : c->opt_state_bytes;
        void *tmp = NULL;
        const void *view = NULL;
        if (!bufs[k]) continue;
        DDP__TRY(ddp__host_view(c, bufs[k], bytes, &tmp, &view));
        h = dp__hash(h, view, bytes);
        ddp__free(c, tmp);
    }
    w->checksum = h;
    return DDP_SUCCESS;
}

static void *dp__worker_main(void *arg) {
    dp__worker *w = (dp__worker *)arg;
    dp_context *dp = w->dp;
    int seen = 0;
    for (;;) {
        int cmd;
        ddp_result r = DDP_SUCCESS;
        ddp__mutex_lock(&dp->mu);
        while (dp->cmd_id == seen) ddp__cond_wait(&dp->cv_cmd, &dp->mu);
        seen = dp->cmd_id;
        cmd = dp->cmd;
        ddp__mutex_unlock(&dp->mu);
        if (cmd == DP__CMD_EXIT) break;
        w->err[0] = 0;
        switch (cmd) {
        case DP__CMD_CREATE: r = dp__run_create(w); break;
        case DP__CMD_FINALIZE: r = dp__run_finalize(w); break;
        case DP__CMD_STEP: r = dp__run_step(w); break;
        case DP__CMD_CHECKSUM: r = dp__run_checksum(w); break;
        case DP__CMD_ZERO: r = ddp_zero_grad(w->ctx); break;
        default: break;
        }
        if (r != DDP_SUCCESS && w->ctx && !w->err[0]) ddp__copy_str(w->err, sizeof w->err, ddp_last_error(w->ctx));
        ddp__mutex_lock(&dp->mu);
        w->result = r;
        /* the first failure (not a peer's echo of it) stops everybody */
        if (r != DDP_SUCCESS && !dp->failed) { dp->failed = 1; dp->first_failed = w->index; dp__stop_others(dp, w->index); }
        if (--dp->pending == 0) ddp__cond_broadcast(&dp->cv_done);
        ddp__mutex_unlock(&dp->mu);
    }
    return NULL;
}

/* Run cmd on every worker and wait; one error naming the replica. */
static ddp_result dp__broadcast_cmd(dp_context *dp, int cmd, const char *what) {
    int first, i;
    ddp__mutex_lock(&dp->mu);
    dp->cmd = cmd;
    dp->cmd_id++;
    dp->pending = dp->K;
    dp->failed = 0;
    ddp__cond_broadcast(&dp->cv_cmd);
    while (dp->pending > 0) ddp__cond_wait(&dp->cv_done, &dp->mu);
    ddp__mutex_unlock(&dp->mu);
    /* the replica whose own error started it, not the peers it stopped
       (those answer DDP_ERROR_PEER); else the first to fail */
    if (!dp->failed) return DDP_SUCCESS;
    first = dp->first_failed;
    for (i = 0; i < dp->K; i++)
        if (dp->w[i].result != DDP_SUCCESS && dp->w[i].result != DDP_ERROR_PEER) { first = i; break; }
    dp__fail(dp, dp->w[first].result, "%s failed on replica %d (%s %d): %s", what, first,
             dp->devices[first] >= 0 ? "GPU" : "CPU", dp->devices[first] >= 0 ? dp->devices[first] : first, dp->w[first].err);
    return cmd != DP__CMD_CREATE ? dp__break(dp, dp->w[first].result) : dp->w[first].result;
}

DP_API ddp_result dp_create(const dp_config *config, dp_context **out) {
    dp_context *dp;
    int i, gpus = 0;
    ddp_result r;
    if (!out) return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "dp_create: out is NULL");
    *out = NULL;
    if (!config) return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "dp_create: config is NULL");
    dp = (dp_context *)calloc(1, sizeof *dp);
    if (!dp) return ddp__fail(NULL, DDP_ERROR_OUT_OF_MEMORY, "dp_create: out of memory");
    dp->cfg = *config;
#if defined(DDP_CUDA)
    if (cudaGetDeviceCount(&gpus) != cudaSuccess) { (void)cudaGetLastError(); gpus = 0; }
#endif
    if (dp->cfg.device == DDP_DEVICE_DEFAULT) dp->cfg.device = gpus > 0 ? DDP_DEVICE_CUDA : DDP_DEVICE_CPU;
    dp->K = config->num_devices;
    if (dp->K < 0 || dp->K > DP_MAX_DEVICES) { free(dp); return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "dp_create: num_devices %d is not in 0..%d", config->num_devices, DP_MAX_DEVICES); }
    if (dp->K == 0) dp->K = dp->cfg.device == DDP_DEVICE_CUDA ? gpus : 2;
    if (dp->cfg.device == DDP_DEVICE_CUDA && gpus == 0) {
        free(dp);
        return ddp__fail(NULL, DDP_ERROR_UNSUPPORTED, "dp_create: CUDA devices requested but none is available (or this build has no CUDA)");
    }
    for (i = 0; i < dp->K; i++) {
        dp->devices[i] = dp->cfg.device == DDP_DEVICE_CUDA ? (config->device_ids ? config->device_ids[i] : i) : -1;
        if (dp->cfg.device == DDP_DEVICE_CUDA && (dp->devices[i] < 0 || dp->devices[i] >= gpus)) {
            int bad = dp->devices[i];
            free(dp);
            return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "dp_create: device id %d (replica %d) is not a GPU of this machine (%d GPUs)", bad, i, gpus);
        }
    }
    if (dp->cfg.device == DDP_DEVICE_CUDA && dp->cfg.backend == DDP_BACKEND_DEFAULT) {
        int j, repeat = 0;
        for (i = 0; i < dp->K; i++) for (j = 0; j < i; j++) repeat |= dp->devices[i] == dp->devices[j];
#if defined(DDP_NCCL)
        dp->cfg.backend = repeat ? DDP_BACKEND_STAGED : DDP_BACKEND_NCCL;
#else
        (void)repeat;
        dp->cfg.backend = DDP_BACKEND_STAGED;
#endif
    }
    {   /* the replicas' rendezvous store listens on 127.0.0.1: a secret of
           their own keeps other processes of this host out of it */
        unsigned char rnd[32];
        if (ddp__sys_random(rnd, sizeof rnd) != 0) { free(dp); return ddp__fail(NULL, DDP_ERROR_SYSTEM, "dp_create: cannot read random bytes"); }
        ddp__hex(rnd, sizeof rnd, dp->secret);
    }
    dp->port = ddp__free_loopback_port();
    if (!dp->port) { free(dp); return ddp__fail(NULL, DDP_ERROR_NETWORK, "dp_create: no free TCP port on 127.0.0.1 for the replicas' rendezvous"); }
    ddp__mutex_init(&dp->mu);
    ddp__cond_init(&dp->cv_cmd);
    ddp__cond_init(&dp->cv_done);
    for (i = 0; i < dp->K; i++) {
        dp->w[i].dp = dp;
        dp->w[i].index = i;
        dp->w[i].rep.index = i;
        dp->w[i].rep.device = dp->devices[i];
        if (ddp__thread_start(&dp->w[i].thread, dp__worker_main, &dp->w[i]) != 0) {
            dp_destroy(dp);
            return ddp__fail(NULL, DDP_ERROR_SYSTEM, "dp_create: cannot start the thread of replica %d", i);
        }
        dp->w[i].started = 1;
    }
    r = dp__broadcast_cmd(dp, DP__CMD_CREATE, "creating the replicas");
    if (r != DDP_SUCCESS) {
        ddp__copy_str(ddp__create_err, sizeof ddp__create_err, dp->err);
        dp_destroy(dp);
        return r;
    }
    *out = dp;
    return DDP_SUCCESS;
}

DP_API void dp_destroy(dp_context *dp) {
    int i;
    if (!dp) return;
    ddp__mutex_lock(&dp->mu);
    dp->cmd = DP__CMD_EXIT;
    dp->cmd_id++;
    ddp__cond_broadcast(&dp->cv_cmd);
    ddp__mutex_unlock(&dp->mu);
    for (i = 0; i < dp->K; i++) if (dp->w[i].started) ddp__thread_join(&dp->w[i].thread);
    /* replica 0 serves the rendezvous store and waits for the others to hang up: last */
    for (i = dp->K - 1; i >= 0; i--) {
#if defined(DDP_CUDA)
        if (dp->w[i].rep.stream) { cudaSetDevice(dp->devices[i]); cudaStreamDestroy((cudaStream_t)dp->w[i].rep.stream); }
#endif
        ddp_destroy(dp->w[i].ctx);
    }
    ddp__mutex_destroy(&dp->mu);
    ddp__cond_destroy(&dp->cv_cmd);
    ddp__cond_destroy(&dp->cv_done);
    free(dp->params);
    memset(dp->secret, 0, sizeof dp->secret);
    free(dp);
}

DP_API const char *dp_last_error(const dp_context *dp) { return dp ? dp->err : ddp__create_err; }
DP_API int dp_num_replicas(const dp_context *dp) { return dp ? dp->K : 0; }
DP_API ddp_context *dp_replica_context(dp_context *dp, int replica) {
    return dp && replica >= 0 && replica < dp->K ? dp->w[replica].ctx : NULL;
}

DP_API ddp_result dp_register_param(dp_context *dp, const char *name, size_t count, ddp_dtype dtype,
                                    const void *init, int *out_id) {
    int i;
    if (out_id) *out_id = -1; /* on every failure path */
    if (!dp) return DDP_ERROR_INVALID_ARGUMENT;
    if (dp->finalized) return dp__fail(dp, DDP_ERROR_INVALID_STATE, "dp_register_param: '%.64s' registered after dp_finalize()", name ? name : "(null)");
    if (!name || !*name || strlen(name) >= DDP__MAX_NAME) return dp__fail(dp, DDP_ERROR_INVALID_ARGUMENT, "dp_register_param: name is NULL, empty or too long");
    if (!out_id) return dp__fail(dp, DDP_ERROR_INVALID_ARGUMENT, "dp_register_param: out_id is NULL for '%s'", name);
    if (count == 0) return dp__fail(dp, DDP_ERROR_INVALID_ARGUMENT, "dp_register_param: parameter '%s' has 0 elements", name);
    if (dtype == DDP_DTYPE_DEFAULT) dtype = DDP_F32;
    if (dtype != DDP_F32 && dtype != DDP_F64 && dtype != DDP_F16 && dtype != DDP_BF16)
        return dp__fail(dp, DDP_ERROR_INVALID_ARGUMENT, "dp_register_param: parameter '%s' has dtype %d", name, (int)dtype);
    for (i = 0; i < dp->num_params; i++)
        if (!strcmp(dp->params[i].name, name)) return dp__fail(dp, DDP_ERROR_INVALID_ARGUMENT, "dp_register_param: '%s' is already registered", name);
    if (dp->num_params == dp->cap_params) {
        int cap = dp->cap_params ? 2 * dp->cap_params : 16;
        dp__param *np = (dp__param *)realloc(dp->params, (size_t)cap * sizeof *np);
        if (!np) return dp__fail(dp, DDP_ERROR_OUT_OF_MEMORY, "dp_register_param: out of memory");
        dp->params = np;
        dp->cap_params = cap;
    }
    ddp__copy_str(dp->params[dp->num_params].name, DDP__MAX_NAME, name);
    dp->params[dp->num_params].count = count;
    dp->params[dp->num_params].dtype = dtype;
    dp->params[dp->num_params].init = init;
    dp->params[dp->num_params].has_options = 0;
    *out_id = dp->num_params++;
    return DDP_SUCCESS;
}

DP_API ddp_result dp_set_param_options(dp_context *dp, int id, const ddp_param_options *options) {
    const ddp_param_options *o = options;
    if (!dp) return DDP_ERROR_INVALID_ARGUMENT;
    if (id < 0 || id >= dp->num_params) return dp__fail(dp, DDP_ERROR_INVALID_ARGUMENT, "dp_set_param_options: %d is not a parameter id", id);
    if (dp->finalized) return dp__fail(dp, DDP_ERROR_INVALID_STATE, "dp_set_param_options: parameter '%s': options are set before dp_finalize()", dp->params[id].name);
    if (!o) return dp__fail(dp, DDP_ERROR_INVALID_ARGUMENT, "dp_set_param_options: options of parameter '%s' are NULL", dp->params[id].name);
    if (!(o->lr_scale >= 0 && o->lr_scale < HUGE_VAL) || !(o->weight_decay_scale >= 0 && o->weight_decay_scale < HUGE_VAL))
        return dp__fail(dp, DDP_ERROR_INVALID_ARGUMENT, "dp_set_param_options: parameter '%s': lr_scale %g and weight_decay_scale %g must be finite and >= 0",
                        dp->params[id].name, o->lr_scale, o->weight_decay_scale);
    dp->params[id].options = *o;
    dp->params[id].has_options = 1;
    return DDP_SUCCESS;
}

DP_API ddp_result dp_zero_grad(dp_context *dp) {
    if (!dp) return DDP_ERROR_INVALID_ARGUMENT;
    if (dp->broken) return dp__refuse_broken(dp, "dp_zero_grad");
    if (!dp->finalized) return dp__fail(dp, DDP_ERROR_INVALID_STATE, "dp_zero_grad: call dp_finalize() first");
    return dp__broadcast_cmd(dp, DP__CMD_ZERO, "zeroing the gradients");
}

DP_API ddp_result dp_finalize(dp_context *dp) {
    if (!dp) return DDP_ERROR_INVALID_ARGUMENT;
    if (dp->broken) return dp__refuse_broken(dp, "dp_finalize");
    if (dp->finalized) return dp__fail(dp, DDP_ERROR_INVALID_STATE, "dp_finalize: called twice");
    if (dp->num_params == 0) return dp__fail(dp, DDP_ERROR_INVALID_STATE, "dp_finalize: no parameters registered");
    DDP__TRY(dp__broadcast_cmd(dp, DP__CMD_FINALIZE, "finalizing"));
    dp->finalized = 1;
    return DDP_SUCCESS;
}

DP_API ddp_result dp_check_replicas(dp_context *dp, int *identical) {
    int i;
    if (!dp || !identical) return DDP_ERROR_INVALID_ARGUMENT;
    if (!dp->finalized) return dp__fail(dp, DDP_ERROR_INVALID_STATE, "dp_check_replicas: call dp_finalize() first");
    DDP__TRY(dp__broadcast_cmd(dp, DP__CMD_CHECKSUM, "checksumming the replicas"));
    *identical = 1;
    for (i = 1; i < dp->K; i++) if (dp->w[i].checksum != dp->w[0].checksum) *identical = 0;
    return DDP_SUCCESS;
}

DP_API ddp_result dp_step(dp_context *dp, const dp_batch *batch, dp_forward_backward_fn fn, void *user,
                          float *loss, float *losses) {
    int i;
    double sum = 0;
    if (!dp) return DDP_ERROR_INVALID_ARGUMENT;
    if (dp->broken) return dp__refuse_broken(dp, "dp_step");
    if (!dp->finalized) return dp__fail(dp, DDP_ERROR_INVALID_STATE, "dp_step: call dp_finalize() first");
    if (!fn) return dp__fail(dp, DDP_ERROR_INVALID_ARGUMENT, "dp_step: fn is NULL");
    if (batch && batch->rows == 0)
        return dp__fail(dp, DDP_ERROR_INVALID_ARGUMENT, "dp_step: the batch has 0 rows (pass a NULL batch when each replica loads its own shard)");
    if (batch && (batch->rows < 0 || !batch->input || !batch->input_row_bytes))
        return dp__fail(dp, DDP_ERROR_INVALID_ARGUMENT, "dp_step: the batch has %d rows, input %p, input_row_bytes %" DDP__PRIzu "",
                        batch->rows, batch->input, batch->input_row_bytes);
    dp->batch = batch;
    dp->fn = fn;
    dp->user = user;
    DDP__TRY(dp__broadcast_cmd(dp, DP__CMD_STEP, "the training step"));
    /* the mean over the whole batch: each replica's mean weighted by its rows */
    for (i = 0; i < dp->K; i++) {
        if (losses) losses[i] = dp->w[i].loss;
        sum += batch && batch->rows ? (double)dp->w[i].loss * dp->w[i].rep.rows / batch->rows : dp->w[i].loss / dp->K;
    }
    if (loss) *loss = (float)sum;
    if (dp->cfg.check_replicas) {
        int same = 0;
        DDP__TRY(dp_check_replicas(dp, &same));
        if (!same) {
            dp__fail(dp, DDP_ERROR_MISMATCH, "dp_step: the replicas differ after the optimizer step");
            return dp__break(dp, DDP_ERROR_MISMATCH);
        }
    }
    return DDP_SUCCESS;
}

#ifdef __cplusplus
}
#endif
#endif /* DP__IMPLEMENTED */
#endif /* DP_IMPLEMENTATION */
