/* tests/test_share.c HOW [TIMEOUT] — one process of a bootstrap without MPI (moe_comm_env +
   moe_comm_share, section 15): its rank comes from the environment (MOE_RANK/MOE_WORLD_SIZE,
   or a launcher's variables), rank 0 makes 128 bytes — NCCL's unique id when built with
   -DMOE_TEST_NCCL (ncclGetUniqueId works without a GPU), else bytes from a clock-seeded RNG —
   and every rank prints what it holds: "rank R of P: <FNV-1a of the 128 bytes>". Exit status
   0, or 1 with the error. tests/test_dist.sh starts P of them and compares the lines. */
#define MOE_IMPLEMENTATION
#include "moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#ifdef MOE_TEST_NCCL
#include <nccl.h>
#endif

int main(int argc, char **argv) {
    moe_ctx *ctx = NULL;
    unsigned char id[128];
    int rank, size, local;
    if (argc < 2 || moe_ctx_new(&ctx) != MOE_OK) return 2;
    if (moe_comm_env(ctx, &rank, &size, &local) != MOE_OK) {
        fprintf(stderr, "%s\n", moe_ctx_error(ctx));
        return 1;
    }
    memset(id, 0, sizeof id);
    if (rank == 0) {
#ifdef MOE_TEST_NCCL
        ncclUniqueId u;
        ncclResult_t r = ncclGetUniqueId(&u);
        if (r != ncclSuccess) {
            fprintf(stderr, "ncclGetUniqueId: %s\n", ncclGetErrorString(r));
            return 1;
        }
        memcpy(id, &u, sizeof id < sizeof u ? sizeof id : sizeof u);
#else
        moe_rng g = moe_rng_new((uint64_t)time(NULL), (uint64_t)clock());
        int i;
        for (i = 0; i < 128; i++) id[i] = (unsigned char)(moe_rng_uniform(&g) * 256);
#endif
    }
    if (moe_comm_share(ctx, argv[1], rank, size, id, sizeof id, argc > 2 ? atof(argv[2]) : 30.0) != MOE_OK) {
        fprintf(stderr, "rank %d: %s\n", rank, moe_ctx_error(ctx));
        moe_ctx_free(ctx);
        return 1;
    }
    printf("rank %d of %d: %016llx\n", rank, size, (unsigned long long)moe__fnv1a(MOE__FNV_SEED, id, sizeof id));
    moe_ctx_free(ctx);
    return 0;
}
