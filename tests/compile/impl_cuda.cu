// The implementation compiled by nvcc (CUDA and NCCL on); the other files of
// the program are C, compiled by gcc, and see only the declarations.
#define DDP_IMPLEMENTATION
#include "../../ddp.h"
