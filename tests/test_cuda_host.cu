/* tests/test_cuda_host.cu — the CUDA build of moe.h, run on the host: what can be checked of
   the GPU path on a machine without a GPU (gpu.md §7.2). Built by nvcc (MOE_CUDA, the strict
   flags), linked with tests/cuda_hd_ref.c compiled by gcc; it needs no GPU and no driver.

   - device plumbing: moe_cuda_device_count gives 0 devices and MOE_OK without a GPU (and
     MOE_ERR_ARG for a NULL count or context); moe_ctx_set_device(CUDA, 0) then fails with
     MOE_ERR_UNSUPPORTED and a message containing "no CUDA device", and the context stays on
     the CPU and keeps working (a tensor, an op, its value); an unknown device, the CPU with an
     index other than 0, and a context holding step memory give their errors. Where a GPU is
     present (this binary on the GPU machine), the no-GPU expectations are replaced by: the
     device opens, names itself, rejects an index past the last, and the context goes back to
     the CPU.
   - without MOE_NCCL, moe_comm_init_nccl says how to build it (MOE_ERR_UNSUPPORTED) and
     moe_comm_init(MOE_COMM_NCCL) points to it (MOE_ERR_ARG);
   - the CUDA table: named "cuda", device MOE_DEVICE_CUDA, every function pointer filled;
     the launch arithmetic moe__cuda_blocks (at least 1 block, at most 65536, rounding up).
   - the MOE_HD math (conversions f32 ↔ bf16/f16/e4m3/e5m2, moe_fp8_scale, moe_expf, the SiLU
     pieces, moe_rope_rotate, moe_rng_hash, moe__u64_to_unit) compiled by nvcc's host path gives
     the same bits as gcc's C99 build of the same functions, over every 97th float bit pattern
     plus the special values (tests/cuda_hd_sample.h). The reference is gcc's build of moe.h,
     not an independent oracle: tests/test_numerics.c checks the functions themselves; the
     device side of these functions is checked against the CUDA intrinsics on the GPU machine
     by tests/gpu/conversions.cu.

   Build (from the repository root; the host flags match build.sh's library flags):
     gcc -std=c99 -ffp-contract=off -O3 -march=native -Wall -Wextra -Wpedantic -Werror \
         -I. -c tests/cuda_hd_ref.c -o build/cuda_hd_ref.o
     nvcc -std=c++17 -gencode arch=compute_90a,code=sm_90a -DMOE_CUDA --fmad=false -O3 \
         -Xcompiler -ffp-contract=off,-march=native \
         --Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror --Wdefault-stream-launch \
         --Wmissing-launch-bounds -Xptxas -warn-spills,-warn-lmem-usage,-Werror \
         -I. tests/test_cuda_host.cu build/cuda_hd_ref.o -o build/test_cuda_host -lcublasLt
     build/test_cuda_host [case-name-substring]
   (./build.sh test cuda does both steps and runs it.)

   - the cuBLASLt plan of a row-major product (moe__lt_plan_rowmajor: descriptors only, which
     cuBLASLt builds without a GPU, gpu.md §2.1): its attributes read back and interpreted by a
     host product written from cuBLAS's documented column-major conventions (element (i, j) of
     a matrix at p[i + j·ld], CUBLAS_OP_T reads it transposed, batches at their strides) must
     reproduce the row-major product of the same operands, over every transpose pair, padded
     leading dimensions and a strided batch; and moe__lt_alignment against the addresses. */
#define MOE_IMPLEMENTATION
#include "moe.h"
#include "test.h"

#include <stdint.h>
#include <string.h>

/* gcc's side (tests/cuda_hd_ref.c) */
extern "C" {
uint64_t hd_ref_eval(int which, uint32_t p);
void hd_ref_hashes(uint64_t *out);
int hd_ref_count(void);
}

/* nvcc's side: the same source, compiled here */
#define HD_PREFIX nv
#define HD_LINKAGE static
#include "cuda_hd_sample.h"

/* ---- device plumbing ---- */

static moe_ctx *new_ctx(void) {
    moe_ctx *ctx = NULL;
    if (moe_ctx_new(&ctx) != MOE_OK) {
        fprintf(stderr, "test_cuda_host: moe_ctx_new failed\n");
        exit(2);
    }
    return ctx;
}

