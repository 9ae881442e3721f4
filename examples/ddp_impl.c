/* ddp_impl.c - the one translation unit of the CPU examples that holds the
   ddp.h implementation; every other file includes ddp.h for declarations.
   CUDA builds compile ddp_impl.cu (nvcc) instead. */
#define DDP_IMPLEMENTATION
#include "../ddp.h"
