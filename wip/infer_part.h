/* ============================================================================================
   10. infer — latent KV cache (MLA absorb), sampling, generation, MTP speculative decoding
   ============================================================================================
   A moe_gen session holds, per layer and cached token, only what MLA needs (reference §2.4):
   the normalised latent c_KV (kv_lora_rank values) and the RoPE'd shared key k_pe
   (qk_rope_head_dim values). Decoding folds W_UK into the query and W_UV into the output, so
   keys and values are never expanded. The MTP modules get caches of their own and draft
   tokens that the main model verifies in one pass (reference §4.3). A session works in a
   private step arena, so it never resets the caller's context; errors are reported on the
   caller's context. It reads the model's weights at every call: changing them invalidates
   what is cached (call moe_gen_reset). */

typedef struct moe_gen moe_gen;

/* How attention reads the cache: AUTO takes NAIVE for a prompt into an empty cache (k and v
   are expanded once, cheaper when queries ≈ keys) and ABSORB otherwise (decode). */
typedef enum moe_gen_attn { MOE_GEN_ATTN_AUTO = 0, MOE_GEN_ATTN_ABSORB = 1, MOE_GEN_ATTN_NAIVE = 2 } moe_gen_attn;

/* A session for `model` with room for `max_len` tokens (0: max_position_embeddings, which is
   also the upper limit since RoPE is tabulated that far). The model must outlive it. */
MOE_API moe_status moe_gen_new(moe_ctx *ctx, moe_model *model, int64_t max_len, moe_gen **out);
MOE_API void moe_gen_free(moe_gen *gen);
/* Forget every cached token (main and MTP caches). */
MOE_API void moe_gen_reset(moe_gen *gen);
/* Tokens in the main cache, and how many fit. */
MOE_API int64_t moe_gen_len(const moe_gen *gen);
MOE_API int64_t moe_gen_capacity(const moe_gen *gen);
MOE_API moe_status moe_gen_set_attn(moe_ctx *ctx, moe_gen *gen, moe_gen_attn attn);
/* Append tokens[0..n) at positions len..len+n-1 and write the logits of the last
   `logit_rows` of them (0..n) to logits [logit_rows, vocab]. Past the capacity: an error,
   nothing changes. */
MOE_API moe_status moe_gen_forward(moe_ctx *ctx, moe_gen *gen, const int32_t *tokens, int64_t n, int64_t logit_rows,
                                   float *logits);
/* Roll the main cache back to its first `len` tokens (e.g. after rejected drafts). */
MOE_API moe_status moe_gen_truncate(moe_ctx *ctx, moe_gen *gen, int64_t len);
/* Cache bytes per token over the main layers: this latent cache, and a standard multi-head
   cache of k [H, nope+rope] and v [H, v_head_dim] for the same heads (both in moe_real). */
MOE_API void moe_gen_cache_bytes(const moe_model *model, int64_t *latent, int64_t *mha);

/* Sampling: temperature 0 is greedy (argmax, ties to the lower id); otherwise softmax of
   logits/temperature, restricted to the top_k most likely (0 = all), then to the smallest
   most-likely set whose mass reaches top_p (0 or ≥ 1 = all), renormalised. */
typedef struct moe_sampling {
    float temperature;
    int64_t top_k;
    float top_p;
} moe_sampling;
/* The distribution the options above make from logits [vocab] (greedy: one-hot). */
MOE_API moe_status moe_gen_probs(moe_ctx *ctx, const float *logits, int64_t vocab, const moe_sampling *s, float *probs);
/* Draw a token from probs [vocab] (need not be normalised) with one draw of rng. */
MOE_API moe_status moe_gen_sample_probs(moe_ctx *ctx, const float *probs, int64_t vocab, moe_rng *rng, int32_t *token);
/* Speculative-sampling check of a drafted token `draft` ~ q against the target p (both
   [vocab]): keep it with probability min(1, p/q), else draw from norm(max(p − q, 0)).
   *token is the draft or its replacement; whatever q is, *token is distributed as p. */
MOE_API moe_status moe_gen_verify_draft(moe_ctx *ctx, const float *p, const float *q, int64_t vocab, int32_t draft,
                                        moe_rng *rng, int32_t *token, int *accepted);

/* Called with each new token as it is produced; return non-zero to stop. */
typedef int (*moe_gen_token_fn)(void *user, int32_t token);

typedef struct moe_gen_opts {
    moe_sampling sampling;
    uint64_t seed;              /* of the sampling RNG */
    int64_t max_tokens;         /* new tokens at most (0: until the cache is full) */
    const char *stop;           /* stop after these bytes appear (byte-level tokens), or NULL */
    int speculative;            /* draft with the MTP modules and verify with the main model */
    int64_t n_draft;            /* drafts per step (0: one per MTP module, at most that many) */
    moe_gen_token_fn on_token;  /* streaming callback, or NULL */
    void *user;
} moe_gen_opts;

typedef enum moe_gen_stop { MOE_GEN_STOP_MAX_TOKENS = 0, MOE_GEN_STOP_STRING, MOE_GEN_STOP_CALLBACK, MOE_GEN_STOP_CACHE_FULL } moe_gen_stop;

/* What a generation did. tok_s counts the tokens after the first (which the prompt pass
   yields) over the decode time; acceptance = accepted / drafted. */
typedef struct moe_gen_stats {
    int64_t prompt_tokens, new_tokens, main_passes, drafted, accepted;
    double prefill_s, decode_s, tok_s, acceptance;
    int64_t cache_bytes_per_token, mha_cache_bytes_per_token;
    moe_gen_stop stop;
} moe_gen_stats;

/* Reset the session, run the prompt, and generate into out[0..cap) (*n_out tokens). The
   cache then holds the prompt and every generated token but the last. An explicit
   max_tokens that the cache cannot hold is an error before anything runs. */
MOE_API moe_status moe_gen_generate(moe_ctx *ctx, moe_gen *gen, const int32_t *prompt, int64_t n_prompt,
                                    const moe_gen_opts *opts, int32_t *out, int64_t cap, int64_t *n_out,
                                    moe_gen_stats *stats);
/* ==== IMPLEMENTATION ==== */
/* ============================================================================================
   10. infer
   ============================================================================================ */

#define MOE__GEN_MAX_DRAFT 4 /* = the most MTP modules a config may have */

