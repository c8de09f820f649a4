/*
 * Fused decode step: one token through every transformer layer in one C call, for one sequence or
 * for M sequences at once (continuous batching: each Linear runs once over the M rows, so the
 * weights are read once per step for all of them; attention runs per row on its own slot).
 * Prefill is the same computation with the rows being one sequence's consecutive positions: every
 * row's keys/values are written before any row attends, so row r sees positions 0..pos[r] (causal).
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
 * The Python side owns every buffer (weights, norms, KV cache, RoPE tables, the embedding table);
 * this file only keeps pointers to them and its own scratch space. The engine calls by token ids
 * (tt_dec_step_ids, tt_dec_forward_rows_ids): the rows' embeddings are gathered here.
 *
 * The KV cache holds float32, IEEE half (the engine's default, as llama.cpp's f16 cache) or q8
 * rows (d->kv): halves are rounded when written (round to nearest even, as torch's .half()) and
 * widened when read, so attention reads half the bytes; a q8 row is hd int8 levels and the row's
 * float32 scale (model/kv_cache.py quantize_q8, byte for byte: tt_to_q8), a quarter of float32's
 * bytes. The math stays float32.
 */
enum { TT_KV_F32, TT_KV_F16, TT_KV_Q8 };
/* what the embedding table holds (tt_dec_set_embed) */
enum { TT_EMB_F32, TT_EMB_F16, TT_EMB_BF16 };

/* profile sections (ns summed over calls): the four Linears of every layer, attention, the row
 * work between them (norms, RoPE, cache writes, residuals, activation), and the step count */
enum { TT_PROF_QKV, TT_PROF_O, TT_PROF_GU, TT_PROF_DOWN, TT_PROF_ATTN, TT_PROF_ROWS, TT_PROF_CALLS, TT_DEC_NPROF };

typedef struct {
    const float *ln1, *ln2, *q_norm, *k_norm, *attn_sub, *ffn_sub; /* optional ones may be NULL */
    tt_ctx *qkv, *o, *gu, *down;
    void *kc, *vc; /* [slots, KV, max_len, row] of float, IEEE half or q8 rows (tt_dec.kv) */
} tt_dec_layer;

typedef struct {
    int n_layers, dim, n_heads, kv_heads, hd, ffn, max_len, slots, rows; /* rows: scratch capacity */
    int isa; /* 1: AVX2 (+ F16C) attention / exp; 2: and the AVX-512 SiLU */
    int kv; /* TT_KV_F32 / TT_KV_F16 / TT_KV_Q8: what the KV cache holds */
    float eps, rs;
    int relu2, input_norm;
    const float *cos, *sin_signed; /* [max_len, hd]; sin with its first half negated */
    const float *final_norm;
    tt_dec_layer *L;
    float *h, *qkv, *att, *gu, *tmp, *scores; /* scratch, `rows` rows */
    /* the token embedding table [vocab, dim] (tt_dec_set_embed), and the rows a call by token ids
     * gathers from it into x (scratch, `rows` rows) */
    const void *emb;
    int emb_dtype; /* TT_EMB_* */
    long vocab;
    float *x;
    int prof;                                  /* 1: accumulate prof_ns (tt_dec_set_profile) */
    uint64_t prof_ns[TT_DEC_NPROF];
} tt_dec;

/* bytes of one cached key or value row (one position of one KV head) */
static inline size_t tt_kv_row(const tt_dec *d) {
    return d->kv == TT_KV_Q8 ? (size_t)d->hd + 4 : (size_t)d->hd * (d->kv == TT_KV_F16 ? 2 : 4);
}

/* a q8 cache row from hd floats: scale = absmax / 127, levels = round(x / scale) to nearest even
 * (nearbyintf in the default rounding mode, as torch.round), clamped to +-127; an all-zero row has
 * scale 0. The same IEEE operations per value as kv_cache.quantize_q8, so the same bytes. */
static void tt_to_q8(const float *x, int hd, int8_t *dst) {
    float mx = 0.0f;
    for (int e = 0; e < hd; e++) {
        const float a = fabsf(x[e]);
        mx = a > mx ? a : mx;
    }
    const float s = mx / 127.0f;
    for (int e = 0; e < hd; e++) {
        float q = s > 0.0f ? nearbyintf(x[e] / s) : 0.0f;
        q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
        dst[e] = (int8_t)q;
    }
    memcpy(dst + hd, &s, sizeof s);
}

#if TT_X86
/* tt_to_q8 8 values at a time (hd a multiple of 8): the same IEEE division and round-to-nearest-even
 * per value, so the same bytes; the scalar loop's nearbyintf was ~1 ms of a 700M step at 8 rows */
TT_AVX2_FN static void tt_to_q8_avx2(const float *x, int hd, int8_t *dst) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 vm = _mm256_setzero_ps();
    for (int e = 0; e < hd; e += 8) vm = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + e)), vm);
    float m8[8], mx = 0.0f;
    _mm256_storeu_ps(m8, vm);
    for (int i = 0; i < 8; i++) mx = m8[i] > mx ? m8[i] : mx;
    const float s = mx / 127.0f;
    if (s > 0.0f) {
        const __m256 vs = _mm256_set1_ps(s), hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
        for (int e = 0; e < hd; e += 8) {
            __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + e), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            q = _mm256_max_ps(_mm256_min_ps(q, hi), lo);
            const __m256i i = _mm256_cvtps_epi32(q);
            const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
            _mm_storel_epi64((__m128i *)(void *)(dst + e), _mm_packs_epi16(w, w));
        }
    } else {
        memset(dst, 0, (size_t)hd);
    }
    memcpy(dst + hd, &s, sizeof s);
}
#endif

static void tt_to_q8_row(const float *x, int hd, int8_t *dst, int isa) {
#if TT_X86
    if (isa && hd % 8 == 0) { tt_to_q8_avx2(x, hd, dst); return; }
#endif
    (void)isa;
    tt_to_q8(x, hd, dst);
}

/* test entry: n rows of hd floats into q8 rows of hd + 4 bytes (isa 0: portable, 1: AVX2 when the
 * CPU has it); -1 on bad arguments */
int tt_f32_to_q8_rows(const float *x, int8_t *dst, long n, int hd, int isa) {
    if (!x || !dst || n < 0 || hd <= 0 || hd % 4) return -1;
#if TT_X86
    isa = isa && tt_cpu_has_avx2();
#endif
    for (long r = 0; r < n; r++) tt_to_q8_row(x + (size_t)r * hd, hd, dst + (size_t)r * ((size_t)hd + 4), isa);
    return 0;
}

