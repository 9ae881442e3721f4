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
   not implemented yet.

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

       shm     processes on one host through POSIX shared memory. The CPU
               default. The flat gradient buffer lives in the shared segment,
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

   THREAD SAFETY

       A context is used by one thread at a time (the library runs its own
       communication thread inside). Different contexts are independent.

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
*/
#ifndef DDP_H_INCLUDED
#define DDP_H_INCLUDED

#include <stddef.h>
#include <stdint.h>

#ifndef DDP_API
#  ifdef DDP_STATIC
#    define DDP_API static
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
    DDP_ERROR_USER             = -15  /* your callback returned an error */
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
    size_t staging_bytes;     /* shm: per-rank staging for user buffers, default 16 MiB */

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

/* Rank 0 writes parameters and optimizer state atomically (temporary file,
   fsync, rename; with a checksum); all ranks wait for it. */
DDP_API ddp_result ddp_save_checkpoint(ddp_context *ctx, const char *path);
/* Every rank reads the file, verifies checksum, names, shapes and dtypes. */
DDP_API ddp_result ddp_load_checkpoint(ddp_context *ctx, const char *path);

#ifdef __cplusplus
}
#endif
#endif /* DDP_H_INCLUDED */