struct moe_gen {
    moe_model *m;
    moe_ctx *w;            /* private context: its arena is reset after every call */
    int64_t cap, len, R;   /* capacity, main cache length, values per cached token (kvr + dr) */
    int64_t n_mtp, mtp_len[MOE__GEN_MAX_DRAFT];
    moe_real *cache;       /* [(layers + n_mtp)][cap][R] */
    int64_t ring_n;        /* hidden states of the last ring_n positions, per depth */
    moe_real *ring;        /* [n_mtp + 1][ring_n][d]: main h^0 (after model.norm), MTP h^k */
    int64_t *loads_saved;  /* the model's expert-load counters, restored after each call */
    int64_t n_loads;
    moe_gen_attn attn;
    float *pbuf;           /* [(MAX_DRAFT + 1) · 2][V] distributions during speculation */
    int32_t *idx;          /* [V] sort scratch */
    int32_t *toks;         /* [cap + 1] tokens of the current generation */
};

MOE_API void moe_gen_cache_bytes(const moe_model *m, int64_t *latent, int64_t *mha) {
    const moe_config *c;
    if (latent) *latent = 0;
    if (mha) *mha = 0;
    if (!m) return;
    c = &m->cfg;
    if (latent) *latent = c->num_hidden_layers * (c->kv_lora_rank + c->qk_rope_head_dim) * (int64_t)sizeof(moe_real);
    if (mha)
        *mha = c->num_hidden_layers * c->num_attention_heads *
               (c->qk_nope_head_dim + c->qk_rope_head_dim + c->v_head_dim) * (int64_t)sizeof(moe_real);
}

MOE_API void moe_gen_free(moe_gen *g) {
    if (!g) return;
    moe_ctx_free(g->w);
    MOE_FREE(g->cache);
    MOE_FREE(g->ring);
    MOE_FREE(g->loads_saved);
    MOE_FREE(g->pbuf);
    MOE_FREE(g->idx);
    MOE_FREE(g->toks);
    MOE_FREE(g);
}

MOE_API moe_status moe_gen_new(moe_ctx *ctx, moe_model *m, int64_t max_len, moe_gen **out) {
    static const char *fn = "moe_gen_new";
    const moe_config *c;
    moe_gen *g;
    size_t n_cache, n_ring, n_p, bytes;
    MOE__CHECK_CTX(ctx);
    if (!out) return moe__fail(ctx, MOE_ERR_ARG, "%s: out is NULL", fn);
    *out = NULL;
    if (!m) return moe__fail(ctx, MOE_ERR_ARG, "%s: model is NULL", fn);
    c = &m->cfg;
    if (max_len < 0 || max_len > c->max_position_embeddings)
        return moe__fail(ctx, MOE_ERR_ARG, "%s: max_len %lld is outside 0..max_position_embeddings (%lld)", fn,
                         (long long)max_len, (long long)c->max_position_embeddings);
    g = (moe_gen *)moe__heap_calloc(ctx, sizeof *g);
    if (!g) return moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory", fn);
    g->m = m;
    g->cap = max_len ? max_len : c->max_position_embeddings;
    g->R = c->kv_lora_rank + c->qk_rope_head_dim;
    g->n_mtp = c->num_nextn_predict_layers;
    /* drafts of one step sit up to n_mtp positions past the committed ones and MTP module k
       lags by k: 4·(n_mtp + 1) positions cover every hidden state a later step reads */
    g->ring_n = 4 * (g->n_mtp + 1);
    g->n_loads = (c->num_hidden_layers - c->first_k_dense_replace + c->num_nextn_predict_layers) * c->n_routed_experts;
    if (moe_ctx_new(&g->w) != MOE_OK) {
        moe_gen_free(g);
        return moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory", fn);
    }
    if (moe__mul_overflows((size_t)(c->num_hidden_layers + g->n_mtp) * (size_t)g->cap, (size_t)g->R, &n_cache) ||
        moe__mul_overflows(n_cache, sizeof(moe_real), &bytes)) {
        moe_gen_free(g);
        return moe__fail(ctx, MOE_ERR_MEMORY, "%s: cache size overflows", fn);
    }
    n_ring = (size_t)((g->n_mtp + 1) * g->ring_n * c->hidden_size);
    n_p = (size_t)(2 * (MOE__GEN_MAX_DRAFT + 1)) * (size_t)c->vocab_size;
    g->cache = (moe_real *)moe__heap_calloc(ctx, bytes);
    g->ring = (moe_real *)moe__heap_calloc(ctx, n_ring * sizeof(moe_real));
    g->loads_saved = (int64_t *)moe__heap_calloc(ctx, (size_t)(g->n_loads + 1) * sizeof(int64_t));
    g->pbuf = (float *)moe__heap_calloc(ctx, n_p * sizeof(float));
    g->idx = (int32_t *)moe__heap_calloc(ctx, (size_t)c->vocab_size * sizeof(int32_t));
    g->toks = (int32_t *)moe__heap_calloc(ctx, (size_t)(g->cap + 1) * sizeof(int32_t));
    if (!g->cache || !g->ring || !g->loads_saved || !g->pbuf || !g->idx || !g->toks) {
        moe_gen_free(g);
        return moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory for a cache of %lld tokens (%zu bytes)", fn,
                         (long long)g->cap, bytes);
    }
    *out = g;
    return MOE_OK;
}

MOE_API void moe_gen_reset(moe_gen *g) {
    int64_t k;
    if (!g) return;
    g->len = 0;
    for (k = 0; k < MOE__GEN_MAX_DRAFT; k++) g->mtp_len[k] = 0;
}
MOE_API int64_t moe_gen_len(const moe_gen *g) { return g ? g->len : 0; }
MOE_API int64_t moe_gen_capacity(const moe_gen *g) { return g ? g->cap : 0; }

MOE_API moe_status moe_gen_set_attn(moe_ctx *ctx, moe_gen *g, moe_gen_attn attn) {
    MOE__CHECK_CTX(ctx);
    if (!g) return moe__fail(ctx, MOE_ERR_ARG, "moe_gen_set_attn: gen is NULL");
    if ((int)attn < 0 || (int)attn > 2) return moe__fail(ctx, MOE_ERR_ARG, "moe_gen_set_attn: unknown mode %d", (int)attn);
    g->attn = attn;
    return MOE_OK;
}

MOE_API moe_status moe_gen_truncate(moe_ctx *ctx, moe_gen *g, int64_t len) {
    int64_t k;
    MOE__CHECK_CTX(ctx);
    if (!g) return moe__fail(ctx, MOE_ERR_ARG, "moe_gen_truncate: gen is NULL");
    if (len < 0 || len > g->len)
        return moe__fail(ctx, MOE_ERR_ARG, "moe_gen_truncate: length %lld is outside 0..%lld (the cached tokens)", (long long)len,
                         (long long)g->len);
    g->len = len;
    /* an MTP entry at position i was made from main-model state at i: drop those past len */
    for (k = 0; k < MOE__GEN_MAX_DRAFT; k++)
        if (g->mtp_len[k] > len) g->mtp_len[k] = len;
    return MOE_OK;
}