static int gpus_here(void) {
    moe_ctx *ctx = new_ctx();
    int n = -1;
    if (moe_cuda_device_count(ctx, &n) != MOE_OK) n = -1;
    moe_ctx_free(ctx);
    return n;
}

/* a tiny op on the context's CPU: y = a + b on [2, 3], read back */
static void cpu_still_works(moe_ctx *ctx, const char *when) {
    const int64_t shape[2] = {2, 3};
    moe_tensor *a = NULL, *b = NULL, *y = NULL;
    moe_status st;
    int64_t i;
    T_CHECK(moe_ctx_device(ctx) == MOE_DEVICE_CPU, "%s: the context is not on the CPU", when);
    T_CHECK(strcmp(moe_cuda_device_name(ctx), "cpu") == 0, "%s: device name '%s'", when, moe_cuda_device_name(ctx));
    st = moe_tensor_new(ctx, MOE_F32, 2, shape, &a);
    T_ASSERT(st == MOE_OK, "%s: moe_tensor_new: %s (%s)", when, moe_status_name(st), moe_ctx_error(ctx));
    st = moe_tensor_new(ctx, MOE_F32, 2, shape, &b);
    T_ASSERT(st == MOE_OK, "%s: moe_tensor_new: %s (%s)", when, moe_status_name(st), moe_ctx_error(ctx));
    for (i = 0; i < 6; i++) {
        moe_tensor_set(a, i, (double)i);
        moe_tensor_set(b, i, 0.5 * (double)i);
    }
    st = moe_add(ctx, a, b, &y);
    T_CHECK(st == MOE_OK, "%s: moe_add: %s (%s)", when, moe_status_name(st), moe_ctx_error(ctx));
    if (st == MOE_OK)
        for (i = 0; i < 6; i++) T_CHECK(moe_tensor_get(y, i) == 1.5 * (double)i, "%s: y[%lld] = %g", when, (long long)i, moe_tensor_get(y, i));
    moe_ctx_reset(ctx);
    moe_tensor_free(ctx, a);
    moe_tensor_free(ctx, b);
}

static void device_count(void) {
    moe_ctx *ctx = new_ctx();
    int n = -1;
    moe_status st = moe_cuda_device_count(ctx, &n);
    T_CHECK(st == MOE_OK, "moe_cuda_device_count: %s (%s)", moe_status_name(st), moe_ctx_error(ctx));
    T_CHECK(n >= 0, "count %d", n);
    T_NOTE("%d CUDA device(s) here%s", n, n == 0 ? " (the expected answer on a machine without a GPU)" : "");
    T_CHECK(moe_cuda_device_count(ctx, NULL) == MOE_ERR_ARG, "a NULL count is not MOE_ERR_ARG");
    T_CHECK(strstr(moe_ctx_error(ctx), "count") != NULL, "message '%s'", moe_ctx_error(ctx));
    T_CHECK(moe_cuda_device_count(NULL, &n) == MOE_ERR_ARG, "a NULL context is not MOE_ERR_ARG");
    /* the CPU context's GPU calls: sync is a no-op, debug sync needs a GPU context */
    T_CHECK(moe_cuda_sync(ctx) == MOE_OK, "moe_cuda_sync on the CPU: %s", moe_ctx_error(ctx));
    T_CHECK(moe_cuda_set_debug_sync(ctx, 1) == MOE_ERR_STATE, "moe_cuda_set_debug_sync on the CPU is not MOE_ERR_STATE");
    moe_ctx_free(ctx);
}

