/* tests/cuda_impl.cu — moe.h's implementation compiled by nvcc with the CUDA backend
   (MOE_CUDA: moe_cuda.cuh's kernels and cuBLASLt), as a library object that C translation
   units compiled by gcc link against (tests/cuda_link.c; build.sh builds both). */
#define MOE_IMPLEMENTATION
#include "moe.h"
