/* tests/gpu/conversions.cu — moe.h's MOE_HD conversions against NVIDIA's (gpu.md §7.3 stage 2).

   Checks, counting mismatches per conversion with integer atomics (order-independent):
   - device, every one of the 2^32 float bit patterns: moe_f32_to_bf16 / moe_f32_to_f16 /
     moe_f32_to_e4m3 / moe_f32_to_e5m2 compiled for the GPU against __float2bfloat16_rn,
     __float2half_rn and __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3 / __NV_E5M2)
     (on sm_89+ the last is the hardware cvt.rn.satfinite instruction);
   - device, every code: moe_bf16_to_f32 / moe_f16_to_f32 / moe_e4m3_to_f32 / moe_e5m2_to_f32
     against __bfloat162float, __half2float and __nv_cvt_fp8_to_halfraw then __half2float;
   - host (no GPU needed), every 97th pattern by default: the same moe.h functions built by
     nvcc's host compiler against the host implementations of the same intrinsics (software
     emulations in cuda_bf16.hpp / cuda_fp16.hpp / cuda_fp8.hpp, not the GPU's instructions).
   Results must be equal bit for bit, with one exception: a NaN input (float pattern or code)
   must give a NaN on both sides, whatever its payload (moe.h gives canonical NaNs). A
   non-NaN input must give the same bits, signed zeros included. Prints, per conversion, the
   number of mismatches, the smallest mismatching input and a few examples; exits 1 on any
   mismatch (or when no GPU is found and --host-only was not given), 0 otherwise.

   Build (on the GPU machine, from the repository root; no MOE_CUDA needed: the conversions
   are in moe.h's header part):
     nvcc -std=c++17 -gencode arch=compute_90a,code=sm_90a --fmad=false -O3 \
          --Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror --Wdefault-stream-launch \
          --Wmissing-launch-bounds -Xptxas -warn-spills,-warn-lmem-usage,-Werror \
          -I. tests/gpu/conversions.cu -o build/gpu_conversions
   Run: build/gpu_conversions [--host-only] [--host-stride N]   (N = 1: all 2^32 on the host,
   a few minutes of one core). Expected time on an H100: well under 10 s (most of it is
   starting CUDA). */
#include "moe.h"
#include "tests/test.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CV_THREADS 256
#define CV_BLOCKS 65536
#define CV_REC 8 /* examples kept per conversion */

enum { CV_BF16, CV_F16, CV_E4M3, CV_E5M2, DC_BF16, DC_F16, DC_E4M3, DC_E5M2, CV_N };
static const char *const cv_names[CV_N] = {
    "f32->bf16 vs __float2bfloat16_rn", "f32->f16  vs __float2half_rn", "f32->e4m3 vs __nv_cvt_float_to_fp8(SATFINITE, E4M3)",
    "f32->e5m2 vs __nv_cvt_float_to_fp8(SATFINITE, E5M2)", "bf16->f32 vs __bfloat162float", "f16->f32  vs __half2float",
    "e4m3->f32 vs __nv_cvt_fp8_to_halfraw(E4M3) + __half2float", "e5m2->f32 vs __nv_cvt_fp8_to_halfraw(E5M2) + __half2float"};

/* Mismatches of one pass: counts, the smallest mismatching input, some examples. */
typedef struct cv_result {
    unsigned long long count[CV_N];
    unsigned int first[CV_N];
    unsigned int n_rec[CV_N];
    unsigned int rec_in[CV_N][CV_REC], rec_moe[CV_N][CV_REC], rec_nv[CV_N][CV_REC];
} cv_result;

