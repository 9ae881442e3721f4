/* ddp.h - v0.2.0 - data-parallel training for C and C++ programs
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
                            DDP_NO_NCCL is defined; always off on Windows,
                            where NCCL does not exist)
       DDP_ASSERT(c)        your assert (default: assert from <assert.h>)
       DDP_WIN32_MSVC_ATOMICS  mingw-w64: use the MSVC atomics (_Interlocked*
                            and barriers) instead of the GCC builtins, as an
                            MSVC build does (CI runs that branch this way)

   LINK LINES

       Linux, CPU only:   cc  -O2 app.c -lpthread -lrt -lm
       Linux, CUDA:       nvcc -O2 impl.cu app.c -lnccl -lcudart -lpthread -lrt
                          (other files of a C project keep being compiled by
                          their own C compiler: the declarations below have no
                          CUDA types)
       Windows, MSVC:     cl /O2 app.c ws2_32.lib advapi32.lib
                          (the implementation also asks for both with
                          #pragma comment(lib))
       Windows, mingw-w64: gcc -std=c99 -O2 app.c -lws2_32 -ladvapi32
       Windows, CUDA:     nvcc -O2 impl.cu app.c cudart.lib ws2_32.lib advapi32.lib
                          (no NCCL: the staged backend, below)

   BUILD SYSTEMS

       The three headers are all there is; copy them, or install them:
           cmake -B build && cmake --install build --prefix P
       puts ddp.h, dp.h and ddp_kernels.cuh in P/include, the CMake package
       in P/share/cmake/ddp, ddp.pc in P/share/pkgconfig, ddprun in P/bin.
       CMake (installed, add_subdirectory or FetchContent alike):
           find_package(ddp 0.2 CONFIG REQUIRED)      # not for subdirectories
           target_link_libraries(app PRIVATE ddp::ddp)
       ddp::cuda (find_package(... COMPONENTS cuda)) is for a program whose
       implementation file is a .cu: it adds the CUDA runtime and NCCL (or
       DDP_NO_NCCL where NCCL is missing), found on the consumer's machine.
       pkg-config:  cc app.c $(pkg-config --cflags --libs ddp)
       A version request accepts the same MAJOR.MINOR before 1.0.

   PLATFORMS

       Linux (tested), other POSIX systems, and Windows (the Vista API level,
       _WIN32_WINNT >= 0x0600; MSVC, clang-cl, mingw-w64). The operating system is used in one
       section of the implementation (search for PLATFORM): threads, locks,
       atomics, clock, sockets, shared memory, processes, file replacement.
       On Windows:
       - shared memory between ranks is a paging-file-backed named mapping
         (CreateFileMapping), readable and writable by the current user only
         (a DACL with one entry; hence advapi32) under a random name
         "Local\ddp-<pid>-<n>-<what>-<96 random bits>"; it vanishes with the
         last process that maps it, so nothing is left whatever kills a rank;
         rank 0 keeps a handle on each name until every rank has mapped it
         (at most 64 such names per process at once, DDP__SHM_KEEP: a
         context needs one or two, during its set-up only);
       - Winsock is started (WSAStartup) by every ddp_create() of a world
         larger than one and stopped by its ddp_destroy(); dp_create() too;
       - a rank that exits is seen through OpenProcess/WaitForSingleObject;
       - checkpoints are replaced with MoveFileEx(MOVEFILE_REPLACE_EXISTING |
         MOVEFILE_WRITE_THROUGH); paths are in the ANSI code page;
       - the implementation includes <winsock2.h> and <windows.h> with
         WIN32_LEAN_AND_MEAN: in the file that defines DDP_IMPLEMENTATION,
         include ddp.h before <windows.h> (or define WIN32_LEAN_AND_MEAN), as
         <windows.h> alone pulls in the old <winsock.h>;
       - NCCL does not exist: CUDA builds use the staged backend between
         processes (ddp.h) and dp.h within one;
       - rank 0's store listens with SO_EXCLUSIVEADDRUSE (see SECURITY);
         Windows keeps such a port taken while connections the listener
         accepted are still open, even after the listener closed;
       - the local launcher is ddprun.exe (tools/ddprun_win.c): the same
         command line and behaviour as ddprun (a new DDP_JOB_SECRET and
         DDP_JOB_ID per run included), with job objects.
       Verified: mingw-w64 builds under Wine (CI). Not verified: real
       Windows, an MSVC compile, Windows GPUs.

   STEP BY STEP

       1. Fill a ddp_config (zero means default) and call ddp_create(). Rank and
          world size come from the environment that torchrun, ddprun (this
          project's launcher), mpirun or srun set, or from the config. The
          optimizer: cfg.optimizer = ddp_optimizer_defaults(DDP_OPTIM_ADAMW)
          gives PyTorch's defaults; change what you need (OPTIMIZERS). A
          schedule (cfg.schedule), loss scaling (cfg.loss_scale), uneven
          inputs (cfg.uneven_inputs) and a sharded optimizer
          (cfg.zero_stage, see ZERO) are further fields.
       2. Register every parameter once, in forward order:
              ddp_register_param(ctx, "fc1.weight", 784*256, DDP_F32, init, &id)
          optionally give it options (no weight decay for biases, an lr
          scale: ddp_set_param_options, see PARAMETER GROUPS), then call
          ddp_finalize(ctx): the library allocates one flat parameter
          buffer and one flat gradient buffer, checks that every rank
          registered the same parameters and uses the same configuration
          (see AGREEMENT), and copies rank 0's weights to all.
       3. Each step:
              ddp_step_begin(ctx);
              ... your forward ...
              ... your backward: ADD each gradient into ddp_param_grad(ctx, id)
                  (of the loss times ddp_loss_scale(ctx) with loss scaling)
                  and call ddp_mark_ready(ctx, id) as soon as it is final ...
              ddp_step_end(ctx);           // gradients are now averaged
              ddp_optimizer_step(ctx);     // SGD or AdamW, at the scheduled lr
          or let ddp_train_step() do all of it around your function, with
          gradient accumulation over micro-steps.
       4. A rank whose data ends early calls ddp_join(ctx) (with
          cfg.uneven_inputs; every rank calls it at its end).
       5. ddp_save_checkpoint / ddp_load_checkpoint whenever you like, then
          ddp_destroy(ctx).

       Gradients accumulate, as in PyTorch, until ddp_optimizer_step() or
       ddp_zero_grad(); your backward adds into them (cuBLAS: beta = 1). A
       synced ddp_step_end() adds the rank-average of what was accumulated
       since the last reduce; ddp_set_no_sync(ctx, 1) makes the following
       micro-steps accumulate locally only (see ACCUMULATION).

   ACCUMULATION

       The rule is PyTorch DDP's. Let G be the gradient buffer
       (ddp_param_grad) and W the number of ranks (with uneven inputs: the
       ranks that contributed to this step, see UNEVEN INPUTS).

         - Your backward adds into G. G keeps accumulating until
           ddp_optimizer_step() (the next ddp_step_begin() then starts from
           zero) or ddp_zero_grad() (zero at once).
         - A step after ddp_set_no_sync(ctx, 1) only accumulates locally.
         - A synced step (no_sync 0) reduces what every rank accumulated
           since the last reduce, L_r, and adds its average to G:
               G = R + (1 / W) * sum over ranks r of L_r
           where R is what G held after the last reduce (the same on every
           rank). With config.gradient_sum the 1 / W is left out.
         - ddp_train_step(ctx, fn, user, K, ...) is K micro-steps, all but
           the last with no_sync, whose reduce also divides by K, like the
           usual PyTorch recipe loss / K:
               G = R + (1 / (W * K)) * sum over ranks and micro-steps.
           (config.gradient_sum leaves out the 1 / W, not the 1 / K.)

       So K synced micro-steps give the sum of K rank-averages, K - 1
       no_sync micro-steps and a synced one give the rank-average of their
       sum, and mixtures give what PyTorch DDP gives for the same calls. After
       a no_sync step that follows a reduce, G shows R + L_r (this rank's
       part), as PyTorch's .grad does. Only L is ever reduced: R is kept aside
       (one extra gradient-sized buffer, allocated the first time a window
       continues after a reduce, two for no_sync steps after a reduce).
       ddp_optimizer_step() is an error while no_sync micro-steps are not
       reduced (the ranks would diverge). The GPU paths (nccl, staged) keep
       the same rule.

   OPTIMIZERS

       config.optimizer, a ddp_optimizer_desc. ddp_optimizer_defaults(type)
       returns PyTorch's defaults with exact = 1; every field is then used
       as written, zero included. All hyper-parameters are double: f64
       parameters get PyTorch's f64 arithmetic (double hyper-parameters and
       clip factor); f32 and 16-bit parameters get each constant rounded to
       float once, as PyTorch does with a Python float.

         field           PyTorch                     default
         type            torch.optim.SGD / AdamW     (DDP_OPTIM_NONE: none)
         lr              lr                          1e-3 (SGD requires one in
                                                     PyTorch; 1e-3 here)
         momentum        SGD momentum                0
         dampening       SGD dampening               0
         nesterov        SGD nesterov                0 (needs momentum > 0,
                                                     dampening 0)
         weight_decay    weight_decay                SGD 0 (L2 in the gradient),
                                                     AdamW 1e-2 (decoupled)
         beta1, beta2    AdamW betas                 0.9, 0.999
         eps             AdamW eps                   1e-8
         max_grad_norm   clip_grad_norm_(max_norm)   0: no clipping

       A zeroed desc (exact = 0, as configs were written before the
       defaults function) keeps working: there a zero lr, beta1, beta2,
       eps, or AdamW weight_decay means the default above (note: AdamW's
       weight decay is PyTorch's 1e-2, not 0). To ask for a zero there, start
       from ddp_optimizer_defaults(). Not supported: AdamW amsgrad, maximize.
       Bad values are DDP_ERROR_INVALID_ARGUMENT naming the field.

       ddp_optimizer_step(): with loss scaling, the non-finite check and the
       unscale (LOSS SCALING); then clipping to max_grad_norm on the global
       norm (torch.nn.utils.clip_grad_norm_: factor
       min(1, max_norm / (norm + 1e-6))); then the update with this step's
       lr (SCHEDULES) times each group's lr_scale (PARAMETER GROUPS).

   ZERO

       ZeRO-1 (DeepSpeed's stage 1, PyTorch's ZeroRedundancyOptimizer):
       config.zero_stage = 1 on every rank (or DDP_ZERO_STAGE=1 when the
       field is 0). The optimizer state (SGD momentum, AdamW's m and v, the
       f32 master weights of 16-bit parameters) is cut into world shards:
       rank r keeps and updates 1/world of every storage bucket (the layout
       of the flat buffers; each bucket is padded to a multiple of world *
       256 bytes so the shards are equal). ddp_optimizer_state_bytes()
       reports what a rank holds: at most 1/world of the unsharded state
       plus up to 768 bytes per bucket and state array.
         - A synced ddp_step_end() reduce-scatters instead of all-reducing:
           each rank reduces only its shard (on shm it reads every rank's
           gradients in place and writes only its own buffer). Afterwards
           ddp_param_grad() holds the averaged gradients in this rank's
           shard only; elsewhere its content is unspecified. Accumulation
           (no_sync, ddp_train_step) follows the usual rule on the shard.
         - ddp_optimizer_step() updates the shard, then all-gathers the
           parameters: every rank ends the step with all the new weights
           (shm: each rank writes its shard once into a shared exchange
           region, one more flat buffer in the gradient segment, and copies
           the others' from there; nccl: ncclReduceScatter and
           ncclAllGather in place; staged: the shm exchange through host
           memory).
         - Clipping and the loss scaler's inf/NaN check use global values:
           each rank measures its shard, one small all-reduce (world + 1
           doubles) combines them. ddp_clip_grad_norm() is then a
           collective: call it on every rank.
         - On the CPU the weights are the unsharded optimizer's, bit for
           bit: every element is summed over the ranks in rank order
           whoever reduces it, the update is element-wise, and the norm
           is summed in one fixed order over the shards in both modes.
           Parameter groups, schedules and loss scaling work as usual.
         - Checkpoints hold the full state, the same bytes an unsharded run
           writes (rank 0 gathers the shards, one broadcast per rank and
           state array); a file loads at any world size with or without
           ZeRO-1 (each rank keeps its shard).
       Not with config.uneven_inputs (DDP_ERROR_UNSUPPORTED: a joined rank
       would have to update its shard in every optimizer step).

   PARAMETER GROUPS

       PyTorch's param_groups, per parameter: ddp_set_param_options(ctx,
       id, &opts) between registering and ddp_finalize():
         no_weight_decay      1: no weight decay (biases, norm weights)
         weight_decay_scale   multiplies weight_decay (0 means 1)
         lr_scale             multiplies the lr of every step (0 means 1)
       Parameters with equal options form one group; up to
       DDP_MAX_PARAM_GROUPS (16) distinct sets. The options must be the same
       on every rank (checked at ddp_finalize, DDP_ERROR_MISMATCH naming the
       parameter) and are saved in checkpoints (checked when loading). The
       fused optimizers read each element's group from a map of the flat
       buffer (one byte per 256-byte chunk), on the CPU and on the GPU.
       ddp_set_lr() keeps the scales (PyTorch's own loop over param_groups
       would set one lr for all).

   SCHEDULES

       config.schedule, a ddp_schedule_desc. t is the index of the step
       about to be taken (ddp_optimizer_step() calls so far, steps skipped by
       loss scaling included, as a PyTorch loop that calls scheduler.step()
       every iteration); lr is config.optimizer.lr or the last ddp_set_lr().
         t < warmup_steps         lr * (t + 1) / warmup_steps   (any type)
         DDP_SCHEDULE_CONSTANT    lr
         DDP_SCHEDULE_COSINE      min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2
         DDP_SCHEDULE_LINEAR      min_lr + (lr - min_lr) * (1 - p)
                                  with p = (t - warmup_steps) / (total_steps -
                                  warmup_steps); min_lr from total_steps on
         DDP_SCHEDULE_STEP        lr * gamma^floor((t - warmup_steps) / step_size)
                                  (StepLR; gamma 0 means 0.1)
       In PyTorch terms each is LambdaLR(opt, lambda t: that / lr). Every
       group multiplies the result by its lr_scale. ddp_get_lr() returns the
       lr of the next step. The position (t), the lr and the loss scale are
       saved in checkpoints, so a resumed run continues bit for bit; the
       schedule itself is configuration (a checkpoint saved with another one
       logs a warning and the run follows the context's).

   LOSS SCALING

       Dynamic loss scaling for fp16 training, as torch.cuda.amp.GradScaler:
       config.loss_scale.enabled = 1 (needs an optimizer).
         - Your backward computes the gradient of S * loss, S =
           ddp_loss_scale(ctx) (seed the backward with S); report the
           unscaled loss.
         - ddp_optimizer_step() checks the reduced gradients for inf/NaN. Any
           non-finite value on any rank reaches every rank's reduced
           gradient (the sum keeps it), so every rank decides the same
           without another collective. Found: the step is skipped (weights
           and optimizer state untouched, ddp_last_step_skipped() = 1,
           ddp_skipped_steps() + 1), S *= backoff_factor. Else the gradients
           are unscaled by 1/S before clipping (clipping measures the
           unscaled norm; ddp_clip_grad_norm too), the step is taken, and
           after growth_interval clean steps in a row S *= growth_factor.
         - Defaults are PyTorch's: init_scale 65536, growth_factor 2,
           backoff_factor 0.5, growth_interval 2000. S is kept as a float
           value, as GradScaler's. With a power-of-two S the unscaled
           gradients are exactly those of the unscaled loss.
       On the GPU the check is ddp_k_nonfinite over the buckets (one small
       device-to-host copy per step).

   UNEVEN INPUTS

       PyTorch's Join: ranks whose data ends at different steps. Set
       config.uneven_inputs on every rank; a rank that has no more data
       calls ddp_join(ctx). Until every rank has called it, a joined rank
       answers the others' synced steps: each synced step starts with one
       small collective in which every rank says whether it has data; a
       joined rank then runs the same bucket reductions with zero gradients,
       and ddp_train_step's loss all-reduce. No rank waits longer than a
       step, nothing times out. The average is over the ranks that
       contributed to the step (config.join_divide_by_initial_world_size =
       1: over every rank, joined ones adding zeros, which is PyTorch's
       default); ddp_train_step's loss too. When the last rank calls
       ddp_join, every rank takes the weights and training state (optimizer
       state, step counts, lr, loss scale) of the lowest rank that ran to the
       end, and ddp_join returns on all: the ranks are identical again, the
       next epoch may start, and collectives are allowed again.
       Constraints:
         - Every rank sets config.uneven_inputs (it costs the one small
           collective per synced step) and calls ddp_join at its end.
         - With data, ranks run the same kind of synced step: all
           ddp_train_step with the same micro_steps (at most 65536), or all
           manual steps; mixed is DDP_ERROR_INVALID_STATE.
         - While a rank has joined, no other collective may run: your
           ddp_allreduce/barrier/broadcast/..., checkpoints and
           ddp_sync_params are refused (DDP_ERROR_INVALID_STATE naming the
           joined ranks) once a rank knows of the join, and must not be
           called at all in a stretch where another rank may join (they
           would pair with its join round). Do them after ddp_join returned.
         - A joined rank waits for the others' next synced step with the
           usual config.timeout_s.
         - no_sync micro-steps not reduced when a rank joins are dropped
           (a warning is logged).

   CHECKPOINTS

       ddp_save_checkpoint() writes format version 2: the weights, the
       optimizer state and step count, the schedule position and lr, the
       loss-scaler state, each parameter's options, with a checksum;
       written to a temporary file and renamed. ddp_load_checkpoint()
       reads versions 1 and 2, range-checks every header field
       (DDP_ERROR_CORRUPT naming it), checks the model and the options
       (DDP_ERROR_MISMATCH), and refuses a file without the optimizer state
       this context needs (saved without an optimizer, with another one, or
       without a momentum buffer) unless you call
       ddp_load_checkpoint_ex(ctx, path, DDP_LOAD_RESET_OPTIMIZER): then the
       weights alone are taken and the training state starts fresh. A file
       saved before the first optimizer step holds "step 0" and loads as a
       fresh optimizer. A failed load changes nothing. With ZeRO-1 the
       file holds the full state all the same (see ZERO): files move
       freely between world sizes and between sharded and unsharded runs.

   BACKENDS

       shm     processes on one host through shared memory (Linux: anonymous
               memory that rank 0 hands to the other ranks over a Unix socket,
               so no name exists in /dev/shm; other POSIX systems: named
               segments; Windows: paging-file-backed mappings, see
               PLATFORMS and SECURITY). The CPU default. The flat gradient
               buffer lives in the shared segment,
               so an all-reduce of gradients copies nothing in or out: every
               rank reduces its own slice of every rank's buffer and writes the
               result back to all of them.
       nccl    one GPU per process (CUDA builds). Default when parameters live
               on the GPU.
       staged  GPU buffers reduced through the shm backend (device to host,
               reduce, host to device). For machines without NCCL and for
               several ranks on one GPU, and the multi-process GPU path on
               Windows, which has no NCCL.

   BUCKETS

       Parameters are packed into buckets in reverse registration order
       (backward produces the last layer's gradients first). The first bucket
       closes at config.first_bucket_bytes (1 MiB), later ones at
       config.bucket_bytes (25 MiB); one element type per bucket; every
       parameter starts at a 256-byte aligned offset. When every parameter of
       a bucket is marked ready, the bucket is handed to the communication
       thread (or stream), strictly in bucket order, so communication overlaps
       the rest of your backward.

       Learned order. When your backward marks parameters in another order
       than reverse registration (a model registered out of order, branches),
       registration-order buckets wait for late parameters and the overlap
       is lost. So, as PyTorch DDP does, the buckets are rebuilt once, at the
       end of the first step (synced or not), from the order of that step's
       ddp_mark_ready() calls, with the same caps; parameters never marked
       come last, in reverse registration order. Every rank takes rank 0's
       order (one broadcast at that ddp_step_end); a rank that marked in
       another order logs a DEBUG line naming the first difference. From
       the second step on, buckets launch in mark order.
       What changes is only which parameters a bucket holds and its launch
       order: parameters do not move. Every pointer from ddp_param_data,
       ddp_param_grad, ddp_flat_params and ddp_flat_grads stays valid, the
       optimizer state, the ZeRO-1 shards and checkpoints are untouched
       (nothing of the order is saved; a resumed run learns it again), and
       the results are the same bits as with the registration order. A
       learned bucket may be several ranges of the flat buffers:
       ddp_bucket_info() gives its span, ddp_bucket_range() the ranges
       (each reduced in place; a communication hook gets them packed into
       one span, see COMMUNICATION HOOKS). ddp_param_bucket() and the
       "launch bucket" DEBUG lines show the learned buckets.
       config.static_bucket_order = 1 keeps the registration order; with
       config.uneven_inputs the order is not learned (a rank that joins
       before its first step would not answer the agreement).

   COMMUNICATION HOOKS

       PyTorch's register_comm_hook: ddp_register_comm_hook(ctx, hook,
       state) makes every bucket of the following synced steps go through
       hook instead of the built-in average. The hook gets a
       ddp_comm_bucket: the gradients as one contiguous span (grad, count,
       dtype; a bucket of several ranges, see BUCKETS, comes packed in a
       scratch buffer and goes back after the hook), the factor to apply
       to the sum over ranks (scale: 1 / world, 1 / (world * K) in
       ddp_train_step(K), 1 with gradient_sum, 1 / contributors with
       uneven inputs), rank and world, and the library's collectives on
       this context's communicator as function pointers (allreduce with an
       op and a scale applied in the same pass, broadcast, allgather,
       reduce_scatter, barrier; call them as b->allreduce(b->comm, ...)).
       It must leave grad holding the reduced gradients times scale (with
       ZeRO-1 at least on this rank's shard) and return DDP_SUCCESS.
         - Where it runs: on the communication thread (shm, staged) while
           your backward goes on, or on your thread for the last bucket and
           with config.no_comm_thread; on the nccl backend on your thread
           when the bucket launches (its collectives then wait for
           themselves: overlap is lost). It may call the collectives it is
           given, read and write grad and its own memory, and nothing of
           the public API on this context.
         - Every rank must run the same hook and call the same collectives
           in the same order (DDP_DEBUG=detail checks that, see DEBUG MODE).
         - On the CPU backends an allreduce on grad itself runs in place in
           the shared gradient segment (no staging copy); other buffers go
           through staging.
         - Errors: a hook that returns anything but DDP_SUCCESS fails the
           step with DDP_ERROR_USER ("communication hook returned N for
           bucket B on rank R"), and, on the shm and staged backends, every
           other rank's step fails with DDP_ERROR_USER too, as soon as it
           waits for that rank (no hang; on nccl the peers fail at the
           timeout). A collective that fails inside the hook breaks the
           context with its own error; return it.
         - GPU contexts: grad is device memory (on_device 1) and stream the
           communication stream; queue your kernels there. The collectives
           wait for the stream first.
       Built-in hooks: ddp_comm_hook_allreduce (the built-in average, the
       same bits), ddp_comm_hook_bf16 and ddp_comm_hook_fp16 (f32 buckets:
       multiplied by scale in f32, rounded to bf16 / fp16, all-reduced in
       that type, widened back). Between the ranks they send what PyTorch's
       bf16_compress_hook and fp16_compress_hook send, half the bytes, but
       not always the same bits: PyTorch rounds first and divides in the
       narrow type (so a gradient beyond fp16's 65504 becomes inf there
       even when gradient / world fits, and is finite here), and the shm
       and staged all-reduce of bf16 / fp16 adds in f32 and rounds each sum
       once (NCCL adds in the narrow type, hop by hop). Expect differences
       of an ulp of the narrow type.
       On the CPU the compression happens in place in the first half of the
       bucket's span, so the all-reduce moves half the bytes through shared
       memory; it is also the reference of the GPU's compression.
       config.compress = DDP_BF16 / DDP_F16 selects them (the nccl backend
       compresses on its own path with the same arithmetic). The step
       statistics count the bytes a hook's collectives moved.

   TIMELINE

       DDP_TRACE=path (or config.trace_path) makes every rank write its
       timeline as a Chrome trace-event JSON file, which Perfetto
       (ui.perfetto.dev) and chrome://tracing open, and tools/ddptrace
       draws as an SVG picture (build/ddptrace -o t.svg trace.rank*.json).
       The file name: "%r" in the path becomes the rank, else ".rank<r>"
       goes before a ".json" ending (trace.json: trace.rank0.json, ...) or
       at the end. pid is the rank; tid 0 your thread, tid 1 the
       communication thread. Events ("X" with a duration, "i" instants):
         step N             ddp_step_begin() to ddp_step_end() (args: step,
                            synced)
         mark NAME          ddp_mark_ready() (args: param, bucket)
         launch bucket B    a bucket complete, handed over (args: bytes)
         reduce bucket B    its reduction, on the thread that ran it (args:
                            bucket, bytes; "hook bucket B" when a
                            communication hook ran it)
         wait for buckets   your thread waiting for the communication thread
         optimizer          ddp_optimizer_step() (args: step, 0 if skipped)
         parameter all-gather   ZeRO-1's, inside the optimizer step
         checkpoint save / load, ddp_allreduce ... (args: bytes: the
                            bytes of the buffers involved, not of a file:
                            a checkpoint's is the flat parameters plus the
                            optimizer state; the optimizer's the flat
                            parameters)
       Timestamps are the monotonic clock in microseconds, so the files of
       the ranks of one host line up. Memory is bounded: events wait in a
       ring of config.trace_events (default 65536, about 3 MB) until
       ddp_trace_flush() or ddp_destroy() writes them; when the ring is
       full the oldest are dropped and counted (the "trace_info" metadata
       event at the end says how many). The file is complete JSON after
       ddp_destroy(); a file cut short by a crash still opens in Perfetto.
       With the timeline off, recording costs one pointer test.

       ddp_get_step_stats() gives the last synced step's and the running
       totals: compute_s (your forward/backward), comm_s (the bucket
       reductions, wherever they ran), exposed_s (communication your thread
       waited for or ran itself: ddp_step_end() and the buckets reduced
       inside ddp_mark_ready), optimizer_s and bytes (what the reductions
       moved, buckets counted with their alignment padding, see BUCKETS).
       The share of the communication hidden behind your backward is
       1 - exposed_s / comm_s, taken as 0 when negative: a bucket reduced
       on your thread counts in both, and exposed_s also holds the hand-off
       around it, so it can exceed comm_s by microseconds when nothing
       overlapped; examples/fashion_mlp prints it per epoch (overlap=...%).
       On the nccl backend the reductions run on the GPU and comm_s stays
       0 (exposed_s is the host's wait).

   DEBUG MODE

       Collectives pair up by order: a rank that calls another collective
       than its peers (rank 0 in ddp_allreduce of 10 floats while rank 1 is
       in ddp_broadcast), with another count or type, in another bucket, or
       after skipping a step, meets whatever its peers run: wrong values, or
       a wait until the timeout. DDP_DEBUG=detail (or config.debug =
       DDP_DEBUG_DETAIL; the same on every rank) makes every collective
       carry a fingerprint, checked on every rank before any data moves:
       its number on this rank, kind (all-reduce, broadcast, ..., gradient
       bucket reduction, ZeRO-1 all-gather), element count, type, op or
       root, bucket, the synced steps this rank has begun, and where it was
       called (ddp_allreduce, "gradient bucket", "communication hook",
       "ddp_train_step loss", "ZeRO-1 gradient norm", "ddp_join round", the
       checkpoint's...). Every rank compares rank 0's fingerprint with every
       other rank's; a difference fails every rank at once with
       DDP_ERROR_MISMATCH and the same message naming both sides, e.g.
         collectives out of step (DDP_DEBUG=detail): rank 0 is in
         gradient bucket 0 of synced step 4 (collective #9: all-reduce of
         3000 x f32), but rank 1 is in ddp_barrier (collective #9:
         barrier; after synced step 3)
       A rank that skipped a step shows when its collectives stop pairing
       (the step counts then tell which rank is behind). Cost: on shm and
       staged two more barriers per collective through the control segment,
       on nccl one all-gather of 72 bytes per rank per collective (see
       docs/BENCHMARKS.md). Off by default. Without it nothing is checked,
       and a mismatch still never reads or writes out of bounds: every size
       a rank uses is its own, and what it reads of the others is inside the
       staging areas and gradient segments every rank shares (tested under
       AddressSanitizer).

   AGREEMENT

       Some of the configuration shapes what the ranks exchange or the
       result they compute; a rank that differs would hang until the timeout
       or train a different model without a word. These must be equal on
       every rank, as ddp_create resolved them (defaults and environment
       variables applied; ddp_query_config shows them), used or not:
         config.backend (DDP_BACKEND), config.device,
         config.first_bucket_bytes, config.bucket_bytes,
         config.static_bucket_order, config.gradient_sum,
         config.allow_unused_parameters, config.compress,
         config.uneven_inputs, config.join_divide_by_initial_world_size,
         config.zero_stage (DDP_ZERO_STAGE), config.debug (DDP_DEBUG),
         every field of config.optimizer (type, lr, momentum, dampening,
         nesterov, weight_decay, beta1, beta2, eps, max_grad_norm),
         of config.schedule and of config.loss_scale (enabled,
         init_scale, growth_factor, backoff_factor, growth_interval),
         and the communication hook registered before ddp_finalize (none,
         one of the built-in ones, or a hook of the program; which function
         of the program is not compared: addresses differ between processes).
       ddp_finalize compares them, with the parameter table, in the one
       exchange through the store it already makes (no collective, so even
       config.debug may differ without a hang): every rank compares every
       rank's with rank 0's, and on a difference every rank fails at once
       with DDP_ERROR_MISMATCH naming the first field that differs, the rank
       and both values, e.g.
         configurations differ: config.zero_stage (or DDP_ZERO_STAGE) is 0
         on rank 0 but 1 on rank 2 (it must be the same on every rank, see
         AGREEMENT in ddp.h)
       Booleans compare as 0 or 1 (2 and 1 agree); doubles compare exactly.
       Free to differ (local to a rank): rank, local_rank, cuda_device,
       timeout_s, connect_timeout_s, no_comm_thread, staging_bytes (rank 0's
       is used), trace_path, trace_events (DDP_TRACE), the allocators and
       the logger, DDP_TIMEOUT; master_addr, master_port, the job secret and
       job id are checked at rendezvous (SECURITY). Not covered: a hook
       registered after ddp_finalize, ddp_set_lr, and whatever a program
       does differently (DDP_DEBUG=detail catches collectives that then
       stop pairing); ranks that ask for nccl next to shm or staged set up
       differently in ddp_create and may fail there, at the timeout.

   ERRORS

       Every call that can fail returns a ddp_result (0 success, negative
       error). ddp_result_string() names the code, ddp_last_error(ctx) holds
       the detailed message of the last failure (what, which parameter, which
       rank). Nothing exits or aborts on a mistake of yours. Every wait has a
       timeout (config.timeout_s): a rank that dies makes the others fail with
       DDP_ERROR_PEER or DDP_ERROR_TIMEOUT instead of hanging. After such an
       error the context is broken: only ddp_destroy() is allowed. So it is
       after a mistake in the middle of a step or a collective, which the
       other ranks may already be acting on (a parameter marked ready
       twice, a step ended with parameters never marked, a ddp_train_step
       function that failed, a mismatch found by DEBUG MODE). A bad
       argument or a call at the wrong time caught before anything started
       (a NULL pointer, an unknown id, ddp_step_end without a step) is
       refused and the context stays usable. A broken context answers
       every later call with the error that broke it, and its message
       names that first error.
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
       ddp_save_checkpoint), and ddprun ends each rank's process group
       (Windows: shared memory and checkpoint temporaries vanish with the
       last handle, and ddprun.exe ends each rank's job object).
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

       On Windows the same checks hold with Windows' means. The store's
       listening socket is exclusive (SO_EXCLUSIVEADDRUSE): no other
       socket, of this user or another, can bind its port while it listens,
       so a second job on the port fails at bind as on POSIX. Shared memory
       is a named mapping under a random name
       ("Local\ddp-<pid>-<n>-<what>-<96 random bits>") that ranks learn only
       from the store (so, with a secret, only from a store that proved it
       knows it), created for this user alone (owner: the user's SID, a DACL
       of that one entry; a mapping that anyone else may open, or owned by
       another user, is refused), of the expected size, and carrying rank
       0's nonce in its header. ddprun.exe makes the job secret from the
       system's generator (RtlGenRandom).

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

   SAFETENSORS

       ddp_save_safetensors() writes the weights in the safetensors format
       of Hugging Face, which PyTorch (safetensors.torch.load_file), NumPy,
       the Hugging Face tools and many engines read:
           8 bytes      N, the header's length (unsigned 64-bit little-endian)
           N bytes      a JSON object, padded with spaces to a multiple of 8:
                        {"__metadata__":{"format":"pt",...},
                         "fc1.weight":{"dtype":"F32","shape":[256,784],
                                       "data_offsets":[BEGIN,END]},...}
           the rest     the tensors' bytes, little-endian, row-major, one
                        after the other; BEGIN/END count from here.
       One tensor per parameter: its registered name, its shape from
       ddp_register_param_shape() (ddp_register_param() gives [count]) and
       its dtype (F32, F64, F16, BF16). Tensors are laid out widest type
       first, in registration order within a type, so each starts aligned
       to its element size. __metadata__ holds "format": "pt" (unless you
       pass your own "format") and the pairs you pass. Rank 0 writes the
       file like a checkpoint (temporary file, fsync, rename). Optimizer
       state is not in it: use a checkpoint to resume training.

       ddp_load_safetensors() reads a file on every rank (each rank needs
       the file: a shared file system or a copy per host) and copies each
       tensor into the parameter of the same name. The dtype and shape
       must be the parameter's exactly (a 1-D parameter from
       ddp_register_param does not match a [4,3] tensor: register it with
       its shape). A parameter missing from the file, or a tensor that is
       no parameter, is an error naming it unless flags allow it
       (DDP_SAFETENSORS_ALLOW_MISSING: it keeps its value;
       DDP_SAFETENSORS_ALLOW_EXTRA: the tensor is skipped). Optimizer state
       is kept; master copies of F16/BF16 parameters are refreshed from
       the loaded values. Everything is checked before any parameter
       changes, and the reader is strict (DDP_ERROR_CORRUPT naming the
       problem and, where there is one, the tensor):
           - N at most 100,000,000 (the format's limit) and within the
             file; the header is UTF-8 JSON beginning with '{'; strings,
             integers and objects only where the format has them; no
             duplicate keys; __metadata__ maps strings to strings
           - known dtypes only (BOOL U8 I8 F8_E5M2 F8_E4M3 I16 U16 F16
             BF16 I32 U32 F32 F64 I64 U64), at most 64 dimensions, and
             END - BEGIN = elements * element size, without overflow
           - the tensors cover the bytes after the header exactly: no
             hole, no overlap, nothing after the last one
       The JSON parser has no recursion (the format nests three levels)
       and its memory is proportional to N.

   VERSION

       DDP_VERSION ("0.2.0"), DDP_VERSION_MAJOR, _MINOR, _PATCH and
       DDP_VERSION_NUMBER (10000 * major + 100 * minor + patch) describe the
       declarations you compile against; ddp_version() and
       ddp_version_number() the implementation linked into the program.
       dp.h and ddp_kernels.cuh (DDP_KERNELS_VERSION_*) always carry the same
       version as ddp.h: use the three files of one release together. Before
       1.0, a new MINOR version may change the API, the checkpoint format or
       what ranks exchange at start-up; a new PATCH version changes none of
       them. CHANGELOG.md lists the changes of every version.

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
       DDP_ZERO_STAGE=0|1           config.zero_stage when the field is 0 (see ZERO)
       DDP_TRACE=path               config.trace_path when the field is NULL (see TIMELINE)
       DDP_DEBUG=off|detail         config.debug when the field is 0 (see DEBUG MODE)
       DDP_FORCE_COMM=1             GPU, world of one: run the gradient collective
                                    anyway (by default a world of one exchanges
                                    nothing; the GPU tests use this to exercise NCCL)

   LIMITS

       ranks                     1024
       parameter groups          16 distinct option sets (DDP_MAX_PARAM_GROUPS)
       micro_steps               65536 per ddp_train_step with uneven inputs
                                 (the join round's sums stay exact in double)
       step counts in a file     2^53 (exact in double, as pow(beta, t) needs)
*/
/* Feature macros of the implementation (part of its PLATFORM section, but
   they must come before the first system header, so a file that defines
   DDP_IMPLEMENTATION includes ddp.h first, or compiles with -D_GNU_SOURCE):
   POSIX and a few GNU calls (shm_open, pthreads, sockets); MSVC's C library
   without its "use the _s functions" warnings. */
#if defined(DDP_IMPLEMENTATION) && !defined(_WIN32) && !defined(_GNU_SOURCE)
#  define _GNU_SOURCE 1
#endif
#if defined(DDP_IMPLEMENTATION) && defined(_MSC_VER) && !defined(_CRT_SECURE_NO_WARNINGS)
#  define _CRT_SECURE_NO_WARNINGS 1
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

/* ---- version ------------------------------------------------------------- */

#define DDP_VERSION_MAJOR 0
#define DDP_VERSION_MINOR 2
#define DDP_VERSION_PATCH 0
#define DDP_VERSION "0.2.0"  /* MAJOR.MINOR.PATCH of the declarations you compiled */
/* 10000 * MAJOR + 100 * MINOR + PATCH, for #if comparisons */
#define DDP_VERSION_NUMBER (DDP_VERSION_MAJOR * 10000 + DDP_VERSION_MINOR * 100 + DDP_VERSION_PATCH)

/* The version of the implementation linked into the program ("0.2.0"),
   which may differ from DDP_VERSION when a stale object file or library is
   linked; compare the two to catch that. Never NULL. */
DDP_API const char *ddp_version(void);
/* The same as DDP_VERSION_NUMBER, of the implementation. */
DDP_API int         ddp_version_number(void);

/* ---- results ------------------------------------------------------------ */

typedef enum ddp_result {
    DDP_SUCCESS                =   0,
    DDP_ERROR_INVALID_ARGUMENT =  -1, /* a null pointer, a bad size, a bad enum */
    DDP_ERROR_INVALID_STATE    =  -2, /* call not allowed now (e.g. register after finalize) */
    DDP_ERROR_OUT_OF_MEMORY    =  -3,
    DDP_ERROR_TIMEOUT          =  -4, /* a wait passed config.timeout_s */
    DDP_ERROR_PEER             =  -5, /* another rank failed, exited or aborted */
    DDP_ERROR_MISMATCH         =  -6, /* ranks disagree (parameters, shapes, dtypes, configuration) */
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

/* Desync detection (see DEBUG MODE). */
typedef enum ddp_debug {
    DDP_DEBUG_DEFAULT = 0, /* the environment variable DDP_DEBUG (off | detail), else off */
    DDP_DEBUG_OFF,
    DDP_DEBUG_DETAIL       /* every collective's fingerprint checked across the ranks first */
} ddp_debug;

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

/* The optimizer. Every field carries PyTorch's name and default (see
   OPTIMIZERS in the manual above). Two ways to fill it:
     - ddp_optimizer_defaults(type): PyTorch's defaults with exact = 1;
       change what you need; every field is then used as written, so zero
       means zero (beta1 = 0, eps = 0, weight_decay = 0 are all allowed).
     - a zeroed struct (exact = 0, how configs were written before): a zero
       lr, beta1, beta2, eps, or AdamW weight_decay means that field's
       default; the other fields are used as written. */
typedef struct ddp_optimizer_desc {
    ddp_optimizer type;
    int    exact;         /* 1: use every value as written (set by ddp_optimizer_defaults) */
    double lr;            /* lr: 1e-3 (PyTorch's SGD requires one; this library's default is 1e-3) */
    double momentum;      /* SGD momentum: 0 (plain SGD) */
    double dampening;     /* SGD dampening: 0 */
    int    nesterov;      /* SGD nesterov: 0 (needs momentum > 0 and dampening 0) */
    double weight_decay;  /* weight_decay: SGD 0 (L2, added to the gradient); AdamW 1e-2 (decoupled) */
    double beta1;         /* AdamW betas[0]: 0.9 */
    double beta2;         /* AdamW betas[1]: 0.999 */
    double eps;           /* AdamW eps: 1e-8 */
    double max_grad_norm; /* > 0: clip_grad_norm_(max_norm) before each step; 0: no clipping */
} ddp_optimizer_desc;

/* The learning rate of each step (see SCHEDULES). t is the index of the
   step about to be taken: ddp_optimizer_step() calls so far, steps skipped
   by loss scaling included. lr is config.optimizer.lr (or the last
   ddp_set_lr); every parameter group multiplies the result by its lr_scale. */
typedef enum ddp_schedule {
    DDP_SCHEDULE_CONSTANT = 0, /* lr */
    DDP_SCHEDULE_COSINE,       /* cosine from lr down to min_lr at total_steps */
    DDP_SCHEDULE_LINEAR,       /* straight line from lr down to min_lr at total_steps */
    DDP_SCHEDULE_STEP          /* lr * gamma^floor((t - warmup_steps) / step_size) (PyTorch's StepLR) */
} ddp_schedule;

typedef struct ddp_schedule_desc {
    ddp_schedule type;
    int64_t warmup_steps;  /* t < warmup_steps: lr * (t + 1) / warmup_steps, before any type; 0: none */
    int64_t total_steps;   /* COSINE, LINEAR: from this step on, min_lr (> warmup_steps) */
    double  min_lr;        /* COSINE, LINEAR: the floor (0: down to 0) */
    int64_t step_size;     /* STEP: steps between decays (> 0) */
    double  gamma;         /* STEP: the factor (0 means StepLR's default 0.1) */
} ddp_schedule_desc;

/* Dynamic loss scaling for fp16 training, with the semantics of PyTorch's
   torch.cuda.amp.GradScaler (see LOSS SCALING). Zero means PyTorch's
   default for each field. */
typedef struct ddp_loss_scale_desc {
    int    enabled;          /* 1: scale (needs config.optimizer.type) */
    double init_scale;       /* init_scale: 65536 (2^16) */
    double growth_factor;    /* growth_factor: 2.0 (> 1) */
    double backoff_factor;   /* backoff_factor: 0.5 (in (0, 1)) */
    int    growth_interval;  /* growth_interval: 2000 clean steps */
} ddp_loss_scale_desc;

typedef struct ddp_config {
    /* The fields that shape the exchange or the result (buckets, averaging,
       compression, uneven inputs, ZeRO, debug, optimizer, schedule, loss
       scaling) must be equal on every rank: ddp_finalize compares them and
       fails with DDP_ERROR_MISMATCH naming the field (see AGREEMENT). */
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
    int    static_bucket_order; /* 1: buckets stay in reverse registration order; 0: the order of
                                   ddp_mark_ready in the first step (see BUCKETS) */
    int    gradient_sum;      /* 1: leave the sum, not the average */
    int    allow_unused_parameters; /* 1: a parameter never marked is reduced as it is (zero) */
    ddp_dtype compress;       /* DDP_BF16 or DDP_F16: reduce f32 gradients in that type (the
                                 compression hooks, see COMMUNICATION HOOKS; every backend) */
    int    no_comm_thread;    /* 1: reduce buckets inline in ddp_step_end (no overlap) */
    size_t staging_bytes;     /* shm: per-rank staging for user buffers, default 16 MiB;
                                 with named segments, less when /dev/shm is small
                                 (logged); anonymous ones are only backed where used */

    /* uneven inputs (PyTorch's Join, see UNEVEN INPUTS): 1 lets ranks run
       out of data at different steps and call ddp_join(); costs one small
       collective per synced step. */
    int    uneven_inputs;
    int    join_divide_by_initial_world_size; /* 1: average over every rank, joined ones adding zeros
                                                 (PyTorch's default); 0: over the ranks that contributed */

    /* ZeRO-1 (see ZERO): 1 shards the optimizer state across the ranks;
       each keeps and updates 1/world of it. 0: the environment variable
       DDP_ZERO_STAGE (0 or 1), else off. */
    int    zero_stage;

    /* The timeline (see TIMELINE): a Chrome trace-event JSON file per rank
       ("%r" in the path is replaced by the rank, else ".rank<r>" is put
       before a ".json" ending or appended). NULL: the environment variable
       DDP_TRACE, else no trace. trace_events: the events kept in memory
       between flushes (a ring: the oldest are dropped, and counted);
       0 means 65536. */
    const char *trace_path;
    size_t trace_events;

    /* DDP_DEBUG_DETAIL: every collective carries a fingerprint checked on
       every rank before data moves (see DEBUG MODE); default: the
       environment variable DDP_DEBUG (off | detail), else off. */
    ddp_debug debug;

    ddp_optimizer_desc optimizer;
    ddp_schedule_desc  schedule;  /* zero: the constant lr */
    ddp_loss_scale_desc loss_scale; /* zero: off */

    ddp_allocator        allocator;
    ddp_device_allocator device_allocator;
    ddp_logger           logger;
} ddp_config;

typedef struct ddp_context ddp_context;

/* ---- context -------------------------------------------------------------- */

/* Rendezvous with the other ranks and set up the backend. config NULL is
   a zeroed config: every default, rank and world size from the
   environment. On failure *out is NULL and the message is passed to the
   logger and kept for ddp_create_error(). */
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
   values win); NULL means zeros. *out_id receives the parameter's id, or -1 when the
   call fails (it is written on every path when out_id is not NULL). */
DDP_API ddp_result ddp_register_param(ddp_context *ctx, const char *name, size_t count,
                                      ddp_dtype dtype, const void *init, int *out_id);
/* Same with a shape (ndim <= 8); the shape is checked across ranks too. */
DDP_API ddp_result ddp_register_param_shape(ddp_context *ctx, const char *name, int ndim,
                                            const int64_t *shape, ddp_dtype dtype,
                                            const void *init, int *out_id);
/* Per-parameter optimizer options (PyTorch's parameter groups), set after
   registering and before ddp_finalize(); the same on every rank (checked
   at finalize) and in checkpoints (checked at load). Parameters with equal
   options form one group; at most DDP_MAX_PARAM_GROUPS distinct ones. */
#define DDP_MAX_PARAM_GROUPS 16
typedef struct ddp_param_options {
    int    no_weight_decay;     /* 1: weight decay 0 for this parameter (biases, norm weights) */
    double weight_decay_scale;  /* multiplies config.optimizer.weight_decay (0 means 1) */
    double lr_scale;            /* multiplies the lr of every step (0 means 1) */
} ddp_param_options;
DDP_API ddp_result ddp_set_param_options(ddp_context *ctx, int id, const ddp_param_options *options);
/* The options in force (no_weight_decay 1 when the decay scale is 0; the
   scales resolved); zeros for a bad id. */
DDP_API ddp_param_options ddp_get_param_options(const ddp_context *ctx, int id);
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
/* Bucket b: the span of the flat gradient buffer that holds it (from its
   first byte to its last; once the order is learned from the first step a
   bucket may be several ranges, with other buckets' parameters between
   them, see BUCKETS), its element type and parameter count. */
DDP_API ddp_result  ddp_bucket_info(const ddp_context *ctx, int b, size_t *offset_bytes,
                                    size_t *size_bytes, ddp_dtype *dtype, int *num_params);
/* The k-th range (k = 0, 1, ... until DDP_ERROR_INVALID_ARGUMENT) of the
   flat gradient buffer that bucket b reduces. */
DDP_API ddp_result  ddp_bucket_range(const ddp_context *ctx, int b, int k, size_t *offset_bytes,
                                     size_t *size_bytes);
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
/* Wait for every bucket (CPU) or make the stream wait (CUDA, no host sync).
   A synced step (no_sync 0) adds the rank-average of what every rank
   accumulated since the last reduce to the gradients; a no_sync step only
   accumulates locally (see ACCUMULATION). */
DDP_API ddp_result ddp_step_end(ddp_context *ctx);
DDP_API ddp_result ddp_step_end_stream(ddp_context *ctx, void *stream);
/* 1: the following steps only accumulate locally (PyTorch's no_sync());
   the next step with 0 reduces what was accumulated since the last reduce:
   the gradients then hold the rank-average of the sum over those steps. */
DDP_API ddp_result ddp_set_no_sync(ddp_context *ctx, int no_sync);
/* CUDA: the stream (a cudaStream_t; NULL, the default, is the legacy
   default stream) your forward/backward runs on. Zeroing gradients at the
   start of a step, the end-of-step wait of ddp_step_end() and the optimizer
   run on it. */
DDP_API ddp_result ddp_set_stream(ddp_context *ctx, void *stream);
/* CUDA: block until every queued collective finished (with the timeout). */
DDP_API ddp_result ddp_synchronize(ddp_context *ctx);

/* ---- optimizer ------------------------------------------------------------ */

/* PyTorch's defaults for an optimizer (see OPTIMIZERS), with exact = 1:
   every field is then used as written, zero included. */
DDP_API ddp_optimizer_desc ddp_optimizer_defaults(ddp_optimizer type);
/* Clip (config.optimizer.max_grad_norm), then apply config.optimizer to
   every parameter. Ends the accumulation: the next ddp_step_begin() starts
   from zero gradients (see ACCUMULATION). */
DDP_API ddp_result ddp_optimizer_step(ddp_context *ctx);
/* torch.nn.utils.clip_grad_norm_: *out_norm (may be NULL) = the global L2
   norm of the gradients; when max_norm > 0 they are multiplied by
   min(1, max_norm / (norm + 1e-6)) (f64 gradients in double, others in
   float). max_norm <= 0: measure only. A non-finite norm leaves the
   gradients as they are. With loss scaling the norm is that of the
   unscaled gradients (the buffer stays scaled by S). */
DDP_API ddp_result ddp_clip_grad_norm(ddp_context *ctx, double max_norm, double *out_norm);
/* Set the lr of the following steps: config.optimizer.lr from now on, so
   with a schedule the lr it starts from (see SCHEDULES). Saved in
   checkpoints. */
DDP_API ddp_result ddp_set_lr(ddp_context *ctx, double lr);
/* The lr the next ddp_optimizer_step() uses (before the groups' lr_scale). */
DDP_API double     ddp_get_lr(const ddp_context *ctx);
DDP_API ddp_result ddp_zero_grad(ddp_context *ctx);
/* Optimizer steps taken (AdamW's t), and steps skipped by loss scaling;
   their sum is the schedule's position. */
DDP_API int64_t    ddp_optimizer_steps(const ddp_context *ctx);
DDP_API int64_t    ddp_skipped_steps(const ddp_context *ctx);
/* 1 if the last ddp_optimizer_step() skipped the update (loss scaling found
   a non-finite gradient); the same on every rank. */
DDP_API int        ddp_last_step_skipped(const ddp_context *ctx);
/* The loss scale S to multiply your loss (or its gradient) by; 1 when
   config.loss_scale is off. */
DDP_API double     ddp_loss_scale(const ddp_context *ctx);
/* Bytes of optimizer state this rank holds (momentum or AdamW's moments,
   f32 master weights of 16-bit parameters), allocated at the first
   ddp_optimizer_step() (or a checkpoint load); 0 before. With ZeRO-1
   about 1/world of the unsharded size (see ZERO). */
DDP_API size_t     ddp_optimizer_state_bytes(const ddp_context *ctx);

/* ---- communication hooks ------------------------------------------------------ */
/* See COMMUNICATION HOOKS in the manual above. */

/* One bucket, as a communication hook gets it. */
typedef struct ddp_comm_bucket {
    int       index;       /* the bucket (its launch order) */
    void     *grad;        /* its gradients, count elements of dtype, contiguous (device memory when on_device) */
    size_t    count;
    ddp_dtype dtype;
    double    scale;       /* what the sum over ranks must be multiplied by: 1 / world for the
                              average, 1 / (world * K) inside ddp_train_step(K), 1 with gradient_sum */
    int       rank, world;
    int       on_device;   /* 1: grad is CUDA device memory */
    void     *stream;      /* CUDA: the stream to queue your kernels on (a cudaStream_t) */
    void     *comm;        /* pass to the functions below */
    /* The library's collectives on this context's communicator. buf: the
       bucket's grad (in place, the fast path on shm) or memory of yours
       (host; device memory on GPU contexts). allreduce multiplies the
       result by scale (1: not at all) in the same pass. They return as
       the public collectives do; a failure breaks the context: return it. */
    ddp_result (*allreduce)(void *comm, void *buf, size_t count, ddp_dtype dtype, ddp_op op, double scale);
    ddp_result (*broadcast)(void *comm, void *buf, size_t count, ddp_dtype dtype, int root);
    ddp_result (*allgather)(void *comm, const void *send, void *recv, size_t count, ddp_dtype dtype);
    ddp_result (*reduce_scatter)(void *comm, const void *send, void *recv, size_t count, ddp_dtype dtype, ddp_op op);
    ddp_result (*barrier)(void *comm);
} ddp_comm_bucket;

/* Reduce the bucket in place (grad must end as the reduced gradients,
   times scale); return DDP_SUCCESS, or anything else to fail the step:
   every rank's step then fails with DDP_ERROR_USER. */
typedef ddp_result (*ddp_comm_hook)(const ddp_comm_bucket *bucket, void *state);

/* Use hook (with your state) for every bucket from the next step on,
   instead of the built-in average; NULL: the built-in again. The same
   hook on every rank. Not inside a step. */
DDP_API ddp_result ddp_register_comm_hook(ddp_context *ctx, ddp_comm_hook hook, void *state);
/* Built-in hooks. ddp_comm_hook_allreduce: the built-in average as a hook
   (a sum multiplied by scale). ddp_comm_hook_bf16 / _fp16: f32 buckets are
   multiplied by scale, rounded to bf16 / fp16, summed over the ranks in
   that type (half the bytes), widened back (PyTorch's bf16_compress_hook,
   fp16_compress_hook); other buckets are all-reduced as they are. state
   is unused (NULL). */
DDP_API ddp_result ddp_comm_hook_allreduce(const ddp_comm_bucket *bucket, void *state);
DDP_API ddp_result ddp_comm_hook_bf16(const ddp_comm_bucket *bucket, void *state);
DDP_API ddp_result ddp_comm_hook_fp16(const ddp_comm_bucket *bucket, void *state);

/* ---- step statistics and the timeline -------------------------------------- */

/* What the synced steps cost (see TIMELINE). A "step" here is one
   optimizer window: the micro-steps from one synced ddp_step_end() to the
   next (no_sync micro-steps count with the synced step that ends them). */
typedef struct ddp_step_stats {
    int64_t  steps;        /* synced steps counted */
    double   compute_s;    /* your forward/backward: ddp_step_begin() to ddp_step_end(),
                              less the communication run on your thread in between */
    double   comm_s;       /* the gradient collectives (bucket reductions, hooks), wherever
                              they ran (CPU backends; the nccl backend does not time them) */
    double   exposed_s;    /* communication your thread waited for or ran: ddp_step_end()
                              and the buckets reduced inside ddp_mark_ready() */
    double   optimizer_s;  /* ddp_optimizer_step(), ZeRO-1's parameter all-gather included */
    uint64_t bytes;        /* gradient bytes handed to the collectives */
} ddp_step_stats;
/* last: the last synced step; total: every step since ddp_finalize().
   Either may be NULL. The share of communication hidden behind your
   backward is 1 - exposed_s / comm_s (when comm_s > 0). */
DDP_API ddp_result ddp_get_step_stats(const ddp_context *ctx, ddp_step_stats *last, ddp_step_stats *total);
/* Write the timeline's events held in memory to the trace file now (the
   file stays valid JSON only once ddp_destroy() closes it; Perfetto and
   chrome://tracing also open it before). No trace: does nothing. */
DDP_API ddp_result ddp_trace_flush(ddp_context *ctx);

/* ---- the step wrapper ------------------------------------------------------ */

/* Your forward and backward for one micro-step: add gradients into
   ddp_param_grad() buffers, call ddp_mark_ready() (or _stream) for each, and
   store the micro-step's loss. Return 0 on success; anything else aborts
   the step with DDP_ERROR_USER. */
typedef int (*ddp_forward_backward_fn)(ddp_context *ctx, void *user, int micro_step,
                                       float *loss);

/* micro_steps (0 means 1) calls of fn, all but the last without sync; the
   reduce divides by micro_steps as well (PyTorch's loss / micro_steps), so
   the gradients get the rank-average of the mean over the micro-steps; then
   the optimizer step (unless config.optimizer.type is DDP_OPTIM_NONE), and
   *out_loss (may be NULL) = the loss averaged over micro-steps and ranks.
   An error if no_sync micro-steps are pending from before the call. */
DDP_API ddp_result ddp_train_step(ddp_context *ctx, ddp_forward_backward_fn fn, void *user,
                                  int micro_steps, float *out_loss);

/* ---- uneven inputs ---------------------------------------------------------- */

/* This rank has no more data (config.uneven_inputs): it answers the other
   ranks' synced steps with zero gradients until every rank has called
   ddp_join(), then every rank takes the weights and training state of a
   rank that ran to the end, and the call returns on all at once. Every
   rank calls it, the last ones too. See UNEVEN INPUTS. */
DDP_API ddp_result ddp_join(ddp_context *ctx);

/* ---- checkpoints ----------------------------------------------------------- */

/* Rank 0 writes parameters and the training state (optimizer state and
   step, schedule position and lr, loss scale, parameter options)
   atomically (a temporary file, fsync, rename; with a checksum); all ranks
   wait for it. The format is version 2 (see the implementation's
   checkpoints section). The temporary has no name while it is written
   where the system allows it (Linux: O_TMPFILE; Windows: it is marked for
   deletion until complete, so the system removes it if the writer dies),
   and "PATH.tmp.<host>.<pid>" only for the instant before the rename;
   temporaries of writers that no longer run on this host are removed by
   the next save. A killed writer leaves the old file or the new one,
   whole. ddp_save_safetensors writes its file the same way. */
DDP_API ddp_result ddp_save_checkpoint(ddp_context *ctx, const char *path);
/* Every rank reads the file and verifies its checksum, every header field
   (DDP_ERROR_CORRUPT naming the field), the names, shapes and dtypes and
   the parameter options (DDP_ERROR_MISMATCH), then takes the weights and
   the training state: optimizer state and step, schedule position, lr
   (ddp_set_lr), loss scale. A file without the optimizer state this
   context needs (saved without an optimizer, or with another) is
   DDP_ERROR_MISMATCH; see ddp_load_checkpoint_ex. Reads format versions 1
   and 2 (version 1 has no lr, schedule position or loss scale: those start
   as configured, the schedule at the step count). */
DDP_API ddp_result ddp_load_checkpoint(ddp_context *ctx, const char *path);
/* flags 0: ddp_load_checkpoint. DDP_LOAD_RESET_OPTIMIZER: take only the
   weights; the training state starts fresh, as after ddp_finalize()
   (zero moments, step 0, config.optimizer.lr, the initial loss scale),
   whatever the file holds (for fine-tuning, or a file saved without an
   optimizer). */
#define DDP_LOAD_RESET_OPTIMIZER 1u
DDP_API ddp_result ddp_load_checkpoint_ex(ddp_context *ctx, const char *path, unsigned flags);

/* ---- safetensors: the weights for PyTorch, Hugging Face, NumPy ------------- */
/* See SAFETENSORS in the manual above. */

typedef enum ddp_safetensors_flags {
    DDP_SAFETENSORS_STRICT        = 0, /* every parameter in the file, nothing else */
    DDP_SAFETENSORS_ALLOW_EXTRA   = 1, /* skip tensors of the file that are no parameter */
    DDP_SAFETENSORS_ALLOW_MISSING = 2  /* parameters absent from the file keep their values */
} ddp_safetensors_flags;

/* Rank 0 writes every parameter's weights to path (atomically: temporary
   file, fsync, rename); all ranks wait for it. metadata is NULL or a
   NULL-terminated list of key, value strings for the header's
   __metadata__, e.g. { "epoch", "3", NULL }. */
DDP_API ddp_result ddp_save_safetensors(ddp_context *ctx, const char *path,
                                        const char *const *metadata);
/* Every rank reads path and copies each tensor into the parameter of the
   same name, after checking the whole file; flags: ddp_safetensors_flags
   OR-ed (0: strict). On any error no parameter changes. */
DDP_API ddp_result ddp_load_safetensors(ddp_context *ctx, const char *path, int flags);

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

/* ========================================================================
   MAP of the implementation, in order (search for the titles):
     PLATFORM               the only code that knows the operating system
     switches               CUDA and NCCL
     results, the context, configuration and environment
     store.inc.c            the TCP key-value store (rendezvous), server and client
     shared-memory backend  counters, waits, reductions, collectives
     shared-memory segments
     backends, rendezvous, ddp_create/ddp_destroy, collectives on user buffers
     parameters, communication thread, the step
     optimizers, the step wrapper, checkpoints
     CUDA                   device buffers, NCCL, the staged backend
   ======================================================================== */

/* ==== PLATFORM ===========================================================

   The only section that knows the operating system: POSIX (Linux, macOS,
   the BSDs) and Win32 (MSVC, mingw-w64), each function with both bodies
   side by side. Everything after it uses this vocabulary and includes no OS
   header:

     ddp__thread_*  ddp__mutex_*  ddp__cond_*   threads, lock, condition variable
     ddp__atomic_*  DDP__PAUSE  DDP__TLS        atomics, spin hint, thread-local
     ddp__now  ddp__sleep_us  ddp__yield        monotonic clock, sleeping
     ddp__net_*  ddp__sock_*  ddp__pipe_*       sockets, the server's wake-up channel
     ddp__shm_*                                 shared memory between processes
     ddp__getpid  ddp__proc_dead                processes
     ddp__file_*  ddp__dir_sync                 durable file replacement
     ddp__strerror                              the text of an error number
     DDP__PRINTF  DDP__PRIzu  DDP__UNUSED       compiler portability

   Error numbers are errno values. On Windows, socket errors are mapped onto
   the errno constants the callers test (EWOULDBLOCK, EINPROGRESS,
   ECONNRESET, ...); any other Win32 error travels as DDP__WINERR(code),
   which ddp__strerror renders with FormatMessage. */

#if defined(_WIN32)
/* NCCL does not exist on Windows: CUDA builds use the staged backend there */
#  if defined(DDP_NCCL)
#    error "ddp.h: NCCL does not exist on Windows; CUDA builds use the staged backend there (do not define DDP_NCCL)"
#  endif
#  ifndef DDP_NO_NCCL
#    define DDP_NO_NCCL 1
#  endif
#  ifndef WIN32_LEAN_AND_MEAN
#    define WIN32_LEAN_AND_MEAN
#  endif
#  ifndef NOMINMAX
#    define NOMINMAX
#  endif
#  if defined(_WIN32_WINNT) && _WIN32_WINNT < 0x0600
#    error "ddp.h needs _WIN32_WINNT >= 0x0600 (Windows Vista or later: WSAPoll, condition variables)"
#  endif
#  include <winsock2.h>
#  include <ws2tcpip.h>
#  include <windows.h>
#  include <process.h>
#  include <io.h>
#  include <fcntl.h>
#  include <intrin.h>
#  include <aclapi.h>
#  include <sddl.h>
#  if defined(_MSC_VER)
#    pragma comment(lib, "ws2_32.lib")
#    pragma comment(lib, "advapi32.lib")
#  endif
#  ifndef WSA_FLAG_NO_HANDLE_INHERIT
#    define WSA_FLAG_NO_HANDLE_INHERIT 0x80
#  endif
#else
#  include <unistd.h>
#  include <pthread.h>
#  include <time.h>
#  include <fcntl.h>
#  include <signal.h>
#  include <sched.h>
#  include <sys/mman.h>
#  include <sys/stat.h>
#  include <sys/types.h>
#  include <sys/socket.h>
#  include <sys/time.h>
#  include <netinet/in.h>
#  include <netinet/tcp.h>
#  include <arpa/inet.h>
#  include <netdb.h>
#  include <poll.h>
#  include <dirent.h>
#  include <sys/un.h>
#  include <sys/uio.h>
#  include <sys/statvfs.h>
#  if defined(__linux__)
#    include <sys/syscall.h>
#  endif
#endif

#include <stdio.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <stdarg.h>
#include <math.h>
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <time.h>

/* ---- compiler portability ------------------------------------------------ */

#if defined(__GNUC__) || defined(__clang__)
#  define DDP__UNUSED __attribute__((unused))
#else
#  define DDP__UNUSED
#endif

/* printf-style checking: mingw-w64's C99 printf (the default from -std=c99
   on) is "gnu_printf" to GCC, its msvcrt one "ms_printf"; __MINGW_PRINTF_FORMAT
   names whichever is in force. */
#if defined(__MINGW32__)
#  define DDP__PRINTF(f, a) __attribute__((format(__MINGW_PRINTF_FORMAT, f, a)))
#elif defined(__GNUC__) || defined(__clang__)
#  define DDP__PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#  define DDP__PRINTF(f, a)
#endif

/* size_t in printf formats: "%" DDP__PRIzu. msvcrt's own printf (mingw-w64
   with __USE_MINGW_ANSI_STDIO=0) knows no %zu. */
#if defined(__MINGW32__) && !__USE_MINGW_ANSI_STDIO
#  define DDP__PRIzu "Iu"
#else
#  define DDP__PRIzu "zu"
#endif

/* thread-local storage: mingw's GCC ignores __declspec(thread), MSVC's C
   knows no _Thread_local before C11 mode */
#if defined(__cplusplus) && (__cplusplus >= 201103L || defined(_MSC_VER))
#  define DDP__TLS thread_local
#elif defined(_MSC_VER)
#  define DDP__TLS __declspec(thread)
#elif defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
#  define DDP__TLS _Thread_local
#else
#  define DDP__TLS __thread
#endif

/* a spin-wait hint */
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#  define DDP__PAUSE() __builtin_ia32_pause()
#elif (defined(__GNUC__) || defined(__clang__)) && defined(__aarch64__)
#  define DDP__PAUSE() __asm__ __volatile__("yield")
#elif defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86))
#  define DDP__PAUSE() _mm_pause()
#elif defined(_MSC_VER) && defined(_M_ARM64)
#  define DDP__PAUSE() __yield()
#else
#  define DDP__PAUSE() ((void)0)
#endif

/* prefetch for reading / writing (a hint; may do nothing) */
#if defined(__GNUC__) || defined(__clang__)
#  define DDP__PREFETCH_R(p) __builtin_prefetch((p), 0, 3)
#  define DDP__PREFETCH_W(p) __builtin_prefetch((p), 1, 3)
#elif defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86))
#  define DDP__PREFETCH_R(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#  define DDP__PREFETCH_W(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#else
#  define DDP__PREFETCH_R(p) ((void)(p))
#  define DDP__PREFETCH_W(p) ((void)(p))
#endif

/* ---- atomics --------------------------------------------------------------
   int (int32_t is int on every supported platform) and uint64_t cells shared
   between threads and between processes (shared memory): acquire loads,
   release stores, compare-and-swap and add with full ordering. */

#if defined(DDP_WIN32_MSVC_ATOMICS) && !defined(_WIN32)
#  error "ddp.h: DDP_WIN32_MSVC_ATOMICS selects the MSVC (_Interlocked*) atomics, which exist on Windows only"
#endif
#if defined(DDP_WIN32_MSVC_ATOMICS) || (defined(_MSC_VER) && !defined(__clang__))
/* MSVC: _Interlocked* for read-modify-write; a plain access and a compiler
   barrier for acquire loads and release stores, which x86 and x64 order so
   by themselves (elsewhere, a full barrier). Under mingw-w64,
   -DDDP_WIN32_MSVC_ATOMICS selects this branch, so CI runs it too. */
#  define DDP__ATOMICS_NAME "msvc"
#  if defined(_M_X64) || defined(_M_IX86) || defined(__x86_64__) || defined(__i386__)
#    define DDP__ORDER() _ReadWriteBarrier()
#  else
#    define DDP__ORDER() MemoryBarrier()
#  endif
static int ddp__atomic_load_int(const volatile int *p) { int v = *p; DDP__ORDER(); return v; }
static void ddp__atomic_store_int(volatile int *p, int v) { DDP__ORDER(); *p = v; }
static int ddp__atomic_cas_int(volatile int *p, int expected, int desired) {
    return _InterlockedCompareExchange((volatile long *)p, (long)desired, (long)expected) == (long)expected;
}
/* returns the new value */
static int ddp__atomic_add_int(volatile int *p, int v) {
    return (int)_InterlockedExchangeAdd((volatile long *)p, (long)v) + v;
}
#  if defined(_M_IX86) || defined(__i386__) /* a plain 64-bit access is two 32-bit ones there */
static uint64_t ddp__atomic_load_u64(const volatile uint64_t *p) {
    return (uint64_t)_InterlockedCompareExchange64((volatile __int64 *)p, 0, 0);
}
static void ddp__atomic_store_u64(volatile uint64_t *p, uint64_t v) {
    __int64 old = (__int64)*p, seen;
    while ((seen = _InterlockedCompareExchange64((volatile __int64 *)p, (__int64)v, old)) != old) old = seen;
}
#  else
static uint64_t ddp__atomic_load_u64(const volatile uint64_t *p) { uint64_t v = *p; DDP__ORDER(); return v; }
static void ddp__atomic_store_u64(volatile uint64_t *p, uint64_t v) { DDP__ORDER(); *p = v; }
#  endif
#else
/* GCC and Clang builtins: C99, C++, and nvcc's host compiler alike */
#  define DDP__ATOMICS_NAME "gcc"
static int ddp__atomic_load_int(const volatile int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static void ddp__atomic_store_int(volatile int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static int ddp__atomic_cas_int(volatile int *p, int expected, int desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
static int ddp__atomic_add_int(volatile int *p, int v) { return __atomic_add_fetch(p, v, __ATOMIC_ACQ_REL); }
static uint64_t ddp__atomic_load_u64(const volatile uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static void ddp__atomic_store_u64(volatile uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
#endif

/* ---- error text ----------------------------------------------------------- */

#if defined(_WIN32)
#  define DDP__WINERR_BASE 0x10000000
/* a Win32 error code carried where an errno value is expected */
#  define DDP__WINERR(code) ((int)(DDP__WINERR_BASE | ((unsigned long)(code) & 0x0FFFFFFFul)))

/* A Winsock error as the errno constant the callers compare with. */
static int ddp__wsa_errno(int w) {
    switch (w) {
    case 0: return 0;
    case WSAEINTR: return EINTR;
    case WSAEWOULDBLOCK: return EWOULDBLOCK;
    case WSAEINPROGRESS: return EINPROGRESS;
    case WSAECONNRESET: case WSAENETRESET: return ECONNRESET;
    case WSAECONNABORTED: return ECONNABORTED;
    case WSAESHUTDOWN: return EPIPE;
    case WSAEADDRINUSE: return EADDRINUSE;
    case WSAEADDRNOTAVAIL: return EADDRNOTAVAIL;
    case WSAEACCES: return EACCES;
    case WSAETIMEDOUT: return ETIMEDOUT;
    case WSAEMFILE: return EMFILE;
    case WSAENOBUFS: return ENOBUFS;
    case WSAECONNREFUSED: return ECONNREFUSED;
    case WSAENETUNREACH: return ENETUNREACH;
    case WSAEHOSTUNREACH: return EHOSTUNREACH;
    default: return DDP__WINERR(w);
    }
}

/* Text for an errno value or a DDP__WINERR code (per thread, until the next call). */
static const char *ddp__strerror(int e) {
    static const struct { int e; const char *s; } net[] = {
        { EADDRINUSE, "Address already in use" }, { EADDRNOTAVAIL, "Cannot assign requested address" },
        { ECONNABORTED, "Software caused connection abort" }, { ECONNREFUSED, "Connection refused" },
        { ECONNRESET, "Connection reset by peer" }, { EHOSTUNREACH, "No route to host" },
        { EINPROGRESS, "Operation now in progress" }, { ENETUNREACH, "Network is unreachable" },
        { ENOBUFS, "No buffer space available" }, { ETIMEDOUT, "Connection timed out" },
        { EWOULDBLOCK, "Resource temporarily unavailable" }
    };
    static DDP__TLS char buf[320];
    size_t i, n;
    DWORD code;
    if (e < DDP__WINERR_BASE) {
        for (i = 0; i < sizeof net / sizeof net[0]; i++)
            if (net[i].e == e) return net[i].s;
        return strerror(e); /* the CRT's table (errno values below 100) */
    }
    code = (DWORD)(e - DDP__WINERR_BASE);
    n = FormatMessageA(FORMAT_MESSAGE_FROM_SYSTEM | FORMAT_MESSAGE_IGNORE_INSERTS | FORMAT_MESSAGE_MAX_WIDTH_MASK,
                       NULL, code, 0, buf, (DWORD)sizeof buf - 32, NULL);
    while (n > 0 && (buf[n - 1] == ' ' || buf[n - 1] == '.' || buf[n - 1] == '\r' || buf[n - 1] == '\n')) n--;
    snprintf(buf + n, sizeof buf - n, "%sWindows error %lu%s", n ? " (" : "", (unsigned long)code, n ? ")" : "");
    return buf;
}
#else
static const char *ddp__strerror(int e) { return strerror(e); }
#endif

/* ---- time ------------------------------------------------------------------ */

/* seconds on a monotonic clock */
static double ddp__now(void) {
#if defined(_WIN32)
    LARGE_INTEGER f, c;
    QueryPerformanceFrequency(&f);
    QueryPerformanceCounter(&c);
    return (double)(c.QuadPart / f.QuadPart) + (double)(c.QuadPart % f.QuadPart) / (double)f.QuadPart;
#else
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
#endif
}

/* Windows' Sleep counts milliseconds (and Sleep(1) takes about 15.6 ms on
   real Windows unless the timer resolution was raised; 1 ms under Wine):
   shorter sleeps use a high-resolution waitable timer (Windows 10 1803 and
   later, and Wine), else Sleep(1). A waiting rank must really sleep: giving
   up the time slice alone keeps the core busy, and starves the other ranks
   and the store's thread on a loaded machine. */
#  if defined(_WIN32) && !defined(CREATE_WAITABLE_TIMER_HIGH_RESOLUTION)
#    define CREATE_WAITABLE_TIMER_HIGH_RESOLUTION 0x00000002
#  endif
static void ddp__sleep_us(long us) {
#if defined(_WIN32)
    static int no_hires = 0; /* set once when the timer kind is unknown (a benign race) */
    if (us <= 0) {
        SwitchToThread();
        return;
    }
    if (us < 1000 && !no_hires) {
        HANDLE t = CreateWaitableTimerExW(NULL, NULL, CREATE_WAITABLE_TIMER_HIGH_RESOLUTION, TIMER_ALL_ACCESS);
        if (t) {
            LARGE_INTEGER due;
            due.QuadPart = -(LONGLONG)us * 10; /* relative, in 100 ns */
            if (SetWaitableTimer(t, &due, 0, NULL, NULL, FALSE)) WaitForSingleObject(t, INFINITE);
            CloseHandle(t);
            return;
        }
        no_hires = 1;
    }
    Sleep((DWORD)((us + 999) / 1000));
#else
    struct timespec ts;
    ts.tv_sec = us / 1000000;
    ts.tv_nsec = (us % 1000000) * 1000;
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) { }
#endif
}

static void ddp__yield(void) {
#if defined(_WIN32)
    SwitchToThread();
#else
    sched_yield();
#endif
}

/* ---- threads, lock, condition variable ---------------------------------- */

typedef void *(*ddp__thread_fn)(void *arg);

#if defined(_WIN32)
typedef struct ddp__thread { HANDLE h; DWORD id; ddp__thread_fn fn; void *arg; } ddp__thread;
typedef SRWLOCK ddp__mutex;
typedef CONDITION_VARIABLE ddp__cond;
static unsigned __stdcall ddp__thread_entry(void *p) {
    ddp__thread *t = (ddp__thread *)p;
    t->fn(t->arg);
    return 0;
}
#else
typedef struct ddp__thread { pthread_t t; } ddp__thread;
typedef pthread_mutex_t ddp__mutex;
typedef pthread_cond_t ddp__cond;
#endif

/* 0 or an error number. t must stay where it is until joined. */
static int ddp__thread_start(ddp__thread *t, ddp__thread_fn fn, void *arg) {
#if defined(_WIN32)
    unsigned id = 0;
    t->fn = fn;
    t->arg = arg;
    /* suspended until t->id is set: the thread may ask ddp__thread_is_self at once */
    t->h = (HANDLE)_beginthreadex(NULL, 0, ddp__thread_entry, t, CREATE_SUSPENDED, &id);
    if (!t->h) return errno ? errno : EAGAIN;
    t->id = (DWORD)id;
    ResumeThread(t->h);
    return 0;
#else
    return pthread_create(&t->t, NULL, fn, arg);
#endif
}

/* The same, for a thread that must take no signals (they belong to the
   user's threads); on Windows there are none to block. */
static int ddp__thread_start_nosignals(ddp__thread *t, ddp__thread_fn fn, void *arg) {
#if defined(_WIN32)
    return ddp__thread_start(t, fn, arg);
#else
    sigset_t all, old;
    int rc;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(&t->t, NULL, fn, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return rc;
#endif
}

static void ddp__thread_join(ddp__thread *t) {
#if defined(_WIN32)
    WaitForSingleObject(t->h, INFINITE);
    CloseHandle(t->h);
    t->h = NULL;
#else
    pthread_join(t->t, NULL);
#endif
}

static int ddp__thread_is_self(const ddp__thread *t) {
#if defined(_WIN32)
    return GetCurrentThreadId() == t->id;
#else
    return pthread_equal(pthread_self(), t->t);
#endif
}

static void ddp__mutex_init(ddp__mutex *m) {
#if defined(_WIN32)
    InitializeSRWLock(m);
#else
    pthread_mutex_init(m, NULL);
#endif
}
static void ddp__mutex_destroy(ddp__mutex *m) {
#if defined(_WIN32)
    (void)m; /* an SRW lock holds no resources */
#else
    pthread_mutex_destroy(m);
#endif
}
static void ddp__mutex_lock(ddp__mutex *m) {
#if defined(_WIN32)
    AcquireSRWLockExclusive(m);
#else
    pthread_mutex_lock(m);
#endif
}
static void ddp__mutex_unlock(ddp__mutex *m) {
#if defined(_WIN32)
    ReleaseSRWLockExclusive(m);
#else
    pthread_mutex_unlock(m);
#endif
}

static void ddp__cond_init(ddp__cond *c) {
#if defined(_WIN32)
    InitializeConditionVariable(c);
#else
    pthread_cond_init(c, NULL);
#endif
}
static void ddp__cond_destroy(ddp__cond *c) {
#if defined(_WIN32)
    (void)c;
#else
    pthread_cond_destroy(c);
#endif
}
static void ddp__cond_wait(ddp__cond *c, ddp__mutex *m) {
#if defined(_WIN32)
    SleepConditionVariableSRW(c, m, INFINITE, 0);
#else
    pthread_cond_wait(c, m);
#endif
}
/* Wait at most until deadline (ddp__now() seconds): 1 if it passed. */
static int ddp__cond_wait_until(ddp__cond *c, ddp__mutex *m, double deadline) {
    double left = deadline - ddp__now();
#if defined(_WIN32)
    DWORD ms;
    if (left <= 0) return 1;
    ms = left > 4e6 ? (DWORD)4000000000u : (DWORD)(left * 1000.0) + 1;
    if (SleepConditionVariableSRW(c, m, ms, 0)) return 0;
    return GetLastError() == ERROR_TIMEOUT && ddp__now() >= deadline;
#else
    struct timespec ts;
    if (left <= 0) return 1;
    if (left > 1e7) left = 1e7;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += (time_t)left;
    ts.tv_nsec += (long)((left - (double)(time_t)left) * 1e9);
    if (ts.tv_nsec >= 1000000000L) { ts.tv_sec++; ts.tv_nsec -= 1000000000L; }
    return pthread_cond_timedwait(c, m, &ts) == ETIMEDOUT;
#endif
}
static void ddp__cond_signal(ddp__cond *c) {
#if defined(_WIN32)
    WakeConditionVariable(c);
#else
    pthread_cond_signal(c);
#endif
}
static void ddp__cond_broadcast(ddp__cond *c) {
#if defined(_WIN32)
    WakeAllConditionVariable(c);
#else
    pthread_cond_broadcast(c);
#endif
}

/* ---- processes --------------------------------------------------------------- */

static int ddp__getpid(void) {
#if defined(_WIN32)
    return (int)GetCurrentProcessId();
#else
    return (int)getpid();
#endif
}

/* 1 when process pid certainly no longer runs on this host (0 when it
   does, when that cannot be told, e.g. another user's process, and for
   pid <= 0). POSIX counts a zombie (exited, not yet reaped) as running;
   Windows reports an exit at once. */
static int ddp__proc_dead(int pid) {
#if defined(_WIN32)
    HANDLE h;
    int dead;
    if (pid <= 0) return 0;
    h = OpenProcess(SYNCHRONIZE | PROCESS_QUERY_LIMITED_INFORMATION, FALSE, (DWORD)pid);
    if (!h) return GetLastError() == ERROR_INVALID_PARAMETER; /* no process has that id */
    dead = WaitForSingleObject(h, 0) == WAIT_OBJECT_0;          /* it exited; its id is kept by our handle */
    CloseHandle(h);
    return dead;
#else
    if (pid <= 0) return 0;
    return kill((pid_t)pid, 0) != 0 && errno == ESRCH;
#endif
}

/* The user this process runs as, as identity records carry it: the
   effective uid on POSIX; 0 on Windows, which has no number for a user
   (its shared memory is checked against the owner's SID instead, see
   ddp__shm_obj_trust). */
static unsigned ddp__proc_uid(void) {
#if defined(_WIN32)
    return 0;
#else
    return (unsigned)geteuid();
#endif
}

/* This host's name, "?" when unknown. */
static void ddp__proc_hostname(char *out, size_t cap) {
#if defined(_WIN32)
    DWORD n = (DWORD)cap;
    if (!GetComputerNameA(out, &n)) snprintf(out, cap, "?");
#else
    if (gethostname(out, cap) != 0) snprintf(out, cap, "?");
#endif
    out[cap - 1] = 0;
}

/* ---- randomness ------------------------------------------------------------------ */

/* n bytes from the operating system's random generator: 0, or -1 (errno).
   Linux: getrandom, else /dev/urandom; other POSIX systems: /dev/urandom;
   Windows: RtlGenRandom (advapi32's SystemFunction036, what the CRT's
   rand_s uses), looked up at run time because the SDK declares it only in
   <ntsecapi.h> under another name. */
static int ddp__sys_random(void *buf, size_t n) {
#if defined(_WIN32)
    typedef BOOLEAN (WINAPI *gen_fn)(PVOID, ULONG);
    static gen_fn gen = NULL; /* set once (a benign race: every thread finds the same) */
    unsigned char *p = (unsigned char *)buf;
    if (!gen) {
        HMODULE adv = LoadLibraryA("advapi32.dll"); /* kept loaded: gen must stay valid */
        gen = adv ? (gen_fn)(void (*)(void))GetProcAddress(adv, "SystemFunction036") : NULL;
        if (!gen) { errno = ENOSYS; return -1; }
    }
    while (n > 0) {
        ULONG k = n > 0x40000000u ? 0x40000000u : (ULONG)n;
        if (!gen(p, k)) { errno = EIO; return -1; }
        p += k;
        n -= k;
    }
    return 0;
#else
    unsigned char *p = (unsigned char *)buf;
    int fd;
#  if defined(__linux__) && defined(SYS_getrandom)
    while (n > 0) {
        long r = syscall(SYS_getrandom, p, n, 0);
        if (r > 0) { p += r; n -= (size_t)r; continue; }
        if (r < 0 && errno == EINTR) continue;
        break; /* ENOSYS (old kernel, seccomp): /dev/urandom below */
    }
    if (n == 0) return 0;
#  endif
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
#endif
}

/* ---- sockets ------------------------------------------------------------------
   A socket is an int: a descriptor on POSIX; on Windows a SOCKET, which is a
   kernel handle and so 32-bit significant (Microsoft documents that 64-bit
   handles may be truncated to 32 bits and sign-extended back), -1 standing
   for INVALID_SOCKET. Calls return what the POSIX calls return; the error
   of the last failed call is ddp__sock_errno(). Winsock is started and
   stopped with the contexts (ddp__net_start/stop, reference counted by
   Winsock itself). */

#if defined(_WIN32)
typedef SSIZE_T ddp__ssize;
typedef ULONG ddp__nfds;
#  define DDP__SOCK_NOSIGNAL 0 /* no SIGPIPE on Windows */
#  define DDP__SOCK_DONTWAIT 0 /* every socket of the library is non-blocking anyway */
static SOCKET ddp__s(int fd) { return (SOCKET)(INT_PTR)fd; }
#else
typedef ssize_t ddp__ssize;
typedef nfds_t ddp__nfds;
#  ifdef MSG_NOSIGNAL
#    define DDP__SOCK_NOSIGNAL MSG_NOSIGNAL
#  else
#    define DDP__SOCK_NOSIGNAL 0 /* macOS: SO_NOSIGPIPE is set on every socket instead */
#  endif
#  define DDP__SOCK_DONTWAIT MSG_DONTWAIT
#endif

static int ddp__net_start(void) {
#if defined(_WIN32)
    WSADATA d;
    int e = WSAStartup(MAKEWORD(2, 2), &d);
    return e ? ddp__wsa_errno(e) : 0;
#else
    return 0;
#endif
}
static void ddp__net_stop(void) {
#if defined(_WIN32)
    WSACleanup();
#endif
}

static int ddp__sock_errno(void) {
#if defined(_WIN32)
    return ddp__wsa_errno(WSAGetLastError());
#else
    return errno;
#endif
}

/* getaddrinfo's error text */
static const char *ddp__gai_strerror(int rc) {
#if defined(_WIN32)
    return ddp__strerror(ddp__wsa_errno(rc)); /* getaddrinfo returns Winsock errors */
#else
    return rc == EAI_SYSTEM ? strerror(errno) : gai_strerror(rc);
#endif
}

/* A new socket that child processes do not inherit; -1 on failure. */
static int ddp__sock_open(int family, int type, int protocol) {
#if defined(_WIN32)
    SOCKET s = WSASocketW(family, type, protocol, NULL, 0, WSA_FLAG_OVERLAPPED | WSA_FLAG_NO_HANDLE_INHERIT);
    if (s == INVALID_SOCKET && WSAGetLastError() == WSAEINVAL) { /* before Windows 7 SP1 */
        s = socket(family, type, protocol);
        if (s != INVALID_SOCKET) SetHandleInformation((HANDLE)s, HANDLE_FLAG_INHERIT, 0);
    }
    if (s == INVALID_SOCKET) return -1;
    if (ddp__s((int)s) != s) { closesocket(s); WSASetLastError(WSAEMFILE); return -1; } /* never: see above */
    return (int)s;
#else
    int fd = socket(family, type, protocol);
    if (fd >= 0) fcntl(fd, F_SETFD, fcntl(fd, F_GETFD) | FD_CLOEXEC);
    return fd;
#endif
}

/* Non-blocking, not inherited, no SIGPIPE. */
static void ddp__sock_prepare(int fd) {
#if defined(_WIN32)
    u_long one = 1;
    ioctlsocket(ddp__s(fd), FIONBIO, &one);
#else
    fcntl(fd, F_SETFD, fcntl(fd, F_GETFD) | FD_CLOEXEC);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
#  ifdef SO_NOSIGPIPE
    {
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, sizeof one);
    }
#  endif
#endif
}

static void ddp__sock_close(int fd) {
#if defined(_WIN32)
    closesocket(ddp__s(fd));
#else
    close(fd);
#endif
}

/* A pending connection (sa, len: its address, or NULL); -1 when none. */
static int ddp__sock_accept(int fd, struct sockaddr *sa, socklen_t *len) {
#if defined(_WIN32)
    SOCKET s = accept(ddp__s(fd), sa, len);
    if (s == INVALID_SOCKET) return -1;
    SetHandleInformation((HANDLE)s, HANDLE_FLAG_INHERIT, 0);
    return (int)s;
#else
    return accept(fd, sa, len);
#endif
}

/* Windows answers a bind to a port another socket holds with
   SO_EXCLUSIVEADDRUSE (ddp__sock_listen_prepare) with WSAEACCES: that is
   EADDRINUSE to the callers. */
static int ddp__sock_bind(int fd, const struct sockaddr *sa, socklen_t len) {
#if defined(_WIN32)
    if (bind(ddp__s(fd), sa, len) == 0) return 0;
    if (WSAGetLastError() == WSAEACCES) WSASetLastError(WSAEADDRINUSE);
    return -1;
#else
    return bind(fd, sa, len);
#endif
}

static int ddp__sock_listen(int fd, int backlog) {
#if defined(_WIN32)
    return listen(ddp__s(fd), backlog) == 0 ? 0 : -1;
#else
    return listen(fd, backlog);
#endif
}

/* On a non-blocking socket a connection in progress is EINPROGRESS on both. */
static int ddp__sock_connect(int fd, const struct sockaddr *sa, socklen_t len) {
#if defined(_WIN32)
    if (connect(ddp__s(fd), sa, len) == 0) return 0;
    if (WSAGetLastError() == WSAEWOULDBLOCK) WSASetLastError(WSAEINPROGRESS);
    return -1;
#else
    return connect(fd, sa, len);
#endif
}

static int ddp__sock_name(int fd, struct sockaddr *sa, socklen_t *len) {
#if defined(_WIN32)
    return getsockname(ddp__s(fd), sa, len) == 0 ? 0 : -1;
#else
    return getsockname(fd, sa, len);
#endif
}

/* A free TCP port on the loopback interface, 0 if none (dp.h's store, the
   tests): bound, read and released, so another may take it first. */
DDP__UNUSED static int ddp__free_loopback_port(void) {
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    int fd, port = 0;
    if (ddp__net_start() != 0) return 0;
    fd = ddp__sock_open(AF_INET, SOCK_STREAM, 0);
    if (fd >= 0) {
        memset(&a, 0, sizeof a);
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (ddp__sock_bind(fd, (struct sockaddr *)&a, sizeof a) == 0 && ddp__sock_name(fd, (struct sockaddr *)&a, &len) == 0)
            port = ntohs(a.sin_port);
        ddp__sock_close(fd);
    }
    ddp__net_stop();
    return port;
}

static int ddp__sock_setopt(int fd, int level, int name, const void *val, socklen_t len) {
#if defined(_WIN32)
    return setsockopt(ddp__s(fd), level, name, (const char *)val, len) == 0 ? 0 : -1;
#else
    return setsockopt(fd, level, name, val, len);
#endif
}

/* The outcome of a non-blocking connect: 0 or an error number. */
static int ddp__sock_so_error(int fd) {
    int e = 0;
    socklen_t sl = sizeof e;
#if defined(_WIN32)
    if (getsockopt(ddp__s(fd), SOL_SOCKET, SO_ERROR, (char *)&e, &sl) != 0) return ddp__sock_errno();
    return ddp__wsa_errno(e);
#else
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &sl) != 0) return errno;
    return e;
#endif
}

/* A listening socket, before its bind. POSIX: SO_REUSEADDR, so a store can
   listen again at once while a previous one's connections linger in
   TIME_WAIT (on POSIX it never lets two sockets listen on one port).
   Windows: SO_EXCLUSIVEADDRUSE, so that no other socket can bind the port
   while this one holds it: not with SO_REUSEADDR (which on Windows would
   let a second socket take a port in use, and steal its connections), and
   not on the wildcard address beside this one's specific address (or the
   reverse), which Windows otherwise allows. Two jobs on one port then fail
   at bind, as on POSIX. Windows documents that such a port stays taken
   while connections the listener accepted are open, after the listener
   closed (see PLATFORMS in the manual). */
static void ddp__sock_listen_prepare(int fd) {
#if defined(_WIN32)
    BOOL one = TRUE;
    setsockopt(ddp__s(fd), SOL_SOCKET, SO_EXCLUSIVEADDRUSE, (const char *)&one, (int)sizeof one);
#else
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
#endif
}

static ddp__ssize ddp__sock_send(int fd, const void *p, size_t n, int flags) {
#if defined(_WIN32)
    (void)flags;
    return send(ddp__s(fd), (const char *)p, n > INT_MAX ? INT_MAX : (int)n, 0);
#else
    return send(fd, p, n, flags);
#endif
}

static ddp__ssize ddp__sock_recv(int fd, void *p, size_t n, int flags) {
#if defined(_WIN32)
    (void)flags;
    return recv(ddp__s(fd), (char *)p, n > INT_MAX ? INT_MAX : (int)n, 0);
#else
    return recv(fd, p, n, flags);
#endif
}

#if defined(_WIN32)
/* One socket through select(): WSAPoll does not report a failed connect on
   Windows before 10 2004; select() does, in the exception set. */
static int ddp__sock_select1(struct pollfd *p, int ms) {
    fd_set r, w, x;
    struct timeval tv, *ptv = NULL;
    int rc;
    FD_ZERO(&r); FD_ZERO(&w); FD_ZERO(&x);
    if (p->events & POLLIN) FD_SET(p->fd, &r);
    if (p->events & POLLOUT) FD_SET(p->fd, &w);
    FD_SET(p->fd, &x);
    if (ms >= 0) { tv.tv_sec = ms / 1000; tv.tv_usec = (ms % 1000) * 1000; ptv = &tv; }
    rc = select(0, &r, &w, &x, ptv);
    p->revents = 0;
    if (rc <= 0) return rc < 0 ? -1 : 0;
    if (FD_ISSET(p->fd, &r)) p->revents |= POLLRDNORM;
    if (FD_ISSET(p->fd, &w)) p->revents |= POLLWRNORM;
    if (FD_ISSET(p->fd, &x)) p->revents |= POLLERR;
    return 1;
}
#endif

/* poll(): entries with fd -1 are skipped; POLLIN in revents may come as
   POLLRDNORM alone on Windows (test with &, never ==). */
static int ddp__sock_poll(struct pollfd *p, ddp__nfds n, int ms) {
#if defined(_WIN32)
    struct pollfd few[16], *q = few;
    ULONG *idx = NULL, small_idx[16], i, k = 0;
    int rc;
    if (n == 1 && p[0].fd != INVALID_SOCKET) return ddp__sock_select1(p, ms);
    for (i = 0; i < n; i++) if (p[i].fd == INVALID_SOCKET) break;
    if (i == n) {
        rc = WSAPoll(p, n, ms);
        return rc == SOCKET_ERROR ? -1 : rc;
    }
    /* WSAPoll rejects closed entries on older Windows: poll the others */
    if (n > 16) {
        q = (struct pollfd *)malloc(n * sizeof *q);
        idx = (ULONG *)malloc(n * sizeof *idx);
        if (!q || !idx) { free(q); free(idx); WSASetLastError(WSAENOBUFS); return -1; }
    } else {
        idx = small_idx;
    }
    for (i = 0; i < n; i++) {
        p[i].revents = 0;
        if (p[i].fd == INVALID_SOCKET) continue;
        q[k] = p[i];
        idx[k++] = i;
    }
    rc = k ? WSAPoll(q, k, ms) : (Sleep(ms < 0 ? INFINITE : (DWORD)ms), 0);
    if (rc > 0) for (i = 0; i < k; i++) p[idx[i]].revents = q[i].revents;
    if (q != few) { free(q); free(idx); }
    return rc == SOCKET_ERROR ? -1 : rc;
#else
    return poll(p, n, ms);
#endif
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

/* ---- the wake-up channel ------------------------------------------------------
   A pipe whose read end sits in a poll set beside sockets: a pipe on POSIX;
   on Windows, where WSAPoll takes sockets only, a pair of loopback UDP
   sockets connected to each other (no listener, no TCP port taken, and a
   connected datagram socket takes datagrams from its peer only). p[0] is
   read, p[1] written. 0 or -1 (ddp__sock_errno). */

static int ddp__pipe_open(int p[2]) {
#if defined(_WIN32)
    struct sockaddr_in a[2];
    int fd[2] = { -1, -1 }, i, e;
    for (i = 0; i < 2; i++) {
        socklen_t len = sizeof a[i];
        memset(&a[i], 0, sizeof a[i]);
        a[i].sin_family = AF_INET;
        a[i].sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        fd[i] = ddp__sock_open(AF_INET, SOCK_DGRAM, 0);
        if (fd[i] < 0 || ddp__sock_bind(fd[i], (struct sockaddr *)&a[i], sizeof a[i]) != 0 ||
            ddp__sock_name(fd[i], (struct sockaddr *)&a[i], &len) != 0)
            goto fail;
    }
    if (ddp__sock_connect(fd[0], (struct sockaddr *)&a[1], sizeof a[1]) != 0 ||
        ddp__sock_connect(fd[1], (struct sockaddr *)&a[0], sizeof a[0]) != 0)
        goto fail;
    ddp__sock_prepare(fd[0]);
    ddp__sock_prepare(fd[1]);
    p[0] = fd[0];
    p[1] = fd[1];
    return 0;
fail:
    e = WSAGetLastError();
    for (i = 0; i < 2; i++) if (fd[i] >= 0) ddp__sock_close(fd[i]);
    WSASetLastError(e);
    return -1;
#else
    if (pipe(p) != 0) return -1;
    fcntl(p[0], F_SETFD, FD_CLOEXEC);
    fcntl(p[1], F_SETFD, FD_CLOEXEC);
    return 0;
#endif
}

static ddp__ssize ddp__pipe_read(int fd, void *buf, size_t n) {
#if defined(_WIN32)
    return ddp__sock_recv(fd, buf, n, 0);
#else
    return read(fd, buf, n);
#endif
}

static ddp__ssize ddp__pipe_write(int fd, const void *buf, size_t n) {
#if defined(_WIN32)
    return ddp__sock_send(fd, buf, n, 0);
#else
    return write(fd, buf, n);
#endif
}

static void ddp__pipe_close(int fd) {
#if defined(_WIN32)
    ddp__sock_close(fd);
#else
    close(fd);
#endif
}

/* ---- local sockets (shared memory handed over as descriptors) -------------------
   Linux: Unix-domain stream sockets in the abstract namespace, so the name
   exists nowhere on disk and dies with its socket; rank 0 hands memfd
   descriptors to the ranks of its host through them (SCM_RIGHTS), and
   each side asks the kernel who the other is (SO_PEERCRED). Elsewhere
   (other POSIX systems, Windows) these fail with ENOSYS, and the shared
   memory layer uses named segments instead (see "shared memory" below).
   Names are "@ddp-<pid>-<32 hex>". Descriptors are ints; -1 is none. */

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

/* Listen on a new random name (written to name): 0, or -1 (errno). */
static int ddp__sock_local_listen(char *name, size_t cap, int *fd_out) {
#if defined(__linux__)
    struct sockaddr_un a;
    unsigned char rnd[16];
    char hex[33];
    socklen_t len;
    int fd, i;
    *fd_out = -1;
    if (ddp__sys_random(rnd, sizeof rnd) != 0) return -1;
    for (i = 0; i < 16; i++) snprintf(hex + 2 * i, 3, "%02x", rnd[i]);
    snprintf(name, cap, "@ddp-%d-%s", ddp__getpid(), hex);
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

/* A pending connection, non-blocking; -1 when none (or on error). */
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

static void ddp__sock_local_close(int fd) {
#if defined(__linux__)
    if (fd >= 0) close(fd);
#else
    (void)fd; /* never opened */
#endif
}

/* The process at the other end of a local socket (the kernel's word, not
   the peer's): 0, or -1 (errno). */
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
#if defined(__linux__)
    struct pollfd pf[65];
    int i;
    if (n > 65) n = 65;
    for (i = 0; i < n; i++) { pf[i].fd = fds[i]; pf[i].events = POLLIN; pf[i].revents = 0; }
    if (poll(pf, (nfds_t)n, ms) < 0) for (i = 0; i < n; i++) pf[i].revents = 0;
    for (i = 0; i < n; i++) ready[i] = pf[i].revents != 0;
#else
    int i;
    (void)fds; (void)ms;
    for (i = 0; i < n; i++) ready[i] = 0;
#endif
}

/* Read what is there without waiting: > 0 bytes, 0 nothing yet, -1 closed
   or failed. */
static long ddp__sock_local_read(int fd, void *buf, size_t n) {
#if defined(__linux__)
    ssize_t got = recv(fd, buf, n, MSG_DONTWAIT);
    if (got > 0) return (long)got;
    if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return 0;
    return -1;
#else
    (void)fd; (void)buf; (void)n; errno = ENOSYS; return -1;
#endif
}

/* Send all n bytes (a few dozen, into an empty socket); 0 ok. */
static int ddp__sock_local_write(int fd, const void *buf, size_t n) {
#if defined(__linux__)
    return send(fd, buf, n, MSG_NOSIGNAL) == (ssize_t)n ? 0 : -1;
#else
    (void)fd; (void)buf; (void)n; errno = ENOSYS; return -1;
#endif
}

/* One status byte, with a descriptor attached when fd >= 0. */
static int ddp__sock_send_fd(int sock, int fd, unsigned char status) {
#if defined(__linux__)
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
#else
    (void)sock; (void)fd; (void)status; errno = ENOSYS; return -1;
#endif
}

/* Receive what ddp__sock_send_fd sent, waiting until deadline (ddp__now
   seconds). *fd_out is -1 when no descriptor came. 0 ok; -1 error/timeout
   (errno ETIMEDOUT), or the peer closed (errno ECONNRESET). */
static int ddp__sock_recv_fd(int sock, double deadline, unsigned char *status, int *fd_out) {
#if defined(__linux__)
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
#  if defined(MSG_CMSG_CLOEXEC)
        r = recvmsg(sock, &m, MSG_CMSG_CLOEXEC);
#  else
        r = recvmsg(sock, &m, 0);
#  endif
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
#else
    (void)sock; (void)deadline; (void)status; *fd_out = -1; errno = ENOSYS; return -1;
#endif
}

/* ---- shared memory ---------------------------------------------------------------
   Objects that rank 0 makes and the other ranks of its host map. A handle
   is an int (-1: none): a descriptor on POSIX, a section HANDLE on Windows
   (32-bit significant, as sockets are). What decides whom to trust sits
   above, in "shared-memory segments"; these functions only do what the
   system does. They fail with -1 and errno (a Win32 error travels as
   DDP__WINERR(code)), or return an error number where the comment says so.
     Linux    anonymous objects (memfd_create): no name at all, the memory
              goes with the last descriptor and mapping whatever kills the
              processes; rank 0 hands the descriptor to the other ranks over
              a local socket (above).
     POSIX    named objects (shm_open, "/dev/shm/ddp-<pid>-..."), where
              memfd is missing or DDP__SHM_NAMED is defined: their names can
              outlive a killed creator (ddp__shm_sweep_dead removes those of
              dead creators).
     Windows  named sections backed by the paging file (CreateFileMapping
              with INVALID_HANDLE_VALUE, SEC_COMMIT: the whole size is
              committed at creation, so an exhausted paging file fails there
              and not later). A section vanishes with its last handle and
              view, so nothing outlives the processes whatever kills them,
              and its name vanishes with its last handle: the creator keeps
              one handle per name (a small table) until ddp__shm_obj_unlink,
              which is what lets the other ranks open it meanwhile. Only the
              current user may open one (its owner is the user's SID, its
              DACL one entry granting that SID; hence advapi32) and its name
              carries 96 random bits ("Local\ddp-<pid>-<n>-<what>-<24 hex>").
              Handing section handles to the peers with DuplicateHandle
              instead of names was considered: rank 0 would need
              PROCESS_DUP_HANDLE on every peer (a right equal to full control
              of it) and the handle's value still travels through the store,
              where a receiver can trust it no more than a name; a name that
              lives only until every rank has mapped it, and that each
              receiver verifies before it trusts the memory (owner, DACL,
              size, the context's nonce in the header), gives the same
              guarantees with less. */

#if defined(_WIN32)
#  define DDP__SHM_NAME_PREFIX "Local\\"
#  define DDP__SHM_WHERE       "the paging file"
#  define DDP__SHM_REMEDY      "free memory, or let Windows enlarge the paging file"
#  define DDP__SHM_KEEP 64 /* names kept alive at once per process (a context needs one, during set-up) */
static struct { char name[96]; HANDLE h; } ddp__shm_kept[DDP__SHM_KEEP];
static SRWLOCK ddp__shm_kept_lock = SRWLOCK_INIT;

static HANDLE ddp__shm_h(int fd) { return (HANDLE)(INT_PTR)fd; }

/* A Win32 error as an errno value where callers test one. */
static int ddp__win_errno(DWORD e) {
    switch (e) {
    case ERROR_NOT_ENOUGH_MEMORY: case ERROR_OUTOFMEMORY: case ERROR_COMMITMENT_LIMIT: return ENOMEM;
    case ERROR_DISK_FULL: return ENOSPC;
    case ERROR_ALREADY_EXISTS: case ERROR_FILE_EXISTS: return EEXIST;
    case ERROR_FILE_NOT_FOUND: case ERROR_PATH_NOT_FOUND: return ENOENT;
    case ERROR_ACCESS_DENIED: return EACCES;
    default: return DDP__WINERR(e);
    }
}

/* The current user's SID (TokenUser) and the default owner of what it
   creates (TokenOwner: the Administrators group for an elevated
   administrator). 0 or a Win32 error. */
typedef struct ddp__win_user {
    union { TOKEN_USER tu; unsigned char b[256]; unsigned long long align; } user;
    union { TOKEN_OWNER to; unsigned char b[256]; unsigned long long align; } owner;
} ddp__win_user;

static DWORD ddp__win_user_get(ddp__win_user *u) {
    HANDLE tok;
    DWORD len = 0, e = 0;
    if (!OpenProcessToken(GetCurrentProcess(), TOKEN_QUERY, &tok)) return GetLastError();
    if (!GetTokenInformation(tok, TokenUser, u->user.b, (DWORD)sizeof u->user.b, &len) ||
        !GetTokenInformation(tok, TokenOwner, u->owner.b, (DWORD)sizeof u->owner.b, &len))
        e = GetLastError();
    CloseHandle(tok);
    return e;
}

/* A SID as text ("S-1-5-21-..."), for messages. */
static void ddp__win_sid_text(PSID sid, char *out, size_t cap) {
    char *s = NULL;
    if (sid && ConvertSidToStringSidA(sid, &s)) {
        snprintf(out, cap, "%s", s);
        LocalFree(s);
    } else {
        snprintf(out, cap, "an unknown user");
    }
}

typedef struct ddp__win_sa {
    SECURITY_ATTRIBUTES sa;
    SECURITY_DESCRIPTOR sd;
    ddp__win_user u;
    union { ACL acl; unsigned char b[256]; unsigned long long align; } acl;
} ddp__win_sa;

/* Security attributes: owned by the current user, everything granted to
   that user and nothing to anybody else. 0 or a Win32 error. */
static DWORD ddp__win_owner_only(ddp__win_sa *s) {
    DWORD e = ddp__win_user_get(&s->u);
    if (e) return e;
    if (!InitializeAcl(&s->acl.acl, (DWORD)sizeof s->acl.b, ACL_REVISION) ||
        !AddAccessAllowedAce(&s->acl.acl, ACL_REVISION, SECTION_ALL_ACCESS, s->u.user.tu.User.Sid) ||
        !InitializeSecurityDescriptor(&s->sd, SECURITY_DESCRIPTOR_REVISION) ||
        !SetSecurityDescriptorOwner(&s->sd, s->u.user.tu.User.Sid, FALSE) ||
        !SetSecurityDescriptorDacl(&s->sd, TRUE, &s->acl.acl, FALSE))
        return GetLastError();
    s->sa.nLength = (DWORD)sizeof s->sa;
    s->sa.lpSecurityDescriptor = &s->sd;
    s->sa.bInheritHandle = FALSE;
    return 0;
}
#else
#  define DDP__SHM_NAME_PREFIX "/"
#  define DDP__SHM_WHERE       "/dev/shm"
#  define DDP__SHM_REMEDY      "give it more (docker run --shm-size=..., or a bigger tmpfs on /dev/shm)"
#endif

/* 1 where anonymous objects exist and travel to peers as descriptors
   (Linux: memfd_create and SCM_RIGHTS over the local sockets above). */
#if defined(__linux__) && defined(SYS_memfd_create)
#  define DDP__SHM_ANON 1
#else
#  define DDP__SHM_ANON 0
#endif

/* An anonymous object of `bytes` (Linux memfd, mode 0600, size sealed):
   0, or -1 with errno (ENOSYS where there is none: Windows, other POSIX
   systems). */
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

/* Create the named object `name` of `bytes`, for this user only, failing
   when the name exists: 0, or -1 (errno). */
static int ddp__shm_obj_create_named(const char *name, size_t bytes, int *fd_out) {
#if defined(_WIN32)
    ddp__win_sa sa;
    HANDLE m, keep = NULL;
    DWORD e;
    int i, slot = -1;
    *fd_out = -1;
    if (strlen(name) >= sizeof ddp__shm_kept[0].name) { errno = ENAMETOOLONG; return -1; }
    if ((e = ddp__win_owner_only(&sa)) != 0) { errno = DDP__WINERR(e); return -1; }
    m = CreateFileMappingA(INVALID_HANDLE_VALUE, &sa.sa, PAGE_READWRITE | SEC_COMMIT,
                           (DWORD)((unsigned long long)bytes >> 32), (DWORD)(bytes & 0xFFFFFFFFu), name);
    if (!m) { errno = ddp__win_errno(GetLastError()); return -1; }
    if (GetLastError() == ERROR_ALREADY_EXISTS) { CloseHandle(m); errno = EEXIST; return -1; } /* O_EXCL */
    if (!DuplicateHandle(GetCurrentProcess(), m, GetCurrentProcess(), &keep, 0, FALSE, DUPLICATE_SAME_ACCESS)) {
        e = GetLastError();
        CloseHandle(m);
        errno = DDP__WINERR(e);
        return -1;
    }
    AcquireSRWLockExclusive(&ddp__shm_kept_lock);
    for (i = 0; i < DDP__SHM_KEEP && slot < 0; i++)
        if (!ddp__shm_kept[i].h) slot = i;
    if (slot >= 0) {
        memcpy(ddp__shm_kept[slot].name, name, strlen(name) + 1);
        ddp__shm_kept[slot].h = keep;
    }
    ReleaseSRWLockExclusive(&ddp__shm_kept_lock);
    if (slot < 0) { /* more than DDP__SHM_KEEP names waiting for their peers at once */
        CloseHandle(keep);
        CloseHandle(m);
        errno = EMFILE;
        return -1;
    }
    *fd_out = (int)(INT_PTR)m;
    return 0;
#else
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
#endif
}

/* Open the existing named object `name` read-write (and, on Windows, for
   reading its size and security): 0, or -1 (errno). */
static int ddp__shm_obj_open_named(const char *name, int *fd_out) {
#if defined(_WIN32)
    HANDLE m = OpenFileMappingA(FILE_MAP_READ | FILE_MAP_WRITE | READ_CONTROL, FALSE, name);
    *fd_out = -1;
    if (!m) { errno = ddp__win_errno(GetLastError()); return -1; }
    *fd_out = (int)(INT_PTR)m;
    return 0;
#else
    int fd = shm_open(name, O_RDWR, 0);
    *fd_out = fd;
    if (fd < 0) return -1;
    fcntl(fd, F_SETFD, fcntl(fd, F_GETFD) | FD_CLOEXEC);
    return 0;
#endif
}

/* The handle is not needed once mapped (the mapping keeps the memory). */
static void ddp__shm_obj_close(int fd) {
    if (fd < 0) return;
#if defined(_WIN32)
    CloseHandle(ddp__shm_h(fd));
#else
    close(fd);
#endif
}

/* Remove the name (mappings stay valid until unmapped). Windows: close the
   handle ddp__shm_obj_create_named kept; with the last handle the name goes. */
static void ddp__shm_obj_unlink(const char *name) {
#if defined(_WIN32)
    HANDLE h = NULL;
    int i;
    AcquireSRWLockExclusive(&ddp__shm_kept_lock);
    for (i = 0; i < DDP__SHM_KEEP && !h; i++)
        if (ddp__shm_kept[i].h && !strcmp(ddp__shm_kept[i].name, name)) {
            h = ddp__shm_kept[i].h;
            ddp__shm_kept[i].h = NULL;
        }
    ReleaseSRWLockExclusive(&ddp__shm_kept_lock);
    if (h) CloseHandle(h);
#else
    shm_unlink(name);
#endif
}

/* Back [0, bytes) with memory now, so that a full /dev/shm or a memory
   limit is an error here and not a SIGBUS later. Returns an errno value
   (0 ok; file systems that cannot preallocate count as ok). Windows: the
   section was committed whole when it was made. */
static int ddp__shm_obj_reserve(int fd, size_t bytes) {
#if defined(_WIN32)
    (void)fd; (void)bytes;
    return 0;
#else
    int e;
    if (bytes == 0) return 0;
    do e = posix_fallocate(fd, 0, (off_t)bytes); while (e == EINTR);
    return e == EOPNOTSUPP || e == EINVAL ? 0 : e;
#endif
}

/* ddp__shm_obj_trust's verdicts (other than -1: it cannot tell, errno) */
enum { DDP__SHM_TRUSTED = 0, DDP__SHM_FOREIGN = 1, DDP__SHM_SHARED = 2 };

/* Whose is the object and who else may open it, and its size.
   DDP__SHM_TRUSTED: the current user's, nobody else's. DDP__SHM_FOREIGN:
   another user's (who: "uid 1001", or a SID on Windows). DDP__SHM_SHARED:
   others may open it too (who: "mode 644, 600 expected", or the SID a
   Windows DACL entry admits). POSIX: the owner's uid and the mode bits;
   Windows: the owner SID must be the user's (or the user's default owner)
   and every entry of the DACL that allows anything must name the user (no
   DACL at all admits everyone). *size: POSIX the object's size; Windows
   the size of a view of the whole section (rounded up to whole pages, so
   the library makes only page-multiple segments). */
static int ddp__shm_obj_trust(int fd, size_t *size, char *who, size_t cap) {
#if defined(_WIN32)
    ddp__win_user u;
    PSID owner = NULL;
    PACL dacl = NULL;
    PSECURITY_DESCRIPTOR sd = NULL;
    MEMORY_BASIC_INFORMATION mi;
    void *v;
    DWORD e, i;
    int verdict = DDP__SHM_TRUSTED;
    *size = 0;
    who[0] = 0;
    if ((e = ddp__win_user_get(&u)) != 0) { errno = DDP__WINERR(e); return -1; }
    e = GetSecurityInfo(ddp__shm_h(fd), SE_KERNEL_OBJECT, OWNER_SECURITY_INFORMATION | DACL_SECURITY_INFORMATION,
                        &owner, NULL, &dacl, NULL, &sd);
    if (e != ERROR_SUCCESS) { errno = DDP__WINERR(e); return -1; }
    if (!dacl) { /* (Wine gives objects made without security neither owner nor DACL) */
        snprintf(who, cap, "no DACL: everyone may open it");
        verdict = DDP__SHM_SHARED;
    } else if (!owner || (!EqualSid(owner, u.user.tu.User.Sid) && !EqualSid(owner, u.owner.to.Owner))) {
        char s[200];
        ddp__win_sid_text(owner, s, sizeof s);
        snprintf(who, cap, "%s", s);
        verdict = DDP__SHM_FOREIGN;
    } else {
        for (i = 0; i < dacl->AceCount && verdict == DDP__SHM_TRUSTED; i++) {
            void *ace = NULL;
            if (!GetAce(dacl, i, &ace)) continue;
            if (((ACE_HEADER *)ace)->AceType == ACCESS_DENIED_ACE_TYPE) continue;
            if (((ACE_HEADER *)ace)->AceType != ACCESS_ALLOWED_ACE_TYPE ||
                !EqualSid((PSID)&((ACCESS_ALLOWED_ACE *)ace)->SidStart, u.user.tu.User.Sid)) {
                char s[200];
                if (((ACE_HEADER *)ace)->AceType == ACCESS_ALLOWED_ACE_TYPE)
                    ddp__win_sid_text((PSID)&((ACCESS_ALLOWED_ACE *)ace)->SidStart, s, sizeof s);
                else
                    snprintf(s, sizeof s, "an entry of type %d", (int)((ACE_HEADER *)ace)->AceType);
                snprintf(who, cap, "its DACL admits %s", s);
                verdict = DDP__SHM_SHARED;
            }
        }
    }
    LocalFree(sd);
    v = MapViewOfFile(ddp__shm_h(fd), FILE_MAP_READ, 0, 0, 0); /* the whole section */
    if (!v) { errno = DDP__WINERR(GetLastError()); return -1; }
    if (VirtualQuery(v, &mi, sizeof mi)) *size = (size_t)mi.RegionSize;
    UnmapViewOfFile(v);
    return verdict;
#else
    struct stat sb;
    if (fstat(fd, &sb) != 0) return -1;
    *size = (size_t)sb.st_size;
    who[0] = 0;
    if (sb.st_uid != geteuid()) {
        snprintf(who, cap, "uid %u (this job's user is uid %u)", (unsigned)sb.st_uid, (unsigned)geteuid());
        return DDP__SHM_FOREIGN;
    }
    if (sb.st_mode & 077) {
        snprintf(who, cap, "mode %o, 600 expected", (unsigned)(sb.st_mode & 07777));
        return DDP__SHM_SHARED;
    }
    return DDP__SHM_TRUSTED;
#endif
}

/* Map `bytes` of the object; NULL on failure (errno). */
static void *ddp__shm_obj_map(int fd, size_t bytes, int writable) {
#if defined(_WIN32)
    void *p = MapViewOfFile(ddp__shm_h(fd), FILE_MAP_READ | (writable ? FILE_MAP_WRITE : 0), 0, 0, bytes);
    if (!p) errno = ddp__win_errno(GetLastError());
    return p;
#else
    void *p = mmap(NULL, bytes, PROT_READ | (writable ? PROT_WRITE : 0), MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? NULL : p;
#endif
}

static void ddp__shm_obj_unmap(void *p, size_t bytes) {
    if (!p) return;
#if defined(_WIN32)
    (void)bytes;
    UnmapViewOfFile(p);
#else
    munmap(p, bytes);
#endif
}

/* The first n bytes of an object, before it is mapped for use: a receiver
   looks at a segment's header before it lets the memory into its address
   space (Linux: pread; elsewhere a short read-only view). 0, or -1. */
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

/* Memory for this process alone (a world of one), freed by
   ddp__shm_obj_unmap; NULL on failure (errno). */
static void *ddp__shm_obj_map_private(size_t bytes) {
#if defined(_WIN32)
    HANDLE m = CreateFileMappingA(INVALID_HANDLE_VALUE, NULL, PAGE_READWRITE | SEC_COMMIT,
                                  (DWORD)((unsigned long long)bytes >> 32), (DWORD)(bytes & 0xFFFFFFFFu), NULL);
    void *p;
    if (!m) { errno = ddp__win_errno(GetLastError()); return NULL; }
    p = MapViewOfFile(m, FILE_MAP_READ | FILE_MAP_WRITE, 0, 0, bytes);
    if (!p) errno = ddp__win_errno(GetLastError());
    CloseHandle(m);
    return p;
#else
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
#endif
}

/* Bytes free where named objects live (POSIX: /dev/shm; Windows: what is
   left of the commit limit, paging file included); -1 when unknown. */
static long long ddp__shm_named_free(void) {
#if defined(_WIN32)
    MEMORYSTATUSEX ms;
    ms.dwLength = (DWORD)sizeof ms;
    if (!GlobalMemoryStatusEx(&ms)) return -1;
    return ms.ullAvailPageFile > (DWORDLONG)LLONG_MAX ? LLONG_MAX : (long long)ms.ullAvailPageFile;
#elif defined(__linux__)
    struct statvfs v;
    if (statvfs("/dev/shm", &v) != 0) return -1;
    return (long long)v.f_bavail * (long long)v.f_frsize;
#else
    return -1;
#endif
}

/* Named objects are called "ddp-<creator pid>-...": remove those whose
   creator no longer runs on this host (a rank 0 killed in the window
   before it removed a name), and only the user's own. Returns how many.
   Windows: nothing to do, a section cannot outlive its processes. */
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
        if (!ddp__proc_dead((int)pid)) continue;
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

/* ---- files ---------------------------------------------------------------------- 
   Files written atomically (checkpoints, safetensors) go through a
   temporary beside the target that no death can leave behind:
     Linux    the temporary is made without a name (O_TMPFILE) and linked
              as "<path>.tmp.<host>.<pid>" only once complete, for the
              instant before the rename;
     Windows  the temporary "<path>.tmp.<host>.<pid>" is marked for deletion
              as soon as it is created (FileDispositionInfo), so the system
              removes it when its handle closes, however the writer ends
              (TerminateProcess included); the mark is taken off once the
              file is complete, for the instant before the rename;
     POSIX    (no O_TMPFILE, or a file system without it) the temporary has
              its name from the start.
   A writer killed inside the window leaves a named temporary, which the
   next save of the same path removes with every temporary of a writer
   that no longer runs on this host (ddp__file_sweep_tmp). */

typedef struct ddp__tmpfile {
    FILE *f;
    int   unnamed;        /* Linux: no name yet; Windows: marked for deletion */
    int   named;          /* the temporary exists on disk under tmp */
    char  tmp[4200];
} ddp__tmpfile;

/* The directory of path ("." when it has none): 0, or -1 when too long. */
static int ddp__path_dir(const char *path, char *dir, size_t cap) {
    const char *slash = strrchr(path, '/');
    size_t n;
#if defined(_WIN32)
    const char *bs = strrchr(path, '\\');
    if (bs && (!slash || bs > slash)) slash = bs;
    if (!slash && path[0] && path[1] == ':') slash = path + 1; /* "C:name": the current directory of C: */
#endif
    if (!slash) { snprintf(dir, cap, "."); return 0; }
    n = (size_t)(slash - path);
    if (n == 0 || (n == 2 && path[1] == ':')) n++; /* the root: "/", "C:\" (or "C:" when relative) */
    if (n >= cap) return -1;
    memcpy(dir, path, n);
    dir[n] = 0;
    return 0;
}

/* The last component of path. */
static const char *ddp__path_base(const char *path) {
    const char *slash = strrchr(path, '/');
#if defined(_WIN32)
    const char *bs = strrchr(path, '\\');
    if (bs && (!slash || bs > slash)) slash = bs;
    if (!slash && path[0] && path[1] == ':') slash = path + 1;
#endif
    return slash ? slash + 1 : path;
}

/* Is name "<base>.tmp.<host>.<pid>" of a writer of this host that no longer runs? */
static int ddp__tmp_is_stale(const char *name, const char *prefix, const char *host) {
    size_t pl = strlen(prefix), hl = strlen(host);
    const char *rest, *dot;
    char *end;
    long pid;
    if (strncmp(name, prefix, pl) != 0) return 0;
    rest = name + pl;
    dot = strrchr(rest, '.');
    if (!dot || (size_t)(dot - rest) != hl || strncmp(rest, host, hl) != 0) return 0;
    pid = strtol(dot + 1, &end, 10);
    return end != dot + 1 && !*end && pid > 0 && pid <= INT_MAX && ddp__proc_dead((int)pid);
}

/* Remove the temporaries of path left by writers of this host that no
   longer run, the user's own regular files only. Returns how many. */
static int ddp__file_sweep_tmp(const char *path) {
    char dir[4096], host[256], prefix[1200], full[4400];
    const char *base = ddp__path_base(path);
    int n = 0;
    if (ddp__path_dir(path, dir, sizeof dir) != 0 || strlen(base) > 1000) return 0;
    ddp__proc_hostname(host, sizeof host);
    snprintf(prefix, sizeof prefix, "%s.tmp.", base);
#if defined(_WIN32)
    {
        WIN32_FIND_DATAA fd;
        HANDLE h;
        ddp__win_user u;
        char pattern[4400];
        if (ddp__win_user_get(&u) != 0) return 0;
        snprintf(pattern, sizeof pattern, "%s\\%s*", dir, prefix);
        h = FindFirstFileA(pattern, &fd);
        if (h == INVALID_HANDLE_VALUE) return 0;
        do {
            PSID owner = NULL;
            PSECURITY_DESCRIPTOR sd = NULL;
            int mine;
            if (fd.dwFileAttributes & (FILE_ATTRIBUTE_DIRECTORY | FILE_ATTRIBUTE_REPARSE_POINT)) continue;
            if (!ddp__tmp_is_stale(fd.cFileName, prefix, host)) continue;
            snprintf(full, sizeof full, "%s\\%s", dir, fd.cFileName);
            if (GetNamedSecurityInfoA(full, SE_FILE_OBJECT, OWNER_SECURITY_INFORMATION, &owner, NULL, NULL, NULL, &sd) != ERROR_SUCCESS)
                continue;
            mine = owner && (EqualSid(owner, u.user.tu.User.Sid) || EqualSid(owner, u.owner.to.Owner));
            LocalFree(sd);
            if (mine && DeleteFileA(full)) n++;
        } while (FindNextFileA(h, &fd));
        FindClose(h);
    }
#else
    {
        DIR *d = opendir(dir);
        struct dirent *e;
        if (!d) return 0;
        while ((e = readdir(d)) != NULL) {
            struct stat sb;
            if (!ddp__tmp_is_stale(e->d_name, prefix, host)) continue;
            snprintf(full, sizeof full, "%s/%s", dir, e->d_name);
            if (lstat(full, &sb) != 0 || !S_ISREG(sb.st_mode) || sb.st_uid != geteuid()) continue;
            if (unlink(full) == 0) n++;
        }
        closedir(d);
    }
#endif
    return n;
}

/* A temporary for path, open for writing (t->f). 0, or an error number. */
static int ddp__file_tmp_open(ddp__tmpfile *t, const char *path) {
    char host[256];
    memset(t, 0, sizeof *t);
    ddp__proc_hostname(host, sizeof host);
    if (snprintf(t->tmp, sizeof t->tmp, "%s.tmp.%s.%d", path, host, ddp__getpid()) >= (int)sizeof t->tmp) return ENAMETOOLONG;
#if defined(_WIN32)
    {
        HANDLE h;
        FILE_DISPOSITION_INFO d;
        int fd;
        DeleteFileA(t->tmp); /* this process's own, from an earlier failed attempt */
        h = CreateFileA(t->tmp, GENERIC_WRITE | DELETE, FILE_SHARE_READ | FILE_SHARE_DELETE, NULL, CREATE_NEW,
                        FILE_ATTRIBUTE_NORMAL, NULL);
        if (h == INVALID_HANDLE_VALUE) return ddp__win_errno(GetLastError());
        t->named = 1;
        d.DeleteFile = TRUE;
        if (SetFileInformationByHandle(h, FileDispositionInfo, &d, (DWORD)sizeof d)) t->unnamed = 1;
        fd = _open_osfhandle((intptr_t)h, _O_WRONLY | _O_BINARY);
        if (fd < 0) { CloseHandle(h); t->named = 0; return EMFILE; } /* deleted, if it was marked */
        t->f = _fdopen(fd, "wb");
        if (!t->f) {
            int e = errno ? errno : ENOMEM;
            _close(fd);
            if (!t->unnamed) DeleteFileA(t->tmp);
            t->named = 0;
            return e;
        }
        if (!t->unnamed) return 0;
        t->named = 0; /* marked: the system removes it whatever happens now */
        return 0;
    }
#else
    {
        int fd = -1;
#  if defined(__linux__) && defined(O_TMPFILE)
        char dir[4096];
        if (ddp__path_dir(path, dir, sizeof dir) == 0 && access("/proc/self/fd", X_OK) == 0)
            fd = open(dir, O_TMPFILE | O_WRONLY | O_CLOEXEC, 0644);
        if (fd >= 0) t->unnamed = 1;
#  endif
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
#endif
}

/* The complete (flushed, synced) temporary gets its name, just before the
   rename: 0, or an error number. */
static int ddp__file_tmp_name(ddp__tmpfile *t) {
    if (!t->unnamed) return 0;
#if defined(_WIN32)
    {
        FILE_DISPOSITION_INFO d;
        d.DeleteFile = FALSE;
        if (!SetFileInformationByHandle((HANDLE)_get_osfhandle(_fileno(t->f)), FileDispositionInfo, &d, (DWORD)sizeof d))
            return ddp__win_errno(GetLastError());
    }
#elif defined(__linux__) && defined(O_TMPFILE)
    {
        char self[64];
        snprintf(self, sizeof self, "/proc/self/fd/%d", fileno(t->f));
        unlink(t->tmp);
        if (linkat(AT_FDCWD, self, AT_FDCWD, t->tmp, AT_SYMLINK_FOLLOW) != 0) return errno;
    }
#endif
    t->unnamed = 0;
    t->named = 1;
    return 0;
}

/* After a failure (t->f closed): nothing of the temporary stays. */
static void ddp__file_tmp_discard(ddp__tmpfile *t) {
#if defined(_WIN32)
    if (t->named) DeleteFileA(t->tmp);
#else
    if (t->named) unlink(t->tmp);
#endif
    t->named = 0;
}

/* Flush f's data to the disk: 0 or an error number. */
static int ddp__file_sync(FILE *f) {
#if defined(_WIN32)
    HANDLE h = (HANDLE)_get_osfhandle(_fileno(f));
    if (h == INVALID_HANDLE_VALUE) return EBADF;
    return FlushFileBuffers(h) ? 0 : DDP__WINERR(GetLastError());
#else
    return fsync(fileno(f)) != 0 ? errno : 0;
#endif
}

/* Atomically put file `from` in the place of `to` (which may exist): 0 or
   an error number. Windows: MoveFileEx, replacing, written through. */
static int ddp__file_replace(const char *from, const char *to) {
#if defined(_WIN32)
    return MoveFileExA(from, to, MOVEFILE_REPLACE_EXISTING | MOVEFILE_WRITE_THROUGH) ? 0 : DDP__WINERR(GetLastError());
#else
    return rename(from, to) != 0 ? errno : 0;
#endif
}

/* Make a rename into path's directory durable (POSIX: fsync the directory;
   Windows: MOVEFILE_WRITE_THROUGH already did). */
static void ddp__dir_sync(const char *path) {
#if defined(_WIN32)
    (void)path;
#else
    char dir[4096];
    int fd;
    if (ddp__path_dir(path, dir, sizeof dir) != 0) return;
    fd = open(dir, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) { fsync(fd); close(fd); }
#endif
}

/* ==== end of PLATFORM ===================================================== */

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

#define DDP__ALIGN       256u               /* parameter offsets in flat buffers */
#define DDP__CACHELINE   128u
#define DDP__MAX_NAME    128
#define DDP__MAX_NDIM    8
#define DDP__ERRLEN      1024
#define DDP__MAX_WORLD   1024
#define DDP__JOIN_BITS   48                 /* ranks per double of the join mask: exact sums */
#define DDP__JOIN_WORDS  ((DDP__MAX_WORLD + DDP__JOIN_BITS - 1) / DDP__JOIN_BITS)
#define DDP__JOIN_MAX_MICRO 65536           /* micro_steps with uneven inputs: the handshake's sums stay exact */

#ifdef __cplusplus
extern "C" {
#endif

static size_t ddp__align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

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

DDP_API const char *ddp_version(void) { return DDP_VERSION; }
DDP_API int ddp_version_number(void) { return DDP_VERSION_NUMBER; }

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
    int       bucket;   /* storage bucket */
    int       cbucket;  /* communication bucket */
    double    lr_scale; /* parameter options, resolved (1 = none) */
    double    wd_scale;
    int       group;    /* index into ctx->groups, set at finalize */
    int       marked;   /* in this step */
    void     *stream;   /* CUDA: the stream it was marked on */
    int       evrec;    /* CUDA: its ready event was recorded for this bucket launch */
} ddp__param;

/* A storage bucket: a contiguous, padded span of the flat buffers with one
   element type, fixed at ddp_finalize(). The optimizer, its state, the
   ZeRO-1 shards and the gradient checks walk these. */
typedef struct ddp__bucket {
    size_t    offset;   /* bytes into the flat buffers */
    size_t    bytes;    /* padded span of the bucket */
    size_t    numel;    /* elements in the span (bytes / dtype size) */
    ddp_dtype dtype;
    int       num_params;
} ddp__bucket;

/* numel elements at byte offset of the flat buffers, reduced by rank
   owner (-1 in a range list). */
typedef struct ddp__piece {
    size_t offset;
    size_t numel;
    int    owner;
} ddp__piece;

/* A communication bucket: what one collective reduces, launched when all
   its parameters are marked, in bucket order. At first each one is a
   storage bucket; after the first step (LEARNED BUCKET ORDER) they follow
   the order of ddp_mark_ready and may be several ranges of the flat
   buffers (parameters never move). The pieces split the ranges among the
   ranks: evenly, or by the ZeRO-1 shards. */
typedef struct ddp__cbucket {
    ddp_dtype dtype;
    size_t    numel;      /* elements reduced: the sum over the ranges */
    int       range0, nrange;   /* ctx->cranges[range0 .. range0 + nrange), ascending offsets */
    int       piece0, npiece;   /* ctx->cpieces[piece0 .. piece0 + npiece) */
    int       num_params;
    int       pending;    /* parameters not yet marked this step */
    int       launched;
} ddp__cbucket;

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
    unsigned char *xchg;         /* ZeRO-1: the parameter exchange, after the world's gradients (flat_bytes) */
    uint64_t fp_seq;             /* DDP_DEBUG=detail: fingerprinted collectives issued */
    uint64_t xchg_last;          /* seq of the last parameter exchange */
} ddp__shm;

struct ddp_context {
    ddp_config cfg;
    int rank, world, local_rank, local_world;
    int broken;                  /* a collective failed: only destroy is allowed (atomic) */
    char err[DDP__ERRLEN];
    char comm_err[DDP__ERRLEN];  /* written by the communication thread, under err_mu */
    char broke_why[DDP__ERRLEN]; /* the message of the error that broke the context, kept (under err_mu) */
    ddp__mutex err_mu;

    /* rendezvous */
    struct ddp__store_server *server;
    void    *store;              /* ddp__store*, NULL for world 1 */
    char     key_prefix[96];
    char     addr[256];
    int      agent_store;
    int      from_env;           /* rank and world came from the environment */
    int      net_started;        /* ddp__net_start() succeeded (Winsock) */
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
    ddp__bucket *buckets;        /* storage buckets (layout, optimizer, shards) */
    int      num_buckets;
    ddp__cbucket *cb;            /* communication buckets, in launch order */
    int      num_cb;
    ddp__piece *cranges, *cpieces;
    size_t   flat_bytes;
    unsigned char *flat_params;
    unsigned char *flat_grads;   /* host: points into shm.grads for shm */
    int      owns_flat_grads;
    int      zero;               /* ZeRO-1: optimizer state sharded (config.zero_stage) */
    int      debug;              /* DDP_DEBUG=detail: fingerprints */
    int64_t  sync_steps;         /* synced steps begun (a joined rank counts the ones it answers) */
    int      fp_bucket;          /* the bucket a running hook reduces (its collectives' fingerprints) */

    /* the bucket order learned from the first step (see BUCKETS) */
    int     *mark_order;         /* parameter ids in the order the first step marked them */
    int      mark_count;
    int      order_learned;      /* 1 once the first step ended (or learning is off) */

    /* the step */
    int      in_step;
    int      no_sync;
    int      next_bucket;        /* next bucket to launch, in order */

    /* accumulation (see the ACCUMULATION section of the implementation) */
    int      acc_state;          /* DDP__ACC_LOCAL, _REDUCED or _MIXED */
    int      accum_steps;        /* no_sync micro-steps since the last reduce */
    int      zero_pending;       /* the next ddp_step_begin() zeroes the gradients */
    int      mixed_shown;        /* MIXED between micro-steps: the gradients show R + L, L is in acc_local */
    void    *acc_reduced;        /* MIXED: the reduced part R (flat_bytes; device memory on the GPU) */
    void    *acc_local;          /* MIXED: the local part L between no_sync micro-steps */
    double   window_div;         /* ddp_train_step: its micro_steps (the reduce divides by it); else 1 */
    double   divisor;            /* ranks the average is over: the world, or those that contributed (join) */
    int      in_train_step;

    /* communication thread */
    ddp__thread comm_thread;
    int      comm_started;
    ddp__mutex mu;
    ddp__cond  cv_work, cv_done;
    int      q_head, q_tail;     /* buckets queued: [q_head, q_tail) in launch order */
    int      q_stop;
    int      q_busy;
    ddp_result q_err;
    int      *queue;             /* num_buckets entries */
    double   q_scale;            /* the factor of the reduce in progress (ddp__reduce_factor) */

    /* communication hook (ddp_register_comm_hook) */
    ddp_comm_hook hook;
    void    *hook_state;
    void    *hook_buf;           /* packed buckets and compression scratch (device memory on GPU contexts) */
    size_t   hook_buf_bytes;
    uint64_t hook_bytes;         /* what the running hook's collectives moved */
    int      hook_failed;        /* a hook returned an error: the peers fail with DDP_ERROR_USER too (atomic) */
    int      hook_broke;         /* a hook's failure (here or on a peer) broke the context (atomic) */
    int      desync;             /* DDP_DEBUG=detail found collectives out of step (atomic) */

    /* parameter groups: distinct (lr_scale, wd_scale); the group of every
       256-byte chunk of the flat buffers (every parameter starts a chunk) */
    double   group_lr[DDP_MAX_PARAM_GROUPS], group_wd[DDP_MAX_PARAM_GROUPS];
    int      num_groups;
    unsigned char *group_map;     /* flat_bytes / DDP__ALIGN entries */

    /* uneven inputs (config.uneven_inputs) */
    int      joined;             /* inside ddp_join() */
    int      join_active;        /* ranks that contributed to the last synced step */
    double   join_last[DDP__JOIN_WORDS]; /* who did, as bits (DDP__JOIN_BITS a word) */

    /* optimizer */
    int64_t  sched_steps;        /* ddp_optimizer_step() calls that took or skipped a step: the schedule's t */
    double   config_lr;          /* config.optimizer.lr as created (ddp_set_lr changes cfg.optimizer.lr) */
    int64_t  opt_steps;
    double   ls_scale;           /* loss scale S (a float value, as GradScaler's); 1 when off */
    int64_t  ls_tracker;         /* clean steps since the scale last changed */
    int64_t  ls_skipped;         /* steps skipped */
    int      ls_last_skipped;
    void     *opt_m, *opt_v, *opt_master; /* per storage bucket, this rank's range of it, state type per bucket */
    unsigned char *ck_full[3];     /* ZeRO-1, while saving on rank 0: the gathered full state arrays */
    size_t   opt_state_bytes;
    size_t   *opt_state_off;      /* per bucket: byte offset into the state buffers */

    struct ddp__cuda_state *cuda;

    /* step statistics (ddp_get_step_stats); st_cur.comm_s and .bytes are
       written by whichever thread reduces, under mu */
    ddp_step_stats st_last, st_total, st_cur;
    double   st_t0;              /* when this step's ddp_step_begin() returned */
    double   st_inline;          /* communication on the calling thread since then */
    int64_t  st_steps;           /* ddp_step_begin() calls: the step index in the timeline */

    struct ddp__trace *trace;    /* the timeline; NULL when off */
};

static DDP__TLS char ddp__create_err[DDP__ERRLEN];

static void ddp__log(const ddp_context *ctx, ddp_log_level lvl, const char *msg) {
    if (ctx && ctx->cfg.logger.func && lvl <= ctx->cfg.logger.level)
        ctx->cfg.logger.func(lvl, ctx->rank, msg, ctx->cfg.logger.user);
}

/* The error buffer of the calling thread: the communication thread keeps
   its own, copied into ctx->err when the step collects its result. */
static char *ddp__errbuf(ddp_context *ctx) {
    int on_comm = ctx->comm_started && ddp__thread_is_self(&ctx->comm_thread);
    return on_comm ? ctx->comm_err : ctx->err;
}

DDP__PRINTF(3, 4)
static ddp_result ddp__fail(ddp_context *ctx, ddp_result code, const char *fmt, ...) {
    char buf[DDP__ERRLEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (ctx) {
        char *dst = ddp__errbuf(ctx);
        if (dst == ctx->comm_err) {   /* another thread may be reading it */
            ddp__mutex_lock(&ctx->err_mu);
            memcpy(dst, buf, sizeof buf);
            ddp__mutex_unlock(&ctx->err_mu);
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
    ddp__mutex_lock(&ctx->err_mu);
    ddp__copy_str(out, cap, ctx->comm_err);
    ddp__mutex_unlock(&ctx->err_mu);
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

/* ---- timeline and step statistics ------------------------------------------------

   The timeline (TIMELINE in the manual) keeps events in a ring in memory,
   written to the rank's file by ddp_trace_flush() and ddp_destroy() in
   Chrome's trace-event format (the JSON array form: Perfetto and
   chrome://tracing open it, a file cut short by a crash included). Both
   threads record (the user's, tid 0, and the communication thread, tid 1)
   under one mutex; with the timeline off every record is one pointer test. */

enum {
    DDP__EV_STEP = 0,   /* X: a step, ddp_step_begin() to ddp_step_end(); a = step index, b = synced */
    DDP__EV_MARK,       /* i: ddp_mark_ready(); a = parameter id, b = its bucket */
    DDP__EV_LAUNCH,     /* i: a bucket handed to the communication thread (or run inline); a = bucket */
    DDP__EV_REDUCE,     /* X: a bucket's reduction; a = bucket, b = 1 when a communication hook ran it */
    DDP__EV_WAIT,       /* X: ddp_step_end() waiting for the communication thread */
    DDP__EV_OPT,        /* X: ddp_optimizer_step(); a = the step taken (0: skipped) */
    DDP__EV_GATHER,     /* X: ZeRO-1's parameter all-gather */
    DDP__EV_SAVE,       /* X: ddp_save_checkpoint() */
    DDP__EV_LOAD,       /* X: ddp_load_checkpoint() */
    DDP__EV_COLL        /* X: a collective on your buffers; a = which (ddp__coll_names) */
};

static const char *const ddp__coll_names[] = { "ddp_barrier", "ddp_allreduce", "ddp_broadcast", "ddp_allgather", "ddp_reduce_scatter" };

typedef struct ddp__tev {
    double   ts, dur;            /* seconds (ddp__now); dur < 0: an instant */
    uint64_t bytes;
    int32_t  kind, tid, a, b;
} ddp__tev;

typedef struct ddp__trace {
    FILE    *f;
    char     path[4096];
    ddp__tev *ring;
    size_t   cap, head, count;   /* the newest `count` events end at head */
    uint64_t dropped, written;
    ddp__mutex mu;
} ddp__trace;

#define DDP__TRACE_DEFAULT_EVENTS 65536 /* about 3 MB: minutes of steps of a small model between flushes */

static int ddp__on_comm_thread(const ddp_context *ctx) {
    return ctx->comm_started && ddp__thread_is_self(&ctx->comm_thread);
}

static void ddp__trace_ev(ddp_context *ctx, int kind, double ts, double dur, int a, int b, uint64_t bytes) {
    ddp__trace *t = ctx->trace;
    ddp__tev *e;
    if (!t) return;
    ddp__mutex_lock(&t->mu);
    e = &t->ring[t->head];
    e->ts = ts;
    e->dur = dur;
    e->bytes = bytes;
    e->kind = kind;
    e->tid = ddp__on_comm_thread(ctx);
    e->a = a;
    e->b = b;
    t->head = (t->head + 1) % t->cap;
    if (t->count < t->cap) t->count++;
    else t->dropped++;
    ddp__mutex_unlock(&t->mu);
}

/* A JSON string (the parameter names are the user's). */
static void ddp__json_str(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
        else if (c < 0x20) fprintf(f, "\\u%04x", c);
        else fputc(c, f);
    }
    fputc('"', f);
}

static void ddp__trace_write_ev(ddp_context *ctx, FILE *f, const ddp__tev *e) {
    static const char *const cat[] = { "compute", "compute", "comm", "comm", "comm", "optimizer", "comm", "io", "io", "comm" };
    char name[192];
    switch (e->kind) {
    case DDP__EV_STEP: snprintf(name, sizeof name, "step %d", e->a); break;
    case DDP__EV_MARK:
        snprintf(name, sizeof name, "mark %s", e->a >= 0 && e->a < ctx->num_params ? ctx->params[e->a].name : "?");
        break;
    case DDP__EV_LAUNCH: snprintf(name, sizeof name, "launch bucket %d", e->a); break;
    case DDP__EV_REDUCE: snprintf(name, sizeof name, "%s bucket %d", e->b ? "hook" : "reduce", e->a); break;
    case DDP__EV_WAIT: snprintf(name, sizeof name, "wait for buckets"); break;
    case DDP__EV_OPT: snprintf(name, sizeof name, "optimizer"); break;
    case DDP__EV_GATHER: snprintf(name, sizeof name, "parameter all-gather"); break;
    case DDP__EV_SAVE: snprintf(name, sizeof name, "checkpoint save"); break;
    case DDP__EV_LOAD: snprintf(name, sizeof name, "checkpoint load"); break;
    default: snprintf(name, sizeof name, "%s", e->a >= 0 && e->a < 5 ? ddp__coll_names[e->a] : "collective"); break;
    }
    fputs(ctx->trace->written++ ? ",\n" : "\n", f);
    fputs("{\"name\":", f);
    ddp__json_str(f, name);
    fprintf(f, ",\"cat\":\"%s\",\"ph\":\"%s\",\"ts\":%.3f,", cat[e->kind], e->dur < 0 ? "i" : "X", e->ts * 1e6);
    if (e->dur >= 0) fprintf(f, "\"dur\":%.3f,", e->dur * 1e6);
    else fputs("\"s\":\"t\",", f);
    fprintf(f, "\"pid\":%d,\"tid\":%d,\"args\":{", ctx->rank, (int)e->tid);
    switch (e->kind) {
    case DDP__EV_STEP: fprintf(f, "\"step\":%d,\"synced\":%d", e->a, e->b); break;
    case DDP__EV_MARK: fprintf(f, "\"param\":%d,\"bucket\":%d", e->a, e->b); break;
    case DDP__EV_LAUNCH: fprintf(f, "\"bucket\":%d,\"bytes\":%llu", e->a, (unsigned long long)e->bytes); break;
    case DDP__EV_REDUCE: fprintf(f, "\"bucket\":%d,\"bytes\":%llu,\"hook\":%d", e->a, (unsigned long long)e->bytes, e->b); break;
    case DDP__EV_OPT: fprintf(f, "\"step\":%d,\"bytes\":%llu", e->a, (unsigned long long)e->bytes); break;
    default: fprintf(f, "\"bytes\":%llu", (unsigned long long)e->bytes); break;
    }
    fputs("}}", f);
}

/* Write what the ring holds (oldest first) and empty it. */
static ddp_result ddp__trace_flush(ddp_context *ctx) {
    ddp__trace *t = ctx->trace;
    ddp__tev *copy;
    size_t n, i, first;
    if (!t || !t->f) return DDP_SUCCESS;
    ddp__mutex_lock(&t->mu);
    n = t->count;
    copy = (ddp__tev *)ddp__alloc(ctx, n ? n * sizeof *copy : 1);
    if (copy) {
        first = (t->head + t->cap - n) % t->cap;
        for (i = 0; i < n; i++) copy[i] = t->ring[(first + i) % t->cap];
        t->count = 0;
    }
    ddp__mutex_unlock(&t->mu);
    if (!copy) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory writing the trace");
    for (i = 0; i < n; i++) ddp__trace_write_ev(ctx, t->f, &copy[i]);
    ddp__free(ctx, copy);
    if (fflush(t->f) != 0 || ferror(t->f))
        return ddp__fail(ctx, DDP_ERROR_IO, "cannot write the trace file '%s': %s", t->path, strerror(errno));
    return DDP_SUCCESS;
}

/* The rank's file name: "%r" replaced by the rank, else ".rank<r>" before
   a ".json" ending or at the end. */
static int ddp__trace_name(const char *pattern, int rank, char *out, size_t cap) {
    const char *r = strstr(pattern, "%r");
    size_t n = strlen(pattern);
    int w;
    if (r) w = snprintf(out, cap, "%.*s%d%s", (int)(r - pattern), pattern, rank, r + 2);
    else if (n >= 5 && !strcmp(pattern + n - 5, ".json")) w = snprintf(out, cap, "%.*s.rank%d.json", (int)(n - 5), pattern, rank);
    else w = snprintf(out, cap, "%s.rank%d", pattern, rank);
    return w > 0 && (size_t)w < cap;
}

static ddp_result ddp__trace_open(ddp_context *ctx) {
    const char *pattern = ctx->cfg.trace_path;
    ddp__trace *t;
    if (!pattern) pattern = getenv("DDP_TRACE");
    if (!pattern || !*pattern) return DDP_SUCCESS;
    t = (ddp__trace *)ddp__calloc(ctx, sizeof *t);
    if (!t) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory for the trace");
    if (!ddp__trace_name(pattern, ctx->rank, t->path, sizeof t->path)) {
        ddp__free(ctx, t);
        return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "trace path '%.100s' (config.trace_path or DDP_TRACE) is too long", pattern);
    }
    t->cap = ctx->cfg.trace_events ? ctx->cfg.trace_events : DDP__TRACE_DEFAULT_EVENTS;
    t->ring = (ddp__tev *)ddp__alloc(ctx, t->cap * sizeof *t->ring);
    if (!t->ring || t->cap > ((size_t)-1) / sizeof *t->ring) {
        ddp__free(ctx, t->ring);
        ddp__free(ctx, t);
        return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory for %" DDP__PRIzu " trace events (config.trace_events)", ctx->cfg.trace_events);
    }
    t->f = fopen(t->path, "w");
    if (!t->f) {
        ddp_result r = ddp__fail(ctx, DDP_ERROR_IO, "cannot create the trace file '%s' (config.trace_path or DDP_TRACE): %s", t->path, strerror(errno));
        ddp__free(ctx, t->ring);
        ddp__free(ctx, t);
        return r;
    }
    fputc('[', t->f);
    ddp__mutex_init(&t->mu);
    ctx->trace = t;
    return DDP_SUCCESS;
}

/* At ddp_destroy(): the last events, the names of the process and threads, close. */
static void ddp__trace_close(ddp_context *ctx) {
    ddp__trace *t = ctx->trace;
    if (!t) return;
    ddp__trace_flush(ctx);
    fprintf(t->f, "%s{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":%d,\"tid\":0,\"args\":{\"name\":\"rank %d\"}}",
            t->written++ ? ",\n" : "\n", ctx->rank, ctx->rank);
    fprintf(t->f, ",\n{\"name\":\"process_sort_index\",\"ph\":\"M\",\"pid\":%d,\"tid\":0,\"args\":{\"sort_index\":%d}}", ctx->rank, ctx->rank);
    fprintf(t->f, ",\n{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":%d,\"tid\":0,\"args\":{\"name\":\"main (your thread)\"}}", ctx->rank);
    fprintf(t->f, ",\n{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":%d,\"tid\":1,\"args\":{\"name\":\"communication\"}}", ctx->rank);
    fprintf(t->f, ",\n{\"name\":\"trace_info\",\"ph\":\"M\",\"pid\":%d,\"tid\":0,\"args\":{\"dropped_events\":%llu,\"ring_events\":%" DDP__PRIzu ",\"world\":%d}}\n]\n",
            ctx->rank, (unsigned long long)t->dropped, t->cap, ctx->world);
    fclose(t->f);
    ddp__mutex_destroy(&t->mu);
    ddp__free(ctx, t->ring);
    ddp__free(ctx, t);
    ctx->trace = NULL;
}

DDP_API ddp_result ddp_trace_flush(ddp_context *ctx) {
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    return ddp__trace_flush(ctx);
}

DDP_API ddp_result ddp_get_step_stats(const ddp_context *ctx, ddp_step_stats *last, ddp_step_stats *total) {
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    if (last) *last = ctx->st_last;
    if (total) *total = ctx->st_total;
    return DDP_SUCCESS;
}

/* A synced step ended: this window's figures become the last step's. */
static void ddp__stats_step_done(ddp_context *ctx, double end_entry, double end_exit) {
    ddp_step_stats *c = &ctx->st_cur, *t = &ctx->st_total;
    ddp__mutex_lock(&ctx->mu);
    c->steps = 1;
    c->compute_s += end_entry - ctx->st_t0 - ctx->st_inline;
    c->exposed_s += ctx->st_inline + (end_exit - end_entry);
    ctx->st_last = *c;
    t->steps += c->steps;
    t->compute_s += c->compute_s;
    t->comm_s += c->comm_s;
    t->exposed_s += c->exposed_s;
    t->bytes += c->bytes;
    memset(c, 0, sizeof *c);
    ddp__mutex_unlock(&ctx->mu);
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
    if (!c.optimizer.exact) {
        /* a zeroed (legacy) desc: a zero means the default where PyTorch has one */
        ddp_optimizer_desc d = ddp_optimizer_defaults(c.optimizer.type);
        if (c.optimizer.lr == 0) c.optimizer.lr = d.lr;
        if (c.optimizer.beta1 == 0) c.optimizer.beta1 = d.beta1;
        if (c.optimizer.beta2 == 0) c.optimizer.beta2 = d.beta2;
        if (c.optimizer.eps == 0) c.optimizer.eps = d.eps;
        if (c.optimizer.weight_decay == 0) c.optimizer.weight_decay = d.weight_decay;
        c.optimizer.exact = 1;
    }
    if (c.zero_stage == 0) {
        t = getenv("DDP_ZERO_STAGE");
        if (t && !strcmp(t, "1")) c.zero_stage = 1;
    }
    if (c.debug == DDP_DEBUG_DEFAULT) {
        t = getenv("DDP_DEBUG");
        c.debug = t && (!strcmp(t, "detail") || !strcmp(t, "DETAIL")) ? DDP_DEBUG_DETAIL : DDP_DEBUG_OFF;
    }
    if (c.loss_scale.init_scale == 0) c.loss_scale.init_scale = 65536.0;
    if (c.loss_scale.growth_factor == 0) c.loss_scale.growth_factor = 2.0;
    if (c.loss_scale.backoff_factor == 0) c.loss_scale.backoff_factor = 0.5;
    if (c.loss_scale.growth_interval == 0) c.loss_scale.growth_interval = 2000;
    return c;
}

DDP_API ddp_optimizer_desc ddp_optimizer_defaults(ddp_optimizer type) {
    ddp_optimizer_desc d;
    memset(&d, 0, sizeof d);
    d.type = type;
    d.exact = 1;
    d.lr = 1e-3;
    d.beta1 = 0.9;
    d.beta2 = 0.999;
    d.eps = 1e-8;
    d.weight_decay = type == DDP_OPTIM_ADAMW ? 1e-2 : 0.0;
    return d;
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

/* A finite value in [lo, hi) (hi_open) or [lo, hi]. */
static int ddp__in_range(double v, double lo, double hi, int hi_open) {
    return v == v && v - v == 0 && v >= lo && (hi_open ? v < hi : v <= hi);
}

static ddp_result ddp__check_optimizer(const ddp_optimizer_desc *o) {
    static const char *const names[] = { "lr", "momentum", "dampening", "weight_decay", "beta1", "beta2", "eps", "max_grad_norm" };
    const double vals[] = { o->lr, o->momentum, o->dampening, o->weight_decay, o->beta1, o->beta2, o->eps, o->max_grad_norm };
    int i;
    if ((int)o->type < 0 || o->type > DDP_OPTIM_ADAMW)
        return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.optimizer.type %d is not a ddp_optimizer", (int)o->type);
    for (i = 0; i < 8; i++) {
        int beta = i == 4 || i == 5;
        if (!ddp__in_range(vals[i], 0.0, beta ? 1.0 : HUGE_VAL, beta))
            return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.optimizer.%s = %g: must be %s", names[i], vals[i],
                             beta ? "in [0, 1)" : "finite and >= 0");
    }
    if (o->type == DDP_OPTIM_SGD && o->nesterov && (o->momentum <= 0 || o->dampening != 0))
        return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.optimizer.nesterov needs a momentum > 0 and dampening 0 (momentum %g, dampening %g)",
                         o->momentum, o->dampening);
    return DDP_SUCCESS;
}

static ddp_result ddp__check_schedule(ddp_schedule_desc *d) {
    if ((int)d->type < 0 || d->type > DDP_SCHEDULE_STEP)
        return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.schedule.type %d is not a ddp_schedule", (int)d->type);
    if (d->warmup_steps < 0)
        return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.schedule.warmup_steps = %lld: must be >= 0", (long long)d->warmup_steps);
    if ((d->type == DDP_SCHEDULE_COSINE || d->type == DDP_SCHEDULE_LINEAR) && d->total_steps <= d->warmup_steps)
        return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.schedule.total_steps = %lld: must be above warmup_steps (%lld)",
                         (long long)d->total_steps, (long long)d->warmup_steps);
    if (!ddp__in_range(d->min_lr, 0.0, HUGE_VAL, 0))
        return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.schedule.min_lr = %g: must be finite and >= 0", d->min_lr);
    if (d->type == DDP_SCHEDULE_STEP && d->step_size <= 0)
        return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.schedule.step_size = %lld: must be > 0", (long long)d->step_size);
    if (!ddp__in_range(d->gamma, 0.0, HUGE_VAL, 0))
        return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.schedule.gamma = %g: must be finite and >= 0", d->gamma);
    if (d->gamma == 0) d->gamma = 0.1;
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
    if (c->compress != DDP_DTYPE_DEFAULT && c->compress != DDP_F32 && c->compress != DDP_BF16 && c->compress != DDP_F16)
        return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.compress %d must be DDP_BF16, DDP_F16 or 0", (int)c->compress);
    DDP__TRY(ddp__check_optimizer(&c->optimizer));
    DDP__TRY(ddp__check_schedule(&c->schedule));
    {
        const char *z = getenv("DDP_ZERO_STAGE");
        if (z && *z && strcmp(z, "0") != 0 && strcmp(z, "1") != 0)
            return ddp__fail(NULL, DDP_ERROR_ENVIRONMENT, "environment variable DDP_ZERO_STAGE='%.32s' is not 0 or 1 (ZeRO-1 is the stage this library has)", z);
    }
    {
        const char *d = getenv("DDP_DEBUG");
        if (d && *d && strcmp(d, "off") && strcmp(d, "OFF") && strcmp(d, "detail") && strcmp(d, "DETAIL"))
            return ddp__fail(NULL, DDP_ERROR_ENVIRONMENT, "environment variable DDP_DEBUG='%.32s' is not off or detail", d);
    }
    if ((int)c->debug < 0 || c->debug > DDP_DEBUG_DETAIL)
        return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.debug %d is not a ddp_debug", (int)c->debug);
    if (c->zero_stage < 0 || c->zero_stage > 1)
        return ddp__fail(NULL, c->zero_stage > 1 ? DDP_ERROR_UNSUPPORTED : DDP_ERROR_INVALID_ARGUMENT,
                         "config.zero_stage = %d: 0 (off) or 1 (ZeRO-1: optimizer state sharded) are the stages this library has", c->zero_stage);
    if (c->zero_stage && c->uneven_inputs)
        return ddp__fail(NULL, DDP_ERROR_UNSUPPORTED, "config.zero_stage = 1 with config.uneven_inputs: a joined rank would have to run its shard of "
                         "every optimizer step; use one or the other");
    if (c->loss_scale.enabled) {
        const ddp_loss_scale_desc *l = &c->loss_scale;
        if (c->optimizer.type == DDP_OPTIM_NONE)
            return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.loss_scale.enabled needs config.optimizer.type (the scale is undone by ddp_optimizer_step)");
        if (!ddp__in_range(l->init_scale, 0.0, HUGE_VAL, 1) || !(l->init_scale > 0) || !((double)(float)l->init_scale < HUGE_VAL))
            return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.loss_scale.init_scale = %g: must be > 0 and a finite float", l->init_scale);
        if (!ddp__in_range(l->growth_factor, 1.0, HUGE_VAL, 1) || l->growth_factor == 1.0)
            return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.loss_scale.growth_factor = %g: must be > 1", l->growth_factor);
        if (!ddp__in_range(l->backoff_factor, 0.0, 1.0, 1) || l->backoff_factor == 0)
            return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.loss_scale.backoff_factor = %g: must be in (0, 1)", l->backoff_factor);
        if (l->growth_interval < 1)
            return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.loss_scale.growth_interval = %d: must be >= 1", l->growth_interval);
    }
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
            return ddp__fail(NULL, c->job_secret ? DDP_ERROR_INVALID_ARGUMENT : DDP_ERROR_ENVIRONMENT,
                             "%s has %" DDP__PRIzu " characters: a job secret needs %d to %d (ddprun makes one of 64)",
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
        return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.store_max_bytes %" DDP__PRIzu " is below the minimum of %" DDP__PRIzu " (64 MiB)",
                         c->store_max_bytes, (size_t)64 << 20);
    return DDP_SUCCESS;
}

/* store.inc.c -- ddp.h rendezvous layer: a TCP key-value store that speaks
 * PyTorch's TCPStore wire protocol (server + client).
 *
 * C99 fragment over the PLATFORM vocabulary (ddp__sock_*, ddp__pipe_*,
 * ddp__thread_*), #included by the implementation part of ddp.h (or by a
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
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define DDP__STORE_UNUSED DDP__UNUSED
#define DDP__STORE_PRINTF(f, a) DDP__PRINTF(f, a)

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
    return ddp__now();
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
    if (s <= 0) return;
    ddp__sleep_us((long)(s * 1e6)); /* an early wake-up only shortens one back-off */
}

static void ddp__store_sock_setup(int fd) {
    ddp__sock_prepare(fd);
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
    ddp__thread thread;
    int listen_fd;
    int wake[2];
    int port;
    ddp__store_kv **buckets;
    size_t nbuckets, nkeys;
    ddp__store_conn **conns;
    size_t nconns, conns_cap, max_conns;
    int live_clients;          /* nconns, published for other threads (atomic) */
    int listener_closed;       /* the server thread closed the listener (atomic) */
    int rank_clients;          /* accepted connections of ranks other than 0 (atomic) */
    size_t bytes, max_bytes;   /* memory held now (the server thread's), and the cap */
    uint64_t bytes_pub;        /* bytes, published for other threads (atomic) */
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
    sv->bytes += more;
    ddp__atomic_store_u64(&sv->bytes_pub, (uint64_t)sv->bytes);
    return 0;
}

static void ddp__store_uncharge(ddp__store_server *sv, size_t less) {
    sv->bytes -= less <= sv->bytes ? less : sv->bytes;
    ddp__atomic_store_u64(&sv->bytes_pub, (uint64_t)sv->bytes);
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
            ddp__store_drop(sv, c, "its replies would make the store hold more than %" DDP__PRIzu " bytes", sv->max_bytes);
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
    if (ddp__atomic_load_int(&sv->event_set)) return;
    va_start(ap, fmt);
    vsnprintf(sv->event_msg, sizeof sv->event_msg, fmt, ap);
    va_end(ap);
    sv->event_kind = kind;
    ddp__atomic_store_int(&sv->event_set, 1);
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
    if (sv->rank_pid && r < sv->ident.world) ddp__atomic_store_int(&sv->rank_pid[r], c->ident.pid);
    if (r != 0) ddp__atomic_add_int(&sv->rank_clients, 1);
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
        if (!ddp__atomic_load_int(&sv->event_set)) {
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
            ddp__store_drop(sv, c, "storing %" DDP__PRIzu " bytes would pass the store's cap of %" DDP__PRIzu " bytes", vl, sv->max_bytes);
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
        if (op == DDP__STORE_Q_WAIT && ddp__atomic_load_int(&sv->event_set)) {
            ddp__store_conn_send_u8(sv, c, DDP__STORE_WAIT_ABORTED);
            break;
        }
        if (op == DDP__STORE_Q_CHECK || missing == 0) {
            ddp__store_conn_send_u8(sv, c, missing == 0 ? 0 : 1); /* READY/STOP_WAITING : NOT_READY */
            break;
        }
        ddp__store_conn_clear_wait(sv, c);
        if (ddp__store_charge(sv, bytes) != 0) {
            ddp__store_drop(sv, c, "its WAIT would make the store hold more than %" DDP__PRIzu " bytes", sv->max_bytes);
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
        ddp__ssize w = ddp__sock_send(c->fd, c->out.p + c->out_off, c->out.n - c->out_off,
                         DDP__SOCK_NOSIGNAL | DDP__SOCK_DONTWAIT);
        if (w > 0) { c->out_off += (size_t)w; continue; }
        if (w < 0 && ddp__sock_errno() == EINTR) continue;
        if (w < 0 && (ddp__sock_errno() == EAGAIN || ddp__sock_errno() == EWOULDBLOCK)) return;
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
        ddp__ssize got;
        if (c->in_cap - c->in_len < 65536) {
            size_t cap = c->in_cap ? c->in_cap : 65536;
            unsigned char *q;
            while (cap - c->in_len < 65536) cap *= 2;
            if (ddp__store_charge(sv, cap - c->in_cap) != 0) {
                ddp__store_drop(sv, c, "its request would make the store hold more than %" DDP__PRIzu " bytes", sv->max_bytes);
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
        got = ddp__sock_recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, 0);
        if (got > 0) { c->in_len += (size_t)got; c->active = 1; break; }
        if (got < 0 && ddp__sock_errno() == EINTR) continue;
        if (got < 0 && (ddp__sock_errno() == EAGAIN || ddp__sock_errno() == EWOULDBLOCK)) break;
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
    if (c->hello == 2 && c->rank != 0) ddp__atomic_add_int(&sv->rank_clients, -1);
    ddp__sock_close(c->fd);
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
        int fd = ddp__sock_accept(sv->listen_fd, (struct sockaddr *)&ss, &sl), one = 1;
        ddp__store_conn *c;
        char peer[64];
        if (fd < 0) {
            if (ddp__sock_errno() == EINTR || ddp__sock_errno() == ECONNABORTED) continue;
            if (ddp__sock_errno() == EMFILE || ddp__sock_errno() == ENFILE || ddp__sock_errno() == ENOBUFS || ddp__sock_errno() == ENOMEM)
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
                ddp__store_logf(sv, 1, "store: refused a connection from %s: %" DDP__PRIzu " connections are open, the cap", peer, sv->max_conns);
                ddp__sock_close(fd);
                continue;
            }
            ddp__store_drop(sv, victim, "evicted: %" DDP__PRIzu " connections are open, the cap, and it has sent nothing", sv->max_conns);
        }
        ddp__store_sock_setup(fd);
        ddp__sock_setopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
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
            ddp__sock_close(fd);
            ddp__store_logf(sv, 1, "store: refused a connection from %s: the store holds %" DDP__PRIzu " bytes, its cap", peer, sv->bytes);
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
        rc = ddp__sock_poll(pfd, (ddp__nfds)(n + 2), tmo);
        if (rc < 0) {
            if (ddp__sock_errno() != EINTR) ddp__store_sleep(0.01);
            continue;
        }
        paused = 0;
        if (pfd[1].revents) {
            /* wake-up byte: 1 stop, 2 stop accepting (existing clients stay served) */
            char cmd[16];
            ddp__ssize k = ddp__pipe_read(sv->wake[0], cmd, sizeof cmd), j;
            int stop = 0;
            for (j = 0; j < k; j++) {
                if (cmd[j] == 1) stop = 1;
                if (cmd[j] == 2 && sv->listen_fd >= 0) {
                    ddp__sock_close(sv->listen_fd);
                    sv->listen_fd = -1;
                    ddp__atomic_store_int(&sv->listener_closed, 1);
                }
                if (cmd[j] == 3 && ddp__atomic_load_int(&sv->ext_set)) ddp__store_event(sv, DDP__EVENT_ABORT, "%s", sv->ext_msg);
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
        ddp__atomic_store_int(&sv->live_clients, (int)live);
    }
    free(pfd);
    return NULL;
}

static int ddp__store_listen_on(const struct sockaddr *sa, socklen_t len, int *fd_out, int *err_no) {
    int zero = 0;
    int fd = ddp__sock_open(sa->sa_family, SOCK_STREAM, 0);
    if (fd < 0) { *err_no = ddp__sock_errno(); return -1; }
    ddp__store_sock_setup(fd);
    ddp__sock_listen_prepare(fd); /* POSIX: restart within TIME_WAIT; Windows: nobody else takes the port */
    if (sa->sa_family == AF_INET6) ddp__sock_setopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    if (ddp__sock_bind(fd, sa, len) != 0 || ddp__sock_listen(fd, 4096) != 0) {
        *err_no = ddp__sock_errno();
        ddp__sock_close(fd);
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
            return ddp__store_fail(err, errlen, "cannot listen on port %d: %s", port, ddp__strerror(err_no));
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
                                   bind_host, port, bind_host, ddp__gai_strerror(rc));
        }
        for (ai = res; ai && fd < 0; ai = ai->ai_next)
            ddp__store_listen_on(ai->ai_addr, ai->ai_addrlen, &fd, &err_no);
        freeaddrinfo(res);
        if (fd < 0) {
            ddp__store_server_free(sv);
            return ddp__store_fail(err, errlen, "cannot listen on %s:%d: %s", bind_host, port, ddp__strerror(err_no));
        }
    }
    sv->listen_fd = fd;
    alen = sizeof addr;
    if (ddp__sock_name(fd, &addr.sa, &alen) == 0)
        sv->port = ntohs(addr.sa.sa_family == AF_INET6 ? addr.in6.sin6_port : addr.in4.sin_port);
    if (ddp__pipe_open(sv->wake) != 0) {
        err_no = ddp__sock_errno();
        ddp__sock_close(fd);
        ddp__store_server_free(sv);
        return ddp__store_fail(err, errlen, "cannot start store server on port %d: pipe: %s", port, ddp__strerror(err_no));
    }
    /* the server thread takes no signals: they belong to the user's threads */
    rc = ddp__thread_start_nosignals(&sv->thread, ddp__store_server_main, sv);
    if (rc != 0) {
        ddp__sock_close(fd);
        ddp__pipe_close(sv->wake[0]);
        ddp__pipe_close(sv->wake[1]);
        ddp__store_server_free(sv);
        return ddp__store_fail(err, errlen, "cannot start store server thread: %s", ddp__strerror(rc));
    }
    *out = sv;
    return 0;
}

static DDP__STORE_UNUSED int ddp__store_server_port(const ddp__store_server *sv) { return sv ? sv->port : 0; }

/* Stop accepting connections; the clients connected keep being served.
   The port is then free for a new store (the next context's). Returns once
   the listener is closed (at most 2 s): a client of the next store must not
   be queued on this one's listener, which resets it when it closes (seen
   under Wine, where the server thread may wake late on a loaded machine). */
static DDP__STORE_UNUSED void ddp__store_server_close_listener(ddp__store_server *sv) {
    char b = 2;
    double deadline;
    if (!sv) return;
    while (ddp__pipe_write(sv->wake[1], &b, 1) < 0 && ddp__sock_errno() == EINTR) {
    }
    deadline = ddp__store_now() + 2.0;
    while (!ddp__atomic_load_int(&sv->listener_closed) && ddp__store_now() < deadline) ddp__store_sleep(1e-4);
}

/* Rank 0 gives up: every rank waiting in the store (and every later
   wait) ends with msg. Any thread; the first call wins. */
static DDP__STORE_UNUSED void ddp__store_server_abort(ddp__store_server *sv, const char *msg) {
    char b = 3;
    if (!sv || ddp__atomic_load_int(&sv->ext_set)) return;
    ddp__copy_str(sv->ext_msg, sizeof sv->ext_msg, msg);
    ddp__atomic_store_int(&sv->ext_set, 1);
    while (ddp__pipe_write(sv->wake[1], &b, 1) < 0 && ddp__sock_errno() == EINTR) {
    }
}

/* Clients connected right now (any thread may ask). */
static DDP__STORE_UNUSED int ddp__store_server_clients(const ddp__store_server *sv) {
    return sv ? ddp__atomic_load_int(&sv->live_clients) : 0;
}

/* Connections of accepted ranks other than rank 0 (any thread may ask):
   strangers do not count, so they cannot delay rank 0's exit. */
static DDP__STORE_UNUSED int ddp__store_server_rank_clients(const ddp__store_server *sv) {
    return sv ? ddp__atomic_load_int(&sv->rank_clients) : 0;
}

/* The event that ended the rendezvous, if any (any thread may ask): its
   kind (DDP__EVENT_*) and message; 0 when there is none. */
static DDP__STORE_UNUSED int ddp__store_server_event(const ddp__store_server *sv, char *msg, size_t cap) {
    if (!sv || !ddp__atomic_load_int(&sv->event_set)) return 0;
    if (msg && cap) ddp__copy_str(msg, cap, sv->event_msg);
    return sv->event_kind;
}

/* The pid rank r gave in its accepted hello (0: none yet; any thread). */
static DDP__STORE_UNUSED int ddp__store_server_rank_pid(const ddp__store_server *sv, int r) {
    if (!sv || !sv->rank_pid || r < 0 || r >= sv->ident.world) return 0;
    return ddp__atomic_load_int(&sv->rank_pid[r]);
}

/* Memory the server holds now (its thread's figure; a test's probe). */
static DDP__STORE_UNUSED size_t ddp__store_server_bytes(const ddp__store_server *sv) {
    return sv ? (size_t)ddp__atomic_load_u64(&sv->bytes_pub) : 0;
}

/* Stop serving, drop every connection (blocked clients see the close), free. */
static DDP__STORE_UNUSED void ddp__store_server_stop(ddp__store_server *sv) {
    size_t i;
    char b = 1;
    if (!sv) return;
    while (ddp__pipe_write(sv->wake[1], &b, 1) < 0 && ddp__sock_errno() == EINTR) {
    }
    ddp__thread_join(&sv->thread);
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
    if (sv->listen_fd >= 0) ddp__sock_close(sv->listen_fd);
    ddp__pipe_close(sv->wake[0]);
    ddp__pipe_close(sv->wake[1]);
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
        r = ddp__sock_poll(&p, 1, ms);
        if (r > 0) return DDP__STORE_IO_OK; /* POLLHUP/POLLERR: the next call says */
        if (r == 0) {
            if (ms >= 0 && ddp__store_now() >= deadline) return DDP__STORE_IO_TIMEOUT;
            continue;
        }
        if (ddp__sock_errno() == EINTR) continue;
        *err_no = ddp__sock_errno();
        return DDP__STORE_IO_ERROR;
    }
}

static int ddp__store_send_all(int fd, const void *buf, size_t n, double deadline, int *err_no) {
    const unsigned char *p = (const unsigned char *)buf;
    while (n > 0) {
        ddp__ssize w = ddp__sock_send(fd, p, n, DDP__SOCK_NOSIGNAL);
        if (w > 0) { p += w; n -= (size_t)w; continue; }
        if (w < 0 && ddp__sock_errno() == EINTR) continue;
        if (w < 0 && (ddp__sock_errno() == EAGAIN || ddp__sock_errno() == EWOULDBLOCK)) {
            int r = ddp__store_poll1(fd, POLLOUT, deadline, err_no);
            if (r != DDP__STORE_IO_OK) return r;
            continue;
        }
        *err_no = w < 0 ? ddp__sock_errno() : EIO;
        return (*err_no == EPIPE || *err_no == ECONNRESET) ? DDP__STORE_IO_CLOSED : DDP__STORE_IO_ERROR;
    }
    return DDP__STORE_IO_OK;
}

static int ddp__store_recv_all(int fd, void *buf, size_t n, double deadline, int *err_no) {
    unsigned char *p = (unsigned char *)buf;
    while (n > 0) {
        ddp__ssize r = ddp__sock_recv(fd, p, n, 0);
        if (r > 0) { p += r; n -= (size_t)r; continue; }
        if (r == 0) { *err_no = 0; return DDP__STORE_IO_CLOSED; }
        if (ddp__sock_errno() == EINTR) continue;
        if (ddp__sock_errno() == EAGAIN || ddp__sock_errno() == EWOULDBLOCK) {
            int rc = ddp__store_poll1(fd, POLLIN, deadline, err_no);
            if (rc != DDP__STORE_IO_OK) return rc;
            continue;
        }
        *err_no = ddp__sock_errno();
        return ddp__sock_errno() == ECONNRESET ? DDP__STORE_IO_CLOSED : DDP__STORE_IO_ERROR;
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
            snprintf(why, whylen, "cannot resolve '%s': %s", host, ddp__gai_strerror(rc));
        }
        for (ai = rc == 0 ? res : NULL; ai; ai = ai->ai_next) {
            int fd = ddp__sock_open(ai->ai_family, ai->ai_socktype, ai->ai_protocol), e = 0, one = 1;
            if (fd < 0) { snprintf(why, whylen, "%s", ddp__strerror(ddp__sock_errno())); continue; }
            ddp__store_sock_setup(fd);
            if (ddp__sock_connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
                e = ddp__sock_errno();
                if (e == EINPROGRESS || e == EINTR) {
                    /* one address may black-hole: give the others a chance */
                    double now = ddp__store_now();
                    double d = deadline < now + 5.0 ? deadline : now + 5.0;
                    int pr = ddp__store_poll1(fd, POLLOUT, d, &e);
                    if (pr == DDP__STORE_IO_TIMEOUT) e = ETIMEDOUT;
                    else if (pr == DDP__STORE_IO_OK) e = ddp__sock_so_error(fd);
                }
            }
            if (e == 0) {
                ddp__sock_setopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                freeaddrinfo(res);
                *fd_out = fd;
                return 0;
            }
            snprintf(why, whylen, "%s", ddp__strerror(e));
            ddp__sock_close(fd);
        }
        if (rc == 0) freeaddrinfo(res);
        if (owner_pid > 0 && ddp__proc_dead(owner_pid)) {
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
    *nonce = ((uint32_t)ddp__getpid() & 0xFF00FFFFu) | 0x00FF0000u;
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
            if (i == 1) ddp__sock_close(fd[0]);
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
        r = ddp__sock_poll(p, (ddp__nfds)np, ms);
        if (r < 0 && ddp__sock_errno() != EINTR) break;
        if (r == 0 && ms >= 0 && ddp__store_now() >= deadline) break;
        for (i = 0; i < 2 && win < 0; i++) {
            ddp__ssize n;
            if (!alive[i]) continue;
            n = ddp__sock_recv(fd[i], got[i] + have[i], need[i] - have[i], 0);
            if (n > 0) {
                have[i] += (size_t)n;
                if (have[i] < need[i]) continue;
                if (i == 0 || memcmp(got[1], &nonce, 4) == 0) win = i;
                else alive[i] = 0; /* a PING answer that is not ours */
            } else if (n == 0 || (ddp__sock_errno() != EAGAIN && ddp__sock_errno() != EWOULDBLOCK && ddp__sock_errno() != EINTR)) {
                alive[i] = 0; /* dropped: not this version */
            }
        }
    }
    for (i = 0; i < 2; i++)
        if (i != win) ddp__sock_close(fd[i]);
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

/* The store's owner (rank 0, on this host) has exited: a fatal PEER failure
 * that names it, and 1; else 0. A store that stops answering is often a
 * dead rank 0 whose connections the system has not closed yet (seen under
 * Wine on a loaded machine): its pid says so at once, without waiting out
 * a reconnection. */
static int ddp__store_owner_gone(ddp__store *s, const char *what, char *err, size_t errlen) {
    if (s->owner_pid <= 0 || !ddp__proc_dead(s->owner_pid)) return 0;
    s->broken = 1;
    s->fatal = DDP_ERROR_PEER;
    ddp__store_fail(s->fatal_msg, sizeof s->fatal_msg, "rank 0 (pid %d), which runs the store at %s:%d, has exited (while this rank waited for %s)",
                    s->owner_pid, s->host, s->port, what);
    ddp__store_fail(err, errlen, "%s", s->fatal_msg);
    return 1;
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
        return ddp__store_fail(err, errlen, "cannot read random bytes for the store's hello: %s", ddp__strerror(errno));
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
    if (r != DDP__STORE_IO_OK && ddp__store_owner_gone(s, "the hello", err, errlen)) return -1;
    if (r != DDP__STORE_IO_OK)
        return ddp__store_fail(err, errlen, "the store at %s:%d did not complete the hello: %s", s->host, s->port,
                               r == DDP__STORE_IO_TIMEOUT ? "no answer" : e ? ddp__strerror(e) : "malformed answer");
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
    if (s->fd >= 0) ddp__sock_close(s->fd);
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
            ddp__sock_close(fd);
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
            ddp__sock_close(fd);
            return ddp__store_fail(err, errlen,
                                   "store at %s:%d did not complete the torch 2.x handshake (VALIDATE + PING): %s",
                                   s->host, s->port,
                                   r == DDP__STORE_IO_TIMEOUT ? "no answer"
                                   : r == DDP__STORE_IO_CLOSED ? "it closed the connection (a torch 1.x store? use protocol V1)"
                                   : r == DDP__STORE_IO_OK ? "wrong PING answer" : ddp__strerror(e));
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

/* A closed connection to host:port, its arguments checked: 0, or -1 with
 * the message in err. */
static DDP__STORE_UNUSED int ddp__store_target(ddp__store *s, const char *host, int port, double timeout_s, char *err, size_t errlen) {
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
    return 0;
}

/* Connect to the store at host:port, retrying until timeout_s (<= 0: forever);
 * proto is DDP__STORE_PROTO_AUTO, _V1 or _V2. timeout_s also bounds every
 * later call (change s->timeout_s to adjust). */
static DDP__STORE_UNUSED int ddp__store_connect_proto(ddp__store *s, const char *host, int port,
                                                      double timeout_s, int proto, char *err,
                                                      size_t errlen) {
    if (ddp__store_target(s, host, port, timeout_s, err, errlen) != 0) return -1;
    if (proto < DDP__STORE_PROTO_AUTO || proto > DDP__STORE_PROTO_V2)
        return ddp__store_fail(err, errlen, "cannot connect to store at %s:%d: unknown protocol %d", host, port, proto);
    return ddp__store_open(s, proto, timeout_s, err, errlen);
}

static DDP__STORE_UNUSED int ddp__store_connect(ddp__store *s, const char *host, int port,
                                                double timeout_s, char *err, size_t errlen) {
    return ddp__store_connect_proto(s, host, port, timeout_s, DDP__STORE_PROTO_AUTO, err, errlen);
}

static DDP__STORE_UNUSED void ddp__store_close(ddp__store *s) {
    if (s->fd >= 0) ddp__sock_close(s->fd);
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
    if (ddp__store_target(s, host, port, timeout_s, err, errlen) != 0) return -1;
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
    if (ddp__store_owner_gone(s, what, err, errlen)) return -1;
    if (why == DDP__STORE_IO_TIMEOUT)
        return ddp__store_fail(err, errlen, "timed out after %.1f s waiting for the store at %s:%d to answer %s",
                               s->timeout_s, s->host, s->port, what);
    if (why == DDP__STORE_IO_CLOSED)
        return ddp__store_fail(err, errlen, "store at %s:%d closed the connection during %s%s%s", s->host,
                               s->port, what, err_no ? ": " : "", err_no ? ddp__strerror(err_no) : "");
    return ddp__store_fail(err, errlen, "I/O error talking to store at %s:%d during %s: %s", s->host,
                           s->port, what, ddp__strerror(err_no));
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
        char what[300];
        snprintf(what, sizeof what, "key '%.250s'", nkeys > 0 ? keys[0] : "");
        if (ddp__store_owner_gone(s, what, err, errlen)) return -1;
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

/* A collective's fingerprint (DDP_DEBUG=detail, see DEBUG MODE). */
typedef struct ddp__fp {
    uint64_t seq;        /* this rank's fingerprinted collectives so far, this one included */
    uint64_t count;      /* elements (bytes for byte-wise collectives) */
    int64_t  step;       /* synced steps begun on this rank */
    int32_t  kind;       /* DDP__FP_* */
    int32_t  dtype;
    int32_t  op;         /* ddp_op; broadcast: the root */
    int32_t  arg;        /* the bucket of a gradient reduction or of a hook's collective, else -1 */
    char     site[32];   /* where: "ddp_allreduce", "gradient bucket", "ZeRO-1 norm", ... */
} ddp__fp;

typedef struct ddp__shm_slot {
    uint64_t arrive, mid, done;
    int32_t  pid;
    int32_t  pad0;
    uint64_t fp_seq, fp_ack;      /* DDP_DEBUG=detail: fingerprint fp_seq published; fp_ack compared */
    ddp__fp  fp;
    char     pad[DDP__CACHELINE - 48 - sizeof(ddp__fp)];
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
    int32_t  abort_code;                 /* DDP_ERROR_USER: a communication hook failed; DDP_ERROR_MISMATCH: the
                                            desync check did (written before abort_rank) */
    char     pad[DDP__CACHELINE * 5 - sizeof(ddp__seg_hdr) - 524];
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
    if (!c) return;
    if (ddp__atomic_cas_int(&c->abort_claim, 0, 1)) {
        ddp__copy_str(c->abort_msg, sizeof c->abort_msg, why);
        /* only a failed communication hook and the desync check fail the
           peers with their own code: a peer still waiting for the last
           fingerprint when the first rank compared them all must not
           answer "peer failure" for what is a mismatch */
        c->abort_code = ddp__atomic_load_int(&ctx->hook_failed) ? (int32_t)DDP_ERROR_USER
                        : ddp__atomic_load_int(&ctx->desync)   ? (int32_t)DDP_ERROR_MISMATCH
                                                               : 0;
        ddp__atomic_store_int(&c->abort_rank, (int32_t)ctx->rank);
    }
}

/* The context is broken: only ddp_destroy() is allowed. The first code wins;
   callers write their message first, so whoever sees the flag sees it. */
static void ddp__set_broken(ddp_context *ctx, ddp_result code) {
    if (ddp__atomic_cas_int(&ctx->broken, 0, (int)(code ? code : DDP_ERROR_INVALID_STATE))) {
        /* keep the cause: later calls' messages must name it, not the
           last refusal (which would nest "broken by ... broken by ...") */
        ddp__mutex_lock(&ctx->err_mu);
        ddp__copy_str(ctx->broke_why, sizeof ctx->broke_why, ddp__errbuf(ctx));
        ddp__mutex_unlock(&ctx->err_mu);
    }
}

/* Mark the context broken after a failed collective and let the peers know. */
static ddp_result ddp__break(ddp_context *ctx, ddp_result code) {
    ddp__set_broken(ctx, code);
    if (code != DDP_ERROR_PEER) ddp__shm_abort(ctx, ddp__errbuf(ctx));
    return code;
}

static const char *ddp__counter_name(int field) {
    static const char *const names[] = { "arrive", "mid", "done", "fingerprint", "fingerprint-checked" };
    return field >= 0 && field < 5 ? names[field] : "?";
}

static uint64_t ddp__counter(ddp__shm_slot *s, int field) {
    switch (field) {
    case 0: return ddp__atomic_load_u64(&s->arrive);
    case 1: return ddp__atomic_load_u64(&s->mid);
    case 2: return ddp__atomic_load_u64(&s->done);
    case 3: return ddp__atomic_load_u64(&s->fp_seq);
    default: return ddp__atomic_load_u64(&s->fp_ack);
    }
}

static void ddp__set_counter(ddp_context *ctx, int field, uint64_t v) {
    ddp__shm_slot *s = ddp__slot(ctx, ctx->rank);
    if (field == 0) ddp__atomic_store_u64(&s->arrive, v);
    else if (field == 1) ddp__atomic_store_u64(&s->mid, v);
    else if (field == 2) ddp__atomic_store_u64(&s->done, v);
    else if (field == 3) ddp__atomic_store_u64(&s->fp_seq, v);
    else ddp__atomic_store_u64(&s->fp_ack, v);
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
        if (ddp__atomic_load_int(&c->abort_rank) >= 0) {
            /* a communication hook that failed on one rank fails every rank
               with DDP_ERROR_USER; anything else (your ddp_train_step
               function's failure included) is a peer's failure */
            ddp_result code = c->abort_code == DDP_ERROR_USER ? DDP_ERROR_USER
                              : c->abort_code == DDP_ERROR_MISMATCH ? DDP_ERROR_MISMATCH
                                                                    : DDP_ERROR_PEER;
            if (code == DDP_ERROR_MISMATCH) {
                /* the same message on every rank (DEBUG MODE) */
                ddp__fail(ctx, code, "%s", c->abort_msg);
                ddp__atomic_store_int(&ctx->desync, 1);
            } else {
                ddp__fail(ctx, code, "rank %d gave up while rank %d waited for %s: %s",
                          (int)ddp__atomic_load_int(&c->abort_rank), ctx->rank, what, c->abort_msg);
            }
            if (code == DDP_ERROR_USER) ddp__atomic_store_int(&ctx->hook_broke, 1);
            ddp__set_broken(ctx, code);
            return code;
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
                   the one to name. A peer that arrived and then finished
                   and exited is no failure: its counter, read again after
                   the death check, says so (Windows reports an exit at
                   once; POSIX only once the process was reaped). */
                for (q = q0; q < q1; q++) {
                    int32_t pid;
                    if (ddp__counter(ddp__slot(ctx, q), field) >= target) continue;
                    pid = ddp__slot(ctx, q)->pid;
                    if (pid > 0 && ddp__proc_dead((int)pid) && ddp__counter(ddp__slot(ctx, q), field) < target) {
                        ddp__fail(ctx, DDP_ERROR_PEER, "rank %d (pid %d) exited while rank %d waited for %s",
                                  q, (int)pid, ctx->rank, what);
                        ddp__set_broken(ctx, DDP_ERROR_PEER);
                        ddp__shm_abort(ctx, ddp__errbuf(ctx));
                        return DDP_ERROR_PEER;
                    }
                }
            }
        }
        if (spins < 20000) ddp__yield();
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
            for (d = 0; d < ndst; d++) DDP__PREFETCH_W((float *)dst[d] + i + ahead);
            for (q = 0; q < nsrc; q++) DDP__PREFETCH_R((const float *)src[q] + i + ahead);
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
    if ((t == DDP_BF16 || t == DDP_F16) && op != DDP_OP_MAX && op != DDP_OP_MIN) {
        /* the 16-bit sums (compression hooks): as the generic path below,
           without its per-element type switch */
        double acc[DDP__RED_BLOCK / 2];
        size_t blk = DDP__RED_BLOCK / 2;
        int bf = t == DDP_BF16;
        for (b0 = 0; b0 < n; b0 += blk) {
            size_t m = n - b0 < blk ? n - b0 : blk, i;
            const uint16_t *s0 = (const uint16_t *)src[0] + b0;
            if (bf) for (i = 0; i < m; i++) acc[i] = ddp__bf16_to_f32(s0[i]);
            else for (i = 0; i < m; i++) acc[i] = ddp__f16_to_f32(s0[i]);
            for (q = 1; q < nsrc; q++) {
                const uint16_t *sq = (const uint16_t *)src[q] + b0;
                if (bf) for (i = 0; i < m; i++) acc[i] += ddp__bf16_to_f32(sq[i]);
                else for (i = 0; i < m; i++) acc[i] += ddp__f16_to_f32(sq[i]);
            }
            if (scale != 1.0) for (i = 0; i < m; i++) acc[i] *= scale;
            for (d = 0; d < ndst; d++) {
                uint16_t *y = (uint16_t *)dst[d] + b0;
                if (bf) for (i = 0; i < m; i++) y[i] = ddp__f32_to_bf16((float)acc[i]);
                else for (i = 0; i < m; i++) y[i] = ddp__f32_to_f16((float)acc[i]);
            }
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

/* The all-reduce, its result multiplied by extra as well (hooks). */
static ddp_result ddp__shm_allreduce_scaled(ddp_context *ctx, void *buf, size_t n, ddp_dtype t, ddp_op op, double extra) {
    double scale = ddp__op_scale(ctx, op) * extra;
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

static ddp_result ddp__shm_allreduce(ddp_context *ctx, void *buf, size_t n, ddp_dtype t, ddp_op op) {
    return ddp__shm_allreduce_scaled(ctx, buf, n, t, op, 1.0);
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

/* Communication bucket c in place in the gradient segment: every rank
   reduces its pieces, then writes them to every rank's buffer (all-reduce)
   or only to its own (scatter: ZeRO-1, where nobody else needs them). The
   second wait keeps a rank from touching its buffer again while a peer
   still reads it. */
static ddp_result ddp__shm_reduce_pieces(ddp_context *ctx, int c, double scale, int scatter, const char *what) {
    const ddp__cbucket *cb = &ctx->cb[c];
    uint64_t seq = ++ctx->shm.seq;
    void *src[1024];
    int q, k, W = ctx->world;
    ddp__set_counter(ctx, 0, seq);
    DDP__TRY(ddp__shm_wait(ctx, 0, seq, -1, what));
    for (k = 0; k < cb->npiece; k++) {
        const ddp__piece *pc = &ctx->cpieces[cb->piece0 + k];
        if (pc->owner != ctx->rank) continue;
        for (q = 0; q < W; q++) src[q] = ctx->shm.grads + (size_t)q * ctx->shm.grad_stride + pc->offset;
        ddp__reduce(src, W, scatter ? &src[ctx->rank] : src, scatter ? 1 : W, pc->numel, cb->dtype, DDP_OP_SUM, scale);
    }
    ddp__set_counter(ctx, 1, seq);
    DDP__TRY(ddp__shm_wait(ctx, 1, seq, -1, what));
    ddp__set_counter(ctx, 2, seq);
    return DDP_SUCCESS;
}

/* A world of one: the sum is the gradient itself, times the factor. */
static void ddp__scale_ranges(ddp_context *ctx, unsigned char *base, int c, double scale) {
    const ddp__cbucket *cb = &ctx->cb[c];
    int k;
    if (scale == 1.0) return;
    for (k = 0; k < cb->nrange; k++) {
        void *p = base + ctx->cranges[cb->range0 + k].offset;
        ddp__reduce(&p, 1, &p, 1, ctx->cranges[cb->range0 + k].numel, cb->dtype, DDP_OP_SUM, scale);
    }
}

static ddp_result ddp__shm_bucket_reduce(ddp_context *ctx, int c, double scale) {
    char what[96];
    if (ctx->world == 1) {
        ddp__scale_ranges(ctx, ctx->flat_grads, c, scale);
        return DDP_SUCCESS;
    }
    snprintf(what, sizeof what, "gradient bucket %d", c);
    return ddp__shm_reduce_pieces(ctx, c, scale, ctx->zero, what);
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

/* ---- desync detection (DDP_DEBUG=detail) ----

   Collectives pair up by order: a rank that calls another collective than
   its peers, with another count or type, or one step behind, pairs with
   whatever they run and gives garbage or a hang. With config.debug =
   DDP_DEBUG_DETAIL each collective first publishes a fingerprint (its
   number on this rank, kind, count, type, op or root, bucket, synced
   steps begun, where it was called) and every rank compares rank 0's with
   every other rank's before any data moves; a difference fails every rank
   with DDP_ERROR_MISMATCH and one message naming both sides. shm and
   staged: in the rank's slot of the control segment, two counters (the
   fingerprint published, the comparison done: nobody overwrites its
   fingerprint before everybody compared it); nccl: one all-gather of the
   fingerprints. Without debug mode nothing is exchanged, and a mismatch
   still never reads or writes out of bounds: every size a rank uses is its
   own, and the buffers it reads from others are the staging areas and
   gradient segments, whose sizes every rank shares. */

enum { DDP__FP_BARRIER = 0, DDP__FP_ALLREDUCE, DDP__FP_BROADCAST, DDP__FP_ALLGATHER, DDP__FP_REDUCE_SCATTER,
       DDP__FP_BUCKET, DDP__FP_GATHER, DDP__FP_KINDS };

static void ddp__fp_describe(const ddp__fp *f, char *out, size_t cap) {
    static const char *const kinds[DDP__FP_KINDS] = { "barrier", "all-reduce", "broadcast", "all-gather", "reduce-scatter",
                                                      "gradient reduction", "parameter all-gather" };
    static const char *const ops[] = { "sum", "sum", "avg", "max", "min" };
    char site[sizeof f->site + 1], what[64], bucket[32];
    const char *kind = f->kind >= 0 && f->kind < DDP__FP_KINDS ? kinds[f->kind] : "unknown collective";
    const char *op = f->op >= 0 && f->op <= (int)DDP_OP_MIN ? ops[f->op] : "?";
    size_t i;
    /* a peer's bytes: printable characters only, terminated here */
    for (i = 0; i < sizeof f->site && f->site[i]; i++) site[i] = f->site[i] >= 32 && f->site[i] < 127 ? f->site[i] : '?';
    site[i] = 0;
    if (f->kind == DDP__FP_BUCKET) {
        snprintf(out, cap, "%s %d of synced step %lld (collective #%llu: %s of %llu x %s)", site, (int)f->arg, (long long)f->step,
                 (unsigned long long)f->seq, f->op == 1 ? "reduce-scatter" : "all-reduce", (unsigned long long)f->count,
                 ddp_dtype_name((ddp_dtype)f->dtype));
        return;
    }
    if (f->kind == DDP__FP_BARRIER) {
        snprintf(out, cap, "%s (collective #%llu: barrier; after synced step %lld)", site, (unsigned long long)f->seq, (long long)f->step);
        return;
    }
    if (f->kind == DDP__FP_BROADCAST) snprintf(what, sizeof what, "from rank %d", (int)f->op);
    else snprintf(what, sizeof what, "%s", op);
    if (f->arg >= 0) snprintf(bucket, sizeof bucket, ", bucket %d", (int)f->arg);
    else bucket[0] = 0;
    snprintf(out, cap, "%s (collective #%llu: %s of %llu x %s, %s%s; after synced step %lld)", site, (unsigned long long)f->seq, kind,
             (unsigned long long)f->count, f->dtype < 0 ? "bytes" : ddp_dtype_name((ddp_dtype)f->dtype), what, bucket, (long long)f->step);
}

static int ddp__fp_same(const ddp__fp *a, const ddp__fp *b) {
    return a->kind == b->kind && a->count == b->count && a->dtype == b->dtype && a->op == b->op && a->arg == b->arg &&
           a->step == b->step && strncmp(a->site, b->site, sizeof a->site) == 0;
}

/* Compare rank 0's fingerprint with the others' (fps[q]): every rank
   finds the same first difference and fails with the same message. */
static ddp_result ddp__fp_compare(ddp_context *ctx, const ddp__fp *fps, int stride_bytes) {
    const ddp__fp *f0 = fps;
    int q;
    for (q = 1; q < ctx->world; q++) {
        const ddp__fp *fq = (const ddp__fp *)((const unsigned char *)fps + (size_t)q * (size_t)stride_bytes);
        if (!ddp__fp_same(f0, fq)) {
            char a[256], b[256];
            ddp__fp_describe(f0, a, sizeof a);
            ddp__fp_describe(fq, b, sizeof b);
            ddp__fail(ctx, DDP_ERROR_MISMATCH, "collectives out of step (DDP_DEBUG=detail): rank 0 is in %s, but rank %d is in %s", a, q, b);
            ddp__atomic_store_int(&ctx->desync, 1);
            return ddp__break(ctx, DDP_ERROR_MISMATCH);
        }
    }
    return DDP_SUCCESS;
}

static ddp_result ddp__fp_check(ddp_context *ctx, int kind, const char *site, uint64_t count, ddp_dtype t, int op, int arg) {
    ddp__fp f;
    ddp_result r;
    if (!ctx->debug || ctx->world == 1) return DDP_SUCCESS;
    memset(&f, 0, sizeof f);
    f.seq = ++ctx->shm.fp_seq;
    f.count = count;
    f.step = ctx->sync_steps;
    f.kind = kind;
    f.dtype = (int32_t)t;
    f.op = op;
    f.arg = arg;
    ddp__copy_str(f.site, sizeof f.site, site);
    if (ctx->shm.ctrl) {
        /* publish, wait for everybody's, compare, then release */
        ddp__shm_slot *me = ddp__slot(ctx, ctx->rank);
        ddp__fp *all;
        int q;
        memcpy(&me->fp, &f, sizeof f);
        ddp__set_counter(ctx, 3, f.seq);
        DDP__TRY(ddp__shm_wait(ctx, 3, f.seq, -1, "the peers' fingerprints (DDP_DEBUG=detail)"));
        all = (ddp__fp *)ddp__alloc(ctx, (size_t)ctx->world * sizeof *all);
        if (!all) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory comparing fingerprints");
        for (q = 0; q < ctx->world; q++) memcpy(&all[q], &ddp__slot(ctx, q)->fp, sizeof f);
        r = ddp__fp_compare(ctx, all, (int)sizeof f);
        ddp__free(ctx, all);
        if (r != DDP_SUCCESS) return r;
        ddp__set_counter(ctx, 4, f.seq);
        return ddp__shm_wait(ctx, 4, f.seq, -1, "the peers to compare fingerprints (DDP_DEBUG=detail)");
    }
    {
        /* no shared control segment (nccl): one all-gather of the fingerprints */
        ddp__fp *all = (ddp__fp *)ddp__alloc(ctx, (size_t)ctx->world * sizeof *all);
        if (!all) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory comparing fingerprints");
        r = ctx->ops->allgather(ctx, &f, all, sizeof f);
        if (r == DDP_SUCCESS) r = ddp__fp_compare(ctx, all, (int)sizeof f);
        ddp__free(ctx, all);
        return r;
    }
}

/* A broken context answers every call with the error that broke it when a
   peer, a timeout, a communication hook or the desync check did
   (DDP_ERROR_PEER, DDP_ERROR_TIMEOUT, DDP_ERROR_USER, DDP_ERROR_MISMATCH),
   else DDP_ERROR_INVALID_STATE. */
static ddp_result ddp__check_usable(ddp_context *ctx, const char *fn) {
    int b = ddp__atomic_load_int(&ctx->broken);
    if (b) {
        ddp_result code = b == DDP_ERROR_PEER || b == DDP_ERROR_TIMEOUT ? (ddp_result)b : DDP_ERROR_INVALID_STATE;
        if (ddp__atomic_load_int(&ctx->hook_broke)) code = DDP_ERROR_USER; /* a communication hook failed */
        if (ddp__atomic_load_int(&ctx->desync)) code = DDP_ERROR_MISMATCH; /* DDP_DEBUG=detail found collectives out of step */
        char why[DDP__ERRLEN];
        ddp__mutex_lock(&ctx->err_mu);
        ddp__copy_str(why, sizeof why, ctx->broke_why);
        ddp__mutex_unlock(&ctx->err_mu);
        if (!why[0]) ddp__comm_error(ctx, why, sizeof why);
        if (!why[0]) memcpy(why, ctx->err, sizeof why);
        return ddp__fail(ctx, code, "%s: the context is broken by an earlier error (%s); only ddp_destroy() is allowed", fn, why);
    }
    return DDP_SUCCESS;
}

/* defined with the training features further down */
static ddp_result ddp__join_check(ddp_context *ctx, const char *fn);
static ddp_result ddp__opt_alloc(ddp_context *ctx);
static uint32_t ddp__state_flags(const ddp_context *ctx);

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
        return ddp__fail(ctx, DDP_ERROR_SYSTEM, "cannot read random bytes: %s", ddp__strerror(errno));
    me.version = DDP__WIRE_VERSION;
    me.world = ctx->world;
    me.rank = ctx->rank;
    me.secret = ctx->secret_len > 0;
    me.pid = ddp__getpid();
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
        int f, gen = ddp__atomic_add_int(&generation, 1);
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
                                 "rank 0 cannot create %" DDP__PRIzu " bytes of shared memory for the %s: %s", bytes, what, ddp__strerror(e));
            ctx->shm.named = 1;
            ddp__log(ctx, DDP_LOG_INFO, "anonymous shared memory (memfd) is not available: using named segments in " DDP__SHM_WHERE);
        }
    }
    if (ctx->shm.named) {
        /* "ddp-<pid>-...": the sweep of dead creators reads the pid; 96
           random bits: nobody guesses the name to take it first */
        unsigned char rnd[12];
        char hex[25];
        if (ddp__sys_random(rnd, sizeof rnd) != 0)
            return ddp__fail(ctx, DDP_ERROR_SYSTEM, "rank 0 cannot read random bytes for a shared-memory name: %s", ddp__strerror(errno));
        ddp__hex(rnd, sizeof rnd, hex);
        snprintf(name, ncap, DDP__SHM_NAME_PREFIX "ddp-%d-%d-%s-%s", ddp__getpid(), ddp__atomic_add_int(&counter, 1), what, hex);
        if (ddp__shm_obj_create_named(name, bytes, fd) != 0) {
            e = errno;
            name[0] = 0;
            if (e == ENOMEM || e == ENOSPC)
                return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "rank 0 cannot reserve %" DDP__PRIzu " bytes of shared memory for the %s: %s; " DDP__SHM_WHERE " is full or too small: " DDP__SHM_REMEDY,
                                 bytes, what, ddp__strerror(e));
            return ddp__fail(ctx, DDP_ERROR_SYSTEM, "rank 0 cannot create shared memory for the %s (%" DDP__PRIzu " bytes): %s", what, bytes, ddp__strerror(e));
        }
    }
    e = ddp__shm_obj_reserve(*fd, reserve);
    if (e == 0) {
        *p = ddp__shm_obj_map(*fd, bytes, 1);
        if (!*p) e = errno ? errno : ENOMEM;
    }
    if (e != 0) {
        ddp__shm_obj_close(*fd);
        *fd = -1;
        if (name[0]) { ddp__shm_obj_unlink(name); name[0] = 0; }
        if (e == ENOSPC || e == ENOMEM || e == EFBIG)
            return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "rank 0 cannot reserve %" DDP__PRIzu " bytes of shared memory for the %s: %s; %s",
                             reserve, what, ddp__strerror(e),
                             ctx->shm.named ? DDP__SHM_WHERE " is full or too small: " DDP__SHM_REMEDY
                                            : "not enough memory: free some, or raise this container's memory limit");
        return ddp__fail(ctx, DDP_ERROR_SYSTEM, "rank 0 cannot map %" DDP__PRIzu " bytes of shared memory for the %s: %s", bytes, what, ddp__strerror(e));
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
                ddp__sock_local_close(a->fd);
                pend[i] = pend[--npend];
                continue;
            }
            i++;
        }
        if (ready[0]) {
            for (;;) {
                int fd = ddp__sock_local_accept(lfd);
                if (fd < 0) break;
                if (npend == DDP__SEG_PENDING) { ddp__sock_local_close(pend[0].fd); pend[0] = pend[--npend]; }
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
                if (!served[q] && pid > 0 && ddp__proc_dead(pid)) {
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
    for (i = 0; i < npend; i++) ddp__sock_local_close(pend[i].fd);
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
        snprintf(val, sizeof val, "name %s bytes=%" DDP__PRIzu, name, bytes);
        return ddp__kv_set_once(ctx, key, val, strlen(val) + 1);
    }
    if (ddp__sock_local_listen(sock, sizeof sock, &lfd) != 0)
        return ddp__fail(ctx, DDP_ERROR_SYSTEM, "rank 0 cannot open a local socket to hand out shared memory: %s", ddp__strerror(errno));
    snprintf(val, sizeof val, "fd %s bytes=%" DDP__PRIzu, sock, bytes);
    r = ddp__kv_set_once(ctx, key, val, strlen(val) + 1);
    if (r == DDP_SUCCESS) r = ddp__seg_serve(ctx, lfd, fd, what);
    ddp__sock_local_close(lfd);
    return r;
}

/* The checks every receiver makes before it uses a segment: this user's,
   nobody else's, the size expected, and (its header, read before the
   memory is mapped for use) this context's: kind, world, rank 0's nonce,
   size. (What "this user's, nobody else's" means on each system:
   ddp__shm_obj_trust.) */
static ddp_result ddp__seg_verify(ddp_context *ctx, int fd, const char *key, int kind, size_t bytes) {
    size_t size = 0;
    char who[300];
    ddp__seg_hdr h;
    int t = ddp__shm_obj_trust(fd, &size, who, sizeof who);
    if (t < 0)
        return ddp__fail(ctx, DDP_ERROR_SYSTEM, "rank %d cannot inspect the shared memory of key '%s%s': %s", ctx->rank, ctx->key_prefix, key, ddp__strerror(errno));
    if (t == DDP__SHM_FOREIGN)
        return ddp__fail(ctx, DDP_ERROR_SECURITY, "rank %d: the shared memory of key '%s%s' belongs to %s, not to this job's user: store tampering, or another job on port %d",
                         ctx->rank, ctx->key_prefix, key, who, ctx->cfg.master_port);
    if (t == DDP__SHM_SHARED)
        return ddp__fail(ctx, DDP_ERROR_SECURITY, "rank %d: the shared memory of key '%s%s' is open to other users (%s): store tampering, or not this job's",
                         ctx->rank, ctx->key_prefix, key, who);
    if (size != bytes)
        return ddp__fail(ctx, DDP_ERROR_SECURITY, "rank %d: the shared memory of key '%s%s' has %" DDP__PRIzu " bytes, %" DDP__PRIzu " expected: store tampering, or another job",
                         ctx->rank, ctx->key_prefix, key, size, bytes);
    if (ddp__shm_obj_peek(fd, &h, sizeof h) != 0)
        return ddp__fail(ctx, DDP_ERROR_SYSTEM, "rank %d cannot read the header of the shared memory of key '%s%s': %s", ctx->rank, ctx->key_prefix, key, ddp__strerror(errno));
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
    DDP__TRY(ddp__kv_get(ctx, key, &val, &len));
    /* rank 0's identity as the store that answered says it now: a rank that
       came early to this context may have met the previous context's store
       (same process, same port, about to close) and reconnected to this
       one during the wait, after the same authenticated hello */
    if (!ctx->agent_store && ctx->store) {
        const ddp__store *st = (const ddp__store *)ctx->store;
        ddp__ident now;
        if (st->peer_ident[0] && ddp__ident_parse(st->peer_ident, strlen(st->peer_ident), &now) == 0) ctx->peer0 = now;
    }
    if (ddp__unhex16(ctx->peer0.nonce, ctx->shm.nonce) != 0) {
        free(val);
        return ddp__fail(ctx, DDP_ERROR_MISMATCH, "rank %d: rank 0's identity record carries no shared-memory nonce", ctx->rank);
    }
    if (sscanf((const char *)val, "%7s %127s bytes=%" DDP__PRIzu, kindw, ref, &said) != 3 || (strcmp(kindw, "fd") && strcmp(kindw, "name")) ||
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
        if (ddp__shm_obj_open_named(ref, &fd) != 0) {
            /* rank 0 keeps the name until every rank has it: a name that is
               gone means rank 0 gave up (its message says why) or died (on
               Windows the name goes with its last handle, at its death) */
            int e = errno;
            double until = ddp__now() + 2.0;
            if (e == ENOENT && (r = ddp__kv_why(ctx)) != DDP_SUCCESS) return r;
            while (e == ENOENT && ctx->peer0.pid > 0 && !ddp__proc_dead(ctx->peer0.pid) && ddp__now() < until) ddp__sleep_us(10000);
            if (ctx->peer0.pid > 0 && ddp__proc_dead(ctx->peer0.pid))
                return ddp__fail(ctx, DDP_ERROR_PEER, "rank 0 (pid %d) exited before rank %d opened its shared memory (key '%s%s')",
                                 ctx->peer0.pid, ctx->rank, ctx->key_prefix, key);
            return ddp__fail(ctx, DDP_ERROR_SYSTEM, "rank %d cannot open shared memory '%s' (key '%s%s'): %s", ctx->rank, ref, ctx->key_prefix, key, ddp__strerror(e));
        }
    } else {
        int s = -1, pid = 0;
        unsigned uid = 0;
        unsigned char req[24], status = 1;
        uint32_t magic = DDP__SEG_REQ_MAGIC;
        int32_t rank = ctx->rank;
        double deadline = ddp__now() + ctx->cfg.connect_timeout_s;
        if (ddp__sock_local_connect(ref, &s) != 0) {
            int e = errno;
            if (ctx->peer0.pid > 0 && ddp__proc_dead(ctx->peer0.pid))
                return ddp__fail(ctx, DDP_ERROR_PEER, "rank 0 (pid %d) exited while rank %d fetched shared memory", ctx->peer0.pid, ctx->rank);
            return ddp__fail(ctx, DDP_ERROR_SYSTEM, "rank %d cannot reach rank 0's shared-memory socket '%s' (key '%s%s'): %s",
                             ctx->rank, ref, ctx->key_prefix, key, ddp__strerror(e));
        }
        if (ddp__sock_peer(s, &pid, &uid) != 0 || uid != ddp__proc_uid() || pid != ctx->peer0.pid) {
            ddp__sock_local_close(s);
            return ddp__fail(ctx, DDP_ERROR_SECURITY,
                             "rank %d: the shared memory offered under key '%s%s' is served by pid %d (uid %u), not by rank 0 (pid %d, uid %u): store tampering, or another job on port %d",
                             ctx->rank, ctx->key_prefix, key, pid, uid, ctx->peer0.pid, ddp__proc_uid(), ctx->cfg.master_port);
        }
        memcpy(req, &magic, 4);
        memcpy(req + 4, &rank, 4);
        memcpy(req + 8, ctx->shm.nonce, 16);
        if (ddp__sock_local_write(s, req, sizeof req) != 0 || ddp__sock_recv_fd(s, deadline, &status, &fd) != 0) {
            int e = errno;
            ddp__sock_local_close(s);
            if (e != ETIMEDOUT && (r = ddp__kv_why(ctx)) != DDP_SUCCESS) return r;
            if (ctx->peer0.pid > 0 && ddp__proc_dead(ctx->peer0.pid))
                return ddp__fail(ctx, DDP_ERROR_PEER, "rank 0 (pid %d) exited while rank %d waited for shared memory", ctx->peer0.pid, ctx->rank);
            return ddp__fail(ctx, e == ETIMEDOUT ? DDP_ERROR_TIMEOUT : DDP_ERROR_PEER, "rank %d did not receive the shared memory of key '%s%s' from rank 0: %s",
                             ctx->rank, ctx->key_prefix, key, e == ETIMEDOUT ? "timed out" : ddp__strerror(e));
        }
        ddp__sock_local_close(s);
        if (status != 0 || fd < 0) {
            ddp__shm_obj_close(fd);
            return ddp__fail(ctx, DDP_ERROR_SECURITY, "rank %d: rank 0 refused to hand over the shared memory of key '%s%s' (see rank 0's log)", ctx->rank, ctx->key_prefix, key);
        }
    }
    r = ddp__seg_verify(ctx, fd, key, kind, said);
    if (r == DDP_SUCCESS) {
        *p = ddp__shm_obj_map(fd, said, 1);
        if (!*p) r = ddp__fail(ctx, DDP_ERROR_SYSTEM, "rank %d cannot map %" DDP__PRIzu " bytes of shared memory (key '%s%s'): %s", ctx->rank, said, ctx->key_prefix, key, ddp__strerror(errno));
    }
    ddp__shm_obj_close(fd);
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
    snprintf(msg, sizeof msg, "shared memory: " DDP__SHM_WHERE " has %lld bytes free; the staging area for collectives on your own buffers is reduced from %" DDP__PRIzu " to %" DDP__PRIzu " bytes per rank",
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
        if (!p) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "cannot map %" DDP__PRIzu " bytes: %s", bytes, ddp__strerror(errno));
        ctx->shm.ctrl = (ddp__shm_ctrl *)p;
        ctx->shm.ctrl_bytes = bytes;
        ctx->shm.staging = (unsigned char *)p + hdr;
        ddp__seg_header(&ctx->shm.ctrl->h, ctx, 1, bytes, staging);
        ctx->shm.ctrl->abort_rank = -1;
        ddp__slot(ctx, 0)->pid = (int32_t)ddp__getpid();
        return DDP_SUCCESS;
    }
    if (ctx->rank == 0) {
#if defined(DDP__SHM_NAMED) || !DDP__SHM_ANON
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
        ctx->shm.ctrl->abort_code = 0;
        r = ddp__seg_share(ctx, "shm/ctrl", "control", fd, ctx->shm.ctrl_name, bytes);
        ddp__shm_obj_close(fd);
        if (r != DDP_SUCCESS) return r;
    } else {
        DDP__TRY(ddp__seg_attach(ctx, "shm/ctrl", 1, &bytes, &p));
        ctx->shm.ctrl = (ddp__shm_ctrl *)p;
        ctx->shm.ctrl_bytes = bytes;
        staging = (size_t)ctx->shm.ctrl->h.staging;
        if (staging < ((size_t)4 << 10) || hdr + (size_t)ctx->world * staging != bytes)
            return ddp__fail(ctx, DDP_ERROR_SECURITY, "rank %d: the control segment's header says %" DDP__PRIzu " bytes of staging per rank, which does not fit its %" DDP__PRIzu " bytes",
                             ctx->rank, staging, bytes);
    }
    ctx->shm.staging_bytes = staging;
    ctx->cfg.staging_bytes = staging;
    ctx->shm.staging = (unsigned char *)p + hdr;
    ddp__slot(ctx, ctx->rank)->pid = (int32_t)ddp__getpid();
    r = ddp__kv_barrier(ctx, "shm/ctrl-open");
    if (ctx->rank == 0 && ctx->shm.ctrl_name[0]) { ddp__shm_obj_unlink(ctx->shm.ctrl_name); ctx->shm.ctrl_name[0] = 0; }
    if (r != DDP_SUCCESS) return r;
    return ddp__kv_verify_pinned(ctx);
}

static ddp_result ddp__cuda_setup(ddp_context *ctx);
static void ddp__cuda_teardown(ddp_context *ctx);

/* Every rank active, the average over the world. */
static void ddp__join_reset(ddp_context *ctx) {
    int q;
    memset(ctx->join_last, 0, sizeof ctx->join_last);
    for (q = 0; q < ctx->world && q < DDP__MAX_WORLD; q++) ctx->join_last[q / DDP__JOIN_BITS] += ldexp(1.0, q % DDP__JOIN_BITS);
    ctx->join_active = ctx->world;
    ctx->divisor = (double)ctx->world;
}

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
    if (c.world_size > DDP__MAX_WORLD)
        return ddp__fail(NULL, DDP_ERROR_UNSUPPORTED, "a world of %d ranks: this version supports up to %d", c.world_size, DDP__MAX_WORLD);
    if (c.staging_bytes < ((size_t)64 << 10))
        return ddp__fail(NULL, DDP_ERROR_INVALID_ARGUMENT, "config.staging_bytes %" DDP__PRIzu " is below the minimum of 65536", c.staging_bytes);
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
    ctx->window_div = 1.0;
    ctx->divisor = (double)c.world_size;
    ctx->config_lr = c.optimizer.lr;
    ddp__join_reset(ctx);
    ctx->ls_scale = c.loss_scale.enabled ? (double)(float)c.loss_scale.init_scale : 1.0;
    ctx->zero = c.zero_stage == 1;
    ctx->debug = c.debug == DDP_DEBUG_DETAIL;
    ctx->ops = &ddp__shm_ops;
    ddp__mutex_init(&ctx->mu);
    ddp__mutex_init(&ctx->err_mu);
    ddp__cond_init(&ctx->cv_work);
    ddp__cond_init(&ctx->cv_done);
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
    if (ctx->world > 1) {
        int e = ddp__net_start();
        if (e != 0) r = ddp__fail(ctx, DDP_ERROR_NETWORK, "rank %d cannot start the sockets layer: %s", ctx->rank, ddp__strerror(e));
        ctx->net_started = e == 0;
    }
    if (r == DDP_SUCCESS && ctx->world > 1) r = ddp__rendezvous(ctx);
    if (r == DDP_SUCCESS) r = ddp__cuda_setup(ctx);
    if (r == DDP_SUCCESS && (ctx->cfg.backend == DDP_BACKEND_SHM || ctx->cfg.backend == DDP_BACKEND_STAGED))
        r = ddp__shm_setup(ctx);
    if (r == DDP_SUCCESS) r = ddp__trace_open(ctx);
    ctx->cfg.trace_path = ctx->trace ? ctx->trace->path : NULL; /* the config must not point into the caller's memory */
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
    ddp__mutex_lock(&ctx->mu);
    ctx->q_stop = 1;
    ddp__cond_broadcast(&ctx->cv_work);
    ddp__mutex_unlock(&ctx->mu);
    ddp__thread_join(&ctx->comm_thread);
    ctx->comm_started = 0;
}

static void ddp__free_flat_grads(ddp_context *ctx);
static void ddp__free_device(ddp_context *ctx, void *p);

DDP_API void ddp_destroy(ddp_context *ctx) {
    if (!ctx) return;
    ddp__comm_stop(ctx);
    ddp__trace_close(ctx);
    ddp__free_flat_grads(ctx);
    ddp__shm_obj_unmap(ctx->shm.grads_base, ctx->shm.grads_bytes);
    ddp__shm_obj_unmap(ctx->shm.ctrl, ctx->shm.ctrl_bytes);
    if (ctx->rank == 0 && ctx->shm.ctrl_name[0]) ddp__shm_obj_unlink(ctx->shm.ctrl_name);
    if (ctx->rank == 0 && ctx->shm.grads_name[0]) ddp__shm_obj_unlink(ctx->shm.grads_name);
    if (ctx->cfg.device == DDP_DEVICE_CUDA) {
        ddp__free_device(ctx, ctx->hook_buf);
        ddp__free_device(ctx, ctx->flat_params);
        ddp__free_device(ctx, ctx->opt_m);
        ddp__free_device(ctx, ctx->opt_v);
        ddp__free_device(ctx, ctx->opt_master);
        ddp__free_device(ctx, ctx->acc_reduced);
        ddp__free_device(ctx, ctx->acc_local);
    } else {
        ddp__free(ctx, ctx->hook_buf);
        ddp__free(ctx, ctx->acc_reduced);
        ddp__free(ctx, ctx->acc_local);
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
    if (ctx->net_started) ddp__net_stop();
    memset(ctx->secret, 0, sizeof ctx->secret);
    ddp__free(ctx, ctx->rank_pid);
    ddp__free(ctx, ctx->params);
    ddp__free(ctx, ctx->buckets);
    ddp__free(ctx, ctx->cb);
    ddp__free(ctx, ctx->cranges);
    ddp__free(ctx, ctx->cpieces);
    ddp__free(ctx, ctx->mark_order);
    ddp__free(ctx, ctx->queue);
    ddp__free(ctx, ctx->opt_state_off);
    ddp__free(ctx, ctx->group_map);
    ddp__mutex_destroy(&ctx->mu);
    ddp__mutex_destroy(&ctx->err_mu);
    ddp__cond_destroy(&ctx->cv_work);
    ddp__cond_destroy(&ctx->cv_done);
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
    DDP__TRY(ddp__join_check(ctx, fn));
    if (!a || !b) return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "%s: buffer is NULL", fn);
    if ((int)t < 0 || t >= DDP_DTYPE_COUNT_) return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "%s: dtype %d is not a ddp_dtype", fn, (int)t);
    if ((int)op < 0 || op > DDP_OP_MIN) return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "%s: op %d is not a ddp_op", fn, (int)op);
    return DDP_SUCCESS;
}

static ddp_result ddp__coll_done(ddp_context *ctx, ddp_result r) {
    if (r != DDP_SUCCESS && r != DDP_ERROR_INVALID_ARGUMENT) return ddp__break(ctx, r);
    return r;
}

/* The timeline's event of a collective on the user's buffers. */
static ddp_result ddp__coll_traced(ddp_context *ctx, int which, double t0, size_t bytes, ddp_result r) {
    ddp__trace_ev(ctx, DDP__EV_COLL, t0, ddp__now() - t0, which, 0, bytes);
    return ddp__coll_done(ctx, r);
}

DDP_API ddp_result ddp_barrier(ddp_context *ctx) {
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    DDP__TRY(ddp__coll_check(ctx, "ddp_barrier", ctx, ctx, DDP_F32, DDP_OP_SUM));
    DDP__TRY(ddp__fp_check(ctx, DDP__FP_BARRIER, "ddp_barrier", 0, DDP_F32, 0, -1));
    {
        double t0 = ddp__now();
        return ddp__coll_traced(ctx, 0, t0, 0, ctx->ops->barrier(ctx, "a barrier"));
    }
}

DDP_API ddp_result ddp_allreduce(ddp_context *ctx, void *buf, size_t count, ddp_dtype dtype, ddp_op op) {
    DDP__TRY(ddp__coll_check(ctx, "ddp_allreduce", buf, buf, dtype, op));
    if (count == 0) return DDP_SUCCESS;
    if (dtype == DDP_DTYPE_DEFAULT) dtype = DDP_F32;
    if (op == DDP_OP_DEFAULT) op = DDP_OP_SUM;
    DDP__TRY(ddp__fp_check(ctx, DDP__FP_ALLREDUCE, "ddp_allreduce", count, dtype, (int)op, -1));
    {
        double t0 = ddp__now();
        return ddp__coll_traced(ctx, 1, t0, count * ddp_dtype_size(dtype), ctx->ops->allreduce(ctx, buf, count, dtype, op));
    }
}

DDP_API ddp_result ddp_broadcast(ddp_context *ctx, void *buf, size_t count, ddp_dtype dtype, int root) {
    DDP__TRY(ddp__coll_check(ctx, "ddp_broadcast", buf, buf, dtype, DDP_OP_SUM));
    if (root < 0 || root >= ctx->world)
        return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_broadcast: root %d is not a rank of a world of %d", root, ctx->world);
    if (count == 0) return DDP_SUCCESS;
    DDP__TRY(ddp__fp_check(ctx, DDP__FP_BROADCAST, "ddp_broadcast", count, dtype == DDP_DTYPE_DEFAULT ? DDP_F32 : dtype, root, -1));
    {
        double t0 = ddp__now();
        return ddp__coll_traced(ctx, 2, t0, count * ddp_dtype_size(dtype), ctx->ops->broadcast(ctx, buf, count * ddp_dtype_size(dtype), root));
    }
}

DDP_API ddp_result ddp_allgather(ddp_context *ctx, const void *send, void *recv, size_t count, ddp_dtype dtype) {
    DDP__TRY(ddp__coll_check(ctx, "ddp_allgather", send, recv, dtype, DDP_OP_SUM));
    if (count == 0) return DDP_SUCCESS;
    DDP__TRY(ddp__fp_check(ctx, DDP__FP_ALLGATHER, "ddp_allgather", count, dtype == DDP_DTYPE_DEFAULT ? DDP_F32 : dtype, 0, -1));
    {
        double t0 = ddp__now();
        return ddp__coll_traced(ctx, 3, t0, count * ddp_dtype_size(dtype), ctx->ops->allgather(ctx, send, recv, count * ddp_dtype_size(dtype)));
    }
}

DDP_API ddp_result ddp_reduce_scatter(ddp_context *ctx, const void *send, void *recv, size_t count,
                                      ddp_dtype dtype, ddp_op op) {
    DDP__TRY(ddp__coll_check(ctx, "ddp_reduce_scatter", send, recv, dtype, op));
    if (count == 0) return DDP_SUCCESS;
    if (dtype == DDP_DTYPE_DEFAULT) dtype = DDP_F32;
    if (op == DDP_OP_DEFAULT) op = DDP_OP_SUM;
    DDP__TRY(ddp__fp_check(ctx, DDP__FP_REDUCE_SCATTER, "ddp_reduce_scatter", count, dtype, (int)op, -1));
    {
        double t0 = ddp__now();
        return ddp__coll_traced(ctx, 4, t0, count * ddp_dtype_size(dtype), ctx->ops->reduce_scatter(ctx, send, recv, count, dtype, op));
    }
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
    if (out_id) *out_id = -1; /* on every failure path, the first one included */
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
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
    p->lr_scale = 1.0;
    p->wd_scale = 1.0;
    *out_id = ctx->num_params++;
    return DDP_SUCCESS;
}

DDP_API ddp_result ddp_set_param_options(ddp_context *ctx, int id, const ddp_param_options *o) {
    ddp__param *p;
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    if (id < 0 || id >= ctx->num_params)
        return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_set_param_options: %d is not a parameter id (0..%d)", id, ctx->num_params - 1);
    p = &ctx->params[id];
    if (ctx->finalized)
        return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_set_param_options: parameter '%s': options are set before ddp_finalize()", p->name);
    if (!o) return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_set_param_options: options of parameter '%s' are NULL", p->name);
    if (!ddp__in_range(o->lr_scale, 0.0, HUGE_VAL, 0) || !ddp__in_range(o->weight_decay_scale, 0.0, HUGE_VAL, 0))
        return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_set_param_options: parameter '%s': lr_scale %g and weight_decay_scale %g must be finite and >= 0",
                         p->name, o->lr_scale, o->weight_decay_scale);
    p->lr_scale = o->lr_scale == 0 ? 1.0 : o->lr_scale;
    p->wd_scale = o->no_weight_decay ? 0.0 : o->weight_decay_scale == 0 ? 1.0 : o->weight_decay_scale;
    return DDP_SUCCESS;
}

DDP_API ddp_param_options ddp_get_param_options(const ddp_context *ctx, int id) {
    ddp_param_options o;
    memset(&o, 0, sizeof o);
    if (!ctx || id < 0 || id >= ctx->num_params) return o;
    o.lr_scale = ctx->params[id].lr_scale;
    o.weight_decay_scale = ctx->params[id].wd_scale;
    o.no_weight_decay = ctx->params[id].wd_scale == 0;
    return o;
}

/* Groups of equal options, in order of first appearance, and the group of
   every 256-byte chunk of the flat buffers. */
static ddp_result ddp__assign_groups(ddp_context *ctx) {
    size_t chunks = ctx->flat_bytes / DDP__ALIGN, c;
    int i, g;
    ctx->num_groups = 0;
    for (i = 0; i < ctx->num_params; i++) {
        ddp__param *p = &ctx->params[i];
        for (g = 0; g < ctx->num_groups; g++)
            if (ctx->group_lr[g] == p->lr_scale && ctx->group_wd[g] == p->wd_scale) break;
        if (g == ctx->num_groups) {
            if (g == DDP_MAX_PARAM_GROUPS)
                return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "parameter '%s' makes a %dth distinct set of parameter options; at most %d are allowed",
                                 p->name, g + 1, DDP_MAX_PARAM_GROUPS);
            ctx->group_lr[g] = p->lr_scale;
            ctx->group_wd[g] = p->wd_scale;
            ctx->num_groups++;
        }
        p->group = g;
    }
    ctx->group_map = (unsigned char *)ddp__calloc(ctx, chunks);
    if (!ctx->group_map) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory for the parameter group map");
    for (i = 0; i < ctx->num_params; i++) {
        const ddp__param *p = &ctx->params[i];
        size_t end = ddp__align_up(p->offset + p->numel * ddp_dtype_size(p->dtype), DDP__ALIGN) / DDP__ALIGN;
        for (c = p->offset / DDP__ALIGN; c < end && c < chunks; c++) ctx->group_map[c] = (unsigned char)p->group;
    }
    return DDP_SUCCESS;
}

DDP_API ddp_result ddp_register_param(ddp_context *ctx, const char *name, size_t count,
                                      ddp_dtype dtype, const void *init, int *out_id) {
    int64_t shape[1];
    if (out_id) *out_id = -1;
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    if (count == 0 || count > ((size_t)1 << 40)) {
        return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_register_param: parameter '%.64s' has %" DDP__PRIzu " elements (must be 1..2^40)",
                         name ? name : "(null)", count);
    }
    shape[0] = (int64_t)count;
    return ddp_register_param_shape(ctx, name, 1, shape, dtype, init, out_id);
}

/* Reverse registration order, 256-byte aligned offsets; a bucket closes when
   it reaches its cap or the element type changes. With ZeRO-1 every span is
   a multiple of world * 256 bytes, so that the shards are equal and
   256-byte aligned (NCCL's reduce-scatter and all-gather need equal parts). */
static ddp_result ddp__assign_buckets(ddp_context *ctx) {
    size_t off = 0, end, quantum = ctx->zero ? (size_t)ctx->world * DDP__ALIGN : DDP__ALIGN;
    int i, nb = 0;
    ddp__bucket *bk = (ddp__bucket *)ddp__calloc(ctx, (size_t)ctx->num_params * sizeof *bk);
    if (!bk) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory for %d buckets", ctx->num_params);
    for (i = ctx->num_params - 1; i >= 0; i--) {
        ddp__param *p = &ctx->params[i];
        size_t es = ddp_dtype_size(p->dtype);
        off = ddp__align_up(off, DDP__ALIGN);
        if (nb == 0 || bk[nb - 1].dtype != p->dtype ||
            bk[nb - 1].bytes >= (nb == 1 ? ctx->cfg.first_bucket_bytes : ctx->cfg.bucket_bytes)) {
            if (nb > 0) off = bk[nb - 1].offset + ddp__align_up(off - bk[nb - 1].offset, quantum);
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
    end = bk[nb - 1].offset + ddp__align_up(off - bk[nb - 1].offset, quantum);
    for (i = 0; i < nb; i++) {
        bk[i].bytes = (i + 1 < nb ? bk[i + 1].offset : end) - bk[i].offset;
        bk[i].numel = bk[i].bytes / ddp_dtype_size(bk[i].dtype);
    }
    ctx->buckets = bk;
    ctx->num_buckets = nb;
    ctx->flat_bytes = ddp__align_up(end, 4096);
    return DDP_SUCCESS;
}

/* Rank q's shard of storage bucket b: the elements its ZeRO-1 optimizer
   owns, and the part of the canonical gradient norm it sums (see
   ddp__grad_stats). */
static void ddp__shard_of(const ddp_context *ctx, int b, int q, size_t *lo, size_t *hi) {
    /* 256-byte parts: the same cut whether or not the bucket was padded to
       world * 256 bytes (ddp__assign_buckets), so that the canonical norm
       sums the same elements in the same order with and without ZeRO-1 */
    size_t n = ctx->buckets[b].numel, unit = DDP__ALIGN / ddp_dtype_size(ctx->buckets[b].dtype);
    size_t per = ddp__align_up((n + (size_t)ctx->world - 1) / (size_t)ctx->world, unit);
    *lo = per * (size_t)q;
    *hi = *lo + per;
    if (*lo > n) *lo = n;
    if (*hi > n) *hi = n;
}

/* This rank's optimizer range of storage bucket b: its shard with ZeRO-1,
   else the whole bucket. */
static void ddp__own_range(const ddp_context *ctx, int b, size_t *lo, size_t *hi) {
    if (ctx->zero) ddp__shard_of(ctx, b, ctx->rank, lo, hi);
    else { *lo = 0; *hi = ctx->buckets[b].numel; }
}

typedef struct ddp__pvec { ddp__piece *v; int n, cap; } ddp__pvec;

static int ddp__pvec_add(ddp_context *ctx, ddp__pvec *a, size_t offset, size_t numel, int owner) {
    if (a->n == a->cap) {
        int cap = a->cap ? a->cap * 2 : 64;
        ddp__piece *nv = (ddp__piece *)ddp__alloc(ctx, (size_t)cap * sizeof *nv);
        if (!nv) return 0;
        if (a->n) memcpy(nv, a->v, (size_t)a->n * sizeof *nv);
        ddp__free(ctx, a->v);
        a->v = nv;
        a->cap = cap;
    }
    a->v[a->n].offset = offset;
    a->v[a->n].numel = numel;
    a->v[a->n].owner = owner;
    a->n++;
    return 1;
}

/* The pieces of communication bucket c: its ranges split among the ranks.
   With ZeRO-1 an element is reduced by the rank whose shard holds it (it
   is the only one that needs the result); otherwise the concatenated
   ranges are cut evenly. Either way every element is summed over the
   ranks in rank order: the same bits whoever reduces it. */
static int ddp__split_pieces(ddp_context *ctx, ddp__cbucket *c, const ddp__piece *ranges, ddp__pvec *pieces) {
    size_t es = ddp_dtype_size(c->dtype);
    int k, q;
    c->piece0 = pieces->n;
    for (k = 0; k < c->nrange; k++) {
        const ddp__piece *r = &ranges[c->range0 + k];
        if (ctx->zero) {
            const ddp__bucket *bk = &ctx->buckets[r->owner];
            size_t e0 = (r->offset - bk->offset) / es, e1 = e0 + r->numel;
            for (q = 0; q < ctx->world; q++) {
                size_t lo, hi;
                ddp__shard_of(ctx, r->owner, q, &lo, &hi);
                if (lo < e0) lo = e0;
                if (hi > e1) hi = e1;
                if (hi > lo && !ddp__pvec_add(ctx, pieces, bk->offset + lo * es, hi - lo, q)) return 0;
            }
        }
    }
    if (!ctx->zero) {
        for (q = 0; q < ctx->world; q++) {
            size_t lo, hi, v = 0;
            ddp__slice(c->numel, ctx->world, q, &lo, &hi);
            for (k = 0; k < c->nrange && hi > lo; k++) {
                const ddp__piece *r = &ranges[c->range0 + k];
                size_t a = lo > v ? lo : v, b = hi < v + r->numel ? hi : v + r->numel;
                if (b > a && !ddp__pvec_add(ctx, pieces, r->offset + (a - v) * es, b - a, q)) return 0;
                v += r->numel;
            }
        }
    }
    c->npiece = pieces->n - c->piece0;
    return 1;
}

static int ddp__cmp_offset(const void *a, const void *b) {
    size_t x = *(const size_t *)a, y = *(const size_t *)b;
    return x < y ? -1 : x > y;
}

/* The communication buckets for launch order `order` (parameter ids, the
   first to be launched first; NULL: the storage buckets themselves, in
   reverse registration order). A bucket closes at its cap
   (first_bucket_bytes, then bucket_bytes) or where the element type
   changes, as the storage buckets do. Its parameters, sorted by offset,
   form ranges: neighbours in one storage bucket merge, with the alignment
   padding between them. An order that gives the storage buckets' partition
   gives the storage buckets. Replaces ctx->cb only on success. */
static ddp_result ddp__build_comm(ddp_context *ctx, const int *order) {
    int P = ctx->num_params, nb = 0, i, k, same;
    ddp__cbucket *cb = (ddp__cbucket *)ddp__calloc(ctx, (size_t)P * sizeof *cb);
    int *cbof = (int *)ddp__alloc(ctx, (size_t)P * sizeof(int));
    size_t *keys = (size_t *)ddp__alloc(ctx, (size_t)P * 2 * sizeof(size_t));
    ddp__pvec ranges = { NULL, 0, 0 }, pieces = { NULL, 0, 0 };
    ddp_result r = DDP_SUCCESS;
    if (!cb || !cbof || !keys) { r = ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory for the communication buckets"); goto done; }
    if (order) {
        /* the caps measured as ddp__assign_buckets does: every parameter
           but the last one aligned to 256 bytes */
        size_t aligned = 0, fill = 0;
        for (k = 0; k < P; k++) {
            const ddp__param *p = &ctx->params[order[k]];
            size_t cap = nb == 1 ? ctx->cfg.first_bucket_bytes : ctx->cfg.bucket_bytes, pb = p->numel * ddp_dtype_size(p->dtype);
            if (nb == 0 || cb[nb - 1].dtype != p->dtype || fill >= cap) { cb[nb++].dtype = p->dtype; aligned = 0; }
            cbof[order[k]] = nb - 1;
            cb[nb - 1].num_params++;
            fill = aligned + pb;
            aligned += ddp__align_up(pb, DDP__ALIGN);
        }
        same = nb == ctx->num_buckets;
        for (i = 0; i < P && same; i++) same = cbof[i] == ctx->params[i].bucket;
        if (same) order = NULL;
    }
    if (!order) {
        nb = ctx->num_buckets;
        memset(cb, 0, (size_t)P * sizeof *cb);
        for (i = 0; i < nb; i++) {
            const ddp__bucket *bk = &ctx->buckets[i];
            cb[i].dtype = bk->dtype;
            cb[i].numel = bk->numel;
            cb[i].num_params = bk->num_params;
            cb[i].range0 = ranges.n;
            cb[i].nrange = 1;
            if (!ddp__pvec_add(ctx, &ranges, bk->offset, bk->numel, i)) goto oom;
        }
        for (i = 0; i < P; i++) cbof[i] = ctx->params[i].bucket;
    } else {
        for (k = 0; k < nb; k++) {
            ddp__cbucket *c = &cb[k];
            size_t es = ddp_dtype_size(c->dtype);
            int n = 0;
            for (i = 0; i < P; i++)
                if (cbof[i] == k) { keys[2 * n] = ctx->params[i].offset; keys[2 * n + 1] = (size_t)i; n++; }
            qsort(keys, (size_t)n, 2 * sizeof(size_t), ddp__cmp_offset);
            c->range0 = ranges.n;
            for (i = 0; i < n; i++) {
                const ddp__param *p = &ctx->params[keys[2 * i + 1]];
                ddp__piece *last = ranges.n > c->range0 ? &ranges.v[ranges.n - 1] : NULL;
                if (last && last->owner == p->bucket && ddp__align_up(last->offset + last->numel * es, DDP__ALIGN) == p->offset)
                    last->numel = (p->offset - last->offset) / es + p->numel;
                else if (!ddp__pvec_add(ctx, &ranges, p->offset, p->numel, p->bucket)) goto oom;
            }
            c->nrange = ranges.n - c->range0;
            for (i = 0; i < c->nrange; i++) c->numel += ranges.v[c->range0 + i].numel;
        }
    }
    for (k = 0; k < nb; k++)
        if (!ddp__split_pieces(ctx, &cb[k], ranges.v, &pieces)) goto oom;
    for (i = 0; i < P; i++) ctx->params[i].cbucket = cbof[i];
    ddp__free(ctx, ctx->cb);
    ddp__free(ctx, ctx->cranges);
    ddp__free(ctx, ctx->cpieces);
    ctx->cb = cb;
    ctx->num_cb = nb;
    ctx->cranges = ranges.v;
    ctx->cpieces = pieces.v;
    cb = NULL;
    ranges.v = NULL;
    pieces.v = NULL;
    goto done;
oom:
    r = ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory for the communication buckets");
done:
    ddp__free(ctx, cb);
    ddp__free(ctx, cbof);
    ddp__free(ctx, keys);
    ddp__free(ctx, ranges.v);
    ddp__free(ctx, pieces.v);
    return r;
}

static void ddp__describe_param(const ddp__param *p, char *out, size_t cap) {
    int n = snprintf(out, cap, "'%s' %s [", p->name, ddp_dtype_name(p->dtype)), i;
    for (i = 0; i < p->ndim && n > 0 && (size_t)n < cap; i++)
        n += snprintf(out + n, cap - (size_t)n, i ? ",%lld" : "%lld", (long long)p->shape[i]);
    if (n > 0 && (size_t)n < cap) n += snprintf(out + n, cap - (size_t)n, "]");
    /* options only when set, so that plain parameters read as before */
    if (n > 0 && (size_t)n < cap && (p->lr_scale != 1.0 || p->wd_scale != 1.0))
        snprintf(out + n, cap - (size_t)n, " lr_scale=%.17g weight_decay_scale=%.17g", p->lr_scale, p->wd_scale);
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

/* The configuration that must be the same on every rank (see AGREEMENT),
   one value per line, in the order of ddp__cfg_fields: every rank runs the
   same ddp.h version (identity records), so line i is the same field
   everywhere. Values as the context resolved them (defaults and
   environment variables applied), doubles with every digit. */
static const char *const ddp__cfg_fields[] = {
    "config.backend (or DDP_BACKEND)", "config.device",
    "config.first_bucket_bytes", "config.bucket_bytes", "config.static_bucket_order",
    "config.gradient_sum", "config.allow_unused_parameters", "config.compress",
    "config.uneven_inputs", "config.join_divide_by_initial_world_size",
    "config.zero_stage (or DDP_ZERO_STAGE)", "config.debug (or DDP_DEBUG)",
    "config.optimizer.type", "config.optimizer.lr", "config.optimizer.momentum",
    "config.optimizer.dampening", "config.optimizer.nesterov", "config.optimizer.weight_decay",
    "config.optimizer.beta1", "config.optimizer.beta2", "config.optimizer.eps",
    "config.optimizer.max_grad_norm",
    "config.schedule.type", "config.schedule.warmup_steps", "config.schedule.total_steps",
    "config.schedule.min_lr", "config.schedule.step_size", "config.schedule.gamma",
    "config.loss_scale.enabled", "config.loss_scale.init_scale", "config.loss_scale.growth_factor",
    "config.loss_scale.backoff_factor", "config.loss_scale.growth_interval",
    "the communication hook registered before ddp_finalize (ddp_register_comm_hook)"
};
#define DDP__CFG_NFIELDS ((int)(sizeof ddp__cfg_fields / sizeof ddp__cfg_fields[0]))

/* The shortest of %.15g..%.17g that reads back as v (0.1, not 0.10000000000000001). */
static const char *ddp__cfg_g(char *buf, size_t cap, double v) {
    int p;
    for (p = 15; p <= 17; p++) {
        snprintf(buf, cap, "%.*g", p, v);
        if (strtod(buf, NULL) == v) break;
    }
    return buf;
}

static char *ddp__config_table(ddp_context *ctx, size_t *len) {
    static const char *const optim[] = { "none", "sgd", "adamw" };
    static const char *const sched[] = { "constant", "cosine", "linear", "step" };
    const ddp_config *c = &ctx->cfg;
    const ddp_optimizer_desc *o = &c->optimizer;
    const ddp_schedule_desc *s = &c->schedule;
    const ddp_loss_scale_desc *l = &c->loss_scale;
    const char *hook = !ctx->hook ? "none"
                     : ctx->hook == ddp_comm_hook_allreduce ? "ddp_comm_hook_allreduce"
                     : ctx->hook == ddp_comm_hook_bf16 ? "ddp_comm_hook_bf16"
                     : ctx->hook == ddp_comm_hook_fp16 ? "ddp_comm_hook_fp16" : "a hook of the program";
    size_t cap = 4096, n;
    char *t = (char *)ddp__alloc(ctx, cap), g[13][32];
    int k;
    if (!t) return NULL;
    k = snprintf(t, cap,
                 "%s\n%s\n%" DDP__PRIzu "\n%" DDP__PRIzu "\n%d\n%d\n%d\n%s\n%d\n%d\n%d\n%s\n"
                 "%s\n%s\n%s\n%s\n%d\n%s\n%s\n%s\n%s\n%s\n"
                 "%s\n%lld\n%lld\n%s\n%lld\n%s\n"
                 "%d\n%s\n%s\n%s\n%d\n%s\n",
                 ddp_backend_name(c->backend), c->device == DDP_DEVICE_CUDA ? "cuda" : "cpu",
                 c->first_bucket_bytes, c->bucket_bytes, c->static_bucket_order != 0,
                 c->gradient_sum != 0, c->allow_unused_parameters != 0,
                 c->compress == DDP_BF16 || c->compress == DDP_F16 ? ddp_dtype_name(c->compress) : "none",
                 c->uneven_inputs != 0, c->join_divide_by_initial_world_size != 0,
                 c->zero_stage, c->debug == DDP_DEBUG_DETAIL ? "detail" : "off",
                 (int)o->type >= 0 && o->type <= DDP_OPTIM_ADAMW ? optim[o->type] : "?",
                 ddp__cfg_g(g[0], 32, o->lr), ddp__cfg_g(g[1], 32, o->momentum), ddp__cfg_g(g[2], 32, o->dampening),
                 o->nesterov != 0, ddp__cfg_g(g[3], 32, o->weight_decay), ddp__cfg_g(g[4], 32, o->beta1),
                 ddp__cfg_g(g[5], 32, o->beta2), ddp__cfg_g(g[6], 32, o->eps), ddp__cfg_g(g[7], 32, o->max_grad_norm),
                 (int)s->type >= 0 && s->type <= DDP_SCHEDULE_STEP ? sched[s->type] : "?", (long long)s->warmup_steps,
                 (long long)s->total_steps, ddp__cfg_g(g[8], 32, s->min_lr), (long long)s->step_size, ddp__cfg_g(g[9], 32, s->gamma),
                 l->enabled != 0, ddp__cfg_g(g[10], 32, l->init_scale), ddp__cfg_g(g[11], 32, l->growth_factor),
                 ddp__cfg_g(g[12], 32, l->backoff_factor), l->growth_interval, hook);
    if (k < 0 || (size_t)k >= cap) { ddp__free(ctx, t); return NULL; }
    n = (size_t)k;
    *len = n + 1;
    return t;
}

/* Line i (from 0) of a config table, copied into out; 0 when it has none. */
static int ddp__cfg_line(const char *t, int i, char *out, size_t cap) {
    const char *e;
    for (; i > 0 && t; i--) { t = strchr(t, '\n'); if (t) t++; }
    if (!t || !*t) { out[0] = 0; return 0; }
    e = strchr(t, '\n');
    if (!e) e = t + strlen(t);
    if ((size_t)(e - t) >= cap) e = t + cap - 1;
    memcpy(out, t, (size_t)(e - t));
    out[e - t] = 0;
    return 1;
}

/* Rank q's config table against rank 0's: DDP_SUCCESS, or DDP_ERROR_MISMATCH
   naming the first field that differs, both ranks and both values. */
static ddp_result ddp__cfg_compare(ddp_context *ctx, const char *c0, const char *cq, int q) {
    int i;
    if (!strcmp(c0, cq)) return DDP_SUCCESS;
    for (i = 0; i < DDP__CFG_NFIELDS; i++) {
        char a[128], b[128];
        ddp__cfg_line(c0, i, a, sizeof a);
        ddp__cfg_line(cq, i, b, sizeof b);
        if (strcmp(a, b) != 0)
            return ddp__fail(ctx, DDP_ERROR_MISMATCH, "configurations differ: %s is %s on rank 0 but %s on rank %d (it must be the same on every rank, see AGREEMENT in ddp.h)",
                             ddp__cfg_fields[i], a, b, q);
    }
    return ddp__fail(ctx, DDP_ERROR_MISMATCH, "configurations differ between rank 0 and rank %d", q);
}

/* One record per rank in the store: the parameter table, a NUL, the
   config table, a NUL. Every rank compares every rank's with rank 0's. */
static ddp_result ddp__verify_params(ddp_context *ctx) {
    size_t len = 0, clen = 0, l0 = 0;
    char *mine = ddp__param_table(ctx, &len), *cfg = ddp__config_table(ctx, &clen), *rec, key[32];
    void *t0 = NULL;
    ddp_result r;
    int q;
    rec = mine && cfg ? (char *)ddp__alloc(ctx, len + clen) : NULL;
    if (rec) { memcpy(rec, mine, len); memcpy(rec + len, cfg, clen); }
    ddp__free(ctx, mine);
    ddp__free(ctx, cfg);
    if (!rec) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory for the parameter and config tables");
    snprintf(key, sizeof key, "params/%d", ctx->rank);
    r = ddp__kv_set_once(ctx, key, rec, len + clen);
    ddp__free(ctx, rec);
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
        /* both parts NUL-terminated (else: not this version's record) */
        if (lq < 2 || l0 < 2 || ((const char *)tq)[lq - 1] || ((const char *)t0)[l0 - 1] ||
            strlen((const char *)tq) + 1 >= lq || strlen((const char *)t0) + 1 >= l0) {
            r = ddp__fail(ctx, DDP_ERROR_MISMATCH, "rank %d's or rank 0's parameter record in the store is malformed", q);
        } else if (strcmp((const char *)tq, (const char *)t0) != 0) {
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
        } else {
            r = ddp__cfg_compare(ctx, (const char *)t0 + strlen((const char *)t0) + 1,
                                 (const char *)tq + strlen((const char *)tq) + 1, q);
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
    /* ZeRO-1: one more flat buffer, where each rank writes its updated shards
       of the parameters once and every rank reads them; whole pages:
       Windows sizes a section in pages, and the receivers' size check is exact */
    bytes = hdr + ctx->flat_bytes * (size_t)ctx->world;
    if (ctx->zero && ctx->world > 1) bytes += ctx->flat_bytes;
    bytes = ddp__align_up(bytes, 4096);
    if (ctx->world == 1) {
        p = ddp__shm_obj_map_private(bytes);
        if (!p) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "cannot map %" DDP__PRIzu " bytes for the gradients: %s", bytes, ddp__strerror(errno));
    } else if (ctx->rank == 0) {
        long long avail = ctx->shm.named ? ddp__shm_named_free() : -1;
        if (avail >= 0 && (unsigned long long)bytes > (unsigned long long)avail)
            return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY,
                             "the gradients need %" DDP__PRIzu " bytes of shared memory (%d ranks x %" DDP__PRIzu " bytes) but " DDP__SHM_WHERE " has %lld bytes free: "
                             DDP__SHM_REMEDY " (about %" DDP__PRIzu " MiB for this job)",
                             bytes, ctx->world, ctx->flat_bytes, avail, (bytes + ctx->shm.ctrl_bytes) / ((size_t)1 << 20) + 64);
        DDP__TRY(ddp__seg_create(ctx, "gradients", bytes, bytes, &fd, ctx->shm.grads_name, sizeof ctx->shm.grads_name, &p));
        ddp__seg_header((ddp__seg_hdr *)p, ctx, 2, bytes, 0);
        ctx->shm.grads_base = (unsigned char *)p;
        ctx->shm.grads_bytes = bytes;
        ctx->shm.grads = (unsigned char *)p + hdr;
        r = ddp__seg_share(ctx, "shm/grads", "gradients", fd, ctx->shm.grads_name, bytes);
        ddp__shm_obj_close(fd);
        if (r != DDP_SUCCESS) return r;
    } else {
        size_t got = bytes;
        DDP__TRY(ddp__seg_attach(ctx, "shm/grads", 2, &got, &p));
    }
    ctx->shm.grads_base = (unsigned char *)p;
    ctx->shm.grads_bytes = bytes;
    ctx->shm.grads = (unsigned char *)p + hdr;
    if (ctx->zero && ctx->world > 1) ctx->shm.xchg = ctx->shm.grads + (size_t)ctx->world * ctx->shm.grad_stride;
    r = ddp__shm_barrier(ctx, "every rank to map the gradient segment");
    if (ctx->rank == 0 && ctx->shm.grads_name[0]) { ddp__shm_obj_unlink(ctx->shm.grads_name); ctx->shm.grads_name[0] = 0; }
    return r;
}

static void *ddp__comm_main(void *arg);

static size_t ddp__state_elem(ddp_dtype t) { return t == DDP_F64 ? 8 : 4; }

/* The layout of the optimizer state arrays: per storage bucket, this
   rank's range of it (the whole bucket, or its ZeRO-1 shard), each
   256-byte aligned. */
static ddp_result ddp__alloc_host_state(ddp_context *ctx) {
    size_t off = 0, lo, hi;
    int b;
    ctx->opt_state_off = (size_t *)ddp__calloc(ctx, (size_t)ctx->num_buckets * sizeof(size_t));
    if (!ctx->opt_state_off) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory for optimizer state offsets");
    for (b = 0; b < ctx->num_buckets; b++) {
        ddp__own_range(ctx, b, &lo, &hi);
        ctx->opt_state_off[b] = off;
        off += ddp__align_up((hi - lo) * ddp__state_elem(ctx->buckets[b].dtype), DDP__ALIGN);
    }
    ctx->opt_state_bytes = off;
    return DDP_SUCCESS;
}

/* The state of element i (in bucket coordinates, inside this rank's range)
   of storage bucket b in state array base. */
static void *ddp__state_el(const ddp_context *ctx, void *base, int b, size_t i) {
    size_t lo, hi;
    if (!base) return NULL;
    ddp__own_range(ctx, b, &lo, &hi);
    return (unsigned char *)base + ctx->opt_state_off[b] + (i - lo) * ddp__state_elem(ctx->buckets[b].dtype);
}

static ddp_result ddp__finalize(ddp_context *ctx) {
    ddp_result r;
    int i;
    DDP__TRY(ddp__assign_buckets(ctx));
    DDP__TRY(ddp__assign_groups(ctx));
    DDP__TRY(ddp__build_comm(ctx, NULL));
    ctx->queue = (int *)ddp__calloc(ctx, (size_t)ctx->num_params * sizeof(int));
    if (!ctx->queue) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory for the bucket queue");
    /* config.compress: the compression hook (nccl compresses on its own path) */
    if (!ctx->hook && ctx->cfg.backend != DDP_BACKEND_NCCL && (ctx->cfg.compress == DDP_BF16 || ctx->cfg.compress == DDP_F16))
        ctx->hook = ctx->cfg.compress == DDP_BF16 ? ddp_comm_hook_bf16 : ddp_comm_hook_fp16;
    /* the first step's marks decide the bucket order (not with uneven inputs:
       a rank that joins at once would not answer the agreement) */
    ctx->order_learned = ctx->cfg.static_bucket_order || ctx->cfg.uneven_inputs;
    if (!ctx->order_learned && !(ctx->mark_order = (int *)ddp__alloc(ctx, (size_t)ctx->num_params * sizeof(int))))
        return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory for the bucket order");
    if (ctx->world > 1) DDP__TRY(ddp__verify_params(ctx));
    DDP__TRY(ddp__alloc_host_state(ctx));
    if (ddp__on_gpu(ctx)) {
        DDP__TRY(ddp__cuda_finalize(ctx));
    } else {
        DDP__TRY(ddp__alloc_grad_segment(ctx));
        ctx->flat_grads = ctx->shm.grads + (size_t)ctx->rank * ctx->shm.grad_stride;
        ctx->flat_params = (unsigned char *)ddp__calloc(ctx, ctx->flat_bytes);
        if (!ctx->flat_params) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory for %" DDP__PRIzu " bytes of parameters", ctx->flat_bytes);
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
        int e = ddp__thread_start(&ctx->comm_thread, ddp__comm_main, ctx);
        if (e != 0)
            return ddp__fail(ctx, DDP_ERROR_SYSTEM, "cannot start the communication thread: %s", ddp__strerror(e));
        ctx->comm_started = 1;
    }
    {
        char msg[160];
        snprintf(msg, sizeof msg, "%d parameters, %" DDP__PRIzu " bytes, %d buckets", ctx->num_params, ctx->flat_bytes, ctx->num_cb);
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
    DDP__TRY(ddp__join_check(ctx, "ddp_sync_params"));
    if (ctx->world == 1) return DDP_SUCCESS;
    DDP__TRY(ddp__fp_check(ctx, DDP__FP_BROADCAST, "ddp_sync_params", ctx->flat_bytes, (ddp_dtype)-1, 0, -1));
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
    return ddp__param_check(ctx, id) ? -1 : ctx->params[id].cbucket;
}
DDP_API size_t ddp_param_offset(const ddp_context *ctx, int id) {
    return ddp__param_check(ctx, id) ? 0 : ctx->params[id].offset;
}
DDP_API int ddp_bucket_count(const ddp_context *ctx) { return ctx && ctx->finalized ? ctx->num_cb : 0; }
DDP_API ddp_result ddp_bucket_info(const ddp_context *ctx, int b, size_t *offset_bytes, size_t *size_bytes,
                                   ddp_dtype *dtype, int *num_params) {
    const ddp__cbucket *c;
    const ddp__piece *first, *last;
    if (!ctx || !ctx->finalized || b < 0 || b >= ctx->num_cb) return DDP_ERROR_INVALID_ARGUMENT;
    c = &ctx->cb[b];
    first = &ctx->cranges[c->range0];
    last = &ctx->cranges[c->range0 + c->nrange - 1];
    if (offset_bytes) *offset_bytes = first->offset;
    if (size_bytes) *size_bytes = last->offset + last->numel * ddp_dtype_size(c->dtype) - first->offset;
    if (dtype) *dtype = c->dtype;
    if (num_params) *num_params = c->num_params;
    return DDP_SUCCESS;
}
DDP_API ddp_result ddp_bucket_range(const ddp_context *ctx, int b, int k, size_t *offset_bytes, size_t *size_bytes) {
    const ddp__cbucket *c;
    if (!ctx || !ctx->finalized || b < 0 || b >= ctx->num_cb) return DDP_ERROR_INVALID_ARGUMENT;
    c = &ctx->cb[b];
    if (k < 0 || k >= c->nrange) return DDP_ERROR_INVALID_ARGUMENT;
    if (offset_bytes) *offset_bytes = ctx->cranges[c->range0 + k].offset;
    if (size_bytes) *size_bytes = ctx->cranges[c->range0 + k].numel * ddp_dtype_size(c->dtype);
    return DDP_SUCCESS;
}
DDP_API void *ddp_flat_params(ddp_context *ctx) { return ctx && ctx->finalized ? ctx->flat_params : NULL; }
DDP_API void *ddp_flat_grads(ddp_context *ctx) { return ctx && ctx->finalized ? ctx->flat_grads : NULL; }
DDP_API size_t ddp_flat_bytes(const ddp_context *ctx) { return ctx && ctx->finalized ? ctx->flat_bytes : 0; }

/* ---- communication thread ---------------------------------------------------------- */


/* ---- communication hooks ----------------------------------------------------------

   A hook replaces a bucket's built-in reduction and runs where it would
   have: on the communication thread (shm, staged), inline for the last
   bucket, or on your thread at the bucket's launch (nccl). It gets the
   bucket as one span (a bucket of several ranges, see BUCKETS, is packed
   into a scratch buffer and unpacked after) and the library's collectives
   through function pointers; they run on this context's communicator
   without the public functions' checks (no "inside a step" refusal). */

static ddp_result ddp__cuda_hook_prepare(ddp_context *ctx, int b);
static ddp_result ddp__cuda_hook_finish(ddp_context *ctx, int b);
static void *ddp__cuda_comm_stream(ddp_context *ctx);
static ddp_result ddp__cuda_hook_sync(ddp_context *ctx);
static ddp_result ddp__cuda_hook_scale(ddp_context *ctx, void *buf, ddp_dtype t, size_t n, double scale);
static ddp_result ddp__cuda_copy_dd(ddp_context *ctx, void *dst, const void *src, size_t bytes);
static ddp_result ddp__cuda_hook_compress(ddp_context *ctx, const ddp_comm_bucket *b, ddp_dtype ct);
static void *ddp__dev_alloc(ddp_context *ctx, size_t bytes);

static ddp_result ddp__hook_arg(ddp_context *ctx, const char *fn, const void *a, const void *b, ddp_dtype t, ddp_op op) {
    if (!a || !b) return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "%s in a communication hook: buffer is NULL", fn);
    if ((int)t < 0 || t >= DDP_DTYPE_COUNT_) return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "%s in a communication hook: dtype %d is not a ddp_dtype", fn, (int)t);
    if ((int)op < 0 || op > DDP_OP_MIN) return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "%s in a communication hook: op %d is not a ddp_op", fn, (int)op);
    /* kernels the hook queued on its stream come first */
    if (ddp__on_gpu(ctx)) return ddp__cuda_hook_sync(ctx);
    return DDP_SUCCESS;
}

static ddp_result ddp__hook_done(ddp_context *ctx, size_t bytes, ddp_result r) {
    ctx->hook_bytes += bytes;
    if (r != DDP_SUCCESS && r != DDP_ERROR_INVALID_ARGUMENT) return ddp__break(ctx, r);
    return r;
}

static ddp_result ddp__hook_allreduce(void *comm, void *buf, size_t count, ddp_dtype t, ddp_op op, double scale) {
    ddp_context *ctx = (ddp_context *)comm;
    ddp_result r;
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    if (t == DDP_DTYPE_DEFAULT) t = DDP_F32;
    if (op == DDP_OP_DEFAULT) op = DDP_OP_SUM;
    DDP__TRY(ddp__hook_arg(ctx, "allreduce", buf, buf, t, op));
    if (!ddp__in_range(scale, -HUGE_VAL, HUGE_VAL, 0))
        return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "allreduce in a communication hook: scale %g is not finite", scale);
    if (count == 0) return DDP_SUCCESS;
    DDP__TRY(ddp__fp_check(ctx, DDP__FP_ALLREDUCE, "communication hook", count, t, (int)op, ctx->fp_bucket));
    if (ddp__on_gpu(ctx)) {
        r = ctx->ops->allreduce(ctx, buf, count, t, op);
        if (r == DDP_SUCCESS && scale != 1.0) r = ddp__cuda_hook_scale(ctx, buf, t, count, scale);
    } else {
        r = ddp__shm_allreduce_scaled(ctx, buf, count, t, op, scale);
    }
    return ddp__hook_done(ctx, count * ddp_dtype_size(t), r);
}

static ddp_result ddp__hook_broadcast(void *comm, void *buf, size_t count, ddp_dtype t, int root) {
    ddp_context *ctx = (ddp_context *)comm;
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    DDP__TRY(ddp__hook_arg(ctx, "broadcast", buf, buf, t, DDP_OP_SUM));
    if (root < 0 || root >= ctx->world)
        return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "broadcast in a communication hook: root %d is not a rank of a world of %d", root, ctx->world);
    if (count == 0) return DDP_SUCCESS;
    DDP__TRY(ddp__fp_check(ctx, DDP__FP_BROADCAST, "communication hook", count, t, root, ctx->fp_bucket));
    return ddp__hook_done(ctx, count * ddp_dtype_size(t), ctx->ops->broadcast(ctx, buf, count * ddp_dtype_size(t), root));
}

static ddp_result ddp__hook_allgather(void *comm, const void *send, void *recv, size_t count, ddp_dtype t) {
    ddp_context *ctx = (ddp_context *)comm;
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    DDP__TRY(ddp__hook_arg(ctx, "allgather", send, recv, t, DDP_OP_SUM));
    if (count == 0) return DDP_SUCCESS;
    DDP__TRY(ddp__fp_check(ctx, DDP__FP_ALLGATHER, "communication hook", count, t, 0, ctx->fp_bucket));
    return ddp__hook_done(ctx, count * ddp_dtype_size(t), ctx->ops->allgather(ctx, send, recv, count * ddp_dtype_size(t)));
}

static ddp_result ddp__hook_reduce_scatter(void *comm, const void *send, void *recv, size_t count, ddp_dtype t, ddp_op op) {
    ddp_context *ctx = (ddp_context *)comm;
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    if (t == DDP_DTYPE_DEFAULT) t = DDP_F32;
    if (op == DDP_OP_DEFAULT) op = DDP_OP_SUM;
    DDP__TRY(ddp__hook_arg(ctx, "reduce_scatter", send, recv, t, op));
    if (count == 0) return DDP_SUCCESS;
    DDP__TRY(ddp__fp_check(ctx, DDP__FP_REDUCE_SCATTER, "communication hook", count, t, (int)op, ctx->fp_bucket));
    return ddp__hook_done(ctx, count * ddp_dtype_size(t) * (size_t)ctx->world, ctx->ops->reduce_scatter(ctx, send, recv, count, t, op));
}

static ddp_result ddp__hook_barrier(void *comm) {
    ddp_context *ctx = (ddp_context *)comm;
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    DDP__TRY(ddp__fp_check(ctx, DDP__FP_BARRIER, "communication hook", 0, DDP_F32, 0, ctx->fp_bucket));
    return ddp__hook_done(ctx, 0, ctx->ops->barrier(ctx, "a barrier in a communication hook"));
}

/* The hook's scratch: at least bytes (host, or device on GPU contexts). */
static ddp_result ddp__hook_scratch(ddp_context *ctx, size_t bytes, void **out) {
    if (ctx->hook_buf_bytes < bytes) {
        void *p = ddp__on_gpu(ctx) ? ddp__dev_alloc(ctx, bytes) : ddp__alloc(ctx, bytes);
        if (!p) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory for %" DDP__PRIzu " bytes of communication-hook scratch", bytes);
        if (ddp__on_gpu(ctx)) ddp__free_device(ctx, ctx->hook_buf);
        else ddp__free(ctx, ctx->hook_buf);
        ctx->hook_buf = p;
        ctx->hook_buf_bytes = bytes;
    }
    *out = ctx->hook_buf;
    return DDP_SUCCESS;
}

/* Copy bucket b's ranges into the packed span (in) or back (!in). */
static ddp_result ddp__hook_pack(ddp_context *ctx, int b, unsigned char *pack, int in) {
    const ddp__cbucket *cb = &ctx->cb[b];
    size_t es = ddp_dtype_size(cb->dtype), at = 0;
    int k;
    for (k = 0; k < cb->nrange; k++) {
        const ddp__piece *rg = &ctx->cranges[cb->range0 + k];
        unsigned char *g = ctx->flat_grads + rg->offset;
        if (ddp__on_gpu(ctx)) DDP__TRY(ddp__cuda_copy_dd(ctx, in ? pack + at : g, in ? g : pack + at, rg->numel * es));
        else memcpy(in ? pack + at : g, in ? g : pack + at, rg->numel * es);
        at += rg->numel * es;
    }
    return ddp__on_gpu(ctx) ? ddp__cuda_hook_sync(ctx) : DDP_SUCCESS;
}

/* Run the hook on bucket b. A hook that fails breaks the context at once,
   so the other ranks, waiting in their hooks' collectives, fail too (with
   DDP_ERROR_USER, see ddp__shm_wait). */
static ddp_result ddp__call_hook(ddp_context *ctx, int b, double scale) {
    const ddp__cbucket *cb = &ctx->cb[b];
    size_t bytes = cb->numel * ddp_dtype_size(cb->dtype);
    ddp_comm_bucket a;
    void *pack = NULL;
    ddp_result rc;
    memset(&a, 0, sizeof a);
    if (ddp__on_gpu(ctx)) DDP__TRY(ddp__cuda_hook_prepare(ctx, b));
    if (cb->nrange == 1) {
        a.grad = ctx->flat_grads + ctx->cranges[cb->range0].offset;
    } else {
        DDP__TRY(ddp__hook_scratch(ctx, bytes, &pack));
        DDP__TRY(ddp__hook_pack(ctx, b, (unsigned char *)pack, 1));
        a.grad = pack;
    }
    a.index = b;
    a.count = cb->numel;
    a.dtype = cb->dtype;
    a.scale = scale;
    a.rank = ctx->rank;
    a.world = ctx->world;
    a.on_device = ddp__on_gpu(ctx);
    a.stream = ddp__cuda_comm_stream(ctx);
    a.comm = ctx;
    a.allreduce = ddp__hook_allreduce;
    a.broadcast = ddp__hook_broadcast;
    a.allgather = ddp__hook_allgather;
    a.reduce_scatter = ddp__hook_reduce_scatter;
    a.barrier = ddp__hook_barrier;
    ctx->hook_bytes = 0;
    rc = ctx->hook(&a, ctx->hook_state);
    if (rc != DDP_SUCCESS) {
        int broken = ddp__atomic_load_int(&ctx->broken);
        /* a collective inside failed (the message is its own), or the hook itself */
        if (broken) return (ddp_result)broken;
        ddp__fail(ctx, DDP_ERROR_USER, "communication hook returned %d for bucket %d on rank %d", (int)rc, b, ctx->rank);
        ddp__atomic_store_int(&ctx->hook_failed, 1);
        ddp__atomic_store_int(&ctx->hook_broke, 1);
        return ddp__break(ctx, DDP_ERROR_USER);
    }
    if (pack) DDP__TRY(ddp__hook_pack(ctx, b, (unsigned char *)pack, 0));
    if (ddp__on_gpu(ctx)) return ddp__cuda_hook_finish(ctx, b);
    return DDP_SUCCESS;
}

DDP_API ddp_result ddp_register_comm_hook(ddp_context *ctx, ddp_comm_hook hook, void *state) {
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    DDP__TRY(ddp__check_usable(ctx, "ddp_register_comm_hook"));
    if (ctx->in_step) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_register_comm_hook: not allowed inside a step");
    ctx->hook = hook;
    ctx->hook_state = state;
    return DDP_SUCCESS;
}

DDP_API ddp_result ddp_comm_hook_allreduce(const ddp_comm_bucket *b, void *state) {
    (void)state;
    if (!b || !b->allreduce) return DDP_ERROR_INVALID_ARGUMENT;
    return b->allreduce(b->comm, b->grad, b->count, b->dtype, DDP_OP_SUM, b->scale);
}

/* f32 to ct, in place in the first half of the span (element i's 2 bytes
   land below element i + 1's 4), the sum in ct, back to f32 from the top
   down. Loads and stores through memcpy: the span is read as two types. */
static ddp_result ddp__hook_compress(const ddp_comm_bucket *b, ddp_dtype ct) {
    ddp_context *ctx;
    unsigned char *g;
    float s;
    size_t i;
    ddp_result r;
    if (!b || !b->allreduce || !b->comm) return DDP_ERROR_INVALID_ARGUMENT;
    if (b->dtype != DDP_F32) return b->allreduce(b->comm, b->grad, b->count, b->dtype, DDP_OP_SUM, b->scale);
    ctx = (ddp_context *)b->comm;
    if (b->on_device) return ddp__cuda_hook_compress(ctx, b, ct);
    g = (unsigned char *)b->grad;
    s = (float)b->scale;
    for (i = 0; i < b->count; i++) {
        float v;
        uint16_t h;
        memcpy(&v, g + 4 * i, 4);
        h = ct == DDP_BF16 ? ddp__f32_to_bf16(v * s) : ddp__f32_to_f16(v * s);
        memcpy(g + 2 * i, &h, 2);
    }
    r = b->allreduce(b->comm, g, b->count, ct, DDP_OP_SUM, 1.0);
    if (r != DDP_SUCCESS) return r;
    for (i = b->count; i-- > 0;) {
        uint16_t h;
        float v;
        memcpy(&h, g + 2 * i, 2);
        v = ct == DDP_BF16 ? ddp__bf16_to_f32(h) : ddp__f16_to_f32(h);
        memcpy(g + 4 * i, &v, 4);
    }
    return DDP_SUCCESS;
}

DDP_API ddp_result ddp_comm_hook_bf16(const ddp_comm_bucket *b, void *state) { (void)state; return ddp__hook_compress(b, DDP_BF16); }
DDP_API ddp_result ddp_comm_hook_fp16(const ddp_comm_bucket *b, void *state) { (void)state; return ddp__hook_compress(b, DDP_F16); }

/* Reduce bucket b (on the communication thread, or inline), timed for
   the step statistics and the timeline. */
static ddp_result ddp__run_bucket(ddp_context *ctx, int b, double scale) {
    double t0 = ddp__now(), dt;
    uint64_t bytes = (uint64_t)ctx->cb[b].numel * ddp_dtype_size(ctx->cb[b].dtype);
    ddp_result r;
    ctx->fp_bucket = b;
    if (ctx->hook) r = ddp__call_hook(ctx, b, scale);
    else {
        r = ddp__fp_check(ctx, DDP__FP_BUCKET, "gradient bucket", ctx->cb[b].numel, ctx->cb[b].dtype, ctx->zero, b);
        if (r == DDP_SUCCESS) r = ctx->ops->bucket_reduce(ctx, b, scale);
    }
    if (ctx->hook) bytes = ctx->hook_bytes;
    dt = ddp__now() - t0;
    ddp__mutex_lock(&ctx->mu);
    ctx->st_cur.comm_s += dt;
    ctx->st_cur.bytes += bytes;
    ddp__mutex_unlock(&ctx->mu);
    ddp__trace_ev(ctx, DDP__EV_REDUCE, t0, dt, b, ctx->hook != NULL, bytes);
    return r;
}

static void *ddp__comm_main(void *arg) {
    ddp_context *ctx = (ddp_context *)arg;
#if defined(DDP_CUDA)
    if (ddp__cuda_comm_thread(ctx)) return NULL; /* it was the NCCL watchdog */
#endif
    ddp__mutex_lock(&ctx->mu);
    for (;;) {
        int b;
        ddp_result r;
        double scale;
        while (ctx->q_head == ctx->q_tail && !ctx->q_stop) ddp__cond_wait(&ctx->cv_work, &ctx->mu);
        if (ctx->q_stop) break;
        b = ctx->queue[ctx->q_head];
        scale = ctx->q_scale;
        r = ctx->q_err;
        ctx->q_busy = 1;
        ddp__mutex_unlock(&ctx->mu);
        if (r == DDP_SUCCESS) r = ddp__run_bucket(ctx, b, scale);
        ddp__mutex_lock(&ctx->mu);
        if (r != DDP_SUCCESS && ctx->q_err == DDP_SUCCESS) ctx->q_err = r;
        ctx->q_head++;
        ctx->q_busy = 0;
        ddp__cond_broadcast(&ctx->cv_done);
    }
    ddp__mutex_unlock(&ctx->mu);
    return NULL;
}

static ddp_result ddp__cuda_launch_bucket(ddp_context *ctx, int b);
static ddp_result ddp__drain(ddp_context *ctx);

static ddp_result ddp__launch_bucket(ddp_context *ctx, int b) {
    ddp_result r;
    ctx->cb[b].launched = 1;
    if (ddp__solo(ctx)) return DDP_SUCCESS; /* see ddp__cuda_solo_end */
    if (ctx->cfg.logger.func && ctx->cfg.logger.level >= DDP_LOG_DEBUG) {
        char msg[64];
        snprintf(msg, sizeof msg, "launch bucket %d", b);
        ddp__log(ctx, DDP_LOG_DEBUG, msg);
    }
    ddp__trace_ev(ctx, DDP__EV_LAUNCH, ddp__now(), -1, b, 0, (uint64_t)ctx->cb[b].numel * ddp_dtype_size(ctx->cb[b].dtype));
    if (ctx->cfg.backend == DDP_BACKEND_NCCL && ctx->hook) {
        /* the hook runs here, on your thread; its collectives wait for themselves */
        r = ddp__run_bucket(ctx, b, ctx->q_scale);
        if (r != DDP_SUCCESS) ddp__break(ctx, r);
        return r;
    }
    if (ctx->cfg.backend == DDP_BACKEND_NCCL) {
        /* queued on the communication stream: the bytes count, the time does not show on the host */
        ddp__mutex_lock(&ctx->mu);
        ctx->st_cur.bytes += (uint64_t)ctx->cb[b].numel * ddp_dtype_size(ctx->cb[b].dtype);
        ddp__mutex_unlock(&ctx->mu);
        r = ddp__fp_check(ctx, DDP__FP_BUCKET, "gradient bucket", ctx->cb[b].numel, ctx->cb[b].dtype, ctx->zero, b);
        if (r != DDP_SUCCESS) return r;
        return ddp__cuda_launch_bucket(ctx, b);
    }
#if defined(DDP_CUDA)
    /* staged: the events are recorded here, on the thread that marked */
    if (ddp__on_gpu(ctx)) DDP__TRY(ddp__cuda_bucket_events(ctx, b, 0));
#endif
    /* the last bucket: nothing of backward is left to overlap with, so the
       calling thread reduces it itself (after the queue), saving the hand-off */
    if (ctx->comm_started && b == ctx->num_cb - 1) {
        double t0 = ddp__now();
        r = ddp__drain(ctx);
        ddp__trace_ev(ctx, DDP__EV_WAIT, t0, ddp__now() - t0, 0, 0, 0);
        if (r != DDP_SUCCESS) return r;
        r = ddp__run_bucket(ctx, b, ctx->q_scale);
        if (r != DDP_SUCCESS) ddp__break(ctx, r);
        return r;
    }
    if (ctx->comm_started) {
        ddp__mutex_lock(&ctx->mu);
        ctx->queue[ctx->q_tail++] = b;
        ddp__cond_signal(&ctx->cv_work);
        ddp__mutex_unlock(&ctx->mu);
        return DDP_SUCCESS;
    }
    r = ddp__run_bucket(ctx, b, ctx->q_scale);
    if (r != DDP_SUCCESS) ddp__break(ctx, r);
    return r;
}

/* Wait for the communication thread to drain the queue. The thread's own
   waits have the timeout; this one only guards against the thread itself
   getting stuck, so its deadline restarts whenever a bucket completes. */
static ddp_result ddp__drain(ddp_context *ctx) {
    ddp_result r;
    double deadline = 0;
    int timed_out = 0, seen;
    if (!ctx->comm_started) return DDP_SUCCESS;
    ddp__mutex_lock(&ctx->mu);
    seen = -1;
    while (ctx->q_head < ctx->q_tail && !timed_out) {
        if (ctx->q_head != seen) {
            seen = ctx->q_head;
            deadline = ddp__now() + ctx->cfg.timeout_s + 10.0;
        }
        if (ddp__cond_wait_until(&ctx->cv_done, &ctx->mu, deadline) && ctx->q_head == seen) timed_out = 1;
    }
    r = ctx->q_err;
    if (!timed_out) { ctx->q_head = ctx->q_tail = 0; ctx->q_err = DDP_SUCCESS; }
    ddp__mutex_unlock(&ctx->mu);
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

/* ---- accumulation ----------------------------------------------------------------------

   The one rule (ACCUMULATION in the manual): gradients accumulate until
   ddp_optimizer_step() or ddp_zero_grad(); a reducing ddp_step_end() adds
   the rank-average of what was accumulated since the last reduce. In place,
   with the flat gradient buffer G your backward adds into:
     LOCAL    G holds only this rank's accumulation since the last reduce
     REDUCED  G holds the result of the last reduce (the same bits on every
              rank) and nothing local
     MIXED    accumulation went on after a reduce: the reduced part R waits in
              acc_reduced and G holds the local part L while a step runs;
              after a no_sync step G shows R + L (what PyTorch's .grad holds)
              and L waits in acc_local until the next step begins
   So the reducer only ever reduces L, never an already averaged R (which
   would not be exact, and with gradient_sum would multiply R by the world).
   Everything that decides the factor of a reduce is ddp__reduce_factor(). */

enum { DDP__ACC_LOCAL = 0, DDP__ACC_REDUCED, DDP__ACC_MIXED };

static ddp_result ddp__zero_grads(ddp_context *ctx);
static ddp_result ddp__cuda_grad_buffer(ddp_context *ctx, void **slot);
static ddp_result ddp__cuda_grad_copy(ddp_context *ctx, void *dst, const void *src);
static ddp_result ddp__cuda_grad_add(ddp_context *ctx, void *dst, const void *src, void *stream);

/* The factor a reducing step applies to the sum over ranks of what they
   accumulated since the last reduce: 1 / ranks (unless gradient_sum), and
   1 / micro_steps inside ddp_train_step (its loss / micro_steps). */
static double ddp__reduce_factor(const ddp_context *ctx) {
    double ranks = ctx->cfg.gradient_sum ? 1.0 : ctx->divisor;
    return 1.0 / (ranks * ctx->window_div);
}

static ddp_result ddp__acc_buffer(ddp_context *ctx, void **slot) {
    if (*slot) return DDP_SUCCESS;
    if (ddp__on_gpu(ctx)) return ddp__cuda_grad_buffer(ctx, slot);
    *slot = ddp__alloc(ctx, ctx->flat_bytes);
    if (!*slot) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory for %" DDP__PRIzu " bytes of accumulated gradients", ctx->flat_bytes);
    return DDP_SUCCESS;
}

static ddp_result ddp__grad_copy(ddp_context *ctx, void *dst, const void *src) {
    if (ddp__on_gpu(ctx)) return ddp__cuda_grad_copy(ctx, dst, src);
    memcpy(dst, src, ctx->flat_bytes);
    return DDP_SUCCESS;
}

/* dst += src over every bucket, in each bucket's type (16-bit sums in f32,
   rounded once). */
static ddp_result ddp__grad_add(ddp_context *ctx, void *dst, const void *src, void *stream) {
    int b;
    if (ddp__on_gpu(ctx)) return ddp__cuda_grad_add(ctx, dst, src, stream);
    for (b = 0; b < ctx->num_buckets; b++) {
        const ddp__bucket *bk = &ctx->buckets[b];
        unsigned char *d = (unsigned char *)dst + bk->offset;
        const unsigned char *x = (const unsigned char *)src + bk->offset;
        size_t i;
        if (bk->dtype == DDP_F32) for (i = 0; i < bk->numel; i++) ((float *)d)[i] += ((const float *)x)[i];
        else if (bk->dtype == DDP_F64) for (i = 0; i < bk->numel; i++) ((double *)d)[i] += ((const double *)x)[i];
        else for (i = 0; i < bk->numel; i++)
            ddp__store_elem(d, i, bk->dtype, (double)((float)ddp__load_elem(d, i, bk->dtype) + (float)ddp__load_elem(x, i, bk->dtype)));
    }
    return DDP_SUCCESS;
}

/* Start of a step: zero after an optimizer step, or set the reduced part
   aside when accumulation goes on after a reduce. */
static ddp_result ddp__acc_begin(ddp_context *ctx) {
    if (ctx->zero_pending) {
        DDP__TRY(ddp__zero_grads(ctx));
        ctx->zero_pending = 0;
        ctx->acc_state = DDP__ACC_LOCAL;
        ctx->mixed_shown = 0;
    } else if (ctx->acc_state == DDP__ACC_REDUCED) {
        DDP__TRY(ddp__acc_buffer(ctx, &ctx->acc_reduced));
        DDP__TRY(ddp__grad_copy(ctx, ctx->acc_reduced, ctx->flat_grads));
        DDP__TRY(ddp__zero_grads(ctx));
        ctx->acc_state = DDP__ACC_MIXED;
        ctx->mixed_shown = 0;
    } else if (ctx->acc_state == DDP__ACC_MIXED && ctx->mixed_shown) {
        DDP__TRY(ddp__grad_copy(ctx, ctx->flat_grads, ctx->acc_local));
        ctx->mixed_shown = 0;
    }
    return DDP_SUCCESS;
}

/* End of a no_sync step: in MIXED, show R + L and keep L aside. */
static ddp_result ddp__acc_end_local(ddp_context *ctx, void *stream) {
    ctx->accum_steps++;
    if (ctx->acc_state != DDP__ACC_MIXED) return DDP_SUCCESS;
    DDP__TRY(ddp__acc_buffer(ctx, &ctx->acc_local));
    DDP__TRY(ddp__grad_copy(ctx, ctx->acc_local, ctx->flat_grads));
    DDP__TRY(ddp__grad_add(ctx, ctx->flat_grads, ctx->acc_reduced, stream));
    ctx->mixed_shown = 1;
    return DDP_SUCCESS;
}

/* After a reduce finished (GPU: queued): G = R + average(L). */
static ddp_result ddp__acc_end_reduced(ddp_context *ctx, void *stream) {
    if (ctx->acc_state == DDP__ACC_MIXED) DDP__TRY(ddp__grad_add(ctx, ctx->flat_grads, ctx->acc_reduced, stream));
    ctx->acc_state = DDP__ACC_REDUCED;
    ctx->accum_steps = 0;
    ctx->mixed_shown = 0;
    return DDP_SUCCESS;
}

/* ---- the step ------------------------------------------------------------------------ */

static ddp_result ddp__join_step(ddp_context *ctx);

DDP_API ddp_result ddp_step_begin(ddp_context *ctx) {
    int i;
    ddp_result r;
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    DDP__TRY(ddp__check_usable(ctx, "ddp_step_begin"));
    if (!ctx->finalized) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_step_begin: call ddp_finalize() first");
    if (ctx->in_step) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_step_begin: the previous step was not ended (call ddp_step_end())");
    r = ddp__acc_begin(ctx);
    if (r != DDP_SUCCESS) return ddp__break(ctx, r);
    for (i = 0; i < ctx->num_params; i++) ctx->params[i].marked = 0;
    for (i = 0; i < ctx->num_cb; i++) {
        ctx->cb[i].pending = ctx->cb[i].num_params;
        ctx->cb[i].launched = 0;
    }
    ctx->next_bucket = 0;
    if (ctx->cfg.uneven_inputs && !ctx->no_sync && ctx->world > 1) DDP__TRY(ddp__join_step(ctx));
    ctx->q_scale = ddp__reduce_factor(ctx);
    ctx->in_step = 1;
    ctx->st_t0 = ddp__now();
    ctx->st_inline = 0;
    ctx->st_steps++;
    if (!ctx->no_sync) ctx->sync_steps++; /* after the join round: a joined rank counts at its shadow step */
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
    if (!ctx->order_learned && ctx->mark_count < ctx->num_params) ctx->mark_order[ctx->mark_count++] = id;
    if (ctx->trace) ddp__trace_ev(ctx, DDP__EV_MARK, ddp__now(), -1, id, p->cbucket, 0);
    if (ddp__on_gpu(ctx)) DDP__TRY(ddp__cuda_record_ready(ctx, id, stream));
    if (ctx->no_sync) return DDP_SUCCESS;
    ctx->cb[p->cbucket].pending--;
    if (ctx->next_bucket < ctx->num_cb && ctx->cb[ctx->next_bucket].pending == 0) {
        /* launching (and, for the last bucket, reducing) is communication on
           the user's thread: it counts as exposed */
        double t0 = ddp__now();
        ddp_result r = DDP_SUCCESS;
        while (r == DDP_SUCCESS && ctx->next_bucket < ctx->num_cb && ctx->cb[ctx->next_bucket].pending == 0)
            r = ddp__launch_bucket(ctx, ctx->next_bucket++);
        ctx->st_inline += ddp__now() - t0;
        if (r != DDP_SUCCESS) return r;
    }
    return DDP_SUCCESS;
}

DDP_API ddp_result ddp_mark_ready(ddp_context *ctx, int id) { return ddp__mark(ctx, id, NULL, 0); }
DDP_API ddp_result ddp_mark_ready_stream(ddp_context *ctx, int id, void *stream) { return ddp__mark(ctx, id, stream, 1); }

static ddp_result ddp__cuda_step_end(ddp_context *ctx, void *stream);

/* Launch the buckets not launched yet, in order, and wait for all of them
   (CPU), or make the stream wait for them (GPU). */
static ddp_result ddp__reduce_rest(ddp_context *ctx, void *stream) {
    ddp_result r = DDP_SUCCESS;
    while (r == DDP_SUCCESS && ctx->next_bucket < ctx->num_cb) r = ddp__launch_bucket(ctx, ctx->next_bucket++);
    if (ctx->cfg.backend == DDP_BACKEND_NCCL) {
        if (r == DDP_SUCCESS) r = ddp__cuda_step_end(ctx, stream);
    } else {
        double t0 = ddp__now();
        ddp_result d = ddp__drain(ctx);
        if (ctx->comm_started) ddp__trace_ev(ctx, DDP__EV_WAIT, t0, ddp__now() - t0, 0, 0, 0);
        if (r == DDP_SUCCESS) r = d;
        if (r == DDP_SUCCESS && ddp__on_gpu(ctx)) r = ddp__cuda_step_end(ctx, stream);
    }
    return r;
}

/* ---- the bucket order learned from the first step ----

   PyTorch DDP rebuilds its buckets after the first iteration in the order
   the gradients became ready; so does this reducer, once, at the end of
   the first step (synced or not): the order of that step's
   ddp_mark_ready() calls (parameters never marked follow in reverse
   registration order). Every rank takes rank 0's order (a broadcast of
   one int per parameter; a rank that marked in another order says so in
   a DEBUG log line). Only the communication buckets change: which
   parameters each holds and their launch order. The storage (offsets,
   the pointers you hold, the optimizer state, ZeRO-1 shards, checkpoints)
   stays as it is; a bucket may then be several ranges of the flat
   buffers. Off with config.static_bucket_order or uneven inputs. */
static ddp_result ddp__learn_order(ddp_context *ctx) {
    int P = ctx->num_params, i, k, seen, diff = -1;
    int32_t *order;
    int *have;
    ddp_result r = DDP_SUCCESS;
    ctx->order_learned = 1;
    order = (int32_t *)ddp__alloc(ctx, (size_t)P * sizeof *order);
    have = (int *)ddp__calloc(ctx, (size_t)P * sizeof *have);
    if (!order || !have) {
        ddp__free(ctx, order);
        ddp__free(ctx, have);
        return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory learning the bucket order");
    }
    for (k = 0; k < ctx->mark_count; k++) { order[k] = ctx->mark_order[k]; have[ctx->mark_order[k]] = 1; }
    for (seen = k, i = P - 1; i >= 0; i--) if (!have[i]) order[seen++] = i;
    if (ctx->world > 1) {
        int32_t *mine = (int32_t *)ddp__alloc(ctx, (size_t)P * sizeof *mine);
        if (!mine) r = ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory learning the bucket order");
        else memcpy(mine, order, (size_t)P * sizeof *mine);
        if (r == DDP_SUCCESS) r = ddp__fp_check(ctx, DDP__FP_BROADCAST, "the learned bucket order", (uint64_t)P, DDP_I32, 0, -1);
        if (r == DDP_SUCCESS) r = ctx->ops->broadcast(ctx, order, (size_t)P * sizeof *order, 0);
        for (k = 0; r == DDP_SUCCESS && k < P; k++) {
            if (order[k] < 0 || order[k] >= P) {
                r = ddp__fail(ctx, DDP_ERROR_MISMATCH, "rank 0's bucket order names parameter %d of %d", (int)order[k], P);
                break;
            }
            if (diff < 0 && order[k] != mine[k]) diff = k;
        }
        if (r == DDP_SUCCESS && diff >= 0 && ctx->cfg.logger.func && ctx->cfg.logger.level >= DDP_LOG_DEBUG) {
            char msg[400];
            snprintf(msg, sizeof msg, "bucket order: rank %d marked its parameters in another order than rank 0 in the first step "
                     "(position %d: '%.100s' here, '%.100s' on rank 0); every rank uses rank 0's order",
                     ctx->rank, diff, ctx->params[mine[diff]].name, ctx->params[order[diff]].name);
            ddp__log(ctx, DDP_LOG_DEBUG, msg);
        }
        ddp__free(ctx, mine);
    }
    if (r == DDP_SUCCESS) {
        int before = ctx->num_cb, changed = 0;
        for (i = 0; i < P; i++) have[i] = ctx->params[i].cbucket;
        r = ddp__build_comm(ctx, (const int *)order);
        for (i = 0; i < P && r == DDP_SUCCESS; i++) changed |= have[i] != ctx->params[i].cbucket;
        if (r == DDP_SUCCESS && (changed || before != ctx->num_cb) && ctx->cfg.logger.func && ctx->cfg.logger.level >= DDP_LOG_INFO) {
            char msg[160];
            snprintf(msg, sizeof msg, "bucket order learned from the first step: %d buckets (were %d) in the order of ddp_mark_ready",
                     ctx->num_cb, before);
            ddp__log(ctx, DDP_LOG_INFO, msg);
        }
        if (r == DDP_SUCCESS && ctx->cfg.logger.func && ctx->cfg.logger.level >= DDP_LOG_DEBUG) {
            for (k = 0; k < ctx->num_cb; k++) {
                char msg[600];
                int n = snprintf(msg, sizeof msg, "bucket %d (%d range%s):", k, ctx->cb[k].nrange, ctx->cb[k].nrange == 1 ? "" : "s");
                for (i = 0; i < P && n > 0 && (size_t)n < sizeof msg - 4; i++)
                    if (ctx->params[i].cbucket == k) n += snprintf(msg + n, sizeof msg - (size_t)n, " %s", ctx->params[i].name);
                ddp__log(ctx, DDP_LOG_DEBUG, msg);
            }
        }
    }
    ddp__free(ctx, order);
    ddp__free(ctx, have);
    ddp__free(ctx, ctx->mark_order);
    ctx->mark_order = NULL;
    return r;
}

static ddp_result ddp__step_end(ddp_context *ctx, void *stream) {
    int i, missing = 0;
    ddp_result r;
    double entry = ddp__now(), done;
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
    if (ctx->no_sync) {
        ctx->in_step = 0;
        r = ddp__acc_end_local(ctx, stream);
        /* a no_sync micro-step's time counts with the synced step that ends its window */
        ctx->st_cur.compute_s += entry - ctx->st_t0;
        ddp__trace_ev(ctx, DDP__EV_STEP, ctx->st_t0, ddp__now() - ctx->st_t0, (int)ctx->st_steps, 0, 0);
        if (r == DDP_SUCCESS && !ctx->order_learned) r = ddp__learn_order(ctx);
        return r == DDP_SUCCESS ? r : ddp__break(ctx, r);
    }
    /* unused parameters keep their (zero or accumulated) gradient and are reduced like the rest */
    r = ddp__reduce_rest(ctx, stream);
    if (r == DDP_SUCCESS) r = ddp__acc_end_reduced(ctx, stream);
    ctx->in_step = 0;
    if (r == DDP_SUCCESS && !ctx->order_learned) r = ddp__learn_order(ctx);
    if (r != DDP_SUCCESS) return ddp__break(ctx, r);
    done = ddp__now();
    ddp__stats_step_done(ctx, entry, done);
    ddp__trace_ev(ctx, DDP__EV_STEP, ctx->st_t0, done - ctx->st_t0, (int)ctx->st_steps, 1, 0);
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

/* ---- uneven inputs ------------------------------------------------------------------------

   PyTorch's Join. Collectives pair up by sequence number on every backend,
   so a rank out of data must take part in every collective the others run:
   with config.uneven_inputs every synced step starts with one round (a sum
   of doubles) in which each rank says whether it still has data and, if it
   runs inside ddp_train_step, its micro_steps. A joined rank (in ddp_join)
   answers each round with "no data", then runs the same bucket reductions
   with zero gradients and the same factor (on shm each rank reduces a slice
   of everybody's buffer, so the factor must match), then ddp_train_step's
   loss all-reduce when the others run it. The library's other collectives
   (checkpoints, ddp_sync_params) and yours are refused while a rank is known
   to have joined. A round in which nobody has data ends it: every rank takes
   the weights and training state of the lowest rank of the last round that
   still had data, and ddp_join returns everywhere. */

/* One round: *count ranks with data, *train of them in ddp_train_step with
   micro_steps *micro (the same on all, or an error). */
static ddp_result ddp__join_round(ddp_context *ctx, int active, int *count, int *train, double *micro) {
    double v[4 + DDP__JOIN_WORDS];
    int words = (ctx->world + DDP__JOIN_BITS - 1) / DDP__JOIN_BITS;
    ddp_result r;
    memset(v, 0, sizeof v);
    if (active) {
        double k = ctx->in_train_step ? ctx->window_div : 0.0;
        v[0] = 1;
        v[1] = ctx->in_train_step ? 1 : 0;
        v[2] = k;
        v[3] = k * k;
        v[4 + ctx->rank / DDP__JOIN_BITS] = ldexp(1.0, ctx->rank % DDP__JOIN_BITS);
    }
    r = ddp__fp_check(ctx, DDP__FP_ALLREDUCE, "ddp_join round", (uint64_t)(4 + words), DDP_F64, (int)DDP_OP_SUM, -1);
    if (r == DDP_SUCCESS) r = ctx->ops->allreduce(ctx, v, (size_t)(4 + words), DDP_F64, DDP_OP_SUM);
    if (r != DDP_SUCCESS) return ddp__break(ctx, r);
    *count = (int)v[0];
    *train = (int)v[1];
    *micro = *train ? v[2] / v[1] : 1.0;
    if (*train && (*train != *count || v[3] * v[1] != v[2] * v[2])) {
        ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "uneven inputs: in one synced step %d of %d ranks with data ran ddp_train_step, "
                  "with different micro_steps or next to manual steps; every rank must run the same kind of step", *train, *count);
        return ddp__break(ctx, DDP_ERROR_INVALID_STATE);
    }
    if (*count > 0) memcpy(ctx->join_last, v + 4, sizeof ctx->join_last);
    return DDP_SUCCESS;
}

/* The round of a rank with data, at the start of each synced step. */
static ddp_result ddp__join_step(ddp_context *ctx) {
    int count, train;
    double micro;
    DDP__TRY(ddp__join_round(ctx, 1, &count, &train, &micro));
    ctx->join_active = count;
    ctx->divisor = ctx->cfg.join_divide_by_initial_world_size ? (double)ctx->world : (double)count;
    return DDP_SUCCESS;
}

/* Collectives outside the step are refused while a rank is known to have
   joined: it would not answer them. */
static ddp_result ddp__join_check(ddp_context *ctx, const char *fn) {
    char list[128];
    int q, n = 0, len = 0;
    if (!ctx->cfg.uneven_inputs || ctx->joined || ctx->join_active >= ctx->world) return DDP_SUCCESS;
    list[0] = 0;
    for (q = 0; q < ctx->world && len < (int)sizeof list - 16; q++)
        if (fmod(floor(ctx->join_last[q / DDP__JOIN_BITS] / ldexp(1.0, q % DDP__JOIN_BITS)), 2.0) == 0) {
            len += snprintf(list + len, sizeof list - (size_t)len, "%s%d", n ? ", " : "", q);
            n++;
        }
    return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "%s: rank(s) %s joined (ddp_join) and answer only synced steps; "
                     "collectives are allowed again once ddp_join() has returned on every rank", fn, list);
}

/* The lowest rank of the last round with data. */
static int ddp__join_root(const ddp_context *ctx) {
    int q;
    for (q = 0; q < ctx->world; q++)
        if (fmod(floor(ctx->join_last[q / DDP__JOIN_BITS] / ldexp(1.0, q % DDP__JOIN_BITS)), 2.0) != 0) return q;
    return 0;
}

/* A synced step of the others, with zero gradients. */
static ddp_result ddp__join_shadow(ddp_context *ctx, int count, int train, double micro) {
    ddp_result r;
    int i;
    r = ddp__zero_grads(ctx);
    if (r != DDP_SUCCESS) return ddp__break(ctx, r);
    ctx->acc_state = DDP__ACC_LOCAL;
    ctx->accum_steps = 0;
    ctx->mixed_shown = 0;
    ctx->divisor = ctx->cfg.join_divide_by_initial_world_size ? (double)ctx->world : (double)count;
    ctx->window_div = micro; /* read again by the nccl launch */
    ctx->q_scale = ddp__reduce_factor(ctx);
    ctx->sync_steps++; /* the others' step this rank answers */
    for (i = 0; i < ctx->num_params; i++) ctx->params[i].marked = 0;
    for (i = 0; i < ctx->num_cb; i++) { ctx->cb[i].pending = ctx->cb[i].num_params; ctx->cb[i].launched = 0; }
    ctx->next_bucket = 0;
    r = ddp__reduce_rest(ctx, NULL);
    ctx->window_div = 1.0;
    if (r != DDP_SUCCESS) return ddp__break(ctx, r);
    if (train) {
        float pair[2] = { 0.0f, 0.0f };
        r = ddp__fp_check(ctx, DDP__FP_ALLREDUCE, "ddp_train_step loss", 2, DDP_F32, (int)DDP_OP_SUM, -1);
        if (r == DDP_SUCCESS) r = ctx->ops->allreduce(ctx, pair, 2, DDP_F32, DDP_OP_SUM);
        if (r != DDP_SUCCESS) return ddp__break(ctx, r);
    }
    return DDP_SUCCESS;
}

/* Everybody takes the weights and training state of root. */
static ddp_result ddp__join_sync(ddp_context *ctx, int root) {
    double st[8];
    ddp_result r;
    int k;
    void *slots[3];
    st[0] = (double)ctx->opt_steps;
    st[1] = (double)ctx->sched_steps;
    st[2] = ctx->cfg.optimizer.lr;
    st[3] = ctx->ls_scale;
    st[4] = (double)ctx->ls_tracker;
    st[5] = (double)ctx->ls_skipped;
    st[6] = (double)ddp__state_flags(ctx);
    st[7] = (double)ctx->ls_last_skipped;
    r = ddp__fp_check(ctx, DDP__FP_BROADCAST, "ddp_join state", sizeof st, (ddp_dtype)-1, root, -1);
    if (r == DDP_SUCCESS) r = ctx->ops->broadcast(ctx, st, sizeof st, root);
    if (r == DDP_SUCCESS) r = ctx->ops->broadcast(ctx, ctx->flat_params, ctx->flat_bytes, root);
    if (r == DDP_SUCCESS && ctx->rank != root) {
        ctx->opt_steps = (int64_t)st[0];
        ctx->sched_steps = (int64_t)st[1];
        ctx->cfg.optimizer.lr = st[2];
        ctx->ls_scale = st[3];
        ctx->ls_tracker = (int64_t)st[4];
        ctx->ls_skipped = (int64_t)st[5];
        ctx->ls_last_skipped = (int)st[7];
        if (st[6] != 0) r = ddp__opt_alloc(ctx);
    }
    slots[0] = ctx->opt_m; slots[1] = ctx->opt_v; slots[2] = ctx->opt_master;
    for (k = 0; k < 3 && r == DDP_SUCCESS; k++)
        if (((unsigned)st[6] & (1u << k)) && slots[k]) r = ctx->ops->broadcast(ctx, slots[k], ctx->opt_state_bytes, root);
    return r == DDP_SUCCESS ? r : ddp__break(ctx, r);
}

DDP_API ddp_result ddp_join(ddp_context *ctx) {
    ddp_result r = DDP_SUCCESS;
    int count = 1, train, rounds = 0;
    double micro;
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    DDP__TRY(ddp__check_usable(ctx, "ddp_join"));
    if (!ctx->finalized) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_join: call ddp_finalize() first");
    if (ctx->in_step) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_join: not allowed inside a step");
    if (!ctx->cfg.uneven_inputs)
        return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_join: set config.uneven_inputs on every rank to let ranks run out of data at different steps");
    if (ctx->accum_steps > 0) {
        char msg[128];
        snprintf(msg, sizeof msg, "ddp_join: %d no_sync micro-step(s) of rank %d were never reduced and are dropped", ctx->accum_steps, ctx->rank);
        ddp__log(ctx, DDP_LOG_WARN, msg);
    }
    if (ctx->world > 1) {
        ctx->joined = 1;
        for (;;) {
            r = ddp__join_round(ctx, 0, &count, &train, &micro);
            if (r != DDP_SUCCESS || count == 0) break;
            r = ddp__join_shadow(ctx, count, train, micro);
            if (r != DDP_SUCCESS) break;
            rounds++;
        }
        if (r == DDP_SUCCESS) r = ddp__join_sync(ctx, ddp__join_root(ctx));
        ctx->joined = 0;
        if (r != DDP_SUCCESS) return r;
        if (ctx->cfg.logger.func && ctx->cfg.logger.level >= DDP_LOG_INFO) {
            char msg[96];
            snprintf(msg, sizeof msg, "ddp_join: rank %d answered %d step(s) of the others", ctx->rank, rounds);
            ddp__log(ctx, DDP_LOG_INFO, msg);
        }
    }
    ddp__join_reset(ctx);
    ctx->acc_state = DDP__ACC_LOCAL;
    ctx->accum_steps = 0;
    ctx->mixed_shown = 0;
    ctx->zero_pending = 1;
    return DDP_SUCCESS;
}

/* ---- optimizers ------------------------------------------------------------------------ */

typedef struct ddp__hyper ddp__hyper;
static ddp_result ddp__cuda_optimizer_step(ddp_context *ctx, const ddp__hyper *h);
static ddp_result ddp__cuda_sumsq(ddp_context *ctx, double *out);
static ddp_result ddp__cuda_nonfinite(ddp_context *ctx, int *found);
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
        size_t i, lo, hi;
        float *master;
        if (bk->dtype != DDP_F16 && bk->dtype != DDP_BF16) continue;
        ddp__own_range(ctx, b, &lo, &hi);
        master = (float *)ddp__state_el(ctx, ctx->opt_master, b, lo);
        for (i = lo; i < hi; i++) master[i - lo] = (float)ddp__load_elem(ctx->flat_params + bk->offset, i, bk->dtype);
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
            return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory for %" DDP__PRIzu " bytes of optimizer state", ctx->opt_state_bytes);
        if (k == 2) DDP__TRY(ddp__init_master(ctx));
    }
    return DDP_SUCCESS;
}

static ddp_result ddp__state_zero(ddp_context *ctx, void *p) {
    if (ddp__on_gpu(ctx)) return ddp__cuda_zero(ctx, p, ctx->opt_state_bytes);
    memset(p, 0, ctx->opt_state_bytes);
    return DDP_SUCCESS;
}

#define DDP__PI 3.14159265358979323846

/* The lr of step t (SCHEDULES), in double. */
static double ddp__schedule_lr(const ddp_schedule_desc *d, double lr, int64_t t) {
    if (t < d->warmup_steps) return lr * (double)(t + 1) / (double)d->warmup_steps;
    switch (d->type) {
    case DDP_SCHEDULE_COSINE:
    case DDP_SCHEDULE_LINEAR: {
        double p, f;
        if (t >= d->total_steps) return d->min_lr;
        p = (double)(t - d->warmup_steps) / (double)(d->total_steps - d->warmup_steps);
        f = d->type == DDP_SCHEDULE_COSINE ? 0.5 * (1.0 + cos(DDP__PI * p)) : 1.0 - p;
        return d->min_lr + (lr - d->min_lr) * f;
    }
    case DDP_SCHEDULE_STEP:
        return lr * pow(d->gamma, (double)((t - d->warmup_steps) / d->step_size));
    default:
        return lr;
    }
}

DDP_API double ddp_get_lr(const ddp_context *ctx) {
    return ctx ? ddp__schedule_lr(&ctx->cfg.schedule, ctx->cfg.optimizer.lr, ctx->sched_steps) : 0.0;
}

/* One step's hyper-parameters for one parameter group, in double as
   PyTorch computes its Python-float scalars; the f32 and 16-bit paths
   round each to float once, as PyTorch does when it applies a Python
   float to a float tensor. */
struct ddp__hyper {
    int     adamw;
    int64_t t;           /* the step being taken, 1-based */
    double  lr, wd;      /* the group's lr and weight decay */
    double  momentum, dampening, beta1, beta2, eps;
    int     nesterov;
    double  gs;          /* gradient multiplier for f64 (unscale x clip) */
    float   gs32;        /* the same for f32 and 16-bit gradients */
};

static int ddp__finite(double x) { return x == x && x - x == 0; }

/* PyTorch's SGD on f32: d = g (+ wd * p); buf = d on the first step, else
   momentum * buf + (1 - dampening) * d; d = nesterov ? d + momentum * buf
   : buf; p -= lr * d. */
static void ddp__sgd_f32(float *p, const float *g, float *buf, size_t n, const ddp__hyper *h) {
    float lr = (float)h->lr, wd = (float)h->wd, mom = (float)h->momentum, omd = (float)(1.0 - h->dampening), gs = h->gs32;
    int first = h->t == 1;
    size_t i;
    if (mom != 0 && wd == 0 && gs == 1.0f && omd == 1.0f && !h->nesterov) {
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
        if (wd == 0) for (i = 0; i < n; i++) p[i] -= lr * (g[i] * gs);
        else for (i = 0; i < n; i++) p[i] -= lr * (g[i] * gs + wd * p[i]);
        return;
    }
    for (i = 0; i < n; i++) {
        float d = g[i] * gs, b;
        if (wd != 0) d = d + wd * p[i];
        b = first ? d : mom * buf[i] + omd * d;
        buf[i] = b;
        p[i] -= lr * (h->nesterov ? d + mom * b : b);
    }
}

/* PyTorch's AdamW on f32 (torch.optim.AdamW, single-tensor path):
   p *= 1 - lr * wd; m = b1 * m + (1 - b1) * g; v = b2 * v + (1 - b2) * g * g;
   p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps). */
static void ddp__adamw_f32(float *p, const float *g, float *m, float *v, size_t n, const ddp__hyper *h) {
    double bc1 = 1.0 - pow(h->beta1, (double)h->t), bc2 = 1.0 - pow(h->beta2, (double)h->t);
    float b1 = (float)h->beta1, omb1 = (float)(1.0 - h->beta1), b2 = (float)h->beta2, omb2 = (float)(1.0 - h->beta2);
    float step = (float)(h->lr / bc1), bc2s = (float)sqrt(bc2), eps = (float)h->eps;
    float decay = (float)(1.0 - h->lr * h->wd), gs = h->gs32;
    size_t i;
    for (i = 0; i < n; i++) {
        float gi = g[i] * gs;
        float mi = b1 * m[i] + omb1 * gi;
        float vi = b2 * v[i] + omb2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay - step * mi / (sqrtf(vi) / bc2s + eps);
    }
}

/* f64, f16 and bf16: the same steps in double (f64: exactly PyTorch's f64
   arithmetic), with f32 master weights for the 16-bit types. Elements
   [lo, hi) of bucket b. */
static void ddp__opt_generic(ddp_context *ctx, int b, size_t lo, size_t hi, const ddp__hyper *h) {
    const ddp__bucket *bk = &ctx->buckets[b];
    int wide = bk->dtype == DDP_F64, half = bk->dtype == DDP_F16 || bk->dtype == DDP_BF16;
    unsigned char *pp = ctx->flat_params + bk->offset, *gp = ctx->flat_grads + bk->offset;
    /* the state arrays from element lo on: index j = i - lo */
    void *m = ddp__state_el(ctx, ctx->opt_m, b, lo);
    void *v = ddp__state_el(ctx, ctx->opt_v, b, lo);
    float *master = half ? (float *)ddp__state_el(ctx, ctx->opt_master, b, lo) : NULL;
    double bc1 = 1.0 - pow(h->beta1, (double)h->t), bc2s = sqrt(1.0 - pow(h->beta2, (double)h->t));
    double step = h->lr / bc1, decay = 1.0 - h->lr * h->wd, gs = wide ? h->gs : (double)h->gs32;
    size_t i, j;
    for (i = lo, j = 0; i < hi; i++, j++) {
        double p = half ? master[j] : ddp__load_elem(pp, i, bk->dtype);
        double g = ddp__load_elem(gp, i, bk->dtype) * gs;
        if (!h->adamw) {
            double d = g;
            if (h->wd != 0) d = d + h->wd * p;
            if (h->momentum != 0) {
                double bb = h->t == 1 ? d : h->momentum * ddp__sload(m, j, wide) + (1.0 - h->dampening) * d;
                ddp__sstore(m, j, wide, bb);
                d = h->nesterov ? d + h->momentum * bb : bb;
            }
            p = p - h->lr * d;
        } else {
            double mi = h->beta1 * ddp__sload(m, j, wide) + (1.0 - h->beta1) * g;
            double vi = h->beta2 * ddp__sload(v, j, wide) + (1.0 - h->beta2) * g * g;
            ddp__sstore(m, j, wide, mi);
            ddp__sstore(v, j, wide, vi);
            p = p * decay;
            p = p - step * mi / (sqrt(vi) / bc2s + h->eps);
        }
        if (half) master[j] = (float)p;
        ddp__store_elem(pp, i, bk->dtype, p);
    }
}

/* One run of elements [lo, hi) of bucket b, all in one parameter group. */
static void ddp__opt_run(ddp_context *ctx, int b, size_t lo, size_t hi, const ddp__hyper *h) {
    const ddp__bucket *bk = &ctx->buckets[b];
    if (bk->dtype == DDP_F32) {
        float *p = (float *)(ctx->flat_params + bk->offset) + lo, *g = (float *)(ctx->flat_grads + bk->offset) + lo;
        float *m = (float *)ddp__state_el(ctx, ctx->opt_m, b, lo);
        float *v = (float *)ddp__state_el(ctx, ctx->opt_v, b, lo);
        if (h->adamw) ddp__adamw_f32(p, g, m, v, hi - lo, h);
        else ddp__sgd_f32(p, g, m, hi - lo, h);
    } else {
        ddp__opt_generic(ctx, b, lo, hi, h);
    }
}

/* The optimizer over elements [lo, hi) of bucket b (a ZeRO-style shard runs
   it over its slice): runs of equal parameter group, each with the group's
   lr and weight decay. The group of element i of bucket b is
   group_map[(bucket offset + i * element size) / DDP__ALIGN]. */
static void ddp__opt_range(ddp_context *ctx, int b, size_t lo, size_t hi, const ddp__hyper *base) {
    const ddp__bucket *bk = &ctx->buckets[b];
    size_t es = ddp_dtype_size(bk->dtype), per = DDP__ALIGN / es, first = bk->offset / es, i = lo;
    if (ctx->num_groups == 1) {
        ddp__hyper h = *base;
        h.lr = base->lr * ctx->group_lr[0];
        h.wd = base->wd * ctx->group_wd[0];
        if (hi > lo) ddp__opt_run(ctx, b, lo, hi, &h);
        return;
    }
    while (i < hi) {
        int g = ctx->group_map[(first + i) / per];
        size_t j = ((first + i) / per + 1) * per - first;
        ddp__hyper h = *base;
        while (j < hi && ctx->group_map[(first + j) / per] == g) j += per;
        if (j > hi) j = hi;
        h.lr = base->lr * ctx->group_lr[g];
        h.wd = base->wd * ctx->group_wd[g];
        ddp__opt_run(ctx, b, i, j, &h);
        i = j;
    }
}

/* Squared L2 norm of elements [lo, hi) of a gradient span, in double. */
static double ddp__sumsq_range(const unsigned char *g, ddp_dtype t, size_t lo, size_t hi) {
    double s = 0;
    size_t i;
    if (t == DDP_F32) {
        const float *f = (const float *)g;
        for (i = lo; i < hi; i++) s += (double)f[i] * (double)f[i];
    } else {
        for (i = lo; i < hi; i++) { double x = ddp__load_elem(g, i, t); s += x * x; }
    }
    return s;
}

/* 1 if an element of [lo, hi) is NaN or infinite (its exponent all ones). */
static int ddp__nonfinite_range(const unsigned char *g, ddp_dtype t, size_t lo, size_t hi) {
    int bad = 0;
    size_t i;
    if (t == DDP_F32) {
        for (i = lo; i < hi; i++) { uint32_t u; memcpy(&u, g + 4 * i, 4); bad |= (u & 0x7f800000u) == 0x7f800000u; }
    } else if (t == DDP_F64) {
        for (i = lo; i < hi; i++) { uint64_t u; memcpy(&u, g + 8 * i, 8); bad |= (u & 0x7ff0000000000000ull) == 0x7ff0000000000000ull; }
    } else {
        uint16_t e = t == DDP_F16 ? 0x7c00u : 0x7f80u;
        for (i = lo; i < hi; i++) { uint16_t u; memcpy(&u, g + 2 * i, 2); bad |= (u & e) == e; }
    }
    return bad;
}

static ddp_result ddp__cuda_range_stats(ddp_context *ctx, int b, size_t lo, size_t hi, int want_norm, int want_flag,
                                        double *sumsq, int *bad);

/* The squared L2 norm of the reduced gradients (*sumsq) and whether any is
   NaN or infinite (*found), the same bits on every rank and with or
   without ZeRO-1. The canonical order: rank q's part sums its shard
   (ddp__shard_of) of every storage bucket, bucket by bucket, and the parts
   add in rank order. Without ZeRO-1 every rank holds every reduced
   gradient and computes every part; with it each rank computes its own,
   and one small all-reduce (world + 1 doubles: each part in its own slot,
   the rest zeros, so the sum is exact) brings the others and the flag. A
   non-finite value anywhere reaches every rank's answer either way. The
   GPU without ZeRO-1 keeps its own order (one sum per bucket). */
static ddp_result ddp__grad_stats(ddp_context *ctx, int want_norm, int want_flag, double *sumsq, int *found) {
    int W = ctx->world, q, q0, q1, b, bad = 0;
    double *part, total = 0;
    ddp_result r = DDP_SUCCESS;
    *sumsq = 0;
    *found = 0;
    if (ddp__on_gpu(ctx) && !ctx->zero) {
        if (want_flag) DDP__TRY(ddp__cuda_nonfinite(ctx, found));
        if (want_norm) DDP__TRY(ddp__cuda_sumsq(ctx, sumsq));
        return DDP_SUCCESS;
    }
    part = (double *)ddp__calloc(ctx, (size_t)(W + 1) * sizeof(double));
    if (!part) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory for the gradient norm");
    q0 = ctx->zero ? ctx->rank : 0;
    q1 = ctx->zero ? ctx->rank + 1 : W;
    for (q = q0; q < q1 && r == DDP_SUCCESS; q++) {
        double s = 0;
        for (b = 0; b < ctx->num_buckets && r == DDP_SUCCESS; b++) {
            const ddp__bucket *bk = &ctx->buckets[b];
            size_t lo, hi;
            ddp__shard_of(ctx, b, q, &lo, &hi);
            if (ddp__on_gpu(ctx)) {
                double part_b = 0;
                int bad_b = 0;
                r = ddp__cuda_range_stats(ctx, b, lo, hi, want_norm, want_flag, &part_b, &bad_b);
                s += part_b;
                bad |= bad_b;
                continue;
            }
            if (want_norm) s += ddp__sumsq_range(ctx->flat_grads + bk->offset, bk->dtype, lo, hi);
            if (want_flag && !bad) bad = ddp__nonfinite_range(ctx->flat_grads + bk->offset, bk->dtype, lo, hi);
        }
        part[q] = s;
    }
    if (r == DDP_SUCCESS && ctx->zero && W > 1) {
        part[W] = bad;
        r = ddp__fp_check(ctx, DDP__FP_ALLREDUCE, "ZeRO-1 gradient norm", (uint64_t)W + 1, DDP_F64, (int)DDP_OP_SUM, -1);
        if (r == DDP_SUCCESS) r = ctx->ops->allreduce(ctx, part, (size_t)W + 1, DDP_F64, DDP_OP_SUM);
        if (r != DDP_SUCCESS) r = ddp__break(ctx, r);
        bad = part[W] != 0;
    }
    for (q = 0; q < W; q++) total += part[q];
    ddp__free(ctx, part);
    *sumsq = total;
    *found = bad;
    return r;
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

/* torch.nn.utils.clip_grad_norm_'s factor min(1, max_norm / (norm + 1e-6)):
   in double for f64 gradients, in float for the others (PyTorch computes it
   in the gradients' type). 1 when max_norm <= 0 or the norm is not finite. */
static void ddp__clip_coef(double max_norm, double norm, double *c64, float *c32) {
    *c64 = 1.0;
    *c32 = 1.0f;
    if (!(max_norm > 0) || !ddp__finite(norm)) return;
    {
        double c = max_norm / (norm + 1e-6);
        float cf = (float)max_norm / ((float)norm + 1e-6f);
        if (c < 1.0) *c64 = c;
        if (cf < 1.0f) *c32 = cf;
    }
}

/* Multiply every gradient of this rank's ranges (ZeRO-1: its shards) by
   c64 (f64 buckets) or c32 (the others). */
static ddp_result ddp__scale_grads(ddp_context *ctx, double c64, float c32) {
    int b;
    if (ddp__on_gpu(ctx)) return ddp__cuda_scale_grads(ctx, c32);
    for (b = 0; b < ctx->num_buckets; b++) {
        const ddp__bucket *bk = &ctx->buckets[b];
        size_t lo, hi, es = ddp_dtype_size(bk->dtype);
        void *g;
        double c = bk->dtype == DDP_F64 ? c64 : (double)c32;
        ddp__own_range(ctx, b, &lo, &hi);
        g = ctx->flat_grads + bk->offset + lo * es;
        if (c != 1.0 && hi > lo) ddp__reduce(&g, 1, &g, 1, hi - lo, bk->dtype, DDP_OP_SUM, c);
    }
    return DDP_SUCCESS;
}

/* GradScaler.update(): back off after a non-finite step, grow after
   growth_interval clean ones; the scale stays a float value. */
static void ddp__loss_scale_update(ddp_context *ctx, int found_inf) {
    const ddp_loss_scale_desc *l = &ctx->cfg.loss_scale;
    if (found_inf) {
        ctx->ls_scale = (double)(float)(ctx->ls_scale * l->backoff_factor);
        ctx->ls_tracker = 0;
    } else if (++ctx->ls_tracker >= l->growth_interval) {
        double grown = (double)(float)(ctx->ls_scale * l->growth_factor);
        if (ddp__finite(grown)) ctx->ls_scale = grown;
        ctx->ls_tracker = 0;
    }
}

DDP_API ddp_result ddp_clip_grad_norm(ddp_context *ctx, double max_norm, double *out_norm) {
    double ss = 0, norm, c64;
    float c32;
    int found;
    DDP__TRY(ddp__opt_ready(ctx, "ddp_clip_grad_norm"));
    if (!(max_norm == max_norm)) return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_clip_grad_norm: max_norm is NaN");
    DDP__TRY(ddp__grad_stats(ctx, 1, 0, &ss, &found));
    norm = sqrt(ss) * (1.0 / ctx->ls_scale); /* the norm of the unscaled gradients */
    if (out_norm) *out_norm = norm;
    ddp__clip_coef(max_norm, norm, &c64, &c32);
    if (c64 == 1.0 && c32 == 1.0f) return DDP_SUCCESS;
    return ddp__scale_grads(ctx, c64, c32);
}

/* ---- ZeRO-1: the parameter all-gather ----

   After the sharded update each rank holds its own shards of the new
   parameters (ddp__shard_of of every storage bucket) and the old values
   elsewhere. shm: each rank writes its shards once into the exchange
   region (one flat buffer after the world's gradients in the gradient
   segment) and copies everybody else's from there, one collective for the
   whole model; the exchange is written again only after every rank
   finished reading it (the done counters). */

/* Before writing the exchange region. */
static ddp_result ddp__xchg_claim(ddp_context *ctx) {
    if (ctx->shm.xchg_last == 0) return DDP_SUCCESS;
    return ddp__shm_wait(ctx, 2, ctx->shm.xchg_last, -1, "the peers to read the last parameter exchange (ZeRO-1)");
}

/* This rank's shards are in the exchange region: wait for everybody's. */
static ddp_result ddp__xchg_publish(ddp_context *ctx, uint64_t *seq) {
    *seq = ++ctx->shm.seq;
    ddp__set_counter(ctx, 0, *seq);
    return ddp__shm_wait(ctx, 0, *seq, -1, "the parameter all-gather (ZeRO-1)");
}

/* The others' shards are read. */
static void ddp__xchg_release(ddp_context *ctx, uint64_t seq) {
    ddp__set_counter(ctx, 1, seq);
    ddp__set_counter(ctx, 2, seq);
    ctx->shm.xchg_last = seq;
}

/* Copy rank q's shards of every storage bucket from src to dst (host). */
static void ddp__copy_shards(ddp_context *ctx, unsigned char *dst, const unsigned char *src, int q) {
    int b;
    for (b = 0; b < ctx->num_buckets; b++) {
        const ddp__bucket *bk = &ctx->buckets[b];
        size_t lo, hi, es = ddp_dtype_size(bk->dtype);
        ddp__shard_of(ctx, b, q, &lo, &hi);
        if (hi > lo) memcpy(dst + bk->offset + lo * es, src + bk->offset + lo * es, (hi - lo) * es);
    }
}

static ddp_result ddp__cuda_param_gather(ddp_context *ctx);

static ddp_result ddp__param_gather(ddp_context *ctx) {
    uint64_t seq;
    int q;
    if (ctx->world == 1) return DDP_SUCCESS;
    DDP__TRY(ddp__fp_check(ctx, DDP__FP_GATHER, "ZeRO-1 parameters", ctx->flat_bytes, (ddp_dtype)-1, 0, -1));
    if (ddp__on_gpu(ctx)) return ddp__cuda_param_gather(ctx);
    DDP__TRY(ddp__xchg_claim(ctx));
    ddp__copy_shards(ctx, ctx->shm.xchg, ctx->flat_params, ctx->rank);
    DDP__TRY(ddp__xchg_publish(ctx, &seq));
    for (q = 0; q < ctx->world; q++)
        if (q != ctx->rank) ddp__copy_shards(ctx, ctx->flat_params, ctx->shm.xchg, q);
    ddp__xchg_release(ctx, seq);
    return DDP_SUCCESS;
}

/* The step: with loss scaling, skip it (and back off) when a gradient is
   not finite, else unscale; clip on the unscaled norm; update with the
   scheduled lr, unscale and clip factors folded into one gradient
   multiplier (PyTorch multiplies twice; with a power-of-two scale the bits
   are the same). */
static ddp_result ddp__optimizer_step(ddp_context *ctx) {
    const ddp_optimizer_desc *o;
    ddp__hyper h;
    double c64 = 1.0, inv64 = 1.0, ss = 0;
    float c32 = 1.0f, inv32 = 1.0f;
    int b, scaling;
    ddp_result r;
    DDP__TRY(ddp__opt_ready(ctx, "ddp_optimizer_step"));
    o = &ctx->cfg.optimizer;
    if (o->type == DDP_OPTIM_NONE)
        return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_optimizer_step: config.optimizer.type is DDP_OPTIM_NONE");
    scaling = ctx->cfg.loss_scale.enabled;
    ctx->ls_last_skipped = 0;
    if (scaling || o->max_grad_norm > 0) {
        /* one pass (with ZeRO-1 one small all-reduce) for both */
        int found = 0;
        DDP__TRY(ddp__grad_stats(ctx, o->max_grad_norm > 0, scaling, &ss, &found));
        if (scaling && found) {
            char msg[128];
            snprintf(msg, sizeof msg, "step %lld skipped: non-finite gradients at loss scale %g", (long long)ctx->sched_steps, ctx->ls_scale);
            ddp__log(ctx, DDP_LOG_INFO, msg);
            ddp__loss_scale_update(ctx, 1);
            ctx->ls_skipped++;
            ctx->ls_last_skipped = 1;
            ctx->sched_steps++;
            ctx->zero_pending = 1;
            return DDP_SUCCESS;
        }
        if (scaling) {
            inv64 = 1.0 / ctx->ls_scale;
            inv32 = (float)inv64; /* GradScaler: the reciprocal in double, rounded to float */
        }
        if (o->max_grad_norm > 0) ddp__clip_coef(o->max_grad_norm, sqrt(ss) * inv64, &c64, &c32);
    }
    DDP__TRY(ddp__opt_alloc(ctx));
    ctx->opt_steps++;
    memset(&h, 0, sizeof h);
    h.adamw = o->type == DDP_OPTIM_ADAMW;
    h.t = ctx->opt_steps;
    h.lr = ddp__schedule_lr(&ctx->cfg.schedule, o->lr, ctx->sched_steps);
    h.wd = o->weight_decay;
    h.momentum = o->momentum;
    h.dampening = o->dampening;
    h.nesterov = o->nesterov;
    h.beta1 = o->beta1;
    h.beta2 = o->beta2;
    h.eps = o->eps;
    h.gs = inv64 * c64;
    h.gs32 = inv32 * c32;
    if (ddp__on_gpu(ctx)) DDP__TRY(ddp__cuda_optimizer_step(ctx, &h));
    else for (b = 0; b < ctx->num_buckets; b++) { size_t lo, hi; ddp__own_range(ctx, b, &lo, &hi); ddp__opt_range(ctx, b, lo, hi, &h); }
    if (ctx->zero && ctx->world > 1) {
        /* every rank updated its shards: all-gather the parameters */
        double t0 = ddp__now();
        r = ddp__param_gather(ctx);
        if (r != DDP_SUCCESS) return ddp__break(ctx, r);
        ddp__trace_ev(ctx, DDP__EV_GATHER, t0, ddp__now() - t0, 0, 0, ctx->flat_bytes);
    }
    if (scaling) ddp__loss_scale_update(ctx, 0);
    ctx->sched_steps++;
    ctx->zero_pending = 1; /* the accumulation ends here */
    return DDP_SUCCESS;
}

DDP_API ddp_result ddp_optimizer_step(ddp_context *ctx) {
    double t0 = ddp__now(), dt;
    ddp_result r;
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    r = ddp__optimizer_step(ctx);
    if (r != DDP_SUCCESS) return r;
    dt = ddp__now() - t0;
    ctx->st_last.optimizer_s += dt;
    ctx->st_total.optimizer_s += dt;
    ddp__trace_ev(ctx, DDP__EV_OPT, t0, dt, ctx->ls_last_skipped ? 0 : (int)ctx->opt_steps, 0, ctx->flat_bytes);
    return DDP_SUCCESS;
}

DDP_API int64_t ddp_skipped_steps(const ddp_context *ctx) { return ctx ? ctx->ls_skipped : 0; }
DDP_API int ddp_last_step_skipped(const ddp_context *ctx) { return ctx ? ctx->ls_last_skipped : 0; }
DDP_API double ddp_loss_scale(const ddp_context *ctx) { return ctx ? ctx->ls_scale : 1.0; }
DDP_API size_t ddp_optimizer_state_bytes(const ddp_context *ctx) {
    if (!ctx) return 0;
    return ((ctx->opt_m ? 1u : 0u) + (ctx->opt_v ? 1u : 0u) + (ctx->opt_master ? 1u : 0u)) * ctx->opt_state_bytes;
}

DDP_API ddp_result ddp_set_lr(ddp_context *ctx, double lr) {
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    if (!ddp__in_range(lr, 0.0, HUGE_VAL, 0)) return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_set_lr: lr %g must be finite and >= 0", lr);
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
    ctx->acc_state = DDP__ACC_LOCAL;
    ctx->accum_steps = 0;
    ctx->zero_pending = 0;
    ctx->mixed_shown = 0;
    return DDP_SUCCESS;
}

DDP_API int64_t ddp_optimizer_steps(const ddp_context *ctx) { return ctx ? ctx->opt_steps : 0; }

/* ---- the step wrapper ------------------------------------------------------------------ */

/* The micro-steps of ddp_train_step: all but the last without sync. */
static ddp_result ddp__train_micro_steps(ddp_context *ctx, ddp_forward_backward_fn fn, void *user,
                                         int micro_steps, double *loss_sum) {
    int m;
    for (m = 0; m < micro_steps; m++) {
        float loss = 0;
        int rc;
        DDP__TRY(ddp_set_no_sync(ctx, m < micro_steps - 1));
        DDP__TRY(ddp_step_begin(ctx));
        rc = fn(ctx, user, m, &loss);
        if (rc != 0) {
            char keep[DDP__ERRLEN];
            ctx->in_step = 0;
            ddp__fail(ctx, DDP_ERROR_USER, "ddp_train_step: your forward/backward returned %d in micro-step %d on rank %d", rc, m, ctx->rank);
            ddp__break(ctx, DDP_ERROR_USER);
            memcpy(keep, ctx->err, sizeof keep);
            ddp__drain(ctx);
            memcpy(ctx->err, keep, sizeof keep);
            return DDP_ERROR_USER;
        }
        DDP__TRY(ddp_step_end(ctx));
        *loss_sum += loss;
    }
    return DDP_SUCCESS;
}

DDP_API ddp_result ddp_train_step(ddp_context *ctx, ddp_forward_backward_fn fn, void *user,
                                  int micro_steps, float *out_loss) {
    double loss_sum = 0;
    float loss;
    ddp_result r;
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    DDP__TRY(ddp__check_usable(ctx, "ddp_train_step"));
    if (!fn) return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_train_step: fn is NULL");
    if (micro_steps < 0) return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_train_step: micro_steps %d is negative", micro_steps);
    if (micro_steps == 0) micro_steps = 1;
    if (ctx->accum_steps > 0)
        return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_train_step: %d micro-step(s) run with ddp_set_no_sync(ctx, 1) are not reduced yet "
                         "(end them with a synced step first)", ctx->accum_steps);
    if (ctx->cfg.uneven_inputs && micro_steps > DDP__JOIN_MAX_MICRO)
        return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_train_step: micro_steps %d is above %d, the limit with config.uneven_inputs",
                         micro_steps, DDP__JOIN_MAX_MICRO);
    /* the reduce of this window divides by micro_steps: PyTorch's loss / micro_steps */
    ctx->window_div = (double)micro_steps;
    ctx->in_train_step = 1;
    r = ddp__train_micro_steps(ctx, fn, user, micro_steps, &loss_sum);
    ctx->window_div = 1.0;
    ctx->in_train_step = 0;
    if (r != DDP_SUCCESS) return r;
    loss = (float)(loss_sum / micro_steps);
    if (ctx->world > 1 && ctx->cfg.uneven_inputs) {
        /* the mean over the ranks that had data (a joined rank adds 0, 0) */
        float pair[2];
        pair[0] = loss;
        pair[1] = 1.0f;
        r = ddp__fp_check(ctx, DDP__FP_ALLREDUCE, "ddp_train_step loss", 2, DDP_F32, (int)DDP_OP_SUM, -1);
        if (r == DDP_SUCCESS) r = ctx->ops->allreduce(ctx, pair, 2, DDP_F32, DDP_OP_SUM);
        if (r != DDP_SUCCESS) return ddp__break(ctx, r);
        loss = pair[0] / pair[1];
    } else if (ctx->world > 1) {
        DDP__TRY(ddp_allreduce(ctx, &loss, 1, DDP_F32, DDP_OP_AVG));
    }
    if (out_loss) *out_loss = loss;
    if (ctx->cfg.optimizer.type != DDP_OPTIM_NONE) DDP__TRY(ddp_optimizer_step(ctx));
    return DDP_SUCCESS;
}

/* ---- checkpoints ------------------------------------------------------------------------

   Layout, version 2 (little-endian host order):
     "DDPCKPT1" u32 version u32 nparams u32 optimizer u32 flags i64 steps
     i64 sched_steps f64 lr
     u32 schedule i64 warmup_steps i64 total_steps f64 min_lr i64 step_size f64 gamma
     u32 loss_scaling f64 loss_scale i64 growth_tracker i64 skipped
     per parameter: u32 namelen, name, u32 dtype, u64 numel, u32 ndim, i64 shape[ndim],
                    f64 lr_scale, f64 weight_decay_scale
     per parameter: data (numel * dtype size)
     per parameter, when present: momentum/m, v, master (numel * state size each)
     u64 FNV-1a hash of everything before it
   flags: bit 0 m, bit 1 v, bit 2 master. Version 1 (read, not written) has
   neither the second to fourth lines nor the two scales. */

#define DDP__CKPT_VERSION 2
#define DDP__MAX_STEPS ((int64_t)1 << 53)  /* step counters stay exact in double (pow(beta, t)) */

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
    if (!*tmp) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory copying %" DDP__PRIzu " bytes from the GPU", bytes);
    *view = *tmp;
    return ddp__cuda_memcpy(ctx, *tmp, src, bytes, 0);
}

/* Parameter id's state in this rank's state array base (the whole
   parameter lies in this rank's range unless ZeRO-1 shards it). */
static void *ddp__state_ptr(ddp_context *ctx, void *base, int id) {
    const ddp__param *p = &ctx->params[id];
    const ddp__bucket *bk = &ctx->buckets[p->bucket];
    return ddp__state_el(ctx, base, p->bucket, (p->offset - bk->offset) / ddp_dtype_size(p->dtype));
}

/* ZeRO-1 checkpoints hold the full state, as an unsharded run writes it.
   The full layout: storage bucket after storage bucket, unpadded. */
static size_t ddp__full_state_off(const ddp_context *ctx, int b) {
    size_t off = 0;
    int i;
    for (i = 0; i < b; i++) off += ctx->buckets[i].numel * ddp__state_elem(ctx->buckets[i].dtype);
    return off;
}

/* Rank q's state layout (what ddp__alloc_host_state gives rank q): the
   offset of each storage bucket's shard; returns the array's bytes. */
static size_t ddp__shard_layout(const ddp_context *ctx, int q, size_t *off) {
    size_t at = 0, lo, hi;
    int b;
    for (b = 0; b < ctx->num_buckets; b++) {
        ddp__shard_of(ctx, b, q, &lo, &hi);
        if (off) off[b] = at;
        at += ddp__align_up((hi - lo) * ddp__state_elem(ctx->buckets[b].dtype), DDP__ALIGN);
    }
    return at;
}

/* ZeRO-1, before a checkpoint: every rank's shard of each state array
   reaches rank 0 (one broadcast per rank and array), which assembles the
   full state in ctx->ck_full[k]. Every rank calls it. */
static ddp_result ddp__gather_state(ddp_context *ctx) {
    size_t *off = (size_t *)ddp__alloc(ctx, (size_t)ctx->num_buckets * sizeof(size_t)), most = 0, full_bytes;
    unsigned char *scratch = NULL;
    ddp_result r = DDP_SUCCESS;
    int q, k, b;
    if (!off) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory gathering the optimizer state");
    for (q = 0; q < ctx->world; q++) { size_t n = ddp__shard_layout(ctx, q, NULL); if (n > most) most = n; }
    full_bytes = ddp__full_state_off(ctx, ctx->num_buckets);
    scratch = (unsigned char *)ddp__alloc(ctx, most ? most : 1);
    if (!scratch) r = ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory gathering the optimizer state");
    for (k = 0; k < 3 && r == DDP_SUCCESS; k++) {
        void *mine = *ddp__state_slot(ctx, k);
        if (!mine) continue;
        if (ctx->rank == 0 && !(ctx->ck_full[k] = (unsigned char *)ddp__calloc(ctx, full_bytes))) {
            r = ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory for %" DDP__PRIzu " bytes of gathered optimizer state", full_bytes);
            break;
        }
        for (q = 0; q < ctx->world && r == DDP_SUCCESS; q++) {
            size_t n = ddp__shard_layout(ctx, q, off);
            /* the owner sends from its state array (host or device), the others receive on the host */
            r = ddp__fp_check(ctx, DDP__FP_BROADCAST, "checkpoint: state gather", n, (ddp_dtype)-1, q, -1);
            if (r == DDP_SUCCESS) r = ctx->ops->broadcast(ctx, q == ctx->rank ? mine : (void *)scratch, n, q);
            if (r != DDP_SUCCESS || ctx->rank != 0) continue;
            if (q == 0 && ddp__on_gpu(ctx)) r = ddp__cuda_memcpy(ctx, scratch, mine, n, 0);
            for (b = 0; b < ctx->num_buckets && r == DDP_SUCCESS; b++) {
                size_t lo, hi, el = ddp__state_elem(ctx->buckets[b].dtype);
                const unsigned char *src = q == 0 && !ddp__on_gpu(ctx) ? (const unsigned char *)mine : scratch;
                ddp__shard_of(ctx, b, q, &lo, &hi);
                if (hi > lo) memcpy(ctx->ck_full[k] + ddp__full_state_off(ctx, b) + lo * el, src + off[b], (hi - lo) * el);
            }
        }
    }
    ddp__free(ctx, off);
    ddp__free(ctx, scratch);
    return r;
}

static void ddp__free_gathered(ddp_context *ctx) {
    int k;
    for (k = 0; k < 3; k++) { ddp__free(ctx, ctx->ck_full[k]); ctx->ck_full[k] = NULL; }
}

static ddp_result ddp__ck_write_block(ddp_context *ctx, ddp__ckfile *c, const void *src, size_t bytes) {
    void *tmp = NULL;
    const void *view = NULL;
    DDP__TRY(ddp__host_view(ctx, src, bytes, &tmp, &view));
    ddp__ck_write(c, view, bytes);
    ddp__free(ctx, tmp);
    return DDP_SUCCESS;
}

static void ddp__ck_u32(ddp__ckfile *c, uint32_t v) { ddp__ck_write(c, &v, 4); }
static void ddp__ck_i64(ddp__ckfile *c, int64_t v) { ddp__ck_write(c, &v, 8); }
static void ddp__ck_f64(ddp__ckfile *c, double v) { ddp__ck_write(c, &v, 8); }

/* Everything of the file but the temporary-file handling. */
static ddp_result ddp__ck_write_content(ddp_context *ctx, ddp__ckfile *c) {
    const ddp_schedule_desc *sd = &ctx->cfg.schedule;
    void *bases[3];
    int i, k;
    ddp_result r = DDP_SUCCESS;
    ddp__ck_write(c, DDP__CKPT_MAGIC, 8);
    ddp__ck_u32(c, DDP__CKPT_VERSION);
    ddp__ck_u32(c, (uint32_t)ctx->num_params);
    ddp__ck_u32(c, (uint32_t)ctx->cfg.optimizer.type);
    ddp__ck_u32(c, ddp__state_flags(ctx));
    ddp__ck_i64(c, ctx->opt_steps);
    ddp__ck_i64(c, ctx->sched_steps);
    ddp__ck_f64(c, ctx->cfg.optimizer.lr);
    ddp__ck_u32(c, (uint32_t)sd->type);
    ddp__ck_i64(c, sd->warmup_steps);
    ddp__ck_i64(c, sd->total_steps);
    ddp__ck_f64(c, sd->min_lr);
    ddp__ck_i64(c, sd->step_size);
    ddp__ck_f64(c, sd->gamma);
    ddp__ck_u32(c, ctx->cfg.loss_scale.enabled ? 1u : 0u);
    ddp__ck_f64(c, ctx->ls_scale);
    ddp__ck_i64(c, ctx->ls_tracker);
    ddp__ck_i64(c, ctx->ls_skipped);
    for (i = 0; i < ctx->num_params; i++) {
        const ddp__param *p = &ctx->params[i];
        uint32_t len = (uint32_t)strlen(p->name);
        uint64_t numel = p->numel;
        ddp__ck_u32(c, len);
        ddp__ck_write(c, p->name, len);
        ddp__ck_u32(c, (uint32_t)p->dtype);
        ddp__ck_write(c, &numel, 8);
        ddp__ck_u32(c, (uint32_t)p->ndim);
        ddp__ck_write(c, p->shape, (size_t)p->ndim * 8);
        ddp__ck_f64(c, p->lr_scale);
        ddp__ck_f64(c, p->wd_scale);
    }
    for (i = 0; i < ctx->num_params && r == DDP_SUCCESS; i++)
        r = ddp__ck_write_block(ctx, c, ctx->flat_params + ctx->params[i].offset,
                                ctx->params[i].numel * ddp_dtype_size(ctx->params[i].dtype));
    bases[0] = ctx->opt_m; bases[1] = ctx->opt_v; bases[2] = ctx->opt_master;
    for (k = 0; k < 3 && r == DDP_SUCCESS; k++) {
        if (!bases[k]) continue;
        for (i = 0; i < ctx->num_params && r == DDP_SUCCESS; i++) {
            const ddp__param *p = &ctx->params[i];
            size_t bytes = p->numel * ddp__state_elem(p->dtype);
            if (ctx->ck_full[k]) /* ZeRO-1: the gathered full state, on the host */
                ddp__ck_write(c, ctx->ck_full[k] + ddp__full_state_off(ctx, p->bucket) +
                              (p->offset - ctx->buckets[p->bucket].offset) / ddp_dtype_size(p->dtype) * ddp__state_elem(p->dtype), bytes);
            else
                r = ddp__ck_write_block(ctx, c, ddp__state_ptr(ctx, bases[k], i), bytes);
        }
    }
    {
        uint64_t h = c->hash;
        ddp__ck_write(c, &h, 8);
    }
    return r;
}

/* ---- files written atomically ---------------------------------------------------
   Checkpoints and safetensors files alike: a temporary beside the target
   that has no name while it is written where the system allows it (see
   "files" in PLATFORM), flushed and synced, named, renamed over the target,
   and the rename made durable. Before the temporary is made, stale
   temporaries of the same path (writers of this host that no longer run)
   are removed. A writer killed at any instant leaves the old file or the
   new one, whole, and at most one named temporary (killed inside the
   instant between naming and renaming), which the next save removes. */

static ddp_result ddp__atomic_open(ddp_context *ctx, const char *what, const char *path, ddp__tmpfile *t) {
    int e;
    if (strlen(path) > 4000) return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "%s: path '%.200s...' is too long", what, path);
    ddp__file_sweep_tmp(path);
    e = ddp__file_tmp_open(t, path);
    if (e != 0) return ddp__fail(ctx, DDP_ERROR_IO, "%s: cannot create a temporary file beside '%s': %s", what, path, ddp__strerror(e));
    return DDP_SUCCESS;
}

/* After a failure while writing: the temporary goes, whatever it holds. */
static void ddp__atomic_abort(ddp__tmpfile *t) {
    if (t->f) fclose(t->f);
    t->f = NULL;
    ddp__file_tmp_discard(t);
}

/* write_err: 0, or the error number of a failed write. Closes the file;
   on any failure nothing of the temporary stays. */
static ddp_result ddp__atomic_commit(ddp_context *ctx, const char *what, ddp__tmpfile *t, const char *path, int write_err) {
    int err = write_err;
    if (!err && fflush(t->f) != 0) err = errno ? errno : EIO;
    if (!err) err = ddp__file_sync(t->f);
    if (!err) err = ddp__file_tmp_name(t);
    if (fclose(t->f) != 0 && !err) err = errno ? errno : EIO;
    t->f = NULL;
    if (err) {
        ddp__file_tmp_discard(t);
        return ddp__fail(ctx, DDP_ERROR_IO, "%s: cannot write '%s': %s", what, t->tmp, ddp__strerror(err));
    }
    if ((err = ddp__file_replace(t->tmp, path)) != 0) {
        ddp__file_tmp_discard(t);
        return ddp__fail(ctx, DDP_ERROR_IO, "%s: cannot rename '%s' to '%s': %s", what, t->tmp, path, ddp__strerror(err));
    }
    t->named = 0;
    ddp__dir_sync(path); /* make the rename itself durable */
    return DDP_SUCCESS;
}

static ddp_result ddp__save_file(ddp_context *ctx, const char *path) {
    ddp__tmpfile t;
    ddp__ckfile c;
    ddp_result r;
    memset(&c, 0, sizeof c);
    c.hash = 0xcbf29ce484222325ull;
    DDP__TRY(ddp__atomic_open(ctx, "ddp_save_checkpoint", path, &t));
    c.f = t.f;
    r = ddp__ck_write_content(ctx, &c);
    if (r != DDP_SUCCESS) { ddp__atomic_abort(&t); return r; }
    return ddp__atomic_commit(ctx, "ddp_save_checkpoint", &t, path, c.err);
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
    r = ddp__fp_check(ctx, DDP__FP_ALLREDUCE, what, 2, DDP_I32, (int)DDP_OP_MAX, -1);
    if (r == DDP_SUCCESS) r = ctx->ops->allreduce(ctx, v, 2, DDP_I32, DDP_OP_MAX);
    if (r != DDP_SUCCESS) return ddp__break(ctx, r);
    memcpy(ctx->err, keep, sizeof keep);
    if (mine != DDP_SUCCESS) return mine;
    if (v[0] != 0)
        return ddp__fail(ctx, (ddp_result)-v[1], "%s failed on rank %d (see that rank's error)", what, v[0] - 1);
    return DDP_SUCCESS;
}

DDP_API ddp_result ddp_save_checkpoint(ddp_context *ctx, const char *path) {
    ddp_result r = DDP_SUCCESS;
    double t0 = ddp__now();
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    DDP__TRY(ddp__check_usable(ctx, "ddp_save_checkpoint"));
    if (!path || !*path) return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_save_checkpoint: path is NULL or empty");
    if (!ctx->finalized) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_save_checkpoint: call ddp_finalize() first");
    if (ctx->in_step) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_save_checkpoint: not allowed inside a step");
    DDP__TRY(ddp__join_check(ctx, "ddp_save_checkpoint"));
    if (ctx->zero && ctx->world > 1) {
        /* the file holds the full state: gather the shards on rank 0 (a
           failure here leaves peers in a collective: break) */
        r = ddp__gather_state(ctx);
        if (r != DDP_SUCCESS) { ddp__free_gathered(ctx); return ddp__break(ctx, r); }
    }
    if (ctx->rank == 0) r = ddp__save_file(ctx, path);
    ddp__free_gathered(ctx);
    r = ddp__agree(ctx, r, "saving the checkpoint");
    ddp__trace_ev(ctx, DDP__EV_SAVE, t0, ddp__now() - t0, 0, 0, ctx->flat_bytes + ddp_optimizer_state_bytes(ctx));
    return r;
}

/* The header of a checkpoint, every field range-checked. */
typedef struct ddp__ckhead {
    uint32_t version, nparams, optimizer, flags;
    int64_t  steps, sched_steps;
    double   lr;
    ddp_schedule_desc schedule;
    uint32_t loss_scaling;
    double   loss_scale;
    int64_t  tracker, skipped;
} ddp__ckhead;

/* A header field out of range: DDP_ERROR_CORRUPT naming it. */
#if defined(__GNUC__)
__attribute__((format(printf, 4, 5)))
#endif
static ddp_result ddp__ck_bad(ddp_context *ctx, const char *path, const char *field, const char *fmt, ...) {
    char what[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    return ddp__fail(ctx, DDP_ERROR_CORRUPT, "checkpoint '%s' is corrupt: field '%s' %s", path, field, what);
}

static int ddp__ck_count(int64_t v) { return v >= 0 && v <= DDP__MAX_STEPS; }

static ddp_result ddp__ck_read_head(ddp_context *ctx, ddp__ckfile *c, const char *path, ddp__ckhead *h) {
    char magic[8];
    uint32_t u;
    memset(h, 0, sizeof *h);
    if (!ddp__ck_read(c, magic, 8) || memcmp(magic, DDP__CKPT_MAGIC, 8) != 0)
        return ddp__fail(ctx, DDP_ERROR_CORRUPT, "'%s' is not a ddp.h checkpoint (bad magic)", path);
    if (!ddp__ck_read(c, &h->version, 4)) goto truncated;
    if (h->version < 1 || h->version > DDP__CKPT_VERSION)
        return ddp__ck_bad(ctx, path, "version", "is %u; this library reads versions 1 to %d", h->version, DDP__CKPT_VERSION);
    if (!ddp__ck_read(c, &h->nparams, 4) || !ddp__ck_read(c, &h->optimizer, 4) || !ddp__ck_read(c, &h->flags, 4) ||
        !ddp__ck_read(c, &h->steps, 8))
        goto truncated;
    if (h->nparams < 1 || h->nparams > (uint32_t)INT_MAX)
        return ddp__ck_bad(ctx, path, "nparams", "is %u (must be 1..%d)", h->nparams, INT_MAX);
    if (h->optimizer > (uint32_t)DDP_OPTIM_ADAMW)
        return ddp__ck_bad(ctx, path, "optimizer", "is %u (must be 0..%d)", h->optimizer, (int)DDP_OPTIM_ADAMW);
    if ((h->flags & ~7u) != 0 || (h->flags && h->optimizer == DDP_OPTIM_NONE) ||
        ((h->flags & 2u) && h->optimizer != DDP_OPTIM_ADAMW))
        return ddp__ck_bad(ctx, path, "flags", "is 0x%x: not a set of state arrays for optimizer %u", h->flags, h->optimizer);
    if (!ddp__ck_count(h->steps) || (h->optimizer == DDP_OPTIM_NONE && h->steps != 0))
        return ddp__ck_bad(ctx, path, "steps", "is %lld (must be 0..2^53, and 0 without an optimizer)", (long long)h->steps);
    if (h->optimizer == DDP_OPTIM_ADAMW && h->steps > 0 && (h->flags & 3u) != 3u)
        return ddp__ck_bad(ctx, path, "flags", "is 0x%x: AdamW at step %lld keeps both moments", h->flags, (long long)h->steps);
    if (h->version == 1) {
        h->sched_steps = h->steps;
        return DDP_SUCCESS;
    }
    if (!ddp__ck_read(c, &h->sched_steps, 8) || !ddp__ck_read(c, &h->lr, 8) || !ddp__ck_read(c, &u, 4) ||
        !ddp__ck_read(c, &h->schedule.warmup_steps, 8) || !ddp__ck_read(c, &h->schedule.total_steps, 8) ||
        !ddp__ck_read(c, &h->schedule.min_lr, 8) || !ddp__ck_read(c, &h->schedule.step_size, 8) ||
        !ddp__ck_read(c, &h->schedule.gamma, 8) || !ddp__ck_read(c, &h->loss_scaling, 4) ||
        !ddp__ck_read(c, &h->loss_scale, 8) || !ddp__ck_read(c, &h->tracker, 8) || !ddp__ck_read(c, &h->skipped, 8))
        goto truncated;
    if (!ddp__in_range(h->lr, 0.0, HUGE_VAL, 0))
        return ddp__ck_bad(ctx, path, "lr", "is %g (must be finite and >= 0)", h->lr);
    if (u > (uint32_t)DDP_SCHEDULE_STEP)
        return ddp__ck_bad(ctx, path, "schedule", "is %u (must be 0..%d)", u, (int)DDP_SCHEDULE_STEP);
    h->schedule.type = (ddp_schedule)u;
    if (!ddp__ck_count(h->schedule.warmup_steps))
        return ddp__ck_bad(ctx, path, "warmup_steps", "is %lld (must be 0..2^53)", (long long)h->schedule.warmup_steps);
    if (!ddp__ck_count(h->schedule.total_steps))
        return ddp__ck_bad(ctx, path, "total_steps", "is %lld (must be 0..2^53)", (long long)h->schedule.total_steps);
    if (!ddp__ck_count(h->schedule.step_size))
        return ddp__ck_bad(ctx, path, "step_size", "is %lld (must be 0..2^53)", (long long)h->schedule.step_size);
    if (!ddp__in_range(h->schedule.min_lr, 0.0, HUGE_VAL, 0))
        return ddp__ck_bad(ctx, path, "min_lr", "is %g (must be finite and >= 0)", h->schedule.min_lr);
    if (!ddp__in_range(h->schedule.gamma, 0.0, HUGE_VAL, 0))
        return ddp__ck_bad(ctx, path, "gamma", "is %g (must be finite and >= 0)", h->schedule.gamma);
    if (h->loss_scaling > 1)
        return ddp__ck_bad(ctx, path, "loss_scaling", "is %u (must be 0 or 1)", h->loss_scaling);
    if (!(h->loss_scale > 0) || !ddp__finite(h->loss_scale) || (double)(float)h->loss_scale != h->loss_scale)
        return ddp__ck_bad(ctx, path, "loss_scale", "is %g (must be a finite float > 0)", h->loss_scale);
    if (h->tracker < 0 || h->tracker > INT_MAX)
        return ddp__ck_bad(ctx, path, "growth_tracker", "is %lld (must be 0..%d)", (long long)h->tracker, INT_MAX);
    if (!ddp__ck_count(h->skipped))
        return ddp__ck_bad(ctx, path, "skipped", "is %lld (must be 0..2^53)", (long long)h->skipped);
    if (h->sched_steps != h->steps + h->skipped)
        return ddp__ck_bad(ctx, path, "sched_steps", "is %lld, but steps %lld + skipped %lld = %lld",
                           (long long)h->sched_steps, (long long)h->steps, (long long)h->skipped, (long long)(h->steps + h->skipped));
    return DDP_SUCCESS;
truncated:
    return ddp__fail(ctx, DDP_ERROR_CORRUPT, "checkpoint '%s' is truncated in its header", path);
}

/* Parameter i's header: range-checked, then compared with the model. */
static ddp_result ddp__ck_read_param(ddp_context *ctx, ddp__ckfile *c, const char *path, const ddp__ckhead *h, int i,
                                     unsigned flags, int *has16) {
    const ddp__param *p = &ctx->params[i];
    char name[DDP__MAX_NAME], field[160];
    uint32_t len, dt, nd;
    uint64_t numel, prod = 1;
    int64_t shape[DDP__MAX_NDIM];
    double lr_scale = 1.0, wd_scale = 1.0;
    int k;
    if (!ddp__ck_read(c, &len, 4)) goto truncated;
    snprintf(field, sizeof field, "namelen' of parameter '%d", i);
    if (len < 1 || len >= DDP__MAX_NAME) return ddp__ck_bad(ctx, path, field, "is %u (must be 1..%d)", len, DDP__MAX_NAME - 1);
    if (!ddp__ck_read(c, name, len)) goto truncated;
    name[len] = 0;
    snprintf(field, sizeof field, "name' of parameter '%d", i);
    if (strlen(name) != len) return ddp__ck_bad(ctx, path, field, "holds a NUL byte");
    if (!ddp__ck_read(c, &dt, 4) || !ddp__ck_read(c, &numel, 8) || !ddp__ck_read(c, &nd, 4)) goto truncated;
    snprintf(field, sizeof field, "dtype' of parameter %d '%.64s", i, name);
    if (dt != DDP_F32 && dt != DDP_F64 && dt != DDP_F16 && dt != DDP_BF16)
        return ddp__ck_bad(ctx, path, field, "is %u (must be %d..%d)", dt, (int)DDP_F32, (int)DDP_BF16);
    snprintf(field, sizeof field, "numel' of parameter %d '%.64s", i, name);
    if (numel < 1 || numel > ((uint64_t)1 << 40))
        return ddp__ck_bad(ctx, path, field, "is %llu (must be 1..2^40)", (unsigned long long)numel);
    snprintf(field, sizeof field, "ndim' of parameter %d '%.64s", i, name);
    if (nd < 1 || nd > DDP__MAX_NDIM) return ddp__ck_bad(ctx, path, field, "is %u (must be 1..%d)", nd, DDP__MAX_NDIM);
    if (!ddp__ck_read(c, shape, (size_t)nd * 8)) goto truncated;
    snprintf(field, sizeof field, "shape' of parameter %d '%.64s", i, name);
    for (k = 0; k < (int)nd; k++) {
        if (shape[k] < 1 || (uint64_t)shape[k] > numel / prod)
            return ddp__ck_bad(ctx, path, field, "has %lld in dimension %d (does not make %llu elements)", (long long)shape[k], k,
                               (unsigned long long)numel);
        prod *= (uint64_t)shape[k];
    }
    if (prod != numel)
        return ddp__ck_bad(ctx, path, field, "makes %llu elements, numel is %llu", (unsigned long long)prod, (unsigned long long)numel);
    if (h->version >= 2) {
        if (!ddp__ck_read(c, &lr_scale, 8) || !ddp__ck_read(c, &wd_scale, 8)) goto truncated;
        snprintf(field, sizeof field, "lr_scale' of parameter %d '%.64s", i, name);
        if (!ddp__in_range(lr_scale, 0.0, HUGE_VAL, 0)) return ddp__ck_bad(ctx, path, field, "is %g (must be finite and >= 0)", lr_scale);
        snprintf(field, sizeof field, "weight_decay_scale' of parameter %d '%.64s", i, name);
        if (!ddp__in_range(wd_scale, 0.0, HUGE_VAL, 0)) return ddp__ck_bad(ctx, path, field, "is %g (must be finite and >= 0)", wd_scale);
    }
    if (dt == DDP_F16 || dt == DDP_BF16) *has16 = 1;
    if (strcmp(name, p->name) != 0 || dt != (uint32_t)p->dtype || numel != p->numel || (int)nd != p->ndim ||
        memcmp(shape, p->shape, (size_t)nd * 8) != 0) {
        ddp__param q;
        char a[300], b[300];
        memset(&q, 0, sizeof q);
        ddp__copy_str(q.name, sizeof q.name, name);
        q.dtype = (ddp_dtype)dt; q.ndim = (int)nd; memcpy(q.shape, shape, (size_t)nd * 8);
        q.lr_scale = q.wd_scale = 1.0;
        ddp__describe_param(&q, a, sizeof a);
        q = *p;
        q.lr_scale = q.wd_scale = 1.0;
        ddp__describe_param(&q, b, sizeof b);
        return ddp__fail(ctx, DDP_ERROR_MISMATCH, "checkpoint '%s' is of another model: parameter %d is %s there, %s here", path, i, a, b);
    }
    /* the groups are part of the optimizer's state (PyTorch's param_groups) */
    if (h->version >= 2 && !(flags & DDP_LOAD_RESET_OPTIMIZER) && ctx->cfg.optimizer.type != DDP_OPTIM_NONE &&
        (lr_scale != p->lr_scale || wd_scale != p->wd_scale))
        return ddp__fail(ctx, DDP_ERROR_MISMATCH, "checkpoint '%s' was saved with other options for parameter %d '%s': lr_scale %g, "
                         "weight_decay_scale %g there, %g and %g here (DDP_LOAD_RESET_OPTIMIZER loads the weights alone)",
                         path, i, name, lr_scale, wd_scale, p->lr_scale, p->wd_scale);
    return DDP_SUCCESS;
truncated:
    return ddp__fail(ctx, DDP_ERROR_CORRUPT, "checkpoint '%s' is truncated in the header of parameter %d", path, i);
}

/* Which state the file must hold for this context's optimizer: the file's
   optimizer must be this one (or none here), and at a step > 0 every state
   array this optimizer needs must be there. */
static ddp_result ddp__ck_check_state(ddp_context *ctx, const char *path, const ddp__ckhead *h) {
    static const char *const what[3] = { "momentum / first-moment", "second-moment", "master-weight" };
    int need[3], k;
    ddp_optimizer mine = ctx->cfg.optimizer.type;
    if (mine == DDP_OPTIM_NONE) return DDP_SUCCESS;
    if (h->optimizer == DDP_OPTIM_NONE)
        return ddp__fail(ctx, DDP_ERROR_MISMATCH, "checkpoint '%s' holds no optimizer state (saved without an optimizer), and this context has one; "
                         "ddp_load_checkpoint_ex(ctx, path, DDP_LOAD_RESET_OPTIMIZER) loads its weights with a fresh optimizer", path);
    if (h->optimizer != (uint32_t)mine)
        return ddp__fail(ctx, DDP_ERROR_MISMATCH, "checkpoint '%s' holds the state of optimizer %s, this context uses %s "
                         "(DDP_LOAD_RESET_OPTIMIZER loads the weights alone)", path,
                         h->optimizer == DDP_OPTIM_SGD ? "SGD" : h->optimizer == DDP_OPTIM_ADAMW ? "AdamW" : "(unknown)",
                         mine == DDP_OPTIM_SGD ? "SGD" : "AdamW");
    if (h->steps == 0) return DDP_SUCCESS;
    ddp__state_needed(ctx, need);
    for (k = 0; k < 3; k++)
        if (need[k] && !(h->flags & (1u << k)))
            return ddp__fail(ctx, DDP_ERROR_MISMATCH, "checkpoint '%s' has no %s state for this optimizer at step %lld; "
                             "DDP_LOAD_RESET_OPTIMIZER loads its weights with a fresh optimizer", path, what[k], (long long)h->steps);
    return DDP_SUCCESS;
}

/* Reads into scratch buffers first and commits only after the checksum
   matched, so a bad file leaves the model untouched. */
static ddp_result ddp__load_file(ddp_context *ctx, const char *path, unsigned flags) {
    ddp__ckfile c;
    ddp__ckhead h;
    unsigned char *pbuf = NULL, *sbuf[3] = { NULL, NULL, NULL }, *tmp = NULL;
    size_t tmp_bytes = 1;
    int i, k, has16 = 0, reset = (flags & DDP_LOAD_RESET_OPTIMIZER) != 0;
    ddp_result r = DDP_SUCCESS;
    memset(&c, 0, sizeof c);
    c.hash = 0xcbf29ce484222325ull;
    c.f = fopen(path, "rb");
    if (!c.f) return ddp__fail(ctx, DDP_ERROR_IO, "ddp_load_checkpoint: cannot open '%s': %s", path, ddp__strerror(errno));
    r = ddp__ck_read_head(ctx, &c, path, &h);
    if (r == DDP_SUCCESS && h.nparams != (uint32_t)ctx->num_params)
        r = ddp__fail(ctx, DDP_ERROR_MISMATCH, "checkpoint '%s' is of another model: it has %u parameters, this model %d", path, h.nparams, ctx->num_params);
    for (i = 0; i < ctx->num_params && r == DDP_SUCCESS; i++) r = ddp__ck_read_param(ctx, &c, path, &h, i, flags, &has16);
    if (r == DDP_SUCCESS && (h.flags & 4u) && !has16)
        r = ddp__ck_bad(ctx, path, "flags", "is 0x%x: master weights, but no 16-bit parameter", h.flags);
    if (r == DDP_SUCCESS && !reset) r = ddp__ck_check_state(ctx, path, &h);
    if (r != DDP_SUCCESS) goto done;
    pbuf = (unsigned char *)ddp__calloc(ctx, ctx->flat_bytes);
    if (!pbuf) { r = ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory loading '%s'", path); goto done; }
    for (i = 0; i < ctx->num_params; i++)
        if (ctx->params[i].numel * ddp__state_elem(ctx->params[i].dtype) > tmp_bytes)
            tmp_bytes = ctx->params[i].numel * ddp__state_elem(ctx->params[i].dtype);
    for (i = 0; i < ctx->num_params && r == DDP_SUCCESS; i++)
        if (!ddp__ck_read(&c, pbuf + ctx->params[i].offset, ctx->params[i].numel * ddp_dtype_size(ctx->params[i].dtype)))
            r = ddp__fail(ctx, DDP_ERROR_CORRUPT, "checkpoint '%s' is truncated in the data of parameter %d '%s'", path, i, ctx->params[i].name);
    for (k = 0; k < 3 && r == DDP_SUCCESS; k++) {
        if (!(h.flags & (1u << k))) continue;
        sbuf[k] = (unsigned char *)ddp__calloc(ctx, ctx->opt_state_bytes);
        if (!sbuf[k]) { r = ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory loading '%s'", path); break; }
        for (i = 0; i < ctx->num_params && r == DDP_SUCCESS; i++) {
            /* the file holds every parameter's full state; this rank keeps
               the part in its range (ZeRO-1: its shards), so a file saved
               by any world size loads at any other */
            const ddp__param *p = &ctx->params[i];
            size_t el = ddp__state_elem(p->dtype), lo, hi;
            size_t e0 = (p->offset - ctx->buckets[p->bucket].offset) / ddp_dtype_size(p->dtype), e1 = e0 + p->numel;
            ddp__own_range(ctx, p->bucket, &lo, &hi);
            if (lo <= e0 && e1 <= hi) {
                if (!ddp__ck_read(&c, ddp__state_ptr(ctx, sbuf[k], i), p->numel * el)) r = DDP_ERROR_CORRUPT;
            } else {
                if (!tmp && !(tmp = (unsigned char *)ddp__alloc(ctx, tmp_bytes))) {
                    r = ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory loading '%s'", path);
                    break;
                }
                if (!ddp__ck_read(&c, tmp, p->numel * el)) r = DDP_ERROR_CORRUPT;
                else if (lo < e1 && e0 < hi) {
                    size_t a = lo > e0 ? lo : e0, z = hi < e1 ? hi : e1;
                    memcpy(ddp__state_el(ctx, sbuf[k], p->bucket, a), tmp + (a - e0) * el, (z - a) * el);
                }
            }
            if (r == DDP_ERROR_CORRUPT)
                r = ddp__fail(ctx, DDP_ERROR_CORRUPT, "checkpoint '%s' is truncated in the optimizer state", path);
        }
    }
    if (r == DDP_SUCCESS) {
        uint64_t want = c.hash, got;
        if (fread(&got, 1, 8, c.f) != 8) r = ddp__fail(ctx, DDP_ERROR_CORRUPT, "checkpoint '%s' is truncated (no checksum)", path);
        else if (got != want) r = ddp__fail(ctx, DDP_ERROR_CORRUPT, "checkpoint '%s' is corrupt: checksum mismatch", path);
        else if (fgetc(c.f) != EOF) r = ddp__fail(ctx, DDP_ERROR_CORRUPT, "checkpoint '%s' has trailing bytes after its checksum", path);
    }
    if (r == DDP_SUCCESS) { /* commit */
        int take = !reset && ctx->cfg.optimizer.type != DDP_OPTIM_NONE;
        if (ddp__on_gpu(ctx)) r = ddp__cuda_memcpy(ctx, ctx->flat_params, pbuf, ctx->flat_bytes, 1);
        else memcpy(ctx->flat_params, pbuf, ctx->flat_bytes);
        /* the training state: the file's, or fresh (zero moments, master
           weights from the loaded values, step 0, the configured lr and
           loss scale) */
        ctx->opt_steps = take ? h.steps : 0;
        ctx->sched_steps = take ? h.sched_steps : 0;
        if (!take) ctx->cfg.optimizer.lr = ctx->config_lr;
        else if (h.version >= 2) ctx->cfg.optimizer.lr = h.lr;
        ctx->ls_skipped = take && h.version >= 2 ? h.skipped : 0;
        ctx->ls_tracker = 0;
        ctx->ls_scale = ctx->cfg.loss_scale.enabled ? (double)(float)ctx->cfg.loss_scale.init_scale : 1.0;
        if (take && h.version >= 2 && h.loss_scaling && ctx->cfg.loss_scale.enabled) {
            ctx->ls_scale = h.loss_scale;
            ctx->ls_tracker = h.tracker;
        }
        ctx->ls_last_skipped = 0;
        if (take && h.version >= 2 && memcmp(&h.schedule, &ctx->cfg.schedule, sizeof h.schedule) != 0 &&
            (h.schedule.type != ctx->cfg.schedule.type || h.schedule.warmup_steps != ctx->cfg.schedule.warmup_steps ||
             h.schedule.total_steps != ctx->cfg.schedule.total_steps || h.schedule.min_lr != ctx->cfg.schedule.min_lr ||
             h.schedule.step_size != ctx->cfg.schedule.step_size || h.schedule.gamma != ctx->cfg.schedule.gamma)) {
            char msg[256];
            snprintf(msg, sizeof msg, "checkpoint '%.100s' was saved with another schedule; the run goes on with this context's config.schedule from step %lld",
                     path, (long long)h.sched_steps);
            ddp__log(ctx, DDP_LOG_WARN, msg);
        }
        if (r == DDP_SUCCESS) r = ddp__opt_alloc(ctx);
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
done:
    fclose(c.f);
    ddp__free(ctx, pbuf);
    ddp__free(ctx, tmp);
    for (k = 0; k < 3; k++) ddp__free(ctx, sbuf[k]);
    return r;
}

DDP_API ddp_result ddp_load_checkpoint_ex(ddp_context *ctx, const char *path, unsigned flags) {
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    DDP__TRY(ddp__check_usable(ctx, "ddp_load_checkpoint"));
    if (!path || !*path) return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_load_checkpoint: path is NULL or empty");
    if (flags & ~(unsigned)DDP_LOAD_RESET_OPTIMIZER)
        return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_load_checkpoint_ex: flags 0x%x has unknown bits", flags);
    if (!ctx->finalized) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_load_checkpoint: call ddp_finalize() first");
    if (ctx->in_step) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_load_checkpoint: not allowed inside a step");
    DDP__TRY(ddp__join_check(ctx, "ddp_load_checkpoint"));
    {
        double t0 = ddp__now();
        ddp_result r = ddp__agree(ctx, ddp__load_file(ctx, path, flags), "loading the checkpoint");
        ddp__trace_ev(ctx, DDP__EV_LOAD, t0, ddp__now() - t0, 0, 0, ctx->flat_bytes + ddp_optimizer_state_bytes(ctx));
        return r;
    }
}

DDP_API ddp_result ddp_load_checkpoint(ddp_context *ctx, const char *path) {
    return ddp_load_checkpoint_ex(ctx, path, 0);
}

/* ---- safetensors ---------------------------------------------------------------------

   The Hugging Face format (see SAFETENSORS in the manual): u64 N, N bytes of
   JSON, the tensors' bytes. The writer builds the header in memory, pads it
   to a multiple of 8 with spaces, writes the tensors widest type first. The
   reader checks the whole file before it changes a parameter: it parses the
   header with a strict, bounded, non-recursive parser (the format has three
   levels: the top object, a tensor's object, its arrays), then checks
   dtypes, sizes, duplicate names, offsets covering the byte buffer exactly,
   names, dtypes and shapes against the model; it reads the data in file
   order into a scratch buffer and commits at the end. */

#define DDP__ST_MAX_HEADER 100000000u /* the format's limit on N (the reference reader's) */
#define DDP__ST_MAX_DIMS   64         /* dimensions of one tensor in a file we read */
#define DDP__ST_PAD        8          /* the header is padded to a multiple of this */
#define DDP__ST_CHUNK      (1u << 20) /* bytes read at once (header, skipped tensors) */

/* ---- format helpers ---- */

typedef struct ddp__st_dtype { const char *name; size_t size; ddp_dtype param; } ddp__st_dtype;

/* every dtype of the format with a whole-byte element; param: the
   parameter type it loads into (DDP_DTYPE_DEFAULT: none) */
static const ddp__st_dtype ddp__st_dtypes[] = {
    { "BOOL", 1, DDP_DTYPE_DEFAULT }, { "U8", 1, DDP_DTYPE_DEFAULT },  { "I8", 1, DDP_DTYPE_DEFAULT },
    { "F8_E5M2", 1, DDP_DTYPE_DEFAULT }, { "F8_E4M3", 1, DDP_DTYPE_DEFAULT },
    { "I16", 2, DDP_DTYPE_DEFAULT },  { "U16", 2, DDP_DTYPE_DEFAULT }, { "F16", 2, DDP_F16 },
    { "BF16", 2, DDP_BF16 },          { "I32", 4, DDP_DTYPE_DEFAULT }, { "U32", 4, DDP_DTYPE_DEFAULT },
    { "F32", 4, DDP_F32 },            { "F64", 8, DDP_F64 },           { "I64", 8, DDP_DTYPE_DEFAULT },
    { "U64", 8, DDP_DTYPE_DEFAULT }
};
#define DDP__ST_NDTYPES ((int)(sizeof ddp__st_dtypes / sizeof ddp__st_dtypes[0]))

static const char *ddp__st_dtype_of(ddp_dtype t) {
    switch (t) {
    case DDP_F32: return "F32";
    case DDP_F64: return "F64";
    case DDP_F16: return "F16";
    case DDP_BF16: return "BF16";
    default: return "?";
    }
}

static int ddp__host_little_endian(void) {
    const uint16_t one = 1;
    return *(const unsigned char *)&one == 1;
}

/* the file is little-endian; a big-endian host swaps each element */
static void ddp__st_swap(unsigned char *p, size_t bytes, size_t el) {
    size_t i, k;
    if (el < 2 || ddp__host_little_endian()) return;
    for (i = 0; i + el <= bytes; i += el)
        for (k = 0; k < el / 2; k++) {
            unsigned char c = p[i + k];
            p[i + k] = p[i + el - 1 - k];
            p[i + el - 1 - k] = c;
        }
}

/* The length of the valid UTF-8 prefix of s (n when all of it is valid):
   no overlong forms, no surrogates, nothing above U+10FFFF. */
static size_t ddp__utf8_valid_prefix(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t len, k;
        unsigned lo = 0x80, hi = 0xbf;
        if (c < 0x80) { i++; continue; }
        if (c >= 0xc2 && c <= 0xdf) len = 2;
        else if (c >= 0xe0 && c <= 0xef) { len = 3; if (c == 0xe0) lo = 0xa0; if (c == 0xed) hi = 0x9f; }
        else if (c >= 0xf0 && c <= 0xf4) { len = 4; if (c == 0xf0) lo = 0x90; if (c == 0xf4) hi = 0x8f; }
        else return i;
        if (n - i < len) return i;
        if (s[i + 1] < lo || s[i + 1] > hi) return i;
        for (k = 2; k < len; k++)
            if (s[i + k] < 0x80 || s[i + k] > 0xbf) return i;
        i += len;
    }
    return n;
}

/* ---- the writer ---- */

typedef struct ddp__strbuf { char *s; size_t len, cap; int oom; const ddp_context *ctx; } ddp__strbuf;

static void ddp__sb_put(ddp__strbuf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        char *ns;
        while (cap < b->len + n + 1) cap *= 2;
        ns = (char *)ddp__alloc(b->ctx, cap);
        if (!ns) { b->oom = 1; return; }
        if (b->len) memcpy(ns, b->s, b->len);
        ddp__free(b->ctx, b->s);
        b->s = ns;
        b->cap = cap;
    }
    memcpy(b->s + b->len, s, n);
    b->len += n;
    b->s[b->len] = 0;
}
static void ddp__sb_str(ddp__strbuf *b, const char *s) { ddp__sb_put(b, s, strlen(s)); }

/* a JSON string: quotes, backslashes and control characters escaped; the
   rest is copied (the caller checked it is UTF-8) */
static void ddp__sb_json(ddp__strbuf *b, const char *s) {
    ddp__sb_put(b, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        char esc[8];
        if (c == '"' || c == '\\') { esc[0] = '\\'; esc[1] = (char)c; ddp__sb_put(b, esc, 2); }
        else if (c < 0x20) { snprintf(esc, sizeof esc, "\\u%04x", c); ddp__sb_put(b, esc, 6); }
        else ddp__sb_put(b, s, 1);
    }
    ddp__sb_put(b, "\"", 1);
}

static void ddp__sb_u64(ddp__strbuf *b, uint64_t v) {
    char num[32];
    snprintf(num, sizeof num, "%llu", (unsigned long long)v);
    ddp__sb_str(b, num);
}

static int ddp__st_text_ok(const char *s) {
    return ddp__utf8_valid_prefix((const unsigned char *)s, strlen(s)) == strlen(s);
}

/* The order of the tensors in the file: widest element first (each tensor
   starts aligned to its element size after the 8-aligned header), then
   registration order. */
static void ddp__st_order(const ddp_context *ctx, int *order) {
    static const size_t widths[3] = { 8, 4, 2 };
    int n = 0, w, i;
    for (w = 0; w < 3; w++)
        for (i = 0; i < ctx->num_params; i++)
            if (ddp_dtype_size(ctx->params[i].dtype) == widths[w]) order[n++] = i;
}

static ddp_result ddp__st_header(ddp_context *ctx, const char *const *metadata, const int *order,
                                 ddp__strbuf *h) {
    const char *what = "ddp_save_safetensors";
    int i, k, has_format = 0, nmeta = 0;
    uint64_t off = 0;
    if (metadata) {
        for (k = 0; metadata[k]; k += 2) {
            int j;
            if (!metadata[k + 1])
                return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "%s: metadata key '%.100s' has no value (the list is key, value, ..., NULL)", what, metadata[k]);
            if (!ddp__st_text_ok(metadata[k]) || !ddp__st_text_ok(metadata[k + 1]))
                return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "%s: metadata key '%.100s' or its value is not valid UTF-8", what, metadata[k]);
            for (j = 0; j < k; j += 2)
                if (!strcmp(metadata[j], metadata[k]))
                    return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "%s: metadata key '%.100s' is given twice", what, metadata[k]);
            if (!strcmp(metadata[k], "format")) has_format = 1;
            nmeta++;
        }
    }
    for (i = 0; i < ctx->num_params; i++) {
        if (!ddp__st_text_ok(ctx->params[i].name))
            return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "%s: the name of parameter %d is not valid UTF-8 (safetensors names are JSON strings)", what, i);
        if (!strcmp(ctx->params[i].name, "__metadata__"))
            return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "%s: parameter %d is named '__metadata__', the format's reserved key", what, i);
    }
    ddp__sb_str(h, "{\"__metadata__\":{");
    if (!has_format) ddp__sb_str(h, "\"format\":\"pt\"");
    for (k = 0; k < 2 * nmeta; k += 2) {
        if (k || !has_format) ddp__sb_str(h, ",");
        ddp__sb_json(h, metadata[k]);
        ddp__sb_str(h, ":");
        ddp__sb_json(h, metadata[k + 1]);
    }
    ddp__sb_str(h, "}");
    for (k = 0; k < ctx->num_params; k++) {
        const ddp__param *p = &ctx->params[order[k]];
        uint64_t bytes = (uint64_t)p->numel * ddp_dtype_size(p->dtype);
        ddp__sb_str(h, ",");
        ddp__sb_json(h, p->name);
        ddp__sb_str(h, ":{\"dtype\":\"");
        ddp__sb_str(h, ddp__st_dtype_of(p->dtype));
        ddp__sb_str(h, "\",\"shape\":[");
        for (i = 0; i < p->ndim; i++) {
            if (i) ddp__sb_str(h, ",");
            ddp__sb_u64(h, (uint64_t)p->shape[i]);
        }
        ddp__sb_str(h, "],\"data_offsets\":[");
        ddp__sb_u64(h, off);
        ddp__sb_str(h, ",");
        ddp__sb_u64(h, off + bytes);
        ddp__sb_str(h, "]}");
        off += bytes;
    }
    ddp__sb_str(h, "}");
    while (!h->oom && h->len % DDP__ST_PAD) ddp__sb_str(h, " ");
    if (h->oom) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "%s: out of memory for the header", what);
    if (h->len > DDP__ST_MAX_HEADER)
        return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "%s: the header would be %" DDP__PRIzu " bytes, over the format's limit of %u",
                         what, h->len, DDP__ST_MAX_HEADER);
    return DDP_SUCCESS;
}

static ddp_result ddp__st_save_file(ddp_context *ctx, const char *path, const char *const *metadata) {
    const char *what = "ddp_save_safetensors";
    ddp__strbuf h;
    ddp__tmpfile t;
    unsigned char len8[8];
    int *order = NULL, k, werr = 0;
    FILE *f = NULL;
    ddp_result r;
    memset(&h, 0, sizeof h);
    h.ctx = ctx;
    order = (int *)ddp__alloc(ctx, (size_t)ctx->num_params * sizeof *order + 1);
    if (!order) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "%s: out of memory", what);
    ddp__st_order(ctx, order);
    r = ddp__st_header(ctx, metadata, order, &h);
    if (r == DDP_SUCCESS) r = ddp__atomic_open(ctx, what, path, &t);
    if (r != DDP_SUCCESS) { ddp__free(ctx, order); ddp__free(ctx, h.s); return r; }
    f = t.f;
    for (k = 0; k < 8; k++) len8[k] = (unsigned char)(((uint64_t)h.len >> (8 * k)) & 0xffu);
    if (fwrite(len8, 1, 8, f) != 8 || fwrite(h.s, 1, h.len, f) != h.len) werr = errno ? errno : EIO;
    for (k = 0; k < ctx->num_params && !werr && r == DDP_SUCCESS; k++) {
        const ddp__param *p = &ctx->params[order[k]];
        size_t es = ddp_dtype_size(p->dtype), bytes = p->numel * es;
        void *copy = NULL;
        const void *view = NULL;
        r = ddp__host_view(ctx, ctx->flat_params + p->offset, bytes, &copy, &view);
        if (r != DDP_SUCCESS) break;
        if (!ddp__host_little_endian()) {   /* swap a private copy */
            if (!copy) {
                copy = ddp__alloc(ctx, bytes ? bytes : 1);
                if (!copy) { r = ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "%s: out of memory", what); break; }
                memcpy(copy, view, bytes);
            }
            ddp__st_swap((unsigned char *)copy, bytes, es);
            view = copy;
        }
        if (bytes && fwrite(view, 1, bytes, f) != bytes) werr = errno ? errno : EIO;
        ddp__free(ctx, copy);
    }
    ddp__free(ctx, order);
    ddp__free(ctx, h.s);
    if (r != DDP_SUCCESS) { ddp__atomic_abort(&t); return r; }
    return ddp__atomic_commit(ctx, what, &t, path, werr);
}

DDP_API ddp_result ddp_save_safetensors(ddp_context *ctx, const char *path, const char *const *metadata) {
    ddp_result r = DDP_SUCCESS;
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    DDP__TRY(ddp__check_usable(ctx, "ddp_save_safetensors"));
    if (!path || !*path) return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_save_safetensors: path is NULL or empty");
    if (!ctx->finalized) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_save_safetensors: call ddp_finalize() first");
    if (ctx->in_step) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_save_safetensors: not allowed inside a step");
    if (ctx->rank == 0) r = ddp__st_save_file(ctx, path, metadata);
    return ddp__agree(ctx, r, "saving the safetensors file");
}

/* ---- the reader ---- */

typedef struct ddp__st_entry {
    const char *name;     /* decoded, NUL-terminated, in the parser's arena */
    int      dtype;       /* index into ddp__st_dtypes */
    int      ndim;
    size_t   shape_at;    /* index of its first dimension in the shape array */
    uint64_t begin, end;  /* data_offsets */
    int      param;       /* the parameter it loads into, or -1 */
} ddp__st_entry;

typedef struct ddp__st_parser {
    const unsigned char *p, *start, *end;
    char    *arena;       /* decoded strings; never more than the header's bytes + one NUL per string */
    size_t   arena_len, arena_cap;
    ddp__st_entry *ent;
    int      nent, capent;
    uint64_t *dims;
    size_t   ndims, capdims;
    int      has_metadata;
    char     err[512];
    const ddp_context *ctx;
} ddp__st_parser;

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
static int ddp__st_err(ddp__st_parser *ps, const char *fmt, ...) {
    char msg[400];
    va_list ap;
    if (ps->err[0]) return -1;    /* keep the first */
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    snprintf(ps->err, sizeof ps->err, "header byte %ld: %s", (long)(ps->p - ps->start), msg);
    return -1;
}

static void ddp__st_ws(ddp__st_parser *ps) {
    while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r')) ps->p++;
}

/* expects c (after whitespace) */
static int ddp__st_expect(ddp__st_parser *ps, char c, const char *where) {
    ddp__st_ws(ps);
    if (ps->p >= ps->end) return ddp__st_err(ps, "the header ends where '%c' %s was expected", c, where);
    if (*ps->p != (unsigned char)c) {
        if (*ps->p >= 0x20 && *ps->p < 0x7f) return ddp__st_err(ps, "expected '%c' %s, found '%c'", c, where, *ps->p);
        return ddp__st_err(ps, "expected '%c' %s, found byte 0x%02x", c, where, *ps->p);
    }
    ps->p++;
    return 0;
}

static int ddp__st_hex4(ddp__st_parser *ps, unsigned *out) {
    unsigned v = 0;
    int i;
    if (ps->end - ps->p < 4) return ddp__st_err(ps, "a \\u escape needs 4 hex digits");
    for (i = 0; i < 4; i++) {
        unsigned char c = ps->p[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return ddp__st_err(ps, "bad hex digit '%c' in a \\u escape", c);
    }
    ps->p += 4;
    *out = v;
    return 0;
}

/* A JSON string, decoded to UTF-8 into the arena (NUL-terminated). The
   header was checked to be UTF-8 already; escapes are decoded and checked
   here (no lone surrogates, no \u0000: names are C strings). */
static int ddp__st_string(ddp__st_parser *ps, const char **out) {
    char *dst;
    ddp__st_ws(ps);
    if (ps->p >= ps->end || *ps->p != '"') return ddp__st_err(ps, "expected a string");
    ps->p++;
    dst = ps->arena + ps->arena_len;
    for (;;) {
        unsigned char c;
        if (ps->p >= ps->end) return ddp__st_err(ps, "a string is not closed");
        c = *ps->p++;
        if (c == '"') break;
        if (c < 0x20) return ddp__st_err(ps, "a control character (0x%02x) in a string", c);
        if (c != '\\') { *dst++ = (char)c; continue; }
        if (ps->p >= ps->end) return ddp__st_err(ps, "a string ends in a backslash");
        c = *ps->p++;
        switch (c) {
        case '"': case '\\': case '/': *dst++ = (char)c; break;
        case 'b': *dst++ = '\b'; break;
        case 'f': *dst++ = '\f'; break;
        case 'n': *dst++ = '\n'; break;
        case 'r': *dst++ = '\r'; break;
        case 't': *dst++ = '\t'; break;
        case 'u': {
            unsigned u, lo;
            if (ddp__st_hex4(ps, &u)) return -1;
            if (u >= 0xdc00 && u <= 0xdfff) return ddp__st_err(ps, "a lone low surrogate \\u%04x", u);
            if (u >= 0xd800 && u <= 0xdbff) {
                if (ps->end - ps->p < 2 || ps->p[0] != '\\' || ps->p[1] != 'u')
                    return ddp__st_err(ps, "a high surrogate \\u%04x without its low half", u);
                ps->p += 2;
                if (ddp__st_hex4(ps, &lo)) return -1;
                if (lo < 0xdc00 || lo > 0xdfff) return ddp__st_err(ps, "a high surrogate followed by \\u%04x", lo);
                u = 0x10000 + ((u - 0xd800) << 10) + (lo - 0xdc00);
            }
            if (u == 0) return ddp__st_err(ps, "\\u0000 in a string");
            /* UTF-8: at most 4 bytes, never more than the 6+ bytes of the escape */
            if (u < 0x80) *dst++ = (char)u;
            else if (u < 0x800) { *dst++ = (char)(0xc0 | (u >> 6)); *dst++ = (char)(0x80 | (u & 0x3f)); }
            else if (u < 0x10000) {
                *dst++ = (char)(0xe0 | (u >> 12)); *dst++ = (char)(0x80 | ((u >> 6) & 0x3f)); *dst++ = (char)(0x80 | (u & 0x3f));
            } else {
                *dst++ = (char)(0xf0 | (u >> 18)); *dst++ = (char)(0x80 | ((u >> 12) & 0x3f));
                *dst++ = (char)(0x80 | ((u >> 6) & 0x3f)); *dst++ = (char)(0x80 | (u & 0x3f));
            }
            break;
        }
        default: return ddp__st_err(ps, "a bad escape '\\%c' in a string", c);
        }
    }
    *dst++ = 0;
    *out = ps->arena + ps->arena_len;
    ps->arena_len = (size_t)(dst - ps->arena);
    return 0;
}

/* A non-negative integer: digits only, no leading zero, no sign, fraction or
   exponent (the format's offsets and dimensions), at most 2^64 - 1. */
static int ddp__st_uint(ddp__st_parser *ps, uint64_t *out, const char *what) {
    uint64_t v = 0;
    const unsigned char *s;
    ddp__st_ws(ps);
    s = ps->p;
    if (ps->p >= ps->end || *ps->p < '0' || *ps->p > '9') return ddp__st_err(ps, "%s: expected a non-negative integer", what);
    while (ps->p < ps->end && *ps->p >= '0' && *ps->p <= '9') {
        unsigned d = (unsigned)(*ps->p - '0');
        if (v > (UINT64_MAX - d) / 10) return ddp__st_err(ps, "%s: the integer does not fit in 64 bits", what);
        v = v * 10 + d;
        ps->p++;
    }
    if (ps->p - s > 1 && *s == '0') return ddp__st_err(ps, "%s: an integer with a leading zero", what);
    if (ps->p < ps->end && (*ps->p == '.' || *ps->p == 'e' || *ps->p == 'E'))
        return ddp__st_err(ps, "%s: expected an integer, found a fraction or exponent", what);
    *out = v;
    return 0;
}

static int ddp__st_push_dim(ddp__st_parser *ps, uint64_t d) {
    if (ps->ndims == ps->capdims) {
        size_t cap = ps->capdims ? ps->capdims * 2 : 64;
        uint64_t *nd = (uint64_t *)ddp__alloc(ps->ctx, cap * sizeof *nd);
        if (!nd) return ddp__st_err(ps, "out of memory");
        if (ps->ndims) memcpy(nd, ps->dims, ps->ndims * sizeof *nd);
        ddp__free(ps->ctx, ps->dims);
        ps->dims = nd;
        ps->capdims = cap;
    }
    ps->dims[ps->ndims++] = d;
    return 0;
}

/* "name": {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}, keys in any order, each once */
static int ddp__st_tensor(ddp__st_parser *ps, const char *name) {
    ddp__st_entry e;
    int seen_dtype = 0, seen_shape = 0, seen_off = 0;
    memset(&e, 0, sizeof e);
    e.name = name;
    e.param = -1;
    e.dtype = -1;
    if (ddp__st_expect(ps, '{', "to open the entry of a tensor")) return -1;
    ddp__st_ws(ps);
    if (ps->p < ps->end && *ps->p == '}') return ddp__st_err(ps, "tensor '%.200s' has an empty entry", name);
    for (;;) {
        const char *key;
        if (ddp__st_string(ps, &key)) return -1;
        if (ddp__st_expect(ps, ':', "after a key")) return -1;
        if (!strcmp(key, "dtype")) {
            const char *dt;
            int i;
            if (seen_dtype++) return ddp__st_err(ps, "tensor '%.200s' has two \"dtype\" keys", name);
            if (ddp__st_string(ps, &dt)) return -1;
            for (i = 0; i < DDP__ST_NDTYPES; i++)
                if (!strcmp(dt, ddp__st_dtypes[i].name)) e.dtype = i;
            if (e.dtype < 0) return ddp__st_err(ps, "tensor '%.200s' has dtype \"%.40s\", which this reader does not know", name, dt);
        } else if (!strcmp(key, "shape")) {
            if (seen_shape++) return ddp__st_err(ps, "tensor '%.200s' has two \"shape\" keys", name);
            e.shape_at = ps->ndims;
            if (ddp__st_expect(ps, '[', "to open a shape")) return -1;
            ddp__st_ws(ps);
            if (ps->p < ps->end && *ps->p == ']') ps->p++;   /* [] is a scalar */
            else for (;;) {
                uint64_t d;
                if (e.ndim == DDP__ST_MAX_DIMS)
                    return ddp__st_err(ps, "tensor '%.200s' has more than %d dimensions", name, DDP__ST_MAX_DIMS);
                if (ddp__st_uint(ps, &d, "a dimension") || ddp__st_push_dim(ps, d)) return -1;
                e.ndim++;
                ddp__st_ws(ps);
                if (ps->p < ps->end && *ps->p == ',') { ps->p++; continue; }
                if (ddp__st_expect(ps, ']', "to close a shape")) return -1;
                break;
            }
        } else if (!strcmp(key, "data_offsets")) {
            if (seen_off++) return ddp__st_err(ps, "tensor '%.200s' has two \"data_offsets\" keys", name);
            if (ddp__st_expect(ps, '[', "to open data_offsets") || ddp__st_uint(ps, &e.begin, "data_offsets") ||
                ddp__st_expect(ps, ',', "between the two data_offsets") || ddp__st_uint(ps, &e.end, "data_offsets") ||
                ddp__st_expect(ps, ']', "after the two data_offsets"))
                return -1;
        } else {
            return ddp__st_err(ps, "tensor '%.200s' has a key \"%.60s\" (the format has dtype, shape, data_offsets)", name, key);
        }
        ddp__st_ws(ps);
        if (ps->p < ps->end && *ps->p == ',') { ps->p++; continue; }
        if (ddp__st_expect(ps, '}', "to close the entry of a tensor")) return -1;
        break;
    }
    if (!seen_dtype || !seen_shape || !seen_off)
        return ddp__st_err(ps, "tensor '%.200s' lacks \"%s\"", name, !seen_dtype ? "dtype" : !seen_shape ? "shape" : "data_offsets");
    if (ps->nent == ps->capent) {
        int cap = ps->capent ? ps->capent * 2 : 64;
        ddp__st_entry *ne = (ddp__st_entry *)ddp__alloc(ps->ctx, (size_t)cap * sizeof *ne);
        if (!ne) return ddp__st_err(ps, "out of memory");
        if (ps->nent) memcpy(ne, ps->ent, (size_t)ps->nent * sizeof *ne);
        ddp__free(ps->ctx, ps->ent);
        ps->ent = ne;
        ps->capent = cap;
    }
    ps->ent[ps->nent++] = e;
    return 0;
}

/* "__metadata__": {"key": "value", ...}: strings only */
static int ddp__st_metadata(ddp__st_parser *ps) {
    if (ps->has_metadata++) return ddp__st_err(ps, "the key \"__metadata__\" appears twice");
    if (ddp__st_expect(ps, '{', "to open __metadata__")) return -1;
    ddp__st_ws(ps);
    if (ps->p < ps->end && *ps->p == '}') { ps->p++; return 0; }
    for (;;) {
        const char *k, *v;
        if (ddp__st_string(ps, &k) || ddp__st_expect(ps, ':', "after a key of __metadata__")) return -1;
        ddp__st_ws(ps);
        if (ps->p < ps->end && *ps->p != '"')
            return ddp__st_err(ps, "__metadata__ key \"%.60s\" has a value that is not a string", k);
        if (ddp__st_string(ps, &v)) return -1;
        ddp__st_ws(ps);
        if (ps->p < ps->end && *ps->p == ',') { ps->p++; continue; }
        return ddp__st_expect(ps, '}', "to close __metadata__");
    }
}

static int ddp__st_parse(ddp__st_parser *ps) {
    size_t valid = ddp__utf8_valid_prefix(ps->start, (size_t)(ps->end - ps->start));
    if (valid != (size_t)(ps->end - ps->start)) {
        ps->p = ps->start + valid;
        return ddp__st_err(ps, "the header is not valid UTF-8");
    }
    if (ps->p >= ps->end || *ps->p != '{') return ddp__st_err(ps, "the header must begin with '{'");
    ps->p++;
    ddp__st_ws(ps);
    if (ps->p < ps->end && *ps->p == '}') ps->p++;
    else for (;;) {
        const char *key;
        if (ddp__st_string(ps, &key) || ddp__st_expect(ps, ':', "after a key")) return -1;
        if (!strcmp(key, "__metadata__")) { if (ddp__st_metadata(ps)) return -1; }
        else if (ddp__st_tensor(ps, key)) return -1;
        ddp__st_ws(ps);
        if (ps->p < ps->end && *ps->p == ',') { ps->p++; continue; }
        if (ddp__st_expect(ps, '}', "to close the header")) return -1;
        break;
    }
    ddp__st_ws(ps);
    if (ps->p != ps->end) return ddp__st_err(ps, "bytes after the header's closing '}' (only padding spaces may follow)");
    return 0;
}

static int ddp__st_by_name(const void *a, const void *b) {
    return strcmp(((const ddp__st_entry *)a)->name, ((const ddp__st_entry *)b)->name);
}
static int ddp__st_by_offset(const void *a, const void *b) {
    const ddp__st_entry *x = (const ddp__st_entry *)a, *y = (const ddp__st_entry *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

/* "F32 [256,784]" */
static void ddp__st_describe(const ddp__st_parser *ps, const ddp__st_entry *e, char *out, size_t cap) {
    int n = snprintf(out, cap, "%s [", ddp__st_dtypes[e->dtype].name), i;
    for (i = 0; i < e->ndim && n > 0 && (size_t)n < cap; i++)
        n += snprintf(out + n, cap - (size_t)n, i ? ",%llu" : "%llu", (unsigned long long)ps->dims[e->shape_at + (size_t)i]);
    if (n > 0 && (size_t)n < cap) snprintf(out + n, cap - (size_t)n, "]");
}

/* sizes, duplicates, coverage; then matched against the model */
static ddp_result ddp__st_check(ddp_context *ctx, ddp__st_parser *ps, const char *path, int flags) {
    const char *what = "ddp_load_safetensors";
    int i, k;
    for (i = 0; i < ps->nent; i++) {
        ddp__st_entry *e = &ps->ent[i];
        uint64_t n = 1;
        for (k = 0; k < e->ndim; k++) {
            uint64_t d = ps->dims[e->shape_at + (size_t)k];
            if (d && n > UINT64_MAX / d)
                return ddp__fail(ctx, DDP_ERROR_CORRUPT, "%s: '%s': tensor '%.200s' has a shape whose element count overflows", what, path, e->name);
            n *= d;
        }
        if (n > UINT64_MAX / ddp__st_dtypes[e->dtype].size || e->end < e->begin ||
            e->end - e->begin != n * ddp__st_dtypes[e->dtype].size)
            return ddp__fail(ctx, DDP_ERROR_CORRUPT, "%s: '%s': tensor '%.200s' has data_offsets [%llu,%llu], which do not hold its %llu elements of %s",
                             what, path, e->name, (unsigned long long)e->begin, (unsigned long long)e->end,
                             (unsigned long long)n, ddp__st_dtypes[e->dtype].name);
    }
    if (ps->nent > 1) qsort(ps->ent, (size_t)ps->nent, sizeof *ps->ent, ddp__st_by_name);
    for (i = 1; i < ps->nent; i++)
        if (!strcmp(ps->ent[i - 1].name, ps->ent[i].name))
            return ddp__fail(ctx, DDP_ERROR_CORRUPT, "%s: '%s': the tensor name '%.200s' appears twice", what, path, ps->ent[i].name);
    /* match parameters by name (binary search in the sorted entries) */
    for (i = 0; i < ctx->num_params; i++) {
        const ddp__param *p = &ctx->params[i];
        ddp__st_entry key, *e;
        memset(&key, 0, sizeof key);
        key.name = p->name;
        e = ps->nent ? (ddp__st_entry *)bsearch(&key, ps->ent, (size_t)ps->nent, sizeof *ps->ent, ddp__st_by_name) : NULL;
        if (!e) {
            if (flags & DDP_SAFETENSORS_ALLOW_MISSING) continue;
            return ddp__fail(ctx, DDP_ERROR_MISMATCH, "%s: '%s' has no tensor '%s' (parameter %d; DDP_SAFETENSORS_ALLOW_MISSING keeps such parameters as they are)",
                             what, path, p->name, i);
        }
        {
            int same = ddp__st_dtypes[e->dtype].param == p->dtype && e->ndim == p->ndim;
            for (k = 0; same && k < p->ndim; k++) same = ps->dims[e->shape_at + (size_t)k] == (uint64_t)p->shape[k];
            if (!same) {
                char a[300], b[300];
                ddp__st_describe(ps, e, a, sizeof a);
                ddp__describe_param(p, b, sizeof b);
                return ddp__fail(ctx, DDP_ERROR_MISMATCH, "%s: '%s': tensor '%s' is %s in the file; the parameter is %s%s", what, path,
                                 p->name, a, b, p->ndim == 1 && e->ndim > 1 ? " (register it with ddp_register_param_shape to give it the file's shape)" : "");
            }
        }
        e->param = i;
    }
    if (!(flags & DDP_SAFETENSORS_ALLOW_EXTRA))
        for (i = 0; i < ps->nent; i++)
            if (ps->ent[i].param < 0)
                return ddp__fail(ctx, DDP_ERROR_MISMATCH, "%s: '%s' has tensor '%.200s', which is no parameter of this model (DDP_SAFETENSORS_ALLOW_EXTRA skips such tensors)",
                                 what, path, ps->ent[i].name);
    /* the tensors cover the byte buffer: in offset order, each starts where the last ended */
    if (ps->nent > 1) qsort(ps->ent, (size_t)ps->nent, sizeof *ps->ent, ddp__st_by_offset);
    {
        uint64_t at = 0;
        for (i = 0; i < ps->nent; i++) {
            if (ps->ent[i].begin != at)
                return ddp__fail(ctx, DDP_ERROR_CORRUPT, "%s: '%s': tensor '%.200s' begins at byte %llu of the data, where %s",
                                 what, path, ps->ent[i].name, (unsigned long long)ps->ent[i].begin,
                                 ps->ent[i].begin > at ? "the bytes before it belong to no tensor (a hole)" : "another tensor's bytes are (an overlap)");
            at = ps->ent[i].end;
        }
    }
    return DDP_SUCCESS;
}

/* reads n bytes (into dst, or discarded when dst is NULL); 0 at a short read */
static int ddp__st_read(FILE *f, unsigned char *dst, uint64_t n, unsigned char *chunk) {
    while (n > 0) {
        size_t step = n > DDP__ST_CHUNK ? DDP__ST_CHUNK : (size_t)n;
        if (fread(dst ? dst : chunk, 1, step, f) != step) return 0;
        if (dst) dst += step;
        n -= step;
    }
    return 1;
}

static ddp_result ddp__st_load_file(ddp_context *ctx, const char *path, int flags) {
    const char *what = "ddp_load_safetensors";
    ddp__st_parser ps;
    unsigned char len8[8], *header = NULL, *pbuf = NULL, *chunk = NULL;
    uint64_t n = 0, got = 0;
    size_t cap = 0;
    int i, any16 = 0;
    ddp_result r = DDP_SUCCESS;
    FILE *f = fopen(path, "rb");
    memset(&ps, 0, sizeof ps);
    ps.ctx = ctx;
    if (!f) return ddp__fail(ctx, DDP_ERROR_IO, "%s: cannot open '%s': %s", what, path, ddp__strerror(errno));
    if (fread(len8, 1, 8, f) != 8) { r = ddp__fail(ctx, DDP_ERROR_CORRUPT, "%s: '%s' is shorter than the 8-byte header length", what, path); goto done; }
    for (i = 7; i >= 0; i--) n = (n << 8) | len8[i];
    if (n > DDP__ST_MAX_HEADER) {
        r = ddp__fail(ctx, DDP_ERROR_CORRUPT, "%s: '%s' declares a header of %llu bytes, over the format's limit of %u (not a safetensors file?)",
                      what, path, (unsigned long long)n, DDP__ST_MAX_HEADER);
        goto done;
    }
    chunk = (unsigned char *)ddp__alloc(ctx, DDP__ST_CHUNK);
    if (!chunk) { r = ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "%s: out of memory", what); goto done; }
    /* the header, grown as it arrives: a short file cannot make us allocate N */
    while (got < n) {
        size_t step = n - got > DDP__ST_CHUNK ? DDP__ST_CHUNK : (size_t)(n - got), rd;
        if (got + step > cap) {
            size_t ncap = cap ? cap : DDP__ST_CHUNK;
            unsigned char *nh;
            while (ncap < got + step) ncap *= 2;
            if (ncap > n) ncap = (size_t)n;
            nh = (unsigned char *)ddp__alloc(ctx, ncap);
            if (!nh) { r = ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "%s: out of memory for a %llu-byte header", what, (unsigned long long)n); goto done; }
            if (got) memcpy(nh, header, (size_t)got);
            ddp__free(ctx, header);
            header = nh;
            cap = ncap;
        }
        rd = fread(header + got, 1, step, f);
        got += rd;
        if (rd != step) {
            r = ddp__fail(ctx, DDP_ERROR_CORRUPT, "%s: '%s' declares a header of %llu bytes but has only %llu after the length",
                          what, path, (unsigned long long)n, (unsigned long long)got);
            goto done;
        }
    }
    /* a decoded string and its NUL never take more bytes than its JSON text
       with the quotes, so n bytes hold them all */
    ps.arena_cap = (size_t)n + 16;
    ps.arena = (char *)ddp__alloc(ctx, ps.arena_cap);
    if (!ps.arena) { r = ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "%s: out of memory", what); goto done; }
    ps.start = ps.p = header ? header : chunk;
    ps.end = ps.start + n;
    if (ddp__st_parse(&ps)) {
        r = ddp__fail(ctx, strstr(ps.err, "out of memory") ? DDP_ERROR_OUT_OF_MEMORY : DDP_ERROR_CORRUPT,
                      "%s: '%s' is not a valid safetensors file: %s", what, path, ps.err);
        goto done;
    }
    r = ddp__st_check(ctx, &ps, path, flags);
    if (r != DDP_SUCCESS) goto done;
    /* the data, in file order, into scratch; tensors of no parameter are read past */
    pbuf = (unsigned char *)ddp__alloc(ctx, ctx->flat_bytes ? ctx->flat_bytes : 1);
    if (!pbuf) { r = ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "%s: out of memory", what); goto done; }
    for (i = 0; i < ps.nent; i++) {
        const ddp__st_entry *e = &ps.ent[i];
        unsigned char *dst = e->param >= 0 ? pbuf + ctx->params[e->param].offset : NULL;
        if (!ddp__st_read(f, dst, e->end - e->begin, chunk)) {
            r = ddp__fail(ctx, DDP_ERROR_CORRUPT, "%s: '%s' is truncated in the data of tensor '%.200s'", what, path, e->name);
            goto done;
        }
        if (dst) ddp__st_swap(dst, (size_t)(e->end - e->begin), ddp__st_dtypes[e->dtype].size);
    }
    if (fgetc(f) != EOF) {
        r = ddp__fail(ctx, DDP_ERROR_CORRUPT, "%s: '%s' has bytes after its last tensor (the tensors must cover the data exactly)", what, path);
        goto done;
    }
    /* commit */
    for (i = 0; i < ps.nent && r == DDP_SUCCESS; i++) {
        const ddp__st_entry *e = &ps.ent[i];
        const ddp__param *p;
        if (e->param < 0) continue;
        p = &ctx->params[e->param];
        if (p->dtype == DDP_F16 || p->dtype == DDP_BF16) any16 = 1;
        if (ddp__on_gpu(ctx)) r = ddp__cuda_memcpy(ctx, ctx->flat_params + p->offset, pbuf + p->offset, (size_t)(e->end - e->begin), 1);
        else memcpy(ctx->flat_params + p->offset, pbuf + p->offset, (size_t)(e->end - e->begin));
    }
    if (r == DDP_SUCCESS && any16) r = ddp__init_master(ctx);
done:
    fclose(f);
    ddp__free(ctx, header);
    ddp__free(ctx, chunk);
    ddp__free(ctx, pbuf);
    ddp__free(ctx, ps.arena);
    ddp__free(ctx, ps.ent);
    ddp__free(ctx, ps.dims);
    return r;
}

DDP_API ddp_result ddp_load_safetensors(ddp_context *ctx, const char *path, int flags) {
    if (!ctx) return DDP_ERROR_INVALID_ARGUMENT;
    DDP__TRY(ddp__check_usable(ctx, "ddp_load_safetensors"));
    if (!path || !*path) return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_load_safetensors: path is NULL or empty");
    if (flags & ~(DDP_SAFETENSORS_ALLOW_EXTRA | DDP_SAFETENSORS_ALLOW_MISSING))
        return ddp__fail(ctx, DDP_ERROR_INVALID_ARGUMENT, "ddp_load_safetensors: unknown flags 0x%x", (unsigned)flags);
    if (!ctx->finalized) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_load_safetensors: call ddp_finalize() first");
    if (ctx->in_step) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "ddp_load_safetensors: not allowed inside a step");
    return ddp__agree(ctx, ddp__st_load_file(ctx, path, flags), "loading the safetensors file");
}

/* ---- CUDA: device memory, streams, NCCL and the host-staged backend ----------------

   Parameters and gradients live on the GPU. Marking a gradient ready records
   an event on the caller's stream. A complete bucket is reduced:
     nccl    on the communication stream, which first waits for the bucket's
             events; ncclAvg (or ncclSum) in place, then a scale kernel for
             what remains of ddp__reduce_factor (ddp_train_step's 1 / K, or
             1 / contributors with uneven inputs). The end of the step makes the
             user's stream wait for the communication stream: no host sync.
             A watchdog (the communication thread) polls every collective in
             flight; one that has not finished within the timeout, or an
             asynchronous NCCL error, aborts the communicator, so no path
             blocks forever inside NCCL.
     staged  by the communication thread: device to host (into this rank's
             slice of the shared gradient segment), the shm all-reduce, host
             to device; the user's stream waits for the last copy. */
#if defined(DDP_CUDA)

static int ddp__is_broken(const ddp_context *ctx) { return ddp__atomic_load_int(&ctx->broken) != 0; }

struct ddp__cuda_state {
    int device;
    cudaStream_t comm;            /* communication stream */
    cudaStream_t user;            /* ddp_set_stream(); NULL: legacy default stream */
    cudaEvent_t *ready;           /* per parameter */
    cudaEvent_t *done;            /* per parameter (one per communication bucket at most) */
    int          num_done;
    cudaEvent_t  last;            /* the last collective queued on comm */
    float       *d_norm;          /* device scalar for sumsq */
    int         *d_flag;          /* device flag for the non-finite check (loss scaling) */
    float       *d_scratch;       /* sumsq partials */
    size_t       scratch_elems;
    void        *compress_buf;    /* bucket in bf16/f16 for compressed all-reduce */
    void        *hook_cbuf;       /* the compression hooks' scratch */
    size_t       hook_cbuf_bytes;
    unsigned char *d_group_map;   /* ctx->group_map on the device (NULL with one group) */
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
static ddp_result ddp__cuda_scale(ddp_context *ctx, void *x, ddp_dtype t, size_t n, float f, cudaStream_t s, const char *what);

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
    if (!locked) ddp__mutex_lock(&ctx->mu);
    if (cu->nccl) {
        ddp__atomic_store_int(&cu->nccl_ready, 0);
        ncclCommAbort(cu->nccl);
        cu->nccl = NULL;
    }
    if (!locked) ddp__mutex_unlock(&ctx->mu);
}

static int ddp__nccl_ok(const ddp_context *ctx) { return ddp__atomic_load_int(&ctx->cuda->nccl_ready); }

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
        if (now - start < 2e-3) ddp__yield();
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
        if (len != sizeof id) { free(v); return ddp__fail(ctx, DDP_ERROR_NETWORK, "the NCCL id from the store has %" DDP__PRIzu " bytes, not %" DDP__PRIzu, len, sizeof id); }
        memcpy(&id, v, sizeof id);
        free(v);
    }
    cfg.blocking = 0;
    r = ncclCommInitRankConfig(&ctx->cuda->nccl, ctx->world, id, ctx->rank, &cfg);
    snprintf(what, sizeof what, "creating the NCCL communicator (rank %d of %d, GPU %d)", ctx->rank, ctx->world, ctx->cuda->device);
    if (r != ncclSuccess && r != ncclInProgress) return ddp__nccl_fail(ctx, r, what);
    if (r == ncclInProgress) ncclCommGetAsyncError(ctx->cuda->nccl, &r);
    DDP__TRY(ddp__nccl_settle(ctx, r, ctx->cfg.connect_timeout_s, what));
    ddp__atomic_store_int(&ctx->cuda->nccl_ready, 1);
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
        if (!ds) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "%s: no device memory for %" DDP__PRIzu " bytes of staging", what, a->send_bytes);
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
    if (!h) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "staged all-reduce: no host memory for %" DDP__PRIzu " bytes", bytes);
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
    if (!h) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "staged broadcast: no host memory for %" DDP__PRIzu " bytes", bytes);
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
    const ddp__cbucket *cb = &ctx->cb[b];
    unsigned char *host = ctx->shm.grads + (size_t)ctx->rank * ctx->shm.grad_stride;
    size_t es = ddp_dtype_size(cb->dtype);
    char what[96];
    int i, k;
    snprintf(what, sizeof what, "staged all-reduce of gradient bucket %d", b);
    for (i = 0; i < ctx->num_params; i++)
        if (ctx->params[i].cbucket == b && ctx->params[i].evrec) DDP__CU(ctx, cudaStreamWaitEvent(cu->comm, cu->ready[i], 0), what);
    for (k = 0; k < cb->nrange; k++) {
        const ddp__piece *rg = &ctx->cranges[cb->range0 + k];
        DDP__CU(ctx, cudaMemcpyAsync(host + rg->offset, ctx->flat_grads + rg->offset, rg->numel * es, cudaMemcpyDeviceToHost, cu->comm), what);
    }
    DDP__TRY(ddp__cuda_wait(ctx, NULL, cu->comm, what));
    if (ctx->world > 1) DDP__TRY(ddp__shm_reduce_pieces(ctx, b, scale, ctx->zero, what));
    else ddp__scale_ranges(ctx, host, b, scale);
    for (k = 0; k < cb->nrange; k++) {
        const ddp__piece *rg = &ctx->cranges[cb->range0 + k];
        DDP__CU(ctx, cudaMemcpyAsync(ctx->flat_grads + rg->offset, host + rg->offset, rg->numel * es, cudaMemcpyHostToDevice, cu->comm), what);
    }
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
    cu->d_flag = (int *)ddp__dev_alloc(ctx, sizeof(int));
    if (!cu->d_flag) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "no device memory for the non-finite flag");
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
    if (cu->done) { for (i = 0; i < cu->num_done; i++) if (cu->done[i]) cudaEventDestroy(cu->done[i]); ddp__free(ctx, cu->done); }
    if (cu->last) cudaEventDestroy(cu->last);
    ddp__free_device(ctx, cu->d_norm);
    ddp__free_device(ctx, cu->d_flag);
    ddp__free_device(ctx, cu->compress_buf);
    ddp__free_device(ctx, cu->hook_cbuf);
    ddp__free_device(ctx, cu->d_group_map);
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
        return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "no device memory for %" DDP__PRIzu " bytes of parameters and gradients", 2 * ctx->flat_bytes);
    DDP__CU(ctx, cudaMemset(ctx->flat_params, 0, ctx->flat_bytes), "zeroing parameters");
    DDP__CU(ctx, cudaMemset(ctx->flat_grads, 0, ctx->flat_bytes), "zeroing gradients");
    for (i = 0; i < ctx->num_params; i++)
        if (ctx->params[i].init)
            DDP__CU(ctx, cudaMemcpy(ctx->flat_params + ctx->params[i].offset, ctx->params[i].init,
                                    ctx->params[i].numel * ddp_dtype_size(ctx->params[i].dtype), cudaMemcpyHostToDevice),
                    "copying initial weights to the GPU");
    DDP__CU(ctx, cudaDeviceSynchronize(), "copying initial weights to the GPU");
    cu->ready = (cudaEvent_t *)ddp__calloc(ctx, (size_t)ctx->num_params * sizeof(cudaEvent_t));
    cu->done = (cudaEvent_t *)ddp__calloc(ctx, (size_t)ctx->num_params * sizeof(cudaEvent_t));
    if (!cu->ready || !cu->done) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "out of memory for events");
    for (i = 0; i < ctx->num_params; i++) DDP__CU(ctx, cudaEventCreateWithFlags(&cu->ready[i], cudaEventDisableTiming), "creating events");
    /* one per parameter: a rebuilt bucket order (at most one bucket per parameter) needs no new ones */
    for (i = 0; i < ctx->num_params; i++) {
        DDP__CU(ctx, cudaEventCreateWithFlags(&cu->done[i], cudaEventDisableTiming), "creating events");
        cu->num_done = i + 1;
    }
    /* the compression buffer fits the largest bucket of any order: the caps
       bound a bucket to its cap plus one parameter */
    for (i = 0; i < ctx->num_params; i++) {
        size_t pb = ddp__align_up(ctx->params[i].numel * ddp_dtype_size(ctx->params[i].dtype), DDP__ALIGN);
        if (pb > maxb) maxb = pb;
    }
    maxb += ctx->cfg.first_bucket_bytes > ctx->cfg.bucket_bytes ? ctx->cfg.first_bucket_bytes : ctx->cfg.bucket_bytes;
    for (i = 0; i < ctx->num_buckets; i++)
        if (ctx->buckets[i].bytes > maxb) maxb = ctx->buckets[i].bytes;
    if (ctx->num_groups > 1) {
        size_t chunks = ctx->flat_bytes / DDP__ALIGN;
        cu->d_group_map = (unsigned char *)ddp__dev_alloc(ctx, chunks);
        if (!cu->d_group_map) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "no device memory for the parameter group map");
        DDP__CU(ctx, cudaMemcpy(cu->d_group_map, ctx->group_map, chunks, cudaMemcpyHostToDevice), "copying the parameter group map");
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
        if (p->cbucket != b) continue; /* other buckets' flags may still be read by the comm thread */
        p->evrec = 0;
        if (!p->marked) p->stream = (void *)ddp__ustream(ctx); /* unused parameter: nothing of it is pending */
        for (j = 0; j < i && !seen; j++)
            seen = ctx->params[j].cbucket == b && ctx->params[j].evrec && ctx->params[j].stream == p->stream;
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
    const ddp__cbucket *cb = &ctx->cb[b];
    size_t es = ddp_dtype_size(cb->dtype);
    char what[96];
    ncclResult_t r = ncclSuccess;
    int k;
    /* the factor of this reduce (ddp__reduce_factor, fixed at ddp_step_begin()): ncclAvg
       when it divides by the whole world, then what remains (ddp_train_step's 1 / micro_steps) */
    int avg = !ctx->cfg.gradient_sum && ctx->divisor == (double)ctx->world;
    float post = avg ? (float)(1.0 / ctx->window_div) : (float)ctx->q_scale;
    snprintf(what, sizeof what, "NCCL all-reduce of gradient bucket %d (%" DDP__PRIzu " bytes)", b, cb->numel * es);
    if (!ddp__nccl_ok(ctx)) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "%s: the communicator was aborted", what);
    DDP__TRY(ddp__cuda_bucket_events(ctx, b, 1));
    if (cu->compress_buf && cb->dtype == DDP_F32) {
        /* packed into the compression buffer, scaled before the reduce so the
           16-bit sum cannot overflow */
        float pre = (float)ctx->q_scale;
        size_t at = 0, cs = ddp_dtype_size(ctx->cfg.compress);
        for (k = 0; k < cb->nrange; k++) {
            const ddp__piece *rg = &ctx->cranges[cb->range0 + k];
            DDP__KL(ctx, ddp_k_cast((unsigned char *)cu->compress_buf + at * cs, (int)ctx->cfg.compress, ctx->flat_grads + rg->offset,
                                    (int)DDP_F32, rg->numel, pre, cu->comm), what);
            at += rg->numel;
        }
        r = ncclAllReduce(cu->compress_buf, cu->compress_buf, cb->numel, ddp__nccl_type(ctx->cfg.compress), ncclSum, cu->nccl, cu->comm);
        if (r == ncclInProgress) ncclCommGetAsyncError(cu->nccl, &r);
        DDP__TRY(ddp__nccl_settle(ctx, r, ctx->cfg.timeout_s, what));
        for (at = 0, k = 0; k < cb->nrange; k++) {
            const ddp__piece *rg = &ctx->cranges[cb->range0 + k];
            DDP__KL(ctx, ddp_k_cast(ctx->flat_grads + rg->offset, (int)DDP_F32, (unsigned char *)cu->compress_buf + at * cs,
                                    (int)ctx->cfg.compress, rg->numel, 1.0f, cu->comm), what);
            at += rg->numel;
        }
    } else if (ctx->zero) {
        /* ZeRO-1: each rank needs only its shards. A bucket that is one whole
           storage bucket (equal shards, see ddp__assign_buckets) is one
           reduce-scatter in place; a bucket of several ranges reduces each
           piece to the rank that owns it. */
        const ddp__piece *rg = &ctx->cranges[cb->range0];
        const ddp__bucket *sb = &ctx->buckets[rg->owner];
        ncclRedOp_t op = avg ? ncclAvg : ncclSum;
        if (cb->nrange == 1 && rg->offset == sb->offset && rg->numel == sb->numel) {
            size_t per = sb->numel / (size_t)ctx->world;
            unsigned char *g = ctx->flat_grads + sb->offset;
            r = ncclReduceScatter(g, g + (size_t)ctx->rank * per * es, per, ddp__nccl_type(cb->dtype), op, cu->nccl, cu->comm);
        } else {
            ncclGroupStart();
            for (k = 0; k < cb->npiece && (r == ncclSuccess || r == ncclInProgress); k++) {
                const ddp__piece *pc = &ctx->cpieces[cb->piece0 + k];
                void *g = ctx->flat_grads + pc->offset;
                r = ncclReduce(g, g, pc->numel, ddp__nccl_type(cb->dtype), op, pc->owner, cu->nccl, cu->comm);
            }
            { ncclResult_t e = ncclGroupEnd(); if (r == ncclSuccess) r = e; }
        }
        if (r == ncclInProgress) ncclCommGetAsyncError(cu->nccl, &r);
        DDP__TRY(ddp__nccl_settle(ctx, r, ctx->cfg.timeout_s, what));
        for (k = 0; k < cb->npiece && post != 1.0f; k++) {
            const ddp__piece *pc = &ctx->cpieces[cb->piece0 + k];
            if (pc->owner == ctx->rank)
                DDP__TRY(ddp__cuda_scale(ctx, ctx->flat_grads + pc->offset, cb->dtype, pc->numel, post, cu->comm, what));
        }
    } else {
        /* one collective per range, grouped: NCCL runs them as one launch */
        if (cb->nrange > 1) ncclGroupStart();
        for (k = 0; k < cb->nrange && (r == ncclSuccess || r == ncclInProgress); k++) {
            const ddp__piece *rg = &ctx->cranges[cb->range0 + k];
            void *g = ctx->flat_grads + rg->offset;
            r = ncclAllReduce(g, g, rg->numel, ddp__nccl_type(cb->dtype), avg ? ncclAvg : ncclSum, cu->nccl, cu->comm);
        }
        if (cb->nrange > 1) { ncclResult_t e = ncclGroupEnd(); if (r == ncclSuccess) r = e; }
        if (r == ncclInProgress) ncclCommGetAsyncError(cu->nccl, &r);
        DDP__TRY(ddp__nccl_settle(ctx, r, ctx->cfg.timeout_s, what));
        for (k = 0; k < cb->nrange && post != 1.0f; k++) {
            const ddp__piece *rg = &ctx->cranges[cb->range0 + k];
            DDP__TRY(ddp__cuda_scale(ctx, ctx->flat_grads + rg->offset, cb->dtype, rg->numel, post, cu->comm, what));
        }
    }
    DDP__CU(ctx, cudaEventRecord(cu->done[b], cu->comm), what);
    DDP__CU(ctx, cudaEventRecord(cu->last, cu->comm), what);
    ddp__mutex_lock(&ctx->mu);
    cu->inflight = 1;
    cu->inflight_since = ddp__now();
    ddp__copy_str(cu->inflight_what, sizeof cu->inflight_what, what);
    ddp__cond_signal(&ctx->cv_work);
    ddp__mutex_unlock(&ctx->mu);
    return DDP_SUCCESS;
#else
    (void)b;
    return ddp__fail(ctx, DDP_ERROR_UNSUPPORTED, "NCCL is not compiled in");
#endif
}

/* ---- communication hooks on the GPU ----

   The hook sees the bucket once its gradients are final: the bucket's
   ready events are waited for on the communication stream (nccl: recorded
   now, on your thread; staged: recorded at the launch) and the stream is
   drained, so that the hook's collectives (which copy through the host or
   run NCCL and wait) read finished gradients. Afterwards the bucket's
   events are recorded on the communication stream, as for the built-in
   reduction, and the end of the step waits for them. */
static ddp_result ddp__cuda_hook_prepare(ddp_context *ctx, int b) {
    struct ddp__cuda_state *cu = ctx->cuda;
    int i;
    if (ctx->cfg.backend == DDP_BACKEND_NCCL) {
        DDP__TRY(ddp__cuda_bucket_events(ctx, b, 1));
    } else {
        for (i = 0; i < ctx->num_params; i++)
            if (ctx->params[i].cbucket == b && ctx->params[i].evrec)
                DDP__CU(ctx, cudaStreamWaitEvent(cu->comm, cu->ready[i], 0), "waiting for a bucket's gradients (communication hook)");
    }
    return ddp__cuda_wait(ctx, NULL, cu->comm, "waiting for a bucket's gradients (communication hook)");
}

static ddp_result ddp__cuda_hook_finish(ddp_context *ctx, int b) {
    struct ddp__cuda_state *cu = ctx->cuda;
    const char *what = "a communication hook";
    DDP__CU(ctx, cudaEventRecord(cu->done[b], cu->comm), what);
    DDP__CU(ctx, cudaEventRecord(cu->last, cu->comm), what);
    if (ctx->cfg.backend == DDP_BACKEND_NCCL) {
        ddp__mutex_lock(&ctx->mu);
        cu->inflight = 1;
        cu->inflight_since = ddp__now();
        ddp__copy_str(cu->inflight_what, sizeof cu->inflight_what, what);
        ddp__cond_signal(&ctx->cv_work);
        ddp__mutex_unlock(&ctx->mu);
    }
    return DDP_SUCCESS;
}

/* What a hook queued on its stream is done. */
static ddp_result ddp__cuda_hook_sync(ddp_context *ctx) {
    return ddp__cuda_wait(ctx, NULL, ctx->cuda->comm, "a communication hook's stream");
}

static ddp_result ddp__cuda_hook_scale(ddp_context *ctx, void *buf, ddp_dtype t, size_t n, double scale) {
    if (!ddp__is_device_ptr(buf)) {
        ddp__reduce(&buf, 1, &buf, 1, n, t, DDP_OP_SUM, scale);
        return DDP_SUCCESS;
    }
    if (t != DDP_F32 && t != DDP_F16 && t != DDP_BF16)
        return ddp__fail(ctx, DDP_ERROR_UNSUPPORTED, "allreduce in a communication hook: a scale on %s device memory", ddp_dtype_name(t));
    DDP__TRY(ddp__cuda_scale(ctx, buf, t, n, (float)scale, ctx->cuda->comm, "allreduce in a communication hook"));
    return ddp__cuda_hook_sync(ctx);
}

static ddp_result ddp__cuda_copy_dd(ddp_context *ctx, void *dst, const void *src, size_t bytes) {
    DDP__CU(ctx, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, ctx->cuda->comm), "packing a bucket for a communication hook");
    return DDP_SUCCESS;
}

/* The compression hooks on device memory: cast (times scale) into a
   scratch buffer of their own on the communication stream, the sum in the
   16-bit type, cast back. */
static ddp_result ddp__cuda_hook_compress(ddp_context *ctx, const ddp_comm_bucket *b, ddp_dtype ct) {
    struct ddp__cuda_state *cu = ctx->cuda;
    cudaStream_t s = cu->comm;
    size_t need = b->count * 2;
    ddp_result r;
    if (cu->hook_cbuf_bytes < need) {
        void *p = ddp__dev_alloc(ctx, need);
        if (!p) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "no device memory for %" DDP__PRIzu " bytes of compression scratch", need);
        ddp__free_device(ctx, cu->hook_cbuf);
        cu->hook_cbuf = p;
        cu->hook_cbuf_bytes = need;
    }
    DDP__KL(ctx, ddp_k_cast(cu->hook_cbuf, (int)ct, b->grad, (int)DDP_F32, b->count, (float)b->scale, s), "compression hook");
    r = b->allreduce(b->comm, cu->hook_cbuf, b->count, ct, DDP_OP_SUM, 1.0);
    if (r != DDP_SUCCESS) return r;
    DDP__KL(ctx, ddp_k_cast(b->grad, (int)DDP_F32, cu->hook_cbuf, (int)ct, b->count, 1.0f, s), "compression hook");
    return ddp__cuda_hook_sync(ctx);
}

static void *ddp__cuda_comm_stream(ddp_context *ctx) { return ctx->cuda ? (void *)ctx->cuda->comm : NULL; }

/* x *= f in x's type (f32 in place; f16/bf16 through an in-place cast). */
static ddp_result ddp__cuda_scale(ddp_context *ctx, void *x, ddp_dtype t, size_t n, float f, cudaStream_t s, const char *what) {
    if (t == DDP_F32) DDP__KL(ctx, ddp_k_scale((float *)x, n, f, s), what);
    else DDP__KL(ctx, ddp_k_cast(x, (int)t, x, (int)t, n, f, s), what);
    return DDP_SUCCESS;
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
    if ((float)ctx->q_scale != 1.0f)
        for (b = 0; b < ctx->num_buckets; b++)
            DDP__TRY(ddp__cuda_scale(ctx, ctx->flat_grads + ctx->buckets[b].offset, ctx->buckets[b].dtype, ctx->buckets[b].numel,
                                     (float)ctx->q_scale, s, "scaling the accumulated gradients"));
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
    ddp__mutex_lock(&ctx->mu);
    while (!ctx->q_stop) {
        double since;
        char what[96];
        cudaError_t e;
        if (!cu->inflight) { ddp__cond_wait(&ctx->cv_work, &ctx->mu); continue; }
        since = cu->inflight_since;
        memcpy(what, cu->inflight_what, sizeof what);
        ddp__mutex_unlock(&ctx->mu);
        e = cudaEventQuery(cu->last);
        ddp__mutex_lock(&ctx->mu);
        if (e == cudaSuccess) { if (cu->inflight_since == since) cu->inflight = 0; continue; }
        {
            int late = ddp__now() - since > ctx->cfg.timeout_s;
            ddp_result code;
#if defined(DDP_NCCL)
            ncclResult_t nr = ncclSuccess;
            if (ddp__nccl_ok(ctx)) ncclCommGetAsyncError(cu->nccl, &nr);
            if (e == cudaErrorNotReady && !late && (nr == ncclSuccess || nr == ncclInProgress)) {
                ddp__mutex_unlock(&ctx->mu);
                ddp__sleep_us(1000);
                ddp__mutex_lock(&ctx->mu);
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
    ddp__mutex_unlock(&ctx->mu);
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

/* ddp_k_nonfinite over every bucket into one device flag; the host waits for it. */
static ddp_result ddp__cuda_nonfinite(ddp_context *ctx, int *found) {
    struct ddp__cuda_state *cu = ctx->cuda;
    cudaStream_t s = ddp__ustream(ctx);
    int b, h = 0;
    DDP__CU(ctx, cudaMemsetAsync(cu->d_flag, 0, sizeof(int), s), "checking the gradients for inf/NaN");
    for (b = 0; b < ctx->num_buckets; b++)
        DDP__KL(ctx, ddp_k_nonfinite(ctx->flat_grads + ctx->buckets[b].offset, (int)ctx->buckets[b].dtype, ctx->buckets[b].numel,
                                     cu->d_flag, s), "checking the gradients for inf/NaN");
    DDP__CU(ctx, cudaMemcpyAsync(&h, cu->d_flag, sizeof(int), cudaMemcpyDeviceToHost, s), "checking the gradients for inf/NaN");
    DDP__TRY(ddp__cuda_wait(ctx, NULL, s, "checking the gradients for inf/NaN"));
    *found = h != 0;
    return DDP_SUCCESS;
}

/* ZeRO-1: the squared norm and the non-finite flag of elements [lo, hi)
   of storage bucket b (the host waits for them). */
static ddp_result ddp__cuda_range_stats(ddp_context *ctx, int b, size_t lo, size_t hi, int want_norm, int want_flag,
                                        double *sumsq, int *bad) {
    struct ddp__cuda_state *cu = ctx->cuda;
    const ddp__bucket *bk = &ctx->buckets[b];
    cudaStream_t s = ddp__ustream(ctx);
    const unsigned char *g = ctx->flat_grads + bk->offset + lo * ddp_dtype_size(bk->dtype);
    float v = 0;
    int h = 0;
    *sumsq = 0;
    *bad = 0;
    if (hi <= lo) return DDP_SUCCESS;
    if (want_norm) {
        DDP__KL(ctx, ddp_k_sumsq_typed(g, (int)bk->dtype, hi - lo, cu->d_norm, cu->d_scratch, cu->scratch_elems, s), "gradient norm");
        DDP__CU(ctx, cudaMemcpyAsync(&v, cu->d_norm, sizeof v, cudaMemcpyDeviceToHost, s), "gradient norm");
    }
    if (want_flag) {
        DDP__CU(ctx, cudaMemsetAsync(cu->d_flag, 0, sizeof(int), s), "checking the gradients for inf/NaN");
        DDP__KL(ctx, ddp_k_nonfinite(g, (int)bk->dtype, hi - lo, cu->d_flag, s), "checking the gradients for inf/NaN");
        DDP__CU(ctx, cudaMemcpyAsync(&h, cu->d_flag, sizeof(int), cudaMemcpyDeviceToHost, s), "checking the gradients for inf/NaN");
    }
    DDP__TRY(ddp__cuda_wait(ctx, NULL, s, "gradient norm"));
    *sumsq = v;
    *bad = h != 0;
    return DDP_SUCCESS;
}

/* The gradients of this rank's ranges (ZeRO-1: its shards) times f. */
static ddp_result ddp__cuda_scale_grads(ddp_context *ctx, float f) {
    int b;
    for (b = 0; b < ctx->num_buckets; b++) {
        const ddp__bucket *bk = &ctx->buckets[b];
        size_t lo, hi;
        ddp__own_range(ctx, b, &lo, &hi);
        if (hi > lo)
            DDP__TRY(ddp__cuda_scale(ctx, ctx->flat_grads + bk->offset + lo * ddp_dtype_size(bk->dtype), bk->dtype, hi - lo, f,
                                     ddp__ustream(ctx), "scaling the gradients"));
    }
    return DDP_SUCCESS;
}

/* ZeRO-1 on the GPU: the parameters' all-gather after the sharded update.
   nccl: one all-gather in place per storage bucket (the shards are equal),
   grouped, on the communication stream between the user's stream's
   optimizer and whatever the user queues next. staged: this rank's shards
   to the exchange region, the shm exchange, the others' shards back. */
static ddp_result ddp__cuda_param_gather(ddp_context *ctx) {
    struct ddp__cuda_state *cu = ctx->cuda;
    cudaStream_t us = ddp__ustream(ctx);
    const char *what = "the parameter all-gather (ZeRO-1)";
    int b, q;
    if (ctx->cfg.backend == DDP_BACKEND_NCCL) {
#if defined(DDP_NCCL)
        ncclResult_t r = ncclSuccess;
        if (!ddp__nccl_ok(ctx)) return ddp__fail(ctx, DDP_ERROR_INVALID_STATE, "%s: the communicator was aborted", what);
        DDP__CU(ctx, cudaEventRecord(cu->last, us), what);
        DDP__CU(ctx, cudaStreamWaitEvent(cu->comm, cu->last, 0), what);
        ncclGroupStart();
        for (b = 0; b < ctx->num_buckets && (r == ncclSuccess || r == ncclInProgress); b++) {
            const ddp__bucket *bk = &ctx->buckets[b];
            size_t per = bk->numel / (size_t)ctx->world, es = ddp_dtype_size(bk->dtype);
            unsigned char *p = ctx->flat_params + bk->offset;
            r = ncclAllGather(p + (size_t)ctx->rank * per * es, p, per * es, ncclUint8, cu->nccl, cu->comm);
        }
        { ncclResult_t e = ncclGroupEnd(); if (r == ncclSuccess) r = e; }
        if (r == ncclInProgress) ncclCommGetAsyncError(cu->nccl, &r);
        DDP__TRY(ddp__nccl_settle(ctx, r, ctx->cfg.timeout_s, what));
        DDP__CU(ctx, cudaEventRecord(cu->last, cu->comm), what);
        DDP__CU(ctx, cudaStreamWaitEvent(us, cu->last, 0), what);
        ddp__mutex_lock(&ctx->mu);
        cu->inflight = 1;
        cu->inflight_since = ddp__now();
        ddp__copy_str(cu->inflight_what, sizeof cu->inflight_what, what);
        ddp__cond_signal(&ctx->cv_work);
        ddp__mutex_unlock(&ctx->mu);
        return DDP_SUCCESS;
#else
        return ddp__fail(ctx, DDP_ERROR_UNSUPPORTED, "NCCL is not compiled in");
#endif
    }
    {
        uint64_t seq;
        DDP__TRY(ddp__xchg_claim(ctx));
        for (b = 0; b < ctx->num_buckets; b++) {
            const ddp__bucket *bk = &ctx->buckets[b];
            size_t lo, hi, es = ddp_dtype_size(bk->dtype);
            ddp__shard_of(ctx, b, ctx->rank, &lo, &hi);
            if (hi > lo)
                DDP__CU(ctx, cudaMemcpyAsync(ctx->shm.xchg + bk->offset + lo * es, ctx->flat_params + bk->offset + lo * es,
                                             (hi - lo) * es, cudaMemcpyDeviceToHost, us), what);
        }
        DDP__TRY(ddp__cuda_wait(ctx, NULL, us, what));
        DDP__TRY(ddp__xchg_publish(ctx, &seq));
        for (q = 0; q < ctx->world; q++) {
            if (q == ctx->rank) continue;
            for (b = 0; b < ctx->num_buckets; b++) {
                const ddp__bucket *bk = &ctx->buckets[b];
                size_t lo, hi, es = ddp_dtype_size(bk->dtype);
                ddp__shard_of(ctx, b, q, &lo, &hi);
                if (hi > lo)
                    DDP__CU(ctx, cudaMemcpyAsync(ctx->flat_params + bk->offset + lo * es, ctx->shm.xchg + bk->offset + lo * es,
                                                 (hi - lo) * es, cudaMemcpyHostToDevice, us), what);
            }
        }
        /* the copies read the exchange region: done only once they ran */
        DDP__TRY(ddp__cuda_wait(ctx, NULL, us, what));
        ddp__xchg_release(ctx, seq);
    }
    return DDP_SUCCESS;
}

/* Accumulation buffers (see ACCUMULATION): device memory, work on the user's stream. */
static ddp_result ddp__cuda_grad_buffer(ddp_context *ctx, void **slot) {
    *slot = ddp__dev_alloc(ctx, ctx->flat_bytes);
    if (!*slot) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "no device memory for %" DDP__PRIzu " bytes of accumulated gradients", ctx->flat_bytes);
    return DDP_SUCCESS;
}

static ddp_result ddp__cuda_grad_copy(ddp_context *ctx, void *dst, const void *src) {
    DDP__CU(ctx, cudaMemcpyAsync(dst, src, ctx->flat_bytes, cudaMemcpyDeviceToDevice, ddp__ustream(ctx)), "copying accumulated gradients");
    return DDP_SUCCESS;
}

/* dst += src on `stream` (NULL: the user's stream); the user's stream then
   waits for it too. */
static ddp_result ddp__cuda_grad_add(ddp_context *ctx, void *dst, const void *src, void *stream) {
    cudaStream_t s = stream ? (cudaStream_t)stream : ddp__ustream(ctx);
    int b;
    for (b = 0; b < ctx->num_buckets; b++) {
        const ddp__bucket *bk = &ctx->buckets[b];
        DDP__KL(ctx, ddp_k_add((unsigned char *)dst + bk->offset, (const unsigned char *)src + bk->offset, (int)bk->dtype, bk->numel, s),
                "adding accumulated gradients");
    }
    if (s != ddp__ustream(ctx)) {
        DDP__CU(ctx, cudaEventRecord(ctx->cuda->last, s), "joining streams");
        DDP__CU(ctx, cudaStreamWaitEvent(ddp__ustream(ctx), ctx->cuda->last, 0), "joining streams");
    }
    return DDP_SUCCESS;
}

static ddp_result ddp__cuda_state_alloc(ddp_context *ctx, void **slot) {
    *slot = ddp__dev_alloc(ctx, ctx->opt_state_bytes);
    if (!*slot) return ddp__fail(ctx, DDP_ERROR_OUT_OF_MEMORY, "no device memory for %" DDP__PRIzu " bytes of optimizer state", ctx->opt_state_bytes);
    return ddp__cuda_zero(ctx, *slot, ctx->opt_state_bytes);
}

static ddp_result ddp__cuda_zero(ddp_context *ctx, void *p, size_t bytes) {
    DDP__CU(ctx, cudaMemsetAsync(p, 0, bytes, ddp__ustream(ctx)), "zeroing optimizer state");
    return DDP_SUCCESS;
}

static ddp_result ddp__cuda_init_master(ddp_context *ctx) {
    int b;
    for (b = 0; b < ctx->num_buckets; b++) {
        const ddp__bucket *bk = &ctx->buckets[b];
        size_t lo, hi;
        if (bk->dtype == DDP_F32) continue;
        ddp__own_range(ctx, b, &lo, &hi);
        if (hi > lo)
            DDP__KL(ctx, ddp_k_cast(ddp__state_el(ctx, ctx->opt_master, b, lo), (int)DDP_F32,
                                    ctx->flat_params + bk->offset + lo * ddp_dtype_size(bk->dtype), (int)bk->dtype,
                                    hi - lo, 1.0f, ddp__ustream(ctx)), "initialising master weights");
    }
    return DDP_SUCCESS;
}

/* One launch per bucket, parameter groups through the device group map
   (the same map the CPU path reads). */
static ddp_result ddp__cuda_optimizer_step(ddp_context *ctx, const ddp__hyper *h) {
    cudaStream_t s = ddp__ustream(ctx);
    ddp_k_optim o;
    ddp_k_groups gr;
    int b, g;
    memset(&o, 0, sizeof o);
    memset(&gr, 0, sizeof gr);
    o.type = h->adamw ? DDP_K_ADAMW : DDP_K_SGD;
    o.lr = h->lr;
    o.momentum = h->momentum;
    o.dampening = h->dampening;
    o.nesterov = h->nesterov;
    o.weight_decay = h->wd;
    o.beta1 = h->beta1;
    o.beta2 = h->beta2;
    o.eps = h->eps;
    o.step = h->t;
    o.grad_scale = h->gs32;
    gr.map = ctx->cuda->d_group_map;
    gr.count = ctx->num_groups;
    for (g = 0; g < ctx->num_groups; g++) { gr.lr_scale[g] = ctx->group_lr[g]; gr.wd_scale[g] = ctx->group_wd[g]; }
    for (b = 0; b < ctx->num_buckets; b++) {
        const ddp__bucket *bk = &ctx->buckets[b];
        size_t es = ddp_dtype_size(bk->dtype), lo, hi;
        void *p, *gp;
        float *m, *v, *master;
        ddp__own_range(ctx, b, &lo, &hi); /* the whole bucket, or this rank's ZeRO-1 shard */
        if (hi <= lo) continue;
        p = ctx->flat_params + bk->offset + lo * es;
        gp = ctx->flat_grads + bk->offset + lo * es;
        m = (float *)ddp__state_el(ctx, ctx->opt_m, b, lo);
        v = (float *)ddp__state_el(ctx, ctx->opt_v, b, lo);
        master = (float *)ddp__state_el(ctx, ctx->opt_master, b, lo);
        gr.first = bk->offset / es + lo;
        gr.chunk_log2 = es == 4 ? 6 : 7; /* DDP__ALIGN bytes per chunk */
        if (bk->dtype == DDP_F32)
            DDP__KL(ctx, ddp_k_optimizer_step(NULL, 0, (float *)p, gp, (int)DDP_F32, m, v, hi - lo, &o, &gr, s),
                    h->adamw ? "AdamW step" : "SGD step");
        else
            DDP__KL(ctx, ddp_k_optimizer_step(p, (int)bk->dtype, master, gp, (int)bk->dtype, m, v, hi - lo, &o, &gr, s),
                    h->adamw ? "AdamW step (mixed precision)" : "SGD step (mixed precision)");
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
static ddp_result ddp__cuda_optimizer_step(ddp_context *ctx, const ddp__hyper *h) { (void)h; return ddp__cuda_unreachable(ctx); }
static ddp_result ddp__cuda_sumsq(ddp_context *ctx, double *o) { (void)o; return ddp__cuda_unreachable(ctx); }
static ddp_result ddp__cuda_nonfinite(ddp_context *ctx, int *f) { (void)f; return ddp__cuda_unreachable(ctx); }
static ddp_result ddp__cuda_scale_grads(ddp_context *ctx, float s) { (void)s; return ddp__cuda_unreachable(ctx); }
static ddp_result ddp__cuda_param_gather(ddp_context *ctx) { return ddp__cuda_unreachable(ctx); }
static ddp_result ddp__cuda_hook_prepare(ddp_context *ctx, int b) { (void)b; return ddp__cuda_unreachable(ctx); }
static ddp_result ddp__cuda_hook_finish(ddp_context *ctx, int b) { (void)b; return ddp__cuda_unreachable(ctx); }
static ddp_result ddp__cuda_hook_sync(ddp_context *ctx) { return ddp__cuda_unreachable(ctx); }
static ddp_result ddp__cuda_hook_scale(ddp_context *ctx, void *buf, ddp_dtype t, size_t n, double scale) {
    (void)buf; (void)t; (void)n; (void)scale; return ddp__cuda_unreachable(ctx);
}
static ddp_result ddp__cuda_copy_dd(ddp_context *ctx, void *dst, const void *src, size_t bytes) {
    (void)dst; (void)src; (void)bytes; return ddp__cuda_unreachable(ctx);
}
static ddp_result ddp__cuda_hook_compress(ddp_context *ctx, const ddp_comm_bucket *b, ddp_dtype ct) {
    (void)b; (void)ct; return ddp__cuda_unreachable(ctx);
}
static void *ddp__dev_alloc(ddp_context *ctx, size_t bytes) { (void)ctx; (void)bytes; return NULL; }
static void *ddp__cuda_comm_stream(ddp_context *ctx) { (void)ctx; return NULL; }
static ddp_result ddp__cuda_range_stats(ddp_context *ctx, int b, size_t lo, size_t hi, int want_norm, int want_flag,
                                        double *sumsq, int *bad) {
    (void)b; (void)lo; (void)hi; (void)want_norm; (void)want_flag; *sumsq = 0; *bad = 0; return ddp__cuda_unreachable(ctx);
}
static ddp_result ddp__cuda_zero_grads(ddp_context *ctx) { return ddp__cuda_unreachable(ctx); }
static ddp_result ddp__cuda_grad_buffer(ddp_context *ctx, void **slot) { (void)slot; return ddp__cuda_unreachable(ctx); }
static ddp_result ddp__cuda_grad_copy(ddp_context *ctx, void *d, const void *s) { (void)d; (void)s; return ddp__cuda_unreachable(ctx); }
static ddp_result ddp__cuda_grad_add(ddp_context *ctx, void *d, const void *s, void *st) { (void)d; (void)s; (void)st; return ddp__cuda_unreachable(ctx); }
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
