/* tests/test_infer.c — section 13: the latent KV cache, sampling and speculative decoding.

   The cache must reproduce the training forward exactly up to float rounding (prefill plus
   step-by-step decode, naive and absorbed attention), speculative greedy decoding must give
   the very tokens plain greedy decoding gives, and the rejection-sampling step must turn any
   draft distribution into the target distribution (a chi-square test at a fixed seed). */
#define MOE_IMPLEMENTATION
#include "moe.h"
#include "test.h"

#include <math.h>
#include <stdlib.h>

static moe_ctx *new_ctx(void) {
    moe_ctx *ctx = NULL;
    if (moe_ctx_new(&ctx) != MOE_OK) return NULL;
    moe_ctx_set_threads(ctx, 2);
    return ctx;
}

/* The tiny config with weights large enough that logits differ visibly between tokens. */
static moe_config test_config(int64_t n_mtp) {
    moe_config c = moe_config_tiny();
    c.initializer_range = 0.1;
    c.num_nextn_predict_layers = n_mtp;
    return c;
}

static void make_tokens(int32_t *t, int64_t n, uint64_t seed, int64_t vocab) {
    moe_rng r = moe_rng_new(seed, 7);
    int64_t i;
    for (i = 0; i < n; i++) t[i] = (int32_t)(moe_rng_next(&r) % (uint64_t)vocab);
}

/* max |a − b| / max |b| over n values */
static double rel_diff(const float *a, const float *b, int64_t n) {
    double md = 0, mb = 0;
    int64_t i;
    for (i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        md = d > md ? d : md;
        mb = fabs((double)b[i]) > mb ? fabs((double)b[i]) : mb;
    }
    return mb > 0 ? md / mb : md;
}

/* Logits of the whole sequence through the session: a prefill of `np` tokens, then one token
   at a time. */
static moe_status gen_logits(moe_ctx *ctx, moe_gen *g, const int32_t *tok, int64_t T, int64_t np, float *out, int64_t V) {
    int64_t t;
    moe_gen_reset(g);
    if (moe_gen_forward(ctx, g, tok, np, np, out) != MOE_OK) return MOE_ERR_STATE;
    for (t = np; t < T; t++)
        if (moe_gen_forward(ctx, g, tok + t, 1, 1, out + t * V) != MOE_OK) return MOE_ERR_STATE;
    return MOE_OK;
}

static void cached_decode_case(const char *label, moe_config c) {
    moe_ctx *ctx = new_ctx();
    moe_model *m = NULL;
    moe_gen *g = NULL;
    moe_tensor *ref;
    int32_t tok[40];
    int64_t T = 40, V = c.vocab_size, np;
    float *ref_f = (float *)malloc(sizeof(float) * (size_t)(T * V)), *got = (float *)malloc(sizeof(float) * (size_t)(T * V));
    T_ASSERT(ctx && ref_f && got, "setup");
    T_ASSERT(moe_model_new(ctx, &c, 11, &m) == MOE_OK, "%s", moe_ctx_error(ctx));
    moe_ctx_set_grad_enabled(ctx, 0);
    make_tokens(tok, T, 3, V);
    T_ASSERT(moe_model_logits(ctx, m, tok, 1, T, &ref) == MOE_OK, "%s", moe_ctx_error(ctx));
    {
        int64_t i;
        for (i = 0; i < T * V; i++) ref_f[i] = (float)moe_tensor_get(ref, i);
    }
    T_ASSERT(moe_gen_new(ctx, m, 0, &g) == MOE_OK, "%s", moe_ctx_error(ctx));
    for (np = 1; np <= 17; np += 8) {
        double r;
        T_ASSERT(gen_logits(ctx, g, tok, T, np, got, V) == MOE_OK, "%s", moe_ctx_error(ctx));
        r = rel_diff(got, ref_f, T * V);
        T_CHECK(r <= 1e-4, "%s: prefill %lld + decode: max abs diff / max |logit| = %.3g", label, (long long)np, r);
        T_NOTE("%s: prefill %2lld + %lld decode steps: max|diff|/max|logit| = %.2e", label, (long long)np, (long long)(T - np), r);
    }
    T_CHECK(moe_gen_len(g) == T, "cache length %lld, want %lld", (long long)moe_gen_len(g), (long long)T);
    moe_gen_free(g);
    moe_model_free(ctx, m);
    moe_ctx_free(ctx);
    free(ref_f);
    free(got);
}

