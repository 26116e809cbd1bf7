/* tests/test_nccl.cu — the NCCL communicator (moe_cuda.cuh section 9, MOE_NCCL), what can be
   checked of it without a GPU, and on one GPU its nranks = 1 smoke test.

   Built by nvcc with MOE_CUDA and MOE_NCCL (build.sh's strict flags), here also with MOE_MPI
   and run under `mpirun -np 2` (suite cuda); the GPU machine builds it without MPI
   (./build.sh cuda) and tests/gpu/run.sh runs it as one process.

   Everywhere:
   - the table: moe__comm_nccl has every entry (device CUDA), and SELF's and MPI's tables
     their new scratch / sum entries;
   - refusals: a context on the CPU gets MOE_ERR_ARG naming the CPU, on every rank at once
     when an MPI bootstrap is given (no rank left waiting); neither or both of bootstrap and
     how, moe_comm_init(MOE_COMM_NCCL) and a bad `how` give MOE_ERR_ARG;
   - errors: an ncclResult_t becomes MOE_ERR_COMM with the call, file:line and NCCL's string,
     and marks the communicator broken (release then aborts);
   - the id bootstrap (moe__nccl_share_id, the path moe_comm_init_nccl takes before
     ncclCommInitRank): rank 0's ncclGetUniqueId (it works without a GPU), then over MPI, over
     file: and over tcp:, every rank holds rank 0's 128 bytes, not all zero, fresh each time.
     Without MPI (one process) the transports have nothing to carry.
   On a GPU, one process (nranks = 1): init through file: in a temporary directory; all-reduce
   (sum, max; F32 / F64 / I32 / I64), broadcast of bytes, all-gather, all-to-all-v, the
   ordered sum and reduce-scatter on device buffers; host buffers (staged); the device block
   sum of 3 blocks against moe__comm_sum_blocks bit for bit (into device and host memory);
   barrier, split; moe_model_reduce_grads of the tiny model on the GPU leaving its gradients
   bit-identical; ZeRO-1 and expert parallelism over NCCL refused. Without a GPU that case
   prints "SKIP" and is not counted. What one rank cannot reach: the ordered all-reduce and
   moe_model_reduce_grads return early at one rank (their gather and the device sum run here
   only through reduce-scatter and the direct block-sum case), and every send/recv group is
   empty; NCCL puts no two ranks on one GPU, so those paths wait for a machine with two. */
#define MOE_IMPLEMENTATION
#include "moe.h"
#include "test.h"

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static moe_ctx *g_ctx;   /* a CPU context for the host-side cases */
static moe_comm *g_world; /* MPI's world under MOE_MPI, else one process */

