/*
 * int8 / int4 / binary weight kinds next to the ternary one (tt_ctx.kind 1, 2, 3).
 *
 * Included from tritlm_cpu.c (one translation unit): the contexts, the job struct, the thread pool
 * and the activation quantiser are the ternary kernels' own; tt_run hands kinds 1-3 to tt_lb_run,
 * so tt_forward_f32 / tt_forward_i8 and the fused decode step work for every kind unchanged.
 *
 * Layouts (tritlm/kernels/pack.py). All row-major, one packed row after the other, so a fused
 * q|k|v matrix is a plain concatenation of rows:
 *   int8   "i8_k32":   int8 [n, kp], kp = 32 * ceil(k / 32), padding weights 0; levels -127..127.
 *   int4   "i4_k64":   uint8 [n, kp / 2], kp = 64 * ceil(k / 64); block b of a row (32 bytes) holds
 *                      weights 64b .. 64b+63: byte j = (q[64b+j] + 8) | (q[64b+32+j] + 8) << 4
 *                      (offset nibbles, levels -7..7, padding nibble 8 = weight 0).
 *   binary "b1_k128":  uint8 [n, kp / 8], kp = 128 * ceil(k / 128); block b of a row (16 bytes)
 *                      holds weights 128b .. 128b+127: bit s of byte j = (w[128b + 16s + j] > 0);
 *                      padding bits 0 (their activations are 0, so they add nothing).
 *
 * Math (x: the per-token absmax int8 of tt_quant_rows, padded to kp with zeros; xs its scale):
 *   int8:   d = sum_k q_k x_k, exact in int32 (|d| <= k * 127 * 128, k <= 2^17);
 *           out = (float)((double)d * wscale[n] * (1.0 / xs)) (+ bias)
 *   binary: d = sum_k w_k x_k = 2 * (sum of x_k where the bit is set) - sum_k x_k, exact;
 *           out as int8
 *   int4:   acc = sum_g gscale[n, g] * d_g in float32 (d_g: the exact int dot of group g);
 *           out = (float)((double)acc * (1.0 / xs)) (+ bias)  (IEEE double, as the ternary kind)
 *
 * AVX2 routes (chosen at run time like the ternary ones):
 *   int8 / int4: the sign trick maddubs(|x|, sign(w, x)) - |x| <= 128 fits the unsigned operand
 *     and |w| <= 127 the signed one, so x = -128 is exact too (pair sums <= 2*128*127 < 2^15) -
 *     then madd(., 1) into int32 (int8), or (int4) per 64-weight block: the two halves' int16
 *     pair sums (<= 2*128*7 each) added (G >= 64) and madd into int32, int32 -> float, fma with
 *     the group scale (G = 32: each half on its own).
 *   binary: each 16-byte block is broadcast to both 128-bit lanes, the high lane shifted right
 *     one bit more (srlv), so `& 1` after a further shift by 2p gives the 0/1 bits of the 32
 *     consecutive weights 128b + 32p ..; maddubs(bits, x) summed in int16 over <= 16 blocks.
 *   GEMV (M = 1): 4 rows at a time (4 sequential weight streams, the activations loaded once);
 *   GEMM (M > 1): panels of panel_rows rows, walked for every 4 (int8) or 2 tokens in register
 *   tiles of 2 rows x T tokens, so each weight vector is loaded once per T tokens.
 * Portable route: plain C loops (rows outer, tokens inner: a row stays in cache for all tokens).
 * Work split: like the ternary kernels, runs of 4-row groups per chunk, claimed dynamically.
 */

#define TT_I8_ALIGN 32
#define TT_I4_ALIGN 64
#define TT_B1_ALIGN 128
#define TT_I8_MAX_K (1 << 17)
#define TT_LB_MAX_K (1 << 22)

/* ============================================================== stores */
static inline void tt_lb_store_int(const tt_job *J, int t, int row, int32_t d) {
    const tt_ctx *c = J->c;
    const size_t o = (size_t)t * c->n + row;
    if (J->dots) { J->dots[o] = d; return; }
    float v = (float)((double)d * (double)c->wscale[row] * (1.0 / (double)J->xs[t]));
    if (c->bias) v += c->bias[row];
    J->out[o] = v;
}

static inline void tt_lb_store_f(const tt_job *J, int t, int row, float acc) {
    const tt_ctx *c = J->c;
    float v = (float)((double)acc * (1.0 / (double)J->xs[t]));
    if (c->bias) v += c->bias[row];
    J->out[(size_t)t * c->n + row] = v;
}

/* ============================================================== portable kernels */
static int32_t tt_i8_dot_portable(const int8_t *w, const int8_t *x, int k) {
    int32_t s = 0;
    for (int i = 0; i < k; i++) s += (int32_t)w[i] * (int32_t)x[i];
    return s;
}

static float tt_i4_dot_portable(const tt_ctx *c, int row, const int8_t *x) {
    const uint8_t *w = c->w + (size_t)row * c->rowb;
    const float *gs = c->gscale + (size_t)row * c->ngk;
    const int nb = c->kp / 64, bpg = c->group / 64; /* blocks per group; 0: two groups per block */
    float acc = 0.0f;
    int32_t gd = 0;
    for (int b = 0; b < nb; b++) {
        const uint8_t *wb = w + (size_t)b * 32;
        const int8_t *xb = x + (size_t)b * 64;
        int32_t lo = 0, hi = 0;
        for (int j = 0; j < 32; j++) {
            lo += ((int32_t)(wb[j] & 15) - 8) * (int32_t)xb[j];
            hi += ((int32_t)(wb[j] >> 4) - 8) * (int32_t)xb[j + 32];
        }
        if (bpg == 0) {
            acc += gs[2 * b] * (float)lo;
            acc += gs[2 * b + 1] * (float)hi;
        } else {
            gd += lo + hi;
            if ((b + 1) % bpg == 0 || b + 1 == nb) { acc += gs[b / bpg] * (float)gd; gd = 0; }
        }
    }
    return acc;
}

