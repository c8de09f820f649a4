/*
 * Fused decode step: one token through every transformer layer in one C call, for one sequence or
 * for M sequences at once (continuous batching: each Linear runs once over the M rows, so the
 * weights are read once per step for all of them; attention runs per row on its own slot).
 *
 * Included at the end of tritlm_cpu.c (one translation unit: it uses the kernels' contexts, the
 * thread pool and the activation quantiser directly). Why: at M = 1 the ternary GEMVs of a 700M
 * model take ~12 ms per token, and driving ~25 small torch ops per layer from Python (RMSNorm,
 * RoPE, attention, SiLU, residual adds) cost about as much again on these 2-core machines. The
 * math is the engine's torch path (tritlm/infer/engine.py `_forward`), op for op, in float32:
 *
 *   h = rmsnorm(x, ln1) [-> parameter-free rmsnorm(h, eps 1e-6) when input_norm]
 *   q|k|v = qkv(h); q, k per head: [rmsnorm(., q_norm/k_norm)], RoPE (rotate_half layout)
 *   k, v -> cache[slot, kv_head, pos]; y = softmax(q k^T / sqrt(hd)) v over 0..pos (GQA: head h
 *   reads kv head h / (H / KV)); [y = rmsnorm(y, attn_sub)]; x += rs * o(y)
 *   h = rmsnorm(x, ln2); g|u = gu(h); a = silu(g) * u  or  relu(g)^2 * u; [rmsnorm(a, ffn_sub)]
 *   x += rs * down(a)
 *   out = rmsnorm(x, final_norm)   (the LM head stays in Python: fp32 BLAS or the t4 kernel)
 *
 * The Python side owns every buffer (weights, norms, KV cache, RoPE tables); this file only keeps
 * pointers to them and its own scratch space.
 */

typedef struct {
    const float *ln1, *ln2, *q_norm, *k_norm, *attn_sub, *ffn_sub; /* optional ones may be NULL */
    tt_ctx *qkv, *o, *gu, *down;
    float *kc, *vc; /* [slots, KV, max_len, hd] */
} tt_dec_layer;

typedef struct {
    int n_layers, dim, n_heads, kv_heads, hd, ffn, max_len, slots;
    float eps, rs;
    int relu2, input_norm;
    const float *cos, *sin_signed; /* [max_len, hd]; sin with its first half negated */
    const float *final_norm;
    tt_dec_layer *L;
    float *h, *qkv, *att, *gu, *tmp, *scores; /* scratch, one row per slot */
} tt_dec;

static void tt_rmsnorm(const float *x, int n, const float *w, float eps, float *out) {
    /* torch.rms_norm on CPU accumulates the mean of squares in float32 too */
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    if (w)
        for (int i = 0; i < n; i++) out[i] = x[i] * r * w[i];
    else
        for (int i = 0; i < n; i++) out[i] = x[i] * r;
}

tt_dec *tt_dec_new(int n_layers, int dim, int n_heads, int kv_heads, int hd, int ffn, int max_len, int slots,
                   float eps, float rs, int relu2, int input_norm, const float *cos, const float *sin_signed,
                   const float *final_norm) {
    if (n_layers <= 0 || dim <= 0 || n_heads <= 0 || kv_heads <= 0 || n_heads % kv_heads || hd <= 0 || hd % 2 ||
        ffn <= 0 || max_len <= 0 || slots <= 0)
        return NULL;
    tt_dec *d = (tt_dec *)calloc(1, sizeof(tt_dec));
    if (!d) return NULL;
    *d = (tt_dec){.n_layers = n_layers, .dim = dim, .n_heads = n_heads, .kv_heads = kv_heads, .hd = hd,
                  .ffn = ffn, .max_len = max_len, .slots = slots, .eps = eps, .rs = rs, .relu2 = relu2,
                  .input_norm = input_norm, .cos = cos, .sin_signed = sin_signed, .final_norm = final_norm};
    const int nq = n_heads * hd, nqkv = (n_heads + 2 * kv_heads) * hd;
    int wide = dim > nq ? dim : nq;
    wide = wide > ffn ? wide : ffn;
    d->L = (tt_dec_layer *)calloc((size_t)n_layers, sizeof(tt_dec_layer));
    const size_t S = (size_t)slots;
    d->h = (float *)tt_aligned_alloc(sizeof(float) * S * (size_t)wide);
    d->qkv = (float *)tt_aligned_alloc(sizeof(float) * S * (size_t)nqkv);
    d->att = (float *)tt_aligned_alloc(sizeof(float) * S * (size_t)nq);
    d->gu = (float *)tt_aligned_alloc(sizeof(float) * S * 2 * (size_t)ffn);
    d->tmp = (float *)tt_aligned_alloc(sizeof(float) * S * (size_t)dim);
    d->scores = (float *)tt_aligned_alloc(sizeof(float) * S * (size_t)n_heads * max_len);
    if (!d->L || !d->h || !d->qkv || !d->att || !d->gu || !d->tmp || !d->scores) {
        free(d->L); free(d->h); free(d->qkv); free(d->att); free(d->gu); free(d->tmp); free(d->scores); free(d);
        return NULL;
    }
    return d;
}