/* Every rank learns whether any rank failed a check in this case (rank 0 reports it). */
static void agree_failures(void) {
    int64_t mine = t_case_failures, all = mine;
    if (moe_comm_size(g_world) == 1) return;
    if (moe_comm_allreduce(g_ctx, g_world, &all, 1, MOE_COMM_I64, MOE_COMM_SUM) != MOE_OK) {
        T_CHECK(0, "the failure count did not travel: %s", moe_ctx_error(g_ctx));
        return;
    }
    T_CHECK(all == mine, "%lld failed checks on the other ranks (run the binary alone, or read their stderr)",
            (long long)(all - mine));
}
static void (*g_case)(void);
static void run_case(void) {
    g_case();
    agree_failures();
}
#define RUN(fn)                                                           \
    do {                                                                  \
        if (!t_filter || strstr(#fn, t_filter)) { g_case = fn; t__run(#fn, run_case); } \
    } while (0)

/* Every function pointer of a comm table set (walked by slot, so a new entry is covered). */
static int table_full(const moe__comm_ops *o) {
    typedef void (*any_fn)(void);
    const size_t first = offsetof(moe__comm_ops, barrier), n_fn = (sizeof(moe__comm_ops) - first) / sizeof(any_fn);
    size_t slot;
    if ((sizeof(moe__comm_ops) - first) % sizeof(any_fn) != 0 || n_fn != 12) return 0;
    for (slot = 0; slot < n_fn; slot++) {
        any_fn fp;
        memcpy(&fp, (const char *)o + first + slot * sizeof(any_fn), sizeof fp);
        if (!fp) return 0;
    }
    return 1;
}

static void nccl_table_complete(void) {
    T_CHECK(table_full(&moe__comm_nccl), "an NCCL entry is NULL");
    T_CHECK(moe__comm_nccl.device == MOE_DEVICE_CUDA, "NCCL's buffers are on the GPU");
    T_CHECK(table_full(&moe__comm_self) && moe__comm_self.device == MOE_DEVICE_CPU, "SELF's table");
#ifdef MOE_MPI
    T_CHECK(table_full(&moe__comm_mpi) && moe__comm_mpi.device == MOE_DEVICE_CPU, "MPI's table");
#endif
}

static void nccl_refusals(void) {
    moe_comm *c = (moe_comm *)1;
    moe_status st;
    int n = -1;
    T_CHECK(moe_cuda_device_count(g_ctx, &n) == MOE_OK, "device count");
    st = moe_comm_init_nccl(g_ctx, NULL, "file:/nonexistent/id", 1.0, &c);
    T_CHECK(st == MOE_ERR_ARG && c == NULL && strstr(moe_ctx_error(g_ctx), "on the CPU"), "a CPU context: %s (%s)",
            moe_status_name(st), moe_ctx_error(g_ctx));
    c = (moe_comm *)1;
    st = moe_comm_init_nccl(g_ctx, g_world, NULL, 0, &c); /* a collective over the bootstrap: every rank refuses */
    T_CHECK(st == MOE_ERR_ARG && c == NULL && strstr(moe_ctx_error(g_ctx), "on the CPU"), "a CPU context, MPI bootstrap: %s (%s)",
            moe_status_name(st), moe_ctx_error(g_ctx));
    st = moe_comm_init_nccl(g_ctx, NULL, NULL, 1.0, &c);
    T_CHECK(st == MOE_ERR_ARG && strstr(moe_ctx_error(g_ctx), "one of the two"), "neither bootstrap nor how: %s", moe_ctx_error(g_ctx));
    st = moe_comm_init_nccl(g_ctx, g_world, "file:/tmp/x", 1.0, &c);
    T_CHECK(st == MOE_ERR_ARG && strstr(moe_ctx_error(g_ctx), "one of the two"), "both: %s", moe_ctx_error(g_ctx));
    T_CHECK(moe_comm_init_nccl(g_ctx, NULL, "file:/tmp/x", 1.0, NULL) == MOE_ERR_ARG, "out NULL");
    T_CHECK(moe_comm_init_nccl(NULL, NULL, "file:/tmp/x", 1.0, &c) == MOE_ERR_ARG, "ctx NULL");
    st = moe_comm_init(g_ctx, MOE_COMM_NCCL, &c);
    T_CHECK(st == MOE_ERR_ARG && c == NULL && strstr(moe_ctx_error(g_ctx), "moe_comm_init_nccl"), "moe_comm_init(NCCL): %s",
            moe_ctx_error(g_ctx));
    if (n == 0) { /* no GPU: the context cannot get one, and stays refused */
        st = moe_ctx_set_device(g_ctx, MOE_DEVICE_CUDA, 0);
        T_CHECK(st == MOE_ERR_UNSUPPORTED && moe_ctx_device(g_ctx) == MOE_DEVICE_CPU, "no GPU: %s", moe_ctx_error(g_ctx));
        T_CHECK(moe_comm_init_nccl(g_ctx, NULL, "tcp:localhost:1", 1.0, &c) == MOE_ERR_ARG, "still a CPU context");
    }
}

static moe_status nccl_try(moe_ctx *ctx, moe__nccl *N, ncclResult_t r) {
    MOE__NCCL_TRY(ctx, N, r);
    return MOE_OK;
}
static void nccl_errors_name_the_call(void) {
    static const ncclResult_t bad[] = {ncclUnhandledCudaError, ncclSystemError, ncclInternalError, ncclInvalidArgument,
                                       ncclInvalidUsage, ncclRemoteError};
    moe__nccl N;
    unsigned i;
    char want[64];
    memset(&N, 0, sizeof N);
    T_CHECK(nccl_try(g_ctx, &N, ncclSuccess) == MOE_OK && !N.broken, "success passes");
    for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        moe_status st = nccl_try(g_ctx, &N, bad[i]);
        const char *msg = moe_ctx_error(g_ctx);
        snprintf(want, sizeof want, "%s:", __FILE__);
        T_CHECK(st == MOE_ERR_COMM && strstr(msg, "NCCL: r failed at") && strstr(msg, want) &&
                    strstr(msg, ncclGetErrorString(bad[i])),
                "result %d: %s (%s)", (int)bad[i], moe_status_name(st), msg);
    }
    T_CHECK(N.broken, "the communicator is marked broken (freed by ncclCommAbort)");
}

/* Rank 0's id reached every rank of the world: all hold the same bytes, not all zero. */
static int g_id_nonzero; /* rank 0's id: bytes that are not 0 (the rest travels all the same) */
static void check_same_id(const char *how, const ncclUniqueId *id) {
    int P = moe_comm_size(g_world), r, nonzero = 0;
    unsigned i;
    int64_t *counts = (int64_t *)calloc((size_t)P, sizeof(int64_t));
    unsigned char *all = (unsigned char *)calloc((size_t)P, sizeof id->internal);
    for (r = 0; r < P; r++) counts[r] = (int64_t)sizeof id->internal;
    T_CHECK(moe_comm_allgather(g_ctx, g_world, id->internal, all, counts, MOE_COMM_BYTE) == MOE_OK, "%s: gathering the ids: %s",
            how, moe_ctx_error(g_ctx));
    for (i = 0; i < sizeof id->internal; i++) nonzero += all[i] != 0;
    g_id_nonzero = nonzero;
    T_CHECK(nonzero, "%s: rank 0's id is all zero", how);
    for (r = 1; r < P; r++) T_CHECK(memcmp(all, all + (size_t)r * sizeof id->internal, sizeof id->internal) == 0, "%s: rank %d's id differs", how, r);
    free(counts);
    free(all);
}

static void nccl_id_bootstrap(void) {
    ncclUniqueId id, again;
    int rank = -1, size = -1, P = moe_comm_size(g_world), me = moe_comm_rank(g_world);
    char how[256];
    int64_t token[2] = {0, 0};
    moe_status st;
    /* over the MPI communicator */
    st = moe__nccl_share_id(g_ctx, g_world, NULL, 0, &rank, &size, &id);
    T_CHECK(st == MOE_OK && rank == me && size == P, "over the bootstrap communicator: %s (rank %d of %d)", moe_ctx_error(g_ctx),
            rank, size);
    check_same_id("bootstrap communicator", &id);
    st = moe__nccl_share_id(g_ctx, g_world, NULL, 0, &rank, &size, &again);
    T_CHECK(st == MOE_OK && memcmp(&id, &again, sizeof id) != 0, "a second id is a fresh one");
    /* file: and tcp:, with the rank and size of the environment (mpirun sets OMPI_COMM_WORLD_*) */
    if (me == 0) {
        token[0] = (int64_t)getpid();
        token[1] = 20000 + (int64_t)(getpid() % 20000);
    }
    T_CHECK(moe_comm_bcast(g_ctx, g_world, token, 2, MOE_COMM_I64, 0) == MOE_OK, "the run's token");
    snprintf(how, sizeof how, "file:/tmp/moe-test-nccl-%lld.id", (long long)token[0]);
    st = moe__nccl_share_id(g_ctx, NULL, how, 20.0, &rank, &size, &id);
    T_CHECK(st == MOE_OK && rank == me && size == P, "over %s: %s (rank %d of %d)", how, moe_ctx_error(g_ctx), rank, size);
    check_same_id("file:", &id);
    moe_comm_barrier(g_ctx, g_world);
    if (me == 0) remove(how + 5);
    snprintf(how, sizeof how, "tcp:127.0.0.1:%lld", (long long)token[1]);
    st = moe__nccl_share_id(g_ctx, NULL, how, 20.0, &rank, &size, &id);
    T_CHECK(st == MOE_OK && rank == me && size == P, "over %s: %s (rank %d of %d)", how, moe_ctx_error(g_ctx), rank, size);
    check_same_id("tcp:", &id);
    st = moe__nccl_share_id(g_ctx, NULL, "udp:x", 1.0, &rank, &size, &id);
    T_CHECK(st == MOE_ERR_ARG, "a bad how: %s", moe_ctx_error(g_ctx));
    T_NOTE("%d rank(s): ids compared over the bootstrap communicator (%s), file: and tcp: (%d of rank 0's 128 bytes not 0)", P,
           g_world->ops == &moe__comm_self ? "one process" : "MPI", g_id_nonzero);
}

/* ---- on a GPU, one process ---- */

static moe_ctx *gctx;
static moe_comm *nc;

static void *dev_copy(const void *host, size_t bytes) {
    void *d = NULL;
    if (cudaMalloc(&d, bytes) != cudaSuccess) return NULL;
    if (host) cudaMemcpy(d, host, bytes, cudaMemcpyHostToDevice);
    else cudaMemset(d, 0xa5, bytes); /* poisoned */
    cudaDeviceSynchronize(); /* the legacy stream's copies are done before the context's stream reads */
    return d;
}
static int dev_equals(const void *d, const void *host, size_t bytes) {
    void *h = malloc(bytes);
    int same;
    moe_cuda_sync(gctx);
    cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost);
    same = memcmp(h, host, bytes) == 0;
    free(h);
    return same;
}