/* sum of the activations whose weight bit is set */
static int32_t tt_b1_sum_portable(const uint8_t *w, const int8_t *x, int kp) {
    int32_t s = 0;
    for (int b = 0; b < kp / 128; b++) {
        const uint8_t *wb = w + (size_t)b * 16;
        const int8_t *xb = x + (size_t)b * 128;
        for (int sh = 0; sh < 8; sh++)
            for (int j = 0; j < 16; j++) s += (int32_t)xb[16 * sh + j] & -(int32_t)((wb[j] >> sh) & 1);
    }
    return s;
}

static void tt_lb_task_portable(const void *arg, int chunk) {
    const tt_job *J = (const tt_job *)arg;
    const tt_ctx *c = J->c;
    int g0, g1;
    tt_chunk_groups(J, chunk, &g0, &g1);
    const int r1 = 4 * g1 < c->n ? 4 * g1 : c->n;
    for (int row = 4 * g0; row < r1; row++) {
        const uint8_t *w = c->w + (size_t)row * c->rowb;
        for (int t = 0; t < J->m; t++) {
            const int8_t *x = J->xq + (size_t)t * J->ldx;
            switch (c->kind) {
                case TT_KIND_INT8: tt_lb_store_int(J, t, row, tt_i8_dot_portable((const int8_t *)w, x, c->k)); break;
                case TT_KIND_INT4: tt_lb_store_f(J, t, row, tt_i4_dot_portable(c, row, x)); break;
                default: tt_lb_store_int(J, t, row, 2 * tt_b1_sum_portable(w, x, c->kp) - J->sx[t]); break;
            }
        }
    }
}

/* ============================================================== AVX2 kernels */
#if TT_X86
TT_AVX2_INLINE float tt_lb_hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Register tiles: R rows (row pointers w[r]) x T tokens (x + t * ldx); R, T are constants at each
 * call site (the loops unroll fully and the accumulators stay in registers). */

/* a weight line ahead, into every cache level. Single tokens had the non-temporal hint (the
 * weights are read once); on the Xeon of session 12 it slowed every GEMV that had it (2 threads,
 * weights from memory, share of the read floor before -> after: AVX-512 int4 44-51% -> 60-68%,
 * binary 29-33% -> 36-44%, int8 unchanged; the AVX2 route's int8 40-42% -> 85-94%, int4 41-46% ->
 * 65-68%), as it did the ternary and fp16 ones. Not measured on an AVX2-only CPU. */
#define TT_LB_PF(P) _mm_prefetch((const char *)(P), _MM_HINT_T0)

/* int8: exact int32 dots over nv vectors of 32 weights */
TT_AVX2_INLINE void tt_i8_tile(const uint8_t *const *w, const int8_t *x, size_t ldx, int nv, int R, int T,
                               int32_t res[4][4], int pf) {
    const __m256i one16 = _mm256_set1_epi16(1);
    __m256i acc[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) acc[r][t] = _mm256_setzero_si256();
    /* pf (one token, or a GEMM panel's first token tile): the next tile's rows (R rows further on)
     * are fetched while this one runs; the hardware prefetcher alone kept the 4-row stream at ~10
     * GB/s. Later token tiles of a panel find the rows in the cache. */
    const size_t ahead = pf ? (size_t)(w[R - 1] - w[0]) / (R > 1 ? R - 1 : 1) * R : 0;
    for (int v = 0; v < nv; v++) {
        const size_t o = (size_t)v * 32;
        __m256i wv[4];
        if (ahead && (v & 1) == 0)
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) TT_LB_PF((const char *)(w[r] + o + ahead));
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) wv[r] = _mm256_loadu_si256((const __m256i *)(w[r] + o));
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + t * ldx + o));
            const __m256i ax = _mm256_abs_epi8(xv);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++)
                acc[r][t] = _mm256_add_epi32(acc[r][t],
                                             _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv[r], xv)), one16));
        }
    }
    if (R == 4 && T == 1) {
        int32_t r4[4];
        _mm_storeu_si128((__m128i *)r4, tt_hsum4(acc[0][0], acc[1][0], acc[2][0], acc[3][0]));
        for (int r = 0; r < 4; r++) res[r][0] = r4[r];
        return;
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) res[r][t] = tt_hsum1(acc[r][t]);
}

/* int4: float sums of group scale x exact group dot, over nb blocks of 64 weights. One block per
 * iteration: G = 32 -> two groups (low / high nibbles), G = 64 -> one, G = 128 -> half a group
 * (each half is converted and scaled on its own: the same sum, no nested group loop). */
TT_AVX2_INLINE void tt_i4_tile(const uint8_t *const *w, const float *const *gs, const int8_t *x, size_t ldx, int nb,
                               int G, int R, int T, float res[4][4], int pf) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), eight = _mm256_set1_epi8(8), one16 = _mm256_set1_epi16(1);
    __m256 acc[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) acc[r][t] = _mm256_setzero_ps();
    /* pf: prefetch the next tile's rows as the int8 tile does (a tile's rows are short streams the
     * hardware prefetcher does not pick up in time) */
    const size_t ahead = pf ? (size_t)(w[R - 1] - w[0]) / (R > 1 ? R - 1 : 1) * R : 0;
    for (int b = 0; b < nb; b++) {
        const size_t wo = (size_t)b * 32, xo = (size_t)b * 64;
        __m256i lo[4], hi[4];
        __m256 s0[4], s1[4];
        if (ahead && (b & 1) == 0)
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) TT_LB_PF((const char *)(w[r] + wo + ahead));
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(w[r] + wo));
            lo[r] = _mm256_sub_epi8(_mm256_and_si256(v, m4), eight);
            hi[r] = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), eight);
            if (G == 32) {
                s0[r] = _mm256_broadcast_ss(gs[r] + 2 * b);
                s1[r] = _mm256_broadcast_ss(gs[r] + 2 * b + 1);
            } else {
                s0[r] = _mm256_broadcast_ss(gs[r] + (G == 64 ? b : b >> 1));
            }
        }
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) {
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)(x + t * ldx + xo));
            const __m256i x1 = _mm256_loadu_si256((const __m256i *)(x + t * ldx + xo + 32));
            const __m256i a0 = _mm256_abs_epi8(x0), a1 = _mm256_abs_epi8(x1);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                const __m256i p0 = _mm256_maddubs_epi16(a0, _mm256_sign_epi8(lo[r], x0));
                const __m256i p1 = _mm256_maddubs_epi16(a1, _mm256_sign_epi8(hi[r], x1));
                if (G == 32) {
                    acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p0, one16)), s0[r], acc[r][t]);
                    acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p1, one16)), s1[r], acc[r][t]);
                } else {
                    const __m256i d = _mm256_madd_epi16(_mm256_add_epi16(p0, p1), one16);
                    acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s0[r], acc[r][t]);
                }
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) res[r][t] = tt_lb_hsum_ps(acc[r][t]);
}