/* Passes of several rows on more threads than a pass has worker contexts (8 threads, 8-row
   passes, repeated so that the side-by-side path is taken after its first timing) give the
   logits of one thread bit for bit. */
static void test_thread_counts_agree(void) {
    static const int threads[4] = {1, 2, 3, 8};
    moe_config c = test_config(1);
    int32_t tok[36];
    int64_t V = c.vocab_size, T = 36, t;
    float *ref = (float *)malloc(sizeof(float) * (size_t)(T * V)), *got = (float *)malloc(sizeof(float) * (size_t)(T * V));
    int i;
    T_ASSERT(ref && got, "setup");
    make_tokens(tok, T, 5, V);
    for (i = 0; i < 4; i++) {
        moe_ctx *ctx = new_ctx();
        moe_model *m = NULL;
        moe_gen *g = NULL;
        T_ASSERT(ctx && moe_ctx_set_threads(ctx, threads[i]) == MOE_OK, "setup");
        T_ASSERT(moe_model_new(ctx, &c, 11, &m) == MOE_OK && moe_gen_new(ctx, m, 0, &g) == MOE_OK, "%s", moe_ctx_error(ctx));
        T_ASSERT(moe_gen_forward(ctx, g, tok, 4, 4, i ? got : ref) == MOE_OK, "%s", moe_ctx_error(ctx));
        for (t = 4; t < T; t += 8)
            T_ASSERT(moe_gen_forward(ctx, g, tok + t, 8, 8, (i ? got : ref) + t * V) == MOE_OK, "%d threads: %s", threads[i],
                     moe_ctx_error(ctx));
        if (i) T_CHECK(memcmp(ref, got, sizeof(float) * (size_t)(T * V)) == 0, "%d threads differ from 1", threads[i]);
        moe_gen_free(g);
        moe_model_free(ctx, m);
        moe_ctx_free(ctx);
    }
    free(ref);
    free(got);
}

static void test_cached_decode_equals_forward(void) {
    moe_config c = test_config(1);
    cached_decode_case("pairs", c);
    /* rope_interleave false (rotate_half) and YaRN with unequal mscale fields: the cache rows
       and queries must use the training forward's layout and cos/sin magnitude */
    c.rope_layout = MOE_ROPE_HALVES;
    c.rope_scaling.factor = 4;
    c.rope_scaling.original_max_pos = 16;
    c.rope_scaling.beta_fast = 32;
    c.rope_scaling.beta_slow = 1;
    c.rope_scaling.mscale = 1;
    c.rope_scaling.mscale_all_dim = 0.5;
    cached_decode_case("halves+yarn", c);
}