static void gpu_collectives(void) {
    enum { N = 1000 };
    float f[N];
    double x[N];
    int32_t i32[N];
    int64_t i64[N], host64[4] = {1, -2, 3, 1LL << 40}, host64_0[4];
    unsigned char bytes[N];
    int k;
    for (k = 0; k < N; k++) {
        f[k] = (float)(k * 0.37 - 100.0);
        x[k] = k * 1e-3 - 0.5;
        i32[k] = k * 7 - 3000;
        i64[k] = (int64_t)k << 33;
        bytes[k] = (unsigned char)(k * 13);
    }
    memcpy(host64_0, host64, sizeof host64);
    {
        void *df = dev_copy(f, sizeof f), *dx = dev_copy(x, sizeof x), *di = dev_copy(i32, sizeof i32), *dl = dev_copy(i64, sizeof i64),
             *db = dev_copy(bytes, sizeof bytes), *recv = dev_copy(NULL, sizeof x);
        int64_t counts[1] = {N}, rows[1] = {N / 4};
        T_ASSERT(df && dx && di && dl && db && recv, "cudaMalloc");
        T_CHECK(moe_comm_allreduce(gctx, nc, df, N, MOE_COMM_F32, MOE_COMM_SUM) == MOE_OK && dev_equals(df, f, sizeof f),
                "all-reduce sum F32: %s", moe_ctx_error(gctx));
        T_CHECK(moe_comm_allreduce(gctx, nc, dx, N, MOE_COMM_F64, MOE_COMM_MAX) == MOE_OK && dev_equals(dx, x, sizeof x),
                "all-reduce max F64: %s", moe_ctx_error(gctx));
        T_CHECK(moe_comm_allreduce(gctx, nc, di, N, MOE_COMM_I32, MOE_COMM_SUM) == MOE_OK && dev_equals(di, i32, sizeof i32),
                "all-reduce sum I32: %s", moe_ctx_error(gctx));
        T_CHECK(moe_comm_allreduce(gctx, nc, dl, N, MOE_COMM_I64, MOE_COMM_MAX) == MOE_OK && dev_equals(dl, i64, sizeof i64),
                "all-reduce max I64: %s", moe_ctx_error(gctx));
        T_CHECK(moe_comm_allreduce(gctx, nc, host64, 4, MOE_COMM_I64, MOE_COMM_SUM) == MOE_OK &&
                    memcmp(host64, host64_0, sizeof host64) == 0,
                "all-reduce of host memory (staged): %s", moe_ctx_error(gctx));
        T_CHECK(moe_comm_bcast(gctx, nc, db, N, MOE_COMM_BYTE, 0) == MOE_OK && dev_equals(db, bytes, sizeof bytes), "broadcast: %s",
                moe_ctx_error(gctx));
        T_CHECK(moe_comm_allgather(gctx, nc, dx, recv, counts, MOE_COMM_F64) == MOE_OK && dev_equals(recv, x, sizeof x),
                "all-gather: %s", moe_ctx_error(gctx));
        cudaMemset(recv, 0xa5, sizeof x);
        cudaDeviceSynchronize();
        T_CHECK(moe_comm_alltoallv(gctx, nc, df, rows, recv, rows, 4, MOE_COMM_F32) == MOE_OK && dev_equals(recv, f, sizeof f),
                "all-to-all-v: %s", moe_ctx_error(gctx));
        T_CHECK(moe_comm_allreduce_ordered(gctx, nc, df, N, MOE_COMM_F32) == MOE_OK && dev_equals(df, f, sizeof f), "ordered sum: %s",
                moe_ctx_error(gctx));
        cudaMemset(recv, 0xa5, sizeof x);
        cudaDeviceSynchronize();
        T_CHECK(moe_comm_reduce_scatter(gctx, nc, dx, recv, counts, MOE_COMM_F64) == MOE_OK && dev_equals(recv, x, sizeof x),
                "reduce-scatter (the device scratch and block sum): %s", moe_ctx_error(gctx));
        T_CHECK(moe_comm_barrier(gctx, nc) == MOE_OK, "barrier: %s", moe_ctx_error(gctx));
        T_CHECK(moe_comm_bytes_received(nc) == 0, "one rank receives nothing from others");
        cudaFree(df); cudaFree(dx); cudaFree(di); cudaFree(dl); cudaFree(db); cudaFree(recv);
    }
}

