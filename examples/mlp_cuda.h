/* mlp_cuda.h - the MLP of mlp.h on a CUDA GPU: cuBLAS GEMMs and a few
   kernels, for the ddp.h examples. Declarations only, no CUDA types: this
   header compiles as C99 with any C compiler; the implementation is
   examples/mlp_cuda.cu (nvcc, link -lcublas -lcudart). One translation
   unit of the program must define MLP_IMPLEMENTATION before including
   mlp.h (the shape helpers live there).

   Same model, same parameter order and layouts, same loss as mlp.h (read
   its LOSS AND DATA PARALLELISM section): params[p] and grads[p] are device
   pointers (on a CUDA ddp context: ddp_param_data / ddp_param_grad), the
   gradient GEMMs run with beta = 1 and the bias reduction adds, so
   gradients accumulate (+=) into what the library zeroed.

   Everything is queued on one stream (yours, or one the model creates) and
   nothing synchronises the host except the functions that say so:
   mlp_cuda_read_stats, mlp_cuda_evaluate and mlp_cuda_destroy. The upload
   waits only for the copy issued two uploads earlier (double-buffered
   pinned staging).

   Every function returning int returns 0 on success and -1 on failure,
   with the message (the CUDA or cuBLAS call, file:line, the error string)
   in mlp_cuda_error(). After a CUDA error the model is unusable.
*/
#ifndef MLP_CUDA_H_INCLUDED
#define MLP_CUDA_H_INCLUDED

#include <stddef.h>
#include <stdint.h>
#include "mlp.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mlp_cuda mlp_cuda;

/* flags for mlp_cuda_create */
enum {
    MLP_CUDA_NEW_STREAM = 1, /* create (and own) a stream, ignore the stream argument;
                                it is an ordinary (blocking) stream, so it orders
                                with work on the legacy default stream */
    MLP_CUDA_TF32       = 2, /* allow TF32 tensor cores in the GEMMs (faster, ~1e-3) */
    MLP_CUDA_PEDANTIC   = 4  /* CUBLAS_PEDANTIC_MATH: strict FP32 (for tests) */
};

/* Number of CUDA devices; 0 when there is none or no driver (never fails). */
int mlp_cuda_device_count(void);

/* A model for batches of up to max_batch rows on device (>= 0: made
   current with cudaSetDevice; < 0: the current device). stream is a
   cudaStream_t (NULL: the legacy default stream) unless flags has
   MLP_CUDA_NEW_STREAM. On failure *out is NULL and err holds the message. */
int mlp_cuda_create(const mlp_shape *shape, int max_batch, int device, void *stream,
                    int flags, mlp_cuda **out, char *err, size_t err_size);
void mlp_cuda_destroy(mlp_cuda *m);
const char *mlp_cuda_error(const mlp_cuda *m);
void *mlp_cuda_stream(const mlp_cuda *m);          /* the cudaStream_t in use */

/* Queue the copy of batch rows (x: [batch, dims[0]] floats, y: labels) to
   the model's device input buffer. Host memory is pageable; it is staged
   through pinned buffers and may be reused as soon as this returns. */
int mlp_cuda_upload(mlp_cuda *m, const float *x, const uint8_t *y, int batch);

/* Forward and backward on the uploaded batch: ADDS grad_scale * gradient
   of the mean loss into grads[p] and calls on_grad_ready(p, user) right
   after p's gradient work is queued, in backward order (last layer's bias
   first); call ddp_mark_ready_stream(ctx, id, mlp_cuda_stream(m)) there.
   Adds grad_scale * mean loss and the number of correct rows to the
   device-side statistics. batch 0: no work, every p still reported. */
int mlp_cuda_forward_backward(mlp_cuda *m, float *const *params, float *const *grads,
                              int batch, float grad_scale,
                              mlp_grad_ready_fn on_grad_ready, void *user);
/* Forward only on the uploaded batch; adds to the same statistics
   (mean loss with scale 1, correct rows). */
int mlp_cuda_forward(mlp_cuda *m, float *const *params, int batch);

/* Synchronises the stream and returns the statistics accumulated since the
   last reset: the sum of the per-call (scaled) mean losses, the correct
   rows and the number of calls. reset != 0 zeroes them. Any pointer may be
   NULL. */
int mlp_cuda_read_stats(mlp_cuda *m, double *loss_sum, int64_t *correct, int64_t *calls,
                        int reset);

/* Correct predictions (argmax == label) over count host rows, uploaded in
   chunks of max_batch; synchronises. Leaves the training statistics alone. */
int mlp_cuda_evaluate(mlp_cuda *m, float *const *params, const float *x, const uint8_t *y,
                      int count, int *correct);

/* Blocking copies between host and device memory (for programs that have no
   CUDA headers: checks, tests, saving weights). */
int mlp_cuda_to_host(mlp_cuda *m, void *host, const void *device, size_t bytes);
int mlp_cuda_to_device(mlp_cuda *m, void *device, const void *host, size_t bytes);

#ifdef __cplusplus
}
#endif
#endif /* MLP_CUDA_H_INCLUDED */
