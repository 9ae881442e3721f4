// The second .cu translation unit: declarations of ddp_kernels.cuh only.
#include "../../ddp_kernels.cuh"

int kernels_b_check(void) {
    float x[2] = { 1.0f, 2.0f };
    return ddp_ref_sumsq(x, 2) == 5.0 ? 0 : 1;
}
