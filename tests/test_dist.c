/* tests/test_dist.c — the communicator (section 15): every collective against an expectation
   each rank computes on its own from the same data formulas, on one process (SELF, built
   without MOE_MPI) and under mpirun with 1–4 ranks (built with mpicc -DMOE_MPI): zero counts,
   ranks that send nothing, sizes that P does not divide, the rank-ordered sums bit for bit,
   split groups (expert-parallel and expert-data-parallel), the config check and bad
   arguments. A case fails on every rank if it fails on any; rank 0 prints. With
   MOE_TEST_DIE_RANK=r, rank r exits at once (tests/test_dist.sh: the job must end, not hang). */
#define MOE_IMPLEMENTATION
#include "moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "test.h"

static moe_ctx *ctx;
static moe_comm *world;
static int R, P; /* this rank, the number of ranks */

/* Value i of rank r's data: integers below 2^20 (sums exact in every type), or floats whose
   sum depends on the order of addition: rank 0 holds about 1, the others 0.6–0.76 of half a
   unit in the last place of 1, which vanish one at a time but not together. */
static int64_t ival(int r, int64_t i) { return (int64_t)((r + 1) * 1000 + (i * 7919) % 997); }
static float fval(int r, int64_t i) {
    if (r == 0) return 1.0f + (float)(i % 8) * 0.125f;
    return 0.6f * 5.9604645e-8f * (1.0f + 0.01f * (float)((r * 31 + i) % 17)) * (1.0f + (float)(i % 8) * 0.125f);
}

/* ---- cases ---- */

static void ranks(void) {
    int64_t *all = (int64_t *)calloc((size_t)P, sizeof(int64_t)), *counts = (int64_t *)calloc((size_t)P, sizeof(int64_t));
    int64_t mine = R, r;
    for (r = 0; r < P; r++) counts[r] = 1;
    T_CHECK(R >= 0 && R < P, "rank %d of %d", R, P);
    T_ASSERT(moe_comm_allgather(ctx, world, &mine, all, counts, MOE_COMM_I64) == MOE_OK, "%s", moe_ctx_error(ctx));
    for (r = 0; r < P; r++) T_CHECK(all[r] == r, "slot %lld holds rank %lld", (long long)r, (long long)all[r]);
    T_CHECK(moe_comm_barrier(ctx, world) == MOE_OK, "%s", moe_ctx_error(ctx));
    free(all);
    free(counts);
}

static void bcast(void) {
    static const moe_comm_type types[5] = {MOE_COMM_F32, MOE_COMM_F64, MOE_COMM_I32, MOE_COMM_I64, MOE_COMM_BYTE};
    int root, t;
    int64_t i, n = 37;
    for (root = 0; root < P; root++)
        for (t = 0; t < 5; t++) {
            unsigned char buf[37 * 8], want[37 * 8];
            for (i = 0; i < n * 8; i++) {
                buf[i] = (unsigned char)(R * 13 + i);
                want[i] = (unsigned char)(root * 13 + i);
            }
            T_ASSERT(moe_comm_bcast(ctx, world, buf, n, types[t], root) == MOE_OK, "%s", moe_ctx_error(ctx));
            i = n * (types[t] == MOE_COMM_BYTE ? 1 : types[t] == MOE_COMM_F64 || types[t] == MOE_COMM_I64 ? 8 : 4);
            T_CHECK(memcmp(buf, want, (size_t)i) == 0, "root %d, type %d: bytes differ", root, t);
        }
    T_CHECK(moe_comm_bcast(ctx, world, NULL, 0, MOE_COMM_F32, 0) == MOE_OK, "an empty broadcast: %s", moe_ctx_error(ctx));
}

static void allreduce(void) {
    int64_t n = 1001, i, r, *s = (int64_t *)malloc((size_t)n * sizeof(int64_t));
    double *d = (double *)malloc((size_t)n * sizeof(double));
    float *m = (float *)malloc((size_t)n * sizeof(float));
    int32_t *s32 = (int32_t *)malloc((size_t)n * sizeof(int32_t));
    for (i = 0; i < n; i++) {
        s[i] = ival(R, i);
        s32[i] = (int32_t)ival(R, i);
        d[i] = (double)ival(R, i) * 0.5;
        m[i] = fval(R, i);
    }
    T_ASSERT(moe_comm_allreduce(ctx, world, s, n, MOE_COMM_I64, MOE_COMM_SUM) == MOE_OK, "%s", moe_ctx_error(ctx));
    T_ASSERT(moe_comm_allreduce(ctx, world, s32, n, MOE_COMM_I32, MOE_COMM_SUM) == MOE_OK, "%s", moe_ctx_error(ctx));
    T_ASSERT(moe_comm_allreduce(ctx, world, d, n, MOE_COMM_F64, MOE_COMM_SUM) == MOE_OK, "%s", moe_ctx_error(ctx));
    T_ASSERT(moe_comm_allreduce(ctx, world, m, n, MOE_COMM_F32, MOE_COMM_MAX) == MOE_OK, "%s", moe_ctx_error(ctx));
    for (i = 0; i < n; i++) {
        int64_t want = 0;
        float mx = fval(0, i);
        for (r = 0; r < P; r++) {
            want += ival((int)r, i);
            if (fval((int)r, i) > mx) mx = fval((int)r, i);
        }
        T_CHECK(s[i] == want && s32[i] == (int32_t)want, "i64/i32 sum [%lld]: %lld / %d, want %lld", (long long)i,
                (long long)s[i], s32[i], (long long)want);
        T_CHECK(d[i] == (double)want * 0.5, "f64 sum [%lld]: %.17g, want %.17g", (long long)i, d[i], (double)want * 0.5);
        T_CHECK(m[i] == mx, "f32 max [%lld]: %g, want %g", (long long)i, (double)m[i], (double)mx);
        if (t_case_failures > 4) break;
    }
    T_CHECK(moe_comm_allreduce(ctx, world, NULL, 0, MOE_COMM_F32, MOE_COMM_SUM) == MOE_OK, "an empty all-reduce");
    free(s); free(s32); free(d); free(m);
}

/* The rank-ordered sum equals ((x_0 + x_1) + x_2) + … computed here, bit for bit, on every
   rank; from 3 ranks on the data make another order give other bits. */