/* binary: exact int32 sums of the activations whose bit is set, over nb blocks of 128 weights */
TT_AVX2_INLINE void tt_b1_tile(const uint8_t *const *w, const int8_t *x, size_t ldx, int nb, int R, int T,
                               int32_t res[4][4], int pf) {
    const __m256i one8 = _mm256_set1_epi8(1), one16 = _mm256_set1_epi16(1);
    const __m256i sh = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    __m256i acc[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) acc[r][t] = _mm256_setzero_si256();
    const size_t ahead = pf ? (size_t)(w[R - 1] - w[0]) / (R > 1 ? R - 1 : 1) * R : 0; /* as tt_i4_tile */
    for (int b0 = 0; b0 < nb; b0 += 16) { /* int16 lanes: |sum| <= 16 blocks * 4 * 2 * 128 = 16384 */
        const int b1 = b0 + 16 < nb ? b0 + 16 : nb;
        __m256i s16[4][4];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
#pragma GCC unroll 4
            for (int t = 0; t < T; t++) s16[r][t] = _mm256_setzero_si256();
        for (int b = b0; b < b1; b++) {
            __m256i v[4];
            if (ahead && (b & 3) == 0)
#pragma GCC unroll 4
                for (int r = 0; r < R; r++) TT_LB_PF((const char *)(w[r] + (size_t)b * 16 + ahead));
#pragma GCC unroll 4
            for (int r = 0; r < R; r++)
                v[r] = _mm256_srlv_epi32(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(w[r] + (size_t)b * 16))), sh);
#pragma GCC unroll 4
            for (int p = 0; p < 4; p++) {
                __m256i u[4];
#pragma GCC unroll 4
                for (int r = 0; r < R; r++) {
                    u[r] = _mm256_and_si256(v[r], one8);
                    v[r] = _mm256_srli_epi32(v[r], 2);
                }
#pragma GCC unroll 4
                for (int t = 0; t < T; t++) {
                    const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + t * ldx + (size_t)b * 128 + 32 * p));
#pragma GCC unroll 4
                    for (int r = 0; r < R; r++) s16[r][t] = _mm256_add_epi16(s16[r][t], _mm256_maddubs_epi16(u[r], xv));
                }
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
#pragma GCC unroll 4
            for (int t = 0; t < T; t++) acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(s16[r][t], one16));
    }
    if (R == 4 && T == 1) {
        int32_t r4[4];
        _mm_storeu_si128((__m128i *)r4, tt_hsum4(acc[0][0], acc[1][0], acc[2][0], acc[3][0]));
        for (int r = 0; r < 4; r++) res[r][0] = r4[r];
        return;
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) res[r][t] = tt_hsum1(acc[r][t]);
}

/* row pointers of a tile starting at `row`; rows past r1 repeat row r1 - 1 (computed, not stored) */
static inline void tt_lb_rows(const tt_ctx *c, int row, int r1, int R, const uint8_t *w[4], const float *gs[4]) {
    for (int r = 0; r < R; r++) {
        const int rr = row + r < r1 ? row + r : r1 - 1;
        w[r] = c->w + (size_t)rr * c->rowb;
        if (gs) gs[r] = c->gscale + (size_t)rr * c->ngk;
    }
}

static inline void tt_lb_store_tile_int(const tt_job *J, int t0, int T, int row, int r1, int R, int32_t res[4][4]) {
    const int bin = J->c->kind == TT_KIND_BINARY;
    for (int r = 0; r < R && row + r < r1; r++)
        for (int t = 0; t < T; t++)
            tt_lb_store_int(J, t0 + t, row + r, bin ? 2 * res[r][t] - J->sx[t0 + t] : res[r][t]);
}

/* one (R rows x T tokens) tile of any kind */
TT_AVX2_INLINE void tt_lb_tile(const tt_job *J, int t0, int row, int r1, int R, int T) {
    const tt_ctx *c = J->c;
    const int8_t *x = J->xq + (size_t)t0 * J->ldx;
    const uint8_t *w[4];
    const int pf = T == 1 || t0 == 0; /* the first pass over a panel's rows reads them from DRAM */
    if (c->kind == TT_KIND_INT4) {
        const float *gs[4];
        float res[4][4];
        tt_lb_rows(c, row, r1, R, w, gs);
        switch (c->group) {
            case 32: tt_i4_tile(w, gs, x, J->ldx, c->kp / 64, 32, R, T, res, pf); break;
            case 64: tt_i4_tile(w, gs, x, J->ldx, c->kp / 64, 64, R, T, res, pf); break;
            default: tt_i4_tile(w, gs, x, J->ldx, c->kp / 64, 128, R, T, res, pf); break;
        }
        for (int r = 0; r < R && row + r < r1; r++)
            for (int t = 0; t < T; t++) tt_lb_store_f(J, t0 + t, row + r, res[r][t]);
        return;
    }
    int32_t res[4][4];
    tt_lb_rows(c, row, r1, R, w, NULL);
    if (c->kind == TT_KIND_INT8) tt_i8_tile(w, x, J->ldx, c->kp / 32, R, T, res, pf);
    else tt_b1_tile(w, x, J->ldx, c->kp / 128, R, T, res, pf);
    tt_lb_store_tile_int(J, t0, T, row, r1, R, res);
}