/* The device block sum against the host's, bit for bit, for every summed type. */
static void gpu_block_sum_bits(void) {
    enum { N = 3001, B = 3 };
    static float f[B * N], fo[N], fh[N];
    static double d[B * N], dout[N], dh[N];
    static uint32_t u[B * N], uo[N], uh[N];
    static uint64_t l[B * N], lo[N], lh[N];
    uint64_t s = 12345;
    int k;
    for (k = 0; k < B * N; k++) { /* magnitudes far apart: the order of additions shows in the bits */
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        f[k] = (float)((double)(s >> 11) / 9007199254740992.0 - 0.5) * (k % 3 == 1 ? 1e7f : 1.0f);
        d[k] = ((double)(s >> 11) / 9007199254740992.0 - 0.5) * (k % 3 == 1 ? 1e17 : 1.0);
        u[k] = (uint32_t)(s >> 7);
        l[k] = s;
    }
    moe__comm_sum_blocks(f, B, N, MOE_COMM_F32, fh);
    moe__comm_sum_blocks(d, B, N, MOE_COMM_F64, dh);
    moe__comm_sum_blocks(u, B, N, MOE_COMM_I32, uh);
    moe__comm_sum_blocks(l, B, N, MOE_COMM_I64, lh);
    {
        struct { moe_comm_type t; const void *in; void *out; const void *want; size_t es; } cases[4] = {
            {MOE_COMM_F32, f, fo, fh, 4}, {MOE_COMM_F64, d, dout, dh, 8}, {MOE_COMM_I32, u, uo, uh, 4}, {MOE_COMM_I64, l, lo, lh, 8}};
        int c;
        for (c = 0; c < 4; c++) {
            void *blocks = nc->ops->scratch(gctx, nc, cases[c].es * B * N, "test"), *out = dev_copy(NULL, cases[c].es * N);
            T_ASSERT(blocks && out, "device memory: %s", moe_ctx_error(gctx));
            cudaMemcpy(blocks, cases[c].in, cases[c].es * B * N, cudaMemcpyHostToDevice);
            cudaDeviceSynchronize();
            T_CHECK(nc->ops->sum_blocks(gctx, nc, blocks, B, N, cases[c].t, out) == MOE_OK && dev_equals(out, cases[c].want, cases[c].es * N),
                    "type %d: the device sum differs from the host's: %s", (int)cases[c].t, moe_ctx_error(gctx));
            memset(cases[c].out, 0, cases[c].es * N);
            T_CHECK(nc->ops->sum_blocks(gctx, nc, blocks, B, N, cases[c].t, cases[c].out) == MOE_OK &&
                        memcmp(cases[c].out, cases[c].want, cases[c].es * N) == 0,
                    "type %d into host memory: %s", (int)cases[c].t, moe_ctx_error(gctx));
            cudaFree(out);
        }
    }
}