static void allreduce_ordered(void) {
    int64_t n = 513, i, r, differs = 0;
    float *x = (float *)malloc((size_t)n * sizeof(float));
    double *y = (double *)malloc((size_t)n * sizeof(double));
    for (i = 0; i < n; i++) {
        x[i] = fval(R, i);
        y[i] = (double)fval(R, i) * 1e10;
    }
    T_ASSERT(moe_comm_allreduce_ordered(ctx, world, x, n, MOE_COMM_F32) == MOE_OK, "%s", moe_ctx_error(ctx));
    T_ASSERT(moe_comm_allreduce_ordered(ctx, world, y, n, MOE_COMM_F64) == MOE_OK, "%s", moe_ctx_error(ctx));
    for (i = 0; i < n; i++) {
        float want = fval(0, i), right = fval(P - 1, i); /* right: x_0 + (x_1 + (x_2 + …)) */
        double wantd = (double)fval(0, i) * 1e10;
        for (r = 1; r < P; r++) {
            want += fval((int)r, i);
            wantd += (double)fval((int)r, i) * 1e10;
        }
        for (r = P - 2; r >= 0; r--) right = fval((int)r, i) + right;
        differs += right != want;
        T_CHECK(memcmp(&x[i], &want, sizeof want) == 0, "f32 [%lld]: %.9g, want %.9g", (long long)i, (double)x[i], (double)want);
        T_CHECK(memcmp(&y[i], &wantd, sizeof wantd) == 0, "f64 [%lld]: %.17g, want %.17g", (long long)i, y[i], wantd);
        if (t_case_failures > 4) break;
    }
    if (P >= 3) T_CHECK(differs > 0, "the data do not tell the orders apart (the check could not fail)");
    T_NOTE("%lld of %lld sums differ when added from the right", (long long)differs, (long long)n);
    free(x);
    free(y);
}

/* Uneven shards (rank r owns r + 2 elements, rank 1 none when P > 1), summed in rank order. */
static void reduce_scatter(void) {
    int64_t *counts = (int64_t *)calloc((size_t)P, sizeof(int64_t)), total = 0, off = 0, i, r, q;
    float *send, *recv;
    for (r = 0; r < P; r++) {
        counts[r] = r == 1 ? 0 : r + 2;
        total += counts[r];
    }
    send = (float *)malloc((size_t)total * sizeof(float));
    recv = (float *)malloc((size_t)(counts[R] + 1) * sizeof(float));
    for (i = 0; i < total; i++) send[i] = fval(R, i);
    for (r = 0; r < R; r++) off += counts[r];
    T_ASSERT(moe_comm_reduce_scatter(ctx, world, send, recv, counts, MOE_COMM_F32) == MOE_OK, "%s", moe_ctx_error(ctx));
    for (i = 0; i < counts[R]; i++) {
        float want = fval(0, off + i);
        for (q = 1; q < P; q++) want += fval((int)q, off + i);
        T_CHECK(memcmp(&recv[i], &want, sizeof want) == 0, "[%lld]: %.9g, want %.9g", (long long)i, (double)recv[i], (double)want);
    }
    free(counts); free(send); free(recv);
}

/* Rank r contributes (3r + 1) mod 4 values: some ranks nothing. */
static void allgather(void) {
    int64_t *counts = (int64_t *)calloc((size_t)P, sizeof(int64_t)), total = 0, i, r, k = 0;
    int64_t *send, *recv;
    for (r = 0; r < P; r++) total += counts[r] = (3 * r + 1) % 4;
    send = (int64_t *)malloc((size_t)(counts[R] + 1) * sizeof(int64_t));
    recv = (int64_t *)malloc((size_t)(total + 1) * sizeof(int64_t));
    for (i = 0; i < counts[R]; i++) send[i] = ival(R, i);
    T_ASSERT(moe_comm_allgather(ctx, world, send, recv, counts, MOE_COMM_I64) == MOE_OK, "%s", moe_ctx_error(ctx));
    for (r = 0; r < P; r++)
        for (i = 0; i < counts[r]; i++, k++)
            T_CHECK(recv[k] == ival((int)r, i), "rank %lld's [%lld]", (long long)r, (long long)i);
    free(counts); free(send); free(recv);
}

static void alltoall(void) {
    int64_t n = 5, i, r;
    int32_t *send = (int32_t *)malloc((size_t)(P * n) * sizeof(int32_t)), *recv = (int32_t *)malloc((size_t)(P * n) * sizeof(int32_t));
    for (r = 0; r < P; r++)
        for (i = 0; i < n; i++) send[r * n + i] = (int32_t)(R * 10000 + r * 100 + i); /* from R to r */
    T_ASSERT(moe_comm_alltoall(ctx, world, send, recv, n, MOE_COMM_I32) == MOE_OK, "%s", moe_ctx_error(ctx));
    for (r = 0; r < P; r++)
        for (i = 0; i < n; i++)
            T_CHECK(recv[r * n + i] == (int32_t)(r * 10000 + R * 100 + i), "from rank %lld [%lld]", (long long)r, (long long)i);
    free(send); free(recv);
}

/* Rows of width 3: rank s sends (s + d) mod 3 rows to rank d (zero for some pairs). */
/* The all-to-all-v cases' rows: rank R sends (R + r) % 3 rows of W values to rank r, each value
   naming its source, destination, row and column; the check recomputes them on arrival. */
static void rows_fill(double *send, const int64_t *srows, int64_t W) {
    int64_t r, j, c, k = 0;
    for (r = 0; r < P; r++)
        for (j = 0; j < srows[r]; j++)
            for (c = 0; c < W; c++) send[k++] = (double)(R * 1000000 + r * 1000 + j * 10 + c);
}
static void rows_check(const double *recv, const int64_t *rrows, int64_t W) {
    int64_t r, j, c, k = 0;
    for (r = 0; r < P; r++)
        for (j = 0; j < rrows[r]; j++)
            for (c = 0; c < W; c++, k++)
                T_CHECK(recv[k] == (double)(r * 1000000 + R * 1000 + j * 10 + c), "from rank %lld row %lld col %lld: %g",
                        (long long)r, (long long)j, (long long)c, recv[k]);
}

static void alltoallv(void) {
    const int64_t W = 3;
    int64_t *srows = (int64_t *)malloc((size_t)P * sizeof(int64_t)), *rrows = (int64_t *)malloc((size_t)P * sizeof(int64_t));
    int64_t stot = 0, rtot = 0, r;
    double *send, *recv;
    for (r = 0; r < P; r++) {
        stot += srows[r] = (R + r) % 3;
        rtot += rrows[r] = (r + R) % 3;
    }
    send = (double *)malloc((size_t)(stot * W + 1) * sizeof(double));
    recv = (double *)malloc((size_t)(rtot * W + 1) * sizeof(double));
    rows_fill(send, srows, W);
    T_ASSERT(moe_comm_alltoallv(ctx, world, send, srows, recv, rrows, W, MOE_COMM_F64) == MOE_OK, "%s", moe_ctx_error(ctx));
    rows_check(recv, rrows, W);
    free(srows); free(rrows); free(send); free(recv);
}

/* The same exchange without waiting (moe__comm_alltoallv_start, the expert-parallel layer's):
   tests while it is in flight, then the wait; the rows, the bytes counted and the count of
   exchanges work ran beside (MPI: this one; SELF completes it in the start, nothing to test). */