static __host__ __device__ int cv_is_nan(int k, uint32_t v) {
    switch (k) {
    case CV_BF16: return (v & 0x7F80u) == 0x7F80u && (v & 0x7Fu) != 0;
    case CV_F16: return (v & 0x7C00u) == 0x7C00u && (v & 0x3FFu) != 0;
    case CV_E4M3: return (v & 0x7Fu) == 0x7Fu;
    case CV_E5M2: return (v & 0x7Cu) == 0x7Cu && (v & 0x3u) != 0;
    default: return (v & 0x7FFFFFFFu) > 0x7F800000u; /* decoders: a float */
    }
}
/* The input of check k is a NaN: a float pattern for the encoders, a code for the decoders. */
static __host__ __device__ int cv_input_nan(int k, uint32_t in) {
    switch (k) {
    case DC_BF16: return cv_is_nan(CV_BF16, in);
    case DC_F16: return cv_is_nan(CV_F16, in);
    case DC_E4M3: return cv_is_nan(CV_E4M3, in);
    case DC_E5M2: return cv_is_nan(CV_E5M2, in);
    default: return (in & 0x7FFFFFFFu) > 0x7F800000u;
    }
}
static __host__ __device__ int cv_same(int k, uint32_t in, uint32_t moe, uint32_t nv) {
    if (moe == nv) return 1;
    return cv_input_nan(k, in) && cv_is_nan(k, moe) && cv_is_nan(k, nv);
}
static __host__ __device__ uint32_t cv_fbits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}
static __host__ __device__ float cv_bitsf(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* moe.h's result and NVIDIA's for check k at input `in` (host and device alike). */
static __host__ __device__ void cv_pair(int k, uint32_t in, uint32_t *moe, uint32_t *nv) {
    const float x = cv_bitsf(in);
    switch (k) {
    case CV_BF16: *moe = moe_f32_to_bf16(x); *nv = __bfloat16_as_ushort(__float2bfloat16_rn(x)); break;
    case CV_F16: *moe = moe_f32_to_f16(x); *nv = __half_as_ushort(__float2half_rn(x)); break;
    case CV_E4M3: *moe = moe_f32_to_e4m3(x); *nv = (uint32_t)__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3); break;
    case CV_E5M2: *moe = moe_f32_to_e5m2(x); *nv = (uint32_t)__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E5M2); break;
    case DC_BF16:
        *moe = cv_fbits(moe_bf16_to_f32((uint16_t)in));
        *nv = cv_fbits(__bfloat162float(__ushort_as_bfloat16((unsigned short)in)));
        break;
    case DC_F16:
        *moe = cv_fbits(moe_f16_to_f32((uint16_t)in));
        *nv = cv_fbits(__half2float(__ushort_as_half((unsigned short)in)));
        break;
    case DC_E4M3:
        *moe = cv_fbits(moe_e4m3_to_f32((uint8_t)in));
        *nv = cv_fbits(__half2float(__half(__nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)in, __NV_E4M3))));
        break;
    default:
        *moe = cv_fbits(moe_e5m2_to_f32((uint8_t)in));
        *nv = cv_fbits(__half2float(__half(__nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)in, __NV_E5M2))));
        break;
    }
}

static __device__ void cv_record_dev(cv_result *r, int k, uint32_t in, uint32_t moe, uint32_t nv) {
    unsigned int slot;
    atomicAdd(&r->count[k], 1ull);
    atomicMin(&r->first[k], in);
    slot = atomicAdd(&r->n_rec[k], 1u);
    if (slot < CV_REC) {
        r->rec_in[k][slot] = in;
        r->rec_moe[k][slot] = moe;
        r->rec_nv[k][slot] = nv;
    }
}

/* The four encoders at float patterns base .. base + n − 1 (a grid-stride loop, one pattern
   per thread per step). */
static __global__ void __launch_bounds__(CV_THREADS) cv_encoders(uint64_t base, uint64_t n, cv_result *r) {
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        const uint32_t in = (uint32_t)(base + i);
        for (int k = CV_BF16; k <= CV_E5M2; k++) {
            uint32_t moe, nv;
            cv_pair(k, in, &moe, &nv);
            if (!cv_same(k, in, moe, nv)) cv_record_dev(r, k, in, moe, nv);
        }
    }
}
/* The four decoders at every code (0 .. 65535; the fp8 ones at 0 .. 255). */
static __global__ void __launch_bounds__(CV_THREADS) cv_decoders(cv_result *r) {
    for (uint32_t in = blockIdx.x * blockDim.x + threadIdx.x; in < 65536u; in += gridDim.x * blockDim.x)
        for (int k = DC_BF16; k <= DC_E5M2; k++) {
            uint32_t moe, nv;
            if (k >= DC_E4M3 && in > 255u) continue;
            cv_pair(k, in, &moe, &nv);
            if (!cv_same(k, in, moe, nv)) cv_record_dev(r, k, in, moe, nv);
        }
}

/* ---- reporting ---- */

static void cv_init(cv_result *r) {
    memset(r, 0, sizeof *r);
    for (int k = 0; k < CV_N; k++) r->first[k] = 0xFFFFFFFFu;
}
static void cv_report(const char *pass, const cv_result *r, int k0, int k1, const char *sample) {
    for (int k = k0; k <= k1; k++) {
        unsigned int n_rec = r->n_rec[k] < CV_REC ? r->n_rec[k] : CV_REC, j;
        T_NOTE("%-58s %llu mismatches (%s, %s)", cv_names[k], r->count[k], pass, sample);
        T_CHECK(r->count[k] == 0, "%s %s: %llu mismatches, the smallest at input 0x%08x", pass, cv_names[k], r->count[k], r->first[k]);
        for (j = 0; j < n_rec; j++)
            T_CHECK(0, "   e.g. input 0x%08x%s: moe.h 0x%x, CUDA 0x%x", r->rec_in[k][j],
                    k <= CV_E5M2 ? "" : " (a code)", r->rec_moe[k][j], r->rec_nv[k][j]);
    }
}

