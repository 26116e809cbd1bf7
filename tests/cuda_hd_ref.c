/* tests/cuda_hd_ref.c — gcc's side of tests/test_cuda_host.cu's "same bits" check: moe.h's
   MOE_HD math compiled as C99 by gcc, with the flags build.sh gives the library, over the
   sample of tests/cuda_hd_sample.h. Linked into test_cuda_host, which computes the same hashes
   from its own, nvcc-compiled copy and compares them. The whole implementation is compiled
   here with MOE_STATIC, so its only external symbols are the three below and it links next to
   the nvcc translation unit's full implementation without clashes.

   Build: gcc -std=c99 -ffp-contract=off -O3 -march=native -Wall -Wextra -Wpedantic -Werror \
              -I. -c tests/cuda_hd_ref.c -o build/cuda_hd_ref.o   (see tests/test_cuda_host.cu) */
#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wunused-function" /* MOE_STATIC: the library's unused statics */
#endif
#define MOE_STATIC
#define MOE_IMPLEMENTATION
#include "moe.h"

#include <stdint.h>
#include <string.h>

uint64_t hd_ref_eval(int which, uint32_t p);
void hd_ref_hashes(uint64_t *out);
const char *hd_ref_name(int which);
int hd_ref_count(void);

#define HD_PREFIX ref
#define HD_LINKAGE
#include "cuda_hd_sample.h"

const char *hd_ref_name(int which) { return which >= 0 && which < HD_COUNT ? hd_names[which] : "?"; }
int hd_ref_count(void) { return HD_COUNT; }