static void alltoallv_started(void) {
    const int64_t W = 3;
    int64_t srows[64], rrows[64], rtot = 0, r, bytes0 = moe_comm_bytes_received(world);
    int64_t overlapped0 = world->overlapped, i;
    double send[64 * 2 * 3 + 1], recv[64 * 2 * 3 + 1];
    moe__comm_req req;
    for (r = 0; r < P; r++) {
        srows[r] = (R + r) % 3;
        rtot += rrows[r] = (r + R) % 3;
    }
    rows_fill(send, srows, W);
    T_ASSERT(moe__comm_alltoallv_start(ctx, world, NULL, MOE_OK, send, srows, recv, rrows, W, MOE_COMM_F64, &req) == MOE_OK, "%s",
             moe_ctx_error(ctx));
    for (i = 0; i < 3; i++) T_CHECK(moe__comm_test(ctx, world, &req) == MOE_OK, "test %lld: %s", (long long)i, moe_ctx_error(ctx));
    T_ASSERT(moe__comm_wait(ctx, world, &req) == MOE_OK, "%s", moe_ctx_error(ctx));
    rows_check(recv, rrows, W);
    T_CHECK(moe_comm_bytes_received(world) - bytes0 == 8 * W * (rtot - rrows[R]), "%lld bytes counted, want %lld",
            (long long)(moe_comm_bytes_received(world) - bytes0), (long long)(8 * W * (rtot - rrows[R])));
    T_CHECK(world->overlapped - overlapped0 == (MOE_COMM_DEFAULT == MOE_COMM_MPI), "%lld exchanges counted as overlapped",
            (long long)(world->overlapped - overlapped0));
    T_CHECK(moe__comm_wait(ctx, world, &req) == MOE_OK && moe__comm_test(ctx, world, &req) == MOE_OK, "a completed exchange: "
            "waiting or testing again does nothing");
}

/* Expert-parallel groups of 2 consecutive ranks and expert-data-parallel groups of equal
   position (reference gpu.md §5.3); an all-reduce inside a group sums only its ranks. */
static void split(void) {
    moe_comm *ep = NULL, *edp = NULL, *none = NULL;
    int64_t s = R, want = 0, r;
    T_ASSERT(moe_comm_split(ctx, world, R / 2, R, &ep) == MOE_OK, "%s", moe_ctx_error(ctx));
    T_ASSERT(moe_comm_split(ctx, world, R % 2, R, &edp) == MOE_OK, "%s", moe_ctx_error(ctx));
    T_CHECK(moe_comm_rank(ep) == R % 2 && moe_comm_size(ep) == ((R / 2) * 2 + 1 < P ? 2 : 1), "EP rank %d of %d",
            moe_comm_rank(ep), moe_comm_size(ep));
    T_CHECK(moe_comm_rank(edp) == R / 2 && moe_comm_size(edp) == (P - R % 2 + 1) / 2, "EDP rank %d of %d", moe_comm_rank(edp),
            moe_comm_size(edp));
    T_CHECK(moe_comm_allreduce(ctx, ep, &s, 1, MOE_COMM_I64, MOE_COMM_SUM) == MOE_OK, "%s", moe_ctx_error(ctx));
    for (r = 0; r < P; r++) want += r / 2 == R / 2 ? r : 0;
    T_CHECK(s == want, "EP group sum %lld, want %lld", (long long)s, (long long)want);
    T_CHECK(moe_comm_split(ctx, world, -1, 0, &none) == MOE_ERR_ARG && !none, "a negative color is refused");
    moe_comm_free(edp);
    moe_comm_free(ep);
}

static void check_config(void) {
    moe_config c = moe_config_tiny();
    moe_status st;
    T_CHECK(moe_comm_check_config(ctx, world, &c) == MOE_OK, "equal configs: %s", moe_ctx_error(ctx));
    if (P == 1) return;
    if (R == P - 1) c.rope_scaling.beta_fast = 33; /* one rank, a late field */
    if (R == 1) c.moe_intermediate_size = 48;       /* another rank, an earlier one */
    st = moe_comm_check_config(ctx, world, &c);
    T_CHECK(st == MOE_ERR_CONFIG, "a differing config: %s", moe_status_name(st));
    T_CHECK(strstr(moe_ctx_error(ctx), "moe_intermediate_size") != NULL, "every rank names the first field: %s",
            moe_ctx_error(ctx));
}

static void bad_arguments(void) {
    int64_t counts[64] = {0}, x = 1;
    T_CHECK(moe_comm_bcast(ctx, world, &x, 1, MOE_COMM_I64, P) == MOE_ERR_ARG, "root out of range");
    T_CHECK(moe_comm_allreduce(ctx, world, NULL, 4, MOE_COMM_F32, MOE_COMM_SUM) == MOE_ERR_ARG, "NULL buffer");
    T_CHECK(moe_comm_allreduce(ctx, world, &x, -1, MOE_COMM_I64, MOE_COMM_SUM) == MOE_ERR_ARG, "negative count");
    T_CHECK(moe_comm_allreduce(ctx, world, &x, 8, MOE_COMM_BYTE, MOE_COMM_SUM) == MOE_ERR_ARG, "a sum of bytes");
    T_CHECK(moe_comm_allreduce(ctx, world, &x, 1, (moe_comm_type)9, MOE_COMM_SUM) == MOE_ERR_ARG, "an unknown type");
    counts[0] = -2;
    T_CHECK(moe_comm_allgather(ctx, world, &x, &x, counts, MOE_COMM_I64) == MOE_ERR_ARG, "a negative count");
    T_CHECK(moe_comm_allgather(ctx, world, &x, &x, NULL, MOE_COMM_I64) == MOE_ERR_ARG, "NULL counts");
    T_CHECK(moe_comm_alltoallv(ctx, world, &x, counts, &x, counts, 0, MOE_COMM_I64) == MOE_ERR_ARG, "width 0");
    T_CHECK(moe_comm_barrier(ctx, NULL) == MOE_ERR_ARG, "NULL communicator");
    T_CHECK(moe_comm_check_config(ctx, world, NULL) == MOE_ERR_ARG, "NULL config");
#ifndef MOE_MPI
    {
        moe_comm *c = NULL;
        T_CHECK(moe_comm_init(ctx, MOE_COMM_MPI, &c) == MOE_ERR_UNSUPPORTED && !c, "MPI without MOE_MPI: %s", moe_ctx_error(ctx));
    }
#endif
}

/* One rank's arguments refused: every rank returns an error (the others MOE_ERR_COMM) and
   none waits in an exchange the refused rank never joins; the communicator works on. */