/* The private context follows the caller's settings; the model's load counters are kept. */
static void moe__gen_begin(moe_ctx *ctx, moe_gen *g) {
    g->w->n_threads = ctx->n_threads;
    g->w->simd = ctx->simd;
    g->w->gemm_compute = ctx->gemm_compute;
    g->w->grad_enabled = 0; /* nothing is recorded: no tape, no saved activations needed */
    g->w->arena_limit = ctx->arena_limit;
    g->w->error[0] = 0;
    if (g->n_loads) memcpy(g->loads_saved, g->m->loads, (size_t)g->n_loads * sizeof(int64_t));
}
/* Reset the private arena, restore the load counters, and pass an error on to ctx. */
static moe_status moe__gen_end(moe_ctx *ctx, moe_gen *g, moe_status st) {
    if (g->n_loads) memcpy(g->m->loads, g->loads_saved, (size_t)g->n_loads * sizeof(int64_t));
    moe_ctx_reset(g->w);
    if (st != MOE_OK) {
        if (g->w->error[0]) snprintf(ctx->error, sizeof ctx->error, "%s", g->w->error);
        else if (!ctx->error[0]) moe__fail(ctx, st, "moe_gen: %s", moe_status_name(st));
    }
    return st;
}

/* One MLA layer over n new tokens (rows of X, already normed) at positions pos0..pos0+n-1.
   Writes their c_KV (normed) and k_pe (rotated) to `cache` rows pos0.., then attends from
   token t over cache rows 0..pos0+t. naive: expand k and v of every cached row through kv_b
   (the training computation); else absorbed: score_j = (W_UKᵀq_nope · c_j + q_pe · kpe_j)·scale,
   o = W_UV Σ_j p_j c_j. */
static moe_status moe__gen_mla(moe_ctx *w, const moe_model *m, const moe__mla *A, moe_real *cache, const moe_real *X,
                               int64_t n, int64_t pos0, int naive, moe_real *out) {
    const moe_config *c = &m->cfg;
    int64_t d = c->hidden_size, H = c->num_attention_heads, qr = c->q_lora_rank, kvr = c->kv_lora_rank;
    int64_t dn = c->qk_nope_head_dim, dr = c->qk_rope_head_dim, dqk = dn + dr, dv = c->v_head_dim, R = kvr + dr;
    int64_t Lk = pos0 + n, t, h, pair, npairs = n * H;
    int bf16 = w->gemm_compute == MOE_BF16, nt = w->n_threads;
    moe__mla_dims md = moe__model_mla_dims(m, 1, n, pos0); /* the training forward's eps and scale */
    moe_real eps = md.eps, scale = md.scale;
    const moe_real *kvb_w = MOE__F32(A->kv_b);
    moe_real *q = moe__scratch_real(w, n * H * dqk, "moe_gen attention");
    moe_real *kv = moe__scratch_real(w, n * R, "moe_gen attention");
    moe_real *o = moe__scratch_real(w, n * H * dv, "moe_gen attention");
    moe_real *sc = moe__scratch_real(w, (int64_t)nt * Lk, "moe_gen attention");
    if (!q || !kv || !o || !sc) return MOE_ERR_MEMORY;
    /* queries, RoPE'd at their positions */
    if (qr > 0) {
        moe_real *cq = moe__scratch_real(w, n * qr, "moe_gen attention");
        if (!cq) return MOE_ERR_MEMORY;
        MOE__TRY(moe__linear(w, X, n, d, MOE__F32(A->q_a), qr, cq, bf16));
        moe__rmsnorm_fwd(nt, cq, MOE__F32(A->q_a_norm), cq, NULL, n, qr, eps);
        MOE__TRY(moe__linear(w, cq, n, qr, MOE__F32(A->q_b), H * dqk, q, bf16));
    } else {
        MOE__TRY(moe__linear(w, X, n, d, MOE__F32(A->q_proj), H * dqk, q, bf16));
    }
    moe__mla_rope(q, n, n, H, dqk, dn, dr, m->rope.cos_sin, pos0, 1);
    /* the new cache rows: RMSNorm(c_KV) and RoPE(k_pe); kv_a's rows are [c_KV ; k_pe] */
    MOE__TRY(moe__linear(w, X, n, d, MOE__F32(A->kv_a), R, kv, bf16));
    for (t = 0; t < n; t++) {
        moe_real *row = cache + (pos0 + t) * R;
        moe__rmsnorm_fwd(1, kv + t * R, MOE__F32(A->kv_a_norm), row, NULL, 1, kvr, eps);
        memcpy(row + kvr, kv + t * R + kvr, (size_t)dr * sizeof(moe_real));
    }
    moe__mla_rope(cache + pos0 * R, n, n, 1, R, kvr, dr, m->rope.cos_sin, pos0, 1);
    if (naive) {
        /* k_nope | v of every cached token, as the training forward makes them */
        moe_real *kvb = moe__scratch_real(w, Lk * H * (dn + dv), "moe_gen attention");
        if (!kvb) return MOE_ERR_MEMORY;
        MOE__TRY(moe__gemm(w, 0, 1, Lk, H * (dn + dv), kvr, 1, cache, R, kvb_w, kvr, 0, kvb, H * (dn + dv), bf16));
        MOE__OMP(omp parallel for num_threads(nt) schedule(static) if (npairs * Lk * (dqk + dv) > 32768))
        for (pair = 0; pair < npairs; pair++) {
            int64_t tt = pair / H, hh = pair % H, nk = pos0 + tt + 1, j, i;
            const moe_real *qh = q + (tt * H + hh) * dqk;
            moe_real *s = sc;
            moe_real mx = -INFINITY, sum = 0, *oh = o + (tt * H + hh) * dv;
#ifdef _OPENMP
            s = sc + (int64_t)omp_get_thread_num() * Lk;
#endif
            for (j = 0; j < nk; j++) {
                const moe_real *kn = kvb + (j * H + hh) * (dn + dv), *kp = cache + j * R + kvr;
                moe_real acc = 0;
                for (i = 0; i < dn; i++) acc += qh[i] * kn[i];
                for (i = 0; i < dr; i++) acc += qh[dn + i] * kp[i];
                s[j] = acc * scale;
                mx = s[j] > mx ? s[j] : mx;
            }
            for (j = 0; j < nk; j++) sum += (s[j] = moe__exp(s[j] - mx));
            for (i = 0; i < dv; i++) oh[i] = 0;
            for (j = 0; j < nk; j++) {
                const moe_real *vj = kvb + (j * H + hh) * (dn + dv) + dn;
                moe_real p = s[j] / sum;
                for (i = 0; i < dv; i++) oh[i] += p * vj[i];
            }
        }
    } else {
        /* qc[t, h] = [W_UK_hᵀ q_nope ; q_pe]: one R-vector that dots a cache row directly */
        moe_real *qc = moe__scratch_real(w, n * H * R, "moe_gen attention");
        moe_real *ob = moe__scratch_real(w, n * H * kvr, "moe_gen attention");
        if (!qc || !ob) return MOE_ERR_MEMORY;
        for (h = 0; h < H; h++)
            MOE__TRY(moe__gemm(w, 0, 0, n, kvr, dn, 1, q + h * dqk, H * dqk, kvb_w + h * (dn + dv) * kvr, kvr, 0, qc + h * R,
                               H * R, bf16));
        for (pair = 0; pair < npairs; pair++) memcpy(qc + pair * R + kvr, q + pair * dqk + dn, (size_t)dr * sizeof(moe_real));
        MOE__OMP(omp parallel for num_threads(nt) schedule(static) if (npairs * Lk * R > 32768))
        for (pair = 0; pair < npairs; pair++) {
            int64_t tt = pair / H, nk = pos0 + tt + 1, j, i;
            const moe_real *qh = qc + pair * R;
            moe_real *s = sc;
            moe_real mx = -INFINITY, sum = 0, *oh = ob + pair * kvr;
#ifdef _OPENMP
            s = sc + (int64_t)omp_get_thread_num() * Lk;
#endif
            for (j = 0; j < nk; j++) {
                const moe_real *cj = cache + j * R;
                moe_real acc = 0;
                for (i = 0; i < R; i++) acc += qh[i] * cj[i];
                s[j] = acc * scale;
                mx = s[j] > mx ? s[j] : mx;
            }
            for (j = 0; j < nk; j++) sum += (s[j] = moe__exp(s[j] - mx));
            for (i = 0; i < kvr; i++) oh[i] = 0;
            for (j = 0; j < nk; j++) {
                const moe_real *cj = cache + j * R;
                moe_real p = s[j] / sum;
                for (i = 0; i < kvr; i++) oh[i] += p * cj[i];
            }
        }
        /* o_h = W_UV_h ō_h */
        for (h = 0; h < H; h++)
            MOE__TRY(moe__gemm(w, 0, 1, n, dv, kvr, 1, ob + h * kvr, H * kvr, kvb_w + (h * (dn + dv) + dn) * kvr, kvr, 0,
                               o + h * dv, H * dv, bf16));
    }
    return moe__linear(w, o, n, H * dv, MOE__F32(A->o), d, out, bf16);
}