static void set_device_cuda(void) {
    moe_ctx *ctx = new_ctx();
    int n = gpus_here();
    moe_status st;
    if (n == 0) {
        st = moe_ctx_set_device(ctx, MOE_DEVICE_CUDA, 0);
        T_CHECK(st == MOE_ERR_UNSUPPORTED, "set_device(CUDA, 0) without a GPU: %s, want MOE_ERR_UNSUPPORTED", moe_status_name(st));
        T_CHECK(strstr(moe_ctx_error(ctx), "no CUDA device") != NULL, "message '%s'", moe_ctx_error(ctx));
        T_NOTE("without a GPU: %s: %s", moe_status_name(st), moe_ctx_error(ctx));
        cpu_still_works(ctx, "after the failed set_device");
        /* asking again fails the same way (no state left behind by the first try) */
        st = moe_ctx_set_device(ctx, MOE_DEVICE_CUDA, 0);
        T_CHECK(st == MOE_ERR_UNSUPPORTED && strstr(moe_ctx_error(ctx), "no CUDA device") != NULL, "second try: %s (%s)",
                moe_status_name(st), moe_ctx_error(ctx));
        cpu_still_works(ctx, "after the second try");
    } else if (n > 0) {
        st = moe_ctx_set_device(ctx, MOE_DEVICE_CUDA, 0);
        T_ASSERT(st == MOE_OK, "set_device(CUDA, 0) with %d GPUs: %s (%s)", n, moe_status_name(st), moe_ctx_error(ctx));
        T_CHECK(moe_ctx_device(ctx) == MOE_DEVICE_CUDA, "the context is not on the GPU");
        T_CHECK(strcmp(moe_cuda_device_name(ctx), "cpu") != 0, "device name '%s'", moe_cuda_device_name(ctx));
        T_NOTE("GPU 0: %s", moe_cuda_device_name(ctx));
        T_CHECK(moe_cuda_sync(ctx) == MOE_OK, "moe_cuda_sync: %s", moe_ctx_error(ctx));
        T_CHECK(moe_cuda_set_debug_sync(ctx, 1) == MOE_OK, "moe_cuda_set_debug_sync: %s", moe_ctx_error(ctx));
        st = moe_ctx_set_device(ctx, MOE_DEVICE_CPU, 0);
        T_ASSERT(st == MOE_OK, "back to the CPU: %s (%s)", moe_status_name(st), moe_ctx_error(ctx));
        cpu_still_works(ctx, "back on the CPU");
    } else {
        T_CHECK(0, "moe_cuda_device_count failed");
    }
    moe_ctx_free(ctx);
}

static void set_device_bad_arguments(void) {
    moe_ctx *ctx = new_ctx();
    int n = gpus_here();
    moe_status st;
    static const int bad_index[] = {-1, 7, 1000};
    size_t i;
    st = moe_ctx_set_device(ctx, (moe_device)7, 0); /* what a C caller can pass */
    T_CHECK(st == MOE_ERR_ARG && strstr(moe_ctx_error(ctx), "unknown device") != NULL, "device 7: %s (%s)", moe_status_name(st),
            moe_ctx_error(ctx));
    st = moe_ctx_set_device(ctx, MOE_DEVICE_CPU, 1);
    T_CHECK(st == MOE_ERR_ARG && strstr(moe_ctx_error(ctx), "CPU is device 0") != NULL, "CPU index 1: %s (%s)", moe_status_name(st),
            moe_ctx_error(ctx));
    T_CHECK(moe_ctx_set_device(NULL, MOE_DEVICE_CPU, 0) == MOE_ERR_ARG, "a NULL context is not MOE_ERR_ARG");
    for (i = 0; i < sizeof bad_index / sizeof bad_index[0]; i++) {
        int idx = bad_index[i];
        if (n > 0 && idx >= 0 && idx < n) continue; /* a real GPU */
        st = moe_ctx_set_device(ctx, MOE_DEVICE_CUDA, idx);
        if (n == 0) /* no GPU: that comes first, whatever the index */
            T_CHECK(st == MOE_ERR_UNSUPPORTED && strstr(moe_ctx_error(ctx), "no CUDA device") != NULL, "CUDA index %d: %s (%s)", idx,
                    moe_status_name(st), moe_ctx_error(ctx));
        else
            T_CHECK(st == MOE_ERR_ARG && strstr(moe_ctx_error(ctx), "does not exist") != NULL, "CUDA index %d of %d: %s (%s)", idx, n,
                    moe_status_name(st), moe_ctx_error(ctx));
    }
    /* a context that holds step memory may not move */
    T_ASSERT(moe_ctx_scratch(ctx, 64) != NULL, "moe_ctx_scratch: %s", moe_ctx_error(ctx));
    st = moe_ctx_set_device(ctx, MOE_DEVICE_CPU, 0);
    T_CHECK(st == MOE_ERR_STATE && strstr(moe_ctx_error(ctx), "step") != NULL, "with step memory: %s (%s)", moe_status_name(st),
            moe_ctx_error(ctx));
    moe_ctx_reset(ctx);
    st = moe_ctx_set_device(ctx, MOE_DEVICE_CPU, 0);
    T_CHECK(st == MOE_OK, "set_device(CPU, 0) after the reset: %s (%s)", moe_status_name(st), moe_ctx_error(ctx));
    cpu_still_works(ctx, "after the bad arguments");
    moe_ctx_free(ctx);
}