static void test_naive_and_absorbed_agree(void) {
    moe_ctx *ctx = new_ctx();
    moe_config c = test_config(0);
    moe_model *m = NULL;
    moe_gen *a = NULL, *b = NULL;
    int32_t tok[32];
    int64_t T = 32, V, np;
    float *la, *lb;
    c.q_lora_rank = 0; /* the V2-Lite-style q_proj path too */
    c.num_attention_heads = 3;
    V = c.vocab_size;
    la = (float *)malloc(sizeof(float) * (size_t)(T * V));
    lb = (float *)malloc(sizeof(float) * (size_t)(T * V));
    T_ASSERT(ctx && la && lb, "setup");
    T_ASSERT(moe_model_new(ctx, &c, 5, &m) == MOE_OK, "%s", moe_ctx_error(ctx));
    T_ASSERT(moe_gen_new(ctx, m, 0, &a) == MOE_OK && moe_gen_new(ctx, m, 0, &b) == MOE_OK, "%s", moe_ctx_error(ctx));
    T_ASSERT(moe_gen_set_attn(ctx, a, MOE_GEN_ATTN_NAIVE) == MOE_OK && moe_gen_set_attn(ctx, b, MOE_GEN_ATTN_ABSORB) == MOE_OK, "%s",
             moe_ctx_error(ctx));
    make_tokens(tok, T, 9, V);
    for (np = 1; np <= 25; np += 12) {
        double r;
        T_ASSERT(gen_logits(ctx, a, tok, T, np, la, V) == MOE_OK, "%s", moe_ctx_error(ctx));
        T_ASSERT(gen_logits(ctx, b, tok, T, np, lb, V) == MOE_OK, "%s", moe_ctx_error(ctx));
        r = rel_diff(lb, la, T * V);
        T_CHECK(r <= 1e-5, "naive vs absorbed, prefill %lld: %.3g", (long long)np, r);
        T_NOTE("naive vs absorbed (prefill %2lld): max|diff|/max|logit| = %.2e", (long long)np, r);
    }
    /* several tokens at once against a non-empty cache (the verification pass) */
    {
        double r;
        moe_gen_reset(a);
        moe_gen_reset(b);
        T_ASSERT(moe_gen_forward(ctx, a, tok, 10, 0, NULL) == MOE_OK && moe_gen_forward(ctx, b, tok, 10, 0, NULL) == MOE_OK, "%s",
                 moe_ctx_error(ctx));
        T_ASSERT(moe_gen_forward(ctx, a, tok + 10, 5, 5, la) == MOE_OK && moe_gen_forward(ctx, b, tok + 10, 5, 5, lb) == MOE_OK, "%s",
                 moe_ctx_error(ctx));
        r = rel_diff(lb, la, 5 * V);
        T_CHECK(r <= 1e-5, "multi-token step: %.3g", r);
    }
    moe_gen_free(a);
    moe_gen_free(b);
    moe_model_free(ctx, m);
    moe_ctx_free(ctx);
    free(la);
    free(lb);
}

/* Train briefly on a periodic text so that the MTP module has something to predict. */
static const char *k_text = "the cat sat on the mat. ";

static moe_status train_periodic(moe_ctx *ctx, moe_model *m, int steps) {
    moe_adamw *opt = NULL;
    moe_adamw_config ac;
    moe_loss_opts lo;
    int32_t batch[4 * 33];
    int64_t len = (int64_t)strlen(k_text), s, b, t;
    moe_rng r = moe_rng_new(1, 1);
    memset(&ac, 0, sizeof ac);
    memset(&lo, 0, sizeof lo);
    lo.mtp_lambda = 0.5f;
    if (moe_adamw_new(ctx, m, &ac, &opt) != MOE_OK) return MOE_ERR_STATE;
    moe_ctx_set_grad_enabled(ctx, 1);
    for (s = 0; s < steps; s++) {
        moe_tensor *loss;
        for (b = 0; b < 4; b++) {
            int64_t off = (int64_t)(moe_rng_next(&r) % (uint64_t)len);
            for (t = 0; t < 33; t++) batch[b * 33 + t] = (unsigned char)k_text[(off + t) % len];
        }
        if (moe_model_loss(ctx, m, batch, 4, 32, &lo, &loss, NULL) != MOE_OK || moe_backward(ctx, loss) != MOE_OK ||
            moe_adamw_step(ctx, opt, 1e-2f, 1.0f, 1.0f, NULL) != MOE_OK) {
            moe_adamw_free(ctx, opt);
            return MOE_ERR_STATE;
        }
        moe_model_update_expert_bias(ctx, m, 1e-3f);
        moe_ctx_reset(ctx);
    }
    moe_adamw_free(ctx, opt);
    moe_ctx_set_grad_enabled(ctx, 0);
    return MOE_OK;
}

