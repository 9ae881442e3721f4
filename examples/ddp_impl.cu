/* ddp_impl.cu - the ddp.h implementation for CUDA builds of the examples,
   compiled by nvcc (which turns on DDP_CUDA, and DDP_NCCL unless
   DDP_NO_NCCL is defined). The C files keep including ddp.h for the
   declarations only. CPU builds compile ddp_impl.c instead. */
#define DDP_IMPLEMENTATION
#include "../ddp.h"