/* One transformer block over n tokens; x [n, d] is updated in place. */
static moe_status moe__gen_block(moe_ctx *w, moe_model *m, moe__block *b, moe_real *cache, moe_real *x, int64_t n,
                                 int64_t pos0, int naive) {
    const moe_config *c = &m->cfg;
    int64_t d = c->hidden_size, i, shape[2];
    moe_real eps = (moe_real)c->rms_norm_eps;
    moe_real *h = moe__scratch_real(w, n * d, "moe_gen block"), *a = moe__scratch_real(w, n * d, "moe_gen block");
    moe_tensor *h2, *f, *aux = NULL;
    if (!h || !a) return MOE_ERR_MEMORY;
    moe__rmsnorm_fwd(w->n_threads, x, MOE__F32(b->attn_norm), h, NULL, n, d, eps);
    MOE__TRY(moe__gen_mla(w, m, &b->attn, cache, h, n, pos0, naive, a));
    for (i = 0; i < n * d; i++) x[i] += a[i];
    shape[0] = n;
    shape[1] = d;
    MOE__TRY(moe__tensor_out(w, 2, shape, &h2));
    moe__rmsnorm_fwd(w->n_threads, x, MOE__F32(b->ffn_norm), MOE__F32(h2), NULL, n, d, eps);
    if (b->is_moe) MOE__TRY(moe__moe_forward(w, &b->moe, c, 1, n, 0.0f, h2, &f, &aux));
    else MOE__TRY(moe__ffn_forward(w, &b->dense, h2, &f));
    for (i = 0; i < n * d; i++) x[i] += MOE__F32(f)[i];
    return MOE_OK;
}

static moe_real *moe__gen_layer_cache(moe_gen *g, int64_t layer) { return g->cache + layer * g->cap * g->R; }
static moe_real *moe__gen_ring(moe_gen *g, int64_t depth, int64_t pos) {
    return g->ring + (depth * g->ring_n + pos % g->ring_n) * g->m->cfg.hidden_size;
}

static moe_status moe__gen_check_tokens(moe_ctx *w, const char *fn, const moe_model *m, const int32_t *tokens, int64_t n) {
    int64_t i;
    for (i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= m->cfg.vocab_size)
            return moe__fail(w, MOE_ERR_ARG, "%s: token %d at %lld is outside the vocabulary [0, %lld)", fn, (int)tokens[i],
                             (long long)i, (long long)m->cfg.vocab_size);
    return MOE_OK;
}

/* logits [rows, V] = head(h) for rows of already-normed hidden states, into float. */
static moe_status moe__gen_logits(moe_ctx *w, const moe_model *m, const moe_real *h, int64_t rows, float *logits) {
    int64_t V = m->cfg.vocab_size, i;
    moe_real *lg;
    if (rows == 0) return MOE_OK;
    lg = moe__scratch_real(w, rows * V, "moe_gen logits");
    if (!lg) return MOE_ERR_MEMORY;
    MOE__TRY(moe__linear(w, h, rows, m->cfg.hidden_size, MOE__F32(m->head), V, lg, w->gemm_compute == MOE_BF16));
    for (i = 0; i < rows * V; i++) logits[i] = (float)lg[i];
    return MOE_OK;
}

/* The main model over n tokens at g->len..: caches them, keeps their final normed hidden
   states in *hout (arena) and in the ring, writes the logits of the last logit_rows rows. */