static void check_spec_identity(moe_ctx *ctx, moe_model *m, const int32_t *prompt, int64_t np, int64_t n, int64_t n_draft,
                                const char *what) {
    moe_gen *g = NULL;
    moe_gen_opts o;
    moe_gen_stats sp, ss;
    int32_t plain[64], spec[64];
    int64_t np_out = 0, ns_out = 0, i, first_diff = -1, loads_moved = 0;
    T_ASSERT(moe_gen_new(ctx, m, 0, &g) == MOE_OK, "%s", moe_ctx_error(ctx));
    for (i = 0; i < m->n_loads; i++) m->loads[i] = 1000 + i; /* training's counts: generation leaves them */
    memset(&o, 0, sizeof o);
    o.max_tokens = n;
    T_ASSERT(moe_gen_generate(ctx, g, prompt, np, &o, plain, 64, &np_out, &sp) == MOE_OK, "%s", moe_ctx_error(ctx));
    o.speculative = 1;
    o.n_draft = n_draft;
    T_ASSERT(moe_gen_generate(ctx, g, prompt, np, &o, spec, 64, &ns_out, &ss) == MOE_OK, "%s", moe_ctx_error(ctx));
    T_CHECK(np_out == n && ns_out == n, "%s: %lld plain and %lld speculative tokens, want %lld", what, (long long)np_out,
            (long long)ns_out, (long long)n);
    for (i = 0; i < n && i < np_out && i < ns_out; i++)
        if (plain[i] != spec[i]) { first_diff = i; break; }
    T_CHECK(first_diff < 0, "%s: speculative output differs from plain greedy at token %lld", what, (long long)first_diff);
    for (i = 0; i < m->n_loads; i++) loads_moved += m->loads[i] != 1000 + i;
    T_CHECK(loads_moved == 0, "%s: generation changed %lld of the model's expert-load counts", what, (long long)loads_moved);
    moe_model_reset_loads(m);
    T_CHECK(ss.drafted > 0 && ss.main_passes <= sp.main_passes, "%s: drafted %lld, passes %lld vs %lld", what,
            (long long)ss.drafted, (long long)ss.main_passes, (long long)sp.main_passes);
    T_NOTE("%s: %lld tokens identical; acceptance %.2f (%lld/%lld), main passes %lld vs %lld plain", what, (long long)n,
           ss.acceptance, (long long)ss.accepted, (long long)ss.drafted, (long long)ss.main_passes, (long long)sp.main_passes);
    moe_gen_free(g);
}

static void test_speculative_greedy_identical(void) {
    moe_ctx *ctx = new_ctx();
    moe_config c = test_config(1);
    moe_model *m = NULL;
    int32_t prompt[16];
    int64_t np = 10, i;
    int quick = getenv("MOE_TEST_QUICK") != NULL;
    T_ASSERT(ctx, "setup");
    for (i = 0; i < np; i++) prompt[i] = (unsigned char)k_text[i + 3];
    /* random weights: drafts are rejected, every rejection path runs */
    c.initializer_range = 0.02;
    T_ASSERT(moe_model_new(ctx, &c, 21, &m) == MOE_OK, "%s", moe_ctx_error(ctx));
    moe_ctx_set_grad_enabled(ctx, 0);
    check_spec_identity(ctx, m, prompt, np, quick ? 20 : 50, 0, "random weights, 1 MTP module");
    moe_model_free(ctx, m);
    /* two MTP modules trained on a periodic text: chained drafts, mostly accepted */
    c = test_config(2);
    c.initializer_range = 0.02;
    T_ASSERT(moe_model_new(ctx, &c, 4, &m) == MOE_OK, "%s", moe_ctx_error(ctx));
    check_spec_identity(ctx, m, prompt, np, quick ? 20 : 40, 0, "random weights, 2 MTP modules");
    T_ASSERT(train_periodic(ctx, m, quick ? 8 : 25) == MOE_OK, "training: %s", moe_ctx_error(ctx));
    check_spec_identity(ctx, m, prompt, np, quick ? 20 : 50, 1, "trained, 1 of 2 MTP modules");
    check_spec_identity(ctx, m, prompt, np, quick ? 20 : 50, 2, "trained, 2 chained MTP modules");
    moe_model_free(ctx, m);
    moe_ctx_free(ctx);
}

/* p: a fixed toy target; q: a draft that is far from it (zero where p is not, and mass where
   p has none). Tokens from verify(draft ~ q) must follow p: Pearson chi-square over 8 bins,
   7 degrees of freedom, critical value 24.32 at α = 0.001. */