/* ---- the NCCL communicator in a build without MOE_NCCL (tests/test_nccl.cu has the rest) ---- */

static void nccl_not_built(void) {
    moe_ctx *ctx = NULL;
    moe_comm *c = (moe_comm *)1;
    moe_status st;
    T_ASSERT(moe_ctx_new(&ctx) == MOE_OK, "moe_ctx_new");
    st = moe_comm_init_nccl(ctx, NULL, "file:/tmp/moe-nccl.id", 1.0, &c);
    T_CHECK(st == MOE_ERR_UNSUPPORTED && c == NULL && strstr(moe_ctx_error(ctx), "MOE_NCCL") && strstr(moe_ctx_error(ctx), "-lnccl"),
            "%s (%s)", moe_status_name(st), moe_ctx_error(ctx));
    st = moe_comm_init(ctx, MOE_COMM_NCCL, &c);
    T_CHECK(st == MOE_ERR_ARG && c == NULL, "moe_comm_init(MOE_COMM_NCCL): %s", moe_ctx_error(ctx));
    moe_ctx_free(ctx);
}

/* ---- the CUDA table and launch arithmetic ---- */

static void cuda_table_filled(void) {
    typedef void (*any_fn)(void);
    const moe_backend *be = moe__cuda_backend();
    const size_t first = offsetof(moe_backend, alloc), n_fn = (sizeof(moe_backend) - first) / sizeof(any_fn);
    size_t slot, missing = 0;
    T_ASSERT(be != NULL, "moe__cuda_backend() is NULL");
    T_CHECK(strcmp(be->name, "cuda") == 0, "name '%s'", be->name);
    T_CHECK(be->device == MOE_DEVICE_CUDA, "device %d", (int)be->device);
    T_CHECK((sizeof(moe_backend) - first) % sizeof(any_fn) == 0, "the function pointers do not fill the struct's tail");
    for (slot = 0; slot < n_fn; slot++) {
        any_fn fp;
        memcpy(&fp, (const char *)be + first + slot * sizeof(any_fn), sizeof fp);
        if (!fp) missing++;
        T_CHECK(fp != NULL, "function pointer %zu is NULL", slot);
    }
    T_NOTE("%zu entries, %zu NULL", n_fn, missing);
}

static void launch_arithmetic(void) {
    T_CHECK(moe__cuda_blocks(0, 256) == 1, "0 items: %lld blocks", (long long)moe__cuda_blocks(0, 256));
    T_CHECK(moe__cuda_blocks(1, 256) == 1, "1 item");
    T_CHECK(moe__cuda_blocks(256, 256) == 1, "256 items");
    T_CHECK(moe__cuda_blocks(257, 256) == 2, "257 items");
    T_CHECK(moe__cuda_blocks(37, 1) == 37, "37 rows of a block each");
    T_CHECK(moe__cuda_blocks((int64_t)256 * 65536, 256) == 65536, "exactly the cap");
    T_CHECK(moe__cuda_blocks((int64_t)256 * 65536 + 1, 256) == MOE__CUDA_MAX_BLOCKS, "above the cap");
    T_CHECK(moe__cuda_blocks((int64_t)1 << 40, 1) == MOE__CUDA_MAX_BLOCKS, "2^40 rows");
    T_CHECK(MOE__CUDA_THREADS % 32 == 0 && MOE__CUDA_THREADS <= 1024, "threads per block %d", MOE__CUDA_THREADS);
}

/* ---- the MOE_HD math: nvcc's host build against gcc's ---- */