/* GEMV: rows [r0, r1) of one token, 4 rows per tile */
TT_AVX2_FN static void tt_lb_gemv_avx2(const tt_job *J, int r0, int r1) {
    for (int row = r0; row < r1; row += 4) tt_lb_tile(J, 0, row, r1, 4, 1);
}

/* GEMM tiles of 2 rows x T tokens (one function each: the register allocation stays local) */
TT_AVX2_FN static void tt_lb_tile_2x1(const tt_job *J, int t0, int row, int r1) { tt_lb_tile(J, t0, row, r1, 2, 1); }
TT_AVX2_FN static void tt_lb_tile_2x2(const tt_job *J, int t0, int row, int r1) { tt_lb_tile(J, t0, row, r1, 2, 2); }
TT_AVX2_FN static void tt_lb_tile_2x3(const tt_job *J, int t0, int row, int r1) { tt_lb_tile(J, t0, row, r1, 2, 3); }
TT_AVX2_FN static void tt_lb_tile_2x4(const tt_job *J, int t0, int row, int r1) { tt_lb_tile(J, t0, row, r1, 2, 4); }

/* GEMM: rows [r0, r1) in panels of panel_rows rows; per panel: token tiles outer, row pairs inner */
static void tt_lb_gemm_avx2(const tt_job *J, int r0, int r1) {
    const int pr = J->p.panel_rows >= 4 ? J->p.panel_rows : 4;
    const int tmax = J->c->kind == TT_KIND_INT8 ? 4 : 2; /* int4 / binary keep more accumulators */
    for (int p0 = r0; p0 < r1; p0 += pr) {
        const int p1 = p0 + pr < r1 ? p0 + pr : r1;
        for (int t0 = 0; t0 < J->m; t0 += tmax) {
            const int T = J->m - t0 < tmax ? J->m - t0 : tmax;
            for (int row = p0; row < p1; row += 2) {
                switch (T) {
                    case 4: tt_lb_tile_2x4(J, t0, row, p1); break;
                    case 3: tt_lb_tile_2x3(J, t0, row, p1); break;
                    case 2: tt_lb_tile_2x2(J, t0, row, p1); break;
                    default: tt_lb_tile_2x1(J, t0, row, p1); break;
                }
            }
        }
    }
}

static void tt_lb_task_avx2(const void *arg, int chunk) {
    const tt_job *J = (const tt_job *)arg;
    int g0, g1;
    tt_chunk_groups(J, chunk, &g0, &g1);
    const int r0 = 4 * g0, r1 = 4 * g1 < J->c->n ? 4 * g1 : J->c->n;
    if (J->m == 1) tt_lb_gemv_avx2(J, r0, r1);
    else tt_lb_gemm_avx2(J, r0, r1);
}
#endif

/* ============================================================== AVX-512 VNNI (int8) */
/* sum of each row's levels: the VNNI route's offset correction (tt_ctx.wsum) */
static void tt_i8_row_sums(const int8_t *w, int n, int k, size_t rowb, int32_t *out) {
    for (int r = 0; r < n; r++) {
        const int8_t *p = w + (size_t)r * rowb;
        int32_t s = 0;
        for (int i = 0; i < k; i++) s += p[i];
        out[r] = s;
    }
}

#if TT_X86
/* vpdpbusd takes its first operand unsigned, so the activations go in offset by 128
 * (x ^ 0x80 = x + 128, 0..255) and the row's level sum comes back out: sum (x + 128) w - 128 sum w
 * = sum x w, exact modulo 2^32 (and the true dot fits in int32: k <= 2^17). R rows (stride rowb)
 * x T tokens over kp (a multiple of 32: the last 64-byte step is masked, masked bytes read as 0). */
TT_VNNI_INLINE void tt_vnni_i8_tile(const int8_t *w, size_t rowb, int R, int kp, const int8_t *x, size_t ldx, int T,
                                    const int32_t *wsum, int32_t *dots, size_t ldd) {
    const __m512i off = _mm512_set1_epi8((char)0x80);
    __m512i acc[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_si512();
    for (int k0 = 0; k0 < kp; k0 += 64) {
        const __mmask64 mk = kp - k0 >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (kp - k0)) - 1);
        __m512i wv[4];
        for (int r = 0; r < R; r++) wv[r] = _mm512_maskz_loadu_epi8(mk, w + (size_t)r * rowb + k0);
        for (int t = 0; t < T; t++) {
            const __m512i xu = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, x + (size_t)t * ldx + k0), off);
            for (int r = 0; r < R; r++) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], xu, wv[r]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++)
            dots[(size_t)t * ldd + r] = (int32_t)((uint32_t)_mm512_reduce_add_epi32(acc[r][t]) - 128u * (uint32_t)wsum[r]);
}

TT_VNNI_FN static void tt_vnni_i8_4x1(const int8_t *w, size_t rowb, int kp, const int8_t *x, size_t ldx, const int32_t *ws,
                                      int32_t *d, size_t ldd) { tt_vnni_i8_tile(w, rowb, 4, kp, x, ldx, 1, ws, d, ldd); }
TT_VNNI_FN static void tt_vnni_i8_4x4(const int8_t *w, size_t rowb, int kp, const int8_t *x, size_t ldx, const int32_t *ws,
                                      int32_t *d, size_t ldd) { tt_vnni_i8_tile(w, rowb, 4, kp, x, ldx, 4, ws, d, ldd); }
TT_VNNI_FN static void tt_vnni_i8_any(const int8_t *w, size_t rowb, int R, int kp, const int8_t *x, size_t ldx, int T,
                                      const int32_t *ws, int32_t *d, size_t ldd) { tt_vnni_i8_tile(w, rowb, R, kp, x, ldx, T, ws, d, ldd); }

