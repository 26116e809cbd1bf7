/* tests/test_share.c HOW [TIMEOUT] — one process of a bootstrap without MPI (moe_comm_env +
   moe_comm_share, section 15): its rank comes from the environment (MOE_RANK/MOE_WORLD_SIZE,
   or a launcher's variables), rank 0 makes 128 bytes — NCCL's unique id when built with
   -DMOE_TEST_NCCL (ncclGetUniqueId works without a GPU), else bytes from a clock-seeded RNG —
   and every rank prints what it holds: "rank R of P: <FNV-1a of the 128 bytes>". Exit status
   0, or 1 with the error. tests/test_dist.sh starts P of them and compares the lines.

   tests/test_share.c hold PORT SECONDS [full] — a wrong peer for the others' tcp: bootstrap:
   listens on 127.0.0.1:PORT, prints "listening", and for SECONDS accepts connections and
   holds them open without sending a byte; with "full" it accepts nothing and first fills its
   accept queue (backlog 0) with one connection of its own, so that later connects get no
   answer to their SYNs (Linux drops them) and hang in connect().

   Built with -DMOE_TEST_SLOW_LOOKUP, lookups of names starting "slow" take 20 s (a resolver that
   does not answer) and other names are unknown at once. */
#define MOE_IMPLEMENTATION
#include "moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#ifdef MOE_TEST_NCCL
#include <nccl.h>
#endif

#ifdef MOE_TEST_SLOW_LOOKUP
/* A resolver that takes 20 s to give up on names starting "slow" (as one whose servers do not
   answer) and knows no other name at once; no name is a numeric address. This definition
   stands in for the C library's in this build (tests/test_dist.sh). */
int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res) {
    struct timespec ts = {20, 0};
    (void)service;
    *res = NULL;
    if ((hints && (hints->ai_flags & AI_NUMERICHOST)) || strncmp(node, "slow", 4) != 0) return EAI_NONAME;
    nanosleep(&ts, NULL);
    return EAI_AGAIN;
}
#endif

static int hold(int port, double seconds, int full) {
    struct sockaddr_in a;
    int s, filler = -1, one = 1, held[64], n = 0;
    double t0 = moe_time_s();
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons((uint16_t)port);
    if ((s = socket(AF_INET, SOCK_STREAM, 0)) < 0 || setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        bind(s, (struct sockaddr *)&a, sizeof a) != 0 || listen(s, full ? 0 : 16) != 0) {
        perror("hold: listen");
        return 1;
    }
    if (full && ((filler = socket(AF_INET, SOCK_STREAM, 0)) < 0 || connect(filler, (struct sockaddr *)&a, sizeof a) != 0)) {
        perror("hold: filling the queue");
        return 1;
    }
    printf("listening\n");
    fflush(stdout);
    while (moe_time_s() - t0 < seconds) {
        struct pollfd pf;
        pf.fd = s;
        pf.events = POLLIN;
        pf.revents = 0;
        if (!full && n < 64 && poll(&pf, 1, 50) > 0) {
            int c = accept(s, NULL, NULL);
            if (c >= 0) held[n++] = c; /* kept open, never written */
        } else {
            struct timespec ts = {0, 50000000L};
            nanosleep(&ts, NULL);
        }
    }
    while (n > 0) close(held[--n]);
    if (filler >= 0) close(filler);
    close(s);
    return 0;
}

int main(int argc, char **argv) {
    moe_ctx *ctx = NULL;
    unsigned char id[128];
    int rank, size, local;
    if (argc >= 4 && strcmp(argv[1], "hold") == 0) return hold(atoi(argv[2]), atof(argv[3]), argc > 4 && strcmp(argv[4], "full") == 0);
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