static inline float tt_q8_scale(const int8_t *row, int hd) {
    float s;
    memcpy(&s, row + hd, sizeof s);
    return s;
}

#if TT_X86
/* sum of squares in 32 float32 lanes: the one-accumulator loop waited on the add's latency (a
 * 1536-wide norm ~6k cycles; prefill runs ~50 of them per token) */
TT_AVX2_FN static float tt_sumsq_avx2(const float *x, int n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
        const __m256 v2 = _mm256_loadu_ps(x + i + 16), v3 = _mm256_loadu_ps(x + i + 24);
        a0 = _mm256_add_ps(a0, _mm256_mul_ps(v0, v0));
        a1 = _mm256_add_ps(a1, _mm256_mul_ps(v1, v1));
        a2 = _mm256_add_ps(a2, _mm256_mul_ps(v2, v2));
        a3 = _mm256_add_ps(a3, _mm256_mul_ps(v3, v3));
    }
    const __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    float ss = _mm_cvtss_f32(h);
    for (; i < n; i++) ss += x[i] * x[i];
    return ss;
}
#endif

/* isa: 1 = the AVX2 sum of squares (another summation order: within float32 rounding of the other) */
static void tt_rmsnorm(const float *x, int n, const float *w, float eps, float *out, int isa) {
    /* torch.rms_norm on CPU accumulates the mean of squares in float32 too */
    float ss = 0.0f;
#if TT_X86
    if (isa) ss = tt_sumsq_avx2(x, n);
    else
#endif
        for (int i = 0; i < n; i++) ss += x[i] * x[i];
    (void)isa;
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    if (w)
        for (int i = 0; i < n; i++) out[i] = x[i] * r * w[i];
    else
        for (int i = 0; i < n; i++) out[i] = x[i] * r;
}

/* rows: how many rows one call may carry (>= slots; prefill chunks up to it) */
tt_dec *tt_dec_new(int n_layers, int dim, int n_heads, int kv_heads, int hd, int ffn, int max_len, int slots,
                   int rows, float eps, float rs, int relu2, int input_norm, const float *cos,
                   const float *sin_signed, const float *final_norm, int kv) {
    if (kv < TT_KV_F32 || kv > TT_KV_Q8 || (kv == TT_KV_Q8 && hd % 4) || n_layers <= 0 || dim <= 0 || n_heads <= 0 ||
        kv_heads <= 0 || n_heads % kv_heads || hd <= 0 || hd % 2 || ffn <= 0 || max_len <= 0 || slots <= 0 ||
        rows < slots || rows > 1024)
        return NULL;
    tt_dec *d = (tt_dec *)calloc(1, sizeof(tt_dec));
    if (!d) return NULL;
    *d = (tt_dec){.n_layers = n_layers, .dim = dim, .n_heads = n_heads, .kv_heads = kv_heads, .hd = hd,
                  .ffn = ffn, .max_len = max_len, .slots = slots, .rows = rows, .isa = tt_cpu_has_f16c(), .kv = kv, .eps = eps, .rs = rs, .relu2 = relu2,
                  .input_norm = input_norm, .cos = cos, .sin_signed = sin_signed, .final_norm = final_norm};
    const int nq = n_heads * hd, nqkv = (n_heads + 2 * kv_heads) * hd;
    int wide = dim > nq ? dim : nq;
    wide = wide > ffn ? wide : ffn;
    d->L = (tt_dec_layer *)calloc((size_t)n_layers, sizeof(tt_dec_layer));
    const size_t S = (size_t)rows;
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
    free(d->L); free(d->h); free(d->qkv); free(d->att); free(d->gu); free(d->tmp); free(d->scores); free(d->x);
    free(d);
}

/* the token embedding table [vocab, dim], row-major, in float32, IEEE half or bfloat16 (dtype
 * TT_EMB_*), for the calls by token ids; the caller keeps it alive. 0, or -1 (bad arguments, or no
 * memory for the rows' scratch) */
int tt_dec_set_embed(tt_dec *d, const void *table, int dtype, long vocab) {
    if (!d || !table || dtype < TT_EMB_F32 || dtype > TT_EMB_BF16 || vocab <= 0) return -1;
    if (!d->x && !(d->x = (float *)tt_aligned_alloc(sizeof(float) * (size_t)d->rows * (size_t)d->dim))) return -1;
    d->emb = table;
    d->emb_dtype = dtype;
    d->vocab = vocab;
    return 0;
}

#if TT_X86
TT_F16C_FN static void tt_half_row_f16c(const uint16_t *h, float *x, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(h + i))));
    for (; i < n; i++) x[i] = tt_half_to_float(h[i]);
}
#endif

/* x [m, dim] = float32 rows ids[0..m) of the embedding table (every conversion exact, as torch's
 * .float()): the step's input without a torch gather, cast and copy before every call (~0.1 ms of
 * cold torch ops after a step has streamed the weights through the caches) */
static void tt_embed_rows(const tt_dec *d, const int *ids, int m, float *x) {
    const int D = d->dim;
    for (int r = 0; r < m; r++) {
        const size_t at = (size_t)ids[r] * (size_t)D;
        float *row = x + (size_t)r * D;
        if (d->emb_dtype == TT_EMB_F32) {
            memcpy(row, (const float *)d->emb + at, sizeof(float) * (size_t)D);
        } else if (d->emb_dtype == TT_EMB_F16) {
            const uint16_t *h = (const uint16_t *)d->emb + at;
#if TT_X86
            if (d->isa) {
                tt_half_row_f16c(h, row, D);
                continue;
            }
#endif
            for (int e = 0; e < D; e++) row[e] = tt_half_to_float(h[e]);
        } else {
            const uint16_t *b = (const uint16_t *)d->emb + at;
            for (int e = 0; e < D; e++) {
                const uint32_t bits = (uint32_t)b[e] << 16;
                memcpy(row + e, &bits, sizeof(float));
            }
        }
    }
}