static void one_rank_refused(void) {
    int64_t rows[64], x[64] = {0}, ok_sum = R;
    int r;
    moe_status st;
    for (r = 0; r < P; r++) rows[r] = 1;
    if (R == P - 1) rows[0] = -1; /* the last rank's counts are bad */
    st = moe_comm_alltoallv(ctx, world, x, rows, x + 32, rows, 1, MOE_COMM_I64);
    if (R == P - 1) T_CHECK(st == MOE_ERR_ARG, "the refusing rank: %s", moe_status_name(st));
    else T_CHECK(st == MOE_ERR_COMM && strstr(moe_ctx_error(ctx), "another rank"), "the others: %s (%s)", moe_status_name(st),
                 moe_ctx_error(ctx));
    T_CHECK(moe_comm_allreduce(ctx, world, &ok_sum, 1, MOE_COMM_I64, MOE_COMM_SUM) == MOE_OK && ok_sum == (int64_t)P * (P - 1) / 2,
            "a collective after the refusal: %lld", (long long)ok_sum);
}

/* Gradients accumulated but not collected: the optimizer refuses to step on the zeros left in
   their place (moe_model_reduce_grads collects them). */
static void accumulated_not_collected(void) {
    moe_config c = moe_config_tiny();
    moe_model *m = NULL;
    moe_adamw *opt = NULL;
    moe_tensor *loss = NULL;
    int32_t tok[2 * 9];
    float gn = 0;
    int i;
    for (i = 0; i < 18; i++) tok[i] = (int32_t)((i * 37 + 1) % 256);
    T_ASSERT(moe_model_new(ctx, &c, 5, &m) == MOE_OK && moe_adamw_new(ctx, m, NULL, &opt) == MOE_OK, "%s", moe_ctx_error(ctx));
    T_ASSERT(moe_model_loss(ctx, m, tok, 2, 8, NULL, &loss, NULL) == MOE_OK && moe_backward(ctx, loss) == MOE_OK, "%s",
             moe_ctx_error(ctx));
    moe_ctx_reset(ctx);
    T_CHECK(moe_model_accumulate_grads(ctx, m) == MOE_OK, "%s", moe_ctx_error(ctx));
    T_CHECK(moe_adamw_step(ctx, opt, 1e-3f, 1.0f, 1.0f, &gn) == MOE_ERR_STATE, "a step before the sum is collected");
    T_CHECK(moe_model_reduce_grads(ctx, m, world) == MOE_OK, "%s", moe_ctx_error(ctx));
    T_CHECK(moe_adamw_step(ctx, opt, 1e-3f, 1.0f, 1.0f, &gn) == MOE_OK && gn > 0, "then the step: %s, norm %g", moe_ctx_error(ctx),
            (double)gn);
    moe_adamw_free(ctx, opt);
    moe_model_free(ctx, m);
}

/* moe_comm_bytes_received counts what came from the other ranks: a broadcast's n elements
   off the root, an all-gather's other blocks, an all-to-all-v's rows from other ranks. */
static void bytes_counted(void) {
    int64_t before, x[64], y[64 * 8], counts[64], rows[64], r, want;
    for (r = 0; r < P; r++) { counts[r] = r + 1; rows[r] = 2; }
    for (r = 0; r < 64; r++) x[r] = r;
    before = moe_comm_bytes_received(world);
    T_ASSERT(moe_comm_bcast(ctx, world, x, 10, MOE_COMM_F64, 0) == MOE_OK, "%s", moe_ctx_error(ctx));
    want = R == 0 ? 0 : 80;
    T_CHECK(moe_comm_bytes_received(world) - before == want, "broadcast: %lld bytes, want %lld",
            (long long)(moe_comm_bytes_received(world) - before), (long long)want);
    before = moe_comm_bytes_received(world);
    T_ASSERT(moe_comm_allgather(ctx, world, x, y, counts, MOE_COMM_I32) == MOE_OK, "%s", moe_ctx_error(ctx));
    want = 4 * ((int64_t)P * (P + 1) / 2 - (R + 1));
    T_CHECK(moe_comm_bytes_received(world) - before == want, "all-gather: %lld bytes, want %lld",
            (long long)(moe_comm_bytes_received(world) - before), (long long)want);
    before = moe_comm_bytes_received(world);
    T_ASSERT(moe_comm_alltoallv(ctx, world, x, rows, y, rows, 3, MOE_COMM_F32) == MOE_OK, "%s", moe_ctx_error(ctx));
    want = 4 * 3 * 2 * (int64_t)(P - 1);
    T_CHECK(moe_comm_bytes_received(world) - before == want, "all-to-all-v: %lld bytes, want %lld",
            (long long)(moe_comm_bytes_received(world) - before), (long long)want);
}

/* Tokens of micro-batch s: [2, 9] of the tiny vocabulary. */
static void micro_batch(int s, int32_t *tok) {
    int i;
    for (i = 0; i < 18; i++) tok[i] = (int32_t)((i * 37 + s * 101 + 1) % 256);
}

/* The oracle of the parallel cases: one process, micro-batches 0..P-1 in order, gradients
   accumulated ("reduce fully, then add") and collected over SELF; losses[s] of each. */
static void one_process(moe_model *m, double *losses) {
    moe_comm *self = NULL;
    int32_t tok[18];
    int s;
    T_ASSERT(moe_comm_init(ctx, MOE_COMM_SELF, &self) == MOE_OK, "%s", moe_ctx_error(ctx));
    for (s = 0; s < P; s++) {
        moe_tensor *loss = NULL;
        micro_batch(s, tok);
        T_ASSERT(moe_model_loss(ctx, m, tok, 2, 8, NULL, &loss, NULL) == MOE_OK && moe_backward(ctx, loss) == MOE_OK, "%s",
                 moe_ctx_error(ctx));
        losses[s] = moe_tensor_get(loss, 0);
        moe_ctx_reset(ctx);
        T_ASSERT(moe_model_accumulate_grads(ctx, m) == MOE_OK, "%s", moe_ctx_error(ctx));
    }
    T_ASSERT(moe_model_reduce_grads(ctx, m, self) == MOE_OK, "%s", moe_ctx_error(ctx));
    moe_comm_free(self);
}

/* Every gradient of a and b, bit for bit; the count of differing values. */
static int64_t grads_differ(const moe_model *a, const moe_model *b) {
    int64_t i, j, differ = 0;
    for (i = 0; i < moe_model_tensor_count(a); i++) {
        int is_param = 0;
        moe_tensor *ta = moe_model_tensor(a, i, NULL, &is_param), *tb = moe_model_tensor(b, i, NULL, NULL);
        if (!is_param) continue;
        for (j = 0; j < ta->numel; j++) {
            float x = (float)moe_tensor_get(ta->grad, j), y = (float)moe_tensor_get(tb->grad, j);
            differ += memcmp(&x, &y, sizeof x) != 0;
        }
    }
    return differ;
}