/* exact dots of nrows int8 rows (stride rowb) and T tokens into dots[t * ldd + row]; a leaf */
TT_VNNI_FN static void tt_vnni_i8_dots_impl(const int8_t *w, size_t rowb, int nrows, int kp, const int32_t *wsum,
                                            const int8_t *x, size_t ldx, int T, int32_t *dots, size_t ldd) {
    for (int t0 = 0; t0 < T; t0 += 4) {
        const int tn = T - t0 < 4 ? T - t0 : 4;
        for (int r0 = 0; r0 < nrows; r0 += 4) {
            const int rn = nrows - r0 < 4 ? nrows - r0 : 4;
            const int8_t *wr = w + (size_t)r0 * rowb;
            const int8_t *xt = x + (size_t)t0 * ldx;
            int32_t *dt = dots + (size_t)t0 * ldd + r0;
            if (rn == 4 && tn == 1) tt_vnni_i8_4x1(wr, rowb, kp, xt, ldx, wsum + r0, dt, ldd);
            else if (rn == 4 && tn == 4) tt_vnni_i8_4x4(wr, rowb, kp, xt, ldx, wsum + r0, dt, ldd);
            else tt_vnni_i8_any(wr, rowb, rn, kp, xt, ldx, tn, wsum + r0, dt, ldd);
        }
    }
}

/* exported for the emulator tests (the library calls the static one) */
TT_VNNI_FN void tt_vnni_i8_dots(const int8_t *w, size_t rowb, int nrows, int kp, const int32_t *wsum, const int8_t *x,
                                size_t ldx, int T, int32_t *dots, size_t ldd) {
    tt_vnni_i8_dots_impl(w, rowb, nrows, kp, wsum, x, ldx, T, dots, ldd);
}

/* rows of a chunk in batches of 32, token quads over each batch, then the int8 epilogue */
static void tt_lb_task_vnni_i8(const void *arg, int chunk) {
    const tt_job *J = (const tt_job *)arg;
    const tt_ctx *c = J->c;
    int g0, g1;
    tt_chunk_groups(J, chunk, &g0, &g1);
    const int r0 = 4 * g0, r1 = 4 * g1 < c->n ? 4 * g1 : c->n;
    int32_t buf[4 * 32];
    for (int rb = r0; rb < r1; rb += 32) {
        const int re = rb + 32 < r1 ? rb + 32 : r1;
        for (int t0 = 0; t0 < J->m; t0 += 4) {
            const int T = J->m - t0 < 4 ? J->m - t0 : 4;
            tt_vnni_i8_dots_impl((const int8_t *)c->w + (size_t)rb * c->rowb, c->rowb, re - rb, c->kp, c->wsum + rb,
                                 J->xq + (size_t)t0 * J->ldx, J->ldx, T, buf, 32);
            for (int t = 0; t < T; t++)
                for (int i = 0; i < re - rb; i++) tt_lb_store_int(J, t0 + t, rb + i, buf[32 * t + i]);
        }
    }
}

/* int4 on AVX-512 VNNI: the offset nibbles (q + 8, 1..15) are already unsigned, so vpdpbusd takes
 * them as they are and 8 * (lane sums of x) comes back out, lane by lane (each int32 lane sums the
 * same 4 bytes of both): exact group partial dots. A 64-byte vector is one block of a row: its low
 * nibbles (weights 64b .. 64b+31) in lanes 0-7 against x[64b ..], its high nibbles in lanes 8-15
 * against x[64b + 32 ..], so one contiguous load of x serves the block. The lanes are converted,
 * scaled by their group's scale and summed in float (the AVX2 route's way; the portable route adds
 * in another order, so int4 results agree to rounding, and exactly where every sum is an integer
 * below 2^24). R rows x T tokens, group G (32 / 64 / 128) a constant at the call sites. */
TT_VNNI_INLINE void tt_vnni_i4_tile(const uint8_t *const *w, const float *const *gs, const int8_t *x, size_t ldx, int nb,
                                    int G, int R, int T, size_t ahead, float res[4][4]) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    const __m512i ones = _mm512_set1_epi8(1);
    __m512 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m512i u[4];
        __m512 s[4];
        if (ahead && (b & 1) == 0)
            for (int r = 0; r < R; r++) _mm_prefetch((const char *)(w[r] + (size_t)b * 32 + ahead), _MM_HINT_T0);
        for (int r = 0; r < R; r++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(w[r] + (size_t)b * 32));
            u[r] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, m4)),
                                      _mm256_and_si256(_mm256_srli_epi16(v, 4), m4), 1);
            if (G == 32) s[r] = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(gs[r][2 * b]), _mm512_set1_ps(gs[r][2 * b + 1]));
            else s[r] = _mm512_set1_ps(gs[r][G == 64 ? b : b >> 1]);
        }
        for (int t = 0; t < T; t++) {
            const __m512i xv = _mm512_loadu_si512((const void *)(x + (size_t)t * ldx + (size_t)b * 64));
            const __m512i corr = _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, xv), 3);
            for (int r = 0; r < R; r++) {
                const __m512i d = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u[r], xv), corr);
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s[r], acc[r][t]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) res[r][t] = _mm512_reduce_add_ps(acc[r][t]);
}

#define TT_VNNI_I4(NAME, G, R, T)                                                                             \
    TT_VNNI_FN static void NAME(const uint8_t *const *w, const float *const *gs, const int8_t *x, size_t ldx, \
                                int nb, size_t ahead, float res[4][4]) {                                      \
        tt_vnni_i4_tile(w, gs, x, ldx, nb, G, R, T, ahead, res);                                              \
    }
TT_VNNI_I4(tt_vnni_i4_g32_4x1, 32, 4, 1)
TT_VNNI_I4(tt_vnni_i4_g64_4x1, 64, 4, 1)
TT_VNNI_I4(tt_vnni_i4_g128_4x1, 128, 4, 1)
TT_VNNI_I4(tt_vnni_i4_g32_4x2, 32, 4, 2)
TT_VNNI_I4(tt_vnni_i4_g64_4x2, 64, 4, 2)
TT_VNNI_I4(tt_vnni_i4_g128_4x2, 128, 4, 2)
#undef TT_VNNI_I4