/* returns 0, or -1 when a matrix does not have the shape the model needs */
int tt_dec_set_layer(tt_dec *d, int i, const float *ln1, const float *ln2, const float *q_norm, const float *k_norm,
                     const float *attn_sub, const float *ffn_sub, tt_ctx *qkv, tt_ctx *o, tt_ctx *gu, tt_ctx *down,
                     void *kc, void *vc) {
    if (!d || i < 0 || i >= d->n_layers || !ln1 || !ln2 || !kc || !vc) return -1;
    const int nq = d->n_heads * d->hd;
    if (!qkv || qkv->k != d->dim || qkv->n != nq + 2 * d->kv_heads * d->hd) return -1;
    if (!o || o->k != nq || o->n != d->dim) return -1;
    if (!gu || gu->k != d->dim || gu->n != 2 * d->ffn) return -1;
    if (!down || down->k != d->ffn || down->n != d->dim) return -1;
    d->L[i] = (tt_dec_layer){ln1, ln2, q_norm, k_norm, attn_sub, ffn_sub, qkv, o, gu, down, kc, vc};
    /* TRITLM_KERNEL=portable reaches the row work and attention too; the AVX-512 routes (avx512,
     * amx) also take the 16-lane SiLU (2), the others the AVX2 code (1) */
    d->isa = d->isa && qkv->isa ? (qkv->isa >= 2 ? 2 : 1) : 0;
    return 0;
}

typedef struct {
    const tt_dec *d;
    const void *kc, *vc;    /* the layer's [slots, KV, max_len, row] (d->kv) */
    const int *slots, *pos; /* row r: slot slots[r], positions 0..pos[r] attended */
    /* a thread's next job is about `ahead` jobs on (the pool's threads claim jobs in turn, or
     * chunks of `per` consecutive jobs: the next of the chunk): its keys and values are
     * prefetched while this one runs (0: none) */
    int ahead, njobs, per;
    /* with per == n_heads (a chunk is one row's heads), after them: the row through this sub-norm
     * (attn_sub; NULL: none), then quantised into this Linear's workspace (NULL: not) */
    const float *sub;
    tt_ctx *qc;
} tt_attn_job;

#if TT_X86
/* exp(x) for 8 floats: Cephes' range reduction and degree-5 polynomial (within ~2 ulp of expf);
 * x is clamped to [-87, 88.37], so results stay normal floats or reach FLT_MAX */
TT_AVX2_INLINE __m256 tt_exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.3762626647949f));
    const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* 8 floats of a KV row at element i: float32, or halves widened by F16C (f16 is a constant at
 * every call: the compiler keeps one load) */
TT_F16C_INLINE __m256 tt_ld8(const void *p, size_t i, const int f16) {
    return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)))
               : _mm256_loadu_ps((const float *)p + i);
}

TT_AVX2_INLINE float tt_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* y[e0 .. e0 + 8 NC) = inv * sum_j sc[j] V[j, .]: NC value columns of 8 per pass over the positions
 * (NC <= 12 accumulators: a 96-wide head in one pass, where a 64 + 32 split walked the cache twice
 * and cost ~30% more at 1000 positions) */
TT_F16C_INLINE void tt_wsum_avx2(const float *sc, const void *V, int n, int hd, int e0, int NC, float inv, float *y,
                                  const int f16) {
    __m256 acc[12];
    for (int c = 0; c < NC; c++) acc[c] = _mm256_setzero_ps();
    for (int jj = 0; jj < n; jj++) {
        const __m256 p = _mm256_set1_ps(sc[jj]);
        const size_t vj = (size_t)jj * hd + e0;
        for (int c = 0; c < NC; c++) acc[c] = _mm256_fmadd_ps(p, tt_ld8(V, vj + 8 * c, f16), acc[c]);
    }
    for (int c = 0; c < NC; c++) _mm256_storeu_ps(y + e0 + 8 * c, _mm256_mul_ps(acc[c], _mm256_set1_ps(inv)));
}

/* sc[j] = exp(sc[j] - mx) over n scores (mx their maximum); returns 1 / their sum */
TT_AVX2_INLINE float tt_softmax_avx2(float *sc, int n, float mx) {
    const __m256 vmx = _mm256_set1_ps(mx);
    __m256 vsum = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 p = tt_exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + j), vmx));
        _mm256_storeu_ps(sc + j, p);
        vsum = _mm256_add_ps(vsum, p);
    }
    float sum = tt_hsum8(vsum);
    for (; j < n; j++) { sc[j] = expf(sc[j] - mx); sum += sc[j]; }
    return 1.0f / sum;
}

/* attention of one query row over n cached positions, hd a multiple of 8. Every sum keeps the
 * order of the one-chain loops (bit-identical to them); what changed is the number of chains in
 * flight: 4 positions per pass for the scores and up to 12 value columns per pass for the weighted
 * sum, where one FMA chain per sum had left the loops waiting on FMA latency (~3x slower). */
TT_F16C_INLINE void tt_attend_avx2(const float *q, const void *K, const void *V, int n, int hd, float scale,
                                    float *sc, float *y, const int f16, const char *pk, const char *pv, size_t pn) {
    float mx = -INFINITY;
    int j0 = 0;
    const size_t row = (size_t)hd * (f16 ? 2 : 4);
    for (; j0 + 4 <= n; j0 += 4) {
        const size_t k0 = (size_t)j0 * hd;
        /* the next job's keys and values (pn bytes each) into L2, as fast as this job's keys are
         * read: one job's few KB are too short a stream for the hardware prefetcher, and at 8
         * sequences of ~60 positions (700M) attention was a quarter of the decode step, reading its
         * cache at ~14 GB/s; this took it from ~5.0-5.4 to ~3.6 ms */
        if (pk)
            for (size_t o = (size_t)j0 * row; o < (size_t)(j0 + 4) * row && o < pn; o += 64) {
                _mm_prefetch(pk + o, _MM_HINT_T1);
                _mm_prefetch(pv + o, _MM_HINT_T1);
            }
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int e = 0; e < hd; e += 8) {
            const __m256 qv = _mm256_loadu_ps(q + e);
            a0 = _mm256_fmadd_ps(qv, tt_ld8(K, k0 + e, f16), a0);
            a1 = _mm256_fmadd_ps(qv, tt_ld8(K, k0 + hd + e, f16), a1);
            a2 = _mm256_fmadd_ps(qv, tt_ld8(K, k0 + 2 * hd + e, f16), a2);
            a3 = _mm256_fmadd_ps(qv, tt_ld8(K, k0 + 3 * hd + e, f16), a3);
        }
        const float s0 = tt_hsum8(a0) * scale, s1 = tt_hsum8(a1) * scale;
        const float s2 = tt_hsum8(a2) * scale, s3 = tt_hsum8(a3) * scale;
        sc[j0] = s0; sc[j0 + 1] = s1; sc[j0 + 2] = s2; sc[j0 + 3] = s3;
        mx = s0 > mx ? s0 : mx; mx = s1 > mx ? s1 : mx; mx = s2 > mx ? s2 : mx; mx = s3 > mx ? s3 : mx;
    }
    for (int j = j0; j < n; j++) {
        const size_t kj = (size_t)j * hd;
        __m256 a = _mm256_setzero_ps();
        for (int e = 0; e < hd; e += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + e), tt_ld8(K, kj + e, f16), a);
        const float s = tt_hsum8(a) * scale;
        sc[j] = s;
        mx = s > mx ? s : mx;
    }
    const float inv = tt_softmax_avx2(sc, n, mx);
    int e0 = 0;
    for (; e0 + 96 <= hd; e0 += 96) tt_wsum_avx2(sc, V, n, hd, e0, 12, inv, y, f16);
    if (e0 + 64 <= hd) { tt_wsum_avx2(sc, V, n, hd, e0, 8, inv, y, f16); e0 += 64; }
    if (e0 + 32 <= hd) { tt_wsum_avx2(sc, V, n, hd, e0, 4, inv, y, f16); e0 += 32; }
    if (e0 + 16 <= hd) { tt_wsum_avx2(sc, V, n, hd, e0, 2, inv, y, f16); e0 += 16; }
    if (e0 < hd) tt_wsum_avx2(sc, V, n, hd, e0, 1, inv, y, f16);
}