static void test_rejection_sampling_chi_square(void) {
    static const float p[8] = {0.30f, 0.20f, 0.15f, 0.10f, 0.10f, 0.08f, 0.07f, 0.00f};
    static const float q[8] = {0.05f, 0.40f, 0.00f, 0.10f, 0.25f, 0.05f, 0.05f, 0.10f};
    moe_ctx *ctx = new_ctx();
    moe_rng rng = moe_rng_new(2024, 1);
    long counts[8] = {0};
    long n = getenv("MOE_TEST_QUICK") ? 50000 : 200000, i, acc = 0;
    double chi2 = 0, want_acc = 0;
    int k;
    T_ASSERT(ctx, "setup");
    for (i = 0; i < n; i++) {
        int32_t d, tok;
        int accepted;
        T_ASSERT(moe_gen_sample_probs(ctx, q, 8, &rng, &d) == MOE_OK, "%s", moe_ctx_error(ctx));
        T_ASSERT(moe_gen_verify_draft(ctx, p, q, 8, d, &rng, &tok, &accepted) == MOE_OK, "%s", moe_ctx_error(ctx));
        counts[tok]++;
        acc += accepted;
    }
    for (k = 0; k < 8; k++) {
        double e = (double)n * p[k];
        want_acc += p[k] < q[k] ? p[k] : q[k];
        if (e > 0) chi2 += ((double)counts[k] - e) * ((double)counts[k] - e) / e;
        else T_CHECK(counts[k] == 0, "token %d has p = 0 but was drawn %ld times", k, counts[k]);
    }
    T_CHECK(chi2 < 24.32, "chi-square %.2f over 7 dof exceeds 24.32 (alpha 0.001)", chi2);
    T_CHECK(fabs((double)acc / (double)n - want_acc) < 0.01, "acceptance %.4f, want sum min(p,q) = %.4f", (double)acc / (double)n,
            want_acc);
    T_NOTE("%ld draws: chi-square %.2f (7 dof, critical 24.32); acceptance %.4f vs sum min(p,q) %.4f", n, chi2,
           (double)acc / (double)n, want_acc);
    /* the draws themselves: sampling q reproduces q */
    {
        long cq[8] = {0};
        double c2 = 0;
        for (i = 0; i < n; i++) {
            int32_t d;
            moe_gen_sample_probs(ctx, q, 8, &rng, &d);
            cq[d]++;
        }
        for (k = 0; k < 8; k++)
            if (q[k] > 0) c2 += ((double)cq[k] - (double)n * q[k]) * ((double)cq[k] - (double)n * q[k]) / ((double)n * q[k]);
        T_CHECK(c2 < 22.46 && cq[2] == 0, "sampling q: chi-square %.2f over 6 dof exceeds 22.46", c2);
    }
    moe_ctx_free(ctx);
}

