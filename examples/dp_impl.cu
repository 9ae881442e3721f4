// The implementation of dp.h and ddp.h for a CUDA build (nvcc): one .cu file;
// every other file of the program is C or C++ and sees the declarations only.
#define DP_IMPLEMENTATION
#include "../dp.h"