static moe_status moe__gen_main(moe_gen *g, const int32_t *tokens, int64_t n, int64_t logit_rows, float *logits,
                                moe_real **hout) {
    moe_ctx *w = g->w;
    moe_model *m = g->m;
    const moe_config *c = &m->cfg;
    int64_t d = c->hidden_size, t, L, pos0 = g->len;
    int naive = g->attn == MOE_GEN_ATTN_NAIVE || (g->attn == MOE_GEN_ATTN_AUTO && pos0 == 0 && n > 1);
    moe_real *x = moe__scratch_real(w, n * d, "moe_gen"), *h = moe__scratch_real(w, n * d, "moe_gen");
    if (!x || !h) return MOE_ERR_MEMORY;
    for (t = 0; t < n; t++) memcpy(x + t * d, MOE__F32(m->embed) + (int64_t)tokens[t] * d, (size_t)d * sizeof(moe_real));
    for (L = 0; L < c->num_hidden_layers; L++)
        MOE__TRY(moe__gen_block(w, m, &m->layers[L], moe__gen_layer_cache(g, L), x, n, pos0, naive));
    moe__rmsnorm_fwd(w->n_threads, x, MOE__F32(m->norm), h, NULL, n, d, (moe_real)c->rms_norm_eps);
    for (t = n > g->ring_n ? n - g->ring_n : 0; t < n; t++)
        memcpy(moe__gen_ring(g, 0, pos0 + t), h + t * d, (size_t)d * sizeof(moe_real));
    if (logits) MOE__TRY(moe__gen_logits(w, m, h + (n - logit_rows) * d, logit_rows, logits));
    g->len += n;
    if (hout) *hout = h;
    return MOE_OK;
}

MOE_API moe_status moe_gen_forward(moe_ctx *ctx, moe_gen *g, const int32_t *tokens, int64_t n, int64_t logit_rows,
                                   float *logits) {
    static const char *fn = "moe_gen_forward";
    moe_status st;
    MOE__CHECK_CTX(ctx);
    if (!g || !tokens) return moe__fail(ctx, MOE_ERR_ARG, "%s: NULL gen or tokens", fn);
    if (n < 1) return moe__fail(ctx, MOE_ERR_SHAPE, "%s: n must be positive, got %lld", fn, (long long)n);
    if (logit_rows < 0 || logit_rows > n || (logit_rows > 0 && !logits))
        return moe__fail(ctx, MOE_ERR_ARG, "%s: logit_rows %lld must be 0..n (%lld) with a logits buffer when > 0", fn,
                         (long long)logit_rows, (long long)n);
    if (n > g->cap - g->len)
        return moe__fail(ctx, MOE_ERR_SHAPE,
                         "%s: %lld cached + %lld new tokens exceed the cache capacity of %lld tokens (max_position_embeddings %lld)",
                         fn, (long long)g->len, (long long)n, (long long)g->cap, (long long)g->m->cfg.max_position_embeddings);
    MOE__TRY(moe__gen_check_tokens(ctx, fn, g->m, tokens, n));
    moe__gen_begin(ctx, g);
    st = moe__gen_main(g, tokens, n, logit_rows, logits, NULL);
    return moe__gen_end(ctx, g, st);
}

/* ---- sampling ---- */

/* Indices by descending value, ties to the lower index: a stable bottom-up merge sort (qsort
   is neither stable nor given a context pointer in C99). */
static void moe__gen_sort_desc(const float *p, int32_t *idx, int32_t *tmp, int64_t n) {
    int64_t width, i;
    for (i = 0; i < n; i++) idx[i] = (int32_t)i;
    for (width = 1; width < n; width *= 2) {
        for (i = 0; i < n; i += 2 * width) {
            int64_t lo = i, mid = i + width < n ? i + width : n, hi = i + 2 * width < n ? i + 2 * width : n;
            int64_t a = lo, b = mid, k = lo;
            while (a < mid && b < hi) tmp[k++] = (p[idx[b]] > p[idx[a]]) ? idx[b++] : idx[a++];
            while (a < mid) tmp[k++] = idx[a++];
            while (b < hi) tmp[k++] = idx[b++];
        }
        memcpy(idx, tmp, (size_t)n * sizeof(int32_t));
    }
}