/* 8 levels of a q8 row widened to float */
TT_AVX2_INLINE __m256 tt_ld8_q8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)p)));
}

/* y[e0 .. e0 + 8 NC) = inv * sum_j sc[j] s_j V[j, .] over q8 rows (s_j: row j's scale) */
TT_AVX2_INLINE void tt_wsum_q8_avx2(const float *sc, const int8_t *V, int n, int hd, int e0, int NC, float inv, float *y) {
    const size_t row = (size_t)hd + 4;
    __m256 acc[12];
    for (int c = 0; c < NC; c++) acc[c] = _mm256_setzero_ps();
    for (int j = 0; j < n; j++) {
        const int8_t *vj = V + (size_t)j * row;
        const __m256 p = _mm256_set1_ps(sc[j] * tt_q8_scale(vj, hd));
        for (int c = 0; c < NC; c++) acc[c] = _mm256_fmadd_ps(p, tt_ld8_q8(vj + e0 + 8 * c), acc[c]);
    }
    for (int c = 0; c < NC; c++) _mm256_storeu_ps(y + e0 + 8 * c, _mm256_mul_ps(acc[c], _mm256_set1_ps(inv)));
}

/* tt_attend_avx2 over q8 rows: a key's dot with the query runs on its levels and takes the row's
 * scale once; a value's scale folds into its softmax weight. Half the bytes of the fp16 cache,
 * which 8 sequences' attention spends most of its time reading (700M, ~50 positions: ~3.3 ->
 * ~2.3 ms a step when the cache comes from memory). */
TT_AVX2_FN static void tt_attend_avx2_q8(const float *q, const int8_t *K, const int8_t *V, int n, int hd, float scale,
                                         float *sc, float *y, const char *pk, const char *pv, size_t pn) {
    const size_t row = (size_t)hd + 4;
    float mx = -INFINITY;
    int j0 = 0;
    for (; j0 + 4 <= n; j0 += 4) {
        if (pk) /* the next job's rows into L2, as tt_attend_avx2 */
            for (size_t o = (size_t)j0 * row; o < (size_t)(j0 + 4) * row && o < pn; o += 64) {
                _mm_prefetch(pk + o, _MM_HINT_T1);
                _mm_prefetch(pv + o, _MM_HINT_T1);
            }
        const int8_t *k0 = K + (size_t)j0 * row;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int e = 0; e < hd; e += 8) {
            const __m256 qv = _mm256_loadu_ps(q + e);
            a0 = _mm256_fmadd_ps(qv, tt_ld8_q8(k0 + e), a0);
            a1 = _mm256_fmadd_ps(qv, tt_ld8_q8(k0 + row + e), a1);
            a2 = _mm256_fmadd_ps(qv, tt_ld8_q8(k0 + 2 * row + e), a2);
            a3 = _mm256_fmadd_ps(qv, tt_ld8_q8(k0 + 3 * row + e), a3);
        }
        const float s0 = tt_hsum8(a0) * tt_q8_scale(k0, hd) * scale;
        const float s1 = tt_hsum8(a1) * tt_q8_scale(k0 + row, hd) * scale;
        const float s2 = tt_hsum8(a2) * tt_q8_scale(k0 + 2 * row, hd) * scale;
        const float s3 = tt_hsum8(a3) * tt_q8_scale(k0 + 3 * row, hd) * scale;
        sc[j0] = s0; sc[j0 + 1] = s1; sc[j0 + 2] = s2; sc[j0 + 3] = s3;
        mx = s0 > mx ? s0 : mx; mx = s1 > mx ? s1 : mx; mx = s2 > mx ? s2 : mx; mx = s3 > mx ? s3 : mx;
    }
    for (int j = j0; j < n; j++) {
        const int8_t *kj = K + (size_t)j * row;
        __m256 a = _mm256_setzero_ps();
        for (int e = 0; e < hd; e += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + e), tt_ld8_q8(kj + e), a);
        const float s = tt_hsum8(a) * tt_q8_scale(kj, hd) * scale;
        sc[j] = s;
        mx = s > mx ? s : mx;
    }
    const float inv = tt_softmax_avx2(sc, n, mx);
    int e0 = 0;
    for (; e0 + 96 <= hd; e0 += 96) tt_wsum_q8_avx2(sc, V, n, hd, e0, 12, inv, y);
    if (e0 + 64 <= hd) { tt_wsum_q8_avx2(sc, V, n, hd, e0, 8, inv, y); e0 += 64; }
    if (e0 + 32 <= hd) { tt_wsum_q8_avx2(sc, V, n, hd, e0, 4, inv, y); e0 += 32; }
    if (e0 + 16 <= hd) { tt_wsum_q8_avx2(sc, V, n, hd, e0, 2, inv, y); e0 += 16; }
    if (e0 < hd) tt_wsum_q8_avx2(sc, V, n, hd, e0, 1, inv, y);
}

/* the two caches' routes, each compiled with its load */
TT_F16C_FN static void tt_attend_avx2_f32(const float *q, const void *K, const void *V, int n, int hd, float scale,
                                          float *sc, float *y, const char *pk, const char *pv, size_t pn) {
    tt_attend_avx2(q, K, V, n, hd, scale, sc, y, 0, pk, pv, pn);
}
TT_F16C_FN static void tt_attend_avx2_f16(const float *q, const void *K, const void *V, int n, int hd, float scale,
                                          float *sc, float *y, const char *pk, const char *pv, size_t pn) {
    tt_attend_avx2(q, K, V, n, hd, scale, sc, y, 1, pk, pv, pn);
}