static void gpu_split(void) {
    moe_comm *sub = NULL;
    float one = 1.0f;
    T_CHECK(moe_comm_split(gctx, nc, 0, 0, &sub) == MOE_OK && moe_comm_size(sub) == 1 && moe_comm_rank(sub) == 0, "split: %s",
            moe_ctx_error(gctx));
    if (sub) T_CHECK(moe_comm_allreduce(gctx, sub, &one, 1, MOE_COMM_F32, MOE_COMM_SUM) == MOE_OK && one == 1.0f, "the split's all-reduce");
    moe_comm_free(sub);
}

static void gpu_reduce_grads(void) {
    moe_config cfg = moe_config_tiny();
    moe_model *m = NULL;
    moe_adamw *opt = NULL;
    float *g0, *g1;
    size_t bytes;
    uint64_t s = 99;
    int64_t k, n;
    moe_status st;
    T_ASSERT(moe_model_new(gctx, &cfg, 7, &m) == MOE_OK, "the tiny model on the GPU: %s", moe_ctx_error(gctx));
    n = m->grads->numel;
    bytes = (size_t)n * sizeof(float);
    g0 = (float *)malloc(bytes);
    g1 = (float *)malloc(bytes);
    for (k = 0; k < n; k++) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        g0[k] = (float)((double)(s >> 11) / 9007199254740992.0 - 0.5);
    }
    T_CHECK(moe_tensor_upload(gctx, m->grads, g0, bytes) == MOE_OK, "gradients up: %s", moe_ctx_error(gctx));
    m->loads[0] = 5;
    T_CHECK(moe_model_reduce_grads(gctx, m, nc) == MOE_OK, "reduce over 1-rank NCCL: %s", moe_ctx_error(gctx));
    T_CHECK(moe_tensor_download(gctx, m->grads, g1, bytes) == MOE_OK && memcmp(g0, g1, bytes) == 0 && m->loads[0] == 5,
            "the gradients changed");
    T_CHECK(moe_adamw_new(gctx, m, NULL, &opt) == MOE_OK, "AdamW: %s", moe_ctx_error(gctx));
    st = moe_adamw_shard(gctx, opt, nc);
    T_CHECK(st == MOE_ERR_UNSUPPORTED, "ZeRO-1 over NCCL refused: %s (%s)", moe_status_name(st), moe_ctx_error(gctx));
    st = moe_model_expert_parallel(gctx, m, nc, NULL);
    T_CHECK(st == MOE_ERR_UNSUPPORTED && strstr(moe_ctx_error(gctx), "NCCL"), "expert parallelism over NCCL refused: %s",
            moe_ctx_error(gctx));
    T_NOTE("%lld gradient values", (long long)n);
    moe_adamw_free(gctx, opt);
    moe_model_free(gctx, m);
    free(g0);
    free(g1);
}

