// Two .cu translation units include ddp_kernels.cuh; this one holds the
// implementation. Links without duplicate symbols; runs the CPU references.
#define DDP_KERNELS_IMPLEMENTATION
#include "../../ddp_kernels.cuh"
#include <cstdio>

int kernels_b_check(void);

int main() {
    float x[3] = { 3.0f, 4.0f, 0.0f };
    double s = ddp_ref_sumsq(x, 3);
    int b = kernels_b_check();
    std::printf("kernels two TUs: sumsq=%g b=%d\n", s, b);
    return (s == 25.0 && b == 0) ? 0 : 1;
}