#define CV_CUDA(call)                                                                                    \
    do {                                                                                                 \
        cudaError_t cv_e = (call);                                                                       \
        if (cv_e != cudaSuccess) {                                                                       \
            T_CHECK(0, "%s failed at %s:%d: %s", #call, __FILE__, __LINE__, cudaGetErrorString(cv_e));   \
            return;                                                                                      \
        }                                                                                                \
    } while (0)

static uint32_t g_host_stride = 97;
static int g_have_gpu;

/* ---- cases ---- */

static void host_conversions_vs_host_intrinsics(void) {
    cv_result r;
    char sample[96];
    clock_t t0 = clock();
    cv_init(&r);
    for (uint64_t p = 0; p <= 0xFFFFFFFFull; p += g_host_stride)
        for (int k = CV_BF16; k <= CV_E5M2; k++) {
            uint32_t moe, nv, in = (uint32_t)p;
            cv_pair(k, in, &moe, &nv);
            if (cv_same(k, in, moe, nv)) continue;
            if (r.count[k] == 0) r.first[k] = in; /* ascending: the first is the smallest */
            if (r.n_rec[k] < CV_REC) {
                r.rec_in[k][r.n_rec[k]] = in;
                r.rec_moe[k][r.n_rec[k]] = moe;
                r.rec_nv[k][r.n_rec[k]] = nv;
                r.n_rec[k]++;
            }
            r.count[k]++;
        }
    for (uint32_t in = 0; in < 65536u; in++)
        for (int k = DC_BF16; k <= DC_E5M2; k++) {
            uint32_t moe, nv;
            if (k >= DC_E4M3 && in > 255u) continue;
            cv_pair(k, in, &moe, &nv);
            if (cv_same(k, in, moe, nv)) continue;
            if (r.count[k] == 0) r.first[k] = in;
            if (r.n_rec[k] < CV_REC) {
                r.rec_in[k][r.n_rec[k]] = in;
                r.rec_moe[k][r.n_rec[k]] = moe;
                r.rec_nv[k][r.n_rec[k]] = nv;
                r.n_rec[k]++;
            }
            r.count[k]++;
        }
    snprintf(sample, sizeof sample, "one float pattern in %u", (unsigned)g_host_stride);
    cv_report("host", &r, CV_BF16, CV_E5M2, sample);
    cv_report("host", &r, DC_BF16, DC_E5M2, "every code");
    T_NOTE("%.1f s on one core", (double)(clock() - t0) / CLOCKS_PER_SEC);
}

static void device_conversions_vs_intrinsics(void) {
    cudaStream_t stream;
    cudaEvent_t e0, e1;
    cv_result host, *dev = NULL;
    cudaDeviceProp prop;
    float ms = 0;
    const uint64_t chunk = (uint64_t)1 << 30; /* four launches of 2^30 patterns */
    T_ASSERT(g_have_gpu, "no CUDA device here (run with --host-only on a machine without a GPU)");
    CV_CUDA(cudaGetDeviceProperties(&prop, 0));
    T_NOTE("device 0: %s (sm_%d%d)", prop.name, prop.major, prop.minor);
    CV_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    CV_CUDA(cudaEventCreate(&e0));
    CV_CUDA(cudaEventCreate(&e1));
    CV_CUDA(cudaMalloc((void **)&dev, sizeof *dev));
    cv_init(&host);
    CV_CUDA(cudaMemcpyAsync(dev, &host, sizeof host, cudaMemcpyHostToDevice, stream));
    CV_CUDA(cudaEventRecord(e0, stream));
    for (uint64_t base = 0; base < ((uint64_t)1 << 32); base += chunk) {
        cv_encoders<<<CV_BLOCKS, CV_THREADS, 0, stream>>>(base, chunk, dev);
        CV_CUDA(cudaGetLastError());
    }
    cv_decoders<<<65536 / CV_THREADS, CV_THREADS, 0, stream>>>(dev);
    CV_CUDA(cudaGetLastError());
    CV_CUDA(cudaEventRecord(e1, stream));
    CV_CUDA(cudaMemcpyAsync(&host, dev, sizeof host, cudaMemcpyDeviceToHost, stream));
    CV_CUDA(cudaStreamSynchronize(stream));
    CV_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    cv_report("device", &host, CV_BF16, CV_E5M2, "all 2^32 float patterns");
    cv_report("device", &host, DC_BF16, DC_E5M2, "every code");
    T_NOTE("%.1f ms on the GPU", (double)ms);
    cudaFree(dev);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cudaStreamDestroy(stream);
}

int main(int argc, char **argv) {
    int host_only = 0, n = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--host-only") == 0) host_only = 1;
        else if (strcmp(argv[i], "--host-stride") == 0 && i + 1 < argc && atol(argv[i + 1]) >= 1) g_host_stride = (uint32_t)atol(argv[++i]);
        else {
            fprintf(stderr, "usage: %s [--host-only] [--host-stride N]\n", argv[0]);
            return 2;
        }
    }
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();
        n = 0;
    }
    g_have_gpu = n > 0;
    printf("%d CUDA device(s)%s\n", n, host_only ? "; --host-only: the device pass does not run" : "");
    T_RUN(host_conversions_vs_host_intrinsics);
    if (!host_only) T_RUN(device_conversions_vs_intrinsics);
    return t_summary();
}