/* a = silu(g) * u over n floats */
TT_AVX2_FN static void tt_silu_mul_avx2(float *g, const float *u, int n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    int e = 0;
    for (; e + 8 <= n; e += 8) {
        const __m256 v = _mm256_loadu_ps(g + e);
        const __m256 den = _mm256_add_ps(one, tt_exp8(_mm256_sub_ps(_mm256_setzero_ps(), v)));
        _mm256_storeu_ps(g + e, _mm256_mul_ps(_mm256_div_ps(v, den), _mm256_loadu_ps(u + e)));
    }
    for (; e < n; e++) g[e] = g[e] / (1.0f + expf(-g[e])) * u[e];
}

#define TT_AVX512_ROW_FN __attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma")))
/* tt_exp8 on 16 lanes: the same operations per lane (bit-identical) */
static inline __attribute__((always_inline, target("avx512f,avx512dq,avx512vl,avx2,fma"))) __m512 tt_exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.3762626647949f));
    const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

/* tt_silu_mul_avx2 on 16 lanes (bit-identical): a 700M prompt's SiLU pass was bound by the
 * polynomial and the division (~9 ms of a 128-token prefill) */
TT_AVX512_ROW_FN static void tt_silu_mul_avx512(float *g, const float *u, int n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    int e = 0;
    for (; e + 16 <= n; e += 16) {
        const __m512 v = _mm512_loadu_ps(g + e);
        const __m512 den = _mm512_add_ps(one, tt_exp16(_mm512_sub_ps(_mm512_setzero_ps(), v)));
        _mm512_storeu_ps(g + e, _mm512_mul_ps(_mm512_div_ps(v, den), _mm512_loadu_ps(u + e)));
    }
    if (e < n) tt_silu_mul_avx2(g + e, u + e, n - e);
}
#endif