/* One token: the chunk's rows [r0, r1) as 4-row tiles of two adjacent rows from each half (rows a,
 * a + 1, a + h, a + h + 1; h = tt_lb_half): the tile's streams are then two pairs half a chunk
 * apart, not four rows in one 4 KB page (768-byte int4 rows at K = 1536; see tt_task_vnni on
 * streams sharing a page), and each stream's next row is 2 rows on. Rows past their half or the
 * chunk repeat row a (computed, not stored): rows[i] = -1. */
static inline int tt_lb_half(int r0, int r1) { return (((r1 - r0) + 1) / 2 + 1) & ~1; /* even, >= half */ }

static inline void tt_lb_pair_rows(const tt_ctx *c, int a, int h, int r0, int r1, const uint8_t *w[4],
                                   const float *gs[4], int rows[4]) {
    const int cand[4] = {a, a + 1, a + h, a + h + 1};
    for (int i = 0; i < 4; i++) {
        const int ok = cand[i] < r1 && (i >= 2 || cand[i] < r0 + h);
        rows[i] = ok ? cand[i] : -1;
        const int rr = ok ? cand[i] : a;
        w[i] = c->w + (size_t)rr * c->rowb;
        if (gs) gs[i] = c->gscale + (size_t)rr * c->ngk;
    }
}

/* rows of a chunk 4 at a time (the last tile repeats its last row: computed, not stored), tokens in
 * pairs (one token: the GEMV tile, rows paired across the chunk's halves), then the int4 epilogue */
static void tt_lb_task_vnni_i4(const void *arg, int chunk) {
    const tt_job *J = (const tt_job *)arg;
    const tt_ctx *c = J->c;
    int g0, g1;
    tt_chunk_groups(J, chunk, &g0, &g1);
    const int r0 = 4 * g0, r1 = 4 * g1 < c->n ? 4 * g1 : c->n, nb = c->kp / 64;
    if (J->m == 1) {
        const int h = tt_lb_half(r0, r1);
        const size_t ahead = 2 * c->rowb;
        for (int a = r0; a < r0 + h && a < r1; a += 2) {
            const uint8_t *w[4];
            const float *gs[4];
            float res[4][4];
            int rows[4];
            tt_lb_pair_rows(c, a, h, r0, r1, w, gs, rows);
            if (c->group == 32) tt_vnni_i4_g32_4x1(w, gs, J->xq, J->ldx, nb, ahead, res);
            else if (c->group == 64) tt_vnni_i4_g64_4x1(w, gs, J->xq, J->ldx, nb, ahead, res);
            else tt_vnni_i4_g128_4x1(w, gs, J->xq, J->ldx, nb, ahead, res);
            for (int i = 0; i < 4; i++)
                if (rows[i] >= 0) tt_lb_store_f(J, 0, rows[i], res[i][0]);
        }
        return;
    }
    for (int t0 = 0; t0 < J->m; t0 += 2) {
        const int T = J->m - t0 == 1 ? 1 : 2;
        for (int row = r0; row < r1; row += 4) {
            const uint8_t *w[4];
            const float *gs[4];
            float res[4][4];
            tt_lb_rows(c, row, r1, 4, w, gs);
            const int8_t *x = J->xq + (size_t)t0 * J->ldx;
            if (T == 1) { /* an odd last token of a GEMM: its rows are in the cache */
                if (c->group == 32) tt_vnni_i4_g32_4x1(w, gs, x, J->ldx, nb, 0, res);
                else if (c->group == 64) tt_vnni_i4_g64_4x1(w, gs, x, J->ldx, nb, 0, res);
                else tt_vnni_i4_g128_4x1(w, gs, x, J->ldx, nb, 0, res);
            } else {
                if (c->group == 32) tt_vnni_i4_g32_4x2(w, gs, x, J->ldx, nb, 0, res);
                else if (c->group == 64) tt_vnni_i4_g64_4x2(w, gs, x, J->ldx, nb, 0, res);
                else tt_vnni_i4_g128_4x2(w, gs, x, J->ldx, nb, 0, res);
            }
            for (int r = 0; r < 4 && row + r < r1; r++)
                for (int t = 0; t < T; t++) tt_lb_store_f(J, t0 + t, row + r, res[r][t]);
        }
    }
}

/* binary on AVX-512 VNNI: a 16-byte block (128 weights; bit s of byte j = weight 16 s + j) is
 * broadcast to the four 128-bit lanes, lane L shifted right by L (then by 4 + L) bits, so `& 1`
 * gives the 0/1 bytes of weights 0..63 (64..127) in x's order: vpdpbusd(bits, x) sums the
 * activations whose bit is set, exactly. R rows x T tokens over nb blocks. */
TT_VNNI_INLINE void tt_vnni_b1_tile(const uint8_t *const *w, const int8_t *x, size_t ldx, int nb, int R, int T,
                                    size_t ahead, int32_t res[4][4]) {
    const __m512i one8 = _mm512_set1_epi8(1);
    const __m512i sh0 = _mm512_set_epi64(3, 3, 2, 2, 1, 1, 0, 0), sh1 = _mm512_add_epi64(sh0, _mm512_set1_epi64(4));
    __m512i acc[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_si512();
    for (int b = 0; b < nb; b++) {
        __m512i lo[4], hi[4];
        if (ahead && (b & 3) == 0)
            for (int r = 0; r < R; r++) _mm_prefetch((const char *)(w[r] + (size_t)b * 16 + ahead), _MM_HINT_T0);
        for (int r = 0; r < R; r++) {
            const __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(w[r] + (size_t)b * 16)));
            lo[r] = _mm512_and_si512(_mm512_srlv_epi64(v, sh0), one8);
            hi[r] = _mm512_and_si512(_mm512_srlv_epi64(v, sh1), one8);
        }
        for (int t = 0; t < T; t++) {
            const int8_t *xb = x + (size_t)t * ldx + (size_t)b * 128;
            const __m512i x0 = _mm512_loadu_si512((const void *)xb), x1 = _mm512_loadu_si512((const void *)(xb + 64));
            for (int r = 0; r < R; r++)
                acc[r][t] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[r][t], lo[r], x0), hi[r], x1);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) res[r][t] = _mm512_reduce_add_epi32(acc[r][t]);
}

