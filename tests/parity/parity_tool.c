/* tests/parity/parity_tool.c — the C side of the external parity checks (test_parity.py).
   Raw little-endian files in and out:

     parity_tool decode FORMAT OUT             every code of FORMAT (e4m3|e5m2|bf16|f16) as float32
     parity_tool encode FORMAT IN OUT          float32 values → codes (uint8 or uint16)
     parity_tool forward HF_DIR B T IDS OUT_DIR [LAMBDA]
         IDS: int32 [B, T+1]; inputs ids[:, :T], targets ids[:, 1:]. Writes OUT_DIR/logits.f32
         [B, T, V], OUT_DIR/loss.txt ("main", "mtpK", "total" lines) and OUT_DIR/grads.safetensors
         (d total / d parameter under the Hugging Face names; total = CE, plus the MTP terms
         (λ/D)·Σ_k L_k when LAMBDA > 0). */
#define MOE_IMPLEMENTATION
#include "moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char *what, moe_ctx *ctx) {
    fprintf(stderr, "parity_tool: %s%s%s\n", what, ctx ? ": " : "", ctx ? moe_ctx_error(ctx) : "");
    return 1;
}

static void *read_all(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    void *p;
    long n;
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    p = malloc((size_t)n + 1);
    if (p && fread(p, 1, (size_t)n, f) != (size_t)n) {
        free(p);
        p = NULL;
    }
    fclose(f);
    *len = (size_t)n;
    return p;
}

static int write_all(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    int ok = f && fwrite(p, 1, n, f) == n;
    if (f) ok = (fclose(f) == 0) && ok;
    return ok;
}

static int codes(const char *format) {
    if (strcmp(format, "e4m3") == 0 || strcmp(format, "e5m2") == 0) return 256;
    if (strcmp(format, "bf16") == 0 || strcmp(format, "f16") == 0) return 65536;
    return 0;
}

static int cmd_decode(const char *format, const char *out) {
    int n = codes(format), i;
    float *v;
    if (!n) return fail("unknown format", NULL);
    v = (float *)malloc(sizeof(float) * (size_t)n);
    for (i = 0; i < n; i++) {
        if (format[0] == 'e') v[i] = format[1] == '4' ? moe_e4m3_to_f32((uint8_t)i) : moe_e5m2_to_f32((uint8_t)i);
        else v[i] = format[0] == 'b' ? moe_bf16_to_f32((uint16_t)i) : moe_f16_to_f32((uint16_t)i);
    }
    i = write_all(out, v, sizeof(float) * (size_t)n) ? 0 : fail("cannot write output", NULL);
    free(v);
    return i;
}

static int cmd_encode(const char *format, const char *in, const char *out) {
    size_t len, n, i;
    float *x = (float *)read_all(in, &len);
    int rc;
    if (!x || !codes(format)) return fail("cannot read input or unknown format", NULL);
    n = len / 4;
    if (format[0] == 'e') {
        uint8_t *q = (uint8_t *)malloc(n + 1);
        for (i = 0; i < n; i++) q[i] = format[1] == '4' ? moe_f32_to_e4m3(x[i]) : moe_f32_to_e5m2(x[i]);
        rc = write_all(out, q, n) ? 0 : fail("cannot write output", NULL);
        free(q);
    } else {
        uint16_t *q = (uint16_t *)malloc(2 * n + 2);
        for (i = 0; i < n; i++) q[i] = format[0] == 'b' ? moe_f32_to_bf16(x[i]) : moe_f32_to_f16(x[i]);
        rc = write_all(out, q, 2 * n) ? 0 : fail("cannot write output", NULL);
        free(q);
    }
    free(x);
    return rc;
}

static int cmd_forward(const char *dir, long B, long T, const char *ids_path, const char *out, float lambda) {
    moe_ctx *ctx = NULL;
    moe_model *m = NULL;
    moe_tensor *loss, *logits;
    moe_loss_parts parts;
    moe_loss_opts lo;
    moe_hf_save_opts so;
    size_t len;
    int32_t *ids = (int32_t *)read_all(ids_path, &len), *inputs;
    char path[4096];
    FILE *f;
    long b, k;
    if (!ids || len != sizeof(int32_t) * (size_t)(B * (T + 1))) return fail("IDS must hold B*(T+1) int32 values", NULL);
    if (moe_ctx_new(&ctx) || moe_model_load_hf(ctx, dir, &m)) return fail("loading the HF directory", ctx);
    /* logits without the tape */
    inputs = (int32_t *)malloc(sizeof(int32_t) * (size_t)(B * T));
    for (b = 0; b < B; b++) memcpy(inputs + b * T, ids + b * (T + 1), sizeof(int32_t) * (size_t)T);
    moe_ctx_set_grad_enabled(ctx, 0);
    if (moe_model_logits(ctx, m, inputs, B, T, &logits)) return fail("forward", ctx);
    snprintf(path, sizeof path, "%s/logits.f32", out);
    {
        float *v = (float *)malloc(sizeof(float) * (size_t)logits->numel);
        long i;
        for (i = 0; i < logits->numel; i++) v[i] = (float)moe_tensor_get(logits, i);
        if (!write_all(path, v, sizeof(float) * (size_t)logits->numel)) return fail("cannot write logits", NULL);
        free(v);
    }
    moe_ctx_reset(ctx);
    moe_ctx_set_grad_enabled(ctx, 1);
    /* loss and gradients */
    lo.mtp_lambda = lambda;
    lo.balance_alpha = 0;
    moe_model_zero_grad(m);
    if (moe_model_loss(ctx, m, ids, B, T, &lo, &loss, &parts) || moe_backward(ctx, loss)) return fail("loss/backward", ctx);
    snprintf(path, sizeof path, "%s/loss.txt", out);
    f = fopen(path, "w");
    if (!f) return fail("cannot write loss.txt", NULL);
    fprintf(f, "main %.9g\n", parts.main);
    for (k = 0; k < moe_model_config(m)->num_nextn_predict_layers && lambda > 0; k++) fprintf(f, "mtp%ld %.9g\n", k + 1, parts.mtp[k]);
    fprintf(f, "total %.9g\n", parts.total);
    fclose(f);
    memset(&so, 0, sizeof so);
    so.gradients = 1;
    if (moe_model_save_hf(ctx, m, out, &so)) return fail("writing gradients", ctx);
    snprintf(path, sizeof path, "%s/model.safetensors", out);
    {
        char dst[4096];
        snprintf(dst, sizeof dst, "%s/grads.safetensors", out);
        if (rename(path, dst) != 0) return fail("renaming the gradients file", NULL);
    }
    free(inputs);
    free(ids);
    moe_model_free(ctx, m);
    moe_ctx_free(ctx);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "decode") == 0) return cmd_decode(argv[2], argv[3]);
    if (argc == 5 && strcmp(argv[1], "encode") == 0) return cmd_encode(argv[2], argv[3], argv[4]);
    if ((argc == 7 || argc == 8) && strcmp(argv[1], "forward") == 0)
        return cmd_forward(argv[2], atol(argv[3]), atol(argv[4]), argv[5], argv[6], argc == 8 ? (float)atof(argv[7]) : 0.0f);
    fprintf(stderr, "usage: parity_tool decode FORMAT OUT | encode FORMAT IN OUT | forward HF_DIR B T IDS OUT_DIR [LAMBDA]\n");
    return 2;
}