/* One process on GPU 0: init through file: in a fresh directory, the cases, free. */
static int gpu_smoke(void) {
    char dir[] = "/tmp/moe-nccl-XXXXXX", how[96];
    moe_status st;
    if (moe_ctx_new(&gctx) != MOE_OK || moe_ctx_set_device(gctx, MOE_DEVICE_CUDA, 0) != MOE_OK) {
        printf("FAIL gpu_smoke: no GPU context: %s\n", gctx ? moe_ctx_error(gctx) : "moe_ctx_new");
        return 0;
    }
    if (!mkdtemp(dir)) return 0;
    snprintf(how, sizeof how, "file:%s/nccl.id", dir);
    st = moe_comm_init_nccl(gctx, NULL, how, 10.0, &nc);
    printf("%s nccl_init (%s): %s\n", st == MOE_OK ? "ok  " : "FAIL", how, st == MOE_OK ? moe_cuda_device_name(gctx) : moe_ctx_error(gctx));
    if (st == MOE_OK) t_passed++; else t_failed++;
    if (st == MOE_OK) {
        RUN(gpu_collectives);
        RUN(gpu_block_sum_bits);
        RUN(gpu_split);
        RUN(gpu_reduce_grads);
        moe_comm_free(nc);
    }
    rmdir(dir);
    moe_ctx_free(gctx);
    return 1;
}

int main(int argc, char **argv) {
    int devices = 0, rc;
    t_filter = argc > 1 ? argv[1] : NULL;
    if (moe_ctx_new(&g_ctx) != MOE_OK || moe_comm_init(g_ctx, MOE_COMM_DEFAULT, &g_world) != MOE_OK) {
        printf("cannot start: %s\nSUITE: 0 passed, 1 failed\n", g_ctx ? moe_ctx_error(g_ctx) : "moe_ctx_new");
        return 1;
    }
    if (moe_comm_rank(g_world) != 0 && !freopen("/dev/null", "w", stdout)) return 1; /* rank 0 reports for all */
    RUN(nccl_table_complete);
    RUN(nccl_refusals);
    RUN(nccl_errors_name_the_call);
    RUN(nccl_id_bootstrap);
    moe_cuda_device_count(g_ctx, &devices);
    if (devices > 0 && moe_comm_size(g_world) == 1) gpu_smoke();
    else printf("SKIP gpu_smoke: %s\n", devices ? "more than one rank (the smoke test is nranks = 1)" : "no CUDA device here");
    moe_comm_free(g_world);
    moe_ctx_free(g_ctx);
    rc = t_summary();
    return rc;
}