static int32_t moe__gen_argmax(const float *x, int64_t n) {
    int64_t i, best = 0;
    for (i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return (int32_t)best;
}

/* probs from logits under s; idx and tmp: [V] scratch for top-k / top-p. */
static void moe__gen_probs(const float *logits, int64_t V, const moe_sampling *s, float *probs, int32_t *idx, int32_t *tmp) {
    int64_t i, keep = V;
    double mx = -INFINITY, sum = 0;
    if (!(s->temperature > 0)) {
        int32_t a = moe__gen_argmax(logits, V);
        for (i = 0; i < V; i++) probs[i] = 0;
        probs[a] = 1;
        return;
    }
    for (i = 0; i < V; i++) mx = logits[i] > mx ? logits[i] : mx;
    for (i = 0; i < V; i++) sum += (probs[i] = (float)exp(((double)logits[i] - mx) / (double)s->temperature));
    for (i = 0; i < V; i++) probs[i] = (float)((double)probs[i] / sum);
    if ((s->top_k > 0 && s->top_k < V) || (s->top_p > 0 && s->top_p < 1)) {
        moe__gen_sort_desc(probs, idx, tmp, V);
        if (s->top_k > 0 && s->top_k < V) keep = s->top_k;
        if (s->top_p > 0 && s->top_p < 1) {
            double mass = 0, kept_mass = 0;
            int64_t j;
            for (j = 0; j < keep; j++) kept_mass += probs[idx[j]];
            for (j = 0; j < keep; j++) {
                mass += probs[idx[j]];
                if (mass >= (double)s->top_p * kept_mass) { keep = j + 1; break; }
            }
        }
        sum = 0;
        for (i = 0; i < keep; i++) sum += probs[idx[i]];
        for (i = keep; i < V; i++) probs[idx[i]] = 0;
        for (i = 0; i < keep; i++) probs[idx[i]] = (float)((double)probs[idx[i]] / sum);
    }
}

/* A draw from unnormalised weights p (≥ 0) with one uniform; NaN or zero mass → argmax. */
static int32_t moe__gen_draw(const float *p, int64_t V, moe_rng *rng) {
    double total = 0, u, acc = 0;
    int64_t i, last = -1;
    for (i = 0; i < V; i++)
        if (p[i] > 0) { total += p[i]; last = i; }
    u = (double)(moe_rng_next(rng) >> 11) * (1.0 / 9007199254740992.0) * total;
    if (!(total > 0)) return moe__gen_argmax(p, V);
    for (i = 0; i < V; i++) {
        if (!(p[i] > 0)) continue;
        acc += p[i];
        if (u < acc) return (int32_t)i;
    }
    return (int32_t)last; /* u rounded up to the total */
}

/* Speculative sampling step (Leviathan et al. / Chen et al.): exact for any q. */
static int32_t moe__gen_verify(const float *p, const float *q, int64_t V, int32_t draft, moe_rng *rng, float *resid,
                               int *accepted) {
    double u = (double)(moe_rng_next(rng) >> 11) * (1.0 / 9007199254740992.0), pd = p[draft], qd = q[draft];
    int64_t i;
    double mass = 0;
    if (qd > 0 && u * qd < pd) { /* u < p/q without dividing */
        *accepted = 1;
        return draft;
    }
    *accepted = 0;
    for (i = 0; i < V; i++) {
        double r = (double)p[i] - (double)q[i];
        resid[i] = r > 0 ? (float)r : 0.0f;
        mass += resid[i];
    }
    return moe__gen_draw(mass > 0 ? resid : p, V, rng);
}

static moe_status moe__gen_check_sampling(moe_ctx *ctx, const char *fn, const moe_sampling *s) {
    if (!s) return MOE_OK;
    if (!(s->temperature >= 0) || !isfinite(s->temperature) || s->top_k < 0 || !(s->top_p >= 0) || !isfinite(s->top_p))
        return moe__fail(ctx, MOE_ERR_ARG, "%s: temperature and top_p must be finite and >= 0, top_k >= 0", fn);
    return MOE_OK;
}

MOE_API moe_status moe_gen_probs(moe_ctx *ctx, const float *logits, int64_t V, const moe_sampling *s, float *probs) {
    static const char *fn = "moe_gen_probs";
    moe_sampling greedy;
    int32_t *idx;
    MOE__CHECK_CTX(ctx);
    if (!logits || !probs || V < 1) return moe__fail(ctx, MOE_ERR_ARG, "%s: NULL logits/probs or vocab < 1", fn);
    MOE__TRY(moe__gen_check_sampling(ctx, fn, s));
    memset(&greedy, 0, sizeof greedy);
    if (!s) s = &greedy;
    idx = (int32_t *)moe__heap_alloc(ctx, (size_t)V * 2 * sizeof(int32_t));
    if (!idx) return moe__fail(ctx, MOE_ERR_MEMORY, "%s: out of memory", fn);
    moe__gen_probs(logits, V, s, probs, idx, idx + V);
    MOE_FREE(idx);
    return MOE_OK;
}

MOE_API moe_status moe_gen_sample_probs(moe_ctx *ctx, const float *probs, int64_t V, moe_rng *rng, int32_t *token) {
    MOE__CHECK_CTX(ctx);
    if (!probs || !rng || !token || V < 1) return moe__fail(ctx, MOE_ERR_ARG, "moe_gen_sample_probs: NULL argument or vocab < 1");
    *token = moe__gen_draw(probs, V, rng);
    return MOE_OK;
}

MOE_API moe_status moe_gen_verify_draft(moe_ctx *ctx, const float *p, const float *q, int64_t V, int32_t draft, moe_rng *rng,
                                        int32_t *token, int *accepted) {
    float *resid;
    MOE__CHECK_CTX(ctx);
    if (!p || !q || !rng || !token || !accepted || V < 1)
        return moe__fail(ctx, MOE_ERR_ARG, "moe_gen_verify_draft: NULL argument or vocab < 1");
    if (draft < 0 || draft >= V) return moe__fail(ctx, MOE_ERR_ARG, "moe_gen_verify_draft: draft %d outside [0, %lld)", (int)draft, (long long)V);
    resid = (float *)moe__heap_alloc(ctx, (size_t)V * sizeof(float));
    if (!resid) return moe__fail(ctx, MOE_ERR_MEMORY, "moe_gen_verify_draft: out of memory");
    *token = moe__gen_verify(p, q, V, draft, rng, resid, accepted);
    MOE_FREE(resid);
    return MOE_OK;
}

/* ---- speculative decoding with the MTP modules ---- */

/* Token at position j of the running sequence: committed/pending ones from g->toks (up to
   position L, the pending token), drafts after that. */
static int32_t moe__gen_tok(const moe_gen *g, int64_t L, const int32_t *drafts, int64_t j) {
    return j <= L ? g->toks[j] : drafts[j - L - 1];
}

/* Bring MTP module k (0-based) up to the committed length L and draft from its last position
   (L-1): depth k+1 at position i reads Emb(t_{i+k+1}) and h^k_i (reference §4.1). Hidden
   inputs come from `hin` (rows for positions hin0..) when given, else from the ring; the
   module's outputs for its new positions go to *hout (rows for positions *hout0..). */
static moe_status moe__gen_mtp(moe_gen *g, int64_t k, int64_t L, const int32_t *drafts, const moe_real *hin, int64_t hin0,
                               float *logits, moe_real **hout, int64_t *hout0) {
    moe_ctx *w = g->w;
    moe_model *m = g->m;
    const moe_config *c = &m->cfg;
    moe__mtp *M = &m->mtp[k];
    int64_t d = c->hidden_size, i0 = g->mtp_len[k], n = L - i0, t;
    moe_real eps = (moe_real)c->rms_norm_eps;
    moe_real *cat, *x, *hn;
    MOE_ASSERT(n >= 1);
    cat = moe__scratch_real(w, n * 2 * d, "moe_gen mtp");
    x = moe__scratch_real(w, n * d, "moe_gen mtp");
    hn = moe__scratch_real(w, d, "moe_gen mtp");
    if (!cat || !x || !hn) return MOE_ERR_MEMORY;
    for (t = 0; t < n; t++) {
        int64_t pos = i0 + t;
        const moe_real *e = MOE__F32(m->embed) + (int64_t)moe__gen_tok(g, L, drafts, pos + k + 1) * d;
        const moe_real *hp = hin && pos >= hin0 ? hin + (pos - hin0) * d : moe__gen_ring(g, k, pos);
        /* embedding first, then the hidden state: the column order of the released eh_proj */
        moe__rmsnorm_fwd(1, e, MOE__F32(M->enorm), cat + t * 2 * d, NULL, 1, d, eps);
        moe__rmsnorm_fwd(1, hp, MOE__F32(M->hnorm), cat + t * 2 * d + d, NULL, 1, d, eps);
    }
    MOE__TRY(moe__linear(w, cat, n, 2 * d, MOE__F32(M->eh_proj), d, x, w->gemm_compute == MOE_BF16));
    MOE__TRY(moe__gen_block(w, m, &M->block, moe__gen_layer_cache(g, c->num_hidden_layers + k), x, n, i0,
                            g->attn == MOE_GEN_ATTN_NAIVE || (g->attn == MOE_GEN_ATTN_AUTO && i0 == 0 && n > 1)));
    for (t = n > g->ring_n ? n - g->ring_n : 0; t < n; t++)
        memcpy(moe__gen_ring(g, k + 1, i0 + t), x + t * d, (size_t)d * sizeof(moe_real));
    moe__rmsnorm_fwd(1, x + (n - 1) * d, MOE__F32(M->head_norm), hn, NULL, 1, d, eps);
    MOE__TRY(moe__gen_logits(w, m, hn, 1, logits));
    g->mtp_len[k] = L;
    *hout = x;
    *hout0 = i0;
    return MOE_OK;
}

/* Draft nd tokens after the pending token toks[L]; q[k] gets draft k's distribution. */
static moe_status moe__gen_draft(moe_gen *g, int64_t L, int64_t nd, const moe_sampling *s, moe_rng *rng, const moe_real *h0,
                                 int64_t h00, int32_t *drafts, float *lg, float **q, int32_t *tmp) {
    const moe_real *hin = h0;
    int64_t k, hin0 = h00, V = g->m->cfg.vocab_size;
    for (k = 0; k < nd; k++) {
        moe_real *hk;
        int64_t hk0;
        MOE__TRY(moe__gen_mtp(g, k, L, drafts, hin, hin0, lg, &hk, &hk0));
        if (s->temperature > 0) {
            moe__gen_probs(lg, V, s, q[k], g->idx, tmp);
            drafts[k] = moe__gen_draw(q[k], V, rng);
        } else {
            drafts[k] = moe__gen_argmax(lg, V);
        }
        hin = hk;
        hin0 = hk0;
    }
    return MOE_OK;
}

typedef struct moe__gen_out {
    int32_t *out;
    int64_t cap, n, max;
    const char *stop;
    size_t stop_len;
    const moe_gen_opts *o;
    moe_gen_stop reason;
    int done, max_is_cache; /* max came from the cache's room, not from max_tokens */
} moe__gen_out;

/* Hand one token to the caller; sets done when a stop condition holds. */
static void moe__gen_emit(moe__gen_out *E, int32_t tok) {
    if (E->done) return;
    E->out[E->n++] = tok;
    if (E->o->on_token && E->o->on_token(E->o->user, tok)) { E->done = 1; E->reason = MOE_GEN_STOP_CALLBACK; }
    if (!E->done && E->stop_len && (size_t)E->n >= E->stop_len) {
        size_t i;
        int match = 1;
        for (i = 0; i < E->stop_len && match; i++)
            match = E->out[E->n - (int64_t)E->stop_len + (int64_t)i] == (int32_t)(unsigned char)E->stop[i];
        if (match) { E->done = 1; E->reason = MOE_GEN_STOP_STRING; }
    }
    if (!E->done && E->n >= E->max) {
        E->done = 1;
        E->reason = E->max_is_cache ? MOE_GEN_STOP_CACHE_FULL : MOE_GEN_STOP_MAX_TOKENS;
    }
}

static moe_status moe__gen_run(moe_gen *g, const int32_t *prompt, int64_t np, const moe_gen_opts *o, moe__gen_out *E,
                               moe_gen_stats *S) {
    moe_ctx *w = g->w;
    const moe_config *c = &g->m->cfg;
    int64_t V = c->vocab_size, L = np, nd = 0, k;
    moe_sampling s = o->sampling;
    moe_rng rng = moe_rng_new(o->seed, 0x6E6E);
    float *P[MOE__GEN_MAX_DRAFT + 1], *Q[MOE__GEN_MAX_DRAFT + 1], *lg;
    int32_t drafts[MOE__GEN_MAX_DRAFT + 1], *tmp;
    moe_real *h0;
    double t0 = moe_time_s(), t1;
    int greedy = !(s.temperature > 0);
    for (k = 0; k <= MOE__GEN_MAX_DRAFT; k++) {
        P[k] = g->pbuf + (2 * k) * V;
        Q[k] = g->pbuf + (2 * k + 1) * V;
    }
    lg = (float *)moe__arena_alloc(w, (size_t)(MOE__GEN_MAX_DRAFT + 1) * (size_t)V, sizeof(float), "moe_gen");
    tmp = (int32_t *)moe__arena_alloc(w, (size_t)V, sizeof(int32_t), "moe_gen");
    if (!lg || !tmp) return MOE_ERR_MEMORY;
    if (o->speculative) {
        nd = o->n_draft > 0 ? o->n_draft : g->n_mtp;
        if (nd > g->n_mtp) nd = g->n_mtp;
    }
    memcpy(g->toks, prompt, (size_t)np * sizeof(int32_t));
    /* the prompt */
    MOE__TRY(moe__gen_main(g, prompt, np, 1, lg, &h0));
    S->main_passes++;
    if (greedy) g->toks[L] = moe__gen_argmax(lg, V);
    else {
        moe__gen_probs(lg, V, &s, P[0], g->idx, tmp);
        g->toks[L] = moe__gen_draw(P[0], V, &rng);
    }
    moe__gen_emit(E, g->toks[L]);
    if (nd > 0 && !E->done && L + 1 < g->cap) {
        /* the MTP caches over the prompt: part of the prompt's cost */
        int64_t n1 = nd < g->cap - L - 1 ? nd : g->cap - L - 1;
        MOE__TRY(moe__gen_draft(g, L, n1, &s, &rng, h0, 0, drafts, lg, Q, tmp));
    }
    t1 = moe_time_s();
    S->prefill_s = t1 - t0;
    moe_ctx_reset(w); /* the prompt's activations are not needed any more */
    lg = (float *)moe__arena_alloc(w, (size_t)(MOE__GEN_MAX_DRAFT + 1) * (size_t)V, sizeof(float), "moe_gen");
    tmp = (int32_t *)moe__arena_alloc(w, (size_t)V, sizeof(int32_t), "moe_gen");
    if (!lg || !tmp) return MOE_ERR_MEMORY;
    while (!E->done) {
        int64_t nv, a = 0, j;
        int32_t next = 0, in[MOE__GEN_MAX_DRAFT + 1];
        if (L + 1 > g->cap) { E->done = 1; E->reason = MOE_GEN_STOP_CACHE_FULL; break; }
        /* drafts this step: those already made, fewer near the end of the cache or output */
        nv = nd;
        if (nv > g->cap - L - 1) nv = g->cap - L - 1;
        if (nv > E->max - E->n - 1) nv = E->max - E->n - 1;
        if (nv < 0) nv = 0;
        if (nd > 0 && g->mtp_len[0] < L && nv > 0) {
            /* drafts were not made at the end of the last step (shortened step): make them now */
            MOE__TRY(moe__gen_draft(g, L, nv, &s, &rng, NULL, 0, drafts, lg, Q, tmp));
        }
        in[0] = g->toks[L];
        for (j = 0; j < nv; j++) in[j + 1] = drafts[j];
        MOE__TRY(moe__gen_main(g, in, nv + 1, nv + 1, lg, NULL));
        S->main_passes++;
        S->drafted += nv;
        /* keep the longest accepted prefix */
        for (j = 0; j < nv; j++) {
            if (greedy) {
                next = moe__gen_argmax(lg + j * V, V);
                if (next != drafts[j]) break;
            } else {
                int acc;
                moe__gen_probs(lg + j * V, V, &s, P[j], g->idx, tmp);
                next = moe__gen_verify(P[j], Q[j], V, drafts[j], &rng, P[MOE__GEN_MAX_DRAFT], &acc);
                if (!acc) break;
            }
            a++;
        }
        if (a == nv) { /* every draft kept: the last row gives one more token */
            if (greedy) next = moe__gen_argmax(lg + nv * V, V);
            else {
                moe__gen_probs(lg + nv * V, V, &s, P[nv], g->idx, tmp);
                next = moe__gen_draw(P[nv], V, &rng);
            }
        }
        S->accepted += a;
        /* the cache keeps the pending token and the accepted drafts */
        g->len = L + 1 + a;
        for (k = 0; k < g->n_mtp; k++) {
            /* MTP entry i of depth k+1 read token i+k+1: valid while that was committed */
            int64_t valid = L + a - k;
            if (g->mtp_len[k] > valid) g->mtp_len[k] = valid < 0 ? 0 : valid;
        }
        for (j = 0; j < a; j++) g->toks[L + 1 + j] = drafts[j];
        L += 1 + a;
        g->toks[L] = next;
        for (j = 0; j < a && !E->done; j++) moe__gen_emit(E, drafts[j]);
        moe__gen_emit(E, next);
        if (!E->done && nd > 0) {
            nv = nd;
            if (nv > g->cap - L - 1) nv = g->cap - L - 1;
            if (nv > E->max - E->n - 1) nv = E->max - E->n - 1;
            if (nv > 0) MOE__TRY(moe__gen_draft(g, L, nv, &s, &rng, NULL, 0, drafts, lg, Q, tmp));
        }
        moe_ctx_reset(w);
        lg = (float *)moe__arena_alloc(w, (size_t)(MOE__GEN_MAX_DRAFT + 1) * (size_t)V, sizeof(float), "moe_gen");
        tmp = (int32_t *)moe__arena_alloc(w, (size_t)V, sizeof(int32_t), "moe_gen");
        if (!lg || !tmp) return MOE_ERR_MEMORY;
    }
    S->decode_s = moe_time_s() - t1;
    return MOE_OK;
}

MOE_API moe_status moe_gen_generate(moe_ctx *ctx, moe_gen *g, const int32_t *prompt, int64_t np, const moe_gen_opts *opts,
                                    int32_t *out, int64_t cap, int64_t *n_out, moe_gen_stats *stats) {
    static const char *fn = "moe_gen_generate";
    moe__gen_out E;
    moe_gen_stats S;
    moe_status st;
    MOE__CHECK_CTX(ctx);
    if (n_out) *n_out = 0;
    if (!g || !prompt || !opts || !out || !n_out) return moe__fail(ctx, MOE_ERR_ARG, "%s: NULL gen, prompt, opts, out or n_out", fn);
    if (np < 1) return moe__fail(ctx, MOE_ERR_SHAPE, "%s: the prompt needs at least one token", fn);
    if (cap < 1) return moe__fail(ctx, MOE_ERR_ARG, "%s: the output buffer needs room for at least one token", fn);
    MOE__TRY(moe__gen_check_sampling(ctx, fn, &opts->sampling));
    if (opts->max_tokens < 0 || opts->n_draft < 0) return moe__fail(ctx, MOE_ERR_ARG, "%s: max_tokens and n_draft must be >= 0", fn);
    if (opts->n_draft > g->n_mtp && opts->speculative)
        return moe__fail(ctx, MOE_ERR_ARG, "%s: n_draft %lld exceeds the model's %lld MTP modules", fn, (long long)opts->n_draft,
                         (long long)g->n_mtp);
    if (np > g->cap)
        return moe__fail(ctx, MOE_ERR_SHAPE, "%s: the prompt (%lld tokens) exceeds the cache capacity of %lld tokens", fn,
                         (long long)np, (long long)g->cap);
    /* the last generated token is never fed back, so prompt + max_tokens − 1 must fit */
    if (opts->max_tokens > 0 && opts->max_tokens - 1 > g->cap - np)
        return moe__fail(ctx, MOE_ERR_SHAPE,
                         "%s: prompt %lld + max_tokens %lld need %lld cache positions, the cache holds %lld (max_position_embeddings %lld)",
                         fn, (long long)np, (long long)opts->max_tokens, (long long)(np + opts->max_tokens - 1), (long long)g->cap,
                         (long long)g->m->cfg.max_position_embeddings);
    MOE__TRY(moe__gen_check_tokens(ctx, fn, g->m, prompt, np));
    memset(&E, 0, sizeof E);
    E.out = out;
    E.cap = cap;
    E.o = opts;
    E.max = opts->max_tokens > 0 ? opts->max_tokens : g->cap - np + 1;
    E.max_is_cache = opts->max_tokens == 0;
    if (E.max > cap) {
        E.max = cap;
        E.max_is_cache = 0;
    }
    E.stop = opts->stop;
    E.stop_len = opts->stop ? strlen(opts->stop) : 0;
    memset(&S, 0, sizeof S);
    moe_gen_reset(g);
    moe__gen_begin(ctx, g);
    st = moe__gen_run(g, prompt, np, opts, &E, &S);
    st = moe__gen_end(ctx, g, st);
    S.prompt_tokens = np;
    S.new_tokens = E.n;
    S.stop = E.reason;
    S.acceptance = S.drafted ? (double)S.accepted / (double)S.drafted : 0;
    S.tok_s = S.decode_s > 0 && E.n > 1 ? (double)(E.n - 1) / S.decode_s : 0;
    moe_gen_cache_bytes(g->m, &S.cache_bytes_per_token, &S.mha_cache_bytes_per_token);
    if (stats) *stats = S;
    *n_out = E.n;
    return st;
}
