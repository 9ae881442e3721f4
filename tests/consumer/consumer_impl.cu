// consumer_impl.cu - the ddp.h implementation compiled by nvcc (CUDA and NCCL
// when the ddp::cuda target has them); consumer.c is compiled by the C compiler.
// Without a GPU the program runs on the CPU, so it runs everywhere.
#define DDP_IMPLEMENTATION
#include <ddp.h>