static void hd_math_same_bits_as_gcc(void) {
    uint64_t ref[HD_COUNT], got[HD_COUNT];
    int which, bad_fns = 0;
    T_ASSERT(hd_ref_count() == HD_COUNT, "gcc's object has %d functions, this file %d (rebuild build/cuda_hd_ref.o)", hd_ref_count(),
             (int)HD_COUNT);
    hd_ref_hashes(ref);
    hd_nv_hashes(got);
    for (which = 0; which < HD_COUNT; which++) {
        const int64_t n = hd_sample_size(which);
        int64_t i, bad = 0;
        if (ref[which] == got[which]) continue;
        bad_fns++;
        /* find the inputs that differ (slow path: only after a mismatch) */
        for (i = 0; i < n; i++) {
            uint32_t p = hd_sample_input(which, i);
            uint64_t a = hd_ref_eval(which, p), b = hd_nv_eval(which, p);
            if (a == b) continue;
            if (bad < 4)
                T_CHECK(0, "%s: input 0x%08x (%.9g): gcc 0x%llx, nvcc 0x%llx", hd_names[which], (unsigned)p, (double)hd_f32(p),
                        (unsigned long long)a, (unsigned long long)b);
            bad++;
        }
        T_CHECK(0, "%s: %lld of %lld sample inputs differ (hashes %016llx gcc, %016llx nvcc)", hd_names[which], (long long)bad,
                (long long)n, (unsigned long long)ref[which], (unsigned long long)got[which]);
    }
    T_NOTE("%d functions, %lld float patterns each (one in %u of all 2^32, after %lld special values), decoders over every code: %d differ",
           (int)HD_COUNT, (long long)(HD_N_SPECIAL + HD_N_STRIDED), HD_STRIDE, (long long)HD_N_SPECIAL, bad_fns);
}

/* ---- the cuBLASLt plan of a row-major product ---- */

static int64_t lt_layout_attr(cublasLtMatrixLayout_t l, cublasLtMatrixLayoutAttribute_t what) {
    uint64_t u = 0;
    int64_t i64 = 0;
    int32_t i32 = 0;
    size_t got = 0;
    if (what == CUBLASLT_MATRIX_LAYOUT_ROWS || what == CUBLASLT_MATRIX_LAYOUT_COLS) {
        cublasLtMatrixLayoutGetAttribute(l, what, &u, sizeof u, &got);
        return (int64_t)u;
    }
    if (what == CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT) {
        i32 = 1;
        cublasLtMatrixLayoutGetAttribute(l, what, &i32, sizeof i32, &got);
        return i32;
    }
    cublasLtMatrixLayoutGetAttribute(l, what, &i64, sizeof i64, &got);
    return i64;
}

/* Element (i, j) of op(X) for a column-major X at ld (cuBLAS's convention). */
static double lt_elem(const float *x, int64_t ld, cublasOperation_t op, int64_t i, int64_t j) {
    return op == CUBLAS_OP_N ? x[i + j * ld] : x[j + i * ld];
}

