/* ddp.h - v0.1 - data-parallel training for C and C++ programs
   (DistributedDataParallel for your own forward/backward functions)

   License: MIT, see the end of this file.

   Do this:
       #define DDP_IMPLEMENTATION
   before you include this file in *one* C, C++ or CUDA (.cu) file to create
   the implementation. Every other file includes it without the macro:

       // in ONE .c file (CPU) or ONE .cu file (CUDA, compiled by nvcc):
       #define DDP_IMPLEMENTATION
       #include "ddp.h"

   COMPILE-TIME SWITCHES (define before including the implementation)

       DDP_IMPLEMENTATION   compile the implementation in this translation unit
       DDP_STATIC           make every public function static (private copy)
       DDP_CUDA             GPU support (default: on when __CUDACC__ is defined;
                            define DDP_NO_CUDA to force it off)
       DDP_NCCL             NCCL backend (default: on with DDP_CUDA unless
                            DDP_NO_NCCL is defined)
       DDP_ASSERT(c)        your assert (default: assert from <assert.h>)

   LINK LINES

       Linux, CPU only:   cc  -O2 app.c -lpthread -lrt -lm
       Linux, CUDA:       nvcc -O2 impl.cu app.c -lnccl -lcudart -lpthread -lrt
                          (other files of a C project keep being compiled by
                          their own C compiler: the declarations below have no
                          CUDA types)

   Platforms: Linux and other POSIX systems. The Windows seams (threads,
   shared memory, sockets, processes) are kept in the PLATFORM section but are
   not implemented yet. The platform layer's functions are ddp__proc_*,
   ddp__sys_*, ddp__sock_*, ddp__shm_obj_* and ddp__file_*.

   STEP BY STEP

       1. Fill a ddp_config (zero means default) and call ddp_create(). Rank and
          world size come from the environment that torchrun, ddprun (this
          project's launcher), mpirun or srun set, or from the config.
       2. Register every parameter once, in forward order:
              ddp_register_param(ctx, "fc1.weight", 784*256, DDP_F32, init, &id)
          then call ddp_finalize(ctx): the library allocates one flat parameter
          buffer and one flat gradient buffer, checks that every rank
          registered the same parameters, and copies rank 0's weights to all.
       3. Each step:
              ddp_step_begin(ctx);
              ... your forward ...
              ... your backward: ADD each gradient into ddp_param_grad(ctx, id)
                  and call ddp_mark_ready(ctx, id) as soon as it is final ...
              ddp_step_end(ctx);           // gradients are now averaged
              ddp_optimizer_step(ctx);     // SGD or AdamW from the config
          or let ddp_train_step() do all of it around your function.
       4. ddp_destroy(ctx).

       Gradients accumulate: the library zeroes them at the first step after an
       optimizer step; your backward adds into them (cuBLAS: beta = 1).
       That is what makes gradient accumulation work: call ddp_set_no_sync(ctx, 1)
       for the micro-steps that must only accumulate locally, 0 for the last.

   BACKENDS

       shm     processes on one host through shared memory (Linux: anonymous
               memory that rank 0 hands to the other ranks over a Unix socket,
               so no name exists in /dev/shm; elsewhere: named POSIX segments,
               see SECURITY). The CPU default. The flat gradient buffer lives
               in the shared segment,
               so an all-reduce of gradients copies nothing in or out: every
               rank reduces its own slice of every rank's buffer and writes the
               result back to all of them.
       nccl    one GPU per process (CUDA builds). Default when parameters live
               on the GPU.
       staged  GPU buffers reduced through the shm backend (device to host,
               reduce, host to device). For machines without NCCL and for
               several ranks on one GPU.

   BUCKETS

       Parameters are packed into buckets in reverse registration order
       (backward produces the last layer's gradients first). The first bucket
       closes at config.first_bucket_bytes (1 MiB), later ones at
       config.bucket_bytes (25 MiB); one element type per bucket; every
       parameter starts at a 256-byte aligned offset. When every parameter of
       a bucket is marked ready, the bucket is handed to the communication
       thread (or stream), strictly in bucket order, so communication overlaps
       the rest of your backward.

   ERRORS

       Every call that can fail returns a ddp_result (0 success, negative
       error). ddp_result_string() names the code, ddp_last_error(ctx) holds
       the detailed message of the last failure (what, which parameter, which
       rank). Nothing exits or aborts on a mistake of yours. Every wait has a
       timeout (config.timeout_s): a rank that dies makes the others fail with
       DDP_ERROR_PEER or DDP_ERROR_TIMEOUT instead of hanging. After such an
       error the context is broken: only ddp_destroy() is allowed.
       DDP_ERROR_MISMATCH also reports another job on the rendezvous port
       and ranks built from different ddp.h versions; DDP_ERROR_SECURITY a
       job secret that differs, store tampering, or shared memory that is
       not this job's (see SECURITY).

   WHEN A RANK DIES

       Whatever ends a rank (SIGKILL, SIGTERM, a crash), at whatever instant,
       the others fail within config.timeout_s with an error naming it,
       mostly within milliseconds: they watch its process (same host), its
       store connection (rank 0), and a rank that gives up during the
       rendezvous or ddp_finalize tells the others why through the store at
       once. Nothing is left behind: shared memory has no name (or, named,
       is removed by ddprun and by the next rank 0 on the host), checkpoint
       temporaries have none while they are written (see
       ddp_save_checkpoint), and ddprun ends each rank's process group.
       tests/fault.c kills ranks at random instants; docs/RELIABILITY.md has
       its figures.

   SECURITY

       Rank 0 runs the rendezvous store (a TCPStore) on MASTER_PORT. It
       listens only on the master address (loopback when MASTER_ADDR is
       loopback or unset), not on every interface, unless config.store_bind
       or DDP_STORE_BIND says otherwise ("*": every interface). A master
       address that is loopback on rank 0's host while the job spans hosts
       is an error naming the remedy.

       The job secret (config.job_secret, DDP_JOB_SECRET; ddprun makes a new
       one per run) is what lets a process into the job: the store answers
       nothing to a client that has not proven it knows the secret
       (challenge-response with HMAC-SHA-256 over fresh random nonces of
       both sides, so the secret itself never travels), logs each rejected
       client (logger, DDP_LOG_WARN), and a rank whose secret differs fails
       with DDP_ERROR_SECURITY saying so. The secret proves membership; it
       does not encrypt: keep it out of logs and out of other users' reach
       (the environment of a process is readable by its user and root).
       Without a secret, anyone who can reach the port can read and write
       the job's keys; the checks below then catch mistakes and tampering,
       not a determined attacker on the host.

       Ranks compare identity records at rendezvous: library version (the
       major.minor of this header), world size, job secret present or not,
       and the job id (config.job_id, DDP_JOB_ID, else the launcher's:
       TORCHELASTIC_RUN_ID, SLURM_JOB_ID.SLURM_STEP_ID, Open MPI's
       OMPI_MCA_ess_base_jobid or PMIX_NAMESPACE). A difference fails both
       sides at once: "port P is used by another job", or "rank 1 runs
       ddp.h 0.1 but rank 0 runs ddp.h 0.2". So do two processes claiming
       one rank. With a secret, a client that cannot prove it is turned
       away without ending the job (it is a stranger). Two jobs without
       secret and without any job id cannot be told apart: set DDP_JOB_ID.

       What a rank reads from the store and then trusts is checked. Shared
       memory: handed over a Unix socket whose peer must be rank 0's pid
       and this user; the memory must be this user's, mode 0600, of the
       expected size, and carry rank 0's random per-context nonce in its
       header (read before it is mapped). Keys the library writes once
       (shared-memory references, parameter tables, the NCCL id, identity
       records) are refused by rank 0's store when anyone changes them, and
       read back before the store closes: a change fails the job with
       DDP_ERROR_SECURITY, "store tampering: ... key '...'". Text where a
       counter belongs gets an error naming the key.

       torchrun's agent store speaks PyTorch's protocol, which has no
       authentication: under it the secret cannot be checked (a warning is
       logged), keys are read back but not protected, and a stranger on the
       network can still read or change them.

       Store limits (named constants in the implementation, each with why):
       keys 4 KiB; values 16 MiB (a parameter table of 160 thousand
       parameters); 4096 keys per WAIT/CHECK/MULTI request; memory 256 MiB
       in all (config.store_max_bytes, DDP_STORE_MAX_BYTES, at least 64
       MiB); unread replies 16 MiB + 64 KiB per connection (a client that
       does not read is dropped); 2 x world + 64 connections (at the cap
       the oldest silent one is evicted); a connection silent for 10 s, or
       a request not complete 30 s after it started, is dropped; at most
       10 log lines a second about clients. Rank 0's ddp_destroy waits at
       most 0.9 s for ranks still connected, never for strangers.

   THREAD SAFETY

       A context is used by one thread at a time (the library runs its own
       communication thread inside). Different contexts are independent.
       The logger may be called from the library's own threads too (the
       communication thread; on rank 0, the store's thread, about clients
       it rejects): make it thread-safe.

   ENVIRONMENT

       RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT
                                    torchrun / ddprun
       TORCHELASTIC_USE_AGENT_STORE TORCHELASTIC_RESTART_COUNT
                                    torchrun's agent store (client mode)
       OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE, PMI_RANK/PMI_SIZE
                                    mpirun
       SLURM_PROCID SLURM_NTASKS SLURM_LOCALID SLURM_NTASKS_PER_NODE
                                    srun
       DDP_TIMEOUT                  overrides config.timeout_s (seconds)
       DDP_BACKEND                  shm | nccl | staged (overrides the default)
       DDP_JOB_SECRET               the job secret, 16 to 1024 characters, the same
                                    on every rank (config.job_secret; ddprun sets one)
       DDP_JOB_ID                   the job's name (config.job_id; ddprun sets one)
       TORCHELASTIC_RUN_ID SLURM_JOB_ID SLURM_STEP_ID OMPI_MCA_ess_base_jobid
       PMIX_NAMESPACE               the launcher's job id, when DDP_JOB_ID is unset
       DDP_STORE_BIND               where rank 0's store listens (config.store_bind;
                                    default the master address; "*" every interface)
       DDP_STORE_MAX_BYTES          the store's memory cap in bytes
                                    (config.store_max_bytes; default 256 MiB)
       DDP_FORCE_COMM=1             GPU, world of one: run the gradient collective
                                    anyway (by default a world of one exchanges
                                    nothing; the GPU tests use this to exercise NCCL)
*/
/* The implementation uses POSIX and a few GNU calls (shm_open, pthreads,
   sockets): ask for them before the first system header. A file that defines
   DDP_IMPLEMENTATION includes ddp.h first (or compiles with -D_GNU_SOURCE). */
#if defined(DDP_IMPLEMENTATION) && !defined(_WIN32) && !defined(_GNU_SOURCE)
#  define _GNU_SOURCE 1
#endif

#ifndef DDP_H_INCLUDED
#define DDP_H_INCLUDED

#include <stddef.h>
#include <stdint.h>

#ifndef DDP_API
#  ifdef DDP_STATIC
#    if defined(__GNUC__) || defined(__clang__)
#      define DDP_API static __attribute__((unused)) /* a private copy need not use everything */
#    else
#      define DDP_API static
#    endif
#  else
#    define DDP_API extern
#  endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define DDP_VERSION_MAJOR 0
#define DDP_VERSION_MINOR 1

/* ---- results ------------------------------------------------------------ */

typedef enum ddp_result {
    DDP_SUCCESS                =   0,
    DDP_ERROR_INVALID_ARGUMENT =  -1, /* a null pointer, a bad size, a bad enum */
    DDP_ERROR_INVALID_STATE    =  -2, /* call not allowed now (e.g. register after finalize) */
    DDP_ERROR_OUT_OF_MEMORY    =  -3,
    DDP_ERROR_TIMEOUT          =  -4, /* a wait passed config.timeout_s */
    DDP_ERROR_PEER             =  -5, /* another rank failed, exited or aborted */
    DDP_ERROR_MISMATCH         =  -6, /* ranks disagree (parameters, shapes, dtypes) */
    DDP_ERROR_IO               =  -7, /* file error (checkpoints, data) */
    DDP_ERROR_CORRUPT          =  -8, /* checksum or format error in a checkpoint */
    DDP_ERROR_NETWORK          =  -9, /* connect, listen, protocol errors */
    DDP_ERROR_ENVIRONMENT      = -10, /* a bad environment variable */
    DDP_ERROR_SYSTEM           = -11, /* an operating-system call failed */
    DDP_ERROR_CUDA             = -12,
    DDP_ERROR_NCCL             = -13,
    DDP_ERROR_UNSUPPORTED      = -14, /* not available in this build or setup */
    DDP_ERROR_USER             = -15, /* your callback returned an error */
    DDP_ERROR_SECURITY         = -16  /* a job secret that differs, store tampering, shared
                                         memory that is not this job's (see SECURITY) */
} ddp_result;

/* The name of a result code ("DDP_ERROR_TIMEOUT"); never NULL. */
DDP_API const char *ddp_result_string(ddp_result r);

/* ---- enums (0 always means "default") ----------------------------------- */

typedef enum ddp_dtype {
    DDP_DTYPE_DEFAULT = 0, /* f32 */
    DDP_F32,
    DDP_F64,
    DDP_F16,               /* storage only: reduced and updated in f32 */
    DDP_BF16,              /* storage only: reduced and updated in f32 */
    DDP_I32,               /* for ddp_allreduce of counters; not for parameters */
    DDP_DTYPE_COUNT_
} ddp_dtype;

/* Bytes of one element, 0 for an unknown type. */
DDP_API size_t ddp_dtype_size(ddp_dtype t);
DDP_API const char *ddp_dtype_name(ddp_dtype t);

typedef enum ddp_op {
    DDP_OP_DEFAULT = 0, /* sum */
    DDP_OP_SUM,
    DDP_OP_AVG,
    DDP_OP_MAX,
    DDP_OP_MIN
} ddp_op;

typedef enum ddp_backend {
    DDP_BACKEND_DEFAULT = 0, /* nccl for GPU parameters when built with NCCL, else shm */
    DDP_BACKEND_SHM,
    DDP_BACKEND_NCCL,
    DDP_BACKEND_STAGED
} ddp_backend;

typedef enum ddp_device {
    DDP_DEVICE_DEFAULT = 0, /* cuda when built with CUDA and a GPU exists, else cpu */
    DDP_DEVICE_CPU,
    DDP_DEVICE_CUDA
} ddp_device;

typedef enum ddp_optimizer {
    DDP_OPTIM_NONE = 0, /* ddp_optimizer_step() is an error */
    DDP_OPTIM_SGD,
    DDP_OPTIM_ADAMW
} ddp_optimizer;

typedef enum ddp_log_level {
    DDP_LOG_ERROR = 0,
    DDP_LOG_WARN,
    DDP_LOG_INFO,
    DDP_LOG_DEBUG
} ddp_log_level;

/* ---- callbacks ------------------------------------------------------------ */

typedef struct ddp_allocator {
    void *(*alloc)(size_t size, void *user);   /* NULL: malloc */
    void  (*free)(void *ptr, void *user);
    void  *user;
} ddp_allocator;

typedef struct ddp_device_allocator {          /* GPU memory; NULL: cudaMalloc */
    void *(*alloc)(size_t size, void *user);
    void  (*free)(void *ptr, void *user);
    void  *user;
} ddp_device_allocator;

typedef struct ddp_logger {                    /* silent when func is NULL */
    void (*func)(ddp_log_level level, int rank, const char *message, void *user);
    void  *user;
    ddp_log_level level;                       /* highest level passed on (default ERROR) */
} ddp_logger;

/* ---- configuration -------------------------------------------------------- */

typedef struct ddp_optimizer_desc {
    ddp_optimizer type;
    float lr;            /* default 1e-3 */
    float momentum;      /* SGD; 0 = plain SGD */
    int   nesterov;      /* SGD; needs momentum > 0 */
    float weight_decay;  /* SGD: added to the gradient; AdamW: decoupled */
    float beta1;         /* AdamW, default 0.9 */
    float beta2;         /* AdamW, default 0.999 */
    float eps;           /* AdamW, default 1e-8 */
    float max_grad_norm; /* > 0: clip by global norm before each step */
} ddp_optimizer_desc;

typedef struct ddp_config {
    /* Who am I. world_size 0: read the environment (torchrun/ddprun, MPI,
       Slurm). world_size > 0: use rank, local_rank and local_world_size
       below (local_world_size 0 means world_size: one host). */
    int rank;
    int world_size;
    int local_rank;
    int local_world_size;
    const char *master_addr;  /* NULL: MASTER_ADDR, else 127.0.0.1 */
    int master_port;          /* 0: MASTER_PORT, else 29500 */

    /* Who may join (see SECURITY). job_secret: at least 16 characters that
       every rank of the job, and nobody else, knows (NULL: DDP_JOB_SECRET;
       ddprun sets one per job). job_id: a name of the job, the same on
       every rank (NULL: DDP_JOB_ID, else the launcher's job id). store_bind:
       the address rank 0's store listens on (NULL: DDP_STORE_BIND, else
       master_addr; "*" every interface). store_max_bytes: memory the store
       may hold (0: DDP_STORE_MAX_BYTES, else 256 MiB; at least 64 MiB). */
    const char *job_secret;
    const char *job_id;
    const char *store_bind;
    size_t store_max_bytes;

    ddp_backend backend;
    ddp_device  device;       /* where parameters and gradients live */
    int cuda_device;          /* 0: LOCAL_RANK; n > 0: device n - 1 */

    double timeout_s;         /* every wait; default 300 (env DDP_TIMEOUT) */
    double connect_timeout_s; /* rendezvous; default timeout_s */

    size_t first_bucket_bytes;/* default 1 MiB */
    size_t bucket_bytes;      /* default 25 MiB */
    int    gradient_sum;      /* 1: leave the sum, not the average */
    int    allow_unused_parameters; /* 1: a parameter never marked is reduced as it is (zero) */
    ddp_dtype compress;       /* GPU: all-reduce gradients in DDP_BF16 or DDP_F16 */
    int    no_comm_thread;    /* 1: reduce buckets inline in ddp_step_end (no overlap) */
    size_t staging_bytes;     /* shm: per-rank staging for user buffers, default 16 MiB;
                                 with named segments, less when /dev/shm is small
                                 (logged); anonymous ones are only backed where used */

    ddp_optimizer_desc optimizer;

    ddp_allocator        allocator;
    ddp_device_allocator device_allocator;
    ddp_logger           logger;
} ddp_config;

typedef struct ddp_context ddp_context;

/* ---- context -------------------------------------------------------------- */

/* Rendezvous with the other ranks and set up the backend. On failure *out is
   NULL and the message is passed to the logger and kept for
   ddp_create_error(). */
DDP_API ddp_result  ddp_create(const ddp_config *config, ddp_context **out);
DDP_API void        ddp_destroy(ddp_context *ctx);
/* The message of the last failed ddp_create() in this thread. */
DDP_API const char *ddp_create_error(void);
/* The message of the last failure on ctx ("" if none). */
DDP_API const char *ddp_last_error(const ddp_context *ctx);
/* The configuration in force, every default filled in. */
DDP_API ddp_config  ddp_query_config(const ddp_context *ctx);
/* The defaults ddp_create() would use for this config, without the
   environment (rank/world are left as given). */
DDP_API ddp_config  ddp_config_defaults(const ddp_config *config);

DDP_API int ddp_rank(const ddp_context *ctx);
DDP_API int ddp_world_size(const ddp_context *ctx);
DDP_API int ddp_local_rank(const ddp_context *ctx);
DDP_API int ddp_local_world_size(const ddp_context *ctx);
DDP_API ddp_backend ddp_query_backend(const ddp_context *ctx);
DDP_API ddp_device  ddp_query_device(const ddp_context *ctx);
DDP_API const char *ddp_backend_name(ddp_backend b);

/* ---- collectives on your own buffers -------------------------------------- */
/* Blocking. Buffers are host memory on CPU contexts and may be device memory
   on CUDA contexts (then the call synchronises its stream). Not allowed
   between ddp_step_begin() and ddp_step_end(). */

DDP_API ddp_result ddp_barrier(ddp_context *ctx);
DDP_API ddp_result ddp_allreduce(ddp_context *ctx, void *buf, size_t count,
                                 ddp_dtype dtype, ddp_op op);
DDP_API ddp_result ddp_broadcast(ddp_context *ctx, void *buf, size_t count,
                                 ddp_dtype dtype, int root);
/* recv holds world_size * count elements, rank r's at r * count. */
DDP_API ddp_result ddp_allgather(ddp_context *ctx, const void *send, void *recv,
                                 size_t count, ddp_dtype dtype);
/* send holds world_size * count elements; rank r receives the reduction of
   everyone's block r. */
DDP_API ddp_result ddp_reduce_scatter(ddp_context *ctx, const void *send, void *recv,
                                      size_t count, ddp_dtype dtype, ddp_op op);

/* ---- parameters ----------------------------------------------------------- */

/* Register one parameter (in forward order, before ddp_finalize). init, if
   not NULL, holds count elements of dtype copied in at finalize (rank 0's
   values win); NULL means zeros. *out_id receives the parameter's id. */
DDP_API ddp_result ddp_register_param(ddp_context *ctx, const char *name, size_t count,
                                      ddp_dtype dtype, const void *init, int *out_id);
/* Same with a shape (ndim <= 8); the shape is checked across ranks too. */
DDP_API ddp_result ddp_register_param_shape(ddp_context *ctx, const char *name, int ndim,
                                            const int64_t *shape, ddp_dtype dtype,
                                            const void *init, int *out_id);
/* Allocate flat storage, check every rank registered the same parameters,
   broadcast rank 0's weights. */
DDP_API ddp_result ddp_finalize(ddp_context *ctx);
/* Broadcast rank 0's current weights again (after you initialised them in
   place through ddp_param_data, say). */
DDP_API ddp_result ddp_sync_params(ddp_context *ctx);

DDP_API int         ddp_param_count(const ddp_context *ctx);
DDP_API void       *ddp_param_data(ddp_context *ctx, int id);  /* NULL before finalize */
DDP_API void       *ddp_param_grad(ddp_context *ctx, int id);
DDP_API size_t      ddp_param_numel(const ddp_context *ctx, int id);
DDP_API const char *ddp_param_name(const ddp_context *ctx, int id);
DDP_API int         ddp_param_bucket(const ddp_context *ctx, int id);
DDP_API int         ddp_bucket_count(const ddp_context *ctx);
/* Byte range of bucket b inside the flat gradient buffer. */
DDP_API ddp_result  ddp_bucket_info(const ddp_context *ctx, int b, size_t *offset_bytes,
                                    size_t *size_bytes, ddp_dtype *dtype, int *num_params);
DDP_API size_t      ddp_param_offset(const ddp_context *ctx, int id); /* bytes into the flat buffers */
DDP_API void       *ddp_flat_params(ddp_context *ctx);
DDP_API void       *ddp_flat_grads(ddp_context *ctx);
DDP_API size_t      ddp_flat_bytes(const ddp_context *ctx);

/* ---- the step ------------------------------------------------------------- */

DDP_API ddp_result ddp_step_begin(ddp_context *ctx);
/* Gradient of parameter id is final for this step. CPU: call after writing
   it. */
DDP_API ddp_result ddp_mark_ready(ddp_context *ctx, int id);
/* CUDA: the gradient is final once the work queued so far on stream (a
   cudaStream_t, NULL for the legacy default stream) completes. */
DDP_API ddp_result ddp_mark_ready_stream(ddp_context *ctx, int id, void *stream);
/* Wait for every bucket (CPU) or make the stream wait (CUDA, no host sync):
   the gradients then hold the average over ranks and accumulated steps. */
DDP_API ddp_result ddp_step_end(ddp_context *ctx);
DDP_API ddp_result ddp_step_end_stream(ddp_context *ctx, void *stream);
/* 1: the following steps only accumulate locally; the first step with 0
   reduces the sum of all of them. */
DDP_API ddp_result ddp_set_no_sync(ddp_context *ctx, int no_sync);
/* CUDA: the stream (a cudaStream_t; NULL, the default, is the legacy
   default stream) your forward/backward runs on. Zeroing gradients at the
   start of a step, the end-of-step wait of ddp_step_end() and the optimizer
   run on it. */
DDP_API ddp_result ddp_set_stream(ddp_context *ctx, void *stream);
/* CUDA: block until every queued collective finished (with the timeout). */
DDP_API ddp_result ddp_synchronize(ddp_context *ctx);

/* ---- optimizer ------------------------------------------------------------ */

/* Clip, then apply config.optimizer to every parameter; the next step
   starts from zero gradients. */
DDP_API ddp_result ddp_optimizer_step(ddp_context *ctx);
/* The global L2 norm of the gradients; scaled down to max_norm if larger
   (max_norm <= 0: measure only). */
DDP_API ddp_result ddp_clip_grad_norm(ddp_context *ctx, float max_norm, float *out_norm);
DDP_API ddp_result ddp_set_lr(ddp_context *ctx, float lr);
DDP_API ddp_result ddp_zero_grad(ddp_context *ctx);
DDP_API int64_t    ddp_optimizer_steps(const ddp_context *ctx);

/* ---- the step wrapper ------------------------------------------------------ */

/* Your forward and backward for one micro-step: add gradients into
   ddp_param_grad() buffers, call ddp_mark_ready() (or _stream) for each, and
   store the micro-step's loss. Return 0 on success; anything else aborts
   the step with DDP_ERROR_USER. */
typedef int (*ddp_forward_backward_fn)(ddp_context *ctx, void *user, int micro_step,
                                       float *loss);

/* micro_steps (0 means 1) calls of fn, all but the last without sync; then
   gradients averaged, optimizer step, and *out_loss (may be NULL) = the loss
   averaged over micro-steps and ranks. */
DDP_API ddp_result ddp_train_step(ddp_context *ctx, ddp_forward_backward_fn fn, void *user,
                                  int micro_steps, float *out_loss);

/* ---- checkpoints ----------------------------------------------------------- */

/* Rank 0 writes parameters and optimizer state atomically (a temporary
   file, fsync, rename; with a checksum); all ranks wait for it. The
   temporary has no name while it is written where the file system allows
   it (Linux O_TMPFILE), and "PATH.tmp.<host>.<pid>" only for the instant
   before the rename; temporaries of writers that no longer run on this
   host are removed by the next save. A killed writer leaves the old file
   or the new one, whole. */
DDP_API ddp_result ddp_save_checkpoint(ddp_context *ctx, const char *path);
/* Every rank reads the file, verifies checksum, names, shapes and dtypes. */
DDP_API ddp_result ddp_load_checkpoint(ddp_context *ctx, const char *path);

#ifdef __cplusplus
}
#endif
#endif /* DDP_H_INCLUDED */

/* ======================================================================== */
/*                              IMPLEMENTATION                              */
/* ======================================================================== */
#ifdef DDP_IMPLEMENTATION
#ifndef DDP__IMPLEMENTED
#define DDP__IMPLEMENTED

/* ---- switches -------------------------------------------------------------- */

#if defined(__CUDACC__) && !defined(DDP_NO_CUDA) && !defined(DDP_CUDA)
#  define DDP_CUDA 1
#endif
#if defined(DDP_CUDA) && !defined(DDP_NO_NCCL) && !defined(DDP_NCCL)
#  define DDP_NCCL 1
#endif
#if defined(DDP_CUDA) && !defined(__CUDACC__)
#  error "ddp.h: DDP_CUDA needs the implementation file to be compiled by nvcc (a .cu file)"
#endif

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdarg.h>
#include <math.h>
#include <errno.h>
#include <limits.h>

#if defined(_WIN32)
#  error "ddp.h: the Windows platform layer (threads, shared memory, sockets) is not written yet"
#endif
#include <unistd.h>
#include <pthread.h>
#include <time.h>
#include <fcntl.h>
#include <signal.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <netdb.h>
#include <poll.h>
#include <dirent.h>
#include <sys/un.h>
#include <sys/uio.h>
#include <sys/statvfs.h>
#if defined(__linux__)
#  include <sys/syscall.h>
#endif

#ifndef DDP_ASSERT
#  include <assert.h>
#  define DDP_ASSERT(c) assert(c)
#endif

#if defined(DDP_CUDA)
#  include <cuda_runtime.h>
#  if defined(DDP_NCCL)
#    include <nccl.h>
#  endif
#  ifndef DDP_KERNELS_IMPLEMENTATION
#    define DDP_KERNELS_IMPLEMENTATION
#  endif
#  include "ddp_kernels.cuh"
#endif

#if defined(__cplusplus)
#  define DDP__TLS thread_local
#elif defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
#  define DDP__TLS _Thread_local
#else
#  define DDP__TLS __thread
#endif

/* Atomics on shared memory: the GCC/Clang builtins work in C99, C++ and for
   nvcc's host compiler alike. */
#define DDP__LOAD_ACQ(p)      __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define DDP__STORE_REL(p, v)  __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define DDP__FETCH_ADD(p, v)  __atomic_fetch_add((p), (v), __ATOMIC_ACQ_REL)

#if defined(__x86_64__) || defined(__i386__)
#  define DDP__PAUSE() __builtin_ia32_pause()
#elif defined(__aarch64__)
#  define DDP__PAUSE() __asm__ __volatile__("yield")
#else
#  define DDP__PAUSE() ((void)0)
#endif

#define DDP__ALIGN       256u               /* parameter offsets in flat buffers */
#define DDP__CACHELINE   128u
#define DDP__MAX_NAME    128
#define DDP__MAX_NDIM    8
#define DDP__ERRLEN      1024

#ifdef __cplusplus
extern "C" {
#endif

static size_t ddp__align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

static double ddp__now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void ddp__sleep_us(long us) {
    struct timespec ts;
    ts.tv_sec = us / 1000000;
    ts.tv_nsec = (us % 1000000) * 1000;
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) { }
}

static void ddp__copy_str(char *dst, size_t cap, const char *src) {
    size_t n = strlen(src);
    if (n >= cap) n = cap - 1;
    memcpy(dst, src, n);
    dst[n] = 0;
}

/* ---- SHA-256 and HMAC-SHA-256 (FIPS 180-4, RFC 2104) ------------------------------

   Portable C: the job secret is proven with HMAC-SHA-256 challenge-response
   (see SECURITY in the manual), and the RFC 4231 vectors in
   tests/test_security.c hold this code to the standard. */

typedef struct ddp__sha256 {
    uint32_t h[8];
    uint64_t len;              /* bytes hashed so far */
    unsigned char buf[64];
    size_t fill;
} ddp__sha256;

static const uint32_t ddp__sha256_k[64] = {
    0x428a2f98u, 0x71374491u, 0xb5c0fbcfu, 0xe9b5dba5u, 0x3956c25bu, 0x59f111f1u, 0x923f82a4u, 0xab1c5ed5u,
    0xd807aa98u, 0x12835b01u, 0x243185beu, 0x550c7dc3u, 0x72be5d74u, 0x80deb1feu, 0x9bdc06a7u, 0xc19bf174u,
    0xe49b69c1u, 0xefbe4786u, 0x0fc19dc6u, 0x240ca1ccu, 0x2de92c6fu, 0x4a7484aau, 0x5cb0a9dcu, 0x76f988dau,
    0x983e5152u, 0xa831c66du, 0xb00327c8u, 0xbf597fc7u, 0xc6e00bf3u, 0xd5a79147u, 0x06ca6351u, 0x14292967u,
    0x27b70a85u, 0x2e1b2138u, 0x4d2c6dfcu, 0x53380d13u, 0x650a7354u, 0x766a0abbu, 0x81c2c92eu, 0x92722c85u,
    0xa2bfe8a1u, 0xa81a664bu, 0xc24b8b70u, 0xc76c51a3u, 0xd192e819u, 0xd6990624u, 0xf40e3585u, 0x106aa070u,
    0x19a4c116u, 0x1e376c08u, 0x2748774cu, 0x34b0bcb5u, 0x391c0cb3u, 0x4ed8aa4au, 0x5b9cca4fu, 0x682e6ff3u,
    0x748f82eeu, 0x78a5636fu, 0x84c87814u, 0x8cc70208u, 0x90befffau, 0xa4506cebu, 0xbef9a3f7u, 0xc67178f2u
};

#define DDP__ROR32(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void ddp__sha256_block(ddp__sha256 *s, const unsigned char *p) {
    uint32_t w[64], a, b, c, d, e, f, g, h, t1, t2;
    int i;
    for (i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | (uint32_t)p[4 * i + 3];
    for (i = 16; i < 64; i++) {
        uint32_t s0 = DDP__ROR32(w[i - 15], 7) ^ DDP__ROR32(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = DDP__ROR32(w[i - 2], 17) ^ DDP__ROR32(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = s->h[0]; b = s->h[1]; c = s->h[2]; d = s->h[3];
    e = s->h[4]; f = s->h[5]; g = s->h[6]; h = s->h[7];
    for (i = 0; i < 64; i++) {
        t1 = h + (DDP__ROR32(e, 6) ^ DDP__ROR32(e, 11) ^ DDP__ROR32(e, 25)) + ((e & f) ^ (~e & g)) + ddp__sha256_k[i] + w[i];
        t2 = (DDP__ROR32(a, 2) ^ DDP__ROR32(a, 13) ^ DDP__ROR32(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    s->h[0] += a; s->h[1] += b; s->h[2] += c; s->h[3] += d;
    s->h[4] += e; s->h[5] += f; s->h[6] += g; s->h[7] += h;
}

static void ddp__sha256_init(ddp__sha256 *s) {
    static const uint32_t iv[8] = { 0x6a09e667u, 0xbb67ae85u, 0x3c6ef372u, 0xa54ff53au,
                                    0x510e527fu, 0x9b05688cu, 0x1f83d9abu, 0x5be0cd19u };
    memcpy(s->h, iv, sizeof iv);
    s->len = 0;
    s->fill = 0;
}

static void ddp__sha256_update(ddp__sha256 *s, const void *data, size_t n) {
    const unsigned char *p = (const unsigned char *)data;
    s->len += n;
    while (n > 0) {
        size_t take = 64 - s->fill < n ? 64 - s->fill : n;
        memcpy(s->buf + s->fill, p, take);
        s->fill += take;
        p += take;
        n -= take;
        if (s->fill == 64) { ddp__sha256_block(s, s->buf); s->fill = 0; }
    }
}

static void ddp__sha256_final(ddp__sha256 *s, unsigned char out[32]) {
    uint64_t bits = s->len * 8;
    unsigned char pad = 0x80, zero = 0, lenb[8];
    int i;
    ddp__sha256_update(s, &pad, 1);
    while (s->fill != 56) ddp__sha256_update(s, &zero, 1);
    for (i = 0; i < 8; i++) lenb[i] = (unsigned char)(bits >> (56 - 8 * i));
    ddp__sha256_update(s, lenb, 8);
    for (i = 0; i < 8; i++) {
        out[4 * i] = (unsigned char)(s->h[i] >> 24);
        out[4 * i + 1] = (unsigned char)(s->h[i] >> 16);
        out[4 * i + 2] = (unsigned char)(s->h[i] >> 8);
        out[4 * i + 3] = (unsigned char)s->h[i];
    }
}

/* HMAC-SHA-256 of the concatenation of up to 3 parts (NULL parts skipped). */
static void ddp__hmac_sha256(const void *key, size_t klen, const void *m1, size_t n1, const void *m2, size_t n2,
                             const void *m3, size_t n3, unsigned char out[32]) {
    unsigned char k[64], pad[64], inner[32];
    ddp__sha256 s;
    int i;
    memset(k, 0, sizeof k);
    if (klen > 64) { ddp__sha256_init(&s); ddp__sha256_update(&s, key, klen); ddp__sha256_final(&s, k); }
    else if (klen) memcpy(k, key, klen);
    for (i = 0; i < 64; i++) pad[i] = (unsigned char)(k[i] ^ 0x36);
    ddp__sha256_init(&s);
    ddp__sha256_update(&s, pad, 64);
    if (m1) ddp__sha256_update(&s, m1, n1);
    if (m2) ddp__sha256_update(&s, m2, n2);
    if (m3) ddp__sha256_update(&s, m3, n3);
    ddp__sha256_final(&s, inner);
    for (i = 0; i < 64; i++) pad[i] = (unsigned char)(k[i] ^ 0x5c);
    ddp__sha256_init(&s);
    ddp__sha256_update(&s, pad, 64);
    ddp__sha256_update(&s, inner, 32);
    ddp__sha256_final(&s, out);
}

/* Equal without an early exit, so the time taken says nothing about where
   a forged proof first differs. */
static int ddp__ct_equal(const unsigned char *a, const unsigned char *b, size_t n) {
    unsigned d = 0;
    size_t i;
    for (i = 0; i < n; i++) d |= (unsigned)(a[i] ^ b[i]);
    return d == 0;
}

static void ddp__hex(const unsigned char *p, size_t n, char *out) {
    static const char digits[] = "0123456789abcdef";
    size_t i;
    for (i = 0; i < n; i++) { out[2 * i] = digits[p[i] >> 4]; out[2 * i + 1] = digits[p[i] & 15]; }
    out[2 * n] = 0;
}

/* ---- platform: processes, randomness, local sockets, shared-memory objects -------

   Small functions, one OS idea each, so that a Win32 body can sit beside
   the POSIX one. They report failure with -1 and errno (or a returned
   errno value where the comment says so) and never touch a context:
   everything that decides what is trusted sits above them. */

static int ddp__proc_self(void) { return (int)getpid(); }
static unsigned ddp__proc_uid(void) { return (unsigned)geteuid(); }

/* 1: the process exists (a zombie too), 0: it does not, on this host. */
static int ddp__proc_alive(int pid) {
    if (pid <= 0) return 1;
    if (kill((pid_t)pid, 0) == 0) return 1;
    return errno == ESRCH ? 0 : 1; /* EPERM: it exists, owned by someone else */
}

static void ddp__proc_hostname(char *out, size_t cap) {
    if (gethostname(out, cap) != 0) ddp__copy_str(out, cap, "?");
    out[cap - 1] = 0;
}

/* n bytes from the kernel's random generator; 0 on success. */
static int ddp__sys_random(void *buf, size_t n) {
    unsigned char *p = (unsigned char *)buf;
    int fd;
#if defined(__linux__) && defined(SYS_getrandom)
    while (n > 0) {
        long r = syscall(SYS_getrandom, p, n, 0);
        if (r > 0) { p += r; n -= (size_t)r; continue; }
        if (r < 0 && errno == EINTR) continue;
        break; /* ENOSYS (old kernel, seccomp): /dev/urandom below */
    }
    if (n == 0) return 0;
#endif
    fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    while (n > 0) {
        ssize_t r = read(fd, p, n);
        if (r > 0) { p += r; n -= (size_t)r; continue; }
        if (r < 0 && errno == EINTR) continue;
        close(fd);
        errno = r == 0 ? EIO : errno;
        return -1;
    }
    close(fd);
    return 0;
}

static void ddp__fd_close(int fd) { if (fd >= 0) close(fd); }

/* Local sockets handing shared memory to the ranks of this host. Linux:
   the abstract namespace, so the name exists nowhere on disk and dies with
   its socket. Elsewhere these fail with ENOSYS and the named fallback of
   the shared-memory layer is used. Names are "@ddp-<pid>-<32 hex>". */
#if defined(__linux__)
static socklen_t ddp__sock_local_addr(const char *name, struct sockaddr_un *a) {
    size_t n = strlen(name);
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    if (n < 2 || name[0] != '@' || n > sizeof a->sun_path - 1) return 0;
    memcpy(a->sun_path + 1, name + 1, n - 1); /* sun_path[0] = 0: abstract */
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
}
#endif

static int ddp__sock_local_listen(char *name, size_t cap, int *fd_out) {
#if defined(__linux__)
    struct sockaddr_un a;
    unsigned char rnd[16];
    char hex[33];
    socklen_t len;
    int fd;
    *fd_out = -1;
    if (ddp__sys_random(rnd, sizeof rnd) != 0) return -1;
    ddp__hex(rnd, sizeof rnd, hex);
    snprintf(name, cap, "@ddp-%d-%s", ddp__proc_self(), hex);
    len = ddp__sock_local_addr(name, &a);
    if (!len) { errno = ENAMETOOLONG; return -1; }
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    if (bind(fd, (struct sockaddr *)&a, len) != 0 || listen(fd, 1024) != 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    *fd_out = fd;
    return 0;
#else
    (void)name; (void)cap; *fd_out = -1;
    errno = ENOSYS;
    return -1;
#endif
}

static int ddp__sock_local_accept(int lfd) {
#if defined(__linux__)
    return accept4(lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
#else
    (void)lfd; errno = ENOSYS; return -1;
#endif
}

static int ddp__sock_local_connect(const char *name, int *fd_out) {
#if defined(__linux__)
    struct sockaddr_un a;
    socklen_t len = ddp__sock_local_addr(name, &a);
    int fd;
    *fd_out = -1;
    if (!len) { errno = EINVAL; return -1; }
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    while (connect(fd, (struct sockaddr *)&a, len) != 0) {
        int e = errno;
        if (e == EINTR) continue;
        close(fd);
        errno = e;
        return -1;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    *fd_out = fd;
    return 0;
#else
    (void)name; *fd_out = -1; errno = ENOSYS; return -1;
#endif
}

/* The process at the other end of a local socket (the kernel's word, not
   the peer's). */
static int ddp__sock_peer(int fd, int *pid, unsigned *uid) {
#if defined(__linux__) && defined(SO_PEERCRED)
    struct ucred cr;
    socklen_t len = sizeof cr;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &len) != 0) return -1;
    *pid = (int)cr.pid;
    *uid = (unsigned)cr.uid;
    return 0;
#else
    (void)fd; *pid = 0; *uid = 0; errno = ENOSYS; return -1;
#endif
}

/* Wait up to ms for any of n local sockets to be readable; ready[i] set
   for those that are (or closed). */
static void ddp__sock_local_wait(const int *fds, int n, int ms, int *ready) {
    struct pollfd pf[65];
    int i;
    if (n > 65) n = 65;
    for (i = 0; i < n; i++) { pf[i].fd = fds[i]; pf[i].events = POLLIN; pf[i].revents = 0; }
    if (poll(pf, (nfds_t)n, ms) < 0) for (i = 0; i < n; i++) pf[i].revents = 0;
    for (i = 0; i < n; i++) ready[i] = pf[i].revents != 0;
}

/* Read what is there without waiting: > 0 bytes, 0 nothing yet, -1 closed
   or failed. */
static long ddp__sock_local_read(int fd, void *buf, size_t n) {
    ssize_t got = recv(fd, buf, n, MSG_DONTWAIT);
    if (got > 0) return (long)got;
    if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return 0;
    return -1;
}

/* Send all n bytes (a few dozen, into an empty socket); 0 ok. */
static int ddp__sock_local_write(int fd, const void *buf, size_t n) {
    return send(fd, buf, n, MSG_NOSIGNAL) == (ssize_t)n ? 0 : -1;
}

/* Does every address the name stands for belong to the loopback interface? */
static int ddp__sock_addr_is_loopback(const char *host) {
    struct addrinfo hints, *res = NULL, *ai;
    int all = 1;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, NULL, &hints, &res) != 0) return 0;
    for (ai = res; ai; ai = ai->ai_next) {
        if (ai->ai_family == AF_INET) {
            const struct sockaddr_in *a = (const struct sockaddr_in *)(const void *)ai->ai_addr;
            if ((ntohl(a->sin_addr.s_addr) >> 24) != 127) all = 0;
        } else if (ai->ai_family == AF_INET6) {
            const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)(const void *)ai->ai_addr;
            if (!IN6_IS_ADDR_LOOPBACK(&a->sin6_addr)) all = 0;
        } else {
            all = 0;
        }
    }
    freeaddrinfo(res);
    return all;
}

/* One status byte, with a descriptor attached when fd >= 0. */
static int ddp__sock_send_fd(int sock, int fd, unsigned char status) {
    struct msghdr m;
    struct iovec iov;
    union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int))]; } ctl;
    memset(&m, 0, sizeof m);
    memset(&ctl, 0, sizeof ctl);
    iov.iov_base = &status;
    iov.iov_len = 1;
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    if (fd >= 0) {
        struct cmsghdr *c;
        m.msg_control = ctl.buf;
        m.msg_controllen = sizeof ctl.buf;
        c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    for (;;) {
        ssize_t w = sendmsg(sock, &m, MSG_NOSIGNAL);
        if (w == 1) return 0;
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct pollfd p;
            p.fd = sock; p.events = POLLOUT; p.revents = 0;
            if (poll(&p, 1, 1000) <= 0) return -1; /* one byte into an empty socket: never long */
            continue;
        }
        return -1;
    }
}

/* Receive what ddp__sock_send_fd sent, waiting until deadline (ddp__now
   seconds). *fd_out is -1 when no descriptor came. 0 ok; -1 error/timeout
   (errno ETIMEDOUT), or the peer closed (errno ECONNRESET). */
static int ddp__sock_recv_fd(int sock, double deadline, unsigned char *status, int *fd_out) {
    *fd_out = -1;
    for (;;) {
        struct msghdr m;
        struct iovec iov;
        union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int) * 4)]; } ctl;
        struct cmsghdr *c;
        ssize_t r;
        memset(&m, 0, sizeof m);
        iov.iov_base = status;
        iov.iov_len = 1;
        m.msg_iov = &iov;
        m.msg_iovlen = 1;
        m.msg_control = ctl.buf;
        m.msg_controllen = sizeof ctl.buf;
#if defined(MSG_CMSG_CLOEXEC)
        r = recvmsg(sock, &m, MSG_CMSG_CLOEXEC);
#else
        r = recvmsg(sock, &m, 0);
#endif
        if (r == 1) {
            for (c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
                if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                    size_t k, n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                    for (k = 0; k < n; k++) {
                        int got;
                        memcpy(&got, CMSG_DATA(c) + k * sizeof(int), sizeof(int));
                        if (*fd_out < 0) *fd_out = got;
                        else close(got); /* more than asked for: never kept */
                    }
                }
            }
            return 0;
        }
        if (r == 0) { errno = ECONNRESET; return -1; }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            struct pollfd p;
            double left = deadline - ddp__now();
            if (left <= 0) { errno = ETIMEDOUT; return -1; }
            p.fd = sock; p.events = POLLIN; p.revents = 0;
            poll(&p, 1, left > 0.1 ? 100 : (int)(left * 1000) + 1);
            continue;
        }
        return -1;
    }
}

/* Shared-memory objects. Anonymous ones (Linux memfd) have no name at
   all: the memory goes with its last descriptor and mapping, whatever kills
   the processes. Named ones (POSIX shm_open, /dev/shm) are the fallback
   where memfd is missing; their names can outlive a killed creator (see
   ddp__shm_sweep_dead). */
static int ddp__shm_obj_anon(size_t bytes, int *fd_out) {
#if defined(__linux__) && defined(SYS_memfd_create)
    int fd, flags = 1 /* MFD_CLOEXEC */;
#  if defined(MFD_ALLOW_SEALING)
    flags |= MFD_ALLOW_SEALING;
#  endif
    *fd_out = -1;
    fd = (int)syscall(SYS_memfd_create, "ddp", flags);
    if (fd < 0) return -1;
    /* owner only, as a named segment would be; the receivers check it */
    if (fchmod(fd, 0600) != 0 || ftruncate(fd, (off_t)bytes) != 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
#  if defined(F_ADD_SEALS) && defined(F_SEAL_SHRINK) && defined(F_SEAL_GROW)
    /* no rank can shrink it under the others (a SIGBUS for them) */
    fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW);
#  endif
    *fd_out = fd;
    return 0;
#else
    (void)bytes; *fd_out = -1; errno = ENOSYS; return -1;
#endif
}

static int ddp__shm_obj_create_named(const char *name, size_t bytes, int *fd_out) {
    int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
    *fd_out = -1;
    if (fd < 0) return -1;
    fcntl(fd, F_SETFD, fcntl(fd, F_GETFD) | FD_CLOEXEC);
    if (fchmod(fd, 0600) != 0 || ftruncate(fd, (off_t)bytes) != 0) {
        int e = errno;
        close(fd);
        shm_unlink(name);
        errno = e;
        return -1;
    }
    *fd_out = fd;
    return 0;
}

static int ddp__shm_obj_open_named(const char *name, int *fd_out) {
    int fd = shm_open(name, O_RDWR, 0);
    *fd_out = fd;
    if (fd < 0) return -1;
    fcntl(fd, F_SETFD, fcntl(fd, F_GETFD) | FD_CLOEXEC);
    return 0;
}

static void ddp__shm_obj_unlink(const char *name) { shm_unlink(name); }

/* Back [0, bytes) with memory now, so that a full /dev/shm or a memory
   limit is an error here and not a SIGBUS later. Returns an errno value
   (0 ok; file systems that cannot preallocate count as ok). */
static int ddp__shm_obj_reserve(int fd, size_t bytes) {
    int e;
    if (bytes == 0) return 0;
    do e = posix_fallocate(fd, 0, (off_t)bytes); while (e == EINTR);
    return e == EOPNOTSUPP || e == EINVAL ? 0 : e;
}

static int ddp__shm_obj_stat(int fd, unsigned *uid, unsigned *mode, size_t *size) {
    struct stat sb;
    if (fstat(fd, &sb) != 0) return -1;
    *uid = (unsigned)sb.st_uid;
    *mode = (unsigned)(sb.st_mode & 07777);
    *size = (size_t)sb.st_size;
    return 0;
}

static void *ddp__shm_obj_map(int fd, size_t bytes, int writable) {
    void *p = mmap(NULL, bytes, PROT_READ | (writable ? PROT_WRITE : 0), MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? NULL : p;
}

static void ddp__shm_obj_unmap(void *p, size_t bytes) { if (p) munmap(p, bytes); }

/* The first n bytes of an object, without mapping it: a receiver looks at
   a segment's header before it lets the memory into its address space.
   (Where the OS cannot read() such objects, a read-only view.) 0 ok. */
static int ddp__shm_obj_peek(int fd, void *buf, size_t n) {
#if defined(__linux__)
    ssize_t r;
    do r = pread(fd, buf, n, 0); while (r < 0 && errno == EINTR);
    if (r == (ssize_t)n) return 0;
    if (r >= 0) errno = EIO;
    return -1;
#else
    void *p = ddp__shm_obj_map(fd, n, 0);
    if (!p) return -1;
    memcpy(buf, p, n);
    ddp__shm_obj_unmap(p, n);
    return 0;
#endif
}

/* Private memory shared with nobody (a world of one). */
static void *ddp__shm_obj_map_private(size_t bytes) {
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

/* Bytes free where named segments live; -1 when unknown. */
static long long ddp__shm_named_free(void) {
#if defined(__linux__)
    struct statvfs v;
    if (statvfs("/dev/shm", &v) != 0) return -1;
    return (long long)v.f_bavail * (long long)v.f_frsize;
#else
    return -1;
#endif
}

/* Checkpoint temporaries. The file is written unnamed where the file
   system allows it (Linux O_TMPFILE): a writer killed while writing leaves
   nothing. It gets a name, "<path>.tmp.<host>.<pid>", only once complete,
   for the instant before it is renamed over <path>; a writer killed in that
   instant (or writing where O_TMPFILE is missing) leaves a temporary that
   the next save in the directory removes (ddp__file_sweep_tmp), as every
   temporary of a writer that no longer runs on this host. */
typedef struct ddp__tmpfile {
    FILE *f;
    int   unnamed;        /* no name yet (O_TMPFILE) */
    int   named;          /* tmp exists on disk */
    char  tmp[4200];
} ddp__tmpfile;

static int ddp__tmp_dir_of(const char *path, char *dir, size_t cap) {
    const char *slash = strrchr(path, '/');
    size_t n;
    if (!slash) { ddp__copy_str(dir, cap, "."); return 0; }
    n = (size_t)(slash - path);
    if (n == 0) n = 1;
    if (n >= cap) return -1;
    memcpy(dir, path, n);
    dir[n] = 0;
    return 0;
}

/* Remove the temporaries of <path> left by writers (this host's) that no
   longer exist. Returns how many. */
static int ddp__file_sweep_tmp(const char *path) {
    char dir[4096], host[256], prefix[1200], full[4400];
    const char *base = strrchr(path, '/');
    DIR *d;
    struct dirent *e;
    size_t pl;
    int n = 0;
    base = base ? base + 1 : path;
    if (ddp__tmp_dir_of(path, dir, sizeof dir) != 0 || strlen(base) > 1000) return 0;
    ddp__proc_hostname(host, sizeof host);
    snprintf(prefix, sizeof prefix, "%s.tmp.", base);
    pl = strlen(prefix);
    d = opendir(dir);
    if (!d) return 0;
    while ((e = readdir(d)) != NULL) {
        const char *rest, *dot;
        char *end;
        long pid;
        struct stat sb;
        if (strncmp(e->d_name, prefix, pl) != 0) continue;
        rest = e->d_name + pl;
        dot = strrchr(rest, '.');
        if (!dot || (size_t)(dot - rest) != strlen(host) || strncmp(rest, host, strlen(host)) != 0) continue;
        pid = strtol(dot + 1, &end, 10);
        if (end == dot + 1 || *end || pid <= 0 || ddp__proc_alive((int)pid)) continue;
        snprintf(full, sizeof full, "%s/%s", dir, e->d_name);
        if (lstat(full, &sb) != 0 || !S_ISREG(sb.st_mode) || sb.st_uid != geteuid()) continue;
        if (unlink(full) == 0) n++;
    }
    closedir(d);
    return n;
}

/* A temporary for path, opened for writing. 0, or an errno value. */
static int ddp__file_tmp_open(ddp__tmpfile *t, const char *path) {
    char host[256];
    int fd = -1;
    memset(t, 0, sizeof *t);
    ddp__proc_hostname(host, sizeof host);
    if (snprintf(t->tmp, sizeof t->tmp, "%s.tmp.%s.%d", path, host, ddp__proc_self()) >= (int)sizeof t->tmp) return ENAMETOOLONG;
#if defined(__linux__) && defined(O_TMPFILE)
    {
        char dir[4096];
        if (ddp__tmp_dir_of(path, dir, sizeof dir) == 0 && access("/proc/self/fd", X_OK) == 0)
            fd = open(dir, O_TMPFILE | O_WRONLY | O_CLOEXEC, 0644);
        if (fd >= 0) t->unnamed = 1;
    }
#endif
    if (fd < 0) {
        unlink(t->tmp); /* this process's own, from an earlier failed attempt */
        fd = open(t->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (fd < 0) return errno;
        t->named = 1;
    }
    t->f = fdopen(fd, "wb");
    if (!t->f) {
        int e = errno;
        close(fd);
        if (t->named) unlink(t->tmp);
        t->named = 0;
        return e;
    }
    return 0;
}

/* The complete (flushed, synced) temporary gets its name, just before the
   rename: 0, or an errno value. */
static int ddp__file_tmp_name(ddp__tmpfile *t) {
#if defined(__linux__) && defined(O_TMPFILE)
    if (t->unnamed) {
        char self[64];
        snprintf(self, sizeof self, "/proc/self/fd/%d", fileno(t->f));
        unlink(t->tmp);
        if (linkat(AT_FDCWD, self, AT_FDCWD, t->tmp, AT_SYMLINK_FOLLOW) != 0) return errno;
        t->unnamed = 0;
        t->named = 1;
    }
#else
    (void)t;
#endif
    return 0;
}

/* After a failure: nothing of the temporary stays. */
static void ddp__file_tmp_discard(ddp__tmpfile *t) {
    if (t->named) unlink(t->tmp);
    t->named = 0;
}

/* Make a rename in path's directory durable. */
static void ddp__file_sync_dir(const char *path) {
    char dir[4096];
    int fd;
    if (ddp__tmp_dir_of(path, dir, sizeof dir) != 0) return;
    fd = open(dir, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) { fsync(fd); close(fd); }
}

/* Named segments are called "/ddp-<creator pid>-...": remove those whose
   creator no longer exists on this host (a rank killed in the window
   before its segment's name was removed), and only ours (same owner).
   Returns how many were removed. */
static int ddp__shm_sweep_dead(void) {
#if defined(__linux__)
    DIR *d = opendir("/dev/shm");
    struct dirent *e;
    int n = 0;
    if (!d) return 0;
    while ((e = readdir(d)) != NULL) {
        char path[300], *end;
        struct stat sb;
        long pid;
        if (strncmp(e->d_name, "ddp-", 4) != 0) continue;
        pid = strtol(e->d_name + 4, &end, 10);
        if (end == e->d_name + 4 || *end != '-' || pid <= 0) continue;
        if (ddp__proc_alive((int)pid)) continue;
        snprintf(path, sizeof path, "/dev/shm/%s", e->d_name);
        if (lstat(path, &sb) != 0 || sb.st_uid != geteuid() || !S_ISREG(sb.st_mode)) continue;
        if (unlink(path) == 0) n++;
    }
    closedir(d);
    return n;
#else
    return 0;
#endif
}

/* ---- results ------------------------------------------------------------------ */

DDP_API const char *ddp_result_string(ddp_result r) {
    switch (r) {
    case DDP_SUCCESS:                return "DDP_SUCCESS";
    case DDP_ERROR_INVALID_ARGUMENT: return "DDP_ERROR_INVALID_ARGUMENT";
    case DDP_ERROR_INVALID_STATE:    return "DDP_ERROR_INVALID_STATE";
    case DDP_ERROR_OUT_OF_MEMORY:    return "DDP_ERROR_OUT_OF_MEMORY";
    case DDP_ERROR_TIMEOUT:          return "DDP_ERROR_TIMEOUT";
    case DDP_ERROR_PEER:             return "DDP_ERROR_PEER";
    case DDP_ERROR_MISMATCH:         return "DDP_ERROR_MISMATCH";
    case DDP_ERROR_IO:               return "DDP_ERROR_IO";
    case DDP_ERROR_CORRUPT:          return "DDP_ERROR_CORRUPT";
    case DDP_ERROR_NETWORK:          return "DDP_ERROR_NETWORK";
    case DDP_ERROR_ENVIRONMENT:      return "DDP_ERROR_ENVIRONMENT";
    case DDP_ERROR_SYSTEM:           return "DDP_ERROR_SYSTEM";
    case DDP_ERROR_CUDA:             return "DDP_ERROR_CUDA";
    case DDP_ERROR_NCCL:             return "DDP_ERROR_NCCL";
    case DDP_ERROR_UNSUPPORTED:      return "DDP_ERROR_UNSUPPORTED";
    case DDP_ERROR_USER:             return "DDP_ERROR_USER";
    case DDP_ERROR_SECURITY:         return "DDP_ERROR_SECURITY";
    }
    return "DDP_ERROR_UNKNOWN";
}

DDP_API size_t ddp_dtype_size(ddp_dtype t) {
    switch (t) {
    case DDP_DTYPE_DEFAULT: case DDP_F32: case DDP_I32: return 4;
    case DDP_F64: return 8;
    case DDP_F16: case DDP_BF16: return 2;
    default: return 0;
    }
}

DDP_API const char *ddp_dtype_name(ddp_dtype t) {
    switch (t) {
    case DDP_DTYPE_DEFAULT: case DDP_F32: return "f32";
    case DDP_F64: return "f64";
    case DDP_F16: return "f16";
    case DDP_BF16: return "bf16";
    case DDP_I32: return "i32";
    default: return "unknown";
    }
}

DDP_API const char *ddp_backend_name(ddp_backend b) {
    switch (b) {
    case DDP_BACKEND_DEFAULT: return "default";
    case DDP_BACKEND_SHM: return "shm";
    case DDP_BACKEND_NCCL: return "nccl";
    case DDP_BACKEND_STAGED: return "staged";
    }
    return "unknown";
}

/* 16-bit float conversions for the CPU paths (round to nearest even). */
static float ddp__bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static uint16_t ddp__f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static float ddp__f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    float f;
    if (exp == 0) {
        if (man == 0) u = sign;
        else { /* subnormal: normalise */
            exp = 1;
            while (!(man & 0x400u)) { man <<= 1; exp--; }
            man &= 0x3ffu;
            u = sign | ((exp + 112u) << 23) | (man << 13);
        }
    } else if (exp == 31) u = sign | 0x7f800000u | (man << 13);
    else u = sign | ((exp + 112u) << 23) | (man << 13);
    memcpy(&f, &u, 4);
    return f;
}
static uint16_t ddp__f32_to_f16(float f) {
    uint32_t u, sign, man;
    int exp;
    memcpy(&u, &f, 4);
    sign = (u >> 16) & 0x8000u;
    exp = (int)((u >> 23) & 0xffu) - 127 + 15;
    man = u & 0x7fffffu;
    if (((u >> 23) & 0xffu) == 0xffu) return (uint16_t)(sign | 0x7c00u | (man ? 0x200u : 0u));
    if (exp >= 31) return (uint16_t)(sign | 0x7c00u);
    if (exp <= 0) {
        uint32_t shift, half, rem, r;
        if (exp < -10) return (uint16_t)sign;
        man |= 0x800000u;
        shift = (uint32_t)(14 - exp);
        r = man >> shift;
        rem = man & ((1u << shift) - 1u);
        half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1u))) r++;
        return (uint16_t)(sign | r);
    }
    {
        uint32_t r = ((uint32_t)exp << 10) | (man >> 13), rem = man & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r++; /* may carry into exp: correct */
        return (uint16_t)(sign | r);
    }
}

/* ---- identity records (see "job identity" below) ---- */

/* The library version as ranks compare it: major * 1000 + minor. A test
   builds one rank with another value to play an old binary. */
#ifndef DDP__WIRE_VERSION
#define DDP__WIRE_VERSION (DDP_VERSION_MAJOR * 1000 + DDP_VERSION_MINOR)
#endif
#define DDP__IDENT_MAX     512 /* bytes of an identity record, with room for job id and host name */
#define DDP__JOB_ID_MAX    64  /* a longer job id is cut (it only has to differ between jobs) */
#define DDP__SECRET_MIN    16  /* characters: shorter secrets are guessable */
#define DDP__SECRET_MAX    1024

typedef struct ddp__ident {
    int version, world, rank, secret, pid;
    unsigned uid;
    char job[DDP__JOB_ID_MAX + 1];   /* "-": none */
    char host[DDP__JOB_ID_MAX + 1];
    char nonce[33];                  /* rank 0: the context's shared-memory nonce (hex); else "-" */
} ddp__ident;

/* ---- the context ------------------------------------------------------------- */

typedef struct ddp__param {
    char      name[DDP__MAX_NAME];
    size_t    numel;
    ddp_dtype dtype;
    int       ndim;
    int64_t   shape[DDP__MAX_NDIM];
    const void *init;
    size_t    offset;   /* bytes into the flat buffers */
    int       bucket;
    int       marked;   /* in this step */
    void     *stream;   /* CUDA: the stream it was marked on */
    int       evrec;    /* CUDA: its ready event was recorded for this bucket launch */
} ddp__param;

typedef struct ddp__bucket {
    size_t    offset;   /* bytes into the flat buffers */
    size_t    bytes;    /* padded span of the bucket */
    size_t    numel;    /* elements in the span (bytes / dtype size) */
    ddp_dtype dtype;
    int       num_params;
    int       pending;  /* parameters not yet marked this step */
    int       launched;
} ddp__bucket;

struct ddp__shm_ctrl;
struct ddp__store_server;
struct ddp__cuda_state;
typedef struct ddp__backend_ops ddp__backend_ops;

/* The shared-memory communicator: one control segment with per-rank
   counters and staging, and (after finalize) one segment holding every
   rank's flat gradient buffer. */
typedef struct ddp__shm {
    struct ddp__shm_ctrl *ctrl;
    size_t   ctrl_bytes;
    char     ctrl_name[64];      /* named fallback: the name until it is removed */
    unsigned char *staging;      /* world * staging_bytes */
    size_t   staging_bytes;      /* per rank */
    unsigned char *grads;        /* world * grad_stride, after the segment's header page */
    unsigned char *grads_base;   /* the mapping */
    size_t   grads_bytes;        /* of the mapping */
    size_t   grad_stride;
    char     grads_name[64];
    int      named;              /* segments are named (/dev/shm) instead of anonymous */
    unsigned char nonce[16];     /* rank 0's random per-context nonce, in every segment header */
    uint64_t seq;                /* collectives issued by this rank */
    uint64_t half_last[2];       /* seq that last wrote each staging half */
} ddp__shm;

struct ddp_context {
    ddp_config cfg;
    int rank, world, local_rank, local_world;
    int broken;                  /* a collective failed: only destroy is allowed (atomic) */
    char err[DDP__ERRLEN];
    char comm_err[DDP__ERRLEN];  /* written by the communication thread, under err_mu */
    pthread_mutex_t err_mu;

    /* rendezvous */
    struct ddp__store_server *server;
    void    *store;              /* ddp__store*, NULL for world 1 */
    char     key_prefix[96];
    char     addr[256];
    int      agent_store;
    int      from_env;           /* rank and world came from the environment */
    unsigned char secret[DDP__SECRET_MAX]; /* the job secret (wiped at destroy) */
    size_t   secret_len;
    char     job_id[DDP__JOB_ID_MAX + 1];
    char     bind[256];          /* where rank 0's store listens ("" every interface) */
    char     ident[DDP__IDENT_MAX + 1]; /* this rank's identity record */
    ddp__ident peer0;            /* rank 0's identity (pid, host, nonce) */
    int     *rank_pid;           /* rank 0 under torchrun: every rank's pid, from its identity record */
    int      npinned;            /* keys this rank wrote once: re-read before the store goes */
    char     pinned[8][48];
    unsigned char pinned_hash[8][32];

    const ddp__backend_ops *ops;
    ddp__shm shm;

    /* parameters */
    ddp__param *params;
    int      num_params, cap_params;
    int      finalized;
    ddp__bucket *buckets;
    int      num_buckets;
    size_t   flat_bytes;
    unsigned char *flat_params;
    unsigned char *flat_grads;   /* host: points into shm.grads for shm */
    int      owns_flat_grads;

    /* the step */
    int      in_step;
    int      no_sync;
    int      accum_steps;        /* micro-steps accumulated since the last reduce */
    int      next_bucket;        /* next bucket to launch, in order */
    int      grads_dirty;        /* gradients hold data: don't zero at begin */

    /* communication thread */
    pthread_t comm_thread;
    int      comm_started;
    pthread_mutex_t mu;
    pthread_cond_t  cv_work, cv_done;
    int      q_head, q_tail;     /* buckets queued: [q_head, q_tail) in launch order */
    int      q_stop;
    int      q_busy;
    ddp_result q_err;
    int      *queue;             /* num_buckets entries */
    double   q_scale;            /* 1 / (world * micro-steps) of the step in progress */
    int      q_micro;            /* micro-steps reduced by the step in progress */

    /* optimizer */
    int64_t  opt_steps;
    void     *opt_m, *opt_v, *opt_master; /* same layout as the flat buffer, state type per bucket */
    size_t   opt_state_bytes;
    size_t   *opt_state_off;      /* per bucket: byte offset into the state buffers */

    struct ddp__cuda_state *cuda;
};

static DDP__TLS char ddp__create_err[DDP__ERRLEN];

static void ddp__log(const ddp_context *ctx, ddp_log_level lvl, const char *msg) {
    if (ctx && ctx->cfg.logger.func && lvl <= ctx->cfg.logger.level)
        ctx->cfg.logger.func(lvl, ctx->rank, msg, ctx->cfg.logger.user);
}

/* The error buffer of the calling thread: the communication thread keeps
   its own, copied into ctx->err when the step collects its result. */
static char *ddp__errbuf(ddp_context *ctx) {
    int on_comm = ctx->comm_started && pthread_equal(pthread_self(), ctx->comm_thread);
    return on_comm ? ctx->comm_err : ctx->err;
}

#if defined(__GNUC__)
__attribute__((format(printf, 3, 4)))
#endif
static ddp_result ddp__fail(ddp_context *ctx, ddp_result code, const char *fmt, ...) {
    char buf[DDP__ERRLEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (ctx) {
        char *dst = ddp__errbuf(ctx);
        if (dst == ctx->comm_err) {   /* another thread may be reading it */
            pthread_mutex_lock(&ctx->err_mu);
            memcpy(dst, buf, sizeof buf);
            pthread_mutex_unlock(&ctx->err_mu);
        } else {
            memcpy(dst, buf, sizeof buf);
        }
        ddp__log(ctx, DDP_LOG_ERROR, buf);
    } else {
        memcpy(ddp__create_err, buf, sizeof buf);
    }
    return code;
}

/* A copy of the communication thread's last error ("" if none). */
static void ddp__comm_error(ddp_context *ctx, char *out, size_t cap) {
    pthread_mutex_lock(&ctx->err_mu);
    ddp__copy_str(out, cap, ctx->comm_err);
    pthread_mutex_unlock(&ctx->err_mu);
}

DDP_API const char *ddp_create_error(void) { return ddp__create_err; }
DDP_API const char *ddp_last_error(const ddp_context *ctx) { return ctx ? ctx->err : "ctx is NULL"; }

static void *ddp__alloc(const ddp_context *ctx, size_t n) {
    if (ctx->cfg.allocator.alloc) return ctx->cfg.allocator.alloc(n, ctx->cfg.allocator.user);
    return malloc(n);
}
static void *ddp__calloc(const ddp_context *ctx, size_t n) {
    void *p = ddp__alloc(ctx, n ? n : 1);
    if (p) memset(p, 0, n);
    return p;
}
static void ddp__free(const ddp_context *ctx, void *p) {
    if (!p) return;
    if (ctx->cfg.allocator.free) ctx->cfg.allocator.free(p, ctx->cfg.allocator.user);
    else free(p);
}

/* ---- configuration and environment ------------------------------------------- */

DDP_API ddp_config ddp_config_defaults(const ddp_config *in) {
    ddp_config c;
    const char *t;
    if (in) c = *in; else memset(&c, 0, sizeof c);
    if (c.timeout_s <= 0) {
        c.timeout_s = 300.0;
        t = getenv("DDP_TIMEOUT");
        if (t && *t) { char *end; double v = strtod(t, &end); if (*end == 0 && v > 0) c.timeout_s = v; }
    }
    if (c.connect_timeout_s <= 0) c.connect_timeout_s = c.timeout_s;
    if (c.first_bucket_bytes == 0) c.first_bucket_bytes = (size_t)1 << 20;
    if (c.bucket_bytes == 0) c.bucket_bytes = (size_t)25 << 20;
    if (c.staging_bytes == 0) c.staging_bytes = (size_t)16 << 20;
    if (c.optimizer.lr == 0) c.optimizer.lr = 1e-3f;
    if (c.optimizer.beta1 == 0) c.optimizer.beta1 = 0.9f;
    if (c.optimizer.beta2 == 0) c.optimizer.beta2 = 0.999f;
    if (c.optimizer.eps == 0) c.optimizer.eps = 1e-8f;
    return c;
}

DDP_API ddp_config ddp_query_config(const ddp_context *ctx) {
    ddp_config c;
    memset(&c, 0, sizeof c);
    if (!ctx) return c;
    c = ctx->cfg;
    c.rank = ctx->rank;
    c.world_size = ctx->world;
    c.local_rank = ctx->local_rank;
    c.local_world_size = ctx->local_world;
    return c;
}

/* A strict integer from the environment: NULL if unset, an error naming the
   variable if it is not a whole decimal number in [lo, hi]. */
static ddp_result ddp__env_int(const char *name, long lo, long hi, int *found, long *out) {
    const char *s = getenv(name);
    char *end;
    long v;
    *found = 0;
    if (!s) return DDP_SUCCESS;
    errno = 0;
    v = strtol(s, &end, 10);
    if (*s == 0 || *end != 0 || errno == ERANGE)
        return ddp__fail(NULL, DDP_ERROR_ENVIRONMENT,
                         "environment variable %s='%.64s' is not an integer", name, s);
    if (v < lo || v > hi)
        return ddp__fail(NULL, DDP_ERROR_ENVIRONMENT,
                         "environment variable %s=%ld is out of range [%ld, %ld]", name, v, lo, hi);
    *found = 1;
    *out = v;
    return DDP_SUCCESS;
}

#define DDP__TRY(expr) do { ddp_result ddp__r_ = (expr); if (ddp__r_ != DDP_SUCCESS) return ddp__r_; } while (0)

/* Rank and world from the first launcher whose variables are present. */
static ddp_result ddp__resolve_identity(ddp_config *c) {
    static const char *const sets[4][4] = {
        { "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE" },                 /* torchrun, ddprun */
        { "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
          "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE" },             /* Open MPI */
        { "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS" },           /* MPICH, Intel MPI */
        { "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE" } /* srun */
    };
    int i;
    if (c->world_size > 0) {
        if (c->local_world_size <= 0) c->local_world_size = c->world_size;
        if (c->local_world_size == c->world_size && c->local_rank == 0) c->local_rank = c->rank;
    } else if (c->world_size < 0) {
        return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.world_size is %d: must be >= 0 (0 reads the environment)", c->world_size);
    } else {
        for (i = 0; i < 4; i++) {
            int fr, fw, flr, flw;
            long r = 0, w = 0, lr = 0, lw = 0;
            DDP__TRY(ddp__env_int(sets[i][1], INT_MIN, INT_MAX, &fw, &w));
            DDP__TRY(ddp__env_int(sets[i][0], INT_MIN, INT_MAX, &fr, &r));
            if (!fw && !fr) continue;
            if (fw != fr)
                return ddp__fail(NULL, DDP_ERROR_ENVIRONMENT, "%s is set but %s is not",
                                 fr ? sets[i][0] : sets[i][1], fr ? sets[i][1] : sets[i][0]);
            if (w < 1)
                return ddp__fail(NULL, DDP_ERROR_ENVIRONMENT, "environment variable %s=%ld: the world size must be at least 1", sets[i][1], w);
            if (r < 0 || r >= w)
                return ddp__fail(NULL, DDP_ERROR_ENVIRONMENT, "environment variable %s=%ld is not a rank of a world of %ld (%s)", sets[i][0], r, w, sets[i][1]);
            DDP__TRY(ddp__env_int(sets[i][2], 0, w - 1, &flr, &lr));
            if (i == 3 && getenv(sets[i][3]) && strchr(getenv(sets[i][3]), '(')) flw = 0; /* "2(x3)": per-node list */
            else DDP__TRY(ddp__env_int(sets[i][3], 1, w, &flw, &lw));
            if (!flw) { lw = w; if (!flr) lr = r; }
            if (!flr) lr = r % lw;
            if (lr >= lw)
                return ddp__fail(NULL, DDP_ERROR_ENVIRONMENT, "local rank %ld (%s) is not below the local world size %ld (%s)", lr, sets[i][2], lw, sets[i][3]);
            c->rank = (int)r; c->world_size = (int)w; c->local_rank = (int)lr; c->local_world_size = (int)lw;
            break;
        }
        if (i == 4) { c->rank = 0; c->world_size = 1; c->local_rank = 0; c->local_world_size = 1; }
    }
    if (c->rank < 0 || c->rank >= c->world_size)
        return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.rank %d is not a rank of a world of %d", c->rank, c->world_size);
    if (c->local_world_size > c->world_size || c->local_rank < 0 || c->local_rank >= c->local_world_size)
        return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.local_rank %d / local_world_size %d do not fit a world of %d",
                         c->local_rank, c->local_world_size, c->world_size);
    return DDP_SUCCESS;
}

static ddp_result ddp__resolve_address(ddp_config *c, char *addr_buf, size_t cap) {
    if (!c->master_addr) {
        const char *a = getenv("MASTER_ADDR");
        if (a && *a) c->master_addr = a;
        else c->master_addr = "127.0.0.1";
    }
    if (strlen(c->master_addr) == 0 || strlen(c->master_addr) >= cap)
        return ddp__fail(NULL, DDP_ERROR_ENVIRONMENT, "master address '%.64s' is empty or too long", c->master_addr);
    ddp__copy_str(addr_buf, cap, c->master_addr);
    c->master_addr = addr_buf;
    if (c->master_port == 0) {
        int f; long p = 29500;
        DDP__TRY(ddp__env_int("MASTER_PORT", 1, 65535, &f, &p));
        c->master_port = (int)p;
    }
    if (c->master_port < 1 || c->master_port > 65535)
        return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.master_port %d is not a TCP port (1..65535)", c->master_port);
    return DDP_SUCCESS;
}

static ddp_result ddp__resolve_backend(ddp_config *c) {
    const char *b = getenv("DDP_BACKEND"), *t = getenv("DDP_TIMEOUT");
    if (t && *t) {
        char *end;
        double v = strtod(t, &end);
        if (*end != 0 || !(v > 0))
            return ddp__fail(NULL, DDP_ERROR_ENVIRONMENT, "environment variable DDP_TIMEOUT='%.32s' is not a positive number of seconds", t);
    }
    if (b && *b && c->backend == DDP_BACKEND_DEFAULT) {
        if (!strcmp(b, "shm")) c->backend = DDP_BACKEND_SHM;
        else if (!strcmp(b, "nccl")) c->backend = DDP_BACKEND_NCCL;
        else if (!strcmp(b, "staged")) c->backend = DDP_BACKEND_STAGED;
        else return ddp__fail(NULL, DDP_ERROR_ENVIRONMENT, "environment variable DDP_BACKEND='%.32s' is not one of shm, nccl, staged", b);
    }
    if ((int)c->backend < 0 || c->backend > DDP_BACKEND_STAGED)
        return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.backend %d is not a ddp_backend", (int)c->backend);
    if ((int)c->device < 0 || c->device > DDP_DEVICE_CUDA)
        return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.device %d is not a ddp_device", (int)c->device);
    if ((int)c->optimizer.type < 0 || c->optimizer.type > DDP_OPTIM_ADAMW)
        return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.optimizer.type %d is not a ddp_optimizer", (int)c->optimizer.type);
    if (c->compress != DDP_DTYPE_DEFAULT && c->compress != DDP_F32 && c->compress != DDP_BF16 && c->compress != DDP_F16)
        return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.compress %d must be DDP_BF16, DDP_F16 or 0", (int)c->compress);
    if (c->optimizer.nesterov && c->optimizer.momentum <= 0 && c->optimizer.type == DDP_OPTIM_SGD)
        return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.optimizer.nesterov needs a momentum > 0");
    if (c->optimizer.lr < 0 || c->optimizer.momentum < 0 || c->optimizer.weight_decay < 0 ||
        !(c->optimizer.beta1 < 1) || !(c->optimizer.beta2 < 1) || c->optimizer.eps < 0)
        return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.optimizer has a negative lr/momentum/weight_decay/eps or a beta >= 1");
#if !defined(DDP_CUDA)
    if (c->device == DDP_DEVICE_CUDA)
        return ddp__fail(NULL, DDP_ERROR_UNSUPPORTED, "config.device is DDP_DEVICE_CUDA but this implementation was compiled without CUDA (compile the DDP_IMPLEMENTATION file with nvcc)");
    c->device = DDP_DEVICE_CPU;
    if (c->backend == DDP_BACKEND_NCCL || c->backend == DDP_BACKEND_STAGED)
        return ddp__fail(NULL, DDP_ERROR_UNSUPPORTED, "backend '%s' needs a CUDA build of the implementation", ddp_backend_name(c->backend));
    c->backend = DDP_BACKEND_SHM;
#endif
    return DDP_SUCCESS;
}

/* ---- job identity ------------------------------------------------------------------

   Every rank describes itself in one line of text, its identity record:
       ddp-ident 1 version=1 world=2 rank=1 secret=1 pid=4242 uid=1000 job=ddprun-... host=n1 nonce=...
   It travels in the store's hello (a store of our own) or under the key
   "ident/<rank>" (torchrun's agent store). Ranks of one job agree on
   version, world, secret and job; anything else is another job on the same
   port, or a stale binary, and both sides fail with a message naming both.
   The first two words and the key=value form are the part every future
   version keeps, so that ranks of different versions can still say so. */


/* Job ids and host names go into the record as one word of safe characters. */
static void ddp__ident_word(char *dst, size_t cap, const char *src) {
    size_t i, n = 0;
    for (i = 0; src && src[i] && n + 1 < cap; i++) {
        char ch = src[i];
        int ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
                 ch == '.' || ch == '-' || ch == '_' || ch == ':' || ch == '/' || ch == '+' || ch == '@';
        dst[n++] = ok ? ch : '_';
    }
    if (n == 0) dst[n++] = '-';
    dst[n] = 0;
}

static void ddp__ident_format(const ddp__ident *id, char *out, size_t cap) {
    snprintf(out, cap, "ddp-ident 1 version=%d world=%d rank=%d secret=%d pid=%d uid=%u job=%s host=%s nonce=%s",
             id->version, id->world, id->rank, id->secret, id->pid, id->uid, id->job, id->host, id->nonce);
}

/* 0, or -1 when the text is not an identity record (words it does not know
   are skipped: a later version may add some). */
static int ddp__ident_parse(const char *text, size_t len, ddp__ident *id) {
    char buf[DDP__IDENT_MAX + 1], *tok, *next;
    int seen = 0;
    memset(id, 0, sizeof *id);
    ddp__copy_str(id->job, sizeof id->job, "-");
    ddp__copy_str(id->host, sizeof id->host, "-");
    ddp__copy_str(id->nonce, sizeof id->nonce, "-");
    while (len > 0 && text[len - 1] == 0) len--;
    if (len == 0 || len > DDP__IDENT_MAX || memchr(text, 0, len)) return -1;
    memcpy(buf, text, len);
    buf[len] = 0;
    if (strncmp(buf, "ddp-ident 1 ", 12) != 0) return -1;
    for (tok = buf + 12; *tok; tok = next) {
        char *eq, *end;
        long v;
        next = strchr(tok, ' ');
        if (next) *next++ = 0;
        else next = tok + strlen(tok);
        if (!*tok) continue;
        eq = strchr(tok, '=');
        if (!eq || eq == tok || !eq[1]) return -1;
        *eq = 0;
        if (!strcmp(tok, "job")) { ddp__ident_word(id->job, sizeof id->job, eq + 1); continue; }
        if (!strcmp(tok, "host")) { ddp__ident_word(id->host, sizeof id->host, eq + 1); continue; }
        if (!strcmp(tok, "nonce")) { ddp__ident_word(id->nonce, sizeof id->nonce, eq + 1); continue; }
        if (strcmp(tok, "version") && strcmp(tok, "world") && strcmp(tok, "rank") && strcmp(tok, "secret") &&
            strcmp(tok, "pid") && strcmp(tok, "uid"))
            continue;
        errno = 0;
        v = strtol(eq + 1, &end, 10);
        if (*end || errno) return -1;
        if (!strcmp(tok, "version")) { id->version = (int)v; seen |= 1; }
        else if (!strcmp(tok, "world")) { id->world = (int)v; seen |= 2; }
        else if (!strcmp(tok, "rank")) { id->rank = (int)v; seen |= 4; }
        else if (!strcmp(tok, "secret")) id->secret = v != 0;
        else if (!strcmp(tok, "pid")) id->pid = (int)v;
        else if (!strcmp(tok, "uid")) id->uid = (unsigned)v;
    }
    if (seen != 7 || id->world < 1 || id->rank < 0 || id->rank >= id->world) return -1;
    return 0;
}

/* Do two ranks belong to one job? DDP_SUCCESS, or DDP_ERROR_MISMATCH with a
   message naming both ranks (port: the rendezvous port, for the message). */
static ddp_result ddp__ident_compare(const ddp__ident *a, const ddp__ident *b, int port, char *msg, size_t cap) {
    if (a->version != b->version) {
        snprintf(msg, cap, "rank %d runs ddp.h %d.%d but rank %d runs ddp.h %d.%d: every rank must be built from the same library version",
                 a->rank, a->version / 1000, a->version % 1000, b->rank, b->version / 1000, b->version % 1000);
        return DDP_ERROR_MISMATCH;
    }
    if (a->secret != b->secret) {
        snprintf(msg, cap, "port %d is used by another job: rank %d %s a job secret and rank %d %s (or DDP_JOB_SECRET is set for some ranks only)",
                 port, a->rank, a->secret ? "has" : "has no", b->rank, b->secret ? "has one" : "has none");
        return DDP_ERROR_MISMATCH;
    }
    if (a->world != b->world) {
        snprintf(msg, cap, "port %d is used by another job: rank %d is in a world of %d, rank %d in a world of %d",
                 port, a->rank, a->world, b->rank, b->world);
        return DDP_ERROR_MISMATCH;
    }
    if (strcmp(a->job, b->job) != 0) {
        snprintf(msg, cap, "port %d is used by another job: rank %d belongs to job '%s', rank %d to job '%s'",
                 port, a->rank, a->job, b->rank, b->job);
        return DDP_ERROR_MISMATCH;
    }
    return DDP_SUCCESS;
}

/* The job secret, the job id, where rank 0's store listens, and its memory
   cap: from the config, else the environment (see ENVIRONMENT, SECURITY). */
static ddp_result ddp__resolve_trust(ddp_config *c, unsigned char *secret, size_t *secret_len,
                                     char *job, char *bind, size_t bindcap) {
    const char *sec = c->job_secret, *what = "config.job_secret", *j = c->job_id, *b = c->store_bind;
    char buf[DDP__JOB_ID_MAX * 2 + 2];
    size_t n;
    if (!sec) { sec = getenv("DDP_JOB_SECRET"); what = "environment variable DDP_JOB_SECRET"; }
    *secret_len = 0;
    if (sec && *sec) {
        n = strlen(sec);
        if (n < DDP__SECRET_MIN || n > DDP__SECRET_MAX)
            return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "%s has %zu characters: a job secret needs %d to %d (ddprun makes one of 64)",
                             what, n, DDP__SECRET_MIN, DDP__SECRET_MAX);
        memcpy(secret, sec, n);
        *secret_len = n;
    }
    /* the job id: the user's, else the launcher's (every rank of a job
       sees the same one; two jobs never do) */
    buf[0] = 0;
    if (!j) j = getenv("DDP_JOB_ID");
    if (j && *j) ddp__copy_str(buf, sizeof buf, j);
    else if ((j = getenv("TORCHELASTIC_RUN_ID")) && *j) snprintf(buf, sizeof buf, "torchelastic:%.*s", DDP__JOB_ID_MAX, j);
    else if ((j = getenv("SLURM_JOB_ID")) && *j) {
        const char *step = getenv("SLURM_STEP_ID");
        snprintf(buf, sizeof buf, "slurm:%.*s.%.16s", DDP__JOB_ID_MAX / 2, j, step && *step ? step : "-");
    } else if ((j = getenv("OMPI_MCA_ess_base_jobid")) && *j) snprintf(buf, sizeof buf, "ompi:%.*s", DDP__JOB_ID_MAX, j);
    else if ((j = getenv("PMIX_NAMESPACE")) && *j) snprintf(buf, sizeof buf, "pmix:%.*s", DDP__JOB_ID_MAX, j);
    ddp__ident_word(job, DDP__JOB_ID_MAX + 1, buf[0] ? buf : "-");
    if (!b) b = getenv("DDP_STORE_BIND");
    if (!b || !*b) b = c->master_addr;
    if (strlen(b) >= bindcap) return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "store bind address '%.40s...' is too long", b);
    ddp__copy_str(bind, bindcap, b);
    if (c->store_max_bytes == 0) {
        int f;
        long v = 0;
        DDP__TRY(ddp__env_int("DDP_STORE_MAX_BYTES", 64L << 20, LONG_MAX, &f, &v));
        c->store_max_bytes = f ? (size_t)v : ((size_t)256 << 20);
    }
    if (c->store_max_bytes < ((size_t)64 << 20))
        return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.store_max_bytes %zu is below the minimum of %zu (64 MiB)",
                         c->store_max_bytes, (size_t)64 << 20);
    return DDP_SUCCESS;
}

/* store.inc.c -- ddp.h rendezvous layer: a TCP key-value store that speaks
 * PyTorch's TCPStore wire protocol (server + client).
 *
 * C99 + POSIX fragment, #included by the implementation part of ddp.h (or by a
 * test). Every symbol is static and prefixed ddp__store_ / DDP__STORE_.
 *
 * WHAT IT IS FOR
 *   (a) rank 0 runs ddp__store_server_start() and every rank (rank 0 too)
 *       connects a ddp__store client to it, to exchange small blobs
 *       (ncclUniqueId, shared-memory names, shapes) and to run barriers;
 *   (b) under torchrun (TORCHELASTIC_USE_AGENT_STORE=True) the agent already
 *       owns MASTER_ADDR:MASTER_PORT, so every rank is a client of the agent's
 *       TCPStore instead.
 *
 * WIRE PROTOCOL (verified against torch 1.13 by logging the bytes between a
 * torch client and a torch server; all integers in host order, which is
 * little-endian on every platform torch ships for)
 *   string/blob = u64 length, bytes          key list = u64 count, strings
 *   SET         0  key, value                 -> (no reply)
 *   COMPARE_SET 1  key, expected, desired     -> blob (value now stored)
 *   GET         2  key                        -> blob  (missing key: server
 *                                                 drops the connection; torch
 *                                                 clients always WAIT first)
 *   ADD         3  key, i64 delta             -> i64 new value (stored as
 *                                                 decimal text)
 *   CHECK       4  key list                   -> u8 0 READY / 1 NOT_READY
 *   WAIT        5  key list                   -> u8 0 STOP_WAITING, sent only
 *                                                 once every key exists
 *   GETNUMKEYS  6                             -> i64
 *   WATCH_KEY   7  (callback client; unused, not served)
 *   DELETE_KEY  8  key                        -> i64 number deleted (0/1)
 *   torch 2.x source (not verifiable here) adds APPEND 9 (key, blob; no
 *   reply), MULTI_GET 10 (key list -> blobs), MULTI_SET 11 (count, then
 *   key+blob pairs; no reply), CANCEL_WAIT 12 (-> u8 1 WAIT_CANCELED).
 *
 *   Two wire versions exist (DDP__STORE_PROTO_*):
 *   V1  torch 1.x up to the first 2.x releases: the table above, no handshake.
 *   V2  current torch (classic and libuv backends): enum VALIDATE=0 inserted
 *       at the front, WATCH_KEY removed, so SET..GETNUMKEYS are shifted by +1
 *       (SET=1 .. GETNUMKEYS=7) and DELETE_KEY=8 and up keep their numbers;
 *       PING=13 (u32 nonce -> same u32). A connection must start with
 *       VALIDATE + u32 0x3C85F7CE (no reply); the classic backend drops a
 *       connection whose first byte is anything else, the libuv backend
 *       ignores it silently. The torch client sends VALIDATE then PING.
 *   AUTO (the default) opens two connections at once: one sends a V1
 *   GETNUMKEYS, the other the V2 VALIDATE + PING; the first correct answer
 *   wins and the other connection is closed. A V2 server drops (classic) or
 *   ignores (libuv) the V1 probe; a V1 server drops the V2 opening because
 *   the PING nonce always has 0xFF in bits 16..23, so it parses as a SET whose
 *   key length exceeds any vector's max_size (verified with torch 1.13: it
 *   resets that connection and keeps serving).
 *   The server here accepts both versions on every port: a connection whose
 *   first 5 bytes are VALIDATE+magic is V2, anything else V1.
 *
 * THE LIBRARY'S OWN REQUESTS (rank 0's store and its ranks only; V1 framing)
 *   HELLO  0x44 u32 0x44445048, u32 n, n bytes of identity record,
 *               32-byte client nonce Nc
 *          -> u32 0x44445053, verdict, and with status CHALLENGE: 32-byte
 *             server nonce Ns, HMAC(K, "ddp.h store server" Nc Ns)
 *   PROOF  0x45 HMAC(K, "ddp.h store client" Ns Nc)     -> verdict
 *          verdict = u8 status (OK, CHALLENGE, MISMATCH, NEED_SECRET,
 *          BAD_PROOF), u32 n + rank 0's identity record (only once the
 *          secret is proven, or without one), u32 n + reason
 *   EVENT  0x46                  -> blob: u8 kind + message ("" none)
 *   ABORT  0x47 blob message     -> (no reply; accepted ranks only)
 *   K is the job secret. With one, the store serves nothing but HELLO and
 *   PROOF to a connection until its proof checks. After an event (another
 *   job, another version, tampering, a rank that gave up) every pending and
 *   later WAIT is answered 0xD5 instead of STOP_WAITING; EVENT says why.
 *   Keys under "ddp/" are the job's: a SET that changes one, a SET of a
 *   counter ("/count"), APPEND, COMPARE_SET or DELETE of one is refused and
 *   is an event.
 *
 * KEYS
 *   Keys go on the wire verbatim, after the client's prefix (see
 *   ddp__store_set_prefix). A torch TCPStore prepends "/" to user keys (not to
 *   its own "init/" counter), and PrefixStore(p) sends p + "/" + key; so the
 *   key "k" of a torchrun worker's store (PrefixStore("/worker/attempt_N",
 *   TCPStore)) is "//worker/attempt_N/k" on the wire.
 *
 * ERRORS
 *   Every fallible call returns 0 or -1 and writes one sentence naming what was
 *   attempted into err[errlen] (may be NULL/0). A WAIT or GET that times out
 *   leaves the server with a pending answer, so the client drops that
 *   connection and reconnects (to list the missing keys); when that fails the
 *   store is marked broken and the next call tries to reconnect first.
 *
 * THREAD SAFETY
 *   A ddp__store is used by one thread at a time. The server runs on its own
 *   thread (all signals blocked there) and shares no memory with clients.
 */

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* macOS: SO_NOSIGPIPE is set on every socket instead */
#endif

#if defined(__GNUC__) || defined(__clang__)
#define DDP__STORE_UNUSED __attribute__((unused))
#define DDP__STORE_PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#define DDP__STORE_UNUSED
#define DDP__STORE_PRINTF(f, a)
#endif

/* LIMITS. The store is rank 0's, so a client that is not a rank of the job
 * must never make it hold much memory, keep it busy, or delay rank 0's
 * exit. A connection that breaks a limit is dropped (as torch's libuv
 * backend does) and the drop is logged. Each number says why it is what it
 * is; the manual (SECURITY) lists them. */

/* Keys the library writes are "ddp/<context>/<name>" plus a short name:
 * under 300 bytes. torch's own keys are shorter still. */
#ifndef DDP__STORE_MAX_KEY_LEN
#define DDP__STORE_MAX_KEY_LEN 4096u
#endif
/* The largest value the library writes is a rank's parameter table, about
 * 100 bytes per parameter: 16 MiB holds 160 thousand parameters. Every
 * other value is under 1 KiB. (A torch store allowed 2^30.) */
#ifndef DDP__STORE_MAX_VALUE_LEN
#define DDP__STORE_MAX_VALUE_LEN (16u * 1024u * 1024u)
#endif
/* Keys in one WAIT, CHECK, MULTI_GET or MULTI_SET: the library waits for
 * one key at a time; torch's own lists hold one key per rank at most. */
#ifndef DDP__STORE_MAX_KEYS
#define DDP__STORE_MAX_KEYS 4096u
#endif
/* All the memory the server holds (keys, values, every connection's
 * buffers and pending waits): 256 MiB by default, enough for a world of
 * 1024 ranks with 200 KiB parameter tables each; config.store_max_bytes
 * (DDP_STORE_MAX_BYTES) sets another, not below the minimum, which keeps
 * room for a few largest values and their replies. */
#define DDP__STORE_DEFAULT_MAX_BYTES ((size_t)256 << 20)
#define DDP__STORE_MIN_MAX_BYTES     ((size_t)64 << 20)
/* Reply bytes a client may leave unread: one largest value and some.
 * A client that asks and never reads is dropped here. */
#define DDP__STORE_MAX_UNREAD (DDP__STORE_MAX_VALUE_LEN + (64u << 10))
/* Connections: every rank holds one, two while it reconnects; 64 more for
 * the moments when old ones are still closing. At the cap a silent
 * connection (one that never sent a byte) is evicted for the new one. */
#define DDP__STORE_CONN_HEADROOM 64
/* A connection that has sent nothing within this time is dropped: ranks
 * send their hello the moment they connect, so 10 s is generous even on
 * a loaded machine. */
#define DDP__STORE_IDLE_TIMEOUT_S 10.0
/* A request that has started arriving must be complete within this time
 * (16 MiB at 1 MB/s fits): a slow or stalled writer holds nothing long. */
#define DDP__STORE_SLOW_TIMEOUT_S 30.0
/* At most this many log lines per second about rejected or dropped
 * clients, so a flood cannot flood the log too. */
#define DDP__STORE_LOG_PER_S 10
/* ddp_destroy on rank 0 lets the ranks still connected hang up for at most
 * this long (their last answers are already sent; this only spares them a
 * reset): the promise is that rank 0 returns within 1 s. */
#define DDP__STORE_DRAIN_S 0.9

/* The library's own requests, beside torch's: a hello that carries the
 * identity record and starts the secret's challenge-response, the proof
 * that answers the challenge, and the query for the event that ended the
 * rendezvous. Numbers far from torch's (0..13). */
#define DDP__STORE_Q_HELLO 0x44
#define DDP__STORE_Q_PROOF 0x45
#define DDP__STORE_Q_EVENT 0x46
#define DDP__STORE_Q_ABORT 0x47 /* a rank gives up: every pending and later WAIT ends with its message */
#define DDP__STORE_HELLO_MAGIC 0x44445048u  /* "HPDD" little-endian: "ddp.h hello" */
#define DDP__STORE_REPLY_MAGIC 0x44445053u
enum {
    DDP__HELLO_OK = 0,          /* same job: go on */
    DDP__HELLO_CHALLENGE = 1,   /* prove the secret (server nonce and server proof follow) */
    DDP__HELLO_MISMATCH = 2,    /* another job or version: both sides fail */
    DDP__HELLO_NEED_SECRET = 3, /* the store has a secret, the client none */
    DDP__HELLO_BAD_PROOF = 4    /* the proof is wrong: the secrets differ */
};
/* A WAIT answered with this byte instead of STOP_WAITING: the rendezvous
 * was ended by an event (another job, a version mismatch, tampering);
 * DDP__STORE_Q_EVENT tells which. */
#define DDP__STORE_WAIT_ABORTED 0xD5u
enum { DDP__EVENT_MISMATCH = 1, DDP__EVENT_TAMPER = 2, DDP__EVENT_ABORT = 3 };

enum {
    DDP__STORE_PROTO_AUTO = 0,
    DDP__STORE_PROTO_V1 = 1, /* torch 1.x .. early 2.x: no handshake */
    DDP__STORE_PROTO_V2 = 2  /* current torch: VALIDATE + shifted enum */
};

/* Query numbers as V1 sends them; the server maps V2 bytes onto these. */
enum {
    DDP__STORE_Q_SET = 0,
    DDP__STORE_Q_COMPARE_SET = 1,
    DDP__STORE_Q_GET = 2,
    DDP__STORE_Q_ADD = 3,
    DDP__STORE_Q_CHECK = 4,
    DDP__STORE_Q_WAIT = 5,
    DDP__STORE_Q_GETNUMKEYS = 6,
    DDP__STORE_Q_WATCH_KEY = 7,
    DDP__STORE_Q_DELETE_KEY = 8,
    DDP__STORE_Q_APPEND = 9,
    DDP__STORE_Q_MULTI_GET = 10,
    DDP__STORE_Q_MULTI_SET = 11,
    DDP__STORE_Q_CANCEL_WAIT = 12,
    DDP__STORE_Q_PING = 13,      /* V2 only */
    DDP__STORE_Q_VALIDATE = 100  /* V2 byte 0; internal number */
};

#define DDP__STORE_MAGIC 0x3C85F7CEu

/* ------------------------------------------------------------------------ */
/* small helpers                                                             */

static DDP__STORE_PRINTF(3, 4) int ddp__store_fail(char *err, size_t errlen,
                                                   const char *fmt, ...) {
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}

static DDP__STORE_PRINTF(3, 4) void ddp__store_appendf(char *err, size_t errlen,
                                                       const char *fmt, ...) {
    size_t n;
    va_list ap;
    if (!err || !errlen) return;
    n = strlen(err);
    if (n + 1 >= errlen) return;
    va_start(ap, fmt);
    vsnprintf(err + n, errlen - n, fmt, ap);
    va_end(ap);
}

static double ddp__store_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* A deadline of "timeout_s from now"; timeout_s <= 0 means never. */
static double ddp__store_deadline(double timeout_s) {
    return timeout_s > 0 ? ddp__store_now() + timeout_s : 1e300;
}

/* poll() milliseconds until deadline, rounded up; -1 when there is none. */
static int ddp__store_ms_left(double deadline) {
    double left;
    if (deadline >= 1e299) return -1;
    left = deadline - ddp__store_now();
    if (left <= 0) return 0;
    if (left > 1e6) return 1000000000;
    return (int)(left * 1000.0) + 1;
}

static void ddp__store_sleep(double s) {
    struct timespec ts;
    if (s <= 0) return;
    ts.tv_sec = (time_t)s;
    ts.tv_nsec = (long)((s - (double)ts.tv_sec) * 1e9);
    nanosleep(&ts, NULL); /* an early wake-up only shortens one back-off */
}

static void ddp__store_sock_setup(int fd) {
    fcntl(fd, F_SETFD, fcntl(fd, F_GETFD) | FD_CLOEXEC);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
#ifdef SO_NOSIGPIPE
    {
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, sizeof one);
    }
#endif
}

/* Growable byte buffer; a failed allocation sticks in .oom. */
typedef struct {
    unsigned char *p;
    size_t n, cap;
    int oom;
} ddp__store_buf;

static void ddp__store_buf_put(ddp__store_buf *b, const void *d, size_t n) {
    if (b->oom || n == 0) return;
    if (n > (size_t)-1 / 2 - b->n) { b->oom = 1; return; }
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        void *q;
        while (cap < b->n + n) cap *= 2;
        q = realloc(b->p, cap);
        if (!q) { b->oom = 1; return; }
        b->p = (unsigned char *)q;
        b->cap = cap;
    }
    memcpy(b->p + b->n, d, n);
    b->n += n;
}

static void ddp__store_buf_u8(ddp__store_buf *b, unsigned v) {
    unsigned char c = (unsigned char)v;
    ddp__store_buf_put(b, &c, 1);
}

static void ddp__store_buf_u32(ddp__store_buf *b, uint32_t v) { ddp__store_buf_put(b, &v, 4); }
static void ddp__store_buf_u64(ddp__store_buf *b, uint64_t v) { ddp__store_buf_put(b, &v, 8); }

static void ddp__store_buf_blob(ddp__store_buf *b, const void *d, size_t n) {
    ddp__store_buf_u64(b, (uint64_t)n);
    ddp__store_buf_put(b, d, n);
}

/* ======================================================================== */
/* SERVER                                                                    */

typedef struct ddp__store_kv {
    struct ddp__store_kv *next;
    uint64_t hash;
    unsigned char *val;
    size_t vlen, klen;
    char *key; /* klen bytes + NUL, in the same allocation, after the struct */
} ddp__store_kv;

typedef void (*ddp__store_log_fn)(int level, const char *msg, void *user); /* level: a ddp_log_level */

/* How rank 0 runs its store. Zero fields mean: no secret, no hello checks
 * (a bare TCPStore, as the tests use it), nothing protected, default limits. */
typedef struct ddp__store_opts {
    const unsigned char *secret;   /* the job secret (copied); NULL: none */
    size_t secret_len;
    const char *ident;             /* rank 0's identity record: hellos are checked against it */
    const char *protect;           /* keys with this prefix are written once, counters only added to */
    size_t max_bytes;              /* memory cap; 0: DDP__STORE_DEFAULT_MAX_BYTES */
    int world;                     /* for the connection cap; 0: 1 */
    double idle_timeout_s;         /* 0: DDP__STORE_IDLE_TIMEOUT_S (tests shorten it) */
    double slow_timeout_s;         /* 0: DDP__STORE_SLOW_TIMEOUT_S */
    ddp__store_log_fn log;         /* rejected and dropped clients; called on the server thread */
    void *log_user;
} ddp__store_opts;

typedef struct ddp__store_conn {
    int fd;
    int proto;   /* 0 until the first bytes tell */
    int eof;     /* peer closed (or read error): serve what is buffered, then drop */
    int dead;
    int closing; /* a final answer is queued: drop once it is sent */
    int active;  /* it has sent at least one byte */
    int hello;   /* 0 none, 1 challenged (its proof is due), 2 accepted as a rank */
    int rank;    /* of an accepted hello; -1 otherwise */
    char peer[64];
    double t_open, t_partial; /* accepted at; a request started arriving at (0: none pending) */
    unsigned char cnonce[32], snonce[32];
    ddp__ident ident;
    unsigned char *in;
    size_t in_off, in_len, in_cap;
    ddp__store_buf out;
    size_t out_off;
    /* a pending WAIT: the keys still missing */
    char **wkeys;
    size_t *wlens;
    size_t nwait, wbytes;
    int waiting;
} ddp__store_conn;

typedef struct ddp__store_server {
    pthread_t thread;
    int listen_fd;
    int wake[2];
    int port;
    ddp__store_kv **buckets;
    size_t nbuckets, nkeys;
    ddp__store_conn **conns;
    size_t nconns, conns_cap, max_conns;
    int live_clients;          /* nconns, published for other threads (atomic) */
    int rank_clients;          /* accepted connections of ranks other than 0 (atomic) */
    size_t bytes, max_bytes;   /* memory held now, and the cap */
    double idle_timeout_s, slow_timeout_s;
    unsigned char *secret;
    size_t secret_len;
    int has_ident;
    ddp__ident ident;          /* rank 0's */
    char ident_text[DDP__IDENT_MAX + 1];
    char protect[64];
    size_t protect_len;
    int *rank_pid;             /* per rank: the pid of its accepted hello (atomic; rank 0 reads it) */
    ddp__store_log_fn log;
    void *log_user;
    double log_window;
    int log_count, log_dropped;
    /* the event that ended the rendezvous: written once by the server
       thread, then published through event_set (atomic) */
    char event_msg[1024];
    int event_kind;
    int event_set;
    /* rank 0's own abort, handed to the server thread (ddp__store_server_abort) */
    char ext_msg[1024];
    int ext_set;
} ddp__store_server;

static DDP__STORE_PRINTF(3, 4) void ddp__store_logf(ddp__store_server *sv, int level, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    double now;
    if (!sv->log) return;
    now = ddp__store_now();
    if (now - sv->log_window >= 1.0) {
        if (sv->log_dropped) {
            snprintf(msg, sizeof msg, "store: %d more log lines about clients suppressed", sv->log_dropped);
            sv->log(1, msg, sv->log_user);
        }
        sv->log_window = now;
        sv->log_count = 0;
        sv->log_dropped = 0;
    }
    if (++sv->log_count > DDP__STORE_LOG_PER_S) { sv->log_dropped++; return; }
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    sv->log(level, msg, sv->log_user);
}

/* A key for a message: printable, cut at 120 bytes. */
static const char *ddp__store_show(const unsigned char *k, size_t kl, char *out, size_t cap) {
    size_t i, n = kl < 120 && kl < cap - 4 ? kl : (cap - 4 < 120 ? cap - 4 : 120);
    for (i = 0; i < n; i++) out[i] = k[i] >= 32 && k[i] < 127 && k[i] != '\'' ? (char)k[i] : '?';
    if (n < kl) { out[n++] = '.'; out[n++] = '.'; out[n++] = '.'; }
    out[n] = 0;
    return out;
}

/* Memory the server holds, against its cap. */
/* (Only the server thread writes bytes; a test may read it at any time.) */
static int ddp__store_charge(ddp__store_server *sv, size_t more) {
    if (more > sv->max_bytes || sv->bytes > sv->max_bytes - more) return -1;
    __atomic_store_n(&sv->bytes, sv->bytes + more, __ATOMIC_RELAXED);
    return 0;
}

static void ddp__store_uncharge(ddp__store_server *sv, size_t less) {
    __atomic_store_n(&sv->bytes, sv->bytes - (less <= sv->bytes ? less : sv->bytes), __ATOMIC_RELAXED);
}

static DDP__STORE_PRINTF(3, 4) void ddp__store_drop(ddp__store_server *sv, ddp__store_conn *c, const char *fmt, ...) {
    char why[512];
    va_list ap;
    if (c->dead) return;
    c->dead = 1;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    if (c->rank >= 0) ddp__store_logf(sv, 1, "store: dropped the connection of rank %d (%s): %s", c->rank, c->peer, why);
    else ddp__store_logf(sv, 1, "store: dropped client %s: %s", c->peer, why);
}

static uint64_t ddp__store_hash(const void *p, size_t n) {
    const unsigned char *s = (const unsigned char *)p;
    uint64_t h = 1469598103934665603ull;
    size_t i;
    for (i = 0; i < n; i++) { h ^= s[i]; h *= 1099511628211ull; }
    return h;
}

static ddp__store_kv *ddp__store_kv_find(ddp__store_server *sv, const void *key, size_t klen) {
    uint64_t h = ddp__store_hash(key, klen);
    ddp__store_kv *e = sv->buckets[h & (sv->nbuckets - 1)];
    for (; e; e = e->next)
        if (e->hash == h && e->klen == klen && memcmp(e->key, key, klen) == 0) return e;
    return NULL;
}

static void ddp__store_kv_grow(ddp__store_server *sv) {
    size_t n = sv->nbuckets * 2, i;
    ddp__store_kv **nb = (ddp__store_kv **)calloc(n, sizeof *nb);
    if (!nb) return; /* keep the longer chains */
    for (i = 0; i < sv->nbuckets; i++) {
        ddp__store_kv *e = sv->buckets[i], *next;
        for (; e; e = next) {
            next = e->next;
            e->next = nb[e->hash & (n - 1)];
            nb[e->hash & (n - 1)] = e;
        }
    }
    free(sv->buckets);
    sv->buckets = nb;
    sv->nbuckets = n;
}

static size_t ddp__store_kv_cost(size_t klen) { return sizeof(ddp__store_kv) + klen + 1 + sizeof(void *); }

/* Find or create the entry for key (value empty when created); NULL on OOM
 * or when the memory cap is reached. */
static ddp__store_kv *ddp__store_kv_get(ddp__store_server *sv, const void *key, size_t klen,
                                        int *created) {
    ddp__store_kv *e = ddp__store_kv_find(sv, key, klen);
    size_t b;
    *created = 0;
    if (e) return e;
    if (ddp__store_charge(sv, ddp__store_kv_cost(klen)) != 0) return NULL;
    e = (ddp__store_kv *)malloc(sizeof *e + klen + 1);
    if (!e) { ddp__store_uncharge(sv, ddp__store_kv_cost(klen)); return NULL; }
    e->key = (char *)(e + 1);
    e->val = NULL;
    e->vlen = 0;
    e->klen = klen;
    e->hash = ddp__store_hash(key, klen);
    memcpy(e->key, key, klen);
    e->key[klen] = 0;
    b = e->hash & (sv->nbuckets - 1);
    e->next = sv->buckets[b];
    sv->buckets[b] = e;
    sv->nkeys++;
    *created = 1;
    if (sv->nkeys > sv->nbuckets) ddp__store_kv_grow(sv);
    return e;
}

static int ddp__store_kv_del(ddp__store_server *sv, const void *key, size_t klen) {
    uint64_t h = ddp__store_hash(key, klen);
    ddp__store_kv **pp = &sv->buckets[h & (sv->nbuckets - 1)];
    for (; *pp; pp = &(*pp)->next) {
        ddp__store_kv *e = *pp;
        if (e->hash == h && e->klen == klen && memcmp(e->key, key, klen) == 0) {
            *pp = e->next;
            ddp__store_uncharge(sv, ddp__store_kv_cost(klen) + (e->val ? e->vlen + 1 : 0));
            free(e->val);
            free(e);
            sv->nkeys--;
            return 1;
        }
    }
    return 0;
}

/* Replace (or, with append, extend) the value; creates the key. -1 on OOM
 * or at the memory cap. */
static int ddp__store_kv_put(ddp__store_server *sv, const void *key, size_t klen,
                             const void *val, size_t vlen, int append) {
    int created;
    ddp__store_kv *e = ddp__store_kv_get(sv, key, klen, &created);
    unsigned char *nv;
    size_t base;
    if (!e) return -1;
    base = append ? e->vlen : 0;
    if (base + vlen > DDP__STORE_MAX_VALUE_LEN || ddp__store_charge(sv, base + vlen + 1) != 0) {
        if (created) ddp__store_kv_del(sv, key, klen);
        return -1;
    }
    nv = (unsigned char *)malloc(base + vlen + 1);
    if (!nv) {
        ddp__store_uncharge(sv, base + vlen + 1);
        if (created) ddp__store_kv_del(sv, key, klen);
        return -1;
    }
    if (base) memcpy(nv, e->val, base);
    if (vlen) memcpy(nv + base, val, vlen);
    nv[base + vlen] = 0;
    if (e->val) ddp__store_uncharge(sv, e->vlen + 1);
    free(e->val);
    e->val = nv;
    e->vlen = base + vlen;
    return 0;
}

/* Queue reply bytes. A client whose unread replies pass DDP__STORE_MAX_UNREAD,
 * or that would push the store past its memory cap, is dropped. */
static void ddp__store_conn_send(ddp__store_server *sv, ddp__store_conn *c, const void *d, size_t n) {
    size_t pending, need, cap;
    unsigned char *q;
    if (c->dead || n == 0) return;
    pending = c->out.n - c->out_off;
    if (pending + n > DDP__STORE_MAX_UNREAD) {
        ddp__store_drop(sv, c, "it leaves more than %u reply bytes unread", (unsigned)DDP__STORE_MAX_UNREAD);
        return;
    }
    if (c->out.n + n > c->out.cap && c->out_off > 0) { /* compact before growing */
        memmove(c->out.p, c->out.p + c->out_off, pending);
        c->out.n = pending;
        c->out_off = 0;
    }
    need = c->out.n + n;
    if (need > c->out.cap) {
        cap = c->out.cap ? c->out.cap : 256;
        while (cap < need) cap *= 2;
        if (ddp__store_charge(sv, cap - c->out.cap) != 0) {
            ddp__store_drop(sv, c, "its replies would make the store hold more than %zu bytes", sv->max_bytes);
            return;
        }
        q = (unsigned char *)realloc(c->out.p, cap);
        if (!q) {
            ddp__store_uncharge(sv, cap - c->out.cap);
            ddp__store_drop(sv, c, "out of memory for its replies");
            return;
        }
        c->out.p = q;
        c->out.cap = cap;
    }
    memcpy(c->out.p + c->out.n, d, n);
    c->out.n += n;
}

static void ddp__store_conn_send_u8(ddp__store_server *sv, ddp__store_conn *c, unsigned v) {
    unsigned char b = (unsigned char)v;
    ddp__store_conn_send(sv, c, &b, 1);
}

static void ddp__store_conn_send_u32(ddp__store_server *sv, ddp__store_conn *c, uint32_t v) { ddp__store_conn_send(sv, c, &v, 4); }
static void ddp__store_conn_send_i64(ddp__store_server *sv, ddp__store_conn *c, int64_t v) { ddp__store_conn_send(sv, c, &v, 8); }

static void ddp__store_conn_send_blob(ddp__store_server *sv, ddp__store_conn *c, const void *d, size_t n) {
    uint64_t len = (uint64_t)n;
    ddp__store_conn_send(sv, c, &len, 8);
    ddp__store_conn_send(sv, c, d, n);
}

static void ddp__store_conn_clear_wait(ddp__store_server *sv, ddp__store_conn *c) {
    size_t i;
    for (i = 0; i < c->nwait; i++) free(c->wkeys[i]);
    free(c->wkeys);
    free(c->wlens);
    ddp__store_uncharge(sv, c->wbytes);
    c->wkeys = NULL;
    c->wlens = NULL;
    c->nwait = 0;
    c->wbytes = 0;
    c->waiting = 0;
}

/* The rendezvous is over: remember why (first event wins), answer every
 * pending WAIT with DDP__STORE_WAIT_ABORTED, and from now on every new one. */
static DDP__STORE_PRINTF(3, 4) void ddp__store_event(ddp__store_server *sv, int kind, const char *fmt, ...) {
    va_list ap;
    size_t i;
    if (__atomic_load_n(&sv->event_set, __ATOMIC_ACQUIRE)) return;
    va_start(ap, fmt);
    vsnprintf(sv->event_msg, sizeof sv->event_msg, fmt, ap);
    va_end(ap);
    sv->event_kind = kind;
    __atomic_store_n(&sv->event_set, 1, __ATOMIC_RELEASE);
    ddp__store_logf(sv, 1, "store: %s", sv->event_msg);
    for (i = 0; i < sv->nconns; i++) {
        ddp__store_conn *c = sv->conns[i];
        if (!c->waiting) continue;
        ddp__store_conn_clear_wait(sv, c);
        ddp__store_conn_send_u8(sv, c, DDP__STORE_WAIT_ABORTED);
    }
}

/* A key appeared: drop it from every pending WAIT; answer the WAITs it completes
 * (torch counts a key as arrived once, even if it is deleted later). */
static void ddp__store_wake(ddp__store_server *sv, const void *key, size_t klen) {
    size_t i, j;
    for (i = 0; i < sv->nconns; i++) {
        ddp__store_conn *c = sv->conns[i];
        if (!c->waiting) continue;
        for (j = 0; j < c->nwait;) {
            if (c->wlens[j] == klen && memcmp(c->wkeys[j], key, klen) == 0) {
                free(c->wkeys[j]);
                c->wkeys[j] = c->wkeys[c->nwait - 1];
                c->wlens[j] = c->wlens[c->nwait - 1];
                c->nwait--;
            } else {
                j++;
            }
        }
        if (c->nwait == 0) {
            ddp__store_conn_clear_wait(sv, c);
            ddp__store_conn_send_u8(sv, c, 0); /* STOP_WAITING */
        }
    }
}

/* Cursor over a connection's unparsed input. Readers return 1 ok, 0 need more
 * bytes, -1 the client broke a limit (drop it). */
typedef struct {
    const unsigned char *p;
    size_t n, off;
} ddp__store_rd;

static int ddp__store_rd_u64(ddp__store_rd *r, uint64_t *v) {
    if (r->n - r->off < 8) return 0;
    memcpy(v, r->p + r->off, 8);
    r->off += 8;
    return 1;
}

static int ddp__store_rd_blob(ddp__store_rd *r, uint64_t max, const unsigned char **p, size_t *len) {
    uint64_t l;
    if (!ddp__store_rd_u64(r, &l)) return 0;
    if (l > max) return -1;
    if (r->n - r->off < l) return 0;
    *p = r->p + r->off;
    *len = (size_t)l;
    r->off += (size_t)l;
    return 1;
}

#define DDP__STORE_RD(call)            \
    do {                               \
        int rr_ = (call);              \
        if (rr_ <= 0) return rr_;      \
    } while (0)

/* Checks that a whole key list has arrived (and obeys the limits). */
static int ddp__store_rd_keys(ddp__store_rd *r, uint64_t *count) {
    uint64_t n, i;
    const unsigned char *k;
    size_t kl;
    DDP__STORE_RD(ddp__store_rd_u64(r, &n));
    if (n > DDP__STORE_MAX_KEYS) return -1;
    for (i = 0; i < n; i++) DDP__STORE_RD(ddp__store_rd_blob(r, DDP__STORE_MAX_KEY_LEN, &k, &kl));
    *count = n;
    return 1;
}

static int ddp__store_parse_i64(const unsigned char *p, size_t n, int64_t *out) {
    char tmp[32];
    char *end;
    long long v;
    if (n == 0 || n >= sizeof tmp) return -1;
    memcpy(tmp, p, n);
    tmp[n] = 0;
    errno = 0;
    v = strtoll(tmp, &end, 10);
    if (end == tmp || *end != 0 || errno == ERANGE) return -1;
    *out = (int64_t)v;
    return 0;
}

/* Keys under the protected prefix are the job's: written once (SET of a
 * different value later is tampering), counters ("/count") only ADDed to,
 * never deleted. */
static int ddp__store_protected(const ddp__store_server *sv, const unsigned char *k, size_t kl) {
    return sv->protect_len && kl >= sv->protect_len && memcmp(k, sv->protect, sv->protect_len) == 0;
}

static int ddp__store_is_counter(const unsigned char *k, size_t kl) {
    return kl >= 6 && memcmp(k + kl - 6, "/count", 6) == 0;
}

/* A write to a protected key: 0 allowed (or the same value again), -1 refused
 * (the event is recorded, the value kept, the writer dropped). */
static int ddp__store_check_write(ddp__store_server *sv, ddp__store_conn *c, const char *op,
                                  const unsigned char *k, size_t kl, const unsigned char *v, size_t vl) {
    char show[128];
    ddp__store_kv *e;
    if (!ddp__store_protected(sv, k, kl)) return 0;
    e = ddp__store_kv_find(sv, k, kl);
    if (op[0] == 'S' && !ddp__store_is_counter(k, kl) &&
        (!e || (e->vlen == vl && (vl == 0 || memcmp(e->val, v, vl) == 0))))
        return 0;
    ddp__store_event(sv, DDP__EVENT_TAMPER,
                     "store tampering: %s of key '%s' by %s%s (the job writes that key once%s); another job on port %d, or a process that is not a rank",
                     op, ddp__store_show(k, kl, show, sizeof show), c->rank >= 0 ? "rank " : "a client at ",
                     c->rank >= 0 ? "" : c->peer, ddp__store_is_counter(k, kl) ? " and only adds to its counters" : "", sv->port);
    c->dead = 1;
    return -1;
}

/* The answer to a hello or a proof: status, rank 0's identity record (only
 * to a client that may see it: no secret, or the secret proven), and the
 * reason for a refusal. */
static void ddp__store_verdict(ddp__store_server *sv, ddp__store_conn *c, int status, int with_ident, const char *reason) {
    uint32_t il = with_ident ? (uint32_t)strlen(sv->ident_text) : 0, rl = (uint32_t)strlen(reason);
    ddp__store_conn_send_u8(sv, c, (unsigned)status);
    ddp__store_conn_send_u32(sv, c, il);
    ddp__store_conn_send(sv, c, sv->ident_text, il);
    ddp__store_conn_send_u32(sv, c, rl);
    ddp__store_conn_send(sv, c, reason, rl);
}

/* The identity in a hello: same job (accept), or both sides fail. */
static void ddp__store_hello_accept(ddp__store_server *sv, ddp__store_conn *c, int after_proof) {
    char msg[768];
    int status = DDP__HELLO_OK, r = c->ident.rank;
    size_t i;
    msg[0] = 0;
    if (sv->has_ident) {
        if (ddp__ident_compare(&sv->ident, &c->ident, sv->port, msg, sizeof msg) != DDP_SUCCESS) status = DDP__HELLO_MISMATCH;
        /* a rank reconnects from the same process; another process
           claiming a rank that is connected is another job's */
        for (i = 0; i < sv->nconns && status == DDP__HELLO_OK; i++) {
            const ddp__store_conn *o = sv->conns[i];
            if (o == c || o->hello != 2 || o->rank != r || o->dead || o->closing) continue;
            if (o->ident.pid == c->ident.pid && !strcmp(o->ident.host, c->ident.host)) continue;
            snprintf(msg, sizeof msg, "port %d is used by another job: two processes claim rank %d (pid %d on %s, pid %d on %s)",
                     sv->port, r, o->ident.pid, o->ident.host, c->ident.pid, c->ident.host);
            status = DDP__HELLO_MISMATCH;
        }
    }
    if (!after_proof) ddp__store_conn_send_u32(sv, c, DDP__STORE_REPLY_MAGIC);
    ddp__store_verdict(sv, c, status, 1, msg);
    if (status != DDP__HELLO_OK) {
        ddp__store_event(sv, DDP__EVENT_MISMATCH, "%s (a client at %s)", msg, c->peer);
        c->closing = 1;
        return;
    }
    c->hello = 2;
    c->rank = r;
    if (sv->rank_pid && r < sv->ident.world) __atomic_store_n(&sv->rank_pid[r], c->ident.pid, __ATOMIC_RELEASE);
    if (r != 0) __atomic_add_fetch(&sv->rank_clients, 1, __ATOMIC_ACQ_REL);
}

/* Serve one complete command from c's input: 1 served, 0 incomplete, -1 drop. */
static int ddp__store_serve_one(ddp__store_server *sv, ddp__store_conn *c) {
    ddp__store_rd r;
    const unsigned char *k = NULL, *v = NULL, *v2 = NULL;
    size_t kl = 0, vl = 0, vl2 = 0;
    uint64_t n, i;
    int op;
    ddp__store_kv *e;

    r.p = c->in + c->in_off;
    r.n = c->in_len - c->in_off;
    r.off = 1;
    if (r.n == 0 || c->closing || c->dead) return 0;
    if (c->proto == 0) {
        /* A V2 client starts with VALIDATE (0) + magic; a V1 SET (also 0) has an
         * 8-byte length there, which cannot hold the magic for any sane key. */
        uint32_t m;
        if (r.p[0] == 0) {
            if (r.n < 5) return 0;
            memcpy(&m, r.p + 1, 4);
            c->proto = m == DDP__STORE_MAGIC ? 2 : 1;
        } else {
            c->proto = 1;
        }
    }
    op = r.p[0];
    if (op == DDP__STORE_Q_HELLO || op == DDP__STORE_Q_PROOF || op == DDP__STORE_Q_EVENT || op == DDP__STORE_Q_ABORT) {
        /* the library's own requests: the same byte in both wire versions */
    } else if (c->proto == 2) {
        op = op == 0 ? DDP__STORE_Q_VALIDATE : op <= 7 ? op - 1 : op;
    }
    /* with a secret, nothing but the hello and its proof before the proof */
    if (sv->secret && c->hello != 2 && op != DDP__STORE_Q_HELLO && op != DDP__STORE_Q_PROOF) {
        ddp__store_logf(sv, 1, "store: rejected client %s: its first request (byte %u) came before it proved the job secret; not a rank of this job, or a rank without DDP_JOB_SECRET",
                        c->peer, (unsigned)r.p[0]);
        return -1;
    }

    switch (op) {
    case DDP__STORE_Q_HELLO: {
        uint32_t magic, len;
        const unsigned char *text;
        if (r.n - r.off < 8) return 0;
        memcpy(&magic, r.p + r.off, 4);
        memcpy(&len, r.p + r.off + 4, 4);
        if (magic != DDP__STORE_HELLO_MAGIC || len > DDP__IDENT_MAX || c->hello) {
            ddp__store_logf(sv, 1, "store: rejected client %s: a malformed or repeated hello", c->peer);
            return -1;
        }
        if (r.n - r.off < 8 + (size_t)len + 32) return 0;
        text = r.p + r.off + 8;
        memcpy(c->cnonce, text + len, 32);
        r.off += 8 + (size_t)len + 32;
        if (ddp__ident_parse((const char *)text, len, &c->ident) != 0) {
            ddp__store_logf(sv, 1, "store: rejected client %s: its hello holds no identity record (another program, or another ddp.h version?)", c->peer);
            return -1;
        }
        if (sv->secret && !c->ident.secret) {
            ddp__store_conn_send_u32(sv, c, DDP__STORE_REPLY_MAGIC);
            ddp__store_verdict(sv, c, DDP__HELLO_NEED_SECRET, 0, "");
            ddp__store_logf(sv, 1, "store: rejected client %s claiming rank %d: it has no job secret (not a rank of this job, or started without DDP_JOB_SECRET)",
                            c->peer, c->ident.rank);
            c->closing = 1;
            break;
        }
        if (sv->secret) {
            unsigned char proof[32];
            if (ddp__sys_random(c->snonce, sizeof c->snonce) != 0) return -1;
            ddp__hmac_sha256(sv->secret, sv->secret_len, "ddp.h store server", 18, c->cnonce, 32, c->snonce, 32, proof);
            ddp__store_conn_send_u32(sv, c, DDP__STORE_REPLY_MAGIC);
            ddp__store_verdict(sv, c, DDP__HELLO_CHALLENGE, 0, "");
            ddp__store_conn_send(sv, c, c->snonce, 32);
            ddp__store_conn_send(sv, c, proof, 32);
            c->hello = 1;
            break;
        }
        ddp__store_hello_accept(sv, c, 0);
        break;
    }
    case DDP__STORE_Q_PROOF: {
        unsigned char want[32];
        if (r.n - r.off < 32) return 0;
        if (c->hello != 1) return -1;
        ddp__hmac_sha256(sv->secret, sv->secret_len, "ddp.h store client", 18, c->snonce, 32, c->cnonce, 32, want);
        if (!ddp__ct_equal(want, r.p + r.off, 32)) {
            r.off += 32;
            ddp__store_verdict(sv, c, DDP__HELLO_BAD_PROOF, 0, "");
            ddp__store_logf(sv, 1, "store: rejected client %s claiming rank %d: wrong job secret (not a rank of this job, or the ranks were given different secrets)",
                            c->peer, c->ident.rank);
            c->closing = 1;
            break;
        }
        r.off += 32;
        ddp__store_hello_accept(sv, c, 1);
        break;
    }
    case DDP__STORE_Q_EVENT: {
        unsigned char kind;
        size_t ml;
        if (!__atomic_load_n(&sv->event_set, __ATOMIC_ACQUIRE)) {
            ddp__store_conn_send_blob(sv, c, "", 0);
            break;
        }
        kind = (unsigned char)sv->event_kind;
        ml = strlen(sv->event_msg);
        n = (uint64_t)(ml + 1);
        ddp__store_conn_send(sv, c, &n, 8);
        ddp__store_conn_send(sv, c, &kind, 1);
        ddp__store_conn_send(sv, c, sv->event_msg, ml);
        break;
    }
    case DDP__STORE_Q_ABORT: {
        char msg[1024];
        DDP__STORE_RD(ddp__store_rd_blob(&r, 1000, &v, &vl));
        if (c->hello != 2) return -1; /* only a rank may end the rendezvous */
        for (i = 0; i < vl && i + 1 < sizeof msg; i++) msg[i] = v[i] >= 32 && v[i] < 127 ? (char)v[i] : '?';
        msg[i] = 0;
        ddp__store_event(sv, DDP__EVENT_ABORT, "%s", msg);
        break;
    }
    case DDP__STORE_Q_VALIDATE: {
        uint32_t m;
        if (r.n - r.off < 4) return 0;
        memcpy(&m, r.p + r.off, 4);
        if (m != DDP__STORE_MAGIC) return -1;
        r.off += 4;
        break;
    }
    case DDP__STORE_Q_PING: {
        if (r.n - r.off < 4) return 0;
        ddp__store_conn_send(sv, c, r.p + r.off, 4);
        r.off += 4;
        break;
    }
    case DDP__STORE_Q_SET:
    case DDP__STORE_Q_APPEND:
        DDP__STORE_RD(ddp__store_rd_blob(&r, DDP__STORE_MAX_KEY_LEN, &k, &kl));
        DDP__STORE_RD(ddp__store_rd_blob(&r, DDP__STORE_MAX_VALUE_LEN, &v, &vl));
        if (ddp__store_check_write(sv, c, op == DDP__STORE_Q_SET ? "SET" : "APPEND", k, kl, v, vl) != 0) return -1;
        if (ddp__store_kv_put(sv, k, kl, v, vl, op == DDP__STORE_Q_APPEND) != 0) {
            ddp__store_drop(sv, c, "storing %zu bytes would pass the store's cap of %zu bytes", vl, sv->max_bytes);
            return -1;
        }
        ddp__store_wake(sv, k, kl);
        break;
    case DDP__STORE_Q_COMPARE_SET:
        DDP__STORE_RD(ddp__store_rd_blob(&r, DDP__STORE_MAX_KEY_LEN, &k, &kl));
        DDP__STORE_RD(ddp__store_rd_blob(&r, DDP__STORE_MAX_VALUE_LEN, &v, &vl));
        DDP__STORE_RD(ddp__store_rd_blob(&r, DDP__STORE_MAX_VALUE_LEN, &v2, &vl2));
        if (ddp__store_check_write(sv, c, "COMPARE_SET", k, kl, v2, vl2) != 0) return -1;
        e = ddp__store_kv_find(sv, k, kl);
        if (!e) {
            /* torch: a missing key is created only when expected is empty;
             * otherwise the reply is the expected value (its own "lie"). */
            if (vl == 0) {
                if (ddp__store_kv_put(sv, k, kl, v2, vl2, 0) != 0) return -1;
                ddp__store_conn_send_blob(sv, c, v2, vl2);
                ddp__store_wake(sv, k, kl);
            } else {
                ddp__store_conn_send_blob(sv, c, v, vl);
            }
        } else {
            if (e->vlen == vl && (vl == 0 || memcmp(e->val, v, vl) == 0)) {
                if (ddp__store_kv_put(sv, k, kl, v2, vl2, 0) != 0) return -1;
                e = ddp__store_kv_find(sv, k, kl);
            }
            ddp__store_conn_send_blob(sv, c, e->val, e->vlen);
        }
        break;
    case DDP__STORE_Q_GET:
        DDP__STORE_RD(ddp__store_rd_blob(&r, DDP__STORE_MAX_KEY_LEN, &k, &kl));
        e = ddp__store_kv_find(sv, k, kl);
        if (!e) return -1; /* as torch: GET of a missing key drops the client */
        ddp__store_conn_send_blob(sv, c, e->val, e->vlen);
        break;
    case DDP__STORE_Q_ADD: {
        uint64_t d;
        int64_t cur = 0, sum;
        char text[32], show[128];
        DDP__STORE_RD(ddp__store_rd_blob(&r, DDP__STORE_MAX_KEY_LEN, &k, &kl));
        DDP__STORE_RD(ddp__store_rd_u64(&r, &d));
        e = ddp__store_kv_find(sv, k, kl);
        if (e && ddp__store_parse_i64(e->val, e->vlen, &cur) != 0) {
            if (ddp__store_protected(sv, k, kl)) {
                char val[64];
                ddp__store_event(sv, DDP__EVENT_TAMPER,
                                 "store tampering: key '%s' holds '%s' where a counter is expected (written by another job on port %d, or a process that is not a rank)",
                                 ddp__store_show(k, kl, show, sizeof show), ddp__store_show(e->val, e->vlen < 40 ? e->vlen : 40, val, sizeof val), sv->port);
            }
            return -1; /* as torch: the client is dropped */
        }
        if (!e && ddp__store_protected(sv, k, kl) && !ddp__store_is_counter(k, kl) &&
            ddp__store_check_write(sv, c, "ADD", k, kl, NULL, 0) != 0)
            return -1;
        sum = (int64_t)((uint64_t)cur + d); /* wraps like torch's int64 */
        snprintf(text, sizeof text, "%lld", (long long)sum);
        if (ddp__store_kv_put(sv, k, kl, text, strlen(text), 0) != 0) return -1;
        ddp__store_conn_send_i64(sv, c, sum);
        ddp__store_wake(sv, k, kl);
        break;
    }
    case DDP__STORE_Q_CHECK:
    case DDP__STORE_Q_WAIT: {
        size_t start = r.off, missing = 0, bytes = 0;
        DDP__STORE_RD(ddp__store_rd_keys(&r, &n));
        r.off = start + 8;
        for (i = 0; i < n; i++) {
            ddp__store_rd_blob(&r, DDP__STORE_MAX_KEY_LEN, &k, &kl);
            if (!ddp__store_kv_find(sv, k, kl)) { missing++; bytes += kl + 1 + sizeof(char *) + sizeof(size_t); }
        }
        if (op == DDP__STORE_Q_WAIT && __atomic_load_n(&sv->event_set, __ATOMIC_ACQUIRE)) {
            ddp__store_conn_send_u8(sv, c, DDP__STORE_WAIT_ABORTED);
            break;
        }
        if (op == DDP__STORE_Q_CHECK || missing == 0) {
            ddp__store_conn_send_u8(sv, c, missing == 0 ? 0 : 1); /* READY/STOP_WAITING : NOT_READY */
            break;
        }
        ddp__store_conn_clear_wait(sv, c);
        if (ddp__store_charge(sv, bytes) != 0) {
            ddp__store_drop(sv, c, "its WAIT would make the store hold more than %zu bytes", sv->max_bytes);
            return -1;
        }
        c->wbytes = bytes;
        c->wkeys = (char **)calloc(missing, sizeof *c->wkeys);
        c->wlens = (size_t *)calloc(missing, sizeof *c->wlens);
        if (!c->wkeys || !c->wlens) return -1;
        r.off = start + 8;
        for (i = 0; i < n; i++) {
            ddp__store_rd_blob(&r, DDP__STORE_MAX_KEY_LEN, &k, &kl);
            if (ddp__store_kv_find(sv, k, kl)) continue;
            c->wkeys[c->nwait] = (char *)malloc(kl + 1);
            if (!c->wkeys[c->nwait]) return -1;
            memcpy(c->wkeys[c->nwait], k, kl);
            c->wlens[c->nwait++] = kl;
        }
        c->waiting = 1;
        break;
    }
    case DDP__STORE_Q_CANCEL_WAIT:
        ddp__store_conn_clear_wait(sv, c);
        ddp__store_conn_send_u8(sv, c, 1); /* WAIT_CANCELED */
        break;
    case DDP__STORE_Q_GETNUMKEYS:
        ddp__store_conn_send_i64(sv, c, (int64_t)sv->nkeys);
        break;
    case DDP__STORE_Q_DELETE_KEY:
        DDP__STORE_RD(ddp__store_rd_blob(&r, DDP__STORE_MAX_KEY_LEN, &k, &kl));
        if (ddp__store_protected(sv, k, kl) && ddp__store_check_write(sv, c, "DELETE", k, kl, NULL, 0) != 0) return -1;
        ddp__store_conn_send_i64(sv, c, ddp__store_kv_del(sv, k, kl));
        break;
    case DDP__STORE_Q_MULTI_GET: {
        size_t start = r.off;
        DDP__STORE_RD(ddp__store_rd_keys(&r, &n));
        r.off = start + 8;
        for (i = 0; i < n; i++) {
            ddp__store_rd_blob(&r, DDP__STORE_MAX_KEY_LEN, &k, &kl);
            e = ddp__store_kv_find(sv, k, kl);
            if (!e) return -1;
            ddp__store_conn_send_blob(sv, c, e->val, e->vlen);
        }
        break;
    }
    case DDP__STORE_Q_MULTI_SET: {
        size_t start = r.off;
        DDP__STORE_RD(ddp__store_rd_u64(&r, &n));
        if (n > DDP__STORE_MAX_KEYS) return -1;
        for (i = 0; i < n; i++) {
            DDP__STORE_RD(ddp__store_rd_blob(&r, DDP__STORE_MAX_KEY_LEN, &k, &kl));
            DDP__STORE_RD(ddp__store_rd_blob(&r, DDP__STORE_MAX_VALUE_LEN, &v, &vl));
        }
        r.off = start + 8;
        for (i = 0; i < n; i++) {
            ddp__store_rd_blob(&r, DDP__STORE_MAX_KEY_LEN, &k, &kl);
            ddp__store_rd_blob(&r, DDP__STORE_MAX_VALUE_LEN, &v, &vl);
            if (ddp__store_check_write(sv, c, "SET", k, kl, v, vl) != 0) return -1;
            if (ddp__store_kv_put(sv, k, kl, v, vl, 0) != 0) return -1;
            ddp__store_wake(sv, k, kl);
        }
        break;
    }
    default: /* WATCH_KEY (torch's callback client) and unknown bytes */
        return -1;
    }
    c->in_off += r.off;
    return 1;
}

static void ddp__store_conn_flush(ddp__store_server *sv, ddp__store_conn *c) {
    while (!c->dead && c->out_off < c->out.n) {
        ssize_t w = send(c->fd, c->out.p + c->out_off, c->out.n - c->out_off,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0) { c->out_off += (size_t)w; continue; }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        c->dead = 1; /* EPIPE, ECONNRESET, ...: the peer is gone */
    }
    if (c->out_off == c->out.n) {
        c->out_off = c->out.n = 0;
        if (c->out.cap > (1u << 20)) { /* an idle connection holds no large buffer */
            ddp__store_uncharge(sv, c->out.cap);
            free(c->out.p);
            c->out.p = NULL;
            c->out.cap = 0;
        }
        if (c->closing) c->dead = 1;
    }
}

/* Read what is there, serve every complete command, note EOF. */
static void ddp__store_conn_input(ddp__store_server *sv, ddp__store_conn *c) {
    for (;;) {
        ssize_t got;
        if (c->in_cap - c->in_len < 65536) {
            size_t cap = c->in_cap ? c->in_cap : 65536;
            unsigned char *q;
            while (cap - c->in_len < 65536) cap *= 2;
            if (ddp__store_charge(sv, cap - c->in_cap) != 0) {
                ddp__store_drop(sv, c, "its request would make the store hold more than %zu bytes", sv->max_bytes);
                return;
            }
            q = (unsigned char *)realloc(c->in, cap);
            if (!q) {
                ddp__store_uncharge(sv, cap - c->in_cap);
                ddp__store_drop(sv, c, "out of memory for its request");
                return;
            }
            c->in = q;
            c->in_cap = cap;
        }
        got = recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, 0);
        if (got > 0) { c->in_len += (size_t)got; c->active = 1; break; }
        if (got < 0 && errno == EINTR) continue;
        if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        c->eof = 1; /* 0 = orderly close; errors count as a close too */
        break;
    }
    for (;;) {
        int rc = ddp__store_serve_one(sv, c);
        if (rc < 0) {
            if (!c->dead) ddp__store_drop(sv, c, "it sent a malformed request or broke a limit");
            break;
        }
        if (rc == 0) break;
    }
    if (c->in_off == c->in_len) {
        c->in_off = c->in_len = 0;
        c->t_partial = 0;
    } else {
        if (c->in_off > 0) {
            memmove(c->in, c->in + c->in_off, c->in_len - c->in_off);
            c->in_len -= c->in_off;
            c->in_off = 0;
        }
        if (c->t_partial == 0) c->t_partial = ddp__store_now();
    }
    /* shrink after a large value so idle connections do not hold memory */
    if (c->in_len == 0 && c->in_cap > (1u << 20)) {
        ddp__store_uncharge(sv, c->in_cap);
        free(c->in);
        c->in = NULL;
        c->in_cap = 0;
    }
}

static void ddp__store_conn_free(ddp__store_server *sv, ddp__store_conn *c) {
    if (c->hello == 1 && c->eof)
        ddp__store_logf(sv, 1, "store: rejected client %s claiming rank %d: it did not prove the job secret (the secrets differ, or not a rank of this job)",
                        c->peer, c->ident.rank);
    if (c->hello == 2 && c->rank != 0) __atomic_sub_fetch(&sv->rank_clients, 1, __ATOMIC_ACQ_REL);
    close(c->fd);
    ddp__store_conn_clear_wait(sv, c);
    ddp__store_uncharge(sv, c->in_cap + c->out.cap + sizeof *c);
    free(c->in);
    free(c->out.p);
    free(c);
}

static void ddp__store_peer_name(const struct sockaddr_storage *ss, char *out, size_t cap) {
    char host[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)(const void *)ss;
        inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
        port = ntohs(a->sin_port);
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)(const void *)ss;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
        port = ntohs(a->sin6_port);
    }
    snprintf(out, cap, "%s:%d", host, port);
}

static void ddp__store_server_accept(ddp__store_server *sv, int *paused) {
    for (;;) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof ss;
        int fd = accept(sv->listen_fd, (struct sockaddr *)&ss, &sl), one = 1;
        ddp__store_conn *c;
        char peer[64];
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
                *paused = 1; /* retry in a while instead of spinning on POLLIN */
            return;
        }
        ddp__store_peer_name(&ss, peer, sizeof peer);
        if (sv->nconns >= sv->max_conns) {
            /* at the cap: the oldest connection that never sent a byte makes room */
            ddp__store_conn *victim = NULL;
            size_t i;
            for (i = 0; i < sv->nconns; i++) {
                ddp__store_conn *o = sv->conns[i];
                if (!o->active && !o->dead && (!victim || o->t_open < victim->t_open)) victim = o;
            }
            if (!victim) {
                ddp__store_logf(sv, 1, "store: refused a connection from %s: %zu connections are open, the cap", peer, sv->max_conns);
                close(fd);
                continue;
            }
            ddp__store_drop(sv, victim, "evicted: %zu connections are open (the cap) and it has sent nothing", sv->max_conns);
        }
        ddp__store_sock_setup(fd);
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        c = NULL;
        if (ddp__store_charge(sv, sizeof *c) == 0) {
            c = (ddp__store_conn *)calloc(1, sizeof *c);
            if (!c) ddp__store_uncharge(sv, sizeof *c);
        }
        if (c && sv->nconns == sv->conns_cap) {
            size_t cap = sv->conns_cap ? sv->conns_cap * 2 : 16;
            ddp__store_conn **q = (ddp__store_conn **)realloc(sv->conns, cap * sizeof *q);
            if (q) { sv->conns = q; sv->conns_cap = cap; }
        }
        if (!c || sv->nconns == sv->conns_cap) {
            if (c) ddp__store_uncharge(sv, sizeof *c);
            free(c);
            close(fd);
            ddp__store_logf(sv, 1, "store: refused a connection from %s: the store holds %zu bytes, its cap", peer, sv->bytes);
            *paused = 1;
            return;
        }
        c->fd = fd;
        c->rank = -1;
        c->t_open = ddp__store_now();
        memcpy(c->peer, peer, sizeof c->peer);
        sv->conns[sv->nconns++] = c;
    }
}

/* Drop connections that sent nothing, or left a request half-sent, for too
 * long; return the poll timeout (ms) until the next such deadline, -1 none. */
static int ddp__store_expire(ddp__store_server *sv) {
    double now = ddp__store_now(), next = 1e300;
    size_t i;
    int dropped = 0;
    for (i = 0; i < sv->nconns; i++) {
        ddp__store_conn *c = sv->conns[i];
        double due;
        if (c->dead) { dropped = 1; continue; }
        if (!c->active) {
            due = c->t_open + sv->idle_timeout_s;
            if (now >= due) { ddp__store_drop(sv, c, "it sent nothing for %.1f s", sv->idle_timeout_s); dropped = 1; continue; }
            if (due < next) next = due;
        }
        if (c->t_partial > 0) {
            due = c->t_partial + sv->slow_timeout_s;
            if (now >= due) { ddp__store_drop(sv, c, "a request took more than %.1f s to arrive", sv->slow_timeout_s); dropped = 1; continue; }
            if (due < next) next = due;
        }
    }
    if (dropped) return 0; /* free them in this round */
    if (next >= 1e299) return -1;
    return (int)((next - now) * 1000.0) + 1;
}

static void *ddp__store_server_main(void *arg) {
    ddp__store_server *sv = (ddp__store_server *)arg;
    struct pollfd *pfd = NULL;
    size_t pcap = 0;
    int paused = 0;
    for (;;) {
        size_t i, n = sv->nconns, live;
        int rc, tmo;
        if (n + 2 > pcap) {
            size_t cap = (n + 2) * 2;
            struct pollfd *q = (struct pollfd *)realloc(pfd, cap * sizeof *q);
            if (q) { pfd = q; pcap = cap; }
        }
        if (n + 2 > pcap) { ddp__store_sleep(0.01); continue; }
        pfd[0].fd = sv->listen_fd; /* -1 once closed: poll skips it */
        pfd[0].events = paused ? 0 : POLLIN;
        pfd[1].fd = sv->wake[0];
        pfd[1].events = POLLIN;
        for (i = 0; i < n; i++) {
            pfd[2 + i].fd = sv->conns[i]->fd;
            pfd[2 + i].events = (short)(POLLIN | (sv->conns[i]->out.n ? POLLOUT : 0));
        }
        for (i = 0; i < n + 2; i++) pfd[i].revents = 0;
        tmo = ddp__store_expire(sv);
        if (paused && (tmo < 0 || tmo > 100)) tmo = 100;
        rc = poll(pfd, (nfds_t)(n + 2), tmo);
        if (rc < 0) {
            if (errno != EINTR) ddp__store_sleep(0.01);
            continue;
        }
        paused = 0;
        if (pfd[1].revents) {
            /* wake-up byte: 1 stop, 2 stop accepting (existing clients stay served) */
            char cmd[16];
            ssize_t k = read(sv->wake[0], cmd, sizeof cmd), j;
            int stop = 0;
            for (j = 0; j < k; j++) {
                if (cmd[j] == 1) stop = 1;
                if (cmd[j] == 2 && sv->listen_fd >= 0) { close(sv->listen_fd); sv->listen_fd = -1; }
                if (cmd[j] == 3 && __atomic_load_n(&sv->ext_set, __ATOMIC_ACQUIRE)) ddp__store_event(sv, DDP__EVENT_ABORT, "%s", sv->ext_msg);
            }
            if (stop) break;
        }
        if (pfd[0].revents & POLLIN) ddp__store_server_accept(sv, &paused);
        for (i = 0; i < n; i++) { /* connections accepted just now wait a round */
            ddp__store_conn *c = sv->conns[i];
            short re = pfd[2 + i].revents;
            if (c->dead) continue;
            if (re & POLLOUT) ddp__store_conn_flush(sv, c);
            if (re & (POLLIN | POLLHUP | POLLERR)) ddp__store_conn_input(sv, c);
        }
        /* answers may have been queued on any connection (WAITs woken) */
        for (live = 0, i = 0; i < sv->nconns; i++) {
            ddp__store_conn *c = sv->conns[i];
            ddp__store_conn_flush(sv, c);
            if (c->dead || c->eof) {
                ddp__store_conn_free(sv, c);
            } else {
                sv->conns[live++] = c;
            }
        }
        sv->nconns = live;
        __atomic_store_n(&sv->live_clients, (int)live, __ATOMIC_RELEASE);
    }
    free(pfd);
    return NULL;
}

static int ddp__store_listen_on(const struct sockaddr *sa, socklen_t len, int *fd_out, int *err_no) {
    int one = 1, zero = 0;
    int fd = socket(sa->sa_family, SOCK_STREAM, 0);
    if (fd < 0) { *err_no = errno; return -1; }
    ddp__store_sock_setup(fd);
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one); /* restart within TIME_WAIT */
    if (sa->sa_family == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    if (bind(fd, sa, len) != 0 || listen(fd, 4096) != 0) {
        *err_no = errno;
        close(fd);
        return -1;
    }
    *fd_out = fd;
    return 0;
}

static void ddp__store_server_free(ddp__store_server *sv) {
    free(sv->buckets);
    free(sv->rank_pid);
    if (sv->secret) { memset(sv->secret, 0, sv->secret_len); free(sv->secret); }
    free(sv);
}

/* Listen on bind_host (NULL: every interface, IPv6 dual-stack when available)
 * and serve on a background thread. port 0 picks a free port (see
 * ddp__store_server_port). Fails, naming the port, when it is taken.
 * opts may be NULL (a bare TCPStore with the default limits). */
static DDP__STORE_UNUSED int ddp__store_server_start(const char *bind_host, int port, const ddp__store_opts *opts,
                                                     ddp__store_server **out, char *err, size_t errlen) {
    ddp__store_server *sv;
    int fd = -1, err_no = 0, rc;
    sigset_t all, old;
    union {
        struct sockaddr sa;
        struct sockaddr_in in4;
        struct sockaddr_in6 in6;
        struct sockaddr_storage ss;
    } addr;
    socklen_t alen;
    ddp__store_opts none;

    *out = NULL;
    if (!opts) { memset(&none, 0, sizeof none); opts = &none; }
    if (port < 0 || port > 65535) return ddp__store_fail(err, errlen, "cannot listen on port %d: not a TCP port (0..65535)", port);

    sv = (ddp__store_server *)calloc(1, sizeof *sv);
    if (sv) sv->buckets = (ddp__store_kv **)calloc(64, sizeof *sv->buckets);
    if (!sv || !sv->buckets) {
        if (sv) free(sv);
        return ddp__store_fail(err, errlen, "cannot start store server on port %d: out of memory", port);
    }
    sv->nbuckets = 64;
    sv->listen_fd = -1;
    sv->max_bytes = opts->max_bytes ? opts->max_bytes : DDP__STORE_DEFAULT_MAX_BYTES;
    sv->max_conns = (size_t)(opts->world > 0 ? opts->world : 1) * 2 + DDP__STORE_CONN_HEADROOM;
    sv->idle_timeout_s = opts->idle_timeout_s > 0 ? opts->idle_timeout_s : DDP__STORE_IDLE_TIMEOUT_S;
    sv->slow_timeout_s = opts->slow_timeout_s > 0 ? opts->slow_timeout_s : DDP__STORE_SLOW_TIMEOUT_S;
    sv->log = opts->log;
    sv->log_user = opts->log_user;
    if (opts->protect) ddp__copy_str(sv->protect, sizeof sv->protect, opts->protect);
    sv->protect_len = strlen(sv->protect);
    if (opts->secret && opts->secret_len) {
        sv->secret = (unsigned char *)malloc(opts->secret_len);
        if (!sv->secret) { ddp__store_server_free(sv); return ddp__store_fail(err, errlen, "cannot start store server: out of memory"); }
        memcpy(sv->secret, opts->secret, opts->secret_len);
        sv->secret_len = opts->secret_len;
    }
    if (opts->ident) {
        if (ddp__ident_parse(opts->ident, strlen(opts->ident), &sv->ident) != 0) {
            ddp__store_server_free(sv);
            return ddp__store_fail(err, errlen, "cannot start store server: malformed identity record '%.80s'", opts->ident);
        }
        sv->has_ident = 1;
        ddp__copy_str(sv->ident_text, sizeof sv->ident_text, opts->ident);
        sv->rank_pid = (int *)calloc((size_t)sv->ident.world, sizeof *sv->rank_pid);
        if (!sv->rank_pid) { ddp__store_server_free(sv); return ddp__store_fail(err, errlen, "cannot start store server: out of memory"); }
    }

    if (!bind_host || !*bind_host) {
        memset(&addr, 0, sizeof addr);
        addr.in6.sin6_family = AF_INET6;
        addr.in6.sin6_addr = in6addr_any;
        addr.in6.sin6_port = htons((uint16_t)port);
        if (ddp__store_listen_on(&addr.sa, sizeof addr.in6, &fd, &err_no) != 0 &&
            err_no != EADDRINUSE && err_no != EACCES) {
            memset(&addr, 0, sizeof addr); /* no IPv6 on this host */
            addr.in4.sin_family = AF_INET;
            addr.in4.sin_addr.s_addr = htonl(INADDR_ANY);
            addr.in4.sin_port = htons((uint16_t)port);
            ddp__store_listen_on(&addr.sa, sizeof addr.in4, &fd, &err_no);
        }
        if (fd < 0) {
            ddp__store_server_free(sv);
            return ddp__store_fail(err, errlen, "cannot listen on port %d: %s", port, strerror(err_no));
        }
    } else {
        struct addrinfo hints, *res = NULL, *ai;
        char ps[16];
        memset(&hints, 0, sizeof hints);
        hints.ai_family = AF_UNSPEC;
        hints.ai_socktype = SOCK_STREAM;
        hints.ai_flags = AI_PASSIVE;
        snprintf(ps, sizeof ps, "%d", port);
        rc = getaddrinfo(bind_host, ps, &hints, &res);
        if (rc != 0) {
            ddp__store_server_free(sv);
            return ddp__store_fail(err, errlen, "cannot listen on %s:%d: cannot resolve '%s': %s",
                                   bind_host, port, bind_host, gai_strerror(rc));
        }
        for (ai = res; ai && fd < 0; ai = ai->ai_next)
            ddp__store_listen_on(ai->ai_addr, ai->ai_addrlen, &fd, &err_no);
        freeaddrinfo(res);
        if (fd < 0) {
            ddp__store_server_free(sv);
            return ddp__store_fail(err, errlen, "cannot listen on %s:%d: %s", bind_host, port, strerror(err_no));
        }
    }
    sv->listen_fd = fd;
    alen = sizeof addr;
    if (getsockname(fd, &addr.sa, &alen) == 0)
        sv->port = ntohs(addr.sa.sa_family == AF_INET6 ? addr.in6.sin6_port : addr.in4.sin_port);
    if (pipe(sv->wake) != 0) {
        err_no = errno;
        close(fd);
        ddp__store_server_free(sv);
        return ddp__store_fail(err, errlen, "cannot start store server on port %d: pipe: %s", port, strerror(err_no));
    }
    fcntl(sv->wake[0], F_SETFD, FD_CLOEXEC);
    fcntl(sv->wake[1], F_SETFD, FD_CLOEXEC);
    /* the server thread takes no signals: they belong to the user's threads */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(&sv->thread, NULL, ddp__store_server_main, sv);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        close(fd);
        close(sv->wake[0]);
        close(sv->wake[1]);
        ddp__store_server_free(sv);
        return ddp__store_fail(err, errlen, "cannot start store server thread: %s", strerror(rc));
    }
    *out = sv;
    return 0;
}

static DDP__STORE_UNUSED int ddp__store_server_port(const ddp__store_server *sv) { return sv ? sv->port : 0; }

/* Stop accepting connections; the clients connected keep being served.
   The port is then free for a new store (the next context's). */
static DDP__STORE_UNUSED void ddp__store_server_close_listener(ddp__store_server *sv) {
    char b = 2;
    if (!sv) return;
    while (write(sv->wake[1], &b, 1) < 0 && errno == EINTR) {
    }
}

/* Rank 0 gives up: every rank waiting in the store (and every later
   wait) ends with msg. Any thread; the first call wins. */
static DDP__STORE_UNUSED void ddp__store_server_abort(ddp__store_server *sv, const char *msg) {
    char b = 3;
    if (!sv || __atomic_load_n(&sv->ext_set, __ATOMIC_ACQUIRE)) return;
    ddp__copy_str(sv->ext_msg, sizeof sv->ext_msg, msg);
    __atomic_store_n(&sv->ext_set, 1, __ATOMIC_RELEASE);
    while (write(sv->wake[1], &b, 1) < 0 && errno == EINTR) {
    }
}

/* Clients connected right now (any thread may ask). */
static DDP__STORE_UNUSED int ddp__store_server_clients(const ddp__store_server *sv) {
    return sv ? __atomic_load_n(&sv->live_clients, __ATOMIC_ACQUIRE) : 0;
}

/* Connections of accepted ranks other than rank 0 (any thread may ask):
   strangers do not count, so they cannot delay rank 0's exit. */
static DDP__STORE_UNUSED int ddp__store_server_rank_clients(const ddp__store_server *sv) {
    return sv ? __atomic_load_n(&sv->rank_clients, __ATOMIC_ACQUIRE) : 0;
}

/* The event that ended the rendezvous, if any (any thread may ask): its
   kind (DDP__EVENT_*) and message; 0 when there is none. */
static DDP__STORE_UNUSED int ddp__store_server_event(const ddp__store_server *sv, char *msg, size_t cap) {
    if (!sv || !__atomic_load_n(&sv->event_set, __ATOMIC_ACQUIRE)) return 0;
    if (msg && cap) ddp__copy_str(msg, cap, sv->event_msg);
    return sv->event_kind;
}

/* The pid rank r gave in its accepted hello (0: none yet; any thread). */
static DDP__STORE_UNUSED int ddp__store_server_rank_pid(const ddp__store_server *sv, int r) {
    if (!sv || !sv->rank_pid || r < 0 || r >= sv->ident.world) return 0;
    return __atomic_load_n(&sv->rank_pid[r], __ATOMIC_ACQUIRE);
}

/* Memory the server holds now (its thread's figure; a test's probe). */
static DDP__STORE_UNUSED size_t ddp__store_server_bytes(const ddp__store_server *sv) {
    return sv ? __atomic_load_n(&sv->bytes, __ATOMIC_RELAXED) : 0;
}

/* Stop serving, drop every connection (blocked clients see the close), free. */
static DDP__STORE_UNUSED void ddp__store_server_stop(ddp__store_server *sv) {
    size_t i;
    char b = 1;
    if (!sv) return;
    while (write(sv->wake[1], &b, 1) < 0 && errno == EINTR) {
    }
    pthread_join(sv->thread, NULL);
    for (i = 0; i < sv->nconns; i++) ddp__store_conn_free(sv, sv->conns[i]);
    free(sv->conns);
    for (i = 0; i < sv->nbuckets; i++) {
        ddp__store_kv *e = sv->buckets[i], *next;
        for (; e; e = next) {
            next = e->next;
            free(e->val);
            free(e);
        }
    }
    if (sv->listen_fd >= 0) close(sv->listen_fd);
    close(sv->wake[0]);
    close(sv->wake[1]);
    ddp__store_server_free(sv);
}

/* ======================================================================== */
/* CLIENT                                                                    */

typedef struct ddp__store {
    int fd;           /* -1 when not connected */
    int proto;        /* resolved wire version: DDP__STORE_PROTO_V1 or _V2 */
    int broken;       /* the connection's state is unknown: reconnect first */
    double timeout_s; /* per call (connect, reply, key wait); <= 0: forever */
    int port;
    char host[256];
    char prefix[256]; /* prepended verbatim to every key (ddp__store_set_prefix) */
    /* the library's hello, with a store of rank 0's (ddp__store_set_hello) */
    int hello;
    unsigned char secret[DDP__SECRET_MAX];
    size_t secret_len;                   /* 0: no secret */
    char ident[DDP__IDENT_MAX + 1];      /* this rank's identity record */
    char peer_ident[DDP__IDENT_MAX + 1]; /* rank 0's, from the store's answer ("" before) */
    int owner_pid;    /* rank 0's pid when it runs on this host: reconnects stop when it is gone */
    int fatal;        /* a ddp_result: the store refused this rank for good, or ended the rendezvous */
    char fatal_msg[512]; /* why (repeated by every later call) */
} ddp__store;

/* A failure that ends this client for good: remember why. */
static void ddp__store_note_fatal(ddp__store *s, const char *err) {
    if (s->fatal && !s->fatal_msg[0] && err) ddp__copy_str(s->fatal_msg, sizeof s->fatal_msg, err);
}

enum { DDP__STORE_IO_OK, DDP__STORE_IO_TIMEOUT, DDP__STORE_IO_CLOSED, DDP__STORE_IO_ERROR };

static int ddp__store_poll1(int fd, short ev, double deadline, int *err_no) {
    for (;;) {
        struct pollfd p;
        int ms = ddp__store_ms_left(deadline), r;
        p.fd = fd;
        p.events = ev;
        p.revents = 0;
        r = poll(&p, 1, ms);
        if (r > 0) return DDP__STORE_IO_OK; /* POLLHUP/POLLERR: the next call says */
        if (r == 0) {
            if (ms >= 0 && ddp__store_now() >= deadline) return DDP__STORE_IO_TIMEOUT;
            continue;
        }
        if (errno == EINTR) continue;
        *err_no = errno;
        return DDP__STORE_IO_ERROR;
    }
}

static int ddp__store_send_all(int fd, const void *buf, size_t n, double deadline, int *err_no) {
    const unsigned char *p = (const unsigned char *)buf;
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w > 0) { p += w; n -= (size_t)w; continue; }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            int r = ddp__store_poll1(fd, POLLOUT, deadline, err_no);
            if (r != DDP__STORE_IO_OK) return r;
            continue;
        }
        *err_no = w < 0 ? errno : EIO;
        return (*err_no == EPIPE || *err_no == ECONNRESET) ? DDP__STORE_IO_CLOSED : DDP__STORE_IO_ERROR;
    }
    return DDP__STORE_IO_OK;
}

static int ddp__store_recv_all(int fd, void *buf, size_t n, double deadline, int *err_no) {
    unsigned char *p = (unsigned char *)buf;
    while (n > 0) {
        ssize_t r = recv(fd, p, n, 0);
        if (r > 0) { p += r; n -= (size_t)r; continue; }
        if (r == 0) { *err_no = 0; return DDP__STORE_IO_CLOSED; }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            int rc = ddp__store_poll1(fd, POLLIN, deadline, err_no);
            if (rc != DDP__STORE_IO_OK) return rc;
            continue;
        }
        *err_no = errno;
        return errno == ECONNRESET ? DDP__STORE_IO_CLOSED : DDP__STORE_IO_ERROR;
    }
    return DDP__STORE_IO_OK;
}

/* Open a TCP connection, retrying refusals and failed look-ups until deadline
 * (the server may start after us). why receives the last failure. */
static int ddp__store_tcp_connect(const char *host, int port, double deadline, int owner_pid, int *fd_out,
                                  char *why, size_t whylen) {
    char ps[16];
    double backoff = 0.01;
    snprintf(ps, sizeof ps, "%d", port);
    snprintf(why, whylen, "no attempt made");
    for (;;) {
        struct addrinfo hints, *res = NULL, *ai;
        int rc, left_ms;
        memset(&hints, 0, sizeof hints);
        hints.ai_family = AF_UNSPEC;
        hints.ai_socktype = SOCK_STREAM;
        rc = getaddrinfo(host, ps, &hints, &res);
        if (rc != 0) {
            snprintf(why, whylen, "cannot resolve '%s': %s", host,
                     rc == EAI_SYSTEM ? strerror(errno) : gai_strerror(rc));
        }
        for (ai = rc == 0 ? res : NULL; ai; ai = ai->ai_next) {
            int fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol), e = 0, one = 1;
            if (fd < 0) { snprintf(why, whylen, "%s", strerror(errno)); continue; }
            ddp__store_sock_setup(fd);
            if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
                e = errno;
                if (e == EINPROGRESS || e == EINTR) {
                    /* one address may black-hole: give the others a chance */
                    double now = ddp__store_now();
                    double d = deadline < now + 5.0 ? deadline : now + 5.0;
                    socklen_t sl = sizeof e;
                    int pr = ddp__store_poll1(fd, POLLOUT, d, &e);
                    if (pr == DDP__STORE_IO_TIMEOUT) e = ETIMEDOUT;
                    else if (pr == DDP__STORE_IO_OK && getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &sl) != 0) e = errno;
                }
            }
            if (e == 0) {
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                freeaddrinfo(res);
                *fd_out = fd;
                return 0;
            }
            snprintf(why, whylen, "%s", strerror(e));
            close(fd);
        }
        if (rc == 0) freeaddrinfo(res);
        if (owner_pid > 0 && !ddp__proc_alive(owner_pid)) {
            snprintf(why, whylen, "rank 0 (pid %d), which runs the store, has exited", owner_pid);
            return -2;
        }
        left_ms = ddp__store_ms_left(deadline);
        if (left_ms == 0) return -1;
        ddp__store_sleep(left_ms > 0 && backoff * 1000.0 > left_ms ? left_ms / 1000.0 : backoff);
        backoff = backoff * 2 > 0.5 ? 0.5 : backoff * 2;
    }
}

/* The V2 opening: VALIDATE + magic, then PING with a nonce whose bits 16..23
 * are 0xFF, so that a V1 server parses it as a SET with a key length beyond
 * any vector's max_size and drops the connection (verified on torch 1.13). */
static void ddp__store_v2_hello(ddp__store_buf *b, uint32_t *nonce) {
    *nonce = ((uint32_t)getpid() & 0xFF00FFFFu) | 0x00FF0000u;
    ddp__store_buf_u8(b, 0); /* VALIDATE */
    ddp__store_buf_u32(b, DDP__STORE_MAGIC);
    ddp__store_buf_u8(b, DDP__STORE_Q_PING);
    ddp__store_buf_u32(b, *nonce);
}

/* AUTO: one connection sends a V1 GETNUMKEYS, another the V2 opening; the
 * first complete, correct answer decides (a V1 server drops the V2 opening; a
 * V2 server drops or ignores the V1 probe), the other connection is closed.
 * Parallel, so a silent (libuv) V2 server costs no probe timeout. */
static int ddp__store_probe(ddp__store *s, double deadline, double timeout_s, int *fd_out,
                            int *proto_out, char *err, size_t errlen) {
    int fd[2] = {-1, -1}, alive[2] = {0, 0}, i, e = 0, win = -1;
    unsigned char got[2][8];
    size_t have[2] = {0, 0}, need[2] = {8, 4};
    uint32_t nonce = 0;
    char why[200];
    ddp__store_buf hello = {NULL, 0, 0, 0};
    unsigned char q = DDP__STORE_Q_GETNUMKEYS;

    ddp__store_v2_hello(&hello, &nonce);
    for (i = 0; i < 2; i++) {
        if (ddp__store_tcp_connect(s->host, s->port, deadline, s->owner_pid, &fd[i], why, sizeof why) != 0) {
            if (i == 1) close(fd[0]);
            free(hello.p);
            return ddp__store_fail(err, errlen, "cannot connect to store at %s:%d within %.1f s: %s",
                                   s->host, s->port, timeout_s, why);
        }
        alive[i] = ddp__store_send_all(fd[i], i == 0 ? &q : hello.p, i == 0 ? 1 : hello.n, deadline, &e) ==
                   DDP__STORE_IO_OK;
    }
    free(hello.p);
    while (win < 0 && (alive[0] || alive[1])) {
        struct pollfd p[2];
        int np = 0, r, ms = ddp__store_ms_left(deadline);
        for (i = 0; i < 2; i++) {
            if (!alive[i]) continue;
            p[np].fd = fd[i];
            p[np].events = POLLIN;
            p[np].revents = 0;
            np++;
        }
        r = poll(p, (nfds_t)np, ms);
        if (r < 0 && errno != EINTR) break;
        if (r == 0 && ms >= 0 && ddp__store_now() >= deadline) break;
        for (i = 0; i < 2 && win < 0; i++) {
            ssize_t n;
            if (!alive[i]) continue;
            n = recv(fd[i], got[i] + have[i], need[i] - have[i], 0);
            if (n > 0) {
                have[i] += (size_t)n;
                if (have[i] < need[i]) continue;
                if (i == 0 || memcmp(got[1], &nonce, 4) == 0) win = i;
                else alive[i] = 0; /* a PING answer that is not ours */
            } else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
                alive[i] = 0; /* dropped: not this version */
            }
        }
    }
    for (i = 0; i < 2; i++)
        if (i != win) close(fd[i]);
    if (win < 0)
        return ddp__store_fail(err, errlen,
                               alive[0] || alive[1]
                                   ? "store at %s:%d answered neither the torch 1.x nor the torch 2.x protocol within %.1f s"
                                   : "store at %s:%d dropped both the torch 1.x and the torch 2.x protocol probes (%.1f s)",
                               s->host, s->port, timeout_s);
    *fd_out = fd[win];
    *proto_out = win == 0 ? DDP__STORE_PROTO_V1 : DDP__STORE_PROTO_V2;
    return 0;
}

/* Connect and agree on the wire version (s->host/port already set). */
/* One verdict of a store of rank 0's (see ddp__store_verdict). */
static int ddp__store_recv_verdict(ddp__store *s, int fd, double deadline, int *status, char *reason, size_t rcap, int *e) {
    unsigned char st;
    uint32_t il, rl;
    char skip[256];
    int r = ddp__store_recv_all(fd, &st, 1, deadline, e);
    if (r == DDP__STORE_IO_OK) r = ddp__store_recv_all(fd, &il, 4, deadline, e);
    if (r != DDP__STORE_IO_OK) return r;
    if (il > DDP__IDENT_MAX) return DDP__STORE_IO_ERROR;
    r = ddp__store_recv_all(fd, s->peer_ident, il, deadline, e);
    s->peer_ident[r == DDP__STORE_IO_OK ? il : 0] = 0;
    if (r == DDP__STORE_IO_OK) r = ddp__store_recv_all(fd, &rl, 4, deadline, e);
    if (r != DDP__STORE_IO_OK) return r;
    if (rl > 4096) return DDP__STORE_IO_ERROR;
    reason[0] = 0;
    while (rl > 0 && r == DDP__STORE_IO_OK) { /* keep what fits, read the rest */
        size_t have = strlen(reason), take = rl < sizeof skip ? rl : sizeof skip;
        r = ddp__store_recv_all(fd, skip, take, deadline, e);
        if (r == DDP__STORE_IO_OK && have + 1 < rcap) {
            size_t keep = rcap - have - 1 < take ? rcap - have - 1 : take;
            memcpy(reason + have, skip, keep);
            reason[have + keep] = 0;
        }
        rl -= (uint32_t)take;
    }
    *status = st;
    return r;
}

/* The library's hello on a fresh connection to a store of rank 0's: the
 * identity records are compared and, with a secret, each side proves it
 * knows it (HMAC-SHA-256 over both sides' random nonces; the secret never
 * travels). 0 accepted. -1 refused (s->fatal set: no retry) or failed;
 * *again = 1 when the store closed the connection before answering (full,
 * or being replaced by the next context's store): try again. */
static int ddp__store_hello(ddp__store *s, int fd, double deadline, int *again, char *err, size_t errlen) {
    ddp__store_buf b = {NULL, 0, 0, 0};
    unsigned char cn[32], sn[32], proof[32], want[32];
    uint32_t magic = 0, il = (uint32_t)strlen(s->ident);
    char reason[768];
    int e = 0, r, status = -1;
    *again = 0;
    if (ddp__sys_random(cn, sizeof cn) != 0)
        return ddp__store_fail(err, errlen, "cannot read random bytes for the store's hello: %s", strerror(errno));
    ddp__store_buf_u8(&b, DDP__STORE_Q_HELLO);
    ddp__store_buf_u32(&b, DDP__STORE_HELLO_MAGIC);
    ddp__store_buf_u32(&b, il);
    ddp__store_buf_put(&b, s->ident, il);
    ddp__store_buf_put(&b, cn, sizeof cn);
    r = b.oom ? DDP__STORE_IO_ERROR : ddp__store_send_all(fd, b.p, b.n, deadline, &e);
    free(b.p);
    if (r == DDP__STORE_IO_OK) r = ddp__store_recv_all(fd, &magic, 4, deadline, &e);
    if (r == DDP__STORE_IO_OK && magic != DDP__STORE_REPLY_MAGIC) {
        s->fatal = DDP_ERROR_NETWORK;
        return ddp__store_fail(err, errlen, "the process listening on %s:%d does not answer as a ddp.h store (another program on port %d?)",
                               s->host, s->port, s->port);
    }
    if (r == DDP__STORE_IO_OK) r = ddp__store_recv_verdict(s, fd, deadline, &status, reason, sizeof reason, &e);
    if (r == DDP__STORE_IO_OK && status == DDP__HELLO_CHALLENGE) {
        r = ddp__store_recv_all(fd, sn, 32, deadline, &e);
        if (r == DDP__STORE_IO_OK) r = ddp__store_recv_all(fd, proof, 32, deadline, &e);
        if (r == DDP__STORE_IO_OK) {
            ddp__hmac_sha256(s->secret, s->secret_len, "ddp.h store server", 18, cn, 32, sn, 32, want);
            if (!s->secret_len || !ddp__ct_equal(want, proof, 32)) {
                s->fatal = DDP_ERROR_SECURITY;
                return ddp__store_fail(err, errlen,
                                       "the store of rank 0 at %s:%d does not know this rank's job secret: the secrets differ "
                                       "(port %d is used by another job, or the ranks were given different DDP_JOB_SECRET values)",
                                       s->host, s->port, s->port);
            }
            ddp__hmac_sha256(s->secret, s->secret_len, "ddp.h store client", 18, sn, 32, cn, 32, proof);
            b.p = NULL; b.n = b.cap = 0; b.oom = 0;
            ddp__store_buf_u8(&b, DDP__STORE_Q_PROOF);
            ddp__store_buf_put(&b, proof, 32);
            r = b.oom ? DDP__STORE_IO_ERROR : ddp__store_send_all(fd, b.p, b.n, deadline, &e);
            free(b.p);
            if (r == DDP__STORE_IO_OK) r = ddp__store_recv_verdict(s, fd, deadline, &status, reason, sizeof reason, &e);
        }
    }
    if (r == DDP__STORE_IO_CLOSED) {
        *again = 1;
        return ddp__store_fail(err, errlen, "the store at %s:%d closed the connection during the hello", s->host, s->port);
    }
    if (r != DDP__STORE_IO_OK)
        return ddp__store_fail(err, errlen, "the store at %s:%d did not complete the hello: %s", s->host, s->port,
                               r == DDP__STORE_IO_TIMEOUT ? "no answer" : e ? strerror(e) : "malformed answer");
    switch (status) {
    case DDP__HELLO_OK: {
        ddp__ident mine, peer;
        if (ddp__ident_parse(s->peer_ident, strlen(s->peer_ident), &peer) != 0) {
            s->fatal = DDP_ERROR_NETWORK;
            return ddp__store_fail(err, errlen, "the store at %s:%d answered the hello without rank 0's identity record", s->host, s->port);
        }
        if (ddp__ident_parse(s->ident, strlen(s->ident), &mine) == 0 && !strcmp(mine.host, peer.host)) s->owner_pid = peer.pid;
        return 0;
    }
    case DDP__HELLO_MISMATCH: {
        ddp__ident mine, peer;
        char msg[768];
        s->fatal = DDP_ERROR_MISMATCH;
        if (ddp__ident_parse(s->ident, strlen(s->ident), &mine) == 0 &&
            ddp__ident_parse(s->peer_ident, strlen(s->peer_ident), &peer) == 0 &&
            ddp__ident_compare(&mine, &peer, s->port, msg, sizeof msg) != DDP_SUCCESS)
            return ddp__store_fail(err, errlen, "%s", msg);
        return ddp__store_fail(err, errlen, "the store of rank 0 at %s:%d refused this rank: %s", s->host, s->port,
                               reason[0] ? reason : "another job");
    }
    case DDP__HELLO_NEED_SECRET:
        s->fatal = DDP_ERROR_SECURITY;
        return ddp__store_fail(err, errlen,
                               "the store of rank 0 at %s:%d requires the job secret and this rank has none (DDP_JOB_SECRET is not set): "
                               "the secrets differ; port %d is used by another job, or this rank was started without the job's secret",
                               s->host, s->port, s->port);
    case DDP__HELLO_BAD_PROOF:
        s->fatal = DDP_ERROR_SECURITY;
        return ddp__store_fail(err, errlen,
                               "the store of rank 0 at %s:%d rejected this rank's job secret: the secrets differ "
                               "(port %d is used by another job, or the ranks were given different DDP_JOB_SECRET values)",
                               s->host, s->port, s->port);
    default:
        s->fatal = DDP_ERROR_NETWORK;
        return ddp__store_fail(err, errlen, "the store at %s:%d answered the hello with status %d", s->host, s->port, status);
    }
}

/* Connect and agree on the wire version (s->host/port already set); with
 * s->hello, the library's hello follows (V1 framing: the store is ours). */
static int ddp__store_open_(ddp__store *s, int proto, double timeout_s, char *err, size_t errlen) {
    double deadline = ddp__store_deadline(timeout_s);
    char why[200];
    int fd = -1, e = 0, r;
    if (s->fd >= 0) close(s->fd);
    s->fd = -1;
    s->broken = 1;
    if (s->fatal) return ddp__store_fail(err, errlen, "%s", s->fatal_msg[0] ? s->fatal_msg : "the store refused this rank earlier");
    if (s->hello) {
        for (;;) {
            int again = 0;
            r = ddp__store_tcp_connect(s->host, s->port, deadline, s->owner_pid, &fd, why, sizeof why);
            if (r == -2) {
                s->fatal = DDP_ERROR_PEER;
                return ddp__store_fail(err, errlen, "cannot reach the store at %s:%d: %s", s->host, s->port, why);
            }
            if (r != 0)
                return ddp__store_fail(err, errlen, "cannot connect to store at %s:%d within %.1f s: %s",
                                       s->host, s->port, timeout_s, why);
            if (ddp__store_hello(s, fd, deadline, &again, err, errlen) == 0) break;
            close(fd);
            fd = -1;
            if (!again || s->fatal || ddp__store_ms_left(deadline) == 0) return -1;
            ddp__store_sleep(0.05);
        }
        proto = DDP__STORE_PROTO_V1;
    } else if (proto == DDP__STORE_PROTO_AUTO) {
        if (ddp__store_probe(s, deadline, timeout_s, &fd, &proto, err, errlen) != 0) return -1;
    } else if ((r = ddp__store_tcp_connect(s->host, s->port, deadline, s->owner_pid, &fd, why, sizeof why)) != 0) {
        if (r == -2) {
            s->fatal = DDP_ERROR_PEER;
            return ddp__store_fail(err, errlen, "cannot reach the store at %s:%d: %s", s->host, s->port, why);
        }
        return ddp__store_fail(err, errlen, "cannot connect to store at %s:%d within %.1f s: %s",
                               s->host, s->port, timeout_s, why);
    } else if (proto == DDP__STORE_PROTO_V2) {
        ddp__store_buf b = {NULL, 0, 0, 0};
        uint32_t nonce, back = 0;
        ddp__store_v2_hello(&b, &nonce);
        r = b.oom ? DDP__STORE_IO_ERROR : ddp__store_send_all(fd, b.p, b.n, deadline, &e);
        free(b.p);
        if (r == DDP__STORE_IO_OK) r = ddp__store_recv_all(fd, &back, 4, deadline, &e);
        if (r != DDP__STORE_IO_OK || back != nonce) {
            close(fd);
            return ddp__store_fail(err, errlen,
                                   "store at %s:%d did not complete the torch 2.x handshake (VALIDATE + PING): %s",
                                   s->host, s->port,
                                   r == DDP__STORE_IO_TIMEOUT ? "no answer"
                                   : r == DDP__STORE_IO_CLOSED ? "it closed the connection (a torch 1.x store? use protocol V1)"
                                   : r == DDP__STORE_IO_OK ? "wrong PING answer" : strerror(e));
        }
    }
    s->fd = fd;
    s->proto = proto;
    s->broken = 0;
    return 0;
}

static int ddp__store_open(ddp__store *s, int proto, double timeout_s, char *err, size_t errlen) {
    int r = ddp__store_open_(s, proto, timeout_s, err, errlen);
    if (r != 0) ddp__store_note_fatal(s, err);
    return r;
}

/* Connect to the store at host:port, retrying until timeout_s (<= 0: forever);
 * proto is DDP__STORE_PROTO_AUTO, _V1 or _V2. timeout_s also bounds every
 * later call (change s->timeout_s to adjust). */
static DDP__STORE_UNUSED int ddp__store_connect_proto(ddp__store *s, const char *host, int port,
                                                      double timeout_s, int proto, char *err,
                                                      size_t errlen) {
    memset(s, 0, sizeof *s);
    s->fd = -1;
    s->broken = 1;
    s->timeout_s = timeout_s;
    if (!host || !*host) return ddp__store_fail(err, errlen, "cannot connect to store: no host given");
    if (strlen(host) >= sizeof s->host)
        return ddp__store_fail(err, errlen, "cannot connect to store: host name longer than %d bytes", (int)sizeof s->host - 1);
    if (port <= 0 || port > 65535)
        return ddp__store_fail(err, errlen, "cannot connect to store at %s:%d: not a TCP port (1..65535)", host, port);
    if (proto < DDP__STORE_PROTO_AUTO || proto > DDP__STORE_PROTO_V2)
        return ddp__store_fail(err, errlen, "cannot connect to store at %s:%d: unknown protocol %d", host, port, proto);
    strcpy(s->host, host);
    s->port = port;
    return ddp__store_open(s, proto, timeout_s, err, errlen);
}

static DDP__STORE_UNUSED int ddp__store_connect(ddp__store *s, const char *host, int port,
                                                double timeout_s, char *err, size_t errlen) {
    return ddp__store_connect_proto(s, host, port, timeout_s, DDP__STORE_PROTO_AUTO, err, errlen);
}

static DDP__STORE_UNUSED void ddp__store_close(ddp__store *s) {
    if (s->fd >= 0) close(s->fd);
    s->fd = -1;
    s->broken = 1;
}

static DDP__STORE_UNUSED int ddp__store_set_prefix(ddp__store *s, const char *prefix, char *err,
                                                   size_t errlen) {
    if (!prefix) prefix = "";
    if (strlen(prefix) >= sizeof s->prefix)
        return ddp__store_fail(err, errlen, "store key prefix '%.40s...' is longer than %d bytes", prefix, (int)sizeof s->prefix - 1);
    strcpy(s->prefix, prefix);
    return 0;
}

/* Use the library's hello on every (re)connection: this rank's identity
 * record and the job secret (NULL/0: none). Call before ddp__store_open
 * (ddp__store_connect_hello does both). */
static DDP__STORE_UNUSED int ddp__store_set_hello(ddp__store *s, const char *ident, const void *secret,
                                                  size_t secret_len, char *err, size_t errlen) {
    if (strlen(ident) > DDP__IDENT_MAX || secret_len > sizeof s->secret)
        return ddp__store_fail(err, errlen, "identity record or secret too long for the store's hello");
    s->hello = 1;
    ddp__copy_str(s->ident, sizeof s->ident, ident);
    if (secret_len) memcpy(s->secret, secret, secret_len);
    s->secret_len = secret_len;
    return 0;
}

/* Connect to a store of rank 0's with the library's hello. */
static DDP__STORE_UNUSED int ddp__store_connect_hello(ddp__store *s, const char *host, int port, double timeout_s,
                                                      const char *ident, const void *secret, size_t secret_len,
                                                      char *err, size_t errlen) {
    memset(s, 0, sizeof *s);
    s->fd = -1;
    s->broken = 1;
    s->timeout_s = timeout_s;
    if (!host || !*host) return ddp__store_fail(err, errlen, "cannot connect to store: no host given");
    if (strlen(host) >= sizeof s->host)
        return ddp__store_fail(err, errlen, "cannot connect to store: host name longer than %d bytes", (int)sizeof s->host - 1);
    if (port <= 0 || port > 65535)
        return ddp__store_fail(err, errlen, "cannot connect to store at %s:%d: not a TCP port (1..65535)", host, port);
    strcpy(s->host, host);
    s->port = port;
    if (ddp__store_set_hello(s, ident, secret, secret_len, err, errlen) != 0) return -1;
    return ddp__store_open(s, DDP__STORE_PROTO_V1, timeout_s, err, errlen);
}

/* Request building: the op byte for the connection's wire version, keys with
 * the prefix. */
static void ddp__store_req(ddp__store *s, ddp__store_buf *b, int op) {
    b->p = NULL;
    b->n = b->cap = 0;
    b->oom = 0;
    if (s->proto == DDP__STORE_PROTO_V2 && op <= DDP__STORE_Q_GETNUMKEYS) op += 1;
    ddp__store_buf_u8(b, (unsigned)op);
}

static void ddp__store_req_key(ddp__store *s, ddp__store_buf *b, const char *key) {
    size_t pl = strlen(s->prefix), kl = strlen(key);
    ddp__store_buf_u64(b, (uint64_t)(pl + kl));
    ddp__store_buf_put(b, s->prefix, pl);
    ddp__store_buf_put(b, key, kl);
}

static const char *ddp__store_op_name(int op) {
    switch (op) {
    case DDP__STORE_Q_SET: return "SET";
    case DDP__STORE_Q_COMPARE_SET: return "COMPARE_SET";
    case DDP__STORE_Q_GET: return "GET";
    case DDP__STORE_Q_ADD: return "ADD";
    case DDP__STORE_Q_CHECK: return "CHECK";
    case DDP__STORE_Q_WAIT: return "WAIT";
    case DDP__STORE_Q_GETNUMKEYS: return "GETNUMKEYS";
    case DDP__STORE_Q_DELETE_KEY: return "DELETE_KEY";
    default: return "request";
    }
}

/* Turn an I/O failure into a message; the connection is no longer usable. */
static int ddp__store_io_fail(ddp__store *s, int why, int err_no, int op, const char *key,
                              char *err, size_t errlen) {
    char what[160];
    if (key) snprintf(what, sizeof what, "%s '%s'", ddp__store_op_name(op), key);
    else snprintf(what, sizeof what, "%s", ddp__store_op_name(op));
    s->broken = 1;
    if (why == DDP__STORE_IO_TIMEOUT)
        return ddp__store_fail(err, errlen, "timed out after %.1f s waiting for the store at %s:%d to answer %s",
                               s->timeout_s, s->host, s->port, what);
    if (why == DDP__STORE_IO_CLOSED)
        return ddp__store_fail(err, errlen, "store at %s:%d closed the connection during %s%s%s", s->host,
                               s->port, what, err_no ? ": " : "", err_no ? strerror(err_no) : "");
    return ddp__store_fail(err, errlen, "I/O error talking to store at %s:%d during %s: %s", s->host,
                           s->port, what, strerror(err_no));
}

/* Reconnect when an earlier failure left the connection in an unknown state. */
static int ddp__store_ready(ddp__store *s, char *err, size_t errlen) {
    if (!s->host[0]) return ddp__store_fail(err, errlen, "store client is not connected");
    if (s->fatal && (s->fd < 0 || s->broken))
        return ddp__store_fail(err, errlen, "%s", s->fatal_msg[0] ? s->fatal_msg : "the store refused this rank earlier");
    if (s->fd >= 0 && !s->broken) return 0;
    return ddp__store_open(s, s->proto, s->timeout_s, err, errlen);
}

/* Send req (freed here) and read a fixed-size reply (nreply may be 0). */
static int ddp__store_rpc(ddp__store *s, ddp__store_buf *req, int op, const char *key, void *reply,
                          size_t nreply, char *err, size_t errlen) {
    int e = 0, r;
    double deadline;
    if (req->oom) {
        free(req->p);
        return ddp__store_fail(err, errlen, "out of memory building %s for the store", ddp__store_op_name(op));
    }
    if (ddp__store_ready(s, err, errlen) != 0) {
        free(req->p);
        return -1;
    }
    deadline = ddp__store_deadline(s->timeout_s);
    r = ddp__store_send_all(s->fd, req->p, req->n, deadline, &e);
    free(req->p);
    if (r == DDP__STORE_IO_OK && nreply) r = ddp__store_recv_all(s->fd, reply, nreply, deadline, &e);
    if (r != DDP__STORE_IO_OK) return ddp__store_io_fail(s, r, e, op, key, err, errlen);
    return 0;
}

/* Read a u64-length-prefixed blob reply into malloc'd memory (NUL-terminated). */
static int ddp__store_recv_blob(ddp__store *s, int op, const char *key, void **val, size_t *len,
                                char *err, size_t errlen) {
    double deadline = ddp__store_deadline(s->timeout_s);
    uint64_t n;
    unsigned char *p;
    int e = 0, r = ddp__store_recv_all(s->fd, &n, 8, deadline, &e);
    if (r != DDP__STORE_IO_OK) return ddp__store_io_fail(s, r, e, op, key, err, errlen);
    if (n > DDP__STORE_MAX_VALUE_LEN) {
        s->broken = 1;
        return ddp__store_fail(err, errlen, "store at %s:%d answered %s '%s' with an implausible length %llu (protocol mismatch?)",
                               s->host, s->port, ddp__store_op_name(op), key, (unsigned long long)n);
    }
    p = (unsigned char *)malloc((size_t)n + 1);
    if (!p) {
        s->broken = 1;
        return ddp__store_fail(err, errlen, "out of memory reading %llu bytes of key '%s' from the store", (unsigned long long)n, key);
    }
    r = ddp__store_recv_all(s->fd, p, (size_t)n, deadline, &e);
    if (r != DDP__STORE_IO_OK) {
        free(p);
        return ddp__store_io_fail(s, r, e, op, key, err, errlen);
    }
    p[n] = 0;
    *val = p;
    *len = (size_t)n;
    return 0;
}

static DDP__STORE_UNUSED int ddp__store_set(ddp__store *s, const char *key, const void *val, size_t len,
                                            char *err, size_t errlen) {
    ddp__store_buf b;
    ddp__store_req(s, &b, DDP__STORE_Q_SET);
    ddp__store_req_key(s, &b, key);
    ddp__store_buf_blob(&b, val, len);
    return ddp__store_rpc(s, &b, DDP__STORE_Q_SET, key, NULL, 0, err, errlen);
}

static void ddp__store_add_diag(ddp__store *s, const char *key, char *err, size_t errlen);

static DDP__STORE_UNUSED int ddp__store_add(ddp__store *s, const char *key, int64_t delta, int64_t *out,
                                            char *err, size_t errlen) {
    ddp__store_buf b;
    int64_t v = 0;
    ddp__store_req(s, &b, DDP__STORE_Q_ADD);
    ddp__store_req_key(s, &b, key);
    ddp__store_buf_u64(&b, (uint64_t)delta);
    if (ddp__store_rpc(s, &b, DDP__STORE_Q_ADD, key, &v, 8, err, errlen) != 0) {
        ddp__store_add_diag(s, key, err, errlen);
        return -1;
    }
    if (out) *out = v;
    return 0;
}

/* *ready = 1 when every key exists. */
static DDP__STORE_UNUSED int ddp__store_check(ddp__store *s, const char *const *keys, int nkeys, int *ready,
                                              char *err, size_t errlen) {
    ddp__store_buf b;
    unsigned char v = 1;
    int i;
    ddp__store_req(s, &b, DDP__STORE_Q_CHECK);
    ddp__store_buf_u64(&b, (uint64_t)(nkeys > 0 ? nkeys : 0));
    for (i = 0; i < nkeys; i++) ddp__store_req_key(s, &b, keys[i]);
    if (ddp__store_rpc(s, &b, DDP__STORE_Q_CHECK, nkeys > 0 ? keys[0] : NULL, &v, 1, err, errlen) != 0) return -1;
    if (v > 1) {
        s->broken = 1;
        return ddp__store_fail(err, errlen, "store at %s:%d answered CHECK with %u (protocol mismatch?)", s->host, s->port, v);
    }
    *ready = v == 0;
    return 0;
}

static DDP__STORE_UNUSED int ddp__store_delete(ddp__store *s, const char *key, int *deleted, char *err,
                                               size_t errlen) {
    ddp__store_buf b;
    int64_t v = 0;
    ddp__store_req(s, &b, DDP__STORE_Q_DELETE_KEY);
    ddp__store_req_key(s, &b, key);
    if (ddp__store_rpc(s, &b, DDP__STORE_Q_DELETE_KEY, key, &v, 8, err, errlen) != 0) return -1;
    if (deleted) *deleted = v != 0;
    return 0;
}

/* Number of keys in the whole store (every prefix, torch's own keys too). */
static DDP__STORE_UNUSED int ddp__store_num_keys(ddp__store *s, int64_t *out, char *err, size_t errlen) {
    ddp__store_buf b;
    ddp__store_req(s, &b, DDP__STORE_Q_GETNUMKEYS);
    return ddp__store_rpc(s, &b, DDP__STORE_Q_GETNUMKEYS, NULL, out, 8, err, errlen);
}

/* torch semantics: sets desired when the value equals expected (or the key is
 * missing and expected is empty); *val receives the value now stored (for a
 * missing key with non-empty expected: expected). *val is malloc'd. */
static DDP__STORE_UNUSED int ddp__store_compare_set(ddp__store *s, const char *key, const void *expected,
                                                    size_t elen, const void *desired, size_t dlen,
                                                    void **val, size_t *len, char *err, size_t errlen) {
    ddp__store_buf b;
    ddp__store_req(s, &b, DDP__STORE_Q_COMPARE_SET);
    ddp__store_req_key(s, &b, key);
    ddp__store_buf_blob(&b, expected, elen);
    ddp__store_buf_blob(&b, desired, dlen);
    if (ddp__store_rpc(s, &b, DDP__STORE_Q_COMPARE_SET, key, NULL, 0, err, errlen) != 0) return -1;
    return ddp__store_recv_blob(s, DDP__STORE_Q_COMPARE_SET, key, val, len, err, errlen);
}

/* The rendezvous was ended by an event at rank 0's store (another job,
 * another version, tampering): fetch its message, fail for good. */
static int ddp__store_event_fail(ddp__store *s, char *err, size_t errlen) {
    ddp__store_buf b;
    void *val = NULL;
    size_t len = 0;
    const unsigned char *p;
    ddp__store_req(s, &b, DDP__STORE_Q_EVENT);
    s->fatal = DDP_ERROR_MISMATCH;
    if (ddp__store_rpc(s, &b, DDP__STORE_Q_EVENT, NULL, NULL, 0, err, errlen) != 0 ||
        ddp__store_recv_blob(s, DDP__STORE_Q_EVENT, "(event)", &val, &len, err, errlen) != 0 || len < 2) {
        free(val);
        return ddp__store_fail(err, errlen, "the store of rank 0 at %s:%d ended the rendezvous (see rank 0's error)", s->host, s->port);
    }
    p = (const unsigned char *)val;
    if (p[0] == DDP__EVENT_TAMPER) s->fatal = DDP_ERROR_SECURITY;
    if (p[0] == DDP__EVENT_ABORT) s->fatal = DDP_ERROR_PEER;
    ddp__store_fail(err, errlen, "the store of rank 0 ended the rendezvous: %s", (const char *)p + 1);
    ddp__store_note_fatal(s, err);
    free(val);
    return -1;
}

/* This rank gives up: the ranks waiting in rank 0's store learn it (and
   why) at once instead of at their timeout. Best effort, no answer. */
static DDP__STORE_UNUSED void ddp__store_abort(ddp__store *s, const char *msg) {
    ddp__store_buf b;
    size_t n = strlen(msg) < 1000 ? strlen(msg) : 1000;
    int e = 0;
    if (!s->hello || s->fd < 0 || s->broken) return;
    ddp__store_req(s, &b, DDP__STORE_Q_ABORT);
    ddp__store_buf_blob(&b, msg, n);
    if (!b.oom) ddp__store_send_all(s->fd, b.p, b.n, ddp__store_deadline(1.0), &e);
    free(b.p);
}

/* After a WAIT timed out the server still owes an answer, so this connection
 * cannot be reused: open a fresh one (short timeout). note gets the failure. */
static int ddp__store_recover(ddp__store *s, char *note, size_t notelen) {
    double t = s->timeout_s > 0 && s->timeout_s < 5.0 ? s->timeout_s : 5.0;
    return ddp__store_open(s, s->proto, t, note, notelen);
}

/* WAIT for keys until deadline. On timeout: *timed_out = 1, the connection is
 * replaced (err gets a reconnect failure, if any) and -1 is returned. */
static int ddp__store_wait_until(ddp__store *s, const char *const *keys, int nkeys, double deadline,
                                 int *timed_out, char *err, size_t errlen) {
    ddp__store_buf b;
    unsigned char v = 0;
    int e = 0, r, i;
    *timed_out = 0;
    ddp__store_req(s, &b, DDP__STORE_Q_WAIT);
    ddp__store_buf_u64(&b, (uint64_t)(nkeys > 0 ? nkeys : 0));
    for (i = 0; i < nkeys; i++) ddp__store_req_key(s, &b, keys[i]);
    if (ddp__store_rpc(s, &b, DDP__STORE_Q_WAIT, nkeys > 0 ? keys[0] : NULL, NULL, 0, err, errlen) != 0) return -1;
    r = ddp__store_recv_all(s->fd, &v, 1, deadline, &e);
    if (r == DDP__STORE_IO_TIMEOUT) {
        *timed_out = 1;
        if (err && errlen) err[0] = 0;
        s->broken = 1;
        if (ddp__store_recover(s, err, errlen) != 0) return -1;
        if (err && errlen) err[0] = 0;
        return -1;
    }
    if (r != DDP__STORE_IO_OK) return ddp__store_io_fail(s, r, e, DDP__STORE_Q_WAIT, nkeys > 0 ? keys[0] : NULL, err, errlen);
    if (v == DDP__STORE_WAIT_ABORTED && s->hello) return ddp__store_event_fail(s, err, errlen);
    if (v != 0) {
        s->broken = 1;
        return ddp__store_fail(err, errlen, "store at %s:%d answered WAIT with %u (protocol mismatch?)", s->host, s->port, v);
    }
    return 0;
}

/* The message for a timed-out wait: which keys, and which of them are still
 * missing (asked on the fresh connection). note: reconnect failure or "". */
static int ddp__store_wait_timeout_msg(ddp__store *s, const char *const *keys, int nkeys, const char *note,
                                       char *err, size_t errlen) {
    int i, listed = 0;
    char buf[1024];
    buf[0] = 0;
    ddp__store_appendf(buf, sizeof buf, "timed out after %.1f s waiting for key%s", s->timeout_s, nkeys == 1 ? "" : "s");
    for (i = 0; i < nkeys && i < 8; i++) ddp__store_appendf(buf, sizeof buf, "%s '%s'", i ? "," : "", keys[i]);
    if (nkeys > 8) ddp__store_appendf(buf, sizeof buf, ", ... (%d keys)", nkeys);
    if (note[0]) {
        ddp__store_appendf(buf, sizeof buf, "; then %s", note);
    } else if (nkeys > 1) {
        for (i = 0; i < nkeys; i++) {
            int ready = 0;
            if (ddp__store_check(s, &keys[i], 1, &ready, NULL, 0) != 0) break;
            if (ready) continue;
            if (listed < 8) ddp__store_appendf(buf, sizeof buf, "%s'%s'", listed ? ", " : " (missing: ", keys[i]);
            listed++;
        }
        if (listed > 8) ddp__store_appendf(buf, sizeof buf, ", ... %d in all", listed);
        if (listed) ddp__store_appendf(buf, sizeof buf, ")");
    }
    return ddp__store_fail(err, errlen, "%s", buf);
}

/* Wait until every key exists, for at most s->timeout_s. */
static DDP__STORE_UNUSED int ddp__store_wait(ddp__store *s, const char *const *keys, int nkeys, char *err,
                                             size_t errlen) {
    int timed_out;
    char note[512];
    double deadline = ddp__store_deadline(s->timeout_s);
    for (;;) {
        if (ddp__store_wait_until(s, keys, nkeys, deadline, &timed_out, note, sizeof note) == 0) return 0;
        if (timed_out) return ddp__store_wait_timeout_msg(s, keys, nkeys, note, err, errlen);
        if (s->fatal) return ddp__store_fail(err, errlen, "%s", note);
        /* the server went away mid-wait (a store being replaced by the next
           one on the same port): reconnect and wait again, same deadline */
        if (!s->broken || (deadline > 0 && ddp__store_now() > deadline - 0.05)) return ddp__store_fail(err, errlen, "%s", note);
        ddp__store_sleep(0.01);
    }
}

/* Wait (up to s->timeout_s) for key, then read it into malloc'd *val (one
 * extra NUL byte after the *len bytes, for text values). */
static DDP__STORE_UNUSED int ddp__store_get(ddp__store *s, const char *key, void **val, size_t *len,
                                            char *err, size_t errlen) {
    ddp__store_buf b;
    *val = NULL;
    *len = 0;
    if (ddp__store_wait(s, &key, 1, err, errlen) != 0) return -1;
    ddp__store_req(s, &b, DDP__STORE_Q_GET);
    ddp__store_req_key(s, &b, key);
    if (ddp__store_rpc(s, &b, DDP__STORE_Q_GET, key, NULL, 0, err, errlen) != 0) return -1;
    return ddp__store_recv_blob(s, DDP__STORE_Q_GET, key, val, len, err, errlen);
}

/* An ADD failed: if the store dropped us because the key holds no number
 * (a torch store and ours both do), say so, naming the key. */
static void ddp__store_add_diag(ddp__store *s, const char *key, char *err, size_t errlen) {
    char note[256], val[48];
    const char *k = key;
    void *v = NULL;
    size_t len = 0, i;
    int ready = 0;
    int64_t num;
    if (!s->broken || s->fatal) return;
    if (ddp__store_recover(s, note, sizeof note) != 0) {
        if (s->fatal) ddp__store_appendf(err, errlen, "; then %s", note); /* rank 0 is gone: say so */
        return;
    }
    if (s->hello) {
        char ev[600];
        ev[0] = 0;
        ddp__store_event_fail(s, ev, sizeof ev);
        if (strstr(ev, "ended the rendezvous:")) { ddp__store_fail(err, errlen, "%s", ev); return; }
        s->fatal = 0;
    }
    if (ddp__store_check(s, &k, 1, &ready, NULL, 0) != 0 || !ready) return;
    if (ddp__store_get(s, key, &v, &len, NULL, 0) != 0) return;
    if (ddp__store_parse_i64((const unsigned char *)v, len, &num) != 0) {
        for (i = 0; i < len && i + 1 < sizeof val; i++) {
            unsigned char ch = ((const unsigned char *)v)[i];
            val[i] = ch >= 32 && ch < 127 && ch != '\'' ? (char)ch : '?';
        }
        val[i] = 0;
        s->fatal = DDP_ERROR_SECURITY;
        ddp__store_fail(err, errlen, "key '%s%s' holds '%s%s' where a counter is expected "
                        "(store tampering: another job on port %d, or a process that is not a rank, wrote it)",
                        s->prefix, key, val, len >= sizeof val ? "..." : "", s->port);
        ddp__store_note_fatal(s, err);
    }
    free(v);
}

/* Barrier of world ranks on name, reusable: ADD "<name>/count" gives each
 * arrival a ticket; generation g = (ticket-1)/world; the rank records
 * "<name>/<g>/arrived/<rank>" and the world-th arrival sets "<name>/<g>/done",
 * which everyone waits for (s->timeout_s in all). Every rank must call it the
 * same number of times. On timeout the message says who is missing. */
static DDP__STORE_UNUSED int ddp__store_barrier(ddp__store *s, const char *name, int rank, int world,
                                                char *err, size_t errlen) {
    char count_key[320], key[320], note[512];
    const char *done = key;
    int64_t ticket, gen, total = 0;
    double deadline = ddp__store_deadline(s->timeout_s);
    int timed_out, r = 0, listed = 0, i;
    char buf[768];

    if (world < 1 || rank < 0 || rank >= world)
        return ddp__store_fail(err, errlen, "barrier '%s': rank %d is outside a world of %d", name, rank, world);
    if (strlen(name) > 256) return ddp__store_fail(err, errlen, "barrier '%.40s...': name longer than 256 bytes", name);
    snprintf(count_key, sizeof count_key, "%s/count", name);
    if (ddp__store_add(s, count_key, 1, &ticket, err, errlen) != 0) return -1;
    gen = (ticket - 1) / world;
    snprintf(key, sizeof key, "%s/%lld/arrived/%d", name, (long long)gen, rank);
    if (ddp__store_set(s, key, "1", 1, err, errlen) != 0) return -1;
    snprintf(key, sizeof key, "%s/%lld/done", name, (long long)gen);
    if (ticket % world == 0 && ddp__store_set(s, key, "1", 1, err, errlen) != 0) return -1;
    if (ddp__store_wait_until(s, &done, 1, deadline, &timed_out, note, sizeof note) == 0) return 0;
    if (!timed_out) return ddp__store_fail(err, errlen, "barrier '%s': %s", name, note);

    buf[0] = 0;
    ddp__store_appendf(buf, sizeof buf, "barrier '%s' timed out after %.1f s", name, s->timeout_s);
    if (note[0] || ddp__store_add(s, count_key, 0, &total, NULL, 0) != 0) {
        ddp__store_appendf(buf, sizeof buf, "; then %s", note[0] ? note : "the store did not answer");
        return ddp__store_fail(err, errlen, "%s", buf);
    }
    total -= gen * world;
    if (total < 0) total = 0;
    if (total > world) total = world;
    ddp__store_appendf(buf, sizeof buf, ": %lld of %d ranks arrived", (long long)total, world);
    for (i = 0; i < world && i < 4096; i++) {
        const char *k = key;
        snprintf(key, sizeof key, "%s/%lld/arrived/%d", name, (long long)gen, i);
        if (ddp__store_check(s, &k, 1, &r, NULL, 0) != 0) break;
        if (r) continue;
        if (listed < 8) ddp__store_appendf(buf, sizeof buf, "%srank %d", listed ? ", " : " (missing: ", i);
        listed++;
    }
    if (listed > 8) ddp__store_appendf(buf, sizeof buf, ", ... %d in all", listed);
    if (listed) ddp__store_appendf(buf, sizeof buf, ")");
    return ddp__store_fail(err, errlen, "%s", buf);
}

/* ---- shared-memory backend ------------------------------------------------------

   Every collective has a sequence number, the same on every rank because
   every rank issues the same collectives in the same order. Each rank owns
   one cache line of counters in the control segment:
     arrive  its input for collective seq is in place
     mid     its part of the reduction for seq is written
     done    it has finished reading other ranks' staging for seq
   A rank waits for all counters to reach seq, with a timeout, watching the
   abort flag and whether the peers' processes still exist.

   Staging (per rank, in the control segment) carries user buffers; it has two
   halves so that back-to-back small collectives need no extra round trip:
   before writing a half, a rank waits until everybody finished reading the
   collective that last used it, which is normally long ago. */

#define DDP__SHM_MAGIC   0x3170706464ull     /* "ddp1" */
#define DDP__SMALL_BYTES ((size_t)64 << 10)   /* latency path up to this size */
#define DDP__RED_BLOCK   2048                 /* elements per reduction block */
#define DDP__STAGED_DIRECT_BYTES ((size_t)1 << 20) /* above: the staged path reduces from the user's buffer */

typedef struct ddp__shm_slot {
    uint64_t arrive, mid, done;
    int32_t  pid;
    int32_t  pad0;
    char     pad[DDP__CACHELINE - 32];
} ddp__shm_slot;

/* The first bytes of every segment: whose it is. */
typedef struct ddp__seg_hdr {
    uint64_t magic;
    int32_t  world;
    int32_t  kind;                       /* 1 control, 2 gradients */
    unsigned char nonce[16];             /* rank 0's random per-context nonce */
    uint64_t bytes;                      /* the segment's size */
    uint64_t staging;                    /* control: staging bytes per rank */
} ddp__seg_hdr;

typedef struct ddp__shm_ctrl {
    ddp__seg_hdr h;
    int32_t  abort_rank;                 /* -1 until somebody aborts; published after abort_msg */
    char     abort_msg[512];
    int32_t  abort_claim;                /* 0 until one rank owns the abort message */
    char     pad[DDP__CACHELINE * 5 - sizeof(ddp__seg_hdr) - 520];
} ddp__shm_ctrl;

static ddp__shm_slot *ddp__slot(ddp_context *ctx, int q) {
    return (ddp__shm_slot *)((unsigned char *)ctx->shm.ctrl + sizeof(ddp__shm_ctrl)) + q;
}

static size_t ddp__ctrl_header_bytes(int world) {
    return ddp__align_up(sizeof(ddp__shm_ctrl) + (size_t)world * sizeof(ddp__shm_slot), 4096);
}

/* Tell every peer that this rank gave up (first message wins): claim,
   write the message, then publish the rank, so a reader that sees the rank
   sees the whole message. */
static void ddp__shm_abort(ddp_context *ctx, const char *why) {
    ddp__shm_ctrl *c = ctx->shm.ctrl;
    int32_t expect = 0;
    if (!c) return;
    if (__atomic_compare_exchange_n(&c->abort_claim, &expect, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        ddp__copy_str(c->abort_msg, sizeof c->abort_msg, why);
        DDP__STORE_REL(&c->abort_rank, (int32_t)ctx->rank);
    }
}

/* The context is broken: only ddp_destroy() is allowed. The first code wins;
   callers write their message first, so whoever sees the flag sees it. */
static void ddp__set_broken(ddp_context *ctx, ddp_result code) {
    int expect = 0;
    __atomic_compare_exchange_n(&ctx->broken, &expect, (int)(code ? code : DDP_ERROR_INVALID_STATE), 0,
                                __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* Mark the context broken after a failed collective and let the peers know. */
static ddp_result ddp__break(ddp_context *ctx, ddp_result code) {
    ddp__set_broken(ctx, code);
    if (code != DDP_ERROR_PEER) ddp__shm_abort(ctx, ddp__errbuf(ctx));
    return code;
}

static const char *ddp__counter_name(int field) {
    return field == 0 ? "arrive" : field == 1 ? "mid" : "done";
}

static uint64_t ddp__counter(ddp__shm_slot *s, int field) {
    return field == 0 ? DDP__LOAD_ACQ(&s->arrive) : field == 1 ? DDP__LOAD_ACQ(&s->mid) : DDP__LOAD_ACQ(&s->done);
}

static void ddp__set_counter(ddp_context *ctx, int field, uint64_t v) {
    ddp__shm_slot *s = ddp__slot(ctx, ctx->rank);
    if (field == 0) DDP__STORE_REL(&s->arrive, v);
    else if (field == 1) DDP__STORE_REL(&s->mid, v);
    else DDP__STORE_REL(&s->done, v);
}

/* Wait until rank `only` (or every rank when only < 0) has counter >= target. */
static ddp_result ddp__shm_wait(ddp_context *ctx, int field, uint64_t target, int only, const char *what) {
    ddp__shm_ctrl *c = ctx->shm.ctrl;
    double start = 0, deadline = 0;
    unsigned long spins = 0;
    int q0 = only < 0 ? 0 : only, q1 = only < 0 ? ctx->world : only + 1;
    int missing = -1;
    for (;;) {
        int q;
        missing = -1;
        for (q = q0; q < q1; q++)
            if (ddp__counter(ddp__slot(ctx, q), field) < target) { missing = q; break; }
        if (missing < 0) return DDP_SUCCESS;
        if (DDP__LOAD_ACQ(&c->abort_rank) >= 0) {
            ddp__fail(ctx, DDP_ERROR_PEER, "rank %d gave up while rank %d waited for %s: %s",
                      (int)DDP__LOAD_ACQ(&c->abort_rank), ctx->rank, what, c->abort_msg);
            ddp__set_broken(ctx, DDP_ERROR_PEER);
            return DDP_ERROR_PEER;
        }
        spins++;
        if (spins < 2000) { DDP__PAUSE(); continue; }
        if ((spins & 63) == 0 || spins == 2000) {
            double now = ddp__now();
            if (start == 0) { start = now; deadline = now + ctx->cfg.timeout_s; }
            if (now > deadline) {
                ddp__fail(ctx, DDP_ERROR_TIMEOUT, "timed out after %.1f s: rank %d waited for %s; rank %d has not arrived (%s counter %llu < %llu)",
                          ctx->cfg.timeout_s, ctx->rank, what, missing, ddp__counter_name(field),
                          (unsigned long long)ddp__counter(ddp__slot(ctx, missing), field), (unsigned long long)target);
                ddp__set_broken(ctx, DDP_ERROR_TIMEOUT);
                ddp__shm_abort(ctx, ddp__errbuf(ctx));
                return DDP_ERROR_TIMEOUT;
            }
            if ((spins & 1023) == 0) {
                /* every rank not arrived, not only the first: when one dies,
                   another may be stuck waiting for it, and the dead one is
                   the one to name */
                for (q = q0; q < q1; q++) {
                    int32_t pid;
                    if (ddp__counter(ddp__slot(ctx, q), field) >= target) continue;
                    pid = ddp__slot(ctx, q)->pid;
                    if (pid > 0 && !ddp__proc_alive(pid)) {
                        ddp__fail(ctx, DDP_ERROR_PEER, "rank %d (pid %d) exited while rank %d waited for %s",
                                  q, (int)pid, ctx->rank, what);
                        ddp__set_broken(ctx, DDP_ERROR_PEER);
                        ddp__shm_abort(ctx, ddp__errbuf(ctx));
                        return DDP_ERROR_PEER;
                    }
                }
            }
        }
        if (spins < 20000) sched_yield();
        else ddp__sleep_us(spins < 100000 ? 20 : 200);
    }
}

/* ---- reductions ---- */

static double ddp__load_elem(const void *p, size_t i, ddp_dtype t) {
    switch (t) {
    case DDP_F64: return ((const double *)p)[i];
    case DDP_F16: return ddp__f16_to_f32(((const uint16_t *)p)[i]);
    case DDP_BF16: return ddp__bf16_to_f32(((const uint16_t *)p)[i]);
    case DDP_I32: return ((const int32_t *)p)[i];
    default: return ((const float *)p)[i];
    }
}

static void ddp__store_elem(void *p, size_t i, ddp_dtype t, double v) {
    switch (t) {
    case DDP_F64: ((double *)p)[i] = v; break;
    case DDP_F16: ((uint16_t *)p)[i] = ddp__f32_to_f16((float)v); break;
    case DDP_BF16: ((uint16_t *)p)[i] = ddp__f32_to_bf16((float)v); break;
    case DDP_I32: ((int32_t *)p)[i] = (int32_t)v; break;
    default: ((float *)p)[i] = (float)v; break;
    }
}

/* dst[d][i] = scale * reduce_q src[q][i] for every d; src and dst may alias
   element by element. Sums run q = 0..n-1 on every rank: the same bits
   everywhere. f32 is the hot path; other types go through double (f16/bf16
   accumulate exactly in it; i32 sums are exact up to 2^53). */
#define DDP__VEC 16         /* a fixed inner trip count: gcc -O2 vectorises it */
#define DDP__PREFETCH 16    /* lines ahead: shared pages stop the hardware prefetcher */

/* The f32 sum in one pass: v = (s0 + s1 + ...) * scale, in q order, stored
   to every dst. A chunk's loads precede its stores, so dst may alias src
   element by element. Prefetches never reach past n: the rest of the
   buffer may be another rank's slice, being written right now. */
static void ddp__sum_f32(void *const *src, int nsrc, void *const *dst, int ndst, size_t n, float s) {
    size_t i = 0, ahead = (size_t)DDP__PREFETCH * DDP__VEC;
    int q, d, k;
    for (; i + DDP__VEC <= n; i += DDP__VEC) {
        float v[DDP__VEC];
        const float *x0 = (const float *)src[0] + i;
        if (i + ahead < n) {
            for (d = 0; d < ndst; d++) __builtin_prefetch((float *)dst[d] + i + ahead, 1, 3);
            for (q = 0; q < nsrc; q++) __builtin_prefetch((const float *)src[q] + i + ahead, 0, 3);
        }
        for (k = 0; k < DDP__VEC; k++) v[k] = x0[k];
        for (q = 1; q < nsrc; q++) {
            const float *x = (const float *)src[q] + i;
            for (k = 0; k < DDP__VEC; k++) v[k] += x[k];
        }
        if (s != 1.0f) for (k = 0; k < DDP__VEC; k++) v[k] *= s;
        for (d = 0; d < ndst; d++) {
            float *y = (float *)dst[d] + i;
            for (k = 0; k < DDP__VEC; k++) y[k] = v[k];
        }
    }
    for (; i < n; i++) {
        float v = ((const float *)src[0])[i];
        for (q = 1; q < nsrc; q++) v += ((const float *)src[q])[i];
        if (s != 1.0f) v *= s;
        for (d = 0; d < ndst; d++) ((float *)dst[d])[i] = v;
    }
}

static void ddp__reduce(void *const *src, int nsrc, void *const *dst, int ndst,
                        size_t n, ddp_dtype t, ddp_op op, double scale) {
    size_t b0;
    int q, d;
    if ((t == DDP_F32 || t == DDP_DTYPE_DEFAULT) && op != DDP_OP_MAX && op != DDP_OP_MIN) {
        ddp__sum_f32(src, nsrc, dst, ndst, n, (float)scale);
        return;
    }
    if (t == DDP_F32 || t == DDP_DTYPE_DEFAULT) {
        float acc[DDP__RED_BLOCK];
        float s = (float)scale;
        for (b0 = 0; b0 < n; b0 += DDP__RED_BLOCK) {
            size_t m = n - b0 < DDP__RED_BLOCK ? n - b0 : DDP__RED_BLOCK, i;
            const float *s0 = (const float *)src[0] + b0;
            memcpy(acc, s0, m * sizeof(float));
            for (q = 1; q < nsrc; q++) {
                const float *sq = (const float *)src[q] + b0;
                if (op == DDP_OP_MAX) { for (i = 0; i < m; i++) acc[i] = sq[i] > acc[i] ? sq[i] : acc[i]; }
                else if (op == DDP_OP_MIN) { for (i = 0; i < m; i++) acc[i] = sq[i] < acc[i] ? sq[i] : acc[i]; }
                else { for (i = 0; i < m; i++) acc[i] += sq[i]; }
            }
            if (s != 1.0f) for (i = 0; i < m; i++) acc[i] *= s;
            for (d = 0; d < ndst; d++) memcpy((float *)dst[d] + b0, acc, m * sizeof(float));
        }
        return;
    }
    {
        double acc[DDP__RED_BLOCK / 2];
        size_t blk = DDP__RED_BLOCK / 2;
        for (b0 = 0; b0 < n; b0 += blk) {
            size_t m = n - b0 < blk ? n - b0 : blk, i;
            for (i = 0; i < m; i++) acc[i] = ddp__load_elem(src[0], b0 + i, t);
            for (q = 1; q < nsrc; q++)
                for (i = 0; i < m; i++) {
                    double v = ddp__load_elem(src[q], b0 + i, t);
                    if (op == DDP_OP_MAX) acc[i] = v > acc[i] ? v : acc[i];
                    else if (op == DDP_OP_MIN) acc[i] = v < acc[i] ? v : acc[i];
                    else acc[i] += v;
                }
            if (scale != 1.0) {
                if (t == DDP_I32) for (i = 0; i < m; i++) acc[i] = (double)(int64_t)(acc[i] * scale); /* truncates like C */
                else for (i = 0; i < m; i++) acc[i] *= scale;
            }
            for (d = 0; d < ndst; d++)
                for (i = 0; i < m; i++) ddp__store_elem(dst[d], b0 + i, t, acc[i]);
        }
    }
}

/* Rank q's slice of n elements: aligned to 32 elements (128 bytes for f32). */
static void ddp__slice(size_t n, int world, int q, size_t *lo, size_t *hi) {
    size_t per = ddp__align_up((n + (size_t)world - 1) / (size_t)world, 32);
    *lo = per * (size_t)q;
    *hi = *lo + per;
    if (*lo > n) *lo = n;
    if (*hi > n) *hi = n;
}

static unsigned char *ddp__staging(ddp_context *ctx, int q) {
    return ctx->shm.staging + (size_t)q * ctx->shm.staging_bytes;
}

static double ddp__op_scale(ddp_context *ctx, ddp_op op) {
    return op == DDP_OP_AVG ? 1.0 / (double)ctx->world : 1.0;
}

/* Before writing staging half h (2 = both halves) for collective seq. */
static ddp_result ddp__shm_claim_staging(ddp_context *ctx, int h, uint64_t seq) {
    uint64_t *last = ctx->shm.half_last;
    uint64_t need = h == 2 ? (last[0] > last[1] ? last[0] : last[1]) : last[h];
    if (need > 0) DDP__TRY(ddp__shm_wait(ctx, 2, need, -1, "the peers to release staging memory"));
    if (h == 2) last[0] = last[1] = seq;
    else last[h] = seq;
    return DDP_SUCCESS;
}

/* In-place all-reduce of the same byte range of every rank's buffer inside
   the gradient segment: every rank reduces its slice and writes it back to
   all buffers. No staging copies. */
static ddp_result ddp__shm_allreduce_inplace(ddp_context *ctx, size_t offset, size_t n, ddp_dtype t,
                                             ddp_op op, double scale, const char *what) {
    uint64_t seq = ++ctx->shm.seq;
    size_t es = ddp_dtype_size(t), lo, hi;
    void *src[1024];
    int q, W = ctx->world;
    ddp__set_counter(ctx, 0, seq);
    DDP__TRY(ddp__shm_wait(ctx, 0, seq, -1, what));
    ddp__slice(n, W, ctx->rank, &lo, &hi);
    if (hi > lo) {
        for (q = 0; q < W; q++) src[q] = ctx->shm.grads + (size_t)q * ctx->shm.grad_stride + offset + lo * es;
        ddp__reduce(src, W, src, W, hi - lo, t, op, scale);
    }
    ddp__set_counter(ctx, 1, seq);
    DDP__TRY(ddp__shm_wait(ctx, 1, seq, -1, what));
    ddp__set_counter(ctx, 2, seq);
    return DDP_SUCCESS;
}

/* All-reduce of a user buffer through staging. */
static ddp_result ddp__shm_allreduce_staged(ddp_context *ctx, void *buf, size_t n, ddp_dtype t,
                                            ddp_op op, double scale) {
    size_t es = ddp_dtype_size(t);
    int W = ctx->world, q;
    void *src[1024];
    if (n * es <= DDP__SMALL_BYTES && n * es <= ctx->shm.staging_bytes / 2) {
        /* latency path: everybody reduces everything from everybody's staging */
        uint64_t seq = ++ctx->shm.seq;
        int h = (int)(seq & 1);
        size_t half = ctx->shm.staging_bytes / 2;
        DDP__TRY(ddp__shm_claim_staging(ctx, h, seq));
        memcpy(ddp__staging(ctx, ctx->rank) + (size_t)h * half, buf, n * es);
        ddp__set_counter(ctx, 0, seq);
        DDP__TRY(ddp__shm_wait(ctx, 0, seq, -1, "an all-reduce"));
        for (q = 0; q < W; q++) src[q] = ddp__staging(ctx, q) + (size_t)h * half;
        ddp__reduce(src, W, &buf, 1, n, t, op, scale);
        ddp__set_counter(ctx, 2, seq);
        return DDP_SUCCESS;
    } else if (n * es > DDP__STAGED_DIRECT_BYTES) {
        /* bandwidth path, per chunk of half the staging, alternating halves:
           copy in only the slices the peers own; reduce my own slice
           straight from my buffer into my buffer and my staging; then
           gather the other slices from their owners' staging */
        size_t half = ctx->shm.staging_bytes / 2, chunk = half / es, c0;
        for (c0 = 0; c0 < n; c0 += chunk) {
            size_t m = n - c0 < chunk ? n - c0 : chunk, lo, hi;
            uint64_t seq = ++ctx->shm.seq;
            int h = (int)(seq & 1);
            unsigned char *ub = (unsigned char *)buf + c0 * es;
            unsigned char *mine = ddp__staging(ctx, ctx->rank) + (size_t)h * half;
            void *dst[2];
            DDP__TRY(ddp__shm_claim_staging(ctx, h, seq));
            for (q = 0; q < W; q++) {
                if (q == ctx->rank) continue;
                ddp__slice(m, W, q, &lo, &hi);
                if (hi > lo) memcpy(mine + lo * es, ub + lo * es, (hi - lo) * es);
            }
            ddp__set_counter(ctx, 0, seq);
            DDP__TRY(ddp__shm_wait(ctx, 0, seq, -1, "an all-reduce"));
            ddp__slice(m, W, ctx->rank, &lo, &hi);
            if (hi > lo) {
                for (q = 0; q < W; q++)
                    src[q] = q == ctx->rank ? (void *)(ub + lo * es) : (void *)(ddp__staging(ctx, q) + (size_t)h * half + lo * es);
                dst[0] = mine + lo * es;
                dst[1] = ub + lo * es;
                ddp__reduce(src, W, dst, 2, hi - lo, t, op, scale);
            }
            ddp__set_counter(ctx, 1, seq);
            DDP__TRY(ddp__shm_wait(ctx, 1, seq, -1, "an all-reduce"));
            for (q = 0; q < W; q++) {
                if (q == ctx->rank) continue;
                ddp__slice(m, W, q, &lo, &hi);
                if (hi > lo) memcpy(ub + lo * es, ddp__staging(ctx, q) + (size_t)h * half + lo * es, (hi - lo) * es);
            }
            ddp__set_counter(ctx, 2, seq);
        }
        return DDP_SUCCESS;
    } else {
        /* middle sizes, per chunk: copy in, reduce my slice in my staging,
           then gather every slice from its owner's staging */
        size_t chunk = ctx->shm.staging_bytes / es, c0;
        for (c0 = 0; c0 < n; c0 += chunk) {
            size_t m = n - c0 < chunk ? n - c0 : chunk, lo, hi;
            uint64_t seq = ++ctx->shm.seq;
            unsigned char *ub = (unsigned char *)buf + c0 * es;
            void *dst;
            DDP__TRY(ddp__shm_claim_staging(ctx, 2, seq));
            memcpy(ddp__staging(ctx, ctx->rank), ub, m * es);
            ddp__set_counter(ctx, 0, seq);
            DDP__TRY(ddp__shm_wait(ctx, 0, seq, -1, "an all-reduce"));
            ddp__slice(m, W, ctx->rank, &lo, &hi);
            if (hi > lo) {
                for (q = 0; q < W; q++) src[q] = ddp__staging(ctx, q) + lo * es;
                dst = src[ctx->rank];
                ddp__reduce(src, W, &dst, 1, hi - lo, t, op, scale);
            }
            ddp__set_counter(ctx, 1, seq);
            DDP__TRY(ddp__shm_wait(ctx, 1, seq, -1, "an all-reduce"));
            for (q = 0; q < W; q++) {
                ddp__slice(m, W, q, &lo, &hi);
                if (hi > lo) memcpy(ub + lo * es, ddp__staging(ctx, q) + lo * es, (hi - lo) * es);
            }
            ddp__set_counter(ctx, 2, seq);
        }
        return DDP_SUCCESS;
    }
}

static int ddp__in_grad_segment(ddp_context *ctx, const void *buf, size_t bytes) {
    const unsigned char *p = (const unsigned char *)buf, *mine;
    if (!ctx->shm.grads) return 0;
    mine = ctx->shm.grads + (size_t)ctx->rank * ctx->shm.grad_stride;
    return p >= mine && p + bytes <= mine + ctx->shm.grad_stride;
}

static ddp_result ddp__shm_allreduce(ddp_context *ctx, void *buf, size_t n, ddp_dtype t, ddp_op op) {
    double scale = ddp__op_scale(ctx, op);
    if (ctx->world == 1) {
        if (scale != 1.0) ddp__reduce(&buf, 1, &buf, 1, n, t, op, scale);
        return DDP_SUCCESS;
    }
    if (ddp__in_grad_segment(ctx, buf, n * ddp_dtype_size(t))) {
        size_t off = (size_t)((unsigned char *)buf - (ctx->shm.grads + (size_t)ctx->rank * ctx->shm.grad_stride));
        return ddp__shm_allreduce_inplace(ctx, off, n, t, op, scale, "an all-reduce");
    }
    return ddp__shm_allreduce_staged(ctx, buf, n, t, op, scale);
}

static ddp_result ddp__shm_broadcast(ddp_context *ctx, void *buf, size_t bytes, int root) {
    size_t chunk = ctx->shm.staging_bytes, c0;
    if (ctx->world == 1) return DDP_SUCCESS;
    for (c0 = 0; c0 < bytes; c0 += chunk) {
        size_t m = bytes - c0 < chunk ? bytes - c0 : chunk;
        uint64_t seq = ++ctx->shm.seq;
        DDP__TRY(ddp__shm_claim_staging(ctx, 2, seq));
        if (ctx->rank == root) {
            memcpy(ddp__staging(ctx, root), (unsigned char *)buf + c0, m);
            ddp__set_counter(ctx, 0, seq);
        } else {
            ddp__set_counter(ctx, 0, seq);
            DDP__TRY(ddp__shm_wait(ctx, 0, seq, root, "a broadcast"));
            memcpy((unsigned char *)buf + c0, ddp__staging(ctx, root), m);
        }
        ddp__set_counter(ctx, 1, seq);
        ddp__set_counter(ctx, 2, seq);
    }
    return DDP_SUCCESS;
}

static ddp_result ddp__shm_allgather(ddp_context *ctx, const void *send, void *recv, size_t bytes) {
    size_t chunk = ctx->shm.staging_bytes, c0;
    int q;
    for (c0 = 0; c0 < bytes || (bytes == 0 && c0 == 0); c0 += chunk) {
        size_t m = bytes - c0 < chunk ? bytes - c0 : chunk;
        uint64_t seq = ++ctx->shm.seq;
        DDP__TRY(ddp__shm_claim_staging(ctx, 2, seq));
        memcpy(ddp__staging(ctx, ctx->rank), (const unsigned char *)send + c0, m);
        ddp__set_counter(ctx, 0, seq);
        DDP__TRY(ddp__shm_wait(ctx, 0, seq, -1, "an all-gather"));
        for (q = 0; q < ctx->world; q++)
            memcpy((unsigned char *)recv + (size_t)q * bytes + c0, ddp__staging(ctx, q), m);
        ddp__set_counter(ctx, 1, seq);
        ddp__set_counter(ctx, 2, seq);
        if (bytes == 0) break;
    }
    return DDP_SUCCESS;
}

static ddp_result ddp__shm_reduce_scatter(ddp_context *ctx, const void *send, void *recv, size_t n,
                                          ddp_dtype t, ddp_op op) {
    size_t es = ddp_dtype_size(t), chunk = ctx->shm.staging_bytes / es / (size_t)ctx->world, c0;
    double scale = ddp__op_scale(ctx, op);
    int q, W = ctx->world;
    void *src[1024];
    for (c0 = 0; c0 < n; c0 += chunk) {
        size_t m = n - c0 < chunk ? n - c0 : chunk;
        uint64_t seq = ++ctx->shm.seq;
        void *dst = (unsigned char *)recv + c0 * es;
        DDP__TRY(ddp__shm_claim_staging(ctx, 2, seq));
        for (q = 0; q < W; q++)
            memcpy(ddp__staging(ctx, ctx->rank) + (size_t)q * m * es,
                   (const unsigned char *)send + ((size_t)q * n + c0) * es, m * es);
        ddp__set_counter(ctx, 0, seq);
        DDP__TRY(ddp__shm_wait(ctx, 0, seq, -1, "a reduce-scatter"));
        for (q = 0; q < W; q++) src[q] = ddp__staging(ctx, q) + (size_t)ctx->rank * m * es;
        ddp__reduce(src, W, &dst, 1, m, t, op, scale);
        ddp__set_counter(ctx, 1, seq);
        ddp__set_counter(ctx, 2, seq);
    }
    return DDP_SUCCESS;
}

static ddp_result ddp__shm_barrier(ddp_context *ctx, const char *what) {
    uint64_t seq;
    if (ctx->world == 1) return DDP_SUCCESS;
    seq = ++ctx->shm.seq;
    ddp__set_counter(ctx, 0, seq);
    DDP__TRY(ddp__shm_wait(ctx, 0, seq, -1, what));
    ddp__set_counter(ctx, 1, seq);
    ddp__set_counter(ctx, 2, seq);
    return DDP_SUCCESS;
}

/* ---- backends ------------------------------------------------------------------ */

struct ddp__backend_ops {
    const char *name;
    /* collectives on user buffers (host for shm; device or host for CUDA backends) */
    ddp_result (*allreduce)(ddp_context *ctx, void *buf, size_t n, ddp_dtype t, ddp_op op);
    ddp_result (*broadcast)(ddp_context *ctx, void *buf, size_t bytes, int root);
    ddp_result (*allgather)(ddp_context *ctx, const void *send, void *recv, size_t bytes);
    ddp_result (*reduce_scatter)(ddp_context *ctx, const void *send, void *recv, size_t n, ddp_dtype t, ddp_op op);
    ddp_result (*barrier)(ddp_context *ctx, const char *what);
    /* reduce bucket b of the flat gradients in place, multiplied by scale;
       runs on the communication thread (or inline) */
    ddp_result (*bucket_reduce)(ddp_context *ctx, int b, double scale);
};

static ddp_result ddp__shm_bucket_reduce(ddp_context *ctx, int b, double scale) {
    const ddp__bucket *bk = &ctx->buckets[b];
    char what[96];
    if (ctx->world == 1) {
        void *p = ctx->flat_grads + bk->offset;
        if (scale != 1.0) ddp__reduce(&p, 1, &p, 1, bk->numel, bk->dtype, DDP_OP_SUM, scale);
        return DDP_SUCCESS;
    }
    snprintf(what, sizeof what, "gradient bucket %d", b);
    return ddp__shm_allreduce_inplace(ctx, bk->offset, bk->numel, bk->dtype, DDP_OP_SUM, scale, what);
}

static const ddp__backend_ops ddp__shm_ops = {
    "shm",
    ddp__shm_allreduce,
    ddp__shm_broadcast,
    ddp__shm_allgather,
    ddp__shm_reduce_scatter,
    ddp__shm_barrier,
    ddp__shm_bucket_reduce
};

/* A broken context answers every call with the error that broke it when a
   peer or a timeout did (DDP_ERROR_PEER, DDP_ERROR_TIMEOUT), else
   DDP_ERROR_INVALID_STATE. */
static ddp_result ddp__check_usable(ddp_context *ctx, const char *fn) {
    int b = __atomic_load_n(&ctx->broken, __ATOMIC_ACQUIRE);
    if (b) {
        ddp_result code = b == DDP_ERROR_PEER || b == DDP_ERROR_TIMEOUT ? (ddp_result)b : DDP_ERROR_INVALID_STATE;
        char why[DDP__ERRLEN];
        ddp__comm_error(ctx, why, sizeof why);
        if (!why[0]) memcpy(why, ctx->err, sizeof why);
        return ddp__fail(ctx, code, "%s: the context is broken by an earlier error (%s); only ddp_destroy() is allowed", fn, why);
    }
    return DDP_SUCCESS;
}

/* ---- rendezvous -------------------------------------------------------------------- */

static void ddp__key(const ddp_context *ctx, char *out, size_t cap, const char *name) {
    snprintf(out, cap, "%s%s", ctx->key_prefix, name);
}

/* Rank 0 learns at once of an event at its store (another job on the port,
   another version, tampering), whatever it is waiting for. */
static ddp_result ddp__check_event(ddp_context *ctx) {
    char ev[1024];
    int kind = ddp__store_server_event(ctx->server, ev, sizeof ev);
    if (!kind) return DDP_SUCCESS;
    return ddp__fail(ctx, kind == DDP__EVENT_TAMPER ? DDP_ERROR_SECURITY : kind == DDP__EVENT_ABORT ? DDP_ERROR_PEER : DDP_ERROR_MISMATCH,
                     "rank %d: %s", ctx->rank, ev);
}

/* Something broke outside the store (rank 0 closed the socket it hands
   shared memory through): if a rank gave up, its message says why. Waits
   up to a second for it; its error (with the message in ctx->err), or
   DDP_SUCCESS when there is none. */
static ddp_result ddp__kv_why(ddp_context *ctx) {
    ddp__store *st = (ddp__store *)ctx->store;
    char key[160], err[1024];
    const char *k = key;
    int timed_out = 0;
    ddp_result r = ddp__check_event(ctx);
    if (r != DDP_SUCCESS) return r;
    if (!st || !st->hello || st->fatal) return DDP_SUCCESS;
    ddp__key(ctx, key, sizeof key, "never/written");
    if (ddp__store_wait_until(st, &k, 1, ddp__now() + 1.0, &timed_out, err, sizeof err) == 0 || timed_out || !st->fatal)
        return DDP_SUCCESS;
    return ddp__fail(ctx, (ddp_result)st->fatal, "rank %d: %s", ctx->rank, err);
}

/* This rank gives up during the rendezvous or finalize: the ranks waiting
   in the store learn it, and why, now rather than at their timeout. */
static void ddp__kv_abort(ddp_context *ctx, const char *why) {
    char msg[1100];
    snprintf(msg, sizeof msg, "rank %d gave up: %s", ctx->rank, why);
    if (ctx->server) ddp__store_server_abort(ctx->server, msg);
    else if (ctx->store) ddp__store_abort((ddp__store *)ctx->store, msg);
}

/* A failed store call: the event or refusal behind it when there is one. */
static ddp_result ddp__store_err(ddp_context *ctx, const char *err) {
    const ddp__store *st = (const ddp__store *)ctx->store;
    ddp_result code = ddp__check_event(ctx);
    if (code != DDP_SUCCESS) return code;
    if (st && st->fatal) return ddp__fail(ctx, (ddp_result)st->fatal, "rank %d: %s", ctx->rank, err);
    code = strstr(err, "timed out") ? DDP_ERROR_TIMEOUT : DDP_ERROR_NETWORK;
    return ddp__fail(ctx, code, "rank %d: %s (the rendezvous store is %s)", ctx->rank, err,
                     ctx->agent_store ? "torchrun's agent's" : "rank 0's");
}

static ddp_result ddp__kv_set(ddp_context *ctx, const char *name, const void *val, size_t len) {
    char key[256], err[1024];
    DDP__TRY(ddp__check_event(ctx));
    ddp__key(ctx, key, sizeof key, name);
    if (ddp__store_set((ddp__store *)ctx->store, key, val, len, err, sizeof err) != 0) return ddp__store_err(ctx, err);
    return DDP_SUCCESS;
}

static ddp_result ddp__kv_get(ddp_context *ctx, const char *name, void **val, size_t *len) {
    char key[256], err[1024];
    DDP__TRY(ddp__check_event(ctx));
    ddp__key(ctx, key, sizeof key, name);
    if (ddp__store_get((ddp__store *)ctx->store, key, val, len, err, sizeof err) != 0) return ddp__store_err(ctx, err);
    return DDP_SUCCESS;
}

static ddp_result ddp__kv_barrier(ddp_context *ctx, const char *name) {
    char key[256], err[1024];
    DDP__TRY(ddp__check_event(ctx));
    ddp__key(ctx, key, sizeof key, name);
    if (ddp__store_barrier((ddp__store *)ctx->store, key, ctx->rank, ctx->world, err, sizeof err) != 0)
        return ddp__store_err(ctx, err);
    return ddp__check_event(ctx);
}

/* A key this rank writes once and others trust (shared memory, the NCCL
   id, identity records): remembered, and read back by ddp__kv_verify_pinned
   before the store goes. Rank 0's own store refuses any change to such a
   key and reports the attempt; torchrun's store cannot, so reading back is
   what finds a change there. */
static ddp_result ddp__kv_set_once(ddp_context *ctx, const char *name, const void *val, size_t len) {
    DDP__TRY(ddp__kv_set(ctx, name, val, len));
    if (ctx->npinned < (int)(sizeof ctx->pinned / sizeof ctx->pinned[0]) && strlen(name) < sizeof ctx->pinned[0]) {
        ddp__sha256 h;
        ddp__sha256_init(&h);
        ddp__sha256_update(&h, val, len);
        ddp__sha256_final(&h, ctx->pinned_hash[ctx->npinned]);
        ddp__copy_str(ctx->pinned[ctx->npinned], sizeof ctx->pinned[0], name);
        ctx->npinned++;
    }
    return DDP_SUCCESS;
}

static ddp_result ddp__kv_verify_pinned(ddp_context *ctx) {
    int i;
    for (i = 0; i < ctx->npinned; i++) {
        void *v = NULL;
        size_t len = 0;
        unsigned char d[32];
        ddp__sha256 h;
        DDP__TRY(ddp__kv_get(ctx, ctx->pinned[i], &v, &len));
        ddp__sha256_init(&h);
        ddp__sha256_update(&h, v, len);
        ddp__sha256_final(&h, d);
        free(v);
        if (memcmp(d, ctx->pinned_hash[i], 32) != 0)
            return ddp__fail(ctx, DDP_ERROR_SECURITY,
                             "rank %d: store tampering: key '%s%s' changed after this rank wrote it (another job on port %d, or a process that is not a rank)",
                             ctx->rank, ctx->key_prefix, ctx->pinned[i], ctx->cfg.master_port);
    }
    ctx->npinned = 0;
    return ddp__check_event(ctx);
}

/* torchrun's agent store has no hello: every rank publishes its identity
   record under "ident/<rank>" and compares it with rank 0's (rank 0 with
   every rank's), so both sides of a mismatch fail. */
static ddp_result ddp__ident_exchange(ddp_context *ctx) {
    ddp__ident mine, other;
    char key[32], msg[768];
    int q;
    ddp__ident_parse(ctx->ident, strlen(ctx->ident), &mine);
    if (ctx->rank == 0) {
        ctx->rank_pid = (int *)ddp__calloc(ctx, (size_t)ctx->world * sizeof(int));
        if (!ctx->rank_pid) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory");
    }
    snprintf(key, sizeof key, "ident/%d", ctx->rank);
    DDP__TRY(ddp__kv_set_once(ctx, key, ctx->ident, strlen(ctx->ident) + 1));
    for (q = ctx->rank == 0 ? 1 : 0; q < (ctx->rank == 0 ? ctx->world : 1); q++) {
        void *v = NULL;
        size_t len = 0;
        ddp_result r;
        snprintf(key, sizeof key, "ident/%d", q);
        r = ddp__kv_get(ctx, key, &v, &len);
        if (r == DDP_ERROR_TIMEOUT)
            return ddp__fail(ctx, r, "rank %d: rank %d did not publish its identity record within %.1f s (dead or stuck before ddp_create, or built from a ddp.h older than 0.2)",
                             ctx->rank, q, ctx->cfg.connect_timeout_s);
        if (r != DDP_SUCCESS) return r;
        if (ddp__ident_parse((const char *)v, len, &other) != 0 || other.rank != q) {
            char show[64];
            ddp__ident_word(show, sizeof show, (const char *)v);
            free(v);
            return ddp__fail(ctx, DDP_ERROR_MISMATCH, "rank %d: key '%s%s' does not hold rank %d's identity record ('%.40s'): another program or another ddp.h version uses this store",
                             ctx->rank, ctx->key_prefix, key, q, show);
        }
        free(v);
        r = ddp__ident_compare(&mine, &other, ctx->cfg.master_port, msg, sizeof msg);
        if (r != DDP_SUCCESS) return ddp__fail(ctx, r, "%s", msg);
        if (q == 0) ctx->peer0 = other;
        else if (ctx->rank_pid) ctx->rank_pid[q] = other.pid;
    }
    return DDP_SUCCESS;
}

static void ddp__server_log(int level, const char *msg, void *user) {
    ddp__log((const ddp_context *)user, (ddp_log_level)level, msg);
}

static ddp_result ddp__rendezvous(ddp_context *ctx) {
    /* contexts created on the agent's store by this process: the same
       sequence on every rank, so keys of successive contexts never mix */
    static int generation = 0;
    const char *agent = getenv("TORCHELASTIC_USE_AGENT_STORE");
    char err[1024], host[256];
    ddp__store *st;
    ddp__ident me;
    /* only a rank that read its identity from torchrun's variables uses the agent's store */
    ctx->agent_store = ctx->from_env && agent && (!strcmp(agent, "True") || !strcmp(agent, "true") || !strcmp(agent, "1"));

    /* this rank's identity record; rank 0's carries the context's nonce,
       which every shared-memory segment of the context carries too */
    memset(&me, 0, sizeof me);
    if (ctx->rank == 0 && ddp__sys_random(ctx->shm.nonce, sizeof ctx->shm.nonce) != 0)
        return ddp__fail(ctx, DDP_ERROR_SYSTEM, "cannot read random bytes: %s", strerror(errno));
    me.version = DDP__WIRE_VERSION;
    me.world = ctx->world;
    me.rank = ctx->rank;
    me.secret = ctx->secret_len > 0;
    me.pid = ddp__proc_self();
    me.uid = ddp__proc_uid();
    ddp__ident_word(me.job, sizeof me.job, ctx->job_id[0] ? ctx->job_id : "-");
    ddp__proc_hostname(host, sizeof host);
    ddp__ident_word(me.host, sizeof me.host, host);
    if (ctx->rank == 0) ddp__hex(ctx->shm.nonce, sizeof ctx->shm.nonce, me.nonce);
    else ddp__copy_str(me.nonce, sizeof me.nonce, "-");
    ddp__ident_format(&me, ctx->ident, sizeof ctx->ident);
    if (ctx->rank == 0) ctx->peer0 = me;

    st = (ddp__store *)ddp__calloc(ctx, sizeof *st);
    if (!st) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory for the store client");
    if (ctx->agent_store) {
        int f, gen = __atomic_add_fetch(&generation, 1, __ATOMIC_RELAXED);
        long restart = 0;
        ddp_result r = ddp__env_int("TORCHELASTIC_RESTART_COUNT", 0, INT_MAX, &f, &restart);
        if (r != DDP_SUCCESS) { ddp__free(ctx, st); return r; }
        snprintf(ctx->key_prefix, sizeof ctx->key_prefix, "/worker/attempt_%ld/ddp/%d/", restart, gen);
        {
            char msg[400];
            snprintf(msg, sizeof msg, "rank %d: torchrun's agent store at %s:%d has no authentication: any process that can reach it can read and change "
                     "this job's rendezvous keys%s (see SECURITY in ddp.h)", ctx->rank, ctx->cfg.master_addr, ctx->cfg.master_port,
                     ctx->secret_len ? "; DDP_JOB_SECRET cannot be checked there" : "");
            ddp__log(ctx, DDP_LOG_WARN, msg);
        }
        if (ddp__store_connect(st, ctx->cfg.master_addr, ctx->cfg.master_port, ctx->cfg.connect_timeout_s, err, sizeof err) != 0) {
            ddp__free(ctx, st);
            return ddp__fail(ctx, strstr(err, "within") || strstr(err, "timed out") ? DDP_ERROR_TIMEOUT : DDP_ERROR_NETWORK,
                             "rank %d cannot reach the rendezvous store of torchrun's agent: %s", ctx->rank, err);
        }
        st->timeout_s = ctx->cfg.connect_timeout_s;
        ctx->store = st;
        return ddp__ident_exchange(ctx);
    }

    /* a store of our own, new for every context; the generation (per
       thread: dp.h's replicas each create one context on their own
       thread) keeps a late peer from reading the previous context's keys */
    {
        static DDP__TLS int own_generation = 0;
        snprintf(ctx->key_prefix, sizeof ctx->key_prefix, "ddp/%d/", ++own_generation);
    }
    if (ctx->rank == 0) {
        ddp__store_opts o;
        const char *bind = strcmp(ctx->bind, "*") ? ctx->bind : NULL;
        if (bind && !ctx->cfg.store_bind && !getenv("DDP_STORE_BIND") && ctx->local_world < ctx->world &&
            ddp__sock_addr_is_loopback(bind)) {
            ddp__free(ctx, st);
            return ddp__fail(ctx, DDP_ERROR_ENVIRONMENT,
                             "rank 0: the master address '%s' is a loopback address on this host, which the ranks on other hosts cannot reach; "
                             "set MASTER_ADDR to an address of this host that they use (or DDP_STORE_BIND to the address to listen on, '*' for every interface)",
                             ctx->cfg.master_addr);
        }
        memset(&o, 0, sizeof o);
        o.secret = ctx->secret_len ? ctx->secret : NULL;
        o.secret_len = ctx->secret_len;
        o.ident = ctx->ident;
        o.protect = "ddp/";
        o.max_bytes = ctx->cfg.store_max_bytes;
        o.world = ctx->world;
        o.log = ddp__server_log;
        o.log_user = ctx;
        if (ddp__store_server_start(bind, ctx->cfg.master_port, &o, &ctx->server, err, sizeof err) != 0) {
            ddp__free(ctx, st);
            return ddp__fail(ctx, DDP_ERROR_NETWORK, "rank 0 cannot start the rendezvous store: %s%s", err,
                             strstr(err, "in use") ? " (another job or program uses this port)"
                             : strstr(err, "assign") ? " (the address is not one of this host's: set DDP_STORE_BIND to the address to listen on, '*' for every interface)" : "");
        }
    }
    if (ddp__store_connect_hello(st, ctx->cfg.master_addr, ctx->cfg.master_port, ctx->cfg.connect_timeout_s, ctx->ident,
                                 ctx->secret, ctx->secret_len, err, sizeof err) != 0) {
        ddp_result code = st->fatal ? (ddp_result)st->fatal
                          : strstr(err, "within") || strstr(err, "timed out") ? DDP_ERROR_TIMEOUT : DDP_ERROR_NETWORK;
        ddp_result ev = ddp__check_event(ctx);
        ddp__free(ctx, st);
        if (ev != DDP_SUCCESS) return ev;
        if (code == DDP_ERROR_TIMEOUT || code == DDP_ERROR_NETWORK)
            return ddp__fail(ctx, code, "rank %d cannot reach the rendezvous store of rank 0: %s", ctx->rank, err);
        return ddp__fail(ctx, code, "rank %d: %s", ctx->rank, err);
    }
    st->timeout_s = ctx->cfg.connect_timeout_s;
    ctx->store = st;
    if (ctx->rank != 0 && ddp__ident_parse(st->peer_ident, strlen(st->peer_ident), &ctx->peer0) != 0)
        return ddp__fail(ctx, DDP_ERROR_NETWORK, "rank %d: rank 0's store sent a malformed identity record", ctx->rank);
    return DDP_SUCCESS;
}

/* ---- shared-memory segments ---------------------------------------------------------

   No name outlives the job. On Linux rank 0 makes each segment with
   memfd_create (anonymous: nothing in /dev/shm, ever) and hands the
   descriptor to each local rank over a Unix socket in the abstract
   namespace (nameless on disk too); the memory goes with the last process
   that maps it, whatever kills whom and when. Both ends check who is at the
   other end (the kernel's peer credentials: the same user; the receiver
   also checks it is rank 0's pid), and the receiver checks the memory:
   owned by this user, mode 0600, the size expected, and the context's
   random nonce in its header, the nonce rank 0 sent in its identity record.

   Elsewhere (or built with DDP__SHM_NAMED) segments are named
   "/ddp-<pid>-..." in /dev/shm: rank 0 removes the name as soon as every
   rank has mapped it. A rank 0 killed in that window leaves the name
   behind; ddprun removes the names of its ranks when they end, and the next
   rank 0 on the host removes those of dead creators. Named segments are
   sized to fit /dev/shm (the staging area shrinks, with a log line). */

#define DDP__SEG_HDR_BYTES ((size_t)4096) /* the gradient segment's header page */
#define DDP__SEG_REQ_MAGIC 0x46504444u    /* "DDPF": a request for a segment's descriptor */
#define DDP__SEG_PENDING   64             /* requests rank 0 holds at once; more wait in the backlog */

static int ddp__unhex16(const char *hex, unsigned char out[16]) {
    int i;
    for (i = 0; i < 32; i++) {
        char ch = hex[i];
        int v = ch >= '0' && ch <= '9' ? ch - '0' : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10 : -1;
        if (v < 0) return -1;
        if (i & 1) out[i / 2] = (unsigned char)(out[i / 2] | v);
        else out[i / 2] = (unsigned char)(v << 4);
    }
    return hex[32] == 0 ? 0 : -1;
}

/* The pid rank q gave in its identity record (0: unknown). */
static int ddp__rank_pid(ddp_context *ctx, int q) {
    if (q == 0) return ctx->peer0.pid;
    if (ctx->server) return ddp__store_server_rank_pid(ctx->server, q);
    return ctx->rank_pid ? ctx->rank_pid[q] : 0;
}

/* Rank 0: a segment of `bytes`, the first `reserve` of them backed by
   memory now; mapped at *p. Anonymous unless ctx->shm.named. */
static ddp_result ddp__seg_create(ddp_context *ctx, const char *what, size_t bytes, size_t reserve,
                                  int *fd, char *name, size_t ncap, void **p) {
    static int counter = 0;
    int e;
    *fd = -1;
    *p = NULL;
    name[0] = 0;
    if (!ctx->shm.named) {
        if (ddp__shm_obj_anon(bytes, fd) != 0) {
            e = errno;
            if (e != ENOSYS && e != EPERM && e != EINVAL)
                return ddp__fail(ctx, e == ENOMEM || e == ENOSPC ? DDP_ERROR_OUT_OF_MEMORY : DDP_ERROR_SYSTEM,
                                 "rank 0 cannot create %zu bytes of shared memory for the %s: %s", bytes, what, strerror(e));
            ctx->shm.named = 1;
            ddp__log(ctx, DDP_LOG_INFO, "anonymous shared memory (memfd) is not available: using named segments in /dev/shm");
        }
    }
    if (ctx->shm.named) {
        unsigned char rnd[4];
        char hex[9];
        if (ddp__sys_random(rnd, sizeof rnd) != 0) memset(rnd, 0, sizeof rnd);
        ddp__hex(rnd, sizeof rnd, hex);
        snprintf(name, ncap, "/ddp-%d-%d-%s-%s", ddp__proc_self(), __atomic_add_fetch(&counter, 1, __ATOMIC_RELAXED), what, hex);
        if (ddp__shm_obj_create_named(name, bytes, fd) != 0) {
            e = errno;
            name[0] = 0;
            return ddp__fail(ctx, DDP_ERROR_SYSTEM, "rank 0 cannot create shared memory for the %s (%zu bytes): %s", what, bytes, strerror(e));
        }
    }
    e = ddp__shm_obj_reserve(*fd, reserve);
    if (e == 0) {
        *p = ddp__shm_obj_map(*fd, bytes, 1);
        if (!*p) e = errno ? errno : ENOMEM;
    }
    if (e != 0) {
        ddp__fd_close(*fd);
        *fd = -1;
        if (name[0]) { ddp__shm_obj_unlink(name); name[0] = 0; }
        if (e == ENOSPC || e == ENOMEM || e == EFBIG)
            return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "rank 0 cannot reserve %zu bytes of shared memory for the %s: %s; %s",
                             reserve, what, strerror(e),
                             ctx->shm.named ? "/dev/shm is full or too small: give it more (docker run --shm-size=..., or a bigger tmpfs on /dev/shm)"
                                            : "not enough memory: free some, or raise this container's memory limit");
        return ddp__fail(ctx, DDP_ERROR_SYSTEM, "rank 0 cannot map %zu bytes of shared memory for the %s: %s", bytes, what, strerror(e));
    }
    return DDP_SUCCESS;
}

/* Rank 0 hands the descriptor to ranks 1..world-1 as they ask, checking
   each asker (same user, the pid its rank gave, the context's nonce);
   returns when every rank has it. */
static ddp_result ddp__seg_serve(ddp_context *ctx, int lfd, int seg_fd, const char *what) {
    typedef struct { int fd; size_t have; unsigned char req[24]; } asker;
    asker pend[DDP__SEG_PENDING];
    int npend = 0, left = ctx->world - 1, q, i;
    char *served = (char *)ddp__calloc(ctx, (size_t)ctx->world);
    double deadline = ddp__now() + ctx->cfg.connect_timeout_s, next_check = 0;
    ddp_result r = DDP_SUCCESS;
    if (!served) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory");
    while (left > 0 && r == DDP_SUCCESS) {
        int fds[DDP__SEG_PENDING + 1], ready[DDP__SEG_PENDING + 1];
        double now;
        fds[0] = lfd;
        for (i = 0; i < npend; i++) fds[1 + i] = pend[i].fd;
        ddp__sock_local_wait(fds, npend + 1, 50, ready);
        for (i = 0; i < npend; i++) {
            long got;
            if (!ready[1 + i]) continue;
            got = ddp__sock_local_read(pend[i].fd, pend[i].req + pend[i].have, sizeof pend[i].req - pend[i].have);
            if (got > 0) pend[i].have += (size_t)got;
            else if (got < 0) pend[i].have = (size_t)-1;
        }
        for (i = 0; i < npend;) {
            asker *a = &pend[i];
            if (a->have == sizeof a->req) {
                uint32_t magic;
                int32_t rank;
                int pid = 0, want = 0, ok;
                unsigned uid = 0;
                char why[160];
                memcpy(&magic, a->req, 4);
                memcpy(&rank, a->req + 4, 4);
                ok = ddp__sock_peer(a->fd, &pid, &uid) == 0;
                why[0] = 0;
                if (!ok) snprintf(why, sizeof why, "its credentials are unknown");
                else if (magic != DDP__SEG_REQ_MAGIC || rank < 1 || rank >= ctx->world) snprintf(why, sizeof why, "a malformed request");
                else if (uid != ddp__proc_uid()) snprintf(why, sizeof why, "it runs as uid %u, this job as uid %u", uid, ddp__proc_uid());
                else if (served[rank]) snprintf(why, sizeof why, "rank %d has the memory already", (int)rank);
                else if ((want = ddp__rank_pid(ctx, rank)) > 0 && want != pid) snprintf(why, sizeof why, "rank %d is pid %d", (int)rank, want);
                else if (!ddp__ct_equal(a->req + 8, ctx->shm.nonce, 16)) snprintf(why, sizeof why, "it does not know the context's nonce");
                if (!why[0]) {
                    if (ddp__sock_send_fd(a->fd, seg_fd, 0) == 0) { served[rank] = 1; left--; }
                } else {
                    char msg[400];
                    ddp__sock_send_fd(a->fd, -1, 1);
                    snprintf(msg, sizeof msg, "rank 0 refused the %s's shared memory to pid %d (claiming rank %d): %s", what, pid, (int)rank, why);
                    ddp__log(ctx, DDP_LOG_WARN, msg);
                }
                a->have = (size_t)-1;
            }
            if (a->have == (size_t)-1) {
                ddp__fd_close(a->fd);
                pend[i] = pend[--npend];
                continue;
            }
            i++;
        }
        if (ready[0]) {
            for (;;) {
                int fd = ddp__sock_local_accept(lfd);
                if (fd < 0) break;
                if (npend == DDP__SEG_PENDING) { ddp__fd_close(pend[0].fd); pend[0] = pend[--npend]; }
                pend[npend].fd = fd;
                pend[npend].have = 0;
                npend++;
            }
        }
        if (left == 0) break;
        r = ddp__check_event(ctx);
        now = ddp__now();
        if (r == DDP_SUCCESS && now >= next_check) {
            next_check = now + 0.05;
            for (q = 1; q < ctx->world && r == DDP_SUCCESS; q++) {
                int pid = ddp__rank_pid(ctx, q);
                if (!served[q] && pid > 0 && !ddp__proc_alive(pid)) {
                    r = ddp__fail(ctx, DDP_ERROR_PEER, "rank %d (pid %d) exited before it received the %s's shared memory from rank 0", q, pid, what);
                    ddp__shm_abort(ctx, ctx->err); /* the others may wait on it in the control segment */
                }
            }
        }
        if (r == DDP_SUCCESS && now > deadline) {
            char list[256];
            size_t n = 0;
            list[0] = 0;
            for (q = 1; q < ctx->world && n + 16 < sizeof list; q++)
                if (!served[q]) n += (size_t)snprintf(list + n, sizeof list - n, "%srank %d", n ? ", " : "", q);
            r = ddp__fail(ctx, DDP_ERROR_TIMEOUT, "timed out after %.1f s: rank 0 handed the %s's shared memory to every rank but %s (dead or stuck before it asked?)",
                          ctx->cfg.connect_timeout_s, what, list);
        }
    }
    for (i = 0; i < npend; i++) ddp__fd_close(pend[i].fd);
    ddp__free(ctx, served);
    return r;
}

/* Rank 0: publish the segment under key and, when it is anonymous, hand it
   to every rank. */
static ddp_result ddp__seg_share(ddp_context *ctx, const char *key, const char *what, int fd, const char *name, size_t bytes) {
    char val[200], sock[128];
    int lfd = -1;
    ddp_result r;
    if (ctx->shm.named) {
        snprintf(val, sizeof val, "name %s bytes=%zu", name, bytes);
        return ddp__kv_set_once(ctx, key, val, strlen(val) + 1);
    }
    if (ddp__sock_local_listen(sock, sizeof sock, &lfd) != 0)
        return ddp__fail(ctx, DDP_ERROR_SYSTEM, "rank 0 cannot open a local socket to hand out shared memory: %s", strerror(errno));
    snprintf(val, sizeof val, "fd %s bytes=%zu", sock, bytes);
    r = ddp__kv_set_once(ctx, key, val, strlen(val) + 1);
    if (r == DDP_SUCCESS) r = ddp__seg_serve(ctx, lfd, fd, what);
    ddp__fd_close(lfd);
    return r;
}

/* The checks every receiver makes before it uses a segment: this user's,
   nobody else's, the size expected, and (its header, read before the
   memory is mapped) this context's: kind, world, rank 0's nonce, size. */
static ddp_result ddp__seg_verify(ddp_context *ctx, int fd, const char *key, int kind, size_t bytes) {
    unsigned uid = 0, mode = 0;
    size_t size = 0;
    ddp__seg_hdr h;
    if (ddp__shm_obj_stat(fd, &uid, &mode, &size) != 0)
        return ddp__fail(ctx, DDP_ERROR_SYSTEM, "rank %d cannot inspect the shared memory of key '%s%s': %s", ctx->rank, ctx->key_prefix, key, strerror(errno));
    if (uid != ddp__proc_uid())
        return ddp__fail(ctx, DDP_ERROR_SECURITY, "rank %d: the shared memory of key '%s%s' belongs to uid %u, not to this job's user (uid %u): store tampering, or another job on port %d",
                         ctx->rank, ctx->key_prefix, key, uid, ddp__proc_uid(), ctx->cfg.master_port);
    if (mode & 077)
        return ddp__fail(ctx, DDP_ERROR_SECURITY, "rank %d: the shared memory of key '%s%s' is open to other users (mode %o, 600 expected): store tampering, or not this job's",
                         ctx->rank, ctx->key_prefix, key, mode);
    if (size != bytes)
        return ddp__fail(ctx, DDP_ERROR_SECURITY, "rank %d: the shared memory of key '%s%s' has %zu bytes, %zu expected: store tampering, or another job",
                         ctx->rank, ctx->key_prefix, key, size, bytes);
    if (ddp__shm_obj_peek(fd, &h, sizeof h) != 0)
        return ddp__fail(ctx, DDP_ERROR_SYSTEM, "rank %d cannot read the header of the shared memory of key '%s%s': %s", ctx->rank, ctx->key_prefix, key, strerror(errno));
    if (h.magic != DDP__SHM_MAGIC || h.kind != kind || h.world != ctx->world || h.bytes != (uint64_t)bytes ||
        !ddp__ct_equal(h.nonce, ctx->shm.nonce, 16))
        return ddp__fail(ctx, DDP_ERROR_SECURITY, "rank %d: the shared memory of key '%s%s' is not this context's (its header does not carry rank 0's nonce): store tampering, or another job on port %d",
                         ctx->rank, ctx->key_prefix, key, ctx->cfg.master_port);
    return DDP_SUCCESS;
}

/* Ranks 1..: the segment rank 0 published under key, verified and mapped.
   *bytes: expected size, or 0 to take the size rank 0 published (then
   checked against the header). */
static ddp_result ddp__seg_attach(ddp_context *ctx, const char *key, int kind, size_t *bytes, void **p) {
    void *val = NULL;
    size_t len = 0, said = 0;
    char kindw[8], ref[128];
    int fd = -1;
    ddp_result r;
    *p = NULL;
    if (ddp__unhex16(ctx->peer0.nonce, ctx->shm.nonce) != 0)
        return ddp__fail(ctx, DDP_ERROR_MISMATCH, "rank %d: rank 0's identity record carries no shared-memory nonce", ctx->rank);
    DDP__TRY(ddp__kv_get(ctx, key, &val, &len));
    if (sscanf((const char *)val, "%7s %127s bytes=%zu", kindw, ref, &said) != 3 || (strcmp(kindw, "fd") && strcmp(kindw, "name")) ||
        said == 0 || (*bytes && said != *bytes)) {
        char show[64];
        ddp__ident_word(show, sizeof show, (const char *)val);
        free(val);
        return ddp__fail(ctx, DDP_ERROR_SECURITY, "rank %d: key '%s%s' holds '%.60s', not a reference to rank 0's shared memory%s: store tampering, or another job on port %d",
                         ctx->rank, ctx->key_prefix, key, show, *bytes && said && said != *bytes ? " of the expected size" : "", ctx->cfg.master_port);
    }
    free(val);
    if (!strcmp(kindw, "name")) {
        ctx->shm.named = 1;
        if (ddp__shm_obj_open_named(ref, &fd) != 0)
            return ddp__fail(ctx, DDP_ERROR_SYSTEM, "rank %d cannot open shared memory '%s' (key '%s%s'): %s", ctx->rank, ref, ctx->key_prefix, key, strerror(errno));
    } else {
        int s = -1, pid = 0;
        unsigned uid = 0;
        unsigned char req[24], status = 1;
        uint32_t magic = DDP__SEG_REQ_MAGIC;
        int32_t rank = ctx->rank;
        double deadline = ddp__now() + ctx->cfg.connect_timeout_s;
        if (ddp__sock_local_connect(ref, &s) != 0) {
            int e = errno;
            if (ctx->peer0.pid > 0 && !ddp__proc_alive(ctx->peer0.pid))
                return ddp__fail(ctx, DDP_ERROR_PEER, "rank 0 (pid %d) exited while rank %d fetched shared memory", ctx->peer0.pid, ctx->rank);
            return ddp__fail(ctx, DDP_ERROR_SYSTEM, "rank %d cannot reach rank 0's shared-memory socket '%s' (key '%s%s'): %s",
                             ctx->rank, ref, ctx->key_prefix, key, strerror(e));
        }
        if (ddp__sock_peer(s, &pid, &uid) != 0 || uid != ddp__proc_uid() || pid != ctx->peer0.pid) {
            ddp__fd_close(s);
            return ddp__fail(ctx, DDP_ERROR_SECURITY,
                             "rank %d: the shared memory offered under key '%s%s' is served by pid %d (uid %u), not by rank 0 (pid %d, uid %u): store tampering, or another job on port %d",
                             ctx->rank, ctx->key_prefix, key, pid, uid, ctx->peer0.pid, ddp__proc_uid(), ctx->cfg.master_port);
        }
        memcpy(req, &magic, 4);
        memcpy(req + 4, &rank, 4);
        memcpy(req + 8, ctx->shm.nonce, 16);
        if (ddp__sock_local_write(s, req, sizeof req) != 0 || ddp__sock_recv_fd(s, deadline, &status, &fd) != 0) {
            int e = errno;
            ddp__fd_close(s);
            if (e != ETIMEDOUT && (r = ddp__kv_why(ctx)) != DDP_SUCCESS) return r;
            if (ctx->peer0.pid > 0 && !ddp__proc_alive(ctx->peer0.pid))
                return ddp__fail(ctx, DDP_ERROR_PEER, "rank 0 (pid %d) exited while rank %d waited for shared memory", ctx->peer0.pid, ctx->rank);
            return ddp__fail(ctx, e == ETIMEDOUT ? DDP_ERROR_TIMEOUT : DDP_ERROR_PEER, "rank %d did not receive the shared memory of key '%s%s' from rank 0: %s",
                             ctx->rank, ctx->key_prefix, key, e == ETIMEDOUT ? "timed out" : strerror(e));
        }
        ddp__fd_close(s);
        if (status != 0 || fd < 0) {
            ddp__fd_close(fd);
            return ddp__fail(ctx, DDP_ERROR_SECURITY, "rank %d: rank 0 refused to hand over the shared memory of key '%s%s' (see rank 0's log)", ctx->rank, ctx->key_prefix, key);
        }
    }
    r = ddp__seg_verify(ctx, fd, key, kind, said);
    if (r == DDP_SUCCESS) {
        *p = ddp__shm_obj_map(fd, said, 1);
        if (!*p) r = ddp__fail(ctx, DDP_ERROR_SYSTEM, "rank %d cannot map %zu bytes of shared memory (key '%s%s'): %s", ctx->rank, said, ctx->key_prefix, key, strerror(errno));
    }
    ddp__fd_close(fd);
    *bytes = said;
    return r;
}

static void ddp__seg_header(struct ddp__seg_hdr *h, const ddp_context *ctx, int kind, size_t bytes, size_t staging) {
    h->magic = DDP__SHM_MAGIC;
    h->world = ctx->world;
    h->kind = kind;
    memcpy(h->nonce, ctx->shm.nonce, 16);
    h->bytes = (uint64_t)bytes;
    h->staging = (uint64_t)staging;
}

/* Named segments live in /dev/shm, which may be small (a container's 64
   MiB): the staging area gets at most half of what is free, the gradients
   (sized at ddp_finalize) the rest. A smaller staging area only means more
   rounds for large collectives on your own buffers. */
static size_t ddp__shm_fit_staging(ddp_context *ctx, size_t hdr, size_t want) {
    long long avail = ddp__shm_named_free();
    size_t room, got;
    char msg[300];
    if (avail < 0) return want;
    room = (size_t)avail / 2 > hdr ? ((size_t)avail / 2 - hdr) / (size_t)ctx->world : 0;
    room = room / 4096 * 4096;
    if (room >= want) return want;
    got = room < ((size_t)64 << 10) ? ((size_t)64 << 10) : room;
    snprintf(msg, sizeof msg, "shared memory: /dev/shm has %lld bytes free; the staging area for collectives on your own buffers is reduced from %zu to %zu bytes per rank",
             avail, want, got);
    ddp__log(ctx, DDP_LOG_WARN, msg);
    return got;
}

/* The control segment: counters, abort flag and staging. Rank 0 makes it
   and hands it out; everybody maps it; a barrier; then rank 0 removes a
   name if there is one. */
static ddp_result ddp__shm_setup(ddp_context *ctx) {
    size_t hdr = ddp__ctrl_header_bytes(ctx->world), staging = ctx->shm.staging_bytes, bytes = 0;
    void *p = NULL;
    int fd = -1;
    ddp_result r;
    if (ctx->world == 1) {
        bytes = hdr + staging;
        p = ddp__shm_obj_map_private(bytes);
        if (!p) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "cannot map %zu bytes: %s", bytes, strerror(errno));
        ctx->shm.ctrl = (ddp__shm_ctrl *)p;
        ctx->shm.ctrl_bytes = bytes;
        ctx->shm.staging = (unsigned char *)p + hdr;
        ddp__seg_header(&ctx->shm.ctrl->h, ctx, 1, bytes, staging);
        ctx->shm.ctrl->abort_rank = -1;
        ddp__slot(ctx, 0)->pid = (int32_t)ddp__proc_self();
        return DDP_SUCCESS;
    }
    if (ctx->rank == 0) {
#if defined(DDP__SHM_NAMED) || !defined(__linux__)
        ctx->shm.named = 1;
#endif
        ddp__shm_sweep_dead();
        if (ctx->shm.named) staging = ddp__shm_fit_staging(ctx, hdr, staging);
        bytes = hdr + (size_t)ctx->world * staging;
        /* named: all of it now (a full /dev/shm must fail here, not with
           SIGBUS later); anonymous: the header, staging pages come when used */
        DDP__TRY(ddp__seg_create(ctx, "control", bytes, ctx->shm.named ? bytes : hdr, &fd, ctx->shm.ctrl_name, sizeof ctx->shm.ctrl_name, &p));
        ctx->shm.ctrl = (ddp__shm_ctrl *)p;
        ctx->shm.ctrl_bytes = bytes;
        ddp__seg_header(&ctx->shm.ctrl->h, ctx, 1, bytes, staging);
        ctx->shm.ctrl->abort_rank = -1;
        ctx->shm.ctrl->abort_claim = 0;
        r = ddp__seg_share(ctx, "shm/ctrl", "control", fd, ctx->shm.ctrl_name, bytes);
        ddp__fd_close(fd);
        if (r != DDP_SUCCESS) return r;
    } else {
        DDP__TRY(ddp__seg_attach(ctx, "shm/ctrl", 1, &bytes, &p));
        ctx->shm.ctrl = (ddp__shm_ctrl *)p;
        ctx->shm.ctrl_bytes = bytes;
        staging = (size_t)ctx->shm.ctrl->h.staging;
        if (staging < ((size_t)4 << 10) || hdr + (size_t)ctx->world * staging != bytes)
            return ddp__fail(ctx, DDP_ERROR_SECURITY, "rank %d: the control segment's header says %zu bytes of staging per rank, which does not fit its %zu bytes",
                             ctx->rank, staging, bytes);
    }
    ctx->shm.staging_bytes = staging;
    ctx->cfg.staging_bytes = staging;
    ctx->shm.staging = (unsigned char *)p + hdr;
    ddp__slot(ctx, ctx->rank)->pid = (int32_t)ddp__proc_self();
    r = ddp__kv_barrier(ctx, "shm/ctrl-open");
    if (ctx->rank == 0 && ctx->shm.ctrl_name[0]) { ddp__shm_obj_unlink(ctx->shm.ctrl_name); ctx->shm.ctrl_name[0] = 0; }
    if (r != DDP_SUCCESS) return r;
    return ddp__kv_verify_pinned(ctx);
}

static ddp_result ddp__cuda_setup(ddp_context *ctx);
static void ddp__cuda_teardown(ddp_context *ctx);

DDP_API ddp_result ddp_create(const ddp_config *config, ddp_context **out) {
    ddp_config c;
    ddp_context *ctx;
    char addr[256], job[DDP__JOB_ID_MAX + 1], bind[256];
    unsigned char secret[DDP__SECRET_MAX];
    size_t secret_len = 0;
    ddp_result r;
    ddp__create_err[0] = 0;
    if (!out) return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "ddp_create: out is NULL");
    *out = NULL;
    c = ddp_config_defaults(config);
    DDP__TRY(ddp__resolve_identity(&c));
    DDP__TRY(ddp__resolve_address(&c, addr, sizeof addr));
    DDP__TRY(ddp__resolve_backend(&c));
    DDP__TRY(ddp__resolve_trust(&c, secret, &secret_len, job, bind, sizeof bind));
    if (c.world_size > 1024)
        return ddp__fail(NULL, DDP_ERROR_UNSUPPORTED, "a world of %d ranks: this version supports up to 1024", c.world_size);
    if (c.staging_bytes < ((size_t)64 << 10))
        return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.staging_bytes %zu is below the minimum of 65536", c.staging_bytes);
    c.staging_bytes = ddp__align_up(c.staging_bytes, 4096);
    if (c.backend != DDP_BACKEND_NCCL && c.local_world_size != c.world_size)
        return ddp__fail(NULL, DDP_ERROR_UNSUPPORTED,
                         "backend '%s' works on one host, but this job spans several (LOCAL_WORLD_SIZE %d < WORLD_SIZE %d); use the nccl backend",
                         c.backend == DDP_BACKEND_DEFAULT ? "shm" : ddp_backend_name(c.backend), c.local_world_size, c.world_size);

    if (c.allocator.alloc) ctx = (ddp_context *)c.allocator.alloc(sizeof *ctx, c.allocator.user);
    else ctx = (ddp_context *)malloc(sizeof *ctx);
    if (!ctx) return ddp__fail(NULL, DDP_ERROR_OUT_OF_MEMORY, "out of memory for the context");
    memset(ctx, 0, sizeof *ctx);
    ctx->cfg = c;
    ddp__copy_str(ctx->key_prefix, sizeof ctx->key_prefix, "");
    ctx->from_env = !config || config->world_size == 0;
    ctx->rank = c.rank; ctx->world = c.world_size;
    ctx->local_rank = c.local_rank; ctx->local_world = c.local_world_size;
    ctx->shm.staging_bytes = c.staging_bytes;
    ctx->ops = &ddp__shm_ops;
    pthread_mutex_init(&ctx->mu, NULL);
    pthread_mutex_init(&ctx->err_mu, NULL);
    pthread_cond_init(&ctx->cv_work, NULL);
    pthread_cond_init(&ctx->cv_done, NULL);
    /* the copied config must not point into the caller's memory, and
       ddp_query_config never shows the secret */
    ddp__copy_str(ctx->addr, sizeof ctx->addr, addr);
    ctx->cfg.master_addr = ctx->addr;
    memcpy(ctx->secret, secret, secret_len);
    memset(secret, 0, sizeof secret);
    ctx->secret_len = secret_len;
    ctx->cfg.job_secret = NULL;
    ddp__copy_str(ctx->job_id, sizeof ctx->job_id, job);
    ctx->cfg.job_id = ctx->job_id;
    ddp__copy_str(ctx->bind, sizeof ctx->bind, bind);
    ctx->cfg.store_bind = ctx->bind;

    r = DDP_SUCCESS;
    if (ctx->world > 1) r = ddp__rendezvous(ctx);
    if (r == DDP_SUCCESS) r = ddp__cuda_setup(ctx);
    if (r == DDP_SUCCESS && (ctx->cfg.backend == DDP_BACKEND_SHM || ctx->cfg.backend == DDP_BACKEND_STAGED))
        r = ddp__shm_setup(ctx);
    if (r != DDP_SUCCESS) {
        memcpy(ddp__create_err, ctx->err, sizeof ctx->err);
        ddp__kv_abort(ctx, ctx->err);
        ddp_destroy(ctx);
        return r;
    }
    {
        char msg[160];
        snprintf(msg, sizeof msg, "rank %d of %d ready (backend %s, device %s)", ctx->rank, ctx->world,
                 ddp_backend_name(ctx->cfg.backend), ctx->cfg.device == DDP_DEVICE_CUDA ? "cuda" : "cpu");
        ddp__log(ctx, DDP_LOG_INFO, msg);
    }
    *out = ctx;
    return DDP_SUCCESS;
}

static void ddp__comm_stop(ddp_context *ctx) {
    if (!ctx->comm_started) return;
    pthread_mutex_lock(&ctx->mu);
    ctx->q_stop = 1;
    pthread_cond_broadcast(&ctx->cv_work);
    pthread_mutex_unlock(&ctx->mu);
    pthread_join(ctx->comm_thread, NULL);
    ctx->comm_started = 0;
}

static void ddp__free_flat_grads(ddp_context *ctx);
static void ddp__free_device(ddp_context *ctx, void *p);

DDP_API void ddp_destroy(ddp_context *ctx) {
    if (!ctx) return;
    ddp__comm_stop(ctx);
    ddp__free_flat_grads(ctx);
    ddp__shm_obj_unmap(ctx->shm.grads_base, ctx->shm.grads_bytes);
    ddp__shm_obj_unmap(ctx->shm.ctrl, ctx->shm.ctrl_bytes);
    if (ctx->rank == 0 && ctx->shm.ctrl_name[0]) ddp__shm_obj_unlink(ctx->shm.ctrl_name);
    if (ctx->rank == 0 && ctx->shm.grads_name[0]) ddp__shm_obj_unlink(ctx->shm.grads_name);
    if (ctx->cfg.device == DDP_DEVICE_CUDA) {
        ddp__free_device(ctx, ctx->flat_params);
        ddp__free_device(ctx, ctx->opt_m);
        ddp__free_device(ctx, ctx->opt_v);
        ddp__free_device(ctx, ctx->opt_master);
    } else {
        ddp__free(ctx, ctx->flat_params);
        ddp__free(ctx, ctx->opt_m);
        ddp__free(ctx, ctx->opt_v);
        ddp__free(ctx, ctx->opt_master);
    }
    ddp__cuda_teardown(ctx);
    if (ctx->store) { ddp__store_close((ddp__store *)ctx->store); ddp__free(ctx, ctx->store); ctx->store = NULL; }
    if (ctx->server) {
        /* a rank may still be reading its last answer: let the ranks hang
           up first, for at most DDP__STORE_DRAIN_S; other clients (strangers)
           are not waited for */
        double deadline = ddp__now() + (ctx->cfg.timeout_s < DDP__STORE_DRAIN_S ? ctx->cfg.timeout_s : DDP__STORE_DRAIN_S);
        while (ddp__store_server_rank_clients(ctx->server) > 0 && ddp__now() < deadline) ddp__sleep_us(1000);
        ddp__store_server_stop(ctx->server);
    }
    memset(ctx->secret, 0, sizeof ctx->secret);
    ddp__free(ctx, ctx->rank_pid);
    ddp__free(ctx, ctx->params);
    ddp__free(ctx, ctx->buckets);
    ddp__free(ctx, ctx->queue);
    ddp__free(ctx, ctx->opt_state_off);
    pthread_mutex_destroy(&ctx->mu);
    pthread_mutex_destroy(&ctx->err_mu);
    pthread_cond_destroy(&ctx->cv_work);
    pthread_cond_destroy(&ctx->cv_done);
    ddp__free(ctx, ctx);
}

DDP_API int ddp_rank(const ddp_context *ctx) { return ctx ? ctx->rank : -1; }
DDP_API int ddp_world_size(const ddp_context *ctx) { return ctx ? ctx->world : 0; }
DDP_API int ddp_local_rank(const ddp_context *ctx) { return ctx ? ctx->local_rank : -1; }
DDP_API int ddp_local_world_size(const ddp_context *ctx) { return ctx ? ctx->local_world : 0; }
DDP_API ddp_backend ddp_query_backend(const ddp_context *ctx) { return ctx ? ctx->cfg.backend : DDP_BACKEND_DEFAULT; }
DDP_API ddp_device ddp_query_device(const ddp_context *ctx) { return ctx ? ctx->cfg.device : DDP_DEVICE_DEFAULT; }

/* ---- collectives on user buffers --------------------------------------------------- */

static ddp_result ddp__coll_check(ddp_context *ctx, const char *fn, const void *a, const void *b,
                                  ddp_dtype t, ddp_op op) {
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    DDP__TRY(ddp__check_usable(ctx, fn));
    if (ctx->in_step)
        return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "%s: not allowed between ddp_step_begin() and ddp_step_end()", fn);
    if (!a || !b) return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "%s: buffer is NULL", fn);
    if ((int)t < 0 || t >= DDP_DTYPE_COUNT_) return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "%s: dtype %d is not a ddp_dtype", fn, (int)t);
    if ((int)op < 0 || op > DDP_OP_MIN) return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "%s: op %d is not a ddp_op", fn, (int)op);
    return DDP_SUCCESS;
}

static ddp_result ddp__coll_done(ddp_context *ctx, ddp_result r) {
    if (r != DDP_SUCCESS && r != DDP_ERROR_INVALID_ARGUMENT) return ddp__break(ctx, r);
    return r;
}

DDP_API ddp_result ddp_barrier(ddp_context *ctx) {
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    DDP__TRY(ddp__coll_check(ctx, "ddp_barrier", ctx, ctx, DDP_F32, DDP_OP_SUM));
    return ddp__coll_done(ctx, ctx->ops->barrier(ctx, "a barrier"));
}

DDP_API ddp_result ddp_allreduce(ddp_context *ctx, void *buf, size_t count, ddp_dtype dtype, ddp_op op) {
    DDP__TRY(ddp__coll_check(ctx, "ddp_allreduce", buf, buf, dtype, op));
    if (count == 0) return DDP_SUCCESS;
    if (dtype == DDP_DTYPE_DEFAULT) dtype = DDP_F32;
    if (op == DDP_OP_DEFAULT) op = DDP_OP_SUM;
    return ddp__coll_done(ctx, ctx->ops->allreduce(ctx, buf, count, dtype, op));
}

DDP_API ddp_result ddp_broadcast(ddp_context *ctx, void *buf, size_t count, ddp_dtype dtype, int root) {
    DDP__TRY(ddp__coll_check(ctx, "ddp_broadcast", buf, buf, dtype, DDP_OP_SUM));
    if (root < 0 || root >= ctx->world)
        return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_broadcast: root %d is not a rank of a world of %d", root, ctx->world);
    if (count == 0) return DDP_SUCCESS;
    return ddp__coll_done(ctx, ctx->ops->broadcast(ctx, buf, count * ddp_dtype_size(dtype), root));
}

DDP_API ddp_result ddp_allgather(ddp_context *ctx, const void *send, void *recv, size_t count, ddp_dtype dtype) {
    DDP__TRY(ddp__coll_check(ctx, "ddp_allgather", send, recv, dtype, DDP_OP_SUM));
    if (count == 0) return DDP_SUCCESS;
    return ddp__coll_done(ctx, ctx->ops->allgather(ctx, send, recv, count * ddp_dtype_size(dtype)));
}

DDP_API ddp_result ddp_reduce_scatter(ddp_context *ctx, const void *send, void *recv, size_t count,
                                      ddp_dtype dtype, ddp_op op) {
    DDP__TRY(ddp__coll_check(ctx, "ddp_reduce_scatter", send, recv, dtype, op));
    if (count == 0) return DDP_SUCCESS;
    if (dtype == DDP_DTYPE_DEFAULT) dtype = DDP_F32;
    if (op == DDP_OP_DEFAULT) op = DDP_OP_SUM;
    return ddp__coll_done(ctx, ctx->ops->reduce_scatter(ctx, send, recv, count, dtype, op));
}

/* ---- parameters ------------------------------------------------------------------ */

#if defined(DDP_CUDA)
static int ddp__cuda_comm_thread(ddp_context *ctx);
static ddp_result ddp__cuda_bucket_events(ddp_context *ctx, int b, int wait_now);
static int ddp__cuda_solo(const ddp_context *ctx);
static int ddp__solo(const ddp_context *ctx) { return ddp__cuda_solo(ctx); }
#else
static int ddp__solo(const ddp_context *ctx) { (void)ctx; return 0; }
#endif

static int ddp__on_gpu(const ddp_context *ctx) { return ctx->cfg.device == DDP_DEVICE_CUDA; }

DDP_API ddp_result ddp_register_param_shape(ddp_context *ctx, const char *name, int ndim,
                                            const int64_t *shape, ddp_dtype dtype,
                                            const void *init, int *out_id) {
    ddp__param *p;
    size_t numel = 1;
    int i;
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    if (out_id) *out_id = -1;
    if (ctx->finalized)
        return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_register_param: parameter '%.64s' registered after ddp_finalize()", name ? name : "(null)");
    if (!name || !*name) return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_register_param: name is NULL or empty");
    if (strlen(name) >= DDP__MAX_NAME)
        return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_register_param: name '%.40s...' is longer than %d characters", name, DDP__MAX_NAME - 1);
    if (!out_id) return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_register_param: out_id is NULL for parameter '%s'", name);
    if (ndim < 1 || ndim > DDP__MAX_NDIM || !shape)
        return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_register_param: parameter '%s' has %d dimensions (1..%d, shape not NULL)", name, ndim, DDP__MAX_NDIM);
    for (i = 0; i < ndim; i++) {
        if (shape[i] <= 0)
            return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_register_param: parameter '%s' has size %lld in dimension %d (must be > 0)",
                             name, (long long)shape[i], i);
        if ((uint64_t)shape[i] > ((uint64_t)1 << 40) / numel)
            return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_register_param: parameter '%s' is too large", name);
        numel *= (size_t)shape[i];
    }
    if (dtype == DDP_DTYPE_DEFAULT) dtype = DDP_F32;
    if (dtype != DDP_F32 && dtype != DDP_F64 && dtype != DDP_F16 && dtype != DDP_BF16)
        return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_register_param: parameter '%s' has dtype %d; parameters are DDP_F32, DDP_F64, DDP_F16 or DDP_BF16",
                         name, (int)dtype);
    if (dtype == DDP_F64 && ddp__on_gpu(ctx))
        return ddp__fail(ctx, DDP_ERROR_UNSUPPORTED, "ddp_register_param: parameter '%s' is f64; f64 parameters are CPU-only", name);
    for (i = 0; i < ctx->num_params; i++)
        if (!strcmp(ctx->params[i].name, name))
            return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_register_param: a parameter named '%s' is already registered (id %d)", name, i);
    if (ctx->num_params == ctx->cap_params) {
        int cap = ctx->cap_params ? ctx->cap_params * 2 : 16;
        ddp__param *np = (ddp__param *)ddp__calloc(ctx, (size_t)cap * sizeof *np);
        if (!np) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory registering '%s'", name);
        if (ctx->params) memcpy(np, ctx->params, (size_t)ctx->num_params * sizeof *np);
        ddp__free(ctx, ctx->params);
        ctx->params = np;
        ctx->cap_params = cap;
    }
    p = &ctx->params[ctx->num_params];
    memset(p, 0, sizeof *p);
    ddp__copy_str(p->name, sizeof p->name, name);
    p->numel = numel;
    p->dtype = dtype;
    p->ndim = ndim;
    for (i = 0; i < ndim; i++) p->shape[i] = shape[i];
    p->init = init;
    *out_id = ctx->num_params++;
    return DDP_SUCCESS;
}

DDP_API ddp_result ddp_register_param(ddp_context *ctx, const char *name, size_t count,
                                      ddp_dtype dtype, const void *init, int *out_id) {
    int64_t shape[1];
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    if (count == 0 || count > ((size_t)1 << 40)) {
        if (out_id) *out_id = -1;
        return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_register_param: parameter '%.64s' has %zu elements (must be 1..2^40)",
                         name ? name : "(null)", count);
    }
    shape[0] = (int64_t)count;
    return ddp_register_param_shape(ctx, name, 1, shape, dtype, init, out_id);
}

/* Reverse registration order, 256-byte aligned offsets; a bucket closes when
   it reaches its cap or the element type changes. */
static ddp_result ddp__assign_buckets(ddp_context *ctx) {
    size_t off = 0;
    int i, nb = 0;
    ddp__bucket *bk = (ddp__bucket *)ddp__calloc(ctx, (size_t)ctx->num_params * sizeof *bk);
    if (!bk) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory for %d buckets", ctx->num_params);
    for (i = ctx->num_params - 1; i >= 0; i--) {
        ddp__param *p = &ctx->params[i];
        size_t es = ddp_dtype_size(p->dtype);
        off = ddp__align_up(off, DDP__ALIGN);
        if (nb == 0 || bk[nb - 1].dtype != p->dtype ||
            bk[nb - 1].bytes >= (nb == 1 ? ctx->cfg.first_bucket_bytes : ctx->cfg.bucket_bytes)) {
            bk[nb].offset = off;
            bk[nb].dtype = p->dtype;
            nb++;
        }
        p->offset = off;
        p->bucket = nb - 1;
        bk[nb - 1].num_params++;
        off += p->numel * es;
        bk[nb - 1].bytes = off - bk[nb - 1].offset;
    }
    /* spans cover the alignment padding up to the next bucket (zeros) */
    for (i = 0; i < nb; i++) {
        size_t end = i + 1 < nb ? bk[i + 1].offset : ddp__align_up(off, DDP__ALIGN);
        bk[i].bytes = end - bk[i].offset;
        bk[i].numel = bk[i].bytes / ddp_dtype_size(bk[i].dtype);
    }
    ctx->buckets = bk;
    ctx->num_buckets = nb;
    ctx->flat_bytes = ddp__align_up(off, 4096);
    return DDP_SUCCESS;
}

static void ddp__describe_param(const ddp__param *p, char *out, size_t cap) {
    int n = snprintf(out, cap, "'%s' %s [", p->name, ddp_dtype_name(p->dtype)), i;
    for (i = 0; i < p->ndim && n > 0 && (size_t)n < cap; i++)
        n += snprintf(out + n, cap - (size_t)n, i ? ",%lld" : "%lld", (long long)p->shape[i]);
    if (n > 0 && (size_t)n < cap) snprintf(out + n, cap - (size_t)n, "]");
}

/* One line per parameter: what must agree across ranks. */
static char *ddp__param_table(ddp_context *ctx, size_t *len) {
    size_t cap = 64 + (size_t)ctx->num_params * (DDP__MAX_NAME + 256), n;
    char *s = (char *)ddp__alloc(ctx, cap);
    int i;
    if (!s) return NULL;
    n = (size_t)snprintf(s, cap, "%d\n", ctx->num_params);
    for (i = 0; i < ctx->num_params; i++) {
        ddp__describe_param(&ctx->params[i], s + n, cap - n);
        n += strlen(s + n);
        s[n++] = '\n';
    }
    s[n] = 0;
    *len = n + 1;
    return s;
}

/* The i-th line of a table (after the count line), copied into out. */
static int ddp__table_line(const char *t, int i, char *out, size_t cap) {
    const char *e;
    int k;
    t = strchr(t, '\n');
    for (k = 0; t && k < i; k++) t = strchr(t + 1, '\n');
    if (!t || !t[1]) { out[0] = 0; return 0; }
    t++;
    e = strchr(t, '\n');
    if (!e) e = t + strlen(t);
    if ((size_t)(e - t) >= cap) e = t + cap - 1;
    memcpy(out, t, (size_t)(e - t));
    out[e - t] = 0;
    return 1;
}

static ddp_result ddp__verify_params(ddp_context *ctx) {
    size_t len = 0, l0 = 0;
    char *mine = ddp__param_table(ctx, &len), key[32];
    void *t0 = NULL;
    ddp_result r;
    int q;
    if (!mine) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory for the parameter table");
    snprintf(key, sizeof key, "params/%d", ctx->rank);
    r = ddp__kv_set_once(ctx, key, mine, len);
    ddp__free(ctx, mine);
    if (r != DDP_SUCCESS) return r;
    r = ddp__kv_get(ctx, "params/0", &t0, &l0);
    if (r == DDP_ERROR_TIMEOUT)
        return ddp__fail(ctx, r, "rank 0 did not publish its parameters within %.1f s (dead, stuck, or failed before ddp_finalize: see rank 0's error)",
                         ctx->cfg.connect_timeout_s);
    if (r != DDP_SUCCESS) return r;
    /* every rank compares every rank with rank 0, so all report the same error */
    for (q = 1; q < ctx->world && r == DDP_SUCCESS; q++) {
        void *tq = NULL;
        size_t lq = 0;
        snprintf(key, sizeof key, "params/%d", q);
        r = ddp__kv_get(ctx, key, &tq, &lq);
        if (r != DDP_SUCCESS) {
            if (r == DDP_ERROR_TIMEOUT)
                r = ddp__fail(ctx, DDP_ERROR_TIMEOUT, "rank %d did not publish its parameters within %.1f s (stuck or dead before ddp_finalize?)",
                              q, ctx->cfg.connect_timeout_s);
            break;
        }
        if (lq != l0 || memcmp(tq, t0, l0) != 0) {
            int n0 = atoi((const char *)t0), nq = atoi((const char *)tq), i;
            char a[512], b[512];
            for (i = 0; ; i++) {
                int h0 = ddp__table_line((const char *)t0, i, a, sizeof a);
                int hq = ddp__table_line((const char *)tq, i, b, sizeof b);
                if (!h0 && !hq) break;
                if (!h0 || !hq || strcmp(a, b) != 0) {
                    if (!h0 || !hq)
                        r = ddp__fail(ctx, DDP_ERROR_MISMATCH, "models differ: rank 0 registered %d parameters, rank %d registered %d (first extra: parameter %d %s)",
                                      n0, q, nq, i, h0 ? a : b);
                    else
                        r = ddp__fail(ctx, DDP_ERROR_MISMATCH, "models differ at parameter %d: rank 0 has %s, rank %d has %s", i, a, q, b);
                    break;
                }
            }
            if (r == DDP_SUCCESS)
                r = ddp__fail(ctx, DDP_ERROR_MISMATCH, "models differ between rank 0 and rank %d", q);
        }
        free(tq);
    }
    free(t0);
    /* rank 0 serves the store: keep it until every rank has read the tables
       (after a mismatch too: every rank found the same one); a failed store
       call is reported as it is */
    if (r == DDP_SUCCESS || r == DDP_ERROR_MISMATCH) {
        char keep[DDP__ERRLEN];
        ddp_result b;
        memcpy(keep, ctx->err, sizeof keep);
        b = ddp__kv_barrier(ctx, "params/read");
        if (r == DDP_SUCCESS) r = b;
        else memcpy(ctx->err, keep, sizeof keep);
    }
    return r;
}

static ddp_result ddp__cuda_finalize(ddp_context *ctx);

/* Every rank's flat gradients in one shared segment (shm and staged), so
   reductions read and write peers' buffers directly. The segment starts
   with a header page (whose it is); the buffers follow. All of it is
   backed by memory at once: when it does not fit, the error says how many
   bytes are needed and what to do. */
static ddp_result ddp__alloc_grad_segment(ddp_context *ctx) {
    void *p = NULL;
    size_t hdr = DDP__SEG_HDR_BYTES, bytes;
    int fd = -1;
    ddp_result r;
    ctx->shm.grad_stride = ctx->flat_bytes;
    bytes = hdr + ctx->flat_bytes * (size_t)ctx->world;
    if (ctx->world == 1) {
        p = ddp__shm_obj_map_private(bytes);
        if (!p) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "cannot map %zu bytes for the gradients: %s", bytes, strerror(errno));
    } else if (ctx->rank == 0) {
        long long avail = ctx->shm.named ? ddp__shm_named_free() : -1;
        if (avail >= 0 && (unsigned long long)bytes > (unsigned long long)avail)
            return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY,
                             "the gradients need %zu bytes of shared memory (%d ranks x %zu bytes) but /dev/shm has %lld bytes free: "
                             "give it more (docker run --shm-size=%zum, or a bigger tmpfs on /dev/shm)",
                             bytes, ctx->world, ctx->flat_bytes, avail, (bytes + ctx->shm.ctrl_bytes) / ((size_t)1 << 20) + 64);
        DDP__TRY(ddp__seg_create(ctx, "gradients", bytes, bytes, &fd, ctx->shm.grads_name, sizeof ctx->shm.grads_name, &p));
        ddp__seg_header((ddp__seg_hdr *)p, ctx, 2, bytes, 0);
        ctx->shm.grads_base = (unsigned char *)p;
        ctx->shm.grads_bytes = bytes;
        ctx->shm.grads = (unsigned char *)p + hdr;
        r = ddp__seg_share(ctx, "shm/grads", "gradients", fd, ctx->shm.grads_name, bytes);
        ddp__fd_close(fd);
        if (r != DDP_SUCCESS) return r;
    } else {
        size_t got = bytes;
        DDP__TRY(ddp__seg_attach(ctx, "shm/grads", 2, &got, &p));
    }
    ctx->shm.grads_base = (unsigned char *)p;
    ctx->shm.grads_bytes = bytes;
    ctx->shm.grads = (unsigned char *)p + hdr;
    r = ddp__shm_barrier(ctx, "every rank to map the gradient segment");
    if (ctx->rank == 0 && ctx->shm.grads_name[0]) { ddp__shm_obj_unlink(ctx->shm.grads_name); ctx->shm.grads_name[0] = 0; }
    return r;
}

static void *ddp__comm_main(void *arg);

static size_t ddp__state_elem(ddp_dtype t) { return t == DDP_F64 ? 8 : 4; }

static ddp_result ddp__alloc_host_state(ddp_context *ctx) {
    size_t off = 0;
    int b;
    ctx->opt_state_off = (size_t *)ddp__calloc(ctx, (size_t)ctx->num_buckets * sizeof(size_t));
    if (!ctx->opt_state_off) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory for optimizer state offsets");
    for (b = 0; b < ctx->num_buckets; b++) {
        ctx->opt_state_off[b] = off;
        off += ddp__align_up(ctx->buckets[b].numel * ddp__state_elem(ctx->buckets[b].dtype), DDP__ALIGN);
    }
    ctx->opt_state_bytes = off;
    return DDP_SUCCESS;
}

static ddp_result ddp__finalize(ddp_context *ctx) {
    ddp_result r;
    int i;
    DDP__TRY(ddp__assign_buckets(ctx));
    ctx->queue = (int *)ddp__calloc(ctx, (size_t)ctx->num_buckets * sizeof(int));
    if (!ctx->queue) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory for the bucket queue");
    if (ctx->world > 1) DDP__TRY(ddp__verify_params(ctx));
    DDP__TRY(ddp__alloc_host_state(ctx));
    if (ddp__on_gpu(ctx)) {
        DDP__TRY(ddp__cuda_finalize(ctx));
    } else {
        DDP__TRY(ddp__alloc_grad_segment(ctx));
        ctx->flat_grads = ctx->shm.grads + (size_t)ctx->rank * ctx->shm.grad_stride;
        ctx->flat_params = (unsigned char *)ddp__calloc(ctx, ctx->flat_bytes);
        if (!ctx->flat_params) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory for %zu bytes of parameters", ctx->flat_bytes);
        for (i = 0; i < ctx->num_params; i++)
            if (ctx->params[i].init)
                memcpy(ctx->flat_params + ctx->params[i].offset, ctx->params[i].init,
                       ctx->params[i].numel * ddp_dtype_size(ctx->params[i].dtype));
    }
    ctx->finalized = 1;
    r = ddp_sync_params(ctx);
    if (r != DDP_SUCCESS) return r;
    /* what this rank wrote once is still what it wrote (and rank 0's store
       saw no tampering) */
    if (ctx->store) DDP__TRY(ddp__kv_verify_pinned(ctx));
    /* the store has served its purpose; rank 0 keeps serving until the others hung up */
    if (ctx->store && ctx->rank != 0) {
        ddp__store_close((ddp__store *)ctx->store);
        ddp__free(ctx, ctx->store);
        ctx->store = NULL;
    }
    /* and takes no new clients: the port is free for the next context's store */
    if (ctx->server) ddp__store_server_close_listener(ctx->server);
    /* the communication thread: reduces buckets (shm, staged), or watches
       NCCL's collectives in flight (nccl) */
    if ((ctx->cfg.backend == DDP_BACKEND_NCCL && !ddp__solo(ctx)) ||
        (ctx->world > 1 && !ctx->cfg.no_comm_thread && ctx->ops->bucket_reduce)) {
        if (pthread_create(&ctx->comm_thread, NULL, ddp__comm_main, ctx) != 0)
            return ddp__fail(ctx, DDP_ERROR_SYSTEM, "cannot start the communication thread: %s", strerror(errno));
        ctx->comm_started = 1;
    }
    {
        char msg[160];
        snprintf(msg, sizeof msg, "%d parameters, %zu bytes, %d buckets", ctx->num_params, ctx->flat_bytes, ctx->num_buckets);
        ddp__log(ctx, DDP_LOG_INFO, msg);
    }
    return DDP_SUCCESS;
}

DDP_API ddp_result ddp_finalize(ddp_context *ctx) {
    ddp_result r;
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    DDP__TRY(ddp__check_usable(ctx, "ddp_finalize"));
    if (ctx->finalized) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_finalize: called twice");
    if (ctx->num_params == 0) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_finalize: no parameters registered");
    /* a failure half-way leaves peers waiting in collectives: break and tell them */
    r = ddp__finalize(ctx);
    if (r != DDP_SUCCESS) {
        ctx->finalized = 0;
        if (ctx->store || ctx->server) ddp__kv_abort(ctx, ctx->err);
        return ddp__break(ctx, r);
    }
    return DDP_SUCCESS;
}

DDP_API ddp_result ddp_sync_params(ddp_context *ctx) {
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    DDP__TRY(ddp__check_usable(ctx, "ddp_sync_params"));
    if (!ctx->finalized) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_sync_params: call ddp_finalize() first");
    if (ctx->in_step) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_sync_params: not allowed inside a step");
    if (ctx->world == 1) return DDP_SUCCESS;
    return ddp__coll_done(ctx, ctx->ops->broadcast(ctx, ctx->flat_params, ctx->flat_bytes, 0));
}

static ddp_result ddp__param_check(const ddp_context *ctx, int id) {
    return ctx && ctx->finalized && id >= 0 && id < ctx->num_params ? DDP_SUCCESS : DDP_ERROR_INVALID_ARGUMENT;
}

DDP_API int ddp_param_count(const ddp_context *ctx) { return ctx ? ctx->num_params : 0; }
DDP_API void *ddp_param_data(ddp_context *ctx, int id) {
    return ddp__param_check(ctx, id) ? NULL : ctx->flat_params + ctx->params[id].offset;
}
DDP_API void *ddp_param_grad(ddp_context *ctx, int id) {
    return ddp__param_check(ctx, id) ? NULL : ctx->flat_grads + ctx->params[id].offset;
}
DDP_API size_t ddp_param_numel(const ddp_context *ctx, int id) {
    return ctx && id >= 0 && id < ctx->num_params ? ctx->params[id].numel : 0;
}
DDP_API const char *ddp_param_name(const ddp_context *ctx, int id) {
    return ctx && id >= 0 && id < ctx->num_params ? ctx->params[id].name : NULL;
}
DDP_API int ddp_param_bucket(const ddp_context *ctx, int id) {
    return ddp__param_check(ctx, id) ? -1 : ctx->params[id].bucket;
}
DDP_API size_t ddp_param_offset(const ddp_context *ctx, int id) {
    return ddp__param_check(ctx, id) ? 0 : ctx->params[id].offset;
}
DDP_API int ddp_bucket_count(const ddp_context *ctx) { return ctx && ctx->finalized ? ctx->num_buckets : 0; }
DDP_API ddp_result ddp_bucket_info(const ddp_context *ctx, int b, size_t *offset_bytes, size_t *size_bytes,
                                   ddp_dtype *dtype, int *num_params) {
    if (!ctx || !ctx->finalized || b < 0 || b >= ctx->num_buckets) return DDP_ERROR_INVALID_ARGUMENT;
    if (offset_bytes) *offset_bytes = ctx->buckets[b].offset;
    if (size_bytes) *size_bytes = ctx->buckets[b].bytes;
    if (dtype) *dtype = ctx->buckets[b].dtype;
    if (num_params) *num_params = ctx->buckets[b].num_params;
    return DDP_SUCCESS;
}
DDP_API void *ddp_flat_params(ddp_context *ctx) { return ctx && ctx->finalized ? ctx->flat_params : NULL; }
DDP_API void *ddp_flat_grads(ddp_context *ctx) { return ctx && ctx->finalized ? ctx->flat_grads : NULL; }
DDP_API size_t ddp_flat_bytes(const ddp_context *ctx) { return ctx && ctx->finalized ? ctx->flat_bytes : 0; }

/* ---- communication thread ---------------------------------------------------------- */


static void *ddp__comm_main(void *arg) {
    ddp_context *ctx = (ddp_context *)arg;
#if defined(DDP_CUDA)
    if (ddp__cuda_comm_thread(ctx)) return NULL; /* it was the NCCL watchdog */
#endif
    pthread_mutex_lock(&ctx->mu);
    for (;;) {
        int b;
        ddp_result r;
        double scale;
        while (ctx->q_head == ctx->q_tail && !ctx->q_stop) pthread_cond_wait(&ctx->cv_work, &ctx->mu);
        if (ctx->q_stop) break;
        b = ctx->queue[ctx->q_head];
        scale = ctx->q_scale;
        r = ctx->q_err;
        ctx->q_busy = 1;
        pthread_mutex_unlock(&ctx->mu);
        if (r == DDP_SUCCESS) r = ctx->ops->bucket_reduce(ctx, b, scale);
        pthread_mutex_lock(&ctx->mu);
        if (r != DDP_SUCCESS && ctx->q_err == DDP_SUCCESS) ctx->q_err = r;
        ctx->q_head++;
        ctx->q_busy = 0;
        pthread_cond_broadcast(&ctx->cv_done);
    }
    pthread_mutex_unlock(&ctx->mu);
    return NULL;
}

static ddp_result ddp__cuda_launch_bucket(ddp_context *ctx, int b);
static ddp_result ddp__drain(ddp_context *ctx);

static ddp_result ddp__launch_bucket(ddp_context *ctx, int b) {
    ddp_result r;
    ctx->buckets[b].launched = 1;
    if (ddp__solo(ctx)) return DDP_SUCCESS; /* see ddp__cuda_solo_end */
    if (ctx->cfg.logger.func && ctx->cfg.logger.level >= DDP_LOG_DEBUG) {
        char msg[64];
        snprintf(msg, sizeof msg, "launch bucket %d", b);
        ddp__log(ctx, DDP_LOG_DEBUG, msg);
    }
    if (ctx->cfg.backend == DDP_BACKEND_NCCL) return ddp__cuda_launch_bucket(ctx, b);
#if defined(DDP_CUDA)
    /* staged: the events are recorded here, on the thread that marked */
    if (ddp__on_gpu(ctx)) DDP__TRY(ddp__cuda_bucket_events(ctx, b, 0));
#endif
    /* the last bucket: nothing of backward is left to overlap with, so the
       calling thread reduces it itself (after the queue), saving the hand-off */
    if (ctx->comm_started && b == ctx->num_buckets - 1) {
        r = ddp__drain(ctx);
        if (r != DDP_SUCCESS) return r;
        r = ctx->ops->bucket_reduce(ctx, b, ctx->q_scale);
        if (r != DDP_SUCCESS) ddp__break(ctx, r);
        return r;
    }
    if (ctx->comm_started) {
        pthread_mutex_lock(&ctx->mu);
        ctx->queue[ctx->q_tail++] = b;
        pthread_cond_signal(&ctx->cv_work);
        pthread_mutex_unlock(&ctx->mu);
        return DDP_SUCCESS;
    }
    r = ctx->ops->bucket_reduce(ctx, b, ctx->q_scale);
    if (r != DDP_SUCCESS) ddp__break(ctx, r);
    return r;
}

/* Wait for the communication thread to drain the queue. The thread's own
   waits have the timeout; this one only guards against the thread itself
   getting stuck, so its deadline restarts whenever a bucket completes. */
static ddp_result ddp__drain(ddp_context *ctx) {
    ddp_result r;
    struct timespec ts;
    int timed_out = 0, seen;
    if (!ctx->comm_started) return DDP_SUCCESS;
    pthread_mutex_lock(&ctx->mu);
    seen = -1;
    while (ctx->q_head < ctx->q_tail && !timed_out) {
        if (ctx->q_head != seen) {
            seen = ctx->q_head;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_sec += (time_t)(ctx->cfg.timeout_s + 10.0);
        }
        if (pthread_cond_timedwait(&ctx->cv_done, &ctx->mu, &ts) == ETIMEDOUT && ctx->q_head == seen) timed_out = 1;
    }
    r = ctx->q_err;
    if (!timed_out) { ctx->q_head = ctx->q_tail = 0; ctx->q_err = DDP_SUCCESS; }
    pthread_mutex_unlock(&ctx->mu);
    if (timed_out) {
        ddp__fail(ctx, DDP_ERROR_TIMEOUT, "the communication thread made no progress for %.1f s", ctx->cfg.timeout_s + 10.0);
        ddp__set_broken(ctx, DDP_ERROR_TIMEOUT);
        return DDP_ERROR_TIMEOUT;
    }
    if (r != DDP_SUCCESS) {
        ddp__comm_error(ctx, ctx->err, sizeof ctx->err);
        ddp__set_broken(ctx, r);
    }
    return r;
}

/* ---- the step ------------------------------------------------------------------------ */

static ddp_result ddp__zero_grads(ddp_context *ctx);

DDP_API ddp_result ddp_step_begin(ddp_context *ctx) {
    int i;
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    DDP__TRY(ddp__check_usable(ctx, "ddp_step_begin"));
    if (!ctx->finalized) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_step_begin: call ddp_finalize() first");
    if (ctx->in_step) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_step_begin: the previous step was not ended (call ddp_step_end())");
    if (!ctx->grads_dirty) {
        DDP__TRY(ddp__zero_grads(ctx));
        ctx->grads_dirty = 1;
    }
    for (i = 0; i < ctx->num_params; i++) ctx->params[i].marked = 0;
    for (i = 0; i < ctx->num_buckets; i++) {
        ctx->buckets[i].pending = ctx->buckets[i].num_params;
        ctx->buckets[i].launched = 0;
    }
    ctx->next_bucket = 0;
    ctx->q_micro = ctx->accum_steps + 1;
    ctx->q_scale = ctx->cfg.gradient_sum ? 1.0 : 1.0 / ((double)ctx->world * ctx->q_micro);
    ctx->in_step = 1;
    return DDP_SUCCESS;
}

static ddp_result ddp__cuda_record_ready(ddp_context *ctx, int id, void *stream);

static ddp_result ddp__mark(ddp_context *ctx, int id, void *stream, int has_stream) {
    ddp__param *p;
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    DDP__TRY(ddp__check_usable(ctx, "ddp_mark_ready"));
    if (!ctx->in_step) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_mark_ready: no step in progress (call ddp_step_begin() first)");
    if (id < 0 || id >= ctx->num_params)
        return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_mark_ready: %d is not a parameter id (0..%d)", id, ctx->num_params - 1);
    p = &ctx->params[id];
    if (p->marked) {
        ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_mark_ready: parameter %d '%s' was marked ready twice in this step", id, p->name);
        return ddp__break(ctx, DDP_ERROR_INVALID_STATE);
    }
    if (has_stream && !ddp__on_gpu(ctx))
        return ddp__fail(ctx, DDP_ERROR_UNSUPPORTED, "ddp_mark_ready_stream: the context keeps parameters on the CPU; use ddp_mark_ready()");
    p->marked = 1;
    if (ddp__on_gpu(ctx)) DDP__TRY(ddp__cuda_record_ready(ctx, id, stream));
    if (ctx->no_sync) return DDP_SUCCESS;
    ctx->buckets[p->bucket].pending--;
    while (ctx->next_bucket < ctx->num_buckets && ctx->buckets[ctx->next_bucket].pending == 0) {
        ddp_result r = ddp__launch_bucket(ctx, ctx->next_bucket++);
        if (r != DDP_SUCCESS) return r;
    }
    return DDP_SUCCESS;
}

DDP_API ddp_result ddp_mark_ready(ddp_context *ctx, int id) { return ddp__mark(ctx, id, NULL, 0); }
DDP_API ddp_result ddp_mark_ready_stream(ddp_context *ctx, int id, void *stream) { return ddp__mark(ctx, id, stream, 1); }

static ddp_result ddp__cuda_step_end(ddp_context *ctx, void *stream);

static ddp_result ddp__step_end(ddp_context *ctx, void *stream) {
    int i, missing = 0;
    ddp_result r;
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    DDP__TRY(ddp__check_usable(ctx, "ddp_step_end"));
    if (!ctx->in_step) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_step_end: no step in progress");
    for (i = 0; i < ctx->num_params; i++) missing += !ctx->params[i].marked;
    if (missing && !ctx->cfg.allow_unused_parameters) {
        char names[600];
        size_t n = 0;
        names[0] = 0;
        for (i = 0; i < ctx->num_params && n < sizeof names - 8; i++)
            if (!ctx->params[i].marked) {
                n += (size_t)snprintf(names + n, sizeof names - n, "%s'%s'", n ? ", " : "", ctx->params[i].name);
                if (n >= sizeof names - 8) n = sizeof names - 8; /* truncated */
            }
        if (i < ctx->num_params) snprintf(names + n, sizeof names - n, ", ...");
        char keep[DDP__ERRLEN];
        ctx->in_step = 0;
        ddp__fail(ctx, DDP_ERROR_INVALID_STATE,
                  "ddp_step_end: %d parameter(s) never marked ready in this step: %s (mark them, or set config.allow_unused_parameters)",
                  missing, names);
        ddp__break(ctx, DDP_ERROR_INVALID_STATE); /* tell the peers first: they may be waiting on our buckets */
        memcpy(keep, ctx->err, sizeof keep);
        ddp__drain(ctx);
        memcpy(ctx->err, keep, sizeof keep);
        return DDP_ERROR_INVALID_STATE;
    }
    ctx->accum_steps++;
    if (ctx->no_sync) { ctx->in_step = 0; return DDP_SUCCESS; }
    /* unused parameters keep their (zero or accumulated) gradient and are reduced like the rest */
    r = DDP_SUCCESS;
    while (r == DDP_SUCCESS && ctx->next_bucket < ctx->num_buckets) r = ddp__launch_bucket(ctx, ctx->next_bucket++);
    if (ctx->cfg.backend == DDP_BACKEND_NCCL) {
        if (r == DDP_SUCCESS) r = ddp__cuda_step_end(ctx, stream);
    } else {
        ddp_result d = ddp__drain(ctx);
        if (r == DDP_SUCCESS) r = d;
        if (r == DDP_SUCCESS && ddp__on_gpu(ctx)) r = ddp__cuda_step_end(ctx, stream);
    }
    ctx->in_step = 0;
    ctx->accum_steps = 0;
    ctx->grads_dirty = 0; /* the next step starts from zero */
    if (r != DDP_SUCCESS) return ddp__break(ctx, r);
    return DDP_SUCCESS;
}

DDP_API ddp_result ddp_step_end(ddp_context *ctx) { return ddp__step_end(ctx, NULL); }
DDP_API ddp_result ddp_step_end_stream(ddp_context *ctx, void *stream) { return ddp__step_end(ctx, stream); }

DDP_API ddp_result ddp_set_no_sync(ddp_context *ctx, int no_sync) {
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    if (ctx->in_step) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_set_no_sync: not allowed inside a step");
    ctx->no_sync = no_sync ? 1 : 0;
    return DDP_SUCCESS;
}

/* ---- optimizers ------------------------------------------------------------------------ */

static ddp_result ddp__cuda_optimizer_step(ddp_context *ctx, float clip_scale);
static ddp_result ddp__cuda_sumsq(ddp_context *ctx, double *out);
static ddp_result ddp__cuda_scale_grads(ddp_context *ctx, float s);
static ddp_result ddp__cuda_memcpy(ddp_context *ctx, void *dst, const void *src, size_t bytes, int to_device);

static double ddp__sload(const void *s, size_t i, int wide) { return wide ? ((const double *)s)[i] : ((const float *)s)[i]; }
static void ddp__sstore(void *s, size_t i, int wide, double v) {
    if (wide) ((double *)s)[i] = v; else ((float *)s)[i] = (float)v;
}

static ddp_result ddp__cuda_state_alloc(ddp_context *ctx, void **slot);
static ddp_result ddp__cuda_init_master(ddp_context *ctx);
static ddp_result ddp__cuda_zero(ddp_context *ctx, void *p, size_t bytes);

/* The state arrays the optimizer needs: m (SGD momentum, AdamW first
   moment), v (AdamW), master (f32 copies of 16-bit parameters). */
static void ddp__state_needed(const ddp_context *ctx, int need[3]) {
    const ddp_optimizer_desc *o = &ctx->cfg.optimizer;
    int b;
    need[0] = o->type == DDP_OPTIM_ADAMW || (o->type == DDP_OPTIM_SGD && o->momentum > 0);
    need[1] = o->type == DDP_OPTIM_ADAMW;
    need[2] = 0;
    for (b = 0; b < ctx->num_buckets; b++)
        if (o->type != DDP_OPTIM_NONE && (ctx->buckets[b].dtype == DDP_F16 || ctx->buckets[b].dtype == DDP_BF16)) need[2] = 1;
}

static void **ddp__state_slot(ddp_context *ctx, int k) {
    return k == 0 ? &ctx->opt_m : k == 1 ? &ctx->opt_v : &ctx->opt_master;
}

/* master = the 16-bit parameters, widened */
static ddp_result ddp__init_master(ddp_context *ctx) {
    int b;
    if (!ctx->opt_master) return DDP_SUCCESS;
    if (ddp__on_gpu(ctx)) return ddp__cuda_init_master(ctx);
    for (b = 0; b < ctx->num_buckets; b++) {
        const ddp__bucket *bk = &ctx->buckets[b];
        size_t i;
        if (bk->dtype != DDP_F16 && bk->dtype != DDP_BF16) continue;
        for (i = 0; i < bk->numel; i++)
            ((float *)((unsigned char *)ctx->opt_master + ctx->opt_state_off[b]))[i] =
                (float)ddp__load_elem(ctx->flat_params + bk->offset, i, bk->dtype);
    }
    return DDP_SUCCESS;
}

/* Allocate (zeroed) whatever state the optimizer needs and lacks. */
static ddp_result ddp__opt_alloc(ddp_context *ctx) {
    int need[3], k;
    ddp__state_needed(ctx, need);
    for (k = 0; k < 3; k++) {
        void **slot = ddp__state_slot(ctx, k);
        if (!need[k] || *slot) continue;
        if (ddp__on_gpu(ctx)) DDP__TRY(ddp__cuda_state_alloc(ctx, slot));
        else if (!(*slot = ddp__calloc(ctx, ctx->opt_state_bytes)))
            return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory for %zu bytes of optimizer state", ctx->opt_state_bytes);
        if (k == 2) DDP__TRY(ddp__init_master(ctx));
    }
    return DDP_SUCCESS;
}

static ddp_result ddp__state_zero(ddp_context *ctx, void *p) {
    if (ddp__on_gpu(ctx)) return ddp__cuda_zero(ctx, p, ctx->opt_state_bytes);
    memset(p, 0, ctx->opt_state_bytes);
    return DDP_SUCCESS;
}

static void ddp__sgd_f32(float *p, const float *g, float *buf, size_t n, const ddp_optimizer_desc *o,
                         int first, float gs) {
    float lr = o->lr, wd = o->weight_decay, mom = o->momentum;
    size_t i;
    if (mom != 0 && wd == 0 && gs == 1.0f && !o->nesterov) {
        /* the common case without per-element branches, in fixed-size
           chunks so that the compiler vectorises it */
        size_t j = 0;
        int k;
        if (first) {
            for (; j + DDP__VEC <= n; j += DDP__VEC)
                for (k = 0; k < DDP__VEC; k++) { float b = g[j + k]; buf[j + k] = b; p[j + k] -= lr * b; }
        } else {
            for (; j + DDP__VEC <= n; j += DDP__VEC)
                for (k = 0; k < DDP__VEC; k++) { float b = mom * buf[j + k] + g[j + k]; buf[j + k] = b; p[j + k] -= lr * b; }
        }
        for (; j < n; j++) { float b = first ? g[j] : mom * buf[j] + g[j]; buf[j] = b; p[j] -= lr * b; }
        return;
    }
    if (mom == 0) {
        for (i = 0; i < n; i++) p[i] -= lr * (g[i] * gs + wd * p[i]);
        return;
    }
    for (i = 0; i < n; i++) {
        float d = g[i] * gs + wd * p[i];
        float b = first ? d : mom * buf[i] + d;
        buf[i] = b;
        p[i] -= lr * (o->nesterov ? d + mom * b : b);
    }
}

static void ddp__adamw_f32(float *p, const float *g, float *m, float *v, size_t n, const ddp_optimizer_desc *o,
                           int64_t t, float gs) {
    float b1 = o->beta1, b2 = o->beta2, eps = o->eps;
    float bc1 = (float)(1.0 - pow((double)b1, (double)t));
    float bc2s = (float)sqrt(1.0 - pow((double)b2, (double)t));
    float step = o->lr / bc1, decay = 1.0f - o->lr * o->weight_decay;
    size_t i;
    for (i = 0; i < n; i++) {
        float gi = g[i] * gs;
        float mi = b1 * m[i] + (1.0f - b1) * gi;
        float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay - step * mi / (sqrtf(vi) / bc2s + eps);
    }
}

/* f64, f16 and bf16 buckets: the same arithmetic in double, with f32 master
   weights for the 16-bit types. */
static void ddp__opt_generic(ddp_context *ctx, int b, int64_t t, double gs) {
    const ddp_optimizer_desc *o = &ctx->cfg.optimizer;
    const ddp__bucket *bk = &ctx->buckets[b];
    int wide = bk->dtype == DDP_F64, half = bk->dtype == DDP_F16 || bk->dtype == DDP_BF16;
    unsigned char *pp = ctx->flat_params + bk->offset, *gp = ctx->flat_grads + bk->offset;
    void *m = ctx->opt_m ? (unsigned char *)ctx->opt_m + ctx->opt_state_off[b] : NULL;
    void *v = ctx->opt_v ? (unsigned char *)ctx->opt_v + ctx->opt_state_off[b] : NULL;
    float *master = half ? (float *)((unsigned char *)ctx->opt_master + ctx->opt_state_off[b]) : NULL;
    double bc1 = 1.0 - pow((double)o->beta1, (double)t), bc2s = sqrt(1.0 - pow((double)o->beta2, (double)t));
    size_t i;
    for (i = 0; i < bk->numel; i++) {
        double p = half ? master[i] : ddp__load_elem(pp, i, bk->dtype);
        double g = ddp__load_elem(gp, i, bk->dtype) * gs;
        if (o->type == DDP_OPTIM_SGD) {
            double d = g + o->weight_decay * p;
            if (o->momentum > 0) {
                double bb = t == 1 ? d : o->momentum * ddp__sload(m, i, wide) + d;
                ddp__sstore(m, i, wide, bb);
                d = o->nesterov ? d + o->momentum * bb : bb;
            }
            p -= o->lr * d;
        } else {
            double mi = o->beta1 * ddp__sload(m, i, wide) + (1.0 - o->beta1) * g;
            double vi = o->beta2 * ddp__sload(v, i, wide) + (1.0 - o->beta2) * g * g;
            ddp__sstore(m, i, wide, mi);
            ddp__sstore(v, i, wide, vi);
            p = p * (1.0 - (double)o->lr * o->weight_decay) - ((double)o->lr / bc1) * mi / (sqrt(vi) / bc2s + o->eps);
        }
        if (half) master[i] = (float)p;
        ddp__store_elem(pp, i, bk->dtype, p);
    }
}

static ddp_result ddp__sumsq(ddp_context *ctx, double *out) {
    double s = 0;
    int b;
    if (ddp__on_gpu(ctx)) return ddp__cuda_sumsq(ctx, out);
    for (b = 0; b < ctx->num_buckets; b++) {
        const ddp__bucket *bk = &ctx->buckets[b];
        const unsigned char *g = ctx->flat_grads + bk->offset;
        size_t i;
        if (bk->dtype == DDP_F32) {
            const float *f = (const float *)g;
            double part = 0;
            for (i = 0; i < bk->numel; i++) part += (double)f[i] * (double)f[i];
            s += part;
        } else {
            for (i = 0; i < bk->numel; i++) { double x = ddp__load_elem(g, i, bk->dtype); s += x * x; }
        }
    }
    *out = s;
    return DDP_SUCCESS;
}

static ddp_result ddp__opt_ready(ddp_context *ctx, const char *fn) {
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    DDP__TRY(ddp__check_usable(ctx, fn));
    if (!ctx->finalized) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "%s: call ddp_finalize() first", fn);
    if (ctx->in_step) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "%s: not allowed inside a step (call ddp_step_end() first)", fn);
    if (ctx->accum_steps > 0)
        return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "%s: %d accumulated micro-step(s) were never reduced (end the accumulation with a step after ddp_set_no_sync(ctx, 0))",
                         fn, ctx->accum_steps);
    return DDP_SUCCESS;
}

/* The clip factor for max_norm (1 when no clipping is needed). */
static ddp_result ddp__clip_factor(ddp_context *ctx, float max_norm, float *norm_out, float *factor) {
    double ss = 0;
    DDP__TRY(ddp__sumsq(ctx, &ss));
    *norm_out = (float)sqrt(ss);
    *factor = 1.0f;
    if (max_norm > 0 && *norm_out > max_norm) *factor = max_norm / (*norm_out + 1e-6f);
    return DDP_SUCCESS;
}

DDP_API ddp_result ddp_clip_grad_norm(ddp_context *ctx, float max_norm, float *out_norm) {
    float norm, f;
    int b;
    DDP__TRY(ddp__opt_ready(ctx, "ddp_clip_grad_norm"));
    if (!(max_norm == max_norm)) return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_clip_grad_norm: max_norm is NaN");
    DDP__TRY(ddp__clip_factor(ctx, max_norm, &norm, &f));
    if (out_norm) *out_norm = norm;
    if (f == 1.0f) return DDP_SUCCESS;
    if (ddp__on_gpu(ctx)) return ddp__cuda_scale_grads(ctx, f);
    for (b = 0; b < ctx->num_buckets; b++) {
        void *g = ctx->flat_grads + ctx->buckets[b].offset;
        ddp__reduce(&g, 1, &g, 1, ctx->buckets[b].numel, ctx->buckets[b].dtype, DDP_OP_SUM, f);
    }
    return DDP_SUCCESS;
}

DDP_API ddp_result ddp_optimizer_step(ddp_context *ctx) {
    const ddp_optimizer_desc *o;
    float gs = 1.0f, norm;
    int b;
    DDP__TRY(ddp__opt_ready(ctx, "ddp_optimizer_step"));
    o = &ctx->cfg.optimizer;
    if (o->type == DDP_OPTIM_NONE)
        return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_optimizer_step: config.optimizer.type is DDP_OPTIM_NONE");
    if (o->max_grad_norm > 0) DDP__TRY(ddp__clip_factor(ctx, o->max_grad_norm, &norm, &gs));
    DDP__TRY(ddp__opt_alloc(ctx));
    ctx->opt_steps++;
    if (ddp__on_gpu(ctx)) return ddp__cuda_optimizer_step(ctx, gs);
    for (b = 0; b < ctx->num_buckets; b++) {
        const ddp__bucket *bk = &ctx->buckets[b];
        if (bk->dtype == DDP_F32) {
            float *p = (float *)(ctx->flat_params + bk->offset), *g = (float *)(ctx->flat_grads + bk->offset);
            float *m = ctx->opt_m ? (float *)((unsigned char *)ctx->opt_m + ctx->opt_state_off[b]) : NULL;
            float *v = ctx->opt_v ? (float *)((unsigned char *)ctx->opt_v + ctx->opt_state_off[b]) : NULL;
            if (o->type == DDP_OPTIM_SGD) ddp__sgd_f32(p, g, m, bk->numel, o, ctx->opt_steps == 1, gs);
            else ddp__adamw_f32(p, g, m, v, bk->numel, o, ctx->opt_steps, gs);
        } else {
            ddp__opt_generic(ctx, b, ctx->opt_steps, gs);
        }
    }
    return DDP_SUCCESS;
}

DDP_API ddp_result ddp_set_lr(ddp_context *ctx, float lr) {
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    if (!(lr >= 0)) return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_set_lr: lr %g must be >= 0", (double)lr);
    ctx->cfg.optimizer.lr = lr;
    return DDP_SUCCESS;
}

static ddp_result ddp__cuda_zero_grads(ddp_context *ctx);

static ddp_result ddp__zero_grads(ddp_context *ctx) {
    if (ddp__on_gpu(ctx)) return ddp__cuda_zero_grads(ctx);
    memset(ctx->flat_grads, 0, ctx->flat_bytes);
    return DDP_SUCCESS;
}

DDP_API ddp_result ddp_zero_grad(ddp_context *ctx) {
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    DDP__TRY(ddp__check_usable(ctx, "ddp_zero_grad"));
    if (!ctx->finalized) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_zero_grad: call ddp_finalize() first");
    if (ctx->in_step) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_zero_grad: not allowed inside a step");
    DDP__TRY(ddp__zero_grads(ctx));
    ctx->accum_steps = 0;
    ctx->grads_dirty = 1;
    return DDP_SUCCESS;
}

DDP_API int64_t ddp_optimizer_steps(const ddp_context *ctx) { return ctx ? ctx->opt_steps : 0; }

/* ---- the step wrapper ------------------------------------------------------------------ */

DDP_API ddp_result ddp_train_step(ddp_context *ctx, ddp_forward_backward_fn fn, void *user,
                                  int micro_steps, float *out_loss) {
    double loss_sum = 0;
    float loss;
    int m;
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    if (!fn) return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_train_step: fn is NULL");
    if (micro_steps < 0) return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_train_step: micro_steps %d is negative", micro_steps);
    if (micro_steps == 0) micro_steps = 1;
    for (m = 0; m < micro_steps; m++) {
        int rc;
        loss = 0;
        DDP__TRY(ddp_set_no_sync(ctx, m < micro_steps - 1));
        DDP__TRY(ddp_step_begin(ctx));
        rc = fn(ctx, user, m, &loss);
        if (rc != 0) {
            ctx->in_step = 0;
            ddp__fail(ctx, DDP_ERROR_USER, "ddp_train_step: your forward/backward returned %d in micro-step %d on rank %d", rc, m, ctx->rank);
            ddp__break(ctx, DDP_ERROR_USER);
            {
                char keep[DDP__ERRLEN];
                memcpy(keep, ctx->err, sizeof keep);
                ddp__drain(ctx);
                memcpy(ctx->err, keep, sizeof keep);
            }
            return DDP_ERROR_USER;
        }
        DDP__TRY(ddp_step_end(ctx));
        loss_sum += loss;
    }
    loss = (float)(loss_sum / micro_steps);
    if (ctx->world > 1) DDP__TRY(ddp_allreduce(ctx, &loss, 1, DDP_F32, DDP_OP_AVG));
    if (out_loss) *out_loss = loss;
    if (ctx->cfg.optimizer.type != DDP_OPTIM_NONE) DDP__TRY(ddp_optimizer_step(ctx));
    return DDP_SUCCESS;
}

/* ---- checkpoints ------------------------------------------------------------------------

   Layout (little-endian host order):
     "DDPCKPT1" u32 version u32 nparams u32 optimizer u32 flags i64 steps
     per parameter: u32 namelen, name, u32 dtype, u64 numel, u32 ndim, i64 shape[ndim]
     per parameter: data (numel * dtype size)
     per parameter, when present: momentum/m, v, master (numel * state size each)
     u64 FNV-1a hash of everything before it */

#define DDP__CKPT_MAGIC "DDPCKPT1"

typedef struct ddp__ckfile {
    FILE *f;
    uint64_t hash;
    int err;
} ddp__ckfile;

static void ddp__hash(uint64_t *h, const void *p, size_t n) {
    const unsigned char *s = (const unsigned char *)p;
    uint64_t x = *h;
    size_t i;
    for (i = 0; i < n; i++) { x ^= s[i]; x *= 0x100000001b3ull; }
    *h = x;
}

static void ddp__ck_write(ddp__ckfile *c, const void *p, size_t n) {
    if (c->err) return;
    ddp__hash(&c->hash, p, n);
    if (n && fwrite(p, 1, n, c->f) != n) c->err = errno ? errno : EIO;
}

static int ddp__ck_read(ddp__ckfile *c, void *p, size_t n) {
    if (c->err) return 0;
    if (n && fread(p, 1, n, c->f) != n) { c->err = -1; return 0; }
    ddp__hash(&c->hash, p, n);
    return 1;
}

/* Which state arrays exist: bit 0 m, bit 1 v, bit 2 master. */
static uint32_t ddp__state_flags(const ddp_context *ctx) {
    return (ctx->opt_m ? 1u : 0u) | (ctx->opt_v ? 2u : 0u) | (ctx->opt_master ? 4u : 0u);
}

/* Host copy of a parameter's data or state (GPU contexts copy from the device). */
static ddp_result ddp__host_view(ddp_context *ctx, const void *src, size_t bytes, void **tmp, const void **view) {
    if (!ddp__on_gpu(ctx)) { *view = src; *tmp = NULL; return DDP_SUCCESS; }
    *tmp = ddp__alloc(ctx, bytes ? bytes : 1);
    if (!*tmp) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory copying %zu bytes from the GPU", bytes);
    *view = *tmp;
    return ddp__cuda_memcpy(ctx, *tmp, src, bytes, 0);
}

static void *ddp__state_ptr(ddp_context *ctx, void *base, int id) {
    const ddp__param *p = &ctx->params[id];
    const ddp__bucket *bk = &ctx->buckets[p->bucket];
    size_t el = ddp__state_elem(p->dtype), es = ddp_dtype_size(p->dtype);
    return (unsigned char *)base + ctx->opt_state_off[p->bucket] + (p->offset - bk->offset) / es * el;
}

static ddp_result ddp__ck_write_block(ddp_context *ctx, ddp__ckfile *c, const void *src, size_t bytes) {
    void *tmp = NULL;
    const void *view = NULL;
    DDP__TRY(ddp__host_view(ctx, src, bytes, &tmp, &view));
    ddp__ck_write(c, view, bytes);
    ddp__free(ctx, tmp);
    return DDP_SUCCESS;
}

static ddp_result ddp__save_file(ddp_context *ctx, const char *path) {
    ddp__tmpfile t;
    ddp__ckfile c;
    uint32_t u;
    int64_t steps = ctx->opt_steps;
    uint32_t flags = ddp__state_flags(ctx);
    void *bases[3];
    int i, k;
    ddp_result r = DDP_SUCCESS;
    int e;
    if (strlen(path) > 4000) return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_save_checkpoint: path is too long");
    /* temporaries of writers killed before (this host's) go first */
    ddp__file_sweep_tmp(path);
    memset(&c, 0, sizeof c);
    c.hash = 0xcbf29ce484222325ull;
    e = ddp__file_tmp_open(&t, path);
    if (e != 0) return ddp__fail(ctx, DDP_ERROR_IO, "ddp_save_checkpoint: cannot create a temporary file beside '%s': %s", path, strerror(e));
    c.f = t.f;
    ddp__ck_write(&c, DDP__CKPT_MAGIC, 8);
    u = 1; ddp__ck_write(&c, &u, 4);
    u = (uint32_t)ctx->num_params; ddp__ck_write(&c, &u, 4);
    u = (uint32_t)ctx->cfg.optimizer.type; ddp__ck_write(&c, &u, 4);
    ddp__ck_write(&c, &flags, 4);
    ddp__ck_write(&c, &steps, 8);
    for (i = 0; i < ctx->num_params; i++) {
        const ddp__param *p = &ctx->params[i];
        uint64_t numel = p->numel;
        u = (uint32_t)strlen(p->name); ddp__ck_write(&c, &u, 4);
        ddp__ck_write(&c, p->name, u);
        u = (uint32_t)p->dtype; ddp__ck_write(&c, &u, 4);
        ddp__ck_write(&c, &numel, 8);
        u = (uint32_t)p->ndim; ddp__ck_write(&c, &u, 4);
        ddp__ck_write(&c, p->shape, (size_t)p->ndim * 8);
    }
    for (i = 0; i < ctx->num_params && r == DDP_SUCCESS; i++)
        r = ddp__ck_write_block(ctx, &c, ctx->flat_params + ctx->params[i].offset,
                                ctx->params[i].numel * ddp_dtype_size(ctx->params[i].dtype));
    bases[0] = ctx->opt_m; bases[1] = ctx->opt_v; bases[2] = ctx->opt_master;
    for (k = 0; k < 3 && r == DDP_SUCCESS; k++) {
        if (!bases[k]) continue;
        for (i = 0; i < ctx->num_params && r == DDP_SUCCESS; i++)
            r = ddp__ck_write_block(ctx, &c, ddp__state_ptr(ctx, bases[k], i),
                                    ctx->params[i].numel * ddp__state_elem(ctx->params[i].dtype));
    }
    {
        uint64_t h = c.hash;
        ddp__ck_write(&c, &h, 8);
    }
    if (r == DDP_SUCCESS && !c.err && fflush(c.f) != 0) c.err = errno;
    if (r == DDP_SUCCESS && !c.err && fsync(fileno(c.f)) != 0) c.err = errno;
    if (r == DDP_SUCCESS && !c.err) c.err = ddp__file_tmp_name(&t);
    if (fclose(c.f) != 0 && !c.err) c.err = errno;
    if (r == DDP_SUCCESS && c.err) r = ddp__fail(ctx, DDP_ERROR_IO, "ddp_save_checkpoint: cannot write '%s': %s", t.tmp, strerror(c.err));
    if (r == DDP_SUCCESS && rename(t.tmp, path) != 0)
        r = ddp__fail(ctx, DDP_ERROR_IO, "ddp_save_checkpoint: cannot rename '%s' to '%s': %s", t.tmp, path, strerror(errno));
    if (r != DDP_SUCCESS) { ddp__file_tmp_discard(&t); return r; }
    ddp__file_sync_dir(path); /* make the rename itself durable */
    return DDP_SUCCESS;
}

/* Every rank learns whether every other rank succeeded: the same result everywhere. */
static ddp_result ddp__agree(ddp_context *ctx, ddp_result mine, const char *what) {
    int32_t v[2];
    ddp_result r;
    char keep[DDP__ERRLEN];
    if (ctx->world == 1) return mine;
    memcpy(keep, ctx->err, sizeof keep);
    v[0] = mine != DDP_SUCCESS ? (int32_t)(ctx->rank + 1) : 0;
    v[1] = (int32_t)-mine;
    r = ctx->ops->allreduce(ctx, v, 2, DDP_I32, DDP_OP_MAX);
    if (r != DDP_SUCCESS) return ddp__break(ctx, r);
    memcpy(ctx->err, keep, sizeof keep);
    if (mine != DDP_SUCCESS) return mine;
    if (v[0] != 0)
        return ddp__fail(ctx, (ddp_result)-v[1], "%s failed on rank %d (see that rank's error)", what, v[0] - 1);
    return DDP_SUCCESS;
}

DDP_API ddp_result ddp_save_checkpoint(ddp_context *ctx, const char *path) {
    ddp_result r = DDP_SUCCESS;
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    DDP__TRY(ddp__check_usable(ctx, "ddp_save_checkpoint"));
    if (!path || !*path) return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_save_checkpoint: path is NULL or empty");
    if (!ctx->finalized) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_save_checkpoint: call ddp_finalize() first");
    if (ctx->in_step) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_save_checkpoint: not allowed inside a step");
    if (ctx->rank == 0) r = ddp__save_file(ctx, path);
    return ddp__agree(ctx, r, "saving the checkpoint");
}

/* Reads into scratch buffers first and commits only after the checksum
   matched, so a bad file leaves the model untouched. */
static ddp_result ddp__load_file(ddp_context *ctx, const char *path) {
    ddp__ckfile c;
    char magic[8], name[DDP__MAX_NAME];
    uint32_t version, np, opt, flags, u;
    int64_t steps;
    unsigned char *pbuf = NULL, *sbuf[3] = { NULL, NULL, NULL };
    int i, k;
    ddp_result r = DDP_SUCCESS;
    memset(&c, 0, sizeof c);
    c.hash = 0xcbf29ce484222325ull;
    c.f = fopen(path, "rb");
    if (!c.f) return ddp__fail(ctx, DDP_ERROR_IO, "ddp_load_checkpoint: cannot open '%s': %s", path, strerror(errno));
    if (!ddp__ck_read(&c, magic, 8) || memcmp(magic, DDP__CKPT_MAGIC, 8) != 0) {
        r = ddp__fail(ctx, DDP_ERROR_CORRUPT, "'%s' is not a ddp.h checkpoint (bad magic)", path);
        goto done;
    }
    if (!ddp__ck_read(&c, &version, 4) || !ddp__ck_read(&c, &np, 4) || !ddp__ck_read(&c, &opt, 4) ||
        !ddp__ck_read(&c, &flags, 4) || !ddp__ck_read(&c, &steps, 8)) {
        r = ddp__fail(ctx, DDP_ERROR_CORRUPT, "checkpoint '%s' is truncated in its header", path);
        goto done;
    }
    if (version != 1) { r = ddp__fail(ctx, DDP_ERROR_CORRUPT, "checkpoint '%s' has version %u; this library reads version 1", path, version); goto done; }
    if (np != (uint32_t)ctx->num_params) {
        r = ddp__fail(ctx, DDP_ERROR_MISMATCH, "checkpoint '%s' is of another model: it has %u parameters, this model %d", path, np, ctx->num_params);
        goto done;
    }
    for (i = 0; i < ctx->num_params; i++) {
        const ddp__param *p = &ctx->params[i];
        uint32_t dt, nd;
        uint64_t numel;
        int64_t shape[DDP__MAX_NDIM];
        if (!ddp__ck_read(&c, &u, 4) || u >= DDP__MAX_NAME || !ddp__ck_read(&c, name, u)) {
            r = ddp__fail(ctx, DDP_ERROR_CORRUPT, "checkpoint '%s' is corrupt at the name of parameter %d", path, i);
            goto done;
        }
        name[u] = 0;
        if (!ddp__ck_read(&c, &dt, 4) || !ddp__ck_read(&c, &numel, 8) || !ddp__ck_read(&c, &nd, 4) ||
            nd < 1 || nd > DDP__MAX_NDIM || !ddp__ck_read(&c, shape, (size_t)nd * 8)) {
            r = ddp__fail(ctx, DDP_ERROR_CORRUPT, "checkpoint '%s' is corrupt at parameter %d '%s'", path, i, name);
            goto done;
        }
        if (strcmp(name, p->name) != 0 || dt != (uint32_t)p->dtype || numel != p->numel || (int)nd != p->ndim ||
            memcmp(shape, p->shape, (size_t)nd * 8) != 0) {
            ddp__param q;
            char a[300], b[300];
            memset(&q, 0, sizeof q);
            ddp__copy_str(q.name, sizeof q.name, name);
            q.dtype = (ddp_dtype)dt; q.ndim = (int)nd; memcpy(q.shape, shape, (size_t)nd * 8);
            ddp__describe_param(&q, a, sizeof a);
            ddp__describe_param(p, b, sizeof b);
            r = ddp__fail(ctx, DDP_ERROR_MISMATCH, "checkpoint '%s' is of another model: parameter %d is %s there, %s here", path, i, a, b);
            goto done;
        }
    }
    if (opt != (uint32_t)ctx->cfg.optimizer.type && opt != DDP_OPTIM_NONE && ctx->cfg.optimizer.type != DDP_OPTIM_NONE) {
        r = ddp__fail(ctx, DDP_ERROR_MISMATCH, "checkpoint '%s' holds state of optimizer %u, this context uses %d", path, opt, (int)ctx->cfg.optimizer.type);
        goto done;
    }
    pbuf = (unsigned char *)ddp__calloc(ctx, ctx->flat_bytes);
    if (!pbuf) { r = ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory loading '%s'", path); goto done; }
    for (i = 0; i < ctx->num_params && r == DDP_SUCCESS; i++)
        if (!ddp__ck_read(&c, pbuf + ctx->params[i].offset, ctx->params[i].numel * ddp_dtype_size(ctx->params[i].dtype)))
            r = ddp__fail(ctx, DDP_ERROR_CORRUPT, "checkpoint '%s' is truncated in the data of parameter %d '%s'", path, i, ctx->params[i].name);
    for (k = 0; k < 3 && r == DDP_SUCCESS; k++) {
        if (!(flags & (1u << k))) continue;
        sbuf[k] = (unsigned char *)ddp__calloc(ctx, ctx->opt_state_bytes);
        if (!sbuf[k]) { r = ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory loading '%s'", path); break; }
        for (i = 0; i < ctx->num_params && r == DDP_SUCCESS; i++)
            if (!ddp__ck_read(&c, ddp__state_ptr(ctx, sbuf[k], i), ctx->params[i].numel * ddp__state_elem(ctx->params[i].dtype)))
                r = ddp__fail(ctx, DDP_ERROR_CORRUPT, "checkpoint '%s' is truncated in the optimizer state", path);
    }
    if (r == DDP_SUCCESS) {
        uint64_t want = c.hash, got;
        if (fread(&got, 1, 8, c.f) != 8) r = ddp__fail(ctx, DDP_ERROR_CORRUPT, "checkpoint '%s' is truncated (no checksum)", path);
        else if (got != want) r = ddp__fail(ctx, DDP_ERROR_CORRUPT, "checkpoint '%s' is corrupt: checksum mismatch", path);
        else if (fgetc(c.f) != EOF) r = ddp__fail(ctx, DDP_ERROR_CORRUPT, "checkpoint '%s' has trailing bytes after its checksum", path);
    }
    if (r == DDP_SUCCESS) { /* commit */
        if (ddp__on_gpu(ctx)) r = ddp__cuda_memcpy(ctx, ctx->flat_params, pbuf, ctx->flat_bytes, 1);
        else memcpy(ctx->flat_params, pbuf, ctx->flat_bytes);
        /* the optimizer state: the file's when it is of this optimizer,
           else fresh (zero moments, master weights from the loaded values) */
        if (r == DDP_SUCCESS) {
            int take = opt == (uint32_t)ctx->cfg.optimizer.type && opt != DDP_OPTIM_NONE;
            ctx->opt_steps = take ? steps : 0;
            r = ddp__opt_alloc(ctx);
            for (k = 0; k < 3 && r == DDP_SUCCESS; k++) {
                void *dst = *ddp__state_slot(ctx, k);
                if (!dst) continue;
                if (take && sbuf[k]) {
                    if (ddp__on_gpu(ctx)) r = ddp__cuda_memcpy(ctx, dst, sbuf[k], ctx->opt_state_bytes, 1);
                    else memcpy(dst, sbuf[k], ctx->opt_state_bytes);
                } else if (k == 2) {
                    r = ddp__init_master(ctx);
                } else {
                    r = ddp__state_zero(ctx, dst);
                }
            }
        }
    }
done:
    fclose(c.f);
    ddp__free(ctx, pbuf);
    for (k = 0; k < 3; k++) ddp__free(ctx, sbuf[k]);
    return r;
}

DDP_API ddp_result ddp_load_checkpoint(ddp_context *ctx, const char *path) {
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    DDP__TRY(ddp__check_usable(ctx, "ddp_load_checkpoint"));
    if (!path || !*path) return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_load_checkpoint: path is NULL or empty");
    if (!ctx->finalized) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_load_checkpoint: call ddp_finalize() first");
    if (ctx->in_step) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_load_checkpoint: not allowed inside a step");
    return ddp__agree(ctx, ddp__load_file(ctx, path), "loading the checkpoint");
}

/* ---- CUDA: device memory, streams, NCCL and the host-staged backend ----------------

   Parameters and gradients live on the GPU. Marking a gradient ready records
   an event on the caller's stream. A complete bucket is reduced:
     nccl    on the communication stream, which first waits for the bucket's
             events; ncclAvg (or ncclSum) in place, a scale kernel when
             micro-steps were accumulated. The end of the step makes the
             user's stream wait for the communication stream: no host sync.
             A watchdog (the communication thread) polls every collective in
             flight; one that has not finished within the timeout, or an
             asynchronous NCCL error, aborts the communicator, so no path
             blocks forever inside NCCL.
     staged  by the communication thread: device to host (into this rank's
             slice of the shared gradient segment), the shm all-reduce, host
             to device; the user's stream waits for the last copy. */
#if defined(DDP_CUDA)

static int ddp__is_broken(const ddp_context *ctx) { return __atomic_load_n(&ctx->broken, __ATOMIC_ACQUIRE) != 0; }

struct ddp__cuda_state {
    int device;
    cudaStream_t comm;            /* communication stream */
    cudaStream_t user;            /* ddp_set_stream(); NULL: legacy default stream */
    cudaEvent_t *ready;           /* per parameter */
    cudaEvent_t *done;            /* per bucket */
    cudaEvent_t  last;            /* the last collective queued on comm */
    float       *d_norm;          /* device scalar for sumsq */
    float       *d_scratch;       /* sumsq partials */
    size_t       scratch_elems;
    void        *compress_buf;    /* bucket in bf16/f16 for compressed all-reduce */
    int          host_registered; /* the shared gradient slice is pinned */
    int          solo;            /* a world of one: nothing to exchange (unless DDP_FORCE_COMM) */
    /* watchdog */
    int          inflight;        /* a collective is queued and not known finished */
    double       inflight_since;
    char         inflight_what[96];
#if defined(DDP_NCCL)
    ncclComm_t   nccl;
    int          nccl_ready;
#endif
};

#define DDP__CU(ctx, call, what) do { \
    cudaError_t ddp__e_ = (call); \
    if (ddp__e_ != cudaSuccess) \
        return ddp__fail((ctx), DDP_ERROR_CUDA, "%s: %s (%s)", (what), cudaGetErrorString(ddp__e_), #call); \
} while (0)

#define DDP__KL(ctx, call, what) do { \
    int ddp__k_ = (call); \
    if (ddp__k_ != 0) \
        return ddp__fail((ctx), DDP_ERROR_CUDA, "%s: kernel launch failed: %s", (what), cudaGetErrorString((cudaError_t)ddp__k_)); \
} while (0)

static void *ddp__dev_alloc(ddp_context *ctx, size_t bytes) {
    void *p = NULL;
    if (ctx->cfg.device_allocator.alloc) return ctx->cfg.device_allocator.alloc(bytes, ctx->cfg.device_allocator.user);
    if (cudaMalloc(&p, bytes) != cudaSuccess) { (void)cudaGetLastError(); return NULL; }
    return p;
}

static void ddp__free_device(ddp_context *ctx, void *p) {
    if (!p) return;
    if (ctx->cfg.device_allocator.free) ctx->cfg.device_allocator.free(p, ctx->cfg.device_allocator.user);
    else cudaFree(p);
}

static void ddp__free_flat_grads(ddp_context *ctx) {
    if (ddp__on_gpu(ctx)) ddp__free_device(ctx, ctx->flat_grads);
    if (ctx->cuda && ctx->cuda->host_registered && ctx->shm.grads)
        cudaHostUnregister(ctx->shm.grads + (size_t)ctx->rank * ctx->shm.grad_stride);
    ctx->flat_grads = NULL;
}

static cudaStream_t ddp__ustream(ddp_context *ctx) { return ctx->cuda ? ctx->cuda->user : (cudaStream_t)0; }

DDP_API ddp_result ddp_set_stream(ddp_context *ctx, void *stream) {
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    if (!ddp__on_gpu(ctx)) return ddp__fail(ctx, DDP_ERROR_UNSUPPORTED, "ddp_set_stream: the context keeps parameters on the CPU");
    ctx->cuda->user = (cudaStream_t)stream;
    return DDP_SUCCESS;
}

#if defined(DDP_NCCL)
static ddp_result ddp__nccl_fail(ddp_context *ctx, ncclResult_t r, const char *what) {
    const char *last = ctx->cuda && ctx->cuda->nccl ? ncclGetLastError(ctx->cuda->nccl) : ncclGetLastError(NULL);
    return ddp__fail(ctx, DDP_ERROR_NCCL, "%s: %s%s%s", what, ncclGetErrorString(r), last && *last ? ": " : "", last ? last : "");
}

/* Abort the communicator once (the watchdog may race the owner thread):
   afterwards every NCCL call site sees nccl_ready 0. */
static void ddp__nccl_abort(ddp_context *ctx, int locked) {
    struct ddp__cuda_state *cu = ctx->cuda;
    if (!locked) pthread_mutex_lock(&ctx->mu);
    if (cu->nccl) {
        __atomic_store_n(&cu->nccl_ready, 0, __ATOMIC_RELEASE);
        ncclCommAbort(cu->nccl);
        cu->nccl = NULL;
    }
    if (!locked) pthread_mutex_unlock(&ctx->mu);
}

static int ddp__nccl_ok(const ddp_context *ctx) { return __atomic_load_n(&ctx->cuda->nccl_ready, __ATOMIC_ACQUIRE); }

/* Non-blocking communicators answer ncclInProgress; poll until the call
   settled, with the timeout; on timeout abort the communicator. */
static ddp_result ddp__nccl_settle(ddp_context *ctx, ncclResult_t r, double timeout, const char *what) {
    double start = ddp__now(), deadline = start + timeout;
    while (r == ncclInProgress) {
        double now = ddp__now();
        if (now > deadline) {
            ddp__fail(ctx, DDP_ERROR_TIMEOUT, "%s: NCCL did not finish within %.1f s; communicator aborted", what, timeout);
            ddp__nccl_abort(ctx, 0);
            ddp__set_broken(ctx, DDP_ERROR_TIMEOUT);
            return DDP_ERROR_TIMEOUT;
        }
        /* an enqueue settles within microseconds: spin first, sleep only when it takes long */
        if (now - start < 2e-3) sched_yield();
        else ddp__sleep_us(100);
        if (!ddp__nccl_ok(ctx)) break;
        ncclCommGetAsyncError(ctx->cuda->nccl, &r);
    }
    if (r != ncclSuccess) {
        ddp_result e = r == ncclInProgress ? ddp__fail(ctx, DDP_ERROR_PEER, "%s: the communicator was aborted", what) : ddp__nccl_fail(ctx, r, what);
        ddp__nccl_abort(ctx, 0);
        ddp__set_broken(ctx, e);
        return e;
    }
    return DDP_SUCCESS;
}

static ncclDataType_t ddp__nccl_type(ddp_dtype t) {
    switch (t) {
    case DDP_F64: return ncclFloat64;
    case DDP_F16: return ncclFloat16;
    case DDP_BF16: return ncclBfloat16;
    case DDP_I32: return ncclInt32;
    default: return ncclFloat32;
    }
}

static ncclRedOp_t ddp__nccl_op(ddp_op op) {
    switch (op) {
    case DDP_OP_AVG: return ncclAvg;
    case DDP_OP_MAX: return ncclMax;
    case DDP_OP_MIN: return ncclMin;
    default: return ncclSum;
    }
}

static ddp_result ddp__nccl_init(ddp_context *ctx) {
    ncclUniqueId id;
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    ncclResult_t r;
    char what[96];
    if (ctx->rank == 0) {
        r = ncclGetUniqueId(&id);
        if (r != ncclSuccess) return ddp__nccl_fail(ctx, r, "ncclGetUniqueId");
        if (ctx->world > 1) DDP__TRY(ddp__kv_set_once(ctx, "nccl/id", &id, sizeof id));
    } else {
        void *v = NULL;
        size_t len = 0;
        DDP__TRY(ddp__kv_get(ctx, "nccl/id", &v, &len));
        if (len != sizeof id) { free(v); return ddp__fail(ctx, DDP_ERROR_NETWORK, "the NCCL id from the store has %zu bytes, not %zu", len, sizeof id); }
        memcpy(&id, v, sizeof id);
        free(v);
    }
    cfg.blocking = 0;
    r = ncclCommInitRankConfig(&ctx->cuda->nccl, ctx->world, id, ctx->rank, &cfg);
    snprintf(what, sizeof what, "creating the NCCL communicator (rank %d of %d, GPU %d)", ctx->rank, ctx->world, ctx->cuda->device);
    if (r != ncclSuccess && r != ncclInProgress) return ddp__nccl_fail(ctx, r, what);
    if (r == ncclInProgress) ncclCommGetAsyncError(ctx->cuda->nccl, &r);
    DDP__TRY(ddp__nccl_settle(ctx, r, ctx->cfg.connect_timeout_s, what));
    __atomic_store_n(&ctx->cuda->nccl_ready, 1, __ATOMIC_RELEASE);
    return DDP_SUCCESS;
}
#endif

/* Poll an event (or, with ev NULL, the whole stream) with the timeout,
   watching NCCL's asynchronous errors. */
static ddp_result ddp__cuda_wait(ddp_context *ctx, cudaEvent_t ev, cudaStream_t s, const char *what) {
    double start = ddp__now();
    long us = 5;
    for (;;) {
        cudaError_t e = ev ? cudaEventQuery(ev) : cudaStreamQuery(s);
        if (e == cudaSuccess) return DDP_SUCCESS;
        if (e != cudaErrorNotReady) {
            ddp__fail(ctx, DDP_ERROR_CUDA, "%s: %s", what, cudaGetErrorString(e));
            ddp__set_broken(ctx, DDP_ERROR_CUDA);
            return DDP_ERROR_CUDA;
        }
        if (ddp__is_broken(ctx)) {
            char why[DDP__ERRLEN];
            ddp__comm_error(ctx, why, sizeof why);
            return ddp__fail(ctx, DDP_ERROR_PEER, "%s: the context broke while waiting (%s)", what,
                             why[0] ? why : "another replica or the watchdog stopped it");
        }
#if defined(DDP_NCCL)
        if (ddp__nccl_ok(ctx)) {
            ncclResult_t nr = ncclSuccess;
            ncclCommGetAsyncError(ctx->cuda->nccl, &nr);
            if (nr != ncclSuccess && nr != ncclInProgress) return ddp__nccl_settle(ctx, nr, 0, what);
        }
#endif
        if (ddp__now() - start > ctx->cfg.timeout_s) {
            ddp__fail(ctx, DDP_ERROR_TIMEOUT, "%s did not finish within %.1f s%s", what, ctx->cfg.timeout_s,
                      ctx->cfg.backend == DDP_BACKEND_NCCL ? "; NCCL communicator aborted" : "");
#if defined(DDP_NCCL)
            ddp__nccl_abort(ctx, 0);
#endif
            ddp__set_broken(ctx, DDP_ERROR_TIMEOUT);
            if (ctx->shm.ctrl) ddp__shm_abort(ctx, ctx->err);
            return DDP_ERROR_TIMEOUT;
        }
        ddp__sleep_us(us);
        if (us < 1000) us *= 2;
    }
}

static int ddp__is_device_ptr(const void *p) {
    struct cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) { (void)cudaGetLastError(); return 0; }
    return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}

/* ---- NCCL operations on user buffers (device or host) ---- */

#if defined(DDP_NCCL)
/* Run fn on device buffers: host buffers travel through temporary device copies. */
typedef struct ddp__nccl_args {
    const void *send; void *recv; size_t n, send_bytes, recv_bytes;
    ddp_dtype t; ddp_op op; int root; int kind; /* 0 allreduce 1 bcast 2 allgather 3 reduce-scatter */
} ddp__nccl_args;

static ddp_result ddp__nccl_run(ddp_context *ctx, ddp__nccl_args *a, const char *what) {
    struct ddp__cuda_state *cu = ctx->cuda;
    int dev_send = ddp__is_device_ptr(a->send), dev_recv = ddp__is_device_ptr(a->recv);
    void *ds = (void *)a->send, *dr = a->recv;
    ncclResult_t r;
    ddp_result res;
    if (!ddp__nccl_ok(ctx)) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "%s: the NCCL communicator was aborted", what);
    /* device buffers may still be written by work on the user's stream */
    DDP__CU(ctx, cudaEventRecord(cu->last, ddp__ustream(ctx)), what);
    DDP__CU(ctx, cudaStreamWaitEvent(cu->comm, cu->last, 0), what);
    if (!dev_send) {
        ds = ddp__dev_alloc(ctx, a->send_bytes ? a->send_bytes : 1);
        if (!ds) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "%s: no device memory for %zu bytes of staging", what, a->send_bytes);
        /* synchronous, so the host buffer may be pageable; then ordered for comm */
        if (cudaMemcpy(ds, a->send, a->send_bytes, cudaMemcpyHostToDevice) != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess) {
            ddp__free_device(ctx, ds);
            return ddp__fail(ctx, DDP_ERROR_CUDA, "%s: copying the host buffer to the GPU failed", what);
        }
    }
    if (!dev_recv) {
        dr = a->send == a->recv && !dev_send ? ds : ddp__dev_alloc(ctx, a->recv_bytes ? a->recv_bytes : 1);
        if (!dr) { if (!dev_send) ddp__free_device(ctx, ds); return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "%s: no device memory", what); }
    }
    switch (a->kind) {
    case 0: r = ncclAllReduce(ds, dr, a->n, ddp__nccl_type(a->t), ddp__nccl_op(a->op), cu->nccl, cu->comm); break;
    case 1: r = ncclBroadcast(ds, dr, a->n, ncclUint8, a->root, cu->nccl, cu->comm); break;
    case 2: r = ncclAllGather(ds, dr, a->n, ncclUint8, cu->nccl, cu->comm); break;
    default: r = ncclReduceScatter(ds, dr, a->n, ddp__nccl_type(a->t), ddp__nccl_op(a->op), cu->nccl, cu->comm); break;
    }
    if (r == ncclInProgress) ncclCommGetAsyncError(cu->nccl, &r);
    res = ddp__nccl_settle(ctx, r, ctx->cfg.timeout_s, what);
    if (res == DDP_SUCCESS) res = ddp__cuda_wait(ctx, NULL, cu->comm, what);
    if (res == DDP_SUCCESS && !dev_recv && cudaMemcpy(a->recv, dr, a->recv_bytes, cudaMemcpyDeviceToHost) != cudaSuccess)
        res = ddp__fail(ctx, DDP_ERROR_CUDA, "%s: copying the result back to the host failed", what);
    if (!dev_send) ddp__free_device(ctx, ds);
    if (!dev_recv && dr != ds) ddp__free_device(ctx, dr);
    return res;
}

static ddp_result ddp__nccl_allreduce(ddp_context *ctx, void *buf, size_t n, ddp_dtype t, ddp_op op) {
    ddp__nccl_args a;
    memset(&a, 0, sizeof a);
    a.send = buf; a.recv = buf; a.n = n; a.t = t; a.op = op; a.kind = 0;
    a.send_bytes = a.recv_bytes = n * ddp_dtype_size(t);
    return ddp__nccl_run(ctx, &a, "NCCL all-reduce");
}
static ddp_result ddp__nccl_broadcast(ddp_context *ctx, void *buf, size_t bytes, int root) {
    ddp__nccl_args a;
    memset(&a, 0, sizeof a);
    a.send = buf; a.recv = buf; a.n = bytes; a.root = root; a.kind = 1;
    a.send_bytes = a.recv_bytes = bytes;
    return ddp__nccl_run(ctx, &a, "NCCL broadcast");
}
static ddp_result ddp__nccl_allgather(ddp_context *ctx, const void *send, void *recv, size_t bytes) {
    ddp__nccl_args a;
    memset(&a, 0, sizeof a);
    a.send = send; a.recv = recv; a.n = bytes; a.kind = 2;
    a.send_bytes = bytes; a.recv_bytes = bytes * (size_t)ctx->world;
    return ddp__nccl_run(ctx, &a, "NCCL all-gather");
}
static ddp_result ddp__nccl_reduce_scatter(ddp_context *ctx, const void *send, void *recv, size_t n, ddp_dtype t, ddp_op op) {
    ddp__nccl_args a;
    memset(&a, 0, sizeof a);
    a.send = send; a.recv = recv; a.n = n; a.t = t; a.op = op; a.kind = 3;
    a.recv_bytes = n * ddp_dtype_size(t); a.send_bytes = a.recv_bytes * (size_t)ctx->world;
    return ddp__nccl_run(ctx, &a, "NCCL reduce-scatter");
}
static ddp_result ddp__nccl_barrier(ddp_context *ctx, const char *what) {
    int32_t one = 1;
    (void)what;
    return ddp__nccl_allreduce(ctx, &one, 1, DDP_I32, DDP_OP_SUM);
}

static const ddp__backend_ops ddp__nccl_ops = {
    "nccl",
    ddp__nccl_allreduce,
    ddp__nccl_broadcast,
    ddp__nccl_allgather,
    ddp__nccl_reduce_scatter,
    ddp__nccl_barrier,
    NULL
};
#endif

/* ---- staged operations: device buffers through host memory and shm ---- */

typedef ddp_result (*ddp__host_fn)(ddp_context *ctx, void *host_recv, const void *host_send);

static ddp_result ddp__staged_allreduce(ddp_context *ctx, void *buf, size_t n, ddp_dtype t, ddp_op op) {
    size_t bytes = n * ddp_dtype_size(t);
    void *h;
    ddp_result r;
    if (!ddp__is_device_ptr(buf)) return ddp__shm_allreduce(ctx, buf, n, t, op);
    h = ddp__alloc(ctx, bytes);
    if (!h) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "staged all-reduce: no host memory for %zu bytes", bytes);
    r = cudaMemcpy(h, buf, bytes, cudaMemcpyDeviceToHost) == cudaSuccess ? DDP_SUCCESS
        : ddp__fail(ctx, DDP_ERROR_CUDA, "staged all-reduce: device to host copy failed");
    if (r == DDP_SUCCESS) r = ddp__shm_allreduce(ctx, h, n, t, op);
    if (r == DDP_SUCCESS && cudaMemcpy(buf, h, bytes, cudaMemcpyHostToDevice) != cudaSuccess)
        r = ddp__fail(ctx, DDP_ERROR_CUDA, "staged all-reduce: host to device copy failed");
    ddp__free(ctx, h);
    return r;
}

static ddp_result ddp__staged_broadcast(ddp_context *ctx, void *buf, size_t bytes, int root) {
    void *h;
    ddp_result r;
    if (!ddp__is_device_ptr(buf)) return ddp__shm_broadcast(ctx, buf, bytes, root);
    h = ddp__alloc(ctx, bytes);
    if (!h) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "staged broadcast: no host memory for %zu bytes", bytes);
    r = cudaMemcpy(h, buf, bytes, cudaMemcpyDeviceToHost) == cudaSuccess ? DDP_SUCCESS
        : ddp__fail(ctx, DDP_ERROR_CUDA, "staged broadcast: device to host copy failed");
    if (r == DDP_SUCCESS) r = ddp__shm_broadcast(ctx, h, bytes, root);
    if (r == DDP_SUCCESS && cudaMemcpy(buf, h, bytes, cudaMemcpyHostToDevice) != cudaSuccess)
        r = ddp__fail(ctx, DDP_ERROR_CUDA, "staged broadcast: host to device copy failed");
    ddp__free(ctx, h);
    return r;
}

static ddp_result ddp__staged_allgather(ddp_context *ctx, const void *send, void *recv, size_t bytes) {
    int ds = ddp__is_device_ptr(send), dr = ddp__is_device_ptr(recv);
    void *hs = (void *)send, *hr = recv;
    ddp_result r = DDP_SUCCESS;
    if (ds && !(hs = ddp__alloc(ctx, bytes))) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "staged all-gather: no host memory");
    if (dr && !(hr = ddp__alloc(ctx, bytes * (size_t)ctx->world))) { if (ds) ddp__free(ctx, hs); return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "staged all-gather: no host memory"); }
    if (ds && cudaMemcpy(hs, send, bytes, cudaMemcpyDeviceToHost) != cudaSuccess) r = ddp__fail(ctx, DDP_ERROR_CUDA, "staged all-gather: copy failed");
    if (r == DDP_SUCCESS) r = ddp__shm_allgather(ctx, hs, hr, bytes);
    if (r == DDP_SUCCESS && dr && cudaMemcpy(recv, hr, bytes * (size_t)ctx->world, cudaMemcpyHostToDevice) != cudaSuccess)
        r = ddp__fail(ctx, DDP_ERROR_CUDA, "staged all-gather: copy failed");
    if (ds) ddp__free(ctx, hs);
    if (dr) ddp__free(ctx, hr);
    return r;
}

static ddp_result ddp__staged_reduce_scatter(ddp_context *ctx, const void *send, void *recv, size_t n, ddp_dtype t, ddp_op op) {
    size_t es = ddp_dtype_size(t), sb = n * es * (size_t)ctx->world;
    int ds = ddp__is_device_ptr(send), dr = ddp__is_device_ptr(recv);
    void *hs = (void *)send, *hr = recv;
    ddp_result r = DDP_SUCCESS;
    if (ds && !(hs = ddp__alloc(ctx, sb))) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "staged reduce-scatter: no host memory");
    if (dr && !(hr = ddp__alloc(ctx, n * es))) { if (ds) ddp__free(ctx, hs); return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "staged reduce-scatter: no host memory"); }
    if (ds && cudaMemcpy(hs, send, sb, cudaMemcpyDeviceToHost) != cudaSuccess) r = ddp__fail(ctx, DDP_ERROR_CUDA, "staged reduce-scatter: copy failed");
    if (r == DDP_SUCCESS) r = ddp__shm_reduce_scatter(ctx, hs, hr, n, t, op);
    if (r == DDP_SUCCESS && dr && cudaMemcpy(recv, hr, n * es, cudaMemcpyHostToDevice) != cudaSuccess)
        r = ddp__fail(ctx, DDP_ERROR_CUDA, "staged reduce-scatter: copy failed");
    if (ds) ddp__free(ctx, hs);
    if (dr) ddp__free(ctx, hr);
    return r;
}

/* On the communication thread: wait for the bucket's gradients, copy them to
   this rank's slice of the shared segment, reduce, copy back. */
static ddp_result ddp__staged_bucket_reduce(ddp_context *ctx, int b, double scale) {
    struct ddp__cuda_state *cu = ctx->cuda;
    const ddp__bucket *bk = &ctx->buckets[b];
    unsigned char *host = ctx->shm.grads + (size_t)ctx->rank * ctx->shm.grad_stride + bk->offset;
    char what[96];
    int i;
    snprintf(what, sizeof what, "staged all-reduce of gradient bucket %d", b);
    for (i = 0; i < ctx->num_params; i++)
        if (ctx->params[i].bucket == b && ctx->params[i].evrec) DDP__CU(ctx, cudaStreamWaitEvent(cu->comm, cu->ready[i], 0), what);
    DDP__CU(ctx, cudaMemcpyAsync(host, ctx->flat_grads + bk->offset, bk->bytes, cudaMemcpyDeviceToHost, cu->comm), what);
    DDP__TRY(ddp__cuda_wait(ctx, NULL, cu->comm, what));
    if (ctx->world > 1) DDP__TRY(ddp__shm_allreduce_inplace(ctx, bk->offset, bk->numel, bk->dtype, DDP_OP_SUM, scale, what));
    else if (scale != 1.0) { void *p = host; ddp__reduce(&p, 1, &p, 1, bk->numel, bk->dtype, DDP_OP_SUM, scale); }
    DDP__CU(ctx, cudaMemcpyAsync(ctx->flat_grads + bk->offset, host, bk->bytes, cudaMemcpyHostToDevice, cu->comm), what);
    DDP__CU(ctx, cudaEventRecord(cu->done[b], cu->comm), what);
    DDP__CU(ctx, cudaEventRecord(cu->last, cu->comm), what);
    /* the host slice is reused by the next bucket only after this copy: wait here */
    return ddp__cuda_wait(ctx, cu->done[b], NULL, what);
}

static const ddp__backend_ops ddp__staged_ops = {
    "staged",
    ddp__staged_allreduce,
    ddp__staged_broadcast,
    ddp__staged_allgather,
    ddp__staged_reduce_scatter,
    ddp__shm_barrier,
    ddp__staged_bucket_reduce
};

/* ---- a world of one on the GPU: every collective is the identity ---- */

static ddp_result ddp__solo_allreduce(ddp_context *ctx, void *buf, size_t n, ddp_dtype t, ddp_op op) {
    (void)ctx; (void)buf; (void)n; (void)t; (void)op; /* sum, average, max, min of one value: itself */
    return DDP_SUCCESS;
}
static ddp_result ddp__solo_broadcast(ddp_context *ctx, void *buf, size_t bytes, int root) {
    (void)ctx; (void)buf; (void)bytes; (void)root;
    return DDP_SUCCESS;
}
static ddp_result ddp__solo_copy(ddp_context *ctx, void *dst, const void *src, size_t bytes) {
    if (dst != src) DDP__CU(ctx, cudaMemcpy(dst, src, bytes, cudaMemcpyDefault), "copying the only rank's block");
    return DDP_SUCCESS;
}
static ddp_result ddp__solo_allgather(ddp_context *ctx, const void *send, void *recv, size_t bytes) {
    return ddp__solo_copy(ctx, recv, send, bytes);
}
static ddp_result ddp__solo_reduce_scatter(ddp_context *ctx, const void *send, void *recv, size_t n, ddp_dtype t, ddp_op op) {
    (void)op;
    return ddp__solo_copy(ctx, recv, send, n * ddp_dtype_size(t));
}
static ddp_result ddp__solo_barrier(ddp_context *ctx, const char *what) {
    (void)ctx; (void)what;
    return DDP_SUCCESS;
}

static const ddp__backend_ops ddp__solo_ops = {
    "solo",
    ddp__solo_allreduce,
    ddp__solo_broadcast,
    ddp__solo_allgather,
    ddp__solo_reduce_scatter,
    ddp__solo_barrier,
    NULL
};

/* ---- set-up -------------------------------------------------------------------- */

static ddp_result ddp__cuda_setup(ddp_context *ctx) {
    int count = 0, dev;
    cudaError_t e = cudaGetDeviceCount(&count);
    struct ddp__cuda_state *cu;
    if (e != cudaSuccess) { (void)cudaGetLastError(); count = 0; }
    if (ctx->cfg.device == DDP_DEVICE_DEFAULT) ctx->cfg.device = count > 0 ? DDP_DEVICE_CUDA : DDP_DEVICE_CPU;
    if (ctx->cfg.device == DDP_DEVICE_CPU) {
        if (ctx->cfg.backend == DDP_BACKEND_NCCL || ctx->cfg.backend == DDP_BACKEND_STAGED)
            return ddp__fail(ctx, DDP_ERROR_UNSUPPORTED, "backend '%s' needs parameters on the GPU, but the context uses the CPU%s",
                             ddp_backend_name(ctx->cfg.backend), count == 0 ? " (no CUDA device found)" : "");
        ctx->cfg.backend = DDP_BACKEND_SHM;
        return DDP_SUCCESS;
    }
    if (count == 0)
        return ddp__fail(ctx, DDP_ERROR_CUDA, "config.device is DDP_DEVICE_CUDA but no CUDA device is available (%s)",
                         e == cudaSuccess ? "0 devices" : cudaGetErrorString(e));
    if (ctx->cfg.backend == DDP_BACKEND_DEFAULT || ctx->cfg.backend == DDP_BACKEND_SHM) {
#if defined(DDP_NCCL)
        ctx->cfg.backend = ctx->cfg.backend == DDP_BACKEND_SHM ? DDP_BACKEND_STAGED : DDP_BACKEND_NCCL;
#else
        ctx->cfg.backend = DDP_BACKEND_STAGED;
#endif
    }
#if !defined(DDP_NCCL)
    if (ctx->cfg.backend == DDP_BACKEND_NCCL)
        return ddp__fail(ctx, DDP_ERROR_UNSUPPORTED, "backend 'nccl' requested but this implementation was compiled without NCCL (DDP_NO_NCCL)");
#endif
    if (ctx->cfg.cuda_device > 0) dev = ctx->cfg.cuda_device - 1;
    else if (ctx->cfg.backend == DDP_BACKEND_NCCL) dev = ctx->local_rank;
    else dev = ctx->local_rank % count; /* staged: several ranks may share a GPU */
    if (dev >= count)
        return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT,
                         "rank %d wants GPU %d but this host has %d; NCCL needs one GPU per rank (use the staged backend to share one)",
                         ctx->rank, dev, count);
    cu = (struct ddp__cuda_state *)ddp__calloc(ctx, sizeof *cu);
    if (!cu) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory for the CUDA state");
    ctx->cuda = cu;
    cu->device = dev;
    {
        const char *force = getenv("DDP_FORCE_COMM");
        cu->solo = ctx->world == 1 && !(force && *force && strcmp(force, "0") != 0);
    }
    DDP__CU(ctx, cudaSetDevice(dev), "selecting the GPU");
    DDP__CU(ctx, cudaStreamCreateWithFlags(&cu->comm, cudaStreamNonBlocking), "creating the communication stream");
    DDP__CU(ctx, cudaEventCreateWithFlags(&cu->last, cudaEventDisableTiming), "creating an event");
    cu->scratch_elems = ddp_k_sumsq_scratch_elems();
    cu->d_norm = (float *)ddp__dev_alloc(ctx, sizeof(float) * (cu->scratch_elems + 1));
    if (!cu->d_norm) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "no device memory for the norm scratch");
    cu->d_scratch = cu->d_norm + 1;
    /* a world of one exchanges nothing: no communicator (NCCL's threads cost
       time even when idle), unless DDP_FORCE_COMM asks for the real path */
    if (cu->solo) { ctx->ops = &ddp__solo_ops; return DDP_SUCCESS; }
    if (ctx->cfg.backend == DDP_BACKEND_STAGED) { ctx->ops = &ddp__staged_ops; return DDP_SUCCESS; }
#if defined(DDP_NCCL)
    ctx->ops = &ddp__nccl_ops;
    return ddp__nccl_init(ctx);
#else
    return DDP_SUCCESS;
#endif
}

/* Wait (bounded) until the stream is idle; 0 if it is not. */
static int ddp__stream_idle(cudaStream_t s, double limit_s) {
    double end = ddp__now() + limit_s;
    cudaError_t e;
    while ((e = cudaStreamQuery(s)) == cudaErrorNotReady && ddp__now() < end) ddp__sleep_us(200);
    return e != cudaErrorNotReady;
}

static void ddp__cuda_teardown(ddp_context *ctx) {
    struct ddp__cuda_state *cu = ctx->cuda;
    double limit = ctx->cfg.timeout_s < 10 ? ctx->cfg.timeout_s : 10;
    int i, idle = 1;
#if defined(DDP_NCCL)
    /* a broken context may have a collective stuck on a dead peer: abort first */
    if (cu && ddp__is_broken(ctx)) ddp__nccl_abort(ctx, 0);
#endif
    if (!cu) return;
    if (cu->comm) idle = ddp__stream_idle(cu->comm, limit);
#if defined(DDP_NCCL)
    if (cu->nccl) {
        if (idle && ddp__nccl_ok(ctx)) {
            ncclResult_t r = ncclCommFinalize(cu->nccl);
            double deadline = ddp__now() + limit;
            while (r == ncclInProgress && ddp__now() < deadline) { ddp__sleep_us(100); ncclCommGetAsyncError(cu->nccl, &r); }
            if (r == ncclSuccess) { ncclCommDestroy(cu->nccl); cu->nccl = NULL; }
        }
        ddp__nccl_abort(ctx, 0);
        if (cu->comm) idle = ddp__stream_idle(cu->comm, limit);
    }
#endif
    (void)idle;
    if (cu->ready) { for (i = 0; i < ctx->num_params; i++) if (cu->ready[i]) cudaEventDestroy(cu->ready[i]); ddp__free(ctx, cu->ready); }
    if (cu->done) { for (i = 0; i < ctx->num_buckets; i++) if (cu->done[i]) cudaEventDestroy(cu->done[i]); ddp__free(ctx, cu->done); }
    if (cu->last) cudaEventDestroy(cu->last);
    ddp__free_device(ctx, cu->d_norm);
    ddp__free_device(ctx, cu->compress_buf);
    if (cu->comm) cudaStreamDestroy(cu->comm);
    ddp__free(ctx, cu);
    ctx->cuda = NULL;
}

static ddp_result ddp__cuda_finalize(ddp_context *ctx) {
    struct ddp__cuda_state *cu = ctx->cuda;
    int i;
    size_t maxb = 0;
    ctx->flat_params = (unsigned char *)ddp__dev_alloc(ctx, ctx->flat_bytes);
    ctx->flat_grads = (unsigned char *)ddp__dev_alloc(ctx, ctx->flat_bytes);
    if (!ctx->flat_params || !ctx->flat_grads)
        return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "no device memory for %zu bytes of parameters and gradients", 2 * ctx->flat_bytes);
    DDP__CU(ctx, cudaMemset(ctx->flat_params, 0, ctx->flat_bytes), "zeroing parameters");
    DDP__CU(ctx, cudaMemset(ctx->flat_grads, 0, ctx->flat_bytes), "zeroing gradients");
    for (i = 0; i < ctx->num_params; i++)
        if (ctx->params[i].init)
            DDP__CU(ctx, cudaMemcpy(ctx->flat_params + ctx->params[i].offset, ctx->params[i].init,
                                    ctx->params[i].numel * ddp_dtype_size(ctx->params[i].dtype), cudaMemcpyHostToDevice),
                    "copying initial weights to the GPU");
    DDP__CU(ctx, cudaDeviceSynchronize(), "copying initial weights to the GPU");
    cu->ready = (cudaEvent_t *)ddp__calloc(ctx, (size_t)ctx->num_params * sizeof(cudaEvent_t));
    cu->done = (cudaEvent_t *)ddp__calloc(ctx, (size_t)ctx->num_buckets * sizeof(cudaEvent_t));
    if (!cu->ready || !cu->done) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory for events");
    for (i = 0; i < ctx->num_params; i++) DDP__CU(ctx, cudaEventCreateWithFlags(&cu->ready[i], cudaEventDisableTiming), "creating events");
    for (i = 0; i < ctx->num_buckets; i++) {
        DDP__CU(ctx, cudaEventCreateWithFlags(&cu->done[i], cudaEventDisableTiming), "creating events");
        if (ctx->buckets[i].bytes > maxb) maxb = ctx->buckets[i].bytes;
    }
    if (ctx->cfg.compress == DDP_BF16 || ctx->cfg.compress == DDP_F16) {
        cu->compress_buf = ddp__dev_alloc(ctx, maxb / 2 + 256);
        if (!cu->compress_buf) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "no device memory for the compression buffer");
    }
    if (ctx->cfg.backend == DDP_BACKEND_STAGED) {
        DDP__TRY(ddp__alloc_grad_segment(ctx));
        /* pinned, so the copies are asynchronous DMA; unpinned still works */
        if (cudaHostRegister(ctx->shm.grads + (size_t)ctx->rank * ctx->shm.grad_stride, ctx->flat_bytes, cudaHostRegisterDefault) == cudaSuccess)
            cu->host_registered = 1;
        else (void)cudaGetLastError();
    }
    return DDP_SUCCESS;
}

/* ---- the step on the GPU ---- */

/* Marking only remembers the stream; the bucket's launch (inside the call
   that marks its last parameter) records one event per distinct stream: the
   work queued on a stream so far covers every gradient marked on it. */
static ddp_result ddp__cuda_record_ready(ddp_context *ctx, int id, void *stream) {
    ctx->params[id].stream = stream ? stream : (void *)ddp__ustream(ctx);
    return DDP_SUCCESS;
}

/* Record the bucket's events (main thread); wait for them on the
   communication stream (now, or on the communication thread for staged). */
static ddp_result ddp__cuda_bucket_events(ddp_context *ctx, int b, int wait_now) {
    struct ddp__cuda_state *cu = ctx->cuda;
    int i, j;
    for (i = 0; i < ctx->num_params; i++) {
        ddp__param *p = &ctx->params[i];
        int seen = 0;
        if (p->bucket != b) continue; /* other buckets' flags may still be read by the comm thread */
        p->evrec = 0;
        if (!p->marked) p->stream = (void *)ddp__ustream(ctx); /* unused parameter: nothing of it is pending */
        for (j = 0; j < i && !seen; j++)
            seen = ctx->params[j].bucket == b && ctx->params[j].evrec && ctx->params[j].stream == p->stream;
        if (seen) continue;
        DDP__CU(ctx, cudaEventRecord(cu->ready[i], (cudaStream_t)p->stream), "recording a ready event");
        p->evrec = 1;
        if (wait_now) DDP__CU(ctx, cudaStreamWaitEvent(cu->comm, cu->ready[i], 0), "waiting for a ready event");
    }
    return DDP_SUCCESS;
}

static ddp_result ddp__cuda_launch_bucket(ddp_context *ctx, int b) {
#if defined(DDP_NCCL)
    struct ddp__cuda_state *cu = ctx->cuda;
    const ddp__bucket *bk = &ctx->buckets[b];
    void *g = ctx->flat_grads + bk->offset;
    char what[96];
    ncclResult_t r;
    /* ncclAvg divides by the world; what remains is 1 / micro-steps, fixed at ddp_step_begin() */
    float post = ctx->cfg.gradient_sum ? 1.0f : 1.0f / (float)ctx->q_micro;
    snprintf(what, sizeof what, "NCCL all-reduce of gradient bucket %d (%zu bytes)", b, bk->bytes);
    if (!ddp__nccl_ok(ctx)) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "%s: the communicator was aborted", what);
    DDP__TRY(ddp__cuda_bucket_events(ctx, b, 1));
    if (cu->compress_buf && bk->dtype == DDP_F32) {
        /* scale before the reduce so the 16-bit sum cannot overflow */
        float pre = (float)ctx->q_scale;
        DDP__KL(ctx, ddp_k_cast(cu->compress_buf, (int)ctx->cfg.compress, g, (int)DDP_F32, bk->numel, pre, cu->comm), what);
        r = ncclAllReduce(cu->compress_buf, cu->compress_buf, bk->numel, ddp__nccl_type(ctx->cfg.compress), ncclSum, cu->nccl, cu->comm);
        if (r == ncclInProgress) ncclCommGetAsyncError(cu->nccl, &r);
        DDP__TRY(ddp__nccl_settle(ctx, r, ctx->cfg.timeout_s, what));
        DDP__KL(ctx, ddp_k_cast(g, (int)DDP_F32, cu->compress_buf, (int)ctx->cfg.compress, bk->numel, 1.0f, cu->comm), what);
    } else {
        r = ncclAllReduce(g, g, bk->numel, ddp__nccl_type(bk->dtype), ctx->cfg.gradient_sum ? ncclSum : ncclAvg, cu->nccl, cu->comm);
        if (r == ncclInProgress) ncclCommGetAsyncError(cu->nccl, &r);
        DDP__TRY(ddp__nccl_settle(ctx, r, ctx->cfg.timeout_s, what));
        if (post != 1.0f) {
            if (bk->dtype != DDP_F32)
                return ddp__fail(ctx, DDP_ERROR_UNSUPPORTED, "%s: gradient accumulation on the GPU needs f32 gradients", what);
            DDP__KL(ctx, ddp_k_scale((float *)g, bk->numel, post, cu->comm), what);
        }
    }
    DDP__CU(ctx, cudaEventRecord(cu->done[b], cu->comm), what);
    DDP__CU(ctx, cudaEventRecord(cu->last, cu->comm), what);
    pthread_mutex_lock(&ctx->mu);
    cu->inflight = 1;
    cu->inflight_since = ddp__now();
    ddp__copy_str(cu->inflight_what, sizeof cu->inflight_what, what);
    pthread_cond_signal(&ctx->cv_work);
    pthread_mutex_unlock(&ctx->mu);
    return DDP_SUCCESS;
#else
    (void)b;
    return ddp__fail(ctx, DDP_ERROR_UNSUPPORTED, "NCCL is not compiled in");
#endif
}

/* A world of one reduces nothing: the gradients are already the average.
   Join the streams the gradients were marked on, and scale for accumulation. */
static ddp_result ddp__cuda_solo_end(ddp_context *ctx, cudaStream_t s) {
    struct ddp__cuda_state *cu = ctx->cuda;
    int i, j, b;
    for (i = 0; i < ctx->num_params; i++) {
        int seen;
        if (!ctx->params[i].marked) ctx->params[i].stream = (void *)s;
        seen = (cudaStream_t)ctx->params[i].stream == s;
        for (j = 0; j < i && !seen; j++) seen = ctx->params[j].stream == ctx->params[i].stream;
        if (seen) continue;
        DDP__CU(ctx, cudaEventRecord(cu->ready[i], (cudaStream_t)ctx->params[i].stream), "joining streams");
        DDP__CU(ctx, cudaStreamWaitEvent(s, cu->ready[i], 0), "joining streams");
    }
    if (ctx->q_micro > 1 && !ctx->cfg.gradient_sum)
        for (b = 0; b < ctx->num_buckets; b++) {
            if (ctx->buckets[b].dtype != DDP_F32)
                return ddp__fail(ctx, DDP_ERROR_UNSUPPORTED, "gradient accumulation on the GPU needs f32 gradients (bucket %d is %s)",
                                 b, ddp_dtype_name(ctx->buckets[b].dtype));
            DDP__KL(ctx, ddp_k_scale((float *)(ctx->flat_grads + ctx->buckets[b].offset), ctx->buckets[b].numel,
                                     1.0f / (float)ctx->q_micro, s), "scaling accumulated gradients");
        }
    return DDP_SUCCESS;
}

static ddp_result ddp__cuda_step_end(ddp_context *ctx, void *stream) {
    cudaStream_t s = stream ? (cudaStream_t)stream : ddp__ustream(ctx);
    if (ctx->cuda->solo) {
        DDP__TRY(ddp__cuda_solo_end(ctx, s));
        if (s != ddp__ustream(ctx)) { /* the optimizer runs on the user's stream */
            DDP__CU(ctx, cudaEventRecord(ctx->cuda->last, s), "joining streams");
            DDP__CU(ctx, cudaStreamWaitEvent(ddp__ustream(ctx), ctx->cuda->last, 0), "joining streams");
        }
        return DDP_SUCCESS;
    }
    DDP__CU(ctx, cudaStreamWaitEvent(s, ctx->cuda->last, 0), "making the stream wait for the all-reduce");
    if (s != ddp__ustream(ctx)) DDP__CU(ctx, cudaStreamWaitEvent(ddp__ustream(ctx), ctx->cuda->last, 0), "making the stream wait for the all-reduce");
    return DDP_SUCCESS;
}

static int ddp__cuda_solo(const ddp_context *ctx) { return ctx->cuda && ctx->cuda->solo; }

DDP_API ddp_result ddp_synchronize(ddp_context *ctx) {
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    DDP__TRY(ddp__check_usable(ctx, "ddp_synchronize"));
    if (!ddp__on_gpu(ctx)) return DDP_SUCCESS;
    DDP__TRY(ddp__cuda_wait(ctx, ctx->cuda->last, NULL, "waiting for the gradient all-reduce"));
    return ddp__cuda_wait(ctx, NULL, ddp__ustream(ctx), "waiting for the user stream");
}

/* The NCCL watchdog: runs as the communication thread. */
static void ddp__nccl_watchdog(ddp_context *ctx) {
    struct ddp__cuda_state *cu = ctx->cuda;
    cudaSetDevice(cu->device);
    pthread_mutex_lock(&ctx->mu);
    while (!ctx->q_stop) {
        double since;
        char what[96];
        cudaError_t e;
        if (!cu->inflight) { pthread_cond_wait(&ctx->cv_work, &ctx->mu); continue; }
        since = cu->inflight_since;
        memcpy(what, cu->inflight_what, sizeof what);
        pthread_mutex_unlock(&ctx->mu);
        e = cudaEventQuery(cu->last);
        pthread_mutex_lock(&ctx->mu);
        if (e == cudaSuccess) { if (cu->inflight_since == since) cu->inflight = 0; continue; }
        {
            int late = ddp__now() - since > ctx->cfg.timeout_s;
            ddp_result code;
#if defined(DDP_NCCL)
            ncclResult_t nr = ncclSuccess;
            if (ddp__nccl_ok(ctx)) ncclCommGetAsyncError(cu->nccl, &nr);
            if (e == cudaErrorNotReady && !late && (nr == ncclSuccess || nr == ncclInProgress)) {
                pthread_mutex_unlock(&ctx->mu);
                ddp__sleep_us(1000);
                pthread_mutex_lock(&ctx->mu);
                continue;
            }
            if (e == cudaErrorNotReady && !late)
                code = ddp__fail(ctx, DDP_ERROR_NCCL, "%s failed: %s; NCCL communicator aborted by the watchdog", what, ncclGetErrorString(nr));
            else
#endif
            if (e == cudaErrorNotReady)
                code = ddp__fail(ctx, DDP_ERROR_TIMEOUT, "%s did not finish within %.1f s; NCCL communicator aborted by the watchdog", what, ctx->cfg.timeout_s);
            else
                code = ddp__fail(ctx, DDP_ERROR_CUDA, "%s failed: %s", what, cudaGetErrorString(e));
            /* failed or too late: abort so that nothing waits forever */
#if defined(DDP_NCCL)
            ddp__nccl_abort(ctx, 1);
#endif
            ddp__set_broken(ctx, code);
            cu->inflight = 0;
        }
    }
    pthread_mutex_unlock(&ctx->mu);
}

/* Start of the communication thread: select the device; 1 when this thread
   is the NCCL watchdog (and has finished). */
static int ddp__cuda_comm_thread(ddp_context *ctx) {
    if (!ctx->cuda) return 0;
    if (ctx->cfg.backend == DDP_BACKEND_NCCL) { ddp__nccl_watchdog(ctx); return 1; }
    cudaSetDevice(ctx->cuda->device);
    return 0;
}

static ddp_result ddp__cuda_zero_grads(ddp_context *ctx) {
    DDP__CU(ctx, cudaMemsetAsync(ctx->flat_grads, 0, ctx->flat_bytes, ddp__ustream(ctx)), "zeroing gradients");
    return DDP_SUCCESS;
}

static ddp_result ddp__cuda_sumsq(ddp_context *ctx, double *out) {
    struct ddp__cuda_state *cu = ctx->cuda;
    double s = 0;
    int b;
    for (b = 0; b < ctx->num_buckets; b++) {
        const ddp__bucket *bk = &ctx->buckets[b];
        float v = 0;
        DDP__KL(ctx, ddp_k_sumsq_typed(ctx->flat_grads + bk->offset, (int)bk->dtype, bk->numel, cu->d_norm,
                                       cu->d_scratch, cu->scratch_elems, ddp__ustream(ctx)), "gradient norm");
        DDP__CU(ctx, cudaMemcpyAsync(&v, cu->d_norm, sizeof v, cudaMemcpyDeviceToHost, ddp__ustream(ctx)), "gradient norm");
        DDP__TRY(ddp__cuda_wait(ctx, NULL, ddp__ustream(ctx), "gradient norm"));
        s += v;
    }
    *out = s;
    return DDP_SUCCESS;
}

static ddp_result ddp__cuda_scale_grads(ddp_context *ctx, float f) {
    int b;
    for (b = 0; b < ctx->num_buckets; b++) {
        const ddp__bucket *bk = &ctx->buckets[b];
        if (bk->dtype != DDP_F32) return ddp__fail(ctx, DDP_ERROR_UNSUPPORTED, "clipping 16-bit gradients on the GPU is not supported yet");
        DDP__KL(ctx, ddp_k_scale((float *)(ctx->flat_grads + bk->offset), bk->numel, f, ddp__ustream(ctx)), "clipping");
    }
    return DDP_SUCCESS;
}

static ddp_result ddp__cuda_state_alloc(ddp_context *ctx, void **slot) {
    *slot = ddp__dev_alloc(ctx, ctx->opt_state_bytes);
    if (!*slot) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "no device memory for %zu bytes of optimizer state", ctx->opt_state_bytes);
    return ddp__cuda_zero(ctx, *slot, ctx->opt_state_bytes);
}

static ddp_result ddp__cuda_zero(ddp_context *ctx, void *p, size_t bytes) {
    DDP__CU(ctx, cudaMemsetAsync(p, 0, bytes, ddp__ustream(ctx)), "zeroing optimizer state");
    return DDP_SUCCESS;
}

static ddp_result ddp__cuda_init_master(ddp_context *ctx) {
    int b;
    for (b = 0; b < ctx->num_buckets; b++)
        if (ctx->buckets[b].dtype != DDP_F32)
            DDP__KL(ctx, ddp_k_cast((unsigned char *)ctx->opt_master + ctx->opt_state_off[b], (int)DDP_F32,
                                    ctx->flat_params + ctx->buckets[b].offset, (int)ctx->buckets[b].dtype,
                                    ctx->buckets[b].numel, 1.0f, ddp__ustream(ctx)), "initialising master weights");
    return DDP_SUCCESS;
}

static ddp_result ddp__cuda_optimizer_step(ddp_context *ctx, float clip) {
    const ddp_optimizer_desc *o = &ctx->cfg.optimizer;
    cudaStream_t s = ddp__ustream(ctx);
    int b;
    if (clip != 1.0f) DDP__TRY(ddp__cuda_scale_grads(ctx, clip));
    for (b = 0; b < ctx->num_buckets; b++) {
        const ddp__bucket *bk = &ctx->buckets[b];
        void *p = ctx->flat_params + bk->offset, *g = ctx->flat_grads + bk->offset;
        float *m = ctx->opt_m ? (float *)((unsigned char *)ctx->opt_m + ctx->opt_state_off[b]) : NULL;
        float *v = ctx->opt_v ? (float *)((unsigned char *)ctx->opt_v + ctx->opt_state_off[b]) : NULL;
        float *master = ctx->opt_master ? (float *)((unsigned char *)ctx->opt_master + ctx->opt_state_off[b]) : NULL;
        int t = (int)ctx->opt_steps;
        if (bk->dtype == DDP_F32) {
            if (o->type == DDP_OPTIM_SGD)
                DDP__KL(ctx, ddp_k_sgd((float *)p, (const float *)g, m, bk->numel, o->lr, o->momentum, o->weight_decay, o->nesterov, t == 1, s), "SGD step");
            else
                DDP__KL(ctx, ddp_k_adamw((float *)p, (const float *)g, m, v, bk->numel, o->lr, o->beta1, o->beta2, o->eps, o->weight_decay, t, s), "AdamW step");
        } else {
            if (o->type == DDP_OPTIM_SGD)
                DDP__KL(ctx, ddp_k_sgd_mixed(p, (int)bk->dtype, master, g, (int)bk->dtype, m, bk->numel, o->lr, o->momentum,
                                             o->weight_decay, o->nesterov, t == 1, s), "SGD step (mixed precision)");
            else
                DDP__KL(ctx, ddp_k_adamw_mixed(p, (int)bk->dtype, master, g, (int)bk->dtype, m, v, bk->numel, o->lr, o->beta1,
                                               o->beta2, o->eps, o->weight_decay, t, s), "AdamW step (mixed precision)");
        }
    }
    return DDP_SUCCESS;
}

/* Blocking copy (checkpoints): the device must hold the data before any
   stream uses it, whatever stream that is. */
static ddp_result ddp__cuda_memcpy(ddp_context *ctx, void *dst, const void *src, size_t bytes, int to_device) {
    DDP__CU(ctx, cudaDeviceSynchronize(), "copying a checkpoint");
    DDP__CU(ctx, cudaMemcpy(dst, src, bytes, to_device ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost), "copying a checkpoint");
    DDP__CU(ctx, cudaDeviceSynchronize(), "copying a checkpoint");
    return DDP_SUCCESS;
}

#endif /* DDP_CUDA */

/* ---- CPU-only build: the CUDA hooks are never reached ----------------------------- */
#if !defined(DDP_CUDA)
static ddp_result ddp__cuda_setup(ddp_context *ctx) { (void)ctx; return DDP_SUCCESS; }
static void ddp__cuda_teardown(ddp_context *ctx) { (void)ctx; }
static void ddp__free_flat_grads(ddp_context *ctx) { (void)ctx; }
static void ddp__free_device(ddp_context *ctx, void *p) { (void)ctx; (void)p; }
static ddp_result ddp__cuda_unreachable(ddp_context *ctx) {
    return ddp__fail(ctx, DDP_ERROR_UNSUPPORTED, "a CUDA path was reached in a build without CUDA");
}
static ddp_result ddp__cuda_finalize(ddp_context *ctx) { return ddp__cuda_unreachable(ctx); }
static ddp_result ddp__cuda_launch_bucket(ddp_context *ctx, int b) { (void)b; return ddp__cuda_unreachable(ctx); }
static ddp_result ddp__cuda_record_ready(ddp_context *ctx, int id, void *s) { (void)id; (void)s; return ddp__cuda_unreachable(ctx); }
static ddp_result ddp__cuda_step_end(ddp_context *ctx, void *s) { (void)s; return ddp__cuda_unreachable(ctx); }
static ddp_result ddp__cuda_optimizer_step(ddp_context *ctx, float f) { (void)f; return ddp__cuda_unreachable(ctx); }
static ddp_result ddp__cuda_sumsq(ddp_context *ctx, double *o) { (void)o; return ddp__cuda_unreachable(ctx); }
static ddp_result ddp__cuda_scale_grads(ddp_context *ctx, float s) { (void)s; return ddp__cuda_unreachable(ctx); }
static ddp_result ddp__cuda_zero_grads(ddp_context *ctx) { return ddp__cuda_unreachable(ctx); }
static ddp_result ddp__cuda_state_alloc(ddp_context *ctx, void **slot) { (void)slot; return ddp__cuda_unreachable(ctx); }
static ddp_result ddp__cuda_init_master(ddp_context *ctx) { return ddp__cuda_unreachable(ctx); }
static ddp_result ddp__cuda_zero(ddp_context *ctx, void *p, size_t n) { (void)p; (void)n; return ddp__cuda_unreachable(ctx); }
static ddp_result ddp__cuda_memcpy(ddp_context *ctx, void *d, const void *s, size_t n, int k) {
    (void)d; (void)s; (void)n; (void)k; return ddp__cuda_unreachable(ctx);
}
DDP_API ddp_result ddp_set_stream(ddp_context *ctx, void *stream) {
    (void)stream;
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    return ddp__fail(ctx, DDP_ERROR_UNSUPPORTED, "ddp_set_stream: the context keeps parameters on the CPU");
}
DDP_API ddp_result ddp_synchronize(ddp_context *ctx) {
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    return ddp__check_usable(ctx, "ddp_synchronize");
}
#endif

#ifdef __cplusplus
}
#endif

#endif /* DDP__IMPLEMENTED */
#endif /* DDP_IMPLEMENTATION */

/*
------------------------------------------------------------------------------
LICENSE

MIT License

Copyright (c) 2026 the ddp.h authors

Permission is hereby granted, free of charge, to any person obtaining a copy of
this software and associated documentation files (the "Software"), to deal in
the Software without restriction, including without limitation the rights to
use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies
of the Software, and to permit persons to whom the Software is furnished to do
so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
------------------------------------------------------------------------------
*/