void tt_dec_free(tt_dec *d) {
    if (!d) return;
    free(d->L); free(d->h); free(d->qkv); free(d->att); free(d->gu); free(d->tmp); free(d->scores); free(d);
}

/* returns 0, or -1 when a matrix does not have the shape the model needs */
int tt_dec_set_layer(tt_dec *d, int i, const float *ln1, const float *ln2, const float *q_norm, const float *k_norm,
                     const float *attn_sub, const float *ffn_sub, tt_ctx *qkv, tt_ctx *o, tt_ctx *gu, tt_ctx *down,
                     float *kc, float *vc) {
    if (!d || i < 0 || i >= d->n_layers || !ln1 || !ln2 || !kc || !vc) return -1;
    const int nq = d->n_heads * d->hd;
    if (!qkv || qkv->k != d->dim || qkv->n != nq + 2 * d->kv_heads * d->hd) return -1;
    if (!o || o->k != nq || o->n != d->dim) return -1;
    if (!gu || gu->k != d->dim || gu->n != 2 * d->ffn) return -1;
    if (!down || down->k != d->ffn || down->n != d->dim) return -1;
    d->L[i] = (tt_dec_layer){ln1, ln2, q_norm, k_norm, attn_sub, ffn_sub, qkv, o, gu, down, kc, vc};
    return 0;
}

typedef struct {
    const tt_dec *d;
    const float *kc, *vc;   /* the layer's [slots, KV, max_len, hd] */
    const int *slots, *pos; /* row r: slot slots[r], positions 0..pos[r] attended */
} tt_attn_job;

/* one query head of one row: scores, softmax, weighted sum of values (chunk = row * H + head) */
static void tt_attn_head(const void *arg, int job) {
    const tt_attn_job *A = (const tt_attn_job *)arg;
    const tt_dec *d = A->d;
    const int H = d->n_heads, r = job / H, h = job % H;
    const int hd = d->hd, n = A->pos[r] + 1, nqkv = (H + 2 * d->kv_heads) * hd;
    const int kvh = h / (H / d->kv_heads);
    const size_t slot_off = (size_t)A->slots[r] * d->kv_heads * d->max_len * hd;
    const float *q = d->qkv + (size_t)r * nqkv + (size_t)h * hd;
    const float *K = A->kc + slot_off + (size_t)kvh * d->max_len * hd;
    const float *V = A->vc + slot_off + (size_t)kvh * d->max_len * hd;
    float *sc = d->scores + (size_t)job * d->max_len;
    const float scale = 1.0f / sqrtf((float)hd);
    float mx = -INFINITY;
    for (int j = 0; j < n; j++) {
        const float *kj = K + (size_t)j * hd;
        float s = 0.0f;
        for (int e = 0; e < hd; e++) s += q[e] * kj[e];
        s *= scale;
        sc[j] = s;
        mx = s > mx ? s : mx;
    }
    float sum = 0.0f;
    for (int j = 0; j < n; j++) {
        sc[j] = expf(sc[j] - mx);
        sum += sc[j];
    }
    const float inv = 1.0f / sum;
    float *y = d->att + (size_t)r * H * hd + (size_t)h * hd;
    for (int e = 0; e < hd; e++) y[e] = 0.0f;
    for (int j = 0; j < n; j++) {
        const float p = sc[j] * inv;
        const float *vj = V + (size_t)j * hd;
        for (int e = 0; e < hd; e++) y[e] += p * vj[e];
    }
}

/* optional per-head RMSNorm, then RoPE at position pos, of `nh` heads starting at x */
static void tt_qk_prep(const tt_dec *d, float *x, int nh, const float *norm, int pos) {
    const int hd = d->hd, half = hd / 2;
    const float *cs = d->cos + (size_t)pos * hd, *sn = d->sin_signed + (size_t)pos * hd;
    float r[512];
    for (int h = 0; h < nh; h++) {
        float *v = x + (size_t)h * hd;
        if (norm) tt_rmsnorm(v, hd, norm, d->eps, v);
        for (int e = 0; e < hd; e++) r[e] = v[e] * cs[e] + v[(e + half) % hd] * sn[e];
        memcpy(v, r, sizeof(float) * (size_t)hd);
    }
}

static void tt_residual(float *x, const float *y, int n, float rs) {
    if (rs == 1.0f)
        for (int i = 0; i < n; i++) x[i] += y[i];
    else
        for (int i = 0; i < n; i++) x[i] += rs * y[i];
}

/* the engine's Linear over m rows (row stride ldx): optional parameter-free input RMSNorm, then
 * the kernel (one pass over the weights for all rows); out [m, n] */
static int tt_dec_linear(const tt_dec *d, tt_ctx *c, float *in, int m, int ldx, float *out, int nth) {
    if (d->input_norm)
        for (int r = 0; r < m; r++) tt_rmsnorm(in + (size_t)r * ldx, c->k, NULL, 1e-6f, in + (size_t)r * ldx);
    return tt_forward_f32_locked(c, in, m, ldx, out, nth);
}

