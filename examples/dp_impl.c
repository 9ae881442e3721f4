/* dp_impl.c - the one translation unit of the CPU dp.h example that holds
   the dp.h and ddp.h implementations; CUDA builds compile dp_impl.cu. */
#define DP_IMPLEMENTATION
#include "../dp.h"