/* Expert parallelism at the layer: rank R runs micro-batch R with the routed experts spread
   over EP groups of `ep` ranks (ep = P, also with the experts' down_proj frozen, and 2 x 2 on
   four ranks); its loss (the forward) and, after moe_model_reduce_grads, every gradient (the
   backward: dispatch, experts, combine and the experts' weight gradients added over the
   sources in rank order) equal one process's. In every MoE layer the shared expert ran beside
   an exchange in flight, once in forward (the dispatch) and once in backward (the output
   gradients): the EP communicator counts those exchanges. */
static void freeze_down_proj(moe_model *m) {
    int64_t i;
    for (i = 0; i < moe_model_tensor_count(m); i++) {
        const char *name = NULL;
        moe_tensor *t = moe_model_tensor(m, i, &name, NULL);
        if (strstr(name, "experts.down_proj")) moe_tensor_set_requires_grad(ctx, t, 0);
    }
}
static void expert_parallel_layer(void) {
    moe_config c = moe_config_tiny();
    int64_t moe_layers = c.num_hidden_layers - c.first_k_dense_replace, overlapped; /* the loss without MTP (NULL options) */
    int eps[3], frozen[3], n_eps = 0, k;
    eps[n_eps] = P; frozen[n_eps++] = 0;
    eps[n_eps] = P; frozen[n_eps++] = 1;
    if (P == 4) { eps[n_eps] = 2; frozen[n_eps++] = 0; }
    for (k = 0; k < n_eps; k++) {
        moe_model *ref = NULL, *m = NULL;
        moe_comm *ep = NULL, *edp = NULL;
        moe_tensor *loss = NULL;
        double losses[8], mine;
        int32_t tok[18];
        int64_t differ;
        if (c.n_routed_experts % eps[k] != 0) {
            T_NOTE("16 experts do not split over %d ranks: nothing to compare (expert_parallel_refused checks the refusal)", eps[k]);
            continue;
        }
        T_ASSERT(moe_model_new(ctx, &c, 5, &ref) == MOE_OK && moe_model_new(ctx, &c, 5, &m) == MOE_OK, "%s", moe_ctx_error(ctx));
        if (frozen[k]) {
            freeze_down_proj(ref);
            freeze_down_proj(m);
        }
        one_process(ref, losses);
        T_ASSERT(moe_comm_split(ctx, world, R / eps[k], R, &ep) == MOE_OK && moe_comm_split(ctx, world, R % eps[k], R, &edp) == MOE_OK,
                 "%s", moe_ctx_error(ctx));
        T_ASSERT(moe_model_expert_parallel(ctx, m, ep, P > eps[k] ? edp : NULL) == MOE_OK, "%s", moe_ctx_error(ctx));
        micro_batch(R, tok);
        overlapped = ep->overlapped;
        T_ASSERT(moe_model_loss(ctx, m, tok, 2, 8, NULL, &loss, NULL) == MOE_OK && moe_backward(ctx, loss) == MOE_OK, "%s",
                 moe_ctx_error(ctx));
        mine = moe_tensor_get(loss, 0);
        moe_ctx_reset(ctx);
        overlapped = ep->overlapped - overlapped;
        T_CHECK(c.n_shared_experts > 0 && overlapped == (eps[k] > 1 ? 2 * moe_layers : 0),
                "EP %d: %lld exchanges ran beside the shared expert, want %lld", eps[k], (long long)overlapped,
                (long long)(eps[k] > 1 ? 2 * moe_layers : 0));
        T_CHECK(memcmp(&mine, &losses[R], sizeof mine) == 0, "EP %d: the loss of micro-batch %d is %.9g, one process %.9g", eps[k], R,
                mine, losses[R]);
        T_ASSERT(moe_model_reduce_grads(ctx, m, world) == MOE_OK, "%s", moe_ctx_error(ctx));
        differ = grads_differ(m, ref);
        T_CHECK(differ == 0, "EP %d: %lld gradient values differ from one process's", eps[k], (long long)differ);
        T_NOTE("EP %d%s%s: loss and every gradient value bit-identical to one process; %lld exchanges beside the shared expert",
               eps[k], P > eps[k] ? " x DP 2" : "", frozen[k] ? ", routed experts' down_proj frozen" : "", (long long)overlapped);
        T_CHECK(moe_model_expert_parallel(ctx, m, NULL, NULL) == MOE_OK, "turning it off: %s", moe_ctx_error(ctx));
        moe_comm_free(edp);
        moe_comm_free(ep);
        moe_model_free(ctx, ref);
        moe_model_free(ctx, m);
    }
}

/* The exchanges' payload (moe_model_expert_parallel_payload), EP = P, FP8 training: an E4M3
   dispatch with power-of-two tile scales gives one process's loss bit for bit (the experts'
   first GEMM quantises the same 1×128 tiles, and re-quantising a dequantised tile is exact);
   the gradients differ where the experts' weight gradients see the dispatched tiles instead of
   the inputs: each input value then passes two E4M3 roundings (the dispatch's 1×128 tile, then
   the weight gradient's 128×1 tile) instead of one, each within 2^-4 of the value, so a weight
   gradient moves by up to 2·2^-4 = 0.125 of the sum of its terms' magnitudes; the tolerance is
   0.125 of each tensor's largest gradient (measured 0.080 on 2 ranks, 0.092 on 4). With a BF16 combine as well, every
   row exchange carries at most half the bytes (E4M3 + a scale per 128 values, or BF16, against
   FP32; the 4-byte gates stay): the bytes received must drop below half. An FP8 dispatch in
   FP32 training is refused. */