static void test_sampling_options(void) {
    static const float logits[6] = {2.0f, 1.0f, 3.0f, 0.5f, 3.0f, -1.0f};
    moe_ctx *ctx = new_ctx();
    moe_sampling s;
    float p[6];
    double sum;
    int i, nz;
    T_ASSERT(ctx, "setup");
    memset(&s, 0, sizeof s);
    T_ASSERT(moe_gen_probs(ctx, logits, 6, &s, p) == MOE_OK, "%s", moe_ctx_error(ctx));
    T_CHECK(p[2] == 1 && p[4] == 0, "greedy: one-hot on the first maximum");
    s.temperature = 1;
    T_ASSERT(moe_gen_probs(ctx, logits, 6, &s, p) == MOE_OK, "%s", moe_ctx_error(ctx));
    {
        double z = 0;
        for (i = 0; i < 6; i++) z += exp(logits[i]);
        for (i = 0; i < 6; i++) T_CHECK(fabs(p[i] - exp(logits[i]) / z) < 1e-6, "softmax[%d] = %g", i, (double)p[i]);
    }
    s.top_k = 3;
    T_ASSERT(moe_gen_probs(ctx, logits, 6, &s, p) == MOE_OK, "%s", moe_ctx_error(ctx));
    for (i = 0, nz = 0, sum = 0; i < 6; i++) { nz += p[i] > 0; sum += p[i]; }
    T_CHECK(nz == 3 && p[0] > 0 && p[2] > 0 && p[4] > 0 && fabs(sum - 1) < 1e-6, "top-k 3 keeps tokens 0, 2, 4 (kept %d)", nz);
    s.top_k = 0;
    s.top_p = 0.5f; /* the two 3.0 logits hold 2·e³/Σ ≈ 0.71 ≥ 0.5, each alone 0.36 < 0.5 */
    T_ASSERT(moe_gen_probs(ctx, logits, 6, &s, p) == MOE_OK, "%s", moe_ctx_error(ctx));
    for (i = 0, nz = 0; i < 6; i++) nz += p[i] > 0;
    T_CHECK(nz == 2 && fabs(p[2] - 0.5) < 1e-6 && fabs(p[4] - 0.5) < 1e-6, "top-p 0.5 keeps the two best (kept %d)", nz);
    s.temperature = 0.01f;
    s.top_p = 0;
    T_ASSERT(moe_gen_probs(ctx, logits, 6, &s, p) == MOE_OK, "%s", moe_ctx_error(ctx));
    T_CHECK(fabs(p[2] - 0.5) < 1e-4 && p[0] < 1e-6, "a low temperature approaches greedy");
    s.temperature = -1;
    T_CHECK(moe_gen_probs(ctx, logits, 6, &s, p) == MOE_ERR_ARG, "a negative temperature is refused");
    moe_ctx_free(ctx);
}

static int g_count;
static int stop_after_three(void *user, int32_t tok) {
    (void)user;
    (void)tok;
    return ++g_count >= 3;
}