TT_VNNI_FN static void tt_vnni_b1_4x1(const uint8_t *const *w, const int8_t *x, size_t ldx, int nb, size_t ahead,
                                      int32_t res[4][4]) {
    tt_vnni_b1_tile(w, x, ldx, nb, 4, 1, ahead, res);
}
TT_VNNI_FN static void tt_vnni_b1_4x4(const uint8_t *const *w, const int8_t *x, size_t ldx, int nb, int32_t res[4][4]) {
    tt_vnni_b1_tile(w, x, ldx, nb, 4, 4, 0, res);
}
TT_VNNI_FN static void tt_vnni_b1_4xT(const uint8_t *const *w, const int8_t *x, size_t ldx, int nb, int T,
                                      int32_t res[4][4]) {
    tt_vnni_b1_tile(w, x, ldx, nb, 4, T, 0, res);
}

/* rows of a chunk 4 at a time (one token: paired across the chunk's halves, tt_lb_pair_rows),
 * token quads, then the binary epilogue (2 S - sum x) */
static void tt_lb_task_vnni_b1(const void *arg, int chunk) {
    const tt_job *J = (const tt_job *)arg;
    const tt_ctx *c = J->c;
    int g0, g1;
    tt_chunk_groups(J, chunk, &g0, &g1);
    const int r0 = 4 * g0, r1 = 4 * g1 < c->n ? 4 * g1 : c->n, nb = c->kp / 128;
    if (J->m == 1) {
        const int h = tt_lb_half(r0, r1);
        const size_t ahead = 2 * c->rowb;
        for (int a = r0; a < r0 + h && a < r1; a += 2) {
            const uint8_t *w[4];
            int32_t res[4][4];
            int rows[4];
            tt_lb_pair_rows(c, a, h, r0, r1, w, NULL, rows);
            tt_vnni_b1_4x1(w, J->xq, J->ldx, nb, ahead, res);
            for (int i = 0; i < 4; i++)
                if (rows[i] >= 0) tt_lb_store_int(J, 0, rows[i], 2 * res[i][0] - J->sx[0]);
        }
        return;
    }
    for (int t0 = 0; t0 < J->m; t0 += 4) {
        const int T = J->m - t0 < 4 ? J->m - t0 : 4;
        for (int row = r0; row < r1; row += 4) {
            const uint8_t *w[4];
            int32_t res[4][4];
            tt_lb_rows(c, row, r1, 4, w, NULL);
            const int8_t *x = J->xq + (size_t)t0 * J->ldx;
            if (T == 1) tt_vnni_b1_4x1(w, x, J->ldx, nb, 0, res);
            else if (T == 4) tt_vnni_b1_4x4(w, x, J->ldx, nb, res);
            else tt_vnni_b1_4xT(w, x, J->ldx, nb, T, res);
            tt_lb_store_tile_int(J, t0, T, row, r1, 4, res);
        }
    }
}

/* the binary route on the calling thread: the emulator tests' entry (sx[t] = sum_k xq[t, k]) */
TT_VNNI_FN void tt_vnni_b1_run_serial(const uint8_t *w, int n, int k, int kp, const float *wscale, const float *bias,
                                      const int8_t *xq, size_t ldx, int m, const float *xs, const int32_t *sx,
                                      float *out, int32_t *dots, int cg) {
    tt_ctx c;
    c.w = w; c.n = n; c.k = k; c.kp = kp; c.rowb = (size_t)kp / 8; c.ngroups = (n + 3) / 4;
    c.wscale = (float *)wscale; c.bias = (float *)bias; c.wsum = NULL; c.isa = 2; c.kind = TT_KIND_BINARY;
    tt_run_serial(&c, xq, ldx, m, xs, sx, out, dots, cg, tt_lb_task_vnni_b1);
}

/* the int4 route on the calling thread: the emulator tests' entry. gscale [n, ceil(kp / group)]
 * (groups past ceil(k / group) zero), as tt_ctx_new_int4 lays them out. */
TT_VNNI_FN void tt_vnni_i4_run_serial(const uint8_t *w, int n, int k, int kp, int group, const float *gscale,
                                      const float *bias, const int8_t *xq, size_t ldx, int m, const float *xs,
                                      float *out, int cg) {
    tt_ctx c;
    c.w = w; c.n = n; c.k = k; c.kp = kp; c.rowb = (size_t)kp / 2; c.ngroups = (n + 3) / 4;
    c.group = group; c.ngk = (kp + group - 1) / group; c.gscale = (float *)gscale; c.bias = (float *)bias;
    c.wscale = NULL; c.wsum = NULL; c.isa = 2; c.kind = TT_KIND_INT4;
    tt_run_serial(&c, xq, ldx, m, xs, NULL, out, NULL, cg, tt_lb_task_vnni_i4);
}

/* the int8 route over a whole matrix on the calling thread (as tt_vnni_run_serial for ternary):
 * the emulator tests' entry. wsum: scratch [n], filled here with tt_i8_row_sums. */
TT_VNNI_FN void tt_vnni_i8_run_serial(const int8_t *w, int n, int k, int kp, const float *wscale, const float *bias,
                                      int32_t *wsum, const int8_t *xq, size_t ldx, int m, const float *xs, float *out,
                                      int32_t *dots, int cg) {
    tt_i8_row_sums(w, n, k, (size_t)kp, wsum);
    tt_ctx c;
    c.w = (const uint8_t *)w; c.n = n; c.k = k; c.kp = kp; c.rowb = (size_t)kp; c.ngroups = (n + 3) / 4;
    c.wscale = (float *)wscale; c.bias = (float *)bias; c.wsum = wsum; c.isa = 2; c.kind = TT_KIND_INT8;
    tt_run_serial(&c, xq, ldx, m, xs, NULL, out, dots, cg, tt_lb_task_vnni_i8);
}
#endif