static double grads_max_rel(const moe_model *a, const moe_model *b) {
    int64_t i, j;
    double worst = 0;
    for (i = 0; i < moe_model_tensor_count(a); i++) {
        int is_param = 0;
        moe_tensor *ta = moe_model_tensor(a, i, NULL, &is_param), *tb = moe_model_tensor(b, i, NULL, NULL);
        double big = 0, diff = 0;
        if (!is_param) continue;
        for (j = 0; j < ta->numel; j++) {
            double x = moe_tensor_get(ta->grad, j), y = moe_tensor_get(tb->grad, j);
            big = fabs(y) > big ? fabs(y) : big;
            diff = fabs(x - y) > diff ? fabs(x - y) : diff;
        }
        if (big > 0 && diff / big > worst) worst = diff / big;
    }
    return worst;
}
static void expert_parallel_payload(void) {
    moe_config c = moe_config_tiny();
    moe_model *ref = NULL, *m = NULL;
    moe_tensor *loss = NULL;
    double losses[8], mine, rel;
    int64_t bytes[2];
    int32_t tok[18];
    int k;
    moe_status st;
    if (P == 1 || c.n_routed_experts % P != 0) {
        T_NOTE("%d ranks: no exchange to carry", P);
        return;
    }
    T_ASSERT(moe_model_new(ctx, &c, 5, &ref) == MOE_OK && moe_model_new(ctx, &c, 5, &m) == MOE_OK, "%s", moe_ctx_error(ctx));
    T_ASSERT(moe_model_expert_parallel(ctx, m, world, NULL) == MOE_OK, "%s", moe_ctx_error(ctx));
    T_ASSERT(moe_model_expert_parallel_payload(ctx, m, MOE_FP8_E4M3, MOE_F32) == MOE_OK, "%s", moe_ctx_error(ctx));
    micro_batch(R, tok);
    st = moe_model_loss(ctx, m, tok, 2, 8, NULL, &loss, NULL);
    T_CHECK(st == MOE_ERR_UNSUPPORTED && strstr(moe_ctx_error(ctx), "FP8 training"), "an FP8 dispatch in FP32 training: %s (%s)",
            moe_status_name(st), moe_ctx_error(ctx));
    moe_ctx_reset(ctx);
    T_ASSERT(moe_ctx_set_gemm_precision(ctx, MOE_FP8_E4M3) == MOE_OK, "%s", moe_ctx_error(ctx));
    one_process(ref, losses);
    T_ASSERT(moe_model_loss(ctx, m, tok, 2, 8, NULL, &loss, NULL) == MOE_OK && moe_backward(ctx, loss) == MOE_OK, "%s",
             moe_ctx_error(ctx));
    mine = moe_tensor_get(loss, 0);
    moe_ctx_reset(ctx);
    T_CHECK(memcmp(&mine, &losses[R], sizeof mine) == 0, "FP8 dispatch: the loss of micro-batch %d is %.9g, one process %.9g", R, mine,
            losses[R]);
    T_ASSERT(moe_model_reduce_grads(ctx, m, world) == MOE_OK, "%s", moe_ctx_error(ctx));
    rel = grads_max_rel(m, ref);
    T_CHECK(rel <= 0.125, "FP8 dispatch: gradients %.3g of their tensor's largest from one process's (tolerance 0.125)", rel);
    T_NOTE("FP8 dispatch: loss bit-identical to one process, gradients within %.3g (relative to each tensor's largest)", rel);
    for (k = 0; k < 2; k++) { /* the bytes of one forward and backward: FP32 payloads, then E4M3 dispatch + BF16 combine */
        int64_t before = moe_comm_bytes_received(world);
        T_ASSERT(moe_model_expert_parallel_payload(ctx, m, k ? MOE_FP8_E4M3 : MOE_F32, k ? MOE_BF16 : MOE_F32) == MOE_OK, "%s",
                 moe_ctx_error(ctx));
        moe_model_zero_grad(m);
        T_ASSERT(moe_model_loss(ctx, m, tok, 2, 8, NULL, &loss, NULL) == MOE_OK && moe_backward(ctx, loss) == MOE_OK, "%s",
                 moe_ctx_error(ctx));
        moe_ctx_reset(ctx);
        bytes[k] = moe_comm_bytes_received(world) - before;
    }
    T_CHECK(bytes[1] > 0 && 2 * bytes[1] < bytes[0], "E4M3 dispatch + BF16 combine: %lld bytes received against %lld in FP32",
            (long long)bytes[1], (long long)bytes[0]);
    T_NOTE("bytes received in one step's MoE exchanges: %lld with E4M3 dispatch + BF16 combine, %lld in FP32 (%.3f)",
           (long long)bytes[1], (long long)bytes[0], (double)bytes[1] / (double)bytes[0]);
    T_ASSERT(moe_ctx_set_gemm_precision(ctx, MOE_F32) == MOE_OK, "%s", moe_ctx_error(ctx));
    T_CHECK(moe_model_expert_parallel_payload(ctx, m, MOE_BF16, MOE_F32) == MOE_ERR_ARG, "a BF16 dispatch is refused");
    T_CHECK(moe_model_expert_parallel_payload(ctx, m, MOE_F32, MOE_FP8_E4M3) == MOE_ERR_ARG, "an FP8 combine is refused");
    moe_model_expert_parallel(ctx, m, NULL, NULL);
    moe_model_free(ctx, ref);
    moe_model_free(ctx, m);
}

/* Experts that do not split over the EP ranks are refused on every rank, by name. */
static void expert_parallel_refused(void) {
    moe_config c = moe_config_tiny();
    moe_model *m = NULL;
    moe_status st;
    T_ASSERT(moe_model_new(ctx, &c, 5, &m) == MOE_OK, "%s", moe_ctx_error(ctx));
    st = moe_model_expert_parallel(ctx, m, world, NULL);
    if (c.n_routed_experts % P != 0)
        T_CHECK(st == MOE_ERR_CONFIG && strstr(moe_ctx_error(ctx), "do not split"), "16 experts over %d ranks: %s (%s)", P,
                moe_status_name(st), moe_ctx_error(ctx));
    else
        T_CHECK(st == MOE_OK, "16 experts over %d ranks: %s", P, moe_ctx_error(ctx));
    if (st == MOE_OK && P > 1) { /* one FP8 scale over every source's rows is not one process's: refused */
        moe_fp8_options f8;
        moe_tensor *loss = NULL;
        int32_t tok[18];
        memset(&f8, 0, sizeof f8);
        f8.per_tensor = 1;
        micro_batch(R, tok);
        T_ASSERT(moe_ctx_set_fp8(ctx, &f8) == MOE_OK && moe_ctx_set_gemm_precision(ctx, MOE_FP8_E4M3) == MOE_OK, "%s", moe_ctx_error(ctx));
        st = moe_model_loss(ctx, m, tok, 2, 8, NULL, &loss, NULL);
        T_CHECK(st == MOE_ERR_UNSUPPORTED && strstr(moe_ctx_error(ctx), "per-tensor"), "per-tensor FP8 under EP: %s (%s)",
                moe_status_name(st), moe_ctx_error(ctx));
        moe_ctx_reset(ctx);
        memset(&f8, 0, sizeof f8);
        T_ASSERT(moe_ctx_set_fp8(ctx, &f8) == MOE_OK && moe_ctx_set_gemm_precision(ctx, MOE_F32) == MOE_OK, "%s", moe_ctx_error(ctx));
    }
    T_CHECK(moe_model_expert_parallel(ctx, m, NULL, world) == MOE_ERR_ARG, "an EDP group without an EP group");
    moe_model_expert_parallel(ctx, m, NULL, NULL);
    moe_model_free(ctx, m);
}

/* A failure in one EP group reaches every rank of the job at an EP layer's vote (the EP group,
   then the EDP group joining the EP groups: otherwise the other groups would wait in the EDP
   group's broadcasts), and ranks whose exchange settings differ are refused together. */