/* x [m, dim] (the tokens' embeddings, float32) -> out [m, dim] = final-normed hidden states; row r
 * writes its keys/values at pos[r] of slot slots[r] (distinct slots). x is overwritten with the
 * residual streams. */
int tt_dec_step_batch(tt_dec *d, float *x, int m, const int *slots, const int *pos, float *out, int nth) {
    if (!d || m <= 0 || m > d->slots || !slots || !pos) return -2;
    if (d->hd > 512) return -2; /* tt_qk_prep's stack row */
    for (int r = 0; r < m; r++) {
        if (slots[r] < 0 || slots[r] >= d->slots || pos[r] < 0 || pos[r] >= d->max_len) return -2;
        for (int t = 0; t < r; t++)
            if (slots[t] == slots[r]) return -2;
    }
    for (int i = 0; i < d->n_layers; i++)
        if (!d->L[i].qkv) return -2;
    pthread_mutex_lock(&P.call_lock);
    tt_init_once();
    if (nth <= 0) nth = P.nthreads;
    const int H = d->n_heads, KV = d->kv_heads, hd = d->hd, D = d->dim, F = d->ffn;
    const int nq = H * hd, nkv = KV * hd, nqkv = nq + 2 * nkv;
    size_t work = 0; /* attention multiply-adds of this step */
    for (int r = 0; r < m; r++) work += (size_t)(pos[r] + 1) * hd * H;
    int rc = 0;
    for (int i = 0; i < d->n_layers && rc == 0; i++) {
        const tt_dec_layer *L = &d->L[i];
        /* attention */
        for (int r = 0; r < m; r++) tt_rmsnorm(x + (size_t)r * D, D, L->ln1, d->eps, d->h + (size_t)r * D);
        if ((rc = tt_dec_linear(d, L->qkv, d->h, m, D, d->qkv, nth))) break;
        for (int r = 0; r < m; r++) {
            float *row = d->qkv + (size_t)r * nqkv;
            tt_qk_prep(d, row, H, L->q_norm, pos[r]);
            tt_qk_prep(d, row + nq, KV, L->k_norm, pos[r]);
            const size_t slot_off = (size_t)slots[r] * KV * d->max_len * hd;
            for (int g = 0; g < KV; g++) {
                const size_t at = slot_off + ((size_t)g * d->max_len + pos[r]) * hd;
                memcpy(L->kc + at, row + nq + (size_t)g * hd, sizeof(float) * hd);
                memcpy(L->vc + at, row + nq + nkv + (size_t)g * hd, sizeof(float) * hd);
            }
        }
        tt_attn_job A = {.d = d, .kc = L->kc, .vc = L->vc, .slots = slots, .pos = pos};
        /* short contexts: the pool's wake-up costs more than the work */
        tt_parallel(tt_attn_head, &A, m * H, work >= 16384 ? nth : 1);
        if (L->attn_sub)
            for (int r = 0; r < m; r++) tt_rmsnorm(d->att + (size_t)r * nq, nq, L->attn_sub, d->eps, d->att + (size_t)r * nq);
        if ((rc = tt_dec_linear(d, L->o, d->att, m, nq, d->tmp, nth))) break;
        for (int r = 0; r < m; r++) tt_residual(x + (size_t)r * D, d->tmp + (size_t)r * D, D, d->rs);
        /* feed-forward */
        for (int r = 0; r < m; r++) tt_rmsnorm(x + (size_t)r * D, D, L->ln2, d->eps, d->h + (size_t)r * D);
        if ((rc = tt_dec_linear(d, L->gu, d->h, m, D, d->gu, nth))) break;
        for (int r = 0; r < m; r++) {
            float *g = d->gu + (size_t)r * 2 * F, *u = g + F;
            if (d->relu2)
                for (int e = 0; e < F; e++) { const float v = g[e] > 0.0f ? g[e] : 0.0f; g[e] = v * v * u[e]; }
            else
                for (int e = 0; e < F; e++) g[e] = g[e] / (1.0f + expf(-g[e])) * u[e];
            if (L->ffn_sub) tt_rmsnorm(g, F, L->ffn_sub, d->eps, g);
        }
        /* the activations sit in the first half of each [g | u] row: row stride 2F */
        if ((rc = tt_dec_linear(d, L->down, d->gu, m, 2 * F, d->tmp, nth))) break;
        for (int r = 0; r < m; r++) tt_residual(x + (size_t)r * D, d->tmp + (size_t)r * D, D, d->rs);
    }
    if (rc == 0)
        for (int r = 0; r < m; r++) tt_rmsnorm(x + (size_t)r * D, D, d->final_norm, d->eps, out + (size_t)r * D);
    pthread_mutex_unlock(&P.call_lock);
    return rc;
}

/* one sequence: x [dim] -> out [dim] (see tt_dec_step_batch) */
int tt_dec_step(tt_dec *d, float *x, int slot, int pos, float *out, int nth) {
    return tt_dec_step_batch(d, x, 1, &slot, &pos, out, nth);
}