static void test_generate_stops_and_seeds(void) {
    moe_ctx *ctx = new_ctx();
    moe_config c = test_config(1);
    moe_model *m = NULL;
    moe_gen *g = NULL;
    moe_gen_opts o;
    moe_gen_stats st;
    int32_t prompt[4] = {10, 20, 30, 40}, out1[64], out2[64];
    int64_t n1 = 0, n2 = 0, i;
    int same = 1;
    T_ASSERT(ctx, "setup");
    T_ASSERT(moe_model_new(ctx, &c, 8, &m) == MOE_OK && moe_gen_new(ctx, m, 0, &g) == MOE_OK, "%s", moe_ctx_error(ctx));
    memset(&o, 0, sizeof o);
    o.sampling.temperature = 1.0f;
    o.sampling.top_k = 40;
    o.sampling.top_p = 0.95f;
    o.seed = 77;
    o.max_tokens = 30;
    T_ASSERT(moe_gen_generate(ctx, g, prompt, 4, &o, out1, 64, &n1, &st) == MOE_OK, "%s", moe_ctx_error(ctx));
    T_ASSERT(moe_gen_generate(ctx, g, prompt, 4, &o, out2, 64, &n2, NULL) == MOE_OK, "%s", moe_ctx_error(ctx));
    for (i = 0; i < n1; i++) same &= out1[i] == out2[i];
    T_CHECK(n1 == 30 && n2 == 30 && same, "same seed, same tokens");
    T_CHECK(st.stop == MOE_GEN_STOP_MAX_TOKENS && st.new_tokens == 30 && st.prompt_tokens == 4, "stats");
    T_CHECK(moe_gen_len(g) == 4 + 30 - 1, "the cache holds the prompt and all but the last token (%lld)", (long long)moe_gen_len(g));
    o.seed = 78;
    T_ASSERT(moe_gen_generate(ctx, g, prompt, 4, &o, out2, 64, &n2, NULL) == MOE_OK, "%s", moe_ctx_error(ctx));
    for (i = 0, same = 1; i < n1; i++) same &= out1[i] == out2[i];
    T_CHECK(!same, "another seed, other tokens");
    /* speculative sampling runs and obeys the same stop rules */
    o.speculative = 1;
    T_ASSERT(moe_gen_generate(ctx, g, prompt, 4, &o, out2, 64, &n2, &st) == MOE_OK, "%s", moe_ctx_error(ctx));
    T_CHECK(n2 == 30 && st.drafted > 0, "speculative sampling: %lld tokens, %lld drafted", (long long)n2, (long long)st.drafted);
    for (i = 0; i < n2; i++) T_CHECK(out2[i] >= 0 && out2[i] < c.vocab_size, "token %lld out of range", (long long)i);
    /* callback stop */
    g_count = 0;
    o.on_token = stop_after_three;
    T_ASSERT(moe_gen_generate(ctx, g, prompt, 4, &o, out2, 64, &n2, &st) == MOE_OK, "%s", moe_ctx_error(ctx));
    T_CHECK(n2 == 3 && st.stop == MOE_GEN_STOP_CALLBACK, "the callback stops after 3 (got %lld)", (long long)n2);
    o.on_token = NULL;
    /* stop string: the bytes of the greedy output's tokens 5..6 */
    o.speculative = 0;
    o.sampling.temperature = 0;
    T_ASSERT(moe_gen_generate(ctx, g, prompt, 4, &o, out1, 64, &n1, NULL) == MOE_OK, "%s", moe_ctx_error(ctx));
    {
        char stop[3];
        int64_t first = -1;
        stop[0] = (char)out1[5];
        stop[1] = (char)out1[6];
        stop[2] = 0;
        for (i = 1; i < n1 && first < 0; i++)
            if (out1[i - 1] == out1[5] && out1[i] == out1[6] && out1[5] != 0 && out1[6] != 0) first = i + 1;
        o.stop = stop;
        T_ASSERT(moe_gen_generate(ctx, g, prompt, 4, &o, out2, 64, &n2, &st) == MOE_OK, "%s", moe_ctx_error(ctx));
        if (first > 0) T_CHECK(n2 == first && st.stop == MOE_GEN_STOP_STRING, "stop string: %lld tokens, want %lld", (long long)n2, (long long)first);
        o.stop = NULL;
    }
    /* until the cache is full */
    o.max_tokens = 0;
    T_ASSERT(moe_gen_generate(ctx, g, prompt, 4, &o, out2, 64, &n2, &st) == MOE_OK, "%s", moe_ctx_error(ctx));
    T_CHECK(n2 == 64 - 4 + 1 && st.stop == MOE_GEN_STOP_CACHE_FULL && moe_gen_len(g) == 64, "cache full after %lld tokens", (long long)n2);
    moe_gen_free(g);
    moe_model_free(ctx, m);
    moe_ctx_free(ctx);
}