static void lt_plan_describes_the_product(void) {
    static const int64_t cases[][6] = {/* m, n, k, trans_a, trans_b, batch */
                                       {5, 7, 3, 0, 0, 1}, {5, 7, 3, 0, 1, 1}, {5, 7, 3, 1, 0, 1}, {5, 7, 3, 1, 1, 1},
                                       {4, 6, 9, 0, 1, 3}, {6, 4, 8, 1, 0, 2}, {1, 9, 17, 0, 1, 1}};
    moe_rng rng = moe_rng_new(3, 3);
    int c, bad = 0, cases_n = (int)(sizeof cases / sizeof cases[0]);
    for (c = 0; c < cases_n; c++) {
        int64_t m = cases[c][0], n = cases[c][1], k = cases[c][2], batch = cases[c][5], i, j, l, b;
        int ta = (int)cases[c][3], tb = (int)cases[c][4];
        int64_t lda = (ta ? m : k) + 2, ldb = (tb ? k : n) + 3, ldc = n + 1;
        int64_t sa = (ta ? k : m) * lda + 5, sb = (tb ? n : k) * ldb + 7, sc = m * ldc + 3;
        float *A = (float *)calloc((size_t)(sa * batch), sizeof(float)), *B = (float *)calloc((size_t)(sb * batch), sizeof(float));
        moe__gemm_op op;
        moe__lt_plan p;
        cublasOperation_t opa = CUBLAS_OP_N, opb = CUBLAS_OP_N;
        size_t got;
        int64_t ar, ac, ald, br, bc, bld, cr, cc, cld;
        for (i = 0; i < sa * batch; i++) A[i] = moe_rng_uniform(&rng) - 0.5f;
        for (i = 0; i < sb * batch; i++) B[i] = moe_rng_uniform(&rng) - 0.5f;
        memset(&op, 0, sizeof op);
        op.m = m; op.n = n; op.k = k; op.batch = batch; op.trans_a = ta; op.trans_b = tb;
        op.lda = lda; op.ldb = ldb; op.ldc = ldc; op.stride_a = sa; op.stride_b = sb; op.stride_c = sc;
        T_ASSERT(moe__lt_plan_rowmajor(&p, CUDA_R_32F, &op, m, k, lda, sa, ldb, sb) == CUBLAS_STATUS_SUCCESS, "case %d: descriptors", c);
        cublasLtMatmulDescGetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa, &got);
        cublasLtMatmulDescGetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb, &got);
        ar = lt_layout_attr(p.a, CUBLASLT_MATRIX_LAYOUT_ROWS); ac = lt_layout_attr(p.a, CUBLASLT_MATRIX_LAYOUT_COLS);
        br = lt_layout_attr(p.b, CUBLASLT_MATRIX_LAYOUT_ROWS); bc = lt_layout_attr(p.b, CUBLASLT_MATRIX_LAYOUT_COLS);
        cr = lt_layout_attr(p.c, CUBLASLT_MATRIX_LAYOUT_ROWS); cc = lt_layout_attr(p.c, CUBLASLT_MATRIX_LAYOUT_COLS);
        ald = lt_layout_attr(p.a, CUBLASLT_MATRIX_LAYOUT_LD); bld = lt_layout_attr(p.b, CUBLASLT_MATRIX_LAYOUT_LD);
        cld = lt_layout_attr(p.c, CUBLASLT_MATRIX_LAYOUT_LD);
        /* cuBLAS: D [cr, cc] = op(A) [cr, inner] · op(B) [inner, cc]; A is the plan's first operand: op->b's memory */
        {
            int64_t opa_r = opa == CUBLAS_OP_N ? ar : ac, opa_c = opa == CUBLAS_OP_N ? ac : ar;
            int64_t opb_r = opb == CUBLAS_OP_N ? br : bc, opb_c = opb == CUBLAS_OP_N ? bc : br;
            T_CHECK(opa_r == cr && opb_c == cc && opa_c == opb_r, "case %d: shapes op(A) %lldx%lld op(B) %lldx%lld D %lldx%lld", c,
                    (long long)opa_r, (long long)opa_c, (long long)opb_r, (long long)opb_c, (long long)cr, (long long)cc);
            T_CHECK(lt_layout_attr(p.a, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT) == batch && lt_layout_attr(p.c, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT) == batch,
                    "case %d: batch count", c);
            for (b = 0; b < batch && opa_r == cr && opb_c == cc && opa_c == opb_r; b++) {
                int64_t s_a = batch > 1 ? lt_layout_attr(p.a, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET) : 0;
                int64_t s_b = batch > 1 ? lt_layout_attr(p.b, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET) : 0;
                int64_t s_c = batch > 1 ? lt_layout_attr(p.c, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET) : 0;
                if (s_c != (batch > 1 ? sc : 0)) bad++;
                for (i = 0; i < cr; i++)
                    for (j = 0; j < cc; j++) {
                        double d = 0, want = 0;
                        int64_t row, col;
                        for (l = 0; l < opa_c; l++) /* the plan's A is op->b's memory, its B op->a's */
                            d += lt_elem(B + b * s_a, ald, opa, i, l) * lt_elem(A + b * s_b, bld, opb, l, j);
                        /* D's element (i, j) sits at i + j·cld: row-major C's (row, col) at row·ldc + col */
                        row = (i + j * cld) / ldc;
                        col = (i + j * cld) % ldc;
                        for (l = 0; l < k; l++)
                            want += (double)(ta ? A[b * sa + l * lda + row] : A[b * sa + row * lda + l]) *
                                    (double)(tb ? B[b * sb + col * ldb + l] : B[b * sb + l * ldb + col]);
                        if (row >= m || col >= n || fabs(d - want) > 1e-9) bad++;
                    }
            }
        }
        moe__lt_plan_free(&p);
        free(A);
        free(B);
    }
    T_CHECK(bad == 0, "%d elements of the interpreted plan differ from the row-major product", bad);
    T_NOTE("%d products (every transpose pair, padded leading dimensions, strided batches): %d elements differ", cases_n, bad);
    {
        float buf[128];
        uintptr_t base = ((uintptr_t)buf + 255) & ~(uintptr_t)255;
        T_CHECK(moe__lt_alignment((const void *)base, 64, 0, 1, 4) == 256, "aligned start, ld 64 floats: 256");
        T_CHECK(moe__lt_alignment((const void *)(base + 4), 64, 0, 1, 4) == 4, "start + 4 bytes: 4");
        T_CHECK(moe__lt_alignment((const void *)base, 10, 0, 1, 2) == 4, "bf16 rows of 10: 4 bytes");
        T_CHECK(moe__lt_alignment((const void *)base, 64, 7, 2, 4) == 4, "batch stride of 7 floats: 4");
        T_CHECK(moe__lt_alignment((const void *)base, 64, 7, 1, 4) == 256, "one batch member: its stride does not count");
    }
}