static void expert_parallel_agreed(void) {
    moe_config c = moe_config_tiny();
    moe_model *m = NULL;
    moe_comm *ep = NULL, *edp = NULL;
    moe_tensor *loss = NULL;
    moe__moe L;
    moe__comm_req req;
    moe_status st;
    int32_t tok[18];
    int64_t none[64] = {0}; /* rows to and from each rank of an EP group (up to 64 ranks) */
    if (P == 1) {
        T_NOTE("one rank: nothing to agree on");
        return;
    }
    memset(&L, 0, sizeof L);
    if (P == 4) {
        T_ASSERT(moe_comm_split(ctx, world, R / 2, R, &ep) == MOE_OK && moe_comm_split(ctx, world, R % 2, R, &edp) == MOE_OK, "%s",
                 moe_ctx_error(ctx));
        L.ep = ep;
        L.edp = edp;
    } else {
        L.ep = world;
    }
    st = moe__ep_agree(ctx, &L, R == P - 1 ? moe__fail(ctx, MOE_ERR_MEMORY, "rank %d out of memory (on purpose)", R) : MOE_OK);
    if (R == P - 1) T_CHECK(st == MOE_ERR_MEMORY, "the failing rank: %s", moe_status_name(st));
    else T_CHECK(st == MOE_ERR_COMM && strstr(moe_ctx_error(ctx), "another rank"), "rank %d: %s (%s)", R, moe_status_name(st),
                 moe_ctx_error(ctx));
    T_CHECK(moe__ep_agree(ctx, &L, MOE_OK) == MOE_OK, "then every rank goes on: %s", moe_ctx_error(ctx));
    /* an exchange's start takes the same vote before it posts anything (here an empty one); the
       failing rank votes without an exchange, as moe__ep_post does when it has no memory left */
    if (R == 0) st = moe__ep_start(ctx, &L, moe__fail(ctx, MOE_ERR_MEMORY, "rank 0 out of memory (on purpose)"), NULL, NULL, NULL,
                                   NULL, 0, MOE_COMM_BYTE, NULL);
    else st = moe__ep_start(ctx, &L, MOE_OK, NULL, none, NULL, none, 1, MOE_COMM_F32, &req);
    if (R == 0) T_CHECK(st == MOE_ERR_MEMORY, "the failing rank's start: %s", moe_status_name(st));
    else T_CHECK(st == MOE_ERR_COMM && strstr(moe_ctx_error(ctx), "another rank"), "rank %d's start: %s (%s)", R, moe_status_name(st),
                 moe_ctx_error(ctx));
    if (R != 0) T_CHECK(moe__comm_wait(ctx, L.ep, &req) == MOE_OK, "nothing was posted: %s", moe_ctx_error(ctx));
    T_CHECK(moe__ep_start(ctx, &L, MOE_OK, NULL, none, NULL, none, 1, MOE_COMM_F32, &req) == MOE_OK &&
                moe__comm_wait(ctx, L.ep, &req) == MOE_OK,
            "then the exchange runs: %s", moe_ctx_error(ctx));
    if (ep) moe_comm_free(ep);
    if (edp) moe_comm_free(edp);
    /* the last rank's outputs would come home in BF16, the others' in FP32 */
    T_ASSERT(moe_model_new(ctx, &c, 5, &m) == MOE_OK, "%s", moe_ctx_error(ctx));
    if (c.n_routed_experts % P == 0) {
        T_ASSERT(moe_model_expert_parallel(ctx, m, world, NULL) == MOE_OK, "%s", moe_ctx_error(ctx));
        T_ASSERT(moe_model_expert_parallel_payload(ctx, m, MOE_F32, R == P - 1 ? MOE_BF16 : MOE_F32) == MOE_OK, "%s",
                 moe_ctx_error(ctx));
        micro_batch(R, tok);
        st = moe_model_loss(ctx, m, tok, 2, 8, NULL, &loss, NULL);
        T_CHECK(st == MOE_ERR_CONFIG && strstr(moe_ctx_error(ctx), "settings differ"), "differing payloads on rank %d: %s (%s)", R,
                moe_status_name(st), moe_ctx_error(ctx));
        moe_ctx_reset(ctx);
        moe_model_expert_parallel(ctx, m, NULL, NULL);
    }
    moe_model_free(ctx, m);
}

/* ZeRO-1: the moments sharded, gradients reduce-scattered, parameters all-gathered after the
   step: the parameters and the norm are those of the unsharded optimizer, bit for bit, and
   each rank holds its share of the moments. */