static void test_cache_overflow_is_an_error(void) {
    moe_ctx *ctx = new_ctx();
    moe_config c = test_config(1);
    moe_model *m = NULL;
    moe_gen *g = NULL;
    moe_gen_opts o;
    int32_t tok[70];
    float lg[256];
    int64_t n = 0;
    moe_status st;
    T_ASSERT(ctx, "setup");
    make_tokens(tok, 70, 1, c.vocab_size);
    T_ASSERT(moe_model_new(ctx, &c, 2, &m) == MOE_OK, "%s", moe_ctx_error(ctx));
    T_CHECK(moe_gen_new(ctx, m, 65, &g) == MOE_ERR_ARG && g == NULL, "a cache longer than max_position_embeddings is refused");
    T_ASSERT(moe_gen_new(ctx, m, 0, &g) == MOE_OK, "%s", moe_ctx_error(ctx));
    T_CHECK(moe_gen_capacity(g) == 64, "capacity %lld", (long long)moe_gen_capacity(g));
    T_ASSERT(moe_gen_forward(ctx, g, tok, 60, 1, lg) == MOE_OK, "%s", moe_ctx_error(ctx));
    st = moe_gen_forward(ctx, g, tok + 60, 5, 1, lg);
    T_CHECK(st == MOE_ERR_SHAPE && strstr(moe_ctx_error(ctx), "max_position_embeddings") != NULL, "overflow: %s (%s)",
            moe_status_name(st), moe_ctx_error(ctx));
    T_NOTE("%s", moe_ctx_error(ctx));
    T_CHECK(moe_gen_len(g) == 60, "a refused step changes nothing (len %lld)", (long long)moe_gen_len(g));
    T_CHECK(moe_gen_forward(ctx, g, tok + 60, 4, 1, lg) == MOE_OK, "the last 4 positions still fit: %s", moe_ctx_error(ctx));
    T_CHECK(moe_gen_forward(ctx, g, tok, 1, 1, lg) == MOE_ERR_SHAPE, "a full cache refuses one more token");
    memset(&o, 0, sizeof o);
    o.max_tokens = 10;
    st = moe_gen_generate(ctx, g, tok, 60, &o, tok + 60, 10, &n, NULL);
    T_CHECK(st == MOE_ERR_SHAPE && n == 0, "generate: prompt 60 + 10 tokens cannot fit 64 (%s)", moe_ctx_error(ctx));
    moe_gen_free(g);
    /* bad input */
    T_CHECK(moe_gen_new(ctx, NULL, 0, &g) == MOE_ERR_ARG && g == NULL, "NULL model");
    T_CHECK(moe_gen_forward(ctx, NULL, tok, 1, 0, NULL) == MOE_ERR_ARG, "NULL gen");
    T_ASSERT(moe_gen_new(ctx, m, 16, &g) == MOE_OK, "%s", moe_ctx_error(ctx));
    tok[0] = 256;
    T_CHECK(moe_gen_forward(ctx, g, tok, 1, 1, lg) == MOE_ERR_ARG, "token outside the vocabulary");
    tok[0] = 1;
    T_CHECK(moe_gen_forward(ctx, g, tok, 2, 3, lg) == MOE_ERR_ARG, "more logit rows than tokens");
    T_CHECK(moe_gen_forward(ctx, g, tok, 2, 1, NULL) == MOE_ERR_ARG, "logit rows without a buffer");
    T_CHECK(moe_gen_truncate(ctx, g, 1) == MOE_ERR_ARG, "truncate past the length");
    T_CHECK(moe_gen_set_attn(ctx, g, (moe_gen_attn)7) == MOE_ERR_ARG, "unknown attention mode");
    o.speculative = 1;
    o.n_draft = 3;
    T_CHECK(moe_gen_generate(ctx, g, tok, 2, &o, tok + 10, 10, &n, NULL) == MOE_ERR_ARG, "more drafts than MTP modules");
    moe_gen_free(g);
    moe_model_free(ctx, m);
    moe_ctx_free(ctx);
}

static void test_cache_bytes(void) {
    moe_ctx *ctx = new_ctx();
    moe_config c = moe_config_tiny();
    moe_model *m = NULL;
    int64_t lat = 0, mha = 0;
    T_ASSERT(ctx && moe_model_new(ctx, &c, 1, &m) == MOE_OK, "setup");
    moe_gen_cache_bytes(m, &lat, &mha);
    /* 4 layers · (32 + 8) values vs 4 layers · 4 heads · (24 + 16) values (4 bytes each in FP32) */
    T_CHECK(lat == 4 * 40 * (int64_t)sizeof(moe_real) && mha == 4 * 4 * 40 * (int64_t)sizeof(moe_real), "cache bytes per token %lld (latent) and %lld (MHA)", (long long)lat,
            (long long)mha);
    T_NOTE("tiny: %lld bytes/token latent vs %lld for a multi-head cache", (long long)lat, (long long)mha);
    moe_model_free(ctx, m);
    moe_ctx_free(ctx);
}

int main(int argc, char **argv) {
    t_filter = argc > 1 ? argv[1] : NULL;
    T_RUN_FILTERED(test_cache_bytes);
    T_RUN_FILTERED(test_cached_decode_equals_forward);
    T_RUN_FILTERED(test_naive_and_absorbed_agree);
    T_RUN_FILTERED(test_thread_counts_agree);
    T_RUN_FILTERED(test_sampling_options);
    T_RUN_FILTERED(test_rejection_sampling_chi_square);
    T_RUN_FILTERED(test_speculative_greedy_identical);
    T_RUN_FILTERED(test_generate_stops_and_seeds);
    T_RUN_FILTERED(test_cache_overflow_is_an_error);
    return t_summary();
}