/* chunking as tt_run: GEMM = one panel per chunk; GEMV (and portable) = `chunks` chunks per thread,
 * each of at least min_blocks x 32 bytes of weights */
static void tt_lb_run(tt_job *J, int nth) {
    const tt_ctx *c = J->c;
    J->p = c->params[tt_bucket(J->m)];
    if (nth <= 0) nth = P.nthreads;
    if (nth > TT_MAX_THREADS) nth = TT_MAX_THREADS;
    if (J->m > 1 && c->isa) {
        J->cg = J->p.panel_rows / 4 > 0 ? J->p.panel_rows / 4 : 1;
    } else if (nth <= 1) {
        J->cg = c->ngroups;
    } else {
        const long per = (long)nth * (J->p.chunks > 0 ? J->p.chunks : 1);
        long cg = ((long)c->ngroups + per - 1) / per;
        const long mb = P.min_blocks > 0 ? P.min_blocks : 1;
        const long gbytes = 4L * (long)c->rowb;
        const long cg_min = (mb * 32 + gbytes - 1) / gbytes;
        if (cg < cg_min) cg = cg_min;
        if (cg > c->ngroups) cg = c->ngroups;
        J->cg = (int)(cg < 1 ? 1 : cg);
    }
    const int nchunks = (c->ngroups + J->cg - 1) / J->cg;
#if TT_X86
    if (c->isa == 2 && c->kind == TT_KIND_INT8) { tt_parallel(tt_lb_task_vnni_i8, J, nchunks, nth); return; }
    if (c->isa == 2 && c->kind == TT_KIND_INT4) { tt_parallel(tt_lb_task_vnni_i4, J, nchunks, nth); return; }
    if (c->isa == 2 && c->kind == TT_KIND_BINARY) { tt_parallel(tt_lb_task_vnni_b1, J, nchunks, nth); return; }
    if (c->isa) { tt_parallel(tt_lb_task_avx2, J, nchunks, nth); return; }
#endif
    tt_parallel(tt_lb_task_portable, J, nchunks, nth);
}

/* ============================================================== constructors */
static tt_ctx *tt_lb_new(int kind, const uint8_t *w, int n, int k, int kp, int align, size_t rowb,
                         const float *row_scale, const float *bias) {
    if (!w || n <= 0 || k <= 0 || k > TT_LB_MAX_K || kp < k || kp % align) return NULL;
    tt_ctx *c = (tt_ctx *)calloc(1, sizeof(tt_ctx));
    if (!c) return NULL;
    c->w = w; c->n = n; c->k = k; c->kp = kp; c->ngroups = (n + 3) / 4;
    c->kind = kind; c->rowb = rowb;
    if (row_scale) {
        c->wscale = (float *)malloc(sizeof(float) * n);
        if (!c->wscale) { tt_ctx_free(c); return NULL; }
        memcpy(c->wscale, row_scale, sizeof(float) * n);
    }
    if (bias) {
        c->bias = (float *)malloc(sizeof(float) * n);
        if (!c->bias) { tt_ctx_free(c); return NULL; }
        memcpy(c->bias, bias, sizeof(float) * n);
    }
    c->isa = tt_cpu_has_avx2();
    for (int i = 0; i < TT_NBUCKETS; i++) { c->params[i].pf = 2048; c->params[i].panel_rows = 32; c->params[i].chunks = 8; c->params[i].nta = 1; }
    return c;
}

/* int8 levels [n, kp] (row stride kp bytes), row_scale [n], bias [n] or NULL */
tt_ctx *tt_ctx_new_int8(const int8_t *w, int n, int k, int kp, const float *row_scale, const float *bias) {
    if (!row_scale || k > TT_I8_MAX_K) return NULL;
    tt_ctx *c = tt_lb_new(TT_KIND_INT8, (const uint8_t *)w, n, k, kp, TT_I8_ALIGN, (size_t)kp, row_scale, bias);
    if (c && tt_cpu_has_avx512vnni()) { /* the VNNI route's row sums; without them the context runs AVX2 */
        c->wsum = (int32_t *)malloc(sizeof(int32_t) * (size_t)n);
        if (c->wsum) tt_i8_row_sums(w, n, k, (size_t)kp, c->wsum);
    }
    return c;
}

/* int4 offset nibbles [n, kp / 2]; group_scales [n, ceil(k / group)] (copied), group 32 / 64 / 128 */
tt_ctx *tt_ctx_new_int4(const uint8_t *w, int n, int k, int kp, int group, const float *group_scales, const float *bias) {
    if (!group_scales || (group != 32 && group != 64 && group != 128)) return NULL;
    tt_ctx *c = tt_lb_new(TT_KIND_INT4, w, n, k, kp, TT_I4_ALIGN, (size_t)kp / 2, NULL, bias);
    if (!c) return NULL;
    const int ng = (k + group - 1) / group;
    c->group = group;
    c->ngk = (kp + group - 1) / group;
    c->gscale = (float *)calloc((size_t)n * c->ngk, sizeof(float));
    if (!c->gscale) { tt_ctx_free(c); return NULL; }
    for (int r = 0; r < n; r++) memcpy(c->gscale + (size_t)r * c->ngk, group_scales + (size_t)r * ng, sizeof(float) * ng);
    return c;
}

/* binary bits [n, kp / 8], row_scale [n], bias [n] or NULL */
tt_ctx *tt_ctx_new_binary(const uint8_t *w, int n, int k, int kp, const float *row_scale, const float *bias) {
    if (!row_scale) return NULL;
    return tt_lb_new(TT_KIND_BINARY, w, n, k, kp, TT_B1_ALIGN, (size_t)kp / 8, row_scale, bias);
}

int tt_ctx_get_kind(const tt_ctx *c) { return c->kind; }