/* element e of cached row j (hd values a row): float, half, or a q8 level times its row's scale */
static inline float tt_kv_at(const void *p, size_t j, int e, int hd, int kv) {
    if (kv == TT_KV_Q8) {
        const int8_t *r = (const int8_t *)p + j * ((size_t)hd + 4);
        return (float)r[e] * tt_q8_scale(r, hd);
    }
    const size_t i = j * (size_t)hd + (size_t)e;
    return kv == TT_KV_F16 ? tt_half_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static void tt_attend_portable(const float *q, const void *K, const void *V, int n, int hd, float scale,
                               float *sc, float *y, int kv) {
    float mx = -INFINITY;
    for (int j = 0; j < n; j++) {
        float s = 0.0f;
        for (int e = 0; e < hd; e++) s += q[e] * tt_kv_at(K, (size_t)j, e, hd, kv);
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
    for (int e = 0; e < hd; e++) y[e] = 0.0f;
    for (int j = 0; j < n; j++) {
        const float p = sc[j] * inv;
        for (int e = 0; e < hd; e++) y[e] += p * tt_kv_at(V, (size_t)j, e, hd, kv);
    }
}

/* one query head of one row: scores, softmax, weighted sum of values (chunk = row * H + head) */
static void tt_attn_head(const void *arg, int job) {
    const tt_attn_job *A = (const tt_attn_job *)arg;
    const tt_dec *d = A->d;
    const int H = d->n_heads, r = job / H, h = job % H;
    const int hd = d->hd, n = A->pos[r] + 1, nqkv = (H + 2 * d->kv_heads) * hd;
    const int kvh = h / (H / d->kv_heads);
    const size_t row = tt_kv_row(d);
    const size_t off = ((size_t)A->slots[r] * d->kv_heads + (size_t)kvh) * d->max_len * row; /* bytes */
    const float *q = d->qkv + (size_t)r * nqkv + (size_t)h * hd;
    const void *K = (const char *)A->kc + off;
    const void *V = (const char *)A->vc + off;
    float *sc = d->scores + (size_t)job * d->max_len;
    float *y = d->att + (size_t)r * H * hd + (size_t)h * hd;
    const float scale = 1.0f / sqrtf((float)hd);
#if TT_X86
    if (d->isa && hd % 8 == 0) {
        const char *pk = NULL, *pv = NULL;
        size_t pn = 0;
        const int nj = job + A->ahead;
        if (A->ahead > 0 && nj < A->njobs) {
            const int r2 = nj / H, h2 = nj % H;
            const size_t o2 = ((size_t)A->slots[r2] * d->kv_heads + (size_t)(h2 / (H / d->kv_heads))) * d->max_len * row;
            pk = (const char *)A->kc + o2;
            pv = (const char *)A->vc + o2;
            pn = (size_t)(A->pos[r2] + 1) * row;
        }
        if (d->kv == TT_KV_Q8) tt_attend_avx2_q8(q, (const int8_t *)K, (const int8_t *)V, n, hd, scale, sc, y, pk, pv, pn);
        else (d->kv == TT_KV_F16 ? tt_attend_avx2_f16 : tt_attend_avx2_f32)(q, K, V, n, hd, scale, sc, y, pk, pv, pn);
        return;
    }
#endif
    tt_attend_portable(q, K, V, n, hd, scale, sc, y, d->kv);
}

/* jobs chunk * per .. chunk * per + per - 1 of tt_attn_head */
static void tt_attn_chunk(const void *arg, int chunk) {
    const tt_attn_job *A = (const tt_attn_job *)arg;
    const int j1 = (chunk + 1) * A->per < A->njobs ? (chunk + 1) * A->per : A->njobs;
    for (int j = chunk * A->per; j < j1; j++) tt_attn_head(arg, j);
    if (A->sub || A->qc) { /* the row's last head: its row work here saves the pool a round trip */
        const tt_dec *d = A->d;
        const int nq = d->n_heads * d->hd;
        float *y = d->att + (size_t)chunk * nq;
        if (A->sub) tt_rmsnorm(y, nq, A->sub, d->eps, y, d->isa);
        if (A->qc) tt_quant_row_into(A->qc, y, chunk);
    }
}

/* optional per-head RMSNorm, then RoPE at position pos, of `nh` heads starting at x */
#if TT_X86
/* rotate_half of one head, 8 lanes at a time: the same multiplies and add per element as the
 * scalar loops (bit-identical); half a multiple of 8 */
TT_AVX2_FN static void tt_rope_avx2(float *v, const float *cs, const float *sn, int half) {
    for (int e = 0; e < half; e += 8) {
        const __m256 a = _mm256_loadu_ps(v + e), b = _mm256_loadu_ps(v + e + half);
        const __m256 lo = _mm256_add_ps(_mm256_mul_ps(a, _mm256_loadu_ps(cs + e)), _mm256_mul_ps(b, _mm256_loadu_ps(sn + e)));
        const __m256 hi = _mm256_add_ps(_mm256_mul_ps(b, _mm256_loadu_ps(cs + e + half)),
                                        _mm256_mul_ps(a, _mm256_loadu_ps(sn + e + half)));
        _mm256_storeu_ps(v + e, lo);
        _mm256_storeu_ps(v + e + half, hi);
    }
}
#endif

static void tt_qk_prep(const tt_dec *d, float *x, int nh, const float *norm, int pos) {
    const int hd = d->hd, half = hd / 2;
    const float *cs = d->cos + (size_t)pos * hd, *sn = d->sin_signed + (size_t)pos * hd;
    float r[512];
    for (int h = 0; h < nh; h++) {
        float *v = x + (size_t)h * hd;
        if (norm) tt_rmsnorm(v, hd, norm, d->eps, v, d->isa);
#if TT_X86
        if (d->isa && half % 8 == 0) { tt_rope_avx2(v, cs, sn, half); continue; }
#endif
        /* rotate_half (hd is even: tt_dec_new): e's partner is e + half, then e - half */
        for (int e = 0; e < half; e++) r[e] = v[e] * cs[e] + v[e + half] * sn[e];
        for (int e = half; e < hd; e++) r[e] = v[e] * cs[e] + v[e - half] * sn[e];
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
 * the kernel (one pass over the weights for all rows); out [m, n]. q: the stage that wrote the
 * rows also quantised them into c's workspace (never with the input norm, which comes between) */
static int tt_dec_linear(const tt_dec *d, tt_ctx *c, int q, float *in, int m, int ldx, float *out, int nth) {
    if (q) {
        tt_forward_quantised_locked(c, m, out, nth);
        return 0;
    }
    if (d->input_norm)
        for (int r = 0; r < m; r++) tt_rmsnorm(in + (size_t)r * ldx, c->k, NULL, 1e-6f, in + (size_t)r * ldx, d->isa);
    return tt_forward_f32_locked(c, in, m, ldx, out, nth);
}

/* the per-row work between the Linears, over row chunks of the thread pool (prefill has many rows) */
enum { TT_ROW_LN1, TT_ROW_QKV, TT_ROW_ATTN_SUB, TT_ROW_ACT, TT_ROW_RESID_LN2, TT_ROW_RESID_NEXT };

typedef struct {
    const tt_dec *d;
    const tt_dec_layer *L;
    int stage, m, per; /* per: rows per chunk */
    float *x, *out;
    const int *slots, *pos;
    tt_ctx *qc; /* non-NULL: each row's output also quantised into this Linear's workspace */
} tt_rows_job;

#if TT_X86
/* tt_to_half_f16c with non-temporal stores (n a multiple of 16, h 32-byte aligned): a step's new
 * key / value rows go to positions this step has not read, and write-allocating their lines (a
 * read from memory per line) had made the row stage wait on memory */
TT_F16C_FN static void tt_to_half_stream(const float *x, uint16_t *h, int n) {
    for (int i = 0; i < n; i += 16) {
        const __m128i lo = _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m128i hi = _mm256_cvtps_ph(_mm256_loadu_ps(x + i + 8), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_stream_si256((__m256i *)(void *)(h + i), _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1));
    }
}
#endif

static void tt_rows_task(const void *arg, int chunk) {
    const tt_rows_job *R = (const tt_rows_job *)arg;
    const tt_dec *d = R->d;
    const tt_dec_layer *L = R->L;
    const int H = d->n_heads, KV = d->kv_heads, hd = d->hd, D = d->dim, F = d->ffn;
    const int nq = H * hd, nkv = KV * hd, nqkv = nq + 2 * nkv;
    const int r1 = (chunk + 1) * R->per < R->m ? (chunk + 1) * R->per : R->m;
    for (int r = chunk * R->per; r < r1; r++) {
        float *x = R->x + (size_t)r * D;
        switch (R->stage) {
        case TT_ROW_LN1: tt_rmsnorm(x, D, L->ln1, d->eps, d->h + (size_t)r * D, d->isa); break;
        /* a residual and the norm after it in one pass: one round trip of the pool fewer (each
         * is a few us, ~100 a step; with the quantising below, 125M at 8 sequences 2.13 -> 1.99 ms) */
        case TT_ROW_RESID_LN2:
            tt_residual(x, d->tmp + (size_t)r * D, D, d->rs);
            tt_rmsnorm(x, D, L->ln2, d->eps, d->h + (size_t)r * D, d->isa);
            break;
        case TT_ROW_RESID_NEXT: /* the layer's last residual, then the next layer's LN1 (or the final norm) */
            tt_residual(x, d->tmp + (size_t)r * D, D, d->rs);
            if (L + 1 < d->L + d->n_layers) tt_rmsnorm(x, D, L[1].ln1, d->eps, d->h + (size_t)r * D, d->isa);
            else tt_rmsnorm(x, D, d->final_norm, d->eps, R->out + (size_t)r * D, d->isa);
            break;
        case TT_ROW_ATTN_SUB: tt_rmsnorm(d->att + (size_t)r * nq, nq, L->attn_sub, d->eps, d->att + (size_t)r * nq, d->isa); break;
        case TT_ROW_QKV: {
            float *row = d->qkv + (size_t)r * nqkv;
            tt_qk_prep(d, row, H, L->q_norm, R->pos[r]);
            tt_qk_prep(d, row + nq, KV, L->k_norm, R->pos[r]);
            const size_t kvrow = tt_kv_row(d), slot_off = (size_t)R->slots[r] * KV * d->max_len * kvrow;
            for (int g = 0; g < KV; g++) {
                const size_t at = slot_off + ((size_t)g * d->max_len + R->pos[r]) * kvrow; /* bytes */
                const float *k = row + nq + (size_t)g * hd, *v = row + nq + nkv + (size_t)g * hd;
                char *kd = (char *)L->kc + at, *vd = (char *)L->vc + at;
                if (d->kv == TT_KV_F16) {
#if TT_X86
                    if (d->isa && hd % 16 == 0 && ((uintptr_t)kd | (uintptr_t)vd) % 32 == 0) {
                        tt_to_half_stream(k, (uint16_t *)(void *)kd, hd);
                        tt_to_half_stream(v, (uint16_t *)(void *)vd, hd);
                        continue;
                    }
#endif
                    tt_to_half(k, (uint16_t *)(void *)kd, hd, d->isa);
                    tt_to_half(v, (uint16_t *)(void *)vd, hd, d->isa);
                } else if (d->kv == TT_KV_Q8) {
                    tt_to_q8_row(k, hd, (int8_t *)kd, d->isa);
                    tt_to_q8_row(v, hd, (int8_t *)vd, d->isa);
                } else {
                    memcpy(kd, k, sizeof(float) * hd);
                    memcpy(vd, v, sizeof(float) * hd);
                }
            }
            break;
        }
        case TT_ROW_ACT: {
            float *g = d->gu + (size_t)r * 2 * F, *u = g + F;
            if (d->relu2) {
                for (int e = 0; e < F; e++) { const float v = g[e] > 0.0f ? g[e] : 0.0f; g[e] = v * v * u[e]; }
            } else {
#if TT_X86
                if (d->isa == 2) tt_silu_mul_avx512(g, u, F);
                else if (d->isa) tt_silu_mul_avx2(g, u, F);
                else
#endif
                    for (int e = 0; e < F; e++) g[e] = g[e] / (1.0f + expf(-g[e])) * u[e];
            }
            if (L->ffn_sub) tt_rmsnorm(g, F, L->ffn_sub, d->eps, g, d->isa);
            break;
        }
        }
        if (R->qc) {
            const float *y = R->stage == TT_ROW_ACT ? d->gu + (size_t)r * 2 * F
                             : R->stage == TT_ROW_ATTN_SUB ? d->att + (size_t)r * nq : d->h + (size_t)r * D;
            tt_quant_row_into(R->qc, y, r);
        }
    }
#if TT_X86
    /* the streamed cache rows are weakly ordered: visible to the attention's threads before the
     * pool's job counter says this chunk is done */
    if (R->stage == TT_ROW_QKV) _mm_sfence();
#endif
}

static void tt_rows(const tt_dec *d, const tt_dec_layer *L, int stage, int m, float *x, float *out,
                    const int *slots, const int *pos, int nth, tt_ctx *qc) {
    /* a few rows (decode): the pool's wake-up costs more than the work */
    const int th = m >= 8 ? nth : 1;
    const int per = (m + 2 * th - 1) / (2 * th);
    tt_rows_job R = {.d = d, .L = L, .stage = stage, .m = m, .per = per, .x = x, .out = out, .slots = slots, .pos = pos,
                     .qc = qc};
    tt_parallel(tt_rows_task, &R, (m + per - 1) / per, th);
}

/* the layers over m rows (validated by the callers; seq_rows: every row its own slot, a decode
 * step); caller holds call_lock */
static int tt_dec_rows(tt_dec *d, float *x, int m, const int *slots, const int *pos, float *out, int nth,
                       int seq_rows) {
    if (nth <= 0) nth = P.nthreads;
    const int H = d->n_heads, hd = d->hd, D = d->dim, F = d->ffn;
    const int nq = H * hd;
    size_t work = 0; /* attention multiply-adds of this step */
    for (int r = 0; r < m; r++) work += (size_t)(pos[r] + 1) * hd * H;
    uint64_t t = d->prof ? tt_now_ns() : 0;
#define TT_LAP(S)                                                  \
    do {                                                           \
        if (d->prof) {                                             \
            const uint64_t now_ = tt_now_ns();                     \
            d->prof_ns[S] += now_ - t;                             \
            t = now_;                                              \
        }                                                          \
    } while (0)
    int rc = 0;
    /* each Linear's input quantised by the stage that writes it, in the same pass (the Linear's own
     * quantiser was a pool round trip of its own); not with the input norm, which comes between */
#define TT_Q(C) (!d->input_norm && tt_reserve((C), m) == 0 ? (C) : NULL)
    tt_ctx *q_qkv = NULL; /* the next qkv's input, quantised by the stage before */
    for (int i = 0; i < d->n_layers && rc == 0; i++) {
        const tt_dec_layer *L = &d->L[i];
        /* attention */
        if (i == 0) { /* later layers': the previous layer's last stage */
            q_qkv = TT_Q(L->qkv);
            tt_rows(d, L, TT_ROW_LN1, m, x, NULL, slots, pos, nth, q_qkv);
        }
        TT_LAP(TT_PROF_ROWS);
        if ((rc = tt_dec_linear(d, L->qkv, q_qkv != NULL, d->h, m, D, d->qkv, nth))) break;
        TT_LAP(TT_PROF_QKV);
        tt_rows(d, L, TT_ROW_QKV, m, x, NULL, slots, pos, nth, NULL); /* every row's keys/values, then attention */
        TT_LAP(TT_PROF_ROWS);
        /* short contexts: the pool's wake-up costs more than the work */
        const int ath = work >= 16384 ? nth : 1;
        /* a batch of sequences (a row each) with rows enough for every thread: one claim per row,
         * its heads in turn (a claim per head was a contended atomic per ~0.5 us job: 8 sequences,
         * ~45 positions, attention 0.60 -> 0.51 ms a step at 125M, 3.1-3.3 -> 2.9-3.1 at 700M).
         * Not for a prompt's rows: those share their keys and values, and alternating heads
         * between the threads keeps each head's in one core's cache (512 tokens: ~10% faster) */
        const int per = seq_rows && ath > 1 && m >= 4 * ath ? H : 1;
        /* o's input: quantised by the attention's row claims (per > 1: a chunk is a row's heads),
         * or by the sub-norm's stage */
        tt_ctx *q_o = per > 1 || L->attn_sub ? TT_Q(L->o) : NULL;
        tt_attn_job A = {.d = d, .kc = L->kc, .vc = L->vc, .slots = slots, .pos = pos,
                         .ahead = per > 1 ? 1 : ath, .njobs = m * H, .per = per,
                         .sub = per > 1 ? L->attn_sub : NULL, .qc = per > 1 ? q_o : NULL};
        if (per > 1) tt_parallel(tt_attn_chunk, &A, (m * H + per - 1) / per, ath);
        else tt_parallel(tt_attn_head, &A, m * H, ath);
        TT_LAP(TT_PROF_ATTN);
        if (L->attn_sub && per == 1) tt_rows(d, L, TT_ROW_ATTN_SUB, m, x, NULL, slots, pos, nth, q_o);
        TT_LAP(TT_PROF_ROWS);
        if ((rc = tt_dec_linear(d, L->o, q_o != NULL, d->att, m, nq, d->tmp, nth))) break;
        TT_LAP(TT_PROF_O);
        tt_ctx *q_gu = TT_Q(L->gu);
        tt_rows(d, L, TT_ROW_RESID_LN2, m, x, NULL, slots, pos, nth, q_gu); /* then the feed-forward */
        TT_LAP(TT_PROF_ROWS);
        if ((rc = tt_dec_linear(d, L->gu, q_gu != NULL, d->h, m, D, d->gu, nth))) break;
        TT_LAP(TT_PROF_GU);
        tt_ctx *q_down = TT_Q(L->down);
        tt_rows(d, L, TT_ROW_ACT, m, x, NULL, slots, pos, nth, q_down);
        TT_LAP(TT_PROF_ROWS);
        /* the activations sit in the first half of each [g | u] row: row stride 2F */
        if ((rc = tt_dec_linear(d, L->down, q_down != NULL, d->gu, m, 2 * F, d->tmp, nth))) break;
        TT_LAP(TT_PROF_DOWN);
        q_qkv = i + 1 < d->n_layers ? TT_Q(L[1].qkv) : NULL;
        tt_rows(d, L, TT_ROW_RESID_NEXT, m, x, out, slots, pos, nth, q_qkv);
    }
#undef TT_Q
    TT_LAP(TT_PROF_ROWS);
#undef TT_LAP
    if (d->prof) d->prof_ns[TT_PROF_CALLS]++;
    return rc;
}

/* profiling of the C layers: on (1) / off (0); either way the counters restart at zero */
void tt_dec_set_profile(tt_dec *d, int on) {
    if (!d) return;
    pthread_mutex_lock(&P.call_lock);
    d->prof = on ? 1 : 0;
    memset(d->prof_ns, 0, sizeof d->prof_ns);
    pthread_mutex_unlock(&P.call_lock);
}

/* the counters: out[TT_DEC_NPROF] (ns per section, then the number of calls); returns TT_DEC_NPROF */
int tt_dec_get_profile(tt_dec *d, uint64_t *out) {
    if (!d || !out) return 0;
    pthread_mutex_lock(&P.call_lock);
    memcpy(out, d->prof_ns, sizeof d->prof_ns);
    pthread_mutex_unlock(&P.call_lock);
    return TT_DEC_NPROF;
}

static int tt_dec_ready(const tt_dec *d) {
    if (d->hd > 512) return 0; /* tt_qk_prep's stack row */
    for (int i = 0; i < d->n_layers; i++)
        if (!d->L[i].qkv) return 0;
    return 1;
}

/* the rows a call may carry: m of at most max_m; every slot and position in range; seq_rows (a
 * decode step): each row its own slot, else no two rows at the same (slot, position). 0 or -2 */
static int tt_dec_check(const tt_dec *d, int m, int max_m, const int *slots, const int *pos, int seq_rows) {
    if (!d || m <= 0 || m > max_m || !slots || !pos || !tt_dec_ready(d)) return -2;
    for (int r = 0; r < m; r++) {
        if (slots[r] < 0 || slots[r] >= d->slots || pos[r] < 0 || pos[r] >= d->max_len) return -2;
        for (int t = 0; t < r; t++)
            if (slots[t] == slots[r] && (seq_rows || pos[t] == pos[r])) return -2;
    }
    return 0;
}

/* the layers over x (NULL: the embedding rows of ids, gathered under the lock into d->x) */
static int tt_dec_call(tt_dec *d, float *x, const int *ids, int m, const int *slots, const int *pos, float *out,
                       int nth, int seq_rows) {
    const int rc0 = tt_dec_check(d, m, seq_rows ? d->slots : d->rows, slots, pos, seq_rows);
    if (rc0) return rc0;
    if (!x) {
        if (!ids || !d->emb) return -2;
        for (int r = 0; r < m; r++)
            if (ids[r] < 0 || ids[r] >= d->vocab) return -3;
    }
    pthread_mutex_lock(&P.call_lock);
    tt_init_once();
    if (!x) {
        tt_embed_rows(d, ids, m, d->x);
        x = d->x;
    }
    const int rc = tt_dec_rows(d, x, m, slots, pos, out, nth, seq_rows);
    pthread_mutex_unlock(&P.call_lock);
    return rc;
}

/* x [m, dim] (the tokens' embeddings, float32) -> out [m, dim] = final-normed hidden states; row r
 * writes its keys/values at pos[r] of slot slots[r] (distinct slots). x is overwritten with the
 * residual streams. 0, -1 (no memory), -2 (bad rows) */
int tt_dec_step_batch(tt_dec *d, float *x, int m, const int *slots, const int *pos, float *out, int nth) {
    return x ? tt_dec_call(d, x, NULL, m, slots, pos, out, nth, 1) : -2;
}

/* tt_dec_step_batch on the embedding rows of token ids[0..m) (tt_dec_set_embed); -3: an id outside
 * the vocabulary */
int tt_dec_step_ids(tt_dec *d, const int *ids, int m, const int *slots, const int *pos, float *out, int nth) {
    return tt_dec_call(d, NULL, ids, m, slots, pos, out, nth, 1);
}

/* one sequence: x [dim] -> out [dim] (see tt_dec_step_batch) */
int tt_dec_step(tt_dec *d, float *x, int slot, int pos, float *out, int nth) {
    return tt_dec_step_batch(d, x, 1, &slot, &pos, out, nth);
}

/* any rows (m <= rows): row r is the token at position pos[r] of slot slots[r]; no two rows share a
 * (slot, position). Every row's keys/values are written before any row attends, so the rows of a
 * prompt (one slot, consecutive positions) attend causally, and several prompts (or prompts and
 * decode steps of other slots) go through in one call. Positions of a slot before its rows must
 * hold its keys/values. x [m, dim] embeddings (overwritten) -> out [m, dim]. */
int tt_dec_forward_rows(tt_dec *d, float *x, int m, const int *slots, const int *pos, float *out, int nth) {
    return x ? tt_dec_call(d, x, NULL, m, slots, pos, out, nth, 0) : -2;
}

/* tt_dec_forward_rows on the embedding rows of token ids[0..m) (see tt_dec_step_ids) */
int tt_dec_forward_rows_ids(tt_dec *d, const int *ids, int m, const int *slots, const int *pos, float *out, int nth) {
    return tt_dec_call(d, NULL, ids, m, slots, pos, out, nth, 0);
}