/* The FP8 plan (moe__lt_plan_fp8) as cuBLASLt reads it back: "TN" (A transposed), E4M3
   operands [k, n] and [k, m] with k contiguous, FP32 D [n, m] at ldc, the two scale modes as
   given (DeepSeek's: VEC128 activations, BLK128x128 weights), fast accumulation off. */
static void lt_plan_fp8_attributes(void) {
    moe__lt_plan p;
    cublasOperation_t ta = CUBLAS_OP_N, tb = CUBLAS_OP_T;
    int32_t ma = -1, mb = -1;
    int8_t fast = 1;
    size_t got;
    uint32_t ty_a = 0, ty_c = 0;
    T_ASSERT(moe__lt_plan_fp8(&p, 1152, 904, 640, 908, CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F, CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F) ==
                 CUBLAS_STATUS_SUCCESS, "descriptors");
    cublasLtMatmulDescGetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta, &got);
    cublasLtMatmulDescGetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb, &got);
    cublasLtMatmulDescGetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &ma, sizeof ma, &got);
    cublasLtMatmulDescGetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mb, sizeof mb, &got);
    cublasLtMatmulDescGetAttribute(p.desc, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast, sizeof fast, &got);
    cublasLtMatrixLayoutGetAttribute(p.a, CUBLASLT_MATRIX_LAYOUT_TYPE, &ty_a, sizeof ty_a, &got);
    cublasLtMatrixLayoutGetAttribute(p.c, CUBLASLT_MATRIX_LAYOUT_TYPE, &ty_c, sizeof ty_c, &got);
    T_CHECK(ta == CUBLAS_OP_T && tb == CUBLAS_OP_N, "TN: transa %d transb %d", (int)ta, (int)tb);
    T_CHECK(ma == CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F && mb == CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F, "scale modes %d %d", ma, mb);
    T_CHECK(fast == 0, "fast accumulation off");
    T_CHECK(ty_a == CUDA_R_8F_E4M3 && ty_c == CUDA_R_32F, "types %u %u", ty_a, ty_c);
    T_CHECK(lt_layout_attr(p.a, CUBLASLT_MATRIX_LAYOUT_ROWS) == 640 && lt_layout_attr(p.a, CUBLASLT_MATRIX_LAYOUT_COLS) == 904 &&
                lt_layout_attr(p.a, CUBLASLT_MATRIX_LAYOUT_LD) == 640,
            "A: k × n, ld k");
    T_CHECK(lt_layout_attr(p.b, CUBLASLT_MATRIX_LAYOUT_ROWS) == 640 && lt_layout_attr(p.b, CUBLASLT_MATRIX_LAYOUT_COLS) == 1152 &&
                lt_layout_attr(p.b, CUBLASLT_MATRIX_LAYOUT_LD) == 640,
            "B: k × m, ld k");
    T_CHECK(lt_layout_attr(p.c, CUBLASLT_MATRIX_LAYOUT_ROWS) == 904 && lt_layout_attr(p.c, CUBLASLT_MATRIX_LAYOUT_COLS) == 1152 &&
                lt_layout_attr(p.c, CUBLASLT_MATRIX_LAYOUT_LD) == 908,
            "D: n × m, ld ldc");
    moe__lt_plan_free(&p);
}

int main(int argc, char **argv) {
    t_filter = argc > 1 ? argv[1] : NULL;
    T_RUN_FILTERED(device_count);
    T_RUN_FILTERED(set_device_cuda);
    T_RUN_FILTERED(set_device_bad_arguments);
    T_RUN_FILTERED(cuda_table_filled);
    T_RUN_FILTERED(nccl_not_built);
    T_RUN_FILTERED(launch_arithmetic);
    T_RUN_FILTERED(hd_math_same_bits_as_gcc);
    T_RUN_FILTERED(lt_plan_describes_the_product);
    T_RUN_FILTERED(lt_plan_fp8_attributes);
    return t_summary();
}