static void zero_shard(void) {
    moe_config c = moe_config_tiny();
    moe_model *a = NULL, *b = NULL;
    moe_adamw *oa = NULL, *ob = NULL;
    moe_comm *self = NULL;
    int32_t tok[18];
    float na = 0, nb = 0;
    int64_t i, j, differ = 0;
    int step;
    T_ASSERT(moe_model_new(ctx, &c, 5, &a) == MOE_OK && moe_model_new(ctx, &c, 5, &b) == MOE_OK, "%s", moe_ctx_error(ctx));
    T_ASSERT(moe_adamw_new(ctx, a, NULL, &oa) == MOE_OK && moe_adamw_new(ctx, b, NULL, &ob) == MOE_OK, "%s", moe_ctx_error(ctx));
    T_ASSERT(moe_adamw_shard(ctx, ob, world) == MOE_OK, "%s", moe_ctx_error(ctx));
    T_CHECK(moe_adamw_shard(ctx, ob, world) == MOE_ERR_STATE, "sharding twice is refused");
    /* a shard is whole chunks of the norm (32768 values, 8 bytes of moments each): at most one more than 1/P */
    T_CHECK(moe_adamw_state_bytes(ob) <= moe_adamw_state_bytes(oa) / (size_t)P + 8 * 32768 &&
                (P > 1 || moe_adamw_state_bytes(ob) == moe_adamw_state_bytes(oa)),
            "moments held: %zu of %zu bytes on %d ranks", moe_adamw_state_bytes(ob), moe_adamw_state_bytes(oa), P);
    for (step = 0; step < 2; step++) {
        moe_model *ms[2];
        int k;
        ms[0] = a;
        ms[1] = b;
        micro_batch(R + step, tok);
        for (k = 0; k < 2; k++) {
            moe_tensor *loss = NULL;
            T_ASSERT(moe_model_loss(ctx, ms[k], tok, 2, 8, NULL, &loss, NULL) == MOE_OK && moe_backward(ctx, loss) == MOE_OK, "%s",
                     moe_ctx_error(ctx));
            moe_ctx_reset(ctx);
            T_ASSERT(moe_model_reduce_grads(ctx, ms[k], world) == MOE_OK, "%s", moe_ctx_error(ctx));
        }
        T_ASSERT(moe_adamw_step(ctx, oa, 1e-3f, 1.0f, 0.5f, &na) == MOE_OK && moe_adamw_step(ctx, ob, 1e-3f, 1.0f, 0.5f, &nb) == MOE_OK,
                 "%s", moe_ctx_error(ctx));
        T_CHECK(memcmp(&na, &nb, sizeof na) == 0, "step %d: norm %.9g sharded, %.9g whole", step, (double)nb, (double)na);
    }
    for (i = 0; i < moe_model_tensor_count(a); i++) {
        moe_tensor *ta = moe_model_tensor(a, i, NULL, NULL), *tb = moe_model_tensor(b, i, NULL, NULL);
        for (j = 0; j < ta->numel; j++) {
            float x = (float)moe_tensor_get(ta, j), y = (float)moe_tensor_get(tb, j);
            differ += memcmp(&x, &y, sizeof x) != 0;
        }
    }
    T_CHECK(differ == 0, "%lld parameter values differ after 2 sharded steps", (long long)differ);
    T_NOTE("2 steps, clipped: norms and parameters bit-identical; moments held %zu of %zu bytes", moe_adamw_state_bytes(ob),
           moe_adamw_state_bytes(oa));
    {   /* checkpoints: the sharded one (gathered for rank 0) is the unsharded one's file; loaded
           into a sharded optimizer and written again, still */
        moe_train_state ts;
        moe_model *c2 = NULL;
        moe_adamw *oc = NULL;
        char pa[96], pb[96], pc[96];
        int64_t pid = (int64_t)getpid();
        memset(&ts, 0, sizeof ts);
        ts.step = 2;
        T_ASSERT(moe_comm_bcast(ctx, world, &pid, 1, MOE_COMM_I64, 0) == MOE_OK, "%s", moe_ctx_error(ctx));
        snprintf(pa, sizeof pa, "/tmp/moe_test_zero_%lld_a.bin", (long long)pid);
        snprintf(pb, sizeof pb, "/tmp/moe_test_zero_%lld_b.bin", (long long)pid);
        snprintf(pc, sizeof pc, "/tmp/moe_test_zero_%lld_c.bin", (long long)pid);
        if (R == 0) T_CHECK(moe_ckpt_save(ctx, pa, a, oa, &ts) == MOE_OK, "%s", moe_ctx_error(ctx));
        T_CHECK(moe_ckpt_save(ctx, pb, b, ob, &ts) == MOE_OK, "the sharded save: %s", moe_ctx_error(ctx));
        T_ASSERT(moe_model_new(ctx, &c, 9, &c2) == MOE_OK && moe_adamw_new(ctx, c2, NULL, &oc) == MOE_OK &&
                     moe_adamw_shard(ctx, oc, world) == MOE_OK, "%s", moe_ctx_error(ctx));
        T_CHECK(moe_ckpt_load(ctx, pb, c2, oc, &ts) == MOE_OK, "the sharded load: %s", moe_ctx_error(ctx));
        T_CHECK(moe_ckpt_save(ctx, pc, c2, oc, &ts) == MOE_OK, "saved again: %s", moe_ctx_error(ctx));
        if (R == 0) {
            FILE *fa = fopen(pa, "rb"), *fb = fopen(pb, "rb"), *fc = fopen(pc, "rb");
            long same = 0, bytes = 0;
            int x, y, z;
            T_ASSERT(fa && fb && fc, "the checkpoints were not written");
            do {
                x = fgetc(fa); y = fgetc(fb); z = fgetc(fc);
                same += x == y && y == z;
                bytes++;
            } while (x != EOF && x == y && y == z);
            T_CHECK(x == EOF && y == EOF && z == EOF, "checkpoints differ at byte %ld", bytes - 1);
            T_NOTE("unsharded, sharded and sharded-reloaded checkpoints: the same %ld bytes", same - 1);
            fclose(fa); fclose(fb); fclose(fc);
            remove(pa); remove(pb); remove(pc);
        }
        moe_adamw_free(ctx, oc);
        moe_model_free(ctx, c2);
    }
    if (P > 1) {
        T_ASSERT(moe_comm_init(ctx, MOE_COMM_SELF, &self) == MOE_OK, "%s", moe_ctx_error(ctx));
        T_CHECK(moe_model_reduce_grads(ctx, b, self) == MOE_ERR_ARG, "a reduction over another communicator than the shards'");
        moe_comm_free(self);
    }
    moe_adamw_free(ctx, oa);
    moe_adamw_free(ctx, ob);
    moe_model_free(ctx, a);
    moe_model_free(ctx, b);
}

/* ---- a case on every rank; it fails if it fails anywhere ---- */

static void dist_run(const char *name, void (*fn)(void)) {
    int64_t failures;
    t_notes[0] = 0;
    t_case_failures = 0;
    fn();
    failures = t_case_failures;
    if (moe_comm_allreduce(ctx, world, &failures, 1, MOE_COMM_I64, MOE_COMM_SUM) != MOE_OK) {
        fprintf(stderr, "rank %d: the failure count could not be summed: %s\n", R, moe_ctx_error(ctx));
        exit(3);
    }
    if (t_case_failures && R != 0) printf("rank %d, %s:\n%s", R, name, t_notes);
    if (failures) t_failed++;
    else t_passed++;
    if (R == 0) printf("%s %s (%d rank%s)\n%s", failures ? "FAIL" : "ok  ", name, P, P > 1 ? "s" : "", t_notes);
    fflush(stdout);
}
#define D_RUN(fn) dist_run(#fn, fn)

int main(void) {
    int rc;
    (void)t__run; /* the cases run through dist_run */
    if (moe_ctx_new(&ctx) != MOE_OK) return 2;
    moe_ctx_set_threads(ctx, 1);
    rc = moe_comm_init(ctx, MOE_COMM_DEFAULT, &world);
    if (rc != MOE_OK) {
        printf("FAIL comm_init: %s\nSUITE: 0 passed, 1 failed\n", moe_ctx_error(ctx));
        return 1;
    }
    R = moe_comm_rank(world);
    P = moe_comm_size(world);
    if (getenv("MOE_TEST_DIE_RANK") && atoi(getenv("MOE_TEST_DIE_RANK")) == R) {
        fprintf(stderr, "rank %d: exiting on purpose before the first collective\n", R);
        exit(7); /* the others are about to wait for it */
    }
    D_RUN(ranks);
    D_RUN(bcast);
    D_RUN(allreduce);
    D_RUN(allreduce_ordered);
    D_RUN(reduce_scatter);
    D_RUN(allgather);
    D_RUN(alltoall);
    D_RUN(alltoallv);
    D_RUN(alltoallv_started);
    D_RUN(split);
    D_RUN(check_config);
    D_RUN(bad_arguments);
    D_RUN(one_rank_refused);
    D_RUN(accumulated_not_collected);
    D_RUN(bytes_counted);
    D_RUN(expert_parallel_layer);
    D_RUN(expert_parallel_refused);
    D_RUN(expert_parallel_payload);
    D_RUN(expert_parallel_agreed);
    D_RUN(zero_shard);
    if (R == 0) rc = t_summary();
    else rc = t_failed ? 1 : 0;
    moe_comm_free(world);
    moe_ctx_free(ctx);
    return rc;
}
